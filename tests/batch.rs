//! Message Batches end to end: the real router and runner in front of the
//! simulator, on tokio's paused clock (minutes of quota pass in
//! milliseconds), with the in-memory SQLite store the demo config selects.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use support::*;
use tokio::time::{sleep, Instant};

const ONE_REGION: &str =
    "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\" }]\n";

fn item(i: usize) -> Value {
    json!({
        "custom_id": format!("req-{i}"),
        "params": {
            "model": HAIKU,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS=3 item {i}")}]
        }
    })
}

fn items(n: usize) -> Vec<Value> {
    (0..n).map(item).collect()
}

async fn submit_as(h: &Harness, key: Option<&str>, requests: Vec<Value>) -> reqwest::Response {
    let mut request = h
        .http
        .post(format!("{}/v1/messages/batches", h.url))
        .json(&json!({ "requests": requests }));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    request.send().await.expect("gateway answers")
}

async fn submit(h: &Harness, requests: Vec<Value>) -> Value {
    let r = submit_as(h, None, requests).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn get_as(h: &Harness, key: Option<&str>, path: &str) -> reqwest::Response {
    let mut request = h.http.get(format!("{}{path}", h.url));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    request.send().await.expect("gateway answers")
}

async fn retrieve(h: &Harness, id: &str) -> Value {
    let r = get_as(h, None, &format!("/v1/messages/batches/{id}")).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Polls once a (virtual) second until the batch has ended.
async fn wait_ended(h: &Harness, id: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let batch = retrieve(h, id).await;
        if batch["processing_status"] == "ended" {
            return batch;
        }
        assert!(started.elapsed() < within, "not ended in time: {batch}");
        sleep(Duration::from_secs(1)).await;
    }
}

async fn results(h: &Harness, batch: &Value) -> Vec<Value> {
    let url = batch["results_url"]
        .as_str()
        .expect("results_url once ended");
    let r = h.http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn count(batch: &Value, what: &str) -> i64 {
    batch["request_counts"][what].as_i64().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_batch_runs_to_the_end_with_one_result_per_custom_id() {
    let h = Harness::start("").await;
    let batch = submit(&h, items(50)).await;
    let id = batch["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("msgbatch_"), "{batch}");
    assert_eq!(batch["type"], "message_batch");
    assert_eq!(batch["processing_status"], "in_progress");
    assert_eq!(batch["results_url"], Value::Null);
    assert_eq!(count(&batch, "processing"), 50);

    let ended = wait_ended(&h, &id, Duration::from_secs(120)).await;
    assert_eq!(count(&ended, "succeeded"), 50, "{ended}");
    assert_eq!(count(&ended, "processing"), 0);
    assert!(ended["ended_at"].is_string());
    let url = ended["results_url"].as_str().unwrap();
    assert_eq!(url, format!("{}/v1/messages/batches/{id}/results", h.url));

    let lines = results(&h, &ended).await;
    assert_eq!(lines.len(), 50);
    let ids: HashSet<_> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 50);
    for line in &lines {
        assert_eq!(line["result"]["type"], "succeeded", "{line}");
        assert_eq!(line["result"]["message"]["type"], "message");
        assert_eq!(line["result"]["message"]["usage"]["output_tokens"], 3);
    }
    // Spread over every region serving the model.
    for region in ["us-central1", "europe-west4"] {
        assert!(h.sim.counters(region, HAIKU).requests > 10, "{region}");
    }
    assert_eq!(h.sim.total_requests(), 50);
}

#[tokio::test(start_paused = true)]
async fn counts_move_while_the_batch_runs_and_quota_is_never_exceeded() {
    // 60 requests a minute in one region: 150 items take about 2.5 minutes.
    let h = Harness::start(ONE_REGION).await;
    let batch = submit(&h, items(150)).await;
    let id = batch["id"].as_str().unwrap();
    sleep(Duration::from_secs(70)).await;
    let mid = retrieve(&h, id).await;
    assert_eq!(mid["processing_status"], "in_progress");
    let done = count(&mid, "succeeded");
    assert!(
        (55..=75).contains(&done),
        "one window's worth so far: {mid}"
    );
    assert_eq!(count(&mid, "processing"), 150 - done);

    let ended = wait_ended(&h, id, Duration::from_secs(240)).await;
    assert_eq!(count(&ended, "succeeded"), 150);
    assert_eq!(h.sim.counters("us-central1", HAIKU).rate_limited, 0);
}

/// `spillway_batch_oldest_age_seconds` and `spillway_batch_oldest_requests`
/// follow the oldest batch in progress (the one being worked on), then the
/// next, then read 0 when none is left: enough for a dashboard's ETA.
#[tokio::test(start_paused = true)]
async fn metrics_follow_the_oldest_batch_in_progress() {
    let h = Harness::start(ONE_REGION).await;
    let oldest = |text: &str, status: &str| {
        series_value(
            text,
            &format!("spillway_batch_oldest_requests{{status=\"{status}\"}}"),
        )
    };
    let age = |text: &str| series_value(text, "spillway_batch_oldest_age_seconds");
    let idle = h.metrics().await;
    assert_eq!((age(&idle), oldest(&idle, "processing")), (0.0, 0.0));

    // 60 requests a minute: the first batch takes about 2.5 minutes.
    let first = submit(&h, items(150)).await;
    let first = first["id"].as_str().unwrap().to_string();
    sleep(Duration::from_secs(5)).await;
    let second = submit(&h, items(10)).await;
    let second = second["id"].as_str().unwrap().to_string();
    sleep(Duration::from_secs(65)).await;
    let text = h.metrics().await;
    assert!((69.0..75.0).contains(&age(&text)), "{text}");
    let done = oldest(&text, "succeeded");
    assert!((55.0..=80.0).contains(&done), "{text}");
    assert_eq!(done + oldest(&text, "processing"), 150.0, "{text}");
    for status in ["errored", "canceled", "expired"] {
        assert_eq!(oldest(&text, status), 0.0, "{status}");
    }
    let mid = retrieve(&h, &first).await;
    assert!(
        (count(&mid, "succeeded") as f64 - done).abs() <= 2.0,
        "{mid}\n{text}"
    );

    // The first ends: the second, 5 s younger, is the oldest now.
    wait_ended(&h, &first, Duration::from_secs(240)).await;
    let text = h.metrics().await;
    let total: f64 = ["processing", "succeeded", "errored", "canceled", "expired"]
        .iter()
        .map(|s| oldest(&text, s))
        .sum();
    assert_eq!(total, 10.0, "{text}");
    assert!(age(&text) > 60.0, "{text}");
    wait_ended(&h, &second, Duration::from_secs(60)).await;
    let text = h.metrics().await;
    assert_eq!(
        (age(&text), oldest(&text, "processing")),
        (0.0, 0.0),
        "{text}"
    );
    assert_eq!(oldest(&text, "succeeded"), 0.0, "{text}");
}

#[tokio::test(start_paused = true)]
async fn cancel_midway_keeps_what_finished_and_cancels_the_rest() {
    let h = Harness::start(ONE_REGION).await;
    let batch = submit(&h, items(200)).await;
    let id = batch["id"].as_str().unwrap();
    sleep(Duration::from_secs(30)).await;
    let r = h
        .http
        .post(format!("{}/v1/messages/batches/{id}/cancel", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let canceling: Value = r.json().await.unwrap();
    assert!(canceling["cancel_initiated_at"].is_string(), "{canceling}");
    assert!(
        ["canceling", "ended"].contains(&canceling["processing_status"].as_str().unwrap()),
        "{canceling}"
    );

    let ended = wait_ended(&h, id, Duration::from_secs(120)).await;
    let (ok, canceled) = (count(&ended, "succeeded"), count(&ended, "canceled"));
    assert!(ok > 0 && canceled > 0, "{ended}");
    assert_eq!(ok + canceled + count(&ended, "errored"), 200, "{ended}");
    assert_eq!(h.sim.total_requests() as i64, ok);

    let lines = results(&h, &ended).await;
    assert_eq!(lines.len(), 200);
    let canceled_lines = lines
        .iter()
        .filter(|l| l["result"] == json!({"type": "canceled"}))
        .count();
    assert_eq!(canceled_lines as i64, canceled);
    // Nothing more is sent once the batch has ended.
    sleep(Duration::from_secs(120)).await;
    assert_eq!(h.sim.total_requests() as i64, ok);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_batch_is_rejected_whole_naming_the_index_and_reason() {
    let h = Harness::start("").await;
    let cases: Vec<(Vec<Value>, &str)> = vec![
        (
            {
                let mut v = items(5);
                v[3]["params"].as_object_mut().unwrap().remove("max_tokens");
                v
            },
            "requests[3].params: max_tokens",
        ),
        (
            {
                let mut v = items(4);
                v[2]["custom_id"] = json!("req-0");
                v
            },
            "requests[2].custom_id: \"req-0\" is used by an earlier request",
        ),
        (
            {
                let mut v = items(2);
                v[1]["custom_id"] = json!("has space");
                v
            },
            "requests[1].custom_id",
        ),
        (
            {
                let mut v = items(3);
                v[1]["params"]["model"] = json!("claude-nonexistent");
                v
            },
            "requests[1].params.model",
        ),
        (
            {
                let mut v = items(2);
                v[0]["params"]["stream"] = json!(true);
                v
            },
            "requests[0].params.stream: batch requests cannot stream",
        ),
        (
            {
                let mut v = items(2);
                v[1]["params"]["max_tokens"] = json!(4096);
                // Only a floor no tokenizer undercuts refuses for good: 3.3 MB
                // of dense text is at least 206,250 tokens, over the 200k window.
                v[1]["params"]["messages"][0]["content"] = json!("x".repeat(3_300_000));
                v
            },
            "requests[1].params: prompt is too long",
        ),
        (vec![], "at least one request"),
    ];
    for (requests, expected) in cases {
        let r = submit_as(&h, None, requests).await;
        assert_eq!(r.headers()["x-should-retry"], "false");
        let message = expect_error(r, 400, "invalid_request_error").await;
        assert!(
            message.contains(expected),
            "{message:?} should contain {expected:?}"
        );
    }
    let r = h
        .http
        .post(format!("{}/v1/messages/batches", h.url))
        .header("content-type", "application/json")
        .body(r#"{"requests": [{"custom_id": "a", "params": {}}"#)
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_request_error").await;
    let r = h
        .http
        .post(format!("{}/v1/messages/batches", h.url))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "invalid_request_error").await;

    // Nothing was stored, nothing was sent.
    sleep(Duration::from_secs(5)).await;
    let list: Value = get_as(&h, None, "/v1/messages/batches")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([]), "{list}");
    assert_eq!(list["has_more"], false);
    assert_eq!(h.sim.total_requests(), 0);
}

#[tokio::test(start_paused = true)]
async fn jsonl_uploads_work_like_json() {
    let h = Harness::start("").await;
    let body: String = items(20)
        .iter()
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        + "\n";
    let r = h
        .http
        .post(format!("{}/v1/messages/batches", h.url))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let batch: Value = r.json().await.unwrap();
    let ended = wait_ended(&h, batch["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(count(&ended, "succeeded"), 20);

    let bad = format!("{}\n{{\"custom_id\": \"x\"}}\n", item(0));
    let r = h
        .http
        .post(format!("{}/v1/messages/batches", h.url))
        .header("content-type", "application/x-ndjson")
        .body(bad)
        .send()
        .await
        .unwrap();
    let m = expect_error(r, 400, "invalid_request_error").await;
    assert_eq!(m, "line 2 (requests[1]).params: field required");
}

#[tokio::test(start_paused = true)]
async fn a_tenant_cannot_see_or_touch_another_tenants_batch() {
    let (key_a, key_b) = ("sk-spw-tenant-a-key", "sk-spw-tenant-b-key");
    let overlay = format!(
        "[server]\nauth = \"api_key\"\n[tenants.a]\nkey_sha256 = \"{}\"\n[tenants.b]\nkey_sha256 = \"{}\"\n",
        spillway_gateway::auth::hash_key(key_a),
        spillway_gateway::auth::hash_key(key_b)
    );
    let h = Harness::start(&overlay).await;
    let r = submit_as(&h, Some(key_a), items(3)).await;
    assert_eq!(r.status(), 200);
    let batch: Value = r.json().await.unwrap();
    let id = batch["id"].as_str().unwrap();

    for path in [
        format!("/v1/messages/batches/{id}"),
        format!("/v1/messages/batches/{id}/results"),
    ] {
        let m = expect_error(get_as(&h, Some(key_b), &path).await, 404, "not_found_error").await;
        assert!(m.contains(id), "{m}");
    }
    let r = h
        .http
        .post(format!("{}/v1/messages/batches/{id}/cancel", h.url))
        .header("x-api-key", key_b)
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "not_found_error").await;
    let r = h
        .http
        .delete(format!("{}/v1/messages/batches/{id}", h.url))
        .header("x-api-key", key_b)
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "not_found_error").await;
    let list: Value = get_as(&h, Some(key_b), "/v1/messages/batches")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([]));
    // A cursor from another tenant is unknown too.
    let r = get_as(
        &h,
        Some(key_b),
        &format!("/v1/messages/batches?after_id={id}"),
    )
    .await;
    expect_error(r, 404, "not_found_error").await;
    // No key: 401 before anything else.
    expect_error(
        get_as(&h, None, "/v1/messages/batches").await,
        401,
        "authentication_error",
    )
    .await;

    // The owner sees it run to the end under its own name.
    let started = Instant::now();
    loop {
        let r: Value = get_as(&h, Some(key_a), &format!("/v1/messages/batches/{id}"))
            .await
            .json()
            .await
            .unwrap();
        if r["processing_status"] == "ended" {
            assert_eq!(count(&r, "succeeded"), 3, "{r}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn list_pages_newest_first_and_delete_needs_an_ended_batch() {
    let h = Harness::start(ONE_REGION).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            submit(&h, items(1)).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let page: Value = get_as(&h, None, "/v1/messages/batches?limit=2")
        .await
        .json()
        .await
        .unwrap();
    let data: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(data, [ids[4].as_str(), ids[3].as_str()]);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], ids[4].as_str());
    assert_eq!(page["last_id"], ids[3].as_str());
    let next: Value = get_as(
        &h,
        None,
        &format!("/v1/messages/batches?limit=2&after_id={}", ids[3]),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(next["first_id"], ids[2].as_str());
    assert_eq!(next["last_id"], ids[1].as_str());
    assert_eq!(next["has_more"], true);
    let back: Value = get_as(
        &h,
        None,
        &format!("/v1/messages/batches?limit=2&before_id={}", ids[1]),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(back["first_id"], ids[3].as_str());
    assert_eq!(back["last_id"], ids[2].as_str());
    assert_eq!(back["has_more"], true);
    let last: Value = get_as(
        &h,
        None,
        &format!("/v1/messages/batches?after_id={}", ids[1]),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(last["data"].as_array().unwrap().len(), 1);
    assert_eq!(last["has_more"], false);
    let r = get_as(&h, None, "/v1/messages/batches?limit=0").await;
    expect_error(r, 400, "invalid_request_error").await;

    // Delete: refused while processing (a batch that is waiting for quota),
    // allowed once ended; then gone.
    let blocker = submit(&h, items(80)).await;
    let blocker_id = blocker["id"].as_str().unwrap();
    let r = h
        .http
        .delete(format!("{}/v1/messages/batches/{blocker_id}", h.url))
        .send()
        .await
        .unwrap();
    let m = expect_error(r, 400, "invalid_request_error").await;
    assert!(m.contains("still processing"), "{m}");
    wait_ended(&h, &ids[0], Duration::from_secs(30)).await;
    let r = h
        .http
        .delete(format!("{}/v1/messages/batches/{}", h.url, ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deleted: Value = r.json().await.unwrap();
    assert_eq!(
        deleted,
        json!({"id": ids[0], "type": "message_batch_deleted"})
    );
    let r = get_as(&h, None, &format!("/v1/messages/batches/{}", ids[0])).await;
    expect_error(r, 404, "not_found_error").await;
}

#[tokio::test(start_paused = true)]
async fn failing_items_retry_with_backoff_and_fallback_then_error() {
    use spillway_sim::{Fault, FaultKind};
    let h = Harness::start("[batch]\nmax_item_attempts = 3\nretry_base_ms = 2000\n").await;
    // us-central1 fails every time: items fall back to europe-west4.
    h.sim
        .inject(Fault::region("us-central1", FaultKind::Status(503)));
    let batch = submit(&h, items(10)).await;
    let ended = wait_ended(&h, batch["id"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(count(&ended, "succeeded"), 10, "{ended}");
    assert_eq!(h.sim.counters("europe-west4", HAIKU).requests, 10);

    // Both regions failing: each item is tried max_item_attempts times
    // (each with fallback), with backoff between, then recorded errored.
    h.sim
        .inject(Fault::region("europe-west4", FaultKind::Status(503)));
    let started = Instant::now();
    let batch = submit(&h, items(2)).await;
    let ended = wait_ended(&h, batch["id"].as_str().unwrap(), Duration::from_secs(300)).await;
    assert_eq!(count(&ended, "errored"), 2, "{ended}");
    assert!(
        started.elapsed() >= Duration::from_secs(2 + 4) * 3 / 4,
        "backoff between attempts"
    );
    let lines = results(&h, &ended).await;
    for line in lines {
        assert_eq!(line["result"]["type"], "errored", "{line}");
        assert_eq!(line["result"]["error"]["type"], "error");
        assert!(line["result"]["error"]["request_id"].is_string());
        assert!(line["result"]["error"]["error"]["type"].is_string());
    }

    // A definite upstream error is not retried.
    h.sim.clear_faults();
    h.sim
        .inject(Fault::region("us-central1", FaultKind::Status(400)).times(1));
    h.sim
        .inject(Fault::region("europe-west4", FaultKind::Status(400)).times(1));
    let before = h.sim.total_requests();
    let batch = submit(&h, items(1)).await;
    let ended = wait_ended(&h, batch["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(count(&ended, "errored"), 1, "{ended}");
    assert_eq!(h.sim.total_requests() - before, 1, "one attempt only");
}

#[tokio::test(start_paused = true)]
async fn a_batch_past_its_24_hours_expires_what_is_left() {
    // 1 request a minute: nowhere near done after 24 hours of 600 items.
    let overlay = format!("{ONE_REGION}[quota]\nrequests_per_min = 1\n");
    let h = Harness::start(&overlay).await;
    let batch = submit(&h, items(2000)).await;
    let id = batch["id"].as_str().unwrap();
    sleep(Duration::from_secs(24 * 3600 + 30)).await;
    let ended = wait_ended(&h, id, Duration::from_secs(60)).await;
    let (ok, expired) = (count(&ended, "succeeded"), count(&ended, "expired"));
    assert!(ok > 1000 && expired > 0, "{ended}");
    assert_eq!(ok + expired, 2000);
    let lines = results(&h, &ended).await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["result"]["type"] == "expired")
            .count() as i64,
        expired
    );
}

/// Interactive requests at `per_minute`, evenly spaced, for `minutes`; the
/// time each waited (queue wait plus a negligible upstream time).
async fn interactive_waits(h: &Harness, per_minute: u32, minutes: u32) -> Vec<Duration> {
    let gap = Duration::from_secs(60) / per_minute;
    let sends = (0..per_minute * minutes).map(|i| async move {
        sleep(gap * i).await;
        let started = Instant::now();
        let r = h
            .http
            .post(format!("{}/v1/messages", h.url))
            .json(&json!({"model": HAIKU, "max_tokens": 16,
                "messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=3 interactive"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        started.elapsed()
    });
    let mut waits = join_all(sends).await;
    waits.sort();
    waits
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(start_paused = true)]
async fn interactive_requests_keep_their_latency_while_a_batch_runs() {
    // One region, 60 requests a minute: a refill interval is one second.
    let refill = Duration::from_secs(1);
    let baseline = {
        let h = Harness::start(ONE_REGION).await;
        p99(&interactive_waits(&h, 30, 4).await)
    };
    let h = Harness::start(ONE_REGION).await;
    let batch = submit(&h, items(1000)).await;
    sleep(Duration::from_secs(90)).await;
    let with_batch = interactive_waits(&h, 30, 4).await;
    let mid = retrieve(&h, batch["id"].as_str().unwrap()).await;
    assert!(
        p99(&with_batch) <= baseline + refill,
        "interactive p99 {:?} with a batch vs {:?} without",
        p99(&with_batch),
        baseline
    );
    // Meanwhile the batch used what interactive traffic left: 5.5 minutes at
    // 60 a minute, less the 120 interactive requests.
    let ok = count(&mid, "succeeded");
    assert!(ok >= 180, "batch progressed: {mid}");
    assert_eq!(h.sim.counters("us-central1", HAIKU).rate_limited, 0);
}
