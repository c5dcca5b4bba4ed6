//! The models whet trains: their configuration ([`config`]) and the Qwen2/Qwen3/Qwen3-MoE
//! network ([`qwen3`]) with its parameters and their roles ([`params`]).

pub mod adapter;
pub mod config;
pub mod lora;
pub mod params;
pub mod qwen3;

pub use config::{Architecture, ConfigError, ModelConfig, MoeConfig};
pub use params::{FlatLayout, LoraOptions, Param, Trainable, TrainableParams, WeightSource};
pub use qwen3::{Model, ModelError, ModelOptions, ModelOutput};
