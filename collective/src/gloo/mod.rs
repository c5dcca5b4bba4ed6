//! [`GlooCollective`]: the CPU implementation, gloo's tcp transport and algorithms through the
//! cxx bridge in `ffi.rs` / `bridge.cc`. This module owns the choices torch's
//! `ProcessGroupGloo` makes around gloo: where the rendezvous keys live (a prefix per group),
//! which address to listen on (`GLOO_SOCKET_IFNAME`, else the host name, else loopback),
//! reduce-scatter as an all-reduce whose shard is kept, and one tag per operation.

mod ffi;

use std::fmt;
use std::net::{TcpListener, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use whet_store::{PrefixStore, Store};

use self::ffi::{bridge, Failure, FailureKind, RendezvousStore};
use crate::{shard_range, Collective, CollectiveError, DType, Element, Result};

/// The variable torch reads for the network interface gloo listens on (`eth0`, `ib0`, ...).
pub const GLOO_SOCKET_IFNAME: &str = "GLOO_SOCKET_IFNAME";

/// torch's fallback when the host name does not resolve to a local address.
const LOOPBACK: &str = "127.0.0.1";

/// Where a rank's gloo device listens for its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// The first address of a network interface, by name.
    Interface(String),
    /// The address a host name (or a literal address) resolves to.
    Hostname(String),
}

impl Transport {
    /// As torch chooses: the interface `GLOO_SOCKET_IFNAME` names; else this host's name when
    /// it resolves to an address this process can bind; else the loopback address (a
    /// single-machine job).
    pub fn from_env() -> Result<Transport> {
        match std::env::var(GLOO_SOCKET_IFNAME) {
            Ok(value) if !value.trim().is_empty() => Transport::for_interfaces(&value),
            _ => Ok(Transport::default_for_host()),
        }
    }

    /// `GLOO_SOCKET_IFNAME`'s value. torch makes one device per name of a comma-separated
    /// list; whet uses one, so a list is refused rather than cut short.
    fn for_interfaces(value: &str) -> Result<Transport> {
        let names: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .collect();
        match names.as_slice() {
            [name] => Ok(Transport::Interface(name.to_string())),
            _ => Err(CollectiveError::Environment {
                variable: GLOO_SOCKET_IFNAME,
                value: value.to_string(),
                why: "whet's gloo ranks use one network interface; name one (for example \
                      GLOO_SOCKET_IFNAME=eth0)"
                    .to_string(),
            }),
        }
    }

    fn default_for_host() -> Transport {
        match bridge::local_hostname() {
            Ok(host) if resolves_to_local_address(&host) => Transport::Hostname(host),
            _ => Transport::Hostname(LOOPBACK.to_string()),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Interface(name) => write!(f, "interface {name} ({GLOO_SOCKET_IFNAME})"),
            Transport::Hostname(host) => write!(f, "the address of {host}"),
        }
    }
}

/// Whether `host` resolves to an address a socket here can bind (torch's
/// `doesHostnameResolveToUsableAddress`): not so for a name /etc/hosts maps elsewhere.
fn resolves_to_local_address(host: &str) -> bool {
    (host, 0)
        .to_socket_addrs()
        .map(|mut addrs| addrs.any(|addr| TcpListener::bind(addr).is_ok()))
        .unwrap_or(false)
}

/// How a [`GlooCollective`] is made.
#[derive(Debug, Clone)]
pub struct GlooOptions {
    /// How long any wait lasts: for each other rank's address at the rendezvous, for the
    /// connections, and for a peer's data in each operation.
    pub timeout: Duration,
    pub transport: Transport,
    /// The group's name: its rendezvous keys are `gloo/<group>/...` in the store. Every
    /// communicator made over the same store needs its own name, the same on every rank (torch
    /// names its groups 0, 1, 2, ... in the order they are made).
    pub group: String,
}

impl GlooOptions {
    /// Group "0", the transport [`Transport::from_env`] picks.
    pub fn from_env(timeout: Duration) -> Result<GlooOptions> {
        Ok(GlooOptions {
            timeout,
            transport: Transport::from_env()?,
            group: "0".to_string(),
        })
    }
}

/// The CPU [`Collective`]: one gloo context, connected to every other rank over tcp. Buffers
/// are host slices. `Send + Sync`; see the crate documentation for ordering and failures.
pub struct GlooCollective {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
}

struct State {
    comm: cxx::UniquePtr<bridge::Communicator>,
    /// Each operation's own tag (gloo's slot), the same sequence on every rank.
    next_tag: u32,
    /// Why an earlier operation failed; every later one is refused.
    broken: Option<String>,
}

impl GlooCollective {
    /// Meets the other `world_size - 1` ranks through `store` with [`GlooOptions::from_env`]:
    /// group "0", the transport torch would pick, `timeout` for every wait.
    pub fn new(
        store: &dyn Store,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<GlooCollective> {
        GlooCollective::with_options(store, rank, world_size, &GlooOptions::from_env(timeout)?)
    }

    /// Meets the other ranks through `store` (under `gloo/<group>`): each rank puts its tcp
    /// address there and connects to every other (gloo's `connectFullMesh`). The store is not
    /// used afterwards.
    pub fn with_options(
        store: &dyn Store,
        rank: usize,
        world_size: usize,
        options: &GlooOptions,
    ) -> Result<GlooCollective> {
        if rank >= world_size || i32::try_from(world_size).is_err() {
            return Err(CollectiveError::InvalidRank { rank, world_size });
        }
        let prefixed = PrefixStore::new(format!("gloo/{}", options.group), store);
        let rendezvous = RendezvousStore::new(&prefixed, options.timeout);
        let (iface, hostname) = match &options.transport {
            Transport::Interface(name) => (name.as_str(), ""),
            Transport::Hostname(host) => ("", host.as_str()),
        };
        let connected = bridge::connect(
            &rendezvous,
            rank as i32,
            world_size as i32,
            iface,
            hostname,
            millis(options.timeout),
        );
        let comm = connected.map_err(|err| {
            if let Some(source) = rendezvous.take_error() {
                return CollectiveError::Rendezvous {
                    rank,
                    world_size,
                    source,
                };
            }
            let failure = Failure::from_exception(&err);
            match failure.kind {
                FailureKind::Timeout => CollectiveError::Timeout {
                    op: "rendezvous",
                    rank,
                    world_size,
                    timeout: options.timeout,
                    message: failure.message,
                },
                _ => CollectiveError::Connect {
                    rank,
                    world_size,
                    transport: options.transport.to_string(),
                    message: failure.message,
                },
            }
        })?;
        Ok(GlooCollective {
            rank,
            world_size,
            timeout: options.timeout,
            state: Mutex::new(State {
                comm,
                next_tag: 0,
                broken: None,
            }),
        })
    }

    /// The timeout every wait of every operation has.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one operation on the context with the next tag; a failure breaks the communicator.
    fn run(
        &self,
        op: &'static str,
        call: impl FnOnce(&bridge::Communicator, u32, u64) -> std::result::Result<(), cxx::Exception>,
    ) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &state.broken {
            return Err(CollectiveError::Broken {
                op,
                rank: self.rank,
                why: why.clone(),
            });
        }
        let tag = state.next_tag;
        state.next_tag = tag.wrapping_add(1);
        let comm = state
            .comm
            .as_ref()
            .expect("connect returns a communicator or an error");
        let Err(err) = call(comm, tag, millis(self.timeout)) else {
            return Ok(());
        };
        let failure = Failure::from_exception(&err);
        state.broken = Some(format!("{op}: {}", failure.message));
        Err(match failure.kind {
            FailureKind::Timeout => CollectiveError::Timeout {
                op,
                rank: self.rank,
                world_size: self.world_size,
                timeout: self.timeout,
                message: failure.message,
            },
            _ => CollectiveError::Failed {
                op,
                rank: self.rank,
                world_size: self.world_size,
                message: failure.message,
            },
        })
    }

    fn check_len(
        &self,
        op: &'static str,
        what: &'static str,
        expected: usize,
        actual: usize,
    ) -> Result<()> {
        if expected == actual {
            Ok(())
        } else {
            Err(CollectiveError::Length {
                op,
                what,
                rank: self.rank,
                expected,
                actual,
            })
        }
    }

    /// Every rank's shard length of a buffer of `len`, as allgatherv's counts.
    fn shard_counts(&self, len: usize) -> Vec<u64> {
        (0..self.world_size)
            .map(|rank| shard_range(len, self.world_size, rank).len() as u64)
            .collect()
    }
}

impl Collective for GlooCollective {
    type Buffer<T: Element> = [T];

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.check_len("all_reduce", "the receive buffer", send.len(), recv.len())?;
        if send.is_empty() {
            return Ok(());
        }
        self.run("all_reduce", |comm, tag, timeout_ms| {
            bridge::all_reduce(
                comm,
                dtype::<T>(),
                bytes(send),
                bytes_mut(recv),
                tag,
                timeout_ms,
            )
        })
    }

    fn all_reduce_in_place<T: Element>(&self, buffer: &mut [T]) -> Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        self.run("all_reduce", |comm, tag, timeout_ms| {
            bridge::all_reduce_in_place(comm, dtype::<T>(), bytes_mut(buffer), tag, timeout_ms)
        })
    }

    /// As torch's `ProcessGroupGloo::reduce_scatter_tensor_coalesced`: gloo's all-reduce into
    /// a scratch buffer, then this rank's shard of it (gloo's own reduce-scatter is an old-style
    /// algorithm class without per-operation timeouts).
    fn reduce_scatter<T: Element>(&self, send: &[T], shard: &mut [T]) -> Result<()> {
        let range = self.shard(send.len());
        self.check_len("reduce_scatter", "the shard", range.len(), shard.len())?;
        let mut sum = send.to_vec();
        self.all_reduce_in_place(&mut sum)?;
        shard.copy_from_slice(&sum[range]);
        Ok(())
    }

    /// gloo's all-reduce in place: the whole of `buffer` holds the sum afterwards.
    fn reduce_scatter_in_place<T: Element>(&self, buffer: &mut [T]) -> Result<()> {
        self.all_reduce_in_place(buffer)
    }

    fn all_gather<T: Element>(&self, shard: &[T], recv: &mut [T]) -> Result<()> {
        let range: Range<usize> = self.shard(recv.len());
        self.check_len("all_gather", "the shard", range.len(), shard.len())?;
        if recv.is_empty() {
            return Ok(());
        }
        let counts = self.shard_counts(recv.len());
        self.run("all_gather", |comm, tag, timeout_ms| {
            bridge::all_gather(
                comm,
                dtype::<T>(),
                bytes(shard),
                bytes_mut(recv),
                &counts,
                tag,
                timeout_ms,
            )
        })
    }

    fn all_gather_in_place<T: Element>(&self, buffer: &mut [T]) -> Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        let counts = self.shard_counts(buffer.len());
        self.run("all_gather", |comm, tag, timeout_ms| {
            bridge::all_gather_in_place(
                comm,
                dtype::<T>(),
                bytes_mut(buffer),
                &counts,
                tag,
                timeout_ms,
            )
        })
    }

    fn broadcast<T: Element>(&self, buffer: &mut [T], root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidRoot {
                op: "broadcast",
                root,
                world_size: self.world_size,
            });
        }
        if buffer.is_empty() {
            return Ok(());
        }
        self.run("broadcast", |comm, tag, timeout_ms| {
            bridge::broadcast(
                comm,
                dtype::<T>(),
                bytes_mut(buffer),
                root as i32,
                tag,
                timeout_ms,
            )
        })
    }

    fn barrier(&self) -> Result<()> {
        self.run("barrier", |comm, tag, timeout_ms| {
            bridge::barrier(comm, tag, timeout_ms)
        })
    }
}

fn millis(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn dtype<T: Element>() -> bridge::DType {
    match T::DTYPE {
        DType::F32 => bridge::DType::F32,
        DType::F64 => bridge::DType::F64,
        DType::BF16 => bridge::DType::BF16,
    }
}

fn bytes<T: Element>(elements: &[T]) -> &[u8] {
    // SAFETY: `Element` is sealed to f32, f64 and bf16: no padding, no invalid bit patterns,
    // alignment at least that of u8; the bytes borrow the elements for as long.
    unsafe { std::slice::from_raw_parts(elements.as_ptr().cast(), size_of_val(elements)) }
}

fn bytes_mut<T: Element>(elements: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes`; any bytes gloo writes form valid f32/f64/bf16 values.
    unsafe { std::slice::from_raw_parts_mut(elements.as_mut_ptr().cast(), size_of_val(elements)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_communicator_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GlooCollective>();
    }

    #[test]
    fn one_interface_is_taken_and_a_list_refused_with_the_fix() {
        assert_eq!(
            Transport::for_interfaces(" eth0 ").unwrap(),
            Transport::Interface("eth0".into())
        );
        let err = Transport::for_interfaces("eth0,eth1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("GLOO_SOCKET_IFNAME=\"eth0,eth1\""), "{err}");
        assert!(err.contains("name one"), "{err}");
    }

    #[test]
    fn the_default_transport_is_a_local_address() {
        let Transport::Hostname(host) = Transport::default_for_host() else {
            panic!("the default is a host name");
        };
        assert!(resolves_to_local_address(&host), "{host}");
        assert!(!resolves_to_local_address("192.0.2.255.invalid"));
    }
}
