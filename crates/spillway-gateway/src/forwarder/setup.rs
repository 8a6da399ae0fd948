//! Locations that cannot serve a model because of how the gateway's own
//! project is set up, not because of the request or the quota.
//!
//! Per-region Model Garden access is common: a project may have a model
//! enabled in one region and not in another, and Vertex answers the other
//! with `404 Publisher Model … was not found or your project does not have
//! access to it`. That is the operator's to fix, never the client's, so the
//! location is taken out of that model's routing for a long cooldown that
//! grows while the answer repeats (1 min, 2, 4 … up to 30 min); the request
//! falls back to another location. When the cooldown ends, the next request
//! re-probes the location. Nothing here touches the quota store: the
//! budget is fine, the model just is not there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spillway_core::ModelId;
use tokio::time::Instant;

const FIRST_COOLDOWN: Duration = Duration::from_secs(60);
const LONGEST_COOLDOWN: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Copy)]
struct Unserved {
    until: Instant,
    cooldown: Duration,
}

/// (model, location) pairs Vertex says it does not serve to this project.
#[derive(Debug, Default)]
pub struct SetupHealth {
    unserved: Mutex<HashMap<(ModelId, Arc<str>), Unserved>>,
    /// Whether `unserved` has entries: the request path skips the lock
    /// while every location serves (the usual case).
    any: AtomicBool,
}

impl SetupHealth {
    /// Records that `location` refused `model` as not enabled; returns how
    /// long it stays out of routing.
    pub fn model_not_enabled(&self, model: &ModelId, location: &Arc<str>) -> Duration {
        let mut map = self.unserved.lock().unwrap_or_else(|p| p.into_inner());
        self.any.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let entry = map
            .entry((model.clone(), Arc::clone(location)))
            .or_insert(Unserved {
                until: now,
                cooldown: Duration::ZERO,
            });
        entry.cooldown = if entry.cooldown.is_zero() {
            FIRST_COOLDOWN
        } else {
            (entry.cooldown * 2).min(LONGEST_COOLDOWN)
        };
        entry.until = now + entry.cooldown;
        entry.cooldown
    }

    /// The location served `model` again: forget what it said before.
    pub fn served(&self, model: &ModelId, location: &str) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let mut map = self.unserved.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(m, l), _| !(m == model && &**l == location));
        self.any.store(!map.is_empty(), Ordering::Relaxed);
    }

    /// Whether `location` is out of `model`'s routing now.
    pub fn is_out(&self, model: &ModelId, location: &str) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let map = self.unserved.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .any(|((m, l), u)| m == model && &**l == location && u.until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_refusing_location_stays_out_longer_each_time_until_it_serves() {
        let health = SetupHealth::default();
        let (model, location) = (ModelId::from("m@1"), Arc::<str>::from("us-central1"));
        assert!(!health.is_out(&model, "us-central1"));
        assert_eq!(health.model_not_enabled(&model, &location), FIRST_COOLDOWN);
        assert!(health.is_out(&model, "us-central1"));
        assert!(!health.is_out(&ModelId::from("other@1"), "us-central1"));
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert!(
            !health.is_out(&model, "us-central1"),
            "re-probed after the cooldown"
        );
        assert_eq!(
            health.model_not_enabled(&model, &location),
            FIRST_COOLDOWN * 2
        );
        health.served(&model, "us-central1");
        assert!(!health.is_out(&model, "us-central1"));
        assert_eq!(health.model_not_enabled(&model, &location), FIRST_COOLDOWN);
    }
}
