//! `ResilientStore` across a Redis failure, against a real (killed and
//! restarted) `redis-server`: the local share starts from what the fleet
//! had spent, and a Redis that comes back empty gets the window it lost.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use spillway_core::adaptive::AdaptiveConfig;
use spillway_core::ledger::{Charge, Limits};
use spillway_core::store::{BudgetConfig, Denial, QuotaStore, ReserveRequest, Strategy};
use spillway_core::QuotaGroup;
use spillway_redis::{RedisSettings, ResilientStore, StoreMetrics};

const HAIKU: &str = "claude-3-haiku@20240307";
const REGION: &str = "us-central1";

fn settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.into(),
        key_prefix: format!("f{}:", rand::random::<u32>()),
        timeout: Duration::from_millis(200),
        window: Duration::from_secs(30),
        adaptive: AdaptiveConfig::default(),
        budgets: vec![BudgetConfig {
            group: HAIKU.into(),
            bucket: HAIKU.into(),
            region: REGION.into(),
            limits: Limits::new(30, 1_000_000),
        }],
        lease: Duration::ZERO,
        ca_file: None,
    }
}

/// Admits requests until refused; returns how many were admitted.
async fn fill(
    store: &ResilientStore,
    group: &QuotaGroup,
    regions: &[Arc<str>],
    most: usize,
) -> usize {
    for admitted in 0..most {
        let request = ReserveRequest {
            group,
            regions,
            charge: Charge {
                input: 10,
                output: 0,
            },
            strategy: Strategy::Ordered,
        };
        match store.reserve(request).await {
            Ok(_) => {}
            Err(Denial::Later { .. }) => return admitted,
            Err(Denial::Never) => panic!("a request of 10 tokens always fits an empty window"),
        }
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_share_starts_from_the_fleets_usage_and_an_empty_redis_gets_it_back() {
    let mut redis = RedisServer::start();
    let metrics = StoreMetrics::new(None);
    // N = 3: a local share of 10 of the 30.
    let store = ResilientStore::start(&settings(&redis.url()), 3, metrics.clone())
        .await
        .expect("starts");
    let group = QuotaGroup::from(HAIKU);
    let regions: Vec<Arc<str>> = vec![Arc::from(REGION)];
    assert_eq!(
        fill(&store, &group, &regions, 12).await,
        12,
        "through Redis"
    );
    // Long enough for this replica's own grants to be in the picture, and
    // no longer counted in full (failover::STALE); the picture is retaken
    // every 250 ms.
    tokio::time::sleep(Duration::from_millis(1_300)).await;

    redis.kill();
    // 12 of 30 spent: a third of what is left, (30 - 12) / 3 = 6.
    let local = fill(&store, &group, &regions, 30).await;
    assert_eq!(metrics.degraded.get(), 1);
    assert_eq!(local, 6, "(B − known usage) / N, not a fresh B / N = 10");

    redis.restart();
    while metrics.degraded.get() != 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let states = store.redis().try_states().await.expect("Redis answers");
    let state = states.iter().find(|s| &*s.region == REGION).unwrap();
    assert_eq!(
        state.usage.requests,
        12 + 6,
        "what Redis had admitted is restored, and only the local admissions are added"
    );
    // Every window stays within the budget: 30 − 18 = 12 more.
    assert_eq!(fill(&store, &group, &regions, 30).await, 12);
}
