//! `refd-bench ingest` and `refd-bench merge` run end to end and report
//! what their READMEs say (small runs: figures are measured by the
//! benchmarks themselves, never asserted here).

use std::process::Command;

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_refd-bench"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap_or_else(|e| panic!("run refd-bench {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "refd-bench {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("refd-bench {args:?}: bad JSON ({e}): {stdout}"))
}

/// The CPU each kind of thread got while ingest ran: the ingest threads
/// and the store's hand-off thread at least (200,000 ops are ~50
/// hand-offs), where the kernel keeps per-thread CPU times.
#[test]
fn ingest_reports_where_the_cpu_went() {
    let v = run_json(&[
        "ingest",
        "--impl",
        "lockfree",
        "--workload",
        "uniform",
        "--threads",
        "2",
        "--extents",
        "20000",
        "--ops",
        "200000",
        "--rounds",
        "1",
        "--prefault-mib",
        "0",
    ]);
    let r = &v["results"][0];
    assert_eq!(
        r["committed_heads"].as_u64().map(|h| h > 0),
        Some(true),
        "{v}"
    );
    let cpu = r["cpu_ms"]
        .as_object()
        .unwrap_or_else(|| panic!("cpu_ms: {v}"));
    if !std::path::Path::new("/proc/thread-self/schedstat").exists() {
        eprintln!("no /proc/thread-self/schedstat here: cpu_ms not checked");
        return;
    }
    for name in ["ingest", "refd-handoff"] {
        let ms = cpu.get(name).and_then(serde_json::Value::as_f64);
        assert!(ms.is_some_and(|ms| ms > 0.0), "{name}: {cpu:?}");
    }
}

/// `merge` times its four shapes both ways, the head counts as the
/// synthetic runs make them.
#[test]
fn merge_reports_each_shape_both_ways() {
    let v = run_json(&[
        "merge",
        "--extents",
        "1000",
        "--rounds",
        "2",
        "--prefault-mib",
        "0",
    ]);
    let shapes = v["shapes"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(shapes.len(), 4, "{v}");
    let heads: Vec<u64> = shapes
        .iter()
        .map(|s| s["heads_per_pass"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(heads, [64 * 4096, 8 * 1000, 1000, 1000], "{v}");
    for s in shapes {
        for k in ["prefetch_ns", "plain_ns"] {
            assert_eq!(s[k].as_array().map(Vec::len), Some(2), "{k}: {s}");
        }
        assert!(s["speedup"].as_f64().is_some_and(|x| x > 0.0), "{s}");
    }
}
