//! Records the git commit the binary is built from (REFD_BUILD_COMMIT,
//! shown in `load --report`'s Build table); "unknown" outside a git
//! checkout.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=REFD_BUILD_COMMIT={commit}");
}
