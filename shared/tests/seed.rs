//! The seed's command, exactly as the parameter guide assembles it, and the variants of it users
//! paste: every value must land in its field, and the derived figures must be transformers'.

use whet_shared::config::{IntervalStrategy, TorchDtype, TunerType};
use whet_shared::shell::{parse_shell_with, to_shell, Dialect};
use whet_shared::{check, parse_shell, share, CheckContext, JobConfig, Severity};

/// The seed's command exactly as the parameter guide assembles it (examples/seed.sh ships it).
pub const SEED: &str = whet_shared::presets::SEED_SCRIPT;

fn seed() -> JobConfig {
    parse_shell(SEED).unwrap_or_else(|d| panic!("the seed must parse: {d}"))
}

#[test]
fn the_seed_parses_with_every_value_in_place() {
    let c = seed();
    assert_eq!(c.launch.cuda_visible_devices.as_deref(), Some("0,1,2,3,4"));
    assert_eq!(c.launch.nproc_per_node, Some(5));
    assert_eq!(c.launch.master_port, 29500);
    assert_eq!(c.launch.nnodes, 1);
    let s = &c.sft;
    assert_eq!(s.model.as_deref(), Some("Qwen/Qwen3-30B-A3B-Thinking-2507"));
    assert_eq!(s.tuner_type, TunerType::Full);
    assert_eq!(s.torch_dtype, Some(TorchDtype::Bfloat16));
    assert_eq!(
        s.dataset,
        vec!["liucong/Chinese-DeepSeek-R1-Distill-data-110k#1000"]
    );
    assert_eq!(s.max_length, Some(4096));
    assert_eq!(s.system.as_deref(), Some("You are a helpful assistant."));
    assert_eq!(s.num_train_epochs, 3.0);
    assert_eq!(s.per_device_train_batch_size, 2);
    assert_eq!(s.per_device_eval_batch_size, 1);
    assert_eq!(s.gradient_accumulation_steps, Some(8));
    assert_eq!(s.learning_rate, Some(1e-5));
    assert_eq!(s.warmup_ratio, 0.1);
    assert!(s.gradient_checkpointing);
    assert_eq!(s.eval_strategy, Some(IntervalStrategy::Steps));
    assert_eq!(s.eval_steps, Some(50));
    assert_eq!(s.save_steps, 50);
    assert_eq!(s.save_total_limit, Some(3));
    assert_eq!(s.logging_steps, 5);
    assert_eq!(s.output_dir.as_deref(), Some("output_qwen3_30b_full"));
    assert_eq!(s.dataloader_num_workers, Some(4));
    assert_eq!(s.model_author, vec!["swift"]);
    assert_eq!(s.model_name, vec!["swift-robot"]);
    assert_eq!(s.deepspeed.as_deref(), Some("zero2"));
    assert!(c.launch.env.is_empty());
}

#[test]
fn the_seed_check_reports_transformers_arithmetic() {
    let report = check(&seed(), &CheckContext::default());
    let d = &report.derived;
    assert_eq!(d.world_size, 5);
    assert_eq!(d.effective_batch_size, 80);
    assert_eq!(d.gradient_accumulation_steps, 8);
    assert_eq!(d.learning_rate, 1e-5);
    assert_eq!(d.train_rows, Some(1000));
    // 1000 rows over 5 ranks: 200 each, 100 batches of 2; ceil(100 / 8) = 13 updates per epoch
    // (transformers 5 counts the last partial accumulation); ceil(3 * 13) = 39; ceil(39 * 0.1) = 4.
    assert_eq!(d.steps_per_epoch, Some(13));
    assert_eq!(d.total_steps, Some(39));
    assert_eq!(d.warmup_steps, Some(4));
    // No validation data: ms-swift turns evaluation off; the only save is the final one.
    assert_eq!(d.eval_strategy, "no");
    assert_eq!(d.num_evals, Some(0));
    assert_eq!(d.num_saves, Some(1));
    let memory = d.memory.as_ref().expect("Qwen3-30B-A3B is in the catalog");
    let parts = memory.weights_gib
        + memory.gradients_gib
        + memory.optimizer_gib
        + memory.activations_gib
        + memory.overhead_gib;
    assert!((parts - memory.per_gpu_gib).abs() < 1e-9);
    assert!(
        memory.per_gpu_gib > 80.0,
        "30B full fine-tuning with ZeRO-2 over 5 GPUs does not fit 80 GB"
    );
    // About 60 GB (57 GiB) of bf16 weights per checkpoint, as the seed's guide says.
    let weights = d.checkpoint_weights_gib.unwrap();
    assert!((weights - 56.87).abs() < 0.1, "{weights}");

    assert!(
        report.ok,
        "the seed has warnings, not errors: {:?}",
        report.diagnostics
    );
    for code in ["eval_disabled_no_val", "save_after_end", "memory_over_gpu"] {
        let diagnostic = report
            .diagnostics
            .iter()
            .find(|x| x.code == code)
            .unwrap_or_else(|| panic!("missing {code}: {:?}", report.diagnostics));
        assert_eq!(diagnostic.severity, Severity::Warning);
        assert!(!diagnostic.fix.is_empty() && !diagnostic.fix_zh.is_empty());
        assert!(!diagnostic.message_zh.is_empty());
    }
    let memory_fix = &report
        .diagnostics
        .iter()
        .find(|x| x.code == "memory_over_gpu")
        .unwrap()
        .fix;
    assert!(
        memory_fix.starts_with("largest savings first: 1) --deepspeed zero3_offload"),
        "{memory_fix}"
    );

    // The JSON report has DESIGN's keys.
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "world_size",
        "effective_batch_size",
        "steps_per_epoch",
        "total_steps",
        "warmup_steps",
        "num_evals",
        "num_saves",
        "memory",
        "checkpoint_gib",
        "disk_gib",
    ] {
        assert!(json["derived"].get(key).is_some(), "{key}");
    }
    for key in [
        "per_gpu_gib",
        "weights_gib",
        "gradients_gib",
        "optimizer_gib",
        "activations_gib",
        "overhead_gib",
    ] {
        assert!(json["derived"]["memory"].get(key).is_some(), "{key}");
    }
    assert_eq!(json["config"]["launch"]["nproc_per_node"], 5);
}

#[test]
fn the_seed_round_trips_through_both_dialects_and_a_link() {
    let config = seed();
    for dialect in [Dialect::Swift, Dialect::Whet] {
        let script = to_shell(&config, dialect);
        let back = parse_shell(&script).unwrap_or_else(|d| panic!("{script}\n{d}"));
        assert_eq!(back, config, "{script}");
    }
    let code = share::encode(&config);
    assert_eq!(share::decode(&code).unwrap(), config);
    let link = share::link("https://whet.example.org/studio", &config);
    assert!(link.len() < 2000, "{} characters", link.len());
    assert_eq!(share::decode(&link).unwrap(), config);
}

#[test]
fn variants_users_paste_parse_to_the_same_job() {
    let reference = seed();
    let variants = [
        // ms-swift's own launcher variables instead of torchrun
        SEED.replace("torchrun --nproc_per_node=5 --master_port=29500 --no_python \\\n", "NPROC_PER_NODE=5 MASTER_PORT=29500 \\\n"),
        // python -m torch.distributed.run with space-separated values
        SEED.replace("torchrun --nproc_per_node=5 --master_port=29500 --no_python", "python -m torch.distributed.run --nproc_per_node 5 --master_port 29500"),
        // whet instead of swift, --flag=value, the 4.x tuner flag, export lines and comments
        format!(
            "#!/bin/bash\n# fine-tune the seed\nset -e\nexport CUDA_VISIBLE_DEVICES=0,1,2,3,4   # five GPUs\n{}",
            SEED.replace("CUDA_VISIBLE_DEVICES=0,1,2,3,4 \\\n", "")
                .replace("swift sft", "whet sft")
                .replace("--train_type full", "--tuner_type=full")
                .replace("--max_length 4096", "--max_length=4096")
        ),
    ];
    for script in variants {
        let parsed = parse_shell(&script).unwrap_or_else(|d| panic!("{script}\n{d}"));
        assert_eq!(parsed, reference, "{script}");
    }
}

#[test]
fn datasets_lists_paths_hub_prefixes_and_subsets() {
    let c = parse_shell(
        "swift sft --model Qwen/Qwen3-8B --dataset 'a#5000' b#3000 c /data/my_dataset.jsonl hf::org/name:sub1/sub2#20 --val_dataset ./val.jsonl",
    )
    .unwrap();
    assert_eq!(
        c.sft.dataset,
        vec![
            "a#5000",
            "b#3000",
            "c",
            "/data/my_dataset.jsonl",
            "hf::org/name:sub1/sub2#20"
        ]
    );
    assert_eq!(c.sft.val_dataset, vec!["./val.jsonl"]);
    assert_eq!(
        c.sft.tuner_type,
        TunerType::Lora,
        "ms-swift 4.x's default tuner"
    );
}

#[test]
fn variables_the_script_assigns_are_expanded() {
    let c = parse_shell(
        "MODEL=Qwen/Qwen3-8B\nDATA=\"/data/train.jsonl\"\nswift sft --model $MODEL --dataset ${DATA}#100 --output_dir \"out/$MODEL\" --system '$HOME stays'",
    )
    .unwrap();
    assert_eq!(c.sft.model.as_deref(), Some("Qwen/Qwen3-8B"));
    assert_eq!(c.sft.dataset, vec!["/data/train.jsonl#100"]);
    assert_eq!(c.sft.output_dir.as_deref(), Some("out/Qwen/Qwen3-8B"));
    assert_eq!(c.sft.system.as_deref(), Some("$HOME stays"));
}

#[test]
fn qlora_is_shorthand_for_lora_on_a_4bit_base() {
    let c = parse_shell("swift sft --model Qwen/Qwen3-8B --train_type qlora --dataset d.jsonl")
        .unwrap();
    assert_eq!(c.sft.tuner_type, TunerType::Lora);
    assert_eq!(c.sft.quant_method.as_deref(), Some("bnb"));
    assert_eq!(c.sft.quant_bits, Some(4));
    assert!(c.sft.is_qlora());
}

#[test]
fn config_files_in_json_yaml_and_toml() {
    let files = |path: &str| -> Result<String, String> {
        Ok(match path {
            "job.json" => r#"{"launch": {"nproc_per_node": 2, "cuda_visible_devices": "0,1"}, "sft": {"model": "Qwen/Qwen3-8B", "dataset": ["a.jsonl#10"], "learning_rate": 2e-5}}"#.into(),
            // Flat, as ms-swift writes its own config files; YAML reads 1e-4 as a string here.
            "job.yaml" => "model: Qwen/Qwen3-8B\ndataset:\n  - a.jsonl#10\nlearning_rate: 2e-5\nnproc_per_node: 2\ncuda_visible_devices: '0,1'\n".into(),
            "job.toml" => "[launch]\nnproc_per_node = 2\ncuda_visible_devices = \"0,1\"\n[sft]\nmodel = \"Qwen/Qwen3-8B\"\ndataset = [\"a.jsonl#10\"]\nlearning_rate = 2e-5\n".into(),
            other => return Err(format!("no file {other}")),
        })
    };
    let mut configs = Vec::new();
    for file in ["job.json", "job.yaml", "job.toml"] {
        configs.push(parse_shell_with(&format!("whet sft --config {file}"), &files).unwrap());
        // swift sft's positional config file works too; a later flag wins over the file.
        let overridden =
            parse_shell_with(&format!("swift sft {file} --learning_rate 3e-5"), &files).unwrap();
        assert_eq!(overridden.sft.learning_rate, Some(3e-5));
        // A flag before the file overrides it too (HfArgumentParser: the file is the base).
        let before = parse_shell_with(
            &format!("whet sft --learning_rate 3e-5 --config {file} --max_steps 7"),
            &files,
        )
        .unwrap();
        assert_eq!(
            (before.sft.learning_rate, before.sft.max_steps),
            (Some(3e-5), 7)
        );
    }
    assert_eq!(configs[0], configs[1]);
    assert_eq!(configs[1], configs[2]);
    assert_eq!(configs[0].sft.learning_rate, Some(2e-5));
    assert_eq!(configs[0].launch.nproc_per_node, Some(2));
    // Without a reader (the browser), a config file is a clear error, not a panic.
    let err = parse_shell("whet sft --config job.yaml").unwrap_err();
    assert_eq!(err.0[0].code, "config_unreadable");
}

#[test]
fn a_caller_with_a_disk_adds_model_facts_and_row_counts() {
    let config = parse_shell("swift sft --model /models/tiny --dataset ./train.jsonl extra.jsonl#5 --per_device_train_batch_size 2").unwrap();
    let files = |path: &str| {
        match path {
        "/models/tiny/config.json" => Some(r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"intermediate_size":128,"vocab_size":512,"torch_dtype":"float32"}"#.to_string()),
        "./train.jsonl" => Some("{\"messages\":[]}\n{\"messages\":[]}\n\n{\"messages\":[]}\n".to_string()),
        _ => None,
    }
    };
    let context = CheckContext::gather(&config, &files);
    assert_eq!(context.dataset_rows, Some(8));
    assert_eq!(
        context.model_facts.as_ref().unwrap().param_counts().total,
        139_648
    );
    let report = check(&config, &context);
    // 8 rows in batches of 2 = 4 batches; automatic accumulation ceil(16 / 2) = 8, so one
    // (partial) update per epoch, three epochs.
    assert_eq!(report.derived.gradient_accumulation_steps, 8);
    assert_eq!(report.derived.steps_per_epoch, Some(1));
    assert_eq!(report.derived.total_steps, Some(3));
    assert!(report.derived.memory.is_some());
}
