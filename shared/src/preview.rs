//! A dataset as the model sees it: what `whet dataset preview --json` prints and `POST
//! /api/datasets/preview` answers — the first rows rendered through the template with the tokens
//! that take loss marked, what max_length and truncation_strategy do to them, the length
//! distribution of a larger sample, the format found in each dataset, the rows that could not
//! be read, and warnings in both languages. The engine fills it (it has the tokenizer and the
//! files); the studio draws it. The warnings' wording lives here, so both say the same.

use serde::{Deserialize, Serialize};

use crate::config::TruncationStrategy;
use crate::diagnostics::Diagnostic;

/// Rows whose lengths the distribution counts, at most.
pub const LENGTH_SAMPLE_ROWS: usize = 2000;
/// Rows shown in full when `--rows` is not given.
pub const DEFAULT_ROWS: usize = 5;
/// Unreadable rows listed one by one (all are counted).
pub const MAX_BAD_ROWS_LISTED: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetPreview {
    /// The model folder or hub id whose tokenizer rendered the rows.
    pub model: String,
    /// The chat template, as training resolves it.
    pub template: String,
    pub max_length: u64,
    pub truncation_strategy: TruncationStrategy,
    pub datasets: Vec<DatasetSummary>,
    /// The first rows of the training datasets, in the order the loader reads them.
    pub rows: Vec<PreviewRow>,
    pub lengths: LengthDistribution,
    /// The first unreadable rows (each dataset's count is in `datasets`).
    pub bad_rows: Vec<BadRow>,
    /// Warnings about the data for this model and template, in both languages.
    pub diagnostics: Vec<Diagnostic>,
}

/// One `--dataset`/`--val_dataset` spec after loading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub spec: String,
    /// `dataset` or `val_dataset`.
    pub field: String,
    /// Rows read (after `#N` sampling).
    pub rows: u64,
    /// Rows that could not be read: dropped, or with `--strict true` the run stops at the first.
    pub bad_rows: u64,
    /// How the rows were read, most rows first.
    pub formats: Vec<FormatCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatCount {
    /// `messages`, `alpaca`, `query_response`, `r1_distill` or `self_cognition`.
    pub format: String,
    pub rows: u64,
}

/// Where a row came from: its data file (or the built-in dataset) and its 1-based row number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowOrigin {
    pub spec: String,
    pub file: String,
    pub row: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadRow {
    #[serde(flatten)]
    pub origin: RowOrigin,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewRow {
    #[serde(flatten)]
    pub origin: RowOrigin,
    /// The rendered conversation, as one string (the tokens' texts joined).
    pub text: String,
    /// Every token of the rendered row, in order.
    pub tokens: Vec<PreviewToken>,
    pub num_tokens: u64,
    /// Tokens that take loss once max_length has been applied.
    pub num_trained: u64,
    pub truncation: Truncation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewToken {
    pub id: u32,
    /// The token's share of the rendered text; the texts of a row's tokens join to its text.
    pub text: String,
    /// It is a label: the model is trained to predict it. For a cut token, or a token of a
    /// dropped row, the label it would have had (`num_trained` counts neither).
    pub trained: bool,
    /// truncation_strategy `left`/`right` cuts it off (a `delete` drops the whole row).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cut: bool,
    /// It lies inside a `<think>` … `</think>` block, tags included.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub think: bool,
}

/// What max_length does to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Within max_length: trained as it is.
    Fits,
    /// truncation_strategy `delete`: the row is not trained on.
    Dropped,
    /// truncation_strategy `left`: the first tokens are cut.
    CutLeft,
    /// truncation_strategy `right`: the last tokens are cut.
    CutRight,
}

impl Truncation {
    pub fn of(num_tokens: u64, max_length: u64, strategy: TruncationStrategy) -> Truncation {
        if num_tokens <= max_length {
            return Truncation::Fits;
        }
        match strategy {
            TruncationStrategy::Delete => Truncation::Dropped,
            TruncationStrategy::Left => Truncation::CutLeft,
            TruncationStrategy::Right => Truncation::CutRight,
        }
    }
}

/// Token lengths of the first [`LENGTH_SAMPLE_ROWS`] training rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthDistribution {
    /// Rows measured.
    pub rows: u64,
    /// Training rows in all (the measured ones are the first).
    pub total_rows: u64,
    pub min: u64,
    pub max: u64,
    pub mean: f64,
    /// Measured rows longer than max_length.
    pub over_max_length: u64,
    /// Of those, dropped (truncation_strategy delete) or cut (left/right).
    pub dropped: u64,
    pub cut: u64,
    /// Equal-width bins from 0 to past both the longest row and max_length.
    pub bins: Vec<LengthBin>,
}

/// Rows with `from <= length < to` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LengthBin {
    pub from: u64,
    pub to: u64,
    pub rows: u64,
}

/// Bins the histogram uses.
pub const LENGTH_BINS: u64 = 20;

impl LengthDistribution {
    pub fn new(
        lengths: &[u64],
        total_rows: u64,
        max_length: u64,
        strategy: TruncationStrategy,
    ) -> LengthDistribution {
        let rows = lengths.len() as u64;
        let max = lengths.iter().copied().max().unwrap_or(0);
        let min = lengths.iter().copied().min().unwrap_or(0);
        let mean = if rows == 0 {
            0.0
        } else {
            lengths.iter().sum::<u64>() as f64 / rows as f64
        };
        let over_max_length = lengths.iter().filter(|&&l| l > max_length).count() as u64;
        let (dropped, cut) = match strategy {
            TruncationStrategy::Delete => (over_max_length, 0),
            _ => (0, over_max_length),
        };
        // A round width, so bin edges read well, covering the longest row and max_length.
        let span = max.max(max_length) + 1;
        let width = nice_width(span.div_ceil(LENGTH_BINS));
        let count = span.div_ceil(width);
        let mut bins: Vec<LengthBin> = (0..count)
            .map(|i| LengthBin {
                from: i * width,
                to: (i + 1) * width,
                rows: 0,
            })
            .collect();
        for &length in lengths {
            bins[(length / width) as usize].rows += 1;
        }
        LengthDistribution {
            rows,
            total_rows,
            min,
            max,
            mean,
            over_max_length,
            dropped,
            cut,
            bins,
        }
    }
}

/// The smallest of 1, 2, 5 × 10^k at least `width`.
fn nice_width(width: u64) -> u64 {
    let mut scale = 1u64;
    loop {
        for step in [1, 2, 5] {
            if step * scale >= width {
                return step * scale;
            }
        }
        scale *= 10;
    }
}

/// The templates that train a think block: Thinking-2507 models and the hybrid Qwen3 template.
pub fn template_thinks(template: &str) -> bool {
    matches!(template, "qwen3" | "qwen3_thinking")
}

/// Rows whose assistant reply begins with `<think>` in the data, under `qwen3_thinking` (ms-swift
/// #8130): the model's chat template already puts `<think>\n` in the prompt at inference.
pub fn think_opener(rows: u64, total: u64) -> Diagnostic {
    Diagnostic::warning(
        "dataset",
        "reply_begins_with_think",
        format!("{rows} of {total} training row(s) begin the assistant reply with `<think>` in their content, for template qwen3_thinking. Qwen3-*-Thinking-2507 chat templates already put `<think>\\n` in the prompt at inference, so clients may show replies without the opener or with it twice (ms-swift #8130)."),
        format!("{total} 条训练数据中有 {rows} 条的回复内容以 `<think>` 开头（模板 qwen3_thinking）。Qwen3-*-Thinking-2507 的对话模板在推理时已把 `<think>\\n` 放进提示，客户端可能显示缺少或重复的开头（ms-swift #8130）。"),
    )
    .with_fix(
        "put the reasoning in `reasoning_content` (whet renders it as the think block), so the data says what the template adds",
        "把推理过程放进 `reasoning_content`（whet 会渲染为 think 块），让数据与模板一致",
    )
}

/// Rows longer than max_length among those measured.
pub fn over_max_length(
    rows: u64,
    measured: u64,
    max_length: u64,
    strategy: TruncationStrategy,
) -> Diagnostic {
    let (what_en, what_zh) = match strategy {
        TruncationStrategy::Delete => (
            "are dropped (truncation_strategy delete)",
            "会被丢弃（truncation_strategy delete）",
        ),
        TruncationStrategy::Left => (
            "lose their first tokens (truncation_strategy left)",
            "会被截掉开头（truncation_strategy left）",
        ),
        TruncationStrategy::Right => (
            "lose their last tokens, the end of the reply among them (truncation_strategy right)",
            "会被截掉结尾，包括回复的末尾（truncation_strategy right）",
        ),
    };
    Diagnostic::warning(
        "max_length",
        "rows_over_max_length",
        format!(
            "{rows} of {measured} row(s) are longer than max_length {max_length} and {what_en}"
        ),
        format!("{measured} 条数据中有 {rows} 条超过 max_length {max_length}，{what_zh}"),
    )
    .with_fix(
        "raise --max_length if memory allows, or shorten or filter those rows",
        "内存允许时调大 --max_length，或缩短、过滤这些数据",
    )
}

/// Rows the loader could not read.
pub fn unreadable_rows(rows: u64, strict: bool) -> Diagnostic {
    let (en, zh) = if strict {
        (
            "--strict true stops the run at the first",
            "--strict true 会在第一条处停止训练",
        )
    } else {
        ("they are dropped", "它们会被丢弃")
    };
    Diagnostic::warning(
        "dataset",
        "unreadable_rows",
        format!("{rows} row(s) could not be read; {en}"),
        format!("有 {rows} 条数据无法读取；{zh}"),
    )
    .with_fix(
        "see each row's file, row number and error below, and fix or remove them",
        "查看下方每条的文件、行号和错误，修正或删除",
    )
}

/// Shown rows with nothing to learn from.
pub fn rows_without_labels(rows: u64, shown: u64) -> Diagnostic {
    Diagnostic::warning(
        "dataset",
        "rows_without_labels",
        format!("{rows} of the {shown} row(s) shown have no token that takes loss, so they teach nothing"),
        format!("显示的 {shown} 条数据中有 {rows} 条没有计算损失的 token，对训练没有作用"),
    )
    .with_fix(
        "check that each row ends with an assistant reply, and that max_length leaves room for it",
        "检查每条数据是否以助手回复结尾，且 max_length 足够容纳它",
    )
}

/// Replies without reasoning for a template that trains think blocks.
pub fn replies_without_reasoning(rows: u64, total: u64, template: &str) -> Diagnostic {
    let (en, zh) = if template == "qwen3_thinking" {
        (
            "the model learns to answer after an empty think block",
            "模型会学到在空的 think 块之后直接回答",
        )
    } else {
        (
            "their empty think blocks take no loss (the hybrid template), so those rows do not teach thinking",
            "空 think 块不计损失（混合模板），这些数据不会教会模型思考",
        )
    };
    Diagnostic::info(
        "template",
        "replies_without_reasoning",
        format!("{rows} of {total} shown row(s) have replies without reasoning under template {template}: {en}"),
        format!("模板 {template} 下，显示的 {total} 条数据中有 {rows} 条回复没有推理内容：{zh}"),
    )
    .with_fix(
        "add reasoning (`reasoning_content` or a <think> block) or use a non-thinking template such as qwen3_nothinking",
        "补充推理内容（`reasoning_content` 或 <think> 块），或改用 qwen3_nothinking 等非思考模板",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_the_longest_row_and_max_length_with_round_edges() {
        let lengths = [3, 17, 17, 250, 999];
        let d = LengthDistribution::new(&lengths, 10, 512, TruncationStrategy::Delete);
        assert_eq!((d.rows, d.total_rows, d.min, d.max), (5, 10, 3, 999));
        assert_eq!(d.bins[0].to - d.bins[0].from, 50);
        assert!(d.bins.last().unwrap().to > 999);
        assert_eq!(d.bins.iter().map(|b| b.rows).sum::<u64>(), 5);
        assert_eq!(d.bins[0].rows, 3);
        assert_eq!((d.over_max_length, d.dropped, d.cut), (1, 1, 0));
        let d = LengthDistribution::new(&lengths, 5, 16, TruncationStrategy::Left);
        assert_eq!((d.over_max_length, d.dropped, d.cut), (4, 0, 4));
    }

    #[test]
    fn an_empty_sample_has_one_bin() {
        let d = LengthDistribution::new(&[], 0, 0, TruncationStrategy::Delete);
        assert_eq!(d.bins.len(), 1);
        assert_eq!(d.mean, 0.0);
    }

    #[test]
    fn truncation_follows_the_strategy() {
        use TruncationStrategy::*;
        assert_eq!(Truncation::of(8, 8, Delete), Truncation::Fits);
        assert_eq!(Truncation::of(9, 8, Delete), Truncation::Dropped);
        assert_eq!(Truncation::of(9, 8, Left), Truncation::CutLeft);
        assert_eq!(Truncation::of(9, 8, Right), Truncation::CutRight);
    }

    #[test]
    fn the_preview_round_trips_through_json() {
        let preview = DatasetPreview {
            model: "m".into(),
            template: "qwen3".into(),
            max_length: 8,
            truncation_strategy: TruncationStrategy::Delete,
            datasets: vec![],
            rows: vec![PreviewRow {
                origin: RowOrigin {
                    spec: "a.jsonl".into(),
                    file: "a.jsonl".into(),
                    row: 1,
                },
                text: "ab".into(),
                tokens: vec![PreviewToken {
                    id: 1,
                    text: "ab".into(),
                    trained: true,
                    cut: false,
                    think: false,
                }],
                num_tokens: 1,
                num_trained: 1,
                truncation: Truncation::Fits,
            }],
            lengths: LengthDistribution::new(&[1], 1, 8, TruncationStrategy::Delete),
            bad_rows: vec![],
            diagnostics: vec![think_opener(1, 2)],
        };
        let json = serde_json::to_string(&preview).unwrap();
        assert!(json.contains(r#""row":1"#));
        assert!(
            json.contains(r#"{"id":1,"text":"ab","trained":true}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<DatasetPreview>(&json).unwrap(),
            preview
        );
    }
}
