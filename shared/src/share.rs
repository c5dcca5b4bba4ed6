//! Share links: a compact, versioned, URL-safe form of a config that needs no server.
//! `v1.` + base64url (no padding) of the raw-deflated JSON of the fields that differ from the
//! defaults. Decoding goes through the same field checks as a config file, so a tampered link
//! gives diagnostics, never a panic.

use std::io::{Read, Write};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::builder::ConfigBuilder;
use crate::config::JobConfig;
use crate::diagnostics::{Diagnostic, Diagnostics};
use crate::files::to_document;

const PREFIX: &str = "v1.";
/// Longest link text and largest inflated JSON accepted (a decompression bomb stops here).
const MAX_ENCODED: usize = 64 * 1024;
const MAX_JSON: u64 = 1024 * 1024;

pub fn encode(config: &JobConfig) -> String {
    let json = serde_json::to_vec(&to_document(config, false)).unwrap_or_default();
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(&json);
    let compressed = encoder.finish().unwrap_or_default();
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(compressed))
}

fn bad(en: String, zh: String) -> Diagnostics {
    Diagnostic::error("share", "share_invalid", en, zh)
        .with_fix(
            "copy the whole link again; it starts with v1.",
            "请重新完整复制链接；它以 v1. 开头",
        )
        .into()
}

/// Reads a share code; also accepts a whole link (`...#cfg=v1.xxx`).
pub fn decode(text: &str) -> Result<JobConfig, Diagnostics> {
    let text = text.trim();
    let code = text.rsplit_once("cfg=").map_or(text, |(_, code)| code);
    let code = code.split('&').next().unwrap_or(code);
    if code.len() > MAX_ENCODED {
        return Err(bad(
            format!(
                "the share code is {} characters long, more than any config needs",
                code.len()
            ),
            format!("分享码长度为 {} 个字符，超出了任何配置所需", code.len()),
        ));
    }
    let Some(body) = code.strip_prefix(PREFIX) else {
        let version = code.split('.').next().unwrap_or("");
        return Err(bad(
            format!(
                "the share code does not start with `{PREFIX}` (got `{}`)",
                crate::diagnostics::shorten(version)
            ),
            format!(
                "分享码不是以 `{PREFIX}` 开头（得到 `{}`）",
                crate::diagnostics::shorten(version)
            ),
        ));
    };
    let compressed = URL_SAFE_NO_PAD.decode(body).map_err(|e| {
        bad(
            format!("the share code is not valid base64url: {e}"),
            format!("分享码不是有效的 base64url：{e}"),
        )
    })?;
    let mut json = Vec::new();
    flate2::read::DeflateDecoder::new(compressed.as_slice())
        .take(MAX_JSON + 1)
        .read_to_end(&mut json)
        .map_err(|e| {
            bad(
                format!("the share code does not inflate: {e}"),
                format!("分享码无法解压：{e}"),
            )
        })?;
    if json.len() as u64 > MAX_JSON {
        return Err(bad(
            "the share code inflates to more than 1 MiB".into(),
            "分享码解压后超过 1 MiB".into(),
        ));
    }
    let document: serde_json::Value = serde_json::from_slice(&json).map_err(|e| {
        bad(
            format!("the share code does not hold JSON: {e}"),
            format!("分享码中不是 JSON：{e}"),
        )
    })?;
    let mut builder = ConfigBuilder::new();
    builder.apply_document(document);
    builder.finish()
}

/// The studio link `whet convert --to link` prints.
pub fn link(base_url: &str, config: &JobConfig) -> String {
    format!("{}/#cfg={}", base_url.trim_end_matches('/'), encode(config))
}
