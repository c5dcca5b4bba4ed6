//! `whet bench train`: the training-step benchmark; prints one JSON line.

use std::process::ExitCode;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, Subcommand};
use whet_shared::config::{LaunchConfig, ZeroSettings, DEEPSPEED_PRESETS};
use whet_store::RankEnv;

use crate::bench::{run_train_bench, BenchDevice, BenchOptions, BenchSize, BenchTrainType};
use crate::launch::{self, LaunchPlan};
use crate::sync::{Group, ZeroStage};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Training steps of a random Qwen3 (AdamW over f32 masters, on the CPU or a GPU); 2
    /// warm-up steps are not timed.
    Train(TrainBenchArgs),
}

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// tiny: hidden 64 x 2 layers; small: 512 x 8; medium: 1024 x 16 (vocab 32000);
    /// moe-small: small with 16 experts, top-4; qwen3-0.6b: Qwen3-0.6B's shapes;
    /// qwen3-30b-a3b-4l: 4 layers of Qwen3-30B-A3B (as torch_train_bench.py's presets).
    #[arg(long, value_enum, default_value = "tiny")]
    pub size: BenchSize,
    /// full: every weight; lora: rank 8, alpha 32 on all-linear over a frozen base; qlora: the
    /// same over a 4-bit NF4 base (double quantization).
    #[arg(
        long = "train_type",
        alias = "train-type",
        alias = "tuner_type",
        value_enum,
        default_value = "full"
    )]
    pub train_type: BenchTrainType,
    /// Sequences per step (the preset's: 4, or 8 for qwen3-0.6b).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence (the preset's: 256, or 2048 for the qwen3 presets).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Steps in all, the 2 warm-up steps included.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long = "gradient_checkpointing", alias = "gradient-checkpointing")]
    pub gradient_checkpointing: bool,
    /// cpu, or cuda: visible GPU LOCAL_RANK of CUDA_VISIBLE_DEVICES (a build with `--features
    /// cuda`); steps are timed to a device synchronize.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: BenchDevice,
    /// The compute dtype (float32, bfloat16, float16); master weights stay float32.
    #[arg(long = "torch_dtype", alias = "dtype", default_value = "float32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// The device's peak TFLOP/s for the MFU (default 989, an H100/H200's dense bf16, on a
    /// GPU; no MFU on the CPU unless given).
    #[arg(long = "peak_tflops", alias = "peak-tflops")]
    pub peak_tflops: Option<f64>,
    /// false: every op in its composed form of candle ops (the baseline the fused CPU ops are
    /// measured against).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fused: bool,
    /// Ranks on this machine (gloo), each with --batch sequences per step, as `whet sft`'s;
    /// every rank prints its own report (with its peak RSS).
    #[arg(long = "nproc_per_node", default_value_t = 1)]
    pub nproc_per_node: usize,
    #[arg(long = "master_port", default_value_t = 29500)]
    pub master_port: u16,
    /// What the ranks shard: zero0, zero1, zero2 (or their _offload names).
    #[arg(long, default_value = "zero0")]
    pub deepspeed: String,
}

fn parse_dtype(name: &str) -> Result<DType, String> {
    crate::dtype::parse(name).ok_or_else(|| format!("`{name}`: use float32, bfloat16 or float16"))
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let BenchWhat::Train(train) = args.what;
    let zero = ZeroSettings::from_preset(&train.deepspeed).with_context(|| {
        format!(
            "--deepspeed {}: the bench takes a preset name ({})",
            train.deepspeed,
            DEEPSPEED_PRESETS.join(", ")
        )
    })?;
    // As `whet sft`: a rank of a job benches; a job of several processes launches them.
    let group = match RankEnv::from_env()? {
        // The bench runs on the CPU: its ranks reduce over gloo.
        Some(rank) => launch::join_group(&rank, &candle_core::Device::Cpu)?,
        None if train.nproc_per_node > 1 => {
            let launch = LaunchConfig {
                nproc_per_node: Some(train.nproc_per_node as i64),
                master_port: i64::from(train.master_port),
                ..LaunchConfig::default()
            };
            let plan = LaunchPlan::from_config(&launch)
                .map_err(anyhow::Error::msg)?
                .context("more than one process makes a launch plan")?;
            return launch::launch_this_command(&plan);
        }
        None => Group::single(),
    };
    let stage = if group.world_size() > 1 {
        ZeroStage::from_settings(&zero)?
    } else {
        ZeroStage::Zero0
    };
    crate::ops::set_fused(train.fused);
    let preset = train.size.preset();
    let report = run_train_bench(
        &BenchOptions {
            size: train.size,
            train_type: train.train_type,
            batch: train.batch.unwrap_or(preset.batch),
            seq: train.seq.unwrap_or(preset.seq),
            steps: train.steps,
            gradient_checkpointing: train.gradient_checkpointing,
            stage,
            device: train.device.open()?,
            compute_dtype: train.dtype,
            peak_tflops: train.peak_tflops,
        },
        &group,
    )?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
