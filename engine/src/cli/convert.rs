//! `whet convert`: one config, many forms.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use whet_shared::shell::{to_shell_with, Dialect, ShellOptions};
use whet_shared::{share, to_config_text, Format};

use super::input::{load_job, JobInput};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Target {
    Json,
    Yaml,
    Toml,
    Swift,
    Whet,
    Link,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// A JSON, YAML or TOML config file.
    #[arg(long, value_name = "FILE", conflicts_with = "from_shell")]
    pub config: Option<PathBuf>,
    /// A training script; `-` reads standard input.
    #[arg(long = "from-shell", value_name = "FILE")]
    pub from_shell: Option<PathBuf>,
    /// The form to write.
    #[arg(long)]
    pub to: Target,
    /// Studio address for `--to link`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub base: String,
    /// Write every field, not only those that differ from the defaults.
    #[arg(long)]
    pub all: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    if args.config.is_none() && args.from_shell.is_none() {
        eprintln!("error: give --config FILE or --from-shell FILE");
        return Ok(ExitCode::from(2));
    }
    let input = JobInput {
        command: "whet convert",
        from_shell: args.from_shell,
        flags: args
            .config
            .map(|path| vec!["--config".to_string(), path.to_string_lossy().into_owned()])
            .unwrap_or_default(),
    };
    let config = match load_job(&input) {
        Ok(config) => config,
        Err(diagnostics) => {
            for d in diagnostics.iter() {
                eprintln!("{d}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    let shell = |dialect| {
        to_shell_with(
            &config,
            ShellOptions {
                dialect,
                all: args.all,
            },
        )
    };
    let text = match args.to {
        Target::Json => to_config_text(&config, Format::Json, args.all),
        Target::Yaml => to_config_text(&config, Format::Yaml, args.all),
        Target::Toml => to_config_text(&config, Format::Toml, args.all),
        Target::Swift => shell(Dialect::Swift),
        Target::Whet => shell(Dialect::Whet),
        Target::Link => share::link(&args.base, &config) + "\n",
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
