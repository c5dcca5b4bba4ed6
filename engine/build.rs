//! With the `cuda` feature, compiles whet's own CUDA kernels (kernels/*.cu) with nvcc into one
//! fatbin per file — machine code for sm_80 (A100) and sm_90 (H100/H200) plus compute_90 PTX
//! for later GPUs — that the engine embeds and loads on first use. Without the feature it
//! does nothing, so the CPU build needs no CUDA.
//!
//! nvcc is `$NVCC`, else `$CUDA_ROOT`/`$CUDA_HOME`/`$CUDA_PATH` `/bin/nvcc`, else the PATH's;
//! `WHET_CUDA_ARCHS` (e.g. `80,90`) replaces the architecture list.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=WHET_CUDA_ARCHS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    let archs = std::env::var("WHET_CUDA_ARCHS").unwrap_or_else(|_| "80,90".into());
    let archs: Vec<&str> = archs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let mut gencode: Vec<String> = archs
        .iter()
        .map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}"))
        .collect();
    if let Some(last) = archs.last() {
        gencode.push(format!("-gencode=arch=compute_{last},code=compute_{last}"));
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("engine/kernels exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let mut modules = String::new();
    for source in &sources {
        let stem = source
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 name");
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let status = Command::new(&nvcc)
            .arg("--fatbin")
            .args(["-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .args(&gencode)
            .arg("-Ikernels")
            .arg("-o")
            .arg(&fatbin)
            .arg(source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {}: {e} (install CUDA, or run `cargo xtask cuda-toolchain`)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", source.display());
        let name = stem.to_uppercase();
        modules.push_str(&format!(
            "/// kernels/{stem}.cu, compiled for {archs:?}.\npub const {name}: Module = Module {{ name: \"{stem}\", image: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\")) }};\n"
        ));
    }
    std::fs::write(out_dir.join("kernels.rs"), modules).expect("writing kernels.rs");
}

fn nvcc() -> PathBuf {
    println!("cargo::rerun-if-env-changed=NVCC");
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return nvcc.into();
    }
    for root in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo::rerun-if-env-changed={root}");
        if let Some(root) = std::env::var_os(root) {
            let nvcc = Path::new(&root).join("bin/nvcc");
            if nvcc.exists() {
                return nvcc;
            }
        }
    }
    "nvcc".into()
}
