//! PEFT LoRA adapter folders: `adapter_config.json` read into [`LoraOptions`] (refusing what
//! whet does not compute yet, rather than computing something else) and
//! `adapter_model.safetensors` applied over a base model.

use std::path::Path;

use anyhow::{bail, Context};

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
    if field("bias").as_str().is_some_and(|b| b != "none") {
        bail!(
            "{}: bias {} is not supported yet; use bias \"none\"",
            path.display(),
            field("bias")
        );
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(key).as_object().is_some_and(|m| !m.is_empty()) {
            bail!("{}: {key} is not supported yet", path.display());
        }
    }
    let target_modules: Vec<String> = match field("target_modules") {
        serde_json::Value::Array(names) => names
            .iter()
            .map(|n| n.as_str().map(String::from))
            .collect::<Option<_>>()
            .context("target_modules holds a non-string")?,
        other => bail!(
            "{}: target_modules {other} is not a list of module names (a regex is not supported yet)",
            path.display()
        ),
    };
    Ok(LoraOptions {
        rank: field("r")
            .as_u64()
            .context("adapter_config.json has no `r`")? as usize,
        alpha: field("lora_alpha")
            .as_f64()
            .context("adapter_config.json has no `lora_alpha`")?,
        target_modules,
        use_rslora: field("use_rslora").as_bool().unwrap_or(false),
    })
}

/// The base model in `base_dir` with the adapter in `adapter_dir` on top (its settings replace
/// `options.lora`). The base's roles follow `options.trainable`.
pub fn from_pretrained_with_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    mut options: ModelOptions,
) -> anyhow::Result<Model> {
    options.lora = Some(read_adapter_config(adapter_dir)?);
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
        "lora_dropout": 0.0,
        "target_modules": lora.target_modules,
        "use_rslora": lora.use_rslora,
        "bias": "none",
        "lora_bias": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
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
        .map(|(name, t)| (super::params::peft_key(&name), t))
        .collect();
    crate::tensor_files::write(
        &dir.join("adapter_model.safetensors"),
        tensors,
        crate::tensor_files::pt_metadata(),
    )?;
    Ok(())
}
