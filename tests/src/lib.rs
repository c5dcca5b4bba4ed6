//! Helpers for whet's end-to-end tests: where the workspace's build outputs are, the binaries
//! and tools a test needs (`prerequisites`), a tiny static file server for the studio's
//! `app/dist`, a real whet-server with the `whet` binary (`whet_server`), and a headless
//! Chromium driven through chromedriver.

pub mod browser;
pub mod prerequisites;
pub mod static_server;
pub mod whet_server;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies in the workspace")
        .to_path_buf()
}

/// Cargo's target folder (CARGO_TARGET_DIR when set, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace().join(dir)
            }
        }
        None => workspace().join("target"),
    }
}

/// Where tests leave screenshots and reports: `<target>/test-artifacts`.
pub fn artifacts_dir() -> PathBuf {
    let dir = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("creating the test-artifacts folder");
    dir
}

/// The built studio (`trunk build --release` output), or a panic saying how to build it.
pub fn app_dist() -> PathBuf {
    let dist = std::env::var_os("WHET_APP_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("app/dist"));
    let has_wasm = std::fs::read_dir(&dist)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "wasm"))
        })
        .unwrap_or(false);
    if !dist.join("index.html").is_file() || !has_wasm {
        panic!(
            "the studio is not built: {} has no index.html and .wasm.\n\
             Build it with `cargo xtask app` (or `PATH=$PWD/app/node_modules/.bin:$PATH trunk build --release` \
             from the workspace root); install the tools first with `.ci/install-studio-tools`.",
            dist.display()
        );
    }
    dist
}
