//! Training: the recipe ([`recipe::train`]) and the small components it reads from top to
//! bottom — data ([`data`]), the sampler's RNG ([`crate::rng`]), checkpoints and the output layout
//! ([`checkpoint`]), logged metrics and the TensorBoard/plot hook ([`metrics`]), and the
//! console ([`progress`]).

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod progress;
pub mod recipe;

pub use metrics::ScalarSink;
pub use recipe::{train, NonFiniteError, Plan, RunSummary};

#[cfg(test)]
mod template_parity;
