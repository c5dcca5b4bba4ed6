//! [`Sharded`]: data parallel over a [`Collective`], ZeRO stages 0–2.
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
//! zero2 all-reduces the bucket and keeps its part: the same traffic, and the memory of a shard.
//!
//! zero3 reduces as zero2 and also shards the parameters: each rank keeps its shard of the
//! master values (flat, end to end, updated there by the optimizer) and the parameters
//! themselves are emptied ([`residency`](super::residency)) except while read: a decoder
//! layer's are gathered from their owners for its forward and again for its backward (or
//! recompute), the embeddings' for the lookup and its backward, the final norm's and output
//! projection's for the loss and its backward, all of them for evaluation and checkpoints.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, WithDType};
use whet_collective::{shard_range, Collective, Element, GlooCollective};

use super::{residency, GradSync, MicroBatch, ZeroStage};
use crate::grad::Gradients;
use crate::model::params::Piece;
use crate::model::{FlatLayout, TrainableParams};

/// ZeRO stages 0–2 over gloo.
pub struct Sharded {
    collective: Arc<GlooCollective>,
    stage: ZeroStage,
    layout: Arc<FlatLayout>,
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
        collective: Arc<GlooCollective>,
        stage: ZeroStage,
        params: &TrainableParams,
        bucket_elems: usize,
    ) -> Result<Self> {
        let layout = params.layout().clone();
        let shard = shard_range(layout.total(), collective.world_size(), collective.rank());
        let master = if stage == ZeroStage::Zero3 {
            let pieces: Vec<Tensor> = layout
                .pieces(shard.clone())
                .map(|piece| {
                    let var = &params.as_slice()[piece.param].1;
                    var.as_tensor()
                        .flatten_all()?
                        .narrow(0, piece.within.start, piece.within.len())?
                        .copy()
                })
                .collect::<Result<_>>()?;
            let master = if pieces.is_empty() {
                Tensor::zeros(0, master_dtype_of(params), &Device::Cpu)?
            } else {
                Tensor::cat(&pieces, 0)?
            };
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
    fn gather_as<T: Element + WithDType>(
        &mut self,
        params: &TrainableParams,
        indices: Range<usize>,
        master: &Tensor,
    ) -> Result<()> {
        let range = self.layout.range(indices.start).start..self.layout.range(indices.end - 1).end;
        let (world, me) = (self.collective.world_size(), self.collective.rank());
        let mut flat: Vec<T> = vec![T::from_f64(0.0); range.len()];
        for owner in 0..world {
            let theirs = shard_range(self.layout.total(), world, owner);
            let part = range.start.max(theirs.start)..range.end.min(theirs.end);
            if part.start >= part.end {
                continue;
            }
            let at = part.start - range.start..part.end - range.start;
            if owner == me {
                let values = master
                    .narrow(0, part.start - self.shard.start, part.len())?
                    .to_vec1::<T>()?;
                flat[at.clone()].copy_from_slice(&values);
            }
            self.collective
                .broadcast(&mut flat[at], owner)
                .map_err(candle_core::Error::wrap)?;
        }
        for i in indices {
            if self.resident[i] {
                continue;
            }
            let own = self.layout.range(i);
            let values = flat[own.start - range.start..own.end - range.start].to_vec();
            residency::refill(&params.as_slice()[i].1, T::to_cpu_storage_owned(values))?;
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

    fn reduce_bucket(&self, grads: &mut Gradients, bucket: &[usize]) -> Result<()> {
        match master_dtype(grads, bucket) {
            DType::F64 => self.reduce_bucket_as::<f64>(grads, bucket),
            _ => self.reduce_bucket_as::<f32>(grads, bucket),
        }
    }

    fn reduce_bucket_as<T: Element + WithDType>(
        &self,
        grads: &mut Gradients,
        bucket: &[usize],
    ) -> Result<()> {
        let sizes: Vec<usize> = bucket.iter().map(|&i| self.layout.range(i).len()).collect();
        let mut flat: Vec<T> = Vec::with_capacity(sizes.iter().sum());
        let mut shapes = Vec::with_capacity(bucket.len());
        let mut device = Device::Cpu;
        for (&i, &size) in bucket.iter().zip(&sizes) {
            match grads.get(i) {
                Some(g) => {
                    shapes.push(Some(g.shape().clone()));
                    device = g.device().clone();
                    flat.extend(
                        g.flatten_all()?
                            .to_dtype(<T as WithDType>::DTYPE)?
                            .to_vec1::<T>()?,
                    );
                }
                None => {
                    shapes.push(None);
                    flat.extend(std::iter::repeat_n(T::from_f64(0.0), size));
                }
            }
        }
        self.collective
            .all_reduce_in_place(&mut flat[..])
            .map_err(candle_core::Error::wrap)?;
        let mut at = 0;
        for ((&i, &size), shape) in bucket.iter().zip(&sizes).zip(shapes) {
            let keep =
                !self.stage.shards_gradients() || overlaps(&self.layout.range(i), &self.shard);
            let grad = if keep {
                let shape = shape.unwrap_or_else(|| vec![size].into());
                Some(Tensor::from_slice(&flat[at..at + size], shape, &device)?)
            } else {
                None
            };
            grads.set(i, grad);
            at += size;
        }
        Ok(())
    }

    /// Every rank's shard of `params`, broadcast by its owner, in buckets.
    fn share_updated<T: Element + WithDType>(&self, params: &TrainableParams) -> Result<()> {
        let world = self.collective.world_size();
        let me = self.collective.rank();
        for owner in 0..world {
            let range = shard_range(self.layout.total(), world, owner);
            for chunk in chunks(&self.layout, range, self.bucket_elems) {
                let len: usize = chunk.iter().map(|p| p.within.len()).sum();
                let mut flat: Vec<T> = Vec::with_capacity(len);
                if owner == me {
                    for piece in &chunk {
                        let var = &params.as_slice()[piece.param].1;
                        let values = var
                            .as_tensor()
                            .flatten_all()?
                            .narrow(0, piece.within.start, piece.within.len())?
                            .to_vec1::<T>()?;
                        flat.extend(values);
                    }
                } else {
                    flat.resize(len, T::from_f64(0.0));
                }
                self.collective
                    .broadcast(&mut flat[..], owner)
                    .map_err(candle_core::Error::wrap)?;
                if owner == me {
                    continue;
                }
                let mut at = 0;
                for piece in &chunk {
                    let var = &params.as_slice()[piece.param].1;
                    let n = piece.within.len();
                    let values = Tensor::from_slice(&flat[at..at + n], n, var.device())?;
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
        self.collective
            .all_reduce_in_place(values)
            .map_err(candle_core::Error::wrap)
    }

    fn params_updated(&mut self, params: &TrainableParams) -> Result<()> {
        // zero3's optimizer updated the master shard itself; layers are gathered from it.
        if !self.stage.shards_optimizer() || self.master.is_some() {
            return Ok(());
        }
        match params.as_slice().first().map(|(_, v)| v.dtype()) {
            Some(DType::F64) => self.share_updated::<f64>(params),
            Some(DType::F32) => self.share_updated::<f32>(params),
            Some(other) => candle_core::bail!(
                "sharded optimizer state needs f32 master weights, the trainable parameters are {other:?}"
            ),
            None => Ok(()),
        }
    }

    fn barrier(&mut self) -> Result<()> {
        self.collective.barrier().map_err(candle_core::Error::wrap)
    }

    fn gather(&mut self, params: &TrainableParams, indices: Range<usize>) -> Result<()> {
        let Some(master) = self.master.clone() else {
            return Ok(());
        };
        // Every rank holds the same parameters at the same time, so all skip alike.
        if indices.clone().all(|i| self.resident[i]) {
            return Ok(());
        }
        match master.dtype() {
            DType::F64 => self.gather_as::<f64>(params, indices, &master),
            _ => self.gather_as::<f32>(params, indices, &master),
        }
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

/// The dtype of a bucket's gradients: that of the first present, f32 when none is.
fn master_dtype(grads: &Gradients, bucket: &[usize]) -> DType {
    bucket
        .iter()
        .find_map(|&i| grads.get(i).map(Tensor::dtype))
        .unwrap_or(DType::F32)
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
