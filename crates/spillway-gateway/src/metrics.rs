//! Prometheus metrics: what operators see of quotas, routing, waiting and
//! upstream health.
//!
//! Two kinds of series:
//! - **Events**, counted or observed on the request path: model requests
//!   by outcome (`spillway_requests_total`), every HTTP request by surface,
//!   route and status (`spillway_http_requests_total`: admin and ops calls
//!   are counted there, never as model requests), upstream calls by
//!   status, spillovers and fallbacks, tokens, estimation error, admission
//!   and queue-wait time, upstream latency and time to first token. Label
//!   values are bounded — tenant, model, region, outcome, status class,
//!   route template — never a request id or a raw path. Observations reuse the
//!   label-set's handle; nothing is allocated per request beyond the
//!   crate's own lookups.
//! - **State**, read at scrape time from the quota store and the
//!   scheduler (budget limits, usage, cooldowns, queue depth) so the request
//!   path pays nothing for them.
//! - **Spend**: `spillway_spend_usd_total{tenant,model,traffic}`, what this
//!   replica's requests cost (an event counter, in dollars), and at scrape
//!   time each tenant's spend today and this month as the spend store
//!   knows it for the whole fleet (`spillway_tenant_spend_usd{tenant,period}`),
//!   beside its caps.
//!
//! Names follow Prometheus conventions: `spillway_` prefix, `_total` for
//! counters, base units (`_seconds`, tokens).

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use spillway_core::shares::TenantShare;
use spillway_core::store::BudgetState;
use spillway_core::QuotaGroup;

/// Seconds buckets for waits and latencies: 1 ms to ~2 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Admission decisions are microseconds when there is room.
const ADMISSION_BUCKETS: &[f64] = &[
    0.000_001, 0.000_002, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.001, 0.01, 0.1, 1.0,
    10.0, 60.0,
];
/// actual / estimated input tokens.
const RATIO_BUCKETS: &[f64] = &[
    0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 4.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_rate_limited: IntCounterVec,
    pub upstream_capacity_limited: IntCounterVec,
    pub upstream_setup_errors: IntCounterVec,
    pub count_tokens: IntCounterVec,
    pub spillovers: IntCounterVec,
    /// 1 per (location, provider): joins any per-region series to its
    /// provider (Vertex, or an overflow provider such as Anthropic).
    pub location_provider: IntGaugeVec,
    pub fallbacks: IntCounterVec,
    pub tokens: IntCounterVec,
    pub tenant_tokens: IntCounterVec,
    pub estimate_ratio: HistogramVec,
    pub admission_seconds: HistogramVec,
    pub queue_wait_seconds: HistogramVec,
    pub upstream_latency_seconds: HistogramVec,
    pub time_to_first_token_seconds: HistogramVec,
    pub open_streams: IntGaugeVec,
    pub auth_failures: IntCounter,
    pub open_connections: IntGauge,
    pub connections_refused: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    /// Traces (`telemetry`): spans the collector took, and spans dropped.
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounterVec,
    state_age: GaugeVec,
    // State, refreshed at scrape time.
    budget_limit: GaugeVec,
    budget_effective: GaugeVec,
    budget_used: GaugeVec,
    budget_in_flight: GaugeVec,
    cooldown_seconds: GaugeVec,
    drained: IntGaugeVec,
    queue_depth: IntGaugeVec,
    pool_share: GaugeVec,
    pool_held: GaugeVec,
    /// (model, tenant) pairs with `pool_share` series: a tenant that left
    /// the window reads 0 rather than its last value. Tenants come from
    /// config, so this stays small.
    pool_seen: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    batch_requests: IntGaugeVec,
    batches: IntGaugeVec,
    batch_items_completed: IntCounterVec,
    batch_oldest_age: Gauge,
    batch_oldest_requests: IntGaugeVec,
    pub spend_usd: CounterVec,
    pub spend_cap_refusals: IntCounterVec,
    pub spend_store_degraded: IntGauge,
    pub spend_store_errors: IntCounter,
    tenant_spend: GaugeVec,
    tenant_spend_cap: GaugeVec,
}

/// One tenant's spend at scrape time, US dollars: the fleet's totals as
/// the spend store last said, plus this replica's since.
#[derive(Debug, Clone, Default)]
pub struct TenantSpendSample {
    pub tenant: String,
    pub day_usd: f64,
    pub month_usd: f64,
    pub cap_day_usd: Option<f64>,
    pub cap_month_usd: Option<f64>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

/// Batch state at scrape time.
#[derive(Debug, Default, Clone)]
pub struct BatchSnapshot {
    /// Batches by processing status.
    pub batches: Vec<(&'static str, i64)>,
    /// Items of unfinished batches still to run (the batch queue).
    pub processing: i64,
    /// Items finished since start, by result (monotonic).
    pub completed: Vec<(&'static str, i64)>,
    /// The oldest batch in progress, if any.
    pub oldest: Option<OldestBatch>,
}

/// The oldest batch in progress: how long it has run and how far it is.
#[derive(Debug, Default, Clone)]
pub struct OldestBatch {
    /// Since the batch was created.
    pub age_secs: f64,
    /// Its requests by status (`processing`, `succeeded`, `errored`,
    /// `canceled`, `expired`), as its `request_counts`.
    pub requests: [(&'static str, i64); 5],
}

/// What a scrape needs from the rest of the gateway.
pub struct Snapshot<'a> {
    pub budgets: &'a [BudgetState],
    /// (quota group, interactive waiting, batch waiting)
    pub queues: Vec<(&'a str, usize, usize)>,
    /// When batches are enabled.
    pub batches: Option<BatchSnapshot>,
    /// Each requester's pool: tenants, batch held, interactive demand.
    pub shares: &'a [(QuotaGroup, Vec<TenantShare>, f64, f64)],
    /// Each tenant's spend today and this month.
    pub spend: Vec<TenantSpendSample>,
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("spillway_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        r.register(Box::new(build.clone())).expect("unique metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let admission_seconds = histogram(
            &r,
            "spillway_admission_decision_seconds",
            "Time to one admission decision (reserve or refuse), excluding waiting, by model (the requester asking).",
            ADMISSION_BUCKETS,
            &["model"],
        );
        let open_streams = int_gauge(
            &r,
            "spillway_open_streams",
            "Streams being relayed now, by model.",
            &["model"],
        );
        let auth_failures = IntCounter::new(
            "spillway_auth_failures_total",
            "Client requests refused for a missing or unknown key.",
        )
        .expect("valid metric");
        r.register(Box::new(auth_failures.clone()))
            .expect("unique metric");
        let trace_spans_exported = IntCounter::new(
            "spillway_trace_spans_exported_total",
            "Trace spans the OTLP collector accepted ([telemetry]).",
        )
        .expect("valid metric");
        r.register(Box::new(trace_spans_exported.clone()))
            .expect("unique metric");
        let trace_spans_dropped = counter(&r, "spillway_trace_spans_dropped_total", "Trace spans dropped instead of slowing a request, by reason: queue_full (telemetry.queue_size spans were waiting), export_failed (the collector refused, failed or took longer than telemetry.export_timeout_ms), shutdown (still queued when the shutdown grace ran out).", &["reason"]);
        for reason in ["queue_full", "export_failed", "shutdown"] {
            trace_spans_dropped.with_label_values(&[reason]);
        }
        Self {
            requests: counter(&r, "spillway_requests_total", "Model requests (messages, count_tokens, Vertex predict; batch items) by how they ended. Admin, batch-API, catalog, health and metrics calls are not counted here: see spillway_http_requests_total.", &["tenant", "model", "outcome"]),
            http_requests: counter(&r, "spillway_http_requests_total", "Every HTTP request answered, by surface (model, batches, models, admin, ops: health, readiness and metrics; other: no route), route template (\"-\" when none matched) and status.", &["surface", "route", "status"]),
            upstream_requests: counter(&r, "spillway_upstream_requests_total", "Requests sent upstream (Vertex AI, or an overflow provider: see spillway_location_provider), by answer (status code, or transport).", &["region", "model", "status"]),
            upstream_rate_limited: counter(&r, "spillway_upstream_429_total", "Upstream 429s: the real quota was lower than the ledger believed.", &["region", "model"]),
            upstream_capacity_limited: counter(&r, "spillway_upstream_capacity_429_total", "Upstream 429s that name no quota metric: Google's shared capacity ran short (not this project's quota). Also counted in spillway_upstream_429_total.", &["region", "model"]),
            count_tokens: counter(&r, "spillway_count_tokens_total", "Exact input counts asked of count-tokens before admission (quota.count_tokens_above), by outcome: ok, error, timeout (the estimate was used).", &["model", "outcome"]),
            upstream_setup_errors: counter(&r, "spillway_upstream_setup_errors_total", "Upstream answers about the gateway's own setup: problem=model_not_enabled (enable the model in Model Garden for that region) or credentials_rejected (check the service account).", &["region", "model", "problem"]),
            location_provider: int_gauge(&r, "spillway_location_provider", "1 for each location and the provider that serves it (vertex, or anthropic for overflow locations): join per-region series on it to split them by provider, e.g. sum by (provider) (rate(spillway_upstream_requests_total[5m]) * on (region) group_left (provider) spillway_location_provider).", &["region", "provider"]),
            spillovers: counter(&r, "spillway_spillovers_total", "Requests admitted to a region other than the model's primary.", &["model", "from", "to"]),
            fallbacks: counter(&r, "spillway_fallbacks_total", "Retries after an upstream failure, from the failed region to the next.", &["model", "from", "to"]),
            tokens: counter(&r, "spillway_tokens_total", "Tokens by kind: estimated_input, reserved_input, reserved_output, actual_input, actual_output.", &["model", "region", "kind"]),
            tenant_tokens: counter(&r, "spillway_tenant_tokens_total", "Actual tokens by tenant (input or output), for shares of the pool.", &["tenant", "model", "kind"]),
            estimate_ratio: histogram(&r, "spillway_estimate_ratio", "Input tokens reserved divided by the actual input, by model and content class (below 1: under-reserved).", RATIO_BUCKETS, &["model", "class"]),
            admission_seconds,
            queue_wait_seconds: histogram(&r, "spillway_queue_wait_seconds", "Time from arrival to admission, by model and priority.", LATENCY_BUCKETS, &["model", "priority"]),
            upstream_latency_seconds: histogram(&r, "spillway_upstream_latency_seconds", "Time from sending to Vertex to its response headers.", LATENCY_BUCKETS, &["region", "model"]),
            time_to_first_token_seconds: histogram(&r, "spillway_time_to_first_token_seconds", "Streams: time from arrival to the first event relayed.", LATENCY_BUCKETS, &["region", "model"]),
            open_streams,
            auth_failures,
            open_connections: {
                let g = IntGauge::new("spillway_open_connections", "Client connections open now (server.max_connections bounds them).").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            state_age: gauge(&r, "spillway_state_age_seconds", "Age of the store-backed state in this scrape (budgets from the quota store, batch counts from the batch store): it grows while a store does not answer, and the last values are served.", &["source"]),
            trace_spans_exported,
            trace_spans_dropped,
            connections_refused: counter(&r, "spillway_connections_refused_total", "Client connections ended by Spillway before a request could be served, by reason: connection_limit (503), header_timeout (408, or closed when idle), malformed (400/414/431 from the HTTP parser); on a TLS listener also tls_handshake (failed: no or an untrusted client certificate, no common protocol), tls_timeout (not done within server.header_read_timeout_ms) and plain_http (400: plain HTTP sent to the TLS port).", &["reason"]),
            tls_reloads: counter(&r, "spillway_tls_certificate_reloads_total", "Listener certificate files that changed (seen every server.tls_reload_ms, or on SIGHUP), by outcome: loaded (in force for new connections) or refused (did not load; the certificate in use was kept).", &["outcome"]),
            budget_limit: gauge(&r, "spillway_budget_limit", "Configured quota per window (requests or tokens).", &["region", "model", "resource"]),
            budget_effective: gauge(&r, "spillway_budget_effective", "Quota admission uses now: headroom and learning from upstream 429s applied.", &["region", "model", "resource"]),
            budget_used: gauge(&r, "spillway_budget_used", "Spent in the current window, reservations included.", &["region", "model", "resource"]),
            budget_in_flight: gauge(&r, "spillway_budget_reserved", "Reserved by requests still in flight (part of used).", &["region", "model", "resource"]),
            cooldown_seconds: gauge(&r, "spillway_cooldown_seconds", "Seconds until a region-model takes requests again after upstream refusals (0: not cooling down).", &["region", "model"]),
            drained: int_gauge(&r, "spillway_region_drained", "1 while an operator has drained the region.", &["region", "model"]),
            queue_depth: int_gauge(&r, "spillway_queue_depth", "Requests waiting for quota.", &["model", "priority"]),
            pool_share: gauge(&r, "spillway_pool_share", "Each tenant's place in a model's pool, as fractions of it (this replica's part): kind=held (admitted in the window), demand (asked for over the window), share (its weighted max-min share while contended, else 1).", &["model", "tenant", "kind"]),
            pool_seen: Default::default(),
            pool_held: gauge(&r, "spillway_pool_held", "Fraction of a model's pool held in the window, by priority (interactive, batch).", &["model", "priority"]),
            batch_requests: int_gauge(&r, "spillway_batch_requests", "Batch requests by processing state.", &["status"]),
            batches: int_gauge(&r, "spillway_batches", "Batches by processing status (in_progress, canceling, ended).", &["status"]),
            batch_items_completed: counter(&r, "spillway_batch_items_completed_total", "Batch items finished by this replica, by result.", &["result"]),
            batch_oldest_age: {
                let g = Gauge::new("spillway_batch_oldest_age_seconds", "Age of the oldest batch in progress (the one the runner works on: items are claimed in batch order), since it was created; 0 when none is.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            spend_usd: {
                let c = CounterVec::new(Opts::new("spillway_spend_usd_total", "What requests served by this replica cost, in US dollars: their actual usage (input, output, cache writes, cache reads) at the model's configured prices where it was served, by tenant, model and traffic (interactive, batch). Models without prices are not counted."), &["tenant", "model", "traffic"]).expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            spend_cap_refusals: counter(&r, "spillway_spend_cap_refusals_total", "Requests refused (429) because their tenant's spend reached its cap, by period (day, month).", &["tenant", "period"]),
            spend_store_degraded: {
                let g = IntGauge::new("spillway_spend_store_degraded", "1 while the spend store does not answer: spend caps count this replica's spend on top of the last totals read.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            spend_store_errors: {
                let c = IntCounter::new("spillway_spend_store_errors_total", "Spend syncs that failed (the store did not answer or refused); the spend is written at the next one.").expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            tenant_spend: gauge(&r, "spillway_tenant_spend_usd", "Each tenant's spend in the current UTC period (day, month), US dollars, for the whole fleet as the spend store knows it plus this replica's spend since its last sync (the same on every replica, within a sync).", &["tenant", "period"]),
            tenant_spend_cap: gauge(&r, "spillway_tenant_spend_cap_usd", "Each tenant's spend cap per UTC period (day, month), US dollars; absent when it has none.", &["tenant", "period"]),
            batch_oldest_requests: int_gauge(&r, "spillway_batch_oldest_requests", "Requests of the oldest batch in progress by status (processing, succeeded, errored, canceled, expired), as its request_counts; all 0 when no batch is in progress. ETA: processing over the rate of spillway_batch_items_completed_total.", &["status"]),
            registry: r,
        }
    }

    /// Creates the routing and refusal series at zero for every configured
    /// (model, region), so the first event shows in `rate()` instead of
    /// appearing as a series that starts at 1.
    pub fn pre_register(&self, models: &[(&str, Vec<&str>)]) {
        for (model, regions) in models {
            self.open_streams.with_label_values(&[model]);
            for (i, region) in regions.iter().enumerate() {
                self.upstream_rate_limited
                    .with_label_values(&[region, model]);
                self.upstream_capacity_limited
                    .with_label_values(&[region, model]);
                for problem in ["model_not_enabled", "credentials_rejected"] {
                    self.upstream_setup_errors
                        .with_label_values(&[region, model, problem]);
                }
                if i > 0 {
                    self.spillovers
                        .with_label_values(&[model, regions[0], region]);
                }
                for to in regions.iter().filter(|r| *r != region) {
                    self.fallbacks.with_label_values(&[model, region, to]);
                }
            }
        }
    }

    /// Names each location's provider ([`Metrics::location_provider`]).
    pub fn set_location_providers<'a>(
        &self,
        locations: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        for (region, provider) in locations {
            self.location_provider
                .with_label_values(&[region, provider])
                .set(1);
        }
    }

    /// Refreshes state gauges and renders the exposition text.
    /// How old the state read from `source` is (see `snapshots`).
    pub fn state_age(&self, source: &str, secs: f64) {
        self.state_age.with_label_values(&[source]).set(secs);
    }

    pub fn render(&self, snapshot: Snapshot<'_>) -> String {
        for b in snapshot.budgets {
            // Budgets are per bucket; the label `model` is its bucket group
            // (a lineage on global/us/eu, else a model id).
            let (region, model) = (&*b.region, b.group.as_str());
            let set = |g: &GaugeVec, resource: &str, v: f64| {
                g.with_label_values(&[region, model, resource]).set(v)
            };
            set(
                &self.budget_limit,
                "requests",
                f64::from(b.configured.requests),
            );
            set(
                &self.budget_limit,
                "tokens",
                b.configured.token_capacity() as f64,
            );
            set(
                &self.budget_effective,
                "requests",
                f64::from(b.effective.requests),
            );
            set(
                &self.budget_effective,
                "tokens",
                b.effective.token_capacity() as f64,
            );
            set(&self.budget_used, "requests", f64::from(b.usage.requests));
            set(&self.budget_used, "tokens", b.usage.tokens() as f64);
            set(
                &self.budget_in_flight,
                "requests",
                f64::from(b.in_flight.requests),
            );
            set(
                &self.budget_in_flight,
                "tokens",
                b.in_flight.tokens() as f64,
            );
            self.cooldown_seconds
                .with_label_values(&[region, model])
                .set(b.cooldown_remaining.as_secs_f64());
            self.drained
                .with_label_values(&[region, model])
                .set(i64::from(b.drained));
        }
        for (model, interactive, batch) in &snapshot.queues {
            self.queue_depth
                .with_label_values(&[model, "interactive"])
                .set(*interactive as i64);
            self.queue_depth
                .with_label_values(&[model, "batch"])
                .set(*batch as i64);
        }
        let mut seen = self.pool_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut now_seen = std::collections::HashSet::new();
        for (model, tenants, batch_held, _) in snapshot.shares {
            let model = model.as_str();
            for t in tenants {
                now_seen.insert((model.to_string(), t.tenant.to_string()));
                for (kind, v) in [("held", t.held), ("demand", t.demand), ("share", t.share)] {
                    self.pool_share
                        .with_label_values(&[model, &t.tenant, kind])
                        .set(v);
                }
            }
            let interactive: f64 = tenants.iter().map(|t| t.held).sum();
            self.pool_held
                .with_label_values(&[model, "interactive"])
                .set(interactive);
            self.pool_held
                .with_label_values(&[model, "batch"])
                .set(*batch_held);
        }
        // Tenants no longer in any window hold nothing (and, uncontended,
        // may have the whole pool).
        for (model, tenant) in seen.difference(&now_seen) {
            for (kind, v) in [("held", 0.0), ("demand", 0.0), ("share", 1.0)] {
                self.pool_share
                    .with_label_values(&[model, tenant, kind])
                    .set(v);
            }
        }
        seen.extend(now_seen);
        drop(seen);
        if let Some(b) = &snapshot.batches {
            self.batch_requests
                .with_label_values(&["processing"])
                .set(b.processing);
            for (status, n) in &b.batches {
                self.batches.with_label_values(&[status]).set(*n);
            }
            let oldest = b.oldest.clone().unwrap_or_else(|| OldestBatch {
                age_secs: 0.0,
                requests: ["processing", "succeeded", "errored", "canceled", "expired"]
                    .map(|status| (status, 0)),
            });
            self.batch_oldest_age.set(oldest.age_secs);
            for (status, n) in oldest.requests {
                self.batch_oldest_requests
                    .with_label_values(&[status])
                    .set(n);
            }
            for (result, n) in &b.completed {
                // The runner keeps monotonic totals; advance the counter to them.
                let counter = self.batch_items_completed.with_label_values(&[result]);
                let total = u64::try_from(*n).unwrap_or(0);
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }
        for t in &snapshot.spend {
            for (period, spent, cap) in [
                ("day", t.day_usd, t.cap_day_usd),
                ("month", t.month_usd, t.cap_month_usd),
            ] {
                self.tenant_spend
                    .with_label_values(&[&t.tenant, period])
                    .set(spent);
                match cap {
                    Some(cap) => self
                        .tenant_spend_cap
                        .with_label_values(&[&t.tenant, period])
                        .set(cap),
                    None => {
                        let _ = self
                            .tenant_spend_cap
                            .remove_label_values(&[&t.tenant, period]);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Metrics {
    /// The registry, for components that bring their own series (the
    /// shared quota store).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The status label for an upstream answer: the code, or what failed.
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        529 => "529",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_core::ledger::{Limits, Usage};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn renders_events_and_state() {
        let m = Metrics::new();
        m.requests.with_label_values(&["t", "m", "ok"]).inc();
        m.upstream_requests
            .with_label_values(&["us-central1", "m", status_label(429)])
            .inc();
        let budgets = [BudgetState {
            group: "m".into(),
            region: Arc::from("us-central1"),
            configured: Limits::new(60, 50_000),
            effective: Limits::new(40, 50_000),
            usage: Usage {
                requests: 3,
                input: 10,
                output: 5,
            },
            in_flight: Usage {
                requests: 1,
                input: 10,
                output: 0,
            },
            cooldown_remaining: Duration::from_millis(1500),
            drained: false,
        }];
        let text = m.render(Snapshot {
            budgets: &budgets,
            queues: vec![("m", 2, 5)],
            batches: None,
            shares: &[(
                "m".into(),
                vec![TenantShare {
                    tenant: "t".into(),
                    held: 0.5,
                    demand: 2.0,
                    share: 0.75,
                }],
                0.25,
                2.0,
            )],
            spend: vec![TenantSpendSample {
                tenant: "t".into(),
                day_usd: 1.25,
                month_usd: 3.5,
                cap_day_usd: Some(50.0),
                cap_month_usd: None,
            }],
        });
        for needle in [
            "spillway_requests_total{model=\"m\",outcome=\"ok\",tenant=\"t\"} 1",
            "spillway_upstream_requests_total{model=\"m\",region=\"us-central1\",status=\"429\"} 1",
            "spillway_budget_effective{model=\"m\",region=\"us-central1\",resource=\"requests\"} 40",
            "spillway_pool_share{kind=\"share\",model=\"m\",tenant=\"t\"} 0.75",
            "spillway_pool_held{model=\"m\",priority=\"batch\"} 0.25",
            "spillway_budget_used{model=\"m\",region=\"us-central1\",resource=\"tokens\"} 15",
            "spillway_cooldown_seconds{model=\"m\",region=\"us-central1\"} 1.5",
            "spillway_queue_depth{model=\"m\",priority=\"batch\"} 5",
            "spillway_build_info{version=",
            "spillway_tenant_spend_usd{period=\"day\",tenant=\"t\"} 1.25",
            "spillway_tenant_spend_usd{period=\"month\",tenant=\"t\"} 3.5",
            "spillway_tenant_spend_cap_usd{period=\"day\",tenant=\"t\"} 50",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains("spillway_tenant_spend_cap_usd{period=\"month\""));
    }
}
