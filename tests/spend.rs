//! Spend per tenant, end to end: the real gateway over loopback in front of
//! the in-process simulator, on tokio's paused clock (a day passes in
//! milliseconds), with the in-memory SQLite batch store of the demo config
//! as the spend store.
//!
//! What the counters say must be the simulator's reported usage at the
//! model's configured prices (unary, streamed and batch items, cache reads
//! and writes included); a daily and a monthly cap refuse with the cap, the
//! amount and the reset in the message and retry-after up to the UTC reset;
//! a tenant without a cap is never refused for spend.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use spillway_core::spend::days_from_civil;
use support::*;
use tokio::time::sleep;

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// Claude 3 Haiku's list prices (config/default.toml), picodollars a token.
const INPUT: u64 = 250_000;
const OUTPUT: u64 = 1_250_000;
const CACHE_WRITE: u64 = 300_000;
const CACHE_WRITE_1H: u64 = 500_000;
const CACHE_READ: u64 = 30_000;

const CAPPED_KEY: &str = "sk-spw-spend-capped-0123456789";
const FREE_KEY: &str = "sk-spw-spend-free-0123456789";

/// What `usage` (as Vertex reports it) costs at Haiku's prices, in dollars.
fn priced(usage: &Value) -> f64 {
    let n = |k: &str| usage[k].as_u64().unwrap_or(0);
    let write_1h = usage["cache_creation"]["ephemeral_1h_input_tokens"]
        .as_u64()
        .unwrap_or(0);
    let pico = n("input_tokens") * INPUT
        + n("output_tokens") * OUTPUT
        + (n("cache_creation_input_tokens") - write_1h) * CACHE_WRITE
        + write_1h * CACHE_WRITE_1H
        + n("cache_read_input_tokens") * CACHE_READ;
    pico as f64 / 1e12
}

fn message(text: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": HAIKU,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": text}]
    })
}

fn spend_series(tenant: &str, traffic: &str) -> String {
    format!(
        "spillway_spend_usd_total{{model=\"{HAIKU}\",tenant=\"{tenant}\",traffic=\"{traffic}\"}}"
    )
}

#[tokio::test(start_paused = true)]
async fn spend_is_the_reported_usage_at_the_model_prices_for_unary_streams_and_batch_items() {
    let h = Harness::start("[quota]\ntokens_per_min = 10000000\n").await;
    // Cache reads, writes and (4 of the 12) 1-hour writes, each at its price.
    let prompt = "Summarise the report SIM_CACHE_READ=40 SIM_CACHE_WRITE=12 SIM_CACHE_WRITE_1H=4 SIM_OUTPUT_TOKENS=30 \
                  lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor \
                  incididunt ut labore et dolore magna aliqua";
    let mut interactive = 0.0;

    // Unary.
    let r = h
        .post_json("/v1/messages", &message(prompt, 64, false))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let usage = &body["usage"];
    assert!(
        usage["cache_read_input_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );
    assert!(
        usage["cache_creation_input_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );
    assert_eq!(
        usage["cache_creation"]["ephemeral_1h_input_tokens"], 4,
        "{body}"
    );
    interactive += priced(usage);

    // A stream: input and cache from message_start, output from the last
    // message_delta.
    let r = h
        .post_json("/v1/messages", &message(prompt, 64, true))
        .await;
    assert_eq!(r.status(), 200);
    let events = read_events(r).await;
    let start = &events.iter().find(|(n, _)| n == "message_start").unwrap().1;
    let mut usage = start["message"]["usage"].clone();
    let last = &events
        .iter()
        .rev()
        .find(|(n, _)| n == "message_delta")
        .unwrap()
        .1;
    usage["output_tokens"] = last["usage"]["output_tokens"].clone();
    assert_eq!(usage["output_tokens"], 30, "{events:?}");
    assert_eq!(
        usage["cache_creation"]["ephemeral_1h_input_tokens"], 4,
        "{events:?}"
    );
    interactive += priced(&usage);

    // Uncached, plain.
    let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
    let body: Value = r.json().await.unwrap();
    interactive += priced(&body["usage"]);

    // Batch items: priced like interactive calls (they are online calls to
    // Vertex), counted as traffic="batch".
    let requests: Vec<Value> = (0..3)
        .map(|i| {
            json!({"custom_id": format!("item-{i}"), "params": message(
                &format!("SIM_CACHE_READ={} SIM_CACHE_WRITE=3 SIM_OUTPUT_TOKENS={} item {i}", 5 + i, 4 + i), 32, false)})
        })
        .collect();
    let created: Value = h
        .post_json("/v1/messages/batches", &json!({ "requests": requests }))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let ended = loop {
        let b: Value = h
            .http
            .get(format!("{}/v1/messages/batches/{id}", h.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if b["processing_status"] == "ended" {
            break b;
        }
        sleep(Duration::from_secs(1)).await;
    };
    let text = h
        .http
        .get(ended["results_url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let batch: f64 = text
        .lines()
        .map(|l| {
            let line: Value = serde_json::from_str(l).unwrap();
            assert_eq!(line["result"]["type"], "succeeded", "{line}");
            priced(&line["result"]["message"]["usage"])
        })
        .sum();
    assert!(batch > 0.0);

    let metrics = h.metrics().await;
    let got_interactive = series_value(&metrics, &spend_series("anonymous", "interactive"));
    let got_batch = series_value(&metrics, &spend_series("anonymous", "batch"));
    assert!(
        (got_interactive - interactive).abs() < 1e-12,
        "interactive: counted {got_interactive}, usage × prices {interactive}"
    );
    assert!(
        (got_batch - batch).abs() < 1e-12,
        "batch: counted {got_batch}, usage × prices {batch}"
    );
    // The tenant's day and month hold all of it (to the nanodollar a request).
    for period in ["day", "month"] {
        let today = series_value(
            &metrics,
            &format!("spillway_tenant_spend_usd{{period=\"{period}\",tenant=\"anonymous\"}}"),
        );
        assert!(
            (today - (interactive + batch)).abs() < 1e-8,
            "{period}: {today} vs {}",
            interactive + batch
        );
    }
    // A model without prices would have no series; an unpriced count_tokens
    // costs nothing.
    let before = series_value(
        &h.metrics().await,
        &spend_series("anonymous", "interactive"),
    );
    let r = h
        .post_json(
            "/v1/messages/count_tokens",
            &json!({"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let after = series_value(
        &h.metrics().await,
        &spend_series("anonymous", "interactive"),
    );
    assert_eq!(before, after, "count_tokens is free");
}

/// Two tenants that present keys (the demo runs without client auth, and a
/// configured tenant's key still counts as that tenant): one capped, one not.
fn tenants(caps: &str) -> String {
    format!(
        "[quota]\ntokens_per_min = 10000000\n\
         [tenants.capped]\nkey_sha256 = \"{}\"\n{caps}\n\
         [tenants.free]\nkey_sha256 = \"{}\"\n",
        spillway_gateway::auth::hash_key(CAPPED_KEY),
        spillway_gateway::auth::hash_key(FREE_KEY),
    )
}

/// One expensive request (10,000 output tokens: $0.0125 on Haiku) as `key`.
async fn expensive(h: &Harness, key: &str) -> reqwest::Response {
    h.http
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", key)
        .json(&message(
            "SIM_OUTPUT_TOKENS=10000 write at length",
            10_000,
            false,
        ))
        .send()
        .await
        .unwrap()
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A gateway whose spend clock reads `unix_ms` when it starts serving.
async fn at(unix_ms: i64, caps: &str) -> Harness {
    Harness::start_hooked(
        spillway_sim::SimConfig::vertex_defaults(),
        |_| tenants(caps),
        move |gateway| gateway.state().spend.set_now_ms(unix_ms),
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn a_daily_cap_refuses_naming_it_until_utc_midnight_and_no_cap_is_unlimited() {
    // 2026-11-27T23:00:00Z.
    let t0 = days_from_civil(2026, 11, 27) * DAY_MS + 23 * HOUR_MS;
    let h = at(t0, "spend_cap_usd_per_day = 0.02").await;
    assert_eq!(expensive(&h, CAPPED_KEY).await.status(), 200);
    // $0.0125 spent, under the cap: admitted, and it takes the day to $0.025.
    assert_eq!(expensive(&h, CAPPED_KEY).await.status(), 200);
    let sent = h.sim.total_requests();

    let refused = expensive(&h, CAPPED_KEY).await;
    let wait = retry_after(&refused);
    assert!((3500..=3600).contains(&wait), "retry-after {wait}");
    assert!(!refused.headers().contains_key("x-should-retry"));
    let message = expect_error(refused, 429, "rate_limit_error").await;
    assert!(
        message.starts_with(
            "tenant capped has reached its daily spend cap of $0.0200 (spent $0.0250 on 2026-11-27 (UTC)); it resets at 2026-11-28T00:00:00Z"
        ),
        "{message}"
    );
    assert_eq!(
        h.sim.total_requests(),
        sent,
        "a refused request never reaches Vertex"
    );

    // The tenant without a cap is never refused for spend.
    for _ in 0..4 {
        assert_eq!(expensive(&h, FREE_KEY).await.status(), 200);
    }
    let metrics = h.metrics().await;
    assert_eq!(
        series_value(
            &metrics,
            "spillway_spend_cap_refusals_total{period=\"day\",tenant=\"capped\"}"
        ),
        1.0
    );
    assert_eq!(
        series_value(
            &metrics,
            "spillway_tenant_spend_cap_usd{period=\"day\",tenant=\"capped\"}"
        ),
        0.02
    );
    assert!(!metrics.contains("spillway_tenant_spend_cap_usd{period=\"day\",tenant=\"free\"}"));
    let free = series_value(&metrics, &spend_series("free", "interactive"));
    assert!(free >= 4.0 * 0.0125, "{free}");

    // At midnight (UTC) the day starts over.
    sleep(Duration::from_secs(wait)).await;
    assert_eq!(expensive(&h, CAPPED_KEY).await.status(), 200);
    let metrics = h.metrics().await;
    let today = series_value(
        &metrics,
        "spillway_tenant_spend_usd{period=\"day\",tenant=\"capped\"}",
    );
    assert!(
        (0.0125..0.013).contains(&today),
        "the new day holds one request: {today}"
    );
    let month = series_value(
        &metrics,
        "spillway_tenant_spend_usd{period=\"month\",tenant=\"capped\"}",
    );
    assert!(
        (0.0375..0.039).contains(&month),
        "the month holds all three: {month}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_monthly_cap_holds_across_days_until_the_month_ends() {
    // 2026-11-29T12:00:00Z; the month ends in 36 hours.
    let t0 = days_from_civil(2026, 11, 29) * DAY_MS + 12 * HOUR_MS;
    // A day of paused time fires every periodic timer on the way: sync and
    // poll once a minute, not once a second.
    let h = at(
        t0,
        "spend_cap_usd_per_month = 0.03\n[spend]\nsync_ms = 60000\n[batch]\npoll_ms = 60000",
    )
    .await;
    assert_eq!(expensive(&h, CAPPED_KEY).await.status(), 200);
    assert_eq!(expensive(&h, CAPPED_KEY).await.status(), 200);
    // A new day is not a new month: $0.025 spent, under the cap.
    sleep(Duration::from_secs(86_400)).await;
    assert_eq!(expensive(&h, CAPPED_KEY).await.status(), 200);
    let refused = expensive(&h, CAPPED_KEY).await;
    let wait = retry_after(&refused);
    assert!((43_000..=43_200).contains(&wait), "retry-after {wait}");
    let said = expect_error(refused, 429, "rate_limit_error").await;
    assert!(
        said.starts_with(
            "tenant capped has reached its monthly spend cap of $0.0300 (spent $0.0375 in 2026-11 (UTC)); it resets at 2026-12-01T00:00:00Z"
        ),
        "{said}"
    );
    // Streams are refused the same way, before anything is sent.
    let r = h
        .http
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", CAPPED_KEY)
        .json(&message("hi", 16, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    sleep(Duration::from_secs(wait)).await;
    assert_eq!(expensive(&h, CAPPED_KEY).await.status(), 200);
}
