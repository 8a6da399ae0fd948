//! Captures the gateway's `spillway::request` log lines in memory: a
//! tracing layer over the registry that is interested in that target only.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

pub const TARGET: &str = "spillway::request";

/// One log line: field name → value as text.
pub type Line = HashMap<String, String>;

/// The lines seen so far, shared with the layer.
#[derive(Debug, Clone, Default)]
pub struct RequestLines(Arc<Mutex<Vec<Line>>>);

impl RequestLines {
    /// Every line, keyed by `request_id` (lines without one are dropped).
    pub fn by_request_id(&self) -> HashMap<String, Line> {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .filter_map(|l| l.get("request_id").map(|id| (id.clone(), l.clone())))
            .collect()
    }
}

/// A numeric field, under the first of `names` present (a field renamed by
/// a newer gateway is still read).
pub fn number(line: &Line, names: &[&str]) -> Option<u64> {
    names
        .iter()
        .find_map(|n| line.get(*n))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

impl<S: Subscriber> Layer<S> for RequestLines {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.target() == TARGET && metadata.is_event() {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target() == TARGET
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fields.0);
    }
}

#[derive(Default)]
struct Fields(Line);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}
