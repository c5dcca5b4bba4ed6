//! Safetensors files, the one place whet reads and writes them: a model folder's weights
//! memory-mapped (one `model.safetensors`, or shards named by `model.safetensors.index.json`)
//! with only the tensors asked for materialised, and named tensors written as one file or as
//! transformers' shards plus index (the model, the optimizer state and checkpoints all use it).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

/// What went wrong with a safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: String },
    #[error("cannot read or write {path}: {message}")]
    Io { path: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn io_error(path: &Path, message: impl ToString) -> TensorFileError {
    TensorFileError::Io {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The `format: pt` metadata transformers expects in a model's safetensors.
pub fn pt_metadata() -> HashMap<String, String> {
    [("format".to_string(), "pt".to_string())].into()
}

/// Weights in one or more memory-mapped safetensors files. Opening reads only the headers;
/// [`MappedWeights::load`] copies one tensor out, so a process never holds more of a large
/// checkpoint in its own memory than the tensors it asked for (the mapped pages are the page
/// cache's, shared and evictable).
pub struct MappedWeights {
    files: MmapedSafetensors,
    names: BTreeSet<String>,
    origin: PathBuf,
}

impl MappedWeights {
    /// The files of a model folder: `model.safetensors`, else every shard of the index.
    pub fn open_model_dir(dir: &Path) -> Result<Self, TensorFileError> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open(&[single], dir);
        }
        let index = dir.join("model.safetensors.index.json");
        if !index.exists() {
            return Err(TensorFileError::NoWeights {
                dir: dir.display().to_string(),
            });
        }
        let text = std::fs::read_to_string(&index).map_err(|e| io_error(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| io_error(&index, e))?;
        let weight_map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| io_error(&index, "no `weight_map` object"))?;
        let shards: BTreeSet<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        Self::open(&paths, dir)
    }

    /// Several files as one set of names (a name in two files: the later file's tensor).
    pub fn open(paths: &[PathBuf], origin: &Path) -> Result<Self, TensorFileError> {
        for path in paths {
            if !path.exists() {
                return Err(io_error(path, "file not found"));
            }
        }
        // SAFETY: the files are mapped read-only and each tensor is copied out on load; whet
        // never writes a file it has mapped (checkpoints are written to new temporary folders).
        let files = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| io_error(origin, e))?;
        let names = files.tensors().into_iter().map(|(name, _)| name).collect();
        Ok(Self {
            files,
            names,
            origin: origin.to_path_buf(),
        })
    }

    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The tensor `name` on `device`, in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, TensorFileError> {
        self.files
            .load(name, device)
            .map_err(|e| io_error(&self.origin, format!("tensor `{name}`: {e}")))
    }

    /// The shape and stored dtype of `name`, read from the header only (None for a dtype candle
    /// has no counterpart for, such as a bitsandbytes-packed tensor's).
    pub fn describe(&self, name: &str) -> Result<(Vec<usize>, Option<DType>), TensorFileError> {
        let view = self
            .files
            .get(name)
            .map_err(|e| io_error(&self.origin, format!("tensor `{name}`: {e}")))?;
        Ok((view.shape().to_vec(), DType::try_from(view.dtype()).ok()))
    }
}

/// Reads every tensor of one small file (optimizer state, fixtures) onto `device`.
pub fn read_all(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, TensorFileError> {
    candle_core::safetensors::load(path, device).map_err(|e| io_error(path, e))
}

/// The string metadata of a safetensors file's header.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, TensorFileError> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| io_error(path, e))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Writes named tensors (moved to the CPU) with the given metadata to one file.
pub fn write(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<(), TensorFileError> {
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| io_error(path, e))
}

/// Writes a model's weights into `dir` as `save_pretrained` does: one `model.safetensors`, or,
/// past `max_shard_bytes`, `model-0000i-of-0000n.safetensors` shards plus
/// `model.safetensors.index.json`. Returns the files written.
pub fn write_model_weights(
    dir: &Path,
    state: Vec<(String, Tensor)>,
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>, TensorFileError> {
    let sizes = state
        .iter()
        .map(|(name, t)| (name.clone(), t.elem_count() * t.dtype().size_in_bytes()))
        .collect();
    let mut tensors: HashMap<String, Tensor> = state.into_iter().collect();
    write_model_weights_with(dir, sizes, max_shard_bytes, |name| {
        Ok(tensors
            .remove(name)
            .expect("every planned tensor is in the state"))
    })
}

/// [`write_model_weights`] for tensors made on demand: `sizes` names each tensor with its size
/// in bytes (in file order) and `make` produces it when its shard is written, so at most one
/// shard's tensors are in memory at a time (a merge of a model larger than RAM).
pub fn write_model_weights_with(
    dir: &Path,
    sizes: Vec<(String, usize)>,
    max_shard_bytes: usize,
    mut make: impl FnMut(&str) -> Result<Tensor, TensorFileError>,
) -> Result<Vec<PathBuf>, TensorFileError> {
    let mut write_shard = |path: &Path, names: &[String]| -> Result<(), TensorFileError> {
        let tensors = names
            .iter()
            .map(|name| Ok((name.clone(), make(name)?)))
            .collect::<Result<Vec<_>, TensorFileError>>()?;
        write(path, tensors, pt_metadata())
    };
    let total_size: usize = sizes.iter().map(|(_, size)| size).sum();
    if total_size <= max_shard_bytes {
        let path = dir.join("model.safetensors");
        let names: Vec<String> = sizes.into_iter().map(|(name, _)| name).collect();
        write_shard(&path, &names)?;
        return Ok(vec![path]);
    }
    // Greedy in checkpoint order, as transformers shards: a tensor larger than the limit gets a
    // shard of its own.
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut current = 0usize;
    for (name, size) in sizes {
        let last = shards.last_mut().expect("one shard at least");
        if !last.is_empty() && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        shards.last_mut().expect("one shard at least").push(name);
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut written = Vec::with_capacity(count + 1);
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for name in &shard {
            weight_map.insert(name.clone(), file.clone().into());
        }
        let path = dir.join(&file);
        write_shard(&path, &shard)?;
        written.push(path);
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    });
    let path = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).expect("valid JSON");
    std::fs::write(&path, text).map_err(|e| io_error(&path, e))?;
    written.push(path);
    Ok(written)
}
