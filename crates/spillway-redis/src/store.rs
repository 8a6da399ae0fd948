//! [`RedisStore`]: the ledgers in Redis, changed only by Lua functions.
//!
//! The quota code is one Redis function library (`FUNCTION LOAD`, Redis 7
//! or later), loaded when the store connects and again whenever Redis says
//! it does not know a function (after a restart: Redis here keeps nothing).
//! A library rather than `EVALSHA` scripts because a script re-runs its
//! whole prelude (defining every helper) on each call, while a library
//! defines them once; and this deployment's constants are written into its
//! code, so each admission carries only its own arguments.
//!
//! An admission is answered from an open lease when one has room, without
//! a call; otherwise `reserve` decides, and may grant a lease (`lease.rs`).
//!
//! **Keys.** A budget is a bucket, (bucket group, location), and its two
//! keys are `{prefix}{bucket group}:{location}:entries` and `…:state`: every
//! requester (model) whose location points at the bucket reads and writes
//! those same keys, so two Sonnet versions on `global` share one ledger and
//! keep their own in their regions. The bucket group is the key's hash tag;
//! one request's candidates may therefore span hash tags (a lineage on
//! `global`, the model in a region), which one Redis server (or a
//! primary with replicas) runs as one atomic call. A Redis Cluster would
//! refuse such a call; Spillway does not support one.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use spillway_core::adaptive::{AdaptiveConfig, Exhausted};
use spillway_core::ledger::{Charge, EntryId, Limits, Usage};
use spillway_core::store::{
    BudgetState, BudgetView, Clock, Denial, Grant, Outcome, QuotaStore, ReserveRequest,
    StoreFuture, Strategy,
};
use spillway_core::QuotaGroup;

use crate::failover::{OwnGrants, Part, Picture};
use crate::lease::{Adjustment, Learn, LeaseCounters, Leases, LEASED};
use crate::{RedisSettings, ServerClock, StoreError};

const COMMON: &str = include_str!("lua/common.lua");

/// The functions of the library, each a file of `lua/` run with the
/// caller's `KEYS` and `ARGV`.
const FUNCTIONS: [(&str, &str); 7] = [
    ("reserve", include_str!("lua/reserve.lua")),
    ("settle", include_str!("lua/settle.lua")),
    ("adjust", include_str!("lua/adjust.lua")),
    ("states", include_str!("lua/states.lua")),
    ("configure", include_str!("lua/configure.lua")),
    ("import", include_str!("lua/import.lua")),
    ("window", include_str!("lua/window.lua")),
];

/// The quota functions as one library, built for one deployment's settings.
struct Library {
    /// `spillway_` and a hash of the code: the library's name and its
    /// functions' prefix, so other settings or versions load beside it.
    name: String,
    /// What `FUNCTION LOAD` is given.
    code: String,
}

impl Library {
    fn new(constants: &[(&str, String)]) -> Self {
        let mut common = COMMON.to_owned();
        for (name, value) in constants {
            common = common.replace(&format!("{{{{{name}}}}}"), value);
        }
        debug_assert!(!common.contains("{{"), "every constant is filled in");
        let hash = Script::new(&format!(
            "{common}{}",
            FUNCTIONS
                .map(|(name, body)| format!("{name}{body}"))
                .join("")
        ))
        .get_hash()
        .to_owned();
        let name = format!("spillway_{}", &hash[..16]);
        let mut code = format!("#!lua name={name}\n{common}\n");
        for (function, body) in FUNCTIONS {
            code.push_str(&format!(
                "redis.register_function('{name}_{function}', function(KEYS, ARGV)\n{body}\nend)\n"
            ));
        }
        Self { name, code }
    }

    /// `FCALL` of one function, with its keys; arguments follow.
    fn call(&self, function: &str, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(format!("{}_{function}", self.name))
            .arg(keys.len())
            .arg(keys);
        cmd
    }
}

/// Redis no longer has the library (restarted or flushed since loaded).
fn missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now - tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 3)
return { redis.call('ZCARD', KEYS[1]), tonumber(t[1]) * 1000000 + tonumber(t[2]) }
";

/// One bucket's budget: its keys and configured limits, shared by every
/// requester whose location points at it.
struct Bucket {
    /// The bucket group; with `region`, the budget's key.
    group: QuotaGroup,
    region: Arc<str>,
    /// entries (sorted set), state (packed string): see `lua/common.lua`.
    keys: [String; 2],
    /// A drained-regions set that holds this region when it is drained
    /// (the first requester's: a drain is written to every requester's).
    drained_key: String,
    configured: Mutex<Limits>,
}

/// One (requester, location): the bucket it draws on.
struct Slot {
    region: Arc<str>,
    bucket: Arc<Bucket>,
}

/// The shared store. Standalone, its [`QuotaStore`] impl fails closed (a
/// Redis error refuses admission for a second); the gateway wraps it in
/// [`crate::ResilientStore`] instead. Cheap to clone: clones share
/// everything. Each open lease has a task that closes it when its time is
/// up; it holds the store weakly, so the last clone dropped ends them.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl Deref for RedisStore {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// What every clone of a [`RedisStore`] and its leases' closing tasks share.
pub struct Inner {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    prefix: String,
    timeout: Duration,
    window: Duration,
    /// requester → its locations in configured order, each pointing at
    /// its bucket.
    requesters: HashMap<QuotaGroup, Vec<Slot>>,
    /// Every bucket once, sorted by (bucket group, location).
    buckets: Vec<Arc<Bucket>>,
    /// requester → its drained-regions set.
    drained_keys: HashMap<QuotaGroup, String>,
    clock: ServerClock,
    library: Library,
    heartbeat: Script,
    leases: Leases,
    /// The entries Redis created for this replica lately (`failover.rs`).
    own: OwnGrants,
}

fn none_or(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| v.min(1 << 52) as i64)
}

fn limits_args(l: Limits) -> [i64; 4] {
    [
        i64::from(l.requests),
        none_or(l.tokens),
        none_or(l.input_tokens),
        none_or(l.output_tokens),
    ]
}

fn limits_from(v: &[i64]) -> Limits {
    let opt = |x: i64| (x >= 0).then_some(x as u64);
    Limits {
        requests: v[0].clamp(0, i64::from(u32::MAX)) as u32,
        tokens: opt(v[1]),
        input_tokens: opt(v[2]),
        output_tokens: opt(v[3]),
    }
}

fn usage_from(v: &[i64]) -> Usage {
    Usage {
        requests: v[0].clamp(0, i64::from(u32::MAX)) as u32,
        input: v[1].max(0) as u64,
        output: v[2].max(0) as u64,
    }
}

fn us(v: i64) -> Duration {
    Duration::from_micros(v.max(0) as u64)
}

fn exhausted_code(which: Exhausted) -> u8 {
    match which {
        Exhausted::Requests => 0,
        Exhausted::Tokens => 1,
        Exhausted::Unknown => 2,
        Exhausted::InputTokens => 3,
        Exhausted::OutputTokens => 4,
    }
}

fn protocol(what: &str, reply: &[i64]) -> StoreError {
    StoreError::Protocol(format!("{what}: {reply:?}"))
}

impl RedisStore {
    /// Builds the store without connecting; call [`RedisStore::reconnect`].
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        Self::with_lease_counters(settings, LeaseCounters::unregistered())
    }

    /// [`RedisStore::new`], counting leases in the gateway's metrics.
    pub fn with_lease_counters(
        settings: &RedisSettings,
        counters: LeaseCounters,
    ) -> Result<Self, StoreError> {
        let client = client(&settings.url, settings.ca_file.as_deref())?;
        let p = &settings.key_prefix;
        let mut requesters: HashMap<QuotaGroup, Vec<Slot>> = HashMap::new();
        let mut buckets: Vec<Arc<Bucket>> = Vec::new();
        let mut drained_keys: HashMap<QuotaGroup, String> = HashMap::new();
        for b in &settings.budgets {
            let drained_key = drained_keys
                .entry(b.group.clone())
                .or_insert_with(|| format!("{p}{{{}}}:drained", b.group))
                .clone();
            let found = buckets
                .iter()
                .find(|k| k.group == b.bucket && *k.region == *b.region)
                .cloned();
            let bucket = found.unwrap_or_else(|| {
                // The bucket's keys: every requester pointing at it shares them.
                let base = format!("{p}{{{}}}:{}", b.bucket, b.region);
                let bucket = Arc::new(Bucket {
                    group: b.bucket.clone(),
                    region: Arc::from(b.region.as_str()),
                    keys: ["entries", "state"].map(|k| format!("{base}:{k}")),
                    drained_key,
                    configured: Mutex::new(b.limits),
                });
                buckets.push(Arc::clone(&bucket));
                bucket
            });
            let slots = requesters.entry(b.group.clone()).or_default();
            if !slots.iter().any(|s| *s.region == *b.region) {
                slots.push(Slot {
                    region: Arc::clone(&bucket.region),
                    bucket,
                });
            }
        }
        buckets.sort_by(|a, b| (&a.group, &a.region).cmp(&(&b.group, &b.region)));
        let window_us = settings.window.as_micros() as u64;
        let log_ttl_ms = settings.window.as_millis() as u64 + 5_000;
        let state_ttl_ms = (settings.window.as_millis() as u64 * 10)
            .max(settings.adaptive.cooldown_max.as_millis() as u64 * 2)
            .max(60_000);
        let a: AdaptiveConfig = settings.adaptive;
        // Clamped here: the library's top level cannot call `math`.
        let headroom = if a.headroom.is_finite() {
            a.headroom.clamp(0.01, 1.0)
        } else {
            1.0
        };
        let library = Library::new(&[
            ("window_us", window_us.to_string()),
            ("log_ttl_ms", log_ttl_ms.to_string()),
            ("state_ttl_ms", state_ttl_ms.to_string()),
            // `{:?}` keeps a decimal point, so Lua reads a number.
            ("headroom", format!("{headroom:?}")),
            (
                "cooldown_base_us",
                (a.cooldown_base.as_micros() as u64).to_string(),
            ),
            (
                "cooldown_max_us",
                (a.cooldown_max.as_micros() as u64).to_string(),
            ),
            (
                "probe_period_us",
                (a.probe_period.as_micros() as u64).to_string(),
            ),
        ]);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn: Mutex::new(None),
                prefix: p.clone(),
                timeout: settings.timeout,
                window: settings.window,
                requesters,
                buckets,
                drained_keys,
                clock: ServerClock::default(),
                library,
                heartbeat: Script::new(HEARTBEAT),
                leases: Leases::new(settings.lease, counters),
                own: OwnGrants::default(),
            }),
        })
    }

    /// `host:port` (or the socket path) of the server, without credentials.
    pub fn server(&self) -> String {
        self.client.get_connection_info().addr.to_string()
    }

    /// Connects and measures the server clock.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let store = Self::new(settings)?;
        store.reconnect().await?;
        Ok(store)
    }

    /// (Re)connects, replacing any connection, and syncs the clock.
    pub async fn reconnect(&self) -> Result<(), StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout.max(Duration::from_millis(200)))
            .set_response_timeout(self.timeout);
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let (secs, micros): (i64, i64) = self
            .bounded(redis::cmd("TIME").query_async(&mut conn))
            .await?;
        self.clock.observe(secs * 1_000_000 + micros);
        self.load_library(&mut conn).await?;
        *self.lock_conn() = Some(conn);
        Ok(())
    }
}

/// A client for `url`, trusting `ca_file` beside the system's roots for
/// `rediss://` (`tls.rs`): the quota store and the spend keys alike.
pub(crate) fn client(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<redis::Client, StoreError> {
    Ok(match ca_file {
        Some(ca_file) if url.starts_with("rediss://") => {
            let roots = crate::tls::roots_with(ca_file).map_err(StoreError::Tls)?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(roots),
                },
            )?
        }
        _ => redis::Client::open(url)?,
    })
}

impl Inner {
    /// Loads (or reloads) the quota functions.
    async fn load_library(&self, conn: &mut MultiplexedConnection) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(&self.library.code);
        let load = cmd.query_async::<String>(conn);
        // Compiling takes longer than a call; never fail it on the call timeout.
        match tokio::time::timeout(self.timeout.max(Duration::from_secs(2)), load).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e))
                if e.to_string()
                    .to_ascii_lowercase()
                    .contains("unknown command") =>
            {
                Err(StoreError::Protocol(
                    "Redis 7.0 or later is required (FUNCTION LOAD)".into(),
                ))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Runs one function call, reloading the library once if Redis lost it.
    async fn invoke<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        match self.bounded(cmd.query_async(&mut conn)).await {
            Err(StoreError::Redis(e)) if missing_function(&e) => {
                self.load_library(&mut conn).await?;
                self.bounded(cmd.query_async(&mut conn)).await
            }
            other => other,
        }
    }

    /// Forgets the connection (after a failure); calls fail until reconnected.
    pub fn disconnect(&self) {
        *self.lock_conn() = None;
    }

    fn lock_conn(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        self.lock_conn().clone().ok_or(StoreError::Disconnected)
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    pub fn clock(&self) -> &ServerClock {
        &self.clock
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The bucket (requester, region) draws on.
    fn slot(&self, requester: &str, region: &str) -> Option<&Bucket> {
        self.requesters
            .get(requester)?
            .iter()
            .find(|s| &*s.region == region)
            .map(|s| &*s.bucket)
    }

    /// The bucket (bucket group, region).
    fn bucket(&self, group: &str, region: &str) -> Option<&Bucket> {
        self.buckets
            .iter()
            .find(|b| b.group.as_str() == group && &*b.region == region)
            .map(|b| &**b)
    }

    fn configured(bucket: &Bucket) -> Limits {
        *bucket.configured.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One decision in Redis: reserve (asking for a lease of `want` more
    /// requests of this charge, or none) or only probe, in one round trip.
    /// A grant comes with how many requests its entry holds.
    async fn decide(
        &self,
        request: ReserveRequest<'_>,
        reserve: bool,
        want: u32,
    ) -> Result<Result<Option<(Grant, u32)>, Denial>, StoreError> {
        let Some(slots) = self.requesters.get(request.group) else {
            return Ok(Err(Denial::Never));
        };
        let candidates: Vec<&Bucket> = slots
            .iter()
            .filter(|s| request.regions.contains(&s.region))
            .map(|s| &*s.bucket)
            .collect();
        if candidates.is_empty() {
            return Ok(Err(Denial::Never));
        }
        let mut keys: Vec<&str> = vec![&self.drained_keys[request.group]];
        for s in &candidates {
            keys.extend(s.keys.iter().map(String::as_str));
        }
        let mut call = self.library.call("reserve", &keys);
        call.arg(u32::from(reserve))
            .arg(u32::from(request.strategy == Strategy::Ordered))
            .arg(request.charge.input)
            .arg(request.charge.output)
            .arg(candidates.len())
            .arg(want)
            .arg(self.leases.length().as_micros() as u64);
        for s in &candidates {
            call.arg(&*s.region)
                .arg(&limits_args(Self::configured(s))[..]);
        }
        let reply: Vec<i64> = self.invoke(&call).await?;
        match reply.as_slice() {
            [1, index, id, l @ .., empty_at, now, requests] if l.len() == 7 => {
                self.clock.observe(*now);
                let slot = candidates
                    .get((*index as usize).wrapping_sub(1))
                    .ok_or_else(|| protocol("reserve", &reply))?;
                let grant = Grant {
                    group: request.group.clone(),
                    region: Arc::clone(&slot.region),
                    entry: EntryId::from_raw(*id as u64),
                    charge: request.charge,
                    view: BudgetView {
                        limits: limits_from(&l[..4]),
                        usage: usage_from(&l[4..]),
                        empty_at: us(*empty_at),
                        now: us(*now),
                    },
                };
                Ok(Ok(Some((
                    grant,
                    (*requests).clamp(1, i64::from(u32::MAX)) as u32,
                ))))
            }
            [0, now] => {
                self.clock.observe(*now);
                Ok(Ok(None))
            }
            [2, retry_at, now] => {
                self.clock.observe(*now);
                Ok(Err(Denial::Later {
                    retry_at: us(*retry_at),
                }))
            }
            [3, now] => {
                self.clock.observe(*now);
                Ok(Err(Denial::Never))
            }
            _ => Err(protocol("reserve", &reply)),
        }
    }

    /// The stamp of a grant's entry: the reserve answered it as `empty_at`,
    /// stamp + window + 1 µs.
    fn stamp_of(&self, grant: &Grant) -> i64 {
        (grant.view.empty_at.as_micros() as i64).saturating_sub(self.window.as_micros() as i64 + 1)
    }

    /// Sends one change to a lease's entry.
    async fn try_adjust(&self, a: &Adjustment) -> Result<(), StoreError> {
        let Some(slot) = self.slot(a.group.as_str(), &a.region) else {
            return Ok(());
        };
        let (outcome, which) = match a.learn {
            Learn::Success => (0, 0),
            Learn::RateLimited(which) => (1, exhausted_code(which)),
            Learn::Unavailable => (2, 0),
            Learn::Nothing => (3, 0),
        };
        let keys = slot.keys.each_ref().map(String::as_str);
        let mut call = self.library.call("adjust", &keys);
        call.arg(&limits_args(Self::configured(slot))[..])
            .arg(a.id)
            .arg(a.stamp_us)
            .arg(a.change.requests)
            .arg(a.change.input)
            .arg(a.change.output)
            .arg(u32::from(a.settled))
            .arg(outcome)
            .arg(which)
            .arg(rand::random::<f64>());
        let now: i64 = self.invoke(&call).await?;
        self.clock.observe(now);
        Ok(())
    }

    /// Sends changes to leases' entries, in order; the first error stops.
    async fn try_adjust_all(&self, all: &[Adjustment]) -> Result<(), StoreError> {
        for a in all {
            self.try_adjust(a).await?;
        }
        Ok(())
    }

    pub async fn try_settle(&self, grant: &Grant, outcome: Outcome) -> Result<(), StoreError> {
        if grant.entry.raw() & LEASED != 0 {
            return match self.leases.settle(grant, outcome) {
                Some(a) => self.try_adjust(&a).await,
                None => Ok(()),
            };
        }
        let Some(slot) = self.slot(grant.group.as_str(), &grant.region) else {
            return Ok(());
        };
        let (code, actual, which) = match outcome {
            Outcome::Used(c) => (0, c, 0),
            Outcome::RateLimited(which) => (1, Charge::default(), exhausted_code(which)),
            Outcome::Unavailable => (2, Charge::default(), 0),
            Outcome::NotSent => (3, Charge::default(), 0),
            Outcome::Broken(c) => (4, c, 0),
        };
        let keys = slot.keys.each_ref().map(String::as_str);
        let mut call = self.library.call("settle", &keys);
        call.arg(&limits_args(Self::configured(slot))[..])
            .arg(grant.entry.raw())
            .arg(code)
            .arg(actual.input)
            .arg(actual.output)
            .arg(which)
            .arg(rand::random::<f64>())
            .arg(grant.charge.input)
            .arg(grant.charge.output)
            .arg(self.stamp_of(grant));
        let now: i64 = self.invoke(&call).await?;
        self.clock.observe(now);
        Ok(())
    }

    /// Every bucket's state once, named by its bucket group.
    pub async fn try_states(&self) -> Result<Vec<BudgetState>, StoreError> {
        let all = &self.buckets;
        let mut keys: Vec<&str> = Vec::with_capacity(all.len() * 3);
        for bucket in all {
            keys.push(&bucket.drained_key);
            keys.extend(bucket.keys.iter().map(String::as_str));
        }
        let mut call = self.library.call("states", &keys);
        call.arg(all.len());
        for bucket in all {
            call.arg(&*bucket.region)
                .arg(&limits_args(Self::configured(bucket))[..]);
        }
        let reply: Vec<i64> = self.invoke(&call).await?;
        if reply.len() != 1 + all.len() * 16 {
            return Err(protocol("states", &reply));
        }
        let now = reply[0];
        self.clock.observe(now);
        // `buckets` is sorted by (bucket group, location) already.
        let states: Vec<BudgetState> = all
            .iter()
            .zip(reply[1..].chunks(16))
            .map(|(bucket, v)| BudgetState {
                group: bucket.group.clone(),
                region: Arc::clone(&bucket.region),
                configured: limits_from(&v[0..4]),
                effective: limits_from(&v[4..8]),
                usage: usage_from(&v[8..11]),
                in_flight: usage_from(&v[11..14]),
                cooldown_remaining: us(v[14]),
                drained: v[15] == 1,
            })
            .collect();
        Ok(states)
    }

    /// Sets the limits of the bucket (`group`, `region`), `group` a bucket
    /// group; this replica's leases on it close first, whichever requester
    /// holds them.
    pub async fn try_set_configured(
        &self,
        group: &QuotaGroup,
        region: &str,
        limits: Limits,
    ) -> Result<bool, StoreError> {
        let Some(slot) = self.bucket(group.as_str(), region) else {
            return Ok(false);
        };
        *slot.configured.lock().unwrap_or_else(|p| p.into_inner()) = limits;
        let holders: Vec<QuotaGroup> = self
            .requesters
            .iter()
            .filter(|(_, slots)| {
                slots
                    .iter()
                    .any(|s| &*s.region == region && std::ptr::eq(&*s.bucket, slot))
            })
            .map(|(requester, _)| requester.clone())
            .collect();
        self.try_adjust_all(&self.leases.revoke(Some(&holders), region))
            .await?;
        let keys = slot.keys.each_ref().map(String::as_str);
        let mut call = self.library.call("configure", &keys);
        call.arg(&limits_args(limits)[..]);
        let now: i64 = self.invoke(&call).await?;
        self.clock.observe(now);
        Ok(true)
    }

    pub async fn try_set_drained(&self, region: &str, drained: bool) -> Result<usize, StoreError> {
        if drained {
            self.try_adjust_all(&self.leases.revoke(None, region))
                .await?;
        }
        let mut pipe = redis::pipe();
        let mut writes = 0;
        for (requester, slots) in &self.requesters {
            if slots.iter().any(|s| &*s.region == region) {
                let key = &self.drained_keys[requester];
                if drained {
                    pipe.sadd(key, region).ignore();
                } else {
                    pipe.srem(key, region).ignore();
                }
                writes += 1;
            }
        }
        // Counted in buckets, as the in-memory store counts.
        let count = self.buckets.iter().filter(|b| &*b.region == region).count();
        if writes > 0 {
            let mut conn = self.connection()?;
            self.bounded(pipe.query_async::<()>(&mut conn)).await?;
        }
        Ok(count)
    }

    /// Adds usage admitted elsewhere (locally, during an outage) to the
    /// bucket (`group`, `region`) as one settled entry stamped `at`, if
    /// `at` is still in the window.
    pub async fn try_import(
        &self,
        group: &str,
        region: &str,
        at: Duration,
        usage: Usage,
    ) -> Result<(), StoreError> {
        let Some(slot) = self.bucket(group, region) else {
            return Ok(());
        };
        let keys = slot.keys.each_ref().map(String::as_str);
        let mut call = self.library.call("import", &keys);
        call.arg(at.as_micros() as u64)
            .arg(usage.requests)
            .arg(usage.input)
            .arg(usage.output);
        let now: i64 = self.invoke(&call).await?;
        self.clock.observe(now);
        Ok(())
    }

    /// Says this replica is alive for `ttl`; returns how many are.
    pub async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<u32, StoreError> {
        let mut conn = self.connection()?;
        let mut call = self.heartbeat.prepare_invoke();
        call.key(format!("{}replicas", self.prefix))
            .arg(replica)
            .arg(ttl.as_millis() as u64);
        let (count, now): (u32, i64) = self.bounded(call.invoke_async(&mut conn)).await?;
        self.clock.observe(now);
        Ok(count)
    }

    /// The Redis instance's epoch: `<prefix>epoch`, set to `candidate` if
    /// missing. Returns whether this call set it, and its value. A Redis
    /// that restarted empty has none, so a replica that knew another one
    /// learns that the shared ledgers were lost (`resilient.rs` restores
    /// them from its picture); only the first to ask sets it.
    pub async fn try_epoch(&self, candidate: &str) -> Result<(bool, String), StoreError> {
        let mut conn = self.connection()?;
        let key = format!("{}epoch", self.prefix);
        let set: Option<String> = self
            .bounded(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(candidate)
                    .arg("NX")
                    .arg("GET")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(match set {
            None => (true, candidate.to_owned()),
            Some(v) => (false, v),
        })
    }

    /// Every bucket this store knows — (bucket group, location) — with
    /// its configured limits.
    pub fn budgets(&self) -> Vec<(QuotaGroup, Arc<str>, Limits)> {
        self.buckets
            .iter()
            .map(|b| (b.group.clone(), Arc::clone(&b.region), Self::configured(b)))
            .collect()
    }

    fn closed<T>(&self, what: &str, e: &StoreError) -> Result<T, Denial> {
        tracing::warn!(error = %e, "quota store: {what} failed; refusing for a second");
        Err(Denial::Later {
            retry_at: self.clock.now() + Duration::from_secs(1),
        })
    }
}

impl RedisStore {
    /// One admission decision, reserving or only probing: from an open
    /// lease if one has room (no round trip), else in Redis.
    pub async fn try_decide(
        &self,
        request: ReserveRequest<'_>,
        reserve: bool,
    ) -> Result<Result<Option<Grant>, Denial>, StoreError> {
        if reserve {
            return Ok(self.try_reserve(request).await?.map(Some));
        }
        if self.leases.probe(&request, self.clock.now()) {
            return Ok(Ok(None));
        }
        Ok(self
            .decide(request, false, 0)
            .await?
            .map(|g| g.map(|(g, _)| g)))
    }

    pub async fn try_reserve(
        &self,
        request: ReserveRequest<'_>,
    ) -> Result<Result<Grant, Denial>, StoreError> {
        if !self.requesters.contains_key(request.group) {
            // Nothing to ask Redis, and no demand to count for it.
            return Ok(Err(Denial::Never));
        }
        let now = self.clock.now();
        let want = match self.leases.reserve(&request, now) {
            Ok(grant) => return Ok(Ok(grant)),
            Err(want) => want,
        };
        let decided = self.decide(request, true, want).await?;
        Ok(decided.map(|g| {
            let (grant, requests) = g.expect("a reserving script answers with a grant or a denial");
            self.record_own(&grant, requests);
            if requests <= 1 {
                return grant;
            }
            let stamp = self.stamp_of(&grant);
            let (grant, until) = self.leases.open(grant, requests, stamp, now);
            self.close_at(grant.entry.raw() & !LEASED, until);
            grant
        }))
    }

    /// Remembers an entry Redis just created for this replica (a lease's
    /// whole room), for the local share should Redis fail now.
    fn record_own(&self, grant: &Grant, requests: u32) {
        let Some(bucket) = self.slot(grant.group.as_str(), &grant.region) else {
            return;
        };
        let r = u64::from(requests);
        let usage = Usage {
            requests,
            input: grant.charge.input.saturating_mul(r),
            output: grant.charge.output.saturating_mul(r),
        };
        let at = us(self.stamp_of(grant));
        self.own.record(
            (bucket.group.clone(), Arc::clone(&bucket.region)),
            Part { at, usage },
            grant.view.now,
        );
    }

    /// This replica's recent grants (`failover.rs`).
    pub fn own_grants(&self) -> &OwnGrants {
        &self.own
    }

    /// Every bucket's window as Redis holds it now, in `slices` parts
    /// (`lua/window.lua`).
    pub async fn try_picture(&self, slices: u32) -> Result<Picture, StoreError> {
        let all = &self.buckets;
        let mut keys: Vec<&str> = Vec::with_capacity(all.len() * 2);
        for bucket in all {
            keys.extend(bucket.keys.iter().map(String::as_str));
        }
        let mut call = self.library.call("window", &keys);
        call.arg(all.len()).arg(slices);
        let reply: Vec<i64> = self.invoke(&call).await?;
        let Some((&now, mut rest)) = reply.split_first() else {
            return Err(protocol("window", &reply));
        };
        self.clock.observe(now);
        let mut budgets = Vec::with_capacity(all.len());
        for bucket in all {
            let Some((&count, tail)) = rest.split_first() else {
                return Err(protocol("window", &reply));
            };
            let len = usize::try_from(count)
                .unwrap_or(usize::MAX)
                .saturating_mul(4);
            if tail.len() < len {
                return Err(protocol("window", &reply));
            }
            let parts = tail[..len]
                .chunks(4)
                .map(|v| Part {
                    at: us(v[0]),
                    usage: usage_from(&v[1..]),
                })
                .collect();
            budgets.push(((bucket.group.clone(), Arc::clone(&bucket.region)), parts));
            rest = &tail[len..];
        }
        Ok(Picture {
            taken: us(now),
            budgets,
        })
    }

    /// Leases this replica still tracks: open, or closed with requests in
    /// flight.
    pub fn leases_tracked(&self) -> usize {
        self.leases.tracked()
    }

    /// Closes a lease when its time is up, giving back what it did not use.
    fn close_at(&self, id: u64, until: Duration) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let wait = until.saturating_sub(self.clock.now());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(inner) = weak.upgrade() else { return };
            let Some(adjustment) = inner.leases.close(id) else {
                return;
            };
            if let Err(e) = inner.try_adjust(&adjustment).await {
                // Its entry keeps the whole lease until it leaves the
                // window: the safe direction.
                tracing::debug!(error = %e, "quota store: closing a lease failed");
            }
        });
    }
}

impl QuotaStore for RedisStore {
    fn now(&self) -> Duration {
        self.clock.now()
    }

    fn recheck_after(&self) -> Option<Duration> {
        Some(crate::resilient::RECHECK)
    }

    fn reserve<'a>(
        &'a self,
        request: ReserveRequest<'a>,
    ) -> StoreFuture<'a, Result<Grant, Denial>> {
        Box::pin(async move {
            match self.try_reserve(request).await {
                Ok(result) => result,
                Err(e) => self.closed("reserve", &e),
            }
        })
    }

    fn probe<'a>(&'a self, request: ReserveRequest<'a>) -> StoreFuture<'a, Result<(), Denial>> {
        Box::pin(async move {
            match self.try_decide(request, false).await {
                Ok(result) => result.map(|_| ()),
                Err(e) => self.closed("probe", &e),
            }
        })
    }

    fn settle<'a>(&'a self, grant: &'a Grant, outcome: Outcome) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self.try_settle(grant, outcome).await {
                tracing::warn!(error = %e, "quota store: settle failed; the reservation stays until it leaves the window");
            }
        })
    }

    fn states(&self) -> StoreFuture<'_, Vec<BudgetState>> {
        Box::pin(async move { self.try_states().await.unwrap_or_default() })
    }

    fn set_configured<'a>(
        &'a self,
        group: &'a QuotaGroup,
        region: &'a str,
        limits: Limits,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.try_set_configured(group, region, limits)
                .await
                .unwrap_or(false)
        })
    }

    fn set_drained<'a>(&'a self, region: &'a str, drained: bool) -> StoreFuture<'a, usize> {
        Box::pin(async move { self.try_set_drained(region, drained).await.unwrap_or(0) })
    }
}
