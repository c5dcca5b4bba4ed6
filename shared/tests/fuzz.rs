//! Fuzzing with proptest: random bytes, random shell-ish token soups and mutated share codes go
//! into the parsers; nothing may panic, and every failure is a diagnostic.
//!
//! The quick version runs with the test suite. For a longer run (the figure in the README):
//! `WHET_FUZZ_SECONDS=60 cargo test --release -p whet-shared --test fuzz -- --ignored --nocapture`

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use whet_shared::{parse_config_text, parse_shell, share, validate, Format};

fn shellish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("swift".to_string()),
        Just("sft".to_string()),
        Just("whet".to_string()),
        Just("torchrun".to_string()),
        Just("--no_python".to_string()),
        Just("\\\n".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("#".to_string()),
        Just("$".to_string()),
        Just("${".to_string()),
        Just("=".to_string()),
        Just("\n".to_string()),
        Just("export".to_string()),
        prop::sample::select(
            whet_shared::fields::FIELDS
                .iter()
                .map(|f| format!("--{}", f.name))
                .collect::<Vec<_>>()
        ),
        "[A-Z_]{1,6}=[a-z0-9,]{0,6}",
        "-?[0-9]{1,4}(\\.[0-9]{1,3})?(e-?[0-9])?",
        "[a-z/#:.]{1,12}",
        any::<String>(),
    ];
    prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.join(" "))
}

fn check_one(text: &str) {
    match parse_shell(text) {
        Ok(config) => {
            let _ = validate(&config);
        }
        Err(diagnostics) => assert!(diagnostics
            .iter()
            .all(|d| !d.code.is_empty() && !d.message_en.is_empty())),
    }
    let _ = share::decode(text);
    for format in [Format::Json, Format::Yaml, Format::Toml] {
        let _ = parse_config_text(text, format);
    }
}

fn mutated_share_code() -> impl Strategy<Value = String> {
    let seed = share::encode(
        &parse_shell("swift sft --model Qwen/Qwen3-8B --dataset d.jsonl --lora_rank 16").unwrap(),
    );
    (0..seed.len(), any::<u8>(), 0usize..4).prop_map(move |(at, byte, mode)| {
        let mut bytes = seed.clone().into_bytes();
        match mode {
            0 => bytes[at] = b"ABCxyz019-_."[byte as usize % 12],
            1 => bytes.truncate(at),
            2 => bytes.insert(at, byte % 128),
            _ => {
                bytes.remove(at);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn run(seconds: Option<u64>, cases: u32) {
    let deadline = seconds.map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s));
    let mut total = 0u64;
    loop {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&any::<Vec<u8>>(), |bytes| {
                check_one(&String::from_utf8_lossy(&bytes));
                Ok(())
            })
            .unwrap();
        runner
            .run(&shellish(), |text| {
                check_one(&text);
                Ok(())
            })
            .unwrap();
        runner
            .run(&mutated_share_code(), |code| {
                let _ = share::decode(&code);
                Ok(())
            })
            .unwrap();
        total += 3 * cases as u64;
        match deadline {
            Some(d) if std::time::Instant::now() < d => continue,
            _ => break,
        }
    }
    println!("fuzzed {total} inputs without a panic");
}

#[test]
fn parsers_never_panic() {
    run(None, 300);
}

#[test]
#[ignore = "long run; see the module comment"]
fn fuzz_for_a_while() {
    let seconds = std::env::var("WHET_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    run(Some(seconds), 2000);
}
