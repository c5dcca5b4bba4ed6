//! How one process's gradients and scalars meet the others'. The training loop talks to a
//! [`GradSync`] and nothing else about distribution: it is told each decoder layer's gradients as
//! backward produces them (so a data-parallel or ZeRO implementation can start reducing while
//! backward goes on), once more when the window's backward is complete, and it sums the scalars
//! every rank must agree on (label-token counts, loss sums, eval sums, squared gradient norms).
//!
//! Invariants every implementation keeps:
//! * after [`GradSync::finish`], the gradients inside [`GradSync::owned`] are the sum over all
//!   ranks (what one process holding every batch would have computed);
//! * the optimizer keeps state for `owned()` only; clipping counts squares in
//!   [`GradSync::norm_range`] only, and those ranges of different ranks never overlap and
//!   together cover the flat space;
//! * after [`GradSync::params_updated`], every rank holds the same, whole parameters.
//!
//! [`Sharded`] is the multi-process implementation (ZeRO stages 0–3 over a
//! [`TensorCollective`]: gloo on the CPU, NCCL on GPUs, on the parameters' device tensors).

mod collective;
mod group;
mod residency;
mod sharded;

use std::ops::Range;

use candle_core::Result;

use crate::grad::Gradients;
use crate::model::TrainableParams;

#[cfg(feature = "cuda")]
pub use collective::NcclOnDevice;
pub use collective::TensorCollective;
pub use group::{Group, ZeroStage};
pub use sharded::Sharded;

/// Which micro-batch of the accumulation window a backward pass belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatch {
    pub index: usize,
    pub count: usize,
}

impl MicroBatch {
    /// The window's last backward: after it, the gradients are final for this step.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

pub trait GradSync {
    /// Ranks taking part (1 in one process).
    fn world_size(&self) -> usize;

    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize {
        0
    }

    /// The range of the flat trainable space (see [`crate::model::FlatLayout`]) whose reduced
    /// gradients this process holds after `finish`, and whose optimizer state it keeps.
    fn owned(&self) -> Range<usize>;

    /// The range whose squared gradients this process counts toward the global norm.
    fn norm_range(&self) -> Range<usize> {
        self.owned()
    }

    /// Backward of `micro_batch` has just added the gradients of the trainable parameters with
    /// indices `params` (one decoder layer's) to `grads`.
    fn layer_ready(
        &mut self,
        grads: &mut Gradients,
        params: Range<usize>,
        micro_batch: MicroBatch,
    ) -> Result<()>;

    /// Every backward of the window is done: reduce what is left (embeddings, final norm,
    /// output projection, and anything a layer hook deferred).
    fn finish(&mut self, grads: &mut Gradients) -> Result<()>;

    /// Replaces each value by its sum over all ranks.
    fn sum_scalars(&mut self, values: &mut [f64]) -> Result<()>;

    /// The optimizer has updated `owned()` of `params`: bring every rank's copy up to date.
    fn params_updated(&mut self, _params: &TrainableParams) -> Result<()> {
        Ok(())
    }

    /// Returns once every rank has called it (checkpoints are written in turns).
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }

    /// The parameters with indices `params` are about to be read: make them whole (ZeRO-3
    /// gathers them from their owners; every other stage holds them whole already).
    fn gather(&mut self, _params: &TrainableParams, _indices: Range<usize>) -> Result<()> {
        Ok(())
    }

    /// The parameters with indices `params` are not read again before the next `gather`.
    fn release(&mut self, _params: &TrainableParams, _indices: Range<usize>) -> Result<()> {
        Ok(())
    }

    /// Where the optimizer keeps and updates this rank's master values when the parameters
    /// themselves are not held whole (ZeRO-3): `owned()` of the flat space, end to end.
    fn flat_master(&self) -> Option<candle_core::Tensor> {
        None
    }
}

/// One process: every reduction is the identity and it owns the whole flat space.
#[derive(Debug, Clone)]
pub struct SingleProcess {
    total: usize,
}

impl SingleProcess {
    /// For a flat space of `total` elements (`TrainableParams::num_elements`).
    pub fn new(total: usize) -> Self {
        Self { total }
    }
}

impl GradSync for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }

    fn owned(&self) -> Range<usize> {
        0..self.total
    }

    fn layer_ready(&mut self, _: &mut Gradients, _: Range<usize>, _: MicroBatch) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self, _: &mut Gradients) -> Result<()> {
        Ok(())
    }

    fn sum_scalars(&mut self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
}
