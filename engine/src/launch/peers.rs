//! The launchers of a multi-node job (`--nnodes` > 1) meeting through the job's store, as
//! torchrun's agents do: a failure on one node ends every node's ranks, and node 0's launcher —
//! which hosts the store — takes the store away only once the other launchers have finished
//! (torchrun's exit barrier), so a rank on another node never loses it mid-reply.
//!
//! Their keys live under `/whet_launcher`, apart from the ranks' `/worker/attempt_<n>`.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use whet_store::{PrefixStore, Store, StoreError, TcpStore};

use super::rank::RENDEZVOUS_TIMEOUT;
use super::supervisor::{Event, GRACE_PERIOD};
use super::LaunchPlan;

const PREFIX: &str = "/whet_launcher";
/// Set by the first launcher whose node failed; its value says what failed.
const FAILED: &str = "failed";
/// How long node 0's launcher waits for the others after its ranks succeeded (torchrun's exit
/// barrier timeout).
const EXIT_BARRIER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a launcher that finished tries to reach a store it had not reached yet.
const CONNECT_AT_EXIT: Duration = Duration::from_secs(5);

/// Set by a node's launcher once it reaches the store.
fn joined_key(node_rank: usize) -> String {
    format!("node_{node_rank}_joined")
}

/// Set by a node's launcher once its ranks have all exited.
fn finished_key(node_rank: usize) -> String {
    format!("node_{node_rank}_finished")
}

type LauncherStore = PrefixStore<TcpStore>;

/// This launcher's link to the others.
pub(super) struct Peers {
    plan: LaunchPlan,
    /// The connection this launcher writes through, once the watcher has made it.
    store: Arc<Mutex<Option<LauncherStore>>>,
    /// This node's failure, published as soon as there is a connection.
    published: bool,
}

impl Peers {
    /// Connects to the job's store in the background (a slow or absent node 0 must not keep
    /// this launcher from its ranks or its signals) and watches for another node's failure,
    /// which arrives as [`Event::PeerFailed`].
    pub(super) fn start(plan: &LaunchPlan, events: Sender<Event>) -> Peers {
        let store = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&store);
        let (host, port) = (plan.master_addr.clone(), plan.master_port);
        let node_rank = plan.node_rank;
        let watcher = move || {
            let Ok(writer) = TcpStore::connect(&host, port, RENDEZVOUS_TIMEOUT) else {
                return; // no store: the ranks fail on their own and say why
            };
            let Ok(watch) = writer.clone_connection() else {
                return;
            };
            let writer = writer.with_prefix(PREFIX);
            let _ = writer.set(&joined_key(node_rank), b"1");
            *lock(&slot) = Some(writer);
            let watch = watch.with_prefix(PREFIX);
            loop {
                match watch.wait(&[FAILED], EXIT_BARRIER_TIMEOUT) {
                    Ok(()) => {
                        let what = watch.get(FAILED).unwrap_or_default();
                        let what = String::from_utf8_lossy(&what).into_owned();
                        let _ = events.send(Event::PeerFailed(what));
                        return;
                    }
                    Err(StoreError::Timeout { .. }) => continue,
                    // The store went away (the job is over, or node 0 is gone).
                    Err(_) => return,
                }
            }
        };
        let _ = thread::Builder::new()
            .name("launcher-peers".to_string())
            .spawn(watcher);
        Peers {
            plan: plan.clone(),
            store,
            published: false,
        }
    }

    /// Tells the other launchers that this node failed (`what` names the rank or signal), if
    /// the store is reached already; [`Peers::finish`] tries again otherwise.
    pub(super) fn publish_failure(&mut self, what: &str) {
        if self.published {
            return;
        }
        if let Some(store) = lock(&self.store).as_ref() {
            // The first failure stays: it is the cause, the others its consequences.
            self.published = store.compare_set(FAILED, b"", what.as_bytes()).is_ok();
        }
    }

    /// This node's ranks have all exited: publish its failure if it has not gone out yet, then
    /// say this node has finished — or, on node 0, wait until every other node has (a signal
    /// cuts that short).
    pub(super) fn finish(
        mut self,
        failure: Option<&str>,
        events: &Receiver<Event>,
        sender: Sender<Event>,
    ) -> Finish {
        if lock(&self.store).is_none() {
            let (host, port) = (&self.plan.master_addr, self.plan.master_port);
            match TcpStore::connect(host, port, CONNECT_AT_EXIT) {
                Ok(store) => *lock(&self.store) = Some(store.with_prefix(PREFIX)),
                Err(_) => return Finish::default(), // nobody left to tell
            }
        }
        if let Some(what) = failure {
            self.publish_failure(what);
        }
        let Some(store) = lock(&self.store).take() else {
            return Finish::default();
        };
        if !self.plan.hosts_store() {
            let _ = store.set(&joined_key(self.plan.node_rank), b"1");
            let _ = store.set(&finished_key(self.plan.node_rank), b"1");
            return Finish::default();
        }
        // On success every node's ranks met these, so every launcher comes. After a failure,
        // wait for those that reached the store (they end their ranks within their grace
        // period once the failure is published); one that never came has nothing to lose.
        let (nodes, timeout): (Vec<usize>, _) = if failure.is_some() {
            let joined = (1..self.plan.nnodes)
                .filter(|node| store.check(&[&joined_key(*node)]).unwrap_or(false))
                .collect();
            (joined, GRACE_PERIOD + CONNECT_AT_EXIT)
        } else {
            ((1..self.plan.nnodes).collect(), EXIT_BARRIER_TIMEOUT)
        };
        if nodes.is_empty() {
            return Finish::default();
        }
        eprintln!(
            "whet: waiting up to {timeout:?} for the launchers of nodes {nodes:?} to finish before \
             closing the store"
        );
        let keys: Vec<String> = nodes.into_iter().map(finished_key).collect();
        let barrier = move || {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let waited = store.wait(&keys, timeout).map_err(|err| err.to_string());
            let _ = sender.send(Event::PeersFinished(waited));
        };
        if thread::Builder::new()
            .name("launcher-exit-barrier".to_string())
            .spawn(barrier)
            .is_err()
        {
            return Finish::default();
        }
        let mut end = Finish::default();
        while let Ok(event) = events.recv() {
            match event {
                Event::PeersFinished(Ok(())) => break,
                Event::PeersFinished(Err(why)) => {
                    eprintln!("whet: {why}; closing the store anyway");
                    break;
                }
                Event::Signal(signal) => {
                    end.signal = Some(signal);
                    break;
                }
                Event::PeerFailed(what) => end.peer_failure = Some(what),
                Event::Exited(_) => {}
            }
        }
        end
    }
}

/// How node 0's wait for the other launchers ended.
#[derive(Debug, Default)]
pub(super) struct Finish {
    /// A signal cut the wait short.
    pub signal: Option<i32>,
    /// Another node failed after this node's ranks had exited.
    pub peer_failure: Option<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
