//! One rank of a launched job (any WORLD_SIZE, 1 included: a launched process joins a group of
//! one as DeepSpeed does on one GPU), however it was launched: bind the rank's device, reach the
//! job's store through [`RankEnv::connect_store`] — the one path every rank takes — meet the
//! other ranks there, connect the collectives through the same store (NCCL when the rank trains
//! on a GPU, gloo on the CPU), and run the one training recipe as this rank of the [`Group`].
//!
//! Two test-only switches (read from the environment, documented in ARCHITECTURE.md; no user
//! needs them):
//! - `WHET_RENDEZVOUS_ONLY=1`: after meeting, print `rank R of W met all ranks through the
//!   store at ADDR:PORT` and exit 0 instead of refusing.
//! - `WHET_TEST_FAIL_RANK=K`: rank K prints a few error lines and exits with status
//!   [`INJECTED_FAILURE_STATUS`] before it reaches the store, so the others wait there for it.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use whet_collective::GlooCollective;
use whet_shared::JobConfig;
use whet_store::{RankEnv, RankStore, Store};

use crate::sync::{Group, TensorCollective};
use crate::train::outputs::SinkFactory;
use crate::train::progress::Console;

/// Test-only: meet, report, exit 0.
pub const RENDEZVOUS_ONLY: &str = "WHET_RENDEZVOUS_ONLY";
/// Test-only: the rank that fails on purpose before the rendezvous.
pub const TEST_FAIL_RANK: &str = "WHET_TEST_FAIL_RANK";
/// The status a rank chosen by [`TEST_FAIL_RANK`] exits with.
pub const INJECTED_FAILURE_STATUS: u8 = 3;

/// How long a rank waits for the store to answer, for the others to arrive, and for the others
/// in every collective (torch's TCPStore default) before the job ends with an error.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// Trains `config` as rank `env.rank` of `env.world_size`.
pub fn run_rank(
    env: &RankEnv,
    config: &JobConfig,
    make_sinks: SinkFactory,
) -> anyhow::Result<ExitCode> {
    if test_switch_names(TEST_FAIL_RANK, env.rank) {
        eprintln!(
            "error: rank {} fails on purpose ({TEST_FAIL_RANK}={}, a test-only switch)",
            env.rank, env.rank
        );
        eprintln!("error: the other ranks are left waiting at the store");
        return Ok(ExitCode::from(INJECTED_FAILURE_STATUS));
    }
    let config = as_launched(config, env);
    // The device first: NCCL's communicator is made on its stream, and the model goes there.
    let device = crate::device::select_device(&config)
        .map_err(|d| anyhow::anyhow!("{}: {} ({})", d.field, d.message_en, d.fix))?;
    let store = meet(env, RENDEZVOUS_TIMEOUT)?;
    if switch(RENDEZVOUS_ONLY).as_deref() == Some("1") {
        println!(
            "rank {} of {} met all ranks through the store at {}:{}",
            env.rank, env.world_size, env.master_addr, env.master_port
        );
        return Ok(ExitCode::SUCCESS);
    }
    let group = join(env, store, &device)?;
    let console = if group.is_leader() {
        Console::new(std::io::stderr().is_terminal())
    } else {
        Console::quiet()
    };
    crate::train::train(&config, &console, make_sinks, &group)?;
    // What each rank held at most: ZeRO's savings are per rank, so each says its own.
    if let Some(mib) = crate::bench::peak_rss_mib() {
        eprintln!(
            "rank {} of {}: peak RSS {mib:.0} MiB",
            env.rank, env.world_size
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// This rank's place in the job's [`Group`] on `device` (the one it bound): it meets the others
/// at the store, then connects the collectives through it.
pub fn join_group(env: &RankEnv, device: &Device) -> anyhow::Result<Group> {
    let store = meet(env, RENDEZVOUS_TIMEOUT)?;
    join(env, store, device)
}

/// NCCL on the stream of a GPU rank's device, gloo for a CPU rank.
fn join(env: &RankEnv, store: RankStore, device: &Device) -> anyhow::Result<Group> {
    let (rank, world) = (env.rank, env.world_size);
    let collective: Arc<dyn TensorCollective> = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let nccl = whet_collective::NcclCollective::new(
                store.store(),
                cuda.cuda_stream(),
                rank,
                world,
                "0",
                RENDEZVOUS_TIMEOUT,
            )
            .with_context(|| format!("rank {rank} of {world}: connecting NCCL's collectives"))?;
            // NCCL's communicator is not Send: the group (an Arc, as gloo's) stays on the
            // thread that trains.
            #[allow(clippy::arc_with_non_send_sync)]
            Arc::new(crate::sync::NcclOnDevice {
                nccl,
                device: device.clone(),
            })
        }
        Device::Cpu => Arc::new(
            GlooCollective::new(store.store(), rank, world, RENDEZVOUS_TIMEOUT).with_context(
                || format!("rank {rank} of {world}: connecting gloo's collectives"),
            )?,
        ),
        other => anyhow::bail!(
            "rank {rank} of {world}: no collective for {:?} in this build",
            other.location()
        ),
    };
    Ok(Group::new(store, collective, RENDEZVOUS_TIMEOUT))
}

/// The job as its launcher started it: the world the ranks form decides the step arithmetic,
/// whether or not the flags said `--nproc_per_node` (torchrun's ranks see no such flag).
fn as_launched(config: &JobConfig, env: &RankEnv) -> JobConfig {
    let mut config = config.clone();
    let per_node = env.local_world_size.max(1);
    config.launch.nproc_per_node = Some(per_node as _);
    config.launch.nnodes = (env.world_size / per_node).max(1) as _;
    config
}

fn switch(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|value| !value.is_empty())
}

/// Whether the test-only switch `var` names `rank`.
fn test_switch_names(var: &str, rank: usize) -> bool {
    switch(var).and_then(|value| value.parse::<usize>().ok()) == Some(rank)
}

/// Connects to the job's store and waits until every rank has arrived: each rank claims the key
/// `rendezvous/rank_<R>` (a second process claiming the same RANK is an error), then waits for
/// all `WORLD_SIZE` keys.
pub fn meet(env: &RankEnv, timeout: Duration) -> anyhow::Result<RankStore> {
    let where_ = format!("{}:{}", env.master_addr, env.master_port);
    let rank_store = env.connect_store(timeout).with_context(|| {
        format!(
            "rank {} of {} could not reach the job's store at {where_}",
            env.rank, env.world_size
        )
    })?;
    let store = rank_store.store();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let me = format!("pid {} at {nanos}", std::process::id());
    let key = arrival_key(env.rank);
    let holder = store
        .compare_set(&key, b"", me.as_bytes())
        .with_context(|| {
            format!(
                "rank {}: announcing itself in the store at {where_}",
                env.rank
            )
        })?;
    if holder != me.as_bytes() {
        anyhow::bail!(
            "RANK {} is already taken in the store at {where_} (by {}): each rank of a job needs \
             its own RANK; is another job using --master_port {}?",
            env.rank,
            String::from_utf8_lossy(&holder),
            env.master_port
        );
    }
    eprintln!(
        "rank {} of {}: waiting at {where_} for all {} ranks",
        env.rank, env.world_size, env.world_size
    );
    let keys: Vec<String> = (0..env.world_size).map(arrival_key).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&keys, timeout).with_context(|| {
        format!(
            "rank {} waited {timeout:?} at {where_} and not all {} ranks arrived",
            env.rank, env.world_size
        )
    })?;
    Ok(rank_store)
}

fn arrival_key(rank: usize) -> String {
    format!("rendezvous/rank_{rank}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use whet_store::TcpStoreServer;

    #[test]
    fn ranks_meet_through_an_agent_store_and_a_rank_cannot_come_twice() {
        let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
        let port = server.port();
        let env = move |rank| RankEnv {
            rank,
            world_size: 3,
            ..RankEnv::launched_by_whet(rank, 3, "127.0.0.1", port)
        };
        let timeout = Duration::from_secs(20);
        let others: Vec<_> = [1, 2]
            .into_iter()
            .map(|rank| thread::spawn(move || meet(&env(rank), timeout).map(|_| ())))
            .collect();
        // Ranks 1 and 2 are waiting for rank 0.
        assert!(server.await_waiting_clients(2, timeout));
        let rank0 = meet(&env(0), timeout).unwrap();
        for other in others {
            other.join().unwrap().unwrap();
        }
        assert_eq!(
            rank0.store().get("rendezvous/rank_1").unwrap()[..4],
            *b"pid "
        );

        let twice = meet(&env(1), timeout).unwrap_err().to_string();
        assert!(twice.starts_with("RANK 1 is already taken"), "{twice}");
    }
}
