//! What whet-server's HTTP API answers (DESIGN §4), as the types both sides use: the server
//! serialises them, the studio deserialises them. Errors are `{"error": {...}}` (the server's
//! `ApiError`); `/api/check` answers a [`crate::CheckReport`]; `GET /api/shares/{id}` answers
//! the shared [`crate::JobConfig`] itself.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::config::JobConfig;

/// `GET /api/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    pub version: String,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// It was running when the server stopped.
    Interrupted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::Interrupted,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Final: nothing follows it.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /api/jobs` (201).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCreated {
    pub id: i64,
    pub status: JobStatus,
}

/// One logging.jsonl record (ms-swift's keys: loss, learning_rate, `global_step/max_steps`, ...).
pub type MetricsRecord = Map<String, Value>;

/// A job as `GET /api/jobs/{id}` answers it; the list leaves out `config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: i64,
    pub status: JobStatus,
    /// RFC 3339 times.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i64>,
    /// The devices it got (`"0,1"`; empty = CPU).
    pub devices: Option<String>,
    pub run_dir: Option<String>,
    pub last_metrics: Option<MetricsRecord>,
    /// The submitted config (one job only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<JobConfig>,
}

/// `GET /api/jobs`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// What `POST /api/jobs/{id}/cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelState {
    /// It was queued and is now cancelled (200).
    Cancelled,
    /// It is running; SIGTERM is on its way (202).
    Cancelling,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelAnswer {
    pub id: i64,
    pub status: CancelState,
}

/// `POST /api/shares` (201).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareCreated {
    pub id: String,
    /// `/s/<id>`, on the server's origin.
    pub url: String,
}

/// The names of the job event stream's SSE events (`GET /api/jobs/{id}/events`).
pub const LOG_EVENT: &str = "log";
pub const METRICS_EVENT: &str = "metrics";
pub const STATUS_EVENT: &str = "status";

/// Which output a `log` line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// The server's own lines about the job (`whet sft` exited with code 1, ...).
    Server,
}

/// A `log` event: one output line. (`metrics` events are a [`MetricsRecord`].)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    pub stream: LogStream,
    pub line: String,
}

/// A `status` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub status: JobStatus,
    /// The devices a job got: on `running` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<String>,
    /// On final statuses only: the exit code, null when no process exited with one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub exit_code: Option<Option<i64>>,
}

impl StatusEvent {
    pub fn queued() -> StatusEvent {
        StatusEvent {
            status: JobStatus::Queued,
            devices: None,
            exit_code: None,
        }
    }

    pub fn running(devices: String) -> StatusEvent {
        StatusEvent {
            status: JobStatus::Running,
            devices: Some(devices),
            exit_code: None,
        }
    }

    pub fn finished(status: JobStatus, exit_code: Option<i64>) -> StatusEvent {
        StatusEvent {
            status,
            devices: None,
            exit_code: Some(exit_code),
        }
    }
}

/// A key that is there (even as null) is `Some`, so `"exit_code": null` reads back as written.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn status_events_keep_their_wire_form() {
        let cases = [
            (StatusEvent::queued(), json!({"status": "queued"})),
            (
                StatusEvent::running("0,1".into()),
                json!({"status": "running", "devices": "0,1"}),
            ),
            (
                StatusEvent::finished(JobStatus::Failed, Some(1)),
                json!({"status": "failed", "exit_code": 1}),
            ),
            (
                StatusEvent::finished(JobStatus::Cancelled, None),
                json!({"status": "cancelled", "exit_code": null}),
            ),
        ];
        for (event, wire) in cases {
            assert_eq!(serde_json::to_value(&event).unwrap(), wire);
            assert_eq!(serde_json::from_value::<StatusEvent>(wire).unwrap(), event);
        }
    }

    #[test]
    fn statuses_read_back_and_know_when_they_are_final() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                json!(status.as_str())
            );
        }
        assert!(!JobStatus::Running.is_terminal() && JobStatus::Interrupted.is_terminal());
        assert_eq!(JobStatus::parse("cancelling"), None);
    }
}

/// One message of a chat with a checkpoint: `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `POST /api/jobs/{id}/chat`'s body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far, ending with the user's message the reply answers.
    pub messages: Vec<ChatMessage>,
    /// A checkpoint of the job by folder name (`checkpoint-250`); the latest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Answer with the model the job started from instead (its `--model`, with its
    /// `--adapters` if any), to set beside the checkpoint's answer.
    #[serde(default)]
    pub base: bool,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
    /// 0 decodes greedily.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
}

fn default_max_new_tokens() -> u32 {
    256
}

fn default_top_p() -> f64 {
    1.0
}

/// The most tokens one chat reply may ask for.
pub const MAX_CHAT_NEW_TOKENS: u32 = 4096;

/// The names of the chat stream's SSE events: `text` pieces of the reply (each a JSON string),
/// then one `done` ([`ChatDone`]) or one `error` (`{"message"}`).
pub const CHAT_TEXT_EVENT: &str = "text";
pub const CHAT_DONE_EVENT: &str = "done";
pub const CHAT_ERROR_EVENT: &str = "error";

/// The chat stream's last event when the reply is complete (or was cancelled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatDone {
    /// What answered: a checkpoint's folder name, or `base`.
    pub answered_by: String,
    #[serde(default)]
    pub cancelled: bool,
}

/// `GET /api/jobs/{id}/checkpoints`: oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointList {
    pub checkpoints: Vec<CheckpointInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// The folder's name, `checkpoint-<step>`.
    pub name: String,
    pub step: u64,
    /// The folder's path on the server (what `--resume_from_checkpoint` takes).
    pub path: String,
    /// `full` (model weights) or `adapter` (a PEFT adapter).
    pub kind: String,
    pub size_bytes: u64,
    /// It is trainer_state.json's best_model_checkpoint.
    #[serde(default)]
    pub best: bool,
    /// The records trainer_state.json logged at this step (loss, eval_loss, ...), merged.
    #[serde(default)]
    pub metrics: MetricsRecord,
}

/// `GET /api/jobs/{id}/metrics`: every logging.jsonl record the job's stream carried, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsHistory {
    pub records: Vec<MetricsRecord>,
}

/// `POST /api/jobs/{id}/resume`'s and `POST /api/jobs/{id}/export`'s body: which checkpoint
/// (a folder name); the latest when absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointChoice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// `POST /api/jobs/{id}/export` (200): the adapter checkpoint merged into its base, as a full
/// Hugging Face model folder in the job's run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportAnswer {
    pub checkpoint: String,
    pub output_dir: String,
    pub size_bytes: u64,
}
