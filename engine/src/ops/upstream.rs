//! Backward from a given upstream gradient: candle's backward starts only from a scalar, so a
//! layer differentiated on its own is seeded through a scalar whose gradient with respect to
//! the layer's output is the upstream gradient `g`. Composed, that scalar is `sum(out ∘ g)`:
//! a product and a sum forward, and backward a pass for each plus a gradient of `g` itself,
//! each through candle's zero-then-add. Here it is one node that hands `g` straight back.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// A scalar 0 whose gradient with respect to its input is `self.0` (times the scalar's own).
struct Upstream(Tensor);

impl CustomOp1 for Upstream {
    fn name(&self) -> &'static str {
        "upstream"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let zero = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(vec![0.0]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![0.0]),
            _ => candle_core::bail!("upstream: f32 or f64 outputs"),
        };
        Ok((zero, Shape::from(())))
    }

    fn bwd(&self, _out: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The scalar's own gradient is 1 when it is (part of a sum that is) the root.
        if grad_res
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?
            == 1.0
        {
            return Ok(Some(self.0.clone()));
        }
        Ok(Some(self.0.broadcast_mul(grad_res)?))
    }
}

/// A scalar whose gradient with respect to `out` is `upstream` (same shape): backward from it
/// differentiates whatever made `out` with that upstream gradient. Only its gradient is meant;
/// its value is 0 on the CPU in f32/f64 and `sum(out ∘ upstream)` elsewhere.
pub fn seeded(out: &Tensor, upstream: &Tensor) -> Result<Tensor> {
    if super::fused_on(out) && upstream.dtype() == out.dtype() && upstream.shape() == out.shape() {
        return out.apply_op1(Upstream(upstream.clone()));
    }
    (out * upstream)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::test_values;
    use candle_core::{DType, Device, Var};

    #[test]
    fn the_seeded_scalar_hands_the_upstream_gradient_back() -> Result<()> {
        let t = |seed| {
            Tensor::from_vec(test_values(12, seed), (3, 4), &Device::Cpu)?.to_dtype(DType::F32)
        };
        let x = Var::from_tensor(&t(1)?)?;
        let g = t(2)?;
        let h = t(3)?;
        // Two seeds summed (a layer's output and its router logits) and one scaled by 2.
        let out = (x.as_tensor().exp()? * 3.0)?;
        let total = (seeded(&out, &g)? + (seeded(&out, &h)? * 2.0)?)?;
        let grads = total.backward()?;
        let expected = ((&g + (&h * 2.0)?)? * (x.as_tensor().exp()? * 3.0)?)?;
        let diff = (grads.get(x.as_tensor()).unwrap() - expected)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
