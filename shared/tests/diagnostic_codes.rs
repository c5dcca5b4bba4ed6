//! Every diagnostic code `validate` can emit is produced by a case here. The codes are read
//! from validate.rs itself (and the modules whose diagnostics it passes on: derive.rs,
//! lora.rs), so a new rule without a case fails this test by name.

use std::collections::BTreeSet;

use whet_shared::{
    gpus, parse_shell, validate, validate_with, CheckContext, Diagnostic, JobConfig,
};

const VALIDATE_RS: &str = include_str!("../src/validate.rs");
/// derive.rs judges the values it resolves for validate (`best_metric`).
const DERIVE_RS: &str = include_str!("../src/derive.rs");
/// lora.rs judges target_regex and lora_bias as it builds the adapter plan.
const LORA_RS: &str = include_str!("../src/lora.rs");

const BASE: &str = "swift sft --model Qwen/Qwen3-8B --dataset d.jsonl";

/// A code and an input that makes `validate` emit it (other codes may come along).
type Case = (&'static str, fn() -> Vec<Diagnostic>);

const CASES: &[Case] = &[
    // launch
    ("devices_invalid", || {
        launched("CUDA_VISIBLE_DEVICES=0,x", "")
    }),
    ("devices_duplicate", || {
        launched("CUDA_VISIBLE_DEVICES=0,0", "")
    }),
    ("nproc_device_mismatch", || {
        launched("CUDA_VISIBLE_DEVICES=0,1 NPROC_PER_NODE=3", "")
    }),
    ("single_process_many_gpus", || {
        launched("CUDA_VISIBLE_DEVICES=0,1", "")
    }),
    ("port_out_of_range", || {
        launched("MASTER_PORT=70000 NPROC_PER_NODE=2", "")
    }),
    ("port_privileged", || {
        launched("MASTER_PORT=80 NPROC_PER_NODE=2", "")
    }),
    ("node_rank_out_of_range", || {
        launched("NNODES=2 NODE_RANK=2 MASTER_ADDR=10.0.0.1", "")
    }),
    // The parser refuses an empty value, so only a config built in code holds one.
    ("empty_value", || {
        edited(|c| c.launch.master_addr = " ".into())
    }),
    ("env_name_invalid", || {
        edited(|c| {
            c.launch.env.insert("1BAD".into(), "x".into());
        })
    }),
    // model
    ("model_missing", || script("swift sft --dataset d.jsonl")),
    ("model_unknown", || {
        script("swift sft --model someone/not-a-catalog-model --dataset d.jsonl")
    }),
    ("bf16_unsupported_gpu", || {
        on_gpu("t4-16", "--torch_dtype bfloat16")
    }),
    // The parser checks template choices, so only a config built in code holds another one.
    ("template_unknown", || {
        edited(|c| c.sft.template = Some("llama3".into()))
    }),
    ("template_mismatch", || {
        script("swift sft --model Qwen/Qwen3-30B-A3B-Thinking-2507 --dataset d --template qwen3")
    }),
    ("max_length_over_model", || flags("--max_length 1000000")),
    ("packing_needs_flash_attn", || flags("--packing true")),
    // tuner
    ("quant_with_full", || {
        flags("--tuner_type full --quant_bits 4 --quant_method bnb")
    }),
    ("quant_bits_missing", || {
        flags("--tuner_type lora --quant_method bnb")
    }),
    ("quant_bits_invalid", || {
        flags("--tuner_type lora --quant_method bnb --quant_bits 3")
    }),
    ("quant_bits_8_unsupported", || {
        flags("--tuner_type lora --quant_method bnb --quant_bits 8")
    }),
    ("quant_method_missing", || {
        flags("--tuner_type lora --quant_bits 4")
    }),
    ("bnb_4bit_without_quant", || {
        flags("--tuner_type lora --bnb_4bit_quant_type fp4")
    }),
    ("adapter_field_with_full", || {
        flags("--tuner_type full --lora_rank 16")
    }),
    ("target_regex_invalid", || flags("--target_regex '('")),
    // The parser checks lora_bias choices, so only a config built in code holds another one.
    ("lora_bias_unknown", || {
        edited(|c| c.sft.lora_bias = "lora_only".into())
    }),
    ("target_modules_unmatched", || {
        flags("--target_modules qproj vproj")
    }),
    // data
    ("dataset_missing", || {
        script("swift sft --model Qwen/Qwen3-8B")
    }),
    ("split_ignored", || {
        flags("--val_dataset v.jsonl --split_dataset_ratio 0.1")
    }),
    ("streaming_needs_max_steps", || flags("--streaming true")),
    ("too_many_values", || flags("--model_name a b c")),
    ("must_not_be_negative", || {
        flags("--dataloader_num_workers -1")
    }),
    // training
    ("must_be_positive", || {
        flags("--per_device_train_batch_size 0")
    }),
    ("out_of_range", || flags("--warmup_ratio 1.5")),
    ("max_steps_invalid", || flags("--max_steps 0")),
    ("learning_rate_unusual", || flags("--learning_rate 0.5")),
    ("warmup_both_set", || {
        flags("--warmup_ratio 0.1 --warmup_steps 10")
    }),
    ("warmup_whole_run", || {
        flags("--max_steps 10 --warmup_ratio 0 --warmup_steps 10")
    }),
    ("min_lr_missing", || {
        flags("--lr_scheduler_type cosine_with_min_lr")
    }),
    ("json_invalid", || flags("--lr_scheduler_kwargs not-json")),
    // evaluation and saving
    ("eval_disabled_no_val", || flags("--eval_strategy steps")),
    ("eval_steps_follows_save", || {
        flags("--eval_strategy steps --split_dataset_ratio 0.1")
    }),
    ("save_total_limit_all", || flags("--save_total_limit -1")),
    ("best_without_eval", || {
        flags("--load_best_model_at_end true")
    }),
    ("best_strategy_mismatch", || {
        flags("--split_dataset_ratio 0.1 --load_best_model_at_end true --eval_strategy epoch")
    }),
    ("save_not_multiple_of_eval", || {
        flags("--split_dataset_ratio 0.1 --load_best_model_at_end true --eval_steps 30 --save_steps 50")
    }),
    ("save_after_end", || flags("--max_steps 10 --save_steps 50")),
    ("eval_after_end", || {
        flags("--max_steps 10 --save_steps 5 --split_dataset_ratio 0.1 --eval_strategy steps --eval_steps 50")
    }),
    ("best_metric_unknown", || {
        flags("--metric_for_best_model acc")
    }),
    ("eval_steps_missing", || {
        flags(
            "--save_strategy epoch --save_steps 0 --eval_strategy steps --split_dataset_ratio 0.1",
        )
    }),
    ("resume_only_model_alone", || {
        flags("--resume_only_model true")
    }),
    // distributed
    ("deepspeed_invalid", || {
        flags(r#"--deepspeed '{"train_batch_size": 8}'"#)
    }),
    ("deepspeed_unknown", || flags("--deepspeed zero5")),
    ("qlora_zero3", || {
        launched("NPROC_PER_NODE=2", "--tuner_type qlora --deepspeed zero3")
    }),
    ("deepspeed_single_process", || flags("--deepspeed zero2")),
    // memory: full fine-tuning of 8B with AdamW needs far more than 80 GB
    ("memory_over_gpu", || flags("--tuner_type full")),
];

fn parsed(script: &str) -> JobConfig {
    parse_shell(script).unwrap_or_else(|d| panic!("a case must parse: {script}\n{d}"))
}

fn script(script: &str) -> Vec<Diagnostic> {
    validate(&parsed(script))
}

/// BASE with environment assignments before it and flags after it.
fn launched(env: &str, extra: &str) -> Vec<Diagnostic> {
    script(&format!("{env} {BASE} {extra}"))
}

fn flags(extra: &str) -> Vec<Diagnostic> {
    launched("", extra)
}

fn on_gpu(gpu: &str, extra: &str) -> Vec<Diagnostic> {
    let context = CheckContext {
        gpu: gpus::find(gpu).unwrap_or_else(|| panic!("no GPU {gpu}")),
        ..CheckContext::default()
    };
    validate_with(&parsed(&format!("{BASE} {extra}")), &context)
}

/// BASE changed in code, for values no parser lets through.
fn edited(change: fn(&mut JobConfig)) -> Vec<Diagnostic> {
    let mut config = parsed(BASE);
    change(&mut config);
    validate(&config)
}

/// The codes validate.rs emits: the second argument of every `Diagnostic::error(`,
/// `Diagnostic::warning(` and `Diagnostic::info(` call, which must be a string literal.
fn emitted_codes() -> BTreeSet<String> {
    let mut codes = BTreeSet::new();
    for ((file, source), constructor) in [
        ("validate.rs", VALIDATE_RS),
        ("derive.rs", DERIVE_RS),
        ("lora.rs", LORA_RS),
    ]
    .into_iter()
    .flat_map(|s| {
        [
            "Diagnostic::error(",
            "Diagnostic::warning(",
            "Diagnostic::info(",
        ]
        .map(|c| (s, c))
    }) {
        for (at, _) in source.match_indices(constructor) {
            let line = source[..at].lines().count();
            let arguments = leading_arguments(&source[at + constructor.len()..], 2);
            let code = arguments.get(1).map(|a| a.trim()).unwrap_or_default();
            let literal = code
                .strip_prefix('"')
                .and_then(|c| c.strip_suffix('"'))
                .filter(|c| !c.contains('"'));
            let Some(literal) = literal else {
                panic!("{file}:{line}: the code of {constructor}..) is `{code}`, not a string literal this test can read");
            };
            codes.insert(literal.to_string());
        }
    }
    codes
}

/// The first `count` top-level arguments of a call whose text starts just after its `(`.
/// Enough Rust for validate.rs: strings (with escapes), chars are not needed, brackets nest.
fn leading_arguments(text: &str, count: usize) -> Vec<&str> {
    let mut arguments = Vec::new();
    let (mut depth, mut start, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => {
                arguments.push(&text[start..i]);
                break;
            }
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                arguments.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if arguments.len() == count {
            break;
        }
    }
    arguments
}

#[test]
fn every_code_validate_emits_has_a_case_and_every_case_a_code() {
    let emitted = emitted_codes();
    let cased: BTreeSet<String> = CASES.iter().map(|(code, _)| code.to_string()).collect();
    let untested: Vec<&String> = emitted.difference(&cased).collect();
    assert!(
        untested.is_empty(),
        "validate.rs emits codes no case produces; add an input for each to CASES: {untested:?}"
    );
    let stale: Vec<&String> = cased.difference(&emitted).collect();
    assert!(
        stale.is_empty(),
        "CASES name codes validate.rs does not emit: {stale:?}"
    );
    assert_eq!(cased.len(), CASES.len(), "one case per code");
}

#[test]
fn each_case_produces_its_code() {
    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|(code, diagnostics)| {
            let got: Vec<String> = diagnostics().into_iter().map(|d| d.code).collect();
            (!got.contains(&code.to_string())).then(|| format!("{code}: got {got:?}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "cases that do not produce their code:\n{}",
        failures.join("\n")
    );
}

#[test]
fn arguments_are_split_at_top_level_commas_only() {
    assert_eq!(
        leading_arguments(r#"field, "code", format!("a, {}", f(1, 2)))"#, 2),
        ["field", r#" "code""#]
    );
    assert_eq!(
        leading_arguments(r#""x\", y", "c")"#, 2),
        [r#""x\", y""#, r#" "c""#]
    );
}
