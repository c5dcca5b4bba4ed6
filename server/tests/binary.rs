//! The `whet-server` binary itself: start-up on the embedded defaults, the non-loopback warning,
//! a restart after SIGKILL that loses nothing, and a real `whet sft` run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{fake_job, log_lines, statuses, SseEvent, SseReader, TOKEN};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct ServerProcess {
    child: Child,
    base: String,
    banner: Vec<String>,
    client: reqwest::Client,
}

impl ServerProcess {
    /// Starts `whet-server` in `cwd` and waits for its "listening on" line.
    async fn start(cwd: &Path, args: &[&str], token: Option<&str>) -> ServerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_whet-server"));
        command
            .args(args)
            .current_dir(cwd)
            .env_remove("WHET_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(token) = token {
            command.env("WHET_TOKEN", token);
        }
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        let base = loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("whet-server exited before listening: {banner:?}"));
            banner.push(line.clone());
            if let Some(rest) = line.strip_prefix("listening on ") {
                break rest.trim().to_string();
            }
        };
        // The banner ends with that line; keep the pipe drained from here on.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess {
            child,
            base,
            banner,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn submit(&self, config: &Value) -> i64 {
        let r = self
            .client
            .post(self.url("/api/jobs"))
            .bearer_auth(TOKEN)
            .json(config)
            .send()
            .await
            .unwrap();
        let (status, body) = common::status_json(r).await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_i64().unwrap()
    }

    async fn job(&self, id: i64) -> Value {
        let r = self
            .client
            .get(self.url(&format!("/api/jobs/{id}")))
            .send()
            .await
            .unwrap();
        common::status_json(r).await.1
    }

    async fn events(&self, id: i64) -> SseReader {
        let r = self
            .client
            .get(self.url(&format!("/api/jobs/{id}/events")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        SseReader::new(r)
    }

    async fn kill9(mut self) {
        self.child.start_kill().unwrap(); // SIGKILL
        self.child.wait().await.unwrap();
    }
}

#[tokio::test]
async fn starts_on_the_defaults_with_a_generated_token() {
    let cwd = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(cwd.path(), &["--bind", "127.0.0.1:0"], None).await;
    let banner = server.banner.join("\n");
    let data = cwd.path().join("whet-data");
    assert!(
        data.join("whet.db").is_file(),
        "SQLite file in ./whet-data: {banner}"
    );
    let token = std::fs::read_to_string(data.join("token")).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 32);
    assert!(
        banner.contains(token),
        "the generated token is printed: {banner}"
    );
    assert!(banner.contains("studio: not built"), "{banner}");
    assert!(!banner.contains("WARNING"), "{banner}");
    let r = server.client.get(server.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = server
        .client
        .get(server.url("/api/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The printed token works; restarting keeps it (and the database).
    let r = server
        .client
        .post(server.url("/api/shares"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    server.kill9().await;
    let again = ServerProcess::start(cwd.path(), &["--bind", "127.0.0.1:0"], None).await;
    assert!(
        !again.banner.join("\n").contains(token),
        "a kept token is not printed again"
    );
    let r = again
        .client
        .post(again.url("/api/shares"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn warns_when_bound_to_a_non_loopback_address() {
    let cwd = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(cwd.path(), &["--bind", "0.0.0.0:0"], Some(TOKEN)).await;
    let banner = server.banner.join("\n");
    assert!(
        banner.contains("WARNING") && banner.contains("not a loopback address"),
        "{banner}"
    );
}

#[tokio::test]
async fn a_restart_after_sigkill_marks_running_jobs_interrupted_and_runs_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let fake = common::write_fake_whet(dir.path());
    let data = dir.path().join("data");
    let args = [
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        &data.display().to_string(),
        "--whet-bin",
        &fake.display().to_string(),
    ]
    .map(str::to_string);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let server = ServerProcess::start(dir.path(), &args, Some(TOKEN)).await;
    let running = server.submit(&fake_job("steps=100 pause=30")).await;
    let queued = [
        server.submit(&fake_job("steps=2")).await,
        server.submit(&fake_job("steps=1")).await,
    ];
    server
        .events(running)
        .await
        .read_until(|e| e.event == "log" && e.data["line"] == "step 1")
        .await;
    server.kill9().await;

    let server = ServerProcess::start(dir.path(), &args, Some(TOKEN)).await;
    let banner = server.banner.join("\n");
    assert!(
        banner.contains(&format!(
            "marked interrupted (running when the server stopped): [{running}]"
        )),
        "{banner}"
    );
    let job = server.job(running).await;
    assert_eq!(job["status"], "interrupted", "{job}");
    let history = server.events(running).await.read_to_end().await;
    assert_eq!(statuses(&history), vec!["queued", "running", "interrupted"]);
    assert!(
        log_lines(&history).contains(&"step 1".to_string()),
        "the log survived"
    );
    for id in queued {
        let events = server.events(id).await.read_to_end().await;
        assert_eq!(
            statuses(&events),
            vec!["queued", "running", "succeeded"],
            "job {id}"
        );
    }
    let r = server
        .client
        .get(server.url("/api/jobs"))
        .send()
        .await
        .unwrap();
    let list = common::status_json(r).await.1;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        3,
        "nothing lost: {list}"
    );
}

#[tokio::test]
async fn sigterm_stops_the_server_even_with_an_open_event_stream() {
    let dir = tempfile::tempdir().unwrap();
    let fake = common::write_fake_whet(dir.path());
    let data = dir.path().join("data");
    let (data, fake) = (data.display().to_string(), fake.display().to_string());
    let args = [
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--whet-bin",
        &fake,
    ];
    let mut server = ServerProcess::start(dir.path(), &args, Some(TOKEN)).await;
    let id = server.submit(&fake_job("steps=100 pause=30")).await;
    let mut stream = server.events(id).await;
    stream
        .read_until(|e| e.event == "log" && e.data["line"] == "step 1")
        .await;
    let pid = server.child.id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let exit = tokio::time::timeout(std::time::Duration::from_secs(20), server.child.wait())
        .await
        .expect("whet-server stops within the grace period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    // The stream was cut with the server; the job is interrupted at the next start.
    drop(stream);
    let server = ServerProcess::start(dir.path(), &args, Some(TOKEN)).await;
    assert_eq!(server.job(id).await["status"], "interrupted");
}

/// The real `whet sft` runs the demo job (2 steps) to success, its metrics streamed.
#[tokio::test]
async fn real_whet_sft_runs_a_job_end_to_end() {
    let events = run_the_demo(None).await;
    assert!(
        events.iter().any(|e| e.event == "metrics"),
        "logging.jsonl records streamed"
    );
}

/// The demo as two CPU ranks: both train (each reports its peak memory), rank 0's records
/// stream, once per step.
#[tokio::test]
async fn real_whet_sft_trains_a_two_rank_job() {
    let events = run_the_demo(Some(2)).await;
    let lines = log_lines(&events);
    for rank in 0..2 {
        let peak = format!("[rank {rank}] rank {rank} of 2: peak RSS ");
        assert!(
            lines.iter().any(|l| l.starts_with(&peak)),
            "{peak} in {lines:?}"
        );
    }
    let steps = events
        .iter()
        .filter(|e| e.event == "metrics" && e.data.to_string().contains("\"loss\""))
        .count();
    assert!(steps >= 2, "a record per step from rank 0 only: {lines:?}");
    assert!(
        !lines.iter().any(|l| l.starts_with("[rank 1] {")),
        "rank 1 logs nothing: {lines:?}"
    );
}

/// Runs the demo for 2 steps (as `nproc_per_node` ranks when given) through the real server
/// and `whet sft`; returns the job's events once it succeeded.
async fn run_the_demo(nproc_per_node: Option<u32>) -> Vec<SseEvent> {
    let whet = common::prerequisites::whet_binary();
    let repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let demo = repo.join("examples/demo.yaml");
    // Run from the repository root, as `cargo xtask studio` does: examples/ is readable.
    let data = tempfile::tempdir().unwrap();
    let args = [
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        &data.path().display().to_string(),
        "--whet-bin",
        &whet.display().to_string(),
    ]
    .map(str::to_string);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&repo, &args, Some(TOKEN)).await;
    let text = std::fs::read_to_string(&demo).unwrap();
    let config = whet_shared::parse_config_text(&text, whet_shared::Format::Yaml).unwrap();
    let mut config = serde_json::to_value(config).unwrap();
    config["sft"]["max_steps"] = json!(2);
    config["sft"]["logging_steps"] = json!(1);
    if let Some(n) = nproc_per_node {
        config["launch"]["nproc_per_node"] = json!(n);
    }
    let id = server.submit(&config).await;
    let events = server.events(id).await.read_to_end().await;
    assert_eq!(
        statuses(&events).last(),
        Some(&"succeeded"),
        "{:?}",
        log_lines(&events)
    );
    events
}
