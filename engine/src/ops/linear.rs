//! `y = x Wᵀ` as one CPU op with its backward.
//!
//! Composed, a linear layer is four candle nodes (reshape, transpose of W, matmul, reshape
//! back), and candle's backward gives each node a zero gradient and adds into it: three extra
//! passes over the activations and a strided one over W's gradient. Here it is one node whose
//! backward writes dx and dW in their own layouts, and skips the gradient of an operand that
//! does not track one (a frozen base weight under LoRA).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::attention::{gemm_into, Real};
use super::fused::{by_dtype, by_tensor_dtype, elements, with_elements};

/// `x (…, in) · W (out, in)ᵀ -> (…, out)`.
pub struct Linear;

/// `dst (m × n) = a (m × k) · b (k × n)`, operands as (slice, row stride, column stride), on
/// rayon's pool as candle's matmul runs.
fn product<T: Real>(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[T], usize, usize),
    (b, b_rs, b_cs): (&[T], usize, usize),
) -> Vec<T> {
    let mut dst = vec![T::zero(); m * n];
    let threads = gemm::Parallelism::Rayon(crate::host::cpu_threads());
    // SAFETY: a and b cover m × k and k × n with the given strides (the callers' shapes), and
    // dst is a fresh m × n buffer.
    unsafe {
        gemm_into(
            (m, n, k),
            (dst.as_mut_ptr(), n),
            false,
            (a.as_ptr(), a_rs, a_cs),
            (b.as_ptr(), b_rs, b_cs),
            T::one(),
            threads,
        )
    };
    dst
}

/// (rows, in, out) of an `x` and `W` the op accepts.
fn dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
    let (out, inner) = w.dims2()?;
    let x_in = *x.dims().last().unwrap_or(&0);
    if x.rank() < 2 || x_in != inner {
        candle_core::bail!("linear: input {x:?} against weight {w:?}");
    }
    Ok((x.elem_count() / inner, inner, out))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, inner, out) = dims(lx.shape(), lw.shape())?;
        let y = by_dtype!("linear", sx, |T| {
            let (x, w) = (elements::<T>(sx, lx)?, elements::<T>(sw, lw)?);
            // Wᵀ is W read column-wise: element (i, o) is w[o * inner + i].
            product((rows, out, inner), (x, inner, 1), (w, 1, inner))
        });
        let mut shape = lx.shape().dims().to_vec();
        *shape.last_mut().expect("rank checked") = out;
        Ok((y, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, inner, out) = dims(x.shape(), w.shape())?;
        by_tensor_dtype!("linear", x, |T| with_elements::<T, _>(&[x, w, dy], |s| {
            let (xs, ws, dys) = (s[0], s[1], s[2]);
            // dx = dy W; dW = dyᵀ x.
            let dx = x
                .track_op()
                .then(|| product((rows, inner, out), (dys, out, 1), (ws, inner, 1)))
                .map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
                .transpose()?;
            let dw = w
                .track_op()
                .then(|| product((out, inner, rows), (dys, 1, out), (xs, inner, 1)))
                .map(|dw| Tensor::from_vec(dw, w.shape(), w.device()))
                .transpose()?;
            Ok((dx, dw))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{project, test_values};
    use candle_core::{DType, Device, Var, D};

    fn tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(test_values(n, seed), shape, &Device::Cpu)?.to_dtype(DType::F32)
    }

    fn composed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (rows, inner) = (x.elem_count() / x.dim(D::Minus1)?, x.dim(D::Minus1)?);
        let mut shape = x.dims().to_vec();
        *shape.last_mut().unwrap() = w.dim(0)?;
        x.reshape((rows, inner))?.matmul(&w.t()?)?.reshape(shape)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn the_linear_op_matches_the_composed_form_values_and_gradients() -> Result<()> {
        let x = Var::from_tensor(&tensor(&[2, 5, 7], 1)?)?;
        let w = Var::from_tensor(&tensor(&[3, 7], 2)?)?;
        let fused = x.as_tensor().apply_op2(w.as_tensor(), Linear)?;
        let plain = composed(x.as_tensor(), w.as_tensor())?;
        assert_eq!(fused.dims(), &[2, 5, 3]);
        assert!(max_diff(&fused, &plain)? < 1e-5);

        let fused_grads = project(&fused, 3)?.backward()?;
        let plain_grads = project(&plain, 3)?.backward()?;
        for v in [&x, &w] {
            let (a, b) = (
                fused_grads.get(v.as_tensor()).unwrap(),
                plain_grads.get(v.as_tensor()).unwrap(),
            );
            assert!(max_diff(a, b)? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() -> Result<()> {
        let x = Var::from_tensor(&tensor(&[4, 6], 4)?)?;
        let w = tensor(&[2, 6], 5)?;
        let grads = x.as_tensor().apply_op2(&w, Linear)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none());
        // d(sum(x Wᵀ))/dx: every row is the column sums of W.
        let expected = w.sum_keepdim(0)?.broadcast_as((4, 6))?;
        assert!(max_diff(grads.get(x.as_tensor()).unwrap(), &expected)? < 1e-5);
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let x = Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
        assert!(x.apply_op2(&w, Linear).is_err());
        Ok(())
    }
}
