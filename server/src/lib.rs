//! whet-server: the studio's backend (DESIGN §4).
//!
//! It checks configs with whet-shared (`POST /api/check` answers what `whet check --json`
//! prints), queues jobs and runs each as a `whet sft` child process — never linking the engine,
//! so a crashed or out-of-memory run cannot take the server down — streams their logs, metrics
//! and status as Server-Sent Events, keeps everything in SQLite or PostgreSQL so a restart loses
//! nothing, stores short share links and serves the studio.
//!
//! Modules: `cli` (flags), `server` (start-up), `api` (router and handlers), `error` (the one
//! error type), `auth` (token), `paths` (what jobs may read), `db` (storage), `events` (per-job
//! event streams), `executor` (the run queue, devices and child processes), `commands` (the short
//! `whet` commands beside jobs: dataset preview), `studio` (static pages), `ids` (random ids and
//! times).

pub mod api;
pub mod auth;
pub mod cli;
pub mod commands;
pub mod db;
pub mod error;
pub mod events;
pub mod executor;
pub mod ids;
pub mod paths;
pub mod server;
pub mod studio;

pub use cli::Args;
pub use server::{serve, App};
