//! The model catalog: which Claude models Spillway offers, under which names,
//! in which Vertex locations, and which quota bucket each location draws on.
//!
//! Clients name models three ways: the Vertex id (`claude-3-haiku@20240307`),
//! the Anthropic API id (`claude-3-haiku-20240307`, translated by the caller
//! before lookup) or a configured alias (`haiku`). Vertex pins versions with
//! `@date`; Google advises against unversioned ids, so a [`Resolution`] says
//! whether an alias was used and the edge can warn about it.
//!
//! Each model lists its locations in preference order. The first is the
//! primary; the rest are where traffic spills when it is full.
//!
//! ## Buckets: who shares a budget
//!
//! Vertex has three kinds of location ([`LocationKind`]): `global`, the
//! multi-regions `us` and `eu`, and regional endpoints (`us-east5`,
//! `europe-west4`, …). On `global` and the multi-regions, newer models
//! share one *lineage* bucket across versions (every model naming one
//! `quota_group`); on a regional endpoint every model keeps its own bucket,
//! group or not. So the budget a model draws on in a location — its
//! **bucket**, (bucket group, location) — is the model's `quota_group` on
//! global and multi-region locations and the model's own id on regional
//! ones ([`bucket_group`]). [`Catalog::new`] computes it for every location
//! ([`RegionBudget::bucket`]) and refuses models that share a bucket but
//! list different limits for it.
//!
//! A model's requests are asked under its **requester** key
//! ([`ModelSpec::requester`]): the scheduler queues by it, and the store
//! maps each (requester, location) to that location's bucket.

use std::collections::{HashMap, HashSet};

use crate::keys::{ModelId, QuotaGroup};
use crate::ledger::Limits;
use crate::store::BudgetConfig;

/// The provider of locations that name none: Google's Vertex AI.
pub const VERTEX_PROVIDER: &str = "vertex";

/// Vertex's multi-region locations (hosts: `upstream.multi_region_urls`).
pub const MULTI_REGIONS: [&str; 2] = ["us", "eu"];

/// What kind of Vertex location a name is; it decides who shares a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocationKind {
    /// `global`: lineage buckets, `global_online_prediction_*` quotas.
    Global,
    /// `us` or `eu`: lineage buckets, `{location}_multi_region_*` quotas.
    MultiRegion,
    /// A single region (`us-east5`): a bucket per model.
    Regional,
}

impl LocationKind {
    /// The kind of a Vertex location name, or `None` if it is not one:
    /// `global`, a multi-region of [`MULTI_REGIONS`], or a regional name —
    /// lowercase letters, a dash, lowercase letters, digits
    /// (`us-central1`, `europe-west4`, `asia-southeast1`).
    pub fn of(location: &str) -> Option<Self> {
        if location == "global" {
            return Some(Self::Global);
        }
        if MULTI_REGIONS.contains(&location) {
            return Some(Self::MultiRegion);
        }
        let (area, rest) = location.split_once('-')?;
        let digits_at = rest.find(|c: char| c.is_ascii_digit())?;
        let (direction, number) = rest.split_at(digits_at);
        let lower = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
        let digits = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
        (lower(area) && lower(direction) && digits).then_some(Self::Regional)
    }

    /// Whether models naming one `quota_group` share a bucket here.
    pub fn shares_lineage(self) -> bool {
        self != Self::Regional
    }
}

/// The bucket group of `model` (configured with `quota_group`) at
/// `location`: the group where Vertex shares lineage buckets (global and
/// multi-regions), else the model's own id. A location that is not a
/// Vertex one (another provider's) keeps a bucket per model.
pub fn bucket_group(location: &str, model: &ModelId, quota_group: &QuotaGroup) -> QuotaGroup {
    match LocationKind::of(location) {
        Some(kind) if kind.shares_lineage() => quota_group.clone(),
        _ => QuotaGroup::of_model(model),
    }
}

/// One location of a model and the budget Vertex grants there, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionBudget {
    /// Vertex location, e.g. `us-central1`, `us` or `global`.
    pub region: String,
    /// Which upstream provider serves this location ([`VERTEX_PROVIDER`]
    /// unless configured otherwise): the gateway looks the provider up by
    /// this name, so a new provider is a new module, not a new branch.
    pub provider: String,
    /// Requests and tokens per window (Vertex: per minute).
    pub limits: Limits,
    /// The group of the bucket this location draws on ([`bucket_group`]);
    /// the budget's key is (`bucket`, `region`). Set by [`Catalog::new`]:
    /// whatever a caller puts here is replaced.
    pub bucket: QuotaGroup,
}

impl RegionBudget {
    /// A Vertex location with `limits`; its bucket is set by [`Catalog::new`].
    pub fn vertex(region: &str, limits: Limits) -> Self {
        Self {
            region: region.to_string(),
            provider: VERTEX_PROVIDER.to_string(),
            limits,
            bucket: QuotaGroup::from(""),
        }
    }
}

/// One model as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The Vertex model id, used verbatim in upstream URLs.
    pub id: ModelId,
    /// Other names clients may use for this model.
    pub aliases: Vec<String>,
    /// Largest input plus output the model accepts, in tokens.
    pub context_window: u64,
    /// Characters per token for estimating text (Claude: about 3.5).
    pub chars_per_token: f64,
    /// Locations serving the model, primary first. May be empty: the model
    /// is known but switched off, and requests for it get a clear error.
    pub regions: Vec<RegionBudget>,
    /// The lineage this model belongs to: usually its own id; models that
    /// share one Vertex lineage quota on global and multi-region endpoints
    /// (`anthropic-claude-sonnet`) name the same group. It names the bucket
    /// only where Vertex shares lineage buckets: see
    /// [`RegionBudget::bucket`].
    pub quota_group: QuotaGroup,
    /// Whether Vertex counts `cache_read_input_tokens` toward this model's
    /// input-token quota (older models do, current ones do not); settlement
    /// charges input accordingly.
    pub cache_reads_count: bool,
    /// What Vertex bills for the model's tokens, where configured; `None`:
    /// the model has no spend (none is made up).
    pub prices: Option<crate::spend::ModelPrices>,
    /// Locations of other providers (Anthropic's own API) tried only when
    /// no location in `regions` can admit a request before its deadline,
    /// and only for tenants that allow it. Each is named after its provider
    /// and keeps a budget of its own, on its provider's terms (a token
    /// bucket for Anthropic): never in `regions`, so nothing that pools,
    /// plans or shares Vertex quota counts them.
    pub overflow: Vec<RegionBudget>,
}

impl ModelSpec {
    /// The key this model's requests are asked and queued under: its own,
    /// even in a lineage (its locations' buckets differ by kind).
    pub fn requester(&self) -> QuotaGroup {
        QuotaGroup::of_model(&self.id)
    }

    /// The key this model's *overflow* requests are asked and queued
    /// under: a queue apart from the Vertex one, so a request that turns to
    /// overflow does not wait behind those still waiting for Vertex.
    pub fn overflow_requester(&self) -> QuotaGroup {
        QuotaGroup::from(format!("{}{OVERFLOW_SUFFIX}", self.id).as_str())
    }

    /// The overflow location named `location`, if the model has one.
    pub fn overflow_location(&self, location: &str) -> Option<&RegionBudget> {
        self.overflow.iter().find(|r| r.region == location)
    }
}

/// What [`ModelSpec::overflow_requester`] appends to a model's id: a
/// character no model id contains, so no requester key collides.
pub const OVERFLOW_SUFFIX: &str = "+overflow";

/// Whether a requester key is an overflow requester's.
pub fn is_overflow_requester(requester: &str) -> bool {
    requester.ends_with(OVERFLOW_SUFFIX)
}

/// Whether a model's cache reads count toward its input quota unless
/// configured: Claude 3, 3.5 (and other `claude-3-…` ids but 3.7) count
/// them, as Vertex documents for older models; later models do not.
pub fn default_cache_reads_count(model: &str) -> bool {
    model.starts_with("claude-3-") && !model.starts_with("claude-3-7-")
}

/// How a requested name was resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolution<'a> {
    pub model: &'a ModelSpec,
    /// The client used an alias rather than a versioned id.
    pub via_alias: bool,
}

/// Configuration mistakes that make a catalog unusable. Each names the
/// configuration key to fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CatalogError {
    #[error("models: the name {name:?} is used by both {first:?} and {second:?}")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
    #[error("models.{model:?}.regions: location {region:?} is listed twice")]
    DuplicateRegion { model: String, region: String },
    #[error("models.{model:?}.regions: location {region:?} draws on the bucket {bucket:?} shared with {other:?}, which lists different limits there; models sharing a bucket must agree")]
    BucketMismatch {
        model: String,
        other: String,
        bucket: String,
        region: String,
    },
    #[error("models.{model:?}.overflow: {location:?} is listed twice, or is also one of the model's regions")]
    DuplicateOverflow { model: String, location: String },
    #[error("models.{model:?}.regions: {region:?} is not a Vertex location (\"global\", a multi-region \"us\" or \"eu\", or a region such as \"us-central1\")")]
    NotAVertexLocation { model: String, region: String },
}

/// The set of configured models, indexed by every name they answer to.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: Vec<ModelSpec>,
    /// name → (index into `models`, is an alias)
    names: HashMap<String, (usize, bool)>,
    /// Every model's requester key, in model order.
    requesters: Vec<QuotaGroup>,
}

impl Catalog {
    /// Indexes `models`, setting every location's bucket; refuses names or
    /// locations used twice, Vertex locations that are not Vertex's, and
    /// models that share a bucket with different limits.
    pub fn new(mut models: Vec<ModelSpec>) -> Result<Self, CatalogError> {
        let mut names: HashMap<String, (usize, bool)> = HashMap::new();
        // (bucket group, location) → (limits, the first model listing it)
        let mut buckets: HashMap<(QuotaGroup, String), (Limits, ModelId)> = HashMap::new();
        for model in &mut models {
            let mut seen_regions = HashSet::new();
            for budget in &mut model.regions {
                if !seen_regions.insert(budget.region.clone()) {
                    return Err(CatalogError::DuplicateRegion {
                        model: model.id.to_string(),
                        region: budget.region.clone(),
                    });
                }
                if budget.provider == VERTEX_PROVIDER && LocationKind::of(&budget.region).is_none()
                {
                    return Err(CatalogError::NotAVertexLocation {
                        model: model.id.to_string(),
                        region: budget.region.clone(),
                    });
                }
                budget.bucket = bucket_group(&budget.region, &model.id, &model.quota_group);
                let key = (budget.bucket.clone(), budget.region.clone());
                match buckets.get(&key) {
                    Some((limits, other)) if *limits != budget.limits => {
                        return Err(CatalogError::BucketMismatch {
                            model: model.id.to_string(),
                            other: other.to_string(),
                            bucket: budget.bucket.to_string(),
                            region: budget.region.clone(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        buckets.insert(key, (budget.limits, model.id.clone()));
                    }
                }
            }
            for budget in &mut model.overflow {
                if seen_regions.contains(&budget.region)
                    || !seen_regions.insert(budget.region.clone())
                {
                    return Err(CatalogError::DuplicateOverflow {
                        model: model.id.to_string(),
                        location: budget.region.clone(),
                    });
                }
                // A budget of the model's own at that provider.
                budget.bucket = QuotaGroup::of_model(&model.id);
            }
        }
        for (index, model) in models.iter().enumerate() {
            let all_names = std::iter::once((model.id.as_str(), false))
                .chain(model.aliases.iter().map(|alias| (alias.as_str(), true)));
            for (name, is_alias) in all_names {
                if let Some((other, _)) = names.insert(name.to_string(), (index, is_alias)) {
                    return Err(CatalogError::DuplicateName {
                        name: name.to_string(),
                        first: models[other].id.to_string(),
                        second: model.id.to_string(),
                    });
                }
            }
        }
        let requesters = models.iter().map(ModelSpec::requester).collect();
        Ok(Self {
            models,
            names,
            requesters,
        })
    }

    /// Looks a client-supplied name up among ids and aliases.
    pub fn resolve(&self, name: &str) -> Option<Resolution<'_>> {
        self.names.get(name).map(|&(index, via_alias)| Resolution {
            model: &self.models[index],
            via_alias,
        })
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    /// Every bucket once — (bucket group, location) — with the first
    /// location entry that draws on it (models sharing it agree on limits).
    pub fn budgets(&self) -> Vec<(&QuotaGroup, &RegionBudget)> {
        let mut seen = HashSet::new();
        self.models
            .iter()
            .flat_map(|m| m.regions.iter())
            .filter(|r| seen.insert((r.bucket.as_str(), r.region.as_str())))
            .map(|r| (&r.bucket, r))
            .collect()
    }

    /// What a quota store is built from: one entry per (requester,
    /// location), each naming the bucket it draws on.
    pub fn budget_configs(&self) -> Vec<BudgetConfig> {
        self.models
            .iter()
            .flat_map(|m| {
                m.regions.iter().map(move |r| BudgetConfig {
                    group: m.requester(),
                    bucket: r.bucket.clone(),
                    region: r.region.clone(),
                    limits: r.limits,
                })
            })
            .collect()
    }

    /// What the overflow store is built from: one entry per (overflow
    /// requester, overflow location), each a bucket of the model's own.
    pub fn overflow_budget_configs(&self) -> Vec<BudgetConfig> {
        self.models
            .iter()
            .flat_map(|m| {
                m.overflow.iter().map(move |r| BudgetConfig {
                    group: m.overflow_requester(),
                    bucket: r.bucket.clone(),
                    region: r.region.clone(),
                    limits: r.limits,
                })
            })
            .collect()
    }

    /// Every overflow requester key, for the models that have overflow.
    pub fn overflow_requesters(&self) -> Vec<QuotaGroup> {
        self.models
            .iter()
            .filter(|m| !m.overflow.is_empty())
            .map(ModelSpec::overflow_requester)
            .collect()
    }

    /// The bucket group `name` stands for at `location`: a model's (by id
    /// or alias) bucket there, or `name` itself taken as a bucket group.
    pub fn bucket_of(&self, name: &str, location: &str) -> QuotaGroup {
        self.resolve(name)
            .and_then(|r| {
                r.model
                    .regions
                    .iter()
                    .chain(&r.model.overflow)
                    .find(|b| b.region == location)
            })
            .map_or_else(|| QuotaGroup::from(name), |b| b.bucket.clone())
    }

    /// Every requester key (one per model, [`ModelSpec::requester`]): the
    /// keys the scheduler queues by and the store is asked under.
    pub fn requesters(&self) -> Vec<&QuotaGroup> {
        self.requesters.iter().collect()
    }

    /// The requesters whose (requester, `location`) draws on the bucket
    /// (`bucket`, `location`): whose queues a change there concerns.
    pub fn requesters_of(&self, bucket: &QuotaGroup, location: &str) -> Vec<&QuotaGroup> {
        self.models
            .iter()
            .zip(&self.requesters)
            .filter(|(m, _)| {
                m.regions
                    .iter()
                    .any(|r| r.region == location && r.bucket == *bucket)
            })
            .map(|(_, q)| q)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, aliases: &[&str], regions: &[&str]) -> ModelSpec {
        ModelSpec {
            id: id.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            context_window: 200_000,
            chars_per_token: 3.5,
            regions: regions
                .iter()
                .map(|r| RegionBudget::vertex(r, Limits::new(60, 50_000)))
                .collect(),
            quota_group: id.into(),
            cache_reads_count: default_cache_reads_count(id),
            prices: None,
            overflow: Vec::new(),
        }
    }

    fn lineage(id: &str, regions: &[&str]) -> ModelSpec {
        ModelSpec {
            quota_group: "anthropic-claude-sonnet".into(),
            ..spec(id, &[], regions)
        }
    }

    const S45: &str = "claude-sonnet-4-5@20250929";
    const S46: &str = "claude-sonnet-4-6@20260101";

    #[test]
    fn vertex_locations_are_global_multi_regions_or_regions() {
        use LocationKind::*;
        for (name, kind) in [
            ("global", Some(Global)),
            ("us", Some(MultiRegion)),
            ("eu", Some(MultiRegion)),
            ("us-central1", Some(Regional)),
            ("europe-west4", Some(Regional)),
            ("asia-southeast1", Some(Regional)),
            ("northamerica-northeast2", Some(Regional)),
            ("asia", None),
            ("us-central", None),
            ("US-central1", None),
            ("us-central1a", None),
            ("us-central-1", None),
            ("-west1", None),
            ("elsewhere", None),
            ("", None),
        ] {
            assert_eq!(LocationKind::of(name), kind, "{name}");
        }
        assert!(Global.shares_lineage() && MultiRegion.shares_lineage());
        assert!(!Regional.shares_lineage());
    }

    #[test]
    fn a_lineage_shares_one_bucket_on_global_and_multi_regions_only() {
        let catalog = Catalog::new(vec![
            lineage(S45, &["global", "us", "us-east5"]),
            lineage(S46, &["global", "us", "us-east5", "europe-west1"]),
        ])
        .unwrap();
        let buckets: Vec<(String, String)> = catalog
            .budgets()
            .into_iter()
            .map(|(b, r)| (b.to_string(), r.region.clone()))
            .collect();
        let pair = |b: &str, r: &str| (b.to_string(), r.to_string());
        assert_eq!(
            buckets,
            [
                pair("anthropic-claude-sonnet", "global"),
                pair("anthropic-claude-sonnet", "us"),
                pair(S45, "us-east5"),
                pair(S46, "us-east5"),
                pair(S46, "europe-west1"),
            ]
        );
        // Each model is asked under its own key; its locations point at the buckets.
        assert_eq!(catalog.requesters(), [S45, S46]);
        let configs = catalog.budget_configs();
        assert_eq!(configs.len(), 7);
        let s46_east = configs
            .iter()
            .find(|c| c.group == S46 && c.region == "us-east5")
            .unwrap();
        assert_eq!(s46_east.bucket, S46);
        let global = QuotaGroup::from("anthropic-claude-sonnet");
        assert_eq!(catalog.requesters_of(&global, "global"), [S45, S46]);
        assert_eq!(
            catalog.requesters_of(&QuotaGroup::from(S45), "us-east5"),
            [S45]
        );
        // A model name stands for its bucket of that location.
        assert_eq!(catalog.bucket_of(S45, "global"), "anthropic-claude-sonnet");
        assert_eq!(catalog.bucket_of(S45, "us-east5"), S45);
        assert_eq!(
            catalog.bucket_of("anthropic-claude-sonnet", "us"),
            "anthropic-claude-sonnet"
        );
    }

    #[test]
    fn models_sharing_a_bucket_must_agree_and_regional_ones_need_not() {
        let a = lineage(S45, &["global", "us-east5"]);
        let mut b = lineage(S46, &["global", "us-east5"]);
        // Different limits in the region: separate buckets, no conflict.
        b.regions[1].limits = Limits::new(120, 50_000);
        assert!(Catalog::new(vec![a.clone(), b.clone()]).is_ok());
        // Different limits on global: one bucket, a conflict naming the key.
        b.regions[0].limits = Limits::new(120, 50_000);
        let err = Catalog::new(vec![a, b]).unwrap_err();
        assert_eq!(
            err,
            CatalogError::BucketMismatch {
                model: S46.into(),
                other: S45.into(),
                bucket: "anthropic-claude-sonnet".into(),
                region: "global".into(),
            }
        );
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("models.{S46:?}.regions: location \"global\"")),
            "{shown}"
        );
        assert!(shown.contains(S45), "{shown}");
    }

    #[test]
    fn vertex_locations_must_be_vertex_names_other_providers_need_not() {
        let err = Catalog::new(vec![spec("a@1", &[], &["us-central"])]).unwrap_err();
        assert_eq!(
            err,
            CatalogError::NotAVertexLocation {
                model: "a@1".into(),
                region: "us-central".into()
            }
        );
        assert!(err.to_string().starts_with("models.\"a@1\".regions:"));
        let mut other = spec("a@1", &[], &[]);
        other.regions.push(RegionBudget {
            provider: "canned".into(),
            ..RegionBudget::vertex("elsewhere", Limits::new(2, 100))
        });
        let catalog = Catalog::new(vec![other]).unwrap();
        assert_eq!(catalog.budgets()[0].0, "a@1", "a bucket of its own");
    }

    #[test]
    fn cache_reads_count_for_older_models_only() {
        assert!(default_cache_reads_count("claude-3-haiku@20240307"));
        assert!(default_cache_reads_count("claude-3-5-sonnet-v2@20241022"));
        assert!(!default_cache_reads_count("claude-3-7-sonnet@20250219"));
        assert!(!default_cache_reads_count("claude-sonnet-4-5@20250929"));
    }

    #[test]
    fn resolves_ids_and_aliases() {
        let catalog = Catalog::new(vec![
            spec("claude-3-haiku@20240307", &["haiku"], &["us-central1"]),
            spec("claude-3-sonnet@20240229", &[], &["us-central1"]),
        ])
        .unwrap();
        let by_id = catalog.resolve("claude-3-haiku@20240307").unwrap();
        assert_eq!(by_id.model.id, "claude-3-haiku@20240307");
        assert!(!by_id.via_alias);
        let by_alias = catalog.resolve("haiku").unwrap();
        assert_eq!(by_alias.model.id, "claude-3-haiku@20240307");
        assert!(by_alias.via_alias);
        assert!(catalog.resolve("claude-3-opus@20240229").is_none());
    }

    #[test]
    fn rejects_a_name_used_twice() {
        let err =
            Catalog::new(vec![spec("a@1", &["x"], &[]), spec("b@1", &["x"], &[])]).unwrap_err();
        assert_eq!(
            err,
            CatalogError::DuplicateName {
                name: "x".into(),
                first: "a@1".into(),
                second: "b@1".into()
            }
        );
    }

    #[test]
    fn rejects_a_region_listed_twice() {
        let err = Catalog::new(vec![spec("a@1", &[], &["us-east5", "us-east5"])]).unwrap_err();
        assert!(matches!(err, CatalogError::DuplicateRegion { .. }));
    }
}
