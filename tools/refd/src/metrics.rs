//! Prometheus metrics (text exposition format 0.0.4, encoded by
//! prometheus-client) on a small HTTP endpoint: `GET /metrics`.
//!
//! Counters the server increments as things happen (requests, errors,
//! ops by kind, bytes, back-pressure); gauges and the engine's own
//! counters are read from the engine at each scrape (the engine keeps
//! totals; the difference since the last scrape is added to the
//! counter, so counters never go back).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use refd_ioring::WriteLatency;

/// A label set of one label.
type Label = Vec<(&'static str, String)>;

/// A float gauge.
type FGauge = Gauge<f64, AtomicU64>;

/// Every metric of the daemon.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Ops applied, by action.
    pub ops: Family<Label, Counter>,
    /// SUBMIT batches applied.
    pub batches: Counter,
    /// SUBMITs answered from a session's kept replies.
    pub duplicates: Counter,
    /// Requests, by opcode.
    pub requests: Family<Label, Counter>,
    /// Error frames sent, by code.
    pub errors: Family<Label, Counter>,
    /// Bytes read from clients.
    pub bytes_in: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// Times a connection stopped reading because its replies were not
    /// taken (or not yet durable) fast enough.
    pub backpressure_waits: Counter,
    /// Short LOOKUPs served at the real-time priority (`sched.rs`).
    pub lookup_rt_boosted: Counter,
    /// Short LOOKUPs served at the normal priority because the readers'
    /// real-time budget (`--lookup-rt-ms-per-s`) was spent.
    pub lookup_rt_budget_spent: Counter,
    /// HELLOs with a wrong token.
    pub auth_failures: Counter,
    /// Connections closed for no HELLO within `--hello-timeout-ms`.
    pub hello_timeouts: Counter,
    /// Connections served now.
    pub connections: Gauge,
    /// Connections accepted.
    pub connections_accepted: Counter,
    /// Connections refused (`--connections-max`).
    pub connections_refused: Counter,
    /// Time from reading a SUBMIT to writing its reply (for a durable
    /// SUBMIT: its ack latency inside the daemon).
    pub submit_seconds: Histogram,
    /// Time from reading a LOOKUP to writing its reply (the daemon's part
    /// of a LOOKUP's latency).
    pub lookup_seconds: Histogram,
    /// Commit duration.
    pub commit_seconds: Histogram,
    /// Time in each commit step, summed.
    pub commit_phase_seconds: Family<Label, Counter<f64, AtomicU64>>,
    /// Commits.
    pub commits: Counter,
    /// Ops committed.
    pub commit_ops: Counter,
    /// Heads a commit refused (quarantined): their ops were not applied.
    pub quarantined_heads: Counter,
    /// Seq barriers revoked because commits held too many heads.
    pub barriers_revoked: Counter,
    /// Dirty B+tree node bytes the last commit pinned.
    pub commit_dirty_bytes: Gauge,
    /// Engine gauges, read at each scrape.
    pub pending_ops: Gauge,
    /// Heads held back by a seq barrier.
    pub heads_held: Gauge,
    /// Nodes of the node region.
    pub node_region_nodes: Gauge,
    /// Free nodes of the node region.
    pub node_region_free_nodes: Gauge,
    /// Nodes the reservations of the uncommitted ops could need.
    pub node_region_reserved_nodes: Gauge,
    /// Nodes of the extent tree (the working tree).
    pub node_region_tree_nodes: Gauge,
    /// Nodes of a free-space bitmap run (`K`, the size of a spare window).
    pub node_region_bitmap_run_nodes: Gauge,
    /// Nodes of the spare windows kept for the next bitmap runs.
    pub node_region_spare_nodes: Gauge,
    /// 1 while the "no spare window" fallback is in force.
    pub node_region_no_spare_window: Gauge,
    /// Log bytes in use.
    pub log_used_bytes: Gauge,
    /// Log region size.
    pub log_bytes: Gauge,
    /// Fill of the log (0..1).
    pub log_fill: FGauge,
    /// Log batch write times, copied from the log at each scrape.
    pub log_write_seconds: LogWriteSeconds,
    /// Extents in the in-memory cache.
    pub cache_extents: Gauge,
    /// B+tree node cache hits.
    pub node_cache_hits: Counter,
    /// B+tree node cache misses (node reads).
    pub node_cache_misses: Counter,
    /// Sessions kept.
    pub sessions: Gauge,
    /// Barriers held.
    pub barriers: Gauge,
    /// Freed extents kept on the device.
    pub freed_kept: Gauge,
    /// Last committed generation.
    pub generation: Gauge,
    /// Extent items in the committed tree.
    pub extents: Gauge,
    /// 1 once the engine latched an I/O failure.
    pub failed: Gauge,
    /// The daemon's resident memory (`/proc/self/statm`).
    pub resident_bytes: Gauge,
    last_hits: AtomicU64,
    last_misses: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("refd")),
            ops: Family::default(),
            batches: Counter::default(),
            duplicates: Counter::default(),
            requests: Family::default(),
            errors: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            backpressure_waits: Counter::default(),
            lookup_rt_boosted: Counter::default(),
            lookup_rt_budget_spent: Counter::default(),
            auth_failures: Counter::default(),
            hello_timeouts: Counter::default(),
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            submit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            lookup_seconds: Histogram::new(exponential_buckets(0.000_005, 2.0, 16)),
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            commit_phase_seconds: Family::default(),
            commits: Counter::default(),
            commit_ops: Counter::default(),
            quarantined_heads: Counter::default(),
            barriers_revoked: Counter::default(),
            commit_dirty_bytes: Gauge::default(),
            pending_ops: Gauge::default(),
            heads_held: Gauge::default(),
            node_region_nodes: Gauge::default(),
            node_region_free_nodes: Gauge::default(),
            node_region_reserved_nodes: Gauge::default(),
            node_region_tree_nodes: Gauge::default(),
            node_region_bitmap_run_nodes: Gauge::default(),
            node_region_spare_nodes: Gauge::default(),
            node_region_no_spare_window: Gauge::default(),
            log_used_bytes: Gauge::default(),
            log_bytes: Gauge::default(),
            log_fill: FGauge::default(),
            log_write_seconds: LogWriteSeconds::default(),
            cache_extents: Gauge::default(),
            node_cache_hits: Counter::default(),
            node_cache_misses: Counter::default(),
            sessions: Gauge::default(),
            barriers: Gauge::default(),
            freed_kept: Gauge::default(),
            generation: Gauge::default(),
            extents: Gauge::default(),
            failed: Gauge::default(),
            resident_bytes: Gauge::default(),
            last_hits: AtomicU64::new(0),
            last_misses: AtomicU64::new(0),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register("ingest_ops", "Ops applied, by action", m.ops.clone());
            r.register(
                "submit_batches",
                "SUBMIT batches applied",
                m.batches.clone(),
            );
            r.register(
                "submit_duplicates",
                "SUBMITs answered from a session's kept replies (not applied again)",
                m.duplicates.clone(),
            );
            r.register("requests", "Requests, by opcode", m.requests.clone());
            r.register("errors", "Error frames sent, by code", m.errors.clone());
            r.register("bytes_in", "Bytes read from clients", m.bytes_in.clone());
            r.register("bytes_out", "Bytes written to clients", m.bytes_out.clone());
            r.register(
                "backpressure_waits",
                "Times a connection stopped reading until its replies went out",
                m.backpressure_waits.clone(),
            );
            r.register(
                "lookup_rt_boosted",
                "Short LOOKUPs served at the real-time priority",
                m.lookup_rt_boosted.clone(),
            );
            r.register(
                "lookup_rt_budget_spent",
                "Short LOOKUPs served at the normal priority because the real-time budget was spent",
                m.lookup_rt_budget_spent.clone(),
            );
            r.register(
                "auth_failures",
                "HELLOs with a wrong or missing token",
                m.auth_failures.clone(),
            );
            r.register(
                "hello_timeouts",
                "Connections closed for no HELLO within --hello-timeout-ms",
                m.hello_timeouts.clone(),
            );
            r.register(
                "connections",
                "Connections served now",
                m.connections.clone(),
            );
            r.register(
                "connections_accepted",
                "Connections accepted",
                m.connections_accepted.clone(),
            );
            r.register(
                "connections_refused",
                "Connections refused at --connections-max",
                m.connections_refused.clone(),
            );
            r.register(
                "submit_seconds",
                "Time from reading a SUBMIT to writing its reply",
                m.submit_seconds.clone(),
            );
            r.register(
                "lookup_seconds",
                "Time from reading a LOOKUP to writing its reply",
                m.lookup_seconds.clone(),
            );
            r.register(
                "commit_seconds",
                "Commit duration",
                m.commit_seconds.clone(),
            );
            r.register(
                "commit_phase_seconds",
                "Time in each commit step",
                m.commit_phase_seconds.clone(),
            );
            r.register("commits", "Commits", m.commits.clone());
            r.register("commit_ops", "Ops committed", m.commit_ops.clone());
            r.register(
                "quarantined_heads",
                "Heads commits refused (quarantined): their ops were not applied",
                m.quarantined_heads.clone(),
            );
            r.register(
                "barriers_revoked",
                "Seq barriers revoked because commits held more heads than --held-heads-max",
                m.barriers_revoked.clone(),
            );
            r.register(
                "commit_dirty_bytes",
                "Dirty B+tree node bytes the last commit pinned",
                m.commit_dirty_bytes.clone(),
            );
            r.register(
                "pending_ops",
                "Ops added since the last commit's cut",
                m.pending_ops.clone(),
            );
            r.register(
                "heads_held",
                "Heads held back by a seq barrier",
                m.heads_held.clone(),
            );
            r.register(
                "node_region_nodes",
                "Nodes (16 KiB) of the node region",
                m.node_region_nodes.clone(),
            );
            r.register(
                "node_region_free_nodes",
                "Free nodes of the node region",
                m.node_region_free_nodes.clone(),
            );
            r.register(
                "node_region_reserved_nodes",
                "Nodes the commits of the acknowledged, uncommitted ops could need (the reservation)",
                m.node_region_reserved_nodes.clone(),
            );
            r.register(
                "node_region_tree_nodes",
                "Nodes of the extent tree",
                m.node_region_tree_nodes.clone(),
            );
            r.register(
                "node_region_bitmap_run_nodes",
                "Nodes of a free-space bitmap run, the size of each spare window",
                m.node_region_bitmap_run_nodes.clone(),
            );
            r.register(
                "node_region_spare_nodes",
                "Nodes of the spare windows kept for the next bitmap runs",
                m.node_region_spare_nodes.clone(),
            );
            r.register(
                "node_region_no_spare_window",
                "1 while no spare window is left: bitmap runs go first fit and may fail with NoSpace",
                m.node_region_no_spare_window.clone(),
            );
            r.register(
                "log_used_bytes",
                "Ref log bytes in use",
                m.log_used_bytes.clone(),
            );
            r.register("log_bytes", "Ref log region size", m.log_bytes.clone());
            r.register("log_fill_ratio", "Ref log fill", m.log_fill.clone());
            r.register(
                "log_write_seconds",
                "Time of each ref log batch write and its flush",
                m.log_write_seconds.clone(),
            );
            r.register(
                "cache_extents",
                "Extents in the in-memory cache",
                m.cache_extents.clone(),
            );
            r.register(
                "node_cache_hits",
                "B+tree node cache hits",
                m.node_cache_hits.clone(),
            );
            r.register(
                "node_cache_misses",
                "B+tree node cache misses",
                m.node_cache_misses.clone(),
            );
            r.register("sessions", "Client sessions kept", m.sessions.clone());
            r.register(
                "barriers",
                "Seq barriers held for clients",
                m.barriers.clone(),
            );
            r.register(
                "freed_kept_extents",
                "Freed extents kept on the device",
                m.freed_kept.clone(),
            );
            r.register(
                "generation",
                "Last committed generation",
                m.generation.clone(),
            );
            r.register(
                "extents",
                "Extent items in the committed extent tree",
                m.extents.clone(),
            );
            r.register(
                "failed",
                "1 once an I/O failure latched the engine",
                m.failed.clone(),
            );
            r.register(
                "resident_memory_bytes",
                "Resident memory of the daemon",
                m.resident_bytes.clone(),
            );
        }
        m
    }

    /// Sets the gauges read from the process itself.
    pub fn process(&self) {
        if let Some(bytes) = resident_bytes(None) {
            self.resident_bytes.set(bytes as i64);
        }
    }

    /// Counts one request of `opcode`.
    pub fn request(&self, opcode: &'static str) {
        self.requests
            .get_or_create(&vec![("opcode", opcode.to_string())])
            .inc();
    }

    /// Counts one error frame of `code`.
    pub fn error(&self, code: &'static str) {
        self.errors
            .get_or_create(&vec![("code", code.to_string())])
            .inc();
    }

    /// Counts `n` ops of `action`.
    pub fn ops(&self, action: &'static str, n: u64) {
        self.ops
            .get_or_create(&vec![("action", action.to_string())])
            .inc_by(n);
    }

    /// One commit's duration and steps.
    pub fn commit(&self, summary: &refd_durable::CommitSummary) {
        let p = &summary.phases;
        self.commit_seconds.observe(p.total.as_secs_f64());
        self.commits.inc();
        self.commit_ops.inc_by(summary.ops);
        self.quarantined_heads
            .inc_by(summary.core.quarantined.len() as u64);
        self.commit_dirty_bytes
            .set(i64::try_from(summary.dirty_bytes).unwrap_or(i64::MAX));
        for (name, d) in [
            ("freeze", p.freeze),
            ("items", p.items),
            ("run", p.run),
            ("diff", p.diff),
            ("apply", p.apply),
            ("write", p.write),
            ("superblock", p.superblock),
        ] {
            self.commit_phase_seconds
                .get_or_create(&vec![("phase", name.to_string())])
                .inc_by(d.as_secs_f64());
        }
    }

    /// The node cache's totals (counters get the difference).
    pub fn node_cache(&self, hits: u64, misses: u64) {
        let dh = hits.saturating_sub(self.last_hits.swap(hits, Ordering::Relaxed));
        let dm = misses.saturating_sub(self.last_misses.swap(misses, Ordering::Relaxed));
        self.node_cache_hits.inc_by(dh);
        self.node_cache_misses.inc_by(dm);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }
}

/// A histogram kept by the ref log itself ([`WriteLatency`]: power-of-two
/// microsecond buckets) and exposed as it is at each scrape, instead of
/// observing every write twice.
#[derive(Debug, Clone, Default)]
pub struct LogWriteSeconds(Arc<Mutex<WriteLatency>>);

impl LogWriteSeconds {
    /// The log's histogram now.
    pub fn set(&self, latency: WriteLatency) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = latency;
    }
}

impl TypedMetric for LogWriteSeconds {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LogWriteSeconds {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let l = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Per-bucket counts with each bucket's upper bound in seconds; the
        // last bucket is unbounded (+Inf), as the format requires.
        let buckets: Vec<(f64, u64)> = l
            .counts
            .iter()
            .enumerate()
            .map(|(i, &c)| match WriteLatency::bucket_upper_us(i) {
                u64::MAX => (f64::INFINITY, c),
                us => (us as f64 * 1e-6, c),
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(l.sum_us as f64 * 1e-6, l.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A request must arrive whole within this of the connection's accept.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A response must be taken whole within this.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the endpoint serves at once; one more is closed at once.
const CONNECTIONS_MAX: usize = 8;

/// Serves `GET /metrics` on `listener` until the process exits, calling
/// `refresh` before each rendering. One request per connection, each on
/// a thread of its own (at most `CONNECTIONS_MAX` = 8 at once: more are
/// closed unanswered), bounded in size (8 KiB of request) and in time as
/// a whole (`REQUEST_TIMEOUT` = 2 s to arrive, `RESPONSE_TIMEOUT` = 5 s to be
/// taken), not per read or write. Served one at a time with per-read
/// timeouts, a peer trickling a byte now and then held the endpoint, and
/// every scrape queued behind it, for as long as it went on; with the
/// deadlines alone, a few such peers in turn still held a scrape for
/// seconds each.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
) {
    let refresh = Arc::new(refresh);
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(s) = stream else { continue };
        if active.fetch_add(1, Ordering::AcqRel) >= CONNECTIONS_MAX {
            active.fetch_sub(1, Ordering::AcqRel);
            continue; // dropped: closed
        }
        let (metrics, refresh, done) = (
            Arc::clone(&metrics),
            Arc::clone(&refresh),
            Arc::clone(&active),
        );
        let spawned = std::thread::Builder::new()
            .name("refd-metrics-c".into())
            .stack_size(256 << 10)
            .spawn(move || {
                serve_one(s, &metrics, &*refresh);
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Answers one connection's request.
fn serve_one(mut s: TcpStream, metrics: &Metrics, refresh: &dyn Fn()) {
    let _ = s.set_write_timeout(Some(RESPONSE_TIMEOUT));
    let response = match read_request_line(&mut s, Instant::now() + REQUEST_TIMEOUT) {
        Some(line) if line.starts_with("GET /metrics") => {
            refresh();
            let body = metrics.render();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; \
                 charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        Some(_) => {
            let body = "refd metrics: GET /metrics\n";
            format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
        }
        None => return,
    };
    let mut s = crate::listen::Stream::Tcp(s);
    let _ = crate::conn::write_frame(&mut s, response.as_bytes(), RESPONSE_TIMEOUT);
}

/// The request line, reading at most 8 KiB of headers until `deadline`.
fn read_request_line(s: &mut TcpStream, deadline: Instant) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return None;
        }
        let n = match s.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.ok()?,
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines().next().map(str::to_string)
}

/// The resident memory of process `pid` (`None`: this one):
/// `/proc/PID/statm`'s second field, in pages. `None` where that file
/// cannot be read (no such process, no `/proc`).
pub fn resident_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/statm"),
        None => "/proc/self/statm".to_string(),
    };
    let statm = std::fs::read_to_string(path).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|&p| p > 0)?)
}
