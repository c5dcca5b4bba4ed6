//! `whet sft` with a hub id for `--model` and `--dataset`, against loopback servers shaped like
//! the Hugging Face hub and ModelScope, with the hub variables set on the child process only:
//! download and train, then the same offline from the cache with the server gone.

#[path = "../src/hub/test_server.rs"]
mod test_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use test_server::{fixture_model_files, TestRepo, TestServer};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whet-hub-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn model_repo(id: &str) -> TestRepo {
    let files = fixture_model_files();
    TestRepo::new(id, files)
}

fn chat_rows() -> Vec<u8> {
    (0..4)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} + {i}?")},
                {"role": "assistant", "content": format!("{}", i + i)}
            ]})
            .to_string()
                + "\n"
        })
        .collect::<String>()
        .into_bytes()
}

/// `whet sft` for one step, with only the given hub variables set.
fn sft(args: &[&str], out: &Path, vars: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_whet"));
    command
        .arg("sft")
        .args(args)
        .args([
            "--tuner_type",
            "full",
            "--max_steps",
            "1",
            "--logging_steps",
            "1",
        ])
        .arg("--output_dir")
        .arg(out);
    for var in [
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "USE_HF",
        "MODELSCOPE_DOMAIN",
        "MODELSCOPE_API_TOKEN",
        "MODELSCOPE_CACHE",
        "CUDA_VISIBLE_DEVICES",
        "NPROC_PER_NODE",
        "WORLD_SIZE",
    ] {
        command.env_remove(var);
    }
    for (name, value) in vars {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn assert_trained(output: &Output) {
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn sft_trains_a_hugging_face_model_then_again_offline() {
    let root = temp_dir("hf");
    std::fs::write(root.join("data.jsonl"), chat_rows()).unwrap();
    let data = root.join("data.jsonl").display().to_string();
    let server = TestServer::hugging_face(vec![model_repo("someone/tiny-qwen3")]);
    let home = root.join("hf-home").display().to_string();
    let args = [
        "--model",
        "someone/tiny-qwen3",
        "--use_hf",
        "true",
        "--dataset",
        &data,
    ];
    let online = sft(
        &args,
        &root.join("out1"),
        &[
            ("HF_ENDPOINT", server.url()),
            ("HF_TOKEN", "hf_e2e".into()),
            ("HF_HOME", home.clone()),
        ],
    );
    assert_trained(&online);
    assert!(String::from_utf8_lossy(&online.stdout).contains("Fetching model `someone/tiny-qwen3`"));
    assert!(server
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer hf_e2e")));
    drop(server);

    let offline = sft(
        &args,
        &root.join("out2"),
        &[("HF_HOME", home.clone()), ("HF_HUB_OFFLINE", "1".into())],
    );
    assert_trained(&offline);
    // `whet infer` resolves a hub id the same way.
    let infer = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(["infer", "--model", "someone/tiny-qwen3", "--use_hf", "true"])
        .args(["--query", "What is 1 + 1?", "--max_new_tokens", "2"])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_ENDPOINT")
        .output()
        .unwrap();
    assert_trained(&infer);

    let missing = sft(
        &[
            "--model",
            "someone/not-cached",
            "--use_hf",
            "true",
            "--dataset",
            &data,
        ],
        &root.join("out3"),
        &[("HF_HOME", home), ("HF_HUB_OFFLINE", "1".into())],
    );
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("someone/not-cached") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sft_trains_a_modelscope_model_on_an_ms_dataset() {
    let root = temp_dir("ms");
    let data = TestRepo::new(
        "someone/chat-sft",
        vec![("train.jsonl".into(), chat_rows())],
    );
    let server = TestServer::modelscope(vec![model_repo("someone/tiny-qwen3"), data]);
    let cache = root.join("ms-cache");
    // ModelScope is the default hub (use_hf false), as in ms-swift.
    let args = [
        "--model",
        "someone/tiny-qwen3",
        "--dataset",
        "ms::someone/chat-sft",
    ];
    let output = sft(
        &args,
        &root.join("out"),
        &[
            ("MODELSCOPE_DOMAIN", server.url()),
            ("MODELSCOPE_CACHE", cache.display().to_string()),
        ],
    );
    assert_trained(&output);
    assert!(cache
        .join("models/someone/tiny-qwen3/model.safetensors")
        .is_file());
    assert!(cache
        .join("datasets/someone/chat-sft/train.jsonl")
        .is_file());
    drop(server);
    let offline = sft(
        &args,
        &root.join("out2"),
        &[
            ("MODELSCOPE_CACHE", cache.display().to_string()),
            ("HF_HUB_OFFLINE", "1".into()),
        ],
    );
    assert_trained(&offline);
    let _ = std::fs::remove_dir_all(&root);
}
