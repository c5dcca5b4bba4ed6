//! Developer tasks, in Rust rather than shell scripts.
//!
//! * `cargo xtask test`   — everything CI checks: whet-shared for wasm32, the studio's release
//!   build (the browser tests drive it), then the whole test suite.
//! * `cargo xtask app`    — builds the studio (app/ → app/dist) with Trunk, offline.
//! * `cargo xtask studio` — starts the studio with its backend on the embedded defaults.
//! * `cargo xtask demo-data` — regenerates the demo's synthetic task in examples/demo/.

mod demo_data;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "test" => test(),
        "studio" => studio(),
        "demo-data" => demo_data::write(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo"),
        ),
        "app" => app(),
        _ => {
            eprintln!("usage: cargo xtask <test|app|studio|demo-data>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask {task}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Installs the wasm32 target with rustup when it is missing (a fresh machine lacks it).
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-unknown-unknown") =>
        {
            Ok(())
        }
        Ok(_) => {
            eprintln!("+ rustup target add wasm32-unknown-unknown");
            let status = Command::new("rustup")
                .args(["target", "add", "wasm32-unknown-unknown"])
                .status()?;
            if !status.success() {
                bail!("could not install the wasm32-unknown-unknown target");
            }
            Ok(())
        }
        // No rustup: trust that the toolchain has the target; the build below says if not.
        Err(_) => Ok(()),
    }
}

/// The whole suite: the browser and the server must judge configs with the same code, so
/// whet-shared has to build for wasm32 as well as natively.
fn test() -> Result<()> {
    ensure_wasm_target()?;
    cargo(&[
        "build",
        "-p",
        "whet-shared",
        "--target",
        "wasm32-unknown-unknown",
    ])?;
    app()?;
    // whet-app only runs in the browser: Trunk has just built it for wasm32 and the browser
    // tests in tests/ drive that build, so a native build of it would test nothing.
    cargo(&["test", "--workspace", "--exclude", "whet-app"])?;
    Ok(())
}

/// Builds the studio with `trunk build --release` from the workspace root (Trunk.toml), with
/// npm's wasm-opt (app/node_modules/.bin) first on PATH. Trunk runs offline: the tools must be
/// installed already (`.ci/install-studio-tools`).
fn app() -> Result<()> {
    ensure_wasm_target()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tools = root.join("app/node_modules/.bin");
    if !tools.join("wasm-opt").exists() {
        bail!("app/node_modules/.bin/wasm-opt is missing: run `.ci/install-studio-tools` (or `npm ci --prefix app`)");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(tools).chain(std::env::split_paths(&path)))?;
    eprintln!("+ trunk build --release");
    let status = Command::new("trunk")
        .args(["build", "--release"])
        .current_dir(&root)
        .env("PATH", path)
        .status()
        .context("running trunk: install it with `.ci/install-studio-tools`")?;
    if !status.success() {
        bail!("`trunk build --release` failed ({status})");
    }
    Ok(())
}

/// Until the studio and its server land (see README), this checks the seed config and the
/// demo with the engine and says how the studio will start.
fn studio() -> Result<()> {
    cargo(&["build", "--release", "-p", "whet-engine"])?;
    let whet = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/whet");
    eprintln!("+ whet check --from-shell examples/seed.sh");
    let status = Command::new(&whet)
        .args(["check", "--from-shell", "examples/seed.sh"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .context("running whet")?;
    eprintln!(
        "\nThe studio (whet-app) and its server (whet-server) are not built yet. When they land,\n\
         this command builds the app and starts whet-server on 127.0.0.1:8080 with SQLite and the demo preset."
    );
    if !status.success() && status.code() != Some(1) {
        bail!("whet check failed ({status})");
    }
    Ok(())
}
