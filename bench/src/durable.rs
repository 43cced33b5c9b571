//! `refd-bench durable`: durable ingest on a device. Ops go through the
//! durable engine (logged, acknowledged when durable, committed into the
//! on-device B+tree by the engine's own commit policy: interval, pending
//! ops, log space, with back-pressure); measured: durable ops/s (overall
//! and the worst second), ack latency, commits/s and the longest gap
//! between commits, commit time per phase, log and tree bytes written per
//! op, and the device's own durable sequential write rate measured by this
//! tool in the same run.
//!
//! With `--ops N` the ops are generated before timing and dealt to the
//! threads by bytenr; with `--duration-s S` each thread generates its own
//! endless random walk over its share of the extents while it runs (the
//! generator's cost, about 20 ns per op, is inside the measurement).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use refd_core::model::Op;
use refd_durable::{CommitPolicy, DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::{Device, FileAllocation, Storage, UringStorage};

use crate::workload::{deal, generate, Walk, Workload};

/// Size of a device file the benchmark creates.
const DEVICE_BYTES_DEFAULT: u64 = 4 << 30;
/// Block written per durable write when measuring the device.
pub(crate) const PROBE_BLOCK_BYTES: usize = 256 << 10;

/// Arguments of `durable`.
#[derive(Debug, clap::Args)]
pub struct DurableArgs {
    /// Block device or file (created if missing). Its content is destroyed.
    #[arg(long)]
    pub device: PathBuf,
    /// Ingest threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Workload: a generated one, not btrfs-trace (with --duration-s:
    /// uniform or zipf).
    #[arg(long, value_enum, default_value = "uniform")]
    pub workload: Workload,
    /// Distinct extents.
    #[arg(long, default_value_t = 1_000_000)]
    pub extents: u64,
    /// Ops in total, generated before timing (ignored with --duration-s).
    #[arg(long, default_value_t = 4_000_000)]
    pub ops: usize,
    /// Run for this long instead, generating ops while running.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Ops each thread keeps in flight (appended, not yet acknowledged).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// With --duration-s: offer at most this many ops per second in total
    /// (split evenly over the threads; 0: as fast as acks allow).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Commit policy: longest time between commit starts.
    #[arg(long, default_value_t = CommitPolicy::default().interval_ms)]
    pub commit_interval_ms: u64,
    /// Commit policy: most pending ops before a commit starts.
    #[arg(long, default_value_t = CommitPolicy::default().pending_ops_trigger)]
    pub pending_ops_trigger: u64,
    /// Commit policy: target commit length (sets the pending-op trigger
    /// from the measured commit time per op).
    #[arg(long, default_value_t = CommitPolicy::default().commit_target_ms)]
    pub commit_target_ms: u64,
    /// Commit policy: dirty B+tree node bytes one commit is estimated to
    /// pin before a commit starts (MiB; 0: no dirty-bytes trigger).
    #[arg(long, default_value_t = CommitPolicy::default().dirty_bytes_trigger >> 20)]
    pub dirty_trigger_mb: u64,
    /// Bound of the engine's in-memory extent cache (extents).
    #[arg(long, default_value_t = OpenOptions::default().cache_extents_max)]
    pub cache_extents: usize,
    /// The B+tree's node cache (MiB).
    #[arg(long, default_value_t = OpenOptions::default().tree.cache_bytes >> 20)]
    pub node_cache_mb: usize,
    /// With --duration-s: after the run, queue this many more ops with no
    /// commit trigger and time one commit of them alone (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    pub probe_ops: u64,
    /// With --duration-s: at the end, queue this many more ops with no
    /// commit trigger, close the engine and time the recovery that replays
    /// them (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    pub recovery_ops: u64,
    /// Heap touched and freed before the engine opens (MiB; 0: none; at
    /// most half the available memory), so that the first commits reuse
    /// memory the kernel has already faulted in (see
    /// `refd_alloc::prefault`).
    #[arg(long, default_value_t = PREFAULT_MIB_DEFAULT)]
    pub prefault_mib: usize,
    /// RNG seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Default of `--prefault-mib`: about the peak footprint of the default
/// run (1M extents: 512 MiB node cache, the extent cache, two transactions
/// of delayed refs, a commit's items and encodings; RSS 1.3-1.9 GiB).
pub const PREFAULT_MIB_DEFAULT: usize = 2048;

/// What `durable` measured.
#[derive(Debug, serde::Serialize)]
pub struct DurableReport {
    /// Heap prefaulted before the engine opened (MiB: `--prefault-mib`, at
    /// most half the available memory), and how long it took (s; not part
    /// of any figure below).
    pub prefault_mib: usize,
    /// See `prefault_mib`.
    pub prefault_s: f64,
    /// Ops acknowledged.
    pub ops: u64,
    /// Wall time of the ingest (to the last acknowledgement).
    pub ingest_s: f64,
    /// Acknowledged ops per second.
    pub durable_ops_per_sec: f64,
    /// The worst whole second of the run (acknowledged ops in it).
    pub durable_ops_per_sec_min_1s: f64,
    /// Acknowledged ops in each whole second of the run.
    pub acked_by_second: Vec<u64>,
    /// Ack latency p50 (ms).
    pub p50_ack_ms: f64,
    /// Ack latency p99 (ms).
    pub p99_ack_ms: f64,
    /// Ack latency p99.9 (ms).
    pub p999_ack_ms: f64,
    /// Ack latency max (ms).
    pub max_ack_ms: f64,
    /// Commits during the ingest.
    pub commits: u64,
    /// Commits per second of ingest.
    pub commits_per_sec: f64,
    /// Longest time between two commit starts (ms).
    pub commit_gap_ms_max: f64,
    /// Longest time between two commit starts after the first
    /// [`WARMUP`] of ingest (ms): with `--duration-s` on a fresh device the
    /// tree grows from empty to its working size during the first
    /// seconds, and those commits are mostly inserts.
    pub commit_gap_ms_max_after_warmup: f64,
    /// Longest commit (ms).
    pub commit_ms_max: f64,
    /// The longest commit's steps (ms), as `commit_phase_ms_mean`.
    pub commit_longest_phase_ms: [f64; 7],
    /// The longest commit's ops.
    pub commit_longest_ops: u64,
    /// When the longest commit started, in seconds since ingest started
    /// (negative: before, e.g. recovery's).
    pub commit_longest_at_s: f64,
    /// Mean commit (ms).
    pub commit_ms_mean: f64,
    /// Mean ops per commit.
    pub commit_ops_mean: f64,
    /// Mean time per commit step (ms): freeze, items, run, diff, apply,
    /// write, superblock.
    pub commit_phase_ms_mean: [f64; 7],
    /// Measured commit time per op (ns), the commit policy's estimate.
    pub commit_ns_per_op: f64,
    /// The pending-op trigger the policy ended at.
    pub commit_trigger_ops: u64,
    /// Commits started by interval / pending ops / log space.
    pub commits_by_interval_pending_log: [u64; 3],
    /// Commits started by the dirty-bytes trigger.
    pub commits_by_dirty: u64,
    /// The most dirty B+tree node bytes one commit of the ingest pinned.
    pub commit_dirty_bytes_max: u64,
    /// The policy's measured dirty node bytes per op at the end.
    pub commit_dirty_bytes_per_op: u64,
    /// The node cache's clean plus dirty bytes, largest sample (every
    /// 20 ms during the ingest).
    pub node_cache_bytes_max: u64,
    /// The B+tree at the end of the ingest: its nodes × 16 KiB (a walk of
    /// the whole tree, not timed).
    pub tree_bytes: u64,
    /// This process's resident memory, largest sample (every 20 ms
    /// during the ingest; `/proc/self/statm`).
    pub rss_max_bytes: u64,
    /// Log bytes written (batches) per acknowledged op.
    pub log_bytes_per_op: f64,
    /// Log batches written per second (group commits: one durable write
    /// each, one at a time).
    pub log_batches_per_sec: f64,
    /// B+tree bytes written per op.
    pub tree_bytes_per_op: f64,
    /// The device's durable sequential write rate (this run, same tool).
    pub device_durable_mb_per_sec: f64,
    /// Log write rate (MB/s).
    pub log_mb_per_sec: f64,
    /// Extents in the cache at the end.
    pub extents_cached: usize,
    /// The probe (`--probe-ops`): ops in the one commit timed alone.
    pub probe_commit_ops: u64,
    /// ... its heads (extents touched).
    pub probe_commit_heads: usize,
    /// ... its length (ms).
    pub probe_commit_ms: f64,
    /// ... per step (ms): freeze, items, run, diff, apply, write,
    /// superblock.
    pub probe_commit_phase_ms: [f64; 7],
    /// Ops replayed by the timed recovery (`--recovery-ops`).
    pub recovery_ops: usize,
    /// Its `DurableEngine::open` (ms): superblock, cache warm-up, replay.
    pub recovery_ms: f64,
}

/// The device's own durable sequential write rate: 256 KiB durable writes
/// (RWF_DSYNC) for about a second at the end of the device.
pub(crate) fn device_rate(s: &UringStorage) -> Result<f64, String> {
    let size = s.geometry().size_bytes;
    let block = vec![0xA5u8; PROBE_BLOCK_BYTES];
    let blocks = (size / 4 / PROBE_BLOCK_BYTES as u64).max(1);
    let start_at = size - blocks * PROBE_BLOCK_BYTES as u64;
    let t = Instant::now();
    let mut written = 0u64;
    let mut i = 0u64;
    while t.elapsed() < Duration::from_secs(1) {
        s.write_durable(start_at + (i % blocks) * PROBE_BLOCK_BYTES as u64, &block)
            .map_err(|e| e.to_string())?;
        written += PROBE_BLOCK_BYTES as u64;
        i += 1;
    }
    Ok(written as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Where one ingest thread's ops come from.
enum Source<'a> {
    Slice(std::slice::Iter<'a, Op>),
    Walk(Paced),
}

/// A walk until a deadline, at most `rate` ops per second.
struct Paced {
    walk: Walk,
    deadline: Instant,
    start: Instant,
    /// Ops per second of this thread; 0: unpaced.
    rate: f64,
    n: u64,
}

/// Ops between two clock reads of a [`Paced`] source.
const PACE_CHECK_OPS: u64 = 256;

impl Iterator for Source<'_> {
    type Item = Op;
    fn next(&mut self) -> Option<Op> {
        match self {
            Source::Slice(it) => it.next().copied(),
            Source::Walk(p) => {
                if p.n.is_multiple_of(PACE_CHECK_OPS) {
                    let now = Instant::now();
                    if now >= p.deadline {
                        return None;
                    }
                    if p.rate > 0.0 {
                        let due = p.start + Duration::from_secs_f64(p.n as f64 / p.rate);
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                }
                p.n += 1;
                Some(p.walk.next_op())
            }
        }
    }
}

/// One ingest thread: keep `window` ops in flight, record ack latencies,
/// count acknowledgements in `acked`.
fn ingest<S: Storage + Clone>(
    engine: &DurableEngine<S>,
    ops: &mut impl Iterator<Item = Op>,
    window: usize,
    acked: &AtomicU64,
) -> Result<Histogram<u64>, String> {
    let mut h =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut inflight = VecDeque::with_capacity(window);
    let mut n = 0u64;
    // One clock read per op: an op's start is the previous op's check
    // time (only this loop's bookkeeping lies between them, counted
    // against the op: latencies err high, never low).
    let mut t = Instant::now();
    for op in ops {
        let ticket = engine.add(&op).map_err(|e| e.to_string())?;
        inflight.push_back((t, ticket));
        // Acks are taken as soon as they are seen (a lock-free check after
        // every add), not only when the window is full: a closed loop that
        // looked only then would record the time to add a whole window
        // (W / rate) instead of the time to durability.
        let now = Instant::now();
        t = now;
        while let Some((started, ticket)) = inflight.front() {
            if inflight.len() < window && !ticket.is_durable() {
                break;
            }
            ticket.wait().map_err(|e| e.to_string())?;
            let elapsed = if inflight.len() < window {
                now - *started
            } else {
                // Waited for a full window: the next op starts after it.
                t = Instant::now();
                t - *started
            };
            h.saturating_record(elapsed.as_nanos() as u64);
            inflight.pop_front();
            n += 1;
            if n.is_multiple_of(1024) {
                acked.fetch_add(1024, Ordering::Relaxed);
            }
        }
    }
    for (t, ticket) in inflight {
        ticket.wait().map_err(|e| e.to_string())?;
        h.saturating_record(t.elapsed().as_nanos() as u64);
    }
    Ok(h)
}

/// A progress line of a long step (recovery), on stderr.
fn progress_line(line: &str) {
    eprintln!("refd-bench: {line}");
}

/// See [`DurableReport::commit_gap_ms_max_after_warmup`].
const WARMUP: Duration = Duration::from_secs(10);

/// Run `durable`.
pub fn run(args: &DurableArgs) -> Result<DurableReport, String> {
    if args.threads == 0 || args.window == 0 {
        return Err("--threads and --window must be at least 1".into());
    }
    let walks = args.duration_s.is_some();
    if walks && !matches!(args.workload, Workload::Uniform | Workload::Zipf) {
        return Err("--duration-s runs the uniform and zipf workloads".into());
    }
    if args.workload == Workload::BtrfsTrace {
        return Err("durable runs the generated workloads".into());
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a number of ops per second, 0 or more".into());
    }
    if args.rate > 0.0 && args.duration_s.is_none() {
        return Err("--rate paces the --duration-s workloads".into());
    }
    if args.duration_s.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        return Err("--duration-s must be a positive number of seconds".into());
    }
    let path = &args.device;
    if !path.exists() {
        Device::create_file(path, DEVICE_BYTES_DEFAULT, FileAllocation::Reserve)
            .map_err(|e| e.to_string())?;
    }
    let dev = crate::crash::open_device(path)?;
    let device_mb = device_rate(&dev)?;
    DurableEngine::format(&dev, FormatOptions::default()).map_err(|e| e.to_string())?;
    let defaults = OpenOptions::default();
    let options = OpenOptions {
        tree: refd_ioring::btree::TreeConfig {
            cache_bytes: args.node_cache_mb << 20,
            ..defaults.tree
        },
        cache_extents_max: args.cache_extents,
        progress: (!args.json).then_some(progress_line as fn(&str)),
        policy: CommitPolicy {
            interval_ms: args.commit_interval_ms,
            pending_ops_trigger: args.pending_ops_trigger,
            commit_target_ms: args.commit_target_ms,
            dirty_bytes_trigger: args.dirty_trigger_mb << 20,
            ..CommitPolicy::default()
        },
        ..defaults
    };
    let prefault_mib = refd_alloc::prefault_mib_capped(args.prefault_mib);
    let prefault_s = if prefault_mib > 0 {
        if !args.json {
            eprintln!("prefaulting {prefault_mib} MiB of heap...");
        }
        refd_alloc::prefault(prefault_mib << 20).as_secs_f64()
    } else {
        0.0
    };
    let (engine, _) = DurableEngine::open(dev, options).map_err(|e| e.to_string())?;
    let per_thread: Vec<Vec<Op>> = if walks {
        Vec::new()
    } else {
        if !args.json {
            eprintln!("generating {} ops of {:?}...", args.ops, args.workload);
        }
        let stream = generate(args.workload, args.extents, args.ops, args.seed);
        deal(&stream.ops, args.threads, true)
    };
    let log_before = engine.log().stats();
    let acked: Vec<CachePadded<AtomicU64>> = (0..args.threads)
        .map(|_| CachePadded::new(AtomicU64::new(0)))
        .collect();
    let done = AtomicBool::new(false);
    let barrier = Barrier::new(args.threads + 1);
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut per_second: Vec<u64> = Vec::new();
    let (mut rss_max, mut cache_max) = (0u64, 0u64);
    let mut commit_starts: Vec<Instant> = Vec::new();
    let mut started = Instant::now();
    let (results, committed) = std::thread::scope(|s| {
        let committer = s.spawn(|| engine.run_committer().map_err(|e| e.to_string()));
        let workers: Vec<_> = (0..args.threads)
            .map(|t| {
                let (engine, barrier, acked) = (&engine, &barrier, &acked[t]);
                let ops = per_thread.get(t);
                s.spawn(move || {
                    barrier.wait();
                    let source = match args.duration_s {
                        Some(d) => Source::Walk(Paced {
                            walk: Walk::new(
                                args.workload,
                                args.extents / args.threads as u64,
                                args.seed * 1000 + t as u64,
                                args.threads as u64,
                                t as u64,
                            )
                            .expect("uniform or zipf"),
                            deadline: Instant::now() + Duration::from_secs_f64(d),
                            start: Instant::now(),
                            rate: args.rate / args.threads as f64,
                            n: 0,
                        }),
                        None => Source::Slice(ops.map_or([].iter(), |o| o.iter())),
                    };
                    let mut source = source;
                    ingest(engine, &mut source, args.window, acked).map(|h| (h, source))
                })
            })
            .collect();
        barrier.wait();
        started = Instant::now();
        // Commit starts, as seen after each commit ends (a separate thread:
        // reading the totals waits for a running commit).
        let starts = s.spawn(|| {
            let mut starts: Vec<Instant> = Vec::new();
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                if let Some(t) = engine.commit_totals().last_start {
                    if starts.last() != Some(&t) {
                        starts.push(t);
                    }
                }
            }
            starts
        });
        // Progress, and the acknowledged ops of every whole second.
        let sampler = s.spawn(|| {
            let mut seconds = Vec::new();
            let mut last = 0u64;
            let mut tick = started;
            let (mut rss_max, mut cache_max) = (0u64, 0u64);
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                rss_max = rss_max.max(refd::metrics::resident_bytes(None).unwrap_or(0));
                let c = engine.btree().cache_stats();
                cache_max = cache_max.max(c.bytes + c.dirty_bytes);
                if tick.elapsed() < Duration::from_secs(1) || done.load(Ordering::SeqCst) {
                    continue;
                }
                tick += Duration::from_secs(1);
                let now: u64 = acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
                seconds.push(now - last);
                last = now;
                if !args.json && seconds.len() % 5 == 0 {
                    let t = engine.commit_totals();
                    eprintln!(
                        "{:>4} s: {:.2} M acked, {:.0} ops/s in the last second, {} commits, \
                         {} pending (trigger {})",
                        seconds.len(),
                        now as f64 / 1e6,
                        seconds.last().copied().unwrap_or(0),
                        t.commits,
                        engine.pending_ops(),
                        engine.commit_trigger_ops(),
                    );
                }
            }
            (seconds, rss_max, cache_max)
        });
        let out: Vec<_> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("ingest thread panicked".into()))
            })
            .collect();
        let ingest_s = started.elapsed();
        done.store(true, Ordering::SeqCst);
        let commits_during = engine.commit_totals();
        (per_second, rss_max, cache_max) = sampler.join().unwrap_or_default();
        commit_starts = starts.join().unwrap_or_default();
        engine.stop_committer();
        let committed = committer
            .join()
            .unwrap_or_else(|_| Err("committer panicked".into()));
        ((out, ingest_s, commits_during), committed)
    });
    let (results, ingest, totals_during) = results;
    let commits_during = totals_during.commits;
    let mut walks = Vec::new();
    for r in results {
        let (h, source) = r?;
        hist.add(h).map_err(|e| format!("{e:?}"))?;
        if let Source::Walk(p) = source {
            walks.push(p.walk);
        }
    }
    let stats = committed?;
    let tree_bytes = engine
        .btree()
        .check()
        .map_err(|e| format!("tree check: {e}"))?
        .nodes
        * refd_ioring::format::NODE_BYTES as u64;
    let probe = if walks.is_empty() || args.probe_ops == 0 {
        None
    } else {
        Some(probe_commit(
            &engine,
            &mut walks,
            args.probe_ops,
            args.json,
        )?)
    };
    let totals = engine.commit_totals();
    let log_after = engine.log().stats();
    let ops = hist.len();
    let log_bytes = log_after.batch_bytes_written - log_before.batch_bytes_written;
    let written_bytes = totals.nodes_written * refd_ioring::format::NODE_BYTES as u64;
    let commits = totals.commits.max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = &totals.phases;
    let extents_cached = engine.cached_extents().len();
    let mut report = DurableReport {
        prefault_mib,
        prefault_s,
        ops,
        ingest_s: ingest.as_secs_f64(),
        durable_ops_per_sec: ops as f64 / ingest.as_secs_f64(),
        durable_ops_per_sec_min_1s: per_second.iter().copied().min().unwrap_or(0) as f64,
        acked_by_second: per_second,
        p50_ack_ms: hist.value_at_quantile(0.5) as f64 / 1e6,
        p99_ack_ms: hist.value_at_quantile(0.99) as f64 / 1e6,
        p999_ack_ms: hist.value_at_quantile(0.999) as f64 / 1e6,
        max_ack_ms: hist.max() as f64 / 1e6,
        commits: commits_during,
        commits_per_sec: commits_during as f64 / ingest.as_secs_f64(),
        commit_gap_ms_max: ms(totals.gap_max),
        commit_gap_ms_max_after_warmup: commit_starts
            .windows(2)
            .filter(|w| w[1] >= started + WARMUP)
            .map(|w| ms(w[1] - w[0]))
            .fold(0.0, f64::max),
        commit_ms_max: ms(totals.longest_phases.total),
        commit_longest_phase_ms: phase_ms(&totals.longest_phases),
        commit_longest_ops: totals.longest_ops,
        commit_longest_at_s: totals.longest_start.map_or(0.0, |t| {
            if t >= started {
                (t - started).as_secs_f64()
            } else {
                -(started - t).as_secs_f64()
            }
        }),
        commit_ms_mean: ms(p.total) / commits,
        commit_ops_mean: totals.ops as f64 / commits,
        commit_phase_ms_mean: phase_ms(p).map(|d| d / commits),
        commit_ns_per_op: engine.commit_cost_ps_per_op() as f64 / 1e3,
        commit_trigger_ops: engine.commit_trigger_ops(),
        commits_by_interval_pending_log: [stats.by_interval, stats.by_pending, stats.by_log],
        commits_by_dirty: stats.by_dirty,
        commit_dirty_bytes_max: totals_during.dirty_bytes_max,
        commit_dirty_bytes_per_op: engine.commit_dirty_bytes_per_op(),
        node_cache_bytes_max: cache_max,
        rss_max_bytes: rss_max,
        tree_bytes,
        log_bytes_per_op: log_bytes as f64 / ops.max(1) as f64,
        log_batches_per_sec: (log_after.batches_written - log_before.batches_written) as f64
            / ingest.as_secs_f64(),
        tree_bytes_per_op: written_bytes as f64 / ops.max(1) as f64,
        device_durable_mb_per_sec: device_mb,
        log_mb_per_sec: log_bytes as f64 / ingest.as_secs_f64() / 1e6,
        extents_cached,
        probe_commit_ops: probe.as_ref().map_or(0, |p| p.ops),
        probe_commit_heads: probe.as_ref().map_or(0, |p| p.core.heads),
        probe_commit_ms: probe.as_ref().map_or(0.0, |p| ms(p.phases.total)),
        probe_commit_phase_ms: probe.as_ref().map_or([0.0; 7], |p| phase_ms(&p.phases)),
        recovery_ops: 0,
        recovery_ms: 0.0,
    };
    if !walks.is_empty() && args.recovery_ops > 0 {
        engine.set_policy(untriggered(engine.policy()));
        queue(&engine, &mut walks, args.recovery_ops)?;
        drop(engine);
        let dev = crate::crash::open_device(path)?;
        let t = Instant::now();
        let (_engine, info) = DurableEngine::open(dev, options).map_err(|e| e.to_string())?;
        report.recovery_ms = ms(t.elapsed());
        report.recovery_ops = info.ops_replayed;
        if !args.json {
            eprintln!("recovery: {info}; took {:.0} ms", report.recovery_ms);
        }
    }
    Ok(report)
}

/// `policy` with every commit trigger but the interval off.
fn untriggered(policy: CommitPolicy) -> CommitPolicy {
    CommitPolicy {
        pending_ops_trigger: u64::MAX,
        commit_target_ms: u64::MAX,
        log_used_pct_trigger: 100,
        dirty_bytes_trigger: 0,
        ..policy
    }
}

/// A commit's steps in ms, in the order of
/// [`DurableReport::commit_phase_ms_mean`].
pub(crate) fn phase_ms(p: &refd_durable::CommitPhases) -> [f64; 7] {
    [
        p.freeze,
        p.items,
        p.run,
        p.diff,
        p.apply,
        p.write,
        p.superblock,
    ]
    .map(|d| d.as_secs_f64() * 1e3)
}

/// Queue `ops` more ops (the walks go on, one thread each) and wait until
/// they are durable.
fn queue<S: Storage + Clone>(
    engine: &DurableEngine<S>,
    walks: &mut [Walk],
    ops: u64,
) -> Result<(), String> {
    let per = ops / walks.len() as u64;
    std::thread::scope(|s| {
        let threads: Vec<_> = walks
            .iter_mut()
            .map(|w| {
                s.spawn(move || -> Result<(), String> {
                    let mut last = None;
                    for _ in 0..per {
                        last = Some(engine.add(&w.next_op()).map_err(|e| e.to_string())?);
                    }
                    if let Some(t) = last {
                        t.wait().map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        threads.into_iter().try_for_each(|t| {
            t.join()
                .unwrap_or_else(|_| Err("ingest thread panicked".into()))
        })
    })
}

/// Queue `ops` more ops (the walks go on, one thread each) with every
/// commit trigger off, wait until they are durable, and time one commit of
/// them with nothing else running: "a commit of N pending refs".
fn probe_commit<S: Storage + Clone>(
    engine: &DurableEngine<S>,
    walks: &mut [Walk],
    ops: u64,
    quiet: bool,
) -> Result<refd_durable::CommitSummary, String> {
    let policy = engine.policy();
    engine.set_policy(untriggered(policy));
    queue(engine, walks, ops)?;
    let summary = engine.commit().map_err(|e| e.to_string())?;
    engine.set_policy(policy);
    if !quiet {
        eprintln!(
            "probe: one commit of {} pending ops ({} heads) alone took {:.0} ms (core: run heads \
             {:.0} ms, apply to the cache {:.0} ms)",
            summary.ops,
            summary.core.heads,
            summary.phases.total.as_secs_f64() * 1e3,
            summary.core.run_time.as_secs_f64() * 1e3,
            summary.core.apply_time.as_secs_f64() * 1e3,
        );
    }
    Ok(summary)
}
