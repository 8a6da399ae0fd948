//! Today's Vertex quota model end to end, through the real router and the
//! simulator, on tokio's paused clock.
//!
//! Two Sonnet versions are one lineage (`anthropic-claude-sonnet`): on
//! `global` they draw on **one** bucket, and both also use the regional
//! endpoint `us-east5`, where each has a bucket of its own (Vertex keeps
//! per-model buckets in regions even for grouped models). One region for
//! both is the discriminating case: a gateway that shared it too would
//! leave half of it idle, one that did not share `global` would meet 429s. Every bucket has Vertex's split quotas
//! only — requests, input tokens and output tokens per minute, no combined
//! limit — and the simulator enforces exactly that (lineage buckets on
//! global, per-model in regions, a strict sliding window).
//!
//! Both versions then send traffic at three times the lineage's `global`
//! quota for two windows, concurrently. What must hold:
//!
//! - **no simulator 429**: Spillway never sends what a bucket cannot take;
//! - **no 60 s window over any bucket's limit**, checked on the simulator's
//!   arrival log (every window, not the simulator's own verdicts);
//! - **goodput ≥ 98 %** of what the buckets allow.
//!
//! **Goodput, defined.** Output tokens bind: every request asks for and
//! produces [`OUTPUT`] tokens (`max_tokens` = the simulator's output, so the
//! up-front charge is exact), and the output quotas are far below what the
//! request and input quotas would allow. In any interval no longer than
//! one of Spillway's windows (60 s + its 250 ms margin), a bucket can take
//! at most its output quota, so over the first two such windows of the run,
//! `[0, 2 × 60.25 s)`, all buckets together allow
//! `2 × Σ OTPM / OUTPUT` requests. Goodput is the number of requests the
//! simulator served (its arrival log) in that interval, over that number.
//! Demand exceeds supply throughout (it is 1.5× the three buckets'
//! combined rate), so an ideal gateway serves exactly that many.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use spillway_sim::{SimConfig, SimModel, SimRegion};
use support::*;
use tokio::time::Instant;

const S45: &str = "claude-sonnet-4-5@20250929";
const S46: &str = "claude-sonnet-4-6@20260101";
const LINEAGE: &str = "anthropic-claude-sonnet";

/// Output tokens each request asks for and gets.
const OUTPUT: u64 = 100;
/// Split quotas: requests and input never bind, output does.
const RPM: u32 = 1_000;
const ITPM: u64 = 200_000;
/// The lineage's output quota on `global`: 30 requests a window.
const GLOBAL_OTPM: u64 = 3_000;
/// Each version's output quota in its region: 15 requests a window.
const REGIONAL_OTPM: u64 = 1_500;

/// Spillway's window: Vertex's minute plus the configured transit margin.
const LEDGER_WINDOW: Duration = Duration::from_millis(60_250);
const SIM_WINDOW: Duration = Duration::from_secs(60);

fn sim_config() -> SimConfig {
    let global = |id: &str| SimModel::split(id, RPM, ITPM, GLOBAL_OTPM).in_group(LINEAGE);
    let regional = |id: &str| SimModel::split(id, RPM, ITPM, REGIONAL_OTPM).in_group(LINEAGE);
    let mut config = SimConfig::vertex_defaults();
    config.regions.extend([
        SimRegion {
            name: "global".into(),
            models: vec![global(S45), global(S46)],
        },
        SimRegion {
            name: "us-east5".into(),
            models: vec![regional(S45), regional(S46)],
        },
    ]);
    config
}

/// The same quotas in Spillway's config: split only (no `tokens_per_min`
/// anywhere but the default, which split quotas switch off).
fn overlay(_sim_url: &str) -> String {
    format!(
        r#"
[quota]
requests_per_min = {RPM}
input_tokens_per_min = {ITPM}
[scheduler]
max_wait_cap_ms = 60000

[models."{S45}"]
quota_group = "{LINEAGE}"
regions = [
  {{ name = "global", output_tokens_per_min = {GLOBAL_OTPM} }},
  {{ name = "us-east5", output_tokens_per_min = {REGIONAL_OTPM} }},
]

[models."{S46}"]
quota_group = "{LINEAGE}"
regions = [
  {{ name = "global", output_tokens_per_min = {GLOBAL_OTPM} }},
  {{ name = "us-east5", output_tokens_per_min = {REGIONAL_OTPM} }},
]
"#
    )
}

fn request(model: &str, i: usize) -> Value {
    json!({
        "model": model,
        "max_tokens": OUTPUT,
        "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS={OUTPUT} request {i}")}]
    })
}

#[tokio::test(start_paused = true)]
async fn two_versions_of_a_lineage_share_global_keep_their_regions_and_fill_every_bucket() {
    let h = Harness::start_custom(sim_config(), overlay).await;

    // 3× the lineage's global quota (30 a window) for two windows: 90 a
    // minute, one every 2/3 s, the two versions alternating.
    let lineage_per_window = (GLOBAL_OTPM / OUTPUT) as usize;
    let total = 3 * lineage_per_window * 2;
    let spacing = Duration::from_secs(120) / total as u32;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let model = if i % 2 == 0 { S45 } else { S46 };
        let (http, url) = (h.http.clone(), h.url.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + spacing * i as u32).await;
            let r = http
                .post(format!("{url}/v1/messages"))
                .header("x-spillway-max-wait-ms", "30000")
                .json(&request(model, i))
                .send()
                .await
                .expect("gateway answers");
            let status = r.status().as_u16();
            let region = r
                .headers()
                .get("x-spillway-region")
                .map(|v| v.to_str().unwrap().to_string());
            (model, status, region)
        }));
    }
    let mut served = 0;
    let mut refused_by_spillway = 0;
    for task in tasks {
        let (model, status, region) = task.await.unwrap();
        match status {
            200 => {
                served += 1;
                let region = region.expect("a served request names its region");
                assert!(
                    region == "global" || region == "us-east5",
                    "{model} in {region}"
                );
            }
            429 => refused_by_spillway += 1,
            other => panic!("{model}: unexpected status {other}"),
        }
    }

    // No simulator 429, anywhere.
    for (location, model) in [
        ("global", S45),
        ("global", S46),
        ("us-east5", S45),
        ("us-east5", S46),
    ] {
        let c = h.sim.counters(location, model);
        assert_eq!(c.rate_limited, 0, "{model} in {location}: {c:?}");
    }

    // Three buckets: one shared on global, one per version in us-east5.
    let reports: Vec<_> = h
        .sim
        .bucket_reports(SIM_WINDOW)
        .into_iter()
        .filter(|r| r.admitted > 0)
        .collect();
    let described: Vec<String> = reports
        .iter()
        .map(|r| format!("{} {}", r.id.location, r.models.join("+")))
        .collect();
    assert_eq!(
        described,
        [
            format!("global {S45}+{S46}"),
            format!("us-east5 {S45}"),
            format!("us-east5 {S46}"),
        ]
    );
    // No 60 s window over any bucket's limit, on the arrival log.
    for r in &reports {
        assert!(!r.log_truncated);
        assert!(r.within_limits(), "{:?} peaked at {:?}", r.id, r.peak);
        println!(
            "bucket {} {:?}: admitted {}, peak {:?} vs {:?}",
            r.id.location, r.id.key, r.admitted, r.peak, r.limits
        );
    }
    // The global bucket really is shared: both versions were served there;
    // and every bucket was filled to its limit.
    let global = reports.iter().find(|r| r.id.location == "global").unwrap();
    let log = h.sim.admissions(&global.id);
    for model in [S45, S46] {
        assert!(log.iter().any(|a| &*a.model == model), "{model} on global");
    }
    for r in &reports {
        assert_eq!(
            r.peak.output_tokens,
            r.limits.output_tokens_per_min.unwrap(),
            "{:?} was filled",
            r.id
        );
    }

    // Goodput: served in [0, 2 × Spillway's window) over what the buckets
    // allow there (see the module docs).
    let horizon = start + LEDGER_WINDOW * 2;
    let in_horizon: u64 = reports
        .iter()
        .map(|r| {
            h.sim
                .admissions(&r.id)
                .iter()
                .filter(|a| a.at < horizon)
                .count() as u64
        })
        .sum();
    let allowed = 2 * (GLOBAL_OTPM + 2 * REGIONAL_OTPM) / OUTPUT;
    let goodput = in_horizon as f64 / allowed as f64;
    println!(
        "offered {total}, served {served}, refused by Spillway {refused_by_spillway}; \
         served in the first two windows {in_horizon} of {allowed} allowed: goodput {:.1}%",
        goodput * 100.0
    );
    assert!(goodput >= 0.98, "goodput {:.3}", goodput);
    assert!(in_horizon <= allowed, "never more than the buckets allow");
    assert_eq!(served + refused_by_spillway, total);
}

/// The multi-regions are locations of their own: `us` and `eu` reached
/// through `upstream.multi_region_urls` (here the simulator), each with one
/// lineage bucket of its own, beside `global`'s.
#[tokio::test(start_paused = true)]
async fn multi_regions_have_their_hosts_and_a_lineage_bucket_each() {
    let sonnet = |id: &str| SimModel::split(id, 2, ITPM, 100_000).in_group(LINEAGE);
    let mut sim = SimConfig::vertex_defaults();
    for location in ["us", "eu"] {
        sim.regions.push(SimRegion {
            name: location.into(),
            models: vec![sonnet(S45), sonnet(S46)],
        });
    }
    let h = Harness::start_custom(sim, |url| {
        format!(
            r#"
[upstream.multi_region_urls]
us = "{url}"
eu = "{url}"
[quota]
requests_per_min = 2
input_tokens_per_min = {ITPM}
output_tokens_per_min = 100000
[models."{S45}"]
quota_group = "{LINEAGE}"
regions = [{{ name = "us" }}, {{ name = "eu" }}]
[models."{S46}"]
quota_group = "{LINEAGE}"
regions = [{{ name = "us" }}, {{ name = "eu" }}]
"#
        )
    })
    .await;
    // Two buckets of 2 requests, shared by both versions: 4 in all.
    let mut regions = Vec::new();
    for (i, model) in [S45, S46, S46, S45].into_iter().enumerate() {
        let r = h.post_fail_fast("/v1/messages", &request(model, i)).await;
        assert_eq!(r.status(), 200, "{model}: {:?}", r.text().await);
        regions.push(
            r.headers()["x-spillway-region"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    regions.sort();
    assert_eq!(regions, ["eu", "eu", "us", "us"]);
    let fifth = h.post_fail_fast("/v1/messages", &request(S46, 5)).await;
    expect_error(fifth, 429, "rate_limit_error").await;
    for location in ["us", "eu"] {
        let served: u64 = [S45, S46]
            .iter()
            .map(|m| {
                let c = h.sim.counters(location, m);
                assert_eq!(c.rate_limited, 0, "{m} in {location}");
                c.succeeded
            })
            .sum();
        assert_eq!(served, 2, "{location}");
    }
}
