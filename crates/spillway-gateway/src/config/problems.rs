//! What is wrong with a configuration: every problem found in one pass,
//! each with its key and the layer that set it.
//!
//! A newcomer fixing a config file should not meet its errors one start at
//! a time. So loading does not stop at the first bad value: each section,
//! each model and each tenant is read on its own, the cross-field rules run
//! on whatever could be read, and the result is one list. Each entry names
//! its key in the dotted form of the file (`models."claude-3-haiku@20240307".regions[0].name`)
//! and, where a layer set that key, the layer: a file's path, an environment
//! variable, or the built-in defaults.
//!
//! The HTTP edge never sees these: a bad configuration stops start-up (or a
//! SIGHUP reload) before a request is served.

use std::fmt;

/// One problem: the key it is about, what is wrong, and who set the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub problem: String,
    /// The layer that set the key (or its nearest parent), when one did.
    pub origin: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)?;
        if let Some(origin) = &self.origin {
            write!(f, " (set in {origin})")?;
        }
        Ok(())
    }
}

/// The problems of one configuration, in the order they were found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn add(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            problem: problem.into(),
            origin: None,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn extend(&mut self, other: Problems) {
        self.0.extend(other.0);
    }

    /// Whether any problem is about `key` or below it.
    pub(super) fn any_under(&self, key: &str) -> bool {
        self.0.iter().any(|p| is_under(&p.key, key))
    }

    /// Drops problems about `key` or below it (rules that ran on a
    /// stand-in for a section that could not be read).
    pub(super) fn forget_under(&mut self, key: &str) {
        self.0.retain(|p| !is_under(&p.key, key));
    }

    /// Names each problem's layer with `origin_of`.
    pub(super) fn attribute(&mut self, origin_of: impl Fn(&str) -> Option<String>) {
        for p in &mut self.0 {
            p.origin = origin_of(&p.key);
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems in the configuration:", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

/// Whether `key` is `parent` or a key inside it.
fn is_under(key: &str, parent: &str) -> bool {
    key.strip_prefix(parent)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// One step of a dotted key: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

/// Splits `a."b.c"[2].d` into `a`, `b.c`, `[2]`, `d`.
pub(super) fn steps(key: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut chars = key.chars().peekable();
    let mut plain = String::new();
    let flush = |plain: &mut String, out: &mut Vec<Step>| {
        if !plain.is_empty() {
            out.push(Step::Key(std::mem::take(plain)));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '.' => flush(&mut plain, &mut out),
            '"' => {
                flush(&mut plain, &mut out);
                let quoted: String = chars.by_ref().take_while(|&c| c != '"').collect();
                out.push(Step::Key(quoted));
            }
            '[' => {
                flush(&mut plain, &mut out);
                let digits: String = chars.by_ref().take_while(|&c| c != ']').collect();
                if let Ok(i) = digits.parse() {
                    out.push(Step::Index(i));
                }
            }
            c => plain.push(c),
        }
    }
    flush(&mut plain, &mut out);
    out
}

/// Rewrites serde's messages into ones that teach: an unknown enum value
/// lists the valid ones by their config spelling, without Rust type names.
pub(super) fn teach(message: &str) -> String {
    let ticked =
        |s: &str| -> Vec<String> { s.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((got, expected)) = rest.split_once("`, expected ") {
            let valid = ticked(expected);
            if !valid.is_empty() {
                return format!("{got:?} is not one of {}", valid.join(", "));
            }
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((_, expected)) = rest.split_once("`, expected ") {
            let valid = ticked(expected);
            return format!("unknown key (known here: {})", valid.join(", "));
        }
        if rest.contains("there are no fields") {
            return "unknown key (this table takes none)".into();
        }
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return format!("{field:?} is required here");
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_steps() {
        assert_eq!(
            steps("models.\"claude-3.5@x\".regions[1].name"),
            [
                Step::Key("models".into()),
                Step::Key("claude-3.5@x".into()),
                Step::Key("regions".into()),
                Step::Index(1),
                Step::Key("name".into()),
            ]
        );
        assert_eq!(steps("tenants"), [Step::Key("tenants".into())]);
    }

    #[test]
    fn enum_and_field_errors_teach() {
        assert_eq!(
            teach("unknown variant `random`, expected `most_headroom` or `ordered`"),
            "\"random\" is not one of most_headroom, ordered"
        );
        assert_eq!(
            teach("unknown variant `x`, expected one of `gcp`, `static`, `none`"),
            "\"x\" is not one of gcp, static, none"
        );
        assert_eq!(
            teach("unknown field `listen_port`, expected `listen` or `auth`"),
            "unknown key (known here: listen, auth)"
        );
        assert_eq!(teach("missing field `name`"), "\"name\" is required here");
        assert_eq!(
            teach("invalid type: string \"a\", expected u32"),
            "invalid type: string \"a\", expected u32"
        );
    }

    #[test]
    fn one_problem_is_one_line_and_many_are_a_list() {
        let mut p = Problems::default();
        p.add("quota.headroom", "must be in (0, 1]");
        assert_eq!(p.to_string(), "quota.headroom: must be in (0, 1]");
        p.add("models.\"m\".regions", "must list at least one location");
        p.attribute(|k| k.starts_with("quota").then(|| "a.toml".to_string()));
        assert_eq!(
            p.to_string(),
            "2 problems in the configuration:\n  - quota.headroom: must be in (0, 1] (set in a.toml)\n  - models.\"m\".regions: must list at least one location"
        );
        p.forget_under("models.\"m\"");
        assert_eq!(p.iter().count(), 1);
        assert!(is_under("a.b[0]", "a.b") && !is_under("a.bc", "a.b"));
    }
}
