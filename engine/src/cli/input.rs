//! Reading a job from the command line, in layers that each override the one before: the
//! `--from-shell FILE` script, then `--config FILE`s (JSON/YAML/TOML, wherever they stand), then
//! the ms-swift flags (later ones winning), as transformers' HfArgumentParser puts flags over a
//! file. The engine does the file I/O; whet-shared does the parsing.

use std::path::{Path, PathBuf};

use whet_shared::diagnostics::{Diagnostic, Diagnostics};
use whet_shared::shell::{parse_args_onto, parse_shell_onto};
use whet_shared::{CheckContext, JobConfig};

/// Where a job comes from.
#[derive(Debug, Clone, Default)]
pub struct JobInput {
    /// The subcommand (`whet check`), whose `--help` messages point to.
    pub command: &'static str,
    pub from_shell: Option<PathBuf>,
    /// ms-swift flags, including `--config FILE`.
    pub flags: Vec<String>,
}

fn read_text(path: &str) -> Result<String, String> {
    let text = if path == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read `{path}`: {e}"))?
    };
    Ok(text)
}

fn unreadable(path: &Path, message: String) -> Diagnostics {
    Diagnostic::error(
        "input",
        "file_unreadable",
        message.clone(),
        format!("无法读取文件 `{}`：{message}", path.display()),
    )
    .with_fix("check the path and its permissions", "请检查路径和权限")
    .into()
}

/// The job on a subcommand's command line: an optional script, then ms-swift flags (with
/// `--config FILE`) to the end of the line.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// Read a training script (torchrun / swift sft / whet sft); `-` reads standard input.
    #[arg(long = "from-shell", value_name = "FILE")]
    pub from_shell: Option<PathBuf>,
    /// ms-swift flags, and `--config FILE`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "FLAGS"
    )]
    pub flags: Vec<String>,
}

impl JobArgs {
    pub fn input(self, command: &'static str) -> JobInput {
        JobInput {
            command,
            from_shell: self.from_shell,
            flags: self.flags,
        }
    }
}

/// Parses the job: the script first (if any), then the config files and flags on top.
pub fn load_job(input: &JobInput) -> Result<JobConfig, Diagnostics> {
    let mut config = JobConfig::default();
    if let Some(path) = &input.from_shell {
        let script = read_text(&path.to_string_lossy()).map_err(|m| unreadable(path, m))?;
        config = parse_shell_onto(&config, &script, &read_text)?;
    }
    if !input.flags.is_empty() || input.from_shell.is_none() {
        config = parse_args_onto(&config, &input.flags, input.command, &read_text)?;
    }
    Ok(config)
}

/// What `check` can learn from the disk: a local model's config.json and local jsonl row counts.
pub fn check_context(config: &JobConfig) -> CheckContext {
    CheckContext::gather(config, &|path| std::fs::read_to_string(path).ok())
}
