//! The `whet` command line: subcommands parse their input with whet-shared, do their work and
//! map the outcome to the exit codes of DESIGN §3 (0 success, 1 failure, 2 usage).

mod bench;
mod check;
mod convert;
mod dataset;
mod export;
mod infer;
mod input;
mod sft;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use whet_shared::fields::{Group, FIELDS};

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
    #[command(after_help = with_flag_list(sft::AFTER_HELP))]
    Sft(sft::SftArgs),
    /// Validate a config and print its derived figures (effective batch, steps, memory, disk).
    #[command(after_help = with_flag_list(check::AFTER_HELP))]
    Check(check::CheckArgs),
    /// Translate a config between JSON, YAML, TOML, the ms-swift and whet scripts, and a share link.
    Convert(convert::ConvertArgs),
    /// Answer a query, or a validation file, with a model folder or checkpoint.
    Infer(infer::InferArgs),
    /// Look at datasets as training sees them: `whet dataset preview [--config FILE | flags]`.
    Dataset(dataset::DatasetArgs),
    /// Merge a LoRA adapter into its base model and write a full Hugging Face model folder.
    Export(export::ExportArgs),
    /// Benchmarks: `whet bench train --size tiny|small|medium`.
    Bench(bench::BenchArgs),
}

/// `text`, then the ms-swift flags whet reads, by group (an unknown flag's message points here).
fn with_flag_list(text: &str) -> String {
    let mut help = format!("{text}\n\nms-swift flags:");
    for group in Group::ALL {
        let flags: Vec<_> = FIELDS
            .iter()
            .filter(|f| f.is_flag && f.group == group)
            .collect();
        if flags.is_empty() {
            continue;
        }
        let mut line = format!("\n  {}:", group.title_en());
        for field in flags {
            if line.len() + field.name.len() > 96 {
                help += &line;
                line = "\n   ".to_string();
            }
            line += &format!(" --{}", field.name);
        }
        help += &line;
    }
    help
}

impl Cli {
    /// Parses the process's arguments, whet's own options recognised wherever they stand.
    pub fn parse_env() -> Cli {
        Cli::parse_from(own_options_first(std::env::args_os().collect()))
    }
}

/// clap reads a subcommand's own options (`--json`, `--gpu`, `--from-shell`, `--help`) only up
/// to the first ms-swift flag, where the trailing FLAGS begin; this moves those standing among
/// the flags to the front, so `whet check --config job.json --json` is `whet check --json
/// --config job.json`. ms-swift flag values never start with `-`, so nothing else can be meant.
pub fn own_options_first(args: Vec<OsString>) -> Vec<OsString> {
    let mut command = Cli::command();
    command.build();
    // The innermost subcommand named (`whet dataset preview` has two levels).
    let mut sub = &command;
    let mut depth = 1;
    while let Some(inner) = args
        .get(depth)
        .and_then(|a| a.to_str())
        .and_then(|name| sub.get_subcommands().find(|s| s.get_name() == name))
    {
        sub = inner;
        depth += 1;
    }
    if depth == 1 || !sub.get_positionals().any(|a| a.is_trailing_var_arg_set()) {
        return args;
    }
    // Each own option's spellings, and whether a value follows it.
    let own: Vec<(String, bool)> = sub
        .get_arguments()
        .filter(|a| !a.is_positional())
        .flat_map(|a| {
            let takes_value = a.get_action().takes_values();
            let long = a.get_long().map(|l| format!("--{l}"));
            let short = a.get_short().map(|s| format!("-{s}"));
            long.into_iter().chain(short).map(move |w| (w, takes_value))
        })
        .collect();
    let (mut front, mut flags) = (args[..depth].to_vec(), Vec::new());
    let mut words = args.into_iter().skip(depth);
    while let Some(word) = words.next() {
        let text = word.to_string_lossy();
        let spelled = text.split_once('=').map_or(&*text, |(name, _)| name);
        match own.iter().find(|(w, _)| w == spelled) {
            Some((_, takes_value)) => {
                let value_follows = *takes_value && !text.contains('=');
                front.push(word);
                if value_follows {
                    front.extend(words.next());
                }
            }
            None => flags.push(word),
        }
    }
    front.extend(flags);
    front
}

/// Runs the CLI; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let outcome = match cli.command {
        Command::Sft(args) => sft::run(args),
        Command::Check(args) => check::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Dataset(args) => dataset::run(args),
        Command::Export(args) => export::run(args),
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
