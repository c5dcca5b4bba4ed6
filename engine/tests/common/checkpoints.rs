//! Comparing the checkpoints of two runs (shared by the test binaries that include it).

use std::path::Path;

use serde_json::Value;

/// The final checkpoints of two runs hold the same weights, optimizer state, schedule and data
/// position, bit for bit (args.json and trainer_state.json name run folders, so they differ).
pub fn assert_same_final_state(expected: &Path, got: &Path) {
    let read = |dir: &Path, file: &str| {
        std::fs::read(dir.join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
    };
    for file in ["model.safetensors", "scheduler.json", "training_state.json"] {
        assert!(
            read(expected, file) == read(got, file),
            "{file} of the resumed run differs from the uninterrupted run's"
        );
    }
    let optimizer_files: Vec<String> = std::fs::read_dir(expected.join("optimizer"))
        .unwrap()
        .map(|e| format!("optimizer/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert!(!optimizer_files.is_empty());
    for file in optimizer_files {
        // The optimizer's `__metadata__` (step, betas, ...) comes from a HashMap, whose order
        // changes from process to process: compare the header as JSON, the tensors as bytes.
        let (expected_bytes, got_bytes) = (read(expected, &file), read(got, &file));
        let (header, tensors) = safetensors_parts(&expected_bytes);
        let (got_header, got_tensors) = safetensors_parts(&got_bytes);
        assert_eq!(got_header, header, "{file}: header");
        assert!(
            got_tensors == tensors,
            "{file}: the resumed run's tensors differ from the uninterrupted run's"
        );
    }
}

/// A safetensors file split into its JSON header and its tensor bytes.
pub fn safetensors_parts(bytes: &[u8]) -> (Value, &[u8]) {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    (header, &bytes[8 + header_len..])
}
