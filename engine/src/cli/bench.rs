//! `whet bench train`: the training-step benchmark; prints one JSON line.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::bench::{run_train_bench, BenchOptions, BenchSize, BenchTrainType};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Training steps of a random Qwen3 (f32, CPU, AdamW); 2 warm-up steps are not timed.
    Train(TrainBenchArgs),
}

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// tiny: hidden 64 x 2 layers; small: 512 x 8; medium: 1024 x 16 (vocab 32000).
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
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Steps in all, the 2 warm-up steps included.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long = "gradient_checkpointing", alias = "gradient-checkpointing")]
    pub gradient_checkpointing: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let BenchWhat::Train(train) = args.what;
    let report = run_train_bench(&BenchOptions {
        size: train.size,
        train_type: train.train_type,
        batch: train.batch,
        seq: train.seq,
        steps: train.steps,
        gradient_checkpointing: train.gradient_checkpointing,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
