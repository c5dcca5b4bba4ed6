//! The shared reference fixtures (shared/fixtures/hf-reference) for the parity tests.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use whet_engine::grad::Batch;

pub fn fixtures() -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/hf-reference"
    ));
    assert!(
        dir.join("batch.json").exists(),
        "HF reference fixtures not found at {} (expected the shared/ folder beside the repository root)",
        dir.display()
    );
    dir
}

/// A fixture model's folder: `dense` (the top folder) or `moe`.
#[allow(dead_code)] // not every test binary that includes this uses it
pub fn model_dir(kind: &str) -> PathBuf {
    match kind {
        "dense" => fixtures(),
        "moe" => fixtures().join("moe"),
        other => panic!("no fixture model {other}"),
    }
}

/// The fixture's 3-sample padded training batch (batch.json).
#[allow(dead_code)] // not every test binary that includes this uses it
pub fn load_batch() -> Batch {
    let text = std::fs::read_to_string(fixtures().join("batch.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(json[key].clone()).unwrap() };
    let to_tensor = |rows: Vec<Vec<i64>>| {
        let (b, t) = (rows.len(), rows[0].len());
        Tensor::from_vec(
            rows.into_iter().flatten().collect::<Vec<_>>(),
            (b, t),
            &Device::Cpu,
        )
        .unwrap()
    };
    Batch {
        input_ids: to_tensor(rows("input_ids")).to_dtype(DType::U32).unwrap(),
        attention_mask: to_tensor(rows("attention_mask"))
            .to_dtype(DType::U32)
            .unwrap(),
        labels: to_tensor(rows("labels")),
    }
}
