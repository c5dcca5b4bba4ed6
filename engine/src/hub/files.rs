//! Which files of a repository whet fetches, and whether a folder holds all of them: for a
//! model config.json, the tokenizer files and the safetensors weights (one file, or the index
//! and every shard it names; never `*.bin`); for a dataset its data files.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    pub(super) fn noun(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// How much of a model repository a caller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFiles {
    /// Config, tokenizer files and the safetensors weights: what training and inference load.
    All,
    /// Config and tokenizer files only: what rendering and tokenizing data needs (`whet dataset
    /// preview` of a 60 GB model fetches a few MB).
    WithoutWeights,
}

const MODEL_REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
/// Fetched when the repository has them: what transformers reads and the checkpoint writer
/// copies (the tokenizer files besides tokenizer.json, and the generation config).
fn model_optional() -> impl Iterator<Item = &'static &'static str> {
    std::iter::once(&"generation_config.json").chain(
        crate::train::checkpoint::TOKENIZER_FILES
            .iter()
            .filter(|f| !MODEL_REQUIRED.contains(f)),
    )
}
const WEIGHTS: &str = "model.safetensors";
pub(super) const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The files to fetch first (the shards an index names come after it is read).
pub(super) fn first_files(
    kind: RepoKind,
    files: ModelFiles,
    listing: &[String],
) -> Result<Vec<String>, String> {
    match kind {
        RepoKind::Model => model_first_files(listing, files),
        RepoKind::Dataset => {
            let data: Vec<String> = listing
                .iter()
                .filter(|f| is_inside(f) && crate::dataset::is_data_file(Path::new(f)))
                .cloned()
                .collect();
            if data.is_empty() {
                Err("the repository has no .jsonl, .json, .csv or .parquet files".into())
            } else {
                Ok(data)
            }
        }
    }
}

fn model_first_files(listing: &[String], files: ModelFiles) -> Result<Vec<String>, String> {
    let has = |name: &str| listing.iter().any(|f| f == name);
    if let Some(absent) = MODEL_REQUIRED.iter().find(|name| !has(name)) {
        return Err(format!(
            "the repository has no {absent}; whet needs config.json, tokenizer.json and safetensors weights"
        ));
    }
    let text = MODEL_REQUIRED
        .iter()
        .chain(model_optional().filter(|name| has(name)))
        .map(|name| name.to_string());
    if files == ModelFiles::WithoutWeights {
        return Ok(text.collect());
    }
    let weights = if has(WEIGHTS_INDEX) {
        WEIGHTS_INDEX
    } else if has(WEIGHTS) {
        WEIGHTS
    } else {
        return Err(format!(
            "the repository has neither {WEIGHTS} nor {WEIGHTS_INDEX}; whet reads safetensors weights only (convert *.bin weights with transformers' save_pretrained)"
        ));
    };
    Ok(text.chain(std::iter::once(weights.to_string())).collect())
}

/// A listed path that stays inside the repository folder (no `..`, not absolute).
fn is_inside(path: &str) -> bool {
    !path.starts_with('/')
        && !path.contains('\\')
        && path.split('/').all(|part| !part.is_empty() && part != "..")
}

/// The shard files an index names, each once, in order.
pub(super) fn shards_of_index(index: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| format!("cannot read {}: {e}", index.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", index.display()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{} has no weight_map", index.display()))?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| format!("{} maps a tensor to a non-string", index.display()))?;
        // A shard name is a plain file beside the index; anything else would leave the folder.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(format!(
                "{} names the shard `{file}`, which is not a file name",
                index.display()
            ));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards)
}

/// What `dir` lacks to be a complete copy; empty when it is complete.
pub(super) fn missing(kind: RepoKind, files: ModelFiles, dir: &Path) -> Vec<String> {
    match kind {
        RepoKind::Model => {
            let mut missing: Vec<String> = MODEL_REQUIRED
                .iter()
                .filter(|name| !dir.join(name).is_file())
                .map(|name| name.to_string())
                .collect();
            if files == ModelFiles::WithoutWeights {
                return missing;
            }
            if dir.join(WEIGHTS_INDEX).is_file() {
                match shards_of_index(&dir.join(WEIGHTS_INDEX)) {
                    Ok(shards) => missing.extend(
                        shards
                            .into_iter()
                            .filter(|shard| !dir.join(shard).is_file()),
                    ),
                    Err(_) => missing.push(format!("a readable {WEIGHTS_INDEX}")),
                }
            } else if !dir.join(WEIGHTS).is_file() {
                missing.push(WEIGHTS.to_string());
            }
            missing
        }
        RepoKind::Dataset => {
            let mut data = Vec::new();
            let listed = crate::dataset::collect_files(dir, &mut data).is_ok();
            if listed && !data.is_empty() {
                Vec::new()
            } else {
                vec!["data files (.jsonl, .json, .csv or .parquet)".to_string()]
            }
        }
    }
}
