//! The field registry: every config field with its flag name, type, section, group and help in
//! English and Chinese. It drives the shell parser (which flags exist and how to read their
//! values), the exporters (what to print), config files and the studio's form.
//! A test checks that it lists exactly the fields of `LaunchConfig` and `SftConfig`.

/// Where a field's value lives in `JobConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Launch,
    Sft,
}

/// The studio's sections, following the seed's parameter guide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Environment,
    Launcher,
    Model,
    Tuner,
    Dataset,
    Hyperparameters,
    EvalSave,
    DataLoading,
    ModelIdentity,
    Distributed,
}

impl Group {
    pub const ALL: [Group; 10] = [
        Group::Environment,
        Group::Launcher,
        Group::Model,
        Group::Tuner,
        Group::Dataset,
        Group::Hyperparameters,
        Group::EvalSave,
        Group::DataLoading,
        Group::ModelIdentity,
        Group::Distributed,
    ];

    pub fn title_en(self) -> &'static str {
        match self {
            Group::Environment => "Environment",
            Group::Launcher => "Launcher (torchrun)",
            Group::Model => "Model",
            Group::Tuner => "Tuner",
            Group::Dataset => "Dataset",
            Group::Hyperparameters => "Hyper-parameters",
            Group::EvalSave => "Evaluation, saving and logging",
            Group::DataLoading => "Data loading",
            Group::ModelIdentity => "Model identity",
            Group::Distributed => "Distributed optimisation",
        }
    }

    pub fn title_zh(self) -> &'static str {
        match self {
            Group::Environment => "环境变量",
            Group::Launcher => "启动器（torchrun）",
            Group::Model => "模型",
            Group::Tuner => "微调方式",
            Group::Dataset => "数据集",
            Group::Hyperparameters => "训练超参数",
            Group::EvalSave => "评估、保存与日志",
            Group::DataLoading => "数据加载",
            Group::ModelIdentity => "模型元信息",
            Group::Distributed => "分布式优化",
        }
    }
}

/// How a field's value is written on a command line and stored in JSON.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// true/false/yes/no/1/0, or the bare flag for true.
    Bool,
    Int,
    Float,
    Str,
    /// One or more values after one flag: `--dataset a#5000 b#3000 c`.
    List,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
}

/// One config field.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The flag name (ms-swift's), also the JSON key.
    pub name: &'static str,
    /// Other spellings accepted on input (`train_type` for `tuner_type`).
    pub aliases: &'static [&'static str],
    pub section: Section,
    pub group: Group,
    pub kind: Kind,
    /// `null` is a valid value ("auto" / unset).
    pub optional: bool,
    /// The environment variable that sets it, for launcher fields.
    pub env: Option<&'static str>,
    /// Whether `--name` is accepted as a flag (CUDA_VISIBLE_DEVICES is only an environment variable).
    pub is_flag: bool,
    pub help_en: &'static str,
    pub help_zh: &'static str,
}

pub const TUNER_TYPES: &[&str] = &["full", "lora", "qlora"];
pub const DTYPES: &[&str] = &[
    TorchDtype::Float32.as_str(),
    TorchDtype::Float16.as_str(),
    TorchDtype::Bfloat16.as_str(),
];
pub const SCHEDULERS: &[&str] = &[
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "cosine_with_min_lr",
];
pub const INTERVALS: &[&str] = &["no", "steps", "epoch"];
pub const TRUNCATIONS: &[&str] = &["delete", "left", "right"];
pub const ATTN_IMPLS: &[&str] = &[
    "sdpa",
    "eager",
    "flash_attn",
    "flash_attention_2",
    "flash_attention_3",
];
pub const QUANT_METHODS: &[&str] = &["bnb"];
pub const LORA_BIAS: &[&str] = &["none", "all"];
pub const BNB_QUANT_TYPES: &[&str] = &["nf4", "fp4"];
pub const TEMPLATES: &[&str] = &["qwen3", "qwen3_thinking", "qwen3_nothinking", "qwen2_5"];

const fn launch(
    name: &'static str,
    group: Group,
    kind: Kind,
    optional: bool,
    env: Option<&'static str>,
    help_en: &'static str,
    help_zh: &'static str,
) -> Field {
    Field {
        name,
        aliases: &[],
        section: Section::Launch,
        group,
        kind,
        optional,
        env,
        is_flag: true,
        help_en,
        help_zh,
    }
}

const fn sft(
    name: &'static str,
    group: Group,
    kind: Kind,
    optional: bool,
    help_en: &'static str,
    help_zh: &'static str,
) -> Field {
    Field {
        name,
        aliases: &[],
        section: Section::Sft,
        group,
        kind,
        optional,
        env: None,
        is_flag: true,
        help_en,
        help_zh,
    }
}

use crate::config::TorchDtype;
use Group as G;
use Kind as K;

/// Every field, in the order the studio and the exporters show them.
pub const FIELDS: &[Field] = &[
    Field {
        is_flag: false,
        ..launch(
            "cuda_visible_devices",
            G::Environment,
            K::Str,
            true,
            Some("CUDA_VISIBLE_DEVICES"),
            "Which GPUs the job may use, by index as nvidia-smi lists them (e.g. 0,1,2,3,4). Unset: all GPUs; empty: CPU only. Devices are renumbered from 0 inside the job.",
            "指定任务可见的 GPU 编号（与 nvidia-smi 一致，如 0,1,2,3,4）。不设置：使用全部 GPU；设为空：只用 CPU。任务内部会从 0 重新编号。",
        )
    },
    launch(
        "nproc_per_node",
        G::Launcher,
        K::Int,
        true,
        Some("NPROC_PER_NODE"),
        "Processes to start on this machine, one per GPU. Must equal the number of devices in CUDA_VISIBLE_DEVICES. Unset: a single process.",
        "每台机器启动的进程数，通常一张 GPU 一个进程，必须等于 CUDA_VISIBLE_DEVICES 中的 GPU 数量。不设置则只启动一个进程。",
    ),
    launch(
        "master_port",
        G::Launcher,
        K::Int,
        false,
        Some("MASTER_PORT"),
        "TCP port where the processes meet (rank 0 listens). Change it (29501, 29502, ...) if 'Address already in use'.",
        "分布式进程通信所用的端口（由 rank 0 监听）。若报错 Address already in use，请换一个端口，如 29501、29502。",
    ),
    launch(
        "nnodes",
        G::Launcher,
        K::Int,
        false,
        Some("NNODES"),
        "Number of machines taking part in the job.",
        "参与训练的机器（节点）数量。",
    ),
    launch(
        "node_rank",
        G::Launcher,
        K::Int,
        false,
        Some("NODE_RANK"),
        "Index of this machine among the nodes (0 .. nnodes-1).",
        "当前机器在所有节点中的序号（0 到 nnodes-1）。",
    ),
    launch(
        "master_addr",
        G::Launcher,
        K::Str,
        false,
        Some("MASTER_ADDR"),
        "Address of the node running rank 0.",
        "运行 rank 0 的节点地址。",
    ),
    sft(
        "model",
        G::Model,
        K::Str,
        true,
        "The base model: a Hugging Face hub id (Qwen/Qwen3-8B) or a local folder with config.json and safetensors.",
        "要微调的基座模型：Hugging Face 模型 ID（如 Qwen/Qwen3-8B）或包含 config.json 与 safetensors 的本地目录。",
    ),
    sft(
        "model_type",
        G::Model,
        K::Str,
        true,
        "Model family (qwen3, qwen3_moe, qwen2_5). Unset: detected from the model name or config.json.",
        "模型类型（qwen3、qwen3_moe、qwen2_5）。不设置则根据模型名或 config.json 自动识别。",
    ),
    sft(
        "model_revision",
        G::Model,
        K::Str,
        true,
        "Hub revision (branch, tag or commit) of the model to download.",
        "从 Hub 下载模型时使用的版本（分支、标签或提交）。",
    ),
    sft(
        "torch_dtype",
        G::Model,
        K::Choice(DTYPES),
        true,
        "Precision of weights and compute. bfloat16 is the usual choice (needs an Ampere or newer GPU); float16 can overflow; float32 is exact but twice the memory. Unset: the model's own dtype.",
        "模型权重与计算的精度。通常选 bfloat16（需要 Ampere 及以上架构的 GPU）；float16 可能溢出；float32 最稳定但显存翻倍。不设置则使用模型自带的精度。",
    ),
    sft(
        "attn_impl",
        G::Model,
        K::Choice(ATTN_IMPLS),
        true,
        "Attention kernel: sdpa, eager or flash attention. Packing needs flash attention.",
        "注意力实现：sdpa、eager 或 flash attention。packing 需要 flash attention。",
    ),
    sft(
        "use_hf",
        G::Model,
        K::Bool,
        false,
        "Download from the Hugging Face hub (whet always does; kept for ms-swift scripts, whose default hub is ModelScope).",
        "从 Hugging Face Hub 下载（whet 总是如此；保留此参数以兼容 ms-swift 脚本，ms-swift 默认使用 ModelScope）。",
    ),
    Field {
        aliases: &["train_type"],
        ..sft(
            "tuner_type",
            G::Tuner,
            K::Choice(TUNER_TYPES),
            false,
            "How to fine-tune: full (every weight, most memory, best results), lora (small low-rank adapters on a frozen model) or qlora (LoRA on a 4-bit base, least memory). ms-swift 3.x calls it --train_type.",
            "微调方式：full 全参数微调（显存最高、效果最好）；lora 冻结原模型，只训练低秩适配器；qlora 在 4-bit 量化模型上做 LoRA（显存最低）。ms-swift 3.x 中名为 --train_type。",
        )
    },
    sft(
        "adapters",
        G::Tuner,
        K::List,
        false,
        "Existing adapter folders to load and keep training.",
        "要加载并继续训练的已有适配器目录。",
    ),
    sft(
        "lora_rank",
        G::Tuner,
        K::Int,
        false,
        "LoRA rank r: width of the low-rank update. Larger learns more and costs more memory.",
        "LoRA 的秩 r，即低秩矩阵的宽度。越大可学习的内容越多，显存占用也越多。",
    ),
    sft(
        "lora_alpha",
        G::Tuner,
        K::Int,
        false,
        "LoRA scaling: the update is multiplied by alpha / rank.",
        "LoRA 缩放系数：更新量乘以 alpha / rank。",
    ),
    sft(
        "lora_dropout",
        G::Tuner,
        K::Float,
        false,
        "Dropout on the LoRA input, between 0 and 1.",
        "LoRA 输入的 dropout 比例，取值 0 到 1。",
    ),
    sft(
        "target_modules",
        G::Tuner,
        K::List,
        false,
        "Which linear layers get LoRA adapters; all-linear means every projection (MoE experts' included) except lm_head and the MoE router.",
        "哪些线性层加 LoRA；all-linear 表示除 lm_head 和 MoE 路由层外的所有投影层（包括 MoE 专家）。",
    ),
    sft(
        "target_regex",
        G::Tuner,
        K::Str,
        true,
        "A regular expression over full module names (model.layers.0.self_attn.q_proj); when set it replaces target_modules.",
        "按完整模块名（如 model.layers.0.self_attn.q_proj）匹配的正则表达式；设置后取代 target_modules。",
    ),
    sft(
        "use_rslora",
        G::Tuner,
        K::Bool,
        false,
        "rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank, which keeps large ranks stable.",
        "rsLoRA：更新量乘以 alpha / sqrt(rank) 而不是 alpha / rank，rank 较大时训练更稳定。",
    ),
    sft(
        "lora_bias",
        G::Tuner,
        K::Choice(LORA_BIAS),
        false,
        "Biases trained with the adapters: none, or all (every bias of the model; Qwen3's linears have none).",
        "与适配器一起训练的偏置：none，或 all（模型的全部偏置；Qwen3 的线性层没有偏置）。",
    ),
    sft(
        "modules_to_save",
        G::Tuner,
        K::List,
        false,
        "Modules trained in full next to the adapters and saved with them, e.g. lm_head embed_tokens (all-embedding, all-norm are shortcuts).",
        "与适配器一起全量训练并随适配器保存的模块，如 lm_head embed_tokens（可用 all-embedding、all-norm 简写）。",
    ),
    sft(
        "quant_method",
        G::Tuner,
        K::Choice(QUANT_METHODS),
        true,
        "Quantisation of the frozen base for QLoRA (bnb = bitsandbytes).",
        "QLoRA 冻结基座的量化方法（bnb 即 bitsandbytes）。",
    ),
    sft(
        "quant_bits",
        G::Tuner,
        K::Int,
        true,
        "Bits per base weight when quantising: 4 (QLoRA, with --quant_method bnb). ms-swift also takes 8 (LLM.int8), which whet does not implement.",
        "量化位数：4（QLoRA，需配合 --quant_method bnb）。ms-swift 还支持 8（LLM.int8），whet 尚未实现。",
    ),
    sft(
        "bnb_4bit_quant_type",
        G::Tuner,
        K::Choice(BNB_QUANT_TYPES),
        false,
        "4-bit format: nf4 (normal float, the QLoRA default) or fp4.",
        "4-bit 量化格式：nf4（QLoRA 默认）或 fp4。",
    ),
    sft(
        "bnb_4bit_use_double_quant",
        G::Tuner,
        K::Bool,
        false,
        "Also quantise the quantisation constants (saves about 0.4 bits per weight).",
        "对量化常数再做一次量化（每个参数约节省 0.4 bit）。",
    ),
    sft(
        "bnb_4bit_compute_dtype",
        G::Tuner,
        K::Choice(DTYPES),
        true,
        "Precision used to compute with the 4-bit weights. Unset: follows torch_dtype.",
        "4-bit 权重参与计算时使用的精度。不设置则跟随 torch_dtype。",
    ),
    sft(
        "dataset",
        G::Dataset,
        K::List,
        false,
        "Training data: hub ids or local files, several allowed. Syntax [hf::]id-or-path[:subset][#N]; #N samples N rows (repeating when N is larger than the dataset).",
        "训练数据：Hub 数据集 ID 或本地文件，可以有多个。格式 [hf::]ID或路径[:子集][#N]；#N 表示采样 N 条（N 大于数据量时重复采样）。",
    ),
    sft(
        "val_dataset",
        G::Dataset,
        K::List,
        false,
        "Validation data, same syntax as dataset. Without it (and with split_dataset_ratio 0) no evaluation runs.",
        "验证集，格式同 dataset。若不设置且 split_dataset_ratio 为 0，则不会进行评估。",
    ),
    sft(
        "split_dataset_ratio",
        G::Dataset,
        K::Float,
        false,
        "Share of the training data held out for validation (0 to 1). ms-swift's default 0 means no validation set.",
        "从训练数据中划出作为验证集的比例（0 到 1）。ms-swift 默认 0，即没有验证集。",
    ),
    sft(
        "data_seed",
        G::Dataset,
        K::Int,
        false,
        "Seed for sampling, shuffling and splitting the data.",
        "数据采样、打乱与划分使用的随机种子。",
    ),
    sft(
        "dataset_shuffle",
        G::Dataset,
        K::Bool,
        false,
        "Shuffle the training data (and sample #N randomly rather than from the start).",
        "是否打乱训练数据（#N 采样时随机抽取而不是取前 N 条）。",
    ),
    sft(
        "max_length",
        G::Dataset,
        K::Int,
        true,
        "Longest sample in tokens; longer ones follow truncation_strategy. Memory grows with it. Unset: the model's maximum.",
        "单条样本的最大 token 数，超出的按 truncation_strategy 处理。显存随之增长。不设置则为模型支持的最大长度。",
    ),
    sft(
        "truncation_strategy",
        G::Dataset,
        K::Choice(TRUNCATIONS),
        false,
        "What to do with a sample longer than max_length: delete it, or cut tokens from the left or right.",
        "样本超过 max_length 时的处理：delete 丢弃，left 从左截断，right 从右截断。",
    ),
    sft(
        "system",
        G::Dataset,
        K::Str,
        true,
        "System prompt for samples that have none.",
        "系统提示词，用于没有自带 system 的样本。",
    ),
    sft(
        "template",
        G::Dataset,
        K::Choice(TEMPLATES),
        true,
        "Chat template. Unset: chosen from the model (Thinking-2507 models get qwen3_thinking).",
        "对话模板。不设置则根据模型自动选择（Thinking-2507 模型使用 qwen3_thinking）。",
    ),
    sft(
        "loss_scale",
        G::Dataset,
        K::Str,
        false,
        "Which tokens get loss: default (every assistant reply), last_round or all.",
        "哪些 token 计算损失：default（所有助手回复）、last_round（最后一轮）或 all（全部）。",
    ),
    sft(
        "disable_ignore_empty_think",
        G::Dataset,
        K::Bool,
        false,
        "Train the empty <think></think> block that the hybrid qwen3 template adds to answers without reasoning (no loss by default).",
        "对混合思考模板为无推理回答添加的空 <think></think> 也计算损失（默认不计算）。",
    ),
    sft(
        "packing",
        G::Dataset,
        K::Bool,
        false,
        "Pack several samples into one sequence of max_length. Needs flash attention.",
        "将多条样本拼接成一条 max_length 长的序列，需要 flash attention。",
    ),
    sft(
        "streaming",
        G::Dataset,
        K::Bool,
        false,
        "Read the dataset as a stream instead of loading it whole. Needs max_steps.",
        "以流式方式读取数据集而不是一次性加载，需要设置 max_steps。",
    ),
    sft(
        "strict",
        G::Dataset,
        K::Bool,
        false,
        "Fail on a malformed row (with its number) instead of dropping it.",
        "遇到格式错误的数据行时报错（给出行号），而不是丢弃。",
    ),
    sft(
        "dataset_num_proc",
        G::DataLoading,
        K::Int,
        false,
        "Threads used to preprocess the dataset.",
        "数据预处理使用的并行数。",
    ),
    sft(
        "model_name",
        G::ModelIdentity,
        K::List,
        false,
        "The model's name for the self-cognition dataset: one value, or Chinese then English.",
        "自我认知数据集中的模型名称：一个值，或先中文后英文两个值。",
    ),
    sft(
        "model_author",
        G::ModelIdentity,
        K::List,
        false,
        "The model's author for the self-cognition dataset: one value, or Chinese then English.",
        "自我认知数据集中的模型作者：一个值，或先中文后英文两个值。",
    ),
    sft(
        "num_train_epochs",
        G::Hyperparameters,
        K::Float,
        false,
        "Passes over the training data. Ignored when max_steps is set.",
        "训练轮数，即遍历训练数据的次数。设置 max_steps 时忽略。",
    ),
    sft(
        "max_steps",
        G::Hyperparameters,
        K::Int,
        false,
        "Total optimizer steps; -1 means use num_train_epochs.",
        "总优化步数；-1 表示按 num_train_epochs 计算。",
    ),
    sft(
        "per_device_train_batch_size",
        G::Hyperparameters,
        K::Int,
        false,
        "Samples each GPU processes per forward pass. Lower it first when out of memory.",
        "每张 GPU 每次前向处理的样本数。显存不足时首先减小它。",
    ),
    sft(
        "per_device_eval_batch_size",
        G::Hyperparameters,
        K::Int,
        false,
        "Samples each GPU evaluates at once. Does not change results, only speed and memory.",
        "每张 GPU 评估时一次处理的样本数，只影响速度和显存，不影响结果。",
    ),
    sft(
        "gradient_accumulation_steps",
        G::Hyperparameters,
        K::Int,
        true,
        "Forward/backward passes whose gradients are summed before each optimizer step. Effective batch = per-device batch x GPUs x this. Unset: enough to reach 16.",
        "梯度累积步数：累积多少次前向/反向的梯度再更新一次参数。有效批次 = 单卡批次 × GPU 数 × 该值。不设置时自动取值使有效批次达到 16。",
    ),
    sft(
        "learning_rate",
        G::Hyperparameters,
        K::Float,
        true,
        "Peak learning rate. Usual: 1e-5 to 5e-5 for full fine-tuning, 1e-4 to 5e-4 for LoRA. Unset: 1e-5 full, 1e-4 adapters.",
        "峰值学习率。全参数微调常用 1e-5 ~ 5e-5，LoRA 常用 1e-4 ~ 5e-4。不设置时全参数为 1e-5，适配器为 1e-4。",
    ),
    sft(
        "lr_scheduler_type",
        G::Hyperparameters,
        K::Choice(SCHEDULERS),
        false,
        "Shape of the learning rate after warm-up: cosine, linear, constant, constant_with_warmup, cosine_with_min_lr.",
        "预热后学习率的变化方式：cosine 余弦、linear 线性、constant 常数、constant_with_warmup、cosine_with_min_lr。",
    ),
    sft(
        "lr_scheduler_kwargs",
        G::Hyperparameters,
        K::Str,
        true,
        "Extra scheduler settings as JSON, e.g. {\"min_lr\": 1e-6} for cosine_with_min_lr.",
        "学习率调度器的额外参数（JSON），如 cosine_with_min_lr 的 {\"min_lr\": 1e-6}。",
    ),
    sft(
        "warmup_ratio",
        G::Hyperparameters,
        K::Float,
        false,
        "Share of the total steps during which the learning rate rises linearly from 0 (0.1 = first 10%).",
        "学习率预热比例：前多少比例的步数内学习率从 0 线性升到设定值（0.1 即前 10%）。",
    ),
    sft(
        "warmup_steps",
        G::Hyperparameters,
        K::Int,
        false,
        "Warm-up length in steps; use this or warmup_ratio, not both.",
        "预热步数；与 warmup_ratio 二选一。",
    ),
    sft(
        "weight_decay",
        G::Hyperparameters,
        K::Float,
        false,
        "AdamW weight decay (not applied to norms and biases).",
        "AdamW 权重衰减（不作用于归一化层和偏置）。",
    ),
    sft(
        "adam_beta1",
        G::Hyperparameters,
        K::Float,
        false,
        "AdamW first-moment decay.",
        "AdamW 一阶矩衰减系数。",
    ),
    sft(
        "adam_beta2",
        G::Hyperparameters,
        K::Float,
        false,
        "AdamW second-moment decay (ms-swift uses 0.95).",
        "AdamW 二阶矩衰减系数（ms-swift 默认 0.95）。",
    ),
    sft(
        "adam_epsilon",
        G::Hyperparameters,
        K::Float,
        false,
        "AdamW epsilon.",
        "AdamW 的 epsilon。",
    ),
    sft(
        "max_grad_norm",
        G::Hyperparameters,
        K::Float,
        false,
        "Clip the global gradient norm to this value (0 turns clipping off). The logged grad_norm is before clipping.",
        "梯度裁剪阈值（0 表示不裁剪）。日志中的 grad_norm 是裁剪前的值。",
    ),
    sft(
        "seed",
        G::Hyperparameters,
        K::Int,
        false,
        "Random seed for weights init, dropout and order.",
        "随机种子。",
    ),
    sft(
        "gradient_checkpointing",
        G::Hyperparameters,
        K::Bool,
        false,
        "Recompute each layer's activations in the backward pass: 30-50% less activation memory, 20-30% slower.",
        "梯度检查点：反向传播时重新计算各层激活，激活显存减少约 30%-50%，速度降低约 20%-30%。",
    ),
    sft(
        "router_aux_loss_coef",
        G::Hyperparameters,
        K::Float,
        false,
        "Weight of the MoE load-balancing loss (0 = off).",
        "MoE 负载均衡辅助损失的权重（0 表示关闭）。",
    ),
    sft(
        "eval_strategy",
        G::EvalSave,
        K::Choice(INTERVALS),
        true,
        "When to evaluate: no, steps (every eval_steps) or epoch. Unset: follows save_strategy. Needs a validation set.",
        "评估策略：no 不评估、steps 每 eval_steps 步、epoch 每轮结束。不设置则跟随 save_strategy。需要验证集。",
    ),
    sft(
        "eval_steps",
        G::EvalSave,
        K::Int,
        true,
        "Evaluate every N steps. Unset: same as save_steps.",
        "每隔多少步评估一次。不设置则与 save_steps 相同。",
    ),
    sft(
        "save_strategy",
        G::EvalSave,
        K::Choice(INTERVALS),
        false,
        "When to save checkpoints: no, steps or epoch. A final checkpoint is always written unless no.",
        "保存策略：no、steps 或 epoch。除 no 外，训练结束时总会保存最后一个检查点。",
    ),
    sft(
        "save_steps",
        G::EvalSave,
        K::Int,
        false,
        "Save a checkpoint every N steps.",
        "每隔多少步保存一次检查点。",
    ),
    sft(
        "save_total_limit",
        G::EvalSave,
        K::Int,
        true,
        "Keep at most N checkpoints (the best is never deleted). Unset: keep all. A 30B model in bf16 takes about 60 GB per checkpoint.",
        "最多保留多少个检查点（最佳检查点不会被删除）。不设置则全部保留。30B 模型 bf16 每个检查点约 60GB。",
    ),
    sft(
        "save_only_model",
        G::EvalSave,
        K::Bool,
        false,
        "Save weights only, without optimizer state: much smaller, but training cannot resume exactly.",
        "只保存模型权重，不保存优化器状态：体积小得多，但无法精确恢复训练。",
    ),
    sft(
        "logging_steps",
        G::EvalSave,
        K::Int,
        false,
        "Log loss, learning rate and speed every N steps.",
        "每隔多少步记录一次 loss、学习率、速度等日志。",
    ),
    sft(
        "output_dir",
        G::EvalSave,
        K::Str,
        true,
        "Where runs are written; each run gets a v<N>-<timestamp> folder inside. Unset: output/<model name>.",
        "训练输出目录，每次运行在其中新建 v<N>-<时间> 子目录。不设置则为 output/<模型名>。",
    ),
    sft(
        "add_version",
        G::EvalSave,
        K::Bool,
        false,
        "Create a v<N>-<timestamp> folder for each run inside output_dir.",
        "每次运行在 output_dir 下新建 v<N>-<时间> 子目录。",
    ),
    sft(
        "report_to",
        G::EvalSave,
        K::List,
        false,
        "Where metrics go: tensorboard (event files under runs/), or none.",
        "指标记录方式：tensorboard（写入 runs/ 下的事件文件），或 none。",
    ),
    sft(
        "metric_for_best_model",
        G::EvalSave,
        K::Str,
        true,
        "Metric that decides the best checkpoint. Unset: loss (eval_loss).",
        "用于选择最佳检查点的指标。不设置则为 loss（eval_loss）。",
    ),
    sft(
        "greater_is_better",
        G::EvalSave,
        K::Bool,
        true,
        "Whether a larger metric_for_best_model is better. Unset: false for losses.",
        "metric_for_best_model 是否越大越好。不设置时对 loss 为 false。",
    ),
    sft(
        "load_best_model_at_end",
        G::EvalSave,
        K::Bool,
        false,
        "Finish with the best checkpoint's weights. Needs matching eval/save strategies and save_steps a multiple of eval_steps.",
        "训练结束时加载最佳检查点。需要评估与保存策略一致，且 save_steps 是 eval_steps 的整数倍。",
    ),
    sft(
        "resume_from_checkpoint",
        G::EvalSave,
        K::Str,
        true,
        "Checkpoint folder to resume from: weights, optimizer, scheduler, RNG and data position.",
        "从指定检查点目录恢复训练：权重、优化器、学习率调度、随机数状态与数据位置。",
    ),
    sft(
        "resume_only_model",
        G::EvalSave,
        K::Bool,
        false,
        "With resume_from_checkpoint: load only the weights, not the optimizer and RNG state.",
        "配合 resume_from_checkpoint：只加载模型权重，不加载优化器和随机数状态。",
    ),
    sft(
        "dataloader_num_workers",
        G::DataLoading,
        K::Int,
        true,
        "Workers that tokenize and collate batches ahead of the training step. Unset: 1.",
        "提前分词并组装批次的数据加载线程数。不设置则为 1。",
    ),
    sft(
        "deepspeed",
        G::Distributed,
        K::Str,
        true,
        "ZeRO sharding: zero0 (plain data parallel), zero1 (shard optimizer state), zero2 (also gradients), zero3 (also weights), zero2_offload/zero3_offload (optimizer, and for zero3 weights, in CPU memory), or a DeepSpeed JSON file.",
        "ZeRO 分片：zero0（普通数据并行）、zero1（分片优化器状态）、zero2（再分片梯度）、zero3（再分片参数）、zero2_offload/zero3_offload（优化器状态，zero3 还包括参数，放到 CPU 内存），或 DeepSpeed JSON 配置文件路径。",
    ),
];

/// Looks a field up by its name or an alias; `-` and `_` are the same (`--nproc-per-node`).
pub fn find(name: &str) -> Option<&'static Field> {
    let name = name.replace('-', "_");
    FIELDS
        .iter()
        .find(|f| f.name == name || f.aliases.contains(&name.as_str()))
}

/// The field set by an environment variable (`NPROC_PER_NODE` -> nproc_per_node).
pub fn find_by_env(var: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.env == Some(var))
}

/// The known name closest to `name`, for "did you mean" hints.
pub fn closest(name: &str) -> Option<&'static str> {
    let name = name.replace('-', "_");
    crate::diagnostics::closest_word(
        &name,
        FIELDS
            .iter()
            .flat_map(|f| std::iter::once(f.name).chain(f.aliases.iter().copied())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JobConfig;

    #[test]
    fn the_registry_lists_exactly_the_config_fields() {
        let value = serde_json::to_value(JobConfig::default()).unwrap();
        for (section, key) in [(Section::Launch, "launch"), (Section::Sft, "sft")] {
            let mut struct_fields: Vec<&str> = value[key]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "env")
                .collect();
            let mut registry: Vec<&str> = FIELDS
                .iter()
                .filter(|f| f.section == section)
                .map(|f| f.name)
                .collect();
            struct_fields.sort();
            registry.sort();
            assert_eq!(struct_fields, registry, "{key}");
        }
    }

    #[test]
    fn every_field_is_explained_in_both_languages() {
        for field in FIELDS {
            assert!(field.help_en.len() > 10, "{}", field.name);
            assert!(
                field
                    .help_zh
                    .chars()
                    .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
                "{}",
                field.name
            );
        }
        let mut names: Vec<&str> = FIELDS.iter().map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FIELDS.len(), "duplicate field names");
    }

    #[test]
    fn lookups_accept_aliases_and_dashes() {
        assert_eq!(find("train_type").unwrap().name, "tuner_type");
        assert_eq!(find("nproc-per-node").unwrap().name, "nproc_per_node");
        assert_eq!(
            find_by_env("NPROC_PER_NODE").unwrap().name,
            "nproc_per_node"
        );
        assert_eq!(closest("learning_rat"), Some("learning_rate"));
        assert_eq!(closest("zzzzzzzzzz"), None);
    }
}
