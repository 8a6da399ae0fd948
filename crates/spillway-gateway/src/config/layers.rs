//! Reading the merged configuration into [`Settings`] part by part, and
//! telling which layer set a key.
//!
//! The `config` crate merges the layers (defaults, overlays, files, the
//! environment) into one tree. Deserializing that tree in one go would stop
//! at its first bad value, and serde's path would be lost; so each section,
//! each model and each tenant is deserialized on its own (with
//! `serde_path_to_error` for the path inside it). A part that cannot be read
//! is replaced by its built-in default (sections) or left out (models,
//! tenants), so the cross-field rules still run on the rest; the caller then
//! forgets what those rules said under the unreadable parts.
//!
//! Origins: each layer is kept as a tree of its own, and a problem's key is
//! looked up in them, deepest match first, the later layer winning a tie
//! (the order in which the layers override one another).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::problems::{steps, teach, Problems, Step};
use super::{
    AdminSettings, BatchSettings, ModelSettings, ProvidersSettings, QuotaDefaults,
    SchedulerSettings, ServerSettings, Settings, SpendSettings, TelemetrySettings, TenantSettings,
    UpstreamSettings, DEFAULT_TOML,
};

/// The top-level tables a configuration may have.
const SECTIONS: [&str; 11] = [
    "server",
    "upstream",
    "quota",
    "scheduler",
    "admin",
    "batch",
    "models",
    "tenants",
    "spend",
    "telemetry",
    "providers",
];

/// Where a layer came from, for messages.
enum Source {
    Named(String),
    /// Leaves hold the variable's name.
    Environment,
}

struct Layer {
    source: Source,
    tree: Value,
}

/// Every layer of one load, lowest first.
pub(super) struct Layers(Vec<Layer>);

impl Layers {
    pub(super) fn new(overlays: &[&str], files: &[PathBuf], env: &HashMap<String, String>) -> Self {
        let toml_tree = |text: &str| {
            toml::from_str::<toml::Table>(text)
                .ok()
                .and_then(|t| serde_json::to_value(t).ok())
                .unwrap_or(Value::Null)
        };
        let mut layers = vec![Layer {
            source: Source::Named("the built-in defaults".into()),
            tree: toml_tree(DEFAULT_TOML),
        }];
        layers.extend(overlays.iter().map(|text| Layer {
            source: Source::Named("the built-in overlay".into()),
            tree: toml_tree(text),
        }));
        layers.extend(files.iter().map(|file| {
            Layer {
                source: Source::Named(file.display().to_string()),
                tree: std::fs::read_to_string(file)
                    .map(|text| toml_tree(&text))
                    .unwrap_or(Value::Null),
            }
        }));
        layers.push(Layer {
            source: Source::Environment,
            tree: environment_tree(env),
        });
        Self(layers)
    }

    /// The layer that set `key` or its nearest parent, if any did.
    pub(super) fn origin_of(&self, key: &str) -> Option<String> {
        let path = steps(key);
        let mut best: Option<(usize, String)> = None;
        for layer in &self.0 {
            let (depth, reached) = descend(&layer.tree, &path);
            if depth == 0 || best.as_ref().is_some_and(|(d, _)| depth < *d) {
                continue;
            }
            let name = match (&layer.source, reached) {
                (Source::Named(name), _) => name.clone(),
                (Source::Environment, Value::String(var)) => {
                    format!("the environment variable {var}")
                }
                (Source::Environment, _) => "the environment".into(),
            };
            best = Some((depth, name));
        }
        best.map(|(_, name)| name)
    }
}

/// `SPILLWAY__QUOTA__HEADROOM` as `{quota: {headroom: "SPILLWAY__QUOTA__HEADROOM"}}`,
/// matching how the `config` crate reads the variables (lower-cased keys).
fn environment_tree(env: &HashMap<String, String>) -> Value {
    let mut root = serde_json::Map::new();
    for var in env.keys() {
        let Some(rest) = var.strip_prefix("SPILLWAY__") else {
            continue;
        };
        let keys: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        let Some((leaf, parents)) = keys.split_last() else {
            continue;
        };
        let mut table = &mut root;
        for key in parents {
            let next = table
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Default::default()));
            if !next.is_object() {
                *next = Value::Object(Default::default());
            }
            let Value::Object(inner) = next else {
                unreachable!("just made an object")
            };
            table = inner;
        }
        table.insert(leaf.clone(), Value::String(var.clone()));
    }
    Value::Object(root)
}

/// How many steps of `path` exist in `tree`, and the value reached.
fn descend<'a>(tree: &'a Value, path: &[Step]) -> (usize, &'a Value) {
    let mut here = tree;
    for (depth, step) in path.iter().enumerate() {
        let next = match (step, here) {
            (Step::Key(k), Value::Object(map)) => map.get(k),
            (Step::Index(i), Value::Array(items)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(next) => here = next,
            None => return (depth, here),
        }
    }
    (path.len(), here)
}

/// One part of the tree as `T`; a failure becomes a problem under `key`.
fn read<T: DeserializeOwned>(value: &Value, key: &str, problems: &mut Problems) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let full = match path.as_str() {
                "." | "" => key.to_owned(),
                p if p.starts_with('[') => format!("{key}{p}"),
                p => format!("{key}.{p}"),
            };
            problems.add(full, teach(&e.into_inner().to_string()));
            None
        }
    }
}

/// A required section, or its built-in default when it cannot be read
/// (recording its key in `unread`).
fn section<T: DeserializeOwned>(
    tree: &serde_json::Map<String, Value>,
    key: &str,
    problems: &mut Problems,
    unread: &mut Vec<String>,
) -> Option<T> {
    match tree.get(key) {
        Some(value) => {
            if let Some(t) = read(value, key, problems) {
                return Some(t);
            }
        }
        None => problems.add(key, "this section is required"),
    }
    unread.push(key.to_owned());
    let defaults: toml::Table = toml::from_str(DEFAULT_TOML).ok()?;
    let default = serde_json::to_value(defaults.get(key)?).ok()?;
    read(&default, key, &mut Problems::default())
}

/// A section that may be left out.
fn optional<T: DeserializeOwned + Default>(
    tree: &serde_json::Map<String, Value>,
    key: &str,
    problems: &mut Problems,
    unread: &mut Vec<String>,
) -> T {
    match tree.get(key) {
        None | Some(Value::Null) => T::default(),
        Some(value) => read(value, key, problems).unwrap_or_else(|| {
            unread.push(key.to_owned());
            T::default()
        }),
    }
}

/// A table of named entries (`models`, `tenants`), each read on its own.
fn entries<T: DeserializeOwned>(
    tree: &serde_json::Map<String, Value>,
    section: &str,
    key_of: impl Fn(&str) -> String,
    problems: &mut Problems,
    unread: &mut Vec<String>,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    match tree.get(section) {
        None | Some(Value::Null) => {}
        Some(Value::Object(items)) => {
            for (name, value) in items {
                let key = key_of(name);
                match read(value, &key, problems) {
                    Some(t) => {
                        out.insert(name.clone(), t);
                    }
                    None => unread.push(key),
                }
            }
            if out.is_empty() && !items.is_empty() {
                // Every entry left out: the rules about the table as a
                // whole would see it empty.
                unread.push(section.to_owned());
            }
        }
        Some(_) => {
            problems.add(section, "must be a table of named entries");
            unread.push(section.to_owned());
        }
    }
    out
}

/// The settings the tree holds, with stand-ins for what could not be read
/// (listed as the second value), or `None` when not even the stand-ins
/// could be made. Every read problem is in `problems`.
pub(super) fn read_settings(
    tree: &Value,
    problems: &mut Problems,
) -> Option<(Settings, Vec<String>)> {
    let Value::Object(tree) = tree else {
        problems.add("(root)", "the configuration must be a table");
        return None;
    };
    for key in tree.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
        problems.add(
            key.clone(),
            format!("unknown section (known: {})", SECTIONS.join(", ")),
        );
    }
    let mut unread = Vec::new();
    let server: Option<ServerSettings> = section(tree, "server", problems, &mut unread);
    let upstream: Option<UpstreamSettings> = section(tree, "upstream", problems, &mut unread);
    let quota: Option<QuotaDefaults> = section(tree, "quota", problems, &mut unread);
    let scheduler: Option<SchedulerSettings> = section(tree, "scheduler", problems, &mut unread);
    let admin: AdminSettings = optional(tree, "admin", problems, &mut unread);
    let batch: BatchSettings = optional(tree, "batch", problems, &mut unread);
    let spend: SpendSettings = optional(tree, "spend", problems, &mut unread);
    let telemetry: TelemetrySettings = optional(tree, "telemetry", problems, &mut unread);
    let providers: ProvidersSettings = optional(tree, "providers", problems, &mut unread);
    let models: BTreeMap<String, ModelSettings> = entries(
        tree,
        "models",
        |id| format!("models.{id:?}"),
        problems,
        &mut unread,
    );
    let tenants: BTreeMap<String, TenantSettings> = entries(
        tree,
        "tenants",
        |name| format!("tenants.{name}"),
        problems,
        &mut unread,
    );
    let settings = Settings {
        server: server?,
        upstream: upstream?,
        quota: quota?,
        scheduler: scheduler?,
        admin,
        batch,
        models,
        tenants,
        spend,
        telemetry,
        providers,
    };
    Some((settings, unread))
}
