//! Loopback HTTP servers shaped like the Hugging Face hub and like ModelScope's file API, for
//! the hub tests (the unit tests and `tests/hub.rs`, which includes this file). Each records
//! the requests it saw and stops when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The shared tiny fixture model's folder.
pub fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/hf-reference")
}

/// The fixture model's files as a hub repository holds them (name, bytes).
pub fn fixture_model_files() -> Vec<(String, Vec<u8>)> {
    [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ]
    .iter()
    .map(|name| {
        (
            name.to_string(),
            std::fs::read(fixtures().join(name)).unwrap(),
        )
    })
    .collect()
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query, as sent (not decoded).
    pub path: String,
    /// Query parameters, decoded.
    pub query: Vec<(String, String)>,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn ok(body: impl Into<Vec<u8>>) -> Response {
        Response {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn not_found() -> Response {
        Response {
            status: 404,
            headers: Vec::new(),
            body: b"{}".to_vec(),
        }
    }
}

/// A repository the servers hold: its id and files.
#[derive(Debug, Clone)]
pub struct TestRepo {
    pub id: String,
    pub files: Vec<(String, Vec<u8>)>,
}

impl TestRepo {
    pub fn new(id: &str, files: Vec<(String, Vec<u8>)>) -> TestRepo {
        TestRepo {
            id: id.to_string(),
            files,
        }
    }

    fn file(&self, path: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(name, _)| name == path)
            .map(|(_, bytes)| bytes.as_slice())
    }
}

pub struct TestServer {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

impl TestServer {
    /// Serves `handler` on a free loopback port, one request per connection.
    pub fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        serve_one(stream, handler.as_ref(), &requests);
                    }
                }
            })
        };
        TestServer {
            url,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// A server shaped like huggingface.co for `repos`: `/api/{models|datasets}/{id}/revision/{rev}`
    /// and `/[datasets/]{id}/resolve/{rev}/{file}` with the headers hf-hub reads.
    pub fn hugging_face(repos: Vec<TestRepo>) -> TestServer {
        TestServer::start(move |request| hugging_face_answer(&repos, request))
    }

    /// A server shaped like ModelScope's file API for `repos` (see `modelscope.rs`).
    pub fn modelscope(repos: Vec<TestRepo>) -> TestServer {
        TestServer::start(move |request| modelscope_answer(&repos, request))
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_one(mut stream: TcpStream, handler: &Handler, requests: &Mutex<Vec<Request>>) {
    let Some(request) = read_request(&stream) else {
        return;
    };
    let response = handler(&request);
    if let Ok(mut seen) = requests.lock() {
        seen.push(request);
    }
    let reason = match response.status {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        response.body.len()
    ));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&response.body);
    let _ = stream.flush();
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
    })
}

/// Decodes `application/x-www-form-urlencoded` text (`+` and `%XX`).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// A commit hash for a repository at a revision: the same for the same pair.
fn commit_of(id: &str, revision: &str) -> String {
    sha256_hex(format!("{id}@{revision}").as_bytes())[..40].to_string()
}

fn json(value: serde_json::Value) -> Response {
    Response::ok(value.to_string())
}

pub fn hugging_face_answer(repos: &[TestRepo], request: &Request) -> Response {
    let path = request.path.as_str();
    for repo in repos {
        for prefix in ["models", "datasets"] {
            let api = format!("/api/{prefix}/{}/revision/", repo.id);
            if let Some(revision) = path.strip_prefix(&api) {
                let siblings: Vec<serde_json::Value> = repo
                    .files
                    .iter()
                    .map(|(name, _)| serde_json::json!({ "rfilename": name }))
                    .collect();
                return json(serde_json::json!({
                    "sha": commit_of(&repo.id, &decode(revision)),
                    "siblings": siblings,
                }));
            }
        }
        for prefix in ["", "/datasets"] {
            let resolve = format!("{prefix}/{}/resolve/", repo.id);
            let Some(rest) = path.strip_prefix(&resolve) else {
                continue;
            };
            let Some((revision, file)) = rest.split_once('/') else {
                continue;
            };
            if let Some(bytes) = repo.file(file) {
                return resolve_answer(bytes, &commit_of(&repo.id, &decode(revision)), request);
            }
        }
    }
    Response::not_found()
}

/// A file with the headers hf-hub reads (commit, etag, range).
fn resolve_answer(bytes: &[u8], commit: &str, request: &Request) -> Response {
    let mut headers = vec![
        ("x-repo-commit".to_string(), commit.to_string()),
        ("etag".to_string(), format!("\"{}\"", sha256_hex(bytes))),
    ];
    let start = request
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let Some(start) = start else {
        return Response {
            status: 200,
            headers,
            body: bytes.to_vec(),
        };
    };
    let one_byte = request.header("range") == Some("bytes=0-0");
    let end = if one_byte {
        0
    } else {
        bytes.len().saturating_sub(1)
    };
    headers.push((
        "content-range".to_string(),
        format!("bytes {start}-{end}/{}", bytes.len()),
    ));
    Response {
        status: 206,
        headers,
        body: bytes.get(start..=end).unwrap_or_default().to_vec(),
    }
}

/// The dataset number ModelScope's API gives for a repository (its position, from 1000).
fn dataset_number(repos: &[TestRepo], id: &str) -> Option<usize> {
    repos.iter().position(|r| r.id == id).map(|i| 1000 + i)
}

fn modelscope_files(repo: &TestRepo) -> Vec<serde_json::Value> {
    repo.files
        .iter()
        .map(|(path, bytes)| {
            serde_json::json!({
                "Name": path.rsplit('/').next().unwrap_or(path),
                "Path": path,
                "Type": "blob",
                "Size": bytes.len(),
                "Sha256": sha256_hex(bytes),
                "Revision": "deadbeef",
            })
        })
        .collect()
}

fn modelscope_ok(data: serde_json::Value) -> Response {
    json(serde_json::json!({"Code": 200, "Data": data, "Message": "success", "Success": true}))
}

pub fn modelscope_answer(repos: &[TestRepo], request: &Request) -> Response {
    let path = request.path.as_str();
    for repo in repos {
        let number = dataset_number(repos, &repo.id).unwrap_or_default();
        let file = || request.query("FilePath").and_then(|f| repo.file(f));
        if path == format!("/api/v1/models/{}/repo/files", repo.id) {
            return modelscope_ok(serde_json::json!({ "Files": modelscope_files(repo) }));
        }
        if path == format!("/api/v1/models/{}/repo", repo.id)
            || path == format!("/api/v1/datasets/{}/repo", repo.id)
        {
            return file().map_or_else(Response::not_found, Response::ok);
        }
        if path == format!("/api/v1/datasets/{}", repo.id) {
            return modelscope_ok(serde_json::json!({ "Id": number, "Type": 1 }));
        }
        if path == format!("/api/v1/datasets/{number}/repo/tree") {
            // Pages of two files, so that the tests see the paging.
            let page: usize = request
                .query("PageNumber")
                .and_then(|p| p.parse().ok())
                .unwrap_or(1);
            let size: usize = request
                .query("PageSize")
                .and_then(|p| p.parse().ok())
                .unwrap_or(100)
                .min(2);
            let files: Vec<serde_json::Value> = modelscope_files(repo)
                .into_iter()
                .skip((page.max(1) - 1) * size)
                .take(size)
                .collect();
            return modelscope_ok(serde_json::json!({ "Files": files }));
        }
    }
    Response::not_found()
}
