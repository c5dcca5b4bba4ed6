-- whet-server schema. Portable SQL: the same file runs on SQLite and PostgreSQL (BIGINT and TEXT
-- only; ids are assigned by the server, times are unix milliseconds).

CREATE TABLE jobs (
    id BIGINT PRIMARY KEY,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    devices TEXT,
    run_dir TEXT,
    exit_code BIGINT,
    last_metrics TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);

CREATE INDEX jobs_by_status ON jobs (status, id);

-- Everything a job's event stream has said, in order: kind is log, metrics or status; data is JSON.
CREATE TABLE job_events (
    job_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE shares (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
