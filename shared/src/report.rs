//! The check report: what `whet check --json` prints and `POST /api/check` answers.

use serde::Serialize;

use crate::config::JobConfig;
use crate::derive::{self, CheckContext, Derived};
use crate::diagnostics::Diagnostic;
use crate::validate;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    /// No diagnostic is an error.
    pub ok: bool,
    pub diagnostics: Vec<Diagnostic>,
    pub derived: Derived,
    pub config: JobConfig,
}

/// Validates a config and derives its figures in one go.
pub fn check(config: &JobConfig, context: &CheckContext) -> CheckReport {
    let facts = context.facts_for(config);
    let diagnostics = validate::validate_with(config, context);
    CheckReport {
        ok: !diagnostics.iter().any(Diagnostic::is_error),
        diagnostics,
        derived: derive::derive(config, facts.as_ref(), context.dataset_rows, context.gpu),
        config: config.clone(),
    }
}

/// The report for input that never became a config (a script that does not parse).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedReport {
    pub ok: bool,
    pub diagnostics: Vec<Diagnostic>,
}

impl FailedReport {
    pub fn new(diagnostics: Vec<Diagnostic>) -> Self {
        FailedReport {
            ok: false,
            diagnostics,
        }
    }
}
