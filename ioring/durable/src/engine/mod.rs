//! [`DurableEngine`]: the core delayed-ref engine made durable by the
//! ref log and the copy-on-write B+tree. The ordering is the one of
//! `docs/log.md` ("Wiring commit and recovery") and `docs/btree.md`
//! ("Commit protocol"); `docs/durable.md` describes it end to end.
//!
//! Invariants:
//! - an op is in the core engine iff its record is in the log (both are
//!   done under the read side of the *cut lock*, so a commit's cut, taken
//!   under the write side, splits the ops exactly: LSN < cut ⇔ frozen);
//! - after every successful commit, the working B+tree holds exactly the
//!   encoding of the core engine's committed extent tree
//!   ([`DurableEngine::verify`] checks it);
//! - nothing is acknowledged after a failed write or flush: the first
//!   failure latches and every later add and commit returns it.
//!
//! The committed extent tree lives in the B+tree, which may be larger than
//! memory; the core engine's tree is a bounded cache of it (core's
//! "partial trees"): `open` warms it with up to
//! [`OpenOptions::cache_extents_max`] extents, a commit reads the items of
//! the frozen heads it misses through the B+tree's node cache, and evicts
//! down to the bound afterwards. Lookups read the cache, else the B+tree
//! ([`DurableEngine::lookup_extent_ref`]).
//!
//! An op's path through the files: `ingest.rs` (validate, engine add, log
//! append, back-pressure), `commit.rs` (cut and seal, run, B+tree apply,
//! superblock, trim), `read.rs` (lookups and scans of committed state),
//! `open.rs` (format, mount and recovery), `verify.rs` (fsck of a live
//! engine).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::engine::{Engine, TreeRead};
use refd_ioring::btree::{BTree, TreeConfig};
use refd_ioring::format::Superblock;
use refd_ioring::log::{LogConfig, Lsn, RecoveryMode, RefLog};
use refd_ioring::Storage;

use crate::committer::{Committer, CommitterStats, SystemClock};
use crate::error::{CommitError, Failure};
use crate::policy::{self, CommitPolicy, PolicyInput};
use crate::service::{Service, ServiceOptions};
use crate::stats::{CommitSummary, CommitTotals};

mod commit;
mod ingest;
pub(crate) mod open;
mod read;
mod service;
mod verify;

pub use read::{count_extents, load_extents, read_extent_count, read_held, scan_extents};
pub use service::{read_service, FreedPage, ServiceStats, Submitted};

/// Default log region: this fraction of the device ...
pub const LOG_DEVICE_FRACTION: u64 = 8;
/// ... but at least this much when the device has twice that.
pub const LOG_BYTES_MIN_DEFAULT: u64 = 64 << 20;
/// Smallest node region accepted by [`DurableEngine::format`] (in nodes).
pub const NODE_REGION_NODES_MIN: u64 = 16;
/// Fewest concurrent appends a log must admit (see [`DurableEngine::add`]).
pub const APPENDERS_MIN: usize = 2;
/// Default node cache of the B+tree: a uniformly updated tree of a
/// million extents is about 100–160 MiB of leaves, and a commit
/// copy-on-writes every one of them while the old ones are still cached, so
/// it needs about twice the tree; a commit that must read evicted leaves
/// back reads them one at a time. Measured (40 s, 1M extents, loop device):
/// the B+tree apply step took 241 ms per commit with 256 MiB, 120 ms with
/// 512 MiB, and ingest no longer stalled for whole seconds.
pub const NODE_CACHE_BYTES_DEFAULT: usize = 512 << 20;
/// Default bound of the in-memory extent cache (extents; about 150 bytes
/// each plus their backrefs).
pub const CACHE_EXTENTS_DEFAULT: usize = 2_000_000;

/// Layout choices for [`DurableEngine::format`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatOptions {
    /// Log region bytes (multiple of 4096). Default: 1/8 of the device, at
    /// least [`LOG_BYTES_MIN_DEFAULT`] when the device has twice that.
    pub log_bytes: Option<u64>,
    /// File system id. Default: random.
    pub fs_id: Option<refd_ioring::format::FsId>,
}

/// Configuration of an opened engine.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// The ref log.
    pub log: LogConfig,
    /// The B+tree (its node cache bounds the memory of tree reads).
    pub tree: TreeConfig,
    /// Bound of the in-memory extent cache, in extents. A commit's frozen
    /// heads are held in it beyond the bound until the commit ends.
    pub cache_extents_max: usize,
    /// When to commit and when ingest waits (`crate::policy`).
    pub policy: CommitPolicy,
    /// Turn on ref-verify: every op is checked against a shadow of the
    /// extent tree before it is queued (refused ops are never logged).
    pub verify: bool,
    /// Bounds of the daemon's state (sessions, freed lists).
    pub service: ServiceOptions,
    /// Where recovery's progress lines go (extents cached, log records
    /// replayed), one per [`crate::progress::Progress::EVERY`] of a long
    /// open; `None`: silent.
    pub progress: Option<fn(&str)>,
    /// What recovery does with a log damaged in the middle (an unreadable
    /// batch followed by intact ones): refuse ([`RecoveryMode::Strict`],
    /// the default: [`crate::OpenError::LogDamaged`]) or drop what an
    /// operator chose to give up, recorded in the superblock.
    pub recovery_mode: RecoveryMode,
    /// Use a device larger than its superblock records (a file or volume
    /// extended since it was formatted): the node region is extended to
    /// the device's end, recorded by the superblock the open writes anyway
    /// (its generation claim). Off: the extra bytes stay unused
    /// ([`crate::RecoveryInfo::device_growable_bytes`] says how many).
    pub grow: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            log: LogConfig::default(),
            tree: TreeConfig {
                cache_bytes: NODE_CACHE_BYTES_DEFAULT,
                ..TreeConfig::default()
            },
            cache_extents_max: CACHE_EXTENTS_DEFAULT,
            policy: CommitPolicy::default(),
            verify: false,
            service: ServiceOptions::default(),
            progress: None,
            recovery_mode: RecoveryMode::Strict,
            grow: false,
        }
    }
}

/// An acknowledged-when-durable op: [`Ticket::wait`] returns once its log
/// record is on the media.
#[derive(Debug)]
pub struct Ticket<S: Storage>(refd_ioring::log::Ticket<S>);

impl<S: Storage> Ticket<S> {
    /// The LSN of the log batch holding the op.
    pub fn lsn(&self) -> Lsn {
        self.0.lsn()
    }

    /// Blocks until the op's record is durable.
    pub fn wait(&self) -> Result<Lsn, Failure> {
        self.0.wait().map_err(|e| {
            let operation = format!("wait for LSN {}", self.0.lsn().get());
            Failure::of_log(e.device().unwrap_or("log"), operation, &e)
        })
    }

    /// True once the record is durable.
    pub fn is_durable(&self) -> bool {
        self.0.is_durable()
    }
}

#[derive(Debug)]
pub(crate) struct CommitState {
    /// The last durable superblock.
    sb: Superblock,
    /// Generation of the next commit.
    next_generation: u64,
    /// Chunks of the held-heads stream in the committed B+tree.
    held_chunks: usize,
    /// The committed B+tree records the extent count (else the next
    /// commit writes it even if the count does not change).
    extents_recorded: bool,
}

/// Committer wake-up state, behind `DurableEngine::committer`.
#[derive(Debug, Default)]
pub(crate) struct CommitterFlags {
    pub stop: bool,
    pub kicked: bool,
}

/// The durable delayed-ref engine over storage `S` (a cheap handle such as
/// `Arc<SimStorage>` or `Arc<UringStorage>`: the log and the tree each keep
/// a clone) with pending ops in store `D` (the lock-free store, or the
/// mutex baseline).
pub struct DurableEngine<S: Storage + Clone, D: DelayedRefStore = LockFreeStore> {
    storage: S,
    engine: Engine<D>,
    log: RefLog<S>,
    tree: BTree<S>,
    /// Read: ingest (append + add). Write: taking the cut and freezing.
    cut: RwLock<()>,
    /// Appends in flight (admission, see [`DurableEngine::add`]).
    appenders: AtomicUsize,
    appenders_max: usize,
    commit: Mutex<CommitState>,
    /// Updated at the end of each commit, under its own lock: reading
    /// the totals does not wait for a running commit.
    totals: Mutex<CommitTotals>,
    failed: OnceLock<Failure>,
    /// Bytenrs of the running commit's frozen heads (sorted), from the
    /// moment their items are cached until the B+tree has the commit's
    /// changes: a cache miss among them means "no item" (see
    /// [`DurableEngine::lookup_extent_ref`]). Empty between commits and
    /// while the cache is complete.
    inflight: RwLock<Arc<Vec<u64>>>,
    cache_extents_max: usize,
    /// The cache holds the whole committed tree (open loaded all of it and
    /// nothing was evicted since): a miss is an extent without item, and
    /// nothing is read from the B+tree.
    cache_complete: AtomicBool,
    policy: Mutex<CommitPolicy>,
    /// Ops added since the last seal (counted under the cut lock).
    pending_ops: AtomicU64,
    /// Node space reserved by the ops not yet committed
    /// (`crate::space`; changed under the cut lock, like `pending_ops`).
    space: crate::space::Gate,
    /// Heads the last commit (or recovery) requeued because a seq barrier
    /// held them.
    heads_held: AtomicU64,
    /// Extent items in the committed tree (the last commit's count).
    extents: AtomicU64,
    /// Pending ops that start a commit (`crate::policy`).
    trigger_ops: AtomicU64,
    /// Measured commit time per op, picoseconds (0: not yet measured).
    op_cost_ps: AtomicU64,
    /// Measured dirty node bytes per op (0: not yet measured).
    dirty_bytes_per_op: AtomicU64,
    pub(crate) committer: Mutex<CommitterFlags>,
    pub(crate) committer_cv: Condvar,
    /// Held by an add or SUBMIT with a stamped op ([`Op::is_stamped`]:
    /// allocations and extent_ops) from the core engine's add to the log
    /// append, so that such ops are logged in the order they were
    /// stamped: recovery stamps replayed ops in log order, and the latest
    /// stamp decides an allocation's shape and an extent_op's key (taken
    /// after the cut lock, before the service lock).
    stamp_order: Mutex<()>,
    /// Sessions and freed-list consumers (taken after the cut lock).
    service: Mutex<Service>,
    /// Signalled when a SUBMIT's claim on its request number ends.
    service_cv: Condvar,
    /// Called with every successful commit's summary.
    commit_hook: OnceLock<CommitHook>,
    /// The last durable superblock's generation (lock-free copy).
    generation: AtomicU64,
    /// The file system id.
    fs_id: refd_ioring::format::FsId,
    /// Adds that back-pressure made wait for (or run) a commit, and how
    /// long they waited in all (ns).
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
    /// Adds that pacing made sleep, and how long in all (ns).
    paced: AtomicU64,
    paced_ns: AtomicU64,
}

/// See [`DurableEngine::set_commit_hook`].
type CommitHook = Box<dyn Fn(&CommitSummary) + Send + Sync>;

impl<S: Storage + Clone, D: DelayedRefStore> fmt::Debug for DurableEngine<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableEngine")
            .field("device", &self.storage.device_name())
            .field("store", &self.engine.store().name())
            .field("failed", &self.failure())
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: Storage + Clone, D: DelayedRefStore> DurableEngine<S, D> {
    /// The first failure, if the engine has failed (its own latch, the
    /// log's or the storage's).
    pub fn failure(&self) -> Option<Failure> {
        if let Some(f) = self.failed.get() {
            return Some(f.clone());
        }
        let device = self.storage.device_name();
        if let Some(e) = self.log.failure() {
            return Some(Failure::of_log(device, "log write", &e));
        }
        self.storage.failure().map(|f| Failure::of_io(&f))
    }

    /// Latches `failure` as the first failure (if none yet) and returns
    /// the one latched.
    fn latch(&self, failure: Failure) -> Failure {
        self.failed.get_or_init(|| failure).clone()
    }

    /// The node region's space and the reservations on it
    /// (`crate::space`); takes no lock a commit holds for long.
    pub fn node_space(&self) -> crate::space::NodeSpace {
        let space = self.tree.space();
        let live = self.space.live();
        crate::space::NodeSpace {
            region_nodes: space.region_nodes,
            free_nodes: space.free_nodes,
            pending_nodes: space.pending_nodes,
            tree_nodes: space.working_nodes,
            reserved_nodes: self.space.reserved_nodes(&space),
            reserved_units: live.units,
            reserved_bytes: live.bytes,
            refused: self.space.refused.load(Ordering::Relaxed),
            bitmap_run_nodes: space.run_nodes,
            spare_nodes: space.spare_nodes,
            no_spare_window: space.run_first_fit,
        }
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        self.storage.device_name()
    }

    /// The in-memory extent cache (a subset of the committed tree; every
    /// item in it equals the B+tree's after each successful commit).
    pub fn cached_extents(&self) -> TreeRead<'_> {
        self.engine.tree()
    }

    /// The core engine (pending store, barrier, quarantine). Its tree is
    /// the extent cache, not the whole committed tree: use this engine's
    /// `lookup_extent_ref`, `add` and `commit`, not core's (which would
    /// count from the cache only, or skip the log).
    pub fn core(&self) -> &Engine<D> {
        &self.engine
    }

    /// The ref log (space: `used_bytes`, `free_bytes`; stats).
    pub fn log(&self) -> &RefLog<S> {
        &self.log
    }

    /// The on-disk B+tree.
    pub fn btree(&self) -> &BTree<S> {
        &self.tree
    }

    /// Totals over every commit since open (never waits for a running
    /// commit: it is counted once it ends).
    pub fn commit_totals(&self) -> CommitTotals {
        *lock(&self.totals)
    }

    /// The last durable superblock (waits for a running commit; see
    /// [`DurableEngine::generation`]).
    pub fn superblock(&self) -> Superblock {
        lock(&self.commit).sb.clone()
    }

    /// The last committed generation (never waits for a running commit).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The file system id.
    pub fn fs_id(&self) -> refd_ioring::format::FsId {
        self.fs_id
    }

    /// Adds that back-pressure (twice the pending-op trigger) made wait
    /// for, or run, a commit; and their waiting time in all.
    pub fn throttled(&self) -> (u64, std::time::Duration) {
        (
            self.throttled.load(Ordering::Relaxed),
            std::time::Duration::from_nanos(self.throttled_ns.load(Ordering::Relaxed)),
        )
    }

    /// Adds that pacing ([`crate::policy::CommitPolicy::pace`]) made
    /// sleep while a commit ran, and their sleeping time in all.
    pub fn paced(&self) -> (u64, std::time::Duration) {
        (
            self.paced.load(Ordering::Relaxed),
            std::time::Duration::from_nanos(self.paced_ns.load(Ordering::Relaxed)),
        )
    }

    /// Concurrent appends admitted at once (`log_bytes / (4 × batch cap)`).
    pub fn appenders_max(&self) -> usize {
        self.appenders_max
    }

    /// The commit policy in force.
    pub fn policy(&self) -> CommitPolicy {
        *lock(&self.policy)
    }

    /// Replaces the commit policy (the pending-op trigger is recomputed at
    /// once; a running committer takes a new interval after its next
    /// wake-up).
    pub fn set_policy(&self, policy: CommitPolicy) {
        *lock(&self.policy) = policy;
        self.record_commit(0, Duration::ZERO, 0);
    }

    /// The pending-op count that starts a commit now (see `crate::policy`).
    pub fn commit_trigger_ops(&self) -> u64 {
        self.trigger_ops.load(Ordering::Relaxed)
    }

    /// Ops pending (added since the last seal), counted exactly.
    pub fn pending_ops(&self) -> u64 {
        self.pending_ops.load(Ordering::Relaxed)
    }

    /// Heads the last commit (or recovery) requeued because a seq barrier
    /// held them: pending too, committed by the interval (not counted in
    /// [`DurableEngine::pending_ops`] or back-pressure).
    pub fn heads_held(&self) -> u64 {
        self.heads_held.load(Ordering::Relaxed)
    }

    /// Extent items in the committed tree: kept by every commit (items
    /// inserted minus items deleted) and recorded in the tree with them
    /// (`docs/format.md`, "Extent count").
    pub fn extents(&self) -> u64 {
        self.extents.load(Ordering::Relaxed)
    }

    /// The measured commit time per op (picoseconds; 0 until a commit of
    /// at least [`policy::ESTIMATE_OPS_MIN`] ops).
    pub fn commit_cost_ps_per_op(&self) -> u64 {
        self.op_cost_ps.load(Ordering::Relaxed)
    }

    /// The measured dirty B+tree node bytes per op (0 until a commit of
    /// at least [`policy::DIRTY_ESTIMATE_OPS_MIN`] ops).
    pub fn commit_dirty_bytes_per_op(&self) -> u64 {
        self.dirty_bytes_per_op.load(Ordering::Relaxed)
    }

    /// Update the time-per-op and dirty-bytes-per-op estimates with a
    /// commit of `ops` frozen ops that took `took` and dirtied
    /// `dirty_bytes` of nodes, and the pending-op trigger with them.
    pub(crate) fn record_commit(&self, ops: u64, took: Duration, dirty_bytes: u64) {
        let old = self.op_cost_ps.load(Ordering::Relaxed);
        let ps = policy::next_op_cost_ps(old, ops, took);
        self.op_cost_ps.store(ps, Ordering::Relaxed);
        let old = self.dirty_bytes_per_op.load(Ordering::Relaxed);
        let policy = self.policy();
        let per_op =
            policy::next_dirty_bytes_per_op(old, ops, dirty_bytes, policy.dirty_bytes_trigger);
        self.dirty_bytes_per_op.store(per_op, Ordering::Relaxed);
        let trigger = policy.trigger_ops(ps, per_op);
        self.trigger_ops.store(trigger, Ordering::Relaxed);
    }

    /// What the policy looks at now.
    pub(crate) fn policy_input(&self, since_last_start: Duration, kicked: bool) -> PolicyInput {
        PolicyInput {
            pending_ops: self.pending_ops(),
            heads_held: self.heads_held(),
            barriers_active: self.engine.barrier().active(),
            log_used_bytes: self.log.used_bytes(),
            log_bytes: self.log.log_bytes(),
            trigger_ops: self.commit_trigger_ops(),
            dirty_bytes_per_op: self.commit_dirty_bytes_per_op(),
            since_last_start,
            kicked,
        }
    }

    pub(crate) fn kick_committer(&self) {
        let mut f = lock(&self.committer);
        if !f.kicked {
            f.kicked = true;
            self.committer_cv.notify_all();
        }
    }

    pub(crate) fn take_kick(&self) -> bool {
        std::mem::take(&mut lock(&self.committer).kicked)
    }

    /// Calls `hook` with the summary of every successful commit from now
    /// on, on the committing thread (keep it short: metrics, logs). Set
    /// once; later calls are ignored (returns false).
    pub fn set_commit_hook(&self, hook: impl Fn(&CommitSummary) + Send + Sync + 'static) -> bool {
        self.commit_hook.set(Box::new(hook)).is_ok()
    }

    /// Asks a running committer ([`DurableEngine::run_committer`]) to
    /// commit what is pending and return.
    pub fn stop_committer(&self) {
        lock(&self.committer).stop = true;
        self.committer_cv.notify_all();
    }

    /// Runs the commit policy on this thread with the system clock until
    /// [`DurableEngine::stop_committer`] (see [`Committer::run`]).
    pub fn run_committer(&self) -> Result<CommitterStats, CommitError> {
        Committer::new(self, SystemClock).run()
    }
}

#[cfg(test)]
mod tests;
