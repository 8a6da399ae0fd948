//! `GET /v1/models` and `/v1/models/{id}`: the catalog in Anthropic's
//! shape, so the SDKs' `models.list()` and `models.retrieve()` work.

use serde_json::Value;
use support::{expect_error, Harness, HAIKU};

mod support;

async fn get(h: &Harness, path: &str) -> reqwest::Response {
    h.http.get(format!("{}{path}", h.url)).send().await.unwrap()
}

#[tokio::test]
async fn the_catalog_is_listed_newest_first_in_anthropic_form() {
    let h = Harness::start("").await;
    let r = get(&h, "/v1/models").await;
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let ids: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"claude-3-haiku-20240307"), "{page}");
    assert!(ids.contains(&"claude-3-sonnet-20240229"), "{page}");
    assert_eq!(page["has_more"], false);
    assert_eq!(page["first_id"], ids[0]);
    let haiku = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "claude-3-haiku-20240307")
        .unwrap();
    assert_eq!(haiku["type"], "model");
    assert_eq!(haiku["display_name"], "Claude 3 Haiku");
    assert_eq!(haiku["created_at"], "2024-03-07T00:00:00Z");
    assert_eq!(haiku["vertex"]["model"], HAIKU);
    assert_eq!(
        haiku["vertex"]["locations"],
        serde_json::json!(["us-central1", "europe-west4"])
    );
    // Newest first: Haiku (2024-03-07) before Sonnet (2024-02-29).
    let pos = |id| ids.iter().position(|i| *i == id).unwrap();
    assert!(pos("claude-3-haiku-20240307") < pos("claude-3-sonnet-20240229"));
}

#[tokio::test]
async fn pages_follow_after_and_before_ids() {
    let h = Harness::start("").await;
    let first: Value = get(&h, "/v1/models?limit=1").await.json().await.unwrap();
    assert_eq!(first["data"].as_array().unwrap().len(), 1);
    assert_eq!(first["has_more"], true);
    let after = first["last_id"].as_str().unwrap();
    let second: Value = get(&h, &format!("/v1/models?limit=1&after_id={after}"))
        .await
        .json()
        .await
        .unwrap();
    let next = second["first_id"].as_str().unwrap();
    assert_ne!(next, after);
    let back: Value = get(&h, &format!("/v1/models?limit=1&before_id={next}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(back["first_id"], after);
    assert_eq!(back["has_more"], false);
    expect_error(
        get(&h, "/v1/models?limit=0").await,
        400,
        "invalid_request_error",
    )
    .await;
    expect_error(
        get(&h, "/v1/models?after_id=nope").await,
        400,
        "invalid_request_error",
    )
    .await;
}

#[tokio::test]
async fn a_model_is_found_by_any_name_the_messages_api_takes() {
    let h = Harness::start("").await;
    for name in ["claude-3-haiku-20240307", HAIKU] {
        let r = get(&h, &format!("/v1/models/{name}")).await;
        assert_eq!(r.status(), 200, "{name}");
        let m: Value = r.json().await.unwrap();
        assert_eq!(m["id"], "claude-3-haiku-20240307");
        assert_eq!(m["vertex"]["model"], HAIKU);
    }
    expect_error(get(&h, "/v1/models/claude-9").await, 404, "not_found_error").await;
    assert_eq!(h.sim.total_requests(), 0, "the catalog is Spillway's own");
}
