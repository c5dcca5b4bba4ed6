//! `whet check`: validate a config and print what it will do.

use std::process::ExitCode;

use clap::Args;
use whet_shared::memory::{params_text, trainable_percent};
use whet_shared::report::FailedReport;
use whet_shared::{check, gpus, CheckReport, SftConfig};

use super::input::{check_context, load_job, JobArgs};

pub const AFTER_HELP: &str =
    "Flags are ms-swift's (`whet check --model Qwen/Qwen3-8B --dataset data.jsonl ...`), \
and `--config FILE` reads JSON, YAML or TOML: the file is the base and flags override it \
wherever they stand (later flags win among themselves).\n\
Exit codes: 0 no errors, 1 errors, 2 usage.";

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the report as JSON (what POST /api/check answers).
    #[arg(long)]
    pub json: bool,
    /// Judge memory against this GPU (h100-80, a100-40, rtx4090-24, ...).
    #[arg(long, value_name = "ID", default_value = "h100-80")]
    pub gpu: String,
    #[command(flatten)]
    pub job: JobArgs,
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let Some(gpu) = gpus::find(&args.gpu) else {
        let ids: Vec<&str> = gpus::GPUS.iter().map(|g| g.id).collect();
        eprintln!(
            "error: unknown --gpu `{}`; choose one of {}",
            args.gpu,
            ids.join(", ")
        );
        return Ok(ExitCode::from(2));
    };
    let input = args.job.input("whet check");
    let config = match load_job(&input) {
        Ok(config) => config,
        Err(diagnostics) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&FailedReport::new(diagnostics.0))?
                );
            } else {
                for d in diagnostics.iter() {
                    eprintln!("{d}");
                }
            }
            return Ok(ExitCode::from(1));
        }
    };
    let mut context = check_context(&config);
    context.gpu = gpu;
    let report = check(&config, &context);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// How the run trains: `full fine-tuning`, `LoRA r8 (alpha 32)`,
/// `QLoRA r8 (alpha 32) on a 4-bit nf4 base with double quant`.
fn tuner_text(sft: &SftConfig) -> String {
    if !sft.is_adapter() {
        return "full fine-tuning".into();
    }
    let lora = format!(
        "r{} (alpha {}{})",
        sft.lora_rank,
        sft.lora_alpha,
        if sft.use_rslora { ", rsLoRA" } else { "" }
    );
    if sft.is_qlora() {
        let double = if sft.bnb_4bit_use_double_quant {
            " with double quant"
        } else {
            ""
        };
        format!(
            "QLoRA {lora} on a 4-bit {} base{double}",
            sft.bnb_4bit_quant_type
        )
    } else {
        format!("LoRA {lora}")
    }
}

/// A size in GiB, or in MiB / KiB below a tenth of a GiB (the demo's tiny models).
fn size_text(gib: f64) -> String {
    if gib >= 0.1 || gib == 0.0 {
        format!("{gib:.1} GiB")
    } else if gib * 1024.0 >= 0.1 {
        format!("{:.1} MiB", gib * 1024.0)
    } else {
        format!("{:.1} KiB", gib * 1024.0 * 1024.0)
    }
}

fn print_report(report: &CheckReport) {
    let d = &report.derived;
    let sft = &report.config.sft;
    println!(
        "{} — {}, {} rank(s)",
        sft.model.as_deref().unwrap_or("(no model)"),
        tuner_text(sft),
        d.world_size
    );
    println!(
        "  effective batch {} = {} per device x {} rank(s) x {} accumulation; learning rate {}",
        d.effective_batch_size,
        sft.per_device_train_batch_size,
        d.world_size,
        d.gradient_accumulation_steps,
        whet_shared::shell::format_float(d.learning_rate)
    );
    let show = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    println!(
        "  rows {} -> {} steps per epoch, {} total, {} warm-up, {} eval(s) ({}), {} save(s)",
        show(d.train_rows),
        show(d.steps_per_epoch),
        show(d.total_steps),
        show(d.warmup_steps),
        show(d.num_evals),
        d.eval_strategy,
        show(d.num_saves)
    );
    if let Some(m) = &d.memory {
        println!(
            "  trainable parameters {} of {} ({})",
            params_text(m.trainable_params),
            params_text(m.total_params),
            trainable_percent(m)
        );
        println!(
            "  memory per GPU {} = weights {} + gradients {} + optimizer {} + activations {} + overhead {} (vs {:.1} GiB {})",
            size_text(m.per_gpu_gib),
            size_text(m.weights_gib),
            size_text(m.gradients_gib),
            size_text(m.optimizer_gib),
            size_text(m.activations_gib),
            size_text(m.overhead_gib),
            d.gpu.memory_gib,
            d.gpu.name
        );
    }
    if let (Some(checkpoint), Some(disk)) = (d.checkpoint_gib, d.disk_gib) {
        println!(
            "  checkpoint {} (weights {} + optimizer state {}); disk for kept checkpoints {}",
            size_text(checkpoint),
            size_text(d.checkpoint_weights_gib.unwrap_or(0.0)),
            size_text(d.checkpoint_optimizer_gib.unwrap_or(0.0)),
            size_text(disk)
        );
    }
    println!("  {}", crate::device::describe_gpus(&report.config));
    println!("  output {}", d.output_dir);
    for diagnostic in &report.diagnostics {
        println!("{diagnostic}");
    }
    let errors = report.diagnostics.iter().filter(|d| d.is_error()).count();
    println!(
        "{}",
        if errors == 0 {
            "ok".to_string()
        } else {
            format!("{errors} error(s)")
        }
    );
}
