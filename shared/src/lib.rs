//! whet-shared: the config schema shared by the engine, the server and the studio — its
//! validation rules, derived figures (effective batch, steps, memory per GPU, disk), shell
//! import/export, config files and share links.
//!
//! Everything here is pure: no file, network, process or clock access, so the same code judges
//! a config natively and in the browser (wasm32). Callers pass in what it needs (file contents,
//! dataset row counts, model facts).

// Diagnostic is the error type by design: a user-facing value, not a boxed error.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod builder;
pub mod config;
pub mod dataset_spec;
pub mod derive;
pub mod diagnostics;
pub mod events;
pub mod fields;
pub mod files;
pub mod form;
pub mod gpus;
pub mod lora;
pub mod memory;
pub mod models;
pub mod presets;
pub mod preview;
pub mod report;
pub mod schedule;
pub mod share;
pub mod shell;
pub mod validate;

pub use config::{JobConfig, LaunchConfig, SftConfig};
pub use derive::{derive, CheckContext, Derived};
pub use diagnostics::{Diagnostic, Diagnostics, Severity};
pub use files::{parse_config_text, to_config_text, Format};
pub use models::ModelFacts;
pub use report::{check, CheckReport};
pub use shell::{
    parse_shell, parse_shell_onto, parse_shell_with, to_shell, to_shell_with, Dialect, ShellOptions,
};
pub use validate::{validate, validate_with};
