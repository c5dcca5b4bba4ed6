//! LoRA against PEFT: the dense fixture model with the fixture's PEFT adapter (non-zero B)
//! gives PEFT's logits, loss and LoRA gradients; the base stays frozen.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use whet_engine::grad::{loss_and_gradients, LossOptions};
use whet_engine::model::params::peft_key;
use whet_engine::model::{adapter, LoraOptions, Model, ModelOptions, Trainable};

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{fixtures, load_batch as batch};

fn expected(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected").join(file), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn lora_model() -> Model {
    let options = ModelOptions {
        trainable: Trainable::Nothing,
        ..ModelOptions::default()
    };
    adapter::from_pretrained_with_adapter(&fixtures(), &fixtures().join("lora"), options).unwrap()
}

#[test]
fn a_peft_adapter_gives_pefts_logits_loss_and_gradients() {
    let model = lora_model();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    // Only the adapters train: 2 layers x 7 modules x (A, B), 16,384 elements.
    assert_eq!(model.trainable_parameters().len(), 28);
    assert_eq!(
        model.num_trainable_parameters() as u64,
        want["lora"]["num_lora_parameters"].as_u64().unwrap()
    );
    assert!(
        !model.layer_parameters(1).is_empty(),
        "adapters sit in their layer's range"
    );

    let b = batch();
    let logits = model
        .forward(&b.input_ids, &b.attention_mask)
        .unwrap()
        .logits;
    let expected_logits = expected("logits_sample0.safetensors")
        .remove("lora")
        .unwrap();
    let real = expected_logits.dim(0).unwrap();
    let got = logits.get(0).unwrap().narrow(0, 0, real).unwrap();
    for (g, e) in values(&got).iter().zip(values(&expected_logits)) {
        assert!((g - e).abs() <= 1e-4, "logit {g} vs {e}");
    }

    let (report, grads) =
        loss_and_gradients(&model, &b, &LossOptions::for_model(model.config())).unwrap();
    let want_loss = want["lora"]["loss"].as_f64().unwrap();
    assert!(
        (report.loss - want_loss).abs() / want_loss < 1e-5,
        "{} vs {want_loss}",
        report.loss
    );
    let want_grads = expected("lora_grads.safetensors");
    assert_eq!(grads.num_present(), want_grads.len());
    for (name, grad) in grads.iter() {
        let e = values(&want_grads[&peft_key(name)]);
        let g = values(grad.unwrap());
        let scale = e.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        for (g, e) in g.iter().zip(&e) {
            assert!(
                (g - e).abs() <= 1e-3 * scale,
                "{name}: {g} vs {e} (scale {scale:e})"
            );
        }
    }
}

/// A fresh adapter starts as PEFT's does: B is zero, so the model computes the base's logits.
#[test]
fn a_fresh_adapter_leaves_the_base_function_unchanged() {
    let base = Model::from_pretrained(fixtures(), ModelOptions::default()).unwrap();
    let options = ModelOptions {
        trainable: Trainable::Nothing,
        lora: Some(LoraOptions {
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into(), "down_proj".into()],
            use_rslora: false,
        }),
        ..ModelOptions::default()
    };
    let fresh = Model::from_pretrained(fixtures(), options).unwrap();
    assert_eq!(fresh.trainable_parameters().len(), 2 * 2 * 2);
    let b = batch();
    let want = base
        .forward(&b.input_ids, &b.attention_mask)
        .unwrap()
        .logits;
    let got = fresh
        .forward(&b.input_ids, &b.attention_mask)
        .unwrap()
        .logits;
    assert_eq!(values(&got), values(&want));
    // A is Kaiming-uniform: inside PEFT's bound 1/sqrt(in) and not all zero.
    let (name, a) = &fresh.trainable_parameters()[0];
    assert!(name.ends_with("q_proj.lora_A.weight"), "{name}");
    let bound = 1.0 / (a.dim(1).unwrap() as f64).sqrt();
    let a = values(a.as_tensor());
    assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| *v != 0.0));
    // Saving the model writes the base only (adapters are written apart, as PEFT does).
    assert_eq!(
        fresh.state_dict(DType::F32).unwrap().len(),
        base.state_dict(DType::F32).unwrap().len()
    );
}

/// `whet infer --adapters DIR` applies a PEFT adapter without merging (the loading is the one
/// the parity test above checks); a folder that is no adapter is a clear error.
#[test]
fn whet_infer_applies_an_adapter() {
    let infer = |adapter: Option<PathBuf>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_whet"));
        command
            .args([
                "infer",
                "--query",
                "What is 2 + 3?",
                "--max_new_tokens",
                "12",
                "--model",
            ])
            .arg(fixtures());
        if let Some(adapter) = adapter {
            command.arg("--adapters").arg(adapter);
        }
        command.output().unwrap()
    };
    let plain = infer(None);
    let adapted = infer(Some(fixtures().join("lora")));
    assert!(
        adapted.status.success(),
        "{}",
        String::from_utf8_lossy(&adapted.stderr)
    );
    assert_ne!(
        plain.stdout, adapted.stdout,
        "the adapter changes what the model says"
    );
    let wrong = infer(Some(fixtures().join("expected")));
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("not a PEFT adapter folder"), "{stderr}");
}
