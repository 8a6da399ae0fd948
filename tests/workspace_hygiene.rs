//! Dependency hygiene, checked like everything else: every crate a
//! `Cargo.toml` of this workspace depends on is named in that crate's code
//! (`src/` for dependencies; tests and benches too for dev-dependencies),
//! and every workspace dependency is used by some member. A dependency
//! nobody uses costs build time and audit surface for nothing.
//!
//! The check is textual (a crate's name, `-` as `_`, as a word in the Rust
//! sources), which is what `cargo udeps` approximates without a nightly
//! compiler; a name that appears only in a comment would pass, so keep
//! comments from naming crates that are gone.

use std::path::{Path, PathBuf};

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The dependency names listed in `[section]` of a manifest.
fn listed(manifest: &str, section: &str) -> Vec<String> {
    let header = format!("[{section}]");
    let Some(start) = manifest.lines().position(|l| l.trim() == header) else {
        return Vec::new();
    };
    manifest
        .lines()
        .skip(start + 1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| {
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            (!name.is_empty() && l[name.len()..].trim_start().starts_with(['=', '.']))
                .then_some(name)
        })
        .collect()
}

fn named_in(name: &str, files: &[PathBuf]) -> bool {
    let ident = name.replace('-', "_");
    files.iter().any(|f| {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        text.match_indices(&ident).any(|(at, _)| {
            let before = text[..at].chars().next_back();
            let after = text[at + ident.len()..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        })
    })
}

#[test]
fn every_dependency_is_used() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut members = vec![root.to_path_buf()];
    for entry in std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .flatten()
    {
        members.push(entry.path());
    }
    let mut unused = Vec::new();
    let mut manifests = Vec::new();
    for member in &members {
        let manifest = std::fs::read_to_string(member.join("Cargo.toml")).expect("manifest");
        let (mut src, mut all) = (Vec::new(), Vec::new());
        rust_sources(&member.join("src"), &mut src);
        all.extend(src.iter().cloned());
        for dir in ["tests", "benches"] {
            rust_sources(&member.join(dir), &mut all);
        }
        for name in listed(&manifest, "dependencies") {
            if !named_in(&name, &src) {
                unused.push(format!("{}: {name}", member.display()));
            }
        }
        for name in listed(&manifest, "dev-dependencies") {
            if !named_in(&name, &all) {
                unused.push(format!("{}: {name} (dev)", member.display()));
            }
        }
        manifests.push(manifest);
    }
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).expect("root manifest");
    for name in listed(&workspace, "workspace.dependencies") {
        let used = manifests.iter().any(|m| {
            listed(m, "dependencies").contains(&name)
                || listed(m, "dev-dependencies").contains(&name)
        });
        if !used {
            unused.push(format!("workspace: {name}"));
        }
    }
    assert!(unused.is_empty(), "unused dependencies: {unused:#?}");
}

#[test]
fn the_manifest_reader_finds_dependencies() {
    let manifest = "[dependencies]\nfoo.workspace = true\nbar-baz = \"1\"\n# note\n\n[dev-dependencies]\nqux = { version = \"1\" }\n";
    assert_eq!(listed(manifest, "dependencies"), ["foo", "bar-baz"]);
    assert_eq!(listed(manifest, "dev-dependencies"), ["qux"]);
    let dir = std::env::temp_dir().join(format!("hygiene-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a.rs");
    std::fs::write(&file, "use bar_baz::X; let foox = 1;").unwrap();
    assert!(named_in("bar-baz", std::slice::from_ref(&file)));
    assert!(!named_in("foo", std::slice::from_ref(&file)));
    std::fs::remove_dir_all(&dir).unwrap();
}
