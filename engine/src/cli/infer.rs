//! `whet infer`: answer a query, or every row of a validation file, with a model folder (a
//! base model or a training checkpoint), greedy or sampled, streamed when asked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use whet_shared::models::{default_template, Architecture};

use crate::dataset::{self, Conversation, HubSettings, LoadOptions, Message, Role};
use crate::generate::{generate, SamplingOptions};
use crate::model::{Model, ModelConfig, ModelOptions, Trainable, WeightSource};
use crate::rng::SplitMix64;
use crate::train::data::{
    generation_prefix, render_prompt, ChatTokenizer, RenderOptions, Template,
};

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model folder (config.json, safetensors and tokenizer.json; a checkpoint works) or a hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// A hub id's revision (branch, tag or commit).
    #[arg(long = "model_revision", alias = "model-revision")]
    pub model_revision: Option<String>,
    /// Hub ids (and datasets without hf::/ms::) come from Hugging Face rather than ModelScope.
    #[arg(long = "use_hf", alias = "use-hf", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub use_hf: bool,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) applied over
    /// --model without merging.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// One question to answer.
    #[arg(long, conflicts_with_all = ["val_dataset", "messages"])]
    pub query: Option<String>,
    /// A conversation to continue: a JSON file holding a list of `{"role", "content"}`
    /// messages that ends with the user's; `-` reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with = "val_dataset")]
    pub messages: Option<PathBuf>,
    /// A dataset whose rows' last user message is answered; answers go to --result_path.
    #[arg(long = "val_dataset", alias = "val-dataset")]
    pub val_dataset: Option<String>,
    /// Where the answers of --val_dataset go (jsonl); default `<model>/infer_result.jsonl` for a
    /// local folder, `infer_result.jsonl` here for a hub id (never into the hub cache).
    #[arg(long = "result_path", alias = "result-path")]
    pub result_path: Option<PathBuf>,
    /// System prompt for rows that have none.
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template; default: the checkpoint's args.json, else chosen from the model.
    #[arg(long)]
    pub template: Option<String>,
    /// Hybrid `qwen3` template: let the model think (default: an empty think block).
    #[arg(long = "enable_thinking", alias = "enable-thinking", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_thinking: bool,
    #[arg(
        long = "max_new_tokens",
        alias = "max-new-tokens",
        default_value_t = 512
    )]
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 1.0)]
    pub top_p: f64,
    /// The sampling seed; also the seed of the random base a model folder without weights
    /// stands for (the demo's), as `whet sft --seed` initialises it.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print tokens as they are generated.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub stream: bool,
}

/// The template a checkpoint was trained with (the adapter's args.json, else the model's), else
/// the model's default.
fn template_for(
    model_dir: &Path,
    adapters: Option<&Path>,
    model_name: &str,
    config: &ModelConfig,
    requested: Option<&str>,
) -> anyhow::Result<Template> {
    if let Some(name) = requested {
        return Ok(Template::parse(name)?);
    }
    let trained_with = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("args.json")).ok()?;
        let args: serde_json::Value = serde_json::from_str(&text).ok()?;
        args.get("template")?.as_str().map(str::to_string)
    };
    if let Some(name) = adapters
        .and_then(trained_with)
        .or_else(|| trained_with(model_dir))
    {
        return Ok(Template::parse(&name)?);
    }
    let architecture = if config.moe.is_some() {
        Architecture::Qwen3Moe
    } else if config.qk_norm {
        Architecture::Qwen3
    } else {
        Architecture::Qwen2
    };
    Ok(Template::parse(default_template(model_name, architecture))?)
}

pub fn run(args: InferArgs) -> anyhow::Result<ExitCode> {
    if args.query.is_none() && args.val_dataset.is_none() && args.messages.is_none() {
        eprintln!("error: give --query TEXT, --messages FILE or --val_dataset FILE");
        return Ok(ExitCode::from(2));
    }
    let conversation = match (&args.query, &args.messages) {
        (Some(query), _) => Some(Conversation {
            messages: vec![Message::new(Role::User, query.clone())],
        }),
        (None, Some(path)) => Some(read_messages(path)?),
        (None, None) => None,
    };
    let hub = HubSettings::from_env(args.use_hf);
    let model_text = args.model.to_string_lossy();
    let model_dir = crate::hub::model_dir(&model_text, args.model_revision.as_deref(), &hub)?;
    // The name picks the default template: a local folder's full path, or the hub id.
    let model_name = if args.model.is_dir() {
        let path = model_dir
            .canonicalize()
            .unwrap_or_else(|_| model_dir.clone());
        path.to_string_lossy().into_owned()
    } else {
        model_text.to_string()
    };
    let model_config = ModelConfig::from_model_dir(&model_dir)
        .with_context(|| format!("reading {}/config.json", model_dir.display()))?;
    let template = template_for(
        &model_dir,
        args.adapters.as_deref(),
        &model_name,
        &model_config,
        args.template.as_deref(),
    )?;
    // Nothing is trained: every weight frozen, so no forward pass records a backward graph.
    let options = ModelOptions {
        trainable: Trainable::Nothing,
        ..ModelOptions::default()
    };
    let base = WeightSource::of_model_dir(&model_dir, args.seed)?;
    if let WeightSource::Random { seed } = base {
        eprintln!(
            "{} has no weights: the base is the random one whet sft starts from (seed {seed})",
            model_dir.display()
        );
    }
    let model = match &args.adapters {
        Some(adapter) => crate::model::adapter::adapter_over(&model_dir, base, adapter, options)
            .with_context(|| {
                format!(
                    "loading {} with the adapter {}",
                    model_dir.display(),
                    adapter.display()
                )
            })?,
        None => Model::build(model_config.clone(), base, options)
            .with_context(|| format!("loading the model in {}", model_dir.display()))?,
    };
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir)?;
    let stop: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tokenizer.token_id(t))
        .collect();
    let render = RenderOptions {
        template,
        default_system: args.system.clone(),
        disable_ignore_empty_think: false,
    };
    let sampling = SamplingOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let prefix = generation_prefix(template, args.enable_thinking);
    // The reply as the model sees it: the generation prompt's part of the reply plus the tokens.
    let answer = |conversation: &Conversation, stream: bool| -> anyhow::Result<String> {
        let prompt =
            tokenizer.encode(&render_prompt(conversation, &render, args.enable_thinking))?;
        let mut generated = Vec::new();
        let mut shown = 0;
        let mut out = std::io::stdout();
        if stream {
            write!(out, "{prefix}")?;
        }
        let (tokens, _) = generate(&model, &prompt, &stop, &sampling, &mut |token| {
            if stream {
                generated.push(token);
                let text = tokenizer.decode(&generated)?;
                // Print only whole characters: a multi-byte character may span tokens.
                if !text.ends_with('\u{fffd}') && text.len() > shown {
                    write!(out, "{}", &text[shown..])?;
                    out.flush()?;
                    shown = text.len();
                }
            }
            Ok(())
        })?;
        if stream {
            writeln!(out)?;
        }
        Ok(format!("{prefix}{}", tokenizer.decode(&tokens)?))
    };

    if let Some(conversation) = &conversation {
        let reply = answer(conversation, args.stream)?;
        if !args.stream {
            println!("{reply}");
        }
        return Ok(ExitCode::SUCCESS);
    }

    let spec = args.val_dataset.as_deref().unwrap_or_default();
    let options = LoadOptions {
        dataset_shuffle: false,
        strict: false,
        model_name: Vec::new(),
        model_author: Vec::new(),
        hub,
    };
    let rows = dataset::load(
        spec,
        "val_dataset",
        &options,
        &mut SplitMix64::new(args.seed),
    )?
    .rows;
    let result_path = args.result_path.clone().unwrap_or_else(|| {
        let folder = if args.model.is_dir() {
            model_dir.as_path()
        } else {
            Path::new(".")
        };
        folder.join("infer_result.jsonl")
    });
    let mut results = String::new();
    for row in &rows {
        // Answer the last user message; the reference is the assistant reply after it, if any.
        let last_user = row
            .messages
            .iter()
            .rposition(|m| m.role == Role::User)
            .context("a row has no user message")?;
        let prompt = Conversation {
            messages: row.messages[..=last_user].to_vec(),
        };
        let reference = row
            .messages
            .get(last_user + 1)
            .filter(|m| m.role == Role::Assistant);
        let reply = answer(&prompt, args.stream)?;
        let record = serde_json::json!({
            "messages": prompt.messages,
            "response": reply,
            "labels": reference.map(|m| m.content.clone()),
        });
        results.push_str(&record.to_string());
        results.push('\n');
    }
    let temp = result_path.with_extension("jsonl.tmp");
    std::fs::write(&temp, results).with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, &result_path)?;
    eprintln!(
        "{} answers written to {}",
        rows.len(),
        result_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The conversation of `--messages`: a JSON list of messages ending with the user's turn.
fn read_messages(path: &Path) -> anyhow::Result<Conversation> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .context("reading --messages from standard input")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("--messages: cannot read {}", path.display()))?
    };
    let messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
        format!(
            "--messages {}: not a JSON list of {{\"role\": \"system|user|assistant\", \"content\": \"...\"}} messages",
            path.display()
        )
    })?;
    match messages.last() {
        Some(last) if last.role == Role::User => Ok(Conversation { messages }),
        Some(_) => anyhow::bail!(
            "--messages: the conversation must end with a user message, which the reply answers"
        ),
        None => {
            anyhow::bail!("--messages: the conversation is empty; give at least one user message")
        }
    }
}
