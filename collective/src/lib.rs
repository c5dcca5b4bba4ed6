//! whet-collective: the collectives a job's ranks run together — all-reduce, reduce-scatter,
//! all-gather, broadcast and barrier over f32, f64 and bf16 — behind one [`Collective`] trait,
//! implemented on existing libraries: [`GlooCollective`] on the CPU (Debian's `libgloo-dev`
//! through a small cxx bridge), and NCCL on GPUs (see "NCCL" below). Ranks meet through a
//! whet-store [`Store`](whet_store::Store) (torchrun's agent store, or the one
//! `whet sft --nproc_per_node` hosts).
//!
//! # Why gloo
//!
//! gloo is what PyTorch itself runs for CPU tensors (`ProcessGroupGloo`), so the CPU ranks that
//! test every sharding path do what a torch CPU job does: the same ring all-reduce, the same
//! rendezvous (each rank's tcp address under its rank in the store), `GLOO_SOCKET_IFNAME`
//! honoured the same way. Debian packages it as `libgloo-dev` (git 5b14351 of 2022-05-18,
//! gloo 0.5.0; tcp and ibverbs transports, no libuv, no CUDA; `libgloo.so` in /usr/lib pulls
//! in hiredis and ibverbs, installed with it and unused by tcp). Natively it has all-reduce
//! (ring), all-gather(v), broadcast and barrier with per-operation timeouts and tags, for
//! float, double and its own float16 — but no bf16 type, and reduce-scatter only as an
//! old-style algorithm class (`ReduceScatterHalvingDoubling`) without per-operation timeouts.
//! For both we do what torch's `ProcessGroupGloo` does: bf16 through gloo's generic `sum`
//! over a bf16 type that adds in f32 and rounds to nearest even (c10's `BFloat16`), and
//! reduce-scatter as an all-reduce that keeps this rank's shard. No collective algorithm here
//! is our own.
//!
//! # The trait, and how NCCL fits
//!
//! [`Collective::Buffer<T>`] is where an implementation's data lives: `[T]` for gloo (plain
//! host slices, `&mut [f32]`), a device slice for NCCL (cudarc's `CudaSlice<T>`). The trait is
//! over buffers rather than candle `Tensor`s because both libraries work on buffers, and candle
//! hands a buffer of either kind to an in-place op (`InplaceOp1::cpu_fwd` gets `CpuStorage`,
//! `cuda_fwd` `CudaStorage`, whose `as_cuda_slice_mut::<T>()` is the device slice): a
//! tensor-level all-reduce in the engine is a thin adapter over either implementation, and this
//! crate (with its C++ build) needs no candle. Methods take `&self` (NCCL's communicator is
//! used through `&`), have in-place forms (which map onto NCCL's own in-place collectives,
//! free of scratch buffers), and are generic over the sealed [`Element`]: f32, f64,
//! `half::bf16`, all three native to NCCL.
//!
//! Completion: an operation has finished when it returns. gloo has no streams — it has
//! finished, full stop. NCCL enqueues on its one stream per rank (the stream candle's device
//! uses) and then waits for it under its watchdog (below), so a lost rank cannot leave a kernel
//! spinning on the stream that a later host read would block behind.
//!
//! # NCCL
//!
//! `NcclCollective`, behind the `cuda` feature, is NCCL through cudarc 0.19's bindings. It
//! compiles here (no GPU, no CUDA: `CUDARC_CUDA_VERSION=13000 cargo check -p whet-collective
//! --features cuda`; cudarc loads libcuda and libnccl when first used) but has not run on a
//! GPU yet. How it fits the trait:
//! - Set-up: each rank binds its LOCAL_RANK device first and passes that device's stream
//!   (candle's `CudaDevice::cuda_stream()`); rank 0 makes `ncclGetUniqueId` and sets its 128 bytes in
//!   the store under `nccl/<group>/id`; the others wait for them and rebuild the id; then
//!   `ncclCommInitRank` on that stream's device.
//! - `type Buffer<T> = CudaSlice<T>`; with the feature, [`Element`] also requires cudarc's
//!   `NcclType`, `DeviceRepr` and `ValidAsZeroBits` (all three types have them).
//! - `all_reduce[_in_place]` and `broadcast` are NCCL's own; `barrier` is a one-element
//!   all-reduce and a stream synchronise (NCCL has none; torch's `ProcessGroupNCCL::barrier`
//!   does the same).
//! - Reduce-scatter and all-gather: NCCL's need equal shards, which the shard rule below gives
//!   when the length is a multiple of the world size (ZeRO pads its flat space to
//!   [`padded_len`], as DeepSpeed does); other lengths go through a padded copy.
//!   `reduce_scatter_in_place` is an in-place all-reduce, because NCCL's in-place form aliases
//!   its send and receive buffers, which cudarc's safe API cannot express.
//! - A watchdog, as torch's: while an operation is outstanding the host polls
//!   `ncclCommGetAsyncError`, and an error there or the timeout passing aborts the communicator
//!   (`ncclCommAbort`), so a rank that never joins yields [`CollectiveError::Timeout`] instead
//!   of blocking the stream; `ncclCommInitRank` is bounded by the same timeout.
//!
//! # The shard rule (reduce-scatter, all-gather, ZeRO)
//!
//! A buffer of `len` elements is split into `world_size` contiguous shards in rank order, each
//! `ceil(len / world_size)` long except that the last non-empty one is shorter and any after it
//! are empty ([`shard_range`]): 10 over 4 ranks is 3, 3, 3, 1; 5 over 4 is 2, 2, 1, 0. The
//! shards are disjoint and cover the buffer, so ZeRO can give each rank `shard_range(total,
//! world, rank)` of one flat parameter space (`GradSync::owned`) and reduce-scatter gradients
//! straight into it; with `len` a multiple of the world size (see [`padded_len`]) all shards
//! are equal, as NCCL wants and DeepSpeed does. torch's `chunk` gives the same non-empty
//! shards.
//! `reduce_scatter` leaves the sum of this rank's shard; `all_gather` fills every rank's shard
//! with that rank's data.
//!
//! # Semantics every implementation keeps
//!
//! - Every rank calls the same operations in the same order with buffers of the same length
//!   (and the same root); a mismatch is not detected — it ends in a timeout or wrong data.
//! - Sums are reduced in the library's order with rounding after each addition: exact for
//!   integer-valued data (within the type's integer range), otherwise equal across ranks but
//!   not necessarily bit-equal to a sequential sum or to another library. bf16 is added as
//!   torch adds it: both operands widened to f32, the sum rounded to nearest even.
//! - Timeouts: every wait — for the other ranks at the rendezvous, for a peer's data in an
//!   operation — gives up after the communicator's timeout with an error; nothing hangs.
//!   After any failed operation the communicator returns [`CollectiveError::Broken`]: the ranks
//!   are out of step and must all make new communicators (or the job restarts).
//!
//! # Thread-safety
//!
//! [`GlooCollective`] is `Send + Sync`; operations take turns on one mutex. Ranks must issue
//! operations in the same order, so several threads of one rank calling concurrently only
//! work if something else fixes their order — in practice one thread per rank drives it.

mod error;
mod gloo;
#[cfg(feature = "cuda")]
mod nccl;

use std::ops::Range;

pub use error::{CollectiveError, Result};
pub use gloo::{GlooCollective, GlooOptions, Transport, GLOO_SOCKET_IFNAME};
#[cfg(feature = "cuda")]
pub use nccl::NcclCollective;

/// The collectives a group of ranks runs together. See the crate documentation for the
/// buffer type, the shard rule, ordering, timeouts and failures.
pub trait Collective {
    /// Where this implementation's data lives: `[T]` on the CPU, a device slice for NCCL.
    type Buffer<T: Element>: ?Sized;

    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// How many ranks take part.
    fn world_size(&self) -> usize;

    /// `recv` = the element-wise sum of every rank's `send` (both the same length).
    fn all_reduce<T: Element>(
        &self,
        send: &Self::Buffer<T>,
        recv: &mut Self::Buffer<T>,
    ) -> Result<()>;

    /// `buffer` = the element-wise sum of every rank's `buffer`.
    fn all_reduce_in_place<T: Element>(&self, buffer: &mut Self::Buffer<T>) -> Result<()>;

    /// `shard` = this rank's shard ([`shard_range`] of `send`'s length) of the sum of every
    /// rank's `send`; `shard` must have exactly that shard's length.
    fn reduce_scatter<T: Element>(
        &self,
        send: &Self::Buffer<T>,
        shard: &mut Self::Buffer<T>,
    ) -> Result<()>;

    /// This rank's shard of `buffer` = that shard of the sum of every rank's `buffer`. The
    /// rest of `buffer` is unspecified afterwards (both implementations here leave the whole
    /// sum there; NCCL's own in-place reduce-scatter would leave it as it was).
    fn reduce_scatter_in_place<T: Element>(&self, buffer: &mut Self::Buffer<T>) -> Result<()>;

    /// `recv` = every rank's `shard` end to end: rank `r`'s at `shard_range(recv.len(), world,
    /// r)`; `shard` must have this rank's shard's length.
    fn all_gather<T: Element>(
        &self,
        shard: &Self::Buffer<T>,
        recv: &mut Self::Buffer<T>,
    ) -> Result<()>;

    /// Each rank's shard of `buffer` (its [`shard_range`]) is copied from that rank to all.
    fn all_gather_in_place<T: Element>(&self, buffer: &mut Self::Buffer<T>) -> Result<()>;

    /// `buffer` = `root`'s `buffer`, on every rank.
    fn broadcast<T: Element>(&self, buffer: &mut Self::Buffer<T>, root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// This rank's shard of a buffer of `len` elements.
    fn shard(&self, len: usize) -> Range<usize> {
        shard_range(len, self.world_size(), self.rank())
    }
}

/// The element types of a [`Collective`]: f32, f64 and bf16 (sealed; each is plain data of a
/// fixed size that every bit pattern is valid for, so buffers can travel as bytes). With the
/// `cuda` feature each is also one of cudarc's device and NCCL element types.
pub trait Element: sealed::Sealed + sealed::Device + Copy + Send + Sync + 'static {
    const DTYPE: DType;
}

/// An [`Element`]'s type, as the libraries name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 => 2,
        }
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::bf16 {}

    /// What a device implementation needs of an element: nothing without one.
    #[cfg(not(feature = "cuda"))]
    pub trait Device {}
    #[cfg(not(feature = "cuda"))]
    impl<T> Device for T {}

    #[cfg(feature = "cuda")]
    pub trait Device:
        cudarc::nccl::safe::NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits
    {
    }
    #[cfg(feature = "cuda")]
    impl<T> Device for T where
        T: cudarc::nccl::safe::NcclType
            + cudarc::driver::DeviceRepr
            + cudarc::driver::ValidAsZeroBits
    {
    }
}

/// Rank `rank`'s shard of a buffer of `len` elements split over `world_size` ranks:
/// contiguous, in rank order, `ceil(len / world_size)` long, the last non-empty one shorter
/// and any after it empty (see the crate documentation).
pub fn shard_range(len: usize, world_size: usize, rank: usize) -> Range<usize> {
    assert!(
        rank < world_size,
        "rank {rank} out of range for world size {world_size}"
    );
    let shard = len.div_ceil(world_size);
    let start = (rank * shard).min(len);
    start..(start + shard).min(len)
}

/// The smallest length of at least `len` that `world_size` ranks split into equal shards —
/// what ZeRO pads its flat space to so that every shard is `padded_len / world_size` long.
pub fn padded_len(len: usize, world_size: usize) -> usize {
    len.div_ceil(world_size) * world_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_disjoint_and_cover_the_buffer() {
        for world in 1..=9 {
            for len in 0..=40 {
                let mut next = 0;
                for rank in 0..world {
                    let range = shard_range(len, world, rank);
                    assert_eq!(range.start, next, "len {len} world {world} rank {rank}");
                    assert!(range.len() <= len.div_ceil(world));
                    next = range.end;
                }
                assert_eq!(next, len, "len {len} world {world}");
            }
        }
    }

    #[test]
    fn shard_rule_examples() {
        let lens = |len, world| -> Vec<usize> {
            (0..world)
                .map(|rank| shard_range(len, world, rank).len())
                .collect()
        };
        assert_eq!(lens(10, 4), [3, 3, 3, 1]);
        assert_eq!(lens(5, 4), [2, 2, 1, 0]);
        assert_eq!(lens(12, 4), [3, 3, 3, 3]);
        assert_eq!(lens(1, 3), [1, 0, 0]);
        assert_eq!(lens(0, 2), [0, 0]);
        assert_eq!(padded_len(10, 4), 12);
        assert_eq!(padded_len(12, 4), 12);
        assert_eq!(padded_len(0, 4), 0);
    }
}
