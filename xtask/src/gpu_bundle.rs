//! `cargo xtask gpu-bundle`: a folder that checks whet on a GPU machine with no network and no
//! cargo — one H100/H200, PyTorch with its CUDA 13 wheels, transformers. It holds the release
//! `whet`, the `hf_parity` test binary and the `cuda_kernels` kernel check built with
//! `--features cuda` (stripped, xz-compressed: run.sh unpacks them with Python's lzma), the
//! reference fixtures, the demo,
//! `torch_train_bench.py` and `run.sh` (xtask/gpu-bundle/run.sh, which says what it runs).
//! The parity checks are the cargo tests themselves, run on the GPU through
//! `WHET_TEST_DEVICE` / `WHET_TEST_DTYPE`, so they stay the one source of truth.
//!
//! The folder is `target/gpu-bundle/` (ignored), and must stay under 64 MiB: the device
//! machines take no more.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{cuda, run};

/// What the device machines accept with a command.
const SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// The test binary the bundle ships (engine/tests/hf_parity.rs).
const PARITY_TEST: &str = "hf_parity";

/// The kernel check the bundle runs first (engine/tests/cuda_kernels.rs).
const KERNEL_CHECK: &str = "cuda_kernels";

pub fn write() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize()?;
    let shared = root.join("../shared");
    let bundle = root.join("target/gpu-bundle");
    let toolchain = cuda::ensure_toolchain()?;

    let (whet, parity, kernels) = build(&root, &toolchain)?;

    if bundle.exists() {
        std::fs::remove_dir_all(&bundle)
            .with_context(|| format!("removing the old {}", bundle.display()))?;
    }
    let bin = bundle.join("bin");
    std::fs::create_dir_all(&bin)?;
    for (built, name) in [
        (&whet, "whet"),
        (&parity, PARITY_TEST),
        (&kernels, KERNEL_CHECK),
    ] {
        pack_binary(built, &bin.join(format!("{name}.xz")))?;
    }
    copy_dir(
        &shared.join("fixtures/hf-reference"),
        &bundle.join("fixtures/hf-reference"),
    )?;
    for dir in ["examples/demo", "examples/tiny-qwen3"] {
        copy_dir(&root.join(dir), &bundle.join(dir))?;
    }
    std::fs::copy(
        root.join("examples/demo.yaml"),
        bundle.join("examples/demo.yaml"),
    )?;
    std::fs::copy(
        shared.join("tools/torch_train_bench.py"),
        bundle.join("torch_train_bench.py"),
    )?;
    let run_sh = bundle.join("run.sh");
    std::fs::copy(root.join("xtask/gpu-bundle/run.sh"), &run_sh)?;
    set_mode(&run_sh, 0o755)?;
    std::fs::write(bundle.join("COMMIT"), format!("{}\n", commit(&root)))?;

    let size = dir_size(&bundle)?;
    eprintln!(
        "+ {} written: {:.1} MiB (limit {} MiB)",
        bundle.display(),
        size as f64 / (1024.0 * 1024.0),
        SIZE_LIMIT / (1024 * 1024)
    );
    if size >= SIZE_LIMIT {
        bail!(
            "the bundle is {size} bytes, over the device machines' {SIZE_LIMIT}; ship fewer files"
        );
    }
    println!("{}", bundle.display());
    Ok(())
}

/// `cargo test --release --features cuda --no-run --test hf_parity --test cuda_kernels` with
/// the toolchain's environment: one build that makes the test binaries and (for the tests)
/// `whet` itself, so the release libraries are compiled once. Returns (whet, hf_parity,
/// cuda_kernels) as cargo reports them.
fn build(root: &Path, toolchain: &cuda::Toolchain) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let args = [
        "test",
        "--release",
        "-p",
        "whet-engine",
        "--features",
        "cuda",
        "--no-run",
        "--test",
        PARITY_TEST,
        "--test",
        KERNEL_CHECK,
        "--message-format",
        "json-render-diagnostics",
    ];
    eprintln!("+ cargo {}", args.join(" "));
    let mut cargo = Command::new(env!("CARGO"));
    let mut child = super::cargo_env::without_package_variables(&mut cargo)
        .args(args)
        .envs(toolchain.build_env())
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test --no-run")?;
    let (mut whet, mut parity, mut kernels) = (None, None, None);
    let stdout = child.stdout.take().context("cargo's stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let message: serde_json::Value = serde_json::from_str(&line?).unwrap_or_default();
        let (Some(executable), Some(name)) = (
            message["executable"].as_str(),
            message["target"]["name"].as_str(),
        ) else {
            continue;
        };
        match name {
            "whet" => whet = Some(PathBuf::from(executable)),
            PARITY_TEST => parity = Some(PathBuf::from(executable)),
            KERNEL_CHECK => kernels = Some(PathBuf::from(executable)),
            _ => {}
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("the CUDA release build failed ({status})");
    }
    Ok((
        whet.context("cargo built no `whet` executable")?,
        parity.context("cargo built no hf_parity test executable")?,
        kernels.context("cargo built no cuda_kernels executable")?,
    ))
}

/// Strips a copy of `built` and xz-compresses it to `to` (PTX and symbol tables compress
/// tenfold; the GPU machine unpacks with Python's lzma, which every Python has).
fn pack_binary(built: &Path, to: &Path) -> Result<()> {
    let stripped = to.with_extension("");
    std::fs::copy(built, &stripped).with_context(|| format!("copying {}", built.display()))?;
    run(Command::new("strip").arg(&stripped))?;
    run(Command::new("xz").args(["-9", "-T0", "-f"]).arg(&stripped))?;
    eprintln!(
        "+ {}: {:.1} MiB built, {:.1} MiB packed",
        to.display(),
        std::fs::metadata(built)?.len() as f64 / (1024.0 * 1024.0),
        std::fs::metadata(to)?.len() as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            // The shared fixtures are read-only; the bundle's copies must be replaceable.
            set_mode(&target, 0o644)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_size(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

/// The commit the bundle was built from (with `-dirty` for uncommitted changes), for its
/// report.
fn commit(root: &Path) -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
