//! Forward, loss, backward and gradient reduction over one optimizer step's micro-batches.
//!
//! Loss with accumulation: the cross-entropy of every micro-batch is divided by the number of
//! label tokens of the WHOLE accumulated batch over all ranks (counted first and summed through
//! the [`GradSync`]), so the step's loss is the token mean over the window, as transformers
//! computes it with `num_items_in_batch`. The MoE aux loss enters each micro-batch as
//! `coef * aux / (micro-batches * ranks)`, so a step differentiates
//! `ce_token_mean + coef * mean(aux over micro-batches)`: with one micro-batch this is exactly
//! transformers' loss, and the coefficient means the same whatever the accumulation (transformers
//! adds the full `coef * aux` of every micro-batch, scaling it by the accumulation count).

use std::ops::Range;

use candle_core::DType;

use crate::grad::{self, Batch, Gradients, LayerHooks, LossOptions};
use crate::model::lora::step_dropout_seed;
use crate::model::Model;
use crate::sync::{GradSync, MicroBatch};

/// The scalar results of one optimizer step's forward passes, summed over ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepLoss {
    pub loss: f64,
    pub aux_loss: f64,
    pub label_tokens: u64,
    pub correct_tokens: u64,
    pub input_tokens: u64,
    pub padded_tokens: u64,
    pub samples: u64,
}

impl StepLoss {
    fn to_array(self) -> [f64; 7] {
        [
            self.loss,
            self.aux_loss,
            self.label_tokens as f64,
            self.correct_tokens as f64,
            self.input_tokens as f64,
            self.padded_tokens as f64,
            self.samples as f64,
        ]
    }

    fn from_array(v: [f64; 7]) -> Self {
        Self {
            loss: v[0],
            aux_loss: v[1],
            label_tokens: v[2] as u64,
            correct_tokens: v[3] as u64,
            input_tokens: v[4] as u64,
            padded_tokens: v[5] as u64,
            samples: v[6] as u64,
        }
    }
}

/// The backward walk's hooks, forwarded to the synchroniser with the layer's parameters.
struct SyncHooks<'a> {
    sync: &'a mut dyn GradSync,
    model: &'a Model,
    micro_batch: MicroBatch,
}

impl LayerHooks for SyncHooks<'_> {
    fn gather(&mut self, params: Range<usize>) -> candle_core::Result<()> {
        self.sync.gather(self.model.trainable(), params)
    }

    fn release(&mut self, params: Range<usize>) -> candle_core::Result<()> {
        self.sync.release(self.model.trainable(), params)
    }

    fn layer_ready(&mut self, layer: usize, grads: &mut Gradients) -> candle_core::Result<()> {
        self.sync
            .layer_ready(grads, self.model.layer_parameters(layer), self.micro_batch)
    }
}

/// Label tokens of a batch after the causal shift.
pub fn count_label_tokens(batch: &Batch) -> candle_core::Result<u64> {
    let (_, seq) = batch.labels.dims2()?;
    let shifted = batch.labels.narrow(1, 1, seq.saturating_sub(1))?;
    Ok(shifted
        .ge(0i64)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as u64)
}

/// What one step's forward passes do besides reading the data.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions {
    pub router_aux_loss_coef: f64,
    pub gradient_checkpointing: bool,
    /// `(--seed, global step)`, from which each micro-batch's LoRA dropout masks are drawn.
    pub dropout: Option<(u64, u64)>,
}

/// Forward, loss and backward of every micro-batch of the window; `sync` is told of each
/// decoder layer's gradients as backward produces them and finishes the reduction at the end.
pub fn forward_backward(
    model: &Model,
    micro_batches: &[Batch],
    step_options: StepOptions,
    sync: &mut dyn GradSync,
) -> anyhow::Result<(StepLoss, Gradients)> {
    let StepOptions {
        router_aux_loss_coef,
        gradient_checkpointing,
        dropout,
    } = step_options;
    let mut label_tokens = [0f64];
    for batch in micro_batches {
        label_tokens[0] += count_label_tokens(batch)? as f64;
    }
    sync.sum_scalars(&mut label_tokens)?;
    let (rank, world) = (sync.rank(), sync.world_size());
    let shares = (micro_batches.len().max(1) * world) as f64;
    let options = LossOptions {
        router_aux_loss_coef: router_aux_loss_coef / shares,
        num_label_tokens: Some(label_tokens[0] as usize),
        gradient_checkpointing,
        dropout_seed: None,
    };

    let mut step = StepLoss::default();
    let mut grads = Gradients::empty(model.trainable());
    for (index, batch) in micro_batches.iter().enumerate() {
        let micro_batch = MicroBatch {
            index,
            count: micro_batches.len(),
        };
        let mut hooks = SyncHooks {
            sync: &mut *sync,
            model,
            micro_batch,
        };
        // Each rank's micro-batch has its own masks: numbered as in the window of all ranks.
        let global_index = index * world + rank;
        let options = LossOptions {
            dropout_seed: dropout.map(|(seed, step)| step_dropout_seed(seed, step, global_index)),
            ..options
        };
        let report = grad::backward(model, batch, &options, &mut grads, &mut hooks)?;
        step.loss += report.loss;
        step.aux_loss += report.aux_loss.unwrap_or(0.0) / shares;
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
    sync.finish(&mut grads)?;
    let mut totals = step.to_array();
    sync.sum_scalars(&mut totals)?;
    Ok((StepLoss::from_array(totals), grads))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::Device;
    use serde_json::Value;

    use super::*;
    use crate::model::ModelOptions;
    use crate::sync::SingleProcess;
    use crate::train::data::{self, Sample};

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

    /// Records which layer hooks ran, in order, for which micro-batch.
    struct Recorder {
        inner: SingleProcess,
        calls: Vec<(usize, std::ops::Range<usize>, MicroBatch)>,
        finished: usize,
    }

    impl GradSync for Recorder {
        fn world_size(&self) -> usize {
            1
        }
        fn owned(&self) -> std::ops::Range<usize> {
            self.inner.owned()
        }
        fn layer_ready(
            &mut self,
            grads: &mut Gradients,
            params: std::ops::Range<usize>,
            micro_batch: MicroBatch,
        ) -> candle_core::Result<()> {
            // The layer's gradients are there when the hook runs.
            let present = params.clone().filter(|&i| grads.get(i).is_some()).count();
            self.calls.push((present, params, micro_batch));
            Ok(())
        }
        fn finish(&mut self, _: &mut Gradients) -> candle_core::Result<()> {
            self.finished += 1;
            Ok(())
        }
        fn sum_scalars(&mut self, _: &mut [f64]) -> candle_core::Result<()> {
            Ok(())
        }
    }

    /// Accumulating three micro-batches of one sample gives the token mean over all 121 label
    /// tokens — the same loss and gradients as one batch of three — and the aux loss enters as
    /// the mean over micro-batches, so one micro-batch reproduces transformers' total loss.
    /// The synchroniser hears of every layer, top first, in both backward paths.
    #[test]
    fn accumulated_loss_is_the_token_mean_over_the_whole_window() {
        let model = crate::model::Model::from_pretrained(
            fixture_dir().join("moe"),
            ModelOptions::default(),
        )
        .unwrap();
        let samples = fixture_samples();
        let pad = 507;
        let whole =
            vec![data::collate(&samples.iter().collect::<Vec<_>>(), pad, &Device::Cpu).unwrap()];
        let split: Vec<Batch> = samples
            .iter()
            .map(|s| data::collate(&[s], pad, &Device::Cpu).unwrap())
            .collect();
        let mut single = SingleProcess::new(model.trainable().num_elements());

        // transformers: ce 6.322655 + 0.001 * aux 2.101774 = 6.324757 on the whole batch.
        let (one, _) = forward_backward(
            &model,
            &whole,
            StepOptions {
                router_aux_loss_coef: 0.001,
                gradient_checkpointing: false,
                dropout: None,
            },
            &mut single,
        )
        .unwrap();
        assert!((one.loss - 6.324756622314453).abs() < 6e-5, "{}", one.loss);
        assert!((one.aux_loss - 2.1017744541168213).abs() < 2e-5);
        assert_eq!(one.label_tokens, 121);

        let (one, whole_grads) = forward_backward(
            &model,
            &whole,
            StepOptions {
                router_aux_loss_coef: 0.0,
                gradient_checkpointing: true,
                dropout: None,
            },
            &mut single,
        )
        .unwrap();
        let mut recorder = Recorder {
            inner: single.clone(),
            calls: Vec::new(),
            finished: 0,
        };
        let (three, split_grads) = forward_backward(
            &model,
            &split,
            StepOptions {
                router_aux_loss_coef: 0.0,
                gradient_checkpointing: false,
                dropout: None,
            },
            &mut recorder,
        )
        .unwrap();
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

        let layers = model.layers().len();
        assert_eq!(recorder.calls.len(), 3 * layers);
        assert_eq!(recorder.finished, 1);
        for (k, (present, params, micro_batch)) in recorder.calls.iter().enumerate() {
            let layer = layers - 1 - k % layers;
            assert_eq!(*params, model.layer_parameters(layer));
            assert_eq!(*present, params.len(), "layer {layer}'s gradients are in");
            assert_eq!(micro_batch.index, k / layers);
            assert_eq!(micro_batch.is_last(), k / layers == 2);
        }
    }
}
