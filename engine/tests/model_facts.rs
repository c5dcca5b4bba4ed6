//! whet-shared's picture of a model against the model the engine builds: `ModelFacts` lists the
//! engine's tensors (names and sizes), and the trainable parameters it counts for a LoRA config
//! are those the engine trains — so `whet check`'s figures and the memory estimate count what
//! `whet sft` holds.

use std::collections::BTreeMap;
use std::path::Path;

use whet_engine::model::{Model, ModelConfig, ModelOptions, Trainable};
use whet_engine::train::setup::lora_options;
use whet_shared::lora::AdapterPlan;
use whet_shared::{parse_shell, ModelFacts};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/hf-reference"
);
const TINY_QWEN3: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tiny-qwen3");

fn config_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("config.json")).unwrap()
}

/// The fixtures (dense and MoE, untied), the demo's tied model, Qwen3 with attention biases and
/// Qwen2 (q/k/v biases, no q/k norms).
fn configs() -> Vec<(String, String)> {
    let dense = config_text(Path::new(FIXTURES));
    let with_bias = dense.replace(r#""attention_bias": false"#, r#""attention_bias": true"#);
    assert_ne!(with_bias, dense);
    let qwen2 = dense
        .replace("Qwen3ForCausalLM", "Qwen2ForCausalLM")
        .replace(r#""model_type": "qwen3""#, r#""model_type": "qwen2""#);
    vec![
        ("dense".into(), dense),
        ("moe".into(), config_text(&Path::new(FIXTURES).join("moe"))),
        ("tiny-qwen3".into(), config_text(Path::new(TINY_QWEN3))),
        ("qwen3 with attention_bias".into(), with_bias),
        ("qwen2".into(), qwen2),
    ]
}

fn built(text: &str, options: ModelOptions) -> Model {
    Model::random(ModelConfig::from_json_str(text).unwrap(), 7, options).unwrap()
}

#[test]
fn model_facts_lists_the_tensors_the_engine_builds() {
    for (what, text) in configs() {
        let facts = ModelFacts::from_config_json(&what, &text).unwrap();
        let mut listed = BTreeMap::new();
        facts.for_each_tensor(|t| {
            listed.insert(t.name.to_string(), t.numel() as usize);
        });
        let model = built(&text, ModelOptions::default());
        let engine: BTreeMap<String, usize> = model
            .params()
            .iter()
            .map(|(name, param)| (name.clone(), param.elem_count()))
            .collect();
        assert_eq!(listed, engine, "{what}");
        assert_eq!(
            facts.param_counts().total as usize,
            model.num_parameters(),
            "{what}"
        );
    }
}

#[test]
fn lora_trainable_parameters_are_what_the_engine_trains() {
    for flags in [
        "--tuner_type lora --lora_rank 8",
        "--tuner_type lora --lora_rank 4 --target_modules q_proj v_proj",
        "--tuner_type lora --lora_rank 2 --target_modules down_proj o_proj",
    ] {
        let config =
            parse_shell(&format!("swift sft --model m --dataset d.jsonl {flags}")).unwrap();
        let plan = AdapterPlan::from_config(&config.sft).unwrap();
        for (what, text) in configs() {
            let facts = ModelFacts::from_config_json(&what, &text).unwrap();
            let options = ModelOptions {
                trainable: Trainable::Nothing,
                lora: lora_options(&config).unwrap(),
                ..ModelOptions::default()
            };
            let model = built(&text, options);
            assert_eq!(
                facts.lora_params(config.sft.lora_rank as u64, &plan) as usize,
                model.num_trainable_parameters(),
                "{what}: {flags}"
            );
        }
    }
}
