//! Spend per tenant: what each finished request cost, counted once, and the
//! tenants' spend caps per UTC day and month, enforced without a store
//! round trip on the request path and kept across restarts and replicas.
//!
//! # Why it works this way
//!
//! - **Cost from actual usage, recorded once.** The observer records every
//!   request exactly once; it hands the usage Vertex reported (input, output,
//!   cache writes by TTL, cache reads) to [`Spend::record_usage`], which
//!   prices it with the model's prices *at the location that served it*
//!   (`spillway_core::spend`), adds it to `spillway_spend_usd_total{tenant,
//!   model,traffic}` and to the tenant's day and month here. A model without
//!   prices costs nothing: no number is made up. Batch items are priced like
//!   interactive calls because they *are* online calls to Vertex (Spillway's
//!   batches are its own API over `:rawPredict`, not Vertex batch
//!   prediction, whose 50% discount does not apply to them).
//! - **No round trip per request.** A cap check reads this replica's book:
//!   the tenant's total as last read from the store, plus what this replica
//!   spent since (being written, or not yet). Every `spend.sync_ms` one call
//!   adds this replica's new spend to the store and reads every tracked
//!   tenant's totals back ([`Spend::sync`]). So a replica sees the others'
//!   spend at most one sync (plus their own sync) late: across N replicas a
//!   cap can be passed by what the fleet spends in about two sync periods,
//!   plus the requests already in flight when it was reached.
//! - **Admit, then exceed by what was in flight.** A request is refused
//!   only once the cap is *reached* (spent ≥ cap). Requests admitted before
//!   that are served, and their cost, known only at their end, may take the
//!   total past the cap — by at most the cost of the requests in flight at
//!   the moment it was crossed (one request's, for a tenant sending one at a
//!   time). Nothing is reserved ahead: an estimate of output cost would
//!   refuse requests that end cheap.
//! - **Durable where the gateway already keeps state**: Redis with
//!   `quota.store = "redis"` (shared by the replicas), else the batch
//!   store's database (SQLite or PostgreSQL), else memory. Totals are
//!   integer nanodollars per (tenant, period), added to atomically.
//! - **A store outage never fails a request.** Syncs fail, the replica keeps
//!   counting its own spend on top of the last totals it read (so caps still
//!   hold for what this replica sees), retries every sync, logs once on the
//!   way down and once on the way up, and shows it in
//!   `spillway_spend_store_degraded`. Failing closed would turn a Redis
//!   blip into an outage for every capped tenant.
//! - **Time**: UTC calendar periods, from a clock that follows tokio's (the
//!   Unix time at start plus tokio's elapsed time, like the batch clock), so
//!   a test on a paused clock crosses midnight by advancing it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spillway_core::spend::{
    check_caps, usd_of_nanodollars, CapReached, Cost, ModelPrices, Period, SpendCaps, Tokens,
};
use spillway_core::ModelId;
use spillway_vertex::Usage;

use crate::metrics::Metrics;

/// The longest one sync may take before it counts as failed.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

pub type SpendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// One total in a store: a tenant's spend in one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRow {
    pub tenant: Arc<str>,
    /// `day:2026-11-27` or `month:2026-11`.
    pub period: String,
    /// When the period ends (Unix ms): a store may forget it a while after.
    pub end_ms: i64,
}

/// Where totals live. Implemented by the batch store's SQL backends
/// (`batch::store`), by Redis ([`RedisSpendStore`]) and in memory.
pub trait SpendStore: Send + Sync + 'static {
    /// `memory`, `redis`, `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// Whether other replicas write to it too (Redis, PostgreSQL). A store
    /// only this process writes (SQLite, memory) is read once, at start:
    /// after that a sync only writes, and only when there is spend to write.
    fn shared(&self) -> bool {
        true
    }
    /// Adds each `(row, nanodollars)` and returns the totals of `reads`
    /// after the adds, in order: atomically per row.
    fn sync<'a>(
        &'a self,
        adds: &'a [(SpendRow, u64)],
        reads: &'a [SpendRow],
    ) -> SpendFuture<'a, Vec<u64>>;
}

/// Totals in this process only (no batch store, no Redis; tests).
#[derive(Default)]
pub struct MemorySpendStore {
    totals: Mutex<HashMap<(Arc<str>, String), u64>>,
    /// Stands for a store several `Spend`s share (tests of replicas).
    shared: bool,
}

impl MemorySpendStore {
    /// A store that several `Spend`s use as replicas use Redis (tests).
    pub fn shared_by_replicas() -> Self {
        Self {
            shared: true,
            ..Self::default()
        }
    }

    /// The total of `tenant` in `period` (`day:2026-11-27`).
    pub fn total(&self, tenant: &str, period: &str) -> Option<u64> {
        let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        totals
            .get(&(Arc::from(tenant), period.to_string()))
            .copied()
    }
}

impl SpendStore for MemorySpendStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn shared(&self) -> bool {
        self.shared
    }

    fn sync<'a>(
        &'a self,
        adds: &'a [(SpendRow, u64)],
        reads: &'a [SpendRow],
    ) -> SpendFuture<'a, Vec<u64>> {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        for (row, n) in adds {
            let t = totals
                .entry((Arc::clone(&row.tenant), row.period.clone()))
                .or_default();
            *t = t.saturating_add(*n);
        }
        let out = reads
            .iter()
            .map(|r| {
                totals
                    .get(&(Arc::clone(&r.tenant), r.period.clone()))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        Box::pin(async move { Ok(out) })
    }
}

/// Totals in the quota store's Redis, shared by every replica.
pub struct RedisSpendStore(pub spillway_redis::RedisSpend);

impl SpendStore for RedisSpendStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn sync<'a>(
        &'a self,
        adds: &'a [(SpendRow, u64)],
        reads: &'a [SpendRow],
    ) -> SpendFuture<'a, Vec<u64>> {
        let key = |r: &SpendRow| format!("{}:{}", r.tenant, r.period);
        let adds: Vec<spillway_redis::SpendAdd> = adds
            .iter()
            .map(|(r, n)| spillway_redis::SpendAdd {
                key: key(r),
                nanodollars: i64::try_from(*n).unwrap_or(i64::MAX),
                // A day after the period: replicas' clocks may disagree a little.
                expire_at_secs: r.end_ms / 1000 + 86_400,
            })
            .collect();
        let reads: Vec<String> = reads.iter().map(key).collect();
        Box::pin(async move {
            let totals = self
                .0
                .sync(&adds, &reads)
                .await
                .map_err(|e| e.to_string())?;
            Ok(totals.into_iter().map(|t| t.max(0) as u64).collect())
        })
    }
}

/// The tenants whose spend is tracked: every configured one, and the
/// anonymous tenant of a gateway without client auth.
pub fn tenants_of(settings: &crate::config::Settings) -> Vec<Arc<str>> {
    let mut names: Vec<Arc<str>> = settings
        .tenants
        .keys()
        .map(|n| Arc::from(n.as_str()))
        .collect();
    if settings.server.auth == crate::config::ClientAuth::None {
        names.push(crate::tenants::Tenant::anonymous().name);
    }
    names
}

/// Wall-clock milliseconds that follow tokio's clock: the Unix time at
/// start plus tokio's elapsed time (wall time in production; on a paused
/// test clock, a day passes with `tokio::time::advance`).
#[derive(Debug, Clone, Copy)]
pub struct SpendClock {
    unix_ms_at_start: i64,
    start: tokio::time::Instant,
}

impl SpendClock {
    pub fn new() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self::starting_at(now)
    }

    /// A clock that reads `unix_ms` now (tests pick their midnight).
    pub fn starting_at(unix_ms: i64) -> Self {
        Self {
            unix_ms_at_start: unix_ms,
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.unix_ms_at_start + self.start.elapsed().as_millis() as i64
    }
}

impl Default for SpendClock {
    fn default() -> Self {
        Self::new()
    }
}

/// What this replica knows of one tenant's one period.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    /// The store's total at the last sync (everyone's spend by then).
    known: u64,
    /// Spent here, in the sync running now.
    syncing: u64,
    /// Spent here since.
    pending: u64,
}

impl Entry {
    fn total(&self) -> u64 {
        self.known
            .saturating_add(self.syncing)
            .saturating_add(self.pending)
    }
}

/// One tenant's periods: the current day and month, and past ones until
/// what was spent in them is written.
#[derive(Debug, Default)]
struct TenantBook {
    /// (period, start, end, entry)
    spans: Vec<(Period, i64, i64, Entry)>,
}

impl TenantBook {
    fn entry(&mut self, period: Period, now_ms: i64) -> &mut Entry {
        let (start, end) = period.bounds(now_ms);
        let at = match self
            .spans
            .iter()
            .position(|(p, s, _, _)| *p == period && *s == start)
        {
            Some(at) => at,
            None => {
                self.spans.push((period, start, end, Entry::default()));
                self.spans.len() - 1
            }
        };
        &mut self.spans[at].3
    }

    fn total(&self, period: Period, now_ms: i64) -> u64 {
        let (start, _) = period.bounds(now_ms);
        self.spans
            .iter()
            .find(|(p, s, _, _)| *p == period && *s == start)
            .map_or(0, |(_, _, _, e)| e.total())
    }
}

/// A tenant's spend as this replica knows it now, for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantSpend {
    pub tenant: Arc<str>,
    /// Nanodollars in the current UTC day and month.
    pub day: u64,
    pub month: u64,
}

/// Why a request was refused for its tenant's spend: the cap, and the
/// client's message and retry time.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendRefusal {
    pub reached: CapReached,
    pub message: String,
    pub retry_after: Duration,
}

/// Spend per tenant: prices, the book, the store, the sync.
pub struct Spend {
    prices: HashMap<ModelId, ModelPrices>,
    store: Arc<dyn SpendStore>,
    clock: SpendClock,
    /// Added to the clock ([`Spend::set_now_ms`]; 0 in production).
    clock_shift_ms: AtomicI64,
    book: Mutex<HashMap<Arc<str>, TenantBook>>,
    /// One sync at a time (the loop, and the last one at shutdown).
    syncing: tokio::sync::Mutex<()>,
    /// The store's totals have been read once.
    loaded: AtomicBool,
    degraded: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Spend {
    /// Spend over `store`, pricing each model of `prices`.
    pub fn new(
        prices: HashMap<ModelId, ModelPrices>,
        store: Arc<dyn SpendStore>,
        clock: SpendClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            prices,
            store,
            clock,
            clock_shift_ms: AtomicI64::new(0),
            book: Mutex::default(),
            syncing: tokio::sync::Mutex::new(()),
            loaded: AtomicBool::new(false),
            degraded: AtomicBool::new(false),
            metrics,
        }
    }

    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    /// Unix milliseconds on the spend clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms() + self.clock_shift_ms.load(Ordering::Relaxed)
    }

    /// Makes the spend clock read `unix_ms` now (it goes on following
    /// tokio's from there): for tests that need a given day, such as the
    /// last of a month. Nothing in the gateway calls it.
    pub fn set_now_ms(&self, unix_ms: i64) {
        self.clock_shift_ms
            .store(unix_ms - self.clock.now_ms(), Ordering::Relaxed);
    }

    pub fn has_prices(&self, model: &ModelId) -> bool {
        self.prices.contains_key(model)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, TenantBook>> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tenants whose totals each sync reads (the configured ones: caps and
    /// operators' views), in addition to any that spent here.
    pub fn track<'a>(&self, tenants: impl IntoIterator<Item = &'a Arc<str>>) {
        let now = self.now_ms();
        let mut book = self.lock();
        for tenant in tenants {
            if !book.contains_key(&**tenant) {
                // A tenant new here (a reload) may have spent before: read
                // the store again, even one only this process writes.
                self.loaded.store(false, Ordering::Relaxed);
            }
            let t = book.entry(Arc::clone(tenant)).or_default();
            for period in Period::ALL {
                t.entry(period, now);
            }
        }
    }

    /// What `usage` cost at `model`'s prices in `region`, or `None` for a
    /// model without prices.
    pub fn cost(&self, model: &ModelId, region: &str, usage: &Usage) -> Option<Cost> {
        let prices = self.prices.get(model)?.at(region);
        Some(prices.cost(&Tokens {
            input: usage.input_tokens,
            output: usage.output_tokens,
            cache_write_5m: usage.cache_creation_5m_input_tokens(),
            cache_write_1h: usage.cache_creation_1h_input_tokens,
            cache_read: usage.cache_read_input_tokens,
        }))
    }

    /// One finished request's usage: priced, counted in
    /// `spillway_spend_usd_total` and added to the tenant's day and month.
    /// `traffic` is `interactive` or `batch`.
    pub fn record_usage(
        &self,
        tenant: &Arc<str>,
        model: &ModelId,
        region: &str,
        traffic: &str,
        usage: &Usage,
    ) -> Option<Cost> {
        let cost = self.cost(model, region, usage)?;
        self.metrics
            .spend_usd
            .with_label_values(&[tenant, model.as_str(), traffic])
            .inc_by(cost.usd());
        self.add(tenant, cost.nanodollars());
        Some(cost)
    }

    /// Adds `nanodollars` to the tenant's current day and month.
    pub fn add(&self, tenant: &Arc<str>, nanodollars: u64) {
        if nanodollars == 0 {
            return;
        }
        let now = self.now_ms();
        let mut book = self.lock();
        let t = match book.get_mut(&**tenant) {
            Some(t) => t,
            None => book.entry(Arc::clone(tenant)).or_default(),
        };
        for period in Period::ALL {
            let e = t.entry(period, now);
            e.pending = e.pending.saturating_add(nanodollars);
        }
    }

    /// The tenant's spend in the current `period`, nanodollars.
    pub fn spent(&self, tenant: &str, period: Period) -> u64 {
        let now = self.now_ms();
        self.lock().get(tenant).map_or(0, |t| t.total(period, now))
    }

    /// Every tracked tenant's current day and month, by name.
    pub fn totals(&self) -> Vec<TenantSpend> {
        let now = self.now_ms();
        let mut out: Vec<TenantSpend> = self
            .lock()
            .iter()
            .map(|(tenant, t)| TenantSpend {
                tenant: Arc::clone(tenant),
                day: t.total(Period::Day, now),
                month: t.total(Period::Month, now),
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// Whether `tenant` may send a request now under `caps`; a refusal
    /// names the cap (day or month, its amount, when it resets) and waits
    /// until the UTC period ends.
    pub fn check(&self, tenant: &str, caps: &SpendCaps) -> Result<(), SpendRefusal> {
        if caps.is_empty() {
            return Ok(());
        }
        let now = self.now_ms();
        let reached = {
            let book = self.lock();
            let t = book.get(tenant);
            check_caps(caps, now, |p| t.map_or(0, |t| t.total(p, now)))
        };
        let Err(reached) = reached else {
            return Ok(());
        };
        self.metrics
            .spend_cap_refusals
            .with_label_values(&[tenant, reached.period.name()])
            .inc();
        Err(refusal(tenant, reached, now))
    }

    /// Writes this replica's new spend to the store and reads every tracked
    /// tenant's totals back, in one store call. On failure the spend stays
    /// pending for the next sync. Returns whether the store answered.
    pub async fn sync(&self) -> bool {
        let _one = self.syncing.lock().await;
        let now = self.now_ms();
        let mut adds = Vec::new();
        let mut reads = Vec::new();
        {
            let mut book = self.lock();
            for (tenant, t) in book.iter_mut() {
                // The current periods are read even when nothing was spent.
                for period in Period::ALL {
                    t.entry(period, now);
                }
                for (period, start, end, e) in &mut t.spans {
                    let row = SpendRow {
                        tenant: Arc::clone(tenant),
                        period: period.containing(*start).store_key(),
                        end_ms: *end,
                    };
                    if e.pending > 0 {
                        e.syncing = e.pending;
                        e.pending = 0;
                        adds.push((row.clone(), e.syncing));
                    }
                    reads.push(row);
                }
            }
        }
        if adds.is_empty() && !self.store.shared() && self.loaded.load(Ordering::Relaxed) {
            // Nobody else writes there: this book is the store's state.
            let mut book = self.lock();
            for t in book.values_mut() {
                t.spans.retain(|(_, _, end, _)| *end > now);
            }
            return true;
        }
        let answer = match tokio::time::timeout(SYNC_TIMEOUT, self.store.sync(&adds, &reads)).await
        {
            Ok(Ok(totals)) if totals.len() == reads.len() => Ok(totals),
            Ok(Ok(totals)) => Err(format!("{} totals for {} rows", totals.len(), reads.len())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {SYNC_TIMEOUT:?}")),
        };
        let ok = answer.is_ok();
        {
            let mut book = self.lock();
            let totals: HashMap<(&str, &str), u64> = match &answer {
                Ok(totals) => reads
                    .iter()
                    .zip(totals)
                    .map(|(r, t)| ((&*r.tenant, r.period.as_str()), *t))
                    .collect(),
                Err(_) => HashMap::new(),
            };
            for (tenant, t) in book.iter_mut() {
                for (period, start, _, e) in &mut t.spans {
                    match &answer {
                        Ok(_) => {
                            let key = period.containing(*start).store_key();
                            if let Some(total) = totals.get(&(&**tenant, key.as_str())) {
                                // Never below what this replica knew: a store
                                // that lost its data must not reset a cap here.
                                e.known = (*total).max(e.known.saturating_add(e.syncing));
                                e.syncing = 0;
                            }
                        }
                        Err(_) => {
                            e.pending = e.pending.saturating_add(e.syncing);
                            e.syncing = 0;
                        }
                    }
                }
                // Past periods go once written; current ones stay.
                t.spans
                    .retain(|(_, _, end, e)| *end > now || e.pending > 0 || e.syncing > 0);
            }
        }
        match answer {
            Ok(_) => {
                self.loaded.store(true, Ordering::Relaxed);
                self.metrics.spend_store_degraded.set(0);
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        store = self.store.kind(),
                        "spend store recovered: spend written, totals read"
                    );
                }
            }
            Err(e) => {
                self.metrics.spend_store_errors.inc();
                self.metrics.spend_store_degraded.set(1);
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        store = self.store.kind(),
                        error = %e,
                        "spend store degraded: requests are not failed; spend caps count this replica's own spend on top of the last totals read, and other replicas' spend is not seen until the store answers"
                    );
                }
            }
        }
        ok
    }

    /// Syncs every `every` until `stop` resolves.
    pub async fn run(self: Arc<Self>, every: Duration, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {
                    self.sync().await;
                }
            }
        }
    }
}

/// The refusal for `reached`: which cap, its amount, what was spent, when
/// it resets (and retry-after until then).
fn refusal(tenant: &str, reached: CapReached, now_ms: i64) -> SpendRefusal {
    let span = reached.period.containing(now_ms);
    let (kind, when) = match reached.period {
        Period::Day => ("daily", format!("on {} (UTC)", span.key)),
        Period::Month => ("monthly", format!("in {} (UTC)", span.key)),
    };
    let wait_ms = (reached.resets_at_ms - now_ms).max(1);
    let message = format!(
        "tenant {tenant} has reached its {kind} spend cap of {} (spent {} {when}); it resets at {} (retry-after {} s)",
        dollars(reached.cap),
        dollars(reached.spent),
        crate::rfc3339::format_unix_millis(reached.resets_at_ms, false),
        (wait_ms as u64).div_ceil(1000),
    );
    SpendRefusal {
        reached,
        message,
        retry_after: Duration::from_millis(wait_ms as u64),
    }
}

/// `$12.50`; below a dollar to the hundredth of a cent (`$0.0125`).
fn dollars(nanodollars: u64) -> String {
    let usd = usd_of_nanodollars(nanodollars);
    if usd >= 1.0 || nanodollars == 0 {
        format!("${usd:.2}")
    } else {
        format!("${usd:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_core::spend::{days_from_civil, Price, Prices};

    const DAY: i64 = 86_400_000;

    fn spend_at(unix_ms: i64, store: Arc<dyn SpendStore>) -> Spend {
        let prices = Prices {
            input: Price(1_000_000),  // $1 / MTok
            output: Price(5_000_000), // $5 / MTok
            cache_write_5m: Price(1_250_000),
            cache_write_1h: Price(2_000_000),
            cache_read: Price(100_000),
        };
        Spend::new(
            [(
                ModelId::from("m"),
                ModelPrices::with_regional_premium(prices, 0.1),
            )]
            .into(),
            store,
            SpendClock::starting_at(unix_ms),
            Arc::new(Metrics::new()),
        )
    }

    fn usd(n: f64) -> u64 {
        spillway_core::spend::nanodollars_of_usd(n).unwrap()
    }

    #[tokio::test]
    async fn usage_is_priced_by_kind_and_location() {
        let s = spend_at(0, Arc::new(MemorySpendStore::default()));
        let u = Usage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            cache_creation_input_tokens: 300_000,
            cache_read_input_tokens: 1_000_000,
            cache_creation_1h_input_tokens: 100_000,
        };
        // 1 + 0.5 + 0.2 × 1.25 + 0.1 × 2 + 1 × 0.1 = $2.05 on global.
        let global = s.cost(&"m".into(), "global", &u).unwrap();
        assert_eq!(global.nanodollars(), usd(2.05));
        let regional = s.cost(&"m".into(), "us-east5", &u).unwrap();
        assert_eq!(regional.nanodollars(), usd(2.255));
        assert_eq!(s.cost(&"unpriced".into(), "global", &u), None);
        let tenant: Arc<str> = "t".into();
        s.record_usage(&tenant, &"m".into(), "global", "batch", &u);
        assert_eq!(s.spent("t", Period::Day), usd(2.05));
        assert_eq!(s.spent("t", Period::Month), usd(2.05));
        assert_eq!(s.spent("other", Period::Day), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_daily_cap_refuses_until_utc_midnight_and_the_month_until_its_end() {
        // 2026-11-30T22:00:00Z: two hours to the end of the day and the month.
        let start = days_from_civil(2026, 11, 30) * DAY + 22 * 3_600_000;
        let s = spend_at(start, Arc::new(MemorySpendStore::default()));
        let tenant: Arc<str> = "t".into();
        let caps = SpendCaps {
            per_day: Some(usd(10.0)),
            per_month: Some(usd(25.0)),
        };
        s.add(&tenant, usd(9.99));
        assert!(s.check("t", &caps).is_ok());
        s.add(&tenant, usd(0.02));
        let refused = s.check("t", &caps).unwrap_err();
        assert_eq!(refused.reached.period, Period::Day);
        assert_eq!(refused.retry_after, Duration::from_secs(7200));
        assert!(
            refused.message.contains("daily spend cap of $10.00")
                && refused.message.contains("spent $10.01 on 2026-11-30 (UTC)")
                && refused.message.contains("resets at 2026-12-01T00:00:00Z"),
            "{}",
            refused.message
        );
        // Midnight: a new day, and a new month.
        tokio::time::advance(Duration::from_secs(7200)).await;
        assert!(s.check("t", &caps).is_ok());
        assert_eq!(s.spent("t", Period::Day), 0);
        assert_eq!(s.spent("t", Period::Month), 0);
        // The month cap: reached over two days of December.
        s.add(&tenant, usd(9.0));
        tokio::time::advance(Duration::from_secs(86_400)).await;
        s.add(&tenant, usd(9.0));
        tokio::time::advance(Duration::from_secs(86_400)).await;
        s.add(&tenant, usd(7.0));
        let refused = s.check("t", &caps).unwrap_err();
        assert_eq!(refused.reached.period, Period::Month);
        assert!(
            refused.message.contains("monthly spend cap of $25.00")
                && refused.message.contains("in 2026-12 (UTC)")
                && refused.message.contains("resets at 2027-01-01T00:00:00Z"),
            "{}",
            refused.message
        );
        assert_eq!(
            refused.retry_after,
            Duration::from_secs(29 * 86_400) - Duration::from_secs(0)
        );
        // No caps: never refused.
        assert!(s.check("t", &SpendCaps::default()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn syncs_share_totals_between_replicas_and_keep_spend_through_failures() {
        let start = days_from_civil(2026, 11, 27) * DAY;
        let store = Arc::new(MemorySpendStore::shared_by_replicas());
        let a = spend_at(start, store.clone());
        let b = spend_at(start, store.clone());
        let tenant: Arc<str> = "t".into();
        b.track([&tenant]);
        a.add(&tenant, 100);
        assert_eq!(b.spent("t", Period::Day), 0, "not synced yet");
        assert!(a.sync().await && b.sync().await);
        assert_eq!(b.spent("t", Period::Day), 100);
        b.add(&tenant, 5);
        assert_eq!(b.spent("t", Period::Day), 105);
        assert!(b.sync().await && a.sync().await);
        assert_eq!(a.spent("t", Period::Month), 105);

        // A store that fails: spend stays pending, then is written once.
        struct Failing(AtomicBool, Arc<MemorySpendStore>);
        impl SpendStore for Failing {
            fn kind(&self) -> &'static str {
                "failing"
            }
            fn sync<'a>(
                &'a self,
                adds: &'a [(SpendRow, u64)],
                reads: &'a [SpendRow],
            ) -> SpendFuture<'a, Vec<u64>> {
                if self.0.load(Ordering::Relaxed) {
                    return Box::pin(async { Err("down".to_string()) });
                }
                self.1.sync(adds, reads)
            }
        }
        let failing = Arc::new(Failing(AtomicBool::new(true), store.clone()));
        let c = spend_at(start, failing.clone());
        c.add(&tenant, 1000);
        assert!(!c.sync().await);
        assert_eq!(c.metrics.spend_store_degraded.get(), 1);
        assert_eq!(
            c.spent("t", Period::Day),
            1000,
            "its own spend still counts"
        );
        failing.0.store(false, Ordering::Relaxed);
        assert!(c.sync().await);
        assert_eq!(c.spent("t", Period::Day), 1105);
        assert!(c.sync().await, "nothing left to add");
        assert_eq!(c.spent("t", Period::Day), 1105, "written once");
        assert_eq!(c.metrics.spend_store_degraded.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_only_this_process_writes_is_read_once_and_written_when_there_is_spend() {
        struct Counting(std::sync::atomic::AtomicU32, MemorySpendStore);
        impl SpendStore for Counting {
            fn kind(&self) -> &'static str {
                "sqlite"
            }
            fn shared(&self) -> bool {
                false
            }
            fn sync<'a>(
                &'a self,
                adds: &'a [(SpendRow, u64)],
                reads: &'a [SpendRow],
            ) -> SpendFuture<'a, Vec<u64>> {
                self.0.fetch_add(1, Ordering::Relaxed);
                self.1.sync(adds, reads)
            }
        }
        let store = Arc::new(Counting(Default::default(), MemorySpendStore::default()));
        let s = spend_at(days_from_civil(2026, 11, 27) * DAY, store.clone());
        let tenant: Arc<str> = "t".into();
        s.track([&tenant]);
        for _ in 0..3 {
            assert!(s.sync().await);
        }
        assert_eq!(store.0.load(Ordering::Relaxed), 1, "read at start only");
        s.add(&tenant, 9);
        assert!(s.sync().await && s.sync().await);
        assert_eq!(store.0.load(Ordering::Relaxed), 2, "written once");
        assert_eq!(store.1.total("t", "day:2026-11-27"), Some(9));
        assert_eq!(s.spent("t", Period::Day), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn spend_before_midnight_is_written_to_its_own_day() {
        let start = days_from_civil(2026, 11, 27) * DAY + DAY - 1000;
        let store: Arc<MemorySpendStore> = Arc::default();
        let s = spend_at(start, store.clone());
        let tenant: Arc<str> = "t".into();
        s.add(&tenant, 7);
        tokio::time::advance(Duration::from_secs(2)).await;
        s.add(&tenant, 3);
        assert!(s.sync().await);
        let read = |period: &str| store.total("t", period);
        assert_eq!(read("day:2026-11-27"), Some(7));
        assert_eq!(read("day:2026-11-28"), Some(3));
        assert_eq!(read("month:2026-11"), Some(10));
        assert_eq!(read("month:2026-12"), None);
        assert_eq!(s.spent("t", Period::Day), 3);
        // The past day is forgotten here once written.
        assert_eq!(s.lock().get("t").unwrap().spans.len(), 2);
    }
}
