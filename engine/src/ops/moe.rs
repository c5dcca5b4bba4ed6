//! A Mixture-of-Experts layer's SwiGLU experts as one CPU op with its backward.
//!
//! Composed, each expert reads its rows as a narrow of the token rows sorted by expert, and
//! candle's backward of every narrow is a zero-padded gradient of the whole sorted batch: a
//! layer with E experts pays E full-batch passes. Here one node takes the token rows and the
//! experts' weights stacked into two banks, runs each expert on its own rows (experts in
//! parallel, each a gemm per projection), and hands back every gradient in one piece.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{gemm_into, Real};
use super::fused::{by_dtype, by_tensor_dtype, elements, with_elements};

/// Which token rows each expert runs on.
#[derive(Debug, Clone)]
pub struct ExpertRows {
    /// The token row of every pick, expert 0's picks first.
    pub rows: Arc<[u32]>,
    /// Picks per expert.
    pub counts: Vec<usize>,
}

impl ExpertRows {
    fn picks(&self) -> usize {
        self.rows.len()
    }

    /// Each expert's first pick.
    fn offsets(&self) -> Vec<usize> {
        self.counts
            .iter()
            .scan(0, |at, &c| {
                let first = *at;
                *at += c;
                Some(first)
            })
            .collect()
    }
}

/// `down_e(silu(gate_e(x_r)) ∘ up_e(x_r))` for every pick (token row r, expert e), in expert
/// order: x (rows, hidden), the gate/up bank (experts · 2 · inter, hidden) holding each
/// expert's gate rows then its up rows, the down bank (experts · hidden, inter) ->
/// (picks, hidden).
pub struct MoeExperts {
    experts: ExpertRows,
    hidden: usize,
    inter: usize,
    /// Every pick's gate and up projections (picks, inter) from the forward pass.
    saved: Mutex<Option<(Tensor, Tensor)>>,
}

impl MoeExperts {
    pub fn new(experts: ExpertRows, hidden: usize, inter: usize) -> Self {
        Self {
            experts,
            hidden,
            inter,
            saved: Mutex::new(None),
        }
    }

    fn check(&self, x: &Shape, gate_up: &Shape, down: &Shape) -> Result<()> {
        let (e, h, i) = (self.experts.counts.len(), self.hidden, self.inter);
        let rows = x.dims2()?.0;
        if x.dims() != [rows, h]
            || gate_up.dims() != [e * 2 * i, h]
            || down.dims() != [e * h, i]
            || self.experts.rows.iter().any(|&r| r as usize >= rows)
        {
            candle_core::bail!(
                "moe-experts: x {x:?}, gate/up bank {gate_up:?}, down bank {down:?} for {e} \
                 experts of {h} -> {i}"
            );
        }
        Ok(())
    }

    /// Expert e's rows of x, gathered.
    fn gather<T: Real>(&self, x: &[T], first: usize, count: usize) -> Vec<T> {
        let h = self.hidden;
        let mut rows = Vec::with_capacity(count * h);
        for &r in &self.experts.rows[first..first + count] {
            rows.extend_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
        }
        rows
    }

    /// (outputs (picks, hidden), gate and up projections (picks, inter) each).
    fn forward<T: Real>(&self, x: &[T], gate_up: &[T], down: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (h, i, picks) = (self.hidden, self.inter, self.experts.picks());
        let mut y = vec![T::zero(); picks * h];
        let mut g = vec![T::zero(); picks * i];
        let mut u = vec![T::zero(); picks * i];
        let work = per_expert(&self.experts, [(&mut y, h), (&mut g, i), (&mut u, i)]);
        let threads = inner_threads(self.experts.counts.len());
        work.into_par_iter()
            .for_each(|(e, first, count, [y, g, u])| {
                let xe = self.gather(x, first, count);
                let wg = &gate_up[e * 2 * i * h..];
                let wu = &gate_up[(e * 2 + 1) * i * h..];
                let wd = &down[e * h * i..];
                // SAFETY (all four): operands and destinations are the count × h, count × i and
                // bank slices sized above, with the strides given; destinations are this expert's
                // own chunks.
                unsafe {
                    gemm_into(
                        (count, i, h),
                        (g.as_mut_ptr(), i),
                        false,
                        (xe.as_ptr(), h, 1),
                        (wg.as_ptr(), 1, h),
                        T::one(),
                        threads,
                    );
                    gemm_into(
                        (count, i, h),
                        (u.as_mut_ptr(), i),
                        false,
                        (xe.as_ptr(), h, 1),
                        (wu.as_ptr(), 1, h),
                        T::one(),
                        threads,
                    );
                }
                let act: Vec<T> = g
                    .iter()
                    .zip(u.iter())
                    .map(|(&g, &u)| swish(g) * u)
                    .collect();
                unsafe {
                    gemm_into(
                        (count, h, i),
                        (y.as_mut_ptr(), h),
                        false,
                        (act.as_ptr(), i, 1),
                        (wd.as_ptr(), 1, i),
                        T::one(),
                        threads,
                    );
                }
            });
        (y, g, u)
    }

    /// (dx (rows, hidden), d gate/up bank, d down bank), each only when asked for.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        x: &[T],
        gate_up: &[T],
        down: &[T],
        g: &[T],
        u: &[T],
        dy: &[T],
        want_dx: bool,
        want_banks: bool,
    ) -> ExpertGrads<T> {
        let (h, i, picks) = (self.hidden, self.inter, self.experts.picks());
        let experts = self.experts.counts.len();
        // Each pick's input gradient, in pick order; summed into token rows below.
        let mut dxp = vec![T::zero(); if want_dx { picks * h } else { 0 }];
        let mut dgu = vec![T::zero(); if want_banks { experts * 2 * i * h } else { 0 }];
        let mut dd = vec![T::zero(); if want_banks { experts * h * i } else { 0 }];
        let offsets = self.experts.offsets();
        let dx_chunks = split_by(&mut dxp, &self.experts.counts, h);
        let gu_chunks = split_even(&mut dgu, experts, 2 * i * h);
        let d_chunks = split_even(&mut dd, experts, h * i);
        let threads = inner_threads(experts);
        dx_chunks
            .into_par_iter()
            .zip(gu_chunks)
            .zip(d_chunks)
            .enumerate()
            .for_each(|(e, ((dxe, dgue), dde))| {
                let (first, count) = (offsets[e], self.experts.counts[e]);
                if count == 0 {
                    return;
                }
                let xe = self.gather(x, first, count);
                let (ge, ue) = (
                    &g[first * i..(first + count) * i],
                    &u[first * i..(first + count) * i],
                );
                let dye = &dy[first * h..(first + count) * h];
                let wg = &gate_up[e * 2 * i * h..];
                let wu = &gate_up[(e * 2 + 1) * i * h..];
                let wd = &down[e * h * i..];
                // dact = dy Wd (count × i).
                let mut dact = vec![T::zero(); count * i];
                // SAFETY (every gemm below): operands are this expert's count × h / count × i
                // slices and bank rows with the strides given; destinations are its own chunks
                // or fresh buffers of the product's size.
                unsafe {
                    gemm_into(
                        (count, i, h),
                        (dact.as_mut_ptr(), i),
                        false,
                        (dye.as_ptr(), h, 1),
                        (wd.as_ptr(), i, 1),
                        T::one(),
                        threads,
                    );
                }
                let mut dg = vec![T::zero(); count * i];
                let mut du = vec![T::zero(); count * i];
                let mut act = vec![T::zero(); if want_banks { count * i } else { 0 }];
                for k in 0..count * i {
                    let (gk, uk, d) = (ge[k], ue[k], dact[k]);
                    let s = (T::one() + (-gk).fast_exp()).recip();
                    dg[k] = d * uk * s * (T::one() + gk * (T::one() - s));
                    du[k] = d * gk * s;
                    if want_banks {
                        act[k] = gk * s * uk;
                    }
                }
                if want_dx {
                    unsafe {
                        gemm_into(
                            (count, h, i),
                            (dxe.as_mut_ptr(), h),
                            false,
                            (dg.as_ptr(), i, 1),
                            (wg.as_ptr(), h, 1),
                            T::one(),
                            threads,
                        );
                        gemm_into(
                            (count, h, i),
                            (dxe.as_mut_ptr(), h),
                            true,
                            (du.as_ptr(), i, 1),
                            (wu.as_ptr(), h, 1),
                            T::one(),
                            threads,
                        );
                    }
                }
                if want_banks {
                    let (dwg, dwu) = dgue.split_at_mut(i * h);
                    unsafe {
                        // dWg = dgᵀ x, dWu = duᵀ x (i × h); dWd = dyᵀ act (h × i).
                        gemm_into(
                            (i, h, count),
                            (dwg.as_mut_ptr(), h),
                            false,
                            (dg.as_ptr(), 1, i),
                            (xe.as_ptr(), h, 1),
                            T::one(),
                            threads,
                        );
                        gemm_into(
                            (i, h, count),
                            (dwu.as_mut_ptr(), h),
                            false,
                            (du.as_ptr(), 1, i),
                            (xe.as_ptr(), h, 1),
                            T::one(),
                            threads,
                        );
                        gemm_into(
                            (h, i, count),
                            (dde.as_mut_ptr(), i),
                            false,
                            (dye.as_ptr(), 1, h),
                            (act.as_ptr(), i, 1),
                            T::one(),
                            threads,
                        );
                    }
                }
            });
        let dx = want_dx.then(|| {
            let rows = x.len() / h;
            let mut dx = vec![T::zero(); rows * h];
            // In pick order (expert order within a row), whatever the thread count.
            for (p, &r) in self.experts.rows.iter().enumerate() {
                let (dst, src) = (
                    &mut dx[r as usize * h..(r as usize + 1) * h],
                    &dxp[p * h..(p + 1) * h],
                );
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
            }
            dx
        });
        (dx, want_banks.then_some((dgu, dd)))
    }
}

/// (dx, (d gate/up bank, d down bank)) of [`MoeExperts::backward`], each when asked for.
type ExpertGrads<T> = (Option<Vec<T>>, Option<(Vec<T>, Vec<T>)>);

fn swish<T: Real>(g: T) -> T {
    g / (T::one() + (-g).fast_exp())
}

/// Experts run in parallel, so each expert's products stay on one thread unless there are
/// fewer experts than threads.
fn inner_threads(experts: usize) -> gemm::Parallelism {
    let threads = crate::host::cpu_threads();
    if experts >= threads {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

/// `buf` cut into one chunk per expert of `counts[e] · width` elements.
fn split_by<'a, T>(mut buf: &'a mut [T], counts: &[usize], width: usize) -> Vec<&'a mut [T]> {
    let mut chunks = Vec::with_capacity(counts.len());
    for &c in counts {
        let len = (c * width).min(buf.len());
        let (chunk, rest) = buf.split_at_mut(len);
        chunks.push(chunk);
        buf = rest;
    }
    chunks
}

/// `buf` cut into `n` chunks of `len` (empty chunks when `buf` is empty).
fn split_even<T>(buf: &mut [T], n: usize, len: usize) -> Vec<&mut [T]> {
    split_by(buf, &vec![1; n], len)
}

/// Each expert's (index, first pick, picks, its chunks of the per-pick buffers).
#[allow(clippy::type_complexity)]
fn per_expert<'a, T, const N: usize>(
    experts: &ExpertRows,
    buffers: [(&'a mut Vec<T>, usize); N],
) -> Vec<(usize, usize, usize, [&'a mut [T]; N])> {
    let mut chunks: Vec<std::vec::IntoIter<&'a mut [T]>> = buffers
        .into_iter()
        .map(|(buf, width)| split_by(buf, &experts.counts, width).into_iter())
        .collect();
    experts
        .offsets()
        .into_iter()
        .zip(&experts.counts)
        .enumerate()
        .map(|(e, (first, &count))| {
            let parts = std::array::from_fn(|k| chunks[k].next().expect("one chunk per expert"));
            (e, first, count, parts)
        })
        .collect()
}

impl CustomOp3 for MoeExperts {
    fn name(&self) -> &'static str {
        "moe-experts"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sgu: &CpuStorage,
        lgu: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(lx.shape(), lgu.shape(), ld.shape())?;
        let (picks, i) = (self.experts.picks(), self.inter);
        let saved;
        let y = by_dtype!("moe-experts", sx, |T| {
            let (y, g, u) =
                self.forward::<T>(elements(sx, lx)?, elements(sgu, lgu)?, elements(sd, ld)?);
            let device = candle_core::Device::Cpu;
            saved = (
                Tensor::from_vec(g, (picks, i), &device)?,
                Tensor::from_vec(u, (picks, i), &device)?,
            );
            y
        });
        *self.saved.lock().expect("moe-experts state") = Some(saved);
        Ok((y, Shape::from((picks, self.hidden))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((g, u)) = self.saved.lock().expect("moe-experts state").clone() else {
            candle_core::bail!("moe-experts: backward before forward");
        };
        let (want_dx, want_banks) = (x.track_op(), gate_up.track_op() || down.track_op());
        by_tensor_dtype!("moe-experts", x, |T| with_elements::<T, _>(
            &[x, gate_up, down, &g, &u, dy],
            |s| {
                let (dx, banks) =
                    self.backward(s[0], s[1], s[2], s[3], s[4], s[5], want_dx, want_banks);
                let dx = dx
                    .map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
                    .transpose()?;
                let (dgu, dd) = match banks {
                    Some((dgu, dd)) => (
                        Some(Tensor::from_vec(dgu, gate_up.shape(), gate_up.device())?),
                        Some(Tensor::from_vec(dd, down.shape(), down.device())?),
                    ),
                    None => (None, None),
                };
                Ok((dx, dgu, dd))
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::test_values;
    use candle_core::{DType, Device, Var};

    fn tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(test_values(n, seed), shape, &Device::Cpu)?.to_dtype(DType::F32)
    }

    /// The same function from candle ops, expert by expert.
    fn composed(
        x: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        experts: &ExpertRows,
    ) -> Result<Tensor> {
        let (h, i) = (x.dim(1)?, down.dim(1)?);
        let rows = Tensor::new(&experts.rows[..], &Device::Cpu)?;
        let sorted = x.index_select(&rows, 0)?;
        let mut outputs = Vec::new();
        for (e, (&first, &count)) in experts.offsets().iter().zip(&experts.counts).enumerate() {
            if count == 0 {
                continue;
            }
            let xe = sorted.narrow(0, first, count)?;
            let wg = gate_up.narrow(0, e * 2 * i, i)?;
            let wu = gate_up.narrow(0, e * 2 * i + i, i)?;
            let wd = down.narrow(0, e * h, h)?;
            let act = (xe.matmul(&wg.t()?)?.silu()? * xe.matmul(&wu.t()?)?)?;
            outputs.push(act.matmul(&wd.t()?)?);
        }
        Tensor::cat(&outputs, 0)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn the_experts_op_matches_the_composed_experts_values_and_gradients() -> Result<()> {
        let (rows, h, i, experts) = (7, 6, 5, 4);
        // Two picks per row; expert 2 gets no rows; rows ascending within each expert.
        let experts_rows = ExpertRows {
            rows: vec![0, 1, 3, 5, 6, 0, 2, 3, 4, 1, 2, 4, 5, 6].into(),
            counts: vec![5, 4, 0, 5],
        };
        let x = Var::from_tensor(&tensor(&[rows, h], 1)?)?;
        let gate_up = Var::from_tensor(&tensor(&[experts * 2 * i, h], 2)?)?;
        let down = Var::from_tensor(&tensor(&[experts * h, i], 3)?)?;
        let upstream = tensor(&[14, h], 4)?;

        let fused = super::super::moe_experts(&x, &gate_up, &down, experts_rows.clone())?;
        let plain = composed(&x, &gate_up, &down, &experts_rows)?;
        assert_eq!(fused.dims(), &[14, h]);
        assert!(max_diff(&fused, &plain)? < 1e-5);

        let fused_grads = (&fused * &upstream)?.sum_all()?.backward()?;
        let plain_grads = (&plain * &upstream)?.sum_all()?.backward()?;
        for v in [&x, &gate_up, &down] {
            let a = fused_grads.get(v.as_tensor()).expect("fused gradient");
            let b = plain_grads.get(v.as_tensor()).expect("composed gradient");
            assert!(max_diff(a, b)? < 1e-5, "{:?}", v.dims());
        }
        // The expert no row chose: zero gradients for its weights.
        let unused = fused_grads
            .get(gate_up.as_tensor())
            .unwrap()
            .narrow(0, 2 * 2 * i, 2 * i)?;
        assert_eq!(unused.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn inconsistent_shapes_are_errors() -> Result<()> {
        let experts = ExpertRows {
            rows: vec![0, 9].into(),
            counts: vec![1, 1],
        };
        let x = tensor(&[3, 4], 1)?;
        let gate_up = tensor(&[2 * 2 * 2, 4], 2)?;
        let down = tensor(&[2 * 4, 2], 3)?;
        // Row 9 of a 3-row batch.
        assert!(super::super::moe_experts(&x, &gate_up, &down, experts).is_err());
        Ok(())
    }
}
