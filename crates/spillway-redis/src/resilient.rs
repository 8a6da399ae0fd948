//! [`ResilientStore`]: Redis while it answers, a local 1/N share when not.
//!
//! - **Healthy**: every decision is one Redis function call (one round trip, bounded
//!   by `timeout`). A background task sends a heartbeat every
//!   [`HEARTBEAT`] (`ZADD <prefix>replicas <server ms> <id>`, members older
//!   than [`REPLICA_TTL`] dropped) and, unless `replicas` is fixed by
//!   config, takes N from the live count.
//! - **Failing over**: the first Redis error or timeout — on admission,
//!   settle, state or heartbeat — marks the store degraded (gauge
//!   `spillway_quota_store_degraded` = 1, one warning) and that very call is
//!   answered locally. No request fails because Redis did.
//! - **Degraded**: decisions come from a `MemoryStore` on the same clock
//!   whose limits are the configured ones divided by N (at least one request
//!   and one token), started from what the fleet had spent: while healthy,
//!   the task also takes a picture of every budget's window every [`RETRY`],
//!   and the failover seeds the local ledger with 1/N of it plus this
//!   replica's own grants of the last second (`failover.rs`), as settled
//!   entries that leave the window when the shared ones do. Its grants carry
//!   [`LOCAL`] in their entry id and are always settled locally. Grants Redis made before the outage are settled
//!   in Redis if it is back by then, otherwise dropped: their reservations
//!   stay charged until they leave the window (the safe direction).
//! - **Recovering**: the task retries every [`RETRY`]; when Redis answers,
//!   each budget's local usage in the current window (its seed left out:
//!   that was Redis's own) is written to Redis as one settled entry stamped
//!   with the last local admission, so the shared ledger counts what the
//!   fleet spent during the outage, then decisions go back to Redis (one
//!   info line, gauge 0). A Redis that came back empty (its `epoch` key
//!   gone) first gets the last picture back from the first replica to
//!   notice, and every replica's own grants made after that picture.
//!
//! Worst case over-admission (see DEPLOYMENT.md and `failover.rs`): a
//! window that overlaps the moment of failover holds at most the budget,
//! plus what one replica's own grants in the last second before it took
//! beyond its remaining share (under 5% of a budget unless the load is
//! that unevenly spread); windows wholly inside the outage hold at most
//! N × budget/N.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Registry};
use spillway_core::ledger::{EntryId, Limits, Usage};
use spillway_core::store::{
    BudgetConfig, BudgetState, Denial, Grant, MemoryStore, Outcome, QuotaStore, ReserveRequest,
    StoreFuture,
};
use spillway_core::QuotaGroup;

use crate::failover::{self, Part, Picture};
use crate::{LeaseCounters, RedisSettings, RedisStore, ServerClock, StoreError};

/// Marks an entry id granted by the local fallback.
pub const LOCAL: u64 = 1 << 63;
/// Heartbeat period while healthy.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica not heard from for this long is not counted.
pub const REPLICA_TTL: Duration = Duration::from_secs(10);
/// Reconnection attempts while degraded.
pub const RETRY: Duration = Duration::from_millis(250);
/// How often a waiting head asks again (remote refunds wake nobody).
pub const RECHECK: Duration = Duration::from_millis(100);

/// The store's own series, registered in the gateway's registry.
#[derive(Clone)]
pub struct StoreMetrics {
    pub degraded: IntGauge,
    pub replicas: IntGauge,
    pub failovers: IntCounter,
    pub leases: LeaseCounters,
}

impl StoreMetrics {
    pub fn new(registry: Option<&Registry>) -> Self {
        let degraded = IntGauge::new(
            "spillway_quota_store_degraded",
            "1 while the shared quota store (Redis) is unreachable and this replica admits from its local 1/N share.",
        )
        .expect("valid metric");
        let replicas = IntGauge::new(
            "spillway_quota_store_replicas",
            "Replicas sharing the budgets (N): from config, or live heartbeats in Redis.",
        )
        .expect("valid metric");
        let failovers = IntCounter::new(
            "spillway_quota_store_failovers_total",
            "Times this replica lost the shared quota store and fell back to its local share.",
        )
        .expect("valid metric");
        let leases = LeaseCounters {
            granted: IntCounter::new(
                "spillway_quota_store_leases_total",
                "Leases Redis granted this replica: room for several requests, admitted here without a round trip until the lease ends.",
            )
            .expect("valid metric"),
            admitted: IntCounter::new(
                "spillway_quota_store_lease_admissions_total",
                "Requests admitted under a lease (the one that asked for it included).",
            )
            .expect("valid metric"),
        };
        if let Some(r) = registry {
            for c in [
                Box::new(degraded.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(replicas.clone()),
                Box::new(failovers.clone()),
                Box::new(leases.granted.clone()),
                Box::new(leases.admitted.clone()),
            ] {
                if let Err(e) = r.register(c) {
                    tracing::debug!(error = %e, "quota store metrics already registered");
                }
            }
        }
        Self {
            degraded,
            replicas,
            failovers,
            leases,
        }
    }
}

/// A bucket: (bucket group, region).
type BudgetKey = (QuotaGroup, Arc<str>);

struct Inner {
    redis: RedisStore,
    local: MemoryStore<ServerClock>,
    degraded: AtomicBool,
    /// N in use for the local share.
    replicas: AtomicU32,
    /// From config; `None`: from heartbeats.
    fixed_replicas: Option<u32>,
    /// The last local admission per bucket, for resynchronisation.
    last_local: Mutex<HashMap<BudgetKey, Duration>>,
    /// Every budget's window as last seen in Redis (`failover.rs`).
    picture: Mutex<Option<Picture>>,
    /// What failovers seeded into the local ledgers (not written back).
    seeded: Mutex<HashMap<BudgetKey, Vec<Part>>>,
    /// Held while failing over, so no request is answered locally before
    /// the local ledgers are seeded.
    transition: Mutex<()>,
    /// The Redis instance's epoch as last seen (`RedisStore::try_epoch`).
    epoch: Mutex<Option<String>>,
    id: String,
    metrics: StoreMetrics,
}

/// What a replica back on Redis finds of the shared ledgers.
enum Ledgers {
    /// As it left them (or it never saw them before).
    Kept,
    /// Redis restarted empty; `restorer`: this replica noticed first.
    Lost {
        restorer: bool,
        picture_taken: Duration,
    },
}

/// The gateway's store when `quota.store = "redis"`.
#[derive(Clone)]
pub struct ResilientStore {
    inner: Arc<Inner>,
}

fn share(limits: Limits, n: u32) -> Limits {
    let n = u64::from(n.max(1));
    let part = |v: u64| (v / n).max(1);
    Limits {
        requests: part(u64::from(limits.requests)) as u32,
        tokens: limits.tokens.map(part),
        input_tokens: limits.input_tokens.map(part),
        output_tokens: limits.output_tokens.map(part),
    }
}

impl ResilientStore {
    /// Connects if it can; starts degraded otherwise (and keeps trying).
    /// `replicas`: N from config, or 0 to count heartbeats. Spawns the
    /// heartbeat task on the current tokio runtime; it ends with the store.
    pub async fn start(
        settings: &RedisSettings,
        replicas: u32,
        metrics: StoreMetrics,
    ) -> Result<Self, StoreError> {
        let redis = RedisStore::with_lease_counters(settings, metrics.leases.clone())?;
        let fixed_replicas = (replicas > 0).then_some(replicas);
        let n = replicas.max(1);
        let local_budgets: Vec<BudgetConfig> = settings
            .budgets
            .iter()
            .map(|b| BudgetConfig {
                limits: share(b.limits, n),
                ..b.clone()
            })
            .collect();
        let local = MemoryStore::new(
            redis.clock().clone(),
            settings.window,
            settings.adaptive,
            &local_budgets,
        );
        let id = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "spillway".into()),
            std::process::id(),
            rand::random::<u32>()
        );
        metrics.replicas.set(i64::from(n));
        let store = Self {
            inner: Arc::new(Inner {
                redis,
                local,
                degraded: AtomicBool::new(false),
                replicas: AtomicU32::new(n),
                fixed_replicas,
                last_local: Mutex::new(HashMap::new()),
                picture: Mutex::new(None),
                seeded: Mutex::new(HashMap::new()),
                transition: Mutex::new(()),
                epoch: Mutex::new(None),
                id,
                metrics,
            }),
        };
        match store.inner.redis.reconnect().await {
            Ok(()) => {
                if let Err(e) = store.inner.lost_ledgers().await.map(|_| ()) {
                    store.inner.fail("epoch", &e);
                }
                store.inner.heartbeat().await;
                store.inner.refresh().await;
                tracing::info!(
                    replica = %store.inner.id,
                    replicas = store.inner.replicas.load(Ordering::Relaxed),
                    "quota store: shared budgets in Redis"
                );
            }
            // A certificate the client does not trust fails every time:
            // refuse to start rather than share nothing, silently.
            Err(e) if e.certificate_problem().is_some() => {
                return Err(StoreError::UntrustedCertificate {
                    server: store.inner.redis.server(),
                    problem: e.certificate_problem().unwrap_or_default(),
                });
            }
            Err(e) => store.inner.fail("connect", &e),
        }
        let weak = Arc::downgrade(&store.inner);
        tokio::spawn(maintain(weak));
        Ok(store)
    }

    /// N, the number of replicas the local share divides by.
    pub fn replicas(&self) -> u32 {
        self.inner.replicas.load(Ordering::Relaxed)
    }

    pub fn redis(&self) -> &RedisStore {
        &self.inner.redis
    }
}

impl Inner {
    /// Marks the store degraded (logging once), seeding the local ledgers
    /// first, and drops the connection.
    fn fail(&self, what: &str, error: &StoreError) {
        self.redis.disconnect();
        if self.degraded.load(Ordering::SeqCst) {
            return;
        }
        let _transition = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        if self.degraded.load(Ordering::SeqCst) {
            return;
        }
        let seeded = self.seed();
        self.degraded.store(true, Ordering::SeqCst);
        self.metrics.degraded.set(1);
        self.metrics.failovers.inc();
        tracing::warn!(
            error = %error,
            call = what,
            replicas = self.replicas.load(Ordering::Relaxed),
            seeded_requests = seeded,
            "quota store degraded: Redis unreachable; admitting from this replica's local 1/N share of each budget, less its part of what the fleet had spent in the window"
        );
    }

    /// Starts the local ledgers from the last picture of the shared ones
    /// and this replica's own recent grants (`failover::seeds`); returns
    /// how many requests that holds.
    fn seed(&self) -> u64 {
        let now = self.now();
        let n = self.replicas.load(Ordering::Relaxed);
        let shares: Vec<(BudgetKey, Limits)> = self
            .redis
            .budgets()
            .into_iter()
            .map(|(group, region, limits)| ((group, region), share(limits, n)))
            .collect();
        let picture = self.picture.lock().unwrap_or_else(|p| p.into_inner());
        let seeds = failover::seeds(picture.as_ref(), self.redis.own_grants(), &shares, n, now);
        drop(picture);
        let window = self.redis.window();
        let mut seeded = self.seeded.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0;
        for seed in seeds {
            let (group, region) = &seed.bucket;
            for part in &seed.parts {
                if self
                    .local
                    .import_now(group.as_str(), region, part.at, part.usage)
                {
                    total += u64::from(part.usage.requests);
                }
            }
            let kept = seeded.entry(seed.bucket).or_default();
            kept.retain(|p| now.saturating_sub(p.at) <= window);
            kept.extend(seed.parts);
        }
        total
    }

    fn now(&self) -> Duration {
        spillway_core::store::Clock::now(self.redis.clock())
    }

    /// Takes a new picture of every budget's window.
    async fn refresh(&self) {
        match self.redis.try_picture(failover::SLICES).await {
            Ok(picture) => {
                *self.picture.lock().unwrap_or_else(|p| p.into_inner()) = Some(picture);
            }
            Err(e) => self.fail("window", &e),
        }
    }

    async fn heartbeat(&self) {
        match self.redis.heartbeat(&self.id, REPLICA_TTL).await {
            Ok(live) => {
                if self.fixed_replicas.is_none() {
                    self.rescale(live.max(1)).await;
                }
            }
            Err(e) => self.fail("heartbeat", &e),
        }
    }

    /// Divides the local share by a new N.
    async fn rescale(&self, n: u32) {
        if self.replicas.swap(n, Ordering::Relaxed) == n {
            return;
        }
        self.metrics.replicas.set(i64::from(n));
        tracing::info!(replicas = n, "quota store: replica count changed");
        for (group, region, limits) in self.redis.budgets() {
            self.local
                .set_configured(&group, &region, share(limits, n))
                .await;
        }
    }

    /// Whether Redis lost the shared ledgers since this replica last saw
    /// it (it restarted empty): its epoch is gone or new. The first replica
    /// to notice sets a new one naming when its picture was taken, and
    /// restores that picture; every replica then adds its own grants made
    /// after it, which no picture of the restorer's could show.
    async fn lost_ledgers(&self) -> Result<Ledgers, StoreError> {
        let taken = self
            .picture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |p| p.taken.as_micros() as u64);
        let candidate = format!("{}-{:016x}-{taken}", self.id, rand::random::<u64>());
        let (set, epoch) = self.redis.try_epoch(&candidate).await?;
        let mut known = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        let found = match known.as_deref() {
            None => Ledgers::Kept,
            Some(_) if set => Ledgers::Lost {
                restorer: true,
                picture_taken: Duration::from_micros(taken),
            },
            Some(k) if k != epoch => Ledgers::Lost {
                restorer: false,
                // Unreadable: every own grant still in the window (the
                // safe direction).
                picture_taken: epoch
                    .rsplit('-')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .map_or(Duration::ZERO, Duration::from_micros),
            },
            Some(_) => Ledgers::Kept,
        };
        *known = Some(epoch);
        Ok(found)
    }

    /// Adds this replica's own grants made after `since` to an empty Redis
    /// (those still in the window; `import.lua` drops older ones).
    async fn restore_own(&self, since: Duration) -> Result<(), StoreError> {
        for ((group, region), part) in self
            .redis
            .own_grants()
            .since(since + Duration::from_micros(1))
        {
            self.redis
                .try_import(group.as_str(), &region, part.at, part.usage)
                .await?;
        }
        Ok(())
    }

    /// Puts back into an empty Redis what the last picture showed still in
    /// the window: the entries Redis admitted before it failed count until
    /// they leave Vertex's window too.
    async fn restore(&self) -> Result<(), StoreError> {
        let picture = self
            .picture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(picture) = picture else {
            return Ok(());
        };
        let mut restored = 0u64;
        for ((group, region), parts) in &picture.budgets {
            for part in parts {
                self.redis
                    .try_import(group.as_str(), region, part.at, part.usage)
                    .await?;
                restored += u64::from(part.usage.requests);
            }
        }
        tracing::info!(
            restored_requests = restored,
            "quota store: Redis came back empty; the shared windows as last seen are restored"
        );
        Ok(())
    }

    /// Redis answers again: hand it what was admitted locally, then use it.
    async fn recover(&self) -> Result<(), StoreError> {
        self.redis.reconnect().await?;
        if let Ledgers::Lost {
            restorer,
            picture_taken,
        } = self.lost_ledgers().await?
        {
            if restorer {
                self.restore().await?;
            }
            self.restore_own(picture_taken).await?;
        }
        let last_local = self
            .last_local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let seeded = self
            .seeded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let window = self.redis.window();
        for state in self.local.states_now() {
            let key = (state.group.clone(), Arc::clone(&state.region));
            // The seed stood for Redis's own entries: only what was
            // admitted here goes back.
            let seed = seeded
                .get(&key)
                .map(|s| failover::still_in_window(s, window, self.now()))
                .unwrap_or_default();
            let usage = Usage {
                requests: state.usage.requests.saturating_sub(seed.requests),
                input: state.usage.input.saturating_sub(seed.input),
                output: state.usage.output.saturating_sub(seed.output),
            };
            if usage == Usage::default() {
                continue;
            }
            let at = last_local.get(&key).copied().unwrap_or_else(|| self.now());
            self.redis
                .try_import(state.group.as_str(), &state.region, at, usage)
                .await?;
        }
        self.redis.heartbeat(&self.id, REPLICA_TTL).await?;
        let picture = self.redis.try_picture(failover::SLICES).await?;
        *self.picture.lock().unwrap_or_else(|p| p.into_inner()) = Some(picture);
        let _transition = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        if self.degraded.swap(false, Ordering::SeqCst) {
            self.metrics.degraded.set(0);
            tracing::info!("quota store recovered: Redis answers again; local admissions handed over, shared budgets in use");
        }
        Ok(())
    }

    fn local_grant(&self, mut grant: Grant) -> Grant {
        // Keyed by the bucket, as the local states that are handed over are.
        let bucket = self
            .local
            .bucket_of(grant.group.as_str(), &grant.region)
            .unwrap_or(&grant.group)
            .clone();
        self.last_local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((bucket, Arc::clone(&grant.region)), grant.view.now);
        grant.entry = EntryId::from_raw(grant.entry.raw() | LOCAL);
        grant
    }
}

async fn maintain(weak: Weak<Inner>) {
    // Ticks every RETRY, so recovery starts at most RETRY after a failure
    // seen anywhere; heartbeats go out every HEARTBEAT while healthy.
    let mut last_beat = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(RETRY).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.degraded.load(Ordering::Relaxed) {
            if let Err(e) = inner.recover().await {
                inner.redis.disconnect();
                tracing::debug!(error = %e, "quota store: Redis still unreachable");
            }
        } else {
            inner.refresh().await;
            if last_beat.elapsed() >= HEARTBEAT {
                last_beat = tokio::time::Instant::now();
                inner.heartbeat().await;
            }
        }
    }
}

impl QuotaStore for ResilientStore {
    fn now(&self) -> Duration {
        spillway_core::store::Clock::now(self.inner.redis.clock())
    }

    fn recheck_after(&self) -> Option<Duration> {
        Some(RECHECK)
    }

    fn reserve<'a>(
        &'a self,
        request: ReserveRequest<'a>,
    ) -> StoreFuture<'a, Result<Grant, Denial>> {
        Box::pin(async move {
            let inner = &self.inner;
            if !inner.degraded.load(Ordering::Relaxed) {
                match inner.redis.try_reserve(request).await {
                    Ok(result) => return result,
                    Err(e) => inner.fail("reserve", &e),
                }
            }
            inner
                .local
                .reserve_now(request)
                .map(|g| inner.local_grant(g))
        })
    }

    fn probe<'a>(&'a self, request: ReserveRequest<'a>) -> StoreFuture<'a, Result<(), Denial>> {
        Box::pin(async move {
            let inner = &self.inner;
            if !inner.degraded.load(Ordering::Relaxed) {
                match inner.redis.try_decide(request, false).await {
                    Ok(result) => return result.map(|_| ()),
                    Err(e) => inner.fail("probe", &e),
                }
            }
            inner.local.probe_now(request)
        })
    }

    fn settle<'a>(&'a self, grant: &'a Grant, outcome: Outcome) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            if grant.entry.raw() & LOCAL != 0 {
                let mut local = grant.clone();
                local.entry = EntryId::from_raw(grant.entry.raw() & !LOCAL);
                inner.local.settle_now(&local, outcome);
                return;
            }
            match inner.redis.try_settle(grant, outcome).await {
                Ok(()) => {}
                Err(StoreError::Disconnected) => tracing::debug!(
                    "quota store: Redis down at settle; the reservation stays until it leaves the window"
                ),
                Err(e) => inner.fail("settle", &e),
            }
        })
    }

    fn states(&self) -> StoreFuture<'_, Vec<BudgetState>> {
        Box::pin(async move {
            let inner = &self.inner;
            if !inner.degraded.load(Ordering::Relaxed) {
                match inner.redis.try_states().await {
                    Ok(states) => return states,
                    Err(e) => inner.fail("states", &e),
                }
            }
            inner.local.states_now()
        })
    }

    fn set_configured<'a>(
        &'a self,
        group: &'a QuotaGroup,
        region: &'a str,
        limits: Limits,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let inner = &self.inner;
            let n = inner.replicas.load(Ordering::Relaxed);
            let known = inner
                .local
                .set_configured(group, region, share(limits, n))
                .await;
            if let Err(e) = inner.redis.try_set_configured(group, region, limits).await {
                inner.fail("set_configured", &e);
            }
            known
        })
    }

    fn set_drained<'a>(&'a self, region: &'a str, drained: bool) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let inner = &self.inner;
            let count = inner.local.set_drained(region, drained).await;
            if let Err(e) = inner.redis.try_set_drained(region, drained).await {
                inner.fail("set_drained", &e);
            }
            count
        })
    }

    fn replicas(&self) -> u32 {
        ResilientStore::replicas(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_share_divides_every_dimension_and_keeps_one() {
        let l = Limits {
            requests: 60,
            tokens: Some(50_000),
            input_tokens: None,
            output_tokens: Some(2),
        };
        let s = share(l, 3);
        assert_eq!(s.requests, 20);
        assert_eq!(s.tokens, Some(16_666));
        assert_eq!(s.output_tokens, Some(1));
        assert_eq!(share(l, 0), l);
    }
}
