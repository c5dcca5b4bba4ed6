//! Holding a parameter's values or not, without changing the parameter: ZeRO-3 empties a
//! variable's storage when the layer is done with it and refills it, in place, when the layer
//! runs again. The variable keeps its identity (so gradients reach it by the same key), its
//! shape and its place in the model; only the memory behind it comes and goes.
//!
//! Reading an emptied variable is a bug of the caller; [`Sharded`](super::Sharded) gathers every
//! layer before the backward walk reads it and releases it after.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Var};

/// Empties the storage of a contiguous f32/f64 variable.
struct Release;

impl InplaceOp1 for Release {
    fn name(&self) -> &'static str {
        "zero3-release"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        *storage = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(Vec::new()),
            CpuStorage::F64(_) => CpuStorage::F64(Vec::new()),
            other => candle_core::bail!(
                "ZeRO-3 shards f32 or f64 master weights, not {:?}",
                other.dtype()
            ),
        };
        Ok(())
    }
}

/// Puts values back into an emptied variable's storage.
struct Refill(Mutex<Option<CpuStorage>>);

impl InplaceOp1 for Refill {
    fn name(&self) -> &'static str {
        "zero3-refill"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let values = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("refill values poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("refilled twice".into()))?;
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("ZeRO-3 refills contiguous variables only");
        }
        if values.dtype() != storage.dtype() {
            candle_core::bail!(
                "refilling a {:?} variable with {:?} values",
                storage.dtype(),
                values.dtype()
            );
        }
        *storage = values;
        Ok(())
    }
}

/// Drops `var`'s values (its shape stays; reading it before [`refill`] is an error of the
/// caller).
pub fn release(var: &Var) -> Result<()> {
    var.as_tensor().inplace_op1(&Release)
}

/// Gives the emptied `var` the values `values` (its element count, its dtype).
pub fn refill(var: &Var, values: CpuStorage) -> Result<()> {
    let len = match &values {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        other => candle_core::bail!("ZeRO-3 refills f32 or f64, not {:?}", other.dtype()),
    };
    if len != var.elem_count() {
        candle_core::bail!(
            "refilling a variable of {} elements with {len}",
            var.elem_count()
        );
    }
    var.as_tensor()
        .inplace_op1(&Refill(Mutex::new(Some(values))))
}

/// Hands the heap's free pages back to the system. Without it the whole model a rank built
/// before ZeRO-3 sharded it, and every layer it released since, stay resident in glibc's heap
/// (frees below its dynamic mmap threshold go back to the heap, not to the system), and zero3's
/// peak RSS is no lower than zero2's (BENCHMARKS.md, per-rank memory).
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn a_released_variable_keeps_its_shape_and_identity_and_takes_values_back() {
        let var = Var::from_tensor(
            &Tensor::arange(0f32, 6.0, &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        )
        .unwrap();
        let id = var.as_tensor().id();
        release(&var).unwrap();
        assert_eq!(var.dims(), &[2, 3]);
        refill(&var, CpuStorage::F32(vec![6.0, 5.0, 4.0, 3.0, 2.0, 1.0])).unwrap();
        assert_eq!(var.as_tensor().id(), id);
        let back: Vec<Vec<f32>> = var.to_vec2().unwrap();
        assert_eq!(back, vec![vec![6.0, 5.0, 4.0], vec![3.0, 2.0, 1.0]]);
        // A gradient still reaches the variable by its key.
        let loss = (var.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(var.as_tensor()).is_some());

        let wrong = refill(&var, CpuStorage::F32(vec![1.0; 5])).unwrap_err();
        assert!(wrong.to_string().contains("6 elements"), "{wrong}");
        let bf16 = Var::zeros(4, DType::BF16, &Device::Cpu).unwrap();
        assert!(release(&bf16).is_err());
    }
}
