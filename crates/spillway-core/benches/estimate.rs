//! What measuring a body costs, and what turning the measure into a
//! reservation costs, on bodies of the sizes the gateway sees: a chat turn,
//! a 10,000-character prompt, and a Claude-Code-shaped request (~130 kB:
//! twenty tools with JSON schemas, a long system prompt behind
//! `cache_control`, two turns).
//!
//! `cargo bench -p spillway-core --bench estimate`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Map, Value};
use spillway_core::estimate::{estimate_input, ImageRule};
use spillway_core::learn::{InputModel, Quantile};
use spillway_core::Rates;

fn prose(chars: usize) -> String {
    let words = [
        "the", "gateway", "routes", "every", "request", "to", "a", "region", "with", "room,",
    ];
    let mut out = String::with_capacity(chars + 16);
    let mut i = 0;
    while out.len() < chars {
        out.push_str(words[i % words.len()]);
        out.push(' ');
        i += 7;
    }
    out
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("bench bodies are objects"),
    }
}

fn agent_body() -> Map<String, Value> {
    let tools: Vec<Value> = (0..20)
        .map(|i| {
            json!({
                "name": format!("tool_{i}"),
                "description": prose(3_000),
                "input_schema": {"type": "object", "properties": {
                    "path": {"type": "string", "description": prose(200)},
                    "limit": {"type": "integer"},
                    "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "string"}}}}
                }, "required": ["path"]}
            })
        })
        .collect();
    object(json!({
        "model": "m", "max_tokens": 32000,
        "tools": tools,
        "system": [{"type": "text", "text": prose(60_000), "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": prose(2_000)}]},
            {"role": "user", "content": [{"type": "text", "text": "Fix the failing test.", "cache_control": {"type": "ephemeral"}}]},
        ],
    }))
}

fn bench(c: &mut Criterion) {
    let bodies = [
        (
            "chat turn",
            object(
                json!({"model": "m", "max_tokens": 256, "messages": [{"role": "user", "content": "Hello, Claude"}]}),
            ),
        ),
        (
            "10k-char prompt",
            object(
                json!({"model": "m", "max_tokens": 1024, "messages": [{"role": "user", "content": prose(10_000)}]}),
            ),
        ),
        ("agent request", agent_body()),
    ];
    let mut group = c.benchmark_group("estimate_input");
    for (name, body) in &bodies {
        let bytes = serde_json::to_vec(body).map_or(0, |b| b.len() as u64);
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(*name, |b| {
            b.iter(|| estimate_input(black_box(body), ImageRule::default()))
        });
    }
    group.finish();
    let model = InputModel::new(Rates::prior(3.5), Quantile::default());
    let measured = estimate_input(&bodies[2].1, ImageRule::default());
    c.bench_function("reserve (rates × features, class, margin)", |b| {
        b.iter(|| model.reserve(black_box(&measured)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
