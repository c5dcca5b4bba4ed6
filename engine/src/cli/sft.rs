//! `whet sft`: validate the job (errors stop it before any work), then train it with the
//! recipe in `crate::train`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use whet_shared::{validate_with, JobConfig};

use super::input::{check_context, load_job, JobInput};
use crate::device;
use crate::tensorboard::{unix_time_now, EventWriter};
use crate::train::metrics::CurvePlotter;
use crate::train::{self, progress::Console, ScalarSink};

pub const AFTER_HELP: &str =
    "Flags are ms-swift's (`whet sft --model DIR --dataset data.jsonl --tuner_type full ...`), \
and `--config FILE` reads JSON, YAML or TOML: the file is the base and flags override it \
wherever they stand (later flags win among themselves). CUDA_VISIBLE_DEVICES and \
NPROC_PER_NODE from the environment apply where the config does not set them.\n\
Outputs go to <output_dir>/v<N>-<YYYYMMDD-HHMMSS>/ (args.json, logging.jsonl, \
trainer_state.json, checkpoint-<step>/).\n\
Exit codes: 0 trained, 1 invalid config or training failure, 2 usage.";

#[derive(Debug, Args)]
pub struct SftArgs {
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

/// The launcher's environment, as torch and ms-swift read it, where the config is silent.
fn apply_environment(config: &mut JobConfig) {
    let launch = &mut config.launch;
    if launch.cuda_visible_devices.is_none() {
        launch.cuda_visible_devices = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    }
    if launch.nproc_per_node.is_none() {
        launch.nproc_per_node = std::env::var("NPROC_PER_NODE")
            .ok()
            .and_then(|v| v.trim().parse().ok());
    }
}

/// TensorBoard event files (`<run_dir>/runs`) and the loss curves (`<run_dir>/images`), as
/// ms-swift writes them when `report_to` has tensorboard (its default).
fn scalar_sinks(config: &JobConfig, run_dir: &Path) -> anyhow::Result<Vec<Box<dyn ScalarSink>>> {
    let wants = |name: &str| config.sft.report_to.iter().any(|r| r == name || r == "all");
    if !wants("tensorboard") {
        return Ok(Vec::new());
    }
    let events = EventWriter::create(run_dir.join("runs"), unix_time_now())?;
    Ok(vec![
        Box::new(events),
        Box::new(CurvePlotter::new(run_dir.join("images"))),
    ])
}

/// The launch config's environment variables that the process does not already have (as
/// ms-swift's config files set theirs), e.g. `CANDLE_NUM_THREADS` for a tiny model.
fn apply_config_env(config: &JobConfig) {
    for (name, value) in &config.launch.env {
        if std::env::var_os(name).is_none() {
            std::env::set_var(name, value);
        }
    }
}

pub fn run(args: SftArgs) -> anyhow::Result<ExitCode> {
    let input = JobInput {
        command: "whet sft",
        from_shell: args.from_shell,
        flags: args.flags,
    };
    let mut config = match load_job(&input) {
        Ok(config) => config,
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            return Ok(ExitCode::from(1));
        }
    };
    apply_environment(&mut config);
    apply_config_env(&config);
    config.normalize();

    let diagnostics = validate_with(&config, &check_context(&config));
    for d in &diagnostics {
        eprintln!("{d}");
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        eprintln!("{errors} error(s): nothing was trained");
        return Ok(ExitCode::from(1));
    }
    // Where the config says to train, before any work (the recipe asks the same function).
    if let Err(refusal) = device::select_device(&config) {
        eprintln!("{refusal}\nnothing was trained");
        return Ok(ExitCode::from(1));
    }
    if let Some(n) = config.launch.nproc_per_node.filter(|n| *n > 1) {
        anyhow::bail!("nproc_per_node is {n}: multi-process training is not implemented yet; run one process (--nproc_per_node 1, or unset NPROC_PER_NODE)");
    }
    if let Some(world) = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse::<u64>().ok())
        .filter(|w| *w > 1)
    {
        anyhow::bail!("WORLD_SIZE is {world}: multi-process training is not implemented yet; run a single process");
    }

    let console = Console::new(std::io::stderr().is_terminal());
    let make_sinks = |run_dir: &Path| scalar_sinks(&config, run_dir);
    let summary = train::train(&config, &console, &make_sinks)?;
    if let Some(best) = &summary.best_checkpoint {
        console.line(&format!("Best checkpoint: {}", best.display()));
    }
    if let Some(last) = &summary.last_checkpoint {
        console.line(&format!("Last checkpoint: {}", last.display()));
    }
    Ok(ExitCode::SUCCESS)
}
