//! Sharing one pool under contention, through the real router and batch
//! runner on tokio's paused clock (2 regions × 60 requests a minute of
//! Haiku: a pool of 2 requests a second):
//!
//! - a batch of ten times the pool runs while interactive traffic asks for
//!   half of it: interactive is served at once, batch takes the rest;
//! - tenants of weight 3 and 1 that both want three times the pool are
//!   served 3 : 1 over the windows (1 : 1 with equal weights), and a tenant
//!   alone gets the whole pool.
//!
//! The simulator is the truth for "no upstream 429" and "no window over
//! budget"; served counts are what the clients got.

mod support;

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use support::*;
use tokio::time::{sleep, sleep_until, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Both regions' requests per window.
const POOL: usize = 120;

fn message(text: &str) -> Value {
    json!({"model": HAIKU, "max_tokens": 16,
           "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS=3 {text}")}]})
}

fn assert_pool_kept(h: &Harness) {
    for region in ["us-central1", "europe-west4"] {
        assert_eq!(h.sim.counters(region, HAIKU).rate_limited, 0, "{region}");
    }
    for r in h.sim.bucket_reports(WINDOW) {
        assert!(r.within_limits(), "{:?} peaked at {:?}", r.id, r.peak);
    }
}

async fn batch_succeeded(h: &Harness, id: &str) -> i64 {
    let r = h
        .http
        .get(format!("{}/v1/messages/batches/{id}", h.url))
        .send()
        .await
        .unwrap();
    let batch: Value = r.json().await.unwrap();
    batch["request_counts"]["succeeded"].as_i64().unwrap()
}

fn percentile(mut values: Vec<Duration>, q: f64) -> Duration {
    values.sort();
    let i = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
    values[i]
}

#[tokio::test(start_paused = true)]
async fn interactive_traffic_is_served_at_once_while_a_batch_runs() {
    let h = Harness::start("[scheduler]\nmax_wait_cap_ms = 120000\n").await;
    let items: Vec<Value> = (0..POOL * 10)
        .map(|i| json!({"custom_id": format!("b{i}"), "params": message(&format!("item {i}"))}))
        .collect();
    let r = h
        .post_json("/v1/messages/batches", &json!({"requests": items}))
        .await;
    assert_eq!(r.status(), 200);
    let batch: Value = r.json().await.unwrap();
    let id = batch["id"].as_str().unwrap().to_string();
    // The batch alone for a window: it fills the pool.
    sleep(WINDOW).await;
    let before = batch_succeeded(&h, &id).await;
    assert!(
        before as f64 >= 0.9 * POOL as f64,
        "batch alone got {before}"
    );

    // Interactive at half the pool's rate (1/s) for three windows.
    let start = Instant::now();
    let seconds = 3 * WINDOW.as_secs();
    let sends = (0..seconds).map(|i| {
        let h = &h;
        async move {
            sleep_until(start + Duration::from_secs(i)).await;
            let sent = Instant::now();
            let r = h
                .post_json("/v1/messages", &message(&format!("user {i}")))
                .await;
            (r.status().as_u16(), sent.elapsed())
        }
    });
    let outcomes = join_all(sends).await;
    let after = batch_succeeded(&h, &id).await;

    let slowest = outcomes
        .iter()
        .enumerate()
        .max_by_key(|(_, o)| o.1)
        .map(|(i, o)| (i, o.1));
    println!("slowest interactive request (second, wait): {slowest:?}");
    let refused: Vec<u16> = outcomes.iter().map(|o| o.0).filter(|s| *s != 200).collect();
    let waits: Vec<Duration> = outcomes.iter().map(|o| o.1).collect();
    let p95 = percentile(waits, 0.95);
    let served = outcomes.len() - refused.len();
    let batch_got = (after - before) as f64;
    let left = (3 * POOL - served) as f64;
    println!(
        "interactive: {served} served, {} refused, p95 wait {p95:?}; batch: {batch_got} of the {left} interactive left",
        refused.len()
    );
    assert!(refused.is_empty(), "interactive refused: {refused:?}");
    assert!(
        p95 <= Duration::from_millis(500),
        "interactive p95 wait {p95:?}"
    );
    assert!(
        batch_got >= 0.9 * left,
        "batch got {batch_got} of the {left} interactive left unused"
    );
    assert_pool_kept(&h);
}

const KEY_A: &str = "sk-spw-share-a";
const KEY_B: &str = "sk-spw-share-b";

fn two_tenants(weight_a: f64, weight_b: f64) -> String {
    format!(
        "[server]\nauth = \"api_key\"\n[tenants.a]\nkey_sha256 = \"{}\"\nweight = {weight_a}\n[tenants.b]\nkey_sha256 = \"{}\"\nweight = {weight_b}\n",
        spillway_gateway::auth::hash_key(KEY_A),
        spillway_gateway::auth::hash_key(KEY_B)
    )
}

/// Each of `keys` offers `rate` requests a second for three windows, each
/// request willing to wait 5 s; what each was served within them.
async fn offer(h: &Harness, keys: &[&str], rate: u64) -> Vec<usize> {
    let start = Instant::now();
    let per_key = 3 * WINDOW.as_secs() * rate;
    let sends = keys.iter().enumerate().flat_map(|(k, key)| {
        (0..per_key).map(move |i| async move {
            let at = Duration::from_millis(i * 1000 / rate + k as u64);
            sleep_until(start + at).await;
            let r = h
                .http
                .post(format!("{}/v1/messages", h.url))
                .header("x-api-key", *key)
                .header("x-spillway-max-wait-ms", "5000")
                .json(&message(&format!("{key} {i}")))
                .send()
                .await
                .unwrap();
            (
                k,
                r.status().as_u16(),
                (Instant::now() - start).as_secs() / 60,
            )
        })
    });
    let outcomes = join_all(sends).await;
    let per_window: Vec<Vec<usize>> = (0..keys.len())
        .map(|k| {
            (0..4)
                .map(|w| {
                    outcomes
                        .iter()
                        .filter(|o| o.0 == k && o.1 == 200 && o.2 == w)
                        .count()
                })
                .collect()
        })
        .collect();
    println!("served per window (the fourth: the 5 s after): {per_window:?}");
    per_window.iter().map(|w| w[..3].iter().sum()).collect()
}

#[tokio::test(start_paused = true)]
async fn weights_hold_over_the_window() {
    for (weights, low, high) in [((3.0, 1.0), 2.7, 3.3), ((1.0, 1.0), 0.9, 1.1)] {
        let h = Harness::start(&two_tenants(weights.0, weights.1)).await;
        // Each offers three times the pool (6/s against 2/s).
        let served = offer(&h, &[KEY_A, KEY_B], 6).await;
        let ratio = served[0] as f64 / served[1] as f64;
        println!("weights {weights:?}: served {served:?}, ratio {ratio:.2}");
        assert!(
            (low..=high).contains(&ratio),
            "weights {weights:?}: served {served:?} → {ratio:.2}"
        );
        assert!(
            served[0] + served[1] >= 3 * POOL * 97 / 100,
            "the pool is used: {served:?}"
        );
        assert_pool_kept(&h);
    }
}

#[tokio::test(start_paused = true)]
async fn a_lone_tenant_gets_the_whole_pool() {
    let h = Harness::start(&two_tenants(3.0, 1.0)).await;
    let served = offer(&h, &[KEY_B], 6).await;
    println!("alone: served {served:?} of {}", 3 * POOL);
    assert!(served[0] as f64 >= 0.99 * (3 * POOL) as f64, "{served:?}");
    assert_pool_kept(&h);
}

const ADMIN_KEY: &str = "sk-spw-share-admin";

#[tokio::test(start_paused = true)]
async fn operators_see_who_is_using_the_pool() {
    let overlay = format!(
        "{}[admin]\nkey_sha256 = \"{}\"\n",
        two_tenants(3.0, 1.0),
        spillway_gateway::auth::hash_key(ADMIN_KEY)
    );
    let h = Harness::start(&overlay).await;
    // Both want three times the pool for 20 s.
    let start = Instant::now();
    let h = &h;
    let sends = [KEY_A, KEY_B].into_iter().flat_map(|key| {
        (0..120u64).map(move |i| async move {
            sleep_until(start + Duration::from_millis(i * 1000 / 6)).await;
            h.http
                .post(format!("{}/v1/messages", h.url))
                .header("x-api-key", key)
                .header("x-spillway-max-wait-ms", "0")
                .json(&message("hi"))
                .send()
                .await
                .unwrap()
                .status()
        })
    });
    join_all(sends).await;
    let r = h
        .http
        .get(format!("{}/admin/shares", h.url))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pools: Value = r.json().await.unwrap();
    println!("{pools:#}");
    let pool = &pools[0];
    assert_eq!(pool["model"], HAIKU);
    let tenant = |name: &str| {
        pool["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tenant"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {pool}"))
    };
    let (a, b) = (tenant("a"), tenant("b"));
    assert!((a["share"].as_f64().unwrap() - 0.75).abs() < 1e-6, "{a}");
    assert!((b["share"].as_f64().unwrap() - 0.25).abs() < 1e-6, "{b}");
    let (held_a, held_b) = (a["held"].as_f64().unwrap(), b["held"].as_f64().unwrap());
    assert!(held_a <= 0.75 + 1e-6 && held_b <= 0.25 + 1e-6, "{a} {b}");
    assert!(held_a + held_b > 0.95, "the pool is in use: {a} {b}");
    assert_eq!(pool["batch_held"], 0.0);
    let metrics = h.metrics().await;
    let share = series_value(
        &metrics,
        &format!("spillway_pool_share{{kind=\"share\",model=\"{HAIKU}\",tenant=\"b\"}}"),
    );
    assert!((share - 0.25).abs() < 1e-6, "{share}");
    let held = series_value(
        &metrics,
        &format!("spillway_pool_held{{model=\"{HAIKU}\",priority=\"interactive\"}}"),
    );
    assert!(held > 0.95, "{held}");
}
