//! What the estimates need to know about a model: its shapes, parameter counts and default
//! template. Built from a config.json text or from a built-in catalog of the Qwen3 and Qwen2.5
//! families, so the offline editor can estimate without downloading anything.

use std::cell::RefCell;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::TorchDtype;
use crate::lora::AdapterPlan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    #[serde(rename = "Qwen3ForCausalLM")]
    Qwen3,
    #[serde(rename = "Qwen3MoeForCausalLM")]
    Qwen3Moe,
    #[serde(rename = "Qwen2ForCausalLM")]
    Qwen2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    pub name: String,
    pub architecture: Architecture,
    /// ms-swift's model_type (qwen3, qwen3_moe, qwen2_5).
    pub model_type: String,
    /// The chat template ms-swift picks for it.
    pub template: String,
    pub hidden_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
    pub vocab_size: u64,
    pub max_position_embeddings: u64,
    /// 0 for dense models.
    pub num_experts: u64,
    pub num_experts_per_tok: u64,
    pub moe_intermediate_size: u64,
    /// Layers with a dense MLP in a MoE model.
    pub mlp_only_layers: Vec<u64>,
    pub decoder_sparse_step: u64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2); Qwen3 has q/k norms instead.
    pub attention_bias: bool,
    pub torch_dtype: Option<TorchDtype>,
}

/// Parameter counts by kind, for the memory and disk estimates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamCounts {
    pub total: u64,
    /// Parameters one token passes through (MoE: only its top-k experts).
    pub active: u64,
    /// Input embedding plus output projection (once when tied).
    pub embeddings: u64,
    /// Weights of the linear projections (attention, MLP, experts): what QLoRA quantises.
    pub linear: u64,
    /// The largest decoder layer, for ZeRO-3's gathered working set.
    pub largest_layer: u64,
}

/// Weights per bitsandbytes absmax block (`blocksize` 64 for 4-bit).
pub const QUANT_BLOCK: u64 = 64;
/// Blocks per second-level constant with double quantisation (bitsandbytes' 256).
pub const QUANT_BLOCK_GROUP: u64 = 256;

/// What a parameter tensor is to the estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// The weight of a decoder projection (attention q/k/v/o, MLP or an expert's
    /// gate/up/down): what QLoRA stores in 4 bits.
    Projection,
    /// The MoE router (`mlp.gate`): a linear kept in the compute dtype.
    Router,
    Bias,
    Norm,
    Embedding,
    /// The output projection (untied models only).
    LmHead,
}

/// One parameter tensor of a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct TensorInfo<'a> {
    /// The Hugging Face name, `model.layers.0.self_attn.q_proj.weight`.
    pub name: &'a str,
    pub kind: TensorKind,
    /// (out, in) of a linear weight, (vocab, hidden) of the embedding, (len, 1) of a vector.
    pub shape: (u64, u64),
    /// The decoder layer it sits in (none for the embedding, final norm and lm_head).
    pub layer: Option<u64>,
    /// Whether it belongs to one of a MoE layer's experts.
    pub expert: bool,
}

impl TensorInfo<'_> {
    pub fn numel(&self) -> u64 {
        self.shape.0 * self.shape.1
    }

    /// The module the tensor belongs to: its name without `.weight` / `.bias`.
    pub fn module(&self) -> &str {
        self.name.rsplit_once('.').map_or(self.name, |(m, _)| m)
    }
}

/// Writes tensor names into one buffer for [`ModelFacts::for_each_tensor`]: a MoE model has
/// tens of thousands of tensors.
struct TensorNames<'v, F> {
    name: String,
    visit: &'v mut F,
    /// Where the tensors emitted now sit.
    layer: Option<u64>,
    expert: bool,
}

impl<F: FnMut(&TensorInfo)> TensorNames<'_, F> {
    fn emit(&mut self, prefix: &str, leaf: &str, kind: TensorKind, shape: (u64, u64)) {
        self.name.clear();
        self.name.push_str(prefix);
        if !prefix.is_empty() {
            self.name.push('.');
        }
        self.name.push_str(leaf);
        (self.visit)(&TensorInfo {
            name: &self.name,
            kind,
            shape,
            layer: self.layer,
            expert: self.expert,
        });
    }

    /// A SwiGLU MLP of `width` under `prefix` (a dense MLP or one expert).
    fn mlp(&mut self, prefix: &str, hidden: u64, width: u64) {
        for (leaf, shape) in [
            ("gate_proj.weight", (width, hidden)),
            ("up_proj.weight", (width, hidden)),
            ("down_proj.weight", (hidden, width)),
        ] {
            self.emit(prefix, leaf, TensorKind::Projection, shape);
        }
    }
}

/// An adapter run's parameters by role (see [`ModelFacts::adapter_counts`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct AdapterCounts {
    /// LoRA's A and B matrices.
    pub lora: u64,
    /// Parameters trained in full beside the adapters (modules_to_save, `lora_bias all`).
    pub full: u64,
    /// Frozen projection weights: what QLoRA quantises.
    pub frozen_projections: u64,
    /// Absmax blocks of [`QUANT_BLOCK`] weights over those, counted tensor by tensor.
    pub quant_blocks: u64,
    /// Groups of [`QUANT_BLOCK_GROUP`] blocks (double quantisation's fp32 constants).
    pub quant_block_groups: u64,
    /// Frozen projection weights per decoder layer: what QLoRA dequantises for the layer's
    /// forward, and the weight gradients candle's backward computes for them anyway.
    pub frozen_projections_per_layer: Vec<u64>,
    /// Every other frozen parameter: embeddings, norms, router, lm_head, frozen biases.
    pub frozen_other: u64,
    /// Per decoder layer and token, the rank-wide `A x` of every adapted linear (experts
    /// weighted by top-k / experts): what backward keeps for B's gradient.
    pub lora_outputs_per_token: Vec<f64>,
    /// Per decoder layer and token, the input width of every adapted linear (same weighting):
    /// what LoRA dropout copies.
    pub lora_inputs_per_token: Vec<f64>,
    /// Per decoder layer and token, the output width of every adapted linear (same weighting):
    /// `B A x`, its scaled copy and the sum with the base output each take that much.
    pub lora_widths_per_token: Vec<f64>,
}

impl AdapterCounts {
    /// Every trained parameter: adapters and the parameters trained in full.
    pub fn trainable(&self) -> u64 {
        self.lora + self.full
    }
}

/// How many recent adapter counts are kept.
const RECENT_COUNTS_KEPT: usize = 8;

thread_local! {
    /// The last few adapter counts. Counting asks the plan about every tensor — tens of
    /// thousands in a MoE model, each a regex match with `target_regex` — while one check
    /// estimates a config several times (the OOM remedies) and the studio checks on every
    /// keystroke. A cache of a pure function: the answers are the same with or without it.
    static RECENT_COUNTS: RefCell<VecDeque<(ModelFacts, u64, AdapterPlan, AdapterCounts)>> =
        const { RefCell::new(VecDeque::new()) };
}

impl ModelFacts {
    pub fn is_moe(&self) -> bool {
        self.num_experts > 0
    }

    /// Whether decoder layer `layer` has a sparse MoE block (transformers' rule).
    pub fn is_moe_layer(&self, layer: u64) -> bool {
        self.is_moe()
            && !self.mlp_only_layers.contains(&layer)
            && self.decoder_sparse_step > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// q/k/v projections have biases: always for Qwen2, with `attention_bias` for Qwen3.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.architecture == Architecture::Qwen2
    }

    /// o_proj has a bias: Qwen3 with `attention_bias` (Qwen2's never has one).
    pub fn o_proj_bias(&self) -> bool {
        self.attention_bias && self.architecture != Architecture::Qwen2
    }

    /// Qwen3 normalises q and k per head (`q_norm`, `k_norm`); Qwen2 does not.
    pub fn qk_norm(&self) -> bool {
        self.architecture != Architecture::Qwen2
    }

    fn attention_params(&self) -> (u64, u64) {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let linear = h * q + 2 * h * kv + q * h;
        let mut extra = 0;
        if self.qkv_bias() {
            extra += q + 2 * kv;
        }
        if self.o_proj_bias() {
            extra += h;
        }
        if self.qk_norm() {
            extra += 2 * self.head_dim;
        }
        (linear, extra)
    }

    /// Counts every parameter from the shapes, as the safetensors files would hold them.
    pub fn param_counts(&self) -> ParamCounts {
        let h = self.hidden_size;
        let embed = self.vocab_size * h;
        let embeddings = if self.tie_word_embeddings {
            embed
        } else {
            2 * embed
        };
        let (attention_linear, attention_extra) = self.attention_params();
        let norms = 2 * h;
        let mut total = embeddings + h; // + final norm
        let mut active = total;
        let mut linear = 0;
        let mut largest_layer = 0;
        for layer in 0..self.num_layers {
            let (mlp_linear, mlp_active, router) = if self.is_moe_layer(layer) {
                let expert = 3 * h * self.moe_intermediate_size;
                (
                    self.num_experts * expert,
                    self.num_experts_per_tok * expert,
                    self.num_experts * h,
                )
            } else {
                let mlp = 3 * h * self.intermediate_size;
                (mlp, mlp, 0)
            };
            let layer_total = attention_linear + attention_extra + norms + mlp_linear + router;
            total += layer_total;
            active += attention_linear + attention_extra + norms + mlp_active + router;
            linear += attention_linear + mlp_linear;
            largest_layer = largest_layer.max(layer_total);
        }
        ParamCounts {
            total,
            active,
            embeddings,
            linear,
            largest_layer,
        }
    }

    /// Visits every parameter tensor of the checkpoint under its Hugging Face name, as the
    /// engine builds the model (`model.layers.3.mlp.experts.7.down_proj.weight`; `lm_head.weight`
    /// only when the embeddings are not tied).
    pub fn for_each_tensor(&self, mut visit: impl FnMut(&TensorInfo)) {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut out = TensorNames {
            name: String::with_capacity(64),
            visit: &mut visit,
            layer: None,
            expert: false,
        };
        out.emit(
            "model",
            "embed_tokens.weight",
            TensorKind::Embedding,
            (self.vocab_size, h),
        );
        let mut prefix = String::with_capacity(48);
        for layer in 0..self.num_layers {
            out.layer = Some(layer);
            out.expert = false;
            prefix.clear();
            prefix.push_str("model.layers.");
            prefix.push_str(&layer.to_string());
            let layer_prefix = prefix.len();
            for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
                out.emit(&prefix, norm, TensorKind::Norm, (h, 1));
            }
            prefix.push_str(".self_attn");
            for (proj, rows, cols, bias) in [
                ("q_proj", q, h, self.qkv_bias()),
                ("k_proj", kv, h, self.qkv_bias()),
                ("v_proj", kv, h, self.qkv_bias()),
                ("o_proj", h, q, self.o_proj_bias()),
            ] {
                let weight = format!("{proj}.weight");
                out.emit(&prefix, &weight, TensorKind::Projection, (rows, cols));
                if bias {
                    let bias = format!("{proj}.bias");
                    out.emit(&prefix, &bias, TensorKind::Bias, (rows, 1));
                }
            }
            if self.qk_norm() {
                for norm in ["q_norm.weight", "k_norm.weight"] {
                    out.emit(&prefix, norm, TensorKind::Norm, (self.head_dim, 1));
                }
            }
            prefix.truncate(layer_prefix);
            prefix.push_str(".mlp");
            if self.is_moe_layer(layer) {
                out.emit(
                    &prefix,
                    "gate.weight",
                    TensorKind::Router,
                    (self.num_experts, h),
                );
                out.expert = true;
                let mlp_prefix = prefix.len();
                for e in 0..self.num_experts {
                    prefix.truncate(mlp_prefix);
                    prefix.push_str(".experts.");
                    prefix.push_str(&e.to_string());
                    out.mlp(&prefix, h, self.moe_intermediate_size);
                }
            } else {
                out.mlp(&prefix, h, self.intermediate_size);
            }
        }
        out.layer = None;
        out.expert = false;
        out.emit("model", "norm.weight", TensorKind::Norm, (h, 1));
        if !self.tie_word_embeddings {
            out.emit(
                "",
                "lm_head.weight",
                TensorKind::LmHead,
                (self.vocab_size, h),
            );
        }
    }

    /// What an adapter run with LoRA rank `rank` trains and freezes, tensor by tensor: the
    /// linears `plan` adapts get A (rank x in) and B (out x rank); the parameters it trains in
    /// full (modules_to_save, biases with `lora_bias all`) train beside them; the rest is the
    /// frozen base. The same [`AdapterPlan`] decides for the engine, so the counts agree.
    pub fn adapter_counts(&self, rank: u64, plan: &AdapterPlan) -> AdapterCounts {
        RECENT_COUNTS.with(|recent| {
            let mut recent = recent.borrow_mut();
            if let Some((.., counts)) = recent
                .iter()
                .find(|(facts, r, p, _)| *r == rank && p == plan && facts == self)
            {
                return counts.clone();
            }
            let counts = self.count_adapters(rank, plan);
            if recent.len() == RECENT_COUNTS_KEPT {
                recent.pop_front();
            }
            recent.push_back((self.clone(), rank, plan.clone(), counts.clone()));
            counts
        })
    }

    fn count_adapters(&self, rank: u64, plan: &AdapterPlan) -> AdapterCounts {
        let per_layer = vec![0.0; self.num_layers as usize];
        let mut counts = AdapterCounts {
            lora_outputs_per_token: per_layer.clone(),
            lora_inputs_per_token: per_layer.clone(),
            lora_widths_per_token: per_layer,
            frozen_projections_per_layer: vec![0; self.num_layers as usize],
            ..AdapterCounts::default()
        };
        // Each token passes through top-k of the experts.
        let expert_share = if self.num_experts > 0 {
            self.num_experts_per_tok as f64 / self.num_experts as f64
        } else {
            0.0
        };
        self.for_each_tensor(|tensor| {
            let n = tensor.numel();
            if plan.trains_in_full(tensor.name) {
                counts.full += n;
                return;
            }
            let linear = matches!(
                tensor.kind,
                TensorKind::Projection | TensorKind::Router | TensorKind::LmHead
            );
            if linear && plan.adapts(tensor.module()) {
                let (out, input) = tensor.shape;
                counts.lora += rank * (input + out);
                if let Some(layer) = tensor.layer {
                    let share = if tensor.expert { expert_share } else { 1.0 };
                    counts.lora_outputs_per_token[layer as usize] += share * rank as f64;
                    counts.lora_inputs_per_token[layer as usize] += share * input as f64;
                    counts.lora_widths_per_token[layer as usize] += share * out as f64;
                }
            }
            if tensor.kind == TensorKind::Projection {
                counts.frozen_projections += n;
                let blocks = n.div_ceil(QUANT_BLOCK);
                counts.quant_blocks += blocks;
                counts.quant_block_groups += blocks.div_ceil(QUANT_BLOCK_GROUP);
                if let Some(layer) = tensor.layer {
                    counts.frozen_projections_per_layer[layer as usize] += n;
                }
            } else {
                counts.frozen_other += n;
            }
        });
        counts
    }

    /// Parameters an adapter run trains: LoRA's A and B on the linears `plan` adapts plus the
    /// parameters it trains in full (see [`ModelFacts::adapter_counts`]).
    pub fn lora_params(&self, rank: u64, plan: &AdapterPlan) -> u64 {
        self.adapter_counts(rank, plan).trainable()
    }

    /// Reads a Hugging Face config.json (both transformers 4.x and 5.x key styles).
    pub fn from_config_json(name: &str, text: &str) -> Result<ModelFacts, String> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("config.json is not valid JSON: {e}"))?;
        let architecture = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .unwrap_or("");
        let architecture = match architecture {
            "Qwen3ForCausalLM" => Architecture::Qwen3,
            "Qwen3MoeForCausalLM" => Architecture::Qwen3Moe,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            other => {
                return Err(format!(
                    "config.json architecture `{other}` is not supported; whet trains Qwen3ForCausalLM, Qwen3MoeForCausalLM and Qwen2ForCausalLM"
                ))
            }
        };
        let int = |key: &str| value.get(key).and_then(|v| v.as_u64());
        let need =
            |key: &str| int(key).ok_or_else(|| format!("config.json has no integer `{key}`"));
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let head_dim = int("head_dim").unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        let num_experts = int("num_experts")
            .or_else(|| int("num_local_experts"))
            .unwrap_or(0);
        let dtype = value
            .get("torch_dtype")
            .or_else(|| value.get("dtype"))
            .and_then(|d| d.as_str())
            .and_then(TorchDtype::from_name);
        let facts = ModelFacts {
            name: name.to_string(),
            architecture,
            model_type: match architecture {
                Architecture::Qwen3 => "qwen3",
                Architecture::Qwen3Moe => "qwen3_moe",
                Architecture::Qwen2 => "qwen2_5",
            }
            .into(),
            template: default_template(name, architecture).into(),
            hidden_size,
            num_layers: need("num_hidden_layers")?,
            num_heads,
            num_kv_heads: int("num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            intermediate_size: need("intermediate_size")?,
            vocab_size: need("vocab_size")?,
            max_position_embeddings: int("max_position_embeddings").unwrap_or(32768),
            num_experts: if architecture == Architecture::Qwen3Moe {
                num_experts
            } else {
                0
            },
            num_experts_per_tok: int("num_experts_per_tok").unwrap_or(0),
            moe_intermediate_size: int("moe_intermediate_size").unwrap_or(0),
            mlp_only_layers: value
                .get("mlp_only_layers")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default(),
            decoder_sparse_step: int("decoder_sparse_step").unwrap_or(1),
            tie_word_embeddings: value
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            attention_bias: value
                .get("attention_bias")
                .and_then(|v| v.as_bool())
                .unwrap_or(architecture == Architecture::Qwen2),
            torch_dtype: dtype,
        };
        Ok(facts)
    }
}

/// The template ms-swift picks for a model: Thinking-2507 models think always, Instruct-2507
/// never, the original Qwen3 models are hybrid, Qwen2.5 has its own.
pub fn default_template(name: &str, architecture: Architecture) -> &'static str {
    let lower = name.to_ascii_lowercase();
    if architecture == Architecture::Qwen2 || lower.contains("qwen2.5") || lower.contains("qwen2_5")
    {
        "qwen2_5"
    } else if lower.contains("thinking-2507") {
        "qwen3_thinking"
    } else if lower.contains("instruct-2507") {
        "qwen3_nothinking"
    } else {
        "qwen3"
    }
}

/// (size name, architecture, hidden, layers, heads, kv heads, head_dim, intermediate, vocab,
///  experts, top-k, moe intermediate, tied embeddings)
type Shape = (
    &'static str,
    Architecture,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    bool,
);

/// Shapes from the models' published config.json files.
const CATALOG: &[Shape] = &[
    (
        "qwen3-0.6b",
        Architecture::Qwen3,
        1024,
        28,
        16,
        8,
        128,
        3072,
        151936,
        0,
        0,
        0,
        true,
    ),
    (
        "qwen3-1.7b",
        Architecture::Qwen3,
        2048,
        28,
        16,
        8,
        128,
        6144,
        151936,
        0,
        0,
        0,
        true,
    ),
    (
        "qwen3-4b",
        Architecture::Qwen3,
        2560,
        36,
        32,
        8,
        128,
        9728,
        151936,
        0,
        0,
        0,
        true,
    ),
    (
        "qwen3-8b",
        Architecture::Qwen3,
        4096,
        36,
        32,
        8,
        128,
        12288,
        151936,
        0,
        0,
        0,
        false,
    ),
    (
        "qwen3-14b",
        Architecture::Qwen3,
        5120,
        40,
        40,
        8,
        128,
        17408,
        151936,
        0,
        0,
        0,
        false,
    ),
    (
        "qwen3-32b",
        Architecture::Qwen3,
        5120,
        64,
        64,
        8,
        128,
        25600,
        151936,
        0,
        0,
        0,
        false,
    ),
    (
        "qwen3-30b-a3b",
        Architecture::Qwen3Moe,
        2048,
        48,
        32,
        4,
        128,
        6144,
        151936,
        128,
        8,
        768,
        false,
    ),
    (
        "qwen3-235b-a22b",
        Architecture::Qwen3Moe,
        4096,
        94,
        64,
        4,
        128,
        12288,
        151936,
        128,
        8,
        1536,
        false,
    ),
    (
        "qwen2.5-0.5b",
        Architecture::Qwen2,
        896,
        24,
        14,
        2,
        64,
        4864,
        151936,
        0,
        0,
        0,
        true,
    ),
    (
        "qwen2.5-1.5b",
        Architecture::Qwen2,
        1536,
        28,
        12,
        2,
        128,
        8960,
        151936,
        0,
        0,
        0,
        true,
    ),
    (
        "qwen2.5-3b",
        Architecture::Qwen2,
        2048,
        36,
        16,
        2,
        128,
        11008,
        151936,
        0,
        0,
        0,
        true,
    ),
    (
        "qwen2.5-7b",
        Architecture::Qwen2,
        3584,
        28,
        28,
        4,
        128,
        18944,
        152064,
        0,
        0,
        0,
        false,
    ),
    (
        "qwen2.5-14b",
        Architecture::Qwen2,
        5120,
        48,
        40,
        8,
        128,
        13824,
        152064,
        0,
        0,
        0,
        false,
    ),
    (
        "qwen2.5-32b",
        Architecture::Qwen2,
        5120,
        64,
        40,
        8,
        128,
        27648,
        152064,
        0,
        0,
        0,
        false,
    ),
    (
        "qwen2.5-72b",
        Architecture::Qwen2,
        8192,
        80,
        64,
        8,
        128,
        29568,
        152064,
        0,
        0,
        0,
        false,
    ),
];

/// The hub ids the catalog knows, for pickers and presets.
pub fn catalog_ids() -> Vec<String> {
    let mut ids = Vec::new();
    for shape in CATALOG {
        let size = &shape.0[shape.0.find('-').map_or(0, |i| i + 1)..];
        let size = size.to_uppercase();
        match shape.1 {
            Architecture::Qwen2 => {
                ids.push(format!("Qwen/Qwen2.5-{size}"));
                ids.push(format!("Qwen/Qwen2.5-{size}-Instruct"));
            }
            _ => {
                ids.push(format!("Qwen/Qwen3-{size}"));
                ids.push(format!("Qwen/Qwen3-{size}-Base"));
                if matches!(shape.0, "qwen3-4b" | "qwen3-30b-a3b" | "qwen3-235b-a22b") {
                    ids.push(format!("Qwen/Qwen3-{size}-Instruct-2507"));
                    ids.push(format!("Qwen/Qwen3-{size}-Thinking-2507"));
                }
            }
        }
    }
    ids
}

/// Looks a model up by hub id or folder name (`Qwen/Qwen3-30B-A3B-Thinking-2507`,
/// `/data/models/Qwen3-8B`); case does not matter.
pub fn lookup(model: &str) -> Option<ModelFacts> {
    let name = model
        .trim_end_matches('/')
        .rsplit('/')
        .next()?
        .to_ascii_lowercase();
    let mut base = name.as_str();
    let mut long_context = false;
    for suffix in ["-fp8", "-awq", "-gptq-int4", "-gptq-int8"] {
        base = base.strip_suffix(suffix).unwrap_or(base);
    }
    for suffix in ["-thinking-2507", "-instruct-2507"] {
        if let Some(stripped) = base.strip_suffix(suffix) {
            base = stripped;
            long_context = true;
        }
    }
    for suffix in ["-instruct", "-base"] {
        base = base.strip_suffix(suffix).unwrap_or(base);
    }
    let shape = CATALOG.iter().find(|s| s.0 == base)?;
    let (
        _,
        architecture,
        hidden,
        layers,
        heads,
        kv,
        head_dim,
        inter,
        vocab,
        experts,
        top_k,
        moe_inter,
        tied,
    ) = *shape;
    let max_position_embeddings = match architecture {
        Architecture::Qwen2 => 32768,
        _ if long_context => 262144,
        _ => 40960,
    };
    Some(ModelFacts {
        name: model.to_string(),
        architecture,
        model_type: match architecture {
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Qwen2 => "qwen2_5",
        }
        .into(),
        template: default_template(&name, architecture).into(),
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        intermediate_size: inter,
        vocab_size: vocab,
        max_position_embeddings,
        num_experts: experts,
        num_experts_per_tok: top_k,
        moe_intermediate_size: moe_inter,
        mlp_only_layers: Vec::new(),
        decoder_sparse_step: 1,
        tie_word_embeddings: tied,
        attention_bias: architecture == Architecture::Qwen2,
        torch_dtype: Some(TorchDtype::Bfloat16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        let check = |id: &str, total_b: f64, active_b: f64| {
            let facts = lookup(id).unwrap_or_else(|| panic!("{id} not in catalog"));
            let counts = facts.param_counts();
            let total = counts.total as f64 / 1e9;
            let active = counts.active as f64 / 1e9;
            assert!(
                (total - total_b).abs() / total_b < 0.01,
                "{id}: total {total} vs {total_b}"
            );
            assert!(
                (active - active_b).abs() / active_b < 0.02,
                "{id}: active {active} vs {active_b}"
            );
        };
        // Figures from the model cards: Qwen3-0.6B 0.6B (0.44B non-embedding), Qwen3-8B 8.2B,
        // Qwen3-30B-A3B 30.5B total / 3.3B activated, Qwen3-235B-A22B 235B / 22B, Qwen2.5-7B 7.61B.
        check("Qwen/Qwen3-0.6B", 0.596, 0.596);
        check("Qwen/Qwen3-8B", 8.19, 8.19);
        check("Qwen/Qwen3-30B-A3B-Thinking-2507", 30.53, 3.35);
        check("Qwen/Qwen3-235B-A22B", 235.1, 22.2);
        check("Qwen/Qwen2.5-7B-Instruct", 7.62, 7.62);
        check("/data/models/qwen3-32b", 32.8, 32.8);
    }

    #[test]
    fn the_tensor_list_adds_up_to_the_parameter_counts() {
        let mut models: Vec<ModelFacts> =
            catalog_ids().iter().filter_map(|id| lookup(id)).collect();
        models.dedup_by_key(|f| f.param_counts());
        let mut with_bias = lookup("Qwen/Qwen3-0.6B").unwrap();
        with_bias.attention_bias = true;
        models.push(with_bias);
        let plan = AdapterPlan::from_config(&crate::SftConfig::default()).unwrap();
        for facts in &models {
            let mut total = 0;
            let mut projections = 0;
            facts.for_each_tensor(|t| {
                total += t.numel();
                if t.kind == TensorKind::Projection {
                    projections += t.numel();
                }
            });
            let counts = facts.param_counts();
            assert_eq!(total, counts.total, "{}", facts.name);
            assert_eq!(projections, counts.linear, "{}", facts.name);
            // An adapter run's roles cover the model once.
            let a = facts.adapter_counts(8, &plan);
            assert_eq!(
                a.full + a.frozen_projections + a.frozen_other,
                counts.total,
                "{}",
                facts.name
            );
        }
    }

    #[test]
    fn picks_templates_like_ms_swift() {
        assert_eq!(
            lookup("Qwen/Qwen3-30B-A3B-Thinking-2507").unwrap().template,
            "qwen3_thinking"
        );
        assert_eq!(
            lookup("Qwen/Qwen3-4B-Instruct-2507").unwrap().template,
            "qwen3_nothinking"
        );
        assert_eq!(lookup("Qwen/Qwen3-8B").unwrap().template, "qwen3");
        assert_eq!(
            lookup("Qwen/Qwen2.5-7B-Instruct").unwrap().template,
            "qwen2_5"
        );
        assert_eq!(
            lookup("Qwen/Qwen3-30B-A3B-Thinking-2507")
                .unwrap()
                .max_position_embeddings,
            262144
        );
        assert!(lookup("meta-llama/Llama-3-8B").is_none());
        for id in catalog_ids() {
            assert!(lookup(&id).is_some(), "{id}");
        }
    }

    #[test]
    fn reads_both_config_json_key_styles() {
        let v5 = r#"{"architectures":["Qwen3MoeForCausalLM"],"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"intermediate_size":128,
            "moe_intermediate_size":32,"num_local_experts":4,"num_experts_per_tok":2,"vocab_size":512,
            "dtype":"float32","rope_parameters":{"rope_theta":1000000.0},"tie_word_embeddings":false}"#;
        let facts = ModelFacts::from_config_json("tiny", v5).unwrap();
        assert_eq!(facts.num_experts, 4);
        assert_eq!(facts.torch_dtype, Some(TorchDtype::Float32));
        // The fixture's MoE model has 140,160 parameters.
        assert_eq!(facts.param_counts().total, 140_160);
        let dense = v5.replace("Qwen3MoeForCausalLM", "Qwen3ForCausalLM");
        // The fixture's dense model has 139,648 parameters.
        assert_eq!(
            ModelFacts::from_config_json("tiny", &dense)
                .unwrap()
                .param_counts()
                .total,
            139_648
        );
        assert!(
            ModelFacts::from_config_json("x", r#"{"architectures":["LlamaForCausalLM"]}"#).is_err()
        );
        assert!(ModelFacts::from_config_json("x", "not json").is_err());
    }
}
