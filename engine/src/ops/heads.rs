//! A projection's output split into attention heads, (batch, seq, heads, head_dim) ->
//! (batch, heads, seq, head_dim), rotated by the rotary tables on the way when given: one node
//! where the composed form is a transpose, a copy and the rotation, each with candle's
//! zero-then-add backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::attention::Real;
use super::fused::{
    by_dtype, by_tensor_dtype, elements, map_row_blocks, rotate_row, with_elements,
};

/// (seq, head_dim) cos and sin tables, contiguous, in the input's dtype.
pub struct SplitHeads {
    pub rotary: Option<(Tensor, Tensor)>,
}

impl SplitHeads {
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (b, t, h, d) = shape.dims4()?;
        if let Some((cos, sin)) = &self.rotary {
            if cos.dims() != [t, d] || sin.dims() != [t, d] || d % 2 != 0 {
                candle_core::bail!("split-heads: tables {:?} for {shape:?}", cos.shape());
            }
        }
        Ok((b, t, h, d))
    }

    /// Forward (`adjoint` false): out (b, h, t, d) from x (b, t, h, d). Backward (`adjoint`
    /// true): out (b, t, h, d) from dy (b, h, t, d), each row rotated back.
    fn run<T: Real>(
        src: &[T],
        tables: Option<(&[T], &[T])>,
        (_b, t, h, d): (usize, usize, usize, usize),
        adjoint: bool,
    ) -> Vec<T> {
        let mut out = vec![T::zero(); src.len()];
        map_row_blocks(&mut out, d, |first, block| {
            for (r, row) in block.chunks_mut(d).enumerate() {
                let at = first + r;
                // The output row's position, and where its input row starts.
                let (ti, from) = if adjoint {
                    let (bi, ti, hi) = (at / (t * h), at / h % t, at % h);
                    (ti, ((bi * h + hi) * t + ti) * d)
                } else {
                    let (bi, hi, ti) = (at / (h * t), at / t % h, at % t);
                    (ti, ((bi * t + ti) * h + hi) * d)
                };
                let x = &src[from..from + d];
                match tables {
                    Some((cos, sin)) => {
                        let table = (&cos[ti * d..(ti + 1) * d], &sin[ti * d..(ti + 1) * d]);
                        rotate_row(x, table, row, adjoint);
                    }
                    None => row.copy_from_slice(x),
                }
            }
        });
        out
    }

    fn apply<T: Real>(
        &self,
        src: &[T],
        dims: (usize, usize, usize, usize),
        adjoint: bool,
    ) -> Result<Vec<T>> {
        match &self.rotary {
            Some((cos, sin)) => with_elements::<T, _>(&[cos, sin], |s| {
                Ok(Self::run(src, Some((s[0], s[1])), dims, adjoint))
            }),
            None => Ok(Self::run(src, None, dims, adjoint)),
        }
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, d) = self.dims(layout.shape())?;
        let out = by_dtype!("split-heads", storage, |T| self.apply::<T>(
            elements(storage, layout)?,
            (b, t, h, d),
            false
        )?);
        Ok((out, Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dims = self.dims(x.shape())?;
        let dx = by_tensor_dtype!("split-heads", x, |T| with_elements::<T, _>(&[dy], |s| {
            Tensor::from_vec(self.apply::<T>(s[0], dims, true)?, x.shape(), x.device())
        }))?;
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{split_heads, RotaryEmbedding};
    use crate::ops::tests::{project, test_values};
    use candle_core::{DType, Device, Result, Tensor, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    }

    #[test]
    fn split_heads_matches_transpose_then_rotate_values_and_gradients() -> Result<()> {
        let (b, t, h, d) = (2, 5, 3, 8);
        let device = Device::Cpu;
        let rotary = RotaryEmbedding::new(d, 10_000.0, 16, &device)?;
        let x = Var::from_tensor(&Tensor::from_vec(
            test_values(b * t * h * d, 7),
            (b, t, h, d),
            &device,
        )?)?;
        for rot in [Some(&rotary), None] {
            let fused = split_heads(x.as_tensor(), rot)?;
            let heads = x.as_tensor().transpose(1, 2)?.contiguous()?;
            let plain = match rot {
                Some(r) => r.apply(&heads)?,
                None => heads,
            };
            assert_eq!(fused.dims(), &[b, h, t, d]);
            assert!(max_diff(&fused, &plain)? < 1e-12);
            let gf = project(&fused, 9)?.backward()?;
            let gp = project(&plain, 9)?.backward()?;
            let (gf, gp) = (
                gf.get(x.as_tensor()).unwrap(),
                gp.get(x.as_tensor()).unwrap(),
            );
            assert!(max_diff(gf, gp)? < 1e-12);
        }
        Ok(())
    }
}
