//! The config schema: `JobConfig = {launch: LaunchConfig, sft: SftConfig}`.
//!
//! Field names are exactly ms-swift's flag names so that a JSON/YAML/TOML file, a shell command
//! and the studio's form are the same thing. Defaults are ms-swift 4.x's. Values that ms-swift
//! resolves automatically ("auto") are `None` here; `derive` says what they resolve to.
//! Counts are `i64` and rates `f64` on purpose: a negative batch size must reach `validate`
//! and come back as a diagnostic naming the field, not as a type error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole job: how it is launched and what it trains.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    pub launch: LaunchConfig,
    pub sft: SftConfig,
}

/// The launcher: devices and the torchrun rendezvous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LaunchConfig {
    /// `CUDA_VISIBLE_DEVICES`; `None` = every device, `Some("")` = CPU only.
    pub cuda_visible_devices: Option<String>,
    /// Processes per node; `None` = one process (ms-swift then spreads a model over all visible GPUs).
    pub nproc_per_node: Option<i64>,
    pub nnodes: i64,
    pub node_rank: i64,
    pub master_addr: String,
    pub master_port: i64,
    /// Other environment variables the script sets (kept so an exported script runs the same).
    pub env: BTreeMap<String, String>,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig {
            cuda_visible_devices: None,
            nproc_per_node: None,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            env: BTreeMap::new(),
        }
    }
}

/// `--tuner_type` (ms-swift 4.x) a.k.a. `--train_type` (3.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunerType {
    Full,
    Lora,
    /// Shorthand for `lora` with a 4-bit NF4 base; `JobConfig::normalize` rewrites it.
    Qlora,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TorchDtype {
    Float32,
    Float16,
    Bfloat16,
}

impl TorchDtype {
    pub fn bytes(self) -> f64 {
        match self {
            TorchDtype::Float32 => 4.0,
            TorchDtype::Float16 | TorchDtype::Bfloat16 => 2.0,
        }
    }
    /// The name transformers writes (`torch_dtype`/`dtype` in config.json, ms-swift's flag).
    pub const fn as_str(self) -> &'static str {
        match self {
            TorchDtype::Float32 => "float32",
            TorchDtype::Float16 => "float16",
            TorchDtype::Bfloat16 => "bfloat16",
        }
    }

    /// Reads a dtype name as transformers and ms-swift spell it (also `bf16`, `fp16`, `half`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "fp32" => Some(TorchDtype::Float32),
            "float16" | "fp16" | "half" => Some(TorchDtype::Float16),
            "bfloat16" | "bf16" => Some(TorchDtype::Bfloat16),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    Cosine,
    Linear,
    Constant,
    ConstantWithWarmup,
    CosineWithMinLr,
}

impl LrSchedulerType {
    /// transformers' name of the schedule (`--lr_scheduler_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            LrSchedulerType::Cosine => "cosine",
            LrSchedulerType::Linear => "linear",
            LrSchedulerType::Constant => "constant",
            LrSchedulerType::ConstantWithWarmup => "constant_with_warmup",
            LrSchedulerType::CosineWithMinLr => "cosine_with_min_lr",
        }
    }
}

/// `eval_strategy` / `save_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    No,
    Steps,
    Epoch,
}

impl IntervalStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            IntervalStrategy::No => "no",
            IntervalStrategy::Steps => "steps",
            IntervalStrategy::Epoch => "epoch",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TruncationStrategy {
    Delete,
    Left,
    Right,
}

/// Every `swift sft` parameter whet understands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    // --- model
    pub model: Option<String>,
    pub model_type: Option<String>,
    pub model_revision: Option<String>,
    pub torch_dtype: Option<TorchDtype>,
    pub attn_impl: Option<String>,
    pub use_hf: bool,
    // --- tuner
    #[serde(alias = "train_type")]
    pub tuner_type: TunerType,
    pub adapters: Vec<String>,
    pub lora_rank: i64,
    pub lora_alpha: i64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    /// A regular expression over full module names; when set it replaces `target_modules`.
    pub target_regex: Option<String>,
    /// rsLoRA: scale the update by `alpha / sqrt(rank)` instead of `alpha / rank`.
    pub use_rslora: bool,
    /// Which biases train alongside the adapters: none or all (PEFT's `bias`).
    pub lora_bias: String,
    /// Modules trained in full next to the adapters (`lm_head`, `embed_tokens`, ...).
    pub modules_to_save: Vec<String>,
    pub quant_method: Option<String>,
    pub quant_bits: Option<i64>,
    pub bnb_4bit_quant_type: String,
    pub bnb_4bit_use_double_quant: bool,
    pub bnb_4bit_compute_dtype: Option<TorchDtype>,
    // --- data
    pub dataset: Vec<String>,
    pub val_dataset: Vec<String>,
    pub split_dataset_ratio: f64,
    pub data_seed: i64,
    pub dataset_shuffle: bool,
    pub max_length: Option<i64>,
    pub truncation_strategy: TruncationStrategy,
    pub system: Option<String>,
    pub template: Option<String>,
    pub loss_scale: String,
    pub disable_ignore_empty_think: bool,
    pub packing: bool,
    pub streaming: bool,
    pub strict: bool,
    pub dataset_num_proc: i64,
    pub model_name: Vec<String>,
    pub model_author: Vec<String>,
    // --- training
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub per_device_train_batch_size: i64,
    pub per_device_eval_batch_size: i64,
    pub gradient_accumulation_steps: Option<i64>,
    pub learning_rate: Option<f64>,
    pub lr_scheduler_type: LrSchedulerType,
    pub lr_scheduler_kwargs: Option<String>,
    pub warmup_ratio: f64,
    pub warmup_steps: i64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub seed: i64,
    pub gradient_checkpointing: bool,
    pub router_aux_loss_coef: f64,
    // --- eval / save / log
    pub eval_strategy: Option<IntervalStrategy>,
    pub eval_steps: Option<i64>,
    pub save_strategy: IntervalStrategy,
    pub save_steps: i64,
    pub save_total_limit: Option<i64>,
    pub save_only_model: bool,
    pub logging_steps: i64,
    pub output_dir: Option<String>,
    pub add_version: bool,
    pub report_to: Vec<String>,
    pub metric_for_best_model: Option<String>,
    pub greater_is_better: Option<bool>,
    pub load_best_model_at_end: bool,
    pub resume_from_checkpoint: Option<String>,
    pub resume_only_model: bool,
    // --- runtime
    pub dataloader_num_workers: Option<i64>,
    pub deepspeed: Option<String>,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            model: None,
            model_type: None,
            model_revision: None,
            torch_dtype: None,
            attn_impl: None,
            use_hf: false,
            tuner_type: TunerType::Lora,
            adapters: Vec::new(),
            lora_rank: 8,
            lora_alpha: 32,
            lora_dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            target_regex: None,
            use_rslora: false,
            lora_bias: "none".into(),
            modules_to_save: Vec::new(),
            quant_method: None,
            quant_bits: None,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: None,
            dataset: Vec::new(),
            val_dataset: Vec::new(),
            split_dataset_ratio: 0.0,
            data_seed: 42,
            dataset_shuffle: true,
            max_length: None,
            truncation_strategy: TruncationStrategy::Delete,
            system: None,
            template: None,
            loss_scale: "default".into(),
            disable_ignore_empty_think: false,
            packing: false,
            streaming: false,
            strict: false,
            dataset_num_proc: 1,
            model_name: Vec::new(),
            model_author: Vec::new(),
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 1,
            per_device_eval_batch_size: 1,
            gradient_accumulation_steps: None,
            learning_rate: None,
            lr_scheduler_type: LrSchedulerType::Cosine,
            lr_scheduler_kwargs: None,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.1,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            gradient_checkpointing: true,
            router_aux_loss_coef: 0.0,
            eval_strategy: None,
            eval_steps: None,
            save_strategy: IntervalStrategy::Steps,
            save_steps: 500,
            save_total_limit: None,
            save_only_model: false,
            logging_steps: 5,
            output_dir: None,
            add_version: true,
            report_to: vec!["tensorboard".into()],
            metric_for_best_model: None,
            greater_is_better: None,
            load_best_model_at_end: false,
            resume_from_checkpoint: None,
            resume_only_model: false,
            dataloader_num_workers: None,
            deepspeed: None,
        }
    }
}

/// A DeepSpeed ZeRO setting, from a preset name or the `zero_optimization` of a JSON config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ZeroSettings {
    pub stage: u8,
    pub offload_optimizer: bool,
    pub offload_param: bool,
}

/// The presets `--deepspeed` accepts by name (ms-swift's `swift/config/<name>.json`).
pub const DEEPSPEED_PRESETS: &[&str] = &[
    "zero0",
    "zero1",
    "zero2",
    "zero3",
    "zero2_offload",
    "zero3_offload",
];

impl ZeroSettings {
    /// Reads a preset name or an inline JSON config. A path to a JSON file gives `None`
    /// here (whet-shared reads no files); the engine reads it and calls `from_json`.
    pub fn from_preset(name: &str) -> Option<ZeroSettings> {
        let (stage, offload_optimizer, offload_param) = match name {
            "zero0" => (0, false, false),
            "zero1" => (1, false, false),
            "zero2" => (2, false, false),
            "zero3" => (3, false, false),
            "zero2_offload" => (2, true, false),
            "zero3_offload" => (3, true, true),
            _ => return None,
        };
        Some(ZeroSettings {
            stage,
            offload_optimizer,
            offload_param,
        })
    }

    /// Reads `zero_optimization.stage` and the offload devices of a DeepSpeed JSON config.
    pub fn from_json(text: &str) -> Result<ZeroSettings, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let zero = value
            .get("zero_optimization")
            .ok_or("it has no `zero_optimization` section")?;
        let stage = zero
            .get("stage")
            .and_then(|s| s.as_u64())
            .ok_or("`zero_optimization.stage` is missing or not a number")?;
        if stage > 3 {
            return Err(format!(
                "`zero_optimization.stage` is {stage}; it must be 0–3"
            ));
        }
        let offloaded = |key: &str| {
            zero.get(key)
                .and_then(|o| o.get("device"))
                .and_then(|d| d.as_str())
                .is_some_and(|d| d == "cpu" || d == "nvme")
        };
        Ok(ZeroSettings {
            stage: stage as u8,
            offload_optimizer: offloaded("offload_optimizer"),
            offload_param: offloaded("offload_param"),
        })
    }

    pub fn none() -> ZeroSettings {
        ZeroSettings {
            stage: 0,
            offload_optimizer: false,
            offload_param: false,
        }
    }
}

impl SftConfig {
    /// Adapters (LoRA/QLoRA) train a small set of new weights on a frozen base.
    pub fn is_adapter(&self) -> bool {
        self.tuner_type != TunerType::Full
    }

    /// QLoRA: LoRA on a bitsandbytes 4-bit base — `qlora`, or `lora` with `quant_method bnb`
    /// and `quant_bits 4` (what `normalize` makes of `qlora`). quant_bits without quant_method
    /// quantises nothing: ms-swift builds no quantization config then.
    pub fn is_qlora(&self) -> bool {
        let shorthand = self.tuner_type == TunerType::Qlora;
        let method = self.quant_method.as_deref().or(shorthand.then_some("bnb"));
        let bits = self.quant_bits.or(shorthand.then_some(4));
        self.is_adapter() && method == Some("bnb") && bits == Some(4)
    }

    /// The ZeRO settings `--deepspeed` names, when whet-shared can tell without reading a file.
    pub fn zero(&self) -> Option<ZeroSettings> {
        match self.deepspeed.as_deref() {
            None => Some(ZeroSettings::none()),
            Some(text) if text.trim_start().starts_with('{') => ZeroSettings::from_json(text).ok(),
            Some(name) => ZeroSettings::from_preset(name),
        }
    }
}

impl JobConfig {
    /// Rewrites shorthands into ms-swift's canonical form so that equal jobs compare equal:
    /// `qlora` becomes `lora` + `quant_method bnb` + `quant_bits 4` (ms-swift has no `qlora`).
    pub fn normalize(&mut self) {
        if self.sft.tuner_type == TunerType::Qlora {
            self.sft.tuner_type = TunerType::Lora;
            if self.sft.quant_method.is_none() {
                self.sft.quant_method = Some("bnb".into());
            }
            if self.sft.quant_bits.is_none() {
                self.sft.quant_bits = Some(4);
            }
        }
    }

    pub fn normalized(mut self) -> JobConfig {
        self.normalize();
        self
    }
}
