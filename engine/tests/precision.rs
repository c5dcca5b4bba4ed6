//! Half-precision compute with f32 master weights: bf16 and f16 runs follow the f32 run's losses
//! closely, and their checkpoints hold weights in the run's dtype. Data workers (tokenizing and
//! collating ahead) change nothing in the losses.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/hf-reference"
    ))
}

fn losses(dtype: &str, out: &Path) -> Vec<f64> {
    losses_with(dtype, out, &[])
}

fn losses_with(dtype: &str, out: &Path, extra: &[&str]) -> Vec<f64> {
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/demo/train.jsonl#48"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args([
            "sft",
            "--tuner_type",
            "full",
            "--template",
            "qwen3_thinking",
            "--max_steps",
            "4",
        ])
        .args([
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "1",
            "--learning_rate",
            "1e-3",
        ])
        .args([
            "--logging_steps",
            "1",
            "--save_steps",
            "4",
            "--torch_dtype",
            dtype,
            "--dataset",
            data,
        ])
        .arg("--model")
        .arg(fixture())
        .arg("--output_dir")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{dtype}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run = std::fs::read_dir(out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::read_to_string(run.join("logging.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

#[test]
fn bf16_and_f16_follow_the_f32_run() {
    let base = std::env::temp_dir().join(format!("whet-precision-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let reference = losses("float32", &base.join("f32"));
    assert_eq!(reference.len(), 4);
    for (dtype, safetensors_dtype) in [("bfloat16", "BF16"), ("float16", "F16")] {
        let out = base.join(dtype);
        let half = losses(dtype, &out);
        assert_eq!(half.len(), 4);
        for (a, b) in half.iter().zip(&reference) {
            assert!(
                ((a - b) / b).abs() < 0.02,
                "{dtype}: {half:?} vs f32 {reference:?}"
            );
        }
        assert!(half[3] < half[0], "{dtype} trains: {half:?}");
        let run = std::fs::read_dir(&out)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let bytes = std::fs::read(run.join("checkpoint-4/model.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8_lossy(&bytes[8..8 + header_len]);
        assert!(
            header.contains(&format!("\"dtype\":\"{safetensors_dtype}\"")),
            "{dtype}: {header}"
        );
    }
}

#[test]
fn batches_and_losses_do_not_depend_on_the_number_of_data_workers() {
    let base = std::env::temp_dir().join(format!("whet-workers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let inline = losses_with(
        "float32",
        &base.join("w0"),
        &["--dataloader_num_workers", "0"],
    );
    let prefetched = losses_with(
        "float32",
        &base.join("w3"),
        &["--dataloader_num_workers", "3"],
    );
    assert_eq!(inline.len(), 4);
    assert_eq!(inline, prefetched, "bit-identical losses");
}
