//! Turning a body's measure into a reservation, and learning from every
//! answer how far off it was.
//!
//! Two things are reserved before a request is sent, and both are learned
//! from the usage its answer reports:
//!
//! - **Input** ([`InputModel`]): the body's [`Features`] times a rate per
//!   feature, padded by a margin per [`ContentClass`]. The rates start at
//!   [`Rates::prior`] and move by an exponentiated-gradient step after each
//!   answer. Only the group that made most of the estimate learns: a
//!   "Hello!" turn is mostly overhead, so it corrects the overheads and
//!   nothing else; a 100-page document is mostly letters and words, so it
//!   corrects those and leaves the overheads alone. Inside the group the log
//!   of actual/estimate is shared among the features *in proportion to the
//!   part of the estimate each one made*, so CJK text corrects the CJK rate.
//!   A feature a request does not contain is never touched, so one kind of
//!   content cannot inflate another's estimate. Each step is
//!   bounded (the log-ratio is clipped to ±ln 2, so one outlier moves a rate
//!   by at most 2^η), every rate stays within [prior/4, prior×4], and
//!   recent answers outweigh old ones (each step moves the rates a fraction
//!   of the remaining error: an exponential forgetting of older evidence).
//! - **The margin**: the `q`-quantile (`quota.estimate_margin`, 0.95 by
//!   default) of actual/estimate over the last [`MARGIN_SAMPLES`] answers of
//!   the same content class, at least 1 and at most [`MAX_MARGIN`]. A high
//!   quantile, not mean + 2σ: errors are skewed, and a quantile says
//!   directly how often the reservation is expected to fall short.
//! - **Output** ([`OutputModel`]): what a request will generate, not what
//!   it may. The `q`-quantile of the last [`OUTPUT_SAMPLES`] outputs for the
//!   same (tenant, `max_tokens` class), capped by `max_tokens`; with no
//!   history of its own, the model's history for that class, then the
//!   longest the model expects in any class; with none at all, `max_tokens`.
//!
//! Actual usage always replaces the reservation at settlement: what is
//! learned here changes only what is *held* while a request runs.

use crate::estimate::{ContentClass, Feature, Features, InputEstimate, Rates, CONTENT_CLASSES};

/// How far one answer moves the rates towards explaining it (0 < η ≤ 1).
const ETA: f64 = 0.5;
/// One answer's log-ratio counts at most this much (a factor of 2).
const MAX_STEP: f64 = std::f64::consts::LN_2;
/// Rates stay within a factor of this of their priors.
const RATE_BOUND: f64 = 4.0;
/// Answers remembered per content class for the margin.
pub const MARGIN_SAMPLES: usize = 32;
/// The margin before a class has any history.
pub const DEFAULT_MARGIN: f64 = 1.1;
/// The largest margin: beyond it the rates, not the margin, must adapt.
pub const MAX_MARGIN: f64 = 1.5;
/// Outputs remembered per (tenant, `max_tokens` class).
pub const OUTPUT_SAMPLES: usize = 16;

/// A quantile in [0.5, 1], as `quota.estimate_margin` gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantile(f64);

impl Quantile {
    pub fn new(q: f64) -> Option<Self> {
        (0.5..=1.0).contains(&q).then_some(Self(q))
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// The nearest-rank quantile of `samples` (any order).
    fn of(self, samples: &mut [f64]) -> Option<f64> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let rank = ((self.0 * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        Some(samples[rank - 1])
    }
}

impl Default for Quantile {
    fn default() -> Self {
        Self(0.95)
    }
}

/// The last few values of something, oldest overwritten first.
#[derive(Debug, Clone, Copy)]
struct Ring<const N: usize> {
    values: [f64; N],
    len: usize,
    next: usize,
}

impl<const N: usize> Default for Ring<N> {
    fn default() -> Self {
        Self {
            values: [0.0; N],
            len: 0,
            next: 0,
        }
    }
}

impl<const N: usize> Ring<N> {
    fn push(&mut self, value: f64) {
        self.values[self.next] = value;
        self.next = (self.next + 1) % N;
        self.len = (self.len + 1).min(N);
    }

    fn quantile(&self, q: Quantile) -> Option<f64> {
        let mut copy = self.values;
        q.of(&mut copy[..self.len])
    }
}

/// What to reserve for one body's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputReserve {
    /// The estimate at the learned rates.
    pub point: u64,
    /// `point` × the class's margin: what admission holds.
    pub reserved: u64,
    pub class: ContentClass,
}

/// One model's input rates and margins.
#[derive(Debug, Clone)]
pub struct InputModel {
    prior: Rates,
    rates: Rates,
    quantile: Quantile,
    margins: [Margin; CONTENT_CLASSES],
}

#[derive(Debug, Clone, Copy, Default)]
struct Margin {
    recent: Ring<MARGIN_SAMPLES>,
    /// The quantile of `recent`, kept so reserving reads one number.
    value: Option<f64>,
}

impl InputModel {
    pub fn new(prior: Rates, quantile: Quantile) -> Self {
        Self {
            prior,
            rates: prior,
            quantile,
            margins: [Margin::default(); CONTENT_CLASSES],
        }
    }

    pub fn rates(&self) -> &Rates {
        &self.rates
    }

    /// The margin reserved above the point estimate for `class`.
    pub fn margin(&self, class: ContentClass) -> f64 {
        self.margins[class as usize]
            .value
            .unwrap_or(DEFAULT_MARGIN)
            .clamp(1.0, MAX_MARGIN)
    }

    pub fn reserve(&self, estimate: &InputEstimate) -> InputReserve {
        let point = estimate.tokens(&self.rates);
        let class = estimate.class(&self.rates);
        let reserved = (point as f64 * self.margin(class)).ceil() as u64;
        InputReserve {
            point,
            reserved,
            class,
        }
    }

    /// Learns from one answer: `actual` input tokens for `estimate`'s body.
    /// Returns actual / point estimate before learning, if both are
    /// positive.
    pub fn observe(&mut self, estimate: &InputEstimate, actual: u64) -> Option<f64> {
        let point = self.rates.tokens(&estimate.features);
        if point <= 0.0 || actual == 0 || !point.is_finite() {
            return None;
        }
        let ratio = actual as f64 / point;
        let class = estimate.class(&self.rates);
        let margin = &mut self.margins[class as usize];
        margin.recent.push(ratio);
        margin.value = margin.recent.quantile(self.quantile);
        self.step(&estimate.features, point, ratio);
        Some(ratio)
    }

    /// One exponentiated-gradient step. Only the group that made most of
    /// the estimate learns — the overheads from requests they dominate,
    /// the content rates from the rest — so tiny turns never move a
    /// document's rates and documents never move the overheads. Inside the
    /// group, each feature takes the correction in proportion to its part.
    fn step(&mut self, features: &Features, point: f64, ratio: f64) {
        let part = |f: Feature| self.rates.get(f) * features.get(f) as f64 / point;
        let overhead = part(Feature::Request) + part(Feature::Message);
        let learns_overhead = overhead >= 0.5;
        let group = if learns_overhead {
            overhead
        } else {
            1.0 - overhead
        };
        if group <= 0.0 {
            return;
        }
        // The log-correction the group needs to explain the whole error.
        let error = (1.0 + (ratio - 1.0) / group)
            .max(f64::MIN_POSITIVE)
            .ln()
            .clamp(-MAX_STEP, MAX_STEP);
        let mut next = self.rates;
        for f in Feature::ALL {
            let is_overhead = matches!(f, Feature::Request | Feature::Message);
            if features.get(f) == 0 || is_overhead != learns_overhead {
                continue;
            }
            let i = f as usize;
            let prior = self.prior.0[i];
            next.0[i] = (self.rates.0[i] * (ETA * part(f) / group * error).exp())
                .clamp(prior / RATE_BOUND, prior * RATE_BOUND);
        }
        self.rates = next;
    }
}

/// `max_tokens` in five classes (≤256, ≤1024, ≤4096, ≤16384, more): a client
/// asking for 32k and one asking for 256 are different kinds of request.
pub const MAX_TOKENS_CLASSES: usize = 5;

pub fn max_tokens_class(max_tokens: u64) -> usize {
    match max_tokens {
        0..=256 => 0,
        257..=1024 => 1,
        1025..=4096 => 2,
        4097..=16384 => 3,
        _ => 4,
    }
}

/// Recent output lengths for one (tenant or model, `max_tokens` class).
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputHistory {
    recent: Ring<OUTPUT_SAMPLES>,
    value: Option<f64>,
}

impl OutputHistory {
    pub fn observe(&mut self, output: u64, quantile: Quantile) {
        self.recent.push(output as f64);
        self.value = self.recent.quantile(quantile);
    }

    /// The expected output, if any was seen.
    pub fn expected(&self) -> Option<u64> {
        self.value.map(|v| v.ceil() as u64)
    }
}

/// What a request is expected to generate: its own history first, then its
/// model's for its class, then the longest its model expects in any class,
/// else all it may.
pub fn expected_output(
    own: Option<&OutputHistory>,
    model: Option<&OutputModel>,
    class: usize,
    max_tokens: u64,
) -> u64 {
    own.and_then(OutputHistory::expected)
        .or_else(|| model.and_then(|m| m.get(class)?.expected()))
        .or_else(|| model.and_then(|m| m.iter().filter_map(OutputHistory::expected).max()))
        .map_or(max_tokens, |e| e.min(max_tokens))
}

/// Per-model output histories, by `max_tokens` class.
pub type OutputModel = [OutputHistory; MAX_TOKENS_CLASSES];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::{estimate_input, ImageRule};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn measure(content: &str) -> InputEstimate {
        let Value::Object(body): Value =
            json!({"messages": [{"role": "user", "content": content}]})
        else {
            unreachable!()
        };
        estimate_input(&body, ImageRule::default())
    }

    fn model() -> InputModel {
        InputModel::new(Rates::prior(3.5), Quantile::default())
    }

    /// A truth unlike the priors: overheads 10 tokens, CJK 1.3 a
    /// character, letters 0.3.
    fn truth(e: &InputEstimate) -> u64 {
        let f = &e.features;
        (10.0 * f.get(Feature::Request) as f64
            + 0.3 * f.get(Feature::Letter) as f64
            + 0.2 * f.get(Feature::Word) as f64
            + 1.0 * f.get(Feature::Punct) as f64
            + 1.3 * f.get(Feature::Cjk) as f64
            + 3.0 * f.get(Feature::Message) as f64)
            .ceil() as u64
    }

    fn prose(words: usize) -> String {
        ["alpha ", "beta, ", "gamma ", "delta. "]
            .iter()
            .cycle()
            .take(words)
            .copied()
            .collect()
    }

    #[test]
    fn small_prompts_teach_overheads_and_leave_the_prose_rate_alone() {
        let mut m = model();
        let big = measure(&prose(40_000));
        let before = m.reserve(&big);
        for _ in 0..50 {
            let tiny = measure("Hello!");
            m.observe(&tiny, truth(&tiny));
        }
        let tiny = measure("Hello!");
        let r = m.reserve(&tiny);
        assert!(r.reserved >= truth(&tiny), "{r:?} vs {}", truth(&tiny));
        assert_eq!(r.class, ContentClass::Tiny);
        let after = m.reserve(&big);
        // The big prompt's estimate moved by its overheads' share only.
        let moved = after.point as f64 / before.point as f64;
        assert!((0.98..1.02).contains(&moved), "{moved}");
    }

    #[test]
    fn cjk_traffic_does_not_raise_english_estimates() {
        let mut m = model();
        let english = measure(&prose(4_000));
        let before = m.reserve(&english);
        for _ in 0..40 {
            let cjk = measure(&"東京は日本の首都です".repeat(300));
            // Wildly more than the prior: 3.5 tokens a character.
            let actual = (cjk.features.get(Feature::Cjk) as f64 * 3.5) as u64;
            m.observe(&cjk, actual);
        }
        let after = m.reserve(&english);
        assert_eq!(after, before);
        let cjk = measure(&"東京は日本の首都です".repeat(300));
        let expected = cjk.features.get(Feature::Cjk) as f64 * 3.5;
        let r = m.reserve(&cjk);
        assert!(
            r.reserved as f64 >= expected && (r.reserved as f64) < expected * 1.25,
            "{r:?}"
        );
    }

    #[test]
    fn a_mixed_workload_converges_to_within_the_margin() {
        let mut m = model();
        let bodies: Vec<InputEstimate> = [
            "Hi!".to_string(),
            prose(30),
            prose(20_000),
            "東京は日本の首都です。".repeat(50),
            format!("{} 東京 {}", prose(200), "日本".repeat(100)),
        ]
        .iter()
        .map(|s| measure(s))
        .collect();
        for round in 0..60 {
            for e in &bodies {
                if round >= 40 {
                    let r = m.reserve(e);
                    let ratio = r.reserved as f64 / truth(e) as f64;
                    assert!((1.0..=1.25).contains(&ratio), "{:?}: {ratio}", r.class);
                }
                m.observe(e, truth(e));
            }
        }
    }

    #[test]
    fn outliers_move_rates_a_bounded_step() {
        let mut m = model();
        let e = measure(&prose(1_000));
        let before = m.rates().get(Feature::Letter);
        m.observe(&e, 1_000_000);
        let after = m.rates().get(Feature::Letter);
        assert!(
            after <= before * 2f64.powf(ETA) + 1e-12,
            "{before} → {after}"
        );
        for _ in 0..1_000 {
            m.observe(&e, 1_000_000_000);
        }
        assert!(
            m.rates().get(Feature::Letter) <= Rates::prior(3.5).get(Feature::Letter) * RATE_BOUND
        );
        assert!(m.margin(ContentClass::Prose) <= MAX_MARGIN);
    }

    #[test]
    fn the_margin_is_a_high_quantile_of_recent_errors() {
        let mut q = [1.0, 1.3, 1.1, 1.2, 0.9, 1.05, 1.15, 1.0, 1.25, 1.1];
        assert_eq!(Quantile::new(0.95).unwrap().of(&mut q), Some(1.3));
        assert_eq!(Quantile::new(0.5).unwrap().of(&mut q), Some(1.1));
        assert_eq!(Quantile::new(0.4), None);
        assert_eq!(Quantile::new(1.01), None);
        assert_eq!(Quantile::default().of(&mut []), None);
    }

    #[test]
    fn output_is_expected_from_history_capped_by_max_tokens() {
        let q = Quantile::default();
        let mut own = OutputHistory::default();
        let mut model = OutputModel::default();
        assert_eq!(expected_output(None, None, 4, 32_000), 32_000);
        assert_eq!(expected_output(Some(&own), Some(&model), 4, 32_000), 32_000);
        // Another class's history is better than nothing...
        model[1].observe(90, q);
        assert_eq!(expected_output(Some(&own), Some(&model), 4, 32_000), 90);
        // ...and the class's own is better still.
        model[4].observe(400, q);
        assert_eq!(expected_output(Some(&own), Some(&model), 4, 32_000), 400);
        for n in [140, 150, 160, 150, 155] {
            own.observe(n, q);
        }
        assert_eq!(expected_output(Some(&own), Some(&model), 4, 32_000), 160);
        assert_eq!(expected_output(Some(&own), None, 4, 100), 100);
        // Old lengths are forgotten after OUTPUT_SAMPLES newer ones.
        own.observe(9_000, q);
        assert_eq!(own.expected(), Some(9_000));
        for _ in 0..OUTPUT_SAMPLES {
            own.observe(150, q);
        }
        assert_eq!(own.expected(), Some(150));
        assert_eq!(max_tokens_class(256), 0);
        assert_eq!(max_tokens_class(32_000), 4);
    }

    proptest! {
        #[test]
        fn rates_stay_bounded_and_finite(
            steps in prop::collection::vec((0usize..4, 0u64..10_000_000), 1..200),
        ) {
            let mut m = model();
            let bodies = [measure("Hi"), measure(&prose(500)), measure(&"日本".repeat(300)), measure("")];
            for (which, actual) in steps {
                m.observe(&bodies[which], actual);
                for f in Feature::ALL {
                    let (r, p) = (m.rates().get(f), Rates::prior(3.5).get(f));
                    prop_assert!(r.is_finite() && r >= p / RATE_BOUND - 1e-12 && r <= p * RATE_BOUND + 1e-12);
                }
                for c in ContentClass::ALL {
                    prop_assert!((1.0..=MAX_MARGIN).contains(&m.margin(c)));
                }
            }
        }
    }
}
