//! What each model has learned about its requests' sizes, kept per model
//! (input rates and margins) and per model and tenant (output lengths).
//!
//! The learning itself is pure and lives in [`spillway_core::learn`]; this
//! module only owns the state, behind one short lock per model, and chooses
//! the policies config asks for: `quota.learn_estimates` (off: the priors
//! and the default margin, never corrected) and `quota.output_reserve`
//! (`learned`, or `max_tokens` as Vertex's documentation reads).
//!
//! Reading happens on the request path (a few multiplications under an
//! uncontended lock); writing happens when an answer settles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use spillway_core::estimate::{Features, InputEstimate};
use spillway_core::learn::{
    expected_output, max_tokens_class, InputModel, InputReserve, OutputModel, Quantile,
};
use spillway_core::{ModelId, ModelSpec, Rates};

use crate::fast_hash::FastHash;

/// How the output side of a request is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputReserve {
    /// What this tenant's (else this model's) recent answers of the same
    /// `max_tokens` class generated, at the margin quantile, capped by
    /// `max_tokens`.
    #[default]
    Learned,
    /// Always `max_tokens`: a window can never go over its output limit,
    /// at the price of holding quota nobody uses.
    MaxTokens,
}

/// How long a prompt prefix is trusted to stay cached after it was last
/// seen read or written: Anthropic's 5-minute cache, less a margin.
pub const CACHE_TRUST: Duration = Duration::from_secs(270);

/// Anthropic caches no prefix shorter than 1,024 tokens (2,048 on Haiku
/// models): a shorter breakpoint is never predicted to be read.
const MIN_CACHED_PREFIX: u64 = 2048;

#[derive(Debug)]
struct Learned {
    input: InputModel,
    /// Prompt prefixes answers showed cached: (fingerprint, location) →
    /// when.
    cached: HashMap<(u64, Arc<str>), Instant, FastHash>,
    /// The model's outputs by `max_tokens` class, for tenants with no
    /// history of their own.
    output: OutputModel,
    by_tenant: HashMap<Arc<str>, OutputModel, FastHash>,
}

/// Per-model estimate learning.
#[derive(Debug)]
pub struct EstimateLearner {
    learn: bool,
    output_reserve: OutputReserve,
    quantile: Quantile,
    models: HashMap<ModelId, Mutex<Learned>, FastHash>,
}

impl EstimateLearner {
    pub fn new<'a>(
        models: impl IntoIterator<Item = &'a ModelSpec>,
        learn: bool,
        output_reserve: OutputReserve,
        quantile: Quantile,
    ) -> Self {
        let models = models
            .into_iter()
            .map(|m| {
                let learned = Learned {
                    input: InputModel::new(Rates::prior(m.chars_per_token), quantile),
                    cached: HashMap::default(),
                    output: OutputModel::default(),
                    by_tenant: HashMap::default(),
                };
                (m.id.clone(), Mutex::new(learned))
            })
            .collect();
        Self {
            learn,
            output_reserve,
            quantile,
            models,
        }
    }

    fn lock(&self, model: &ModelId) -> Option<MutexGuard<'_, Learned>> {
        self.models
            .get(model)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What to reserve for a body's input.
    pub fn input(&self, model: &ModelSpec, estimate: &InputEstimate) -> InputReserve {
        match self.lock(&model.id) {
            Some(learned) => learned.input.reserve(estimate),
            None => InputModel::new(Rates::prior(model.chars_per_token), self.quantile)
                .reserve(estimate),
        }
    }

    /// The measure of the longest prompt prefix (up to a `cache_control`
    /// breakpoint) that answers showed cached in *every* one of
    /// `locations` within [`CACHE_TRUST`]: what this request will read from
    /// the cache wherever routing sends it. Only a prefix cached wherever
    /// the request may go counts, so a spill to a cold location cannot turn
    /// the prediction into an under-reservation.
    pub fn cached_prefix(
        &self,
        model: &ModelId,
        estimate: &InputEstimate,
        locations: &[Arc<str>],
    ) -> Option<Features> {
        if estimate.breakpoint_count == 0 || locations.is_empty() {
            return None;
        }
        let learned = self.lock(model)?;
        let now = Instant::now();
        estimate
            .breakpoints()
            .iter()
            .rev()
            .find(|bp| {
                locations.iter().all(|loc| {
                    learned
                        .cached
                        .get(&(bp.fingerprint, Arc::clone(loc)))
                        .is_some_and(|at| now.duration_since(*at) <= CACHE_TRUST)
                })
            })
            .map(|bp| bp.features)
    }

    /// What to reserve for a request's output.
    pub fn output(&self, model: &ModelId, tenant: &str, max_tokens: u64) -> u64 {
        if self.output_reserve == OutputReserve::MaxTokens {
            return max_tokens;
        }
        let Some(learned) = self.lock(model) else {
            return max_tokens;
        };
        let class = max_tokens_class(max_tokens);
        let own = learned.by_tenant.get(tenant).map(|h| &h[class]);
        expected_output(own, Some(&learned.output), class, max_tokens)
    }

    /// Learns from one settled answer.
    pub fn observe(&self, model: &ModelId, tenant: &Arc<str>, observed: Observed<'_>) {
        let Some(mut learned) = self.lock(model) else {
            return;
        };
        if self.learn {
            learned.input.observe(observed.estimate, observed.input);
        }
        if observed.cached > 0 && observed.estimate.breakpoint_count > 0 {
            let now = Instant::now();
            learned
                .cached
                .retain(|_, at| now.duration_since(*at) <= CACHE_TRUST);
            let rates = *learned.input.rates();
            for bp in observed.estimate.breakpoints() {
                // Prefixes under the smallest cacheable length are not
                // cached; leaving one out only over-reserves.
                if rates.tokens(&bp.features) >= MIN_CACHED_PREFIX as f64 {
                    let key = (bp.fingerprint, Arc::clone(observed.location));
                    learned.cached.insert(key, now);
                }
            }
        }
        let class = max_tokens_class(observed.max_tokens);
        learned.output[class].observe(observed.output, self.quantile);
        let q = self.quantile;
        learned.by_tenant.entry(Arc::clone(tenant)).or_default()[class].observe(observed.output, q);
    }
}

/// One settled answer, as learning needs it.
pub struct Observed<'a> {
    pub estimate: &'a InputEstimate,
    pub max_tokens: u64,
    /// Every input token of the prompt (new, cache writes and reads): what
    /// the body's measure describes.
    pub input: u64,
    pub output: u64,
    /// Cache reads plus writes: the prompt prefix now cached in `location`.
    pub cached: u64,
    pub location: &'a Arc<str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use spillway_core::estimate::estimate_input;
    use spillway_core::ImageRule;

    fn spec() -> ModelSpec {
        ModelSpec {
            id: "claude-3-haiku@20240307".into(),
            aliases: Vec::new(),
            context_window: 200_000,
            chars_per_token: 3.5,
            regions: Vec::new(),
            quota_group: "claude-3-haiku@20240307".into(),
            cache_reads_count: true,
            prices: None,
            overflow: Vec::new(),
        }
    }

    fn measure(text: &str) -> InputEstimate {
        let Value::Object(body) = json!({"messages": [{"role": "user", "content": text}]}) else {
            unreachable!()
        };
        estimate_input(&body, ImageRule::default())
    }

    /// An answer of `output` tokens (uncached) for `e`, from us-east5.
    fn answer<'a>(e: &'a InputEstimate, loc: &'a Arc<str>, output: u64) -> Observed<'a> {
        Observed {
            estimate: e,
            max_tokens: 32_000,
            input: 9,
            output,
            cached: 0,
            location: loc,
        }
    }

    #[test]
    fn outputs_are_learned_per_tenant_then_per_model() {
        let m = spec();
        let l = EstimateLearner::new([&m], true, OutputReserve::Learned, Quantile::default());
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let loc: Arc<str> = Arc::from("us-east5");
        assert_eq!(l.output(&m.id, "a", 32_000), 32_000);
        let e = measure("hello there");
        for _ in 0..5 {
            l.observe(&m.id, &a, answer(&e, &loc, 150));
        }
        assert_eq!(l.output(&m.id, "a", 32_000), 150);
        // Tenant b has no history: the model's.
        assert_eq!(l.output(&m.id, "b", 32_000), 150);
        l.observe(&m.id, &b, answer(&e, &loc, 20_000));
        assert_eq!(l.output(&m.id, "b", 32_000), 20_000);
        assert_eq!(
            l.output(&m.id, "a", 32_000),
            150,
            "b's answers do not raise a's reserve"
        );
        // Another max_tokens class has its own history, capped by max_tokens.
        assert_eq!(l.output(&m.id, "a", 100), 100);
        let fixed = EstimateLearner::new([&m], true, OutputReserve::MaxTokens, Quantile::default());
        fixed.observe(&m.id, &a, answer(&e, &loc, 150));
        assert_eq!(fixed.output(&m.id, "a", 32_000), 32_000);
    }

    /// A 5,000-token prompt answered from `loc` with 4,900 of it cached.
    fn cached_answer<'a>(e: &'a InputEstimate, loc: &'a Arc<str>) -> Observed<'a> {
        Observed {
            input: 5_000,
            cached: 4_900,
            ..answer(e, loc, 1)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefix_counts_as_cached_only_where_every_location_has_it() {
        let m = spec();
        let l = EstimateLearner::new([&m], true, OutputReserve::Learned, Quantile::default());
        let Value::Object(body) = json!({
            "system": [{"type": "text", "text": "You are an agent. ".repeat(1_000), "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "go"}],
        }) else {
            unreachable!()
        };
        let e = estimate_input(&body, ImageRule::default());
        let system = e.breakpoints()[0].features;
        let (us, eu): (Arc<str>, Arc<str>) = (Arc::from("us-east5"), Arc::from("europe-west1"));
        let both = [Arc::clone(&us), Arc::clone(&eu)];
        let a: Arc<str> = Arc::from("a");
        assert_eq!(l.cached_prefix(&m.id, &e, &both), None);
        l.observe(&m.id, &a, cached_answer(&e, &us));
        assert_eq!(
            l.cached_prefix(&m.id, &e, std::slice::from_ref(&us)),
            Some(system)
        );
        assert_eq!(
            l.cached_prefix(&m.id, &e, &both),
            None,
            "europe-west1 has not cached it"
        );
        l.observe(&m.id, &a, cached_answer(&e, &eu));
        assert_eq!(l.cached_prefix(&m.id, &e, &both), Some(system));
        tokio::time::advance(CACHE_TRUST + Duration::from_secs(1)).await;
        assert_eq!(
            l.cached_prefix(&m.id, &e, &both),
            None,
            "trusted no longer than the cache lives"
        );
    }

    #[test]
    fn disabled_learning_keeps_the_priors() {
        let m = spec();
        let l = EstimateLearner::new([&m], false, OutputReserve::Learned, Quantile::default());
        let e = measure(&"word ".repeat(1000));
        let before = l.input(&m, &e);
        let a: Arc<str> = Arc::from("a");
        let loc: Arc<str> = Arc::from("us-east5");
        l.observe(
            &m.id,
            &a,
            Observed {
                estimate: &e,
                max_tokens: 10,
                input: 100_000,
                output: 1,
                cached: 0,
                location: &loc,
            },
        );
        assert_eq!(l.input(&m, &e), before);
    }
}
