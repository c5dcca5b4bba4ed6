//! Multi-process jobs: the launcher and the rank's first steps.
//!
//! `whet sft --nproc_per_node N` (or NPROC_PER_NODE=N, or `--nnodes` > 1; N = 1 too: as with
//! ms-swift, naming a process count is what makes a launch) is a launcher, as torchrun is: node 0's launcher hosts the job's TCPStore at `master_port` (the ranks are its
//! clients, like torchrun's agent store), and every node's launcher starts its N ranks — copies
//! of this executable with the same arguments and torchrun's rank variables
//! ([`LaunchPlan::rank_env`]) — forwards their output line by line as `[rank k] ...`, forwards
//! SIGINT/SIGTERM/SIGHUP to them, and ends them all when one fails ([`supervisor`]); the
//! launchers of a multi-node job tell each other of a failure and node 0's outlasts the others
//! ([`peers`]). The launcher itself does no training.
//!
//! A process whose environment names a rank (whet's launcher, torchrun, or anything that sets
//! RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is one rank of a
//! job and never launches: it reaches the store through `RankEnv::connect_store`, meets the
//! other ranks there and trains as its rank ([`rank`]) — a world of one included, which joins
//! a group of one exactly as a larger world's ranks join theirs (DeepSpeed on one GPU).

mod peers;
pub mod rank;
pub mod supervisor;

use whet_shared::config::LaunchConfig;
use whet_store::RankEnv;

pub use rank::{join_group, run_rank};

/// Starts this node's ranks as torchrun would: this executable again, with the arguments this
/// process was given (`whet sft ...`, `whet bench train ...`).
pub fn launch_this_command(plan: &LaunchPlan) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::Context;
    let program = std::env::current_exe().context("finding the whet executable to launch")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    run_launcher(plan, &program, &args)
}
pub use supervisor::run_launcher;

/// What one node's launcher starts: `nproc_per_node` ranks of `nproc_per_node × nnodes`, all
/// meeting at `master_addr:master_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    /// This node among the job's; node 0's launcher hosts the store.
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchPlan {
    /// The plan the config's launch fields ask for: `Ok(None)` when the job is one plain
    /// process (nproc_per_node unset, nnodes 1; ms-swift's launcher switches on its presence
    /// alone, so `--nproc_per_node 1` launches one rank); an error naming the field, its value
    /// and the fix when they cannot be launched.
    pub fn from_config(launch: &LaunchConfig) -> Result<Option<LaunchPlan>, String> {
        let asked = launch.nproc_per_node.is_some();
        let nproc_per_node = launch.nproc_per_node.unwrap_or(1);
        let nproc_per_node = usize::try_from(nproc_per_node)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                format!("nproc_per_node is {nproc_per_node}: it counts the processes to start on this machine; use 1 or more")
            })?;
        let nnodes = usize::try_from(launch.nnodes)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                format!(
                    "nnodes is {}: it counts the machines in the job; use 1 or more",
                    launch.nnodes
                )
            })?;
        let node_rank = usize::try_from(launch.node_rank)
            .ok()
            .filter(|rank| *rank < nnodes)
            .ok_or_else(|| {
                format!(
                    "node_rank is {} but nnodes is {nnodes}: give each machine its own --node_rank from 0 to {}",
                    launch.node_rank,
                    nnodes - 1
                )
            })?;
        let master_port = u16::try_from(launch.master_port)
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| {
                format!(
                    "master_port is {}: use a TCP port from 1 to 65535 (torchrun's default is 29500)",
                    launch.master_port
                )
            })?;
        if !asked && nnodes == 1 {
            return Ok(None);
        }
        Ok(Some(LaunchPlan {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr: launch.master_addr.clone(),
            master_port,
        }))
    }

    /// Every rank of the job, all nodes together.
    pub fn world_size(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    /// Whether this node's launcher hosts the job's store (node 0, as torchrun's agent does).
    pub fn hosts_store(&self) -> bool {
        self.node_rank == 0
    }

    /// The environment of this node's local rank `local_rank`: torchrun's variables, with the
    /// agent store (ours) and restart count 0 ([`RankEnv::launched_by_whet`]), numbered across
    /// nodes as torchrun numbers them (node by node).
    pub fn rank_env(&self, local_rank: usize) -> RankEnv {
        RankEnv {
            rank: self.node_rank * self.nproc_per_node + local_rank,
            world_size: self.world_size(),
            node_rank: Some(self.node_rank),
            ..RankEnv::launched_by_whet(
                local_rank,
                self.nproc_per_node,
                self.master_addr.clone(),
                self.master_port,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(nproc: Option<i64>, nnodes: i64, node_rank: i64, port: i64) -> LaunchConfig {
        LaunchConfig {
            nproc_per_node: nproc,
            nnodes,
            node_rank,
            master_port: port,
            ..LaunchConfig::default()
        }
    }

    #[test]
    fn one_process_is_no_launch() {
        assert_eq!(LaunchPlan::from_config(&LaunchConfig::default()), Ok(None));
        // Naming one process launches one rank (a group of one), as ms-swift's torchrun does.
        let one = LaunchPlan::from_config(&launch(Some(1), 1, 0, 29500))
            .unwrap()
            .unwrap();
        assert_eq!(one.world_size(), 1);
    }

    #[test]
    fn ranks_are_numbered_node_by_node() {
        let plan = LaunchPlan::from_config(&launch(Some(2), 3, 1, 29501))
            .unwrap()
            .unwrap();
        assert_eq!(plan.world_size(), 6);
        assert!(!plan.hosts_store());
        let env = plan.rank_env(1);
        assert_eq!((env.rank, env.local_rank), (3, 1));
        assert_eq!((env.world_size, env.local_world_size), (6, 2));
        assert_eq!(env.node_rank, Some(1));
        assert_eq!(
            (env.master_addr.as_str(), env.master_port),
            ("127.0.0.1", 29501)
        );
        // The ranks read back exactly what the launcher set, agent store and all.
        let vars = env.env_vars();
        let read = RankEnv::from_lookup(|var| {
            vars.iter()
                .find(|(name, _)| *name == var)
                .map(|(_, value)| value.clone())
        })
        .unwrap()
        .unwrap();
        assert_eq!(read, env);
        assert!(read.use_agent_store && !read.hosts_store());

        // Several nodes of one process each are a launch too.
        let plan = LaunchPlan::from_config(&launch(None, 2, 0, 29500))
            .unwrap()
            .unwrap();
        assert_eq!((plan.nproc_per_node, plan.world_size()), (1, 2));
        assert!(plan.hosts_store());
        let single = RankEnv::launched_by_whet(0, 1, "127.0.0.1", 29500);
        assert_eq!(
            plan.rank_env(0),
            RankEnv {
                world_size: 2,
                ..single
            }
        );
    }

    #[test]
    fn errors_name_the_field_and_the_fix() {
        let error = |config| LaunchPlan::from_config(&config).unwrap_err();
        assert!(error(launch(Some(0), 1, 0, 29500)).starts_with("nproc_per_node is 0"));
        assert!(error(launch(Some(2), 0, 0, 29500)).starts_with("nnodes is 0"));
        let message = error(launch(Some(2), 2, 2, 29500));
        assert!(
            message.starts_with("node_rank is 2 but nnodes is 2") && message.contains("0 to 1"),
            "{message}"
        );
        assert!(error(launch(Some(2), 1, 0, 70000)).starts_with("master_port is 70000"));
    }
}
