//! Fault injection: make one region (optionally one model) misbehave.
//!
//! A [`Fault`] is scoped to a region and optionally a model, and lives either
//! for the next `remaining` matching requests or until cleared. Faults
//! apply to `:rawPredict` and `:streamRawPredict`, and to the first-party
//! `POST /v1/messages` through the pseudo-region `anthropic` (count-tokens
//! calls only take status faults naming the model `count-tokens`). The
//! kinds and when they act:
//!
//! | kind | effect | consumes quota? |
//! |---|---|---|
//! | `Status(503)` | Google `UNAVAILABLE` (array-wrapped on streams) | no |
//! | `Status(529)` | Anthropic `overloaded_error` | no |
//! | `Status(429)` | Vertex's request-quota 429 (metric and base model of the request's location and bucket) | no |
//! | `Capacity` | Vertex's *capacity* 429: `RESOURCE_EXHAUSTED`, `Resource exhausted. Please try again later.`, no metric | no |
//! | `Status(n)` | Google error with the canonical status for `n` | no |
//! | `Hang(d)` | waits `d` (forever if `d == Duration::MAX`, or until the faults are cleared), then answers normally | only if it then succeeds |
//! | `Reset` | the connection is closed with no response bytes at all (HTTP/1.1; an HTTP/2 client would see headers, then a reset stream) | no |
//! | `DropMidStream{after_events}` | streams only: sends that many SSE events, then kills the connection (no `message_stop`) | **yes** |
//! | `ErrorMidStream{after_events}` | streams only: sends that many SSE events, then `event: error` (`overloaded_error`) and ends the body cleanly, as Vertex does when a backend gives up mid-answer | **yes** |
//! | `Delay{first_token, per_token}` | slows a successful answer: `first_token` before the first byte of the body, `per_token` between text deltas (rawPredict waits the total) | yes (it succeeds) |
//!
//! Order in the request pipeline: auth → routing (404) → validation (400) →
//! `Hang`/`Status`/`Capacity`/`Reset` → quota → `DropMidStream` and `Delay` → answer.
//! So a faulted request never eats quota, except a mid-stream drop, which
//! only happens to admitted requests (it is picked after the quota check, so
//! a 429 does not use it up). At most one fault of each group (pre-quota,
//! drop, delay) applies to a request: the oldest matching one.
//!
//! The pseudo-region `anthropic` ([`Fault::anthropic`]) aims a fault at
//! Anthropic's first-party surface instead, where the same kinds are
//! rendered Anthropic's way (a 529 `overloaded_error`, `Capacity` as 529,
//! ...: see [`crate::anthropic`]).
//!
//! JSON form (control API `POST /_sim/faults`):
//! `{"region":"us-central1","model":null,"remaining":3,"kind":{"type":"status","status":503}}`,
//! with kinds `{"type":"hang","ms":5000}` (omit `ms` for forever),
//! `{"type":"capacity"}`, `{"type":"reset"}`, `{"type":"drop_mid_stream","after_events":4}` and
//! `{"type":"delay","first_token_ms":200,"per_token_ms":20}`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A fault scoped to a region and optionally one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Region (the `{location}` path segment) the fault applies to.
    pub region: String,
    /// Model id (Vertex form, with `@`) or `None` for every model of the region.
    #[serde(default)]
    pub model: Option<String>,
    /// What happens.
    pub kind: FaultKind,
    /// For the next N matching requests, or until cleared if `None`.
    #[serde(default)]
    pub remaining: Option<u32>,
}

impl Fault {
    /// A fault on every model of `region`, until cleared.
    pub fn region(region: impl Into<String>, kind: FaultKind) -> Self {
        Fault {
            region: region.into(),
            model: None,
            kind,
            remaining: None,
        }
    }

    /// A fault on every model of Anthropic's first-party surface
    /// (region [`crate::anthropic::ANTHROPIC_REGION`]), until cleared;
    /// `.for_model("claude-sonnet-4-5")` narrows it to one Anthropic id.
    pub fn anthropic(kind: FaultKind) -> Self {
        Self::region(crate::anthropic::ANTHROPIC_REGION, kind)
    }

    /// Restricts the fault to one model.
    pub fn for_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Limits the fault to the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
}

/// What an injected fault does (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FaultKindRepr", into = "FaultKindRepr")]
pub enum FaultKind {
    /// Answer with this HTTP status and Vertex's body for it.
    Status(u16),
    /// Answer with Vertex's capacity 429 (dynamic shared quota ran out):
    /// no metric name, unlike a quota 429.
    Capacity,
    /// Wait this long before answering normally (`Duration::MAX` = forever).
    Hang(Duration),
    /// Close the connection without sending a response.
    Reset,
    /// On streams, close the connection after this many SSE events.
    DropMidStream {
        /// SSE events sent before the connection dies.
        after_events: u32,
    },
    /// On streams, end with `event: error` (overloaded) after this many
    /// SSE events.
    ErrorMidStream {
        /// SSE events sent before the error event.
        after_events: u32,
    },
    /// Slow down a successful answer.
    Delay {
        /// Before the first byte of the body.
        first_token: Duration,
        /// Between consecutive text deltas.
        per_token: Duration,
    },
}

/// Which part of the pipeline a fault kind acts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultGroup {
    /// `Status`, `Hang`, `Reset`: before quota.
    PreQuota,
    /// `DropMidStream`: after quota, streams only.
    Drop,
    /// `Delay`: after quota.
    Delay,
}

impl FaultKind {
    pub(crate) fn group(&self) -> FaultGroup {
        match self {
            FaultKind::Status(_) | FaultKind::Capacity | FaultKind::Hang(_) | FaultKind::Reset => {
                FaultGroup::PreQuota
            }
            FaultKind::DropMidStream { .. } | FaultKind::ErrorMidStream { .. } => FaultGroup::Drop,
            FaultKind::Delay { .. } => FaultGroup::Delay,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum FaultKindRepr {
    Status {
        status: u16,
    },
    Capacity,
    Hang {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ms: Option<u64>,
    },
    Reset,
    DropMidStream {
        after_events: u32,
    },
    ErrorMidStream {
        after_events: u32,
    },
    Delay {
        #[serde(default)]
        first_token_ms: u64,
        #[serde(default)]
        per_token_ms: u64,
    },
}

impl TryFrom<FaultKindRepr> for FaultKind {
    type Error = String;
    fn try_from(r: FaultKindRepr) -> Result<Self, String> {
        Ok(match r {
            FaultKindRepr::Status { status } => {
                if !(100..=999).contains(&status) {
                    return Err(format!("invalid HTTP status {status}"));
                }
                FaultKind::Status(status)
            }
            FaultKindRepr::Hang { ms } => {
                FaultKind::Hang(ms.map_or(Duration::MAX, Duration::from_millis))
            }
            FaultKindRepr::Reset => FaultKind::Reset,
            FaultKindRepr::Capacity => FaultKind::Capacity,
            FaultKindRepr::DropMidStream { after_events } => {
                FaultKind::DropMidStream { after_events }
            }
            FaultKindRepr::ErrorMidStream { after_events } => {
                FaultKind::ErrorMidStream { after_events }
            }
            FaultKindRepr::Delay {
                first_token_ms,
                per_token_ms,
            } => FaultKind::Delay {
                first_token: Duration::from_millis(first_token_ms),
                per_token: Duration::from_millis(per_token_ms),
            },
        })
    }
}

impl From<FaultKind> for FaultKindRepr {
    fn from(k: FaultKind) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match k {
            FaultKind::Status(status) => FaultKindRepr::Status { status },
            FaultKind::Hang(d) if d == Duration::MAX => FaultKindRepr::Hang { ms: None },
            FaultKind::Hang(d) => FaultKindRepr::Hang { ms: Some(ms(d)) },
            FaultKind::Reset => FaultKindRepr::Reset,
            FaultKind::Capacity => FaultKindRepr::Capacity,
            FaultKind::DropMidStream { after_events } => {
                FaultKindRepr::DropMidStream { after_events }
            }
            FaultKind::ErrorMidStream { after_events } => {
                FaultKindRepr::ErrorMidStream { after_events }
            }
            FaultKind::Delay {
                first_token,
                per_token,
            } => FaultKindRepr::Delay {
                first_token_ms: ms(first_token),
                per_token_ms: ms(per_token),
            },
        }
    }
}

/// The active faults. Lock-free fast path when there are none.
#[derive(Debug, Default)]
pub(crate) struct FaultTable {
    len: AtomicUsize,
    faults: Mutex<Vec<Fault>>,
}

impl FaultTable {
    pub(crate) fn add(&self, fault: Fault) {
        if fault.remaining == Some(0) {
            return;
        }
        let mut f = lock(&self.faults);
        f.push(fault);
        self.len.store(f.len(), Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        let mut f = lock(&self.faults);
        f.clear();
        self.len.store(0, Ordering::Release);
    }

    pub(crate) fn list(&self) -> Vec<Fault> {
        lock(&self.faults).clone()
    }

    /// Takes (uses up one count of) the oldest fault of `group` matching
    /// `region`/`model`, if any.
    pub(crate) fn take(&self, region: &str, model: &str, group: FaultGroup) -> Option<FaultKind> {
        self.take_matching(region, group, |m| m.is_none_or(|m| m == model))
    }

    /// Takes a fault aimed at `model` by name only (never a region-wide
    /// one): how count-tokens calls, which name the pseudo-model
    /// `count-tokens`, get faults without consuming the ones meant for
    /// Messages calls.
    pub(crate) fn take_named(
        &self,
        region: &str,
        model: &str,
        group: FaultGroup,
    ) -> Option<FaultKind> {
        self.take_matching(region, group, |m| m == Some(model))
    }

    fn take_matching(
        &self,
        region: &str,
        group: FaultGroup,
        model_matches: impl Fn(Option<&str>) -> bool,
    ) -> Option<FaultKind> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut faults = lock(&self.faults);
        let idx = faults.iter().position(|f| {
            f.region == region && model_matches(f.model.as_deref()) && f.kind.group() == group
        })?;
        let kind = faults[idx].kind;
        if let Some(n) = faults[idx].remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                faults.remove(idx);
                self.len.store(faults.len(), Ordering::Release);
            }
        }
        Some(kind)
    }
}

/// Locks a mutex, ignoring poisoning (no code here panics while holding one,
/// and a poisoned simulator is still better than a panicking one).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_forms_round_trip() {
        let f: Fault = serde_json::from_str(
            r#"{"region":"us-central1","kind":{"type":"status","status":503},"remaining":2}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            Fault::region("us-central1", FaultKind::Status(503)).times(2)
        );
        for kind in [
            FaultKind::Status(529),
            FaultKind::Hang(Duration::from_millis(1500)),
            FaultKind::Hang(Duration::MAX),
            FaultKind::Reset,
            FaultKind::Capacity,
            FaultKind::DropMidStream { after_events: 3 },
            FaultKind::Delay {
                first_token: Duration::from_millis(10),
                per_token: Duration::from_millis(2),
            },
        ] {
            let s = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<FaultKind>(&s).unwrap(), kind, "{s}");
        }
        assert_eq!(
            serde_json::to_string(&FaultKind::Capacity).unwrap(),
            r#"{"type":"capacity"}"#
        );
        let hang: FaultKind = serde_json::from_str(r#"{"type":"hang"}"#).unwrap();
        assert_eq!(hang, FaultKind::Hang(Duration::MAX));
        assert!(serde_json::from_str::<FaultKind>(r#"{"type":"status","status":7}"#).is_err());
        assert!(serde_json::from_str::<FaultKind>(r#"{"type":"explode"}"#).is_err());
    }

    #[test]
    fn take_counts_down_and_scopes() {
        let t = FaultTable::default();
        t.add(
            Fault::region("r", FaultKind::Status(503))
                .for_model("m")
                .times(2),
        );
        t.add(Fault::region(
            "r",
            FaultKind::Delay {
                first_token: Duration::ZERO,
                per_token: Duration::ZERO,
            },
        ));
        assert_eq!(t.take("other", "m", FaultGroup::PreQuota), None);
        assert_eq!(t.take("r", "other", FaultGroup::PreQuota), None);
        assert_eq!(
            t.take("r", "m", FaultGroup::PreQuota),
            Some(FaultKind::Status(503))
        );
        assert_eq!(
            t.take("r", "m", FaultGroup::PreQuota),
            Some(FaultKind::Status(503))
        );
        assert_eq!(t.take("r", "m", FaultGroup::PreQuota), None);
        assert!(t.take("r", "x", FaultGroup::Delay).is_some());
        assert!(t.take("r", "x", FaultGroup::Delay).is_some());
        t.clear();
        assert!(t.take("r", "x", FaultGroup::Delay).is_none());
    }
}
