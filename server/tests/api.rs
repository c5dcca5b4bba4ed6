//! The HTTP API against an in-process server: routes, errors, auth, limits, the studio pages,
//! shares, and `/api/check` against the real `whet check --json`.

mod common;

use common::{TestServer, TOKEN};
use serde_json::{json, Value};

#[tokio::test]
async fn health_says_ok_and_version() {
    let s = TestServer::start(&[]).await;
    let (status, body) = s.get("/api/health").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})
    );
}

#[tokio::test]
async fn studio_pages_say_how_to_build_until_built_then_serve_it() {
    let s = TestServer::start(&[]).await;
    for path in ["/", "/s/abc123"] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains("cargo xtask studio"), "{text}");
    }
    let (status, body) = s.get("/api/nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    // A built studio: index.html and assets, page paths fall back to index.html.
    let dist = s.data.path().join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(dist.join("index.html"), "<html>studio</html>").unwrap();
    std::fs::write(dist.join("app.js"), "console.log(1)").unwrap();
    let built = TestServer::start(&["--static-dir", &dist.display().to_string()]).await;
    for (path, want) in [
        ("/", "<html>studio</html>"),
        ("/s/abc123", "<html>studio</html>"),
        ("/app.js", "console.log(1)"),
        ("/jobs/7", "<html>studio</html>"),
    ] {
        let r = built.client.get(built.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), want, "{path}");
    }
}

#[tokio::test]
async fn errors_have_one_shape_and_the_right_status() {
    let s = TestServer::start(&[]).await;
    let code = |body: &Value| body["error"]["code"].as_str().unwrap_or("").to_string();

    // 400: not JSON.
    let r = s
        .client
        .post(s.url("/api/check"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body) = common::status_json(r).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (400, "bad_request"),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    // 401: no token, wrong token (before the body is even looked at).
    let r = s
        .client
        .post(s.url("/api/jobs"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let (status, body) = common::status_json(r).await;
    assert_eq!((status, code(&body).as_str()), (401, "unauthorized"));
    for path in ["/api/jobs", "/api/shares", "/api/jobs/1/cancel"] {
        let r = s
            .client
            .post(s.url(path))
            .bearer_auth("wrong")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }

    // 404s.
    for path in [
        "/api/jobs/999",
        "/api/jobs/abc",
        "/api/shares/nope",
        "/api/jobs/999/events",
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!((status, code(&body).as_str()), (404, "not_found"), "{path}");
    }
    let (status, _) = s.post("/api/jobs/999/cancel", &json!({})).await;
    assert_eq!(status, 404);

    // 413: over 1 MiB.
    let big = format!("{{\"shell\": \"{}\"}}", "x".repeat(1024 * 1024 + 10));
    let r = s
        .client
        .post(s.url("/api/check"))
        .body(big)
        .send()
        .await
        .unwrap();
    let (status, body) = common::status_json(r).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (413, "payload_too_large"),
        "{body}"
    );

    let (status, body) = s.get("/api/jobs?limit=lots").await;
    assert_eq!(
        (status, code(&body).as_str()),
        (400, "bad_request"),
        "{body}"
    );

    // No CORS: a cross-origin page gets no permission header, and no preflight succeeds.
    let r = s
        .client
        .get(s.url("/api/health"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/api/jobs"))
        .header("Origin", "http://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert_eq!(r.status(), 405);

    // 405.
    let r = s.client.delete(s.url("/api/health")).send().await.unwrap();
    let (status, body) = common::status_json(r).await;
    assert_eq!((status, code(&body).as_str()), (405, "method_not_allowed"));

    // 422: an invalid config, with diagnostics naming the field.
    let (status, body) = s
        .post(
            "/api/jobs",
            &json!({"launch": {"cuda_visible_devices": "0,1", "nproc_per_node": 3},
                                     "sft": {"model": "Qwen/Qwen3-0.6B", "dataset": ["a/b"]}}),
        )
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (422, "invalid_config"),
        "{body}"
    );
    let diagnostics = body["error"]["diagnostics"].as_array().unwrap();
    assert!(
        diagnostics
            .iter()
            .any(|d| d["code"] == "nproc_device_mismatch"),
        "{body}"
    );
    // A value of the wrong type never becomes a config: 422 too.
    let (status, body) = s
        .post("/api/jobs", &json!({"sft": {"learning_rate": "fast"}}))
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (422, "invalid_config"),
        "{body}"
    );
    assert_eq!(body["error"]["diagnostics"][0]["field"], "learning_rate");
}

#[tokio::test]
async fn jobs_may_only_read_inside_the_allowed_roots() {
    let extra = tempfile::tempdir().unwrap();
    std::fs::write(extra.path().join("ok.jsonl"), "{}\n").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.jsonl"), "{}\n").unwrap();
    let s = TestServer::start(&["--allow-read", &extra.path().display().to_string()]).await;
    std::os::unix::fs::symlink(outside.path(), s.data_dir().join("escape")).unwrap();

    let base = |dataset: String| json!({"sft": {"model": "Qwen/Qwen3-0.6B", "dataset": [dataset], "system": "fake: steps=1"}});
    // Inside --allow-read and inside the data dir: accepted.
    s.submit(&base(format!("{}/ok.jsonl#5", extra.path().display())))
        .await;
    std::fs::write(s.data_dir().join("mine.jsonl"), "{}\n").unwrap();
    s.submit(&base(format!("{}/mine.jsonl", s.data_dir().display())))
        .await;

    for (field, config) in [
        (
            "dataset",
            base(format!("{}/secret.jsonl", outside.path().display())),
        ),
        (
            "dataset",
            base(format!("{}/escape/secret.jsonl", s.data_dir().display())),
        ),
        (
            "dataset",
            base(format!(
                "{}/../../../../../etc/passwd.jsonl",
                s.data_dir().display()
            )),
        ),
        ("dataset", base(format!("{}/token", s.data_dir().display()))),
        (
            "dataset",
            base(format!("{}/whet.db", s.data_dir().display())),
        ),
        (
            "model",
            json!({"sft": {"model": outside.path().display().to_string(), "dataset": ["a/b"]}}),
        ),
        (
            "resume_from_checkpoint",
            json!({"sft": {"model": "Qwen/Qwen3-0.6B", "dataset": ["a/b"], "resume_from_checkpoint": "/etc"}}),
        ),
        (
            "deepspeed",
            json!({"sft": {"model": "Qwen/Qwen3-0.6B", "dataset": ["a/b"], "deepspeed": "/etc/ds.json"}}),
        ),
    ] {
        let (status, body) = s.post("/api/jobs", &config).await;
        assert_eq!(status, 422, "{config} -> {body}");
        let d = body["error"]["diagnostics"].as_array().unwrap();
        assert!(
            d.iter()
                .any(|d| d["field"] == field && d["code"].as_str().unwrap().starts_with("path_")),
            "{field}: {body}"
        );
    }
}

/// A job may continue from adapter folders inside the roots — an earlier job's checkpoint under
/// the data dir, a folder under `--allow-read` — and is refused, on field `adapters`, one
/// outside them (directly or through a symlink) or one that does not exist.
#[tokio::test]
async fn jobs_may_name_adapter_folders_inside_the_allowed_roots() {
    let extra = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let s = TestServer::start(&["--allow-read", &extra.path().display().to_string()]).await;
    let adapter_folder = |dir: &std::path::Path| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type": "LORA"}"#).unwrap();
        dir.display().to_string()
    };
    let lora_job = |adapters: &[String]| {
        let mut job = common::fake_job("steps=1");
        job["sft"]["tuner_type"] = "lora".into();
        job["sft"]["adapters"] = json!(adapters);
        job
    };

    // An earlier LoRA job's checkpoint, inside its run folder under the data dir.
    let first = s.submit(&lora_job(&[])).await;
    s.wait_until_done(first).await;
    let checkpoint = adapter_folder(&s.data_dir().join(format!(
        "runs/{first}/output/v0-20260101-000000/checkpoint-1"
    )));
    let mine = adapter_folder(&extra.path().join("my-adapter"));
    let id = s.submit(&lora_job(&[checkpoint.clone(), mine])).await;
    let job = s.job(id).await;
    assert_eq!(
        job["config"]["sft"]["adapters"][0],
        checkpoint.as_str(),
        "{job}"
    );

    let escape = s.data_dir().join("escape");
    std::os::unix::fs::symlink(outside.path(), &escape).unwrap();
    let theirs = adapter_folder(&outside.path().join("their-adapter"));
    for (adapters, code) in [
        (vec![theirs.clone()], "path_not_allowed"),
        (
            vec![
                checkpoint.clone(),
                format!("{}/their-adapter", escape.display()),
            ],
            "path_not_allowed",
        ),
        (
            vec![format!(
                "{}/runs/{first}/no-such-checkpoint",
                s.data_dir().display()
            )],
            "path_not_found",
        ),
    ] {
        let (status, body) = s.post("/api/jobs", &lora_job(&adapters)).await;
        assert_eq!(status, 422, "{adapters:?} -> {body}");
        let d = body["error"]["diagnostics"].as_array().unwrap();
        assert!(
            d.iter()
                .any(|d| d["field"] == "adapters" && d["code"] == code),
            "{adapters:?}: {body}"
        );
        assert!(
            d.iter()
                .all(|d| d["severity"] != "error" || d["field"] == "adapters"),
            "only the adapters are wrong: {body}"
        );
    }
}

#[tokio::test]
async fn shares_get_short_random_ids_and_give_the_config_back() {
    let s = TestServer::start(&[]).await;
    let config = json!({"sft": {"model": "Qwen/Qwen3-8B", "dataset": ["a/b#10"], "lora_rank": 16, "tuner_type": "lora"}});
    let (status, made) = s.post("/api/shares", &config).await;
    assert_eq!(status, 201, "{made}");
    let id = made["id"].as_str().unwrap();
    assert_eq!(id.len(), 12);
    assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(made["url"], format!("/s/{id}"));
    let (status, back) = s.get(&format!("/api/shares/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(back["sft"]["lora_rank"], 16);
    assert_eq!(back["sft"]["model"], "Qwen/Qwen3-8B");
    let parsed: whet_shared::JobConfig = serde_json::from_value(back).unwrap();
    assert_eq!(parsed.sft.dataset, vec!["a/b#10".to_string()]);
    let (_, again) = s.post("/api/shares", &config).await;
    assert_ne!(again["id"], made["id"]);
    // Needs the token.
    let r = s
        .client
        .post(s.url("/api/shares"))
        .json(&config)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// `/api/check` answers exactly what `whet check --json` prints for the same input.
#[tokio::test]
async fn check_matches_whet_check_json() {
    let whet = common::prerequisites::whet_binary();
    let s = TestServer::start(&[]).await;
    let data = s.data_dir();
    // What the disk adds: a local model's config.json and a dataset's row count.
    std::fs::create_dir_all(data.join("model")).unwrap();
    std::fs::write(
        data.join("model/config.json"),
        json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072,
               "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
               "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
               "torch_dtype": "bfloat16", "tie_word_embeddings": true})
        .to_string(),
    )
    .unwrap();
    let rows: String = (0..37)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{i}\"}}]}}\n"))
        .collect();
    std::fs::write(data.join("train.jsonl"), rows).unwrap();
    let d = data.display();

    let seed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed.sh"))
        .unwrap();
    let inputs: Vec<Value> = vec![
        json!({"shell": seed}),
        json!({"shell": format!("whet sft --model {d}/model --dataset {d}/train.jsonl --tuner_type lora --num_train_epochs 2 --eval_strategy steps")}),
        json!({"shell": "swift sft --modle Qwen/Qwen3-8B"}),
        json!({"shell": "swift sft --model 'unterminated"}),
        json!({"launch": {"nproc_per_node": 2, "cuda_visible_devices": "0,1"},
               "sft": {"model": format!("{d}/model"), "dataset": [format!("{d}/train.jsonl")], "max_length": 2048}}),
        json!({"sft": {"model": "Qwen/Qwen3-30B-A3B", "dataset": ["x/y#1000"], "tuner_type": "qlora", "deepspeed": "zero3"}}),
        json!({"model": "Qwen/Qwen3-8B", "dataset": ["x/y#500"], "learning_rate": 2e-4, "warmup_ratio": 0.05}),
        json!({"sft": {"learning_rate": "fast", "no_such_field": 1}}),
        json!([1, 2, 3]),
    ];
    let scratch = tempfile::tempdir().unwrap();
    for (i, input) in inputs.iter().enumerate() {
        let (status, served) = s.post("/api/check", input).await;
        assert_eq!(status, 200, "{input}: {served}");
        let mut command = std::process::Command::new(&whet);
        command.arg("check").arg("--json");
        if let Some(script) = input.get("shell").and_then(Value::as_str) {
            let file = scratch.path().join(format!("input{i}.sh"));
            std::fs::write(&file, script).unwrap();
            command.arg("--from-shell").arg(file);
        } else {
            let file = scratch.path().join(format!("input{i}.json"));
            std::fs::write(&file, input.to_string()).unwrap();
            command.arg("--config").arg(file);
        }
        let output = command.output().unwrap();
        let printed: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{input}: whet check printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        assert_eq!(served, printed, "input {i}: {input}");
        assert_eq!(
            output.status.success(),
            served["ok"] == true,
            "exit code vs ok for input {i}"
        );
    }
}

#[tokio::test]
async fn check_reads_config_files_only_inside_the_roots() {
    let s = TestServer::start(&[]).await;
    std::fs::write(
        s.data_dir().join("base.json"),
        r#"{"sft": {"model": "Qwen/Qwen3-8B", "lora_rank": 64}}"#,
    )
    .unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("base.json"),
        r#"{"sft": {"lora_rank": 32}}"#,
    )
    .unwrap();
    let script = format!(
        "whet sft --config {}/base.json --dataset a/b",
        s.data_dir().display()
    );
    let (_, body) = s.post("/api/check", &json!({"shell": script})).await;
    assert_eq!(body["config"]["sft"]["lora_rank"], 64, "{body}");
    let script = format!(
        "whet sft --config {}/base.json --dataset a/b",
        outside.path().display()
    );
    let (_, body) = s.post("/api/check", &json!({"shell": script})).await;
    assert_eq!(body["ok"], false, "{body}");
    assert!(
        body["diagnostics"]
            .to_string()
            .contains("outside the folders"),
        "{body}"
    );
    let _ = TOKEN;
}
