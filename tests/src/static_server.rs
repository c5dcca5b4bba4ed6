//! A minimal HTTP/1.1 file server for the studio's static build: GET only, one request per
//! connection, `index.html` for any path that is not a file (as whet-server's fallback does,
//! so `/s/<id>` and deep links load the page), 404 for `/api/...` (no backend here).

use std::path::{Path, PathBuf};

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

async fn respond(mut stream: TcpStream, root: PathBuf) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/");
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
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a local port");
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let root = root.clone();
                tokio::spawn(async move {
                    let _ = respond(stream, root).await;
                });
            }
        });
        StaticServer {
            base_url: format!("http://127.0.0.1:{port}"),
            task,
        }
    }
}
