//! [`NcclCollective`] (feature `cuda`): NCCL through cudarc 0.19's `cudarc::nccl::safe`, one
//! communicator and one stream per rank, buffers in device memory (`CudaSlice<T>`). Compiled
//! here without a GPU; not yet run on one. Operations are enqueued on the communicator's
//! stream and return before they finish (see the crate documentation); `barrier` alone
//! synchronises the host.
//!
//! Not yet here: a watchdog that turns a rank that never joins into
//! [`CollectiveError::Timeout`] (torch polls `ncclCommGetAsyncError` and aborts the
//! communicator); until then `timeout` bounds the rendezvous only, and a missing rank blocks
//! the stream.

use std::ffi::c_char;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use whet_store::Store;

use crate::{shard_range, Collective, CollectiveError, Element, Result};

/// The GPU [`Collective`]: an NCCL communicator over the rank's device stream.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    /// Why an earlier operation failed; every later one is refused, as after gloo's.
    broken: Mutex<Option<String>>,
}

impl NcclCollective {
    /// Meets the other ranks: rank 0 makes NCCL's unique id and sets its 128 bytes in `store`
    /// under `nccl/<group>/id`; the others wait up to `timeout` for it; then every rank joins
    /// the communicator on `stream` — the stream of the device this rank bound first (its
    /// LOCAL_RANK; candle's `CudaDevice::cuda_stream()`).
    pub fn new(
        store: &dyn Store,
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        group: &str,
        timeout: Duration,
    ) -> Result<NcclCollective> {
        if rank >= world_size {
            return Err(CollectiveError::InvalidRank { rank, world_size });
        }
        let key = format!("nccl/{group}/id");
        let rendezvous = |source| CollectiveError::Rendezvous {
            rank,
            world_size,
            source,
        };
        let failed = |message: String| CollectiveError::Connect {
            rank,
            world_size,
            transport: "NCCL".to_string(),
            message,
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| failed(format!("ncclGetUniqueId: {e:?}")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes).map_err(rendezvous)?;
            id
        } else {
            store.wait(&[&key], timeout).map_err(rendezvous)?;
            let bytes = store.get(&key).map_err(rendezvous)?;
            let internal: [c_char; 128] = bytes
                .iter()
                .map(|&b| b as c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| failed(format!("{key} holds {} bytes, not 128", bytes.len())))?;
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(stream.clone(), rank, world_size, id)
            .map_err(|e| failed(format!("ncclCommInitRank: {e:?}")))?;
        Ok(NcclCollective {
            comm,
            stream,
            broken: Mutex::new(None),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Runs `call` unless an earlier operation failed; a failure breaks the communicator.
    fn run<E: std::fmt::Debug>(
        &self,
        op: &'static str,
        call: impl FnOnce() -> std::result::Result<(), E>,
    ) -> Result<()> {
        let mut broken = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &*broken {
            return Err(CollectiveError::Broken {
                op,
                rank: self.rank(),
                why: why.clone(),
            });
        }
        call().map_err(|err| {
            let message = format!("{err:?}");
            *broken = Some(format!("{op}: {message}"));
            CollectiveError::Failed {
                op,
                rank: self.rank(),
                world_size: self.world_size(),
                message,
            }
        })
    }

    fn check_len(
        &self,
        op: &'static str,
        what: &'static str,
        expected: usize,
        actual: usize,
    ) -> Result<()> {
        if expected == actual {
            return Ok(());
        }
        Err(CollectiveError::Length {
            op,
            what,
            rank: self.rank(),
            expected,
            actual,
        })
    }

    /// Equal shards of `padded_len(len)`: NCCL's reduce-scatter and all-gather need them.
    fn padded_shard(&self, len: usize) -> usize {
        len.div_ceil(self.world_size())
    }
}

/// Every failure on the way: NCCL's and the driver's (copies, allocation) alike.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
enum Failure {
    Nccl(cudarc::nccl::result::NcclError),
    Driver(cudarc::driver::DriverError),
}

impl From<cudarc::nccl::result::NcclError> for Failure {
    fn from(err: cudarc::nccl::result::NcclError) -> Self {
        Failure::Nccl(err)
    }
}

impl From<cudarc::driver::DriverError> for Failure {
    fn from(err: cudarc::driver::DriverError) -> Self {
        Failure::Driver(err)
    }
}

impl Collective for NcclCollective {
    type Buffer<T: Element> = CudaSlice<T>;

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce<T: Element>(&self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
        self.check_len("all_reduce", "the receive buffer", send.len(), recv.len())?;
        self.run("all_reduce", || {
            self.comm.all_reduce(send, recv, &ReduceOp::Sum).map(drop)
        })
    }

    fn all_reduce_in_place<T: Element>(&self, buffer: &mut CudaSlice<T>) -> Result<()> {
        self.run("all_reduce", || {
            self.comm
                .all_reduce_in_place(buffer, &ReduceOp::Sum)
                .map(drop)
        })
    }

    /// NCCL's reduce-scatter over the send buffer padded to equal shards (a copy, unless the
    /// length is already a multiple of the world size).
    fn reduce_scatter<T: Element>(
        &self,
        send: &CudaSlice<T>,
        shard: &mut CudaSlice<T>,
    ) -> Result<()> {
        let range = self.shard(send.len());
        self.check_len("reduce_scatter", "the shard", range.len(), shard.len())?;
        let padded_shard = self.padded_shard(send.len());
        self.run("reduce_scatter", || -> std::result::Result<(), Failure> {
            if padded_shard * self.world_size() == send.len() {
                self.comm.reduce_scatter(send, shard, &ReduceOp::Sum)?;
                return Ok(());
            }
            let mut padded = self
                .stream
                .alloc_zeros::<T>(padded_shard * self.world_size())?;
            self.stream
                .memcpy_dtod(send, &mut padded.slice_mut(..send.len()))?;
            let mut full_shard = self.stream.alloc_zeros::<T>(padded_shard)?;
            self.comm
                .reduce_scatter(&padded, &mut full_shard, &ReduceOp::Sum)?;
            self.stream
                .memcpy_dtod(&full_shard.slice(..shard.len()), shard)?;
            Ok(())
        })
    }

    /// An in-place all-reduce: NCCL's in-place reduce-scatter would alias its send and receive
    /// buffers, which cudarc's safe API does not allow.
    fn reduce_scatter_in_place<T: Element>(&self, buffer: &mut CudaSlice<T>) -> Result<()> {
        self.all_reduce_in_place(buffer)
    }

    fn all_gather<T: Element>(&self, shard: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
        let range = self.shard(recv.len());
        self.check_len("all_gather", "the shard", range.len(), shard.len())?;
        let padded_shard = self.padded_shard(recv.len());
        self.run("all_gather", || -> std::result::Result<(), Failure> {
            if padded_shard * self.world_size() == recv.len() {
                self.comm.all_gather(shard, recv)?;
                return Ok(());
            }
            let mut send = self.stream.alloc_zeros::<T>(padded_shard)?;
            if !shard.is_empty() {
                self.stream
                    .memcpy_dtod(shard, &mut send.slice_mut(..shard.len()))?;
            }
            let mut padded = self
                .stream
                .alloc_zeros::<T>(padded_shard * self.world_size())?;
            self.comm.all_gather(&send, &mut padded)?;
            // Rank r's data sits at r * padded_shard in `padded` and at shard_range(r) in `recv`.
            for owner in 0..self.world_size() {
                let target = shard_range(recv.len(), self.world_size(), owner);
                if target.is_empty() {
                    continue;
                }
                let start = owner * padded_shard;
                self.stream.memcpy_dtod(
                    &padded.slice(start..start + target.len()),
                    &mut recv.slice_mut(target),
                )?;
            }
            Ok(())
        })
    }

    fn all_gather_in_place<T: Element>(&self, buffer: &mut CudaSlice<T>) -> Result<()> {
        let range = self.shard(buffer.len());
        let shard = if range.is_empty() {
            self.stream.alloc_zeros::<T>(0)
        } else {
            self.stream.clone_dtod(&buffer.slice(range))
        };
        let shard = shard.map_err(|err| CollectiveError::Failed {
            op: "all_gather",
            rank: self.rank(),
            world_size: self.world_size(),
            message: format!("{err:?}"),
        })?;
        self.all_gather(&shard, buffer)
    }

    fn broadcast<T: Element>(&self, buffer: &mut CudaSlice<T>, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(CollectiveError::InvalidRoot {
                op: "broadcast",
                root,
                world_size: self.world_size(),
            });
        }
        self.run("broadcast", || {
            self.comm.broadcast_in_place(buffer, root as i32).map(drop)
        })
    }

    /// NCCL has no barrier: a one-element all-reduce, then the host waits for the stream (as
    /// torch's `ProcessGroupNCCL::barrier` does).
    fn barrier(&self) -> Result<()> {
        self.run("barrier", || -> std::result::Result<(), Failure> {
            let mut one = self.stream.alloc_zeros::<f32>(1)?;
            self.comm.all_reduce_in_place(&mut one, &ReduceOp::Sum)?;
            self.stream.synchronize()?;
            Ok(())
        })
    }
}
