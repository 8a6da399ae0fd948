//! The admin API: live quota state, and the levers operators pull without a
//! restart.
//!
//! - `GET /admin/quotas`: every budget, once per bucket (`model` is the
//!   bucket group: a lineage on `global`/`us`/`eu`, else a model id) —
//!   configured, effective (headroom and learning applied), used and in
//!   flight, cooldown, drained, and the queues of the models drawing on it.
//! - `GET /admin/tenants`: tenants and their policy (never their keys), and
//!   each one's spend today and this month (UTC) beside its spend caps.
//! - `GET /admin/shares`: who is using each model's pool — per tenant the
//!   pool fraction held in the window, asked for, and its weighted share
//!   (1 while uncontended); what batch holds and interactive asks for.
//! - `POST /admin/regions/{region}/drain` and `/undrain`: take a region out
//!   of rotation for every model, or put it back. In-flight requests finish.
//! - `PUT /admin/quotas/{name}/{region}`: set a bucket's budget (Google
//!   raised the quota); `name` is a model (standing for its bucket in that
//!   location) or a bucket group. Learning starts over from the new value.
//! - SIGHUP (see [`reload`]): re-read the config files, keep the ledgers.
//! - `GET /admin/overview` and `GET /admin/events` (the live page's data,
//!   all of the above in one object, once or every second) are
//!   `overview`'s; the page itself, `admin_page`'s.
//!
//! Everything here sits behind the admin key (`admin.key_sha256`), checked
//! like client keys: by SHA-256 digest, in constant time. With no admin key
//! configured the API answers 403.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use spillway_core::ledger::{Limits, Usage};
use spillway_core::QuotaGroup;

use crate::auth::{key_matches, presented_key, KeyRing};
use crate::config::Settings;
use crate::error::ApiError;
use crate::state::AppState;

/// Checks the admin key on every admin route.
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.admin_key_digest else {
        return ApiError::Forbidden("the admin API is disabled: set admin.key_sha256".into())
            .into_response();
    };
    let Some(presented) = presented_key(request.headers()) else {
        return ApiError::Unauthenticated("missing admin key".into()).into_response();
    };
    if !key_matches(presented, &expected) {
        state.metrics.auth_failures.inc();
        return ApiError::Unauthenticated("invalid admin key".into()).into_response();
    }
    next.run(request).await
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LimitsView {
    pub requests_per_min: u32,
    pub tokens_per_min: Option<u64>,
    pub input_tokens_per_min: Option<u64>,
    pub output_tokens_per_min: Option<u64>,
}

impl From<Limits> for LimitsView {
    fn from(l: Limits) -> Self {
        Self {
            requests_per_min: l.requests,
            tokens_per_min: l.tokens,
            input_tokens_per_min: l.input_tokens,
            output_tokens_per_min: l.output_tokens,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct UsageView {
    pub requests: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl From<Usage> for UsageView {
    fn from(u: Usage) -> Self {
        Self {
            requests: u.requests,
            input_tokens: u.input,
            output_tokens: u.output,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QuotaView {
    pub model: String,
    pub region: String,
    /// Who serves the location: `vertex`, or an overflow provider
    /// (`anthropic`, whose budget is a token bucket: `used` is what the
    /// bucket lacks of full).
    pub provider: &'static str,
    pub configured: LimitsView,
    pub effective: LimitsView,
    pub used: UsageView,
    pub in_flight: UsageView,
    pub cooldown_ms: u64,
    pub drained: bool,
    pub queued_interactive: usize,
    pub queued_batch: usize,
}

/// Every budget's state, fresh or (while the quota store is slow) the last
/// read; its age goes to `spillway_state_age_seconds{source="quota_store"}`.
pub(crate) async fn read_budgets(
    state: &AppState,
) -> Option<Arc<crate::snapshots::Stamped<Vec<spillway_core::store::BudgetState>>>> {
    let store = Arc::clone(state.forwarder.scheduler().store());
    let read = state
        .snapshots
        .budgets
        .read(
            move || async move { Some(store.states().await) },
            crate::snapshots::READ_WAIT,
        )
        .await;
    state.metrics.state_age(
        "quota_store",
        crate::snapshots::age_secs(&read, state.started),
    );
    read
}

/// Batch counts, fresh or (while the batch store is slow) the last read;
/// its age goes to `spillway_state_age_seconds{source="batch_store"}`.
/// `None` with batches off, or before the store ever answered.
pub(crate) async fn read_batches(
    state: &AppState,
) -> Option<Arc<crate::snapshots::Stamped<crate::batch::BatchSnapshot>>> {
    let service = Arc::clone(state.batches.as_ref()?);
    let read = state
        .snapshots
        .batches
        .read(
            move || async move {
                service
                    .snapshot()
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "cannot read batch state"))
                    .ok()
            },
            crate::snapshots::READ_WAIT,
        )
        .await;
    state.metrics.state_age(
        "batch_store",
        crate::snapshots::age_secs(&read, state.started),
    );
    read
}

/// One budget as `/admin/quotas` shows it, its queues read now.
pub(crate) fn quota_view(state: &AppState, b: &spillway_core::store::BudgetState) -> QuotaView {
    let scheduler = state.forwarder.scheduler();
    let catalog = state.forwarder.catalog();
    let overflow = catalog
        .resolve(b.group.as_str())
        .filter(|r| r.model.overflow_location(&b.region).is_some())
        .map(|r| r.model);
    // A bucket's waiters are those of every model drawing on it.
    let (queued_interactive, queued_batch) = match overflow {
        Some(model) => scheduler.queue_depth(&model.overflow_requester()),
        None => catalog
            .requesters_of(&b.group, &b.region)
            .into_iter()
            .map(|requester| scheduler.queue_depth(requester))
            .fold((0, 0), |(i, b), (qi, qb)| (i + qi, b + qb)),
    };
    let provider = match overflow.and_then(|m| m.overflow_location(&b.region)) {
        Some(location) => crate::upstream::provider_label(&location.provider),
        None => spillway_core::VERTEX_PROVIDER,
    };
    QuotaView {
        model: b.group.to_string(),
        region: b.region.to_string(),
        provider,
        configured: b.configured.into(),
        effective: b.effective.into(),
        used: b.usage.into(),
        in_flight: b.in_flight.into(),
        cooldown_ms: b.cooldown_remaining.as_millis() as u64,
        drained: b.drained,
        queued_interactive,
        queued_batch,
    }
}

pub async fn quotas(State(state): State<Arc<AppState>>) -> Json<Vec<QuotaView>> {
    let states = read_budgets(&state).await;
    Json(
        states
            .iter()
            .flat_map(|s| s.value.iter())
            .map(|b| quota_view(&state, b))
            .collect(),
    )
}

#[derive(Debug, Serialize)]
pub struct TenantView {
    pub name: String,
    pub weight: f64,
    pub max_wait_ms: Option<u64>,
    pub regions: Vec<String>,
    pub requests_per_min: Option<u32>,
    pub tokens_per_min: Option<u64>,
    /// Spent in the current UTC day and month, US dollars: the fleet's
    /// totals as the spend store last said, plus this replica's since.
    pub spend_usd_today: f64,
    pub spend_usd_month: f64,
    pub spend_cap_usd_per_day: Option<f64>,
    pub spend_cap_usd_per_month: Option<f64>,
}

pub async fn tenants(State(state): State<Arc<AppState>>) -> Json<Vec<TenantView>> {
    use spillway_core::spend::{usd_of_nanodollars, Period};
    let keys = state.keys.current();
    let spend = &state.spend;
    let mut views: Vec<TenantView> = keys
        .tenants()
        .map(|t| TenantView {
            name: t.name.to_string(),
            weight: t.policy.weight,
            max_wait_ms: t.policy.max_wait.map(|d| d.as_millis() as u64),
            regions: t.policy.regions.clone(),
            requests_per_min: t.policy.requests_per_min,
            tokens_per_min: t.policy.tokens_per_min,
            spend_usd_today: usd_of_nanodollars(spend.spent(&t.name, Period::Day)),
            spend_usd_month: usd_of_nanodollars(spend.spent(&t.name, Period::Month)),
            spend_cap_usd_per_day: t.policy.spend_caps.per_day.map(usd_of_nanodollars),
            spend_cap_usd_per_month: t.policy.spend_caps.per_month.map(usd_of_nanodollars),
        })
        .collect();
    // Without client auth, requests are the anonymous tenant's.
    if state.settings.server.auth == crate::config::ClientAuth::None
        && !views.iter().any(|v| v.name == "anonymous")
    {
        views.push(TenantView {
            name: "anonymous".into(),
            weight: 1.0,
            max_wait_ms: None,
            regions: Vec::new(),
            requests_per_min: None,
            tokens_per_min: None,
            spend_usd_today: usd_of_nanodollars(spend.spent("anonymous", Period::Day)),
            spend_usd_month: usd_of_nanodollars(spend.spent("anonymous", Period::Month)),
            spend_cap_usd_per_day: None,
            spend_cap_usd_per_month: None,
        });
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Json(views)
}

/// One model's pool as its users hold it (pool fractions of this replica's
/// part of the pool).
#[derive(Debug, Serialize)]
pub struct ShareView {
    pub model: String,
    pub interactive_demand: f64,
    pub interactive_held: f64,
    pub batch_held: f64,
    pub tenants: Vec<TenantShareView>,
}

#[derive(Debug, Serialize)]
pub struct TenantShareView {
    pub tenant: String,
    pub held: f64,
    pub demand: f64,
    pub share: f64,
}

/// Every model's pool as its users hold it now.
pub(crate) fn share_views(state: &AppState) -> Vec<ShareView> {
    state
        .forwarder
        .scheduler()
        .shares()
        .into_iter()
        .map(
            |(model, tenants, batch_held, interactive_demand)| ShareView {
                model: model.to_string(),
                interactive_demand,
                interactive_held: tenants.iter().map(|t| t.held).sum(),
                batch_held,
                tenants: tenants
                    .into_iter()
                    .map(|t| TenantShareView {
                        tenant: t.tenant.to_string(),
                        held: t.held,
                        demand: t.demand,
                        share: t.share,
                    })
                    .collect(),
            },
        )
        .collect()
}

pub async fn shares(State(state): State<Arc<AppState>>) -> Json<Vec<ShareView>> {
    Json(share_views(&state))
}

#[derive(Debug, Serialize)]
struct Drained {
    region: String,
    drained: bool,
    budgets: usize,
}

async fn set_drained(
    state: &AppState,
    region: String,
    drained: bool,
) -> Result<Response, ApiError> {
    let budgets = state
        .forwarder
        .scheduler()
        .store()
        .set_drained(&region, drained)
        .await;
    if budgets == 0 {
        return Err(ApiError::NotFound(format!(
            "region {region:?} serves no configured model"
        )));
    }
    tracing::warn!(%region, drained, budgets, "admin: region drain changed");
    Ok(Json(Drained {
        region,
        drained,
        budgets,
    })
    .into_response())
}

pub async fn drain(
    State(state): State<Arc<AppState>>,
    Path(region): Path<String>,
) -> Result<Response, ApiError> {
    set_drained(&state, region, true).await
}

pub async fn undrain(
    State(state): State<Arc<AppState>>,
    Path(region): Path<String>,
) -> Result<Response, ApiError> {
    set_drained(&state, region, false).await
}

/// A budget's new limits: requests, and the token limits the project has
/// (the combined one, the split ones, or both; at least one).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    pub requests_per_min: u32,
    pub tokens_per_min: Option<u64>,
    pub input_tokens_per_min: Option<u64>,
    pub output_tokens_per_min: Option<u64>,
}

/// `PUT /admin/quotas/{name}/{region}`: `name` is a model (id or alias),
/// standing for the bucket it draws on in `region` — its lineage's on
/// `global` and the multi-regions, its own in a region — or a bucket group.
pub async fn set_quota(
    State(state): State<Arc<AppState>>,
    Path((name, region)): Path<(String, String)>,
    body: Result<Json<SetQuota>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(q) = body.map_err(|e| ApiError::BadRequest(format!("body: {}", e.body_text())))?;
    let tokens = [
        q.tokens_per_min,
        q.input_tokens_per_min,
        q.output_tokens_per_min,
    ];
    if q.requests_per_min == 0 || tokens.contains(&Some(0)) {
        return Err(ApiError::BadRequest("limits must be positive".into()));
    }
    if tokens.iter().all(Option::is_none) {
        return Err(ApiError::BadRequest(
            "give tokens_per_min, or input_tokens_per_min and/or output_tokens_per_min".into(),
        ));
    }
    let limits = Limits {
        requests: q.requests_per_min,
        tokens: q.tokens_per_min,
        input_tokens: q.input_tokens_per_min,
        output_tokens: q.output_tokens_per_min,
    };
    let group: QuotaGroup = state.forwarder.catalog().bucket_of(&name, &region);
    let store = state.forwarder.scheduler().store();
    if !store.set_configured(&group, &region, limits).await {
        return Err(ApiError::NotFound(format!(
            "no budget for {name} in {region}"
        )));
    }
    tracing::warn!(%group, %region, ?limits, "admin: budget set");
    Ok(Json(LimitsView::from(limits)).into_response())
}

/// Applies a re-read configuration while serving: tenants (keys, weights,
/// caps) are replaced, and budgets whose configured limits changed are set
/// (their ledgers keep what was already spent). Models or regions added or
/// removed, and server/upstream settings, need a restart; they are logged.
pub async fn reload(state: &AppState, settings: Settings) {
    let ring =
        KeyRing::from_settings(&settings).with_failure_counter(state.metrics.auth_failures.clone());
    state.keys.replace(ring);
    state.spend.track(&crate::spend::tenants_of(&settings));
    reload_listener_tls(state, &settings).await;
    let Ok(catalog) = settings.catalog() else {
        tracing::error!("reload: the new model catalog is invalid; budgets unchanged");
        return;
    };
    let store = state.forwarder.scheduler().store();
    let current = store.states().await;
    for (group, region) in catalog.budgets() {
        let existing = current
            .iter()
            .find(|b| b.group == *group && *b.region == region.region);
        match existing {
            Some(b) if b.configured == region.limits => {}
            Some(_) => {
                store
                    .set_configured(group, &region.region, region.limits)
                    .await;
                tracing::warn!(model = %group, region = %region.region, limits = ?region.limits, "reload: budget changed");
            }
            None => {
                tracing::warn!(model = %group, region = %region.region, "reload: new region-model needs a restart")
            }
        }
    }
    if settings.telemetry != state.settings.telemetry {
        tracing::warn!(
            "reload: [telemetry] changed; the trace exporter keeps its settings until a restart"
        );
    }
    tracing::info!(tenants = settings.tenants.len(), "configuration reloaded");
}

/// SIGHUP and the listener's TLS: the certificate files are read again (a
/// new pair serves new connections); other TLS settings need a restart.
async fn reload_listener_tls(state: &AppState, settings: &Settings) {
    let (was, now) = (&state.settings.server, &settings.server);
    if was.tls_client_ca != now.tls_client_ca || was.client_cert != now.client_cert {
        tracing::warn!(
            "reload: server.tls_client_ca and server.client_cert take effect at the next restart"
        );
    }
    match &state.listener_tls {
        Some(tls) => {
            if !tls.serves(now) {
                tracing::warn!("reload: server.tls_cert / tls_key name other files (or none): restart to use them; the configured files are read again");
            }
            let tls = Arc::clone(tls);
            let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
        }
        None if now.tls() => {
            tracing::warn!(
                "reload: TLS on the listener (server.tls_cert) takes effect at the next restart"
            );
        }
        None => {}
    }
}
