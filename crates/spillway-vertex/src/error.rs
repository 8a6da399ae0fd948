//! Anthropic's error shape, and how Vertex's two families of error body map onto it.
//!
//! Anthropic clients expect every error as
//! `{"type":"error","error":{"type":"<kind>","message":"..."},"request_id":"req_..."}`, and decide
//! whether to retry from the HTTP status alone (the SDK retries 408, 409, 429 and every 5xx).
//!
//! Vertex answers with two families of error body (reference §1.6):
//!
//! 1. **Google platform errors** (auth, IAM, quota, routing):
//!    `{"error":{"code":429,"message":"Quota exceeded ...","status":"RESOURCE_EXHAUSTED"}}`.
//!    Quirk: on `:streamRawPredict` the same object arrives **wrapped in a JSON array**,
//!    `[{"error":{...}}]`, so a parser that expects an object sees garbage.
//! 2. **Anthropic model-layer errors**, already in Anthropic's shape (`roles must alternate`,
//!    `Extra inputs are not permitted`, `overloaded_error`...). These keep their type and status.
//!
//! [`normalize_upstream_error`] folds both (plus empty and non-JSON bodies such as an HTML page
//! from a load balancer) into one [`UpstreamError`] carrying the status and the Anthropic error
//! type the client should see. Google's canonical status names map as follows:
//!
//! | Google `status` | HTTP | Anthropic type |
//! |---|---|---|
//! | `INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `OUT_OF_RANGE` | 400 | `invalid_request_error` |
//! | `UNAUTHENTICATED` | 401 | `authentication_error` |
//! | `PERMISSION_DENIED` | 403 | `permission_error` |
//! | `NOT_FOUND` | 404 | `not_found_error` |
//! | `RESOURCE_EXHAUSTED` | 429 | `rate_limit_error` |
//! | `INTERNAL`, `UNKNOWN`, `DATA_LOSS` | 500 | `api_error` |
//! | `UNAVAILABLE` | 503 (529 kept) | `overloaded_error` |
//! | `DEADLINE_EXCEEDED` | 504 | `timeout_error` |
//!
//! Any other Google status keeps the upstream HTTP status and derives the type from it.
//! The same errors can also arrive *inside* a 200 stream as `event: error`; [`sse_error_event`]
//! builds that frame for errors the gateway itself must report mid-stream.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

/// The Anthropic error types (`error.type`) Spillway emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 400 `invalid_request_error`: the request is malformed or not allowed.
    InvalidRequest,
    /// 401 `authentication_error`: bad or missing credentials.
    Authentication,
    /// 403 `permission_error`: credentials are fine but lack access.
    Permission,
    /// 404 `not_found_error`: unknown model, path or resource.
    NotFound,
    /// 413 `request_too_large`: the body exceeds the size limit.
    RequestTooLarge,
    /// 429 `rate_limit_error`: quota or rate limit exceeded; retryable.
    RateLimit,
    /// 500 `api_error`: an internal error; retryable.
    Api,
    /// 529 `overloaded_error`: temporarily overloaded; retryable.
    Overloaded,
    /// 504 `timeout_error`: the upstream did not answer in time.
    Timeout,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::InvalidRequest,
        ErrorKind::Authentication,
        ErrorKind::Permission,
        ErrorKind::NotFound,
        ErrorKind::RequestTooLarge,
        ErrorKind::RateLimit,
        ErrorKind::Api,
        ErrorKind::Overloaded,
        ErrorKind::Timeout,
    ];

    /// The wire name used in `error.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::Timeout => "timeout_error",
        }
    }

    /// The HTTP status Anthropic uses for this kind.
    pub fn default_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Authentication => 401,
            ErrorKind::Permission => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::RateLimit => 429,
            ErrorKind::Api => 500,
            ErrorKind::Overloaded => 529,
            ErrorKind::Timeout => 504,
        }
    }

    /// Parses a wire name (`"rate_limit_error"`...). Unknown names (e.g. `billing_error`) give `None`.
    pub fn from_type_str(s: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind a client should assume for an HTTP error status with no better information.
    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            401 => ErrorKind::Authentication,
            403 => ErrorKind::Permission,
            404 => ErrorKind::NotFound,
            408 | 504 => ErrorKind::Timeout,
            413 => ErrorKind::RequestTooLarge,
            429 => ErrorKind::RateLimit,
            503 | 529 => ErrorKind::Overloaded,
            400..=499 => ErrorKind::InvalidRequest,
            _ => ErrorKind::Api,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    error: Inner<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Inner<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    message: &'a str,
}

fn envelope_json(kind: ErrorKind, message: &str, request_id: Option<&str>) -> Vec<u8> {
    let env = Envelope {
        ty: "error",
        error: Inner {
            ty: kind.as_str(),
            message,
        },
        request_id,
    };
    // Serializing plain structs of strings into a Vec cannot fail.
    serde_json::to_vec(&env).expect("error envelope serializes")
}

/// `{"type":"error","error":{"type":..,"message":..}}` serialized (plus `"request_id"` if Some).
pub fn error_body(kind: ErrorKind, message: &str, request_id: Option<&str>) -> Vec<u8> {
    envelope_json(kind, message, request_id)
}

/// `event: error\ndata: {"type":"error","error":{...}}\n\n`: the frame Anthropic uses to report an
/// error after the stream has started (HTTP 200 already sent).
pub fn sse_error_event(kind: ErrorKind, message: &str) -> Bytes {
    let json = envelope_json(kind, message, None);
    let mut out = Vec::with_capacity(json.len() + 22);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// An upstream error normalized to what the client should see.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamError {
    /// The HTTP status to return to the client.
    pub status: u16,
    /// The Anthropic error type.
    pub kind: ErrorKind,
    /// A human-readable message (upstream's when it had one).
    pub message: String,
    /// Google's canonical status name (`RESOURCE_EXHAUSTED`...) when the body was a Google error.
    pub google_status: Option<String>,
}

impl UpstreamError {
    /// The Anthropic-shaped body for this error.
    pub fn body(&self, request_id: Option<&str>) -> Vec<u8> {
        error_body(self.kind, &self.message, request_id)
    }
}

/// Maps a Google canonical status name to the (status, kind) the client should see.
/// `http_status` is the upstream status, consulted only for `UNAVAILABLE` (529 is kept).
fn map_google_status(google: &str, http_status: u16) -> Option<(u16, ErrorKind)> {
    Some(match google {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => {
            (400, ErrorKind::InvalidRequest)
        }
        "UNAUTHENTICATED" => (401, ErrorKind::Authentication),
        "PERMISSION_DENIED" => (403, ErrorKind::Permission),
        "NOT_FOUND" => (404, ErrorKind::NotFound),
        "RESOURCE_EXHAUSTED" => (429, ErrorKind::RateLimit),
        "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => (500, ErrorKind::Api),
        "UNAVAILABLE" => (
            if http_status == 529 { 529 } else { 503 },
            ErrorKind::Overloaded,
        ),
        "DEADLINE_EXCEEDED" => (504, ErrorKind::Timeout),
        _ => return None,
    })
}

/// A client-visible status for an upstream status: error statuses pass through, anything else
/// (a "successful" status handed to the error path, or nonsense) becomes 500.
fn client_status(status: u16) -> u16 {
    if (400..=599).contains(&status) {
        status
    } else {
        500
    }
}

fn status_message(status: u16) -> String {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "",
    };
    if reason.is_empty() {
        format!("upstream returned HTTP {status}")
    } else {
        format!("upstream returned HTTP {status} {reason}")
    }
}

fn from_status_only(status: u16) -> UpstreamError {
    let status = client_status(status);
    UpstreamError {
        status,
        kind: ErrorKind::from_status(status),
        message: status_message(status),
        google_status: None,
    }
}

/// Normalizes any upstream error body: a Google object `{"error":{"code","message","status"}}`, the
/// same wrapped in an array `[{...}]` (streamRawPredict), an Anthropic-shaped body (kept: its type
/// maps to [`ErrorKind`], unknown types keep the status' default kind), or non-JSON/empty (message
/// from status). Google statuses map per the table in the module docs; with no Google status the
/// kind comes from the HTTP status. The returned status is what the client should see.
pub fn normalize_upstream_error(status: u16, body: &[u8]) -> UpstreamError {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return from_status_only(status);
    };
    // streamRawPredict wraps the Google error object in a one-element array.
    let obj = match &value {
        Value::Object(o) => o,
        Value::Array(items) => match items.iter().find_map(Value::as_object) {
            Some(o) => o,
            None => return from_status_only(status),
        },
        _ => return from_status_only(status),
    };
    let err = match obj.get("error") {
        Some(Value::Object(e)) => e,
        // `{"error":"some text"}`: keep the text, derive the rest from the status.
        Some(Value::String(s)) if !s.is_empty() => {
            return UpstreamError {
                message: s.clone(),
                ..from_status_only(status)
            };
        }
        _ => {
            // Some Google front ends send a bare `{"message": ...}`.
            let mut out = from_status_only(status);
            if let Some(m) = obj.get("message").and_then(Value::as_str) {
                if !m.is_empty() {
                    out.message = m.to_owned();
                }
            }
            return out;
        }
    };
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_owned);

    // Anthropic shape: `error.type` is a string.
    if let Some(ty) = err.get("type").and_then(Value::as_str) {
        let status = client_status(status);
        let kind = ErrorKind::from_type_str(ty).unwrap_or_else(|| ErrorKind::from_status(status));
        return UpstreamError {
            status,
            kind,
            message: message.unwrap_or_else(|| status_message(status)),
            google_status: None,
        };
    }

    // Google shape: `error.status` (canonical name) and/or `error.code`.
    let google_status = err
        .get("status")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let (out_status, kind) = match google_status
        .as_deref()
        .and_then(|g| map_google_status(g, status))
    {
        Some(mapped) => mapped,
        None => {
            // Unknown or absent status name: trust the HTTP status, then `error.code`.
            let code = err
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..=599).contains(c));
            let s = if (400..=599).contains(&status) {
                status
            } else {
                code.unwrap_or(500)
            };
            (s, ErrorKind::from_status(s))
        }
    };
    UpstreamError {
        status: out_status,
        kind,
        message: message.unwrap_or_else(|| status_message(out_status)),
        google_status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn kinds_round_trip_and_statuses() {
        let expected = [
            ("invalid_request_error", 400),
            ("authentication_error", 401),
            ("permission_error", 403),
            ("not_found_error", 404),
            ("request_too_large", 413),
            ("rate_limit_error", 429),
            ("api_error", 500),
            ("overloaded_error", 529),
            ("timeout_error", 504),
        ];
        for (kind, (name, status)) in ErrorKind::ALL.into_iter().zip(expected) {
            assert_eq!(kind.as_str(), name);
            assert_eq!(kind.default_status(), status);
            assert_eq!(ErrorKind::from_type_str(name), Some(kind));
            assert_eq!(ErrorKind::from_status(status), kind);
        }
        assert_eq!(ErrorKind::from_type_str("billing_error"), None);
    }

    #[test]
    fn error_body_shape() {
        let b = error_body(ErrorKind::RateLimit, "slow \"down\"", None);
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow \"down\""}}"#
        );
        let b = error_body(ErrorKind::Overloaded, "Overloaded", Some("req_1"));
        assert_eq!(
            json(&b),
            serde_json::json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"})
        );
    }

    #[test]
    fn sse_error_event_shape() {
        let e = sse_error_event(ErrorKind::Api, "upstream died");
        assert_eq!(
            &e[..],
            &b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"upstream died\"}}\n\n"[..]
        );
    }

    #[test]
    fn google_object_quota() {
        let body = br#"{"error":{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: anthropic-claude-3-5-sonnet-v2.","status":"RESOURCE_EXHAUSTED"}}"#;
        let e = normalize_upstream_error(429, body);
        assert_eq!(e.status, 429);
        assert_eq!(e.kind, ErrorKind::RateLimit);
        assert!(e.message.starts_with("Quota exceeded"));
        assert_eq!(e.google_status.as_deref(), Some("RESOURCE_EXHAUSTED"));
    }

    #[test]
    fn google_array_wrapped_on_streaming() {
        let body = br#"[{
  "error": {
    "code": 404,
    "message": "Publisher Model `projects/p/locations/l/publishers/anthropic/models/m` was not found",
    "status": "NOT_FOUND"
  }
}
]"#;
        let e = normalize_upstream_error(404, body);
        assert_eq!(e.status, 404);
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.starts_with("Publisher Model"));
        assert_eq!(e.google_status.as_deref(), Some("NOT_FOUND"));
    }

    #[test]
    fn google_status_table() {
        let cases = [
            ("INVALID_ARGUMENT", 400, 400, ErrorKind::InvalidRequest),
            ("FAILED_PRECONDITION", 400, 400, ErrorKind::InvalidRequest),
            ("OUT_OF_RANGE", 400, 400, ErrorKind::InvalidRequest),
            ("UNAUTHENTICATED", 401, 401, ErrorKind::Authentication),
            ("PERMISSION_DENIED", 403, 403, ErrorKind::Permission),
            ("NOT_FOUND", 404, 404, ErrorKind::NotFound),
            ("RESOURCE_EXHAUSTED", 429, 429, ErrorKind::RateLimit),
            ("INTERNAL", 500, 500, ErrorKind::Api),
            ("UNKNOWN", 500, 500, ErrorKind::Api),
            ("UNAVAILABLE", 503, 503, ErrorKind::Overloaded),
            ("UNAVAILABLE", 529, 529, ErrorKind::Overloaded),
            ("UNAVAILABLE", 500, 503, ErrorKind::Overloaded),
            ("DEADLINE_EXCEEDED", 504, 504, ErrorKind::Timeout),
            // Status name wins over a disagreeing HTTP status.
            ("RESOURCE_EXHAUSTED", 400, 429, ErrorKind::RateLimit),
            // Unknown names fall back to the HTTP status.
            ("ABORTED", 409, 409, ErrorKind::InvalidRequest),
            ("UNIMPLEMENTED", 501, 501, ErrorKind::Api),
        ];
        for (gs, http, want_status, want_kind) in cases {
            let body = format!(r#"{{"error":{{"code":{http},"message":"m","status":"{gs}"}}}}"#);
            let e = normalize_upstream_error(http, body.as_bytes());
            assert_eq!((e.status, e.kind), (want_status, want_kind), "{gs} {http}");
            assert_eq!(e.google_status.as_deref(), Some(gs));
            assert_eq!(e.message, "m");
            // Same result when array-wrapped.
            let wrapped = normalize_upstream_error(http, format!("[{body}]").as_bytes());
            assert_eq!(wrapped, e);
        }
    }

    #[test]
    fn google_without_status_uses_http_status() {
        let e = normalize_upstream_error(403, br#"{"error":{"code":403,"message":"denied"}}"#);
        assert_eq!((e.status, e.kind), (403, ErrorKind::Permission));
        assert_eq!(e.message, "denied");
        assert_eq!(e.google_status, None);
    }

    #[test]
    fn anthropic_shaped_kept() {
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}"#;
        let e = normalize_upstream_error(400, body);
        assert_eq!(e.status, 400);
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert_eq!(e.message, "messages: roles must alternate");
        assert_eq!(e.google_status, None);

        let body =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let e = normalize_upstream_error(529, body);
        assert_eq!((e.status, e.kind), (529, ErrorKind::Overloaded));
    }

    #[test]
    fn anthropic_unknown_type_uses_status_default() {
        let body =
            br#"{"type":"error","error":{"type":"billing_error","message":"pay up"},"request_id":"r"}"#;
        let e = normalize_upstream_error(402, body);
        assert_eq!((e.status, e.kind), (402, ErrorKind::InvalidRequest));
        assert_eq!(e.message, "pay up");
        let e = normalize_upstream_error(500, body);
        assert_eq!((e.status, e.kind), (500, ErrorKind::Api));
    }

    #[test]
    fn non_json_and_empty() {
        let e = normalize_upstream_error(502, b"<html><body>Bad Gateway</body></html>");
        assert_eq!((e.status, e.kind), (502, ErrorKind::Api));
        assert_eq!(e.message, "upstream returned HTTP 502 Bad Gateway");
        let e = normalize_upstream_error(503, b"");
        assert_eq!((e.status, e.kind), (503, ErrorKind::Overloaded));
        let e = normalize_upstream_error(529, b"   ");
        assert_eq!((e.status, e.kind), (529, ErrorKind::Overloaded));
        let e = normalize_upstream_error(413, b"too big");
        assert_eq!((e.status, e.kind), (413, ErrorKind::RequestTooLarge));
        let e = normalize_upstream_error(504, b"upstream request timeout");
        assert_eq!((e.status, e.kind), (504, ErrorKind::Timeout));
        let e = normalize_upstream_error(408, b"");
        assert_eq!((e.status, e.kind), (408, ErrorKind::Timeout));
        let e = normalize_upstream_error(200, b"");
        assert_eq!((e.status, e.kind), (500, ErrorKind::Api));
        // JSON that is neither shape.
        let e = normalize_upstream_error(500, b"[1,2]");
        assert_eq!((e.status, e.kind), (500, ErrorKind::Api));
        let e = normalize_upstream_error(429, br#"{"error":"slow down"}"#);
        assert_eq!(
            (e.status, e.kind, e.message.as_str()),
            (429, ErrorKind::RateLimit, "slow down")
        );
    }

    #[test]
    fn normalized_body_is_anthropic_shaped() {
        let e = normalize_upstream_error(
            401,
            br#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#,
        );
        assert_eq!(
            json(&e.body(Some("req_x"))),
            serde_json::json!({"type":"error","error":{"type":"authentication_error","message":"Request had invalid authentication credentials."},"request_id":"req_x"})
        );
    }
}
