//! The modules of each of Keel's crates import one another one way only: the
//! `crate::<module>` paths each top-level module (with its submodules) names in
//! its code must form a graph without cycles, as ARCHITECTURE.md draws it.
//! Comments and a file's `mod tests` do not count: a doc link or a test's
//! fixture is not a dependency of the module.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose modules are checked, by their directory in the workspace.
const CRATES: &[&str] = &[
    "proto",
    "common",
    "agent",
    "server",
    "plugin-sdk",
    "ctl",
    "plugins/key-request",
    "plugins/file-delivery",
    "plugins/proxy",
    "tests",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the tests crate")
        .to_path_buf()
}

/// A file's code: without comment lines and without its `mod tests`.
fn code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .iter()
        .enumerate()
        .position(|(i, l)| {
            l.trim() == "#[cfg(test)]"
                && lines[i + 1..]
                    .iter()
                    .find(|n| !n.trim().is_empty())
                    .is_some_and(|n| n.trim_start().starts_with("mod tests"))
        })
        .unwrap_or(lines.len());
    lines[..end]
        .iter()
        .filter(|l| !l.trim_start().starts_with("//"))
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each top-level module of `src` and the other top-level modules it names.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                // A binary's own modules are a crate of their own.
                if path.file_name().is_some_and(|n| n != "bin") {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component");
        let module = Path::new(first.as_os_str()).with_extension("");
        let module = module.to_string_lossy().into_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&file).expect("source file"));
        let named = graph.entry(module.clone()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let name: String = text[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                named.insert(name);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn every_crate_s_modules_import_one_way() {
    let root = workspace();
    let mut loops = Vec::new();
    for krate in CRATES {
        let graph = imports(&root.join(krate).join("src"));
        assert!(!graph.is_empty(), "{krate} has no modules to check");
        if let Some(found) = cycle(&graph) {
            loops.push(format!("{krate}: {}", found.join(" -> ")));
        }
    }
    assert!(
        loops.is_empty(),
        "modules import each other in a loop:\n{}",
        loops.join("\n")
    );
}

#[test]
fn the_big_crates_are_read_whole() {
    let root = workspace();
    let agent = imports(&root.join("agent/src"));
    assert!(
        agent.contains_key("record") && agent.contains_key("transport"),
        "{agent:?}"
    );
    let server = imports(&root.join("server/src"));
    assert!(
        server["grpc"].contains("state") && server.contains_key("store"),
        "{server:?}"
    );
}

#[test]
fn a_loop_is_found() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycle(&graph).map(|c| c.join(" -> ")).as_deref(),
        Some("a -> b -> c -> a")
    );
    graph.insert("c".to_owned(), BTreeSet::new());
    assert_eq!(cycle(&graph), None);
}

#[test]
fn comments_and_tests_are_not_imports() {
    let text = "use crate::a::X;\n/// See [`crate::b`].\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::c;\n}\n";
    let kept = code(text);
    assert!(kept.contains("crate::a"), "{kept}");
    assert!(!kept.contains("crate::b") && !kept.contains("crate::c"), "{kept}");
    // A test-only item in the middle of a file does not end its code.
    let text = "#[cfg(test)]\nfn helper() {}\nuse crate::d;\n";
    assert!(code(text).contains("crate::d"));
}
