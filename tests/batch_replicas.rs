//! Two replicas of the real binary sharing one PostgreSQL batch store (a
//! fresh database on 127.0.0.1:5432, or SPILLWAY_TEST_POSTGRES_URL, created
//! for this run and dropped after, also on failure). A batch submitted
//! through replica A is worked by both replicas; replica B is SIGKILLed
//! mid-batch, A takes B's items back when their leases (`lease_secs = 3`)
//! run out, and the batch completes with exactly one succeeded result per
//! custom_id. Items that B had in flight at the kill are sent upstream again
//! (at least once), which the test measures and prints rather than forbids.
//!
//! The replicas are `support::replica::Replica`s, killed by their guards if
//! an assertion fails.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use spillway_sim::{Fault, FaultKind, SimConfig, Simulator};
use support::binary::{batch, create_batch, results, succeeded};
use support::postgres::TempDatabase;
use support::replica::Replica;

mod support;

const HAIKU: &str = "claude-3-haiku@20240307";
const TOKEN: &str = "replicas-test-upstream-token";
const ITEMS: usize = 120;
/// Per replica: at most this many of its items are in flight at the kill.
const CONCURRENCY: u64 = 16;
/// The whole scenario, from the first start to the end of the batch.
const TIME_BOX: Duration = Duration::from_secs(60);

/// Replica `name`: one region, the batch store in PostgreSQL with short
/// leases.
fn replica(name: &str, dir: &Path, sim_url: &str, postgres_url: &str) -> Replica {
    let extra = format!(
        r#"[models."claude-3-haiku@20240307"]
regions = [{{ name = "us-central1", requests_per_min = 600, tokens_per_min = 10000000 }}]
[batch]
store = "postgres"
postgres_url = "{postgres_url}"
postgres_max_connections = 4
concurrency = {CONCURRENCY}
lease_secs = 3
poll_ms = 100
"#
    );
    Replica::start(name, dir, sim_url, "replicas-test", TOKEN, "", &extra)
}

/// Batch items `replica` finished (`spillway_batch_items_completed_total`,
/// all results).
async fn completed(replica: &Replica, http: &reqwest::Client) -> u64 {
    replica
        .metric_sum(http, "spillway_batch_items_completed_total")
        .await as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_a_batch_and_one_survives_a_sigkill_of_the_other() {
    TempDatabase::around("spillway_replicas", scenario).await;
}

async fn scenario(postgres_url: String) {
    let started = Instant::now();
    let mut sim_config = SimConfig::vertex_defaults();
    sim_config.bearer_token = Some(TOKEN.into());
    let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_quota("us-central1", HAIKU, 100_000, 100_000_000);
    // Slow answers, so B always has items in flight when the kill comes.
    sim.inject(Fault::region(
        "us-central1",
        FaultKind::Delay {
            first_token: Duration::from_millis(400),
            per_token: Duration::ZERO,
        },
    ));

    let dir = tempfile::tempdir().unwrap();
    let http = spillway_gateway::tls::http_client();
    // A first, so the tables exist before B connects (both would manage).
    let mut a = replica("a", dir.path(), &sim.base_url(), &postgres_url);
    a.wait_healthy(&http).await;
    let mut b = replica("b", dir.path(), &sim.base_url(), &postgres_url);
    b.wait_healthy(&http).await;

    let id = create_batch(&http, &a.url, ITEMS, 2)
        .await
        .unwrap_or_else(|answer| panic!("batch created: {answer}\n{}", a.log_text()));

    // Each replica's quota is 600 a minute (10 a second): both together
    // take about 6 s for the batch. Kill B once both have finished items
    // of it, well before the end.
    let deadline = started + TIME_BOX;
    let (done_a, done_b, before_kill) = loop {
        let (done_a, done_b) = (completed(&a, &http).await, completed(&b, &http).await);
        let bt = batch(&http, &a.url, &id).await;
        if done_a >= 5 && done_b >= 5 {
            break (done_a, done_b, bt);
        }
        assert!(
            Instant::now() < deadline,
            "both replicas should work the batch: a finished {done_a}, b {done_b}: {bt}\n--- b ---\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    b.kill();
    let sent_at_kill = sim.total_requests();
    assert_eq!(before_kill["processing_status"], "in_progress");
    assert!(
        succeeded(&before_kill) < ITEMS as u64,
        "killed mid-batch: {before_kill}"
    );

    let ended = loop {
        let bt = batch(&http, &a.url, &id).await;
        if bt["processing_status"] == "ended" {
            break bt;
        }
        assert!(
            Instant::now() < deadline,
            "not ended through A within {TIME_BOX:?}: {bt}\n--- a ---\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(succeeded(&ended), ITEMS as u64, "{ended}");

    let lines = results(&http, &ended).await;
    assert_eq!(lines.len(), ITEMS, "exactly one result per custom_id");
    let ids: HashSet<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = (0..ITEMS).map(|i| format!("item-{i}")).collect();
    assert_eq!(ids, expected);
    assert!(lines.iter().all(|l| l["result"]["type"] == "succeeded"));

    // At least once upstream: everything was sent; what B had in flight at
    // the kill (at most its concurrency) may have been sent twice.
    let sent = sim.total_requests();
    assert!(sent >= ITEMS as u64);
    let resent = sent - ITEMS as u64;
    assert!(resent <= CONCURRENCY, "{resent} sent again");
    let done_a_end = completed(&a, &http).await;
    eprintln!(
        "B killed after A finished {done_a} and B {done_b} items ({} results, {sent_at_kill} upstream calls); \
         A finished {done_a_end} in all; {resent} of {ITEMS} items sent upstream again; {:.1} s",
        succeeded(&before_kill),
        started.elapsed().as_secs_f64()
    );
    a.kill();
}
