//! The model's hyper-parameters, read from a Hugging Face `config.json`.
//!
//! This module owns the translation from the two key styles found in the wild (transformers 5's
//! `rope_parameters` / `dtype` / `num_local_experts`, and the legacy 4.x `rope_theta` /
//! `torch_dtype` / `num_experts`) into one normalised [`ModelConfig`] that the model code reads.
//! Anything that would change the math but that we do not implement is an error naming the field.

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;

/// What went wrong reading a `config.json`; every variant names the field and, where there is
/// one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json is not valid JSON for a Qwen model: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json: `{field}` is missing; {fix}")]
    Missing {
        field: &'static str,
        fix: &'static str,
    },
    #[error("config.json: `{field}` = {value} is not supported; {fix}")]
    Unsupported {
        field: &'static str,
        value: String,
        fix: &'static str,
    },
}

/// The model families whet trains. They share one implementation; the differences are flags
/// on [`ModelConfig`] (biases, q/k norm, MoE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `Qwen3ForCausalLM`: q/k RMSNorm, optional attention bias on q/k/v/o.
    Qwen3,
    /// `Qwen3MoeForCausalLM`: Qwen3 attention with sparse MoE MLPs.
    Qwen3Moe,
    /// `Qwen2ForCausalLM` (Qwen2 and Qwen2.5): q/k/v bias, no o bias, no q/k norm.
    Qwen2,
}

/// The sparse mixture-of-experts settings of a `Qwen3MoeForCausalLM`.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k router probabilities so they sum to 1.
    pub norm_topk_prob: bool,
    /// Layer i is sparse when `(i + 1) % decoder_sparse_step == 0` and i is not mlp-only.
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub router_aux_loss_coef: f64,
}

/// Everything about a Qwen model that changes its math, normalised from either key style.
/// Deserialising it from a config.json runs the same checks as [`ModelConfig::from_json_str`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLPs (and of MoE models' `mlp_only_layers`).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    /// When true the output projection is `model.embed_tokens.weight` and there is no `lm_head`.
    pub tie_word_embeddings: bool,
    /// Bias on q_proj, k_proj and v_proj.
    pub qkv_bias: bool,
    /// Bias on o_proj (Qwen3's `attention_bias` covers it; Qwen2 never has one).
    pub o_proj_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3 only).
    pub qk_norm: bool,
    /// The dtype the checkpoint was saved in (`dtype` or `torch_dtype`), if stated.
    pub torch_dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub moe: Option<MoeConfig>,
}

/// One of the rope settings blocks (`rope_parameters` in v5, `rope_scaling` in legacy files).
#[derive(Debug, Clone, Deserialize)]
struct RopeBlock {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
}

/// `eos_token_id` is an int or a list of ints.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// config.json as written, in either key style; only [`ModelConfig::from_raw`] reads it.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeBlock>,
    rope_scaling: Option<RopeBlock>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    // MoE
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    router_aux_loss_coef: Option<f64>,
    shared_expert_intermediate_size: Option<usize>,
}

fn required(value: Option<usize>, field: &'static str) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::Unsupported {
            field,
            value: "0".into(),
            fix: "it must be a positive integer",
        }),
        Some(v) => Ok(v),
        None => Err(ConfigError::Missing {
            field,
            fix: "every Qwen config.json states it; is this the right file?",
        }),
    }
}

impl TryFrom<RawConfig> for ModelConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        Self::from_raw(raw)
    }
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = dir.as_ref().join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text)?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let architecture = Self::architecture(&raw)?;

        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(ConfigError::Unsupported {
                    field: "hidden_act",
                    value: act.clone(),
                    fix: "only silu (SwiGLU) MLPs are implemented",
                });
            }
        }
        if raw.use_sliding_window == Some(true) {
            return Err(ConfigError::Unsupported {
                field: "use_sliding_window",
                value: "true".into(),
                fix: "sliding-window attention is not implemented; set it to false",
            });
        }
        if raw.shared_expert_intermediate_size.unwrap_or(0) > 0 {
            return Err(ConfigError::Unsupported {
                field: "shared_expert_intermediate_size",
                value: format!("{:?}", raw.shared_expert_intermediate_size),
                fix: "shared experts (Qwen2-MoE) are not implemented",
            });
        }

        // v5 puts rope settings in `rope_parameters`; legacy files use a top-level `rope_theta`
        // and `rope_scaling` (null for plain RoPE).
        for (field, block) in [
            ("rope_parameters.rope_type", &raw.rope_parameters),
            ("rope_scaling.rope_type", &raw.rope_scaling),
        ] {
            if let Some(block) = block {
                let kind = block.rope_type.as_ref().or(block.legacy_type.as_ref());
                if let Some(kind) = kind {
                    if kind != "default" {
                        return Err(ConfigError::Unsupported {
                            field,
                            value: kind.clone(),
                            fix: "only plain RoPE (rope_type \"default\") is implemented",
                        });
                    }
                }
            }
        }
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(raw.rope_theta)
            .ok_or(ConfigError::Missing {
                field: "rope_parameters.rope_theta",
                fix: "state the RoPE base as rope_parameters.rope_theta (or legacy top-level rope_theta)",
            })?;

        let torch_dtype = match raw.dtype.as_ref().or(raw.torch_dtype.as_ref()) {
            None => None,
            Some(name) => {
                Some(
                    crate::dtype::parse(name).ok_or_else(|| ConfigError::Unsupported {
                        field: "dtype",
                        value: name.clone(),
                        fix: "use float32, bfloat16 or float16",
                    })?,
                )
            }
        };

        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ConfigError::Unsupported {
                field: "num_key_value_heads",
                value: num_key_value_heads.to_string(),
                fix: "it must divide num_attention_heads",
            });
        }
        // transformers' defaults when head_dim is absent: Qwen2 derives it, Qwen3's config class
        // defaults to 128 (every published Qwen3 config states it anyway).
        let head_dim = match (raw.head_dim, architecture) {
            (Some(d), _) => d,
            (None, Architecture::Qwen2) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(ConfigError::Missing {
                        field: "head_dim",
                        fix: "hidden_size is not a multiple of num_attention_heads, so head_dim must be given",
                    });
                }
                hidden_size / num_attention_heads
            }
            (None, _) => 128,
        };
        if head_dim % 2 != 0 {
            return Err(ConfigError::Unsupported {
                field: "head_dim",
                value: head_dim.to_string(),
                fix: "rotary embeddings need an even head_dim",
            });
        }

        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let moe = if architecture == Architecture::Qwen3Moe {
            let num_experts = required(
                raw.num_local_experts.or(raw.num_experts),
                "num_experts (num_local_experts)",
            )?;
            let num_experts_per_tok = required(raw.num_experts_per_tok, "num_experts_per_tok")?;
            if num_experts_per_tok > num_experts {
                return Err(ConfigError::Unsupported {
                    field: "num_experts_per_tok",
                    value: num_experts_per_tok.to_string(),
                    fix: "it cannot exceed the number of experts",
                });
            }
            let decoder_sparse_step = raw.decoder_sparse_step.unwrap_or(1);
            if decoder_sparse_step == 0 {
                return Err(ConfigError::Unsupported {
                    field: "decoder_sparse_step",
                    value: "0".into(),
                    fix: "use 1 to make every layer sparse",
                });
            }
            Some(MoeConfig {
                num_experts,
                num_experts_per_tok,
                moe_intermediate_size: required(
                    raw.moe_intermediate_size,
                    "moe_intermediate_size",
                )?,
                // transformers' Qwen3MoeConfig default.
                norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
                decoder_sparse_step,
                mlp_only_layers: raw.mlp_only_layers.unwrap_or_default(),
                router_aux_loss_coef: raw.router_aux_loss_coef.unwrap_or(0.001),
            })
        } else {
            None
        };
        // A MoE model whose every layer is mlp-only still needs intermediate_size; a dense one always.
        let needs_dense_mlp = match &moe {
            None => true,
            Some(m) => (0..num_hidden_layers).any(|i| !m.is_sparse_layer(i)),
        };
        let intermediate_size = if needs_dense_mlp {
            required(raw.intermediate_size, "intermediate_size")?
        } else {
            raw.intermediate_size.unwrap_or(0)
        };

        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_proj_bias, qk_norm) = match architecture {
            // Qwen2's attention hard-codes bias on q/k/v and none on o_proj.
            Architecture::Qwen2 => (true, false, false),
            Architecture::Qwen3 | Architecture::Qwen3Moe => (attention_bias, attention_bias, true),
        };

        Ok(ModelConfig {
            architecture,
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32768),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_proj_bias,
            qk_norm,
            torch_dtype,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id.and_then(|ids| match ids {
                TokenIds::One(id) => Some(id),
                TokenIds::Many(ids) => ids.first().copied(),
            }),
            moe,
        })
    }

    fn architecture(raw: &RawConfig) -> Result<Architecture, ConfigError> {
        let from_name = |name: &str| match name {
            "Qwen3ForCausalLM" | "qwen3" => Some(Architecture::Qwen3),
            "Qwen3MoeForCausalLM" | "qwen3_moe" => Some(Architecture::Qwen3Moe),
            "Qwen2ForCausalLM" | "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        };
        if let Some(name) = raw.architectures.as_ref().and_then(|a| a.first()) {
            return from_name(name).ok_or_else(|| ConfigError::Unsupported {
                field: "architectures",
                value: name.clone(),
                fix: "whet trains Qwen3ForCausalLM, Qwen3MoeForCausalLM and Qwen2ForCausalLM",
            });
        }
        match &raw.model_type {
            Some(t) => from_name(t).ok_or_else(|| ConfigError::Unsupported {
                field: "model_type",
                value: t.clone(),
                fix: "whet trains qwen3, qwen3_moe and qwen2 models",
            }),
            None => Err(ConfigError::Missing {
                field: "architectures",
                fix: "name the model class, e.g. [\"Qwen3ForCausalLM\"]",
            }),
        }
    }

    /// Whether decoder layer `layer` uses the sparse MoE block instead of the dense MLP.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.is_sparse_layer(layer))
    }
}

impl MoeConfig {
    /// transformers' rule: not listed in mlp_only_layers, and hit by decoder_sparse_step.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5_DENSE: &str = r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "float32",
        "tie_word_embeddings": false, "attention_bias": false, "hidden_act": "silu"}"#;

    #[test]
    fn reads_v5_keys() {
        let cfg = ModelConfig::from_json_str(V5_DENSE).unwrap();
        assert_eq!(cfg.architecture, Architecture::Qwen3);
        assert_eq!(cfg.rope_theta, 1e6);
        assert_eq!(cfg.torch_dtype, Some(DType::F32));
        assert!(cfg.qk_norm && !cfg.qkv_bias && !cfg.o_proj_bias);
        assert!(cfg.moe.is_none());
    }

    #[test]
    fn serde_runs_the_same_checks() {
        let cfg: ModelConfig = serde_json::from_str(V5_DENSE).unwrap();
        assert_eq!(cfg, ModelConfig::from_json_str(V5_DENSE).unwrap());
        let bad = V5_DENSE.replace("\"silu\"", "\"gelu\"");
        let err = serde_json::from_str::<ModelConfig>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_act"), "{err}");
    }

    #[test]
    fn reads_legacy_moe_keys() {
        let text = r#"{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "rope_theta": 10000.0,
            "rope_scaling": null, "torch_dtype": "bfloat16", "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": true,
            "decoder_sparse_step": 2, "mlp_only_layers": [3]}"#;
        let cfg = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(cfg.rope_theta, 1e4);
        assert_eq!(cfg.torch_dtype, Some(DType::BF16));
        let moe = cfg.moe.as_ref().unwrap();
        assert_eq!(moe.num_experts, 8);
        let sparse: Vec<bool> = (0..4).map(|i| cfg.is_sparse_layer(i)).collect();
        assert_eq!(sparse, [false, true, false, false]);
    }

    #[test]
    fn v5_moe_uses_num_local_experts() {
        let text = V5_DENSE
            .replace("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
            .replace(
                "\"hidden_act\"",
                "\"num_local_experts\": 6, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 8, \"hidden_act\"",
            );
        let cfg = ModelConfig::from_json_str(&text).unwrap();
        assert_eq!(cfg.moe.unwrap().num_experts, 6);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_derived_head_dim() {
        let text = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 1000000.0,
            "tie_word_embeddings": true}"#;
        let cfg = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert!(cfg.qkv_bias && !cfg.o_proj_bias && !cfg.qk_norm && cfg.tie_word_embeddings);
    }

    #[test]
    fn errors_name_the_field() {
        let no_theta = V5_DENSE.replace("\"rope_theta\": 1000000.0, ", "");
        let err = ModelConfig::from_json_str(&no_theta)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_theta"), "{err}");

        let yarn = V5_DENSE.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"");
        let err = ModelConfig::from_json_str(&yarn).unwrap_err().to_string();
        assert!(err.contains("rope_type") && err.contains("yarn"), "{err}");

        let llama = V5_DENSE.replace("Qwen3ForCausalLM", "LlamaForCausalLM");
        let err = ModelConfig::from_json_str(&llama).unwrap_err().to_string();
        assert!(err.contains("architectures"), "{err}");

        let moe = V5_DENSE.replace("Qwen3ForCausalLM", "Qwen3MoeForCausalLM");
        let err = ModelConfig::from_json_str(&moe).unwrap_err().to_string();
        assert!(err.contains("num_experts"), "{err}");

        let f8 = V5_DENSE.replace("\"float32\"", "\"float8\"");
        let err = ModelConfig::from_json_str(&f8).unwrap_err().to_string();
        assert!(err.contains("dtype"), "{err}");
    }
}
