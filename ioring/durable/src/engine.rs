//! [`DurableEngine`]: the core delayed-ref [`Engine`] made durable by the
//! ref log and the copy-on-write B+tree. The ordering is the one of
//! `docs/log.md` ("Wiring commit and recovery") and `docs/btree.md`
//! ("Commit protocol"); `docs/durable.md` describes it end to end.
//!
//! Invariants:
//! - an op is in the core engine iff its record is in the log (both are
//!   done under the read side of the *cut lock*, so a commit's cut, taken
//!   under the write side, splits the ops exactly: LSN < cut ⇔ frozen);
//! - after every successful commit, the working B+tree holds exactly the
//!   encoding of the core engine's committed [`ExtentTree`]
//!   ([`DurableEngine::verify`] checks it);
//! - nothing is acknowledged after a failed write or flush: the first
//!   failure latches and every later call returns [`DurableError::Failed`].
//!
//! The committed extent tree lives in the B+tree, which may be larger than
//! memory; the core engine's tree is a bounded cache of it (core's
//! "partial trees"): `open` warms it with up to
//! [`OpenOptions::cache_extents_max`] extents, a commit reads the items of
//! the frozen heads it misses through the B+tree's node cache, and evicts
//! down to the bound afterwards. Lookups read the cache, else the B+tree
//! ([`DurableEngine::lookup_extent_ref`]).

use std::fmt;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::engine::{CommitReport, Engine, EngineError, ExtentRefs, RunSink, TreeRead};
use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::head::{DelayedRef, Head, RunRefs};
use refd_core::model::{Op, OpError};
use refd_ioring::btree::{BTree, BTreeError, Change, Key, TreeCheck, TreeConfig, VALUE_BYTES_MAX};
use refd_ioring::format::{
    pick_newest, FormatError, FsId, Layout, Superblock, SuperblockChoice, NODE_BYTES,
    SUPERBLOCK_BYTES, SUPERBLOCK_FLAG_CLEAN_UNMOUNT, SUPERBLOCK_REGION_BYTES,
    SUPERBLOCK_SLOT_ADDRS,
};
use refd_ioring::log::{replay, LogConfig, LogError, Lsn, RecoveryReport, RefLog};
use refd_ioring::{Storage, StorageError};

use crate::codec::{self, CodecError, ExtentLoader};
use crate::policy::{CommitPolicy, CommitterFlags};
use crate::progress::{Progress, PROGRESS_CHECK_ITEMS};

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
/// Extents read from the B+tree per thread below which a commit reads its
/// misses on one thread.
const PARALLEL_READ_MIN_EXTENTS: usize = 4096;
const BLOCK: u64 = refd_ioring::BLOCK_BYTES as u64;

thread_local! {
    /// Each thread's op record buffer for [`DurableEngine::add`] (the log
    /// copies the record into its batch; no allocation per op).
    static RECORD: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(codec::OP_RECORD_BYTES_MAX));
}

/// Errors of the durable engine, with the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// A device read or write outside the log and the tree.
    #[error("{context}: {source}")]
    Storage {
        /// What was being done (device, address).
        context: String,
        /// Cause.
        source: StorageError,
    },
    /// A superblock could not be encoded or no valid copy was found.
    #[error("{context}: {source}")]
    Format {
        /// What was being done.
        context: String,
        /// Cause.
        source: FormatError,
    },
    /// The ref log failed.
    #[error("{context}: {source}")]
    Log {
        /// What was being done.
        context: String,
        /// Cause.
        source: LogError,
    },
    /// The B+tree failed.
    #[error("{context}: {source}")]
    Tree {
        /// What was being done.
        context: String,
        /// Cause.
        source: BTreeError,
    },
    /// A replayed log record does not decode.
    #[error("log record at LSN {lsn}: {source}")]
    Record {
        /// LSN of its batch.
        lsn: u64,
        /// Cause.
        source: CodecError,
    },
    /// The extent items on disk do not decode, or an item does not encode.
    #[error("{context}: {source}")]
    Items {
        /// What was being done.
        context: String,
        /// Cause.
        source: CodecError,
    },
    /// The op is malformed (nothing was logged).
    #[error("op refused: {0}")]
    Op(#[from] OpError),
    /// The core engine refused the op (nothing was logged).
    #[error("core engine refused the op: {0}")]
    Engine(#[from] EngineError),
    /// The device cannot hold the requested layout.
    #[error("layout of {device}: {reason}")]
    Layout {
        /// Device.
        device: String,
        /// Why.
        reason: String,
    },
    /// On-disk and in-memory state disagree ([`DurableEngine::verify`]).
    #[error("inconsistent state: {reason}")]
    Inconsistent {
        /// What differs.
        reason: String,
    },
    /// An earlier write or flush failed: nothing more is acknowledged;
    /// reopen the device (recovery replays the log).
    #[error("durable engine failed earlier, acknowledging nothing more: {first}")]
    Failed {
        /// The first failure.
        first: Arc<str>,
    },
}

/// Result of this crate.
pub type Result<T, E = DurableError> = std::result::Result<T, E>;

/// Layout choices for [`DurableEngine::format`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatOptions {
    /// Log region bytes (multiple of 4096). Default: 1/8 of the device, at
    /// least [`LOG_BYTES_MIN_DEFAULT`] when the device has twice that.
    pub log_bytes: Option<u64>,
    /// File system id. Default: random.
    pub fs_id: Option<FsId>,
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
    /// Where recovery's progress lines go (extents cached, log records
    /// replayed), one per [`Progress::EVERY`] of a long open; `None`:
    /// silent.
    pub progress: Option<fn(&str)>,
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
            progress: None,
        }
    }
}

/// What [`DurableEngine::open`] found and did.
#[derive(Debug, Clone)]
pub struct RecoveryInfo {
    /// Generation of the superblock recovery started from.
    pub superblock_generation: u64,
    /// Its slot (0 or 1).
    pub superblock_slot: usize,
    /// Rejected superblock copies and why (normal after a torn write, or
    /// with a freshly formatted device's older copy).
    pub superblock_rejected: Vec<String>,
    /// Extents read into the in-memory cache (at most
    /// [`OpenOptions::cache_extents_max`]).
    pub extents_cached: usize,
    /// Ops replayed from the log into the core engine (now pending).
    pub ops_replayed: usize,
    /// Heads the last commit held back (seq barrier), requeued (pending).
    pub heads_held: usize,
    /// The log's replay report: where and why the log ended.
    pub replay: RecoveryReport,
    /// Generation written at open to claim any generation a lost commit
    /// may have used (see `docs/durable.md`, "Generations").
    pub claimed_generation: u64,
}

impl fmt::Display for RecoveryInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recovered from superblock generation {} (slot {}), {} extents cached, {} held \
             heads requeued, {} ops replayed, claimed generation {}; log: {}",
            self.superblock_generation,
            self.superblock_slot,
            self.extents_cached,
            self.heads_held,
            self.ops_replayed,
            self.claimed_generation,
            self.replay
        )?;
        for r in &self.superblock_rejected {
            write!(f, "; rejected {r}")?;
        }
        Ok(())
    }
}

/// What one [`DurableEngine::commit`] did.
#[derive(Debug, Clone)]
pub struct CommitSummary {
    /// Superblock generation written (the commit point).
    pub generation: u64,
    /// The cut: every op with a lower LSN is in this commit.
    pub cut: Lsn,
    /// The core engine's report (heads run, freed extents, quarantine).
    pub core: CommitReport,
    /// B+tree item changes written.
    pub item_changes: usize,
    /// B+tree nodes written (including the free-space bitmap).
    pub nodes_written: u64,
    /// Extents of frozen heads read from the B+tree (cache misses).
    pub extents_read: usize,
    /// Extents evicted from the cache after the commit.
    pub extents_evicted: usize,
    /// Ops in the committed transaction.
    pub ops: u64,
    /// Where the time went.
    pub phases: CommitPhases,
}

/// Totals over every commit since open ([`DurableEngine::commit_totals`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitTotals {
    /// Successful commits.
    pub commits: u64,
    /// Ops committed.
    pub ops: u64,
    /// B+tree nodes written.
    pub nodes_written: u64,
    /// B+tree item changes.
    pub item_changes: u64,
    /// Extents read from the B+tree (cache misses).
    pub extents_read: u64,
    /// The longest commit's steps (`total`: its length), to tell what
    /// made it long.
    pub longest_phases: CommitPhases,
    /// Ops of the longest commit.
    pub longest_ops: u64,
    /// When the longest commit started.
    pub longest_start: Option<Instant>,
    /// Longest time between the starts of two consecutive commits.
    pub gap_max: Duration,
    /// Time per step, summed.
    pub phases: CommitPhases,
    /// When the latest commit started.
    pub last_start: Option<Instant>,
}

impl CommitTotals {
    fn add(&mut self, start: Instant, s: &CommitSummary) {
        self.commits += 1;
        self.ops += s.ops;
        self.nodes_written += s.nodes_written;
        self.item_changes += s.item_changes as u64;
        self.extents_read += s.extents_read as u64;
        if s.phases.total >= self.longest_phases.total {
            self.longest_phases = s.phases;
            self.longest_ops = s.ops;
            self.longest_start = Some(start);
        }
        if let Some(last) = self.last_start {
            self.gap_max = self.gap_max.max(start.duration_since(last));
        }
        self.last_start = Some(start);
        let (p, q) = (&mut self.phases, &s.phases);
        p.freeze += q.freeze;
        p.items += q.items;
        p.run += q.run;
        p.diff += q.diff;
        p.apply += q.apply;
        p.write += q.write;
        p.superblock += q.superblock;
        p.total += q.total;
    }
}

/// Wall time of each step of a commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitPhases {
    /// Seal (the only step that stops ingest) and merge into heads.
    pub freeze: Duration,
    /// Committed items of the frozen heads (cache, else B+tree reads).
    pub items: Duration,
    /// Core: run heads (each changed extent's B+tree changes encoded on
    /// the run's workers as it runs).
    pub run: Duration,
    /// Wait for the log below the cut; each run worker's item changes in
    /// key order (part of `apply`: on a commit worker, alongside the
    /// core's cache apply).
    pub diff: Duration,
    /// B+tree apply of the item changes (on a commit worker) alongside
    /// the core's apply to its cache (here); cache eviction.
    pub apply: Duration,
    /// B+tree node writes + flush.
    pub write: Duration,
    /// Superblock, release, trim.
    pub superblock: Duration,
    /// The whole commit.
    pub total: Duration,
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
    pub fn wait(&self) -> Result<Lsn> {
        self.0.wait().map_err(|source| DurableError::Log {
            context: format!("waiting for LSN {}", self.0.lsn().get()),
            source,
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
}

/// The durable delayed-ref engine over storage `S` (a cheap handle such as
/// `Arc<SimStorage>` or `Arc<UringStorage>`: the log and the tree each keep
/// a clone).
pub struct DurableEngine<S: Storage + Clone> {
    storage: S,
    engine: Engine<LockFreeStore>,
    log: RefLog<S>,
    tree: BTree<S>,
    /// Read: ingest (append + add). Write: taking the cut and freezing.
    cut: RwLock<()>,
    /// Appends in flight (admission, see [`DurableEngine::add`]).
    appenders: AtomicUsize,
    appenders_max: usize,
    pub(crate) commit: Mutex<CommitState>,
    /// Updated at the end of each commit, under its own lock: reading
    /// the totals does not wait for a running commit.
    totals: Mutex<CommitTotals>,
    failed: OnceLock<Arc<str>>,
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
    pub(crate) policy: Mutex<CommitPolicy>,
    /// Ops added since the last seal (counted under the cut lock).
    pub(crate) pending_ops: AtomicU64,
    /// Heads the last commit (or recovery) requeued because a seq barrier
    /// held them.
    pub(crate) heads_held: AtomicU64,
    /// Pending ops that start a commit (`crate::policy`).
    pub(crate) trigger_ops: AtomicU64,
    /// Measured commit time per op, picoseconds (0: not yet measured).
    pub(crate) op_cost_ps: AtomicU64,
    pub(crate) committer: Mutex<CommitterFlags>,
    pub(crate) committer_cv: Condvar,
}

impl<S: Storage + Clone> fmt::Debug for DurableEngine<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableEngine")
            .field("device", &self.storage.device_name())
            .field("failed", &self.failure())
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_superblock<S: Storage>(storage: &S, sb: &Superblock) -> Result<()> {
    let buf = sb.encode().map_err(|source| DurableError::Format {
        context: format!("encode superblock generation {}", sb.generation),
        source,
    })?;
    storage
        .write_durable(sb.addr(), &buf)
        .map_err(|source| DurableError::Storage {
            context: format!(
                "{}: write superblock generation {} at {}",
                storage.device_name(),
                sb.generation,
                sb.addr()
            ),
            source,
        })
}

/// Read both superblock copies of `storage` and pick the newest valid one
/// (the choice also says which copies were rejected and why).
pub fn read_newest_superblock<S: Storage + ?Sized>(storage: &S) -> Result<SuperblockChoice> {
    let device = storage.device_name().to_string();
    let mut slots = [vec![0u8; SUPERBLOCK_BYTES], vec![0u8; SUPERBLOCK_BYTES]];
    for (addr, buf) in SUPERBLOCK_SLOT_ADDRS.iter().zip(slots.iter_mut()) {
        storage
            .read(*addr, buf)
            .map_err(|source| DurableError::Storage {
                context: format!("{device}: read superblock slot at {addr}"),
                source,
            })?;
    }
    pick_newest(&slots[0], &slots[1]).map_err(|source| DurableError::Format {
        context: format!("{device}: no valid superblock"),
        source,
    })
}

/// Calls `f` with every extent of `tree` whose bytenr is in `bytenrs`,
/// in bytenr order, decoded and checked (one extent in memory at a time),
/// until `f` breaks.
pub fn scan_extents<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    bytenrs: std::ops::RangeInclusive<u64>,
    mut f: impl FnMut(u64, ExtentItem) -> ControlFlow<()>,
) -> Result<()> {
    let items_err = |key: Option<Key>| {
        let context = match key {
            Some(k) => format!(
                "{device}: item ({} {} {})",
                k.objectid, k.item_type, k.offset
            ),
            None => format!("{device}: last extent item"),
        };
        move |source| DurableError::Items { context, source }
    };
    let mut loader = ExtentLoader::new();
    let range = Key::new(*bytenrs.start(), 0, 0)..=Key::new(*bytenrs.end(), u8::MAX, u64::MAX);
    for item in tree.range(range) {
        let (key, value) = item.map_err(|source| DurableError::Tree {
            context: format!("{device}: read extent items"),
            source,
        })?;
        if let Some((bytenr, item)) = loader.push(&key, &value).map_err(items_err(Some(key)))? {
            if f(bytenr, item).is_break() {
                return Ok(());
            }
        }
    }
    if let Some((bytenr, item)) = loader.finish().map_err(items_err(None))? {
        let _ = f(bytenr, item);
    }
    Ok(())
}

/// Load every extent item of a committed B+tree into an in-memory extent
/// tree (every item is decoded and checked). Needs memory for all of them:
/// for tools and tests; the engine reads through [`scan_extents`].
pub fn load_extents<S: Storage>(tree: &BTree<S>, device: &str) -> Result<ExtentTree> {
    let mut out = ExtentTree::new();
    scan_extents(tree, device, 0..=codec::EXTENT_BYTENR_MAX, |b, item| {
        out.insert(b, item);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// The held-heads stream of a committed B+tree, decoded, and its chunk
/// count (chunks must be numbered 0, 1, ... without a gap).
pub fn read_held<S: Storage>(tree: &BTree<S>, device: &str) -> Result<(Vec<Head>, usize)> {
    let mut stream = Vec::new();
    let mut chunks = 0u64;
    let range = Key::new(codec::HELD_OBJECTID, codec::HELD_HEADS_KEY, 0)
        ..=Key::new(codec::HELD_OBJECTID, codec::HELD_HEADS_KEY, u64::MAX);
    for item in tree.range(range) {
        let (key, value) = item.map_err(|source| DurableError::Tree {
            context: format!("{device}: read held heads"),
            source,
        })?;
        // Chunks are numbered from 0 without a gap, and only the last may
        // be short (`codec::held_items`).
        let short_before = stream.len() as u64 != chunks * VALUE_BYTES_MAX as u64;
        if key.offset != chunks || short_before || value.is_empty() {
            return Err(DurableError::Items {
                context: format!(
                    "{device}: held heads chunk {} of {} bytes where chunk {chunks} is due after \
                     {} full chunks",
                    key.offset,
                    value.len(),
                    chunks
                ),
                source: CodecError::Invalid {
                    field: "held heads chunk (number or length)",
                    value: key.offset,
                },
            });
        }
        stream.extend_from_slice(&value);
        chunks += 1;
    }
    if chunks == 0 {
        return Ok((Vec::new(), 0));
    }
    let heads = codec::decode_held(&stream).map_err(|source| DurableError::Items {
        context: format!("{device}: held heads ({chunks} chunks)"),
        source,
    })?;
    Ok((heads, chunks as usize))
}

/// Seq barriers live in memory: none survives a crash, and the new
/// engine's barrier counter restarts at 0, so a recovered ref's seq would
/// hold it behind every new barrier until the counter passed it. Recovery
/// clears the seqs of requeued heads (their refs of one key then merge, as
/// they would at run time with no barrier) and of replayed ops.
fn forget_seq(head: &mut Head) {
    // The net refs a run with no barrier merges (non-zero, sorted by key).
    if let RunRefs::Ready(net) = head.run_refs(0) {
        head.refs = net
            .into_iter()
            .map(|(key, ref_mod)| DelayedRef {
                key,
                seq: 0,
                ref_mod,
            })
            .collect();
    }
}

/// Decodes every replayed record and adds its op to `engine` (pending), in
/// log order. (Routing ops by bytenr to one worker per core was measured
/// at the same speed on this 2-core machine: the decoding reader is the
/// bound, so replay stays on one thread.)
fn replay_ops(
    engine: &Engine<LockFreeStore>,
    replayed: &refd_ioring::Replay,
    progress: &mut Progress,
    device: &str,
) -> Result<usize> {
    let mut h = engine.handle()?;
    let mut n: usize = 0;
    for rec in replayed.records() {
        if n > 0 && n.is_multiple_of(PROGRESS_CHECK_ITEMS) {
            progress.tick(|| format!("{device}: recovery: {n} log records replayed"));
        }
        let mut op = codec::decode_op(rec.data).map_err(|source| DurableError::Record {
            lsn: rec.lsn.get(),
            source,
        })?;
        op.seq = 0; // see `forget_seq`
        h.add(&op)?;
        n += 1;
    }
    Ok(n)
}

/// The committed item of `bytenr` in `tree`.
fn read_extent<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    bytenr: u64,
) -> Result<Option<ExtentItem>> {
    let mut found = None;
    scan_extents(tree, device, bytenr..=bytenr, |b, item| {
        debug_assert_eq!(b, bytenr);
        found = Some(item);
        ControlFlow::Break(())
    })?;
    Ok(found)
}

/// `f` over `items` cut into one contiguous part per core (at least
/// `per_worker_min` items each, else on this thread; on the commit run's
/// workers, `refd_core::engine::in_parts`), outputs concatenated in order;
/// the first error (in part order) is returned.
fn par_chunks<T: Sync, R: Send, E: Send>(
    items: &[T],
    per_worker_min: usize,
    f: impl Fn(&[T]) -> std::result::Result<Vec<R>, E> + Sync,
) -> std::result::Result<Vec<R>, E> {
    let mut out: Vec<R> = Vec::new();
    for part in refd_core::engine::in_parts(items, per_worker_min, |_, part| f(part)) {
        let part = part?;
        if out.is_empty() {
            out = part;
        } else {
            out.extend(part);
        }
    }
    Ok(out)
}

/// The B+tree changes of a commit, encoded on the core run's workers as
/// each head runs ([`RunSink`]): each changed extent from its committed
/// item to its new one.
struct ItemDiff;

/// What the B+tree side of a commit did (`DurableEngine::apply_items`).
#[derive(Debug)]
struct AppliedItems {
    /// Item puts and deletes applied.
    item_changes: usize,
    /// Chunks of held heads now in the B+tree.
    held_chunks: usize,
    /// Time to wait for the log and sort the changes.
    diff: Duration,
}

/// B+tree changes of items, by key.
type ItemChanges = Vec<(Key, Change)>;

/// One run worker's item changes, in its selection order.
#[derive(Debug)]
struct ItemDiffPart {
    changes: ItemChanges,
    /// The first extent that could not be encoded (the rest of the part is
    /// skipped: the commit fails).
    error: Option<(u64, CodecError)>,
}

impl RunSink for ItemDiff {
    type Part = ItemDiffPart;

    fn part(&self, heads: usize) -> ItemDiffPart {
        ItemDiffPart {
            // Most extents change only their extent item.
            changes: Vec::with_capacity(heads + heads / 8),
            error: None,
        }
    }

    fn effect(
        &self,
        part: &mut ItemDiffPart,
        bytenr: u64,
        before: Option<&ExtentItem>,
        after: Option<&ExtentItem>,
    ) {
        if part.error.is_some() || before == after {
            return;
        }
        if let Err(e) = codec::diff_extent(bytenr, before, after, &mut part.changes) {
            part.error = Some((bytenr, e));
        }
    }
}

/// The run workers' item changes, each part sorted by key (keys begin
/// with the bytenr, and a part is in bytenr order except after a rare
/// wrap-around of head selection); the parts cover ascending bytenr ranges,
/// so applied one after the other they are one ascending list. Not joined:
/// that would copy them all. The first error in part order.
fn sorted_item_diffs(parts: Vec<ItemDiffPart>) -> Result<Vec<ItemChanges>, (u64, CodecError)> {
    let mut sorted = Vec::with_capacity(parts.len());
    for part in parts {
        if let Some(e) = part.error {
            return Err(e);
        }
        let mut changes = part.changes;
        if !changes.is_sorted_by(|a, b| a.0 < b.0) {
            changes.sort_unstable_by_key(|c| c.0);
        }
        sorted.push(changes);
    }
    Ok(sorted)
}

/// The committed items of `bytenrs`, read on up to one thread per core.
fn read_extents<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    bytenrs: &[u64],
) -> Result<Vec<Option<ExtentItem>>> {
    par_chunks(bytenrs, PARALLEL_READ_MIN_EXTENTS, |part| {
        part.iter().map(|&b| read_extent(tree, device, b)).collect()
    })
}

impl<S: Storage + Clone> DurableEngine<S> {
    /// Writes a fresh file system on `storage`: both superblock copies
    /// (generations 1 and 2), an empty log and an empty tree. Destroys
    /// whatever the device held. Returns the newest superblock.
    pub fn format(storage: &S, options: FormatOptions) -> Result<Superblock> {
        let geometry = storage.geometry();
        let device = storage.device_name().to_string();
        let size = geometry.size_bytes / BLOCK * BLOCK;
        let layout = |reason: String| DurableError::Layout {
            device: device.clone(),
            reason,
        };
        let avail = size.saturating_sub(SUPERBLOCK_REGION_BYTES);
        let log_bytes = match options.log_bytes {
            Some(b) => b,
            None => {
                (size / LOG_DEVICE_FRACTION)
                    .max(LOG_BYTES_MIN_DEFAULT.min(avail / 2))
                    .min(avail / 2)
                    / BLOCK
                    * BLOCK
            }
        };
        if log_bytes < 2 * BLOCK || log_bytes % BLOCK != 0 {
            return Err(layout(format!(
                "log of {log_bytes} bytes: need a multiple of 4096, at least 8192"
            )));
        }
        let log_start = SUPERBLOCK_REGION_BYTES;
        let node_region_start = log_start + log_bytes;
        let node = NODE_BYTES as u64;
        let node_region_bytes = size.saturating_sub(node_region_start) / node * node;
        if node_region_bytes < NODE_REGION_NODES_MIN * node {
            return Err(layout(format!(
                "{size} bytes with a {log_bytes}-byte log leave {node_region_bytes} bytes for \
                 nodes; need at least {NODE_REGION_NODES_MIN} nodes"
            )));
        }
        let fs_id = match options.fs_id {
            Some(id) => id,
            None => FsId::generate().map_err(|e| layout(format!("generate fs id: {e}")))?,
        };
        let mut sb = Superblock::empty(
            fs_id,
            geometry,
            Layout {
                log_start,
                log_bytes,
                node_region_start,
                node_region_bytes,
            },
        );
        sb.validate().map_err(|source| DurableError::Format {
            context: format!("{device}: new superblock"),
            source,
        })?;
        // Both copies, so no leftover of an earlier format is picked.
        write_superblock(storage, &sb)?;
        sb.generation = 2;
        write_superblock(storage, &sb)?;
        Ok(sb)
    }

    /// Mounts: newest valid superblock, B+tree, up to
    /// [`OpenOptions::cache_extents_max`] extents into the core engine's
    /// cache, log replay (every replayed op becomes pending),
    /// `RefLog::open`, then a durable superblock that claims the next
    /// generation. Reads only until `RefLog::open`'s flush, so a crash
    /// during recovery recovers again from the same superblock.
    pub fn open(storage: S, options: OpenOptions) -> Result<(Self, RecoveryInfo)> {
        let device = storage.device_name().to_string();
        let choice = read_newest_superblock(&storage)?;
        let sb = choice.superblock;
        let tree =
            BTree::open_superblock(storage.clone(), &sb, options.tree).map_err(|source| {
                DurableError::Tree {
                    context: format!(
                        "{device}: open B+tree of superblock generation {}",
                        sb.generation
                    ),
                    source,
                }
            })?;
        let mut progress = Progress::new(options.progress.unwrap_or(|_| {}));
        let mut cached = ExtentTree::new();
        let mut cache_complete = true;
        scan_extents(&tree, &device, 0..=codec::EXTENT_BYTENR_MAX, |b, item| {
            if cached.len() >= options.cache_extents_max {
                cache_complete = false;
                return ControlFlow::Break(());
            }
            cached.insert(b, item);
            if cached.len().is_multiple_of(PROGRESS_CHECK_ITEMS) {
                let n = cached.len();
                progress.tick(|| format!("{device}: recovery: {n} extents cached (bytenr {b})"));
            }
            ControlFlow::Continue(())
        })?;
        progress.tick(|| format!("{device}: recovery: reading the log"));
        let extents_cached = cached.len();
        let replayed = replay(&storage, &sb).map_err(|source| DurableError::Log {
            context: format!("{device}: replay from generation {}", sb.generation),
            source,
        })?;
        // A commit lost in the crash may have written nodes stamped
        // sb.generation + 1 (never more: commit g + 2 waits for g + 1's
        // superblock). Below, a durable superblock claims that generation,
        // so the next commit is claimed + 1, and so is the core engine's
        // (the generation stamped into extent items).
        let claimed_generation = sb.generation + 1;
        let engine = Engine::with_tree(LockFreeStore::new(), cached, claimed_generation);
        // Heads the last commit held (seq barrier) go back first: their ops
        // are older than every op in the log after the commit.
        let (mut held, held_chunks) = read_held(&tree, &device)?;
        held.iter_mut().for_each(forget_seq);
        let heads_held = held.len();
        engine.requeue(held);
        let ops_replayed = replay_ops(&engine, &replayed, &mut progress, &device)?;
        let log = RefLog::open(storage.clone(), &sb, &replayed, options.log).map_err(|source| {
            DurableError::Log {
                context: format!("{device}: open log"),
                source,
            }
        })?;
        let cap = log.batch_bytes_cap() as u64;
        let appenders_max = usize::try_from(sb.log_bytes / (4 * cap)).unwrap_or(usize::MAX);
        if appenders_max < APPENDERS_MIN {
            return Err(DurableError::Layout {
                device,
                reason: format!(
                    "log of {} bytes with batches up to {cap} bytes admits {appenders_max} \
                     concurrent appends, need {APPENDERS_MIN}: lower \
                     LogConfig::batch_bytes_max to at most {}",
                    sb.log_bytes,
                    sb.log_bytes / (4 * APPENDERS_MIN as u64)
                ),
            });
        }
        // Each admitted append claims one ingest shard of the lock-free
        // store for its engine add: admitting more appends than there are
        // shards would fail them with ShardsExhausted instead of waiting.
        let appenders_max = appenders_max.min(refd_core::delayed::lockfree::SHARDS_DEFAULT);
        // Claim sb.generation + 1 with a durable superblock that changes
        // nothing else, so every later commit's nodes have a generation no
        // lost write can carry (docs/btree.md caveat). The claim goes to
        // the other slot, never over the copy we recovered.
        let mut claim = sb.clone();
        claim.generation = claimed_generation;
        claim.flags &= !SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
        write_superblock(&storage, &claim)?;
        let info = RecoveryInfo {
            superblock_generation: sb.generation,
            superblock_slot: choice.slot,
            superblock_rejected: choice
                .rejected
                .iter()
                .map(|(slot, e)| format!("slot {slot}: {e}"))
                .collect(),
            extents_cached,
            ops_replayed,
            heads_held,
            replay: replayed.report().clone(),
            claimed_generation: claim.generation,
        };
        let next_generation = claim.generation + 1;
        let engine = DurableEngine {
            storage,
            engine,
            log,
            tree,
            cut: RwLock::new(()),
            appenders: AtomicUsize::new(0),
            appenders_max,
            commit: Mutex::new(CommitState {
                sb: claim,
                next_generation,
                held_chunks,
            }),
            totals: Mutex::new(CommitTotals::default()),
            failed: OnceLock::new(),
            inflight: RwLock::new(Arc::new(Vec::new())),
            cache_extents_max: options.cache_extents_max,
            cache_complete: AtomicBool::new(cache_complete),
            policy: Mutex::new(options.policy),
            pending_ops: AtomicU64::new(ops_replayed as u64),
            heads_held: AtomicU64::new(heads_held as u64),
            trigger_ops: AtomicU64::new(options.policy.pending_ops_trigger),
            op_cost_ps: AtomicU64::new(0),
            committer: Mutex::new(CommitterFlags::default()),
            committer_cv: Condvar::new(),
        };
        engine.record_commit(0, Duration::ZERO);
        Ok((engine, info))
    }

    /// The first failure, if the engine has failed (its own latch, the
    /// log's or the storage's).
    pub fn failure(&self) -> Option<Arc<str>> {
        if let Some(f) = self.failed.get() {
            return Some(f.clone());
        }
        if let Some(e) = self.log.failure() {
            return Some(format!("log: {e}").into());
        }
        self.storage
            .failure()
            .map(|f| format!("storage: {f}").into())
    }

    fn check_failed(&self) -> Result<()> {
        match self.failure() {
            Some(first) => Err(DurableError::Failed { first }),
            None => Ok(()),
        }
    }

    /// Latches `e` as the first failure (if none yet) and returns it.
    fn latch(&self, e: DurableError) -> DurableError {
        self.failed.get_or_init(|| e.to_string().into());
        e
    }

    /// Queues `op`: appends its record to the log and adds it to the core
    /// engine (visible to lookups at once). The op is acknowledged only
    /// when the returned ticket's [`Ticket::wait`] succeeds.
    ///
    /// Back-pressure: an append must never wait for log space while it
    /// holds the cut lock (the commit that would free the space needs the
    /// lock: deadlock). So an append proceeds only while the log has room
    /// for every append in flight (`2 × batch cap` each: a lap skip plus a
    /// batch), and at most [`DurableEngine::appenders_max`] run at once;
    /// otherwise the caller commits (or waits for the running commit) and
    /// retries. After the op is queued, the commit policy may make the
    /// caller wait for (or run) a commit (`crate::policy`); if that commit
    /// fails, the error is returned although the op was queued and logged:
    /// the engine is then latched, and the op is one more unacknowledged
    /// op (present after recovery at most once).
    pub fn add(&self, op: &Op) -> Result<Ticket<S>> {
        self.check_failed()?;
        op.check()?;
        RECORD.with_borrow_mut(|record| {
            record.clear();
            codec::encode_op(op, record);
            self.add_record(op, record)
        })
    }

    fn add_record(&self, op: &Op, record: &[u8]) -> Result<Ticket<S>> {
        let per_append = 2 * self.log.batch_bytes_cap() as u64;
        loop {
            let ingest = self.cut.read().unwrap_or_else(|e| e.into_inner());
            let k = self.appenders.fetch_add(1, Ordering::SeqCst) + 1;
            let need = per_append * k as u64;
            if k <= self.appenders_max && self.log.free_bytes() >= need {
                let r = self.add_locked(op, record);
                self.appenders.fetch_sub(1, Ordering::SeqCst);
                drop(ingest);
                let (ticket, pending) = r?;
                self.after_add(pending)?;
                return Ok(ticket);
            }
            self.appenders.fetch_sub(1, Ordering::SeqCst);
            drop(ingest);
            if k > self.appenders_max {
                std::thread::yield_now();
            } else {
                self.make_room(need)?;
            }
        }
    }

    /// Engine add + log append, under the read side of the cut lock.
    /// Returns the ticket and the ops now pending.
    fn add_locked(&self, op: &Op, record: &[u8]) -> Result<(Ticket<S>, u64)> {
        // The engine first: it may refuse the op, and nothing may be logged
        // that the engine does not hold.
        self.engine.handle()?.add(op)?;
        match self.log.append(record) {
            Ok(t) => Ok((
                Ticket(t),
                self.pending_ops.fetch_add(1, Ordering::Relaxed) + 1,
            )),
            // The engine now holds an op that is not logged: fatal.
            Err(source) => Err(self.latch(DurableError::Log {
                context: format!("append {op}"),
                source,
            })),
        }
    }

    /// Commits unless another commit already left `need` bytes free.
    fn make_room(&self, need: u64) -> Result<()> {
        self.check_failed()?;
        let mut st = lock(&self.commit);
        if self.log.free_bytes() >= need {
            return Ok(());
        }
        self.commit_locked(&mut st).map(|_| ())
    }

    /// Concurrent appends admitted at once (`log_bytes / (4 × batch cap)`).
    pub fn appenders_max(&self) -> usize {
        self.appenders_max
    }

    /// [`DurableEngine::add`] and wait: returns once the op is durable.
    pub fn add_durable(&self, op: &Op) -> Result<Lsn> {
        let ticket = self.add(op)?;
        ticket.wait().map_err(|e| self.latch(e))
    }

    /// Checkpoint: every op added before the call becomes part of the
    /// on-disk extent tree and its log space is released. See
    /// `docs/durable.md` for the order of steps.
    pub fn commit(&self) -> Result<CommitSummary> {
        self.check_failed()?;
        let mut st = lock(&self.commit);
        self.commit_locked(&mut st)
    }

    pub(crate) fn commit_locked(&self, st: &mut CommitState) -> Result<CommitSummary> {
        self.check_failed()?;
        // 1. Cut + seal, atomically w.r.t. ingest: every op with an LSN
        // below the cut is in the sealed transaction, every later op in the
        // next one. Only this step (microseconds) holds the ingest lock;
        // merging and running the frozen heads does not stall ingest.
        let t0 = Instant::now();
        let (cut, sealed, ops) = {
            let _cut = self.cut.write().unwrap_or_else(|e| e.into_inner());
            let ops = self.pending_ops.swap(0, Ordering::Relaxed);
            (self.log.seal(), self.engine.seal(), ops)
        };
        let frozen = sealed.merge();
        let mut phases = CommitPhases {
            freeze: t0.elapsed(),
            ..CommitPhases::default()
        };
        // The committed items of every frozen head: the cache's, else the
        // B+tree's (the tree changes only in commits, and this one holds
        // the core commit lock). A failure here leaves a frozen
        // transaction that cannot run: fatal like any commit failure.
        let t1 = Instant::now();
        let extents_read = self
            .cache_frozen(frozen.heads())
            .map_err(|e| self.latch(e))?;
        phases.items = t1.elapsed();
        let t2 = Instant::now();
        let (ran, diffs) = self.engine.run_frozen_parts(frozen, &ItemDiff);
        phases.run = t2.elapsed();
        // The B+tree gets the item changes on a commit worker while the
        // core applies the same commit to its cache here. Lookups never
        // read the B+tree for a frozen extent until both are done (the
        // in-flight set, see `cache_frozen`), and the B+tree changes no
        // other extent.
        let t3 = Instant::now();
        let held_heads = ran.report().held_heads.clone();
        let held_chunks_before = st.held_chunks;
        let generation = st.next_generation;
        let (items, core) = refd_core::engine::alongside(
            || self.apply_items(generation, cut, diffs, &held_heads, held_chunks_before),
            || {
                let mut core = ran.apply();
                // The items before: hundreds of thousands of frees, off
                // this path, started while the B+tree side may still run.
                let displaced = std::mem::take(&mut core.displaced);
                if displaced.iter().map(Vec::len).sum::<usize>()
                    >= refd_sync::background::SMALL_ITEMS_MIN
                {
                    refd_sync::background::drop_later(displaced, 0);
                }
                core
            },
        );
        phases.apply = t3.elapsed();
        let mut summary = items
            .and_then(|items| self.commit_tail(st, cut, core, items, &mut phases))
            .map_err(|e| self.latch(e))?;
        phases.total = t0.elapsed();
        self.record_commit(ops, phases.total);
        summary.extents_read = extents_read;
        summary.ops = ops;
        summary.phases = phases;
        lock(&self.totals).add(t0, &summary);
        // Requeued held heads are pending again: the interval commits them
        // once the barrier is gone. They do not count toward back-pressure
        // (committing again would not free them; the barrier holder
        // bounds them).
        self.heads_held
            .store(summary.core.held as u64, Ordering::Relaxed);
        Ok(summary)
    }

    /// Makes the committed item of every frozen head's bytenr cached (the
    /// core engine runs heads against its cache): when the cache is not
    /// complete, the misses are read from the B+tree, and the bytenrs are
    /// published as the running commit's in-flight set. Returns how many
    /// were read.
    fn cache_frozen(&self, heads: &[Head]) -> Result<usize> {
        if self.cache_complete.load(Ordering::Acquire) {
            // Every miss is an extent without item; the in-flight set is
            // not needed either (a miss means the same at every moment).
            return Ok(0);
        }
        let misses: Vec<u64> = {
            let tree = self.engine.tree();
            heads
                .iter()
                .map(|h| h.bytenr)
                .filter(|&b| tree.get(b).is_none())
                .collect()
        };
        let read = read_extents(&self.tree, self.storage.device_name(), &misses)?;
        self.engine.cache_committed(
            misses
                .iter()
                .zip(read)
                .filter_map(|(&b, item)| item.map(|i| (b, i))),
        );
        // Only now: a miss among these bytenrs means "no item".
        *self.inflight.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(heads.iter().map(|h| h.bytenr).collect());
        Ok(misses.len())
    }

    /// The B+tree side of a commit (on a commit worker, see
    /// `commit_locked`): once every record below the cut is durable, the
    /// run workers' item changes and the held heads go into the working
    /// B+tree.
    fn apply_items(
        &self,
        generation: u64,
        cut: Lsn,
        diffs: Vec<ItemDiffPart>,
        held_heads: &[Head],
        held_chunks_before: usize,
    ) -> Result<AppliedItems> {
        let t = Instant::now();
        let device = self.storage.device_name();
        // 2. Every record below the cut is durable.
        self.log
            .wait_for(cut.prev())
            .map_err(|source| DurableError::Log {
                context: format!("commit {generation}: wait for LSN {}", cut.prev().get()),
                source,
            })?;
        // 3. Tree nodes: the items of every extent the core engine changed,
        // encoded by its run workers.
        let mut parts =
            sorted_item_diffs(diffs).map_err(|(bytenr, source)| DurableError::Items {
                context: format!("commit {generation}: extent {bytenr}"),
                source,
            })?;
        let diff = t.elapsed();
        // Heads a seq barrier held are requeued in memory, and their log
        // records are trimmed below: the B+tree keeps them instead (the
        // whole held set replaces the last commit's), and recovery
        // requeues them before replaying the log. Their keys sort after
        // every extent's.
        let held = if held_heads.is_empty() {
            Vec::new()
        } else {
            codec::held_items(&codec::encode_held(held_heads))
        };
        let held_chunks = held.len();
        let mut held_changes: ItemChanges =
            held.into_iter().map(|(k, v)| (k, Change::Put(v))).collect();
        for i in held_chunks..held_chunks_before {
            held_changes.push((
                Key::new(codec::HELD_OBJECTID, codec::HELD_HEADS_KEY, i as u64),
                Change::Delete,
            ));
        }
        parts.push(held_changes);
        let item_changes = parts.iter().map(Vec::len).sum();
        for changes in parts {
            if !changes.is_empty() {
                self.tree
                    .apply_sorted(changes)
                    .map_err(|source| DurableError::Tree {
                        context: format!("{device}: commit {generation}: apply item changes"),
                        source,
                    })?;
            }
        }
        Ok(AppliedItems {
            item_changes,
            held_chunks,
            diff,
        })
    }

    fn commit_tail(
        &self,
        st: &mut CommitState,
        cut: Lsn,
        core: CommitReport,
        items: AppliedItems,
        phases: &mut CommitPhases,
    ) -> Result<CommitSummary> {
        let device = self.storage.device_name();
        let generation = st.next_generation;
        if core.generation != generation {
            return Err(DurableError::Inconsistent {
                reason: format!(
                    "commit {generation}: the core engine ran generation {}",
                    core.generation
                ),
            });
        }
        phases.diff = items.diff;
        let AppliedItems {
            item_changes,
            held_chunks,
            ..
        } = items;
        let tree_err = |what: &str| {
            let context = format!("{device}: commit {generation}: {what}");
            move |source| DurableError::Tree { context, source }
        };
        let t_apply = Instant::now();
        // The B+tree (working tree) has this commit: lookups may read it
        // for any bytenr again, and the cache may shrink.
        *self.inflight.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Vec::new());
        let cached = self.engine.tree().len();
        let extents_evicted = if cached > self.cache_extents_max {
            // From here on misses must be read from the B+tree. Set before
            // the eviction: a lookup that misses an evicted item then reads
            // the B+tree, which already has this commit.
            self.cache_complete.store(false, Ordering::Release);
            // Down to 7/8 of the bound, so that not every commit evicts.
            self.engine
                .evict_committed(self.cache_extents_max - self.cache_extents_max / 8)
        } else {
            0
        };
        phases.apply += t_apply.elapsed();
        let t_write = Instant::now();
        let info = self
            .tree
            .commit(generation)
            .map_err(tree_err("write nodes"))?;
        phases.write = t_write.elapsed();
        let t_sb = Instant::now();
        // 4. The superblock: the commit point.
        let mut sb = st.sb.clone();
        info.apply_to(&mut sb);
        let bounds = self.log.bounds(cut).map_err(|source| DurableError::Log {
            context: format!("commit {generation}: log bounds at cut {}", cut.get()),
            source,
        })?;
        bounds.apply_to(&mut sb);
        sb.generation = generation;
        sb.flags &= !SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
        write_superblock(&self.storage, &sb)?;
        st.sb = sb;
        st.next_generation = generation + 1;
        st.held_chunks = held_chunks;
        // 5. Only now: the dropped nodes and the log space are reusable.
        self.tree
            .release_pending(generation)
            .map_err(tree_err("release dropped nodes"))?;
        self.log.trim(cut).map_err(|source| DurableError::Log {
            context: format!("commit {generation}: trim to {}", cut.get()),
            source,
        })?;
        phases.superblock = t_sb.elapsed();
        Ok(CommitSummary {
            generation,
            cut,
            core,
            item_changes,
            nodes_written: info.nodes_written,
            extents_read: 0,
            extents_evicted,
            ops: 0,
            phases: CommitPhases::default(),
        })
    }

    /// Would-be reference count of `bytenr`: committed item + pending ops,
    /// each acknowledged op counted exactly once (as in core: the core
    /// tree's read lock is held across the lookup, and a commit moves ops
    /// from pending to the cache under its write lock). The committed item
    /// comes from the cache, else from the B+tree, except for the running
    /// commit's frozen heads, which are all cached until the B+tree has
    /// their changes: a miss among them is an extent without item.
    pub fn lookup_extent_ref(&self, bytenr: u64) -> Result<ExtentRefs> {
        let tree = self.engine.tree();
        let committed = match tree.get(bytenr) {
            Some(item) => Some(item.clone()),
            None if self.cache_complete.load(Ordering::Acquire) => None,
            None => {
                let inflight = Arc::clone(&self.inflight.read().unwrap_or_else(|e| e.into_inner()));
                if inflight.binary_search(&bytenr).is_ok() {
                    None
                } else {
                    read_extent(&self.tree, self.storage.device_name(), bytenr)?
                }
            }
        };
        let pending = self.engine.store().pending(bytenr);
        drop(tree);
        let refs = committed.as_ref().map_or(0, |c| c.refs as i64)
            + pending.as_ref().map_or(0, |h| h.summary.total_ref_mod);
        Ok(ExtentRefs {
            committed,
            pending: pending.map(|h| h.summary),
            refs,
        })
    }

    /// The in-memory extent cache (a subset of the committed tree; every
    /// item in it equals the B+tree's after each successful commit).
    pub fn cached_extents(&self) -> TreeRead<'_> {
        self.engine.tree()
    }

    /// Every committed extent, read from the B+tree into memory (for tools
    /// and tests: needs memory for the whole tree). Takes the commit lock.
    pub fn committed_extents(&self) -> Result<ExtentTree> {
        let _st = lock(&self.commit);
        load_extents(&self.tree, self.storage.device_name())
    }

    /// The core engine (pending store, barrier, quarantine). Its tree is
    /// the extent cache, not the whole committed tree: use this engine's
    /// `lookup_extent_ref`, `add` and `commit`, not core's (which would
    /// count from the cache only, or skip the log).
    pub fn core(&self) -> &Engine<LockFreeStore> {
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

    /// The last durable superblock.
    pub fn superblock(&self) -> Superblock {
        lock(&self.commit).sb.clone()
    }

    /// fsck: the B+tree's on-disk walk, every extent item decoded and
    /// checked (streaming: memory is one extent), the held heads decoded
    /// and as many as the engine holds since its last commit, and every
    /// cached extent equal to the B+tree's. Call between commits (it
    /// takes the commit lock).
    pub fn verify(&self) -> Result<TreeCheck> {
        let st = lock(&self.commit);
        let device = self.storage.device_name();
        let check = self.tree.check().map_err(|source| DurableError::Tree {
            context: format!("{device}: check"),
            source,
        })?;
        // The held set on disk is the last commit's (or recovery's): as
        // many heads, in as many chunks, as the engine holds in memory.
        let (held, chunks) = read_held(&self.tree, device)?;
        let in_memory = self.heads_held();
        if chunks != st.held_chunks || held.len() as u64 != in_memory {
            return Err(DurableError::Inconsistent {
                reason: format!(
                    "the B+tree keeps {} held heads in {chunks} chunks; the engine's last commit \
                     held {in_memory} in {} chunks",
                    held.len(),
                    st.held_chunks
                ),
            });
        }
        let cached = self.engine.tree();
        let mut matched = 0usize;
        let mut differs = None;
        scan_extents(
            &self.tree,
            device,
            0..=codec::EXTENT_BYTENR_MAX,
            |b, item| {
                if let Some(c) = cached.get(b) {
                    if *c != item {
                        differs = Some(b);
                        return ControlFlow::Break(());
                    }
                    matched += 1;
                }
                ControlFlow::Continue(())
            },
        )?;
        if let Some(b) = differs {
            return Err(DurableError::Inconsistent {
                reason: format!("extent {b}: the cached item differs from the B+tree's"),
            });
        }
        if matched != cached.len() {
            let missing = cached
                .iter()
                .map(|(b, _)| b)
                .find(|&b| read_extent(&self.tree, device, b).ok().flatten().is_none());
            return Err(DurableError::Inconsistent {
                reason: format!(
                    "{} cached extents are not in the B+tree, the first at {missing:?}",
                    cached.len() - matched
                ),
            });
        }
        Ok(check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refd_core::model::{Action, ExtentKind, RefKey};
    use refd_ioring::{FaultPlan, SimConfig, SimStorage};

    type Dev = Arc<SimStorage>;

    /// A simulated device of `dev_bytes`, formatted with a log of
    /// `log_bytes`.
    fn formatted(dev_bytes: u64, log_bytes: u64) -> (Dev, Superblock) {
        let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(dev_bytes, 1)).unwrap());
        let sb = DurableEngine::format(
            &dev,
            FormatOptions {
                log_bytes: Some(log_bytes),
                fs_id: Some(FsId([7; 16])),
            },
        )
        .unwrap();
        (dev, sb)
    }

    fn setup() -> (Dev, DurableEngine<Dev>) {
        let (dev, sb) = formatted(8 << 20, 1 << 20);
        assert_eq!(sb.generation, 2);
        let (e, info) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
        assert_eq!(
            (info.superblock_generation, info.claimed_generation),
            (2, 3)
        );
        (dev, e)
    }

    fn opts() -> OpenOptions {
        OpenOptions {
            log: LogConfig {
                batch_bytes_max: 64 << 10,
                ..LogConfig::default()
            },
            ..OpenOptions::default()
        }
    }

    fn data(action: Action, objectid: u64) -> Op {
        Op::new(
            1 << 20,
            4096,
            ExtentKind::Data,
            action,
            RefKey::ExtentData {
                root: 5,
                objectid,
                offset: 0,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn commit_generations() {
        let (_dev, e) = setup();
        e.add_durable(&data(Action::AddExtent, 1)).unwrap();
        let s = e.commit().unwrap();
        assert_eq!(s.generation, 4, "one past the claimed generation");
        assert_eq!(e.superblock().generation, 4);
        assert_eq!(e.commit().unwrap().generation, 5);
        e.verify().unwrap();
        // A malformed op is refused before anything is logged.
        let mut bad = data(Action::AddRef, 2);
        bad.num_bytes = 0;
        assert!(matches!(e.add(&bad), Err(DurableError::Op(_))));
        assert!(e.failure().is_none());
    }

    /// Heads a seq barrier holds are committed into the B+tree (their log
    /// records are trimmed), survive a power loss, are requeued by
    /// recovery and run by the next commit, exactly once.
    #[test]
    fn held_heads_survive_a_crash() {
        let (dev, e) = setup();
        e.add_durable(&data(Action::AddExtent, 1)).unwrap();
        e.commit().unwrap();
        let guard = e.core().barrier().acquire();
        let mut op = data(Action::AddRef, 2);
        op.seq = e.core().barrier().current();
        e.add_durable(&op).unwrap();
        e.add_durable(&data(Action::AddRef, 3)).unwrap();
        let s = e.commit().unwrap();
        assert_eq!((s.core.held, s.core.applied), (1, 0), "{:?}", s.core);
        assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 3);
        // Committed again while still held: the held set is rewritten.
        let s = e.commit().unwrap();
        assert_eq!(s.core.held, 1);
        assert_eq!(read_held(e.btree(), "sim").unwrap().0.len(), 1);
        e.verify().unwrap();
        assert_eq!(e.log().used_bytes(), 0, "the held ops' records are trimmed");
        drop(guard);

        let crashed: Dev = Arc::new(dev.crash());
        drop(e);
        let (e, info) = DurableEngine::open(Arc::clone(&crashed), opts()).unwrap();
        assert_eq!((info.heads_held, info.ops_replayed), (1, 0), "{info}");
        assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 3);
        e.verify().unwrap();
        // A barrier of the new engine (its counter restarted) does not hold
        // the recovered head: recovery forgot its seq.
        let _new_barrier = e.core().barrier().acquire();
        let s = e.commit().unwrap();
        assert_eq!((s.core.held, s.core.applied), (0, 1));
        let item = e
            .committed_extents()
            .unwrap()
            .get(1 << 20)
            .cloned()
            .unwrap();
        assert_eq!(item.refs, 3);
        for obj in 1..=3 {
            assert_eq!(item.count(&data(Action::AddRef, obj).key.unwrap()), 1);
        }
        // The held set is gone from the B+tree.
        assert_eq!(read_held(e.btree(), "sim").unwrap(), (Vec::new(), 0));
        e.verify().unwrap();
        drop(e);
        let (e, info) = DurableEngine::open(crashed, opts()).unwrap();
        assert_eq!(info.heads_held, 0);
        assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 3);
    }

    /// A commit big enough for every run worker, with overlapping extents
    /// (head selection wraps around inside a worker's part, so its item
    /// changes come out of key order): the B+tree gets exactly the
    /// cache's items.
    #[test]
    fn parallel_run_item_changes_reach_the_btree() {
        let (dev, _) = formatted(64 << 20, 16 << 20);
        let (e, _) = DurableEngine::open(dev, opts()).unwrap();
        let heads = 2 * refd_core::engine::PARALLEL_RUN_MIN_HEADS as u64 + 100;
        let at = |i: u64| (1u64 << 30) + i * (16 << 10);
        let op = |bytenr: u64, num_bytes: u64, action: Action, root: u64| {
            let key = RefKey::ExtentData {
                root,
                objectid: 257,
                offset: 0,
            };
            Op::new(bytenr, num_bytes, ExtentKind::Data, action, key, 0).unwrap()
        };
        for round in 0..2 {
            for i in 0..heads {
                let action = [Action::AddExtent, Action::AddRef][round];
                e.add(&op(at(i), 4096, action, 5 + round as u64)).unwrap();
            }
            // In both workers' ranges: a 64 KiB extent over the next four.
            for i in [10, heads - 10] {
                let action = [Action::AddExtent, Action::AddRef][round];
                e.add(&op(at(i) + 4096, 64 << 10, action, 5 + round as u64))
                    .unwrap();
            }
            let s = e.commit().unwrap();
            assert_eq!(s.core.applied as u64, heads + 2, "round {round}");
            assert_eq!(e.committed_extents().unwrap(), *e.cached_extents());
            e.verify().unwrap();
        }
    }

    /// Replay keeps each extent's ops in log order: after a crash, the
    /// latest of several allocations of one bytenr still wins, for many
    /// extents at once.
    #[test]
    fn replay_keeps_each_extents_order() {
        let (dev, e) = setup();
        let op = |b: u64, bytes: u64, action: Action| {
            Op::new(
                b,
                bytes,
                ExtentKind::Data,
                action,
                RefKey::ExtentData {
                    root: 5,
                    objectid: 1,
                    offset: 0,
                },
                0,
            )
            .unwrap()
        };
        // Each pass over all extents: an extent's two allocations are far
        // apart in the log.
        let bytenr = |i: u64| (1 << 30) + i * (1 << 20);
        for i in 0..3000u64 {
            e.add(&op(bytenr(i), 4096, Action::AddExtent)).unwrap();
        }
        for i in 0..3000u64 {
            e.add(&op(bytenr(i), 4096, Action::DropRef)).unwrap();
        }
        e.add(&data(Action::AddExtent, 9)).unwrap();
        for i in 0..3000u64 {
            e.add(&op(bytenr(i), 8192 + 4096 * (i % 3), Action::AddExtent))
                .unwrap();
        }
        e.add_durable(&data(Action::AddRef, 10)).unwrap();
        let crashed: Dev = Arc::new(dev.crash());
        drop(e);
        let (e, info) = DurableEngine::open(crashed, opts()).unwrap();
        assert_eq!(info.ops_replayed, 9002);
        let s = e.commit().unwrap();
        assert!(s.core.quarantined.is_empty(), "{:?}", s.core.quarantined);
        let all = e.committed_extents().unwrap();
        for i in 0..3000u64 {
            let item = all.get(bytenr(i)).unwrap();
            assert_eq!(
                (item.num_bytes, item.refs),
                (8192 + 4096 * (i % 3), 1),
                "{i}"
            );
        }
    }

    #[test]
    fn a_failed_write_latches() {
        let (dev, e) = setup();
        e.add_durable(&data(Action::AddExtent, 1)).unwrap();
        dev.set_fault_plan(FaultPlan {
            write_eio_at: Some(1),
            ..FaultPlan::default()
        });
        assert!(e.add_durable(&data(Action::AddRef, 2)).is_err());
        assert!(e.failure().is_some());
        for r in [
            e.add(&data(Action::AddRef, 3)).map(|_| ()),
            e.commit().map(|_| ()),
        ] {
            assert!(matches!(r, Err(DurableError::Failed { .. })), "{r:?}");
        }
    }
}
