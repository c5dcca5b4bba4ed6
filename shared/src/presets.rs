//! The studio's presets, each a script that `parse_shell` reads: the seed's exact command from
//! the parameter guide, Qwen3-8B with LoRA and with QLoRA, and the built-in CPU demo.
//! This is the one place presets are defined (the studio lists them; tests check each parses
//! and validates without errors).

use crate::config::JobConfig;
use crate::shell::parse_shell;

#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub id: &'static str,
    pub title_en: &'static str,
    pub title_zh: &'static str,
    pub source: Source,
}

/// What a preset is written as.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A training script (`swift sft ...`).
    Shell(&'static str),
    /// A YAML config file.
    Yaml(&'static str),
}

/// The seed's command, exactly as the parameter guide gives it.
pub const SEED_SCRIPT: &str = include_str!("../../examples/seed.sh");

/// The built-in demo: a tiny Qwen3 trained on the demo data in examples/, on CPU in minutes.
/// It is the engine's own demo config, examples/demo.yaml, word for word.
pub const DEMO_YAML: &str = include_str!("../../examples/demo.yaml");

const QWEN3_8B_LORA: &str = "CUDA_VISIBLE_DEVICES=0 \\
swift sft \\
    --model Qwen/Qwen3-8B \\
    --tuner_type lora \\
    --torch_dtype bfloat16 \\
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' 'AI-ModelScope/alpaca-gpt4-data-en#500' 'swift/self-cognition#500' \\
    --split_dataset_ratio 0.01 \\
    --lora_rank 8 \\
    --lora_alpha 32 \\
    --target_modules all-linear \\
    --max_length 2048 \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 1 \\
    --gradient_accumulation_steps 16 \\
    --learning_rate 1e-4 \\
    --warmup_ratio 0.05 \\
    --eval_steps 50 \\
    --save_steps 50 \\
    --save_total_limit 2 \\
    --logging_steps 5 \\
    --output_dir output/qwen3-8b-lora \\
    --model_author swift \\
    --model_name swift-robot
";

const QWEN3_8B_QLORA: &str = "CUDA_VISIBLE_DEVICES=0 \\
swift sft \\
    --model Qwen/Qwen3-8B \\
    --tuner_type lora \\
    --quant_method bnb \\
    --quant_bits 4 \\
    --bnb_4bit_quant_type nf4 \\
    --bnb_4bit_compute_dtype bfloat16 \\
    --torch_dtype bfloat16 \\
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' 'AI-ModelScope/alpaca-gpt4-data-en#500' 'swift/self-cognition#500' \\
    --split_dataset_ratio 0.01 \\
    --lora_rank 8 \\
    --lora_alpha 32 \\
    --target_modules all-linear \\
    --max_length 2048 \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 1 \\
    --gradient_accumulation_steps 16 \\
    --learning_rate 1e-4 \\
    --warmup_ratio 0.05 \\
    --eval_steps 50 \\
    --save_steps 50 \\
    --save_total_limit 2 \\
    --logging_steps 5 \\
    --output_dir output/qwen3-8b-qlora \\
    --model_author swift \\
    --model_name swift-robot
";

pub const PRESETS: &[Preset] = &[
    Preset {
        id: "seed",
        title_en: "Seed: Qwen3-30B-A3B full fine-tune on 5 GPUs",
        title_zh: "示例：Qwen3-30B-A3B 五卡全参数微调",
        source: Source::Shell(SEED_SCRIPT),
    },
    Preset {
        id: "qwen3-8b-lora",
        title_en: "Qwen3-8B LoRA on one GPU",
        title_zh: "Qwen3-8B 单卡 LoRA",
        source: Source::Shell(QWEN3_8B_LORA),
    },
    Preset {
        id: "qwen3-8b-qlora",
        title_en: "Qwen3-8B QLoRA (4-bit) on one GPU",
        title_zh: "Qwen3-8B 单卡 QLoRA（4-bit）",
        source: Source::Shell(QWEN3_8B_QLORA),
    },
    Preset {
        id: "demo",
        title_en: "Demo: tiny Qwen3 on CPU (minutes)",
        title_zh: "演示：CPU 上训练微型 Qwen3（几分钟）",
        source: Source::Yaml(DEMO_YAML),
    },
];

impl Preset {
    /// The preset's config. Every preset parses (a test checks), so this never falls back in
    /// practice; if one ever failed, the defaults are returned rather than a panic in a page.
    pub fn config(&self) -> JobConfig {
        self.parse().unwrap_or_default()
    }

    pub fn parse(&self) -> Result<JobConfig, crate::Diagnostics> {
        match self.source {
            Source::Shell(script) => parse_shell(script),
            Source::Yaml(text) => crate::files::parse_config_text(text, crate::Format::Yaml),
        }
    }
}

pub fn find(id: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::validate;

    #[test]
    fn every_preset_parses_and_has_no_errors() {
        for preset in PRESETS {
            let config = preset
                .parse()
                .unwrap_or_else(|d| panic!("preset {} does not parse: {d:?}", preset.id));
            let errors: Vec<_> = validate(&config)
                .into_iter()
                .filter(|d| d.is_error())
                .collect();
            assert!(errors.is_empty(), "preset {}: {errors:#?}", preset.id);
            assert_eq!(preset.config(), config);
        }
    }

    #[test]
    fn the_lora_and_qlora_presets_show_their_memory() {
        use crate::config::TunerType;
        use crate::derive::CheckContext;
        let derived = |config: &JobConfig| {
            let context = CheckContext::default();
            let facts = context.facts_for(config);
            crate::derive::derive(config, facts.as_ref(), None, context.gpu)
                .memory
                .expect("Qwen3-8B is in the catalog")
        };
        let lora = find("qwen3-8b-lora").unwrap().config();
        let qlora = find("qwen3-8b-qlora").unwrap().config();
        assert!(lora.sft.is_adapter() && !lora.sft.is_qlora());
        assert!(qlora.sft.is_qlora());
        // ms-swift's default dropout, which the engine runs.
        assert_eq!(lora.sft.lora_dropout, 0.05);
        assert_eq!(qlora.sft.lora_dropout, 0.05);
        let mut full = lora.clone();
        full.sft.tuner_type = TunerType::Full;
        let (full, lora, qlora) = (derived(&full), derived(&lora), derived(&qlora));
        assert!(
            qlora.per_gpu_gib < lora.per_gpu_gib && lora.per_gpu_gib < full.per_gpu_gib,
            "QLoRA {:.1} < LoRA {:.1} < full {:.1} GiB per GPU",
            qlora.per_gpu_gib,
            lora.per_gpu_gib,
            full.per_gpu_gib
        );
        // The same adapters, a quarter of the projections' bytes.
        assert_eq!(qlora.trainable_params, lora.trainable_params);
        assert!(lora.trainable_params < full.trainable_params / 100);
        assert!(qlora.weights_gib < lora.weights_gib / 2.0);
        // Both fit one 80 GB GPU, as their titles say.
        assert!(lora.per_gpu_gib < 80.0 && qlora.per_gpu_gib < lora.per_gpu_gib);
    }

    #[test]
    fn the_seed_preset_is_the_seed_command() {
        let seed = find("seed").unwrap().config();
        assert_eq!(seed.launch.nproc_per_node, Some(5));
        assert_eq!(
            seed.launch.cuda_visible_devices.as_deref(),
            Some("0,1,2,3,4")
        );
        assert_eq!(seed.sft.per_device_train_batch_size, 2);
        assert_eq!(seed.sft.gradient_accumulation_steps, Some(8));
        let qlora = find("qwen3-8b-qlora").unwrap().config();
        assert!(qlora.sft.is_qlora());
        assert!(find("demo").is_some() && find("nope").is_none());
    }
}
