//! The house's rules, checked on the source (`docs/architecture.md`): no import circle between
//! the top-level modules of `src/` (a module and its children count as one), and `src/llm/` and
//! `src/replay/` import nothing from a layer above theirs. A refactor that breaks one fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules each top-level module of `src/` names as `crate::<m>` (comments left out).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "main" || top == "cli" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let entry = edges.entry(top.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let names: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
                    group.split([',', '}']).map(|s| s.trim().split("::").next().unwrap_or("").to_string()).collect()
                } else {
                    vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("").to_string()]
                };
                for n in names {
                    if !n.is_empty() && n != top && n != "self" {
                        entry.insert(n);
                    }
                }
            }
        }
    }
    edges
}

/// A path from `to` back to `from` through `edges`, if there is one.
fn path_back(edges: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut stack = vec![(to.to_string(), vec![from.to_string(), to.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        if at == from {
            return Some(path);
        }
        if !seen.insert(at.clone()) {
            continue;
        }
        for n in edges.get(&at).into_iter().flatten() {
            let mut p = path.clone();
            p.push(n.clone());
            stack.push((n.clone(), p));
        }
    }
    None
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let edges = imports();
    assert!(edges.contains_key("replay") && edges.contains_key("llm"), "read the source tree: {edges:?}");
    for (m, deps) in &edges {
        for d in deps {
            if let Some(p) = path_back(&edges, m, d) {
                panic!("import circle: {}", p.join(" -> "));
            }
        }
    }
}

#[test]
fn the_llm_runtime_and_the_replay_import_only_layers_below_them() {
    let edges = imports();
    let below_llm: BTreeSet<&str> = ["io", "rng", "progress", "alloc", "ops"].into();
    let below_replay: BTreeSet<&str> =
        ["io", "rng", "progress", "alloc", "data", "eval", "ops", "llm", "rec", "embed", "grpo", "prompts", "features"]
            .into();
    for (m, allowed) in [("llm", &below_llm), ("replay", &below_replay)] {
        let above: Vec<&String> = edges[m].iter().filter(|d| !allowed.contains(d.as_str())).collect();
        assert!(above.is_empty(), "src/{m}/ imports {above:?}, a layer above it");
    }
}
