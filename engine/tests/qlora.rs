//! QLoRA's roles on the fixture models: every decoder linear (attention, dense MLP, each MoE
//! expert) is stored in 4 bits and dequantized on use; embeddings, norms, the router and
//! `lm_head` stay in the compute dtype; only the LoRA matrices get gradients; and the quantized
//! model computes what the unquantized one does, up to the quantization error.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use whet_engine::grad::{loss_and_gradients, Batch, LossOptions};
use whet_engine::model::params::is_quantized_linear;
use whet_engine::model::{LoraOptions, Model, ModelOptions, Param, Trainable};
use whet_engine::quant::{QuantOptions, QuantType, Quantized4Bit};
use whet_shared::lora::AdapterPlan;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/hf-reference")
        .join(name)
}

fn batch() -> Batch {
    let device = Device::Cpu;
    let ids = [[508u32, 426, 198, 18, 220, 87, 509, 11]];
    Batch {
        input_ids: Tensor::new(&ids, &device).unwrap(),
        attention_mask: Tensor::ones((1, 8), DType::U32, &device).unwrap(),
        labels: Tensor::new(&[[-100i64, -100, 198, 18, 220, 87, 509, 11]], &device).unwrap(),
    }
}

fn options(quantization: Option<QuantOptions>) -> ModelOptions {
    ModelOptions {
        trainable: Trainable::Nothing,
        // all-linear: q, k, v, o, gate, up, down.
        lora: Some(LoraOptions {
            rank: 4,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            plan: AdapterPlan::from_config(&whet_shared::SftConfig::default()).unwrap(),
            init_seed: 0,
        }),
        quantization,
        ..ModelOptions::default()
    }
}

const NF4_DOUBLE: QuantOptions = QuantOptions {
    quant_type: QuantType::Nf4,
    double_quant: true,
};

#[test]
fn decoder_linears_are_quantized_and_nothing_else() {
    for fixture_name in ["", "moe"] {
        let model =
            Model::from_pretrained(fixture(fixture_name), options(Some(NF4_DOUBLE))).unwrap();
        let plain = Model::from_pretrained(fixture(fixture_name), options(None)).unwrap();
        let mut quantized = 0;
        for ((name, param), (_, frozen)) in model.params().iter().zip(plain.params()) {
            let Param::Frozen(full) = frozen else {
                panic!("{name} is trainable")
            };
            match param {
                Param::Quantized(q) => {
                    assert!(is_quantized_linear(name), "{name}");
                    assert_eq!(q.shape(), full.dims(), "{name}");
                    // The same bytes the host quantizer gives, dequantized on the device.
                    let values: Vec<f32> = full.flatten_all().unwrap().to_vec1().unwrap();
                    let host = Quantized4Bit::quantize(&values, full.dims(), NF4_DOUBLE);
                    let got: Vec<f32> = param.value().flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(got, host.dequantize(), "{name}");
                    assert_eq!(q.resident_bytes(), host.resident_bytes());
                    assert!(
                        8 * param.resident_bytes() < 5 * param.elem_count(),
                        "{name}"
                    );
                    quantized += 1;
                }
                Param::Frozen(_) => assert!(!is_quantized_linear(name), "{name}"),
                Param::Trainable(_) => panic!("{name} is trainable"),
            }
        }
        // Per layer: q, k, v, o and gate/up/down (dense) or 4 experts x 3 (MoE).
        let per_layer = if fixture_name == "moe" { 4 + 12 } else { 7 };
        assert_eq!(quantized, 2 * per_layer, "{fixture_name}");
        if fixture_name == "moe" {
            let router = model
                .params()
                .iter()
                .find(|(n, _)| n == "model.layers.0.mlp.gate.weight")
                .unwrap();
            assert!(matches!(router.1, Param::Frozen(_)), "the router stays");
        }
        assert_eq!(model.num_parameters(), plain.num_parameters());
        assert_eq!(
            model.num_trainable_parameters(),
            plain.num_trainable_parameters()
        );
    }
}

#[test]
fn qlora_computes_close_to_lora_and_trains_only_the_adapters() {
    let plain = Model::from_pretrained(fixture(""), options(None)).unwrap();
    let b = batch();
    let loss_options = LossOptions::for_model(plain.config());
    let (plain_report, _) = loss_and_gradients(&plain, &b, &loss_options).unwrap();
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        for double_quant in [false, true] {
            let quantization = QuantOptions {
                quant_type,
                double_quant,
            };
            let model = Model::from_pretrained(fixture(""), options(Some(quantization))).unwrap();
            let (report, grads) = loss_and_gradients(&model, &b, &loss_options).unwrap();
            assert_eq!(grads.num_present(), model.trainable_parameters().len());
            assert!(model
                .trainable_parameters()
                .iter()
                .all(|(n, _)| n.contains(".lora_")));
            // The adapters start at B = 0, so this is the 4-bit base's loss against the full
            // base's: close, not equal.
            let gap = (report.loss - plain_report.loss).abs();
            assert!(
                gap > 0.0 && gap < 0.05 * plain_report.loss,
                "{quantization:?}: {} vs {}",
                report.loss,
                plain_report.loss
            );
            // lora_A's gradient is 0 while B is 0; lora_B's is not.
            let b_grad = grads
                .get_by_name("model.layers.1.self_attn.q_proj.lora_B.weight")
                .unwrap();
            let norm = b_grad
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{quantization:?}");
        }
    }
}

#[test]
fn quantization_follows_the_compute_dtype() {
    let options = ModelOptions {
        compute_dtype: DType::BF16,
        ..options(Some(NF4_DOUBLE))
    };
    let model = Model::from_pretrained(fixture(""), options).unwrap();
    let b = batch();
    let out = model.forward(&b.input_ids, &b.attention_mask).unwrap();
    assert_eq!(out.logits.dtype(), DType::BF16);
    let (_, q) = model
        .params()
        .iter()
        .find(|(n, _)| n == "model.layers.0.mlp.down_proj.weight")
        .unwrap();
    assert_eq!(q.for_compute(DType::BF16).unwrap().dtype(), DType::BF16);
}
