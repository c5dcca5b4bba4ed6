//! The minimal data side of `whet sft`: local `.jsonl` files in the messages format, rendered
//! with the Qwen3 ChatML template, tokenized with the model's tokenizer.json, filtered or cut
//! to max_length, split into train/val, shuffled per epoch by a seeded sampler whose state a
//! checkpoint stores, and collated into right-padded batches.
//!
//! What is trained: every assistant reply from its first token (`<think>` for the thinking
//! templates) up to and including its closing `<|im_end|>`; never the newline after it, the
//! `<|im_start|>assistant\n` header, system or user text. Labels are not shifted (the loss
//! shifts them).

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use whet_shared::config::TruncationStrategy;

use crate::dataset::{self, Conversation, HubSettings, LoadOptions, Message, Role};
use crate::grad::Batch;
use crate::rng::SplitMix64;

/// Label of a token that takes no loss (transformers' ignore index).
pub const IGNORE_INDEX: i64 = -100;

/// Problems with the data, each naming the file or row and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("{path} line {line}: {message}")]
    Row {
        path: String,
        line: usize,
        message: String,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error(
        "template `{0}` is not supported; use qwen3, qwen3_thinking, qwen3_nothinking or qwen2_5"
    )]
    UnknownTemplate(String),
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
}

/// The built-in chat templates (ms-swift's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// Hybrid thinking (Qwen3 originals): every reply gets a think block; an empty one takes no
    /// loss unless `disable_ignore_empty_think`.
    Qwen3,
    /// Thinking-2507 models: the reply, think block included, is trained verbatim.
    Qwen3Thinking,
    /// Instruct-2507 models: plain ChatML, no think block.
    Qwen3NoThinking,
    /// Qwen2.5: plain ChatML with Qwen's default system prompt.
    Qwen2_5,
}

const QWEN2_5_DEFAULT_SYSTEM: &str =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

impl Template {
    pub fn parse(name: &str) -> Result<Self, DataError> {
        Ok(match name {
            "qwen3" => Self::Qwen3,
            "qwen3_thinking" => Self::Qwen3Thinking,
            "qwen3_nothinking" => Self::Qwen3NoThinking,
            "qwen2_5" => Self::Qwen2_5,
            other => return Err(DataError::UnknownTemplate(other.to_string())),
        })
    }

    fn thinks(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Qwen3Thinking)
    }
}

/// How conversations become token ids and labels.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    pub template: Template,
    /// `--system`, used where a conversation has no system message.
    pub default_system: Option<String>,
    /// Hybrid template only: train the empty `<think>\n\n</think>\n\n` block too.
    pub disable_ignore_empty_think: bool,
}

/// A piece of rendered text and whether its tokens take loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

/// The reasoning and answer of an assistant message, as the Qwen3 chat template splits them:
/// `reasoning_content` if given, else an inline `<think>...</think>` prefix of the content.
pub(crate) fn split_reasoning(message: &Message) -> (String, String) {
    let (reasoning, content) = match &message.reasoning_content {
        Some(reasoning) => (reasoning.clone(), message.content.clone()),
        None => match message.content.split_once("</think>") {
            Some(_) => {
                let before = message.content.split("</think>").next().unwrap_or("");
                let reasoning = before.rsplit("<think>").next().unwrap_or("");
                let after = message.content.rsplit("</think>").next().unwrap_or("");
                (reasoning.to_string(), after.to_string())
            }
            None => (String::new(), message.content.clone()),
        },
    };
    (
        reasoning.trim_matches('\n').to_string(),
        content.trim_start_matches('\n').to_string(),
    )
}

/// Renders a conversation as ChatML segments, adjacent segments of the same kind merged.
pub fn render(conversation: &Conversation, options: &RenderOptions) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    let mut push = |text: String, trained: bool| match segments.last_mut() {
        Some(last) if last.trained == trained => last.text.push_str(&text),
        _ => segments.push(Segment { text, trained }),
    };
    let has_system = conversation
        .messages
        .first()
        .is_some_and(|m| m.role == Role::System);
    let default_system = match (&options.default_system, options.template) {
        (Some(system), _) => Some(system.as_str()),
        (None, Template::Qwen2_5) => Some(QWEN2_5_DEFAULT_SYSTEM),
        (None, _) => None,
    };
    if let (false, Some(system)) = (has_system, default_system) {
        push(format!("<|im_start|>system\n{system}<|im_end|>\n"), false);
    }
    for message in &conversation.messages {
        if message.role != Role::Assistant {
            push(
                format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    message.role.as_str(),
                    message.content
                ),
                false,
            );
            continue;
        }
        push("<|im_start|>assistant\n".into(), false);
        if options.template.thinks() {
            let (reasoning, answer) = split_reasoning(message);
            let think = format!("<think>\n{reasoning}\n</think>\n\n");
            let think_trained = !(options.template == Template::Qwen3
                && reasoning.is_empty()
                && !options.disable_ignore_empty_think);
            push(think, think_trained);
            push(format!("{answer}<|im_end|>"), true);
        } else {
            push(format!("{}<|im_end|>", message.content), true);
        }
        push("\n".into(), false);
    }
    segments
}

/// The prompt for generating the next assistant reply: the conversation so far (system, user,
/// earlier turns) and the template's generation prompt — as the model's chat template renders
/// it with `add_generation_prompt`. Thinking-2507 models get the `<think>\n` opener (their
/// template forces it); the hybrid template closes an empty think block unless
/// `enable_thinking`, as ms-swift 4.x infers by default.
pub fn render_prompt(
    conversation: &Conversation,
    options: &RenderOptions,
    enable_thinking: bool,
) -> String {
    let mut text: String = render(conversation, options)
        .into_iter()
        .map(|s| s.text)
        .collect();
    text.push_str("<|im_start|>assistant\n");
    text.push_str(generation_prefix(options.template, enable_thinking));
    text
}

/// What the generation prompt adds after `<|im_start|>assistant\n`; it is part of the reply.
pub fn generation_prefix(template: Template, enable_thinking: bool) -> &'static str {
    match template {
        Template::Qwen3Thinking => "<think>\n",
        Template::Qwen3 if !enable_thinking => "<think>\n\n</think>\n\n",
        _ => "",
    }
}

/// Rows whose assistant replies start with `<think>` in the data itself (ms-swift issue #8130)
/// under the `qwen3_thinking` template: a Qwen3-*-Thinking-2507 chat template puts `<think>\n`
/// into the prompt at inference, so data written with the opener in the reply trains the model to
/// produce a reply its template will already have begun. Counted only for `qwen3_thinking`.
pub fn rows_training_think_opener(rows: &[Conversation], options: &RenderOptions) -> usize {
    if options.template != Template::Qwen3Thinking {
        return 0;
    }
    rows.iter()
        .filter(|row| {
            row.messages
                .iter()
                .any(|m| m.role == Role::Assistant && m.content.trim_start().starts_with("<think>"))
        })
        .count()
}

/// The console's warning for [`rows_training_think_opener`]'s count, if any.
pub fn think_opener_warning(rows: usize, total: usize) -> Option<String> {
    (rows > 0).then(|| {
        let d = whet_shared::preview::think_opener(rows as u64, total as u64);
        format!("Warning: {} Fix: {}; prepend `<think>\\n` when displaying generated text (whet infer does).", d.message_en, d.fix)
    })
}

/// Token ids and labels of one rendered conversation (before padding).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Sample {
    /// Label tokens after the causal shift (the first position never predicts anything).
    pub fn num_label_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// The model's tokenizer plus the ids the template and the collator need.
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    pub pad_token_id: u32,
}

impl ChatTokenizer {
    /// Reads `<model_dir>/tokenizer.json`; the pad id is `<|endoftext|>`'s.
    pub fn from_model_dir(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("tokenizer.json");
        let err = |message: String| DataError::Tokenizer {
            path: path.display().to_string(),
            message,
        };
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
        let pad_token_id = tokenizer
            .token_to_id("<|endoftext|>")
            .ok_or_else(|| err("has no `<|endoftext|>` token to pad with".into()))?;
        Ok(Self {
            tokenizer,
            pad_token_id,
        })
    }

    /// The id of a token (`<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Text of `ids`, special tokens dropped (`<think>` is not special in Qwen3: it stays).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
    }

    /// Ids of `text` without any added BOS/EOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self.encoding(text)?.get_ids().to_vec())
    }

    fn encoding(&self, text: &str) -> Result<tokenizers::Encoding, DataError> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
    }

    /// Renders and tokenizes a conversation; each segment is encoded on its own (segments end
    /// at special tokens or newlines, where the pre-tokenizer splits anyway).
    pub fn encode_conversation(
        &self,
        conversation: &Conversation,
        options: &RenderOptions,
    ) -> Result<Sample, DataError> {
        self.encode_rendered(conversation, options, None)
    }

    /// [`Self::encode_conversation`], with each token's share of the rendered text beside it
    /// (the shares join to the whole text).
    pub fn encode_conversation_with_text(
        &self,
        conversation: &Conversation,
        options: &RenderOptions,
    ) -> Result<(Sample, Vec<String>), DataError> {
        let mut texts = Vec::new();
        let sample = self.encode_rendered(conversation, options, Some(&mut texts))?;
        Ok((sample, texts))
    }

    fn encode_rendered(
        &self,
        conversation: &Conversation,
        options: &RenderOptions,
        mut texts: Option<&mut Vec<String>>,
    ) -> Result<Sample, DataError> {
        let mut sample = Sample {
            input_ids: Vec::new(),
            labels: Vec::new(),
        };
        for segment in render(conversation, options) {
            let encoding = self.encoding(&segment.text)?;
            let ids = encoding.get_ids();
            sample.labels.extend(ids.iter().map(|&id| {
                if segment.trained {
                    id as i64
                } else {
                    IGNORE_INDEX
                }
            }));
            sample.input_ids.extend(ids);
            if let Some(texts) = texts.as_deref_mut() {
                texts.extend(token_texts(&segment.text, encoding.get_offsets()));
            }
        }
        if let Some(first) = sample.labels.first_mut() {
            *first = IGNORE_INDEX;
        }
        Ok(sample)
    }
}

/// Each token's share of `text` from the tokenizer's byte offsets: from where the previous token
/// ended to where this one ends, widened to whole characters (a byte-level token may hold part
/// of one), the last taking the rest — so the shares join to `text` exactly.
fn token_texts(text: &str, offsets: &[(usize, usize)]) -> Vec<String> {
    let mut shares = Vec::with_capacity(offsets.len());
    let mut from = 0;
    for (index, &(_, end)) in offsets.iter().enumerate() {
        let mut to = if index + 1 == offsets.len() {
            text.len()
        } else {
            end.clamp(from, text.len())
        };
        while !text.is_char_boundary(to) {
            to += 1;
        }
        shares.push(text[from..to].to_string());
        from = to;
    }
    shares
}

/// Loads the rows of dataset specs (any source and format `crate::dataset` reads), with `#N`
/// sampling drawn from `rng`; returns the rows and how many malformed rows were dropped.
pub fn load_specs(
    specs: &[String],
    field: &str,
    sft: &whet_shared::SftConfig,
    rng: &mut SplitMix64,
) -> Result<(Vec<Conversation>, usize), DataError> {
    let mut rows = Vec::new();
    let mut dropped = 0;
    for loaded in dataset::load_all(specs, field, &load_options(sft), rng)? {
        dropped += loaded.dropped;
        rows.extend(loaded.rows);
    }
    Ok((rows, dropped))
}

/// What the dataset loader takes from the config.
pub fn load_options(sft: &whet_shared::SftConfig) -> LoadOptions {
    LoadOptions {
        dataset_shuffle: sft.dataset_shuffle,
        strict: sft.strict,
        model_name: sft.model_name.clone(),
        model_author: sft.model_author.clone(),
        hub: HubSettings::from_env(sft.use_hf),
    }
}

/// Splits off `max(int(rows * ratio), 1)` random rows for validation (datasets'
/// `train_test_split` with shuffling): returns (train, val).
pub fn split_rows<T>(rows: Vec<T>, ratio: f64, rng: &mut SplitMix64) -> (Vec<T>, Vec<T>) {
    let n = rows.len();
    let val_size = whet_shared::derive::split_val_rows(n as u64, ratio) as usize;
    let order = rng.permutation(n);
    let mut slots: Vec<Option<T>> = rows.into_iter().map(Some).collect();
    let val = order[..val_size]
        .iter()
        .map(|&i| slots[i].take().expect("each index once"))
        .collect();
    let train = order[val_size..]
        .iter()
        .map(|&i| slots[i].take().expect("each index once"))
        .collect();
    (train, val)
}

/// Applies max_length: `delete` drops an overlong sample (returns None), `left` keeps its last
/// `max_length` tokens, `right` its first.
pub fn truncate(
    mut sample: Sample,
    max_length: usize,
    strategy: TruncationStrategy,
) -> Option<Sample> {
    let len = sample.input_ids.len();
    if len <= max_length {
        return Some(sample);
    }
    match strategy {
        TruncationStrategy::Delete => None,
        TruncationStrategy::Right => {
            sample.input_ids.truncate(max_length);
            sample.labels.truncate(max_length);
            Some(sample)
        }
        TruncationStrategy::Left => {
            sample.input_ids.drain(..len - max_length);
            sample.labels.drain(..len - max_length);
            sample.labels[0] = IGNORE_INDEX;
            Some(sample)
        }
    }
}

/// Right-pads samples to the longest with `pad_id` (attention mask 0, label -100).
pub fn collate(samples: &[&Sample], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    let width = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let rows = samples.len();
    let mut input_ids = Vec::with_capacity(rows * width);
    let mut attention_mask = Vec::with_capacity(rows * width);
    let mut labels = Vec::with_capacity(rows * width);
    for sample in samples {
        let pad = width - sample.input_ids.len();
        input_ids.extend(&sample.input_ids);
        input_ids.extend(std::iter::repeat_n(pad_id, pad));
        attention_mask.extend(std::iter::repeat_n(1u32, sample.input_ids.len()));
        attention_mask.extend(std::iter::repeat_n(0u32, pad));
        labels.extend(&sample.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(input_ids, (rows, width), device)?,
        attention_mask: Tensor::from_vec(attention_mask, (rows, width), device)?,
        labels: Tensor::from_vec(labels, (rows, width), device)?,
    })
}

/// Where the sampler stands, as a checkpoint stores it: the generator as it was when the current
/// epoch's order was drawn, and how many micro-batches of that epoch are consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub rng_at_epoch_start: SplitMix64,
    pub batches_consumed: usize,
}

/// The micro-batches of one optimizer step, all from one epoch (as transformers' loop: the last
/// step of an epoch may accumulate fewer).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Sample indices of each micro-batch.
    pub micro_batches: Vec<Vec<usize>>,
    /// The epoch as a fraction after this step (transformers' `state.epoch`).
    pub epoch_after: f64,
    /// This step consumed the epoch's last micro-batch.
    pub ends_epoch: bool,
}

/// Hands out micro-batches of sample indices, reshuffling each epoch with a seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    num_samples: usize,
    batch_size: usize,
    shuffle: bool,
    rng: SplitMix64,
    state: SamplerState,
    order: Vec<usize>,
}

impl Sampler {
    pub fn new(num_samples: usize, batch_size: usize, shuffle: bool, seed: u64) -> Self {
        let rng = SplitMix64::new(seed);
        let mut sampler = Self {
            num_samples,
            batch_size: batch_size.max(1),
            shuffle,
            rng,
            state: SamplerState {
                epoch: 0,
                rng_at_epoch_start: rng,
                batches_consumed: 0,
            },
            order: Vec::new(),
        };
        sampler.draw_order();
        sampler
    }

    /// Continues exactly where `state` was saved.
    pub fn restore(&mut self, state: SamplerState) {
        self.rng = state.rng_at_epoch_start;
        self.state = state;
        self.draw_order();
        self.state.batches_consumed = state.batches_consumed;
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.num_samples.div_ceil(self.batch_size)
    }

    fn draw_order(&mut self) {
        self.state.rng_at_epoch_start = self.rng;
        self.order = if self.shuffle {
            self.rng.permutation(self.num_samples)
        } else {
            (0..self.num_samples).collect()
        };
    }

    /// Up to `accumulation` micro-batches for the next optimizer step.
    pub fn next_window(&mut self, accumulation: usize) -> Window {
        let per_epoch = self.batches_per_epoch();
        if self.state.batches_consumed >= per_epoch {
            self.state.epoch += 1;
            self.state.batches_consumed = 0;
            self.draw_order();
        }
        let mut micro_batches = Vec::new();
        while micro_batches.len() < accumulation.max(1) && self.state.batches_consumed < per_epoch {
            let start = self.state.batches_consumed * self.batch_size;
            let end = (start + self.batch_size).min(self.num_samples);
            micro_batches.push(self.order[start..end].to_vec());
            self.state.batches_consumed += 1;
        }
        Window {
            micro_batches,
            epoch_after: self.state.epoch as f64
                + self.state.batches_consumed as f64 / per_epoch.max(1) as f64,
            ends_epoch: self.state.batches_consumed >= per_epoch,
        }
    }
}

/// Which of the job's ranks takes which per-device batches: rank `rank` of `world` takes every
/// world-th one (accelerate's `BatchSamplerShard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankShare {
    pub rank: usize,
    pub world: usize,
}

impl RankShare {
    pub const SINGLE: RankShare = RankShare { rank: 0, world: 1 };

    /// This rank's items of a list that every rank sees whole.
    pub fn take<T>(self, items: impl IntoIterator<Item = T>) -> impl Iterator<Item = T> {
        items.into_iter().skip(self.rank).step_by(self.world.max(1))
    }
}

impl Sampler {
    /// This rank's micro-batches of the next optimizer step: the window of all ranks
    /// (`accumulation` per rank) is drawn from the one sampler and dealt out round-robin. With
    /// several ranks, the epoch's last window is completed as accelerate's `even_batches` does:
    /// the last batch is filled up, and missing batches added, from the start of the epoch's
    /// order, so every rank takes as many micro-batches of full size.
    pub fn next_window_for(&mut self, accumulation: usize, share: RankShare) -> Window {
        let mut window = self.next_window(accumulation.max(1) * share.world.max(1));
        if share.world > 1 {
            if window.ends_epoch {
                self.complete_for(&mut window.micro_batches, share.world);
            }
            window.micro_batches = share.take(window.micro_batches).collect();
        }
        window
    }

    fn complete_for(&self, batches: &mut Vec<Vec<usize>>, world: usize) {
        if self.order.is_empty() {
            return;
        }
        let mut cycle = self.order.iter().copied().cycle();
        if let Some(last) = batches.last_mut() {
            while last.len() < self.batch_size {
                last.extend(cycle.next());
            }
        }
        while !batches.len().is_multiple_of(world) {
            batches.push(cycle.by_ref().take(self.batch_size).collect());
        }
    }
}

/// The tokenized train and validation sets of a run.
#[derive(Debug, Clone)]
pub struct PreparedData {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    /// Rows split off the training data by split_dataset_ratio (ms-swift saves them as
    /// `val_dataset.jsonl`); empty when val_dataset was given or nothing was split.
    pub split_val_rows: Vec<Conversation>,
    /// Malformed training rows dropped while loading (`--strict` makes them errors).
    pub dropped_rows: usize,
    /// Samples dropped for exceeding max_length (truncation_strategy delete).
    pub dropped_train: usize,
    /// Training rows whose reply is trained to begin with `<think>` under qwen3_thinking
    /// ([`rows_training_think_opener`]), and the training rows in all.
    pub think_opener_rows: usize,
    pub train_rows: usize,
    pub dropped_val: usize,
}

/// Renders, tokenizes and applies max_length to `rows` on `workers` threads (contiguous chunks,
/// results joined in row order, so the samples do not depend on the number of workers); returns
/// the kept samples and how many were dropped. The first failing row's error wins.
pub fn encode_rows(
    tokenizer: &ChatTokenizer,
    rows: &[Conversation],
    options: &RenderOptions,
    max_length: usize,
    strategy: TruncationStrategy,
    workers: usize,
) -> Result<(Vec<Sample>, usize), DataError> {
    let encode_chunk = |chunk: &[Conversation]| -> Result<Vec<Option<Sample>>, DataError> {
        chunk
            .iter()
            .map(|row| {
                let sample = tokenizer.encode_conversation(row, options)?;
                Ok(truncate(sample, max_length, strategy))
            })
            .collect()
    };
    let workers = workers.clamp(1, rows.len().max(1));
    let chunks: Vec<Result<Vec<Option<Sample>>, DataError>> = if workers == 1 {
        vec![encode_chunk(rows)]
    } else {
        let chunk_size = rows.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let handles: Vec<_> = rows
                .chunks(chunk_size)
                .map(|chunk| scope.spawn(move || encode_chunk(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("an encoding worker panicked"))
                .collect()
        })
    };
    let mut kept = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    for chunk in chunks {
        for sample in chunk? {
            match sample {
                Some(sample) => kept.push(sample),
                None => dropped += 1,
            }
        }
    }
    Ok((kept, dropped))
}

/// ms-swift's order: load (with `#N` sampling), split off validation rows, then encode and
/// apply max_length.
pub fn prepare(
    sft: &whet_shared::SftConfig,
    tokenizer: &ChatTokenizer,
    options: &RenderOptions,
    max_length: usize,
) -> Result<PreparedData, DataError> {
    let mut rng = SplitMix64::new(sft.data_seed as u64);
    let (rows, dropped_rows) = load_specs(&sft.dataset, "dataset", sft, &mut rng)?;
    let (train_rows, val_rows, split_val_rows) = if !sft.val_dataset.is_empty() {
        let (val, _) = load_specs(&sft.val_dataset, "val_dataset", sft, &mut rng)?;
        (rows, val, Vec::new())
    } else if sft.split_dataset_ratio > 0.0 && !rows.is_empty() {
        let (train, val) = split_rows(rows, sft.split_dataset_ratio, &mut rng);
        (train, val.clone(), val)
    } else {
        (rows, Vec::new(), Vec::new())
    };
    let workers = sft.dataloader_num_workers.unwrap_or(1).max(1) as usize;
    let encode_all = |rows: &[Conversation]| {
        encode_rows(
            tokenizer,
            rows,
            options,
            max_length,
            sft.truncation_strategy,
            workers,
        )
    };
    let think_opener_rows = rows_training_think_opener(&train_rows, options);
    let (train, dropped_train) = encode_all(&train_rows)?;
    let (val, dropped_val) = encode_all(&val_rows)?;
    Ok(PreparedData {
        train,
        val,
        split_val_rows,
        dropped_rows,
        dropped_train,
        think_opener_rows,
        train_rows: train_rows.len(),
        dropped_val,
    })
}

/// `mean±std, min=…, max=…, size=N` of token lengths, as ms-swift summarises a dataset.
pub fn length_summary(samples: &[Sample]) -> String {
    let lengths: Vec<f64> = samples.iter().map(|s| s.input_ids.len() as f64).collect();
    let n = lengths.len().max(1) as f64;
    let mean = lengths.iter().sum::<f64>() / n;
    let std = (lengths.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
    let min = lengths.iter().copied().fold(f64::INFINITY, f64::min);
    let max = lengths.iter().copied().fold(0.0, f64::max);
    format!(
        "{mean:.6}±{std:.6}, min={:.6}, max={max:.6}, size={}",
        if lengths.is_empty() { 0.0 } else { min },
        lengths.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/hf-reference")
    }

    fn fixture() -> (ChatTokenizer, serde_json::Value) {
        let dir = fixture_dir();
        let batch = std::fs::read_to_string(dir.join("batch.json")).unwrap_or_else(|e| {
            panic!("HF reference fixtures not found at {} ({e}); expected the shared/ folder beside the repository root", dir.display())
        });
        (
            ChatTokenizer::from_model_dir(&dir).unwrap(),
            serde_json::from_str(&batch).unwrap(),
        )
    }

    #[test]
    fn tokenizer_matches_the_fixture_cases() {
        let (tokenizer, _) = fixture();
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap(),
        )
        .unwrap();
        let cases = expected["tokenizer"]["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(
                tokenizer.encode(case["text"].as_str().unwrap()).unwrap(),
                ids,
                "{}",
                case["text"]
            );
        }
        assert_eq!(tokenizer.pad_token_id, 507);
    }

    #[test]
    fn rendering_and_tokenizing_reproduces_batch_json() {
        let (tokenizer, batch) = fixture();
        let options = RenderOptions {
            template: Template::Qwen3Thinking,
            default_system: None,
            disable_ignore_empty_think: false,
        };
        let conversations: Vec<Vec<Message>> =
            serde_json::from_value(batch["messages"].clone()).unwrap();
        for (i, messages) in conversations.into_iter().enumerate() {
            let conversation = Conversation { messages };
            let text: String = render(&conversation, &options)
                .into_iter()
                .map(|s| s.text)
                .collect();
            assert_eq!(text, batch["texts"][i].as_str().unwrap(), "text {i}");
            let sample = tokenizer
                .encode_conversation(&conversation, &options)
                .unwrap();
            let len = batch["lengths"][i].as_u64().unwrap() as usize;
            let ids: Vec<u32> = serde_json::from_value(batch["input_ids"][i].clone()).unwrap();
            let labels: Vec<i64> = serde_json::from_value(batch["labels"][i].clone()).unwrap();
            assert_eq!(sample.input_ids, ids[..len], "input_ids {i}");
            assert_eq!(sample.labels, labels[..len], "labels {i}");
        }
    }

    #[test]
    fn hybrid_template_masks_an_empty_think_block_and_system_fills_in() {
        let conversation = Conversation {
            messages: vec![
                Message::new(Role::User, "hi"),
                Message::new(Role::Assistant, "<think>\nhmm\n</think>\n\nhello"),
                Message::new(Role::User, "again"),
                Message::new(Role::Assistant, "bye"),
            ],
        };
        let options = RenderOptions {
            template: Template::Qwen3,
            default_system: Some("Be brief.".into()),
            disable_ignore_empty_think: false,
        };
        let segments = render(&conversation, &options);
        let trained: Vec<&str> = segments
            .iter()
            .filter(|s| s.trained)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(
            trained,
            vec!["<think>\nhmm\n</think>\n\nhello<|im_end|>", "bye<|im_end|>"]
        );
        assert!(segments[0]
            .text
            .starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
        assert!(segments.iter().any(|s| !s.trained
            && s.text
                .ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n")));
    }

    #[test]
    fn think_opener_rows_are_counted_for_qwen3_thinking_only() {
        let row = |reply: Message| Conversation {
            messages: vec![Message::new(Role::User, "q"), reply],
        };
        let mut with_reasoning = Message::new(Role::Assistant, "a");
        with_reasoning.reasoning_content = Some("r".into());
        let rows = vec![
            row(Message::new(Role::Assistant, "<think>\nr\n</think>\n\na")),
            row(with_reasoning),
            row(Message::new(Role::Assistant, "a")),
            Conversation {
                messages: vec![Message::new(Role::User, "no reply")],
            },
        ];
        let options = |template| RenderOptions {
            template,
            default_system: None,
            disable_ignore_empty_think: false,
        };
        // Only the row whose data starts the reply with `<think>` counts.
        assert_eq!(
            rows_training_think_opener(&rows, &options(Template::Qwen3Thinking)),
            1
        );
        for template in [
            Template::Qwen3,
            Template::Qwen3NoThinking,
            Template::Qwen2_5,
        ] {
            assert_eq!(rows_training_think_opener(&rows, &options(template)), 0);
        }
        assert_eq!(think_opener_warning(0, 4), None);
        let warning = think_opener_warning(3, 4).unwrap();
        assert!(warning.contains("3 of 4") && warning.contains("#8130"));
        assert!(!warning.contains('\n'), "one console line");
    }

    #[test]
    fn encoding_on_workers_keeps_the_row_order() {
        let (tokenizer, _) = fixture();
        let options = RenderOptions {
            template: Template::Qwen3Thinking,
            default_system: None,
            disable_ignore_empty_think: false,
        };
        let rows: Vec<Conversation> = (0..23)
            .map(|i| Conversation {
                messages: vec![
                    Message::new(Role::User, format!("What is {i} + {}?", i * 7)),
                    Message::new(
                        Role::Assistant,
                        format!("<think>\n{}\n</think>\n\n{}", "add ".repeat(i % 5), i * 8),
                    ),
                ],
            })
            .collect();
        // A max_length that drops some rows, so dropping is counted across chunks too.
        let run = |workers| {
            encode_rows(
                &tokenizer,
                &rows,
                &options,
                40,
                TruncationStrategy::Delete,
                workers,
            )
            .unwrap()
        };
        let (one, dropped_one) = run(1);
        assert!(dropped_one > 0 && !one.is_empty());
        for workers in [2, 4, 64] {
            assert_eq!(
                run(workers),
                (one.clone(), dropped_one),
                "{workers} workers"
            );
        }
        let (all, dropped) = encode_rows(
            &tokenizer,
            &rows,
            &options,
            4096,
            TruncationStrategy::Delete,
            4,
        )
        .unwrap();
        assert_eq!(dropped, 0);
        for (row, sample) in rows.iter().zip(&all) {
            assert_eq!(
                sample,
                &tokenizer.encode_conversation(row, &options).unwrap()
            );
        }
    }

    #[test]
    fn sampler_windows_follow_transformers_and_resume_exactly() {
        // 10 samples, batch 3 -> 4 micro-batches per epoch; accumulation 3 -> steps of 3 and 1.
        let mut sampler = Sampler::new(10, 3, true, 7);
        let first = sampler.next_window(3);
        assert_eq!(first.micro_batches.len(), 3);
        assert!(!first.ends_epoch);
        let second = sampler.next_window(3);
        assert_eq!(second.micro_batches.len(), 1);
        assert_eq!(second.micro_batches[0].len(), 1);
        assert!(second.ends_epoch && second.epoch_after == 1.0);
        let saved = sampler.state();
        let later: Vec<Window> = (0..5).map(|_| sampler.next_window(3)).collect();
        let mut resumed = Sampler::new(10, 3, true, 7);
        resumed.restore(saved);
        let again: Vec<Window> = (0..5).map(|_| resumed.next_window(3)).collect();
        assert_eq!(later, again);
        let mut seen: Vec<usize> = first
            .micro_batches
            .iter()
            .chain(&second.micro_batches)
            .flatten()
            .copied()
            .collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn truncation_and_sampling() {
        let sample = Sample {
            input_ids: vec![1, 2, 3, 4],
            labels: vec![-100, 2, 3, 4],
        };
        assert!(truncate(sample.clone(), 3, TruncationStrategy::Delete).is_none());
        assert_eq!(
            truncate(sample.clone(), 3, TruncationStrategy::Left)
                .unwrap()
                .labels,
            vec![-100, 3, 4]
        );
        assert_eq!(
            truncate(sample, 3, TruncationStrategy::Right)
                .unwrap()
                .input_ids,
            vec![1, 2, 3]
        );
        // `#N` sampling itself is tested in crate::dataset::sampling.
        let mut rng = SplitMix64::new(1);
        let (train, val) = split_rows((0..10).collect::<Vec<_>>(), 0.2, &mut rng);
        assert_eq!((train.len(), val.len()), (8, 2));
    }
}
