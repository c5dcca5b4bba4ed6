//! Config files in JSON, YAML and TOML: either `{launch: {...}, sft: {...}}` or a flat map of
//! ms-swift flag names (ms-swift's own config files are flat). Text in, text out: no file I/O.

use serde_json::{Map, Value};

use crate::builder::ConfigBuilder;
use crate::config::JobConfig;
use crate::diagnostics::{Diagnostic, Diagnostics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
    Toml,
}

impl Format {
    /// The format a file name's extension says.
    pub fn from_path(path: &str) -> Option<Format> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".json") {
            Some(Format::Json)
        } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            Some(Format::Yaml)
        } else if lower.ends_with(".toml") {
            Some(Format::Toml)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::Yaml => "YAML",
            Format::Toml => "TOML",
        }
    }
}

/// Parses the text of a config file into a JSON document (not yet checked against the schema).
pub fn parse_document(text: &str, format: Format) -> Result<Value, Diagnostic> {
    if text.len() > crate::shell::MAX_SCRIPT_BYTES {
        return Err(crate::shell::too_long("config", text.len()));
    }
    let parsed: Result<Value, String> = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
        Format::Toml => toml::from_str(text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|message| {
        let name = format.name();
        Diagnostic::error(
            "config",
            "config_syntax",
            format!("the {name} config is not valid {name}: {message}"),
            format!("{name} 配置文件语法错误：{message}"),
        )
        .with_fix(
            format!("fix the {name} syntax at the place named"),
            format!("请修正所指位置的 {name} 语法"),
        )
    })
}

/// Reads a config file's text into a config.
pub fn parse_config_text(text: &str, format: Format) -> Result<JobConfig, Diagnostics> {
    let document = parse_document(text, format).map_err(Diagnostics::from)?;
    let mut builder = ConfigBuilder::new();
    builder.apply_document(document);
    builder.finish()
}

/// The config as a nested `{launch, sft}` document holding only non-default values (or all).
pub fn to_document(config: &JobConfig, all: bool) -> Value {
    let actual = serde_json::to_value(config).unwrap_or(Value::Null);
    if all {
        return actual;
    }
    let default = serde_json::to_value(JobConfig::default()).unwrap_or(Value::Null);
    let mut root = Map::new();
    for section in ["launch", "sft"] {
        let mut changed = Map::new();
        if let (Some(Value::Object(values)), Some(Value::Object(defaults))) =
            (actual.get(section), default.get(section))
        {
            for (key, value) in values {
                if defaults.get(key) != Some(value) {
                    changed.insert(key.clone(), value.clone());
                }
            }
        }
        if !changed.is_empty() {
            root.insert(section.to_string(), Value::Object(changed));
        }
    }
    Value::Object(root)
}

fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Writes a config file's text.
pub fn to_config_text(config: &JobConfig, format: Format, all: bool) -> String {
    let document = to_document(config, all);
    match format {
        Format::Json => serde_json::to_string_pretty(&document).unwrap_or_default() + "\n",
        Format::Yaml => serde_yaml_ng::to_string(&document).unwrap_or_default(),
        // TOML has no null: an unset optional value is simply absent.
        Format::Toml => toml::to_string(&without_nulls(document)).unwrap_or_default(),
    }
}
