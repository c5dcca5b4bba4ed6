//! Models and datasets from a hub, as ms-swift finds them: Hugging Face through hf-hub
//! (`hf.rs`) when `use_hf` is true, ModelScope's HTTP file API (`modelscope.rs`) when it is false,
//! each into its usual cache. `HubSettings::from_env` is the one place that reads the hub
//! variables; everything else is handed a `HubSettings`, so tests build one directly.

mod files;
mod hf;
mod modelscope;
mod progress;

use std::path::{Path, PathBuf};

use whet_shared::SftConfig;

pub use whet_shared::dataset_spec::Hub;

pub use files::ModelFiles;
use files::RepoKind;

/// Where and how hub downloads happen.
#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    /// Where a hub id without `hf::`/`ms::` goes: ms-swift's `--use_hf` (or `USE_HF=1`).
    pub use_hf: bool,
    /// HF_HUB_OFFLINE: never touch the network; read the caches only (both hubs).
    pub offline: bool,
    /// Draw a progress bar (stderr is a terminal) rather than a plain line per file.
    pub show_bar: bool,
    pub hf: HubAccess,
    pub modelscope: HubAccess,
}

/// One hub's address, token and cache.
#[derive(Debug, Clone, Default)]
pub struct HubAccess {
    /// The hub's address; `None` = the public hub.
    pub endpoint: Option<String>,
    pub token: Option<String>,
    /// The cache root; `None` = unknown (no HOME), which is an error only when it is needed.
    pub cache_dir: Option<PathBuf>,
}

const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const MODELSCOPE_DEFAULT_ENDPOINT: &str = "https://www.modelscope.cn";

impl HubSettings {
    /// The settings the process environment gives, with ms-swift's `use_hf` from the config.
    pub fn from_env(use_hf: bool) -> HubSettings {
        use std::io::IsTerminal;
        let mut settings = HubSettings::from_vars(use_hf, |name| std::env::var(name).ok());
        settings.show_bar = std::io::stderr().is_terminal();
        settings
    }

    /// The settings for variables looked up with `var`: HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE,
    /// HF_HOME, HF_HUB_OFFLINE, USE_HF, MODELSCOPE_DOMAIN, MODELSCOPE_API_TOKEN, MODELSCOPE_CACHE.
    pub fn from_vars(use_hf: bool, var: impl Fn(&str) -> Option<String>) -> HubSettings {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home = var("HOME").map(PathBuf::from);
        let expand = |path: String| match (path.strip_prefix("~/"), &home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(path),
        };
        let hf_cache = var("HF_HUB_CACHE").map(expand).or_else(|| {
            var("HF_HOME")
                .map(|h| expand(h).join("hub"))
                .or_else(|| home.as_ref().map(|h| h.join(".cache/huggingface/hub")))
        });
        let modelscope_cache = var("MODELSCOPE_CACHE")
            .map(expand)
            .or_else(|| home.as_ref().map(|h| h.join(".cache/modelscope/hub")));
        HubSettings {
            use_hf: use_hf || var("USE_HF").is_some_and(|v| is_truthy(&v)),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v)),
            show_bar: false,
            hf: HubAccess {
                endpoint: var("HF_ENDPOINT"),
                token: var("HF_TOKEN"),
                cache_dir: hf_cache,
            },
            modelscope: HubAccess {
                // ModelScope's SDK takes a bare domain and puts https:// before it.
                endpoint: var("MODELSCOPE_DOMAIN").map(|d| {
                    if d.starts_with("http://") || d.starts_with("https://") {
                        d
                    } else {
                        format!("https://{d}")
                    }
                }),
                token: var("MODELSCOPE_API_TOKEN"),
                cache_dir: modelscope_cache,
            },
        }
    }

    /// The hub a spec goes to: the one it names, else ms-swift's default for `use_hf`.
    pub fn hub_for(&self, named: Option<Hub>) -> Hub {
        named.unwrap_or(if self.use_hf { Hub::Hf } else { Hub::Ms })
    }
}

fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// What went wrong finding or fetching a repository.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("--model {0} is not a folder (no such path, and it is not a hub id like Qwen/Qwen3-0.6B); check the path")]
    NoSuchFolder(String),
    #[error("--model {0} is a folder without config.json; pass a model folder (config.json, tokenizer.json, *.safetensors) or a hub id")]
    NotAModelFolder(String),
    #[error("`{0}` is not a hub id (expected owner/name, letters, digits, `-`, `_` and `.`); pass a hub id or a local path")]
    BadId(String),
    #[error("--model_revision `{0}` is not a branch, tag or commit name")]
    BadRevision(String),
    #[error("{target} is not in the {hub} cache {cache}{missing}, and HF_HUB_OFFLINE is set; run once online without HF_HUB_OFFLINE, or pass a local folder")]
    NotCached {
        hub: &'static str,
        target: String,
        cache: String,
        missing: String,
    },
    #[error("cannot reach {hub} at {endpoint} for {target} ({reason}); check the network or {endpoint_var} (a mirror's address), set HF_HUB_OFFLINE=1 to use only what is cached, or pass a local folder")]
    Unreachable {
        hub: &'static str,
        endpoint: String,
        endpoint_var: &'static str,
        target: String,
        reason: String,
    },
    #[error("{hub} at {endpoint} answered HTTP {status} for {target}; {fix}")]
    Refused {
        hub: &'static str,
        endpoint: String,
        target: String,
        status: u16,
        fix: String,
    },
    #[error("{target}: {message}")]
    Repo { target: String, message: String },
    #[error("no cache folder for {hub}: HOME is not set; set {var}")]
    NoCache {
        hub: &'static str,
        var: &'static str,
    },
}

/// One repository to fetch: which hub, what kind, which id and revision.
#[derive(Debug, Clone)]
struct Target {
    hub: Hub,
    kind: RepoKind,
    /// A model's files that are wanted (a dataset's data files are always all wanted).
    files: ModelFiles,
    id: String,
    revision: String,
}

impl Target {
    fn new(hub: Hub, kind: RepoKind, id: &str, revision: Option<&str>) -> Result<Target, HubError> {
        check_id(hub, id)?;
        // A revision names a cache ref (and goes into URLs): a branch, tag or commit.
        if let Some(bad) = revision.filter(|r| {
            r.starts_with('/')
                || r.split('/').any(|p| p == "..")
                || !r
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        }) {
            return Err(HubError::BadRevision(bad.to_string()));
        }
        let default_revision = match hub {
            Hub::Hf => "main",
            Hub::Ms => "master",
        };
        Ok(Target {
            hub,
            kind,
            files: ModelFiles::All,
            id: id.to_string(),
            revision: revision
                .filter(|r| !r.trim().is_empty())
                .unwrap_or(default_revision)
                .to_string(),
        })
    }

    fn hub_cache_name(&self) -> &'static str {
        match self.hub {
            Hub::Hf => "Hugging Face",
            Hub::Ms => "ModelScope",
        }
    }

    fn hub_name(&self) -> &'static str {
        match self.hub {
            Hub::Hf => "the Hugging Face hub",
            Hub::Ms => "ModelScope",
        }
    }

    /// The variables that name this hub's address and token.
    fn endpoint_var(&self) -> &'static str {
        match self.hub {
            Hub::Hf => "HF_ENDPOINT",
            Hub::Ms => "MODELSCOPE_DOMAIN",
        }
    }

    fn token_var(&self) -> &'static str {
        match self.hub {
            Hub::Hf => "HF_TOKEN",
            Hub::Ms => "MODELSCOPE_API_TOKEN",
        }
    }

    fn unreachable(&self, endpoint: &str, reason: impl std::fmt::Display) -> HubError {
        HubError::Unreachable {
            hub: self.hub_name(),
            endpoint: endpoint.to_string(),
            endpoint_var: self.endpoint_var(),
            target: self.to_string(),
            reason: reason.to_string(),
        }
    }

    fn refused(&self, endpoint: &str, status: u16) -> HubError {
        let other_hub = match self.hub {
            Hub::Hf => "--use_hf false (or ms::) for ModelScope",
            Hub::Ms => "--use_hf true (or hf::) for Hugging Face",
        };
        let revision = match self.kind {
            RepoKind::Model => "--model_revision",
            RepoKind::Dataset => "the revision",
        };
        let fix = match status {
            401 | 403 => format!(
                "the repository is private or gated: set {} to a token that may read it",
                self.token_var()
            ),
            404 => format!("check the id and {revision}, or pass {other_hub}"),
            429 => format!(
                "the hub is limiting requests: wait and retry, or set {}",
                self.token_var()
            ),
            _ => format!("retry later, or check {}", self.endpoint_var()),
        };
        HubError::Refused {
            hub: self.hub_name(),
            endpoint: endpoint.to_string(),
            target: self.to_string(),
            status,
            fix,
        }
    }

    fn repo_error(&self, message: impl Into<String>) -> HubError {
        HubError::Repo {
            target: self.to_string(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (noun, id, revision) = (self.kind.noun(), &self.id, &self.revision);
        write!(f, "{noun} `{id}` (revision {revision})")
    }
}

/// Hub ids are `owner/name` (Hugging Face also has bare names); no component may step out of
/// the cache folder the id names.
fn check_id(hub: Hub, id: &str) -> Result<(), HubError> {
    let parts: Vec<&str> = id.split('/').collect();
    let count_ok = match hub {
        Hub::Hf => parts.len() <= 2,
        Hub::Ms => parts.len() == 2,
    };
    let part_ok = |p: &&str| {
        !p.is_empty()
            && *p != "."
            && *p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if count_ok && parts.iter().all(part_ok) {
        Ok(())
    } else {
        Err(HubError::BadId(id.to_string()))
    }
}

/// The local folder `--model` names: an existing folder as it is, else the hub id fetched
/// (or found in the cache) from the hub `use_hf` chooses, at `model_revision`.
pub fn resolve_model_dir(
    model: &str,
    sft: &SftConfig,
    files: ModelFiles,
) -> Result<PathBuf, HubError> {
    let settings = HubSettings::from_env(sft.use_hf);
    model_dir_with(model, sft.model_revision.as_deref(), &settings, files)
}

/// `resolve_model_dir` with explicit settings, weights included.
pub fn model_dir(
    model: &str,
    revision: Option<&str>,
    settings: &HubSettings,
) -> Result<PathBuf, HubError> {
    model_dir_with(model, revision, settings, ModelFiles::All)
}

fn model_dir_with(
    model: &str,
    revision: Option<&str>,
    settings: &HubSettings,
    files: ModelFiles,
) -> Result<PathBuf, HubError> {
    let path = Path::new(model);
    if path.is_dir() {
        return if path.join("config.json").is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(HubError::NotAModelFolder(model.to_string()))
        };
    }
    if looks_like_path(model) {
        return Err(HubError::NoSuchFolder(model.to_string()));
    }
    let mut target = Target::new(settings.hub_for(None), RepoKind::Model, model, revision)?;
    target.files = files;
    fetch(&target, settings)
}

/// Downloads (or finds in the cache) a dataset repository's data files; returns the folder
/// that holds them. `named` is the spec's `hf::`/`ms::`, if any.
pub fn dataset_dir(
    id: &str,
    named: Option<Hub>,
    settings: &HubSettings,
) -> Result<PathBuf, HubError> {
    let target = Target::new(settings.hub_for(named), RepoKind::Dataset, id, None)?;
    fetch(&target, settings)
}

/// A path rather than an id: absolute, relative with `.`, home-relative, or deeper than
/// owner/name.
fn looks_like_path(text: &str) -> bool {
    text.starts_with('/')
        || text.starts_with('.')
        || text.starts_with('~')
        || text.contains('\\')
        || text.matches('/').count() > 1
}

/// One repository on one hub, as the download needs it.
trait Source {
    /// The repository's file paths at the target revision.
    fn list(&mut self) -> Result<Vec<String>, HubError>;
    /// Makes `file` present in `folder()`, downloading it unless it is already there.
    fn fetch(&mut self, file: &str) -> Result<(), HubError>;
    /// Where the listed revision's files are (valid after `list`).
    fn folder(&self) -> PathBuf;
    /// The folder an earlier download left, found without the network.
    fn cached(&self) -> Option<PathBuf>;
    /// Records a complete download (Hugging Face: the revision's ref, for offline use).
    fn finish(&mut self) -> Result<(), HubError>;
    /// The cache root, for messages.
    fn cache_root(&self) -> PathBuf;
}

/// The local folder of `target`: from the cache when offline (or when the hub cannot be
/// reached and the cache is complete), else downloaded.
fn fetch(target: &Target, settings: &HubSettings) -> Result<PathBuf, HubError> {
    let mut source: Box<dyn Source> = match target.hub {
        Hub::Hf => Box::new(hf::HfSource::new(target, settings)?),
        Hub::Ms => Box::new(modelscope::ModelScopeSource::new(target, settings)?),
    };
    if settings.offline {
        return offline_folder(source.as_ref(), target);
    }
    match source.list() {
        Ok(listing) => download(source.as_mut(), target, &listing),
        // As huggingface_hub does: a hub that cannot be reached still leaves the cache usable.
        Err(error @ HubError::Unreachable { .. }) => {
            let Some(dir) = complete_cache(source.as_ref(), target) else {
                return Err(error);
            };
            progress::line(&format!(
                "Cannot reach {}; using the cached {target} in {}",
                target.hub_name(),
                dir.display()
            ));
            Ok(dir)
        }
        Err(error) => Err(error),
    }
}

fn offline_folder(source: &dyn Source, target: &Target) -> Result<PathBuf, HubError> {
    complete_cache(source, target).ok_or_else(|| HubError::NotCached {
        hub: target.hub_cache_name(),
        target: target.to_string(),
        cache: source.cache_root().display().to_string(),
        missing: source
            .cached()
            .map(|dir| {
                format!(
                    " (it lacks {})",
                    files::missing(target.kind, target.files, &dir).join(", ")
                )
            })
            .unwrap_or_default(),
    })
}

/// Fetches what `files.rs` selects from `listing` (an index first, then its shards) and
/// checks that the folder is complete.
fn download(
    source: &mut dyn Source,
    target: &Target,
    listing: &[String],
) -> Result<PathBuf, HubError> {
    let wanted =
        files::first_files(target.kind, target.files, listing).map_err(|m| target.repo_error(m))?;
    progress::line(&format!(
        "Fetching {target} from {}: {} into {}",
        target.hub_name(),
        wanted.join(", "),
        source.cache_root().display()
    ));
    for file in &wanted {
        source.fetch(file)?;
    }
    let folder = source.folder();
    if wanted.iter().any(|f| f == files::WEIGHTS_INDEX) {
        let shards = files::shards_of_index(&folder.join(files::WEIGHTS_INDEX))
            .map_err(|m| target.repo_error(m))?;
        if let Some(absent) = shards.iter().find(|shard| !listing.contains(shard)) {
            return Err(target.repo_error(format!(
                "{} names the shard {absent}, which the repository does not have",
                files::WEIGHTS_INDEX
            )));
        }
        for shard in &shards {
            source.fetch(shard)?;
        }
    }
    let missing = files::missing(target.kind, target.files, &folder);
    if !missing.is_empty() {
        return Err(target.repo_error(format!(
            "the download left {} without {}",
            folder.display(),
            missing.join(", ")
        )));
    }
    source.finish()?;
    Ok(folder)
}

/// The cached folder, when it holds everything the repository kind needs.
fn complete_cache(source: &dyn Source, target: &Target) -> Option<PathBuf> {
    source
        .cached()
        .filter(|dir| files::missing(target.kind, target.files, dir).is_empty())
}

#[cfg(test)]
pub(crate) mod test_server;

#[cfg(test)]
mod tests;
