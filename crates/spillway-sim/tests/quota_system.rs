//! Today's Vertex quota system, observed over HTTP the way a gateway sees
//! it: lineage buckets on `global` and multi-regions, split token quotas,
//! the per-model cache rule, location-aware 429 messages, capacity 429s,
//! run-time model refusal, token rotation, `"stream": true` on rawPredict,
//! and the admission log that lets a test check every window of a run.

use std::time::Duration;

use serde_json::{json, Value};
use spillway_sim::{
    count_tokens, BucketId, BucketKey, Fault, FaultKind, SimConfig, SimHandle, SimModel, SimRegion,
    Simulator,
};

const SONNET_46: &str = "claude-sonnet-4-6";
const SONNET_45: &str = "claude-sonnet-4-5@20250929";
const LINEAGE: &str = "anthropic-claude-sonnet";
const OLD_HAIKU: &str = "claude-3-5-haiku@20241022";
const NEW_HAIKU: &str = "claude-haiku-4-5@20251001";
const W: Duration = Duration::from_secs(60);

async fn start(config: SimConfig) -> SimHandle {
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// No timers of its own, so tokio's paused clock only moves when the test
/// moves it.
fn client() -> reqwest::Client {
    // reqwest has no crypto provider of its own in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_idle_timeout(None)
        .build()
        .unwrap()
}

fn body(text: &str, max_tokens: u64) -> Value {
    json!({
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    })
}

async fn post(
    sim: &SimHandle,
    region: &str,
    model: &str,
    action: &str,
    b: &Value,
) -> (u16, String, String) {
    let r = client()
        .post(sim.predict_url("proj", region, model, action))
        .json(b)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, r.text().await.unwrap(), ct)
}

async fn status(sim: &SimHandle, region: &str, model: &str, b: &Value) -> u16 {
    post(sim, region, model, "rawPredict", b).await.0
}

fn quota_429(metric: &str, base_model: &str) -> String {
    format!(
        r#"{{"error":{{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/{metric} with base model: {base_model}. Please submit a quota increase request. https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai.","status":"RESOURCE_EXHAUSTED"}}}}"#
    )
}

fn events(sse: &str) -> Vec<(String, Value)> {
    sse.split_terminator("\n\n")
        .map(|ev| {
            let (name, data) = ev.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_string();
            let data = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            (name, data)
        })
        .collect()
}

/// Both Sonnet ids in one lineage group, 3 requests per window, in a
/// global, a multi-region and a regional location.
fn lineage_config() -> SimConfig {
    let sonnet = |id: &str| SimModel::split(id, 3, 1_000_000, 1_000_000).in_group(LINEAGE);
    let location = |name: &str| SimRegion {
        name: name.into(),
        models: vec![sonnet(SONNET_46), sonnet(SONNET_45)],
    };
    SimConfig {
        regions: vec![location("global"), location("eu"), location("us-east5")],
        ..SimConfig::vertex_defaults()
    }
}

#[tokio::test(start_paused = true)]
async fn lineage_groups_share_one_window_on_global_and_multi_regions_only() {
    let sim = start(lineage_config()).await;
    let b = body("hi", 10);

    // global: 2 + 1 requests over two ids fill the one shared window.
    for model in [SONNET_46, SONNET_45, SONNET_46] {
        assert_eq!(status(&sim, "global", model, &b).await, 200);
    }
    for model in [SONNET_45, SONNET_46] {
        let (code, text, _) = post(&sim, "global", model, "rawPredict", &b).await;
        assert_eq!(code, 429);
        assert_eq!(
            text,
            quota_429("global_online_prediction_requests_per_base_model", LINEAGE)
        );
    }
    // Streams get the same body, array-wrapped.
    let (code, text, _) = post(&sim, "global", SONNET_45, "streamRawPredict", &b).await;
    assert_eq!(code, 429);
    assert_eq!(
        text,
        format!(
            "[{}]",
            quota_429("global_online_prediction_requests_per_base_model", LINEAGE)
        )
    );

    // eu is a bucket of its own, shared by the lineage too.
    for model in [SONNET_45, SONNET_45, SONNET_46] {
        assert_eq!(status(&sim, "eu", model, &b).await, 200);
    }
    let (code, text, _) = post(&sim, "eu", SONNET_46, "rawPredict", &b).await;
    assert_eq!(code, 429);
    assert_eq!(
        text,
        quota_429(
            "eu_multi_region_online_prediction_requests_per_base_model",
            LINEAGE
        )
    );

    // us-east5 is regional: each id has its own window, named by its own
    // base model, group or not.
    for model in [
        SONNET_46, SONNET_46, SONNET_46, SONNET_45, SONNET_45, SONNET_45,
    ] {
        assert_eq!(status(&sim, "us-east5", model, &b).await, 200, "{model}");
    }
    let (code, text, _) = post(&sim, "us-east5", SONNET_46, "rawPredict", &b).await;
    assert_eq!(code, 429);
    assert_eq!(
        text,
        quota_429(
            "online_prediction_requests_per_base_model",
            "anthropic-claude-sonnet-4-6"
        )
    );
    let (_, text, _) = post(&sim, "us-east5", SONNET_45, "rawPredict", &b).await;
    assert_eq!(
        text,
        quota_429(
            "online_prediction_requests_per_base_model",
            "anthropic-claude-sonnet-4-5"
        )
    );

    // What the handle says about buckets.
    let group = |loc: &str| BucketId {
        location: loc.into(),
        key: BucketKey::Group(LINEAGE.into()),
    };
    assert_eq!(sim.bucket_of("global", SONNET_46), Some(group("global")));
    assert_eq!(sim.bucket_of("global", SONNET_45), Some(group("global")));
    assert_eq!(
        sim.bucket_of("us-east5", SONNET_45),
        Some(BucketId {
            location: "us-east5".into(),
            key: BucketKey::Model(SONNET_45.into()),
        })
    );
    assert_eq!(sim.buckets().len(), 4);
    assert_eq!(sim.window_usage("global", SONNET_45).unwrap().requests, 3);
    assert_eq!(sim.window_usage("us-east5", SONNET_45).unwrap().requests, 3);
    let log = sim.admissions(&group("global"));
    let models: Vec<&str> = log.iter().map(|a| &*a.model).collect();
    assert_eq!(models, [SONNET_46, SONNET_45, SONNET_46]);

    // The shared window slides for everyone at once.
    tokio::time::advance(W + Duration::from_millis(1)).await;
    assert_eq!(status(&sim, "global", SONNET_45, &b).await, 200);
    assert_eq!(sim.window_usage("global", SONNET_46).unwrap().requests, 1);
    // Raising the quota of one member raises the group's.
    sim.set_quota("global", SONNET_46, 10, 1_000_000);
    assert_eq!(
        sim.limits("global", SONNET_45).unwrap().requests_per_min,
        10
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn disagreeing_limits_in_a_shared_bucket_refuse_to_start() {
    let mut config = lineage_config();
    config.regions[0].models[1].requests_per_min = 4;
    let err = Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains(LINEAGE), "{err}");
    // The same mismatch is fine on a regional location.
    let mut config = lineage_config();
    config.regions.truncate(0);
    config.regions.push(SimRegion {
        name: "us-east5".into(),
        models: vec![
            SimModel::split(SONNET_46, 3, 10, 10).in_group(LINEAGE),
            SimModel::split(SONNET_45, 4, 10, 10).in_group(LINEAGE),
        ],
    });
    start(config).await.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn split_quotas_count_input_and_output_apart() {
    // Only split limits, read from the TOML form: no combined budget.
    let config = SimConfig::from_toml(&format!(
        r#"
[[regions]]
name = "global"
[[regions.models]]
id = "{SONNET_46}"
quota_group = "{LINEAGE}"
requests_per_min = 100
input_tokens_per_min = 100
output_tokens_per_min = 50
"#
    ))
    .unwrap();
    let sim = start(config).await;
    let b = |out: u64| body(&format!("SIM_OUTPUT_TOKENS={out}"), 1000);
    let input = count_tokens(&b(40));
    assert!(input < 50, "{input}");

    // 40 output tokens plus the input: over neither limit, though the sum
    // would be over the output one.
    assert_eq!(status(&sim, "global", SONNET_46, &b(40)).await, 200);
    // 11 more output tokens is over 50.
    let (code, text, _) = post(&sim, "global", SONNET_46, "rawPredict", &b(11)).await;
    assert_eq!(code, 429);
    assert_eq!(
        text,
        quota_429(
            "global_online_prediction_output_tokens_per_minute_per_base_model",
            LINEAGE
        )
    );
    // 10 more fits exactly.
    assert_eq!(status(&sim, "global", SONNET_46, &b(10)).await, 200);
    // Now input: a prompt that would pass 100 input tokens.
    let used = sim.window_usage("global", SONNET_46).unwrap().input_tokens;
    assert_eq!(used, 2 * input);
    let big = body(&"word ".repeat(200), 1);
    assert!(used + count_tokens(&big) > 100);
    let (code, text, _) = post(&sim, "global", SONNET_46, "rawPredict", &big).await;
    assert_eq!(code, 429);
    assert_eq!(
        text,
        quota_429(
            "global_online_prediction_input_tokens_per_minute_per_base_model",
            LINEAGE
        )
    );
    let limits = sim.limits("global", SONNET_46).unwrap();
    assert_eq!(limits.tokens_per_min, None);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn cache_reads_are_reported_and_count_only_for_older_models() {
    let prompt = "SIM_CACHE_READ=30 SIM_CACHE_WRITE=4 SIM_OUTPUT_TOKENS=2 ".repeat(8);
    let b = body(&prompt, 100);
    let total = count_tokens(&b);
    assert!(total > 40, "{total}");
    // Room for one prompt counted in full, or two without their reads.
    let itpm = total + (total - 30);
    let config = SimConfig {
        regions: vec![SimRegion {
            name: "us-east5".into(),
            models: vec![
                SimModel::split(OLD_HAIKU, 100, itpm, 1000),
                SimModel::split(NEW_HAIKU, 100, itpm, 1000),
            ],
        }],
        ..SimConfig::vertex_defaults()
    };
    let sim = start(config).await;
    let usage = json!({
        "input_tokens": total - 34,
        "cache_creation_input_tokens": 4,
        "cache_read_input_tokens": 30,
        "output_tokens": 2,
    });

    for model in [OLD_HAIKU, NEW_HAIKU] {
        let (code, text, _) = post(&sim, "us-east5", model, "rawPredict", &b).await;
        assert_eq!(code, 200);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"], usage, "{model}");
    }
    // Claude 3.5 counts its reads: the whole prompt went into the window.
    assert_eq!(
        sim.window_usage("us-east5", OLD_HAIKU)
            .unwrap()
            .input_tokens,
        total
    );
    assert_eq!(
        sim.window_usage("us-east5", NEW_HAIKU)
            .unwrap()
            .input_tokens,
        total - 30
    );

    // The stream reports the same split in message_start.
    let (code, text, ct) = post(&sim, "us-east5", NEW_HAIKU, "streamRawPredict", &b).await;
    assert_eq!(
        (code, ct.as_str()),
        (200, "text/event-stream; charset=utf-8")
    );
    let ev = events(&text);
    let start_usage = &ev[0].1["message"]["usage"];
    assert_eq!(start_usage["input_tokens"], total - 34);
    assert_eq!(start_usage["cache_creation_input_tokens"], 4);
    assert_eq!(start_usage["cache_read_input_tokens"], 30);

    // Claude 3.5 has no room left for a second prompt...
    let (code, text, _) = post(&sim, "us-east5", OLD_HAIKU, "rawPredict", &b).await;
    assert_eq!(code, 429);
    assert!(text.contains("online_prediction_input_tokens_per_minute_per_base_model with base model: anthropic-claude-3-5-haiku."), "{text}");
    // ...the newer model fitted two (the stream was the second).
    assert_eq!(
        sim.window_usage("us-east5", NEW_HAIKU)
            .unwrap()
            .input_tokens,
        2 * (total - 30)
    );
    let c = sim.counters("us-east5", NEW_HAIKU);
    assert_eq!(
        (
            c.input_tokens,
            c.cache_read_input_tokens,
            c.cache_creation_input_tokens
        ),
        (2 * (total - 34), 60, 8)
    );
    // The admission log has what was charged.
    let log = sim.admissions(&sim.bucket_of("us-east5", NEW_HAIKU).unwrap());
    assert_eq!(
        log.iter().map(|a| a.input_tokens).collect::<Vec<_>>(),
        [total - 30, total - 30]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn capacity_429_names_no_metric_and_costs_no_quota() {
    let sim = start(lineage_config()).await;
    let b = body("hi", 10);
    sim.inject(Fault::region("global", FaultKind::Capacity).times(2));
    let capacity = r#"{"error":{"code":429,"message":"Resource exhausted. Please try again later.","status":"RESOURCE_EXHAUSTED"}}"#;
    let (code, text, ct) = post(&sim, "global", SONNET_46, "rawPredict", &b).await;
    assert_eq!((code, text.as_str()), (429, capacity));
    assert_eq!(ct, "application/json; charset=UTF-8");
    let (code, text, _) = post(&sim, "global", SONNET_45, "streamRawPredict", &b).await;
    assert_eq!((code, text), (429, format!("[{capacity}]")));
    // Used up; other regions were never affected.
    assert_eq!(status(&sim, "global", SONNET_46, &b).await, 200);
    assert_eq!(status(&sim, "eu", SONNET_46, &b).await, 200);
    let c = sim.counters("global", SONNET_46);
    assert_eq!((c.rate_limited, c.capacity_limited, c.succeeded), (1, 1, 1));
    assert_eq!(sim.window_usage("global", SONNET_46).unwrap().requests, 1);

    // The same over the control API; a quota 429 is not a capacity one.
    let r = client()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"region": "eu", "remaining": 1, "kind": {"type": "capacity"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        post(&sim, "eu", SONNET_45, "rawPredict", &b).await.1,
        capacity
    );
    sim.inject(Fault::region("eu", FaultKind::Status(429)).times(1));
    let (code, text, _) = post(&sim, "eu", SONNET_45, "rawPredict", &b).await;
    assert_eq!(code, 429);
    assert_eq!(
        text,
        quota_429(
            "eu_multi_region_online_prediction_requests_per_base_model",
            LINEAGE
        )
    );
    let c = sim.counters("eu", SONNET_45);
    assert_eq!((c.rate_limited, c.capacity_limited), (2, 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_region_can_refuse_a_model_at_run_time() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let haiku = "claude-3-haiku@20240307";
    let b = body("hi", 10);
    let not_found = format!(
        r#"{{"error":{{"code":404,"message":"Publisher Model `projects/proj/locations/us-central1/publishers/anthropic/models/{haiku}` was not found or your project does not have access to it. Please ensure you are using a valid model version. For more information, see: https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/claude","status":"NOT_FOUND"}}}}"#
    );
    assert_eq!(status(&sim, "us-central1", haiku, &b).await, 200);
    sim.refuse_model("us-central1", haiku);
    let (code, text, _) = post(&sim, "us-central1", haiku, "rawPredict", &b).await;
    assert_eq!((code, text.as_str()), (404, not_found.as_str()));
    let (code, text, _) = post(&sim, "us-central1", haiku, "streamRawPredict", &b).await;
    assert_eq!((code, text), (404, format!("[{not_found}]")));
    let ct = json!({"model": haiku, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(&sim, "us-central1", "count-tokens", "rawPredict", &ct)
            .await
            .0,
        404
    );
    // Only that pair: the same model elsewhere, and other models here, work.
    assert_eq!(status(&sim, "europe-west4", haiku, &b).await, 200);
    assert_eq!(
        status(&sim, "us-central1", "claude-3-sonnet@20240229", &b).await,
        200
    );
    assert_eq!(
        sim.refused_models(),
        [("us-central1".to_owned(), haiku.to_owned())]
    );
    assert!(sim.allow_model("us-central1", haiku));
    assert!(!sim.allow_model("us-central1", haiku));
    assert_eq!(status(&sim, "us-central1", haiku, &b).await, 200);
    assert_eq!(
        sim.counters("us-central1", haiku).errors.get(&404),
        Some(&2)
    );

    // The control API does the same.
    let ctl = |path: &str, v: Value| {
        client()
            .post(format!("{}/_sim/models/{path}", sim.base_url()))
            .json(&v)
            .send()
    };
    let pair = json!({"region": "europe-west4", "model": haiku});
    assert_eq!(ctl("refuse", pair.clone()).await.unwrap().status(), 204);
    assert_eq!(status(&sim, "europe-west4", haiku, &b).await, 404);
    let listed: Value = client()
        .get(format!("{}/_sim/models/refused", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, json!([pair]));
    let r = ctl("allow", pair.clone()).await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"was_refused": true})
    );
    assert_eq!(status(&sim, "europe-west4", haiku, &b).await, 200);
    assert_eq!(
        ctl("refuse", json!({"region": "x"}))
            .await
            .unwrap()
            .status(),
        400
    );
    // A reset forgets refusals.
    sim.refuse_model("europe-west4", haiku);
    sim.reset();
    assert_eq!(status(&sim, "europe-west4", haiku, &b).await, 200);
    sim.shutdown().await;
}

/// Gets a token from the simulator's `/token` (the signature is not checked).
async fn oauth_token(sim: &SimHandle) -> String {
    use base64::Engine as _;
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3000;
    let claims = json!({"iss": "sa@proj.iam.gserviceaccount.com", "scope": "https://www.googleapis.com/auth/cloud-platform", "aud": format!("{}/token", sim.base_url()), "exp": exp});
    let jwt = format!(
        "{}.{}.{}",
        enc(r#"{"alg":"RS256","typ":"JWT"}"#),
        enc(&claims.to_string()),
        enc("sig")
    );
    let v: Value = client()
        .post(format!("{}/token", sim.base_url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={jwt}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn rotated_tokens_get_google_401_and_new_ones_work() {
    let sim = start(SimConfig {
        bearer_token: Some("static-before".into()),
        ..SimConfig::vertex_defaults()
    })
    .await;
    let call = |token: String, action: &'static str| {
        let url = sim.predict_url("proj", "us-central1", "claude-3-haiku@20240307", action);
        async move {
            let r = client()
                .post(url)
                .bearer_auth(token)
                .json(&body("hi", 5))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let old_oauth = oauth_token(&sim).await;
    assert_eq!(call("static-before".into(), "rawPredict").await.0, 200);
    assert_eq!(call(old_oauth.clone(), "rawPredict").await.0, 200);

    let new_static = sim.rotate_token();
    assert_ne!(new_static, "static-before");
    let unauthenticated = r#"{"error":{"code":401,"message":"Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.","status":"UNAUTHENTICATED"}}"#;
    for old in ["static-before".to_owned(), old_oauth] {
        assert_eq!(
            call(old.clone(), "rawPredict").await,
            (401, unauthenticated.to_owned())
        );
        assert_eq!(
            call(old, "streamRawPredict").await,
            (401, format!("[{unauthenticated}]"))
        );
    }
    let fresh = oauth_token(&sim).await;
    assert_eq!(call(fresh.clone(), "rawPredict").await.0, 200);
    assert_eq!(call(new_static.clone(), "rawPredict").await.0, 200);

    // Over the control API: revokes everything issued so far again.
    let v: Value = client()
        .post(format!("{}/_sim/rotate-token", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let third = v["bearer_token"].as_str().unwrap().to_owned();
    assert_eq!(call(fresh, "rawPredict").await.0, 401);
    assert_eq!(call(new_static, "rawPredict").await.0, 401);
    assert_eq!(call(third, "rawPredict").await.0, 200);
    assert_eq!(call(oauth_token(&sim).await, "rawPredict").await.0, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn rotation_turns_authentication_on() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let b = body("hi", 5);
    assert_eq!(
        status(&sim, "us-central1", "claude-3-haiku@20240307", &b).await,
        200
    );
    let token = sim.rotate_token();
    assert_eq!(
        status(&sim, "us-central1", "claude-3-haiku@20240307", &b).await,
        401
    );
    let r = client()
        .post(sim.predict_url("p", "us-central1", "claude-3-haiku@20240307", "rawPredict"))
        .bearer_auth(token)
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn stream_true_on_raw_predict_answers_like_stream_raw_predict() {
    let sim = start(lineage_config()).await;
    let mut b = body("SIM_OUTPUT_TOKENS=5", 100);
    b["stream"] = json!(true);
    let (code, raw, ct) = post(&sim, "global", SONNET_46, "rawPredict", &b).await;
    assert_eq!(
        (code, ct.as_str()),
        (200, "text/event-stream; charset=utf-8")
    );
    let (_, streamed, _) = post(&sim, "global", SONNET_46, "streamRawPredict", &b).await;
    let names = |sse: &str| -> Vec<String> { events(sse).into_iter().map(|(n, _)| n).collect() };
    assert_eq!(names(&raw), names(&streamed));
    let ev = events(&raw);
    assert_eq!(ev.last().unwrap().0, "message_stop");
    assert_eq!(
        ev.iter()
            .filter(|(n, _)| n == "content_block_delta")
            .count(),
        5
    );
    let c = sim.counters("global", SONNET_46);
    assert_eq!((c.streams_started, c.streams_completed), (2, 2));
    assert_eq!(sim.recent_requests()[0].action, "rawPredict");

    // Errors after the body was read take the stream form too.
    assert_eq!(status(&sim, "global", SONNET_45, &body("x", 5)).await, 200);
    let (code, text, _) = post(&sim, "global", SONNET_46, "rawPredict", &b).await;
    assert_eq!(code, 429);
    assert!(text.starts_with("[{\"error\""), "{text}");
    // "stream": false is an ordinary rawPredict.
    tokio::time::advance(W + Duration::from_millis(1)).await;
    b["stream"] = json!(false);
    let (code, text, ct) = post(&sim, "global", SONNET_46, "rawPredict", &b).await;
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["type"],
        "message"
    );
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_admission_log_proves_every_window_stayed_within_limits() {
    let sonnet = |id: &str| SimModel::split(id, 5, 400, 60).in_group(LINEAGE);
    let config = SimConfig {
        regions: vec![
            SimRegion {
                name: "global".into(),
                models: vec![sonnet(SONNET_46), sonnet(SONNET_45)],
            },
            SimRegion {
                name: "us-east5".into(),
                models: vec![SimModel::new(NEW_HAIKU, 4, 300)],
            },
        ],
        ..SimConfig::vertex_defaults()
    };
    let sim = start(config).await;
    // Bursty traffic over five windows: steps of 0.7 to 9.1 s, answers of
    // 1 to 13 tokens, alternating models, deterministic.
    let mut admitted = 0u64;
    let mut rejected = 0u64;
    for i in 0u64..120 {
        let model = [SONNET_46, SONNET_45][(i % 2) as usize];
        let b = body(
            &format!("request {i} SIM_OUTPUT_TOKENS={}", 1 + (i * 7) % 13),
            100,
        );
        match status(&sim, "global", model, &b).await {
            200 => admitted += 1,
            429 => rejected += 1,
            s => panic!("status {s}"),
        }
        let _ = status(&sim, "us-east5", NEW_HAIKU, &b).await;
        tokio::time::advance(Duration::from_millis(700 + (i * 3_700) % 8_400)).await;
    }
    assert!(admitted > 20 && rejected > 20, "{admitted} / {rejected}");

    let reports = sim.bucket_reports(W);
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert!(r.within_limits(), "{r:?}");
        assert!(!r.log_truncated);
    }
    let global = &reports[0];
    assert_eq!(global.models, [SONNET_45, SONNET_46]);
    assert_eq!(global.base_model, LINEAGE);
    assert_eq!(global.admitted, admitted);
    // The busiest window was full: the check is not vacuous.
    assert_eq!(global.peak.requests, 5);
    let succeeded: u64 = [SONNET_45, SONNET_46]
        .iter()
        .map(|m| sim.counters("global", m).succeeded)
        .sum();
    assert_eq!(succeeded, admitted);
    // The log is in time order and agrees with a direct recount.
    let log = sim.admissions(&global.id);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(spillway_sim::peak_usage(&log, W), global.peak);
    // Judged against a window longer than the simulator's, the same run is
    // over the limits: the check can fail.
    let long = sim.bucket_reports(W * 2);
    assert!(!long[0].within_limits(), "{:?}", long[0]);

    // The control API shows the same figures.
    let v: Value = client()
        .get(format!("{}/_sim/buckets", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v[0]["id"],
        json!({"location": "global", "key": {"kind": "group", "name": LINEAGE}})
    );
    assert_eq!(v[0]["location_kind"], "global");
    assert_eq!(v[0]["peak"]["requests"], 5);
    assert_eq!(v[0]["admitted"], admitted);
    assert_eq!(v[0]["limits"]["tokens_per_min"], Value::Null);
    assert_eq!(
        v[1]["id"]["key"],
        json!({"kind": "model", "name": NEW_HAIKU})
    );

    // A reset empties the logs.
    sim.reset();
    assert!(sim.admissions(&global.id).is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn quota_control_api_takes_split_limits_without_a_combined_one() {
    let sim = start(lineage_config()).await;
    let r = client()
        .put(format!("{}/_sim/quota", sim.base_url()))
        .json(&json!({"region": "global", "model": SONNET_45, "requests_per_min": 7, "input_tokens_per_min": 70, "output_tokens_per_min": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let v: Value = client()
        .get(format!("{}/_sim/quota", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Both members of the group see the new limits.
    for m in [SONNET_45, SONNET_46] {
        let q = &v["global"][m];
        assert_eq!(q["requests_per_min"], 7);
        assert_eq!(q["tokens_per_min"], Value::Null);
        assert_eq!(q["output_tokens_per_min"], 7);
        assert_eq!(q["base_model"], LINEAGE);
    }
    assert_eq!(v["us-east5"][SONNET_45]["requests_per_min"], 3);
    assert_eq!(
        v["us-east5"][SONNET_45]["base_model"],
        "anthropic-claude-sonnet-4-5"
    );
    sim.shutdown().await;
}
