//! The Lua scripts against a real Redis, case by case the same as
//! `MemoryStore`'s unit tests, plus what only a shared store has: many
//! handles reserving at once never put any window over budget.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use spillway_core::adaptive::{AdaptiveConfig, Exhausted};
use spillway_core::ledger::{Charge, Limits, Usage};
use spillway_core::store::{
    BudgetConfig, Denial, Grant, Outcome, QuotaStore, ReserveRequest, Strategy,
};
use spillway_core::QuotaGroup;
use spillway_redis::{LeaseCounters, RedisSettings, RedisStore};

const HAIKU: &str = "claude-3-haiku@20240307";
static HAIKU_GROUP: std::sync::LazyLock<QuotaGroup> =
    std::sync::LazyLock::new(|| QuotaGroup::from(HAIKU));

fn settings(url: &str, window: Duration, limits: Limits) -> RedisSettings {
    RedisSettings {
        url: url.into(),
        key_prefix: format!("t{}:", rand::random::<u32>()),
        timeout: Duration::from_secs(2),
        window,
        adaptive: AdaptiveConfig {
            cooldown_base: Duration::from_millis(200),
            ..AdaptiveConfig::default()
        },
        budgets: ["us-central1", "europe-west4"]
            .map(|region| BudgetConfig {
                group: HAIKU.into(),
                bucket: HAIKU.into(),
                region: region.into(),
                limits,
            })
            .to_vec(),
        lease: Duration::ZERO,
        ca_file: None,
    }
}

async fn store(redis: &RedisServer) -> RedisStore {
    let s = settings(
        &redis.url(),
        Duration::from_secs(60),
        Limits::new(60, 50_000),
    );
    RedisStore::connect(&s).await.expect("connects")
}

fn regions() -> Vec<Arc<str>> {
    vec![Arc::from("us-central1"), Arc::from("europe-west4")]
}

fn ask(regions: &[Arc<str>], tokens: u64, strategy: Strategy) -> ReserveRequest<'_> {
    ReserveRequest {
        group: &HAIKU_GROUP,
        regions,
        charge: Charge {
            input: tokens,
            output: 0,
        },
        strategy,
    }
}

async fn reserve(s: &RedisStore, r: ReserveRequest<'_>) -> Result<Grant, Denial> {
    s.try_reserve(r).await.expect("redis answers")
}

#[tokio::test]
async fn most_headroom_spreads_and_ordered_fills_the_primary_first() {
    let redis = RedisServer::start();
    let s = store(&redis).await;
    let r = regions();
    let mut by_region = HashMap::new();
    for _ in 0..120 {
        let g = reserve(&s, ask(&r, 10, Strategy::MostHeadroom))
            .await
            .unwrap();
        *by_region.entry(g.region.to_string()).or_insert(0) += 1;
    }
    assert_eq!(by_region["us-central1"], 60);
    assert_eq!(by_region["europe-west4"], 60);
    assert!(matches!(
        reserve(&s, ask(&r, 10, Strategy::MostHeadroom)).await,
        Err(Denial::Later { .. })
    ));

    let s = store(&redis).await;
    assert_eq!(s.probe(ask(&r, 10, Strategy::Ordered)).await, Ok(()));
    for i in 0..61 {
        let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
        let expected = if i < 60 {
            "us-central1"
        } else {
            "europe-west4"
        };
        assert_eq!(&*g.region, expected);
    }
}

#[tokio::test]
async fn token_spillover_and_never_fitting_requests() {
    let redis = RedisServer::start();
    let s = store(&redis).await;
    let r = regions();
    let g1 = reserve(&s, ask(&r, 48_600, Strategy::MostHeadroom))
        .await
        .unwrap();
    let g2 = reserve(&s, ask(&r, 48_600, Strategy::MostHeadroom))
        .await
        .unwrap();
    assert_ne!(g1.region, g2.region);
    match reserve(&s, ask(&r, 48_600, Strategy::MostHeadroom)).await {
        Err(Denial::Later { retry_at }) => {
            assert_eq!(retry_at, g1.view.now + Duration::from_micros(60_000_001))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        reserve(&s, ask(&r, 50_001, Strategy::MostHeadroom))
            .await
            .unwrap_err(),
        Denial::Never
    );
}

#[tokio::test]
async fn settling_refunds_and_not_sent_cancels() {
    let redis = RedisServer::start();
    let s = store(&redis).await;
    let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
    let g = reserve(&s, ask(&only, 40_000, Strategy::Ordered))
        .await
        .unwrap();
    assert_eq!(g.view.usage.input, 40_000);
    assert!(reserve(&s, ask(&only, 20_000, Strategy::Ordered))
        .await
        .is_err());
    s.try_settle(
        &g,
        Outcome::Used(Charge {
            input: 5_000,
            output: 100,
        }),
    )
    .await
    .unwrap();
    let g2 = reserve(&s, ask(&only, 20_000, Strategy::Ordered))
        .await
        .unwrap();
    let in_flight = s.try_states().await.unwrap()[1].in_flight;
    assert_eq!(in_flight.input, 20_000);
    s.try_settle(&g2, Outcome::NotSent).await.unwrap();
    // Settling twice, or an unknown entry, changes nothing.
    s.try_settle(&g2, Outcome::NotSent).await.unwrap();
    let state = &s.try_states().await.unwrap()[1];
    assert_eq!(&*state.region, "us-central1");
    assert_eq!(
        state.usage,
        Usage {
            requests: 1,
            input: 5_000,
            output: 100
        }
    );
    assert_eq!(state.in_flight, Usage::default());
}

#[tokio::test]
async fn a_429_cools_the_region_down_learns_and_traffic_spills() {
    let redis = RedisServer::start();
    let s = store(&redis).await;
    let r = regions();
    for _ in 0..10 {
        let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
        assert_eq!(&*g.region, "us-central1");
    }
    let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    s.try_settle(&g, Outcome::RateLimited(Exhausted::Requests))
        .await
        .unwrap();
    let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    assert_eq!(&*g.region, "europe-west4", "us-central1 is cooling down");
    let us = s.try_states().await.unwrap()[1].clone();
    assert_eq!(us.effective.requests, 30, "halved at most (observed 10)");
    assert_eq!(us.effective.tokens, Some(50_000), "tokens untouched");
    let first = us.cooldown_remaining;
    assert!(first > Duration::from_millis(100) && first <= Duration::from_millis(240));
    // A second 429 doubles it; an unavailable answer never shortens it.
    let g = Grant {
        region: Arc::from("us-central1"),
        ..g
    };
    s.try_settle(&g, Outcome::RateLimited(Exhausted::Tokens))
        .await
        .unwrap();
    let second = s.try_states().await.unwrap()[1].cooldown_remaining;
    assert!(second > first, "{second:?} > {first:?}");
    s.try_settle(&g, Outcome::Used(Charge::default()))
        .await
        .unwrap();
    s.try_settle(&g, Outcome::Unavailable).await.unwrap();
    let third = s.try_states().await.unwrap()[1].cooldown_remaining;
    assert!(
        third + Duration::from_millis(20) >= second,
        "never shortened"
    );
    tokio::time::sleep(third + Duration::from_millis(20)).await;
    let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    assert_eq!(&*g.region, "us-central1");
}

#[tokio::test]
async fn drained_regions_take_nothing_and_runtime_quota_changes_apply() {
    let redis = RedisServer::start();
    let s = store(&redis).await;
    let r = regions();
    assert_eq!(s.try_set_drained("us-central1", true).await.unwrap(), 1);
    for _ in 0..5 {
        let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
        assert_eq!(&*g.region, "europe-west4");
    }
    // Another handle (another replica) sees the drain and the new limits.
    let other = store(&redis).await;
    assert!(s
        .try_set_configured(&HAIKU_GROUP, "europe-west4", Limits::new(5, 50_000))
        .await
        .unwrap());
    assert!(reserve(&s, ask(&r, 10, Strategy::Ordered)).await.is_err());
    assert!(!s
        .try_set_configured(&HAIKU_GROUP, "nowhere", Limits::new(5, 5))
        .await
        .unwrap());
    drop(other);
    s.try_set_drained("us-central1", false).await.unwrap();
    let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    assert_eq!(&*g.region, "us-central1");
}

#[tokio::test]
async fn unknown_models_never_fit() {
    let redis = RedisServer::start();
    let s = store(&redis).await;
    let r = regions();
    let mut q = ask(&r, 1, Strategy::Ordered);
    let unknown = QuotaGroup::from("claude-x");
    q.group = &unknown;
    assert_eq!(reserve(&s, q).await.unwrap_err(), Denial::Never);
}

#[tokio::test]
async fn the_window_is_closed_and_frees_exactly_then_keys_expire() {
    let redis = RedisServer::start();
    let w = Duration::from_millis(400);
    let settings = settings(&redis.url(), w, Limits::new(3, 1_000));
    let s = RedisStore::connect(&settings).await.unwrap();
    let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
    let first = reserve(&s, ask(&only, 1, Strategy::Ordered)).await.unwrap();
    for _ in 0..2 {
        reserve(&s, ask(&only, 1, Strategy::Ordered)).await.unwrap();
    }
    let retry_at = match reserve(&s, ask(&only, 1, Strategy::Ordered)).await {
        Err(Denial::Later { retry_at }) => retry_at,
        other => panic!("{other:?}"),
    };
    assert_eq!(retry_at, first.view.now + w + Duration::from_micros(1));
    // The scheduler's conversion: store time minus the store's now.
    let wait = retry_at.saturating_sub(s.now());
    assert!(
        wait <= w && wait > w - Duration::from_millis(100),
        "{wait:?}"
    );
    tokio::time::sleep(wait + Duration::from_millis(5)).await;
    reserve(&s, ask(&only, 1, Strategy::Ordered)).await.unwrap();

    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", settings.key_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} expires");
        // The state key also holds adaptive state, which outlives the
        // window on purpose (its usage part expires with the entries).
        if !key.ends_with(":state") {
            assert!(ttl <= 5_400, "{key}: {ttl} ms, a little over the window");
        }
    }
}

/// Several handles (separate connections, as replicas) reserve and settle
/// at random, concurrently; every closed window of the merged log fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_handles_never_put_a_window_over_budget() {
    several_handles_at_once(Duration::ZERO, Limits::new(7, 4_000)).await;
}

/// The same with leases: a request admitted under a lease is logged when
/// it was admitted (when it would go upstream), not at its lease's stamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_handles_with_leases_never_put_a_window_over_budget() {
    // Roomier, so that leases form at all (at most a quarter of the room).
    let admitted =
        several_handles_at_once(Duration::from_millis(30), Limits::new(40, 20_000)).await;
    assert!(admitted > 0, "some requests were admitted under leases");
}

/// Returns how many requests leases admitted.
async fn several_handles_at_once(lease: Duration, limits: Limits) -> u64 {
    let redis = RedisServer::start();
    let w = Duration::from_millis(300);
    let settings = RedisSettings {
        lease,
        ..settings(&redis.url(), w, limits)
    };
    let counters = LeaseCounters::unregistered();
    let log = Arc::new(std::sync::Mutex::new(
        Vec::<(Arc<str>, Duration, Charge)>::new(),
    ));
    let mut tasks = Vec::new();
    for seed in 0..4u64 {
        let s = RedisStore::with_lease_counters(&settings, counters.clone()).unwrap();
        s.reconnect().await.unwrap();
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            let r = regions();
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let deadline = std::time::Instant::now() + Duration::from_millis(2_500);
            while std::time::Instant::now() < deadline {
                let charge = Charge {
                    input: next() % 900,
                    output: next() % 400,
                };
                let strategy = if next() % 2 == 0 {
                    Strategy::Ordered
                } else {
                    Strategy::MostHeadroom
                };
                let request = ReserveRequest {
                    group: &HAIKU_GROUP,
                    regions: &r,
                    charge,
                    strategy,
                };
                match s.try_reserve(request).await.unwrap() {
                    Ok(grant) => {
                        let stamp = if lease.is_zero() {
                            grant.view.empty_at - w - Duration::from_micros(1)
                        } else {
                            grant.view.now
                        };
                        let actual = match next() % 3 {
                            0 => None,
                            _ => Some(Charge {
                                input: charge.input * (next() % 101) / 100,
                                output: charge.output * (next() % 101) / 100,
                            }),
                        };
                        let outcome = actual.map_or(Outcome::NotSent, Outcome::Used);
                        if next() % 4 == 0 {
                            tokio::time::sleep(Duration::from_millis(next() % 20)).await;
                        }
                        s.try_settle(&grant, outcome).await.unwrap();
                        if let Some(actual) = actual {
                            log.lock()
                                .unwrap()
                                .push((Arc::clone(&grant.region), stamp, actual));
                        }
                    }
                    Err(Denial::Later { .. }) => {
                        tokio::time::sleep(Duration::from_millis(next() % 5)).await
                    }
                    Err(Denial::Never) => panic!("everything fits an empty window"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap();
    assert!(log.len() > 40, "{} admissions", log.len());
    for (region, start, _) in log.iter() {
        let (mut requests, mut tokens) = (0u32, 0u64);
        for (r, at, c) in log.iter() {
            if r == region && at >= start && *at <= *start + w {
                requests += 1;
                tokens += c.total();
            }
        }
        assert!(
            requests <= limits.requests,
            "{requests} requests in a {region} window"
        );
        assert!(
            tokens <= limits.tokens.unwrap(),
            "{tokens} tokens in a {region} window"
        );
    }
    println!(
        "{} admissions, {} under leases",
        log.len(),
        counters.admitted.get()
    );
    counters.admitted.get()
}

/// The state key outlives the entries (it holds adaptive state too): once
/// the entries have expired unsettled, the usage it carries must not come
/// back as phantom load. Learned limits, on the other hand, survive.
#[tokio::test]
async fn usage_ends_with_the_entries_while_learned_limits_survive() {
    let redis = RedisServer::start();
    let w = Duration::from_millis(200);
    let settings = settings(&redis.url(), w, Limits::new(40, 10_000));
    let s = RedisStore::connect(&settings).await.unwrap();
    let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
    for _ in 0..3 {
        // Reserved and never settled: only expiry can end these.
        reserve(&s, ask(&only, 100, Strategy::Ordered))
            .await
            .unwrap();
    }
    let g = reserve(&s, ask(&only, 100, Strategy::Ordered))
        .await
        .unwrap();
    s.try_settle(&g, Outcome::RateLimited(Exhausted::Requests))
        .await
        .unwrap();
    let learned = s.try_states().await.unwrap()[1].effective.requests;
    assert!(learned < 36, "a 429 lowered the learned limit: {learned}");

    // The entries' TTL is the window plus 5 s.
    let mut conn = redis.connection().await;
    let entries = budget_key(&settings, "us-central1", "entries");
    let state = budget_key(&settings, "us-central1", "state");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&entries)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !exists {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "entries never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state_lives: bool = redis::cmd("EXISTS")
        .arg(&state)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(state_lives, "the state key outlives the entries");

    let now = &s.try_states().await.unwrap()[1];
    assert_eq!(now.usage, Usage::default(), "no phantom usage");
    assert_eq!(now.in_flight, Usage::default());
    assert_eq!(now.effective.requests, learned, "learning kept");
    // And the whole learned budget is there to take.
    for _ in 0..learned {
        reserve(&s, ask(&only, 100, Strategy::Ordered))
            .await
            .unwrap();
    }
    assert!(reserve(&s, ask(&only, 100, Strategy::Ordered))
        .await
        .is_err());
}

/// The name of one of a Haiku budget's keys (`entries` or `state`).
fn budget_key(settings: &RedisSettings, region: &str, kind: &str) -> String {
    format!("{}{{{HAIKU}}}:{region}:{kind}", settings.key_prefix)
}

async fn entries_in(redis: &RedisServer, settings: &RedisSettings, region: &str) -> u64 {
    let mut conn = redis.connection().await;
    redis::cmd("ZCARD")
        .arg(budget_key(settings, region, "entries"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A decision writes only the budget it chooses: another candidate's few
/// old entries stay stored (and are skipped by every reader) until a write
/// to it drops them, but a long tail of them is dropped at once.
#[tokio::test]
async fn only_the_chosen_budget_is_written_and_long_tails_are_dropped() {
    let redis = RedisServer::start();
    let w = Duration::from_millis(300);
    let settings = settings(&redis.url(), w, Limits::new(1_000, 1_000_000));
    let s = RedisStore::connect(&settings).await.unwrap();
    let us: Vec<Arc<str>> = vec![Arc::from("us-central1")];
    let eu: Vec<Arc<str>> = vec![Arc::from("europe-west4")];
    for _ in 0..10 {
        reserve(&s, ask(&us, 10, Strategy::Ordered)).await.unwrap();
    }
    for _ in 0..2 {
        reserve(&s, ask(&eu, 10, Strategy::Ordered)).await.unwrap();
    }
    tokio::time::sleep(w + Duration::from_millis(50)).await;
    // Both empty once the old entries are discounted: the first wins the tie.
    let g = reserve(&s, ask(&regions(), 10, Strategy::MostHeadroom))
        .await
        .unwrap();
    assert_eq!(&*g.region, "us-central1");
    assert_eq!(entries_in(&redis, &settings, "us-central1").await, 1);
    assert_eq!(
        entries_in(&redis, &settings, "europe-west4").await,
        2,
        "looked at, not written"
    );
    // Now a long tail in europe-west4, and us-central1 chosen again.
    for _ in 0..10 {
        reserve(&s, ask(&eu, 10, Strategy::Ordered)).await.unwrap();
    }
    tokio::time::sleep(w + Duration::from_millis(50)).await;
    let g = reserve(&s, ask(&regions(), 10, Strategy::MostHeadroom))
        .await
        .unwrap();
    assert_eq!(&*g.region, "us-central1");
    assert_eq!(
        entries_in(&redis, &settings, "europe-west4").await,
        0,
        "twelve old entries are dropped even though not chosen"
    );
    // And the sums agree with what is stored.
    for state in s.try_states().await.unwrap() {
        let expected = if &*state.region == "us-central1" {
            1
        } else {
            0
        };
        assert_eq!(state.usage.requests, expected, "{}", state.region);
    }
}

/// Redis restarted or flushed behind a connected replica: the next call
/// loads the functions again instead of failing.
#[tokio::test]
async fn a_lost_function_library_is_loaded_again() {
    let redis = RedisServer::start();
    let s = store(&redis).await;
    let r = regions();
    reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    assert_eq!(s.try_states().await.unwrap()[1].usage.requests, 2);
}

// Leases (`lease.rs`) ------------------------------------------------------

const LEASE: Duration = Duration::from_millis(120);

async fn leasing_store(redis: &RedisServer, limits: Limits) -> (RedisStore, LeaseCounters) {
    let s = RedisSettings {
        lease: LEASE,
        ..settings(&redis.url(), Duration::from_secs(60), limits)
    };
    let counters = LeaseCounters::unregistered();
    let store = RedisStore::with_lease_counters(&s, counters.clone()).unwrap();
    store.reconnect().await.unwrap();
    (store, counters)
}

fn leased(g: &Grant) -> bool {
    g.entry.raw() & (1 << 62) != 0
}

async fn us_state(s: &RedisStore) -> spillway_core::store::BudgetState {
    let states = s.try_states().await.unwrap();
    states
        .into_iter()
        .find(|b| &*b.region == "us-central1")
        .unwrap()
}

/// Two requests in one lease length, then a lease of 1 + 2: Redis holds
/// all three at once, the next two are admitted without asking it, and
/// what the lease did not use goes back when it ends.
#[tokio::test]
async fn a_busy_replica_leases_room_admits_from_it_locally_and_gives_back_the_rest() {
    let redis = RedisServer::start();
    let (s, counters) = leasing_store(&redis, Limits::new(60, 50_000)).await;
    let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
    for _ in 0..2 {
        let g = reserve(&s, ask(&only, 100, Strategy::Ordered))
            .await
            .unwrap();
        assert!(!leased(&g), "no demand seen yet");
        s.try_settle(
            &g,
            Outcome::Used(Charge {
                input: 100,
                output: 0,
            }),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(LEASE).await;
    let g3 = reserve(&s, ask(&only, 100, Strategy::Ordered))
        .await
        .unwrap();
    assert!(leased(&g3));
    assert_eq!(counters.granted.get(), 1);
    let in_redis = us_state(&s).await.usage;
    assert_eq!(in_redis.requests, 5, "the singles and the whole lease");
    assert_eq!(in_redis.input, 500);
    let g4 = reserve(&s, ask(&only, 100, Strategy::Ordered))
        .await
        .unwrap();
    let g5 = reserve(&s, ask(&only, 100, Strategy::Ordered))
        .await
        .unwrap();
    assert!(leased(&g4) && leased(&g5));
    assert_eq!(counters.admitted.get(), 3);
    assert_eq!(us_state(&s).await.usage, in_redis, "no call to Redis");
    // While the lease is open its requests end locally.
    s.try_settle(&g4, Outcome::NotSent).await.unwrap();
    s.try_settle(
        &g3,
        Outcome::Used(Charge {
            input: 80,
            output: 7,
        }),
    )
    .await
    .unwrap();
    assert_eq!(us_state(&s).await.usage, in_redis);
    tokio::time::sleep(LEASE + Duration::from_millis(30)).await;
    // Closed: g4 gone, g3 as used, g5 still in flight at its estimate.
    let state = us_state(&s).await;
    assert_eq!(
        state.usage,
        Usage {
            requests: 4,
            input: 380,
            output: 7
        }
    );
    assert_eq!(
        state.in_flight.requests, 2,
        "the lease's entry waits for g5"
    );
    s.try_settle(
        &g5,
        Outcome::Used(Charge {
            input: 90,
            output: 3,
        }),
    )
    .await
    .unwrap();
    let state = us_state(&s).await;
    assert_eq!(
        state.usage,
        Usage {
            requests: 4,
            input: 370,
            output: 10
        }
    );
    assert_eq!(state.in_flight, Usage::default());
    assert_eq!(s.leases_tracked(), 0);
}

/// Near the limit a lease is at most a quarter of what is left after the
/// request, so one replica's lease never holds what the others need, and
/// the budget fills exactly.
#[tokio::test]
async fn leases_shrink_near_the_limit() {
    let redis = RedisServer::start();
    let (s, _) = leasing_store(&redis, Limits::new(40, 50_000)).await;
    let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
    let mut leases = Vec::new();
    let mut before = 0;
    for _ in 0..40 {
        for _ in 0..4 {
            let Ok(g) = reserve(&s, ask(&only, 10, Strategy::Ordered)).await else {
                break;
            };
            let after = us_state(&s).await.usage.requests;
            if after > before {
                let extra = after - before - 1;
                // Room left after the request, a quarter of it at most.
                assert!(
                    extra <= (40 - before - 1) / 4,
                    "{extra} leased with {before} used"
                );
                if leased(&g) {
                    leases.push(extra);
                }
            }
            before = after;
        }
        tokio::time::sleep(LEASE / 2).await;
    }
    // Demand asks for about 8 (two rounds of 4 per length); what is left
    // decides (7, 5, 4, 3, 2, 1 here).
    assert!(
        leases.len() >= 3 && leases[0] >= 2,
        "leases granted: {leases:?}"
    );
    assert!(leases.last() < leases.first(), "shrinking: {leases:?}");
    assert_eq!(us_state(&s).await.usage.requests, 40, "exactly the budget");
    assert!(matches!(
        reserve(&s, ask(&only, 10, Strategy::Ordered)).await,
        Err(Denial::Later { .. })
    ));
}

/// A 429 on a leased request closes the lease at once and cools the region
/// down in Redis: the next request spills without waiting for the lease.
#[tokio::test]
async fn a_429_under_a_lease_closes_it_and_traffic_spills_at_once() {
    let redis = RedisServer::start();
    let (s, _) = leasing_store(&redis, Limits::new(60, 50_000)).await;
    let r = regions();
    for _ in 0..3 {
        reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    }
    tokio::time::sleep(LEASE).await;
    let g = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    assert!(leased(&g));
    assert_eq!(&*g.region, "us-central1");
    s.try_settle(&g, Outcome::RateLimited(Exhausted::Requests))
        .await
        .unwrap();
    let us = us_state(&s).await;
    assert!(us.cooldown_remaining > Duration::ZERO);
    assert_eq!(us.usage.requests, 4, "the lease's unused room went back");
    let next = reserve(&s, ask(&r, 10, Strategy::Ordered)).await.unwrap();
    assert_eq!(&*next.region, "europe-west4");
}

const S45: &str = "claude-sonnet-4-5@20250929";
const S46: &str = "claude-sonnet-4-6@20260101";
const LINEAGE: &str = "anthropic-claude-sonnet";

/// Two Sonnet versions: `global` one lineage bucket (`global_requests` a
/// window), `us-east5` a bucket each (2 requests).
fn lineage_settings(url: &str, global_requests: u32, lease: Duration) -> RedisSettings {
    let config = |group: &str, bucket: &str, region: &str, requests: u32| BudgetConfig {
        group: group.into(),
        bucket: bucket.into(),
        region: region.into(),
        limits: Limits::new(requests, 1_000_000),
    };
    RedisSettings {
        budgets: vec![
            config(S45, LINEAGE, "global", global_requests),
            config(S45, S45, "us-east5", 2),
            config(S46, LINEAGE, "global", global_requests),
            config(S46, S46, "us-east5", 2),
        ],
        lease,
        ..settings(url, Duration::from_secs(60), Limits::new(1, 1))
    }
}

fn ask_as<'a>(group: &'a QuotaGroup, regions: &'a [Arc<str>]) -> ReserveRequest<'a> {
    ReserveRequest {
        group,
        regions,
        charge: Charge {
            input: 10,
            output: 10,
        },
        strategy: Strategy::Ordered,
    }
}

/// Two requesters on two replicas share the lineage's one ledger on
/// `global` and keep their own in `us-east5`; state shows each bucket
/// once, and limits set on the bucket hold for both.
#[tokio::test]
async fn requesters_of_a_lineage_share_one_bucket_on_global_only() {
    let redis = RedisServer::start();
    let s = lineage_settings(&redis.url(), 3, Duration::ZERO);
    let a = RedisStore::connect(&s).await.unwrap();
    let b = RedisStore::connect(&s).await.unwrap();
    let (s45, s46) = (QuotaGroup::from(S45), QuotaGroup::from(S46));
    let global: Vec<Arc<str>> = vec![Arc::from("global")];
    let g = reserve(&a, ask_as(&s45, &global)).await.unwrap();
    assert_eq!(g.group, S45);
    reserve(&b, ask_as(&s46, &global)).await.unwrap();
    reserve(&a, ask_as(&s46, &global)).await.unwrap();
    assert!(matches!(
        reserve(&b, ask_as(&s45, &global)).await,
        Err(Denial::Later { .. })
    ));
    // A refund through one requester is room for the other.
    a.try_settle(&g, Outcome::NotSent).await.unwrap();
    reserve(&b, ask_as(&s46, &global)).await.unwrap();
    let east: Vec<Arc<str>> = vec![Arc::from("us-east5")];
    for _ in 0..2 {
        reserve(&a, ask_as(&s45, &east)).await.unwrap();
        reserve(&b, ask_as(&s46, &east)).await.unwrap();
    }
    assert!(reserve(&a, ask_as(&s45, &east)).await.is_err());
    let states: Vec<(String, String, u32)> = a
        .try_states()
        .await
        .unwrap()
        .iter()
        .map(|b| (b.group.to_string(), b.region.to_string(), b.usage.requests))
        .collect();
    let row = |g: &str, r: &str, n: u32| (g.to_string(), r.to_string(), n);
    assert_eq!(
        states,
        [
            row(LINEAGE, "global", 3),
            row(S45, "us-east5", 2),
            row(S46, "us-east5", 2),
        ]
    );
    // The bucket's limits, set through one replica, hold for both models.
    assert!(a
        .try_set_configured(
            &QuotaGroup::from(LINEAGE),
            "global",
            Limits::new(4, 1_000_000)
        )
        .await
        .unwrap());
    reserve(&b, ask_as(&s45, &global)).await.unwrap();
    assert!(reserve(&b, ask_as(&s46, &global)).await.is_err());
    assert!(!a
        .try_set_configured(&QuotaGroup::from(LINEAGE), "us-east5", Limits::new(4, 4))
        .await
        .unwrap());
    assert_eq!(a.try_set_drained("us-east5", true).await.unwrap(), 2);
    assert!(reserve(&b, ask_as(&s46, &east)).await.is_err());
    let drained: Vec<bool> = a
        .try_states()
        .await
        .unwrap()
        .iter()
        .map(|b| b.drained)
        .collect();
    assert_eq!(drained, [false, true, true]);
}

/// Both models busy on two leasing replicas: four requesters' leases on
/// one bucket, and the bucket still takes exactly its limit.
#[tokio::test]
async fn leases_of_two_requesters_on_one_bucket_never_overfill_it() {
    let redis = RedisServer::start();
    let s = lineage_settings(&redis.url(), 40, LEASE);
    let replicas = [
        RedisStore::connect(&s).await.unwrap(),
        RedisStore::connect(&s).await.unwrap(),
    ];
    let global: Vec<Arc<str>> = vec![Arc::from("global")];
    let groups = [QuotaGroup::from(S45), QuotaGroup::from(S46)];
    let mut admitted = 0;
    let mut leased_grants = 0;
    // Bursts a lease length apart: demand in one length makes the next
    // admissions lease; between bursts leases close and give back room.
    for _ in 0..8 {
        for round in 0..8 {
            let store = &replicas[round % 2];
            let group = &groups[(round / 2) % 2];
            if let Ok(g) = reserve(store, ask_as(group, &global)).await {
                admitted += 1;
                leased_grants += u32::from(leased(&g));
                assert_eq!(g.group, *group, "a lease serves its own requester");
            }
        }
        tokio::time::sleep(LEASE).await;
    }
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(admitted, 40, "exactly the bucket's limit, shared");
    assert!(leased_grants > 0, "leases were used");
    let state = replicas[0].try_states().await.unwrap();
    assert_eq!(state[0].usage.requests, 40, "{:?}", state[0]);
}

/// The picture a replica keeps for a failover (`window.lua`): every
/// budget's window in parts that add up to its usage, each stamped no
/// earlier than any of its entries, and nothing of another budget.
#[tokio::test]
async fn the_window_picture_adds_up_to_the_usage_and_ages_no_entry_early() {
    let redis = RedisServer::start();
    let s = settings(
        &redis.url(),
        Duration::from_secs(2),
        Limits::new(60, 50_000),
    );
    let s = RedisStore::connect(&s).await.expect("connects");
    let primary = vec![Arc::from("us-central1")];
    let mut grants = Vec::new();
    for k in 0..6 {
        grants.push(
            reserve(&s, ask(&primary, 100 + k, Strategy::Ordered))
                .await
                .unwrap(),
        );
        if k == 2 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    s.try_settle(&grants[0], Outcome::NotSent).await.unwrap();
    s.try_settle(
        &grants[1],
        Outcome::Used(Charge {
            input: 7,
            output: 3,
        }),
    )
    .await
    .unwrap();
    let picture = s.try_picture(16).await.unwrap();
    let states = s.try_states().await.unwrap();
    assert_eq!(picture.budgets.len(), states.len());
    for ((bucket, parts), state) in picture.budgets.iter().zip(&states) {
        assert_eq!((&bucket.0, &bucket.1), (&state.group, &state.region));
        let mut sum = Usage::default();
        for p in parts {
            sum.requests += p.usage.requests;
            sum.input += p.usage.input;
            sum.output += p.usage.output;
        }
        assert_eq!(sum, state.usage, "{}", bucket.1);
        assert!(parts.windows(2).all(|w| w[0].at < w[1].at), "{parts:?}");
    }
    let (_, parts) = &picture
        .budgets
        .iter()
        .find(|(b, _)| &*b.1 == "us-central1")
        .unwrap();
    assert_eq!(
        parts.len(),
        2,
        "two bursts, 300 ms apart, in two parts: {parts:?}"
    );
    // Each part leaves the window no earlier than its newest entry.
    let newest = |gs: &[Grant]| {
        gs.iter()
            .map(|g| g.view.empty_at - Duration::from_secs(2) - Duration::from_micros(1))
            .max()
            .unwrap()
    };
    assert_eq!(parts[0].at, newest(&grants[..3]));
    assert_eq!(parts[1].at, newest(&grants[3..]));
    assert!(picture.taken >= parts[1].at);
}

/// Tests run in parallel and each picks a free port: a server already on a
/// port must never be mistaken for the one a test just started (CI once
/// handed a test another test's server, which then went away under it).
#[test]
fn a_port_held_by_another_server_is_never_taken_for_ours() {
    let first = RedisServer::start();
    let second = std::panic::catch_unwind(|| RedisServer::start_on(first.port));
    assert!(second.is_err(), "start_on a taken port must fail");
    let third = RedisServer::start();
    assert_ne!(third.port, first.port);
}
