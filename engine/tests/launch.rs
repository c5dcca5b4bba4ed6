//! `whet sft` as a launcher and as a rank, driving the real binary: N ranks meeting through the
//! launcher's store, NPROC_PER_NODE, a taken master_port, a failing rank, SIGTERM, two
//! launchers as two nodes on 127.0.0.1 (meeting, and failing together), and torchrun launching
//! whet's ranks. Most ranks stop after the rendezvous (`WHET_RENDEZVOUS_ONLY=1`, test-only);
//! two jobs train (whet's launcher, and torchrun's against it). Every launcher a test starts is
//! killed by a guard, and every rank it reported is checked gone.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

#[path = "common/fixtures.rs"]
mod common_fixtures;
#[path = "../../tests/src/prerequisites.rs"]
mod prerequisites;
use common_fixtures::fixtures;

/// Far more than any test here needs; a hang fails instead of blocking the run.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The variables of an outer launcher, which would make the launcher under test a rank.
fn outer_vars() -> impl Iterator<Item = &'static str> {
    whet_store::LAUNCHER_VARS
        .into_iter()
        .chain(["NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES"])
}

/// A temporary folder with a small dataset; the job's flags point at it and the fixture model.
struct Job {
    root: PathBuf,
}

impl Job {
    fn new(name: &str) -> Job {
        let root = std::env::temp_dir().join(format!("whet-launch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let row = r#"{"messages": [{"role": "user", "content": "What is 2 x 3?"}, {"role": "assistant", "content": "6."}]}"#;
        std::fs::write(root.join("data.jsonl"), format!("{row}\n").repeat(8)).unwrap();
        Job { root }
    }

    /// `whet sft`'s flags for this job, then `more`.
    fn flags(&self, more: &[&str]) -> Vec<String> {
        let mut flags: Vec<String> = vec![
            "--model".into(),
            fixtures().display().to_string(),
            "--dataset".into(),
            self.root.join("data.jsonl").display().to_string(),
            "--output_dir".into(),
            self.root.join("out").display().to_string(),
            "--eval_strategy".into(),
            "no".into(),
        ];
        flags.extend(more.iter().map(|s| s.to_string()));
        flags
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

/// A launcher (whet's or torchrun) under test, in its own process group. Dropping it kills
/// the group, and the ranks it reported.
struct Launcher {
    child: Child,
    lines: Receiver<Option<(Stream, String)>>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    open_streams: usize,
    /// The pids of the ranks whet's launcher reported starting.
    rank_pids: Vec<i32>,
}

impl Launcher {
    fn whet(args: &[String], env: &[(&str, &str)]) -> Launcher {
        let mut command = Command::new(env!("CARGO_BIN_EXE_whet"));
        command.arg("sft").args(args);
        Launcher::start(command, env)
    }

    fn start(mut command: Command, env: &[(&str, &str)]) -> Launcher {
        for var in outer_vars() {
            command.env_remove(var);
        }
        command
            .env_remove("WHET_RENDEZVOUS_ONLY")
            .env_remove("WHET_TEST_FAIL_RANK")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("starting the launcher");
        let (sender, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (stream, pipe) in [
            (Stream::Out, Box::new(out) as Box<dyn Read + Send>),
            (Stream::Err, Box::new(err)),
        ] {
            let sender = sender.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if sender.send(Some((stream, line))).is_err() {
                        return;
                    }
                }
                let _ = sender.send(None);
            });
        }
        Launcher {
            child,
            lines,
            stdout: Vec::new(),
            stderr: Vec::new(),
            open_streams: 2,
            rank_pids: Vec::new(),
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.join("\n"),
            self.stderr.join("\n")
        )
    }

    /// Takes the next line; false once both streams are closed.
    fn next_line(&mut self, deadline: Instant) -> bool {
        if self.open_streams == 0 {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(Some((stream, line))) => {
                if let Some(pid) = reported_rank_pid(&line) {
                    self.rank_pids.push(pid);
                }
                match stream {
                    Stream::Out => self.stdout.push(line),
                    Stream::Err => self.stderr.push(line),
                }
                true
            }
            Ok(None) => {
                self.open_streams -= 1;
                true
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("the launcher took over {TIMEOUT:?}; {}", self.output())
            }
            Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Reads output until a line on `stream` contains `text`.
    fn wait_for(&mut self, stream: Stream, text: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let seen = |me: &Launcher| {
            let lines = match stream {
                Stream::Out => &me.stdout,
                Stream::Err => &me.stderr,
            };
            lines.iter().any(|line| line.contains(text))
        };
        while !seen(self) {
            assert!(
                self.next_line(deadline),
                "the launcher ended before printing {text:?}; {}",
                self.output()
            );
        }
    }

    /// Reads all output and waits for the launcher to exit.
    fn finish(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        while self.next_line(deadline) {}
        self.child.wait().unwrap()
    }

    /// Asserts that every rank the launcher reported starting is gone (reaped, not orphaned).
    fn assert_ranks_gone(&self, expected: usize) {
        assert_eq!(self.rank_pids.len(), expected, "{}", self.output());
        for &pid in &self.rank_pids {
            // SAFETY: signal 0 only asks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            assert!(
                !alive,
                "rank pid {pid} outlived its launcher; {}",
                self.output()
            );
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = self.child.id() as i32;
            // SAFETY: kill(2) on the launcher's own process group and its reported ranks.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
        for &pid in &self.rank_pids {
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The pid in `whet: rank K started (local rank L, pid P)`.
fn reported_rank_pid(line: &str) -> Option<i32> {
    let rest = line.strip_prefix("whet: rank ")?;
    let (_, pid) = rest.split_once(", pid ")?;
    pid.strip_suffix(')')?.parse().ok()
}

fn met(rank: usize, world: usize, port: u16) -> String {
    format!(
        "[rank {rank}] rank {rank} of {world} met all ranks through the store at 127.0.0.1:{port}"
    )
}

fn count(lines: &[String], text: &str) -> usize {
    lines.iter().filter(|line| line.contains(text)).count()
}

#[test]
fn three_ranks_meet_through_the_launchers_store() {
    let job = Job::new("three");
    let port = free_port();
    let port_text = port.to_string();
    let mut launcher = Launcher::whet(
        &job.flags(&["--nproc_per_node", "3", "--master_port", &port_text]),
        &[("WHET_RENDEZVOUS_ONLY", "1")],
    );
    let status = launcher.finish();
    assert!(status.success(), "{status}; {}", launcher.output());
    for rank in 0..3 {
        assert_eq!(
            count(&launcher.stdout, &met(rank, 3, port)),
            1,
            "{}",
            launcher.output()
        );
    }
    // Ranks' stderr comes prefixed too; only rank 0 repeats the config's warnings.
    assert_eq!(
        count(&launcher.stderr, "[rank 2] rank 2 of 3: waiting at"),
        1,
        "{}",
        launcher.output()
    );
    assert_eq!(count(&launcher.stderr, "[rank 1] warning"), 0);
    launcher.assert_ranks_gone(3);
    assert!(
        !job.root.join("out").exists(),
        "the launcher trains nothing"
    );
}

#[test]
fn nproc_per_node_from_the_environment_launches() {
    let job = Job::new("env");
    let port = free_port();
    let port_text = port.to_string();
    let mut launcher = Launcher::whet(
        &job.flags(&["--master_port", &port_text]),
        &[("NPROC_PER_NODE", "2"), ("WHET_RENDEZVOUS_ONLY", "1")],
    );
    let status = launcher.finish();
    assert!(status.success(), "{status}; {}", launcher.output());
    for rank in 0..2 {
        assert_eq!(count(&launcher.stdout, &met(rank, 2, port)), 1);
    }
    launcher.assert_ranks_gone(2);
}

/// The training flags of a two-step job, 8 samples in batches of 2 per rank.
fn training(job: &Job, out: &str) -> Vec<String> {
    let mut flags = job.flags(&[
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    ]);
    let at = flags.iter().position(|f| f == "--output_dir").unwrap() + 1;
    flags[at] = job.root.join(out).display().to_string();
    flags
}

/// The loss lines of a run's logging.jsonl (one per step).
fn losses(job: &Job, out: &str) -> Vec<String> {
    let runs: Vec<PathBuf> = std::fs::read_dir(job.root.join(out))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "one run folder: {runs:?}");
    std::fs::read_to_string(runs[0].join("logging.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("{\"loss\""))
        .map(|l| l.split(", \"learning_rate\"").next().unwrap().to_string())
        .collect()
}

#[test]
fn without_the_test_switch_ranks_train_the_job_and_rank_0_speaks_for_it() {
    let job = Job::new("train");
    let port = free_port().to_string();
    let mut flags = training(&job, "out");
    flags.extend(["--nproc_per_node", "2", "--master_port", &port].map(String::from));
    let mut launcher = Launcher::whet(&flags, &[]);
    let status = launcher.finish();
    assert!(status.success(), "{status}; {}", launcher.output());
    assert_eq!(losses(&job, "out").len(), 2);
    let logged = |rank: usize| count(&launcher.stdout, &format!("[rank {rank}] {{\"loss\""));
    assert_eq!((logged(0), logged(1)), (2, 0), "{}", launcher.output());
    launcher.assert_ranks_gone(2);
}

/// Every file of the run's `checkpoint-<step>` folder, relative to it, sorted.
fn checkpoint_files(job: &Job, out: &str, step: usize) -> Vec<String> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, into: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, into);
            } else {
                into.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let run = std::fs::read_dir(job.root.join(out))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let checkpoint = run.join(format!("checkpoint-{step}"));
    let mut files = Vec::new();
    walk(&checkpoint, &checkpoint, &mut files);
    files.sort();
    files
}

#[test]
fn one_launched_rank_is_a_group_of_one_training_as_one_process() {
    let job = Job::new("one");
    let save = ["--save_strategy", "steps", "--save_steps", "2"].map(String::from);
    let mut flags = training(&job, "plain");
    flags.extend(save.clone());
    let mut plain = Launcher::whet(&flags, &[]);
    let status = plain.finish();
    assert!(status.success(), "{status}; {}", plain.output());

    let port = free_port().to_string();
    let mut flags = training(&job, "launched");
    flags.extend(save);
    flags.extend(["--nproc_per_node", "1", "--master_port", &port].map(String::from));
    let mut launched = Launcher::whet(&flags, &[]);
    let status = launched.finish();
    assert!(status.success(), "{status}; {}", launched.output());
    // It ran as rank 0 of a launched world of one (its lines come through the launcher).
    assert_eq!(
        count(&launched.stdout, "[rank 0] {\"loss\""),
        2,
        "{}",
        launched.output()
    );
    launched.assert_ranks_gone(1);

    assert_eq!(losses(&job, "launched"), losses(&job, "plain"));
    let files = checkpoint_files(&job, "launched", 2);
    assert_eq!(files, checkpoint_files(&job, "plain", 2));
    assert!(
        files.iter().any(|f| f.ends_with("optimizer.safetensors")),
        "{files:?}"
    );
}

#[test]
fn a_taken_master_port_is_refused_naming_a_free_one() {
    let job = Job::new("taken");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let port_text = port.to_string();
    let mut launcher = Launcher::whet(
        &job.flags(&["--nproc_per_node", "2", "--master_port", &port_text]),
        &[("WHET_RENDEZVOUS_ONLY", "1")],
    );
    let status = launcher.finish();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    let stderr = launcher.stderr.join("\n");
    let taken_line = format!("--master_port {port} is taken");
    assert!(stderr.contains(&taken_line), "{}", launcher.output());
    let suggested: u16 = stderr
        .split("use --master_port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no free port named; {}", launcher.output()));
    assert_ne!(suggested, port);
    assert!(stderr.contains("no rank was started"));
    assert_eq!(count(&launcher.stderr, "[rank"), 0, "{}", launcher.output());
    launcher.assert_ranks_gone(0);
    drop(taken);
}

#[test]
fn a_failing_rank_ends_the_others_and_is_named() {
    let job = Job::new("fail");
    let port = free_port().to_string();
    let started = Instant::now();
    let mut launcher = Launcher::whet(
        &job.flags(&["--nproc_per_node", "3", "--master_port", &port]),
        &[("WHET_RENDEZVOUS_ONLY", "1"), ("WHET_TEST_FAIL_RANK", "1")],
    );
    let status = launcher.finish();
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    let stderr = launcher.stderr.join("\n");
    let summary = "whet: rank 1 exited with status 3; its last lines:\n    error: rank 1 fails on purpose (WHET_TEST_FAIL_RANK=1";
    assert!(stderr.contains(summary), "{}", launcher.output());
    assert!(stderr.contains("the other ranks were ended"));
    // Ranks 0 and 2 waited for rank 1 at the store; the launcher ended them, not their timeout.
    assert_eq!(count(&launcher.stdout, "met all ranks"), 0);
    assert!(started.elapsed() < TIMEOUT / 2, "{:?}", started.elapsed());
    launcher.assert_ranks_gone(3);
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank() {
    let job = Job::new("sigterm");
    let port = free_port().to_string();
    // Node 0 of 2 alone: its ranks wait at the store for the two that never come.
    let mut launcher = Launcher::whet(
        &job.flags(&[
            "--nproc_per_node",
            "2",
            "--nnodes",
            "2",
            "--node_rank",
            "0",
            "--master_port",
            &port,
        ]),
        &[("WHET_RENDEZVOUS_ONLY", "1")],
    );
    launcher.wait_for(Stream::Err, "[rank 0] rank 0 of 4: waiting at");
    launcher.wait_for(Stream::Err, "[rank 1] rank 1 of 4: waiting at");
    // SAFETY: SIGTERM to the launcher this test started.
    unsafe {
        libc::kill(launcher.child.id() as i32, libc::SIGTERM);
    }
    let status = launcher.finish();
    assert!(!status.success());
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        launcher.output()
    );
    let stderr = launcher.stderr.join("\n");
    assert!(
        stderr.contains("received SIGTERM; forwarding it to every rank")
            && stderr.contains("stopped by SIGTERM"),
        "{}",
        launcher.output()
    );
    launcher.assert_ranks_gone(2);
}

#[test]
fn two_launchers_on_one_machine_are_two_nodes_of_one_job() {
    let job = Job::new("nodes");
    let port = free_port();
    let port_text = port.to_string();
    let node = |rank: &str| {
        job.flags(&[
            "--nproc_per_node",
            "2",
            "--nnodes",
            "2",
            "--node_rank",
            rank,
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            &port_text,
        ])
    };
    // Node 1 first: its ranks wait for node 0's store to come up.
    let mut node1 = Launcher::whet(&node("1"), &[("WHET_RENDEZVOUS_ONLY", "1")]);
    node1.wait_for(Stream::Err, "whet: rank 3 started");
    let mut node0 = Launcher::whet(&node("0"), &[("WHET_RENDEZVOUS_ONLY", "1")]);
    let status0 = node0.finish();
    let status1 = node1.finish();
    assert!(status0.success(), "{status0}; {}", node0.output());
    assert!(status1.success(), "{status1}; {}", node1.output());
    for rank in 0..2 {
        assert_eq!(
            count(&node0.stdout, &met(rank, 4, port)),
            1,
            "{}",
            node0.output()
        );
    }
    for rank in 2..4 {
        assert_eq!(
            count(&node1.stdout, &met(rank, 4, port)),
            1,
            "{}",
            node1.output()
        );
    }
    assert!(node0.stderr.iter().any(|l| l.ends_with("(hosted here)")));
    assert!(!node1.stderr.iter().any(|l| l.ends_with("(hosted here)")));
    node0.assert_ranks_gone(2);
    node1.assert_ranks_gone(2);
}

#[test]
fn a_rank_failing_on_one_node_ends_the_job_on_every_node() {
    let job = Job::new("nodes-fail");
    let port = free_port().to_string();
    let node = |rank: &str| {
        job.flags(&[
            "--nproc_per_node",
            "2",
            "--nnodes",
            "2",
            "--node_rank",
            rank,
            "--master_port",
            &port,
        ])
    };
    let env = [("WHET_RENDEZVOUS_ONLY", "1"), ("WHET_TEST_FAIL_RANK", "3")];
    let started = Instant::now();
    let mut node0 = Launcher::whet(&node("0"), &env);
    node0.wait_for(Stream::Err, "[rank 1] rank 1 of 4: waiting at");
    let mut node1 = Launcher::whet(&node("1"), &env);
    let status1 = node1.finish();
    let status0 = node0.finish();
    assert_eq!(status1.code(), Some(1), "{}", node1.output());
    assert!(
        node1
            .stderr
            .join("\n")
            .contains("whet: rank 3 exited with status 3; its last lines:"),
        "{}",
        node1.output()
    );
    // Node 0's ranks were waiting for rank 3; node 1's launcher told node 0's to end them.
    assert_eq!(status0.code(), Some(1), "{}", node0.output());
    assert!(
        node0
            .stderr
            .join("\n")
            .contains("the job failed on another node (node 1: rank 3 exited with status 3)"),
        "{}",
        node0.output()
    );
    assert!(started.elapsed() < TIMEOUT / 2, "{:?}", started.elapsed());
    node0.assert_ranks_gone(2);
    node1.assert_ranks_gone(2);
}

#[test]
fn torchrun_launches_whet_as_its_ranks() {
    let test = "torchrun_launches_whet_as_its_ranks";
    let python = match prerequisites::reference_python() {
        Ok(python) => python,
        Err(why) => return prerequisites::skip(test, &why),
    };
    let torchrun = python.with_file_name("torchrun");
    if !torchrun.is_file() {
        let why = format!("no torchrun beside {}", python.display());
        return prerequisites::skip(test, &why);
    }
    let job = Job::new("torchrun");
    let port = free_port();
    let mut command = Command::new(&torchrun);
    command
        .arg("--nproc_per_node=2")
        .arg(format!("--master_port={port}"))
        .arg("--no_python")
        .arg(Path::new(env!("CARGO_BIN_EXE_whet")))
        .arg("sft")
        .args(job.flags(&[]));
    let mut launcher = Launcher::start(command, &[("WHET_RENDEZVOUS_ONLY", "1")]);
    let status = launcher.finish();
    assert!(status.success(), "{status}; {}", launcher.output());
    for rank in 0..2 {
        let line = format!("rank {rank} of 2 met all ranks through the store at 127.0.0.1:{port}");
        assert_eq!(count(&launcher.stdout, &line), 1, "{}", launcher.output());
    }

    // Training under torchrun takes the steps whet's own launcher takes.
    let mut command = Command::new(&torchrun);
    command
        .arg("--nproc_per_node=2")
        .arg(format!("--master_port={}", free_port()))
        .arg("--no_python")
        .arg(Path::new(env!("CARGO_BIN_EXE_whet")))
        .arg("sft")
        .args(training(&job, "torchrun"));
    let mut torchrun_job = Launcher::start(command, &[]);
    let status = torchrun_job.finish();
    assert!(status.success(), "{status}; {}", torchrun_job.output());
    let mut flags = training(&job, "whet");
    flags.extend(["--nproc_per_node", "2", "--master_port"].map(String::from));
    flags.push(free_port().to_string());
    let mut whet_job = Launcher::whet(&flags, &[]);
    assert!(whet_job.finish().success(), "{}", whet_job.output());
    assert_eq!(losses(&job, "torchrun"), losses(&job, "whet"));
    assert_eq!(losses(&job, "whet").len(), 2);
}
