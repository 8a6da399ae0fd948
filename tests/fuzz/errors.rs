//! Target `errors`: the upstream error mapper (`normalize_upstream_error`)
//! and the error frames the gateway writes itself (`error_body`,
//! `sse_error_event`).
//!
//! Properties: any status with any body — a Google object, the same
//! wrapped in an array, Anthropic's shape, an HTML page, nothing, invalid
//! UTF-8, a megabyte of it — maps to a 4xx/5xx with a kind Anthropic
//! defines and a non-empty message, which the gateway renders in
//! Anthropic's shape under that status; the message is the upstream's or
//! a short one of its own, never longer than the body plus a status line;
//! a Google status name decides the status by the documented table; an
//! object and the same object wrapped in an array map the same. A frame
//! the gateway writes mid-stream is one SSE event that its own splitter
//! and usage reader read back as the same error.

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestCaseResult};
use serde_json::{json, Value};
use spillway_gateway::error::ApiError;
use spillway_vertex::{
    error_body, normalize_upstream_error, sse_error_event, ErrorKind, SseSplitter, StreamUsage,
};

use crate::harness::{self, ensure, header, split_header, with_header, Fuzz};
use crate::inputs::{arb_json, mutated, odd_text};
use crate::shape;

const TARGET: &str = "errors";

const GOOGLE: [(&str, u16); 13] = [
    ("INVALID_ARGUMENT", 400),
    ("FAILED_PRECONDITION", 400),
    ("OUT_OF_RANGE", 400),
    ("UNAUTHENTICATED", 401),
    ("PERMISSION_DENIED", 403),
    ("NOT_FOUND", 404),
    ("RESOURCE_EXHAUSTED", 429),
    ("INTERNAL", 500),
    ("UNKNOWN", 500),
    ("DATA_LOSS", 500),
    ("UNAVAILABLE", 503),
    ("DEADLINE_EXCEEDED", 504),
    ("ABORTED", 0),
];

fn upstream(status: u16, body: &[u8]) -> TestCaseResult {
    let e = normalize_upstream_error(status, body);
    ensure((400..=599).contains(&e.status), || {
        format!("status {} for {status}", e.status)
    })?;
    ensure(!e.message.is_empty(), || format!("empty message: {e:?}"))?;
    ensure(e.message.len() <= body.len() + 64, || {
        format!(
            "a {}-byte message from a {}-byte body",
            e.message.len(),
            body.len()
        )
    })?;
    let own = shape::error_body(&e.body(Some("req_fuzz")))?;
    ensure(own == (e.kind, e.message.clone()), || {
        format!("{own:?} for {e:?}")
    })?;
    let seen = shape::rendered(ApiError::Upstream(e.clone()))?;
    ensure(seen.status == e.status && seen.kind == e.kind, || {
        format!("{seen:?} for {e:?}")
    })?;
    shape::same_message(&seen, &e.message)?;

    let value = serde_json::from_slice::<Value>(body).ok();
    // The documented table: a Google status name decides.
    let google = value.as_ref().and_then(|v| {
        let object = match v {
            Value::Array(items) => items.iter().find_map(Value::as_object)?,
            Value::Object(o) => o,
            _ => return None,
        };
        let inner = object.get("error")?.as_object()?;
        if inner.get("type").is_some_and(Value::is_string) {
            return None;
        }
        inner.get("status")?.as_str()
    });
    if let Some((_, want)) = google.and_then(|g| GOOGLE.iter().find(|(name, _)| *name == g)) {
        let want = match (*want, status) {
            (503, 529) => 529,
            (w, _) => w,
        };
        if want != 0 {
            ensure(e.status == want, || {
                format!("{google:?} mapped to {} not {want}", e.status)
            })?;
        }
    }
    // An object maps as the same object wrapped in an array.
    if value.as_ref().is_some_and(Value::is_object) {
        let mut wrapped = b"[".to_vec();
        wrapped.extend_from_slice(body);
        wrapped.push(b']');
        let w = normalize_upstream_error(status, &wrapped);
        ensure(w == e, || format!("wrapped {w:?} unwrapped {e:?}"))?;
    }
    Ok(())
}

fn frame(kind: ErrorKind, message: &str) -> TestCaseResult {
    let body = error_body(kind, message, None);
    if !message.is_empty() {
        let got = shape::error_body(&body)?;
        ensure(got == (kind, message.to_owned()), || format!("{got:?}"))?;
    }
    let frame = sse_error_event(kind, message);
    let mut splitter = SseSplitter::new(frame.len());
    let events = splitter
        .push(&frame)
        .map_err(|e| TestCaseError::fail(format!("the frame is over its own size: {e}")))?;
    ensure(splitter.finish().is_none() && events.len() == 1, || {
        format!("the frame is not one event: {events:?}")
    })?;
    let ev = &events[0];
    ensure(
        ev.raw == frame && ev.event.as_deref() == Some("error"),
        || format!("{ev:?}"),
    )?;
    let data: Value = serde_json::from_str(&ev.data)
        .map_err(|e| TestCaseError::fail(format!("the frame's data is not JSON: {e}")))?;
    let want = json!({"type": "error", "error": {"type": kind.as_str(), "message": message}});
    ensure(data == want, || format!("{data} is not {want}"))?;
    let mut usage = StreamUsage::new();
    usage.observe(ev);
    let read = usage.error();
    ensure(
        read == Some((kind.as_str().to_owned(), message.to_owned())),
        || format!("the usage reader saw {read:?}"),
    )
}

fn encode_upstream((status, body): &(u16, Vec<u8>)) -> Vec<u8> {
    with_header(&[("status", status.to_string())], body)
}

fn encode_frame((kind, message): &(ErrorKind, String)) -> Vec<u8> {
    with_header(&[("kind", kind.as_str().to_owned())], message.as_bytes())
}

fn check_stored(kind: &str, bytes: &[u8]) -> TestCaseResult {
    let (pairs, payload) = split_header(bytes);
    match kind {
        "frame" => {
            let k = header::<String>(&pairs, "kind")
                .and_then(|k| ErrorKind::from_type_str(&k))
                .unwrap_or(ErrorKind::Api);
            frame(k, &String::from_utf8_lossy(payload))
        }
        _ => upstream(header(&pairs, "status").unwrap_or(500), payload),
    }
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => prop::sample::select(vec![400u16, 401, 403, 404, 408, 409, 413, 429, 500, 502, 503, 504, 529]),
        1 => 400u16..600,
        1 => any::<u16>(),
    ]
}

/// Bodies of every family Vertex sends, and some it should not.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let google_status = prop_oneof![
        prop::sample::select(GOOGLE.map(|(n, _)| n).to_vec()).prop_map(str::to_owned),
        "[A-Z_]{0,12}",
    ];
    let code = prop_oneof![status().prop_map(Value::from), arb_json()];
    let google = (code, odd_text(), google_status, any::<bool>()).prop_map(
        |(code, message, status, array)| {
            let object = json!({"error": {"code": code, "message": message, "status": status}});
            let v = if array { json!([object]) } else { object };
            v.to_string().into_bytes()
        },
    );
    let anthropic = (
        prop::sample::select(ErrorKind::ALL.map(ErrorKind::as_str).to_vec()).prop_map(str::to_owned),
        "[a-z_]{0,16}",
        odd_text(),
        any::<bool>(),
    )
        .prop_map(|(known, other, message, use_known)| {
            let ty = if use_known { known } else { other };
            json!({"type": "error", "error": {"type": ty, "message": message}, "request_id": "req_1"})
                .to_string()
                .into_bytes()
        });
    prop_oneof![
        3 => google,
        2 => anthropic,
        1 => arb_json().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => prop::sample::select(vec![
            b"".to_vec(),
            b"   ".to_vec(),
            b"<html><body>Bad Gateway</body></html>".to_vec(),
            b"upstream connect error or disconnect/reset before headers".to_vec(),
            b"{\"error\":\"\"}".to_vec(),
            b"{\"message\":\"\"}".to_vec(),
            b"[]".to_vec(),
            b"[[{\"error\":{}}]]".to_vec(),
        ]),
    ]
}

fn huge() -> impl Strategy<Value = (u16, Vec<u8>)> {
    (status(), 0usize..3, 100_000usize..1_000_000).prop_map(|(status, how, n)| {
        let body = match how {
            0 => json!({"error": {"code": status, "message": "m".repeat(n), "status": "RESOURCE_EXHAUSTED"}})
                .to_string()
                .into_bytes(),
            1 => vec![0xffu8; n],
            _ => {
                let mut b = "[".repeat(n).into_bytes();
                b.extend_from_slice(b"{\"error\":{\"message\":\"deep\"}}");
                b
            }
        };
        (status, body)
    })
}

#[test]
fn corpus() {
    harness::replay(TARGET, check_stored);
}

#[test]
fn fuzz() {
    let seeds = harness::seeds(TARGET, &["upstream"])
        .into_iter()
        .map(|b| split_header(&b).1.to_vec())
        .collect();
    let kind = prop::sample::select(ErrorKind::ALL.to_vec());
    Fuzz::new(TARGET)
        .property(
            "upstream",
            "txt",
            (status(), body()),
            encode_upstream,
            |(s, b)| upstream(s, &b),
        )
        .property(
            "upstream",
            "txt",
            (status(), mutated(seeds, body())),
            encode_upstream,
            |(s, b)| upstream(s, &b),
        )
        .property("upstream", "txt", huge(), encode_upstream, |(s, b)| {
            upstream(s, &b)
        })
        .property(
            "frame",
            "txt",
            (kind, prop_oneof![odd_text(), ".*", Just(String::new())]),
            encode_frame,
            |(k, m)| frame(k, &m),
        )
        .run();
}
