//! The real crash test in the default test run: a few SIGKILL rounds of a
//! durable ingest process on a direct-io loop device (as root) and on an
//! O_DIRECT file; every acknowledged op must survive recovery exactly once
//! and the device must verify.

mod common;

use std::path::Path;

use refd_ioring::test_support::{LoopDevice, Scratch};

#[test]
fn sigkill_rounds_on_a_file() {
    // Removed with the device file on drop, also when the test fails.
    let Some(scratch) = Scratch::new("crash-file") else {
        return;
    };
    sigkill_rounds(&scratch.path().join("crash.img"));
}

/// On a loop device (block device, O_EXCL: each killed child's exclusive
/// open must be released by the kernel before the next one); skipped
/// without root or `losetup`, detached on drop.
#[test]
fn sigkill_rounds_on_a_loop_device() {
    let Some(scratch) = Scratch::new("crash-loop") else {
        return;
    };
    let Some(dev) = LoopDevice::attach(&scratch, "backing", 512 << 20) else {
        return;
    };
    sigkill_rounds(dev.path());
}

fn sigkill_rounds(dev: &Path) {
    let (v, ok) = common::run_json(
        &["crash", "--rounds", "4", "--kill-after-ms-max", "300"],
        dev,
    );
    assert!(ok, "{v}");
    assert_eq!(v["rounds"], 4);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicated"], 0, "{v}");
    assert_eq!(v["verify_clean"], true, "{v}");
    assert!(v["acked"].as_u64().unwrap() > 0, "{v}");
}
