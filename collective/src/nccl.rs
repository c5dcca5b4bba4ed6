//! [`NcclCollective`] (feature `cuda`): NCCL through cudarc 0.19's `cudarc::nccl` bindings, one
//! communicator and one stream per rank, buffers in device memory (`CudaSlice<T>`). Compiled
//! here without a GPU; not yet run on one.
//!
//! No hangs, as torch's `ProcessGroupNCCL` watchdog promises: every wait is bounded by the
//! communicator's timeout. The rendezvous waits for rank 0's id in the store, then joins
//! `ncclCommInitRank` on a helper thread and gives up past the timeout. Each operation is
//! enqueued on the rank's stream, then the host waits for an event recorded after it while
//! polling `ncclCommGetAsyncError`; an NCCL error reported there (a peer died, a connection
//! closed), or the timeout passing, aborts the communicator (`ncclCommAbort`, which also ends
//! the stuck kernels) and the operation fails with [`CollectiveError::Failed`] or
//! [`CollectiveError::Timeout`]; the communicator is then [`CollectiveError::Broken`]. So an
//! operation has finished on the device when it returns (the price: the host does not run
//! ahead of a collective; the buckets are large enough for that to be small).
//!
//! The communicator's handle is kept here rather than in cudarc's safe `Comm`, which keeps it
//! private: the watchdog needs it for `ncclCommGetAsyncError` and `ncclCommAbort`. The calls
//! that enqueue work mirror `Comm`'s (the same pointers and stream events).

use std::ffi::c_char;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;
use whet_store::Store;

use crate::{shard_range, Collective, CollectiveError, Element, Result};

/// How often the host looks at an outstanding operation.
const POLL: Duration = Duration::from_micros(50);

/// The GPU [`Collective`]: an NCCL communicator over the rank's device stream.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
}

/// Why an earlier operation failed (every later one is refused, as after gloo's), and whether
/// the communicator was aborted already (then it must not be aborted again on drop).
#[derive(Default)]
struct State {
    broken: Option<String>,
    aborted: bool,
}

/// The handle as it comes back from the thread that made it.
struct Handle(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one at a time; it is handed over
// once, from the thread that made it.
unsafe impl Send for Handle {}

impl NcclCollective {
    /// Meets the other ranks: rank 0 makes NCCL's unique id and sets its 128 bytes in `store`
    /// under `nccl/<group>/id`; the others wait up to `timeout` for it; then every rank joins
    /// the communicator on `stream` — the stream of the device this rank bound first (its
    /// LOCAL_RANK; candle's `CudaDevice::cuda_stream()`) — giving up after `timeout` too, which
    /// also bounds every operation.
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
            let id = nccl::get_uniqueid().map_err(|e| failed(format!("ncclGetUniqueId: {e:?}")))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
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
            sys::ncclUniqueId { internal }
        };
        // ncclCommInitRank returns only once every rank has called it: on a helper thread, so
        // that a rank lost after the id exchange ends this one after the timeout.
        let (sent, made) = mpsc::channel();
        let context = stream.context().clone();
        std::thread::spawn(move || {
            let handle = context
                .bind_to_thread()
                .map_err(|e| format!("binding the device: {e:?}"))
                .and_then(|()| {
                    let mut comm = std::mem::MaybeUninit::uninit();
                    // SAFETY: `comm` is written by a successful init, and read only then.
                    unsafe {
                        nccl::comm_init_rank(comm.as_mut_ptr(), world_size as i32, id, rank as i32)
                            .map(|_| Handle(comm.assume_init()))
                    }
                    .map_err(|e| format!("ncclCommInitRank: {e:?}"))
                });
            let _ = sent.send(handle);
        });
        let comm = match made.recv_timeout(timeout) {
            Ok(handle) => handle.map_err(failed)?.0,
            Err(_) => {
                return Err(CollectiveError::Timeout {
                    op: "ncclCommInitRank",
                    rank,
                    world_size,
                    timeout,
                    message: "not every rank joined the communicator".into(),
                })
            }
        };
        Ok(NcclCollective {
            comm,
            stream,
            rank,
            world_size,
            timeout,
            state: Mutex::new(State::default()),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Runs `enqueue` (which puts work on the stream) unless an earlier operation failed, then
    /// waits for that work under the watchdog; any failure breaks the communicator.
    fn run<E: std::fmt::Debug>(
        &self,
        op: &'static str,
        enqueue: impl FnOnce() -> std::result::Result<(), E>,
    ) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &state.broken {
            return Err(CollectiveError::Broken {
                op,
                rank: self.rank,
                why: why.clone(),
            });
        }
        let outcome = match enqueue() {
            Ok(()) => self.watch(op, &mut state),
            Err(err) => Err(self.failed(op, format!("{err:?}"))),
        };
        if let Err(err) = &outcome {
            state.broken = Some(format!("{op}: {err}"));
        }
        outcome
    }

    /// Waits until the stream has done everything enqueued so far, polling NCCL's asynchronous
    /// error; aborts the communicator on an error or past the timeout.
    fn watch(&self, op: &'static str, state: &mut State) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| self.failed(op, format!("recording an event: {e:?}")))?;
        let started = Instant::now();
        loop {
            if done.is_complete() {
                return Ok(());
            }
            let mut reported = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator (not aborted: a broken one runs nothing).
            let asked = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut reported) }.result();
            if let Err(err) = asked.and_then(|_| reported.result()) {
                self.abort(state);
                return Err(self.failed(
                    op,
                    format!("NCCL reported {err:?} (a peer failed or its connection closed); the communicator was aborted"),
                ));
            }
            if started.elapsed() > self.timeout {
                self.abort(state);
                return Err(CollectiveError::Timeout {
                    op,
                    rank: self.rank,
                    world_size: self.world_size,
                    timeout: self.timeout,
                    message: "the communicator was aborted".into(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `ncclCommAbort`: ends the communicator's kernels and frees it (once).
    fn abort(&self, state: &mut State) {
        if !state.aborted {
            state.aborted = true;
            // SAFETY: a live communicator, never used again (every later operation is refused).
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
    }

    fn failed(&self, op: &'static str, message: String) -> CollectiveError {
        CollectiveError::Failed {
            op,
            rank: self.rank,
            world_size: self.world_size,
            message,
        }
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

    fn cu_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as _
    }

    /// ncclAllReduce (sum) of `send` into `recv`, or of `recv` in place.
    fn enqueue_all_reduce<T: Element>(
        &self,
        send: Option<&CudaSlice<T>>,
        recv: &mut CudaSlice<T>,
    ) -> std::result::Result<(), NcclError> {
        let count = recv.len();
        let (src, _record_src) = send.map(|s| s.device_ptr(&self.stream)).unzip();
        let (dst, _record_dst) = recv.device_ptr_mut(&self.stream);
        // SAFETY: device buffers of `count` elements of T on this communicator's stream.
        unsafe {
            nccl::all_reduce(
                src.unwrap_or(dst) as _,
                dst as _,
                count,
                T::as_nccl_type(),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.cu_stream(),
            )
        }
        .map(drop)
    }

    /// ncclReduceScatter (sum): `recv.len()` elements per rank.
    fn enqueue_reduce_scatter<T: Element>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> std::result::Result<(), NcclError> {
        let count = recv.len();
        let (src, _record_src) = send.device_ptr(&self.stream);
        let (dst, _record_dst) = recv.device_ptr_mut(&self.stream);
        // SAFETY: `send` holds world × count elements, `recv` count, on this stream.
        unsafe {
            nccl::reduce_scatter(
                src as _,
                dst as _,
                count,
                T::as_nccl_type(),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.cu_stream(),
            )
        }
        .map(drop)
    }

    /// ncclAllGather: `send.len()` elements per rank.
    fn enqueue_all_gather<T: Element>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> std::result::Result<(), NcclError> {
        let (src, _record_src) = send.device_ptr(&self.stream);
        let (dst, _record_dst) = recv.device_ptr_mut(&self.stream);
        // SAFETY: `recv` holds world × send.len() elements, on this stream.
        unsafe {
            nccl::all_gather(
                src as _,
                dst as _,
                send.len(),
                T::as_nccl_type(),
                self.comm,
                self.cu_stream(),
            )
        }
        .map(drop)
    }

    /// ncclBroadcast from `root`, in place.
    fn enqueue_broadcast<T: Element>(
        &self,
        buffer: &mut CudaSlice<T>,
        root: usize,
    ) -> std::result::Result<(), NcclError> {
        let count = buffer.len();
        let (dst, _record_dst) = buffer.device_ptr_mut(&self.stream);
        // SAFETY: a device buffer of `count` elements of T on this communicator's stream.
        unsafe {
            nccl::broadcast(
                dst as _,
                dst as _,
                count,
                T::as_nccl_type(),
                root as i32,
                self.comm,
                self.cu_stream(),
            )
        }
        .map(drop)
    }
}

impl Drop for NcclCollective {
    /// Aborts rather than destroys, as cudarc's `Comm` does: destroying waits for outstanding
    /// work, which a lost peer never lets finish.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let mut state = std::mem::take(state);
        self.abort(&mut state);
    }
}

/// Every failure on the way: NCCL's and the driver's (copies, allocation) alike.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
enum Failure {
    Nccl(NcclError),
    Driver(cudarc::driver::DriverError),
}

impl From<NcclError> for Failure {
    fn from(err: NcclError) -> Self {
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
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce<T: Element>(&self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
        self.check_len("all_reduce", "the receive buffer", send.len(), recv.len())?;
        self.run("all_reduce", || self.enqueue_all_reduce(Some(send), recv))
    }

    fn all_reduce_in_place<T: Element>(&self, buffer: &mut CudaSlice<T>) -> Result<()> {
        self.run("all_reduce", || self.enqueue_all_reduce(None, buffer))
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
                self.enqueue_reduce_scatter(send, shard)?;
                return Ok(());
            }
            let mut padded = self
                .stream
                .alloc_zeros::<T>(padded_shard * self.world_size())?;
            self.stream
                .memcpy_dtod(send, &mut padded.slice_mut(..send.len()))?;
            let mut full_shard = self.stream.alloc_zeros::<T>(padded_shard)?;
            self.enqueue_reduce_scatter(&padded, &mut full_shard)?;
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
                self.enqueue_all_gather(shard, recv)?;
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
            self.enqueue_all_gather(&send, &mut padded)?;
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
        self.run("broadcast", || self.enqueue_broadcast(buffer, root))
    }

    /// NCCL has no barrier: a one-element all-reduce, which the host waits for as for every
    /// operation (torch's `ProcessGroupNCCL::barrier` does the same).
    fn barrier(&self) -> Result<()> {
        self.run("barrier", || -> std::result::Result<(), Failure> {
            let mut one = self.stream.alloc_zeros::<f32>(1)?;
            self.enqueue_all_reduce(None, &mut one)?;
            Ok(())
        })
    }
}
