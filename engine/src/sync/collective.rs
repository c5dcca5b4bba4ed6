//! [`TensorCollective`]: the collectives [`Sharded`](super::Sharded) runs, on candle tensors of
//! the rank's device — gloo on the CPU, NCCL on a GPU — so ZeRO's buckets, shared shards and
//! gathered layers stay where the parameters are and never pass through host vectors.
//!
//! Each operation is a candle [`InplaceOp1`] on the tensor's storage: `cpu_fwd` hands gloo the
//! `CpuStorage` slice, `cuda_fwd` hands NCCL the `CudaStorage`'s device slice (whet-collective's
//! trait is over exactly those buffers). A tensor given to a collective must own its storage
//! whole (contiguous, from offset 0, no larger than its elements: what `Tensor::cat`,
//! `force_contiguous` and `zeros` make), because NCCL's buffer is the whole device slice and a
//! view's neighbours must not be overwritten; the CPU checks the same so that CPU tests catch
//! what would break on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor};
use whet_collective::{Collective, Element, GlooCollective};

/// Sum all-reduce, broadcast and barrier over a job's ranks, on tensors of [`Self::device`].
pub trait TensorCollective {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// How many ranks take part.
    fn world_size(&self) -> usize;

    /// Where this collective's tensors live (the rank's device).
    fn device(&self) -> Device;

    /// `tensor` = the element-wise sum of every rank's `tensor`, in place (f32, f64 or bf16;
    /// owning its storage whole, see the module documentation).
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()>;

    /// `tensor` = `root`'s `tensor`, on every rank, in place.
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Replaces each host value by its sum over all ranks (through the device, as NCCL needs).
    fn sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        let tensor = Tensor::from_slice(values, values.len(), &self.device())?;
        self.all_reduce_sum(&tensor)?;
        values.copy_from_slice(&tensor.to_vec1::<f64>()?);
        Ok(())
    }
}

/// One in-place collective, whichever library runs it.
#[derive(Debug, Clone, Copy)]
enum Op {
    Sum,
    Broadcast { root: usize },
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Sum => "all-reduce-sum",
            Op::Broadcast { .. } => "broadcast",
        }
    }

    fn run<C: Collective, T: Element>(
        self,
        collective: &C,
        buffer: &mut C::Buffer<T>,
    ) -> Result<()> {
        match self {
            Op::Sum => collective.all_reduce_in_place(buffer),
            Op::Broadcast { root } => collective.broadcast(buffer, root),
        }
        .map_err(candle_core::Error::wrap)
    }
}

/// Refuses a tensor that does not own its storage whole (a view, a strided tensor).
fn check_whole(op: Op, layout: &Layout, storage_len: usize) -> Result<()> {
    if layout.is_contiguous()
        && layout.start_offset() == 0
        && layout.shape().elem_count() == storage_len
    {
        return Ok(());
    }
    candle_core::bail!(
        "{}: the tensor must own its storage whole (contiguous, {} elements from offset 0), not a view of {storage_len} at offset {}",
        op.name(),
        layout.shape().elem_count(),
        layout.start_offset()
    )
}

/// gloo on a `CpuStorage` slice.
struct OnHost<'a> {
    gloo: &'a GlooCollective,
    op: Op,
}

impl OnHost<'_> {
    fn slice<T: Element>(&self, values: &mut [T], layout: &Layout) -> Result<()> {
        check_whole(self.op, layout, values.len())?;
        self.op.run(self.gloo, values)
    }
}

impl InplaceOp1 for OnHost<'_> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        match storage {
            CpuStorage::F32(values) => self.slice(values, layout),
            CpuStorage::F64(values) => self.slice(values, layout),
            CpuStorage::BF16(values) => self.slice(values, layout),
            other => unsupported(self.op, other.dtype()),
        }
    }
}

fn unsupported(op: Op, dtype: DType) -> Result<()> {
    candle_core::bail!(
        "{}: collectives carry f32, f64 or bf16, not {dtype:?}",
        op.name()
    )
}

impl TensorCollective for GlooCollective {
    fn rank(&self) -> usize {
        Collective::rank(self)
    }

    fn world_size(&self) -> usize {
        Collective::world_size(self)
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        tensor.inplace_op1(&OnHost {
            gloo: self,
            op: Op::Sum,
        })
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        tensor.inplace_op1(&OnHost {
            gloo: self,
            op: Op::Broadcast { root },
        })
    }

    fn barrier(&self) -> Result<()> {
        Collective::barrier(self).map_err(candle_core::Error::wrap)
    }

    /// gloo works on host memory already: no tensor in between.
    fn sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        self.all_reduce_in_place(values)
            .map_err(candle_core::Error::wrap)
    }
}

#[cfg(feature = "cuda")]
pub use nccl::NcclOnDevice;

#[cfg(feature = "cuda")]
mod nccl {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Device, InplaceOp1, Layout, Result, Tensor};
    use whet_collective::{Collective, Element, NcclCollective};

    use super::{check_whole, unsupported, Op, TensorCollective};

    /// NCCL's communicator with the candle device whose stream it runs on (the device the rank
    /// bound first; its tensors are the ones the communicator may touch).
    pub struct NcclOnDevice {
        pub nccl: NcclCollective,
        pub device: Device,
    }

    /// NCCL on a `CudaStorage`'s device slice.
    struct OnDevice<'a> {
        nccl: &'a NcclCollective,
        op: Op,
    }

    impl OnDevice<'_> {
        fn slice<T: Element + CudaDType>(
            &self,
            storage: &mut CudaStorage,
            layout: &Layout,
        ) -> Result<()> {
            let slice = storage.as_cuda_slice_mut::<T>()?;
            check_whole(self.op, layout, slice.len())?;
            self.op.run(self.nccl, slice)
        }
    }

    impl InplaceOp1 for OnDevice<'_> {
        fn name(&self) -> &'static str {
            self.op.name()
        }

        fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
            candle_core::bail!(
                "{}: NCCL carries device tensors, this one ({:?}) is in host memory",
                self.op.name(),
                storage.dtype()
            )
        }

        fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
            match storage.dtype() {
                candle_core::DType::F32 => self.slice::<f32>(storage, layout),
                candle_core::DType::F64 => self.slice::<f64>(storage, layout),
                candle_core::DType::BF16 => self.slice::<half::bf16>(storage, layout),
                other => unsupported(self.op, other),
            }
        }
    }

    impl TensorCollective for NcclOnDevice {
        fn rank(&self) -> usize {
            self.nccl.rank()
        }

        fn world_size(&self) -> usize {
            self.nccl.world_size()
        }

        fn device(&self) -> Device {
            self.device.clone()
        }

        fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
            tensor.inplace_op1(&OnDevice {
                nccl: &self.nccl,
                op: Op::Sum,
            })
        }

        fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
            tensor.inplace_op1(&OnDevice {
                nccl: &self.nccl,
                op: Op::Broadcast { root },
            })
        }

        fn barrier(&self) -> Result<()> {
            self.nccl.barrier().map_err(candle_core::Error::wrap)
        }
    }
}

/// A contiguous tensor of its own storage holding `pieces` (each flattened) end to end, on
/// `device` — what a collective may work on in place.
pub fn concat_owned(pieces: &[Tensor], dtype: DType, device: &Device) -> Result<Tensor> {
    match pieces {
        [] => Tensor::zeros(0, dtype, device),
        // `cat` of one tensor returns that tensor itself, sharing its storage.
        [one] => one.flatten_all()?.force_contiguous(),
        many => {
            let flat: Vec<Tensor> = many
                .iter()
                .map(Tensor::flatten_all)
                .collect::<Result<_>>()?;
            Tensor::cat(&flat, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use whet_store::{TcpStore, TcpStoreServer};

    const TIMEOUT: Duration = Duration::from_secs(20);

    /// Runs `body` as each of two gloo ranks on its own thread, results in rank order.
    fn two_ranks<R: Send>(body: impl Fn(&GlooCollective) -> R + Sync) -> Vec<R> {
        let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
        let port = server.port();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let body = &body;
                    scope.spawn(move || {
                        let store = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap();
                        let gloo = GlooCollective::new(&store, rank, 2, TIMEOUT).unwrap();
                        body(&gloo)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn tensors_are_summed_and_broadcast_in_place_over_gloo() {
        let results = two_ranks(|gloo| {
            let rank = TensorCollective::rank(gloo) as f32;
            let sum = Tensor::new(&[1.0 + rank, 10.0 * rank, -2.0], &Device::Cpu).unwrap();
            gloo.all_reduce_sum(&sum).unwrap();
            let bf16 = Tensor::new(&[0.5f32 + rank, 1.0], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            gloo.all_reduce_sum(&bf16).unwrap();
            let cast = Tensor::new(&[rank as f64 + 7.0; 4], &Device::Cpu).unwrap();
            TensorCollective::broadcast(gloo, &cast, 1).unwrap();
            let mut scalars = [rank as f64, 2.5];
            TensorCollective::sum_scalars(gloo, &mut scalars).unwrap();
            // A view may not be reduced in place: its neighbours would be overwritten on a GPU.
            let view = Tensor::zeros(6, DType::F32, &Device::Cpu)
                .unwrap()
                .narrow(0, 2, 2)
                .unwrap();
            let refused = gloo.all_reduce_sum(&view).unwrap_err().to_string();
            TensorCollective::barrier(gloo).unwrap();
            (
                sum.to_vec1::<f32>().unwrap(),
                bf16.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                cast.to_vec1::<f64>().unwrap(),
                scalars,
                refused,
            )
        });
        for (sum, bf16, cast, scalars, refused) in results {
            assert_eq!(sum, [3.0, 10.0, -4.0]);
            assert_eq!(bf16, [2.0, 2.0]);
            assert_eq!(cast, [8.0; 4]);
            assert_eq!(scalars, [1.0, 5.0]);
            assert!(refused.contains("own its storage whole"), "{refused}");
        }
    }

    #[test]
    fn concatenated_buckets_own_their_storage() {
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let one = concat_owned(&[a.narrow(1, 1, 2).unwrap()], DType::F32, &Device::Cpu).unwrap();
        // Its storage is its four elements, not `a`'s six.
        match &*one.storage_and_layout().0 {
            candle_core::Storage::Cpu(storage) => {
                assert_eq!(storage.as_slice::<f32>().unwrap().len(), 4)
            }
            _ => unreachable!(),
        }
        assert_eq!(one.to_vec1::<f32>().unwrap(), [1.0, 2.0, 4.0, 5.0]);
        let two = concat_owned(
            &[a.clone(), a.narrow(0, 1, 1).unwrap()],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(two.dims(), &[9]);
        assert_eq!(
            concat_owned(&[], DType::F64, &Device::Cpu).unwrap().dims(),
            &[0]
        );
    }
}
