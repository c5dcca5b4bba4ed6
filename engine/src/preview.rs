//! `whet dataset preview`: the config's datasets as training will see them — loaded with the
//! same `#N` sampling, rendered with the same template and tokenizer, max_length and
//! truncation_strategy applied as training applies them — for the first rows in full, and as a
//! length distribution for the first [`LENGTH_SAMPLE_ROWS`]. The answer is whet-shared's
//! [`DatasetPreview`], which the studio draws.

use anyhow::Context;
use rayon::prelude::*;
use whet_shared::preview::{
    self, DatasetPreview, DatasetSummary, LengthDistribution, PreviewRow, PreviewToken, Truncation,
    LENGTH_SAMPLE_ROWS, MAX_BAD_ROWS_LISTED,
};
use whet_shared::JobConfig;

use crate::dataset::{self, Conversation, LoadedDataset, Role};
use crate::hub::ModelFiles;
use crate::rng::SplitMix64;
use crate::train::data::{
    load_options, rows_training_think_opener, split_reasoning, truncate, ChatTokenizer,
    RenderOptions, IGNORE_INDEX,
};
use crate::train::setup::DataSettings;

/// The preview of `config`'s training datasets, `rows_shown` rows in full.
pub fn preview(config: &JobConfig, rows_shown: usize) -> anyhow::Result<DatasetPreview> {
    let sft = &config.sft;
    if sft.dataset.is_empty() {
        anyhow::bail!("--dataset is required: the preview renders its rows (a local .jsonl file, a folder or a hub id)");
    }
    // The tokenizer is all a preview needs of a hub model: no weights are downloaded.
    let settings = DataSettings::resolve(config, ModelFiles::WithoutWeights)?;
    // Unreadable rows are listed rather than fatal, whatever --strict says (its warning says
    // what training will do with them).
    let mut options = load_options(sft);
    options.strict = false;
    let mut rng = SplitMix64::new(sft.data_seed as u64);
    let train = dataset::load_all(&sft.dataset, "dataset", &options, &mut rng)?;
    let val = dataset::load_all(&sft.val_dataset, "val_dataset", &options, &mut rng)?;

    let max_length = settings.max_length as u64;
    let strategy = sft.truncation_strategy;
    let indexed: Vec<(&LoadedDataset, usize)> = train
        .iter()
        .flat_map(|d| (0..d.rows.len()).map(move |i| (d, i)))
        .collect();
    let rows = indexed
        .iter()
        .take(rows_shown)
        .map(|&(d, i)| preview_row(&settings, d, i, strategy))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let measured: Vec<&Conversation> = indexed
        .iter()
        .take(LENGTH_SAMPLE_ROWS)
        .map(|&(d, i)| &d.rows[i])
        .collect();
    let lengths = measured
        .par_iter()
        .map(|row| {
            let sample = settings
                .tokenizer
                .encode_conversation(row, &settings.render)?;
            Ok(sample.input_ids.len() as u64)
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let lengths = LengthDistribution::new(&lengths, indexed.len() as u64, max_length, strategy);

    let all_rows: Vec<Conversation> = train.iter().flat_map(|d| d.rows.clone()).collect();
    let mut diagnostics = Vec::new();
    let think_openers = rows_training_think_opener(&all_rows, &settings.render) as u64;
    if think_openers > 0 {
        diagnostics.push(preview::think_opener(think_openers, all_rows.len() as u64));
    }
    if lengths.over_max_length > 0 {
        diagnostics.push(preview::over_max_length(
            lengths.over_max_length,
            lengths.rows,
            max_length,
            strategy,
        ));
    }
    let unreadable: u64 = train.iter().chain(&val).map(|d| d.dropped as u64).sum();
    if unreadable > 0 {
        diagnostics.push(preview::unreadable_rows(unreadable, sft.strict));
    }
    let unlabelled = rows
        .iter()
        .filter(|r| r.truncation != Truncation::Dropped && r.num_trained == 0)
        .count() as u64;
    if unlabelled > 0 {
        diagnostics.push(preview::rows_without_labels(unlabelled, rows.len() as u64));
    }
    if preview::template_thinks(&settings.template_name) {
        let shown: Vec<&Conversation> = indexed
            .iter()
            .take(rows_shown)
            .map(|&(d, i)| &d.rows[i])
            .collect();
        let without = shown.iter().filter(|row| lacks_reasoning(row)).count() as u64;
        if without > 0 {
            diagnostics.push(preview::replies_without_reasoning(
                without,
                shown.len() as u64,
                &settings.template_name,
            ));
        }
    }

    let datasets = train
        .iter()
        .map(|d| (d, "dataset"))
        .chain(val.iter().map(|d| (d, "val_dataset")))
        .map(|(d, field)| DatasetSummary {
            spec: d.spec.clone(),
            field: field.to_string(),
            rows: d.rows.len() as u64,
            bad_rows: d.dropped as u64,
            formats: d.formats.clone(),
        })
        .collect();
    let bad_rows = train
        .iter()
        .chain(&val)
        .flat_map(|d| d.bad_rows.iter().cloned())
        .take(MAX_BAD_ROWS_LISTED)
        .collect();
    Ok(DatasetPreview {
        model: settings.model_id.clone(),
        template: settings.template_name.clone(),
        max_length,
        truncation_strategy: strategy,
        datasets,
        rows,
        lengths,
        bad_rows,
        diagnostics,
    })
}

/// A row with an assistant reply that has no reasoning (no `reasoning_content`, no think block).
fn lacks_reasoning(row: &Conversation) -> bool {
    row.messages
        .iter()
        .any(|m| m.role == Role::Assistant && split_reasoning(m).0.trim().is_empty())
}

/// Row `index` of `dataset`, rendered and tokenized, with what max_length does to it.
fn preview_row(
    settings: &DataSettings,
    dataset: &LoadedDataset,
    index: usize,
    strategy: whet_shared::config::TruncationStrategy,
) -> anyhow::Result<PreviewRow> {
    let tokenizer: &ChatTokenizer = &settings.tokenizer;
    let render: &RenderOptions = &settings.render;
    let origin = dataset.origin(index);
    let (sample, texts) = tokenizer
        .encode_conversation_with_text(&dataset.rows[index], render)
        .with_context(|| format!("{} row {}", origin.file, origin.row))?;
    let num_tokens = sample.input_ids.len();
    let max_length = settings.max_length;
    let truncation = Truncation::of(num_tokens as u64, max_length as u64, strategy);
    // Which tokens training keeps, and the labels it gives them (a left cut unlabels the new
    // first token), from the same `truncate` training calls.
    let kept = match truncation {
        Truncation::CutLeft => num_tokens - max_length..num_tokens,
        Truncation::CutRight => 0..max_length,
        Truncation::Fits | Truncation::Dropped => 0..num_tokens,
    };
    let trained_labels = truncate(sample.clone(), max_length, strategy).map(|s| s.labels);
    let mut in_think = false;
    let tokens: Vec<PreviewToken> = sample
        .input_ids
        .iter()
        .zip(texts)
        .enumerate()
        .map(|(position, (&id, text))| {
            let cut = !kept.contains(&position);
            let label = match (&trained_labels, cut) {
                (Some(labels), false) => labels[position - kept.start],
                _ => sample.labels[position],
            };
            let opens = text.contains("<think>");
            let closes = text.contains("</think>");
            in_think |= opens;
            let think = in_think;
            if closes {
                in_think = false;
            }
            PreviewToken {
                id,
                trained: label != IGNORE_INDEX,
                cut,
                think,
                text,
            }
        })
        .collect();
    let num_trained = match truncation {
        Truncation::Dropped => 0,
        _ => tokens.iter().filter(|t| t.trained && !t.cut).count() as u64,
    };
    Ok(PreviewRow {
        origin,
        text: tokens.iter().map(|t| t.text.as_str()).collect(),
        tokens,
        num_tokens: num_tokens as u64,
        num_trained,
        truncation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use whet_shared::config::TruncationStrategy;

    fn workspace() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn demo_config(edit: impl FnOnce(&mut JobConfig)) -> JobConfig {
        let text = std::fs::read_to_string(workspace().join("examples/demo.yaml")).unwrap();
        let mut config = whet_shared::parse_config_text(&text, whet_shared::Format::Yaml).unwrap();
        let root = workspace();
        let at = |p: &str| root.join(p).display().to_string();
        config.sft.model = Some(at("examples/tiny-qwen3"));
        config.sft.dataset = vec![at("examples/demo/train.jsonl")];
        config.sft.val_dataset = vec![at("examples/demo/val.jsonl")];
        edit(&mut config);
        config
    }

    #[test]
    fn the_demo_previews_with_its_replies_trained_and_its_questions_not() {
        let preview = preview(&demo_config(|_| {}), 3).unwrap();
        assert_eq!(preview.template, "qwen3_thinking");
        assert_eq!(preview.rows.len(), 3);
        let row = &preview.rows[0];
        assert_eq!(row.origin.row, 1);
        assert!(row.origin.file.ends_with("train.jsonl"));
        let joined: String = row.tokens.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(joined, row.text);
        let trained: String = row
            .tokens
            .iter()
            .filter(|t| t.trained)
            .map(|t| t.text.as_str())
            .collect();
        let untrained: String = row
            .tokens
            .iter()
            .filter(|t| !t.trained)
            .map(|t| t.text.as_str())
            .collect();
        assert!(trained.starts_with("<think>") && trained.ends_with("<|im_end|>"));
        assert!(untrained.contains("<|im_start|>user"));
        assert!(row
            .tokens
            .iter()
            .any(|t| t.think && t.text.contains("</think>")));
        assert_eq!(
            row.num_trained as usize,
            row.tokens.iter().filter(|t| t.trained).count()
        );
        assert_eq!(row.truncation, Truncation::Fits);
        assert_eq!(preview.datasets.len(), 2);
        assert_eq!(preview.datasets[0].formats[0].format, "messages");
        assert_eq!(preview.lengths.total_rows, preview.datasets[0].rows);
        assert_eq!(
            preview.lengths.bins.iter().map(|b| b.rows).sum::<u64>(),
            preview.lengths.rows
        );
    }

    #[test]
    fn truncation_marks_cut_tokens_and_counts_what_is_left() {
        for (strategy, expected) in [
            (TruncationStrategy::Delete, Truncation::Dropped),
            (TruncationStrategy::Left, Truncation::CutLeft),
            (TruncationStrategy::Right, Truncation::CutRight),
        ] {
            let config = demo_config(|c| {
                c.sft.max_length = Some(12);
                c.sft.truncation_strategy = strategy;
            });
            let preview = preview(&config, 1).unwrap();
            let row = &preview.rows[0];
            assert_eq!(row.truncation, expected);
            let cut = row.tokens.iter().filter(|t| t.cut).count() as u64;
            let kept_trained = row.tokens.iter().filter(|t| t.trained && !t.cut).count() as u64;
            match expected {
                Truncation::Dropped => assert_eq!((cut, row.num_trained), (0, 0)),
                _ => {
                    assert_eq!(cut, row.num_tokens - 12);
                    assert_eq!(row.num_trained, kept_trained);
                }
            }
            if expected == Truncation::CutRight {
                assert!(row.tokens.last().unwrap().cut && !row.tokens[0].cut);
            }
            if expected == Truncation::CutLeft {
                assert!(row.tokens[0].cut && !row.tokens.last().unwrap().cut);
            }
            assert!(preview
                .diagnostics
                .iter()
                .any(|d| d.code == "rows_over_max_length"));
        }
    }

    #[test]
    fn bad_rows_are_listed_with_their_file_and_row_and_warned_about() {
        let dir = std::env::temp_dir().join(format!("whet-preview-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mixed.jsonl");
        std::fs::write(
            &file,
            concat!(
                r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"<think>\nsay hi\n</think>\n\nhello"}]}"#, "\n",
                "not json\n",
                r#"{"instruction":"add","input":"1 2","output":"3"}"#, "\n",
                r#"{"messages":[{"role":"user","content":"no reply"}]}"#, "\n",
            ),
        )
        .unwrap();
        let config = demo_config(|c| {
            c.sft.dataset = vec![file.display().to_string()];
            c.sft.val_dataset = vec![];
            c.sft.strict = true;
        });
        let preview = preview(&config, 5).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(preview.rows.len(), 2);
        assert_eq!(preview.rows[1].origin.row, 3);
        let bad: Vec<u64> = preview.bad_rows.iter().map(|b| b.origin.row).collect();
        assert_eq!(bad, [2, 4]);
        assert!(preview.bad_rows[1].error.contains("assistant"));
        let formats: Vec<(&str, u64)> = preview.datasets[0]
            .formats
            .iter()
            .map(|f| (f.format.as_str(), f.rows))
            .collect();
        assert_eq!(formats, [("alpaca", 1), ("messages", 1)]);
        let unreadable = preview
            .diagnostics
            .iter()
            .find(|d| d.code == "unreadable_rows")
            .unwrap();
        assert!(unreadable.message_en.contains("--strict true stops"));
        // The alpaca reply has no reasoning, under a thinking template.
        assert!(preview
            .diagnostics
            .iter()
            .any(|d| d.code == "replies_without_reasoning"));
    }

    #[test]
    fn replies_that_begin_with_think_are_warned_about_on_a_thinking_model() {
        // The demo puts its reasoning in reasoning_content: nothing to warn about.
        let demo = preview(&demo_config(|_| {}), 1).unwrap();
        assert!(!demo
            .diagnostics
            .iter()
            .any(|d| d.code == "reply_begins_with_think"));
        let dir = std::env::temp_dir().join(format!("whet-preview-think-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("inline.jsonl");
        std::fs::write(
            &file,
            concat!(
                r#"{"messages":[{"role":"user","content":"1+1"},{"role":"assistant","content":"<think>\n1+1=2\n</think>\n\n2"}]}"#, "\n",
                r#"{"messages":[{"role":"user","content":"2+2"},{"role":"assistant","content":"4","reasoning_content":"2+2=4"}]}"#, "\n",
            ),
        )
        .unwrap();
        let config = demo_config(|c| {
            c.sft.dataset = vec![file.display().to_string()];
            c.sft.val_dataset = vec![];
        });
        let inline = preview(&config, 2).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let warning = inline
            .diagnostics
            .iter()
            .find(|d| d.code == "reply_begins_with_think")
            .expect("a warning");
        assert!(warning.message_en.starts_with("1 of 2"));
        assert!(warning.message_zh.contains("<think>") && warning.message_zh != warning.message_en);
        // Both rows render the same think block, however the data spelled it.
        let think = |row: &PreviewRow| -> String {
            row.tokens
                .iter()
                .filter(|t| t.think)
                .map(|t| t.text.as_str())
                .collect()
        };
        assert_eq!(think(&inline.rows[0]), "<think>\n1+1=2\n</think>");
        assert_eq!(think(&inline.rows[1]), "<think>\n2+2=4\n</think>");
    }
}
