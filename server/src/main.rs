//! `whet-server`: see `whet-server --help` and DESIGN §4.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    match whet_server::serve(whet_server::Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("whet-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
