//! `cargo xtask cpu-sitting [--runs N] [PRESET...]`: whet's CPU trainer against PyTorch +
//! transformers in one sitting, the two alternated run by run, medians reported.
//!
//! Builds whet in release, then for each preset (`tiny`, `small`, `medium`, `moe-small`; a `+gc`
//! suffix turns on gradient checkpointing in both) runs `whet bench train` and
//! `../shared/tools/torch_train_bench.py` (the Python of `$WHET_REF_PYTHON`, else `python3`)
//! N times each, 2 threads, and prints every run with the load average before it, then a
//! Markdown table for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One run's figures: tokens/s and peak RSS (MiB for whet, MB for torch, as each reports).
struct Run {
    tokens_per_s: f64,
    peak_rss: f64,
    load: f64,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut runs = 3;
    let mut presets = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .context("--runs takes a number")?
            }
            preset => presets.push(preset.to_string()),
        }
    }
    if presets.is_empty() {
        presets = [
            "tiny",
            "tiny+gc",
            "small",
            "small+gc",
            "moe-small",
            "medium",
        ]
        .map(String::from)
        .to_vec();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    super::cargo(&["build", "--release", "-p", "whet-engine", "--bin", "whet"])?;
    let whet = target_dir(&root).join("release/whet");
    let torch_bench = root.join("../shared/tools/torch_train_bench.py");
    let python = std::env::var("WHET_REF_PYTHON").unwrap_or_else(|_| "python3".into());

    let mut rows = Vec::new();
    for preset in &presets {
        let (size, gc) = match preset.strip_suffix("+gc") {
            Some(size) => (size, true),
            None => (preset.as_str(), false),
        };
        let gc_flag: &[&str] = if gc {
            &["--gradient_checkpointing"]
        } else {
            &[]
        };
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let mut whet_cmd = Command::new(&whet);
            whet_cmd
                .args(["bench", "train", "--size", size, "--steps", "10"])
                .args(gc_flag);
            let run = measure(&mut whet_cmd, "tokens_per_s", "peak_rss_mib")?;
            eprintln!(
                "{preset} run {i}: whet {:.0} tokens/s, load {:.2}",
                run.tokens_per_s, run.load
            );
            ours.push(run);
            let mut torch_cmd = Command::new(&python);
            torch_cmd
                .arg(&torch_bench)
                .args(["--size", size, "--threads", "2", "--steps", "10"])
                .args(gc.then_some("--gradient-checkpointing"));
            let run = measure(&mut torch_cmd, "tokens_per_sec", "peak_rss_mb")?;
            eprintln!(
                "{preset} run {i}: torch {:.0} tokens/s, load {:.2}",
                run.tokens_per_s, run.load
            );
            theirs.push(run);
        }
        rows.push((preset.clone(), ours, theirs));
    }

    println!("| preset | whet tokens/s | torch tokens/s | whet / torch | whet peak RSS (MiB) | torch peak RSS (MB) | load before runs |");
    println!("|---|---|---|---|---|---|---|");
    for (preset, ours, theirs) in &rows {
        let median = |runs: &[Run], f: fn(&Run) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (w, t) = (
            median(ours, |r| r.tokens_per_s),
            median(theirs, |r| r.tokens_per_s),
        );
        let loads: Vec<String> = ours
            .iter()
            .chain(theirs)
            .map(|r| format!("{:.1}", r.load))
            .collect();
        println!(
            "| {preset} | {w:.0} | {t:.0} | {:.2}x | {:.0} | {:.0} | {} |",
            w / t,
            median(ours, |r| r.peak_rss),
            median(theirs, |r| r.peak_rss),
            loads.join(" ")
        );
    }
    Ok(())
}

/// Runs a bench and reads the two figures from the JSON object on its last stdout line.
fn measure(command: &mut Command, tokens_key: &str, rss_key: &str) -> Result<Run> {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().context("the bench printed nothing")?;
    let json: serde_json::Value =
        serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))?;
    let field = |key: &str| {
        json[key]
            .as_f64()
            .with_context(|| format!("no number `{key}` in {last}"))
    };
    Ok(Run {
        tokens_per_s: field(tokens_key)?,
        peak_rss: field(rss_key)?,
        load,
    })
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else the workspace's `target/`).
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}
