//! LoRA against PEFT: the dense fixture model with the fixture's PEFT adapter (non-zero B)
//! gives PEFT's logits, loss and LoRA gradients; the base stays frozen.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use whet_engine::grad::{loss_and_gradients, LossOptions};
use whet_engine::model::params::peft_key;
use whet_engine::model::{adapter, LoraOptions, Model, ModelOptions, Trainable};
use whet_shared::lora::AdapterPlan;
use whet_shared::SftConfig;

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{fixtures, load_batch as batch};

#[path = "../../tests/src/prerequisites.rs"]
mod prerequisites;

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

/// Fresh LoRA settings, the targets and the rest as `edit` sets them on a default config.
fn lora_options(rank: usize, alpha: f64, edit: impl FnOnce(&mut SftConfig)) -> LoraOptions {
    let mut sft = SftConfig::default();
    edit(&mut sft);
    LoraOptions {
        rank,
        alpha,
        use_rslora: sft.use_rslora,
        dropout: 0.0,
        plan: AdapterPlan::from_config(&sft).unwrap(),
        init_seed: 7,
    }
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
        lora: Some(lora_options(4, 8.0, |sft| {
            sft.target_modules = vec!["q_proj".into(), "down_proj".into()];
        })),
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
    // A's initialisation comes from --seed: the same seed gives the same A, another a new one.
    let fresh_with = |seed: u64| {
        let mut lora = lora_options(4, 8.0, |sft| sft.target_modules = vec!["q_proj".into()]);
        lora.init_seed = seed;
        let options = ModelOptions {
            trainable: Trainable::Nothing,
            lora: Some(lora),
            ..ModelOptions::default()
        };
        let model = Model::from_pretrained(fixtures(), options).unwrap();
        values(model.trainable_parameters()[0].1.as_tensor())
    };
    assert_eq!(fresh_with(7), a);
    assert_ne!(fresh_with(8), a);
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

/// LoRA dropout as PEFT applies it in training (inverted dropout on each adapter's input):
/// the masks change the loss, come from the micro-batch's seed alone — so the layer recomputed
/// under gradient checkpointing sees the same ones and its gradients equal the plain path's —
/// and evaluation has none.
#[test]
fn dropout_masks_are_reproducible_and_survive_recomputation() {
    let options = ModelOptions {
        trainable: Trainable::Nothing,
        ..ModelOptions::default()
    };
    let model =
        adapter::from_pretrained_with_adapter(&fixtures(), &fixtures().join("lora"), options)
            .unwrap();
    let b = batch();
    let loss = |model: &Model, seed: Option<u64>, checkpointing: bool| {
        let options = LossOptions {
            dropout_seed: seed,
            gradient_checkpointing: checkpointing,
            ..LossOptions::for_model(model.config())
        };
        loss_and_gradients(model, &b, &options).unwrap()
    };
    let (no_dropout, _) = loss(&model, Some(3), false);
    // The fixture adapter has lora_dropout 0; the same adapter with 0.3:
    let model = {
        let mut lora = adapter::read_adapter_config(&fixtures().join("lora")).unwrap();
        lora.dropout = 0.3;
        let options = ModelOptions {
            trainable: Trainable::Nothing,
            lora: Some(lora),
            ..ModelOptions::default()
        };
        let base = whet_engine::tensor_files::MappedWeights::open_model_dir(&fixtures()).unwrap();
        let weights = fixtures().join("lora/adapter_model.safetensors");
        let adapter =
            whet_engine::tensor_files::MappedWeights::open(&[weights], &fixtures()).unwrap();
        Model::build_with_adapter(
            model.config().clone(),
            whet_engine::model::WeightSource::Files(vec![base]),
            Some(adapter),
            options,
        )
        .unwrap()
    };
    let (plain, plain_grads) = loss(&model, Some(3), false);
    let (again, _) = loss(&model, Some(3), false);
    let (recomputed, recomputed_grads) = loss(&model, Some(3), true);
    let (other_seed, _) = loss(&model, Some(4), false);
    let (eval, _) = loss(&model, None, false);
    assert_ne!(plain.loss, no_dropout.loss, "dropout changes the loss");
    assert_eq!(plain.loss, again.loss, "the same seed, the same masks");
    assert_ne!(plain.loss, other_seed.loss);
    assert!(
        (eval.loss - no_dropout.loss).abs() < 1e-6,
        "no dropout in eval"
    );
    assert!((plain.loss - recomputed.loss).abs() < 1e-6);
    for ((name, a), (_, b)) in plain_grads.iter().zip(recomputed_grads.iter()) {
        for (x, y) in values(a.unwrap()).iter().zip(values(b.unwrap())) {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-3),
                "{name}: {x} vs {y}"
            );
        }
    }
}

/// A PEFT adapter with rsLoRA, a `target_regex`-style pattern and `modules_to_save` (lm_head):
/// whet computes PEFT's logits from it, and what whet saves of it PEFT loads back, under its own
/// key names, to the same logits.
#[test]
fn rslora_regex_targets_and_modules_to_save_round_trip_with_peft() {
    let python = match prerequisites::reference_python() {
        Ok(python) => python,
        Err(why) => {
            prerequisites::skip(
                "rslora_regex_targets_and_modules_to_save_round_trip_with_peft",
                &why,
            );
            return;
        }
    };
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/peft_adapter.py"
    ));
    let root = std::env::temp_dir().join(format!("whet-lora-peft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let made = root.join("peft");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let batch_file = fixtures().join("batch.json");
    run(&[
        "make".as_ref(),
        fixtures().as_os_str(),
        batch_file.as_os_str(),
        made.as_os_str(),
    ]);

    let lora = adapter::read_adapter_config(&made).unwrap();
    assert!(
        lora.use_rslora && (lora.scaling() - 8.0).abs() < 1e-12,
        "16 / sqrt(4)"
    );
    let options = ModelOptions {
        trainable: Trainable::Nothing,
        ..ModelOptions::default()
    };
    let model = adapter::from_pretrained_with_adapter(&fixtures(), &made, options).unwrap();
    // Layer 1's q_proj and down_proj only, and lm_head in full.
    let names: Vec<&str> = model
        .trainable_parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.contains(&"lm_head.weight"), "{names:?}");
    let b = batch();
    let got = model
        .forward(&b.input_ids, &b.attention_mask)
        .unwrap()
        .logits;
    let want = candle_core::safetensors::load(made.join("logits.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("logits")
        .unwrap();
    let mask = values(&b.attention_mask);
    let vocab = got.dim(2).unwrap();
    for (i, (g, e)) in values(&got).iter().zip(values(&want)).enumerate() {
        if mask[i / vocab] != 0.0 {
            assert!((g - e).abs() <= 1e-4, "logit {i}: {g} vs PEFT {e}");
        }
    }

    let saved = root.join("whet");
    std::fs::create_dir_all(&saved).unwrap();
    adapter::save_adapter(&saved, &model, &lora, &fixtures()).unwrap();
    run(&[
        "check".as_ref(),
        fixtures().as_os_str(),
        batch_file.as_os_str(),
        saved.as_os_str(),
        made.join("logits.safetensors").as_os_str(),
    ]);
    let _ = std::fs::remove_dir_all(&root);
}

/// On Qwen3-MoE, all-linear adapts every expert's projections as well as attention, never the
/// router; the count is the one whet-shared derives for `whet check`.
#[test]
fn all_linear_adapts_moe_experts_but_not_the_router() {
    let lora = lora_options(8, 32.0, |_| {});
    let plan = lora.plan.clone();
    let options = ModelOptions {
        trainable: Trainable::Nothing,
        lora: Some(lora),
        ..ModelOptions::default()
    };
    let model = Model::from_pretrained(fixtures().join("moe"), options).unwrap();
    let names: Vec<&str> = model
        .trainable_parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(names
        .iter()
        .any(|n| n.ends_with("mlp.experts.3.down_proj.lora_B.weight")));
    assert!(names.iter().all(|n| !n.contains("mlp.gate.")), "{names:?}");
    let config = std::fs::read_to_string(fixtures().join("moe/config.json")).unwrap();
    let facts = whet_shared::ModelFacts::from_config_json("moe", &config).unwrap();
    assert_eq!(
        model.num_trainable_parameters() as u64,
        facts.lora_params(8, &plan)
    );
}
