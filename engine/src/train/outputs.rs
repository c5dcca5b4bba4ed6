//! A run's folder and what goes into it: args.json, val_dataset.jsonl, logging.jsonl (with the
//! TensorBoard and plot sinks), trainer_state.json and the checkpoints with their rotation.

use std::path::{Path, PathBuf};

use serde_json::Value;
use whet_shared::{derive, JobConfig};

use super::checkpoint::{
    checkpoint_name, create_run_dir, CheckpointContents, Checkpointer, SchedulerState,
    TrainerState, TrainingState,
};
use super::metrics::{history_entry, JsonlLogger, MetricLogger, Record, RunClock, ScalarSink};
use super::progress::Console;
use super::setup::Setup;
use crate::model::Model;
use crate::optim::AdamW;
use crate::sync::{GradSync, Group};

/// Makes the scalar sinks of a run once its folder exists (TensorBoard event files under
/// `<run_dir>/runs`, plots under `<run_dir>/images`).
pub type SinkFactory<'a> = &'a dyn Fn(&Path) -> anyhow::Result<Vec<Box<dyn ScalarSink>>>;

/// Where a run stands after a step, beyond its weights and optimizer: what a resume restores.
pub struct RunPosition<'a> {
    pub training: &'a TrainingState,
    pub scheduler: &'a SchedulerState,
}

/// Rank 0 writes every file of the run; the other ranks of a job only their optimizer shards
/// (their `logger` is None and logging is a no-op there).
pub struct Outputs {
    pub run_dir: PathBuf,
    args: Value,
    logger: Option<MetricLogger>,
    checkpointer: Checkpointer,
    pub last_checkpoint: Option<PathBuf>,
}

impl Outputs {
    /// Creates the versioned run folder with args.json (and the split-off validation rows); the
    /// other ranks learn its name from rank 0.
    pub fn create(
        config: &JobConfig,
        setup: &Setup,
        make_sinks: SinkFactory,
        group: &Group,
    ) -> anyhow::Result<Self> {
        let sft = &config.sft;
        let checkpointer = |run_dir: &Path| Checkpointer {
            run_dir: run_dir.to_path_buf(),
            model_dir: setup.model_dir.clone(),
            save_dtype: setup.dtype,
            save_only_model: sft.save_only_model,
            lora: setup.model.options().lora.clone(),
            save_total_limit: sft.save_total_limit.map(|n| n.max(1) as usize),
            rank: group.rank(),
            world_size: group.world_size(),
        };
        if !group.is_leader() {
            let run_dir = PathBuf::from(group.from_leader("run_dir", None)?);
            return Ok(Self {
                args: setup.args_json(config, &run_dir)?,
                checkpointer: checkpointer(&run_dir),
                run_dir,
                logger: None,
                last_checkpoint: None,
            });
        }
        let output_dir = PathBuf::from(derive::output_dir(config));
        let run_dir = create_run_dir(&output_dir, sft.add_version)?;
        group.from_leader("run_dir", Some(&run_dir.display().to_string()))?;
        let args = setup.args_json(config, &run_dir)?;
        std::fs::write(
            run_dir.join("args.json"),
            serde_json::to_string_pretty(&args)? + "\n",
        )?;
        let split_rows = &setup.data.split_val_rows;
        if !split_rows.is_empty() {
            let lines: Vec<String> = split_rows
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<_, _>>()?;
            std::fs::write(run_dir.join("val_dataset.jsonl"), lines.join("\n") + "\n")?;
        }
        let logger = MetricLogger::new(
            JsonlLogger::create(&run_dir.join("logging.jsonl"))?,
            make_sinks(&run_dir)?,
        );
        Ok(Self {
            checkpointer: checkpointer(&run_dir),
            run_dir,
            args,
            logger: Some(logger),
            last_checkpoint: None,
        })
    }

    /// One logged event: a logging.jsonl line (with ms-swift's time fields), the sinks, the
    /// console and trainer_state's log_history.
    pub fn log(
        &mut self,
        entry: Record,
        state: &mut TrainerState,
        clock: &RunClock,
        console: &Console,
    ) -> anyhow::Result<()> {
        let Some(logger) = &mut self.logger else {
            return Ok(());
        };
        let step = state.global_step;
        let progress = clock.progress_fields(step, state.max_steps);
        console.record(&logger.log(step, &entry, &progress)?);
        state.log_history.push(history_entry(entry, step));
        Ok(())
    }

    /// Writes `checkpoint-<step>` (atomically) and trainer_state.json, then rotates the old
    /// checkpoints, never deleting the best.
    pub fn save(
        &mut self,
        model: &Model,
        optimizer: &AdamW,
        state: &mut TrainerState,
        position: RunPosition,
        console: &Console,
        sync: &mut dyn GradSync,
    ) -> anyhow::Result<()> {
        let step = state.global_step;
        state.note_checkpoint(step, &self.run_dir.join(checkpoint_name(step)));
        let contents = CheckpointContents {
            step,
            model,
            optimizer,
            trainer_state: state,
            training_state: position.training,
            scheduler: position.scheduler,
            args_json: &self.args,
        };
        let dir = self.checkpointer.save(&contents, sync)?;
        if self.logger.is_none() {
            self.last_checkpoint = Some(dir);
            return Ok(());
        }
        state.write(&self.run_dir.join("trainer_state.json"))?;
        let best = state.best_model_checkpoint.as_ref().map(PathBuf::from);
        for deleted in self.checkpointer.rotate(best.as_deref())? {
            console.line(&format!("Deleted old checkpoint {}", deleted.display()));
        }
        console.line(&format!("Saved {}", dir.display()));
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// What a stop for a non-finite number says about the last good state.
    pub fn last_good(&self) -> String {
        match &self.last_checkpoint {
            Some(dir) => format!("the last good checkpoint is {}", dir.display()),
            None => "no checkpoint was saved before it".to_string(),
        }
    }

    /// The end-of-train line, the final trainer state and ms-swift's summary line.
    pub fn finish(
        &mut self,
        end_of_train: Record,
        state: &mut TrainerState,
        clock: &RunClock,
        console: &Console,
        summary: impl FnOnce(&TrainerState, Option<&Path>) -> Record,
    ) -> anyhow::Result<()> {
        self.log(end_of_train, state, clock, console)?;
        let Some(logger) = &mut self.logger else {
            return Ok(());
        };
        logger.finish()?;
        state.write(&self.run_dir.join("trainer_state.json"))?;
        let summary = summary(state, self.last_checkpoint.as_deref());
        logger.write_line(&summary)?;
        Ok(())
    }
}
