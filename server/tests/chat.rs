//! `POST /api/jobs/{id}/chat`: a reply from a job's checkpoint (or its base model) streamed
//! from `whet infer --stream`; one per job at a time, cancellable; and
//! `GET /api/jobs/{id}/checkpoints`. The fake whet shows the stream's mechanics, the real one
//! that the engine's flags and output fit.

mod common;

use common::{TestServer, TOKEN};
use serde_json::{json, Value};

async fn chat(s: &TestServer, id: i64, body: &Value) -> reqwest::Response {
    s.client
        .post(s.url(&format!("/api/jobs/{id}/chat")))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn chat_events(s: &TestServer, id: i64, body: &Value) -> Vec<common::SseEvent> {
    let response = chat(s, id, body).await;
    assert_eq!(response.status(), 200);
    common::SseReader::new(response).read_to_end().await
}

fn reply(events: &[common::SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "text")
        .map(|e| e.data.as_str().unwrap())
        .collect()
}

fn question() -> Value {
    json!({"messages": [{"role": "user", "content": "What is 1 + 2?"}], "max_new_tokens": 8})
}

/// A fake job that saved checkpoints 1 and 2.
async fn job_with_checkpoints(s: &TestServer) -> i64 {
    let id = s.submit(&common::fake_job("steps=2 save=1")).await;
    s.wait_until_done(id).await;
    id
}

#[tokio::test]
async fn replies_stream_from_the_latest_checkpoint_or_the_named_one_or_the_base() {
    let s = TestServer::start(&[]).await;
    let id = job_with_checkpoints(&s).await;
    let (status, list) = s.get(&format!("/api/jobs/{id}/checkpoints")).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["checkpoint-1", "checkpoint-2"]);
    assert_eq!(list["checkpoints"][1]["metrics"]["loss"], 2.5);

    let events = chat_events(&s, id, &question()).await;
    assert!(
        events.iter().filter(|e| e.event == "text").count() >= 2,
        "{events:?}"
    );
    assert_eq!(reply(&events), "hello from checkpoint-2\n");
    let done = events.last().unwrap();
    assert_eq!(
        (done.event.as_str(), &done.data["answered_by"]),
        ("done", &json!("checkpoint-2"))
    );

    let mut named = question();
    named["checkpoint"] = json!("checkpoint-1");
    assert_eq!(
        reply(&chat_events(&s, id, &named).await),
        "hello from checkpoint-1\n"
    );
    let mut base = question();
    base["base"] = json!(true);
    let events = chat_events(&s, id, &base).await;
    assert_eq!(reply(&events), "hello from Qwen3-0.6B\n");
    assert_eq!(events.last().unwrap().data["answered_by"], "base");

    // whet's error arrives as the stream's last event.
    let mut failing = question();
    failing["max_new_tokens"] = json!(1);
    let events = chat_events(&s, id, &failing).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["message"], "fake whet: cannot");
}

#[tokio::test]
async fn one_reply_per_job_at_a_time_and_cancel_ends_it() {
    let s = TestServer::start(&[]).await;
    let id = job_with_checkpoints(&s).await;
    let first = chat(&s, id, &question()).await;
    assert_eq!(first.status(), 200);
    let mut reader = common::SseReader::new(first);
    let piece = reader.next().await.unwrap();
    assert_eq!(piece.data, "hel");
    assert_eq!(chat(&s, id, &question()).await.status(), 409);
    let (status, _) = s
        .post(&format!("/api/jobs/{id}/chat/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let rest = reader.read_to_end().await;
    let done = rest.last().unwrap();
    assert_eq!(
        (done.event.as_str(), &done.data["cancelled"]),
        ("done", &json!(true))
    );
    // The slot is free again; nothing to cancel now.
    let (status, _) = s
        .post(&format!("/api/jobs/{id}/chat/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        reply(&chat_events(&s, id, &question()).await),
        "hello from checkpoint-2\n"
    );

    // A client that goes away frees the slot too.
    drop(chat(&s, id, &question()).await);
    let mut freed = false;
    for _ in 0..50 {
        let response = chat(&s, id, &question()).await;
        if response.status() == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(freed, "the slot of a dropped stream is freed");
}

#[tokio::test]
async fn bad_chat_requests_are_refused_before_anything_runs() {
    let s = TestServer::start(&[]).await;
    let id = job_with_checkpoints(&s).await;
    let no_checkpoints = s.submit(&common::fake_job("steps=1")).await;
    s.wait_until_done(no_checkpoints).await;
    let unauthorised = s
        .client
        .post(s.url(&format!("/api/jobs/{id}/chat")))
        .json(&question())
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorised.status(), 401);
    for (body, status) in [
        (json!({"messages": []}), 400),
        (
            json!({"messages": [{"role": "assistant", "content": "hi"}]}),
            400,
        ),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            400,
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 0}),
            400,
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            400,
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "checkpoint": "checkpoint-9"}),
            404,
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "checkpoint": "../../x"}),
            404,
        ),
    ] {
        assert_eq!(chat(&s, id, &body).await.status(), status, "{body}");
    }
    assert_eq!(chat(&s, no_checkpoints, &question()).await.status(), 409);
    assert_eq!(chat(&s, 999, &question()).await.status(), 404);
}

/// The real whet: the demo trained 2 LoRA steps (ms-swift's default tuner) with a checkpoint,
/// answered by the base with the adapter, and by the base alone.
#[tokio::test]
async fn real_whet_infer_streams_the_reply_of_a_demo_checkpoint() {
    let examples = common::examples();
    let s = common::real_server(&[&examples]).await;
    let at = |p: &str| examples.join(p).display().to_string();
    let config = json!({"sft": {"model": at("tiny-qwen3"), "dataset": [at("demo/train.jsonl#64")],
        "template": "qwen3_thinking", "max_length": 64, "max_steps": 2, "save_steps": 2,
        "per_device_train_batch_size": 8, "split_dataset_ratio": 0.0, "eval_strategy": "no"}});
    let id = s.submit(&config).await;
    let events = s.wait_until_done(id).await;
    assert_eq!(
        common::statuses(&events).last(),
        Some(&"succeeded"),
        "{:?}",
        common::log_lines(&events)
    );
    let (_, list) = s.get(&format!("/api/jobs/{id}/checkpoints")).await;
    let checkpoint = &list["checkpoints"][0];
    assert_eq!(
        (checkpoint["name"].as_str(), checkpoint["kind"].as_str()),
        (Some("checkpoint-2"), Some("adapter"))
    );
    assert!(checkpoint["size_bytes"].as_u64().unwrap() > 10_000);

    for (base, answered_by) in [(false, "checkpoint-2"), (true, "base")] {
        let mut body = question();
        body["base"] = json!(base);
        let events = chat_events(&s, id, &body).await;
        let last = events.last().unwrap();
        assert_eq!(
            (last.event.as_str(), &last.data["answered_by"]),
            ("done", &json!(answered_by)),
            "{events:?}"
        );
        // The thinking template's reply begins inside the think block the prompt opened.
        assert!(reply(&events).starts_with("<think>\n"), "{events:?}");
    }
}
