//! The module graph of src/: dependencies point one way along the flow
//! `config -> policy -> kernel -> backend -> survey, conntrack -> agent -> cli/commands ->
//! main`, `observe` imports none of the agent, backend drivers never import each other,
//! the survey and conntrack (which act on the kernel beside the drivers) never import
//! each other, and there is no cycle among modules. Reads the sources, so a new `use` that breaks the shape fails here.
//! `cargo test --test it architecture -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path such as `backend::iptables` (the crate root is empty).
type Module = String;

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/backend/mod.rs` -> `backend`, `src/backend/iptables.rs` -> `backend::iptables`.
fn module_of(src: &Path, file: &Path) -> Module {
    let relative = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// Test-only modules may reach anywhere they like (a fake, a fixture).
fn is_test_only(module: &str) -> bool {
    let last = module.rsplit("::").next().unwrap_or_default();
    last == "tests" || last.ends_with("_tests") || last == "fake"
}

fn parent(module: &str) -> Module {
    module
        .rsplit_once("::")
        .map_or(String::new(), |(p, _)| p.to_string())
}

fn join(base: &str, name: &str) -> Module {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}::{name}")
    }
}

/// The deepest known module a path names (`backend::iptables::render` -> `backend::iptables`).
fn resolve(path: &[&str], base: &str, known: &BTreeSet<Module>) -> Option<Module> {
    let mut found = None;
    let mut current = base.to_string();
    for segment in path {
        let next = join(&current, segment);
        if known.contains(&next) {
            found = Some(next.clone());
            current = next;
        } else {
            break;
        }
    }
    found.or_else(|| (!base.is_empty()).then(|| base.to_string()))
}

/// Paths after `crate::` or `super::` in the code (comments dropped), with braces
/// expanded one level: `use super::{runner::Program, Backend}` gives `runner::Program`
/// and `Backend`.
fn references(code: &str) -> Vec<(String, Vec<String>)> {
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    for anchor in ["crate::", "super::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(anchor) {
            let before = rest[..at].chars().last();
            rest = &rest[at + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let mut supers = usize::from(anchor == "super::");
            while let Some(more) = rest.strip_prefix("super::") {
                supers += 1;
                rest = more;
            }
            let head = if anchor == "crate::" {
                "crate"
            } else {
                "super"
            };
            let kind = format!("{head}{supers}");
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let path: Vec<String> = item
                        .trim()
                        .split("::")
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty() && s != "{")
                        .collect();
                    found.push((kind.clone(), path));
                }
                continue;
            }
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.push((kind, path.split("::").map(str::to_string).collect()));
        }
    }
    found
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: BTreeMap<Module, PathBuf> = files
        .iter()
        .map(|file| (module_of(&src, file), file.clone()))
        .collect();
    let known: BTreeSet<Module> = modules.keys().cloned().collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, file) in &modules {
        if is_test_only(module) {
            continue;
        }
        let code = std::fs::read_to_string(file).expect("read source");
        // An inline `#[cfg(test)] mod tests { .. }` at the end of a file is test-only too.
        let code = match code.find("#[cfg(test)]\nmod tests {") {
            Some(at) => &code[..at],
            None => &code[..],
        };
        for (kind, path) in references(code) {
            let segments: Vec<&str> = path.iter().map(String::as_str).collect();
            let base = match kind.strip_prefix("super") {
                Some(levels) => {
                    let mut base = module.clone();
                    for _ in 0..levels.parse().unwrap_or(1) {
                        base = parent(&base);
                    }
                    base
                }
                None => String::new(),
            };
            let Some(target) = resolve(&segments, &base, &known) else {
                continue;
            };
            let related = target == *module
                || module.starts_with(&format!("{target}::"))
                || target.starts_with(&format!("{module}::"))
                || is_test_only(&target);
            if !related && !target.is_empty() {
                edges.entry(module.clone()).or_default().insert(target);
            }
        }
        edges.entry(module.clone()).or_default();
    }
    edges
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or_default()
}

#[test]
fn dependencies_point_one_way_and_nothing_is_cyclic() {
    let edges = graph();
    for (from, to) in &edges {
        println!(
            "{from:<22} -> {}",
            to.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    // 1. The layers: a module imports only layers before its own.
    let rank = |module: &str| match top(module) {
        "config" => Some(0),
        "policy" => Some(1),
        "kernel" => Some(2),
        "backend" => Some(3),
        "observe" => Some(3),
        "survey" => Some(4),
        "conntrack" => Some(4),
        "agent" => Some(5),
        "cli" => Some(6),
        "commands" => Some(7),
        // The fuzz target's check (and the crate root): above everything it checks.
        "" | "fuzzing" => Some(8),
        _ => None,
    };
    let mut wrong = Vec::new();
    for (from, targets) in &edges {
        for to in targets {
            if top(from) == top(to) {
                continue;
            }
            let (Some(a), Some(b)) = (rank(from), rank(to)) else {
                wrong.push(format!("{from} -> {to}: unknown layer"));
                continue;
            };
            let observe_pure = top(from) != "observe" || top(to) == "observe";
            let backend_blind = top(from) != "backend" || top(to) != "observe";
            // Same layer (survey, conntrack; backend, observe): never each other.
            if b >= a || !observe_pure || !backend_blind {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the flow: {wrong:#?}");

    // 2. Drivers import only the backend module itself, the kernel seam and the policy;
    // the kernel seam only the policy.
    for driver in [
        "backend::iptables",
        "backend::nftables",
        "backend::windows",
        "backend::dry_run",
        "kernel",
    ] {
        let allowed = |t: &str| t == "backend" || matches!(top(t), "kernel" | "policy" | "config");
        let extra: Vec<&Module> = edges[driver]
            .iter()
            .filter(|t| !allowed(t.as_str()) || (driver == "kernel" && t.as_str() == "backend"))
            .collect();
        assert!(extra.is_empty(), "{driver} imports {extra:?}");
    }
    // The watcher takes a callback and knows nothing of the crate.
    assert!(
        edges["agent::watch"].is_empty(),
        "agent::watch imports {:?}",
        edges["agent::watch"]
    );

    // 3. No cycle among modules (depth-first search for a back edge).
    fn visit(
        node: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, u8>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match state.get(node) {
            Some(1) => {
                let at = stack.iter().position(|m| m == node).unwrap_or(0);
                let mut cycle = stack[at..].to_vec();
                cycle.push(node.clone());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(node.clone(), 1);
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, state, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        state.insert(node.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(node, &edges, &mut state, &mut stack) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_a_cycle_and_a_driver_calling_a_driver() {
    // The parser finds the references the checks rely on.
    let refs = references(
        "use super::{runner::Program, Backend};\nuse crate::backend::nftables::TABLE; // crate::agent\nlet x = super::super::config::load();",
    );
    let paths: Vec<String> = refs
        .iter()
        .map(|(k, p)| format!("{k}:{}", p.join("::")))
        .collect();
    assert_eq!(
        paths,
        [
            "crate0:backend::nftables::TABLE",
            "super1:runner::Program",
            "super1:Backend",
            "super2:config::load"
        ]
    );
}
