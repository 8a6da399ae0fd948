//! Anthropic's first-party Messages API (`api.anthropic.com`), served next
//! to the Vertex surface on the same port, so a gateway can be tested
//! overflowing from Vertex to Anthropic without touching the internet.
//!
//! It exists only when [`crate::SimConfig::anthropic`] is set; otherwise
//! these paths stay the 404 they always were. Routes (an optional
//! `?beta=true` query is accepted and recorded, as the SDK's beta calls
//! send it):
//!
//! ```text
//! POST /v1/messages                 Messages: JSON Message, or SSE with "stream": true
//! POST /v1/messages/count_tokens    {"input_tokens":N}; free (no rate limit)
//! ```
//!
//! ## The pipeline of `POST /v1/messages`
//!
//! Each step may answer; every answer carries `request-id: req_…`, and
//! every error body is `{"type":"error","error":{"type","message"},"request_id"}`:
//!
//! 1. **key**: `x-api-key` must equal the configured key → else 401
//!    `authentication_error`, `"x-api-key header is required"` when absent,
//!    `"invalid x-api-key"` when wrong (what the real API says). An
//!    `Authorization` header is not a substitute (it is only recorded);
//! 2. **version**: an `anthropic-version` header is required → else 400
//!    `invalid_request_error` `"anthropic-version: header is required"`;
//! 3. **body**: JSON object; `anthropic_version` in the body (the Vertex
//!    form) → 400 `"anthropic_version: Extra inputs are not permitted"`;
//!    `stream`, if present, a boolean; `model` present and a string → else
//!    400;
//! 4. **model**: configured in the Anthropic section → else 404
//!    `not_found_error` `"model: <id>"`. From here on every answer also
//!    carries the `anthropic-ratelimit-*` headers of that model;
//! 5. **validation**: `max_tokens` (integer >= 1) and `messages`, as on
//!    Vertex ([`crate::server`]) → else 400;
//! 6. **pre-limit faults** (below);
//! 7. **rate limits**: the model's token buckets ([`crate::ratelimit`]):
//!    1 request, the counted input tokens and `max_tokens` output tokens →
//!    else 429 `rate_limit_error` naming the dimension, with `retry-after`;
//! 8. **answer**: the Message, or the stream (message_start,
//!    content_block_start, ping, content_block_delta…, content_block_stop,
//!    message_delta, message_stop, without Vertex's quirks: see
//!    [`crate::sse::Flavor::FirstParty`]); when it ends, the unused part of
//!    `max_tokens` goes back to the OTPM bucket.
//!
//! Usage follows the Vertex surface's rules exactly: the deterministic
//! tokenizer, `SIM_OUTPUT_TOKENS=`, `SIM_CACHE_READ=`/`SIM_CACHE_WRITE=`
//! (or the real prefix cache, kept apart from every Vertex location's),
//! the default answer length ([`crate::message`]). The model id is echoed
//! exactly as sent.
//!
//! ## Headers
//!
//! For each enforced limit: `anthropic-ratelimit-{requests,input-tokens,
//! output-tokens}-{limit,remaining,reset}`, plus `anthropic-ratelimit-tokens-*`
//! copying whichever of input and output has the smaller remaining level
//! (input on a tie). `remaining` is the level right after this request's
//! debit (unchanged on a refusal), rounded down; for token dimensions it is
//! then rounded to the nearest thousand, as Anthropic does (requests stay
//! exact). `reset` is the RFC 3339 UTC time (whole seconds, rounded up) at
//! which the bucket will be full again: the wall clock plus the time to
//! full. A limit that is not enforced has no headers. 429s add
//! `retry-after` (whole seconds, rounded up).
//!
//! ## Faults
//!
//! The fault table ([`crate::faults`]) targets this surface through the
//! pseudo-region [`ANTHROPIC_REGION`] (`"anthropic"`), optionally with an
//! Anthropic model id: `Fault::anthropic(FaultKind::Status(529))`, or over
//! HTTP `{"region":"anthropic","model":"claude-sonnet-4-5","kind":...}`.
//! Kinds act as on Vertex, rendered Anthropic's way:
//!
//! | kind | answer |
//! |---|---|
//! | `Status(529)`, `Capacity` | 529 `overloaded_error` `"Overloaded"`, no `retry-after` |
//! | `Status(500)` (and any other 5xx but 504) | 500-class `api_error` `"Internal server error"` |
//! | `Status(504)` | `timeout_error` |
//! | `Status(429)` | 429 `rate_limit_error` (requests message), `retry-after: 1`, nothing debited |
//! | `Status(4xx)` | the matching Anthropic type (400 `invalid_request_error`, 401 `authentication_error`, 403 `permission_error`, 404 `not_found_error`, 413 `request_too_large`) |
//! | `Hang`, `Reset`, `Delay` | as on Vertex |
//! | `DropMidStream`, `ErrorMidStream` | streams: connection dropped, or `event: error` `overloaded_error`, after N events |
//!
//! Pre-limit faults (`Status`, `Capacity`, `Hang`, `Reset`) debit nothing.
//! count_tokens only takes faults aimed at model `count-tokens` (status
//! faults), as on Vertex.
//!
//! ## What tests can see
//!
//! * the full log of every `/v1/messages` request and limit change
//!   ([`crate::ratelimit::AnthropicLog`]), replayable with
//!   [`crate::ratelimit::replay_admissions`];
//! * the last [`RECORDED_ANTHROPIC_REQUESTS`] requests in full
//!   ([`AnthropicRequest`]), including count_tokens calls;
//! * counters per model and in total ([`AnthropicCounters`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::config::AnthropicConfig;
use crate::faults::{lock, FaultGroup, FaultKind};
use crate::message::{self, InputUsage};
use crate::ratelimit::{
    rfc3339_ceil, round_thousands, AnthropicLimits, AnthropicLog, AnthropicLogEntry, LimitChange,
    LimiterSnapshot, ModelLimiter, RateLimitDimension, ANTHROPIC_LOG_LEN,
};
use crate::recorder::MAX_RECORDED_BODY;
use crate::server::{
    hang, not_found, reset_response, sleep, validate_max_tokens, validate_messages,
};
use crate::sse::{self, StreamPlan};
use crate::state::SharedState;
use crate::tokenizer::count_tokens;

/// The pseudo-region that aims a fault at the first-party surface (and
/// keys its prompt cache). No Vertex location has this name.
pub const ANTHROPIC_REGION: &str = "anthropic";
/// How many full requests the first-party ring keeps.
pub const RECORDED_ANTHROPIC_REQUESTS: usize = 256;

/// One first-party request as the simulator received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnthropicRequest {
    /// The `request-id` it was answered with.
    pub request_id: String,
    /// `/v1/messages` or `/v1/messages/count_tokens`.
    pub path: String,
    /// Whether the query had `beta=true`.
    pub beta: bool,
    /// The body's `model`, if it named one.
    pub model: Option<String>,
    /// Whether the body asked for a stream.
    pub stream: bool,
    /// HTTP status answered (0: reset; 499: the client left first).
    pub status: u16,
    /// Whether an `x-api-key` header was present.
    pub has_x_api_key: bool,
    /// Whether it equalled the configured key.
    pub x_api_key_valid: bool,
    /// The `anthropic-version` header.
    pub anthropic_version: Option<String>,
    /// The `anthropic-beta` header.
    pub anthropic_beta: Option<String>,
    /// Whether an `Authorization` header was present.
    pub has_authorization: bool,
    /// Body length in bytes.
    pub body_len: usize,
    /// The parsed body (`None` if not JSON or larger than [`MAX_RECORDED_BODY`]).
    pub body: Option<Value>,
}

/// What the first-party surface saw and served, per model or in total.
///
/// `requests` counts every `/v1/messages` request (any outcome; per model
/// once the body named a configured model); `succeeded`: unary 200s and
/// streams that reached `message_stop`; `rate_limited`: every 429 (bucket
/// refusals, split by dimension in `rate_limited_*`, and injected ones);
/// `overloaded`: 529s; `errors`: every other error status; `resets`:
/// connections closed by a `Reset` fault; token figures: usage of admitted
/// requests (`output_tokens`: served); `count_tokens_requests`: calls to
/// count_tokens (any outcome), which count nowhere else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnthropicCounters {
    /// `/v1/messages` requests received.
    pub requests: u64,
    /// Answered successfully.
    pub succeeded: u64,
    /// 429s of any origin.
    pub rate_limited: u64,
    /// Refused by the RPM bucket.
    pub rate_limited_requests: u64,
    /// Refused by the ITPM bucket.
    pub rate_limited_input_tokens: u64,
    /// Refused by the OTPM bucket.
    pub rate_limited_output_tokens: u64,
    /// 529s.
    pub overloaded: u64,
    /// Other error answers by HTTP status.
    pub errors: BTreeMap<u16, u64>,
    /// Connections reset without an answer.
    pub resets: u64,
    /// `usage.input_tokens` of admitted requests.
    pub input_tokens: u64,
    /// `usage.cache_read_input_tokens` of admitted requests.
    pub cache_read_input_tokens: u64,
    /// `usage.cache_creation_input_tokens` of admitted requests.
    pub cache_creation_input_tokens: u64,
    /// Output tokens served.
    pub output_tokens: u64,
    /// Streams started.
    pub streams_started: u64,
    /// Streams that reached `message_stop`.
    pub streams_completed: u64,
    /// count_tokens calls.
    pub count_tokens_requests: u64,
}

impl AnthropicCounters {
    fn record_status(&mut self, status: u16, rejected: Option<RateLimitDimension>) {
        match status {
            200 | 499 => {}
            0 => self.resets += 1,
            429 => {
                self.rate_limited += 1;
                match rejected {
                    Some(RateLimitDimension::Requests) => self.rate_limited_requests += 1,
                    Some(RateLimitDimension::InputTokens) => self.rate_limited_input_tokens += 1,
                    Some(RateLimitDimension::OutputTokens) => self.rate_limited_output_tokens += 1,
                    None => {}
                }
            }
            529 => self.overloaded += 1,
            s => *self.errors.entry(s).or_insert(0) += 1,
        }
    }

    fn add_input(&mut self, input: InputUsage) {
        self.input_tokens += input.input_tokens;
        self.cache_read_input_tokens += input.cache_read_input_tokens;
        self.cache_creation_input_tokens += input.cache_creation_input_tokens;
    }
}

/// One configured model.
#[derive(Debug)]
pub(crate) struct Slot {
    id: Arc<str>,
    cache_reads_count: bool,
    limiter: Mutex<ModelLimiter>,
}

#[derive(Debug)]
struct LogStore {
    epoch: Instant,
    /// Bumped by a reset, so answers that end after it do not touch the
    /// new run's buckets or log.
    generation: u64,
    next_seq: u64,
    entries: Vec<AnthropicLogEntry>,
    limit_changes: Vec<LimitChange>,
    dropped: u64,
}

impl LogStore {
    fn at_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn push_change(&mut self, now: Instant, model: &str, limits: AnthropicLimits) {
        let seq = self.seq();
        if self.limit_changes.len() >= ANTHROPIC_LOG_LEN {
            self.dropped += 1;
            return;
        }
        let at_ns = self.at_ns(now);
        self.limit_changes.push(LimitChange {
            seq,
            at_ns,
            model: model.to_owned(),
            limits,
        });
    }

    /// Appends `entry` (filling `seq` and `at_ns`); its index, unless full.
    fn push_entry(&mut self, now: Instant, mut entry: AnthropicLogEntry) -> Option<usize> {
        entry.seq = self.seq();
        entry.at_ns = self.at_ns(now);
        if self.entries.len() >= ANTHROPIC_LOG_LEN || self.dropped > 0 {
            // Once anything is dropped the log stays a clean prefix.
            self.dropped += 1;
            return None;
        }
        self.entries.push(entry);
        Some(self.entries.len() - 1)
    }
}

/// Identifies an admission whose unused output tokens are still owed.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    generation: u64,
    index: Option<usize>,
    reserved: u64,
}

/// The first-party surface's state (one per simulator, if configured).
#[derive(Debug)]
pub(crate) struct Surface {
    api_key: String,
    period: Duration,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    log: Mutex<LogStore>,
    counters: Mutex<(AnthropicCounters, BTreeMap<String, AnthropicCounters>)>,
    ring: Mutex<VecDeque<AnthropicRequest>>,
    next_request: AtomicU64,
}

impl Surface {
    pub(crate) fn new(config: &AnthropicConfig, period: Duration) -> Self {
        let now = Instant::now();
        let mut slots = BTreeMap::new();
        let mut log = LogStore {
            epoch: now,
            generation: 0,
            next_seq: 0,
            entries: Vec::new(),
            limit_changes: Vec::new(),
            dropped: 0,
        };
        for m in &config.models {
            slots.insert(
                m.id.clone(),
                Arc::new(Slot {
                    id: Arc::from(m.id.as_str()),
                    cache_reads_count: m.counts_cache_reads(),
                    limiter: Mutex::new(ModelLimiter::new(m.limits(), period, now)),
                }),
            );
            log.push_change(now, &m.id, m.limits());
        }
        Surface {
            api_key: config.api_key.clone(),
            period,
            slots: RwLock::new(slots),
            log: Mutex::new(log),
            counters: Mutex::default(),
            ring: Mutex::default(),
            next_request: AtomicU64::new(0),
        }
    }

    pub(crate) fn api_key(&self) -> &str {
        &self.api_key
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, model: &str) -> Option<Arc<Slot>> {
        self.read_slots().get(model).cloned()
    }

    /// `req_01` + 13 random alphanumerics + a 9-digit counter: unique in a
    /// run, and unlikely to repeat across simulators.
    fn request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(28);
        id.push_str("req_01");
        Alphanumeric.append_string(&mut rand::rng(), &mut id, 13);
        id.push_str(&format!("{:09}", n % 1_000_000_000));
        id
    }

    /// Runs the buckets for an admission, and logs the decision under the
    /// model's lock (so the log is in time order per model).
    fn admit(
        &self,
        slot: &Slot,
        mut entry: AnthropicLogEntry,
        input: u64,
        max_tokens: u64,
    ) -> Result<(Ticket, LimiterSnapshot), (crate::ratelimit::Refusal, LimiterSnapshot)> {
        let mut limiter = lock(&slot.limiter);
        let now = Instant::now();
        let decision = limiter.try_admit(now, input, max_tokens);
        let snap = limiter.snapshot(now);
        entry.levels = Some(snap.levels());
        let mut log = lock(&self.log);
        match decision {
            Ok(()) => {
                entry.status = 200;
                entry.admitted = true;
                entry.input_tokens = input;
                entry.output_reserved = max_tokens;
                let index = log.push_entry(now, entry);
                let ticket = Ticket {
                    generation: log.generation,
                    index,
                    reserved: max_tokens,
                };
                Ok((ticket, snap))
            }
            Err(refusal) => {
                entry.status = 429;
                entry.rejected = Some(refusal.dimension);
                log.push_entry(now, entry);
                Err((refusal, snap))
            }
        }
    }

    /// Logs a request that was not put to the buckets; the levels it
    /// records (and returns, for the headers) are taken under the lock.
    fn log_other(
        &self,
        slot: Option<&Slot>,
        mut entry: AnthropicLogEntry,
    ) -> Option<LimiterSnapshot> {
        match slot {
            Some(slot) => {
                let mut limiter = lock(&slot.limiter);
                let now = Instant::now();
                let snap = limiter.snapshot(now);
                entry.levels = Some(snap.levels());
                lock(&self.log).push_entry(now, entry);
                Some(snap)
            }
            None => {
                lock(&self.log).push_entry(Instant::now(), entry);
                None
            }
        }
    }

    /// The answer of an admitted request ended with `actual` output
    /// tokens: credits back the rest of its reservation.
    fn finish(&self, slot: &Slot, ticket: Ticket, actual: u64) {
        let mut limiter = lock(&slot.limiter);
        let now = Instant::now();
        let mut log = lock(&self.log);
        if log.generation != ticket.generation {
            return;
        }
        let actual = actual.min(ticket.reserved);
        limiter.credit_output(now, ticket.reserved - actual);
        let seq = log.seq();
        let at_ns = log.at_ns(now);
        if let Some(e) = ticket.index.and_then(|i| log.entries.get_mut(i)) {
            e.output_actual = Some(actual);
            e.finished_seq = Some(seq);
            e.finished_ns = Some(at_ns);
        }
    }

    fn count(&self, model: Option<&str>, f: impl Fn(&mut AnthropicCounters)) {
        let mut c = lock(&self.counters);
        f(&mut c.0);
        if let Some(m) = model {
            f(c.1.entry(m.to_owned()).or_default());
        }
    }

    fn record(&self, r: AnthropicRequest) {
        let evicted = {
            let mut ring = lock(&self.ring);
            let e = (ring.len() >= RECORDED_ANTHROPIC_REQUESTS)
                .then(|| ring.pop_front())
                .flatten();
            ring.push_back(r);
            e
        };
        drop(evicted);
    }

    pub(crate) fn counters(&self, model: &str) -> AnthropicCounters {
        lock(&self.counters)
            .1
            .get(model)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn total_counters(&self) -> AnthropicCounters {
        lock(&self.counters).0.clone()
    }

    pub(crate) fn all_counters(&self) -> (AnthropicCounters, BTreeMap<String, AnthropicCounters>) {
        lock(&self.counters).clone()
    }

    pub(crate) fn recent(&self) -> Vec<AnthropicRequest> {
        lock(&self.ring).iter().cloned().collect()
    }

    pub(crate) fn log(&self) -> AnthropicLog {
        let log = lock(&self.log);
        AnthropicLog {
            period_ns: crate::ratelimit::period_nanos(self.period),
            complete: log.dropped == 0,
            dropped: log.dropped,
            limit_changes: log.limit_changes.clone(),
            entries: log.entries.clone(),
        }
    }

    /// Current limits and levels of every model.
    pub(crate) fn levels(&self) -> BTreeMap<String, (AnthropicLimits, LimiterSnapshot)> {
        let slots: Vec<Arc<Slot>> = self.read_slots().values().cloned().collect();
        slots
            .iter()
            .map(|s| {
                let mut l = lock(&s.limiter);
                (s.id.to_string(), (l.limits(), l.snapshot(Instant::now())))
            })
            .collect()
    }

    pub(crate) fn model_levels(&self, model: &str) -> Option<(AnthropicLimits, LimiterSnapshot)> {
        let slot = self.slot(model)?;
        let mut l = lock(&slot.limiter);
        Some((l.limits(), l.snapshot(Instant::now())))
    }

    /// Sets a model's limits (offering it, with the default cache rule and
    /// full buckets, if it was not configured) and logs the change.
    pub(crate) fn set_limits(&self, model: &str, limits: AnthropicLimits) {
        let slot = match self.slot(model) {
            Some(s) => s,
            None => {
                let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
                slots
                    .entry(model.to_owned())
                    .or_insert_with(|| {
                        Arc::new(Slot {
                            id: Arc::from(model),
                            cache_reads_count: crate::config::default_cache_reads_count(model),
                            limiter: Mutex::new(ModelLimiter::new(
                                AnthropicLimits::default(),
                                self.period,
                                Instant::now(),
                            )),
                        })
                    })
                    .clone()
            }
        };
        let mut limiter = lock(&slot.limiter);
        let now = Instant::now();
        limiter.set_limits(limits, now);
        lock(&self.log).push_change(now, model, limiter.limits());
    }

    /// Refills every bucket, starts a new log (with the limits in force),
    /// clears counters and the ring. Limits and the key stay.
    pub(crate) fn reset(&self) {
        let slots: Vec<Arc<Slot>> = self.read_slots().values().cloned().collect();
        // Lock order is always slot, then log; every slot is held so no
        // request slips in between the buckets' reset and the log's.
        let mut guards: Vec<_> = slots.iter().map(|s| lock(&s.limiter)).collect();
        let now = Instant::now();
        let mut log = lock(&self.log);
        let generation = log.generation + 1;
        *log = LogStore {
            epoch: now,
            generation,
            next_seq: 0,
            entries: Vec::new(),
            limit_changes: Vec::new(),
            dropped: 0,
        };
        for (s, g) in slots.iter().zip(guards.iter_mut()) {
            g.refill_completely(now);
            log.push_change(now, &s.id, g.limits());
        }
        drop(log);
        drop(guards);
        *lock(&self.counters) = Default::default();
        lock(&self.ring).clear();
    }
}

/// Which route a call is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Messages,
    CountTokens,
}

/// One call in flight. Dropping it records the request (ring, counters,
/// and, for `/v1/messages`, the log if the decision was not logged yet:
/// a client that left during a `Hang` is logged as 499).
struct Call {
    sur: Arc<Surface>,
    route: Route,
    rec: AnthropicRequest,
    slot: Option<Arc<Slot>>,
    logged: bool,
    rejected: Option<RateLimitDimension>,
}

impl Call {
    fn entry(&self) -> AnthropicLogEntry {
        AnthropicLogEntry {
            seq: 0,
            at_ns: 0,
            request_id: self.rec.request_id.clone(),
            model: self.rec.model.clone(),
            stream: self.rec.stream,
            status: self.rec.status,
            admitted: false,
            rejected: None,
            input_tokens: 0,
            output_reserved: 0,
            output_actual: None,
            finished_seq: None,
            finished_ns: None,
            levels: None,
        }
    }

    /// Sets the final status of a request that was not put to the buckets,
    /// logs it, and returns the headers' snapshot (if the model is known).
    fn decide(&mut self, status: u16) -> Option<LimiterSnapshot> {
        self.rec.status = status;
        if self.route != Route::Messages || self.logged {
            return None;
        }
        self.logged = true;
        let entry = self.entry();
        self.sur.log_other(self.slot.as_deref(), entry)
    }

    fn model(&self) -> Option<&str> {
        self.slot.as_ref().map(|s| &*s.id)
    }

    /// Answers with an Anthropic error.
    fn fail(&mut self, e: ApiError) -> Response {
        let snap = self.decide(e.status);
        e.into_response(&self.rec.request_id, snap.as_ref())
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.logged {
            self.decide(499);
        }
        let status = self.rec.status;
        let rejected = self.rejected;
        let model = self.model().map(str::to_owned);
        match self.route {
            Route::Messages => self.sur.count(model.as_deref(), |c| {
                c.requests += 1;
                c.record_status(status, rejected);
            }),
            Route::CountTokens => self.sur.count(model.as_deref(), |c| {
                c.count_tokens_requests += 1;
            }),
        }
        let rec = AnthropicRequest {
            body: self.rec.body.take(),
            ..self.rec.clone()
        };
        self.sur.record(rec);
    }
}

/// Gives back the unused part of an admission's `max_tokens` when the
/// answer ends, or, if it is dropped first (client gone), as if the answer
/// had been produced in full.
struct Reservation {
    sur: Arc<Surface>,
    slot: Arc<Slot>,
    ticket: Option<Ticket>,
    planned: u64,
}

impl Reservation {
    fn finish(&mut self, actual: u64) {
        if let Some(t) = self.ticket.take() {
            self.sur.finish(&self.slot, t, actual);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let planned = self.planned;
        self.finish(planned);
    }
}

/// An Anthropic-shaped error answer.
#[derive(Debug, Clone)]
struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    fn from_sim(e: crate::errors::SimError) -> Self {
        match e {
            crate::errors::SimError::Anthropic {
                code,
                kind,
                message,
            } => Self::new(code, kind, message),
            crate::errors::SimError::Google { code, message, .. } => {
                Self::new(code, "invalid_request_error", message)
            }
        }
    }

    /// The answer for an injected `Status(code)` fault (see the module docs).
    fn for_status(code: u16) -> Self {
        match code {
            400 => Self::invalid("Injected invalid request"),
            401 => Self::new(401, "authentication_error", "invalid x-api-key"),
            403 => Self::new(
                403,
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            ),
            404 => Self::new(404, "not_found_error", "Not found"),
            413 => Self::new(
                413,
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
            ),
            429 => ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..Self::new(
                    429,
                    "rate_limit_error",
                    RateLimitDimension::Requests.message(),
                )
            },
            529 => Self::overloaded(),
            504 => Self::new(504, "timeout_error", "Request timed out"),
            c if c >= 500 => Self::new(c, "api_error", "Internal server error"),
            c => Self::new(c, "invalid_request_error", "Injected error"),
        }
    }

    fn overloaded() -> Self {
        Self::new(529, "overloaded_error", "Overloaded")
    }

    fn body(&self, request_id: &str) -> String {
        #[derive(Serialize)]
        struct Inner<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            error: Inner<'a>,
            request_id: &'a str,
        }
        serde_json::to_string(&Outer {
            kind: "error",
            error: Inner {
                kind: self.kind,
                message: &self.message,
            },
            request_id,
        })
        .unwrap_or_default()
    }

    fn into_response(self, request_id: &str, snap: Option<&LimiterSnapshot>) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut h = base_headers(request_id, "application/json", snap);
        if let Some(d) = self.retry_after {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        (status, h, self.body(request_id)).into_response()
    }
}

fn base_headers(
    request_id: &str,
    content_type: &'static str,
    snap: Option<&LimiterSnapshot>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(HeaderName::from_static("request-id"), v);
    }
    if let Some(s) = snap {
        ratelimit_headers(&mut h, s, SystemTime::now());
    }
    h
}

/// Adds the `anthropic-ratelimit-*` headers of `snap` (module docs).
fn ratelimit_headers(h: &mut HeaderMap, snap: &LimiterSnapshot, wall: SystemTime) {
    let mut put = |dim: &str, limit: u64, remaining: u64, to_full: Duration| {
        let reset = rfc3339_ceil(wall + to_full);
        for (suffix, value) in [
            ("limit", HeaderValue::from(limit)),
            ("remaining", HeaderValue::from(remaining)),
            (
                "reset",
                HeaderValue::from_str(&reset).unwrap_or(HeaderValue::from_static("")),
            ),
        ] {
            if let Ok(name) = HeaderName::try_from(format!("anthropic-ratelimit-{dim}-{suffix}")) {
                h.insert(name, value);
            }
        }
    };
    for d in RateLimitDimension::ALL {
        if let Some(s) = snap.get(d) {
            let remaining = match d {
                RateLimitDimension::Requests => s.remaining,
                _ => round_thousands(s.remaining),
            };
            put(d.header_name(), s.limit, remaining, s.time_to_full);
        }
    }
    let tightest = match (snap.input_tokens, snap.output_tokens) {
        (Some(i), Some(o)) => Some(if o.remaining < i.remaining { o } else { i }),
        (i, o) => i.or(o),
    };
    if let Some(s) = tightest {
        put(
            "tokens",
            s.limit,
            round_thousands(s.remaining),
            s.time_to_full,
        );
    }
}

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn start_call(
    sur: &Arc<Surface>,
    route: Route,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Call {
    let key = headers.get("x-api-key");
    let beta = query.is_some_and(|q| q.split('&').any(|kv| kv == "beta=true"));
    Call {
        sur: sur.clone(),
        route,
        rec: AnthropicRequest {
            request_id: sur.request_id(),
            path: match route {
                Route::Messages => "/v1/messages".into(),
                Route::CountTokens => "/v1/messages/count_tokens".into(),
            },
            beta,
            model: None,
            stream: false,
            status: 499,
            has_x_api_key: key.is_some(),
            x_api_key_valid: key.is_some_and(|k| k.as_bytes() == sur.api_key.as_bytes()),
            anthropic_version: header_string(headers, "anthropic-version"),
            anthropic_beta: header_string(headers, "anthropic-beta"),
            has_authorization: headers.contains_key(header::AUTHORIZATION),
            body_len: body.len(),
            body: None,
        },
        slot: None,
        logged: false,
        rejected: None,
    }
}

/// Steps 1 to 5 shared by both routes: key, version, body, model. Returns
/// the parsed body object.
fn check_request(call: &mut Call, body: &Bytes) -> Result<Value, ApiError> {
    if !call.rec.has_x_api_key {
        return Err(ApiError::new(
            401,
            "authentication_error",
            "x-api-key header is required",
        ));
    }
    if !call.rec.x_api_key_valid {
        return Err(ApiError::new(
            401,
            "authentication_error",
            "invalid x-api-key",
        ));
    }
    if call.rec.anthropic_version.is_none() {
        return Err(ApiError::invalid("anthropic-version: header is required"));
    }
    let json = serde_json::from_slice::<Value>(body)
        .map_err(|e| ApiError::invalid(format!("Invalid JSON in request body: {e}")))?;
    if body.len() <= MAX_RECORDED_BODY {
        call.rec.body = Some(json.clone());
    }
    let Some(obj) = json.as_object() else {
        return Err(ApiError::invalid(
            "Input should be a valid dictionary or object to extract fields from",
        ));
    };
    if obj.contains_key("anthropic_version") {
        return Err(ApiError::invalid(
            "anthropic_version: Extra inputs are not permitted",
        ));
    }
    if call.route == Route::Messages {
        match obj.get("stream") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => call.rec.stream = *b,
            Some(_) => return Err(ApiError::invalid("stream: Input should be a valid boolean")),
        }
    }
    let model = match obj.get("model") {
        None => return Err(ApiError::invalid("model: Field required")),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("model: Input should be a valid string")),
    };
    call.rec.model = Some(model.clone());
    let Some(slot) = call.sur.slot(&model) else {
        return Err(ApiError::new(
            404,
            "not_found_error",
            format!("model: {model}"),
        ));
    };
    call.slot = Some(slot);
    validate_messages(obj.get("messages")).map_err(ApiError::from_sim)?;
    Ok(json)
}

/// `POST /v1/messages` (see the module docs).
pub(crate) async fn messages_route(
    State(st): State<SharedState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(sur) = st.anthropic.clone() else {
        return not_found().await;
    };
    let mut call = start_call(&sur, Route::Messages, query.as_deref(), &headers, &body);
    let json = match check_request(&mut call, &body) {
        Ok(j) => j,
        Err(e) => return call.fail(e),
    };
    let Some(slot) = call.slot.clone() else {
        return call.fail(ApiError::new(500, "api_error", "Internal server error"));
    };
    let max_tokens = match validate_max_tokens(json.get("max_tokens")) {
        Ok(m) => m,
        Err(e) => return call.fail(ApiError::from_sim(e)),
    };
    let model = slot.id.clone();
    let stream = call.rec.stream;

    // Usage, by the Vertex surface's rules.
    let total = count_tokens(&json);
    let dictated = ["SIM_CACHE_READ=", "SIM_CACHE_WRITE="]
        .iter()
        .any(|k| message::directive(&json, k).is_some());
    let cached = (!dictated).then(|| {
        let prefixes = crate::tokenizer::cache_prefixes(&json);
        st.cache.lookup(ANTHROPIC_REGION, &model, &prefixes, total)
    });
    let input = match &cached {
        Some(lookup) => lookup.usage,
        None => message::plan_input(&json, total),
    };
    let counted = input.counted(slot.cache_reads_count);
    let default_out = st.default_output_tokens.load(Ordering::Relaxed);
    let out = message::plan_output(&json, max_tokens, default_out);
    drop(json);

    // Faults that act before the limits.
    match st
        .faults
        .take(ANTHROPIC_REGION, &model, FaultGroup::PreQuota)
    {
        Some(FaultKind::Status(code)) => return call.fail(ApiError::for_status(code)),
        Some(FaultKind::Capacity) => return call.fail(ApiError::overloaded()),
        Some(FaultKind::Reset) => {
            call.decide(0);
            return reset_response();
        }
        Some(FaultKind::Hang(d)) if !st.shutting_down.load(Ordering::Relaxed) => {
            hang(&st, d).await;
        }
        _ => {}
    }

    // The buckets.
    call.logged = true;
    let entry = call.entry();
    let (ticket, snap) = match sur.admit(&slot, entry, counted, max_tokens) {
        Ok(ok) => ok,
        Err((refusal, snap)) => {
            call.rec.status = 429;
            call.rejected = Some(refusal.dimension);
            let e = ApiError {
                retry_after: Some(refusal.retry_after),
                ..ApiError::new(429, "rate_limit_error", refusal.dimension.message())
            };
            return e.into_response(&call.rec.request_id, Some(&snap));
        }
    };
    call.rec.status = 200;
    if let Some(lookup) = &cached {
        st.cache.admitted(ANTHROPIC_REGION, &model, lookup);
    }
    let mut reservation = Reservation {
        sur: sur.clone(),
        slot: slot.clone(),
        ticket: Some(ticket),
        planned: out.tokens,
    };

    // The answer.
    let (drop_after, error_after) = if stream {
        match st.faults.take(ANTHROPIC_REGION, &model, FaultGroup::Drop) {
            Some(FaultKind::DropMidStream { after_events }) => (Some(after_events), None),
            Some(FaultKind::ErrorMidStream { after_events }) => (None, Some(after_events)),
            _ => (None, None),
        }
    } else {
        (None, None)
    };
    let (first_token, per_token) = match st.faults.take(ANTHROPIC_REGION, &model, FaultGroup::Delay)
    {
        Some(FaultKind::Delay {
            first_token,
            per_token,
        }) => (first_token, per_token),
        _ => (Duration::ZERO, Duration::ZERO),
    };
    let request_id = call.rec.request_id.clone();
    drop(call);

    if !stream {
        let per_all = u32::try_from(out.tokens)
            .ok()
            .and_then(|n| per_token.checked_mul(n))
            .unwrap_or(Duration::MAX);
        sleep(first_token.saturating_add(per_all)).await;
        sur.count(Some(&model), |c| {
            c.succeeded += 1;
            c.add_input(input);
            c.output_tokens += out.tokens;
        });
        reservation.finish(out.tokens);
        let bytes = message::first_party_message_json(&model, input, out);
        let h = base_headers(&request_id, "application/json", Some(&snap));
        return (StatusCode::OK, h, bytes).into_response();
    }

    sur.count(Some(&model), |c| {
        c.add_input(input);
        c.streams_started += 1;
    });
    let plan = StreamPlan {
        model: model.to_string(),
        input_tokens: input.input_tokens,
        cache_creation_input_tokens: input.cache_creation_input_tokens,
        cache_read_input_tokens: input.cache_read_input_tokens,
        cache_creation_1h_input_tokens: input.cache_creation_1h_input_tokens,
        output_tokens: out.tokens,
        stop_reason: out.stop_reason,
        emit_vertex_event: false,
        first_token_delay: first_token,
        per_token_delay: per_token,
        drop_after_events: drop_after,
        error_after_events: error_after,
        flavor: sse::Flavor::FirstParty,
    };
    let counting = sur.clone();
    let events = sse::event_stream(plan, move |outcome| {
        counting.count(Some(&model), |c| {
            c.output_tokens += outcome.tokens_sent;
            if outcome.completed {
                c.succeeded += 1;
                c.streams_completed += 1;
            }
        });
        reservation.finish(outcome.tokens_sent);
    });
    let h = base_headers(&request_id, "text/event-stream; charset=utf-8", Some(&snap));
    (StatusCode::OK, h, Body::from_stream(events)).into_response()
}

/// `POST /v1/messages/count_tokens`: same checks as Messages (key,
/// version, body, model), never rate limited; `{"input_tokens":N}`.
pub(crate) async fn count_tokens_route(
    State(st): State<SharedState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(sur) = st.anthropic.clone() else {
        return not_found().await;
    };
    let mut call = start_call(&sur, Route::CountTokens, query.as_deref(), &headers, &body);
    let json = match check_request(&mut call, &body) {
        Ok(j) => j,
        Err(e) => return call.fail(e),
    };
    if let Some(FaultKind::Status(code)) =
        st.faults
            .take_named(ANTHROPIC_REGION, "count-tokens", FaultGroup::PreQuota)
    {
        return call.fail(ApiError::for_status(code));
    }
    let n = count_tokens(&json);
    call.decide(200);
    let h = base_headers(&call.rec.request_id, "application/json", None);
    (StatusCode::OK, h, format!("{{\"input_tokens\":{n}}}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::DimensionState;

    #[test]
    fn headers_round_tokens_and_pick_the_tighter_dimension() {
        let snap = LimiterSnapshot {
            requests: Some(DimensionState {
                limit: 50,
                remaining: 49,
                time_to_full: Duration::from_millis(1200),
            }),
            input_tokens: Some(DimensionState {
                limit: 30_000,
                remaining: 29_499,
                time_to_full: Duration::from_secs(1),
            }),
            output_tokens: Some(DimensionState {
                limit: 8_000,
                remaining: 7_500,
                time_to_full: Duration::from_secs(30),
            }),
        };
        let mut h = HeaderMap::new();
        let wall = std::time::UNIX_EPOCH + Duration::from_secs(1_796_346_123);
        ratelimit_headers(&mut h, &snap, wall);
        let g = |n: &str| h.get(n).unwrap().to_str().unwrap().to_owned();
        assert_eq!(g("anthropic-ratelimit-requests-remaining"), "49");
        assert_eq!(
            g("anthropic-ratelimit-requests-reset"),
            "2026-12-04T01:02:05Z"
        );
        assert_eq!(g("anthropic-ratelimit-input-tokens-remaining"), "29000");
        assert_eq!(g("anthropic-ratelimit-output-tokens-remaining"), "8000");
        assert_eq!(g("anthropic-ratelimit-tokens-limit"), "8000");
        assert_eq!(
            g("anthropic-ratelimit-tokens-reset"),
            "2026-12-04T01:02:33Z"
        );
        let only_rpm = LimiterSnapshot {
            input_tokens: None,
            output_tokens: None,
            ..snap
        };
        let mut h = HeaderMap::new();
        ratelimit_headers(&mut h, &only_rpm, wall);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn error_body_shape() {
        let e = ApiError::overloaded();
        assert_eq!(
            e.body("req_1"),
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#
        );
        assert_eq!(ApiError::for_status(500).kind, "api_error");
        assert_eq!(ApiError::for_status(401).kind, "authentication_error");
    }
}
