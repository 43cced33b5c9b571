//! The lock-free delayed-ref store: per-CPU shards feeding an
//! epoch-reclaimed skiplist index in sorted batches.
//!
//! # Why this shape
//!
//! One crossbeam-skiplist operation per op is a chain of ~20 dependent
//! cache misses (measured on these machines: 0.56 Mops/s for
//! `get_or_insert_with` + `fetch_add` over 1M keys, slower than one mutex).
//! So the hot path never touches the skiplist:
//!
//! ```text
//!  ingest thread ──► own shard: active staging buffer (4096 ops, ~360 KiB,
//!                    stays in L2), one of a ring of STAGING_RING per parity
//!                       │ full: marked FULL, the owner moves to the next
//!                       ▼
//!  hand-off thread ──► sort + merge at insert (packed.rs), build the run
//!  (refd-handoff)       │ and its Bloom filter, publish it and empty the
//!                       │ buffer in one change (the owner does this itself
//!                       │ only when its whole ring is full: see below)
//!                       ▼
//!                 TxnIndex of the live transaction
//!                   runs: SkipMap<run_id, Arc<Run>>  (Run: sorted chunks + Bloom filter;
//!                         lookups find them through the index's RunView)
//!                       │ size-tiered compaction on the background
//!                       │ compactor (COMPACT_FANOUT = 8 runs of a level
//!                       │ → 1; top-level runs of comparable size merge)
//!                       │ and the small compactor (level 0 only, while
//!                       │ the compactor merges large runs)
//!                       ▼
//!                 freeze: k-way merge of runs + staging, in bytenr order
//! ```
//!
//! # No sorting on the ingest thread
//!
//! Sorting 4096 staged ops and building their run costs ~250 µs; done by
//! the ingest thread at every 4096th op, it was the p99.99 of ingest. The
//! ingest thread now only marks the full buffer and moves to an empty one
//! of its ring ([`super::handoff`]: the states, who may move a buffer from
//! which to which, the loom model). The background hand-off thread turns
//! full buffers into runs. If the owner finds no empty buffer (the
//! background is behind), it waits for one (back-pressure), for about
//! 1 ms at most; then it hands off the oldest full one itself (the bounded
//! fallback). `docs/benchmarks.md` ("Issue 13: no sort on the ingest
//! thread") has what waiting and handing off at once each measured on 2
//! cores, and how often each happens.
//!
//! Until its run is published, a full buffer's ops are read from staging:
//! readers read every buffer of a lane. The merge of a sealed generation
//! first holds every lane (full buffers stay staged and are merged from
//! there; hand-offs in progress are waited for), so nothing publishes into
//! a sealed generation's index or empties its buffers afterwards, and the
//! index parity is reused for `g + 2` only after release, which waits for
//! any hand-off still in progress.
//!
//! Each run is an immutable sorted sequence of packed heads and refs cut
//! into chunks (a `Vec` in the run); the skiplist is the ordered,
//! concurrently readable, epoch-reclaimed index of the runs. Keys are never
//! reused and values never replaced, and only the compactor holding a
//! level's token removes that level's entries, so the known races of
//! crossbeam-skiplist 0.1.3 (`get` missing a key being replaced; `remove`
//! returning `Some` to two threads) cannot matter here. Measured throughput and memory are in
//! `docs/benchmarks.md` (not repeated here: they move with every change).
//!
//! # Consistency for readers
//!
//! Appends to a staging buffer publish its length with Release; readers
//! load it with Acquire and read slots below it (all slot words are
//! atomics). Every other change of an index or a staging buffer (hand-off,
//! compaction publish, release) is bracketed by the index's `started` /
//! `finished` counters (a release fence after `started`, so no write of
//! the change is seen before it); a reader that saw a change start during
//! its read retries (the counters, the brackets and the read windows are
//! `window.rs`'s). A staging slot reused after a hand-off can be read
//! torn (words of two ops); such a read is always retried (the owner
//! reuses a buffer handed off by another thread only after a release
//! fence, so a reader that sees its new slots sees that change begun). A
//! lookup copies its bytenr's slots raw in its window and decodes them
//! only after the window proved them whole, fallibly all the same, so a
//! torn slot never reaches an assertion.
//!
//! Reads complete in bounded time whatever the ingest rate: a read is
//! tried once optimistically; if a change spoiled it, the reader asks for
//! a quiet window (`hold_quiet`) in which no change of the index begins
//! (hand-offs, compaction publishes and releases wait at `begin_change`),
//! so it retries at most once per writer that had already begun. A long
//! read (`pending_all`, `stats`) needs the window only to take a snapshot
//! of the generation (the run entries, which keep compacted runs alive, a
//! copy of the staged ops, the carry); the merge runs outside it. A lookup
//! likewise reads in its window only the index's run view (one pointer:
//! `RunView`, every run's filter and run in one array, republished by
//! each change of the runs) and the staged ops and carry of its bytenr (a
//! staging buffer's slots are scanned only if its bytenr filter may hold
//! the bytenr). After the window it probes every run's Bloom filter
//! ([`RUN_FILTER_BITS_PER_HEAD`]) from the view's array and searches the
//! runs that may hold the bytenr, first for the chunk of each run, then in
//! the chunks, each step's searches in lockstep, one fence line of each
//! per round (`fence.rs`, `find_in_chunks`);
//! a lookup of the count (`pending_summary`) merges only the heads'
//! summaries and folds its staged ops (`SummaryFold`). Of the index's hot
//! extents ([`HOT_EXTENTS`]: heads of many ops in its hand-offs, first
//! come, kept until the index is cleared) it reads sums instead: the
//! view's sum of each one's heads over all its runs (kept by the
//! hand-offs; a compaction leaves it as it is) and, per staging buffer, a
//! cell where the owner sums the extent's plain ops and allocations as it
//! stages them (written before the op's slot is published, with the op's slot, so a
//! reader that loads `len` after the cell leaves out an op not published
//! yet; a cell named in another life of the buffer means a reset, which
//! spoils the window). Ingest waits for a reader only at a
//! hand-off that meets a quiet window, for at most the time of a staging
//! scan (a lookup) or a snapshot.
//!
//! This read/change protocol is model-checked with loom
//! (`window::loom_tests`, `run_view_*`): the real counters, brackets,
//! read windows and ring (`handoff::Ring`), with the view, the
//! runs, a staging buffer (of one slot, or two) and crossbeam-epoch
//! modelled. A lookup
//! that pins, reads the view in a window and dereferences its runs after
//! it, against a compaction that removes runs and republishes the view
//! (and any thread collecting garbage meanwhile), never reads a freed run
//! or view and sees the old runs or the new ones; against a hand-off that
//! publishes a run and empties the buffer in one change while the owner
//! reuses the buffer, it finds each op once, in a run or in staging; so
//! does a count lookup of a hot extent, with the view's sum for the runs
//! and the buffer's hot cell (modelled as `HotCell`, with its key and
//! `allocs` word, the owner's `seed_hot` and `fold_hot` and `reset`, in
//! their orders, and the reader's copy of the latest allocation's slot)
//! for the slots, never taking a cell of another life (of its extent or
//! of another) or a torn one, and counting the plain ops and
//! allocations, the latest one's stamp included, of a prefix of the ops
//! that a lookup right after it finds too; a
//! read spoiled once completes in a quiet window within its bound. Loom
//! reports a missing fence (`begin_change`'s, `try_read`'s, the ring's
//! `activate`), a check of `started` before the read instead of after,
//! a pin taken after the window, and of the cells: a reset that leaves
//! the state, a cell read after the window, the state stored or loaded
//! Relaxed, the unpublished last op counted, an extent named after
//! the buffer's first op, a name stored Relaxed with the ring's fence
//! missing too, the `allocs` word loaded before the state or its count
//! not compared with the state's, both the `CELL_LAST_ALLOC` and the
//! slot-below-`len` checks dropped, the latest allocation's slot copied
//! after the window (`docs/design.md`, which says what it passes and
//! why).
//!
//! # Transaction hand-off
//!
//! Each shard has a lane of buffers per transaction parity; each lane has
//! a refcount interlock ([`refd_sync::interlock`]). An ingester takes a
//! reference on the lane of the generation it read, then re-reads the
//! generation (both SeqCst); the committer stores the new generation, then
//! waits for the count of every old lane to reach zero. Either the
//! ingester sees the new generation and moves on, or the committer sees
//! its reference and waits for it: no op is lost or applied twice, and the
//! ingester never waits. The 0->1 transition "loads" the lane for its
//! generation (it must be empty).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crossbeam_skiplist::SkipMap;
use crossbeam_utils::CachePadded;

use super::fence::{last_at_most_each, Fenced, Fences, Line};
use super::gate::{parity, Generation, ShardGate};
use super::handoff::{Ring, Rotate, STAGING_RING};
use super::packed::{
    build_run, build_run_noting, find_in_chunks, heads_in_range, merge_cursors, merge_refs,
    prefetch, split_points, Chunk, Cursor, HeadRef, PackedRef, RunBuilder, StagedOps,
};
use super::window::ChangeCounters;
pub use super::window::READ_OPTIMISTIC_MAX;
use super::{
    merge_heads, merge_heads_keeping_all, DelayedRefStore, IngestHandle, StampClock, StoreError,
};
use crate::head::{Head, HeadSummary, SummaryFold};
use crate::model::{Action, ExtentKind, Op};
use std::sync::atomic::{AtomicU64, Ordering};

/// Ingest shards (handles) available by default.
pub const SHARDS_DEFAULT: usize = 64;
/// Ops a staging buffer holds before it is handed off as a sorted run.
pub const STAGING_OPS: usize = 4096;
/// Runs of one level merged into one run of the next level.
pub const COMPACT_FANOUT: usize = 8;
/// Top-level runs merge when the smallest has at least 1/this of the
/// largest's heads (default; see [`LockFreeStore::with_top_merge_ratio`]).
/// The trade-off (throughput against bytes per pending ref) is measured in
/// `docs/benchmarks.md` ("top-merge ratio").
pub const TOP_MERGE_RATIO: usize = 4;
/// Reads of one lane's buffers a lookup or snapshot tries while its owner
/// moves to other buffers (`handoff::Ring::moves`) before it reads all
/// again in a quiet window.
const LANE_READS_MAX: u32 = 4;
/// Levels with their own compaction token (deeper levels share the last).
const LEVELS_MAX: usize = 16;

use super::packed::{encode, try_decode, Staged, STAGED_WORDS};

/// Words of a staging slot: an op's words but its bytenr (word 0), which
/// the buffer keeps apart ([`Staging::keys`]).
const SLOT_WORDS: usize = STAGED_WORDS - 1;

/// A staging buffer: single writer (the shard owner), many readers. The
/// slots, filter and cells are allocated when the shard is first claimed,
/// so idle shards cost nothing.
#[derive(Debug)]
struct Staging {
    len: AtomicUsize,
    cap: usize,
    slots: OnceLock<Box<[[AtomicU64; SLOT_WORDS]]>>,
    /// A blocked Bloom filter of the staged ops' bytenrs (as a run's:
    /// [`FilterKey`], [`STAGING_FILTER_BITS_PER_OP`] bits per slot), whose
    /// bits the writer sets before it publishes the op's slot: a lookup
    /// scans the slots only if all its bits are set (cleared with `len`
    /// when the buffer empties).
    filter: OnceLock<Box<[AtomicU64]>>,
    /// The bytenr of each slot's op (its word 0), densely: 8 bytes a slot
    /// beside the slot's other 80. A lookup whose bytenr the filter may
    /// hold scans these instead of 88-byte slots (a hot extent is in every
    /// buffer, so its lookups scan them all), and the op's words cost no
    /// more memory than in one array. Written with the slot, before `len`.
    keys: OnceLock<Box<[AtomicU64]>>,
    /// The generation of the ops of a full buffer, written by the owner
    /// before it marks the buffer full (read by whoever hands it off).
    gen: AtomicU64,
    /// The cells summing the hot extents' plain ops and allocations
    /// ([`HotTable`]; none for a buffer of more than [`CELL_SLOT_MAX`]
    /// ops).
    hot: OnceLock<Box<HotTable>>,
}

/// A staging buffer's cells: the extents whose plain ops and allocations
/// it sums ([`HOT_EMPTY`]: none), named by the owner while the buffer is empty
/// ([`Staging::seed_hot`]) and cleared with `len`, and their sums.
#[derive(Debug)]
struct HotTable {
    keys: [AtomicU64; HOT_SLOTS],
    cells: [HotCell; HOT_SLOTS],
}

/// A `keys` entry naming no extent (`bytenr + num_bytes` cannot overflow,
/// so no extent starts there).
pub(super) const HOT_EMPTY: u64 = u64::MAX;

/// The plain ops (ADD_REF or DROP_REF with no extent_op) and the
/// allocations (ADD_DELAYED_EXTENT with no extent_op) of one hot extent
/// staged in a buffer, summed by its owner as it stages them: a count
/// lookup reads the sum instead of scanning the buffer for the extent's
/// ops (hundreds per buffer under a skewed load). Any other op of the
/// extent, one naming another shape, or more than [`CELL_ALLOCS_MAX`]
/// allocations spoil the cell: lookups then scan the buffer as before.
/// (Allocations are counted because an extent freed and allocated again
/// within a transaction is common; under the bench's zipf walk a hot tree
/// block is, every few ops, and spoiled cells made 0.4% of all lookups
/// scan every buffer: half of those slower than 20 µs.)
///
/// `state` is one word, so a reader loads it whole: [`CELL_SPOILED`],
/// [`CELL_HAS_OPS`], [`CELL_MULTI`] (more than one op folded), the last
/// op folded (its slot, bits 40..60, [`CELL_LAST_DROP`]: its ref_mod was
/// -1, and [`CELL_LAST_ALLOC`]: it was an allocation), the kind the ops
/// named (bits 30..40: [`kind_code`]), the number of allocations (bits
/// 24..29) and the sum of the ops' ref_mods (bits 0..24, two's
/// complement). The owner folds an op before it publishes the op's
/// slot, so a reader that then loads `len` and finds the last op's slot
/// unpublished leaves that op out (an allocation: it scans instead): a
/// count sees the ops of a published prefix of the buffer, as a scan of
/// the slots does, never one that a later lookup could miss.
/// `num_bytes` is written once per life of the buffer, before the first
/// state with `CELL_HAS_OPS` (Release), and never changes while the cell
/// is whole. `allocs` holds the number of allocations and the slot of the
/// latest (whose words, with its stamp, a reader copies), written before
/// the state that counts it; a reader whose `allocs` counts another
/// number than its state (an allocation folded since) scans instead.
/// These orders are model-checked with loom, allocations and the copy of
/// the latest one's slot included (`window::loom_tests`,
/// `run_view_hot_cell_counts_*`), and so are a reset by the background
/// hand-off and each way of spoiling the cell racing a count
/// (`run_view_hot_cell_reset_in_background_with_allocations`,
/// `run_view_hot_cell_spoiled_*`).
#[derive(Debug, Default)]
struct HotCell {
    num_bytes: AtomicU64,
    state: AtomicU64,
    allocs: AtomicU64,
}

/// What a whole cell says of its extent's ops in a buffer
/// ([`HotCell::read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CellSum {
    num_bytes: u64,
    kind: ExtentKind,
    /// The sum of every op's ref_mod, allocations (+1 each) included.
    total: i64,
    /// Allocations among the ops.
    allocs: u16,
    /// The slot of the latest allocation (`allocs > 0`).
    latest_alloc: usize,
}

pub(super) const CELL_SPOILED: u64 = 1 << 63;
pub(super) const CELL_HAS_OPS: u64 = 1 << 62;
pub(super) const CELL_MULTI: u64 = 1 << 61;
const CELL_LAST_DROP: u64 = 1 << 60;
pub(super) const CELL_LAST_SHIFT: u32 = 40;
pub(super) const CELL_LAST_ALLOC: u64 = 1 << 29;
pub(super) const CELL_ALLOCS_SHIFT: u32 = 24;
/// Allocations a cell counts (5 bits); one more spoils it.
pub(super) const CELL_ALLOCS_MAX: u64 = 31;
// The count is a field of the state masked by `CELL_ALLOCS_MAX`, below
// `CELL_LAST_ALLOC`: every count the fold stores fits it whole.
const _: () = assert!(
    (CELL_ALLOCS_MAX + 1).is_power_of_two()
        && (CELL_ALLOCS_MAX + 1) << CELL_ALLOCS_SHIFT == CELL_LAST_ALLOC
);
/// Buffers of more ops than this have no cells (a slot index fits the
/// state's 20 bits).
const CELL_SLOT_MAX: usize = 1 << 20;
const CELL_KIND_SHIFT: u32 = 30;
pub(super) const CELL_SUM_MASK: u64 = (1 << CELL_ALLOCS_SHIFT) - 1;
/// A cell's sum stays inside its 24 bits: at most [`CELL_SLOT_MAX`] ops.
const CELL_SUM_MAX: i64 = 1 << 22;

/// An extent kind as a cell's state holds it (10 bits).
fn kind_code(kind: ExtentKind) -> u64 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Tree { level } => 1 + u64::from(level),
    }
}

/// A cell state's fields.
fn cell_kind(s: u64) -> u64 {
    (s >> CELL_KIND_SHIFT) & 0x3FF
}

fn cell_sum(s: u64) -> i64 {
    (((s & CELL_SUM_MASK) << 40) as i64) >> 40
}

pub(super) fn cell_allocs(s: u64) -> u64 {
    (s >> CELL_ALLOCS_SHIFT) & CELL_ALLOCS_MAX
}

pub(super) fn cell_last(s: u64) -> usize {
    ((s >> CELL_LAST_SHIFT) & (CELL_SLOT_MAX as u64 - 1)) as usize
}

impl HotCell {
    /// The cell's shape and sums over the ops whose slots are published
    /// (`len`, loaded after the state), `None` when spoiled or when an
    /// allocation is being added (scan the slots), `Some(None)` when there
    /// are none.
    ///
    /// The loom model (`window.rs`, `loom_tests::Buf::read_count`) is a
    /// copy of this and of [`HotCell::fold`] by hand (loom does not run
    /// this module's std atomics): a change of either order changes it in
    /// the same commit.
    fn read(&self, len: &AtomicUsize) -> Option<Option<CellSum>> {
        let s = self.state.load(Ordering::Acquire);
        if s & CELL_SPOILED != 0 {
            return None;
        }
        if s & CELL_HAS_OPS == 0 {
            return Some(None);
        }
        let mut total = cell_sum(s);
        let len = len.load(Ordering::Acquire);
        if cell_last(s) >= len {
            // The last op is being added: not published yet.
            if s & CELL_LAST_ALLOC != 0 {
                return None;
            }
            if s & CELL_MULTI == 0 {
                return Some(None);
            }
            total += if s & CELL_LAST_DROP != 0 { 1 } else { -1 };
        }
        let allocs = cell_allocs(s);
        let mut latest_alloc = 0;
        if allocs > 0 {
            // Written before the state (Release) that counts it: at least
            // that new. Newer (another allocation since): scan instead.
            let w = self.allocs.load(Ordering::Relaxed);
            latest_alloc = (w & u64::from(u32::MAX)) as usize;
            // Its slot is below `len` when the state is whole (an op
            // before the last, or the last published); checked all the
            // same, so that the copy of its words never depends on more
            // than `len`'s Acquire.
            if w >> 32 != allocs || latest_alloc >= len {
                return None;
            }
        }
        let kind = match cell_kind(s) {
            0 => ExtentKind::Data,
            c => ExtentKind::Tree {
                level: u8::try_from(c - 1).ok()?,
            },
        };
        Some(Some(CellSum {
            num_bytes: self.num_bytes.load(Ordering::Relaxed),
            kind,
            total,
            allocs: allocs as u16,
            latest_alloc,
        }))
    }

    /// Writer only: fold `op` (of the cell's extent), about to be published
    /// in slot `slot`, in.
    fn fold(&self, op: &Op, slot: usize) {
        let s = self.state.load(Ordering::Relaxed);
        if s & CELL_SPOILED != 0 {
            return;
        }
        let alloc = op.action == Action::AddExtent && op.extent_op.is_none();
        let kind = kind_code(op.kind);
        let last = (slot as u64) << CELL_LAST_SHIFT
            | if op.ref_mod() < 0 { CELL_LAST_DROP } else { 0 }
            | if alloc { CELL_LAST_ALLOC } else { 0 };
        let allocs = cell_allocs(s) + u64::from(alloc);
        let next =
            if !(op.is_plain_ref() || alloc) || slot >= CELL_SLOT_MAX || allocs > CELL_ALLOCS_MAX {
                CELL_SPOILED
            } else {
                let (sum, same, multi) = if s & CELL_HAS_OPS == 0 {
                    self.num_bytes.store(op.num_bytes, Ordering::Relaxed);
                    (op.ref_mod(), true, 0)
                } else {
                    let same = cell_kind(s) == kind
                        && self.num_bytes.load(Ordering::Relaxed) == op.num_bytes;
                    (cell_sum(s) + op.ref_mod(), same, CELL_MULTI)
                };
                if same && sum.abs() < CELL_SUM_MAX {
                    if alloc {
                        self.allocs
                            .store(allocs << 32 | slot as u64, Ordering::Relaxed);
                    }
                    CELL_HAS_OPS
                        | multi
                        | last
                        | kind << CELL_KIND_SHIFT
                        | allocs << CELL_ALLOCS_SHIFT
                        | (sum as u64 & CELL_SUM_MASK)
                } else {
                    CELL_SPOILED
                }
            };
        self.state.store(next, Ordering::Release);
    }
}

/// Bits of a staging buffer's bytenr filter per slot. With 4 bits of one
/// word per bytenr, a lookup of a bytenr a full buffer does not hold scans
/// its slots (4096 of them, ~360 KiB) about once in 400; with one bit per
/// bytenr it was once in 16, and those scans were most of the lookups
/// slower than 10 µs under full ingest.
pub const STAGING_FILTER_BITS_PER_OP: usize = 16;

impl Staging {
    fn new(cap: usize) -> Staging {
        Staging {
            len: AtomicUsize::new(0),
            cap,
            slots: OnceLock::new(),
            filter: OnceLock::new(),
            keys: OnceLock::new(),
            gen: AtomicU64::new(0),
            hot: OnceLock::new(),
        }
    }

    /// Writer only, while the buffer is empty (before its first op): name
    /// the index's hot extents in the cells, so that every op of them the
    /// buffer will hold is summed. Release: a reader that sees a name sees
    /// the cells emptied before it (the buffer's last `reset`). The read
    /// window gives that too (the owner writes a reused buffer only after
    /// the ring's release fence, so a reader that sees a new name sees
    /// the reset's change begun and retries): loom passes with either
    /// alone and reports a new name read with the last life's state of
    /// another extent without both (`window::loom_tests`).
    fn seed_hot(&self, idx: &TxnIndex) {
        let Some(hot) = self.hot.get() else {
            return;
        };
        let n = idx.hot_len.load(Ordering::Acquire).min(HOT_EXTENTS);
        let mut keys = [HOT_EMPTY; HOT_SLOTS];
        for k in &idx.hot_keys.0[..n] {
            let b = k.load(Ordering::Relaxed);
            if let Some(i) = hot_slots(b).into_iter().find(|&i| keys[i] == HOT_EMPTY) {
                keys[i] = b;
            }
        }
        for (key, b) in hot.keys.iter().zip(keys) {
            if key.load(Ordering::Relaxed) != b {
                key.store(b, Ordering::Release);
            }
        }
    }

    /// The cell of `bytenr`, if the buffer has one (`order`: of the loads
    /// of the names).
    fn hot_cell(&self, bytenr: u64, order: Ordering) -> Option<&HotCell> {
        let hot = self.hot.get()?;
        hot_slots(bytenr)
            .into_iter()
            .find(|&i| hot.keys[i].load(order) == bytenr)
            .map(|i| &hot.cells[i])
    }

    /// Writer only, before publishing the slot of `op`: sum it in its
    /// extent's cell, if the buffer has one.
    fn fold_hot(&self, op: &Op, slot: usize) {
        if let Some(cell) = self.hot_cell(op.bytenr, Ordering::Relaxed) {
            cell.fold(op, slot);
        }
    }

    /// The sums of the ops of `bytenr` whose slots are published, if one
    /// of the buffer's cells sums them all (`Some(None)`: there are none;
    /// `None`: no whole cell, scan the slots). Inside a read window: a cell
    /// named in another life of the buffer means a reset, a change.
    fn hot_sum(&self, bytenr: u64) -> Option<Option<CellSum>> {
        self.hot_cell(bytenr, Ordering::Acquire)?.read(&self.len)
    }

    fn ensure(&self) {
        self.slots.get_or_init(|| {
            (0..self.cap)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect()
        });
        self.filter.get_or_init(|| {
            let words = (self.cap * STAGING_FILTER_BITS_PER_OP)
                .next_power_of_two()
                .div_ceil(64);
            (0..words).map(|_| AtomicU64::new(0)).collect()
        });
        self.keys
            .get_or_init(|| (0..self.cap).map(|_| AtomicU64::new(0)).collect());
        if self.cap <= CELL_SLOT_MAX {
            self.hot.get_or_init(|| {
                Box::new(HotTable {
                    keys: std::array::from_fn(|_| AtomicU64::new(HOT_EMPTY)),
                    cells: std::array::from_fn(|_| HotCell::default()),
                })
            });
        }
    }

    /// The filter word and bits of `bytenr`.
    fn filter_bit(&self, bytenr: u64) -> Option<(&AtomicU64, u64)> {
        let filter = self.filter.get()?;
        let k = FilterKey::of(bytenr);
        Some((&filter[RunFilter::word(k, filter.len())], k.mask))
    }

    /// Writer only (the shard owner), before publishing slot `i` of an op
    /// of `bytenr`.
    fn note(&self, i: usize, bytenr: u64) {
        self.keys()[i].store(bytenr, Ordering::Relaxed);
        if let Some((word, bit)) = self.filter_bit(bytenr) {
            let w = word.load(Ordering::Relaxed);
            if w & bit != bit {
                word.store(w | bit, Ordering::Relaxed);
            }
        }
    }

    /// Whether the slots below a `len` loaded (Acquire) before this call
    /// may hold `bytenr` (a clear bit proves they do not, unless the buffer
    /// was emptied meanwhile: a change, which the reader's check detects).
    fn may_hold(&self, bytenr: u64) -> bool {
        self.filter_bit(bytenr)
            .is_some_and(|(word, bit)| word.load(Ordering::Relaxed) & bit == bit)
    }

    /// Empty the buffer (inside a change of its index, or with no writer).
    fn reset(&self) {
        self.len.store(0, Ordering::SeqCst);
        for w in self.filter.get().map_or(&[][..], |f| &f[..]) {
            w.store(0, Ordering::Relaxed);
        }
        if let Some(hot) = self.hot.get() {
            // Only named cells were written (a name comes before its sum).
            for (key, cell) in hot.keys.iter().zip(&hot.cells) {
                if key.load(Ordering::Relaxed) != HOT_EMPTY {
                    key.store(HOT_EMPTY, Ordering::Relaxed);
                    cell.state.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    fn slots(&self) -> &[[AtomicU64; SLOT_WORDS]] {
        self.slots.get().map_or(&[], |s| &s[..])
    }

    fn keys(&self) -> &[AtomicU64] {
        self.keys.get().map_or(&[], |k| &k[..])
    }

    /// The words of the op in slot `i` (its key and its slot).
    fn words(&self, i: usize) -> Staged {
        let (key, slot) = (&self.keys()[i], &self.slots()[i]);
        std::array::from_fn(|j| match j {
            0 => key.load(Ordering::Relaxed),
            _ => slot[j - 1].load(Ordering::Relaxed),
        })
    }

    /// Copy the words of the staged ops of `bytenr` into `out`, raw: a
    /// reader decodes them only once its read window proved them whole
    /// (a slot is reused only inside a change of the index, which spoils
    /// the window: module doc), so the window holds off writers for copies
    /// only. Two passes: the dense keys first, collecting the matching
    /// slots in `hits`, then the slots' words with nothing between their
    /// loads, so that the cache misses of a hot extent's slots (hundreds
    /// per buffer, written by another core) overlap instead of queueing
    /// behind one decode each.
    fn raw_of(&self, bytenr: u64, hits: &mut Vec<u32>, out: &mut Vec<Staged>) {
        let n = self.len.load(Ordering::Acquire).min(self.slots().len());
        if n == 0 || !self.may_hold(bytenr) {
            return;
        }
        hits.clear();
        for (i, key) in self.keys()[..n].iter().enumerate() {
            if key.load(Ordering::Relaxed) == bytenr {
                hits.push(i as u32);
            }
        }
        out.reserve(hits.len());
        out.extend(hits.iter().map(|&i| self.words(i as usize)));
    }

    /// [`Staging::read_all`] for a reader other than the writer: slots that
    /// are not one whole op (torn, the read is retried) are left out.
    fn read_all_whole(&self, out: &mut Vec<Staged>) {
        let from = out.len();
        self.read_all(out);
        let mut i = from;
        while i < out.len() {
            if try_decode(&out[i]).is_some() {
                i += 1;
            } else {
                out.swap_remove(i);
            }
        }
    }

    /// Copy the raw words of every published slot.
    fn read_all(&self, out: &mut Vec<Staged>) {
        let n = self.len.load(Ordering::Acquire).min(self.slots().len());
        out.extend((0..n).map(|i| self.words(i)));
    }
}

/// A staging buffer's published ops, read in place by the run build of
/// a hand-off (no copy of its ~360 KiB first). Only for a buffer no one
/// writes meanwhile: one being handed off.
struct FullBuffer<'a> {
    /// The published slots' keys and words (`len`, loaded with Acquire),
    /// taken once: not through the buffer's header for every op (its
    /// line is shared with the next buffer's `len`, which the owner
    /// stores at every append).
    keys: &'a [AtomicU64],
    slots: &'a [[AtomicU64; SLOT_WORDS]],
}

impl<'a> FullBuffer<'a> {
    fn of(st: &'a Staging) -> FullBuffer<'a> {
        let (keys, slots) = (st.keys(), st.slots());
        let n = st.len.load(Ordering::Acquire).min(slots.len());
        FullBuffer {
            keys: &keys[..n],
            slots: &slots[..n],
        }
    }
}

impl StagedOps for FullBuffer<'_> {
    fn count(&self) -> usize {
        self.slots.len()
    }

    fn bytenr(&self, i: usize) -> u64 {
        self.keys[i].load(Ordering::Relaxed)
    }

    fn words(&self, i: usize) -> Staged {
        let (key, slot) = (&self.keys[i], &self.slots[i]);
        std::array::from_fn(|j| match j {
            0 => key.load(Ordering::Relaxed),
            _ => slot[j - 1].load(Ordering::Relaxed),
        })
    }

    fn prefetch_op(&self, i: usize) {
        if let Some(slot) = self.slots.get(i) {
            let w = slot.as_ptr();
            prefetch(w);
            prefetch(w.cast::<u8>().wrapping_add(64));
        }
    }
}

/// One ingest shard: a gate and a lane of staging buffers per
/// transaction parity.
#[derive(Debug)]
struct Shard {
    claimed: AtomicBool,
    gate: ShardGate,
    lanes: [Lane; 2],
}

/// A shard's staging buffers of one transaction parity: a ring of
/// [`STAGING_RING`] buffers, the active one and full ones waiting for
/// their hand-off (see [`super::handoff`]). Readers read every buffer of
/// the lane (a full one holds ops not yet in the index).
#[derive(Debug)]
struct Lane {
    bufs: [Staging; STAGING_RING],
    ring: Ring,
}

impl Lane {
    fn new(staging_ops: usize) -> Lane {
        Lane {
            bufs: std::array::from_fn(|_| Staging::new(staging_ops)),
            ring: Ring::new(),
        }
    }

    /// The buffer the owner appends to.
    fn active(&self) -> &Staging {
        &self.bufs[self.ring.active()]
    }

    /// Whether every buffer is empty (a lane loaded for a generation).
    fn is_empty(&self) -> bool {
        self.bufs.iter().all(|b| b.len.load(Ordering::SeqCst) == 0)
    }

    /// Hand off buffer `i` (claimed by the caller: `HANDING`) into `idx`:
    /// sort its ops into a run, publish the run and empty the buffer in one
    /// change of the index. Returns the generation of its ops. The caller
    /// then marks it handed off ([`Ring::handed_off`] or
    /// [`Ring::owner_handed_off`]).
    fn hand_off(&self, i: usize, idx: &TxnIndex, gate: &ShardGate) -> u64 {
        let st = &self.bufs[i];
        let g = st.gen.load(Ordering::Relaxed);
        // While a buffer is HANDING, its generation can neither be merged
        // nor released (both wait for it: `Ring::hold`), so the index is
        // still `g`'s.
        assert!(
            gate.holds(g),
            "hand-off of generation {g} after its release"
        );
        // Read in place: no one writes a buffer while it is handed off
        // (`handoff::Ring`: the owner writes only its active buffer, and
        // hands a full one off itself only in this function; the buffer
        // is emptied only by `idx.hand_off` below or by a release, which
        // waits for this hand-off).
        let full = FullBuffer::of(st);
        let hot = idx.hot_list();
        let b = build_run_noting(&full, hot_ops_min(st.cap), &hot);
        idx.hand_off(b, st, &hot);
        g
    }

    /// Empty every buffer (release of the lane's generation, inside a
    /// change of its index): waits for a hand-off in progress first.
    fn reset(&self) {
        self.ring.hold();
        for b in &self.bufs {
            b.reset();
        }
        self.ring.reset();
    }

    /// Allocate the active buffer's slots (at a claim, and when the owner
    /// moves to a buffer of the ring: the others are allocated only once
    /// the background falls behind, so an idle or slow shard costs one
    /// buffer per parity).
    fn ensure_active(&self) {
        self.active().ensure();
    }
}

/// One immutable sorted run: its chunks in bytenr order.
#[derive(Debug)]
struct Run {
    level: u32,
    heads: usize,
    refs: usize,
    /// First bytenr of each chunk, and its fences (`fence.rs`): finding
    /// the chunk of a bytenr in a run of 4,000 chunks takes 4 rounds of
    /// one line each (the last maybe two), where a binary search took 12.
    firsts: Vec<u64>,
    first_fences: Fences,
    chunks: Vec<Chunk>,
    /// Which bytenrs the run may hold: a lookup searches the run only if
    /// this says so (a run of 4096 ops spans the whole key space, so
    /// `firsts` alone rules out nothing).
    filter: RunFilter,
}

/// Bits of a run's filter per head.
pub const RUN_FILTER_BITS_PER_HEAD: usize = 16;

/// A blocked Bloom filter over a run's bytenrs: one 64-bit word per key
/// (one cache miss per probe), 4 bits set in it. At
/// [`RUN_FILTER_BITS_PER_HEAD`] bits per head, a run that does not hold a
/// bytenr is searched anyway about once in 200 lookups.
#[derive(Debug)]
struct RunFilter {
    words: Box<[u64]>,
}

/// A bytenr's filter hash, computed once per lookup for every run.
#[derive(Clone, Copy)]
struct FilterKey {
    hash: u64,
    mask: u64,
}

impl FilterKey {
    /// splitmix64's finaliser (bytenrs are sector multiples, their low
    /// bits are not spread); 4 bits of the word from its low 24 bits, the
    /// word from its high 32.
    fn of(bytenr: u64) -> FilterKey {
        let mut x = bytenr ^ (bytenr >> 30);
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let mask = (0..4).fold(0u64, |m, k| m | 1u64 << ((x >> (6 * k)) & 63));
        FilterKey { hash: x, mask }
    }
}

impl RunFilter {
    fn new(heads: usize, bytenrs: impl Iterator<Item = u64>) -> RunFilter {
        let len = (heads * RUN_FILTER_BITS_PER_HEAD / 64)
            .max(1)
            .next_power_of_two();
        let mut words = vec![0u64; len];
        for b in bytenrs {
            let k = FilterKey::of(b);
            words[Self::word(k, len)] |= k.mask;
        }
        RunFilter {
            words: words.into_boxed_slice(),
        }
    }

    /// The word of `k` in a filter of `len` (a power of two) words.
    fn word(k: FilterKey, len: usize) -> usize {
        ((k.hash >> 32) as usize) & (len - 1)
    }

    #[cfg(test)]
    fn may_hold(&self, bytenr: u64) -> bool {
        let k = FilterKey::of(bytenr);
        self.words[Self::word(k, self.words.len())] & k.mask == k.mask
    }
}

impl Run {
    fn new(chunks: Vec<Chunk>, level: u32, heads: usize, refs: usize) -> Run {
        let firsts: Vec<u64> = chunks.iter().map(Chunk::first_bytenr).collect();
        Run {
            level,
            heads,
            refs,
            first_fences: Fences::build(firsts.len(), |i| firsts[i]),
            firsts,
            filter: RunFilter::new(heads, chunks.iter().flat_map(Chunk::bytenrs)),
            chunks,
        }
    }

    /// The chunk that would hold `bytenr` (no filter, no search in it):
    /// what `RunView::chunks_may_hold` finds for each run in lockstep.
    fn chunk_of(&self, bytenr: u64) -> Option<&Chunk> {
        let i = self.firsts.partition_point(|&f| f <= bytenr);
        (i > 0).then(|| &self.chunks[i - 1])
    }

    fn cursor(&self) -> Cursor<'_> {
        Cursor::new(self.chunks.iter().collect())
    }

    /// The summary of the run's head of `bytenr`, if it holds one.
    fn summary_of(&self, bytenr: u64) -> Option<HeadSummary> {
        let mut found = Vec::new();
        find_in_chunks(&[self.chunk_of(bytenr)?], bytenr, &mut found);
        found.first().map(|h| h.summary)
    }
}

/// What a lookup reads of an index's runs: every run's filter and run in
/// one array, in run id order. Republished at the end of each change of
/// the runs (built before its bracket by [`TxnIndex::next_view`], swapped
/// in inside it) and reclaimed by
/// crossbeam-epoch. So a lookup neither walks the skiplist (a chain of
/// dependent cache misses, one per run: 200–400 runs under full ingest)
/// nor takes a reference on each of its entries, and its filter probes
/// are independent loads that overlap.
///
/// The slots point into the runs (owned by the skiplist's entries) without
/// owning them: copying a view at each change costs a copy of plain
/// words, not a reference count per run. See [`RunView::chunks_may_hold`]
/// for why the pointers are valid where they are followed.
#[derive(Debug)]
struct RunView {
    slots: Vec<RunSlot>,
    /// The hot extents' summaries over every run of the view, by bytenr.
    hot: Vec<HotSum>,
}

/// Extents an index keeps summed for count lookups, at most: its view's
/// `HotSum`s, and the cells of each staging buffer (`HotTable`). An
/// extent becomes hot when a hand-off finds a head of it merged from at
/// least `hot_ops_min` ops while there is room (the heaviest of that
/// hand-off first), and stays hot until the index is cleared (no
/// eviction: a skewed load's hot set is found by the first hand-offs).
///
/// Under a skewed load the hottest extents are in every staging buffer
/// (hundreds of ops each) and nearly every run, so a count lookup of one
/// used to fold hundreds of staged ops and search a hundred runs. Now the
/// hand-off keeps each hot extent's summary over all of a view's runs in
/// the view (a compaction merges runs, which leaves the sum unchanged:
/// merging summaries is commutative and associative, and a compaction
/// drops no head but the identity), and each buffer's owner sums the
/// plain ops it stages of the index's hot extents in the buffer's cells.
pub const HOT_EXTENTS: usize = 64;

/// Cells of a staging buffer: four times [`HOT_EXTENTS`], each extent in
/// the first free one of the [`HOT_PROBES`] slots from the one its bytenr
/// hashes to. A hot extent that finds them all taken is not summed in
/// that buffer (its lookups scan it): with 64 extents in 256 slots, about
/// 0.2% of them (2 slots of 128 left 8.7% out, measured by simulation,
/// the hottest among them at times).
const HOT_SLOTS: usize = 4 * HOT_EXTENTS;

/// Slots probed per extent (consecutive: one or two cache lines of names).
const HOT_PROBES: usize = 4;

/// The first cell slot of `bytenr` (Fibonacci hashing: the product's top
/// bits depend on every bit of the bytenr).
fn hot_slot(bytenr: u64) -> usize {
    (bytenr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - HOT_SLOTS.trailing_zeros())) as usize
}

/// The slots where `bytenr`'s cell may be.
fn hot_slots(bytenr: u64) -> [usize; HOT_PROBES] {
    let h = hot_slot(bytenr);
    std::array::from_fn(|i| (h + i) % HOT_SLOTS)
}

/// A hand-off's head of at least this many of a buffer's `cap` ops makes
/// its extent a candidate to be kept hot (4 of 4096: an extent of at
/// least ~0.1% of the ops).
fn hot_ops_min(cap: usize) -> usize {
    (cap / 1024).max(2)
}

/// A hot extent's summary over every run of a view (`None`: no run holds
/// a head of it).
#[derive(Debug, Clone, Copy)]
struct HotSum {
    bytenr: u64,
    summary: Option<HeadSummary>,
}

#[derive(Debug, Clone, Copy)]
struct RunSlot {
    id: u64,
    /// The run's filter words (`RunFilter::words`) and their count.
    words: *const u64,
    words_len: usize,
    /// The run's chunks and their first bytenrs (`Run::chunks`,
    /// `Run::firsts`, of the same length) with the fences of the firsts
    /// (`Run::first_fences`), so that a lookup reaches them without a miss
    /// on the `Run` itself.
    chunks: *const Chunk,
    firsts: *const u64,
    first_fences: *const Line,
    chunks_len: usize,
}

/// A run of a view whose pointers may be followed (made only by
/// [`RunView::chunks_may_hold`], under its contract).
mod live {
    use super::{Chunk, Fenced, Line, RunSlot};

    pub(super) struct LiveRun<'a>(&'a RunSlot);

    impl<'a> LiveRun<'a> {
        /// # Safety
        ///
        /// `slot`'s run is alive, and stays so for `'a`.
        pub(super) unsafe fn new(slot: &'a RunSlot) -> LiveRun<'a> {
            LiveRun(slot)
        }

        /// Chunk `i` of the run.
        pub(super) fn chunk(&self, i: usize) -> &'a Chunk {
            assert!(i < self.0.chunks_len);
            // SAFETY: `i` is within the run's `chunks` (`chunks_len` is
            // their number), alive for `'a` (`LiveRun::new`).
            unsafe { &*self.0.chunks.add(i) }
        }
    }

    // SAFETY: the run is alive while borrowed (`LiveRun::new`);
    // `first_fences` was built over its `firsts` (`Run::new`), whose length
    // is `chunks_len` (`RunSlot::of`), and a run never changes.
    unsafe impl Fenced for LiveRun<'_> {
        fn len(&self) -> usize {
            self.0.chunks_len
        }

        fn fence_lines(&self) -> *const Line {
            self.0.first_fences
        }

        fn key(&self, i: usize) -> u64 {
            assert!(i < self.0.chunks_len);
            // SAFETY: `i` is within `firsts`, alive (above).
            unsafe { *self.0.firsts.add(i) }
        }
    }
}
use live::LiveRun;

// SAFETY: the pointers are only followed as `RunView::chunks_may_hold`
// says (a `Run` is immutable and `Sync`); a view itself is plain data.
unsafe impl Send for RunView {}
// SAFETY: as for `Send`: shared views are only read.
unsafe impl Sync for RunView {}

impl RunSlot {
    fn of(id: u64, run: &Arc<Run>) -> RunSlot {
        RunSlot {
            id,
            words: run.filter.words.as_ptr(),
            words_len: run.filter.words.len(),
            chunks: run.chunks.as_ptr(),
            firsts: run.firsts.as_ptr(),
            first_fences: run.first_fences.lines(),
            chunks_len: {
                debug_assert_eq!(run.firsts.len(), run.chunks.len());
                run.chunks.len()
            },
        }
    }
}

/// The view of an index with no runs (its `view` is null until the first).
static EMPTY_VIEW: RunView = RunView {
    slots: Vec::new(),
    hot: Vec::new(),
};

impl RunView {
    /// The summary of `bytenr`'s heads over every run of the view, if it is
    /// one of the view's hot extents (`Some(None)`: no run holds it).
    /// The view is immutable: valid wherever the view is.
    fn hot_summary(&self, bytenr: u64) -> Option<Option<HeadSummary>> {
        let i = self.hot.binary_search_by_key(&bytenr, |h| h.bytenr).ok()?;
        Some(self.hot[i].summary)
    }

    /// The chunk of each run whose filter may hold `bytenr`.
    ///
    /// # Safety
    ///
    /// The view was read in a read window of its index that saw no change
    /// begin (`ChangeCounters::read_stable`), by a thread that was pinned
    /// (crossbeam-epoch) before that window and still is. Then each of its
    /// runs was in the index's skiplist at the end of the window (a view
    /// is current only while the skiplist holds exactly its runs, and both
    /// change together inside one change's bracket), so it is removed
    /// later, and the skiplist entry that owns it (its only `Arc`) is
    /// destroyed through crossbeam-epoch only after every thread pinned at
    /// the removal, this one included, has unpinned. The chunks returned
    /// live as long as that pin.
    unsafe fn chunks_may_hold<'a>(&'a self, bytenr: u64, out: &mut Vec<&'a Chunk>) {
        let k = FilterKey::of(bytenr);
        // The runs whose filter may hold `bytenr`.
        let runs: Vec<LiveRun<'a>> = self
            .slots
            .iter()
            .filter(|s| {
                // SAFETY: the filter words belong to the run, alive (above).
                let word = unsafe { *s.words.add(RunFilter::word(k, s.words_len)) };
                word & k.mask == k.mask
            })
            // SAFETY: the run is alive while this pin is held (above), and
            // so for `'a`.
            .map(|s| unsafe { LiveRun::new(s) })
            .collect();
        // The last chunk whose first bytenr is at most `bytenr`, in each
        // run: searches in lockstep, as `find_in_chunks`, so that their
        // cache misses overlap.
        let mut found = Vec::with_capacity(runs.len());
        last_at_most_each(&runs, bytenr, &mut found);
        for (r, i) in runs.iter().zip(found) {
            if let Some(i) = i {
                out.push(r.chunk(i));
            }
        }
    }
}

/// The skiplist index of one transaction parity: runs by id (oldest
/// first). Each entry is an immutable sorted run; a compaction inserts the
/// merged run and removes its inputs, whose memory crossbeam-epoch reclaims
/// once no reader can hold them. One entry per run keeps the deferred
/// garbage per compaction to a handful of nodes.
#[derive(Debug, Default)]
struct TxnIndex {
    /// The runs by id. Each entry holds its run's only `Arc`: the `Arc`
    /// only gives the run an address before it is inserted, for the view
    /// built before the change's bracket ([`TxnIndex::next_view`]).
    runs: SkipMap<u64, Arc<Run>>,
    /// The runs as lookups read them ([`RunView`]); null: none yet.
    view: crossbeam_epoch::Atomic<RunView>,
    /// Serialises the changes of the runs ([`TxnIndex::lock_runs`]).
    view_writer: Mutex<()>,
    /// Brackets the changes of the runs, the staging buffers and the
    /// carry; readers read in its windows ([`ChangeCounters`]).
    changes: ChangeCounters,
    next_run: AtomicU64,
    /// See [`TOP_MERGE_RATIO`].
    top_merge_ratio: AtomicUsize,
    /// One compactor per level at a time; different levels compact in
    /// parallel (their input runs are disjoint).
    compacting: [AtomicBool; LEVELS_MAX],
    /// The newest generation this index was sealed for: compaction of a
    /// sealed generation stops (see [`TxnIndex::maybe_compact`]).
    sealed_gen: AtomicU64,
    /// Heads requeued by a commit (held back by a seq barrier).
    carry: Mutex<Vec<Head>>,
    /// The view's hot extents (`RunView::hot`), the first `hot_len`, for
    /// the staging buffers' owners to sum ([`Staging::seed_hot`]): a hint
    /// read without a window (a buffer's cells name their extents).
    hot_keys: HotKeys,
    hot_len: AtomicUsize,
}

/// [`TxnIndex::hot_keys`].
#[derive(Debug)]
struct HotKeys([AtomicU64; HOT_EXTENTS]);

impl Default for HotKeys {
    fn default() -> HotKeys {
        HotKeys(std::array::from_fn(|_| AtomicU64::new(HOT_EMPTY)))
    }
}

impl TxnIndex {
    /// Insert run `id` (inside a change bracket, after
    /// [`TxnIndex::next_view`]).
    fn insert_run(&self, id: u64, run: Arc<Run>) {
        self.runs.insert(id, run);
    }

    /// Take the right to change the runs: writers of the runs (hand-offs,
    /// compactions, release) are serialised, so that each builds its view
    /// from the one it replaces. (Hand-offs could overlap before the view;
    /// each holds this for an O(runs) copy of the view and its bracket.)
    fn lock_runs(&self) -> std::sync::MutexGuard<'_, ()> {
        self.view_writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The view after a change of the runs (caller holds
    /// [`TxnIndex::lock_runs`]; built before the change's bracket, so that
    /// readers wait only for the swap): the run `added` in, the runs whose
    /// id `removed` says out. Returns the new run's id with it.
    ///
    /// `guard` is pinned by the caller before it takes the lock and held
    /// until the change has ended: pins inside the change (the skiplist's,
    /// this one's) then nest, and a nested pin never collects garbage, so
    /// no destructor (of an old view, of runs a compaction removed) runs
    /// inside the bracket while readers wait for it. The caller flushes
    /// after the change ([`TxnIndex::end_runs_change`]).
    ///
    /// `hot` gives the new view's hot sums from the old view's.
    fn next_view(
        &self,
        guard: &crossbeam_epoch::Guard,
        added: Option<&Arc<Run>>,
        removed: impl Fn(u64) -> bool,
        hot: impl FnOnce(&[HotSum]) -> Vec<HotSum>,
    ) -> (crossbeam_epoch::Owned<RunView>, u64) {
        let old = self.view.load(Ordering::Acquire, guard);
        // SAFETY: `view` is null or a view published by `publish_view`,
        // which is destroyed only after another replaced it and every
        // thread pinned then has unpinned: this thread is pinned (`guard`).
        let old = unsafe { old.as_ref() }.unwrap_or(&EMPTY_VIEW);
        let old_slots = &old.slots[..];
        let mut slots: Vec<RunSlot> = old_slots
            .iter()
            .filter(|s| !removed(s.id))
            .cloned()
            .collect();
        // Ids rise and writers are serialised: a new run goes last.
        let id = self.next_run.fetch_add(1, Ordering::Relaxed);
        if let Some(run) = added {
            slots.push(RunSlot::of(id, run));
        }
        let hot = hot(&old.hot);
        (crossbeam_epoch::Owned::new(RunView { slots, hot }), id)
    }

    /// Publish a view built by [`TxnIndex::next_view`] (inside the change's
    /// bracket, after its skiplist changes, under the same
    /// [`TxnIndex::lock_runs`]): once the change ends, the view holds
    /// exactly the skiplist's runs (readers read it only then:
    /// `read_stable`).
    fn publish_view(&self, guard: &crossbeam_epoch::Guard, new: crossbeam_epoch::Owned<RunView>) {
        let old = self.view.swap(new, Ordering::SeqCst, guard);
        if !old.is_null() {
            // SAFETY: `old` is unlinked (no thread can load it any more);
            // threads that loaded it are pinned, and its destruction waits
            // for them.
            unsafe { guard.defer_destroy(old) };
        }
    }

    /// After a change of the runs has ended and [`TxnIndex::lock_runs`]
    /// is released: the replaced view may hold the last references to
    /// runs a compaction removed, so hand this thread's garbage to the
    /// global queue now (rather than when its bag fills, 64 hand-offs
    /// later) and collect what has expired, outside the bracket.
    fn end_runs_change(guard: crossbeam_epoch::Guard) {
        guard.flush();
    }

    /// The runs as a lookup reads them (inside a read window, so that they
    /// agree with the staging buffers read in the same window).
    fn view<'g>(&'g self, guard: &'g crossbeam_epoch::Guard) -> &'g RunView {
        let v = self.view.load(Ordering::Acquire, guard);
        // SAFETY: as in `next_view`: a published view is destroyed only
        // after it was replaced and every thread pinned at that moment
        // (this one: `guard`) unpinned, or with the index itself (`Drop`,
        // which no borrow of `self` outlives).
        unsafe { v.as_ref() }.unwrap_or(&EMPTY_VIEW)
    }

    /// Publish a batch handed off by a shard and clear its staging.
    ///
    /// `noted`: the hot extents `b`'s builder noted (ascending,
    /// [`build_run_noting`]).
    fn hand_off(&self, mut b: RunBuilder, staging: &Staging, noted: &[u64]) {
        let (heads, refs) = (b.heads_total, b.refs_total);
        let heavy = std::mem::take(&mut b.heavy);
        // Built outside the change: readers wait for changes.
        let run = (heads > 0).then(|| Arc::new(Run::new(b.finish(), 0, heads, refs)));
        let guard = crossbeam_epoch::pin();
        let runs = self.lock_runs();
        let mut added = Vec::new();
        let view = run.as_ref().map(|r| {
            self.next_view(
                &guard,
                Some(r),
                |_| false,
                |old| self.hot_after_hand_off(old, r, &heavy, noted, &mut added),
            )
        });
        self.changes.begin_change();
        if let (Some(run), Some((view, id))) = (run, view) {
            self.insert_run(id, run);
            self.publish_view(&guard, view);
        }
        staging.reset();
        self.changes.end_change();
        // Only appended to until the index is cleared (under
        // `lock_runs`): the keys before the length that tells the owners
        // of the new ones.
        if !added.is_empty() {
            let known = self.hot_len.load(Ordering::Relaxed);
            for (k, &b) in self.hot_keys.0[known..].iter().zip(&added) {
                k.store(b, Ordering::Relaxed);
            }
            let len = (known + added.len()).min(HOT_EXTENTS);
            self.hot_len.store(len, Ordering::Release);
        }
        drop(runs);
        Self::end_runs_change(guard);
    }

    /// The hot sums of the view after a hand-off publishes `run` (caller
    /// holds [`TxnIndex::lock_runs`], before the change: the skiplist holds
    /// exactly the old view's runs). Each hot extent's sum gains the run's
    /// head of it. While there is room, the heaviest of the run's `heavy`
    /// heads that are not hot yet become hot, summed over every old run
    /// (a search of each, done at most [`HOT_EXTENTS`] times per
    /// generation) and the new one.
    ///
    /// `heavy` and `noted` are the run builder's ([`build_run_noting`]): an
    /// extent that was noted but has no heavy head has no head in the run;
    /// one made hot since the run was built is searched for. The extents
    /// made hot are appended to `added`.
    fn hot_after_hand_off(
        &self,
        old: &[HotSum],
        run: &Run,
        heavy: &[(u64, HeadSummary, u32)],
        noted: &[u64],
        added: &mut Vec<u64>,
    ) -> Vec<HotSum> {
        let mut hot = old.to_vec();
        for h in &mut hot {
            let head = match heavy.binary_search_by_key(&h.bytenr, |x| x.0) {
                Ok(i) => Some(heavy[i].1),
                Err(_) if noted.binary_search(&h.bytenr).is_ok() => None,
                Err(_) => run.summary_of(h.bytenr),
            };
            h.summary = HeadSummary::merge_opt(h.summary, head);
        }
        if hot.len() < HOT_EXTENTS {
            let mut new: Vec<&(u64, HeadSummary, u32)> = heavy
                .iter()
                .filter(|x| !hot.iter().any(|h| h.bytenr == x.0))
                .collect();
            new.sort_by_key(|x| std::cmp::Reverse(x.2));
            new.truncate(HOT_EXTENTS - hot.len());
            for &(bytenr, summary, _) in new {
                let before = self.summed_over_runs(bytenr);
                hot.push(HotSum {
                    bytenr,
                    summary: HeadSummary::merge_opt(before, Some(summary)),
                });
                added.push(bytenr);
            }
            hot.sort_unstable_by_key(|h| h.bytenr);
        }
        hot
    }

    /// The summary of `bytenr`'s heads over every run of the skiplist
    /// (what a view's hot sum of it stands for).
    fn summed_over_runs(&self, bytenr: u64) -> Option<HeadSummary> {
        self.runs.iter().fold(None, |s, e| {
            HeadSummary::merge_opt(s, e.value().summary_of(bytenr))
        })
    }

    /// The extents of [`TxnIndex::hot_keys`], ascending (the hand-off's
    /// builder notes their heads: [`build_run_noting`]).
    fn hot_list(&self) -> Vec<u64> {
        let n = self.hot_len.load(Ordering::Acquire).min(HOT_EXTENTS);
        let mut keys: Vec<u64> = self.hot_keys.0[..n]
            .iter()
            .map(|k| k.load(Ordering::Relaxed))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Merge runs of generation `g` while some level in `levels` is due
    /// (`COMPACT_FANOUT` runs, or a top level due for a merge
    /// [`TxnIndex::top_merge_due`]); other levels are left as they are. One compactor per level; a thread that finds a level busy
    /// tries the next one and never waits. Returns whether it published
    /// a merge.
    ///
    /// The compactors are background threads, so a commit's seal never
    /// waits for a compaction (a top-level merge can take hundreds of
    /// milliseconds, and the durable engine seals under its cut lock,
    /// which stops all ingest). Instead, once generation `g` is sealed
    /// ([`TxnIndex::seal_compaction`]), no compaction of it starts: a
    /// compactor sets its level token, then reads `sealed_gen`; the sealer
    /// stores `sealed_gen`, then waits for every token to clear (both
    /// SeqCst: Dekker's pattern, as in the shard gate), outside the lock.
    fn maybe_compact(&self, g: u64, levels: std::ops::RangeInclusive<u32>) -> bool {
        let mut merged = false;
        loop {
            let mut by_level: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
            for e in self.runs.iter() {
                by_level.entry(e.value().level).or_default().push(*e.key());
            }
            let top = by_level.keys().next_back().copied();
            let mut claimed = None;
            for (&level, ids) in by_level.range(levels.clone()) {
                let due =
                    ids.len() >= COMPACT_FANOUT || (Some(level) == top && self.top_merge_due(ids));
                if !due {
                    continue;
                }
                let token = &self.compacting[(level as usize).min(LEVELS_MAX - 1)];
                if token
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    if self.sealed_gen.load(Ordering::SeqCst) >= g {
                        // Sealed: the committer merges what is there.
                        token.store(false, Ordering::SeqCst);
                        return merged;
                    }
                    claimed = Some((level, token));
                    break;
                }
            }
            let Some((level, token)) = claimed else {
                return merged;
            };
            // Re-read the level under its token: another compactor of this
            // level may have finished since the scan.
            let ids: Vec<u64> = self
                .runs
                .iter()
                .filter(|e| e.value().level == level)
                .map(|e| *e.key())
                .take(COMPACT_FANOUT)
                .collect();
            let is_top = self.runs.iter().all(|e| e.value().level <= level);
            let out_level = if ids.len() == COMPACT_FANOUT {
                level + 1
            } else {
                level
            };
            if ids.len() == COMPACT_FANOUT || (is_top && self.top_merge_due(&ids)) {
                let mut b = RunBuilder::new();
                {
                    let entries: Vec<_> = ids.iter().filter_map(|id| self.runs.get(id)).collect();
                    let cursors = entries.iter().map(|e| e.value().cursor()).collect();
                    merge_cursors(cursors, |m| b.push_merged(m));
                }
                let (heads, refs) = (b.heads_total, b.refs_total);
                let run =
                    (heads > 0).then(|| Arc::new(Run::new(b.finish(), out_level, heads, refs)));
                let guard = crossbeam_epoch::pin();
                let runs = self.lock_runs();
                // A merge leaves each extent's sum over the runs as it was.
                let (view, id) =
                    self.next_view(&guard, run.as_ref(), |id| ids.contains(&id), <[_]>::to_vec);
                self.changes.begin_change();
                if let Some(run) = run {
                    self.insert_run(id, run);
                }
                for id in &ids {
                    self.runs.remove(id);
                }
                self.publish_view(&guard, view);
                self.changes.end_change();
                drop(runs);
                drop(guard);
                // Flushes this thread's garbage (`end_runs_change` does
                // only that) and helps collect the inputs' memory.
                reclaim();
                merged = true;
            }
            token.store(false, Ordering::SeqCst);
        }
    }

    /// Stops compaction of generation `g` (sealed): no compaction of it
    /// starts from now on. Cheap: called by the seal, under the durable
    /// engine's cut lock.
    fn seal_compaction(&self, g: u64) {
        self.sealed_gen.fetch_max(g, Ordering::SeqCst);
    }

    /// Waits for the compactions of this index already running (started
    /// before [`TxnIndex::seal_compaction`]) to publish: after it, the
    /// runs are final. Called by the merge of a sealed transaction,
    /// outside the cut lock.
    fn wait_compactions(&self) {
        let mut spins = 0u32;
        while self.compacting.iter().any(|t| t.load(Ordering::SeqCst)) {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }

    /// Whether the top level's runs should merge into one: they are the
    /// largest runs and each covers most of the key space, so merging them
    /// mostly removes duplicates (memory) rather than copying. Only runs of
    /// comparable size merge (the smallest has at least 1/`TOP_MERGE_RATIO`
    /// of the largest's heads), which bounds how often a big run is
    /// rewritten: merging every arrival into a growing top run rewrote it
    /// every 32K ops (measured: 0.8 instead of 2.5 Mops/s on one thread).
    fn top_merge_due(&self, ids: &[u64]) -> bool {
        if ids.len() < 2 {
            return false;
        }
        let heads: Vec<usize> = ids
            .iter()
            .filter_map(|id| self.runs.get(id).map(|e| e.value().heads))
            .collect();
        match (heads.iter().min(), heads.iter().max()) {
            (Some(&min), Some(&max)) => min * self.top_merge_ratio.load(Ordering::Relaxed) >= max,
            _ => false,
        }
    }

    fn clear(&self) {
        let guard = crossbeam_epoch::pin();
        let runs = self.lock_runs();
        let (view, _) = self.next_view(&guard, None, |_| true, |_| Vec::new());
        self.hot_len.store(0, Ordering::Relaxed);
        self.changes.begin_change();
        for e in self.runs.iter() {
            e.remove();
        }
        self.publish_view(&guard, view);
        self.lock_carry().clear();
        self.changes.end_change();
        drop(runs);
        Self::end_runs_change(guard);
    }

    fn lock_carry(&self) -> std::sync::MutexGuard<'_, Vec<Head>> {
        self.carry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for TxnIndex {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no thread reads or republishes this index's
        // view any more (readers borrow the index), so the current view is
        // unshared; older ones were handed to crossbeam-epoch.
        unsafe {
            let v = self
                .view
                .load(Ordering::Relaxed, crossbeam_epoch::unprotected());
            if !v.is_null() {
                drop(v.into_owned());
            }
        }
    }
}

/// One step of a bounded wait: spin, then yield, then sleep 50 µs (the
/// hand-off ring's and the change counters' wait, `handoff::wait_step`;
/// under loom that is a yield instead).
#[cfg_attr(loom, allow(dead_code))]
pub(super) fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 128 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// Push this thread's deferred skiplist garbage (removed chunks) to the
/// global epoch queue and help collect it, so memory of compacted runs is
/// returned promptly instead of piling up in thread-local bags.
fn reclaim() {
    for _ in 0..2 {
        crossbeam_epoch::pin().flush();
    }
}

/// The lock-free store. See the module doc.
#[derive(Debug)]
pub struct LockFreeStore {
    /// Live transaction generation.
    gen: CachePadded<Generation>,
    /// Last generation frozen and released.
    released: CachePadded<AtomicU64>,
    /// Written by every allocation and extent_op: on its own cache line,
    /// away from the fields every op reads (`shared`).
    clock: CachePadded<StampClock>,
    /// The shards, the indexes and the background threads that work on
    /// them.
    shared: Arc<Shared>,
    staging_ops: usize,
}

/// What the store's background threads share with it.
#[derive(Debug)]
struct Shared {
    shards: Box<[CachePadded<Shard>]>,
    index: [TxnIndex; 2],
    /// Turns full staging buffers into runs ([`hand_off_full`]): ingest
    /// threads only mark a buffer full and move to the next.
    handoff: Worker,
    /// Merges runs, lowest level first ([`TxnIndex::maybe_compact`]). A
    /// top-level merge rewrites the largest run (hundreds of MB under a million pending
    /// heads); on an ingest thread it held up that thread's ops for tens
    /// of milliseconds (measured: single SUBMITs of the daemon took up to
    /// 80 ms).
    compactor: Worker,
    /// Merges only the small runs (levels below [`SMALL_LEVELS`]), so that
    /// they do not pile up while the compactor rewrites a large run.
    small_compactor: Worker,
    /// Hand-offs done, and of them by an ingest thread because no buffer
    /// of its ring was empty (the background was behind): reports.
    hand_offs: AtomicU64,
    owner_hand_offs: AtomicU64,
    #[cfg(test)]
    test: TestHooks,
}

/// Test hooks of the background hand-off.
#[cfg(test)]
#[derive(Debug, Default)]
struct TestHooks {
    /// The hand-off thread claims nothing while set.
    paused: AtomicBool,
    /// Held by a test: the hand-off thread stops between its claim of a
    /// buffer and the publish of its run.
    mid_hand_off: Mutex<()>,
    /// The compactor (not the small one) merges nothing while set.
    compactor_busy: AtomicBool,
    /// The compactor merges only the levels from `SMALL_LEVELS` up while
    /// set (as when it finds the small ones' tokens taken).
    compactor_above_small: AtomicBool,
    /// Held by a test: the small compactor waits before each job.
    small_held: Mutex<()>,
    /// Passed by a read of a lane that read its first buffer, before the
    /// others.
    mid_lane: TestPause,
    /// Passed by a read of the visible generations that read the first
    /// one (the newest), before the next.
    mid_visible: TestPause,
}

/// A point a thread passes, or waits at while a test holds it.
#[cfg(test)]
#[derive(Debug, Default)]
struct TestPause {
    /// Some thread came to the point.
    reached: AtomicBool,
    held: Mutex<()>,
}

#[cfg(test)]
impl TestPause {
    fn pass(&self) {
        self.reached.store(true, Ordering::SeqCst);
        drop(self.held.lock());
    }
}

/// A background thread of the store: started on the first request,
/// stopped when the store drops. A request names a generation; the thread
/// runs its job for the newest generation asked since it last looked.
#[derive(Debug)]
struct Worker {
    name: &'static str,
    job: fn(&Arc<Shared>, u64),
    state: Mutex<WorkState>,
    cv: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The thread was started (`thread` is only locked until then, and to
    /// stop it).
    started: AtomicBool,
}

#[derive(Debug, Default)]
struct WorkState {
    /// The newest generation asked for.
    due: Option<u64>,
    /// The job is running.
    running: bool,
    /// The thread waits for a request (on `cv`): only then does a request
    /// wake it. A wake-up is a system call, and on a busy core the woken
    /// thread may take the requester's core at once (waking it on every
    /// hand-off left the ingest p99.99 at ~50 µs in 3 of 5 runs, against
    /// 3–17 µs without: `docs/benchmarks.md`).
    idle: bool,
    stop: bool,
}

impl Worker {
    fn new(name: &'static str, job: fn(&Arc<Shared>, u64)) -> Worker {
        Worker {
            name,
            job,
            state: Mutex::new(WorkState::default()),
            cv: Condvar::new(),
            thread: Mutex::new(None),
            started: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for the job on generation `g`. `me` finds this worker in
    /// `shared` (the thread holds `shared`, not the worker).
    fn request(&self, shared: &Arc<Shared>, g: u64, me: fn(&Shared) -> &Worker) {
        let mut st = self.lock();
        st.due = Some(st.due.map_or(g, |d| d.max(g)));
        // Not idle: running (it takes `due` when the job returns, under
        // this lock) or not started yet (started below).
        if st.idle {
            self.cv.notify_all();
        }
        drop(st);
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let mut t = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_none() {
            let s = Arc::clone(shared);
            // If the thread cannot start, the job runs here instead.
            match std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || me(&s).run(&s))
            {
                Ok(h) => {
                    *t = Some(h);
                    self.started.store(true, Ordering::Release);
                }
                Err(_) => {
                    drop(t);
                    self.lock().due = None;
                    (self.job)(shared, g);
                }
            }
        }
    }

    fn run(&self, shared: &Arc<Shared>) {
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            let Some(g) = st.due.take() else {
                st.idle = true;
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle = false;
                continue;
            };
            st.running = true;
            drop(st);
            (self.job)(shared, g);
            st = self.lock();
            st.running = false;
            self.cv.notify_all();
        }
    }

    /// Waits until no job is asked for or running.
    fn settle(&self) {
        if self
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return;
        }
        let mut st = self.lock();
        while st.due.is_some() || st.running {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops the thread once its job in progress is done; work asked for
    /// and not started is dropped (the store drops with it).
    fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// The hand-off thread's job: turn every full staging buffer of every
/// shard into a run in its index (until none is left), and ask for
/// compaction after each.
fn hand_off_full(shared: &Arc<Shared>, _g: u64) {
    loop {
        let mut any = false;
        for shard in shared.shards.iter() {
            for (p, lane) in shard.lanes.iter().enumerate() {
                for i in 0..STAGING_RING {
                    #[cfg(test)]
                    if shared.test.paused.load(Ordering::SeqCst) {
                        return;
                    }
                    if !lane.ring.claim(i) {
                        continue;
                    }
                    #[cfg(test)]
                    drop(shared.test.mid_hand_off.lock());
                    let g = lane.hand_off(i, &shared.index[p], &shard.gate);
                    lane.ring.handed_off(i);
                    shared.hand_offs.fetch_add(1, Ordering::Relaxed);
                    request_compaction(shared, g);
                    any = true;
                }
            }
        }
        if !any {
            return;
        }
    }
}

/// Asks both compactors to look at generation `g`'s index: after a
/// hand-off adds a run (by the hand-off thread or an ingest thread).
fn request_compaction(shared: &Arc<Shared>, g: u64) {
    shared.compactor.request(shared, g, |s| &s.compactor);
    shared
        .small_compactor
        .request(shared, g, |s| &s.small_compactor);
}

/// The compactor's job: merge generation `g`'s runs, lowest level first
/// (the small runs too when the small compactor is behind: measured with
/// the small compactor on levels 0 and 1, the compactor kept to the
/// levels above them left lookups slower, zipf p99 25–34 µs against 22–25
/// in the same runs).
fn compact(shared: &Arc<Shared>, g: u64) {
    #[cfg(test)]
    if shared.test.compactor_busy.load(Ordering::SeqCst) {
        return;
    }
    #[cfg(test)]
    if shared.test.compactor_above_small.load(Ordering::SeqCst) {
        shared.index[parity(g)].maybe_compact(g, SMALL_LEVELS..=u32::MAX);
        return;
    }
    shared.index[parity(g)].maybe_compact(g, 0..=u32::MAX);
}

/// Levels whose runs the small compactor merges: level 0 only, the
/// hand-offs' runs (8 of them, ~30k heads, about a millisecond to merge;
/// more only while level 0 is the top level, at the start of a
/// generation, where its runs also merge with each other as the top
/// level's do).
///
/// Why a second compactor: the compactor merges one level at a time,
/// lowest first, and a merge of the largest runs (hundreds of MB under a
/// million pending heads) takes it away for hundreds of milliseconds;
/// meanwhile every hand-off adds a run (about 2,000 a second at full
/// ingest), so the runs piled up to 100–400, every lookup of an extent in
/// most of them searched them all, and each stored its heads again
/// unmerged. Measured with the small runs merged beside it
/// (`docs/benchmarks.md`, "Issue 13: a small compactor, fences"): zipf
/// ingest with a lookup thread, lookup p99 19–25 µs instead of 28–35 in
/// the same runs, and fewer bytes per pending ref at the end of ingest,
/// for 10–15% less in-process ingest throughput (merges done now rather
/// than by the commit's merge, on the same 2 cores); the durable engine,
/// bound by its log and commits, was not slower. Levels 0 and 1 (2): no
/// faster lookups than level 0 alone, for another 10% of uniform ingest.
/// At a lower CPU weight (nice 5 or 10) it held its level's token while
/// preempted and lookups were slower than with no small compactor.
const SMALL_LEVELS: u32 = 1;

/// The small compactor's job: merge generation `g`'s small runs (levels
/// below [`SMALL_LEVELS`]), whatever the compactor is merging. A merge of
/// level `SMALL_LEVELS - 1` adds a run to the level above, which may make
/// it due: the compactor is asked to look (a hand-off asked it before
/// this merge, and it may have found nothing to do then).
fn compact_small(shared: &Arc<Shared>, g: u64) {
    #[cfg(test)]
    drop(shared.test.small_held.lock());
    if shared.index[parity(g)].maybe_compact(g, 0..=SMALL_LEVELS - 1) {
        shared.compactor.request(shared, g, |s| &s.compactor);
    }
}

impl Drop for LockFreeStore {
    fn drop(&mut self) {
        // Each asks the ones after it for work: the hand-off thread
        // both compactors, the small compactor the compactor.
        self.shared.handoff.stop();
        self.shared.small_compactor.stop();
        self.shared.compactor.stop();
    }
}

impl Default for LockFreeStore {
    fn default() -> Self {
        LockFreeStore::new()
    }
}

impl LockFreeStore {
    /// A store with [`SHARDS_DEFAULT`] shards of [`STAGING_OPS`] ops.
    pub fn new() -> LockFreeStore {
        LockFreeStore::with_config(SHARDS_DEFAULT, STAGING_OPS)
    }

    /// A store with `shards` ingest shards staging `staging_ops` ops each
    /// (small values exercise hand-off and compaction in tests).
    pub fn with_config(shards: usize, staging_ops: usize) -> LockFreeStore {
        assert!(
            shards > 0 && staging_ops > 0,
            "shards and staging_ops must be > 0"
        );
        let shards = (0..shards)
            .map(|_| {
                CachePadded::new(Shard {
                    claimed: AtomicBool::new(false),
                    gate: ShardGate::new(),
                    lanes: std::array::from_fn(|_| Lane::new(staging_ops)),
                })
            })
            .collect();
        LockFreeStore {
            gen: CachePadded::new(Generation::new()),
            released: CachePadded::new(AtomicU64::new(0)),
            clock: CachePadded::new(StampClock::default()),
            shared: Arc::new(Shared {
                shards,
                index: std::array::from_fn(|_| {
                    let idx = TxnIndex::default();
                    idx.top_merge_ratio
                        .store(TOP_MERGE_RATIO, Ordering::Relaxed);
                    idx
                }),
                handoff: Worker::new("refd-handoff", hand_off_full),
                compactor: Worker::new("refd-compact", compact),
                small_compactor: Worker::new("refd-compact-s", compact_small),
                hand_offs: AtomicU64::new(0),
                owner_hand_offs: AtomicU64::new(0),
                #[cfg(test)]
                test: TestHooks::default(),
            }),
            staging_ops,
        }
    }

    /// Set the top-level merge ratio (>= 1): larger trades ingest
    /// throughput for memory (see [`TOP_MERGE_RATIO`]).
    pub fn with_top_merge_ratio(self, ratio: usize) -> LockFreeStore {
        let ratio = ratio.max(1);
        for idx in self.shared.index.iter() {
            idx.top_merge_ratio.store(ratio, Ordering::Relaxed);
        }
        self
    }

    /// Waits until the background hand-off and both compactors have done
    /// what they were asked (tests and reports that look at the index's
    /// shape).
    pub fn settle(&self) {
        // Each asks the ones after it for work.
        self.shared.handoff.settle();
        self.shared.small_compactor.settle();
        self.shared.compactor.settle();
    }

    /// Hand-offs of full staging buffers so far, and of them how many an
    /// ingest thread did itself because its ring had no empty buffer (the
    /// background hand-off thread was behind; see [`super::handoff`]).
    pub fn hand_off_counts(&self) -> (u64, u64) {
        let s = &self.shared;
        let own = s.owner_hand_offs.load(Ordering::Relaxed);
        (s.hand_offs.load(Ordering::Relaxed), own)
    }

    /// Most attempts any read of the store's indexes took so far: at most
    /// [`READ_OPTIMISTIC_MAX`] optimistic ones, then one per writer that
    /// had begun a change when the read asked for a quiet window (ingest
    /// handles, the compactor, the committer) plus one.
    pub fn read_attempts_max(&self) -> u64 {
        self.shared
            .index
            .iter()
            .map(|i| i.changes.read_attempts_max())
            .max()
            .unwrap_or(0)
    }

    /// Runs currently in the live index (for tests and reports).
    pub fn live_runs(&self) -> usize {
        self.shared.index[parity(self.gen.live())].runs.len()
    }

    /// What the live index holds: `(runs, heads stored, refs stored,
    /// heap bytes of chunk arrays)`. Heads and refs of one extent stored in
    /// several runs count once per run (they merge at compaction/freeze).
    pub fn index_stats(&self) -> IndexStats {
        let idx = &self.shared.index[parity(self.gen.live())];
        let mut st = IndexStats::default();
        for r in idx.runs.iter() {
            st.runs += 1;
            st.heads += r.value().heads;
            let level = r.value().level as usize;
            if st.levels.len() <= level {
                st.levels.resize(level + 1, (0, 0));
            }
            st.levels[level].0 += 1;
            st.levels[level].1 += r.value().heads;
            st.refs += r.value().refs;
            st.chunk_bytes += r
                .value()
                .chunks
                .iter()
                .map(Chunk::heap_bytes)
                .sum::<usize>();
        }
        st
    }

    /// Read `lane`'s buffers, each with `read` (into `out`), until its
    /// owner did not move to another buffer meanwhile
    /// (`handoff::Ring::moves`: else the read could show the ops after a
    /// move without the ones before it). What a spoiled attempt added is
    /// taken back (`undo` to its `mark`). False after [`LANE_READS_MAX`]
    /// spoiled attempts: the caller's whole read is then tried again (in a
    /// quiet window, where moves are bounded).
    fn read_lane_unmoved<O, M>(
        &self,
        lane: &Lane,
        out: &mut O,
        mark: impl Fn(&O) -> M,
        undo: impl Fn(&mut O, M),
        mut read: impl FnMut(&mut O, &Staging),
    ) -> bool {
        for _ in 0..LANE_READS_MAX {
            let moves = lane.ring.moves();
            let m = mark(out);
            for (i, st) in lane.bufs.iter().enumerate() {
                #[cfg(test)]
                if i == 1 {
                    self.shared.test.mid_lane.pass();
                }
                #[cfg(not(test))]
                let _ = i;
                read(out, st);
            }
            if lane.ring.moves() == moves {
                return true;
            }
            undo(out, m);
        }
        false
    }

    /// What generation `g` holds, taken without merging: its runs (the
    /// skiplist entries keep them alive after a compaction removes them),
    /// a copy of its staged ops and its carry. Quick (no sorting or
    /// merging), so a reader needs a consistent window only this long
    /// (caller guarantees stability or wraps this in `read_stable_checked`); the
    /// merge runs afterwards, whatever ingest does meanwhile.
    /// `None` if an owner moved to another buffer during the read
    /// (`handoff::Ring::moves`): the copy might not be a prefix of its ops.
    fn snapshot_gen(&self, g: u64) -> Option<GenSnapshot<'_>> {
        let idx = &self.shared.index[parity(g)];
        let mut staged = Vec::new();
        for shard in self.shared.shards.iter() {
            if !shard.gate.holds(g) {
                continue;
            }
            // Every buffer of the lane: full ones not handed off yet hold
            // ops that are in no run.
            let whole = self.read_lane_unmoved(
                &shard.lanes[parity(g)],
                &mut staged,
                Vec::len,
                Vec::truncate,
                |staged, st| {
                    let mut words = Vec::new();
                    st.read_all_whole(&mut words);
                    if !words.is_empty() {
                        staged.push(words);
                    }
                },
            );
            if !whole {
                return None;
            }
        }
        Some(GenSnapshot {
            runs: idx.runs.iter().collect(),
            staged,
            carry: idx.lock_carry().clone(),
        })
    }

    /// The part of a lookup of `bytenr` in generation `g` that needs a
    /// consistent read (caller wraps it in `read_stable`): the runs of the
    /// generation, unsearched, and the heads of `bytenr`'s staged ops and
    /// carry. With `sums` (a count lookup), a buffer whose cell sums
    /// `bytenr`'s ops gives that sum (and the words of its latest
    /// allocation) instead of its ops.
    fn lookup_window<'g>(
        &'g self,
        g: u64,
        bytenr: u64,
        sums: bool,
        guard: &'g crossbeam_epoch::Guard,
    ) -> Option<LookupParts<'g>> {
        let idx = &self.shared.index[parity(g)];
        let view = idx.view(guard);
        let mut parts = LookupParts {
            view,
            run_sum: view.hot_summary(bytenr).filter(|_| sums),
            staged: Vec::new(),
            cell_sums: Vec::new(),
            carry: Vec::new(),
        };
        // Cells name only the index's hot extents, which its view lists:
        // for any other extent, no probe of every buffer's cells.
        let sums = parts.run_sum.is_some();
        let mut hits = Vec::new();
        for shard in self.shared.shards.iter() {
            if !shard.gate.holds(g) {
                continue;
            }
            let whole = self.read_lane_unmoved(
                &shard.lanes[parity(g)],
                &mut parts,
                |p| (p.staged.len(), p.cell_sums.len()),
                |p, (staged, cells)| {
                    p.staged.truncate(staged);
                    p.cell_sums.truncate(cells);
                },
                |parts, st| {
                    if sums {
                        if let Some(sum) = st.hot_sum(bytenr) {
                            if let Some(c) = sum {
                                // The latest allocation as staged (its
                                // stamp), the others counted.
                                if c.allocs > 0 {
                                    parts.staged.push(st.words(c.latest_alloc));
                                }
                                parts.cell_sums.push(c);
                            }
                            return;
                        }
                    }
                    st.raw_of(bytenr, &mut hits, &mut parts.staged);
                },
            );
            if !whole {
                return None;
            }
        }
        parts.carry.extend(
            idx.lock_carry()
                .iter()
                .filter(|h| h.bytenr == bytenr)
                .cloned(),
        );
        Some(parts)
    }

    /// Look `bytenr` up: its heads in the runs, its staged ops (with their
    /// stamps) and its carried heads. With `sums` (a count lookup), the
    /// hot extents' sums stand in for their heads and plain ops where
    /// there are any ([`HOT_EXTENTS`]; `Found::summed`).
    fn lookup_with<R>(
        &self,
        bytenr: u64,
        live_only: bool,
        sums: bool,
        f: impl FnOnce(&Found<'_>) -> R,
    ) -> R {
        // The read window covers only what can change under it: which
        // runs the generation has (its view, whose runs this pin keeps
        // alive after a compaction removes them) and the staged ops and carry of
        // `bytenr`. The runs are searched afterwards: they are immutable,
        // so ingest is held off (quiet window) for one pointer load and a
        // filtered staging scan, not for a search of every run.
        let guard = crossbeam_epoch::pin();
        let parts = self.read_visible(live_only, |g| self.lookup_window(g, bytenr, sums, &guard));
        let mut chunks = Vec::new();
        let mut found = Found {
            bytenr,
            runs: Vec::new(),
            staged: Vec::new(),
            carry: Vec::new(),
            run_sums: Vec::new(),
            cell_sums: Vec::new(),
            summed: false,
        };
        for p in parts {
            // The view's runs' heads summed, if `bytenr` is one of its hot
            // extents (the view is immutable, alive while pinned).
            match p.run_sum {
                Some(sum) => {
                    found.summed |= sum.is_some();
                    found.run_sums.extend(sum);
                }
                // SAFETY: `read_visible` returned the view from a window
                // of its index that saw no change begin, read under
                // `guard`, pinned before it and held until the search is
                // done.
                None => unsafe { p.view.chunks_may_hold(bytenr, &mut chunks) },
            }
            found.summed |= !p.cell_sums.is_empty();
            found.staged.extend(p.staged);
            found.cell_sums.extend(p.cell_sums);
            found.carry.extend(p.carry);
        }
        find_in_chunks(&chunks, bytenr, &mut found.runs);
        f(&found)
    }

    /// The merged pending head of `bytenr`: over the visible generations,
    /// or the live one only when `live_only`.
    fn pending_in(&self, bytenr: u64, live_only: bool) -> Option<Head> {
        self.lookup_with(bytenr, live_only, false, |found| {
            let ops: Vec<_> = staged_ops(bytenr, &found.staged).collect();
            merge_found(bytenr, &found.runs, &ops, &found.carry)
        })
    }

    /// The summary of [`LockFreeStore::pending_in`]'s head, merging the
    /// refs only when the summaries alone cannot tell a no-op head (which
    /// `pending_in` leaves out) from a live one.
    fn pending_summary_in(&self, bytenr: u64, live_only: bool) -> Option<HeadSummary> {
        let summed = self.lookup_with(bytenr, live_only, true, |found| {
            let summary = found.summary()?;
            // A no-op head has no allocation, no extent_op and every ref's
            // count at 0, so a total of 0 (every op but UPDATE_HEAD, which
            // counts 0, has a ref: `Op::check`). Anything else is live.
            if summary.total_ref_mod != 0 || summary.alloc_stamp != 0 || summary.extent_op.is_some()
            {
                return Some(Ok(summary));
            }
            if found.summed {
                // Sums have no refs: look the head up whole.
                return Some(Err(()));
            }
            let ops: Vec<_> = staged_ops(bytenr, &found.staged).collect();
            merge_found(bytenr, &found.runs, &ops, &found.carry).map(|h| Ok(h.summary))
        })?;
        match summed {
            Ok(summary) => Some(summary),
            Err(()) => self.pending_in(bytenr, live_only).map(|h| h.summary),
        }
    }

    /// Visible generations `released+1 ..= live` (only `live` when
    /// `live_only`), read consistently. After [`READ_OPTIMISTIC_MAX`]
    /// attempts spoiled by a release, both indexes are held quiet, which
    /// holds off releases (they change an index) until the read is done.
    fn read_visible<T>(
        &self,
        live_only: bool,
        mut read_gen: impl FnMut(u64) -> Option<T>,
    ) -> Vec<T> {
        let mut attempt = 0;
        loop {
            let _quiet = (attempt >= READ_OPTIMISTIC_MAX).then(|| {
                [
                    self.shared.index[0].changes.hold_quiet(),
                    self.shared.index[1].changes.hold_quiet(),
                ]
            });
            attempt += 1;
            let released = self.released.load(Ordering::SeqCst);
            let live = self.gen.live();
            let first = if live_only { live } else { released + 1 };
            // Newest first: an ingester inside the sealed generation may
            // still append to it and then go on in the live one (another
            // lane, whose moves its ring does not count). Read oldest
            // first, a slow read could see its ops in the live generation
            // without its last ones in the sealed one; read newest first,
            // a read that saw any of its ops in the live generation sees
            // all of its ops in the sealed one (they were published
            // before), or a change of it.
            let mut out: Vec<T> = (first..=live)
                .rev()
                .enumerate()
                .map(|(k, g)| {
                    #[cfg(test)]
                    if k == 1 {
                        self.shared.test.mid_visible.pass();
                    }
                    #[cfg(not(test))]
                    let _ = k;
                    self.shared.index[parity(g)]
                        .changes
                        .read_stable_checked(|| read_gen(g))
                })
                .collect();
            out.reverse();
            if self.released.load(Ordering::SeqCst) == released {
                return out;
            }
        }
    }
}

/// One bytenr's heads found in runs and its other heads (staged, carried)
/// merged into one: what [`merge_heads`] of them all gives (`None` for a
/// no-op), but with one sort of all their refs (`merge_refs`, as a
/// compaction merges them). A hot extent has a head in
/// nearly every run (hundreds under full ingest); merged head by head, its
/// refs were copied once per run.
fn merge_found(
    bytenr: u64,
    runs: &[HeadRef<'_>],
    staged: &[(Op, u64)],
    carry: &[Head],
) -> Option<Head> {
    let summary = merged_summary(runs, staged.iter().copied(), carry)?;
    let mut refs: Vec<PackedRef> = runs.iter().flat_map(|h| h.refs.iter().copied()).collect();
    refs.extend(
        staged
            .iter()
            .filter_map(|(op, _)| op.key.map(|k| PackedRef::new(k, op.seq, op.ref_mod()))),
    );
    refs.extend(
        carry
            .iter()
            .flat_map(|h| h.refs.iter().map(PackedRef::pack)),
    );
    merge_refs(&mut refs);
    let head = Head {
        bytenr,
        summary,
        refs: refs.iter().map(PackedRef::unpack).collect(),
    };
    (!head.is_noop()).then_some(head)
}

/// What a lookup of one bytenr found over the visible generations.
struct Found<'a> {
    bytenr: u64,
    /// Its heads in runs (searched).
    runs: Vec<HeadRef<'a>>,
    /// The raw words of its staged ops ([`Staging::raw_of`]).
    staged: Vec<Staged>,
    carry: Vec<Head>,
    /// Sums over the runs of a view in place of their heads
    /// ([`RunView::hot_summary`]).
    run_sums: Vec<HeadSummary>,
    /// Sums of a buffer's ops in place of them ([`Staging::hot_sum`]; the
    /// latest allocation is in `staged`).
    cell_sums: Vec<CellSum>,
    /// Whether any sum stood in for heads or ops: then `runs` and
    /// `staged` do not hold all of them.
    summed: bool,
}

impl Found<'_> {
    /// Everything found, summarised: [`merged_summary`] with the sums.
    fn summary(&self) -> Option<HeadSummary> {
        let mut fold = SummaryFold::default();
        self.run_sums.iter().for_each(|&s| fold.summary(s));
        for c in &self.cell_sums {
            let allocs = i64::from(c.allocs);
            // The plain ops' sum (an allocation counts +1), in one shape.
            fold.plain(c.num_bytes, c.kind, c.total - allocs);
            if c.allocs > 1 {
                // The allocations before the latest (staged, with its
                // stamp): counted, their stamps older than its, so any
                // stamp below it merges the same (the latest defines the
                // extent); 1 is at or below every real stamp, and below
                // the latest's (at least 2 when there are two).
                fold.summary(HeadSummary {
                    num_bytes: c.num_bytes,
                    kind: c.kind,
                    shape_known: true,
                    mixed: false,
                    alloc_stamp: 1,
                    allocs: c.allocs - 1,
                    total_ref_mod: allocs - 1,
                    extent_op: None,
                });
            }
        }
        fold_found(
            &mut fold,
            &self.runs,
            staged_ops(self.bytenr, &self.staged),
            &self.carry,
        );
        fold.finish()
    }
}

/// The summaries of one bytenr's heads found in runs, staged ops and
/// carried heads, merged (`None`: nothing found), the staged ops folded
/// with [`SummaryFold`].
fn merged_summary(
    runs: &[HeadRef<'_>],
    staged: impl Iterator<Item = (Op, u64)>,
    carry: &[Head],
) -> Option<HeadSummary> {
    let mut fold = SummaryFold::default();
    fold_found(&mut fold, runs, staged, carry);
    fold.finish()
}

fn fold_found(
    fold: &mut SummaryFold,
    runs: &[HeadRef<'_>],
    staged: impl Iterator<Item = (Op, u64)>,
    carry: &[Head],
) {
    runs.iter().for_each(|h| fold.summary(h.summary));
    staged.for_each(|(op, stamp)| fold.op(&op, stamp));
    carry.iter().for_each(|h| fold.summary(h.summary));
}

/// The ops of `bytenr` in the raw words a lookup copied from staging
/// ([`Staging::raw_of`]). They are whole (the read window saw no change);
/// `try_decode` all the same, so that words that are not one op can never
/// reach the decoders' assertions.
fn staged_ops(bytenr: u64, staged: &[Staged]) -> impl Iterator<Item = (Op, u64)> + '_ {
    staged
        .iter()
        .filter_map(try_decode)
        .filter(move |(op, _)| op.bytenr == bytenr)
}

/// What a lookup reads of one generation in its read window.
struct LookupParts<'g> {
    view: &'g RunView,
    /// With `sums`, the view's sum of the extent's heads if it is one of
    /// its hot extents ([`RunView::hot_summary`]), in place of its runs.
    run_sum: Option<Option<HeadSummary>>,
    /// The raw words of `bytenr`'s staged ops ([`Staging::raw_of`]).
    staged: Vec<Staged>,
    /// Sums of its ops in place of their words ([`Staging::hot_sum`]).
    cell_sums: Vec<CellSum>,
    carry: Vec<Head>,
}

/// A generation's runs, held (see [`LockFreeStore::snapshot_gen`]).
type RunEntries<'a> = Vec<crossbeam_skiplist::map::Entry<'a, u64, Arc<Run>>>;

/// One generation's contents, see [`LockFreeStore::snapshot_gen`].
struct GenSnapshot<'a> {
    runs: RunEntries<'a>,
    staged: Vec<Vec<Staged>>,
    carry: Vec<Head>,
}

impl GenSnapshot<'_> {
    /// Merge everything in bytenr order (sorting the staged ops first).
    fn merge(mut self, mut emit: impl FnMut(HeadRef<'_>)) {
        let own = self.own_runs();
        let cursors = self.sources(&own).into_iter().map(Cursor::new).collect();
        merge_cursors(cursors, |m| emit(m.head_ref()));
    }

    /// The staged ops and the carry, each shard's staging and the carry
    /// as a run of its own (sorted and merged at insert). Takes the carry.
    fn own_runs(&mut self) -> Vec<Vec<Chunk>> {
        let mut own: Vec<Vec<Chunk>> = self
            .staged
            .iter()
            .map(|words| build_run(words).finish())
            .collect();
        // Not a final merge: the carry's no-op heads (a requeued head whose
        // refs cancelled) still name shapes the other runs' ops must meet.
        let carry = merge_heads_keeping_all(std::mem::take(&mut self.carry));
        let mut cb = RunBuilder::new();
        let mut scratch: Vec<PackedRef> = Vec::new();
        for h in &carry {
            scratch.clear();
            scratch.extend(h.refs.iter().map(PackedRef::pack));
            cb.push(h.bytenr, &h.summary, &scratch);
        }
        own.push(cb.finish());
        own
    }

    /// Every source of the merge as its sorted chunks: the index's runs,
    /// then `own` ([`GenSnapshot::own_runs`]).
    fn sources<'s>(&'s self, own: &'s [Vec<Chunk>]) -> Vec<Vec<&'s Chunk>> {
        self.runs
            .iter()
            .map(|e| e.value().chunks.iter().collect())
            .chain(own.iter().map(|r| r.iter().collect()))
            .collect()
    }

    /// Every head that is not a no-op, merged, in bytenr order. The
    /// bytenr space is cut into one range per commit run worker (about
    /// equal stored heads each, [`split_points`]) and the ranges are
    /// merged in parallel, since a commit's merge of ~100-500 runs of
    /// ~10M stored heads took ~0.3 s on one thread. A bytenr lies in one
    /// range, so each range's heads are final and the ranges concatenate
    /// in order.
    fn merged_heads(mut self) -> Vec<Head> {
        let own = self.own_runs();
        let sources = self.sources(&own);
        let stored: usize = sources.iter().flatten().map(|c| c.len()).sum();
        let parts = crate::engine::run_workers()
            .min(stored / PARALLEL_MERGE_MIN_HEADS)
            .max(1);
        let splits = split_points(&sources, parts);
        // Each range with the heads stored in it: the most it can merge to,
        // so its vector never grows by copying. The first range's vector
        // gets room for all (memory is touched only as it is written): the
        // others are appended to it without a reallocation.
        let in_range =
            |lo: u64, hi: u64| -> usize { sources.iter().map(|s| heads_in_range(s, lo, hi)).sum() };
        let mut bounds: Vec<(u64, u64, usize)> = Vec::with_capacity(splits.len() + 1);
        let mut lo = 0;
        for hi in splits.iter().copied().chain([u64::MAX]) {
            let capacity = if bounds.is_empty() {
                stored
            } else {
                in_range(lo, hi)
            };
            bounds.push((lo, hi, capacity));
            lo = hi;
        }
        let merge_part = |&(lo, hi, capacity): &(u64, u64, usize)| -> Vec<Head> {
            let cursors = sources
                .iter()
                .map(|chunks| Cursor::range(chunks.clone(), lo, hi))
                .collect();
            let mut out = Vec::with_capacity(capacity);
            merge_cursors(cursors, |m| {
                let head = m.head_ref().to_head();
                if !head.is_noop() {
                    out.push(head);
                }
            });
            out
        };
        let mut parts = crate::engine::map_on_run_workers(&bounds, merge_part).into_iter();
        let mut out = parts.next().unwrap_or_default();
        for part in parts {
            out.extend(part);
        }
        out
    }
}

/// Stored heads per range below which a commit's merge uses fewer ranges
/// (threads) than it has run workers (`GenSnapshot::merged_heads`).
pub const PARALLEL_MERGE_MIN_HEADS: usize = 64 * 1024;

/// Contents of the live index, see [`LockFreeStore::index_stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Runs.
    pub runs: usize,
    /// Heads stored over all runs.
    pub heads: usize,
    /// Refs stored over all runs.
    pub refs: usize,
    /// Heap bytes of the chunk arrays.
    pub chunk_bytes: usize,
    /// Per level (index = level, up to the highest level stored): runs
    /// and heads stored.
    pub levels: Vec<(usize, usize)>,
}

/// An ingest handle owning one shard.
#[derive(Debug)]
pub struct LockFreeHandle<'a> {
    store: &'a LockFreeStore,
    shard: usize,
}

impl Drop for LockFreeHandle<'_> {
    fn drop(&mut self) {
        self.store.shared.shards[self.shard]
            .claimed
            .store(false, Ordering::Release);
    }
}

impl LockFreeHandle<'_> {
    /// Enter the live generation's buffer of this shard (see
    /// [`ShardGate::enter`]); the 0->1 load finds the lane empty.
    fn enter(&self) -> u64 {
        let shard = &self.store.shared.shards[self.shard];
        shard.gate.enter(&self.store.gen, |p| {
            debug_assert!(shard.lanes[p].is_empty(), "unreleased buffer");
            // A release made the lane's first buffer active again.
            shard.lanes[p].ensure_active();
        })
    }

    fn leave(&self, g: u64) {
        self.store.shared.shards[self.shard].gate.leave(g);
    }

    /// Append one checked op to the active buffer of generation `g`
    /// (reference held). When the buffer is full, asks the background to
    /// hand it off and moves to the next one of the ring; if no buffer is
    /// empty, waits for one up to about 1 ms, then hands one off itself
    /// ([`Ring::rotate`]). Returns whether it did (the index may then want
    /// compacting, asked after leaving the gate).
    fn append(&mut self, g: u64, op: &Op, stamp: u64) -> bool {
        let store = self.store;
        let lane = &store.shared.shards[self.shard].lanes[parity(g)];
        let staging = lane.active();
        let n = staging.len.load(Ordering::Relaxed);
        if n == 0 {
            staging.seed_hot(&store.shared.index[parity(g)]);
        }
        let words = encode(op, stamp);
        for (slot, w) in staging.slots()[n].iter().zip(&words[1..]) {
            slot.store(*w, Ordering::Relaxed);
        }
        staging.note(n, op.bytenr);
        staging.fold_hot(op, n);
        staging.len.store(n + 1, Ordering::Release);
        if n + 1 < store.staging_ops {
            return false;
        }
        staging.gen.store(g, Ordering::Relaxed);
        let shared = &store.shared;
        match lane
            .ring
            .rotate(|| shared.handoff.request(shared, g, |s| &s.handoff))
        {
            Rotate::Moved => {
                lane.ensure_active();
                false
            }
            Rotate::HandOff(i) => {
                // The background was behind for ~1 ms: the bounded
                // fallback, one hand-off's cost, as when every hand-off was
                // done here.
                let shard = &store.shared.shards[self.shard];
                let idx = &store.shared.index[parity(g)];
                lane.hand_off(i, idx, &shard.gate);
                lane.ring.owner_handed_off(i);
                store.shared.hand_offs.fetch_add(1, Ordering::Relaxed);
                store.shared.owner_hand_offs.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    /// Compaction after a hand-off of generation `g`: asked of the
    /// background compactor, outside the gate reference (see
    /// [`TxnIndex::maybe_compact`]).
    fn compact(&self, g: u64) {
        request_compaction(&self.store.shared, g);
    }
}

impl IngestHandle for LockFreeHandle<'_> {
    fn add(&mut self, op: &Op) -> Result<(), StoreError> {
        op.check()?;
        let stamp = self.store.clock.stamp(op);
        let g = self.enter();
        let compact = self.append(g, op, stamp);
        self.leave(g);
        if compact {
            self.compact(g);
        }
        Ok(())
    }

    fn add_batch(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            op.check()?;
        }
        let g = self.enter();
        let mut compact = false;
        for op in ops {
            let stamp = self.store.clock.stamp(op);
            compact |= self.append(g, op, stamp);
        }
        self.leave(g);
        if compact {
            self.compact(g);
        }
        Ok(())
    }
}

impl DelayedRefStore for LockFreeStore {
    type Handle<'a> = LockFreeHandle<'a>;

    fn name(&self) -> &'static str {
        "lockfree"
    }

    fn layout(&self) -> String {
        let st = self.index_stats();
        let (hand_offs, own) = self.hand_off_counts();
        let levels: Vec<String> = st
            .levels
            .iter()
            .enumerate()
            .map(|(l, (runs, heads))| format!("L{l} {runs}/{heads}"))
            .collect();
        format!(
            "index: {} runs, {} heads and {} refs stored, {:.1} MiB of chunks \
             (runs/heads by level: {}); {hand_offs} hand-offs, {own} of them on an \
             ingest thread",
            st.runs,
            st.heads,
            st.refs,
            st.chunk_bytes as f64 / (1 << 20) as f64,
            levels.join(", ")
        )
    }

    fn settle(&self) {
        LockFreeStore::settle(self);
    }

    fn handle(&self) -> Result<LockFreeHandle<'_>, StoreError> {
        for (i, s) in self.shared.shards.iter().enumerate() {
            if s.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                for lane in &s.lanes {
                    lane.ensure_active();
                }
                return Ok(LockFreeHandle {
                    store: self,
                    shard: i,
                });
            }
        }
        Err(StoreError::ShardsExhausted {
            shards: self.shared.shards.len(),
        })
    }

    fn pending(&self, bytenr: u64) -> Option<Head> {
        self.pending_in(bytenr, false)
    }

    fn pending_live(&self, bytenr: u64) -> Option<Head> {
        self.pending_in(bytenr, true)
    }

    fn pending_summary(&self, bytenr: u64) -> Option<HeadSummary> {
        self.pending_summary_in(bytenr, false)
    }

    fn pending_live_summary(&self, bytenr: u64) -> Option<HeadSummary> {
        self.pending_summary_in(bytenr, true)
    }

    fn pending_all(&self) -> Vec<Head> {
        // Consistent snapshots (short), merged outside the read window.
        let snaps = self.read_visible(false, |g| self.snapshot_gen(g));
        let mut all = Vec::new();
        for snap in snaps {
            snap.merge(|h| all.push(h.to_head()));
        }
        merge_heads(all)
    }

    fn seal(&self) {
        assert_eq!(
            self.released.load(Ordering::SeqCst),
            self.gen.live() - 1,
            "freeze while a transaction is frozen"
        );
        // The generation about to open (live + 1) reuses the index of the
        // released one (same parity). `reclaim_released` normally emptied
        // it already, outside the engine's locks; it is an optional memory
        // hook, so the reuse must not depend on it: empty the index here if
        // it still holds the released generation's runs or carry (a few
        // skiplist removals, the memory is reclaimed through the epoch).
        let reused = &self.shared.index[parity(self.gen.live() + 1)];
        if !reused.runs.is_empty()
            || !reused.lock_carry().is_empty()
            || reused.hot_len.load(Ordering::Relaxed) != 0
        {
            reused.clear();
        }
        let g = self.gen.advance();
        // No compaction of g starts from here; running ones are waited for
        // by `sealed_heads`, outside the caller's locks.
        self.shared.index[parity(g)].seal_compaction(g);
        // Ingesters still inside g's buffers (an add or a hand-off in
        // progress, or a thread preempted there) are waited for by
        // `sealed_heads`, not here: the seal never waits for ingest, so it
        // takes microseconds whatever the ingesters do (measured: up to
        // 49 ms when it waited, on 2 cores with a commit running).
    }

    fn sealed_heads(&self) -> Vec<Head> {
        let g = self.gen.live() - 1;
        assert_eq!(
            self.released.load(Ordering::SeqCst),
            g - 1,
            "sealed_heads without seal"
        );
        // Wait for the ingesters that entered g before the seal (Dekker
        // with `ShardGate::enter`: any later one moves to g + 1). Then
        // nothing appends to g's buffers or marks one full. Then hold each
        // lane: full buffers not yet claimed stay staged (merged below),
        // hand-offs in progress are waited for (their runs are in the
        // index), and no hand-off of g starts any more. Then g is
        // quiescent once the compactions that started before the seal have
        // published: nothing writes its buffers or its index until
        // release; readers may still read them.
        for shard in self.shared.shards.iter() {
            shard.gate.quiesce(g);
        }
        for shard in self.shared.shards.iter() {
            shard.lanes[parity(g)].ring.hold();
        }
        self.shared.index[parity(g)].wait_compactions();
        self.snapshot_gen(g)
            .expect("no owner moves in a quiesced generation")
            .merged_heads()
    }

    fn reclaim_released(&self) {
        let released = self.released.load(Ordering::SeqCst);
        if released == 0 {
            return;
        }
        let idx = &self.shared.index[parity(released)];
        // Only if the buffer still belongs to the released generation (the
        // next commit's freeze has not reused it).
        if self.gen.live() == released + 1 {
            idx.clear();
            reclaim();
        }
    }

    fn requeue(&self, mut heads: Vec<Head>) {
        super::restamp(&mut heads, &self.clock);
        let next = &self.shared.index[parity(self.gen.live())];
        next.changes.begin_change();
        next.lock_carry().extend(heads);
        next.changes.end_change();
    }

    fn release(&self, held: Vec<Head>) {
        let live = self.gen.live();
        let g = live - 1;
        assert_eq!(
            self.released.load(Ordering::SeqCst),
            g - 1,
            "release without freeze"
        );
        let idx = &self.shared.index[parity(g)];
        idx.changes.begin_change();
        self.released.store(g, Ordering::SeqCst);
        for shard in self.shared.shards.iter() {
            shard.gate.retire(g, || shard.lanes[parity(g)].reset());
        }
        idx.changes.end_change();
        // Hidden now (released = g); the runs are freed by
        // `reclaim_released`, outside the engine's tree lock.
        if !held.is_empty() {
            let next = &self.shared.index[parity(live)];
            next.changes.begin_change();
            next.lock_carry().extend(held);
            next.changes.end_change();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delayed::mutex::MutexStore;
    use crate::model::{Action, DiskKey, ExtentKind, ExtentOp, RefKey, BLOCK_FLAG_FULL_BACKREF};

    /// Adds `ops` to both stores, one op to each in turn.
    fn add_both(hl: &mut impl IngestHandle, hm: &mut impl IngestHandle, ops: &[Op]) {
        for op in ops {
            hl.add(op).unwrap();
            hm.add(op).unwrap();
        }
    }

    /// `rounds` transactions of `ops` each, frozen and released: the
    /// lock-free store freezes what the mutex store does every time.
    fn rounds_agree(
        (lf, hl): (&LockFreeStore, &mut LockFreeHandle<'_>),
        (mx, hm): (&MutexStore, &mut impl IngestHandle),
        ops: &[Op],
        rounds: usize,
    ) {
        for round in 0..rounds {
            add_both(hl, hm, ops);
            lf.settle();
            assert_eq!(lf.freeze(), mx.freeze(), "round {round}");
            lf.release(Vec::new());
            mx.release(Vec::new());
        }
    }

    fn ops(n: u64) -> Vec<Op> {
        (0..n)
            .map(|i| {
                let b = (i % 97) * 4096;
                let root = 5 + i % 3;
                let key = RefKey::ExtentData {
                    root,
                    objectid: 257,
                    offset: 0,
                };
                let action = if i % 5 == 4 {
                    Action::DropRef
                } else if i < 97 {
                    Action::AddExtent
                } else {
                    Action::AddRef
                };
                Op::new(b, 4096, ExtentKind::Data, action, key, i % 4).unwrap()
            })
            .collect()
    }

    #[test]
    fn encode_decode_roundtrip() {
        let op = Op::new(
            16384,
            16384,
            ExtentKind::Tree { level: 3 },
            Action::AddExtent,
            RefKey::SharedBlock { parent: 99 },
            42,
        )
        .unwrap()
        .with_extent_op(ExtentOp {
            flags_to_set: BLOCK_FLAG_FULL_BACKREF,
            key: Some(DiskKey {
                objectid: 7,
                item_type: 132,
                offset: 9,
            }),
        })
        .unwrap();
        assert_eq!(super::super::packed::decode(&encode(&op, 17)), (op, 17));
    }

    #[test]
    fn matches_mutex_through_handoffs_and_compaction() {
        let lf = LockFreeStore::with_config(4, 8);
        let mx = MutexStore::new();
        let all = ops(2000);
        let mut h1 = lf.handle().unwrap();
        let mut h2 = lf.handle().unwrap();
        let mut hm = mx.handle().unwrap();
        for (i, op) in all.iter().enumerate() {
            if i % 2 == 0 {
                h1.add(op).unwrap()
            } else {
                h2.add(op).unwrap()
            }
            hm.add(op).unwrap();
            if i % 301 == 0 {
                let b = op.bytenr;
                assert_eq!(lf.pending(b), mx.pending(b), "pending({b}) after op {i}");
            }
        }
        lf.settle();
        assert!(lf.live_runs() < 40, "compaction bounds the run count");
        assert_eq!(lf.pending_all(), mx.pending_all());
        let f1 = lf.freeze();
        let f2 = mx.freeze();
        assert_eq!(f1, f2);
        // Frozen stays visible until release; new ops go to the next txn.
        h1.add(&all[0]).unwrap();
        hm.add(&all[0]).unwrap();
        assert_eq!(lf.pending(all[0].bytenr), mx.pending(all[0].bytenr));
        lf.release(vec![f1[0].clone()]);
        mx.release(vec![f2[0].clone()]);
        assert_eq!(lf.pending_all(), mx.pending_all());
        assert_eq!(lf.freeze(), mx.freeze());
    }

    /// A commit's merge big enough to be cut into ranges merged in
    /// parallel ([`GenSnapshot::merged_heads`]) gives the same heads, in
    /// the same order, as the mutex store: ranges neither lose nor repeat
    /// a head at their boundaries, including hot bytenrs stored in many
    /// runs.
    #[test]
    fn parallel_merge_of_a_commit_matches_mutex() {
        let lf = LockFreeStore::with_config(2, 8);
        let mx = MutexStore::new();
        let mut h = [lf.handle().unwrap(), lf.handle().unwrap()];
        let mut hm = mx.handle().unwrap();
        let n: u64 = 3 * PARALLEL_MERGE_MIN_HEADS as u64;
        for i in 0..n {
            // Every 16th op on one of 8 hot extents (many runs hold
            // them), the others each on an extent of its own (so enough
            // heads stay stored whatever the compactor has merged).
            let b = if i % 16 == 0 {
                (i / 16 % 8) << 20
            } else {
                (1 << 30) + i * 4096
            };
            let key = RefKey::ExtentData {
                root: 5 + i % 3,
                objectid: 257,
                offset: 0,
            };
            let action = if i % 5 == 4 {
                Action::DropRef
            } else {
                Action::AddRef
            };
            let op = Op::new(b, 4096, ExtentKind::Data, action, key, 0).unwrap();
            h[(i % 2) as usize].add(&op).unwrap();
            hm.add(&op).unwrap();
        }
        let stored: usize = lf.index_stats().heads;
        assert!(
            stored >= 2 * PARALLEL_MERGE_MIN_HEADS,
            "{stored} heads stored: too few for ranges"
        );
        let f1 = lf.freeze();
        let f2 = mx.freeze();
        assert_eq!(f1.len(), f2.len());
        assert_eq!(f1, f2);
    }

    /// The top-merge ratio trades throughput for memory: a larger ratio
    /// merges top-level runs of less similar size, so fewer duplicate heads
    /// are stored for the same ops.
    #[test]
    fn top_merge_ratio_changes_what_is_stored() {
        let all = ops(20_000);
        let stored = |ratio: usize| {
            let lf = LockFreeStore::with_config(2, 64).with_top_merge_ratio(ratio);
            let mut h = lf.handle().unwrap();
            for op in &all {
                h.add(op).unwrap();
                // One compaction per hand-off, in order (the background
                // compactor would otherwise take several hand-offs at
                // once, as its timing allows, and the shapes compared
                // would depend on the scheduler).
                lf.settle();
            }
            lf.index_stats()
        };
        let (eager, lazy) = (stored(1_000_000), stored(1));
        assert!(eager.heads < lazy.heads, "eager {eager:?} lazy {lazy:?}");
        assert!(eager.runs <= lazy.runs);
        // The per-level counts add up to the totals.
        for st in [&eager, &lazy] {
            let runs: usize = st.levels.iter().map(|l| l.0).sum();
            let heads: usize = st.levels.iter().map(|l| l.1).sum();
            assert_eq!((runs, heads), (st.runs, st.heads), "{st:?}");
        }
    }

    /// Issue 13 defect 4: index parity `g` is reused for `g + 2`; that used
    /// to be safe only because the engine called `reclaim_released`, an
    /// optional memory hook. Without it, generation `g`'s runs were merged
    /// again into `g + 2`.
    #[test]
    fn generation_reuse_does_not_depend_on_reclaim() {
        let lf = LockFreeStore::with_config(2, 2);
        let mx = MutexStore::new();
        let all = ops(300);
        let mut hl = lf.handle().unwrap();
        let mut hm = mx.handle().unwrap();
        // No reclaim_released between the rounds.
        rounds_agree((&lf, &mut hl), (&mx, &mut hm), &all, 4);
    }

    /// Issue 13 defect 8: a reader that reads a staging slot while its
    /// writer reuses it (after a hand-off) can see words of two ops, e.g.
    /// an allocation with the stamp word of a plain add. Such a read is
    /// always retried (the hand-off's change bracket), but it used to be
    /// decoded first, tripping the debug assertions of `HeadSummary::of_op`
    /// (or `decode`'s expect on a bad action code). The torn slot is staged
    /// here by writing it by hand; readers must skip it, not assert.
    #[test]
    fn torn_staging_slot_is_skipped_not_asserted() {
        let lf = LockFreeStore::with_config(1, 8);
        let b = 1 << 20;
        let kind = ExtentKind::Tree { level: 0 };
        let key = RefKey::TreeBlock { root: 5 };
        let add = Op::new(b, 16384, kind, Action::AddRef, key, 0).unwrap();
        let alloc = Op::new(b, 16384, kind, Action::AddExtent, key, 0).unwrap();
        let mut h = lf.handle().unwrap();
        h.add(&add).unwrap();
        h.add(&add).unwrap();
        let st = lf.shared.shards[0].lanes[parity(lf.gen.live())].active();
        // Slot 1 half-overwritten: an allocation's words, the stamp of an
        // add (0); then an unknown action code.
        for (w, v) in st.slots()[1].iter().zip(&encode(&alloc, 0)[1..]) {
            w.store(*v, Ordering::Relaxed);
        }
        assert_eq!(lf.pending(b).map(|h| h.summary.total_ref_mod), Some(1));
        assert_eq!(lf.pending_all().len(), 1);
        st.slots()[1][7 - 1].store(0xff, Ordering::Relaxed);
        assert_eq!(lf.pending(b).map(|h| h.summary.total_ref_mod), Some(1));
        assert_eq!(lf.pending_all().len(), 1);
    }

    /// A lookup of the count merges summaries only, and must still tell a
    /// no-op head (refs cancelled, which `pending` leaves out) from a live
    /// one whose total is 0 because different refs cancel. Staging of 4
    /// ops: the first 4 ops are one run of 4 heads, the next 4 one of 3
    /// (which do not merge at a top-merge ratio of 1), so the heads of
    /// 4096 and 8192 meet only in the lookup.
    #[test]
    fn a_summary_lookup_tells_a_cancelled_head_from_a_balanced_one() {
        let lf = LockFreeStore::with_config(1, 4).with_top_merge_ratio(1);
        let mut h = lf.handle().unwrap();
        let data = |root| RefKey::ExtentData {
            root,
            objectid: 257,
            offset: 0,
        };
        let op =
            |b, action, root| Op::new(b, 4096, ExtentKind::Data, action, data(root), 0).unwrap();
        let (add, drop) = (Action::AddRef, Action::DropRef);
        // 4096: +1 and -1 of one ref, a no-op. 8192: +1 of root 5, -1 of
        // root 6: a total of 0 with two refs that count.
        for o in [
            op(4096, add, 5),
            op(8192, add, 5),
            op(12288, add, 5),
            op(16384, add, 5),
            op(4096, drop, 5),
            op(8192, drop, 6),
            op(12288, add, 9),
            op(12288, drop, 9),
        ] {
            h.add(&o).unwrap();
        }
        lf.settle();
        assert_eq!(lf.live_runs(), 2, "the two batches are two runs");
        assert_eq!(lf.pending(4096), None);
        assert_eq!(lf.pending_summary(4096), None);
        let balanced = lf.pending(8192).expect("refs that count");
        assert_eq!(balanced.summary.total_ref_mod, 0);
        assert_eq!(balanced.refs.len(), 2);
        assert_eq!(lf.pending_summary(8192), Some(balanced.summary));
        // One more op, staged: the total moves, the summaries decide.
        h.add(&op(8192, add, 7)).unwrap();
        let live = lf.pending(8192).unwrap();
        assert_eq!(live.summary.total_ref_mod, 1);
        assert_eq!(lf.pending_summary(8192), Some(live.summary));
        assert_eq!(lf.pending_live_summary(8192), Some(live.summary));
        // Staged and in runs: 4096 gets its ref back.
        h.add(&op(4096, add, 5)).unwrap();
        assert_eq!(lf.pending_summary(4096).map(|s| s.total_ref_mod), Some(1));
    }

    /// A run's filter never rules out a bytenr the run holds (a lookup
    /// would miss it), and rules out most it does not hold (else lookups
    /// search every run again): sector-aligned bytenrs, as btrfs's are.
    #[test]
    fn run_filter_holds_every_head_and_rules_out_most_others() {
        for heads in [1usize, 7, 4096, 100_000] {
            let held = (0..heads as u64).map(|i| (i * 7 + 3) << 12);
            let f = RunFilter::new(heads, held.clone());
            for b in held {
                assert!(f.may_hold(b), "{heads} heads: {b} ruled out");
            }
            let probes = 100_000u64;
            let false_hits = (0..probes)
                .filter(|i| f.may_hold((i * 7 + 5) << 12))
                .count();
            assert!(
                false_hits * 50 <= probes as usize,
                "{heads} heads: {false_hits} of {probes} absent bytenrs pass"
            );
        }
    }

    /// The view's lockstep search of every run's chunk finds the chunk a
    /// binary search of each run finds (`Run::chunk_of`), for every run
    /// whose filter passes: runs of one chunk, of exactly a chunk's worth
    /// and of many chunks, bytenrs held, absent, below and above them all.
    #[test]
    fn view_finds_the_chunk_each_run_would() {
        let run = |bytenrs: Vec<u64>| {
            let chunks = crate::delayed::packed::tree_block_chunks(&bytenrs);
            Arc::new(Run::new(chunks, 0, bytenrs.len(), bytenrs.len()))
        };
        let runs = [
            run(vec![40 << 12]),
            run((1..=512).map(|i| i << 13).collect()),
            run((1..=5000).map(|i| (i * 3) << 12).collect()),
            run((100..=1400).map(|i| i << 12).collect()),
        ];
        let view = RunView {
            slots: runs
                .iter()
                .enumerate()
                .map(|(i, r)| RunSlot::of(i as u64, r))
                .collect(),
            hot: Vec::new(),
        };
        for bytenr in (0..20_000u64).map(|i| i << 12) {
            let mut got = Vec::new();
            // SAFETY: the runs are alive (`runs`) and nothing changes them.
            unsafe { view.chunks_may_hold(bytenr, &mut got) };
            let want: Vec<&Chunk> = runs
                .iter()
                .filter(|r| r.filter.may_hold(bytenr))
                .filter_map(|r| r.chunk_of(bytenr))
                .collect();
            assert_eq!(got.len(), want.len(), "bytenr {bytenr}");
            for (g, w) in got.iter().zip(&want) {
                assert!(std::ptr::eq(*g, *w), "bytenr {bytenr}");
            }
        }
    }

    /// A data op of root 5 on `bytenr` of `num_bytes` (ref key by `obj`).
    fn data_op(bytenr: u64, num_bytes: u64, action: Action, obj: u64) -> Op {
        let key = RefKey::ExtentData {
            root: 5,
            objectid: 256 + obj,
            offset: 0,
        };
        Op::new(bytenr, num_bytes, ExtentKind::Data, action, key, 0).unwrap()
    }

    /// The runs of each level of the live index, counted.
    fn runs_per_level(lf: &LockFreeStore) -> BTreeMap<u32, usize> {
        let idx = &lf.shared.index[parity(lf.gen.live())];
        let mut per_level = BTreeMap::new();
        for e in idx.runs.iter() {
            *per_level.entry(e.value().level).or_insert(0usize) += 1;
        }
        per_level
    }

    /// `n` ops over 5000 extents, each extent's count checked after.
    fn spread_ops(h: &mut LockFreeHandle<'_>, n: u64) -> BTreeMap<u64, i64> {
        let mut want = BTreeMap::new();
        for i in 0..n {
            let b = 4096 * (1 + (i * 7919) % 5000);
            h.add(&data_op(b, 4096, Action::AddRef, i % 3)).unwrap();
            *want.entry(b).or_insert(0) += 1;
        }
        want
    }

    fn assert_counts(lf: &LockFreeStore, want: &BTreeMap<u64, i64>) {
        for (&b, &n) in want {
            assert_eq!(
                lf.pending_summary(b).map(|s| s.total_ref_mod),
                Some(n),
                "count of {b}"
            );
        }
    }

    /// The small compactor merges the small runs while the compactor is
    /// away (held off here, as by a long merge of large runs): they do not
    /// pile up behind it. Fails without the small compactor (every
    /// hand-off's run stays at level 0) and when it merges no level above
    /// 0.
    #[test]
    fn small_runs_merge_while_the_compactor_is_busy() {
        let lf = LockFreeStore::with_config(1, 64);
        lf.shared.test.compactor_busy.store(true, Ordering::SeqCst);
        let mut h = lf.handle().unwrap();
        // 200 buffers of 64 ops: 200 runs at level 0 unmerged.
        let want = spread_ops(&mut h, 64 * 200);
        lf.settle();
        let per_level = runs_per_level(&lf);
        for level in 0..SMALL_LEVELS {
            let n = per_level.get(&level).copied().unwrap_or(0);
            assert!(
                n < COMPACT_FANOUT,
                "{n} runs at level {level} with the compactor busy: {per_level:?}"
            );
        }
        assert!(
            per_level.keys().any(|&l| l >= SMALL_LEVELS),
            "the small runs were merged up: {per_level:?}"
        );
        assert_counts(&lf, &want);
    }

    /// After `settle` no level is due: the small compactor's merges into
    /// the level above ask the compactor to look again. Here the small
    /// compactor is held while 512 buffers of 64 ops are handed off and
    /// the compactor, kept to the levels above the small compactor's (as
    /// when it finds their tokens taken), finds nothing to do; then the
    /// small one merges them into the level above (64 runs, due). Without
    /// its request that level is left due.
    #[test]
    fn settle_leaves_no_level_due() {
        let lf = LockFreeStore::with_config(1, 64);
        lf.shared
            .test
            .compactor_above_small
            .store(true, Ordering::SeqCst);
        let held = lf.shared.test.small_held.lock().unwrap();
        let mut h = lf.handle().unwrap();
        let want = spread_ops(&mut h, 64 * 512);
        lf.shared.handoff.settle();
        lf.shared.compactor.settle();
        assert_eq!(runs_per_level(&lf).get(&0), Some(&512));
        drop(held);
        lf.settle();
        let per_level = runs_per_level(&lf);
        assert!(
            per_level.values().all(|&n| n < COMPACT_FANOUT),
            "a level left due after settle: {per_level:?}"
        );
        let idx = &lf.shared.index[parity(lf.gen.live())];
        let top = per_level.keys().next_back().copied();
        let top_ids: Vec<u64> = idx
            .runs
            .iter()
            .filter(|e| Some(e.value().level) == top)
            .map(|e| *e.key())
            .collect();
        assert!(
            !idx.top_merge_due(&top_ids),
            "the top level left due after settle: {per_level:?}"
        );
        assert_counts(&lf, &want);
    }

    /// The hot sums of index `p`'s view and every run's head summed, read
    /// under `lock_runs` (no change between them).
    fn hot_and_folds(
        lf: &LockFreeStore,
        p: usize,
    ) -> Vec<(u64, Option<HeadSummary>, Option<HeadSummary>)> {
        let idx = &lf.shared.index[p];
        let guard = crossbeam_epoch::pin();
        let _runs = idx.lock_runs();
        idx.view(&guard)
            .hot
            .iter()
            .map(|h| (h.bytenr, h.summary, idx.summed_over_runs(h.bytenr)))
            .collect()
    }

    /// A view's hot sums are its runs' heads summed, through hand-offs and
    /// compactions (which must keep them: the hottest extent stays hot),
    /// for a skewed stream of adds and drops in buffers of 64 ops.
    #[test]
    fn hot_sums_are_the_runs_heads_summed() {
        let lf = LockFreeStore::with_config(1, 64);
        let mut h = lf.handle().unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut checked = 0;
        for i in 0..40_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // 4096 in 1 op of 4; 8192 .. 40960 in 1 of 8; the rest spread.
            let b = match x % 8 {
                0 | 1 => 4096,
                2 => 4096 * (2 + (x >> 8) % 9),
                _ => 4096 * (100 + (x >> 8) % 5000),
            };
            let action = if (x >> 40).is_multiple_of(3) {
                Action::DropRef
            } else {
                Action::AddRef
            };
            h.add(&data_op(b, 4096, action, (x >> 20) % 4)).unwrap();
            if i % 4_000 == 3_999 {
                lf.settle();
                let got = hot_and_folds(&lf, parity(lf.gen.live()));
                assert!(
                    got.iter().any(|g| g.0 == 4096),
                    "the hottest extent is hot after {i} ops: {got:?}"
                );
                for (bytenr, hot, fold) in got {
                    assert_eq!(hot, fold, "extent {bytenr} after {i} ops");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 10);
    }

    /// A cell folds an op before the owner publishes its slot: a reader
    /// must leave that op out until `len` covers it (else a count could
    /// see an op that a lookup of the whole head right after misses).
    #[test]
    fn a_cell_leaves_out_the_op_being_added() {
        let (hot, other) = (4096, 8192);
        let idx = TxnIndex::default();
        idx.hot_keys.0[0].store(hot, Ordering::Relaxed);
        idx.hot_len.store(1, Ordering::Release);
        let st = Staging::new(16);
        st.ensure();
        st.seed_hot(&idx);
        assert_eq!(st.hot_sum(other), None, "no cell for another extent");
        assert_eq!(st.hot_sum(hot), Some(None));
        let fold = |action, slot| st.fold_hot(&data_op(hot, 4096, action, 0), slot);
        let publish = |n| st.len.store(n, Ordering::Release);
        let sums = |total: i64, allocs: u16, latest_alloc: usize| {
            Some(Some(CellSum {
                num_bytes: 4096,
                kind: ExtentKind::Data,
                total,
                allocs,
                latest_alloc,
            }))
        };
        let sum = |s: i64| sums(s, 0, 0);
        fold(Action::AddRef, 0);
        assert_eq!(st.hot_sum(hot), Some(None), "first op, unpublished");
        publish(1);
        assert_eq!(st.hot_sum(hot), sum(1));
        fold(Action::AddRef, 1);
        publish(2);
        assert_eq!(st.hot_sum(hot), sum(2));
        fold(Action::DropRef, 2);
        assert_eq!(st.hot_sum(hot), sum(2), "a drop, unpublished");
        publish(3);
        assert_eq!(st.hot_sum(hot), sum(1));
        fold(Action::AddRef, 3);
        assert_eq!(st.hot_sum(hot), sum(1), "an add, unpublished");
        publish(4);
        assert_eq!(st.hot_sum(hot), sum(2));
        // Allocations are counted, the latest by its slot; one being added
        // is not summed: the reader scans.
        fold(Action::AddExtent, 4);
        assert_eq!(st.hot_sum(hot), None, "an allocation, unpublished");
        publish(5);
        assert_eq!(st.hot_sum(hot), sums(3, 1, 4));
        fold(Action::DropRef, 5);
        assert_eq!(
            st.hot_sum(hot),
            sums(3, 1, 4),
            "a drop after it, unpublished"
        );
        publish(6);
        fold(Action::AddExtent, 6);
        publish(7);
        assert_eq!(st.hot_sum(hot), sums(3, 2, 6));
        // An `allocs` word newer than the state (an allocation folded
        // between the reader's loads): scan.
        let cell = st.hot_cell(hot, Ordering::Relaxed).unwrap();
        let w = cell.allocs.load(Ordering::Relaxed);
        cell.allocs.store(3 << 32 | 9, Ordering::Relaxed);
        assert_eq!(st.hot_sum(hot), None, "allocs counted past the state");
        cell.allocs.store(w, Ordering::Relaxed);
        // An allocation with an extent_op spoils the cell.
        let mut op = data_op(hot, 4096, Action::AddExtent, 0);
        op.extent_op = Some(crate::model::ExtentOp {
            flags_to_set: crate::model::BLOCK_FLAG_FULL_BACKREF,
            key: None,
        });
        st.fold_hot(&op, 7);
        publish(8);
        assert_eq!(st.hot_sum(hot), None, "spoiled");
        st.reset();
        assert_eq!(st.hot_sum(hot), None, "named again only by the next seed");
    }

    /// A hot extent freed and allocated again within the buffer, again and
    /// again (as a hot tree block is): the cells count the allocations,
    /// and a count lookup equals the head looked up whole after each op,
    /// the latest allocation's stamp included; past `CELL_ALLOCS_MAX` the
    /// cell spoils and the buffer is scanned, with the same answer.
    #[test]
    fn a_hot_extent_allocated_again_and_again_counts_exactly() {
        let lf = LockFreeStore::with_config(1, 256);
        let mut h = lf.handle().unwrap();
        let hot = 4096 * 7;
        // One op in 3 is of `hot`: allocated, added to, dropped twice (20
        // allocations per 256-op buffer), then, from op 1500, allocated
        // and dropped (40 per buffer: past `CELL_ALLOCS_MAX`).
        let mut cells_used = 0;
        for i in 0..3000u64 {
            let j = i / 3;
            let cycle = if i < 1500 { 4 } else { 2 };
            let op = if i % 3 != 0 {
                data_op(4096 * (100 + i), 4096, Action::AddRef, 0)
            } else {
                let action = match (j % cycle, cycle) {
                    (0, _) => Action::AddExtent,
                    (1, 4) => Action::AddRef,
                    _ => Action::DropRef,
                };
                data_op(hot, 4096, action, 0)
            };
            h.add(&op).unwrap();
            if i % 3 == 0 {
                let whole = lf.pending(hot).map(|h| h.summary);
                assert_eq!(lf.pending_summary(hot), whole, "after op {i}");
                let live = parity(lf.gen.live());
                cells_used += lf.shared.shards[0].lanes[live]
                    .bufs
                    .iter()
                    .filter(|b| matches!(b.hot_sum(hot), Some(Some(c)) if c.allocs > 0))
                    .count();
            }
        }
        assert!(
            cells_used > 100,
            "cells with allocations read: {cells_used}"
        );
    }

    /// A count lookup of a hot extent (its plain ops summed by the buffers'
    /// cells, its runs' heads by the view) equals its head looked up
    /// whole, op by op: plain adds and drops, an extent_op and a second
    /// size (each spoils the cell of its buffer), refs summing to 0 (a
    /// no-op: the lookup looks the head up whole), through hand-offs of
    /// buffers of 16 ops.
    #[test]
    fn a_hot_extents_count_is_its_heads() {
        let lf = LockFreeStore::with_config(1, 16);
        let mut h = lf.handle().unwrap();
        let hot = 4096;
        let check = |what: &str| {
            assert_eq!(
                lf.pending_summary(hot),
                lf.pending(hot).map(|h| h.summary),
                "{what}"
            );
        };
        let mut summed = false;
        let mut step = 0u64;
        let mut add = |op: Op, h: &mut LockFreeHandle<'_>| {
            h.add(&op).unwrap();
            h.add(&data_op(1 << 30 | step << 12, 4096, Action::AddRef, 0))
                .unwrap();
            step += 1;
        };
        // Hot after the first hand-offs (8 of each 16 ops).
        for i in 0..64 {
            add(data_op(hot, 4096, Action::AddRef, i % 3), &mut h);
            check(&format!("add {i}"));
        }
        for i in 0..200u64 {
            let op = match i % 50 {
                17 => Op::update_head(
                    hot,
                    4096,
                    ExtentKind::Data,
                    ExtentOp {
                        flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                        key: None,
                    },
                )
                .unwrap(),
                33 => data_op(hot, 8192, Action::AddRef, 2),
                _ if i.is_multiple_of(3) => data_op(hot, 4096, Action::DropRef, i % 3),
                _ => data_op(hot, 4096, Action::AddRef, i % 3),
            };
            add(op, &mut h);
            check(&format!("op {i}"));
            let shard = &lf.shared.shards[0].lanes[parity(lf.gen.live())];
            summed |= shard
                .bufs
                .iter()
                .any(|b| matches!(b.hot_sum(hot), Some(Some(_))));
        }
        assert!(summed, "a buffer summed the hot extent's ops");
        assert!(
            lf.shared.index[parity(lf.gen.live())]
                .hot_list()
                .contains(&hot),
            "the extent is hot"
        );
        // Another hot extent whose refs all cancel: a no-op head, none to
        // both lookups (its sums say 0 but cannot tell a no-op from refs
        // that count and sum to 0: the lookup looks it up whole).
        let quiet = 8192;
        for i in 0..64 {
            add(data_op(quiet, 4096, Action::AddRef, i % 2), &mut h);
        }
        for i in 0..64 {
            add(data_op(quiet, 4096, Action::DropRef, i % 2), &mut h);
        }
        assert_eq!(lf.pending(quiet), None);
        assert_eq!(lf.pending_summary(quiet), None, "a cancelled hot extent");
        assert!(
            lf.shared.index[parity(lf.gen.live())]
                .hot_list()
                .contains(&quiet),
            "the cancelled extent is hot"
        );
    }

    /// Pause (or resume) the background hand-off thread; resuming asks it
    /// to look at every lane again.
    fn pause_hand_offs(lf: &LockFreeStore, paused: bool) {
        lf.shared.test.paused.store(paused, Ordering::SeqCst);
        if !paused {
            lf.shared
                .handoff
                .request(&lf.shared, lf.gen.live(), |s| &s.handoff);
        }
    }

    /// Hand-off state of buffer `i` of shard 0's lane of generation `g`.
    fn buf_state(lf: &LockFreeStore, g: u64, i: usize) -> u32 {
        lf.shared.shards[0].lanes[parity(g)].ring.state(i)
    }

    /// A lookup that read the owner's active buffer, then (slow) the next
    /// one after the owner filled the first and moved on, saw the ops after
    /// the move without the ones before it: a drop without its add, a
    /// count of -1 that no prefix of the ops has (no change of the index
    /// happened to spoil the read; found by `stress_hot_lockfree`). The
    /// lookup now reads again when the owner moved (`Ring::moves`).
    #[test]
    fn a_lookup_never_sees_ops_after_a_move_without_those_before() {
        let lf = LockFreeStore::with_config(1, 4);
        pause_hand_offs(&lf, true);
        let x = 1 << 20;
        let filler = |i: u64| data_op((2 + i) << 20, 4096, Action::AddRef, 0);
        let mut h = lf.handle().unwrap();
        h.add(&filler(0)).unwrap();
        h.add(&filler(1)).unwrap();
        let (active, found) = lookup_paused_at(&lf, &lf.shared.test.mid_lane, x, || {
            // The reader has read buffer 0 (two fillers) and waits. The
            // owner adds a ref of `x`, fills buffer 0, moves to buffer 1
            // (empty; no hand-off, no change) and drops the ref there.
            h.add(&data_op(x, 4096, Action::AddRef, 7)).unwrap();
            h.add(&filler(2)).unwrap();
            h.add(&data_op(x, 4096, Action::DropRef, 7)).unwrap();
            lf.shared.shards[0].lanes[parity(lf.gen.live())]
                .ring
                .active()
        });
        assert_eq!(active, 1, "the owner moved to buffer 1");
        assert!(
            ref_sum(&found) >= 0,
            "a lookup saw the drop without its add: {found:?}"
        );
    }

    /// An ingester inside the sealed generation finishes its batch there
    /// and goes on in the live one (another lane) while a slow lookup
    /// reads both: read oldest first, the lookup saw the drop in the live
    /// generation without the add before it in the sealed one (-1 refs).
    /// The generations are read newest first (`read_visible`).
    #[test]
    fn a_lookup_never_sees_a_batch_past_a_seal_without_its_start() {
        let lf = LockFreeStore::with_config(1, 64);
        let x = 1 << 20;
        let mut h = lf.handle().unwrap();
        h.add(&data_op(2 << 20, 4096, Action::AddRef, 0)).unwrap();
        // Inside generation g, as a batch in progress, when g is sealed.
        let g = h.enter();
        lf.seal();
        assert_eq!(lf.gen.live(), g + 1);
        let ((), found) = lookup_paused_at(&lf, &lf.shared.test.mid_visible, x, || {
            // The reader has read one generation and waits. The batch
            // ends in g with an add of `x`; the next op, a drop of it,
            // goes to g + 1.
            let add = data_op(x, 4096, Action::AddRef, 7);
            let stamp = lf.clock.stamp(&add);
            h.append(g, &add, stamp);
            h.leave(g);
            h.add(&data_op(x, 4096, Action::DropRef, 7)).unwrap();
        });
        assert!(
            ref_sum(&found) >= 0,
            "a lookup saw the drop without its add: {found:?}"
        );
    }

    /// Look `x` up on another thread while `pause` is held; once the
    /// lookup waits there, run `during`, then let the lookup go on. What
    /// `during` returned, and the lookup's head.
    fn lookup_paused_at<R>(
        lf: &LockFreeStore,
        pause: &TestPause,
        x: u64,
        during: impl FnOnce() -> R,
    ) -> (R, Option<Head>) {
        let held = pause.held.lock().unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| lf.pending(x));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !pause.reached.load(Ordering::SeqCst) {
                if std::time::Instant::now() >= deadline {
                    drop(held);
                    panic!("the lookup never came to the pause");
                }
                std::thread::yield_now();
            }
            let r = during();
            drop(held);
            (r, reader.join().unwrap())
        })
    }

    /// The sum of a head's refs' counts (0 for none).
    fn ref_sum(h: &Option<Head>) -> i64 {
        h.iter().flat_map(|h| &h.refs).map(|r| r.ref_mod).sum()
    }

    /// A full buffer waiting for the background is read by lookups and
    /// snapshots: its ops are in no run yet.
    #[test]
    fn lookup_sees_ops_in_a_full_unpublished_buffer() {
        use super::super::handoff::{FILLING, FULL};
        let lf = LockFreeStore::with_config(1, 8);
        let mx = MutexStore::new();
        let all = ops(8 + 3);
        pause_hand_offs(&lf, true);
        let (mut hl, mut hm) = (lf.handle().unwrap(), mx.handle().unwrap());
        add_both(&mut hl, &mut hm, &all);
        let g = lf.gen.live();
        assert_eq!(buf_state(&lf, g, 0), FULL);
        assert_eq!(lf.live_runs(), 0, "nothing handed off while paused");
        for op in &all {
            assert_eq!(lf.pending(op.bytenr), mx.pending(op.bytenr));
        }
        assert_eq!(lf.pending_all(), mx.pending_all());
        pause_hand_offs(&lf, false);
        lf.settle();
        assert_eq!(buf_state(&lf, g, 0), FILLING);
        assert_eq!(lf.hand_off_counts(), (1, 0));
        assert_eq!(lf.pending_all(), mx.pending_all());
        assert_eq!(lf.freeze(), mx.freeze());
    }

    /// With the background stopped, an ingest thread whose ring has no
    /// empty buffer waits for the background (back-pressure, about 1 ms:
    /// at least its 14 sleeps of 50 µs), then hands the oldest full one
    /// off itself (the bounded fallback) and goes on; nothing is lost or
    /// doubled.
    #[test]
    fn full_ring_waits_then_the_ingest_thread_hands_off_itself() {
        let lf = LockFreeStore::with_config(1, 8);
        let mx = MutexStore::new();
        let all = ops(8 * (STAGING_RING as u64 + 2) + 5);
        pause_hand_offs(&lf, true);
        let (mut hl, mut hm) = (lf.handle().unwrap(), mx.handle().unwrap());
        let mut waited = Vec::new();
        for (i, op) in all.iter().enumerate() {
            let t = std::time::Instant::now();
            hl.add(op).unwrap();
            if (i + 1) % 8 == 0 && (i + 1) / 8 >= STAGING_RING {
                waited.push(t.elapsed());
            }
            hm.add(op).unwrap();
        }
        // STAGING_RING + 2 buffers filled: the first STAGING_RING - 1
        // rotations found an empty buffer, the last 3 did not.
        assert_eq!(lf.hand_off_counts(), (3, 3));
        assert_eq!(waited.len(), 3);
        for w in waited {
            assert!(w >= std::time::Duration::from_micros(700), "no wait: {w:?}");
        }
        assert_eq!(lf.pending_all(), mx.pending_all());
        assert_eq!(lf.freeze(), mx.freeze());
    }

    /// A seal while full buffers wait for their hand-off: the merge takes
    /// them from staging (held), the background publishes nothing of the
    /// sealed generation afterwards, and after release the lane serves
    /// generation g + 2 from empty.
    #[test]
    fn seal_while_a_full_buffer_awaits_its_hand_off() {
        use super::super::handoff::HELD;
        let lf = LockFreeStore::with_config(1, 8);
        let mx = MutexStore::new();
        let all = ops(2 * 8 + 3);
        pause_hand_offs(&lf, true);
        let (mut hl, mut hm) = (lf.handle().unwrap(), mx.handle().unwrap());
        add_both(&mut hl, &mut hm, &all);
        let g = lf.gen.live();
        assert_eq!(lf.freeze(), mx.freeze());
        assert_eq!((buf_state(&lf, g, 0), buf_state(&lf, g, 1)), (HELD, HELD));
        pause_hand_offs(&lf, false);
        lf.settle();
        assert_eq!(lf.hand_off_counts(), (0, 0), "hand-off after the hold");
        assert_eq!(lf.shared.index[parity(g)].runs.len(), 0);
        assert_eq!(lf.pending_all(), mx.pending_all());
        lf.release(Vec::new());
        mx.release(Vec::new());
        rounds_agree((&lf, &mut hl), (&mx, &mut hm), &all, 2);
    }

    /// A seal while the background is between its claim of a full buffer
    /// and the publish of its run: the merge waits for the publish (else
    /// the buffer's ops would be in neither staging nor the index it
    /// reads).
    #[test]
    fn seal_waits_for_a_hand_off_in_progress() {
        use super::super::handoff::HANDING;
        let lf = LockFreeStore::with_config(1, 8);
        let mx = MutexStore::new();
        let all = ops(8 + 2);
        let (mut hl, mut hm) = (lf.handle().unwrap(), mx.handle().unwrap());
        let stop = lf.shared.test.mid_hand_off.lock().unwrap();
        add_both(&mut hl, &mut hm, &all);
        let g = lf.gen.live();
        while buf_state(&lf, g, 0) != HANDING {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let expect = mx.freeze();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let heads = lf.freeze();
                done.store(true, Ordering::SeqCst);
                heads
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!done.load(Ordering::SeqCst), "merged before the publish");
            drop(stop);
            assert_eq!(t.join().unwrap(), expect);
        });
        assert_eq!(lf.hand_off_counts(), (1, 0));
    }

    /// A release while a hand-off of the live generation is pending
    /// leaves it alone (it is the other parity's lane), and a stale
    /// request for the released generation publishes nothing.
    #[test]
    fn release_while_a_hand_off_is_pending() {
        use super::super::handoff::FULL;
        let lf = LockFreeStore::with_config(1, 8);
        let mx = MutexStore::new();
        let all = ops(8 + 5);
        let (mut hl, mut hm) = (lf.handle().unwrap(), mx.handle().unwrap());
        add_both(&mut hl, &mut hm, &all[..5]);
        assert_eq!(lf.freeze(), mx.freeze());
        pause_hand_offs(&lf, true);
        add_both(&mut hl, &mut hm, &all);
        let live = lf.gen.live();
        assert_eq!(buf_state(&lf, live, 0), FULL);
        lf.release(Vec::new());
        mx.release(Vec::new());
        assert_eq!(
            buf_state(&lf, live, 0),
            FULL,
            "release touched the live lane"
        );
        assert_eq!(lf.pending_all(), mx.pending_all());
        pause_hand_offs(&lf, false);
        lf.shared
            .handoff
            .request(&lf.shared, live - 1, |s| &s.handoff);
        lf.settle();
        assert_eq!(lf.hand_off_counts(), (1, 0));
        assert_eq!(lf.shared.index[parity(live - 1)].runs.len(), 0);
        assert_eq!(lf.freeze(), mx.freeze());
    }

    /// The store drops with full buffers waiting for the background and
    /// its threads running: they stop, nothing hangs.
    #[test]
    fn store_drops_with_hand_offs_pending() {
        let lf = LockFreeStore::with_config(2, 8);
        let all = ops(8 * 3 + 1);
        pause_hand_offs(&lf, true);
        let mut h = lf.handle().unwrap();
        for op in &all {
            h.add(op).unwrap();
        }
        drop(h);
        pause_hand_offs(&lf, false);
        drop(lf);
    }

    #[test]
    fn shards_are_exclusive() {
        let lf = LockFreeStore::with_config(2, 8);
        let a = lf.handle().unwrap();
        let _b = lf.handle().unwrap();
        assert_eq!(
            lf.handle().unwrap_err(),
            StoreError::ShardsExhausted { shards: 2 }
        );
        drop(a);
        assert!(lf.handle().is_ok());
    }
}
