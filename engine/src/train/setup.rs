//! Everything a run needs before its first step: the model folder, dtype and device, the
//! tokenizer and template, the prepared data, the plan, the resume point and the model itself.
//! A job this build cannot do as configured is refused here, before any work.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device};
use serde_json::Value;
use whet_shared::config::{TunerType, ZeroSettings};
use whet_shared::lora::AdapterPlan;
use whet_shared::schedule::{min_lr_rate, Schedule};
use whet_shared::{derive, JobConfig, ModelFacts};

use super::checkpoint::ResumePoint;
use super::data::{self, ChatTokenizer, PreparedData, RenderOptions, Template};
use super::metrics::float;
use super::plan::Plan;
use super::progress::Console;
use crate::hub::ModelFiles;
use crate::model::adapter::read_adapter_config;
use crate::model::{
    Architecture, LoraOptions, Model, ModelConfig, ModelOptions, Trainable, WeightSource,
};
use crate::optim::AdamWConfig;
use crate::quant::{QuantOptions, QuantType};
use crate::sync::ZeroStage;

/// What this version of the loop does not do yet, refused before any work.
fn check_supported(config: &JobConfig) -> anyhow::Result<()> {
    let sft = &config.sft;
    if sft.tuner_type != TunerType::Full && sft.tuner_type != TunerType::Lora {
        bail!(
            "tuner_type {:?} is not implemented in whet sft yet; use --tuner_type full or lora",
            sft.tuner_type
        );
    }
    if sft.tuner_type == TunerType::Full && (sft.quant_method.is_some() || sft.quant_bits.is_some())
    {
        bail!("quant_bits: a quantized base cannot be fully fine-tuned; use --tuner_type lora (QLoRA) with the quantization, or remove --quant_method/--quant_bits");
    }
    if sft.tuner_type == TunerType::Lora {
        quant_options(config)?;
        if sft.lora_rank < 1 || sft.lora_alpha <= 0 {
            bail!("lora_rank must be at least 1 and lora_alpha above 0; set e.g. --lora_rank 8 --lora_alpha 32");
        }
    }
    if sft.tuner_type == TunerType::Full && !sft.adapters.is_empty() {
        bail!("adapters: continuing from an adapter needs --tuner_type lora; to fine-tune the merged model fully, merge it first with `whet export --merge_lora true`");
    }
    if sft.adapters.len() > 1 {
        bail!("adapters: whet continues training from one adapter folder, {} were given; merge the others into the base first with `whet export --merge_lora true`", sft.adapters.len());
    }
    if sft.packing || sft.streaming {
        bail!("packing and streaming are not implemented in whet sft yet; leave them false");
    }
    if !matches!(sft.loss_scale.as_str(), "default" | "ignore_empty_think") {
        bail!(
            "loss_scale `{}` is not implemented in whet sft yet; use default",
            sft.loss_scale
        );
    }
    Ok(())
}

/// How a QLoRA run stores its frozen base (None without quantization). Only bitsandbytes'
/// 4-bit NF4/FP4 is implemented; anything else is refused, naming the field and the fix.
pub fn quant_options(config: &JobConfig) -> anyhow::Result<Option<QuantOptions>> {
    let sft = &config.sft;
    if sft.quant_method.is_none() && sft.quant_bits.is_none() {
        return Ok(None);
    }
    match sft.quant_method.as_deref() {
        Some("bnb") => {}
        Some(other) => bail!(
            "quant_method `{other}` is not implemented in whet sft; use --quant_method bnb (bitsandbytes' 4-bit QLoRA)"
        ),
        None => bail!("quant_bits is set but quant_method is not; add --quant_method bnb"),
    }
    match sft.quant_bits {
        Some(4) => {}
        Some(bits) => bail!(
            "quant_bits {bits} is not implemented in whet sft (only bitsandbytes' 4-bit QLoRA is); use --quant_bits 4"
        ),
        None => bail!("quant_method bnb needs quant_bits; add --quant_bits 4"),
    }
    let quant_type = QuantType::parse(&sft.bnb_4bit_quant_type).ok_or_else(|| {
        anyhow!(
            "bnb_4bit_quant_type `{}` is not nf4 or fp4; use --bnb_4bit_quant_type nf4",
            sft.bnb_4bit_quant_type
        )
    })?;
    Ok(Some(QuantOptions {
        quant_type,
        double_quant: sft.bnb_4bit_use_double_quant,
    }))
}

/// The adapters a LoRA run trains (None for full fine-tuning): those of `--adapters` when it
/// names a PEFT folder (its own rank, alpha, targets and dropout, as PEFT's
/// `from_pretrained(is_trainable=True)` keeps them), else fresh ones from the LoRA flags.
pub fn lora_options(config: &JobConfig) -> anyhow::Result<Option<LoraOptions>> {
    let sft = &config.sft;
    if sft.tuner_type != TunerType::Lora {
        return Ok(None);
    }
    if let Some(dir) = sft.adapters.first() {
        let mut options = read_adapter_config(Path::new(dir))
            .with_context(|| format!("adapters: {dir} cannot be loaded"))?;
        options.init_seed = sft.seed as u64;
        return Ok(Some(options));
    }
    let plan = AdapterPlan::from_config(sft)
        .map_err(|d| anyhow::anyhow!("{}: {} ({})", d.field, d.message_en, d.fix))?;
    Ok(Some(LoraOptions {
        rank: sft.lora_rank.max(1) as usize,
        alpha: sft.lora_alpha as f64,
        use_rslora: sft.use_rslora,
        dropout: sft.lora_dropout,
        plan,
        init_seed: sft.seed as u64,
    }))
}

/// How a job's ranks split the training state: the ZeRO stage and the reduction bucket size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    pub stage: ZeroStage,
    /// Elements per gradient bucket (DeepSpeed's `reduce_bucket_size`); None for its `auto`.
    pub reduce_bucket_size: Option<usize>,
    /// `offload_optimizer`: the optimizer's moments and update in host memory (a GPU job's;
    /// the CPU's are there already).
    pub offload_optimizer: bool,
}

impl Sharding {
    /// The bucket size: DeepSpeed's `auto` (what ms-swift's presets say) is hidden_size², as
    /// the HF integration fills it in.
    pub fn bucket_elems(&self, hidden_size: usize) -> usize {
        self.reduce_bucket_size
            .unwrap_or(hidden_size * hidden_size)
            .max(1)
    }
}

/// The sharding `--deepspeed` asks for (a preset, inline JSON, or a JSON file the engine reads),
/// for a job of `derive::world_size` ranks; one process has nothing to shard. A stage this build
/// cannot do is refused here, before any work.
pub fn sharding(config: &JobConfig) -> anyhow::Result<Sharding> {
    let sft = &config.sft;
    let json = match sft.deepspeed.as_deref() {
        Some(path) if sft.zero().is_none() => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("deepspeed: cannot read the DeepSpeed config {path}"))?,
        ),
        Some(text) if text.trim_start().starts_with('{') => Some(text.to_string()),
        _ => None,
    };
    let zero = match &json {
        Some(text) => ZeroSettings::from_json(text).map_err(|e| anyhow!("deepspeed: {e}"))?,
        None => sft.zero().unwrap_or_else(ZeroSettings::none),
    };
    let reduce_bucket_size = json
        .as_deref()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|v| v["zero_optimization"]["reduce_bucket_size"].as_f64())
        .map(|n| n.max(1.0) as usize);
    let stage = if derive::world_size(config) > 1 {
        ZeroStage::from_settings(&zero)?
    } else {
        ZeroStage::Zero0
    };
    Ok(Sharding {
        stage,
        reduce_bucket_size,
        offload_optimizer: zero.offload_optimizer,
    })
}

/// What turns a config's datasets into samples, as training resolves it: the model's tokenizer,
/// the template and max_length. `whet dataset preview` renders with the same.
pub struct DataSettings {
    pub model_id: String,
    pub model_dir: PathBuf,
    pub model_config: ModelConfig,
    pub template_name: String,
    pub tokenizer: ChatTokenizer,
    pub max_length: usize,
    pub render: RenderOptions,
}

impl DataSettings {
    /// `files`: a hub model's weights are fetched only when the caller loads the model.
    pub fn resolve(config: &JobConfig, files: ModelFiles) -> anyhow::Result<Self> {
        let sft = &config.sft;
        let model_id = sft.model.clone().context(
            "--model is required: a local model folder or a hub id such as Qwen/Qwen3-0.6B",
        )?;
        let model_dir = crate::hub::resolve_model_dir(&model_id, sft, files)?;
        let model_config = ModelConfig::from_model_dir(&model_dir)?;
        let config_text = std::fs::read_to_string(model_dir.join("config.json"))?;
        let facts = ModelFacts::from_config_json(&model_id, &config_text).ok();
        let template_name = sft
            .template
            .clone()
            .or_else(|| facts.as_ref().map(|f| f.template.clone()))
            .unwrap_or_else(|| "qwen3".into());
        let tokenizer = ChatTokenizer::from_model_dir(&model_dir)?;
        let max_length = sft
            .max_length
            .map_or(model_config.max_position_embeddings, |m| m.max(1) as usize);
        let render = RenderOptions {
            template: Template::parse(&template_name)?,
            default_system: sft.system.clone(),
            disable_ignore_empty_think: sft.disable_ignore_empty_think,
        };
        Ok(Self {
            model_id,
            model_dir,
            model_config,
            template_name,
            tokenizer,
            max_length,
            render,
        })
    }
}

pub struct Setup {
    pub sharding: Sharding,
    pub model_id: String,
    pub model_dir: PathBuf,
    pub model_config: ModelConfig,
    pub dtype: DType,
    pub device: Device,
    pub template_name: String,
    pub tokenizer: ChatTokenizer,
    pub max_length: usize,
    pub data: PreparedData,
    pub plan: Plan,
    pub resume: Option<ResumePoint>,
    pub model: Model,
}

impl Setup {
    /// `bound` is the device a rank's collective was bound to (the model goes there: one
    /// CUDA context per process); None for one process, which selects its device here.
    pub fn new(
        config: &JobConfig,
        console: &Console,
        bound: Option<Device>,
    ) -> anyhow::Result<Self> {
        let sft = &config.sft;
        check_supported(config)?;
        let sharding = sharding(config)?;
        let device = match bound {
            Some(device) => device,
            None => crate::device::select_device(config)
                .map_err(|d| anyhow::anyhow!("{}: {} ({})", d.field, d.message_en, d.fix))?,
        };

        let DataSettings {
            model_id,
            model_dir,
            model_config,
            template_name,
            tokenizer,
            max_length,
            render,
        } = DataSettings::resolve(config, ModelFiles::All)?;
        let dtype = sft
            .torch_dtype
            .map(crate::dtype::to_candle)
            .or(model_config.torch_dtype)
            .unwrap_or(DType::F32);
        let data = prepare_data(config, &render, &tokenizer, max_length, console)?;
        let plan = Plan::new(config, data.train.len() as u64)?;
        if plan.evaluates() && data.val.is_empty() {
            bail!("evaluation is on but no validation sample is left; check --val_dataset, --split_dataset_ratio and --max_length");
        }

        let resume = sft
            .resume_from_checkpoint
            .as_deref()
            .map(|dir| ResumePoint::read(Path::new(dir)))
            .transpose()?;
        let lora = lora_options(config)?;
        // QLoRA: the 4-bit base dequantizes to bnb_4bit_compute_dtype (else torch_dtype), and
        // the whole model computes in it.
        let quantization = if lora.is_some() {
            quant_options(config)?
        } else {
            None
        };
        let compute_dtype = match (quantization, sft.bnb_4bit_compute_dtype) {
            (Some(_), Some(compute)) => crate::dtype::to_candle(compute),
            _ => dtype,
        };
        let options = ModelOptions {
            device: device.clone(),
            compute_dtype,
            master_dtype: DType::F32,
            // LoRA: the base frozen in the compute dtype, only the adapters trained.
            trainable: if lora.is_some() {
                Trainable::Nothing
            } else {
                Trainable::All
            },
            lora,
            quantization,
        };
        let model = load_model(
            &model_dir,
            resume.as_ref(),
            sft.adapters.first().map(Path::new),
            sft.seed as u64,
            options,
            console,
        )?;
        Ok(Self {
            sharding,
            model_id,
            model_dir,
            model_config,
            dtype,
            device,
            template_name,
            tokenizer,
            max_length,
            data,
            plan,
            resume,
            model,
        })
    }

    /// The schedule the studio plots is the one that runs (whet-shared computes both).
    pub fn schedule(&self, config: &JobConfig) -> Schedule {
        let plan = &self.plan;
        Schedule {
            kind: config.sft.lr_scheduler_type,
            base_lr: plan.learning_rate,
            warmup_steps: plan.warmup_steps,
            total_steps: plan.total_steps,
            min_lr_rate: min_lr_rate(
                config.sft.lr_scheduler_kwargs.as_deref(),
                plan.learning_rate,
            ),
        }
    }

    /// The MoE router aux-loss coefficient (0 for a dense model).
    pub fn router_aux_loss_coef(&self, config: &JobConfig) -> f64 {
        if self.model_config.moe.is_some() {
            config.sft.router_aux_loss_coef
        } else {
            0.0
        }
    }

    /// Parameters outside the embedding table, for transformers' FLOP estimate.
    pub fn non_embedding_params(&self) -> f64 {
        let embedding = self.model_config.vocab_size * self.model_config.hidden_size;
        self.model.num_parameters().saturating_sub(embedding) as f64
    }

    /// ms-swift's `model_parameter_info` line.
    pub fn parameter_info(&self) -> String {
        let architecture = match self.model_config.architecture {
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        };
        let total = self.model.num_parameters() as f64 / 1e6;
        let trainable = self.model.num_trainable_parameters() as f64 / 1e6;
        let share = 100.0 * trainable / total.max(1e-12);
        format!(
            "{architecture}: {total:.4}M Params ({trainable:.4}M Trainable [{share:.4}%]), 0.0000M Buffers."
        )
    }

    /// The run's opening line.
    pub fn describe(&self, run_dir: &Path) -> String {
        let plan = &self.plan;
        format!(
            "Training {} ({:.4}M parameters, {}) on {} samples ({} val): {} steps = {} per epoch, batch {} x accumulation {}, lr {:e}; output {}",
            self.model_id,
            self.model.num_parameters() as f64 / 1e6,
            crate::dtype::torch_name(self.dtype),
            self.data.train.len(),
            self.data.val.len(),
            plan.total_steps,
            plan.steps_per_epoch,
            plan.batch_size,
            plan.accumulation,
            plan.learning_rate,
            run_dir.display()
        )
    }

    /// args.json: the sft fields flat, with the auto values resolved.
    pub fn args_json(&self, config: &JobConfig, run_dir: &Path) -> anyhow::Result<Value> {
        let plan = &self.plan;
        let mut args = serde_json::to_value(&config.sft)?;
        let map = args.as_object_mut().expect("SftConfig is a struct");
        let resolved = [
            ("output_dir", Value::from(run_dir.display().to_string())),
            (
                "logging_dir",
                Value::from(run_dir.join("runs").display().to_string()),
            ),
            (
                "gradient_accumulation_steps",
                Value::from(plan.accumulation),
            ),
            ("learning_rate", float(plan.learning_rate)),
            (
                "eval_strategy",
                Value::from(derive::eval_strategy(config).as_str()),
            ),
            (
                "eval_steps",
                Value::from(whet_shared::events::eval_steps(config).max(1)),
            ),
            ("template", Value::from(self.template_name.as_str())),
            (
                "torch_dtype",
                Value::from(crate::dtype::torch_name(self.dtype)),
            ),
            ("max_length", Value::from(self.max_length)),
            ("metric_for_best_model", Value::from(plan.best.name())),
            (
                "greater_is_better",
                Value::from(plan.best.greater_is_better),
            ),
            ("world_size", Value::from(derive::world_size(config))),
        ];
        for (key, value) in resolved {
            map.insert(key.to_string(), value);
        }
        Ok(args)
    }
}

/// AdamW's hyper-parameters from the config (the learning rate comes with each step).
pub fn adamw_config(config: &JobConfig) -> AdamWConfig {
    let sft = &config.sft;
    AdamWConfig {
        beta1: sft.adam_beta1,
        beta2: sft.adam_beta2,
        eps: sft.adam_epsilon,
        weight_decay: sft.weight_decay,
    }
}

/// Loads, renders and tokenizes the datasets, saying on the console what was dropped.
fn prepare_data(
    config: &JobConfig,
    render_options: &RenderOptions,
    tokenizer: &ChatTokenizer,
    max_length: usize,
    console: &Console,
) -> anyhow::Result<PreparedData> {
    let sft = &config.sft;
    let prepared = data::prepare(sft, tokenizer, render_options, max_length)?;
    if prepared.dropped_rows > 0 {
        console.line(&format!(
            "Dataset rows dropped: {} malformed row(s) (use --strict true to stop at the first one instead)",
            prepared.dropped_rows
        ));
    }
    if let Some(warning) =
        data::think_opener_warning(prepared.think_opener_rows, prepared.train_rows)
    {
        console.line(&warning);
    }
    for (dropped, name, kept) in [
        (prepared.dropped_train, "train", prepared.train.len()),
        (prepared.dropped_val, "val", prepared.val.len()),
    ] {
        if dropped > 0 {
            console.line(&format!(
                "Dataset filtered ({name}): {dropped} sample(s) longer than max_length {max_length} dropped (truncation_strategy delete), {kept} left"
            ));
        }
    }
    if prepared.train.is_empty() {
        bail!("no training samples left; check --dataset and --max_length");
    }
    Ok(prepared)
}

/// The model, from a checkpoint when resuming (its f32 masters when saved), else from the
/// model folder (with `--adapters`' adapter on top). A folder with only config.json stands for
/// a base freshly initialised from `seed` (the demo), the same at every start and resume.
fn load_model(
    model_dir: &Path,
    resume: Option<&ResumePoint>,
    adapter: Option<&Path>,
    seed: u64,
    options: ModelOptions,
    console: &Console,
) -> anyhow::Result<Model> {
    let base = WeightSource::of_model_dir(model_dir, seed)?;
    if let WeightSource::Random { .. } = base {
        console.line(&format!(
            "{} has no weights: initialising the base model at random (seed {seed})",
            model_dir.display()
        ));
    }
    if let Some(resume) = resume {
        return resume.load_model(model_dir, base, options);
    }
    if let Some(adapter) = adapter {
        return crate::model::adapter::adapter_over(model_dir, base, adapter, options);
    }
    let config = ModelConfig::from_model_dir(model_dir)?;
    Ok(Model::build(config, base, options)?)
}
