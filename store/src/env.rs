//! `RankEnv`: what a launcher tells a rank through its environment, and the one way a rank
//! reaches the store from it, whoever launched it.
//!
//! - **torchrun** (its elastic agent): RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
//!   GROUP_RANK, MASTER_ADDR, MASTER_PORT, `TORCHELASTIC_USE_AGENT_STORE=True` (the agent already
//!   serves a TCPStore at MASTER_ADDR:MASTER_PORT) and TORCHELASTIC_RESTART_COUNT.
//! - **`whet sft --nproc_per_node N`** hosts a [`crate::TcpStoreServer`] itself, like the agent,
//!   and gives each rank exactly the variables torchrun would ([`RankEnv::launched_by_whet`],
//!   [`RankEnv::env_vars`]), agent store and restart count 0 included — so a rank cannot tell
//!   the two launchers apart and takes one code path.
//! - **Anything else** that sets the six rendezvous variables without the agent store (torchrun
//!   with `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`, a hand-written script): rank 0 hosts the store
//!   on MASTER_PORT, as torch's `env://` rendezvous does, and every rank connects to it.
//!
//! Every rank keeps its keys under `/worker/attempt_<TORCHELASTIC_RESTART_COUNT>`, torch's
//! layout for ranks of an agent store (older torch releases wrapped the agent's store so in
//! `_create_c10d_store`; torch 2.15's ranks use it bare — whet keeps the prefix, since whet's
//! ranks only meet whet's ranks): the agent's store outlives a failed attempt, and the next
//! attempt must not read the keys the last one left.

use std::time::Duration;

use crate::error::{EnvError, Result};
use crate::{PrefixStore, TcpStore, TcpStoreServer};

/// The variables every rank needs; a process with none of them is not a rank.
const RENDEZVOUS_VARS: [&str; 6] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// Every variable of a rank's launcher that [`RankEnv::from_env`] reads: a process that must
/// not be taken for a rank (a launcher under test, a job's own launcher) clears them.
pub const LAUNCHER_VARS: [&str; 10] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "NODE_RANK",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
];

/// One rank's place in the job, read from its launcher's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// RANK: this process among all of the job's.
    pub rank: usize,
    /// LOCAL_RANK: this process among its node's (its device index).
    pub local_rank: usize,
    /// WORLD_SIZE.
    pub world_size: usize,
    /// LOCAL_WORLD_SIZE: processes on this node.
    pub local_world_size: usize,
    /// GROUP_RANK (torchrun's name), else NODE_RANK: this node among the job's.
    pub node_rank: Option<usize>,
    /// MASTER_ADDR: where the store listens.
    pub master_addr: String,
    /// MASTER_PORT.
    pub master_port: u16,
    /// TORCHELASTIC_USE_AGENT_STORE=True: the launcher serves the store; no rank hosts it.
    pub use_agent_store: bool,
    /// TORCHELASTIC_RESTART_COUNT (0 when unset): which attempt of the job this is.
    pub restart_count: u32,
}

impl RankEnv {
    /// This process's launcher variables: `Ok(None)` when none of the six rendezvous variables
    /// is set (a single-process run), an error naming the variable when one is missing,
    /// malformed or contradicts another.
    pub fn from_env() -> Result<Option<RankEnv>, EnvError> {
        RankEnv::from_lookup(|var| {
            std::env::var_os(var).map(|value| value.to_string_lossy().into_owned())
        })
    }

    /// [`RankEnv::from_env`] over any source of variables (tests, a recorded environment).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<RankEnv>, EnvError> {
        // An empty variable is an unset one, as torch's `env://` rendezvous reads them.
        let get = |var: &str| lookup(var).filter(|value| !value.is_empty());
        let present: Vec<&str> = RENDEZVOUS_VARS
            .iter()
            .copied()
            .filter(|var| get(var).is_some())
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        if let Some(missing) = RENDEZVOUS_VARS.iter().find(|var| get(var).is_none()) {
            return Err(EnvError::Missing {
                var: missing,
                present: present.join(", "),
            });
        }
        let required = |var: &'static str| get(var).unwrap_or_default();

        let rank = parse_count("RANK", &required("RANK"))?;
        let local_rank = parse_count("LOCAL_RANK", &required("LOCAL_RANK"))?;
        let world_size = parse_positive("WORLD_SIZE", &required("WORLD_SIZE"))?;
        let local_world_size = parse_positive("LOCAL_WORLD_SIZE", &required("LOCAL_WORLD_SIZE"))?;
        let master_addr = required("MASTER_ADDR");
        let master_port = parse_port(&required("MASTER_PORT"))?;

        let node_rank = match (get("GROUP_RANK"), get("NODE_RANK")) {
            (Some(value), _) => Some(parse_count("GROUP_RANK", &value)?),
            (None, Some(value)) => Some(parse_count("NODE_RANK", &value)?),
            (None, None) => None,
        };
        let use_agent_store = match get("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
            None | Some("False") => false,
            Some("True") => true,
            Some(other) => {
                return Err(EnvError::Malformed {
                    var: "TORCHELASTIC_USE_AGENT_STORE",
                    value: other.to_string(),
                    expected: "True or False (torchrun writes Python's str(bool))",
                })
            }
        };
        let restart_count = match get("TORCHELASTIC_RESTART_COUNT") {
            None => 0,
            Some(value) => value.parse().map_err(|_| EnvError::Malformed {
                var: "TORCHELASTIC_RESTART_COUNT",
                value: value.clone(),
                expected: "a non-negative integer",
            })?,
        };

        let env = RankEnv {
            rank,
            local_rank,
            world_size,
            local_world_size,
            node_rank,
            master_addr,
            master_port,
            use_agent_store,
            restart_count,
        };
        env.check_consistent()?;
        Ok(Some(env))
    }

    /// The environment `whet sft --nproc_per_node` gives local rank `local_rank` of
    /// `nproc_per_node` on one node, its store at `master_addr:master_port`: torchrun's, agent
    /// store and all.
    pub fn launched_by_whet(
        local_rank: usize,
        nproc_per_node: usize,
        master_addr: impl Into<String>,
        master_port: u16,
    ) -> RankEnv {
        RankEnv {
            rank: local_rank,
            local_rank,
            world_size: nproc_per_node,
            local_world_size: nproc_per_node,
            node_rank: Some(0),
            master_addr: master_addr.into(),
            master_port,
            use_agent_store: true,
            restart_count: 0,
        }
    }

    /// The variables a launcher sets for this rank, named and written as torchrun writes them
    /// ([`RankEnv::from_lookup`] reads them back to an equal `RankEnv`).
    pub fn env_vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ];
        if let Some(node_rank) = self.node_rank {
            vars.push(("GROUP_RANK", node_rank.to_string()));
        }
        let agent = if self.use_agent_store {
            "True"
        } else {
            "False"
        };
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", agent.to_string()));
        vars.push(("TORCHELASTIC_RESTART_COUNT", self.restart_count.to_string()));
        vars
    }

    /// The prefix every rank's keys live under: `/worker/attempt_<restart count>`.
    pub fn store_prefix(&self) -> String {
        format!("/worker/attempt_{}", self.restart_count)
    }

    /// Whether this rank must host the store: rank 0, when no launcher's store serves it.
    pub fn hosts_store(&self) -> bool {
        !self.use_agent_store && self.rank == 0
    }

    /// The rank's store: hosts the server first when [`RankEnv::hosts_store`] (on every
    /// interface at MASTER_PORT), then connects to MASTER_ADDR:MASTER_PORT — waiting up to
    /// `timeout` for the server — under [`RankEnv::store_prefix`].
    pub fn connect_store(&self, timeout: Duration) -> Result<RankStore> {
        let server = if self.hosts_store() {
            Some(TcpStoreServer::bind_all_interfaces(self.master_port)?)
        } else {
            None
        };
        let store = TcpStore::connect(&self.master_addr, self.master_port, timeout)?
            .with_prefix(self.store_prefix());
        Ok(RankStore { store, server })
    }

    fn check_consistent(&self) -> Result<(), EnvError> {
        let below = |a: &str, a_value: usize, b: &str, b_value: usize| {
            if a_value < b_value {
                Ok(())
            } else {
                Err(EnvError::Inconsistent(format!(
                    "{a}={a_value} is not below {b}={b_value}"
                )))
            }
        };
        below("RANK", self.rank, "WORLD_SIZE", self.world_size)?;
        below(
            "LOCAL_RANK",
            self.local_rank,
            "LOCAL_WORLD_SIZE",
            self.local_world_size,
        )?;
        if self.local_world_size > self.world_size {
            return Err(EnvError::Inconsistent(format!(
                "LOCAL_WORLD_SIZE={} is more than WORLD_SIZE={}",
                self.local_world_size, self.world_size
            )));
        }
        Ok(())
    }
}

/// A rank's connection to the job's store, and the server when this rank hosts it (it lives
/// as long as this value: the hosting rank must outlast the others' use of the store).
#[derive(Debug)]
pub struct RankStore {
    // Field order is drop order: the client goes before the server it talks to.
    store: PrefixStore<TcpStore>,
    server: Option<TcpStoreServer>,
}

impl RankStore {
    /// The store under the rank's prefix; pass it on as `&dyn Store`.
    pub fn store(&self) -> &PrefixStore<TcpStore> {
        &self.store
    }

    /// The server, when this rank hosts it.
    pub fn server(&self) -> Option<&TcpStoreServer> {
        self.server.as_ref()
    }
}

fn parse_count(var: &'static str, value: &str) -> Result<usize, EnvError> {
    value.parse().map_err(|_| EnvError::Malformed {
        var,
        value: value.to_string(),
        expected: "a non-negative integer",
    })
}

fn parse_positive(var: &'static str, value: &str) -> Result<usize, EnvError> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(EnvError::Malformed {
            var,
            value: value.to_string(),
            expected: "a positive integer",
        }),
    }
}

fn parse_port(value: &str) -> Result<u16, EnvError> {
    match value.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(EnvError::Malformed {
            var: "MASTER_PORT",
            value: value.to_string(),
            expected: "a port number from 1 to 65535",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<RankEnv>, EnvError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankEnv::from_lookup(|var| vars.get(var).cloned())
    }

    /// What torchrun's agent gave rank 3 of 4 on the second node after one restart.
    const TORCHRUN: [(&str, &str); 9] = [
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "1"),
    ];

    #[test]
    fn reads_torchrun_environment() {
        let env = read(&TORCHRUN).unwrap().unwrap();
        assert_eq!(
            env,
            RankEnv {
                rank: 3,
                local_rank: 1,
                world_size: 4,
                local_world_size: 2,
                node_rank: Some(1),
                master_addr: "node0".into(),
                master_port: 29500,
                use_agent_store: true,
                restart_count: 1,
            }
        );
        assert_eq!(env.store_prefix(), "/worker/attempt_1");
        assert!(!env.hosts_store());
    }

    #[test]
    fn no_launcher_variables_is_a_single_process() {
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(read(&[("RANK", "")]).unwrap(), None);
        // Unrelated variables do not make a rank.
        assert_eq!(read(&[("NODE_RANK", "0")]).unwrap(), None);
    }

    #[test]
    fn without_agent_store_rank_zero_hosts() {
        let mut vars: Vec<(&str, &str)> = TORCHRUN
            .iter()
            .copied()
            .filter(|(name, _)| RENDEZVOUS_VARS.contains(name))
            .collect();
        vars[0] = ("RANK", "0");
        vars[1] = ("LOCAL_RANK", "0");
        let env = read(&vars).unwrap().unwrap();
        assert!(!env.use_agent_store);
        assert!(env.hosts_store());
        assert_eq!(env.restart_count, 0);
        assert_eq!(env.store_prefix(), "/worker/attempt_0");
    }

    #[test]
    fn whets_launcher_sets_what_torchrun_sets() {
        let launched = RankEnv::launched_by_whet(1, 4, "127.0.0.1", 41234);
        let vars = launched.env_vars();
        let names: Vec<&str> = vars.iter().map(|(name, _)| *name).collect();
        let torchrun_names: Vec<&str> = TORCHRUN.iter().map(|(name, _)| *name).collect();
        assert_eq!(names.len(), torchrun_names.len());
        assert!(torchrun_names.iter().all(|name| names.contains(name)));

        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let read_back = read(&pairs).unwrap().unwrap();
        assert_eq!(read_back, launched);
        assert!(read_back.use_agent_store && !read_back.hosts_store());
        assert_eq!(read_back.store_prefix(), "/worker/attempt_0");
    }

    #[test]
    fn errors_name_the_variable() {
        let with = |var: &'static str, value: &'static str| {
            let mut vars = TORCHRUN.to_vec();
            vars.retain(|(name, _)| *name != var);
            if !value.is_empty() {
                vars.push((var, value));
            }
            read(&vars).unwrap_err().to_string()
        };
        let missing = with("MASTER_PORT", "");
        assert!(
            missing.starts_with("MASTER_PORT is not set but RANK"),
            "{missing}"
        );
        let cases = [
            (
                "RANK",
                "three",
                "RANK=\"three\" is not a non-negative integer",
            ),
            (
                "WORLD_SIZE",
                "0",
                "WORLD_SIZE=\"0\" is not a positive integer",
            ),
            (
                "MASTER_PORT",
                "70000",
                "MASTER_PORT=\"70000\" is not a port number",
            ),
            ("MASTER_PORT", "0", "MASTER_PORT=\"0\" is not a port number"),
            (
                "GROUP_RANK",
                "-1",
                "GROUP_RANK=\"-1\" is not a non-negative integer",
            ),
            (
                "TORCHELASTIC_USE_AGENT_STORE",
                "1",
                "TORCHELASTIC_USE_AGENT_STORE=\"1\" is not True or False",
            ),
            (
                "TORCHELASTIC_RESTART_COUNT",
                "x",
                "TORCHELASTIC_RESTART_COUNT=\"x\" is not a non-negative integer",
            ),
            ("RANK", "4", "RANK=4 is not below WORLD_SIZE=4"),
            (
                "LOCAL_RANK",
                "2",
                "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2",
            ),
            (
                "LOCAL_WORLD_SIZE",
                "8",
                "LOCAL_WORLD_SIZE=8 is more than WORLD_SIZE=4",
            ),
        ];
        for (var, value, expected) in cases {
            let message = with(var, value);
            assert!(message.starts_with(expected), "{var}={value}: {message}");
        }
    }
}
