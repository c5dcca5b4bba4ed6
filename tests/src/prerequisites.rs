//! What tests need beyond their own crate: the workspace's binaries, built on demand, and the
//! optional tools (the Python reference environment, PostgreSQL, ...), found or else skipped out
//! loud. The engine and server tests include this file by path (they must not depend on this
//! crate's browser stack), so it uses std only.
// Each test crate that includes this file uses only part of it.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

#[path = "cargo_env.rs"]
mod cargo_env;

/// The environment variable that turns every skip into a failure; `.ci/run` sets it, so CI runs
/// every test.
pub const REQUIRE_ALL: &str = "WHET_REQUIRE_ALL";

/// Says that `test` did not run and why, as `SKIPPED: <test>: <why>` on stderr; with
/// `WHET_REQUIRE_ALL=1` it panics instead. The caller returns right after.
pub fn skip(test: &str, why: &str) {
    if std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why} ({REQUIRE_ALL}=1: no test may be skipped)");
    }
    // libtest captures eprintln! of passing tests, not writes to the stream itself.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// The folder of the running test executable's profile: `<target>/<profile>` (it runs from
/// `<target>/<profile>/deps`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executables live in <target>/<profile>/deps")
        .to_path_buf()
}

/// A binary of another workspace package, built with `cargo build -p <package> --bin <bin>`
/// into this test's target folder and profile the first time a test process asks for it, so it
/// is never stale (a test can name only its own package's binaries with `CARGO_BIN_EXE_*`).
/// Under `cargo xtask test` (CARGO_RESOLVER_FEATURE_UNIFICATION=workspace, inherited) this
/// reuses the test build's dependencies; otherwise it may build some again with other features.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let profile_dir = profile_dir();
    let path = profile_dir.join(bin);
    if built.iter().any(|b| b == bin) {
        return path;
    }
    let target_dir = profile_dir.parent().expect("<target>/<profile>");
    let mut args = vec!["build", "-p", package, "--bin", bin];
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    match profile {
        "debug" => {}
        "release" => args.push("--release"),
        other => args.extend(["--profile", other]),
    }
    let command = format!("cargo {}", args.join(" "));
    let mut cargo = Command::new(env!("CARGO"));
    // The same environment as xtask's builds, whatever package this test is in.
    cargo_env::without_package_variables(&mut cargo);
    let status = cargo
        .args(&args)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap_or_else(|e| panic!("running `{command}`: {e}"));
    assert!(status.success(), "`{command}` failed ({status})");
    assert!(
        path.is_file(),
        "`{command}` did not produce {}",
        path.display()
    );
    built.push(bin.to_string());
    path
}

/// The `whet` binary (whet-engine), built when needed.
pub fn whet_binary() -> PathBuf {
    workspace_binary("whet-engine", "whet")
}

/// The Python interpreter of the reference environment (transformers, PEFT, tensorboard):
/// `WHET_REF_PYTHON`, else `~/refenv/bin/python`. Err says what is missing and how to make it.
pub fn reference_python() -> Result<PathBuf, String> {
    let python = match std::env::var_os("WHET_REF_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
            Path::new(&home).join("refenv/bin/python")
        }
    };
    if python.is_file() {
        Ok(python)
    } else {
        Err(format!(
            "no reference Python at {} (make it with `python3 -m venv ~/refenv && \
             ~/refenv/bin/pip install -r ../shared/tools/requirements.txt`, or set WHET_REF_PYTHON)",
            python.display()
        ))
    }
}

/// The reference Python when it can import `module`; Err says why not.
pub fn reference_python_with(module: &str) -> Result<PathBuf, String> {
    let python = reference_python()?;
    let imports = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|out| out.status.success());
    if imports {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import {module} (`.ci/run` installs it into the reference environment)",
            python.display()
        ))
    }
}
