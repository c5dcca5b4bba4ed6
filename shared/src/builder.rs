//! Builds a `JobConfig` from loose values: words from a command line, values from a JSON/YAML/TOML
//! file or a share link. Every value goes through its field's `Kind`, so a wrong type comes back
//! as a diagnostic that names the field, never as a panic or an anonymous serde error.

use serde_json::{Map, Value};

use crate::config::JobConfig;
use crate::diagnostics::{closest_word, shorten, Diagnostic, Diagnostics};
use crate::fields::{self, Field, Kind, Section};

pub struct ConfigBuilder {
    launch: Map<String, Value>,
    sft: Map<String, Value>,
    diagnostics: Vec<Diagnostic>,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self::from_config(&JobConfig::default())
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

impl ConfigBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from an existing config (later values override it).
    pub fn from_config(config: &JobConfig) -> Self {
        let value = serde_json::to_value(config).unwrap_or(Value::Null);
        ConfigBuilder {
            launch: object(value.get("launch").cloned().unwrap_or(Value::Null)),
            sft: object(value.get("sft").cloned().unwrap_or(Value::Null)),
            diagnostics: Vec::new(),
        }
    }

    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    fn store(&mut self, field: &Field, value: Value) {
        let target = match field.section {
            Section::Launch => &mut self.launch,
            Section::Sft => &mut self.sft,
        };
        target.insert(field.name.to_string(), value);
    }

    /// Sets an environment variable the script exports; launcher variables fill their field.
    pub fn set_env(&mut self, var: &str, value: &str) {
        if let Some(field) = fields::find_by_env(var) {
            self.set_words(field, var, &[value.to_string()]);
        } else {
            let env = self
                .launch
                .entry("env")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(env) = env {
                env.insert(var.to_string(), Value::String(value.to_string()));
            }
        }
    }

    /// Sets a field from the words after its flag (`--dataset a b c` gives three words).
    pub fn set_words(&mut self, field: &Field, flag: &str, words: &[String]) {
        match coerce_words(field, words) {
            Ok(value) => self.store(field, value),
            Err(mut d) => {
                if flag.trim_start_matches('-') != field.name {
                    // Say what the user wrote (`NPROC_PER_NODE`, `--train_type`), not only our name.
                    d.message_en = format!("{} (from `{flag}`)", d.message_en);
                    d.message_zh = format!("{}（来自 `{flag}`）", d.message_zh);
                }
                self.push(d)
            }
        }
    }

    /// Sets a field from a value in a config file or share link.
    pub fn set_json(&mut self, field: &Field, value: Value) {
        match coerce_json(field, value) {
            Ok(value) => self.store(field, value),
            Err(d) => self.push(d),
        }
    }

    /// Sets a field by name from a config file key; unknown names are diagnostics.
    pub fn set_key(&mut self, key: &str, value: Value, section: Option<Section>) {
        if key == "env" && section != Some(Section::Sft) {
            match value {
                Value::Object(map) => {
                    for (var, v) in map {
                        let text = match v {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        self.set_env(&var, &text);
                    }
                }
                _ => self.push(
                    Diagnostic::error(
                        "env",
                        "wrong_type",
                        "`env` must be a map of environment variable names to values",
                        "`env` 必须是环境变量名到取值的映射",
                    )
                    .with_fix(
                        "write env: {PYTORCH_CUDA_ALLOC_CONF: \"expandable_segments:True\"}",
                        "写成 env: {PYTORCH_CUDA_ALLOC_CONF: \"expandable_segments:True\"}",
                    ),
                ),
            }
            return;
        }
        match fields::find(key) {
            Some(field) if section.is_none_or(|s| s == field.section) => {
                self.set_json(field, value)
            }
            Some(field) => self.push(unknown_key(key, Some(field.name), section)),
            None => self.push(unknown_key(key, fields::closest(key), section)),
        }
    }

    /// Reads a whole JSON value: either `{"launch": {...}, "sft": {...}}` or a flat map of
    /// ms-swift flag names (as ms-swift's own YAML config files are written).
    pub fn apply_document(&mut self, document: Value) {
        let Value::Object(map) = document else {
            self.push(
                Diagnostic::error(
                    "config",
                    "config_not_a_map",
                    "a config file must be a map of field names to values",
                    "配置文件必须是“字段名: 值”的映射",
                )
                .with_fix(
                    "write `model: Qwen/Qwen3-8B` style entries, or {\"launch\": {...}, \"sft\": {...}}",
                    "使用 `model: Qwen/Qwen3-8B` 这样的条目，或 {\"launch\": {...}, \"sft\": {...}}",
                ),
            );
            return;
        };
        let nested = map.keys().any(|k| k == "launch" || k == "sft");
        for (key, value) in map {
            match (nested, key.as_str()) {
                (true, "launch" | "sft") => {
                    let section = if key == "launch" {
                        Section::Launch
                    } else {
                        Section::Sft
                    };
                    match value {
                        Value::Object(inner) => {
                            for (k, v) in inner {
                                self.set_key(&k, v, Some(section));
                            }
                        }
                        Value::Null => {}
                        _ => self.push(Diagnostic::error(
                            key.clone(),
                            "wrong_type",
                            format!("`{key}` must be a map of fields"),
                            format!("`{key}` 必须是字段映射"),
                        )),
                    }
                }
                _ => self.set_key(&key, value, None),
            }
        }
    }

    pub fn finish(mut self) -> Result<JobConfig, Diagnostics> {
        if self.diagnostics.iter().any(Diagnostic::is_error) {
            return Err(Diagnostics(self.diagnostics));
        }
        let mut root = Map::new();
        root.insert(
            "launch".into(),
            Value::Object(std::mem::take(&mut self.launch)),
        );
        root.insert("sft".into(), Value::Object(std::mem::take(&mut self.sft)));
        let deserializer = Value::Object(root);
        match serde_path_to_error::deserialize::<_, JobConfig>(deserializer) {
            Ok(config) => Ok(config.normalized()),
            Err(e) => {
                let path = e.path().to_string();
                let field = path.rsplit('.').next().unwrap_or(&path).to_string();
                Err(Diagnostic::error(
                    field,
                    "wrong_type",
                    format!("invalid value at {path}: {}", e.inner()),
                    format!("{path} 的取值无效：{}", e.inner()),
                )
                .into())
            }
        }
    }
}

fn unknown_key(key: &str, suggestion: Option<&str>, section: Option<Section>) -> Diagnostic {
    let shown = shorten(key);
    let place = match section {
        Some(Section::Launch) => " in `launch`",
        Some(Section::Sft) => " in `sft`",
        None => "",
    };
    let d = Diagnostic::error(
        key,
        "unknown_field",
        format!("unknown field `{shown}`{place}"),
        format!("未知字段 `{shown}`{place}"),
    );
    match suggestion {
        Some(s) => d.with_fix(format!("did you mean `{s}`?"), format!("是否想写 `{s}`？")),
        None => d.with_fix(
            "remove it; `whet check --help` lists the fields",
            "删除该字段；可用字段见 `whet check --help`",
        ),
    }
}

pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Some(true),
        "false" | "no" | "0" | "off" => Some(false),
        _ => None,
    }
}

fn wrong_value(field: &Field, got: &str, expected_en: &str, expected_zh: &str) -> Diagnostic {
    let got = shorten(got);
    Diagnostic::error(
        field.name,
        "wrong_type",
        format!("`{}` expects {expected_en}, got `{got}`", field.name),
        format!("`{}` 需要{expected_zh}，但得到 `{got}`", field.name),
    )
}

fn empty_value(field: &Field) -> Diagnostic {
    Diagnostic::error(
        field.name,
        "empty_value",
        format!("`--{}` has no value", field.name),
        format!("`--{}` 没有给出取值", field.name),
    )
    .with_fix(
        format!("write `--{} <value>` or remove the flag", field.name),
        format!("写成 `--{} <值>`，或删除该参数", field.name),
    )
}

fn choice_value(field: &Field, choices: &[&str], text: &str) -> Result<Value, Diagnostic> {
    let lowered = text.trim().to_ascii_lowercase();
    if let Some(c) = choices.iter().find(|c| **c == lowered) {
        return Ok(Value::String(c.to_string()));
    }
    let list = choices.join(", ");
    let d = wrong_value(
        field,
        text,
        &format!("one of {list}"),
        &format!("以下之一：{list}"),
    );
    Err(match closest_word(&lowered, choices.iter().copied()) {
        Some(c) => d.with_fix(format!("use `{c}`"), format!("改为 `{c}`")),
        None => d.with_fix(
            format!("use one of {list}"),
            format!("使用以下之一：{list}"),
        ),
    })
}

fn scalar_from_text(field: &Field, text: &str) -> Result<Value, Diagnostic> {
    match field.kind {
        Kind::Bool => parse_bool(text).map(Value::Bool).ok_or_else(|| {
            wrong_value(field, text, "true or false", "true 或 false").with_fix(
                format!("write `--{} true` or `--{} false`", field.name, field.name),
                format!("写成 `--{} true` 或 `--{} false`", field.name, field.name),
            )
        }),
        Kind::Int => text
            .trim()
            .parse::<i64>()
            .map(|n| Value::Number(n.into()))
            .map_err(|_| {
                wrong_value(field, text, "a whole number", "整数").with_fix(
                    format!("write a whole number, e.g. `--{} 8`", field.name),
                    format!("填写整数，例如 `--{} 8`", field.name),
                )
            }),
        Kind::Float => {
            let number = text.trim().parse::<f64>().ok().filter(|x| x.is_finite());
            number
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| {
                    wrong_value(field, text, "a number", "数字").with_fix(
                        format!("write a number, e.g. `--{} 1e-5`", field.name),
                        format!("填写数字，例如 `--{} 1e-5`", field.name),
                    )
                })
        }
        Kind::Choice(choices) => choice_value(field, choices, text),
        Kind::Str | Kind::List => Ok(Value::String(text.to_string())),
    }
}

/// Reads the words that followed a flag on a command line.
pub fn coerce_words(field: &Field, words: &[String]) -> Result<Value, Diagnostic> {
    let allows_empty = field.name == "cuda_visible_devices" || field.name == "system";
    match (field.kind, words) {
        (Kind::Bool, []) => Ok(Value::Bool(true)),
        (_, []) => Err(empty_value(field)),
        (Kind::List, words) => {
            if words.iter().any(|w| w.trim().is_empty()) {
                return Err(empty_value(field));
            }
            Ok(Value::Array(
                words.iter().map(|w| Value::String(w.clone())).collect(),
            ))
        }
        (_, [word]) => {
            if word.trim().is_empty() && !allows_empty {
                return Err(empty_value(field));
            }
            scalar_from_text(field, word)
        }
        (_, words) => {
            let shown = shorten(&words.join(" "));
            Err(Diagnostic::error(
                field.name,
                "too_many_values",
                format!(
                    "`--{}` takes one value but got {}: {shown}",
                    field.name,
                    words.len()
                ),
                format!(
                    "`--{}` 只接受一个值，但给出了 {} 个：{shown}",
                    field.name,
                    words.len()
                ),
            )
            .with_fix(
                "quote a value that contains spaces, e.g. --system 'You are a helpful assistant.'",
                "含空格的值请加引号，例如 --system 'You are a helpful assistant.'",
            ))
        }
    }
}

/// Reads a value from a config file (where YAML may give `1e-5` as a string, or a list as one item).
pub fn coerce_json(field: &Field, value: Value) -> Result<Value, Diagnostic> {
    match (field.kind, value) {
        (_, Value::Null) if field.optional => Ok(Value::Null),
        (_, Value::Null) => Err(Diagnostic::error(
            field.name,
            "missing_value",
            format!("`{}` needs a value; it cannot be null", field.name),
            format!("`{}` 需要取值，不能为 null", field.name),
        )
        .with_fix(
            "give a value or remove the key to use the default",
            "给出取值，或删除该键以使用默认值",
        )),
        // An empty list in a file is simply an empty list (a flag cannot say that).
        (Kind::List, Value::Array(items)) if items.is_empty() => Ok(Value::Array(items)),
        (Kind::List, Value::Array(items)) => {
            let mut words = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => words.push(s),
                    Value::Number(n) => words.push(n.to_string()),
                    Value::Bool(b) => words.push(b.to_string()),
                    other => {
                        return Err(wrong_value(
                            field,
                            &other.to_string(),
                            "a list of strings",
                            "字符串列表",
                        ))
                    }
                }
            }
            coerce_words(field, &words)
        }
        (Kind::List, Value::String(s)) => coerce_words(field, &[s]),
        (Kind::Bool, Value::Bool(b)) => Ok(Value::Bool(b)),
        (Kind::Int, Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Value::Number(i.into())),
            None => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                    Ok(Value::Number((f as i64).into()))
                }
                _ => Err(wrong_value(field, &n.to_string(), "a whole number", "整数")),
            },
        },
        (Kind::Float, Value::Number(n)) => Ok(Value::Number(n)),
        (Kind::Str, value @ (Value::Object(_) | Value::Array(_)))
            if field.name == "lr_scheduler_kwargs" || field.name == "deepspeed" =>
        {
            // An inline JSON object (a YAML/TOML table) is kept as its JSON text, as ms-swift does.
            Ok(Value::String(value.to_string()))
        }
        (_, Value::String(s)) => coerce_words(field, &[s]),
        (_, Value::Number(n)) => coerce_words(field, &[n.to_string()]),
        (_, Value::Bool(b)) => coerce_words(field, &[b.to_string()]),
        (_, other) => Err(wrong_value(
            field,
            &other.to_string(),
            "a single value",
            "单个值",
        )),
    }
}
