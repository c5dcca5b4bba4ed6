//! Storage: jobs, their event history (log lines, metrics records, status changes) and shares,
//! in SQLite or PostgreSQL through sqlx's `Any` driver. Plain runtime-checked `query`/`query_as`
//! with `FromRow`; one portable migration set (`server/migrations`), embedded and applied at
//! start.
//!
//! Job ids are assigned here, in submission order (the executor runs jobs in that order); this
//! assumes one server owns the database, which the executor needs anyway.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, FromRow, Row, SqlSafeStr};

/// A job's status as stored (`jobs.status`): whet-shared's `JobStatus` names.
pub mod status {
    use whet_shared::api::JobStatus;

    pub const QUEUED: &str = JobStatus::Queued.as_str();
    pub const RUNNING: &str = JobStatus::Running.as_str();
    pub const SUCCEEDED: &str = JobStatus::Succeeded.as_str();
    pub const FAILED: &str = JobStatus::Failed.as_str();
    pub const CANCELLED: &str = JobStatus::Cancelled.as_str();
    pub const INTERRUPTED: &str = JobStatus::Interrupted.as_str();

    pub fn is_terminal(status: &str) -> bool {
        JobStatus::parse(status).is_some_and(JobStatus::is_terminal)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: i64,
    pub status: String,
    /// The submitted config as JSON (`{"launch", "sft"}`).
    pub config: String,
    /// Devices assigned when it started (`"0,1"`; empty = CPU).
    pub devices: Option<String>,
    pub run_dir: Option<String>,
    pub exit_code: Option<i64>,
    /// The latest logging.jsonl record, as JSON.
    pub last_metrics: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub seq: i64,
    pub kind: String,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShareRow {
    pub id: String,
    pub config: String,
    pub created_at: i64,
}

// The rows by column name, as `#[derive(FromRow)]` would read them.
impl FromRow<'_, AnyRow> for JobRow {
    fn from_row(row: &AnyRow) -> sqlx::Result<Self> {
        Ok(JobRow {
            id: row.try_get("id")?,
            status: row.try_get("status")?,
            config: row.try_get("config")?,
            devices: row.try_get("devices")?,
            run_dir: row.try_get("run_dir")?,
            exit_code: row.try_get("exit_code")?,
            last_metrics: row.try_get("last_metrics")?,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        })
    }
}

impl FromRow<'_, AnyRow> for EventRow {
    fn from_row(row: &AnyRow) -> sqlx::Result<Self> {
        Ok(EventRow {
            seq: row.try_get("seq")?,
            kind: row.try_get("kind")?,
            data: row.try_get("data")?,
        })
    }
}

impl FromRow<'_, AnyRow> for ShareRow {
    fn from_row(row: &AnyRow) -> sqlx::Result<Self> {
        Ok(ShareRow {
            id: row.try_get("id")?,
            config: row.try_get("config")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

/// Every file of `server/migrations` as (version, description, SQL): what `sqlx::migrate!`
/// would embed (a test checks the list against the folder).
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    20260101000000,
    "init",
    include_str!("../migrations/20260101000000_init.sql"),
)];

/// The migrations as sqlx's own folder reader makes them: version and description from the
/// file name, the checksum of the SQL, a transaction unless the file opts out.
fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    sql.starts_with("-- no-transaction"),
                )
            })
            .collect(),
    )
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    last_job_id: Arc<AtomicI64>,
}

/// The `jobs` columns `JobRow` reads (a macro so queries stay string literals).
macro_rules! job_columns {
    () => {
        "id, status, config, devices, run_dir, exit_code, last_metrics, created_at, started_at, finished_at"
    };
}

impl Store {
    /// Connects (creating a SQLite file if needed) and applies the migrations.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let url = if is_sqlite && !in_memory && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_string()
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 4 } else { 16 })
            .acquire_timeout(std::time::Duration::from_secs(10));
        if in_memory {
            // Every connection to `sqlite::memory:` is its own database: keep exactly one alive.
            options = options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        if is_sqlite {
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 10000;",
                    )
                    .await?;
                    Ok(())
                })
            });
        }
        let pool = options
            .connect(&url)
            .await
            .with_context(|| format!("connecting to the database `{}`", redact(&url)))?;
        migrator()
            .run(&pool)
            .await
            .context("applying the database migrations")?;
        let (last,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(id), 0) FROM jobs")
            .fetch_one(&pool)
            .await?;
        Ok(Store {
            pool,
            last_job_id: Arc::new(AtomicI64::new(last)),
        })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- jobs

    /// The next job id (submission order).
    pub fn allocate_job_id(&self) -> i64 {
        self.last_job_id.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stores a new queued job under an id from `allocate_job_id`.
    pub async fn insert_job(&self, id: i64, config_json: &str, now: i64) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO jobs (id, status, config, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(status::QUEUED)
            .bind(config_json)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn job(&self, id: i64) -> sqlx::Result<Option<JobRow>> {
        sqlx::query_as::<_, JobRow>(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Newest first.
    pub async fn jobs(&self, limit: i64) -> sqlx::Result<Vec<JobRow>> {
        sqlx::query_as::<_, JobRow>(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// The job that has waited longest.
    pub async fn oldest_queued(&self) -> sqlx::Result<Option<JobRow>> {
        sqlx::query_as::<_, JobRow>(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE status = $1 ORDER BY id LIMIT 1"
        ))
        .bind(status::QUEUED)
        .fetch_optional(&self.pool)
        .await
    }

    /// queued → running; false if the job is no longer queued (cancelled meanwhile).
    pub async fn mark_running(
        &self,
        id: i64,
        devices: &str,
        run_dir: &str,
        now: i64,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET status = $1, devices = $2, run_dir = $3, started_at = $4 \
             WHERE id = $5 AND status = $6",
        )
        .bind(status::RUNNING)
        .bind(devices)
        .bind(run_dir)
        .bind(now)
        .bind(id)
        .bind(status::QUEUED)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// queued → cancelled; false if the job is not queued.
    pub async fn cancel_queued(&self, id: i64, now: i64) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET status = $1, finished_at = $2 WHERE id = $3 AND status = $4",
        )
        .bind(status::CANCELLED)
        .bind(now)
        .bind(id)
        .bind(status::QUEUED)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// running → a terminal status.
    pub async fn finish(
        &self,
        id: i64,
        final_status: &str,
        exit_code: Option<i64>,
        now: i64,
    ) -> sqlx::Result<()> {
        sqlx::query("UPDATE jobs SET status = $1, exit_code = $2, finished_at = $3 WHERE id = $4")
            .bind(final_status)
            .bind(exit_code)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Jobs left `running` by a server that died; the caller marks them interrupted.
    pub async fn running_jobs(&self) -> sqlx::Result<Vec<i64>> {
        let rows: Vec<(i64,)> = sqlx::query_as("SELECT id FROM jobs WHERE status = $1 ORDER BY id")
            .bind(status::RUNNING)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    pub async fn set_last_metrics(&self, id: i64, metrics_json: &str) -> sqlx::Result<()> {
        sqlx::query("UPDATE jobs SET last_metrics = $1 WHERE id = $2")
            .bind(metrics_json)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- job events

    pub async fn insert_event(
        &self,
        job_id: i64,
        seq: i64,
        kind: &str,
        data: &str,
    ) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO job_events (job_id, seq, kind, data) VALUES ($1, $2, $3, $4)")
            .bind(job_id)
            .bind(seq)
            .bind(kind)
            .bind(data)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Events with `seq > after`, in order.
    pub async fn events_after(&self, job_id: i64, after: i64) -> sqlx::Result<Vec<EventRow>> {
        sqlx::query_as::<_, EventRow>(
            "SELECT seq, kind, data FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(job_id)
        .bind(after)
        .fetch_all(&self.pool)
        .await
    }

    /// The job's events of one kind, in order.
    pub async fn events_of_kind(&self, job_id: i64, kind: &str) -> sqlx::Result<Vec<EventRow>> {
        sqlx::query_as::<_, EventRow>(
            "SELECT seq, kind, data FROM job_events WHERE job_id = $1 AND kind = $2 ORDER BY seq",
        )
        .bind(job_id)
        .bind(kind)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn last_event_seq(&self, job_id: i64) -> sqlx::Result<i64> {
        let (last,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM job_events WHERE job_id = $1")
                .bind(job_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(last)
    }

    // ---- shares

    /// False if the id is taken.
    pub async fn insert_share(&self, id: &str, config_json: &str, now: i64) -> sqlx::Result<bool> {
        if self.share(id).await?.is_some() {
            return Ok(false);
        }
        sqlx::query("INSERT INTO shares (id, config, created_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(config_json)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(true)
    }

    pub async fn share(&self, id: &str) -> sqlx::Result<Option<ShareRow>> {
        sqlx::query_as::<_, ShareRow>("SELECT id, config, created_at FROM shares WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    /// The embedded list is the folder as sqlx reads it (what `sqlx::migrate!` would embed):
    /// the same versions, descriptions, kinds, checksums and transaction choices.
    #[tokio::test]
    async fn the_embedded_migrations_are_the_folder_as_sqlx_reads_it() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let read = sqlx::migrate::Migrator::new(folder).await.unwrap();
        let embedded = super::migrator();
        let key = |m: &sqlx::migrate::Migration| {
            (
                m.version,
                m.description.to_string(),
                m.migration_type,
                m.checksum.to_vec(),
                m.no_tx,
            )
        };
        let (read, embedded): (Vec<_>, Vec<_>) = (
            read.iter().map(key).collect(),
            embedded.iter().map(key).collect(),
        );
        assert!(!read.is_empty());
        assert_eq!(embedded, read);
    }

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("sqlite://a.db"), "sqlite://a.db");
    }
}
