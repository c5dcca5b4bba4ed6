//! The crate's errors: what went wrong talking to or hosting a store, and what was wrong with a
//! launcher's environment. Each message names the address, key, port or variable involved.

use std::io;
use std::time::Duration;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Nothing answered as a TCPStore at the address before the connect timeout.
    #[error(
        "no TCPStore answered at {addr} within {timeout:?} (last attempt: {last_error}); \
         check MASTER_ADDR/MASTER_PORT and that the store's host (rank 0, torchrun's agent or \
         `whet sft --nproc_per_node`) is running"
    )]
    Connect {
        addr: String,
        timeout: Duration,
        last_error: String,
    },

    /// Something listens at the address but does not speak the TCPStore protocol.
    #[error("{addr} is not a c10d TCPStore: {why}")]
    NotAStore { addr: String, why: String },

    /// `wait`, or the wait inside `get`/`multi_get`, ran out of time.
    #[error("timed out after {timeout:?} waiting for {keys:?} in the TCPStore at {addr}")]
    Timeout {
        addr: String,
        keys: Vec<String>,
        timeout: Duration,
    },

    /// Reading or writing the connection failed (the server went away, or did not reply in
    /// time); the connection is unusable afterwards.
    #[error("TCPStore at {addr}: {op} failed: {source}")]
    Io {
        addr: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// An earlier failure left the connection out of step with the server.
    #[error(
        "the connection to the TCPStore at {addr} is unusable after an earlier failure ({why}); \
         connect again"
    )]
    Broken { addr: String, why: String },

    /// The server answered something the protocol does not allow.
    #[error("TCPStore at {addr}: unexpected answer to {op}: {why}")]
    Protocol {
        addr: String,
        op: &'static str,
        why: String,
    },

    /// A key longer than torch's server accepts (it would close the connection).
    #[error(
        "the TCPStore key {key:?}… is {len} bytes; torch's TCPStore server accepts at most {max}"
    )]
    KeyTooLong { key: String, len: usize, max: usize },

    /// A value larger than torch's server accepts (it would close the connection).
    #[error("the value for TCPStore key {key:?} is {len} bytes; torch's TCPStore server accepts at most {max}")]
    ValueTooLarge { key: String, len: usize, max: usize },

    /// More keys in one query than torch's server accepts.
    #[error("{count} keys in one TCPStore {op}; torch's TCPStore server accepts at most {max}")]
    TooManyKeys {
        op: &'static str,
        count: usize,
        max: usize,
    },

    /// The port to host the store on is in use; `free_port` was free when the error was made.
    #[error("{}", port_taken_message(host, *port, *free_port))]
    PortTaken {
        host: String,
        port: u16,
        free_port: Option<u16>,
    },

    /// Any other failure to listen.
    #[error("cannot host a TCPStore on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
}

fn port_taken_message(host: &str, port: u16, free_port: Option<u16>) -> String {
    let fix = match free_port {
        Some(free) => format!("use --master_port {free} (free now)"),
        None => "pick another --master_port".to_string(),
    };
    format!("--master_port {port} is taken on {host} (address already in use); {fix}")
}

/// A launcher variable (`RANK`, `MASTER_PORT`, ...) that is missing, malformed or contradicts
/// another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error(
        "{var} is not set but {present} is: a rank needs RANK, LOCAL_RANK, WORLD_SIZE, \
         LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun and `whet sft --nproc_per_node` \
         set them all)"
    )]
    Missing { var: &'static str, present: String },

    #[error("{var}={value:?} is not {expected}")]
    Malformed {
        var: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("{0}")]
    Inconsistent(String),
}
