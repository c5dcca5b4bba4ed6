//! Hugging Face through hf-hub, in its usual cache layout
//! (`<cache>/models--owner--name/snapshots/<commit>/`, `refs/<revision>` naming the commit).
//! hf-hub writes each file to a `.part` file and renames it when complete.

use std::path::PathBuf;

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::files::RepoKind;
use super::progress::DownloadProgress;
use super::{HubError, HubSettings, Source, Target, HF_DEFAULT_ENDPOINT};

pub(super) struct HfSource {
    target: Target,
    cache: Cache,
    repo: Repo,
    endpoint: String,
    api: ApiRepo,
    show_bar: bool,
    /// The commit the revision resolved to (after `list`).
    commit: Option<String>,
}

impl HfSource {
    pub(super) fn new(target: &Target, settings: &HubSettings) -> Result<HfSource, HubError> {
        let cache_dir = settings.hf.cache_dir.clone().ok_or(HubError::NoCache {
            hub: "the Hugging Face hub",
            var: "HF_HOME",
        })?;
        let cache = Cache::new(cache_dir);
        let repo_type = match target.kind {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        };
        let repo = Repo::with_revision(target.id.clone(), repo_type, target.revision.clone());
        let endpoint = settings
            .hf
            .endpoint
            .as_deref()
            .unwrap_or(HF_DEFAULT_ENDPOINT)
            .trim_end_matches('/')
            .to_string();
        let mut builder = ApiBuilder::from_cache(cache.clone())
            .with_progress(false)
            .with_retries(1)
            .with_endpoint(endpoint.clone());
        // Without HF_TOKEN hf-hub reads the token file `huggingface-cli login` wrote.
        if settings.hf.token.is_some() {
            builder = builder.with_token(settings.hf.token.clone());
        }
        let api = builder
            .build()
            .map_err(|e| target.repo_error(format!("cannot start the hub client: {e}")))?;
        Ok(HfSource {
            target: target.clone(),
            api: api.repo(repo.clone()),
            cache,
            repo,
            endpoint,
            show_bar: settings.show_bar,
            commit: None,
        })
    }

    fn repo_folder(&self) -> PathBuf {
        self.cache.path().join(self.repo.folder_name())
    }

    fn snapshot(&self, commit: &str) -> PathBuf {
        self.repo_folder().join("snapshots").join(commit)
    }

    fn hub_error(&self, error: ApiError) -> HubError {
        match error {
            ApiError::RequestError(error) => match *error {
                ureq::Error::Status(status, _) => self.target.refused(&self.endpoint, status),
                ureq::Error::Transport(transport) => {
                    self.target.unreachable(&self.endpoint, transport)
                }
            },
            ApiError::TooManyRetries(inner) => self.hub_error(*inner),
            ApiError::IoError(error) => self.target.repo_error(format!(
                "cannot write into the cache {}: {error}",
                self.cache.path().display()
            )),
            other => self.target.repo_error(format!(
                "the hub at {} answered in a way hf-hub does not understand ({other}); check that HF_ENDPOINT is a Hugging Face hub or mirror",
                self.endpoint
            )),
        }
    }
}

impl Source for HfSource {
    fn list(&mut self) -> Result<Vec<String>, HubError> {
        let info = self.api.info().map_err(|e| self.hub_error(e))?;
        // The commit names a cache folder: it must be one plain name.
        if info.sha.is_empty() || !info.sha.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(self.target.repo_error(format!(
                "the hub at {} gave the commit `{}`, which is not a commit hash",
                self.endpoint, info.sha
            )));
        }
        self.commit = Some(info.sha);
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    fn fetch(&mut self, file: &str) -> Result<(), HubError> {
        if self.folder().join(file).is_file() {
            return Ok(());
        }
        self.api
            .download_with_progress(file, DownloadProgress::new(self.show_bar))
            .map_err(|e| self.hub_error(e))?;
        Ok(())
    }

    fn folder(&self) -> PathBuf {
        self.snapshot(self.commit.as_deref().unwrap_or_default())
    }

    fn cached(&self) -> Option<PathBuf> {
        let revision = self.repo.revision();
        let by_ref = std::fs::read_to_string(self.repo_folder().join("refs").join(revision))
            .ok()
            .map(|commit| self.snapshot(commit.trim()));
        // A commit hash as the revision names its snapshot directly.
        by_ref
            .filter(|dir| dir.is_dir())
            .or_else(|| Some(self.snapshot(revision)).filter(|dir| dir.is_dir()))
    }

    fn finish(&mut self) -> Result<(), HubError> {
        let commit = self.commit.clone().unwrap_or_default();
        self.cache
            .repo(self.repo.clone())
            .create_ref(&commit)
            .map_err(|e| {
                self.target.repo_error(format!(
                    "cannot write the revision's ref in {}: {e}",
                    self.repo_folder().display()
                ))
            })
    }

    fn cache_root(&self) -> PathBuf {
        self.cache.path().clone()
    }
}
