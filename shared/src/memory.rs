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
//!   (K·P/N), stage 2 also the gradients (b·P/N), stage 3 also the weights (b·P/N, plus what is
//!   gathered at a time: the largest of a decoder layer and an embedding table, twice, since
//!   whet gathers into a flat buffer before it fills the parameters). `_offload` moves the optimizer (and for zero3 the
//!   weights) to CPU memory: 0 on the GPU.
//! * LoRA (as whet-engine runs it) keeps the frozen base once in b bytes and trains T parameters
//!   — A (r × in) and B (out × r) on every linear `lora::AdapterPlan` adapts, plus whatever it
//!   trains in full (modules_to_save, every bias with `lora_bias all`) — as fp32 masters: 4T
//!   weights, 4T gradients, 8T for Adam, and (computing in 16 bits) the b·T copies each use casts
//!   them to. QLoRA stores every frozen decoder projection (attention q/k/v/o, MLP and every
//!   expert's gate/up/down) as bitsandbytes 4-bit, NF4 and FP4 alike: 0.5 byte per weight plus
//!   an fp32 absmax per block of 64 weights, or with double quantisation an 8-bit absmax per
//!   block and an fp32 per 256 blocks (blocks counted per tensor); embeddings, norms, router and
//!   lm_head stay in b bytes, b being `bnb_4bit_compute_dtype`'s (else torch_dtype's). The
//!   engine dequantises a layer's projections to b bytes for its forward and the graph keeps
//!   them for backward: every layer's without gradient checkpointing, one layer's with it.
//! * Activations are what whet-engine's step holds beyond the model states, for B samples of
//!   L tokens (L = max_length, 2048 when unset). The engine differentiates candle graphs, which
//!   keep every intermediate tensor of a forward alive until its backward, so per token and
//!   decoder layer the count is every tensor the layer's forward makes
//!   ([`activation_bytes_per_token_layer`]): the RMSNorms' x², normalised x and output (with the
//!   fp32 copies when computing in 16 bits), q/k/v, the q/k norms, the heads made contiguous,
//!   RoPE's five tensors, the attention output and its merged heads, o, the residuals, and the
//!   MLP's gate, up, SiLU and product (MoE: router logits and softmax, each routed token's
//!   input, expert MLP and weighted output, and the block's running sum, rebuilt once per
//!   expert). Attention is eager unless `attn_impl` names sdpa or flash attention (whet-engine
//!   has only eager, so unset is eager): six (B, heads, L, L) score tensors — scores, scaled,
//!   masked, shifted, exponentiated, normalised — in fp32 but the first two; a fused kernel
//!   keeps one fp32 log-sum-exp per head and token instead. LoRA adds, per adapted linear and token,
//!   `A x` (r), `B A x`, its scaled copy and the sum (3 × out), and with lora_dropout the mask
//!   and the dropped-out input (2 × in); experts' linears count for the share top-k / experts of
//!   the tokens. Every layer's input and the embeddings stay too ((layers + 2) × hidden).
//!   Without gradient checkpointing every layer keeps its tensors; with it, one layer at a time
//!   is recomputed. The backward of a layer needs a working set on top: seven (B, heads, L, L)
//!   fp32 gradients in the softmax (candle's quotient rule holds the incoming gradient, both
//!   partial quotients and the squared sum at full size, and the gradients of the mask and
//!   max broadcasts stay in the layer's store; four MLP widths in b bytes with a fused kernel),
//!   plus, for adapters, a b-byte gradient for every frozen projection of the layer, which
//!   candle computes whether or not the weight trains. The head keeps the final norm and
//!   B·L·V logits in b bytes (plus their fp32 copy for the loss when computing in 16 bits); the
//!   loss's backward adds two fp32 B·L·V gradients (the fused loss's, then candle's
//!   accumulated copy), or one in b bytes plus lm_head's weight gradient twice (V·h·b each)
//!   when that is larger. These phases peak at different moments, but memory one of them frees
//!   stays with the allocator in pieces the other cannot reuse (glibc's heap on the CPU), so
//!   they add up; the gradients, though, are made after the loss's buffers (and without
//!   checkpointing each layer's kept tensors) are freed and take that room, so the activations
//!   count only what the gradients do not reuse.
//! * Overhead: 0.75 GiB for the CUDA context and kernels' workspaces, 0.5 GiB of NCCL buffers
//!   with more than one rank, whet's reduction buckets then (a bucket of DeepSpeed's `auto`
//!   reduce_bucket_size, h² elements, and the gradients made from it, in fp32: whet shards
//!   natively, it allocates no DeepSpeed buffers), and 5 % of everything else for allocator
//!   fragmentation.

use serde::Serialize;

use crate::config::{SftConfig, TorchDtype, ZeroSettings};
use crate::lora::AdapterPlan;
use crate::models::{AdapterCounts, ModelFacts};

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Sequence length assumed when max_length is unset.
pub const DEFAULT_SEQ_LEN: u64 = 2048;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub per_gpu_gib: f64,
    pub weights_gib: f64,
    pub gradients_gib: f64,
    pub optimizer_gib: f64,
    /// What forward keeps and backward needs, less the room the gradients reuse.
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
}

/// The compute dtype: `--torch_dtype`, else the model's own, else bfloat16; QLoRA computes in
/// `--bnb_4bit_compute_dtype` when it is set.
pub fn compute_dtype(config: &SftConfig, facts: &ModelFacts) -> TorchDtype {
    let qlora_dtype = config.bnb_4bit_compute_dtype.filter(|_| config.is_qlora());
    qlora_dtype
        .or(config.torch_dtype)
        .or(facts.torch_dtype)
        .unwrap_or(TorchDtype::Bfloat16)
}

/// What an adapter config trains and freezes on this model. A `target_regex` or `lora_bias`
/// that validation refuses counts as unset here, so the estimate still shows.
pub fn adapter_counts(config: &SftConfig, facts: &ModelFacts) -> AdapterCounts {
    let plan = AdapterPlan::from_config(config).or_else(|_| {
        let mut lenient = config.clone();
        lenient.target_regex = None;
        lenient.lora_bias = "none".into();
        AdapterPlan::from_config(&lenient)
    });
    match plan {
        Ok(plan) => facts.adapter_counts(config.lora_rank.max(0) as u64, &plan),
        Err(_) => AdapterCounts::default(),
    }
}

/// Bytes of the frozen projections stored as bitsandbytes 4-bit: two weights a byte, and the
/// absmax of each block of 64 as fp32, or with double quantisation as one byte plus an fp32
/// per 256 blocks.
pub fn quantized_bytes(counts: &AdapterCounts, double_quant: bool) -> f64 {
    let packed = counts.frozen_projections as f64 * 0.5;
    let constants = if double_quant {
        counts.quant_blocks as f64 + 4.0 * counts.quant_block_groups as f64
    } else {
        4.0 * counts.quant_blocks as f64
    };
    packed + constants
}

/// Whether the estimate counts eager attention's (B, heads, L, L) tensors: whet-engine has no
/// fused kernel, so anything but sdpa or flash attention (unset included) is eager.
pub fn eager_attention(config: &SftConfig) -> bool {
    !matches!(
        config.attn_impl.as_deref(),
        Some("sdpa" | "flash_attn" | "flash_attention_2" | "flash_attention_3")
    )
}

/// 1 when computing in 16 bits, where the engine makes fp32 copies for norms, softmax and loss.
fn casts(b: f64) -> f64 {
    if b < 4.0 {
        1.0
    } else {
        0.0
    }
}

/// Bytes one token keeps through an RMSNorm over `n` elements: x² and the normalised x in
/// fp32 (after an fp32 copy of x and before the cast back, in 16 bits) and the weighted output.
fn rms_norm_bytes(n: f64, b: f64) -> f64 {
    4.0 * n * (2.0 + casts(b)) + b * n * (1.0 + casts(b))
}

/// Bytes one token keeps for backward in one decoder layer of whet-engine's forward, adapters
/// aside (see the module comment), computing in `b` bytes per element.
pub fn activation_bytes_per_token_layer(
    facts: &ModelFacts,
    layer: u64,
    seq_len: u64,
    b: f64,
    eager: bool,
) -> f64 {
    let h = facts.hidden_size as f64;
    let heads = facts.num_heads as f64;
    let q = (facts.num_heads * facts.head_dim) as f64;
    let kv = (facts.num_kv_heads * facts.head_dim) as f64;
    // Norm; q/k/v and the heads made contiguous; RoPE's negated half, concatenation, two
    // products and sum on q and k; the attention output and its merged heads; o; residual.
    let mut attention =
        rms_norm_bytes(h, b) + b * (2.0 * (q + 2.0 * kv) + 4.5 * (q + kv) + 2.0 * q + 2.0 * h);
    if facts.qkv_bias() {
        attention += b * (q + 2.0 * kv);
    }
    if facts.o_proj_bias() {
        attention += b * h;
    }
    if facts.qk_norm() {
        attention += rms_norm_bytes(q, b) + rms_norm_bytes(kv, b);
    }
    attention += if eager {
        // Scores and scaled scores in b, then (after an fp32 copy in 16 bits) masked, shifted,
        // exponentiated and normalised in fp32, and the probabilities cast back.
        heads * seq_len as f64 * (2.0 * b + 16.0 + casts(b) * (4.0 + b))
    } else {
        heads * 4.0
    };
    let mlp = if facts.is_moe_layer(layer) {
        let experts = facts.num_experts as f64;
        let k = facts.num_experts_per_tok as f64;
        // Router logits and their fp32 softmax; per routed token its input, the expert's gate,
        // up, SiLU, product and down, and the weighted output; the running sum the block
        // rebuilds for every expert; the residual.
        b * experts
            + 4.0 * experts * (3.0 + casts(b))
            + b * (k * (3.0 * h + 4.0 * facts.moe_intermediate_size as f64) + experts * h + h)
    } else {
        // Gate, up, SiLU, product, down, residual.
        b * (4.0 * facts.intermediate_size as f64 + 2.0 * h)
    };
    attention + rms_norm_bytes(h, b) + mlp
}

/// Bytes per token of one layer's backward working set beyond what its forward keeps: the
/// softmax's gradients under eager attention (seven (B, heads, L, L) fp32 tensors at its
/// peak), else about four MLP-wide gradients.
pub fn backward_bytes_per_token_layer(
    facts: &ModelFacts,
    layer: u64,
    seq_len: u64,
    b: f64,
    eager: bool,
) -> f64 {
    if eager {
        7.0 * 4.0 * (facts.num_heads * seq_len) as f64
    } else if facts.is_moe_layer(layer) {
        4.0 * b * (facts.num_experts_per_tok * facts.moe_intermediate_size) as f64
    } else {
        4.0 * b * facts.intermediate_size as f64
    }
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
    let adapters = config.is_adapter().then(|| adapter_counts(config, facts));
    if let Some(a) = &adapters {
        let t = a.trainable() as f64;
        let (frozen, dequant_buffer) = if config.is_qlora() {
            // The dequantised projections the graph keeps: all layers', or the recomputed one's.
            let layers = a.frozen_projections_per_layer.iter().copied();
            let dequantised = if config.gradient_checkpointing {
                layers.max().unwrap_or(0)
            } else {
                layers.sum()
            };
            (
                quantized_bytes(a, config.bnb_4bit_use_double_quant) + a.frozen_other as f64 * b,
                dequantised as f64 * b,
            )
        } else {
            ((a.frozen_projections + a.frozen_other) as f64 * b, 0.0)
        };
        // Trainable masters are cast to the compute dtype on use; backward keeps the copies.
        let master_casts = if b < 4.0 { t * b } else { 0.0 };
        let base_on_gpu = if zero.stage >= 3 { frozen / n } else { frozen };
        weights = base_on_gpu + 4.0 * t + master_casts + dequant_buffer;
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
        trainable = a.trainable();
    } else {
        let k = if dtype == TorchDtype::Float32 {
            8.0
        } else {
            12.0
        };
        let table = facts.vocab_size as f64 * facts.hidden_size as f64;
        let working_set = 2.0 * (counts.largest_layer as f64).max(table) * b;
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
    let eager = eager_attention(config);
    let lora_dropout = config.lora_dropout > 0.0;
    let (h, v) = (facts.hidden_size as f64, facts.vocab_size as f64);
    // Per layer: bytes kept per token, and bytes its backward needs on top.
    let (kept, working): (Vec<f64>, Vec<f64>) = (0..facts.num_layers)
        .map(|layer| {
            let i = layer as usize;
            let mut kept = activation_bytes_per_token_layer(facts, layer, seq_len, b, eager);
            let mut working =
                tokens * backward_bytes_per_token_layer(facts, layer, seq_len, b, eager);
            if let Some(a) = &adapters {
                let dropout = if lora_dropout {
                    2.0 * a.lora_inputs_per_token[i]
                } else {
                    0.0
                };
                kept +=
                    b * (a.lora_outputs_per_token[i] + 3.0 * a.lora_widths_per_token[i] + dropout);
                // candle computes a gradient for every frozen weight the layer multiplies by.
                working += b * a.frozen_projections_per_layer[i] as f64;
            }
            (tokens * kept, working)
        })
        .unzip();
    let layers_kept = if config.gradient_checkpointing {
        kept.iter().cloned().fold(0.0, f64::max)
    } else {
        kept.iter().sum()
    };
    let layer_backward = working.iter().cloned().fold(0.0, f64::max);
    // Embeddings and every layer's input; the final norm; the logits (and their fp32 copy).
    let boundaries = tokens * (facts.num_layers as f64 + 2.0) * h * b;
    let head = tokens * rms_norm_bytes(h, b) + tokens * v * (b + 4.0 * casts(b));
    let loss_backward = f64::max(8.0 * tokens * v, b * tokens * v + 2.0 * b * v * h);
    // Gradients are made after the loss's buffers (and, unless recomputed, each layer's kept
    // tensors) are freed, and take that room.
    let freed = loss_backward
        + if config.gradient_checkpointing {
            0.0
        } else {
            layers_kept
        };
    let reused = gradients.min(freed);
    let activations = boundaries + layers_kept + layer_backward + head + loss_backward - reused;

    // --- overhead
    let mut overhead = 0.75 * GIB;
    if sharding.world_size > 1 {
        overhead += 0.5 * GIB + 2.0 * h * h * 4.0;
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

/// A parameter count as model cards write it: `8.19B`, `21.8M`, `140.2K`, `512`.
pub fn params_text(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// The trainable share of the model's parameters: `100%`, `0.27%`, `3.1e-3%`.
pub fn trainable_percent(m: &MemoryEstimate) -> String {
    let share = 100.0 * m.trainable_params as f64 / m.total_params.max(1) as f64;
    if share >= 10.0 || share == 0.0 {
        format!("{share:.0}%")
    } else if share >= 0.01 {
        format!("{share:.2}%")
    } else {
        format!("{share:.1e}%")
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
        let t = adapter_counts(config, facts).trainable() as f64;
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
