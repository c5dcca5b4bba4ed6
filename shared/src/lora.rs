//! Which modules a LoRA run adapts and which it trains in full: one rule, which the engine builds
//! the model by and `derive` counts trainable parameters by.
//!
//! Names are the full module paths of a Qwen3 checkpoint (`model.layers.0.self_attn.q_proj`,
//! `model.layers.3.mlp.experts.7.down_proj`, `lm_head`). Matching follows PEFT: a
//! `target_modules` entry matches a module whose name is it or ends in `.<entry>`; a
//! `target_regex` must match the whole name (`re.fullmatch`).

use std::collections::BTreeSet;

use crate::config::SftConfig;
use crate::diagnostics::Diagnostic;

/// What `all-linear` expands to: every linear layer of the decoder, MoE experts' included, and
/// never `lm_head` or the MoE router (`mlp.gate`), as ms-swift does.
pub const ALL_LINEAR: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The embedding modules (`all-embedding` in `modules_to_save`).
pub const ALL_EMBEDDING: &[&str] = &["embed_tokens"];

/// The norm modules (`all-norm` in `modules_to_save`).
pub const ALL_NORM: &[&str] = &[
    "input_layernorm",
    "post_attention_layernorm",
    "q_norm",
    "k_norm",
    "norm",
];

/// How a LoRA run treats each module of the model.
#[derive(Debug, Clone)]
pub struct AdapterPlan {
    targets: Targets,
    /// Module names (or suffixes) trained in full and saved with the adapter.
    modules_to_save: BTreeSet<String>,
    /// `lora_bias all`: every bias trains.
    train_biases: bool,
}

#[derive(Debug, Clone)]
enum Targets {
    Names(BTreeSet<String>),
    Regex {
        pattern: String,
        regex: regex_lite::Regex,
    },
}

impl PartialEq for AdapterPlan {
    fn eq(&self, other: &Self) -> bool {
        let targets_equal = match (&self.targets, &other.targets) {
            (Targets::Names(a), Targets::Names(b)) => a == b,
            (Targets::Regex { pattern: a, .. }, Targets::Regex { pattern: b, .. }) => a == b,
            _ => false,
        };
        targets_equal
            && self.modules_to_save == other.modules_to_save
            && self.train_biases == other.train_biases
    }
}

/// PEFT's suffix rule: `name` is `key` or ends in `.key`.
fn is_or_ends_with(name: &str, key: &str) -> bool {
    name == key
        || name
            .strip_suffix(key)
            .is_some_and(|head| head.ends_with('.'))
}

impl AdapterPlan {
    /// The plan of an adapter run's config; an error names the field (`target_regex` that does
    /// not compile, `lora_bias` that is not none/all).
    pub fn from_config(sft: &SftConfig) -> Result<Self, Diagnostic> {
        let targets = match sft.target_regex.as_deref().filter(|p| !p.is_empty()) {
            Some(pattern) => {
                let regex = regex_lite::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    Diagnostic::error(
                        "target_regex",
                        "target_regex_invalid",
                        format!("target_regex `{pattern}` is not a valid regular expression: {e}"),
                        format!("target_regex `{pattern}` 不是有效的正则表达式：{e}"),
                    )
                    .with_fix(
                        r"write a pattern over full module names, e.g. .*\.(q_proj|v_proj)",
                        r"写一个匹配完整模块名的模式，例如 .*\.(q_proj|v_proj)",
                    )
                })?;
                Targets::Regex {
                    pattern: pattern.to_string(),
                    regex,
                }
            }
            None => Targets::Names(expand(&sft.target_modules, "all-linear", ALL_LINEAR)),
        };
        let train_biases = match sft.lora_bias.as_str() {
            "none" => false,
            "all" => true,
            other => {
                return Err(Diagnostic::error(
                    "lora_bias",
                    "lora_bias_unknown",
                    format!("lora_bias `{other}` is not one of none, all"),
                    format!("lora_bias `{other}` 不是 none、all 之一"),
                )
                .with_fix(
                    "set --lora_bias none (the default) or all",
                    "设置 --lora_bias none（默认）或 all",
                ))
            }
        };
        let mut modules_to_save = expand(&sft.modules_to_save, "all-embedding", ALL_EMBEDDING);
        if modules_to_save.remove("all-norm") {
            modules_to_save.extend(ALL_NORM.iter().map(|n| n.to_string()));
        }
        Ok(Self {
            targets,
            modules_to_save,
            train_biases,
        })
    }

    /// Whether the linear layer `module` gets a LoRA pair.
    pub fn adapts(&self, module: &str) -> bool {
        if self.saves_module(module) {
            // PEFT trains a module to save in full; it gets no adapter besides.
            return false;
        }
        match &self.targets {
            Targets::Names(names) => {
                module != "lm_head"
                    && !module.ends_with(".mlp.gate")
                    && names.iter().any(|key| is_or_ends_with(module, key))
            }
            Targets::Regex { regex, .. } => regex.is_match(module),
        }
    }

    /// Whether the parameter `name` (`<module>.weight`, `<module>.bias`) trains in full beside
    /// the adapters.
    pub fn trains_in_full(&self, name: &str) -> bool {
        let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        (self.train_biases && leaf == "bias") || self.saves_module(module)
    }

    fn saves_module(&self, module: &str) -> bool {
        self.modules_to_save
            .iter()
            .any(|key| is_or_ends_with(module, key))
    }

    /// The `target_modules` of PEFT's adapter_config.json: the names, or the regex (PEFT
    /// accepts a string there and full-matches it).
    pub fn peft_target_modules(&self) -> serde_json::Value {
        match &self.targets {
            Targets::Names(names) => serde_json::json!(names),
            Targets::Regex { pattern, .. } => serde_json::json!(pattern),
        }
    }

    /// `modules_to_save` as PEFT's adapter_config.json lists it (null when none).
    pub fn peft_modules_to_save(&self) -> serde_json::Value {
        if self.modules_to_save.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(self.modules_to_save)
        }
    }

    /// PEFT's `bias` value.
    pub fn peft_bias(&self) -> &'static str {
        if self.train_biases {
            "all"
        } else {
            "none"
        }
    }
}

/// The names of `list` with the shortcut `word` replaced by `expansion`.
fn expand(list: &[String], word: &str, expansion: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in list {
        if name == word {
            out.extend(expansion.iter().map(|n| n.to_string()));
        } else {
            out.insert(name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(edit: impl FnOnce(&mut SftConfig)) -> AdapterPlan {
        let mut sft = SftConfig::default();
        edit(&mut sft);
        AdapterPlan::from_config(&sft).unwrap()
    }

    #[test]
    fn all_linear_is_every_projection_but_never_lm_head_or_the_router() {
        let p = plan(|_| {});
        for module in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.11.self_attn.o_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.2.mlp.experts.17.gate_proj",
        ] {
            assert!(p.adapts(module), "{module}");
        }
        assert!(!p.adapts("lm_head"));
        assert!(!p.adapts("model.layers.2.mlp.gate"));
        assert!(!p.trains_in_full("model.embed_tokens.weight"));
    }

    #[test]
    fn names_match_whole_components_only() {
        let p = plan(|s| s.target_modules = vec!["q_proj".into(), "proj".into()]);
        assert!(p.adapts("model.layers.0.self_attn.q_proj"));
        assert!(
            !p.adapts("model.layers.0.self_attn.k_proj"),
            "proj is not .proj"
        );
    }

    #[test]
    fn a_regex_full_matches_and_replaces_the_names() {
        let p = plan(|s| s.target_regex = Some(r".*\.layers\.1\..*(q|v)_proj".into()));
        assert!(p.adapts("model.layers.1.self_attn.q_proj"));
        assert!(!p.adapts("model.layers.0.self_attn.q_proj"));
        assert!(
            !p.adapts("model.layers.1.mlp.down_proj"),
            "target_modules ignored"
        );
        assert!(!p.adapts("xmodel.layers.1.self_attn.q_proj.y"));
        let sft = SftConfig {
            target_regex: Some("(".into()),
            ..SftConfig::default()
        };
        let err = AdapterPlan::from_config(&sft).unwrap_err();
        assert_eq!(err.field, "target_regex");
    }

    #[test]
    fn modules_to_save_and_biases_train_in_full() {
        let p = plan(|s| {
            s.modules_to_save = vec!["lm_head".into(), "all-embedding".into(), "all-norm".into()];
            s.lora_bias = "all".into();
        });
        assert!(p.trains_in_full("lm_head.weight"));
        assert!(p.trains_in_full("model.embed_tokens.weight"));
        assert!(p.trains_in_full("model.norm.weight"));
        assert!(p.trains_in_full("model.layers.3.self_attn.k_norm.weight"));
        assert!(p.trains_in_full("model.layers.0.self_attn.q_proj.bias"));
        assert!(!p.trains_in_full("model.layers.0.self_attn.q_proj.weight"));
        let sft = SftConfig {
            lora_bias: "lora_only".into(),
            ..SftConfig::default()
        };
        assert_eq!(
            AdapterPlan::from_config(&sft).unwrap_err().field,
            "lora_bias"
        );
    }
}
