//! Validation rules: everything in a config a user would regret, as diagnostics with a fix in
//! both languages. Errors stop a run; warnings and infos are shown beside the field.

use crate::config::{
    IntervalStrategy, JobConfig, SftConfig, TorchDtype, ZeroSettings, DEEPSPEED_PRESETS,
};
use crate::dataset_spec::DatasetSpec;
use crate::derive::{self, CheckContext, Derived};
use crate::diagnostics::{closest_word, shorten, Diagnostic};
use crate::fields::TEMPLATES;
use crate::lora::AdapterPlan;
use crate::memory::{self, Sharding};
use crate::models::ModelFacts;
use crate::shell::format_float;

/// Validates with the built-in model catalog and the default GPU (80 GB).
pub fn validate(config: &JobConfig) -> Vec<Diagnostic> {
    validate_with(config, &CheckContext::default())
}

pub fn validate_with(config: &JobConfig, context: &CheckContext) -> Vec<Diagnostic> {
    let facts = context.facts_for(config);
    let derived = derive::derive(config, facts.as_ref(), context.dataset_rows, context.gpu);
    let mut out = Vec::new();
    launch_rules(config, &mut out);
    model_rules(config, facts.as_ref(), context, &mut out);
    tuner_rules(config, facts.as_ref(), &mut out);
    data_rules(config, &mut out);
    training_rules(config, &derived, &mut out);
    eval_save_rules(config, &derived, &mut out);
    distributed_rules(config, &mut out);
    memory_rules(config, facts.as_ref(), &derived, context, &mut out);
    out.sort_by_key(|d| d.severity);
    out
}

fn positive(out: &mut Vec<Diagnostic>, field: &str, value: i64, example: &str) {
    if value <= 0 {
        out.push(
            Diagnostic::error(
                field,
                "must_be_positive",
                format!("`{field}` must be at least 1, got {value}"),
                format!("`{field}` 必须至少为 1，当前为 {value}"),
            )
            .with_fix(
                format!("set --{field} {example}"),
                format!("设置 --{field} {example}"),
            ),
        );
    }
}

fn in_range(
    out: &mut Vec<Diagnostic>,
    field: &str,
    value: f64,
    low: f64,
    high: f64,
    high_inclusive: bool,
    example: &str,
) {
    let ok = value >= low
        && if high_inclusive {
            value <= high
        } else {
            value < high
        };
    if !ok {
        let bracket = if high_inclusive { "]" } else { ")" };
        out.push(
            Diagnostic::error(
                field,
                "out_of_range",
                format!(
                    "`{field}` must be in [{low}, {high}{bracket}, got {}",
                    format_float(value)
                ),
                format!(
                    "`{field}` 必须在 [{low}, {high}{bracket} 之内，当前为 {}",
                    format_float(value)
                ),
            )
            .with_fix(
                format!("set --{field} {example}"),
                format!("设置 --{field} {example}"),
            ),
        );
    }
}

/// The device indices of CUDA_VISIBLE_DEVICES, or the diagnostics that make it unreadable.
pub fn parse_devices(devices: &str) -> Result<Vec<u32>, Diagnostic> {
    let trimmed = devices.trim();
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen = Vec::new();
    for part in trimmed.split(',') {
        let part = part.trim();
        let index = part.parse::<u32>().map_err(|_| {
            Diagnostic::error(
                "cuda_visible_devices",
                "devices_invalid",
                format!(
                    "CUDA_VISIBLE_DEVICES `{}` has `{}`, which is not a GPU index",
                    shorten(devices),
                    shorten(part)
                ),
                format!(
                    "CUDA_VISIBLE_DEVICES `{}` 中的 `{}` 不是 GPU 编号",
                    shorten(devices),
                    shorten(part)
                ),
            )
            .with_fix(
                "list GPU indices separated by commas, e.g. 0,1,2,3 (empty = CPU)",
                "用逗号分隔 GPU 编号，例如 0,1,2,3（为空表示 CPU）",
            )
        })?;
        if seen.contains(&index) {
            return Err(Diagnostic::error(
                "cuda_visible_devices",
                "devices_duplicate",
                format!("CUDA_VISIBLE_DEVICES lists GPU {index} twice"),
                format!("CUDA_VISIBLE_DEVICES 中 GPU {index} 出现了两次"),
            )
            .with_fix("list each GPU once", "每个 GPU 只写一次"));
        }
        seen.push(index);
    }
    Ok(seen)
}

fn launch_rules(config: &JobConfig, out: &mut Vec<Diagnostic>) {
    let launch = &config.launch;
    let devices = match &launch.cuda_visible_devices {
        Some(text) => match parse_devices(text) {
            Ok(list) => Some(list),
            Err(d) => {
                out.push(d);
                None
            }
        },
        None => None,
    };
    if let Some(n) = launch.nproc_per_node {
        positive(out, "nproc_per_node", n, "1");
        if let Some(devices) = &devices {
            if n > 0 && !devices.is_empty() && n as usize != devices.len() {
                let count = devices.len();
                out.push(
                    Diagnostic::error(
                        "nproc_per_node",
                        "nproc_device_mismatch",
                        format!("nproc_per_node is {n} but CUDA_VISIBLE_DEVICES lists {count} GPUs; each process needs exactly one GPU"),
                        format!("nproc_per_node 为 {n}，但 CUDA_VISIBLE_DEVICES 列出了 {count} 张 GPU；每个进程必须对应一张 GPU"),
                    )
                    .with_fix(
                        format!("set --nproc_per_node {count}, or list {n} GPUs in CUDA_VISIBLE_DEVICES"),
                        format!("设置 --nproc_per_node {count}，或在 CUDA_VISIBLE_DEVICES 中列出 {n} 张 GPU"),
                    ),
                );
            }
        }
    } else if let Some(devices) = &devices {
        if devices.len() > 1 {
            let count = devices.len();
            out.push(
                Diagnostic::warning(
                    "nproc_per_node",
                    "single_process_many_gpus",
                    format!("{count} GPUs are visible but only one process runs: the model is split across them layer by layer (slow), not trained data-parallel"),
                    format!("可见 {count} 张 GPU 但只启动一个进程：模型会按层切分到各卡上（较慢），而不是数据并行训练"),
                )
                .with_fix(
                    format!("set --nproc_per_node {count} (or NPROC_PER_NODE={count})"),
                    format!("设置 --nproc_per_node {count}（或 NPROC_PER_NODE={count}）"),
                ),
            );
        }
    }
    let port = launch.master_port;
    if !(1..=65535).contains(&port) {
        out.push(
            Diagnostic::error(
                "master_port",
                "port_out_of_range",
                format!("master_port {port} is not a TCP port (1–65535)"),
                format!("master_port {port} 不是有效的 TCP 端口（1–65535）"),
            )
            .with_fix(
                "use the default 29500 or another free port",
                "使用默认的 29500 或其他空闲端口",
            ),
        );
    } else if port < 1024 {
        out.push(
            Diagnostic::warning(
                "master_port",
                "port_privileged",
                format!("master_port {port} is below 1024: binding it needs root and it may clash with a system service"),
                format!("master_port {port} 小于 1024：需要 root 权限，且可能与系统服务冲突"),
            )
            .with_fix("use 29500 or another port above 1024", "使用 29500 或其他大于 1024 的端口"),
        );
    }
    positive(out, "nnodes", launch.nnodes, "1");
    if launch.node_rank < 0 || (launch.nnodes > 0 && launch.node_rank >= launch.nnodes) {
        out.push(
            Diagnostic::error(
                "node_rank",
                "node_rank_out_of_range",
                format!(
                    "node_rank {} must be between 0 and nnodes-1 ({})",
                    launch.node_rank,
                    launch.nnodes - 1
                ),
                format!(
                    "node_rank {} 必须在 0 到 nnodes-1（{}）之间",
                    launch.node_rank,
                    launch.nnodes - 1
                ),
            )
            .with_fix(
                "number the nodes 0, 1, ... nnodes-1",
                "节点编号为 0, 1, ... nnodes-1",
            ),
        );
    }
    if launch.master_addr.trim().is_empty() {
        out.push(
            Diagnostic::error(
                "master_addr",
                "empty_value",
                "master_addr is empty",
                "master_addr 为空",
            )
            .with_fix(
                "use 127.0.0.1 on one machine, or rank 0's address",
                "单机使用 127.0.0.1，多机填写 rank 0 所在机器的地址",
            ),
        );
    }
    for name in launch.env.keys() {
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !valid {
            out.push(
                Diagnostic::error(
                    "env",
                    "env_name_invalid",
                    format!(
                        "`{}` is not a valid environment variable name",
                        shorten(name)
                    ),
                    format!("`{}` 不是合法的环境变量名", shorten(name)),
                )
                .with_fix(
                    "use letters, digits and _ (not starting with a digit)",
                    "只用字母、数字和下划线，且不以数字开头",
                ),
            );
        }
    }
}

fn model_rules(
    config: &JobConfig,
    facts: Option<&ModelFacts>,
    context: &CheckContext,
    out: &mut Vec<Diagnostic>,
) {
    let sft = &config.sft;
    match sft.model.as_deref().map(str::trim) {
        None | Some("") => out.push(
            Diagnostic::error("model", "model_missing", "no model is set", "没有设置模型")
                .with_fix("set --model Qwen/Qwen3-8B (a hub id) or a local folder", "设置 --model Qwen/Qwen3-8B（Hub ID）或本地目录"),
        ),
        Some(model) if facts.is_none() => out.push(
            Diagnostic::info(
                "model",
                "model_unknown",
                format!("`{}` is not in the built-in catalog, so memory and disk are not estimated here", shorten(model)),
                format!("`{}` 不在内置模型目录中，因此这里不估算显存和磁盘", shorten(model)),
            )
            .with_fix("`whet check` on a local model folder reads its config.json", "对本地模型目录运行 `whet check` 会读取其 config.json"),
        ),
        Some(_) => {}
    }
    let dtype = sft.torch_dtype.or(facts.and_then(|f| f.torch_dtype));
    if dtype == Some(TorchDtype::Bfloat16) && !context.gpu.supports_bf16 {
        out.push(
            Diagnostic::warning(
                "torch_dtype",
                "bf16_unsupported_gpu",
                format!("{} has no bfloat16 support (it needs an Ampere or newer GPU); the run will stop at start", context.gpu.name),
                format!("{} 不支持 bfloat16（需要 Ampere 及以上架构）；训练启动时会报错", context.gpu.name),
            )
            .with_fix("use --torch_dtype float16 (or float32) on this GPU", "在该 GPU 上使用 --torch_dtype float16（或 float32）"),
        );
    }
    if let Some(template) = &sft.template {
        if !TEMPLATES.contains(&template.as_str()) {
            // The parser checks choices; a config built in code may still hold anything.
            let hint = closest_word(template, TEMPLATES.iter().copied()).unwrap_or("qwen3");
            out.push(
                Diagnostic::error(
                    "template",
                    "template_unknown",
                    format!("template `{}` is not one whet renders", shorten(template)),
                    format!("whet 不支持模板 `{}`", shorten(template)),
                )
                .with_fix(
                    format!("use `{hint}`, or unset it to pick from the model"),
                    format!("改为 `{hint}`，或不设置以根据模型自动选择"),
                ),
            );
        }
    }
    if let (Some(facts), Some(template)) = (facts, &sft.template) {
        if facts.template == "qwen3_thinking" && template != "qwen3_thinking" {
            out.push(
                Diagnostic::warning(
                    "template",
                    "template_mismatch",
                    format!("{} is a thinking model (template qwen3_thinking) but the config uses `{template}`", facts.name),
                    format!("{} 是思考模型（模板 qwen3_thinking），但配置使用了 `{template}`", facts.name),
                )
                .with_fix("unset --template to use the model's own", "不设置 --template，使用模型自带的模板"),
            );
        }
    }
    if let (Some(facts), Some(max_length)) = (facts, sft.max_length) {
        if max_length > facts.max_position_embeddings as i64 {
            out.push(
                Diagnostic::warning(
                    "max_length",
                    "max_length_over_model",
                    format!(
                        "max_length {max_length} is beyond what the model was trained for ({})",
                        facts.max_position_embeddings
                    ),
                    format!(
                        "max_length {max_length} 超过了模型支持的长度（{}）",
                        facts.max_position_embeddings
                    ),
                )
                .with_fix(
                    format!("set --max_length {} or less", facts.max_position_embeddings),
                    format!("设置 --max_length 不超过 {}", facts.max_position_embeddings),
                ),
            );
        }
    }
    if sft.packing
        && !matches!(
            sft.attn_impl.as_deref(),
            Some("flash_attn" | "flash_attention_2" | "flash_attention_3")
        )
    {
        out.push(
            Diagnostic::error(
                "packing",
                "packing_needs_flash_attn",
                "packing needs flash attention (ms-swift refuses it otherwise)",
                "packing 需要 flash attention（否则 ms-swift 会报错）",
            )
            .with_fix(
                "add --attn_impl flash_attn, or set --packing false",
                "添加 --attn_impl flash_attn，或设置 --packing false",
            ),
        );
    }
}

/// The bit widths ms-swift's `--quant_bits` accepts (`QuantizeArguments.quant_bits`, a
/// `Literal[1, 2, 3, 4, 8, 'float8']`; float8 belongs to quant_method fp8, which whet lacks).
const MS_SWIFT_QUANT_BITS: &[i64] = &[1, 2, 3, 4, 8];

/// The LoRA fields, which a full fine-tune ignores.
fn adapter_fields_set(sft: &SftConfig) -> Vec<&'static str> {
    let default = SftConfig::default();
    [
        ("lora_rank", sft.lora_rank != default.lora_rank),
        ("lora_alpha", sft.lora_alpha != default.lora_alpha),
        ("lora_dropout", sft.lora_dropout != default.lora_dropout),
        (
            "target_modules",
            sft.target_modules != default.target_modules,
        ),
        ("target_regex", sft.target_regex.is_some()),
        ("use_rslora", sft.use_rslora != default.use_rslora),
        ("lora_bias", sft.lora_bias != default.lora_bias),
        (
            "modules_to_save",
            sft.modules_to_save != default.modules_to_save,
        ),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect()
}

/// The bitsandbytes 4-bit fields set away from their defaults.
fn bnb_4bit_fields_set(sft: &SftConfig) -> Vec<&'static str> {
    let default = SftConfig::default();
    [
        (
            "bnb_4bit_quant_type",
            sft.bnb_4bit_quant_type != default.bnb_4bit_quant_type,
        ),
        (
            "bnb_4bit_use_double_quant",
            sft.bnb_4bit_use_double_quant != default.bnb_4bit_use_double_quant,
        ),
        (
            "bnb_4bit_compute_dtype",
            sft.bnb_4bit_compute_dtype.is_some(),
        ),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect()
}

fn tuner_rules(config: &JobConfig, facts: Option<&ModelFacts>, out: &mut Vec<Diagnostic>) {
    // Judge the canonical form: `qlora` is lora + quant_method bnb + quant_bits 4.
    let normalized = config.clone().normalized();
    let sft = &normalized.sft;
    if sft.is_adapter() {
        positive(out, "lora_rank", sft.lora_rank, "8");
        positive(out, "lora_alpha", sft.lora_alpha, "32");
        in_range(
            out,
            "lora_dropout",
            sft.lora_dropout,
            0.0,
            1.0,
            false,
            "0.05",
        );
        // The plan the engine builds the model by: a target_regex that does not compile or
        // a lora_bias it does not know is its diagnostic.
        match AdapterPlan::from_config(sft) {
            Err(diagnostic) => out.push(diagnostic),
            Ok(plan) => {
                if let Some(facts) = facts {
                    let counts = facts.adapter_counts(sft.lora_rank.max(1) as u64, &plan);
                    if counts.lora == 0 {
                        out.push(no_target_matched(sft, facts));
                    }
                }
            }
        }
    } else {
        for field in adapter_fields_set(sft) {
            out.push(
                Diagnostic::warning(
                    field,
                    "adapter_field_with_full",
                    format!("`{field}` only applies to LoRA and QLoRA; with tuner_type full it is ignored"),
                    format!("`{field}` 只用于 LoRA 和 QLoRA；tuner_type 为 full 时会被忽略"),
                )
                .with_fix(
                    format!("remove --{field}, or set --tuner_type lora"),
                    format!("删除 --{field}，或设置 --tuner_type lora"),
                ),
            );
        }
        if sft.quant_method.is_some() {
            out.push(
                Diagnostic::error(
                    "quant_method",
                    "quant_with_full",
                    "a quantised base cannot be fully fine-tuned: quantisation is for LoRA (QLoRA)",
                    "量化后的基座无法做全参数微调：量化只用于 LoRA（QLoRA）",
                )
                .with_fix("use --tuner_type lora with the quantisation, or remove --quant_method/--quant_bits", "配合量化使用 --tuner_type lora，或删除 --quant_method/--quant_bits"),
            );
        }
    }
    // ms-swift's QuantizeArguments.get_quantization_config: no quant_method, no quantisation;
    // bnb without quant_bits is "Please set the quant_bits"; bnb takes 4 or 8 bits only.
    match (sft.quant_method.as_deref(), sft.quant_bits) {
        (_, Some(bits)) if !MS_SWIFT_QUANT_BITS.contains(&bits) => out.push(
            Diagnostic::error(
                "quant_bits",
                "quant_bits_invalid",
                format!("quant_bits {bits} is not a bit width ms-swift accepts (1, 2, 3, 4 or 8)"),
                format!("quant_bits {bits} 不是 ms-swift 接受的位数（1、2、3、4 或 8）"),
            )
            .with_fix("use --quant_bits 4 (QLoRA)", "使用 --quant_bits 4（QLoRA）"),
        ),
        (Some(_), None) => out.push(
            Diagnostic::error(
                "quant_bits",
                "quant_bits_missing",
                "quant_method is set but quant_bits is not (ms-swift: \"Please set the quant_bits\")",
                "设置了 quant_method 但没有设置 quant_bits（ms-swift 会报 \"Please set the quant_bits\"）",
            )
            .with_fix("add --quant_bits 4", "添加 --quant_bits 4"),
        ),
        (Some(_), Some(8)) => out.push(
            Diagnostic::error(
                "quant_bits",
                "quant_bits_8_unsupported",
                "quant_bits 8 (bitsandbytes LLM.int8) is not implemented in whet, which quantises the base to 4 bits (QLoRA)",
                "whet 未实现 quant_bits 8（bitsandbytes LLM.int8），whet 只把基座量化为 4 位（QLoRA）",
            )
            .with_fix(
                "set --quant_bits 4 (NF4 QLoRA, about half the memory of 8-bit), or remove --quant_method/--quant_bits for LoRA on an unquantised base",
                "设置 --quant_bits 4（NF4 QLoRA，显存约为 8-bit 的一半），或删除 --quant_method/--quant_bits 在未量化的基座上训练 LoRA",
            ),
        ),
        (Some(method), Some(bits)) if bits != 4 => out.push(
            Diagnostic::error(
                "quant_bits",
                "quant_bits_invalid",
                format!("quant_method {method} does not support quant_bits {bits} (bitsandbytes quantises to 4 or 8 bits; whet to 4)"),
                format!("quant_method {method} 不支持 quant_bits {bits}（bitsandbytes 只支持 4 或 8 位，whet 只支持 4 位）"),
            )
            .with_fix("use --quant_bits 4", "使用 --quant_bits 4"),
        ),
        (None, Some(bits)) => out.push(
            Diagnostic::warning(
                "quant_method",
                "quant_method_missing",
                format!("quant_bits {bits} has no effect without quant_method: as in ms-swift, the base is not quantised"),
                format!("未设置 quant_method 时 quant_bits {bits} 不起作用：与 ms-swift 一样，基座不会被量化"),
            )
            .with_fix(
                "add --quant_method bnb (QLoRA), or remove --quant_bits",
                "添加 --quant_method bnb（QLoRA），或删除 --quant_bits",
            ),
        ),
        _ => {}
    }
    // With a quant_method set, the rules above already say what is wrong with quantising.
    if !sft.is_qlora() && sft.quant_method.is_none() {
        for field in bnb_4bit_fields_set(sft) {
            out.push(
                Diagnostic::warning(
                    field,
                    "bnb_4bit_without_quant",
                    format!("`{field}` has no effect: the base is not quantised to 4 bits"),
                    format!("`{field}` 不起作用：基座没有做 4-bit 量化"),
                )
                .with_fix(
                    format!("add --quant_method bnb --quant_bits 4 (QLoRA), or remove --{field}"),
                    format!("添加 --quant_method bnb --quant_bits 4（QLoRA），或删除 --{field}"),
                ),
            );
        }
    }
}

/// PEFT refuses a LoRA config that adapts no module: "Target modules ... not found in the
/// base model".
fn no_target_matched(sft: &SftConfig, facts: &ModelFacts) -> Diagnostic {
    let (field, what) = match sft.target_regex.as_deref().filter(|p| !p.is_empty()) {
        Some(pattern) => (
            "target_regex",
            format!("target_regex `{}`", shorten(pattern)),
        ),
        None => (
            "target_modules",
            format!(
                "target_modules `{}`",
                shorten(&sft.target_modules.join(" "))
            ),
        ),
    };
    Diagnostic::error(
        field,
        "target_modules_unmatched",
        format!("{what} matches no linear layer of {}, so LoRA would train nothing (PEFT: \"Target modules not found in the base model\")", facts.name),
        format!("{what} 没有匹配 {} 的任何线性层，LoRA 将不训练任何参数（PEFT 会报 \"Target modules not found in the base model\"）", facts.name),
    )
    .with_fix(
        "use --target_modules all-linear, or names such as q_proj v_proj (a regex must match whole names like model.layers.0.self_attn.q_proj)",
        "使用 --target_modules all-linear，或 q_proj v_proj 等名称（正则需匹配完整模块名，如 model.layers.0.self_attn.q_proj）",
    )
}

fn data_rules(config: &JobConfig, out: &mut Vec<Diagnostic>) {
    let sft = &config.sft;
    if sft.dataset.is_empty() {
        out.push(
            Diagnostic::error(
                "dataset",
                "dataset_missing",
                "no training dataset is set",
                "没有设置训练数据集",
            )
            .with_fix(
                "add --dataset <hub id or file.jsonl>[#N]",
                "添加 --dataset <Hub ID 或 file.jsonl>[#N]",
            ),
        );
    }
    for (field, specs) in [("dataset", &sft.dataset), ("val_dataset", &sft.val_dataset)] {
        for spec in specs {
            if let Err(d) = DatasetSpec::parse(spec, field) {
                out.push(d);
            }
        }
    }
    in_range(
        out,
        "split_dataset_ratio",
        sft.split_dataset_ratio,
        0.0,
        1.0,
        false,
        "0.01",
    );
    if sft.split_dataset_ratio > 0.0 && !sft.val_dataset.is_empty() {
        out.push(
            Diagnostic::info(
                "split_dataset_ratio",
                "split_ignored",
                "val_dataset is set, so split_dataset_ratio is ignored (ms-swift sets it to 0)",
                "已设置 val_dataset，split_dataset_ratio 会被忽略（ms-swift 将其置为 0）",
            )
            .with_fix("remove --split_dataset_ratio", "删除 --split_dataset_ratio"),
        );
    }
    if let Some(max_length) = sft.max_length {
        positive(out, "max_length", max_length, "4096");
    }
    positive(out, "dataset_num_proc", sft.dataset_num_proc, "1");
    if sft.streaming && sft.max_steps <= 0 {
        out.push(
            Diagnostic::error(
                "max_steps",
                "streaming_needs_max_steps",
                "streaming data has no length, so max_steps must be set",
                "流式数据没有长度，必须设置 max_steps",
            )
            .with_fix(
                "add --max_steps 1000 (or set --streaming false)",
                "添加 --max_steps 1000（或设置 --streaming false）",
            ),
        );
    }
    for field in ["model_name", "model_author"] {
        let values = if field == "model_name" {
            &sft.model_name
        } else {
            &sft.model_author
        };
        if values.len() > 2 {
            out.push(
                Diagnostic::error(
                    field,
                    "too_many_values",
                    format!(
                        "`{field}` takes one or two values (Chinese, English), got {}",
                        values.len()
                    ),
                    format!(
                        "`{field}` 只接受一到两个值（中文、英文），当前为 {} 个",
                        values.len()
                    ),
                )
                .with_fix(
                    format!("write --{field} 小黄 'Xiao Huang'"),
                    format!("写成 --{field} 小黄 'Xiao Huang'"),
                ),
            );
        }
    }
    if let Some(workers) = sft.dataloader_num_workers {
        if workers < 0 {
            out.push(
                Diagnostic::error(
                    "dataloader_num_workers",
                    "must_not_be_negative",
                    format!("dataloader_num_workers must be 0 or more, got {workers}"),
                    format!("dataloader_num_workers 不能为负数，当前为 {workers}"),
                )
                .with_fix(
                    "set --dataloader_num_workers 4",
                    "设置 --dataloader_num_workers 4",
                ),
            );
        }
    }
}

fn training_rules(config: &JobConfig, derived: &Derived, out: &mut Vec<Diagnostic>) {
    let sft = &config.sft;
    positive(
        out,
        "per_device_train_batch_size",
        sft.per_device_train_batch_size,
        "1",
    );
    positive(
        out,
        "per_device_eval_batch_size",
        sft.per_device_eval_batch_size,
        "1",
    );
    if let Some(steps) = sft.gradient_accumulation_steps {
        positive(out, "gradient_accumulation_steps", steps, "8");
    }
    if sft.max_steps == 0 || sft.max_steps < -1 {
        out.push(
            Diagnostic::error(
                "max_steps",
                "max_steps_invalid",
                format!(
                    "max_steps must be -1 (use epochs) or at least 1, got {}",
                    sft.max_steps
                ),
                format!(
                    "max_steps 必须为 -1（按轮数）或至少为 1，当前为 {}",
                    sft.max_steps
                ),
            )
            .with_fix("set --max_steps -1", "设置 --max_steps -1"),
        );
    }
    if sft.max_steps <= 0 && sft.num_train_epochs <= 0.0 {
        out.push(
            Diagnostic::error(
                "num_train_epochs",
                "must_be_positive",
                format!(
                    "num_train_epochs must be more than 0, got {}",
                    format_float(sft.num_train_epochs)
                ),
                format!(
                    "num_train_epochs 必须大于 0，当前为 {}",
                    format_float(sft.num_train_epochs)
                ),
            )
            .with_fix("set --num_train_epochs 3", "设置 --num_train_epochs 3"),
        );
    }
    match sft.learning_rate {
        Some(lr) if lr <= 0.0 => out.push(
            Diagnostic::error(
                "learning_rate",
                "must_be_positive",
                format!(
                    "learning_rate must be more than 0, got {}",
                    format_float(lr)
                ),
                format!("learning_rate 必须大于 0，当前为 {}", format_float(lr)),
            )
            .with_fix(
                if sft.is_adapter() {
                    "set --learning_rate 1e-4"
                } else {
                    "set --learning_rate 1e-5"
                },
                if sft.is_adapter() {
                    "设置 --learning_rate 1e-4"
                } else {
                    "设置 --learning_rate 1e-5"
                },
            ),
        ),
        Some(lr) => {
            let (low, high, usual) = if sft.is_adapter() {
                (1e-6, 1e-3, "1e-4 to 5e-4")
            } else {
                (1e-7, 1e-4, "1e-5 to 5e-5")
            };
            if lr < low || lr > high {
                let kind = if sft.is_adapter() {
                    "LoRA"
                } else {
                    "full fine-tuning"
                };
                let kind_zh = if sft.is_adapter() {
                    "LoRA"
                } else {
                    "全参数微调"
                };
                out.push(
                    Diagnostic::warning(
                        "learning_rate",
                        "learning_rate_unusual",
                        format!(
                            "learning_rate {} is far from the usual {usual} for {kind}",
                            format_float(lr)
                        ),
                        format!(
                            "learning_rate {} 远离{kind_zh}常用的 {usual}",
                            format_float(lr)
                        ),
                    )
                    .with_fix(
                        format!("try a value in {usual}"),
                        format!("尝试 {usual} 之间的值"),
                    ),
                );
            }
        }
        None => {}
    }
    in_range(
        out,
        "warmup_ratio",
        sft.warmup_ratio,
        0.0,
        1.0,
        false,
        "0.1",
    );
    if sft.warmup_steps < 0 {
        out.push(
            Diagnostic::error(
                "warmup_steps",
                "must_not_be_negative",
                "warmup_steps must be 0 or more",
                "warmup_steps 不能为负数",
            )
            .with_fix("set --warmup_steps 0", "设置 --warmup_steps 0"),
        );
    }
    if sft.warmup_ratio > 0.0 && sft.warmup_steps > 0 {
        out.push(
            Diagnostic::error(
                "warmup_steps",
                "warmup_both_set",
                "warmup_ratio and warmup_steps are both set (ms-swift 4.5+ refuses this)",
                "同时设置了 warmup_ratio 和 warmup_steps（ms-swift 4.5+ 会报错）",
            )
            .with_fix(
                "keep one: remove --warmup_steps or --warmup_ratio",
                "二选一：删除 --warmup_steps 或 --warmup_ratio",
            ),
        );
    }
    if let (Some(warmup), Some(total)) = (derived.warmup_steps, derived.total_steps) {
        if total > 0 && warmup >= total {
            out.push(Diagnostic::warning(
                "warmup_ratio",
                "warmup_whole_run",
                format!("warm-up lasts {warmup} steps but the run has only {total}: the learning rate never reaches its peak"),
                format!("预热 {warmup} 步，但训练总共只有 {total} 步：学习率达不到峰值"),
            ).with_fix("lower --warmup_ratio (0.05–0.1 is common)", "降低 --warmup_ratio（常用 0.05–0.1）"));
        }
    }
    in_range(out, "weight_decay", sft.weight_decay, 0.0, 1.0, true, "0.1");
    in_range(out, "adam_beta1", sft.adam_beta1, 0.0, 1.0, false, "0.9");
    in_range(out, "adam_beta2", sft.adam_beta2, 0.0, 1.0, false, "0.95");
    if sft.adam_epsilon <= 0.0 {
        out.push(
            Diagnostic::error(
                "adam_epsilon",
                "must_be_positive",
                "adam_epsilon must be more than 0",
                "adam_epsilon 必须大于 0",
            )
            .with_fix("set --adam_epsilon 1e-8", "设置 --adam_epsilon 1e-8"),
        );
    }
    if sft.max_grad_norm < 0.0 {
        out.push(
            Diagnostic::error(
                "max_grad_norm",
                "must_not_be_negative",
                "max_grad_norm must be 0 (no clipping) or more",
                "max_grad_norm 必须大于等于 0（0 表示不裁剪）",
            )
            .with_fix("set --max_grad_norm 1.0", "设置 --max_grad_norm 1.0"),
        );
    }
    if sft.seed < 0 || sft.data_seed < 0 {
        let field = if sft.seed < 0 { "seed" } else { "data_seed" };
        out.push(
            Diagnostic::error(
                field,
                "must_not_be_negative",
                format!("{field} must be 0 or more"),
                format!("{field} 不能为负数"),
            )
            .with_fix(format!("set --{field} 42"), format!("设置 --{field} 42")),
        );
    }
    if sft.router_aux_loss_coef < 0.0 {
        out.push(
            Diagnostic::error(
                "router_aux_loss_coef",
                "must_not_be_negative",
                "router_aux_loss_coef must be 0 or more",
                "router_aux_loss_coef 不能为负数",
            )
            .with_fix(
                "set --router_aux_loss_coef 0.001",
                "设置 --router_aux_loss_coef 0.001",
            ),
        );
    }
    if sft.lr_scheduler_type == crate::config::LrSchedulerType::CosineWithMinLr {
        let kwargs: Option<serde_json::Value> = sft
            .lr_scheduler_kwargs
            .as_deref()
            .and_then(|k| serde_json::from_str(k).ok());
        let has = |key: &str| {
            kwargs
                .as_ref()
                .is_some_and(|k| k.get(key).is_some_and(|v| v.is_number()))
        };
        if has("min_lr") == has("min_lr_rate") {
            out.push(Diagnostic::error(
                "lr_scheduler_kwargs",
                "min_lr_missing",
                "cosine_with_min_lr needs exactly one of min_lr and min_lr_rate in lr_scheduler_kwargs",
                "cosine_with_min_lr 需要在 lr_scheduler_kwargs 中给出 min_lr 或 min_lr_rate（二选一）",
            ).with_fix("add --lr_scheduler_kwargs '{\"min_lr\": 1e-6}'", "添加 --lr_scheduler_kwargs '{\"min_lr\": 1e-6}'"));
        }
    }
    if let Some(kwargs) = &sft.lr_scheduler_kwargs {
        if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(kwargs).is_err() {
            out.push(
                Diagnostic::error(
                    "lr_scheduler_kwargs",
                    "json_invalid",
                    format!(
                        "lr_scheduler_kwargs `{}` is not a JSON object",
                        shorten(kwargs)
                    ),
                    format!("lr_scheduler_kwargs `{}` 不是 JSON 对象", shorten(kwargs)),
                )
                .with_fix(
                    "write it as '{\"min_lr\": 1e-6}'",
                    "写成 '{\"min_lr\": 1e-6}'",
                ),
            );
        }
    }
}

fn eval_save_rules(config: &JobConfig, derived: &Derived, out: &mut Vec<Diagnostic>) {
    let sft = &config.sft;
    let requested_eval = sft.eval_strategy.unwrap_or(sft.save_strategy);
    if requested_eval != IntervalStrategy::No && !derive::has_validation_source(config) {
        out.push(
            Diagnostic::warning(
                "eval_strategy",
                "eval_disabled_no_val",
                format!("evaluation is {} but there is no validation data (no val_dataset, split_dataset_ratio 0): ms-swift turns evaluation off silently and eval_loss is never logged", if sft.eval_strategy.is_some() { format!("set to `{}`", requested_eval.as_str()) } else { "on by default".into() }),
                "已开启评估，但没有验证集（未设置 val_dataset，split_dataset_ratio 为 0）：ms-swift 会静默关闭评估，永远不会记录 eval_loss".to_string(),
            )
            .with_fix("add --split_dataset_ratio 0.01 (hold out 1%) or --val_dataset <file>; or set --eval_strategy no", "添加 --split_dataset_ratio 0.01（划出 1%）或 --val_dataset <文件>；或设置 --eval_strategy no"),
        );
    }
    if let Some(steps) = sft.eval_steps {
        positive(out, "eval_steps", steps, "50");
    } else if derive::eval_strategy(config) == IntervalStrategy::Steps && sft.save_steps < 1 {
        // eval_steps follows save_steps, which an epoch save strategy may leave at 0.
        out.push(
            Diagnostic::error(
                "eval_steps",
                "eval_steps_missing",
                format!("eval_strategy is steps but eval_steps is unset and save_steps ({}) gives no interval", sft.save_steps),
                format!("eval_strategy 为 steps，但未设置 eval_steps，且 save_steps（{}）不是有效间隔", sft.save_steps),
            )
            .with_fix("set --eval_steps 50 (or --eval_strategy epoch)", "设置 --eval_steps 50（或 --eval_strategy epoch）"),
        );
    }
    if sft.save_strategy == IntervalStrategy::Steps {
        positive(out, "save_steps", sft.save_steps, "50");
    }
    positive(out, "logging_steps", sft.logging_steps, "5");
    if sft.eval_strategy == Some(IntervalStrategy::Steps)
        && sft.eval_steps.is_none()
        && derive::has_validation_source(config)
    {
        out.push(
            Diagnostic::info(
                "eval_steps",
                "eval_steps_follows_save",
                format!(
                    "eval_steps is unset, so evaluation runs every save_steps ({}) steps",
                    sft.save_steps
                ),
                format!(
                    "未设置 eval_steps，将每 save_steps（{}）步评估一次",
                    sft.save_steps
                ),
            )
            .with_fix("set --eval_steps explicitly", "显式设置 --eval_steps"),
        );
    }
    match sft.save_total_limit {
        Some(-1) => out.push(
            Diagnostic::info(
                "save_total_limit",
                "save_total_limit_all",
                "save_total_limit -1 keeps every checkpoint",
                "save_total_limit 为 -1 表示保留所有检查点",
            )
            .with_fix("leave it unset to keep all", "不设置即保留全部"),
        ),
        Some(limit) if limit < 1 => out.push(
            Diagnostic::error(
                "save_total_limit",
                "must_be_positive",
                format!("save_total_limit must be at least 1, got {limit}"),
                format!("save_total_limit 至少为 1，当前为 {limit}"),
            )
            .with_fix(
                "set --save_total_limit 2 (best + latest), or leave it unset to keep all",
                "设置 --save_total_limit 2（最佳 + 最新），或不设置以全部保留",
            ),
        ),
        _ => {}
    }
    if sft.load_best_model_at_end {
        let eval = derive::eval_strategy(config);
        if eval == IntervalStrategy::No {
            out.push(Diagnostic::error("load_best_model_at_end", "best_without_eval", "load_best_model_at_end needs evaluation, which is off", "load_best_model_at_end 需要评估，但评估已关闭").with_fix("add a validation set (--split_dataset_ratio 0.01) or set --load_best_model_at_end false", "添加验证集（--split_dataset_ratio 0.01）或设置 --load_best_model_at_end false"));
        } else if eval != sft.save_strategy {
            out.push(Diagnostic::error("load_best_model_at_end", "best_strategy_mismatch", format!("load_best_model_at_end needs eval_strategy ({}) to equal save_strategy ({})", eval.as_str(), sft.save_strategy.as_str()), format!("load_best_model_at_end 要求 eval_strategy（{}）与 save_strategy（{}）一致", eval.as_str(), sft.save_strategy.as_str())).with_fix("use the same strategy for both", "两者使用相同的策略"));
        } else if eval == IntervalStrategy::Steps {
            if let Some(eval_steps) = derived.eval_steps {
                if eval_steps > 0
                    && sft.save_steps > 0
                    && !(sft.save_steps as u64).is_multiple_of(eval_steps)
                {
                    out.push(Diagnostic::error("save_steps", "save_not_multiple_of_eval", format!("with load_best_model_at_end, save_steps ({}) must be a multiple of eval_steps ({eval_steps})", sft.save_steps), format!("开启 load_best_model_at_end 时，save_steps（{}）必须是 eval_steps（{eval_steps}）的整数倍", sft.save_steps)).with_fix(format!("set --save_steps {}", eval_steps * (sft.save_steps as u64 / eval_steps).max(1)), format!("设置 --save_steps {}", eval_steps * (sft.save_steps as u64 / eval_steps).max(1))));
                }
            }
        }
    }
    if let Some(total) = derived.total_steps {
        if sft.save_strategy == IntervalStrategy::Steps
            && sft.save_steps > 0
            && sft.save_steps as u64 > total
        {
            out.push(
                Diagnostic::warning(
                    "save_steps",
                    "save_after_end",
                    format!("save_steps is {} but the run has only {total} steps: no checkpoint is written before the end, so a crash loses the whole run", sft.save_steps),
                    format!("save_steps 为 {}，但训练只有 {total} 步：结束前不会保存任何检查点，中途崩溃将丢失全部训练", sft.save_steps),
                )
                .with_fix(format!("set --save_steps {} (or lower)", (total / 3).max(1)), format!("设置 --save_steps {}（或更小）", (total / 3).max(1))),
            );
        }
        if derived.eval_strategy == "steps" {
            if let Some(eval_steps) = derived.eval_steps {
                if eval_steps > total {
                    out.push(Diagnostic::warning("eval_steps", "eval_after_end", format!("eval_steps is {eval_steps} but the run has only {total} steps: evaluation runs only at the end"), format!("eval_steps 为 {eval_steps}，但训练只有 {total} 步：只会在结束时评估一次")).with_fix(format!("set --eval_steps {}", (total / 3).max(1)), format!("设置 --eval_steps {}", (total / 3).max(1))));
                }
            }
        }
    }
    if let Err(unknown) = derive::best_metric(config) {
        out.push(unknown);
    }
    if sft.resume_only_model && sft.resume_from_checkpoint.is_none() {
        out.push(
            Diagnostic::warning(
                "resume_only_model",
                "resume_only_model_alone",
                "resume_only_model does nothing without resume_from_checkpoint",
                "未设置 resume_from_checkpoint 时 resume_only_model 不起作用",
            )
            .with_fix(
                "add --resume_from_checkpoint <checkpoint dir>",
                "添加 --resume_from_checkpoint <检查点目录>",
            ),
        );
    }
}

fn distributed_rules(config: &JobConfig, out: &mut Vec<Diagnostic>) {
    let sft = &config.sft;
    let Some(deepspeed) = &sft.deepspeed else {
        return;
    };
    let zero = if deepspeed.trim_start().starts_with('{') {
        match ZeroSettings::from_json(deepspeed) {
            Ok(z) => Some(z),
            Err(message) => {
                out.push(
                    Diagnostic::error(
                        "deepspeed",
                        "deepspeed_invalid",
                        format!("the inline DeepSpeed config is unusable: {message}"),
                        format!("内联 DeepSpeed 配置不可用：{message}"),
                    )
                    .with_fix("use a preset such as zero2", "使用 zero2 等预设"),
                );
                None
            }
        }
    } else if let Some(z) = ZeroSettings::from_preset(deepspeed) {
        Some(z)
    } else if deepspeed.to_ascii_lowercase().ends_with(".json") {
        None // a file: the engine reads it
    } else {
        let hint = closest_word(deepspeed, DEEPSPEED_PRESETS.iter().copied()).unwrap_or("zero2");
        out.push(
            Diagnostic::error(
                "deepspeed",
                "deepspeed_unknown",
                format!(
                    "`{}` is neither a DeepSpeed preset nor a .json file",
                    shorten(deepspeed)
                ),
                format!(
                    "`{}` 既不是 DeepSpeed 预设，也不是 .json 文件",
                    shorten(deepspeed)
                ),
            )
            .with_fix(
                format!("use `{hint}` (presets: {})", DEEPSPEED_PRESETS.join(", ")),
                format!("改为 `{hint}`（预设：{}）", DEEPSPEED_PRESETS.join(", ")),
            ),
        );
        None
    };
    if let Some(zero) = zero {
        // ms-swift 4.x has no up-front rule for this pair (sft_args.py `_init_deepspeed` and
        // quant_args.py `get_quantization_config` both accept it); the run itself fails
        // (modelscope/ms-swift#8267 "qlora+zero3报错", a Qwen2.5-7B bnb 4-bit run with
        // --deepspeed zero3; DeepSpeed and bitsandbytes: huggingface/peft#2014,
        // deepspeedai/DeepSpeed#3620), and its multi-GPU QLoRA example uses FSDP
        // (examples/train/multi-gpu/fsdp_qlora). whet refuses the pair before any work.
        if zero.stage == 3 && sft.is_qlora() {
            out.push(
                Diagnostic::error(
                    "deepspeed",
                    "qlora_zero3",
                    "QLoRA's 4-bit base cannot be sharded by ZeRO-3 (ms-swift fails loading the model)",
                    "QLoRA 的 4-bit 基座无法用 ZeRO-3 分片（ms-swift 会在加载模型时报错）",
                )
                .with_fix(
                    "use --deepspeed zero2 with QLoRA, or plain LoRA with zero3",
                    "QLoRA 请使用 --deepspeed zero2，或改用普通 LoRA 配合 zero3",
                ),
            );
        }
    }
    if derive::world_size(config) == 1 {
        out.push(
            Diagnostic::warning(
                "deepspeed",
                "deepspeed_single_process",
                format!(
                    "--deepspeed {} has no effect with a single process: whet trains it as plain single-process training (nothing is sharded or offloaded)",
                    shorten(deepspeed)
                ),
                format!(
                    "只有一个进程时 --deepspeed {} 不起作用：whet 按普通单进程训练（不分片，也不 offload）",
                    shorten(deepspeed)
                ),
            )
            .with_fix(
                "set --nproc_per_node to the number of GPUs, or remove --deepspeed",
                "将 --nproc_per_node 设为 GPU 数量，或删除 --deepspeed",
            ),
        );
    }
}

fn memory_rules(
    config: &JobConfig,
    facts: Option<&ModelFacts>,
    derived: &Derived,
    context: &CheckContext,
    out: &mut Vec<Diagnostic>,
) {
    let (Some(facts), Some(estimate)) = (facts, &derived.memory) else {
        return;
    };
    let capacity = context.gpu.memory_gib;
    if estimate.per_gpu_gib <= capacity {
        return;
    }
    let remedies = oom_remedies(config, facts);
    let list_en = numbered_remedies(&remedies);
    let list_zh: Vec<String> = remedies
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "{}) {}（减少 {:.1} GiB，约 {:.1} GiB）",
                i + 1,
                r.change,
                r.saves_gib,
                r.per_gpu_gib
            )
        })
        .collect();
    out.push(
        Diagnostic::warning(
            "memory",
            "memory_over_gpu",
            format!("estimated {:.1} GiB per GPU exceeds the {:.0} GiB of {}: expect an out-of-memory error", estimate.per_gpu_gib, capacity, context.gpu.name),
            format!("估计每张 GPU 需要 {:.1} GiB，超过 {} 的 {:.0} GiB：很可能显存不足（OOM）", estimate.per_gpu_gib, context.gpu.name, capacity),
        )
        .with_fix(
            if list_en.is_empty() { "use more GPUs or a smaller model".to_string() } else { format!("largest savings first: {}", list_en.join("; ")) },
            if list_zh.is_empty() { "使用更多 GPU 或更小的模型".to_string() } else { format!("按节省显存从多到少：{}", list_zh.join("；")) },
        ),
    );
}

/// `1) change (-saved GiB -> per-GPU GiB)` for each remedy, in order (English).
pub fn numbered_remedies(remedies: &[Remedy]) -> Vec<String> {
    remedies
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "{}) {} (-{:.1} GiB -> {:.1} GiB)",
                i + 1,
                r.change,
                r.saves_gib,
                r.per_gpu_gib
            )
        })
        .collect()
}

/// One change from the seed's OOM list with what it saves on this config.
#[derive(Debug, Clone, PartialEq)]
pub struct Remedy {
    pub change: String,
    pub saves_gib: f64,
    pub per_gpu_gib: f64,
}

/// The seed's out-of-memory remedies that apply, ordered by how much each saves here.
pub fn oom_remedies(config: &JobConfig, facts: &ModelFacts) -> Vec<Remedy> {
    let world = derive::world_size(config);
    let estimate_for = |c: &JobConfig| {
        memory::estimate(
            &c.sft,
            facts,
            Sharding {
                world_size: world,
                zero: c.sft.zero().unwrap_or_else(ZeroSettings::none),
            },
        )
        .per_gpu_gib
    };
    let current = estimate_for(config);
    let mut candidates: Vec<(String, JobConfig)> = Vec::new();
    let mut with = |label: String, change: &dyn Fn(&mut JobConfig)| {
        let mut c = config.clone();
        change(&mut c);
        candidates.push((label, c));
    };
    if config.sft.per_device_train_batch_size > 1 {
        let accumulation = derive::gradient_accumulation_steps(config)
            * config.sft.per_device_train_batch_size as u64;
        with(
            format!("--per_device_train_batch_size 1 --gradient_accumulation_steps {accumulation}"),
            &|c| {
                c.sft.gradient_accumulation_steps = Some(accumulation as i64);
                c.sft.per_device_train_batch_size = 1;
            },
        );
    }
    if config.sft.max_length.is_none_or(|l| l > 2048) {
        with("--max_length 2048".into(), &|c| {
            c.sft.max_length = Some(2048)
        });
    }
    if !config.sft.gradient_checkpointing {
        with("--gradient_checkpointing true".into(), &|c| {
            c.sft.gradient_checkpointing = true
        });
    }
    let zero = config.sft.zero().unwrap_or_else(ZeroSettings::none);
    if world > 1 && zero.stage < 3 && !config.sft.is_qlora() {
        with("--deepspeed zero3".into(), &|c| {
            c.sft.deepspeed = Some("zero3".into())
        });
    }
    let fully_offloaded = zero.stage == 3 && zero.offload_param;
    if !fully_offloaded && !config.sft.is_qlora() {
        with("--deepspeed zero3_offload".into(), &|c| {
            c.sft.deepspeed = Some("zero3_offload".into())
        });
    }
    if !config.sft.is_adapter() {
        with("--tuner_type lora".into(), &|c| {
            c.sft.tuner_type = crate::config::TunerType::Lora;
            c.sft.learning_rate = Some(1e-4);
        });
    }
    if !config.sft.is_qlora() {
        with(
            "--tuner_type lora --quant_method bnb --quant_bits 4 (QLoRA)".into(),
            &|c| {
                c.sft.tuner_type = crate::config::TunerType::Lora;
                c.sft.quant_method = Some("bnb".into());
                c.sft.quant_bits = Some(4);
                if c.sft.zero().is_some_and(|z| z.stage == 3) {
                    c.sft.deepspeed = Some("zero2".into());
                }
            },
        );
    }
    let mut remedies: Vec<Remedy> = candidates
        .into_iter()
        .map(|(change, c)| {
            let per_gpu = estimate_for(&c);
            Remedy {
                change,
                saves_gib: current - per_gpu,
                per_gpu_gib: per_gpu,
            }
        })
        .filter(|r| r.saves_gib > 0.05)
        .collect();
    remedies.sort_by(|a, b| b.saves_gib.total_cmp(&a.saves_gib));
    remedies
}
