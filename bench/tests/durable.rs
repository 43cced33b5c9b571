//! `refd-bench durable` runs end to end on an O_DIRECT file and reports
//! every field the issue asks for (a small run: figures are measured by the
//! benchmark itself, never asserted here).

mod common;

use refd_ioring::test_support::Scratch;

#[test]
fn durable_bench_reports() {
    // Removed with the device file on drop, also when the test fails.
    let Some(scratch) = Scratch::new("durable-bench") else {
        return;
    };
    let dev = scratch.path().join("durable.img");
    let (v, ok) = common::run_json(
        &[
            "durable",
            "--extents",
            "2000",
            "--ops",
            "20000",
            "--commit-interval-ms",
            "50",
            "--prefault-mib",
            "8",
        ],
        &dev,
    );
    assert!(ok, "{v}");
    assert_eq!(v["ops"], 20000, "every op acknowledged: {v}");
    assert_eq!(v["prefault_mib"], 8, "{v}");
    for k in [
        "durable_ops_per_sec",
        "p50_ack_ms",
        "p99_ack_ms",
        "commits_per_sec",
        "log_bytes_per_op",
        "tree_bytes_per_op",
        "device_durable_mb_per_sec",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x >= 0.0), "{k}: {v}");
    }
    // A timed run with generated walks and a small pending-op trigger: the
    // policy commits by count, every op is acknowledged.
    let (v, ok) = common::run_json(
        &[
            "durable",
            "--extents",
            "2000",
            "--duration-s",
            "1.5",
            "--pending-ops-trigger",
            "4096",
            "--probe-ops",
            "10000",
            "--recovery-ops",
            "10000",
            "--prefault-mib",
            "0",
        ],
        &dev,
    );
    assert!(ok, "{v}");
    assert!(v["ops"].as_u64().is_some_and(|n| n > 0), "{v}");
    let by_pending = &v["commits_by_interval_pending_log"][1];
    assert!(by_pending.as_u64().is_some_and(|n| n > 0), "{v}");
    let seconds = &v["acked_by_second"];
    assert!(seconds.as_array().is_some_and(|a| !a.is_empty()), "{v}");
    assert_eq!(v["probe_commit_ops"], 10000, "{v}");
    assert_eq!(v["recovery_ops"], 10000, "{v}");
    // A paced run offers at most --rate ops per second (an upper bound
    // only: how many it reaches depends on the machine).
    let (v, ok) = common::run_json(
        &[
            "durable",
            "--extents",
            "2000",
            "--duration-s",
            "1",
            "--rate",
            "5000",
            "--prefault-mib",
            "0",
        ],
        &dev,
    );
    assert!(ok, "{v}");
    let ops = v["ops"].as_u64().expect("ops");
    // 5000 ops in the second; each of the 2 threads checks its pace (and
    // the deadline) every 256 ops, so each may run up to two steps over.
    assert!(
        ops > 0 && ops <= 5000 + 2 * 2 * 256,
        "{ops} ops at --rate 5000: {v}"
    );
}
