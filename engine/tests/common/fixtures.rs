//! The shared reference fixtures (shared/fixtures/hf-reference) for the parity tests, and
//! where those tests run: `WHET_TEST_DEVICE` (cpu, or cuda: visible GPU LOCAL_RANK) and
//! `WHET_TEST_DTYPE` (the compute dtype, float32 or bfloat16), so that the GPU bundle
//! (`cargo xtask gpu-bundle`) runs the same test binary on a GPU in both precisions.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use whet_engine::grad::Batch;

/// The fixture folder: `WHET_FIXTURES` (a copy beside a shipped test binary), else the
/// shared/ folder beside the repository root.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("WHET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures/hf-reference"
            ))
        });
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

/// The device the parity tests run on (`WHET_TEST_DEVICE`: cpu, the default, or cuda). One
/// device for the process: tensors of two opened instances of a GPU would not mix.
#[allow(dead_code)] // not every test binary that includes this uses it
pub fn test_device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(|| match std::env::var("WHET_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => whet_engine::device::open_visible_gpu()
            .unwrap_or_else(|d| panic!("WHET_TEST_DEVICE=cuda: {} ({})", d.message_en, d.fix)),
        Ok(other) => panic!("WHET_TEST_DEVICE={other}: use cpu or cuda"),
    })
}

/// The compute dtype of the parity tests (`WHET_TEST_DTYPE`: float32, the default, or
/// bfloat16); the masters stay f32 either way.
#[allow(dead_code)] // not every test binary that includes this uses it
pub fn test_dtype() -> DType {
    match std::env::var("WHET_TEST_DTYPE").as_deref() {
        Err(_) | Ok("") => DType::F32,
        Ok(name) => match whet_engine::dtype::parse(name) {
            Some(dtype @ (DType::F32 | DType::BF16)) => dtype,
            _ => panic!("WHET_TEST_DTYPE={name}: use float32 or bfloat16"),
        },
    }
}

/// The fixture's 3-sample padded training batch (batch.json), on the CPU.
#[allow(dead_code)] // not every test binary that includes this uses it
pub fn load_batch() -> Batch {
    load_batch_on(&Device::Cpu)
}

/// The same batch on `device`.
#[allow(dead_code)] // not every test binary that includes this uses it
pub fn load_batch_on(device: &Device) -> Batch {
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
    // Converted on the CPU, then moved: the casts every backend has.
    let on_device = |t: Tensor| t.to_device(device).unwrap();
    Batch {
        input_ids: on_device(to_tensor(rows("input_ids")).to_dtype(DType::U32).unwrap()),
        attention_mask: on_device(
            to_tensor(rows("attention_mask"))
                .to_dtype(DType::U32)
                .unwrap(),
        ),
        labels: on_device(to_tensor(rows("labels"))),
    }
}
