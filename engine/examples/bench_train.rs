//! Runs the `whet bench train` measurement without the CLI and prints its JSON line:
//!
//!     cargo run --release -p whet-engine --example bench_train -- --size small [--gradient-checkpointing]

use clap::Parser;
use whet_engine::bench::{run_train_bench, BenchOptions, BenchSize};

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "small")]
    size: BenchSize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long)]
    gradient_checkpointing: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = run_train_bench(&BenchOptions {
        size: args.size,
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        gradient_checkpointing: args.gradient_checkpointing,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
