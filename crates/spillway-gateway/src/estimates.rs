//! Learning how wrong the input estimate is, per model.
//!
//! The chars/3.5 rule is a rule of thumb: real tokenizers disagree by tens
//! of percent depending on language and content. Each response tells us
//! the true input count, so Spillway keeps, per model, an exponentially
//! weighted mean and variance of `actual / estimate` and reserves
//! `estimate × (mean + 2σ)`: close to the truth on average, above it for
//! most requests (an under-reservation is the one way a window can go over
//! budget). The factor is bounded to [0.5, 2.0] so a few odd requests
//! cannot make estimates absurd.

use std::collections::HashMap;
use std::sync::Mutex;

use spillway_core::ModelId;

const WEIGHT: f64 = 0.1;
const MIN_FACTOR: f64 = 0.5;
const MAX_FACTOR: f64 = 2.0;

#[derive(Debug, Clone, Copy)]
struct Correction {
    mean: f64,
    variance: f64,
    samples: u64,
}

impl Default for Correction {
    fn default() -> Self {
        Self {
            mean: 1.0,
            variance: 0.0,
            samples: 0,
        }
    }
}

/// Per-model estimate corrections.
#[derive(Debug)]
pub struct EstimateLearner {
    enabled: bool,
    models: HashMap<ModelId, Mutex<Correction>>,
}

impl EstimateLearner {
    pub fn new(models: &[ModelId], enabled: bool) -> Self {
        Self {
            enabled,
            models: models
                .iter()
                .map(|m| (m.clone(), Mutex::default()))
                .collect(),
        }
    }

    /// The multiplier for a model's raw input estimate.
    pub fn factor(&self, model: &ModelId) -> f64 {
        if !self.enabled {
            return 1.0;
        }
        let Some(c) = self.models.get(model) else {
            return 1.0;
        };
        let c = *c.lock().unwrap_or_else(|p| p.into_inner());
        if c.samples == 0 {
            return 1.0;
        }
        (c.mean + 2.0 * c.variance.sqrt()).clamp(MIN_FACTOR, MAX_FACTOR)
    }

    /// Records one request's raw estimate against its actual input tokens.
    /// Returns the ratio, for metrics.
    pub fn observe(&self, model: &ModelId, estimated: u64, actual: u64) -> Option<f64> {
        if estimated == 0 {
            return None;
        }
        let ratio = actual as f64 / estimated as f64;
        if let Some(c) = self.models.get(model) {
            let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
            if c.samples == 0 {
                c.mean = ratio;
            } else {
                let delta = ratio - c.mean;
                c.mean += WEIGHT * delta;
                c.variance = (1.0 - WEIGHT) * (c.variance + WEIGHT * delta * delta);
            }
            c.samples += 1;
        }
        Some(ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converges_above_a_steady_ratio_and_stays_bounded() {
        let m = ModelId::from("m");
        let l = EstimateLearner::new(std::slice::from_ref(&m), true);
        assert_eq!(l.factor(&m), 1.0);
        for i in 0..200 {
            // Actual is 1.2× to 1.4× the estimate.
            l.observe(&m, 1000, 1200 + (i % 3) * 100);
        }
        let f = l.factor(&m);
        assert!(f > 1.3 && f < 1.6, "{f}");
        for _ in 0..200 {
            l.observe(&m, 1000, 100_000);
        }
        assert_eq!(l.factor(&m), MAX_FACTOR);
    }

    #[test]
    fn disabled_means_no_correction() {
        let m = ModelId::from("m");
        let l = EstimateLearner::new(std::slice::from_ref(&m), false);
        l.observe(&m, 100, 300);
        assert_eq!(l.factor(&m), 1.0);
    }
}
