//! The fine-tuning recipe behind `whet sft`, readable top to bottom: [`train`] sets up (model,
//! tokenizer, data, plan — [`Setup`]), restores a checkpoint if asked, opens the outputs, then
//! runs the loop — forward, loss, backward, reduce, clip, step, schedule, log, evaluate, save.
//!
//! What changes between one process and many, CPU and GPU, full training and adapters does not
//! fork this loop; it changes the parts the loop calls through narrow interfaces:
//! * the [`GradSync`] hears of each decoder layer's gradients during backward and reduces them
//!   (identity in one process), sums every scalar the ranks must agree on, and after the
//!   optimizer step brings every rank's parameters up to date (ZeRO's shards);
//! * the optimizer keeps state for the range of the flat parameter space the sync says this
//!   process owns; clipping sums squares over the sync's norm range and then over ranks;
//! * each rank takes every world-th micro-batch of the one sampler ([`RankShare`]) and its share
//!   of the validation batches; rank 0 alone writes logs and checkpoints, every rank its own
//!   optimizer shard;
//! * parameters have roles (trainable or frozen), so the optimizer, clipping and the sync only
//!   ever see trainable ones;
//! * the device is chosen once; batches are collated on the CPU and moved to it here.
//!
//! Randomness: the data order comes from one splitmix64 sampler seeded with data_seed (its
//! state at the start of the epoch plus the micro-batches consumed are the data position a
//! checkpoint stores); `seed` only initialises a model folder that has no weights. Nothing else
//! is random (no dropout), so a resumed run repeats the uninterrupted one bit for bit.

use std::path::PathBuf;
use std::sync::Arc;

use super::checkpoint::{SchedulerState, TrainerState, TrainingState, TRAINING_STATE_FORMAT};
use super::data::{self, RankShare, Sampler};
use super::eval::evaluate;
use super::loader::Loader;
use super::metrics::{end_of_train_record, summary_record, LogWindow, RunClock, RunTotals};
use super::outputs::{Outputs, RunPosition, SinkFactory};
use super::progress::Console;
use super::setup::{adamw_config, Setup};
use super::step::{forward_backward, StepOptions};
use crate::optim::{clip_grad_norm, AdamW};
use crate::sync::Group;
use whet_shared::JobConfig;

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

/// Stops the run at a non-finite loss or gradient norm, naming the last good checkpoint.
fn finite(what: &'static str, value: f64, step: u64, outputs: &Outputs) -> anyhow::Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    Err(NonFiniteError {
        what,
        value,
        step,
        last_good: outputs.last_good(),
    }
    .into())
}

/// Trains `config` to the end as this process of `group`: the whole recipe. The sinks
/// `make_sinks` returns receive every logged scalar; `console` shows progress.
pub fn train(
    config: &JobConfig,
    console: &Console,
    make_sinks: SinkFactory,
    group: &Group,
) -> anyhow::Result<RunSummary> {
    run(config, console, make_sinks, group).map_err(|error| {
        if crate::device::is_out_of_memory(&error) {
            let help = crate::device::out_of_memory_help(config);
            error.context(help)
        } else {
            error
        }
    })
}

fn run(
    config: &JobConfig,
    console: &Console,
    make_sinks: SinkFactory,
    group: &Group,
) -> anyhow::Result<RunSummary> {
    let sft = &config.sft;
    let setup = Setup::new(config, console, group.device())?;
    let (plan, model, device) = (&setup.plan, &setup.model, &setup.device);
    let bucket_elems = setup.sharding.bucket_elems(setup.model_config.hidden_size);
    let mut sync = group.grad_sync(setup.sharding.stage, model.trainable(), bucket_elems)?;
    let share = RankShare {
        rank: group.rank(),
        world: group.world_size(),
    };
    let optimizer_device = if setup.sharding.offload_optimizer {
        candle_core::Device::Cpu
    } else {
        device.clone()
    };
    let mut optimizer = AdamW::for_range(model.trainable(), sync.owned(), adamw_config(config))?
        .with_flat_master(sync.flat_master())?
        .with_state_on(&optimizer_device)?;
    let schedule = setup.schedule(config);
    let mut sampler = Sampler::new(
        setup.data.train.len(),
        plan.batch_size,
        sft.dataset_shuffle,
        sft.data_seed as u64,
    );
    let mut state = TrainerState::new(plan, config);
    let (mut log_window, mut loss_sum) = (LogWindow::default(), 0.0);
    if let Some(resume) = &setup.resume {
        (log_window, loss_sum) = resume.restore(
            sft.resume_only_model,
            plan.accumulation,
            share,
            &mut state,
            &mut optimizer,
            &mut sampler,
        )?;
        let at = state.global_step;
        console.line(&format!(
            "Resuming from {} at step {at}",
            resume.dir.display()
        ));
    }
    if state.global_step >= plan.total_steps {
        console.line(&format!(
            "The checkpoint is at step {} of {}: nothing left to train. Raise --num_train_epochs or --max_steps to train further.",
            state.global_step, plan.total_steps
        ));
        return Ok(RunSummary {
            run_dir: setup.resume.map(|r| r.dir).unwrap_or_default(),
            global_step: state.global_step,
            last_checkpoint: None,
            best_checkpoint: None,
        });
    }

    let mut outputs = Outputs::create(config, &setup, make_sinks, group)?;
    console.line(&setup.describe(&outputs.run_dir));
    let router_aux_loss_coef = setup.router_aux_loss_coef(config);
    // transformers does not clip at max_grad_norm 0, but the norm is still logged.
    let max_norm = if sft.max_grad_norm > 0.0 {
        sft.max_grad_norm
    } else {
        f64::INFINITY
    };
    let clock = RunClock::start(state.global_step, device);
    let mut totals = RunTotals::default();
    let mut loader = Loader::new(
        Arc::new(setup.data.train.clone()),
        setup.tokenizer.pad_token_id,
        sft.dataloader_num_workers.unwrap_or(1) > 0,
        sampler.clone(),
        plan.accumulation,
        share,
        plan.total_steps - state.global_step,
    );
    console.start(state.global_step, plan.total_steps);

    while state.global_step < plan.total_steps {
        let step = state.global_step + 1;
        // The sampler itself advances here too: checkpoints store its state.
        let window = sampler.next_window_for(plan.accumulation, share);
        let batches = loader.batches(&window.micro_batches, device)?;

        // Forward, loss and backward over the window; gradients reduced as they appear.
        let step_options = StepOptions {
            router_aux_loss_coef,
            gradient_checkpointing: sft.gradient_checkpointing,
            dropout: Some((sft.seed as u64, step)),
        };
        let (loss, mut grads) = forward_backward(model, &batches, step_options, sync.as_mut())?;
        finite("loss", loss.loss, step, &outputs)?;

        // Clip (the logged norm is the one before clipping), then the one optimizer step.
        let grad_norm = clip_grad_norm(&mut grads, max_norm, sync.as_mut())?;
        finite("gradient norm", grad_norm, step, &outputs)?;
        let learning_rate = schedule.lr(step);
        optimizer.step(&grads, learning_rate)?;
        drop(grads);
        sync.params_updated(model.trainable())?;

        // The step is done.
        state.record_step(
            step,
            window.epoch_after,
            &loss,
            setup.non_embedding_params(),
        );
        log_window.add(&loss);
        totals.add(&loss);
        loss_sum += loss.loss;
        let speed = totals.input_tokens as f64 / clock.elapsed().max(1e-9);
        console.step(step, loss.loss, learning_rate, speed);

        let events = plan.events(step);
        if events.log {
            let moe = router_aux_loss_coef > 0.0;
            let entry = log_window.take_record(grad_norm, learning_rate, state.epoch, moe);
            outputs.log(entry, &mut state, &clock, console)?;
        }
        // Evaluation and checkpoints read every weight: ZeRO-3 gathers them all meanwhile.
        let every_param = 0..model.trainable().len();
        let reads_all = events.evaluate || events.save;
        if reads_all {
            sync.gather(model.trainable(), every_param.clone())?;
        }
        if events.evaluate {
            let result = evaluate(
                model,
                &setup.data.val,
                plan.eval_batch_size,
                setup.tokenizer.pad_token_id,
                router_aux_loss_coef,
                sync.as_mut(),
            )?;
            outputs.log(result.record(state.epoch), &mut state, &clock, console)?;
            let metric = result.metric(plan.best.key);
            state.observe_eval(metric, step, plan.best.greater_is_better);
        }
        if events.save {
            let training_state = TrainingState {
                format: TRAINING_STATE_FORMAT.into(),
                global_step: step,
                epoch: state.epoch,
                sampler: sampler.state(),
                log_window,
                loss_sum,
                num_input_tokens_seen: state.num_input_tokens_seen,
                total_flos: state.total_flos,
            };
            let scheduler = SchedulerState::after_step(&schedule, step);
            outputs.save(
                model,
                &optimizer,
                &mut state,
                RunPosition {
                    training: &training_state,
                    scheduler: &scheduler,
                },
                console,
                sync.as_mut(),
            )?;
        }
        if reads_all {
            sync.release(model.trainable(), every_param)?;
        }
    }
    console.finish();

    let end_of_train = end_of_train_record(&clock, &totals, &state, loss_sum);
    outputs.finish(end_of_train, &mut state, &clock, console, |state, last| {
        let data = &setup.data;
        let val = (!data.val.is_empty()).then(|| data::length_summary(&data.val));
        summary_record(
            setup.parameter_info(),
            data::length_summary(&data.train).into(),
            val.into(),
            last,
            state,
        )
    })?;
    Ok(RunSummary {
        run_dir: outputs.run_dir,
        global_step: state.global_step,
        last_checkpoint: outputs.last_checkpoint,
        best_checkpoint: state.best_model_checkpoint.map(PathBuf::from),
    })
}
