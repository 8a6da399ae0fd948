//! Target `request`: client bodies through `parse_body`, `validate` and the
//! Vertex-body translation (`to_vertex_body`), and refusals through the
//! gateway's renderer.
//!
//! Properties, on any bytes: nothing panics; whatever validates translates
//! to a JSON object that keeps every field but `model` (Messages) or sets
//! `model` and drops `max_tokens`/`stream` (count-tokens), adds
//! `anthropic_version` only when absent, still validates as a Vertex-style
//! body and translates to the same bytes again; whatever does not validate
//! is a 400 `invalid_request_error` with a message naming the problem.
//! Generated valid requests must validate (with the summary their fields
//! say); each generated breakage must be refused naming the field it broke.

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestCaseResult};
use serde_json::{json, Map, Value};
use spillway_gateway::error::ApiError;
use spillway_vertex::{
    parse_body, to_vertex_body, validate, ErrorKind, Operation, RequestError,
    VERTEX_ANTHROPIC_VERSION,
};

use crate::harness::{self, ensure, Fuzz};
use crate::inputs::{self, deep_nesting, mutated, number_literal, valid_request};
use crate::shape;

const TARGET: &str = "request";
const VERTEX_MODEL: &str = "claude-sonnet-4-5@20250929";

/// A refusal as the client sees it: 400, `invalid_request_error`, the
/// error's own text.
fn refused(e: RequestError) -> TestCaseResult {
    let text = e.to_string();
    let seen = shape::rendered(ApiError::InvalidRequest(e))?;
    ensure(
        seen.status == 400 && seen.kind == ErrorKind::InvalidRequest,
        || format!("a refused body rendered as {seen:?}"),
    )?;
    shape::same_message(&seen, &text)
}

/// What must hold of a validated body's translation.
fn translated(body: &Map<String, Value>, op: Operation) -> TestCaseResult {
    let out = to_vertex_body(body.clone(), op, VERTEX_MODEL);
    let parsed = parse_body(&out)
        .map_err(|e| TestCaseError::fail(format!("the translation is not a JSON object: {e}")))?;
    let version = body
        .get("anthropic_version")
        .cloned()
        .unwrap_or_else(|| Value::from(VERTEX_ANTHROPIC_VERSION));
    ensure(parsed.get("anthropic_version") == Some(&version), || {
        format!(
            "anthropic_version {:?}, wanted {version}",
            parsed.get("anthropic_version")
        )
    })?;
    let dropped: &[&str] = match op {
        Operation::Messages => &["model"],
        Operation::CountTokens => &["max_tokens", "stream"],
    };
    for gone in dropped {
        ensure(!parsed.contains_key(*gone), || {
            format!("{gone} survived translation")
        })?;
    }
    if op == Operation::CountTokens {
        ensure(
            parsed.get("model") == Some(&Value::from(VERTEX_MODEL)),
            || format!("count-tokens model is {:?}", parsed.get("model")),
        )?;
    }
    // Every other field passes through untouched and in the client's order;
    // only `anthropic_version` may be added, at the end.
    let kept: Vec<(&String, &Value)> = body
        .iter()
        .filter(|(k, _)| !dropped.contains(&k.as_str()))
        .filter(|(k, _)| !(op == Operation::CountTokens && *k == "model"))
        .collect();
    let mut expected: Vec<(&str, Value)> = kept
        .iter()
        .map(|(k, v)| (k.as_str(), reparsed(v)))
        .collect();
    if op == Operation::CountTokens && body.contains_key("model") {
        let at = body.keys().position(|k| k == "model").unwrap_or(0);
        let at = body
            .keys()
            .take(at)
            .filter(|k| !dropped.contains(&k.as_str()))
            .count();
        expected.insert(at, ("model", Value::from(VERTEX_MODEL)));
    } else if op == Operation::CountTokens {
        expected.push(("model", Value::from(VERTEX_MODEL)));
    }
    if !body.contains_key("anthropic_version") {
        expected.push(("anthropic_version", version));
    }
    let got: Vec<(&str, Value)> = parsed
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    ensure(got == expected, || {
        format!("translation changed the body:\n got {got:?}\nwant {expected:?}")
    })?;
    // A translated body is a valid Vertex-style body, and translating it
    // again changes nothing.
    validate(&parsed, op, op == Operation::CountTokens)
        .map_err(|e| TestCaseError::fail(format!("the translation does not validate: {e}")))?;
    let again = to_vertex_body(parsed, op, VERTEX_MODEL);
    ensure(again == out, || {
        format!(
            "translating twice is not stable:\n{}\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&again)
        )
    })
}

/// `v` after a trip through its own serialization: what any JSON relay
/// can promise.
fn reparsed(v: &Value) -> Value {
    serde_json::to_vec(v)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// The properties every body has, whatever its bytes.
fn any_bytes(bytes: &[u8]) -> TestCaseResult {
    let body = match parse_body(bytes) {
        Ok(body) => body,
        Err(e) => {
            let not_object = matches!(e, RequestError::NotAnObject);
            let is_json = serde_json::from_slice::<Value>(bytes).is_ok();
            ensure(not_object == is_json, || {
                format!("{e:?} for JSON: {is_json}")
            })?;
            return refused(e);
        }
    };
    for op in [Operation::Messages, Operation::CountTokens] {
        for require_model in [true, false] {
            match validate(&body, op, require_model) {
                Ok(summary) => {
                    let stream =
                        op == Operation::Messages && body.get("stream") == Some(&Value::Bool(true));
                    ensure(summary.stream == stream, || format!("{summary:?}"))?;
                    let max_tokens = match op {
                        Operation::Messages => body.get("max_tokens").and_then(Value::as_u64),
                        Operation::CountTokens => None,
                    };
                    ensure(summary.max_tokens == max_tokens, || format!("{summary:?}"))?;
                    let model = body
                        .get("model")
                        .and_then(Value::as_str)
                        .filter(|m| !m.is_empty());
                    ensure(summary.model.as_deref() == model, || format!("{summary:?}"))?;
                    translated(&body, op)?;
                }
                Err(e) => refused(e)?,
            }
        }
    }
    Ok(())
}

fn valid(bytes: &[u8]) -> TestCaseResult {
    let body = parse_body(bytes)
        .map_err(|e| TestCaseError::fail(format!("a valid request did not parse: {e}")))?;
    // A body without `model` is a valid Vertex-style body (the model is in
    // the URL), not a valid Anthropic-style one.
    let require_model = body.contains_key("model");
    for op in [Operation::Messages, Operation::CountTokens] {
        validate(&body, op, require_model)
            .map_err(|e| TestCaseError::fail(format!("a valid request was refused: {e}")))?;
    }
    any_bytes(bytes)
}

fn invalid(bytes: &[u8], field: &str) -> TestCaseResult {
    match parse_body(bytes).and_then(|body| validate(&body, Operation::Messages, true)) {
        Ok(s) => Err(TestCaseError::fail(format!(
            "a broken request was accepted: {s:?}"
        ))),
        Err(e) => {
            let text = e.to_string();
            ensure(text.starts_with(field), || {
                format!("{text:?} does not name {field:?}")
            })?;
            any_bytes(bytes)
        }
    }
}

/// A way to break a valid request, and the field the refusal must name.
fn broken() -> impl Strategy<Value = (Value, String)> {
    (
        valid_request(),
        0usize..16,
        any::<prop::sample::Index>(),
        inputs::arb_json(),
    )
        .prop_map(|(mut body, how, at, junk)| {
            let map = body.as_object_mut().expect("requests are objects");
            // An Anthropic-style body needs its model: only the model's own
            // breakages may leave it out.
            if !map.contains_key("model") {
                map.insert("model".into(), json!("claude-sonnet-4-5"));
            }
            let messages = map["messages"].as_array().map_or(1, Vec::len);
            let i = at.index(messages);
            let field = match how {
                0 => {
                    map.shift_remove("max_tokens");
                    "max_tokens".to_owned()
                }
                1 => {
                    let bad = [
                        json!(0),
                        json!(-1),
                        json!(1.5),
                        json!("64"),
                        json!(null),
                        json!(1e300),
                        json!(true),
                    ];
                    map.insert("max_tokens".into(), bad[at.index(bad.len())].clone());
                    "max_tokens".to_owned()
                }
                2 => {
                    map.shift_remove("messages");
                    "messages".to_owned()
                }
                3 => {
                    let bad = [json!([]), json!("hi"), json!({}), json!(null)];
                    map.insert("messages".into(), bad[at.index(bad.len())].clone());
                    "messages".to_owned()
                }
                4 => {
                    map["messages"][0]["role"] = json!("assistant");
                    "messages.0.role".to_owned()
                }
                5 => {
                    let bad = [json!("system"), json!(1), json!(null), json!("User")];
                    map["messages"][i]["role"] = bad[at.index(bad.len())].clone();
                    format!("messages.{i}.role")
                }
                6 => {
                    // The same role twice in a row.
                    let copy = map["messages"][i].clone();
                    if let Some(m) = map["messages"].as_array_mut() {
                        m.insert(i + 1, copy);
                    }
                    "messages.".to_owned()
                }
                7 => {
                    map["messages"][i]
                        .as_object_mut()
                        .map(|m| m.shift_remove("content"));
                    format!("messages.{i}.content")
                }
                8 => {
                    map["messages"][i]["content"] = json!(5);
                    format!("messages.{i}.content")
                }
                9 => {
                    map["messages"][i]["content"] = json!([{"text": "no type"}]);
                    format!("messages.{i}.content.0.type")
                }
                10 => {
                    map["messages"][i]["content"] = json!([{"type": "text"}]);
                    format!("messages.{i}.content.0.text")
                }
                11 => {
                    let bad = [json!("true"), json!(1), json!(null)];
                    map.insert("stream".into(), bad[at.index(bad.len())].clone());
                    "stream".to_owned()
                }
                12 => {
                    let bad = [
                        json!(5),
                        json!(["x"]),
                        json!([{"type": "image"}]),
                        json!([{"type": "text"}]),
                    ];
                    map.insert("system".into(), bad[at.index(bad.len())].clone());
                    "system".to_owned()
                }
                13 => {
                    let bad = [json!(""), json!(7), json!(null), json!(["m"])];
                    map.insert("model".into(), bad[at.index(bad.len())].clone());
                    "model".to_owned()
                }
                14 => {
                    map.shift_remove("model");
                    "model".to_owned()
                }
                _ => {
                    // A non-object content block, of any other kind.
                    let junk = if junk.is_object() { json!(null) } else { junk };
                    map["messages"][i]["content"] = json!([junk]);
                    format!("messages.{i}.content.0")
                }
            };
            (body, field)
        })
}

fn bytes_of(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON serializes")
}

fn check_stored(kind: &str, bytes: &[u8]) -> TestCaseResult {
    match kind {
        "valid" => valid(bytes),
        "invalid" => invalid(bytes, ""),
        _ => any_bytes(bytes),
    }
}

#[test]
fn corpus() {
    harness::replay(TARGET, check_stored);
}

#[test]
fn fuzz() {
    let seeds = harness::seeds(TARGET, &["valid", "invalid", "bytes"]);
    Fuzz::new(TARGET)
        .property("valid", "json", valid_request(), bytes_of, |v| {
            valid(&bytes_of(&v))
        })
        .property(
            "invalid",
            "json",
            broken(),
            |(v, _)| bytes_of(v),
            |(v, field)| invalid(&bytes_of(&v), &field),
        )
        .property(
            "bytes",
            "json",
            mutated(seeds, valid_request().prop_map(|v| bytes_of(&v))),
            Vec::clone,
            |b| any_bytes(&b),
        )
        .property(
            "bytes",
            "bin",
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..512),
                inputs::arb_json().prop_map(|v| bytes_of(&v)),
                deep_nesting(),
                (valid_request(), number_literal()).prop_map(|(v, n)| {
                    let text = String::from_utf8(bytes_of(&v)).unwrap_or_default();
                    text.replacen("\"max_tokens\":", &format!("\"max_tokens\":{n},\"x\":"), 1)
                        .into_bytes()
                }),
            ],
            Vec::clone,
            |b| any_bytes(&b),
        )
        .run();
}
