//! Memory per GPU for a training config, split into weights, gradients, optimizer states,
//! activations and overhead (the parts add up to the total).
//!
//! The model (bytes; P = parameters, T = trainable parameters, N = data-parallel ranks,
//! b = bytes per element of the compute dtype: 2 for bf16/fp16, 4 for fp32):
//!
//! * Full fine-tuning uses mixed precision as DeepSpeed and whet do: b·P weights, b·P gradients,
//!   and in fp32 the optimizer holds Adam's m and v plus, when computing in 16 bits, an fp32
//!   master copy: K = 12 bytes per parameter (8 when the model is fp32, which needs no master).
//!   ZeRO shards these over N ranks (Rajbhandari et al. 2020): stage 1 shards the optimizer
//!   (K·P/N), stage 2 also the gradients (b·P/N), stage 3 also the weights (b·P/N, plus the two
//!   largest layers gathered at a time). `_offload` moves the optimizer (and for zero3 the
//!   weights) to CPU memory: 0 on the GPU.
//! * LoRA keeps the frozen base in b bytes (QLoRA: 4-bit NF4 = 0.5 byte per linear weight plus
//!   one fp32 absmax per 64 weights, or with double quantisation an 8-bit absmax and one fp32 per
//!   256 blocks: 0.5 + 1/64 + 4/16384 bytes; embeddings, norms and router stay in b bytes;
//!   8-bit = 1 byte). The T adapter weights train in fp32: 4T weights, 4T gradients, 8T Adam.
//! * Activations for B samples of L tokens (L = max_length, 2048 when unset), per token and
//!   decoder layer, elements kept for backward: attention 2h + (n_q + 2 n_kv)·d +
//!   2 (n_q + n_kv)·d + n_q·d (norm in/out, q/k/v, q/k-norm and RoPE outputs, attention output), plus 2 n_q·L for
//!   eager attention's scores and probabilities; MLP 2h + 4i (dense) or 2h + E + k (h + 4 i_moe)
//!   (MoE: router logits and the k experts' inputs and intermediates). Without gradient
//!   checkpointing every layer keeps these; with it, each layer keeps only its input (h per
//!   token) and one layer at a time is recomputed. The logits add B·L·V·(b + 4 + 4) bytes
//!   (logits, their fp32 copy and the log-softmax for the loss).
//! * Overhead: 0.75 GiB for the CUDA context and kernels' workspaces, 0.5 GiB of NCCL buffers
//!   with more than one rank, DeepSpeed's all-gather and reduce buckets (2 × 2e8 elements) when
//!   `--deepspeed` is set, and 5 % of everything else for allocator fragmentation.

use serde::Serialize;

use crate::config::{SftConfig, TorchDtype, ZeroSettings};
use crate::models::ModelFacts;

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Sequence length assumed when max_length is unset.
pub const DEFAULT_SEQ_LEN: u64 = 2048;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub per_gpu_gib: f64,
    pub weights_gib: f64,
    pub gradients_gib: f64,
    pub optimizer_gib: f64,
    pub activations_gib: f64,
    pub overhead_gib: f64,
    /// Optimizer states and weights held in CPU memory by `_offload`, per rank.
    pub cpu_offload_gib: f64,
    pub total_params: u64,
    pub trainable_params: u64,
    pub compute_dtype: TorchDtype,
    pub seq_len: u64,
}

/// What the estimate needs besides the model: how many ranks share the states and how.
#[derive(Debug, Clone, Copy)]
pub struct Sharding {
    pub world_size: u64,
    pub zero: ZeroSettings,
    /// Whether `--deepspeed` is set (its buckets cost memory even at stage 0).
    pub deepspeed: bool,
}

/// The compute dtype: `--torch_dtype`, else the model's own, else bfloat16.
pub fn compute_dtype(config: &SftConfig, facts: &ModelFacts) -> TorchDtype {
    config
        .torch_dtype
        .or(facts.torch_dtype)
        .unwrap_or(TorchDtype::Bfloat16)
}

/// Bytes per parameter of a quantised linear weight.
pub fn quantized_bytes_per_param(bits: i64, double_quant: bool) -> f64 {
    match bits {
        8 => 1.0,
        _ if double_quant => 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0),
        _ => 0.5 + 4.0 / 64.0,
    }
}

/// Activation elements one token keeps in one decoder layer (see the module comment).
pub fn activation_elements_per_token_layer(
    facts: &ModelFacts,
    layer: u64,
    seq_len: u64,
    eager: bool,
) -> f64 {
    let h = facts.hidden_size as f64;
    let q = (facts.num_heads * facts.head_dim) as f64;
    let kv = (facts.num_kv_heads * facts.head_dim) as f64;
    let mut attention = 2.0 * h + (q + 2.0 * kv) + 2.0 * (q + kv) + q;
    if eager {
        attention += 2.0 * (facts.num_heads * seq_len) as f64;
    }
    let mlp = if facts.is_moe_layer(layer) {
        2.0 * h
            + facts.num_experts as f64
            + facts.num_experts_per_tok as f64 * (h + 4.0 * facts.moe_intermediate_size as f64)
    } else {
        2.0 * h + 4.0 * facts.intermediate_size as f64
    };
    attention + mlp
}

pub fn estimate(config: &SftConfig, facts: &ModelFacts, sharding: Sharding) -> MemoryEstimate {
    let dtype = compute_dtype(config, facts);
    let b = dtype.bytes();
    let n = sharding.world_size.max(1) as f64;
    let zero = sharding.zero;
    let counts = facts.param_counts();
    let p = counts.total as f64;

    // --- model states
    let (mut weights, gradients, optimizer, trainable, mut cpu_offload);
    if config.is_adapter() {
        let t = facts.lora_params(config.lora_rank.max(0) as u64, &config.target_modules) as f64;
        let base = match config.quant_bits {
            Some(bits) if config.quant_method.is_some() || config.is_qlora() => {
                let linear = counts.linear as f64;
                linear * quantized_bytes_per_param(bits, config.bnb_4bit_use_double_quant)
                    + (p - linear) * b
            }
            _ => p * b,
        };
        let base_on_gpu = if zero.stage >= 3 { base / n } else { base };
        weights = base_on_gpu + 4.0 * t;
        gradients = if zero.stage >= 2 {
            4.0 * t / n
        } else {
            4.0 * t
        };
        let adam = if zero.stage >= 1 {
            8.0 * t / n
        } else {
            8.0 * t
        };
        optimizer = if zero.offload_optimizer { 0.0 } else { adam };
        cpu_offload = if zero.offload_optimizer { adam } else { 0.0 };
        trainable = t as u64;
    } else {
        let k = if dtype == TorchDtype::Float32 {
            8.0
        } else {
            12.0
        };
        let working_set = 2.0 * counts.largest_layer as f64 * b;
        weights = match zero.stage {
            3 if zero.offload_param => working_set,
            3 => p * b / n + working_set,
            _ => p * b,
        };
        gradients = if zero.stage >= 2 { p * b / n } else { p * b };
        let states = if zero.stage >= 1 { k * p / n } else { k * p };
        optimizer = if zero.offload_optimizer { 0.0 } else { states };
        cpu_offload = if zero.offload_optimizer { states } else { 0.0 };
        if zero.stage == 3 && zero.offload_param {
            cpu_offload += p * b / n;
        }
        trainable = counts.total;
    }
    if weights < 0.0 {
        weights = 0.0;
    }

    // --- activations
    let seq_len = config
        .max_length
        .filter(|l| *l > 0)
        .map_or(DEFAULT_SEQ_LEN, |l| l as u64);
    let batch = config.per_device_train_batch_size.max(1) as f64;
    let tokens = batch * seq_len as f64;
    let eager = config.attn_impl.as_deref() == Some("eager");
    let per_layer: Vec<f64> = (0..facts.num_layers)
        .map(|layer| activation_elements_per_token_layer(facts, layer, seq_len, eager))
        .collect();
    let layers_elements = if config.gradient_checkpointing {
        let largest = per_layer.iter().cloned().fold(0.0, f64::max);
        facts.num_layers as f64 * facts.hidden_size as f64 + largest
    } else {
        per_layer.iter().sum()
    };
    let logits = tokens * facts.vocab_size as f64 * (b + 4.0 + 4.0);
    let activations = tokens * layers_elements * b + logits;

    // --- overhead
    let mut overhead = 0.75 * GIB;
    if sharding.world_size > 1 {
        overhead += 0.5 * GIB;
    }
    if sharding.deepspeed {
        overhead += 2.0 * 2e8 * b;
    }
    overhead += 0.05 * (weights + gradients + optimizer + activations);

    let gib = |bytes: f64| bytes / GIB;
    let parts = [weights, gradients, optimizer, activations, overhead].map(gib);
    MemoryEstimate {
        per_gpu_gib: parts.iter().sum(),
        weights_gib: parts[0],
        gradients_gib: parts[1],
        optimizer_gib: parts[2],
        activations_gib: parts[3],
        overhead_gib: parts[4],
        cpu_offload_gib: gib(cpu_offload),
        total_params: counts.total,
        trainable_params: trainable,
        compute_dtype: dtype,
        seq_len,
    }
}

/// On-disk size of one checkpoint: the weights (or adapter) and, unless save_only_model, the
/// optimizer state needed to resume (fp32 master + Adam m, v for full runs; m, v for adapters).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointSize {
    pub weights_gib: f64,
    pub optimizer_gib: f64,
    pub total_gib: f64,
}

pub fn checkpoint_size(config: &SftConfig, facts: &ModelFacts) -> CheckpointSize {
    let dtype = compute_dtype(config, facts);
    let (weights, optimizer) = if config.is_adapter() {
        let t = facts.lora_params(config.lora_rank.max(0) as u64, &config.target_modules) as f64;
        (4.0 * t, 8.0 * t)
    } else {
        let p = facts.param_counts().total as f64;
        let k = if dtype == TorchDtype::Float32 {
            8.0
        } else {
            12.0
        };
        (p * dtype.bytes(), k * p)
    };
    let optimizer = if config.save_only_model {
        0.0
    } else {
        optimizer
    };
    CheckpointSize {
        weights_gib: weights / GIB,
        optimizer_gib: optimizer / GIB,
        total_gib: (weights + optimizer) / GIB,
    }
}
