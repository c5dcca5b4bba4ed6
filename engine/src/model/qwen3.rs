//! The Qwen3 decoder (also Qwen3-MoE and Qwen2/2.5, which differ only by flags in
//! [`ModelConfig`]), built for training: every weight is a [`Param`] keyed by its Hugging Face
//! tensor name — trainable (an f32 master `Var`) or frozen (stored in the compute dtype) — and the
//! forward pass uses only the differentiable ops of [`crate::ops`], casting weights to the
//! compute dtype on the way in so that gradients flow back to the masters.
//!
//! This module owns the network's math (attention, MLP, sparse MoE block, router aux loss) and
//! builds the model from a [`WeightSource`] (memory-mapped safetensors, tensors, or random).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::config::{ConfigError, ModelConfig};
use super::lora::LoraPair;
use super::params::{
    Init, LoraOptions, Param, ParamBuilder, Trainable, TrainableParams, WeightSource,
};
use crate::ops;
use crate::quant::QuantOptions;
use crate::tensor_files::{self, MappedWeights, TensorFileError};

/// Failures while building, loading or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("checkpoint has no tensor `{name}`; is the model folder complete and does config.json match it?")]
    MissingTensor { name: String },
    #[error("checkpoint tensor `{name}` has shape {found:?}, config.json implies {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("checkpoint has tensors config.json does not account for: {names}; does config.json match the weights (e.g. attention_bias, tie_word_embeddings, num_experts)?")]
    UnexpectedTensors { names: String },
    #[error(transparent)]
    Files(#[from] TensorFileError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Where the model lives and how it computes.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub device: Device,
    /// Dtype of activations and of the weights as used in the forward pass (F32, BF16 or F16).
    pub compute_dtype: DType,
    /// Dtype of the trainable `Var`s (the master weights). F32 unless memory forbids it.
    pub master_dtype: DType,
    /// Which weights are trained; the rest are frozen in the compute dtype.
    pub trainable: Trainable,
    /// LoRA adapters on the targeted linear layers (always trainable).
    pub lora: Option<LoraOptions>,
    /// QLoRA: the frozen linears of the decoder layers stored in 4 bits.
    pub quantization: Option<QuantOptions>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            compute_dtype: DType::F32,
            master_dtype: DType::F32,
            trainable: Trainable::All,
            lora: None,
            quantization: None,
        }
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// (batch, seq, vocab) in the compute dtype.
    pub logits: Tensor,
    /// One (batch * seq, num_experts) tensor per sparse MoE layer, before the softmax.
    pub router_logits: Vec<Tensor>,
}

/// `y = x W^T (+ b)`; the weight is used in the input's dtype (a master copy stays f32).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Param,
    bias: Option<Param>,
    lora: Option<LoraPair>,
}

impl Linear {
    fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> std::result::Result<Self, ModelError> {
        let weight = pb.get(
            &format!("{prefix}.weight"),
            &[out_dim, in_dim],
            Init::Normal,
        )?;
        let bias = if bias {
            Some(pb.get(&format!("{prefix}.bias"), &[out_dim], Init::Zeros)?)
        } else {
            None
        };
        let lora = match pb.lora().filter(|l| l.targets(prefix)).cloned() {
            Some(options) => {
                let r = options.rank;
                let a =
                    pb.adapter_matrix(&format!("{prefix}.lora_A.weight"), &[r, in_dim], false)?;
                let b =
                    pb.adapter_matrix(&format!("{prefix}.lora_B.weight"), &[out_dim, r], true)?;
                Some(LoraPair {
                    a,
                    b,
                    scaling: options.scaling(),
                    dropout: options.dropout,
                    module_key: super::lora::module_key(prefix),
                })
            }
            None => None,
        };
        Ok(Linear { weight, bias, lora })
    }

    /// Inference, evaluation, and layers without adapters: no dropout.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `dropout_seed`: the micro-batch's LoRA dropout seed while training.
    pub fn forward_with(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let weight = self.weight.for_compute(x.dtype())?;
        let y = ops::linear(x, &weight)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(&bias.for_compute(x.dtype())?)?,
            None => y,
        };
        match &self.lora {
            // W x + scaling * B (A dropout(x))
            Some(lora) => {
                let in_dim = weight.dim(1)?;
                let rows = x.elem_count() / in_dim;
                let delta = lora.delta(&x.reshape((rows, in_dim))?, dropout_seed)?;
                let shape = y.shape().clone();
                y + delta.reshape(shape)?
            }
            None => Ok(y),
        }
    }
}

/// An RMSNorm weight.
fn norm(pb: &mut ParamBuilder, name: &str, dim: usize) -> std::result::Result<Param, ModelError> {
    pb.get(name, &[dim], Init::Ones)
}

/// Per-forward constants shared by every layer: the rotary tables and the attention bias.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    rotary: ops::RotaryEmbedding,
    /// Which keys each query may see (causal, key padding).
    attention_mask: ops::AttentionMask,
    /// While training: the micro-batch's seed for LoRA dropout masks.
    lora_dropout_seed: Option<u64>,
}

impl ForwardContext {
    /// The same context with LoRA dropout on (training), its masks drawn from `seed`.
    pub fn with_lora_dropout(mut self, seed: Option<u64>) -> Self {
        self.lora_dropout_seed = seed;
        self
    }
}

/// Grouped-query self-attention with Qwen3's per-head q/k RMSNorm applied before RoPE.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<Param>,
    k_norm: Option<Param>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
}

impl Attention {
    fn new(
        cfg: &ModelConfig,
        prefix: &str,
        pb: &mut ParamBuilder,
    ) -> std::result::Result<Self, ModelError> {
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let q_proj = Linear::new(pb, &format!("{prefix}.q_proj"), hidden, q_dim, cfg.qkv_bias)?;
        let k_proj = Linear::new(
            pb,
            &format!("{prefix}.k_proj"),
            hidden,
            kv_dim,
            cfg.qkv_bias,
        )?;
        let v_proj = Linear::new(
            pb,
            &format!("{prefix}.v_proj"),
            hidden,
            kv_dim,
            cfg.qkv_bias,
        )?;
        let o_proj = Linear::new(
            pb,
            &format!("{prefix}.o_proj"),
            q_dim,
            hidden,
            cfg.o_proj_bias,
        )?;
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(norm(pb, &format!("{prefix}.q_norm.weight"), hd)?),
                Some(norm(pb, &format!("{prefix}.k_norm.weight"), hd)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm,
            k_norm,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            rms_norm_eps: cfg.rms_norm_eps,
        })
    }

    /// Projects to (batch, heads, seq, head_dim), normalising each head first when the model has
    /// a q/k norm, and rotating it by `rotary` when given.
    fn heads(
        &self,
        (proj, norm): (&Linear, Option<&Param>),
        x: &Tensor,
        heads: usize,
        rotary: Option<&ops::RotaryEmbedding>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = proj
            .forward_with(x, dropout_seed)?
            .reshape((b, t, heads, self.head_dim))?;
        let h = match norm {
            Some(w) => ops::rms_norm(&h, &w.for_compute(h.dtype())?, self.rms_norm_eps)?,
            None => h,
        };
        ops::split_heads(&h, rotary)
    }

    pub fn forward(&self, x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let seed = ctx.lora_dropout_seed;
        let rotary = Some(&ctx.rotary);
        let q = self.heads((&self.q_proj, self.q_norm.as_ref()), x, nh, rotary, seed)?;
        let k = self.heads((&self.k_proj, self.k_norm.as_ref()), x, nkv, rotary, seed)?;
        let v = self.heads((&self.v_proj, None), x, nkv, None, seed)?;
        // (b, t, nh * hd)
        let attended = ops::causal_attention(&q, &k, &v, &ctx.attention_mask)?;
        self.o_proj.forward_with(&attended, seed)
    }
}

impl Attention {
    /// Attention for new tokens at positions `offset..` over the cached keys and values plus
    /// their own (inference; batch of one sequence). `bias` is the causal bias of the new block
    /// against all keys, (1, 1, new, offset + new), or None for a single new token.
    fn forward_cached(
        &self,
        x: &Tensor,
        rotary: &ops::RotaryEmbedding,
        offset: usize,
        bias: Option<&Tensor>,
        slot: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = nh / nkv;
        let q = rotary.apply_at(
            &self.heads((&self.q_proj, self.q_norm.as_ref()), x, nh, None, None)?,
            offset,
        )?;
        let k_new = rotary.apply_at(
            &self.heads((&self.k_proj, self.k_norm.as_ref()), x, nkv, None, None)?,
            offset,
        )?;
        let v_new = self.heads((&self.v_proj, None), x, nkv, None, None)?;
        let (k, v) = match slot.take() {
            Some((k_old, v_old)) => (
                Tensor::cat(&[&k_old, &k_new], 2)?,
                Tensor::cat(&[&v_old, &v_new], 2)?,
            ),
            None => (k_new, v_new),
        };
        let keys = k.dim(2)?;
        // (b, nh, t, hd) -> (b, nkv, group * t, hd), as in `forward`.
        let q = q.reshape((b, nkv, group * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.reshape((b, nh, t, keys))?.to_dtype(DType::F32)?;
        let scores = match bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let probs = ops::softmax_last_dim(&scores)?
            .to_dtype(x.dtype())?
            .reshape((b, nkv, group * t, keys))?;
        let attended = probs.matmul(&v)?.reshape((b, nh, t, hd))?;
        let attended = attended.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        *slot = Some((k, v));
        self.o_proj.forward(&attended)
    }
}

/// Keys and values of the tokens a sequence has seen so far, per layer, so that decoding one
/// more token costs one token's forward pass (inference only).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        pb: &mut ParamBuilder,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            gate_proj: Linear::new(
                pb,
                &format!("{prefix}.gate_proj"),
                hidden,
                intermediate,
                false,
            )?,
            up_proj: Linear::new(
                pb,
                &format!("{prefix}.up_proj"),
                hidden,
                intermediate,
                false,
            )?,
            down_proj: Linear::new(
                pb,
                &format!("{prefix}.down_proj"),
                intermediate,
                hidden,
                false,
            )?,
        })
    }

    /// `dropout_seed`: LoRA dropout while training (None: off).
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let gate = self.gate_proj.forward_with(x, dropout_seed)?;
        let up = self.up_proj.forward_with(x, dropout_seed)?;
        self.down_proj
            .forward_with(&ops::swiglu(&gate, &up)?, dropout_seed)
    }

    /// A zero that depends on every trainable weight, so an expert no token chose still gets
    /// an (all-zero) gradient, as transformers' fused expert tensors do; None when frozen.
    fn zero_touching_weights(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for linear in [&self.gate_proj, &self.up_proj, &self.down_proj] {
            if let Param::Trainable(weight) = &linear.weight {
                let sum = weight.sum_all()?;
                total = Some(match total {
                    Some(t) => (t + sum)?,
                    None => sum,
                });
            }
        }
        // Not affine(0, 0): candle prunes a zero-multiplier affine from the backward graph.
        total.map(|t| &t * t.zeros_like()?).transpose()
    }
}

/// Qwen3-MoE's sparse block: a softmax router picks the top-k experts per token; the output is
/// the routing-weighted sum of those experts' SwiGLU MLPs. No shared expert.
#[derive(Debug, Clone)]
pub struct SparseMoeBlock {
    gate: Linear,
    experts: Vec<Mlp>,
    num_experts_per_tok: usize,
    norm_topk_prob: bool,
}

/// The experts each token was routed to: `indices` (rows, k) u32 and `weights` (rows, k) f32,
/// both ordered by decreasing router probability.
pub fn top_k_routing(probs: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let indices = probs
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    let weights = probs.gather(&indices, 1)?;
    Ok((indices, weights))
}

/// The (rows, k) choices grouped by expert: every pick's token row and slot (row * k + pick)
/// as u32 tensors on the choices' device, expert 0's picks first, each expert's ascending by
/// row; and how many picks each expert has. On a GPU the grouping runs there and only the
/// counts come back.
fn picks_by_expert(chosen: &Tensor, num_experts: usize) -> Result<crate::cuda::ExpertGroups> {
    if let Some(groups) = crate::cuda::group_by_expert(chosen, num_experts)? {
        return Ok(groups);
    }
    let k = chosen.dim(1)?;
    let mut rows_of = vec![Vec::<u32>::new(); num_experts];
    let mut slots_of = vec![Vec::<u32>::new(); num_experts];
    for (row, picks) in chosen.to_vec2::<u32>()?.iter().enumerate() {
        for (slot, &expert) in picks.iter().enumerate() {
            rows_of[expert as usize].push(row as u32);
            slots_of[expert as usize].push((row * k + slot) as u32);
        }
    }
    let device = chosen.device();
    Ok(crate::cuda::ExpertGroups {
        counts: rows_of.iter().map(Vec::len).collect(),
        rows: Tensor::new(rows_of.concat().as_slice(), device)?,
        slots: Tensor::new(slots_of.concat().as_slice(), device)?,
    })
}

impl SparseMoeBlock {
    fn new(
        cfg: &ModelConfig,
        prefix: &str,
        pb: &mut ParamBuilder,
    ) -> std::result::Result<Self, ModelError> {
        let moe = cfg
            .moe
            .as_ref()
            .expect("sparse layer in a model without MoE settings");
        let gate = Linear::new(
            pb,
            &format!("{prefix}.gate"),
            cfg.hidden_size,
            moe.num_experts,
            false,
        )?;
        let experts = (0..moe.num_experts)
            .map(|e| {
                Mlp::new(
                    &format!("{prefix}.experts.{e}"),
                    cfg.hidden_size,
                    moe.moe_intermediate_size,
                    pb,
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            gate,
            experts,
            num_experts_per_tok: moe.num_experts_per_tok,
            norm_topk_prob: moe.norm_topk_prob,
        })
    }

    /// The experts' weights stacked for [`ops::moe_experts`]: (gate and up of each expert,
    /// down of each), when the experts run as one op — on the CPU, without adapters.
    fn banks(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let plain = self.experts.iter().all(|e| {
            [&e.gate_proj, &e.up_proj, &e.down_proj]
                .iter()
                .all(|l| l.lora.is_none() && l.bias.is_none())
        });
        if !plain || !ops::moe_experts_fused(x) {
            return Ok(None);
        }
        let dtype = x.dtype();
        let mut gate_up = Vec::with_capacity(2 * self.experts.len());
        let mut down = Vec::with_capacity(self.experts.len());
        for expert in &self.experts {
            gate_up.push(expert.gate_proj.weight.for_compute(dtype)?);
            gate_up.push(expert.up_proj.weight.for_compute(dtype)?);
            down.push(expert.down_proj.weight.for_compute(dtype)?);
        }
        Ok(Some((Tensor::cat(&gate_up, 0)?, Tensor::cat(&down, 0)?)))
    }

    /// Returns the block's output (b, t, hidden) and the router logits (b * t, num_experts).
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<(Tensor, Tensor)> {
        let (b, t, hidden) = x.dims3()?;
        let rows = b * t;
        let x = x.reshape((rows, hidden))?;
        let router_logits = self.gate.forward(&x)?;
        let probs = ops::softmax_last_dim(&router_logits.to_dtype(DType::F32)?)?;
        let (chosen, weights) = top_k_routing(&probs, self.num_experts_per_tok)?;
        let weights = if self.norm_topk_prob {
            weights.broadcast_div(&weights.sum_keepdim(1)?)?
        } else {
            weights
        };
        // (rows, k) -> (rows * k): entry row * k + slot is the weight of that token's slot-th pick.
        let weights = weights.to_dtype(x.dtype())?.flatten_all()?;
        if let Some(out) = self.grouped_experts(&x, &chosen, &weights)? {
            return Ok((out.reshape((b, t, hidden))?, router_logits));
        }

        // The tokens gathered once in expert order, so each expert reads a contiguous block of
        // rows and the weighted outputs go back in one index_add.
        let groups = picks_by_expert(&chosen, self.experts.len())?;
        let mut untouched = Vec::new();
        let picked = match self.banks(&x)? {
            Some((gate_up, down)) => {
                let experts = ops::ExpertRows {
                    rows: groups.rows.to_vec1::<u32>()?.into(),
                    counts: groups.counts.clone(),
                };
                ops::moe_experts(&x, &gate_up, &down, experts)?
            }
            None => {
                let sorted = x.index_select(&groups.rows, 0)?;
                let mut outputs = Vec::with_capacity(self.experts.len());
                let mut at = 0;
                for (expert, &count) in self.experts.iter().zip(&groups.counts) {
                    if count == 0 {
                        untouched.extend(expert.zero_touching_weights()?);
                        continue;
                    }
                    outputs.push(expert.forward(&sorted.narrow(0, at, count)?, dropout_seed)?);
                    at += count;
                }
                Tensor::cat(&outputs, 0)?
            }
        };
        let weighted =
            picked.broadcast_mul(&weights.index_select(&groups.slots, 0)?.unsqueeze(1)?)?;
        // index_add, not scatter_add: candle's scatter_add backward breaks for partial indices.
        let mut out = Tensor::zeros((rows, hidden), x.dtype(), x.device())?.index_add(
            &groups.rows,
            &weighted,
            0,
        )?;
        for zero in untouched {
            out = out.broadcast_add(&zero.to_dtype(x.dtype())?)?;
        }
        Ok((out.reshape((b, t, hidden))?, router_logits))
    }
}

impl SparseMoeBlock {
    /// The experts through whet's grouped kernels (GPU, kernels on, plain experts: no LoRA, no
    /// bias, not quantized): the picks grouped on the device, each projection one grouped
    /// matmul over the stacked expert weights, nothing read back. None where it does not apply.
    fn grouped_experts(
        &self,
        x: &Tensor,
        chosen: &Tensor,
        weights: &Tensor,
    ) -> Result<Option<Tensor>> {
        let plain = |l: &Linear| {
            l.lora.is_none() && l.bias.is_none() && !matches!(l.weight, Param::Quantized(_))
        };
        let applies = x.device().is_cuda()
            && crate::cuda::kernels_enabled()
            && self
                .experts
                .iter()
                .all(|e| plain(&e.gate_proj) && plain(&e.up_proj) && plain(&e.down_proj));
        if !applies {
            return Ok(None);
        }
        let Some(groups) = crate::cuda::moe_groups(chosen, self.experts.len())? else {
            return Ok(None);
        };
        // (experts, out, in) in the compute dtype; the stack's backward hands each expert its
        // slice of the grouped weight gradient.
        let stacked = |pick: fn(&Mlp) -> &Linear| -> Result<Tensor> {
            let each = self
                .experts
                .iter()
                .map(|e| pick(e).weight.for_compute(x.dtype()))
                .collect::<Result<Vec<_>>>()?;
            Tensor::stack(&each, 0)
        };
        let sorted = x.index_select(&groups.rows, 0)?;
        let project = |input: &Tensor, pick: fn(&Mlp) -> &Linear| -> Result<Option<Tensor>> {
            crate::cuda::grouped_matmul(input, &stacked(pick)?, &groups)
        };
        let (Some(gate), Some(up)) = (
            project(&sorted, |e| &e.gate_proj)?,
            project(&sorted, |e| &e.up_proj)?,
        ) else {
            return Ok(None);
        };
        let Some(down) = project(&ops::swiglu(&gate, &up)?, |e| &e.down_proj)? else {
            return Ok(None);
        };
        let weighted =
            down.broadcast_mul(&weights.index_select(&groups.slots, 0)?.unsqueeze(1)?)?;
        let (rows, hidden) = x.dims2()?;
        Tensor::zeros((rows, hidden), x.dtype(), x.device())?
            .index_add(&groups.rows, &weighted, 0)
            .map(Some)
    }
}

/// The MLP half of a decoder layer.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoeBlock),
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: Param,
    self_attn: Attention,
    post_attention_layernorm: Param,
    mlp: FeedForward,
    rms_norm_eps: f64,
}

impl DecoderLayer {
    fn new(
        cfg: &ModelConfig,
        index: usize,
        pb: &mut ParamBuilder,
    ) -> std::result::Result<Self, ModelError> {
        let prefix = format!("model.layers.{index}");
        let input_layernorm = norm(
            pb,
            &format!("{prefix}.input_layernorm.weight"),
            cfg.hidden_size,
        )?;
        let self_attn = Attention::new(cfg, &format!("{prefix}.self_attn"), pb)?;
        let post_attention_layernorm = norm(
            pb,
            &format!("{prefix}.post_attention_layernorm.weight"),
            cfg.hidden_size,
        )?;
        let mlp = if cfg.is_sparse_layer(index) {
            FeedForward::Sparse(SparseMoeBlock::new(cfg, &format!("{prefix}.mlp"), pb)?)
        } else {
            FeedForward::Dense(Mlp::new(
                &format!("{prefix}.mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                pb,
            )?)
        };
        Ok(Self {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
            rms_norm_eps: cfg.rms_norm_eps,
        })
    }

    /// Returns the layer output and, for a sparse layer, its router logits.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardContext) -> Result<(Tensor, Option<Tensor>)> {
        let normed = self.norm(&self.input_layernorm, x)?;
        let attended = self.self_attn.forward(&normed, ctx)?;
        let (x, normed) = ops::add_rms_norm(
            x,
            &attended,
            &self
                .post_attention_layernorm
                .for_compute(attended.dtype())?,
            self.rms_norm_eps,
        )?;
        let (mlp_out, router_logits) = match &self.mlp {
            FeedForward::Dense(mlp) => (mlp.forward(&normed, ctx.lora_dropout_seed)?, None),
            FeedForward::Sparse(moe) => {
                let (out, logits) = moe.forward(&normed, ctx.lora_dropout_seed)?;
                (out, Some(logits))
            }
        };
        Ok(((x + mlp_out)?, router_logits))
    }
}

impl DecoderLayer {
    fn norm(&self, weight: &Param, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &weight.for_compute(x.dtype())?, self.rms_norm_eps)
    }

    fn forward_cached(
        &self,
        x: &Tensor,
        rotary: &ops::RotaryEmbedding,
        offset: usize,
        bias: Option<&Tensor>,
        slot: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let normed = self.norm(&self.input_layernorm, x)?;
        let x = (x + self
            .self_attn
            .forward_cached(&normed, rotary, offset, bias, slot)?)?;
        let normed = self.norm(&self.post_attention_layernorm, &x)?;
        let mlp_out = match &self.mlp {
            FeedForward::Dense(mlp) => mlp.forward(&normed, None)?,
            FeedForward::Sparse(moe) => moe.forward(&normed, None)?.0,
        };
        x + mlp_out
    }
}

/// A causal language model: embeddings, decoder layers, final norm, output projection.
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    options: ModelOptions,
    embed_tokens: Param,
    layers: Vec<DecoderLayer>,
    norm: Param,
    /// None when the output projection is tied to `embed_tokens`.
    lm_head: Option<Param>,
    /// Every parameter under its Hugging Face name, in checkpoint order.
    params: Vec<(String, Param)>,
    trainable: TrainableParams,
}

impl Model {
    /// Loads `<dir>/config.json` and the weights (`model.safetensors` or the shards named by
    /// `model.safetensors.index.json`), memory-mapped: only the tensors the model takes are read.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        options: ModelOptions,
    ) -> std::result::Result<Self, ModelError> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_model_dir(dir)?;
        let weights = MappedWeights::open_model_dir(dir)?;
        Self::build(config, WeightSource::Files(vec![weights]), options)
    }

    /// Builds the model from named checkpoint tensors (any float dtype). A tensor the config
    /// does not account for is an error, except a tied checkpoint's `lm_head.weight` and
    /// rotary `inv_freq` buffers.
    pub fn from_tensors(
        config: ModelConfig,
        tensors: HashMap<String, Tensor>,
        options: ModelOptions,
    ) -> std::result::Result<Self, ModelError> {
        Self::build(config, WeightSource::Tensors(tensors), options)
    }

    /// A model with freshly initialised weights: N(0, 0.02) projections and embeddings, unit
    /// norms, zero biases; reproducible from `seed`.
    pub fn random(
        config: ModelConfig,
        seed: u64,
        options: ModelOptions,
    ) -> std::result::Result<Self, ModelError> {
        Self::build(config, WeightSource::Random { seed }, options)
    }

    pub fn build(
        config: ModelConfig,
        source: WeightSource,
        options: ModelOptions,
    ) -> std::result::Result<Self, ModelError> {
        Self::build_with_adapter(config, source, None, options)
    }

    /// Builds the model with LoRA matrices read from `adapter` (PEFT's
    /// `adapter_model.safetensors`, keys `base_model.model.<name>`) for `options.lora`.
    pub fn build_with_adapter(
        config: ModelConfig,
        source: WeightSource,
        adapter: Option<MappedWeights>,
        options: ModelOptions,
    ) -> std::result::Result<Self, ModelError> {
        let mut pb = ParamBuilder::new(source, &options).with_adapter(adapter);
        let cfg = &config;
        let embed_tokens = pb.get(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
            Init::Normal,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| pb.layer(|pb| DecoderLayer::new(cfg, i, pb)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let norm = norm(&mut pb, "model.norm.weight", cfg.hidden_size)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(pb.get(
                "lm_head.weight",
                &[cfg.vocab_size, cfg.hidden_size],
                Init::Normal,
            )?)
        };
        let (params, trainable) = pb.finish()?;
        Ok(Self {
            config,
            options,
            embed_tokens,
            layers,
            norm,
            lm_head,
            params,
            trainable,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn options(&self) -> &ModelOptions {
        &self.options
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The trainable parameters (what the optimizer, clipping and gradient reduction see),
    /// with their flat layout and per-layer ranges.
    pub fn trainable(&self) -> &TrainableParams {
        &self.trainable
    }

    /// The trainable parameters under their Hugging Face names, in checkpoint order; a tied
    /// embedding appears once.
    pub fn trainable_parameters(&self) -> &[(String, Var)] {
        self.trainable.as_slice()
    }

    /// Indices (in [`Self::trainable_parameters`]) of decoder layer `layer`'s parameters.
    pub fn layer_parameters(&self, layer: usize) -> Range<usize> {
        self.trainable.layer(layer)
    }

    /// Every parameter, trainable or frozen, under its Hugging Face name in checkpoint order.
    pub fn params(&self) -> &[(String, Param)] {
        &self.params
    }

    /// Every parameter, trainable or frozen.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, p)| p.elem_count()).sum()
    }

    pub fn num_trainable_parameters(&self) -> usize {
        self.trainable.num_elements()
    }

    /// The per-forward constants for a batch whose `attention_mask` is (batch, seq).
    pub fn context(&self, attention_mask: &Tensor) -> Result<ForwardContext> {
        let (_, seq) = attention_mask.dims2()?;
        let device = &self.options.device;
        Ok(ForwardContext {
            rotary: ops::RotaryEmbedding::new(
                self.config.head_dim,
                self.config.rope_theta,
                seq,
                device,
            )?,
            attention_mask: ops::AttentionMask::new(&attention_mask.to_device(device)?)?,
            lora_dropout_seed: None,
        })
    }

    /// Token embeddings (batch, seq) u32 -> (batch, seq, hidden) in the compute dtype.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        input_ids.dims2()?;
        let table = match &self.embed_tokens {
            Param::Trainable(var) => var.as_tensor().clone(),
            Param::Frozen(tensor) => tensor.clone(),
            Param::Quantized(quantized) => quantized.dequantize(self.options.compute_dtype)?,
        };
        ops::embedding(&table, input_ids, self.options.compute_dtype)
    }

    /// Final norm and output projection: (batch, seq, hidden) -> (batch, seq, vocab).
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.output_projection().forward(&self.final_norm(x)?)
    }

    /// The head's share of the loss for hidden states `x` (batch, seq, hidden) and `labels`
    /// (batch, seq), after the final norm ([`ops::head_loss`]: fused on the CPU, in chunks by
    /// whet's kernel on a GPU when the kernels are on, else the logits and then the loss).
    /// `with_grad` false (evaluation) computes no gradients.
    pub fn head_loss(&self, x: &Tensor, labels: &Tensor, with_grad: bool) -> Result<ops::HeadLoss> {
        let normed = self.final_norm(x)?;
        let weight = self
            .output_projection()
            .weight
            .for_compute(normed.dtype())?;
        ops::head_loss(&normed, &weight, labels, with_grad)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(
            x,
            &self.norm.for_compute(x.dtype())?,
            self.config.rms_norm_eps,
        )
    }

    /// lm_head, or the embeddings when they are tied.
    fn output_projection(&self) -> Linear {
        Linear {
            weight: self.lm_head.as_ref().unwrap_or(&self.embed_tokens).clone(),
            bias: None,
            lora: None,
        }
    }

    /// `input_ids` and `attention_mask` are (batch, seq); the mask is 1 for real tokens.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<ModelOutput> {
        let (hidden, router_logits) = self.forward_hidden(input_ids, attention_mask)?;
        Ok(ModelOutput {
            logits: self.head(&hidden)?,
            router_logits,
        })
    }

    /// [`Model::forward`] up to the head: the last layer's hidden states (batch, seq, hidden)
    /// and the router logits.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let ctx = self.context(attention_mask)?;
        let mut x = self.embed(input_ids)?;
        let mut router_logits = Vec::new();
        for layer in &self.layers {
            let (out, logits) = layer.forward(&x, &ctx)?;
            x = out;
            router_logits.extend(logits);
        }
        Ok((x, router_logits))
    }

    /// Logits (1, new, vocab) for `input_ids` (1, new) continuing the sequence in `cache`, which
    /// then holds those tokens too. Inference only: one unpadded sequence.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, new) = input_ids.dims2()?;
        let offset = cache.len;
        let device = &self.options.device;
        let rotary = ops::RotaryEmbedding::new(
            self.config.head_dim,
            self.config.rope_theta,
            offset + new,
            device,
        )?;
        // New query i sees keys 0..=offset + i.
        let bias = if new > 1 {
            let bias: Vec<f32> = (0..new)
                .flat_map(|i| {
                    (0..offset + new).map(move |j| if j <= offset + i { 0.0 } else { f32::MIN })
                })
                .collect();
            Some(Tensor::from_vec(bias, (1, 1, new, offset + new), device)?)
        } else {
            None
        };
        let mut x = self.embed(input_ids)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_cached(&x, &rotary, offset, bias.as_ref(), slot)?;
        }
        cache.len += new;
        self.head(&x)
    }

    /// Every parameter as a named tensor in `dtype`, ready to write as a checkpoint.
    pub fn state_dict(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        self.params
            .iter()
            .map(|(name, param)| Ok((name.clone(), param.value().to_dtype(dtype)?)))
            .collect()
    }

    /// The trainable parameters' masters (f32), which a checkpoint keeps beside narrower
    /// weights for an exact resume.
    pub fn trainable_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        self.trainable
            .as_slice()
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_detached_tensor())))
            .collect()
    }

    /// Writes every parameter to one Hugging Face safetensors file (names as loaded, `dtype`
    /// e.g. the config's torch_dtype), with the `format: pt` metadata transformers expects.
    pub fn save_safetensors(
        &self,
        path: impl AsRef<Path>,
        dtype: DType,
    ) -> std::result::Result<(), ModelError> {
        let state = self.state_dict(dtype)?;
        Ok(tensor_files::write(
            path.as_ref(),
            state,
            tensor_files::pt_metadata(),
        )?)
    }

    /// Writes the weights into `dir` as `save_pretrained` does (sharded past
    /// `max_shard_bytes`, with an index). Returns the files written.
    pub fn save_pretrained_weights(
        &self,
        dir: impl AsRef<Path>,
        dtype: DType,
        max_shard_bytes: usize,
    ) -> std::result::Result<Vec<std::path::PathBuf>, ModelError> {
        let state = self.state_dict(dtype)?;
        Ok(tensor_files::write_model_weights(
            dir.as_ref(),
            state,
            max_shard_bytes,
        )?)
    }
}

/// Switch-Transformer load-balancing loss over the router logits of all MoE layers pooled
/// together, padding excluded: `num_experts * sum_e f_e * P_e`, where `f_e` is the share of
/// (token, layer) rows' top-k picks that chose `e` (a count, not differentiated) and `P_e` the
/// mean router probability of `e` over the same rows.
///
/// `router_logits`: one (batch * seq, num_experts) tensor per MoE layer; `attention_mask`
/// (batch, seq), nonzero for real tokens. Returns an f32 scalar.
pub fn router_aux_loss(
    router_logits: &[Tensor],
    attention_mask: &Tensor,
    top_k: usize,
) -> Result<Tensor> {
    let first = router_logits
        .first()
        .expect("aux loss needs at least one MoE layer");
    let (rows, num_experts) = first.dims2()?;
    let real = attention_mask
        .to_dtype(DType::F32)?
        .flatten_all()?
        .ne(0f32)?;
    if first.device().is_cuda() {
        return router_aux_loss_on_device(router_logits, &real, top_k);
    }
    let real_host: Vec<u8> = real.to_vec1()?;
    let real = real.to_dtype(DType::F32)?.unsqueeze(1)?;

    let mut picks = vec![0f64; num_experts];
    let mut real_rows = 0usize;
    let mut prob_sum = Tensor::zeros(num_experts, DType::F32, first.device())?;
    for logits in router_logits {
        let probs = ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let (chosen, _) = top_k_routing(&probs.detach(), top_k)?;
        for (row, experts) in chosen.to_vec2::<u32>()?.iter().enumerate() {
            if real_host[row] != 0 {
                for &e in experts {
                    picks[e as usize] += 1.0;
                }
            }
        }
        real_rows += real_host.iter().filter(|&&r| r != 0).count();
        prob_sum = (prob_sum + probs.broadcast_mul(&real)?.sum(0)?)?;
    }
    debug_assert_eq!(rows, real_host.len());
    let real_rows = real_rows.max(1) as f64;
    let f: Vec<f32> = picks.iter().map(|&c| (c / real_rows) as f32).collect();
    let f = Tensor::from_vec(f, num_experts, first.device())?;
    let p = (prob_sum / real_rows)?;
    (f * p)?.sum_all()? * num_experts as f64
}

/// [`router_aux_loss`] without reading the picks back: each layer's top-k choices counted as
/// one-hot sums on the device (counts in f32, exact below 2^24 picks). `real` is the
/// (rows,) u8 mask of real tokens.
fn router_aux_loss_on_device(
    router_logits: &[Tensor],
    real: &Tensor,
    top_k: usize,
) -> Result<Tensor> {
    let (_, num_experts) = router_logits[0].dims2()?;
    let device = real.device();
    let real = real.to_dtype(DType::F32)?.unsqueeze(1)?;
    let experts = Tensor::arange(0u32, num_experts as u32, device)?.unsqueeze(0)?;
    let mut picks = Tensor::zeros(num_experts, DType::F32, device)?;
    let mut prob_sum = Tensor::zeros(num_experts, DType::F32, device)?;
    for logits in router_logits {
        let probs = ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let (chosen, _) = top_k_routing(&probs.detach(), top_k)?;
        for slot in 0..top_k {
            let hits = chosen
                .narrow(1, slot, 1)?
                .broadcast_eq(&experts)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&real)?;
            picks = (picks + hits.sum(0)?)?;
        }
        prob_sum = (prob_sum + probs.broadcast_mul(&real)?.sum(0)?)?;
    }
    let real_rows = (real.sum_all()? * router_logits.len() as f64)?.maximum(1f32)?;
    let f = picks.broadcast_div(&real_rows)?;
    let p = prob_sum.broadcast_div(&real_rows)?;
    (f * p)?.sum_all()? * num_experts as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad::{loss_and_gradients, Batch, LossOptions};

    fn tiny_moe_config() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "vocab_size": 32, "rope_theta": 10000.0, "num_experts": 8, "num_experts_per_tok": 1,
            "moe_intermediate_size": 8, "norm_topk_prob": false, "mlp_only_layers": [1]}"#,
        )
        .unwrap()
    }

    fn tiny_batch() -> Batch {
        let device = Device::Cpu;
        Batch {
            input_ids: Tensor::new(&[[3u32, 5, 7]], &device).unwrap(),
            attention_mask: Tensor::new(&[[1u32, 1, 1]], &device).unwrap(),
            labels: Tensor::new(&[[3i64, 5, 7]], &device).unwrap(),
        }
    }

    #[test]
    fn experts_no_token_chose_get_a_zero_gradient() {
        let model = Model::random(tiny_moe_config(), 3, ModelOptions::default()).unwrap();
        // Layer 1 is mlp-only: a dense MLP, no router.
        assert!(matches!(model.layers()[1].mlp, FeedForward::Dense(_)));
        let (_, grads) = loss_and_gradients(
            &model,
            &tiny_batch(),
            &LossOptions::for_model(model.config()),
        )
        .unwrap();
        assert_eq!(grads.num_present(), model.trainable_parameters().len());
        // 3 tokens, top-1 of 8 experts: at least 5 experts are idle and their gradient is 0.
        let idle = (0..8)
            .filter(|e| {
                let name = format!("model.layers.0.mlp.experts.{e}.up_proj.weight");
                let g = grads.get_by_name(&name).unwrap();
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
            .count();
        assert!(idle >= 5, "only {idle} idle experts");
    }

    #[test]
    fn checkpoint_must_match_the_config() {
        let model = Model::random(tiny_moe_config(), 3, ModelOptions::default()).unwrap();
        let mut tensors: HashMap<String, Tensor> =
            model.state_dict(DType::F32).unwrap().into_iter().collect();
        tensors.insert(
            "model.layers.0.self_attn.q_proj.bias".into(),
            Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Model::from_tensors(tiny_moe_config(), tensors.clone(), ModelOptions::default())
            .unwrap_err();
        assert!(err.to_string().contains("q_proj.bias"), "{err}");

        tensors.remove("model.layers.0.self_attn.q_proj.bias");
        tensors.remove("model.layers.0.mlp.experts.7.down_proj.weight");
        let err = Model::from_tensors(tiny_moe_config(), tensors.clone(), ModelOptions::default())
            .unwrap_err();
        assert!(
            err.to_string().contains("experts.7.down_proj.weight"),
            "{err}"
        );

        tensors.insert(
            "model.layers.0.mlp.experts.7.down_proj.weight".into(),
            Tensor::zeros((8, 16), DType::F32, &Device::Cpu).unwrap(),
        );
        let err =
            Model::from_tensors(tiny_moe_config(), tensors, ModelOptions::default()).unwrap_err();
        assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err}");
    }
}

#[cfg(test)]
mod device_routing_tests {
    use super::*;

    /// The GPU's formulation of the aux loss (one-hot counts on the device) is the host's count.
    #[test]
    fn the_device_aux_loss_counts_as_the_host_does() {
        let device = Device::Cpu;
        let values: Vec<f32> = (0..6 * 5 * 3)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let layers: Vec<Tensor> = values
            .chunks(6 * 5)
            .map(|v| Tensor::from_slice(v, (6, 5), &device).unwrap())
            .collect();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 0, 0]], &device).unwrap();
        let host = router_aux_loss(&layers, &mask, 2).unwrap();
        let real = mask.flatten_all().unwrap().ne(0u32).unwrap();
        let on_device = router_aux_loss_on_device(&layers, &real, 2).unwrap();
        let (host, on_device) = (
            host.to_scalar::<f32>().unwrap(),
            on_device.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (host - on_device).abs() <= 1e-6 * host.abs(),
            "{host} vs {on_device}"
        );
    }
}
