//! `whet sft` end to end, driving the real binary on the tiny fixture model (copied into a
//! temporary folder) and a small synthetic chat dataset: the output layout and its keys,
//! checkpoint rotation, a SIGKILL followed by an exact resume, a non-finite loss, validation
//! errors, and `--help`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

#[path = "../../tests/src/prerequisites.rs"]
mod prerequisites;

#[path = "common/checkpoints.rs"]
mod checkpoints;
#[path = "common/fixtures.rs"]
mod common_fixtures;
use checkpoints::{assert_same_final_state, safetensors_parts};

fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/hf-reference");
    assert!(
        dir.join("config.json").exists(),
        "HF reference fixtures not found at {} (expected the shared/ folder beside the repository root)",
        dir.display()
    );
    dir
}

/// A fresh temporary folder holding a copy of the tiny model and a 24-row dataset.
struct Workspace {
    root: PathBuf,
}

impl Workspace {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("whet-sft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let model = root.join("model");
        std::fs::create_dir_all(&model).unwrap();
        for file in [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(fixtures().join(file), model.join(file)).unwrap();
        }
        // Synthetic arithmetic chats with a think block, plus the fixture batch's three rows.
        let mut lines = Vec::new();
        for i in 0..21u32 {
            let (a, b) = (i + 3, (i * 7) % 10 + 2);
            let row = serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {a} x {b}?")},
                {"role": "assistant", "content": format!("{a} x {b} = {}.", a * b),
                 "reasoning_content": format!("{a} times {b} is {}.", a * b)}
            ]});
            lines.push(row.to_string());
        }
        let batch: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join("batch.json")).unwrap())
                .unwrap();
        for messages in batch["messages"].as_array().unwrap() {
            lines.push(serde_json::json!({ "messages": messages }).to_string());
        }
        std::fs::write(root.join("data.jsonl"), lines.join("\n") + "\n").unwrap();
        Self { root }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    /// The flags every run here shares, writing under `out`.
    fn flags(&self, out: &str) -> Vec<String> {
        [
            "--model",
            &self.path("model"),
            "--dataset",
            &self.path("data.jsonl"),
            "--tuner_type",
            "full",
            "--output_dir",
            &self.path(out),
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--warmup_ratio",
            "0.1",
            "--logging_steps",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The single versioned run folder under `out`.
    fn run_dir(&self, out: &str) -> PathBuf {
        let dirs: Vec<PathBuf> = std::fs::read_dir(self.root.join(out))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs[0].clone()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn whet(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("sft")
        .args(args)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("NPROC_PER_NODE")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap()
}

fn with(mut flags: Vec<String>, more: &[&str]) -> Vec<String> {
    flags.extend(more.iter().map(|s| s.to_string()));
    flags
}

fn jsonl(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The keys of each line in file order (serde_json's Map sorts, so read the raw text).
fn key_order(line: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 0;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            '"' => {
                let start = i + 1;
                let mut end = start;
                while let Some((j, c)) = chars.next() {
                    if c == '\\' {
                        chars.next();
                    } else if c == '"' {
                        end = j;
                        break;
                    }
                }
                let after = line[end + 1..].trim_start();
                if depth == 1 && after.starts_with(':') {
                    keys.push(line[start..end].to_string());
                }
            }
            _ => {}
        }
    }
    keys
}

fn check_ok(output: &Output) {
    assert!(
        output.status.success(),
        "whet sft failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn help_works() {
    let output = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(["sft", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("--config FILE") && text.contains("Exit codes"),
        "{text}"
    );
}

#[test]
fn validation_errors_exit_1_before_any_work() {
    let ws = Workspace::new("invalid");
    let output = whet(&with(
        ws.flags("out"),
        &["--per_device_train_batch_size", "0"],
    ));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("per_device_train_batch_size") && stderr.contains("fix:"),
        "{stderr}"
    );
    assert!(
        !ws.root.join("out").exists(),
        "no output before validation passes"
    );

    // NPROC_PER_NODE from the environment is checked against CUDA_VISIBLE_DEVICES.
    let output = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("sft")
        .args(ws.flags("out"))
        .env("CUDA_VISIBLE_DEVICES", "0,1")
        .env("NPROC_PER_NODE", "3")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nproc_device_mismatch"));
    assert!(!ws.root.join("out").exists());

    // GPUs named to this build (no CUDA) are refused before any work, not trained on the CPU.
    let output = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("sft")
        .args(ws.flags("out"))
        .env("CUDA_VISIBLE_DEVICES", "0,1")
        .env("NPROC_PER_NODE", "2")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cuda_unavailable"), "{stderr}");
    assert!(!ws.root.join("out").exists());
}

#[test]
fn outputs_have_ms_swift_layout_and_keys_and_rotation_keeps_best_and_newest() {
    let ws = Workspace::new("outputs");
    // Best = highest eval loss (greater_is_better), i.e. the first evaluation, so rotation has
    // to keep an old checkpoint beside the newest.
    let output = whet(&with(
        ws.flags("out"),
        &[
            "--max_steps",
            "8",
            "--save_steps",
            "2",
            "--save_total_limit",
            "2",
            "--split_dataset_ratio",
            "0.125",
            "--greater_is_better",
            "true",
        ],
    ));
    check_ok(&output);
    let run = ws.run_dir("out");
    let name = run.file_name().unwrap().to_string_lossy().to_string();

    // TensorBoard event file with transformers' tags, and ms-swift's images/.
    let events: Vec<_> = std::fs::read_dir(run.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let scalars = whet_engine::tensorboard::read_scalars(&events[0]).unwrap();
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/token_acc",
        "eval/loss",
        "eval/token_acc",
    ] {
        assert!(
            scalars.get(tag).is_some_and(|points| !points.is_empty()),
            "{tag}: {:?}",
            scalars.keys()
        );
    }
    for image in ["train_loss.png", "train_learning_rate.png", "eval_loss.png"] {
        assert!(run.join("images").join(image).is_file(), "{image}");
    }
    assert!(
        name.starts_with("v0-") && name.len() == "v0-20240101-120000".len(),
        "{name}"
    );
    for file in [
        "args.json",
        "logging.jsonl",
        "trainer_state.json",
        "val_dataset.jsonl",
    ] {
        assert!(run.join(file).exists(), "{file}");
    }

    // logging.jsonl: train lines, eval lines, the end-of-train line, the summary line.
    let text = std::fs::read_to_string(run.join("logging.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let train_keys = [
        "loss",
        "grad_norm",
        "learning_rate",
        "token_acc",
        "epoch",
        "global_step/max_steps",
        "elapsed_time",
        "remaining_time",
        "train_speed(s/it)",
    ];
    let eval_keys = [
        "eval_loss",
        "eval_token_acc",
        "eval_exact_match",
        "eval_runtime",
        "eval_samples_per_second",
        "eval_steps_per_second",
        "epoch",
        "global_step/max_steps",
        "elapsed_time",
        "remaining_time",
        "train_speed(s/it)",
    ];
    let train_lines: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("{\"loss\""))
        .collect();
    let eval_lines: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("{\"eval_loss\""))
        .collect();
    assert_eq!(train_lines.len(), 8);
    assert_eq!(eval_lines.len(), 4);
    for line in &train_lines {
        assert_eq!(key_order(line), train_keys);
    }
    for line in &eval_lines {
        assert_eq!(key_order(line), eval_keys);
    }
    let records = jsonl(&run.join("logging.jsonl"));
    assert_eq!(records[0]["global_step/max_steps"], "1/8");
    assert!(records[0]["remaining_time"]
        .as_str()
        .unwrap()
        .ends_with('s'));
    let end = &lines[lines.len() - 2];
    assert_eq!(
        key_order(end)[..6],
        [
            "train_runtime",
            "train_samples_per_second",
            "train_steps_per_second",
            "total_flos",
            "train_loss",
            "epoch"
        ]
    );
    let summary = &records[records.len() - 1];
    for key in [
        "model_parameter_info",
        "train_dataset",
        "val_dataset",
        "last_model_checkpoint",
        "best_model_checkpoint",
        "best_metric",
        "global_step",
        "log_history",
    ] {
        assert!(summary.contains_key(key), "summary lacks {key}");
    }
    // Floats are rounded to 8 decimals.
    let loss = records[0]["loss"].as_f64().unwrap();
    assert_eq!((loss * 1e8).round() / 1e8, loss);

    // trainer_state.json: transformers' keys, sorted, every history entry with a step.
    let state_text = std::fs::read_to_string(run.join("trainer_state.json")).unwrap();
    let state_keys: Vec<String> = key_order(&state_text.replace('\n', " "));
    let expected_state_keys = [
        "best_global_step",
        "best_metric",
        "best_model_checkpoint",
        "epoch",
        "eval_steps",
        "global_step",
        "is_hyper_param_search",
        "is_local_process_zero",
        "is_world_process_zero",
        "log_history",
        "logging_steps",
        "max_steps",
        "num_input_tokens_seen",
        "num_train_epochs",
        "save_steps",
        "stateful_callbacks",
        "total_flos",
        "train_batch_size",
        "trial_name",
        "trial_params",
    ];
    assert_eq!(state_keys, expected_state_keys);
    let state: Value = serde_json::from_str(&state_text).unwrap();
    assert_eq!(state["global_step"], 8);
    assert_eq!(state["best_global_step"], 2);
    let history = state["log_history"].as_array().unwrap();
    assert!(history.iter().all(|e| e.get("step").is_some()));
    assert!(history.iter().all(|e| e.get("elapsed_time").is_none()));

    // Rotation: save_total_limit 2 keeps the best (checkpoint-2) and the newest.
    let mut checkpoints: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("checkpoint"))
        .collect();
    checkpoints.sort();
    assert_eq!(checkpoints, ["checkpoint-2", "checkpoint-8"]);
    assert_eq!(
        state["best_model_checkpoint"],
        run.join("checkpoint-2").display().to_string()
    );
    let checkpoint = run.join("checkpoint-8");
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
        "args.json",
        "optimizer/optimizer.safetensors",
        "scheduler.json",
        "training_state.json",
    ] {
        assert!(checkpoint.join(file).exists(), "checkpoint lacks {file}");
    }
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["gradient_accumulation_steps"], 2);
    assert_eq!(args["output_dir"], run.display().to_string());
    assert_eq!(args["template"], "qwen3");
}

/// A checkpoint loads in transformers with every weight taken from its files (the reference
/// checker in ../shared/tools, run by the reference Python environment).
#[test]
fn checkpoint_loads_in_transformers() {
    let python = match prerequisites::reference_python() {
        Ok(python) => python,
        Err(why) => return prerequisites::skip("checkpoint_loads_in_transformers", &why),
    };
    let checker = fixtures().join("../../tools/check_checkpoint.py");
    let ws = Workspace::new("transformers");
    check_ok(&whet(&with(
        ws.flags("out"),
        &["--max_steps", "2", "--save_steps", "2"],
    )));
    let checkpoint = ws.run_dir("out").join("checkpoint-2");
    let output = Command::new(python)
        .arg(&checker)
        .arg(&checkpoint)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The numbers of a train line that must repeat exactly (times differ between runs).
fn train_numbers(run: &Path) -> Vec<(String, String)> {
    jsonl(&run.join("logging.jsonl"))
        .into_iter()
        .filter(|r| r.contains_key("loss") || r.contains_key("eval_loss"))
        .map(|r| {
            let step = r["global_step/max_steps"].as_str().unwrap().to_string();
            let numbers: Vec<String> = [
                "loss",
                "grad_norm",
                "learning_rate",
                "token_acc",
                "epoch",
                "eval_loss",
                "eval_token_acc",
            ]
            .iter()
            .filter_map(|k| r.get(*k).map(|v| format!("{k}={v}")))
            .collect();
            (step, numbers.join(" "))
        })
        .collect()
}

/// A run killed after its first checkpoint and resumed logs the same numbers as the
/// uninterrupted run and ends with the same bytes: weights, optimizer state, schedule, sampler.
#[test]
fn sigkill_after_a_checkpoint_then_resume_repeats_the_run_bit_for_bit() {
    let ws = Workspace::new("resume");
    // 23 train rows, batch 2 x accumulation 2 -> 6 steps per epoch; 40 steps cross several
    // epochs, so the resume must restore the sampler mid-epoch.
    let flags = with(
        ws.flags("full"),
        &[
            "--max_steps",
            "40",
            "--save_steps",
            "4",
            "--logging_steps",
            "3",
            "--split_dataset_ratio",
            "0.05",
        ],
    );
    check_ok(&whet(&flags));
    let full = train_numbers(&ws.run_dir("full"));
    assert!(full.len() > 20);

    // The same run, killed with SIGKILL as soon as it reports checkpoint-4 saved.
    let killed_flags: Vec<String> = flags
        .iter()
        .map(|f| {
            if f.ends_with("/full") {
                ws.path("killed")
            } else {
                f.clone()
            }
        })
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("sft")
        .args(&killed_flags)
        .env_remove("NPROC_PER_NODE")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Keep reading end open until the kill, so the child never sees a closed pipe.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("Saved ") {
            break; // the first save is checkpoint-4, renamed into place: complete
        }
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    drop(lines);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed by SIGKILL"
    );
    let killed_run = ws.run_dir("killed");
    let checkpoint = killed_run.join("checkpoint-4");
    assert!(checkpoint.join("training_state.json").exists());
    assert!(
        !killed_run.join("checkpoint-40").exists(),
        "the run finished before it was killed"
    );

    // Resume into a new run folder and compare every later train and eval line.
    let resumed_flags = with(
        killed_flags.clone(),
        &[
            "--resume_from_checkpoint",
            &checkpoint.display().to_string(),
        ],
    );
    check_ok(&whet(&resumed_flags));
    let runs: Vec<PathBuf> = std::fs::read_dir(ws.root.join("killed"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &killed_run)
        .collect();
    assert_eq!(runs.len(), 1);
    let resumed = train_numbers(&runs[0]);
    let full_after: Vec<(String, String)> = full
        .into_iter()
        .filter(|(step, _)| step.split('/').next().unwrap().parse::<u64>().unwrap() > 4)
        .collect();
    assert_eq!(resumed, full_after);
    assert_same_final_state(
        &ws.run_dir("full").join("checkpoint-40"),
        &runs[0].join("checkpoint-40"),
    );
}

#[test]
fn non_finite_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint() {
    let ws = Workspace::new("nan");
    // A learning rate of 1e30 blows the weights up in one step; step 2 is not finite.
    let output = whet(&with(
        ws.flags("out"),
        &[
            "--max_steps",
            "6",
            "--save_steps",
            "1",
            "--learning_rate",
            "1e30",
            "--warmup_ratio",
            "0",
        ],
    ));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("at step 2") && stderr.contains("checkpoint-1"),
        "{stderr}"
    );
    let run = ws.run_dir("out");
    assert!(run.join("checkpoint-1/model.safetensors").exists());
    assert!(run
        .join("checkpoint-1/optimizer/optimizer.safetensors")
        .exists());
    assert!(!run.join("checkpoint-2").exists() && !run.join(".checkpoint-2.tmp").exists());
}

/// `whet sft` on the fixture batch (3 samples, one micro-batch per step) with the fixture's
/// optimizer settings reproduces transformers' first three training steps: the loss, the
/// gradient norm before clipping and the learning rate, for the dense and the MoE model (the
/// latter with its router aux loss). With `--adapters` on the fixture's PEFT adapter, the first
/// step's loss and gradient norm are PEFT's.
#[test]
fn first_steps_match_transformers_on_the_fixtures() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let batch: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("batch.json")).unwrap())
            .unwrap();
    let adapter = fixtures().join("lora").display().to_string();
    let runs: [(&str, PathBuf, Vec<&str>); 3] = [
        ("dense", fixtures(), vec![]),
        ("moe", fixtures().join("moe"), vec![]),
        (
            "lora",
            fixtures(),
            vec!["--tuner_type", "lora", "--adapters", &adapter],
        ),
    ];
    for (name, folder, extra) in runs {
        let ws = Workspace::new(&format!("parity-{name}"));
        let model = ws.root.join(format!("{name}-model"));
        std::fs::create_dir_all(&model).unwrap();
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
            }
        }
        let rows: Vec<String> = batch["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| serde_json::json!({ "messages": m }).to_string())
            .collect();
        std::fs::write(ws.root.join("batch.jsonl"), rows.join("\n") + "\n").unwrap();
        let mut flags = ws.flags("out");
        flags[1] = model.display().to_string();
        flags[3] = ws.path("batch.jsonl");
        let flags = with(
            flags,
            &[
                "--template",
                "qwen3_thinking",
                "--per_device_train_batch_size",
                "3",
                "--gradient_accumulation_steps",
                "1",
                "--max_steps",
                "10",
                "--warmup_steps",
                "2",
                "--warmup_ratio",
                "0",
                "--adam_beta2",
                "0.999",
                "--weight_decay",
                "0.1",
                "--save_strategy",
                "no",
                "--router_aux_loss_coef",
                if name == "moe" { "0.001" } else { "0" },
            ],
        );
        check_ok(&whet(&with(flags, &extra)));
        let records = jsonl(&ws.run_dir("out").join("logging.jsonl"));
        if name == "lora" {
            // PEFT's norm is that of the fixture's LoRA gradients, taken before clipping.
            let grads = candle_core::safetensors::load(
                fixtures().join("expected/lora_grads.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let norm = grads
                .values()
                .map(|g| {
                    g.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64
                })
                .sum::<f64>()
                .sqrt();
            let first = &records[0];
            let loss = first["loss"].as_f64().unwrap();
            let want = expected["lora"]["loss"].as_f64().unwrap();
            assert!(
                (loss - want).abs() <= 1e-5 * want,
                "lora loss {loss} vs PEFT {want}"
            );
            let got = first["grad_norm"].as_f64().unwrap();
            assert!(
                (got - norm).abs() <= 1e-4 * norm,
                "lora grad_norm {got} vs PEFT {norm}"
            );
            continue;
        }
        let train = &expected[name]["train"];
        for step in 0..3 {
            let record = &records[step];
            let close = |key: &str, want: f64, tolerance: f64| {
                let got = record[key].as_f64().unwrap();
                assert!(
                    (got - want).abs() <= tolerance * want.abs().max(1e-3),
                    "{name} step {}: {key} {got} vs transformers {want}",
                    step + 1
                );
            };
            close("loss", train["loss"][step].as_f64().unwrap(), 1e-5);
            close(
                "grad_norm",
                train["grad_norm_before_clip"][step].as_f64().unwrap(),
                1e-4,
            );
            close("learning_rate", train["lr"][step].as_f64().unwrap(), 1e-9);
            if name == "moe" {
                close("aux_loss", train["aux_loss"][step].as_f64().unwrap(), 1e-5);
            } else {
                assert!(record.get("aux_loss").is_none());
            }
        }
    }
}

/// Nobody reading the output any more (a closed pipe) must not stop a run.
#[test]
fn a_closed_stdout_does_not_stop_training() {
    let ws = Workspace::new("closed-stdout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("sft")
        .args(with(
            ws.flags("out"),
            &["--max_steps", "3", "--save_steps", "3"],
        ))
        .env_remove("NPROC_PER_NODE")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    assert!(child.wait().unwrap().success());
    assert!(ws
        .run_dir("out")
        .join("checkpoint-3/model.safetensors")
        .exists());
}

/// `whet check --json`'s derived figures for `args`.
fn derived(args: &[String]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("check")
        .args(args)
        .arg("--json")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("NPROC_PER_NODE")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "whet check --json: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["derived"].clone()
}

/// What `whet check` counts is what `whet sft` does: for configs where the two used to
/// disagree, the checkpoints, eval lines and train log lines a run writes equal the derived
/// `num_saves`, `num_evals` and `num_logs` (both follow whet-shared's one plan of events).
#[test]
fn runs_write_the_saves_evals_and_logs_that_check_derives() {
    let ws = Workspace::new("events");
    // 24 rows, 6 held out: 18 train rows = 9 micro-batches of 2 = 5 steps of 2 per epoch.
    // (output folder, flags, expected (saves, evals, train logs))
    type Case<'a> = (&'a str, &'a [&'a str], (u64, u64, u64));
    let cases: [Case; 3] = [
        // Epoch saves, step evals, a fractional last epoch: 8 steps.
        (
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
        // max_steps across an epoch boundary, epoch evals, step saves.
        (
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
        // eval_steps unset follows save_steps.
        (
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
        let flags = with(
            with(ws.flags(out), &["--split_dataset_ratio", "0.25"]),
            extra,
        );
        let d = derived(&flags);
        let count = |key: &str| d[key].as_u64().unwrap_or_else(|| panic!("{key}: {d}"));
        let predicted = (count("num_saves"), count("num_evals"), count("num_logs"));
        assert_eq!(predicted, expected, "case {out}: whet check");
        check_ok(&whet(&flags));
        let run = ws.run_dir(out);
        let checkpoints = std::fs::read_dir(&run)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("checkpoint-")
            })
            .count() as u64;
        let lines = jsonl(&run.join("logging.jsonl"));
        let evals = lines.iter().filter(|l| l.contains_key("eval_loss")).count() as u64;
        let logs = lines.iter().filter(|l| l.contains_key("grad_norm")).count() as u64;
        assert_eq!(
            (checkpoints, evals, logs),
            predicted,
            "case {out}: whet sft"
        );
    }
}

/// Under an epoch save strategy with save_steps 0, an unset eval_steps used to count as no
/// evaluation in `whet check` and as one every step in `whet sft`; now both refuse it.
#[test]
fn an_eval_interval_of_zero_is_refused_by_check_and_sft_alike() {
    let ws = Workspace::new("zero-interval");
    let flags = with(
        ws.flags("out"),
        &[
            "--split_dataset_ratio",
            "0.25",
            "--save_strategy",
            "epoch",
            "--save_steps",
            "0",
            "--eval_strategy",
            "steps",
        ],
    );
    let d = derived(&flags);
    assert_eq!(d["eval_steps"], Value::from(0), "{d}");
    let out = whet(&flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("eval_steps_missing"), "{stderr}");
    assert!(!ws.root.join("out").exists(), "sft did no work");
    let check = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("check")
        .args(&flags)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    let said = String::from_utf8_lossy(&check.stdout) + String::from_utf8_lossy(&check.stderr);
    assert!(said.contains("eval_steps_missing"), "{said}");
}

/// `--tuner_type lora` (ms-swift's defaults: rank 8, alpha 32, dropout 0.05, all-linear): only
/// the adapters train and the checkpoints are PEFT adapter folders (PEFT's key names, as the
/// fixture adapter has them) that PEFT loads onto the base with no missing or unexpected keys;
/// a resume from one repeats the run exactly, dropout masks included.
#[test]
fn lora_runs_write_peft_adapters_and_resume_exactly() {
    let ws = Workspace::new("lora");
    let lora = |out: &str, more: &[&str]| {
        with(
            with(
                ws.flags(out),
                &[
                    "--tuner_type",
                    "lora",
                    "--learning_rate",
                    "1e-2",
                    "--max_steps",
                    "4",
                    "--save_steps",
                    "2",
                ],
            ),
            more,
        )
    };
    check_ok(&whet(&lora("straight", &[])));
    let run = ws.run_dir("straight");
    let checkpoint = run.join("checkpoint-4");
    assert!(checkpoint.join("adapter_config.json").exists());
    assert!(
        !checkpoint.join("model.safetensors").exists(),
        "the base is not saved again"
    );
    let keys = |path: &Path| -> Vec<String> {
        let bytes = std::fs::read(path).unwrap();
        let (header, _) = safetensors_parts(&bytes);
        let mut keys: Vec<String> = header
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&checkpoint.join("adapter_model.safetensors")),
        keys(&fixtures().join("lora/adapter_model.safetensors")),
        "all-linear adapts the modules PEFT's fixture adapter does, under PEFT's names"
    );
    let lines = jsonl(&run.join("logging.jsonl"));
    let losses: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.get("loss")?.as_f64())
        .collect();
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "{losses:?}"
    );
    let info = lines.last().unwrap()["model_parameter_info"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(info.contains("0.0164M Trainable"), "{info}");

    // Resumed from checkpoint-2: the same adapter at step 4, bit for bit.
    let resume_from = run.join("checkpoint-2").display().to_string();
    check_ok(&whet(&lora(
        "resumed",
        &["--resume_from_checkpoint", &resume_from],
    )));
    let resumed = ws.run_dir("resumed").join("checkpoint-4");
    let tensors = |dir: &Path| {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        safetensors_parts(&bytes).1.to_vec()
    };
    assert_eq!(tensors(&resumed), tensors(&checkpoint));

    // rsLoRA, a target regex and lm_head trained in full: PEFT still loads what whet writes.
    check_ok(&whet(&lora(
        "saved",
        &[
            "--max_steps",
            "2",
            "--use_rslora",
            "true",
            "--target_regex",
            r".*\.(q_proj|up_proj)",
            "--modules_to_save",
            "lm_head",
        ],
    )));
    let saved = ws.run_dir("saved").join("checkpoint-2");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["modules_to_save"], serde_json::json!(["lm_head"]));
    assert_eq!(config["use_rslora"], Value::Bool(true));
    assert!(keys(&saved.join("adapter_model.safetensors"))
        .contains(&"base_model.model.lm_head.weight".to_string()));

    match prerequisites::reference_python() {
        Ok(python) => {
            let output = Command::new(&python)
                .arg(fixtures().join("../../tools/check_checkpoint.py"))
                .arg("--adapter")
                .arg(&checkpoint)
                .arg("--base")
                .arg(ws.root.join("model"))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            for adapter in [&checkpoint, &saved] {
                peft_gives_whets_logits(&python, &ws, adapter);
            }
        }
        Err(why) => prerequisites::skip("lora_runs_write_peft_adapters_and_resume_exactly", &why),
    }
}

/// `PeftModel.from_pretrained(base, adapter)` loads `adapter` under PEFT's own key names and
/// computes the logits whet computes from it (the loading `whet infer --adapters` does).
fn peft_gives_whets_logits(python: &Path, ws: &Workspace, adapter: &Path) {
    use whet_engine::model::{adapter as peft, ModelOptions, Trainable};
    let options = ModelOptions {
        trainable: Trainable::Nothing,
        ..ModelOptions::default()
    };
    let model =
        peft::from_pretrained_with_adapter(&ws.root.join("model"), adapter, options).unwrap();
    let batch = common_fixtures::load_batch();
    let logits = model
        .forward(&batch.input_ids, &batch.attention_mask)
        .unwrap()
        .logits;
    let file = adapter.with_extension("logits.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("logits".to_string(), logits)]),
        &file,
    )
    .unwrap();
    let output = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/peft_adapter.py"
        ))
        .arg("check")
        .arg(ws.root.join("model"))
        .arg(fixtures().join("batch.json"))
        .arg(adapter)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}: {}\n{}",
        adapter.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A LoRA run's last checkpoint exported with `whet export` (the base found from its args.json,
/// no `--model`) answers a greedy query exactly as the base with the adapter applied does.
#[test]
fn a_lora_checkpoint_exports_to_a_model_that_answers_as_base_and_adapter_do() {
    let ws = Workspace::new("export");
    check_ok(&whet(&with(
        ws.flags("out"),
        &[
            "--tuner_type",
            "lora",
            "--lora_dropout",
            "0",
            // Enough to change the answer, not so much that it is empty.
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "4",
            "--save_steps",
            "4",
        ],
    )));
    let checkpoint = ws.run_dir("out").join("checkpoint-4");
    let merged = ws.root.join("merged");
    let export = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("export")
        .arg("--adapters")
        .arg(&checkpoint)
        .args(["--merge_lora", "true", "--output_dir"])
        .arg(&merged)
        .output()
        .unwrap();
    check_ok(&export);
    let said = String::from_utf8_lossy(&export.stderr);
    assert!(
        said.contains("args.json"),
        "the base comes from args.json: {said}"
    );
    assert!(
        merged.join("args.json").is_file(),
        "the run's settings travel along"
    );

    let infer = |model: &Path, adapters: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_whet"));
        command
            .args([
                "infer",
                "--query",
                "What is 7 x 4?",
                "--max_new_tokens",
                "24",
            ])
            .arg("--model")
            .arg(model);
        if let Some(adapters) = adapters {
            command.arg("--adapters").arg(adapters);
        }
        let output = command.output().unwrap();
        check_ok(&output);
        String::from_utf8(output.stdout).unwrap()
    };
    let base = ws.root.join("model");
    let from_merged = infer(&merged, None);
    assert_eq!(from_merged, infer(&base, Some(&checkpoint)));
    assert_ne!(
        from_merged,
        infer(&base, None),
        "the adapter changed the answer"
    );
    assert!(
        from_merged.len() > "<think>\n\n</think>\n\n\n".len(),
        "{from_merged:?}"
    );
}

#[test]
fn qlora_runs_train_adapters_over_a_4_bit_base_and_resume_exactly() {
    let ws = Workspace::new("qlora");
    let qlora = |out: &str, tuner: &[&str], more: &[&str]| {
        let flags = with(ws.flags(out), tuner);
        let flags = with(
            flags,
            &[
                "--lora_dropout",
                "0",
                "--learning_rate",
                "1e-2",
                "--max_steps",
                "4",
                "--save_steps",
                "2",
            ],
        );
        with(flags, more)
    };
    // What is not implemented is refused before any work, naming the field.
    for (flags, field) in [
        (
            &[
                "--tuner_type",
                "lora",
                "--quant_method",
                "bnb",
                "--quant_bits",
                "8",
            ][..],
            "quant_bits",
        ),
        (
            &[
                "--tuner_type",
                "lora",
                "--quant_method",
                "hqq",
                "--quant_bits",
                "4",
            ][..],
            "quant_method",
        ),
        (
            &["--tuner_type", "qlora", "--bnb_4bit_quant_type", "int4"][..],
            "bnb_4bit_quant_type",
        ),
    ] {
        let refused = whet(&qlora("refused", flags, &[]));
        assert_eq!(refused.status.code(), Some(1), "{flags:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(field), "{flags:?}: {stderr}");
        assert!(
            !ws.root.join("refused").exists(),
            "{flags:?}: no run folder"
        );
    }

    check_ok(&whet(&qlora("straight", &["--tuner_type", "qlora"], &[])));
    let run = ws.run_dir("straight");
    let checkpoint = run.join("checkpoint-4");
    assert!(checkpoint.join("adapter_config.json").exists());
    assert!(!checkpoint.join("model.safetensors").exists());
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    let losses: Vec<f64> = jsonl(&run.join("logging.jsonl"))
        .iter()
        .filter_map(|l| l.get("loss")?.as_f64())
        .collect();
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "{losses:?}"
    );
    let tensors = |dir: &Path| {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        safetensors_parts(&bytes).1.to_vec()
    };

    // Resumed from checkpoint-2: the base is quantized again, to the same bytes, so the
    // adapter at step 4 is the same bit for bit.
    let resume_from = run.join("checkpoint-2").display().to_string();
    check_ok(&whet(&qlora(
        "resumed",
        &["--tuner_type", "qlora"],
        &["--resume_from_checkpoint", &resume_from],
    )));
    assert_eq!(
        tensors(&ws.run_dir("resumed").join("checkpoint-4")),
        tensors(&checkpoint)
    );

    // ms-swift's spelling of the same job trains the same adapter; FP4 without double
    // quantization is another base, so another adapter.
    let swift = [
        "--tuner_type",
        "lora",
        "--quant_method",
        "bnb",
        "--quant_bits",
        "4",
    ];
    check_ok(&whet(&qlora(
        "swift",
        &swift,
        &[
            "--bnb_4bit_quant_type",
            "nf4",
            "--bnb_4bit_use_double_quant",
            "true",
        ],
    )));
    assert_eq!(
        tensors(&ws.run_dir("swift").join("checkpoint-4")),
        tensors(&checkpoint)
    );
    check_ok(&whet(&qlora(
        "fp4",
        &swift,
        &[
            "--bnb_4bit_quant_type",
            "fp4",
            "--bnb_4bit_use_double_quant",
            "false",
        ],
    )));
    assert_ne!(
        tensors(&ws.run_dir("fp4").join("checkpoint-4")),
        tensors(&checkpoint)
    );
}

/// The built-in demo (a weightless tiny Qwen3, its base made from the seed, learning
/// arithmetic) as a short QLoRA run with ms-swift's dropout: the loss falls, and a resume from
/// its checkpoint — the random base made again, quantized again — repeats it bit for bit.
#[test]
fn qlora_lowers_the_demos_loss_and_resumes_over_its_random_base() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("whet-sft-qlora-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = |name: &str, more: &[&str]| -> PathBuf {
        let output = Command::new(env!("CARGO_BIN_EXE_whet"))
            .current_dir(&root)
            .args([
                "sft",
                "--config",
                "examples/demo.yaml",
                "--tuner_type",
                "qlora",
            ])
            .args(["--learning_rate", "1e-2", "--warmup_ratio", "0"])
            .args(["--max_steps", "8", "--per_device_train_batch_size", "16"])
            .args(["--logging_steps", "1", "--eval_strategy", "no"])
            .args(["--save_strategy", "steps", "--save_steps", "4"])
            .args(more)
            .arg("--output_dir")
            .arg(out.join(name))
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("NPROC_PER_NODE")
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap();
        check_ok(&output);
        std::fs::read_dir(out.join(name))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    };
    let straight = run("straight", &[]);
    let losses: Vec<f64> = jsonl(&straight.join("logging.jsonl"))
        .iter()
        .filter_map(|l| l.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 8, "{losses:?}");
    assert!(
        losses[7] < losses[0] - 0.3,
        "the loss does not fall: {losses:?}"
    );
    let from = straight.join("checkpoint-4").display().to_string();
    let resumed = run("resumed", &["--resume_from_checkpoint", &from]);
    let adapter =
        |run: &Path| std::fs::read(run.join("checkpoint-8/adapter_model.safetensors")).unwrap();
    assert!(
        adapter(&resumed) == adapter(&straight),
        "the resumed run differs"
    );
    let _ = std::fs::remove_dir_all(&out);
}
