//! PEFT LoRA adapter folders: `adapter_config.json` read into [`LoraOptions`] (refusing what
//! whet does not compute yet, rather than computing something else) and
//! `adapter_model.safetensors` applied over a base model.

use std::path::Path;

use anyhow::{bail, Context};

use whet_shared::lora::AdapterPlan;
use whet_shared::SftConfig;

use super::params::LoraOptions;
use super::{Model, ModelConfig, ModelOptions, WeightSource};
use crate::tensor_files::MappedWeights;

/// The LoRA settings of a PEFT adapter folder.
pub fn read_adapter_config(dir: &Path) -> anyhow::Result<LoraOptions> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a PEFT adapter folder", dir.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let field = |key: &str| &json[key];
    if field("peft_type").as_str() != Some("LORA") {
        bail!(
            "{}: peft_type {} is not LORA; whet applies LoRA adapters only",
            path.display(),
            field("peft_type")
        );
    }
    for (key, off) in [
        ("use_dora", false),
        ("fan_in_fan_out", false),
        ("lora_bias", false),
    ] {
        if field(key).as_bool().unwrap_or(off) != off {
            bail!(
                "{}: {key} is set, which whet does not compute yet",
                path.display()
            );
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(key).as_object().is_some_and(|m| !m.is_empty()) {
            bail!("{}: {key} is not supported yet", path.display());
        }
    }
    let names = |key: &str| -> anyhow::Result<Vec<String>> {
        match field(key) {
            serde_json::Value::Null => Ok(Vec::new()),
            serde_json::Value::Array(names) => names
                .iter()
                .map(|n| n.as_str().map(String::from))
                .collect::<Option<_>>()
                .with_context(|| format!("{}: {key} holds a non-string", path.display())),
            other => bail!(
                "{}: {key} {other} is not a list of module names",
                path.display()
            ),
        }
    };
    // PEFT's target_modules is a list of names, or one string it full-matches as a regex.
    let (target_modules, target_regex) = match field("target_modules") {
        serde_json::Value::String(pattern) => (Vec::new(), Some(pattern.clone())),
        _ => (names("target_modules")?, None),
    };
    let sft = SftConfig {
        target_modules,
        target_regex,
        modules_to_save: names("modules_to_save")?,
        lora_bias: field("bias").as_str().unwrap_or("none").to_string(),
        ..SftConfig::default()
    };
    let plan = AdapterPlan::from_config(&sft)
        .map_err(|d| anyhow::anyhow!("{}: {} ({})", path.display(), d.message_en, d.fix))?;
    Ok(LoraOptions {
        rank: field("r")
            .as_u64()
            .filter(|&r| r >= 1)
            .context("adapter_config.json has no `r` of at least 1")? as usize,
        alpha: field("lora_alpha")
            .as_f64()
            .context("adapter_config.json has no `lora_alpha`")?,
        use_rslora: field("use_rslora").as_bool().unwrap_or(false),
        dropout: field("lora_dropout").as_f64().unwrap_or(0.0),
        plan,
        init_seed: 0,
    })
}

/// The base model in `base_dir` with the adapter in `adapter_dir` on top (its settings replace
/// `options.lora`). The base's roles follow `options.trainable`.
pub fn from_pretrained_with_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    mut options: ModelOptions,
) -> anyhow::Result<Model> {
    let init_seed = options.lora.as_ref().map_or(0, |l| l.init_seed);
    options.lora = Some(LoraOptions {
        init_seed,
        ..read_adapter_config(adapter_dir)?
    });
    let config = ModelConfig::from_model_dir(base_dir)?;
    let base = MappedWeights::open_model_dir(base_dir)?;
    let weights = adapter_dir.join("adapter_model.safetensors");
    let adapter = MappedWeights::open(&[weights], adapter_dir)?;
    Ok(Model::build_with_adapter(
        config,
        WeightSource::Files(vec![base]),
        Some(adapter),
        options,
    )?)
}

/// Writes `model`'s adapters into `dir` as PEFT's `save_pretrained` does:
/// `adapter_config.json` and `adapter_model.safetensors` (keys `base_model.model.<name>`, f32).
pub fn save_adapter(
    dir: &Path,
    model: &Model,
    lora: &LoraOptions,
    base_model: &Path,
) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model.display().to_string(),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.plan.peft_target_modules(),
        "use_rslora": lora.use_rslora,
        "bias": lora.plan.peft_bias(),
        "lora_bias": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": lora.plan.peft_modules_to_save(),
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    let tensors = model
        .trainable_state_dict()?
        .into_iter()
        .map(|(name, t)| (lora.peft_key(&name), t))
        .collect();
    crate::tensor_files::write(
        &dir.join("adapter_model.safetensors"),
        tensors,
        crate::tensor_files::pt_metadata(),
    )?;
    Ok(())
}
