//! Routing by URL: `#/jobs`, `#/jobs/<id>`, `#/compare/<id>,<id>,...`, `#/data` (the dataset
//! preview) and the editor (also under `/s/<id>`, a short share link the server answers with
//! the page).

use leptos::prelude::*;

#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Editor,
    /// The dataset preview of the config in the editor.
    Data,
    Jobs,
    Job(String),
    /// Runs compared side by side (`#/compare/1,2,3`).
    Compare(Vec<i64>),
}

pub fn hash() -> String {
    window().location().hash().unwrap_or_default()
}

pub fn pathname() -> String {
    window().location().pathname().unwrap_or_default()
}

pub fn current() -> Route {
    let hash = hash();
    if let Some(ids) = hash.strip_prefix("#/compare/") {
        return Route::Compare(compare_ids(ids));
    }
    if hash == "#/data" || hash.starts_with("#/data?") || hash.starts_with("#/data/") {
        return Route::Data;
    }
    match hash.strip_prefix("#/jobs") {
        Some(rest) => match rest.strip_prefix('/') {
            Some(id) if !id.is_empty() => Route::Job(id.to_string()),
            _ => Route::Jobs,
        },
        None => Route::Editor,
    }
}

/// `1,2,3` as job ids (what does not read as one is left out).
pub fn compare_ids(text: &str) -> Vec<i64> {
    text.split(',')
        .filter_map(|id| id.trim().parse().ok())
        .collect()
}

/// The id of a short share link's path (`/s/<id>`).
pub fn short_share_id() -> Option<String> {
    pathname()
        .strip_prefix("/s/")
        .map(|id| id.trim_end_matches('/').to_string())
        .filter(|id| !id.is_empty())
}

/// The page's own address without the fragment, for share links (`/s/<id>` pages share from `/`).
pub fn page_url() -> String {
    let location = window().location();
    let origin = location.origin().unwrap_or_default();
    let path = pathname();
    if short_share_id().is_some() || path.is_empty() {
        format!("{origin}/")
    } else {
        format!("{origin}{path}")
    }
}

pub fn go(hash: &str) {
    let _ = window().location().set_hash(hash);
}
