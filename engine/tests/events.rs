//! What `whet check` counts is what `whet sft` does: for configs where the two used to disagree,
//! the checkpoints, eval lines and train log lines a real run writes equal the derived
//! `num_saves`, `num_evals` and `num_logs` (both come from whet-shared's one plan of events).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/hf-reference")
}

/// A temporary folder with a copy of the tiny fixture model and 24 chat rows.
struct Workspace {
    root: PathBuf,
}

impl Workspace {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("whet-events-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let model = root.join("model");
        std::fs::create_dir_all(&model).unwrap();
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(fixtures().join(file), model.join(file)).unwrap();
        }
        let lines: Vec<String> = (0..24u32)
            .map(|i| {
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("What is {i} + {i}?")},
                    {"role": "assistant", "content": format!("{}", 2 * i)}
                ]})
                .to_string()
            })
            .collect();
        std::fs::write(root.join("data.jsonl"), lines.join("\n") + "\n").unwrap();
        Self { root }
    }

    fn flags(&self, out: &str, extra: &[&str]) -> Vec<String> {
        let path = |p: &str| self.root.join(p).display().to_string();
        let mut flags: Vec<String> = [
            "--model",
            &path("model"),
            "--dataset",
            &path("data.jsonl"),
            "--output_dir",
            &path(out),
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--split_dataset_ratio",
            "0.25",
            "--tuner_type",
            "full",
            "--learning_rate",
            "1e-4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn whet(subcommand: &str, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg(subcommand)
        .args(args)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("NPROC_PER_NODE")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap()
}

fn derived(args: &[String]) -> Value {
    let mut with_json = vec!["--json".to_string()];
    with_json.extend_from_slice(args);
    let out = whet("check", &with_json);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "whet check --json: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["derived"].clone()
}

/// (checkpoints, eval lines, train log lines) of the single run under `out`.
fn written(out: &Path) -> (u64, u64, u64) {
    let runs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    let checkpoints = std::fs::read_dir(run)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("checkpoint-")
        })
        .count() as u64;
    let log = std::fs::read_to_string(run.join("logging.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals = lines
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .count() as u64;
    let logs = lines
        .iter()
        .filter(|l| l.get("grad_norm").is_some())
        .count() as u64;
    (checkpoints, evals, logs)
}

#[test]
fn runs_write_the_saves_evals_and_logs_that_check_derives() {
    let ws = Workspace::new("counts");
    // 24 rows, 6 held out: 18 train rows = 9 micro-batches = 5 steps per epoch.
    let cases: [(&str, &[&str], (u64, u64, u64)); 3] = [
        (
            // Epoch saves, step evals, a fractional last epoch: 8 steps.
            "a",
            &[
                "--save_strategy",
                "epoch",
                "--eval_strategy",
                "steps",
                "--eval_steps",
                "3",
                "--num_train_epochs",
                "1.5",
                "--logging_steps",
                "2",
            ],
            (2, 3, 5),
        ),
        (
            // max_steps across an epoch boundary, epoch evals, step saves.
            "b",
            &[
                "--max_steps",
                "7",
                "--save_steps",
                "3",
                "--eval_strategy",
                "epoch",
                "--logging_steps",
                "3",
            ],
            (3, 2, 3),
        ),
        (
            // eval_steps unset follows save_steps.
            "c",
            &[
                "--max_steps",
                "5",
                "--save_steps",
                "2",
                "--eval_strategy",
                "steps",
                "--logging_steps",
                "5",
            ],
            (3, 3, 2),
        ),
    ];
    for (out, extra, expected) in cases {
        let flags = ws.flags(out, extra);
        let d = derived(&flags);
        let counts = |key: &str| d[key].as_u64().unwrap_or_else(|| panic!("{key}: {d}"));
        let predicted = (counts("num_saves"), counts("num_evals"), counts("num_logs"));
        assert_eq!(predicted, expected, "case {out}: whet check");
        let run = whet("sft", &flags);
        assert!(
            run.status.success(),
            "case {out}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert_eq!(
            written(&ws.root.join(out)),
            predicted,
            "case {out}: whet sft"
        );
    }
}

/// Under an epoch save strategy with save_steps 0, an unset eval_steps used to count as no
/// evaluation in `whet check` and as one every step in `whet sft`; now both refuse it.
#[test]
fn an_eval_interval_of_zero_is_refused_by_check_and_sft_alike() {
    let ws = Workspace::new("zero");
    let flags = ws.flags(
        "out",
        &[
            "--save_strategy",
            "epoch",
            "--save_steps",
            "0",
            "--eval_strategy",
            "steps",
        ],
    );
    for subcommand in ["check", "sft"] {
        let out = whet(subcommand, &flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{subcommand}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stderr.contains("eval_steps_missing") || stdout.contains("eval_steps_missing"),
            "{subcommand}: {stdout}{stderr}"
        );
    }
    assert!(!ws.root.join("out").exists(), "sft did no work");
}
