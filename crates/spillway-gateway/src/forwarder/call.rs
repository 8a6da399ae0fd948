//! Preparing a call: the one place a client's request becomes something the
//! forwarder can admit — its model resolved, the locations it may use, and
//! the charge it reserves — and where the checks that refuse it before
//! anything is spent live (the tenant's spend caps among them).
//!
//! Interactive requests (from `routes`) and batch items (validated at
//! submit by `batch::api`, sent later by `batch::runner`) are prepared here
//! alike, so both surfaces refuse the same requests for the same reasons.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde_json::{Map, Value};
use spillway_core::estimate::{estimate_input, ImageRule, InputEstimate};
use spillway_core::learn::InputReserve;
use spillway_core::ledger::{Charge, Limits};
use spillway_core::{ModelSpec, Resolution};
use spillway_vertex::{anthropic_to_vertex_id, is_valid_model_id, Operation};

use super::Forwarder;
use crate::answer::ForwardError;
use crate::request_id::RequestId;
use crate::scheduler::Priority;
use crate::telemetry::RequestSpan;
use crate::tenants::{CapExceeded, Tenant};

/// What a surface hands the forwarder, the model still named as the client
/// named it.
pub struct CallRequest {
    pub op: Operation,
    pub body: Map<String, Value>,
    /// The body asks for server-sent events.
    pub stream: bool,
    /// Call the provider's streaming endpoint (`:streamRawPredict`). Usually
    /// `stream`; a Vertex-surface client may send `"stream": true` to
    /// `:rawPredict`, and is forwarded as it asked.
    pub stream_endpoint: bool,
    pub max_tokens: u64,
    /// The client's `anthropic-beta`, forwarded as is.
    pub beta: Option<HeaderValue>,
    /// `x-spillway-regions`, if the client narrowed the locations.
    pub region_hint: Option<Vec<String>>,
    /// `x-spillway-max-wait-ms`, or a batch item's deadline.
    pub max_wait: Option<Duration>,
    pub priority: Priority,
    pub tenant: Tenant,
    pub request_id: RequestId,
    /// The request's span, when traces are on and it is sampled
    /// (`telemetry`); the call's trace carries it to the observer.
    pub span: Option<RequestSpan>,
}

/// One call, resolved to a configured model.
pub struct Call<'a> {
    pub model: &'a ModelSpec,
    /// Set when the client named the model by an unversioned alias.
    pub alias_warning: Option<String>,
    pub request: CallRequest,
}

/// What to reserve for a call, and what learning needs when it settles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// The body's measure.
    pub estimate: InputEstimate,
    /// The learned input estimate, its margin and content class.
    pub input: InputReserve,
    pub max_tokens: u64,
    /// What admission holds: the padded input and the expected output, cut
    /// to what an empty location can take when they exceed it.
    pub charge: Charge,
}

/// How far apart paced batch items must be, and the key of their pace.
#[derive(Debug, Clone, PartialEq)]
pub struct Pacing {
    /// The model and the locations it may use, as one key.
    pub key: String,
    pub spacing: Duration,
}

impl Forwarder {
    /// Resolves a client's model name: Vertex id, Anthropic id, or alias.
    pub fn resolve(&self, name: &str) -> Result<Resolution<'_>, ForwardError> {
        let not_found = || ForwardError::UnknownModel(format!("model: {name}"));
        if !is_valid_model_id(name) {
            return Err(not_found());
        }
        self.catalog
            .resolve(name)
            .or_else(|| anthropic_to_vertex_id(name).and_then(|id| self.catalog.resolve(&id)))
            .ok_or_else(not_found)
    }

    /// Resolves `name` and makes `request` a call for that model.
    pub fn prepare(&self, name: &str, request: CallRequest) -> Result<Call<'_>, ForwardError> {
        let resolution = self.resolve(name)?;
        let alias_warning = resolution.via_alias.then(|| {
            tracing::warn!(
                alias = name,
                model = %resolution.model.id,
                "model alias resolved; Google advises pinning versioned model ids"
            );
            format!(
                "299 spillway \"model alias {name} resolved to {}; Google advises versioned model ids\"",
                resolution.model.id
            )
        });
        Ok(Call {
            model: resolution.model,
            alias_warning,
            request,
        })
    }

    /// The checks made before asking for quota (locations allowed, context
    /// window, can ever fit), for work validated now and sent later.
    pub fn precheck(&self, call: &Call<'_>) -> Result<Plan, ForwardError> {
        let regions = self.eligible_regions(call)?;
        self.plan(call, &regions)
    }

    /// What to reserve: the learned input estimate with its margin, and
    /// the expected output. Refuses for good only on the body's floor, a
    /// lower bound no tokenizer undercuts — never on a learned or padded
    /// guess, and never counting `max_tokens` against the quota (Vertex
    /// cannot know the output in advance either). A charge that exceeds
    /// every eligible location while its floor fits is cut to what the
    /// roomiest empty location takes: it waits for an empty window and is
    /// sent, and its answer teaches the estimate.
    pub(super) fn plan(&self, call: &Call<'_>, regions: &[Arc<str>]) -> Result<Plan, ForwardError> {
        let model = call.model;
        let max_tokens = call.request.max_tokens;
        let estimate = estimate_input(&call.request.body, ImageRule::default());
        let floor = estimate.floor();
        if floor.saturating_add(max_tokens) > model.context_window {
            return Err(ForwardError::Invalid(format!(
                "prompt is too long: at least {floor} input tokens plus max_tokens {max_tokens} exceed the {}-token context window of {}",
                model.context_window, model.id
            )));
        }
        let ceilings = self.ceilings(call, regions);
        let least = Charge {
            input: floor,
            output: 0,
        };
        if !ceilings.iter().any(|l| l.admits(least)) {
            let largest = ceilings.iter().map(input_room).max().unwrap_or(0);
            return Err(ForwardError::Invalid(format!(
                "request can never fit the quota: it has at least {floor} input tokens, more than the per-minute input budget of every eligible region (the largest is {largest} tokens); split the prompt"
            )));
        }
        let mut input = self.estimates.input(model, &estimate);
        if let Some(prefix) = (!model.cache_reads_count)
            .then(|| self.estimates.cached_prefix(&model.id, &estimate, regions))
            .flatten()
        {
            // Cache reads cost this model's quota nothing: hold what the
            // prompt adds to a prefix cached wherever the call may go,
            // estimated on its own (with its own class's margin).
            let mut rest = estimate;
            for (total, cached) in rest.features.0.iter_mut().zip(prefix.0) {
                *total = total.saturating_sub(cached);
            }
            input.reserved = self.estimates.input(model, &rest).reserved;
        }
        let wanted = Charge {
            input: input.reserved,
            output: self
                .estimates
                .output(&model.id, &call.request.tenant.name, max_tokens),
        };
        Ok(Plan {
            estimate,
            input,
            max_tokens,
            charge: fitted(&ceilings, least, wanted),
        })
    }

    /// The most each eligible location allows, headroom applied.
    pub(super) fn ceilings(&self, call: &Call<'_>, regions: &[Arc<str>]) -> Vec<Limits> {
        call.model
            .regions
            .iter()
            .filter(|r| regions.iter().any(|e| **e == *r.region))
            .map(|r| self.policy.ceiling(&r.limits))
            .collect()
    }

    /// The tenant's own caps: its spend per day and month first (a request
    /// refused there takes nothing from the rate caps), then the rate caps
    /// on the planned charge.
    pub(super) fn check_caps(&self, call: &Call<'_>, plan: &Plan) -> Result<(), ForwardError> {
        let tenant = &call.request.tenant;
        self.observer
            .spend()
            .check(&tenant.name, &tenant.policy.spend_caps)
            .map_err(|refusal| ForwardError::RateLimited {
                message: refusal.message,
                retry_after: refusal.retry_after,
            })?;
        tenant
            .policy
            .check_caps(plan.charge.total())
            .map_err(|cap| match cap {
                CapExceeded::Later(retry_after) => ForwardError::RateLimited {
                    message: format!("tenant {} is over its own rate cap", tenant.name),
                    retry_after,
                },
                CapExceeded::Never { cap } => ForwardError::Invalid(format!(
                    "request's estimated {} tokens exceed tenant {}'s cap of {cap} tokens per minute",
                    plan.charge.total(),
                    tenant.name
                )),
            })
    }

    /// The model's pool over the locations `call`'s tenant may use: per
    /// minute, requests and each token limit (combined, input, output)
    /// where every location has one.
    fn pool(&self, call: &Call<'_>) -> PoolLimits {
        let mut pool = PoolLimits {
            requests: 0,
            tokens: Some(0),
            input: Some(0),
            output: Some(0),
        };
        for region in self.tenant_regions(call) {
            let limits = self.policy.ceiling(&region.limits);
            pool.requests += u64::from(limits.requests);
            pool.tokens = pool.tokens.zip(limits.tokens).map(|(a, b)| a + b);
            pool.input = pool.input.zip(limits.input_tokens).map(|(a, b)| a + b);
            pool.output = pool.output.zip(limits.output_tokens).map(|(a, b)| a + b);
        }
        pool
    }

    fn tenant_regions<'c>(
        &self,
        call: &'c Call<'_>,
    ) -> impl Iterator<Item = &'c spillway_core::RegionBudget> + 'c {
        let tenant = &call.request.tenant;
        call.model
            .regions
            .iter()
            .filter(move |r| tenant.policy.allows_region(&r.region))
    }

    /// A charge's part of its model's pool, the largest of its parts of
    /// each limit (what weighted shares are measured in), and one
    /// request's part (the least a sent request holds).
    pub(super) fn share_costs(&self, call: &Call<'_>, charge: Charge) -> (f64, f64) {
        let pool = self.pool(call);
        let largest = |parts: [f64; 4]| parts.into_iter().fold(0.0, f64::max);
        (
            largest(pool.parts(charge)),
            largest(pool.parts(Charge::default())),
        )
    }

    /// How far apart batch items like this one must be admitted so they
    /// take quota at its refill rate: the larger of one request's and this
    /// item's tokens' share of the allowed locations' combined budget.
    pub fn pacing(&self, call: &Call<'_>) -> Pacing {
        let window = self.policy.window.as_secs_f64();
        let mut key = call.model.id.to_string();
        for region in self.tenant_regions(call) {
            key.push(' ');
            key.push_str(&region.region);
        }
        let pool = self.pool(call);
        let charge = match self
            .eligible_regions(call)
            .and_then(|r| self.plan(call, &r))
        {
            Ok(plan) => plan.charge,
            Err(_) => Charge::default(),
        };
        // The item's share of each budget, as a time: the largest binds.
        let spacing = pool.parts(charge).into_iter().fold(0.0, f64::max) * window;
        Pacing {
            key,
            spacing: Duration::from_secs_f64(spacing),
        }
    }
}

/// A model's per-minute pool over some locations.
struct PoolLimits {
    requests: u64,
    tokens: Option<u64>,
    input: Option<u64>,
    output: Option<u64>,
}

impl PoolLimits {
    /// `charge`'s part of each limit (one request of the requests).
    fn parts(&self, charge: Charge) -> [f64; 4] {
        let part = |limit: Option<u64>, used: u64| {
            limit
                .filter(|l| *l > 0)
                .map_or(0.0, |l| used as f64 / l as f64)
        };
        [
            1.0 / self.requests.max(1) as f64,
            part(self.tokens, charge.total()),
            part(self.input, charge.input),
            part(self.output, charge.output),
        ]
    }
}

impl Forwarder {
    /// The locations this call may use: [`allowed_regions`], less those
    /// that told this project they do not serve the model (until their
    /// re-probe) — unless that leaves none, and then all of them.
    pub(super) fn eligible_regions(&self, call: &Call<'_>) -> Result<Vec<Arc<str>>, ForwardError> {
        let mut regions = allowed_regions(call)?;
        if regions.iter().any(|r| self.setup.is_out(&call.model.id, r)) {
            let serving: Vec<Arc<str>> = regions
                .iter()
                .filter(|r| !self.setup.is_out(&call.model.id, r))
                .cloned()
                .collect();
            if !serving.is_empty() {
                regions = serving;
            }
        }
        Ok(regions)
    }
}

/// The most input an empty window of `limits` takes.
fn input_room(limits: &Limits) -> u64 {
    limits
        .input_tokens
        .unwrap_or(u64::MAX)
        .min(limits.tokens.unwrap_or(u64::MAX))
}

/// `wanted` if some location can ever take it, else `wanted` cut to what
/// the roomiest empty location (among those that take `least`) allows.
pub(super) fn fitted(ceilings: &[Limits], least: Charge, wanted: Charge) -> Charge {
    if ceilings.iter().any(|l| l.admits(wanted)) {
        return wanted;
    }
    ceilings
        .iter()
        .filter(|l| l.admits(least))
        .map(|l| cut_to(l, wanted))
        .max_by_key(|c| (c.input, c.output))
        .unwrap_or(least)
}

/// `charge` cut until an empty window of `limits` admits it: input first
/// (it is what Vertex checks on arrival), then output in what is left.
fn cut_to(limits: &Limits, charge: Charge) -> Charge {
    let input = charge.input.min(input_room(limits));
    let output = charge
        .output
        .min(limits.output_tokens.unwrap_or(u64::MAX))
        .min(limits.tokens.map_or(u64::MAX, |t| t.saturating_sub(input)));
    Charge { input, output }
}

/// The locations this call may use: the model's, narrowed by tenant policy
/// and the request's `x-spillway-regions`, in configured order.
fn allowed_regions(call: &Call<'_>) -> Result<Vec<Arc<str>>, ForwardError> {
    let model = call.model;
    let (tenant, hint) = (&call.request.tenant, &call.request.region_hint);
    if model.regions.is_empty() {
        return Err(ForwardError::Invalid(format!(
            "model {:?} is not served in any configured region",
            model.id.as_str()
        )));
    }
    if let Some(hint) = hint {
        if let Some(unknown) = hint.iter().find(|h| {
            !model
                .regions
                .iter()
                .chain(&model.overflow)
                .any(|r| &r.region == *h)
        }) {
            return Err(ForwardError::Invalid(format!(
                "x-spillway-regions: {unknown:?} does not serve {}; it is served in {}",
                model.id,
                model
                    .regions
                    .iter()
                    .map(|r| r.region.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let regions: Vec<Arc<str>> = model
        .regions
        .iter()
        .map(|r| r.region.as_str())
        .filter(|r| tenant.policy.allows_region(r))
        .filter(|r| hint.as_ref().is_none_or(|h| h.iter().any(|x| x == r)))
        .map(Arc::from)
        .collect();
    if regions.is_empty() {
        return Err(ForwardError::Invalid(format!(
            "no region allowed for this request serves {} (tenant policy and x-spillway-regions leave none)",
            model.id
        )));
    }
    Ok(regions)
}
