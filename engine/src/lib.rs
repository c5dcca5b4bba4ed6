//! whet-engine: the headless trainer behind the `whet` binary.
//!
//! The CLI lives in `cli`; everything it needs from configs comes from whet-shared.

pub mod bench;
pub mod cli;
pub mod cuda;
pub mod dataset;
pub mod device;
pub mod dtype;
pub mod generate;
pub mod grad;
pub mod host;
pub mod hub;
pub mod launch;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod preview;
pub mod quant;
pub mod rng;
pub mod sync;
pub mod tensor_files;
pub mod tensorboard;
pub mod train;
