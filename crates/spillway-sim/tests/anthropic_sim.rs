//! Anthropic's first-party surface (`/v1/messages`), observed over HTTP the
//! way a gateway overflowing to `api.anthropic.com` observes it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use spillway_sim::{
    count_tokens, replay_admissions, AnthropicLimits, AnthropicModel, Fault, FaultKind,
    RateLimitDimension, SimConfig, SimHandle, Simulator,
};

const KEY: &str = "sk-ant-sim-test";
const HAIKU3: &str = "claude-3-haiku-20240307";
const SONNET: &str = "claude-sonnet-4-5";

async fn start(models: Vec<AnthropicModel>) -> SimHandle {
    let config = SimConfig::vertex_defaults().with_anthropic(KEY, models);
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_idle_timeout(None)
        .build()
        .unwrap()
}

fn body(model: &str, text: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    })
}

async fn send(sim: &SimHandle, b: &Value) -> reqwest::Response {
    client()
        .post(sim.anthropic_messages_url())
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(b)
        .send()
        .await
        .unwrap()
}

fn h(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac]Z` (what the simulator sends).
fn parse_rfc3339(s: &str) -> SystemTime {
    let b = s.as_bytes();
    assert!(
        s.len() >= 20 && b[4] == b'-' && b[10] == b'T' && s.ends_with('Z'),
        "{s}"
    );
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (hh, mm, ss) = (n(11..13), n(14..16), n(17..19));
    // Days from civil (Howard Hinnant), written independently of the crate's.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    UNIX_EPOCH + Duration::from_secs((days * 86_400 + hh * 3600 + mm * 60 + ss) as u64)
}

#[tokio::test(start_paused = true)]
async fn requests_refill_continuously_not_by_window() {
    let sim = start(vec![AnthropicModel::unlimited(SONNET).with_limits(
        AnthropicLimits {
            requests_per_min: Some(10),
            ..AnthropicLimits::default()
        },
    )])
    .await;
    let b = body(SONNET, "hi", 100);
    for i in 0..10u64 {
        let r = send(&sim, &b).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            h(&r, "anthropic-ratelimit-requests-remaining").unwrap(),
            (9 - i).to_string()
        );
    }
    let r = send(&sim, &b).await;
    assert_eq!(r.status(), 429);
    // One request comes back every 6 s.
    assert_eq!(h(&r, "retry-after").as_deref(), Some("6"));
    assert_eq!(
        h(&r, "anthropic-ratelimit-requests-remaining").as_deref(),
        Some("0")
    );
    // Half a period after the full burst, half the capacity is back (a
    // sliding window would give back nothing yet).
    tokio::time::advance(Duration::from_secs(30)).await;
    for _ in 0..5 {
        assert_eq!(send(&sim, &b).await.status(), 200);
    }
    let r = send(&sim, &b).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Number of requests has exceeded your per-minute rate limit"));
    let c = sim.anthropic_counters(SONNET);
    assert_eq!((c.requests, c.succeeded, c.rate_limited), (17, 15, 2));
    assert_eq!(c.rate_limited_requests, 2);
    let reports = sim.anthropic_admissions_report();
    assert_eq!(reports.len(), 1);
    assert!(reports[0].within_limits() && reports[0].levels_consistent);
    assert_eq!(reports[0].min_level.requests, Some(0));
    assert_eq!((reports[0].admitted, reports[0].rate_limited), (15, 2));
}

#[tokio::test(start_paused = true)]
async fn output_429_has_an_exact_retry_after_and_debits_nothing() {
    let sim = start(vec![AnthropicModel::new(SONNET, 1000, 1_000_000, 1000)]).await;
    // The whole OTPM bucket, used in full (no credit back).
    let r = send(&sim, &body(SONNET, "SIM_OUTPUT_TOKENS=1000", 1000)).await;
    assert_eq!(r.status(), 200);
    let before = sim.anthropic_levels(SONNET).unwrap().1;
    assert_eq!(before.output_tokens.unwrap().remaining, 0);
    let b = body(SONNET, "more", 250);
    let r = send(&sim, &b).await;
    assert_eq!(r.status(), 429);
    // 250 of 1000 per 60 s: 15 s.
    assert_eq!(h(&r, "retry-after").as_deref(), Some("15"));
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Number of output tokens has exceeded your per-minute rate limit"));
    assert!(v["request_id"].as_str().unwrap().starts_with("req_"));
    // The refusal took nothing: not a request, not an input token.
    assert_eq!(sim.anthropic_levels(SONNET).unwrap().1, before);
    tokio::time::advance(Duration::from_millis(14_500)).await;
    let r = send(&sim, &b).await;
    assert_eq!(r.status(), 429);
    assert_eq!(h(&r, "retry-after").as_deref(), Some("1"));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(send(&sim, &b).await.status(), 200);
    let c = sim.anthropic_counters(SONNET);
    assert_eq!(c.rate_limited_output_tokens, 2);
    let log = sim.anthropic_log();
    let rejected: Vec<_> = log.entries.iter().filter_map(|e| e.rejected).collect();
    assert_eq!(rejected, vec![RateLimitDimension::OutputTokens; 2]);
    assert!(log.entries.iter().all(|e| e.admitted == (e.status == 200)));
}

#[tokio::test(start_paused = true)]
async fn input_429_names_request_tokens() {
    let sim = start(vec![AnthropicModel::new(SONNET, 1000, 100, 100_000)]).await;
    let long = "word ".repeat(400);
    let r = send(&sim, &body(SONNET, &long, 10)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(h(&r, "retry-after").as_deref(), Some("60"));
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Number of request tokens has exceeded your per-minute rate limit"));
    // More than the capacity never fits: the wait is a whole period.
    assert_eq!(sim.anthropic_counters(SONNET).rate_limited_input_tokens, 1);
    let log = sim.anthropic_log();
    assert_eq!(
        log.entries[0].rejected,
        Some(RateLimitDimension::InputTokens)
    );
}

#[tokio::test(start_paused = true)]
async fn output_is_reserved_at_max_tokens_then_credited_back() {
    let sim = start(vec![AnthropicModel::new(SONNET, 1000, 1_000_000, 100_000)]).await;
    let r = send(&sim, &body(SONNET, "hi", 10_000)).await;
    assert_eq!(r.status(), 200);
    // The header shows the level right after the debit of max_tokens.
    assert_eq!(
        h(&r, "anthropic-ratelimit-output-tokens-remaining").as_deref(),
        Some("90000")
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["output_tokens"], 12);
    // The answer ended with 12 tokens: 9 988 came back.
    let out = sim
        .anthropic_levels(SONNET)
        .unwrap()
        .1
        .output_tokens
        .unwrap();
    assert_eq!(out.remaining, 99_988);

    // Same for a stream, credited when the stream ends.
    let mut b = body(SONNET, "SIM_OUTPUT_TOKENS=5", 10_000);
    b["stream"] = json!(true);
    let r = send(&sim, &b).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        h(&r, "anthropic-ratelimit-output-tokens-remaining").as_deref(),
        Some("90000")
    );
    let text = r.text().await.unwrap();
    assert!(text.contains("\"output_tokens\":5}"));
    let out = sim
        .anthropic_levels(SONNET)
        .unwrap()
        .1
        .output_tokens
        .unwrap();
    assert_eq!(out.remaining, 99_983);

    let log = sim.anthropic_log();
    let e: Vec<_> = log
        .entries
        .iter()
        .map(|e| (e.output_reserved, e.output_actual, e.stream))
        .collect();
    assert_eq!(e, vec![(10_000, Some(12), false), (10_000, Some(5), true)]);
    assert_eq!(log.entries[0].levels.unwrap().output_tokens, Some(90_000));
    let r = &replay_admissions(&log)[0];
    assert!(r.within_limits() && r.levels_consistent, "{r:?}");
    assert_eq!(r.min_level.output_tokens, Some(89_988));
}

#[tokio::test(start_paused = true)]
async fn cache_reads_count_only_for_claude_3_models() {
    let sim = start(vec![
        AnthropicModel::new(HAIKU3, 100, 1_000_000, 100_000),
        AnthropicModel::new(SONNET, 100, 1_000_000, 100_000),
    ])
    .await;
    let text = format!(
        "SIM_CACHE_READ=50 SIM_CACHE_WRITE=10 {}",
        "lorem ".repeat(100)
    );
    let total = count_tokens(&body(HAIKU3, &text, 10));
    assert!(total > 60);
    for m in [HAIKU3, SONNET] {
        let r = send(&sim, &body(m, &text, 10)).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["usage"]["cache_read_input_tokens"], 50);
        assert_eq!(v["usage"]["cache_creation_input_tokens"], 10);
        assert_eq!(v["usage"]["input_tokens"], total - 60);
    }
    let log = sim.anthropic_log();
    let charged: Vec<_> = log
        .entries
        .iter()
        .map(|e| (e.model.clone().unwrap(), e.input_tokens))
        .collect();
    assert_eq!(
        charged,
        vec![(HAIKU3.to_owned(), total), (SONNET.to_owned(), total - 50)]
    );
    let c = sim.anthropic_counters(HAIKU3);
    assert_eq!(
        (c.cache_read_input_tokens, c.cache_creation_input_tokens),
        (50, 10)
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limit_headers_are_rounded_and_reset_is_in_the_future() {
    let sim = start(vec![
        AnthropicModel::new(SONNET, 50, 30_000, 8_000),
        AnthropicModel::unlimited(HAIKU3).with_limits(AnthropicLimits {
            requests_per_min: Some(5),
            ..AnthropicLimits::default()
        }),
    ])
    .await;
    let before = SystemTime::now();
    let r = send(&sim, &body(SONNET, "hello there", 600)).await;
    assert_eq!(r.status(), 200);
    assert!(h(&r, "request-id").unwrap().starts_with("req_"));
    let g = |n: &str| h(&r, &format!("anthropic-ratelimit-{n}")).unwrap();
    assert_eq!(g("requests-limit"), "50");
    assert_eq!(g("requests-remaining"), "49");
    assert_eq!(g("input-tokens-limit"), "30000");
    // ~29 990 input tokens left: rounded to the nearest thousand.
    assert_eq!(g("input-tokens-remaining"), "30000");
    assert_eq!(g("output-tokens-limit"), "8000");
    assert_eq!(g("output-tokens-remaining"), "7000");
    // The tighter of input and output is output (7 400 left).
    assert_eq!(g("tokens-limit"), "8000");
    assert_eq!(g("tokens-remaining"), "7000");
    assert_eq!(g("tokens-reset"), g("output-tokens-reset"));
    let now = SystemTime::now();
    for dim in ["requests", "input-tokens", "output-tokens", "tokens"] {
        let reset = parse_rfc3339(&g(&format!("{dim}-reset")));
        assert!(reset > before, "{dim}");
        assert!(reset <= now + Duration::from_secs(61), "{dim}");
    }
    // 600 of 8 000 per 60 s: full again in 4.5 s.
    let out = parse_rfc3339(&g("output-tokens-reset"));
    assert!(out > now);
    assert!(out >= before + Duration::from_millis(4_500) && out <= now + Duration::from_secs(6));
    // Only enforced limits have headers.
    let r = send(&sim, &body(HAIKU3, "hi", 10)).await;
    assert_eq!(
        h(&r, "anthropic-ratelimit-requests-remaining").as_deref(),
        Some("4")
    );
    for n in ["input-tokens", "output-tokens", "tokens"] {
        assert!(
            h(&r, &format!("anthropic-ratelimit-{n}-limit")).is_none(),
            "{n}"
        );
    }
    // 400s after the model is known carry them too.
    let mut bad = body(SONNET, "x", 10);
    bad.as_object_mut().unwrap().remove("max_tokens");
    let r = send(&sim, &bad).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        h(&r, "anthropic-ratelimit-requests-remaining").as_deref(),
        Some("49")
    );
}

#[tokio::test]
async fn key_version_and_body_are_checked_like_the_real_api() {
    let sim = start(vec![AnthropicModel::unlimited(SONNET)]).await;
    let c = client();
    let url = sim.anthropic_messages_url();
    let ok = body(SONNET, "hi", 10);
    let check = |r: reqwest::Response, status: u16, kind: &'static str, msg: &'static str| async move {
        assert_eq!(r.status(), status);
        let id = h(&r, "request-id").unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], kind);
        assert_eq!(v["error"]["message"], msg);
        assert_eq!(v["request_id"], id.as_str());
    };
    let r = c
        .post(&url)
        .header("anthropic-version", "2023-06-01")
        .json(&ok)
        .send()
        .await
        .unwrap();
    check(
        r,
        401,
        "authentication_error",
        "x-api-key header is required",
    )
    .await;
    let r = c
        .post(&url)
        .header("x-api-key", "wrong")
        .header("anthropic-version", "2023-06-01")
        .header("authorization", "Bearer google-token")
        .json(&ok)
        .send()
        .await
        .unwrap();
    check(r, 401, "authentication_error", "invalid x-api-key").await;
    let r = c
        .post(&url)
        .header("x-api-key", KEY)
        .json(&ok)
        .send()
        .await
        .unwrap();
    check(
        r,
        400,
        "invalid_request_error",
        "anthropic-version: header is required",
    )
    .await;
    let mut vertexish = ok.clone();
    vertexish["anthropic_version"] = json!("vertex-2023-10-16");
    let r = send(&sim, &vertexish).await;
    check(
        r,
        400,
        "invalid_request_error",
        "anthropic_version: Extra inputs are not permitted",
    )
    .await;
    let r = send(&sim, &body("claude-nope", "hi", 10)).await;
    check(r, 404, "not_found_error", "model: claude-nope").await;
    for (field, message) in [
        ("max_tokens", "max_tokens: Field required"),
        ("messages", "messages: Field required"),
        ("model", "model: Field required"),
    ] {
        let mut without = ok.clone();
        without.as_object_mut().unwrap().remove(field);
        check(
            send(&sim, &without).await,
            400,
            "invalid_request_error",
            message,
        )
        .await;
    }
    // A beta call, recorded with its headers.
    let r = c
        .post(format!("{url}?beta=true"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = h(&r, "request-id").unwrap();

    let rec = sim.anthropic_recent_requests();
    assert_eq!(rec.len(), 9);
    assert!(!rec[0].has_x_api_key && !rec[0].x_api_key_valid);
    assert!(rec[1].has_x_api_key && !rec[1].x_api_key_valid && rec[1].has_authorization);
    assert_eq!(rec[2].anthropic_version, None);
    assert_eq!(
        rec[3].body.as_ref().unwrap()["anthropic_version"],
        "vertex-2023-10-16"
    );
    let last = rec.last().unwrap();
    assert_eq!(last.request_id, id);
    assert!(last.beta && last.x_api_key_valid && !last.has_authorization);
    assert_eq!(last.anthropic_version.as_deref(), Some("2023-06-01"));
    assert_eq!(
        last.anthropic_beta.as_deref(),
        Some("prompt-caching-2024-07-31")
    );
    assert_eq!((last.status, last.model.as_deref()), (200, Some(SONNET)));
    // Request ids are unique.
    let mut ids: Vec<_> = rec.iter().map(|r| r.request_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 9);
    // Totals count everything; the model only what named it.
    let t = sim.anthropic_total_counters();
    assert_eq!(t.requests, 9);
    assert_eq!(t.errors.get(&401), Some(&2));
    assert_eq!(t.errors.get(&404), Some(&1));
    assert_eq!(sim.anthropic_counters(SONNET).requests, 3);
    // The full log has every request, in order, and nothing reached Vertex.
    let log = sim.anthropic_log();
    let statuses: Vec<u16> = log.entries.iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![401, 401, 400, 400, 404, 400, 400, 400, 200]);
    assert!(sim.recent_requests().is_empty());
    assert_eq!(sim.total_requests(), 0);
}

#[tokio::test]
async fn unary_and_stream_bodies_echo_the_model_without_vertex_quirks() {
    let sim = start(vec![AnthropicModel::unlimited(HAIKU3)]).await;
    let b = body(HAIKU3, "SIM_OUTPUT_TOKENS=3", 100);
    let r = send(&sim, &b).await;
    assert_eq!(h(&r, "content-type").as_deref(), Some("application/json"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], HAIKU3);
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("msg_01"));
    assert_eq!(v["content"][0]["text"], "lorem ipsum dolor");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], count_tokens(&b));
    assert_eq!(v["usage"]["output_tokens"], 3);

    let mut s = b.clone();
    s["stream"] = json!(true);
    let r = send(&sim, &s).await;
    assert_eq!(
        h(&r, "content-type").as_deref(),
        Some("text/event-stream; charset=utf-8")
    );
    assert!(h(&r, "request-id").is_some());
    let text = r.text().await.unwrap();
    let events: Vec<(String, Value)> = text
        .split_terminator("\n\n")
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let data = data.strip_prefix("data: ").unwrap();
            // No padding: the data is exactly its compact JSON (ping aside).
            assert!(!data.ends_with(" }"), "{data}");
            (
                name.strip_prefix("event: ").unwrap().to_owned(),
                serde_json::from_str(data).unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(events[0].1["message"]["model"], HAIKU3);
    assert!(events[0].1["message"]["id"]
        .as_str()
        .unwrap()
        .starts_with("msg_01"));
    assert_eq!(events[7].1["usage"]["output_tokens"], 3);
    let c = sim.anthropic_counters(HAIKU3);
    assert_eq!(
        (
            c.succeeded,
            c.streams_started,
            c.streams_completed,
            c.output_tokens
        ),
        (2, 1, 1, 6)
    );

    // count_tokens: the tokenizer's count, free.
    let ct = json!({"model": HAIKU3, "messages": [{"role": "user", "content": "how many?"}]});
    let r = client()
        .post(format!("{}/v1/messages/count_tokens", sim.base_url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&ct)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(h(&r, "request-id").is_some());
    assert_eq!(
        r.text().await.unwrap(),
        format!("{{\"input_tokens\":{}}}", count_tokens(&ct))
    );
    assert_eq!(sim.anthropic_counters(HAIKU3).count_tokens_requests, 1);
    assert_eq!(sim.anthropic_log().entries.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn count_tokens_is_not_rate_limited() {
    let sim = start(vec![AnthropicModel::new(SONNET, 1, 10, 10)]).await;
    assert_eq!(send(&sim, &body(SONNET, "hi", 10)).await.status(), 200);
    assert_eq!(send(&sim, &body(SONNET, "hi", 10)).await.status(), 429);
    let ct = json!({"model": SONNET, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let r = client()
            .post(format!("{}/v1/messages/count_tokens", sim.base_url()))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&ct)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn faults_aim_at_the_anthropic_surface() {
    let sim = start(vec![AnthropicModel::new(SONNET, 100, 100_000, 100_000)]).await;
    sim.inject(Fault::anthropic(FaultKind::Status(529)).times(1));
    let r = send(&sim, &body(SONNET, "hi", 10)).await;
    assert_eq!(r.status(), 529);
    assert!(h(&r, "retry-after").is_none());
    let id = h(&r, "request-id").unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        format!(
            r#"{{"type":"error","error":{{"type":"overloaded_error","message":"Overloaded"}},"request_id":"{id}"}}"#
        )
    );
    // Nothing was debited.
    assert_eq!(
        sim.anthropic_levels(SONNET)
            .unwrap()
            .1
            .requests
            .unwrap()
            .remaining,
        100
    );
    sim.inject(
        Fault::anthropic(FaultKind::Status(500))
            .for_model(SONNET)
            .times(1),
    );
    let r = send(&sim, &body(SONNET, "hi", 10)).await;
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    sim.inject(Fault::anthropic(FaultKind::Capacity).times(1));
    assert_eq!(send(&sim, &body(SONNET, "hi", 10)).await.status(), 529);
    // Mid-stream: event: error, after the buckets were debited.
    sim.inject(Fault::anthropic(FaultKind::ErrorMidStream { after_events: 4 }).times(1));
    let mut s = body(SONNET, "SIM_OUTPUT_TOKENS=6", 100);
    s["stream"] = json!(true);
    let r = send(&sim, &s).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.ends_with(
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
    ));
    assert!(!text.contains("message_stop"));
    // Vertex traffic is not touched by an anthropic fault, nor the reverse.
    sim.inject(Fault::anthropic(FaultKind::Status(529)));
    sim.inject(Fault::region("us-central1", FaultKind::Status(503)));
    let vertex = client()
        .post(sim.predict_url("p", "europe-west4", "claude-3-haiku@20240307", "rawPredict"))
        .json(&json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(vertex.status(), 200);
    sim.clear_faults();
    sim.inject(Fault::region("us-central1", FaultKind::Status(503)));
    assert_eq!(send(&sim, &body(SONNET, "hi", 10)).await.status(), 200);

    let c = sim.anthropic_counters(SONNET);
    assert_eq!(c.overloaded, 2);
    assert_eq!(c.errors.get(&500), Some(&1));
    assert_eq!(c.succeeded, 1);
    assert_eq!(c.streams_started, 1);
    assert_eq!(c.streams_completed, 0);
    let log = sim.anthropic_log();
    // The errored stream produced its first delta only: 99 credited back.
    let e = log.entries.iter().find(|e| e.stream).unwrap();
    assert_eq!((e.output_reserved, e.output_actual), (100, Some(1)));
    assert!(sim
        .anthropic_admissions_report()
        .iter()
        .all(|r| r.within_limits() && r.levels_consistent));
}

#[tokio::test(start_paused = true)]
async fn limits_lowered_at_run_time_clamp_the_level() {
    let sim = start(vec![AnthropicModel::new(SONNET, 10, 100_000, 100_000)]).await;
    for _ in 0..4 {
        assert_eq!(send(&sim, &body(SONNET, "hi", 10)).await.status(), 200);
    }
    assert_eq!(
        sim.anthropic_levels(SONNET)
            .unwrap()
            .1
            .requests
            .unwrap()
            .remaining,
        6
    );
    assert!(sim.set_anthropic_limits(SONNET, AnthropicLimits::new(3, 100_000, 100_000)));
    assert_eq!(
        sim.anthropic_limits(SONNET),
        Some(AnthropicLimits::new(3, 100_000, 100_000))
    );
    assert_eq!(
        sim.anthropic_levels(SONNET)
            .unwrap()
            .1
            .requests
            .unwrap()
            .remaining,
        3
    );
    for _ in 0..3 {
        assert_eq!(send(&sim, &body(SONNET, "hi", 10)).await.status(), 200);
    }
    let r = send(&sim, &body(SONNET, "hi", 10)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        h(&r, "anthropic-ratelimit-requests-limit").as_deref(),
        Some("3")
    );
    // 3 per 60 s: one every 20 s.
    assert_eq!(h(&r, "retry-after").as_deref(), Some("20"));

    // Over the control API: lower RPM to 1, drop the token limits.
    let c = client();
    let r = c
        .put(format!("{}/_sim/anthropic/limits", sim.base_url()))
        .json(&json!({"model": SONNET, "requests_per_min": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let v: Value = c
        .get(format!("{}/_sim/anthropic/limits", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v[SONNET]["limits"]["requests_per_min"], 1);
    assert!(v[SONNET]["limits"]["input_tokens_per_min"].is_null());
    assert_eq!(v[SONNET]["levels"]["requests"]["remaining"], 0);
    let bad = c
        .put(format!("{}/_sim/anthropic/limits", sim.base_url()))
        .json(&json!({"model": SONNET, "rpm": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    tokio::time::advance(Duration::from_secs(60)).await;
    let r = send(&sim, &body(SONNET, "hi", 10)).await;
    assert_eq!(r.status(), 200);
    assert!(h(&r, "anthropic-ratelimit-input-tokens-limit").is_none());
    // The log has every change, and the replay agrees with the simulator.
    let log = sim.anthropic_log();
    assert_eq!(log.limit_changes.len(), 3);
    let r = &replay_admissions(&log)[0];
    assert!(r.within_limits() && r.levels_consistent, "{r:?}");
    assert_eq!(r.limits.requests_per_min, Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_long_mixed_run_never_overdraws_a_bucket_and_a_forged_log_is_caught() {
    let sim = start(vec![
        AnthropicModel::new(SONNET, 120, 20_000, 4_000),
        AnthropicModel::new(HAIKU3, 60, 8_000, 2_000),
    ])
    .await;
    let mut ok = 0;
    for batch in 0..150u64 {
        // Ten concurrent requests, then 0.7 s later the next ten.
        let mut handles = Vec::new();
        for j in 0..10u64 {
            let i = batch * 10 + j;
            let sim = sim.clone();
            let model = if i % 3 == 0 { HAIKU3 } else { SONNET };
            let text = format!(
                "SIM_OUTPUT_TOKENS={} {}",
                i % 40,
                "lorem ".repeat((i % 50) as usize)
            );
            let mut b = body(model, &text, 50 + (i * 37) % 300);
            if i % 4 == 0 {
                b["stream"] = json!(true);
            }
            handles.push(tokio::spawn(async move {
                let r = send(&sim, &b).await;
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            }));
        }
        for h in handles {
            let s = h.await.unwrap();
            assert!(s == 200 || s == 429, "{s}");
            ok += u64::from(s == 200);
        }
        tokio::time::advance(Duration::from_millis(700)).await;
    }
    let log = sim.anthropic_log();
    assert!(log.complete);
    assert_eq!(log.entries.len(), 1500);
    let reports = replay_admissions(&log);
    assert_eq!(reports.len(), 2);
    let admitted: u64 = reports.iter().map(|r| r.admitted).sum();
    assert_eq!(admitted, ok);
    for r in &reports {
        assert!(r.within_limits(), "{r:?}");
        assert!(r.levels_consistent, "{r:?}");
        assert!(
            r.rate_limited > 0,
            "the run should have hit the limits: {r:?}"
        );
        assert!(r.min_level.requests.unwrap() >= 0);
    }
    // Every admitted answer was credited back.
    assert!(log
        .entries
        .iter()
        .filter(|e| e.admitted)
        .all(|e| e.output_actual.is_some()));

    // Forge the log: turn one refusal into an admission charged what an
    // admitted neighbour was. The replay must see the overdraft.
    let mut forged = log.clone();
    let refused = forged
        .entries
        .iter()
        .position(|e| e.rejected.is_some())
        .unwrap();
    let model = forged.entries[refused].model.clone();
    forged.entries[refused].admitted = true;
    forged.entries[refused].rejected = None;
    forged.entries[refused].input_tokens = 1_000_000;
    forged.entries[refused].output_reserved = 4_000;
    let bad = replay_admissions(&forged);
    let r = bad
        .iter()
        .find(|r| Some(&r.model) == model.as_ref())
        .unwrap();
    assert!(!r.within_limits(), "{r:?}");
    assert_eq!(r.first_violation_seq, Some(forged.entries[refused].seq));

    // Over HTTP too, and a reset starts a new, clean run.
    let c = client();
    let v: Value = c
        .get(format!("{}/_sim/anthropic/report", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(v.as_array().unwrap().iter().all(|r| r["violations"] == 0));
    let counters: Value = c
        .get(format!("{}/_sim/anthropic/counters", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["total"]["requests"], 1500);
    let log_json: Value = c
        .get(format!("{}/_sim/anthropic/log", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log_json["entries"].as_array().unwrap().len(), 1500);
    assert_eq!(
        c.post(format!("{}/_sim/reset", sim.base_url()))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let log = sim.anthropic_log();
    assert!(log.entries.is_empty());
    assert_eq!(log.limit_changes.len(), 2);
    assert_eq!(sim.anthropic_total_counters().requests, 0);
    assert!(sim.anthropic_recent_requests().is_empty());
    let levels = sim.anthropic_levels(SONNET).unwrap().1;
    assert_eq!(levels.output_tokens.unwrap().remaining, 4_000);
}

#[tokio::test]
async fn without_an_anthropic_section_v1_messages_stays_404() {
    let sim = Simulator::start(SimConfig::vertex_defaults(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let r = client()
        .post(sim.anthropic_messages_url())
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&body(SONNET, "hi", 10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "NOT_FOUND");
    assert!(!sim.set_anthropic_limits(SONNET, AnthropicLimits::default()));
    assert!(sim.anthropic_api_key().is_none());
    let r = client()
        .get(format!("{}/_sim/anthropic/counters", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
