//! Causal self-attention with key padding and grouped-query heads as one CPU op with a
//! hand-written backward.
//!
//! The composed form (scores, bias, softmax, weighted sum) materialises the (batch, heads, seq,
//! seq) scores several times over and candle's backward doubles that. Here query rows go in
//! blocks of [`QUERY_BLOCK`]: a block's scores against the keys it may see exist only while the
//! block is worked on, and the backward recomputes them from each row's log-sum-exp, as flash
//! attention does. Blocks are whole rows, so the softmax is exact, not online. The matrix
//! products run on the `gemm` crate, as candle's own matmul does.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::fused::{elements, with_elements};

/// Which keys each query row may see: causal, with key padding. Built once per batch; each
/// form's view of it is made on first use (a GPU run never reads the mask back to the host).
#[derive(Debug, Clone)]
pub struct AttentionMask {
    /// (batch, seq) 0/1 mask on the model's device.
    attention_mask: Tensor,
    /// (batch, seq), row-major: whether each key is a real token (what the fused op reads).
    real_keys: Arc<OnceLock<Arc<[bool]>>>,
    /// The composed form's (batch, 1, seq, seq) bias.
    bias: Arc<OnceLock<Tensor>>,
    /// The CUDA kernel's (batch, seq) u8 real-key mask, on the device.
    device_real_keys: Arc<OnceLock<Tensor>>,
}

impl AttentionMask {
    /// `attention_mask` is (batch, seq) of any integer or float dtype, nonzero for real tokens.
    pub fn new(attention_mask: &Tensor) -> Result<Self> {
        attention_mask.dims2()?;
        Ok(Self {
            attention_mask: attention_mask.clone(),
            real_keys: Arc::default(),
            bias: Arc::default(),
            device_real_keys: Arc::default(),
        })
    }

    fn device_real_keys(&self) -> Result<&Tensor> {
        if let Some(real) = self.device_real_keys.get() {
            return Ok(real);
        }
        let real = self.attention_mask.to_dtype(DType::F32)?.ne(0f32)?;
        Ok(self.device_real_keys.get_or_init(|| real))
    }

    fn real_keys(&self) -> Result<Arc<[bool]>> {
        if let Some(real) = self.real_keys.get() {
            return Ok(real.clone());
        }
        let real: Arc<[bool]> = self
            .attention_mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| m != 0.0)
            .collect();
        Ok(self.real_keys.get_or_init(|| real).clone())
    }

    fn bias(&self) -> Result<&Tensor> {
        if let Some(bias) = self.bias.get() {
            return Ok(bias);
        }
        let bias = super::causal_padding_bias(&self.attention_mask)?;
        Ok(self.bias.get_or_init(|| bias))
    }
}

/// Causal grouped-query attention: q (batch, heads, seq, head_dim), k and v (batch, kv_heads,
/// seq, head_dim) -> (batch, seq, heads · head_dim). On the CPU in f32/f64 one fused op
/// ([`CausalAttention`]); elsewhere, or with fused ops off, the composed form.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
) -> Result<Tensor> {
    let head_dim = q.dim(3)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if super::fused_on(q) {
        let op = CausalAttention::new(mask.real_keys()?, scale);
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    if super::kernels_on(q) {
        if let Some(out) = crate::cuda::attention(q, k, v, mask.device_real_keys()?)? {
            return Ok(out);
        }
    }
    causal_attention_composed(q, k, v, mask.bias()?, scale)
}

/// [`causal_attention`] from differentiable candle ops, as transformers' eager attention:
/// scores in the inputs' dtype, the bias and softmax in f32.
fn causal_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let group = nh / nkv;
    // GQA without copying k/v: query heads g*group..(g+1)*group share kv head g, so stack
    // each group's queries along the sequence axis.
    // (b, nh, t, hd) -> (b, nkv, group * t, hd)
    let q = q.reshape((b, nkv, group * t, hd))?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    // (b, nkv, group * t, t) -> (b, nh, t, t); softmax in f32 like transformers' eager path.
    let scores = scores.reshape((b, nh, t, t))?.to_dtype(DType::F32)?;
    let probs = super::softmax_last_dim(&scores.broadcast_add(bias)?)?;
    let probs = probs.to_dtype(v.dtype())?.reshape((b, nkv, group * t, t))?;
    // (b, nkv, group * t, hd) -> (b, nh, t, hd) -> (b, t, nh * hd)
    let attended = probs.matmul(v)?.reshape((b, nh, t, hd))?;
    attended.transpose(1, 2)?.reshape((b, t, nh * hd))
}

/// Query rows per block: 64 keeps a block's scores in L2 for sequences up to a few thousand
/// tokens and skips most of the causal upper triangle.
const QUERY_BLOCK: usize = 64;

/// The element types the op computes in (as the composed form, in the inputs' dtype).
pub trait Real: WithDType + num_traits::Float + num_traits::NumAssign + Send + Sync {
    /// `e^self` as the fused ops' softmaxes and sigmoids take it: for f32 an inlined
    /// polynomial the compiler vectorises (see [`exp_f32`]), for f64 libm's.
    fn fast_exp(self) -> Self;
}
impl Real for f32 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        exp_f32(self)
    }
}
impl Real for f64 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
}

/// `e^x` in f32 within 2 ulp of libm's for results that are normal numbers (0 below them, +inf
/// above), with no call and no branch, so loops over it vectorise: x = k ln 2 + r with k the
/// nearest integer to x / ln 2 (by the 1.5 · 2²³ rounding trick, as plain adds), r reduced in two
/// steps (Cody and Waite), e^r by Cephes' degree-6 minimax polynomial, 2^k built in the
/// exponent bits. libm's expf is a call per element and was a fifth of a `tiny` step.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Outside this range the result is not a normal f32; NaN passes through max/min as NaN
    // would not, so it is restored below.
    let clamped = x.clamp(-87.336_55, 88.376_26);
    let shifted = clamped * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    // The low bits of `shifted` hold k + 2²² (its exponent is fixed by ROUND).
    let k_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((k_int + 127) as u32) << 23);
    let y = p * scale;
    if x.is_nan() {
        x
    } else if x < -87.336_55 {
        0.0
    } else if x > 88.376_26 {
        f32::INFINITY
    } else {
        y
    }
}

/// `softmax(q kᵀ · scale + mask) v` for q (batch, heads, seq, head_dim), k and v (batch,
/// kv_heads, seq, head_dim), query head h reading kv head `h / (heads / kv_heads)`; the result
/// is (batch, seq, heads · head_dim), the layout the output projection reads.
///
/// Query i sees key j when `j <= i` and key j is a real token. A row that sees no key averages
/// every value uniformly, as transformers' eager attention does with its `f32::MIN` bias.
pub struct CausalAttention {
    /// (batch, seq), row-major: whether each key is a real token.
    real_keys: Arc<[bool]>,
    scale: f64,
    /// Each query row's log-sum-exp (batch, heads, seq) from the forward pass, for the
    /// backward; `+inf` marks a row that sees no key.
    log_sum_exp: Mutex<Option<Vec<f64>>>,
}

impl CausalAttention {
    pub fn new(real_keys: Arc<[bool]>, scale: f64) -> Self {
        Self {
            real_keys,
            scale,
            log_sum_exp: Mutex::new(None),
        }
    }
}

/// The dimensions of one attention call, read off the operands' layouts (the CPU op's and the
/// CUDA kernel's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) seq: usize,
    pub(crate) head_dim: usize,
}

impl Dims {
    /// Checks that q, k, v and a key mask of `real_keys` entries fit together.
    pub(crate) fn of(q: &Shape, k: &Shape, v: &Shape, real_keys: usize) -> Result<Self> {
        let (batch, heads, seq, head_dim) = q.dims4()?;
        let kv_heads = k.dims4()?.1;
        if k.dims() != [batch, kv_heads, seq, head_dim] || v.dims() != k.dims() {
            candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?} do not fit together");
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("attention: {heads} query heads over {kv_heads} kv heads");
        }
        if real_keys != batch * seq {
            candle_core::bail!("attention: a key mask of {real_keys} for {batch}x{seq} keys");
        }
        Ok(Self {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
        })
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn blocks(&self) -> usize {
        self.seq.div_ceil(QUERY_BLOCK)
    }

    /// The query rows of block `blk`.
    fn rows(&self, blk: usize) -> std::ops::Range<usize> {
        blk * QUERY_BLOCK..self.seq.min((blk + 1) * QUERY_BLOCK)
    }

    /// Row stride of the output and of its gradient: (batch, seq, heads · head_dim).
    fn out_stride(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// A pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: every use writes a region no other task touches (see the callers).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so that closures capture the whole `Shared`, not its field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// `dst = [dst +] alpha · a b` for an m × n `dst` with row stride `dst_rs`, `a` (m × k) and `b`
/// (k × n) given by their row and column strides, on this thread (the op's tasks are the
/// parallel part).
///
/// # Safety
/// As [`gemm_into`].
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: Real>(
    dims: (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
    alpha: T,
) {
    gemm_into(
        dims,
        (dst, dst_rs),
        accumulate,
        a,
        b,
        alpha,
        gemm::Parallelism::None,
    )
}

/// `dst = [dst +] alpha · a b` through the `gemm` crate (candle's CPU matmul): `dst` m × n with
/// row stride `dst_rs`, `a` (m × k) and `b` (k × n) as (pointer, row stride, column stride).
///
/// # Safety
/// The pointers must cover the strided extents, and `dst` must not alias `a` or `b`.
pub(super) unsafe fn gemm_into<T: Real>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    (a, a_rs, a_cs): (*const T, usize, usize),
    (b, b_rs, b_cs): (*const T, usize, usize),
    alpha: T,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n).fill(T::zero());
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::one(),
        alpha,
        false,
        false,
        false,
        parallelism,
    );
}

/// The largest of `xs` (NaNs ignored, as `Float::max` does; -inf when empty), in eight lanes
/// so the loop vectorises: max is exact, so the order does not change the result.
pub(super) fn max_of<T: Real>(xs: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = num_traits::Float::max(*lane, x);
        }
    }
    let max = num_traits::Float::max;
    let rest = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &x| max(m, x));
    lanes.into_iter().fold(rest, max)
}

/// `xs[j] = e^(xs[j] − shift)` in place, and their sum, in eight lanes (fixed order) so both
/// the exponentials and the adds vectorise.
fn exp_sum<T: Real>(xs: &mut [T], shift: T) -> T {
    let mut lanes = [T::zero(); 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *x = (*x - shift).fast_exp();
            *lane += *x;
        }
    }
    let mut rest = T::zero();
    for x in chunks.into_remainder() {
        *x = (*x - shift).fast_exp();
        rest += *x;
    }
    lanes.into_iter().fold(rest, |sum, lane| sum + lane)
}

impl CausalAttention {
    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], d: Dims) -> (Vec<T>, Vec<f64>) {
        let (t, hd, group) = (d.seq, d.head_dim, d.group());
        let mut out = vec![T::zero(); d.batch * t * d.out_stride()];
        let mut lse = vec![0f64; d.batch * d.heads * t];
        let (out_ptr, lse_ptr) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
        let scale = T::from_f64(self.scale);
        (0..d.batch * d.heads * d.blocks())
            .into_par_iter()
            .for_each(|task| {
                let (bh, blk) = (task / d.blocks(), task % d.blocks());
                let (b, h) = (bh / d.heads, bh % d.heads);
                let kv = (b * d.kv_heads + h / group) * t * hd;
                let rows = d.rows(blk);
                // Keys past the block's last row are hidden from all of its rows.
                let keys = rows.end;
                let real = &self.real_keys[b * t..(b + 1) * t];
                let mut probs = vec![T::zero(); rows.len() * keys];
                let q_blk = q[(bh * t + rows.start) * hd..].as_ptr();
                // SAFETY: the operands cover rows × hd and keys × hd; probs is rows × keys.
                unsafe {
                    matmul(
                        (rows.len(), keys, hd),
                        probs.as_mut_ptr(),
                        keys,
                        false,
                        (q_blk, hd, 1),
                        (k[kv..].as_ptr(), 1, hd),
                        scale,
                    );
                }
                let mut unseeing = Vec::new();
                // Without padding among these keys, row i sees exactly keys 0..=i: then the
                // loops run branch-free over that prefix (and vectorise), with the same sums.
                let unpadded = real[..keys].iter().all(|&r| r);
                for (r, row) in probs.chunks_mut(keys).enumerate() {
                    let i = rows.start + r;
                    let seen = |j: usize| j <= i && real[j];
                    let max = if unpadded {
                        max_of(&row[..=i])
                    } else {
                        (0..keys)
                            .filter(|&j| seen(j))
                            .map(|j| row[j])
                            .fold(T::neg_infinity(), num_traits::Float::max)
                    };
                    let row_lse = if max == T::neg_infinity() {
                        row.fill(T::zero());
                        unseeing.push(i);
                        f64::INFINITY
                    } else if unpadded {
                        let (live, hidden) = row.split_at_mut(i + 1);
                        hidden.fill(T::zero());
                        let sum = exp_sum(live, max);
                        let inv = sum.recip();
                        live.iter_mut().for_each(|p| *p *= inv);
                        max.to_f64() + sum.to_f64().ln()
                    } else {
                        let mut sum = T::zero();
                        for (j, p) in row.iter_mut().enumerate() {
                            *p = if seen(j) {
                                (*p - max).fast_exp()
                            } else {
                                T::zero()
                            };
                            sum += *p;
                        }
                        let inv = sum.recip();
                        row.iter_mut().for_each(|p| *p *= inv);
                        max.to_f64() + sum.to_f64().ln()
                    };
                    // SAFETY: each (b, h, i) belongs to exactly one task.
                    unsafe { *lse_ptr.get().add(bh * t + i) = row_lse };
                }
                // SAFETY: rows `rows` of head h of sequence b belong to this task alone.
                let out_blk = unsafe {
                    out_ptr
                        .get()
                        .add((b * t + rows.start) * d.out_stride() + h * hd)
                };
                unsafe {
                    matmul(
                        (rows.len(), hd, keys),
                        out_blk,
                        d.out_stride(),
                        false,
                        (probs.as_ptr(), keys, 1),
                        (v[kv..].as_ptr(), hd, 1),
                        T::one(),
                    );
                }
                // A row that sees nothing averages all t values (transformers' eager result).
                for i in unseeing {
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out_ptr.get().add((b * t + i) * d.out_stride() + h * hd),
                            hd,
                        )
                    };
                    let weight = T::from_f64(1.0 / t as f64);
                    for row in v[kv..kv + t * hd].chunks(hd) {
                        dst.iter_mut().zip(row).for_each(|(o, &x)| *o += x * weight);
                    }
                }
            });
        (out, lse)
    }

    /// (dq, dk, dv) in the operands' layouts from the output's gradient `grad` and the output.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        out: &[T],
        grad: &[T],
        lse: &[f64],
        d: Dims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (t, hd, group, os) = (d.seq, d.head_dim, d.group(), d.out_stride());
        let mut dq = vec![T::zero(); q.len()];
        let mut dk = vec![T::zero(); k.len()];
        let mut dv = vec![T::zero(); v.len()];
        let scale = T::from_f64(self.scale);
        // One task per (sequence, kv head): it alone accumulates that kv head's dk and dv, and
        // writes the dq of the query heads that read it.
        dq.par_chunks_mut(group * t * hd)
            .zip(dk.par_chunks_mut(t * hd))
            .zip(dv.par_chunks_mut(t * hd))
            .enumerate()
            .for_each(|(task, ((dq, dk), dv))| {
                let b = task / d.kv_heads;
                let kv = task * t * hd;
                let (k, v) = (&k[kv..kv + t * hd], &v[kv..kv + t * hd]);
                let real = &self.real_keys[b * t..(b + 1) * t];
                let mut probs = vec![T::zero(); QUERY_BLOCK * t];
                let mut dprobs = vec![T::zero(); QUERY_BLOCK * t];
                for hh in 0..group {
                    let h = (task % d.kv_heads) * group + hh;
                    let bh = b * d.heads + h;
                    let q = &q[bh * t * hd..(bh + 1) * t * hd];
                    let dq = &mut dq[hh * t * hd..(hh + 1) * t * hd];
                    let row_out = |i: usize| (b * t + i) * os + h * hd;
                    for blk in 0..d.blocks() {
                        let rows = d.rows(blk);
                        let (n, keys) = (rows.len(), rows.end);
                        let probs = &mut probs[..n * keys];
                        let dprobs = &mut dprobs[..n * keys];
                        // SAFETY (all matmuls): the slices cover the strided extents; the
                        // destinations are this task's own buffers.
                        unsafe {
                            matmul(
                                (n, keys, hd),
                                probs.as_mut_ptr(),
                                keys,
                                false,
                                (q[rows.start * hd..].as_ptr(), hd, 1),
                                (k.as_ptr(), 1, hd),
                                scale,
                            );
                        }
                        let unpadded = real[..keys].iter().all(|&r| r);
                        for (r, row) in probs.chunks_mut(keys).enumerate() {
                            let i = rows.start + r;
                            let row_lse = lse[bh * t + i];
                            if row_lse.is_infinite() {
                                row.fill(T::zero());
                                continue;
                            }
                            let row_lse = T::from_f64(row_lse);
                            if unpadded {
                                let (live, hidden) = row.split_at_mut(i + 1);
                                hidden.fill(T::zero());
                                live.iter_mut().for_each(|p| *p = (*p - row_lse).fast_exp());
                                continue;
                            }
                            for (j, p) in row.iter_mut().enumerate() {
                                *p = if j <= i && real[j] {
                                    (*p - row_lse).fast_exp()
                                } else {
                                    T::zero()
                                };
                            }
                        }
                        let grad_blk = grad[row_out(rows.start)..].as_ptr();
                        unsafe {
                            // dv += pᵀ · dout
                            matmul(
                                (keys, hd, n),
                                dv.as_mut_ptr(),
                                hd,
                                true,
                                (probs.as_ptr(), 1, keys),
                                (grad_blk, os, 1),
                                T::one(),
                            );
                            // dp = dout · vᵀ
                            matmul(
                                (n, keys, hd),
                                dprobs.as_mut_ptr(),
                                keys,
                                false,
                                (grad_blk, os, 1),
                                (v.as_ptr(), 1, hd),
                                T::one(),
                            );
                        }
                        // ds = p ∘ (dp − rowsum(dout ∘ out)), in place of dp
                        for (r, (ds, p)) in
                            dprobs.chunks_mut(keys).zip(probs.chunks(keys)).enumerate()
                        {
                            let at = row_out(rows.start + r);
                            let dot = grad[at..at + hd]
                                .iter()
                                .zip(&out[at..at + hd])
                                .fold(T::zero(), |acc, (&g, &o)| acc + g * o);
                            ds.iter_mut().zip(p).for_each(|(s, &p)| *s = p * (*s - dot));
                        }
                        unsafe {
                            // dq = scale · ds · k
                            matmul(
                                (n, hd, keys),
                                dq[rows.start * hd..].as_mut_ptr(),
                                hd,
                                false,
                                (dprobs.as_ptr(), keys, 1),
                                (k.as_ptr(), hd, 1),
                                scale,
                            );
                            // dk += scale · dsᵀ · q
                            matmul(
                                (keys, hd, n),
                                dk.as_mut_ptr(),
                                hd,
                                true,
                                (dprobs.as_ptr(), 1, keys),
                                (q[rows.start * hd..].as_ptr(), hd, 1),
                                scale,
                            );
                        }
                    }
                    // Rows that saw no key: p = 1/t over every key, so ds_j = (dp_j − mean dp)/t.
                    for i in (0..t).filter(|&i| lse[bh * t + i].is_infinite()) {
                        let g = &grad[row_out(i)..row_out(i) + hd];
                        let qi = &q[i * hd..(i + 1) * hd];
                        let inv_t = T::from_f64(1.0 / t as f64);
                        let dot = |a: &[T], b: &[T]| {
                            a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
                        };
                        let dp: Vec<T> = v.chunks(hd).map(|vj| dot(g, vj)).collect();
                        let mean = dp.iter().fold(T::zero(), |s, &x| s + x) * inv_t;
                        let dqi = &mut dq[i * hd..(i + 1) * hd];
                        for (j, &dpj) in dp.iter().enumerate() {
                            let ds = (dpj - mean) * inv_t * scale;
                            let (kj, vj) = (&k[j * hd..(j + 1) * hd], j * hd..(j + 1) * hd);
                            dqi.iter_mut().zip(kj).for_each(|(o, &x)| *o += ds * x);
                            dk[vj.clone()]
                                .iter_mut()
                                .zip(qi)
                                .for_each(|(o, &x)| *o += ds * x);
                            dv[vj].iter_mut().zip(g).for_each(|(o, &x)| *o += x * inv_t);
                        }
                    }
                }
            });
        (dq, dk, dv)
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(lq.shape(), lk.shape(), lv.shape(), self.real_keys.len())?;
        let (out, lse) = match sq {
            CpuStorage::F32(_) => {
                let (out, lse) =
                    self.forward::<f32>(elements(sq, lq)?, elements(sk, lk)?, elements(sv, lv)?, d);
                (CpuStorage::F32(out), lse)
            }
            CpuStorage::F64(_) => {
                let (out, lse) =
                    self.forward::<f64>(elements(sq, lq)?, elements(sk, lk)?, elements(sv, lv)?, d);
                (CpuStorage::F64(out), lse)
            }
            _ => candle_core::bail!("attention: operands must be f32 or f64"),
        };
        *self.log_sum_exp.lock().expect("not poisoned") = Some(lse);
        Ok((out, Shape::from((d.batch, d.seq, d.out_stride()))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(q.shape(), k.shape(), v.shape(), self.real_keys.len())?;
        let guard = self.log_sum_exp.lock().expect("not poisoned");
        let Some(lse) = guard.as_ref() else {
            candle_core::bail!("attention: backward before forward");
        };
        fn grads<T: Real>(
            op: &CausalAttention,
            [q, k, v, out, grad]: [&Tensor; 5],
            lse: &[f64],
            d: Dims,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            with_elements::<T, _>(&[q, k, v, out, grad], |s| {
                let (dq, dk, dv) = op.backward((s[0], s[1], s[2]), s[3], s[4], lse, d);
                Ok((
                    Tensor::from_vec(dq, q.shape(), q.device())?,
                    Tensor::from_vec(dk, k.shape(), k.device())?,
                    Tensor::from_vec(dv, v.shape(), v.device())?,
                ))
            })
        }
        let tensors = [q, k, v, res, grad_res];
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => grads::<f32>(self, tensors, lse, d)?,
            DType::F64 => grads::<f64>(self, tensors, lse, d)?,
            other => candle_core::bail!("attention: {other:?} operands (f32 or f64)"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod exp_tests {
    use super::exp_f32;

    #[test]
    fn the_lane_max_is_the_ordered_fold() {
        let values: Vec<f32> = (0..37)
            .map(|i| match i % 11 {
                3 => f32::NAN,
                7 => f32::NEG_INFINITY,
                _ => ((i * 7919) % 101) as f32 - 50.0,
            })
            .collect();
        for end in 0..values.len() {
            let xs = &values[..end];
            let folded = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(super::max_of(xs).to_bits(), folded.to_bits(), "first {end}");
        }
        assert_eq!(super::max_of(&[f32::NAN; 9]), f32::NEG_INFINITY);
    }

    #[test]
    fn the_fast_exp_is_within_two_ulp_of_libm_and_saturates() {
        let ulp_distance = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut x = -87.3f32;
        while x < 88.3 {
            let (fast, libm) = (exp_f32(x), x.exp());
            assert!(
                ulp_distance(fast, libm) <= 2,
                "e^{x}: {fast} against {libm}"
            );
            x += 0.0137;
        }
        for x in [0.0f32, -0.0, 1.0, -1.0, 1e-8, -1e-8] {
            assert!(ulp_distance(exp_f32(x), x.exp()) <= 2, "{x}");
        }
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_gradient, max_abs, project, test_values};
    use candle_core::{Device, Var};

    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(test_values(n, seed), shape, &Device::Cpu).unwrap()
    }

    /// Sequence 0 right-padded, sequence 1 left-padded (its first rows see no key).
    fn padded_mask(seq: usize) -> AttentionMask {
        let mut mask = vec![1u32; 2 * seq];
        mask[seq - 3..seq].fill(0);
        mask[seq..seq + 4].fill(0);
        AttentionMask::new(&Tensor::from_vec(mask, (2, seq), &Device::Cpu).unwrap()).unwrap()
    }

    fn fused(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        q.apply_op3(k, v, CausalAttention::new(mask.real_keys()?, scale))
    }

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        causal_attention_composed(q, k, v, mask.bias()?, scale)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b).unwrap())
    }

    /// Over more than one query block, with GQA and both kinds of padding: the fused op's
    /// output and its gradients equal the composed form's.
    #[test]
    fn fused_attention_matches_the_composed_form() {
        let seq = QUERY_BLOCK + 6;
        let mask = padded_mask(seq);
        for dtype in [DType::F64, DType::F32] {
            let q = Var::from_tensor(&tensor(&[2, 4, seq, 8], 1).to_dtype(dtype).unwrap()).unwrap();
            let k = Var::from_tensor(&tensor(&[2, 2, seq, 8], 2).to_dtype(dtype).unwrap()).unwrap();
            let v = Var::from_tensor(&tensor(&[2, 2, seq, 8], 3).to_dtype(dtype).unwrap()).unwrap();
            let run = |f: fn(&Tensor, &Tensor, &Tensor, &AttentionMask) -> Result<Tensor>| {
                let out = f(&q, &k, &v, &mask).unwrap();
                let grads = project(&out, 4).unwrap().backward().unwrap();
                let grad = |x: &Var| grads.get(x).expect("a gradient").clone();
                (out, [grad(&q), grad(&k), grad(&v)])
            };
            let (out_f, grads_f) = run(fused);
            let (out_c, grads_c) = run(composed);
            // The composed form's softmax runs in f32 even for f64 operands (as transformers'
            // does), so both dtypes agree to f32 precision; finite differences check f64.
            let tol = 2e-6;
            let diff = max_abs_diff(&out_f, &out_c);
            assert!(diff < tol, "{dtype:?} output: {diff}");
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(grads_f.iter().zip(&grads_c)) {
                let diff = max_abs_diff(a, b);
                assert!(diff < tol, "{dtype:?} d{name}: {diff}");
            }
        }
    }

    #[test]
    fn fused_attention_gradients_match_finite_differences() {
        let seq = 5;
        let mut mask = vec![1u32; 2 * seq];
        mask[seq + 1] = 0;
        let mask =
            AttentionMask::new(&Tensor::from_vec(mask, (2, seq), &Device::Cpu).unwrap()).unwrap();
        let (q, k, v) = (
            tensor(&[2, 2, seq, 3], 5),
            tensor(&[2, 1, seq, 3], 6),
            tensor(&[2, 1, seq, 3], 7),
        );
        check_gradient(&[2, 2, seq, 3], 8, |q| {
            project(&fused(q, &k, &v, &mask)?, 9)
        });
        check_gradient(&[2, 1, seq, 3], 10, |k| {
            project(&fused(&q, k, &v, &mask)?, 9)
        });
        check_gradient(&[2, 1, seq, 3], 11, |v| {
            project(&fused(&q, &k, v, &mask)?, 9)
        });
    }

    #[test]
    fn a_row_that_sees_no_key_averages_every_value() {
        let mask = padded_mask(QUERY_BLOCK + 6);
        let v = tensor(&[2, 2, QUERY_BLOCK + 6, 8], 3);
        let q = tensor(&[2, 4, QUERY_BLOCK + 6, 8], 1);
        let k = tensor(&[2, 2, QUERY_BLOCK + 6, 8], 2);
        let out = fused(&q, &k, &v, &mask).unwrap();
        // sequence 1, row 0, head 0 (reads kv head 0): the mean of its values
        let row = out.get(1).unwrap().get(0).unwrap().narrow(0, 0, 8).unwrap();
        let mean = v.get(1).unwrap().get(0).unwrap().mean(0).unwrap();
        assert!(max_abs_diff(&row, &mean) < 1e-12);
    }
}
