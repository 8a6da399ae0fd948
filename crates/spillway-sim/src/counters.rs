//! Per-(region, model) counters: what the simulated upstream saw and served.
//!
//! Tests use these as ground truth ("the gateway sent exactly 3 requests to
//! europe-west4", "no tokens were served twice"). Definitions:
//!
//! * `requests`: every `:rawPredict`/`:streamRawPredict` request that reached
//!   the model route for this (region, model), whatever its fate (401, 404,
//!   400, faults and 429s included). count-tokens calls are counted apart in
//!   `count_tokens_requests`.
//! * `succeeded`: rawPredict answered 200; streams that sent `message_stop`.
//! * `rate_limited`: 429 answers (quota, injected, or capacity);
//!   `capacity_limited` counts the capacity ones among them (the 429s whose
//!   body names no metric).
//! * `errors`: other error statuses, keyed by HTTP status.
//! * `resets`: connections closed without an answer (`Reset` fault).
//! * `input_tokens`: `usage.input_tokens` of admitted requests (answered
//!   200): fresh input, without cache reads or writes, which are in
//!   `cache_read_input_tokens` and `cache_creation_input_tokens` (the three
//!   add up to the prompts' token counts).
//! * `output_tokens`: output tokens actually served (for an aborted stream,
//!   only the deltas that were sent).
//! * `streams_started` / `streams_completed`: 200 streams begun / finished
//!   with `message_stop`.
//!
//! Each (region, model) has its own small mutex, taken for a few
//! nanoseconds per update and never held across an `.await`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counters for one (region, model). All zero if nothing was seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelCounters {
    /// Predict requests received (any outcome).
    pub requests: u64,
    /// Requests answered successfully (streams: completed).
    pub succeeded: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// Capacity 429s (no metric), also counted in `rate_limited`.
    pub capacity_limited: u64,
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
    /// Streams started (200 sent).
    pub streams_started: u64,
    /// Streams that reached `message_stop`.
    pub streams_completed: u64,
    /// count-tokens requests naming this model.
    pub count_tokens_requests: u64,
}

impl ModelCounters {
    /// Records an error answer with HTTP status `code`.
    pub fn record_status(&mut self, code: u16) {
        if code == 429 {
            self.rate_limited += 1;
        } else {
            *self.errors.entry(code).or_insert(0) += 1;
        }
    }

    /// Total error answers (429s included, resets excluded).
    pub fn total_errors(&self) -> u64 {
        self.rate_limited + self.errors.values().sum::<u64>()
    }
}
