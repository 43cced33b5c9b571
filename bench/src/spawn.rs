//! A refd daemon started by a benchmark (`load`, `daemon-crash`): the
//! `refd` binary beside this one, else this binary's own copy of
//! `refd serve` (the hidden `refd-serve` subcommand, the same library
//! code), on a given device or a file made for the run, listening on a
//! unix socket in a directory of its own.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How to start the daemon.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The refd binary (default: beside this one, else this one's own copy).
    pub refd: Option<PathBuf>,
    /// The device (default: a new file, removed after).
    pub device: Option<PathBuf>,
    /// Size of a device file created (GiB).
    pub device_gib: u64,
    /// `--impl`.
    pub store: String,
    /// `--prefault-mib`.
    pub prefault_mib: usize,
    /// More arguments.
    pub args: Vec<String>,
    /// Do not print the daemon's ready line.
    pub quiet: bool,
}

/// Where and how a daemon runs (the same for each restart).
struct Launch {
    spec: DaemonSpec,
    refd: PathBuf,
    /// `refd` is this binary (`refd-serve`).
    own: bool,
    device: PathBuf,
    socket: PathBuf,
    /// A device file made for the run (removed at the end).
    temp_device: Option<PathBuf>,
}

/// A daemon started from a [`DaemonSpec`].
pub struct Spawned {
    launch: Launch,
    child: Child,
    /// Largest resident size seen (sampled every 100 ms).
    pub rss_max: Arc<AtomicU64>,
}

impl Spawned {
    /// Starts the daemon and waits for its ready line.
    pub fn start(spec: &DaemonSpec) -> Result<Spawned, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let (refd, own) = match &spec.refd {
            Some(p) => (p.clone(), false),
            None if me.with_file_name("refd").exists() => (me.with_file_name("refd"), false),
            None => (me, true),
        };
        if !refd.exists() {
            return Err(format!("{} not found (--refd)", refd.display()));
        }
        let base = if PathBuf::from("/var/tmp").exists() {
            PathBuf::from("/var/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("refd-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (device, temp_device) = match &spec.device {
            Some(d) => (d.clone(), None),
            None => {
                let d = dir.join("refd.img");
                (d.clone(), Some(d))
            }
        };
        let launch = Launch {
            spec: spec.clone(),
            refd,
            own,
            device,
            socket: dir.join("refd.sock"),
            temp_device,
        };
        let rss_max = Arc::new(AtomicU64::new(0));
        let child = launch.spawn(&rss_max)?;
        Ok(Spawned {
            launch,
            child,
            rss_max,
        })
    }

    /// The unix socket it listens on.
    pub fn socket(&self) -> &std::path::Path {
        &self.launch.socket
    }

    /// The device it serves.
    pub fn device(&self) -> &std::path::Path {
        &self.launch.device
    }

    /// SIGKILL, wait for the process to end, start it again on the same
    /// device and socket (it recovers from the log).
    pub fn kill9_and_restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let status = self.child.wait().map_err(|e| format!("wait refd: {e}"))?;
        if let Some(code) = status.code() {
            return Err(format!("refd exited by itself with status {code}"));
        }
        self.child = self.launch.spawn(&self.rss_max)?;
        Ok(())
    }

    /// SIGTERM and the exit status (`None`: killed by a signal). The
    /// device stays, for an offline check.
    pub fn terminate(&mut self) -> Option<i32> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.code();
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// SIGTERM (if still running) and the exit status; the device file
    /// made for the run is removed (as on drop).
    pub fn stop(mut self) -> Option<i32> {
        self.terminate()
    }
}

impl Drop for Spawned {
    /// A daemon still running is stopped (SIGTERM, waited for) and what
    /// was made for the run is removed, also when the benchmark fails.
    fn drop(&mut self) {
        let _ = self.terminate();
        if let Some(d) = &self.launch.temp_device {
            let _ = std::fs::remove_file(d);
        }
        if let Some(dir) = self.launch.socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Launch {
    fn spawn(&self, rss_max: &Arc<AtomicU64>) -> Result<Child, String> {
        let mut cmd = Command::new(&self.refd);
        cmd.arg(if self.own { "refd-serve" } else { "serve" })
            .arg("--device")
            .arg(&self.device)
            .arg("--device-size")
            .arg(format!("{}G", self.spec.device_gib))
            .arg("--listen")
            .arg(format!("unix:{}", self.socket.display()))
            .args(["--metrics", "off", "--impl", &self.spec.store])
            .arg("--prefault-mib")
            .arg(self.spec.prefault_mib.to_string())
            .args(&self.spec.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The daemon stops (SIGTERM) if this process dies first.
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only
        // sets a flag of the child between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.refd.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("refd ready") => {
                if !self.spec.quiet {
                    eprintln!("{line}");
                }
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("refd did not become ready: {other:?}"));
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let (pid, rss) = (child.id(), Arc::clone(rss_max));
        std::thread::spawn(move || loop {
            let Some(r) = refd::metrics::resident_bytes(Some(pid)) else {
                return;
            };
            rss.fetch_max(r, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        });
        Ok(child)
    }
}
