//! Simulator configuration: which models each region offers, with which
//! quotas, and how the simulated upstream behaves.
//!
//! [`SimConfig::vertex_defaults`] is a small but realistic topology (two
//! models, three regions, with one model missing from each of two regions so
//! that 404 routing can be tested). The binary can also read a TOML file:
//!
//! ```toml
//! window_secs = 60            # quota window (default 60)
//! bearer_token = "secret"     # optional: require this bearer token
//! default_output_tokens = 12  # optional
//! emit_vertex_event = true    # optional
//!
//! [[regions]]
//! name = "us-central1"
//! [[regions.models]]
//! id = "claude-3-haiku@20240307"
//! requests_per_min = 60
//! tokens_per_min = 50000
//! input_tokens_per_min = 40000   # optional
//! output_tokens_per_min = 10000  # optional
//! ```

use std::time::Duration;

use serde::Deserialize;

use crate::quota::QuotaLimits;

/// The simulator's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Regions and the models each offers.
    pub regions: Vec<SimRegion>,
    /// If set, predict calls need `Authorization: Bearer <this>` (or a token
    /// issued by the simulator's `/token` endpoint).
    pub bearer_token: Option<String>,
    /// Quota window length (60 s on Vertex; tests compress it).
    pub window: Duration,
    /// Output tokens per answer unless the request says `SIM_OUTPUT_TOKENS=n`.
    pub default_output_tokens: u32,
    /// Send Vertex's non-standard `vertex_event` SSE event mid-stream.
    pub emit_vertex_event: bool,
}

/// One region (`{location}`) and the models it offers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SimRegion {
    /// Location name, e.g. `us-central1`.
    pub name: String,
    /// Models offered there.
    #[serde(default)]
    pub models: Vec<SimModel>,
}

/// A model offered in a region, with its quota there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SimModel {
    /// Vertex model id, e.g. `claude-3-haiku@20240307`.
    pub id: String,
    /// Requests per window.
    pub requests_per_min: u32,
    /// Input + output tokens per window.
    pub tokens_per_min: u64,
    /// Input tokens per window (not enforced if `None`).
    #[serde(default)]
    pub input_tokens_per_min: Option<u64>,
    /// Output tokens per window (not enforced if `None`).
    #[serde(default)]
    pub output_tokens_per_min: Option<u64>,
}

/// Vertex id of Claude 3 Haiku, used by the defaults.
pub const HAIKU: &str = "claude-3-haiku@20240307";
/// Vertex id of Claude 3 Sonnet, used by the defaults.
pub const SONNET: &str = "claude-3-sonnet@20240229";

impl SimModel {
    /// A model with `rpm` requests and `tpm` tokens per window, no split limits.
    pub fn new(id: impl Into<String>, rpm: u32, tpm: u64) -> Self {
        SimModel {
            id: id.into(),
            requests_per_min: rpm,
            tokens_per_min: tpm,
            input_tokens_per_min: None,
            output_tokens_per_min: None,
        }
    }

    pub(crate) fn limits(&self) -> QuotaLimits {
        QuotaLimits {
            requests_per_min: self.requests_per_min,
            tokens_per_min: self.tokens_per_min,
            input_tokens_per_min: self.input_tokens_per_min,
            output_tokens_per_min: self.output_tokens_per_min,
        }
    }
}

impl SimConfig {
    /// Haiku (`claude-3-haiku@20240307`) in us-central1 and europe-west4,
    /// Sonnet (`claude-3-sonnet@20240229`) in us-central1 and asia-southeast1,
    /// each 60 rpm / 50 000 tpm; 60 s window; no bearer check; 12 output
    /// tokens; `vertex_event` on.
    pub fn vertex_defaults() -> Self {
        let m = |id: &str| SimModel::new(id, 60, 50_000);
        SimConfig {
            regions: vec![
                SimRegion {
                    name: "us-central1".into(),
                    models: vec![m(HAIKU), m(SONNET)],
                },
                SimRegion {
                    name: "europe-west4".into(),
                    models: vec![m(HAIKU)],
                },
                SimRegion {
                    name: "asia-southeast1".into(),
                    models: vec![m(SONNET)],
                },
            ],
            bearer_token: None,
            window: Duration::from_secs(60),
            default_output_tokens: 12,
            emit_vertex_event: true,
        }
    }

    /// Parses the TOML form shown in the module docs.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            regions: Vec<SimRegion>,
            bearer_token: Option<String>,
            window_secs: Option<f64>,
            default_output_tokens: Option<u32>,
            emit_vertex_event: Option<bool>,
        }
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let d = SimConfig::vertex_defaults();
        let window = match f.window_secs {
            None => d.window,
            Some(s) => Duration::try_from_secs_f64(s).map_err(|e| format!("window_secs: {e}"))?,
        };
        Ok(SimConfig {
            regions: f.regions,
            bearer_token: f.bearer_token,
            window,
            default_output_tokens: f.default_output_tokens.unwrap_or(d.default_output_tokens),
            emit_vertex_event: f.emit_vertex_event.unwrap_or(d.emit_vertex_event),
        })
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self::vertex_defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip() {
        let c = SimConfig::from_toml(
            r#"
window_secs = 2.5
[[regions]]
name = "us-east5"
[[regions.models]]
id = "claude-sonnet-4-5@20250929"
requests_per_min = 5
tokens_per_min = 1000
output_tokens_per_min = 100
"#,
        )
        .unwrap();
        assert_eq!(c.window, Duration::from_millis(2500));
        assert_eq!(c.regions[0].models[0].output_tokens_per_min, Some(100));
        assert!(c.emit_vertex_event);
        assert!(SimConfig::from_toml("window_secs = -1").is_err());
        assert!(SimConfig::from_toml("bogus = 1").is_err());
    }
}
