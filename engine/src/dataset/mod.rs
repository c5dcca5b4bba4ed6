//! Datasets: dataset specs resolve to rows of conversations — local jsonl/json/csv/parquet files and
//! folders, hub datasets (Hugging Face or ModelScope, `crate::hub`), and the built-in `self-cognition` —
//! with ms-swift's `#N` sampling rule, subsets, mixing and its row formats.

mod formats;
mod parquet_file;
mod sampling;
mod self_cognition;

use std::path::{Path, PathBuf};

use serde_json::Value;
use whet_shared::dataset_spec::{DatasetSpec, Hub};
use whet_shared::preview::{BadRow, FormatCount, RowOrigin, MAX_BAD_ROWS_LISTED};

use crate::rng::SplitMix64;

pub use crate::hub::HubSettings;
pub use formats::{row_to_conversation, row_to_conversation_of_kind, RowError, RowFormat, RowKind};
pub use sampling::{data_rng, sample_indices};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The assistant's reasoning, rendered as its think block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Per-message override of whether the reply is trained (ms-swift's `loss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<bool>,
}

impl Role {
    /// The role's name in ChatML (`<|im_start|>user`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            reasoning_content: None,
            loss: None,
        }
    }
}

/// One training sample: a conversation in messages form.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("dataset `{spec}`, {location}: {error} (run without --strict to drop such rows)")]
    StrictRow {
        spec: String,
        location: String,
        error: RowError,
    },
    #[error("dataset `{spec}`: cannot read {path}: {message}")]
    Read {
        spec: String,
        path: PathBuf,
        message: String,
    },
}

/// What the loader needs from the config.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dataset_shuffle: bool,
    /// Fail on the first malformed row instead of dropping it.
    pub strict: bool,
    pub model_name: Vec<String>,
    pub model_author: Vec<String>,
    pub hub: HubSettings,
}

/// One dataset after loading, with what was dropped.
#[derive(Debug, Clone)]
pub struct LoadedDataset {
    pub spec: String,
    pub rows: Vec<Conversation>,
    /// Malformed rows dropped (not counting `#N` sampling).
    pub dropped: usize,
    /// Where each row came from, beside `rows`: an index into `files` and the 1-based row number.
    pub origins: Vec<(u32, u64)>,
    pub files: Vec<String>,
    /// The first malformed rows, with where they are and what is wrong.
    pub bad_rows: Vec<BadRow>,
    /// Rows read in each format (before `#N` sampling), most first.
    pub formats: Vec<FormatCount>,
}

impl LoadedDataset {
    /// Where row `index` came from.
    pub fn origin(&self, index: usize) -> RowOrigin {
        let (file, row) = self.origins[index];
        RowOrigin {
            spec: self.spec.clone(),
            file: self.files[file as usize].clone(),
            row,
        }
    }
}

const SELF_COGNITION_FILE: &str = "self-cognition (built in)";

/// Counts per format, most first (ties by name).
fn format_counts(counts: std::collections::BTreeMap<&'static str, u64>) -> Vec<FormatCount> {
    let mut formats: Vec<FormatCount> = counts
        .into_iter()
        .map(|(format, rows)| FormatCount {
            format: format.to_string(),
            rows,
        })
        .collect();
    formats.sort_by_key(|f| std::cmp::Reverse(f.rows));
    formats
}

/// Registered datasets whose rows need their own rules; `id` is ms-swift's (ModelScope's),
/// `hf_id` the same dataset on Hugging Face. A local folder named like the last part of an id (a git
/// clone of the hub dataset) is read with the same rules.
struct Registered {
    id: &'static str,
    hf_id: &'static str,
    format: RowFormat,
}

const REGISTERED: &[Registered] = &[
    Registered {
        id: "liucong/Chinese-DeepSeek-R1-Distill-data-110k",
        hf_id: "Congliu/Chinese-DeepSeek-R1-Distill-data-110k",
        format: RowFormat::R1Distill,
    },
    Registered {
        id: "liucong/Chinese-DeepSeek-R1-Distill-data-110k-SFT",
        hf_id: "Congliu/Chinese-DeepSeek-R1-Distill-data-110k-SFT",
        format: RowFormat::Auto,
    },
];

fn registration(id: &str) -> Option<&'static Registered> {
    let last = id.trim_end_matches('/').rsplit('/').next().unwrap_or(id);
    REGISTERED
        .iter()
        .find(|r| r.id == id || r.hf_id == id || r.id.rsplit('/').next() == Some(last))
}

/// Loads every spec, in order.
pub fn load_all(
    specs: &[String],
    field: &str,
    options: &LoadOptions,
    rng: &mut SplitMix64,
) -> Result<Vec<LoadedDataset>, DatasetError> {
    specs
        .iter()
        .map(|spec| load(spec, field, options, rng))
        .collect()
}

/// Loads one spec: resolve, read, convert, sample.
pub fn load(
    spec_text: &str,
    field: &str,
    options: &LoadOptions,
    rng: &mut SplitMix64,
) -> Result<LoadedDataset, DatasetError> {
    let spec = DatasetSpec::parse(spec_text, field).map_err(|d| DatasetError::Spec {
        spec: spec_text.to_string(),
        message: format!("{} ({})", d.message_en, d.fix),
    })?;
    let spec_error = |message: String| DatasetError::Spec {
        spec: spec_text.to_string(),
        message,
    };
    let mut loaded = LoadedDataset {
        spec: spec_text.to_string(),
        rows: Vec::new(),
        dropped: 0,
        origins: Vec::new(),
        files: Vec::new(),
        bad_rows: Vec::new(),
        formats: Vec::new(),
    };
    let mut formats = std::collections::BTreeMap::new();
    if self_cognition::is_self_cognition(&spec.id) {
        let subset = spec.subsets.first().map_or("default", String::as_str);
        loaded.rows = self_cognition::rows(subset, &options.model_name, &options.model_author)
            .map_err(spec_error)?;
        loaded.files.push(SELF_COGNITION_FILE.to_string());
        loaded.origins = (1..=loaded.rows.len() as u64).map(|row| (0, row)).collect();
        formats.insert("self_cognition", loaded.rows.len() as u64);
    } else {
        let format = registration(&spec.id).map_or(RowFormat::Auto, |r| r.format);
        let local = Path::new(&spec.id);
        let root = if local.exists() {
            local.to_path_buf()
        } else if spec.is_local {
            return Err(spec_error(format!(
                "no such file or folder `{}`; check the path (relative paths start from the working directory)",
                spec.id
            )));
        } else {
            let hub = options.hub.hub_for(spec.hub);
            let hub_id = registration(&spec.id).map_or(spec.id.as_str(), |r| match hub {
                Hub::Hf => r.hf_id,
                Hub::Ms => r.id,
            });
            crate::hub::dataset_dir(hub_id, Some(hub), &options.hub)
                .map_err(|e| spec_error(e.to_string()))?
        };
        let files = data_files(&root, &spec.subsets).map_err(spec_error)?;
        for file in files {
            let file_index = loaded.files.len() as u32;
            loaded.files.push(file.display().to_string());
            for (index, row) in read_rows(&file)
                .map_err(|message| DatasetError::Read {
                    spec: spec_text.to_string(),
                    path: file.clone(),
                    message,
                })?
                .into_iter()
                .enumerate()
            {
                let converted = match row {
                    Ok(value) => row_to_conversation_of_kind(&value, format),
                    Err(message) => Err(RowError::BadColumn("row", message)),
                };
                match converted {
                    Ok((conversation, kind)) => {
                        loaded.rows.push(conversation);
                        loaded.origins.push((file_index, index as u64 + 1));
                        *formats.entry(kind.name()).or_insert(0) += 1;
                    }
                    Err(error) if options.strict => {
                        return Err(DatasetError::StrictRow {
                            spec: spec_text.to_string(),
                            location: format!("{} row {}", file.display(), index + 1),
                            error,
                        })
                    }
                    Err(error) => {
                        loaded.dropped += 1;
                        if loaded.bad_rows.len() < MAX_BAD_ROWS_LISTED {
                            loaded.bad_rows.push(BadRow {
                                origin: RowOrigin {
                                    spec: spec_text.to_string(),
                                    file: file.display().to_string(),
                                    row: index as u64 + 1,
                                },
                                error: error.to_string(),
                            });
                        }
                    }
                }
            }
        }
    }
    loaded.formats = format_counts(formats);
    if loaded.rows.is_empty() {
        let first_bad = loaded.bad_rows.first().map_or(String::new(), |bad| {
            format!(
                " ({} malformed; the first, {} row {}: {})",
                loaded.dropped, bad.origin.file, bad.origin.row, bad.error
            )
        });
        return Err(spec_error(format!("no usable rows{first_bad}")));
    }
    if let Some(n) = spec.sample {
        let indices = sample_indices(loaded.rows.len(), n as usize, options.dataset_shuffle, rng);
        loaded.rows = indices.iter().map(|&i| loaded.rows[i].clone()).collect();
        loaded.origins = indices.iter().map(|&i| loaded.origins[i]).collect();
    }
    Ok(loaded)
}

const DATA_EXTENSIONS: &[&str] = &["jsonl", "json", "csv", "parquet"];

/// The data files of a file or folder: the file itself, or the folder's data files (those of the
/// named subsets when given; those with `train` in their name when any has).
fn data_files(root: &Path, subsets: &[String]) -> Result<Vec<PathBuf>, String> {
    if root.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut roots = Vec::new();
    if subsets.is_empty() || subsets.iter().all(|s| s == "default") {
        roots.push(root.to_path_buf());
    } else {
        for subset in subsets {
            let dir = root.join(subset);
            if !dir.is_dir() {
                return Err(format!("subset `{subset}` not found in {}", root.display()));
            }
            roots.push(dir);
        }
    }
    let mut files = Vec::new();
    for dir in roots {
        collect_files(&dir, &mut files)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    }
    files.sort();
    let train: Vec<PathBuf> = files
        .iter()
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("train"))
        })
        .cloned()
        .collect();
    let files = if train.is_empty() { files } else { train };
    if files.is_empty() {
        return Err(format!(
            "{} holds no .jsonl, .json, .csv or .parquet files",
            root.display()
        ));
    }
    Ok(files)
}

/// Whether a file's extension is one the loader reads.
pub(crate) fn is_data_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| DATA_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The data files under `dir`, recursively, skipping hidden files and folders.
pub(crate) fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if is_data_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads a data file's rows; a row that is not valid JSON is an `Err` (dropped or, with
/// `--strict`, reported with its number).
fn read_rows(path: &Path) -> Result<Vec<Result<Value, String>>, String> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let text = || std::fs::read_to_string(path).map_err(|e| e.to_string());
    match extension.as_str() {
        "jsonl" => Ok(text()?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| e.to_string()))
            .collect()),
        "json" => {
            let text = text()?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Array(items)) => Ok(items.into_iter().map(Ok).collect()),
                Ok(other) => Ok(vec![Ok(other)]),
                // Many ".json" files are JSON lines.
                Err(_) => Ok(text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str(l).map_err(|e| e.to_string()))
                    .collect()),
            }
        }
        "csv" => {
            let mut reader = csv::Reader::from_path(path).map_err(|e| e.to_string())?;
            let headers = reader.headers().map_err(|e| e.to_string())?.clone();
            Ok(reader
                .records()
                .map(|record| {
                    let record = record.map_err(|e| e.to_string())?;
                    let map: serde_json::Map<String, Value> = headers
                        .iter()
                        .zip(record.iter())
                        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                        .collect();
                    Ok(Value::Object(map))
                })
                .collect())
        }
        "parquet" => parquet_file::read_rows(path),
        other => Err(format!(
            "`.{other}` files are not supported (use .jsonl, .json, .csv or .parquet)"
        )),
    }
}

#[cfg(test)]
mod tests;
