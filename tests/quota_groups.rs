//! Models that share one quota group, through the real router and the
//! simulator, on tokio's paused clock.
//!
//! A model's `quota_group` names its Vertex lineage: on `global` and the
//! multi-regions the models of one group draw on one bucket (in regions each
//! keeps its own; `tests/lineage.rs` runs both at once). Each model asks and
//! waits under its own key, which points at its bucket in each location:
//! these tests failed while a queue was keyed by model id and a demand by
//! group (every request of a grouped model was refused as "can never fit").

mod support;

use std::time::Duration;

use serde_json::Value;
use spillway_sim::{SimConfig, SimModel, SimRegion};
use support::*;
use tokio::time::Instant;

/// Haiku alone in a group of its own name.
const HAIKU_IN_A_GROUP: &str = r#"
[models."claude-3-haiku@20240307"]
quota_group = "haiku-lineage"
"#;

/// Haiku and Sonnet drawing on one budget of 3 requests a minute on
/// `global`.
const TWO_MODELS_ONE_GROUP: &str = r#"
[models."claude-3-haiku@20240307"]
quota_group = "shared"
regions = [{ name = "global", requests_per_min = 3 }]

[models."claude-3-sonnet@20240229"]
quota_group = "shared"
regions = [{ name = "global", requests_per_min = 3 }]
"#;

/// The simulator's defaults plus both models on `global` in group "shared".
fn sim_with_shared_global() -> SimConfig {
    let mut sim = SimConfig::vertex_defaults();
    sim.regions.push(SimRegion {
        name: "global".into(),
        models: [HAIKU, SONNET]
            .map(|m| SimModel::new(m, 3, 50_000).in_group("shared"))
            .to_vec(),
    });
    sim
}

#[tokio::test(start_paused = true)]
async fn a_model_with_its_own_quota_group_is_served() {
    let h = Harness::start(HAIKU_IN_A_GROUP).await;
    for _ in 0..3 {
        let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    // A stream settles through the same keys.
    let mut body = hello(HAIKU);
    body["stream"] = Value::Bool(true);
    let r = h.post_json("/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    let events = read_events(r).await;
    assert_eq!(events.last().unwrap().0, "message_stop");
}

#[tokio::test(start_paused = true)]
async fn models_of_one_group_share_one_budget_and_one_queue() {
    let h = Harness::start_with(TWO_MODELS_ONE_GROUP, sim_with_shared_global()).await;
    // Two Haiku and one Sonnet fill the group's 3 requests.
    for model in [HAIKU, HAIKU, SONNET] {
        let r = h.post_fail_fast("/v1/messages", &hello(model)).await;
        assert_eq!(r.status(), 200, "{model}: {:?}", r.text().await);
    }
    // A fourth, of either model, finds no room: one budget, not two.
    let refused = h.post_fail_fast("/v1/messages", &hello(SONNET)).await;
    let message = expect_error(refused, 429, "rate_limit_error").await;
    assert!(message.contains("no quota"), "{message}");

    // Half a window later, one waiting request is queued (under its model)
    // and admitted when the shared window frees (about 60 s after the first
    // admission), not refused.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let started = Instant::now();
    let waited = h
        .http
        .post(format!("{}/v1/messages", h.url))
        .header("x-spillway-max-wait-ms", "40000")
        .json(&hello(HAIKU))
        .send()
        .await
        .expect("answers");
    assert_eq!(waited.status(), 200);
    let wait = started.elapsed();
    assert!(
        wait > Duration::from_secs(25) && wait < Duration::from_secs(40),
        "waited {wait:?}"
    );

    // The metrics show one budget for the group, and a queue per model.
    let sim_saw: u64 = [HAIKU, SONNET]
        .iter()
        .map(|m| h.sim.counters("global", m).succeeded)
        .sum();
    assert_eq!(sim_saw, 4);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "spillway_budget_limit{model=\"shared\",region=\"global\",resource=\"requests\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "spillway_queue_depth{{model=\"{HAIKU}\",priority=\"interactive\"}} 0"
    )));
    assert!(
        !metrics.contains("region=\"us-central1\""),
        "one bucket only"
    );
}
