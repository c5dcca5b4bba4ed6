//! ModelScope through its HTTP file API, called as the modelscope SDK calls it:
//!
//! - models: `GET /api/v1/models/{id}/repo/files?Revision=&Recursive=True` lists,
//!   `GET /api/v1/models/{id}/repo?Revision=&FilePath=` downloads;
//! - datasets: `GET /api/v1/datasets/{id}` gives the dataset's number,
//!   `GET /api/v1/datasets/{number}/repo/tree?Revision=&Root=/&Recursive=True&PageNumber=&PageSize=`
//!   lists a page, `GET /api/v1/datasets/{id}/repo?Source=SDK&Revision=&FilePath=` downloads.
//!
//! Files land where the SDK puts them: `<MODELSCOPE_CACHE>/models/<owner>/<name>` (a name with
//! `.` is stored with `___`, linked from the real name, as the SDK does) and
//! `<MODELSCOPE_CACHE>/datasets/<owner>/<name>`. Each file is written to a hidden temporary
//! file, checked against the listed size and SHA-256, then renamed: an interrupted download
//! never looks cached.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::files::RepoKind;
use super::progress::DownloadProgress;
use super::{HubError, HubSettings, Source, Target, MODELSCOPE_DEFAULT_ENDPOINT};

/// Files per page of a dataset listing (the SDK's default).
const PAGE_SIZE: usize = 100;
/// A bound on the paging, should a server repeat its pages forever.
const MAX_PAGES: usize = 10_000;

/// What the listing says about a file, to check the download against.
#[derive(Debug, Clone, Default)]
struct Listed {
    size: Option<u64>,
    sha256: Option<String>,
}

pub(super) struct ModelScopeSource {
    target: Target,
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    cache: PathBuf,
    show_bar: bool,
    listed: HashMap<String, Listed>,
}

impl ModelScopeSource {
    pub(super) fn new(
        target: &Target,
        settings: &HubSettings,
    ) -> Result<ModelScopeSource, HubError> {
        let cache = settings
            .modelscope
            .cache_dir
            .clone()
            .ok_or(HubError::NoCache {
                hub: "ModelScope",
                var: "MODELSCOPE_CACHE",
            })?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("whet/", env!("CARGO_PKG_VERSION")))
            .try_proxy_from_env(true)
            .build();
        Ok(ModelScopeSource {
            target: target.clone(),
            agent,
            endpoint: settings
                .modelscope
                .endpoint
                .as_deref()
                .unwrap_or(MODELSCOPE_DEFAULT_ENDPOINT)
                .trim_end_matches('/')
                .to_string(),
            token: settings.modelscope.token.clone(),
            cache,
            show_bar: settings.show_bar,
            listed: HashMap::new(),
        })
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<ureq::Response, HubError> {
        let mut request = self.agent.get(&format!("{}{path}", self.endpoint));
        for (name, value) in query {
            request = request.query(name, value);
        }
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        request.call().map_err(|error| match error {
            ureq::Error::Status(status, _) => self.target.refused(&self.endpoint, status),
            ureq::Error::Transport(transport) => self.target.unreachable(&self.endpoint, transport),
        })
    }

    /// The `Data` of an API answer, after its `Code` says it succeeded.
    fn get_data(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, HubError> {
        let answer: Value = self.get(path, query)?.into_json().map_err(|e| {
            self.target.repo_error(format!(
                "ModelScope at {} answered {path} with something that is not JSON ({e}); check MODELSCOPE_DOMAIN",
                self.endpoint
            ))
        })?;
        let code = answer.get("Code").and_then(Value::as_i64).unwrap_or(200);
        if code != 200 || answer.get("Success") == Some(&Value::Bool(false)) {
            let message = answer
                .get("Message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            return Err(self.target.repo_error(format!(
                "ModelScope refused it (code {code}: {message}); check the id and the revision"
            )));
        }
        Ok(answer.get("Data").cloned().unwrap_or(Value::Null))
    }

    /// Records the blobs of a `Files` list; returns how many entries it had.
    fn record_files(&mut self, data: &Value) -> usize {
        let entries = data
            .get("Files")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for entry in &entries {
            let is_blob = entry.get("Type").and_then(Value::as_str) != Some("tree");
            if let (true, Some(path)) = (is_blob, entry.get("Path").and_then(Value::as_str)) {
                let listed = Listed {
                    size: entry.get("Size").and_then(Value::as_u64),
                    sha256: entry
                        .get("Sha256")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_ascii_lowercase),
                };
                self.listed
                    .insert(path.trim_start_matches('/').to_string(), listed);
            }
        }
        entries.len()
    }

    fn list_dataset_pages(&mut self) -> Result<(), HubError> {
        let info = self.get_data(&format!("/api/v1/datasets/{}", self.target.id), &[])?;
        let number = match info.get("Id") {
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) if s.chars().all(|c| c.is_ascii_alphanumeric()) => s.clone(),
            _ => {
                return Err(self.target.repo_error(
                    "ModelScope's answer names no dataset Id; check MODELSCOPE_DOMAIN",
                ))
            }
        };
        let revision = self.target.revision.clone();
        for page in 1..=MAX_PAGES {
            let page_text = page.to_string();
            let page_size = PAGE_SIZE.to_string();
            let data = self.get_data(
                &format!("/api/v1/datasets/{number}/repo/tree"),
                &[
                    ("Revision", &revision),
                    ("Root", "/"),
                    ("Recursive", "True"),
                    ("PageNumber", &page_text),
                    ("PageSize", &page_size),
                ],
            )?;
            // Until an empty page: a server may give fewer per page than asked.
            if self.record_files(&data) == 0 {
                break;
            }
        }
        Ok(())
    }

    fn owner_and_name(&self) -> (&str, &str) {
        self.target
            .id
            .split_once('/')
            .unwrap_or(("", &self.target.id))
    }

    /// The folder under the id's own name (the SDK's link, for a name with `.`).
    fn named_folder(&self) -> PathBuf {
        let (owner, name) = self.owner_and_name();
        let kind = match self.target.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        };
        self.cache.join(kind).join(owner).join(name)
    }

    /// Streams `reader` into `dest` through a temporary file, checking size and checksum.
    fn write_checked(&self, reader: impl Read, file: &str, dest: &Path) -> Result<(), HubError> {
        let listed = self.listed.get(file).cloned().unwrap_or_default();
        let parent = dest.parent().unwrap_or(Path::new("."));
        let file_name = dest.file_name().unwrap_or_default().to_string_lossy();
        let temp = parent.join(format!(".{file_name}.part"));
        let written = std::fs::create_dir_all(parent)
            .map_err(|e| self.write_error(parent, e))
            .and_then(|_| self.stream(reader, file, &temp, &listed));
        let result = written.and_then(|(size, sha256)| {
            if let Some(expected) = listed.size.filter(|&s| s != size) {
                return Err(self.target.repo_error(format!(
                    "{file} arrived with {size} bytes, but ModelScope lists {expected}: the download was cut short; run again"
                )));
            }
            if let Some(expected) = listed.sha256.as_ref().filter(|&s| *s != sha256) {
                return Err(self.target.repo_error(format!(
                    "{file} arrived with SHA-256 {sha256}, but ModelScope lists {expected}: the download is damaged; run again"
                )));
            }
            std::fs::rename(&temp, dest).map_err(|e| self.write_error(dest, e))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// Copies the body into `temp`; returns its size and SHA-256 (hex).
    fn stream(
        &self,
        mut reader: impl Read,
        file: &str,
        temp: &Path,
        listed: &Listed,
    ) -> Result<(u64, String), HubError> {
        use hf_hub::api::Progress;
        let mut out = std::fs::File::create(temp).map_err(|e| self.write_error(temp, e))?;
        let mut progress = DownloadProgress::new(self.show_bar);
        progress.init(listed.size.unwrap_or(0) as usize, file);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buffer).map_err(|e| {
                self.target.unreachable(
                    &self.endpoint,
                    format!("{file} broke off after {size} bytes: {e}"),
                )
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            out.write_all(&buffer[..n])
                .map_err(|e| self.write_error(temp, e))?;
            size += n as u64;
            progress.update(n);
        }
        out.sync_all().map_err(|e| self.write_error(temp, e))?;
        progress.finish();
        Ok((size, format!("{:x}", hasher.finalize())))
    }

    fn write_error(&self, path: &Path, error: std::io::Error) -> HubError {
        self.target
            .repo_error(format!("cannot write {}: {error}", path.display()))
    }
}

impl Source for ModelScopeSource {
    fn list(&mut self) -> Result<Vec<String>, HubError> {
        match self.target.kind {
            RepoKind::Model => {
                let revision = self.target.revision.clone();
                let data = self.get_data(
                    &format!("/api/v1/models/{}/repo/files", self.target.id),
                    &[("Revision", &revision), ("Recursive", "True")],
                )?;
                self.record_files(&data);
            }
            RepoKind::Dataset => self.list_dataset_pages()?,
        }
        let mut files: Vec<String> = self.listed.keys().cloned().collect();
        files.sort();
        Ok(files)
    }

    fn fetch(&mut self, file: &str) -> Result<(), HubError> {
        let dest = self.folder().join(file);
        let listed_size = self.listed.get(file).and_then(|l| l.size);
        let cached_size = std::fs::metadata(&dest).ok().map(|m| m.len());
        if cached_size.is_some() && (listed_size.is_none() || listed_size == cached_size) {
            return Ok(());
        }
        let revision = self.target.revision.clone();
        let response = match self.target.kind {
            RepoKind::Model => self.get(
                &format!("/api/v1/models/{}/repo", self.target.id),
                &[("Revision", &revision), ("FilePath", file)],
            )?,
            RepoKind::Dataset => self.get(
                &format!("/api/v1/datasets/{}/repo", self.target.id),
                &[
                    ("Source", "SDK"),
                    ("Revision", &revision),
                    ("FilePath", file),
                ],
            )?,
        };
        self.write_checked(response.into_reader(), file, &dest)
    }

    fn folder(&self) -> PathBuf {
        match self.target.kind {
            // The SDK masks `.` in the whole id (owner and name) for the folder it writes.
            RepoKind::Model => self
                .cache
                .join("models")
                .join(self.target.id.replace('.', "___")),
            RepoKind::Dataset => self.named_folder(),
        }
    }

    fn cached(&self) -> Option<PathBuf> {
        [self.named_folder(), self.folder()]
            .into_iter()
            .find(|dir| dir.is_dir())
    }

    fn finish(&mut self) -> Result<(), HubError> {
        let (named, stored) = (self.named_folder(), self.folder());
        if named != stored && std::fs::symlink_metadata(&named).is_err() {
            // Best effort, as the SDK: the real name is a convenience, the stored one is what counts.
            link_folder(&stored, &named);
        }
        Ok(())
    }

    fn cache_root(&self) -> PathBuf {
        self.cache.clone()
    }
}

#[cfg(unix)]
fn link_folder(stored: &Path, link: &Path) {
    if let Some(parent) = link.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::os::unix::fs::symlink(stored, link);
}

#[cfg(not(unix))]
fn link_folder(_stored: &Path, _link: &Path) {}
