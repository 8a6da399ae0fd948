//! The request lifecycle as one service: take a validated call, get it a
//! quota reservation in some location, send it to that location's provider,
//! relay the answer, and settle the reservation to what was really used.
//!
//! The [`Forwarder`] owns what that takes — the catalog, the scheduler (and
//! through it the quota store), the providers, the estimate learner and the
//! observer — and knows nothing of HTTP on the client side: it returns a
//! [`Forwarded`], the call's [`Trace`] and either an [`Answer`] or a
//! [`ForwardError`]. `routes` renders that for
//! a client; `batch` stores it as a result.
//!
//! One call's life:
//! 1. **Prepare** ([`call`]): resolve the model, estimate input tokens
//!    (corrected per model by what past responses taught), reserve output
//!    as `max_tokens`, and refuse early what can never fit.
//! 2. **Admit**: the scheduler reserves in the location with the most room,
//!    waiting up to the call's deadline, or refuses with when room is
//!    expected.
//! 3. **Send** ([`attempt`]), and on a 429, 529, 503, connect failure or
//!    timeout before any byte reached the client, settle that attempt (the
//!    store cools the location down) and go back to 2: another location, or
//!    the same one after its cooldown, within the deadline.
//! 4. **Relay and settle** ([`relay`]): the unary body's `usage`, or for a
//!    stream `message_start` plus the last `message_delta`; a broken stream
//!    is charged what was observed, and at least the input estimate.
//!
//! `count_tokens` is free on Vertex, so it skips quota entirely.

pub mod attempt;
pub mod call;
mod exact;
pub mod relay;
pub mod setup;

use std::sync::Arc;
use std::time::Duration;

use spillway_core::adaptive::AdaptiveConfig;
use spillway_core::learn::Quantile;
use spillway_core::ledger::Limits;
use spillway_core::shares::InteractiveReserve;
use spillway_core::store::{QuotaStore, Strategy};
use spillway_core::Catalog;
use spillway_vertex::Operation;

use crate::answer::{Answer, ForwardError};
use crate::config::{RoutingStrategy, Settings};
use crate::estimates::EstimateLearner;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::observer::{Observer, Trace};
use crate::scheduler::{Demand, Scheduler};
use crate::telemetry::{CallSpan, Telemetry};
use crate::upstream::Providers;
use tokio_util::task::TaskTracker;

pub use call::{Call, CallRequest, Pacing, Plan};

/// A forwarded call: what happened ([`Trace`]) and its result.
pub struct Forwarded {
    pub trace: Trace,
    pub result: Result<Answer, ForwardError>,
}

/// The settings the lifecycle reads on every call.
#[derive(Debug, Clone)]
pub struct ForwardPolicy {
    pub strategy: Strategy,
    /// Default wait for quota, and the most any request may ask for.
    pub max_wait: Duration,
    pub max_wait_cap: Duration,
    pub max_attempts: u32,
    /// The ledger's window (Vertex's plus a transit margin).
    pub window: Duration,
    pub headroom: f64,
    pub drop_vertex_events: bool,
    /// Count big requests exactly with `count-tokens` (`exact`), from this
    /// many estimated input tokens.
    pub count_tokens_above: Option<u64>,
    pub count_tokens_timeout: Duration,
}

impl ForwardPolicy {
    pub fn from_settings(settings: &Settings) -> Self {
        let q = &settings.quota;
        Self {
            strategy: match q.strategy {
                RoutingStrategy::MostHeadroom => Strategy::MostHeadroom,
                RoutingStrategy::Ordered => Strategy::Ordered,
            },
            max_wait: Duration::from_millis(settings.scheduler.max_wait_ms),
            max_wait_cap: Duration::from_millis(settings.scheduler.max_wait_cap_ms),
            max_attempts: settings.scheduler.max_attempts,
            window: crate::quota_store::ledger_window(q),
            headroom: q.headroom,
            drop_vertex_events: settings.upstream.drop_vertex_events,
            count_tokens_above: q.count_tokens_above,
            count_tokens_timeout: Duration::from_millis(q.count_tokens_timeout_ms),
        }
    }

    /// What a configured budget allows at most, headroom applied.
    pub fn ceiling(&self, configured: &Limits) -> Limits {
        AdaptiveConfig {
            headroom: self.headroom,
            ..AdaptiveConfig::default()
        }
        .ceiling(*configured)
    }
}

/// The request lifecycle's owner. Built once; the parts that change
/// (budgets, queues, estimate corrections) have their own interior locks.
pub struct Forwarder {
    catalog: Catalog,
    scheduler: Scheduler,
    providers: Providers,
    estimates: EstimateLearner,
    observer: Observer,
    policy: ForwardPolicy,
    setup: setup::SetupHealth,
    /// Shutdown's phases: streams are cut when it stops.
    lifecycle: Lifecycle,
    /// Settlements running in the background; shutdown waits for them.
    settlements: TaskTracker,
}

impl Forwarder {
    pub fn new(
        settings: &Settings,
        catalog: Catalog,
        store: Arc<dyn QuotaStore>,
        providers: Providers,
        metrics: Arc<Metrics>,
        spend: Arc<crate::spend::Spend>,
    ) -> Self {
        let mut groups: Vec<_> = catalog.requesters().into_iter().cloned().collect();
        groups.extend(catalog.overflow_requesters());
        let reserve = InteractiveReserve {
            min: settings.batch.interactive_reserve_min,
            max: settings.batch.interactive_reserve_max,
        };
        let scheduler = Scheduler::new(store, &groups, settings.scheduler.max_queue)
            .with_decision_histogram(metrics.admission_seconds.clone())
            .with_sharing(crate::quota_store::ledger_window(&settings.quota), reserve);
        let quota = &settings.quota;
        Self {
            estimates: EstimateLearner::new(
                catalog.models(),
                quota.learn_estimates,
                quota.output_reserve,
                Quantile::new(quota.estimate_margin).unwrap_or_default(),
            ),
            policy: ForwardPolicy::from_settings(settings),
            observer: Observer::new(metrics, spend),
            catalog,
            scheduler,
            providers,
            setup: setup::SetupHealth::default(),
            lifecycle: Lifecycle::new(),
            settlements: TaskTracker::new(),
        }
    }

    /// Settles a grant on a task of the settlements tracker: for code that
    /// cannot await (a `Drop`).
    fn settle_in_background(
        self: &Arc<Self>,
        grant: spillway_core::store::Grant,
        outcome: spillway_core::store::Outcome,
    ) {
        let forwarder = Arc::clone(self);
        self.settlements.spawn(async move {
            forwarder.scheduler.settle(&grant, outcome).await;
        });
    }

    /// Records spans of every call (`[telemetry]` on).
    pub fn with_telemetry(mut self, telemetry: Option<Arc<Telemetry>>) -> Self {
        self.observer = self.observer.with_telemetry(telemetry);
        self
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Waits until every settlement started so far has run (at shutdown,
    /// so the shared store hears about every reservation), or `within`.
    /// Returns how many were still running.
    pub async fn settled(&self, within: Duration) -> usize {
        self.settlements.close();
        let done = tokio::time::timeout(within, self.settlements.wait()).await;
        self.settlements.reopen();
        match done {
            Ok(()) => 0,
            Err(_) => self.settlements.len(),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    pub fn policy(&self) -> &ForwardPolicy {
        &self.policy
    }

    /// Runs one call to its end (for a stream: to its first byte; the
    /// stream settles itself when it ends).
    pub async fn forward(self: &Arc<Self>, mut call: Call<'_>) -> Forwarded {
        let r = &mut call.request;
        let mut trace = Trace::new(
            r.request_id.clone(),
            Arc::clone(&r.tenant.name),
            call.model.id.clone(),
        );
        trace.priority = r.priority;
        if let Some(start) = r.span.take().filter(|s| s.sampled()) {
            let operation = match r.op {
                Operation::CountTokens => "count_tokens",
                Operation::Messages => "chat",
            };
            trace.span = Some(Box::new(CallSpan::new(
                start,
                operation,
                r.max_tokens,
                r.stream,
            )));
        }
        let result = match call.request.op {
            Operation::CountTokens => self.count_tokens(call, &mut trace).await,
            Operation::Messages => self.messages(call, &mut trace).await,
        };
        if let Err(e) = &result {
            if trace.outcome == "error" {
                trace.outcome = match e {
                    ForwardError::Invalid(_) | ForwardError::UnknownModel(_) => "invalid",
                    ForwardError::RateLimited { .. } => "rejected",
                    ForwardError::Upstream(_) => "upstream_error",
                    ForwardError::Credentials => "credentials",
                    _ => "transport",
                };
            }
        }
        Forwarded { trace, result }
    }

    async fn messages(
        self: &Arc<Self>,
        call: Call<'_>,
        trace: &mut Trace,
    ) -> Result<Answer, ForwardError> {
        let regions = self.eligible_regions(&call)?;
        let mut plan = self.plan(&call, &regions)?;
        self.count_exactly(&call, &regions, &mut plan).await?;
        trace.note_plan(plan.charge, plan.input.point, plan.input.class.name());
        self.check_caps(&call, &plan)?;
        let r = &call.request;
        let max_wait = r
            .max_wait
            .or(r.tenant.policy.max_wait)
            .unwrap_or(self.policy.max_wait)
            .min(self.policy.max_wait_cap);
        let (share_cost, share_floor) = self.share_costs(&call, plan.charge);
        let demand = Demand {
            group: call.model.requester(),
            regions,
            charge: plan.charge,
            strategy: self.policy.strategy,
            priority: r.priority,
            tenant: Arc::clone(&r.tenant.name),
            weight: r.tenant.policy.weight,
            share_cost,
            share_floor,
            deadline: tokio::time::Instant::now() + max_wait,
        };
        self.attempts(call, demand, plan, trace).await
    }

    async fn count_tokens(
        &self,
        call: Call<'_>,
        trace: &mut Trace,
    ) -> Result<Answer, ForwardError> {
        let regions = self.eligible_regions(&call)?;
        let location = call
            .model
            .regions
            .iter()
            .find(|r| *r.region == *regions[0])
            .expect("eligible regions are the model's");
        trace.region = Arc::clone(&regions[0]);
        let provider = self.provider(&location.provider)?;
        let Call {
            model,
            alias_warning,
            request,
        } = call;
        let body = provider.encode(request.body, request.op, &model.id);
        let response = self
            .send(provider, trace, request.op, false, body, request.beta)
            .await?;
        let served = crate::answer::Served {
            region: Arc::clone(&trace.region),
            provider: crate::upstream::provider_label(&location.provider),
            budget: None,
            alias_warning,
        };
        relay::unary(response, trace, None, served).await
    }

    fn provider(&self, name: &str) -> Result<&Arc<dyn crate::upstream::Provider>, ForwardError> {
        self.providers
            .get(name)
            .ok_or_else(|| ForwardError::UpstreamUnavailable {
                region: String::new(),
                reason: format!("no provider {name:?} is configured"),
            })
    }
}
