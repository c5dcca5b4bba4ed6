//! Test helpers: an in-process server on a free loopback port, a `whet sft` test double, a
//! small SSE reader and a throw-away PostgreSQL server; `prerequisites` builds the real `whet`
//! and says when a test is skipped.
#![allow(dead_code)]

#[path = "../../../tests/src/prerequisites.rs"]
pub mod prerequisites;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use serde_json::{json, Value};
use tempfile::TempDir;

pub const TOKEN: &str = "test-token-0123456789";

/// A server on 127.0.0.1:<free port>, with its own data dir and a SQLite file in it.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub data: TempDir,
    pub app: whet_server::App,
    task: tokio::task::JoinHandle<()>,
    executor: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
        self.executor.abort();
    }
}

impl TestServer {
    /// `extra` are more command-line flags (`--devices 0,1`, ...).
    pub async fn start(extra: &[&str]) -> TestServer {
        let data = tempfile::tempdir().unwrap();
        Self::start_in(data, None, extra).await
    }

    pub async fn start_in(data: TempDir, database_url: Option<&str>, extra: &[&str]) -> TestServer {
        let fake = write_fake_whet(data.path());
        let data_dir = data.path().join("data");
        let mut argv: Vec<String> = vec![
            "whet-server".into(),
            "--bind".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        // Defaults for the tests, unless `extra` says otherwise.
        for (flag, value) in [
            (
                "--static-dir",
                data.path().join("no-studio").display().to_string(),
            ),
            ("--whet-bin", fake.display().to_string()),
            ("--cancel-grace", "0.5".to_string()),
        ] {
            if !extra.contains(&flag) {
                argv.extend([flag.to_string(), value]);
            }
        }
        if let Some(url) = database_url {
            argv.extend(["--database-url".into(), url.into()]);
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        let args = whet_server::Args::parse_from(argv);
        let app = whet_server::App::open(&args, Some(TOKEN.into()))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = app.router();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        let executor = app.start_executor();
        TestServer {
            base,
            client: reqwest::Client::new(),
            data,
            app,
            task,
            executor,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data").canonicalize().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        status_json(r).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    /// Submits a job and returns its id (panics unless 201).
    pub async fn submit(&self, config: &Value) -> i64 {
        let (status, body) = self.post("/api/jobs", config).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["status"], "queued");
        body["id"].as_i64().unwrap()
    }

    pub async fn events(&self, id: i64, last_event_id: Option<i64>) -> SseReader {
        let mut request = self.client.get(self.url(&format!("/api/jobs/{id}/events")));
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        SseReader::new(response)
    }

    /// Reads the job's events until its final status; returns them all.
    pub async fn wait_until_done(&self, id: i64) -> Vec<SseEvent> {
        self.events(id, None).await.read_to_end().await
    }

    pub async fn job(&self, id: i64) -> Value {
        let (status, body) = self.get(&format!("/api/jobs/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

pub async fn status_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// A job config the test double understands: `behaviour` is e.g. `steps=3 pause=0 exit=0`
/// (`ignore_term=1` ignores SIGTERM). It travels in the `system` field.
/// The repository's examples/ folder (the demo's model and data).
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .canonicalize()
        .unwrap()
}

/// A test server that runs the real `whet` (built when needed) and lets jobs read `readable`.
pub async fn real_server(readable: &[&Path]) -> TestServer {
    let mut args = vec![
        "--whet-bin".to_string(),
        prerequisites::whet_binary().display().to_string(),
    ];
    for folder in readable {
        args.extend(["--allow-read".to_string(), folder.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start(&args).await
}

pub fn fake_job(behaviour: &str) -> Value {
    json!({"sft": {"model": "Qwen/Qwen3-0.6B", "dataset": ["AI-ModelScope/alpaca-gpt4-data-en#100"],
                   "system": format!("fake: {behaviour}")}})
}

/// A job the real `whet sft` accepts: a tiny Qwen3 config (no weights: nothing here trains)
/// and a one-row dataset written into `data`, one full-tuning step.
pub fn tiny_real_job(data: &Path) -> Value {
    std::fs::create_dir_all(data.join("model")).unwrap();
    std::fs::write(
        data.join("model/config.json"),
        json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 512,
               "torch_dtype": "float32"})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        data.join("train.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"1\"}, {\"role\": \"assistant\", \"content\": \"2\"}]}\n",
    )
    .unwrap();
    json!({"sft": {"model": data.join("model"), "dataset": [data.join("train.jsonl")],
                   "tuner_type": "full", "max_steps": 1}})
}

/// A test double for `whet sft --config FILE` (process control, not the product): prints lines
/// on stdout and stderr, appends records to `<output_dir>/v0-20260101-000000/logging.jsonl`,
/// pauses, exits with the asked code.
pub fn write_fake_whet(dir: &Path) -> PathBuf {
    let path = dir.join("fake-whet.sh");
    let script = r#"#!/bin/sh
if [ "$1" = "infer" ]; then
  # A reply in two pieces, 3 s apart, naming the model; `--max_new_tokens 1` fails.
  model=$(echo "$@" | sed -n 's/.*--model \([^ ]*\).*/\1/p')
  case " $* " in *" --max_new_tokens 1 "*) echo "error: fake whet: cannot" >&2; exit 1;; esac
  printf 'hel'; sleep 3; printf 'lo from %s\n' "$(basename "$model")"; exit 0
fi
[ "$1" = "sft" ] || { echo "fake whet: only sft and infer" >&2; exit 2; }
[ "$2" = "--help" ] && exit 0
cfg="$3"
out=$(sed -n 's/^ *"output_dir": "\(.*\)",\{0,1\}$/\1/p' "$cfg")
spec=$(sed -n 's/^ *"system": "\(.*\)",\{0,1\}$/\1/p' "$cfg")
steps=3; pause=0; code=0; save=0
for kv in $spec; do
  case "$kv" in
    steps=*) steps=${kv#steps=};;
    pause=*) pause=${kv#pause=};;
    exit=*) code=${kv#exit=};;
    ignore_term=1) trap '' TERM;;
    save=1) save=1;;
  esac
done
echo "fake whet: config=$cfg devices=[$CUDA_VISIBLE_DEVICES] token=[$WHET_TOKEN] env=[$WHET_TEST_ENV]"
dir="$out/v0-20260101-000000"
mkdir -p "$dir"
i=1
while [ "$i" -le "$steps" ]; do
  echo "step $i"
  echo "{\"loss\": $i.5, \"global_step/max_steps\": \"$i/$steps\"}" >> "$dir/logging.jsonl"
  echo "note $i" >&2
  [ "$pause" = 0 ] || sleep "$pause"
  if [ "$save" = 1 ]; then
    mkdir -p "$dir/checkpoint-$i"
    echo "{\"log_history\": [{\"step\": $i, \"loss\": $i.5}]}" > "$dir/checkpoint-$i/trainer_state.json"
  fi
  i=$((i+1))
done
exit "$code"
"#;
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: i64,
    pub event: String,
    pub data: Value,
}

impl SseEvent {
    pub fn status(&self) -> Option<&str> {
        (self.event == "status")
            .then(|| self.data["status"].as_str())
            .flatten()
    }
}

pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> SseReader {
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut fields: HashMap<&str, String> = HashMap::new();
                for line in frame.lines() {
                    if let Some((key, value)) = line.split_once(':') {
                        if !key.is_empty() {
                            fields
                                .entry(key)
                                .or_default()
                                .push_str(value.strip_prefix(' ').unwrap_or(value));
                        }
                    }
                }
                if !fields.contains_key("data") {
                    continue; // a keep-alive comment
                }
                return Some(SseEvent {
                    // Job events carry ids; chat events do not.
                    id: fields.get("id").map_or(0, |id| id.parse().unwrap()),
                    event: fields.get("event").cloned().unwrap_or_default(),
                    data: serde_json::from_str(fields.get("data").map_or("null", |s| s)).unwrap(),
                });
            }
            match self.response.chunk().await.unwrap() {
                Some(bytes) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                None => return None,
            }
        }
    }

    /// Events until the first one matching `stop` (included).
    pub async fn read_until(&mut self, stop: impl Fn(&SseEvent) -> bool) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        while let Some(event) = self.next().await {
            let done = stop(&event);
            seen.push(event);
            if done {
                break;
            }
        }
        seen
    }

    /// Every event until the server ends the stream (after the final status).
    pub async fn read_to_end(&mut self) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        while let Some(event) = self.next().await {
            seen.push(event);
        }
        seen
    }
}

pub fn statuses(events: &[SseEvent]) -> Vec<&str> {
    events.iter().filter_map(SseEvent::status).collect()
}

pub fn log_lines(events: &[SseEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "log")
        .map(|e| e.data["line"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A throw-away PostgreSQL server: initdb into a temp dir, listening only on a unix socket in
/// that dir (port number chosen free), stopped on drop. `None` when PostgreSQL is not installed.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    user: Option<&'static str>,
    pub url: String,
}

impl Postgres {
    pub fn start() -> Option<Postgres> {
        // PATH first, then where the packages put them (Debian: /usr/lib/postgresql/<v>/bin).
        let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        candidates.push("/usr/local/bin".into());
        if let Ok(versions) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<PathBuf> = versions
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect();
            versions.sort();
            candidates.extend(versions.into_iter().rev());
        }
        let bin = candidates
            .into_iter()
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())?;
        // initdb refuses to run as root: run it (and the server) as an unprivileged user.
        let user = if unsafe { libc::geteuid() } == 0 {
            Some(if user_exists("postgres") {
                "postgres"
            } else {
                "nobody"
            })
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("whet-pg")
            .tempdir()
            .unwrap();
        if let Some(user) = user {
            let ok = Command::new("chown")
                .arg(user)
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown {user} {}", dir.path().display());
        }
        let port = free_port();
        let socket_dir = dir.path().display().to_string();
        let pg = Postgres {
            url: format!("postgres://whet@localhost:{port}/whet_test?host={socket_dir}"),
            bin,
            user,
            dir,
        };
        let data = pg.dir.path().join("data");
        pg.run(&[
            "initdb",
            "-D",
            &data.display().to_string(),
            "-A",
            "trust",
            "-U",
            "whet",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        let options = format!("-k {socket_dir} -p {port} -c listen_addresses='' -F");
        let log = pg.dir.path().join("log").display().to_string();
        pg.run(&[
            "pg_ctl",
            "-D",
            &data.display().to_string(),
            "-o",
            &options,
            "-l",
            &log,
            "-w",
            "start",
        ]);
        Some(pg)
    }

    fn run(&self, argv: &[&str]) {
        let program = self.bin.join(argv[0]);
        let mut command = match self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let output = command
            .args(&argv[1..])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{argv:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Creates the test database (named in `url`) through the `postgres` one.
    pub async fn create_database(&self) {
        use sqlx::Connection;
        let admin = self.url.replace("/whet_test?", "/postgres?");
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::Executor::execute(&mut conn, "CREATE DATABASE whet_test")
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let program = self.bin.join("pg_ctl");
        let mut command = match self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let _ = command
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
    }
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
