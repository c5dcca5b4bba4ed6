//! The one error type of the HTTP API. Every failure a client sees has the same JSON shape,
//! `{"error": {"code", "message", "diagnostics"?}}`, and the status code that says what went
//! wrong: 400 bad JSON, 401 no or wrong token, 404, 409, 413 body over the limit, 422 invalid
//! config (with the diagnostics that say why), 500 for our own failures, 503 when a helper command
//! cannot run now.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use whet_shared::Diagnostic;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token; send `Authorization: Bearer <token>` (the token is printed when whet-server starts, or set WHET_TOKEN)")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("this method is not allowed on this path")]
    MethodNotAllowed,
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    Invalid {
        message: String,
        diagnostics: Vec<Diagnostic>,
    },
    /// A helper command could not run now (all slots busy, or it ran past its time).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// 422 with the diagnostics that make the config unusable (and any warnings beside them).
    pub fn invalid(diagnostics: Vec<Diagnostic>) -> ApiError {
        let errors = diagnostics.iter().filter(|d| d.is_error()).count();
        let first = diagnostics
            .iter()
            .find(|d| d.is_error())
            .map(|d| format!(": {}: {}", d.field, d.message_en))
            .unwrap_or_default();
        ApiError::Invalid {
            message: format!("the config has {errors} error(s){first}"),
            diagnostics,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Invalid { .. } => "invalid_config",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("database"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            eprintln!("whet-server: {e:#}");
        }
        let mut error = json!({"code": self.code(), "message": self.to_string()});
        if let ApiError::Invalid { diagnostics, .. } = &self {
            error["diagnostics"] = json!(diagnostics);
        }
        let mut response = (self.status(), Json(json!({ "error": error }))).into_response();
        if let ApiError::Unauthorized = self {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
