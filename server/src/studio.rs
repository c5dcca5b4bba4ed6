//! The studio's pages: `/`, `/s/{id}` and its assets from `--static-dir` (tower-http's
//! `ServeDir`, with every page path falling back to index.html so the app routes them). Until
//! the studio is built, `/` and `/s/{id}` answer a short page saying how to build it, never a
//! 404. Unknown `/api/...` paths get the API's JSON 404.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::api::AppState;
use crate::error::ApiError;

#[derive(Debug, Clone)]
pub struct Studio {
    pub static_dir: PathBuf,
}

impl Studio {
    fn index_html(&self) -> PathBuf {
        self.static_dir.join("index.html")
    }

    /// The built studio is there.
    pub fn is_built(&self) -> bool {
        self.index_html().is_file()
    }
}

const NOT_BUILT: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>whet</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>whet-server is running</h1>
<p>The studio has not been built yet, so there is no page to show here.
Build it with <code>cargo xtask studio</code> (or <code>trunk build --release</code> in <code>app/</code>),
or start whet-server with <code>--static-dir</code> pointing at a built studio.</p>
<p>The API works already: <a href="/api/health">/api/health</a>, <code>POST /api/check</code>, <code>/api/jobs</code>.</p>
<p lang="zh">工作室（studio）尚未构建。请运行 <code>cargo xtask studio</code> 构建，或用 <code>--static-dir</code> 指定已构建的目录。</p>
</body></html>
"#;

/// `/` and `/s/{id}`: the app's index.html, or the not-built page.
pub async fn index(State(state): State<AppState>) -> Response {
    match tokio::fs::read(state.studio.index_html()).await {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(_) => Html(NOT_BUILT).into_response(),
    }
}

/// Everything no route matched: assets from the static dir, index.html for other page paths.
pub async fn assets(State(state): State<AppState>, request: Request) -> Response {
    let path = request.uri().path();
    if path == "/api" || path.starts_with("/api/") {
        return ApiError::NotFound(format!("there is no API route `{path}`")).into_response();
    }
    if !state.studio.is_built() {
        return ApiError::NotFound(format!(
            "`{path}` does not exist (the studio has not been built; see /)"
        ))
        .into_response();
    }
    let serve = ServeDir::new(&state.studio.static_dir).append_index_html_on_directories(true);
    match serve.oneshot(request).await {
        Ok(response) if response.status() != StatusCode::NOT_FOUND => response.map(Body::new),
        _ => index(State(state)).await,
    }
}
