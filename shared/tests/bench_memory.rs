//! whet-shared's estimate against the peak RSS `whet bench train` measured (BENCHMARKS.md,
//! "Memory: full vs LoRA vs QLoRA"): 12 configs, each within 15 %.

use whet_shared::config::{TorchDtype, TunerType, ZeroSettings};
use whet_shared::memory::{estimate, Sharding, GIB};
use whet_shared::models::ModelFacts;
use whet_shared::SftConfig;

/// engine/src/bench.rs's presets: hidden, layers, heads, kv heads, head_dim, MLP, vocab.
fn preset(size: &str) -> ModelFacts {
    let (hidden, layers, heads, kv, intermediate) = match size {
        "small" => (512, 8, 8, 4, 1536),
        "medium" => (1024, 16, 16, 8, 3072),
        _ => unreachable!(),
    };
    let json = format!(
        r#"{{"architectures": ["Qwen3ForCausalLM"], "hidden_size": {hidden},
        "num_hidden_layers": {layers}, "num_attention_heads": {heads},
        "num_key_value_heads": {kv}, "head_dim": 64, "intermediate_size": {intermediate},
        "vocab_size": 32000, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "tie_word_embeddings": false}}"#
    );
    ModelFacts::from_config_json(size, &json).unwrap()
}

/// `whet check --torch_dtype float32 --per_device_train_batch_size 4
/// --gradient_accumulation_steps 1 --max_length 256 --tuner_type T --lora_dropout 0
/// --gradient_checkpointing B`, in MiB, without the CUDA context a CPU process lacks.
fn estimate_mib(size: &str, tuner: TunerType, checkpointing: bool) -> f64 {
    let config = SftConfig {
        tuner_type: tuner,
        torch_dtype: Some(TorchDtype::Float32),
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: Some(1),
        max_length: Some(256),
        lora_dropout: 0.0,
        gradient_checkpointing: checkpointing,
        ..SftConfig::default()
    };
    let m = estimate(
        &config,
        &preset(size),
        Sharding {
            world_size: 1,
            zero: ZeroSettings::none(),
        },
    );
    (m.per_gpu_gib - 0.75) * GIB / (1024.0 * 1024.0)
}

#[test]
fn the_estimate_is_within_15_percent_of_the_bench_peaks() {
    // (preset, train_type, checkpointing, peak RSS MiB)
    let measured = [
        ("small", TunerType::Full, false, 2213.0),
        ("small", TunerType::Full, true, 1312.0),
        ("small", TunerType::Lora, false, 2166.0),
        ("small", TunerType::Lora, true, 874.0),
        ("small", TunerType::Qlora, false, 2206.0),
        ("small", TunerType::Qlora, true, 823.0),
        ("medium", TunerType::Full, false, 7962.0),
        ("medium", TunerType::Full, true, 5064.0),
        ("medium", TunerType::Lora, false, 7681.0),
        ("medium", TunerType::Lora, true, 2268.0),
        ("medium", TunerType::Qlora, false, 7927.0),
        ("medium", TunerType::Qlora, true, 1464.0),
    ];
    for (size, tuner, checkpointing, peak) in measured {
        let est = estimate_mib(size, tuner, checkpointing);
        let ratio = est / peak;
        println!("{size} {tuner:?} gc={checkpointing}: {est:.0} MiB / {peak} = {ratio:.3}");
        assert!(
            (0.85..=1.15).contains(&ratio),
            "{size} {tuner:?} checkpointing {checkpointing}: estimate {est:.0} MiB, measured {peak} MiB"
        );
    }
}
