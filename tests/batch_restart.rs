//! Durability against the real binary: SIGKILL `spillway serve` in the
//! middle of a batch, start it again on the same SQLite file, and the batch
//! completes with exactly one result per custom_id. Items that were in
//! flight at the kill are sent upstream again (at least once), which the
//! test measures rather than forbids.

use std::collections::HashSet;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use spillway_sim::{Fault, FaultKind, SimConfig, Simulator};
use support::binary::{
    batch, create_batch, free_port, results, succeeded, wait_healthy, write_config,
};

mod support;

const HAIKU: &str = "claude-3-haiku@20240307";
const TOKEN: &str = "restart-test-upstream-token";
const ITEMS: usize = 120;

fn start_gateway(config: &std::path::Path, log: &std::path::Path) -> Child {
    support::binary::serve(config, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_restart_gives_exactly_one_result_per_custom_id() {
    let mut sim_config = SimConfig::vertex_defaults();
    sim_config.bearer_token = Some(TOKEN.into());
    let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_quota("us-central1", HAIKU, 100_000, 100_000_000);
    // Slow answers, so some items are always in flight when the kill comes.
    sim.inject(Fault::region(
        "us-central1",
        FaultKind::Delay {
            first_token: Duration::from_millis(400),
            per_token: Duration::ZERO,
        },
    ));

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/batches.sqlite3");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("spillway.toml");
    let extra = format!(
        r#"[models."claude-3-haiku@20240307"]
regions = [{{ name = "us-central1", requests_per_min = 1200, tokens_per_min = 10000000 }}]
[batch]
sqlite_path = "{db}"
concurrency = 16
lease_secs = 30
"#,
        db = db.display()
    );
    write_config(
        &config,
        port,
        &sim.base_url(),
        "restart-test",
        TOKEN,
        "",
        &extra,
    );
    let log = dir.path().join("spillway.log");
    let http = spillway_gateway::tls::http_client();

    let mut gateway = start_gateway(&config, &log);
    wait_healthy(&http, &url, &mut gateway).await;
    assert!(db.exists(), "the SQLite file is created on first start");
    let id = create_batch(&http, &url, ITEMS, 2)
        .await
        .unwrap_or_else(|answer| {
            panic!(
                "batch created: {answer}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });

    // 1200 a minute is 20 a second: about 6 s for the batch. Kill it a
    // third of the way in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let before_kill = loop {
        let b = batch(&http, &url, &id).await;
        if succeeded(&b) >= (ITEMS / 3) as u64 {
            break b;
        }
        assert!(Instant::now() < deadline, "no progress: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    gateway.kill().expect("SIGKILL");
    gateway.wait().unwrap();
    let sent_before_restart = sim.total_requests();
    assert_eq!(before_kill["processing_status"], "in_progress");
    assert!(
        succeeded(&before_kill) < ITEMS as u64,
        "killed mid-batch: {before_kill}"
    );

    let mut gateway = start_gateway(&config, &log);
    wait_healthy(&http, &url, &mut gateway).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let b = batch(&http, &url, &id).await;
        if b["processing_status"] == "ended" {
            break b;
        }
        assert!(Instant::now() < deadline, "not ended after restart: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(succeeded(&ended), ITEMS as u64, "{ended}");

    let lines: Vec<Value> = results(&http, &ended).await;
    assert_eq!(lines.len(), ITEMS, "exactly one result per custom_id");
    let ids: HashSet<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = (0..ITEMS).map(|i| format!("item-{i}")).collect();
    assert_eq!(ids, expected);
    assert!(lines.iter().all(|l| l["result"]["type"] == "succeeded"));

    // At least once upstream: everything was sent; items in flight at the
    // kill (at most `concurrency`) may have been sent twice.
    let sent = sim.total_requests();
    let resent = sent - ITEMS as u64;
    assert!(sent >= ITEMS as u64);
    assert!(resent <= 16, "{resent} sent again");
    eprintln!(
        "killed after {} results ({} upstream calls); {} sent again after restart",
        succeeded(&before_kill),
        sent_before_restart,
        resent
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    if resent > 0 {
        assert!(
            log_text.contains("will be sent again"),
            "the restart says so"
        );
    }
    gateway.kill().unwrap();
    gateway.wait().unwrap();
}
