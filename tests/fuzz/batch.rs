//! Target `batch`: the streaming batch-upload parser (`batch::jsonl`), in
//! both of its shapes, JSONL and Anthropic's `{"requests": [...]}`.
//!
//! Properties, on any bytes under any limits: no panic; the requests
//! handed over are exactly, in order, the ones an independent reading of
//! the upload finds (each line parsed on its own for JSONL, the whole
//! document for JSON) — `custom_id` and `params` unchanged; in JSONL the
//! first bad line stops the parse with an error that names that line and
//! its index, after every line before it was handed over and none after
//! (no silent drop); an upload within the byte limit is never refused as
//! too large, and one refused as too large is over it; every refusal
//! renders as an Anthropic-shaped 400 or 413.

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestCaseResult};
use serde_json::{json, Map, Value};
use spillway_gateway::batch::jsonl::{parse, Format, Limits};
use spillway_gateway::batch::BatchError;
use spillway_gateway::error::ApiError;
use spillway_vertex::ErrorKind;

use crate::harness::{self, ensure, header, split_header, with_header, Fuzz};
use crate::inputs::{arb_json, mutated, odd_text, valid_request};
use crate::shape;

const TARGET: &str = "batch";

/// An upload and the limits it is parsed under.
#[derive(Debug, Clone)]
pub struct Upload {
    format: Format,
    bytes: Vec<u8>,
    max_bytes: u64,
    max_requests: usize,
}

/// What an independent reading expects: the requests before the first
/// problem, and where that problem is (a location prefix) if there is one.
struct Expected {
    requests: Vec<(String, Map<String, Value>)>,
    problem: Option<String>,
}

fn item(value: Value) -> Option<(String, Map<String, Value>)> {
    let Value::Object(mut o) = value else {
        return None;
    };
    if o.len() != 2 {
        return None;
    }
    match (o.remove("custom_id"), o.remove("params")) {
        (Some(Value::String(id)), Some(Value::Object(params))) => Some((id, params)),
        _ => None,
    }
}

fn expected_jsonl(bytes: &[u8], max_requests: usize) -> Expected {
    let mut requests = Vec::new();
    let lines = bytes.split_inclusive(|&b| b == b'\n');
    for (n, line) in lines.enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let index = requests.len();
        if index >= max_requests {
            return Expected {
                requests,
                problem: Some("requests: a batch holds at most".into()),
            };
        }
        let at = format!("line {} (requests[{index}])", n + 1);
        match serde_json::from_slice::<Value>(line).ok().and_then(item) {
            Some(r) => requests.push(r),
            None => {
                return Expected {
                    requests,
                    problem: Some(at),
                }
            }
        }
    }
    let problem = requests
        .is_empty()
        .then(|| "requests: a batch needs at least one request".into());
    Expected { requests, problem }
}

fn expected_json(bytes: &[u8], max_requests: usize) -> Option<Expected> {
    let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(bytes) else {
        return None;
    };
    if top.len() != 1 {
        return None;
    }
    let Some(Value::Array(items)) = top.get("requests") else {
        return None;
    };
    let mut requests = Vec::new();
    for (index, value) in items.iter().enumerate() {
        if index >= max_requests {
            return Some(Expected {
                requests,
                problem: Some("requests: a batch holds at most".into()),
            });
        }
        match item(value.clone()) {
            Some(r) => requests.push(r),
            None => {
                return Some(Expected {
                    requests,
                    problem: Some(format!("requests[{index}]")),
                })
            }
        }
    }
    let problem = requests
        .is_empty()
        .then(|| "requests: a batch needs at least one request".into());
    Some(Expected { requests, problem })
}

fn check(upload: &Upload) -> TestCaseResult {
    let limits = Limits {
        max_bytes: upload.max_bytes,
        max_requests: upload.max_requests,
    };
    let mut seen: Vec<(usize, String, String, Map<String, Value>)> = Vec::new();
    let result = parse(&upload.bytes[..], upload.format, limits, |raw| {
        seen.push((raw.index, raw.location, raw.custom_id, raw.params));
        Ok(())
    });
    for (i, (index, location, _, _)) in seen.iter().enumerate() {
        ensure(*index == i, || {
            format!("request {i} handed over as index {index}")
        })?;
        let named = match upload.format {
            Format::Jsonl => {
                location.starts_with("line ") && location.ends_with(&format!("(requests[{i}])"))
            }
            Format::Json => *location == format!("requests[{i}]"),
        };
        ensure(named, || format!("request {i} located as {location:?}"))?;
    }
    let within = upload.bytes.len() as u64 <= upload.max_bytes;
    match &result {
        Ok(n) => ensure(*n == seen.len() && *n > 0, || {
            format!("{n} counted, {} handed over", seen.len())
        })?,
        Err(BatchError::TooLarge { .. }) => {
            ensure(!within, || "refused as too large within the limit".into())?
        }
        Err(_) => {}
    }
    if let Err(e) = result {
        let message = e.to_string();
        let seen_error = shape::rendered(ApiError::from(e))?;
        let fine = match seen_error.status {
            400 => seen_error.kind == ErrorKind::InvalidRequest,
            413 => seen_error.kind == ErrorKind::RequestTooLarge,
            _ => false,
        };
        ensure(fine, || format!("{seen_error:?} for {message:?}"))?;
        if !within {
            return Ok(());
        }
        let expected = match upload.format {
            Format::Jsonl => Some(expected_jsonl(&upload.bytes, upload.max_requests)),
            Format::Json => expected_json(&upload.bytes, upload.max_requests),
        };
        let Some(expected) = expected else {
            return Ok(()); // not a batch document at all: any refusal will do
        };
        // serde_json's `Value` keeps the last of two `requests` keys; the
        // parser refuses the second, which is stricter, not wrong.
        let duplicate = message.contains("duplicate field `requests`");
        let problem = expected.problem.as_deref().unwrap_or("(none)");
        if duplicate {
            return Ok(());
        }
        ensure(message.starts_with(problem), || {
            format!("refused with {message:?}, the first problem is at {problem:?}")
        })?;
        return same_requests(&seen, &expected.requests);
    }
    let expected = match upload.format {
        Format::Jsonl => Some(expected_jsonl(&upload.bytes, upload.max_requests)),
        Format::Json => expected_json(&upload.bytes, upload.max_requests),
    };
    let expected =
        expected.ok_or_else(|| TestCaseError::fail("accepted a body that is not a batch"))?;
    ensure(expected.problem.is_none(), || {
        format!(
            "accepted, but the upload has a problem at {:?}",
            expected.problem
        )
    })?;
    same_requests(&seen, &expected.requests)
}

fn same_requests(
    seen: &[(usize, String, String, Map<String, Value>)],
    expected: &[(String, Map<String, Value>)],
) -> TestCaseResult {
    ensure(seen.len() == expected.len(), || {
        format!(
            "{} requests handed over, {} expected",
            seen.len(),
            expected.len()
        )
    })?;
    for ((_, location, id, params), (want_id, want_params)) in seen.iter().zip(expected) {
        ensure(id == want_id && params == want_params, || {
            format!("{location} changed in parsing")
        })?;
    }
    Ok(())
}

fn encode(upload: &Upload) -> Vec<u8> {
    let format = match upload.format {
        Format::Json => "json",
        Format::Jsonl => "jsonl",
    };
    with_header(
        &[
            ("format", format.to_owned()),
            ("max_bytes", upload.max_bytes.to_string()),
            ("max_requests", upload.max_requests.to_string()),
        ],
        &upload.bytes,
    )
}

fn decode(bytes: &[u8]) -> Upload {
    let (pairs, payload) = split_header(bytes);
    Upload {
        format: match header::<String>(&pairs, "format").as_deref() {
            Some("json") => Format::Json,
            _ => Format::Jsonl,
        },
        bytes: payload.to_vec(),
        max_bytes: header(&pairs, "max_bytes").unwrap_or(1 << 20),
        max_requests: header(&pairs, "max_requests").unwrap_or(100),
    }
}

fn requests() -> impl Strategy<Value = Vec<(String, Value)>> {
    let custom_id = prop_oneof!["[A-Za-z0-9_-]{1,64}", odd_text(), Just(String::new())];
    let params = prop_oneof![4 => valid_request(), 1 => crate::inputs::arb_object()];
    prop::collection::vec((custom_id, params), 1..6)
}

/// One request line, with the whitespace and line endings files have.
fn line(id: &str, params: &Value, style: u8) -> Vec<u8> {
    let text = json!({"custom_id": id, "params": params}).to_string();
    let text = match style % 4 {
        0 => format!("{text}\n"),
        1 => format!("{text}\r\n"),
        2 => format!("  {text}\t\n\n"),
        _ => format!("\n{text} \n"),
    };
    text.into_bytes()
}

/// Valid uploads in either shape, and the same with one bad request.
fn uploads(bad: bool) -> impl Strategy<Value = Upload> {
    let breakage = prop_oneof![
        Just(&b"{\"custom_id\":\"x\"}"[..]),
        Just(&b"{\"params\":{}}"[..]),
        Just(&b"{\"custom_id\":1,\"params\":{}}"[..]),
        Just(&b"{\"custom_id\":\"x\",\"params\":[]}"[..]),
        Just(&b"{\"custom_id\":\"x\",\"params\":{},\"extra\":1}"[..]),
        Just(&b"[\"not an object\"]"[..]),
        Just(&b"{\"custom_id\":\"x\",\"params\":{"[..]),
        Just(&b"\xff\xfe"[..]),
        Just(&b"null"[..]),
    ];
    (
        requests(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 6),
        breakage,
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(requests, jsonl, styles, breakage, at)| {
            let bad_at = bad.then(|| at.index(requests.len() + 1));
            let bytes = if jsonl {
                let mut out = Vec::new();
                for (i, (id, params)) in requests.iter().enumerate() {
                    if bad_at == Some(i) {
                        out.extend_from_slice(breakage);
                        out.push(b'\n');
                    }
                    out.extend(line(id, params, styles[i % styles.len()]));
                }
                if bad_at == Some(requests.len()) {
                    out.extend_from_slice(breakage);
                }
                out
            } else {
                let mut items: Vec<String> = requests
                    .iter()
                    .map(|(id, params)| json!({"custom_id": id, "params": params}).to_string())
                    .collect();
                if let Some(i) = bad_at {
                    items.insert(i, String::from_utf8_lossy(breakage).into_owned());
                }
                format!("{{\"requests\": [{}]}}", items.join(",\n")).into_bytes()
            };
            Upload {
                format: if jsonl { Format::Jsonl } else { Format::Json },
                bytes,
                max_bytes: 1 << 20,
                max_requests: 100,
            }
        })
}

fn valid(upload: &Upload) -> TestCaseResult {
    let result = parse(
        &upload.bytes[..],
        upload.format,
        Limits {
            max_bytes: upload.max_bytes,
            max_requests: upload.max_requests,
        },
        |_| Ok(()),
    );
    ensure(result.is_ok(), || {
        format!("a valid upload was refused: {result:?}")
    })?;
    check(upload)
}

fn bad(upload: &Upload) -> TestCaseResult {
    let result = parse(
        &upload.bytes[..],
        upload.format,
        Limits {
            max_bytes: upload.max_bytes,
            max_requests: upload.max_requests,
        },
        |_| Ok(()),
    );
    ensure(result.is_err(), || {
        "an upload with a bad request was accepted".into()
    })?;
    check(upload)
}

fn arbitrary(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Upload> {
    let fresh = prop_oneof![
        uploads(false).prop_map(|u| u.bytes),
        uploads(true).prop_map(|u| u.bytes),
        prop::collection::vec(any::<u8>(), 0..256),
        arb_json().prop_map(|v| v.to_string().into_bytes()),
    ];
    (
        mutated(seeds, fresh),
        any::<bool>(),
        prop_oneof![Just(1u64 << 20), 0u64..512],
        prop_oneof![Just(100usize), 1usize..4],
    )
        .prop_map(|(bytes, jsonl, max_bytes, max_requests)| Upload {
            format: if jsonl { Format::Jsonl } else { Format::Json },
            bytes,
            max_bytes,
            max_requests,
        })
}

fn check_stored(kind: &str, bytes: &[u8]) -> TestCaseResult {
    let upload = decode(bytes);
    match kind {
        "valid" => valid(&upload),
        "bad" => bad(&upload),
        _ => check(&upload),
    }
}

#[test]
fn corpus() {
    harness::replay(TARGET, check_stored);
}

#[test]
fn fuzz() {
    let seeds = harness::seeds(TARGET, &["valid", "bad", "upload"])
        .into_iter()
        .map(|b| decode(&b).bytes)
        .collect();
    Fuzz::new(TARGET)
        .property("valid", "txt", uploads(false), encode, |u| valid(&u))
        .property("bad", "txt", uploads(true), encode, |u| bad(&u))
        .property("upload", "txt", arbitrary(seeds), encode, |u| check(&u))
        .run();
}
