//! One field at a time, as the studio's form edits a config: a field's current value as the
//! text an input shows, its default, and setting it from what the user typed (through the same
//! type checks as the shell parser and config files, so a bad value comes back as a
//! diagnostic naming the field).

use serde_json::Value;

use crate::builder::ConfigBuilder;
use crate::config::JobConfig;
use crate::diagnostics::{Diagnostic, Diagnostics};
use crate::fields::{Field, Kind, Section};
use crate::shell::format_float;

/// The field's value in the config as JSON (`null` for an unset optional field).
pub fn value(config: &JobConfig, field: &Field) -> Value {
    // Serialising one section is enough; the form calls this once per field per change.
    let section = match field.section {
        Section::Launch => serde_json::to_value(&config.launch),
        Section::Sft => serde_json::to_value(&config.sft),
    };
    section
        .ok()
        .and_then(|mut s| s.get_mut(field.name).map(Value::take))
        .unwrap_or(Value::Null)
}

/// A JSON value as the text of an input: numbers as the shell writes them (`1e-5`), lists one
/// item a line, `null` as the empty string.
pub fn value_text(field: &Field, value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (field.kind, n.as_f64()) {
            (Kind::Float, Some(x)) => format_float(x),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

/// The field's current value as input text.
pub fn text(config: &JobConfig, field: &Field) -> String {
    value_text(field, &value(config, field))
}

/// A list field's items.
pub fn list(config: &JobConfig, field: &Field) -> Vec<String> {
    match value(config, field) {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The default as input text; empty when the default is "auto"/unset.
pub fn default_text(field: &Field) -> String {
    text(&JobConfig::default(), field)
}

/// Sets a field to a JSON value, checked against its kind.
pub fn set_value(
    config: &JobConfig,
    field: &Field,
    value: Value,
) -> Result<JobConfig, Diagnostics> {
    let mut builder = ConfigBuilder::from_config(config);
    builder.set_json(field, value);
    builder.finish()
}

/// Sets a field from what the user typed in its input. Empty text unsets an optional field
/// ("auto"); for a required one it is an error, except for free-text fields that may be empty.
pub fn set_text(config: &JobConfig, field: &Field, text: &str) -> Result<JobConfig, Diagnostic> {
    let value = if text.trim().is_empty() && field.optional && field.kind != Kind::List {
        Value::Null
    } else if field.kind == Kind::List {
        Value::Array(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| Value::String(l.to_string()))
                .collect(),
        )
    } else {
        Value::String(text.to_string())
    };
    set_value(config, field, value).map_err(first)
}

/// Sets a list field from its items (blank items are dropped).
pub fn set_list(
    config: &JobConfig,
    field: &Field,
    items: &[String],
) -> Result<JobConfig, Diagnostic> {
    let items = items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| Value::String(s.to_string()))
        .collect();
    set_value(config, field, Value::Array(items)).map_err(first)
}

fn first(diagnostics: Diagnostics) -> Diagnostic {
    diagnostics
        .0
        .into_iter()
        .next()
        .unwrap_or_else(|| Diagnostic::error("config", "wrong_type", "invalid value", "取值无效"))
}

/// Reads whatever the user pasted into the studio's import box: a share link or code
/// (`...#cfg=v1.…`), a JSON config, a flat YAML config (`model: Qwen/Qwen3-8B`), or a shell
/// script / command line (`torchrun ... swift sft ...`, `whet sft ...`).
pub fn import_text(text: &str) -> Result<JobConfig, Diagnostics> {
    let trimmed = text.trim();
    if trimmed.starts_with("v1.") || trimmed.contains("#cfg=v1.") {
        return crate::share::decode(trimmed);
    }
    if trimmed.starts_with('{') {
        return crate::files::parse_config_text(trimmed, crate::files::Format::Json);
    }
    let first_line = trimmed
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("");
    let looks_like_yaml = first_line.split_once(':').is_some_and(|(key, _)| {
        !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if looks_like_yaml {
        return crate::files::parse_config_text(trimmed, crate::files::Format::Yaml);
    }
    crate::shell::parse_shell(trimmed)
}

/// The `CUDA_VISIBLE_DEVICES` text for a device picker's choice: `None` = all devices,
/// `Some("")` = CPU only, else the indices in ascending order.
pub fn devices_text(all: bool, cpu: bool, indices: &[u32]) -> Option<String> {
    if all {
        return None;
    }
    if cpu {
        return Some(String::new());
    }
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    Some(
        sorted
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::find;

    #[test]
    fn reads_and_writes_each_kind() {
        let config = crate::presets::find("seed").unwrap().config();
        let lr = find("learning_rate").unwrap();
        assert_eq!(text(&config, lr), "1e-5");
        assert_eq!(text(&config, find("nproc_per_node").unwrap()), "5");
        assert_eq!(
            text(&config, find("gradient_checkpointing").unwrap()),
            "true"
        );
        assert_eq!(
            list(&config, find("dataset").unwrap()),
            vec!["liucong/Chinese-DeepSeek-R1-Distill-data-110k#1000"]
        );
        assert_eq!(default_text(find("save_steps").unwrap()), "500");
        assert_eq!(default_text(lr), "");

        let changed = set_text(&config, find("nproc_per_node").unwrap(), "4").unwrap();
        assert_eq!(changed.launch.nproc_per_node, Some(4));
        let unset = set_text(&changed, find("nproc_per_node").unwrap(), " ").unwrap();
        assert_eq!(unset.launch.nproc_per_node, None);
        let bad =
            set_text(&config, find("per_device_train_batch_size").unwrap(), "two").unwrap_err();
        assert_eq!(bad.field, "per_device_train_batch_size");
        assert_eq!(bad.code, "wrong_type");
        assert!(!bad.message_zh.is_empty());

        let lists = set_text(&config, find("dataset").unwrap(), "a#5\n\n b \n").unwrap();
        assert_eq!(lists.sft.dataset, vec!["a#5", "b"]);
        let listed = set_list(
            &config,
            find("val_dataset").unwrap(),
            &["v".into(), " ".into()],
        )
        .unwrap();
        assert_eq!(listed.sft.val_dataset, vec!["v"]);
        let choice = set_text(&config, find("lr_scheduler_type").unwrap(), "linear").unwrap();
        assert_eq!(text(&choice, find("lr_scheduler_type").unwrap()), "linear");
        assert!(set_text(&config, find("lr_scheduler_type").unwrap(), "nope").is_err());
    }

    #[test]
    fn import_reads_scripts_configs_and_links() {
        let seed = crate::presets::find("seed").unwrap().config();
        assert_eq!(import_text(crate::presets::SEED_SCRIPT).unwrap(), seed);
        let link = crate::share::link("http://x", &seed);
        assert_eq!(import_text(&link).unwrap(), seed);
        let json = crate::files::to_config_text(&seed, crate::files::Format::Json, false);
        assert_eq!(import_text(&json).unwrap(), seed);
        let yaml = "model: Qwen/Qwen3-8B\ndataset: [a#10]\n";
        assert_eq!(import_text(yaml).unwrap().sft.dataset, vec!["a#10"]);
        let bad = import_text("swift sft --modle x").unwrap_err();
        assert!(bad.0[0].message_en.contains("modle"));
        assert!(!bad.0[0].message_zh.is_empty());
    }

    #[test]
    fn device_picker_text() {
        assert_eq!(devices_text(true, false, &[1]), None);
        assert_eq!(devices_text(false, true, &[1]), Some(String::new()));
        assert_eq!(devices_text(false, false, &[3, 1, 1]), Some("1,3".into()));
        let config = JobConfig::default();
        let field = find("cuda_visible_devices").unwrap();
        let cpu = set_value(&config, field, Value::String(String::new())).unwrap();
        assert_eq!(cpu.launch.cuda_visible_devices.as_deref(), Some(""));
    }
}
