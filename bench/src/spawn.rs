//! A refd daemon started by a benchmark (`load`, `daemon-crash`): the
//! `refd` binary beside this one, else this binary's own copy of
//! `refd serve` (the hidden `refd-serve` subcommand, the same library
//! code), on a given device or a file made for the run, listening on a
//! unix socket in a directory of its own, and on one more address if
//! asked (`load --spawn-listen tcp:127.0.0.1:0`: the port the kernel
//! picks is read from the ready line).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use refd_client::Address;

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
    /// One more listener (after the unix socket), where the benchmark
    /// connects ([`Spawned::address`]).
    pub listen: Option<Address>,
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
    /// Where clients connect: the unix socket, or the extra listener as
    /// the ready line says it (its port, for a TCP port 0).
    address: Address,
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
        let (child, address) = launch.spawn(&rss_max)?;
        Ok(Spawned {
            launch,
            child,
            address,
            rss_max,
        })
    }

    /// Where clients connect: [`DaemonSpec::listen`] as bound, else the
    /// unix socket.
    pub fn address(&self) -> &Address {
        &self.address
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
        (self.child, self.address) = self.launch.spawn(&self.rss_max)?;
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
    /// Starts the daemon; returns it and where clients connect.
    fn spawn(&self, rss_max: &Arc<AtomicU64>) -> Result<(Child, Address), String> {
        let mut cmd = Command::new(&self.refd);
        cmd.arg(if self.own { "refd-serve" } else { "serve" })
            .arg("--device")
            .arg(&self.device)
            .arg("--device-size")
            .arg(format!("{}G", self.spec.device_gib))
            .arg("--listen")
            .arg(format!("unix:{}", self.socket.display()))
            .args(self.spec.listen.iter().map(|l| format!("--listen={l}")))
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
        let ready = match lines.next() {
            Some(Ok(line)) if line.starts_with("refd ready") => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("refd did not become ready: {other:?}"));
            }
        };
        if !self.spec.quiet {
            eprintln!("{ready}");
        }
        let address = match &self.spec.listen {
            None => Address::Unix(self.socket.clone()),
            // The second listener: the daemon lists them in the order given.
            Some(_) => match ready_listeners(&ready).get(1) {
                Some(a) => a.clone(),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("no second listener in the ready line: {ready}"));
                }
            },
        };
        std::thread::spawn(move || for _ in lines {});
        let (pid, rss) = (child.id(), Arc::clone(rss_max));
        std::thread::spawn(move || loop {
            let Some(r) = refd::metrics::resident_bytes(Some(pid)) else {
                return;
            };
            rss.fetch_max(r, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        });
        Ok((child, address))
    }
}

/// The listeners of a ready line (`...; listening on A, B[; metrics on
/// ...]`), in the order they were given, with TCP port 0 replaced by the
/// port bound; what does not parse is left out.
fn ready_listeners(ready: &str) -> Vec<Address> {
    let Some((_, rest)) = ready.split_once("; listening on ") else {
        return Vec::new();
    };
    let list = rest.split_once("; ").map_or(rest, |(l, _)| l);
    list.split(", ")
        .filter_map(|a| Address::parse(a.trim()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_listeners_in_order() {
        let line = "refd ready: device /x.img (opened, fs_id 00, store lockfree), recovered \
                    generation 3 with 0 ops replayed, 0 held heads, now generation 3; \
                    listening on unix:/d/refd.sock, tcp:127.0.0.1:40123, tcp:[::1]:5; \
                    metrics on http://127.0.0.1:9/metrics";
        assert_eq!(
            ready_listeners(line),
            vec![
                Address::Unix("/d/refd.sock".into()),
                Address::Tcp {
                    host: "127.0.0.1".into(),
                    port: 40123
                },
                Address::Tcp {
                    host: "::1".into(),
                    port: 5
                },
            ]
        );
        let no_metrics = "refd ready: ...; listening on unix:/d/s, tcp:127.0.0.1:7";
        assert_eq!(ready_listeners(no_metrics).len(), 2);
        assert!(ready_listeners("refd ready: nothing").is_empty());
    }
}
