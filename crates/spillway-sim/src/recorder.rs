//! A ring buffer of the last [`RECORDED_REQUESTS`] Vertex API requests.
//!
//! Its purpose is to let tests assert what the gateway *sent upstream*: that
//! it never forwards a client's `x-api-key` or `anthropic-version` header,
//! that the `Authorization` header carries the gateway's Google token, that
//! `model` was removed from the body, and so on.
//!
//! Bodies up to [`MAX_RECORDED_BODY`] bytes are kept parsed; larger ones
//! (image-heavy requests) keep only their length, so 64 recorded requests
//! can never hold gigabytes.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::faults::lock;

/// How many requests the ring buffer keeps.
pub const RECORDED_REQUESTS: usize = 64;
/// Bodies larger than this are recorded without their parsed JSON.
pub const MAX_RECORDED_BODY: usize = 1 << 20;

/// One request as the simulated upstream received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// Project path segment.
    pub project: String,
    /// Region (location path segment).
    pub region: String,
    /// Model from the URL (for count-tokens: the literal `count-tokens`).
    pub model: String,
    /// `rawPredict` or `streamRawPredict`.
    pub action: String,
    /// Value of the `anthropic-version` header, if the request carried one.
    pub anthropic_version_header: Option<String>,
    /// Whether the request carried an `x-api-key` header.
    pub has_x_api_key: bool,
    /// Value of the `Authorization` header, if any.
    pub authorization: Option<String>,
    /// Value of the `anthropic-beta` header, if any.
    pub anthropic_beta: Option<String>,
    /// Body length in bytes.
    pub body_len: usize,
    /// The parsed body (`None` if not JSON or larger than [`MAX_RECORDED_BODY`]).
    pub body: Option<Value>,
    /// HTTP status answered (0 for a reset connection).
    pub status: u16,
}

impl RecordedRequest {
    /// Whether an `anthropic-version` header was present.
    pub fn has_anthropic_version_header(&self) -> bool {
        self.anthropic_version_header.is_some()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Recorder {
    ring: Mutex<VecDeque<RecordedRequest>>,
}

impl Recorder {
    pub(crate) fn push(&self, r: RecordedRequest) {
        let evicted;
        {
            let mut ring = lock(&self.ring);
            evicted = if ring.len() >= RECORDED_REQUESTS {
                ring.pop_front()
            } else {
                None
            };
            ring.push_back(r);
        }
        // Free the evicted body outside the lock.
        drop(evicted);
    }

    pub(crate) fn snapshot(&self) -> Vec<RecordedRequest> {
        lock(&self.ring).iter().cloned().collect()
    }

    pub(crate) fn clear(&self) {
        let old = std::mem::take(&mut *lock(&self.ring));
        drop(old);
    }
}
