//! Multi-process training on the CPU, through the real binary and gloo: one process with batch 4
//! against 2 ranks × batch 2 and 4 ranks × batch 1, for every sharding stage (zero0–zero3, the
//! offload variants, a DeepSpeed JSON file), dense and MoE, with
//! and without gradient checkpointing — the same losses, gradient norms and final weights — and
//! sharded checkpoints that resume exactly.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[path = "common/checkpoints.rs"]
mod checkpoints;
#[path = "common/fixtures.rs"]
mod common_fixtures;
use checkpoints::{assert_same_final_state, safetensors_parts};
use common_fixtures::fixtures;

const STEPS: usize = 5;

/// A temporary folder with 20 chats of different lengths (so ranks pad differently).
struct Workspace {
    root: PathBuf,
}

impl Workspace {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("whet-dist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let lines: Vec<String> = (0..20u32)
            .map(|i| {
                let (a, b) = (i * 13 + 2, (i * 7) % 10 + 2);
                let words = "and then some more words ".repeat((i % 4) as usize);
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("What is {a} x {b}? {words}")},
                    {"role": "assistant", "content": format!("{a} x {b} = {}.", a * b),
                     "reasoning_content": format!("{a} times {b} is {}.", a * b)}
                ]})
                .to_string()
            })
            .collect();
        std::fs::write(root.join("data.jsonl"), lines.join("\n") + "\n").unwrap();
        Self { root }
    }

    /// The flags of a 5-step run of `model` writing under `out`, `per_device` samples per rank.
    fn flags(&self, model: &Path, out: &str, per_device: usize) -> Vec<String> {
        let mut flags: Vec<String> = [
            "--model",
            &model.display().to_string(),
            "--dataset",
            &self.root.join("data.jsonl").display().to_string(),
            "--template",
            "qwen3_thinking",
            "--tuner_type",
            "full",
            "--torch_dtype",
            "float32",
            "--output_dir",
            &self.root.join(out).display().to_string(),
            "--per_device_train_batch_size",
            &per_device.to_string(),
            "--gradient_accumulation_steps",
            "1",
            "--max_steps",
            &STEPS.to_string(),
            "--learning_rate",
            "1e-3",
            "--warmup_steps",
            "1",
            "--weight_decay",
            "0.1",
            "--max_grad_norm",
            "1.0",
            "--logging_steps",
            "1",
            "--eval_strategy",
            "no",
            "--save_steps",
            &STEPS.to_string(),
            "--report_to",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // The MoE aux loss is a function of each device batch's routing (as in transformers), so
        // it differs between 1 x 4 and 2 x 2 by construction; without it the runs must agree.
        flags.push("--router_aux_loss_coef".into());
        flags.push("0".into());
        flags
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `whet sft flags` with `nproc` ranks (whet as the launcher when more than one).
fn whet(flags: &[String], nproc: usize) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_whet"));
    command.arg("sft").args(flags);
    if nproc > 1 {
        command
            .arg("--nproc_per_node")
            .arg(nproc.to_string())
            .arg("--master_port")
            .arg(free_port().to_string());
    }
    for var in whet_store::LAUNCHER_VARS
        .into_iter()
        .chain(["NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES"])
    {
        command.env_remove(var);
    }
    command.output().unwrap()
}

fn check_ok(output: &Output) {
    assert!(
        output.status.success(),
        "whet sft failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// (loss, grad_norm) of every logged training step.
fn train_records(run: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(run.join("logging.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some() && r.get("grad_norm").is_some())
        .map(|r| {
            (
                r["loss"].as_f64().unwrap(),
                r["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The f32 tensors of a checkpoint's model.safetensors.
fn weights(checkpoint: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    let (header, data) = safetensors_parts(&bytes);
    let mut out = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(info["dtype"], "F32", "{name}");
        let offsets = info["data_offsets"].as_array().unwrap();
        let (start, end) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        let values = data[start..end]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        out.insert(name.clone(), values);
    }
    out
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-6)
}

/// The run under `got` took the same steps as the run under `expected` and ended with the
/// same weights (1e-5 relative).
fn assert_equivalent(what: &str, expected: &Path, got: &Path) {
    let (want, have) = (train_records(expected), train_records(got));
    assert_eq!(want.len(), STEPS, "{what}: {want:?}");
    assert_eq!(have.len(), STEPS, "{what}: {have:?}");
    for (step, ((loss, norm), (got_loss, got_norm))) in want.iter().zip(&have).enumerate() {
        assert!(
            close(*loss, *got_loss, 1e-5) && close(*norm, *got_norm, 1e-5),
            "{what}, step {}: loss {got_loss} vs {loss}, grad_norm {got_norm} vs {norm}",
            step + 1
        );
    }
    let checkpoint = format!("checkpoint-{STEPS}");
    let (want, have) = (
        weights(&expected.join(&checkpoint)),
        weights(&got.join(&checkpoint)),
    );
    assert_eq!(want.len(), have.len(), "{what}");
    for (name, values) in &want {
        let got = &have[name];
        let scale = values.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let worst = values
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "{what}: {name} differs by {worst:e} of its scale"
        );
    }
}

/// For one model and switch set: one process with batch 4, then every stage with 2 × 2 and
/// 4 × 1.
fn stages_match_one_process(name: &str, model: &Path, extra: &[&str]) {
    let ws = Workspace::new(name);
    let with = |mut flags: Vec<String>, more: &[&str]| {
        flags.extend(extra.iter().chain(more).map(|s| s.to_string()));
        flags
    };
    check_ok(&whet(&with(ws.flags(model, "single", 4), &[]), 1));
    let single = ws.run_dir("single");
    // A DeepSpeed JSON as ms-swift's zero3_offload.json, with buckets small enough that a layer
    // takes several.
    let json = ws.root.join("ds_zero3.json");
    std::fs::write(
        &json,
        r#"{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "cpu"}, "reduce_bucket_size": 1000}}"#,
    )
    .unwrap();
    let json = json.display().to_string();
    let stages = [
        "zero0",
        "zero1",
        "zero2",
        "zero2_offload",
        "zero3",
        "zero3_offload",
        &json,
    ];
    for (s, stage) in stages.into_iter().enumerate() {
        for (nproc, per_device) in [(2, 2), (4, 1)] {
            if stage.ends_with("_offload") && nproc == 4 {
                continue; // on the CPU the same as without; once is enough
            }
            let out = format!("stage{s}-{nproc}");
            let flags = with(ws.flags(model, &out, per_device), &["--deepspeed", stage]);
            check_ok(&whet(&flags, nproc));
            let run = ws.run_dir(&out);
            let what = format!("{name}: {stage}, {nproc} ranks x batch {per_device}");
            assert_equivalent(&what, &single, &run);
            let shards: Vec<String> = (0..nproc)
                .map(|rank| format!("optimizer_rank{rank}_of_{nproc}.safetensors"))
                .collect();
            let optimizer = run.join(format!("checkpoint-{STEPS}/optimizer"));
            for shard in &shards {
                assert!(optimizer.join(shard).is_file(), "{what}: no {shard}");
            }
        }
    }
}

#[test]
fn dense_ranks_match_one_process_at_every_stage() {
    stages_match_one_process("dense", &fixtures(), &[]);
}

#[test]
fn gradient_checkpointed_ranks_match_one_process_at_every_stage() {
    stages_match_one_process("gc", &fixtures(), &["--gradient_checkpointing", "true"]);
}

#[test]
fn moe_ranks_match_one_process_at_every_stage() {
    stages_match_one_process("moe", &fixtures().join("moe"), &[]);
}

/// A rank that dies while checkpoint-4 is half written (rank 0's files in, its own shard not)
/// ends the job; checkpoint-2 stays whole and resumes.
#[test]
fn a_rank_dying_mid_save_leaves_the_last_complete_checkpoint() {
    let ws = Workspace::new("midsave");
    let mut flags = ws.flags(&fixtures(), "out", 2);
    flags.extend(["--deepspeed", "zero2", "--save_steps", "2"].map(String::from));
    let mut command = Command::new(env!("CARGO_BIN_EXE_whet"));
    command
        .arg("sft")
        .args(&flags)
        .args(["--nproc_per_node", "2", "--master_port"])
        .arg(free_port().to_string())
        .env("WHET_TEST_KILL_RANK_IN_SAVE", "1:4")
        .env_remove("NPROC_PER_NODE")
        .env_remove("WORLD_SIZE");
    let died = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&died.stderr);
    assert!(!died.status.success());
    assert!(stderr.contains("rank 1 exited with status 3"), "{stderr}");
    let run = ws.run_dir("out");
    assert!(run
        .join("checkpoint-2/optimizer/optimizer_rank1_of_2.safetensors")
        .is_file());
    assert!(
        !run.join("checkpoint-4").exists(),
        "no half checkpoint under the real name"
    );
    let mut resumed = ws.flags(&fixtures(), "resumed", 2);
    resumed.extend(
        [
            "--deepspeed",
            "zero2",
            "--resume_from_checkpoint",
            &run.join("checkpoint-2").display().to_string(),
        ]
        .map(String::from),
    );
    check_ok(&whet(&resumed, 2));
    assert_eq!(train_records(&ws.run_dir("resumed")).len(), STEPS - 2);
}

/// Optimizer state is sharded from zero1 on: each rank's file holds its part of the moments;
/// the parts cover the trainable elements once.
#[test]
fn sharded_checkpoints_resume_exactly_and_only_at_their_world_size() {
    let ws = Workspace::new("resume");
    let model = fixtures();
    let flags = |out: &str| {
        let mut flags = ws.flags(&model, out, 2);
        flags.extend(["--deepspeed", "zero3", "--save_steps", "2"].map(String::from));
        flags
    };
    check_ok(&whet(&flags("full"), 2));
    let full = ws.run_dir("full");

    let optimizer = full.join("checkpoint-2/optimizer");
    let elements: usize = (0..2)
        .map(|rank| {
            let bytes =
                std::fs::read(optimizer.join(format!("optimizer_rank{rank}_of_2.safetensors")))
                    .unwrap();
            let (header, _) = safetensors_parts(&bytes);
            let shape = header["exp_avg"]["shape"].as_array().unwrap().clone();
            shape[0].as_u64().unwrap() as usize
        })
        .sum();
    let total: usize = weights(&full.join("checkpoint-2"))
        .values()
        .map(Vec::len)
        .sum();
    assert_eq!(
        elements, total,
        "the shards cover every trainable element once"
    );

    // The resumed run ends with the uninterrupted run's bytes.
    let checkpoint = full.join("checkpoint-2").display().to_string();
    let mut resumed = flags("resumed");
    resumed.extend(["--resume_from_checkpoint".to_string(), checkpoint.clone()]);
    check_ok(&whet(&resumed, 2));
    let resumed_run = ws.run_dir("resumed");
    let steps = |run: &Path| train_records(run).len();
    assert_eq!(steps(&resumed_run), STEPS - 2);
    assert_eq!(
        train_records(&resumed_run),
        train_records(&full)[2..].to_vec()
    );
    assert_same_final_state(
        &full.join(format!("checkpoint-{STEPS}")),
        &resumed_run.join(format!("checkpoint-{STEPS}")),
    );

    // Another world size cannot take the optimizer shards, and says what to do.
    let mut four = ws.flags(&model, "four", 1);
    four.extend(
        [
            "--deepspeed",
            "zero3",
            "--resume_from_checkpoint",
            &checkpoint,
        ]
        .map(String::from),
    );
    let refused = whet(&four, 4);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("was saved by 2 ranks, this run has 4 ranks")
            && stderr.contains("--resume_only_model true"),
        "{stderr}"
    );

    // The weights alone resume with any world size.
    let mut one = ws.flags(&model, "one", 4);
    one.extend(
        [
            "--resume_from_checkpoint",
            &checkpoint,
            "--resume_only_model",
            "true",
        ]
        .map(String::from),
    );
    check_ok(&whet(&one, 1));
    assert_eq!(steps(&ws.run_dir("one")), STEPS - 2);
}

/// Each rank takes every world-th batch of the one sampler, the epoch's last ones completed
/// from its start (accelerate's even_batches): 20 samples over 3 ranks × batch 3 is 3 steps an
/// epoch, what `whet check` derives for that world size.
#[test]
fn steps_per_epoch_are_what_check_derives_for_the_world_size() {
    let ws = Workspace::new("epoch");
    let mut flags = ws.flags(&fixtures(), "out", 3);
    let at = flags.iter().position(|f| f == "--max_steps").unwrap();
    flags.drain(at..at + 2);
    flags.extend(["--num_train_epochs", "2", "--save_strategy", "no"].map(String::from));
    let mut check = Command::new(env!("CARGO_BIN_EXE_whet"));
    check
        .arg("check")
        .args(&flags)
        .args(["--nproc_per_node", "3", "--json"]);
    let checked = check.output().unwrap();
    let derived: Value = serde_json::from_slice(&checked.stdout).unwrap();
    let total = derived["derived"]["total_steps"].as_u64().unwrap() as usize;
    assert_eq!(derived["derived"]["steps_per_epoch"], 3, "{derived}");
    check_ok(&whet(&flags, 3));
    let run = ws.run_dir("out");
    assert_eq!(train_records(&run).len(), total);
    let logged: Vec<Value> = std::fs::read_to_string(run.join("logging.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last_step = logged
        .iter()
        .rev()
        .find_map(|r| r["global_step/max_steps"].as_str())
        .unwrap();
    assert_eq!(last_step, format!("{total}/{total}"));
}
