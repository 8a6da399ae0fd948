//! Client request bodies: parse, validate, and translate to what Vertex expects.
//!
//! The Vertex body for Claude is the Anthropic Messages body with two differences (reference §1.2):
//!
//! * **no `model`**: it goes in the URL. Vertex rejects a body `model` with
//!   400 `model: Extra inputs are not permitted`;
//! * **`"anthropic_version": "vertex-2023-10-16"` is required** (400 `anthropic_version: Field
//!   required` otherwise). The SDK only `setdefault`s it, so a client-supplied value wins.
//!
//! Count-tokens is the exception (§1.5): its URL model is the literal `count-tokens`, so the real
//! (Vertex) model id **stays in the body**, and the body is the Messages body minus
//! `max_tokens`/`stream`.
//!
//! Validation catches the common mistakes locally (cheaper than a round trip and a quota token) but
//! never rejects unknown fields: new API fields (`thinking`, `output_config`, `container`...) must
//! pass through untouched, as must sampling parameters some models refuse.

use serde_json::{Map, Value};

use crate::error::ErrorKind;
use crate::VERTEX_ANTHROPIC_VERSION;

/// Which Anthropic endpoint a request targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `POST /v1/messages` / `{model}:rawPredict` / `{model}:streamRawPredict`.
    Messages,
    /// `POST /v1/messages/count_tokens` / `count-tokens:rawPredict`.
    CountTokens,
}

/// Why a client body was refused. Always an `invalid_request_error` (400).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RequestError {
    /// The bytes are not JSON.
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The JSON is not an object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// A field is missing or has the wrong shape. `field` is a dotted path (`messages.2.role`).
    #[error("{field}: {problem}")]
    Invalid {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl RequestError {
    /// The Anthropic error kind for this failure.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidRequest
    }

    fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        RequestError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// What the gateway needs to know about a valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSummary {
    /// `stream` from the body (always false for count-tokens).
    pub stream: bool,
    /// `max_tokens` from the body (always `None` for count-tokens).
    pub max_tokens: Option<u64>,
    /// The body's `model`, if it is a string.
    pub model: Option<String>,
}

/// Parses bytes into a JSON object. Never panics; nesting depth is bounded by serde_json's default
/// recursion limit (128).
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, RequestError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(RequestError::NotAnObject),
        Err(e) => Err(RequestError::MalformedJson(e.to_string())),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn validate_max_tokens(body: &Map<String, Value>) -> Result<u64, RequestError> {
    match body.get("max_tokens") {
        None => Err(RequestError::invalid("max_tokens", "field required")),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v >= 1 => Ok(v),
            _ => Err(RequestError::invalid(
                "max_tokens",
                format!("must be an integer >= 1, got {n}"),
            )),
        },
        Some(other) => Err(RequestError::invalid(
            "max_tokens",
            format!("must be an integer >= 1, got {}", type_name(other)),
        )),
    }
}

fn validate_content_blocks(field: &str, blocks: &[Value]) -> Result<(), RequestError> {
    for (j, block) in blocks.iter().enumerate() {
        let Value::Object(block) = block else {
            return Err(RequestError::invalid(
                format!("{field}.{j}"),
                format!("content block must be an object, got {}", type_name(block)),
            ));
        };
        match block.get("type") {
            Some(Value::String(ty)) => {
                if ty == "text" && !matches!(block.get("text"), Some(Value::String(_))) {
                    return Err(RequestError::invalid(
                        format!("{field}.{j}.text"),
                        "text content blocks need a string \"text\"",
                    ));
                }
            }
            None => {
                return Err(RequestError::invalid(
                    format!("{field}.{j}.type"),
                    "field required",
                ))
            }
            Some(other) => {
                return Err(RequestError::invalid(
                    format!("{field}.{j}.type"),
                    format!("must be a string, got {}", type_name(other)),
                ))
            }
        }
    }
    Ok(())
}

fn validate_messages(body: &Map<String, Value>) -> Result<(), RequestError> {
    let messages = match body.get("messages") {
        None => return Err(RequestError::invalid("messages", "field required")),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(RequestError::invalid(
                "messages",
                format!("must be an array, got {}", type_name(other)),
            ))
        }
    };
    if messages.is_empty() {
        return Err(RequestError::invalid(
            "messages",
            "must contain at least one message",
        ));
    }
    let last = messages.len() - 1;
    let mut prev_role: Option<&str> = None;
    for (i, msg) in messages.iter().enumerate() {
        let Value::Object(msg) = msg else {
            return Err(RequestError::invalid(
                format!("messages.{i}"),
                format!("must be an object, got {}", type_name(msg)),
            ));
        };
        let role = match msg.get("role") {
            None => {
                return Err(RequestError::invalid(
                    format!("messages.{i}.role"),
                    "field required",
                ))
            }
            Some(Value::String(r)) if r == "user" || r == "assistant" => r.as_str(),
            Some(other) => {
                return Err(RequestError::invalid(
                    format!("messages.{i}.role"),
                    format!("must be \"user\" or \"assistant\", got {other}"),
                ))
            }
        };
        if i == 0 && role != "user" {
            return Err(RequestError::invalid(
                "messages.0.role",
                "the first message must use the \"user\" role",
            ));
        }
        if prev_role == Some(role) {
            return Err(RequestError::invalid(
                format!("messages.{i}.role"),
                format!(
                    "roles must alternate between \"user\" and \"assistant\", \
                     but found multiple \"{role}\" roles in a row"
                ),
            ));
        }
        prev_role = Some(role);

        // Like Anthropic: every message needs non-empty content, except an optional final
        // assistant message (an empty prefill).
        let may_be_empty = i == last && role == "assistant";
        let field = format!("messages.{i}.content");
        match msg.get("content") {
            None => return Err(RequestError::invalid(field, "field required")),
            Some(Value::String(s)) => {
                if s.is_empty() && !may_be_empty {
                    return Err(RequestError::invalid(field, "must not be empty"));
                }
            }
            Some(Value::Array(blocks)) => {
                if blocks.is_empty() && !may_be_empty {
                    return Err(RequestError::invalid(field, "must not be empty"));
                }
                validate_content_blocks(&field, blocks)?;
            }
            Some(other) => {
                return Err(RequestError::invalid(
                    field,
                    format!(
                        "must be a string or an array of content blocks, got {}",
                        type_name(other)
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn validate_system(body: &Map<String, Value>) -> Result<(), RequestError> {
    match body.get("system") {
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(blocks)) => {
            for (j, block) in blocks.iter().enumerate() {
                let Value::Object(block) = block else {
                    return Err(RequestError::invalid(
                        format!("system.{j}"),
                        format!("must be a text block object, got {}", type_name(block)),
                    ));
                };
                if block.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(RequestError::invalid(
                        format!("system.{j}.type"),
                        "system blocks must have type \"text\"",
                    ));
                }
                if !matches!(block.get("text"), Some(Value::String(_))) {
                    return Err(RequestError::invalid(
                        format!("system.{j}.text"),
                        "must be a string",
                    ));
                }
            }
            Ok(())
        }
        Some(other) => Err(RequestError::invalid(
            "system",
            format!(
                "must be a string or an array of text blocks, got {}",
                type_name(other)
            ),
        )),
    }
}

/// Validates an Anthropic Messages body for `op`.
///
/// * Messages: `max_tokens` required, integer >= 1; `messages` required, non-empty, each an object
///   with `role` `"user"`|`"assistant"` and `content` a non-empty string or non-empty array of
///   objects with a string `type` (text blocks need a string `text`); the first role is `"user"`;
///   roles alternate; a final assistant message (prefill, possibly empty) is allowed. `stream`,
///   if present, must be a boolean; `system` a string or an array of text blocks.
/// * CountTokens: the same minus `max_tokens` and `stream` (ignored if present).
/// * `model` must be a non-empty string when `require_model`.
///
/// Unknown fields are never rejected.
pub fn validate(
    body: &Map<String, Value>,
    op: Operation,
    require_model: bool,
) -> Result<RequestSummary, RequestError> {
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Some(m.clone()),
        Some(Value::String(_)) if require_model => {
            return Err(RequestError::invalid("model", "must not be empty"))
        }
        None if require_model => return Err(RequestError::invalid("model", "field required")),
        Some(other) if require_model => {
            return Err(RequestError::invalid(
                "model",
                format!("must be a string, got {}", type_name(other)),
            ))
        }
        _ => None,
    };

    let (max_tokens, stream) = match op {
        Operation::Messages => {
            let max_tokens = validate_max_tokens(body)?;
            let stream = match body.get("stream") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(RequestError::invalid(
                        "stream",
                        format!("must be a boolean, got {}", type_name(other)),
                    ))
                }
            };
            (Some(max_tokens), stream)
        }
        Operation::CountTokens => (None, false),
    };

    validate_messages(body)?;
    validate_system(body)?;

    Ok(RequestSummary {
        stream,
        max_tokens,
        model,
    })
}

/// Turns a validated client body into the body Vertex expects, serialized.
///
/// * Messages: removes `model`.
/// * CountTokens: sets `model` to `vertex_model` and removes `max_tokens` and `stream` (the
///   count-tokens body is the Messages body minus those two).
/// * Both: inserts `anthropic_version: "vertex-2023-10-16"` only if absent.
pub fn to_vertex_body(mut body: Map<String, Value>, op: Operation, vertex_model: &str) -> Vec<u8> {
    // `shift_remove`, not `remove`: with `preserve_order`, `remove` swaps the
    // last field into the removed one's place, and the client's order is lost.
    match op {
        Operation::Messages => {
            body.shift_remove("model");
        }
        Operation::CountTokens => {
            body.shift_remove("max_tokens");
            body.shift_remove("stream");
            body.insert("model".to_owned(), Value::String(vertex_model.to_owned()));
        }
    }
    if !body.contains_key("anthropic_version") {
        body.insert(
            "anthropic_version".to_owned(),
            Value::String(VERTEX_ANTHROPIC_VERSION.to_owned()),
        );
    }
    // A map with string keys and JSON values always serializes.
    serde_json::to_vec(&body).expect("JSON object serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn ok_body() -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]
        })
    }

    fn err(v: Value, op: Operation, require_model: bool) -> String {
        validate(&obj(v), op, require_model)
            .unwrap_err()
            .to_string()
    }

    fn with(mut base: Value, key: &str, val: Value) -> Value {
        base[key] = val;
        base
    }

    #[test]
    fn parse_body_errors() {
        assert!(matches!(
            parse_body(b"{not json"),
            Err(RequestError::MalformedJson(_))
        ));
        assert!(matches!(
            parse_body(b""),
            Err(RequestError::MalformedJson(_))
        ));
        assert_eq!(parse_body(b"[1]"), Err(RequestError::NotAnObject));
        assert_eq!(parse_body(b"null"), Err(RequestError::NotAnObject));
        assert_eq!(parse_body(b"  {}  ").unwrap().len(), 0);
        let deep = "[".repeat(100_000);
        assert!(matches!(
            parse_body(deep.as_bytes()),
            Err(RequestError::MalformedJson(_))
        ));
        assert_eq!(RequestError::NotAnObject.kind(), ErrorKind::InvalidRequest);
    }

    #[test]
    fn minimal_valid_messages() {
        let s = validate(&obj(ok_body()), Operation::Messages, true).unwrap();
        assert_eq!(
            s,
            RequestSummary {
                stream: false,
                max_tokens: Some(64),
                model: Some("claude-sonnet-4-5".into())
            }
        );
        let s = validate(
            &obj(with(ok_body(), "stream", json!(true))),
            Operation::Messages,
            false,
        )
        .unwrap();
        assert!(s.stream);
    }

    #[test]
    fn recorded_vertex_request_is_valid() {
        let body = parse_body(br#"{"max_tokens":4000,"messages":[{"content":[{"text":"Say hi in Portuguese","type":"text"}],"role":"user"}],"system":[{"text":"You are a helpful assistant","type":"text"}],"stream":true,"anthropic_version":"vertex-2023-10-16"}"#).unwrap();
        let s = validate(&body, Operation::Messages, false).unwrap();
        assert_eq!((s.stream, s.max_tokens, s.model), (true, Some(4000), None));
    }

    #[test]
    fn max_tokens_rules() {
        let mut b = ok_body();
        b.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(
            err(b, Operation::Messages, true),
            "max_tokens: field required"
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(64.0),
            json!("64"),
            json!(null),
            json!(1e300),
        ] {
            let e = err(
                with(ok_body(), "max_tokens", bad.clone()),
                Operation::Messages,
                true,
            );
            assert!(
                e.starts_with("max_tokens: must be an integer >= 1"),
                "{bad}: {e}"
            );
        }
        let b = with(ok_body(), "max_tokens", json!(u64::MAX));
        assert!(validate(&obj(b), Operation::Messages, true).is_ok());
    }

    #[test]
    fn messages_shape_rules() {
        let cases = [
            (json!(null), "messages: must be an array, got null"),
            (json!("hi"), "messages: must be an array, got a string"),
            (json!([]), "messages: must contain at least one message"),
            (json!(["hi"]), "messages.0: must be an object, got a string"),
            (json!([{"content": "hi"}]), "messages.0.role: field required"),
            (
                json!([{"role": "system", "content": "hi"}]),
                "messages.0.role: must be \"user\" or \"assistant\", got \"system\"",
            ),
            (
                json!([{"role": 1, "content": "hi"}]),
                "messages.0.role: must be \"user\" or \"assistant\", got 1",
            ),
            (json!([{"role": "user"}]), "messages.0.content: field required"),
            (
                json!([{"role": "user", "content": ""}]),
                "messages.0.content: must not be empty",
            ),
            (
                json!([{"role": "user", "content": []}]),
                "messages.0.content: must not be empty",
            ),
            (
                json!([{"role": "user", "content": 5}]),
                "messages.0.content: must be a string or an array of content blocks, got a number",
            ),
            (
                json!([{"role": "user", "content": ["hi"]}]),
                "messages.0.content.0: content block must be an object, got a string",
            ),
            (
                json!([{"role": "user", "content": [{"text": "hi"}]}]),
                "messages.0.content.0.type: field required",
            ),
            (
                json!([{"role": "user", "content": [{"type": 3}]}]),
                "messages.0.content.0.type: must be a string, got a number",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "messages.0.content.0.text: text content blocks need a string \"text\"",
            ),
            (
                json!([{"role": "assistant", "content": "hi"}]),
                "messages.0.role: the first message must use the \"user\" role",
            ),
            (
                json!([
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "assistant", "content": "c"}
                ]),
                "messages.2.role: roles must alternate between \"user\" and \"assistant\", but found multiple \"assistant\" roles in a row",
            ),
            (
                json!([
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"}
                ]),
                "messages.1.role: roles must alternate between \"user\" and \"assistant\", but found multiple \"user\" roles in a row",
            ),
            (
                json!([
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": ""},
                    {"role": "user", "content": "c"}
                ]),
                "messages.1.content: must not be empty",
            ),
        ];
        for (messages, want) in cases {
            for op in [Operation::Messages, Operation::CountTokens] {
                assert_eq!(
                    err(with(ok_body(), "messages", messages.clone()), op, true),
                    want
                );
            }
        }
        let mut b = ok_body();
        b.as_object_mut().unwrap().remove("messages");
        assert_eq!(
            err(b, Operation::Messages, true),
            "messages: field required"
        );
    }

    #[test]
    fn prefill_and_blocks_allowed() {
        for last in [json!("The answer is"), json!(""), json!([])] {
            let b = with(
                ok_body(),
                "messages",
                json!([
                    {"role": "user", "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                        {"type": "text", "text": "what is this?", "cache_control": {"type": "ephemeral"}}
                    ]},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
                    {"role": "assistant", "content": last}
                ]),
            );
            validate(&obj(b), Operation::Messages, true).unwrap();
        }
    }

    #[test]
    fn stream_system_model_rules() {
        for bad in [json!("true"), json!(1), json!(null)] {
            assert!(
                err(with(ok_body(), "stream", bad), Operation::Messages, true)
                    .starts_with("stream: must be a boolean")
            );
        }
        assert!(err(
            with(ok_body(), "system", json!(5)),
            Operation::Messages,
            true
        )
        .starts_with("system: must be a string or an array of text blocks"));
        assert_eq!(
            err(
                with(ok_body(), "system", json!(["x"])),
                Operation::Messages,
                true
            ),
            "system.0: must be a text block object, got a string"
        );
        assert_eq!(
            err(
                with(ok_body(), "system", json!([{"type": "image"}])),
                Operation::Messages,
                true
            ),
            "system.0.type: system blocks must have type \"text\""
        );
        assert_eq!(
            err(
                with(ok_body(), "system", json!([{"type": "text", "text": 1}])),
                Operation::Messages,
                true
            ),
            "system.0.text: must be a string"
        );
        let b = with(
            ok_body(),
            "system",
            json!([{"type": "text", "text": "be nice", "cache_control": {"type": "ephemeral"}}]),
        );
        validate(&obj(b), Operation::Messages, true).unwrap();
        validate(
            &obj(with(ok_body(), "system", json!("s"))),
            Operation::Messages,
            true,
        )
        .unwrap();

        let mut b = ok_body();
        b.as_object_mut().unwrap().remove("model");
        assert_eq!(
            err(b.clone(), Operation::Messages, true),
            "model: field required"
        );
        let s = validate(&obj(b), Operation::Messages, false).unwrap();
        assert_eq!(s.model, None);
        assert_eq!(
            err(
                with(ok_body(), "model", json!("")),
                Operation::Messages,
                true
            ),
            "model: must not be empty"
        );
        assert_eq!(
            err(
                with(ok_body(), "model", json!(7)),
                Operation::CountTokens,
                true
            ),
            "model: must be a string, got a number"
        );
        // Not required: a non-string model is ignored (it is removed before forwarding).
        let s = validate(
            &obj(with(ok_body(), "model", json!(7))),
            Operation::Messages,
            false,
        )
        .unwrap();
        assert_eq!(s.model, None);
    }

    #[test]
    fn unknown_fields_pass() {
        let mut b = ok_body();
        let m = b.as_object_mut().unwrap();
        for (k, v) in [
            ("thinking", json!({"type": "adaptive"})),
            ("output_config", json!({"effort": "high"})),
            ("temperature", json!(7)),
            ("brand_new_field", json!([1, {"x": null}])),
        ] {
            m.insert(k.into(), v);
        }
        validate(&obj(b), Operation::Messages, true).unwrap();
    }

    #[test]
    fn count_tokens_rules() {
        let b = json!({"model": "claude-3-haiku@20240307", "messages": [{"role": "user", "content": "how many tokens?"}]});
        let s = validate(&obj(b.clone()), Operation::CountTokens, true).unwrap();
        assert_eq!(
            s,
            RequestSummary {
                stream: false,
                max_tokens: None,
                model: Some("claude-3-haiku@20240307".into())
            }
        );
        // max_tokens and stream are ignored, whatever they hold.
        let b2 = with(with(b, "max_tokens", json!("lots")), "stream", json!("yes"));
        validate(&obj(b2), Operation::CountTokens, true).unwrap();
    }

    #[test]
    fn vertex_body_messages() {
        let out = to_vertex_body(obj(ok_body()), Operation::Messages, "ignored@1");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], "anthropic_version": "vertex-2023-10-16"})
        );
        // A client's anthropic_version passes through untouched.
        let out = to_vertex_body(
            obj(with(
                ok_body(),
                "anthropic_version",
                json!("vertex-2025-08-04"),
            )),
            Operation::Messages,
            "x",
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["anthropic_version"], "vertex-2025-08-04");
        assert!(v.get("model").is_none());
    }

    #[test]
    fn vertex_body_keeps_the_client_key_order() {
        let b = json!({"model": "m", "max_tokens": 5, "stream": false, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5});
        let out = to_vertex_body(obj(b.clone()), Operation::Messages, "x");
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            r#"{"max_tokens":5,"stream":false,"messages":[{"role":"user","content":"hi"}],"temperature":0.5,"anthropic_version":"vertex-2023-10-16"}"#
        );
        let out = to_vertex_body(obj(b), Operation::CountTokens, "x@1");
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            r#"{"model":"x@1","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"anthropic_version":"vertex-2023-10-16"}"#
        );
    }

    #[test]
    fn vertex_body_count_tokens() {
        let b = json!({"model": "claude-3-haiku-20240307", "max_tokens": 5, "stream": true,
                       "messages": [{"role": "user", "content": "hi"}], "system": "s"});
        let out = to_vertex_body(obj(b), Operation::CountTokens, "claude-3-haiku@20240307");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"model": "claude-3-haiku@20240307", "messages": [{"role": "user", "content": "hi"}],
                   "system": "s", "anthropic_version": "vertex-2023-10-16"})
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<u64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|f| json!(f)),
                prop_oneof![
                    Just("user".to_string()),
                    Just("assistant".to_string()),
                    Just("text".to_string()),
                    Just(String::new()),
                    ".{0,8}"
                ]
                .prop_map(Value::String),
            ];
            leaf.prop_recursive(5, 64, 6, |inner| {
                let key = prop_oneof![
                    Just("role".to_string()),
                    Just("content".to_string()),
                    Just("type".to_string()),
                    Just("text".to_string()),
                    Just("messages".to_string()),
                    Just("max_tokens".to_string()),
                    Just("system".to_string()),
                    Just("stream".to_string()),
                    Just("model".to_string()),
                    "[a-z_]{1,6}",
                ];
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(key, inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                if let Ok(body) = parse_body(&bytes) {
                    for op in [Operation::Messages, Operation::CountTokens] {
                        let _ = validate(&body, op, true);
                        let _ = validate(&body, op, false);
                    }
                }
            }

            #[test]
            fn never_panics_on_json(v in arb_json()) {
                let bytes = serde_json::to_vec(&v).unwrap();
                match parse_body(&bytes) {
                    Ok(body) => {
                        for op in [Operation::Messages, Operation::CountTokens] {
                            for req in [true, false] {
                                if let Ok(s) = validate(&body, op, req) {
                                    // Whatever validates translates to a JSON object with a version.
                                    let out = to_vertex_body(body.clone(), op, "m@1");
                                    let out: Value = serde_json::from_slice(&out).unwrap();
                                    prop_assert!(out.get("anthropic_version").is_some());
                                    prop_assert_eq!(s.stream, op == Operation::Messages && body.get("stream") == Some(&Value::Bool(true)));
                                }
                            }
                        }
                    }
                    Err(e) => prop_assert_eq!(e, RequestError::NotAnObject),
                }
            }

            #[test]
            fn valid_messages_in_message_wrappers(v in arb_json()) {
                let b = json!({"max_tokens": 1, "messages": v});
                let _ = validate(&obj(b), Operation::Messages, false);
            }
        }
    }
}
