//! The `whet` command line: subcommands parse their input with whet-shared, do their work and
//! map the outcome to the exit codes of DESIGN §3 (0 success, 1 failure, 2 usage).

mod bench;
mod check;
mod convert;
mod infer;
mod input;
mod sft;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use input::{load_job, JobInput};

#[derive(Debug, Parser)]
#[command(
    name = "whet",
    version,
    about = "Supervised fine-tuning of Qwen3 models (dense and MoE), with ms-swift's flags.",
    after_help = "Exit codes: 0 success, 1 failure (validation, training), 2 usage."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model (full fine-tuning on the CPU for now) with ms-swift's flags.
    #[command(after_help = sft::AFTER_HELP)]
    Sft(sft::SftArgs),
    /// Validate a config and print its derived figures (effective batch, steps, memory, disk).
    #[command(after_help = check::AFTER_HELP)]
    Check(check::CheckArgs),
    /// Translate a config between JSON, YAML, TOML, the ms-swift and whet scripts, and a share link.
    Convert(convert::ConvertArgs),
    /// Answer a query, or a validation file, with a model folder or checkpoint.
    Infer(infer::InferArgs),
    /// Benchmarks: `whet bench train --size tiny|small|medium`.
    Bench(bench::BenchArgs),
}

/// Runs the CLI; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let outcome = match cli.command {
        Command::Sft(args) => sft::run(args),
        Command::Check(args) => check::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}
