//! The full fine-tuning recipe behind `whet sft`, readable top to bottom: [`train`] sets up the
//! model, tokenizer, data, optimizer, schedule and outputs, then runs the loop — forward, loss
//! and backward over the accumulated micro-batches, reduce, clip, optimizer step, schedule, log,
//! evaluate, save — in that order, in one place.
//!
//! Two spots are kept single on purpose because multi-GPU training will change them:
//! [`accumulate_gradients`] is where gradients are reduced, and the `optimizer.step` call in
//! [`train`] is where parameters change.
//!
//! Decisions worth knowing:
//! * Loss with accumulation: the cross-entropy of every micro-batch is divided by the number
//!   of label tokens of the WHOLE accumulated batch (counted first), so a step's loss is the token
//!   mean over the window, as transformers computes it with `num_items_in_batch`.
//! * MoE aux loss with accumulation: each micro-batch adds `coef * aux / n_micro`, so a step
//!   differentiates `ce_token_mean + coef * mean(aux over micro-batches)`. With one micro-batch
//!   this is exactly transformers' loss; transformers itself adds the full `coef * aux` of every
//!   micro-batch, which scales the coefficient by the accumulation count — we don't, so the
//!   coefficient means the same whatever gradient_accumulation_steps is.
//! * Randomness: the data order comes from one splitmix64 sampler seeded with data_seed (its
//!   state at the start of the epoch plus the micro-batches consumed are the data position a
//!   checkpoint stores); `seed` only initialises a model folder that has no weights. Nothing
//!   else is random (no dropout), so a resumed run repeats the uninterrupted one bit for bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use serde_json::Value;
use whet_shared::config::{IntervalStrategy, LrSchedulerType, TorchDtype, TunerType};
use whet_shared::schedule::{min_lr_rate, Schedule};
use whet_shared::{derive, JobConfig, ModelFacts};

use super::checkpoint::{
    checkpoint_name, create_run_dir, CheckpointContents, Checkpointer, LogWindow, ResumePoint,
    SchedulerState, TrainerState, TrainingState, TRAINING_STATE_FORMAT,
};
use super::data::{self, ChatTokenizer, RenderOptions, Sample, Sampler, Template};
use super::metrics::{
    float, format_time, history_entry, round8, round_to, JsonlLogger, MetricLogger, Record,
    ScalarSink,
};
use super::progress::Console;
use crate::grad::{self, Batch, Gradients, LossOptions};
use crate::model::{Architecture, Model, ModelConfig, ModelOptions};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub global_step: u64,
    pub last_checkpoint: Option<PathBuf>,
    pub best_checkpoint: Option<PathBuf>,
}

/// Training stopped because the loss or the gradient norm stopped being a number.
#[derive(Debug, thiserror::Error)]
#[error("the {what} is {value} at step {step}, so training stopped there; {last_good}. Lower --learning_rate (or raise --warmup_ratio), check the data for empty or broken rows, or use float32")]
pub struct NonFiniteError {
    pub what: &'static str,
    pub value: f64,
    pub step: u64,
    pub last_good: String,
}

/// The resolved numbers of a run: ms-swift's auto values and transformers' step arithmetic.
#[derive(Debug, Clone)]
pub struct Plan {
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub accumulation: usize,
    pub learning_rate: f64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub logging_steps: u64,
    pub eval_strategy: IntervalStrategy,
    pub eval_steps: u64,
    pub save_strategy: IntervalStrategy,
    pub save_steps: u64,
    /// A key of the eval record (`eval_loss`, `eval_token_acc`).
    pub metric_for_best_model: String,
    pub greater_is_better: bool,
}

// `u64::is_multiple_of` is newer than the workspace's rust-version (1.85).
#[allow(clippy::manual_is_multiple_of)]
impl Plan {
    /// `train_samples` are the training samples left after splitting and max_length.
    pub fn new(config: &JobConfig, train_samples: u64) -> anyhow::Result<Self> {
        let sft = &config.sft;
        // The rows passed in are already split, so derive must not split them again.
        let mut split_done = config.clone();
        split_done.sft.split_dataset_ratio = 0.0;
        let derived = derive::derive(
            &split_done,
            None,
            Some(train_samples),
            whet_shared::gpus::default_gpu(),
        );
        let (Some(steps_per_epoch), Some(total_steps), Some(warmup_steps)) = (
            derived.steps_per_epoch,
            derived.total_steps,
            derived.warmup_steps,
        ) else {
            bail!("cannot work out the number of steps; set --max_steps or --num_train_epochs");
        };
        if total_steps == 0 {
            bail!("this run has 0 optimizer steps; raise --num_train_epochs or --max_steps");
        }
        let metric = sft.metric_for_best_model.as_deref().unwrap_or("loss");
        let metric_for_best_model = if metric.starts_with("eval_") {
            metric.to_string()
        } else {
            format!("eval_{metric}")
        };
        if !matches!(
            metric_for_best_model.as_str(),
            "eval_loss" | "eval_token_acc" | "eval_exact_match"
        ) {
            bail!(
                "metric_for_best_model `{metric}` is not computed by whet; use loss, token_acc or exact_match"
            );
        }
        let greater_is_better = sft
            .greater_is_better
            .unwrap_or(!metric_for_best_model.contains("loss"));
        let eval_strategy = derive::eval_strategy(config);
        Ok(Self {
            batch_size: sft.per_device_train_batch_size.max(1) as usize,
            eval_batch_size: sft.per_device_eval_batch_size.max(1) as usize,
            accumulation: derived.gradient_accumulation_steps as usize,
            learning_rate: derived.learning_rate,
            steps_per_epoch,
            total_steps,
            warmup_steps,
            logging_steps: sft.logging_steps.max(1) as u64,
            eval_strategy,
            eval_steps: sft
                .eval_steps
                .filter(|s| *s > 0)
                .unwrap_or(sft.save_steps)
                .max(1) as u64,
            save_strategy: sft.save_strategy,
            save_steps: sft.save_steps.max(1) as u64,
            metric_for_best_model,
            greater_is_better,
        })
    }

    /// Every logging_steps steps, and the first step (ms-swift's logging_first_step).
    pub fn should_log(&self, step: u64) -> bool {
        step == 1 || step % self.logging_steps == 0
    }

    /// Per strategy, plus the forced one at the last step (ms-swift's DefaultFlowCallbackNew).
    fn due(&self, strategy: IntervalStrategy, every: u64, step: u64, ends_epoch: bool) -> bool {
        match strategy {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => step % every == 0 || step == self.total_steps,
            IntervalStrategy::Epoch => ends_epoch || step == self.total_steps,
        }
    }

    pub fn should_evaluate(&self, step: u64, ends_epoch: bool) -> bool {
        self.due(self.eval_strategy, self.eval_steps, step, ends_epoch)
    }

    pub fn should_save(&self, step: u64, ends_epoch: bool) -> bool {
        self.due(self.save_strategy, self.save_steps, step, ends_epoch)
    }

    /// transformers' `num_train_epochs` in the trainer state: epochs the loop will enter.
    pub fn num_train_epochs(&self) -> u64 {
        self.total_steps.div_ceil(self.steps_per_epoch.max(1))
    }
}

/// What this first version of the loop does not do yet, refused before any work.
fn check_supported(config: &JobConfig) -> anyhow::Result<()> {
    let sft = &config.sft;
    if sft.tuner_type != TunerType::Full {
        bail!(
            "tuner_type {:?} is not implemented in whet sft yet; use --tuner_type full",
            sft.tuner_type
        );
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

fn dtype_of(dtype: TorchDtype) -> DType {
    match dtype {
        TorchDtype::Float32 => DType::F32,
        TorchDtype::Float16 => DType::F16,
        TorchDtype::Bfloat16 => DType::BF16,
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn scheduler_name(kind: LrSchedulerType) -> &'static str {
    match kind {
        LrSchedulerType::Cosine => "cosine",
        LrSchedulerType::Linear => "linear",
        LrSchedulerType::Constant => "constant",
        LrSchedulerType::ConstantWithWarmup => "constant_with_warmup",
        LrSchedulerType::CosineWithMinLr => "cosine_with_min_lr",
    }
}

/// The model, from a checkpoint when resuming (its f32 masters when saved), else from the
/// model folder, else — a folder with only config.json — freshly initialised from `seed`.
fn load_model(
    model_dir: &Path,
    resume: Option<&ResumePoint>,
    seed: u64,
    options: ModelOptions,
    console: &Console,
) -> anyhow::Result<Model> {
    if let Some(resume) = resume {
        return resume.load_model(options);
    }
    let has_weights = model_dir.join("model.safetensors").exists()
        || model_dir.join("model.safetensors.index.json").exists();
    if has_weights {
        return Ok(Model::from_pretrained(model_dir, options)?);
    }
    console.line(&format!(
        "{} has no weights: initialising the model at random (seed {seed})",
        model_dir.display()
    ));
    let config = ModelConfig::from_model_dir(model_dir)?;
    Ok(Model::random(config, seed, options)?)
}

/// The scalar results of one optimizer step's forward passes.
#[derive(Debug, Clone, Copy, Default)]
struct StepLoss {
    loss: f64,
    aux_loss: f64,
    label_tokens: u64,
    correct_tokens: u64,
    input_tokens: u64,
    padded_tokens: u64,
    samples: u64,
}

/// Where gradients are reduced. Forward, loss and backward for each micro-batch of the window,
/// every one divided by the window's label-token count so that the sum is the token mean over
/// the whole accumulated batch; the gradients are summed here. With several ranks this is also
/// where they will be all-reduced (multi-GPU is a later issue).
fn accumulate_gradients(
    model: &Model,
    micro_batches: &[Batch],
    router_aux_loss_coef: f64,
    gradient_checkpointing: bool,
) -> anyhow::Result<(StepLoss, Gradients)> {
    let mut num_label_tokens = 0usize;
    for batch in micro_batches {
        num_label_tokens += count_label_tokens(batch)?;
    }
    let options = LossOptions {
        router_aux_loss_coef: router_aux_loss_coef / micro_batches.len().max(1) as f64,
        num_label_tokens: Some(num_label_tokens),
        gradient_checkpointing,
    };
    let mut step = StepLoss::default();
    let mut total = Gradients::empty(model.parameters());
    for batch in micro_batches {
        let (report, grads) = grad::loss_and_gradients(model, batch, &options)?;
        total.accumulate(&grads)?;
        step.loss += report.loss;
        step.aux_loss += report.aux_loss.unwrap_or(0.0) / micro_batches.len() as f64;
        step.label_tokens += report.num_label_tokens as u64;
        step.correct_tokens += report.num_correct_tokens as u64;
        step.input_tokens += batch
            .attention_mask
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as u64;
        step.padded_tokens += batch.input_ids.elem_count() as u64;
        step.samples += batch.input_ids.dim(0)? as u64;
    }
    Ok((step, total))
}

/// Right-padded batches of one window's micro-batches (sample indices).
fn collate_window(
    micro_batches: &[Vec<usize>],
    samples: &[Sample],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Vec<Batch>> {
    micro_batches
        .iter()
        .map(|rows| {
            let chosen: Vec<&Sample> = rows.iter().map(|&i| &samples[i]).collect();
            data::collate(&chosen, pad_id, device)
        })
        .collect()
}

/// Collates the windows a copy of the sampler will hand out next, on a thread of its own, a few
/// windows ahead of the step. The sampler is deterministic, so the copy yields exactly the
/// windows the loop's own sampler does (checked on every step); the order of batches does not
/// depend on whether or how far ahead this runs.
struct Prefetcher {
    windows: std::sync::mpsc::Receiver<PrefetchedWindow>,
}

/// A window's sample indices and its collated micro-batches.
type PrefetchedWindow = (Vec<Vec<usize>>, candle_core::Result<Vec<Batch>>);

impl Prefetcher {
    fn spawn(
        mut sampler: Sampler,
        samples: std::sync::Arc<Vec<Sample>>,
        accumulation: usize,
        pad_id: u32,
        device: Device,
        windows: u64,
    ) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel(2);
        std::thread::spawn(move || {
            for _ in 0..windows {
                let window = sampler.next_window(accumulation);
                let batches = collate_window(&window.micro_batches, &samples, pad_id, &device);
                if sender.send((window.micro_batches, batches)).is_err() {
                    break; // the run ended early
                }
            }
        });
        Self { windows: receiver }
    }

    /// The collated batches of `expected`, the window the loop's sampler just handed out.
    fn next(&mut self, expected: &[Vec<usize>]) -> anyhow::Result<Vec<Batch>> {
        let (indices, batches) = self
            .windows
            .recv()
            .context("the batch prefetch thread stopped")?;
        if indices != expected {
            bail!("internal error: the prefetched window differs from the sampler's");
        }
        Ok(batches?)
    }
}

fn count_label_tokens(batch: &Batch) -> candle_core::Result<usize> {
    let (_, seq) = batch.labels.dims2()?;
    let shifted = batch.labels.narrow(1, 1, seq.saturating_sub(1))?;
    Ok(shifted
        .ge(0i64)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize)
}

/// eval_loss as transformers averages it (each batch's token-mean loss weighted by its rows)
/// and eval_token_acc over all label tokens.
struct EvalResult {
    loss: f64,
    token_acc: f64,
    /// Share of validation samples whose reply greedy decoding reproduces exactly.
    exact_match: f64,
    runtime: f64,
    samples: usize,
    batches: usize,
}

fn evaluate(
    model: &Model,
    val: &[Sample],
    batch_size: usize,
    pad_id: u32,
    router_aux_loss_coef: f64,
) -> anyhow::Result<EvalResult> {
    let started = Instant::now();
    let options = LossOptions {
        router_aux_loss_coef,
        num_label_tokens: None,
        gradient_checkpointing: false,
    };
    let (mut weighted_loss, mut correct, mut labelled, mut batches) = (0.0, 0u64, 0u64, 0usize);
    let mut exact_rows = 0usize;
    for chunk in val.chunks(batch_size) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let batch = data::collate(&refs, pad_id, &model.options().device)?;
        let report = grad::evaluate(model, &batch, &options)?;
        weighted_loss += report.loss * chunk.len() as f64;
        correct += report.num_correct_tokens as u64;
        labelled += report.num_label_tokens as u64;
        exact_rows += report.num_exact_rows;
        batches += 1;
    }
    Ok(EvalResult {
        loss: weighted_loss / val.len().max(1) as f64,
        token_acc: correct as f64 / labelled.max(1) as f64,
        exact_match: exact_rows as f64 / val.len().max(1) as f64,
        runtime: started.elapsed().as_secs_f64(),
        samples: val.len(),
        batches,
    })
}

/// args.json: the sft fields flat, with the auto values resolved.
fn args_json(
    config: &JobConfig,
    plan: &Plan,
    run_dir: &Path,
    template: &str,
    dtype: DType,
    max_length: usize,
) -> anyhow::Result<Value> {
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
        ("eval_strategy", Value::from(plan.eval_strategy.as_str())),
        ("eval_steps", Value::from(plan.eval_steps)),
        ("template", Value::from(template)),
        ("torch_dtype", Value::from(dtype_name(dtype))),
        ("max_length", Value::from(max_length)),
        (
            "metric_for_best_model",
            Value::from(plan.metric_for_best_model.trim_start_matches("eval_")),
        ),
        ("greater_is_better", Value::from(plan.greater_is_better)),
        ("world_size", Value::from(1)),
    ];
    for (key, value) in resolved {
        map.insert(key.to_string(), value);
    }
    Ok(args)
}

/// Time and progress fields ms-swift appends to every logging.jsonl line (they stay out of
/// trainer_state.json's log_history). `memory(GiB)` is left out on the CPU, as ms-swift omits a
/// zero device memory.
fn swift_fields(step: u64, total: u64, elapsed: f64, steps_this_run: u64) -> Record {
    let speed = elapsed / steps_this_run.max(1) as f64;
    vec![
        (
            "global_step/max_steps".into(),
            Value::from(format!("{step}/{total}")),
        ),
        ("elapsed_time".into(), Value::from(format_time(elapsed))),
        (
            "remaining_time".into(),
            Value::from(format_time(speed * total.saturating_sub(step) as f64)),
        ),
        ("train_speed(s/it)".into(), float(round_to(speed, 6))),
    ]
}

/// Continues from a checkpoint: the trainer state's counters, best metric and log history;
/// then the optimizer moments and the sampler's exact position, or — with resume_only_model —
/// a fresh optimizer and the data already trained on skipped. Returns the open logging window
/// and the running loss sum.
fn restore(
    resume: &ResumePoint,
    resume_only_model: bool,
    accumulation: usize,
    trainer_state: &mut TrainerState,
    optimizer: &mut AdamW,
    sampler: &mut Sampler,
) -> anyhow::Result<(LogWindow, f64)> {
    let saved = &resume.trainer_state;
    trainer_state.global_step = saved.global_step;
    trainer_state.epoch = saved.epoch;
    trainer_state.log_history = saved.log_history.clone();
    trainer_state.best_global_step = saved.best_global_step;
    trainer_state.best_metric = saved.best_metric;
    trainer_state.best_model_checkpoint = saved.best_model_checkpoint.clone();
    trainer_state.num_input_tokens_seen = saved.num_input_tokens_seen;
    trainer_state.total_flos = saved.total_flos;
    if resume_only_model {
        for _ in 0..saved.global_step {
            sampler.next_window(accumulation);
        }
        return Ok((LogWindow::default(), 0.0));
    }
    let Some(state) = &resume.training_state else {
        bail!(
            "{} holds weights only (saved with save_only_model); resume with --resume_only_model true",
            resume.dir.display()
        );
    };
    let Some(optimizer_state) = &resume.optimizer else {
        bail!(
            "{} has no optimizer/optimizer.safetensors; resume with --resume_only_model true to load the weights only",
            resume.dir.display()
        );
    };
    optimizer.load(optimizer_state)?;
    sampler.restore(state.sampler);
    Ok((state.log_window, state.loss_sum))
}

/// Makes the scalar sinks of a run once its folder exists (TensorBoard event files under
/// `<run_dir>/runs`, plots under `<run_dir>/images`).
pub type SinkFactory<'a> = &'a dyn Fn(&Path) -> anyhow::Result<Vec<Box<dyn ScalarSink>>>;

/// Trains `config` to the end: the whole recipe. The sinks `make_sinks` returns receive every
/// logged scalar; `console` shows progress.
pub fn train(
    config: &JobConfig,
    console: &Console,
    make_sinks: SinkFactory,
) -> anyhow::Result<RunSummary> {
    let sft = &config.sft;
    check_supported(config)?;

    // ---- Model folder, dtype, device.
    let model_id = sft
        .model
        .as_deref()
        .context("--model is required: a local model folder or a hub id such as Qwen/Qwen3-0.6B")?;
    let model_dir = crate::hub::resolve_model_dir(model_id, sft)?;
    let model_config = ModelConfig::from_model_dir(&model_dir)?;
    let dtype = sft
        .torch_dtype
        .map(dtype_of)
        .or(model_config.torch_dtype)
        .unwrap_or(DType::F32);
    // CPU only for now; CUDA arrives behind the `cuda` feature.
    let device = Device::Cpu;
    let model_options = ModelOptions {
        device: device.clone(),
        compute_dtype: dtype,
        master_dtype: DType::F32,
    };

    // ---- Tokenizer and data.
    let config_text = std::fs::read_to_string(model_dir.join("config.json"))?;
    let facts = ModelFacts::from_config_json(model_id, &config_text).ok();
    let template_name = sft
        .template
        .clone()
        .or_else(|| facts.as_ref().map(|f| f.template.clone()))
        .unwrap_or_else(|| "qwen3".into());
    let render_options = RenderOptions {
        template: Template::parse(&template_name)?,
        default_system: sft.system.clone(),
        disable_ignore_empty_think: sft.disable_ignore_empty_think,
    };
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir)?;
    let max_length = sft
        .max_length
        .map_or(model_config.max_position_embeddings, |m| m.max(1) as usize);
    let prepared = data::prepare(sft, &tokenizer, &render_options, max_length)?;
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
    let plan = Plan::new(config, prepared.train.len() as u64)?;
    if plan.eval_strategy != IntervalStrategy::No && prepared.val.is_empty() {
        bail!("evaluation is on but no validation sample is left; check --val_dataset, --split_dataset_ratio and --max_length");
    }

    // ---- Resume point, model, optimizer, schedule, sampler.
    let resume = match &sft.resume_from_checkpoint {
        Some(dir) => Some(ResumePoint::read(Path::new(dir))?),
        None => None,
    };
    let model = load_model(
        &model_dir,
        resume.as_ref(),
        sft.seed as u64,
        model_options,
        console,
    )?;
    let mut optimizer = AdamW::new(
        model.parameters(),
        AdamWConfig {
            beta1: sft.adam_beta1,
            beta2: sft.adam_beta2,
            eps: sft.adam_epsilon,
            weight_decay: sft.weight_decay,
        },
    )?;
    // The schedule the studio plots is the one that runs (whet-shared computes both).
    let schedule = Schedule {
        kind: sft.lr_scheduler_type,
        base_lr: plan.learning_rate,
        warmup_steps: plan.warmup_steps,
        total_steps: plan.total_steps,
        min_lr_rate: min_lr_rate(sft.lr_scheduler_kwargs.as_deref(), plan.learning_rate),
    };
    let mut sampler = Sampler::new(
        prepared.train.len(),
        plan.batch_size,
        sft.dataset_shuffle,
        sft.data_seed as u64,
    );
    let mut trainer_state = TrainerState {
        best_global_step: None,
        best_metric: None,
        best_model_checkpoint: None,
        epoch: 0.0,
        eval_steps: plan.eval_steps,
        global_step: 0,
        is_hyper_param_search: false,
        is_local_process_zero: true,
        is_world_process_zero: true,
        log_history: Vec::new(),
        logging_steps: plan.logging_steps,
        max_steps: plan.total_steps,
        num_input_tokens_seen: 0,
        num_train_epochs: plan.num_train_epochs(),
        save_steps: plan.save_steps,
        stateful_callbacks: TrainerState::default_callbacks(),
        total_flos: 0.0,
        train_batch_size: plan.batch_size as u64,
        trial_name: None,
        trial_params: None,
    };
    let (mut log_window, mut loss_sum) = match &resume {
        Some(resume) => {
            let restored = restore(
                resume,
                sft.resume_only_model,
                plan.accumulation,
                &mut trainer_state,
                &mut optimizer,
                &mut sampler,
            )?;
            console.line(&format!(
                "Resuming from {} at step {}",
                resume.dir.display(),
                trainer_state.global_step
            ));
            restored
        }
        None => (LogWindow::default(), 0.0),
    };
    if trainer_state.global_step >= plan.total_steps {
        console.line(&format!(
            "The checkpoint is at step {} of {}: nothing left to train. Raise --num_train_epochs or --max_steps to train further.",
            trainer_state.global_step, plan.total_steps
        ));
        return Ok(RunSummary {
            run_dir: resume.map(|r| r.dir).unwrap_or_default(),
            global_step: trainer_state.global_step,
            last_checkpoint: None,
            best_checkpoint: None,
        });
    }

    // ---- Outputs: the versioned run folder, args.json, logging.jsonl, checkpointer.
    let output_dir = PathBuf::from(derive::output_dir(config));
    let run_dir = create_run_dir(&output_dir, sft.add_version)?;
    let args = args_json(config, &plan, &run_dir, &template_name, dtype, max_length)?;
    std::fs::write(
        run_dir.join("args.json"),
        serde_json::to_string_pretty(&args)? + "\n",
    )?;
    if !prepared.split_val_rows.is_empty() {
        let lines: Vec<String> = prepared
            .split_val_rows
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        std::fs::write(run_dir.join("val_dataset.jsonl"), lines.join("\n") + "\n")?;
    }
    let mut logger = MetricLogger::new(
        JsonlLogger::create(&run_dir.join("logging.jsonl"))?,
        make_sinks(&run_dir)?,
    );
    let checkpointer = Checkpointer {
        run_dir: run_dir.clone(),
        model_dir: model_dir.clone(),
        save_dtype: dtype,
        save_only_model: sft.save_only_model,
        save_total_limit: sft.save_total_limit.map(|n| n.max(1) as usize),
    };
    let embedding_params = model_config.vocab_size * model_config.hidden_size;
    let non_embedding_params = model.num_parameters().saturating_sub(embedding_params) as f64;
    let is_moe = model_config.moe.is_some();
    let router_aux_loss_coef = if is_moe {
        sft.router_aux_loss_coef
    } else {
        0.0
    };
    console.line(&format!(
        "Training {} ({:.4}M parameters, {}) on {} samples ({} val): {} steps = {} per epoch, batch {} x accumulation {}, lr {:e}; output {}",
        model_id,
        model.num_parameters() as f64 / 1e6,
        dtype_name(dtype),
        prepared.train.len(),
        prepared.val.len(),
        plan.total_steps,
        plan.steps_per_epoch,
        plan.batch_size,
        plan.accumulation,
        plan.learning_rate,
        run_dir.display()
    ));

    // ---- The loop.
    let start_step = trainer_state.global_step;
    let started = Instant::now();
    let mut last_checkpoint: Option<PathBuf> = None;
    let mut input_tokens_this_run = 0u64;
    let mut samples_this_run = 0u64;
    console.start(start_step, plan.total_steps);

    // dataloader_num_workers > 0: a thread collates the coming windows ahead of the step.
    let mut prefetch = (sft.dataloader_num_workers.unwrap_or(1) > 0).then(|| {
        Prefetcher::spawn(
            sampler.clone(),
            std::sync::Arc::new(prepared.train.clone()),
            plan.accumulation,
            tokenizer.pad_token_id,
            device.clone(),
            plan.total_steps - trainer_state.global_step,
        )
    });
    while trainer_state.global_step < plan.total_steps {
        let step = trainer_state.global_step + 1;
        // The sampler itself advances here too: checkpoints store its state.
        let window = sampler.next_window(plan.accumulation);
        let micro_batches = match prefetch.as_mut() {
            Some(prefetch) => prefetch.next(&window.micro_batches)?,
            None => collate_window(
                &window.micro_batches,
                &prepared.train,
                tokenizer.pad_token_id,
                &device,
            )?,
        };

        // Forward, loss and backward over the window; gradients reduced.
        let (step_loss, mut grads) = accumulate_gradients(
            &model,
            &micro_batches,
            router_aux_loss_coef,
            sft.gradient_checkpointing,
        )?;
        let last_good = || match &last_checkpoint {
            Some(dir) => format!("the last good checkpoint is {}", dir.display()),
            None => "no checkpoint was saved before it".to_string(),
        };
        if !step_loss.loss.is_finite() {
            return Err(NonFiniteError {
                what: "loss",
                value: step_loss.loss,
                step,
                last_good: last_good(),
            }
            .into());
        }

        // Clip (the logged norm is the one before clipping), then the one optimizer step.
        let max_norm = if sft.max_grad_norm > 0.0 {
            sft.max_grad_norm
        } else {
            f64::INFINITY // transformers does not clip then, but the norm is still logged
        };
        let grad_norm = clip_grad_norm(&mut grads, max_norm)?;
        if !grad_norm.is_finite() {
            return Err(NonFiniteError {
                what: "gradient norm",
                value: grad_norm,
                step,
                last_good: last_good(),
            }
            .into());
        }
        let learning_rate = schedule.lr(step);
        optimizer.step(&grads, learning_rate)?;
        drop(grads);

        // Schedule and bookkeeping: the step is done.
        trainer_state.global_step = step;
        trainer_state.epoch = window.epoch_after;
        trainer_state.num_input_tokens_seen += step_loss.input_tokens;
        trainer_state.total_flos += 6.0 * step_loss.padded_tokens as f64 * non_embedding_params;
        input_tokens_this_run += step_loss.input_tokens;
        samples_this_run += step_loss.samples;
        loss_sum += step_loss.loss;
        log_window.steps += 1;
        log_window.loss_sum += step_loss.loss;
        log_window.aux_loss_sum += step_loss.aux_loss;
        log_window.label_tokens += step_loss.label_tokens;
        log_window.correct_tokens += step_loss.correct_tokens;
        let elapsed = started.elapsed().as_secs_f64();
        let steps_this_run = step - start_step;
        console.step(
            step,
            step_loss.loss,
            learning_rate,
            input_tokens_this_run as f64 / elapsed.max(1e-9),
        );

        // Log.
        if plan.should_log(step) {
            let mut entry: Record = vec![
                (
                    "loss".into(),
                    float(round8(log_window.loss_sum / log_window.steps as f64)),
                ),
                ("grad_norm".into(), float(round8(grad_norm))),
                ("learning_rate".into(), float(round8(learning_rate))),
                (
                    "token_acc".into(),
                    float(round8(
                        log_window.correct_tokens as f64 / log_window.label_tokens.max(1) as f64,
                    )),
                ),
            ];
            if router_aux_loss_coef > 0.0 {
                entry.push((
                    "aux_loss".into(),
                    float(round8(log_window.aux_loss_sum / log_window.steps as f64)),
                ));
            }
            entry.push(("epoch".into(), float(round8(trainer_state.epoch))));
            let progress = swift_fields(step, plan.total_steps, elapsed, steps_this_run);
            console.record(&logger.log(step, &entry, &progress)?);
            trainer_state.log_history.push(history_entry(entry, step));
            log_window = LogWindow::default();
        }

        // Evaluate, and track the best metric.
        if plan.should_evaluate(step, window.ends_epoch) {
            let result = evaluate(
                &model,
                &prepared.val,
                plan.eval_batch_size,
                tokenizer.pad_token_id,
                router_aux_loss_coef,
            )?;
            let entry: Record = vec![
                ("eval_loss".into(), float(round8(result.loss))),
                ("eval_token_acc".into(), float(round8(result.token_acc))),
                ("eval_exact_match".into(), float(round8(result.exact_match))),
                ("eval_runtime".into(), float(round_to(result.runtime, 4))),
                (
                    "eval_samples_per_second".into(),
                    float(round_to(
                        result.samples as f64 / result.runtime.max(1e-9),
                        3,
                    )),
                ),
                (
                    "eval_steps_per_second".into(),
                    float(round_to(
                        result.batches as f64 / result.runtime.max(1e-9),
                        3,
                    )),
                ),
                ("epoch".into(), float(round8(trainer_state.epoch))),
            ];
            let elapsed = started.elapsed().as_secs_f64();
            let progress = swift_fields(step, plan.total_steps, elapsed, steps_this_run);
            console.record(&logger.log(step, &entry, &progress)?);
            trainer_state.log_history.push(history_entry(entry, step));
            let metric = match plan.metric_for_best_model.as_str() {
                "eval_token_acc" => result.token_acc,
                "eval_exact_match" => result.exact_match,
                _ => result.loss,
            };
            let better = match trainer_state.best_metric {
                None => true,
                Some(best) if plan.greater_is_better => metric > best,
                Some(best) => metric < best,
            };
            if better {
                trainer_state.best_metric = Some(metric);
                trainer_state.best_global_step = Some(step);
            }
        }

        // Save, then rotate (never deleting the best).
        if plan.should_save(step, window.ends_epoch) {
            if trainer_state.best_global_step == Some(step) {
                trainer_state.best_model_checkpoint =
                    Some(run_dir.join(checkpoint_name(step)).display().to_string());
            }
            let training_state = TrainingState {
                format: TRAINING_STATE_FORMAT.into(),
                global_step: step,
                epoch: trainer_state.epoch,
                sampler: sampler.state(),
                log_window,
                loss_sum,
                num_input_tokens_seen: trainer_state.num_input_tokens_seen,
                total_flos: trainer_state.total_flos,
            };
            let scheduler = SchedulerState {
                lr_scheduler_type: scheduler_name(sft.lr_scheduler_type).into(),
                base_lrs: vec![plan.learning_rate],
                last_epoch: step,
                _last_lr: vec![schedule.lr(step + 1)],
                num_warmup_steps: plan.warmup_steps,
                num_training_steps: plan.total_steps,
            };
            let dir = checkpointer.save(&CheckpointContents {
                step,
                model: &model,
                optimizer: &optimizer,
                trainer_state: &trainer_state,
                training_state: &training_state,
                scheduler: &scheduler,
                args_json: &args,
            })?;
            trainer_state.write(&run_dir.join("trainer_state.json"))?;
            let best = trainer_state
                .best_model_checkpoint
                .as_ref()
                .map(PathBuf::from);
            for deleted in checkpointer.rotate(best.as_deref())? {
                console.line(&format!("Deleted old checkpoint {}", deleted.display()));
            }
            console.line(&format!("Saved {}", dir.display()));
            last_checkpoint = Some(dir);
        }
    }
    console.finish();

    // ---- The end-of-train line, the summary line and the final trainer state.
    let runtime = started.elapsed().as_secs_f64();
    let steps_this_run = trainer_state.global_step - start_step;
    let entry: Record = vec![
        ("train_runtime".into(), float(round_to(runtime, 4))),
        (
            "train_samples_per_second".into(),
            float(round_to(samples_this_run as f64 / runtime.max(1e-9), 3)),
        ),
        (
            "train_steps_per_second".into(),
            float(round_to(steps_this_run as f64 / runtime.max(1e-9), 3)),
        ),
        ("total_flos".into(), float(trainer_state.total_flos)),
        (
            "train_loss".into(),
            float(round8(loss_sum / trainer_state.global_step.max(1) as f64)),
        ),
        ("epoch".into(), float(round8(trainer_state.epoch))),
    ];
    let final_step = trainer_state.global_step;
    let progress = swift_fields(final_step, plan.total_steps, runtime, steps_this_run);
    console.record(&logger.log(final_step, &entry, &progress)?);
    trainer_state
        .log_history
        .push(history_entry(entry, final_step));
    logger.finish()?;
    trainer_state.write(&run_dir.join("trainer_state.json"))?;

    let params_m = model.num_parameters() as f64 / 1e6;
    let architecture = match model_config.architecture {
        Architecture::Qwen3 => "Qwen3ForCausalLM",
        Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    };
    let summary: Record = vec![
        (
            "model_parameter_info".into(),
            Value::from(format!(
                "{architecture}: {params_m:.4}M Params ({params_m:.4}M Trainable [100.0000%]), 0.0000M Buffers."
            )),
        ),
        ("train_dataset".into(), Value::from(data::length_summary(&prepared.train))),
        (
            "val_dataset".into(),
            if prepared.val.is_empty() {
                Value::Null
            } else {
                Value::from(data::length_summary(&prepared.val))
            },
        ),
        (
            "last_model_checkpoint".into(),
            last_checkpoint
                .as_ref()
                .map_or(Value::Null, |p| Value::from(p.display().to_string())),
        ),
        (
            "best_model_checkpoint".into(),
            trainer_state
                .best_model_checkpoint
                .clone()
                .map_or(Value::Null, Value::from),
        ),
        (
            "best_metric".into(),
            trainer_state.best_metric.map_or(Value::Null, float),
        ),
        ("global_step".into(), Value::from(trainer_state.global_step)),
        (
            "log_history".into(),
            Value::Array(
                trainer_state
                    .log_history
                    .iter()
                    .cloned()
                    .map(Value::Object)
                    .collect(),
            ),
        ),
    ];
    logger.write_line(&summary)?;
    Ok(RunSummary {
        run_dir,
        global_step: trainer_state.global_step,
        last_checkpoint,
        best_checkpoint: trainer_state.best_model_checkpoint.map(PathBuf::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/hf-reference")
    }

    /// The fixture batch's three samples, unpadded.
    fn fixture_samples() -> Vec<Sample> {
        let text = std::fs::read_to_string(fixture_dir().join("batch.json")).unwrap();
        let batch: Value = serde_json::from_str(&text).unwrap();
        (0..3)
            .map(|i| {
                let len = batch["lengths"][i].as_u64().unwrap() as usize;
                let ids: Vec<u32> = serde_json::from_value(batch["input_ids"][i].clone()).unwrap();
                let labels: Vec<i64> = serde_json::from_value(batch["labels"][i].clone()).unwrap();
                Sample {
                    input_ids: ids[..len].to_vec(),
                    labels: labels[..len].to_vec(),
                }
            })
            .collect()
    }

    /// Accumulating three micro-batches of one sample gives the token mean over all 121 label
    /// tokens — the same loss and gradients as one batch of three — and the aux loss enters as
    /// the mean over micro-batches, so one micro-batch reproduces transformers' total loss.
    #[test]
    fn accumulated_loss_is_the_token_mean_over_the_whole_window() {
        let model =
            Model::from_pretrained(fixture_dir().join("moe"), ModelOptions::default()).unwrap();
        let samples = fixture_samples();
        let pad = 507;
        let whole =
            vec![data::collate(&samples.iter().collect::<Vec<_>>(), pad, &Device::Cpu).unwrap()];
        let split: Vec<Batch> = samples
            .iter()
            .map(|s| data::collate(&[s], pad, &Device::Cpu).unwrap())
            .collect();

        // transformers: ce 6.322655 + 0.001 * aux 2.101774 = 6.324757 on the whole batch.
        let (one, _) = accumulate_gradients(&model, &whole, 0.001, false).unwrap();
        assert!((one.loss - 6.324756622314453).abs() < 6e-5, "{}", one.loss);
        assert!((one.aux_loss - 2.1017744541168213).abs() < 2e-5);
        assert_eq!(one.label_tokens, 121);

        let (one, whole_grads) = accumulate_gradients(&model, &whole, 0.0, true).unwrap();
        let (three, split_grads) = accumulate_gradients(&model, &split, 0.0, false).unwrap();
        assert!((one.loss - 6.322654724121094).abs() < 6e-5, "{}", one.loss);
        assert!(
            (one.loss - three.loss).abs() < 1e-5,
            "{} vs {}",
            one.loss,
            three.loss
        );
        assert_eq!(three.label_tokens, 121);
        for (i, (name, g)) in whole_grads.iter().enumerate() {
            let (Some(a), Some(b)) = (g, split_grads.get(i)) else {
                assert!(g.is_none() == split_grads.get(i).is_none(), "{name}");
                continue;
            };
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{name}");
        }
    }

    #[test]
    fn plan_follows_transformers_step_arithmetic() {
        let mut config = JobConfig::default();
        config.sft.tuner_type = TunerType::Full;
        config.sft.per_device_train_batch_size = 2;
        config.sft.num_train_epochs = 2.0;
        config.sft.warmup_ratio = 0.1;
        config.sft.save_steps = 4;
        config.sft.split_dataset_ratio = 0.1;
        // 23 samples, batch 2 -> 12 micro-batches; auto accumulation 16 / 2 = 8 -> 2 steps/epoch.
        let plan = Plan::new(&config, 23).unwrap();
        assert_eq!(plan.accumulation, 8);
        assert_eq!((plan.steps_per_epoch, plan.total_steps), (2, 4));
        assert_eq!(plan.warmup_steps, 1);
        assert_eq!(plan.learning_rate, 1e-5);
        assert_eq!(plan.eval_strategy, IntervalStrategy::Steps);
        assert_eq!(plan.metric_for_best_model, "eval_loss");
        assert!(!plan.greater_is_better);
        assert!(plan.should_log(1) && !plan.should_log(2));
        assert!(plan.should_save(4, false) && !plan.should_save(3, false));

        // Epoch strategies fire at each epoch's end and at the last step; no eval without data.
        config.sft.save_strategy = IntervalStrategy::Epoch;
        config.sft.max_steps = 5;
        let plan = Plan::new(&config, 23).unwrap();
        assert_eq!(plan.total_steps, 5);
        assert!(plan.should_save(2, true) && !plan.should_save(3, false));
        assert!(plan.should_evaluate(5, false));
        config.sft.split_dataset_ratio = 0.0;
        let plan = Plan::new(&config, 23).unwrap();
        assert_eq!(plan.eval_strategy, IntervalStrategy::No);
        assert!(!plan.should_evaluate(5, true));
    }
}
