//! Batches for the loop: each window's micro-batches collated on the CPU — by a thread of its
//! own a few windows ahead when `dataloader_num_workers > 0` — and moved to the device by the
//! loop. The prefetch thread runs a copy of the deterministic sampler, so it yields exactly the
//! windows the loop's own sampler does (checked every step): the order of batches never depends
//! on whether or how far ahead it runs.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::Device;

use super::data::{self, RankShare, Sample, Sampler};
use crate::grad::Batch;

/// Right-padded CPU batches of one window's micro-batches (sample indices).
fn collate_window(
    micro_batches: &[Vec<usize>],
    samples: &[Sample],
    pad_id: u32,
) -> candle_core::Result<Vec<Batch>> {
    micro_batches
        .iter()
        .map(|rows| {
            let chosen: Vec<&Sample> = rows.iter().map(|&i| &samples[i]).collect();
            data::collate(&chosen, pad_id, &Device::Cpu)
        })
        .collect()
}

/// A window's sample indices and its collated micro-batches.
type PrefetchedWindow = (Vec<Vec<usize>>, candle_core::Result<Vec<Batch>>);

pub struct Loader {
    samples: Arc<Vec<Sample>>,
    pad_id: u32,
    prefetched: Option<Receiver<PrefetchedWindow>>,
}

impl Loader {
    /// With `prefetch`, a thread collates this rank's share of the next `windows` windows of
    /// `sampler` (a copy of the loop's, in the same state) ahead of the step.
    pub fn new(
        samples: Arc<Vec<Sample>>,
        pad_id: u32,
        prefetch: bool,
        mut sampler: Sampler,
        accumulation: usize,
        share: RankShare,
        windows: u64,
    ) -> Self {
        let prefetched = prefetch.then(|| {
            let (sender, receiver) = sync_channel(2);
            let samples = samples.clone();
            std::thread::spawn(move || {
                for _ in 0..windows {
                    let window = sampler.next_window_for(accumulation, share);
                    let batches = collate_window(&window.micro_batches, &samples, pad_id);
                    if sender.send((window.micro_batches, batches)).is_err() {
                        break; // the run ended early
                    }
                }
            });
            receiver
        });
        Self {
            samples,
            pad_id,
            prefetched,
        }
    }

    /// The micro-batches of `window` (the sample indices the loop's sampler just handed out),
    /// on `device`.
    pub fn batches(
        &mut self,
        window: &[Vec<usize>],
        device: &Device,
    ) -> anyhow::Result<Vec<Batch>> {
        let batches = match &self.prefetched {
            Some(receiver) => {
                let (indices, batches) = receiver
                    .recv()
                    .context("the batch prefetch thread stopped")?;
                if indices != window {
                    bail!("internal error: the prefetched window differs from the sampler's");
                }
                batches?
            }
            None => collate_window(window, &self.samples, self.pad_id)?,
        };
        Ok(batches
            .iter()
            .map(|b| b.to_device(device))
            .collect::<candle_core::Result<_>>()?)
    }
}
