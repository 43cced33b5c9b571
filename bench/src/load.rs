//! `refd-bench load`: load over the wire against a refd daemon (one it
//! starts, or one at `--connect`), measured as a client sees it.
//!
//! Each client is one connection with its own session and its own share
//! of the extents (a [`Walk`] over every `clients`-th extent, so that
//! every client's ops are valid in any interleaving): a sender thread
//! builds SUBMIT batches and a receiver thread matches replies to them.
//! Closed loop (`--closed`): each client keeps `--pipeline` batches in
//! flight, latency runs from the send. Open loop (`--rate`): batches are
//! scheduled at fixed intervals and latency runs from the scheduled start,
//! not from the send, so a stall is charged to every batch that should
//! have gone during it (the coordinated-omission correction of wrk2).
//! `--coalesce` instead runs `--clients` threads that each submit one op
//! at a time through `refd-client`'s coalescing `add`. A lookup thread
//! (`--lookups`) measures single-bytenr LOOKUPs while the load runs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use refd_proto::{
    encode_frame, encode_submit, Direction, FrameDecoder, HelloRequest, LookupRequest, Opcode,
    Reply, Request, WireOp,
};

use crate::spawn::{DaemonSpec, Spawned};
use crate::workload::{Walk, Workload};

/// Arguments of `load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// A running daemon's address (unix:PATH, tcp:HOST:PORT or a path);
    /// without it a daemon is started (see --device, --refd).
    #[arg(long)]
    pub connect: Option<String>,
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
    /// Open loop at this many ops per second in all (0: closed loop).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Closed loop (the default without --rate).
    #[arg(long)]
    pub closed: bool,
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
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object (no progress lines).
    #[arg(long)]
    pub json: bool,
}

/// Open loop: most SUBMITs one client keeps unanswered.
const OPEN_LOOP_IN_FLIGHT_MAX: usize = 1024;

/// What `load` measured.
#[derive(Debug, serde::Serialize)]
pub struct LoadReport {
    /// Open loop (latency from the scheduled start).
    pub open_loop: bool,
    /// Requested ops/s (open loop).
    pub rate: f64,
    /// Clients.
    pub clients: usize,
    /// Ops per SUBMIT.
    pub batch: usize,
    /// Batches in flight per client (closed loop).
    pub pipeline: usize,
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
    /// SUBMIT latency.
    pub p50_ms: f64,
    /// SUBMIT latency.
    pub p99_ms: f64,
    /// SUBMIT latency.
    pub p999_ms: f64,
    /// SUBMIT latency.
    pub max_ms: f64,
    /// Acknowledged ops in each whole second.
    pub ops_by_second: Vec<u64>,
    /// LOOKUPs measured.
    pub lookups: u64,
    /// LOOKUP latency.
    pub lookup_p50_ms: f64,
    /// LOOKUP latency.
    pub lookup_p99_ms: f64,
    /// LOOKUP latency.
    pub lookup_max_ms: f64,
    /// Error replies.
    pub errors: u64,
    /// Largest resident memory of the daemon started (0: not started).
    pub daemon_rss_max_bytes: u64,
    /// The daemon's store.
    pub store: String,
    /// Workload.
    pub workload: Workload,
    /// Extents.
    pub extents: u64,
    /// The daemon ran with --dry-run.
    pub dry_run: bool,
    /// Daemon exit status after SIGTERM (started daemons).
    pub daemon_exit: Option<i32>,
}

/// Shared counters of a run.
#[derive(Debug)]
struct Tally {
    measuring: AtomicBool,
    stop: AtomicBool,
    ops: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Acknowledged ops per second since the start of measuring.
    by_second: Mutex<Vec<u64>>,
    start: Mutex<Option<Instant>>,
    latency: Mutex<Histogram<u64>>,
    /// SUBMIT latencies since the last progress line.
    interval: Mutex<Histogram<u64>>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            by_second: Mutex::new(Vec::new()),
            start: Mutex::new(None),
            latency: Mutex::new(histogram()),
            interval: Mutex::new(histogram()),
        }
    }

    fn acked(&self, ops: u64, latency: Duration, local: &mut Histogram<u64>) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        self.ops.fetch_add(ops, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let ns = latency.as_nanos().max(1) as u64;
        let _ = local.record(ns);
        let _ = self
            .interval
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(ns);
        if let Some(start) = *self.start.lock().unwrap_or_else(|e| e.into_inner()) {
            let s = start.elapsed().as_secs() as usize;
            let mut b = self.by_second.lock().unwrap_or_else(|e| e.into_inner());
            if b.len() <= s {
                b.resize(s + 1, 0);
            }
            b[s] += ops;
        }
    }

    fn merge(&self, local: &Histogram<u64>) {
        let _ = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(local);
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

/// A raw protocol connection: HELLO done.
struct Conn {
    stream: UnixStream,
    decoder: FrameDecoder,
    rest: Vec<u8>,
    buf: Vec<u8>,
}

impl Conn {
    fn open(socket: &std::path::Path) -> Result<(Conn, refd_proto::HelloReply), String> {
        let stream =
            UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        let mut c = Conn {
            stream,
            decoder: FrameDecoder::expecting(refd_proto::BODY_BYTES_MAX_DEFAULT, Direction::Reply),
            rest: Vec::new(),
            buf: vec![0; 256 << 10],
        };
        let hello = Request::Hello(HelloRequest {
            version_min: 1,
            version_max: 1,
            token: Vec::new(),
            name: "refd-bench".into(),
        });
        match c.call(0, &hello)? {
            Reply::Hello(h) => Ok((c, h)),
            other => Err(format!("HELLO: {other:?}")),
        }
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

/// Runs `load`.
pub fn run(a: &LoadArgs) -> Result<LoadReport, String> {
    if a.clients == 0 || a.batch == 0 || a.pipeline == 0 {
        return Err("--clients, --batch and --pipeline must be at least 1".into());
    }
    if !matches!(a.workload, Workload::Uniform | Workload::Zipf) {
        return Err("load runs the uniform or zipf workload (the others come later)".into());
    }
    if a.in_process {
        return in_process(a);
    }
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
                .collect(),
            quiet: a.json,
        })?),
    };
    let socket = match (&a.connect, &spawned) {
        (Some(addr), _) => PathBuf::from(addr.strip_prefix("unix:").unwrap_or(addr)),
        (None, Some(s)) => s.socket().to_path_buf(),
        (None, None) => unreachable!(),
    };
    let result = drive(a, &socket);
    let rss = spawned
        .as_ref()
        .map_or(0, |s| s.rss_max.load(Ordering::Relaxed));
    let exit = spawned.map(Spawned::stop).and_then(|s| s);
    let mut report = result?;
    report.daemon_rss_max_bytes = rss;
    report.daemon_exit = exit;
    Ok(report)
}

fn drive(a: &LoadArgs, socket: &std::path::Path) -> Result<LoadReport, String> {
    let tally = Arc::new(Tally::new());
    let open_loop = a.rate > 0.0 && !a.closed;
    let mut threads = Vec::new();
    for client in 0..a.clients {
        let (a, socket, tally) = (a.clone(), socket.to_path_buf(), Arc::clone(&tally));
        threads.push(std::thread::spawn(move || {
            if a.coalesce {
                coalescing_client(&a, &socket, client, &tally)
            } else {
                batch_client(&a, &socket, client, &tally, open_loop)
            }
        }));
    }
    let lookup = (a.lookups > 0).then(|| {
        let (a, socket, tally) = (a.clone(), socket.to_path_buf(), Arc::clone(&tally));
        std::thread::spawn(move || lookup_client(&a, &socket, &tally))
    });
    measure(a, Some(socket), tally, threads, lookup, open_loop)
}

type Clients = Vec<std::thread::JoinHandle<Result<(), String>>>;

/// `, N commits, M waits` since the last call: the daemon's commits and
/// back-pressure waits (connections that stopped reading), from STATS.
fn daemon_progress(c: &mut Conn, prev: &mut (u64, u64)) -> Option<String> {
    let Reply::Stats(s) = c.call(9, &Request::Stats(refd_proto::StatsRequest)).ok()? else {
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(&s.json).ok()?;
    let commits = v["commits"]["count"].as_u64()?;
    let waits =
        v["wire"]["backpressure_waits"].as_u64()? + v["engine"]["throttle_waits"].as_u64()?;
    let rss = v["process"]["resident_bytes"].as_u64().unwrap_or(0);
    let line = format!(
        ", {} commits, {} back-pressure waits, {} pending, daemon RSS {} MiB",
        commits - prev.0,
        waits - prev.1,
        v["engine"]["pending_ops"],
        rss >> 20
    );
    *prev = (commits, waits);
    Some(line)
}

/// Warm-up, the measured time with a progress line per second, then the
/// report from what the clients counted.
fn measure(
    a: &LoadArgs,
    socket: Option<&std::path::Path>,
    tally: Arc<Tally>,
    threads: Clients,
    lookup: Option<std::thread::JoinHandle<Result<Histogram<u64>, String>>>,
    open_loop: bool,
) -> Result<LoadReport, String> {
    std::thread::sleep(Duration::from_secs_f64(a.warmup_s));
    // The daemon's counters for the progress line (a connection of its own).
    let mut stats = match (a.json, socket) {
        (false, Some(s)) => Conn::open(s).ok().map(|(c, _)| (c, (0u64, 0u64))),
        _ => None,
    };
    *tally.start.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    tally.measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let mut last = (0u64, t0);
    while t0.elapsed().as_secs_f64() < a.duration_s {
        std::thread::sleep(Duration::from_millis(1000).min(Duration::from_secs_f64(
            (a.duration_s - t0.elapsed().as_secs_f64()).max(0.001),
        )));
        if !a.json {
            let ops = tally.ops.load(Ordering::Relaxed);
            let now = Instant::now();
            let rate = (ops - last.0) as f64 / (now - last.1).as_secs_f64();
            let h = std::mem::replace(
                &mut *tally.interval.lock().unwrap_or_else(|e| e.into_inner()),
                histogram(),
            );
            let daemon = stats.as_mut().map_or(String::new(), |(c, prev)| {
                daemon_progress(c, prev).unwrap_or_default()
            });
            eprintln!(
                "load: {:5.1} s  {:>10.0} ops/s  SUBMIT p50 {:.2} ms p99 {:.2} ms max {:.1} ms{}  ({} errors)",
                t0.elapsed().as_secs_f64(),
                rate,
                ms(&h, 0.5),
                ms(&h, 0.99),
                h.max() as f64 / 1e6,
                daemon,
                tally.errors.load(Ordering::Relaxed)
            );
            last = (ops, now);
        }
    }
    tally.measuring.store(false, Ordering::SeqCst);
    let measured = t0.elapsed().as_secs_f64();
    tally.stop.store(true, Ordering::SeqCst);
    let mut lookups = histogram();
    for t in threads {
        t.join().map_err(|_| "a client panicked")??;
    }
    if let Some(l) = lookup {
        lookups = l.join().map_err(|_| "the lookup client panicked")??;
    }
    let h = tally.latency.lock().unwrap_or_else(|e| e.into_inner());
    let ops = tally.ops.load(Ordering::Relaxed);
    let mut by_second = tally
        .by_second
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    by_second.truncate(measured as usize);
    Ok(LoadReport {
        open_loop,
        rate: a.rate,
        clients: a.clients,
        batch: if a.coalesce { 1 } else { a.batch },
        pipeline: a.pipeline,
        coalesce: a.coalesce,
        duration_s: measured,
        ops_per_sec: ops as f64 / measured,
        requests_per_sec: tally.requests.load(Ordering::Relaxed) as f64 / measured,
        p50_ms: ms(&h, 0.5),
        p99_ms: ms(&h, 0.99),
        p999_ms: ms(&h, 0.999),
        max_ms: h.max() as f64 / 1e6,
        ops_by_second: by_second,
        lookups: lookups.len(),
        lookup_p50_ms: ms(&lookups, 0.5),
        lookup_p99_ms: ms(&lookups, 0.99),
        lookup_max_ms: lookups.max() as f64 / 1e6,
        errors: tally.errors.load(Ordering::Relaxed),
        daemon_rss_max_bytes: 0,
        store: a.store.clone(),
        workload: a.workload,
        extents: a.extents,
        dry_run: a.dry_run,
        daemon_exit: None,
    })
}

/// In-flight SUBMITs of one client: request id → (start, ops).
#[derive(Debug, Default)]
struct InFlight {
    map: Mutex<HashMap<u64, (Instant, u64)>>,
    freed: Condvar,
}

fn batch_client(
    a: &LoadArgs,
    socket: &std::path::Path,
    client: usize,
    tally: &Arc<Tally>,
    open_loop: bool,
) -> Result<(), String> {
    let (mut conn, hello) = Conn::open(socket)?;
    let session = match conn.call(1, &Request::Register(refd_proto::RegisterRequest))? {
        Reply::Register(r) => r.session_id,
        other => return Err(format!("REGISTER: {other:?}")),
    };
    let batch = a.batch.min(hello.submit_ops_max as usize);
    let reader = conn
        .stream
        .try_clone()
        .map_err(|e| format!("clone socket: {e}"))?;
    let inflight = Arc::new(InFlight::default());
    let receiver = {
        let (tally, inflight) = (Arc::clone(tally), Arc::clone(&inflight));
        let mut rconn = Conn {
            stream: reader,
            decoder: FrameDecoder::expecting(refd_proto::BODY_BYTES_MAX_DEFAULT, Direction::Reply),
            rest: Vec::new(),
            buf: vec![0; 64 << 10],
        };
        std::thread::spawn(move || -> Result<(), String> {
            let mut local = histogram();
            // Until the sender closes, or the daemon stops.
            while let Ok((id, reply)) = rconn.recv() {
                let entry = inflight
                    .map
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                inflight.freed.notify_all();
                let Some((start, ops)) = entry else { continue };
                match reply {
                    Reply::Submit(_) => tally.acked(ops, start.elapsed(), &mut local),
                    _ => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tally.merge(&local);
            Ok(())
        })
    };
    let extents = (a.extents / a.clients as u64).max(1);
    let mut walk = Walk::new(
        a.workload,
        extents,
        a.seed.wrapping_add(client as u64 * 7919),
        a.clients as u64,
        client as u64,
    )
    .ok_or("workload")?;
    let mut ops: Vec<WireOp> = Vec::with_capacity(batch);
    let mut frame = Vec::with_capacity(64 + batch * refd_proto::OP_BYTES);
    // Open loop: this client's share of the rate, one batch every `every`.
    let every = Duration::from_secs_f64(batch as f64 * a.clients as f64 / a.rate.max(1e-9));
    let t0 = Instant::now();
    let mut request: u64 = 0;
    while !tally.stop.load(Ordering::Relaxed) {
        let start = if open_loop {
            let due = t0 + every * request as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            due
        } else {
            Instant::now()
        };
        {
            // Closed loop: the pipeline; open loop: a bound, never reached
            // while the daemon keeps up (latency still runs from `start`).
            let bound = if open_loop {
                OPEN_LOOP_IN_FLIGHT_MAX
            } else {
                a.pipeline
            };
            let mut m = inflight.map.lock().unwrap_or_else(|e| e.into_inner());
            while m.len() >= bound && !tally.stop.load(Ordering::Relaxed) {
                m = inflight
                    .freed
                    .wait_timeout(m, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let start = if open_loop { start } else { Instant::now() };
        request += 1;
        ops.clear();
        ops.extend((0..batch).map(|_| refd::ops::wire(&walk.next_op())));
        frame.clear();
        let id = request + 1;
        encode_frame_submit(id, session, request, &ops, &mut frame);
        inflight
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (start, batch as u64));
        if conn.stream.write_all(&frame).is_err() {
            break;
        }
    }
    // Let the last replies come in, then close.
    let until = Instant::now() + Duration::from_secs(30);
    while !inflight
        .map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty()
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
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
        let mib = match refd_alloc::available_memory_bytes() {
            Some(avail) => a.daemon_prefault_mib.min(((avail / 2) >> 20) as usize),
            None => a.daemon_prefault_mib,
        };
        refd_alloc::prefault(mib << 20);
    }
    let options = refd::server::engine_options(&refd::ServeConfig::default());
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
            let mut local = histogram();
            let mut inflight = std::collections::VecDeque::new();
            let mut ops = Vec::with_capacity(a.batch);
            let mut request = 0u64;
            while !tally.stop.load(Ordering::Relaxed) {
                while inflight.len() >= a.pipeline {
                    let (start, ticket): (Instant, refd_durable::Ticket<_>) =
                        inflight.pop_front().expect("pipeline");
                    ticket.wait().map_err(|e| e.to_string())?;
                    tally.acked(a.batch as u64, start.elapsed(), &mut local);
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
                tally.acked(a.batch as u64, start.elapsed(), &mut local);
            }
            tally.merge(&local);
            Ok(())
        }));
    }
    let mut report = measure(a, None, tally, threads, None, false)?;
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
    socket: &std::path::Path,
    client: usize,
    tally: &Arc<Tally>,
) -> Result<(), String> {
    // One client (and connection) shared by every thread of the run.
    static SHARED: std::sync::OnceLock<Result<refd_client::Client, String>> =
        std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        refd_client::Client::connect(
            &format!("unix:{}", socket.display()),
            refd_client::ClientConfig::default(),
        )
        .map_err(|e| e.to_string())
    });
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
    let mut local = histogram();
    while !tally.stop.load(Ordering::Relaxed) {
        let op = refd::ops::wire(&walk.next_op());
        let start = Instant::now();
        match c.add(op) {
            Ok(_) => tally.acked(1, start.elapsed(), &mut local),
            Err(_) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tally.merge(&local);
    Ok(())
}

fn lookup_client(
    a: &LoadArgs,
    socket: &std::path::Path,
    tally: &Tally,
) -> Result<Histogram<u64>, String> {
    let (mut conn, _) = Conn::open(socket)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed ^ 0x100c);
    let mut h = histogram();
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
        // Extents are 16 KiB apart from 1 GiB (`workload`).
        let bytenr = (1u64 << 30) + rng.gen_range(0..a.extents) * 16384;
        let req = Request::Lookup(LookupRequest::new(vec![bytenr]).map_err(|e| e.to_string())?);
        let start = Instant::now();
        match conn.call(id, &req)? {
            Reply::Lookup(_) => {
                if tally.measuring.load(Ordering::Relaxed) {
                    let _ = h.record(start.elapsed().as_nanos().max(1) as u64);
                }
            }
            _ => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(h)
}
