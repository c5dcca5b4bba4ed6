//! `whet bench train`: training-step throughput of a randomly initialised Qwen3 on the CPU in
//! f32, the same measurement as `shared/tools/torch_train_bench.py` makes for PyTorch (same
//! presets, random tokens with labels = inputs, clip to 1.0, AdamW lr 1e-4 wd 0.1; the first two
//! steps are warm-up and not timed), so that the two can be compared directly. `--train_type`
//! trains everything (full), LoRA adapters over a frozen base (lora), or the same adapters over
//! a 4-bit NF4 base with double quantization (qlora), built as `whet sft` builds them.

use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::Serialize;

use whet_shared::config::TunerType;
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

/// The model presets, shared with `torch_train_bench.py --size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchSize {
    Tiny,
    Small,
    Medium,
}

impl BenchSize {
    /// The preset's Qwen3 config.json (untied embeddings, rope_theta 1e6, eps 1e-6).
    pub fn config_json(self, seq: usize) -> String {
        // hidden, layers, heads, kv heads, head_dim, intermediate, vocab
        let (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab) = match self {
            Self::Tiny => (64, 2, 4, 2, 16, 128, 1024),
            Self::Small => (512, 8, 8, 4, 64, 1536, 32000),
            Self::Medium => (1024, 16, 16, 8, 64, 3072, 32000),
        };
        serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"],
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "intermediate_size": intermediate,
            "vocab_size": vocab,
            "rope_theta": 1_000_000.0,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": seq.max(512),
            "tie_word_embeddings": false,
        })
        .to_string()
    }
}

impl std::str::FromStr for BenchSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            "medium" => Ok(Self::Medium),
            other => Err(format!(
                "unknown bench size `{other}`; use tiny, small or medium"
            )),
        }
    }
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
#[derive(Debug, Clone, PartialEq)]
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
    /// This process's rank and the ranks in all (each takes `batch` sequences per step).
    pub rank: usize,
    pub world_size: usize,
    /// The ZeRO stage (`zero0` in one process).
    pub zero_stage: String,
    /// Parameters of the model (the base; LoRA adapters not included).
    pub params: usize,
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
    fn batch(&mut self, batch: usize, seq: usize, vocab: usize) -> candle_core::Result<Batch> {
        let ids: Vec<u32> = (0..batch * seq).map(|_| self.next_id(vocab)).collect();
        let labels: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
        let device = Device::Cpu;
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (batch, seq), &device)?,
            attention_mask: Tensor::ones((batch, seq), candle_core::DType::U32, &device)?,
            labels: Tensor::from_vec(labels, (batch, seq), &device)?,
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
    let config = ModelConfig::from_json_str(&opts.size.config_json(opts.seq))
        .context("building the bench model config")?;
    let vocab = config.vocab_size;
    let model =
        Model::random(config, 0, opts.train_type.model_options()?).context("building the model")?;
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
    for _ in 0..opts.steps {
        let batch = tokens.batch(opts.batch, opts.seq, vocab)?;
        let start = Instant::now();
        let (loss, mut grads) = forward_backward(&model, &[batch], step_options, sync.as_mut())?;
        clip_grad_norm(&mut grads, 1.0, sync.as_mut())?;
        optimizer.step(&grads, 1e-4)?;
        drop(grads);
        sync.params_updated(model.trainable())?;
        step_secs.push(start.elapsed().as_secs_f64());
        losses.push(loss.loss);
    }
    let timed = &step_secs[WARMUP_STEPS..];
    let total: f64 = timed.iter().sum();
    let fastest = timed.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(BenchReport {
        size: opts.size,
        train_type: opts.train_type,
        batch: opts.batch,
        seq: opts.seq,
        steps: opts.steps,
        warmup_steps: WARMUP_STEPS,
        gradient_checkpointing: opts.gradient_checkpointing,
        rank: group.rank(),
        world_size: group.world_size(),
        zero_stage: opts.stage.name().to_string(),
        params: model.num_parameters(),
        trainable_params: model.num_trainable_parameters(),
        base_weights_mib: resident_mib(&model, |_| true),
        linear_weights_mib: resident_mib(&model, is_quantized_linear),
        tokens_per_s: (opts.batch * opts.seq * timed.len()) as f64 / total,
        step_ms: total / timed.len() as f64 * 1e3,
        step_ms_min: fastest * 1e3,
        peak_rss_mib: peak_rss_mib(),
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
        assert!("huge".parse::<BenchSize>().is_err());
    }
}
