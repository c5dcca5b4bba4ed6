//! Bad input gets a diagnostic naming the field, with a code, both languages and a fix.

use whet_shared::{parse_shell, share, validate, Diagnostic, Diagnostics, Severity};

const BASE: &str = "swift sft --model Qwen/Qwen3-8B --dataset data.jsonl";

fn parse_error(script: &str) -> Diagnostics {
    match parse_shell(script) {
        Ok(config) => panic!("expected an error for {script:?}, got {config:?}"),
        Err(d) => d,
    }
}

fn assert_complete(d: &Diagnostic) {
    assert!(!d.field.is_empty(), "{d:?}");
    assert!(!d.code.is_empty(), "{d:?}");
    assert!(
        !d.message_en.is_empty() && !d.message_zh.is_empty(),
        "{d:?}"
    );
    assert!(!d.fix.is_empty() && !d.fix_zh.is_empty(), "{d:?}");
}

fn only_error(script: &str) -> Diagnostic {
    let diagnostics = parse_error(script);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let d = diagnostics.0[0].clone();
    assert_eq!(d.severity, Severity::Error);
    assert_complete(&d);
    d
}

fn validation_error(script: &str, code: &str) -> Diagnostic {
    let config = parse_shell(script).unwrap_or_else(|d| panic!("{script}: {d}"));
    let diagnostics = validate(&config);
    let d = diagnostics
        .iter()
        .find(|d| d.code == code)
        .unwrap_or_else(|| panic!("no {code} for {script}: {diagnostics:?}"))
        .clone();
    assert_complete(&d);
    d
}

#[test]
fn unknown_flag_names_the_closest_known_one() {
    let d = only_error(&format!("{BASE} --learning_rat 1e-5"));
    assert_eq!(
        (d.field.as_str(), d.code.as_str()),
        ("learning_rat", "unknown_flag")
    );
    assert!(d.fix.contains("--learning_rate"), "{}", d.fix);
    let d = only_error(&format!("{BASE} --sft_type lora"));
    assert_eq!(d.code, "unknown_flag");
}

#[test]
fn wrong_types_and_empty_values() {
    let d = only_error(&format!("{BASE} --per_device_train_batch_size two"));
    assert_eq!(
        (d.field.as_str(), d.code.as_str()),
        ("per_device_train_batch_size", "wrong_type")
    );
    let d = only_error(&format!("{BASE} --gradient_checkpointing maybe"));
    assert_eq!(d.code, "wrong_type");
    let d = only_error(&format!("{BASE} --torch_dtype bf16x"));
    assert_eq!(d.field, "torch_dtype");
    let d = only_error(&format!("{BASE} --lr_scheduler_type cosin"));
    assert!(d.fix.contains("cosine"), "{}", d.fix);
    let d = only_error(&format!("{BASE} --learning_rate"));
    assert_eq!(
        (d.field.as_str(), d.code.as_str()),
        ("learning_rate", "empty_value")
    );
    let d = only_error(&format!("{BASE} --output_dir ''"));
    assert_eq!(d.code, "empty_value");
    let d = only_error(&format!("{BASE} --system You are helpful"));
    assert_eq!(d.code, "too_many_values");
    let d = only_error("NPROC_PER_NODE=five swift sft --model m --dataset d");
    assert_eq!(d.field, "nproc_per_node");
    assert!(d.message_en.contains("NPROC_PER_NODE"));
}

#[test]
fn broken_quotes_and_missing_commands() {
    let d = only_error(&format!("{BASE} --system 'You are a helpful assistant."));
    assert_eq!(
        (d.field.as_str(), d.code.as_str()),
        ("shell", "shell_unclosed_quote")
    );
    let d = only_error(&format!("{BASE} --system \"unterminated"));
    assert_eq!(d.code, "shell_unclosed_quote");
    let d = only_error("echo hello\nls -la");
    assert_eq!(d.code, "shell_no_command");
    let d = only_error("swift infer --model m");
    assert_eq!(d.code, "shell_not_sft");
    let d = only_error(
        "torchrun --nproc_per_node=2 --bogus 3 --no_python swift sft --model m --dataset d",
    );
    assert_eq!(d.code, "unknown_launcher_option");
}

#[test]
fn dataset_counts_must_be_whole_numbers() {
    let d = validation_error(
        "swift sft --model Qwen/Qwen3-8B --dataset 'liucong/x#abc'",
        "dataset_spec_invalid",
    );
    assert_eq!(d.field, "dataset");
    validation_error(
        "swift sft --model Qwen/Qwen3-8B --dataset 'x#0'",
        "dataset_spec_invalid",
    );
    validation_error("swift sft --model Qwen/Qwen3-8B", "dataset_missing");
}

#[test]
fn devices_and_processes_must_agree() {
    let d = validation_error(
        &format!("CUDA_VISIBLE_DEVICES=0,0 {BASE}"),
        "devices_duplicate",
    );
    assert_eq!(d.field, "cuda_visible_devices");
    validation_error(
        &format!("CUDA_VISIBLE_DEVICES=0,x {BASE}"),
        "devices_invalid",
    );
    let d = validation_error(
        "CUDA_VISIBLE_DEVICES=0,1,2,3,4 torchrun --nproc_per_node=4 --no_python swift sft --model Qwen/Qwen3-8B --dataset d.jsonl",
        "nproc_device_mismatch",
    );
    assert_eq!(d.field, "nproc_per_node");
    assert!(d.fix.contains("--nproc_per_node 5"), "{}", d.fix);
    // Fixing it makes the error go away.
    let fixed = parse_shell("CUDA_VISIBLE_DEVICES=0,1,2,3,4 torchrun --nproc_per_node=5 --no_python swift sft --model Qwen/Qwen3-8B --dataset d.jsonl").unwrap();
    assert!(validate(&fixed)
        .iter()
        .all(|d| d.code != "nproc_device_mismatch"));
    validation_error(&format!("{BASE} --nproc_per_node 0"), "must_be_positive");
    validation_error(
        "MASTER_PORT=70000 NPROC_PER_NODE=2 swift sft --model Qwen/Qwen3-8B --dataset d",
        "port_out_of_range",
    );
    let d = validation_error("torchrun --nproc_per_node 2 --master_port 80 --no_python swift sft --model Qwen/Qwen3-8B --dataset d", "port_privileged");
    assert_eq!(d.severity, Severity::Warning);
}

#[test]
fn numeric_rules() {
    let d = validation_error(&format!("{BASE} --learning_rate -1e-5"), "must_be_positive");
    assert_eq!(d.field, "learning_rate");
    validation_error(
        &format!("{BASE} --learning_rate 0.5"),
        "learning_rate_unusual",
    );
    validation_error(&format!("{BASE} --warmup_ratio 1.5"), "out_of_range");
    validation_error(
        &format!("{BASE} --warmup_ratio 0.1 --warmup_steps 10"),
        "warmup_both_set",
    );
    validation_error(
        &format!("{BASE} --per_device_train_batch_size 0"),
        "must_be_positive",
    );
    validation_error(&format!("{BASE} --save_total_limit 0"), "must_be_positive");
    validation_error(&format!("{BASE} --max_steps 0"), "max_steps_invalid");
    validation_error(
        &format!("{BASE} --streaming true"),
        "streaming_needs_max_steps",
    );
}

#[test]
fn combination_rules() {
    validation_error(
        "NPROC_PER_NODE=2 swift sft --model Qwen/Qwen3-8B --dataset d --tuner_type qlora --deepspeed zero3",
        "qlora_zero3",
    );
    let d = validation_error(
        &format!("{BASE} --deepspeed zero2"),
        "deepspeed_single_process",
    );
    assert_eq!(d.severity, Severity::Warning);
    assert!(d.message_en.contains("no effect"), "{}", d.message_en);
    validation_error(&format!("{BASE} --deepspeed zero5"), "deepspeed_unknown");
    validation_error(
        &format!("{BASE} --packing true"),
        "packing_needs_flash_attn",
    );
    validation_error(
        &format!("{BASE} --split_dataset_ratio 0.1 --load_best_model_at_end true --eval_steps 30 --save_steps 50"),
        "save_not_multiple_of_eval",
    );
    validation_error(
        &format!("{BASE} --load_best_model_at_end true"),
        "best_without_eval",
    );
    validation_error(
        &format!("{BASE} --tuner_type full --quant_bits 4 --quant_method bnb"),
        "quant_with_full",
    );
    validation_error(
        &format!("{BASE} --quant_bits 3 --quant_method bnb"),
        "quant_bits_invalid",
    );
    validation_error(&format!("{BASE} --model_name a b c"), "too_many_values");
    let d = validation_error(
        "swift sft --model Qwen/Qwen3-30B-A3B-Thinking-2507 --dataset d --template qwen3",
        "template_mismatch",
    );
    assert_eq!(d.severity, Severity::Warning);
}

#[test]
fn metric_for_best_model_is_one_whet_computes() {
    let d = validation_error(
        &format!("{BASE} --metric_for_best_model token_accuracy"),
        "best_metric_unknown",
    );
    assert_eq!(
        (d.severity, d.field.as_str()),
        (Severity::Error, "metric_for_best_model")
    );
    assert!(
        d.fix.contains("--metric_for_best_model token_acc"),
        "{}",
        d.fix
    );
    for good in ["loss", "eval_loss", "token_acc", "eval_exact_match"] {
        let config = parse_shell(&format!("{BASE} --metric_for_best_model {good}")).unwrap();
        assert!(
            validate(&config)
                .iter()
                .all(|d| d.code != "best_metric_unknown"),
            "{good}"
        );
    }
    // The recipe's view of the same field: the eval record's key and its direction.
    let resolved = |flags: &str| {
        let config = parse_shell(&format!("{BASE} {flags}")).unwrap();
        let metric = whet_shared::derive::best_metric(&config).unwrap();
        (metric.key, metric.greater_is_better)
    };
    assert_eq!(resolved(""), ("eval_loss", false));
    assert_eq!(
        resolved("--metric_for_best_model token_acc"),
        ("eval_token_acc", true)
    );
    assert_eq!(
        resolved("--metric_for_best_model eval_loss --greater_is_better true"),
        ("eval_loss", true)
    );
}

#[test]
fn a_ten_megabyte_line_is_refused_quickly() {
    let huge = format!("{BASE} --system '{}'", "x".repeat(10 * 1024 * 1024));
    let d = only_error(&huge);
    assert_eq!(d.code, "input_too_long");
    let huge_word = "a".repeat(10 * 1024 * 1024);
    let d = only_error(&huge_word);
    assert_eq!(d.code, "input_too_long");
    // Messages never echo the whole value.
    let d = only_error(&format!("{BASE} --{} 1", "q".repeat(5000)));
    assert!(d.message_en.len() < 300, "{}", d.message_en.len());
}

#[test]
fn share_decoder_rejects_garbage() {
    for bad in [
        "",
        "v1.",
        "v2.abc",
        "v1.!!!!",
        "v1.AAAA",
        "hello",
        "https://x/#cfg=v1.zzzz",
    ] {
        let d = share::decode(bad).unwrap_err();
        assert_complete(&d.0[0]);
    }
    // A valid link whose JSON names an unknown field.
    let code = deflate_stored(br#"{"sft": {"learning_rat": 1}}"#);
    let d = share::decode(&code).unwrap_err();
    assert_eq!(d.0[0].code, "unknown_field");
    let code = deflate_stored(br#"{"sft": {"per_device_train_batch_size": "two"}}"#);
    assert_eq!(share::decode(&code).unwrap_err().0[0].code, "wrong_type");
}

/// A v1 code holding arbitrary JSON (deflate's stored block), to test decoding of odd content.
fn deflate_stored(json: &[u8]) -> String {
    // Deflate "stored" block: header bits BFINAL=1, BTYPE=00, then LEN/NLEN and the bytes.
    let mut out = vec![0x01u8];
    let len = json.len() as u16;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(json);
    format!("v1.{}", base64url(&out))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..chunk.len() + 1 {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
