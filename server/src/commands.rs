//! The short `whet` commands the API runs beside jobs (`whet dataset preview`): each a child
//! process of the configured binary with its config in a file, bounded in time and in how many
//! run at once, its JSON answer checked before it is passed on. The server never links the
//! engine; what a command knows about models and data stays in it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Command;
use tokio::sync::Semaphore;
use whet_shared::preview::DatasetPreview;
use whet_shared::{Diagnostic, JobConfig};

use crate::error::ApiError;
use crate::paths::LAUNCHER_ENV;

/// Previews rendering at once; more wait for a turn, up to `WAIT`.
const PREVIEWS_AT_ONCE: usize = 2;
const WAIT: Duration = Duration::from_secs(30);
/// A preview tokenizes at most 2,000 rows: anything slower has gone wrong.
const PREVIEW_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Commands {
    whet_bin: PathBuf,
    /// Where a command's config file is written for the length of the command.
    scratch: PathBuf,
    previews: Arc<Semaphore>,
}

impl Commands {
    pub fn new(whet_bin: PathBuf, data_dir: &Path) -> Commands {
        Commands {
            whet_bin,
            scratch: data_dir.join("scratch"),
            previews: Arc::new(Semaphore::new(PREVIEWS_AT_ONCE)),
        }
    }

    /// `whet dataset preview --json --rows N` for `config` (its paths already checked).
    pub async fn dataset_preview(
        &self,
        config: &JobConfig,
        rows: u32,
    ) -> Result<DatasetPreview, ApiError> {
        let _turn = tokio::time::timeout(WAIT, self.previews.acquire())
            .await
            .map_err(|_| {
                ApiError::Unavailable("every preview slot is busy; try again in a moment".into())
            })?
            .map_err(|e| ApiError::Internal(e.into()))?;
        let config_file = ConfigFile::write(&self.scratch, config).await?;
        let mut command = Command::new(&self.whet_bin);
        command
            .args([
                "dataset",
                "preview",
                "--json",
                "--rows",
                &rows.to_string(),
                "--config",
            ])
            .arg(&config_file.path);
        let stdout = self.run(command, PREVIEW_TIMEOUT, "dataset").await?;
        serde_json::from_slice(&stdout).map_err(|e| {
            ApiError::Internal(anyhow::anyhow!(
                "`whet dataset preview --json` printed something that is not a preview: {e}"
            ))
        })
    }

    /// Runs `command` to its end; its stdout when it succeeds. A failure is the config's (422,
    /// with whet's own message, which names the field) when whet exits 1, else the server's.
    async fn run(
        &self,
        mut command: Command,
        timeout: Duration,
        field: &str,
    ) -> Result<Vec<u8>, ApiError> {
        command
            .env_remove("WHET_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in LAUNCHER_ENV {
            command.env_remove(var);
        }
        let child = command.spawn().with_context(|| {
            format!(
                "starting {} (set --whet-bin to the whet binary)",
                self.whet_bin.display()
            )
        })?;
        let output = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                ApiError::Unavailable(format!(
                    "whet took longer than {} s and was stopped",
                    timeout.as_secs()
                ))
            })?
            .context("waiting for whet")?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or(stderr.trim())
            .to_string();
        match output.status.code() {
            Some(1) => Err(ApiError::invalid(vec![Diagnostic::error(
                field,
                "whet_failed",
                message.clone(),
                message,
            )
            .with_fix(
                "correct the field named in the message and try again",
                "按提示修改对应字段后重试",
            )])),
            code => Err(ApiError::Internal(anyhow::anyhow!(
                "whet exited with {code:?}: {message}"
            ))),
        }
    }
}

/// A config written for one command, removed when dropped.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    async fn write(scratch: &Path, config: &JobConfig) -> anyhow::Result<ConfigFile> {
        tokio::fs::create_dir_all(scratch)
            .await
            .with_context(|| format!("creating {}", scratch.display()))?;
        let name = format!("config-{}.json", crate::ids::random_base62(16)?);
        let path = scratch.join(name);
        let text = whet_shared::to_config_text(config, whet_shared::Format::Json, false);
        tokio::fs::write(&path, text)
            .await
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(ConfigFile { path })
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
