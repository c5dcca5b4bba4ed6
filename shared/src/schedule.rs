//! The learning-rate schedule a config gives, as transformers' schedulers compute it (the
//! `get_scheduler` lambdas): linear, cosine, constant, constant_with_warmup and
//! cosine_with_min_lr, each with linear warm-up. The studio plots it; the engine's optimiser
//! uses the same arithmetic.

use serde_json::Value;

use crate::config::{JobConfig, LrSchedulerType};
use crate::derive::{self, Derived};

/// A schedule over optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedulerType,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// The floor of `cosine_with_min_lr` as a fraction of `base_lr` (0 for the others).
    pub min_lr_rate: f64,
}

impl Schedule {
    /// transformers' multiplier after `current_step` scheduler steps (`LambdaLR`'s lambda).
    pub fn lambda(&self, current_step: u64) -> f64 {
        let step = current_step as f64;
        let warmup = self.warmup_steps as f64;
        let total = self.total_steps as f64;
        let warming_up = current_step < self.warmup_steps;
        let progress = (step - warmup) / (total - warmup).max(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        match self.kind {
            LrSchedulerType::Constant => 1.0,
            _ if warming_up => step / warmup.max(1.0),
            LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            LrSchedulerType::Cosine => cosine.max(0.0),
            LrSchedulerType::CosineWithMinLr => {
                (cosine * (1.0 - self.min_lr_rate) + self.min_lr_rate).max(0.0)
            }
        }
    }

    /// The learning rate used by optimizer step `step` (1-based), as logged in logging.jsonl.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.lambda(step.saturating_sub(1))
    }

    /// Up to `points` evenly spaced `(step, lr)` pairs over the whole run (first and last
    /// step included), for a plot.
    pub fn curve(&self, points: usize) -> Vec<(u64, f64)> {
        let total = self.total_steps;
        if total == 0 || points == 0 {
            return Vec::new();
        }
        let n = (points as u64).min(total).max(1);
        let mut out: Vec<(u64, f64)> = (0..n)
            .map(|i| {
                let step = if n == 1 {
                    1
                } else {
                    1 + (i * (total - 1)) / (n - 1)
                };
                (step, self.lr(step))
            })
            .collect();
        // Warm-up ends in a corner that even spacing can miss; add it.
        let corner = self.warmup_steps + 1;
        if self.warmup_steps > 0 && corner <= total && !out.iter().any(|(s, _)| *s == corner) {
            out.push((corner, self.lr(corner)));
            out.sort_by_key(|(s, _)| *s);
        }
        out
    }
}

/// `min_lr_rate`, or `min_lr` relative to the learning rate, from `lr_scheduler_kwargs`.
pub fn min_lr_rate(kwargs: Option<&str>, learning_rate: f64) -> f64 {
    let Some(Value::Object(map)) = kwargs.and_then(|k| serde_json::from_str::<Value>(k).ok())
    else {
        return 0.0;
    };
    if let Some(rate) = map.get("min_lr_rate").and_then(Value::as_f64) {
        return rate;
    }
    match map.get("min_lr").and_then(Value::as_f64) {
        Some(min_lr) if learning_rate > 0.0 => min_lr / learning_rate,
        _ => 0.0,
    }
}

/// The schedule of a config with its derived figures; `None` while the total steps are unknown
/// (no row count, streaming data).
pub fn schedule(config: &JobConfig, derived: &Derived) -> Option<Schedule> {
    let total_steps = derived.total_steps?;
    let base_lr = derive::learning_rate(config);
    Some(Schedule {
        kind: config.sft.lr_scheduler_type,
        base_lr,
        warmup_steps: derived.warmup_steps.unwrap_or(0),
        total_steps,
        min_lr_rate: min_lr_rate(config.sft.lr_scheduler_kwargs.as_deref(), base_lr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: LrSchedulerType, warmup: u64, total: u64) -> Schedule {
        Schedule {
            kind,
            base_lr: 1e-3,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_rate: 0.0,
        }
    }

    #[test]
    fn lambdas_match_transformers() {
        // transformers' get_cosine_schedule_with_warmup(warmup=2, total=10): lrs of steps 1..3.
        let cosine = s(LrSchedulerType::Cosine, 2, 10);
        let lrs: Vec<f64> = (1..=3).map(|i| cosine.lr(i)).collect();
        assert_eq!(lrs, vec![0.0, 0.0005, 0.001]);
        assert!((cosine.lambda(6) - 0.5).abs() < 1e-12);
        assert!(cosine.lambda(10).abs() < 1e-12);

        let linear = s(LrSchedulerType::Linear, 2, 10);
        assert!((linear.lambda(6) - 0.5).abs() < 1e-12);
        assert_eq!(linear.lambda(12), 0.0);

        assert_eq!(s(LrSchedulerType::Constant, 2, 10).lambda(0), 1.0);
        let cww = s(LrSchedulerType::ConstantWithWarmup, 4, 10);
        assert_eq!(
            (cww.lambda(1), cww.lambda(4), cww.lambda(9)),
            (0.25, 1.0, 1.0)
        );

        let min_lr = Schedule {
            min_lr_rate: min_lr_rate(Some(r#"{"min_lr": 1e-4}"#), 1e-3),
            ..s(LrSchedulerType::CosineWithMinLr, 0, 10)
        };
        assert!((min_lr.lambda(10) - 0.1).abs() < 1e-12);
        assert!((min_lr.lambda(5) - (0.5 * 0.9 + 0.1)).abs() < 1e-12);
        assert_eq!(min_lr_rate(Some(r#"{"min_lr_rate": 0.2}"#), 1e-3), 0.2);
        assert_eq!(min_lr_rate(Some("not json"), 1e-3), 0.0);
    }

    #[test]
    fn curves_span_the_run_and_keep_the_warmup_corner() {
        let cosine = s(LrSchedulerType::Cosine, 4, 39);
        let curve = cosine.curve(16);
        assert_eq!(curve.first().unwrap().0, 1);
        assert_eq!(curve.last().unwrap().0, 39);
        assert!(curve
            .iter()
            .any(|&(s, lr)| s == 5 && (lr - 1e-3).abs() < 1e-15));
        assert!(curve.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(s(LrSchedulerType::Linear, 0, 3).curve(100).len(), 3);
        assert!(s(LrSchedulerType::Linear, 0, 0).curve(100).is_empty());
    }

    #[test]
    fn the_seed_warms_up_for_four_of_39_steps() {
        let config = crate::parse_shell(include_str!("../../examples/seed.sh")).unwrap();
        let derived = crate::derive(
            &config,
            crate::models::lookup("Qwen/Qwen3-30B-A3B-Thinking-2507").as_ref(),
            None,
            crate::gpus::default_gpu(),
        );
        let schedule = schedule(&config, &derived).unwrap();
        assert_eq!((schedule.warmup_steps, schedule.total_steps), (4, 39));
        assert_eq!(schedule.base_lr, 1e-5);
        assert!((schedule.lr(5) - 1e-5).abs() < 1e-20);
    }
}
