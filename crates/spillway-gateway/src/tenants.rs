//! What each tenant may do: its share of contended quota, how long its
//! requests wait by default, where its data may go, and optional caps
//! (requests and tokens per minute here; spend per day and month are
//! counted in `spend`).
//!
//! Identity comes from `auth`; this is policy. Caps use governor: per
//! tenant, across all regions, a plain "at most N per minute" is exactly
//! GCRA's job, and nothing there needs refunding. The upstream budgets,
//! which do need exact windows and refunds, live in the ledger instead.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::TenantSettings;

/// The caller, as established by the auth layer (or, for batch items, the
/// tenant that submitted them), with its policy.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: Arc<str>,
    pub policy: Arc<TenantPolicy>,
}

impl Tenant {
    /// The tenant of requests on a gateway running without client auth.
    pub fn anonymous() -> Self {
        Self {
            name: Arc::from("anonymous"),
            policy: Arc::new(TenantPolicy::default()),
        }
    }
}

/// Why a tenant cap refused a request.
#[derive(Debug, Clone, PartialEq)]
pub enum CapExceeded {
    /// Over the cap now; allowed again after this long.
    Later(Duration),
    /// Larger than the cap allows at all.
    Never { cap: u64 },
}

#[derive(Debug)]
pub struct TenantPolicy {
    pub weight: f64,
    pub max_wait: Option<Duration>,
    /// Allowed regions; empty means any.
    pub regions: Vec<String>,
    /// The configured caps, for display.
    pub requests_per_min: Option<u32>,
    pub tokens_per_min: Option<u64>,
    /// Spend caps per UTC day and month (`spend`), in nanodollars.
    pub spend_caps: spillway_core::spend::SpendCaps,
    /// The tenant lets its requests overflow to other providers (its
    /// models' `overflow`) when Vertex has no room before their deadline.
    pub allow_overflow: bool,
    requests_cap: Option<DefaultDirectRateLimiter>,
    tokens_cap: Option<(DefaultDirectRateLimiter, u64)>,
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            weight: 1.0,
            max_wait: None,
            regions: Vec::new(),
            requests_per_min: None,
            tokens_per_min: None,
            spend_caps: Default::default(),
            allow_overflow: false,
            requests_cap: None,
            tokens_cap: None,
        }
    }
}

fn per_minute(n: u64) -> Option<Quota> {
    NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).map(Quota::per_minute)
}

impl TenantPolicy {
    pub fn from_settings(t: &TenantSettings) -> Self {
        Self {
            weight: t.weight,
            max_wait: t.max_wait_ms.map(Duration::from_millis),
            regions: t.regions.clone(),
            requests_per_min: t.requests_per_min,
            tokens_per_min: t.tokens_per_min,
            spend_caps: t.spend_caps(),
            allow_overflow: t.allow_overflow,
            requests_cap: t
                .requests_per_min
                .and_then(|n| per_minute(u64::from(n)))
                .map(RateLimiter::direct),
            tokens_cap: t
                .tokens_per_min
                .and_then(|n| Some((RateLimiter::direct(per_minute(n)?), n))),
        }
    }

    /// Whether `region` is allowed for this tenant.
    pub fn allows_region(&self, region: &str) -> bool {
        self.regions.is_empty() || self.regions.iter().any(|r| r == region)
    }

    /// Whether the overflow location `location` (named after its provider)
    /// is allowed: the tenant opted in, and a tenant pinned to regions
    /// (data residency) lists the provider among them explicitly — a
    /// residency list never lets data leave for another provider silently.
    pub fn allows_overflow(&self, location: &str) -> bool {
        self.allow_overflow && self.allows_region(location)
    }

    /// Takes one request and `tokens` from the tenant's caps.
    pub fn check_caps(&self, tokens: u64) -> Result<(), CapExceeded> {
        // The limiter's own clock: a new `DefaultClock` calibrates quanta's
        // TSC source with CPUID, which traps to the hypervisor on a VM (a
        // fifth of the gateway's CPU per request, when it was made here).
        use governor::clock::Clock;
        if let Some((limiter, cap)) = &self.tokens_cap {
            // Cap the charge to u32 cells; larger requests are over any u32 cap anyway.
            let cells = NonZeroU32::new(u32::try_from(tokens.max(1)).unwrap_or(u32::MAX))
                .expect("at least one");
            match limiter.check_n(cells) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Err(CapExceeded::Later(
                        not_until.wait_time_from(limiter.clock().now()),
                    ))
                }
                Err(_) => return Err(CapExceeded::Never { cap: *cap }),
            }
        }
        if let Some(limiter) = &self.requests_cap {
            if let Err(not_until) = limiter.check() {
                return Err(CapExceeded::Later(
                    not_until.wait_time_from(limiter.clock().now()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(requests: Option<u32>, tokens: Option<u64>) -> TenantSettings {
        TenantSettings {
            key_sha256: "0".repeat(64),
            client_cert_sha256: Vec::new(),
            weight: 1.0,
            max_wait_ms: None,
            regions: vec!["europe-west4".into()],
            requests_per_min: requests,
            tokens_per_min: tokens,
            spend_cap_usd_per_day: None,
            spend_cap_usd_per_month: None,
            allow_overflow: false,
        }
    }

    #[test]
    fn request_caps_refuse_the_excess_with_a_wait() {
        let p = TenantPolicy::from_settings(&settings(Some(2), None));
        assert!(p.check_caps(10).is_ok());
        assert!(p.check_caps(10).is_ok());
        match p.check_caps(10) {
            Err(CapExceeded::Later(wait)) => {
                assert!(wait > Duration::ZERO && wait <= Duration::from_secs(30))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn token_caps_refuse_what_can_never_fit() {
        let p = TenantPolicy::from_settings(&settings(None, Some(1_000)));
        assert_eq!(p.check_caps(1_001), Err(CapExceeded::Never { cap: 1_000 }));
        assert!(p.check_caps(900).is_ok());
        assert!(matches!(p.check_caps(200), Err(CapExceeded::Later(_))));
    }

    #[test]
    fn regions_restrict_only_when_listed() {
        let p = TenantPolicy::from_settings(&settings(None, None));
        assert!(p.allows_region("europe-west4"));
        assert!(!p.allows_region("us-central1"));
        assert!(TenantPolicy::default().allows_region("us-central1"));
    }
}
