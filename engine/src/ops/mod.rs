//! Differentiable building blocks composed from candle-core ops that have a backward pass.
//!
//! candle-nn's fused kernels (`ops::rms_norm`, `rotary_emb::rope`, `softmax_last_dim`, `sdpa`)
//! have no backward and silently cut the graph, so the model uses these instead. Each op here
//! is checked against central finite differences in f64 (tests at the bottom); nothing else in
//! the crate should compute a normalisation, softmax, rotation or loss by hand.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor, WithDType, D};

mod attention;
mod fused;
mod head_loss;
mod heads;
mod linear;
mod moe;
mod upstream;

#[cfg(feature = "cuda")]
pub(crate) use attention::Dims as AttentionDims;
pub use attention::{causal_attention, AttentionMask, CausalAttention};
pub use head_loss::fused_head_loss;
pub use moe::ExpertRows;
pub use upstream::seeded;

/// Whether the CPU runs the fused ops (on by default); off, every op takes its composed form,
/// which `whet bench train --fused false` measures against.
static FUSED: AtomicBool = AtomicBool::new(true);

/// Turns the fused CPU ops on or off for the whole process.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

/// Whether the fused CPU ops are on.
pub fn fused() -> bool {
    FUSED.load(Ordering::Relaxed)
}

/// Whether `x` goes through a fused CPU op: on, on the CPU, in f32 or f64.
fn fused_on(x: &Tensor) -> bool {
    fused() && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether `x` may go through whet's CUDA kernels: on a GPU, with `WHET_CUDA_KERNELS=1`
/// ([`crate::cuda::kernels_enabled`]). The kernel itself still declines a dtype or shape it
/// does not take, and the composed form runs.
fn kernels_on(x: &Tensor) -> bool {
    x.device().is_cuda() && crate::cuda::kernels_enabled()
}

/// The label value that contributes nothing to the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The dtype a numerically sensitive reduction runs in: f32 for half types, else unchanged.
fn at_least_f32(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// RMSNorm over the last dimension: `weight * x / sqrt(mean(x^2) + eps)`.
///
/// As in transformers, the statistics and the division run in (at least) f32 and the result is
/// cast back to the input dtype before the weight multiplies it.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_on(x) && weight.dtype() == x.dtype() {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, fused::RmsNorm { eps });
    }
    if kernels_on(x) {
        if let Some(y) = crate::cuda::rms_norm(x, weight, eps)? {
            return Ok(y);
        }
    }
    rms_norm_composed(x, weight, eps)
}

/// The residual add and the RMSNorm after it: `(x + residual, rms_norm(x + residual))`, one
/// kernel with its backward on a GPU when the kernels are on.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if kernels_on(x) {
        if let Some(both) = crate::cuda::add_rms_norm(x, residual, weight, eps)? {
            return Ok(both);
        }
    }
    let sum = (x + residual)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// [`rms_norm`] from differentiable candle ops (any device and dtype).
fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let in_dtype = x.dtype();
    let x = x.to_dtype(at_least_f32(in_dtype))?;
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_square + eps)?.sqrt()?.recip()?;
    let normed = x.broadcast_mul(&inv_rms)?.to_dtype(in_dtype)?;
    normed.broadcast_mul(&weight.to_dtype(in_dtype)?)
}

/// SiLU (swish): `x * sigmoid(x)`; candle's unary op has a backward.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// SwiGLU's activation, `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_on(gate) && up.dtype() == gate.dtype() && up.shape() == gate.shape() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, fused::SwiGlu);
    }
    if kernels_on(gate) {
        if let Some(y) = crate::cuda::swiglu(gate, up)? {
            return Ok(y);
        }
    }
    silu(gate)? * up
}

/// `x Wᵀ` for x (…, in) and W (out, in): on the CPU in f32/f64 one op ([`linear::Linear`]),
/// elsewhere candle's matmul.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if fused_on(x) && weight.dtype() == x.dtype() {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, linear::Linear);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    let mut out_shape = x.dims().to_vec();
    *out_shape
        .last_mut()
        .expect("linear input has a feature dim") = out_dim;
    // (…, in) -> (rows, in) x (in, out) -> (…, out)
    x.reshape((x.elem_count() / in_dim, in_dim))?
        .matmul(&weight.t()?)?
        .reshape(out_shape)
}

/// Whether [`moe_experts`] runs as one op for tokens `x` (else compose the experts).
pub fn moe_experts_fused(x: &Tensor) -> bool {
    fused_on(x)
}

/// Every pick's SwiGLU expert output (picks, hidden), experts in order, for token rows x
/// (rows, hidden), the experts' gate and up weights stacked (experts · 2 · inter, hidden: each
/// expert's gate rows, then its up rows) and their down weights stacked (experts · hidden,
/// inter). CPU f32/f64 only (see [`moe_experts_fused`]).
pub fn moe_experts(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    experts: ExpertRows,
) -> Result<Tensor> {
    let (hidden, inter) = (x.dim(1)?, down.dim(1)?);
    x.contiguous()?.apply_op3(
        &gate_up.contiguous()?,
        &down.contiguous()?,
        moe::MoeExperts::new(experts, hidden, inter),
    )
}

/// x (batch, seq, heads, head_dim) -> (batch, heads, seq, head_dim), contiguous, rotated by
/// `rotary`'s tables at positions `0..seq` when given: on the CPU in f32/f64 one op, elsewhere a
/// transpose, a copy and [`apply_rotary`].
pub fn split_heads(x: &Tensor, rotary: Option<&RotaryEmbedding>) -> Result<Tensor> {
    let seq = x.dim(1)?;
    if fused_on(x) {
        let rotary = rotary.map(|r| r.tables_at(0, seq, x.dtype())).transpose()?;
        return x.contiguous()?.apply_op1(heads::SplitHeads { rotary });
    }
    let heads = x.transpose(1, 2)?.contiguous()?;
    match rotary {
        Some(rotary) => rotary.apply(&heads),
        None => Ok(heads),
    }
}

/// Softmax over the last dimension. The max subtracted for stability is detached: the result
/// does not depend on it, so neither does the gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension, composed like [`softmax_last_dim`].
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum_exp)
}

/// Rotary position embedding tables, rotate-half (non-interleaved) convention: dims `i` and
/// `i + head_dim/2` form a pair rotated by `position * theta^(-2i/head_dim)`.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// (max_positions, head_dim), the half-width table repeated twice as transformers does.
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        // transformers computes inv_freq, the angles and cos/sin in float32; doing the same keeps
        // logits within float32 noise of the reference.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            for _repeat in 0..2 {
                for f in &inv_freq {
                    let angle = f * pos as f32;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_positions, head_dim), device)?,
        })
    }

    /// The (seq, head_dim) cos and sin rows of positions `offset..offset + seq`, contiguous, in
    /// `dtype`.
    pub fn tables_at(&self, offset: usize, seq: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let table = |t: &Tensor| t.narrow(0, offset, seq)?.to_dtype(dtype)?.contiguous();
        Ok((table(&self.cos)?, table(&self.sin)?))
    }

    /// The whole (max_positions, head_dim) cos and sin tables in `dtype`.
    #[cfg(test)]
    pub(crate) fn tables(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.to_dtype(dtype)?, self.sin.to_dtype(dtype)?))
    }

    /// Rotates `x` of shape (batch, heads, seq, head_dim) for positions 0..seq.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_at(x, 0)
    }

    /// Rotates `x` for positions `offset..offset + seq` (incremental decoding).
    pub fn apply_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_b, _h, seq, _d) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        apply_rotary(x, &cos, &sin)
    }
}

/// `x * cos + rotate_half(x) * sin` with cos/sin of shape (seq, head_dim), broadcast over the
/// leading dims of x (…, seq, head_dim).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_on(x) {
        let op = fused::Rotary {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        };
        return x.contiguous()?.apply_op1(op);
    }
    if kernels_on(x) {
        if let Some(y) = crate::cuda::rope(x, cos, sin)? {
            return Ok(y);
        }
    }
    apply_rotary_composed(x, cos, sin)
}

/// [`apply_rotary`] from differentiable candle ops (any device and dtype).
fn apply_rotary_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Rows `ids` (any shape, integer) of `table` (vocab, hidden), cast to `dtype`: (ids…, hidden).
/// On a GPU with the kernels on, one gather whose backward adds rows with atomics.
pub fn embedding(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    if kernels_on(table) {
        if let Some(rows) = crate::cuda::embedding(table, ids, dtype)? {
            return rows.reshape(shape);
        }
    }
    let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
    // Select rows of the stored table first, then cast only those.
    table.index_select(&ids, 0)?.to_dtype(dtype)?.reshape(shape)
}

/// The additive attention bias for causal attention with key padding: 0 where query `i` may see
/// key `j` (`j <= i` and key `j` is real), `f32::MIN` elsewhere (as transformers' eager path,
/// so a fully masked row softmaxes to uniform instead of NaN). Shape (batch, 1, seq, seq), f32.
///
/// `attention_mask` is (batch, seq) of any integer or float dtype, nonzero for real tokens.
pub fn causal_padding_bias(attention_mask: &Tensor) -> Result<Tensor> {
    let (batch, seq) = attention_mask.dims2()?;
    let device = attention_mask.device();
    let causal: Vec<u8> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| u8::from(j <= i)))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, seq, seq), device)?;
    let real_keys = attention_mask
        .to_dtype(DType::F32)?
        .ne(0f32)?
        .reshape((batch, 1, 1, seq))?;
    let allowed = real_keys
        .broadcast_mul(&causal)?
        .broadcast_as((batch, 1, seq, seq))?
        .contiguous()?;
    let zeros = Tensor::zeros((batch, 1, seq, seq), DType::F32, device)?;
    let blocked = Tensor::full(f32::MIN, (batch, 1, seq, seq), device)?;
    allowed.where_cond(&zeros, &blocked)
}

/// Sum of token cross-entropies and the number of tokens it covers, so that callers can take a
/// token-level mean over a whole (accumulated) batch.
#[derive(Debug, Clone)]
pub struct CrossEntropySum {
    /// Scalar, f32 (or f64 for f64 logits).
    pub sum: Tensor,
    pub num_tokens: usize,
}

/// Causal-LM cross-entropy summed over labelled tokens: `logits[:, :-1]` predict
/// `labels[:, 1:]`; labels equal to [`IGNORE_INDEX`] count for nothing. Computed in (at least)
/// f32. `logits` (batch, seq, vocab), `labels` (batch, seq) i64, not shifted.
///
/// On the CPU this is one fused op with a hand-written backward ([`CrossEntropySumOp`]): the
/// composed form ([`causal_lm_cross_entropy_sum_composed`], used on other devices) makes a dozen
/// vocabulary-wide temporaries, and each costs candle's backward two more passes.
pub fn causal_lm_cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Result<CrossEntropySum> {
    let (batch, seq, vocab) = logits.dims3()?;
    if logits.device().is_cuda() {
        return cuda_cross_entropy_sum(logits, labels);
    }
    let logits = logits.to_dtype(at_least_f32(logits.dtype()))?;
    if !logits.device().is_cpu() || !matches!(logits.dtype(), DType::F32 | DType::F64) {
        return causal_lm_cross_entropy_sum_composed(&logits, labels);
    }
    let targets = shifted_targets(labels, vocab)?;
    let num_tokens = targets.iter().filter(|&&t| t >= 0).count();
    let op = CrossEntropySumOp {
        targets: targets.into(),
        log_sum_exp: std::sync::Mutex::new(None),
    };
    // (batch, seq, vocab) -> (rows, vocab)
    let rows = logits.reshape((batch * seq, vocab))?.contiguous()?;
    let sum = rows.apply_op1(op)?;
    Ok(CrossEntropySum { sum, num_tokens })
}

/// Each row's target after the causal shift: row (b, t) predicts labels[b, t + 1], the last
/// position of each sequence predicts nothing ([`IGNORE_INDEX`]). Fails on a label outside the
/// vocabulary.
fn shifted_targets(labels: &Tensor, vocab: usize) -> Result<Vec<i64>> {
    let labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut targets = Vec::with_capacity(labels.len() * labels.first().map_or(0, Vec::len));
    for row in &labels {
        targets.extend(row.iter().skip(1).copied());
        targets.push(IGNORE_INDEX);
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= vocab as i64) {
        candle_core::bail!("label {bad} is outside the vocabulary of {vocab} tokens");
    }
    Ok(targets)
}

/// The head's part of the loss: the summed cross-entropy and the argmax metrics.
#[derive(Debug, Clone)]
pub struct HeadLoss {
    pub ce: CrossEntropySum,
    /// Label tokens the argmax predicts right (token accuracy's numerator).
    pub num_correct_tokens: usize,
    /// Rows whose every label token the argmax predicts right.
    pub num_exact_rows: usize,
}

/// [`HeadLoss`] from the logits (batch, seq, vocab) and the labels (batch, seq), not shifted.
pub fn head_loss_from_logits(logits: &Tensor, labels: &Tensor) -> Result<HeadLoss> {
    Ok(HeadLoss {
        ce: causal_lm_cross_entropy_sum(logits, labels)?,
        num_correct_tokens: causal_lm_correct_tokens(logits, labels)?,
        num_exact_rows: causal_lm_exact_rows(logits, labels)?,
    })
}

/// [`causal_lm_cross_entropy_sum`] on a GPU: whet's kernel per row (bf16/f16 logits read as
/// they are, the sums in f32 — f64 for f64 logits), the shifted targets built on the device.
fn cuda_cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Result<CrossEntropySum> {
    let (batch, seq, vocab) = logits.dims3()?;
    let (targets, num_tokens) = device_shifted_targets(labels, vocab)?;
    let rows = logits.reshape((batch * seq, vocab))?;
    let per_row = crate::cuda::cross_entropy_rows(&rows, &targets)?
        .expect("a CUDA tensor runs the CUDA kernel");
    Ok(CrossEntropySum {
        sum: per_row.sum_all()?,
        num_tokens,
    })
}

/// [`shifted_targets`] built on the labels' device, flattened to (batch · seq,) i64, and how
/// many are labelled: one read back (the count and the largest label), none of the labels.
fn device_shifted_targets(labels: &Tensor, vocab: usize) -> Result<(Tensor, usize)> {
    let (batch, seq) = labels.dims2()?;
    let labels = labels.to_dtype(DType::I64)?;
    // Row (b, t) predicts labels[b, t + 1]; the last position of each sequence predicts nothing.
    let ignored = Tensor::full(IGNORE_INDEX, (batch, 1), labels.device())?;
    let targets =
        Tensor::cat(&[&labels.narrow(1, 1, seq.saturating_sub(1))?, &ignored], 1)?.flatten_all()?;
    let labelled = targets.ge(0i64)?.to_dtype(DType::I64)?.sum_all()?;
    let stats = Tensor::stack(&[labelled, targets.max(0)?], 0)?.to_vec1::<i64>()?;
    let (num_tokens, largest) = (stats[0] as usize, stats[1]);
    if largest >= vocab as i64 {
        candle_core::bail!("label {largest} is outside the vocabulary of {vocab} tokens");
    }
    Ok((targets, num_tokens))
}

/// The head's loss for hidden states `x` (batch, seq, hidden) after the final norm, the
/// output projection `weight` (vocab, hidden) in x's dtype, and `labels` (batch, seq) not
/// shifted: on the CPU one fused op ([`fused_head_loss`]), on a GPU with the kernels on the
/// projection and the loss a chunk of rows at a time ([`crate::cuda::head_loss`]), else the
/// logits and then the loss. `with_grad` false (evaluation) computes no gradients.
pub fn head_loss(
    x: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> Result<HeadLoss> {
    if let Some(loss) = fused_head_loss(x, weight, labels, with_grad)? {
        return Ok(loss);
    }
    if kernels_on(x) {
        if let Some(loss) = cuda_head_loss(x, weight, labels, with_grad)? {
            return Ok(loss);
        }
    }
    head_loss_from_logits(&linear(x, weight)?, labels)
}

/// [`head_loss`] through whet's CUDA kernel: the metrics from its per-row argmax hits, read
/// back as two counts.
fn cuda_head_loss(
    x: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> Result<Option<HeadLoss>> {
    let (batch, seq, hidden) = x.dims3()?;
    let (targets, num_tokens) = device_shifted_targets(labels, weight.dim(0)?)?;
    let rows = x.reshape((batch * seq, hidden))?;
    let Some(loss) = crate::cuda::head_loss(&rows, weight, &targets, with_grad)? else {
        return Ok(None);
    };
    // A row is exact when it has labels and no labelled position is missed.
    let labelled = targets
        .ge(0i64)?
        .to_dtype(DType::U32)?
        .reshape((batch, seq))?;
    let hits = loss.correct.to_dtype(DType::U32)?.reshape((batch, seq))?;
    let missed = (&labelled - &hits)?.sum(1)?;
    let exact = missed
        .eq(0u32)?
        .to_dtype(DType::U32)?
        .mul(&labelled.sum(1)?.gt(0u32)?.to_dtype(DType::U32)?)?
        .sum_all()?;
    let counts = Tensor::stack(&[hits.sum_all()?, exact], 0)?.to_vec1::<u32>()?;
    Ok(Some(HeadLoss {
        ce: CrossEntropySum {
            sum: loss.sum,
            num_tokens,
        },
        num_correct_tokens: counts[0] as usize,
        num_exact_rows: counts[1] as usize,
    }))
}

/// The composed form of [`causal_lm_cross_entropy_sum`], from differentiable candle ops; it
/// runs on any device.
pub fn causal_lm_cross_entropy_sum_composed(
    logits: &Tensor,
    labels: &Tensor,
) -> Result<CrossEntropySum> {
    let (batch, seq, vocab) = logits.dims3()?;
    let logits = logits.to_dtype(at_least_f32(logits.dtype()))?;
    // (batch, seq - 1, vocab) -> (rows, vocab)
    let logits = logits
        .narrow(1, 0, seq - 1)?
        .reshape((batch * (seq - 1), vocab))?;
    let targets = labels
        .to_dtype(DType::I64)?
        .narrow(1, 1, seq - 1)?
        .reshape(batch * (seq - 1))?;
    let labelled = targets.ge(0i64)?;
    let num_tokens = labelled
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    // Ignored rows gather column 0 and are then zeroed by the mask.
    let safe_targets = labelled
        .where_cond(&targets, &targets.zeros_like()?)?
        .to_dtype(DType::U32)?
        .unsqueeze(1)?;
    let log_probs = log_softmax_last_dim(&logits)?;
    let target_log_probs = log_probs.gather(&safe_targets, 1)?.squeeze(1)?;
    let mask = labelled.to_dtype(target_log_probs.dtype())?;
    let sum = (target_log_probs * mask)?.sum_all()?.neg()?;
    Ok(CrossEntropySum { sum, num_tokens })
}

/// How many label tokens the logits' argmax predicts right, after the causal shift (the
/// numerator of ms-swift's `token_acc`; the denominator is the label count).
pub fn causal_lm_correct_tokens(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let Some((predictions, targets)) = shifted_predictions(logits, labels)? else {
        return Ok(0);
    };
    // An ignored label (-100) never equals an argmax.
    let correct = predictions.eq(&targets)?.to_dtype(DType::U32)?.sum_all()?;
    Ok(correct.to_scalar::<u32>()? as usize)
}

/// The argmax of `logits[:, :-1]` and `labels[:, 1:]`, both i64 (batch, seq - 1); `None` for
/// sequences too short to predict anything.
fn shifted_predictions(logits: &Tensor, labels: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let (_, seq, _) = logits.dims3()?;
    if seq < 2 {
        return Ok(None);
    }
    let predictions = logits
        .detach()
        .narrow(1, 0, seq - 1)?
        .argmax(D::Minus1)?
        .to_dtype(DType::I64)?;
    let targets = labels.to_dtype(DType::I64)?.narrow(1, 1, seq - 1)?;
    Ok(Some((predictions, targets)))
}

/// How many rows have every label token predicted right by the argmax (after the shift).
/// Such a row's reply is exactly what greedy decoding would generate from its prompt: each
/// greedy step picks the argmax, which is the reference token, so by induction the whole reply
/// (think block and final answer) comes out verbatim. Rows without labels do not count.
pub fn causal_lm_exact_rows(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let Some((predictions, targets)) = shifted_predictions(logits, labels)? else {
        return Ok(0);
    };
    let correct: Vec<u32> = predictions
        .eq(&targets)?
        .to_dtype(DType::U32)?
        .sum(1)?
        .to_vec1()?;
    let ignored = Tensor::full(-100i64, targets.shape(), targets.device())?;
    let labelled: Vec<u32> = targets
        .ne(&ignored)?
        .to_dtype(DType::U32)?
        .sum(1)?
        .to_vec1()?;
    Ok(correct
        .iter()
        .zip(&labelled)
        .filter(|(c, l)| **l > 0 && c == l)
        .count())
}

/// `sum over rows r with targets[r] >= 0 of logsumexp(logits[r]) - logits[r, targets[r]]` for
/// contiguous (rows, vocab) CPU logits, accumulated in f64; the backward pass is
/// `(softmax(logits[r]) - onehot(targets[r])) * upstream` on labelled rows and 0 elsewhere.
pub struct CrossEntropySumOp {
    targets: std::sync::Arc<[i64]>,
    /// Each row's log-sum-exp from the forward pass, reused by the backward pass.
    log_sum_exp: std::sync::Mutex<Option<Vec<f64>>>,
}

/// Calls `f` with the elements of a contiguous CPU tensor, without copying them; `None` for
/// tensors on other devices.
pub(crate) fn with_cpu_slice<T: WithDType, R>(
    tensor: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<Option<R>> {
    let (storage, layout) = tensor.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("with_cpu_slice needs a contiguous tensor");
    };
    Ok(Some(f(&T::cpu_storage_as_slice(cpu)?[start..end])))
}

/// Runs `f(first_row, rows_chunk)` over `data` (`row_len` items a row) split into row blocks on
/// rayon's pool (candle's matmuls' too), or on this thread when the work (`work_per_row` a row)
/// is small.
fn for_row_blocks<T: Send, F>(data: &mut [T], row_len: usize, work_per_row: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync,
{
    use rayon::prelude::*;
    let rows = data.len() / row_len.max(1);
    let threads = crate::host::cpu_threads().clamp(1, rows.max(1));
    // Tasks only pay off for large blocks.
    let min_rows = (1usize << 18).div_ceil(work_per_row.max(1));
    let rows_per_block = rows.div_ceil(threads).max(min_rows).max(1);
    if rows_per_block >= rows {
        f(0, data);
        return;
    }
    data.par_chunks_mut(rows_per_block * row_len)
        .enumerate()
        .for_each(|(i, block)| f(i * rows_per_block, block));
}

impl CrossEntropySumOp {
    /// The summed loss and each row's log-sum-exp (0 for ignored rows). The exponentials run
    /// in the logits' dtype, as PyTorch's do; the sums accumulate in f64.
    fn forward<T: attention::Real>(&self, logits: &[T], vocab: usize) -> (f64, Vec<f64>) {
        let rows = logits.len() / vocab;
        // (log-sum-exp, loss) per row
        let mut per_row: Vec<(f64, f64)> = vec![(0.0, 0.0); rows];
        for_row_blocks(&mut per_row, 1, vocab, |first, block| {
            for (i, slot) in block.iter_mut().enumerate() {
                let r = first + i;
                let Ok(target) = usize::try_from(self.targets[r]) else {
                    continue;
                };
                let row = &logits[r * vocab..(r + 1) * vocab];
                let (log_sum_exp, _) = row_log_sum_exp(row);
                *slot = (log_sum_exp, log_sum_exp - row[target].to_f64());
            }
        });
        let loss = per_row.iter().map(|(_, loss)| loss).sum();
        (loss, per_row.into_iter().map(|(lse, _)| lse).collect())
    }

    fn backward<T: attention::Real>(
        &self,
        logits: &[T],
        vocab: usize,
        lse: &[f64],
        upstream: f64,
    ) -> Vec<T> {
        let mut grad = vec![T::zero(); logits.len()];
        for_row_blocks(&mut grad, vocab, vocab, |first, block| {
            for (i, out) in block.chunks_mut(vocab).enumerate() {
                let r = first + i;
                let Ok(target) = usize::try_from(self.targets[r]) else {
                    continue;
                };
                out.copy_from_slice(&logits[r * vocab..(r + 1) * vocab]);
                into_softmax_minus_onehot(out, target, lse[r], upstream);
            }
        });
        grad
    }
}

/// A row of logits' log-sum-exp (the exponentials in the logits' dtype, as PyTorch's; the sum
/// in f64) and its argmax (the first largest entry, as torch's).
pub(crate) fn row_log_sum_exp<T: attention::Real>(row: &[T]) -> (f64, usize) {
    let (argmax, max) =
        row.iter().enumerate().fold(
            (0, T::neg_infinity()),
            |(i, m), (j, &v)| if v > m { (j, v) } else { (i, m) },
        );
    let sum_exp: f64 = row.iter().map(|&v| (v - max).exp().to_f64()).sum();
    (max.to_f64() + sum_exp.ln(), argmax)
}

/// Turns a row of logits into the cross-entropy's gradient, `(softmax(row) - onehot(target)) *
/// upstream`, from the row's log-sum-exp.
pub(crate) fn into_softmax_minus_onehot<T: attention::Real>(
    row: &mut [T],
    target: usize,
    log_sum_exp: f64,
    upstream: f64,
) {
    let at_target = ((row[target].to_f64() - log_sum_exp).exp() - 1.0) * upstream;
    let (lse, upstream) = (T::from_f64(log_sum_exp), T::from_f64(upstream));
    row.iter_mut()
        .for_each(|v| *v = (*v - lse).exp() * upstream);
    row[target] = T::from_f64(at_target);
}

impl candle_core::CustomOp1 for CrossEntropySumOp {
    fn name(&self) -> &'static str {
        "cross-entropy-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (rows, vocab) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("cross-entropy-sum needs contiguous logits");
        };
        if rows != self.targets.len() {
            candle_core::bail!(
                "cross-entropy-sum: {rows} rows, {} targets",
                self.targets.len()
            );
        }
        let (lse, out) = match storage {
            CpuStorage::F32(data) => {
                let (sum, lse) = self.forward(&data[start..end], vocab);
                (lse, CpuStorage::F32(vec![sum as f32]))
            }
            CpuStorage::F64(data) => {
                let (sum, lse) = self.forward(&data[start..end], vocab);
                (lse, CpuStorage::F64(vec![sum]))
            }
            _ => candle_core::bail!("cross-entropy-sum: logits must be f32 or f64"),
        };
        *self.log_sum_exp.lock().expect("not poisoned") = Some(lse);
        Ok((out, candle_core::Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, vocab) = arg.dims2()?;
        let upstream = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let arg = arg.contiguous()?;
        let guard = self.log_sum_exp.lock().expect("not poisoned");
        let Some(lse) = guard.as_ref() else {
            candle_core::bail!("cross-entropy-sum: backward before forward");
        };
        let grad = match arg.dtype() {
            DType::F32 => with_cpu_slice(&arg, |d: &[f32]| self.backward(d, vocab, lse, upstream))?
                .map(|g| Tensor::from_vec(g, arg.shape(), arg.device())),
            DType::F64 => with_cpu_slice(&arg, |d: &[f64]| self.backward(d, vocab, lse, upstream))?
                .map(|g| Tensor::from_vec(g, arg.shape(), arg.device())),
            other => candle_core::bail!("cross-entropy-sum: unsupported dtype {other:?}"),
        };
        Ok(Some(grad.expect("a CPU tensor")?))
    }
}

/// Token-mean causal-LM loss (transformers' `ForCausalLMLoss` without `num_items_in_batch`).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let ce = causal_lm_cross_entropy_sum(logits, labels)?;
    ce.sum / ce.num_tokens.max(1) as f64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Var;

    /// Deterministic pseudo-random values in [-1, 1) for tests.
    pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
            .collect()
    }

    /// Compares the autograd gradient of the scalar `f(x)` with central finite differences.
    pub(crate) fn check_gradient(
        shape: &[usize],
        seed: u64,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) {
        let n: usize = shape.iter().product();
        let values = test_values(n, seed);
        let x = Var::from_vec(values.clone(), shape, &Device::Cpu).unwrap();
        let loss = f(x.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        let analytic: Vec<f64> = grads
            .get(x.as_tensor())
            .expect("no gradient reached the input")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let eval = |v: Vec<f64>| {
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            f(&t).unwrap().to_scalar::<f64>().unwrap()
        };
        let h = 1e-6;
        for i in 0..n {
            let mut plus = values.clone();
            plus[i] += h;
            let mut minus = values.clone();
            minus[i] -= h;
            let numeric = (eval(plus) - eval(minus)) / (2.0 * h);
            let err = (numeric - analytic[i]).abs();
            assert!(
                err <= 1e-6 + 1e-5 * numeric.abs(),
                "entry {i}: analytic {} vs numeric {numeric}",
                analytic[i]
            );
        }
    }

    /// The largest absolute entry of a tensor, as f64.
    pub(crate) fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The largest entry of `a - reference`, relative to the reference's largest entry (at
    /// least `floor`): sums over many rows round differently in f32.
    pub(crate) fn max_rel_diff(a: &Tensor, reference: &Tensor, floor: f64) -> f64 {
        max_abs(&(a - reference).unwrap()) / max_abs(reference).max(floor)
    }

    /// A fixed random projection so that a tensor-valued op gets a generic upstream gradient.
    pub(crate) fn project(y: &Tensor, seed: u64) -> Result<Tensor> {
        let w = Tensor::from_vec(test_values(y.elem_count(), seed), y.shape(), y.device())?
            .to_dtype(y.dtype())?;
        (y * w)?.sum_all()
    }

    #[test]
    fn rms_norm_gradient() {
        let weight = Tensor::from_vec(test_values(6, 7), 6, &Device::Cpu).unwrap();
        check_gradient(&[2, 3, 6], 1, |x| project(&rms_norm(x, &weight, 1e-6)?, 2));
        // and with respect to the weight
        let x = Tensor::from_vec(test_values(36, 3), (2, 3, 6), &Device::Cpu).unwrap();
        check_gradient(&[6], 4, |w| project(&rms_norm(&x, w, 1e-6)?, 5));
    }

    #[test]
    fn rms_norm_value() {
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = rms_norm(&x, &w, 0.0).unwrap().to_vec2().unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 3.0 / rms).abs() < 1e-6 && (y[0][1] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn silu_and_softmax_gradients() {
        check_gradient(&[3, 5], 11, |x| project(&silu(x)?, 12));
        check_gradient(&[3, 5], 13, |x| project(&softmax_last_dim(x)?, 14));
        check_gradient(&[3, 5], 15, |x| project(&log_softmax_last_dim(x)?, 16));
    }

    #[test]
    fn softmax_sums_to_one() {
        let x = Tensor::new(&[[1000f32, 1001.0, 999.0]], &Device::Cpu).unwrap();
        let total: f32 = softmax_last_dim(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rotary_gradient_and_rotation() {
        let rope = RotaryEmbedding::new(8, 10000.0, 16, &Device::Cpu).unwrap();
        let cos = rope
            .cos
            .narrow(0, 0, 4)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let sin = rope
            .sin
            .narrow(0, 0, 4)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        check_gradient(&[1, 2, 4, 8], 21, |x| {
            project(&apply_rotary(x, &cos, &sin)?, 22)
        });
        // Position 0 is the identity; a rotation keeps each pair's norm.
        let x = Tensor::from_vec(test_values(32, 23), (1, 1, 4, 8), &Device::Cpu).unwrap();
        let y = apply_rotary(&x, &cos, &sin).unwrap();
        let (xv, yv): (Vec<f64>, Vec<f64>) = (
            x.flatten_all().unwrap().to_vec1().unwrap(),
            y.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for d in 0..8 {
            assert!((xv[d] - yv[d]).abs() < 1e-7);
        }
        for pos in 0..4 {
            for i in 0..4 {
                let (a, b) = (xv[pos * 8 + i], xv[pos * 8 + i + 4]);
                let (c, d) = (yv[pos * 8 + i], yv[pos * 8 + i + 4]);
                assert!(((a * a + b * b) - (c * c + d * d)).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn mask_is_causal_and_hides_padding() {
        let mask = Tensor::new(&[[1u32, 1, 0], [1, 1, 1]], &Device::Cpu).unwrap();
        let bias = causal_padding_bias(&mask).unwrap();
        let row0: Vec<Vec<f32>> = bias.get(0).unwrap().get(0).unwrap().to_vec2().unwrap();
        let row1: Vec<Vec<f32>> = bias.get(1).unwrap().get(0).unwrap().to_vec2().unwrap();
        let m = f32::MIN;
        assert_eq!(row0, vec![vec![0., m, m], vec![0., 0., m], vec![0., 0., m]]);
        assert_eq!(
            row1,
            vec![vec![0., m, m], vec![0., 0., m], vec![0., 0., 0.]]
        );
    }

    #[test]
    fn fused_cross_entropy_matches_the_composed_ops() {
        let labels = Tensor::new(
            &[[7i64, 1, -100, 4, 2], [-100, 0, 3, -100, 6]],
            &Device::Cpu,
        )
        .unwrap();
        for dtype in [DType::F64, DType::F32] {
            let values = test_values(2 * 5 * 9, 41);
            let x = Var::from_vec(values, (2, 5, 9), &Device::Cpu).unwrap();
            let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let weights = Tensor::new(&[0.5f64], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |f: fn(&Tensor, &Tensor) -> Result<CrossEntropySum>| {
                let ce = f(x.as_tensor(), &labels).unwrap();
                // A non-unit upstream gradient.
                let loss = ce.sum.broadcast_mul(&weights).unwrap().sum_all().unwrap();
                let grad = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
                let value = ce
                    .sum
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                (value, ce.num_tokens, grad)
            };
            let (fused, n_fused, g_fused) = run(causal_lm_cross_entropy_sum);
            let (composed, n_composed, g_composed) = run(causal_lm_cross_entropy_sum_composed);
            assert_eq!(n_fused, n_composed);
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(
                (fused - composed).abs() <= tol * composed.abs(),
                "{fused} vs {composed}"
            );
            let diff = max_abs(&(g_fused - g_composed).unwrap());
            assert!(diff <= tol, "{dtype:?} gradient differs by {diff}");
        }
        // Large enough to run on several threads.
        let (b, t, v) = (2, 64, 8192);
        let logits = Var::from_vec(
            test_values(b * t * v, 43)
                .iter()
                .map(|&x| (x * 4.0) as f32)
                .collect(),
            (b, t, v),
            &Device::Cpu,
        )
        .unwrap();
        let labels: Vec<i64> = (0..b * t)
            .map(|i| {
                if i % 5 == 0 {
                    -100
                } else {
                    (i * 97 % v) as i64
                }
            })
            .collect();
        let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu).unwrap();
        let grad_of = |f: fn(&Tensor, &Tensor) -> Result<CrossEntropySum>| {
            let ce = f(logits.as_tensor(), &labels).unwrap();
            let value = ce.sum.to_scalar::<f32>().unwrap();
            let grad = ce
                .sum
                .backward()
                .unwrap()
                .get(logits.as_tensor())
                .unwrap()
                .clone();
            (value, grad)
        };
        let (fused, g_fused) = grad_of(causal_lm_cross_entropy_sum);
        let (composed, g_composed) = grad_of(causal_lm_cross_entropy_sum_composed);
        assert!(
            (fused - composed).abs() <= 1e-5 * composed.abs(),
            "{fused} vs {composed}"
        );
        let diff = max_abs(&(g_fused - g_composed).unwrap());
        assert!(diff <= 1e-6, "gradient differs by {diff}");
        let out_of_vocab = Tensor::new(&[[0i64, 9]], &Device::Cpu).unwrap();
        let logits = Tensor::zeros((1, 2, 9), DType::F32, &Device::Cpu).unwrap();
        assert!(causal_lm_cross_entropy_sum(&logits, &out_of_vocab).is_err());
    }

    #[test]
    fn cross_entropy_gradient_and_value() {
        let labels = Tensor::new(&[[7i64, 1, -100, 4], [-100, 0, 3, -100]], &Device::Cpu).unwrap();
        check_gradient(&[2, 4, 5], 31, |x| causal_lm_loss(x, &labels));

        // Value: mean over the 4 labelled shifted positions of -log_softmax(logits)[target].
        let values = test_values(40, 32);
        let logits = Tensor::from_vec(values.clone(), (2, 4, 5), &Device::Cpu).unwrap();
        let ce = causal_lm_cross_entropy_sum(&logits, &labels).unwrap();
        assert_eq!(ce.num_tokens, 4);
        let nll = |b: usize, t: usize, target: usize| {
            let row = &values[(b * 4 + t) * 5..(b * 4 + t + 1) * 5];
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            lse - row[target]
        };
        let expected = nll(0, 0, 1) + nll(0, 2, 4) + nll(1, 0, 0) + nll(1, 1, 3);
        let got = ce.sum.to_scalar::<f64>().unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }
}

#[cfg(test)]
mod exact_rows_tests {
    use super::*;

    #[test]
    fn a_row_counts_only_when_every_label_is_predicted() {
        let device = Device::Cpu;
        // Vocabulary 3; logits favour token 2 everywhere except row 1, position 1 (token 0).
        let mut values = vec![0f32; 2 * 3 * 3];
        for row in 0..2 {
            for pos in 0..3 {
                let favourite = if row == 1 && pos == 1 { 0 } else { 2 };
                values[(row * 3 + pos) * 3 + favourite] = 5.0;
            }
        }
        let logits = Tensor::from_vec(values, (2, 3, 3), &device).unwrap();
        // Labels after the shift: row 0 wants [2, 2]; row 1 wants [2, 2] but predicts [2, 0].
        let labels = Tensor::from_vec(vec![-100i64, 2, 2, -100, 2, 2], (2, 3), &device).unwrap();
        assert_eq!(causal_lm_exact_rows(&logits, &labels).unwrap(), 1);
        assert_eq!(causal_lm_correct_tokens(&logits, &labels).unwrap(), 3);
        // A row with no labels is not an exact match.
        let unlabelled = Tensor::from_vec(vec![-100i64; 6], (2, 3), &device).unwrap();
        assert_eq!(causal_lm_exact_rows(&logits, &unlabelled).unwrap(), 0);
    }
}
