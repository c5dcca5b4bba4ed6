//! The cxx bridge to `bridge.cc`: gloo's rendezvous calls back into Rust for the store
//! ([`RendezvousStore`]), and Rust calls gloo's collectives on a connected [`bridge::Communicator`].
//! Buffers cross as bytes with their [`bridge::DType`]; every C++ exception comes back as a
//! `cxx::Exception` whose message starts with the kind `bridge.h` caught (see [`Failure`]).

use std::sync::Mutex;
use std::time::Duration;

use whet_store::{Store, StoreError};

#[cxx::bridge(namespace = "whet_gloo")]
pub(crate) mod bridge {
    /// Element types the bridge reduces (each with its own gloo reduction function).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum DType {
        F32,
        F64,
        BF16,
    }

    extern "Rust" {
        type RendezvousStore<'a>;

        fn store_set(store: &RendezvousStore, key: &str, value: &[u8]) -> Result<()>;
        fn store_get(store: &RendezvousStore, key: &str) -> Result<Vec<u8>>;
        // The signature cxx gives C++'s `const rust::Vec<rust::String>&`.
        #[allow(clippy::ptr_arg)]
        fn store_wait(store: &RendezvousStore, keys: &Vec<String>, timeout_ms: u64) -> Result<()>;
    }

    unsafe extern "C++" {
        include!("whet-collective/src/gloo/bridge.h");

        /// A connected `gloo::rendezvous::Context`.
        type Communicator;

        /// This host's name, as gloo's rendezvous reads it (`gethostname`).
        fn local_hostname() -> Result<String>;

        /// A tcp device on `iface` (when not empty) or the address `hostname` resolves to, and
        /// a context of `size` ranks connected through `store` (`connectFullMesh`).
        fn connect(
            store: &RendezvousStore,
            rank: i32,
            size: i32,
            iface: &str,
            hostname: &str,
            timeout_ms: u64,
        ) -> Result<UniquePtr<Communicator>>;

        fn all_reduce_in_place(
            comm: &Communicator,
            dtype: DType,
            buffer: &mut [u8],
            tag: u32,
            timeout_ms: u64,
        ) -> Result<()>;

        fn all_reduce(
            comm: &Communicator,
            dtype: DType,
            input: &[u8],
            output: &mut [u8],
            tag: u32,
            timeout_ms: u64,
        ) -> Result<()>;

        /// `counts[r]` elements of rank `r` laid end to end in `output`; `input` (when not
        /// in place) is this rank's.
        fn all_gather_in_place(
            comm: &Communicator,
            dtype: DType,
            output: &mut [u8],
            counts: &[u64],
            tag: u32,
            timeout_ms: u64,
        ) -> Result<()>;

        fn all_gather(
            comm: &Communicator,
            dtype: DType,
            input: &[u8],
            output: &mut [u8],
            counts: &[u64],
            tag: u32,
            timeout_ms: u64,
        ) -> Result<()>;

        fn broadcast(
            comm: &Communicator,
            dtype: DType,
            buffer: &mut [u8],
            root: i32,
            tag: u32,
            timeout_ms: u64,
        ) -> Result<()>;

        fn barrier(comm: &Communicator, tag: u32, timeout_ms: u64) -> Result<()>;
    }
}

// SAFETY: a gloo context may be used from any thread (torch runs its ops on worker threads);
// `GlooCollective` keeps it behind a mutex, so one thread at a time does.
unsafe impl Send for bridge::Communicator {}

/// The whet store gloo's rendezvous talks to, during `connect` only. Keeps the first store
/// error so the caller gets it typed rather than as the text of a C++ exception.
pub(crate) struct RendezvousStore<'a> {
    store: &'a dyn Store,
    timeout: Duration,
    error: Mutex<Option<StoreError>>,
}

impl<'a> RendezvousStore<'a> {
    pub(crate) fn new(store: &'a dyn Store, timeout: Duration) -> Self {
        RendezvousStore {
            store,
            timeout,
            error: Mutex::new(None),
        }
    }

    /// The first store error of the rendezvous, if any.
    pub(crate) fn take_error(&self) -> Option<StoreError> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Keeps the first error for [`RendezvousStore::take_error`] and gives cxx its message,
    /// which becomes the `rust::Error` gloo's rendezvous sees thrown.
    fn keep<T>(&self, result: Result<T, StoreError>) -> Result<T, String> {
        result.map_err(|err| {
            let message = err.to_string();
            let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(err);
            message
        })
    }
}

fn store_set(store: &RendezvousStore, key: &str, value: &[u8]) -> Result<(), String> {
    store.keep(store.store.set(key, value))
}

/// gloo's `get` has no timeout of its own and expects the key to come: wait for it up to the
/// communicator's timeout (not the store's, which may be far longer), then read it.
fn store_get(store: &RendezvousStore, key: &str) -> Result<Vec<u8>, String> {
    store.keep(
        store
            .store
            .wait(&[key], store.timeout)
            .and_then(|()| store.store.get(key)),
    )
}

// The signature cxx gives C++'s `const rust::Vec<rust::String>&`.
#[allow(clippy::ptr_arg)]
fn store_wait(store: &RendezvousStore, keys: &Vec<String>, timeout_ms: u64) -> Result<(), String> {
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.keep(store.store.wait(&keys, Duration::from_millis(timeout_ms)))
}

/// What `bridge.h`'s exception handler caught, from the prefix it put before the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// `gloo::IoException` whose message says it timed out.
    Timeout,
    /// Any other `gloo::IoException`: a peer went away, a connection broke.
    Io,
    /// A callback into the Rust store failed.
    Store,
    /// gloo refused its arguments (`GLOO_ENFORCE`), or another exception.
    Other,
}

pub(crate) struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub(crate) fn from_exception(err: &cxx::Exception) -> Failure {
        let what = err.what();
        let (kind, message) = match what.split_once(": ") {
            Some(("gloo-io", rest)) if rest.contains("Timed out") => (FailureKind::Timeout, rest),
            Some(("gloo-io", rest)) => (FailureKind::Io, rest),
            Some(("store", rest)) => (FailureKind::Store, rest),
            Some(("gloo" | "gloo-enforce" | "c++", rest)) => (FailureKind::Other, rest),
            _ => (FailureKind::Other, what),
        };
        Failure {
            kind,
            message: message.trim().to_string(),
        }
    }
}
