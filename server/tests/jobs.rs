//! Jobs end to end against an in-process server and the `whet sft` test double: queue, run,
//! logs and metrics, SSE history and resume, cancel, failure, devices and concurrency.

mod common;

use common::{fake_job, log_lines, statuses, TestServer};
use serde_json::{json, Value};

#[tokio::test]
async fn a_job_runs_and_streams_logs_metrics_and_status() {
    let s = TestServer::start(&[]).await;
    let mut config = fake_job("steps=3");
    config["launch"] = json!({"env": {"WHET_TEST_ENV": "from-script"}});
    let id = s.submit(&config).await;
    let events = s.wait_until_done(id).await;

    assert_eq!(statuses(&events), vec!["queued", "running", "succeeded"]);
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "ids are 1, 2, 3, ..."
    );
    let lines = log_lines(&events);
    for want in [
        "step 1",
        "step 3",
        "note 2",
        "devices=[]",
        "token=[]",
        "env=[from-script]",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "{want} in {lines:?}"
        );
    }
    let metrics: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "metrics")
        .map(|e| &e.data)
        .collect();
    assert_eq!(
        metrics,
        vec![
            &json!({"loss": 1.5, "global_step/max_steps": "1/3"}),
            &json!({"loss": 2.5, "global_step/max_steps": "2/3"}),
            &json!({"loss": 3.5, "global_step/max_steps": "3/3"}),
        ]
    );

    let job = s.job(id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["last_metrics"]["loss"], 3.5);
    assert_eq!(job["config"]["sft"]["model"], "Qwen/Qwen3-0.6B");
    for key in ["created_at", "started_at", "finished_at"] {
        assert!(job[key].as_str().unwrap().ends_with('Z'), "{key}: {job}");
    }
    // The server decided where the run wrote.
    let run_dir = s.data_dir().join("runs").join(id.to_string());
    assert_eq!(job["run_dir"], run_dir.display().to_string());
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("job.json")).unwrap()).unwrap();
    assert_eq!(
        written["sft"]["output_dir"],
        run_dir.join("output").display().to_string()
    );
    let log = std::fs::read_to_string(run_dir.join("job.log")).unwrap();
    assert!(
        log.contains("step 2\n") && log.contains("note 3\n"),
        "{log}"
    );
}

#[tokio::test]
async fn late_clients_get_the_history_and_last_event_id_resumes() {
    let s = TestServer::start(&[]).await;
    let id = s.submit(&fake_job("steps=2")).await;
    let all = s.wait_until_done(id).await;
    // Connecting after the end: the same history, then the stream ends.
    let again = s.events(id, None).await.read_to_end().await;
    assert_eq!(again, all);
    // Resuming after the 3rd event gives the rest.
    let rest = s.events(id, Some(3)).await.read_to_end().await;
    assert_eq!(rest, all[3..].to_vec());
    // Resuming after the last one ends at once.
    let last = all.last().unwrap().id;
    assert!(s
        .events(id, Some(last))
        .await
        .read_to_end()
        .await
        .is_empty());
}

#[tokio::test]
async fn a_failing_run_is_failed_with_its_exit_code() {
    let s = TestServer::start(&[]).await;
    let id = s.submit(&fake_job("steps=1 exit=3")).await;
    let events = s.wait_until_done(id).await;
    assert_eq!(statuses(&events).last(), Some(&"failed"));
    assert_eq!(events.last().unwrap().data["exit_code"], 3);
    let job = s.job(id).await;
    assert_eq!(
        (job["status"].as_str(), job["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
}

#[tokio::test]
async fn a_missing_whet_binary_fails_the_job_with_a_message() {
    let s = TestServer::start(&["--whet-bin", "/nonexistent/whet"]).await;
    let id = s.submit(&fake_job("steps=1")).await;
    let events = s.wait_until_done(id).await;
    assert_eq!(statuses(&events), vec!["queued", "running", "failed"]);
    assert!(
        log_lines(&events)
            .iter()
            .any(|l| l.contains("/nonexistent/whet")),
        "{events:?}"
    );
}

#[tokio::test]
async fn cancelling_a_running_job_terminates_its_process_group() {
    let s = TestServer::start(&[]).await;
    let id = s.submit(&fake_job("steps=100 pause=30")).await;
    let mut stream = s.events(id, None).await;
    stream
        .read_until(|e| e.event == "log" && e.data["line"] == "step 1")
        .await;
    let started = std::time::Instant::now();
    let (status, body) = s.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("cancelling")),
        "{body}"
    );
    let rest = stream.read_to_end().await;
    assert_eq!(statuses(&rest), vec!["cancelled"]);
    // SIGTERM ended it well before the 30 s pause.
    assert!(started.elapsed().as_secs() < 10);
    assert_eq!(s.job(id).await["status"], "cancelled");
    // Cancelling again: it has ended.
    let (status, body) = s.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn a_run_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let s = TestServer::start(&["--cancel-grace", "0.3"]).await;
    let id = s
        .submit(&fake_job("steps=100 pause=30 ignore_term=1"))
        .await;
    let mut stream = s.events(id, None).await;
    stream
        .read_until(|e| e.event == "log" && e.data["line"] == "step 1")
        .await;
    let (status, _) = s.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 202);
    let rest = stream.read_to_end().await;
    assert_eq!(statuses(&rest), vec!["cancelled"]);
    assert!(
        log_lines(&rest)
            .iter()
            .any(|l| l.contains("killed by signal 9")),
        "{rest:?}"
    );
}

#[tokio::test]
async fn cancelling_a_queued_job_just_marks_it() {
    let s = TestServer::start(&[]).await;
    let first = s.submit(&fake_job("steps=100 pause=30")).await;
    let second = s.submit(&fake_job("steps=1")).await;
    let (status, body) = s
        .post(&format!("/api/jobs/{second}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    assert_eq!(
        statuses(&s.wait_until_done(second).await),
        vec!["queued", "cancelled"]
    );
    let job = s.job(second).await;
    assert_eq!(
        (job["status"].as_str(), &job["started_at"]),
        (Some("cancelled"), &Value::Null)
    );
    s.post(&format!("/api/jobs/{first}/cancel"), &json!({}))
        .await;
    s.wait_until_done(first).await;
}

#[tokio::test]
async fn jobs_wait_for_devices_and_get_their_own() {
    // 3 devices, up to 3 jobs at once: a 2-device job and a 1-device job run together; the next
    // 2-device job waits until the first one's devices are free.
    let s = TestServer::start(&["--devices", "4,5,6", "--max-concurrent-jobs", "3"]).await;
    let two = |behaviour: &str| {
        let mut c = fake_job(behaviour);
        c["launch"] = json!({"nproc_per_node": 2, "cuda_visible_devices": "0,1"});
        c
    };
    let a = s.submit(&two("steps=100 pause=30")).await;
    let b = s.submit(&fake_job("steps=1")).await;
    let c = s.submit(&two("steps=1")).await;

    let b_events = s.wait_until_done(b).await;
    assert!(
        log_lines(&b_events)
            .iter()
            .any(|l| l.contains("devices=[6]")),
        "{b_events:?}"
    );
    let mut a_stream = s.events(a, None).await;
    let a_start = a_stream
        .read_until(|e| e.event == "log" && e.data["stream"] != "server")
        .await;
    assert!(
        log_lines(&a_start)
            .iter()
            .any(|l| l.contains("devices=[4,5]")),
        "{a_start:?}"
    );
    assert_eq!(
        s.job(c).await["status"],
        "queued",
        "c waits for two free devices"
    );
    // The launcher's config keeps its ranks, gets the assigned devices and a port of its own.
    let job_json = s.data_dir().join(format!("runs/{a}/job.json"));
    let written: Value = serde_json::from_str(&std::fs::read_to_string(job_json).unwrap()).unwrap();
    assert_eq!(written["launch"]["nproc_per_node"], 2, "{written}");
    assert_eq!(
        written["launch"]["cuda_visible_devices"], "4,5",
        "{written}"
    );
    assert_ne!(written["launch"]["master_port"], 29500, "{written}");

    s.post(&format!("/api/jobs/{a}/cancel"), &json!({})).await;
    let c_events = s.wait_until_done(c).await;
    assert_eq!(statuses(&c_events), vec!["queued", "running", "succeeded"]);
    assert!(
        log_lines(&c_events)
            .iter()
            .any(|l| l.contains("devices=[4,5]")),
        "{c_events:?}"
    );
    assert_eq!(s.job(c).await["devices"], "4,5");

    // More devices than the server has: refused at once.
    let mut too_many = fake_job("steps=1");
    too_many["launch"] = json!({"nproc_per_node": 4, "cuda_visible_devices": "0,1,2,3"});
    let (status, body) = s.post("/api/jobs", &too_many).await;
    assert_eq!(status, 422);
    let codes: Vec<&str> = body["error"]["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["severity"] == "error")
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, vec!["not_enough_devices"], "{body}");
}

#[tokio::test]
async fn one_job_at_a_time_by_default_in_submission_order() {
    let s = TestServer::start(&[]).await;
    let ids = [
        s.submit(&fake_job("steps=1")).await,
        s.submit(&fake_job("steps=1")).await,
        s.submit(&fake_job("steps=1")).await,
    ];
    for &id in &ids {
        s.wait_until_done(id).await;
    }
    let mut spans = Vec::new();
    for &id in &ids {
        let job = s.job(id).await;
        assert_eq!(job["status"], "succeeded");
        spans.push((
            job["started_at"].as_str().unwrap().to_string(),
            job["finished_at"].as_str().unwrap().to_string(),
        ));
    }
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "not overlapping and in order: {spans:?}"
        );
    }
    // The list is newest first.
    let (_, list) = s.get("/api/jobs").await;
    let listed: Vec<i64> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, vec![ids[2], ids[1], ids[0]]);
}

/// With `--devices`, a job gets CUDA_VISIBLE_DEVICES; a `whet` built without CUDA refuses it
/// before any work, and the refusal (field and fix) is in the job's log, the job failed.
#[tokio::test]
async fn a_gpu_job_on_a_whet_without_cuda_fails_with_its_reason() {
    let whet = common::prerequisites::whet_binary().display().to_string();
    let s = TestServer::start(&["--devices", "0", "--whet-bin", &whet]).await;
    let config = common::tiny_real_job(&s.data_dir());
    let id = s.submit(&config).await;
    let events = s.wait_until_done(id).await;
    assert_eq!(statuses(&events), vec!["queued", "running", "failed"]);
    assert_eq!(events.last().unwrap().data["exit_code"], 1);
    let lines = log_lines(&events).join("\n");
    assert!(
        lines.contains("error[cuda_unavailable] cuda_visible_devices")
            && lines.contains("built without CUDA"),
        "{lines}"
    );
    assert_eq!(s.job(id).await["devices"], "0");
}
