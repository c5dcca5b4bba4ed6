//! Who may change things: the bearer token (from WHET_TOKEN, a token file in the data dir, or
//! generated at first start), its constant-time comparison, and the `Authorized` extractor that
//! mutating handlers take as their first argument.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::ids;

/// The server's secret. `Debug` never prints it.
#[derive(Clone)]
pub struct BearerToken(String);

/// Where the token came from, so the start-up message can say what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Environment,
    File,
    Generated,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    pub fn new(token: impl Into<String>) -> BearerToken {
        BearerToken(token.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// WHET_TOKEN if set, else `<data_dir>/token`, else a new random token (190 bits) written to
    /// that file with mode 0600 so a restart keeps it.
    pub fn load_or_create(
        from_env: Option<String>,
        data_dir: &Path,
    ) -> anyhow::Result<(BearerToken, TokenSource)> {
        if let Some(token) = from_env.filter(|t| !t.trim().is_empty()) {
            return Ok((
                BearerToken(token.trim().to_string()),
                TokenSource::Environment,
            ));
        }
        let path = data_dir.join("token");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if !text.trim().is_empty() {
                return Ok((BearerToken(text.trim().to_string()), TokenSource::File));
            }
        }
        let token = ids::random_base62(32)?;
        write_private(&path, &token).with_context(|| format!("writing {}", path.display()))?;
        Ok((BearerToken(token), TokenSource::Generated))
    }

    /// Constant-time: the time taken does not depend on how much of a guess is right.
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }
}

/// Equal length and equal bytes, compared without early exit (a length mismatch returns at once;
/// the length of a random token is no secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")
}

/// Proof that the request carried the right `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Copy)]
pub struct Authorized;

impl<S> FromRequestParts<S> for Authorized
where
    Arc<BearerToken>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = Arc::<BearerToken>::from_ref(state);
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match given {
            Some(given) if token.matches(given) => Ok(Authorized),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc123", b"abc123"));
        assert!(!constant_time_eq(b"abc123", b"abc124"));
        assert!(!constant_time_eq(b"abc123", b"abc12"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_comes_from_env_then_file_then_is_generated_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (generated, source) = BearerToken::load_or_create(None, dir.path()).unwrap();
        assert_eq!(source, TokenSource::Generated);
        assert_eq!(generated.as_str().len(), 32);
        let mode = std::fs::metadata(dir.path().join("token")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let (again, source) = BearerToken::load_or_create(None, dir.path()).unwrap();
        assert_eq!(
            (again.as_str(), source),
            (generated.as_str(), TokenSource::File)
        );
        let (env, source) =
            BearerToken::load_or_create(Some("from-env".into()), dir.path()).unwrap();
        assert_eq!(
            (env.as_str(), source),
            ("from-env", TokenSource::Environment)
        );
        assert!(env.matches("from-env") && !env.matches("from-env2"));
        assert_eq!(format!("{env:?}"), "BearerToken(..)");
    }
}
