//! `PrefixStore`: a namespace inside another store, joined exactly as torch's
//! `c10d::PrefixStore::joinKey` does — `<prefix>/<key>` — so whet and torch processes that use the
//! same prefix see the same keys (`/worker/attempt_0` over a `TcpStore` puts `k` on the server as
//! `//worker/attempt_0/k`, the client's own `/` included).

use std::time::Duration;

use crate::error::Result;
use crate::Store;

#[derive(Debug)]
pub struct PrefixStore<S> {
    prefix: String,
    inner: S,
}

impl<S: Store> PrefixStore<S> {
    pub fn new(prefix: impl Into<String>, inner: S) -> PrefixStore<S> {
        PrefixStore {
            prefix: prefix.into(),
            inner,
        }
    }

    /// Nests another prefix inside this one (torch's `PrefixStore(p, PrefixStore(q, s))`):
    /// keys become `<this prefix>/<prefix>/<key>`.
    pub fn with_prefix(self, prefix: impl Into<String>) -> PrefixStore<PrefixStore<S>> {
        PrefixStore::new(prefix, self)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    fn join(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    fn join_all(&self, keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| self.join(key)).collect()
    }
}

fn as_strs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

impl<S: Store> Store for PrefixStore<S> {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.set(&self.join(key), value)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.inner.get(&self.join(key))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.inner.add(&self.join(key), delta)
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        self.inner.compare_set(&self.join(key), expected, desired)
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        self.inner.check(&as_strs(&self.join_all(keys)))
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.inner.wait(&as_strs(&self.join_all(keys)), timeout)
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        self.inner.delete_key(&self.join(key))
    }

    /// Every key on the server, as torch's `PrefixStore::getNumKeys` counts.
    fn num_keys(&self) -> Result<i64> {
        self.inner.num_keys()
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.append(&self.join(key), value)
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        self.inner.multi_get(&as_strs(&self.join_all(keys)))
    }

    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<()> {
        let keys: Vec<String> = pairs.iter().map(|(key, _)| self.join(key)).collect();
        let joined: Vec<(&str, &[u8])> = keys
            .iter()
            .zip(pairs)
            .map(|(key, (_, value))| (key.as_str(), *value))
            .collect();
        self.inner.multi_set(&joined)
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
}
