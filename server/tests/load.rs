//! Load on loopback: 1,000 concurrent `POST /api/check` and 100 concurrent job submissions
//! against one in-process server; no request may fail and no job may be lost. Prints p50/p99.
//! Figures are recorded in BENCHMARKS.md; reproduce with
//! `cargo test -p whet-server --test load -- --nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{fake_job, TestServer, TOKEN};
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut latencies: Vec<Duration>, total: Duration) {
    latencies.sort();
    println!(
        "{name}: {} requests in {:.2} s ({:.0}/s); p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        total.as_secs_f64(),
        latencies.len() as f64 / total.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
}

/// Client and server sockets for 1,000 requests need more than the common soft limit of 1,024
/// open files: raise the soft limit to the hard one.
fn raise_open_file_limit() {
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn thousand_concurrent_checks_and_hundred_concurrent_submits() {
    raise_open_file_limit();
    // Up to 100 jobs at once, each a one-step run of the test double.
    let s = TestServer::start(&["--max-concurrent-jobs", "100"]).await;
    let seed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed.sh"))
        .unwrap();
    let bodies = [
        json!({"shell": seed}),
        json!({"sft": {"model": "Qwen/Qwen3-8B", "dataset": ["a/b#1000"], "tuner_type": "lora"}}),
    ];

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let client = s.client.clone();
        let url = s.url("/api/check");
        let body = bodies[i % 2].clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let r = client.post(url).json(&body).send().await.expect("request");
            assert_eq!(r.status(), 200);
            let report: serde_json::Value = r.json().await.expect("json");
            assert!(report.get("derived").is_some());
            t.elapsed()
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.push(done.expect("check task"));
    }
    report(
        "POST /api/check x1000 concurrent",
        latencies,
        started.elapsed(),
    );

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let client = s.client.clone();
        let url = s.url("/api/jobs");
        tasks.spawn(async move {
            let t = Instant::now();
            let r = client
                .post(url)
                .bearer_auth(TOKEN)
                .json(&fake_job("steps=1"))
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 201);
            let body: serde_json::Value = r.json().await.expect("json");
            (body["id"].as_i64().unwrap(), t.elapsed())
        });
    }
    let mut ids = Vec::new();
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (id, latency) = done.expect("submit task");
        ids.push(id);
        latencies.push(latency);
    }
    report(
        "POST /api/jobs x100 concurrent",
        latencies,
        started.elapsed(),
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100, "every submit got its own id");

    // Every job ran to success; none was lost.
    let started = Instant::now();
    for &id in &ids {
        let events = s.wait_until_done(id).await;
        assert_eq!(
            common::statuses(&events).last(),
            Some(&"succeeded"),
            "job {id}"
        );
    }
    println!(
        "100 jobs finished {:.2} s after the last submit",
        started.elapsed().as_secs_f64()
    );
    let (_, list) = s.get("/api/jobs?limit=1000").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 100);
}
