//! Target `sse`: the incremental framer (`SseSplitter`) and the usage read
//! beside it (`StreamUsage`, `usage_from_message_body`).
//!
//! The gateway forwards a stream's bytes unchanged and parses them on the
//! side, chunk by chunk as the network cuts them, so the properties are
//! about cuts: for any bytes and any cuts, the events (names, data, raw
//! bytes), the unterminated tail and the usage are exactly those of the
//! whole stream fed at once, and byte by byte; the events' raw bytes plus
//! the tail are the stream, byte for byte; no event over the size cap is
//! ever returned, the pending buffer never holds more than the cap, and a
//! splitter that refused stays refused (whether it refuses does not depend
//! on the cuts either). Streams built from Vertex's events — with its
//! quirks: padding before a closing brace, nameless events, `vertex_event`,
//! pings, comments, any of the three line endings — must also report the
//! usage they carry.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestCaseResult};
use serde_json::{json, Value};
use spillway_vertex::{
    is_vertex_event, usage_from_message_body, SseEvent, SseSplitter, StreamUsage, Usage,
};

use crate::harness::{self, ensure, header, split_header, with_header, Fuzz};
use crate::inputs::{arb_json, mutated, odd_text};

const TARGET: &str = "sse";
const DEFAULT_CAP: usize = 1 << 16;

/// A stream, where the network cut it, and the splitter's cap.
#[derive(Debug, Clone)]
pub struct Cut {
    stream: Vec<u8>,
    cuts: Vec<usize>,
    cap: usize,
    /// The usage the stream carries, when it was built to carry one.
    usage: Option<Usage>,
}

/// What feeding a stream produced.
#[derive(Debug, PartialEq)]
struct Fed {
    events: Vec<SseEvent>,
    tail: Option<Bytes>,
    refused: bool,
}

fn feed(chunks: &[&[u8]], cap: usize) -> Result<Fed, TestCaseError> {
    let mut s = SseSplitter::new(cap);
    let mut events = Vec::new();
    for chunk in chunks {
        match s.push(chunk) {
            Ok(evs) => {
                for ev in &evs {
                    ensure(ev.raw.len() <= cap, || {
                        format!("an event of {} bytes over a cap of {cap}", ev.raw.len())
                    })?;
                }
                events.extend(evs);
                ensure(s.pending_len() <= cap, || {
                    format!("{} pending bytes over a cap of {cap}", s.pending_len())
                })?;
            }
            Err(_) => {
                ensure(s.push(b"\n\n").is_err() && s.push(b"").is_err(), || {
                    "a refused splitter accepted more".into()
                })?;
                ensure(s.finish().is_none(), || {
                    "a refused splitter kept bytes".into()
                })?;
                return Ok(Fed {
                    events,
                    tail: None,
                    refused: true,
                });
            }
        }
    }
    Ok(Fed {
        events,
        tail: s.finish(),
        refused: false,
    })
}

fn usage_of(events: &[SseEvent]) -> (Usage, bool, bool, Option<(String, String)>) {
    let mut u = StreamUsage::new();
    for ev in events {
        let _ = is_vertex_event(ev);
        u.observe(ev);
    }
    (u.usage(), u.saw_message_start(), u.completed(), u.error())
}

fn check(input: &Cut) -> TestCaseResult {
    let Cut {
        stream,
        cuts,
        cap,
        usage,
    } = input;
    let whole = feed(&[stream], *cap)?;
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut sorted: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    sorted.sort_unstable();
    for c in sorted {
        pieces.push(&stream[at..c]);
        at = c;
    }
    pieces.push(&stream[at..]);
    let cut = feed(&pieces, *cap)?;
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let one_by_one = feed(&bytes, *cap)?;
    ensure(
        whole.refused == cut.refused && whole.refused == one_by_one.refused,
        || {
            format!(
                "refusal depends on the cuts: whole {}, cut {}, byte by byte {}",
                whole.refused, cut.refused, one_by_one.refused
            )
        },
    )?;
    if whole.refused {
        return Ok(());
    }
    ensure(cut == whole, || {
        format!("cut {cuts:?} changed the events:\n{:?}\n{:?}", cut, whole)
    })?;
    ensure(one_by_one == whole, || {
        format!("byte by byte changed the events:\n{one_by_one:?}\n{whole:?}")
    })?;
    let mut relayed: Vec<u8> = whole
        .events
        .iter()
        .flat_map(|e| e.raw.iter().copied())
        .collect();
    relayed.extend(whole.tail.iter().flat_map(|t| t.iter().copied()));
    ensure(relayed == *stream, || {
        "the events' bytes are not the stream".into()
    })?;
    let seen = usage_of(&whole.events);
    ensure(usage_of(&cut.events) == seen, || {
        "usage depends on the cuts".into()
    })?;
    if let Some(want) = usage {
        ensure(seen.0 == *want, || {
            format!("usage {:?}, the stream carries {want:?}", seen.0)
        })?;
        ensure(seen.1, || "message_start not seen".into())?;
        ensure(seen.2 || whole.tail.is_some(), || {
            "message_stop not seen".into()
        })?;
    }
    Ok(())
}

fn encode(input: &Cut) -> Vec<u8> {
    let mut pairs = vec![
        ("cap", input.cap.to_string()),
        (
            "cuts",
            input
                .cuts
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
    ];
    if let Some(u) = input.usage {
        let n = [
            u.input_tokens,
            u.output_tokens,
            u.cache_creation_input_tokens,
            u.cache_read_input_tokens,
        ];
        pairs.push(("usage", n.map(|x| x.to_string()).join(",")));
    }
    with_header(&pairs, &input.stream)
}

fn decode(bytes: &[u8]) -> Cut {
    let (pairs, stream) = split_header(bytes);
    let list = |key: &str| -> Vec<u64> {
        header::<String>(&pairs, key)
            .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default()
    };
    let usage = Some(list("usage")).filter(|u| u.len() == 4).map(|u| Usage {
        input_tokens: u[0],
        output_tokens: u[1],
        cache_creation_input_tokens: u[2],
        cache_read_input_tokens: u[3],
        cache_creation_1h_input_tokens: 0,
    });
    Cut {
        stream: stream.to_vec(),
        cuts: list("cuts").into_iter().map(|c| c as usize).collect(),
        cap: header(&pairs, "cap").unwrap_or(DEFAULT_CAP),
        usage,
    }
}

/// Usage fields as a stream may carry them: any subset, each a count or
/// something that is not one (and must be ignored).
fn wire_usage() -> impl Strategy<Value = Vec<(usize, Value)>> {
    let value = prop_oneof![
        6 => (0u64..100_000).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => prop::sample::select(vec![json!(-1), json!(1.5), json!("12"), json!(null), json!([1])]),
    ];
    prop::collection::vec((0usize..4, value), 0..5)
}

const USAGE_KEYS: [&str; 4] = [
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
];

fn apply(u: &mut Usage, fields: &[(usize, Value)]) -> Value {
    let mut object = serde_json::Map::new();
    for (i, v) in fields {
        object.insert(USAGE_KEYS[*i].into(), v.clone());
    }
    for (key, v) in &object {
        if let Some(n) = v.as_u64() {
            let slot = match key.as_str() {
                "input_tokens" => &mut u.input_tokens,
                "output_tokens" => &mut u.output_tokens,
                "cache_creation_input_tokens" => &mut u.cache_creation_input_tokens,
                _ => &mut u.cache_read_input_tokens,
            };
            *slot = n;
        }
    }
    Value::Object(object)
}

/// One event's JSON in Vertex's forms: canonical, spaced, or padded.
fn styled(data: &Value, style: u8) -> String {
    let compact = data.to_string();
    match style % 3 {
        0 => compact,
        1 => compact.replace("\":", "\": ").replace(",\"", ", \""),
        _ => format!(
            "{}{}}}",
            &compact[..compact.len() - 1],
            " ".repeat(usize::from(style))
        ),
    }
}

#[derive(Debug, Clone)]
enum Piece {
    Delta(String),
    Ping,
    VertexEvent,
    Comment(String),
    Usage(Vec<(usize, Value)>),
    Unknown(Value),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => odd_text().prop_map(Piece::Delta),
        1 => Just(Piece::Ping),
        1 => Just(Piece::VertexEvent),
        1 => "[ -~]{0,20}".prop_map(Piece::Comment),
        2 => wire_usage().prop_map(Piece::Usage),
        1 => arb_json().prop_map(Piece::Unknown),
    ]
}

/// A stream as Vertex sends one, with the usage it carries.
fn vertex_stream() -> impl Strategy<Value = Cut> {
    (
        wire_usage(),
        prop::collection::vec((piece(), any::<u8>(), any::<bool>()), 0..12),
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
        prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    )
        .prop_map(|(start, pieces, eol, cuts)| {
            let mut usage = Usage::default();
            let mut out = String::new();
            let event = |name: Option<&str>, data: &str, out: &mut String| {
                if let Some(n) = name {
                    out.push_str(&format!("event: {n}{eol}"));
                }
                out.push_str(&format!("data: {data}{eol}{eol}"));
            };
            let start_usage = apply(&mut usage, &start);
            let start = json!({"type": "message_start", "message": {"id": "msg_vrtx_1", "type": "message", "role": "assistant", "content": [], "usage": start_usage}});
            event(Some("message_start"), &styled(&start, 0), &mut out);
            for (piece, style, named) in pieces {
                match piece {
                    Piece::Delta(text) => {
                        let d = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}});
                        event(named.then_some("content_block_delta"), &styled(&d, style), &mut out);
                    }
                    Piece::Ping => event(named.then_some("ping"), "{\"type\": \"ping\"}", &mut out),
                    Piece::VertexEvent => {
                        let v = json!({"type": "vertex_event", "usage": {"output_tokens": 999_999}});
                        event(named.then_some("vertex_event"), &styled(&v, style), &mut out);
                    }
                    Piece::Comment(c) => out.push_str(&format!(":{c}{eol}")),
                    Piece::Usage(fields) => {
                        let u = apply(&mut usage, &fields);
                        let d = json!({"type": "message_delta", "delta": {"stop_reason": null}, "usage": u});
                        event(named.then_some("message_delta"), &styled(&d, style), &mut out);
                    }
                    Piece::Unknown(v) => {
                        let data = json!({"type": "future_event", "payload": v});
                        event(Some("future_event"), &data.to_string(), &mut out);
                    }
                }
            }
            event(Some("message_stop"), "{\"type\":\"message_stop\"}", &mut out);
            let stream = out.into_bytes();
            let cuts = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            Cut { stream, cuts, cap: DEFAULT_CAP, usage: Some(usage) }
        })
}

/// Any bytes, cut anywhere, under a cap from tiny to roomy.
fn garbage(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Cut> {
    let fresh = prop_oneof![
        prop::collection::vec(
            prop::sample::select(vec![
                b'\n', b'\r', b':', b' ', b'd', b'a', b't', b'e', b'v', b'n', 0xff, b'{', b'}'
            ]),
            0..256
        ),
        prop::collection::vec(any::<u8>(), 0..256),
        vertex_stream().prop_map(|c| c.stream),
    ];
    (
        mutated(seeds, fresh),
        prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        prop_oneof![1usize..64, Just(DEFAULT_CAP)],
    )
        .prop_map(|(stream, cuts, cap)| {
            let cuts = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            Cut {
                stream,
                cuts,
                cap,
                usage: None,
            }
        })
}

/// A unary Message body carrying `fields`: `usage_from_message_body` reads
/// exactly the counts, ignoring what is not one.
fn unary(fields: &[(usize, Value)]) -> TestCaseResult {
    let mut want = Usage::default();
    let usage = apply(&mut want, fields);
    let body = json!({"id": "msg_vrtx_1", "type": "message", "content": [{"type": "text", "text": "hi"}], "usage": usage});
    let got = usage_from_message_body(&serde_json::to_vec(&body).expect("JSON serializes"));
    ensure(got == Some(want), || {
        format!("{got:?}, the body carries {want:?}")
    })
}

fn unary_bytes(bytes: &[u8]) -> TestCaseResult {
    let Some(got) = usage_from_message_body(bytes) else {
        return Ok(());
    };
    let _ = (got.total(), got.total_input());
    // Where the body is a JSON object with a usage object, the counts are
    // exactly its non-negative integer fields. (Bytes that are not JSON may
    // still give usage: serde skips what it ignores without checking it,
    // invalid UTF-8 included, and leniency is what the reader wants.)
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(());
    };
    let Some(Value::Object(usage)) = body.get("usage") else {
        return Ok(());
    };
    let count = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let want = Usage {
        input_tokens: count("input_tokens"),
        output_tokens: count("output_tokens"),
        cache_creation_input_tokens: count("cache_creation_input_tokens"),
        cache_read_input_tokens: count("cache_read_input_tokens"),
        cache_creation_1h_input_tokens: usage
            .get("cache_creation")
            .and_then(|c| c.get("ephemeral_1h_input_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
    };
    ensure(got == want, || {
        format!("{got:?}, the body carries {want:?}")
    })
}

fn check_stored(kind: &str, bytes: &[u8]) -> TestCaseResult {
    match kind {
        "unary" => unary_bytes(bytes),
        _ => check(&decode(bytes)),
    }
}

#[test]
fn corpus() {
    harness::replay(TARGET, check_stored);
}

#[test]
fn fuzz() {
    let seeds = harness::seeds(TARGET, &["stream"])
        .into_iter()
        .map(|b| decode(&b).stream)
        .collect();
    let unary_seeds = harness::seeds(TARGET, &["unary"]);
    Fuzz::new(TARGET)
        .property("stream", "sse", vertex_stream(), encode, |c| check(&c))
        .property("stream", "sse", garbage(seeds), encode, |c| check(&c))
        .property(
            "unary",
            "json",
            wire_usage(),
            |f| {
                let mut u = Usage::default();
                serde_json::to_vec(&json!({"usage": apply(&mut u, f)})).unwrap_or_default()
            },
            |f| unary(&f),
        )
        .property(
            "unary",
            "json",
            mutated(
                unary_seeds,
                arb_json().prop_map(|v| v.to_string().into_bytes()),
            ),
            Vec::clone,
            |b| unary_bytes(&b),
        )
        .run();
}
