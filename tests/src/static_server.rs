//! A minimal HTTP/1.1 file server for the studio's static build: one request per connection,
//! `index.html` for any path that is not a file (as whet-server's fallback does, so `/s/<id>`
//! and deep links load the page), 404 for `/api/...` (no backend) — or, for the tests of the
//! studio's side of the server API, a fake of DESIGN §4's routes (`FakeApi`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct StaticServer {
    pub base_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript",
        "wasm" => "application/wasm",
        "css" => "text/css",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

async fn respond(
    mut stream: TcpStream,
    root: PathBuf,
    api: Option<Arc<FakeApi>>,
) -> std::io::Result<()> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 || data.len() > 64 * 1024 {
            return Ok(());
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&data[head_end..]).to_string();
    let method = head.split_whitespace().next().unwrap_or("GET").to_string();
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    if let (Some(api), true) = (&api, path.starts_with("/api/")) {
        let query = target
            .split('#')
            .next()
            .and_then(|t| t.split_once('?'))
            .map(|(_, q)| q.to_string())
            .unwrap_or_default();
        let request = ApiRequest {
            method,
            path,
            query,
            authorization: header("authorization"),
            body,
        };
        return api.answer(stream, request).await;
    }
    let (status, file) = if path.starts_with("/api/") {
        ("404 Not Found", None)
    } else {
        let relative = path.trim_start_matches('/');
        let candidate = root.join(relative);
        let safe = !relative.split('/').any(|part| part == "..");
        if safe && !relative.is_empty() && candidate.is_file() {
            ("200 OK", Some(candidate))
        } else {
            ("200 OK", Some(root.join("index.html")))
        }
    };
    let (body, kind) = match &file {
        Some(file) => (tokio::fs::read(file).await?, content_type(file)),
        None => (b"{\"error\":\"no backend\"}".to_vec(), "application/json"),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

impl StaticServer {
    /// Serves `root` on 127.0.0.1 at a free port until dropped.
    pub async fn start(root: PathBuf) -> StaticServer {
        Self::serve(root, None).await
    }

    /// Serves `root` with a fake whet-server API beside it.
    pub async fn start_with_api(root: PathBuf, api: Arc<FakeApi>) -> StaticServer {
        Self::serve(root, Some(api)).await
    }

    async fn serve(root: PathBuf, api: Option<Arc<FakeApi>>) -> StaticServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a local port");
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (root, api) = (root.clone(), api.clone());
                tokio::spawn(async move {
                    let _ = respond(stream, root, api).await;
                });
            }
        });
        StaticServer {
            base_url: format!("http://127.0.0.1:{port}"),
            task,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    /// What follows `?` in the request's target, if anything.
    pub query: String,
    pub authorization: Option<String>,
    pub body: String,
}

/// A stand-in for whet-server's API (DESIGN §4) with one job whose event stream sends
/// `metrics` records in logging.jsonl's form: enough to test the studio's side of the contract
/// (health, shares, submit with a bearer token, jobs list, SSE job view, cancel, the dataset
/// preview).
pub struct FakeApi {
    pub token: String,
    /// Every API request received, in order.
    pub requests: Mutex<Vec<ApiRequest>>,
    shares: Mutex<Vec<String>>,
    /// The `DatasetPreview` JSON that `POST /api/datasets/preview` answers (its `rows` cut to the
    /// `?rows=N` asked for); a config without a `dataset` gets a 422 instead, as from the server.
    preview: Mutex<Option<String>>,
    /// Answers a test set with `answer_with`, tried before the built-in routes.
    canned: Mutex<Vec<Canned>>,
}

/// One canned answer: method, path, status line, content type, body.
#[derive(Debug, Clone)]
struct Canned {
    method: String,
    path: String,
    status: String,
    kind: String,
    body: String,
}

async fn send(mut stream: TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

impl FakeApi {
    pub fn new(token: &str) -> Arc<FakeApi> {
        Arc::new(FakeApi {
            token: token.to_string(),
            requests: Mutex::new(Vec::new()),
            shares: Mutex::new(Vec::new()),
            canned: Mutex::new(Vec::new()),
            preview: Mutex::new(None),
        })
    }

    /// Answers `method path` with `status` (`200 OK`), `kind` and `body`. Several answers to
    /// one route are given in order, the last one again and again.
    pub fn answer_with(&self, method: &str, path: &str, status: &str, kind: &str, body: &str) {
        self.canned.lock().unwrap().push(Canned {
            method: method.into(),
            path: path.into(),
            status: status.into(),
            kind: kind.into(),
            body: body.into(),
        });
    }

    fn canned_answer(&self, request: &ApiRequest) -> Option<Canned> {
        let mut canned = self.canned.lock().unwrap();
        let matching: Vec<usize> = (0..canned.len())
            .filter(|&i| canned[i].method == request.method && canned[i].path == request.path)
            .collect();
        match matching.as_slice() {
            [] => None,
            [only] => Some(canned[*only].clone()),
            [first, ..] => Some(canned.remove(*first)),
        }
    }

    /// Sets the answer of `POST /api/datasets/preview` (a `DatasetPreview` as JSON).
    pub fn set_preview(&self, json: String) {
        *self.preview.lock().unwrap() = Some(json);
    }

    /// The preview's answer for a JobConfig body and a `rows=N` query.
    fn preview_answer(&self, request: &ApiRequest) -> (&'static str, String) {
        let config: serde_json::Value =
            serde_json::from_str(&request.body).unwrap_or(serde_json::Value::Null);
        let has_dataset = config["sft"]["dataset"]
            .as_array()
            .is_some_and(|d| !d.is_empty());
        if !has_dataset {
            let diagnostics = serde_json::json!({"diagnostics": [{
                "severity": "error", "field": "dataset", "code": "required",
                "message_en": "--dataset is required", "message_zh": "必须设置 --dataset",
                "fix": "add a dataset", "fix_zh": "添加数据集",
            }]});
            return ("422 Unprocessable Entity", diagnostics.to_string());
        }
        let Some(preview) = self.preview.lock().unwrap().clone() else {
            return (
                "500 Internal Server Error",
                r#"{"error":"no preview set"}"#.into(),
            );
        };
        let rows: usize = request
            .query
            .split('&')
            .find_map(|pair| pair.strip_prefix("rows="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(5);
        let mut preview: serde_json::Value = serde_json::from_str(&preview).expect("preview JSON");
        if let Some(list) = preview["rows"].as_array_mut() {
            list.truncate(rows);
        }
        ("200 OK", preview.to_string())
    }

    pub fn received(&self, method: &str, path: &str) -> Vec<ApiRequest> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .cloned()
            .collect()
    }

    async fn answer(&self, mut stream: TcpStream, request: ApiRequest) -> std::io::Result<()> {
        self.requests.lock().unwrap().push(request.clone());
        if let Some(canned) = self.canned_answer(&request) {
            return send(stream, &canned.status, &canned.kind, &canned.body).await;
        }
        let json = "application/json";
        let authorised =
            request.authorization.as_deref() == Some(&format!("Bearer {}", self.token));
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/api/health") => {
                send(
                    stream,
                    "200 OK",
                    json,
                    r#"{"status":"ok","version":"fake"}"#,
                )
                .await
            }
            ("POST", "/api/shares") => {
                let id = {
                    let mut shares = self.shares.lock().unwrap();
                    shares.push(request.body.clone());
                    format!("s{}", shares.len())
                };
                let answer = format!(r#"{{"id":"{id}","url":"/s/{id}"}}"#);
                send(stream, "201 Created", json, &answer).await
            }
            ("GET", path) if path.starts_with("/api/shares/s") => {
                let index: usize = path["/api/shares/s".len()..].parse().unwrap_or(0);
                let share = self
                    .shares
                    .lock()
                    .unwrap()
                    .get(index.wrapping_sub(1))
                    .cloned();
                match share {
                    Some(config) => send(stream, "200 OK", json, &config).await,
                    None => {
                        send(
                            stream,
                            "404 Not Found",
                            json,
                            r#"{"error":"no such share"}"#,
                        )
                        .await
                    }
                }
            }
            ("POST", "/api/jobs") if !authorised => {
                send(
                    stream,
                    "401 Unauthorized",
                    json,
                    r#"{"error":"missing or wrong bearer token"}"#,
                )
                .await
            }
            ("POST", "/api/jobs") => {
                send(stream, "201 Created", json, r#"{"id":1,"status":"queued"}"#).await
            }
            ("POST", "/api/datasets/preview") => {
                let (status, answer) = self.preview_answer(&request);
                send(stream, status, json, &answer).await
            }
            ("GET", "/api/jobs") => {
                let answer = r#"{"jobs":[{"id":1,"status":"running","created_at":"2026-01-01T00:00:00Z","config":{"sft":{"model":"examples/tiny-qwen3"}}}]}"#;
                send(stream, "200 OK", json, answer).await
            }
            ("GET", "/api/jobs/1") => {
                let answer = r#"{"id":1,"status":"running","created_at":"2026-01-01T00:00:00Z"}"#;
                send(stream, "200 OK", json, answer).await
            }
            ("POST", "/api/jobs/1/cancel") if authorised => {
                send(stream, "200 OK", json, r#"{"id":1,"status":"cancelled"}"#).await
            }
            ("GET", "/api/jobs/1/events") => {
                // whet-server's wire form: whet-shared's `api` types (StatusEvent, LogEvent, metrics).
                let mut events = String::from(
                    "event: status\ndata: {\"status\":\"running\",\"devices\":\"\"}\n\n",
                );
                for step in 1..=10u32 {
                    let loss = 3.0 / step as f64;
                    let lr = 1e-3 * step.min(2) as f64 / 2.0;
                    let acc = 0.1 * step as f64 / 1.2;
                    events += &format!(
                        "event: log\ndata: {{\"stream\":\"stdout\",\"line\":\"step {step}/10 loss {loss:.4}\"}}\n\n"
                    );
                    events += &format!(
                        "event: metrics\ndata: {{\"loss\": {loss}, \"learning_rate\": {lr}, \"token_acc\": {acc}, \"global_step/max_steps\": \"{step}/10\"}}\n\n"
                    );
                }
                events += "event: metrics\ndata: {\"eval_loss\": 0.9, \"global_step/max_steps\": \"10/10\"}\n\n";
                let header = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\r\n";
                stream.write_all(header.as_bytes()).await?;
                stream.write_all(events.as_bytes()).await?;
                stream.flush().await?;
                // Hold the stream open (a closed one makes EventSource reconnect and replay).
                tokio::time::sleep(std::time::Duration::from_secs(120)).await;
                Ok(())
            }
            _ => send(stream, "404 Not Found", json, r#"{"error":"not found"}"#).await,
        }
    }
}
