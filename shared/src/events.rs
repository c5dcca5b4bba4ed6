//! When a run logs, evaluates and saves: one plan, used by `derive` (what `whet check` and the
//! studio count) and by the engine's loop (what actually happens), so the two cannot disagree.
//!
//! The rules are transformers' `DefaultFlowCallback` plus ms-swift's `DefaultFlowCallbackNew`:
//! log at the first step and every `logging_steps`; evaluate and save every `eval_steps` /
//! `save_steps` (or at each epoch's end), and once more at the last step when the strategy is
//! not `no`.

use crate::config::{IntervalStrategy, JobConfig};
use crate::derive;

/// A resolved interval: when an event fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Never,
    /// Every N optimizer steps (N ≥ 1).
    Steps(u64),
    /// At the end of each epoch.
    Epoch,
}

impl Interval {
    /// `every` below 1 under the steps strategy is a validation error (`interval_not_positive`);
    /// such a plan fires never rather than every step.
    fn resolve(strategy: IntervalStrategy, every: i64) -> Self {
        match strategy {
            IntervalStrategy::No => Interval::Never,
            IntervalStrategy::Steps if every >= 1 => Interval::Steps(every as u64),
            IntervalStrategy::Steps => Interval::Never,
            IntervalStrategy::Epoch => Interval::Epoch,
        }
    }
}

/// What happens after an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Events {
    pub log: bool,
    pub evaluate: bool,
    pub save: bool,
}

/// How many times each event fires over a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventCounts {
    pub logs: u64,
    pub evals: u64,
    pub saves: u64,
}

/// The schedule of a run's events, from its step arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPlan {
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub logging_steps: u64,
    pub eval: Interval,
    pub save: Interval,
}

/// `eval_steps` as ms-swift resolves it: unset follows `save_steps`.
pub fn eval_steps(config: &JobConfig) -> i64 {
    config.sft.eval_steps.unwrap_or(config.sft.save_steps)
}

impl EventPlan {
    pub fn new(config: &JobConfig, steps_per_epoch: u64, total_steps: u64) -> Self {
        let sft = &config.sft;
        EventPlan {
            total_steps,
            steps_per_epoch: steps_per_epoch.max(1),
            logging_steps: sft.logging_steps.max(1) as u64,
            eval: Interval::resolve(derive::eval_strategy(config), eval_steps(config)),
            save: Interval::resolve(sft.save_strategy, sft.save_steps),
        }
    }

    fn fires(&self, interval: Interval, step: u64) -> bool {
        let last = step == self.total_steps;
        match interval {
            Interval::Never => false,
            Interval::Steps(every) => step.is_multiple_of(every) || last,
            Interval::Epoch => step.is_multiple_of(self.steps_per_epoch) || last,
        }
    }

    /// The events after optimizer step `step` (1-based).
    pub fn at(&self, step: u64) -> Events {
        Events {
            log: step == 1 || step.is_multiple_of(self.logging_steps),
            evaluate: self.fires(self.eval, step),
            save: self.fires(self.save, step),
        }
    }

    fn count(&self, interval: Interval) -> u64 {
        let total = self.total_steps;
        let every = match interval {
            Interval::Never => return 0,
            Interval::Steps(every) => every,
            Interval::Epoch => self.steps_per_epoch,
        };
        total / every + u64::from(!total.is_multiple_of(every))
    }

    /// How often each event fires in steps `1..=total_steps` (equal to counting [`Self::at`]).
    pub fn counts(&self) -> EventCounts {
        let total = self.total_steps;
        let logs = if total == 0 {
            0
        } else {
            total / self.logging_steps + u64::from(self.logging_steps > 1)
        };
        EventCounts {
            logs,
            evals: self.count(self.eval),
            saves: self.count(self.save),
        }
    }

    /// transformers' `num_train_epochs` in the trainer state: epochs the loop will enter.
    pub fn num_train_epochs(&self) -> u64 {
        self.total_steps.div_ceil(self.steps_per_epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(plan: &EventPlan) -> EventCounts {
        let mut counts = EventCounts::default();
        for step in 1..=plan.total_steps {
            let events = plan.at(step);
            counts.logs += u64::from(events.log);
            counts.evals += u64::from(events.evaluate);
            counts.saves += u64::from(events.save);
        }
        counts
    }

    #[test]
    fn closed_form_counts_equal_the_events_fired() {
        let intervals = [
            Interval::Never,
            Interval::Epoch,
            Interval::Steps(1),
            Interval::Steps(3),
            Interval::Steps(7),
        ];
        for total_steps in 0..30 {
            for steps_per_epoch in 1..6 {
                for logging_steps in 1..5 {
                    for eval in intervals {
                        for save in intervals {
                            let plan = EventPlan {
                                total_steps,
                                steps_per_epoch,
                                logging_steps,
                                eval,
                                save,
                            };
                            assert_eq!(plan.counts(), counted(&plan), "{plan:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn eval_follows_save_steps_and_fires_at_the_end() {
        let mut config = JobConfig::default();
        config.sft.split_dataset_ratio = 0.1;
        config.sft.save_steps = 4;
        config.sft.eval_strategy = Some(IntervalStrategy::Steps);
        let plan = EventPlan::new(&config, 3, 10);
        assert_eq!(plan.eval, Interval::Steps(4));
        assert!(plan.at(8).evaluate && plan.at(10).evaluate && !plan.at(9).evaluate);
        assert!(plan.at(1).log && !plan.at(2).log && plan.at(5).log);

        // save_steps 0 under an epoch save strategy: no step interval for evaluation either.
        config.sft.save_strategy = IntervalStrategy::Epoch;
        config.sft.save_steps = 0;
        let plan = EventPlan::new(&config, 3, 10);
        assert_eq!(plan.eval, Interval::Never);
        assert_eq!(plan.counts().saves, 4);
        // No validation data: evaluation is off whatever was asked.
        config.sft.split_dataset_ratio = 0.0;
        config.sft.eval_steps = Some(2);
        assert_eq!(EventPlan::new(&config, 3, 10).eval, Interval::Never);
    }
}
