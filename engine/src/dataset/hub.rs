//! Hugging Face hub datasets through hf-hub, honouring HF_ENDPOINT (a mirror), HF_TOKEN (or the
//! token file hf-hub reads), HF_HOME (the cache) and HF_HUB_OFFLINE (use only what is cached).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    /// The hub's address; `None` = hf-hub's default (https://huggingface.co).
    pub endpoint: Option<String>,
    pub token: Option<String>,
    /// Never touch the network; read the cache only.
    pub offline: bool,
    /// The hub cache; `None` = HF_HOME/hub or ~/.cache/huggingface/hub.
    pub cache_dir: Option<PathBuf>,
}

impl HubSettings {
    pub fn from_env() -> HubSettings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        HubSettings {
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            }),
            cache_dir: None,
        }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

const DATA_EXTENSIONS: &[&str] = &[".jsonl", ".json", ".csv", ".parquet"];

/// Downloads (or finds in the cache) a dataset repository's data files; returns the snapshot
/// folder that holds them.
pub fn download_dataset(id: &str, settings: &HubSettings) -> Result<PathBuf, String> {
    let cache = settings.cache();
    if settings.offline {
        return cached_snapshot(cache.path(), id).ok_or_else(|| {
            format!(
                "HF_HUB_OFFLINE is set and the dataset is not in the cache {}; download it once online or give a local path",
                cache.path().display()
            )
        });
    }
    let mut builder = ApiBuilder::from_cache(cache)
        .with_progress(false)
        .with_retries(1);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if settings.token.is_some() {
        builder = builder.with_token(settings.token.clone());
    }
    let api = builder
        .build()
        .map_err(|e| format!("cannot start the hub client: {e}"))?;
    let repo = api.dataset(id.to_string());
    let unreachable = |e: hf_hub::api::sync::ApiError| {
        format!("cannot fetch it from the hub ({e}); check the id, HF_ENDPOINT and HF_TOKEN, or give a local path")
    };
    let info = repo.info().map_err(unreachable)?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|name| {
            DATA_EXTENSIONS
                .iter()
                .any(|ext| name.to_ascii_lowercase().ends_with(ext))
        })
        .collect();
    if files.is_empty() {
        return Err("the hub repository has no .jsonl, .json, .csv or .parquet files".into());
    }
    let mut snapshot = None;
    for file in &files {
        let path = repo.get(file).map_err(unreachable)?;
        // <cache>/datasets--org--name/snapshots/<sha>/<file>: strip the file's own components.
        let depth = Path::new(file).components().count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| "the download left no files".into())
}

fn cached_snapshot(cache: &Path, id: &str) -> Option<PathBuf> {
    let folder = cache
        .join(format!("datasets--{}", id.replace('/', "--")))
        .join("snapshots");
    std::fs::read_dir(folder)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}
