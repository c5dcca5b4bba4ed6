//! The output projection and the causal-LM cross-entropy as one CPU op: logits are computed a
//! block of rows at a time and never exist whole (for a 32k vocabulary they are the largest
//! tensors of a step, twice over with their gradient).
//!
//! The loss is the last op before the scalar the backward starts from, so its upstream
//! gradient is a scalar: the forward pass computes the gradients for an upstream of 1 while each
//! block's logits are at hand, and the backward pass scales them. Blocks run in order, each
//! matmul parallel inside, so the weight's gradient sums in a fixed order.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::attention::{gemm_into, Real};
use super::fused::elements;
use super::{CrossEntropySum, HeadLoss, IGNORE_INDEX};

/// Logits alive at a time, in elements (64 MiB in f32): 524 rows of a 32k vocabulary, 110 of a
/// 152k one. Fewer, taller blocks run the three products faster (skinny ones pack poorly) and
/// add into dW fewer times.
const LOGITS_PER_BLOCK: usize = 1 << 24;

/// Rows of logits per block for a vocabulary.
fn row_block(vocab: usize) -> usize {
    (LOGITS_PER_BLOCK / vocab.max(1)).max(1)
}

/// `sum over labelled rows r of logsumexp(x_r Wᵀ) − (x_r Wᵀ)[target_r]` for x (rows, hidden)
/// and W (vocab, hidden), with the argmax metrics on the side.
struct HeadCrossEntropy {
    targets: Arc<[i64]>,
    with_grad: bool,
    /// Rows of logits computed at a time.
    row_block: usize,
    /// (dx, dW) for an upstream gradient of 1, from the forward pass.
    grads: Mutex<Option<(CpuStorage, CpuStorage)>>,
    /// Whether each row's argmax is its target (false for unlabelled rows); shared with the
    /// caller, which reads it after the forward pass.
    correct: Arc<Mutex<Vec<bool>>>,
}

/// `dst = [dst +] a · b` for a row-major m × n `dst`, `a` (m × k) and `b` (k × n) as (pointer,
/// row stride, column stride), the threads of rayon's pool splitting it.
///
/// # Safety
/// As [`gemm_into`].
unsafe fn matmul<T: Real>(
    dims: (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
) {
    let threads = gemm::Parallelism::Rayon(crate::host::cpu_threads());
    gemm_into(dims, (dst, dims.1), accumulate, a, b, T::one(), threads)
}

/// One row of logits -> its loss `logsumexp(row) − row[target]` and argmax, the row turned into
/// the loss's gradient `softmax(row) − onehot(target)` in place. One exponential per logit,
/// in a loop of its own so that it vectorises; the sum runs in eight f64 lanes, in a fixed order.
fn into_loss_gradient<T: Real>(row: &mut [T], target: usize) -> (f64, usize) {
    // The max in lanes, then its first position: two loops that vectorise, where one
    // compare-and-select fold over the row would not.
    let max = super::attention::max_of(row);
    let argmax = if max == T::neg_infinity() {
        0
    } else {
        row.iter().position(|&v| v == max).unwrap_or(0)
    };
    let logit = WithDType::to_f64(row[target]);
    row.iter_mut().for_each(|v| *v = (*v - max).fast_exp());
    let mut lanes = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        lanes
            .iter_mut()
            .zip(chunk)
            .for_each(|(s, &v)| *s += WithDType::to_f64(v));
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| WithDType::to_f64(v))
        .sum();
    let sum = lanes.iter().sum::<f64>() + tail;
    let log_sum_exp = WithDType::to_f64(max) + sum.ln();
    let inv = T::from_f64(sum.recip());
    row.iter_mut().for_each(|v| *v *= inv);
    row[target] = T::from_f64((logit - log_sum_exp).exp() - 1.0);
    (log_sum_exp - logit, argmax)
}

/// (dx, dW) of the summed loss for an upstream gradient of 1.
type HeadGrads<T> = (Vec<T>, Vec<T>);

impl HeadCrossEntropy {
    /// The summed loss, and its gradients when `with_grad`.
    fn run<T: Real>(&self, x: &[T], w: &[T], hidden: usize) -> (f64, Option<HeadGrads<T>>) {
        let rows = x.len() / hidden;
        let vocab = w.len() / hidden;
        let mut loss = 0f64;
        let mut correct = vec![false; rows];
        let mut grads = self
            .with_grad
            .then(|| (vec![T::zero(); x.len()], vec![T::zero(); w.len()]));
        let mut logits = vec![T::zero(); self.row_block.min(rows) * vocab];
        for start in (0..rows).step_by(self.row_block) {
            let n = self.row_block.min(rows - start);
            let logits = &mut logits[..n * vocab];
            let x_blk = &x[start * hidden..(start + n) * hidden];
            // SAFETY: logits is n × vocab; x_blk n × hidden; w vocab × hidden (read as Wᵀ).
            unsafe {
                matmul(
                    (n, vocab, hidden),
                    logits.as_mut_ptr(),
                    false,
                    (x_blk.as_ptr(), hidden, 1),
                    (w.as_ptr(), 1, hidden),
                );
            }
            // Per row: the loss, the argmax, and softmax − onehot in place (0 if unlabelled).
            let per_row: Vec<(f64, bool)> = {
                use rayon::prelude::*;
                logits
                    .par_chunks_mut(vocab)
                    .enumerate()
                    .map(|(r, row)| {
                        let Ok(target) = usize::try_from(self.targets[start + r]) else {
                            row.fill(T::zero());
                            return (0.0, false);
                        };
                        let (row_loss, argmax) = into_loss_gradient(row, target);
                        (row_loss, argmax == target)
                    })
                    .collect()
            };
            for (r, (row_loss, hit)) in per_row.into_iter().enumerate() {
                loss += row_loss;
                correct[start + r] = hit;
            }
            if let Some((dx, dw)) = grads.as_mut() {
                // SAFETY: as above; dx's block is n × hidden, dw vocab × hidden.
                unsafe {
                    // dx = dlogits · W
                    matmul(
                        (n, hidden, vocab),
                        dx[start * hidden..].as_mut_ptr(),
                        false,
                        (logits.as_ptr(), vocab, 1),
                        (w.as_ptr(), hidden, 1),
                    );
                    // dW += dlogitsᵀ · x
                    matmul(
                        (vocab, hidden, n),
                        dw.as_mut_ptr(),
                        true,
                        (logits.as_ptr(), 1, vocab),
                        (x_blk.as_ptr(), hidden, 1),
                    );
                }
            }
        }
        *self.correct.lock().expect("not poisoned") = correct;
        (loss, grads)
    }
}

impl CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, hidden) = lx.shape().dims2()?;
        let (_, w_hidden) = lw.shape().dims2()?;
        if w_hidden != hidden || rows != self.targets.len() {
            candle_core::bail!(
                "head-cross-entropy: x {:?}, weight {:?}, {} targets",
                lx.shape(),
                lw.shape(),
                self.targets.len()
            );
        }
        let (loss, grads) = match sx {
            CpuStorage::F32(_) => {
                let (loss, g) = self.run::<f32>(elements(sx, lx)?, elements(sw, lw)?, hidden);
                let g = g.map(|(dx, dw)| (CpuStorage::F32(dx), CpuStorage::F32(dw)));
                (CpuStorage::F32(vec![loss as f32]), g)
            }
            CpuStorage::F64(_) => {
                let (loss, g) = self.run::<f64>(elements(sx, lx)?, elements(sw, lw)?, hidden);
                let g = g.map(|(dx, dw)| (CpuStorage::F64(dx), CpuStorage::F64(dw)));
                (CpuStorage::F64(vec![loss]), g)
            }
            _ => candle_core::bail!("head-cross-entropy: operands must be f32 or f64"),
        };
        *self.grads.lock().expect("not poisoned") = grads;
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((dx, dw)) = self.grads.lock().expect("not poisoned").take() else {
            candle_core::bail!("head-cross-entropy: backward of a forward without gradients");
        };
        let upstream = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((
            Some(scaled(dx, upstream, x.shape())?),
            Some(scaled(dw, upstream, w.shape())?),
        ))
    }
}

/// A gradient for an upstream gradient of 1, times `upstream` (in its own dtype, as candle's
/// `broadcast_mul` rounds it), in place and in parallel, as a tensor of `shape`.
fn scaled(grad: CpuStorage, upstream: f64, shape: &Shape) -> Result<Tensor> {
    fn scale<T: Real>(mut values: Vec<T>, by: T, shape: &Shape) -> Result<Tensor> {
        use rayon::prelude::*;
        if by != T::one() {
            values
                .par_chunks_mut(1 << 16)
                .for_each(|chunk| chunk.iter_mut().for_each(|v| *v *= by));
        }
        Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
    }
    match grad {
        CpuStorage::F32(values) => scale(values, upstream as f32, shape),
        CpuStorage::F64(values) => scale(values, upstream, shape),
        _ => candle_core::bail!("head-cross-entropy: gradients are f32 or f64"),
    }
}

/// The fused head loss for `x` (batch, seq, hidden) after the final norm and the output
/// projection `weight` (vocab, hidden), labels (batch, seq) not shifted; None where the op does
/// not run (off the CPU, half dtypes, fused ops off), for the caller's composed path.
/// `with_grad` false (evaluation) skips the gradients.
pub fn fused_head_loss(
    x: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> Result<Option<HeadLoss>> {
    let row_block = row_block(weight.dim(0)?);
    fused_head_loss_in_blocks(x, weight, labels, with_grad, row_block)
}

/// [`fused_head_loss`] with `row_block` rows of logits at a time.
fn fused_head_loss_in_blocks(
    x: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    with_grad: bool,
    row_block: usize,
) -> Result<Option<HeadLoss>> {
    if !super::fused_on(x) || weight.dtype() != x.dtype() {
        return Ok(None);
    }
    let (batch, seq, hidden) = x.dims3()?;
    let vocab = weight.dim(0)?;
    let targets = super::shifted_targets(labels, vocab)?;
    let num_tokens = targets.iter().filter(|&&t| t >= 0).count();
    let correct = Arc::new(Mutex::new(Vec::new()));
    let op = HeadCrossEntropy {
        targets: targets.clone().into(),
        with_grad,
        row_block,
        grads: Mutex::new(None),
        correct: correct.clone(),
    };
    let rows = x.reshape((batch * seq, hidden))?.contiguous()?;
    let sum = if with_grad {
        rows.apply_op2(&weight.contiguous()?, op)?
    } else {
        rows.apply_op2_no_bwd(&weight.contiguous()?, &op)?
    };
    let correct = std::mem::take(&mut *correct.lock().expect("not poisoned"));
    let num_correct_tokens = correct.iter().filter(|&&c| c).count();
    let num_exact_rows = (0..batch)
        .filter(|&b| {
            let row = b * seq..(b + 1) * seq;
            let labelled = targets[row.clone()].iter().any(|&t| t != IGNORE_INDEX);
            labelled && row.clone().all(|r| targets[r] < 0 || correct[r])
        })
        .count();
    Ok(Some(HeadLoss {
        ce: CrossEntropySum { sum, num_tokens },
        num_correct_tokens,
        num_exact_rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::test_values;
    use candle_core::{DType, Device, Var};

    fn max_rel_diff(a: &Tensor, reference: &Tensor) -> f64 {
        crate::ops::tests::max_rel_diff(a, reference, 1e-12)
    }

    /// Over more than one row block, with ignored labels: the fused op's loss, metrics and
    /// gradients equal those of the projection followed by the cross-entropy op.
    #[test]
    fn fused_head_loss_matches_projection_then_cross_entropy() {
        let (batch, seq, hidden, vocab) = (3, 70, 16, 50);
        let mut labels: Vec<i64> = test_values(batch * seq, 3)
            .iter()
            .map(|v| ((v + 1.0) * 24.0) as i64)
            .collect();
        labels[5..9].fill(IGNORE_INDEX);
        labels[2 * seq..3 * seq].fill(7); // a sequence the argmax may get wholly right
        let labels = Tensor::from_vec(labels, (batch, seq), &Device::Cpu).unwrap();
        for dtype in [DType::F64, DType::F32] {
            let var = |n: usize, shape: &[usize], seed| {
                let t = Tensor::from_vec(test_values(n, seed), shape, &Device::Cpu).unwrap();
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
            };
            let x = var(batch * seq * hidden, &[batch, seq, hidden], 1);
            let w = var(vocab * hidden, &[vocab, hidden], 2);
            // 210 rows in blocks of 64 (three full blocks and a partial one), and in the one
            // block this vocabulary gets by default.
            for block in [64, row_block(vocab)] {
                let fused = fused_head_loss_in_blocks(&x, &w, &labels, true, block)
                    .unwrap()
                    .unwrap();
                let logits = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let reference = super::super::head_loss_from_logits(&logits, &labels).unwrap();
                assert_eq!(fused.ce.num_tokens, reference.ce.num_tokens);
                assert_eq!(fused.num_correct_tokens, reference.num_correct_tokens);
                assert_eq!(fused.num_exact_rows, reference.num_exact_rows);
                let scale = 0.37;
                let gf = (&fused.ce.sum * scale).unwrap().backward().unwrap();
                let gr = (&reference.ce.sum * scale).unwrap().backward().unwrap();
                let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
                assert!(
                    max_rel_diff(&fused.ce.sum, &reference.ce.sum) < tol,
                    "{dtype:?} loss, blocks of {block}"
                );
                for v in [&x, &w] {
                    let d = max_rel_diff(gf.get(v).unwrap(), gr.get(v).unwrap());
                    assert!(d < tol, "{dtype:?} gradient, blocks of {block}: {d}");
                }
            }
        }
    }
}
