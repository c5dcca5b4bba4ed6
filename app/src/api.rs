//! Talking to a whet-server on the same origin (DESIGN §4): plain fetch through web-sys.
//! With no server (static files) every call fails quietly and the studio stays offline.

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde_json::Value;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Headers, Request, RequestInit, Response};
use whet_shared::api::Health;
use whet_shared::Diagnostic;

use crate::studio::Studio;

fn js_error(error: JsValue) -> String {
    error.as_string().unwrap_or_else(|| format!("{error:?}"))
}

/// Sends a request; answers the status and body text.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<String>,
    token: Option<String>,
) -> Result<(u16, String), String> {
    let response = fetch(method, url, body, token).await?;
    let text = JsFuture::from(response.text().map_err(js_error)?)
        .await
        .map_err(js_error)?;
    Ok((response.status(), text.as_string().unwrap_or_default()))
}

/// Sends a request; answers the response, its body unread (a stream the caller reads).
pub async fn fetch(
    method: &str,
    url: &str,
    body: Option<String>,
    token: Option<String>,
) -> Result<Response, String> {
    let init = RequestInit::new();
    init.set_method(method);
    let headers = Headers::new().map_err(js_error)?;
    if let Some(body) = body {
        headers
            .set("Content-Type", "application/json")
            .map_err(js_error)?;
        init.set_body(&JsValue::from_str(&body));
    }
    if let Some(token) = token.filter(|t| !t.trim().is_empty()) {
        headers
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .map_err(js_error)?;
    }
    init.set_headers(&headers);
    let request = Request::new_with_str_and_init(url, &init).map_err(js_error)?;
    let response = JsFuture::from(window().fetch_with_request(&request))
        .await
        .map_err(js_error)?;
    response.dyn_into().map_err(js_error)
}

/// The text of a response that is not the expected one.
pub async fn text_of(response: &Response) -> String {
    match response.text() {
        Ok(promise) => JsFuture::from(promise)
            .await
            .ok()
            .and_then(|t| t.as_string())
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Sends a request and reads a 2xx answer as `T`; anything else (another status, a body that
/// is not a `T`, no server) as the diagnostics that say why.
pub async fn request_json<T: serde::de::DeserializeOwned>(
    method: &str,
    url: &str,
    body: Option<String>,
    token: Option<String>,
) -> Result<T, Vec<Diagnostic>> {
    match request(method, url, body, token).await {
        Ok((status, text)) if (200..300).contains(&status) => {
            serde_json::from_str(&text).map_err(|_| diagnostics_of(status, &text))
        }
        Ok((status, text)) => Err(diagnostics_of(status, &text)),
        Err(e) => Err(unreachable(e)),
    }
}

/// Sets `studio.backend` when /api/health answers `{"status": "ok"}`.
pub fn detect_backend(studio: Studio) {
    let protocol = window().location().protocol().unwrap_or_default();
    if !protocol.starts_with("http") {
        return;
    }
    spawn_local(async move {
        if let Ok((200, body)) = request("GET", "/api/health", None, None).await {
            let ok = serde_json::from_str::<Health>(&body).is_ok_and(|h| h.status == "ok");
            let _ = studio.backend.try_set(ok);
        }
    });
}

/// Diagnostics in an error answer — whet-server's `{"error": {"code", "message", "diagnostics"}}`,
/// or `{"diagnostics": [...]}`, or a bare list — else a diagnostic that quotes the answer's
/// message (or the answer).
pub fn diagnostics_of(status: u16, body: &str) -> Vec<Diagnostic> {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let lists = [
        value.pointer("/error/diagnostics"),
        value.get("diagnostics"),
        Some(&value),
    ];
    for list in lists.into_iter().flatten() {
        if let Ok(diagnostics) = serde_json::from_value::<Vec<Diagnostic>>(list.clone()) {
            if !diagnostics.is_empty() {
                return diagnostics;
            }
        }
    }
    let message = value
        .get("error")
        .and_then(|e| {
            e.as_str()
                .or_else(|| e.get("message").and_then(Value::as_str))
        })
        .map(String::from)
        .unwrap_or_else(|| body.chars().take(300).collect());
    vec![Diagnostic::error(
        "server",
        "server_error",
        format!("the server answered {status}: {message}"),
        format!("服务器返回 {status}：{message}"),
    )]
}

/// A network failure as a diagnostic.
pub fn unreachable(error: String) -> Vec<Diagnostic> {
    vec![Diagnostic::error(
        "server",
        "server_unreachable",
        format!("the server could not be reached: {error}"),
        format!("无法连接服务器：{error}"),
    )]
}
