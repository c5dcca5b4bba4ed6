//! `whet check` and `whet convert` as a user runs them: the seed script from examples/.

use std::path::PathBuf;
use std::process::Command;

fn whet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whet"))
}

fn seed_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed.sh"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whet-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn check_json_reports_the_seed() {
    let output = whet()
        .args(["check", "--json", "--from-shell"])
        .arg(seed_path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let derived = &report["derived"];
    assert_eq!(report["ok"], true);
    assert_eq!(derived["world_size"], 5);
    assert_eq!(derived["effective_batch_size"], 80);
    assert_eq!(derived["total_steps"], 39);
    assert_eq!(derived["warmup_steps"], 4);
    assert!(derived["memory"]["per_gpu_gib"].as_f64().unwrap() > 80.0);
    let codes: Vec<&str> = report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"eval_disabled_no_val") && codes.contains(&"memory_over_gpu"),
        "{codes:?}"
    );
}

#[test]
fn check_exits_1_on_errors_and_2_on_usage() {
    let output = whet()
        .args([
            "check",
            "--model",
            "Qwen/Qwen3-8B",
            "--dataset",
            "d.jsonl",
            "--learning_rate",
            "-1",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stdout).contains("learning_rate"));
    let output = whet()
        .args(["check", "--json", "--model", "m", "--lerning_rate", "1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["diagnostics"][0]["code"], "unknown_flag");
    let output = whet()
        .args(["convert", "--to", "nonsense", "--config", "x.json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = whet().args(["bogus-subcommand"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn convert_writes_every_form_and_reads_it_back() {
    let dir = temp_dir("convert");
    let reference = whet()
        .args(["convert", "--to", "json", "--from-shell"])
        .arg(seed_path())
        .output()
        .unwrap();
    assert!(reference.status.success());
    for (target, file) in [
        ("json", "job.json"),
        ("yaml", "job.yaml"),
        ("toml", "job.toml"),
        ("swift", "swift.sh"),
        ("whet", "whet.sh"),
    ] {
        let output = whet()
            .args(["convert", "--to", target, "--from-shell"])
            .arg(seed_path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{target}");
        let path = dir.join(file);
        std::fs::write(&path, &output.stdout).unwrap();
        let input_flag = if file.ends_with(".sh") {
            "--from-shell"
        } else {
            "--config"
        };
        let again = whet()
            .args(["convert", "--to", "json", input_flag])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            again.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&again.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&again.stdout),
            String::from_utf8_lossy(&reference.stdout),
            "{target}"
        );
    }
    let link = whet()
        .args([
            "convert",
            "--to",
            "link",
            "--base",
            "https://studio.example",
            "--from-shell",
        ])
        .arg(seed_path())
        .output()
        .unwrap();
    let link = String::from_utf8(link.stdout).unwrap();
    assert!(
        link.starts_with("https://studio.example/#cfg=v1.") && link.len() < 2000,
        "{link}"
    );
    // Flags after a config file override it; --config is read by `check` as well.
    let output = whet()
        .args(["check", "--json", "--config"])
        .arg(dir.join("job.yaml"))
        .args(["--per_device_train_batch_size", "1"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["derived"]["effective_batch_size"], 40);
}

#[test]
fn bench_train_prints_one_json_line() {
    let output = whet()
        .args([
            "bench", "train", "--size", "tiny", "--steps", "3", "--batch", "2", "--seq", "16",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(text.lines().count(), 1);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["tokens_per_s", "step_ms", "peak_rss_mib"] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {text}"
        );
    }
    assert_eq!(report["device"], "cpu", "{text}");
    assert_eq!(report["dtype"], "float32", "{text}");
    assert!(report["mfu"].is_null() && report["peak_gpu_gib"].is_null());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn bench_on_cuda_without_cuda_is_refused_before_any_work() {
    let output = whet()
        .args(["bench", "train", "--size", "tiny", "--device", "cuda"])
        .env("CUDA_VISIBLE_DEVICES", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--device cuda") && stderr.contains("built without CUDA"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

fn demo_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/demo.yaml"
    ))
}

/// `whet check --json` run on `args` (from the workspace root, where demo.yaml's paths lie).
fn check_json(args: &[&str]) -> serde_json::Value {
    let output = whet()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn codes(report: &serde_json::Value) -> Vec<String> {
    report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn whets_own_options_count_wherever_they_stand() {
    let demo = demo_path();
    let demo = demo.to_str().unwrap();
    let report = check_json(&["--config", demo, "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    let report = check_json(&[
        "--model",
        "Qwen/Qwen3-8B",
        "--dataset",
        "d#100",
        "--gpu",
        "a100-40",
        "--json",
    ]);
    assert_eq!(report["derived"]["gpu"]["id"], "a100-40", "{report}");
    let script = temp_dir("own-options").join("train.sh");
    std::fs::write(&script, "swift sft --model Qwen/Qwen3-8B --dataset d#100\n").unwrap();
    let report = check_json(&[
        "--learning_rate",
        "2e-4",
        "--from-shell",
        script.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(report["config"]["sft"]["learning_rate"], 2e-4, "{report}");
    let help = whet()
        .args(["check", "--model", "m", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("ms-swift flags") && help.contains("--learning_rate"),
        "{help}"
    );
}

#[test]
fn flags_override_the_config_file_wherever_they_stand() {
    let demo = demo_path();
    let demo = demo.to_str().unwrap();
    for args in [
        ["--output_dir", "elsewhere", "--config", demo, "--json"],
        ["--config", demo, "--output_dir", "elsewhere", "--json"],
    ] {
        let report = check_json(&args);
        assert_eq!(report["derived"]["output_dir"], "elsewhere", "{args:?}");
    }
}

#[test]
fn an_unknown_flag_points_to_the_right_help() {
    let report = check_json(&["--json", "--model", "m", "--zzqqxx", "1"]);
    let fix = report["diagnostics"][0]["fix"].as_str().unwrap();
    assert!(fix.contains("`whet check --help`"), "{fix}");
    let output = whet()
        .args(["sft", "--model", "m", "--zzqqxx", "1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`whet sft --help`"), "{stderr}");
}

#[test]
fn metric_for_best_model_is_judged_by_check_and_sft_alike() {
    let demo = demo_path();
    let demo = demo.to_str().unwrap();
    let report = check_json(&[
        "--config",
        demo,
        "--metric_for_best_model",
        "accuracy",
        "--json",
    ]);
    assert_eq!(report["ok"], false);
    assert!(
        codes(&report).contains(&"best_metric_unknown".to_string()),
        "{report}"
    );
    let out = temp_dir("bad-metric");
    let output = whet()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "sft",
            "--config",
            demo,
            "--metric_for_best_model",
            "accuracy",
            "--output_dir",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("best_metric_unknown") && stderr.contains("nothing was trained"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "nothing written"
    );
}

// A CUDA build refuses with what the driver says instead (engine/tests/cuda_build.rs).
#[cfg(not(feature = "cuda"))]
#[test]
fn gpus_named_without_cuda_are_refused_before_any_work() {
    let demo = demo_path();
    let dir = temp_dir("no-cuda");
    let out = dir.join("output");
    std::fs::create_dir_all(&out).unwrap();
    // The environment's CUDA_VISIBLE_DEVICES, or a config file's (layered over demo.yaml).
    let devices = dir.join("devices.json");
    std::fs::write(
        &devices,
        r#"{"launch": {"cuda_visible_devices": "0,1", "nproc_per_node": 2}}"#,
    )
    .unwrap();
    for (env, config) in [(Some("0"), None), (None, Some(&devices))] {
        let mut command = whet();
        command
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(["sft", "--config"])
            .arg(&demo)
            .arg("--output_dir")
            .arg(&out);
        if let Some(devices) = env {
            command.env("CUDA_VISIBLE_DEVICES", devices);
        }
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{env:?} {config:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("error[cuda_unavailable] cuda_visible_devices")
                && stderr.contains("built without CUDA")
                && stderr.contains("CUDA_VISIBLE_DEVICES= whet sft"),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "nothing written"
        );
    }
}

#[test]
fn check_shows_what_lora_and_qlora_train_and_hold() {
    let args = |extra: &[&'static str]| -> Vec<&'static str> {
        let model = ["--model", "examples/tiny-qwen3"];
        let data = ["--dataset", "examples/demo/train.jsonl"];
        model
            .into_iter()
            .chain(data)
            .chain(extra.iter().copied())
            .collect()
    };
    let run = |extra: &[&'static str]| {
        let mut json = args(extra);
        json.push("--json");
        check_json(&json)
    };
    // tiny-qwen3: hidden 128, 4 layers, q 128 and k/v 64 wide, MLP 384, tied embeddings.
    // LoRA r8 on all-linear, 8·(in + out) per linear: q 2048, k and v 1536, o 2048, gate, up
    // and down 4096 each = 19456 a layer.
    let lora = run(&["--tuner_type", "lora"]);
    let qlora_flags = ["--tuner_type", "qlora", "--torch_dtype", "bfloat16"];
    let qlora = run(&qlora_flags);
    for report in [&lora, &qlora] {
        assert_eq!(
            report["derived"]["memory"]["trainable_params"],
            4 * 19456,
            "{report}"
        );
    }
    let weights = |r: &serde_json::Value| r["derived"]["memory"]["weights_gib"].as_f64().unwrap();
    assert!(weights(&qlora) < weights(&lora), "{qlora}");
    let output = whet()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .arg("check")
        .args(args(&qlora_flags))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("QLoRA r8 (alpha 32) on a 4-bit nf4 base with double quant")
            && text.contains("trainable parameters 77.8K of ")
            && text.contains("memory per GPU"),
        "{text}"
    );
    // 8-bit is refused, naming 4-bit.
    let eight = run(&["--quant_method", "bnb", "--quant_bits", "8"]);
    assert_eq!(eight["ok"], false);
    let refusal = eight["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "quant_bits_8_unsupported")
        .unwrap_or_else(|| panic!("{eight}"));
    assert_eq!(refusal["field"], "quant_bits");
    assert!(refusal["fix"].as_str().unwrap().contains("--quant_bits 4"));
}

/// `whet dataset preview` on the demo, as the server runs it: flags after `--config` win, and
/// `--json` is recognised among them.
#[test]
fn dataset_preview_renders_the_demo_rows_with_their_trained_tokens() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let output = whet()
        .current_dir(&root)
        .args(["dataset", "preview", "--config", "examples/demo.yaml"])
        .args(["--max_length", "40", "--json", "--rows", "3"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let preview: whet_shared::preview::DatasetPreview =
        serde_json::from_slice(&output.stdout).expect("a DatasetPreview");
    assert_eq!((preview.rows.len(), preview.max_length), (3, 40));
    assert!(preview.lengths.over_max_length > 0);
    assert!(preview.rows[0].tokens.iter().any(|t| t.trained));

    // For a person: the trained text between ⟦ ⟧ when not on a terminal.
    let output = whet()
        .current_dir(&root)
        .args([
            "dataset",
            "preview",
            "--config",
            "examples/demo.yaml",
            "--rows",
            "1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        text.contains("⟦<think>") && text.contains("<|im_end|>⟧"),
        "{text}"
    );

    // A missing dataset fails with its name; --rows 0 is a usage error.
    let output = whet()
        .current_dir(&root)
        .args(["dataset", "preview", "--config", "examples/demo.yaml"])
        .args(["--dataset", "no/such.jsonl"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no/such.jsonl"));
    let output = whet()
        .args(["dataset", "preview", "--rows", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}
