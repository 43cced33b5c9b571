//! Test scaffolding for this crate's tests and, with the `test-support`
//! feature (enabled by the other crates' dev-dependencies), for theirs:
//! scratch directories that support `O_DIRECT`, and loop devices that are
//! always detached (`losetup -d` on drop, also when the test panics).
//!
//! Tests that need something the machine may not offer (root, `losetup`, a
//! file system with `O_DIRECT`) print why they are skipped and fall back
//! or return; they never fail because of the environment.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(test)]
use rand::RngCore as _;
#[cfg(test)]
use rand_chacha::ChaCha8Rng;

static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A scratch directory removed on drop, on a file system that supports
/// `O_DIRECT` (tmpfs may not, so `/tmp` is not used).
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
}

fn candidate_bases() -> Vec<PathBuf> {
    let mut bases = Vec::new();
    if let Some(dir) = std::env::var_os("REFD_TEST_DIR") {
        bases.push(PathBuf::from(dir));
    }
    bases.push(PathBuf::from("/var/tmp"));
    bases.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ioring-test"));
    bases
}

fn supports_direct_io(dir: &Path) -> bool {
    let probe = dir.join(".odirect-probe");
    let result = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    result.is_ok()
}

impl Scratch {
    /// Creates a fresh directory, or prints a skip reason and returns `None`
    /// if no candidate base supports `O_DIRECT`.
    pub fn new(label: &str) -> Option<Self> {
        let n = SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("refd-ioring-{label}-{}-{n}", std::process::id());
        let mut reasons = Vec::new();
        for base in candidate_bases() {
            let dir = base.join(&name);
            if let Err(e) = std::fs::create_dir_all(&dir) {
                reasons.push(format!("{}: {e}", dir.display()));
                continue;
            }
            if supports_direct_io(&dir) {
                return Some(Self { dir });
            }
            reasons.push(format!("{}: O_DIRECT unsupported", dir.display()));
            let _ = std::fs::remove_dir_all(&dir);
        }
        eprintln!("SKIP {label}: no scratch directory supports O_DIRECT ({reasons:?})");
        None
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loop device over a file in a [`Scratch`] directory, created with
/// `losetup -f --show --direct-io=on` and detached with `losetup -d` on drop,
/// also when the test panics.
#[derive(Debug)]
pub struct LoopDevice {
    dev: PathBuf,
    backing: PathBuf,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl LoopDevice {
    /// Attaches a loop device over a new `size_bytes` file, or prints a skip
    /// reason and returns `None` (not root, no `losetup`, no free device).
    pub fn attach(scratch: &Scratch, file_name: &str, size_bytes: u64) -> Option<Self> {
        if !is_root() {
            eprintln!("SKIP loop device: not running as root");
            return None;
        }
        let backing = scratch.path().join(file_name);
        let file = match std::fs::File::create(&backing) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("SKIP loop device: cannot create {}: {e}", backing.display());
                return None;
            }
        };
        if let Err(e) = file.set_len(size_bytes) {
            eprintln!("SKIP loop device: cannot size {}: {e}", backing.display());
            return None;
        }
        drop(file);
        let mut last_error = String::new();
        // Other processes may race for the same free device; retry a little.
        for _ in 0..5 {
            let output = Command::new("losetup")
                .args(["-f", "--show", "--direct-io=on"])
                .arg(&backing)
                .output();
            match output {
                Ok(out) if out.status.success() => {
                    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if dev.is_empty() {
                        last_error = "losetup printed no device".to_string();
                        continue;
                    }
                    return Some(Self {
                        dev: PathBuf::from(dev),
                        backing,
                    });
                }
                Ok(out) => {
                    last_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
                }
                Err(e) => {
                    eprintln!("SKIP loop device: cannot run losetup: {e}");
                    return None;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("SKIP loop device: losetup failed: {last_error}");
        None
    }

    /// The block device (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.dev
    }

    /// Truncates the backing file to `size_bytes` and tells the loop driver
    /// (`losetup -c`), so the block device shrinks or grows underneath any
    /// open user. Returns false (with a printed reason) if that failed.
    pub fn resize(&self, size_bytes: u64) -> bool {
        let resized = OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .and_then(|f| f.set_len(size_bytes));
        if let Err(e) = resized {
            eprintln!("cannot resize {}: {e}", self.backing.display());
            return false;
        }
        match Command::new("losetup").arg("-c").arg(&self.dev).output() {
            Ok(out) if out.status.success() => true,
            Ok(out) => {
                eprintln!(
                    "losetup -c {} failed: {}",
                    self.dev.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                false
            }
            Err(e) => {
                eprintln!("cannot run losetup -c: {e}");
                false
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.dev).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "WARNING: losetup -d {} failed: {}",
                self.dev.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("WARNING: cannot run losetup -d {}: {e}", self.dev.display()),
        }
    }
}

/// Deterministic pseudo-random bytes for test data.
#[cfg(test)]
pub(crate) fn random_bytes(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

/// The seeds a seeded test runs: the one in the environment variable
/// `seed_var` if set (to replay one case), else `0..n` with `n` from
/// `cases_var` (default `cases_default`).
///
/// # Panics
/// If `seed_var` is set to something that is not a number.
pub fn case_seeds(seed_var: &str, cases_var: &str, cases_default: u64) -> Vec<u64> {
    match std::env::var(seed_var) {
        Ok(s) => vec![s
            .parse()
            .unwrap_or_else(|_| panic!("{seed_var}={s} is not a number"))],
        Err(_) => {
            let n = std::env::var(cases_var)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(cases_default);
            (0..n).collect()
        }
    }
}
