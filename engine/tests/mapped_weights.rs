//! Loading memory-maps the safetensors files and copies out only the tensors asked for, so a
//! checkpoint far larger than the tensors a process needs never sits in its memory whole.
//! (A test binary of its own: it measures this process's anonymous memory.)

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use whet_engine::tensor_files::{self, MappedWeights};

/// This process's anonymous resident memory (heap, not file-backed pages), in bytes.
fn anonymous_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn one_tensor_of_a_large_file_is_all_that_is_read() {
    let dir = std::env::temp_dir().join(format!("whet-mapped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    {
        // 256 MiB of f32 beside a small tensor.
        let big = Tensor::ones((64, 1024, 1024), DType::F32, &Device::Cpu).unwrap();
        let small = Tensor::arange(0f32, 16.0, &Device::Cpu).unwrap();
        tensor_files::write(
            &path,
            vec![("big".into(), big), ("small".into(), small)],
            HashMap::new(),
        )
        .unwrap();
    }
    let before = anonymous_rss();
    let weights = MappedWeights::open_model_dir(&dir).unwrap();
    assert!(weights.contains("big") && weights.contains("small"));
    let small = weights.load("small", &Device::Cpu).unwrap();
    assert_eq!(small.to_vec1::<f32>().unwrap()[15], 15.0);
    let grown = anonymous_rss().saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "opening a 256 MiB file and loading 64 bytes grew anonymous memory by {} MiB",
        grown >> 20
    );
    // The large tensor is there when asked for.
    let big = weights.load("big", &Device::Cpu).unwrap();
    assert_eq!(big.dims(), &[64, 1024, 1024]);
    drop((big, weights));
    std::fs::remove_dir_all(dir).ok();
}
