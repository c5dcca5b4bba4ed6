//! The CUDA build (`--features cuda`) on a machine without a GPU. `cargo xtask test` runs it
//! with the CUDA toolchain's stub driver on LD_LIBRARY_PATH (every driver call fails, as on a
//! machine whose driver is missing or broken) and WHET_CUDA_STUB_DRIVER=1: a job that names
//! GPUs is refused before any work with what the driver said; `whet check` says what it sees;
//! the CPU still trains. On a machine with a real driver these checks do not apply.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn whet() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_whet"));
    command.current_dir(root());
    command
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whet-cuda-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether the driver here is the toolchain's stub; else says SKIPPED (an error in CI).
fn on_stub_driver(test: &str) -> bool {
    if std::env::var("WHET_CUDA_STUB_DRIVER").as_deref() == Ok("1") {
        return true;
    }
    let reason = "WHET_CUDA_STUB_DRIVER is not 1 (run through `cargo xtask test`, which puts the stub driver on LD_LIBRARY_PATH)";
    assert!(
        std::env::var("WHET_REQUIRE_ALL").as_deref() != Ok("1"),
        "{test} cannot run: {reason}"
    );
    eprintln!("SKIPPED {test}: {reason}");
    false
}

#[test]
fn a_gpu_job_without_a_usable_driver_is_refused_before_any_work() {
    if !on_stub_driver("a_gpu_job_without_a_usable_driver_is_refused_before_any_work") {
        return;
    }
    let out = temp_dir("refused").join("output");
    std::fs::create_dir_all(&out).unwrap();
    for (devices, ranks) in [("0", "1"), ("0,1", "2")] {
        let output = whet()
            .env("CUDA_VISIBLE_DEVICES", devices)
            .args([
                "sft",
                "--config",
                "examples/demo.yaml",
                "--nproc_per_node",
                ranks,
            ])
            .arg("--output_dir")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("error[cuda_unusable] cuda_visible_devices")
                && stderr.contains("no GPU can be used: cuInit failed with CUDA_ERROR_UNKNOWN")
                && stderr.contains("CUDA driver version")
                && stderr.contains("nvidia-smi")
                && stderr.contains("nothing was trained"),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "nothing written"
        );
    }
}

#[test]
fn check_reports_the_gpus_it_can_see() {
    if !on_stub_driver("check_reports_the_gpus_it_can_see") {
        return;
    }
    let output = whet()
        .env("CUDA_VISIBLE_DEVICES", "0")
        .args(["check", "--config", "examples/demo.yaml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("devices: no GPU usable under CUDA_VISIBLE_DEVICES=0: cuInit failed with CUDA_ERROR_UNKNOWN"),
        "{stdout}"
    );
}

#[test]
fn the_cpu_still_trains_in_a_cuda_build() {
    let out = temp_dir("cpu").join("output");
    let output = whet()
        .env("CUDA_VISIBLE_DEVICES", "")
        .args([
            "sft",
            "--config",
            "examples/demo.yaml",
            "--max_steps",
            "2",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
        ])
        .arg("--output_dir")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let runs: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
    let logging = runs[0].path().join("logging.jsonl");
    let log = std::fs::read_to_string(&logging).unwrap();
    assert!(log.contains("\"loss\""), "{log}");
}
