//! `refctl btrfs replay`: load a kernel extent tree, feed a kernel
//! delayed-ref trace through refd, compare with the kernel's result.
//!
//! The trace is read streaming; ops are routed by bytenr to `threads`
//! ingest workers over bounded channels (an extent's ops stay in trace
//! order on one worker), and the dispatcher commits every `commit_every`
//! ops, once the workers have ingested every op before that point of the
//! trace (as a client's op is acknowledged before it sends the next, so a
//! commit never holds an allocation without the earlier free of its
//! range), then once more at the end. On a
//! mismatch the trace is read a second time to collect the ops and the
//! kernel's `run_*` records of the first mismatched extents.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use refd_btrfs::compare::{compare, Mismatch};
use refd_btrfs::dump::{load_dump, DumpError, DumpOptions};
use refd_btrfs::open::OpenError;
use refd_btrfs::trace::{RunEvent, TraceError, TraceItem, TraceOptions, TraceReader, TraceStats};
use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::engine::{Engine, EngineError, EngineHandle, QuarantinedHead};
use refd_core::extent_tree::ExtentTree;
use refd_core::model::{partition, Op};
use refd_sync::fanout::Fanout;

/// Ops sent to a worker at once.
pub const BATCH_OPS: usize = 1024;
/// Batches queued per worker before the reader waits (back-pressure).
pub const QUEUE_BATCHES: usize = 64;
/// Verify errors kept in full (all are counted).
pub const ERRORS_KEPT: usize = 20;
/// Trace items kept per mismatched extent for the diagnosis.
pub const HISTORY_KEPT: usize = 64;

/// Which delayed-ref store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Impl {
    /// The lock-free store.
    Lockfree,
    /// The mutex baseline.
    Mutex,
}

/// What to replay and how.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// dump-tree of the extent tree before.
    pub before: PathBuf,
    /// ftrace text of the delayed-ref events.
    pub trace: PathBuf,
    /// dump-tree after (None: replay only, no comparison).
    pub after: Option<PathBuf>,
    /// Store.
    pub imp: Impl,
    /// ref-verify every op.
    pub verify: bool,
    /// Ingest threads.
    pub threads: usize,
    /// Commit after this many ops (0: only at the end).
    pub commit_every: u64,
    /// Tree block size (`None`: the one the dump's leaves show).
    pub nodesize: Option<u64>,
    /// Print progress to stderr.
    pub progress: bool,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A dump could not be loaded.
    #[error("{path}: {source}")]
    Dump {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: DumpError,
    },
    /// The trace could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The trace is malformed.
    #[error("{path}: {source}")]
    Trace {
        /// Which file.
        path: PathBuf,
        /// Why (with the line).
        #[source]
        source: TraceError,
    },
    /// Options out of range.
    #[error("{0}")]
    Usage(String),
}

/// One item of an extent's history, for the diagnosis.
#[derive(Clone, Debug)]
pub enum HistoryItem {
    /// An op queued by the kernel (trace line, pid).
    Op {
        /// Line of the head event.
        line: u64,
        /// Task.
        pid: u32,
        /// The op.
        op: Op,
    },
    /// What the kernel ran after merging.
    Run(RunEvent),
}

/// What a replay found.
#[derive(Debug)]
pub struct ReplayReport {
    /// Store name.
    pub imp: &'static str,
    /// Ingest threads.
    pub threads: usize,
    /// ref-verify was on.
    pub verify: bool,
    /// Ops fed.
    pub ops: u64,
    /// Extents in before.
    pub extents_before: usize,
    /// Tree block size of the dumps (given, or shown by their leaves).
    pub nodesize: u64,
    /// Extents compared (in after).
    pub extents: usize,
    /// Extents in refd's tree at the end.
    pub extents_got: usize,
    /// Commits run.
    pub commits: u64,
    /// From the start of the trace to the end of the final commit.
    pub elapsed: Duration,
    /// The tree refd ended with.
    pub tree: ExtentTree,
    /// Every mismatch.
    pub mismatches: Vec<Mismatch>,
    /// Heads refused by commits.
    pub quarantined: Vec<QuarantinedHead>,
    /// ref-verify refusals (count).
    pub verify_errors: u64,
    /// The first refusals in full.
    pub verify_samples: Vec<String>,
    /// History of the first mismatched extents.
    pub histories: BTreeMap<u64, Vec<HistoryItem>>,
    /// Trace reader statistics.
    pub trace_stats: TraceStats,
}

impl ReplayReport {
    /// Ops per second over the whole replay.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// True when refd reproduced the kernel's result exactly, with no
    /// refused op or head.
    pub fn exact(&self) -> bool {
        self.mismatches.is_empty() && self.quarantined.is_empty() && self.verify_errors == 0
    }
}

/// Load a dump with the file named in errors; also returns the nodesize
/// its tree blocks were given (`nodesize`, or the one its leaves show).
pub fn load(path: &PathBuf, nodesize: Option<u64>) -> Result<(ExtentTree, u64), ReplayError> {
    load_dump(path, &DumpOptions { nodesize })
        .map(|(tree, stats)| (tree, stats.nodesize))
        .map_err(|source| ReplayError::Dump {
            path: path.clone(),
            source,
        })
}

/// Run a replay.
pub fn replay(opts: &ReplayOptions, show: usize) -> Result<ReplayReport, ReplayError> {
    let shards = refd_core::delayed::lockfree::SHARDS_DEFAULT;
    if opts.threads == 0 || opts.threads > shards {
        return Err(ReplayError::Usage(format!(
            "--threads must be between 1 and {shards} (one ingest shard each)"
        )));
    }
    if opts.progress {
        eprintln!("loading {}...", opts.before.display());
    }
    let (before, nodesize) = load(&opts.before, opts.nodesize)?;
    let extents_before = before.len();
    let mut report = match opts.imp {
        Impl::Lockfree => run(Engine::with_tree(LockFreeStore::new(), before, 0), opts)?,
        Impl::Mutex => run(Engine::with_tree(MutexStore::new(), before, 0), opts)?,
    };
    report.extents_before = extents_before;
    report.nodesize = nodesize;
    if let Some(after_path) = &opts.after {
        if opts.progress {
            eprintln!("loading {}...", after_path.display());
        }
        // The same filesystem: its leaves must show the same nodesize.
        let (after, _) = load(after_path, Some(nodesize))?;
        report.extents = after.len();
        report.mismatches = compare(&after, &report.tree);
        if !report.mismatches.is_empty() && show > 0 {
            let wanted: Vec<u64> = report
                .mismatches
                .iter()
                .take(show)
                .map(Mismatch::bytenr)
                .collect();
            report.histories = histories(&opts.trace, &wanted)?;
        }
    }
    Ok(report)
}

fn run<S: DelayedRefStore>(
    mut engine: Engine<S>,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    if opts.verify {
        engine.enable_verify();
    }
    let engine = engine;
    let verify_errors = Mutex::new((0u64, Vec::<String>::new()));
    let mut reader = TraceReader::open(&opts.trace, TraceOptions::default())?;
    let started = Instant::now();
    let mut ops = 0u64;
    let mut commits = 0u64;
    let mut quarantined: Vec<QuarantinedHead> = Vec::new();
    let mut trace_error = None;
    // Batches each worker has ingested (the dispatcher counts those sent).
    let ingested: Vec<AtomicU64> = (0..opts.threads).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        let mut senders = Vec::with_capacity(opts.threads);
        for done in &ingested {
            let (tx, rx) = sync_channel::<Vec<Op>>(QUEUE_BATCHES);
            senders.push(tx);
            let (engine, verify_errors) = (&engine, &verify_errors);
            s.spawn(move || {
                let mut h = engine
                    .handle()
                    .expect("one ingest handle per replay worker");
                for batch in rx {
                    ingest_batch(&mut h, &batch, verify_errors);
                    done.fetch_add(1, Ordering::Release);
                }
            });
        }
        let mut fanout = Fanout::new(senders, BATCH_OPS);
        let mut next_commit = opts.commit_every;
        for item in reader.ops() {
            let traced = match item {
                Ok(t) => t,
                Err(e) => {
                    trace_error = Some(e);
                    break;
                }
            };
            let t = partition(traced.op.bytenr, opts.threads);
            if !fanout.push(t, traced.op) {
                break;
            }
            ops += 1;
            if opts.commit_every > 0 && ops == next_commit {
                next_commit += opts.commit_every;
                // The commit takes every op before this point of the trace
                // (and maybe some after): the kernel allocates a range only
                // after the op that freed it, so a commit with the
                // allocation and without the free would refuse it as an
                // overlap (a client has this order: its free is
                // acknowledged before it allocates).
                if !(0..opts.threads).all(|t| fanout.flush(t)) {
                    break;
                }
                for (t, done) in ingested.iter().enumerate() {
                    while done.load(Ordering::Acquire) < fanout.sent(t) {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                let r = engine.commit();
                commits += 1;
                quarantined.extend(r.quarantined);
                if opts.progress {
                    eprint!("\r{ops} ops, {commits} commits");
                }
            }
        }
        fanout.finish();
    });
    if let Some(source) = trace_error {
        return Err(ReplayError::Trace {
            path: opts.trace.clone(),
            source,
        });
    }
    let r = engine.commit();
    commits += 1;
    quarantined.extend(r.quarantined);
    let elapsed = started.elapsed();
    if opts.progress {
        eprintln!("\r{ops} ops, {commits} commits in {elapsed:.2?}");
    }
    let (verify_count, verify_samples) = verify_errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let tree = engine.tree().clone();
    Ok(ReplayReport {
        imp: engine.store().name(),
        threads: opts.threads,
        verify: opts.verify,
        ops,
        extents_before: 0,
        nodesize: 0,
        extents: 0,
        extents_got: tree.len(),
        commits,
        elapsed,
        tree,
        mismatches: Vec::new(),
        quarantined,
        verify_errors: verify_count,
        verify_samples,
        histories: BTreeMap::new(),
        trace_stats: reader.into_stats(),
    })
}

/// Second pass over the trace: the ops and run records of `bytenrs`.
fn histories(
    trace: &PathBuf,
    bytenrs: &[u64],
) -> Result<BTreeMap<u64, Vec<HistoryItem>>, ReplayError> {
    let mut out: BTreeMap<u64, VecDeque<HistoryItem>> =
        bytenrs.iter().map(|&b| (b, VecDeque::new())).collect();
    let reader = TraceReader::open(trace, TraceOptions::default())?;
    for item in reader {
        let item = item.map_err(|source| ReplayError::Trace {
            path: trace.clone(),
            source,
        })?;
        let (bytenr, h) = match item {
            TraceItem::Op(t) => (
                t.op.bytenr,
                HistoryItem::Op {
                    line: t.head_line,
                    pid: t.pid,
                    op: t.op,
                },
            ),
            TraceItem::Run(r) => {
                let b = match r {
                    RunEvent::Ref { op, .. } => op.bytenr,
                    RunEvent::Head { bytenr, .. } => bytenr,
                };
                (b, HistoryItem::Run(r))
            }
        };
        if let Some(v) = out.get_mut(&bytenr) {
            if v.len() == HISTORY_KEPT {
                v.pop_front();
            }
            v.push_back(h);
        }
    }
    Ok(out.into_iter().map(|(b, v)| (b, v.into())).collect())
}

impl std::fmt::Display for HistoryItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HistoryItem::Op { line, pid, op } => write!(f, "line {line} pid {pid}: queued {op}"),
            HistoryItem::Run(RunEvent::Ref { line, pid, op, .. }) => {
                write!(f, "line {line} pid {pid}: kernel ran {op}")
            }
            HistoryItem::Run(RunEvent::Head { line, pid, .. }) => {
                write!(f, "line {line} pid {pid}: kernel finished the head")
            }
        }
    }
}

/// Queue a batch of ops on a replay worker's handle; refused ops are
/// counted, and the first [`ERRORS_KEPT`] kept.
fn ingest_batch<S: DelayedRefStore>(
    h: &mut EngineHandle<'_, S>,
    batch: &[Op],
    verify_errors: &Mutex<(u64, Vec<String>)>,
) {
    for op in batch {
        if let Err(e) = h.add(op) {
            let mut v = verify_errors.lock().unwrap_or_else(|p| p.into_inner());
            v.0 += 1;
            if v.1.len() < ERRORS_KEPT {
                v.1.push(match e {
                    EngineError::Verify(v) => v.to_string(),
                    other => other.to_string(),
                });
            }
        }
    }
}
