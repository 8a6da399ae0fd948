//! The exact Vertex stream recorded in the reference (§1.4), fed whole, byte by byte and in random
//! chunkings: every chunking must yield the same events, the same usage, and the original bytes.

use proptest::prelude::*;
use spillway_vertex::{is_vertex_event, SseEvent, SseSplitter, StreamUsage, Usage};

const STREAM: &[u8] = include_bytes!("fixtures/vertex_stream.sse");

fn run(
    chunks: impl IntoIterator<Item = Vec<u8>>,
) -> (Vec<SseEvent>, StreamUsage, Option<bytes::Bytes>) {
    let mut splitter = SseSplitter::new(64 * 1024);
    let mut usage = StreamUsage::default();
    let mut events = Vec::new();
    for chunk in chunks {
        for ev in splitter.push(&chunk).expect("event within limit") {
            usage.observe(&ev);
            events.push(ev);
        }
    }
    let rest = splitter.finish();
    (events, usage, rest)
}

fn expected_usage() -> Usage {
    Usage {
        input_tokens: 16,
        output_tokens: 27,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
        cache_creation_1h_input_tokens: 0,
    }
}

fn check(events: &[SseEvent], usage: &StreamUsage, rest: &Option<bytes::Bytes>) {
    let names: Vec<_> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    // Each event's data is JSON (padding and all) whose type matches the event name.
    for e in events {
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(v["type"], e.event.as_deref().unwrap());
        assert!(e.raw.ends_with(b"\n\n"));
        assert!(!is_vertex_event(e));
    }
    assert!(events[3].data.contains("Olá!"));
    assert_eq!(events[6].data, r#"{"type":"message_stop"              }"#);
    // Passthrough is byte-exact.
    let joined: Vec<u8> = events.iter().flat_map(|e| e.raw.iter().copied()).collect();
    assert_eq!(joined, STREAM);
    assert_eq!(rest, &None);

    assert_eq!(usage.usage(), expected_usage());
    assert!(usage.saw_message_start());
    assert!(usage.completed());
    assert_eq!(usage.error(), None);
}

#[test]
fn whole_stream() {
    let (events, usage, rest) = run([STREAM.to_vec()]);
    check(&events, &usage, &rest);
}

#[test]
fn byte_by_byte() {
    let (events, usage, rest) = run(STREAM.iter().map(|&b| vec![b]));
    check(&events, &usage, &rest);
}

#[test]
fn crlf_variant_byte_by_byte() {
    let text = std::str::from_utf8(STREAM).unwrap().replace('\n', "\r\n");
    let (events, usage, rest) = run(text.bytes().map(|b| vec![b]));
    assert_eq!(events.len(), 7);
    assert_eq!(usage.usage(), expected_usage());
    assert!(usage.completed());
    assert_eq!(rest, None);
    let joined: Vec<u8> = events.iter().flat_map(|e| e.raw.iter().copied()).collect();
    assert_eq!(joined, text.as_bytes());
}

#[test]
fn truncated_stream_is_incomplete() {
    let cut = STREAM.len() - 40;
    let (events, usage, rest) = run([STREAM[..cut].to_vec()]);
    assert_eq!(events.len(), 6);
    assert!(!usage.completed());
    assert_eq!(usage.usage(), expected_usage());
    let last_start = STREAM
        .windows(19)
        .position(|w| w == b"event: message_stop")
        .unwrap();
    assert!(last_start < cut);
    assert_eq!(rest.as_deref(), Some(&STREAM[last_start..cut]));
}

#[test]
fn vertex_event_and_error_mid_stream() {
    let mut s = Vec::new();
    let split = STREAM.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    s.extend_from_slice(&STREAM[..split]);
    s.extend_from_slice(b"event: vertex_event\ndata: {\"type\":\"vertex_event\",\"usage\":{\"output_tokens\":500}}\n\n");
    s.extend_from_slice(
        b"event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
    );
    let (events, usage, rest) = run([s]);
    assert_eq!(events.len(), 3);
    assert!(is_vertex_event(&events[1]));
    assert_eq!(
        usage.error(),
        Some(("overloaded_error".into(), "Overloaded".into()))
    );
    assert_eq!(usage.usage().input_tokens, 16);
    assert_eq!(usage.usage().output_tokens, 4);
    assert!(!usage.completed());
    assert_eq!(rest, None);
}

/// Splits `data` at the given cut points (sorted, deduplicated, clamped).
fn chunk_at(data: &[u8], mut cuts: Vec<usize>) -> Vec<Vec<u8>> {
    cuts.iter_mut().for_each(|c| *c %= data.len() + 1);
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts {
        out.push(data[prev..c].to_vec());
        prev = c;
    }
    out.push(data[prev..].to_vec());
    out
}

proptest! {
    #[test]
    fn any_chunking_same_result(cuts in prop::collection::vec(any::<usize>(), 0..64)) {
        let (events, usage, rest) = run(chunk_at(STREAM, cuts));
        check(&events, &usage, &rest);
    }

    #[test]
    fn any_chunking_any_line_endings(
        cuts in prop::collection::vec(any::<usize>(), 0..64),
        ending in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
    ) {
        let text = std::str::from_utf8(STREAM).unwrap().replace('\n', ending);
        let reference = run([text.clone().into_bytes()]);
        let chunked = run(chunk_at(text.as_bytes(), cuts));
        prop_assert_eq!(&reference.0, &chunked.0);
        prop_assert_eq!(reference.1.usage(), chunked.1.usage());
        prop_assert_eq!(reference.1.completed(), chunked.1.completed());
        prop_assert_eq!(&reference.2, &chunked.2);
        prop_assert_eq!(reference.1.usage().input_tokens, 16);
        prop_assert_eq!(reference.1.usage().output_tokens, 27);
    }

    #[test]
    fn splitter_never_panics_and_conserves_bytes(
        data in prop::collection::vec(prop_oneof![
            Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'd'), any::<u8>()
        ], 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut splitter = SseSplitter::new(1 << 20);
        let mut out = Vec::new();
        let mut usage = StreamUsage::default();
        for chunk in chunk_at(&data, cuts) {
            for ev in splitter.push(&chunk).unwrap() {
                usage.observe(&ev);
                let _ = is_vertex_event(&ev);
                out.extend_from_slice(&ev.raw);
            }
        }
        if let Some(rest) = splitter.finish() {
            out.extend_from_slice(&rest);
        }
        prop_assert_eq!(out, data);
    }
}
