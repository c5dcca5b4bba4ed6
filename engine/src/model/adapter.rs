//! PEFT LoRA adapter folders: `adapter_config.json` read into [`LoraOptions`] (refusing what
//! whet does not compute yet, rather than computing something else),
//! `adapter_model.safetensors` applied over a base model, and merged into the base's weights
//! ([`merge_adapter`], what `whet export --merge_lora true` writes).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use whet_shared::lora::AdapterPlan;
use whet_shared::SftConfig;

use super::params::{lora_scaling, peft_key, LoraOptions};
use super::{Model, ModelConfig, ModelOptions, WeightSource};
use crate::tensor_files::{self, MappedWeights, TensorFileError};

/// `dir/adapter_config.json` as JSON, with its path for messages.
fn adapter_config_json(dir: &Path) -> anyhow::Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a PEFT adapter folder (no readable adapter_config.json)",
            dir.display()
        )
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok((path, json))
}

/// Refuses the LoRA variants whose math whet does not do (DoRA, transposed weights, a bias on
/// B, per-module ranks or alphas) — for applying and merging alike.
fn check_lora_math(path: &Path, json: &serde_json::Value) -> anyhow::Result<()> {
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
    Ok(())
}

/// `r`, `lora_alpha` and `use_rslora` of an adapter config.
fn rank_and_alpha(json: &serde_json::Value) -> anyhow::Result<(usize, f64, bool)> {
    let rank = json["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .context("adapter_config.json has no positive `r`")? as usize;
    let alpha = json["lora_alpha"]
        .as_f64()
        .context("adapter_config.json has no `lora_alpha`")?;
    Ok((rank, alpha, json["use_rslora"].as_bool().unwrap_or(false)))
}

/// The LoRA settings of a PEFT adapter folder.
pub fn read_adapter_config(dir: &Path) -> anyhow::Result<LoraOptions> {
    let (path, json) = adapter_config_json(dir)?;
    check_lora_math(&path, &json)?;
    let field = |key: &str| &json[key];
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
    let (rank, alpha, use_rslora) = rank_and_alpha(&json)?;
    Ok(LoraOptions {
        rank,
        alpha,
        use_rslora,
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
    options: ModelOptions,
) -> anyhow::Result<Model> {
    let base = WeightSource::Files(vec![MappedWeights::open_model_dir(base_dir)?]);
    adapter_over(base_dir, base, adapter_dir, options)
}

/// The adapter in `adapter_dir` over the model `base_dir`'s config.json describes, its weights
/// from `base` (the folder's files, or the seeded random base a weightless demo folder stands for).
pub fn adapter_over(
    base_dir: &Path,
    base: WeightSource,
    adapter_dir: &Path,
    mut options: ModelOptions,
) -> anyhow::Result<Model> {
    let init_seed = options.lora.as_ref().map_or(0, |l| l.init_seed);
    options.lora = Some(LoraOptions {
        init_seed,
        ..read_adapter_config(adapter_dir)?
    });
    let config = ModelConfig::from_model_dir(base_dir)?;
    let weights = adapter_dir.join("adapter_model.safetensors");
    let adapter = MappedWeights::open(&[weights], adapter_dir)?;
    Ok(Model::build_with_adapter(
        config,
        base,
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

/// Where one tensor of a merged model comes from.
enum MergedTensor {
    /// The base's tensor, unchanged but for the dtype.
    Base,
    /// `W + scaling · B·A`, with A and B under these adapter keys.
    Lora { a: String, b: String },
    /// The adapter's own copy (PEFT's `modules_to_save`, trained biases), under this key.
    Replaced(String),
}

/// An adapter merged into its base, checked against both files' headers and computed one tensor
/// at a time when written: `W' = W + scaling · B·A` in f32 for every adapted linear (scaling
/// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA), the adapter's other tensors in
/// place of the base's of the same name, everything else as in the base, all stored in `dtype`.
///
/// The base is read as it lies on disk and never quantized: a QLoRA run's adapter is an
/// ordinary PEFT adapter, so merging it here gives what bitsandbytes users get from PEFT's
/// `merge_and_unload` on the base loaded unquantized (the 4-bit model the adapter trained on
/// differs from it by the quantization error).
pub struct MergedWeights {
    base: MappedWeights,
    adapter: MappedWeights,
    scaling: f64,
    dtype: DType,
    /// Every output tensor in file order, with its size in bytes.
    order: Vec<(String, usize)>,
    sources: HashMap<String, MergedTensor>,
}

/// Plans the merge of the PEFT adapter in `adapter_dir` into the model in `base_dir`, refusing
/// (before any tensor is read) an adapter whose math whet does not do, a quantized base, an
/// adapter key that matches no base tensor and a shape that does not fit.
pub fn merge_adapter(base_dir: &Path, adapter_dir: &Path) -> anyhow::Result<MergedWeights> {
    let (config_path, json) = adapter_config_json(adapter_dir)?;
    check_lora_math(&config_path, &json)?;
    let (rank, alpha, use_rslora) = rank_and_alpha(&json)?;
    let scaling = lora_scaling(rank, alpha, use_rslora);

    let base_config_path = base_dir.join("config.json");
    let base_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&base_config_path)
            .with_context(|| format!("cannot read {}", base_config_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", base_config_path.display()))?;
    if !base_config["quantization_config"].is_null() {
        bail!(
            "the base model {} is quantized (its config.json has quantization_config); merge onto the unquantized base the adapter was trained on (a QLoRA run's --model)",
            base_dir.display()
        );
    }
    let config = ModelConfig::from_model_dir(base_dir)
        .with_context(|| format!("reading {}", base_config_path.display()))?;
    let base = MappedWeights::open_model_dir(base_dir)?;
    let weights = adapter_dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        bail!(
            "{} has no adapter_model.safetensors (whet reads PEFT's safetensors adapters, not adapter_model.bin)",
            adapter_dir.display()
        );
    }
    let adapter = MappedWeights::open(&[weights], adapter_dir)?;

    let mut stored = None;
    for name in base.names() {
        match base.describe(name)?.1 {
            Some(dtype) if dtype.is_float() => stored = stored.or(Some(dtype)),
            _ => bail!(
                "the base model {} stores `{name}` as a non-float tensor; is it quantized? Merge onto the unquantized base",
                base_dir.display()
            ),
        }
    }
    let dtype = config.torch_dtype.or(stored).unwrap_or(DType::F32);

    // Every adapter key is half of a LoRA pair on a base linear, or a whole base tensor.
    let mut sources: HashMap<String, MergedTensor> = HashMap::new();
    let mut unknown = Vec::new();
    for key in adapter.names() {
        let Some(name) = key.strip_prefix("base_model.model.") else {
            unknown.push(key.clone());
            continue;
        };
        // PEFT saves a trained bias of an adapted linear under the wrapped name.
        let unwrapped = name.replace(".base_layer.", ".");
        let name = unwrapped.as_str();
        if let Some(module) = name.strip_suffix(".lora_A.weight") {
            sources.insert(
                format!("{module}.weight"),
                MergedTensor::Lora {
                    a: key.clone(),
                    b: peft_key(&format!("{module}.lora_B.weight")),
                },
            );
        } else if let Some(module) = name.strip_suffix(".lora_B.weight") {
            if !adapter.contains(&peft_key(&format!("{module}.lora_A.weight"))) {
                bail!("{key} has no lora_A beside it in the adapter");
            }
        } else if name.contains(".lora_") || !base.contains(name) {
            unknown.push(key.clone());
        } else {
            sources.insert(name.to_string(), MergedTensor::Replaced(key.clone()));
        }
    }
    if !unknown.is_empty() {
        bail!(
            "the adapter has tensors whet cannot merge into {}: {} (LoRA pairs `base_model.model.<linear>.lora_A/lora_B.weight` and whole base tensors `base_model.model.<name>` are merged; is it the adapter of this base?)",
            base_dir.display(),
            unknown.join(", ")
        );
    }
    let shape_of = |set: &MappedWeights, name: &str| -> anyhow::Result<Vec<usize>> {
        Ok(set.describe(name)?.0)
    };
    for (name, source) in &sources {
        if !base.contains(name) {
            bail!(
                "the adapter adapts `{name}`, which the base model {} does not have; is it the adapter of this base?",
                base_dir.display()
            );
        }
        let weight = shape_of(&base, name)?;
        match source {
            MergedTensor::Lora { a, b } => {
                if !adapter.contains(b) {
                    bail!("{a} has no lora_B beside it in the adapter");
                }
                let (a_shape, b_shape) = (shape_of(&adapter, a)?, shape_of(&adapter, b)?);
                let fits = weight.len() == 2
                    && a_shape == [rank, weight[1]]
                    && b_shape == [weight[0], rank];
                if !fits {
                    bail!(
                        "shape mismatch merging `{name}` {weight:?}: lora_A is {a_shape:?} and lora_B {b_shape:?}, expected [{rank}, in] and [out, {rank}] (r = {rank} in adapter_config.json)"
                    );
                }
            }
            MergedTensor::Replaced(key) => {
                let replacement = shape_of(&adapter, key)?;
                if replacement != weight {
                    bail!(
                        "shape mismatch: the adapter's `{key}` is {replacement:?}, the base's `{name}` {weight:?}"
                    );
                }
            }
            MergedTensor::Base => {}
        }
    }

    let mut names: Vec<&String> = base.names().iter().collect();
    names.sort_by(|a, b| natural_order(a, b));
    let order = names
        .into_iter()
        .map(|name| {
            let elements: usize = shape_of(&base, name)?.iter().product();
            Ok((name.clone(), elements * dtype.size_in_bytes()))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(MergedWeights {
        base,
        adapter,
        scaling,
        dtype,
        order,
        sources,
    })
}

impl MergedWeights {
    /// The dtype every merged tensor is stored in: the base's torch_dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Linear layers the adapter's LoRA pairs are folded into.
    pub fn num_adapted(&self) -> usize {
        let lora = |s: &&MergedTensor| matches!(s, MergedTensor::Lora { .. });
        self.sources.values().filter(lora).count()
    }

    /// Base tensors the adapter replaces with its own (modules_to_save, biases).
    pub fn num_replaced(&self) -> usize {
        self.sources.len() - self.num_adapted()
    }

    /// The names of the merged model's tensors, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|(name, _)| name.as_str())
    }

    /// The merged tensor `name` on the CPU, in [`Self::dtype`].
    pub fn tensor(&self, name: &str) -> Result<Tensor, TensorFileError> {
        let device = &Device::Cpu;
        let tensor = match self.sources.get(name).unwrap_or(&MergedTensor::Base) {
            MergedTensor::Base => self.base.load(name, device)?,
            MergedTensor::Replaced(key) => self.adapter.load(key, device)?,
            MergedTensor::Lora { a, b } => {
                // (out, r) x (r, in) -> (out, in), all in f32.
                let f32 = |t: Tensor| t.to_dtype(DType::F32);
                let delta = f32(self.adapter.load(b, device)?)?
                    .matmul(&f32(self.adapter.load(a, device)?)?)?;
                (f32(self.base.load(name, device)?)? + (delta * self.scaling)?)?
            }
        };
        Ok(tensor.to_dtype(self.dtype)?)
    }

    /// Writes the merged weights into `dir` as `save_pretrained` does (sharded past
    /// `max_shard_bytes`, with an index), one shard's tensors in memory at a time.
    pub fn write(&self, dir: &Path, max_shard_bytes: usize) -> anyhow::Result<Vec<PathBuf>> {
        Ok(tensor_files::write_model_weights_with(
            dir,
            self.order.clone(),
            max_shard_bytes,
            |name| self.tensor(name),
        )?)
    }
}

/// Names ordered with their numbers compared as numbers (`layers.2` before `layers.10`), so
/// each decoder layer's tensors stay together in the shards.
fn natural_order(a: &str, b: &str) -> Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for ((da, sa), (db, sb)) in ra.iter().zip(&rb) {
        let order = if *da && *db {
            sa.len().cmp(&sb.len()).then(sa.cmp(sb))
        } else {
            sa.cmp(sb)
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    ra.len().cmp(&rb.len())
}
