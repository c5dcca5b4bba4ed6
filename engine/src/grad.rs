//! The loss of a batch and its gradients with respect to every trainable parameter, walked
//! layer by layer in the backward pass — with every layer's activations kept, or with gradient
//! checkpointing (each decoder layer recomputed just before its backward, so only the layer
//! boundaries are kept alive) — so that gradient synchronisation can start on a layer as soon
//! as its gradients exist.
//!
//! The loss is transformers' causal-LM loss (a token mean over the whole batch, or over a larger
//! accumulated batch when `num_label_tokens` says so) plus, for MoE models, the router
//! load-balancing loss times its coefficient.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

use crate::model::qwen3::router_aux_loss;
use crate::model::{FlatLayout, Model, ModelConfig, TrainableParams};
use crate::ops;

/// One padded training batch, all (batch, seq).
#[derive(Debug, Clone)]
pub struct Batch {
    /// u32 token ids.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding (any int dtype).
    pub attention_mask: Tensor,
    /// i64 target ids, -100 where no loss is taken; not shifted (the loss shifts them).
    pub labels: Tensor,
}

impl Batch {
    /// The batch on `device` (batches are collated on the CPU, then moved in the loop).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Batch> {
        Ok(Batch {
            input_ids: self.input_ids.to_device(device)?,
            attention_mask: self.attention_mask.to_device(device)?,
            labels: self.labels.to_device(device)?,
        })
    }
}

/// How a batch's loss is formed and its gradients computed.
#[derive(Debug, Clone, Copy)]
pub struct LossOptions {
    /// Weight of the MoE router load-balancing loss; 0 leaves it out.
    pub router_aux_loss_coef: f64,
    /// Divide the summed token losses by this instead of the batch's own label count, so that
    /// gradient accumulation over micro-batches yields the mean over the whole accumulated batch.
    pub num_label_tokens: Option<usize>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// While training: the micro-batch's LoRA dropout seed (None: no dropout, as in eval).
    pub dropout_seed: Option<u64>,
}

impl LossOptions {
    /// The model's own defaults: its config's aux-loss coefficient, no checkpointing.
    pub fn for_model(config: &ModelConfig) -> Self {
        Self {
            router_aux_loss_coef: config.moe.as_ref().map_or(0.0, |m| m.router_aux_loss_coef),
            num_label_tokens: None,
            gradient_checkpointing: false,
            dropout_seed: None,
        }
    }
}

/// The scalar results of a forward pass over a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    /// What was differentiated: `ce_loss + coef * aux_loss`.
    pub loss: f64,
    pub ce_loss: f64,
    /// The router load-balancing loss (MoE models only), before the coefficient.
    pub aux_loss: Option<f64>,
    /// Label tokens of this batch (after the shift).
    pub num_label_tokens: usize,
    /// Label tokens the argmax of the logits predicts right (token accuracy's numerator).
    pub num_correct_tokens: usize,
    /// Rows whose every label token is predicted right: greedy decoding reproduces their reply.
    pub num_exact_rows: usize,
}

/// Gradients of a model's trainable parameters, by position in
/// [`Model::trainable_parameters`]; `None` where no gradient reached a parameter.
///
/// [`Gradients::scale`] is lazy: the factor is kept beside the unscaled gradients, and a
/// scaled gradient is computed the first time [`Gradients::get`] asks for it. The CPU AdamW
/// step reads the unscaled ones and multiplies as it goes, so clipping costs no pass of its own.
#[derive(Debug, Clone)]
pub struct Gradients {
    names: Arc<[String]>,
    layout: Arc<FlatLayout>,
    grads: Vec<Option<Tensor>>,
    /// The factor `scale` asked for, not yet multiplied into `grads`.
    factor: Option<f32>,
    /// `grads[i] * factor`, once read.
    scaled: Vec<OnceLock<Tensor>>,
}

impl Gradients {
    /// No gradient yet for any of `params`.
    pub fn empty(params: &TrainableParams) -> Self {
        Self {
            names: params.names().clone(),
            layout: params.layout().clone(),
            grads: vec![None; params.len()],
            factor: None,
            scaled: vec![OnceLock::new(); params.len()],
        }
    }

    fn add(&mut self, index: usize, grad: Tensor) -> Result<()> {
        self.apply_scale()?;
        let slot = &mut self.grads[index];
        *slot = Some(match slot.take() {
            Some(existing) => (existing + grad)?,
            None => grad,
        });
        Ok(())
    }

    /// Adds the gradients `store` holds for the parameters with the given indices; the rest of
    /// the store (activations' gradients) is dropped with it.
    pub fn add_from_store(
        &mut self,
        params: &TrainableParams,
        indices: impl IntoIterator<Item = usize>,
        store: &GradStore,
    ) -> Result<()> {
        for i in indices {
            if let Some(grad) = store.get(params.as_slice()[i].1.as_tensor()) {
                self.add(i, grad.detach())?;
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor` (rounded to f32), lazily: see [`Gradients`].
    pub fn scale(&mut self, factor: f32) -> Result<()> {
        self.apply_scale()?;
        self.factor = Some(factor);
        Ok(())
    }

    /// `g * factor` as candle computes it (`affine(factor, 0)` in g's dtype).
    fn scaled_by(grad: &Tensor, factor: f32) -> Result<Tensor> {
        grad * f64::from(factor)
    }

    /// Multiplies a pending factor into every gradient now.
    fn apply_scale(&mut self) -> Result<()> {
        let Some(factor) = self.factor.take() else {
            return Ok(());
        };
        for (grad, scaled) in self.grads.iter_mut().zip(&mut self.scaled) {
            if let Some(g) = grad.take() {
                *grad = Some(match scaled.take() {
                    Some(done) => done,
                    None => Self::scaled_by(&g, factor)?,
                });
            }
        }
        Ok(())
    }

    /// The sum of squared gradient elements inside `range` of the flat space, in f64 (missing
    /// gradients count as zero), summed parameter by parameter in order.
    pub fn sum_of_squares(&self, range: Range<usize>) -> Result<f64> {
        if crate::cuda::kernels_enabled() {
            if let Some(sum) = self.sum_of_squares_in_one_launch(range.clone())? {
                return Ok(sum);
            }
        }
        let mut sum = 0f64;
        // On a GPU the per-parameter sums stay there and are read back once, at the end.
        let mut on_device: Option<Tensor> = None;
        for piece in self.layout.pieces(range) {
            let Some(grad) = self.try_get(piece.param)? else {
                continue;
            };
            let flat = grad.flatten_all()?;
            let part = if piece.within.len() == flat.elem_count() {
                flat
            } else {
                flat.narrow(0, piece.within.start, piece.within.len())?
            };
            match crate::cuda::sum_of_squares(&part)? {
                Some(part) => {
                    on_device = Some(match on_device {
                        Some(acc) => (acc + part)?,
                        None => part,
                    })
                }
                None => sum += sum_of_squares(&part)?,
            }
        }
        if let Some(device_sum) = on_device {
            sum += device_sum.to_scalar::<f64>()?;
        }
        Ok(sum)
    }

    /// [`Gradients::sum_of_squares`] as one multi-tensor launch, when every gradient in the
    /// range is f32 on a GPU (whet's CUDA kernels on); None otherwise.
    fn sum_of_squares_in_one_launch(&self, range: Range<usize>) -> Result<Option<f64>> {
        let mut parts = Vec::new();
        for piece in self.layout.pieces(range) {
            let Some(grad) = &self.grads[piece.param] else {
                continue;
            };
            if grad.dtype() != DType::F32 || !grad.device().is_cuda() {
                return Ok(None);
            }
            let flat = grad.flatten_all()?;
            parts.push(
                flat.narrow(0, piece.within.start, piece.within.len())?
                    .contiguous()?,
            );
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        match crate::cuda::sum_of_squares_multi(&refs)? {
            Some(sum) => Ok(Some(sum.to_scalar::<f64>()?)),
            None => Ok(None),
        }
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// How many parameters received a gradient.
    pub fn num_present(&self) -> usize {
        self.grads.iter().filter(|g| g.is_some()).count()
    }

    /// The gradient at `index`, scaled (computed here the first time after a `scale`).
    ///
    /// # Panics
    /// If that multiplication fails, which only an out-of-memory device does.
    pub fn get(&self, index: usize) -> Option<&Tensor> {
        self.try_get(index).expect("scaling a gradient")
    }

    fn try_get(&self, index: usize) -> Result<Option<&Tensor>> {
        let Some(grad) = self.grads.get(index).and_then(Option::as_ref) else {
            return Ok(None);
        };
        let Some(factor) = self.factor else {
            return Ok(Some(grad));
        };
        let scaled = &self.scaled[index];
        if scaled.get().is_none() {
            // Another thread may win the race; both computed the same tensor.
            let _ = scaled.set(Self::scaled_by(grad, factor)?);
        }
        Ok(scaled.get())
    }

    /// The gradient at `index` before a pending [`Gradients::scale`], and that factor: for a
    /// reader that multiplies as it goes. `g * factor + 0.0` in f32 is what `get` returns for
    /// an f32 gradient.
    pub fn unscaled(&self, index: usize) -> (Option<&Tensor>, Option<f32>) {
        (self.grads.get(index).and_then(Option::as_ref), self.factor)
    }

    pub fn get_by_name(&self, name: &str) -> Option<&Tensor> {
        let index = self.names.iter().position(|n| n == name)?;
        self.get(index)
    }

    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    /// `(name, gradient)` in parameter order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&Tensor>)> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), self.get(i)))
    }

    /// Replaces the gradient at `index` (the unscaled one, if a `scale` is pending).
    pub fn set(&mut self, index: usize, grad: Option<Tensor>) {
        self.scaled[index].take();
        self.grads[index] = grad;
    }
}

/// `sum(x^2)` in f64: [`squares_f32`] over a contiguous f32 CPU tensor, else the tensor form
/// (the same f64 squares, added in another order: equal to rounding, not bit for bit).
fn sum_of_squares(x: &Tensor) -> Result<f64> {
    if x.dtype() == DType::F32 && x.is_contiguous() {
        let squares = ops::with_cpu_slice(x, squares_f32)?;
        if let Some(squares) = squares {
            return Ok(squares);
        }
    }
    x.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// `Σ v²` in f64 over blocks of a size fixed by the length alone, in parallel, each in 16
/// lanes; the block sums are added in order, so the result does not depend on the thread count.
/// One f64 chain over the whole gradient would be bound by the add's latency, on one core.
fn squares_f32(xs: &[f32]) -> f64 {
    use rayon::prelude::*;
    const LANES: usize = 16;
    let block_sum = |block: &[f32]| {
        let mut lanes = [0f64; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f64::from(v) * f64::from(v);
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        lanes.iter().sum::<f64>() + tail
    };
    let sums: Vec<f64> = xs.par_chunks(1 << 16).map(block_sum).collect();
    sums.iter().sum()
}

/// The differentiable total loss and its parts.
struct LossTerms {
    total: Tensor,
    report: LossReport,
}

fn loss_terms(
    head: ops::HeadLoss,
    router_logits: &[Tensor],
    batch: &Batch,
    model: &Model,
    options: &LossOptions,
) -> Result<LossTerms> {
    let ce = head.ce;
    let denominator = options.num_label_tokens.unwrap_or(ce.num_tokens).max(1);
    let ce_loss = (ce.sum / denominator as f64)?;
    let moe = model.config().moe.as_ref();
    let aux = match moe {
        Some(moe) if !router_logits.is_empty() => Some(router_aux_loss(
            router_logits,
            &batch.attention_mask,
            moe.num_experts_per_tok,
        )?),
        _ => None,
    };
    let total = match &aux {
        Some(aux) if options.router_aux_loss_coef != 0.0 => {
            (&ce_loss + (aux * options.router_aux_loss_coef)?)?
        }
        _ => ce_loss.clone(),
    };
    let report = LossReport {
        loss: total
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?,
        ce_loss: ce_loss
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?,
        aux_loss: match aux {
            Some(a) => Some(a.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?),
            None => None,
        },
        num_label_tokens: ce.num_tokens,
        num_correct_tokens: head.num_correct_tokens,
        num_exact_rows: head.num_exact_rows,
    };
    Ok(LossTerms { total, report })
}

/// The loss of `batch` without gradients (evaluation).
pub fn evaluate(model: &Model, batch: &Batch, options: &LossOptions) -> Result<LossReport> {
    let (hidden, router_logits) = model.forward_hidden(&batch.input_ids, &batch.attention_mask)?;
    let head = model.head_loss(&hidden, &batch.labels, false)?;
    Ok(loss_terms(head, &router_logits, batch, model, options)?.report)
}

/// What a backward walk tells its caller as it goes, decoder layer by decoder layer.
pub trait LayerHooks {
    /// The trainable parameters with indices `params` are about to be read (a decoder layer
    /// for its forward, recompute or backward; the embeddings; the head): ZeRO-3 gathers them.
    fn gather(&mut self, _params: Range<usize>) -> Result<()> {
        Ok(())
    }

    /// The parameters `params` are not read again before the next `gather`.
    fn release(&mut self, _params: Range<usize>) -> Result<()> {
        Ok(())
    }

    /// Decoder layer `layer`'s gradients have just been added to `grads`.
    fn layer_ready(&mut self, layer: usize, grads: &mut Gradients) -> Result<()>;
}

/// No hooks: one process computing gradients.
pub struct NoHooks;

impl LayerHooks for NoHooks {
    fn layer_ready(&mut self, _: usize, _: &mut Gradients) -> Result<()> {
        Ok(())
    }
}

/// The loss of `batch` and its gradient with respect to every trainable parameter of `model`.
pub fn loss_and_gradients(
    model: &Model,
    batch: &Batch,
    options: &LossOptions,
) -> Result<(LossReport, Gradients)> {
    let mut grads = Gradients::empty(model.trainable());
    let report = backward(model, batch, options, &mut grads, &mut NoHooks)?;
    Ok((report, grads))
}

/// One decoder layer's output during a backward walk: kept with its graph, or recomputed.
struct LayerRecord {
    /// The layer's input, a leaf: its gradient is the upstream gradient of the layer below.
    input: Var,
    /// Output and router logits with their graph (None under gradient checkpointing).
    kept: Option<(Tensor, Option<Tensor>)>,
    /// The router logits as a leaf in the loss, whose gradient is injected into the layer.
    router_leaf: Option<Var>,
}

/// Forward and backward of one batch, layer by layer: adds the batch's gradients to `grads`
/// and calls `hooks.layer_ready(i, grads)` as soon as decoder layer i's are in (the last layer
/// first). Every trainable weight is read only between a `gather` and a `release` of it: a
/// layer's around its forward and again around its backward, the embeddings' around the lookup
/// and its backward, the head's (with the embeddings when tied) around the loss and its backward.
///
/// Each layer's input is a leaf, so the loss's backward stops at the last layer; then each layer
/// is differentiated on its own, from the top, by injecting the upstream gradient `g` through
/// a surrogate scalar whose gradient with respect to `out` is exactly `g` (`ops::seeded`). The plain
/// path keeps every layer's graph; gradient checkpointing keeps only the layer inputs and
/// recomputes each layer just before its backward.
pub fn backward(
    model: &Model,
    batch: &Batch,
    options: &LossOptions,
    grads: &mut Gradients,
    hooks: &mut dyn LayerHooks,
) -> Result<LossReport> {
    let params = model.trainable();
    let ctx = model
        .context(&batch.attention_mask)?
        .with_lora_dropout(options.dropout_seed);
    let embeddings = params.before_layers();
    hooks.gather(embeddings.clone())?;
    let embedded = model.embed(&batch.input_ids)?;
    hooks.release(embeddings.clone())?;

    let mut records = Vec::with_capacity(model.layers().len());
    let mut x = Var::from_tensor(&embedded.detach())?;
    for (i, layer) in model.layers().iter().enumerate() {
        hooks.gather(params.layer(i))?;
        let (out, logits) = layer.forward(x.as_tensor(), &ctx)?;
        hooks.release(params.layer(i))?;
        let router_leaf = logits
            .as_ref()
            .map(|l| Var::from_tensor(&l.detach()))
            .transpose()?;
        let next = Var::from_tensor(&out.detach())?;
        let kept = (!options.gradient_checkpointing).then_some((out, logits));
        records.push(LayerRecord {
            input: x,
            kept,
            router_leaf,
        });
        x = next;
    }

    // A tied output projection is the embedding table.
    let mut head = vec![params.after_layers()];
    if model.config().tie_word_embeddings {
        head.push(embeddings.clone());
    }
    for range in &head {
        hooks.gather(range.clone())?;
    }
    let head_loss = model.head_loss(x.as_tensor(), &batch.labels, true)?;
    let router_leaves: Vec<Tensor> = records
        .iter()
        .filter_map(|r| r.router_leaf.as_ref().map(|v| v.as_tensor().clone()))
        .collect();
    let terms = loss_terms(head_loss, &router_leaves, batch, model, options)?;
    let store = terms.total.backward()?;
    for range in head {
        hooks.release(range)?;
    }
    grads.add_from_store(params, params.outside_layers(), &store)?;
    let mut upstream = store
        .get(x.as_tensor())
        .expect("the loss depends on the last hidden state")
        .detach();
    let router_upstream: Vec<Option<Tensor>> = records
        .iter()
        .map(|r| {
            r.router_leaf
                .as_ref()
                .and_then(|l| store.get(l.as_tensor()))
                .map(Tensor::detach)
        })
        .collect();
    drop(store);

    for (i, layer) in model.layers().iter().enumerate().rev() {
        let record = &mut records[i];
        hooks.gather(params.layer(i))?;
        let (out, logits) = match record.kept.take() {
            Some(kept) => kept,
            None => layer.forward(record.input.as_tensor(), &ctx)?,
        };
        let mut surrogate = ops::seeded(&out, &upstream)?;
        if let (Some(logits), Some(g)) = (logits, &router_upstream[i]) {
            surrogate = (surrogate + ops::seeded(&logits, g)?)?;
        }
        let store = surrogate.backward()?;
        grads.add_from_store(params, params.layer(i), &store)?;
        upstream = store
            .get(record.input.as_tensor())
            .expect("a layer's output depends on its input")
            .detach();
        drop(store);
        hooks.release(params.layer(i))?;
        hooks.layer_ready(i, grads)?;
    }

    if !embeddings.is_empty() {
        hooks.gather(embeddings.clone())?;
        let store = ops::seeded(&embedded, &upstream)?.backward()?;
        hooks.release(embeddings.clone())?;
        grads.add_from_store(params, embeddings, &store)?;
    }
    Ok(terms.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over several blocks and a tail: the lane sums agree with one f64 chain, do not depend on
    /// the thread count, and the tensor entry point agrees with the composed f64 form.
    #[test]
    fn the_squared_norm_in_lanes_matches_one_chain() {
        let n = 3 * (1 << 16) + 1000 + 7;
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let chain = xs
            .iter()
            .fold(0f64, |acc, &v| acc + f64::from(v) * f64::from(v));
        let lanes = squares_f32(&xs);
        assert!((lanes - chain).abs() <= 1e-12 * chain, "{lanes} vs {chain}");
        // Bit for bit the same on any number of threads (exact resume across machines).
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let on_pool = pool.install(|| squares_f32(&xs));
            assert_eq!(on_pool.to_bits(), lanes.to_bits(), "{threads} threads");
        }
        let t = Tensor::from_vec(xs, n, &candle_core::Device::Cpu).unwrap();
        let composed = t
            .to_dtype(DType::F64)
            .and_then(|t| t.sqr()?.sum_all()?.to_scalar::<f64>())
            .unwrap();
        let got = sum_of_squares(&t).unwrap();
        assert!(
            (got - composed).abs() <= 1e-12 * composed,
            "{got} vs {composed}"
        );
    }
}
