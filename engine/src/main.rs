use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    whet_engine::cli::run(whet_engine::cli::Cli::parse())
}
