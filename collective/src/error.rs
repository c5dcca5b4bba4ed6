//! The crate's one error type: bad arguments (found before anything is sent; the communicator
//! stays usable), a rendezvous that failed, and an operation that failed or timed out (after
//! which the communicator refuses further work, as NCCL's and torch's do).

use std::time::Duration;

use whet_store::StoreError;

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank} is out of range for a world of {world_size} ranks")]
    InvalidRank { rank: usize, world_size: usize },

    #[error("{op}: {what} has {actual} elements on rank {rank}, where {expected} were expected")]
    Length {
        op: &'static str,
        what: &'static str,
        rank: usize,
        expected: usize,
        actual: usize,
    },

    #[error("{op} from root {root}: there are only {world_size} ranks")]
    InvalidRoot {
        op: &'static str,
        root: usize,
        world_size: usize,
    },

    /// A launcher variable that cannot be used as it is.
    #[error("{variable}={value:?}: {why}")]
    Environment {
        variable: &'static str,
        value: String,
        why: String,
    },

    /// The store failed while the ranks exchanged addresses: a rank that never arrived shows
    /// as a [`StoreError::Timeout`] naming the key it would have set (`.../<its rank>`).
    #[error(
        "rank {rank} of {world_size} could not meet the other ranks through the store: {source}"
    )]
    Rendezvous {
        rank: usize,
        world_size: usize,
        #[source]
        source: StoreError,
    },

    /// The addresses were exchanged but gloo could not connect to a peer (or make its device).
    #[error("rank {rank} of {world_size} could not connect over {transport}: {message}")]
    Connect {
        rank: usize,
        world_size: usize,
        transport: String,
        message: String,
    },

    /// An operation (or the rendezvous's connections) ran past the timeout: some rank did not
    /// take part — it failed, is slow, or runs another operation.
    #[error(
        "{op} on rank {rank} of {world_size} timed out after {timeout:?} (a rank did not take \
         part: it failed, is slower than the timeout, or runs a different operation): {message}"
    )]
    Timeout {
        op: &'static str,
        rank: usize,
        world_size: usize,
        timeout: Duration,
        message: String,
    },

    /// The library failed the operation (a peer closed its connection, ...).
    #[error("{op} on rank {rank} of {world_size} failed: {message}")]
    Failed {
        op: &'static str,
        rank: usize,
        world_size: usize,
        message: String,
    },

    /// An earlier operation failed; the ranks are out of step and must all start over.
    #[error(
        "{op} on rank {rank}: the communicator is unusable after an earlier failure ({why}); \
         every rank has to make a new one"
    )]
    Broken {
        op: &'static str,
        rank: usize,
        why: String,
    },
}

impl CollectiveError {
    /// Whether waiting for another rank ran out of time (at the rendezvous or in an operation).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            CollectiveError::Timeout { .. }
                | CollectiveError::Rendezvous {
                    source: StoreError::Timeout { .. },
                    ..
                }
        )
    }
}
