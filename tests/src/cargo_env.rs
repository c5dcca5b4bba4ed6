//! The variables cargo sets for the one package it runs (`cargo run`, `cargo test`). Some build
//! scripts watch them (ring's reruns when CARGO_PKG_NAME changes), so a cargo started with them
//! left in redoes those crates and everything above them. xtask and the tests' own builds
//! (prerequisites.rs) both include this file by path and start cargo without them.

/// Whether `name` is one of them.
fn is_package_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_MANIFEST_LINKS",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
        ]
        .contains(&name)
}

/// `command` without them.
pub fn without_package_variables(
    command: &mut std::process::Command,
) -> &mut std::process::Command {
    for (key, _) in std::env::vars_os() {
        if is_package_variable(&key.to_string_lossy()) {
            command.env_remove(key);
        }
    }
    command
}
