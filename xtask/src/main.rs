//! Developer tasks, in Rust rather than shell scripts.
//!
//! * `cargo xtask test`   — everything CI checks: `cargo fmt --check`, the studio's release
//!   build (whet-app and whet-shared for wasm32; the browser tests drive it), the whole test
//!   suite, then the CUDA build (toolchain from PyPI) and its GPU-free tests; every build of
//!   workspace crates runs clippy's lints with warnings denied.
//! * `cargo xtask app`    — builds the studio (app/ → app/dist) with Trunk, offline.
//! * `cargo xtask studio` — builds and starts the studio with its backend on the embedded
//!   defaults (SQLite, the demo preset).
//! * `cargo xtask demo-data` — regenerates the demo's synthetic task in examples/demo/.
//! * `cargo xtask cuda-toolchain` — installs CUDA 13.0's build tools from PyPI outside the
//!   repository and prints the environment `--features cuda` builds with.
//! * `cargo xtask gpu-bundle` — builds whet with CUDA and writes target/gpu-bundle/, which
//!   checks it on a GPU machine without cargo or network (`run.sh`).
//! * `cargo xtask cpu-sitting [--runs N] [PRESET...]` — whet's CPU trainer against PyTorch +
//!   transformers, alternated in one sitting; prints BENCHMARKS.md's table.

#[path = "../../tests/src/cargo_env.rs"]
mod cargo_env;
mod cpu_sitting;
mod cuda;
mod demo_data;
mod gpu_bundle;

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
        "app" => app(Lints::Off),
        "cuda-toolchain" => cuda::print_toolchain(),
        "gpu-bundle" => gpu_bundle::write(),
        "cpu-sitting" => cpu_sitting::run(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|app|studio|demo-data|cuda-toolchain|gpu-bundle|cpu-sitting>"
            );
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

/// Runs `command`, failing with its status unless it succeeds. It runs without the variables
/// `cargo run` set for xtask's own package (tests/src/cargo_env.rs says why), as the tests'
/// own cargo builds do.
fn run(command: &mut Command) -> Result<()> {
    cargo_env::without_package_variables(command);
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    run(Command::new(env!("CARGO")).args(args))
}

/// Runs `.ci/install-studio-tools` (trunk, wasm-bindgen-cli, wasm-opt, chromium) when a tool
/// is missing, so that both README commands work on a fresh machine.
fn ensure_studio_tools() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let have = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let complete = have("trunk")
        && have("wasm-bindgen")
        && have("chromedriver")
        && root.join("app/node_modules/.bin/wasm-opt").exists();
    if !complete {
        eprintln!("+ .ci/install-studio-tools");
        let status = Command::new(root.join(".ci/install-studio-tools"))
            .status()
            .context("running .ci/install-studio-tools")?;
        if !status.success() {
            bail!("installing the studio's build tools failed ({status})");
        }
    }
    ensure_wasm_target()
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

/// The whole suite: formatting first (cheap), then the studio, every test and the CUDA build,
/// each build linting the workspace crates it compiles.
/// A test that lacks an optional tool says SKIPPED; `.ci/run` sets WHET_REQUIRE_ALL=1 so that
/// in CI it fails instead.
fn test() -> Result<()> {
    ensure_studio_tools()?;
    cargo(&["fmt", "--all", "--check"])?;
    // Trunk's build of whet-app also builds whet-shared for wasm32 (the browser and the server
    // must judge configs with the same code) and lints both for that target.
    app(Lints::Denied)?;
    // whet-app only runs in the browser: Trunk has just built it for wasm32 and the browser
    // tests in tests/ drive that build, so a native build of it would test nothing.
    cargo_linted(&["test", "--workspace", "--exclude", "whet-app"])?;
    cuda_tests()
}

/// Whether a build also runs clippy over the workspace's crates, warnings denied.
#[derive(Clone, Copy, PartialEq)]
enum Lints {
    Denied,
    Off,
}

/// clippy-driver is rustc with clippy's lints; `cargo clippy` runs it as the workspace
/// members' compiler (RUSTC_WORKSPACE_WRAPPER) under `cargo check`. Running it so under the
/// real build lints every crate the build compiles without checking all the dependencies a
/// second time (a fresh machine's `cargo clippy --all-targets` took 15 minutes of a 56-minute
/// CI). The arguments travel in CLIPPY_ARGS, separated as cargo-clippy separates them.
fn with_lints(command: &mut Command) -> Result<&mut Command> {
    let cargo_path = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let driver = std::path::Path::new(&cargo_path).with_file_name("clippy-driver");
    if !driver.exists() {
        bail!(
            "{} is missing: install clippy (`rustup component add clippy`)",
            driver.display()
        );
    }
    Ok(command.env("RUSTC_WORKSPACE_WRAPPER", driver).env(
        "CLIPPY_ARGS",
        "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
    ))
}

/// Dependencies' features resolved for the whole workspace, whichever packages a command names.
/// The binaries that tests build with `cargo build -p` (tests/src/prerequisites.rs) then reuse
/// the test build's dependencies; resolved for their own package alone, they rebuilt candle-core,
/// sqlx and the rest with other features, 7 minutes of a fresh CI. The test processes inherit it.
const WORKSPACE_FEATURES: (&str, &str) = ("CARGO_RESOLVER_FEATURE_UNIFICATION", "workspace");

/// `cargo ARGS` with clippy's lints denied on every workspace crate it compiles.
fn cargo_linted(args: &[&str]) -> Result<()> {
    eprintln!(
        "+ cargo {} (clippy-driver for the workspace, -D warnings)",
        args.join(" ")
    );
    run(with_lints(Command::new(env!("CARGO")).args(args))?
        .env(WORKSPACE_FEATURES.0, WORKSPACE_FEATURES.1))
}

/// The CUDA build and the tests that need no GPU, against it: the toolchain from PyPI
/// (installed once, outside the repository), the engine built with `--features cuda`, its unit
/// tests and engine/tests/cuda_build.rs run here with the stub driver (so every CUDA call
/// fails as on a machine without a usable driver). Same target folder as the CPU build: cargo
/// puts the CPU `whet` back in target/debug on the next plain build.
fn cuda_tests() -> Result<()> {
    let toolchain = cuda::ensure_toolchain()?;
    let args = [
        "test",
        "-p",
        "whet-engine",
        "--features",
        "cuda",
        "--lib",
        "--test",
        "cuda_build",
    ];
    eprintln!(
        "+ cargo {} (CUDA toolchain, stub driver; clippy-driver, -D warnings)",
        args.join(" ")
    );
    run(with_lints(&mut Command::new(env!("CARGO")))?
        .args(args)
        .envs(toolchain.build_env())
        .env("LD_LIBRARY_PATH", toolchain.stub_run_library_path())
        .env("WHET_CUDA_STUB_DRIVER", "1")
        .env(WORKSPACE_FEATURES.0, WORKSPACE_FEATURES.1))
}

/// Builds the studio with `trunk build --release` from the workspace root (Trunk.toml), with
/// npm's wasm-opt (app/node_modules/.bin) first on PATH. Trunk runs offline: the tools must be
/// installed already (`.ci/install-studio-tools`).
fn app(lints: Lints) -> Result<()> {
    ensure_wasm_target()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tools = root.join("app/node_modules/.bin");
    if !tools.join("wasm-opt").exists() {
        bail!("app/node_modules/.bin/wasm-opt is missing: run `.ci/install-studio-tools` (or `npm ci --prefix app`)");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(tools).chain(std::env::split_paths(&path)))?;
    let mut trunk = Command::new("trunk");
    trunk
        .args(["build", "--release"])
        .current_dir(&root)
        .env("PATH", path);
    if lints == Lints::Denied {
        eprintln!(
            "+ trunk build --release (clippy-driver for whet-app and whet-shared, -D warnings)"
        );
        with_lints(&mut trunk)?;
    } else {
        eprintln!("+ trunk build --release");
    }
    let status = trunk
        .status()
        .context("running trunk: install it with `.ci/install-studio-tools`")?;
    if !status.success() {
        bail!("`trunk build --release` failed ({status})");
    }
    Ok(())
}

/// The studio with its backend on the embedded defaults: installs the build tools a fresh
/// machine lacks, builds the app if it is missing, builds whet and whet-server, prints a link
/// that opens the studio with the demo preset filled in, and runs the server on
/// 127.0.0.1:8080 (SQLite in ./whet-data) until interrupted.
fn studio() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ensure_studio_tools()?;
    if !root.join("app/dist/index.html").exists() {
        app(Lints::Off)?;
    }
    cargo(&[
        "build",
        "--release",
        "-p",
        "whet-engine",
        "-p",
        "whet-server",
    ])?;
    let whet = root.join("target/release/whet");
    let server = root.join("target/release/whet-server");
    let bind = std::env::var("WHET_BIND").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let link = Command::new(&whet)
        .args([
            "convert",
            "--config",
            "examples/demo.yaml",
            "--to",
            "link",
            "--base",
        ])
        .arg(format!("http://{bind}"))
        .current_dir(&root)
        .output()
        .context("running whet convert")?;
    eprintln!(
        "\nThe studio with the demo preset filled in, ready to submit (the token is printed below):\n  {}\n",
        String::from_utf8_lossy(&link.stdout).trim()
    );
    eprintln!("+ whet-server --bind {bind} --static-dir app/dist --whet-bin target/release/whet");
    let status = Command::new(&server)
        .args(["--bind", &bind, "--static-dir", "app/dist", "--whet-bin"])
        .arg(&whet)
        .current_dir(&root)
        .status()
        .context("running whet-server")?;
    if !status.success() {
        bail!("whet-server stopped ({status})");
    }
    Ok(())
}
