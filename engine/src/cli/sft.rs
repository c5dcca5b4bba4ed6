//! `whet sft`: validate the job (errors stop it before any work), then train it with the
//! recipe in `crate::train`.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use whet_shared::{validate_with, JobConfig};
use whet_store::RankEnv;

use super::input::{check_context, load_job, JobArgs, JobInput};
use crate::device;
use crate::launch::{self, LaunchPlan};
use crate::sync::Group;
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
With --nproc_per_node N (or NPROC_PER_NODE=N, or --nnodes > 1; N = 1 too) whet is the launcher, as \
torchrun is: it starts N ranks (this command again, with torchrun's RANK, LOCAL_RANK, WORLD_SIZE, \
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), node 0 hosting their TCPStore on --master_port; \
their lines come prefixed `[rank k]`. Under torchrun (or any launcher that sets those \
variables) whet is one rank.\n\
Exit codes: 0 trained, 1 invalid config or training failure (of any rank), 2 usage, \
128 + N when the launcher was stopped by signal N.";

#[derive(Debug, Args)]
pub struct SftArgs {
    #[command(flatten)]
    pub job: JobArgs,
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

/// Starts this node's ranks: this executable again, with the arguments it was given.
fn launch_ranks(plan: &LaunchPlan, input: &JobInput) -> anyhow::Result<ExitCode> {
    if reads_standard_input(input) {
        eprintln!(
            "the job is read from standard input, which cannot be handed to {} ranks: save it \
             to a file and pass that file instead\nnothing was trained",
            plan.nproc_per_node
        );
        return Ok(ExitCode::from(1));
    }
    launch::launch_this_command(plan)
}

/// Whether the job names `-` (standard input) as its script or a config file.
fn reads_standard_input(input: &JobInput) -> bool {
    let dash_config = input.flags.iter().enumerate().any(|(i, flag)| {
        flag == "--config=-"
            || (flag == "--config" && input.flags.get(i + 1).is_some_and(|f| f == "-"))
    });
    dash_config || input.from_shell.as_deref() == Some(Path::new("-"))
}

pub fn run(args: SftArgs) -> anyhow::Result<ExitCode> {
    let input = args.job.input("whet sft");
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

    // Whether this process is a rank of a job (whet's launcher or torchrun set its variables).
    let rank = match RankEnv::from_env() {
        Ok(rank) => rank,
        Err(err) => {
            eprintln!("{err}\nnothing was trained");
            return Ok(ExitCode::from(1));
        }
    };
    // Every rank validates, but only rank 0 repeats the warnings (errors come from all).
    let warns = rank.as_ref().is_none_or(|rank| rank.rank == 0);
    let diagnostics = validate_with(&config, &check_context(&config));
    for d in diagnostics.iter().filter(|d| warns || d.is_error()) {
        eprintln!("{d}");
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        eprintln!("{errors} error(s): nothing was trained");
        return Ok(ExitCode::from(1));
    }
    // Where the config says to train, before any work (the recipe asks the same function).
    if let Err(refusal) = device::check_devices(&config) {
        eprintln!("{refusal}\nnothing was trained");
        return Ok(ExitCode::from(1));
    }
    // A rank of a job never launches; a launched world of one is a group of one.
    match rank {
        Some(rank) => {
            return launch::run_rank(&rank, &config, &|run_dir| scalar_sinks(&config, run_dir))
        }
        None => match LaunchPlan::from_config(&config.launch) {
            Err(refusal) => {
                eprintln!("{refusal}\nnothing was trained");
                return Ok(ExitCode::from(1));
            }
            Ok(Some(plan)) => return launch_ranks(&plan, &input),
            Ok(None) => {}
        },
    }

    let console = Console::new(std::io::stderr().is_terminal());
    let make_sinks = |run_dir: &Path| scalar_sinks(&config, run_dir);
    let summary = train::train(&config, &console, &make_sinks, &Group::single())?;
    if let Some(best) = &summary.best_checkpoint {
        console.line(&format!("Best checkpoint: {}", best.display()));
    }
    if let Some(last) = &summary.last_checkpoint {
        console.line(&format!("Last checkpoint: {}", last.display()));
    }
    Ok(ExitCode::SUCCESS)
}
