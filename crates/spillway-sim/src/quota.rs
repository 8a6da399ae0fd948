//! Strict sliding-window quotas, one window per (region, model).
//!
//! Vertex enforces per-project, per-region, per-base-model budgets: requests
//! per minute and tokens per minute (reference §5; input and output tokens
//! are separate metrics there). Google does not document whether its window
//! is fixed or sliding, so the simulator picks the *strictest* reading, which
//! is the one a gateway must survive:
//!
//! * Each admitted request is recorded at its **arrival** time with its input
//!   and output token counts (the output count is known up front, see
//!   `SIM_OUTPUT_TOKENS` in the crate docs).
//! * On arrival, entries older than `window` are evicted. The request is
//!   rejected if `requests_in_window + 1 > requests_per_min`, or if
//!   `tokens_in_window + input + output > tokens_per_min`, or, when the split
//!   limits are set, `input_in_window + input > input_tokens_per_min` or
//!   `output_in_window + output > output_tokens_per_min`.
//! * A rejected request is **not** recorded (it does not eat budget); an
//!   admitted one is recorded in full at once.
//!
//! Time is `tokio::time::Instant`, so tests on tokio's paused clock are
//! deterministic. The window is a `VecDeque` with running sums: admission is
//! O(evicted) and allocation-free once the deque has grown.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

use crate::errors::QuotaMetric;

/// The limits of one (region, model). `None` split limits are not enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Requests per window.
    pub requests_per_min: u32,
    /// Input + output tokens per window.
    pub tokens_per_min: u64,
    /// Input tokens per window, if enforced.
    pub input_tokens_per_min: Option<u64>,
    /// Output tokens per window, if enforced.
    pub output_tokens_per_min: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Instant,
    input: u64,
    output: u64,
}

/// A strict sliding window for one (region, model).
#[derive(Debug)]
pub struct QuotaWindow {
    limits: QuotaLimits,
    entries: VecDeque<Entry>,
    input_sum: u64,
    output_sum: u64,
}

/// What is currently inside a window (after eviction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WindowUsage {
    /// Requests in the window.
    pub requests: u64,
    /// Input tokens in the window.
    pub input_tokens: u64,
    /// Output tokens in the window.
    pub output_tokens: u64,
}

impl QuotaWindow {
    /// An empty window with the given limits.
    pub fn new(limits: QuotaLimits) -> Self {
        QuotaWindow {
            limits,
            entries: VecDeque::new(),
            input_sum: 0,
            output_sum: 0,
        }
    }

    /// The current limits.
    pub fn limits(&self) -> QuotaLimits {
        self.limits
    }

    /// Replaces the limits (Google raised the quota). Usage is kept.
    pub fn set_limits(&mut self, limits: QuotaLimits) {
        self.limits = limits;
    }

    /// Forgets all usage.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.input_sum = 0;
        self.output_sum = 0;
    }

    fn evict(&mut self, now: Instant, window: Duration) {
        while let Some(front) = self.entries.front() {
            // Strictly older than `window` goes: an entry exactly `window` old still counts.
            if now.saturating_duration_since(front.at) > window {
                // Sums saturate on absurd inputs, so subtract saturating too.
                self.input_sum = self.input_sum.saturating_sub(front.input);
                self.output_sum = self.output_sum.saturating_sub(front.output);
                self.entries.pop_front();
                if self.entries.is_empty() {
                    self.input_sum = 0;
                    self.output_sum = 0;
                }
            } else {
                break;
            }
        }
    }

    /// Usage inside the window ending at `now`.
    pub fn usage(&mut self, now: Instant, window: Duration) -> WindowUsage {
        self.evict(now, window);
        WindowUsage {
            requests: self.entries.len() as u64,
            input_tokens: self.input_sum,
            output_tokens: self.output_sum,
        }
    }

    /// Admits (and records) a request of `input` + `output` tokens arriving
    /// at `now`, or says which metric it would exceed (and records nothing).
    pub fn try_admit(
        &mut self,
        now: Instant,
        window: Duration,
        input: u64,
        output: u64,
    ) -> Result<(), QuotaMetric> {
        self.evict(now, window);
        let l = self.limits;
        if self.entries.len() as u64 + 1 > u64::from(l.requests_per_min) {
            return Err(QuotaMetric::Requests);
        }
        let in_after = self.input_sum.saturating_add(input);
        let out_after = self.output_sum.saturating_add(output);
        if let Some(max) = l.input_tokens_per_min {
            if in_after > max {
                return Err(QuotaMetric::InputTokens);
            }
        }
        if let Some(max) = l.output_tokens_per_min {
            if out_after > max {
                return Err(QuotaMetric::OutputTokens);
            }
        }
        if in_after.saturating_add(out_after) > l.tokens_per_min {
            // The combined budget is reported under the input metric, which is
            // the one Vertex names most often in practice.
            return Err(QuotaMetric::InputTokens);
        }
        self.input_sum = in_after;
        self.output_sum = out_after;
        self.entries.push_back(Entry {
            at: now,
            input,
            output,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    fn limits(rpm: u32, tpm: u64) -> QuotaLimits {
        QuotaLimits {
            requests_per_min: rpm,
            tokens_per_min: tpm,
            input_tokens_per_min: None,
            output_tokens_per_min: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_slide_not_reset() {
        let mut q = QuotaWindow::new(limits(2, 1_000_000));
        let t0 = Instant::now();
        assert!(q.try_admit(t0, W, 1, 1).is_ok());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(q.try_admit(Instant::now(), W, 1, 1).is_ok());
        assert_eq!(
            q.try_admit(Instant::now(), W, 1, 1),
            Err(QuotaMetric::Requests)
        );
        // At t0 + 60 s the first entry is exactly `window` old: still counted.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            q.try_admit(Instant::now(), W, 1, 1),
            Err(QuotaMetric::Requests)
        );
        // Just past it, one slot frees up, but only one (the t0+30 entry remains).
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(q.try_admit(Instant::now(), W, 1, 1).is_ok());
        assert_eq!(
            q.try_admit(Instant::now(), W, 1, 1),
            Err(QuotaMetric::Requests)
        );
        assert_eq!(q.usage(Instant::now(), W).requests, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_count_input_plus_output_and_rejections_are_free() {
        let mut q = QuotaWindow::new(limits(100, 100));
        let now = Instant::now();
        assert!(q.try_admit(now, W, 50, 30).is_ok());
        assert_eq!(q.try_admit(now, W, 15, 6), Err(QuotaMetric::InputTokens));
        assert!(q.try_admit(now, W, 15, 5).is_ok());
        assert_eq!(
            q.usage(now, W),
            WindowUsage {
                requests: 2,
                input_tokens: 65,
                output_tokens: 35
            }
        );
        tokio::time::advance(W + Duration::from_millis(1)).await;
        assert_eq!(q.usage(Instant::now(), W).requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn split_limits_name_their_metric() {
        let mut q = QuotaWindow::new(QuotaLimits {
            input_tokens_per_min: Some(10),
            output_tokens_per_min: Some(5),
            ..limits(100, 1_000)
        });
        let now = Instant::now();
        assert_eq!(q.try_admit(now, W, 11, 1), Err(QuotaMetric::InputTokens));
        assert_eq!(q.try_admit(now, W, 1, 6), Err(QuotaMetric::OutputTokens));
        assert!(q.try_admit(now, W, 10, 5).is_ok());
    }

    #[test]
    fn zero_quota_rejects_everything_and_huge_numbers_saturate() {
        let mut q = QuotaWindow::new(limits(0, 0));
        assert_eq!(
            q.try_admit(Instant::now(), W, 0, 0),
            Err(QuotaMetric::Requests)
        );
        let mut q = QuotaWindow::new(limits(10, u64::MAX));
        assert!(q.try_admit(Instant::now(), W, u64::MAX, 0).is_ok());
        assert!(q.try_admit(Instant::now(), W, 1, 0).is_ok());
    }
}
