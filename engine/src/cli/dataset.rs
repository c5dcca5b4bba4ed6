//! `whet dataset preview`: the config's datasets rendered with its template, as training will
//! see them (`crate::preview`); `--json` prints what `POST /api/datasets/preview` answers.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use whet_shared::preview::{DatasetPreview, PreviewRow, Truncation, DEFAULT_ROWS};
use whet_shared::report::FailedReport;

use super::input::{load_job, JobArgs};

#[derive(Debug, Args)]
pub struct DatasetArgs {
    #[command(subcommand)]
    pub command: DatasetCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Render the first rows with the template, the tokens that take loss marked, and the
    /// token lengths against max_length.
    #[command(after_help = super::with_flag_list(PREVIEW_AFTER_HELP))]
    Preview(PreviewArgs),
}

const PREVIEW_AFTER_HELP: &str = "The config comes as `whet sft` reads it (`--config FILE`, ms-swift flags on top). \
The rows are the training datasets' first, after `#N` sampling; the length distribution covers the first 2,000.\n\
Exit codes: 0 previewed, 1 failure (unreadable config, model or dataset), 2 usage.";

/// The most rows a preview renders in full.
pub const MAX_ROWS: usize = 200;

#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Rows rendered in full (1 to 200).
    #[arg(long, default_value_t = DEFAULT_ROWS as u64, value_parser = clap::value_parser!(u64).range(1..=MAX_ROWS as u64))]
    pub rows: u64,
    /// Print the preview as JSON (what POST /api/datasets/preview answers).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub job: JobArgs,
}

pub fn run(args: DatasetArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DatasetCommand::Preview(args) => preview(args),
    }
}

fn preview(args: PreviewArgs) -> anyhow::Result<ExitCode> {
    let input = args.job.input("whet dataset preview");
    let config = match load_job(&input) {
        Ok(config) => config,
        Err(diagnostics) => {
            if args.json {
                let report = FailedReport::new(diagnostics.0);
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for d in diagnostics.iter() {
                    eprintln!("{d}");
                }
            }
            return Ok(ExitCode::from(1));
        }
    };
    let preview = crate::preview::preview(&config, args.rows as usize)?;
    if args.json {
        println!("{}", serde_json::to_string(&preview)?);
    } else {
        print_preview(&preview, std::io::stdout().is_terminal());
    }
    Ok(ExitCode::SUCCESS)
}

/// The preview for a person: trained text in green on a terminal, else between ⟦ and ⟧.
fn print_preview(preview: &DatasetPreview, colour: bool) {
    println!(
        "model {}, template {}, max_length {}, truncation_strategy {}",
        preview.model,
        preview.template,
        preview.max_length,
        serde_json::to_value(preview.truncation_strategy)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    for d in &preview.datasets {
        let formats: Vec<String> = d
            .formats
            .iter()
            .map(|f| format!("{} {}", f.format, f.rows))
            .collect();
        println!(
            "{} {}: {} rows ({}), {} unreadable",
            d.field,
            d.spec,
            d.rows,
            formats.join(", "),
            d.bad_rows
        );
    }
    for row in &preview.rows {
        print_row(row, preview.max_length, colour);
    }
    let l = &preview.lengths;
    println!(
        "\nlengths of the first {} of {} rows: min {}, mean {:.1}, max {}; {} longer than max_length {} ({} dropped, {} cut)",
        l.rows, l.total_rows, l.min, l.mean, l.max, l.over_max_length, preview.max_length, l.dropped, l.cut
    );
    let most = l.bins.iter().map(|b| b.rows).max().unwrap_or(0).max(1);
    for bin in l.bins.iter().filter(|b| b.rows > 0) {
        let bar = "#".repeat((bin.rows * 40).div_ceil(most) as usize);
        let past = if bin.from >= preview.max_length {
            " > max_length"
        } else {
            ""
        };
        println!("{:>6}-{:<6} {:>6} {bar}{past}", bin.from, bin.to, bin.rows);
    }
    for bad in &preview.bad_rows {
        println!(
            "unreadable: {} row {}: {}",
            bad.origin.file, bad.origin.row, bad.error
        );
    }
    for d in &preview.diagnostics {
        println!("{d}");
    }
}

fn print_row(row: &PreviewRow, max_length: u64, colour: bool) {
    let truncation = match row.truncation {
        Truncation::Fits => "fits",
        Truncation::Dropped => "dropped (longer than max_length)",
        Truncation::CutLeft => "first tokens cut",
        Truncation::CutRight => "last tokens cut",
    };
    println!(
        "\n--- {} row {}: {} tokens / max_length {}, {} trained, {truncation}",
        row.origin.file, row.origin.row, row.num_tokens, max_length, row.num_trained
    );
    let (open, close) = if colour {
        ("\x1b[32m", "\x1b[0m")
    } else {
        ("⟦", "⟧")
    };
    let mut text = String::new();
    let mut in_trained = false;
    for token in &row.tokens {
        let trained = token.trained && !token.cut;
        if trained != in_trained {
            text.push_str(if trained { open } else { close });
            in_trained = trained;
        }
        text.push_str(&token.text);
    }
    if in_trained {
        text.push_str(close);
    }
    println!("{text}");
}
