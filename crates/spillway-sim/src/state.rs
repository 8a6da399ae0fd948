//! The simulator's shared state, and its locking discipline.
//!
//! One [`State`] is shared (behind an `Arc`) by every request handler and
//! every [`crate::SimHandle`]. To stay fast at thousands of requests per
//! second it uses only short, synchronous critical sections, and never holds
//! a lock across an `.await`:
//!
//! * the model table is a `RwLock` over `region -> model -> Arc<ModelSlot>`
//!   plus the set of quota buckets, read-locked for one lookup per request
//!   (written only by `set_quota` for a pair that did not exist);
//! * each [`ModelSlot`] points at its quota [`Bucket`] (shared by the models
//!   of a lineage group on `global` / multi-regions, see `quota`), which has
//!   its own mutex; counters have one per slot, so unrelated models never
//!   contend;
//! * faults and model refusals have an atomic "any?" fast path;
//! * simple totals are atomics; the accepted bearer token is behind a
//!   `RwLock` (read per request, written only by a rotation).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};

use crate::config::SimConfig;
use crate::counters::ModelCounters;
use crate::faults::{lock, FaultTable};
use crate::oauth::OAuthState;
use crate::quota::{Bucket, BucketId, QuotaLimits};
use crate::recorder::Recorder;

/// Counters for pairs that are not offered (404s) are kept for at most this
/// many distinct (region, model) pairs, so hostile paths cannot grow memory.
const MAX_UNOFFERED_PAIRS: usize = 1024;

pub(crate) type SharedState = Arc<State>;

/// How many arrival times each offered (region, model) keeps: enough for
/// a test to check every window of a run, bounded so a long-running
/// simulator (the demo, benchmarks) does not grow without end.
pub(crate) const RECORDED_ARRIVALS: usize = 65_536;

/// One offered (region, model): its bucket, cache rule and counters.
#[derive(Debug)]
pub(crate) struct ModelSlot {
    /// The model id, shared with the admission log entries.
    pub(crate) model: Arc<str>,
    /// The quota window it draws on (maybe shared with its lineage).
    pub(crate) bucket: Arc<Bucket>,
    /// Whether its cache reads count against the input-token quota.
    pub(crate) cache_reads_count: bool,
    pub(crate) counters: Mutex<ModelCounters>,
    /// When each predict request arrived (any outcome), oldest first.
    pub(crate) arrivals: Mutex<std::collections::VecDeque<tokio::time::Instant>>,
}

impl ModelSlot {
    fn new(model: &str, bucket: Arc<Bucket>, cache_reads_count: bool) -> Self {
        ModelSlot {
            model: Arc::from(model),
            bucket,
            cache_reads_count,
            counters: Mutex::new(ModelCounters::default()),
            arrivals: Mutex::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    models: HashMap<String, HashMap<String, Arc<ModelSlot>>>,
    buckets: BTreeMap<BucketId, Arc<Bucket>>,
}

impl Tables {
    /// The bucket `id`, created with `limits` if new (an existing bucket
    /// keeps its limits: `SimConfig::validate` made sure they agree).
    fn bucket(&mut self, id: BucketId, limits: QuotaLimits) -> Arc<Bucket> {
        self.buckets
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Bucket::new(id, limits)))
            .clone()
    }
}

/// (region, model) pairs that answer 404 although offered.
#[derive(Debug, Default)]
struct Refusals {
    len: AtomicUsize,
    set: Mutex<HashSet<(String, String)>>,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) window: Duration,
    bearer_token: RwLock<Option<String>>,
    pub(crate) emit_vertex_event: bool,
    pub(crate) default_output_tokens: AtomicU32,
    tables: RwLock<Tables>,
    unoffered: Mutex<HashMap<(String, String), ModelCounters>>,
    refused: Refusals,
    pub(crate) faults: FaultTable,
    pub(crate) recorder: Recorder,
    pub(crate) cache: crate::cache::PromptCache,
    pub(crate) oauth: OAuthState,
    pub(crate) total_requests: AtomicU64,
    /// Wakes requests hanging on a `Hang` fault (on clear/reset/shutdown).
    pub(crate) hang_release: tokio::sync::Notify,
    pub(crate) shutting_down: AtomicBool,
    /// Anthropic's first-party surface, if configured.
    pub(crate) anthropic: Option<Arc<crate::anthropic::Surface>>,
}

impl State {
    /// Builds the state; `config` should have passed `SimConfig::validate`
    /// (if not, a shared bucket takes the limits of its first model).
    pub(crate) fn new(config: &SimConfig) -> Self {
        let mut tables = Tables::default();
        for r in &config.regions {
            for m in &r.models {
                let bucket = tables.bucket(m.bucket(&r.name), m.limits());
                let slot = ModelSlot::new(&m.id, bucket, m.counts_cache_reads());
                tables
                    .models
                    .entry(r.name.clone())
                    .or_default()
                    .insert(m.id.clone(), Arc::new(slot));
            }
        }
        State {
            window: config.window,
            bearer_token: RwLock::new(config.bearer_token.clone()),
            emit_vertex_event: config.emit_vertex_event,
            default_output_tokens: AtomicU32::new(config.default_output_tokens),
            tables: RwLock::new(tables),
            unoffered: Mutex::new(HashMap::new()),
            refused: Refusals::default(),
            faults: FaultTable::default(),
            recorder: Recorder::default(),
            cache: crate::cache::PromptCache::default(),
            oauth: OAuthState::default(),
            total_requests: AtomicU64::new(0),
            hang_release: tokio::sync::Notify::new(),
            shutting_down: AtomicBool::new(false),
            anthropic: config
                .anthropic
                .as_ref()
                .map(|a| Arc::new(crate::anthropic::Surface::new(a, config.window))),
        }
    }

    fn read_tables(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a predict call carrying `token` (the `Authorization: Bearer`
    /// value, if any) may pass: always when no token is required, else the
    /// current static token or a live `/token` one.
    pub(crate) fn authorized(&self, token: Option<&str>) -> bool {
        let expected = self.bearer_token.read().unwrap_or_else(|e| e.into_inner());
        let Some(expected) = expected.as_deref() else {
            return true;
        };
        token.is_some_and(|t| t == expected || self.oauth.is_valid(t))
    }

    /// Revokes the static bearer token and every `/token` token issued so
    /// far, and installs (and returns) a new static token. Authentication is
    /// required from now on, even if it was off.
    pub(crate) fn rotate_token(&self) -> String {
        let mut token = String::from("sim-rotated-");
        Alphanumeric.append_string(&mut rand::rng(), &mut token, 32);
        *self.bearer_token.write().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        self.oauth.revoke_all();
        token
    }

    /// Makes `region` answer 404 for `model` (offered or not).
    pub(crate) fn refuse(&self, region: &str, model: &str) {
        let mut set = lock(&self.refused.set);
        set.insert((region.to_owned(), model.to_owned()));
        self.refused.len.store(set.len(), Ordering::Release);
    }

    /// Undoes [`State::refuse`]; says whether the pair was refused.
    pub(crate) fn allow(&self, region: &str, model: &str) -> bool {
        let mut set = lock(&self.refused.set);
        let was = set.remove(&(region.to_owned(), model.to_owned()));
        self.refused.len.store(set.len(), Ordering::Release);
        was
    }

    pub(crate) fn is_refused(&self, region: &str, model: &str) -> bool {
        if self.refused.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        lock(&self.refused.set).contains(&(region.to_owned(), model.to_owned()))
    }

    /// The refused pairs, sorted.
    pub(crate) fn refused(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = lock(&self.refused.set).iter().cloned().collect();
        v.sort();
        v
    }

    /// Every bucket, in `BucketId` order.
    pub(crate) fn buckets(&self) -> Vec<Arc<Bucket>> {
        self.read_tables().buckets.values().cloned().collect()
    }

    pub(crate) fn bucket(&self, id: &BucketId) -> Option<Arc<Bucket>> {
        self.read_tables().buckets.get(id).cloned()
    }

    /// The models drawing on bucket `id`, sorted.
    pub(crate) fn bucket_models(&self, id: &BucketId) -> Vec<String> {
        let tables = self.read_tables();
        let mut v: Vec<String> = tables
            .models
            .get(&id.location)
            .into_iter()
            .flat_map(|models| models.iter())
            .filter(|(_, slot)| slot.bucket.id == *id)
            .map(|(m, _)| m.clone())
            .collect();
        v.sort();
        v
    }

    /// The slot of an offered (region, model).
    pub(crate) fn slot(&self, region: &str, model: &str) -> Option<Arc<ModelSlot>> {
        self.read_tables().models.get(region)?.get(model).cloned()
    }

    /// Updates the counters of (region, model), offered or not.
    pub(crate) fn count(&self, region: &str, model: &str, f: impl FnOnce(&mut ModelCounters)) {
        if let Some(slot) = self.slot(region, model) {
            f(&mut lock(&slot.counters));
            return;
        }
        let mut map = lock(&self.unoffered);
        let key = (region.to_owned(), model.to_owned());
        if let Some(c) = map.get_mut(&key) {
            f(c);
        } else if map.len() < MAX_UNOFFERED_PAIRS {
            f(map.entry(key).or_default());
        }
    }

    /// Notes that a predict request for an offered (region, model) arrived.
    pub(crate) fn arrived(&self, region: &str, model: &str) {
        if let Some(slot) = self.slot(region, model) {
            let mut arrivals = lock(&slot.arrivals);
            if arrivals.len() >= RECORDED_ARRIVALS {
                arrivals.pop_front();
            }
            arrivals.push_back(tokio::time::Instant::now());
        }
    }

    pub(crate) fn counters(&self, region: &str, model: &str) -> ModelCounters {
        if let Some(slot) = self.slot(region, model) {
            return lock(&slot.counters).clone();
        }
        lock(&self.unoffered)
            .get(&(region.to_owned(), model.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// All counters, as `region -> model -> counters`.
    pub(crate) fn all_counters(&self) -> HashMap<String, HashMap<String, ModelCounters>> {
        let mut out: HashMap<String, HashMap<String, ModelCounters>> = HashMap::new();
        for (region, models) in self.read_tables().models.iter() {
            let r = out.entry(region.clone()).or_default();
            for (model, slot) in models {
                r.insert(model.clone(), lock(&slot.counters).clone());
            }
        }
        for ((region, model), c) in lock(&self.unoffered).iter() {
            out.entry(region.clone())
                .or_default()
                .insert(model.clone(), c.clone());
        }
        out
    }

    /// The offered models, as `region -> model -> (bucket, limits)`.
    pub(crate) fn all_limits(&self) -> HashMap<String, HashMap<String, (BucketId, QuotaLimits)>> {
        self.read_tables()
            .models
            .iter()
            .map(|(region, models)| {
                let m = models
                    .iter()
                    .map(|(id, slot)| (id.clone(), (slot.bucket.id.clone(), slot.bucket.limits())))
                    .collect();
                (region.clone(), m)
            })
            .collect()
    }

    /// Sets the limits of (region, model)'s bucket (so of every model
    /// sharing it); offers the model there, with its own bucket and the
    /// default cache rule, if it was not.
    pub(crate) fn set_limits(&self, region: &str, model: &str, limits: QuotaLimits) {
        if let Some(slot) = self.slot(region, model) {
            slot.bucket.set_limits(limits);
            return;
        }
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let id = BucketId::for_model(region, model, None);
        let bucket = tables.bucket(id, limits);
        bucket.set_limits(limits);
        tables
            .models
            .entry(region.to_owned())
            .or_default()
            .entry(model.to_owned())
            .or_insert_with(|| {
                let reads = crate::config::default_cache_reads_count(model);
                Arc::new(ModelSlot::new(model, bucket, reads))
            });
        drop(tables);
        lock(&self.unoffered).remove(&(region.to_owned(), model.to_owned()));
    }

    pub(crate) fn limits(&self, region: &str, model: &str) -> Option<QuotaLimits> {
        self.slot(region, model).map(|s| s.bucket.limits())
    }

    pub(crate) fn release_hangs(&self) {
        self.hang_release.notify_waiters();
    }

    /// Clears counters, quota windows and admission logs, faults, model
    /// refusals and recorded requests, and resets the first-party surface
    /// (buckets refilled, new log, counters and ring cleared). Quota
    /// limits, the default output length, the bearer token, issued OAuth
    /// tokens and the Anthropic key and limits stay.
    pub(crate) fn reset(&self) {
        {
            let tables = self.read_tables();
            for models in tables.models.values() {
                for slot in models.values() {
                    *lock(&slot.counters) = ModelCounters::default();
                    lock(&slot.arrivals).clear();
                }
            }
            for bucket in tables.buckets.values() {
                bucket.clear();
            }
        }
        lock(&self.unoffered).clear();
        {
            let mut set = lock(&self.refused.set);
            set.clear();
            self.refused.len.store(0, Ordering::Release);
        }
        self.faults.clear();
        self.release_hangs();
        self.recorder.clear();
        self.oauth.reset_count();
        self.total_requests.store(0, Ordering::Relaxed);
        if let Some(a) = &self.anthropic {
            a.reset();
        }
    }
}
