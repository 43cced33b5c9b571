//! `docs/design.md` ("Crates") against the workspace: the table names
//! every member crate, in the folder its `Cargo.toml` is in, with its
//! direct dependencies among the refd crates.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `name = "..."` of a Cargo.toml's `[package]`.
fn package_name(toml: &str) -> String {
    toml.lines()
        .find_map(|l| l.strip_prefix("name = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("package name")
        .to_string()
}

/// The refd crates of a Cargo.toml's `[dependencies]` (not dev or build).
fn refd_dependencies(toml: &str) -> BTreeSet<String> {
    toml.lines()
        .skip_while(|l| l.trim() != "[dependencies]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split(['.', ' ', '=']).next())
        .filter(|name| *name == "refd" || name.starts_with("refd-"))
        .map(str::to_string)
        .collect()
}

/// The workspace members' folders, from the root Cargo.toml.
fn members() -> BTreeSet<String> {
    read(&root().join("Cargo.toml"))
        .lines()
        .skip_while(|l| !l.starts_with("members"))
        .skip(1)
        .take_while(|l| !l.starts_with(']'))
        .map(|l| l.trim().trim_end_matches(',').trim_matches('"').to_string())
        .collect()
}

#[test]
fn design_crate_table_is_the_workspace() {
    let design = read(&root().join("docs/design.md"));
    let rows: Vec<Vec<String>> = design
        .lines()
        .skip_while(|l| *l != "## Crates")
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect();
    let crates: BTreeSet<String> = rows.iter().map(|r| r[1].clone()).collect();
    let folders: BTreeSet<String> = rows
        .iter()
        .map(|r| r[2].trim_end_matches('/').to_string())
        .collect();
    assert_eq!(folders, members(), "design.md folders against the members");
    for row in &rows {
        let (name, folder, deps) = (&row[1], &row[2], &row[4]);
        let toml = read(&root().join(folder).join("Cargo.toml"));
        assert_eq!(&package_name(&toml), name, "{folder}");
        // "none", or a list, after a remark ending in `:` if any.
        let list = deps.rsplit(':').next().unwrap().trim();
        let documented: BTreeSet<String> = match list {
            "none" => BTreeSet::new(),
            list => list
                .split(',')
                .map(|d| match d.trim() {
                    "refd" => "refd".to_string(),
                    d => format!("refd-{d}"),
                })
                .collect(),
        };
        assert!(documented.is_subset(&crates), "{name}: {deps}");
        assert_eq!(
            refd_dependencies(&toml),
            documented,
            "{name}'s dependencies"
        );
    }
}
