//! What the estimates need to know about a model: its shapes, parameter counts and default
//! template. Built from a config.json text or from a built-in catalog of the Qwen3 and Qwen2.5
//! families, so the offline editor can estimate without downloading anything.

use serde::{Deserialize, Serialize};

use crate::config::TorchDtype;

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

    fn attention_params(&self) -> (u64, u64) {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let linear = h * q + 2 * h * kv + q * h;
        let extra = if self.attention_bias {
            q + 2 * kv
        } else {
            2 * self.head_dim
        };
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

    /// LoRA parameters for `rank` on `target_modules` (`all-linear` = every projection,
    /// experts included, as PEFT does; never lm_head or the router).
    pub fn lora_params(&self, rank: u64, target_modules: &[String]) -> u64 {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let all = target_modules.iter().any(|t| t == "all-linear");
        let wants = |name: &str| all || target_modules.iter().any(|t| t == name);
        let lora = |fan_in: u64, fan_out: u64| rank * (fan_in + fan_out);
        let mut per_layer_attention = 0;
        if wants("q_proj") {
            per_layer_attention += lora(h, q);
        }
        if wants("k_proj") {
            per_layer_attention += lora(h, kv);
        }
        if wants("v_proj") {
            per_layer_attention += lora(h, kv);
        }
        if wants("o_proj") {
            per_layer_attention += lora(q, h);
        }
        let mut total = 0;
        for layer in 0..self.num_layers {
            let (width, copies) = if self.is_moe_layer(layer) {
                (self.moe_intermediate_size, self.num_experts)
            } else {
                (self.intermediate_size, 1)
            };
            let mut mlp = 0;
            if wants("gate_proj") {
                mlp += lora(h, width);
            }
            if wants("up_proj") {
                mlp += lora(h, width);
            }
            if wants("down_proj") {
                mlp += lora(width, h);
            }
            total += per_layer_attention + copies * mlp;
        }
        total
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
