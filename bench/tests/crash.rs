//! The real crash test in the default test run: a few SIGKILL rounds of a
//! durable ingest process on an O_DIRECT file; every acknowledged op must
//! survive recovery exactly once and the device must verify.

use std::process::Command;

#[test]
fn sigkill_rounds_lose_and_duplicate_nothing() {
    let dev = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("crash-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&dev);
    let out = Command::new(env!("CARGO_BIN_EXE_refd-bench"))
        .args([
            "crash",
            "--rounds",
            "4",
            "--kill-after-ms-max",
            "300",
            "--json",
            "--device",
        ])
        .arg(&dev)
        .output()
        .expect("run refd-bench crash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{v}");
    assert_eq!(v["rounds"], 4);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicated"], 0, "{v}");
    assert_eq!(v["verify_clean"], true, "{v}");
    assert!(v["acked"].as_u64().unwrap() > 0, "{v}");
    std::fs::remove_file(&dev).unwrap();
}
