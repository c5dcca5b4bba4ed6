//! `POST /api/datasets/preview` runs the real `whet dataset preview` on the demo, and judges
//! the paths it would read before it runs anything.

mod common;

use common::{examples, TestServer};
use serde_json::{json, Value};

async fn server() -> TestServer {
    common::real_server(&[&examples()]).await
}

fn demo() -> Value {
    let examples = examples();
    let at = |p: &str| examples.join(p).display().to_string();
    json!({"sft": {"model": at("tiny-qwen3"), "dataset": [at("demo/train.jsonl")],
                   "val_dataset": [at("demo/val.jsonl")], "template": "qwen3_thinking",
                   "max_length": 64}})
}

#[tokio::test]
async fn the_demo_preview_is_what_whet_dataset_preview_prints() {
    let s = server().await;
    let (status, body) = s.post("/api/datasets/preview?rows=2", &demo()).await;
    assert_eq!(status, 200, "{body}");
    let preview: whet_shared::preview::DatasetPreview =
        serde_json::from_value(body).expect("a DatasetPreview");
    assert_eq!(preview.rows.len(), 2);
    assert_eq!(preview.template, "qwen3_thinking");
    assert!(preview.rows[0].tokens.iter().any(|t| t.trained));
    assert!(preview.rows[0].tokens.iter().any(|t| !t.trained));
    assert_eq!(preview.datasets[0].rows, 4000);

    let config_file = s.data_dir().join("demo.json");
    std::fs::write(&config_file, demo().to_string()).unwrap();
    let output = std::process::Command::new(common::prerequisites::whet_binary())
        .args(["dataset", "preview", "--json", "--rows", "2", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed: whet_shared::preview::DatasetPreview =
        serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed, preview);

    // Nothing of the config file is left behind.
    let scratch = s.data_dir().join("scratch");
    assert_eq!(std::fs::read_dir(scratch).unwrap().count(), 0);
}

#[tokio::test]
async fn previews_read_only_inside_the_roots_and_say_what_is_wrong() {
    let s = server().await;
    let mut outside = demo();
    outside["sft"]["dataset"] = json!(["/etc/passwd.jsonl"]);
    let (status, body) = s.post("/api/datasets/preview", &outside).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["diagnostics"][0]["field"], "dataset");

    // A path the server may read but whet cannot use: whet's own message, on 422.
    let bad = s.data_dir().join("bad.jsonl");
    std::fs::write(&bad, "not json\n").unwrap();
    let mut unusable = demo();
    unusable["sft"]["dataset"] = json!([bad.display().to_string()]);
    let (status, body) = s.post("/api/datasets/preview", &unusable).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["diagnostics"][0]["message_en"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("no usable rows") && message.contains("row 1"),
        "{message}"
    );

    // A preview of paths not yet valid elsewhere in the config still runs (deepspeed is not read).
    let mut editing = demo();
    editing["sft"]["deepspeed"] = json!("/nowhere/ds.json");
    let (status, body) = s.post("/api/datasets/preview?rows=1", &editing).await;
    assert_eq!(status, 200, "{body}");

    for rows in ["0", "51", "x"] {
        let (status, _) = s
            .post(&format!("/api/datasets/preview?rows={rows}"), &demo())
            .await;
        assert_eq!(status, 400, "rows={rows}");
    }
}
