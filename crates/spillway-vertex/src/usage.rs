//! Token usage, from unary responses and side-parsed from SSE streams.
//!
//! A unary Message carries `usage: {input_tokens, output_tokens, cache_creation_input_tokens,
//! cache_read_input_tokens, ...}` (reference §1.3); total input is
//! `input + cache_creation + cache_read`. Newer answers split the cache writes by TTL in
//! `usage.cache_creation: {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`; the 1-hour
//! part is kept ([`Usage::cache_creation_1h_input_tokens`]) because it is billed at another price.
//!
//! In a stream (§1.4), `message_start.message.usage` carries the input (and cache) counts plus a
//! small provisional `output_tokens`; each later `message_delta.usage` is **cumulative**, and newer
//! API versions may repeat `input_tokens`/`cache_*` there. Rule: start from `message_start`, then let
//! every field present in a later `message_delta.usage` overwrite.
//!
//! Vertex quirks the parser tolerates: JSON padded with spaces before the closing brace
//! (`{"type":"message_stop"              }`), non-canonical spacing (`{"type": "ping"}`), `ping`
//! anywhere, unknown event types, and Vertex's own `vertex_event` (which strict clients choke on;
//! see [`is_vertex_event`]). An `event: error` after the 200 is recorded, not fatal here.
//!
//! Only `message_start`, `message_delta` and `error` are JSON-parsed (`message_stop` needs no
//! parse); deltas, which are most of the stream, are skipped by name.
//!
//! The same parses read why the model stopped ([`StopReason`]): a unary Message's top-level
//! `stop_reason`, or `delta.stop_reason` of a stream's `message_delta` (the last one present
//! wins). Traces report it as `gen_ai.response.finish_reasons`.

use serde::Deserialize;
use serde_json::Value;

use crate::sse::SseEvent;

/// Token counts for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens written to the prompt cache.
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read_input_tokens: u64,
    /// Of `cache_creation_input_tokens`, those written with the 1-hour TTL
    /// (`usage.cache_creation.ephemeral_1h_input_tokens`; 0 when the answer
    /// does not split its writes, which then all have the 5-minute TTL).
    pub cache_creation_1h_input_tokens: u64,
}

impl Usage {
    /// `input_tokens + cache_creation_input_tokens + cache_read_input_tokens`.
    pub fn total_input(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }

    /// Total input plus output.
    pub fn total(&self) -> u64 {
        self.total_input().saturating_add(self.output_tokens)
    }

    /// Cache writes with the 5-minute TTL: the writes not reported as 1-hour ones.
    pub fn cache_creation_5m_input_tokens(&self) -> u64 {
        self.cache_creation_input_tokens
            .saturating_sub(self.cache_creation_1h_input_tokens)
    }
}

/// Why the model stopped writing: Anthropic's `stop_reason`. Known values are kept as
/// themselves; anything newer is [`StopReason::Other`], so the set stays small and `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
    PauseTurn,
    Refusal,
    ModelContextWindowExceeded,
    /// A value this parser does not know (reported as `other`).
    Other,
}

impl StopReason {
    /// The reason as Anthropic spells it (`other` for an unknown one).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EndTurn => "end_turn",
            Self::MaxTokens => "max_tokens",
            Self::StopSequence => "stop_sequence",
            Self::ToolUse => "tool_use",
            Self::PauseTurn => "pause_turn",
            Self::Refusal => "refusal",
            Self::ModelContextWindowExceeded => "model_context_window_exceeded",
            Self::Other => "other",
        }
    }

    /// The reason named by a wire value.
    pub fn from_wire(value: &str) -> Self {
        match value {
            "end_turn" => Self::EndTurn,
            "max_tokens" => Self::MaxTokens,
            "stop_sequence" => Self::StopSequence,
            "tool_use" => Self::ToolUse,
            "pause_turn" => Self::PauseTurn,
            "refusal" => Self::Refusal,
            "model_context_window_exceeded" => Self::ModelContextWindowExceeded,
            _ => Self::Other,
        }
    }

    /// A `stop_reason` field: `None` when absent, `null` or not a string.
    fn from_field(value: Option<&Value>) -> Option<Self> {
        value.and_then(Value::as_str).map(Self::from_wire)
    }
}

/// What a unary Message body says about its end: its usage and its stop reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageEnd {
    /// `None` if the body is unparseable or has no `usage` object.
    pub usage: Option<Usage>,
    pub stop_reason: Option<StopReason>,
}

/// Usage fields as they appear on the wire; each optional and lenient (a non-integer is ignored).
#[derive(Deserialize, Default)]
struct WireUsage {
    input_tokens: Option<Value>,
    output_tokens: Option<Value>,
    cache_creation_input_tokens: Option<Value>,
    cache_read_input_tokens: Option<Value>,
    /// `{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`: the writes by TTL.
    cache_creation: Option<Value>,
}

impl WireUsage {
    /// Overwrites each field of `u` that is present (as a non-negative integer) here.
    fn apply(&self, u: &mut Usage) {
        let set = |dst: &mut u64, src: &Option<Value>| {
            if let Some(v) = src.as_ref().and_then(Value::as_u64) {
                *dst = v;
            }
        };
        set(&mut u.input_tokens, &self.input_tokens);
        set(&mut u.output_tokens, &self.output_tokens);
        set(
            &mut u.cache_creation_input_tokens,
            &self.cache_creation_input_tokens,
        );
        set(
            &mut u.cache_read_input_tokens,
            &self.cache_read_input_tokens,
        );
        if let Some(v) = self
            .cache_creation
            .as_ref()
            .and_then(|split| split.get("ephemeral_1h_input_tokens"))
            .and_then(Value::as_u64)
        {
            u.cache_creation_1h_input_tokens = v;
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<WireUsage>,
    /// A unary Message's `stop_reason` (lenient: any JSON).
    #[serde(default)]
    stop_reason: Option<Value>,
}

/// A stream's `message_delta`: cumulative usage and, in `delta`, the stop reason.
#[derive(Deserialize)]
struct MessageDelta {
    usage: Option<WireUsage>,
    #[serde(default)]
    delta: Option<DeltaStop>,
}

#[derive(Deserialize)]
struct DeltaStop {
    #[serde(default)]
    stop_reason: Option<Value>,
}

#[derive(Deserialize)]
struct MessageStart {
    message: Option<WithUsage>,
}

#[derive(Deserialize)]
struct ErrorEvent {
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    ty: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    ty: Option<String>,
}

/// Usage from a unary Message body; `None` if the body is unparseable or has no `usage` object.
pub fn usage_from_message_body(body: &[u8]) -> Option<Usage> {
    message_end_from_body(body).usage
}

/// Usage and stop reason from a unary Message body, in one parse.
pub fn message_end_from_body(body: &[u8]) -> MessageEnd {
    let Ok(parsed) = serde_json::from_slice::<WithUsage>(body) else {
        return MessageEnd::default();
    };
    MessageEnd {
        usage: parsed.usage.map(|wire| {
            let mut u = Usage::default();
            wire.apply(&mut u);
            u
        }),
        stop_reason: StopReason::from_field(parsed.stop_reason.as_ref()),
    }
}

/// The data's JSON `type`, for events without an `event:` name.
fn data_type(data: &str) -> Option<String> {
    serde_json::from_str::<TypeOnly>(data).ok()?.ty
}

/// True for Vertex's own `vertex_event` (event name `vertex_event`, or data whose JSON `type` is
/// `vertex_event`). Gateways usually drop it: strict clients reject unknown event types.
pub fn is_vertex_event(ev: &SseEvent) -> bool {
    if ev.event.as_deref() == Some("vertex_event") {
        return true;
    }
    // Cheap substring filter before parsing anything.
    ev.data.contains("vertex_event") && data_type(&ev.data).as_deref() == Some("vertex_event")
}

/// Accumulates usage across a stream.
#[derive(Debug, Default, Clone)]
pub struct StreamUsage {
    usage: Usage,
    saw_start: bool,
    completed: bool,
    stop_reason: Option<StopReason>,
    error: Option<(String, String)>,
}

impl StreamUsage {
    /// A fresh accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Updates the totals from one event. Never fails: malformed data is ignored.
    pub fn observe(&mut self, ev: &SseEvent) {
        let peeked;
        let name = match ev.event.as_deref() {
            Some(n) => n,
            None if ev.data.is_empty() => return,
            None => {
                peeked = data_type(&ev.data);
                match peeked.as_deref() {
                    Some(t) => t,
                    None => return,
                }
            }
        };
        match name {
            "message_start" => {
                if let Ok(start) = serde_json::from_str::<MessageStart>(&ev.data) {
                    self.saw_start = true;
                    if let Some(wire) = start.message.and_then(|m| m.usage) {
                        let mut u = Usage::default();
                        wire.apply(&mut u);
                        self.usage = u;
                    }
                }
            }
            "message_delta" => {
                if let Ok(delta) = serde_json::from_str::<MessageDelta>(&ev.data) {
                    if let Some(wire) = delta.usage {
                        wire.apply(&mut self.usage);
                    }
                    let stop = delta.delta.and_then(|d| d.stop_reason);
                    if let Some(reason) = StopReason::from_field(stop.as_ref()) {
                        self.stop_reason = Some(reason);
                    }
                }
            }
            "message_stop" => self.completed = true,
            "error" => {
                let detail = serde_json::from_str::<ErrorEvent>(&ev.data)
                    .ok()
                    .and_then(|e| e.error);
                let (ty, message) = match detail {
                    Some(d) => (d.ty, d.message),
                    None => (None, None),
                };
                self.error = Some((
                    ty.unwrap_or_else(|| "api_error".to_owned()),
                    message.unwrap_or_default(),
                ));
            }
            _ => {} // ping, content_block_*, vertex_event, future event types
        }
    }

    /// The usage so far (final once the stream completed).
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// True once a parseable `message_start` was seen.
    pub fn saw_message_start(&self) -> bool {
        self.saw_start
    }

    /// True once `message_stop` was seen.
    pub fn completed(&self) -> bool {
        self.completed
    }

    /// The stop reason of the last `message_delta` that carried one.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason
    }

    /// The in-stream error's `(type, message)`, if one arrived. A malformed error event is
    /// reported as `("api_error", "")`.
    pub fn error(&self) -> Option<(String, String)> {
        self.error.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
            raw: Bytes::new(),
        }
    }

    #[test]
    fn totals() {
        let u = Usage {
            input_tokens: 10,
            output_tokens: 5,
            cache_creation_input_tokens: 3,
            cache_read_input_tokens: 2,
            cache_creation_1h_input_tokens: 1,
        };
        assert_eq!(u.total_input(), 15);
        assert_eq!(u.cache_creation_5m_input_tokens(), 2);
        assert_eq!(u.total(), 20);
        let big = Usage {
            input_tokens: u64::MAX,
            output_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(big.total(), u64::MAX);
    }

    #[test]
    fn unary_body() {
        let body = r#"{"model":"claude-3-7-sonnet-20250219","id":"msg_vrtx_01RTPizSndQfkUH6eWrcFtk8","type":"message","role":"assistant",
 "content":[{"type":"text","text":"Olá! ..."}],"stop_reason":"end_turn","stop_sequence":null,
 "usage":{"input_tokens":16,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":24}}"#;
        assert_eq!(
            usage_from_message_body(body.as_bytes()),
            Some(Usage {
                input_tokens: 16,
                output_tokens: 24,
                ..Usage::default()
            })
        );
        assert_eq!(usage_from_message_body(b"{\"type\":\"message\"}"), None);
        assert_eq!(usage_from_message_body(b"not json"), None);
        assert_eq!(usage_from_message_body(b"[]"), None);
        // Cache writes split by TTL: the 1-hour part is kept.
        assert_eq!(
            usage_from_message_body(
                br#"{"usage":{"input_tokens":5,"cache_creation_input_tokens":30,"cache_creation":{"ephemeral_5m_input_tokens":10,"ephemeral_1h_input_tokens":20},"output_tokens":2}}"#
            ),
            Some(Usage {
                input_tokens: 5,
                output_tokens: 2,
                cache_creation_input_tokens: 30,
                cache_creation_1h_input_tokens: 20,
                ..Usage::default()
            })
        );
        // Extra and odd fields are tolerated.
        assert_eq!(
            usage_from_message_body(
                br#"{"usage":{"input_tokens":5,"output_tokens":1.5,"server_tool_use":{"web_search_requests":1}}}"#
            ),
            Some(Usage {
                input_tokens: 5,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn delta_overwrites_cumulatively() {
        let mut s = StreamUsage::new();
        s.observe(&ev(Some("message_start"), r#"{"type":"message_start","message":{"usage":{"input_tokens":100,"cache_creation_input_tokens":7,"cache_read_input_tokens":9,"output_tokens":1}}}"#));
        s.observe(&ev(
            Some("message_delta"),
            r#"{"type":"message_delta","usage":{"output_tokens":10}}"#,
        ));
        s.observe(&ev(
            Some("message_delta"),
            r#"{"type":"message_delta","usage":{"output_tokens":25,"input_tokens":120}}"#,
        ));
        assert_eq!(
            s.usage(),
            Usage {
                input_tokens: 120,
                output_tokens: 25,
                cache_creation_input_tokens: 7,
                cache_read_input_tokens: 9,
                cache_creation_1h_input_tokens: 0,
            }
        );
        assert!(s.saw_message_start());
        assert!(!s.completed());
    }

    #[test]
    fn stop_reasons_from_bodies_and_deltas() {
        let body =
            br#"{"type":"message","content":[],"stop_reason":"end_turn","stop_sequence":null,
 "usage":{"input_tokens":16,"output_tokens":24}}"#;
        let end = message_end_from_body(body);
        assert_eq!(end.stop_reason, Some(StopReason::EndTurn));
        assert_eq!(end.usage.map(|u| u.output_tokens), Some(24));
        // Absent, null, odd or unknown values.
        assert_eq!(message_end_from_body(br#"{"usage":{}}"#).stop_reason, None);
        assert_eq!(
            message_end_from_body(br#"{"stop_reason":null}"#).stop_reason,
            None
        );
        assert_eq!(
            message_end_from_body(br#"{"stop_reason":7}"#).stop_reason,
            None
        );
        assert_eq!(
            message_end_from_body(br#"{"stop_reason":"something_new"}"#),
            MessageEnd {
                usage: None,
                stop_reason: Some(StopReason::Other)
            }
        );
        assert_eq!(message_end_from_body(b"not json"), MessageEnd::default());
        for reason in [
            StopReason::EndTurn,
            StopReason::MaxTokens,
            StopReason::StopSequence,
            StopReason::ToolUse,
            StopReason::PauseTurn,
            StopReason::Refusal,
            StopReason::ModelContextWindowExceeded,
        ] {
            assert_eq!(StopReason::from_wire(reason.as_str()), reason);
        }

        let mut s = StreamUsage::new();
        s.observe(&ev(Some("message_start"), r#"{"type":"message_start","message":{"stop_reason":null,"usage":{"input_tokens":3,"output_tokens":1}}}"#));
        assert_eq!(s.stop_reason(), None);
        s.observe(&ev(
            Some("message_delta"),
            r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"output_tokens":5}}"#,
        ));
        assert_eq!(s.stop_reason(), Some(StopReason::MaxTokens));
        // A later delta without one keeps it; Vertex's padded JSON parses too.
        s.observe(&ev(
            None,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":6}}          "#,
        ));
        assert_eq!(s.stop_reason(), Some(StopReason::MaxTokens));
        assert_eq!(s.usage().output_tokens, 6);
    }

    #[test]
    fn nameless_events_are_peeked() {
        let mut s = StreamUsage::new();
        s.observe(&ev(None, r#"{"type":"message_start","message":{"usage":{"input_tokens":3,"output_tokens":1}}   }"#));
        s.observe(&ev(
            None,
            r#"{"type": "message_delta", "usage": {"output_tokens": 4}}"#,
        ));
        s.observe(&ev(None, ""));
        s.observe(&ev(None, "not json"));
        s.observe(&ev(None, r#"{"type":"message_stop"}"#));
        assert_eq!(s.usage().input_tokens, 3);
        assert_eq!(s.usage().output_tokens, 4);
        assert!(s.completed());
    }

    #[test]
    fn errors_recorded() {
        let mut s = StreamUsage::new();
        s.observe(&ev(
            Some("error"),
            r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
        ));
        assert_eq!(
            s.error(),
            Some(("overloaded_error".to_owned(), "Overloaded".to_owned()))
        );
        let mut s = StreamUsage::new();
        s.observe(&ev(Some("error"), "garbage"));
        assert_eq!(s.error(), Some(("api_error".to_owned(), String::new())));
        assert_eq!(StreamUsage::new().error(), None);
    }

    #[test]
    fn ignores_noise() {
        let mut s = StreamUsage::new();
        s.observe(&ev(Some("ping"), r#"{"type": "ping"}"#));
        s.observe(&ev(
            Some("vertex_event"),
            r#"{"type":"vertex_event","usage":{"output_tokens":999}}"#,
        ));
        s.observe(&ev(
            Some("future_thing"),
            r#"{"type":"future_thing","usage":{"output_tokens":999}}"#,
        ));
        s.observe(&ev(Some("message_delta"), "{not json"));
        s.observe(&ev(Some("message_start"), "{not json"));
        assert_eq!(s.usage(), Usage::default());
        assert!(!s.saw_message_start());
    }

    #[test]
    fn vertex_event_detection() {
        assert!(is_vertex_event(&ev(Some("vertex_event"), "{}")));
        assert!(is_vertex_event(&ev(
            None,
            r#"{"type": "vertex_event", "x": 1}"#
        )));
        assert!(!is_vertex_event(&ev(
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"vertex_event"}}"#
        )));
        assert!(!is_vertex_event(&ev(Some("ping"), r#"{"type": "ping"}"#)));
        assert!(!is_vertex_event(&ev(None, "")));
    }
}
