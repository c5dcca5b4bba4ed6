//! The HTTP API: the router (it reads like DESIGN §4's route table), the shared state and one
//! short handler per route. Handlers parse and answer; the work is done by whet-shared (checks),
//! `db` (storage), `executor` (runs) and `events` (streams).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRef, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use whet_shared::api::{
    CancelAnswer, CancelState, Health, JobCreated, JobList, JobStatus, JobView, ShareCreated,
    StatusEvent,
};
use whet_shared::builder::ConfigBuilder;
use whet_shared::report::FailedReport;
use whet_shared::{CheckContext, Diagnostic, JobConfig};

use crate::auth::{Authorized, BearerToken};
use crate::commands::Commands;
use crate::db::{JobRow, Store};
use crate::error::{ApiError, ApiResult};
use crate::events::{self, EventHub};
use crate::executor::{CancelOutcome, Executor};
use crate::ids::{self, now_ms, rfc3339};
use crate::paths::AllowedRoots;
use crate::studio::{self, Studio};

/// Largest request body accepted (413 above it).
pub const BODY_LIMIT: usize = 1024 * 1024;
/// Characters of a share id: 12 base62 characters ≈ 71 random bits.
pub const SHARE_ID_LEN: usize = 12;

#[derive(Clone)]
pub struct AppState {
    pub commands: Commands,
    pub store: Store,
    pub token: Arc<BearerToken>,
    pub roots: Arc<AllowedRoots>,
    pub executor: Executor,
    pub events: EventHub,
    pub studio: Arc<Studio>,
}

impl FromRef<AppState> for Arc<BearerToken> {
    fn from_ref(state: &AppState) -> Self {
        state.token.clone()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/check", post(check))
        .route("/api/jobs", post(submit_job).get(list_jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/events", get(job_events))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/datasets/preview", post(preview_dataset))
        .route("/api/shares", post(create_share))
        .route("/api/shares/{id}", get(share))
        .route("/", get(studio::index))
        .route("/s/{id}", get(studio::index))
        .fallback(studio::assets)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// What `whet check --json` prints for the same input: a check report, or for input that never
/// became a config (a script or document that does not parse) `{"ok": false, "diagnostics"}`.
/// Both are answers, so both are 200.
async fn check(State(state): State<AppState>, JsonBody(body): JsonBody) -> ApiResult<Json<Value>> {
    // Reading a model's config.json and counting dataset rows touches the disk: off the runtime.
    let roots = state.roots.clone();
    let report = blocking(move || check_input(&roots, body)).await?;
    Ok(Json(report.map_err(anyhow::Error::from)?))
}

async fn submit_job(
    _: Authorized,
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> ApiResult<(StatusCode, Json<JobCreated>)> {
    let config = config_from_document(body).map_err(|d| ApiError::invalid(d.0))?;
    let config = {
        let state = state.clone();
        blocking(move || admit(&state, &config).map(|()| config)).await??
    };
    let config_json = serde_json::to_string(&config).map_err(anyhow::Error::from)?;
    let id = state.store.allocate_job_id();
    {
        // The `queued` event is the job's first: hold its writer until both are stored.
        let mut writer = state.events.writer(id).await;
        state.store.insert_job(id, &config_json, now_ms()).await?;
        writer
            .publish(events::STATUS, &StatusEvent::queued())
            .await?;
    }
    state.executor.wake();
    Ok((
        StatusCode::CREATED,
        Json(JobCreated {
            id,
            status: JobStatus::Queued,
        }),
    ))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    /// Parsed here rather than by serde so a bad value gets the API's JSON 400.
    limit: Option<String>,
}

async fn list_jobs(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<JobList>> {
    let limit = match query.limit.as_deref() {
        None => 100,
        Some(text) => text.parse::<i64>().map_err(|_| {
            ApiError::BadRequest(format!("`limit` must be a whole number, not `{text}`"))
        })?,
    }
    .clamp(1, 1000);
    let jobs = state.store.jobs(limit).await?;
    Ok(Json(JobList {
        jobs: jobs.iter().map(|j| job_view(j, false)).collect(),
    }))
}

async fn job(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    let id = job_id(&id)?;
    let job = state.store.job(id).await?.ok_or_else(|| no_job(id))?;
    Ok(Json(job_view(&job, true)))
}

async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id = job_id(&id)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let stream = state
        .events
        .stream(id, after)
        .await?
        .ok_or_else(|| no_job(id))?;
    let stream = stream.map(|e| {
        Ok(Event::default()
            .id(e.seq.to_string())
            .event(e.kind)
            .data(e.data))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn cancel_job(
    _: Authorized,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<CancelAnswer>)> {
    let id = job_id(&id)?;
    let answer = |status| Json(CancelAnswer { id, status });
    match state.executor.cancel(id).await? {
        CancelOutcome::Cancelled => Ok((StatusCode::OK, answer(CancelState::Cancelled))),
        CancelOutcome::Cancelling => Ok((StatusCode::ACCEPTED, answer(CancelState::Cancelling))),
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::Conflict(format!(
            "job {id} has already ended ({status}); there is nothing to cancel"
        ))),
        CancelOutcome::NotFound => Err(no_job(id)),
    }
}

#[derive(Debug, Deserialize)]
struct PreviewQuery {
    rows: Option<String>,
}

/// Rows a preview may render in full.
const MAX_PREVIEW_ROWS: u32 = 50;

/// What `whet dataset preview --json` prints for the config, run as a child process. Only the
/// paths it reads are judged (the model, adapters and datasets), so a config still being
/// edited can be previewed.
async fn preview_dataset(
    State(state): State<AppState>,
    Query(query): Query<PreviewQuery>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<whet_shared::preview::DatasetPreview>> {
    let rows = match query.rows.as_deref() {
        None => whet_shared::preview::DEFAULT_ROWS as u32,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_PREVIEW_ROWS).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`rows` must be a whole number from 1 to {MAX_PREVIEW_ROWS}, not `{text}`"
                ))
            })?,
    };
    let config = config_from_document(body).map_err(|d| ApiError::invalid(d.0))?;
    let refused: Vec<Diagnostic> = state
        .roots
        .check_job(&config)
        .into_iter()
        .filter(|d| d.is_error() && PREVIEW_READS.contains(&d.field.as_str()))
        .collect();
    if !refused.is_empty() {
        return Err(ApiError::invalid(refused));
    }
    Ok(Json(state.commands.dataset_preview(&config, rows).await?))
}

/// The fields whose paths a dataset preview reads.
const PREVIEW_READS: [&str; 4] = ["model", "adapters", "dataset", "val_dataset"];

async fn create_share(
    _: Authorized,
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> ApiResult<(StatusCode, Json<ShareCreated>)> {
    let config = config_from_document(body).map_err(|d| ApiError::invalid(d.0))?;
    let config_json = serde_json::to_string(&config).map_err(anyhow::Error::from)?;
    loop {
        let id = ids::random_base62(SHARE_ID_LEN)?;
        if state
            .store
            .insert_share(&id, &config_json, now_ms())
            .await?
        {
            let url = format!("/s/{id}");
            return Ok((StatusCode::CREATED, Json(ShareCreated { id, url })));
        }
    }
}

async fn share(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobConfig>> {
    let share = state
        .store
        .share(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("there is no share `{id}`")))?;
    let config: JobConfig = serde_json::from_str(&share.config).map_err(anyhow::Error::from)?;
    Ok(Json(config))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

// ---- helpers

/// `{"shell": "..."}` (and nothing else) is a script; anything else is a config document.
fn shell_script(body: &Value) -> Option<&str> {
    match body {
        Value::Object(map) if map.len() == 1 => map.get("shell").and_then(Value::as_str),
        _ => None,
    }
}

/// A config document — `{"launch": {...}, "sft": {...}}` or flat ms-swift names — read the way
/// `whet check --config file.json` reads one.
fn config_from_document(document: Value) -> Result<JobConfig, whet_shared::Diagnostics> {
    let mut builder = ConfigBuilder::new();
    builder.apply_document(document);
    builder.finish()
}

/// The report for a `/api/check` body: a script (`{"shell"}`) or a config document.
fn check_input(roots: &AllowedRoots, body: Value) -> serde_json::Result<Value> {
    let parsed = match shell_script(&body) {
        Some(script) => whet_shared::parse_shell_with(script, &|path: &str| {
            roots.read_file(path).ok_or_else(|| {
                format!("cannot read `{path}`: it does not exist or lies outside the folders this server reads")
            })
        }),
        None => config_from_document(body),
    };
    match parsed {
        Ok(config) => serde_json::to_value(check_config(roots, &config)),
        Err(diagnostics) => serde_json::to_value(FailedReport::new(diagnostics.0)),
    }
}

/// Runs blocking work (file reads, validation) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("a check task failed: {e}")))
}

/// `whet check`'s report, with what the disk says read only inside the allowed roots.
pub fn check_config(roots: &AllowedRoots, config: &JobConfig) -> whet_shared::CheckReport {
    let context = CheckContext::gather(config, &|path| roots.read_file(path));
    whet_shared::check(config, &context)
}

/// Whether a job may be queued: no errors from `check`, no path outside the roots, nothing
/// this server cannot run (devices, nodes). 422 with every diagnostic otherwise.
fn admit(state: &AppState, config: &JobConfig) -> ApiResult<()> {
    let mut diagnostics = check_config(&state.roots, config).diagnostics;
    diagnostics.extend(state.roots.check_job(config));
    diagnostics.extend(state.executor.refusals(config));
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(ApiError::invalid(diagnostics));
    }
    Ok(())
}

fn job_id(text: &str) -> ApiResult<i64> {
    text.parse::<i64>()
        .map_err(|_| ApiError::NotFound(format!("there is no job `{text}`")))
}

fn no_job(id: i64) -> ApiError {
    ApiError::NotFound(format!("there is no job {id}"))
}

fn job_view(job: &JobRow, with_config: bool) -> JobView {
    JobView {
        id: job.id,
        // Only the server writes the column, always a status name.
        status: JobStatus::parse(&job.status).unwrap_or(JobStatus::Failed),
        created_at: rfc3339(job.created_at),
        started_at: job.started_at.map(rfc3339),
        finished_at: job.finished_at.map(rfc3339),
        exit_code: job.exit_code,
        devices: job.devices.clone(),
        run_dir: job.run_dir.clone(),
        last_metrics: job
            .last_metrics
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok()),
        config: with_config
            .then(|| serde_json::from_str(&job.config).ok())
            .flatten(),
    }
}

/// A JSON body, whatever its content type; 413 over `BODY_LIMIT`, 400 when it is not JSON.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit: BODY_LIMIT }
                } else {
                    ApiError::BadRequest(rejection.body_text())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))
    }
}
