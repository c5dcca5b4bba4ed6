//! The storage layer against SQLite and against a real PostgreSQL server that the test starts
//! itself (initdb into a temp dir; SKIPPED when PostgreSQL is not installed).

mod common;

use whet_server::db::{status, Store};

/// The same checks for every backend.
async fn exercise_store(url: &str) {
    let store = Store::open(url).await.unwrap();
    // Migrations are applied once; opening again is fine.
    let store2 = Store::open(url).await.unwrap();
    store2.close().await;

    let a = store.allocate_job_id();
    store
        .insert_job(a, r#"{"sft":{"model":"a"}}"#, 1_000)
        .await
        .unwrap();
    let b = store.allocate_job_id();
    store
        .insert_job(b, r#"{"sft":{"model":"b"}}"#, 2_000)
        .await
        .unwrap();
    let c = store.allocate_job_id();
    store
        .insert_job(c, r#"{"sft":{"model":"c"}}"#, 3_000)
        .await
        .unwrap();
    assert!(a < b && b < c);

    let job = store.job(a).await.unwrap().unwrap();
    assert_eq!(
        (job.status.as_str(), job.created_at, job.started_at),
        (status::QUEUED, 1_000, None)
    );
    assert!(store.job(999_999).await.unwrap().is_none());
    let listed: Vec<i64> = store.jobs(10).await.unwrap().iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![c, b, a], "newest first");
    assert_eq!(store.jobs(2).await.unwrap().len(), 2);

    assert_eq!(store.oldest_queued().await.unwrap().unwrap().id, a);
    assert!(store
        .mark_running(a, "0,1", "/runs/a", 4_000)
        .await
        .unwrap());
    assert!(
        !store
            .mark_running(a, "0,1", "/runs/a", 4_000)
            .await
            .unwrap(),
        "only from queued"
    );
    assert_eq!(store.oldest_queued().await.unwrap().unwrap().id, b);
    assert!(store.cancel_queued(b, 5_000).await.unwrap());
    assert!(
        !store.cancel_queued(a, 5_000).await.unwrap(),
        "a running job is not just marked"
    );
    assert_eq!(store.oldest_queued().await.unwrap().unwrap().id, c);
    assert_eq!(store.running_jobs().await.unwrap(), vec![a]);

    store.set_last_metrics(a, r#"{"loss":1.5}"#).await.unwrap();
    store
        .finish(a, status::SUCCEEDED, Some(0), 6_000)
        .await
        .unwrap();
    let job = store.job(a).await.unwrap().unwrap();
    assert_eq!(job.status, status::SUCCEEDED);
    assert_eq!(job.exit_code, Some(0));
    assert_eq!(job.devices.as_deref(), Some("0,1"));
    assert_eq!(job.run_dir.as_deref(), Some("/runs/a"));
    assert_eq!(job.last_metrics.as_deref(), Some(r#"{"loss":1.5}"#));
    assert_eq!(
        (job.started_at, job.finished_at),
        (Some(4_000), Some(6_000))
    );
    assert!(store.running_jobs().await.unwrap().is_empty());

    assert_eq!(store.last_event_seq(a).await.unwrap(), 0);
    for (seq, kind) in [(1, "status"), (2, "log"), (3, "metrics")] {
        store
            .insert_event(a, seq, kind, &format!("{{\"n\":{seq}}}"))
            .await
            .unwrap();
    }
    store.insert_event(b, 1, "status", "{}").await.unwrap();
    assert!(
        store.insert_event(a, 2, "log", "{}").await.is_err(),
        "seq is unique per job"
    );
    assert_eq!(store.last_event_seq(a).await.unwrap(), 3);
    let after: Vec<(i64, String)> = store
        .events_after(a, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.kind))
        .collect();
    assert_eq!(after, vec![(2, "log".into()), (3, "metrics".into())]);

    assert!(store
        .insert_share("abcDEF123456", r#"{"sft":{}}"#, 7_000)
        .await
        .unwrap());
    assert!(
        !store
            .insert_share("abcDEF123456", "{}", 7_000)
            .await
            .unwrap(),
        "ids are unique"
    );
    let share = store.share("abcDEF123456").await.unwrap().unwrap();
    assert_eq!(
        (share.config.as_str(), share.created_at),
        (r#"{"sft":{}}"#, 7_000)
    );
    assert!(
        store.share("abcdef123456").await.unwrap().is_none(),
        "ids are case-sensitive"
    );

    // Ids continue after a reopen.
    store.close().await;
    let reopened = Store::open(url).await.unwrap();
    assert_eq!(reopened.allocate_job_id(), c + 1);
    reopened.close().await;
}

#[tokio::test]
async fn sqlite_storage() {
    let dir = tempfile::tempdir().unwrap();
    exercise_store(&format!("sqlite://{}/whet.db", dir.path().display())).await;
}

#[tokio::test]
async fn sqlite_in_memory_storage_opens() {
    let store = Store::open("sqlite::memory:").await.unwrap();
    let id = store.allocate_job_id();
    store.insert_job(id, "{}", 1).await.unwrap();
    assert_eq!(store.jobs(10).await.unwrap().len(), 1);
}

/// Storage, and one whole job run through the API, on PostgreSQL.
#[tokio::test]
async fn postgres_storage_and_a_job_run() {
    let Some(pg) = common::Postgres::start() else {
        return common::prerequisites::skip(
            "postgres_storage_and_a_job_run",
            "initdb/pg_ctl not found (install postgresql; `.ci/run` does)",
        );
    };
    pg.create_database().await;
    exercise_store(&pg.url).await;

    let fresh = pg.url.replace("whet_test", "whet_api");
    {
        use sqlx::Connection;
        let admin = pg.url.replace("/whet_test?", "/postgres?");
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::Executor::execute(&mut conn, "CREATE DATABASE whet_api")
            .await
            .unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let s = common::TestServer::start_in(data, Some(&fresh), &[]).await;
    let id = s.submit(&common::fake_job("steps=2")).await;
    let events = s.wait_until_done(id).await;
    assert_eq!(
        common::statuses(&events),
        vec!["queued", "running", "succeeded"]
    );
    assert_eq!(events.iter().filter(|e| e.event == "metrics").count(), 2);
    let job = s.job(id).await;
    assert_eq!(job["last_metrics"]["loss"], 2.5);
    let (status, share) = s
        .post(
            "/api/shares",
            &serde_json::json!({"sft": {"model": "Qwen/Qwen3-8B"}}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = s
        .get(&format!("/api/shares/{}", share["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
}
