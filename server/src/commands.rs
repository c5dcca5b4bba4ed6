//! The short `whet` commands the API runs beside jobs: `whet dataset preview` (its JSON answer
//! checked before it is passed on) and `whet infer --stream` for a chat with a job's checkpoint
//! (its output passed on as it comes). Each is a child process of the configured binary with
//! its input in a file, bounded in time and in how many run at once. The server never links the
//! engine; what a command knows about models and data stays in it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::Stream;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{mpsc, Notify, Semaphore};
use whet_shared::api::{ChatDone, ChatRequest, CHAT_DONE_EVENT, CHAT_ERROR_EVENT, CHAT_TEXT_EVENT};
use whet_shared::preview::DatasetPreview;
use whet_shared::{Diagnostic, JobConfig};

use crate::error::ApiError;
use crate::paths::LAUNCHER_ENV;

/// Previews rendering at once; more wait for a turn, up to `WAIT`.
const PREVIEWS_AT_ONCE: usize = 2;
const WAIT: Duration = Duration::from_secs(30);
/// A preview tokenizes at most 2,000 rows: anything slower has gone wrong.
const PREVIEW_TIMEOUT: Duration = Duration::from_secs(120);
/// A chat reply that takes longer is stopped (loading a large model on a CPU included).
const CHAT_TIMEOUT: Duration = Duration::from_secs(600);
/// Merging a large model's adapter writes the whole model: minutes on a CPU.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Clone)]
pub struct Commands {
    whet_bin: PathBuf,
    /// Where a command's config file is written for the length of the command.
    scratch: PathBuf,
    previews: Arc<Semaphore>,
    /// One export at a time: each writes a whole model.
    exports: Arc<Semaphore>,
    /// The job of each chat generating now, with what stops it: one per job at a time.
    chats: Arc<Mutex<HashMap<i64, Arc<Notify>>>>,
}

/// The model a chat reply comes from.
#[derive(Debug, Clone)]
pub struct ChatModel {
    /// A checkpoint's folder name, or `base`.
    pub answered_by: String,
    /// `whet infer --model`: a full checkpoint, or the base model.
    pub model: String,
    /// `--adapters`: an adapter checkpoint (or the base's own adapter).
    pub adapters: Option<String>,
}

/// One chat stream event: its SSE name and JSON data.
pub type ChatEvent = (&'static str, String);

impl Commands {
    pub fn new(whet_bin: PathBuf, data_dir: &Path) -> Commands {
        Commands {
            whet_bin,
            scratch: data_dir.join("scratch"),
            previews: Arc::new(Semaphore::new(PREVIEWS_AT_ONCE)),
            exports: Arc::new(Semaphore::new(1)),
            chats: Arc::default(),
        }
    }

    /// `whet export --merge_lora true`: `adapters` merged into `model`, written to `output_dir`.
    pub async fn export(
        &self,
        model: &str,
        adapters: &Path,
        output_dir: &Path,
        use_hf: bool,
    ) -> Result<(), ApiError> {
        let _turn = tokio::time::timeout(WAIT, self.exports.acquire())
            .await
            .map_err(|_| {
                ApiError::Unavailable("another export is running; try again when it is done".into())
            })?
            .map_err(|e| ApiError::Internal(e.into()))?;
        let mut command = Command::new(&self.whet_bin);
        command
            .args(["export", "--merge_lora", "true", "--model", model])
            .args(["--use_hf", &use_hf.to_string()])
            .arg("--adapters")
            .arg(adapters)
            .arg("--output_dir")
            .arg(output_dir);
        self.run(command, EXPORT_TIMEOUT, "adapters")
            .await
            .map(|_| ())
    }

    /// Starts `whet infer --stream` for the reply to `request` from `model`, with the job's
    /// template, system prompt and seed; answers the stream of its events. 409 while the job
    /// has another reply generating. Dropping the stream (the client went away) stops whet.
    pub async fn chat(
        &self,
        job: i64,
        config: &JobConfig,
        model: ChatModel,
        request: &ChatRequest,
    ) -> Result<impl Stream<Item = ChatEvent> + use<>, ApiError> {
        let stop = Arc::new(Notify::new());
        {
            let mut chats = self.chats.lock().expect("chat registry");
            if chats.contains_key(&job) {
                return Err(ApiError::Conflict(format!(
                    "job {job} is already answering a chat message; wait for it or cancel it (POST /api/jobs/{job}/chat/cancel)"
                )));
            }
            chats.insert(job, stop.clone());
        }
        let registration = ChatRegistration {
            chats: self.chats.clone(),
            job,
        };
        let messages = ConfigFile::write_text(
            &self.scratch,
            &serde_json::to_string(&request.messages).map_err(anyhow::Error::from)?,
        )
        .await?;
        let sft = &config.sft;
        let mut command = Command::new(&self.whet_bin);
        command
            .args(["infer", "--stream", "--model", &model.model])
            .arg("--messages")
            .arg(&messages.path)
            .args(["--max_new_tokens", &request.max_new_tokens.to_string()])
            .args(["--temperature", &request.temperature.to_string()])
            .args(["--top_p", &request.top_p.to_string()])
            .args(["--seed", &sft.seed.to_string()])
            .args(["--use_hf", &sft.use_hf.to_string()]);
        if let Some(adapters) = &model.adapters {
            command.args(["--adapters", adapters]);
        }
        if let Some(template) = &sft.template {
            command.args(["--template", template]);
        }
        if let Some(system) = &sft.system {
            command.args(["--system", system]);
        }
        prepare(&mut command);
        let mut child = command.spawn().with_context(|| {
            format!(
                "starting {} (set --whet-bin to the whet binary)",
                self.whet_bin.display()
            )
        })?;
        let (events, receiver) = mpsc::channel::<ChatEvent>(64);
        let answered_by = model.answered_by;
        tokio::spawn(async move {
            // Both live as long as the reply: the registration frees the job's slot.
            let (_registration, _messages) = (registration, messages);
            let mut stdout = child.stdout.take().expect("stdout is piped");
            let mut stderr = child.stderr.take().expect("stderr is piped");
            let errors = tokio::spawn(async move {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text).await;
                text
            });
            let mut text = Utf8Pieces::default();
            let mut buffer = vec![0u8; 4096];
            let deadline = tokio::time::sleep(CHAT_TIMEOUT);
            tokio::pin!(deadline);
            let ended = loop {
                tokio::select! {
                    read = stdout.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => {
                            let piece = text.push(&buffer[..n]);
                            if !piece.is_empty() {
                                let data = serde_json::to_string(&piece).unwrap_or_default();
                                if events.send((CHAT_TEXT_EVENT, data)).await.is_err() {
                                    break Some("gone");
                                }
                            }
                        }
                    },
                    _ = stop.notified() => break Some("cancelled"),
                    _ = events.closed() => break Some("gone"),
                    _ = &mut deadline => break Some("timeout"),
                }
            };
            if ended.is_some() {
                let _ = child.start_kill();
            }
            let status = child.wait().await;
            let last = match ended {
                Some("gone") => return,
                Some("cancelled") => done(&answered_by, true),
                Some(_) => error(&format!(
                    "the reply took longer than {} s and was stopped",
                    CHAT_TIMEOUT.as_secs()
                )),
                None if status.as_ref().is_ok_and(|s| s.success()) => done(&answered_by, false),
                None => {
                    let stderr = errors.await.unwrap_or_default();
                    error(&last_error(&stderr))
                }
            };
            let _ = events.send(last).await;
        });
        Ok(futures_util::stream::unfold(
            receiver,
            |mut receiver| async move { receiver.recv().await.map(|event| (event, receiver)) },
        ))
    }

    /// Stops the job's chat reply; false when none is generating.
    pub fn cancel_chat(&self, job: i64) -> bool {
        match self.chats.lock().expect("chat registry").get(&job) {
            Some(stop) => {
                stop.notify_one();
                true
            }
            None => false,
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
        prepare(&mut command);
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
        let message = last_error(&String::from_utf8_lossy(&output.stderr));
        match output.status.code() {
            Some(1) => Err(ApiError::invalid(vec![Diagnostic::error(
                field,
                "whet_failed",
                message.clone(),
                // whet speaks English only: its message, introduced in Chinese.
                format!("whet 报错：{message}"),
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

/// Every command's process: piped output, no stdin, none of the server's secrets or a
/// launcher's variables, killed if the server stops waiting for it.
fn prepare(command: &mut Command) {
    command
        .env_remove("WHET_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in LAUNCHER_ENV {
        command.env_remove(var);
    }
}

/// whet's own message (its last `error: ` line), else all it said.
fn last_error(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or(stderr.trim())
        .to_string()
}

fn done(answered_by: &str, cancelled: bool) -> ChatEvent {
    let done = ChatDone {
        answered_by: answered_by.to_string(),
        cancelled,
    };
    (
        CHAT_DONE_EVENT,
        serde_json::to_string(&done).unwrap_or_default(),
    )
}

fn error(message: &str) -> ChatEvent {
    (CHAT_ERROR_EVENT, json!({ "message": message }).to_string())
}

/// Frees the job's chat slot when the reply ends, however it ends.
struct ChatRegistration {
    chats: Arc<Mutex<HashMap<i64, Arc<Notify>>>>,
    job: i64,
}

impl Drop for ChatRegistration {
    fn drop(&mut self) {
        if let Ok(mut chats) = self.chats.lock() {
            chats.remove(&self.job);
        }
    }
}

/// Output bytes as text: whole characters only, a character split across reads held back
/// until its last byte arrives.
#[derive(Default)]
struct Utf8Pieces {
    pending: Vec<u8>,
}

impl Utf8Pieces {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end waits; a broken one is replaced.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }
}

/// A command's input written to a file, removed when dropped.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    async fn write(scratch: &Path, config: &JobConfig) -> anyhow::Result<ConfigFile> {
        let text = whet_shared::to_config_text(config, whet_shared::Format::Json, false);
        Self::write_text(scratch, &text).await
    }

    async fn write_text(scratch: &Path, text: &str) -> anyhow::Result<ConfigFile> {
        tokio::fs::create_dir_all(scratch)
            .await
            .with_context(|| format!("creating {}", scratch.display()))?;
        let name = format!("input-{}.json", crate::ids::random_base62(16)?);
        let path = scratch.join(name);
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

#[cfg(test)]
mod tests {
    use super::Utf8Pieces;

    #[test]
    fn characters_split_across_reads_come_out_whole() {
        let text = "和 ok";
        let bytes = text.as_bytes();
        let mut pieces = Utf8Pieces::default();
        assert_eq!(pieces.push(&bytes[..1]), "");
        assert_eq!(pieces.push(&bytes[1..2]), "");
        assert_eq!(pieces.push(&bytes[2..]), "和 ok");
        assert_eq!(pieces.push(&[0xff, b'a']), "\u{fffd}a");
    }
}
