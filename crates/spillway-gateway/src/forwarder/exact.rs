//! Exact input counts from Vertex's `count-tokens`, when they pay.
//!
//! An estimate, however well learned, is a guess with a margin. For a big
//! request the margin is worth thousands of tokens, and it decides things:
//! whether the request fits a location's room *now* or waits, whether it
//! needs a whole empty window. Vertex's `count-tokens` (free, a round trip)
//! answers exactly. So with `quota.count_tokens_above = N`, a request whose
//! estimate is at least N tokens is counted — but only where the count can
//! change the decision:
//!
//! - its reservation had to be cut to what an empty location takes (the
//!   count says whether it really needs a whole window, or can never fit);
//! - or it does not fit any eligible location's room now, while its floor
//!   does (the count may let it in at once instead of waiting).
//!
//! The count has a deadline (`quota.count_tokens_timeout_ms`); a timeout or
//! an error falls back to the estimate, and nothing is refused for it. An
//! exact count replaces the padded estimate with no margin; the output
//! side is unchanged. A body with cache breakpoints on a model whose cache
//! reads do not count is not counted (the count includes the cached
//! prefix, which the cache-aware charge leaves out). Each count is counted
//! in `spillway_count_tokens_total{model,outcome}`.

use std::sync::Arc;

use serde_json::Value;
use spillway_core::ledger::Charge;
use spillway_core::store::ReserveRequest;
use spillway_vertex::Operation;

use super::call::{fitted, Call, Plan};
use super::Forwarder;
use crate::answer::ForwardError;
use crate::upstream::ProviderRequest;

impl Forwarder {
    /// Whether an exact count could change what happens to `plan`.
    async fn count_pays(&self, call: &Call<'_>, regions: &[Arc<str>], plan: &Plan) -> bool {
        let Some(threshold) = self.policy.count_tokens_above else {
            return false;
        };
        let reads_cache = plan.estimate.breakpoint_count > 0 && !call.model.cache_reads_count;
        if plan.input.point < threshold || reads_cache {
            return false;
        }
        if plan.charge.input < plan.input.reserved {
            return true; // cut to an empty window
        }
        let group = call.model.requester();
        let probe = |charge: Charge| ReserveRequest {
            group: &group,
            regions,
            charge,
            strategy: self.policy.strategy,
        };
        let store = self.scheduler.store();
        let floor = Charge {
            input: plan.estimate.floor(),
            output: plan.charge.output,
        };
        store.probe(probe(plan.charge)).await.is_err() && store.probe(probe(floor)).await.is_ok()
    }

    /// Replaces `plan`'s input with Vertex's exact count where it pays.
    /// Refuses only on the exact count itself (never on a failed count).
    pub(super) async fn count_exactly(
        &self,
        call: &Call<'_>,
        regions: &[Arc<str>],
        plan: &mut Plan,
    ) -> Result<(), ForwardError> {
        if !self.count_pays(call, regions, plan).await {
            return Ok(());
        }
        let Some(exact) = self.count_tokens_upstream(call, regions).await else {
            return Ok(());
        };
        let ceilings = self.ceilings(call, regions);
        let least = Charge {
            input: exact,
            output: 0,
        };
        if !ceilings.iter().any(|l| l.admits(least)) {
            return Err(ForwardError::Invalid(format!(
                "request can never fit the quota: Vertex counts {exact} input tokens, more than the per-minute input budget of every eligible region; split the prompt"
            )));
        }
        let wanted = Charge {
            input: exact,
            output: self.estimates.output(
                &call.model.id,
                &call.request.tenant.name,
                plan.max_tokens,
            ),
        };
        plan.input.point = exact;
        plan.input.reserved = exact;
        plan.charge = fitted(&ceilings, least, wanted);
        Ok(())
    }

    /// One `count-tokens` call to the first eligible location, within the
    /// configured deadline; `None` on any failure.
    async fn count_tokens_upstream(&self, call: &Call<'_>, regions: &[Arc<str>]) -> Option<u64> {
        let location = call
            .model
            .regions
            .iter()
            .find(|r| *r.region == *regions[0])?;
        let provider = self.providers.get(&location.provider)?;
        let body = provider.encode(
            call.request.body.clone(),
            Operation::CountTokens,
            &call.model.id,
        );
        let send = provider.send(ProviderRequest {
            location: &regions[0],
            model: &call.model.id,
            op: Operation::CountTokens,
            stream: false,
            body,
            beta: call.request.beta.clone(),
        });
        let outcome = match tokio::time::timeout(self.policy.count_tokens_timeout, async {
            let response = send.await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let bytes = response.bytes().await.ok()?;
            serde_json::from_slice::<Value>(&bytes)
                .ok()?
                .get("input_tokens")?
                .as_u64()
        })
        .await
        {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err("error"),
            Err(_) => Err("timeout"),
        };
        self.observer.counted_tokens(
            call.model.id.as_str(),
            outcome.map_or_else(|label| label, |_| "ok"),
        );
        outcome.ok()
    }
}
