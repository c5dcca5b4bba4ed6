//! Derived figures: what ms-swift and transformers' Trainer will compute from a config — world
//! size, effective batch, the auto values, steps, warm-up, evaluations and saves — plus memory
//! per GPU and disk. Step arithmetic follows transformers 5.x exactly:
//!
//! * each rank sees ceil(rows / world) rows (a distributed sampler pads by repeating) in
//!   ceil(that / per_device_batch) batches — equal to ceil(rows / (batch · world));
//! * `set_initial_training_values`: updates per epoch = ceil(batches / accumulation), at least 1;
//!   total = max_steps if > 0, else ceil(num_train_epochs · updates per epoch);
//! * warm-up = warmup_steps if > 0, else ceil(total · warmup_ratio);
//! * ms-swift saves (and evaluates) once more at the last step when it is not a multiple of the
//!   interval.

use serde::Serialize;

use crate::config::{IntervalStrategy, JobConfig, TunerType, ZeroSettings};
use crate::dataset_spec::DatasetSpec;
use crate::diagnostics::{closest_word, shorten, Diagnostic};
use crate::events::{self, EventPlan};
use crate::gpus::{self, Gpu};
use crate::memory::{self, MemoryEstimate, Sharding};
use crate::models::{self, ModelFacts};

/// What `check` knows besides the config.
#[derive(Debug, Clone)]
pub struct CheckContext {
    /// Facts of the model; `None` looks the model up in the built-in catalog.
    pub model_facts: Option<ModelFacts>,
    /// Rows in the training data, when known (else from `#N` specs).
    pub dataset_rows: Option<u64>,
    /// The GPU to judge memory against.
    pub gpu: &'static Gpu,
}

impl Default for CheckContext {
    fn default() -> Self {
        CheckContext {
            model_facts: None,
            dataset_rows: None,
            gpu: gpus::default_gpu(),
        }
    }
}

impl CheckContext {
    /// What a caller with a disk can add: the config.json of a local model folder and the row
    /// count of local `.jsonl` datasets. `read_file` returns a file's text, or `None`.
    /// (`whet check` and the server both call this, so they report the same figures.)
    pub fn gather(config: &JobConfig, read_file: &dyn Fn(&str) -> Option<String>) -> CheckContext {
        let mut context = CheckContext::default();
        if let Some(model) = &config.sft.model {
            let config_json = format!("{}/config.json", model.trim_end_matches('/'));
            if let Some(text) = read_file(&config_json) {
                context.model_facts = ModelFacts::from_config_json(model, &text).ok();
            }
        }
        context.dataset_rows = local_rows(&config.sft.dataset, read_file);
        context
    }

    pub fn facts_for(&self, config: &JobConfig) -> Option<ModelFacts> {
        self.model_facts
            .clone()
            .or_else(|| config.sft.model.as_deref().and_then(models::lookup))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSummary {
    pub id: &'static str,
    pub name: &'static str,
    pub memory_gib: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Derived {
    pub world_size: u64,
    pub effective_batch_size: u64,
    pub gradient_accumulation_steps: u64,
    pub learning_rate: f64,
    pub eval_strategy: &'static str,
    pub eval_steps: Option<u64>,
    pub save_strategy: &'static str,
    pub model_type: Option<String>,
    pub template: Option<String>,
    pub output_dir: String,
    pub dataloader_num_workers: i64,
    pub train_rows: Option<u64>,
    pub val_rows: Option<u64>,
    pub steps_per_epoch: Option<u64>,
    pub total_steps: Option<u64>,
    pub warmup_steps: Option<u64>,
    /// Train log lines in logging.jsonl (eval lines and the end-of-train lines aside).
    pub num_logs: Option<u64>,
    pub num_evals: Option<u64>,
    pub num_saves: Option<u64>,
    pub memory: Option<MemoryEstimate>,
    pub checkpoint_gib: Option<f64>,
    pub checkpoint_weights_gib: Option<f64>,
    pub checkpoint_optimizer_gib: Option<f64>,
    pub disk_gib: Option<f64>,
    pub gpu: GpuSummary,
}

/// Data-parallel ranks: processes per node times nodes.
pub fn world_size(config: &JobConfig) -> u64 {
    let per_node = config.launch.nproc_per_node.unwrap_or(1).max(1) as u64;
    per_node * config.launch.nnodes.max(1) as u64
}

/// ms-swift's automatic accumulation: enough to reach a total batch of 16.
pub fn gradient_accumulation_steps(config: &JobConfig) -> u64 {
    match config.sft.gradient_accumulation_steps {
        Some(n) if n > 0 => n as u64,
        _ => {
            let batch = config.sft.per_device_train_batch_size.max(1) as f64;
            (16.0 / batch / world_size(config) as f64).ceil().max(1.0) as u64
        }
    }
}

pub fn learning_rate(config: &JobConfig) -> f64 {
    config
        .sft
        .learning_rate
        .unwrap_or(if config.sft.tuner_type == TunerType::Full {
            1e-5
        } else {
            1e-4
        })
}

/// Whether any validation data exists (ms-swift turns evaluation off silently when not).
pub fn has_validation_source(config: &JobConfig) -> bool {
    !config.sft.val_dataset.is_empty() || config.sft.split_dataset_ratio > 0.0
}

/// `eval_strategy` after ms-swift's rules: unset follows save_strategy; no data forces `no`.
pub fn eval_strategy(config: &JobConfig) -> IntervalStrategy {
    let requested = config.sft.eval_strategy.unwrap_or(config.sft.save_strategy);
    if has_validation_source(config) {
        requested
    } else {
        IntervalStrategy::No
    }
}

/// `output/<last part of the model id>` when output_dir is unset.
pub fn output_dir(config: &JobConfig) -> String {
    match &config.sft.output_dir {
        Some(dir) => dir.clone(),
        None => {
            let model = config.sft.model.as_deref().unwrap_or("model");
            let suffix = model
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(model);
            format!("output/{suffix}")
        }
    }
}

/// Rows split_dataset_ratio holds out of `rows` (the engine splits exactly this many): at least
/// one, at most all.
pub fn split_val_rows(rows: u64, ratio: f64) -> u64 {
    ((rows as f64 * ratio) as u64).max(1).min(rows)
}

/// The eval record's keys whet computes, any of which may pick the best checkpoint.
pub const BEST_METRICS: &[&str] = &["eval_loss", "eval_token_acc", "eval_exact_match"];

/// The metric that picks the best checkpoint, as transformers resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BestMetric {
    /// A key of the eval record: one of [`BEST_METRICS`].
    pub key: &'static str,
    pub greater_is_better: bool,
}

impl BestMetric {
    /// The name trainer_state.json and args.json carry (`loss`, not `eval_loss`).
    pub fn name(&self) -> &'static str {
        self.key.trim_start_matches("eval_")
    }
}

/// `metric_for_best_model` (default `loss`, with or without the `eval_` prefix) and
/// `greater_is_better` (default: true unless the name has "loss"), or the diagnostic naming the
/// closest metric whet computes. The studio, `whet check` and `whet sft` all judge it here.
pub fn best_metric(config: &JobConfig) -> Result<BestMetric, Diagnostic> {
    let requested = config
        .sft
        .metric_for_best_model
        .as_deref()
        .unwrap_or("loss");
    let prefixed = if requested.starts_with("eval_") {
        requested.to_string()
    } else {
        format!("eval_{requested}")
    };
    let Some(key) = BEST_METRICS.iter().copied().find(|k| *k == prefixed) else {
        let names = BEST_METRICS.iter().map(|k| k.trim_start_matches("eval_"));
        let hint = closest_word(requested, names.clone().chain(BEST_METRICS.iter().copied()))
            .unwrap_or("loss");
        let hint = hint.trim_start_matches("eval_");
        let all = names.collect::<Vec<_>>().join(", ");
        let shown = shorten(requested);
        return Err(Diagnostic::error(
            "metric_for_best_model",
            "best_metric_unknown",
            format!("metric_for_best_model `{shown}` is not a metric whet computes ({all})"),
            format!("metric_for_best_model `{shown}` 不是 whet 计算的指标（{all}）"),
        )
        .with_fix(
            format!("set --metric_for_best_model {hint}"),
            format!("设置 --metric_for_best_model {hint}"),
        ));
    };
    Ok(BestMetric {
        key,
        greater_is_better: config
            .sft
            .greater_is_better
            .unwrap_or(!key.contains("loss")),
    })
}

/// Rows of the training data when every spec is a local `.jsonl` file or has `#N`.
fn local_rows(specs: &[String], read_file: &dyn Fn(&str) -> Option<String>) -> Option<u64> {
    if specs.is_empty() {
        return None;
    }
    let mut total = 0;
    for spec in specs {
        let spec = DatasetSpec::parse(spec, "dataset").ok()?;
        if let Some(n) = spec.sample {
            total += n;
        } else if spec.is_local && spec.id.ends_with(".jsonl") {
            let text = read_file(&spec.id)?;
            total += text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        } else {
            return None;
        }
    }
    Some(total)
}

/// The sum of `#N` over specs when every spec has one.
fn rows_from_specs(specs: &[String], field: &str) -> Option<u64> {
    if specs.is_empty() {
        return None;
    }
    specs
        .iter()
        .map(|s| {
            DatasetSpec::parse(s, field)
                .ok()
                .and_then(|spec| spec.sample)
        })
        .sum()
}

pub fn derive(
    config: &JobConfig,
    facts: Option<&ModelFacts>,
    dataset_rows: Option<u64>,
    gpu: &'static Gpu,
) -> Derived {
    let sft = &config.sft;
    let world = world_size(config);
    let accumulation = gradient_accumulation_steps(config);
    let batch = sft.per_device_train_batch_size.max(1) as u64;
    let eval = eval_strategy(config);

    // --- rows
    let rows = dataset_rows.or_else(|| rows_from_specs(&sft.dataset, "dataset"));
    let (train_rows, val_rows) = match rows {
        Some(n) if sft.val_dataset.is_empty() && sft.split_dataset_ratio > 0.0 => {
            let val = split_val_rows(n, sft.split_dataset_ratio);
            (Some(n - val), Some(val))
        }
        Some(n) => (Some(n), rows_from_specs(&sft.val_dataset, "val_dataset")),
        None => (None, rows_from_specs(&sft.val_dataset, "val_dataset")),
    };

    // --- steps (transformers' arithmetic)
    let (steps_per_epoch, total_steps) = match (train_rows, sft.max_steps > 0) {
        (_, true) => {
            let per_epoch = train_rows.map(|rows| {
                let batches = rows.div_ceil(batch * world);
                batches.div_ceil(accumulation).max(1)
            });
            (per_epoch, Some(sft.max_steps as u64))
        }
        (Some(rows), false) if !sft.streaming => {
            let batches_per_rank = rows.div_ceil(batch * world);
            let per_epoch = batches_per_rank.div_ceil(accumulation).max(1);
            let total = (sft.num_train_epochs.max(0.0) * per_epoch as f64).ceil() as u64;
            (Some(per_epoch), Some(total))
        }
        _ => (None, None),
    };
    let warmup_steps = total_steps.map(|total| {
        if sft.warmup_steps > 0 {
            sft.warmup_steps as u64
        } else {
            (total as f64 * sft.warmup_ratio.max(0.0)).ceil() as u64
        }
    });
    let per_epoch = steps_per_epoch.unwrap_or(total_steps.unwrap_or(1));
    let events = total_steps.map(|t| EventPlan::new(config, per_epoch, t).counts());
    let num_logs = events.map(|e| e.logs);
    let num_evals = events.map(|e| e.evals);
    let num_saves = events.map(|e| e.saves);

    // --- memory and disk
    let zero = sft.zero().unwrap_or_else(ZeroSettings::none);
    let memory = facts.map(|f| {
        memory::estimate(
            sft,
            f,
            Sharding {
                world_size: world,
                zero,
            },
        )
    });
    let checkpoint = facts.map(|f| memory::checkpoint_size(sft, f));
    let kept = num_saves.map(|saves| match sft.save_total_limit {
        Some(limit) if limit >= 1 => saves.min(limit as u64),
        _ => saves,
    });
    let disk_gib = match (&checkpoint, kept) {
        (Some(c), Some(kept)) => Some(c.total_gib * kept as f64),
        _ => None,
    };

    Derived {
        world_size: world,
        effective_batch_size: batch * world * accumulation,
        gradient_accumulation_steps: accumulation,
        learning_rate: learning_rate(config),
        eval_strategy: eval.as_str(),
        eval_steps: (eval == IntervalStrategy::Steps)
            .then_some(events::eval_steps(config).max(0) as u64),
        save_strategy: sft.save_strategy.as_str(),
        model_type: sft
            .model_type
            .clone()
            .or_else(|| facts.map(|f| f.model_type.clone())),
        template: sft
            .template
            .clone()
            .or_else(|| facts.map(|f| f.template.clone())),
        output_dir: output_dir(config),
        dataloader_num_workers: sft.dataloader_num_workers.unwrap_or(1),
        train_rows,
        val_rows,
        steps_per_epoch,
        total_steps,
        warmup_steps,
        num_logs,
        num_evals,
        num_saves,
        memory,
        checkpoint_gib: checkpoint.as_ref().map(|c| c.total_gib),
        checkpoint_weights_gib: checkpoint.as_ref().map(|c| c.weights_gib),
        checkpoint_optimizer_gib: checkpoint.as_ref().map(|c| c.optimizer_gib),
        disk_gib,
        gpu: GpuSummary {
            id: gpu.id,
            name: gpu.name,
            memory_gib: gpu.memory_gib,
        },
    }
}
