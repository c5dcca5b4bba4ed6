//! The memory estimate against figures derived by hand from the published model shapes
//! (the formula is documented in shared/src/memory.rs). Parameter counts are worked out here in
//! full so that a change of the formula shows.

use whet_shared::config::{TorchDtype, TunerType, ZeroSettings};
use whet_shared::memory::{estimate, MemoryEstimate, Sharding, GIB};
use whet_shared::models::lookup;
use whet_shared::SftConfig;

// Qwen3-0.6B: h 1024, 28 layers, 16 q / 8 kv heads of 128, MLP 3072, vocab 151936, tied.
const P_06B: f64 = (151936.0 * 1024.0) // embeddings (tied: once)
    + 28.0 * ((1024.0 * 2048.0 + 2.0 * 1024.0 * 1024.0 + 2048.0 * 1024.0) // q, k, v, o
        + 2.0 * 128.0 + 2.0 * 1024.0 // q/k norms, two layer norms
        + 3.0 * 1024.0 * 3072.0) // gate, up, down
    + 1024.0; // final norm
              // Qwen3-8B: h 4096, 36 layers, 32 q / 8 kv heads of 128, MLP 12288, vocab 151936, untied.
const LINEAR_8B: f64 =
    36.0 * ((4096.0 * 4096.0 * 2.0 + 2.0 * 4096.0 * 1024.0) + 3.0 * 4096.0 * 12288.0);
const P_8B: f64 = 2.0 * 151936.0 * 4096.0 + LINEAR_8B + 36.0 * (256.0 + 2.0 * 4096.0) + 4096.0;
// LoRA rank 8 on all linear layers: r·(in + out) per projection.
const LORA_8B: f64 =
    36.0 * 8.0 * ((4096.0 + 4096.0) * 2.0 + (4096.0 + 1024.0) * 2.0 + (4096.0 + 12288.0) * 3.0);
// Qwen3-30B-A3B: h 2048, 48 layers, 32 q / 4 kv heads of 128, 128 experts of 768, vocab 151936.
const LAYER_30B: f64 = (2048.0 * 4096.0 + 2.0 * 2048.0 * 512.0 + 4096.0 * 2048.0) + 256.0 + 2.0 * 2048.0
    + 128.0 * 3.0 * 2048.0 * 768.0 // experts
    + 128.0 * 2048.0; // router
const P_30B: f64 = 2.0 * 151936.0 * 2048.0 + 48.0 * LAYER_30B + 2048.0;

fn assert_close(what: &str, actual: f64, expected_bytes: f64) {
    let expected = expected_bytes / GIB;
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
        "{what}: {actual} GiB, expected {expected} GiB"
    );
}

fn assert_adds_up(m: &MemoryEstimate) {
    let sum =
        m.weights_gib + m.gradients_gib + m.optimizer_gib + m.activations_gib + m.overhead_gib;
    assert!((sum - m.per_gpu_gib).abs() < 1e-9, "{m:?}");
}

/// Overhead: CUDA context, NCCL with >1 rank, DeepSpeed buckets, 5 % fragmentation.
fn overhead(
    model_states_and_activations: f64,
    ranks: u64,
    deepspeed_bytes_per_el: Option<f64>,
) -> f64 {
    0.75 * GIB
        + if ranks > 1 { 0.5 * GIB } else { 0.0 }
        + deepspeed_bytes_per_el.map_or(0.0, |b| 2.0 * 2e8 * b)
        + 0.05 * model_states_and_activations
}

fn config(tuner: TunerType, dtype: TorchDtype, max_length: i64, checkpointing: bool) -> SftConfig {
    SftConfig {
        tuner_type: tuner,
        torch_dtype: Some(dtype),
        max_length: Some(max_length),
        gradient_checkpointing: checkpointing,
        per_device_train_batch_size: 1,
        ..SftConfig::default()
    }
}

#[test]
fn catalog_counts_equal_the_hand_counts() {
    assert_eq!(
        lookup("Qwen/Qwen3-0.6B").unwrap().param_counts().total as f64,
        P_06B
    );
    assert_eq!(
        lookup("Qwen/Qwen3-8B").unwrap().param_counts().total as f64,
        P_8B
    );
    assert_eq!(
        lookup("Qwen/Qwen3-8B")
            .unwrap()
            .lora_params(8, &["all-linear".into()]) as f64,
        LORA_8B
    );
    assert_eq!(
        lookup("Qwen/Qwen3-30B-A3B").unwrap().param_counts().total as f64,
        P_30B
    );
    assert_eq!(P_30B, 30_532_122_624.0);
}

#[test]
fn qwen3_0_6b_full_fp32_on_one_device() {
    let facts = lookup("Qwen/Qwen3-0.6B").unwrap();
    let m = estimate(
        &config(TunerType::Full, TorchDtype::Float32, 2048, true),
        &facts,
        Sharding {
            world_size: 1,
            zero: ZeroSettings::none(),
            deepspeed: false,
        },
    );
    // fp32 needs no master copy: 4 bytes weights, 4 gradients, 8 for Adam's m and v.
    assert_close("weights", m.weights_gib, 4.0 * P_06B);
    assert_close("gradients", m.gradients_gib, 4.0 * P_06B);
    assert_close("optimizer", m.optimizer_gib, 8.0 * P_06B);
    // Checkpointed: each of 28 layers keeps its input (h = 1024 per token), plus one layer
    // recomputed: attention 2·1024 + (2048 + 2·1024) + 2·(2048 + 1024) + 2048 = 14336 and
    // MLP 2·1024 + 4·3072 = 14336 elements per token; logits 151936 × (4 + 4 + 4) bytes.
    let tokens = 2048.0;
    let activations = tokens * (28.0 * 1024.0 + 14336.0 + 14336.0) * 4.0 + tokens * 151936.0 * 12.0;
    assert_close("activations", m.activations_gib, activations);
    assert_close(
        "overhead",
        m.overhead_gib,
        overhead(16.0 * P_06B + activations, 1, None),
    );
    assert_adds_up(&m);
    assert_eq!(m.trainable_params as f64, P_06B);
}

#[test]
fn qwen3_8b_lora_and_qlora_in_bf16() {
    let facts = lookup("Qwen/Qwen3-8B").unwrap();
    let one_gpu = Sharding {
        world_size: 1,
        zero: ZeroSettings::none(),
        deepspeed: false,
    };
    let lora = estimate(
        &config(TunerType::Lora, TorchDtype::Bfloat16, 4096, true),
        &facts,
        one_gpu,
    );
    // Frozen bf16 base plus fp32 adapters; gradients and Adam only for the adapters.
    assert_close("lora weights", lora.weights_gib, 2.0 * P_8B + 4.0 * LORA_8B);
    assert_close("lora gradients", lora.gradients_gib, 4.0 * LORA_8B);
    assert_close("lora optimizer", lora.optimizer_gib, 8.0 * LORA_8B);
    assert_adds_up(&lora);

    let mut qlora_config = config(TunerType::Lora, TorchDtype::Bfloat16, 4096, true);
    qlora_config.quant_method = Some("bnb".into());
    qlora_config.quant_bits = Some(4);
    let qlora = estimate(&qlora_config, &facts, one_gpu);
    // NF4 with double quantisation: 0.5 byte + an 8-bit absmax per 64 weights + an fp32 per
    // 256 blocks; embeddings, lm_head and norms stay bf16.
    let nf4 = 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0);
    assert_close(
        "qlora weights",
        qlora.weights_gib,
        LINEAR_8B * nf4 + (P_8B - LINEAR_8B) * 2.0 + 4.0 * LORA_8B,
    );
    assert_close("qlora gradients", qlora.gradients_gib, 4.0 * LORA_8B);
    assert_eq!(qlora.activations_gib, lora.activations_gib);
    assert_adds_up(&qlora);
    assert!(
        qlora.per_gpu_gib < lora.per_gpu_gib - 8.0,
        "QLoRA saves about 11 GiB of weights"
    );
}

#[test]
fn qwen3_30b_a3b_full_bf16_over_five_gpus_by_zero_stage() {
    let facts = lookup("Qwen/Qwen3-30B-A3B").unwrap();
    let n = 5.0;
    let working_set = 2.0 * LAYER_30B * 2.0; // ZeRO-3 gathers two layers at a time, bf16
    let cases = [
        ("zero0", 2.0 * P_30B, 2.0 * P_30B, 12.0 * P_30B),
        ("zero2", 2.0 * P_30B, 2.0 * P_30B / n, 12.0 * P_30B / n),
        (
            "zero3",
            2.0 * P_30B / n + working_set,
            2.0 * P_30B / n,
            12.0 * P_30B / n,
        ),
        ("zero3_offload", working_set, 2.0 * P_30B / n, 0.0),
    ];
    let mut previous = f64::INFINITY;
    for checkpointing in [true, false] {
        let c = config(TunerType::Full, TorchDtype::Bfloat16, 4096, checkpointing);
        for (preset, weights, gradients, optimizer) in cases {
            let sharding = Sharding {
                world_size: 5,
                zero: ZeroSettings::from_preset(preset).unwrap(),
                deepspeed: true,
            };
            let m = estimate(&c, &facts, sharding);
            assert_close(&format!("{preset} weights"), m.weights_gib, weights);
            assert_close(&format!("{preset} gradients"), m.gradients_gib, gradients);
            assert_close(&format!("{preset} optimizer"), m.optimizer_gib, optimizer);
            // Per token per layer: attention 2·2048 + (4096 + 2·512) + 2·(4096 + 512) + 4096 =
            // 22528; MoE 2·2048 + 128 + 8·(2048 + 4·768) = 45184 elements, in bf16.
            let tokens = 4096.0;
            let layers = if checkpointing {
                48.0 * 2048.0 + 22528.0 + 45184.0
            } else {
                48.0 * (22528.0 + 45184.0)
            };
            let activations = tokens * layers * 2.0 + tokens * 151936.0 * 10.0;
            assert_close(
                &format!("{preset} activations"),
                m.activations_gib,
                activations,
            );
            assert_close(
                &format!("{preset} overhead"),
                m.overhead_gib,
                overhead(weights + gradients + optimizer + activations, 5, Some(2.0)),
            );
            assert_adds_up(&m);
            if checkpointing {
                assert!(m.per_gpu_gib < previous, "each stage saves more");
                previous = m.per_gpu_gib;
            }
            if preset == "zero3_offload" {
                assert_close(
                    "offloaded",
                    m.cpu_offload_gib,
                    12.0 * P_30B / n + 2.0 * P_30B / n,
                );
            }
        }
    }
}
