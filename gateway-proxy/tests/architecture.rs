//! The crate's top-level modules depend on each other without cycles, and the server does
//! not reach into the proxy: read from the sources, so that a new `use` that breaks either
//! fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its sources name as `crate::<module>`.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = std::fs::read_dir(&src)
        .expect("src")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_stem()?.to_str()?.to_owned();
            (name != "lib" && name != "fuzz").then_some(name)
        })
        .collect();
    let mut edges = BTreeMap::new();
    for module in &modules {
        let mut text =
            std::fs::read_to_string(src.join(format!("{module}.rs"))).unwrap_or_default();
        let dir = src.join(module);
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    // Fuzz targets and tests may use anything.
                    if path
                        .file_name()
                        .is_some_and(|n| n != "fuzz" && n != "tests")
                    {
                        stack.push(path);
                    }
                } else if path
                    .file_stem()
                    .is_some_and(|n| n != "fuzz" && n != "tests")
                {
                    text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
                }
            }
        }
        let deps: BTreeSet<String> = modules
            .iter()
            .filter(|other| *other != module)
            .filter(|other| {
                // An import or a path, not a doc link.
                text.lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .any(|l| {
                        l.contains(&format!("crate::{other}::"))
                            || l.contains(&format!("crate::{other};"))
                            || l.contains(&format!("crate::{other}::{{"))
                    })
            })
            .cloned()
            .collect();
        edges.insert(module.clone(), deps);
    }
    edges
}

#[test]
fn top_level_modules_form_no_cycle() {
    let edges = edges();
    assert!(
        edges.contains_key("server") && edges.contains_key("proxy"),
        "{edges:?}"
    );
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|n| n == node) {
            panic!("a module cycle: {:?} -> {node}", &path[at..]);
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, path, done);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        visit(node, &edges, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_server_imports_nothing_from_the_proxy() {
    let edges = edges();
    assert!(!edges["server"].contains("proxy"), "{:?}", edges["server"]);
    assert!(
        !edges["upstream"].contains("proxy"),
        "{:?}",
        edges["upstream"]
    );
    assert!(
        !edges["h1"]
            .iter()
            .any(|d| d == "server" || d == "proxy" || d == "upstream")
    );
}
