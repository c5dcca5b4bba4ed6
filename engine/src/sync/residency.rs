//! Holding a parameter's values or not, without changing the parameter: ZeRO-3 empties a
//! variable's storage when the layer is done with it and refills it, in place, when the layer
//! runs again. The variable keeps its identity (so gradients reach it by the same key), its
//! shape and its place in the model; only the memory behind it comes and goes.
//!
//! Reading an emptied variable is a bug of the caller; [`Sharded`](super::Sharded) gathers every
//! layer before the backward walk reads it and releases it after.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::{
    cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits},
    cuda_backend::CudaDType,
    CudaStorage,
};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor, Var};

/// Empties the storage of a contiguous f32/f64 variable: on the CPU its vector is dropped, on a
/// GPU its device slice is replaced by a one-element placeholder (the memory goes back to the
/// device's pool).
struct Release;

impl InplaceOp1 for Release {
    fn name(&self) -> &'static str {
        "zero3-release"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        *storage = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(Vec::new()),
            CpuStorage::F64(_) => CpuStorage::F64(Vec::new()),
            other => return sharded_dtype(other.dtype()),
        };
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut CudaStorage, _layout: &Layout) -> Result<()> {
        fn empty<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
            storage: &mut CudaStorage,
        ) -> Result<()> {
            // One element, not none: CUDA's allocators refuse zero bytes.
            let placeholder = storage.device.alloc_zeros::<T>(1)?;
            *storage.as_cuda_slice_mut::<T>()? = placeholder;
            Ok(())
        }
        match storage.dtype() {
            DType::F32 => empty::<f32>(storage),
            DType::F64 => empty::<f64>(storage),
            other => sharded_dtype(other),
        }
    }
}

fn sharded_dtype(dtype: DType) -> Result<()> {
    candle_core::bail!("ZeRO-3 shards f32 or f64 master weights, not {dtype:?}")
}

/// Puts the values of a tensor on the variable's device back into its emptied storage (a copy
/// of them, so the tensor they came from — a gathered flat bucket — can go).
struct Refill<'a>(&'a Tensor);

impl Refill<'_> {
    /// The values' storage and where its elements are, checked against the variable's.
    fn check(&self, storage_dtype: DType, layout: &Layout) -> Result<()> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("ZeRO-3 refills contiguous variables only");
        }
        if self.0.dtype() != storage_dtype {
            candle_core::bail!(
                "refilling a {storage_dtype:?} variable with {:?} values",
                self.0.dtype()
            );
        }
        Ok(())
    }

    fn offsets(&self) -> Result<(usize, usize)> {
        self.0
            .layout()
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("ZeRO-3 refills from contiguous values".into()))
    }
}

impl InplaceOp1 for Refill<'_> {
    fn name(&self) -> &'static str {
        "zero3-refill"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.check(storage.dtype(), layout)?;
        let (start, end) = self.offsets()?;
        let (values, _) = self.0.storage_and_layout();
        *storage = match &*values {
            Storage::Cpu(CpuStorage::F32(v)) => CpuStorage::F32(v[start..end].to_vec()),
            Storage::Cpu(CpuStorage::F64(v)) => CpuStorage::F64(v[start..end].to_vec()),
            Storage::Cpu(other) => return sharded_dtype(other.dtype()),
            _ => candle_core::bail!("refilling a host variable from device values"),
        };
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        fn copy<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
            storage: &mut CudaStorage,
            values: &CudaStorage,
            (start, end): (usize, usize),
        ) -> Result<()> {
            let stream = storage.device.cuda_stream();
            let copied = stream
                .clone_dtod(&values.as_cuda_slice::<T>()?.slice(start..end))
                .map_err(candle_core::Error::wrap)?;
            *storage.as_cuda_slice_mut::<T>()? = copied;
            Ok(())
        }
        self.check(storage.dtype(), layout)?;
        let offsets = self.offsets()?;
        let (values, _) = self.0.storage_and_layout();
        let Storage::Cuda(values) = &*values else {
            candle_core::bail!("refilling a device variable from values in host memory");
        };
        match storage.dtype() {
            DType::F32 => copy::<f32>(storage, values, offsets),
            DType::F64 => copy::<f64>(storage, values, offsets),
            other => sharded_dtype(other),
        }
    }
}

/// Drops `var`'s values (its shape stays; reading it before [`refill`] is an error of the
/// caller).
pub fn release(var: &Var) -> Result<()> {
    var.as_tensor().inplace_op1(&Release)
}

/// Gives the emptied `var` a copy of `values` (its element count and dtype, on its device; a
/// view of a larger tensor is fine).
pub fn refill(var: &Var, values: &Tensor) -> Result<()> {
    if values.elem_count() != var.elem_count() {
        candle_core::bail!(
            "refilling a variable of {} elements with {}",
            var.elem_count(),
            values.elem_count()
        );
    }
    if !values.device().same_device(var.device()) {
        candle_core::bail!("refilling a variable from values on another device");
    }
    var.as_tensor().inplace_op1(&Refill(values))
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
        // From a view of a larger flat tensor, as zero3's gather hands them over.
        let flat = Tensor::new(&[9f32, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 9.0], &Device::Cpu).unwrap();
        refill(&var, &flat.narrow(0, 1, 6).unwrap()).unwrap();
        assert_eq!(var.as_tensor().id(), id);
        let back: Vec<Vec<f32>> = var.to_vec2().unwrap();
        assert_eq!(back, vec![vec![6.0, 5.0, 4.0], vec![3.0, 2.0, 1.0]]);
        // A gradient still reaches the variable by its key.
        let loss = (var.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(var.as_tensor()).is_some());

        let wrong = refill(&var, &Tensor::ones(5, DType::F32, &Device::Cpu).unwrap()).unwrap_err();
        assert!(wrong.to_string().contains("6 elements"), "{wrong}");
        let bf16 = Var::zeros(4, DType::BF16, &Device::Cpu).unwrap();
        assert!(release(&bf16).is_err());
    }
}
