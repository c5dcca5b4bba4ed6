//! A finished job's metrics history, its resumption from a checkpoint as a new job, and the
//! merge-export of an adapter checkpoint: with the fake whet for the rules, and the real one
//! for a resume that continues the step count and an export transformers could load.

mod common;

use common::TestServer;
use serde_json::{json, Value};
use std::path::PathBuf;

fn step_of(record: &Value) -> u64 {
    record["global_step/max_steps"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_resume_and_export_follow_the_rules() {
    let s = TestServer::start(&[]).await;
    let id = s.submit(&common::fake_job("steps=2 save=1")).await;
    s.wait_until_done(id).await;
    let (status, history) = s.get(&format!("/api/jobs/{id}/metrics")).await;
    assert_eq!(status, 200);
    let losses: Vec<f64> = history["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses, [1.5, 2.5]);
    assert_eq!(s.get("/api/jobs/999/metrics").await.0, 404);

    let (status, created) = s
        .post(
            &format!("/api/jobs/{id}/resume"),
            &json!({"checkpoint": "checkpoint-1"}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let resumed = s.job(created["id"].as_i64().unwrap()).await;
    let from = resumed["config"]["sft"]["resume_from_checkpoint"]
        .as_str()
        .unwrap();
    assert!(
        from.ends_with("/checkpoint-1") && from.starts_with(s.data_dir().to_str().unwrap()),
        "{from}"
    );
    assert_eq!(resumed["config"]["sft"]["system"], "fake: steps=2 save=1");
    assert_eq!(
        s.post(
            &format!("/api/jobs/{id}/resume"),
            &json!({"checkpoint": "checkpoint-7"})
        )
        .await
        .0,
        404
    );
    // The fake writes full checkpoints: nothing to merge.
    assert_eq!(
        s.post(&format!("/api/jobs/{id}/export"), &json!({}))
            .await
            .0,
        409
    );

    let without = s.submit(&common::fake_job("steps=1")).await;
    s.wait_until_done(without).await;
    assert_eq!(
        s.post(&format!("/api/jobs/{without}/resume"), &json!({}))
            .await
            .0,
        409
    );
    let running = s.submit(&common::fake_job("steps=20 pause=1 save=1")).await;
    s.events(running, None)
        .await
        .read_until(|e| e.status() == Some("running"))
        .await;
    assert_eq!(
        s.post(&format!("/api/jobs/{running}/resume"), &json!({}))
            .await
            .0,
        409
    );
    let unauthorised = s
        .client
        .post(s.url(&format!("/api/jobs/{id}/resume")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorised.status(), 401);
}

/// The real whet: a LoRA run on the reference fixture (a tiny Qwen3 with weights) saves
/// checkpoints 2 and 4; resumed from 2 it logs steps 3 and 4; its last checkpoint merges.
#[tokio::test]
async fn real_whet_resumes_from_a_checkpoint_and_merges_an_adapter() {
    let fixture = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/hf-reference"
    ))
    .canonicalize()
    .unwrap();
    let examples = common::examples();
    let s = common::real_server(&[&fixture, &examples]).await;
    let config = json!({"sft": {"model": fixture.display().to_string(),
        "dataset": [examples.join("demo/train.jsonl#32").display().to_string()],
        "tuner_type": "lora", "max_length": 64, "max_steps": 4, "save_steps": 2, "logging_steps": 1,
        "per_device_train_batch_size": 4, "split_dataset_ratio": 0.0, "eval_strategy": "no",
        "save_total_limit": 3}});
    let id = s.submit(&config).await;
    let events = s.wait_until_done(id).await;
    assert_eq!(
        common::statuses(&events).last(),
        Some(&"succeeded"),
        "{:?}",
        common::log_lines(&events)
    );

    let (status, created) = s
        .post(
            &format!("/api/jobs/{id}/resume"),
            &json!({"checkpoint": "checkpoint-2"}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let resumed = created["id"].as_i64().unwrap();
    let events = s.wait_until_done(resumed).await;
    assert_eq!(
        common::statuses(&events).last(),
        Some(&"succeeded"),
        "{:?}",
        common::log_lines(&events)
    );
    let (_, history) = s.get(&format!("/api/jobs/{resumed}/metrics")).await;
    let steps: Vec<u64> = history["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(step_of)
        .collect();
    assert_eq!(steps, [3, 4]);

    let (status, exported) = s.post(&format!("/api/jobs/{id}/export"), &json!({})).await;
    assert_eq!(status, 200, "{exported}");
    assert_eq!(exported["checkpoint"], "checkpoint-4");
    let dir = PathBuf::from(exported["output_dir"].as_str().unwrap());
    assert!(dir.join("config.json").is_file() && dir.join("model.safetensors").is_file());
    assert!(exported["size_bytes"].as_u64().unwrap() > 100_000);
    // Asked again, the finished export is the answer.
    let (status, again) = s.post(&format!("/api/jobs/{id}/export"), &json!({})).await;
    assert_eq!((status, &again), (200, &exported));
    // The merged folder is not taken for a checkpoint.
    let (_, list) = s.get(&format!("/api/jobs/{id}/checkpoints")).await;
    let names: Vec<&str> = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["checkpoint-2", "checkpoint-4"]);
}
