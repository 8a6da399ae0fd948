//! The quota engine end to end, on tokio's paused clock: the gateway and
//! the simulator (a strict sliding-window Vertex) run in one runtime over
//! loopback, and minutes of traffic pass in milliseconds, deterministically.

mod support;

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use spillway_sim::{Fault, FaultKind, SimConfig};
use support::*;
use tokio::time::{advance, sleep, Instant};

const ONE_REGION: &str =
    "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\" }]\n";

fn with_output(tokens: u32, max_tokens: u64) -> Value {
    json!({
        "model": HAIKU,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS={tokens} hello")}]
    })
}

async fn post(h: &Harness, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = h.http.post(format!("{}/v1/messages", h.url)).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.send().await.expect("gateway answers")
}

fn region_of(response: &reqwest::Response) -> String {
    response.headers()["x-spillway-region"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn two_regions_take_120_quick_requests_without_an_upstream_429() {
    let h = Harness::start("[scheduler]\nmax_wait_cap_ms = 120000\n").await;
    let body = hello(HAIKU);
    let responses = join_all((0..120).map(|_| post(&h, &body, &[]))).await;
    let mut us = 0;
    for r in &responses {
        assert_eq!(r.status(), 200);
        if region_of(r) == "us-central1" {
            us += 1;
        }
    }
    assert_eq!(us, 60, "most-headroom routing splits evenly");
    for region in ["us-central1", "europe-west4"] {
        let c = h.sim.counters(region, HAIKU);
        assert_eq!((c.requests, c.rate_limited), (60, 0), "{region}");
    }
    // The 121st waits for the window: a minute of virtual time, no 429.
    let started = Instant::now();
    let r = post(&h, &hello(HAIKU), &[("x-spillway-max-wait-ms", "61000")]).await;
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert_eq!(h.sim.counters("us-central1", HAIKU).rate_limited, 0);
    assert_eq!(h.sim.counters("europe-west4", HAIKU).rate_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_headers_come_from_the_ledger() {
    let h = Harness::start(ONE_REGION).await;
    let r = post(&h, &with_output(5, 100), &[]).await;
    assert_eq!(r.status(), 200);
    let header = |name: &str| r.headers()[name].to_str().unwrap().to_string();
    assert_eq!(header("anthropic-ratelimit-requests-limit"), "60");
    assert_eq!(header("anthropic-ratelimit-requests-remaining"), "59");
    assert_eq!(header("anthropic-ratelimit-tokens-limit"), "50000");
    let remaining: u64 = header("anthropic-ratelimit-tokens-remaining")
        .parse()
        .unwrap();
    assert!(
        remaining < 50_000 - 100,
        "{remaining}: the reservation counts"
    );
    assert!(header("anthropic-ratelimit-requests-reset").ends_with('Z'));
}

#[tokio::test(start_paused = true)]
async fn large_prompts_spill_over_on_tokens_and_wait_honestly() {
    let h = Harness::start("").await;
    // 170,000 characters ≈ 48,572 estimated tokens: one such request fills a
    // region's 50,000 tokens/min. (The simulator counts this text as 42,500.)
    let prompt = "abcdefg ".repeat(170_000 / 8);
    let body = json!({"model": HAIKU, "max_tokens": 100,
        "messages": [{"role": "user", "content": prompt}]});
    let first = post(&h, &body, &[]).await;
    let second = post(&h, &body, &[]).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    assert_ne!(
        region_of(&first),
        region_of(&second),
        "the second spills over"
    );

    // A third cannot fit before a minute: with a short deadline it is told
    // so at once, with a retry time that is true.
    let started = Instant::now();
    let third = post(&h, &body, &[("x-spillway-max-wait-ms", "5000")]).await;
    assert_eq!(started.elapsed(), Duration::ZERO, "no pointless waiting");
    assert_eq!(third.status(), 429);
    let retry_ms: u64 = third.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let retry_s: u64 = third.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((59_000..=61_000).contains(&retry_ms), "{retry_ms}");
    assert_eq!(retry_s, retry_ms.div_ceil(1000));
    let body_json: Value = third.json().await.unwrap();
    assert_eq!(body_json["error"]["type"], "rate_limit_error");

    // Coming back exactly when told succeeds.
    advance(Duration::from_millis(retry_ms)).await;
    let fourth = post(&h, &body, &[("x-spillway-max-wait-ms", "0")]).await;
    assert_eq!(fourth.status(), 200);
    for region in ["us-central1", "europe-west4"] {
        assert_eq!(h.sim.counters(region, HAIKU).rate_limited, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn requests_that_can_never_fit_are_refused_with_the_numbers() {
    let h = Harness::start("").await;
    // Refusals for good rest on the floor (dense bytes / 16), never on a
    // learned or padded estimate, nor on max_tokens against the quota.
    let huge = json!({"model": HAIKU, "max_tokens": 4096,
        "messages": [{"role": "user", "content": "x".repeat(3_300_000)}]});
    let r = post(&h, &huge, &[]).await;
    assert_eq!(r.headers()["x-should-retry"], "false");
    let m = expect_error(r, 400, "invalid_request_error").await;
    assert!(m.contains("context window") && m.contains("200000"), "{m}");

    let big = json!({"model": HAIKU, "max_tokens": 4096,
        "messages": [{"role": "user", "content": "x".repeat(820_000)}]});
    let m = expect_error(post(&h, &big, &[]).await, 400, "invalid_request_error").await;
    assert!(m.contains("50000") && m.contains("51250"), "{m}");
    assert_eq!(h.sim.total_requests(), 0);
}

#[tokio::test(start_paused = true)]
async fn upstream_failures_fall_back_to_another_region() {
    for kind in [
        FaultKind::Status(429),
        FaultKind::Status(503),
        FaultKind::Status(529),
        FaultKind::Reset,
    ] {
        let h = Harness::start("[quota]\nstrategy = \"ordered\"\n").await;
        h.sim.inject(Fault::region("us-central1", kind).times(1));
        let r = post(&h, &hello(HAIKU), &[]).await;
        assert_eq!(r.status(), 200, "{kind:?}");
        assert_eq!(region_of(&r), "europe-west4", "{kind:?}");
        // The failed region cools down: the next request goes elsewhere too.
        let r = post(&h, &hello(HAIKU), &[]).await;
        assert_eq!(region_of(&r), "europe-west4", "{kind:?}");
        // After the cooldown the primary serves again.
        advance(Duration::from_secs(3)).await;
        let r = post(&h, &hello(HAIKU), &[]).await;
        assert_eq!(region_of(&r), "us-central1", "{kind:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_timeout_falls_back_too() {
    let h = Harness::start("[quota]\nstrategy = \"ordered\"\n[upstream]\nread_timeout_ms = 2000\n")
        .await;
    h.sim
        .inject(Fault::region("us-central1", FaultKind::Hang(Duration::from_secs(600))).times(1));
    let r = post(&h, &hello(HAIKU), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(region_of(&r), "europe-west4");
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_never_replayed_once_bytes_went_out() {
    let h = Harness::start("[quota]\nstrategy = \"ordered\"\n").await;
    h.sim.inject(
        Fault::region("us-central1", FaultKind::DropMidStream { after_events: 2 }).times(1),
    );
    let mut body = with_output(20, 100);
    body["stream"] = json!(true);
    let r = post(&h, &body, &[]).await;
    assert_eq!(r.status(), 200);
    let events = read_events(r).await;
    assert_eq!(events.last().unwrap().0, "error");
    assert_eq!(
        h.sim.counters("europe-west4", HAIKU).requests,
        0,
        "no replay"
    );
}

#[tokio::test(start_paused = true)]
async fn a_region_whose_true_quota_is_lower_converges_with_few_429s() {
    // Configured at 60/min; Vertex really allows 40.
    let h = Harness::start(ONE_REGION).await;
    h.sim.set_quota("us-central1", HAIKU, 40, 50_000);
    let windows = 8;
    // Offer 60/min, one a second, each willing to wait a minute.
    let sends = (0..60 * windows).map(|i| {
        let h = &h;
        async move {
            sleep(Duration::from_secs(i)).await;
            post(h, &hello(HAIKU), &[("x-spillway-max-wait-ms", "60000")])
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = join_all(sends).await;
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    let c = h.sim.counters("us-central1", HAIKU);
    // Capacity over the run is about 40 per window.
    assert!(
        ok >= 40 * windows * 90 / 100,
        "{ok} successes of {} capacity",
        40 * windows
    );
    assert!(c.rate_limited <= 8, "{} upstream 429s", c.rate_limited);
    let rejected = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        ok as usize + rejected,
        statuses.len(),
        "only successes and honest 429s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_waiter_leaves_the_queue_and_its_reservation() {
    let h = Harness::start(
        "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\", requests_per_min = 1 }]\n[scheduler]\nmax_wait_cap_ms = 120000\n",
    )
    .await;
    assert_eq!(post(&h, &hello(HAIKU), &[]).await.status(), 200);
    // This one waits for the window... and its client gives up.
    let body = hello(HAIKU);
    let waiting = post(&h, &body, &[("x-spillway-max-wait-ms", "90000")]);
    let gave_up = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(gave_up.is_err());
    sleep(Duration::from_millis(10)).await;
    // The next request is first in line once the window frees: nothing was
    // reserved or sent for the one that left.
    let r = post(&h, &hello(HAIKU), &[("x-spillway-max-wait-ms", "90000")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.sim.counters("us-central1", HAIKU).requests, 2);
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_by_its_client_is_charged_what_was_observed() {
    // 50,000 tokens/min: a stream reserving 40,000 output tokens blocks a
    // second one until it settles.
    let h = Harness::start(ONE_REGION).await;
    h.sim.inject(Fault::region(
        "us-central1",
        FaultKind::Delay {
            first_token: Duration::ZERO,
            per_token: Duration::from_secs(1),
        },
    ));
    let mut body = with_output(1000, 40_000);
    body["stream"] = json!(true);
    let response = post(&h, &body, &[]).await;
    assert_eq!(response.status(), 200);
    let blocked = post(&h, &body, &[("x-spillway-max-wait-ms", "0")]).await;
    assert_eq!(blocked.status(), 429, "the reservation holds the tokens");
    drop(response);
    sleep(Duration::from_millis(50)).await;
    h.sim.clear_faults();
    let after = post(&h, &body, &[("x-spillway-max-wait-ms", "0")]).await;
    assert_eq!(
        after.status(),
        200,
        "the cut stream's unused output was refunded"
    );
}

#[tokio::test(start_paused = true)]
async fn tenants_share_a_contended_pool_by_weight() {
    let (a, b) = ("sk-spw-tenant-a", "sk-spw-tenant-b");
    let overlay = format!(
        "{ONE_REGION}[server]\nauth = \"api_key\"\n[tenants.heavy]\nkey_sha256 = \"{}\"\nweight = 3\n[tenants.light]\nkey_sha256 = \"{}\"\nweight = 1\n",
        spillway_gateway::auth::hash_key(a),
        spillway_gateway::auth::hash_key(b)
    );
    let h = Harness::start(&overlay).await;
    let served_in_window = |key: &'static str| {
        let h = &h;
        async move {
            let mut served = Vec::new();
            // Each tenant keeps 40 requests waiting, far more than the pool.
            let sends = (0..200).map(|i| async move {
                sleep(Duration::from_millis(i * 500)).await;
                let r = h
                    .http
                    .post(format!("{}/v1/messages", h.url))
                    .header("x-api-key", key)
                    .header("x-spillway-max-wait-ms", "60000")
                    .json(&hello(HAIKU))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), Instant::now())
            });
            for (status, at) in join_all(sends).await {
                if status == 200 {
                    served.push(at);
                }
            }
            served
        }
    };
    let start = Instant::now();
    let (heavy, light) = tokio::join!(served_in_window(a), served_in_window(b));
    // Count what each got once both were competing (skip the first window).
    let from = start + Duration::from_secs(61);
    let to = start + Duration::from_secs(100);
    let count = |v: &Vec<Instant>| v.iter().filter(|t| **t >= from && **t < to).count() as f64;
    let (h3, l1) = (count(&heavy), count(&light));
    let share = h3 / (h3 + l1);
    assert!(h3 + l1 > 20.0, "{h3} + {l1}");
    assert!(
        (0.70..=0.80).contains(&share),
        "heavy got {share:.3} ({h3} vs {l1})"
    );
}

#[tokio::test(start_paused = true)]
async fn regions_can_be_narrowed_per_request_and_per_tenant() {
    let h = Harness::start("").await;
    let r = post(&h, &hello(HAIKU), &[("x-spillway-regions", "europe-west4")]).await;
    assert_eq!(region_of(&r), "europe-west4");
    let m = expect_error(
        post(
            &h,
            &hello(HAIKU),
            &[("x-spillway-regions", "asia-southeast1")],
        )
        .await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(m.contains("asia-southeast1"), "{m}");

    let key = "sk-spw-eu-only";
    let h = Harness::start(&format!(
        "[server]\nauth = \"api_key\"\n[tenants.eu]\nkey_sha256 = \"{}\"\nregions = [\"europe-west4\"]\n",
        spillway_gateway::auth::hash_key(key)
    ))
    .await;
    for _ in 0..3 {
        let r = h
            .http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", key)
            .json(&hello(HAIKU))
            .send()
            .await
            .unwrap();
        assert_eq!(region_of(&r), "europe-west4");
    }
    let r = h
        .http
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", key)
        .json(&hello(SONNET))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_request_error").await;
}

#[tokio::test(start_paused = true)]
async fn tenant_caps_apply_across_regions() {
    let key = "sk-spw-capped";
    let h = Harness::start(&format!(
        "[server]\nauth = \"api_key\"\n[tenants.capped]\nkey_sha256 = \"{}\"\nrequests_per_min = 2\n",
        spillway_gateway::auth::hash_key(key)
    ))
    .await;
    let send = || {
        h.http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", key)
            .json(&hello(HAIKU))
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    assert_eq!(send().await.unwrap().status(), 200);
    let r = send().await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    expect_error(r, 429, "rate_limit_error").await;
    assert_eq!(h.sim.total_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn learned_estimates_cut_over_reservation_without_429s() {
    // The simulator counts this text at about 4.25 characters a token, so
    // chars/3.5 over-reserves; learning brings the reservation to the truth.
    let h = Harness::start(ONE_REGION).await;
    let text = "abcdefghijklmnop ".repeat(1_500);
    let body = json!({"model": HAIKU, "max_tokens": 1,
        "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS=1 {text}")}]});
    let truth = spillway_sim::count_tokens(&body);
    let remaining = |r: &reqwest::Response| -> u64 {
        r.headers()["anthropic-ratelimit-tokens-remaining"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = post(&h, &body, &[]).await;
    let first_reserved = 50_000 - remaining(&first);
    advance(Duration::from_secs(62)).await;
    for _ in 0..20 {
        assert_eq!(post(&h, &body, &[]).await.status(), 200);
        advance(Duration::from_secs(20)).await;
    }
    advance(Duration::from_secs(62)).await;
    let later = post(&h, &body, &[]).await;
    let later_reserved = 50_000 - remaining(&later);
    assert!(
        later_reserved < first_reserved,
        "{later_reserved} < {first_reserved}"
    );
    assert!(
        later_reserved >= truth,
        "{later_reserved} still covers the truth {truth}"
    );
    assert_eq!(h.sim.counters("us-central1", HAIKU).rate_limited, 0);
    let _ = SimConfig::vertex_defaults();
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_mid_stream_stops_the_upstream_stream() {
    // Vertex bills what it generates: when the client goes, Spillway must
    // drop the upstream stream rather than read it to the end.
    let h = Harness::start(ONE_REGION).await;
    h.sim.inject(Fault::region(
        "us-central1",
        FaultKind::Delay {
            first_token: Duration::ZERO,
            per_token: Duration::from_secs(1),
        },
    ));
    let mut body = with_output(120, 200);
    body["stream"] = json!(true);
    let mut response = post(&h, &body, &[]).await;
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap();
    assert!(first.is_some());
    drop(response);
    advance(Duration::from_secs(300)).await;
    sleep(Duration::from_millis(10)).await;
    let c = h.sim.counters("us-central1", HAIKU);
    assert_eq!(c.streams_started, 1);
    assert_eq!(
        c.streams_completed, 0,
        "the upstream stream was abandoned, not drained"
    );
}
