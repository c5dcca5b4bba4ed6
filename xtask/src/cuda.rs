//! `cargo xtask cuda-toolchain`: NVIDIA's CUDA 13.0 toolchain from PyPI's wheels, in a folder
//! outside the repository, so that `--features cuda` builds on a machine without a GPU (or a
//! system CUDA). The recipe is ../shared/reference/toolchain-notes.md §3:
//!
//! * the wheels (nvcc with its nvvm and crt, cccl's headers, the runtime, cuBLAS, cuRAND,
//!   NVRTC and NCCL ≥ 2.30 for cudarc's `nccl-02030` bindings) in a venv;
//! * `link/`: the unversioned `libX.so` names the linker wants, pointing at the wheels'
//!   versioned files (`libcublas.so -> libcublas.so.13`);
//! * `stub/`: a generated `libcuda.so` (soname `libcuda.so.1`): every `cu*` function of the
//!   wheel's `cuda.h`, each returning CUDA_ERROR_UNKNOWN. No wheel ships the driver's library;
//!   the stub lets the binary link, and lets the GPU-free tests run it here (where every CUDA
//!   call fails cleanly). On a GPU machine the driver's real `libcuda.so.1` is used instead:
//!   the stub folder never goes on a GPU machine's LD_LIBRARY_PATH.
//!
//! It prints the environment to build with, as `export` lines (`eval "$(cargo xtask
//! cuda-toolchain)"`); progress goes to stderr.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// The wheels, pinned: CUDA 13.0 (what the GPU machines' PyTorch wheels carry, and a driver
/// ≥ 580 runs), NCCL 2.30 (cudarc's default bindings).
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-nccl-cu13==2.30.7",
];

/// The libraries cudarc and candle-kernels link (`-lX`), besides libcuda (the stub).
const LINKED: &[&str] = &["cudart", "cublas", "cublasLt", "curand", "nvrtc", "nccl"];

/// The compute capability candle's kernels are compiled for, as PTX: 8.0 (A100), which the
/// driver JIT-compiles for 9.0 (H100/H200) too. whet's own kernels are a fatbin for both.
const CANDLE_COMPUTE_CAP: &str = "80";

/// Where the toolchain lives: `$WHET_CUDA_TOOLCHAIN`, else `~/.cache/whet/cuda-13.0`.
pub fn toolchain_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WHET_CUDA_TOOLCHAIN") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".cache/whet/cuda-13.0")
}

/// The installed toolchain's folders.
pub struct Toolchain {
    /// `site-packages/nvidia/cu13`: bin/nvcc, include/, lib/ (the CUDA_ROOT).
    pub cuda_root: PathBuf,
    /// `site-packages/nvidia/nccl/lib`.
    pub nccl_lib: PathBuf,
    pub link: PathBuf,
    pub stub: PathBuf,
}

impl Toolchain {
    /// The build environment: nvcc first on PATH, CUDA_ROOT, the compute capability, and the
    /// link and stub folders on LIBRARY_PATH.
    pub fn build_env(&self) -> Vec<(String, String)> {
        let path = std::env::var("PATH").unwrap_or_default();
        let library_path = join(
            &[&self.link, &self.stub],
            std::env::var("LIBRARY_PATH").ok(),
        );
        vec![
            (
                "PATH".into(),
                format!("{}:{path}", self.cuda_root.join("bin").display()),
            ),
            ("CUDA_ROOT".into(), self.cuda_root.display().to_string()),
            ("CUDA_COMPUTE_CAP".into(), CANDLE_COMPUTE_CAP.into()),
            ("LIBRARY_PATH".into(), library_path),
        ]
    }

    /// LD_LIBRARY_PATH for running a CUDA build on this machine, without a GPU: the wheels'
    /// libraries and the stub driver (never on a GPU machine, where the real driver is).
    pub fn stub_run_library_path(&self) -> String {
        join(
            &[&self.cuda_root.join("lib"), &self.nccl_lib, &self.stub],
            None,
        )
    }
}

fn join(dirs: &[&Path], rest: Option<String>) -> String {
    let mut parts: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    parts.extend(rest.filter(|r| !r.is_empty()));
    parts.join(":")
}

/// `cargo xtask cuda-toolchain`: installs (or finds) the toolchain and prints its build
/// environment as `export` lines.
pub fn print_toolchain() -> Result<()> {
    let toolchain = ensure_toolchain()?;
    for (key, value) in toolchain.build_env() {
        println!("export {key}='{value}'");
    }
    eprintln!(
        "To run a CUDA build here without a GPU (every CUDA call fails cleanly):\n  \
         export LD_LIBRARY_PATH='{}'\nOn a GPU machine, set LD_LIBRARY_PATH to the CUDA 13 \
         libraries only (e.g. PyTorch's site-packages/nvidia/cu13/lib and nvidia/nccl/lib), \
         never to the stub.",
        toolchain.stub_run_library_path()
    );
    Ok(())
}

/// Installs the toolchain unless the folder already holds this list of wheels.
pub fn ensure_toolchain() -> Result<Toolchain> {
    let dir = toolchain_dir();
    let stamp = dir.join(".whet-wheels");
    let wanted = WHEELS.join("\n");
    let venv = dir.join("venv");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(&wanted) {
        eprintln!("+ installing CUDA 13.0 wheels into {}", venv.display());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("python3 -m venv (on Debian: apt-get install python3-venv)")?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(WHEELS))?;
    }
    let site = site_packages(&venv)?;
    let toolchain = Toolchain {
        cuda_root: site.join("nvidia/cu13"),
        nccl_lib: site.join("nvidia/nccl/lib"),
        link: dir.join("link"),
        stub: dir.join("stub"),
    };
    make_links(&toolchain)?;
    make_stub_driver(&toolchain)?;
    std::fs::write(&stamp, wanted)?;
    Ok(toolchain)
}

fn site_packages(venv: &Path) -> Result<PathBuf> {
    let lib = venv.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path().join("site-packages");
        if path.join("nvidia").is_dir() {
            return Ok(path);
        }
    }
    bail!("no site-packages/nvidia under {}", lib.display())
}

/// `link/libX.so -> <wheel>/libX.so.N` for each linked library.
fn make_links(toolchain: &Toolchain) -> Result<()> {
    std::fs::create_dir_all(&toolchain.link)?;
    let dirs = [toolchain.cuda_root.join("lib"), toolchain.nccl_lib.clone()];
    for name in LINKED {
        let unversioned = format!("lib{name}.so");
        let mut found: Option<PathBuf> = None;
        for dir in &dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let versioned = file
                    .strip_prefix(unversioned.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'));
                // The shortest versioned name is the soname (libcublas.so.13, not .so.13.0.2).
                if versioned
                    && found
                        .as_ref()
                        .is_none_or(|f| f.as_os_str().len() > dir.join(&file).as_os_str().len())
                {
                    found = Some(dir.join(&file));
                }
            }
        }
        let versioned = found.with_context(|| format!("no {unversioned}.N in the CUDA wheels"))?;
        let link = toolchain.link.join(&unversioned);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&versioned, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// Builds `stub/libcuda.so` from the wheel's `cuda.h`: the preprocessed header's `cu*`
/// function names (after its `_v2` renames), each defined to return 999
/// (CUDA_ERROR_UNKNOWN).
fn make_stub_driver(toolchain: &Toolchain) -> Result<()> {
    let library = toolchain.stub.join("libcuda.so");
    if library.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&toolchain.stub)?;
    let header = toolchain.cuda_root.join("include/cuda.h");
    let preprocessed = Command::new("cc")
        .args(["-E", "-P"])
        .arg(format!(
            "-I{}",
            toolchain.cuda_root.join("include").display()
        ))
        .arg(&header)
        .output()
        .context("running cc -E on cuda.h")?;
    if !preprocessed.status.success() {
        bail!(
            "cc -E {} failed: {}",
            header.display(),
            String::from_utf8_lossy(&preprocessed.stderr)
        );
    }
    let names = driver_functions(&String::from_utf8_lossy(&preprocessed.stdout));
    if names.len() < 100 {
        bail!(
            "found only {} cu* functions in {}",
            names.len(),
            header.display()
        );
    }
    let source: String = names
        .iter()
        .map(|name| format!("int {name}(void) {{ return 999; }}\n"))
        .collect();
    let c_file = toolchain.stub.join("libcuda_stub.c");
    std::fs::write(&c_file, source)?;
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&library)
        .arg(&c_file))?;
    let soname = toolchain.stub.join("libcuda.so.1");
    let _ = std::fs::remove_file(&soname);
    std::os::unix::fs::symlink("libcuda.so", &soname)?;
    eprintln!(
        "+ stub driver {} ({} functions)",
        library.display(),
        names.len()
    );
    Ok(())
}

/// The distinct identifiers `cu[A-Z]…` followed by `(` in a preprocessed C header.
fn driver_functions(header: &str) -> Vec<String> {
    let bytes = header.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = std::collections::BTreeSet::new();
    let mut i = 0;
    while i + 2 < bytes.len() {
        let starts = bytes[i] == b'c'
            && bytes[i + 1] == b'u'
            && bytes[i + 2].is_ascii_uppercase()
            && (i == 0 || !is_ident(bytes[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let end = (i..bytes.len())
            .find(|&j| !is_ident(bytes[j]))
            .unwrap_or(bytes.len());
        let after = header[end..].trim_start();
        if after.starts_with('(') {
            names.insert(header[i..end].to_string());
        }
        i = end;
    }
    names.into_iter().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn driver_functions_are_the_called_cu_identifiers() {
        let header = "CUresult cuInit(unsigned int Flags);\n\
                      CUresult  cuCtxCreate_v2 (CUcontext *pctx);\n\
                      typedef CUresult (*cuFn)(void); int mycuFoo(void); cuda(1);";
        assert_eq!(
            super::driver_functions(header),
            ["cuCtxCreate_v2", "cuInit"]
        );
    }
}
