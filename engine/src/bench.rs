//! `whet bench train`: training-step throughput of a randomly initialised Qwen3, the same
//! measurement as `shared/tools/torch_train_bench.py` makes for PyTorch (same presets, random
//! tokens with labels = inputs, clip to 1.0, AdamW lr 1e-4 wd 0.1; the first two steps are
//! warm-up and not timed; on a GPU each step is timed to a device synchronize, and peak GPU
//! memory and MFU are reported as the script reports them), so that the two can be compared
//! directly. `--train_type` trains everything (full), LoRA adapters over a frozen base (lora),
//! or the same adapters over a 4-bit NF4 base with double quantization (qlora), built as
//! `whet sft` builds them; `--dtype` is the compute dtype, over f32 masters as `whet sft` keeps.

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use whet_shared::config::TunerType;
use whet_shared::models::ModelFacts;
use whet_shared::JobConfig;

use crate::grad::Batch;
use crate::model::params::is_quantized_linear;
use crate::model::{Model, ModelConfig, ModelOptions, Trainable};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::sync::{Group, ZeroStage};
use crate::train::setup::{lora_options, quant_options, Sharding};
use crate::train::step::{forward_backward, StepOptions};

/// Steps at the start that are run but not timed (allocator and thread-pool warm-up).
pub const WARMUP_STEPS: usize = 2;

/// The dense bf16 peak of an H100/H200 in TFLOP/s, torch_train_bench.py's `--peak-tflops`
/// default: what the GPU's MFU is measured against unless told otherwise.
pub const H100_BF16_PEAK_TFLOPS: f64 = 989.0;

/// The model presets, shared with `torch_train_bench.py --size` (its `PRESETS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum BenchSize {
    #[serde(rename = "tiny")]
    Tiny,
    #[serde(rename = "small")]
    Small,
    #[serde(rename = "medium")]
    Medium,
    /// The small preset's attention with a Qwen3-MoE block: 16 experts, top-4, width 256.
    #[serde(rename = "moe-small")]
    #[value(name = "moe-small")]
    MoeSmall,
    /// The real shapes of Qwen/Qwen3-0.6B (tied embeddings).
    #[serde(rename = "qwen3-0.6b")]
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6b,
    /// Qwen/Qwen3-30B-A3B's layer shapes (128 experts, top-8, width 768), 4 of its 48 layers.
    #[serde(rename = "qwen3-30b-a3b-4l")]
    #[value(name = "qwen3-30b-a3b-4l")]
    Qwen3_30bA3b4l,
}

/// A preset's shape and its default batch, as torch_train_bench.py's `PRESETS` state them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Sequences per step and tokens per sequence when `--batch` / `--seq` are not given.
    pub batch: usize,
    pub seq: usize,
    pub tie_word_embeddings: bool,
    /// (num_experts, num_experts_per_tok, moe_intermediate_size) of a Qwen3-MoE preset, whose
    /// every layer is sparse with top-k renormalised (norm_topk_prob) and aux coefficient 0.001.
    pub moe: Option<(usize, usize, usize)>,
}

impl BenchSize {
    pub fn preset(self) -> Preset {
        let dense = |hidden, layers, heads, kv_heads, head_dim, intermediate, vocab| Preset {
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            intermediate_size: intermediate,
            vocab_size: vocab,
            batch: 4,
            seq: 256,
            tie_word_embeddings: false,
            moe: None,
        };
        match self {
            Self::Tiny => dense(64, 2, 4, 2, 16, 128, 1024),
            Self::Small => dense(512, 8, 8, 4, 64, 1536, 32000),
            Self::Medium => dense(1024, 16, 16, 8, 64, 3072, 32000),
            Self::MoeSmall => Preset {
                moe: Some((16, 4, 256)),
                ..Self::Small.preset()
            },
            Self::Qwen3_0_6b => Preset {
                batch: 8,
                seq: 2048,
                tie_word_embeddings: true,
                ..dense(1024, 28, 16, 8, 128, 3072, 151_936)
            },
            Self::Qwen3_30bA3b4l => Preset {
                seq: 2048,
                moe: Some((128, 8, 768)),
                ..dense(2048, 4, 32, 4, 128, 6144, 151_936)
            },
        }
    }

    /// The preset's config.json (rope_theta 1e6, eps 1e-6), as torch_train_bench.py builds it.
    pub fn config_json(self, seq: usize) -> String {
        let p = self.preset();
        let mut config = serde_json::json!({
            "architectures": [if p.moe.is_some() { "Qwen3MoeForCausalLM" } else { "Qwen3ForCausalLM" }],
            "hidden_size": p.hidden_size,
            "num_hidden_layers": p.num_hidden_layers,
            "num_attention_heads": p.num_attention_heads,
            "num_key_value_heads": p.num_key_value_heads,
            "head_dim": p.head_dim,
            "intermediate_size": p.intermediate_size,
            "vocab_size": p.vocab_size,
            "rope_theta": 1_000_000.0,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": seq.max(512),
            "tie_word_embeddings": p.tie_word_embeddings,
        });
        if let Some((experts, top_k, width)) = p.moe {
            let moe = serde_json::json!({
                "num_experts": experts,
                "num_experts_per_tok": top_k,
                "moe_intermediate_size": width,
                "norm_topk_prob": true,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "router_aux_loss_coef": 0.001,
            });
            config
                .as_object_mut()
                .expect("an object")
                .extend(moe.as_object().expect("an object").clone());
        }
        config.to_string()
    }
}

impl std::str::FromStr for BenchSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        use clap::ValueEnum;
        <Self as ValueEnum>::from_str(s, false).map_err(|_| {
            let names: Vec<String> = Self::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value())
                .map(|v| v.get_name().to_string())
                .collect();
            format!("unknown bench size `{s}`; use one of {}", names.join(", "))
        })
    }
}

/// Where the bench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchDevice {
    #[default]
    Cpu,
    /// Visible GPU LOCAL_RANK (of CUDA_VISIBLE_DEVICES); needs a build with `--features cuda`.
    Cuda,
}

impl BenchDevice {
    /// Opens the device, refusing a GPU this build or machine cannot use as `whet sft` does.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => crate::device::open_visible_gpu().map_err(|d| {
                anyhow::anyhow!(
                    "--device cuda: {} ({}); or bench on the CPU with --device cpu",
                    d.message_en,
                    d.fix
                )
            }),
        }
    }
}

/// Model FLOPs utilisation as torch_train_bench.py computes it: 6 FLOPs per active parameter
/// per token (forward 2, backward 4; attention's own FLOPs left out) against the peak.
pub fn model_flops_utilisation(active_params: u64, tokens_per_s: f64, peak_tflops: f64) -> f64 {
    6.0 * active_params as f64 * tokens_per_s / (peak_tflops * 1e12)
}

/// What a bench step trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchTrainType {
    /// Every weight.
    #[default]
    Full,
    /// LoRA rank 8, alpha 32 on all-linear (q, k, v, o, gate, up, down), the base frozen.
    Lora,
    /// The same adapters over a 4-bit NF4 base with double quantization.
    Qlora,
}

impl BenchTrainType {
    /// The model options `whet sft` would build for this train type (ms-swift's LoRA defaults).
    fn model_options(self) -> anyhow::Result<ModelOptions> {
        let mut config = JobConfig::default();
        if self == Self::Full {
            return Ok(ModelOptions::default());
        }
        config.sft.tuner_type = TunerType::Lora;
        if self == Self::Qlora {
            config.sft.quant_method = Some("bnb".into());
            config.sft.quant_bits = Some(4);
        }
        Ok(ModelOptions {
            trainable: Trainable::Nothing,
            lora: lora_options(&config)?,
            quantization: quant_options(&config)?,
            ..ModelOptions::default()
        })
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub size: BenchSize,
    pub train_type: BenchTrainType,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Training steps in all, the [`WARMUP_STEPS`] untimed ones included (as torch_train_bench).
    pub steps: usize,
    pub gradient_checkpointing: bool,
    /// What each rank of a multi-process bench shards (zero0 in one process).
    pub stage: ZeroStage,
    /// The device the model trains on (see [`BenchDevice::open`]).
    pub device: Device,
    /// Dtype of activations and of the weights in the forward pass (the masters stay f32).
    pub compute_dtype: DType,
    /// The device's peak, TFLOP/s, for the MFU; None: [`H100_BF16_PEAK_TFLOPS`] on a GPU, no
    /// MFU on the CPU (whose peak the bench cannot know).
    pub peak_tflops: Option<f64>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            size: BenchSize::Small,
            train_type: BenchTrainType::Full,
            batch: 4,
            seq: 256,
            steps: 10,
            gradient_checkpointing: false,
            stage: ZeroStage::Zero0,
            device: Device::Cpu,
            compute_dtype: DType::F32,
            peak_tflops: None,
        }
    }
}

/// The result, printed by `whet bench train` as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub size: BenchSize,
    pub train_type: BenchTrainType,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    /// Untimed steps at the start.
    pub warmup_steps: usize,
    pub gradient_checkpointing: bool,
    /// `cpu` or `cuda`, and what that is: `cpu` or the GPU's name.
    pub device: &'static str,
    pub device_name: String,
    /// The CPU threads of candle's matmuls and whet's fused ops (RAYON_NUM_THREADS, else every
    /// core).
    pub threads: usize,
    /// The CPU matmul kernel (`gemm (AVX-512)`, ...).
    pub matmul: &'static str,
    /// Whether the fused CPU ops ran (`--fused`); they never run on a GPU.
    pub fused_ops: bool,
    /// The compute dtype's torch name (`float32`, `bfloat16`, `float16`).
    pub dtype: &'static str,
    /// This process's rank and the ranks in all (each takes `batch` sequences per step).
    pub rank: usize,
    pub world_size: usize,
    /// The ZeRO stage (`zero0` in one process).
    pub zero_stage: String,
    /// Parameters of the model (the base; LoRA adapters not included).
    pub params: usize,
    /// Parameters one token passes through (MoE: its top-k experts), torch_train_bench's
    /// `active_params`.
    pub active_params: u64,
    /// Parameters the optimizer updates.
    pub trainable_params: usize,
    /// What the base weights take in memory, MiB (4-bit codes and scales under qlora).
    pub base_weights_mib: f64,
    /// The part of it in the decoder linears, the weights qlora stores in 4 bits.
    pub linear_weights_mib: f64,
    /// This rank's tokens (batch * seq) per second over the timed steps.
    pub tokens_per_s: f64,
    /// Mean wall time of a timed step, in milliseconds.
    pub step_ms: f64,
    /// Fastest timed step, in milliseconds (less sensitive to other load on the machine).
    pub step_ms_min: f64,
    /// Peak resident memory of the process (Linux `VmHWM`), MiB; None elsewhere.
    pub peak_rss_mib: Option<f64>,
    /// The GPU's peak memory in use over the steps (its default pool's high-water mark), GiB;
    /// None on the CPU.
    pub peak_gpu_gib: Option<f64>,
    /// 6 x active_params x tokens_per_s / (peak_tflops x 1e12); None without a peak.
    pub mfu: Option<f64>,
    pub peak_tflops: Option<f64>,
    pub loss_first: f64,
    pub loss_last: f64,
}

/// The process's peak resident set size in MiB, from `/proc/self/status` (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Uniform token ids from a seeded splitmix64 stream.
struct TokenStream {
    state: u64,
}

impl TokenStream {
    fn next_id(&mut self, vocab: usize) -> u32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % vocab as u64) as u32
    }

    /// A batch of random tokens whose labels are the inputs (every position has a loss).
    /// The batch is made on `device`, as torch_train_bench moves its tokens before the clock.
    fn batch(
        &mut self,
        batch: usize,
        seq: usize,
        vocab: usize,
        device: &Device,
    ) -> candle_core::Result<Batch> {
        let ids: Vec<u32> = (0..batch * seq).map(|_| self.next_id(vocab)).collect();
        let labels: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (batch, seq), device)?,
            attention_mask: Tensor::ones((batch, seq), DType::U32, device)?,
            labels: Tensor::from_vec(labels, (batch, seq), device)?,
        })
    }
}

/// MiB the parameters whose names pass `keep` take in memory.
fn resident_mib(model: &Model, keep: impl Fn(&str) -> bool) -> f64 {
    let bytes: usize = model
        .params()
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(_, p)| p.resident_bytes())
        .sum();
    bytes as f64 / (1024.0 * 1024.0)
}

/// Builds the preset model and times `opts.steps` full training steps (forward, backward,
/// clip to 1.0, AdamW) on random tokens.
/// Runs the bench as this process of `group` (one process, or a rank of a multi-process bench:
/// each rank draws its own tokens and the ranks reduce as `whet sft`'s do under `opts.stage`).
pub fn run_train_bench(opts: &BenchOptions, group: &Group) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        opts.batch > 0 && opts.seq > 1,
        "bench needs --batch >= 1 and --seq >= 2 (got batch {}, seq {})",
        opts.batch,
        opts.seq
    );
    anyhow::ensure!(
        opts.steps > WARMUP_STEPS,
        "bench needs --steps > {WARMUP_STEPS} (the first {WARMUP_STEPS} are warm-up), got {}",
        opts.steps
    );
    let config_json = opts.size.config_json(opts.seq);
    let config =
        ModelConfig::from_json_str(&config_json).context("building the bench model config")?;
    let active_params = ModelFacts::from_config_json("whet bench", &config_json)
        .map_err(anyhow::Error::msg)?
        .param_counts()
        .active;
    let vocab = config.vocab_size;
    let model_options = ModelOptions {
        device: opts.device.clone(),
        compute_dtype: opts.compute_dtype,
        ..opts.train_type.model_options()?
    };
    let model = Model::random(config, 0, model_options).context("building the model")?;
    // Buckets as `whet sft` sizes them by default (DeepSpeed's `auto`).
    let sharding = Sharding {
        stage: opts.stage,
        reduce_bucket_size: None,
        offload_optimizer: false,
    };
    let bucket_elems = sharding.bucket_elems(model.config().hidden_size);
    let mut sync = group.grad_sync(opts.stage, model.trainable(), bucket_elems)?;
    let mut optimizer = AdamW::for_range(
        model.trainable(),
        sync.owned(),
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )?
    .with_flat_master(sync.flat_master())?;
    let step_options = StepOptions {
        router_aux_loss_coef: 0.0,
        gradient_checkpointing: opts.gradient_checkpointing,
        dropout: None,
    };
    let mut tokens = TokenStream {
        state: 1 + group.rank() as u64,
    };
    let mut step_secs = Vec::with_capacity(opts.steps);
    let mut losses = Vec::with_capacity(opts.steps);
    let device = &opts.device;
    crate::device::reset_peak_gpu_memory(device)?;
    for _ in 0..opts.steps {
        let batch = tokens.batch(opts.batch, opts.seq, vocab, device)?;
        // A GPU queues work: the clock starts and stops with the queue empty.
        device.synchronize()?;
        let start = Instant::now();
        let (loss, mut grads) = forward_backward(&model, &[batch], step_options, sync.as_mut())?;
        clip_grad_norm(&mut grads, 1.0, sync.as_mut())?;
        optimizer.step(&grads, 1e-4)?;
        drop(grads);
        sync.params_updated(model.trainable())?;
        device.synchronize()?;
        step_secs.push(start.elapsed().as_secs_f64());
        losses.push(loss.loss);
    }
    let timed = &step_secs[WARMUP_STEPS..];
    let total: f64 = timed.iter().sum();
    let fastest = timed.iter().copied().fold(f64::INFINITY, f64::min);
    let tokens_per_s = (opts.batch * opts.seq * timed.len()) as f64 / total;
    let peak_tflops = opts
        .peak_tflops
        .or((!device.is_cpu()).then_some(H100_BF16_PEAK_TFLOPS));
    Ok(BenchReport {
        size: opts.size,
        train_type: opts.train_type,
        batch: opts.batch,
        seq: opts.seq,
        steps: opts.steps,
        warmup_steps: WARMUP_STEPS,
        gradient_checkpointing: opts.gradient_checkpointing,
        device: if device.is_cpu() { "cpu" } else { "cuda" },
        device_name: crate::device::device_name(device),
        threads: crate::host::cpu_threads(),
        matmul: crate::host::matmul_kernel(),
        fused_ops: crate::ops::fused() && device.is_cpu(),
        dtype: crate::dtype::torch_name(opts.compute_dtype),
        rank: group.rank(),
        world_size: group.world_size(),
        zero_stage: opts.stage.name().to_string(),
        params: model.num_parameters(),
        active_params,
        trainable_params: model.num_trainable_parameters(),
        base_weights_mib: resident_mib(&model, |_| true),
        linear_weights_mib: resident_mib(&model, is_quantized_linear),
        tokens_per_s,
        step_ms: total / timed.len() as f64 * 1e3,
        step_ms_min: fastest * 1e3,
        peak_rss_mib: peak_rss_mib(),
        peak_gpu_gib: crate::device::peak_gpu_memory_bytes(device)
            .map(|bytes| bytes as f64 / (1u64 << 30) as f64),
        mfu: peak_tflops.map(|peak| model_flops_utilisation(active_params, tokens_per_s, peak)),
        peak_tflops,
        loss_first: losses[0],
        loss_last: *losses.last().expect("steps > 0"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_bench_reports_sane_numbers() {
        for gradient_checkpointing in [false, true] {
            let report = run_train_bench(
                &BenchOptions {
                    size: BenchSize::Tiny,
                    train_type: BenchTrainType::Full,
                    batch: 2,
                    seq: 16,
                    steps: 3,
                    gradient_checkpointing,
                    ..Default::default()
                },
                &Group::single(),
            )
            .unwrap();
            assert!(report.tokens_per_s > 0.0 && report.tokens_per_s.is_finite());
            assert!(report.step_ms > 0.0 && report.step_ms_min <= report.step_ms);
            assert_eq!(report.params, 2 * 1024 * 64 + 2 * 37_024 + 64);
            assert!(report.loss_first.is_finite() && report.loss_first > 0.0);
            // Random init over 1024 tokens: the loss starts near ln(1024).
            assert!(
                (report.loss_first - (1024f64).ln()).abs() < 0.5,
                "{report:?}"
            );
            if cfg!(target_os = "linux") {
                assert!(report.peak_rss_mib.unwrap() > 1.0);
            }
            let json = serde_json::to_value(&report).unwrap();
            assert_eq!(json["size"], "tiny");
            assert_eq!(json["gradient_checkpointing"], gradient_checkpointing);
        }
    }

    #[test]
    fn lora_and_qlora_benches_train_adapters_over_a_smaller_base() {
        let run = |train_type| {
            run_train_bench(
                &BenchOptions {
                    size: BenchSize::Tiny,
                    train_type,
                    batch: 2,
                    seq: 16,
                    steps: 3,
                    ..Default::default()
                },
                &Group::single(),
            )
            .unwrap()
        };
        let (full, lora, qlora) = (
            run(BenchTrainType::Full),
            run(BenchTrainType::Lora),
            run(BenchTrainType::Qlora),
        );
        assert_eq!(lora.params, full.params);
        assert_eq!(qlora.params, full.params);
        assert_eq!(full.trainable_params, full.params);
        // Rank 8 on q, k, v, o, gate, up, down of 2 layers of hidden 64 (q 64, kv 32,
        // intermediate 128): 8 * sum(in + out) per layer.
        let per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128));
        assert_eq!(lora.trainable_params, 2 * per_layer);
        assert_eq!(qlora.trainable_params, lora.trainable_params);
        assert_eq!(full.base_weights_mib, lora.base_weights_mib);
        // Embeddings, lm_head and norms stay f32; each linear weight of n values drops from 4n
        // bytes to n / 2 codes, n / 64 absmax codes, one f32 scale (a single group of 256
        // blocks) and the offset.
        let linears = [4096usize, 2048, 2048, 4096, 8192, 8192, 8192];
        let saved_bytes: usize = linears.iter().map(|n| 4 * n - (n / 2 + n / 64 + 8)).sum();
        let saved = full.base_weights_mib - qlora.base_weights_mib;
        let expected = (2 * saved_bytes) as f64 / (1024.0 * 1024.0);
        assert!((saved - expected).abs() < 1e-9, "{saved} MiB saved");
        assert!((full.linear_weights_mib - qlora.linear_weights_mib - saved).abs() < 1e-9);
        assert_eq!(
            full.linear_weights_mib,
            2.0 * 36_864.0 * 4.0 / (1024.0 * 1024.0)
        );
        let json = serde_json::to_value(&qlora).unwrap();
        assert_eq!(json["train_type"], "qlora");
        assert!(qlora.loss_first.is_finite() && qlora.loss_last.is_finite());
    }

    #[test]
    fn bad_options_are_errors() {
        let opts = BenchOptions {
            size: BenchSize::Tiny,
            steps: 2,
            ..Default::default()
        };
        assert!(run_train_bench(&opts, &Group::single())
            .unwrap_err()
            .to_string()
            .contains("--steps"));
        assert_eq!("medium".parse::<BenchSize>(), Ok(BenchSize::Medium));
        assert_eq!("qwen3-0.6b".parse::<BenchSize>(), Ok(BenchSize::Qwen3_0_6b));
        let unknown = "huge".parse::<BenchSize>().unwrap_err();
        assert!(unknown.contains("qwen3-30b-a3b-4l"), "{unknown}");
    }

    /// torch_train_bench.py's counts: `sum(p.numel())` of transformers' model (written out
    /// from its modules), and `active_params` = that minus the unpicked experts of each layer.
    fn torch_counts(p: &Preset) -> (u64, u64) {
        let [h, heads, kv, d, inter, vocab, layers] = [
            p.hidden_size,
            p.num_attention_heads,
            p.num_key_value_heads,
            p.head_dim,
            p.intermediate_size,
            p.vocab_size,
            p.num_hidden_layers,
        ]
        .map(|v| v as u64);
        let attention = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d;
        let mlp = match p.moe {
            None => 3 * h * inter,
            Some((experts, _, width)) => experts as u64 * (h + 3 * h * width as u64),
        };
        let embeddings = vocab * h * if p.tie_word_embeddings { 1 } else { 2 };
        let total = embeddings + h + layers * (attention + mlp + 2 * h);
        let unpicked = match p.moe {
            None => 0,
            Some((experts, top_k, width)) => {
                layers * 3 * h * width as u64 * (experts - top_k) as u64
            }
        };
        (total, total - unpicked)
    }

    #[test]
    fn presets_have_torch_train_bench_shapes_and_counts() {
        use clap::ValueEnum;
        for &size in BenchSize::value_variants() {
            let p = size.preset();
            let json = size.config_json(p.seq);
            let counts = ModelFacts::from_config_json("bench", &json)
                .unwrap()
                .param_counts();
            assert_eq!((counts.total, counts.active), torch_counts(&p), "{size:?}");
            let config = ModelConfig::from_json_str(&json).unwrap();
            assert_eq!(config.tie_word_embeddings, p.tie_word_embeddings);
            assert_eq!(config.moe.is_some(), p.moe.is_some(), "{size:?}");
        }
        // The published sizes: Qwen3-0.6B has 596,049,920 parameters; four of Qwen3-30B-A3B's
        // layers with its (untied) embeddings 3.11 B, of which 0.85 B are active.
        let qwen06 = torch_counts(&BenchSize::Qwen3_0_6b.preset());
        assert_eq!(qwen06, (596_049_920, 596_049_920));
        assert_eq!(
            torch_counts(&BenchSize::Qwen3_30bA3b4l.preset()),
            (3_114_814_464, 849_890_304)
        );
        let p = BenchSize::Qwen3_0_6b.preset();
        assert_eq!((p.batch, p.seq), (8, 2048));
        let p = BenchSize::Qwen3_30bA3b4l.preset();
        assert_eq!((p.batch, p.seq, p.moe), (4, 2048, Some((128, 8, 768))));
    }

    #[test]
    fn the_built_moe_model_has_the_counted_parameters() {
        let size = BenchSize::MoeSmall;
        let json = size.config_json(256);
        let model = Model::random(
            ModelConfig::from_json_str(&json).unwrap(),
            0,
            ModelOptions::default(),
        )
        .unwrap();
        assert_eq!(
            model.num_parameters() as u64,
            torch_counts(&size.preset()).0
        );
    }

    #[test]
    fn mfu_is_six_flops_per_active_parameter_and_token_over_the_peak() {
        // 0.6 B active parameters at 100k tokens/s: 3.6e17 FLOP/s of 989e12 → 36.4 %.
        let mfu = model_flops_utilisation(600_000_000, 100_000.0, 989.0);
        assert!((mfu - 6.0 * 6e8 * 1e5 / 989e12).abs() < 1e-12);
        assert!((mfu - 0.364_004).abs() < 1e-6, "{mfu}");
        // The CPU reports none unless a peak is given; then the same arithmetic.
        let opts = BenchOptions {
            size: BenchSize::Tiny,
            batch: 2,
            seq: 16,
            steps: 3,
            ..Default::default()
        };
        let report = run_train_bench(&opts, &Group::single()).unwrap();
        assert_eq!((report.mfu, report.peak_gpu_gib), (None, None));
        assert_eq!((report.device, report.dtype), ("cpu", "float32"));
        assert_eq!(report.active_params, report.params as u64);
        let report = run_train_bench(
            &BenchOptions {
                peak_tflops: Some(1.0),
                ..opts
            },
            &Group::single(),
        )
        .unwrap();
        let expected = model_flops_utilisation(report.active_params, report.tokens_per_s, 1.0);
        assert_eq!(report.mfu, Some(expected));
    }

    #[test]
    fn bf16_compute_trains_over_f32_masters() {
        let report = run_train_bench(
            &BenchOptions {
                size: BenchSize::Tiny,
                batch: 2,
                seq: 16,
                steps: 3,
                compute_dtype: DType::BF16,
                ..Default::default()
            },
            &Group::single(),
        )
        .unwrap();
        assert_eq!(report.dtype, "bfloat16");
        assert!(
            (report.loss_first - (1024f64).ln()).abs() < 0.5,
            "{report:?}"
        );
    }
}
