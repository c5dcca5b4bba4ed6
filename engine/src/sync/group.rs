//! The job's ranks as the recipe sees them: which one this process is, the store they met at,
//! the collective they reduce over — and the ZeRO stage that decides what each rank keeps.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::Device;
use whet_shared::config::ZeroSettings;
use whet_store::{RankStore, Store};

use super::{GradSync, Sharded, SingleProcess, TensorCollective};
use crate::model::TrainableParams;

/// What a rank keeps whole and what it keeps a shard of (DeepSpeed's stages). On the CPU the
/// `_offload` variants are the same: the optimizer state (and zero3's parameter shards) is in
/// host memory already. On GPUs `offload_optimizer` keeps the optimizer's moments in host
/// memory and runs its update there (`AdamW::with_state_on`); zero3's master shard stays on
/// the device (parameter offload is not written yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStage {
    /// Plain data parallel: gradients all-reduced, every rank steps every parameter.
    Zero0,
    /// The optimizer state (and its f32 masters' update) sharded; updated shards shared.
    Zero1,
    /// Also the gradients: each rank keeps only its shard's after the reduction.
    Zero2,
    /// Also the parameters: each rank keeps its shard of the masters, and a layer's weights
    /// are gathered just in time for its forward and backward, then freed.
    Zero3,
}

impl ZeroStage {
    /// The stage `--deepspeed` asks for, or a refusal naming the field and the fix.
    pub fn from_settings(zero: &ZeroSettings) -> anyhow::Result<ZeroStage> {
        Ok(match zero.stage {
            0 => ZeroStage::Zero0,
            1 => ZeroStage::Zero1,
            2 => ZeroStage::Zero2,
            3 => ZeroStage::Zero3,
            stage => bail!("deepspeed: ZeRO stage {stage} does not exist; use zero0 to zero3"),
        })
    }

    /// DeepSpeed's name for the stage.
    pub fn name(self) -> &'static str {
        match self {
            ZeroStage::Zero0 => "zero0",
            ZeroStage::Zero1 => "zero1",
            ZeroStage::Zero2 => "zero2",
            ZeroStage::Zero3 => "zero3",
        }
    }

    /// Whether each rank keeps only its shard's gradients.
    pub fn shards_gradients(self) -> bool {
        matches!(self, ZeroStage::Zero2 | ZeroStage::Zero3)
    }

    /// Whether ranks own disjoint shards of the optimizer state.
    pub fn shards_optimizer(self) -> bool {
        self != ZeroStage::Zero0
    }
}

/// This process among the job's ranks: one process alone, or rank `rank` of `world_size` with
/// the store and the collective they share.
pub struct Group {
    rank: usize,
    world_size: usize,
    shared: Option<Shared>,
}

struct Shared {
    store: RankStore,
    collective: Arc<dyn TensorCollective>,
    timeout: Duration,
}

impl Group {
    /// One process: no store, no collective.
    pub fn single() -> Group {
        Group {
            rank: 0,
            world_size: 1,
            shared: None,
        }
    }

    /// Rank `collective.rank()` of a job whose ranks met at `store` (a job of one rank too: a
    /// launched process of world size 1 runs the same path as a larger world).
    pub fn new(
        store: RankStore,
        collective: Arc<dyn TensorCollective>,
        timeout: Duration,
    ) -> Group {
        Group {
            rank: collective.rank(),
            world_size: collective.world_size(),
            shared: Some(Shared {
                store,
                collective,
                timeout,
            }),
        }
    }

    /// The device the ranks' collective is bound to, which the model must live on (one
    /// context per process); None for one process, which picks its device from the config.
    pub fn device(&self) -> Option<Device> {
        self.shared
            .as_ref()
            .map(|shared| shared.collective.device())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank 0 writes the run's files; the others write only their own shards.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// The gradient synchroniser for `params` under `stage`, reducing in buckets of at most
    /// `bucket_elems` elements.
    pub fn grad_sync(
        &self,
        stage: ZeroStage,
        params: &TrainableParams,
        bucket_elems: usize,
    ) -> candle_core::Result<Box<dyn GradSync>> {
        Ok(match &self.shared {
            None => Box::new(SingleProcess::new(params.num_elements())),
            Some(shared) => Box::new(Sharded::new(
                shared.collective.clone(),
                stage,
                params,
                bucket_elems,
            )?),
        })
    }

    /// The value rank 0 decides (`value` there; ignored elsewhere), on every rank: rank 0 puts it
    /// in the store under `key`, the others wait for it.
    pub fn from_leader(&self, key: &str, value: Option<&str>) -> anyhow::Result<String> {
        let Some(shared) = &self.shared else {
            return value
                .map(str::to_string)
                .context("internal error: a single process must decide the value itself");
        };
        let key = format!("whet/{key}");
        let store = shared.store.store();
        if self.is_leader() {
            let value = value.context("internal error: rank 0 must decide the value")?;
            store
                .set(&key, value.as_bytes())
                .with_context(|| format!("rank 0: sharing {key} through the store"))?;
            return Ok(value.to_string());
        }
        store
            .wait(&[&key], shared.timeout)
            .with_context(|| format!("rank {}: waiting for rank 0's {key}", self.rank))?;
        let bytes = store
            .get(&key)
            .with_context(|| format!("rank {}: reading rank 0's {key}", self.rank))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
