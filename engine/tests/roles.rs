//! Parameters with roles: frozen weights are stored once in the compute dtype, get no gradient
//! and no optimizer state, and never change; the trainable ones get exactly the gradients full
//! fine-tuning gives them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use whet_engine::grad::{loss_and_gradients, Batch, LossOptions};
use whet_engine::model::{Model, ModelOptions, Param, Trainable};
use whet_engine::optim::{clip_grad_norm, AdamW, AdamWConfig};
use whet_engine::sync::SingleProcess;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/hf-reference")
}

fn batch() -> Batch {
    let device = Device::Cpu;
    let ids = [[508u32, 426, 198, 18, 220, 87, 509, 11]];
    Batch {
        input_ids: Tensor::new(&ids, &device).unwrap(),
        attention_mask: Tensor::ones((1, 8), DType::U32, &device).unwrap(),
        labels: Tensor::new(&[[-100i64, -100, 198, 18, 220, 87, 509, 11]], &device).unwrap(),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Everything but the embeddings and layer 0 is trained.
fn partly_frozen(full: &Model) -> BTreeSet<String> {
    full.trainable_parameters()
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| !n.starts_with("model.embed_tokens") && !n.starts_with("model.layers.0."))
        .collect()
}

#[test]
fn frozen_parameters_get_no_gradient_no_state_and_never_change() {
    let full = Model::from_pretrained(fixture(), ModelOptions::default()).unwrap();
    let trained = partly_frozen(&full);
    let options = ModelOptions {
        trainable: Trainable::Only(trained.clone()),
        ..ModelOptions::default()
    };
    let model = Model::from_pretrained(fixture(), options).unwrap();
    assert_eq!(model.trainable_parameters().len(), trained.len());
    assert!(model.trainable_parameters().len() < full.trainable_parameters().len());
    assert_eq!(model.num_parameters(), full.num_parameters());
    // Layer 0 has no trainable parameters; the others keep theirs.
    assert!(model.layer_parameters(0).is_empty());
    assert!(!model.layer_parameters(1).is_empty());

    // Plain and checkpointed backward: the trainable parameters' gradients are full
    // fine-tuning's, bit for bit; the frozen ones have none.
    for gradient_checkpointing in [false, true] {
        let loss = LossOptions {
            gradient_checkpointing,
            dropout_seed: None,
            ..LossOptions::for_model(model.config())
        };
        let (report, grads) = loss_and_gradients(&model, &batch(), &loss).unwrap();
        let (full_report, full_grads) = loss_and_gradients(&full, &batch(), &loss).unwrap();
        assert_eq!(report.loss.to_bits(), full_report.loss.to_bits());
        assert_eq!(grads.len(), trained.len());
        assert_eq!(grads.num_present(), trained.len());
        for (name, grad) in grads.iter() {
            let want = full_grads.get_by_name(name).unwrap();
            assert_eq!(values(grad.unwrap()), values(want), "{name}");
        }
    }

    // The optimizer holds state for the trainable elements only; a step leaves frozen weights
    // as they were and moves the trainable ones.
    let before: Vec<(String, Vec<f32>)> = model
        .state_dict(DType::F32)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, values(&t)))
        .collect();
    let mut optimizer = AdamW::new(model.trainable(), AdamWConfig::default()).unwrap();
    assert_eq!(optimizer.range(), 0..model.num_trainable_parameters());
    let (_, mut grads) =
        loss_and_gradients(&model, &batch(), &LossOptions::for_model(model.config())).unwrap();
    let mut sync = SingleProcess::new(model.num_trainable_parameters());
    clip_grad_norm(&mut grads, 1.0, &mut sync).unwrap();
    optimizer.step(&grads, 1e-2).unwrap();
    for ((name, after), (_, before)) in model.state_dict(DType::F32).unwrap().iter().zip(&before) {
        let changed = values(after) != *before;
        assert_eq!(changed, trained.contains(name), "{name}");
    }
}

#[test]
fn frozen_weights_are_stored_once_in_the_compute_dtype() {
    let options = ModelOptions {
        compute_dtype: DType::BF16,
        trainable: Trainable::Nothing,
        ..ModelOptions::default()
    };
    let model = Model::from_pretrained(fixture(), options).unwrap();
    assert!(model.trainable_parameters().is_empty());
    assert_eq!(model.num_trainable_parameters(), 0);
    for (name, param) in model.params() {
        let Param::Frozen(tensor) = param else {
            panic!("{name} is trainable");
        };
        assert_eq!(tensor.dtype(), DType::BF16, "{name}");
    }
    // It still computes: logits in bf16, and no backward graph is recorded for frozen weights.
    let b = batch();
    let out = model.forward(&b.input_ids, &b.attention_mask).unwrap();
    assert_eq!(out.logits.dtype(), DType::BF16);
    assert!(!out.logits.track_op());
}
