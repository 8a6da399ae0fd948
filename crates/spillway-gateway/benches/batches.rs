//! Batch figures for BENCHMARKS.md.
//!
//! 1. **Throughput**: a 10,000-request batch through the real gateway and
//!    runner in front of the simulator, on a *paused* clock (minutes of quota
//!    pass in seconds), two regions of 600 requests/min each: requests per
//!    minute against the aggregate quota, with no interactive traffic.
//! 2. **Interactive latency**: one region of 600 requests/min (a refill
//!    interval of 0.1 s); interactive requests at 50% of it, evenly spaced,
//!    for 5 minutes, without and then with a batch running: p50/p99/max of
//!    the time each interactive request took (queue wait; the simulated
//!    upstream answers at once).
//! 3. **Store cost per request**, SQLite (a file, synchronous=FULL) and
//!    PostgreSQL (127.0.0.1:5432, a database created and dropped here): the
//!    wall time to insert, claim and complete one item, in chunks as the
//!    gateway does.
//! 4. **Memory while a 100,000-request JSONL file is uploaded**: this
//!    process's resident set sampled during the upload to an in-process
//!    gateway (real clock).
//!
//! Run: `cargo bench -p spillway-gateway --bench batches` (PostgreSQL at
//! SPILLWAY_TEST_POSTGRES_URL or postgres://postgres@127.0.0.1:5432/postgres).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};
use spillway_gateway::batch::store::{BatchStore, Finish, NewBatch, NewItem, PgStore, SqliteStore};
use spillway_gateway::config::{Settings, DEMO_TOML};
use spillway_gateway::Gateway;
use spillway_sim::{SimConfig, SimHandle, Simulator};
use sqlx::Connection;

const HAIKU: &str = "claude-3-haiku@20240307";

struct Stack {
    sim: SimHandle,
    url: String,
    http: reqwest::Client,
}

async fn start(overlay: &str, sim_rpm: u32) -> Stack {
    let mut sim_config = SimConfig::vertex_defaults();
    sim_config.bearer_token = Some("demo-upstream-token".into());
    let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for region in ["us-central1", "europe-west4"] {
        sim.set_quota(region, HAIKU, sim_rpm, 100_000_000);
    }
    let env: HashMap<String, String> = [
        ("SPILLWAY__UPSTREAM__REGIONAL_URL", sim.base_url()),
        ("SPILLWAY__UPSTREAM__GLOBAL_URL", sim.base_url()),
        ("SPILLWAY__SERVER__LISTEN", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_layers(&[DEMO_TOML, overlay], &[], Some(env)).unwrap();
    let gateway = Gateway::new(settings).await.unwrap();
    let listener = gateway.bind().await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    Stack {
        sim,
        url,
        http: spillway_gateway::tls::http_client(),
    }
}

fn item(i: usize) -> Value {
    json!({"custom_id": format!("r{i}"), "params": {"model": HAIKU, "max_tokens": 16,
        "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS=2 item {i}")}]}})
}

async fn submit(s: &Stack, n: usize) -> String {
    let requests: Vec<Value> = (0..n).map(item).collect();
    let r: Value = s
        .http
        .post(format!("{}/v1/messages/batches", s.url))
        .json(&json!({ "requests": requests }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["id"].as_str().expect("created").to_string()
}

async fn batch(s: &Stack, id: &str) -> Value {
    s.http
        .get(format!("{}/v1/messages/batches/{id}", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

const TWO_REGIONS_600: &str = "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\", requests_per_min = 600, tokens_per_min = 10000000 }, { name = \"europe-west4\", requests_per_min = 600, tokens_per_min = 10000000 }]\n[batch]\nconcurrency = 64\n";
const ONE_REGION_600: &str = "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\", requests_per_min = 600, tokens_per_min = 10000000 }]\n";

async fn throughput() {
    let s = start(TWO_REGIONS_600, 600).await;
    let started = tokio::time::Instant::now();
    let id = submit(&s, 10_000).await;
    let ended = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = batch(&s, &id).await;
        if b["processing_status"] == "ended" {
            break b;
        }
    };
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let ok = ended["request_counts"]["succeeded"].as_f64().unwrap();
    let rate = ok / minutes;
    let limited: u64 = ["us-central1", "europe-west4"]
        .iter()
        .map(|r| s.sim.counters(r, HAIKU).rate_limited)
        .sum();
    println!(
        "throughput: {ok} succeeded in {:.2} virtual min = {rate:.0}/min against an aggregate quota of 1200/min ({:.1}%); upstream 429s: {limited}",
        minutes,
        100.0 * rate / 1200.0
    );
}

async fn interactive(s: &Stack, per_minute: u32, minutes: u32) -> Vec<Duration> {
    let gap = Duration::from_secs(60) / per_minute;
    let sends = (0..per_minute * minutes).map(|i| {
        let s = &s;
        async move {
            tokio::time::sleep(gap * i).await;
            let t = tokio::time::Instant::now();
            let r = s
                .http
                .post(format!("{}/v1/messages", s.url))
                .json(&json!({"model": HAIKU, "max_tokens": 16,
                    "messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=2 hi"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            t.elapsed()
        }
    });
    let mut waits = join_all(sends).await;
    waits.sort();
    waits
}

fn pct(sorted: &[Duration], p: usize) -> f64 {
    sorted[((sorted.len() * p).div_ceil(100)).max(1) - 1].as_secs_f64() * 1000.0
}

async fn latency() {
    let baseline = {
        let s = start(ONE_REGION_600, 600).await;
        interactive(&s, 300, 5).await
    };
    let s = start(ONE_REGION_600, 600).await;
    let id = submit(&s, 10_000).await;
    tokio::time::sleep(Duration::from_secs(70)).await;
    let before = batch(&s, &id).await["request_counts"]["succeeded"]
        .as_i64()
        .unwrap();
    let with_batch = interactive(&s, 300, 5).await;
    let after = batch(&s, &id).await["request_counts"]["succeeded"]
        .as_i64()
        .unwrap();
    for (name, w) in [
        ("without a batch", &baseline),
        ("with a batch", &with_batch),
    ] {
        println!(
            "interactive at 50% {name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n = {})",
            pct(w, 50),
            pct(w, 99),
            w.last().unwrap().as_secs_f64() * 1000.0,
            w.len()
        );
    }
    println!(
        "meanwhile the batch completed {} items in 5 min ({:.0}/min; the quota is 600/min, interactive took 300/min); upstream 429s: {}",
        after - before,
        (after - before) as f64 / 5.0,
        s.sim.counters("us-central1", HAIKU).rate_limited
    );
}

async fn store_cost(name: &str, store: Arc<dyn BatchStore>, n: usize) {
    let seq = store
        .create(&NewBatch {
            id: format!("msgbatch_bench_{name}"),
            tenant: "bench".into(),
            created_at: 0,
            expires_at: i64::MAX / 2,
            traceparent: None,
        })
        .await
        .unwrap();
    let params = item(0)["params"].to_string();
    let items: Vec<NewItem> = (0..n)
        .map(|i| NewItem {
            custom_id: format!("r{i}"),
            params: params.clone(),
        })
        .collect();
    let t = Instant::now();
    for (k, chunk) in items.chunks(1000).enumerate() {
        store
            .insert_items(seq, (k * 1000) as i64, chunk)
            .await
            .unwrap();
    }
    store.activate(seq, n as i64).await.unwrap();
    let insert = t.elapsed();
    let result = r#"{"type":"succeeded","message":{"id":"msg_x","type":"message","role":"assistant","content":[{"type":"text","text":"hello there"}],"usage":{"input_tokens":10,"output_tokens":2}}}"#;
    let t = Instant::now();
    loop {
        let claimed = store.claim("bench", 1, 1_000_000, 32).await.unwrap();
        if claimed.is_empty() {
            break;
        }
        for c in claimed {
            assert!(store
                .complete(c.key, "bench", Finish::Succeeded, result, 2)
                .await
                .unwrap());
        }
    }
    let run = t.elapsed();
    let bytes = store.size_bytes().await.unwrap();
    println!(
        "store {name}: insert {:.1} µs/item, claim+complete {:.1} µs/item ({:.0} items/s on one runner); {:.0} bytes/item on disk",
        insert.as_secs_f64() * 1e6 / n as f64,
        run.as_secs_f64() * 1e6 / n as f64,
        n as f64 / run.as_secs_f64(),
        bytes as f64 / n as f64
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn upload_memory() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("upload.sqlite3");
    // Pacing to a crawl keeps the runner from working during the upload.
    let overlay = format!(
        "[models.\"claude-3-haiku@20240307\"]\nregions = [{{ name = \"us-central1\", requests_per_min = 1 }}]\n[batch]\nsqlite_path = \"{}\"\n",
        db.display()
    );
    let s = start(&overlay, 1).await;
    let path = dir.path().join("jobs.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..100_000 {
            writeln!(f, "{}", item(i)).unwrap();
        }
    }
    let size = std::fs::metadata(&path).unwrap().len();
    let before = rss_kib();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let t = Instant::now();
    let file = tokio::fs::File::open(&path).await.unwrap();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let r: Value = s
        .http
        .post(format!("{}/v1/messages/batches", s.url))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let took = t.elapsed();
    sampler.abort();
    assert_eq!(r["request_counts"]["processing"], 100_000, "{r}");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "upload: 100,000 requests, {:.1} MB of JSONL in {:.1} s ({:.0} requests/s, validated and stored in SQLite); process RSS {:.1} MB before, peak {:.1} MB during (+{:.1} MB), file on disk {:.1} MB",
        size as f64 / 1e6,
        took.as_secs_f64(),
        100_000.0 / took.as_secs_f64(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak - before) as f64 / 1024.0,
        std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );
}

fn main() {
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let real = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let t = Instant::now();
    paused().block_on(throughput());
    eprintln!(
        "(throughput took {:.1} s of wall time)",
        t.elapsed().as_secs_f64()
    );
    paused().block_on(latency());
    real().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cost.sqlite3");
        let sqlite = Arc::new(SqliteStore::open(path.to_str().unwrap()).await.unwrap());
        store_cost("sqlite", sqlite, 10_000).await;

        let admin = std::env::var("SPILLWAY_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = "spillway_bench_batches";
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        let pg = Arc::new(PgStore::connect(&url, 8).await.unwrap());
        store_cost("postgres", pg.clone(), 10_000).await;
        drop(pg);
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
    });
    real().block_on(upload_memory());
}
