//! Evaluation on the validation samples: eval_loss as transformers averages it (each batch's
//! token-mean loss weighted by its rows), eval_token_acc over all label tokens, and
//! eval_exact_match, the share of samples whose whole reply (think block + answer) greedy
//! decoding reproduces — computed teacher-forced, a stricter measure than final-answer match.

use std::time::Instant;

use candle_core::Device;

use super::data::{self, RankShare, Sample};
use super::metrics::{float, round8, round_to, Record};
use crate::grad::{self, LossOptions};
use crate::model::Model;
use crate::sync::GradSync;

pub struct EvalResult {
    pub loss: f64,
    pub token_acc: f64,
    pub exact_match: f64,
    pub runtime: f64,
    pub samples: usize,
    pub batches: usize,
}

impl EvalResult {
    /// The value of `key` (`eval_loss`, `eval_token_acc`, `eval_exact_match`).
    pub fn metric(&self, key: &str) -> f64 {
        match key {
            "eval_token_acc" => self.token_acc,
            "eval_exact_match" => self.exact_match,
            _ => self.loss,
        }
    }

    /// The logging.jsonl eval line, in ms-swift's key order.
    pub fn record(&self, epoch: f64) -> Record {
        let per_second = |n: usize| float(round_to(n as f64 / self.runtime.max(1e-9), 3));
        vec![
            ("eval_loss".into(), float(round8(self.loss))),
            ("eval_token_acc".into(), float(round8(self.token_acc))),
            ("eval_exact_match".into(), float(round8(self.exact_match))),
            ("eval_runtime".into(), float(round_to(self.runtime, 4))),
            ("eval_samples_per_second".into(), per_second(self.samples)),
            ("eval_steps_per_second".into(), per_second(self.batches)),
            ("epoch".into(), float(round8(epoch))),
        ]
    }
}

/// Evaluates `val` (this rank's share) in batches of `batch_size`; sums meet across ranks.
pub fn evaluate(
    model: &Model,
    val: &[Sample],
    batch_size: usize,
    pad_id: u32,
    router_aux_loss_coef: f64,
    sync: &mut dyn GradSync,
) -> anyhow::Result<EvalResult> {
    let started = Instant::now();
    let options = LossOptions {
        router_aux_loss_coef,
        num_label_tokens: None,
        gradient_checkpointing: false,
        dropout_seed: None,
    };
    // weighted loss, correct tokens, label tokens, exact rows, rows, batches
    let mut sums = [0f64; 6];
    let share = RankShare {
        rank: sync.rank(),
        world: sync.world_size(),
    };
    for chunk in share.take(val.chunks(batch_size.max(1))) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let batch =
            data::collate(&refs, pad_id, &Device::Cpu)?.to_device(&model.options().device)?;
        let report = grad::evaluate(model, &batch, &options)?;
        sums[0] += report.loss * chunk.len() as f64;
        sums[1] += report.num_correct_tokens as f64;
        sums[2] += report.num_label_tokens as f64;
        sums[3] += report.num_exact_rows as f64;
        sums[4] += chunk.len() as f64;
        sums[5] += 1.0;
    }
    sync.sum_scalars(&mut sums)?;
    let [weighted_loss, correct, labelled, exact, rows, batches] = sums;
    Ok(EvalResult {
        loss: weighted_loss / rows.max(1.0),
        token_acc: correct / labelled.max(1.0),
        exact_match: exact / rows.max(1.0),
        runtime: started.elapsed().as_secs_f64(),
        samples: rows as usize,
        batches: batches as usize,
    })
}
