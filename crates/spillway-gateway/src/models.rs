//! `GET /v1/models` and `GET /v1/models/{id}`: the catalog, as Anthropic's
//! Models API shows it, so `client.models.list()` and `.retrieve()` work.
//!
//! Each configured model is one entry, with its Anthropic-form id
//! (`claude-3-haiku-20240307`) in `id`, a display name and a creation date
//! read from the id, and a `vertex` section Spillway adds: the Vertex id,
//! the locations serving it (primary first) and the aliases it answers to.
//! `retrieve` takes any name `/v1/messages` takes (Anthropic form, Vertex
//! form, alias). The list is newest first and pages with `limit`,
//! `after_id` and `before_id` as Anthropic's does.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use spillway_core::ModelSpec;

use crate::error::ApiError;
use crate::state::AppState;

/// Anthropic's default page size, and its largest.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize)]
pub struct Page {
    limit: Option<usize>,
    after_id: Option<String>,
    before_id: Option<String>,
}

/// `claude-3-haiku@20240307` → ("Claude 3 Haiku", "2024-03-07T00:00:00Z").
fn describe(vertex_id: &str) -> (String, String) {
    let (base, date) = vertex_id.split_once('@').unwrap_or((vertex_id, ""));
    let display = base
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<String>>()
        .join(" ");
    let created = match date.as_bytes() {
        [y @ .., m1, m2, d1, d2] if y.len() == 4 && date.bytes().all(|b| b.is_ascii_digit()) => {
            format!(
                "{}-{}{}-{}{}T00:00:00Z",
                String::from_utf8_lossy(y),
                *m1 as char,
                *m2 as char,
                *d1 as char,
                *d2 as char
            )
        }
        // No date in the id: the epoch, rather than a date made up.
        _ => "1970-01-01T00:00:00Z".to_string(),
    };
    (display, created)
}

fn entry(model: &ModelSpec) -> Value {
    let vertex_id = model.id.as_str();
    let (display_name, created_at) = describe(vertex_id);
    json!({
        "type": "model",
        "id": spillway_vertex::vertex_to_anthropic_id(vertex_id),
        "display_name": display_name,
        "created_at": created_at,
        "vertex": {
            "model": vertex_id,
            "locations": model.regions.iter().map(|r| r.region.as_str()).collect::<Vec<_>>(),
            "aliases": model.aliases,
        },
    })
}

/// Newest first; ties by id, so pages are stable.
fn ordered(state: &AppState) -> Vec<Value> {
    let mut all: Vec<Value> = state
        .forwarder
        .catalog()
        .models()
        .iter()
        .map(entry)
        .collect();
    all.sort_by(|a, b| {
        (b["created_at"].as_str(), a["id"].as_str())
            .cmp(&(a["created_at"].as_str(), b["id"].as_str()))
    });
    all
}

/// `GET /v1/models`
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit: must be between 1 and {MAX_LIMIT}"
        )));
    }
    let all = ordered(&state);
    let position = |id: &str, key: &str| {
        all.iter()
            .position(|m| m["id"] == id)
            .ok_or_else(|| ApiError::BadRequest(format!("{key}: no model {id:?}")))
    };
    let (start, end) = match (&page.after_id, &page.before_id) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give after_id or before_id, not both".into(),
            ))
        }
        (Some(after), None) => {
            let start = position(after, "after_id")? + 1;
            (start, (start + limit).min(all.len()))
        }
        (None, Some(before)) => {
            let end = position(before, "before_id")?;
            (end.saturating_sub(limit), end)
        }
        (None, None) => (0, limit.min(all.len())),
    };
    let data = &all[start..end];
    let has_more = if page.before_id.is_some() {
        start > 0
    } else {
        end < all.len()
    };
    Ok(Json(json!({
        "data": data,
        "has_more": has_more,
        "first_id": data.first().map(|m| m["id"].clone()),
        "last_id": data.last().map(|m| m["id"].clone()),
    })))
}

/// `GET /v1/models/{id}`: by any name the Messages API takes.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let catalog = state.forwarder.catalog();
    let model = catalog
        .resolve(&id)
        .map(|r| r.model)
        .or_else(|| {
            let vertex = spillway_vertex::anthropic_to_vertex_id(&id)?;
            catalog.resolve(&vertex).map(|r| r.model)
        })
        .ok_or_else(|| ApiError::NotFound(format!("model: {id}")))?;
    Ok(Json(entry(model)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_dates_come_from_the_id() {
        assert_eq!(
            describe("claude-3-haiku@20240307"),
            ("Claude 3 Haiku".into(), "2024-03-07T00:00:00Z".into())
        );
        assert_eq!(
            describe("claude-sonnet-4-5@20250929"),
            ("Claude Sonnet 4 5".into(), "2025-09-29T00:00:00Z".into())
        );
        assert_eq!(describe("my-model").1, "1970-01-01T00:00:00Z");
        assert_eq!(describe("x@2024").1, "1970-01-01T00:00:00Z");
    }
}
