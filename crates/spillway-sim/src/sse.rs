//! The `:streamRawPredict` body: Server-Sent Events with Vertex's exact
//! framing and quirks.
//!
//! Each event is `event: <name>\ndata: <one-line JSON>\n\n`. What a parser
//! must survive, and the simulator therefore sends (reference §1.4):
//!
//! * **Padding.** Vertex pads whitespace *inside* the data JSON, before the
//!   final closing brace: `{"type":"message_stop"              }`. Byte
//!   comparisons fail; JSON parsing works.
//! * **`ping`** with a space after the colon: `{"type": "ping"}`, sent
//!   between `message_start` and `content_block_start`.
//! * **`vertex_event`** (when `SimConfig::emit_vertex_event`): an event
//!   outside Anthropic's schema, sent halfway through the text deltas. Strict
//!   clients choke on it; its `usage` is *not* the final usage.
//! * **Usage.** `message_start` carries the input tokens (split into fresh
//!   input, cache writes and cache reads, see `message`) and a small output
//!   count (1..=4); the final `message_delta` carries the cumulative
//!   `{"output_tokens":M}`.
//!
//! The full sequence is `message_start`, `ping`, `content_block_start`, one
//! `content_block_delta` (`text_delta`) per output token (word),
//! `vertex_event` in the middle, `content_block_stop`, `message_delta`,
//! `message_stop`.
//!
//! ## The first-party flavor
//!
//! Anthropic's own Messages API (`POST /v1/messages`, see
//! [`crate::anthropic`]) sends the same events *without* Vertex's quirks,
//! which a plan asks for with [`Flavor::FirstParty`]: no padding, never a
//! `vertex_event`, the `ping` *after* `content_block_start` (the order in
//! Anthropic's documentation), the model id echoed exactly as the request
//! sent it, a `msg_01…` id, and the Message fields in Anthropic's order
//! (`id`, `type`, `role`, `model`, ...).
//!
//! The body is a real `Stream` generated step by step: nothing is buffered
//! ahead of time. Consecutive events with no delay between them are
//! coalesced into one chunk; with a per-token delay, each delta is its own
//! chunk, sent when its time comes. A mid-stream drop yields an I/O error
//! from the body stream after the chosen number of events, which makes the
//! server abort the connection without a `message_stop`.

use std::io;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;

use crate::message::{self, Usage};

/// Padding (spaces before the final `}`) per event type, as recorded from Vertex.
pub mod padding {
    /// `message_start`
    pub const MESSAGE_START: usize = 13;
    /// `content_block_start`
    pub const CONTENT_BLOCK_START: usize = 9;
    /// `content_block_delta`
    pub const CONTENT_BLOCK_DELTA: usize = 3;
    /// `vertex_event`
    pub const VERTEX_EVENT: usize = 2;
    /// `content_block_stop`
    pub const CONTENT_BLOCK_STOP: usize = 3;
    /// `message_delta`
    pub const MESSAGE_DELTA: usize = 1;
    /// `message_stop`
    pub const MESSAGE_STOP: usize = 14;
}

/// Which service's framing a stream reproduces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Flavor {
    /// Vertex's `:streamRawPredict`: padding, `ping` before
    /// `content_block_start`, optional `vertex_event`, `msg_vrtx_` ids and
    /// the model id with `@` turned into `-`.
    #[default]
    Vertex,
    /// Anthropic's `POST /v1/messages`: no padding, `ping` after
    /// `content_block_start`, never `vertex_event`, `msg_01` ids, the model
    /// id as sent.
    FirstParty,
}

/// Everything needed to generate one stream.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    /// Model id: a Vertex id (converted to the Anthropic form in the
    /// events) or, with [`Flavor::FirstParty`], the id as the request sent it.
    pub model: String,
    /// `input_tokens` reported in `message_start` (fresh input only).
    pub input_tokens: u64,
    /// `cache_creation_input_tokens` reported in `message_start`.
    pub cache_creation_input_tokens: u64,
    /// `cache_read_input_tokens` reported in `message_start`.
    pub cache_read_input_tokens: u64,
    /// Of the writes, the 1-hour ones (`usage.cache_creation`, when not 0).
    pub cache_creation_1h_input_tokens: u64,
    /// Output tokens (= text deltas).
    pub output_tokens: u64,
    /// `end_turn` or `max_tokens`.
    pub stop_reason: &'static str,
    /// Whether to send a `vertex_event` mid-stream.
    pub emit_vertex_event: bool,
    /// Delay before the first byte of the body.
    pub first_token_delay: Duration,
    /// Delay between consecutive text deltas.
    pub per_token_delay: Duration,
    /// If set, abort the connection after this many events.
    pub drop_after_events: Option<u32>,
    /// End with an overloaded `event: error` after this many events.
    pub error_after_events: Option<u32>,
    /// Vertex's framing or Anthropic's (see the module docs).
    pub flavor: Flavor,
}

/// How a stream ended, reported once when it is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOutcome {
    /// Text deltas (= output tokens) actually handed to the server.
    pub tokens_sent: u64,
    /// Whether `message_stop` was sent.
    pub completed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    MessageStart,
    Ping,
    BlockStart,
    Delta(u64),
    VertexEvent,
    BlockStop,
    MessageDelta,
    MessageStop,
    Done,
}

/// The number of events a full stream has.
pub fn event_count(plan: &StreamPlan) -> u64 {
    6 + plan.output_tokens + u64::from(plan.vertex_event())
}

impl StreamPlan {
    /// Whether this stream carries a `vertex_event` (never on first-party ones).
    fn vertex_event(&self) -> bool {
        self.emit_vertex_event && self.flavor == Flavor::Vertex
    }

    /// The padding of an event: Vertex's, or none first-party.
    fn pad(&self, vertex_padding: usize) -> usize {
        match self.flavor {
            Flavor::Vertex => vertex_padding,
            Flavor::FirstParty => 0,
        }
    }
}

struct Generator<F: FnOnce(StreamOutcome)> {
    plan: StreamPlan,
    id: String,
    step: Step,
    events_sent: u64,
    tokens_sent: u64,
    started: bool,
    failed: bool,
    on_finish: Option<F>,
}

impl<F: FnOnce(StreamOutcome)> Drop for Generator<F> {
    fn drop(&mut self) {
        if let Some(f) = self.on_finish.take() {
            f(StreamOutcome {
                tokens_sent: self.tokens_sent,
                completed: self.step == Step::Done && !self.failed,
            });
        }
    }
}

impl<F: FnOnce(StreamOutcome)> Generator<F> {
    fn vertex_event_after(&self) -> u64 {
        self.plan.output_tokens / 2
    }

    fn next_step(&self) -> Step {
        let n = self.plan.output_tokens;
        let ve = self.plan.vertex_event();
        let after_deltas = || {
            if ve && self.vertex_event_after() == n {
                Step::VertexEvent
            } else {
                Step::BlockStop
            }
        };
        // What follows the two header events (`ping` and `content_block_start`).
        let first_content = || {
            if ve && self.vertex_event_after() == 0 {
                Step::VertexEvent
            } else if n == 0 {
                Step::BlockStop
            } else {
                Step::Delta(0)
            }
        };
        let first_party = self.plan.flavor == Flavor::FirstParty;
        match self.step {
            Step::MessageStart if first_party => Step::BlockStart,
            Step::MessageStart => Step::Ping,
            Step::BlockStart if first_party => Step::Ping,
            Step::Ping if first_party => first_content(),
            Step::Ping => Step::BlockStart,
            Step::BlockStart => first_content(),
            Step::Delta(i) => {
                if ve && self.vertex_event_after() == i + 1 {
                    Step::VertexEvent
                } else if i + 1 < n {
                    Step::Delta(i + 1)
                } else {
                    after_deltas()
                }
            }
            Step::VertexEvent => {
                let next = self.vertex_event_after();
                if next < n {
                    Step::Delta(next)
                } else {
                    Step::BlockStop
                }
            }
            Step::BlockStop => Step::MessageDelta,
            Step::MessageDelta => Step::MessageStop,
            Step::MessageStop | Step::Done => Step::Done,
        }
    }

    /// Appends the current step's event to `buf`.
    fn write_event(&mut self, buf: &mut BytesMut) {
        match self.step {
            Step::MessageStart => {
                #[derive(serde::Serialize)]
                struct Msg<'a> {
                    model: &'a str,
                    id: &'a str,
                    #[serde(rename = "type")]
                    kind: &'static str,
                    role: &'static str,
                    content: [(); 0],
                    stop_reason: Option<()>,
                    stop_sequence: Option<()>,
                    usage: Usage,
                }
                // Anthropic's own field order (the Vertex one starts with `model`).
                #[derive(serde::Serialize)]
                struct FirstPartyMsg<'a> {
                    id: &'a str,
                    #[serde(rename = "type")]
                    kind: &'static str,
                    role: &'static str,
                    model: &'a str,
                    content: [(); 0],
                    stop_reason: Option<()>,
                    stop_sequence: Option<()>,
                    usage: Usage,
                }
                #[derive(serde::Serialize)]
                struct Start<M> {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    message: M,
                }
                let usage = Usage {
                    input_tokens: self.plan.input_tokens,
                    cache_creation_input_tokens: self.plan.cache_creation_input_tokens,
                    cache_read_input_tokens: self.plan.cache_read_input_tokens,
                    output_tokens: 1 + self.plan.input_tokens % 4,
                    cache_creation: message::CacheCreation::of(
                        self.plan.cache_creation_input_tokens,
                        self.plan.cache_creation_1h_input_tokens,
                    ),
                };
                let json = match self.plan.flavor {
                    Flavor::Vertex => serde_json::to_string(&Start {
                        kind: "message_start",
                        message: Msg {
                            model: &message::anthropic_model_id(&self.plan.model),
                            id: &self.id,
                            kind: "message",
                            role: "assistant",
                            content: [],
                            stop_reason: None,
                            stop_sequence: None,
                            usage,
                        },
                    }),
                    Flavor::FirstParty => serde_json::to_string(&Start {
                        kind: "message_start",
                        message: FirstPartyMsg {
                            id: &self.id,
                            kind: "message",
                            role: "assistant",
                            model: &self.plan.model,
                            content: [],
                            stop_reason: None,
                            stop_sequence: None,
                            usage,
                        },
                    }),
                }
                .unwrap_or_default();
                let pad = self.plan.pad(padding::MESSAGE_START);
                frame(buf, "message_start", &json, pad);
            }
            Step::Ping => frame(buf, "ping", r#"{"type": "ping"}"#, 0),
            Step::BlockStart => frame(
                buf,
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
                self.plan.pad(padding::CONTENT_BLOCK_START),
            ),
            Step::Delta(i) => {
                // The hot path: written straight into the buffer, no temporary
                // string (the words need no JSON escaping).
                let (sep, w) = message::word(i);
                buf.put_slice(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"");
                buf.put_slice(sep.as_bytes());
                buf.put_slice(w.as_bytes());
                buf.put_slice(b"\"}");
                buf.put_bytes(b' ', self.plan.pad(padding::CONTENT_BLOCK_DELTA));
                buf.put_slice(b"}\n\n");
                self.tokens_sent += 1;
            }
            Step::VertexEvent => {
                let json = format!(
                    r#"{{"type":"vertex_event","usage":{{"input_tokens":{},"output_tokens":{}}}}}"#,
                    self.plan.input_tokens, self.tokens_sent
                );
                frame(buf, "vertex_event", &json, padding::VERTEX_EVENT);
            }
            Step::BlockStop => frame(
                buf,
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
                self.plan.pad(padding::CONTENT_BLOCK_STOP),
            ),
            Step::MessageDelta => {
                let json = format!(
                    r#"{{"type":"message_delta","delta":{{"stop_reason":"{}","stop_sequence":null}},"usage":{{"output_tokens":{}}}}}"#,
                    self.plan.stop_reason, self.plan.output_tokens
                );
                let pad = self.plan.pad(padding::MESSAGE_DELTA);
                frame(buf, "message_delta", &json, pad);
            }
            Step::MessageStop => frame(
                buf,
                "message_stop",
                r#"{"type":"message_stop"}"#,
                self.plan.pad(padding::MESSAGE_STOP),
            ),
            Step::Done => {}
        }
        self.events_sent += 1;
        self.step = self.next_step();
    }

    /// Produces the next body chunk (or the drop error, or the end).
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.step == Step::Done || self.failed {
            return None;
        }
        if !self.started {
            self.started = true;
            sleep(self.plan.first_token_delay).await;
        } else if matches!(self.step, Step::Delta(i) if i > 0) {
            sleep(self.plan.per_token_delay).await;
        }
        let drop_at = self.plan.drop_after_events.map(u64::from);
        if drop_at.is_some_and(|d| self.events_sent >= d) {
            if self.events_sent > 0 {
                // Let the server flush the events already handed over before
                // the error aborts the connection (hyper drops unflushed
                // bytes when a body fails).
                sleep(Duration::from_millis(5)).await;
            }
            self.failed = true;
            return Some(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "simulated mid-stream connection drop",
            )));
        }
        let mut buf = BytesMut::with_capacity(512);
        let error_at = self.plan.error_after_events.map(u64::from);
        if error_at.is_some_and(|e| self.events_sent >= e) {
            // The usage seen so far stands; the answer ends here, cleanly.
            self.failed = true;
            frame(
                &mut buf,
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                0,
            );
            return Some(Ok(buf.freeze()));
        }
        loop {
            self.write_event(&mut buf);
            let next_needs_delay = matches!(self.step, Step::Delta(i) if i > 0)
                && !self.plan.per_token_delay.is_zero();
            if self.step == Step::Done
                || next_needs_delay
                || drop_at.is_some_and(|d| self.events_sent >= d)
                || error_at.is_some_and(|e| self.events_sent >= e)
                || buf.len() >= 16 * 1024
            {
                break;
            }
        }
        Some(Ok(buf.freeze()))
    }
}

async fn sleep(d: Duration) {
    if d == Duration::MAX {
        std::future::pending::<()>().await;
    } else if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Writes one SSE event; `json` must end with `}` and gets `pad` spaces
/// inserted before that brace.
pub fn frame(buf: &mut BytesMut, event: &str, json: &str, pad: usize) {
    buf.put_slice(b"event: ");
    buf.put_slice(event.as_bytes());
    buf.put_slice(b"\ndata: ");
    match json.strip_suffix('}') {
        Some(head) if pad > 0 => {
            buf.put_slice(head.as_bytes());
            buf.put_bytes(b' ', pad);
            buf.put_u8(b'}');
        }
        _ => buf.put_slice(json.as_bytes()),
    }
    buf.put_slice(b"\n\n");
}

/// The event stream for `plan`. `on_finish` runs exactly once, when the
/// stream is dropped (completed, aborted, or abandoned by the client).
pub fn event_stream<F>(
    plan: StreamPlan,
    on_finish: F,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    F: FnOnce(StreamOutcome) + Send + 'static,
{
    let id = match plan.flavor {
        Flavor::Vertex => message::message_id(),
        Flavor::FirstParty => message::first_party_message_id(),
    };
    let gen = Generator {
        plan,
        id,
        step: Step::MessageStart,
        events_sent: 0,
        tokens_sent: 0,
        started: false,
        failed: false,
        on_finish: Some(on_finish),
    };
    futures::stream::unfold(gen, |mut gen| async move {
        let item = gen.next_chunk().await?;
        Some((item, gen))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};

    fn plan(n: u64, vertex_event: bool) -> StreamPlan {
        StreamPlan {
            model: "claude-3-7-sonnet@20250219".into(),
            input_tokens: 16,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            cache_creation_1h_input_tokens: 0,
            output_tokens: n,
            stop_reason: "end_turn",
            emit_vertex_event: vertex_event,
            first_token_delay: Duration::ZERO,
            per_token_delay: Duration::ZERO,
            drop_after_events: None,
            error_after_events: None,
            flavor: Flavor::Vertex,
        }
    }

    async fn collect(p: StreamPlan) -> (String, Vec<usize>, StreamOutcome, bool) {
        let outcome = Arc::new(Mutex::new(None));
        let o2 = outcome.clone();
        let s = event_stream(p, move |o| *o2.lock().unwrap() = Some(o));
        let items: Vec<_> = s.collect().await;
        let mut text = String::new();
        let mut sizes = Vec::new();
        let mut errored = false;
        for i in items {
            match i {
                Ok(b) => {
                    sizes.push(b.len());
                    text.push_str(std::str::from_utf8(&b).unwrap());
                }
                Err(_) => errored = true,
            }
        }
        let o = outcome.lock().unwrap().unwrap();
        (text, sizes, o, errored)
    }

    #[tokio::test]
    async fn exact_framing() {
        let (text, _, outcome, errored) = collect(plan(2, true)).await;
        assert!(!errored);
        assert_eq!(
            outcome,
            StreamOutcome {
                tokens_sent: 2,
                completed: true
            }
        );
        // Replace the random id for comparison.
        let start = text.find("msg_vrtx_").unwrap();
        let text = format!("{}msg_vrtx_X{}", &text[..start], &text[start + 33..]);
        let expected = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-7-sonnet-20250219\",\"id\":\"msg_vrtx_X\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":16,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}             }\n\n",
            "event: ping\n",
            "data: {\"type\": \"ping\"}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}         }\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lorem\"}   }\n\n",
            "event: vertex_event\n",
            "data: {\"type\":\"vertex_event\",\"usage\":{\"input_tokens\":16,\"output_tokens\":1}  }\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" ipsum\"}   }\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0   }\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2} }\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"              }\n\n",
        );
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn every_event_is_valid_json_matching_its_name() {
        for n in [1, 2, 3, 10] {
            for ve in [false, true] {
                let (text, _, _, _) = collect(plan(n, ve)).await;
                let events: Vec<&str> = text.split_terminator("\n\n").collect();
                let p = plan(n, ve);
                assert_eq!(events.len() as u64, event_count(&p));
                for ev in &events {
                    let (name, data) = ev.split_once('\n').unwrap();
                    let name = name.strip_prefix("event: ").unwrap();
                    let v: serde_json::Value =
                        serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                    assert_eq!(v["type"], name);
                }
                let deltas = events.iter().filter(|e| e.contains("text_delta")).count();
                assert_eq!(deltas as u64, n);
                assert_eq!(text.matches("vertex_event").count(), if ve { 2 } else { 0 });
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn per_token_delay_makes_one_chunk_per_delta() {
        let mut p = plan(4, false);
        p.per_token_delay = Duration::from_millis(100);
        p.first_token_delay = Duration::from_secs(1);
        let t0 = tokio::time::Instant::now();
        let (_, sizes, _, _) = collect(p).await;
        // Header events + first delta, then 3 delayed deltas (the last one
        // carries the closing events).
        assert_eq!(sizes.len(), 4);
        assert_eq!(t0.elapsed(), Duration::from_millis(1300));
    }

    #[tokio::test(start_paused = true)]
    async fn drop_mid_stream_errors_without_message_stop() {
        let mut p = plan(5, true);
        p.drop_after_events = Some(5);
        let (text, _, outcome, errored) = collect(p).await;
        assert!(errored);
        assert!(!text.contains("message_stop"));
        assert_eq!(text.matches("event: ").count(), 5);
        assert_eq!(
            outcome,
            StreamOutcome {
                tokens_sent: 2,
                completed: false
            }
        );
    }

    #[tokio::test]
    async fn first_party_framing_has_no_vertex_quirks() {
        let mut p = plan(2, true);
        p.flavor = Flavor::FirstParty;
        p.model = "claude-3-haiku-20240307".into();
        assert_eq!(event_count(&p), 8);
        let (text, _, outcome, errored) = collect(p).await;
        assert!(!errored && outcome.completed);
        let start = text.find("msg_01").unwrap();
        let text = format!("{}msg_X{}", &text[..start], &text[start + 28..]);
        let expected = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_X\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-3-haiku-20240307\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":16,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: ping\n",
            "data: {\"type\": \"ping\"}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lorem\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" ipsum\"}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(text, expected);
        for n in [0, 1, 5] {
            let mut p = plan(n, true);
            p.flavor = Flavor::FirstParty;
            let (text, _, _, _) = collect(p.clone()).await;
            assert_eq!(
                text.split_terminator("\n\n").count() as u64,
                event_count(&p)
            );
            assert!(!text.contains("vertex_event") && !text.contains("  }"));
        }
    }
}
