//! The memory estimate against figures derived by hand from the published model shapes
//! (the formula is documented in shared/src/memory.rs). Parameter counts are worked out here in
//! full so that a change of the formula shows.

use whet_shared::config::{TorchDtype, TunerType, ZeroSettings};
use whet_shared::lora::AdapterPlan;
use whet_shared::memory::{estimate, MemoryEstimate, Sharding, GIB};
use whet_shared::models::{lookup, ModelFacts};
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

/// Overhead: CUDA context, NCCL and whet's reduction buckets (two of h² fp32 elements) with
/// more than one rank, 5 % fragmentation.
fn overhead(model_states_and_activations: f64, ranks: u64, hidden: f64) -> f64 {
    0.75 * GIB
        + if ranks > 1 {
            0.5 * GIB + 2.0 * hidden * hidden * 4.0
        } else {
            0.0
        }
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
            .lora_params(8, &AdapterPlan::from_config(&SftConfig::default()).unwrap())
            as f64,
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
        },
    );
    // fp32 needs no master copy: 4 bytes weights, 4 gradients, 8 for Adam's m and v.
    assert_close("weights", m.weights_gib, 4.0 * P_06B);
    assert_close("gradients", m.gradients_gib, 4.0 * P_06B);
    assert_close("optimizer", m.optimizer_gib, 8.0 * P_06B);
    // One recomputed layer keeps per token, in fp32 bytes: two RMSNorms of 1024 (x², normalised
    // x, output: 12 · 1024 each); q/k/v (4096) and their contiguous heads (4096), RoPE on q and
    // k (4.5 · 3072), the attention output and its merged heads (2 · 2048), o and the residual
    // (2 · 1024): 4 · 28160; q/k norms 12 · (2048 + 1024); eager attention's six score tensors,
    // 16 heads × 2048 keys each: 24 · 32768; MLP gate, up, SiLU, product and down, residual:
    // 4 · (4 · 3072 + 2 · 1024).
    let layer = 2.0 * 12288.0 + 4.0 * 28160.0 + 12.0 * 3072.0 + 24.0 * 32768.0 + 4.0 * 14336.0;
    assert_eq!(layer, 1_017_856.0);
    // Its backward: seven fp32 score-sized gradients. The embeddings and the 29 layer inputs
    // stay (30 · 1024); the head keeps the final norm and the logits.
    let backward = 7.0 * 4.0 * 32768.0;
    let boundaries = 30.0 * 1024.0 * 4.0;
    let head = 12.0 * 1024.0 + 151936.0 * 4.0;
    // The loss's backward: two fp32 logits gradients (as large here as one plus lm_head's
    // weight gradient twice: 2048 · 151936 · 4 + 2 · 151936 · 1024 · 4). The gradients, made
    // after it is freed, fit in its room (4P < 8 · 2048 · 151936).
    let tokens = 2048.0;
    let loss = 8.0 * tokens * 151936.0;
    assert!(4.0 * P_06B < loss);
    let activations = tokens * (layer + backward + boundaries + head) + loss - 4.0 * P_06B;
    assert_close("activations", m.activations_gib, activations);
    assert_close(
        "overhead",
        m.overhead_gib,
        overhead(16.0 * P_06B + activations, 1, 1024.0),
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
    };
    let lora = estimate(
        &config(TunerType::Lora, TorchDtype::Bfloat16, 4096, true),
        &facts,
        one_gpu,
    );
    // Frozen bf16 base plus fp32 adapters and the bf16 copies each use casts them to;
    // gradients and Adam only for the adapters.
    assert_close(
        "lora weights",
        lora.weights_gib,
        2.0 * P_8B + (4.0 + 2.0) * LORA_8B,
    );
    assert_close("lora gradients", lora.gradients_gib, 4.0 * LORA_8B);
    assert_close("lora optimizer", lora.optimizer_gib, 8.0 * LORA_8B);
    assert_adds_up(&lora);

    let mut qlora_config = config(TunerType::Lora, TorchDtype::Bfloat16, 4096, true);
    qlora_config.quant_method = Some("bnb".into());
    qlora_config.quant_bits = Some(4);
    let qlora = estimate(&qlora_config, &facts, one_gpu);
    // NF4 with double quantisation: 0.5 byte + an 8-bit absmax per 64 weights + an fp32 per
    // 256 blocks (every 8B projection is a multiple of 64 · 256 weights); embeddings, lm_head
    // and norms stay bf16; checkpointed, one layer's projections are dequantised to bf16 at a time.
    let nf4 = 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0);
    assert_close(
        "qlora weights",
        qlora.weights_gib,
        LINEAR_8B * nf4 + (P_8B - LINEAR_8B) * 2.0 + LINEAR_8B / 36.0 * 2.0 + (4.0 + 2.0) * LORA_8B,
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
            };
            let m = estimate(&c, &facts, sharding);
            assert_close(&format!("{preset} weights"), m.weights_gib, weights);
            assert_close(&format!("{preset} gradients"), m.gradients_gib, gradients);
            assert_close(&format!("{preset} optimizer"), m.optimizer_gib, optimizer);
            // Per token and layer, bytes in bf16: an RMSNorm of n keeps an fp32 copy, x² and the
            // normalised x (12n), its bf16 cast and the output (4n). Attention: norm 16 · 2048;
            // q/k/v (4096 + 2 · 512) and their contiguous heads, RoPE 4.5 · 4608, output and
            // merged heads 2 · 4096, o and residual 2 · 2048: 2 · 43264; q/k norms
            // 16 · (4096 + 512); 32 heads × 4096 keys of scores and scaled scores (2 + 2),
            // an fp32 copy, masked, shifted, exponentiated, normalised (5 · 4) and the bf16
            // probabilities (2): 26 · 131072. MoE: norm 16 · 2048; router logits 2 · 128 and
            // their fp32 copy and softmax 16 · 128; 8 routed copies of the input, gate, up,
            // SiLU, product, down and weighted output 2 · 8 · (3 · 2048 + 4 · 768); the block's
            // running sum, one per expert, 2 · 128 · 2048; residual 2 · 2048.
            let attention = 16.0 * 2048.0 + 2.0 * 43264.0 + 16.0 * 4608.0 + 26.0 * 131072.0;
            let moe = 16.0 * 2048.0
                + 2.0 * 128.0
                + 16.0 * 128.0
                + 2.0 * (8.0 * 9216.0 + 128.0 * 2048.0 + 2048.0);
            let layer = attention + moe;
            assert_eq!(layer, 4_311_808.0);
            // A layer's backward adds seven fp32 score gradients; the embeddings and layer
            // inputs stay (50 · 2048 bf16); the head keeps the final norm and the logits in
            // bf16 and fp32.
            let backward = 7.0 * 4.0 * 131072.0;
            let boundaries = 50.0 * 2048.0 * 2.0;
            let head = 16.0 * 2048.0 + 151936.0 * 6.0;
            let tokens: f64 = 4096.0;
            let loss = 8.0 * tokens * 151936.0;
            // The gradients take what backward freed before them: the loss's buffers when
            // checkpointing (they are larger), else all of them fit where the layers' were.
            let (layers, reused) = if checkpointing {
                (layer, loss.min(gradients))
            } else {
                (48.0 * layer, gradients)
            };
            let activations = tokens * (layers + backward + boundaries + head) + loss - reused;
            assert_close(
                &format!("{preset} activations"),
                m.activations_gib,
                activations,
            );
            assert_close(
                &format!("{preset} overhead"),
                m.overhead_gib,
                overhead(weights + gradients + optimizer + activations, 5, 2048.0),
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

// The fixture-sized models (shared/fixtures/hf-reference): hidden 64, 2 layers, 4 q / 2 kv heads
// of 16, vocab 512, untied; dense MLP 128, or 4 experts of 32 with top-2.
const TINY_DENSE: &str = r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,
    "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
    "intermediate_size":128,"vocab_size":512,"tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#;
const TINY_MOE: &str = r#"{"architectures":["Qwen3MoeForCausalLM"],"hidden_size":64,
    "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
    "intermediate_size":128,"moe_intermediate_size":32,"num_experts":4,"num_experts_per_tok":2,
    "vocab_size":512,"tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#;

// Parameters. Per layer: two norms 2·64; q 64×64, k and v 32×64, o 64×64 = 12288; q/k norms
// 2·16; dense MLP 3·64·128 = 24576, or 4 experts of 3·64·32 = 24576 and a router 4·64.
// Embedding and lm_head 512·64 each, final norm 64.
const P_TINY_DENSE: f64 = 2.0 * 32768.0 + 2.0 * (128.0 + 12288.0 + 32.0 + 24576.0) + 64.0;
const P_TINY_MOE: f64 = 2.0 * 32768.0 + 2.0 * (128.0 + 12288.0 + 32.0 + 24576.0 + 256.0) + 64.0;
/// Projection weights (what QLoRA quantises): 12288 + 24576 per layer, in both.
const PROJ_TINY: f64 = 2.0 * (12288.0 + 24576.0);
// LoRA rank 8 on all-linear, 8·(in + out) per linear. Attention: q 8·128, k and v 8·96,
// o 8·128 = 3584. Dense MLP: gate, up, down 8·192 each = 4608. Experts: 3 · 8·96 = 2304 each.
const LORA_TINY_DENSE: f64 = 2.0 * (3584.0 + 4608.0);
const LORA_TINY_MOE: f64 = 2.0 * (3584.0 + 4.0 * 2304.0);
const LM_HEAD_TINY: f64 = 512.0 * 64.0;

fn tiny(json: &str) -> ModelFacts {
    ModelFacts::from_config_json("tiny", json).unwrap()
}

fn tiny_config(tuner: TunerType, edit: impl FnOnce(&mut SftConfig)) -> SftConfig {
    let mut c = SftConfig {
        tuner_type: tuner,
        max_length: Some(128),
        per_device_train_batch_size: 1,
        gradient_checkpointing: true,
        ..SftConfig::default()
    };
    if tuner == TunerType::Qlora {
        c.tuner_type = TunerType::Lora;
        c.quant_method = Some("bnb".into());
        c.quant_bits = Some(4);
    }
    edit(&mut c);
    c
}

const ONE_GPU: Sharding = Sharding {
    world_size: 1,
    zero: ZeroSettings {
        stage: 0,
        offload_optimizer: false,
        offload_param: false,
    },
};

#[test]
fn tiny_counts_equal_the_hand_counts() {
    let dense = tiny(TINY_DENSE);
    let moe = tiny(TINY_MOE);
    assert_eq!(dense.param_counts().total as f64, P_TINY_DENSE);
    assert_eq!(moe.param_counts().total as f64, P_TINY_MOE);
    assert_eq!(P_TINY_DENSE, 139_648.0, "the dense fixture's size");
    assert_eq!(P_TINY_MOE, 140_160.0, "the MoE fixture's size");
    let plan = |edit: fn(&mut SftConfig)| {
        let mut c = SftConfig::default();
        edit(&mut c);
        AdapterPlan::from_config(&c).unwrap()
    };
    let all_linear = plan(|_| {});
    assert_eq!(dense.lora_params(8, &all_linear) as f64, LORA_TINY_DENSE);
    assert_eq!(moe.lora_params(8, &all_linear) as f64, LORA_TINY_MOE);
    let with_lm_head = plan(|c| c.modules_to_save = vec!["lm_head".into()]);
    assert_eq!(
        dense.lora_params(8, &with_lm_head) as f64,
        LORA_TINY_DENSE + LM_HEAD_TINY
    );
    // Only q and v, by name or by regex: 2 layers · (8·128 + 8·96).
    let qv = plan(|c| c.target_modules = vec!["q_proj".into(), "v_proj".into()]);
    let qv_regex = plan(|c| c.target_regex = Some(r".*\.(q|v)_proj".into()));
    assert_eq!(moe.lora_params(8, &qv), 2 * (1024 + 768));
    assert_eq!(moe.lora_params(8, &qv_regex), 2 * (1024 + 768));
    // One expert of layer 1 by regex: 3 · 8·96.
    let one_expert =
        plan(|c| c.target_regex = Some(r"model\.layers\.1\.mlp\.experts\.3\..*".into()));
    assert_eq!(moe.lora_params(8, &one_expert), 2304);
    // all-norm trains every norm in full: 2 layers · (128 + 32) + 64.
    let norms = plan(|c| {
        c.target_modules = vec!["q_proj".into()];
        c.modules_to_save = vec!["all-norm".into()];
    });
    assert_eq!(dense.lora_params(8, &norms), 2 * 1024 + 2 * (128 + 32) + 64);
}

#[test]
fn tiny_dense_full_lora_and_qlora_in_bf16() {
    let facts = tiny(TINY_DENSE);
    let tokens = 128.0;
    // Per token and layer, bytes in bf16 (an RMSNorm of n: 16n, see the 30B test): norms
    // 2 · 16 · 64; q/k/v 128 and their contiguous heads, RoPE 4.5 · 96, output and merged heads
    // 2 · 64, o and residual 2 · 64: 2 · 944; q/k norms 16 · 96; 4 heads × 128 keys of score
    // tensors 26 · 512; MLP gate, up, SiLU, product 4 · 128, down and residual 2 · 64, in bf16.
    let base_layer = 2.0 * 1024.0 + 2.0 * 944.0 + 1536.0 + 26.0 * 512.0 + 2.0 * 640.0;
    assert_eq!(base_layer, 20064.0);
    // Checkpointed, one layer is recomputed; its backward adds seven fp32 score gradients; the
    // embeddings and the layer inputs stay (4 · 64); the head keeps the final norm and the
    // logits in bf16 and fp32; the loss's backward two fp32 logits gradients.
    let rest = 7.0 * 4.0 * 512.0 + 4.0 * 64.0 * 2.0 + 16.0 * 64.0 + 512.0 * 6.0;
    let loss = 8.0 * tokens * 512.0;
    // The gradients fit in the loss's freed buffers; adapter runs add a bf16 gradient of each
    // frozen projection of the layer (36864), which candle computes anyway.
    let activations = |layer: f64, gradients: f64, frozen: f64| {
        tokens * (layer + rest) + frozen * 2.0 + loss - gradients
    };
    // LoRA keeps A x (8), B A x, its scaled copy and the sum (3 · out) for each of the 7
    // linears (out: 64 + 32 + 32 + 64 + 128 + 128 + 64 = 512) and, with dropout 0.05, each
    // linear's mask and dropped-out input: 2 · (q, k, v, gate, up 64 each + o 64 + down 128).
    let lora_layer = base_layer + 2.0 * (7.0 * 8.0 + 3.0 * 512.0 + 2.0 * 512.0);

    let full = estimate(&tiny_config(TunerType::Full, |_| {}), &facts, ONE_GPU);
    assert_close("full weights", full.weights_gib, 2.0 * P_TINY_DENSE);
    assert_close("full gradients", full.gradients_gib, 2.0 * P_TINY_DENSE);
    assert_close("full optimizer", full.optimizer_gib, 12.0 * P_TINY_DENSE);
    assert_close(
        "full activations",
        full.activations_gib,
        activations(base_layer, 2.0 * P_TINY_DENSE, 0.0),
    );
    assert_eq!(full.trainable_params as f64, P_TINY_DENSE);

    let lora = estimate(&tiny_config(TunerType::Lora, |_| {}), &facts, ONE_GPU);
    // bf16 base, fp32 masters of the adapters and their bf16 casts: 279296 + 98304 bytes.
    let t = LORA_TINY_DENSE;
    assert_close(
        "lora weights",
        lora.weights_gib,
        2.0 * P_TINY_DENSE + 6.0 * t,
    );
    assert_close("lora weights in bytes", lora.weights_gib, 377_600.0);
    assert_close("lora gradients", lora.gradients_gib, 4.0 * t);
    assert_close("lora optimizer", lora.optimizer_gib, 8.0 * t);
    assert_close(
        "lora activations",
        lora.activations_gib,
        activations(lora_layer, 4.0 * t, 36864.0),
    );
    assert_eq!(lora.trainable_params as f64, t);
    let no_dropout = estimate(
        &tiny_config(TunerType::Lora, |c| c.lora_dropout = 0.0),
        &facts,
        ONE_GPU,
    );
    assert_close(
        "lora activations without dropout",
        no_dropout.activations_gib,
        activations(lora_layer - 2.0 * 2.0 * 512.0, 4.0 * t, 36864.0),
    );

    // QLoRA: 4-bit projections, 0.5 byte each = 36864 bytes; blocks of 64 per tensor: q and o
    // 64, k and v 32, gate, up and down 128 each = 576 a layer, 1152 in all; double
    // quantisation adds one fp32 per 256 blocks of each tensor: 14 tensors, 14 · 4 bytes.
    let packed = PROJ_TINY * 0.5;
    let rest = (P_TINY_DENSE - PROJ_TINY) * 2.0;
    let dequant_buffer = 36864.0 * 2.0; // one layer's projections, checkpointed
    let qlora = estimate(&tiny_config(TunerType::Qlora, |_| {}), &facts, ONE_GPU);
    let double_quant = packed + 1152.0 + 14.0 * 4.0;
    assert_close(
        "qlora weights",
        qlora.weights_gib,
        double_quant + rest + dequant_buffer + 6.0 * t,
    );
    assert_close("qlora weights in bytes", qlora.weights_gib, 341_944.0);
    assert_close("qlora gradients", qlora.gradients_gib, 4.0 * t);
    assert_close("qlora optimizer", qlora.optimizer_gib, 8.0 * t);
    assert_eq!(qlora.activations_gib, lora.activations_gib);
    let single_quant = estimate(
        &tiny_config(TunerType::Qlora, |c| c.bnb_4bit_use_double_quant = false),
        &facts,
        ONE_GPU,
    );
    assert_close(
        "qlora weights without double quant",
        single_quant.weights_gib,
        packed + 1152.0 * 4.0 + rest + dequant_buffer + 6.0 * t,
    );
    assert_close("single quant in bytes", single_quant.weights_gib, 345_344.0);
    let fp4 = estimate(
        &tiny_config(TunerType::Qlora, |c| c.bnb_4bit_quant_type = "fp4".into()),
        &facts,
        ONE_GPU,
    );
    assert_eq!(fp4, qlora, "FP4 and NF4 take the same room");

    // modules_to_save lm_head: its 32768 weights train in full (fp32 master, bf16 cast,
    // gradient and Adam) instead of sitting frozen in bf16.
    let t_head = t + LM_HEAD_TINY;
    let head = |c: &mut SftConfig| c.modules_to_save = vec!["lm_head".into()];
    let lora_head = estimate(&tiny_config(TunerType::Lora, head), &facts, ONE_GPU);
    assert_close(
        "lora + lm_head weights",
        lora_head.weights_gib,
        2.0 * (P_TINY_DENSE - LM_HEAD_TINY) + 6.0 * t_head,
    );
    assert_close(
        "lora + lm_head gradients",
        lora_head.gradients_gib,
        4.0 * t_head,
    );
    assert_close(
        "lora + lm_head optimizer",
        lora_head.optimizer_gib,
        8.0 * t_head,
    );
    assert_eq!(lora_head.trainable_params as f64, t_head);
    let qlora_head = estimate(&tiny_config(TunerType::Qlora, head), &facts, ONE_GPU);
    assert_close(
        "qlora + lm_head weights",
        qlora_head.weights_gib,
        double_quant + rest - 2.0 * LM_HEAD_TINY + dequant_buffer + 6.0 * t_head,
    );
    assert_close(
        "qlora + lm_head in bytes",
        qlora_head.weights_gib,
        473_016.0,
    );

    for m in [&full, &lora, &qlora, &single_quant, &lora_head, &qlora_head] {
        assert_adds_up(m);
    }
    assert!(qlora.per_gpu_gib < lora.per_gpu_gib && lora.per_gpu_gib < full.per_gpu_gib);
}

#[test]
fn tiny_moe_lora_and_qlora_count_every_expert() {
    let facts = tiny(TINY_MOE);
    let t = LORA_TINY_MOE;
    let tokens = 128.0;
    // Per token and layer, bf16 bytes: attention as in the dense test, 17760; MoE: norm
    // 16 · 64, router logits 2 · 4 and their fp32 copy and softmax 16 · 4, 2 routed copies of
    // the input, gate, up, SiLU, product, down and weighted output 2 · 2 · (3 · 64 + 4 · 32),
    // the block's running sum per expert 2 · 4 · 64, residual 2 · 64. LoRA: A x (8) for the 4
    // attention linears and, for a token's share 2/4 of each of the 4 experts, its 3 linears:
    // 32 + 2 · 24 = 80; three copies of the outputs, 3 · (192 + 2 · 128); dropout's masks and
    // inputs 2 · (4 · 64 + 2 · (64 + 64 + 32)); all in bf16.
    let moe = 1024.0 + 8.0 + 64.0 + 2.0 * (2.0 * 320.0 + 256.0 + 64.0);
    let layer = 17760.0 + moe + 2.0 * (80.0 + 3.0 * 448.0 + 2.0 * 576.0);
    assert_eq!(layer, 20776.0 + 5152.0);
    // Backward, boundaries and head as in the dense test; the frozen projections' gradients
    // (12288 + 24576 a layer); the gradients fit in the loss's freed buffers.
    let rest = 7.0 * 4.0 * 512.0 + 4.0 * 64.0 * 2.0 + 16.0 * 64.0 + 512.0 * 6.0;
    let activations = tokens * (layer + rest) + 36864.0 * 2.0 + 8.0 * tokens * 512.0 - 4.0 * t;
    let lora = estimate(&tiny_config(TunerType::Lora, |_| {}), &facts, ONE_GPU);
    assert_close(
        "moe lora weights",
        lora.weights_gib,
        2.0 * P_TINY_MOE + 6.0 * t,
    );
    assert_close("moe lora gradients", lora.gradients_gib, 4.0 * t);
    assert_close("moe lora optimizer", lora.optimizer_gib, 8.0 * t);
    assert_close("moe lora activations", lora.activations_gib, activations);
    assert_eq!(lora.trainable_params as f64, t);

    // QLoRA quantises every expert's projections too; the router stays bf16. Blocks: attention
    // 64 + 32 + 32 + 64, experts 12 tensors of 32 = 576 a layer; 16 tensors a layer, each
    // with one fp32 for its (fewer than 256) blocks. Checkpointed, one layer's projections
    // (36864) are dequantised at a time.
    let packed = PROJ_TINY * 0.5;
    let rest = (P_TINY_MOE - PROJ_TINY) * 2.0;
    let dequant_buffer = 36864.0 * 2.0;
    let qlora = estimate(&tiny_config(TunerType::Qlora, |_| {}), &facts, ONE_GPU);
    assert_close(
        "moe qlora weights",
        qlora.weights_gib,
        packed + 1152.0 + 32.0 * 4.0 + rest + dequant_buffer + 6.0 * t,
    );
    assert_close("moe qlora in bytes", qlora.weights_gib, 398_336.0);
    let single_quant = estimate(
        &tiny_config(TunerType::Qlora, |c| c.bnb_4bit_use_double_quant = false),
        &facts,
        ONE_GPU,
    );
    assert_close(
        "moe qlora weights without double quant",
        single_quant.weights_gib,
        packed + 1152.0 * 4.0 + rest + dequant_buffer + 6.0 * t,
    );
    let full = estimate(&tiny_config(TunerType::Full, |_| {}), &facts, ONE_GPU);
    assert_close("moe full weights", full.weights_gib, 2.0 * P_TINY_MOE);
    for m in [&full, &lora, &qlora, &single_quant] {
        assert_adds_up(m);
    }
    assert!(qlora.per_gpu_gib < lora.per_gpu_gib && lora.per_gpu_gib < full.per_gpu_gib);
}

#[test]
fn qlora_computes_in_bnb_4bit_compute_dtype() {
    let facts = tiny(TINY_DENSE);
    let fp32 = |c: &mut SftConfig| c.bnb_4bit_compute_dtype = Some(TorchDtype::Float32);
    let qlora = estimate(&tiny_config(TunerType::Qlora, fp32), &facts, ONE_GPU);
    assert_eq!(qlora.compute_dtype, TorchDtype::Float32);
    // fp32 everywhere but the 4-bit projections; fp32 masters need no cast.
    assert_close(
        "fp32-compute qlora weights",
        qlora.weights_gib,
        PROJ_TINY * 0.5
            + 1152.0
            + 14.0 * 4.0
            + (P_TINY_DENSE - PROJ_TINY) * 4.0
            + 36864.0 * 4.0
            + 4.0 * LORA_TINY_DENSE,
    );
    // Without quantisation the field changes nothing (validation warns about it).
    let lora = estimate(&tiny_config(TunerType::Lora, fp32), &facts, ONE_GPU);
    assert_eq!(lora.compute_dtype, TorchDtype::Bfloat16);
}

#[test]
fn parameter_counts_read_like_model_cards() {
    use whet_shared::memory::{params_text, trainable_percent};
    assert_eq!(params_text(8_190_735_360), "8.19B");
    assert_eq!(params_text(21_823_488), "21.8M");
    assert_eq!(params_text(140_160), "140.2K");
    assert_eq!(params_text(512), "512");
    let facts = lookup("Qwen/Qwen3-8B").unwrap();
    let lora = estimate(
        &config(TunerType::Lora, TorchDtype::Bfloat16, 2048, true),
        &facts,
        Sharding {
            world_size: 1,
            zero: ZeroSettings::none(),
        },
    );
    // 21,823,488 of 8,190,735,360.
    assert_eq!(trainable_percent(&lora), "0.27%");
}

#[test]
fn fused_attention_keeps_no_score_tensors() {
    let facts = tiny(TINY_DENSE);
    let eager = estimate(&tiny_config(TunerType::Full, |_| {}), &facts, ONE_GPU);
    for kernel in ["sdpa", "flash_attn", "flash_attention_2"] {
        let fused = estimate(
            &tiny_config(TunerType::Full, |c| c.attn_impl = Some(kernel.into())),
            &facts,
            ONE_GPU,
        );
        // Per token: the six score tensors (26 · 4 · 128 bf16 bytes) become one fp32
        // log-sum-exp per head (4 · 4); the backward's seven fp32 score gradients
        // (28 · 4 · 128) become four bf16 MLP widths (4 · 2 · 128).
        let saved = 128.0 * (26.0 * 512.0 - 16.0 + 28.0 * 512.0 - 1024.0);
        assert_close(kernel, eager.activations_gib - fused.activations_gib, saved);
        assert_adds_up(&fused);
    }
    let explicit = estimate(
        &tiny_config(TunerType::Full, |c| c.attn_impl = Some("eager".into())),
        &facts,
        ONE_GPU,
    );
    assert_eq!(explicit, eager, "unset is eager, what whet-engine runs");
}
