//! Every real kernel capture in `../shared/traces` and `captures/`: parse the three files,
//! check the event counts against `meta.json`, replay the trace onto
//! `before.txt` with the reference applier and compare with `after.txt`
//! (0 mismatches), and check that exporting `after.txt` reproduces its
//! extent items line for line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use refd_btrfs::compare::compare;
use refd_btrfs::dump::{load_dump, DumpOptions};
use refd_btrfs::export::write_dump_items;
use refd_btrfs::open;
use refd_btrfs::oracle::replay_reference;
use refd_btrfs::trace::{EventType, KernelAction, TraceOptions, TraceReader};
use serde_json::Value;
use std::io::Read;

fn traces_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces")
}

fn captures() -> Option<Vec<PathBuf>> {
    let dir = traces_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("SKIP: no capture directory at {}", dir.display());
        return None;
    };
    // The shared captures, then this crate's own (`captures/`: workloads
    // the shared set does not run, see captures/README.md).
    let own = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("captures"))
        .into_iter()
        .flatten();
    let mut out: Vec<PathBuf> = entries
        .chain(own)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("meta.json").is_file())
        .collect();
    out.sort();
    Some(out)
}

fn meta_u64(meta: &Value, path: &[&str]) -> u64 {
    let mut v = meta;
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("meta.json has no integer at {path:?}"))
}

/// Extent items of a dump, one normalized string per line: item numbers
/// and itemoff removed, other items (block groups) and headers dropped.
fn extent_lines(text: &str) -> Vec<String> {
    const KINDS: [&str; 6] = [
        " EXTENT_ITEM ",
        " METADATA_ITEM ",
        " TREE_BLOCK_REF ",
        " SHARED_BLOCK_REF ",
        " EXTENT_DATA_REF ",
        " SHARED_DATA_REF ",
    ];
    let mut out = Vec::new();
    let mut keep = false;
    for line in text.lines() {
        if line.starts_with("\titem ") {
            keep = KINDS.iter().any(|k| line.contains(k));
            if keep {
                let key = &line[line.find("key (").expect("key")..];
                let (key, rest) = key.split_once(" itemoff ").expect("itemoff");
                let size = rest.split_once(' ').expect("itemsize").1;
                out.push(format!("{key} {size}"));
            }
        } else if line.starts_with("\t\t") {
            if keep {
                out.push(line.to_string());
            }
        } else {
            keep = false;
        }
    }
    out
}

fn read_text(path: &Path) -> String {
    let mut s = String::new();
    open::open(path)
        .expect("open")
        .read_to_string(&mut s)
        .expect("read");
    s
}

/// Check one capture; returns a description of every failure.
fn check_capture(dir: &Path) -> Vec<String> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut failures = Vec::new();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).expect("meta.json"))
            .expect("meta.json is JSON");
    // The nodesize of meta.json, which every leaf of the dumps must show.
    let opts = DumpOptions {
        nodesize: Some(meta_u64(&meta, &["nodesize"])),
    };

    let (mut tree, before_stats) = load_dump(dir.join("before.txt.zst"), &opts)
        .unwrap_or_else(|e| panic!("{name}: before.txt: {e}"));
    let (after, after_stats) = load_dump(dir.join("after.txt.zst"), &opts)
        .unwrap_or_else(|e| panic!("{name}: after.txt: {e}"));
    for (stats, which) in [
        (&before_stats, "extents_before"),
        (&after_stats, "extents_after"),
    ] {
        for (kind, field) in [
            ("EXTENT_ITEM", "extent_items"),
            ("METADATA_ITEM", "metadata_items"),
        ] {
            let got = stats.items_by_type.get(kind).copied().unwrap_or(0);
            let want = meta_u64(&meta, &[which, field]);
            if got != want {
                failures.push(format!(
                    "{name}: {which}.{field}: meta {want}, parsed {got}"
                ));
            }
        }
        if stats.unrecognized.count != 0 || stats.hash_mismatches.count != 0 {
            failures.push(format!(
                "{name}: {which}: unrecognized {:?} hash mismatches {:?}",
                stats.unrecognized, stats.hash_mismatches
            ));
        }
    }

    // Replay, timing the trace parse + apply.
    let start = Instant::now();
    let mut reader = TraceReader::open(dir.join("trace.txt.zst"), TraceOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let applied = match replay_reference(&mut tree, &mut reader) {
        Ok(n) => n,
        Err(e) => {
            failures.push(format!("{name}: replay: {e}"));
            return failures;
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let stats = reader.into_stats();
    eprintln!(
        "{name}: {} lines, {:.1} MB, {} ops ({} seq!=0), holdback max {}, parse+replay {:.2}s ({:.0} MB/s); before {} extents, after {}",
        stats.lines,
        stats.bytes as f64 / 1e6,
        applied,
        stats.seq_nonzero_ops,
        stats.holdback_max,
        secs,
        stats.bytes as f64 / 1e6 / secs,
        before_stats.extents,
        after_stats.extents,
    );

    for event in EventType::ALL {
        let want = meta_u64(&meta, &["events_by_type", event.name()]);
        if stats.events_of(event) != want {
            failures.push(format!(
                "{name}: {}: meta {want}, parsed {}",
                event.name(),
                stats.events_of(event)
            ));
        }
    }
    for action in KernelAction::ALL {
        let key = format!("add_delayed_ref_head/{}", action.name());
        let want = meta["events_by_type_and_action"][&key]
            .as_u64()
            .unwrap_or(0);
        if stats.head_action(action) != want {
            failures.push(format!(
                "{name}: {key}: meta {want}, parsed {}",
                stats.head_action(action)
            ));
        }
    }
    let want = meta_u64(&meta, &["add_ref_events"]);
    if stats.add_ref_events() != want {
        failures.push(format!(
            "{name}: add_ref_events: meta {want}, parsed {}",
            stats.add_ref_events()
        ));
    }
    let want_ops = meta_u64(&meta, &["events_by_type", "add_delayed_ref_head"]);
    if applied != want_ops || stats.ops != want_ops {
        failures.push(format!(
            "{name}: ops applied {applied}, emitted {}, heads {want_ops}",
            stats.ops
        ));
    }
    let want = meta_u64(&meta, &["seq_nonzero_events"]);
    if stats.seq_nonzero_ops != want {
        // meta counts every event with seq != 0 (run events included).
        eprintln!(
            "{name}: note: ops with seq != 0: {}, meta seq_nonzero_events {want}",
            stats.seq_nonzero_ops
        );
    }
    if stats.unknown_events.count + stats.unparsed_lines.count + stats.skipped() != 0 {
        failures.push(format!("{name}: unexpected lines: {stats:?}"));
    }

    let mismatches = compare(&after, &tree);
    if !mismatches.is_empty() {
        failures.push(format!(
            "{name}: {} mismatches after replay, first: {}",
            mismatches.len(),
            mismatches
                .iter()
                .take(20)
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }

    // Export of after.txt reproduces its extent items.
    let mut exported = Vec::new();
    write_dump_items(&after, after_stats.nodesize, &mut exported).expect("export");
    let original = extent_lines(&read_text(&dir.join("after.txt.zst")));
    let ours = extent_lines(&String::from_utf8(exported).expect("utf-8"));
    if original != ours {
        let first = original
            .iter()
            .zip(&ours)
            .position(|(a, b)| a != b)
            .unwrap_or(original.len().min(ours.len()));
        failures.push(format!(
            "{name}: export differs from after.txt at extent line {first}: {:?} vs {:?} ({} vs {} lines)",
            original.get(first),
            ours.get(first),
            original.len(),
            ours.len()
        ));
    }
    failures
}

#[test]
fn every_capture_replays_to_its_after_dump() {
    let Some(dirs) = captures() else {
        return;
    };
    assert!(!dirs.is_empty(), "no capture in {}", traces_dir().display());
    let failures: Vec<String> = dirs.iter().flat_map(|d| check_capture(d)).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
