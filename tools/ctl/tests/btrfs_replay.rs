//! Every kernel capture in ../shared/traces and tools/btrfs/captures replays through `refctl btrfs
//! replay` to an exact match with both stores, with ref-verify, and with
//! several threads and frequent commits. Runs the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

fn captures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        panic!(
            "kernel captures not found at {}: the default test run needs ../shared/traces",
            dir.display()
        );
    };
    // The shared captures, then refd-btrfs's own (tools/btrfs/captures:
    // workloads the shared set does not run).
    let own =
        std::fs::read_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../btrfs/captures"))
            .into_iter()
            .flatten();
    let mut out: Vec<PathBuf> = entries
        .chain(own)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("trace.txt.zst").exists())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no captures in {}", dir.display());
    out
}

fn replay(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_refctl"))
        .args(["btrfs", "replay", "--json", "--before"])
        .arg(dir.join("before.txt.zst"))
        .arg("--trace")
        .arg(dir.join("trace.txt.zst"))
        .arg("--after")
        .arg(dir.join("after.txt.zst"))
        .args(extra)
        .output()
        .expect("run refctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{}: bad JSON ({e}): {stdout}\nstderr: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && v["exact"] == true && v["mismatches"] == 0,
        "{} {extra:?}: {v}",
        dir.display()
    );
    v
}

#[test]
fn every_capture_matches_the_kernel() {
    for dir in captures() {
        for extra in [
            &["--impl", "lockfree", "--verify"][..],
            &["--impl", "mutex", "--verify"][..],
            &[
                "--impl",
                "lockfree",
                "--threads",
                "4",
                "--commit-every",
                "3000",
            ][..],
            &["--impl", "mutex", "--threads", "1", "--commit-every", "0"][..],
        ] {
            let v = replay(&dir, extra);
            eprintln!(
                "{}: {extra:?}: {} ops, {:.0} ops/s",
                dir.display(),
                v["ops"],
                v["ops_per_sec"].as_f64().unwrap_or(0.0)
            );
        }
    }
}

#[test]
fn corrupt_input_is_a_clear_error() {
    let dir = captures().remove(0);
    let tmp = std::env::temp_dir().join(format!("refd-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // A truncated .zst trace.
    let trace = std::fs::read(dir.join("trace.txt.zst")).unwrap();
    std::fs::write(tmp.join("trace.txt.zst"), &trace[..trace.len() / 2]).unwrap();
    // A dump with a garbled line.
    let text = zstd_decode_file(&dir.join("before.txt.zst"));
    assert!(
        text.contains("refs 1 gen"),
        "the dump has the field we garble"
    );
    let text = text.replacen("refs 1 gen", "refs x gen", 1);
    std::fs::write(tmp.join("garbled.txt"), text).unwrap();
    for (before, trace, what) in [
        (
            dir.join("before.txt.zst"),
            tmp.join("trace.txt.zst"),
            "line",
        ),
        (tmp.join("garbled.txt"), dir.join("trace.txt.zst"), "line"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_refctl"))
            .args(["btrfs", "replay", "--before"])
            .arg(&before)
            .arg("--trace")
            .arg(&trace)
            .arg("--after")
            .arg(dir.join("after.txt.zst"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(what) && !err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn zstd_decode_file(path: &std::path::Path) -> String {
    use std::io::Read;
    let mut s = String::new();
    refd_btrfs::open::open(path)
        .expect("open dump")
        .read_to_string(&mut s)
        .expect("decode dump");
    s
}
