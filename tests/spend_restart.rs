//! Spend caps are durable: the real `spillway` binary, restarted, still
//! knows what its tenants spent today — with the SQLite batch store as the
//! spend store (SIGKILL after a sync, and SIGTERM, whose shutdown writes the
//! last spend), and with Redis, where two replicas share one cap.

#[path = "../crates/spillway-redis/tests/common/mod.rs"]
mod redis_server;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use serde_json::{json, Value};
use spillway_core::spend::Period;
use spillway_sim::{SimConfig, SimHandle, Simulator};
use support::binary::{free_port, metrics_text, serve, wait_healthy, write_config};
use support::replica::Replica;
use support::{expect_error, series_value};

const HAIKU: &str = "claude-3-haiku@20240307";
const TOKEN: &str = "spend-restart-upstream-token";
const CAPPED_KEY: &str = "sk-spw-restart-capped-0123456789";
const FREE_KEY: &str = "sk-spw-restart-free-0123456789";
/// One request: 10,000 output tokens at $1.25 / MTok, and a few input tokens.
const ONE_REQUEST_USD: f64 = 0.0125;

async fn simulator() -> SimHandle {
    let mut config = SimConfig::vertex_defaults();
    config.bearer_token = Some(TOKEN.into());
    let sim = Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for region in ["us-central1", "europe-west4"] {
        sim.set_quota(region, HAIKU, 100_000, 100_000_000);
    }
    sim
}

/// Tenants and budgets: `capped` may spend $0.02 a day, `free` has no cap.
fn extra(store: &str, sync_ms: u64) -> String {
    format!(
        r#"[quota]
tokens_per_min = 10000000
{store}
[spend]
sync_ms = {sync_ms}
[tenants.capped]
key_sha256 = "{}"
spend_cap_usd_per_day = 0.02
[tenants.free]
key_sha256 = "{}"
"#,
        spillway_gateway::auth::hash_key(CAPPED_KEY),
        spillway_gateway::auth::hash_key(FREE_KEY),
    )
}

async fn expensive(http: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    http.post(format!("{url}/v1/messages"))
        .header("x-api-key", key)
        .json(&json!({
            "model": HAIKU, "max_tokens": 10_000,
            "messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=10000 at length"}]
        }))
        .send()
        .await
        .unwrap()
}

/// The store's name of today's period (UTC), e.g. `day:2026-11-27`.
fn today() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    Period::Day.containing(now).store_key()
}

/// What the SQLite file holds for `tenant` today, in nanodollars.
async fn sqlite_row(db: &Path, tenant: &str) -> Option<i64> {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::ConnectOptions;
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .ok()?;
    sqlx::query_scalar("SELECT nanodollars FROM spillway_spend WHERE tenant = ?1 AND period = ?2")
        .bind(tenant)
        .bind(today())
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten()
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tenant_spend(metrics: &str, tenant: &str) -> f64 {
    series_value(
        metrics,
        &format!("spillway_tenant_spend_usd{{period=\"day\",tenant=\"{tenant}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_cap_survives_sigkill_and_sigterm_restarts_with_the_sqlite_store() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("batches.sqlite3");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("spillway.toml");
    let log = dir.path().join("spillway.log");
    let store = format!("[batch]\nsqlite_path = \"{}\"", db.display());
    let http = spillway_gateway::tls::http_client();
    write_config(
        &config,
        port,
        &sim.base_url(),
        "spend-restart",
        TOKEN,
        "",
        &extra(&store, 100),
    );

    let mut gateway = serve(&config, &log);
    wait_healthy(&http, &url, &mut gateway).await;
    assert_eq!(expensive(&http, &url, CAPPED_KEY).await.status(), 200);
    assert_eq!(expensive(&http, &url, CAPPED_KEY).await.status(), 200);
    let refused = expensive(&http, &url, CAPPED_KEY).await;
    let message = expect_error(refused, 429, "rate_limit_error").await;
    assert!(message.contains("daily spend cap of $0.0200"), "{message}");
    let spent = tenant_spend(&metrics_text(&http, &url).await, "capped");
    assert!(spent >= 2.0 * ONE_REQUEST_USD, "{spent}");
    // The sync writes it to the file within 100 ms.
    until("the day's spend in SQLite", || async {
        sqlite_row(&db, "capped").await == Some((spent * 1e9).round() as i64)
    })
    .await;

    // SIGKILL: nothing is flushed at exit; what the last sync wrote is kept.
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    // This time only the shutdown writes the spend (no sync within a minute).
    write_config(
        &config,
        port,
        &sim.base_url(),
        "spend-restart",
        TOKEN,
        "",
        &extra(&store, 60_000),
    );
    let mut gateway = serve(&config, &log);
    wait_healthy(&http, &url, &mut gateway).await;
    let sent = sim.total_requests();
    let refused = expensive(&http, &url, CAPPED_KEY).await;
    let again = expect_error(refused, 429, "rate_limit_error").await;
    assert_eq!(
        again.split(" (retry-after").next(),
        message.split(" (retry-after").next(),
        "the restarted gateway knows the day's spend"
    );
    assert_eq!(sim.total_requests(), sent, "refused before Vertex");
    let metrics = metrics_text(&http, &url).await;
    assert!((tenant_spend(&metrics, "capped") - spent).abs() < 1e-9);

    // SIGTERM: the shutdown writes what was spent since the last sync.
    assert_eq!(expensive(&http, &url, FREE_KEY).await.status(), 200);
    let free = tenant_spend(&metrics_text(&http, &url).await, "free");
    assert!(free >= ONE_REQUEST_USD, "{free}");
    assert_eq!(sqlite_row(&db, "free").await, None, "not synced yet");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &gateway.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(gateway.wait().unwrap().success());
    assert_eq!(
        sqlite_row(&db, "free").await,
        Some((free * 1e9).round() as i64),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let mut gateway = serve(&config, &log);
    wait_healthy(&http, &url, &mut gateway).await;
    let metrics = metrics_text(&http, &url).await;
    assert!((tenant_spend(&metrics, "free") - free).abs() < 1e-9);
    assert_eq!(expensive(&http, &url, CAPPED_KEY).await.status(), 429);
    gateway.kill().unwrap();
    gateway.wait().unwrap();
}

async fn redis_total(redis: &RedisServer, tenant: &str) -> i64 {
    use redis::AsyncCommands;
    let mut conn = redis.connection().await;
    let key = format!("spillway:spend:{tenant}:{}", today());
    conn.get::<_, Option<i64>>(&key).await.unwrap().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_cap_in_redis_and_a_restarted_one_keeps_it() {
    let sim = simulator().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let http = spillway_gateway::tls::http_client();
    let store = format!(
        "store = \"redis\"\nredis_url = \"{}\"\nreplicas = 2\n[batch]\nenabled = false",
        redis.url()
    );
    let extra = extra(&store, 100);
    let start = |name: &str| {
        Replica::start(
            name,
            dir.path(),
            &sim.base_url(),
            "spend-redis",
            TOKEN,
            "",
            &extra,
        )
    };
    let mut a = start("a");
    let mut b = start("b");
    a.wait_healthy(&http).await;
    b.wait_healthy(&http).await;

    // The tenant spends through A only…
    assert_eq!(expensive(&http, &a.url, CAPPED_KEY).await.status(), 200);
    assert_eq!(expensive(&http, &a.url, CAPPED_KEY).await.status(), 200);
    let spent = tenant_spend(&metrics_text(&http, &a.url).await, "capped");
    // …and within a sync or two, B knows it from Redis and refuses.
    until("B reading A's spend", || async {
        tenant_spend(&metrics_text(&http, &b.url).await, "capped") >= spent - 1e-9
    })
    .await;
    let refused = expensive(&http, &b.url, CAPPED_KEY).await;
    let message = expect_error(refused, 429, "rate_limit_error").await;
    assert!(
        message.starts_with(&format!(
            "tenant capped has reached its daily spend cap of $0.0200 (spent ${spent:.4}"
        )),
        "{message}"
    );
    assert_eq!(
        redis_total(&redis, "capped").await,
        (spent * 1e9).round() as i64
    );
    // The other tenant is not capped, on either replica.
    assert_eq!(expensive(&http, &b.url, FREE_KEY).await.status(), 200);

    // A restarted replica reads the day's total from Redis before serving.
    a.kill();
    let mut a = start("a2");
    a.wait_healthy(&http).await;
    let r = expensive(&http, &a.url, CAPPED_KEY).await;
    assert_eq!(r.status(), 429, "{}", a.log_text());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    drop(b);
}
