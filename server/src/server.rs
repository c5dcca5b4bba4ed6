//! Start-up: resolve the command line into a running server — data dir, database (migrated),
//! token, readable roots, jobs a dead server left running marked interrupted, the executor, the
//! listener — and say what was chosen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::Router;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::auth::{BearerToken, TokenSource};
use crate::cli::Args;
use crate::commands::Commands;
use crate::db::Store;
use crate::events::EventHub;
use crate::executor::{Executor, ExecutorSettings};
use crate::paths::AllowedRoots;
use crate::studio::Studio;

/// Everything the server is made of, before it listens.
pub struct App {
    pub state: AppState,
    pub token_source: TokenSource,
    pub data_dir: PathBuf,
    pub database_url: String,
    /// Jobs found `running` at start and marked `interrupted`.
    pub interrupted: Vec<i64>,
}

impl App {
    /// `env_token` is WHET_TOKEN (passed in so tests need not touch the environment).
    pub async fn open(args: &Args, env_token: Option<String>) -> anyhow::Result<App> {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("creating the data dir {}", args.data_dir.display()))?;
        let data_dir = args.data_dir.canonicalize()?;
        for dir in &args.allow_read {
            if !dir.is_dir() {
                bail!("--allow-read {}: no such folder", dir.display());
            }
        }
        let database_url = args.database_url();
        let store = Store::open(&database_url).await?;
        let (token, token_source) = BearerToken::load_or_create(env_token, &data_dir)?;
        let examples = std::env::current_dir()?.join("examples");
        // The token and the SQLite files sit in data-dir but are never a job's to read.
        let secrets: Vec<PathBuf> = ["token", "whet.db", "whet.db-wal", "whet.db-shm"]
            .iter()
            .map(|name| data_dir.join(name))
            .chain(sqlite_file(&database_url).into_iter().flat_map(|db| {
                ["", "-wal", "-shm"].map(|suffix| {
                    let mut name = db.clone().into_os_string();
                    name.push(suffix);
                    PathBuf::from(name)
                })
            }))
            .collect();
        let roots = AllowedRoots::new(
            [data_dir.as_path(), examples.as_path()]
                .into_iter()
                .chain(args.allow_read.iter().map(PathBuf::as_path)),
        )
        .deny(secrets.iter().map(PathBuf::as_path));
        let events = EventHub::new(store.clone());
        let executor = Executor::new(
            ExecutorSettings {
                whet_bin: args.whet_bin(),
                data_dir: data_dir.clone(),
                devices: args.devices.clone(),
                max_concurrent_jobs: args.max_concurrent_jobs as usize,
                cancel_grace: args.cancel_grace(),
                metrics_poll: Duration::from_millis(250),
            },
            store.clone(),
            events.clone(),
        );
        let interrupted = executor.recover().await?;
        let commands = Commands::new(args.whet_bin(), &data_dir);
        let state = AppState {
            commands,
            store,
            token: Arc::new(token),
            roots: Arc::new(roots),
            executor,
            events,
            studio: Arc::new(Studio {
                static_dir: args.static_dir.clone(),
            }),
        };
        Ok(App {
            state,
            token_source,
            data_dir,
            database_url,
            interrupted,
        })
    }

    pub fn router(&self) -> Router {
        api::router(self.state.clone())
    }

    /// Starts running queued jobs (those kept from before a restart first).
    pub fn start_executor(&self) -> tokio::task::JoinHandle<()> {
        self.state.executor.start()
    }

    /// What the operator needs to know, printed once at start; ends with `listening on URL`.
    pub fn banner(&self, address: SocketAddr) -> String {
        let settings = self.state.executor.settings();
        let devices = if settings.devices.is_empty() {
            "none (jobs run on CPU)".to_string()
        } else {
            settings
                .devices
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let roots = self
            .state
            .roots
            .roots()
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let token = match self.token_source {
            TokenSource::Environment => "from WHET_TOKEN".to_string(),
            TokenSource::File => format!("from {}", self.data_dir.join("token").display()),
            TokenSource::Generated => format!(
                "{} (generated; saved to {}; set WHET_TOKEN to choose your own)",
                self.state.token.as_str(),
                self.data_dir.join("token").display()
            ),
        };
        let mut text = format!(
            "whet-server {}\n  data dir: {}\n  database: {}\n  whet: {}\n  devices: {devices}; at most {} job(s) at once\n  jobs may read: {roots}\n  token: {token}\n",
            env!("CARGO_PKG_VERSION"),
            self.data_dir.display(),
            crate::db::redact(&self.database_url),
            settings.whet_bin.display(),
            settings.max_concurrent_jobs,
        );
        if !self.state.studio.is_built() {
            text += &format!(
                "  studio: not built ({}/index.html missing); `cargo xtask studio` builds it\n",
                self.state.studio.static_dir.display()
            );
        }
        if !self.interrupted.is_empty() {
            text += &format!(
                "  marked interrupted (running when the server stopped): {:?}\n",
                self.interrupted
            );
        }
        if !address.ip().is_loopback() {
            text += &format!(
                "WARNING: listening on {address}, which is not a loopback address: anyone who can reach this machine can reach the API and read jobs and logs (changes still need the token), and there is no TLS. Bind 127.0.0.1 unless you mean it.\n"
            );
        }
        // Last, so whoever waits for it has read everything above.
        text += &format!("listening on http://{address}\n");
        text
    }
}

/// The canonical path of a `sqlite://FILE` database, when it is one.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next()?;
    PathBuf::from(path).canonicalize().ok()
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(args: Args) -> anyhow::Result<()> {
    let app = App::open(&args, std::env::var("WHET_TOKEN").ok()).await?;
    let listener = TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("listening on {}", args.bind))?;
    let address = listener.local_addr()?;
    print!("{}", app.banner(address));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    app.start_executor();
    let (stopping, mut stop_asked) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app.router()).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = stopping.send(true);
    });
    // Event streams of running jobs never end by themselves: after a short grace for requests
    // in flight, stop waiting for them (clients resume with Last-Event-ID). Running jobs' children
    // die with the server and are marked interrupted at the next start.
    tokio::select! {
        served = server => served?,
        _ = async {
            let _ = stop_asked.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {}
    }
    app.state.store.close().await;
    Ok(())
}

/// How long a stopping server waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
