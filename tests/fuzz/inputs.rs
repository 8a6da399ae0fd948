//! The inputs the targets share: valid Messages requests built field by
//! field, arbitrary JSON, odd text, and byte-level mutations of anything.
//!
//! Structured inputs reach the deep paths (a parser that rejects most
//! random bytes at the first brace never sees a `tool_result` inside a
//! fourth turn); mutated bytes reach the edges structure never produces
//! (a body cut mid-escape, a flipped bit in a UTF-8 sequence, a number
//! with 400 digits, nesting past serde_json's limit).

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};

/// Text a client might send, weighted to the kinds that break things:
/// prose, CJK, emoji with joiners, right-to-left marks, combining accents,
/// control characters, base64-looking runs, and anything else Unicode has.
pub fn odd_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z ,.!?'\n]{1,60}",
        1 => "[\u{3040}-\u{30ff}\u{4e00}-\u{4eff}\u{ac00}-\u{ac40}。、]{1,30}",
        1 => "[A-Za-z0-9+/]{32,80}={0,2}",
        1 => "\\PC{1,30}",
        1 => ".{1,30}",
        1 => prop::sample::select(vec![
            "👩‍👩‍👧‍👦 family",
            "\u{202e}evil\u{202c} rtl",
            "e\u{301}\u{302}\u{303} combining",
            "\u{feff}bom",
            "nul\u{0}inside",
            "tab\tcr\rlf\n",
            "\u{2028}line\u{2029}para",
            "\u{10ffff}\u{fffd}",
            "\"quoted\" \\ backslash",
            "{\"looks\": [\"like\", \"json\"]}",
            "data: not an event\n\n",
        ])
        .prop_map(str::to_owned),
    ]
}

/// Arbitrary JSON, biased to the keys and values Messages bodies use, with
/// the numbers that break parsers (huge, negative, fractional).
pub fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            "user",
            "assistant",
            "text",
            "image",
            "tool_use",
            "tool_result",
            "document",
            "thinking",
            "base64",
            "ephemeral",
            "message_start",
            "error",
            "",
        ])
        .prop_map(Value::from),
        odd_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 96, 8, |inner| {
        let key = prop_oneof![
            prop::sample::select(vec![
                "type",
                "role",
                "content",
                "text",
                "messages",
                "max_tokens",
                "system",
                "stream",
                "model",
                "source",
                "data",
                "input",
                "name",
                "cache_control",
                "tools",
                "usage",
                "error",
                "message",
                "code",
                "status",
            ])
            .prop_map(str::to_owned),
            "\\PC{0,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// An arbitrary JSON object (tool inputs and schemas).
pub fn arb_object() -> impl Strategy<Value = Value> {
    prop::collection::vec(("[a-z_]{1,8}", arb_json()), 0..5)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

fn cache_control() -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.2, Just(json!({"type": "ephemeral"})))
}

fn with_cache(mut block: Value, cache: Option<Value>) -> Value {
    if let (Some(c), Some(map)) = (cache, block.as_object_mut()) {
        map.insert("cache_control".into(), c);
    }
    block
}

fn text_block() -> impl Strategy<Value = Value> {
    (odd_text(), cache_control())
        .prop_map(|(text, cache)| with_cache(json!({"type": "text", "text": text}), cache))
}

/// A PNG's first bytes (signature and IHDR), base64: enough for the
/// estimator to read its size.
fn png_base64(width: u32, height: u32) -> String {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    bytes.extend_from_slice(&width.to_be_bytes());
    bytes.extend_from_slice(&height.to_be_bytes());
    bytes.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    base64(&bytes)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn image_block() -> impl Strategy<Value = Value> {
    let source = prop_oneof![
        (1u32..20_000, 1u32..20_000).prop_map(|(w, h)| json!({
            "type": "base64", "media_type": "image/png", "data": png_base64(w, h)
        })),
        "[A-Za-z0-9+/]{0,64}".prop_map(|data| json!({
            "type": "base64", "media_type": "image/jpeg", "data": data
        })),
        Just(json!({"type": "url", "url": "https://example.com/cat.png"})),
    ];
    (source, cache_control())
        .prop_map(|(source, cache)| with_cache(json!({"type": "image", "source": source}), cache))
}

fn tool_use_block() -> impl Strategy<Value = Value> {
    ("[a-z_]{1,12}", "toolu_[A-Za-z0-9]{1,12}", arb_object()).prop_map(
        |(name, id, input)| json!({"type": "tool_use", "id": id, "name": name, "input": input}),
    )
}

fn tool_result_block() -> impl Strategy<Value = Value> {
    let content = prop_oneof![
        odd_text().prop_map(Value::from),
        arb_json().prop_map(|v| Value::from(v.to_string())),
        prop::collection::vec(prop_oneof![text_block(), image_block()], 1..3)
            .prop_map(Value::Array),
    ];
    (
        "toolu_[A-Za-z0-9]{1,12}",
        content,
        prop::option::of(any::<bool>()),
        cache_control(),
    )
        .prop_map(|(id, content, is_error, cache)| {
            let mut block = json!({"type": "tool_result", "tool_use_id": id, "content": content});
            if let Some(e) = is_error {
                block["is_error"] = Value::Bool(e);
            }
            with_cache(block, cache)
        })
}

fn document_block() -> impl Strategy<Value = Value> {
    odd_text().prop_map(|data| {
        json!({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": data}})
    })
}

fn thinking_block() -> impl Strategy<Value = Value> {
    (odd_text(), "[A-Za-z0-9]{8,24}").prop_map(|(thinking, signature)| {
        json!({"type": "thinking", "thinking": thinking, "signature": signature})
    })
}

fn content(user: bool) -> BoxedStrategy<Value> {
    let blocks = if user {
        prop_oneof![
            3 => text_block(),
            1 => image_block(),
            2 => tool_result_block(),
            1 => document_block(),
        ]
        .boxed()
    } else {
        prop_oneof![3 => text_block(), 2 => tool_use_block(), 1 => thinking_block()].boxed()
    };
    prop_oneof![
        odd_text().prop_map(Value::from),
        prop::collection::vec(blocks, 1..4).prop_map(Value::Array),
    ]
    .boxed()
}

fn messages() -> impl Strategy<Value = Value> {
    let turns =
        (1usize..7).prop_flat_map(|n| (0..n).map(|i| content(i % 2 == 0)).collect::<Vec<_>>());
    // A final assistant turn may be an empty prefill.
    let prefill = prop::option::weighted(
        0.15,
        prop::sample::select(vec![json!(""), json!([]), json!("The answer is")]),
    );
    (turns, prefill).prop_map(|(contents, prefill)| {
        let mut out: Vec<Value> = contents
            .into_iter()
            .enumerate()
            .map(|(i, content)| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                json!({"role": role, "content": content})
            })
            .collect();
        if let (Some(p), true) = (prefill, out.len() % 2 == 1) {
            out.push(json!({"role": "assistant", "content": p}));
        }
        Value::Array(out)
    })
}

fn system() -> impl Strategy<Value = Value> {
    prop_oneof![
        odd_text().prop_map(Value::from),
        prop::collection::vec(text_block(), 0..3).prop_map(Value::Array),
    ]
}

fn tools() -> impl Strategy<Value = Value> {
    let tool = ("[a-z_]{1,16}", odd_text(), arb_object(), cache_control()).prop_map(
        |(name, description, properties, cache)| {
            with_cache(
                json!({"name": name, "description": description,
                       "input_schema": {"type": "object", "properties": properties}}),
                cache,
            )
        },
    );
    prop::collection::vec(tool, 1..4).prop_map(Value::Array)
}

/// A Messages request that is valid by Anthropic's rules (and so by the
/// gateway's), fields in a random order, sometimes with fields the gateway
/// does not know (which must pass through untouched).
pub fn valid_request() -> impl Strategy<Value = Value> {
    let model = prop::option::weighted(
        0.9,
        prop_oneof![
            prop::sample::select(vec!["claude-sonnet-4-5", "claude-3-haiku@20240307"])
                .prop_map(str::to_owned),
            "\\PC{1,20}",
        ],
    );
    let max_tokens = prop_oneof![1u64..=64_000, Just(u64::MAX), 1u64..=u64::MAX];
    let extra = prop::collection::vec(
        prop_oneof![
            (0.0f64..=1.0).prop_map(|t| ("temperature".to_owned(), json!(t))),
            (0u64..500).prop_map(|k| ("top_k".to_owned(), json!(k))),
            Just((
                "thinking".to_owned(),
                json!({"type": "enabled", "budget_tokens": 1024})
            )),
            prop::collection::vec(odd_text(), 0..3)
                .prop_map(|s| ("stop_sequences".to_owned(), json!(s))),
            Just(("anthropic_version".to_owned(), json!("vertex-2023-10-16"))),
            ("x_[a-z]{1,8}", arb_json()),
        ],
        0..3,
    );
    (
        model,
        max_tokens,
        prop::option::of(any::<bool>()),
        prop::option::weighted(0.4, system()),
        prop::option::weighted(0.3, tools()),
        messages(),
        extra,
    )
        .prop_flat_map(
            |(model, max_tokens, stream, system, tools, messages, extra)| {
                let mut fields: Vec<(String, Value)> = vec![
                    ("max_tokens".into(), json!(max_tokens)),
                    ("messages".into(), messages),
                ];
                fields.extend(model.map(|m| ("model".to_owned(), Value::from(m))));
                fields.extend(stream.map(|s| ("stream".to_owned(), Value::Bool(s))));
                fields.extend(system.map(|s| ("system".to_owned(), s)));
                fields.extend(tools.map(|t| ("tools".to_owned(), t)));
                for (k, v) in extra {
                    if !fields.iter().any(|(name, _)| *name == k) {
                        fields.push((k, v));
                    }
                }
                Just(fields).prop_shuffle()
            },
        )
        .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>()))
}

/// One change to a byte string.
#[derive(Debug, Clone)]
pub enum Mutation {
    Truncate(Index),
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Duplicate(Index, usize),
    Token(Index, &'static [u8]),
}

/// Tokens that mean something to a JSON or SSE parser, or to UTF-8.
const TOKENS: &[&[u8]] = &[
    b"null",
    b"true",
    b"0",
    b"-1",
    b"1e999",
    b"-0.0",
    b"18446744073709551616",
    b"99999999999999999999999999999999999999999999999999",
    b"1.5",
    b"\"\\ud800\"",
    b"\"\\udfff\\ud800\"",
    b"\\u0000",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b"\"",
    b"\\",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xef\xbb\xbf",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"data: ",
    b"event: ",
    b"\"type\"",
    b"\"role\":\"assistant\"",
    b"\"content\":[]",
    b"\"max_tokens\":0",
    b"\"stream\":\"yes\"",
    b"{\"type\":\"text\"}",
    b"\"model\":7",
    b"\"custom_id\"",
    b"\"params\":{}",
    b"\"error\"",
];

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        3 => (any::<Index>(), prop::sample::select(TOKENS)).prop_map(|(i, t)| Mutation::Token(i, t)),
    ]
}

/// `bytes` with `mutations` applied in order.
pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match m {
            Mutation::Truncate(i) => {
                let n = at(i, bytes.len());
                bytes.truncate(n);
            }
            Mutation::FlipBit(i, bit) if !bytes.is_empty() => {
                let n = i.index(bytes.len());
                bytes[n] ^= 1 << bit;
            }
            Mutation::SetByte(i, b) if !bytes.is_empty() => {
                let n = i.index(bytes.len());
                bytes[n] = *b;
            }
            Mutation::Insert(i, new) => {
                let n = at(i, bytes.len());
                bytes.splice(n..n, new.iter().copied());
            }
            Mutation::Delete(i, len) => {
                let n = at(i, bytes.len());
                let end = (n + len).min(bytes.len());
                bytes.drain(n..end);
            }
            Mutation::Duplicate(i, len) => {
                let n = at(i, bytes.len());
                let end = (n + len).min(bytes.len());
                let copy = bytes[n..end].to_vec();
                bytes.splice(end..end, copy);
            }
            Mutation::Token(i, token) => {
                let n = at(i, bytes.len());
                bytes.splice(n..n, token.iter().copied());
            }
            _ => {}
        }
    }
    bytes
}

/// Bytes made from `seeds` (or from `fresh`, when there are none or by
/// chance) by one to eight mutations.
pub fn mutated(
    seeds: Vec<Vec<u8>>,
    fresh: impl Strategy<Value = Vec<u8>> + 'static,
) -> BoxedStrategy<Vec<u8>> {
    let base = if seeds.is_empty() {
        fresh.boxed()
    } else {
        prop_oneof![2 => prop::sample::select(seeds), 1 => fresh].boxed()
    };
    (base, prop::collection::vec(mutation(), 1..8))
        .prop_map(|(bytes, ms)| mutate(bytes, &ms))
        .boxed()
}

/// Nesting at and past serde_json's recursion limit (128), inside an
/// otherwise plausible body.
pub fn deep_nesting() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![1usize..140, 1usize..200_000],
        prop::sample::select(vec![&b"["[..], &b"{\"a\":"[..], &b"[{\"content\":"[..]]),
        any::<bool>(),
    )
        .prop_map(|(depth, open, closed)| {
            let mut out =
                b"{\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"x\":"
                    .to_vec();
            for _ in 0..depth {
                out.extend_from_slice(open);
            }
            out.extend_from_slice(b"1");
            if closed {
                let close: &[u8] = match open[0] {
                    b'[' if open.len() == 1 => b"]",
                    b'[' => b"}]",
                    _ => b"}",
                };
                for _ in 0..depth {
                    out.extend_from_slice(close);
                }
                out.push(b'}');
            }
            out
        })
}

/// A number literal: integers of any length, fractions, exponents, signs.
pub fn number_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?[0-9]{1,400}",
        "-?[0-9]{1,20}\\.[0-9]{1,30}",
        "-?[0-9]{1,5}(\\.[0-9]{1,5})?[eE][+-]?[0-9]{1,5}",
        any::<u64>().prop_map(|n| n.to_string()),
    ]
}
