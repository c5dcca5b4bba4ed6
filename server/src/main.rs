//! `whet-server`: see `whet-server --help` and DESIGN §4.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    whet_server::serve(whet_server::Args::parse()).await
}
