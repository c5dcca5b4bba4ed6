//! [`Sharded`]: data parallel over a [`TensorCollective`], ZeRO stages 0–3.
//!
//! Gradients are reduced in buckets of whole parameters as backward produces them, on the
//! window's last micro-batch (earlier ones only accumulate locally, as DDP's `no_sync`): each
//! decoder layer's when its hook runs, the final norm's and output projection's with the first
//! (top) layer's, the embeddings' at the end. A parameter no token reached on this rank (an MoE
//! expert) enters as zeros. The reduction is a sum, since every rank's loss is already divided
//! by the label tokens of all ranks.
//!
//! The flat trainable space is split into contiguous shards ([`shard_range`]). Under zero1 and
//! zero2 each rank's optimizer steps its shard only and the updated shards are then broadcast by
//! their owners, so every rank holds the same whole parameters for the next forward; zero2 also
//! drops, right after the reduction, every gradient that lies wholly outside the rank's shard.
//! gloo's reduce-scatter is an all-reduce followed by a copy (as in torch's ProcessGroupGloo), so
//! zero2 all-reduces the bucket and keeps its part: the same traffic, and the memory of a shard
//! (a kept gradient is copied out of the bucket, so no view holds the whole bucket alive).
//!
//! Every bucket is a tensor of the parameters' device (a gradient bucket concatenated from the
//! flattened gradients, reduced in place, narrowed back), so on a GPU nothing passes through
//! host memory; the CPU sums the same values in the same order as before, bit for bit.
//!
//! zero3 reduces as zero2 and also shards the parameters: each rank keeps its shard of the
//! master values (flat, end to end, updated there by the optimizer) and the parameters
//! themselves are emptied ([`residency`](super::residency)) except while read: a decoder
//! layer's are gathered from their owners for its forward and again for its backward (or
//! recompute), the embeddings' for the lookup and its backward, the final norm's and output
//! projection's for the loss and its backward, all of them for evaluation and checkpoints.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use whet_collective::shard_range;

use super::collective::{concat_owned, TensorCollective};
use super::{residency, GradSync, MicroBatch, ZeroStage};
use crate::grad::Gradients;
use crate::model::params::Piece;
use crate::model::{FlatLayout, TrainableParams};

/// ZeRO stages 0–3 over a job's collective.
pub struct Sharded {
    collective: Arc<dyn TensorCollective>,
    stage: ZeroStage,
    layout: Arc<FlatLayout>,
    /// Where the parameters (and so every bucket) live.
    device: Device,
    /// This rank's contiguous part of the flat space.
    shard: Range<usize>,
    /// Parameters after the last decoder layer (reduced with the top layer).
    after_layers: Range<usize>,
    /// Which parameters the current window has reduced.
    reduced: Vec<bool>,
    bucket_elems: usize,
    /// zero3: this rank's shard of the master values, and which parameters are held whole.
    master: Option<Tensor>,
    resident: Vec<bool>,
}

impl Sharded {
    /// Under zero3, takes this rank's shard of `params` (held whole by every rank until now)
    /// and empties the parameters.
    pub fn new(
        collective: Arc<dyn TensorCollective>,
        stage: ZeroStage,
        params: &TrainableParams,
        bucket_elems: usize,
    ) -> Result<Self> {
        let layout = params.layout().clone();
        let shard = shard_range(layout.total(), collective.world_size(), collective.rank());
        let device = params
            .as_slice()
            .first()
            .map_or(Device::Cpu, |(_, var)| var.device().clone());
        let master = if stage == ZeroStage::Zero3 {
            let pieces = pieces_of(params, layout.pieces(shard.clone()))?;
            // Its own storage: the parameters it is cut from are emptied next.
            let master = concat_owned(&pieces, master_dtype_of(params), &device)?;
            for (_, var) in params.as_slice() {
                residency::release(var)?;
            }
            residency::return_freed_memory();
            Some(master)
        } else {
            None
        };
        Ok(Self {
            collective,
            stage,
            shard,
            device,
            after_layers: params.after_layers(),
            reduced: vec![false; params.len()],
            bucket_elems: bucket_elems.max(1),
            resident: vec![master.is_none(); params.len()],
            master,
            layout,
        })
    }

    /// zero3: the whole values of the parameters `indices` (contiguous), each owner
    /// broadcasting its part, put back into the emptied parameters.
    fn gather_from(
        &mut self,
        params: &TrainableParams,
        indices: Range<usize>,
        master: &Tensor,
    ) -> Result<()> {
        let range = self.layout.range(indices.start).start..self.layout.range(indices.end - 1).end;
        let (world, me) = (self.collective.world_size(), self.collective.rank());
        let mut parts = Vec::with_capacity(world);
        for owner in 0..world {
            let theirs = shard_range(self.layout.total(), world, owner);
            let part = range.start.max(theirs.start)..range.end.min(theirs.end);
            if part.start >= part.end {
                continue;
            }
            let values = if owner == me {
                master
                    .narrow(0, part.start - self.shard.start, part.len())?
                    .force_contiguous()?
            } else {
                Tensor::zeros(part.len(), master.dtype(), &self.device)?
            };
            self.collective.broadcast(&values, owner)?;
            parts.push(values);
        }
        let flat = concat_owned(&parts, master.dtype(), &self.device)?;
        drop(parts);
        for i in indices {
            if self.resident[i] {
                continue;
            }
            let own = self.layout.range(i);
            let values = flat.narrow(0, own.start - range.start, own.len())?;
            residency::refill(&params.as_slice()[i].1, &values)?;
            self.resident[i] = true;
        }
        Ok(())
    }

    /// Sums the gradients of `indices` (those not reduced yet) over all ranks, in buckets.
    fn reduce(&mut self, grads: &mut Gradients, indices: Range<usize>) -> Result<()> {
        let todo: Vec<usize> = indices.filter(|&i| !self.reduced[i]).collect();
        let mut bucket: Vec<usize> = Vec::new();
        let mut elems = 0;
        for i in todo {
            let size = self.layout.range(i).len();
            if !bucket.is_empty() && elems + size > self.bucket_elems {
                self.reduce_bucket(grads, &bucket)?;
                bucket.clear();
                elems = 0;
            }
            bucket.push(i);
            elems += size;
            self.reduced[i] = true;
        }
        if !bucket.is_empty() {
            self.reduce_bucket(grads, &bucket)?;
        }
        Ok(())
    }

    /// One bucket: its gradients flattened end to end in the masters' dtype (zeros where this
    /// rank has none), summed in place, and cut back into gradients.
    fn reduce_bucket(&self, grads: &mut Gradients, bucket: &[usize]) -> Result<()> {
        let dtype = master_dtype(grads, bucket);
        let pieces: Vec<Tensor> = bucket
            .iter()
            .map(|&i| match grads.get(i) {
                Some(g) => g.flatten_all()?.to_dtype(dtype),
                None => Tensor::zeros(self.layout.range(i).len(), dtype, &self.device),
            })
            .collect::<Result<_>>()?;
        let shapes: Vec<_> = bucket
            .iter()
            .map(|&i| grads.get(i).map(|g| g.shape().clone()))
            .collect();
        let flat = concat_owned(&pieces, dtype, &self.device)?;
        drop(pieces);
        self.collective.all_reduce_sum(&flat)?;
        let mut at = 0;
        for (&i, shape) in bucket.iter().zip(shapes) {
            let size = self.layout.range(i).len();
            let grad = if !self.stage.shards_gradients() {
                // Every gradient is kept: views of the bucket hold no more than the bucket.
                Some(flat.narrow(0, at, size)?)
            } else if overlaps(&self.layout.range(i), &self.shard) {
                // A copy, so the rest of the bucket is freed with it.
                Some(flat.narrow(0, at, size)?.force_contiguous()?)
            } else {
                None
            };
            let grad = match grad {
                Some(g) => Some(g.reshape(shape.unwrap_or_else(|| vec![size].into()))?),
                None => None,
            };
            grads.set(i, grad);
            at += size;
        }
        Ok(())
    }

    /// Every rank's shard of `params`, broadcast by its owner, in buckets.
    fn share_updated(&self, params: &TrainableParams, dtype: DType) -> Result<()> {
        let world = self.collective.world_size();
        let me = self.collective.rank();
        for owner in 0..world {
            let range = shard_range(self.layout.total(), world, owner);
            for chunk in chunks(&self.layout, range, self.bucket_elems) {
                let flat = if owner == me {
                    concat_owned(
                        &pieces_of(params, chunk.iter().cloned())?,
                        dtype,
                        &self.device,
                    )?
                } else {
                    let len: usize = chunk.iter().map(|p| p.within.len()).sum();
                    Tensor::zeros(len, dtype, &self.device)?
                };
                self.collective.broadcast(&flat, owner)?;
                if owner == me {
                    continue;
                }
                let mut at = 0;
                for piece in &chunk {
                    let var = &params.as_slice()[piece.param].1;
                    let n = piece.within.len();
                    let values = flat.narrow(0, at, n)?;
                    if n == var.elem_count() {
                        var.set(&values.reshape(var.shape())?)?;
                    } else {
                        var.as_tensor()
                            .flatten_all()?
                            .slice_set(&values, 0, piece.within.start)?;
                    }
                    at += n;
                }
            }
        }
        Ok(())
    }
}

/// The values of `pieces` of the parameters, each a flat view.
fn pieces_of(
    params: &TrainableParams,
    pieces: impl IntoIterator<Item = Piece>,
) -> Result<Vec<Tensor>> {
    pieces
        .into_iter()
        .map(|piece| {
            params.as_slice()[piece.param]
                .1
                .as_tensor()
                .flatten_all()?
                .narrow(0, piece.within.start, piece.within.len())
        })
        .collect()
}

impl GradSync for Sharded {
    fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    fn rank(&self) -> usize {
        self.collective.rank()
    }

    fn owned(&self) -> Range<usize> {
        if self.stage.shards_optimizer() {
            self.shard.clone()
        } else {
            0..self.layout.total()
        }
    }

    fn norm_range(&self) -> Range<usize> {
        // Under zero0 every rank holds every reduced gradient; each counts its shard's squares.
        self.shard.clone()
    }

    fn layer_ready(
        &mut self,
        grads: &mut Gradients,
        params: Range<usize>,
        micro_batch: MicroBatch,
    ) -> Result<()> {
        if !micro_batch.is_last() {
            return Ok(());
        }
        // The top layer's hook comes first: the head's gradients are complete by then.
        self.reduce(grads, self.after_layers.clone())?;
        self.reduce(grads, params)
    }

    fn finish(&mut self, grads: &mut Gradients) -> Result<()> {
        self.reduce(grads, 0..self.reduced.len())?;
        self.reduced.fill(false);
        Ok(())
    }

    fn sum_scalars(&mut self, values: &mut [f64]) -> Result<()> {
        self.collective.sum_scalars(values)
    }

    fn params_updated(&mut self, params: &TrainableParams) -> Result<()> {
        // zero3's optimizer updated the master shard itself; layers are gathered from it.
        if !self.stage.shards_optimizer() || self.master.is_some() {
            return Ok(());
        }
        match params.as_slice().first().map(|(_, v)| v.dtype()) {
            Some(dtype @ (DType::F64 | DType::F32)) => self.share_updated(params, dtype),
            Some(other) => candle_core::bail!(
                "sharded optimizer state needs f32 master weights, the trainable parameters are {other:?}"
            ),
            None => Ok(()),
        }
    }

    fn barrier(&mut self) -> Result<()> {
        self.collective.barrier()
    }

    fn gather(&mut self, params: &TrainableParams, indices: Range<usize>) -> Result<()> {
        let Some(master) = self.master.clone() else {
            return Ok(());
        };
        // Every rank holds the same parameters at the same time, so all skip alike.
        if indices.clone().all(|i| self.resident[i]) {
            return Ok(());
        }
        self.gather_from(params, indices, &master)
    }

    fn release(&mut self, params: &TrainableParams, indices: Range<usize>) -> Result<()> {
        if self.master.is_none() {
            return Ok(());
        }
        let mut released = false;
        for i in indices {
            if self.resident[i] {
                residency::release(&params.as_slice()[i].1)?;
                self.resident[i] = false;
                released = true;
            }
        }
        if released {
            residency::return_freed_memory();
        }
        Ok(())
    }

    fn flat_master(&self) -> Option<Tensor> {
        self.master.clone()
    }
}

/// The dtype of the trainable parameters' masters (f32 when there are none).
fn master_dtype_of(params: &TrainableParams) -> DType {
    params
        .as_slice()
        .first()
        .map_or(DType::F32, |(_, var)| var.dtype())
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The dtype a bucket is reduced in: f64 when its first present gradient is, else f32 (bf16
/// gradients are summed in f32, as their masters are).
fn master_dtype(grads: &Gradients, bucket: &[usize]) -> DType {
    match bucket.iter().find_map(|&i| grads.get(i).map(Tensor::dtype)) {
        Some(DType::F64) => DType::F64,
        _ => DType::F32,
    }
}

/// `range`'s pieces grouped into runs of at most `limit` elements (a piece longer than the
/// limit is cut).
fn chunks(layout: &FlatLayout, range: Range<usize>, limit: usize) -> Vec<Vec<Piece>> {
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let end = (start + limit).min(range.end);
        out.push(layout.pieces(start..end).collect());
        start = end;
    }
    out
}
