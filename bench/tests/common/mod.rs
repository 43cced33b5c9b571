//! Shared by the bench integration tests: run the `refd-bench` binary with
//! `--json` and parse its one object.

use std::path::Path;
use std::process::Command;

/// Runs `refd-bench ARGS --json --device DEV` and returns its JSON object
/// and whether it exited successfully; panics (with stdout and stderr) if
/// the output is not one JSON object.
pub fn run_json(args: &[&str], dev: &Path) -> (serde_json::Value, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_refd-bench"))
        .args(args)
        .args(["--json", "--device"])
        .arg(dev)
        .output()
        .unwrap_or_else(|e| panic!("run refd-bench {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "refd-bench {args:?}: bad JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}
