//! Property tests: random configs survive every export and import (both shell dialects, JSON,
//! YAML, TOML, share links), and random text never panics a parser.

use proptest::prelude::*;
use serde_json::{Map, Value};
use whet_shared::builder::ConfigBuilder;
use whet_shared::fields::{self, Kind, Section, FIELDS};
use whet_shared::shell::{parse_shell, to_shell_with, Dialect, ShellOptions};
use whet_shared::{parse_config_text, share, to_config_text, Format, JobConfig};

/// Text a user might put in a value: spaces, quotes, shell metacharacters, Chinese, newlines.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_./:#-]{1,24}",
        "[ -~]{0,20}[a-zA-Z0-9][ -~]{0,20}",
        "[a-z]{1,8}[ '\"$`\\\\\\n\\t!*?~#;&|<>(){}]{1,6}[a-z]{1,8}",
        "[你好世界模型数据]{1,8}",
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        -1e6f64..1e6,
        Just(1e-5),
        Just(0.1),
        (-300i32..300).prop_map(|e| 10f64.powi(e)),
        any::<f64>().prop_filter("finite", |x| x.is_finite()),
    ]
}

fn value_for(kind: Kind) -> BoxedStrategy<Value> {
    match kind {
        Kind::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        Kind::Int => any::<i64>().prop_map(|n| Value::Number(n.into())).boxed(),
        Kind::Float => float()
            .prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number))
            .boxed(),
        Kind::Str => text().prop_map(Value::String).boxed(),
        Kind::List => prop::collection::vec(text(), 1..4)
            .prop_map(|items| Value::Array(items.into_iter().map(Value::String).collect()))
            .boxed(),
        Kind::Choice(choices) => prop::sample::select(choices.to_vec())
            .prop_map(|c| Value::String(c.to_string()))
            .boxed(),
    }
}

/// A config where each field is left at its default or set to a random valid value.
fn job_config() -> impl Strategy<Value = JobConfig> {
    let per_field: Vec<BoxedStrategy<Option<Value>>> = FIELDS
        .iter()
        .map(|field| {
            let value = value_for(field.kind);
            let value = if field.optional {
                prop_oneof![value, Just(Value::Null)].boxed()
            } else {
                value
            };
            prop::option::weighted(0.5, value).boxed()
        })
        .collect();
    let env = prop::collection::btree_map("[A-Z_][A-Z0-9_]{0,10}", text(), 0..3);
    (per_field, env).prop_map(|(values, env)| {
        let mut launch = Map::new();
        let mut sft = Map::new();
        for (field, value) in FIELDS.iter().zip(values) {
            if let Some(value) = value {
                let target = if field.section == Section::Launch {
                    &mut launch
                } else {
                    &mut sft
                };
                target.insert(field.name.to_string(), value);
            }
        }
        let env: Map<String, Value> = env
            .into_iter()
            .filter(|(name, _)| fields::find_by_env(name).is_none())
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        launch.insert("env".into(), Value::Object(env));
        let mut builder = ConfigBuilder::new();
        builder.apply_document(serde_json::json!({"launch": launch, "sft": sft}));
        builder.finish().expect("generated values are valid")
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn shell_round_trip(config in job_config(), all in any::<bool>()) {
        for dialect in [Dialect::Swift, Dialect::Whet] {
            let script = to_shell_with(&config, ShellOptions { dialect, all });
            let back = parse_shell(&script);
            prop_assert!(back.is_ok(), "{}\n{:?}", script, back.err());
            prop_assert_eq!(back.unwrap(), config.clone(), "{}", script);
        }
    }

    #[test]
    fn file_round_trip(config in job_config(), all in any::<bool>()) {
        for format in [Format::Json, Format::Yaml, Format::Toml] {
            let text = to_config_text(&config, format, all);
            let back = parse_config_text(&text, format);
            prop_assert!(back.is_ok(), "{:?}\n{}\n{:?}", format, text, back.err());
            prop_assert_eq!(back.unwrap(), config.clone(), "{:?}\n{}", format, text);
        }
    }

    #[test]
    fn share_round_trip(config in job_config()) {
        let code = share::encode(&config);
        prop_assert!(code.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
        prop_assert_eq!(share::decode(&code).unwrap(), config);
    }
}
