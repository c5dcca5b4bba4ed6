//! The loss of a batch and its gradients with respect to every parameter, computed either in
//! one backward pass or with gradient checkpointing (each decoder layer recomputed during the
//! backward pass, so only the layer boundaries are kept alive).
//!
//! The loss is transformers' causal-LM loss (a token mean over the whole batch, or over a larger
//! accumulated batch when `num_label_tokens` says so) plus, for MoE models, the router
//! load-balancing loss times its coefficient.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::model::qwen3::router_aux_loss;
use crate::model::{Model, ModelConfig};
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
}

impl LossOptions {
    /// The model's own defaults: its config's aux-loss coefficient, no checkpointing.
    pub fn for_model(config: &ModelConfig) -> Self {
        Self {
            router_aux_loss_coef: config.moe.as_ref().map_or(0.0, |m| m.router_aux_loss_coef),
            num_label_tokens: None,
            gradient_checkpointing: false,
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

/// Gradients of the parameters a model lists, by position in [`Model::parameters`]; `None`
/// where no gradient reached a parameter.
#[derive(Debug, Clone)]
pub struct Gradients {
    entries: Vec<(String, Option<Tensor>)>,
}

impl Gradients {
    /// No gradient yet for any of `params`.
    pub fn empty(params: &[(String, Var)]) -> Self {
        Self {
            entries: params
                .iter()
                .map(|(name, _)| (name.clone(), None))
                .collect(),
        }
    }

    /// Adds the gradients that `store` holds for `params` (which must be the list this was made
    /// for); the rest of the store (activations' gradients) is dropped with it.
    pub fn add_from_store(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        for ((_, var), (_, slot)) in params.iter().zip(self.entries.iter_mut()) {
            if let Some(grad) = store.get(var.as_tensor()) {
                let grad = grad.detach();
                *slot = Some(match slot.take() {
                    Some(existing) => (existing + grad)?,
                    None => grad,
                });
            }
        }
        Ok(())
    }

    /// Adds another set of gradients for the same parameters (gradient accumulation).
    pub fn accumulate(&mut self, other: &Gradients) -> Result<()> {
        for ((_, mine), (_, theirs)) in self.entries.iter_mut().zip(&other.entries) {
            if let Some(theirs) = theirs {
                *mine = Some(match mine.take() {
                    Some(existing) => (existing + theirs)?,
                    None => theirs.clone(),
                });
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for (_, grad) in &mut self.entries {
            if let Some(g) = grad.take() {
                *grad = Some((g * factor)?);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many parameters received a gradient.
    pub fn num_present(&self) -> usize {
        self.entries.iter().filter(|(_, g)| g.is_some()).count()
    }

    pub fn get(&self, index: usize) -> Option<&Tensor> {
        self.entries.get(index).and_then(|(_, g)| g.as_ref())
    }

    pub fn get_by_name(&self, name: &str) -> Option<&Tensor> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, g)| g.as_ref())
    }

    pub fn name(&self, index: usize) -> &str {
        &self.entries[index].0
    }

    /// `(name, gradient)` in parameter order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&Tensor>)> {
        self.entries.iter().map(|(n, g)| (n.as_str(), g.as_ref()))
    }

    /// Replaces the gradient at `index`.
    pub fn set(&mut self, index: usize, grad: Option<Tensor>) {
        self.entries[index].1 = grad;
    }
}

/// The differentiable total loss and its parts.
struct LossTerms {
    total: Tensor,
    report: LossReport,
}

fn loss_terms(
    logits: &Tensor,
    router_logits: &[Tensor],
    batch: &Batch,
    model: &Model,
    options: &LossOptions,
) -> Result<LossTerms> {
    let ce = ops::causal_lm_cross_entropy_sum(logits, &batch.labels)?;
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
        num_correct_tokens: ops::causal_lm_correct_tokens(logits, &batch.labels)?,
        num_exact_rows: ops::causal_lm_exact_rows(logits, &batch.labels)?,
    };
    Ok(LossTerms { total, report })
}

/// The loss of `batch` without gradients (evaluation).
pub fn evaluate(model: &Model, batch: &Batch, options: &LossOptions) -> Result<LossReport> {
    let out = model.forward(&batch.input_ids, &batch.attention_mask)?;
    Ok(loss_terms(&out.logits, &out.router_logits, batch, model, options)?.report)
}

/// The loss of `batch` and the gradient of it with respect to every parameter of `model`.
pub fn loss_and_gradients(
    model: &Model,
    batch: &Batch,
    options: &LossOptions,
) -> Result<(LossReport, Gradients)> {
    if options.gradient_checkpointing {
        return checkpointed_loss_and_gradients(model, batch, options);
    }
    let out = model.forward(&batch.input_ids, &batch.attention_mask)?;
    let terms = loss_terms(&out.logits, &out.router_logits, batch, model, options)?;
    let store = terms.total.backward()?;
    let mut grads = Gradients::empty(model.parameters());
    grads.add_from_store(model.parameters(), &store)?;
    Ok((terms.report, grads))
}

/// Gradient checkpointing per decoder layer. The forward pass keeps only each layer's
/// (detached) input; the backward pass then walks the layers in reverse, recomputing one layer
/// at a time from its saved input and injecting the upstream gradient `g` through the surrogate
/// `sum(out * g)`, whose gradient with respect to `out` is exactly `g`.
fn checkpointed_loss_and_gradients(
    model: &Model,
    batch: &Batch,
    options: &LossOptions,
) -> Result<(LossReport, Gradients)> {
    let params = model.parameters();
    let ctx = model.context(&batch.attention_mask)?;

    let mut layer_inputs = vec![model.embed(&batch.input_ids)?.detach()];
    let mut router_logits = Vec::new();
    for layer in model.layers() {
        let x = layer_inputs.last().expect("starts with the embeddings");
        let (out, logits) = layer.forward(x, &ctx)?;
        // Layer i's router logits stay in the loss only as leaves; their gradient is injected
        // when layer i is recomputed.
        router_logits.push(logits.map(|l| Var::from_tensor(&l.detach())).transpose()?);
        layer_inputs.push(out.detach());
    }

    let final_hidden = Var::from_tensor(layer_inputs.last().expect("at least the embeddings"))?;
    let logits = model.head(final_hidden.as_tensor())?;
    let router_leaves: Vec<Tensor> = router_logits
        .iter()
        .flatten()
        .map(|v| v.as_tensor().clone())
        .collect();
    let terms = loss_terms(&logits, &router_leaves, batch, model, options)?;
    let store = terms.total.backward()?;
    let mut grads = Gradients::empty(params);
    grads.add_from_store(params, &store)?;
    let mut upstream = store
        .get(final_hidden.as_tensor())
        .expect("the loss depends on the last hidden state")
        .detach();
    let router_upstream: Vec<Option<Tensor>> = router_logits
        .iter()
        .map(|leaf| {
            leaf.as_ref()
                .and_then(|l| store.get(l.as_tensor()))
                .map(Tensor::detach)
        })
        .collect();
    drop(store);

    for (i, layer) in model.layers().iter().enumerate().rev() {
        let input = Var::from_tensor(&layer_inputs[i])?;
        let (out, logits) = layer.forward(input.as_tensor(), &ctx)?;
        let mut surrogate = (out * &upstream)?.sum_all()?;
        if let (Some(logits), Some(g)) = (logits, &router_upstream[i]) {
            surrogate = (surrogate + (logits * g)?.sum_all()?)?;
        }
        let store = surrogate.backward()?;
        grads.add_from_store(params, &store)?;
        upstream = store
            .get(input.as_tensor())
            .expect("a layer's output depends on its input")
            .detach();
    }

    let embedded = model.embed(&batch.input_ids)?;
    let store = (embedded * &upstream)?.sum_all()?.backward()?;
    grads.add_from_store(params, &store)?;
    Ok((terms.report, grads))
}
