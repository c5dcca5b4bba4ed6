//! The resolved numbers of a run: ms-swift's auto values and transformers' step arithmetic,
//! from whet-shared's `derive` — the figures `whet check` and the studio show — and the plan of
//! events (when to log, evaluate and save) from whet-shared's [`EventPlan`].

use anyhow::bail;
use whet_shared::events::{EventPlan, Events};
use whet_shared::{derive, JobConfig};

#[derive(Debug, Clone)]
pub struct Plan {
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub accumulation: usize,
    pub learning_rate: f64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub events: EventPlan,
    /// The eval record's key that picks the best checkpoint (whet-shared resolves it).
    pub best: derive::BestMetric,
}

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
        // Validation judged the name already; an error here means it was skipped.
        let best = derive::best_metric(config)
            .map_err(|d| anyhow::anyhow!("{}: {}", d.field, d.message_en))?;
        Ok(Self {
            batch_size: sft.per_device_train_batch_size.max(1) as usize,
            eval_batch_size: sft.per_device_eval_batch_size.max(1) as usize,
            accumulation: derived.gradient_accumulation_steps as usize,
            learning_rate: derived.learning_rate,
            steps_per_epoch,
            total_steps,
            warmup_steps,
            // With the config as given: evaluation depends on its validation source.
            events: EventPlan::new(config, steps_per_epoch, total_steps),
            best,
        })
    }

    /// What happens after optimizer step `step`.
    pub fn events(&self, step: u64) -> Events {
        self.events.at(step)
    }

    pub fn evaluates(&self) -> bool {
        self.events.eval != whet_shared::events::Interval::Never
    }

    /// transformers' `num_train_epochs` in the trainer state: epochs the loop will enter.
    pub fn num_train_epochs(&self) -> u64 {
        self.events.num_train_epochs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whet_shared::config::{IntervalStrategy, TunerType};
    use whet_shared::events::Interval;

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
        assert_eq!(plan.events.eval, Interval::Steps(4));
        assert_eq!(plan.best.key, "eval_loss");
        assert!(!plan.best.greater_is_better);
        assert!(plan.events(1).log && !plan.events(2).log);
        assert!(plan.events(4).save && !plan.events(3).save);

        // Epoch strategies fire at each epoch's end and at the last step; no eval without data.
        config.sft.save_strategy = IntervalStrategy::Epoch;
        config.sft.max_steps = 5;
        let plan = Plan::new(&config, 23).unwrap();
        assert_eq!(plan.total_steps, 5);
        assert!(plan.events(2).save && !plan.events(3).save);
        assert!(plan.events(5).evaluate);
        config.sft.split_dataset_ratio = 0.0;
        let plan = Plan::new(&config, 23).unwrap();
        assert!(!plan.evaluates());
        assert!(!plan.events(5).evaluate);
    }
}
