//! The two names of a model, as distinct types.
//!
//! A request names a **model** ([`ModelId`], e.g. `claude-sonnet-4-5@20250929`):
//! that id goes into the upstream URL, the logs, the per-model estimate
//! corrections. The quota it spends is named by a [`QuotaGroup`], in two
//! roles:
//!
//! - a **bucket group**: with a location, the key of a budget. Newer models
//!   on Vertex's `global` and multi-region endpoints share one *lineage*
//!   bucket across versions (`anthropic-claude-sonnet`), so there the
//!   bucket group is the model's configured `quota_group`; on a regional
//!   endpoint every model has its own bucket, named by its id
//!   (`catalog::bucket_group`).
//! - a **requester** key: what a model's requests are asked and queued
//!   under, the model's own ([`QuotaGroup::of_model`]); the store maps each
//!   (requester, location) to the bucket it draws on.
//!
//! Budgets and shared-store keys are keyed by (bucket group, location),
//! wait queues and grants by requester; anything about the model itself by
//! id.
//!
//! Mixing the names once cost every model with its own `quota_group` all of
//! its traffic (queues were keyed by id, demands named the group, the
//! lookup missed and the request was refused as "never fits"). As two
//! types, the compiler keeps them apart: a map says which one it is keyed
//! by, and a conversion between them is always spelled out
//! ([`QuotaGroup::of_model`]).
//!
//! Both are cheap to clone (an `Arc<str>`) and read as `&str`.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(name: impl Into<Arc<str>>) -> Self {
                Self(name.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(Arc::from(s))
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

name_type!(
    /// A Vertex model id as configured (`claude-3-haiku@20240307`): what the
    /// upstream URL names and what logs and per-model learning are keyed by.
    ModelId
);

name_type!(
    /// A quota name: a bucket group (with a location, a budget's key) or a
    /// requester key (a model's own, for queues and grants); never a model
    /// id, though a model's own bucket and requester key spell its id.
    QuotaGroup
);

/// Maps keyed by a group may be looked up by `&str` (store keys, admin paths).
impl Borrow<str> for QuotaGroup {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Maps keyed by a model id may be looked up by `&str` (client names).
impl Borrow<str> for ModelId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl QuotaGroup {
    /// The group of a model that names none: a bucket of its own.
    pub fn of_model(model: &ModelId) -> Self {
        Self(Arc::clone(&model.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_model_without_a_group_is_its_own_group() {
        let model = ModelId::from("claude-3-haiku@20240307");
        assert_eq!(QuotaGroup::of_model(&model), "claude-3-haiku@20240307");
    }

    #[test]
    fn maps_keyed_by_a_group_are_looked_up_by_name() {
        let mut queues: HashMap<QuotaGroup, u32> = HashMap::new();
        queues.insert(QuotaGroup::from("anthropic-claude-sonnet"), 1);
        assert_eq!(queues.get("anthropic-claude-sonnet"), Some(&1));
        assert_eq!(queues.get("claude-sonnet-4-5@20250929"), None);
    }
}
