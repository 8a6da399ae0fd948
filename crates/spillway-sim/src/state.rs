//! The simulator's shared state, and its locking discipline.
//!
//! One [`State`] is shared (behind an `Arc`) by every request handler and
//! every [`crate::SimHandle`]. To stay fast at thousands of requests per
//! second it uses only short, synchronous critical sections, and never holds
//! a lock across an `.await`:
//!
//! * the model table is a `RwLock<HashMap<region, HashMap<model, Arc<ModelSlot>>>>`,
//!   read-locked for one lookup per request (written only by `set_quota` for a
//!   pair that did not exist);
//! * each [`ModelSlot`] has its own mutex for its quota window and one for
//!   its counters, so different models never contend;
//! * faults have an atomic "any faults?" fast path;
//! * simple totals are atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::config::SimConfig;
use crate::counters::ModelCounters;
use crate::faults::{lock, FaultTable};
use crate::oauth::OAuthState;
use crate::quota::{QuotaLimits, QuotaWindow};
use crate::recorder::Recorder;

/// Counters for pairs that are not offered (404s) are kept for at most this
/// many distinct (region, model) pairs, so hostile paths cannot grow memory.
const MAX_UNOFFERED_PAIRS: usize = 1024;

pub(crate) type SharedState = Arc<State>;

/// How many arrival times each offered (region, model) keeps: enough for
/// a test to check every window of a run, bounded so a long-running
/// simulator (the demo, benchmarks) does not grow without end.
pub(crate) const RECORDED_ARRIVALS: usize = 65_536;

/// Quota window and counters of one offered (region, model).
#[derive(Debug)]
pub(crate) struct ModelSlot {
    pub(crate) quota: Mutex<QuotaWindow>,
    pub(crate) counters: Mutex<ModelCounters>,
    /// When each predict request arrived (any outcome), oldest first.
    pub(crate) arrivals: Mutex<std::collections::VecDeque<tokio::time::Instant>>,
}

impl ModelSlot {
    fn new(limits: QuotaLimits) -> Self {
        ModelSlot {
            quota: Mutex::new(QuotaWindow::new(limits)),
            counters: Mutex::new(ModelCounters::default()),
            arrivals: Mutex::default(),
        }
    }
}

type ModelTable = HashMap<String, HashMap<String, Arc<ModelSlot>>>;

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) window: Duration,
    pub(crate) bearer_token: Option<String>,
    pub(crate) emit_vertex_event: bool,
    pub(crate) default_output_tokens: AtomicU32,
    models: RwLock<ModelTable>,
    unoffered: Mutex<HashMap<(String, String), ModelCounters>>,
    pub(crate) faults: FaultTable,
    pub(crate) recorder: Recorder,
    pub(crate) oauth: OAuthState,
    pub(crate) total_requests: AtomicU64,
    /// Wakes requests hanging on a `Hang` fault (on clear/reset/shutdown).
    pub(crate) hang_release: tokio::sync::Notify,
    pub(crate) shutting_down: AtomicBool,
}

impl State {
    pub(crate) fn new(config: &SimConfig) -> Self {
        let mut models: ModelTable = HashMap::new();
        for r in &config.regions {
            let region = models.entry(r.name.clone()).or_default();
            for m in &r.models {
                region.insert(m.id.clone(), Arc::new(ModelSlot::new(m.limits())));
            }
        }
        State {
            window: config.window,
            bearer_token: config.bearer_token.clone(),
            emit_vertex_event: config.emit_vertex_event,
            default_output_tokens: AtomicU32::new(config.default_output_tokens),
            models: RwLock::new(models),
            unoffered: Mutex::new(HashMap::new()),
            faults: FaultTable::default(),
            recorder: Recorder::default(),
            oauth: OAuthState::default(),
            total_requests: AtomicU64::new(0),
            hang_release: tokio::sync::Notify::new(),
            shutting_down: AtomicBool::new(false),
        }
    }

    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, ModelTable> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of an offered (region, model).
    pub(crate) fn slot(&self, region: &str, model: &str) -> Option<Arc<ModelSlot>> {
        self.read_models().get(region)?.get(model).cloned()
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
        for (region, models) in self.read_models().iter() {
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

    /// The offered models, as `region -> model -> limits`.
    pub(crate) fn all_limits(&self) -> HashMap<String, HashMap<String, QuotaLimits>> {
        self.read_models()
            .iter()
            .map(|(region, models)| {
                let m = models
                    .iter()
                    .map(|(id, slot)| (id.clone(), lock(&slot.quota).limits()))
                    .collect();
                (region.clone(), m)
            })
            .collect()
    }

    /// Sets the limits of (region, model); offers the model there if it was not.
    pub(crate) fn set_limits(&self, region: &str, model: &str, limits: QuotaLimits) {
        if let Some(slot) = self.slot(region, model) {
            lock(&slot.quota).set_limits(limits);
            return;
        }
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        let slot = models
            .entry(region.to_owned())
            .or_default()
            .entry(model.to_owned())
            .or_insert_with(|| Arc::new(ModelSlot::new(limits)));
        lock(&slot.quota).set_limits(limits);
        drop(models);
        lock(&self.unoffered).remove(&(region.to_owned(), model.to_owned()));
    }

    pub(crate) fn limits(&self, region: &str, model: &str) -> Option<QuotaLimits> {
        self.slot(region, model).map(|s| lock(&s.quota).limits())
    }

    pub(crate) fn release_hangs(&self) {
        self.hang_release.notify_waiters();
    }

    /// Clears counters, quota windows, faults and recorded requests. Quota
    /// limits, the default output length and issued OAuth tokens stay.
    pub(crate) fn reset(&self) {
        for models in self.read_models().values() {
            for slot in models.values() {
                lock(&slot.quota).clear();
                *lock(&slot.counters) = ModelCounters::default();
                lock(&slot.arrivals).clear();
            }
        }
        lock(&self.unoffered).clear();
        self.faults.clear();
        self.release_hangs();
        self.recorder.clear();
        self.oauth.reset_count();
        self.total_requests.store(0, Ordering::Relaxed);
    }
}
