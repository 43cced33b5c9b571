//! `refd-bench load`: load over the wire against a refd daemon (one it
//! starts, or one at `--connect`), measured as a client sees it.
//!
//! Every connection goes to one [`Endpoint`]: an address parsed and
//! connected by `refd-client` ([`Address`]: a unix socket or TCP with
//! `TCP_NODELAY`) and the `--token-file` token said in each HELLO.
//!
//! Each client is one connection with its own session and its own share
//! of the extents (a [`Walk`] over every `clients`-th extent, so that
//! every client's ops are valid in any interleaving): a sender thread
//! sends requests of the `--mix` kinds (SUBMIT batches, LOOKUP, BACKREFS,
//! COMMIT) and a receiver thread matches replies to them. Closed loop
//! (`--closed`): each client keeps `--pipeline` requests in flight,
//! latency runs from the send. Open loop (`--rate`): requests are
//! scheduled at fixed intervals and latency runs from the scheduled
//! start, not from the send, so a stall is charged to every request that
//! should have gone during it (the coordinated-omission correction of
//! wrk2); the latency from the send is kept beside it. `--coalesce`
//! instead runs `--clients` threads that each submit one op at a time
//! through `refd-client`'s coalescing `add`. A lookup thread
//! (`--lookups`) measures single-bytenr LOOKUPs while the load runs.
//!
//! Every answer is recorded per kind in HdrHistograms (see [`crate::hist`]):
//! the whole run's (JSON, `.hgrm`, `--report`) and each second's (the
//! progress line, the `.hlog` interval log). `--workload btrfs-trace` is
//! [`crate::wire_trace`].

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use refd_client::{Address, ClientConfig, Stream};
use refd_proto::{
    encode_frame, encode_submit, Direction, FrameDecoder, HelloRequest, LookupRequest, Opcode,
    Reply, Request, WireOp,
};

use crate::hist::{
    histogram, hlog_interval, ms, record, HlogFile, HlogWriter, Kind, KindSummary, Mix, KINDS,
};
use crate::spawn::{DaemonSpec, Spawned};
use crate::workload::{Walk, Workload};
use refd_ioring::WriteLatency;

/// Arguments of `load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// A running daemon's address: unix:PATH, tcp:HOST:PORT
    /// (an IPv6 HOST in brackets) or a path (a unix socket); without it a daemon is
    /// started (as with --spawn).
    #[arg(long, value_name = "ADDR", conflicts_with = "spawn")]
    pub connect: Option<Address>,
    /// A file holding the auth token every connection gives in HELLO
    /// (trailing newlines removed, as `refd serve --token-file` reads it;
    /// the daemon checks it on TCP). With the daemon started, it is given
    /// the same file.
    #[arg(long, value_name = "F")]
    pub token_file: Option<PathBuf>,
    /// Start `refd serve` on --device (or a new file), wait for its ready
    /// line, stop it at the end with SIGTERM and check its exit status
    /// (the default without --connect).
    #[arg(long)]
    pub spawn: bool,
    /// The daemon started also listens on ADDR (tcp:127.0.0.1:0: a port
    /// the kernel picks, read from its ready line) and the load connects
    /// there instead of to its unix socket.
    #[arg(long, value_name = "ADDR", conflicts_with = "connect")]
    pub spawn_listen: Option<Address>,
    /// With no --connect: the device of the daemon started (created as a
    /// file if missing; default: a new file in /var/tmp, removed after).
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Size of a device file created (GiB).
    #[arg(long, default_value_t = 4)]
    pub device_gib: u64,
    /// The refd binary (default: beside this one).
    #[arg(long)]
    pub refd: Option<PathBuf>,
    /// The started daemon's store.
    #[arg(long = "impl", default_value = "lockfree")]
    pub store: String,
    /// Start the daemon with --dry-run (decode and answer, apply nothing):
    /// what the generator and the wire alone reach.
    #[arg(long)]
    pub dry_run: bool,
    /// Heap the started daemon prefaults (MiB, as `refd-bench durable`
    /// does by default, so both start alike).
    #[arg(long, default_value_t = crate::durable::PREFAULT_MIB_DEFAULT)]
    pub daemon_prefault_mib: usize,
    /// The CPUs' reschedule tick (µs; 0: none) of the started daemon
    /// (`refd serve --resched-tick-us`), and of this process with
    /// --in-process, so that both run with the same scheduling.
    #[arg(long, default_value_t = refd::config::RESCHED_TICK_US_DEFAULT)]
    pub resched_tick_us: u64,
    /// Extra arguments for the started daemon (repeatable).
    #[arg(long = "refd-arg", allow_hyphen_values = true)]
    pub refd_args: Vec<String>,
    /// Client connections.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Ops per SUBMIT.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Closed loop: batches each client keeps in flight.
    #[arg(long, default_value_t = 2)]
    pub pipeline: usize,
    /// Open loop at this many SUBMITted ops per second in all (0: closed
    /// loop); the other kinds of --mix are scheduled between the SUBMITs
    /// in their share.
    #[arg(long, default_value_t = 0.0, conflicts_with = "closed")]
    pub rate: f64,
    /// Closed loop (the default without --rate).
    #[arg(long)]
    pub closed: bool,
    /// Open loop: most requests one client keeps unanswered; a sender that
    /// reaches it waits (latency still runs from the scheduled start).
    #[arg(long, default_value_t = 1024)]
    pub in_flight_max: usize,
    /// The request kinds and their shares: KIND=WEIGHT,... of submit,
    /// lookup (one bytenr), backrefs (first page of one extent), commit.
    #[arg(long, default_value = "submit=100")]
    pub mix: Mix,
    /// Write the interval log (HdrHistogram `.hlog`, one interval per
    /// second, one histogram per request kind tagged with its name).
    #[arg(long)]
    pub hlog: Option<PathBuf>,
    /// Write an HTML report to DIR (index.html with SVG charts, the
    /// `.hgrm` files and report.json).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write each request kind's percentile distribution
    /// (HdrHistogram `.hgrm`, ms) to DIR/KIND.hgrm.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Measured time.
    #[arg(long, default_value_t = 20.0)]
    pub duration_s: f64,
    /// Load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// The ops.
    #[arg(long, value_enum, default_value = "uniform")]
    pub workload: Workload,
    /// Distinct extents.
    #[arg(long, default_value_t = 1_000_000)]
    pub extents: u64,
    /// btrfs-trace: the kernel capture (before, trace and after .txt.zst,
    /// e.g. ../shared/traces/qgroups-1).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// No daemon and no wire: the same durable engine (opened with the
    /// daemon's options on --device), the same sessions and batches, from
    /// --clients threads in this process: the ceiling the wire is measured
    /// against.
    #[arg(long)]
    pub in_process: bool,
    /// Single-op SUBMITs through refd-client's coalescing `add` from
    /// --clients threads (each waits for its op to be durable).
    #[arg(long)]
    pub coalesce: bool,
    /// Single-bytenr LOOKUPs per second from one more connection while
    /// the load runs (0: none).
    #[arg(long, default_value_t = 0)]
    pub lookups: u64,
    /// The --lookups thread at this SCHED_FIFO priority (0: the normal
    /// one), as a latency-bound client would run it: with the daemon's
    /// threads and the load's keeping both cores busy, a client thread
    /// woken by its reply otherwise waits for a core too. Needs
    /// CAP_SYS_NICE; refused, the thread runs at the normal priority
    /// (said on stderr).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub lookup_rt_priority: u8,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object (no progress lines).
    #[arg(long)]
    pub json: bool,
}

/// Longest wait for a STATS answer of the progress line.
const STATS_TIMEOUT: Duration = Duration::from_millis(300);

/// Longest wait for one connection of the load (connect and HELLO).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Entries of a BACKREFS page asked for (`--mix backrefs=`).
const BACKREFS_PAGE_ENTRIES: u32 = 64;

/// What `load` measured.
#[derive(Debug, serde::Serialize)]
pub struct LoadReport {
    /// Which loop ran: "open" (scheduled requests, latency from each one's
    /// scheduled start) or "closed" (latency from the send).
    #[serde(rename = "loop")]
    pub loop_kind: &'static str,
    /// Open loop (latency from the scheduled start).
    pub open_loop: bool,
    /// Requested SUBMITted ops/s (open loop).
    pub rate: f64,
    /// Clients.
    pub clients: usize,
    /// Ops per SUBMIT.
    pub batch: usize,
    /// Batches in flight per client (closed loop).
    pub pipeline: usize,
    /// The request kinds' shares (`--mix`).
    pub mix: String,
    /// `--coalesce`: one op per caller thread through the client's
    /// coalescing (`clients` threads, one shared client); `pipeline` is
    /// unused and a "SUBMIT" is one caller's op.
    pub coalesce: bool,
    /// Measured seconds.
    pub duration_s: f64,
    /// Acknowledged (durable) ops per second.
    pub ops_per_sec: f64,
    /// SUBMITs acknowledged per second.
    pub requests_per_sec: f64,
    /// SUBMIT latency (open loop: from the scheduled start).
    pub p50_ms: f64,
    /// SUBMIT latency.
    pub p99_ms: f64,
    /// SUBMIT latency.
    pub p999_ms: f64,
    /// SUBMIT latency.
    pub max_ms: f64,
    /// Per request kind (submit, lookup, backrefs, commit): requests,
    /// rates and latency (open loop: from the scheduled start).
    pub kinds: BTreeMap<&'static str, KindSummary>,
    /// SUBMIT latency from the send instead of the scheduled start (what
    /// an uncorrected generator reports; the same as `kinds.submit` in a
    /// closed loop).
    pub submit_uncorrected: KindSummary,
    /// Acknowledged ops in each whole second.
    pub ops_by_second: Vec<u64>,
    /// Each second of the measured time.
    pub seconds: Vec<Second>,
    /// Commits the daemon made during the measured time (from STATS).
    pub commits: u64,
    /// Back-pressure waits during the measured time (from STATS).
    pub backpressure_waits: u64,
    /// The daemon's log batch writes (write and flush, what each ack
    /// waited for) during the measured time, from STATS (`None`: no
    /// STATS): p50, p99 and max within a factor of 2 (power-of-two
    /// buckets; the max is the top bucket's bound, capped by the longest
    /// write since the daemon started).
    pub log_write: Option<LogWriteSummary>,
    /// Bytes written to the device per second in the measured time
    /// (`None`: the device is not a block device, whose
    /// `/sys/block/NAME/stat` counts them).
    pub device_write_mb_per_sec: Option<f64>,
    /// Error replies.
    pub errors: u64,
    /// Largest resident memory of the daemon started (0: not started).
    pub daemon_rss_max_bytes: u64,
    /// The daemon's store.
    pub store: String,
    /// Workload.
    pub workload: Workload,
    /// Extents (btrfs-trace: of the kernel's `after` dump, compared).
    pub extents: u64,
    /// The daemon ran with --dry-run.
    pub dry_run: bool,
    /// Daemon exit status after SIGTERM (started daemons).
    pub daemon_exit: Option<i32>,
    /// The device (or the address connected to).
    pub device: String,
    /// Where the load's connections went (`unix:PATH`, `tcp:HOST:PORT`;
    /// with `--spawn-listen`, the port bound); empty with --in-process.
    pub address: String,
    /// Each kind's latency over the measured time (for `--report`).
    #[serde(skip)]
    pub latency: Option<Box<[Histogram<u64>; KINDS]>>,
    /// `btrfs-trace`: extents whose answer differs from the kernel's
    /// `after` dump (then `extents` counts the dump's extents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mismatches: Option<u64>,
}

/// One second of a run (the progress line's figures).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Second {
    /// End of the second, from the start of the measured time.
    pub t_s: f64,
    /// SUBMITted ops acknowledged per second in it.
    pub ops_per_sec: f64,
    /// SUBMIT latency in it.
    pub p50_ms: f64,
    /// SUBMIT latency in it.
    pub p99_ms: f64,
    /// Commits in it (`None`: no STATS).
    pub commits: Option<u64>,
    /// Back-pressure waits in it (`None`: no STATS).
    pub backpressure_waits: Option<u64>,
    /// The daemon's log batch writes in it (`None`: no STATS).
    pub log_write_p99_ms: Option<f64>,
}

/// The daemon's log batch writes over some time (see
/// [`LoadReport::log_write`]).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LogWriteSummary {
    /// Batch writes.
    pub writes: u64,
    /// Quantiles (upper bounds of power-of-two buckets).
    pub p50_ms: f64,
    /// Quantiles (upper bounds of power-of-two buckets).
    pub p99_ms: f64,
    /// Upper bound of the highest bucket reached.
    pub max_ms: f64,
}

impl LogWriteSummary {
    /// What `w` counted after `earlier`.
    fn since(w: &WriteLatency, earlier: &WriteLatency) -> LogWriteSummary {
        let d = w.since(earlier);
        let top = d.counts.iter().rposition(|&c| c > 0);
        let max_us = top.map_or(0, |i| WriteLatency::bucket_upper_us(i).min(w.max_us));
        LogWriteSummary {
            writes: d.count(),
            p50_ms: d.quantile_us(0.5) as f64 / 1e3,
            p99_ms: d.quantile_us(0.99) as f64 / 1e3,
            max_ms: max_us as f64 / 1e3,
        }
    }
}

/// One client's own histograms (merged into the [`Tally`] at its end).
pub(crate) struct Local {
    kinds: [Histogram<u64>; KINDS],
    uncorrected: Histogram<u64>,
}

impl Local {
    pub(crate) fn new() -> Self {
        Local {
            kinds: std::array::from_fn(|_| histogram()),
            uncorrected: histogram(),
        }
    }
}

/// Shared counters of a run.
#[derive(Debug)]
pub(crate) struct Tally {
    pub(crate) measuring: AtomicBool,
    stop: AtomicBool,
    ops: AtomicU64,
    errors: AtomicU64,
    /// Acknowledged ops per second since the start of measuring.
    by_second: Mutex<Vec<u64>>,
    start: Mutex<Option<Instant>>,
    /// Per kind, the whole measured time.
    latency: Mutex<[Histogram<u64>; KINDS]>,
    /// SUBMIT latency from the send.
    uncorrected: Mutex<Histogram<u64>>,
    /// Per kind, since the last interval (progress line, `.hlog`).
    interval: Mutex<[Histogram<u64>; KINDS]>,
}

impl Tally {
    pub(crate) fn new() -> Self {
        Tally {
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            by_second: Mutex::new(Vec::new()),
            start: Mutex::new(None),
            latency: Mutex::new(std::array::from_fn(|_| histogram())),
            uncorrected: Mutex::new(histogram()),
            interval: Mutex::new(std::array::from_fn(|_| histogram())),
        }
    }

    /// A reply to a request of `kind` carrying `ops` ops, scheduled at
    /// `intended` and sent at `sent` (the same in a closed loop).
    pub(crate) fn answered(
        &self,
        kind: Kind,
        ops: u64,
        intended: Instant,
        sent: Instant,
        local: &mut Local,
    ) {
        let now = Instant::now();
        let ns = (now - intended).as_nanos() as u64;
        {
            // Under the interval's lock, so that every value of the run is
            // in exactly one interval (see `stop_measuring`).
            let mut interval = self.interval.lock().unwrap_or_else(|e| e.into_inner());
            if !self.measuring.load(Ordering::Relaxed) {
                return;
            }
            record(&mut interval[kind.index()], ns);
            record(&mut local.kinds[kind.index()], ns);
        }
        if kind != Kind::Submit {
            return;
        }
        record(&mut local.uncorrected, (now - sent).as_nanos() as u64);
        self.ops.fetch_add(ops, Ordering::Relaxed);
        if let Some(start) = *self.start.lock().unwrap_or_else(|e| e.into_inner()) {
            let s = start.elapsed().as_secs() as usize;
            let mut b = self.by_second.lock().unwrap_or_else(|e| e.into_inner());
            if b.len() <= s {
                b.resize(s + 1, 0);
            }
            b[s] += ops;
        }
    }

    pub(crate) fn merge(&self, local: &Local) {
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for (all, mine) in l.iter_mut().zip(&local.kinds) {
            let _ = all.add(mine);
        }
        let _ = self
            .uncorrected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(&local.uncorrected);
    }

    /// Ends the measured time: the last interval's histograms.
    fn stop_measuring(&self) -> [Histogram<u64>; KINDS] {
        let mut interval = self.interval.lock().unwrap_or_else(|e| e.into_inner());
        self.measuring.store(false, Ordering::SeqCst);
        std::mem::replace(&mut *interval, std::array::from_fn(|_| histogram()))
    }

    /// The interval histograms so far, replaced by empty ones.
    fn take_interval(&self) -> [Histogram<u64>; KINDS] {
        std::mem::replace(
            &mut *self.interval.lock().unwrap_or_else(|e| e.into_inner()),
            std::array::from_fn(|_| histogram()),
        )
    }
}

/// Where every connection of the load goes: the daemon's address
/// (`--connect`, or the daemon started) and the token its HELLO carries
/// (`--token-file`; empty: none).
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) address: Address,
    pub(crate) token: Vec<u8>,
}

impl Endpoint {
    /// A `refd-client` configuration with the token, named `name`.
    pub(crate) fn client_config(&self, name: &str) -> ClientConfig {
        let mut config = ClientConfig::default();
        config.name = name.into();
        config.token = self.token.clone();
        config
    }

    /// A `refd-client` client of the daemon.
    pub(crate) fn client(&self, name: &str) -> Result<refd_client::Client, String> {
        refd_client::Client::connect_address(self.address.clone(), self.client_config(name))
            .map_err(|e| e.to_string())
    }
}

/// A raw protocol connection: HELLO done.
struct Conn {
    stream: Stream,
    decoder: FrameDecoder,
    rest: Vec<u8>,
    buf: Vec<u8>,
}

impl Conn {
    fn open(to: &Endpoint) -> Result<(Conn, refd_proto::HelloReply), String> {
        Conn::open_with_timeout(to, CONNECT_TIMEOUT, None)
    }

    /// [`Conn::open`] that connects within `connect`, and whose reads and
    /// writes (HELLO's included) give up after `io` (`None`: never).
    fn open_with_timeout(
        to: &Endpoint,
        connect: Duration,
        io: Option<Duration>,
    ) -> Result<(Conn, refd_proto::HelloReply), String> {
        let at = &to.address;
        let stream = at
            .connect(connect)
            .map_err(|e| format!("cannot connect to {at}: {e}"))?;
        // The HELLO within `connect` too: a daemon that accepts but never
        // answers must not hang the load.
        stream
            .set_timeouts(Some(io.unwrap_or(connect)), Some(io.unwrap_or(connect)))
            .map_err(|e| format!("{at}: {e}"))?;
        let mut c = Conn {
            stream,
            decoder: FrameDecoder::expecting(refd_proto::BODY_BYTES_MAX_DEFAULT, Direction::Reply),
            rest: Vec::new(),
            buf: vec![0; 256 << 10],
        };
        let hello = Request::Hello(HelloRequest {
            version_min: 1,
            version_max: 1,
            token: to.token.clone(),
            name: "refd-bench".into(),
        });
        let reply = c
            .call(0, &hello)
            .map_err(|e| format!("HELLO to {at}: {e}"))?;
        let h = match reply {
            Reply::Hello(h) => h,
            Reply::Error(e) if e.code == refd_proto::ErrorCode::AuthFailed => {
                return Err(format!(
                    "HELLO to {at}: AUTH_FAILED: {} (--token-file)",
                    e.message
                ))
            }
            Reply::Error(e) => {
                return Err(format!("HELLO to {at}: {}: {}", e.code.name(), e.message))
            }
            other => return Err(format!("HELLO to {at}: {other:?}")),
        };
        c.stream
            .set_timeouts(io, io)
            .map_err(|e| format!("{at}: {e}"))?;
        Ok((c, h))
    }

    fn send(&mut self, id: u64, r: &Request) -> Result<(), String> {
        let mut f = Vec::new();
        refd_proto::encode_request(id, r, &mut f);
        self.stream.write_all(&f).map_err(|e| e.to_string())
    }

    fn recv(&mut self) -> Result<(u64, Reply), String> {
        loop {
            let mut input = &self.rest[..];
            let frame = self
                .decoder
                .decode_from(&mut input)
                .map_err(|e| e.to_string())?;
            let used = self.rest.len() - input.len();
            self.rest.drain(..used);
            if let Some(f) = frame {
                let reply = Reply::decode(f.header.opcode, &f.body).map_err(|e| e.to_string())?;
                return Ok((f.header.request_id, reply));
            }
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => return Err("the daemon closed the connection".into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            self.rest.extend_from_slice(&self.buf[..n]);
        }
    }

    fn call(&mut self, id: u64, r: &Request) -> Result<Reply, String> {
        self.send(id, r)?;
        Ok(self.recv()?.1)
    }
}

/// Runs `load` (and writes `--report`).
pub fn run(a: &LoadArgs) -> Result<LoadReport, String> {
    let mut r = run_load(a)?;
    if let Some(dir) = &a.report {
        let latency = r.latency.take().ok_or("no latency histograms")?;
        crate::report::write(dir, &r, &latency)?;
        r.latency = Some(latency);
    }
    Ok(r)
}

fn run_load(a: &LoadArgs) -> Result<LoadReport, String> {
    if a.clients == 0 || a.batch == 0 || a.pipeline == 0 || a.in_flight_max == 0 {
        return Err("--clients, --batch, --pipeline and --in-flight-max must be at least 1".into());
    }
    if a.rate > 0.0 && a.mix.weights[Kind::Submit.index()] == 0 {
        return Err("--rate counts SUBMITted ops: --mix needs submit".into());
    }
    if a.workload == Workload::BtrfsTrace {
        return with_daemon(a, |to| crate::wire_trace::run(a, to));
    }
    if !matches!(a.workload, Workload::Uniform | Workload::Zipf) {
        return Err(
            "load runs the uniform, zipf or btrfs-trace workload (snapshot-fanout, reflink and cancel are ingest's)"
                .into(),
        );
    }
    if a.in_process {
        return in_process(a);
    }
    with_daemon(a, |to| drive(a, to))
}

/// Runs `body` against the daemon at --connect, or one started for it
/// (stopped after, its exit status and largest RSS in the report). One
/// connection says HELLO first, so that a wrong address or token fails
/// the run at once with the daemon's answer instead of every client's
/// thread failing alone.
fn with_daemon(
    a: &LoadArgs,
    body: impl FnOnce(&Endpoint) -> Result<LoadReport, String>,
) -> Result<LoadReport, String> {
    let token = match &a.token_file {
        Some(f) => refd_client::read_token_file(f).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let spawned = match &a.connect {
        Some(_) => None,
        None => Some(Spawned::start(&DaemonSpec {
            refd: a.refd.clone(),
            device: a.device.clone(),
            device_gib: a.device_gib,
            store: a.store.clone(),
            prefault_mib: a.daemon_prefault_mib,
            args: a
                .refd_args
                .iter()
                .cloned()
                .chain(a.dry_run.then(|| "--dry-run".to_string()))
                .chain([format!("--resched-tick-us={}", a.resched_tick_us)])
                .chain(
                    a.token_file
                        .iter()
                        .map(|f| format!("--token-file={}", f.display())),
                )
                .collect(),
            listen: a.spawn_listen.clone(),
            quiet: a.json,
        })?),
    };
    let address = match (&a.connect, &spawned) {
        (Some(addr), _) => addr.clone(),
        (None, Some(s)) => s.address().clone(),
        (None, None) => unreachable!("a daemon is started without --connect"),
    };
    let to = Endpoint { address, token };
    let result = Conn::open(&to).and_then(|_| body(&to));
    let rss = spawned
        .as_ref()
        .map_or(0, |s| s.rss_max.load(Ordering::Relaxed));
    let device = spawned.as_ref().map(|s| s.device().display().to_string());
    let exit = spawned.map(Spawned::stop).and_then(|s| s);
    let mut report = result?;
    if let Some(d) = device {
        report.device = d;
    }
    report.daemon_rss_max_bytes = rss;
    report.daemon_exit = exit;
    report.address = to.address.to_string();
    Ok(report)
}

fn drive(a: &LoadArgs, to: &Endpoint) -> Result<LoadReport, String> {
    let tally = Arc::new(Tally::new());
    let open_loop = a.rate > 0.0 && !a.closed;
    let mut threads = Vec::new();
    for client in 0..a.clients {
        let (a, to, tally) = (a.clone(), to.clone(), Arc::clone(&tally));
        threads.push(std::thread::spawn(move || {
            if a.coalesce {
                coalescing_client(&a, &to, client, &tally)
            } else {
                batch_client(&a, &to, client, &tally, open_loop)
            }
        }));
    }
    if a.lookups > 0 {
        let (a, to, tally) = (a.clone(), to.clone(), Arc::clone(&tally));
        threads.push(std::thread::spawn(move || lookup_client(&a, &to, &tally)));
    }
    measure(a, Some(to), tally, threads, open_loop)
}

type Clients = Vec<std::thread::JoinHandle<Result<(), String>>>;

/// The daemon's counters the progress line shows, from STATS.
#[derive(Debug, Clone, Copy)]
struct DaemonCounters {
    commits: u64,
    /// Back-pressure waits: connections that stopped reading, and the
    /// engine's throttle.
    waits: u64,
    pending_ops: u64,
    resident_bytes: u64,
    /// The log's batch write times (`None`: a daemon without them).
    log_writes: Option<WriteLatency>,
}

/// The log's batch write histogram from a STATS reply.
fn log_writes(log: &serde_json::Value) -> Option<WriteLatency> {
    let buckets = log["write_buckets"].as_array()?;
    let mut w = WriteLatency::default();
    if buckets.len() != w.counts.len() {
        return None;
    }
    for (c, b) in w.counts.iter_mut().zip(buckets) {
        *c = b.as_u64()?;
    }
    w.sum_us = log["write_sum_us"].as_u64()?;
    w.max_us = log["write_max_us"].as_u64()?;
    Some(w)
}

fn daemon_counters(c: &mut Conn) -> Option<DaemonCounters> {
    let Reply::Stats(s) = c.call(9, &Request::Stats(refd_proto::StatsRequest)).ok()? else {
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(&s.json).ok()?;
    Some(DaemonCounters {
        commits: v["commits"]["count"].as_u64()?,
        waits: v["wire"]["backpressure_waits"].as_u64()?
            + v["engine"]["throttle_waits"].as_u64()?,
        pending_ops: v["engine"]["pending_ops"].as_u64().unwrap_or(0),
        resident_bytes: v["process"]["resident_bytes"].as_u64().unwrap_or(0),
        log_writes: log_writes(&v["log"]),
    })
}

/// The measured time second by second: the progress line, an `.hlog`
/// interval and a [`Second`] each.
struct Clock {
    t0: Instant,
    /// SUBMITted ops acknowledged, and when, at the last tick.
    last: (u64, Instant),
    /// The daemon, and a connection for STATS (dropped when a STATS does
    /// not answer within [`STATS_TIMEOUT`], opened again at the next
    /// tick), so that a stopped daemon does not stop the clock.
    daemon: Option<Endpoint>,
    stats: Option<Conn>,
    first: Option<DaemonCounters>,
    prev: Option<DaemonCounters>,
    seconds: Vec<Second>,
    /// Quiet (`--json`).
    quiet: bool,
    /// The device's `/sys/block/NAME/stat` and its sectors written at the
    /// start (block devices only).
    device_stat: Option<(PathBuf, u64)>,
}

/// `/sys/block/NAME/stat` of a block device (`None`: not one).
fn block_stat_path(device: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let real = std::fs::canonicalize(device).ok()?;
    if !std::fs::metadata(&real).ok()?.file_type().is_block_device() {
        return None;
    }
    let stat = PathBuf::from("/sys/block")
        .join(real.file_name()?)
        .join("stat");
    stat.exists().then_some(stat)
}

/// Sectors (512 bytes) written, from a block device's `stat` (field 7).
fn sectors_written(stat: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(stat)
        .ok()?
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()
}

impl Clock {
    fn start(daemon: Option<&Endpoint>, device: Option<&std::path::Path>, quiet: bool) -> Clock {
        let device_stat = device
            .and_then(block_stat_path)
            .and_then(|p| sectors_written(&p).map(|n| (p, n)));
        let mut clock = Clock {
            t0: Instant::now(),
            last: (0, Instant::now()),
            daemon: daemon.cloned(),
            stats: None,
            first: None,
            prev: None,
            seconds: Vec::new(),
            quiet,
            device_stat,
        };
        clock.first = clock.poll();
        clock.prev = clock.first;
        clock.t0 = Instant::now();
        clock.last = (0, clock.t0);
        clock
    }

    /// The daemon's counters now (`None`: no daemon, or it did not answer
    /// in time).
    fn poll(&mut self) -> Option<DaemonCounters> {
        if self.stats.is_none() {
            let daemon = self.daemon.as_ref()?;
            self.stats = Conn::open_with_timeout(daemon, STATS_TIMEOUT, Some(STATS_TIMEOUT))
                .ok()
                .map(|(c, _)| c);
        }
        let counters = self.stats.as_mut().and_then(daemon_counters);
        if counters.is_none() {
            // A late reply must not be read as the next one's.
            self.stats = None;
        }
        counters
    }

    /// MB written to the device per second since the start.
    fn device_write_mb_per_sec(&self) -> Option<f64> {
        let (stat, first) = self.device_stat.as_ref()?;
        let sectors = sectors_written(stat)?.checked_sub(*first)?;
        Some(sectors as f64 * 512.0 / 1e6 / self.t0.elapsed().as_secs_f64())
    }

    /// The end of a second: `hists` are its latencies.
    fn tick(
        &mut self,
        tally: &Tally,
        hists: &[Histogram<u64>; KINDS],
        hlog: Option<&mut HlogWriter<'_>>,
    ) -> Result<(), String> {
        let now = Instant::now();
        let ops = tally.ops.load(Ordering::Relaxed);
        let counters = self.poll();
        let prev = self.prev;
        let delta = counters
            .zip(self.prev)
            .map(|(c, p)| (c.commits - p.commits, c.waits - p.waits));
        self.prev = counters.or(self.prev);
        let h = &hists[Kind::Submit.index()];
        let second = Second {
            t_s: (now - self.t0).as_secs_f64(),
            ops_per_sec: (ops - self.last.0) as f64 / (now - self.last.1).as_secs_f64(),
            p50_ms: ms(h, 0.5),
            p99_ms: ms(h, 0.99),
            commits: delta.map(|d| d.0),
            backpressure_waits: delta.map(|d| d.1),
            log_write_p99_ms: log_write_since(counters, prev).map(|w| w.p99_ms),
        };
        let written = match hlog {
            Some(w) if hists.iter().any(|h| !h.is_empty()) => {
                hlog_interval(w, hists, self.last.1 - self.t0, now - self.last.1)
            }
            _ => Ok(()),
        };
        if !self.quiet {
            progress_line(&second, h, counters, delta, tally);
        }
        self.seconds.push(second);
        self.last = (ops, now);
        written
    }

    /// The daemon's commits, back-pressure waits and log writes since
    /// the start.
    fn totals(&mut self) -> (u64, u64, Option<LogWriteSummary>) {
        let end = self.poll().or(self.prev);
        let (commits, waits) = end
            .zip(self.first)
            .map_or((0, 0), |(e, f)| (e.commits - f.commits, e.waits - f.waits));
        (commits, waits, log_write_since(end, self.first))
    }
}

/// The log writes between two STATS polls.
fn log_write_since(
    now: Option<DaemonCounters>,
    earlier: Option<DaemonCounters>,
) -> Option<LogWriteSummary> {
    let (n, e) = (now?.log_writes?, earlier?.log_writes?);
    Some(LogWriteSummary::since(&n, &e))
}

/// Warm-up, the measured time with a progress line and an `.hlog`
/// interval per second, then the report from what the clients counted.
fn measure(
    a: &LoadArgs,
    daemon: Option<&Endpoint>,
    tally: Arc<Tally>,
    threads: Clients,
    open_loop: bool,
) -> Result<LoadReport, String> {
    std::thread::sleep(Duration::from_secs_f64(a.warmup_s));
    let mut hlog_file = a.hlog.as_deref().map(HlogFile::create).transpose()?;
    let wall_start = std::time::SystemTime::now();
    let mut clock = Clock::start(daemon, a.device.as_deref(), a.json);
    *tally.start.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    tally.measuring.store(true, Ordering::SeqCst);
    let mut hlog = match hlog_file.as_mut() {
        Some(f) => Some(f.begin(wall_start)?),
        None => None,
    };
    let mut failed = None;
    while clock.t0.elapsed().as_secs_f64() < a.duration_s {
        std::thread::sleep(Duration::from_millis(1000).min(Duration::from_secs_f64(
            (a.duration_s - clock.t0.elapsed().as_secs_f64()).max(0.001),
        )));
        if let Err(e) = clock.tick(&tally, &tally.take_interval(), hlog.as_mut()) {
            failed.get_or_insert(e);
        }
    }
    // The few answers between the last tick and the end go into the log
    // too (an interval of their own), so that it holds every value.
    let rest = tally.stop_measuring();
    let measured = clock.t0.elapsed().as_secs_f64();
    let device_mb = clock.device_write_mb_per_sec();
    tally.stop.store(true, Ordering::SeqCst);
    if let Some(w) = hlog.as_mut().filter(|_| rest.iter().any(|h| !h.is_empty())) {
        let (offset, length) = (clock.last.1 - clock.t0, clock.last.1.elapsed());
        if let Err(e) = hlog_interval(w, &rest, offset, length) {
            failed.get_or_insert(e);
        }
    }
    drop(hlog);
    for t in threads {
        t.join().map_err(|_| "a client panicked")??;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(f) = hlog_file {
        f.finish()?;
    }
    let mut report = summarize(a, &tally, measured, open_loop)?;
    (report.commits, report.backpressure_waits, report.log_write) = clock.totals();
    report.device_write_mb_per_sec = device_mb;
    report.seconds = clock.seconds;
    Ok(report)
}

/// The progress line of one second (stderr).
fn progress_line(
    s: &Second,
    h: &Histogram<u64>,
    counters: Option<DaemonCounters>,
    delta: Option<(u64, u64)>,
    tally: &Tally,
) {
    let daemon = match (counters, delta) {
        (Some(c), Some((commits, waits))) => format!(
            ", {commits} commits, {waits} back-pressure waits, {} pending, log write p99 {}, daemon RSS {} MiB",
            c.pending_ops,
            s.log_write_p99_ms
                .map_or("-".to_string(), |ms| format!("{ms:.2} ms")),
            c.resident_bytes >> 20
        ),
        _ => String::new(),
    };
    eprintln!(
        "load: {:5.1} s  {:>10.0} ops/s  SUBMIT p50 {:.2} ms p99 {:.2} ms max {:.1} ms{}  ({} errors)",
        s.t_s,
        s.ops_per_sec,
        s.p50_ms,
        s.p99_ms,
        h.max() as f64 / crate::hist::NS_PER_MS,
        daemon,
        tally.errors.load(Ordering::Relaxed)
    );
}

/// The report from the tally at the end of a run (and the `.hgrm` files).
pub(crate) fn summarize(
    a: &LoadArgs,
    tally: &Tally,
    measured: f64,
    open_loop: bool,
) -> Result<LoadReport, String> {
    let latency = tally.latency.lock().unwrap_or_else(|e| e.into_inner());
    let uncorrected = tally.uncorrected.lock().unwrap_or_else(|e| e.into_inner());
    let ops = tally.ops.load(Ordering::Relaxed);
    if let Some(dir) = &a.hgrm {
        write_hgrms(dir, &latency, Some(&uncorrected))?;
    }
    let mut kinds = BTreeMap::new();
    for kind in Kind::ALL {
        let h = &latency[kind.index()];
        if a.mix.weights[kind.index()] > 0 || !h.is_empty() {
            let kind_ops = if kind == Kind::Submit { ops } else { 0 };
            kinds.insert(kind.name(), KindSummary::of(h, kind_ops, measured));
        }
    }
    let submit = KindSummary::of(&latency[Kind::Submit.index()], ops, measured);
    let mut by_second = tally
        .by_second
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    by_second.truncate(measured as usize);
    Ok(LoadReport {
        loop_kind: if open_loop { "open" } else { "closed" },
        open_loop,
        rate: a.rate,
        clients: a.clients,
        batch: if a.coalesce { 1 } else { a.batch },
        pipeline: a.pipeline,
        mix: a.mix.to_string(),
        coalesce: a.coalesce,
        duration_s: measured,
        ops_per_sec: submit.ops_per_sec,
        requests_per_sec: submit.requests_per_sec,
        p50_ms: submit.p50_ms,
        p99_ms: submit.p99_ms,
        p999_ms: submit.p999_ms,
        max_ms: submit.max_ms,
        kinds,
        submit_uncorrected: KindSummary::of(&uncorrected, ops, measured),
        ops_by_second: by_second,
        seconds: Vec::new(),
        commits: 0,
        backpressure_waits: 0,
        log_write: None,
        device_write_mb_per_sec: None,
        errors: tally.errors.load(Ordering::Relaxed),
        daemon_rss_max_bytes: 0,
        store: a.store.clone(),
        workload: a.workload,
        extents: a.extents,
        dry_run: a.dry_run,
        daemon_exit: None,
        device: match (&a.connect, &a.device) {
            (Some(addr), _) => format!("a daemon at {addr}"),
            (None, Some(d)) => d.display().to_string(),
            (None, None) => "a new file".into(),
        },
        address: String::new(),
        latency: Some(Box::new(latency.clone())),
        mismatches: None,
    })
}

/// DIR/KIND.hgrm for each kind with requests, and
/// DIR/submit-uncorrected.hgrm (SUBMIT latency from the send).
pub(crate) fn write_hgrms(
    dir: &std::path::Path,
    latency: &[Histogram<u64>; KINDS],
    uncorrected: Option<&Histogram<u64>>,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let files = Kind::ALL
        .iter()
        .map(|k| (k.name(), &latency[k.index()]))
        .chain(uncorrected.map(|h| ("submit-uncorrected", h)))
        .filter(|(_, h)| !h.is_empty());
    for (name, h) in files {
        let path = dir.join(format!("{name}.hgrm"));
        let mut f = std::fs::File::create(&path)
            .map(std::io::BufWriter::new)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        crate::hist::write_hgrm(h, &mut f)
            .and_then(|()| f.flush())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A request of one client awaiting its reply.
#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: Kind,
    /// When it was due (open loop: its scheduled start; closed loop: the
    /// send).
    intended: Instant,
    sent: Instant,
    /// Ops it carries (SUBMIT).
    ops: u64,
}

/// In-flight requests of one client: request id → what it was.
#[derive(Debug, Default)]
struct InFlight {
    map: Mutex<HashMap<u64, Pending>>,
    freed: Condvar,
}

impl InFlight {
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Whether `reply` answers a request of `kind` (anything else, an ERROR
/// reply included, counts as an error).
fn answers(kind: Kind, reply: &Reply) -> bool {
    matches!(
        (kind, reply),
        (Kind::Submit, Reply::Submit(_))
            | (Kind::Lookup, Reply::Lookup(_))
            | (Kind::Backrefs, Reply::Backrefs(_))
            | (Kind::Commit, Reply::Commit(_))
    )
}

/// Matches replies to requests until the connection closes.
fn receive(mut rconn: Conn, inflight: &InFlight, tally: &Tally) -> Result<(), String> {
    let mut local = Local::new();
    // Until the sender closes, or the daemon stops.
    while let Ok((id, reply)) = rconn.recv() {
        let entry = inflight
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        inflight.freed.notify_all();
        let Some(p) = entry else { continue };
        if answers(p.kind, &reply) {
            tally.answered(p.kind, p.ops, p.intended, p.sent, &mut local);
        } else {
            tally.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally.merge(&local);
    Ok(())
}

/// What one client sends: its share of the extents and the mix.
struct Requests {
    walk: Walk,
    kinds: crate::hist::MixCursor,
    rng: rand::rngs::SmallRng,
    extents: u64,
    session: u64,
    batch: usize,
    /// SUBMITs sent (their request numbers in the session).
    submits: u64,
    ops: Vec<WireOp>,
}

impl Requests {
    /// The next request's kind and frame (in `frame`), and its ops.
    fn next(&mut self, id: u64, frame: &mut Vec<u8>) -> Result<(Kind, u64), String> {
        let kind = self.kinds.next().unwrap_or(Kind::Submit);
        frame.clear();
        // Extents of every client are looked up, not only its own.
        let bytenr = crate::workload::extent_bytenr(self.rng.gen_range(0..self.extents));
        let request = match kind {
            Kind::Submit => {
                self.submits += 1;
                self.ops.clear();
                let walk = &mut self.walk;
                self.ops
                    .extend((0..self.batch).map(|_| refd::ops::wire(&walk.next_op())));
                encode_frame_submit(id, self.session, self.submits, &self.ops, frame);
                return Ok((kind, self.batch as u64));
            }
            Kind::Lookup => {
                Request::Lookup(LookupRequest::new(vec![bytenr]).map_err(|e| e.to_string())?)
            }
            Kind::Backrefs => Request::Backrefs(refd_proto::BackrefsRequest {
                bytenr,
                max_entries: BACKREFS_PAGE_ENTRIES,
                after: None,
            }),
            Kind::Commit => Request::Commit(refd_proto::CommitRequest),
        };
        refd_proto::encode_request(id, &request, frame);
        Ok((kind, 0))
    }
}

impl Requests {
    /// Client `client`'s requests in `session`, SUBMITs of `batch` ops.
    fn new(a: &LoadArgs, client: usize, session: u64, batch: usize) -> Result<Requests, String> {
        let seed = a.seed.wrapping_add(client as u64 * 7919);
        let share = (a.extents / a.clients as u64).max(1);
        Ok(Requests {
            walk: Walk::new(a.workload, share, seed, a.clients as u64, client as u64)
                .ok_or("workload")?,
            kinds: a.mix.cursor(),
            rng: rand::rngs::SmallRng::seed_from_u64(seed ^ 0x100c),
            extents: a.extents.max(1),
            session,
            batch,
            submits: 0,
            ops: Vec::with_capacity(batch),
        })
    }
}

/// A new connection and session: the sending side, the receiving side
/// and the largest SUBMIT the daemon takes.
fn open_session(to: &Endpoint) -> Result<(Conn, Conn, u64, usize), String> {
    let (mut conn, hello) = Conn::open(to)?;
    let session = match conn.call(1, &Request::Register(refd_proto::RegisterRequest))? {
        Reply::Register(r) => r.session_id,
        other => return Err(format!("REGISTER: {other:?}")),
    };
    let rconn = Conn {
        stream: conn
            .stream
            .try_clone()
            .map_err(|e| format!("clone socket: {e}"))?,
        decoder: FrameDecoder::expecting(refd_proto::BODY_BYTES_MAX_DEFAULT, Direction::Reply),
        rest: Vec::new(),
        buf: vec![0; 64 << 10],
    };
    Ok((conn, rconn, session, hello.submit_ops_max as usize))
}

/// One client: a sender (this thread) that schedules (open loop) or
/// pipelines (closed loop) requests, and a receiver thread.
fn batch_client(
    a: &LoadArgs,
    to: &Endpoint,
    client: usize,
    tally: &Arc<Tally>,
    open_loop: bool,
) -> Result<(), String> {
    let (mut conn, rconn, session, submit_ops_max) = open_session(to)?;
    let batch = a.batch.min(submit_ops_max);
    let inflight = Arc::new(InFlight::default());
    let receiver = {
        let (tally, inflight) = (Arc::clone(tally), Arc::clone(&inflight));
        std::thread::spawn(move || receive(rconn, &inflight, &tally))
    };
    let mut requests = Requests::new(a, client, session, batch)?;
    let mut frame = Vec::with_capacity(64 + batch * refd_proto::OP_BYTES);
    // Open loop: this client's share of the requests, one every `every_s`
    // (SUBMITs at --rate ops/s in all, the other kinds in their share).
    let every_s = a.clients as f64 * batch as f64 * a.mix.submit_share() / a.rate.max(1e-9);
    let bound = if open_loop {
        a.in_flight_max
    } else {
        a.pipeline
    };
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    while !tally.stop.load(Ordering::Relaxed) {
        let due = t0 + Duration::from_secs_f64(every_s * sent as f64);
        if open_loop {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        // Closed loop: the pipeline; open loop: a bound, never reached
        // while the daemon keeps up (latency still runs from `due`).
        {
            let mut m = inflight.map.lock().unwrap_or_else(|e| e.into_inner());
            while m.len() >= bound && !tally.stop.load(Ordering::Relaxed) {
                m = inflight
                    .freed
                    .wait_timeout(m, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        sent += 1;
        let id = sent + 1;
        let (kind, ops) = requests.next(id, &mut frame)?;
        let now = Instant::now();
        let intended = if open_loop { due } else { now };
        let pending = Pending {
            kind,
            intended,
            sent: now,
            ops,
        };
        inflight
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, pending);
        if conn.stream.write_all(&frame).is_err() {
            break;
        }
    }
    // Let the last replies come in, then close.
    let until = Instant::now() + Duration::from_secs(30);
    while inflight.len() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    conn.stream.shutdown();
    receiver.join().map_err(|_| "receiver panicked")?
}

/// `--in-process`: the daemon's engine without the daemon.
fn in_process(a: &LoadArgs) -> Result<LoadReport, String> {
    use refd_core::delayed::lockfree::LockFreeStore;
    use refd_durable::{DurableEngine, Submitted};
    let device = a
        .device
        .clone()
        .ok_or("--in-process needs --device (a refd device, or a path to create)")?;
    let opened =
        refd::device::open_device(&device, a.device_gib << 30).map_err(|e| e.to_string())?;
    if a.daemon_prefault_mib > 0 {
        refd_alloc::prefault(refd_alloc::prefault_mib_capped(a.daemon_prefault_mib) << 20);
    }
    let options = refd::server::engine_options(&refd::ServeConfig::default());
    let _tick =
        refd::server::start_resched_tick(std::time::Duration::from_micros(a.resched_tick_us), None);
    let (engine, _) = DurableEngine::<_, LockFreeStore>::open_with_store(opened.storage, options)
        .map_err(|e| e.to_string())?;
    let engine = Arc::new(engine);
    let committer = {
        let e = Arc::clone(&engine);
        std::thread::spawn(move || e.run_committer().map(|_| ()).map_err(|e| e.to_string()))
    };
    let tally = Arc::new(Tally::new());
    let mut threads = Vec::new();
    for client in 0..a.clients {
        let (a, e, tally) = (a.clone(), Arc::clone(&engine), Arc::clone(&tally));
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let (session, t) = e.register_session().map_err(|e| e.to_string())?;
            t.wait().map_err(|e| e.to_string())?;
            let extents = (a.extents / a.clients as u64).max(1);
            let seed = a.seed.wrapping_add(client as u64 * 7919);
            let mut walk = Walk::new(a.workload, extents, seed, a.clients as u64, client as u64)
                .ok_or("workload")?;
            let mut local = Local::new();
            let mut inflight = std::collections::VecDeque::new();
            let mut ops = Vec::with_capacity(a.batch);
            let mut request = 0u64;
            while !tally.stop.load(Ordering::Relaxed) {
                while inflight.len() >= a.pipeline {
                    let (start, ticket): (Instant, refd_durable::Ticket<_>) =
                        inflight.pop_front().expect("pipeline");
                    ticket.wait().map_err(|e| e.to_string())?;
                    tally.answered(Kind::Submit, a.batch as u64, start, start, &mut local);
                }
                ops.clear();
                ops.extend((0..a.batch).map(|_| walk.next_op()));
                request += 1;
                let start = Instant::now();
                match e
                    .submit(session, request, &ops)
                    .map_err(|e| e.to_string())?
                {
                    Submitted::Queued { ticket, .. } => inflight.push_back((start, ticket)),
                    Submitted::Duplicate { .. } => {
                        return Err("a new request was a duplicate".into())
                    }
                }
            }
            for (start, ticket) in inflight {
                ticket.wait().map_err(|e| e.to_string())?;
                tally.answered(Kind::Submit, a.batch as u64, start, start, &mut local);
            }
            tally.merge(&local);
            Ok(())
        }));
    }
    let mut report = measure(a, None, tally, threads, false)?;
    engine.stop_committer();
    committer.join().map_err(|_| "the committer panicked")??;
    report.store = "in-process".into();
    Ok(report)
}

fn encode_frame_submit(id: u64, session: u64, request: u64, ops: &[WireOp], out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(24 + ops.len() * refd_proto::OP_BYTES);
    encode_submit(session, request, 0, ops, &mut body);
    encode_frame(Opcode::Submit, 0, id, &body, out);
}

fn coalescing_client(
    a: &LoadArgs,
    to: &Endpoint,
    client: usize,
    tally: &Arc<Tally>,
) -> Result<(), String> {
    // One client (and connection) shared by every thread of the run.
    static SHARED: std::sync::OnceLock<Result<refd_client::Client, String>> =
        std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(|| to.client("refd-bench"));
    let c = shared.as_ref().map_err(|e| e.clone())?;
    let extents = (a.extents / a.clients as u64).max(1);
    let mut walk = Walk::new(
        a.workload,
        extents,
        a.seed.wrapping_add(client as u64 * 7919),
        a.clients as u64,
        client as u64,
    )
    .ok_or("workload")?;
    let mut local = Local::new();
    while !tally.stop.load(Ordering::Relaxed) {
        let op = refd::ops::wire(&walk.next_op());
        let start = Instant::now();
        match c.add(op) {
            Ok(_) => tally.answered(Kind::Submit, 1, start, start, &mut local),
            Err(_) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tally.merge(&local);
    Ok(())
}

/// `--lookups`: single-bytenr LOOKUPs at a fixed rate from a connection
/// of its own, one at a time, timed from the send (the lookup kind).
fn lookup_client(a: &LoadArgs, to: &Endpoint, tally: &Tally) -> Result<(), String> {
    let (mut conn, _) = Conn::open(to)?;
    let _boost = match a.lookup_rt_priority {
        0 => None,
        p => refd_core::priority::Boost::to(p)
            .map_err(|e| eprintln!("--lookup-rt-priority {p} refused ({e}): normal priority"))
            .ok(),
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed ^ 0x100c);
    let mut local = Local::new();
    let every = Duration::from_secs_f64(1.0 / a.lookups as f64);
    let mut next = Instant::now();
    let mut id = 10u64;
    while !tally.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += every;
        id += 1;
        let bytenr = crate::workload::extent_bytenr(rng.gen_range(0..a.extents.max(1)));
        let req = Request::Lookup(LookupRequest::new(vec![bytenr]).map_err(|e| e.to_string())?);
        let start = Instant::now();
        match conn.call(id, &req)? {
            Reply::Lookup(_) => tally.answered(Kind::Lookup, 0, start, start, &mut local),
            _ => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tally.merge(&local);
    Ok(())
}

/// The end-of-run summary on stdout (without --json): which loop ran,
/// then one line per request kind.
pub fn print_summary(r: &LoadReport) {
    let which = if r.open_loop {
        format!(
            "open loop at {:.0} ops/s (latency from each request's scheduled start)",
            r.rate
        )
    } else if r.coalesce {
        "closed loop, one op per caller, coalesced (latency from the send)".to_string()
    } else {
        format!(
            "closed loop, {} in flight per client (latency from the send)",
            r.pipeline
        )
    };
    println!(
        "load: {which}; {} clients, batch {}, mix {}, {}, store {}{}; {:.1} s measured",
        r.clients,
        r.batch,
        r.mix,
        serde_json::to_string(&r.workload).unwrap_or_default(),
        r.store,
        if r.dry_run { ", dry run" } else { "" },
        r.duration_s
    );
    println!(
        "  {:.0} durable ops/s; {} commits, {} back-pressure waits; {} errors; daemon RSS max {:.0} MiB",
        r.ops_per_sec,
        r.commits,
        r.backpressure_waits,
        r.errors,
        r.daemon_rss_max_bytes as f64 / (1 << 20) as f64
    );
    let rows = r.kinds.iter().map(|(k, s)| (k.to_string(), s)).chain(
        r.open_loop
            .then(|| ("submit, from the send".to_string(), &r.submit_uncorrected)),
    );
    for (name, s) in rows {
        println!(
            "  {name:<22} {:>9.0} req/s  p50 {:8.3} ms  p99 {:8.3} ms  p99.9 {:8.3} ms  max {:8.1} ms",
            s.requests_per_sec, s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms
        );
    }
    if let Some(w) = &r.log_write {
        println!(
            "  daemon log writes      {:>9.0} /s     p50 {:8.3} ms  p99 {:8.3} ms  (write + flush of a batch, within 2x)  max {:8.1} ms",
            w.writes as f64 / r.duration_s.max(1e-9),
            w.p50_ms,
            w.p99_ms,
            w.max_ms
        );
    }
    if let Some(mismatches) = r.mismatches {
        println!(
            "  btrfs-trace: {} extents of the kernel's after dump, {mismatches} mismatches",
            r.extents
        );
    }
}
