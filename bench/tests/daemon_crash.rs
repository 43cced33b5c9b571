//! The daemon crash test in the default test run: a few kill -9 rounds of
//! a refd daemon under pipelined load from several refd-client clients,
//! on a direct-io loop device (as root) and on an O_DIRECT file; every
//! acknowledged op must be present exactly once, the freed lists complete
//! and right, the daemon must exit 0 on SIGTERM and the device verify.
//! `refd-bench daemon-crash --rounds N` runs many more.

mod common;

use std::path::Path;

use refd_ioring::test_support::{LoopDevice, Scratch};

#[test]
fn daemon_kill9_rounds_on_a_file() {
    let Some(scratch) = Scratch::new("daemon-crash-file") else {
        return;
    };
    kill9_rounds(&scratch.path().join("refd.img"));
}

#[test]
fn daemon_kill9_rounds_on_a_loop_device() {
    let Some(scratch) = Scratch::new("daemon-crash-loop") else {
        return;
    };
    let Some(dev) = LoopDevice::attach(&scratch, "backing", 512 << 20) else {
        return;
    };
    kill9_rounds(dev.path());
}

fn kill9_rounds(dev: &Path) {
    let (v, ok) = common::run_json(
        &[
            "daemon-crash",
            "--rounds",
            "3",
            "--kill-after-ms-max",
            "800",
            "--device-gib",
            "1",
        ],
        dev,
    );
    assert!(ok, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["rounds"], 3, "{v}");
    for zero in [
        "lost",
        "duplicated",
        "unexpected",
        "dropped_present",
        "freed_missing",
        "freed_twice",
        "freed_wrong",
        "live_wrong",
    ] {
        assert_eq!(v[zero], 0, "{zero}: {v}");
    }
    assert_eq!(v["daemon_exit"], 0, "{v}");
    assert_eq!(v["verify_clean"], true, "{v}");
    assert!(v["batches_acked"].as_u64().unwrap() > 0, "{v}");
    assert!(v["freed_expected"].as_u64().unwrap() > 0, "{v}");
}
