//! The layers of `lib.rs`, checked on the source: the core imports no edge (`ws`, `grpc`,
//! `admin`, `run`) and no generated protobuf (`pb`); the wire imports nothing of ours.

use std::path::{Path, PathBuf};

/// Core modules (files or directories under src/) and what they must not import.
const CORE: &[&str] = &[
    "hub", "broker", "outbox", "events", "node", "auth", "config", "metrics", "tls", "trace",
];
const EDGES: &[&str] = &["ws", "grpc", "admin", "run", "pb"];

fn files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        out.extend(files(&entry.unwrap().path()));
    }
    out
}

fn sources(module: &str) -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = src.join(module);
    let file = src.join(format!("{module}.rs"));
    let path = if dir.is_dir() { dir } else { file };
    files(&path)
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

/// The paths of ours a file names (`crate::x` and `sidecast::x`), comments excluded.
fn imports(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for prefix in ["crate::", "sidecast::"] {
            let mut rest = code;
            while let Some(at) = rest.find(prefix) {
                rest = &rest[at + prefix.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn the_core_imports_no_edge_and_no_protobuf() {
    let mut wrong = Vec::new();
    for module in CORE {
        for (path, text) in sources(module) {
            for name in imports(&text) {
                if EDGES.contains(&name.as_str()) {
                    wrong.push(format!("{} imports crate::{name}", path.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_wire_imports_nothing_of_ours() {
    let mut wrong = Vec::new();
    for (path, text) in sources("wire") {
        let ours = imports(&text);
        if let Some(name) = ours.first() {
            wrong.push(format!("{} imports crate::{name}", path.display()));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_checker_sees_imports() {
    assert_eq!(imports("use crate::pb::x; // crate::ws"), vec!["pb"]);
    assert_eq!(imports("let a = crate::ws::unix_now();"), vec!["ws"]);
}

/// The configuration and the metrics are used by every core module: they import only the
/// wire, so that no cycle runs through them.
#[test]
fn configuration_and_metrics_import_only_the_wire() {
    let mut wrong = Vec::new();
    for module in ["config", "metrics"] {
        for (path, text) in sources(module) {
            for name in imports(&text) {
                if name != "wire" && name != module {
                    wrong.push(format!("{} imports crate::{name}", path.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
