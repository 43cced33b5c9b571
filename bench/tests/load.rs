//! `refd-bench load` against a real daemon: the open loop's
//! coordinated-omission correction (a daemon stopped with SIGSTOP for a
//! second must show in the latency), the `.hgrm` / `.hlog` outputs
//! read back and checked against the JSON summary, and every workload
//! over TCP loopback (port 0) with an auth token.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use refd_ioring::test_support::Scratch;

/// A `refd serve` (this package's own copy) on a file device, listening
/// on a unix socket; killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    /// Its ready line.
    ready: String,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// [`Daemon::start`] with more `refd serve` arguments.
    fn start_with(dir: &Path, args: &[&str]) -> Daemon {
        let socket = dir.join("refd.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_refd-bench"))
            .arg("refd-serve")
            .arg("--device")
            .arg(dir.join("refd.img"))
            .args(["--device-size", "1G", "--metrics", "off"])
            .args(["--prefault-mib", "0"])
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start refd-bench refd-serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = match lines.next() {
            Some(Ok(l)) if l.starts_with("refd ready") => l,
            other => panic!("{other:?}"),
        };
        std::thread::spawn(move || for _ in lines {});
        Daemon {
            child,
            socket,
            ready,
        }
    }

    /// Its TCP listener, `tcp:127.0.0.1:PORT`, from the ready line.
    fn tcp(&self) -> String {
        let at = self
            .ready
            .find("tcp:127.0.0.1:")
            .unwrap_or_else(|| panic!("no TCP listener: {}", self.ready));
        let end = self.ready[at..]
            .find(|c: char| c == ',' || c == ';' || c.is_whitespace())
            .map_or(self.ready.len(), |n| at + n);
        self.ready[at..end].to_string()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_refd-bench"))
        .arg("load")
        .args(args)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start refd-bench load")
}

/// The output of `child`, which must end within `limit` (else it is
/// killed and the test fails).
fn output_within(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for refd-bench load"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (its waiter
            // is still waiting).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("refd-bench load still running after {limit:?}");
        }
    }
}

/// Bound of the short runs below: a few seconds of load, a daemon start.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn json_of(child: Child) -> serde_json::Value {
    let out = output_within(child, RUN_LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "refd-bench load failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

/// The daemon at `connect` has logged a request of the load (its first
/// session or SUBMIT: the run has begun), at most 60 s after the spawn.
fn wait_for_the_load(connect: &str) {
    let client = refd_client::Client::connect(connect, refd_client::ClientConfig::default())
        .expect("connect to the daemon");
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    loop {
        let stats = client.stats().expect("STATS");
        let v: serde_json::Value = serde_json::from_str(&stats).expect("STATS JSON");
        if v["log"]["durable_lsn"].as_u64().is_some_and(|lsn| lsn > 0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the load sent nothing in {RUN_LIMIT:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Open loop at 200 SUBMITs/s for 5 s, one client that keeps at most one
/// request in flight; the daemon is stopped (SIGSTOP) for 1 s in the
/// middle. The ~200 requests due during the pause each wait until it ends,
/// so about a fifth of the run's latencies are 0..1 s: p99 ≥ 500 ms. An
/// uncorrected generator (latency from the send; the run's
/// `submit_uncorrected`) sends one request into the pause and the rest
/// after it, and reports a p99 of a few ms: this test fails on it.
#[test]
fn open_loop_latency_includes_a_stopped_daemon() {
    let Some(scratch) = Scratch::new("load-sigstop") else {
        return;
    };
    let daemon = Daemon::start(scratch.path());
    let connect = format!("unix:{}", daemon.socket.display());
    let run = load(&[
        "--connect",
        &connect,
        "--rate",
        "3200",
        "--batch",
        "16",
        "--clients",
        "1",
        "--in-flight-max",
        "1",
        "--extents",
        "10000",
        "--duration-s",
        "5",
        "--warmup-s",
        "0",
    ]);
    // The pause starts 1.5 s into the run, timed from its first request
    // (timed from the spawn, it could start before the run on a loaded
    // machine, where the load's start can take seconds).
    wait_for_the_load(&connect);
    std::thread::sleep(Duration::from_millis(1500));
    daemon.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1000));
    daemon.signal(libc::SIGCONT);
    let v = json_of(run);
    assert_eq!(v["loop"], "open", "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let submit = &v["kinds"]["submit"];
    assert!(submit["requests"].as_u64().unwrap() >= 800, "{v}");
    let p99 = submit["p99_ms"].as_f64().unwrap();
    assert!(
        p99 >= 500.0,
        "p99 {p99} ms does not show the 1 s pause: {v}"
    );
    assert!(submit["max_ms"].as_f64().unwrap() >= 900.0, "{v}");
    // The progress clock kept ticking while the daemon was stopped (its
    // STATS gave up instead of waiting for the daemon).
    let ticks: Vec<f64> = v["seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["t_s"].as_f64().unwrap())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] - w[0] < 1.8),
        "a progress second took longer: {ticks:?}"
    );
    // What the same run measured from the send: the test would fail on it.
    let uncorrected = v["submit_uncorrected"]["p99_ms"].as_f64().unwrap();
    assert!(
        uncorrected < 500.0,
        "from the send p99 is {uncorrected} ms: the test would not tell the two apart: {v}"
    );
}

/// Sums an interval log's histograms per tag, read with the
/// hdrhistogram crate's own log iterator and deserializer.
fn read_hlog(path: &Path) -> (std::collections::BTreeMap<String, Histogram<u64>>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let mut by_tag = std::collections::BTreeMap::new();
    let mut intervals = 0;
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(&bytes) {
        let LogEntry::Interval(i) = entry.unwrap_or_else(|e| panic!("hlog: {e:?}")) else {
            continue;
        };
        intervals += 1;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(i.encoded_histogram())
            .unwrap();
        let h: Histogram<u64> = de.deserialize(&mut &raw[..]).unwrap();
        let tag = i.tag().map(|t| t.as_str().to_string()).unwrap_or_default();
        by_tag
            .entry(tag)
            .or_insert_with(|| Histogram::<u64>::new_from(&h))
            .add(&h)
            .unwrap();
    }
    (by_tag, intervals)
}

/// The rows of an `.hgrm`: (value ms, percentile, total count).
fn read_hgrm(path: &Path) -> (Vec<(f64, f64, u64)>, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let rows = text
        .lines()
        .skip(2)
        .take_while(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    (rows, text)
}

/// A short closed-loop run with every request kind, an `.hlog` and the
/// `.hgrm`s: each read back agrees with the JSON summary.
#[test]
fn hgrm_and_hlog_agree_with_the_json_summary() {
    let Some(scratch) = Scratch::new("load-hlog") else {
        return;
    };
    let (hlog, hgrm) = (scratch.path().join("run.hlog"), scratch.path().join("hgrm"));
    let device = scratch.path().join("refd.img");
    let v = json_of(load(&[
        "--spawn",
        "--device",
        device.to_str().unwrap(),
        "--device-gib",
        "1",
        "--daemon-prefault-mib",
        "0",
        "--clients",
        "2",
        "--batch",
        "64",
        "--extents",
        "10000",
        "--mix",
        "submit=90,lookup=6,backrefs=3,commit=1",
        "--duration-s",
        "3",
        "--warmup-s",
        "0.5",
        "--hlog",
        hlog.to_str().unwrap(),
        "--hgrm",
        hgrm.to_str().unwrap(),
    ]));
    assert_eq!(v["loop"], "closed", "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["daemon_exit"], 0, "{v}");
    let (by_tag, intervals) = read_hlog(&hlog);
    assert!(intervals >= 3, "{intervals} intervals in a 3 s run");
    for kind in ["submit", "lookup", "backrefs", "commit"] {
        let s = &v["kinds"][kind];
        let requests = s["requests"].as_u64().unwrap();
        assert!(requests > 0, "{kind}: {v}");
        let h = &by_tag[kind];
        assert_eq!(h.len(), requests, "{kind}: hlog count");
        for (q, field) in [(0.5, "p50_ms"), (0.99, "p99_ms"), (0.999, "p999_ms")] {
            assert_eq!(
                h.value_at_quantile(q) as f64 / 1e6,
                s[field].as_f64().unwrap(),
                "{kind} {field}"
            );
        }
        assert_eq!(
            h.max() as f64 / 1e6,
            s["max_ms"].as_f64().unwrap(),
            "{kind}"
        );
        let (rows, text) = read_hgrm(&hgrm.join(format!("{kind}.hgrm")));
        let last = rows.last().unwrap();
        assert_eq!(last.1, 1.0, "{kind}: {text}");
        assert_eq!(last.2, requests, "{kind}: {text}");
        assert!(
            (last.0 - s["max_ms"].as_f64().unwrap()).abs() < 0.001,
            "{kind}: {text}"
        );
        // The JSON p99 lies between the rows either side of 0.99.
        let p99 = s["p99_ms"].as_f64().unwrap();
        let below = rows
            .iter()
            .filter(|r| r.1 < 0.99)
            .map(|r| r.0)
            .fold(0.0, f64::max);
        let above = rows.iter().find(|r| r.1 >= 0.99).unwrap().0;
        assert!(
            below <= p99 + 0.001 && p99 <= above + 0.001,
            "{kind} p99 {p99}: {text}"
        );
    }
}

fn captures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces")
}

fn trace_run(capture: &Path, device: &Path) -> (serde_json::Value, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_refd-bench"))
        .args(["load", "--workload", "btrfs-trace", "--json", "--trace"])
        .arg(capture)
        .arg("--device")
        .arg(device)
        .args([
            "--device-gib",
            "1",
            "--daemon-prefault-mib",
            "0",
            "--batch",
            "256",
        ])
        .output()
        .expect("run refd-bench load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{}: bad JSON ({e}): {stdout}\n{}",
            capture.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}

/// Every kernel capture replayed through a daemon over the wire (before
/// through SUBMIT, the trace with its seqs through barriers, a COMMIT)
/// ends with exactly the kernel's `after` extents, read back by BACKREFS.
#[test]
fn btrfs_traces_replay_exactly_over_the_wire() {
    let dir = captures_dir();
    // The shared captures, then refd-btrfs's own (tools/btrfs/captures).
    let own = std::fs::read_dir(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/btrfs/captures"),
    )
    .into_iter()
    .flatten();
    let mut captures: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("kernel captures at {}: {e}", dir.display()))
        .chain(own)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("trace.txt.zst").exists())
        .collect();
    captures.sort();
    assert!(!captures.is_empty(), "no captures in {}", dir.display());
    for capture in captures {
        let Some(scratch) = Scratch::new("load-trace") else {
            return;
        };
        let (v, ok) = trace_run(&capture, &scratch.path().join("refd.img"));
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(capture.join("meta.json")).unwrap()).unwrap();
        assert!(ok, "{}: {v}", capture.display());
        let after = &meta["extents_after"];
        let extents =
            after["extent_items"].as_u64().unwrap() + after["metadata_items"].as_u64().unwrap();
        assert_eq!(v["extents"], extents, "{}: {v}", capture.display());
        assert_eq!(v["errors"], 0, "{}: {v}", capture.display());
        assert_eq!(v["daemon_exit"], 0, "{}: {v}", capture.display());
        assert!(
            v["kinds"]["submit"]["requests"].as_u64().unwrap() > 0,
            "{v}"
        );
    }
}

/// The comparison can fail: a capture whose `after` is another capture's
/// reports mismatches and exits non-zero.
#[test]
fn btrfs_trace_against_a_wrong_after_reports_mismatches() {
    let Some(scratch) = Scratch::new("load-trace-wrong") else {
        return;
    };
    let dir = captures_dir();
    let capture = scratch.path().join("capture");
    std::fs::create_dir_all(&capture).unwrap();
    for (file, from) in [
        ("before.txt.zst", "qgroups-1"),
        ("trace.txt.zst", "qgroups-1"),
        ("after.txt.zst", "dedupe-1"),
    ] {
        std::os::unix::fs::symlink(dir.join(from).join(file), capture.join(file)).unwrap();
    }
    let (v, ok) = trace_run(&capture, &scratch.path().join("refd.img"));
    assert!(!ok, "{v}");
    assert!(v["mismatches"].as_u64().unwrap() > 0, "{v}");
}

/// A daemon with a token on unix and TCP loopback (port 0): a closed and
/// an open loop (SUBMIT, LOOKUP and a --lookups connection, so that
/// every kind of connection the load opens goes over TCP) with the
/// token; with a wrong one and without one the run fails at once with
/// AUTH_FAILED.
#[test]
fn load_over_tcp_with_a_token() {
    let Some(scratch) = Scratch::new("load-tcp") else {
        return;
    };
    let (token, wrong) = (scratch.path().join("token"), scratch.path().join("wrong"));
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::write(&wrong, "s3cre7\n").unwrap();
    let daemon = Daemon::start_with(
        scratch.path(),
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let tcp = daemon.tcp();
    let token = token.to_str().unwrap();
    let common = [
        "--connect",
        &tcp,
        "--token-file",
        token,
        "--batch",
        "64",
        "--clients",
        "2",
        "--extents",
        "10000",
        "--mix",
        "submit=90,lookup=10",
        "--lookups",
        "50",
        "--duration-s",
        "2",
        "--warmup-s",
        "0.2",
    ];
    for (how, loop_kind) in [
        (&["--closed"][..], "closed"),
        (&["--rate", "20000"][..], "open"),
    ] {
        let v = json_of(load(&[&common[..], how].concat()));
        assert_eq!(v["loop"], loop_kind, "{v}");
        assert_eq!(v["errors"], 0, "{v}");
        assert_eq!(v["address"], tcp.as_str(), "{v}");
        assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0, "{v}");
        for kind in ["submit", "lookup"] {
            assert!(
                v["kinds"][kind]["requests"].as_u64().unwrap() > 0,
                "{kind}: {v}"
            );
        }
        // The progress clock's STATS connection (over TCP too) answered.
        let seconds = v["seconds"].as_array().unwrap();
        assert!(seconds.iter().any(|s| s["commits"].is_u64()), "{v}");
    }
    for bad in [&["--token-file", wrong.to_str().unwrap()][..], &[][..]] {
        let started = std::time::Instant::now();
        let args = [&["--connect", &tcp, "--duration-s", "30"][..], bad].concat();
        let out = output_within(load(&args), Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "HELLO to {tcp}: AUTH_FAILED: wrong or missing token"
            )),
            "{bad:?}: {stderr}"
        );
        // At once, not after the 30 s of load.
        assert!(started.elapsed() < Duration::from_secs(10), "{bad:?}");
    }
}

/// `--connect` takes what refd-client's address parser takes; anything
/// else is its error, a usage error (status 2), no panic and no load.
#[test]
fn malformed_connect_addresses_are_the_parsers_errors() {
    for (addr, reason) in [
        ("tcp:localhost", "expected tcp:HOST:PORT"),
        ("tcp::7450", "empty host"),
        ("tcp:[::1]:70000", "port is not a number 0..=65535"),
        ("unix:", "empty unix socket path"),
        ("", "empty address"),
    ] {
        let out = output_within(
            load(&["--connect", addr, "--duration-s", "1"]),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr:?}: {stderr}");
        assert!(
            stderr.contains(&format!("bad address {addr:?}: {reason}")),
            "{addr:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{addr:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{addr:?}");
    }
}

/// The smallest kernel capture replayed over TCP loopback to a daemon
/// the load starts (`--spawn-listen tcp:127.0.0.1:0`, the port read from
/// its ready line) and given the token: the kernel's `after` extents.
#[test]
fn btrfs_trace_over_tcp_to_a_spawned_daemon_with_a_token() {
    let Some(scratch) = Scratch::new("load-trace-tcp") else {
        return;
    };
    let token = scratch.path().join("token");
    std::fs::write(&token, "trace-token").unwrap();
    let capture = captures_dir().join("qgroups-1");
    let device = scratch.path().join("refd.img");
    let v = json_of(load(&[
        "--workload",
        "btrfs-trace",
        "--trace",
        capture.to_str().unwrap(),
        "--spawn",
        "--spawn-listen",
        "tcp:127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
        "--device",
        device.to_str().unwrap(),
        "--device-gib",
        "1",
        "--daemon-prefault-mib",
        "0",
        "--batch",
        "256",
    ]));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(capture.join("meta.json")).unwrap()).unwrap();
    let after = &meta["extents_after"];
    let extents =
        after["extent_items"].as_u64().unwrap() + after["metadata_items"].as_u64().unwrap();
    assert_eq!(v["extents"], extents, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["daemon_exit"], 0, "{v}");
    let address = v["address"].as_str().unwrap();
    let port: u16 = address
        .strip_prefix("tcp:127.0.0.1:")
        .unwrap_or_else(|| panic!("not over TCP loopback: {v}"))
        .parse()
        .unwrap();
    assert_ne!(port, 0, "{v}");
}
