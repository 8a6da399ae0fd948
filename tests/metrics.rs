//! `GET /metrics` over loopback: the series operators build dashboards on
//! move as traffic flows.

mod support;

use spillway_sim::{Fault, FaultKind};
use support::*;

#[tokio::test(start_paused = true)]
async fn metrics_follow_quota_routing_and_refusals() {
    let h = Harness::start("[quota]\nstrategy = \"ordered\"\n").await;
    // Fill the primary region, so the rest spills over.
    for _ in 0..62 {
        assert_eq!(
            h.post_json("/v1/messages", &hello(HAIKU)).await.status(),
            200
        );
    }
    h.sim
        .inject(Fault::region("europe-west4", FaultKind::Status(429)).times(1));
    h.sim
        .inject(Fault::region("europe-west4", FaultKind::Status(429)).times(1));
    let _ = h.post_fail_fast("/v1/messages", &hello(HAIKU)).await;
    let _ = h
        .post_json("/v1/messages", &serde_json::json!({"model": HAIKU}))
        .await;

    let response = h
        .http
        .get(format!("{}/metrics", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    // The shared store's series exist with the in-memory store too: one
    // replica, never degraded, no leases (dashboards read the same).
    assert_eq!(series_value(&text, "spillway_quota_store_degraded"), 0.0);
    assert_eq!(series_value(&text, "spillway_quota_store_replicas"), 1.0);
    assert_eq!(
        series_value(&text, "spillway_quota_store_lease_admissions_total"),
        0.0
    );
    let m = HAIKU;
    assert_eq!(
        series_value(
            &text,
            &format!(
                "spillway_requests_total{{model=\"{m}\",outcome=\"ok\",tenant=\"anonymous\"}}"
            )
        ),
        62.0
    );
    assert_eq!(
        series_value(
            &text,
            "spillway_requests_total{model=\"-\",outcome=\"invalid\",tenant=\"-\"}"
        ),
        1.0
    );
    assert_eq!(series_value(&text, &format!("spillway_spillovers_total{{from=\"us-central1\",model=\"{m}\",to=\"europe-west4\"}}")), 3.0);
    assert_eq!(
        series_value(
            &text,
            &format!("spillway_upstream_429_total{{model=\"{m}\",region=\"europe-west4\"}}")
        ),
        1.0
    );
    assert_eq!(series_value(&text, &format!("spillway_budget_limit{{model=\"{m}\",region=\"us-central1\",resource=\"requests\"}}")), 60.0);
    assert_eq!(series_value(&text, &format!("spillway_budget_used{{model=\"{m}\",region=\"us-central1\",resource=\"requests\"}}")), 60.0);
    assert!(
        series_value(
            &text,
            &format!("spillway_cooldown_seconds{{model=\"{m}\",region=\"europe-west4\"}}")
        ) > 0.0
    );
    assert!(series_value(&text, &format!("spillway_budget_effective{{model=\"{m}\",region=\"europe-west4\",resource=\"requests\"}}")) < 60.0);
    assert!(series_value(&text, "spillway_admission_decision_seconds_count") >= 63.0);
    assert!(series_value(&text, &format!("spillway_tokens_total{{kind=\"actual_output\",model=\"{m}\",region=\"us-central1\"}}")) > 0.0);
    assert!(text.contains("spillway_build_info{version="));
    // Series exist at zero before their first event, so rate() sees it.
    assert_eq!(
        series_value(
            &text,
            &format!("spillway_upstream_429_total{{model=\"{m}\",region=\"us-central1\"}}")
        ),
        0.0
    );
    assert_eq!(series_value(&text, &format!("spillway_fallbacks_total{{from=\"us-central1\",model=\"{m}\",to=\"europe-west4\"}}")), 0.0);
    assert!(series_value(&text, &format!("spillway_tenant_tokens_total{{kind=\"output\",model=\"{m}\",tenant=\"anonymous\"}}")) > 0.0);
    assert_eq!(
        series_value(
            &text,
            &format!("spillway_queue_wait_seconds_count{{model=\"{m}\",priority=\"interactive\"}}")
        ),
        63.0,
        "62 served plus the one admitted to europe-west4 before its 429"
    );
}

/// A stream is counted once, when it ends, with its model and tenant: the
/// outer layer sees its headers (200) long before and must not count it as
/// an unattributed request too.
#[tokio::test]
async fn a_stream_is_counted_once_with_its_outcome() {
    let h = Harness::start("").await;
    let mut body = hello(HAIKU);
    body["stream"] = serde_json::json!(true);
    for _ in 0..3 {
        let response = h.post_json("/v1/messages", &body).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("message_stop"));
    }
    let text = h.metrics().await;
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("spillway_requests_total{"))
        .collect();
    assert_eq!(
        counted,
        [format!(
            "spillway_requests_total{{model=\"{HAIKU}\",outcome=\"ok\",tenant=\"anonymous\"}} 3"
        )],
        "{text}"
    );
}
