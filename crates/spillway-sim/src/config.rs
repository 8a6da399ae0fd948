//! Simulator configuration: which models each location offers, with which
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
//! tokens_per_min = 50000         # optional: combined input + output
//! input_tokens_per_min = 40000   # optional
//! output_tokens_per_min = 10000  # optional
//!
//! [[regions]]
//! name = "global"
//! [[regions.models]]
//! id = "claude-sonnet-4-6"
//! quota_group = "anthropic-claude-sonnet"  # optional: lineage bucket
//! cache_reads_count = false                # optional: see below
//! requests_per_min = 100
//! input_tokens_per_min = 200000
//! output_tokens_per_min = 40000
//! [[regions.models]]
//! id = "claude-sonnet-4-5@20250929"
//! quota_group = "anthropic-claude-sonnet"  # shares the window above
//! requests_per_min = 100
//! input_tokens_per_min = 200000
//! output_tokens_per_min = 40000
//! ```
//!
//! Every key is checked: unknown keys (a misspelt `quota_grup`) are errors.
//!
//! ## Anthropic's first-party API (optional)
//!
//! With an `[anthropic]` section the same listener also serves Anthropic's
//! own Messages API (`POST /v1/messages`, see [`crate::anthropic`]), so a
//! gateway can be tested overflowing to `api.anthropic.com`:
//!
//! ```toml
//! [anthropic]
//! api_key = "sk-ant-sim"          # required: the accepted `x-api-key`
//! [[anthropic.models]]
//! id = "claude-sonnet-4-5"         # the id requests name, exactly
//! requests_per_min = 50            # optional: RPM bucket
//! input_tokens_per_min = 30000     # optional: ITPM bucket
//! output_tokens_per_min = 8000     # optional: OTPM bucket
//! [[anthropic.models]]
//! id = "claude-3-haiku-20240307"
//! requests_per_min = 50
//! cache_reads_count = true         # optional: default rule below
//! ```
//!
//! Each limit is a continuously refilling token bucket whose period is
//! `window_secs` ([`crate::ratelimit`]); an absent limit is not enforced
//! (and its `anthropic-ratelimit-*` headers are not sent). Without the
//! section `/v1/messages` is a 404, as before.
//!
//! * **Token limits** are all optional; absent means not enforced. Vertex
//!   has only the split ones (input and output per minute, reference §5);
//!   `tokens_per_min` is a combined budget kept for older configurations.
//! * **`quota_group`** names a lineage (the `base_model` dimension Google
//!   uses for it, e.g. `anthropic-claude-sonnet`). On `global` and the
//!   multi-regions (`us`, `eu`) all models of a location naming the same
//!   group share one window, and their limits **must be identical**: a
//!   mismatch is a [`ConfigError::GroupLimitsDisagree`] (the simulator
//!   refuses to guess which one Google would enforce). On regional
//!   locations the group is ignored for quotas: each model has its own
//!   window there, with its own limits. See [`crate::quota`].
//! * **`cache_reads_count`**: whether `cache_read_input_tokens` count
//!   against the input-token quota. Absent means the default rule
//!   ([`default_cache_reads_count`]): `true` for Claude 3 and 3.5 ids
//!   (`claude-3-…` except `claude-3-7-…`), which Anthropic marks as counting
//!   cache reads, `false` for every other (current) model.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use crate::quota::{BucketId, QuotaLimits};
use crate::ratelimit::AnthropicLimits;

/// Why a configuration was refused.
///
/// (`Display` and `Error` are written out by hand rather than derived with
/// `thiserror`: the crate keeps its dependency list, and so the workspace
/// lock file, unchanged.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The TOML text did not parse or had unknown keys.
    Toml(String),
    /// `window_secs` was negative, not finite or too large.
    Window(String),
    /// A location lists the same model twice.
    DuplicateModel {
        /// The location.
        location: String,
        /// The model id.
        model: String,
    },
    /// A `quota_group` is empty.
    EmptyGroup {
        /// The location.
        location: String,
        /// The model id.
        model: String,
    },
    /// `[anthropic] api_key` is empty (no request could authenticate).
    EmptyApiKey,
    /// Two models sharing a lineage bucket have different limits.
    GroupLimitsDisagree {
        /// The location.
        location: String,
        /// The group.
        group: String,
        /// The first model of the group (whose limits the others must match).
        first: String,
        /// The model that disagrees.
        model: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Toml(e) => write!(f, "invalid simulator config: {e}"),
            ConfigError::Window(e) => write!(f, "window_secs: {e}"),
            ConfigError::DuplicateModel { location, model } => {
                write!(f, "location {location}: model {model} is listed twice")
            }
            ConfigError::EmptyGroup { location, model } => {
                write!(f, "location {location}: model {model} has an empty quota_group")
            }
            ConfigError::EmptyApiKey => write!(f, "anthropic.api_key must not be empty"),
            ConfigError::GroupLimitsDisagree {
                location,
                group,
                first,
                model,
            } => write!(
                f,
                "location {location}: models {first} and {model} share quota group {group} but have different limits"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The simulator's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Locations and the models each offers.
    pub regions: Vec<SimRegion>,
    /// If set, predict calls need `Authorization: Bearer <this>` (or a token
    /// issued by the simulator's `/token` endpoint). See
    /// [`crate::SimHandle::rotate_token`] to revoke it at run time.
    pub bearer_token: Option<String>,
    /// Quota window length (60 s on Vertex; tests compress it).
    pub window: Duration,
    /// Output tokens per answer unless the request says `SIM_OUTPUT_TOKENS=n`.
    pub default_output_tokens: u32,
    /// Send Vertex's non-standard `vertex_event` SSE event mid-stream.
    pub emit_vertex_event: bool,
    /// Also serve Anthropic's first-party Messages API (`/v1/messages`),
    /// with this key and these models; `None` (the default) leaves it a 404.
    pub anthropic: Option<AnthropicConfig>,
}

/// The first-party surface: the accepted API key and the models offered.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicConfig {
    /// The `x-api-key` every request must carry.
    pub api_key: String,
    /// Models offered, with their rate limits.
    #[serde(default)]
    pub models: Vec<AnthropicModel>,
}

/// A model of the first-party surface and its rate limits, each a
/// continuously refilling token bucket (absent: not enforced).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicModel {
    /// Anthropic model id as requests name it, e.g. `claude-sonnet-4-5` or
    /// `claude-3-haiku-20240307` (matched exactly, echoed as sent).
    pub id: String,
    /// Requests per minute (RPM).
    #[serde(default)]
    pub requests_per_min: Option<u64>,
    /// Input tokens per minute (ITPM).
    #[serde(default)]
    pub input_tokens_per_min: Option<u64>,
    /// Output tokens per minute (OTPM), charged `max_tokens` up front.
    #[serde(default)]
    pub output_tokens_per_min: Option<u64>,
    /// Whether cache reads count against ITPM; `None` applies
    /// [`default_cache_reads_count`] (true for `claude-3-…` except `claude-3-7-…`).
    #[serde(default)]
    pub cache_reads_count: Option<bool>,
}

impl AnthropicModel {
    /// A model with all three limits.
    pub fn new(id: impl Into<String>, rpm: u64, itpm: u64, otpm: u64) -> Self {
        AnthropicModel {
            id: id.into(),
            requests_per_min: Some(rpm),
            input_tokens_per_min: Some(itpm),
            output_tokens_per_min: Some(otpm),
            cache_reads_count: None,
        }
    }

    /// A model with no limit at all.
    pub fn unlimited(id: impl Into<String>) -> Self {
        AnthropicModel {
            id: id.into(),
            requests_per_min: None,
            input_tokens_per_min: None,
            output_tokens_per_min: None,
            cache_reads_count: None,
        }
    }

    /// Replaces all three limits (`None`: not enforced).
    pub fn with_limits(mut self, limits: AnthropicLimits) -> Self {
        self.requests_per_min = limits.requests_per_min;
        self.input_tokens_per_min = limits.input_tokens_per_min;
        self.output_tokens_per_min = limits.output_tokens_per_min;
        self
    }

    /// Overrides [`default_cache_reads_count`].
    pub fn with_cache_reads_count(mut self, counts: bool) -> Self {
        self.cache_reads_count = Some(counts);
        self
    }

    /// Whether cache reads count against ITPM for this model.
    pub fn counts_cache_reads(&self) -> bool {
        self.cache_reads_count
            .unwrap_or_else(|| default_cache_reads_count(&self.id))
    }

    /// The model's limits.
    pub fn limits(&self) -> AnthropicLimits {
        AnthropicLimits {
            requests_per_min: self.requests_per_min,
            input_tokens_per_min: self.input_tokens_per_min,
            output_tokens_per_min: self.output_tokens_per_min,
        }
    }
}

impl AnthropicConfig {
    /// `api_key` and three models with Anthropic's tier-1 limits:
    /// `claude-sonnet-4-5` (50 RPM, 30 000 ITPM, 8 000 OTPM),
    /// `claude-haiku-4-5` and `claude-3-haiku-20240307` (50 RPM,
    /// 50 000 ITPM, 10 000 OTPM). What `spillway-sim --anthropic-key`
    /// serves when the config file has no `[anthropic]` section.
    pub fn defaults(api_key: impl Into<String>) -> Self {
        AnthropicConfig {
            api_key: api_key.into(),
            models: vec![
                AnthropicModel::new("claude-sonnet-4-5", 50, 30_000, 8_000),
                AnthropicModel::new("claude-haiku-4-5", 50, 50_000, 10_000),
                AnthropicModel::new("claude-3-haiku-20240307", 50, 50_000, 10_000),
            ],
        }
    }
}

/// One location (`{location}`: a region, `global`, `us` or `eu`) and the
/// models it offers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimRegion {
    /// Location name, e.g. `us-central1` or `global`.
    pub name: String,
    /// Models offered there.
    #[serde(default)]
    pub models: Vec<SimModel>,
}

/// A model offered in a location, with its quota there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimModel {
    /// Vertex model id, e.g. `claude-3-haiku@20240307`.
    pub id: String,
    /// Requests per window.
    pub requests_per_min: u32,
    /// Input + output tokens per window (not enforced if `None`).
    #[serde(default)]
    pub tokens_per_min: Option<u64>,
    /// Input tokens per window (not enforced if `None`).
    #[serde(default)]
    pub input_tokens_per_min: Option<u64>,
    /// Output tokens per window (not enforced if `None`).
    #[serde(default)]
    pub output_tokens_per_min: Option<u64>,
    /// Lineage bucket (e.g. `anthropic-claude-sonnet`), shared with the
    /// other models of the group on `global` and multi-regions.
    #[serde(default)]
    pub quota_group: Option<String>,
    /// Whether cache reads count against the input-token quota; `None`
    /// applies [`default_cache_reads_count`].
    #[serde(default)]
    pub cache_reads_count: Option<bool>,
}

/// Vertex id of Claude 3 Haiku, used by the defaults.
pub const HAIKU: &str = "claude-3-haiku@20240307";
/// Vertex id of Claude 3 Sonnet, used by the defaults.
pub const SONNET: &str = "claude-3-sonnet@20240229";

/// The default of [`SimModel::cache_reads_count`]: `true` for Claude 3 and
/// 3.5 (`claude-3-…`, but not `claude-3-7-…`), whose cache reads Anthropic
/// counts towards input-token limits; `false` for later models.
pub fn default_cache_reads_count(model_id: &str) -> bool {
    model_id.starts_with("claude-3-") && !model_id.starts_with("claude-3-7-")
}

impl SimModel {
    /// A model with `rpm` requests and `tpm` combined tokens per window, no
    /// split limits.
    pub fn new(id: impl Into<String>, rpm: u32, tpm: u64) -> Self {
        SimModel {
            id: id.into(),
            requests_per_min: rpm,
            tokens_per_min: Some(tpm),
            input_tokens_per_min: None,
            output_tokens_per_min: None,
            quota_group: None,
            cache_reads_count: None,
        }
    }

    /// A model with Vertex's three quotas only: `rpm` requests, `itpm`
    /// input tokens and `otpm` output tokens per window.
    pub fn split(id: impl Into<String>, rpm: u32, itpm: u64, otpm: u64) -> Self {
        SimModel {
            tokens_per_min: None,
            input_tokens_per_min: Some(itpm),
            output_tokens_per_min: Some(otpm),
            ..SimModel::new(id, rpm, 0)
        }
    }

    /// Puts the model in a lineage group (shared window on `global` and
    /// multi-regions): `SimModel::split(..).in_group("anthropic-claude-sonnet")`.
    pub fn in_group(mut self, group: impl Into<String>) -> Self {
        self.quota_group = Some(group.into());
        self
    }

    /// Says whether cache reads count against the input-token quota,
    /// overriding [`default_cache_reads_count`].
    pub fn with_cache_reads_count(mut self, counts: bool) -> Self {
        self.cache_reads_count = Some(counts);
        self
    }

    /// Sets (or with `None` removes) the combined token limit.
    pub fn with_tokens_per_min(mut self, tpm: Option<u64>) -> Self {
        self.tokens_per_min = tpm;
        self
    }

    /// Sets (or removes) the input-token limit.
    pub fn with_input_tokens_per_min(mut self, itpm: Option<u64>) -> Self {
        self.input_tokens_per_min = itpm;
        self
    }

    /// Sets (or removes) the output-token limit.
    pub fn with_output_tokens_per_min(mut self, otpm: Option<u64>) -> Self {
        self.output_tokens_per_min = otpm;
        self
    }

    /// Whether this model's cache reads count against the input quota
    /// (the explicit setting, else [`default_cache_reads_count`]).
    pub fn counts_cache_reads(&self) -> bool {
        self.cache_reads_count
            .unwrap_or_else(|| default_cache_reads_count(&self.id))
    }

    /// The model's quota limits.
    pub fn limits(&self) -> QuotaLimits {
        QuotaLimits {
            requests_per_min: self.requests_per_min,
            tokens_per_min: self.tokens_per_min,
            input_tokens_per_min: self.input_tokens_per_min,
            output_tokens_per_min: self.output_tokens_per_min,
        }
    }

    /// The bucket this model draws on at `location`.
    pub fn bucket(&self, location: &str) -> BucketId {
        BucketId::for_model(location, &self.id, self.quota_group.as_deref())
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
            anthropic: None,
        }
    }

    /// Also serves Anthropic's first-party API, accepting `api_key`, with
    /// `models`: `SimConfig::vertex_defaults().with_anthropic("sk-ant-test",
    /// vec![AnthropicModel::new("claude-sonnet-4-5", 50, 30_000, 8_000)])`.
    pub fn with_anthropic(
        mut self,
        api_key: impl Into<String>,
        models: Vec<AnthropicModel>,
    ) -> Self {
        self.anthropic = Some(AnthropicConfig {
            api_key: api_key.into(),
            models,
        });
        self
    }

    /// Checks what the types cannot: no model twice in a location, no empty
    /// group, and identical limits for the models of each shared bucket;
    /// for the first-party surface, a non-empty key and no model twice
    /// (reported as a [`ConfigError::DuplicateModel`] in location `anthropic`).
    /// [`crate::Simulator::start`] and [`SimConfig::from_toml`] call it.
    /// (A location listed twice is one location: its model lists add up.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen: HashMap<(&str, &str), ()> = HashMap::new();
        let mut buckets: HashMap<BucketId, &SimModel> = HashMap::new();
        for r in &self.regions {
            for m in &r.models {
                if seen.insert((&r.name, &m.id), ()).is_some() {
                    return Err(ConfigError::DuplicateModel {
                        location: r.name.clone(),
                        model: m.id.clone(),
                    });
                }
                if m.quota_group.as_deref() == Some("") {
                    return Err(ConfigError::EmptyGroup {
                        location: r.name.clone(),
                        model: m.id.clone(),
                    });
                }
                let id = m.bucket(&r.name);
                match buckets.get(&id) {
                    None => {
                        buckets.insert(id, m);
                    }
                    Some(first) if first.limits() != m.limits() => {
                        return Err(ConfigError::GroupLimitsDisagree {
                            location: r.name.clone(),
                            group: m.quota_group.clone().unwrap_or_default(),
                            first: first.id.clone(),
                            model: m.id.clone(),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(a) = &self.anthropic {
            if a.api_key.is_empty() {
                return Err(ConfigError::EmptyApiKey);
            }
            let mut ids = std::collections::HashSet::new();
            for m in &a.models {
                if !ids.insert(m.id.as_str()) {
                    return Err(ConfigError::DuplicateModel {
                        location: crate::anthropic::ANTHROPIC_REGION.into(),
                        model: m.id.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Parses (and [validates](SimConfig::validate)) the TOML form shown in
    /// the module docs.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            regions: Vec<SimRegion>,
            bearer_token: Option<String>,
            window_secs: Option<f64>,
            default_output_tokens: Option<u32>,
            emit_vertex_event: Option<bool>,
            anthropic: Option<AnthropicConfig>,
        }
        let f: File = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let d = SimConfig::vertex_defaults();
        let window = match f.window_secs {
            None => d.window,
            Some(s) => {
                Duration::try_from_secs_f64(s).map_err(|e| ConfigError::Window(e.to_string()))?
            }
        };
        let config = SimConfig {
            regions: f.regions,
            bearer_token: f.bearer_token,
            window,
            default_output_tokens: f.default_output_tokens.unwrap_or(d.default_output_tokens),
            emit_vertex_event: f.emit_vertex_event.unwrap_or(d.emit_vertex_event),
            anthropic: f.anthropic,
        };
        config.validate()?;
        Ok(config)
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

    #[test]
    fn groups_split_limits_and_cache_rule_from_toml() {
        let c = SimConfig::from_toml(
            r#"
[[regions]]
name = "global"
[[regions.models]]
id = "claude-sonnet-4-6"
quota_group = "anthropic-claude-sonnet"
requests_per_min = 10
input_tokens_per_min = 1000
output_tokens_per_min = 100
[[regions.models]]
id = "claude-sonnet-4-5@20250929"
quota_group = "anthropic-claude-sonnet"
cache_reads_count = true
requests_per_min = 10
input_tokens_per_min = 1000
output_tokens_per_min = 100
"#,
        )
        .unwrap();
        let m = &c.regions[0].models;
        assert_eq!(m[0].limits(), QuotaLimits::split(10, 1000, 100));
        assert_eq!(m[0].bucket("global"), m[1].bucket("global"));
        assert!(!m[0].counts_cache_reads());
        assert!(m[1].counts_cache_reads());
        assert_eq!(
            m[0],
            SimModel::split("claude-sonnet-4-6", 10, 1000, 100).in_group("anthropic-claude-sonnet")
        );
        assert!(matches!(
            SimConfig::from_toml("[[regions]]\nname = \"x\"\n[[regions.models]]\nid = \"m\"\nrequests_per_min = 1\nquota_grup = \"g\"\n"),
            Err(ConfigError::Toml(_))
        ));
    }

    #[test]
    fn shared_buckets_need_identical_limits_but_regional_ones_do_not() {
        let cfg = |location: &str| SimConfig {
            regions: vec![SimRegion {
                name: location.into(),
                models: vec![
                    SimModel::split("claude-opus-4-7", 10, 1000, 100)
                        .in_group("anthropic-claude-opus"),
                    SimModel::split("claude-opus-4-8", 20, 1000, 100)
                        .in_group("anthropic-claude-opus"),
                ],
            }],
            ..SimConfig::vertex_defaults()
        };
        for shared in ["global", "us", "eu"] {
            assert_eq!(
                cfg(shared).validate(),
                Err(ConfigError::GroupLimitsDisagree {
                    location: shared.into(),
                    group: "anthropic-claude-opus".into(),
                    first: "claude-opus-4-7".into(),
                    model: "claude-opus-4-8".into(),
                })
            );
        }
        assert_eq!(cfg("us-east5").validate(), Ok(()));
        let mut dup = cfg("us-east5");
        dup.regions[0].models[1].id = "claude-opus-4-7".into();
        assert!(matches!(
            dup.validate(),
            Err(ConfigError::DuplicateModel { .. })
        ));
        let mut empty = cfg("us-east5");
        empty.regions[0].models[0].quota_group = Some(String::new());
        assert!(matches!(
            empty.validate(),
            Err(ConfigError::EmptyGroup { .. })
        ));
    }

    #[test]
    fn anthropic_section_from_toml() {
        let c = SimConfig::from_toml(
            r#"
[anthropic]
api_key = "sk-ant-sim"
[[anthropic.models]]
id = "claude-sonnet-4-5"
requests_per_min = 50
input_tokens_per_min = 30000
output_tokens_per_min = 8000
[[anthropic.models]]
id = "claude-3-haiku-20240307"
cache_reads_count = false
"#,
        )
        .unwrap();
        let a = c.anthropic.unwrap();
        assert_eq!(a.api_key, "sk-ant-sim");
        assert_eq!(
            a.models[0],
            AnthropicModel::new("claude-sonnet-4-5", 50, 30_000, 8_000)
        );
        assert_eq!(a.models[1].limits(), AnthropicLimits::default());
        assert!(!a.models[1].counts_cache_reads());
        assert!(AnthropicModel::unlimited("claude-3-haiku-20240307").counts_cache_reads());
        assert!(!AnthropicModel::unlimited("claude-sonnet-4-5").counts_cache_reads());
        assert!(SimConfig::from_toml("").unwrap().anthropic.is_none());
        for bad in [
            "[anthropic]\napi_key = \"k\"\nbogus = 1\n",
            "[anthropic]\napi_key = \"k\"\n[[anthropic.models]]\nid = \"m\"\nrequests_per_minute = 1\n",
            "[anthropic]\n[[anthropic.models]]\nid = \"m\"\n",
        ] {
            assert!(matches!(SimConfig::from_toml(bad), Err(ConfigError::Toml(_))), "{bad}");
        }
        assert_eq!(
            SimConfig::from_toml("[anthropic]\napi_key = \"\"\n"),
            Err(ConfigError::EmptyApiKey)
        );
        let dup = SimConfig::vertex_defaults().with_anthropic(
            "k",
            vec![
                AnthropicModel::unlimited("m"),
                AnthropicModel::unlimited("m"),
            ],
        );
        assert!(matches!(
            dup.validate(),
            Err(ConfigError::DuplicateModel { .. })
        ));
    }

    #[test]
    fn cache_read_default_rule() {
        assert!(default_cache_reads_count("claude-3-haiku@20240307"));
        assert!(default_cache_reads_count("claude-3-5-sonnet-v2@20241022"));
        assert!(default_cache_reads_count("claude-3-5-haiku@20241022"));
        assert!(!default_cache_reads_count("claude-3-7-sonnet@20250219"));
        assert!(!default_cache_reads_count("claude-sonnet-4-5@20250929"));
        assert!(!default_cache_reads_count("claude-opus-4-7"));
        assert!(SimModel::new("claude-opus-4-7", 1, 1)
            .with_cache_reads_count(true)
            .counts_cache_reads());
    }
}
