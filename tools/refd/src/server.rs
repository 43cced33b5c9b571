//! The server: opens the device and the durable engine, binds the
//! listeners and the metrics endpoint, runs the committer and the barrier
//! reaper, accepts connections (at most `--connections-max`), and stops
//! gracefully: no new connections, every request already read answered,
//! a last commit, exit.

use refd_core::priority::{ReschedTick, TickPoker};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::DelayedRefStore;
use refd_durable::codec::record::SUBMIT_RECORD_OVERHEAD_BYTES_MAX;
use refd_durable::codec::OP_RECORD_BYTES_MAX;
use refd_durable::{CommitPolicy, DurableEngine, OpenOptions, RecoveryInfo, ServiceOptions};
use refd_ioring::log::LogConfig;
use refd_proto::{
    encode_reply, Direction, ErrorBody, ErrorCode, FrameDecoder, HelloReply, Reply, OP_BYTES,
    SUBMIT_FIXED_BYTES, VERSION,
};

use crate::barrier::Barriers;
use crate::config::{ServeConfig, StoreImpl, BARRIERS_PER_SESSION_MAX, LOG_BATCH_BYTES_MAX};
use crate::device::{open_device, Dev};
use crate::listen::{Listener, Stream};
use crate::metrics::Metrics;

/// How often accept loops look at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(200);
/// How long a stopping server waits for its connections to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The device cannot be served.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// Mount and recovery failed.
    #[error("open {device}: {source}")]
    Open {
        /// Device.
        device: String,
        /// Cause.
        source: Box<refd_durable::OpenError>,
    },
    /// The commit of the replayed log failed.
    #[error("commit the replayed log of {device}: {source}{}", full_hint(source))]
    Replay {
        /// Device.
        device: String,
        /// Cause.
        source: Box<refd_durable::CommitError>,
    },
    /// A listener could not be bound.
    #[error("listen {0}")]
    Listen(String),
    /// The engine failed; what was acknowledged is on the device, the log
    /// replays the rest at the next start.
    #[error("engine failed: {0}")]
    Failed(refd_durable::Failure),
}

/// What every connection shares.
#[derive(Debug)]
pub struct Shared<D: DelayedRefStore> {
    /// The engine.
    pub engine: DurableEngine<Dev, D>,
    /// The configuration.
    pub config: ServeConfig,
    /// Device path.
    pub device: String,
    /// Random per start.
    pub server_id: u64,
    /// Most ops in one SUBMIT.
    pub submit_ops_max: u32,
    /// Seq barrier leases.
    pub barriers: Barriers,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Rate limit of the refused-head WARN lines.
    pub quarantine_log: Arc<Mutex<QuarantineLog>>,
    /// What recovery did.
    pub recovery: RecoveryInfo,
    /// When the server started.
    pub started: Instant,
    /// Real-time CPU time left to the readers serving LOOKUPs.
    pub lookup_rt: crate::sched::RtBudget,
    /// Keeps the reschedule tick going while requests come
    /// ([`RESCHED_TICK_LINGER`] after the last).
    pub resched_poker: Option<TickPoker>,
    stopping: AtomicBool,
    connections: AtomicUsize,
    /// Connections over the bound being answered `BUSY` now, each on a
    /// thread of its own (at most [`REFUSING_MAX`]).
    refusing: AtomicUsize,
    stop_signal: (Mutex<bool>, Condvar),
}

impl<D: DelayedRefStore> Shared<D> {
    /// The server is stopping: no new connection, no new request.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Connections served now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The HELLO reply.
    pub fn hello(&self) -> HelloReply {
        HelloReply {
            version: VERSION,
            body_bytes_max: self.config.frame_bytes_max,
            submit_ops_max: self.submit_ops_max,
            in_flight_max: self.config.in_flight_max,
            fs_id: self.engine.fs_id().0,
            generation: self.engine.generation(),
            server_id: self.server_id,
            barrier_lease_ms: self.config.barrier_lease_ms,
            session_replies_kept: refd_durable::service::SESSION_REPLIES_KEPT_DEFAULT as u32,
        }
    }

    /// Asks the server to stop (what SIGTERM does).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let (m, cv) = &self.stop_signal;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn wait_for_stop(&self) {
        let (m, cv) = &self.stop_signal;
        let mut stopped = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*stopped {
            stopped = cv.wait(stopped).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn refresh_metrics(&self) {
        let m = &self.metrics;
        let e = &self.engine;
        let log = e.log();
        m.pending_ops.set(e.pending_ops() as i64);
        m.heads_held.set(e.heads_held() as i64);
        let space = e.node_space();
        m.node_region_nodes.set(space.region_nodes as i64);
        m.node_region_free_nodes.set(space.free_nodes as i64);
        m.node_region_reserved_nodes
            .set(space.reserved_nodes as i64);
        m.node_region_tree_nodes.set(space.tree_nodes as i64);
        m.node_region_bitmap_run_nodes
            .set(space.bitmap_run_nodes as i64);
        m.node_region_spare_nodes.set(space.spare_nodes as i64);
        m.node_region_no_spare_window
            .set(i64::from(space.no_spare_window));
        m.log_used_bytes.set(log.used_bytes() as i64);
        m.log_bytes.set(log.log_bytes() as i64);
        m.log_fill
            .set(log.used_bytes() as f64 / log.log_bytes().max(1) as f64);
        m.log_write_seconds.set(log.stats().write_latency);
        m.cache_extents.set(e.cached_extents().len() as i64);
        let cache = e.btree().cache_stats();
        m.node_cache(cache.hits, cache.misses);
        let service = e.service_stats();
        m.sessions.set(service.sessions as i64);
        m.freed_kept.set(service.freed_extents as i64);
        m.barriers.set(self.barriers.held() as i64);
        m.connections.set(self.connections() as i64);
        m.generation.set(e.generation() as i64);
        m.extents.set(e.extents() as i64);
        m.process();
        m.failed.set(i64::from(e.failure().is_some()));
    }
}

/// A running server (any store), for `main` and for tests.
pub trait Running: Send + Sync {
    /// Asks it to stop.
    fn stop(&self);
    /// A function that asks it to stop, for another thread (signals).
    fn stop_handle(&self) -> Arc<dyn Fn() + Send + Sync>;
    /// Waits until it stopped; the outcome of its last commit.
    fn wait(self: Box<Self>) -> Result<(), ServeError>;
    /// The addresses it listens on.
    fn addresses(&self) -> Vec<String>;
    /// The metrics address, if any.
    fn metrics_address(&self) -> Option<String>;
    /// The one-line "ready" message.
    fn ready_line(&self) -> String;
}

struct Server<D: DelayedRefStore> {
    shared: Arc<Shared<D>>,
    addresses: Vec<String>,
    metrics_address: Option<String>,
    ready: String,
    threads: Vec<JoinHandle<()>>,
    committer: Option<JoinHandle<Result<refd_durable::CommitterStats, refd_durable::CommitError>>>,
    listeners: Arc<Vec<Listener>>,
    /// Stopped after the last commit.
    resched_tick: Option<ReschedTick>,
}

/// Starts a server with `config`: returns once it is ready (listening).
pub fn start(config: ServeConfig) -> Result<Box<dyn Running>, ServeError> {
    config.check().map_err(ServeError::Config)?;
    match config.store {
        StoreImpl::Lockfree => start_with::<LockFreeStore>(config),
        StoreImpl::Mutex => start_with::<MutexStore>(config),
    }
}

fn start_with<D: DelayedRefStore + Default + 'static>(
    config: ServeConfig,
) -> Result<Box<dyn Running>, ServeError> {
    let device = config.device.display().to_string();
    let opened = open_device(&config.device, config.device_create_bytes)?;
    if config.prefault_mib > 0 {
        refd_alloc::prefault(refd_alloc::prefault_mib_capped(config.prefault_mib) << 20);
    }
    if let Err(e) = refd_core::priority::set_apply_rt_priority(config.apply_rt_priority) {
        tracing::warn!(
            error = %e,
            priority = config.apply_rt_priority,
            "cannot run commits' applies and LOOKUPs at a real-time priority (needs \
             CAP_SYS_NICE); lookups may wait for a preempted apply or for a core"
        );
    }
    let resched_tick = start_resched_tick(config.resched_tick, Some(RESCHED_TICK_LINGER));
    let options = engine_options(&config);
    let (engine, recovery) = DurableEngine::<Dev, D>::open_with_store(opened.storage, options)
        .map_err(|source| ServeError::Open {
            device: device.clone(),
            source: Box::new(source),
        })?;
    if let Some(d) = &recovery.dropped {
        tracing::warn!(
            mode = %recovery.replay.mode,
            first_lsn = d.dropped_first_lsn,
            last_lsn = d.dropped_last_lsn,
            batches = d.dropped_batches,
            ops = d.dropped_ops,
            "recovery mode dropped damaged log batches (recorded in the superblock): {recovery}"
        );
    }
    if recovery.bitmap_spare_nodes == 0 {
        tracing::warn!(
            "the node region has no spare window for the free-space bitmap run (fragmented \
             before spares existed): commits place it first fit and may fail with NoSpace \
             until a released run becomes a spare: {recovery}"
        );
    }
    if let Some((old, new)) = recovery.node_region_grown {
        tracing::info!(
            old_bytes = old,
            new_bytes = new,
            "node region grown to the device's end (--grow)"
        );
    } else if recovery.device_growable_bytes > 0 {
        tracing::warn!(
            unused_bytes = recovery.device_growable_bytes,
            "the device is larger than its layout: start once with --grow to use the rest"
        );
    }
    // The replayed log is committed before serving, as a btrfs mount
    // commits its log replay: a daemon that crashes again before its first
    // interval commit (a crash loop) does not replay an ever longer log.
    let replay_commit = if recovery.ops_replayed > 0 {
        tracing::info!(
            ops = recovery.ops_replayed,
            "committing the replayed log before serving"
        );
        let t = Instant::now();
        let s = engine.commit().map_err(|source| ServeError::Replay {
            device: device.clone(),
            source: Box::new(source),
        })?;
        Some((s.generation, t.elapsed()))
    } else {
        None
    };
    let record_ops =
        (engine.log().record_bytes_max() - SUBMIT_RECORD_OVERHEAD_BYTES_MAX) / OP_RECORD_BYTES_MAX;
    let frame_ops = (config.frame_bytes_max as usize - SUBMIT_FIXED_BYTES) / OP_BYTES;
    let submit_ops_max = record_ops.min(frame_ops).min(u32::MAX as usize) as u32;
    let listeners: Vec<Listener> = config
        .listen
        .iter()
        .map(Listener::bind)
        .collect::<Result<_, _>>()
        .map_err(ServeError::Listen)?;
    let metrics_listener = match config.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|e| ServeError::Listen(format!("metrics {addr}: {e}")))?,
        ),
        None => None,
    };
    let server_id = random_u64();
    let metrics = Arc::new(Metrics::new());
    let quarantine_log = Arc::new(Mutex::new(QuarantineLog {
        second: Instant::now(),
        logged: 0,
        suppressed: 0,
    }));
    {
        let m = Arc::clone(&metrics);
        let quarantine_log = Arc::clone(&quarantine_log);
        engine.set_commit_hook(move |s| {
            m.commit(s);
            let us = |d: Duration| d.as_micros() as u64;
            let p = &s.phases;
            tracing::debug!(
                generation = s.generation,
                ops = s.ops,
                total_us = us(p.total),
                freeze_us = us(p.freeze),
                items_us = us(p.items),
                run_us = us(p.run),
                diff_us = us(p.diff),
                apply_us = us(p.apply),
                write_us = us(p.write),
                superblock_us = us(p.superblock),
                nodes_written = s.nodes_written,
                "commit"
            );
            log_quarantined(&s.core, &quarantine_log);
        });
    }
    let shared = Arc::new(Shared {
        engine,
        device: device.clone(),
        server_id,
        submit_ops_max,
        barriers: Barriers::new(
            Duration::from_millis(u64::from(config.barrier_lease_ms)),
            BARRIERS_PER_SESSION_MAX,
            random_u64(),
        ),
        metrics,
        quarantine_log,
        recovery,
        started: Instant::now(),
        lookup_rt: crate::sched::RtBudget::new(config.lookup_rt_per_s),
        resched_poker: resched_tick.as_ref().map(ReschedTick::poker),
        stopping: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        refusing: AtomicUsize::new(0),
        stop_signal: (Mutex::new(false), Condvar::new()),
        config,
    });
    let mut threads = Vec::new();
    let committer = {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("refd-committer".into())
            .spawn(move || s.engine.run_committer())
            .map_err(|e| ServeError::Config(format!("start the committer: {e}")))?
    };
    threads.push(spawn("refd-reaper", {
        let s = Arc::clone(&shared);
        move || reap(&s)
    })?);
    let metrics_address = match metrics_listener {
        Some(l) => {
            let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let s = Arc::clone(&shared);
            let m = Arc::clone(&shared.metrics);
            // Serves until the process exits (not joined).
            spawn("refd-metrics", move || {
                crate::metrics::serve(l, m, move || s.refresh_metrics())
            })?;
            Some(addr)
        }
        None => None,
    };
    let listeners = Arc::new(listeners);
    for i in 0..listeners.len() {
        let (s, l) = (Arc::clone(&shared), Arc::clone(&listeners));
        threads.push(spawn("refd-accept", move || accept_loop(&s, &l[i]))?);
    }
    let addresses: Vec<String> = listeners.iter().map(Listener::address).collect();
    let r = &shared.recovery;
    let ready = format!(
        "refd ready: device {device} ({}, fs_id {}, store {}), recovered generation {} with {} \
         ops replayed{}, {} held heads, now generation {}; listening on {}{}",
        if opened.created {
            "created and formatted"
        } else {
            "opened"
        },
        crate::stats::hex(&shared.engine.fs_id().0),
        shared.engine.core().store().name(),
        r.superblock_generation,
        r.ops_replayed,
        replay_commit
            .map(|(g, t)| format!(
                " (committed as generation {g} in {:.0} ms)",
                t.as_secs_f64() * 1e3
            ))
            .unwrap_or_default(),
        r.heads_held,
        shared.engine.generation(),
        addresses.join(", "),
        metrics_address
            .as_ref()
            .map(|a| format!("; metrics on http://{a}/metrics"))
            .unwrap_or_default(),
    );
    tracing::info!(
        device = %device,
        created = opened.created,
        ops_replayed = r.ops_replayed,
        generation = shared.engine.generation(),
        listeners = %addresses.join(","),
        "ready"
    );
    Ok(Box::new(Server {
        shared,
        addresses,
        metrics_address,
        ready,
        threads,
        committer: Some(committer),
        listeners,
        resched_tick,
    }))
}

/// How long the reschedule tick goes on after the last request read (an
/// idle daemon does not tick: each wake-up costs its CPU ~23 µs here).
pub const RESCHED_TICK_LINGER: Duration = Duration::from_secs(1);

/// What to do about a replayed log that does not fit the node region.
fn full_hint(e: &refd_durable::CommitError) -> &'static str {
    if e.to_string().contains("is full") {
        " (the node region is full: extend the device, e.g. `truncate -s` a file device, \
         and start once with --grow)"
    } else {
        ""
    }
}

/// Refused heads logged one by one at WARN per second at most (a client
/// that makes commits refuse heads in a loop cannot flood the log); the
/// rest are counted in one line (`not_logged`) within about a second (STATS
/// `quarantine` keeps the newest, metrics count them all).
const QUARANTINE_LOG_PER_S: u32 = 16;

/// What `log_quarantined` logged in the current second.
#[derive(Debug)]
pub struct QuarantineLog {
    second: Instant,
    logged: u32,
    suppressed: u64,
}

impl QuarantineLog {
    /// Starts a new second once the current one is over, first saying how
    /// many refused heads the last one did not log. Called at every commit
    /// that refused heads and by the reaper every quarter second, so that
    /// the count is not held back until the next refusal.
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.second) < Duration::from_secs(1) {
            return;
        }
        if self.suppressed > 0 {
            tracing::warn!(
                not_logged = self.suppressed,
                "more heads were refused by commits than logged (STATS `quarantine` lists the \
                 newest)"
            );
        }
        *self = QuarantineLog {
            second: now,
            logged: 0,
            suppressed: 0,
        };
    }
}

/// A refused head is acknowledged ops that will never be applied: the
/// operator must hear of it even when no client asked for the commit.
fn log_quarantined(report: &refd_core::engine::CommitReport, log: &Mutex<QuarantineLog>) {
    if report.quarantined.is_empty() {
        return;
    }
    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
    l.roll(Instant::now());
    for q in &report.quarantined {
        if l.logged == QUARANTINE_LOG_PER_S {
            l.suppressed += 1;
            continue;
        }
        l.logged += 1;
        tracing::warn!(
            generation = q.generation,
            bytenr = q.head.bytenr,
            error = %q.error,
            "head refused by the commit (quarantined): its ops were not applied"
        );
    }
}

/// Starts the CPUs' reschedule tick every `period` (zero: none), for
/// `linger` after each poke of its poker (`None`: always); refused a
/// real-time priority it ticks at the normal one, and it is left out with
/// a warning if it cannot start at all. Also what `refd-bench load
/// --in-process` starts (always on: its clients do not poke), so that
/// both measure the same scheduling.
pub fn start_resched_tick(period: Duration, linger: Option<Duration>) -> Option<ReschedTick> {
    if period.is_zero() {
        return None;
    }
    match ReschedTick::start(period, 1, linger) {
        Ok(t) => {
            if t.is_real_time() {
                tracing::info!(
                    cpus = t.cpus().len(),
                    period_us = period.as_micros() as u64,
                    "reschedule tick on every CPU at SCHED_FIFO priority 1"
                );
            } else {
                tracing::warn!(
                    cpus = t.cpus().len(),
                    period_us = period.as_micros() as u64,
                    "reschedule tick at the normal priority (a real-time one needs \
                     CAP_SYS_NICE or RLIMIT_RTPRIO): a woken thread may still wait for \
                     the kernel's scheduler tick"
                );
            }
            Some(t)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no reschedule tick");
            None
        }
    }
}

/// The durable engine's options for `config` (also what `refd-bench load
/// --in-process` opens its engine with, so both measure the same engine).
pub fn engine_options(config: &ServeConfig) -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: LOG_BATCH_BYTES_MAX,
            ..LogConfig::default()
        },
        policy: CommitPolicy {
            interval_ms: config.commit_interval_ms,
            dirty_bytes_trigger: config.dirty_trigger_mib.saturating_mul(1 << 20),
            ..CommitPolicy::default()
        },
        verify: config.verify,
        service: ServiceOptions {
            sessions_max: config.sessions_max,
            freed_kept_max: config.freed_kept_max,
            ..ServiceOptions::default()
        },
        progress: Some(|line| tracing::info!("{line}")),
        recovery_mode: config.recovery_mode.mode(),
        grow: config.grow,
        ..OpenOptions::default()
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ServeError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| ServeError::Config(format!("start thread {name}: {e}")))
}

impl<D: DelayedRefStore + 'static> Running for Server<D> {
    fn stop(&self) {
        self.shared.stop();
    }

    fn stop_handle(&self) -> Arc<dyn Fn() + Send + Sync> {
        let s = Arc::clone(&self.shared);
        Arc::new(move || s.stop())
    }

    fn wait(mut self: Box<Self>) -> Result<(), ServeError> {
        self.shared.wait_for_stop();
        tracing::info!("stopping: no new connections; answering what was received");
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // No new connections: the accept loops are over, so close the
        // listeners now (the unix socket files removed, the listening
        // sockets closed by dropping the last reference), not after the
        // drain. Left open, a client connecting meanwhile sat in the
        // backlog, its HELLO unanswered for the whole drain (up to
        // DRAIN_TIMEOUT), then was reset; now it is refused at once.
        for l in self.listeners.iter() {
            l.remove();
        }
        self.listeners = Arc::new(Vec::new());
        while self.shared.connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.shared.connections() > 0 {
            tracing::warn!(
                connections = self.shared.connections(),
                "connections still open after the drain timeout"
            );
        }
        self.shared.barriers.release_all();
        self.shared.engine.stop_committer();
        let committed = match self.committer.take().map(JoinHandle::join) {
            Some(Ok(r)) => r.map(|_| ()),
            _ => Ok(()),
        };
        let result = committed
            .and_then(|()| {
                // Whatever the committer did not take (a held head whose
                // barrier just went).
                if self.shared.engine.pending_ops() > 0 {
                    self.shared.engine.commit().map(|_| ())
                } else {
                    Ok(())
                }
            })
            .map_err(|e| ServeError::Failed(e.failure().clone()))
            // A failure latched earlier (a commit or log write that failed
            // while serving) is not "everything acknowledged is committed",
            // even when nothing was left to commit at the stop.
            .and_then(|()| match self.shared.engine.failure() {
                Some(f) => Err(ServeError::Failed(f)),
                None => Ok(()),
            });
        match &result {
            Ok(()) => tracing::info!(
                generation = self.shared.engine.superblock().generation,
                "stopped: everything acknowledged is committed"
            ),
            Err(e) => tracing::error!(error = %e, "stopped with a failed engine"),
        }
        drop(self.resched_tick.take());
        result
    }

    fn addresses(&self) -> Vec<String> {
        self.addresses.clone()
    }

    fn metrics_address(&self) -> Option<String> {
        self.metrics_address.clone()
    }

    fn ready_line(&self) -> String {
        self.ready.clone()
    }
}

fn accept_loop<D: DelayedRefStore + 'static>(shared: &Arc<Shared<D>>, listener: &Listener) {
    let requires_token = listener.is_tcp() && shared.config.token.is_some();
    while !shared.stopping() {
        let (stream, peer) = match listener.accept_timeout(ACCEPT_POLL) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(listener = %listener.address(), error = %e, "accept failed");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let n = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
        if n > shared.config.connections_max {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.connections_refused.inc();
            refuse_aside(shared, stream);
            continue;
        }
        shared.metrics.connections_accepted.inc();
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("refd-conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                crate::conn::serve(Arc::clone(&s), stream, peer, requires_token);
                s.connections.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }
}

/// Connections over the bound being refused at once, each on its own
/// thread waiting up to a second for the first frame; past this many, one
/// more is answered at once (see [`refuse_aside`]).
const REFUSING_MAX: usize = 256;

/// Answers a connection over the bound with [`refuse`] on a thread of its
/// own, so that the accept loop goes on at once: a refusal waits up to a
/// second for the first frame, and a burst of silent connections would
/// otherwise hold off the accept of every connection behind them (one
/// second each), also once a connection slot is free again. Past
/// [`REFUSING_MAX`] refusals at once, the connection is answered `BUSY`
/// with request id 0 at once, without waiting for its first frame, and
/// closed.
fn refuse_aside<D: DelayedRefStore + 'static>(shared: &Arc<Shared<D>>, mut stream: Stream) {
    let max = shared.config.connections_max;
    if shared.refusing.fetch_add(1, Ordering::AcqRel) >= REFUSING_MAX {
        shared.refusing.fetch_sub(1, Ordering::AcqRel);
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = stream.write_all(&busy_frame(0, max));
        stream.shutdown();
        return;
    }
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("refd-busy".into())
        .stack_size(64 << 10)
        .spawn(move || {
            refuse(stream, max);
            s.refusing.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        shared.refusing.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(error = %e, "cannot start a thread to refuse a connection");
    }
}

/// Tells a connection over the bound why it is closed: `BUSY` as the
/// answer to its HELLO (waited for up to a second).
fn refuse(mut stream: Stream, max: usize) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut decoder = FrameDecoder::expecting(4096, Direction::Request);
    let mut buf = [0u8; 1024];
    let until = Instant::now() + Duration::from_secs(1);
    let mut request_id = 0;
    while Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut input = &buf[..n];
                if let Ok(Some(f)) = decoder.decode_from(&mut input) {
                    request_id = f.header.request_id;
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    let _ = stream.write_all(&busy_frame(request_id, max));
    crate::conn::linger(&mut stream);
    stream.shutdown();
}

/// The `BUSY` error frame answering `request_id`.
fn busy_frame(request_id: u64, max: usize) -> Vec<u8> {
    let body = ErrorBody::new(
        ErrorCode::Busy,
        &format!("{max} connections are served already (--connections-max)"),
    );
    let mut frame = Vec::new();
    encode_reply(request_id, &Reply::Error(body), &mut frame);
    frame
}

/// Releases expired barrier leases and those of evicted sessions, every
/// quarter second, until the server stops; and, when the last commit held
/// more heads than `--held-heads-max`, revokes the lowest barrier (at most
/// one per commit: the next commit runs what it held and says whether the
/// others still hold too many).
///
/// It is also what logs a latched engine failure, once, at ERROR: the
/// failure is found by whichever thread wrote (a log batch, a commit) and
/// every request answers `FAILED` after it, but the operator reads logs.
fn reap<D: DelayedRefStore>(shared: &Shared<D>) {
    let mut revoked_at = 0;
    let mut failure_logged = false;
    while !shared.stopping() {
        std::thread::sleep(Duration::from_millis(250));
        shared
            .quarantine_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .roll(Instant::now());
        if !failure_logged {
            if let Some(f) = shared.engine.failure() {
                failure_logged = true;
                tracing::error!(
                    device = %f.device,
                    operation = %f.operation,
                    offset = ?f.offset,
                    error = %f,
                    "engine failed: nothing more is acknowledged until refd restarts \
                     (reads and STATS still answer)"
                );
            }
        }
        let expired = shared.barriers.expire(Instant::now());
        if expired > 0 {
            tracing::info!(expired, "seq barrier leases expired");
        }
        shared
            .barriers
            .retain_sessions(|session| shared.engine.check_session(session).is_ok());
        let (held, generation) = (shared.engine.heads_held(), shared.engine.generation());
        if held > shared.config.held_heads_max && generation > revoked_at {
            if let Some((barrier, session, seq)) = shared.barriers.revoke_lowest() {
                revoked_at = generation;
                shared.metrics.barriers_revoked.inc();
                tracing::warn!(
                    barrier,
                    session,
                    seq,
                    heads_held = held,
                    max = shared.config.held_heads_max,
                    "seq barrier revoked: commits hold more heads than --held-heads-max"
                );
            }
        }
    }
}

/// A random u64 from the kernel (a time-based value if that fails).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    }) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5eed, |d| d.as_nanos() as u64),
    }
}
