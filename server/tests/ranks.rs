//! Multi-rank jobs (`nproc_per_node` > 1) with the real `whet sft` as each job's launcher: N
//! CPU ranks when the server has no devices, `[rank k]` lines in the log, a master_port per job
//! (two such jobs at once), an explicit master_port kept, cancel ending every rank, and what the
//! server refuses (more than one node, an outer launcher's variables).
//!
//! Most jobs here stop their ranks after meeting through the store (`WHET_RENDEZVOUS_ONLY=1` in
//! the job's `launch.env`, a test-only switch of the engine), and one that must stay up names a
//! `master_addr` nothing answers at (TEST-NET-1): its launcher hosts the store on every interface
//! while its ranks keep trying to reach it there, until signalled. One job really trains, and
//! is cancelled mid-run (binary.rs runs a two-rank job to success).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{fake_job, log_lines, statuses, SseEvent, TestServer};
use serde_json::{json, Value};

/// Where a rank's store connection goes nowhere (RFC 5737 documentation addresses).
const UNREACHABLE_ADDR: &str = "192.0.2.1";

async fn real_server(extra: &[&str]) -> TestServer {
    let whet = common::prerequisites::whet_binary().display().to_string();
    let mut args = vec!["--whet-bin", whet.as_str()];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

/// A job of `ranks` CPU ranks that meet and exit 0.
fn meeting_job(s: &TestServer, ranks: i64) -> Value {
    let mut config = common::tiny_real_job(&s.data_dir());
    config["launch"] = json!({"nproc_per_node": ranks, "env": {"WHET_RENDEZVOUS_ONLY": "1"}});
    config
}

/// A job of `ranks` CPU ranks that never meet: they run until the job is cancelled.
fn stalled_job(s: &TestServer, ranks: i64) -> Value {
    let mut config = common::tiny_real_job(&s.data_dir());
    config["launch"] = json!({"nproc_per_node": ranks, "master_addr": UNREACHABLE_ADDR});
    config
}

/// A job of `ranks` CPU ranks training the tiny demo model far longer than any test waits.
fn training_job(s: &TestServer, ranks: i64) -> Value {
    let data = s.data_dir();
    let model = data.join("tiny-qwen3");
    std::fs::create_dir_all(&model).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for entry in std::fs::read_dir(examples.join("tiny-qwen3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let rows: Vec<String> = std::fs::read_to_string(examples.join("demo/train.jsonl"))
        .unwrap()
        .lines()
        .take(64)
        .map(str::to_string)
        .collect();
    std::fs::write(data.join("demo.jsonl"), rows.join("\n") + "\n").unwrap();
    json!({
        "launch": {"nproc_per_node": ranks, "env": {"CANDLE_NUM_THREADS": "1"}},
        "sft": {"model": model, "dataset": [data.join("demo.jsonl")], "tuner_type": "full",
                "template": "qwen3_thinking", "max_length": 64, "max_steps": 100000,
                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                "logging_steps": 1, "save_strategy": "no", "report_to": ["none"]}
    })
}

/// The port the server's log line says the job's ranks meet on.
fn master_port(events: &[SseEvent]) -> u16 {
    let lines = log_lines(events);
    let line = lines
        .iter()
        .find(|l| l.starts_with("whet-server: the job's ") && l.contains(" ranks meet on port "))
        .unwrap_or_else(|| panic!("no master port line in {lines:?}"));
    let rest = line.split(" ranks meet on port ").nth(1).unwrap();
    rest.split(' ').next().unwrap().parse().unwrap()
}

fn job_json(s: &TestServer, id: i64) -> Value {
    let path = s.data_dir().join(format!("runs/{id}/job.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Reads the job's events until its launcher has reported `ranks` started ranks; returns the
/// events and the ranks' pids (from `whet: rank K started (local rank K, pid P)`).
async fn until_ranks_started(
    s: &TestServer,
    id: i64,
    ranks: usize,
) -> (common::SseReader, Vec<SseEvent>, Vec<i32>) {
    let mut stream = s.events(id, None).await;
    let mut seen = Vec::new();
    let mut pids = Vec::new();
    while pids.len() < ranks {
        let Some(event) = stream.next().await else {
            panic!("the job ended first: {:?}", log_lines(&seen));
        };
        if event.event == "log" {
            let line = event.data["line"].as_str().unwrap_or("");
            if let Some(pid) = line
                .strip_prefix("whet: rank ")
                .and_then(|rest| rest.split_once(", pid "))
                .and_then(|(_, pid)| pid.strip_suffix(')'))
            {
                pids.push(pid.parse().unwrap());
            }
        }
        seen.push(event);
    }
    (stream, seen, pids)
}

/// Whether `pid` is a live process started with this job's `job.json` (a zombie's command line
/// is empty, and a reused pid's names another program).
fn runs_job(pid: i32, job_json: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = job_json.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}

/// Waits (up to 10 s) until none of `pids` runs the job any more. Polled: they are not our
/// children, and a rank SIGKILLed with its launcher (PR_SET_PDEATHSIG) dies a moment after it.
async fn assert_ranks_end(pids: &[i32], job_json: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&pid| runs_job(pid, job_json))
            .collect();
        if alive.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ranks still running after the job ended: {alive:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_two_rank_job_without_devices_runs_two_cpu_ranks_and_logs_them_prefixed() {
    let s = real_server(&[]).await;
    let id = s.submit(&meeting_job(&s, 2)).await;
    let events = s.wait_until_done(id).await;
    let lines = log_lines(&events);
    assert_eq!(
        statuses(&events),
        vec!["queued", "running", "succeeded"],
        "{lines:?}"
    );
    let port = master_port(&events);
    assert_ne!(port, 29500, "the server chose the port");
    for rank in 0..2 {
        let met = format!(
            "[rank {rank}] rank {rank} of 2 met all ranks through the store at 127.0.0.1:{port}"
        );
        assert!(lines.contains(&met), "{met} in {lines:?}");
    }
    // The launcher got the job's ranks, no devices, and the chosen port.
    let written = job_json(&s, id);
    assert_eq!(written["launch"]["nproc_per_node"], 2, "{written}");
    assert_eq!(written["launch"]["cuda_visible_devices"], "", "{written}");
    assert_eq!(written["launch"]["master_port"], port, "{written}");
    let job = s.job(id).await;
    assert_eq!(job["devices"], "", "CPU: {job}");
    let log = std::fs::read_to_string(s.data_dir().join(format!("runs/{id}/job.log"))).unwrap();
    assert!(
        log.contains("[rank 0] ") && log.contains("[rank 1] "),
        "{log}"
    );
}

/// Before the server chose ports, the second launcher found 29500 taken and failed.
#[tokio::test]
async fn two_multi_rank_jobs_at_once_meet_on_ports_of_their_own() {
    let s = real_server(&["--max-concurrent-jobs", "2"]).await;
    let first = s.submit(&stalled_job(&s, 2)).await;
    // Its launcher binds its store before it starts any rank.
    let (mut first_stream, first_events, _) = until_ranks_started(&s, first, 2).await;
    let second = s.submit(&meeting_job(&s, 2)).await;
    let events = s.wait_until_done(second).await;
    assert_eq!(
        statuses(&events),
        vec!["queued", "running", "succeeded"],
        "{:?}",
        log_lines(&events)
    );
    assert_ne!(master_port(&first_events), master_port(&events));
    assert_eq!(s.job(first).await["status"], "running");

    s.post(&format!("/api/jobs/{first}/cancel"), &json!({}))
        .await;
    assert_eq!(
        statuses(&first_stream.read_to_end().await),
        vec!["cancelled"]
    );
}

#[tokio::test]
async fn an_explicit_master_port_is_kept() {
    let s = real_server(&[]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = meeting_job(&s, 2);
    config["launch"]["master_port"] = json!(port);
    let id = s.submit(&config).await;
    let events = s.wait_until_done(id).await;
    let lines = log_lines(&events);
    assert_eq!(statuses(&events).last(), Some(&"succeeded"), "{lines:?}");
    assert_eq!(master_port(&events), port);
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("(the config's master_port)")),
        "{lines:?}"
    );
    let met = format!("[rank 1] rank 1 of 2 met all ranks through the store at 127.0.0.1:{port}");
    assert!(lines.contains(&met), "{met} in {lines:?}");
}

/// The server's SIGTERM reaches the launcher, which forwards it to every rank and exits
/// 128 + 15 once they have all exited (well within the grace period: no SIGKILL needed).
#[tokio::test]
async fn cancelling_a_multi_rank_job_ends_every_rank() {
    let s = real_server(&["--cancel-grace", "20"]).await;
    let id = s.submit(&stalled_job(&s, 2)).await;
    let (mut stream, _, pids) = until_ranks_started(&s, id, 2).await;
    let job_json = s.data_dir().join(format!("runs/{id}/job.json"));
    for &pid in &pids {
        assert!(runs_job(pid, &job_json), "rank pid {pid} runs the job");
    }
    let started = Instant::now();
    let (status, body) = s.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let rest = stream.read_to_end().await;
    let lines = log_lines(&rest);
    assert_eq!(statuses(&rest), vec!["cancelled"], "{lines:?}");
    assert_eq!(
        rest.last().unwrap().data["exit_code"],
        128 + 15,
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("received SIGTERM; forwarding it to every rank"))
            && lines.iter().any(|l| l.contains("stopped by SIGTERM")),
        "{lines:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // The launcher reaped every rank before it exited.
    for &pid in &pids {
        assert!(!runs_job(pid, &job_json), "rank pid {pid} outlived the job");
    }
}

/// A job whose ranks are training (rank 0's records streaming) ends on cancel, every rank
/// with it.
#[tokio::test]
async fn cancelling_a_training_job_ends_every_rank() {
    let s = real_server(&["--cancel-grace", "20"]).await;
    let id = s.submit(&training_job(&s, 2)).await;
    let (mut stream, _, pids) = until_ranks_started(&s, id, 2).await;
    let job_json = s.data_dir().join(format!("runs/{id}/job.json"));
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &SseEvent| e.event == "metrics") {
        let Some(event) = stream.next().await else {
            panic!("the job ended before training: {:?}", log_lines(&seen));
        };
        seen.push(event);
    }
    s.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
    let rest = stream.read_to_end().await;
    assert_eq!(statuses(&rest), vec!["cancelled"], "{:?}", log_lines(&rest));
    assert_eq!(rest.last().unwrap().data["exit_code"], 128 + 15);
    assert_ranks_end(&pids, &job_json).await;
}

/// With no grace the server SIGKILLs the launcher at once; its ranks die with it.
#[tokio::test]
async fn a_cancel_that_kills_the_launcher_still_ends_every_rank() {
    let s = real_server(&["--cancel-grace", "0"]).await;
    let id = s.submit(&stalled_job(&s, 3)).await;
    let (mut stream, _, pids) = until_ranks_started(&s, id, 3).await;
    let job_json = s.data_dir().join(format!("runs/{id}/job.json"));
    s.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
    let rest = stream.read_to_end().await;
    assert_eq!(statuses(&rest), vec!["cancelled"], "{:?}", log_lines(&rest));
    assert_ranks_end(&pids, &job_json).await;
}

#[tokio::test]
async fn multi_node_jobs_and_launcher_variables_are_refused() {
    let s = TestServer::start(&[]).await;
    let error_codes = |body: &Value| -> Vec<(String, String)> {
        body["error"]["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["severity"] == "error")
            .map(|d| {
                (
                    d["field"].as_str().unwrap().to_string(),
                    d["code"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let mut two_nodes = fake_job("steps=1");
    two_nodes["launch"] = json!({"nproc_per_node": 2, "nnodes": 2});
    let (status, body) = s.post("/api/jobs", &two_nodes).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        error_codes(&body),
        vec![("nnodes".into(), "multi_node_not_served".into())],
        "{body}"
    );

    // (MASTER_PORT, NPROC_PER_NODE and the like in `env` fill their fields instead.)
    let mut outer = fake_job("steps=1");
    outer["launch"] = json!({"nproc_per_node": 2, "env": {"RANK": "0", "WORLD_SIZE": "2"}});
    let (status, body) = s.post("/api/jobs", &outer).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        error_codes(&body),
        vec![
            ("env".into(), "env_not_allowed".into()),
            ("env".into(), "env_not_allowed".into())
        ],
        "{body}"
    );
}
