//! `refd-bench ingest`: ingest throughput, latency, memory and commit time
//! of the lock-free store and the mutex baseline, side by side in one run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;
use refd::sched::thread_cpu_time;
use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::engine::Engine;
use refd_core::model::Op;
use serde::Serialize;

use crate::workload::{deal, generate, load_trace, Stream, Workload};
use refd_alloc::live_bytes;

/// Which implementation(s) to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Impl {
    /// The lock-free store.
    Lockfree,
    /// The mutex baseline.
    Mutex,
    /// Both, side by side.
    Both,
}

/// Arguments of `ingest`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Implementation(s).
    #[arg(long = "impl", value_enum, default_value = "both")]
    pub imp: Impl,
    /// Ingest threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Workload.
    #[arg(long, value_enum, default_value = "uniform")]
    pub workload: Workload,
    /// Distinct extents.
    #[arg(long, default_value_t = 1_000_000)]
    pub extents: u64,
    /// Ops in total.
    #[arg(long, default_value_t = 10_000_000)]
    pub ops: usize,
    /// Rounds per implementation (alternating); the median is reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Record the latency of one op in this many (timing every op costs as
    /// much as the op).
    #[arg(long, default_value_t = 16)]
    pub sample: usize,
    /// RNG seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Capture directory for `--workload btrfs-trace` (before.txt.zst,
    /// trace.txt.zst), e.g. ../shared/traces/reflink-1.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Lock-free store: top-level merge ratio (memory vs throughput, see
    /// refd_core::delayed::lockfree::TOP_MERGE_RATIO).
    #[arg(long, default_value_t = refd_core::delayed::lockfree::TOP_MERGE_RATIO)]
    pub top_merge_ratio: usize,
    /// Check every op with ref-verify at ingest (the replay anchor is
    /// "in memory, all ops verified").
    #[arg(long)]
    pub verify: bool,
    /// Commit every this many ms while ingest runs (0: one commit of
    /// everything after ingest). Reports the seal times: how long each
    /// commit's cut-over held ingest (what the durable engine holds its
    /// ingest lock for).
    #[arg(long, default_value_t = 0)]
    pub commit_interval_ms: u64,
    /// Run one reader thread beside the ingest threads, looking up random
    /// extents of the stream (`Engine::lookup_extent_ref`: tree + pending)
    /// back to back while ingest runs; reports its latency percentiles.
    #[arg(long)]
    pub lookups: bool,
    /// After the figures at the end of ingest are taken (and before the
    /// commit), wait for the store's background work (hand-offs,
    /// compaction) to finish and report the store's heap again, labelled
    /// "idle". The end-of-ingest figures are unchanged; the commit then
    /// merges the compacted store (its time is not comparable to a run
    /// without this flag).
    #[arg(long)]
    pub settle: bool,
    /// Offer this many million ops per second in all (dealt evenly to the
    /// ingest threads, each sleeping between ops when ahead of its share)
    /// instead of ingesting flat out; 0: flat out. Latency is of the ops
    /// only, not of the sleeps: the tail at a load the background keeps up
    /// with, not the back-pressure of a saturating one.
    #[arg(long, default_value_t = 0.0)]
    pub rate_mops: f64,
    /// Wake every CPU this often (µs; 0: never) with a thread pinned to it
    /// at SCHED_FIFO priority 1 (`refd_core::priority::ReschedTick`, what
    /// the daemon runs by default), for the whole run.
    #[arg(long, default_value_t = 0)]
    pub resched_tick_us: u64,
    /// Print to stderr every timed op (ingest ops sampled, every lookup)
    /// that took at least this many µs, with the CLOCK_MONOTONIC time it
    /// started, to match against a trace of the scheduler taken with the
    /// same clock (`perf sched record -k CLOCK_MONOTONIC`); 0: none.
    #[arg(long, default_value_t = 0)]
    pub slow_op_us: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write an HdrHistogram interval log of op latencies here.
    #[arg(long)]
    pub hlog: Option<PathBuf>,
    /// Heap touched and freed once after the ops are generated and before
    /// the first round (MiB; 0: none; at most half the available memory),
    /// so the stores build their runs in memory the kernel has already
    /// faulted in, as in a daemon started with `--prefault-mib` (see
    /// `refd_alloc::prefault`). Without it the first round pays the VM's
    /// first-touch faults and later rounds reuse the first one's heap.
    #[arg(long, default_value_t = 0)]
    pub prefault_mib: usize,
}

/// Result of one implementation.
#[derive(Debug, Clone, Serialize)]
pub struct ImplResult {
    /// "lockfree" / "mutex".
    pub name: String,
    /// Millions of ops per second.
    pub mops: f64,
    /// Wall time of the ingest.
    pub ingest_s: f64,
    /// Heap bytes held by the store after ingest.
    pub store_bytes: i64,
    /// Pending heads after ingest (merged).
    pub pending_heads: usize,
    /// Pending refs after ingest (merged at insert).
    pub pending_refs: usize,
    /// store_bytes / pending_refs.
    pub bytes_per_pending_ref: f64,
    /// Commit of everything pending, ms.
    pub commit_ms: f64,
    /// Of which: freeze + merge.
    pub freeze_ms: f64,
    /// Of which: run heads.
    pub run_ms: f64,
    /// Of which: apply under the tree lock.
    pub apply_ms: f64,
    /// Heads committed (by the final commit).
    pub committed_heads: usize,
    /// Commits while ingest ran (`--commit-interval-ms`).
    pub commits_during: usize,
    /// Worst seal time over every commit of the run (those during ingest
    /// and the final one), µs.
    pub seal_max_us: f64,
    /// p99 of the seal times, µs.
    pub seal_p99_us: f64,
    /// The store's own description of its layout after ingest.
    pub layout: String,
    /// `--settle`: the store's heap bytes once its background work was
    /// done (after the end-of-ingest figures were taken).
    pub idle_store_bytes: Option<i64>,
    /// `--settle`: idle_store_bytes / pending_refs.
    pub idle_bytes_per_pending_ref: Option<f64>,
    /// `--settle`: how long the background took to go idle after ingest,
    /// and the heap to stop shrinking (ms).
    pub idle_wait_ms: Option<f64>,
    /// `--settle`: the store's layout once idle.
    pub idle_layout: String,
    /// Heads quarantined by the final commit (must be 0 without
    /// `--commit-interval-ms`: the streams are valid as a whole).
    pub quarantined: usize,
    /// Extents in the tree after commit.
    pub extents_after: usize,
    /// Latency percentiles, ns.
    pub p50_ns: u64,
    /// p90.
    pub p90_ns: u64,
    /// p99.
    pub p99_ns: u64,
    /// p99.9.
    pub p999_ns: u64,
    /// p99.99.
    pub p9999_ns: u64,
    /// max.
    pub max_ns: u64,
    /// CPU time each kind of thread got while ingest ran, ms: `ingest`
    /// (all ingest threads), `lookups` (`--lookups`), `main` (the commits
    /// of `--commit-interval-ms`) and the threads named `refd-...` by
    /// name: the store's background threads (`refd-handoff`,
    /// `refd-compact`, `refd-compact-s`), and a commit's `refd-run-N` and
    /// `refd-drop` or `--resched-tick-us`'s `refd-tick-N` where they ran
    /// (a thread that ended before ingest did is not counted). The ingest
    /// and lookup threads measure their own (`CLOCK_THREAD_CPUTIME_ID`);
    /// the others are read from `/proc/self/task/*/schedstat`, left out
    /// where the kernel has none. Where the 2 cores went.
    pub cpu_ms: BTreeMap<String, f64>,
    /// Lookups done by the `--lookups` reader while ingest ran (0: none).
    pub lookups: u64,
    /// Lookup latency p50, ns (`--lookups`).
    pub lookup_p50_ns: u64,
    /// Lookup latency p99, ns.
    pub lookup_p99_ns: u64,
    /// Lookup latency p99.99, ns.
    pub lookup_p9999_ns: u64,
    /// Lookup latency max, ns.
    pub lookup_max_ns: u64,
    #[serde(skip)]
    hist: Option<Histogram<u64>>,
    #[serde(skip)]
    started: Duration,
}

fn run_impl<S: DelayedRefStore>(
    store: S,
    stream: &Stream,
    per_thread: &[Vec<Op>],
    args: &IngestArgs,
) -> ImplResult {
    let (sample, verify) = (args.sample, args.verify);
    let (commit_interval_ms, lookups) = (args.commit_interval_ms, args.lookups);
    // Ops per second of each ingest thread (`--rate-mops`; 0: no pacing).
    let thread_rate = args.rate_mops * 1e6 / per_thread.len() as f64;
    let slow_op = Duration::from_micros(args.slow_op_us);
    let name = store.name().to_string();
    let threads = per_thread.len();
    let tree = stream.tree.clone();
    let mut hists: Vec<Histogram<u64>> = (0..threads)
        .map(|_| Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"))
        .collect();
    let before = settled_live_bytes();
    let mut engine = Engine::with_tree(store, tree, 1);
    if verify {
        engine.enable_verify();
    }
    let engine = engine;
    let barrier = Barrier::new(threads + 1 + usize::from(lookups));
    let ingesting = AtomicUsize::new(threads);
    let mut seals: Vec<Duration> = Vec::new();
    let mut lookup_hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ingest_cpu_ns = AtomicU64::new(0);
    let lookup_cpu_ns = AtomicU64::new(0);
    // The background threads' CPU times when the last ingest thread ends
    // (taken by that thread: no polling thread beside the load).
    let background_at_end: Mutex<Option<BTreeMap<u64, (String, u64)>>> = Mutex::new(None);
    let (started_at, background_before) = std::thread::scope(|s| {
        for (t, (ops, hist)) in per_thread.iter().zip(hists.iter_mut()).enumerate() {
            let (engine, barrier, ingesting) = (&engine, &barrier, &ingesting);
            let (cpu_ns, at_end) = (&ingest_cpu_ns, &background_at_end);
            let builder = std::thread::Builder::new().name(format!("ingest-{t}"));
            let spawned = builder.spawn_scoped(s, move || {
                let mut h = engine.handle().expect("an ingest handle per thread");
                let mut slow = SlowOps::new(slow_op);
                barrier.wait();
                // Sample pseudo-randomly: a fixed stride can alias with the
                // store's periodic work (a hand-off every 4096 ops) and
                // never see it.
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ ops.len() as u64;
                let begun = Instant::now();
                let cpu_begun = thread_cpu_time();
                for (i, op) in ops.iter().enumerate() {
                    if thread_rate > 0.0 && i % PACE_OPS == 0 {
                        pace(begun, i, thread_rate);
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x.is_multiple_of(sample as u64) {
                        let t = Instant::now();
                        h.add(op).expect("valid op");
                        let took = t.elapsed();
                        hist.saturating_record(took.as_nanos() as u64);
                        slow.record(t, took);
                    } else {
                        h.add(op).expect("valid op");
                    }
                }
                let cpu = thread_cpu_time().saturating_sub(cpu_begun);
                cpu_ns.fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
                if ingesting.fetch_sub(1, Ordering::SeqCst) == 1 {
                    *at_end.lock().unwrap_or_else(|e| e.into_inner()) = Some(background_cpu_ns());
                }
                slow.print(&format!("ingest-{t}"));
            });
            spawned.expect("spawn an ingest thread");
        }
        if lookups {
            let (engine, barrier, ingesting) = (&engine, &barrier, &ingesting);
            let (hist, cpu_ns) = (&mut lookup_hist, &lookup_cpu_ns);
            let reader = std::thread::Builder::new()
                .name("lookups".into())
                .spawn_scoped(s, move || {
                    let begun = thread_cpu_time();
                    lookup_while_ingesting(engine, stream, barrier, ingesting, hist, slow_op);
                    let cpu = thread_cpu_time().saturating_sub(begun);
                    cpu_ns.store(cpu.as_nanos() as u64, Ordering::Relaxed);
                });
            reader.expect("spawn the lookup thread");
        }
        // Before the barrier: the background threads are idle (or not
        // started) until ingest begins.
        let background_before = background_cpu_ns();
        barrier.wait();
        let t = Instant::now();
        if commit_interval_ms > 0 {
            // Commit on an interval while ingest runs (this thread).
            while ingesting.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(commit_interval_ms));
                // A generated stream is valid as a whole, not cut at any
                // point (a drop may precede its add on another thread), so
                // commits during ingest may refuse heads: only the seal
                // times are measured here.
                seals.push(engine.commit().seal_time);
            }
        }
        // Scope joins the ingest threads before returning.
        (t, background_before)
    });
    let elapsed = started_at.elapsed();
    let background_after = background_at_end
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_default();
    let background_cpu = background_cpu_between(&background_before, background_after);
    let mut cpu_ms: BTreeMap<String, f64> = background_cpu
        .into_iter()
        .map(|(name, ns)| (name, ns as f64 / 1e6))
        .collect();
    cpu_ms.insert("ingest".into(), ingest_cpu_ns.into_inner() as f64 / 1e6);
    if lookups {
        cpu_ms.insert("lookups".into(), lookup_cpu_ns.into_inner() as f64 / 1e6);
    }
    let commits_during = seals.len();
    let store_bytes = (live_bytes() - before) as i64;
    let layout = engine.store().layout();
    let stats = engine.store().stats();
    let total_ops: usize = per_thread.iter().map(Vec::len).sum();
    let idle = args.settle.then(|| {
        let t = Instant::now();
        engine.store().settle();
        let bytes = (settled_live_bytes() - before) as i64;
        (bytes, t.elapsed(), engine.store().layout())
    });

    let t = Instant::now();
    let report = engine.commit();
    let commit = t.elapsed();
    seals.push(report.seal_time);
    seals.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let seal_max_us = seals.last().map_or(0.0, |&d| us(d));
    let seal_p99_us = us(seals[(seals.len() * 99 / 100).min(seals.len() - 1)]);
    let mut hist = hists.pop().expect("at least one thread");
    for h in &hists {
        hist.add(h).expect("same bounds");
    }
    let extents_after = engine.tree().len();
    ImplResult {
        name,
        mops: total_ops as f64 / elapsed.as_secs_f64() / 1e6,
        ingest_s: elapsed.as_secs_f64(),
        store_bytes,
        pending_heads: stats.heads,
        pending_refs: stats.refs,
        bytes_per_pending_ref: if stats.refs > 0 {
            store_bytes as f64 / stats.refs as f64
        } else {
            f64::NAN
        },
        commit_ms: commit.as_secs_f64() * 1e3,
        freeze_ms: report.freeze_time.as_secs_f64() * 1e3,
        run_ms: report.run_time.as_secs_f64() * 1e3,
        apply_ms: report.apply_time.as_secs_f64() * 1e3,
        committed_heads: report.heads,
        commits_during,
        seal_max_us,
        seal_p99_us,
        quarantined: report.quarantined.len(),
        layout,
        idle_store_bytes: idle.as_ref().map(|i| i.0),
        idle_bytes_per_pending_ref: idle
            .as_ref()
            .filter(|_| stats.refs > 0)
            .map(|i| i.0 as f64 / stats.refs as f64),
        idle_wait_ms: idle.as_ref().map(|i| i.1.as_secs_f64() * 1e3),
        idle_layout: idle.map(|i| i.2).unwrap_or_default(),
        extents_after,
        p50_ns: hist.value_at_quantile(0.5),
        p90_ns: hist.value_at_quantile(0.9),
        p99_ns: hist.value_at_quantile(0.99),
        p999_ns: hist.value_at_quantile(0.999),
        p9999_ns: hist.value_at_quantile(0.9999),
        max_ns: hist.max(),
        cpu_ms,
        lookups: lookup_hist.len(),
        lookup_p50_ns: lookup_hist.value_at_quantile(0.5),
        lookup_p99_ns: lookup_hist.value_at_quantile(0.99),
        lookup_p9999_ns: lookup_hist.value_at_quantile(0.9999),
        lookup_max_ns: lookup_hist.max(),
        hist: Some(hist),
        started,
    }
}

/// Ops between two pacing checks of `--rate-mops` (a check reads the
/// clock).
const PACE_OPS: usize = 256;

/// Pacing of `--rate-mops`: if op `i` of a thread running at `rate` ops/s
/// from `begun` is early, sleeps until it is due (a sleep between two ops,
/// not timed as part of either), so the thread offers a steady load
/// instead of running flat out. A thread that is behind does not catch up
/// faster than flat out.
fn pace(begun: Instant, i: usize, rate: f64) {
    let due = Duration::from_secs_f64(i as f64 / rate);
    if let Some(early) = due.checked_sub(begun.elapsed()) {
        std::thread::sleep(early);
    }
}

/// Live heap bytes once the frees of an earlier round have landed: a
/// commit drops its heads on a background thread
/// (`refd_sync::background::drop_later`) and the lock-free store's runs go
/// through crossbeam-epoch's deferred destruction, so right after a round
/// the heap still holds memory that is freed during the next one (which
/// made its store size come out negative). Waits until the live heap
/// stops shrinking, for at most 10 s.
fn settled_live_bytes() -> isize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = live_bytes();
    loop {
        for _ in 0..4 {
            crossbeam_epoch::pin().flush();
        }
        std::thread::sleep(Duration::from_millis(50));
        let now = live_bytes();
        if now >= last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// The `--lookups` reader: looks up random extents of the stream back to
/// back until every ingest thread is done, recording each lookup's time.
/// It starts with the ingest threads (same barrier).
fn lookup_while_ingesting<S: DelayedRefStore>(
    engine: &Engine<S>,
    stream: &Stream,
    barrier: &Barrier,
    ingesting: &AtomicUsize,
    hist: &mut Histogram<u64>,
    slow_op: Duration,
) {
    let mut slow = SlowOps::new(slow_op);
    barrier.wait();
    let n = stream.ops.len().max(1) as u64;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while ingesting.load(Ordering::SeqCst) > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let Some(op) = stream.ops.get((x % n) as usize) else {
            return;
        };
        let bytenr = op.bytenr;
        let t = Instant::now();
        std::hint::black_box(engine.lookup_extent_ref(bytenr));
        let took = t.elapsed();
        hist.saturating_record(took.as_nanos() as u64);
        slow.record(t, took);
    }
    slow.print("lookups");
}

/// Slow ops kept per thread by `--slow-op-us` (more are counted only).
const SLOW_OPS_MAX: usize = 10_000;

/// The timed ops of one thread slower than `--slow-op-us`, each with the
/// CLOCK_MONOTONIC time it started, to find what the thread was doing then
/// in a trace taken with the same clock (`perf sched record -k
/// CLOCK_MONOTONIC`).
struct SlowOps {
    /// Zero: off.
    threshold: Duration,
    /// An `Instant` and the CLOCK_MONOTONIC time (ns) of the same moment.
    origin: (Instant, u64),
    /// Start (CLOCK_MONOTONIC ns) and duration of each slow op.
    ops: Vec<(u64, Duration)>,
    dropped: usize,
}

impl SlowOps {
    fn new(threshold: Duration) -> SlowOps {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let now = Instant::now();
        // SAFETY: `ts` is a valid, writable timespec for the call.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = if r == 0 {
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        } else {
            0
        };
        SlowOps {
            threshold,
            origin: (now, mono),
            ops: Vec::new(),
            dropped: 0,
        }
    }

    fn record(&mut self, started: Instant, took: Duration) {
        if self.threshold.is_zero() || took < self.threshold {
            return;
        }
        if self.ops.len() == SLOW_OPS_MAX {
            self.dropped += 1;
            return;
        }
        let since = started.saturating_duration_since(self.origin.0);
        self.ops
            .push((self.origin.1 + since.as_nanos() as u64, took));
    }

    /// Prints the slow ops to stderr, one a line.
    fn print(&self, thread: &str) {
        for (at, took) in &self.ops {
            eprintln!(
                "slow op: {thread} at {:.6} s (CLOCK_MONOTONIC) took {:.3} ms",
                *at as f64 / 1e9,
                took.as_secs_f64() * 1e3
            );
        }
        if self.dropped > 0 {
            eprintln!("slow op: {thread}: {} more not kept", self.dropped);
        }
    }
}

fn median(mut v: Vec<ImplResult>) -> ImplResult {
    v.sort_by(|a, b| a.mops.total_cmp(&b.mops));
    v.swap_remove(v.len() / 2)
}

/// Run `ingest`. Returns the process exit code.
pub fn run(args: &IngestArgs) -> Result<(), String> {
    if args.threads == 0 || args.sample == 0 || args.rounds == 0 || args.extents == 0 {
        return Err("--threads, --sample, --rounds and --extents must be at least 1".into());
    }
    if !(args.rate_mops.is_finite() && args.rate_mops >= 0.0) {
        return Err(format!(
            "--rate-mops must be a number of at least 0, not {}",
            args.rate_mops
        ));
    }
    let _tick = match args.resched_tick_us {
        0 => None,
        us => Some(
            refd_core::priority::ReschedTick::start(std::time::Duration::from_micros(us), 1, None)
                .map_err(|e| format!("--resched-tick-us {us}: {e}"))?,
        ),
    };
    let shards = refd_core::delayed::lockfree::SHARDS_DEFAULT;
    if args.threads > shards {
        return Err(format!(
            "--threads must be at most {shards} (one ingest shard each)"
        ));
    }
    if !args.json {
        eprintln!(
            "generating {} ops of {:?} over {} extents...",
            args.ops, args.workload, args.extents
        );
    }
    let (stream, by_bytenr) = if args.workload == Workload::BtrfsTrace {
        let dir = args
            .trace
            .as_ref()
            .ok_or("--workload btrfs-trace needs --trace DIR (a capture directory)")?;
        // An extent's ops stay on one thread, in trace order.
        (load_trace(dir)?.0, true)
    } else {
        (
            generate(args.workload, args.extents, args.ops, args.seed),
            false,
        )
    };
    let per_thread = deal(&stream.ops, args.threads, by_bytenr);
    if args.prefault_mib > 0 {
        let mib = refd_alloc::prefault_mib_capped(args.prefault_mib);
        let took = refd_alloc::prefault(mib << 20);
        if !args.json {
            eprintln!(
                "prefaulted {mib} MiB of heap in {:.1} s",
                took.as_secs_f64()
            );
        }
    }
    let mut lf = Vec::new();
    let mut mx = Vec::new();
    for round in 0..args.rounds {
        if matches!(args.imp, Impl::Lockfree | Impl::Both) {
            if !args.json {
                eprintln!("round {}: lockfree...", round + 1);
            }
            lf.push(run_impl(
                LockFreeStore::new().with_top_merge_ratio(args.top_merge_ratio),
                &stream,
                &per_thread,
                args,
            ));
        }
        if matches!(args.imp, Impl::Mutex | Impl::Both) {
            if !args.json {
                eprintln!("round {}: mutex...", round + 1);
            }
            mx.push(run_impl(MutexStore::new(), &stream, &per_thread, args));
        }
    }
    let results: Vec<ImplResult> = [lf, mx]
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(median)
        .collect();
    if let Some(path) = &args.hlog {
        write_hlog(path, &results).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    for r in &results {
        if r.quarantined != 0 && args.commit_interval_ms == 0 {
            return Err(format!(
                "{}: {} heads quarantined on a valid stream",
                r.name, r.quarantined
            ));
        }
    }
    let get = |n: &str| results.iter().find(|r| r.name == n);
    let ratio = match (get("lockfree"), get("mutex")) {
        (Some(a), Some(b)) => Some(a.mops / b.mops),
        _ => None,
    };
    let primary = get("lockfree")
        .or(get("mutex"))
        .expect("one implementation ran");
    if args.json {
        let v = serde_json::json!({
            "bench": "ingest",
            "workload": args.workload,
            "threads": args.threads,
            "extents": args.extents,
            "ops": stream.ops.len(),
            "rounds": args.rounds,
            "verify": args.verify,
            "top_merge_ratio": args.top_merge_ratio,
            "prefault_mib": args.prefault_mib,
            "rate_mops": args.rate_mops,
            "resched_tick_us": args.resched_tick_us,
            "lockfree_mops": get("lockfree").map(|r| r.mops),
            "mutex_mops": get("mutex").map(|r| r.mops),
            "ratio": ratio,
            "bytes_per_pending_ref": primary.bytes_per_pending_ref,
            "idle_bytes_per_pending_ref": primary.idle_bytes_per_pending_ref,
            "commit_ms": primary.commit_ms,
            "commit_interval_ms": args.commit_interval_ms,
            "seal_max_us": primary.seal_max_us,
            "p99_ns": primary.p99_ns,
            "lookup_p99_ns": primary.lookup_p99_ns,
            "results": results,
        });
        println!("{v}");
    } else {
        print_table(args, stream.ops.len(), &results, ratio);
    }
    Ok(())
}

fn schedstat_ns(path: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The main thread (as `main`) and each of this process's threads named
/// `refd-...` (the store's background threads, and a commit's run
/// workers `refd-run-N`, `refd-drop` or the reschedule tick's
/// `refd-tick-N` where they run) by thread id: its name and the
/// nanoseconds it has run on a CPU.
fn background_cpu_ns() -> BTreeMap<u64, (String, u64)> {
    let mut by_tid = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_tid;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let dir = task.path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        // The main thread (named after the binary) commits with
        // `--commit-interval-ms`, and sleeps otherwise.
        let name = if tid == u64::from(std::process::id()) {
            "main"
        } else {
            name.trim()
        };
        if name != "main" && !name.starts_with("refd-") {
            continue;
        }
        if let Some(ns) = schedstat_ns(&dir.join("schedstat")) {
            by_tid.insert(tid, (name.to_string(), ns));
        }
    }
    by_tid
}

/// The CPU each `refd-...` thread got between two [`background_cpu_ns`]
/// snapshots, summed by name: a thread started since counts from 0; one
/// that ended between them is not seen.
fn background_cpu_between(
    before: &BTreeMap<u64, (String, u64)>,
    after: BTreeMap<u64, (String, u64)>,
) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    for (tid, (name, ns)) in after {
        let was = before
            .get(&tid)
            .filter(|(n, _)| *n == name)
            .map_or(0, |(_, ns)| *ns);
        *by_name.entry(name).or_insert(0) += ns.saturating_sub(was);
    }
    by_name
}

fn print_table(args: &IngestArgs, ops: usize, results: &[ImplResult], ratio: Option<f64>) {
    println!(
        "ingest: workload {:?}{}, {} ops, {} threads{}, {} round(s), latency sampled 1/{}",
        args.workload,
        match (&args.trace, args.workload) {
            (Some(t), Workload::BtrfsTrace) => format!(" {}", t.display()),
            _ => format!(", {} extents", args.extents),
        },
        ops,
        args.threads,
        if args.rate_mops > 0.0 {
            format!(" offering {} Mops/s", args.rate_mops)
        } else {
            String::new()
        },
        args.rounds,
        args.sample
    );
    println!(
        "{:<9} {:>8} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>10}",
        "impl",
        "Mops/s",
        "p50ns",
        "p90ns",
        "p99ns",
        "p99.9ns",
        "p99.99ns",
        "max ns",
        "B/ref",
        "heads",
        "refs",
        "commit ms"
    );
    for r in results {
        println!(
            "{:<9} {:>8.2} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>8.1} {:>9} {:>9} {:>10.1}",
            r.name,
            r.mops,
            r.p50_ns,
            r.p90_ns,
            r.p99_ns,
            r.p999_ns,
            r.p9999_ns,
            r.max_ns,
            r.bytes_per_pending_ref,
            r.pending_heads,
            r.pending_refs,
            r.commit_ms
        );
        println!(
            "          commit: freeze+merge {:.1} ms, run {:.1} ms, apply {:.1} ms; {} heads, {} extents after; store heap {:.1} MiB",
            r.freeze_ms,
            r.run_ms,
            r.apply_ms,
            r.committed_heads,
            r.extents_after,
            r.store_bytes as f64 / (1 << 20) as f64
        );
        println!(
            "          seal: worst {:.0} µs, p99 {:.0} µs over {} commit(s) ({} during ingest)",
            r.seal_max_us,
            r.seal_p99_us,
            r.commits_during + 1,
            r.commits_during
        );
        if !r.cpu_ms.is_empty() {
            let total: f64 = r.cpu_ms.values().sum();
            let parts: Vec<String> = r
                .cpu_ms
                .iter()
                .filter(|(_, ms)| **ms > 0.0)
                .map(|(name, ms)| format!("{name} {ms:.0} ms ({:.0} ns/op)", ms * 1e6 / ops as f64))
                .collect();
            println!(
                "          cpu during ingest: {}; {total:.0} ms of {:.0} ms wall",
                parts.join(", "),
                r.ingest_s * 1e3
            );
        }
        if r.lookups > 0 {
            println!(
                "          lookups under ingest: {} done, p50 {} ns, p99 {} ns, p99.99 {} ns, max {} ns",
                r.lookups, r.lookup_p50_ns, r.lookup_p99_ns, r.lookup_p9999_ns, r.lookup_max_ns
            );
        }
        if !r.layout.is_empty() {
            println!("          {}", r.layout);
        }
        if let (Some(bytes), Some(per_ref), Some(ms)) = (
            r.idle_store_bytes,
            r.idle_bytes_per_pending_ref,
            r.idle_wait_ms,
        ) {
            println!(
                "          idle (--settle, not the end-of-ingest figure): {per_ref:.1} B/ref, \
                 store heap {:.1} MiB, {ms:.0} ms after ingest",
                bytes as f64 / (1 << 20) as f64
            );
            if !r.idle_layout.is_empty() {
                println!("          idle {}", r.idle_layout);
            }
        }
    }
    if let Some(ratio) = ratio {
        println!("ratio lockfree/mutex (same run): {ratio:.2}x");
    }
    let _ = std::io::stdout().flush();
}

fn write_hlog(path: &PathBuf, results: &[ImplResult]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut ser = V2Serializer::new();
    {
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment("refd-bench ingest: per-op latency (ns), one interval per implementation")
            .begin_log_with(&mut buf, &mut ser)
            .map_err(std::io::Error::other)?;
        for r in results {
            if let Some(h) = &r.hist {
                w.write_histogram(
                    h,
                    r.started,
                    Duration::from_secs_f64(r.ingest_s),
                    Tag::new(&r.name),
                )
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            }
        }
    }
    std::fs::write(path, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A paced thread is never early: op `i` starts no sooner than
    /// `i / rate` after the start (a lower bound, so no timing flake).
    #[test]
    fn pacing_holds_ops_back_to_the_rate() {
        let rate = 100_000.0;
        let begun = Instant::now();
        let ops = 4 * PACE_OPS;
        for i in (0..ops).step_by(PACE_OPS) {
            pace(begun, i, rate);
            assert!(begun.elapsed() >= Duration::from_secs_f64(i as f64 / rate));
        }
    }

    /// Only ops at or over the threshold are kept, at most
    /// `SLOW_OPS_MAX`, each at its start time on the monotonic clock.
    #[test]
    fn slow_ops_keep_what_is_over_the_threshold_up_to_the_bound() {
        let mut off = SlowOps::new(Duration::ZERO);
        off.record(Instant::now(), Duration::from_secs(1));
        assert!(off.ops.is_empty());

        let mut slow = SlowOps::new(Duration::from_micros(500));
        assert_ne!(slow.origin.1, 0, "CLOCK_MONOTONIC read");
        let later = slow.origin.0 + Duration::from_millis(3);
        slow.record(later, Duration::from_micros(499));
        slow.record(later, Duration::from_micros(500));
        assert_eq!(
            slow.ops,
            vec![(slow.origin.1 + 3_000_000, Duration::from_micros(500))]
        );
        for _ in 0..SLOW_OPS_MAX {
            slow.record(later, Duration::from_millis(1));
        }
        assert_eq!(slow.ops.len(), SLOW_OPS_MAX);
        assert_eq!(slow.dropped, 1);
    }
}
