//! The one shape every error a client sees must have, checked on what the
//! gateway really renders.
//!
//! `{"type":"error","error":{"type":<a kind Anthropic defines>,"message":<not
//! empty>}}`, optionally with `request_id`, under a 4xx/5xx status whose
//! meaning the official SDKs know. Rendering goes through `ApiError`'s
//! `IntoResponse`, the only place the gateway turns errors into HTTP, so
//! these checks hold for what leaves the process, not for a re-creation.

use axum::response::IntoResponse;
use proptest::test_runner::{TestCaseError, TestCaseResult};
use serde_json::Value;
use spillway_gateway::error::ApiError;
use spillway_vertex::ErrorKind;

use crate::harness::ensure;

/// An error as a client sees it.
#[derive(Debug)]
pub struct Seen {
    pub status: u16,
    pub kind: ErrorKind,
    pub message: String,
}

/// Checks an error body's shape; returns its kind and message.
pub fn error_body(body: &[u8]) -> Result<(ErrorKind, String), TestCaseError> {
    let shown = || String::from_utf8_lossy(body).into_owned();
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| TestCaseError::fail(format!("error body is not JSON ({e}): {}", shown())))?;
    let Value::Object(top) = &value else {
        return Err(TestCaseError::fail(format!(
            "error body is not an object: {}",
            shown()
        )));
    };
    ensure(top.get("type") == Some(&Value::from("error")), || {
        format!("error body's type is not \"error\": {}", shown())
    })?;
    ensure(
        top.keys()
            .all(|k| matches!(k.as_str(), "type" | "error" | "request_id")),
        || format!("error body has fields Anthropic's has not: {}", shown()),
    )?;
    if let Some(id) = top.get("request_id") {
        ensure(id.is_string(), || {
            format!("request_id is not a string: {}", shown())
        })?;
    }
    let inner = top.get("error").and_then(Value::as_object).ok_or_else(|| {
        TestCaseError::fail(format!("error body has no error object: {}", shown()))
    })?;
    let kind = inner
        .get("type")
        .and_then(Value::as_str)
        .and_then(ErrorKind::from_type_str)
        .ok_or_else(|| TestCaseError::fail(format!("unknown error type: {}", shown())))?;
    let message = inner
        .get("message")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| TestCaseError::fail(format!("empty or missing message: {}", shown())))?;
    Ok((kind, message.to_owned()))
}

/// Renders `error` as the gateway answers it and checks status, headers
/// and body.
pub fn rendered(error: ApiError) -> Result<Seen, TestCaseError> {
    let described = error.to_string();
    let response = error.into_response();
    let status = response.status().as_u16();
    ensure((400..=599).contains(&status), || {
        format!("status {status} is not an error status, for {described:?}")
    })?;
    let content_type = response.headers().get(http::header::CONTENT_TYPE).cloned();
    ensure(
        content_type.as_ref().and_then(|v| v.to_str().ok()) == Some("application/json"),
        || format!("content-type {content_type:?} for {described:?}"),
    )?;
    let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
        .map_err(|e| TestCaseError::fail(format!("reading the body: {e}")))?;
    let (kind, message) = error_body(&body)?;
    Ok(Seen {
        status,
        kind,
        message,
    })
}

/// Checks that a rendered error kept what the error said.
pub fn same_message(seen: &Seen, expected: &str) -> TestCaseResult {
    ensure(seen.message == expected, || {
        format!("rendered message {:?} is not {expected:?}", seen.message)
    })
}
