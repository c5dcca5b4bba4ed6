//! Compiles the cxx bridge (`src/gloo/bridge.cc`) against the system's gloo and links it.
//!
//! gloo comes from Debian's `libgloo-dev` (headers in /usr/include/gloo, `libgloo.so` in
//! /usr/lib; no pkg-config file, only CMake's). `GLOO_INCLUDE_DIR` and `GLOO_LIB_DIR` point at
//! another installation. libgloo.so names its own dependencies (hiredis, ibverbs, libstdc++), so
//! linking `gloo` and the C++ runtime is enough.

use std::path::{Path, PathBuf};

const INCLUDE_DIRS: &[&str] = &["/usr/include", "/usr/local/include"];
const LIB_DIRS: &[&str] = &[
    "/usr/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/local/lib",
];

fn main() {
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=GLOO_LIB_DIR");
    println!("cargo:rerun-if-changed=src/gloo/bridge.h");
    println!("cargo:rerun-if-changed=src/gloo/bridge.cc");

    let include_dir = find(
        "GLOO_INCLUDE_DIR",
        INCLUDE_DIRS,
        "gloo/transport/tcp/device.h",
    );
    let lib_dir = find("GLOO_LIB_DIR", LIB_DIRS, "libgloo.so");
    let config = std::fs::read_to_string(include_dir.join("gloo/config.h")).unwrap_or_default();
    if !config.contains("#define GLOO_HAVE_TRANSPORT_TCP 1") {
        panic!(
            "{} says gloo was built without its tcp transport (GLOO_HAVE_TRANSPORT_TCP), which \
             whet-collective uses; install Debian's libgloo-dev or point GLOO_INCLUDE_DIR at a \
             gloo built with it",
            include_dir.join("gloo/config.h").display()
        );
    }

    cxx_build::bridge("src/gloo/ffi.rs")
        .file("src/gloo/bridge.cc")
        .include(&include_dir)
        .std("c++17")
        // The reduction loops run inside gloo's algorithms on every segment: optimise them even
        // in dev builds, as the workspace does for dependencies.
        .opt_level(2)
        .warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .compile("whet_gloo_bridge");

    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=gloo");
}

/// The first directory holding `probe`: the variable's, else the first of `defaults`; a missing
/// gloo stops the build with the fix.
fn find(variable: &str, defaults: &[&str], probe: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(variable) {
        let dir = PathBuf::from(dir);
        if dir.join(probe).exists() {
            return dir;
        }
        panic!(
            "{variable}={} has no {probe}; point it at gloo's {} or unset it",
            dir.display(),
            if probe.ends_with(".h") {
                "include directory"
            } else {
                "library directory"
            }
        );
    }
    defaults
        .iter()
        .map(Path::new)
        .find(|dir| dir.join(probe).exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!(
                "gloo not found: no {probe} under {}. whet-collective links the system's gloo: \
                 on Debian/Ubuntu `apt-get install libgloo-dev` (what .ci/run installs), or set \
                 {variable} to where another installation keeps it",
                defaults.join(", ")
            )
        })
}
