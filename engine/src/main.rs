use std::process::ExitCode;

fn main() -> ExitCode {
    whet_engine::cli::run(whet_engine::cli::Cli::parse_env())
}
