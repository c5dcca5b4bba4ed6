//! The launcher's process supervision: host the store (node 0), start this node's ranks,
//! forward their output and the signals the launcher gets, and end them all when one fails.
//!
//! Each rank leads its own process group, so a terminal's Ctrl-C (or whet-server's signal to
//! the launcher's group) reaches the ranks once, through the launcher, and ending a rank ends
//! whatever it started. On Linux a rank also dies with the launcher (PR_SET_PDEATHSIG), so a
//! SIGKILLed launcher leaves no rank behind. One thread per rank waits for its exit without
//! reaping it (`waitid(WNOWAIT)`); only the main loop reaps, so a pid it signals is never a
//! reused one.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use whet_store::TcpStoreServer;

use super::peers::Peers;
use super::LaunchPlan;

/// How long ranks have to exit after SIGTERM (or a forwarded signal) before SIGKILL; a second
/// signal to the launcher cuts it short.
pub const GRACE_PERIOD: Duration = Duration::from_secs(30);

/// How many of a rank's last stderr lines a failure message quotes.
pub const TAIL_LINES: usize = 20;

/// How long the launcher waits, once every rank has exited, for their last output to drain
/// (a rank's own children could hold its pipes open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs this node's share of the job described by `plan`: `program` with `args` as each rank.
/// Returns the launcher's exit code: 0 when every rank exited 0, 1 when the store could not be
/// hosted or a rank failed, 128 + the signal when the launcher was signalled.
pub fn run_launcher(
    plan: &LaunchPlan,
    program: &Path,
    args: &[OsString],
) -> anyhow::Result<ExitCode> {
    // Before any rank exists, so no signal finds a rank the launcher does not forward it to.
    let (events_tx, events) = mpsc::channel();
    let signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let signals_handle = signals.handle();
    forward_signals(signals, events_tx.clone())?;

    let _store = if plan.hosts_store() {
        match TcpStoreServer::bind_all_interfaces(plan.master_port) {
            Ok(server) => Some(server),
            Err(err) => {
                eprintln!("whet: {err}; no rank was started");
                return Ok(ExitCode::from(1));
            }
        }
    } else {
        None
    };
    eprintln!(
        "whet: node {} of {}: starting ranks {} to {} of {}; store at {}:{}{}",
        plan.node_rank,
        plan.nnodes,
        plan.node_rank * plan.nproc_per_node,
        (plan.node_rank + 1) * plan.nproc_per_node - 1,
        plan.world_size(),
        plan.master_addr,
        plan.master_port,
        if plan.hosts_store() {
            " (hosted here)"
        } else {
            ""
        },
    );

    let mut ranks = Ranks::default();
    for local_rank in 0..plan.nproc_per_node {
        let env = plan.rank_env(local_rank);
        let rank = ranks
            .start(program, args, &env.env_vars(), env.rank, events_tx.clone())
            .with_context(|| format!("starting rank {} ({})", env.rank, program.display()))?;
        eprintln!(
            "whet: rank {} started (local rank {local_rank}, pid {})",
            env.rank, rank
        );
    }
    let mut peers = (plan.nnodes > 1).then(|| Peers::start(plan, events_tx.clone()));

    let stop = ranks.supervise(&events, plan, peers.as_mut())?;
    ranks.drain();
    let (mut code, failure) = match &stop {
        None => (ExitCode::SUCCESS, None),
        Some(Stop::Failed { index }) => {
            let rank = &ranks.list[*index];
            let status = describe(rank.status.expect("a failed rank has exited"));
            let lines = rank.stderr.lines();
            let tail = if lines.is_empty() {
                " it wrote nothing to stderr".to_string()
            } else {
                format!(" its last lines:\n    {}", lines.join("\n    "))
            };
            eprintln!(
                "whet: rank {} {status};{tail}\nwhet: the other ranks were ended",
                rank.rank
            );
            let failure = format!("node {}: rank {} {status}", plan.node_rank, rank.rank);
            (ExitCode::from(1), Some(failure))
        }
        Some(Stop::Signalled(signal)) => {
            eprintln!(
                "whet: stopped by {}; every rank has exited",
                signal_name(*signal)
            );
            let failure = stopped_by(plan, *signal);
            (ExitCode::from(128 + *signal as u8), Some(failure))
        }
        Some(Stop::PeerFailed(what)) => {
            eprintln!(
                "whet: the job failed on another node ({what}); this node's ranks were ended"
            );
            (ExitCode::from(1), None)
        }
    };
    if let Some(peers) = peers {
        let end = peers.finish(failure.as_deref(), &events, events_tx);
        if let Some(what) = end.peer_failure.filter(|_| stop.is_none()) {
            eprintln!("whet: the job failed on another node ({what})");
            code = ExitCode::from(1);
        }
        if let Some(signal) = end.signal {
            eprintln!(
                "whet: stopped by {} while waiting for the other nodes",
                signal_name(signal)
            );
            code = ExitCode::from(128 + signal as u8);
        }
    }
    signals_handle.close();
    Ok(code)
}

fn stopped_by(plan: &LaunchPlan, signal: i32) -> String {
    format!(
        "node {}: its launcher was stopped by {}",
        plan.node_rank,
        signal_name(signal)
    )
}

/// Why the launcher stopped its ranks: the first rank to fail, the first signal it got, or
/// another node's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    Failed { index: usize },
    Signalled(i32),
    PeerFailed(String),
}

/// What the launcher's main loop waits for.
pub(super) enum Event {
    /// The rank at this index has exited (not reaped yet).
    Exited(usize),
    Signal(i32),
    /// Another node's launcher published this failure.
    PeerFailed(String),
    /// Node 0's exit barrier: every other node has finished, or why not.
    PeersFinished(Result<(), String>),
}

fn forward_signals(mut signals: Signals, events: Sender<Event>) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("launcher-signals".to_string())
        .spawn(move || {
            for signal in signals.forever() {
                if events.send(Event::Signal(signal)).is_err() {
                    break;
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// This node's ranks. Dropping it SIGKILLs and reaps any that still run, so no error path
/// leaves one behind.
#[derive(Default)]
struct Ranks {
    list: Vec<Rank>,
}

struct Rank {
    /// RANK.
    rank: usize,
    child: Child,
    /// Set once the main loop has reaped it.
    status: Option<ExitStatus>,
    stdout: Arc<Tail>,
    stderr: Arc<Tail>,
}

impl Ranks {
    /// Starts one rank with `vars` added to the launcher's environment; returns its pid.
    fn start(
        &mut self,
        program: &Path,
        args: &[OsString],
        vars: &[(&'static str, String)],
        rank: usize,
        events: Sender<Event>,
    ) -> anyhow::Result<u32> {
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(vars.iter().map(|(name, value)| (*name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        die_with_launcher(&mut command);
        let mut child = command.spawn()?;
        let pid = child.id();
        let prefix = format!("[rank {rank}] ");
        let stdout = Tail::new(0);
        let stderr = Tail::new(TAIL_LINES);
        if let Some(out) = child.stdout.take() {
            spawn_forwarder(out, io::stdout, prefix.clone(), Arc::clone(&stdout));
        } else {
            stdout.close();
        }
        if let Some(err) = child.stderr.take() {
            spawn_forwarder(err, io::stderr, prefix, Arc::clone(&stderr));
        } else {
            stderr.close();
        }
        let index = self.list.len();
        self.list.push(Rank {
            rank,
            child,
            status: None,
            stdout,
            stderr,
        });
        thread::Builder::new()
            .name(format!("launcher-wait-{rank}"))
            .spawn(move || {
                wait_for_exit(pid);
                let _ = events.send(Event::Exited(index));
            })
            .context("starting a rank's wait thread")?;
        Ok(pid)
    }

    /// Waits for every rank to exit: reaps each as it goes; on the first failure (here, or
    /// another node's) ends the others, on a signal forwards it; SIGKILLs whatever outlives the
    /// grace period. A failure or signal here is published to the other nodes' launchers.
    fn supervise(
        &mut self,
        events: &mpsc::Receiver<Event>,
        plan: &LaunchPlan,
        mut peers: Option<&mut Peers>,
    ) -> anyhow::Result<Option<Stop>> {
        let mut stop = None;
        let mut signalled = false;
        let mut kill_at: Option<Instant> = None;
        while self.list.iter().any(|rank| rank.status.is_none()) {
            let event = match kill_at {
                None => events.recv().ok(),
                Some(at) => match events.recv_timeout(at.saturating_duration_since(Instant::now()))
                {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => {
                        eprintln!(
                            "whet: ranks still running {GRACE_PERIOD:?} after being asked to stop; killing them"
                        );
                        self.signal_running(libc::SIGKILL);
                        kill_at = None;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            // The signal thread and every wait thread hold a sender while a rank runs; this
            // cannot happen, but if it did, waiting on would hang.
            let Some(event) = event else {
                anyhow::bail!("lost track of the ranks' exits");
            };
            match event {
                Event::Exited(index) => {
                    let rank = &mut self.list[index];
                    let status = rank
                        .child
                        .wait()
                        .with_context(|| format!("reaping rank {}", rank.rank))?;
                    rank.status = Some(status);
                    if !status.success() && stop.is_none() {
                        let status = describe(status);
                        eprintln!("whet: rank {} {status}; ending the other ranks", rank.rank);
                        let what = format!("node {}: rank {} {status}", plan.node_rank, rank.rank);
                        if let Some(peers) = peers.as_deref_mut() {
                            peers.publish_failure(&what);
                        }
                        stop = Some(Stop::Failed { index });
                        self.signal_running(libc::SIGTERM);
                        kill_at = Some(Instant::now() + GRACE_PERIOD);
                    }
                }
                Event::Signal(signal) if signalled => {
                    eprintln!("whet: {} again; killing every rank", signal_name(signal));
                    self.signal_running(libc::SIGKILL);
                    kill_at = None;
                }
                Event::Signal(signal) => {
                    signalled = true;
                    eprintln!(
                        "whet: received {}; forwarding it to every rank",
                        signal_name(signal)
                    );
                    if let Some(peers) = peers.as_deref_mut() {
                        peers.publish_failure(&stopped_by(plan, signal));
                    }
                    stop.get_or_insert(Stop::Signalled(signal));
                    self.signal_running(signal);
                    kill_at.get_or_insert(Instant::now() + GRACE_PERIOD);
                }
                Event::PeerFailed(what) => {
                    if stop.is_none() {
                        eprintln!("whet: {what}; ending this node's ranks");
                        stop = Some(Stop::PeerFailed(what));
                        self.signal_running(libc::SIGTERM);
                        kill_at = Some(Instant::now() + GRACE_PERIOD);
                    }
                }
                Event::PeersFinished(_) => {}
            }
        }
        Ok(stop)
    }

    /// Sends `signal` to the process group of every rank not reaped yet (an exited, unreaped
    /// rank still holds its pid, so the group is never someone else's).
    fn signal_running(&self, signal: i32) {
        for rank in self.list.iter().filter(|rank| rank.status.is_none()) {
            signal_group(rank.child.id(), signal);
        }
    }

    /// Waits, a bounded time, until every rank's output has been forwarded.
    fn drain(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for rank in &self.list {
            rank.stdout.wait_closed(deadline);
            rank.stderr.wait_closed(deadline);
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for rank in self.list.iter_mut().filter(|rank| rank.status.is_none()) {
            signal_group(rank.child.id(), libc::SIGKILL);
            rank.status = rank.child.wait().ok();
        }
    }
}

fn signal_group(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-pid, signal);
    }
}

/// Makes the child die when the launcher does (Linux), so a SIGKILLed launcher leaves no rank.
#[cfg(target_os = "linux")]
fn die_with_launcher(command: &mut Command) {
    // SAFETY: getpid() before the fork; in the child only async-signal-safe syscalls run.
    let launcher = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher died before the call above took effect: nothing would kill us.
            if libc::getppid() != launcher {
                return Err(io::Error::other("the launcher has exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_command: &mut Command) {}

/// Blocks until the child `pid` has exited, leaving it to be reaped by `Child::wait`.
fn wait_for_exit(pid: u32) {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter; waitid writes into it only.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let done = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if done == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// A stream being forwarded, and its last lines.
struct Tail {
    keep: usize,
    state: Mutex<TailState>,
    closed: Condvar,
}

#[derive(Default)]
struct TailState {
    lines: VecDeque<String>,
    closed: bool,
}

impl Tail {
    fn new(keep: usize) -> Arc<Tail> {
        Arc::new(Tail {
            keep,
            state: Mutex::default(),
            closed: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, TailState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, line: &str) {
        if self.keep == 0 {
            return;
        }
        let mut state = self.state();
        if state.lines.len() == self.keep {
            state.lines.pop_front();
        }
        state.lines.push_back(line.to_string());
    }

    fn close(&self) {
        self.state().closed = true;
        self.closed.notify_all();
    }

    fn wait_closed(&self, deadline: Instant) {
        let mut state = self.state();
        while !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = match self.closed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn lines(&self) -> Vec<String> {
        self.state().lines.iter().cloned().collect()
    }
}

/// Copies `from` to the launcher's stream line by line, each line whole and prefixed, and keeps
/// its tail. Write errors (a closed stdout) are ignored: the rank's pipe must keep draining.
fn spawn_forwarder<W: Write + 'static>(
    from: impl Read + Send + 'static,
    to: fn() -> W,
    prefix: String,
    tail: Arc<Tail>,
) {
    let forward = move || {
        let mut from = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match from.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            let mut out = to();
            let _ = writeln!(out, "{prefix}{text}");
            let _ = out.flush();
            tail.push(text);
        }
        tail.close();
    };
    if thread::Builder::new()
        .name("launcher-forward".to_string())
        .spawn(forward)
        .is_err()
    {
        // Out of threads: the rank's output is lost and its pipe closes, not hangs.
        eprintln!("whet: cannot start a thread to forward a rank's output");
    }
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal} ({})", signal_name(signal)),
        (None, None) => format!("ended ({status})"),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGHUP => "SIGHUP".to_string(),
        libc::SIGINT => "SIGINT".to_string(),
        libc::SIGQUIT => "SIGQUIT".to_string(),
        libc::SIGABRT => "SIGABRT".to_string(),
        libc::SIGKILL => "SIGKILL".to_string(),
        libc::SIGSEGV => "SIGSEGV".to_string(),
        libc::SIGPIPE => "SIGPIPE".to_string(),
        libc::SIGTERM => "SIGTERM".to_string(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_lines() {
        let tail = Tail::new(2);
        for line in ["a", "b", "c"] {
            tail.push(line);
        }
        assert_eq!(tail.lines(), ["b", "c"]);
        let silent = Tail::new(0);
        silent.push("x");
        assert!(silent.lines().is_empty());
    }

    #[test]
    fn statuses_read_as_a_person_would_say_them() {
        assert_eq!(
            describe(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "was killed by signal 9 (SIGKILL)"
        );
    }
}
