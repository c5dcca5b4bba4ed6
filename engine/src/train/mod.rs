//! Training: the recipe ([`recipe::train`]) and the components it reads from top to bottom —
//! set-up ([`setup`]), the plan of steps and events ([`plan`]), data ([`data`]) and batches
//! ([`loader`]), one step's forward/backward ([`step`]), evaluation ([`eval`]), checkpoints and
//! the trainer state ([`checkpoint`]), the run folder ([`outputs`]), logged metrics and the
//! TensorBoard/plot hook ([`metrics`]), and the console ([`progress`]).

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod loader;
pub mod metrics;
pub mod outputs;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod setup;
pub mod step;

pub use metrics::ScalarSink;
pub use plan::Plan;
pub use recipe::{train, NonFiniteError, RunSummary};

#[cfg(test)]
mod template_parity;
