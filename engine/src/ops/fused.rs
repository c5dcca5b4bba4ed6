//! RMSNorm, rotary embedding and SwiGLU as single CPU ops with hand-written backward passes.
//!
//! Composed from candle ops, RMSNorm is ten graph nodes and RoPE seven; candle's backward
//! allocates a zero gradient for every node and adds into it, so on the CPU these element-wise
//! chains cost more than the matmuls around them. Each op here is one node, one pass forward
//! and one back. Rows are split into blocks of a size fixed by the shape alone, so results do
//! not depend on the thread count (exact resume holds across machines).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::Real;

/// Rows per block: about 64 Ki elements, so a block is worth a task.
fn rows_per_block(row_len: usize) -> usize {
    (1usize << 16).div_ceil(row_len.max(1)).max(1)
}

/// `f(first_row, block)` over the row blocks of `out`, in parallel when there is more than one;
/// returns each block's result in block order.
pub(super) fn map_row_blocks<T: Send, R: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let block = rows_per_block(row_len);
    if out.len() <= block * row_len {
        return vec![f(0, out)];
    }
    out.par_chunks_mut(block * row_len)
        .enumerate()
        .map(|(i, chunk)| f(i * block, chunk))
        .collect()
}

/// The contiguous elements of a CPU storage as `T`.
pub(super) fn elements<'a, T: Real>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a fused op needs contiguous operands");
    };
    Ok(&T::cpu_storage_as_slice(storage)?[start..end])
}

/// Calls `f` with the elements of CPU tensors (each made contiguous first).
pub(super) fn with_elements<T: Real, R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let candle_core::Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("a fused CPU op got a tensor on another device");
        };
        slices.push(elements::<T>(cpu, layout)?);
    }
    f(&slices)
}

/// Dispatches a body generic over [`Real`] on a CPU storage's dtype (f32 or f64).
macro_rules! by_dtype {
    ($name:expr, $storage:expr, |$t:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: operands must be f32 or f64", $name),
        }
    };
}

/// Same for a tensor's dtype, the body yielding a `Result`.
macro_rules! by_tensor_dtype {
    ($name:expr, $tensor:expr, |$t:ident| $body:expr) => {
        match $tensor.dtype() {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: {other:?} operands (f32 or f64)", $name),
        }
    };
}
pub(super) use {by_dtype, by_tensor_dtype};

/// `weight * x / sqrt(mean(x²) + eps)` over the last dimension (see [`super::rms_norm`]).
pub struct RmsNorm {
    pub eps: f64,
}

impl RmsNorm {
    fn inv_rms<T: Real>(&self, row: &[T]) -> T {
        let mean_square =
            row.iter().fold(T::zero(), |s, &v| s + v * v) / T::from_f64(row.len() as f64);
        (mean_square + T::from_f64(self.eps)).sqrt().recip()
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let dim = w.len();
        let mut y = vec![T::zero(); x.len()];
        map_row_blocks(&mut y, dim, |first, block| {
            for (r, out) in block.chunks_mut(dim).enumerate() {
                let row = &x[(first + r) * dim..(first + r + 1) * dim];
                let inv = self.inv_rms(row);
                for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
                    *o = v * inv * g;
                }
            }
        });
        y
    }

    /// (dx, dweight): with `n = x · r` and `g = dy ∘ w`, `dx = r (g − n · mean(g ∘ n))` and
    /// `dweight = Σ_rows dy ∘ n`.
    fn backward<T: Real>(&self, x: &[T], w: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let dim = w.len();
        let mut dx = vec![T::zero(); x.len()];
        let partials = map_row_blocks(&mut dx, dim, |first, block| {
            let mut dw = vec![T::zero(); dim];
            for (r, out) in block.chunks_mut(dim).enumerate() {
                let at = (first + r) * dim;
                let (row, dy) = (&x[at..at + dim], &dy[at..at + dim]);
                let inv = self.inv_rms(row);
                let mut dot = T::zero();
                for ((&v, &d), &g) in row.iter().zip(dy).zip(w) {
                    dot += d * g * v * inv;
                }
                let mean = dot / T::from_f64(dim as f64);
                for (i, o) in out.iter_mut().enumerate() {
                    let n = row[i] * inv;
                    *o = inv * (dy[i] * w[i] - n * mean);
                    dw[i] += dy[i] * n;
                }
            }
            dw
        });
        let mut dw = vec![T::zero(); dim];
        for partial in partials {
            dw.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
        }
        (dx, dw)
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = lx.shape().dims().last().copied().unwrap_or(0);
        if lw.shape().dims() != [dim] {
            candle_core::bail!("rms-norm: weight {:?} for rows of {dim}", lw.shape());
        }
        let out = by_dtype!("rms-norm", sx, |T| self
            .forward::<T>(elements(sx, lx)?, elements(sw, lw)?));
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) =
            by_tensor_dtype!("rms-norm", x, |T| with_elements::<T, _>(&[x, w, dy], |s| {
                let (dx, dw) = self.backward(s[0], s[1], s[2]);
                Ok((
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    Tensor::from_vec(dw, w.shape(), w.device())?,
                ))
            }))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Rotate-half rotary embedding of x (…, seq, head_dim) by tables (seq, head_dim) (see
/// [`super::apply_rotary`]); the tables get no gradient.
pub struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rotary {
    /// `y = x ∘ cos + rotate_half(x) ∘ sin`, or with `transpose` its adjoint
    /// `dx = dy ∘ cos + rotate_halfᵀ(dy ∘ sin)`, the backward pass.
    fn rotate<T: Real>(x: &[T], cos: &[T], sin: &[T], dim: usize, transpose: bool) -> Vec<T> {
        let seq = cos.len() / dim;
        let mut y = vec![T::zero(); x.len()];
        map_row_blocks(&mut y, dim, |first, block| {
            for (r, out) in block.chunks_mut(dim).enumerate() {
                let row = first + r;
                let at = (row % seq) * dim;
                rotate_row(
                    &x[row * dim..(row + 1) * dim],
                    (&cos[at..at + dim], &sin[at..at + dim]),
                    out,
                    transpose,
                );
            }
        });
        y
    }

    /// x's head_dim, once the tables are checked to fit x (…, seq, head_dim).
    fn head_dim(&self, dims: &[usize]) -> Result<usize> {
        let [.., seq, dim] = dims else {
            candle_core::bail!("rotary: x {dims:?} has no (seq, head_dim)");
        };
        if self.cos.dims() != [*seq, *dim] || self.sin.dims() != [*seq, *dim] || dim % 2 != 0 {
            candle_core::bail!("rotary: tables {:?} for x {dims:?}", self.cos.shape());
        }
        Ok(*dim)
    }

    fn run(&self, x: &Tensor, transpose: bool) -> Result<Tensor> {
        let dim = self.head_dim(x.dims())?;
        by_tensor_dtype!("rotary", x, |T| with_elements::<T, _>(
            &[x, &self.cos, &self.sin],
            |s| Tensor::from_vec(
                Self::rotate(s[0], s[1], s[2], dim, transpose),
                x.shape(),
                x.device()
            )
        ))
    }
}

/// One row's rotate-half rotation by its position's (cos, sin) rows, or with `transpose` its
/// adjoint (the backward pass).
pub(super) fn rotate_row<T: Real>(x: &[T], (c, s): (&[T], &[T]), out: &mut [T], transpose: bool) {
    let half = x.len() / 2;
    for j in 0..half {
        let (lo, hi) = (j, j + half);
        if transpose {
            out[lo] = x[lo] * c[lo] + x[hi] * s[hi];
            out[hi] = x[hi] * c[hi] - x[lo] * s[lo];
        } else {
            out[lo] = x[lo] * c[lo] - x[hi] * s[lo];
            out[hi] = x[hi] * c[hi] + x[lo] * s[hi];
        }
    }
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = self.head_dim(layout.shape().dims())?;
        let out = by_dtype!("rotary", storage, |T| with_elements::<T, _>(
            &[&self.cos, &self.sin],
            |s| Ok(Self::rotate::<T>(
                elements(storage, layout)?,
                s[0],
                s[1],
                dim,
                false
            ))
        )?);
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        self.run(dy, true).map(Some)
    }
}

/// `silu(gate) ∘ up`, the SwiGLU activation (see [`super::swiglu`]).
pub struct SwiGlu;

impl SwiGlu {
    fn forward<T: Real>(gate: &[T], up: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); gate.len()];
        map_row_blocks(&mut y, 1, |first, block| {
            for (i, o) in block.iter_mut().enumerate() {
                let g = gate[first + i];
                *o = g / (T::one() + (-g).fast_exp()) * up[first + i];
            }
        });
        y
    }

    /// (dgate, dup): with `s = sigmoid(gate)`, `dgate = dy ∘ up ∘ s (1 + gate (1 − s))` and
    /// `dup = dy ∘ gate ∘ s`.
    fn backward<T: Real>(gate: &[T], up: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let mut dgate = vec![T::zero(); gate.len()];
        let mut dup = vec![T::zero(); gate.len()];
        let block = rows_per_block(1);
        let work = |first: usize, dg: &mut [T], du: &mut [T]| {
            for i in 0..dg.len() {
                let (g, u, d) = (gate[first + i], up[first + i], dy[first + i]);
                let s = (T::one() + (-g).fast_exp()).recip();
                dg[i] = d * u * s * (T::one() + g * (T::one() - s));
                du[i] = d * g * s;
            }
        };
        if gate.len() <= block {
            work(0, &mut dgate, &mut dup);
        } else {
            dgate
                .par_chunks_mut(block)
                .zip(dup.par_chunks_mut(block))
                .enumerate()
                .for_each(|(i, (dg, du))| work(i * block, dg, du));
        }
        (dgate, dup)
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lg.shape() != lu.shape() {
            candle_core::bail!("swiglu: gate {:?}, up {:?}", lg.shape(), lu.shape());
        }
        let out = by_dtype!("swiglu", sg, |T| Self::forward::<T>(
            elements(sg, lg)?,
            elements(su, lu)?
        ));
        Ok((out, lg.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = by_tensor_dtype!("swiglu", gate, |T| with_elements::<T, _>(
            &[gate, up, dy],
            |s| {
                let (dg, du) = Self::backward(s[0], s[1], s[2]);
                Ok((
                    Tensor::from_vec(dg, gate.shape(), gate.device())?,
                    Tensor::from_vec(du, up.shape(), up.device())?,
                ))
            }
        ))?;
        Ok((Some(dg), Some(du)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{apply_rotary, apply_rotary_composed, rms_norm, rms_norm_composed, silu};
    use super::*;
    use crate::ops::tests::{project, test_values};
    use candle_core::{DType, Device, Var};

    fn var(shape: &[usize], seed: u64, dtype: DType) -> Var {
        let n = shape.iter().product();
        let t = Tensor::from_vec(test_values(n, seed), shape, &Device::Cpu).unwrap();
        Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
    }

    fn max_abs_diff(a: &Tensor, reference: &Tensor) -> f64 {
        crate::ops::tests::max_rel_diff(a, reference, 1.0)
    }

    /// The fused and composed forms agree on values and on the gradients of every input, over
    /// more than one row block (the parallel path).
    fn agree(
        inputs: &[&Var],
        fused: impl Fn() -> Result<Tensor>,
        composed: impl Fn() -> Result<Tensor>,
        tol: f64,
    ) {
        let run = |f: &dyn Fn() -> Result<Tensor>| {
            let y = f().unwrap();
            let grads = project(&y, 99).unwrap().backward().unwrap();
            let g: Vec<Tensor> = inputs
                .iter()
                .map(|v| grads.get(v).unwrap().clone())
                .collect();
            (y, g)
        };
        let (yf, gf) = run(&fused);
        let (yc, gc) = run(&composed);
        assert!(
            max_abs_diff(&yf, &yc) < tol,
            "values: {}",
            max_abs_diff(&yf, &yc)
        );
        for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
            assert!(
                max_abs_diff(a, b) < tol,
                "gradient {i}: {}",
                max_abs_diff(a, b)
            );
        }
    }

    #[test]
    fn fused_ops_match_their_composed_forms() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = var(&[3, 700, 64], 1, dtype);
            let w = var(&[64], 2, dtype);
            agree(
                &[&x, &w],
                || rms_norm(&x, &w, 1e-6),
                || rms_norm_composed(&x, &w, 1e-6),
                tol,
            );
            let (gate, up) = (var(&[3, 700, 64], 3, dtype), var(&[3, 700, 64], 4, dtype));
            agree(
                &[&gate, &up],
                || super::super::swiglu(&gate, &up),
                || silu(&gate)? * up.as_tensor(),
                tol,
            );
            let x = var(&[3, 4, 175, 64], 5, dtype);
            let rope = crate::ops::RotaryEmbedding::new(64, 10_000.0, 175, &Device::Cpu).unwrap();
            let (cos, sin) = rope.tables(dtype).unwrap();
            agree(
                &[&x],
                || apply_rotary(&x, &cos, &sin),
                || apply_rotary_composed(&x, &cos, &sin),
                tol,
            );
        }
    }
}
