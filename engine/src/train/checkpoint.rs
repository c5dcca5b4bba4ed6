//! The run's folder on disk (ms-swift's layout): the versioned run directory, transformers'
//! `trainer_state.json`, and `checkpoint-<step>/` folders — written under a temporary name and
//! renamed when complete, rotated by `save_total_limit` without ever deleting the best one,
//! and read back for an exact resume.
//!
//! A checkpoint holds what `from_pretrained` needs (config.json, generation_config.json,
//! model.safetensors or shards with an index, tokenizer files) plus what whet needs to continue
//! bit for bit: `optimizer/optimizer.safetensors` (AdamW step and moments; one
//! `optimizer_rank<R>_of_<N>.safetensors` per rank when a job of N ranks shards it), `scheduler.json`,
//! `training_state.json` (sampler RNG and position, the open logging window, running totals) and,
//! when the weights are saved in a narrower dtype than the f32 masters,
//! `optimizer/master_weights.safetensors`. The optimizer files sit in a subfolder because tools
//! that load every `*.safetensors` of a model folder (vLLM, transformers-based checkers) must
//! see only the model there.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::{RankShare, Sampler, SamplerState};
pub use super::metrics::LogWindow;
use super::plan::Plan;
use super::step::StepLoss;
use crate::model::{Model, ModelConfig, ModelOptions, WeightSource};
use crate::optim::AdamW;
use crate::sync::GradSync;
use crate::tensor_files::{self, MappedWeights};

/// transformers shards checkpoints past 5 GB (`max_shard_size="5GB"`, decimal).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Tokenizer and template files copied from the model folder into each checkpoint.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Creates `output_dir/v<N>-<YYYYMMDD-HHMMSS>` (N = 1 + the largest existing `v<N>`, v0 first)
/// or, without add_version, `output_dir` itself.
pub fn create_run_dir(output_dir: &Path, add_version: bool) -> anyhow::Result<PathBuf> {
    // Absolute, as ms-swift makes it: args.json and best_model_checkpoint name real places.
    let output_dir = &std::path::absolute(output_dir)
        .with_context(|| format!("output_dir {} cannot be resolved", output_dir.display()))?;
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create output_dir {}", output_dir.display()))?;
    if !add_version {
        return Ok(output_dir.to_path_buf());
    }
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
    loop {
        let next = std::fs::read_dir(output_dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let digits: String = name
                    .strip_prefix('v')?
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse::<u64>().ok()
            })
            .max()
            .map_or(0, |n| n + 1);
        let dir = output_dir.join(format!("v{next}-{stamp}"));
        // create_dir (not _all) fails if another run took the name first; then look again.
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
}

/// transformers' `TrainerState`, serialised as `trainer_state.json` (fields in sorted order, as
/// transformers writes them with `sort_keys=True`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub best_global_step: Option<u64>,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    pub epoch: f64,
    pub eval_steps: u64,
    pub global_step: u64,
    pub is_hyper_param_search: bool,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    /// Each entry is a log record (without ms-swift's time fields) plus `step`.
    pub log_history: Vec<serde_json::Map<String, Value>>,
    pub logging_steps: u64,
    pub max_steps: u64,
    pub num_input_tokens_seen: u64,
    pub num_train_epochs: u64,
    pub save_steps: u64,
    pub stateful_callbacks: Value,
    pub total_flos: f64,
    pub train_batch_size: u64,
    pub trial_name: Option<String>,
    pub trial_params: Option<Value>,
}

impl TrainerState {
    /// The state at step 0 of `config`'s run with `plan` (the intervals as transformers records
    /// them, whatever the strategy).
    pub fn new(plan: &Plan, config: &whet_shared::JobConfig) -> Self {
        let eval_steps = whet_shared::events::eval_steps(config).max(1) as u64;
        Self {
            best_global_step: None,
            best_metric: None,
            best_model_checkpoint: None,
            epoch: 0.0,
            eval_steps,
            global_step: 0,
            is_hyper_param_search: false,
            is_local_process_zero: true,
            is_world_process_zero: true,
            log_history: Vec::new(),
            logging_steps: plan.events.logging_steps,
            max_steps: plan.total_steps,
            num_input_tokens_seen: 0,
            num_train_epochs: plan.num_train_epochs(),
            save_steps: config.sft.save_steps.max(1) as u64,
            stateful_callbacks: Self::default_callbacks(),
            total_flos: 0.0,
            train_batch_size: plan.batch_size as u64,
            trial_name: None,
            trial_params: None,
        }
    }

    /// Takes over a checkpoint's counters, best metric and log history (this run's plan keeps
    /// its own intervals and limits).
    pub fn continue_from(&mut self, saved: &TrainerState) {
        self.global_step = saved.global_step;
        self.epoch = saved.epoch;
        self.log_history = saved.log_history.clone();
        self.best_global_step = saved.best_global_step;
        self.best_metric = saved.best_metric;
        self.best_model_checkpoint = saved.best_model_checkpoint.clone();
        self.num_input_tokens_seen = saved.num_input_tokens_seen;
        self.total_flos = saved.total_flos;
    }

    /// Optimizer step `step` is done; `epoch` is the fractional epoch after it. FLOPs are
    /// transformers' estimate, 6 x tokens x non-embedding parameters.
    pub fn record_step(
        &mut self,
        step: u64,
        epoch: f64,
        loss: &StepLoss,
        non_embedding_params: f64,
    ) {
        self.global_step = step;
        self.epoch = epoch;
        self.num_input_tokens_seen += loss.input_tokens;
        self.total_flos += 6.0 * loss.padded_tokens as f64 * non_embedding_params;
    }

    /// Tracks the best eval metric (transformers' `_determine_best_metric`).
    pub fn observe_eval(&mut self, metric: f64, step: u64, greater_is_better: bool) {
        let better = match self.best_metric {
            None => true,
            Some(best) if greater_is_better => metric > best,
            Some(best) => metric < best,
        };
        if better {
            self.best_metric = Some(metric);
            self.best_global_step = Some(step);
        }
    }

    /// Before checkpoint `dir` of `step` is written: it is the best one if the best metric
    /// came from this step.
    pub fn note_checkpoint(&mut self, step: u64, dir: &Path) {
        if self.best_global_step == Some(step) {
            self.best_model_checkpoint = Some(dir.display().to_string());
        }
    }

    /// transformers' `TrainerControl` as its `stateful_callbacks` entry records it after a save.
    pub fn default_callbacks() -> Value {
        serde_json::json!({
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": false,
                    "should_evaluate": false,
                    "should_log": false,
                    "should_save": true,
                    "should_training_stop": false
                },
                "attributes": {}
            }
        })
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a trainer state", path.display()))
    }
}

/// What a resume needs beyond weights and optimizer: `training_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub format: String,
    pub global_step: u64,
    pub epoch: f64,
    pub sampler: SamplerState,
    pub log_window: LogWindow,
    /// Sum of every step's loss so far (the end-of-train `train_loss` is its mean).
    pub loss_sum: f64,
    pub num_input_tokens_seen: u64,
    pub total_flos: f64,
}

pub const TRAINING_STATE_FORMAT: &str = "whet-training-state-v1";

/// `scheduler.json`: the schedule is a pure function of the step; this records which one, in
/// the names of torch's `LambdaLR` state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    pub lr_scheduler_type: String,
    pub base_lrs: Vec<f64>,
    pub last_epoch: u64,
    pub _last_lr: Vec<f64>,
    pub num_warmup_steps: u64,
    pub num_training_steps: u64,
}

impl SchedulerState {
    /// The schedule's state after optimizer step `step`.
    pub fn after_step(schedule: &whet_shared::schedule::Schedule, step: u64) -> Self {
        Self {
            lr_scheduler_type: schedule.kind.as_str().into(),
            base_lrs: vec![schedule.base_lr],
            last_epoch: step,
            _last_lr: vec![schedule.lr(step + 1)],
            num_warmup_steps: schedule.warmup_steps,
            num_training_steps: schedule.total_steps,
        }
    }
}

/// Writes `dir/config.json` — `model_dir`'s, with `dtype`/`torch_dtype` saying what the
/// weights beside it hold — and generation_config.json (copied, or made from config.json's
/// token ids when the model folder has none). Checkpoints and `whet export` use it.
pub fn write_model_config(model_dir: &Path, dir: &Path, dtype: DType) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(model_dir.join("config.json"))?;
    let mut config: Value = serde_json::from_str(&text)?;
    let dtype_name = crate::dtype::torch_name(dtype);
    if let Some(map) = config.as_object_mut() {
        let key = if map.contains_key("torch_dtype") && !map.contains_key("dtype") {
            "torch_dtype"
        } else {
            "dtype"
        };
        map.insert(key.to_string(), Value::String(dtype_name.into()));
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    let generation = model_dir.join("generation_config.json");
    if generation.exists() {
        std::fs::copy(&generation, dir.join("generation_config.json"))?;
    } else {
        let pick = |key: &str| config.get(key).cloned().unwrap_or(Value::Null);
        let generation = serde_json::json!({
            "bos_token_id": pick("bos_token_id"),
            "eos_token_id": pick("eos_token_id"),
            "pad_token_id": pick("pad_token_id"),
        });
        std::fs::write(
            dir.join("generation_config.json"),
            serde_json::to_string_pretty(&generation)? + "\n",
        )?;
    }
    Ok(())
}

/// Copies the [`TOKENIZER_FILES`] `model_dir` has into `dir`.
pub fn copy_tokenizer_files(model_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    for file in TOKENIZER_FILES {
        let source = model_dir.join(file);
        if source.exists() {
            std::fs::copy(&source, dir.join(file))
                .with_context(|| format!("cannot copy {}", source.display()))?;
        }
    }
    Ok(())
}

/// Everything [`Checkpointer::save`] writes beyond the model and optimizer.
pub struct CheckpointContents<'a> {
    pub step: u64,
    pub model: &'a Model,
    pub optimizer: &'a AdamW,
    pub trainer_state: &'a TrainerState,
    pub training_state: &'a TrainingState,
    pub scheduler: &'a SchedulerState,
    pub args_json: &'a Value,
}

/// Writes and rotates the checkpoints of one run.
pub struct Checkpointer {
    pub run_dir: PathBuf,
    /// The model folder the run started from (source of config, tokenizer files).
    pub model_dir: PathBuf,
    /// Dtype of model.safetensors (torch_dtype); the masters are f32.
    pub save_dtype: DType,
    pub save_only_model: bool,
    /// A LoRA run saves its adapters as PEFT does, not the (unchanged) base weights.
    pub lora: Option<crate::model::LoraOptions>,
    pub save_total_limit: Option<usize>,
    /// This process's rank and the job's world size: rank 0 writes the checkpoint, every rank
    /// its optimizer shard.
    pub rank: usize,
    pub world_size: usize,
}

/// Test-only: `R:S` makes rank R exit while checkpoint S is half written (ARCHITECTURE.md).
pub const KILL_RANK_IN_SAVE: &str = "WHET_TEST_KILL_RANK_IN_SAVE";

/// The subfolder of a checkpoint with the optimizer state (and f32 masters when needed).
pub const OPTIMIZER_DIR: &str = "optimizer";

/// The optimizer state file of `rank` in a job of `world_size` ranks (one per rank; the world
/// size is in the name so that a resume with another one is refused by name, not by content).
pub fn optimizer_file(rank: usize, world_size: usize) -> String {
    if world_size <= 1 {
        "optimizer.safetensors".to_string()
    } else {
        format!("optimizer_rank{rank}_of_{world_size}.safetensors")
    }
}

pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

impl Checkpointer {
    /// Writes `checkpoint-<step>` atomically: everything goes into `.checkpoint-<step>.tmp`,
    /// which is renamed only when complete, so a crash (of any rank) never leaves a half
    /// checkpoint under the real name. With several ranks, in turns: rank 0 writes the model and
    /// the states, then every other rank its optimizer shard, then rank 0 renames.
    pub fn save(
        &self,
        contents: &CheckpointContents,
        sync: &mut dyn GradSync,
    ) -> anyhow::Result<PathBuf> {
        let name = checkpoint_name(contents.step);
        let final_dir = self.run_dir.join(&name);
        let tmp = self.run_dir.join(format!(".{name}.tmp"));
        let leader = self.rank == 0;
        if leader {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir_all(&tmp)?;
            self.write_contents(&tmp, contents)
                .with_context(|| format!("cannot write checkpoint {}", tmp.display()))?;
        }
        sync.barrier()?;
        let here = format!("{}:{}", self.rank, contents.step);
        if std::env::var(KILL_RANK_IN_SAVE).is_ok_and(|at| at == here) {
            // Test-only: this rank dies mid-save, after rank 0 wrote its part.
            eprintln!("error: rank {} dies in the middle of a checkpoint ({KILL_RANK_IN_SAVE}, a test-only switch)", self.rank);
            std::process::exit(3);
        }
        if !leader && !self.save_only_model {
            self.write_optimizer(&tmp, contents.optimizer)
                .with_context(|| {
                    format!(
                        "rank {}: cannot write its optimizer shard into {}",
                        self.rank,
                        tmp.display()
                    )
                })?;
        }
        sync.barrier()?;
        if leader {
            if final_dir.exists() {
                std::fs::remove_dir_all(&final_dir)?;
            }
            std::fs::rename(&tmp, &final_dir)
                .with_context(|| format!("cannot rename {} to {name}", tmp.display()))?;
        }
        Ok(final_dir)
    }

    fn write_optimizer(&self, dir: &Path, optimizer: &AdamW) -> anyhow::Result<()> {
        let optimizer_dir = dir.join(OPTIMIZER_DIR);
        std::fs::create_dir_all(&optimizer_dir)?;
        optimizer.save(optimizer_dir.join(optimizer_file(self.rank, self.world_size)))?;
        Ok(())
    }

    fn write_contents(&self, dir: &Path, c: &CheckpointContents) -> anyhow::Result<()> {
        match &self.lora {
            Some(lora) => crate::model::adapter::save_adapter(dir, c.model, lora, &self.model_dir)?,
            None => {
                c.model
                    .save_pretrained_weights(dir, self.save_dtype, MAX_SHARD_BYTES)?;
                write_model_config(&self.model_dir, dir, self.save_dtype)?;
            }
        }
        copy_tokenizer_files(&self.model_dir, dir)?;
        std::fs::write(
            dir.join("args.json"),
            serde_json::to_string_pretty(c.args_json)? + "\n",
        )?;
        c.trainer_state.write(&dir.join("trainer_state.json"))?;
        if self.save_only_model {
            return Ok(());
        }
        self.write_optimizer(dir, c.optimizer)?;
        let optimizer_dir = dir.join(OPTIMIZER_DIR);
        std::fs::write(
            dir.join("scheduler.json"),
            serde_json::to_string_pretty(c.scheduler)? + "\n",
        )?;
        std::fs::write(
            dir.join("training_state.json"),
            serde_json::to_string_pretty(c.training_state)? + "\n",
        )?;
        if self.save_dtype != DType::F32 && self.lora.is_none() {
            // model.safetensors lost the masters' low bits; keep them for an exact resume
            // (adapters are saved in f32 already).
            tensor_files::write(
                &optimizer_dir.join("master_weights.safetensors"),
                c.model.trainable_state_dict()?,
                tensor_files::pt_metadata(),
            )?;
        }
        Ok(())
    }

    /// The run's complete checkpoints, oldest step first.
    pub fn checkpoints(&self) -> anyhow::Result<Vec<(u64, PathBuf)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.run_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(step) = name
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                found.push((step, entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// transformers' `_rotate_checkpoints`: keep the newest `save_total_limit`, but the best
    /// checkpoint is moved to the protected end of the list first, and a limit of 1 keeps 2 while
    /// the best is not the newest. Returns the folders deleted.
    pub fn rotate(&self, best: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
        let Some(mut limit) = self.save_total_limit else {
            return Ok(Vec::new());
        };
        let mut sorted: Vec<PathBuf> = self.checkpoints()?.into_iter().map(|(_, p)| p).collect();
        if let Some(best) = best {
            if let Some(i) = sorted.iter().position(|p| p == best) {
                let newest = sorted.last().cloned();
                let best = sorted.remove(i);
                if limit == 1 && newest.as_ref() != Some(&best) {
                    limit = 2;
                }
                sorted.push(best);
            }
        }
        let excess = sorted.len().saturating_sub(limit.max(1));
        let deleted: Vec<PathBuf> = sorted.into_iter().take(excess).collect();
        for dir in &deleted {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot delete old checkpoint {}", dir.display()))?;
        }
        Ok(deleted)
    }
}

/// What `--resume_from_checkpoint DIR` found in DIR.
pub struct ResumePoint {
    pub dir: PathBuf,
    pub trainer_state: TrainerState,
    /// None for a `save_only_model` checkpoint.
    pub training_state: Option<TrainingState>,
    /// The checkpoint's `optimizer/` folder, when it has one.
    pub optimizer_dir: Option<PathBuf>,
    pub master_weights: Option<PathBuf>,
}

impl ResumePoint {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!(
                "resume_from_checkpoint {} is not a folder; pass a checkpoint-<step> folder of an earlier run",
                dir.display()
            );
        }
        let trainer_state = TrainerState::read(&dir.join("trainer_state.json"))?;
        let state_path = dir.join("training_state.json");
        let training_state = if state_path.exists() {
            let text = std::fs::read_to_string(&state_path)?;
            let state: TrainingState = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a whet training state", state_path.display())
            })?;
            if state.format != TRAINING_STATE_FORMAT {
                bail!(
                    "{} has format `{}`, this whet reads `{TRAINING_STATE_FORMAT}`",
                    state_path.display(),
                    state.format
                );
            }
            Some(state)
        } else {
            None
        };
        let optimizer_dir = dir.join(OPTIMIZER_DIR);
        let master = optimizer_dir.join("master_weights.safetensors");
        Ok(Self {
            dir: dir.to_path_buf(),
            trainer_state,
            training_state,
            optimizer_dir: optimizer_dir.is_dir().then_some(optimizer_dir),
            master_weights: master.exists().then_some(master),
        })
    }

    /// The optimizer state of `share.rank`, or why there is none for a job of `share.world`.
    fn optimizer_state(&self, share: RankShare) -> anyhow::Result<PathBuf> {
        let only_model = "resume with --resume_only_model true to load the weights only";
        let Some(folder) = &self.optimizer_dir else {
            bail!(
                "{} has no {OPTIMIZER_DIR}/ folder; {only_model}",
                self.dir.display()
            );
        };
        let path = folder.join(optimizer_file(share.rank, share.world));
        if path.exists() {
            return Ok(path);
        }
        let saved_by = (2..=1024).find(|&w| folder.join(optimizer_file(0, w)).exists());
        let saved_by = match saved_by {
            Some(w) => format!("{w} ranks"),
            None if folder.join(optimizer_file(0, 1)).exists() => "one process".to_string(),
            None => bail!(
                "{} has no optimizer state in {OPTIMIZER_DIR}/; {only_model}",
                self.dir.display()
            ),
        };
        bail!(
            "{} was saved by {saved_by}, this run has {} (its optimizer state is sharded by rank): resume with the same number of processes, or {only_model}",
            self.dir.display(),
            if share.world == 1 { "one process".to_string() } else { format!("{} ranks", share.world) }
        )
    }

    /// The checkpoint's model: the trainable parameters from its f32 masters when saved apart,
    /// everything else from model.safetensors (memory-mapped). An adapter checkpoint goes over
    /// `base`, the run's base weights (from `model_dir`).
    pub fn load_model(
        &self,
        model_dir: &Path,
        base: WeightSource,
        options: ModelOptions,
    ) -> anyhow::Result<Model> {
        if self.dir.join("adapter_config.json").exists() {
            return crate::model::adapter::adapter_over(model_dir, base, &self.dir, options);
        }
        let config = ModelConfig::from_model_dir(&self.dir)?;
        let mut sources = Vec::new();
        if let Some(master) = &self.master_weights {
            sources.push(MappedWeights::open(
                std::slice::from_ref(master),
                &self.dir,
            )?);
        }
        sources.push(MappedWeights::open_model_dir(&self.dir)?);
        Ok(Model::build(config, WeightSource::Files(sources), options)?)
    }

    /// Continues from this checkpoint: the trainer state's counters, best metric and log
    /// history; then the optimizer moments and the sampler's exact position, or — with
    /// resume_only_model — a fresh optimizer and the data already trained on skipped. Returns
    /// the open logging window and the running loss sum.
    pub fn restore(
        &self,
        resume_only_model: bool,
        accumulation: usize,
        share: RankShare,
        trainer_state: &mut TrainerState,
        optimizer: &mut AdamW,
        sampler: &mut Sampler,
    ) -> anyhow::Result<(LogWindow, f64)> {
        trainer_state.continue_from(&self.trainer_state);
        if resume_only_model {
            for _ in 0..self.trainer_state.global_step {
                sampler.next_window_for(accumulation, share);
            }
            return Ok((LogWindow::default(), 0.0));
        }
        let Some(state) = &self.training_state else {
            bail!(
                "{} holds weights only (saved with save_only_model); resume with --resume_only_model true",
                self.dir.display()
            );
        };
        optimizer.load(self.optimizer_state(share)?)?;
        sampler.restore(state.sampler);
        Ok((state.log_window, state.loss_sum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("whet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn version_dirs_count_up_from_v0() {
        let out = temp_dir("versions");
        let first = create_run_dir(&out, true).unwrap();
        assert!(first
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("v0-"));
        std::fs::create_dir(out.join("v7-20240101-000000")).unwrap();
        let next = create_run_dir(&out, true).unwrap();
        assert!(next
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("v8-"));
        assert_eq!(create_run_dir(&out, false).unwrap(), out);
        std::fs::remove_dir_all(out).ok();
    }

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/hf-reference")
    }

    /// Saving a checkpoint and loading it back gives the same logits bit for bit, also when
    /// model.safetensors is bf16 (the f32 masters come back from optimizer/).
    #[test]
    fn checkpoint_reload_gives_identical_logits() {
        use crate::grad::Gradients;
        use crate::optim::AdamWConfig;
        use candle_core::{Device, Tensor};

        let model = Model::from_pretrained(fixture_dir(), ModelOptions::default()).unwrap();
        // One optimizer step so the weights differ from the fixture's file.
        let mut optimizer = AdamW::new(model.trainable(), AdamWConfig::default()).unwrap();
        let mut grads = Gradients::empty(model.trainable());
        for (i, (_, var)) in model.trainable_parameters().iter().enumerate() {
            grads.set(i, Some(var.as_tensor().affine(0.5, 0.01).unwrap()));
        }
        optimizer.step(&grads, 1e-3).unwrap();
        let ids = Tensor::new(&[[508u32, 426, 198, 18, 220, 87, 509]], &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, 7), DType::U32, &Device::Cpu).unwrap();
        let expected: Vec<f32> = model
            .forward(&ids, &mask)
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        for save_dtype in [DType::F32, DType::BF16] {
            let run = temp_dir(&format!("reload-{save_dtype:?}"));
            let checkpointer = Checkpointer {
                run_dir: run.clone(),
                model_dir: fixture_dir(),
                save_dtype,
                save_only_model: false,
                lora: None,
                save_total_limit: None,
                rank: 0,
                world_size: 1,
            };
            let trainer_state: TrainerState = serde_json::from_value(serde_json::json!({
                "best_global_step": null, "best_metric": null, "best_model_checkpoint": null,
                "epoch": 0.5, "eval_steps": 5, "global_step": 1, "is_hyper_param_search": false,
                "is_local_process_zero": true, "is_world_process_zero": true, "log_history": [],
                "logging_steps": 5, "max_steps": 2, "num_input_tokens_seen": 0,
                "num_train_epochs": 1, "save_steps": 1,
                "stateful_callbacks": TrainerState::default_callbacks(), "total_flos": 0.0,
                "train_batch_size": 1, "trial_name": null, "trial_params": null
            }))
            .unwrap();
            let training_state = TrainingState {
                format: TRAINING_STATE_FORMAT.into(),
                global_step: 1,
                epoch: 0.5,
                sampler: crate::train::data::Sampler::new(4, 1, true, 42).state(),
                log_window: LogWindow::default(),
                loss_sum: 0.0,
                num_input_tokens_seen: 0,
                total_flos: 0.0,
            };
            let scheduler = SchedulerState {
                lr_scheduler_type: "cosine".into(),
                base_lrs: vec![1e-3],
                last_epoch: 1,
                _last_lr: vec![1e-3],
                num_warmup_steps: 0,
                num_training_steps: 2,
            };
            let dir = checkpointer
                .save(
                    &CheckpointContents {
                        step: 1,
                        model: &model,
                        optimizer: &optimizer,
                        trainer_state: &trainer_state,
                        training_state: &training_state,
                        scheduler: &scheduler,
                        args_json: &serde_json::json!({}),
                    },
                    &mut crate::sync::SingleProcess::new(model.trainable().num_elements()),
                )
                .unwrap();
            assert_eq!(dir, run.join("checkpoint-1"));
            assert!(!run.join(".checkpoint-1.tmp").exists());
            let resume = ResumePoint::read(&dir).unwrap();
            assert_eq!(resume.master_weights.is_some(), save_dtype != DType::F32);
            assert_eq!(resume.training_state.as_ref(), Some(&training_state));
            let reloaded = resume
                .load_model(
                    &fixture_dir(),
                    WeightSource::Random { seed: 0 },
                    ModelOptions::default(),
                )
                .unwrap();
            let logits: Vec<f32> = reloaded
                .forward(&ids, &mask)
                .unwrap()
                .logits
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                logits
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{save_dtype:?}: reloaded logits differ"
            );
            std::fs::remove_dir_all(run).ok();
        }
    }

    #[test]
    fn rotation_keeps_the_best_and_the_newest() {
        let run = temp_dir("rotate");
        for step in [2, 4, 6, 8] {
            std::fs::create_dir(run.join(checkpoint_name(step))).unwrap();
        }
        let mut checkpointer = Checkpointer {
            run_dir: run.clone(),
            model_dir: run.clone(),
            save_dtype: DType::F32,
            save_only_model: false,
            lora: None,
            save_total_limit: Some(2),
            rank: 0,
            world_size: 1,
        };
        let best = run.join("checkpoint-4");
        let deleted = checkpointer.rotate(Some(&best)).unwrap();
        assert_eq!(
            deleted,
            vec![run.join("checkpoint-2"), run.join("checkpoint-6")]
        );
        let kept: Vec<u64> = checkpointer
            .checkpoints()
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(kept, vec![4, 8]);

        // A limit of 1 still keeps the best beside the newest.
        std::fs::create_dir(run.join(checkpoint_name(10))).unwrap();
        checkpointer.save_total_limit = Some(1);
        checkpointer.rotate(Some(&best)).unwrap();
        let kept: Vec<u64> = checkpointer
            .checkpoints()
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(kept, vec![4, 10]);

        // Without a best, only the newest N stay.
        checkpointer.rotate(None).unwrap();
        let kept: Vec<u64> = checkpointer
            .checkpoints()
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(kept, vec![10]);
        std::fs::remove_dir_all(run).ok();
    }
}
