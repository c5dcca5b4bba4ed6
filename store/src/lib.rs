//! whet-store: a client ([`TcpStore`]) and a server ([`TcpStoreServer`]) of PyTorch's c10d
//! TCPStore, the key-value store through which a job's ranks meet — torchrun's agent serves one
//! at MASTER_ADDR:MASTER_PORT, `whet sft --nproc_per_node` serves ours. Later code (gloo's
//! rendezvous store, the NCCL unique id, barriers) takes a `&dyn` [`Store`]; [`RankEnv`] reads
//! the launcher's variables and connects a rank the same way whoever launched it.
//!
//! # The protocol
//!
//! Checked against torch 2.15.0 (git `d0f2af8b`: `TCPStore.cpp`, `store/TCPStoreBackend.hpp`,
//! `store/TCPStoreBackend.cpp`, `store/TCPStoreLibUvBackend.cpp`, `PrefixStore.cpp`), against
//! the bytes its Python client sends, and by the tests in `tests/torch.rs`.
//!
//! One TCP connection per client; requests and replies are in order, one at a time. Integers are
//! little-endian; a *string* or *bytes* is a `u64` length and that many bytes. A request is a
//! query-type byte and its arguments:
//!
//! | byte | query | arguments | reply |
//! |---|---|---|---|
//! | 0 | VALIDATE | `u32` 0x3C85F7CE | none — must be the connection's first query |
//! | 1 | SET | key, value | none |
//! | 2 | COMPARE_SET | key, expected, desired | bytes: the value afterwards (see [`Store::compare_set`]) |
//! | 3 | GET | key | bytes (empty when missing; clients WAIT first) |
//! | 4 | ADD | key, `i64` | `i64` total; the value is kept as decimal text |
//! | 5 | CHECK | `u64` n, n keys | `u8`: 0 READY, 1 NOT_READY |
//! | 6 | WAIT | `u64` n, n keys | `u8` 0 STOP_WAITING once all are set (possibly much later) |
//! | 7 | GETNUMKEYS | — | `i64` |
//! | 8 | DELETE_KEY | key | `i64` keys deleted (0 or 1) |
//! | 9 | APPEND | key, bytes | none |
//! | 10 | MULTI_GET | `u64` n, n keys | n × bytes |
//! | 11 | MULTI_SET | `u64` n, n × (key, value) | none |
//! | 12 | CANCEL_WAIT | — | `u8` 1 WAIT_CANCELED (after a STOP_WAITING if the keys just came) |
//! | 13 | PING | `u32` nonce | `u32` the nonce |
//! | 14 | QUEUE_PUSH | key, bytes | none |
//! | 15 | QUEUE_POP | key | `i64` queue length, then bytes if it was not 0 |
//! | 16 | QUEUE_LEN | key | `i64` |
//! | 17 | LIST_KEYS | — | `i64` n, n strings |
//! | 18 | BARRIER | key, `i64` world size | `u8` 0 STOP_WAITING when the count reaches it |
//!
//! What torch's client does around the bytes, and ours too:
//! - On connect: VALIDATE, then PING with the process id, retried with backoff until the timeout
//!   while nothing answers.
//! - Every key a caller names goes out as `/` + key (`TCPStore::keyPrefix_`), so Python's
//!   `store.set("k")` and our `set("k")` meet at `/k`. [`PrefixStore`] joins `prefix + "/" + key`
//!   before that: `/worker/attempt_0` + `k` travels as `//worker/attempt_0/k`.
//! - `get` and `multi_get` are a WAIT (up to the store timeout) and then the GET. A WAIT that
//!   times out is withdrawn with CANCEL_WAIT and its acknowledgement read, so the connection
//!   stays usable; if STOP_WAITING came first the keys arrived and ours returns Ok where torch
//!   still reports a timeout.
//! - Limits of torch's default (libuv) server, which closes a connection past them and which our
//!   client checks before sending: keys 8 KiB, values 8 MiB, 128 Ki keys per query.
//!
//! Our server answers all nineteen queries as the libuv server does, except that a WAIT is woken
//! only once its keys exist (libuv's COMPARE_SET wakes waiters even when it stored nothing, and
//! they then GET an empty value) and QUEUE_PUSH takes the waiter it wakes off the key's list
//! (libuv leaves it there). A non-numeric value under ADD or BARRIER closes the connection, as
//! torch's `std::stoll` exception does. torch's legacy (non-libuv) server differs from libuv in
//! ways we do not copy: GET of a missing key closes the connection, and it has no queue queries.
//!
//! Under torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`) the agent hosts the store and every rank
//! is a client. Older torch releases put each rank's keys under `/worker/attempt_<restart
//! count>`; torch 2.15's `_create_c10d_store` returns the bare client (its comment: a new client
//! per restart). whet's ranks keep that prefix ([`RankEnv::store_prefix`]) so an attempt never
//! reads a failed attempt's keys; `tests/torch.rs` checks the layout against torch's own
//! `PrefixStore`.
//!
//! torch's client with a `world_size` also ADDs 1 to the unprefixed key `init/` on connect, and
//! its server waits for that count; ours does not (the agent and our launcher don't wait so).

mod client;
mod env;
mod error;
mod prefix;
mod server;
mod wire;

use std::sync::Arc;
use std::time::Duration;

pub use client::TcpStore;
pub use env::{RankEnv, RankStore, LAUNCHER_VARS};
pub use error::{EnvError, Result, StoreError};
pub use prefix::PrefixStore;
pub use server::TcpStoreServer;
pub use wire::{MAX_KEY_COUNT, MAX_KEY_LEN, MAX_VALUE_LEN};

/// A c10d store: what the collectives' rendezvous needs, as torch's `c10d::Store` offers it.
/// Implemented by [`TcpStore`] and [`PrefixStore`]; object-safe, so code takes `&dyn Store`.
pub trait Store: Send + Sync {
    /// Stores `value` under `key`, replacing any value, and wakes whoever waits for it.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;

    /// The value under `key`, waiting up to [`Store::timeout`] for it to be set.
    fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// Adds `delta` to the integer under `key` (0 when missing) and returns the sum.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;

    /// Sets `key` to `desired` if its value is `expected` (a missing key matches an empty
    /// `expected`), and returns the value afterwards — for a missing key with a non-empty
    /// `expected`, `expected` itself, as torch answers.
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>>;

    /// Whether every key is set, without waiting.
    fn check(&self, keys: &[&str]) -> Result<bool>;

    /// Blocks until every key is set, or [`StoreError::Timeout`] after `timeout`.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()>;

    /// Deletes `key`; whether it was there.
    fn delete_key(&self, key: &str) -> Result<bool>;

    /// How many keys the server holds, all prefixes together.
    fn num_keys(&self) -> Result<i64>;

    /// Appends `value` to the bytes under `key` (creating it).
    fn append(&self, key: &str, value: &[u8]) -> Result<()>;

    /// The values under `keys`, waiting up to [`Store::timeout`] for all of them.
    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>>;

    /// Sets each `(key, value)` in one query.
    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<()>;

    /// How long `get` and `multi_get` wait, and how long a reply may take.
    fn timeout(&self) -> Duration;
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        impl<S: Store + ?Sized> Store for $ty {
            fn set(&self, key: &str, value: &[u8]) -> Result<()> {
                (**self).set(key, value)
            }
            fn get(&self, key: &str) -> Result<Vec<u8>> {
                (**self).get(key)
            }
            fn add(&self, key: &str, delta: i64) -> Result<i64> {
                (**self).add(key, delta)
            }
            fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
                (**self).compare_set(key, expected, desired)
            }
            fn check(&self, keys: &[&str]) -> Result<bool> {
                (**self).check(keys)
            }
            fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
                (**self).wait(keys, timeout)
            }
            fn delete_key(&self, key: &str) -> Result<bool> {
                (**self).delete_key(key)
            }
            fn num_keys(&self) -> Result<i64> {
                (**self).num_keys()
            }
            fn append(&self, key: &str, value: &[u8]) -> Result<()> {
                (**self).append(key, value)
            }
            fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
                (**self).multi_get(keys)
            }
            fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<()> {
                (**self).multi_set(pairs)
            }
            fn timeout(&self) -> Duration {
                (**self).timeout()
            }
        }
    )*};
}

// So `PrefixStore<Arc<dyn Store>>` and friends work: a prefix over a store someone else owns.
forward_store!(&S, Box<S>, Arc<S>);
