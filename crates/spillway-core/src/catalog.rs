//! The model catalog: which Claude models Spillway offers, under which names,
//! and in which Vertex regions.
//!
//! Clients name models three ways: the Vertex id (`claude-3-haiku@20240307`),
//! the Anthropic API id (`claude-3-haiku-20240307`, translated by the caller
//! before lookup) or a configured alias (`haiku`). Vertex pins versions with
//! `@date`; Google advises against unversioned ids, so a [`Resolution`] says
//! whether an alias was used and the edge can warn about it.
//!
//! Each model lists its regions in preference order. The first is the
//! primary region; the rest are where traffic spills when it is full.

use std::collections::HashMap;

use crate::keys::{ModelId, QuotaGroup};
use crate::ledger::Limits;

/// The provider of locations that name none: Google's Vertex AI.
pub const VERTEX_PROVIDER: &str = "vertex";

/// The per-(region, model) budget Vertex grants, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionBudget {
    /// Vertex location, e.g. `us-central1` or `global`.
    pub region: String,
    /// Which upstream provider serves this location ([`VERTEX_PROVIDER`]
    /// unless configured otherwise): the gateway looks the provider up by
    /// this name, so a new provider is a new module, not a new branch.
    pub provider: String,
    /// Requests and tokens per window (Vertex: per minute).
    pub limits: Limits,
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
    /// Regions serving the model, primary first. May be empty: the model is
    /// known but switched off, and requests for it get a clear error.
    pub regions: Vec<RegionBudget>,
    /// The budget this model draws on. Usually its own id; models that share
    /// one Vertex quota (the "lineage" buckets of newer models on global and
    /// multi-region endpoints) name the same group.
    pub quota_group: QuotaGroup,
}

/// How a requested name was resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolution<'a> {
    pub model: &'a ModelSpec,
    /// The client used an alias rather than a versioned id.
    pub via_alias: bool,
}

/// Configuration mistakes that make a catalog unusable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CatalogError {
    #[error("models: the name {name:?} is used by both {first:?} and {second:?}")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
    #[error("models.{model}: region {region:?} is listed twice")]
    DuplicateRegion { model: String, region: String },
    #[error("models.{model}: quota group {group:?} already has a different budget in {region:?} (from {other:?}); models sharing a group must agree")]
    GroupMismatch {
        model: String,
        other: String,
        group: String,
        region: String,
    },
}

/// The set of configured models, indexed by every name they answer to.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: Vec<ModelSpec>,
    /// name → (index into `models`, is an alias)
    names: HashMap<String, (usize, bool)>,
}

impl Catalog {
    pub fn new(models: Vec<ModelSpec>) -> Result<Self, CatalogError> {
        let mut names: HashMap<String, (usize, bool)> = HashMap::new();
        let mut group_budgets: HashMap<(&str, &str), (&RegionBudget, &str)> = HashMap::new();
        for (index, model) in models.iter().enumerate() {
            for budget in &model.regions {
                let key = (model.quota_group.as_str(), budget.region.as_str());
                if let Some((other, other_model)) =
                    group_budgets.insert(key, (budget, model.id.as_str()))
                {
                    if other.limits != budget.limits {
                        return Err(CatalogError::GroupMismatch {
                            model: model.id.to_string(),
                            other: other_model.to_string(),
                            group: model.quota_group.to_string(),
                            region: budget.region.clone(),
                        });
                    }
                }
            }
            let mut seen_regions = std::collections::HashSet::new();
            for budget in &model.regions {
                if !seen_regions.insert(budget.region.as_str()) {
                    return Err(CatalogError::DuplicateRegion {
                        model: model.id.to_string(),
                        region: budget.region.clone(),
                    });
                }
            }
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
        Ok(Self { models, names })
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

    /// Every (quota group, region) budget once, with its limits.
    pub fn budgets(&self) -> Vec<(&QuotaGroup, &RegionBudget)> {
        let mut seen = std::collections::HashSet::new();
        self.models
            .iter()
            .flat_map(|m| m.regions.iter().map(move |r| (&m.quota_group, r)))
            .filter(|(group, r)| seen.insert((group.as_str(), r.region.as_str())))
            .collect()
    }

    /// Every quota group once.
    pub fn quota_groups(&self) -> Vec<&QuotaGroup> {
        let mut seen = std::collections::HashSet::new();
        self.models
            .iter()
            .map(|m| &m.quota_group)
            .filter(|g| seen.insert(g.as_str()))
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
                .map(|r| RegionBudget {
                    region: r.to_string(),
                    provider: VERTEX_PROVIDER.into(),
                    limits: Limits::new(60, 50_000),
                })
                .collect(),
            quota_group: id.into(),
        }
    }

    #[test]
    fn models_in_one_quota_group_share_budgets_and_must_agree() {
        let mut a = spec("claude-opus-4-7", &[], &["global"]);
        let mut b = spec("claude-opus-4-8", &[], &["global"]);
        a.quota_group = "anthropic-claude-opus".into();
        b.quota_group = "anthropic-claude-opus".into();
        let catalog = Catalog::new(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(catalog.budgets().len(), 1);
        assert_eq!(catalog.quota_groups(), ["anthropic-claude-opus"]);
        b.regions[0].limits = Limits::new(120, 50_000);
        assert!(matches!(
            Catalog::new(vec![a, b]),
            Err(CatalogError::GroupMismatch { .. })
        ));
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
        let err = Catalog::new(vec![spec("a@1", &[], &["r", "r"])]).unwrap_err();
        assert!(matches!(err, CatalogError::DuplicateRegion { .. }));
    }
}
