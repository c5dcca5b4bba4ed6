//! The command line (`whet-server --help`) and what it resolves to: defaults, the `whet`
//! binary, the device list, the database URL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

/// whet-server: the studio's backend. Checks configs, queues and runs `whet sft` jobs (one
/// child process each), streams their logs and metrics, stores share links and serves the
/// studio. Mutating calls need `Authorization: Bearer <token>`; the token comes from WHET_TOKEN
/// or `<data-dir>/token`, or is generated and printed at the first start.
#[derive(Debug, Clone, Parser)]
#[command(name = "whet-server", version)]
pub struct Args {
    /// Address to listen on. Anything but loopback exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// sqlite://FILE or postgres://... (default: sqlite://<data-dir>/whet.db).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Where the database, the token and the runs (`runs/<job-id>/`) live.
    #[arg(long, value_name = "DIR", default_value = "whet-data")]
    pub data_dir: PathBuf,
    /// The built studio (its index.html and assets).
    #[arg(long, value_name = "DIR", default_value = "app/dist")]
    pub static_dir: PathBuf,
    /// The `whet` binary that runs jobs (default: `whet` next to this executable, else on PATH).
    #[arg(long, value_name = "PATH")]
    pub whet_bin: Option<PathBuf>,
    /// GPU ids jobs may use, e.g. 0,1,2,3 (default: none; jobs run on CPU).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub devices: Vec<u32>,
    /// Jobs running at the same time.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_jobs: u32,
    /// A folder a job's local model and dataset paths may lie in (besides data-dir and
    /// examples/). Repeatable.
    #[arg(long = "allow-read", value_name = "DIR")]
    pub allow_read: Vec<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a running job is cancelled.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub cancel_grace: f64,
}

impl Args {
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("whet.db").display()))
    }

    pub fn cancel_grace(&self) -> Duration {
        Duration::from_secs_f64(self.cancel_grace.max(0.0))
    }

    /// `--whet-bin`, else `whet` beside this executable, else `whet` from PATH.
    pub fn whet_bin(&self) -> PathBuf {
        if let Some(path) = &self.whet_bin {
            return path.clone();
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("whet")))
            .filter(|p| p.is_file());
        beside
            .or_else(|| find_on_path("whet"))
            .unwrap_or_else(|| PathBuf::from("whet"))
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_embedded_ones() {
        let args = Args::parse_from(["whet-server"]);
        assert_eq!(args.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(args.data_dir, PathBuf::from("whet-data"));
        assert_eq!(args.static_dir, PathBuf::from("app/dist"));
        assert_eq!(args.database_url(), "sqlite://whet-data/whet.db");
        assert!(args.devices.is_empty());
        assert_eq!(args.max_concurrent_jobs, 1);
        assert_eq!(args.cancel_grace(), Duration::from_secs(10));
    }

    #[test]
    fn lists_and_repeats_parse() {
        let args = Args::parse_from([
            "whet-server",
            "--devices",
            "0,1,3",
            "--allow-read",
            "/a",
            "--allow-read",
            "/b",
            "--max-concurrent-jobs",
            "2",
            "--database-url",
            "postgres://x/y",
        ]);
        assert_eq!(args.devices, vec![0, 1, 3]);
        assert_eq!(
            args.allow_read,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(args.max_concurrent_jobs, 2);
        assert_eq!(args.database_url(), "postgres://x/y");
        assert!(Args::try_parse_from(["whet-server", "--max-concurrent-jobs", "0"]).is_err());
    }
}
