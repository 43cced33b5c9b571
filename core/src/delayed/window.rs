//! The change brackets and read windows of one transaction index: how
//! readers of what changes under them (the index's run view, its staging
//! buffers, its carry) get a consistent read without a lock.
//!
//! Every change of an index or of its staging buffers but an append (a
//! hand-off, a compaction's publish, a release, a requeue) is bracketed
//! by [`ChangeCounters::begin_change`] and [`ChangeCounters::end_change`]:
//! `started` and `finished` count the changes begun and ended. A read
//! ([`ChangeCounters::try_read`]) waits until the two are equal (no change
//! in progress), reads, fences, and checks that `started` has not moved:
//! if it has, a change began during the read and the read is retried. A
//! release fence after `started` (in `begin_change`) keeps the writes of a
//! change, relaxed ones included (a staging buffer's filter words, the
//! slots an owner reuses after the `Release` fence of its ring's
//! `activate`), from being seen before `started` has moved: a reader whose
//! read saw one of them and then fences sees the change begun.
//!
//! A read is tried [`READ_OPTIMISTIC_MAX`] times optimistically (ingest
//! unaffected); then it asks for a quiet window
//! ([`ChangeCounters::hold_quiet`]) in which no change begins (writers
//! wait at `begin_change`: `started` then `quiet`, against the reader's
//! `quiet` then `started`, Dekker's pattern), so it retries at most once
//! per writer that had already begun, whatever the ingest rate.
//!
//! The atomics come from [`refd_sync::shim`], so this exact code is
//! model-checked with loom (`loom_tests` below, `run_view_*`), with the
//! run view's publication and its reclamation by crossbeam-epoch modelled
//! with loom's primitives: a lookup that dereferences the runs of a view
//! read in a window that saw no change begin never touches a freed run
//! and counts each op once, in a run or in staging (see
//! `lockfree::RunView::chunks_may_hold`). So is a count lookup of a hot
//! extent (`run_view_handoff_hot_cells_count_each_op_once`), which reads
//! the view's sum in place of its runs and each staging buffer's hot cell
//! in place of its slots: a cell it takes holds each op of its buffer's
//! current life once and none of another life (of the same extent, or of
//! another: `run_view_handoff_hot_cell_of_another_extent`), and is never
//! torn; with buffers of two slots, allocations among the ops
//! (`run_view_hot_cell_counts_*`), it counts the ops, the allocations and
//! the latest allocation's stamp (from the slot it copies) of a prefix
//! of the ops, as a scan of the slots would, and never an op that a
//! lookup right after it misses; so it does when the background hand-off
//! resets the cell while the owner folds allocations
//! (`run_view_hot_cell_reset_in_background_with_allocations`) and when an
//! op spoils the cell during the count (`run_view_hot_cell_spoiled_*`:
//! the allocation past the bound, an op with an extent_op, one of another
//! size; the count then scans).
//!
//! What loom does not check: that no change begins in a quiet window once
//! a read in it saw none in progress (the Dekker pattern above). Loom
//! models SeqCst loads and read-modify-writes as AcqRel
//! (tokio-rs/loom#180) and reports a change beginning there. A SeqCst
//! fence in `begin_change` between `started` and `quiet` (as the shard
//! gate has) let it check that, but loom then no longer reported a
//! missing release fence in the ring's `activate`, which loses ops (loom
//! lets a SeqCst fence synchronize with every later one, which the
//! language model does not), so it was not kept. Consistency does not
//! rest on the quiet window: `try_read` checks every read; only the bound
//! on retries does.

use crossbeam_utils::CachePadded;
use refd_sync::shim::{fence, AtomicU64, Ordering};

use super::handoff::wait_step;

/// Optimistic attempts of a read before it asks for a quiet window (a
/// failed attempt of a long read, such as `pending_all`, costs as much as
/// the read: one).
pub const READ_OPTIMISTIC_MAX: usize = 1;

/// Steps of [`wait_step`] an optimistic attempt waits for the changes in
/// progress to end before it gives up (under loom, one).
const READ_WAIT_STEPS_MAX: u32 = if cfg!(loom) { 1 } else { 64 };

/// The change and read-window counters of one index (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct ChangeCounters {
    started: CachePadded<AtomicU64>,
    finished: CachePadded<AtomicU64>,
    /// Readers that asked for a quiet window: no change begins while it
    /// is non-zero.
    quiet: CachePadded<AtomicU64>,
    /// Most attempts one read took (tests and reports: the bound of
    /// [`ChangeCounters::read_stable_checked`]).
    read_attempts_max: AtomicU64,
}

impl ChangeCounters {
    /// Begin a change: waits while a reader holds a quiet window. The
    /// change's writes follow this call.
    pub fn begin_change(&self) {
        loop {
            let mut spins = 0u32;
            while self.quiet.load(Ordering::SeqCst) != 0 {
                wait_step(&mut spins);
            }
            self.started.fetch_add(1, Ordering::SeqCst);
            // Dekker with `hold_quiet`: either the reader sees this change
            // started (and waits for it), or this sees the reader's request.
            if self.quiet.load(Ordering::SeqCst) == 0 {
                break;
            }
            // A reader asked meanwhile: withdraw (nothing was changed).
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
        // The writes of the change (and the staging slots reused after a
        // hand-off) must not become visible before `started` does: a
        // release RMW orders what comes before it, not after. With this
        // fence, a reader whose (relaxed) read saw such a write and then
        // fences (`try_read`) sees `started` moved, and retries.
        fence(Ordering::Release);
    }

    /// End the change begun by [`ChangeCounters::begin_change`].
    pub fn end_change(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    /// [`ChangeCounters::read_stable_checked`] of a read that nothing but
    /// a change spoils (the loom models' reads).
    #[cfg(loom)]
    pub fn read_stable<T>(&self, mut read: impl FnMut() -> T) -> T {
        self.read_stable_checked(|| Some(read()))
    }

    /// Run `read` until it observed no change and did not find itself
    /// spoiled by what the counters do not see (`None`: a staging ring's
    /// owner moved to another buffer, `handoff::Ring::moves`).
    /// Optimistic first ([`READ_OPTIMISTIC_MAX`] attempts, ingest
    /// unaffected); then, so that a read completes whatever the ingest
    /// rate, in a quiet window ([`ChangeCounters::hold_quiet`]): changes
    /// wait until the read is done, so the read retries at most once per
    /// writer that had already begun, and once per move of an owner, of
    /// which a shard has at most `STAGING_RING - 1` in a quiet window (it
    /// moves only to an empty buffer, emptied by a change: one begun before
    /// the window, or none), so at most shards × (`STAGING_RING` - 1) in
    /// all. (A lookup reads a moved lane again a few times first.)
    pub fn read_stable_checked<T>(&self, mut read: impl FnMut() -> Option<T>) -> T {
        let mut attempts = 0u64;
        let note = |attempts: u64| {
            self.read_attempts_max
                .fetch_max(attempts, Ordering::Relaxed);
        };
        for _ in 0..READ_OPTIMISTIC_MAX {
            attempts += 1;
            if let Some(out) = self.try_read(&mut read, READ_WAIT_STEPS_MAX) {
                note(attempts);
                return out;
            }
        }
        let _quiet = self.hold_quiet();
        loop {
            attempts += 1;
            if let Some(out) = self.try_read(&mut read, u32::MAX) {
                note(attempts);
                return out;
            }
        }
    }

    /// One read: waits (at most `spins_max` steps of [`wait_step`]) for
    /// the changes in progress to end, reads, and returns `None` if a
    /// change began meanwhile.
    fn try_read<T>(&self, read: &mut impl FnMut() -> Option<T>, spins_max: u32) -> Option<T> {
        let mut spins = 0u32;
        let f = loop {
            let f = self.finished.load(Ordering::SeqCst);
            if self.started.load(Ordering::SeqCst) == f {
                break f;
            }
            if spins >= spins_max {
                return None;
            }
            wait_step(&mut spins);
        };
        let out = read();
        fence(Ordering::SeqCst);
        (self.started.load(Ordering::SeqCst) == f)
            .then_some(out)
            .flatten()
    }

    /// Ask for a quiet window: no change begins until the guard drops
    /// (changes already begun end). Writers wait for it in
    /// [`ChangeCounters::begin_change`]; it lasts one read.
    pub fn hold_quiet(&self) -> QuietGuard<'_> {
        self.quiet.fetch_add(1, Ordering::SeqCst);
        QuietGuard(self)
    }

    /// Most attempts one read took so far.
    pub fn read_attempts_max(&self) -> u64 {
        self.read_attempts_max.load(Ordering::Relaxed)
    }
}

/// A quiet window, see [`ChangeCounters::hold_quiet`].
pub(crate) struct QuietGuard<'a>(&'a ChangeCounters);

impl Drop for QuietGuard<'_> {
    fn drop(&mut self) {
        self.0.quiet.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! The run view's read/change protocol (`lockfree::TxnIndex`), with
    //! this module's counters as they are: a reader pins, reads the view
    //! (and staging) in `read_stable`'s window, then dereferences the
    //! view's runs after it, as `LockFreeStore::lookup_with` does
    //! (`RunView::chunks_may_hold`). What is modelled: the view (one of a
    //! few `UnsafeCell`s, published by a `swap` as `publish_view` does),
    //! the runs (an `UnsafeCell` each: the ops it holds, one bit an op),
    //! a staging buffer (one slot, or two to four for the cells' allocations,
    //! ordered as `lockfree::Staging`, and for count lookups one hot cell
    //! beside it, ordered as `lockfree::HotCell`: its state laid out as
    //! the real one, with `CELL_MULTI`, the last op's slot,
    //! `CELL_LAST_ALLOC` and the allocation count, its `allocs` word, and
    //! the reader's copy of the latest allocation's slot), each view's hot
    //! sum (`RunView::hot`: built and freed with the view), the writers'
    //! lock (`lock_runs`) and crossbeam-epoch ([`Epochs`]). Freeing a run or a view writes it:
    //! loom reports a read that is not ordered before the free, and the
    //! reader asserts it never reads a freed one.
    //!
    //! A cell's spoiling (an op with an extent_op, one of another size,
    //! the allocation past the bound: one store of `CELL_SPOILED`) races a
    //! count in cases 6 to 8, the cell's reset by the background hand-off
    //! while the owner folds allocations in case 5.
    //!
    //! Not modelled: the index's list of hot extents (`TxnIndex::hot_keys`,
    //! a hint read without a window; a buffer names the extent of its
    //! first op, hot from the start), the kind (compared with the size, in
    //! the same word), the release's reset (`Lane::reset`: the stores of
    //! `Staging::reset`, as a hand-off's, in a change of the index, with
    //! no owner in the lane: the gate's interlock, `gate::loom_tests`), the
    //! hashing of extents to cells (`HOT_PROBES` slots each; the model has one
    //! cell, which two lives of a buffer name for the same extent, or for
    //! two: `run_view_handoff_hot_cell_of_another_extent`), an op's kind
    //! and its decoding (a slot is one word, the op's bit, which stands
    //! for its words and stamp; a real slot's words are copied raw and
    //! decoded after the window), `CELL_ALLOCS_MAX`'s value (case 6 spoils
    //! past a bound of 1, in a count field as wide) and `SummaryFold` (the
    //! model tallies what a lookup found, [`Tally`]).
    use super::super::handoff::{Ring, Rotate, STAGING_RING};
    use super::super::lockfree::{
        cell_last, CELL_ALLOCS_MAX, CELL_ALLOCS_SHIFT, CELL_HAS_OPS, CELL_LAST_ALLOC,
        CELL_LAST_SHIFT, CELL_MULTI, CELL_SPOILED, CELL_SUM_MASK, HOT_EMPTY,
    };
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::{Arc, Mutex};
    use loom::thread;
    use std::ops::RangeInclusive;

    /// A freed run's ops.
    const FREED: u64 = u64::MAX;
    /// A freed view's runs.
    const FREED_VIEW: usize = usize::MAX;
    /// The bytenr of the model's hot extent, and its size.
    const HOT: u64 = 1 << 20;
    const HOT_NUM_BYTES: u64 = 4096;
    /// Another hot extent: of the op of bit 0 in
    /// `run_view_handoff_hot_cell_of_another_extent`.
    const OTHER: u64 = HOT + HOT_NUM_BYTES;

    fn model(f: impl Fn() + Sync + Send + 'static) {
        model_bounded(3, f);
    }

    /// Check `f` with at most `preemptions` preemptions per execution.
    fn model_bounded(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
        // Preemptions bounded (as `handoff::loom_tests`) so that each
        // model runs in seconds; every interleaving of the threads' atomic
        // steps with at most this many preemptions is tried.
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(preemptions);
        model.check(f);
    }

    /// crossbeam-epoch as the run view relies on it, for one reader: a
    /// pin stores the global epoch it read (plus one) and fences
    /// (SeqCst); what a writer unlinks (a skiplist entry removed, a view
    /// swapped out) is retired with the epoch it read then; a collection
    /// (after the change, outside its bracket, as `end_runs_change` and
    /// `reclaim` collect) advances the epoch, fences (SeqCst) and frees
    /// what the reader cannot hold: the reader is unpinned, or pinned
    /// after the unlink (it read an epoch advanced after the retire; or
    /// its pin is not seen, so its pin's fence follows the collection's,
    /// and it sees the unlink). Nobody waits for the reader (garbage
    /// waits, as in crossbeam-epoch's bags): a thread spinning for it
    /// would let loom starve it. No fence inside a change's bracket: one
    /// there would order the change for readers that fence afterwards,
    /// and hide a missing fence of the protocol.
    struct Epochs {
        global: AtomicU64,
        /// The reader's pin: 0 when unpinned, else the epoch it read + 1.
        pin: AtomicU64,
    }

    impl Epochs {
        fn new() -> Epochs {
            Epochs {
                global: AtomicU64::new(1),
                pin: AtomicU64::new(0),
            }
        }

        /// Pin the reader until the guard drops (also when an assertion
        /// fails, so that loom reports the assertion).
        fn pin(&self) -> Pinned<'_> {
            let e = self.global.load(Ordering::SeqCst);
            self.pin.store(e + 1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            Pinned(self)
        }
    }

    /// The reader's pin ([`Epochs::pin`]).
    struct Pinned<'a>(&'a Epochs);

    impl Drop for Pinned<'_> {
        fn drop(&mut self) {
            self.0.pin.store(0, Ordering::Release);
        }
    }

    /// A staging buffer of `cap` slots (one or two), ordered as
    /// `lockfree::Staging`: the owner writes a slot and the filter bit
    /// (relaxed), then the length (Release); a reader loads the length
    /// (Acquire), the filter, the slots below it; a reset stores the length
    /// (SeqCst), then clears the filter (relaxed). A slot holds its op's
    /// bit, which stands for its words, stamp included (op `k`, bit
    /// `k - 1`, has stamp `k`).
    ///
    /// With `hot`, the buffer also has one hot cell (`Staging::hot_keys`
    /// and `hot_cells`, a `HotCell`) for the hot extent of its first op
    /// (the op of bit 0 is of `op0_extent`, every other of [`HOT`], all of
    /// [`HOT_NUM_BYTES`]; the ops in `alloc_ops` are allocations, the
    /// others plain ops), ordered as the real one: the owner names the
    /// extent while the buffer is empty (`Staging::seed_hot`: the key,
    /// Release), then for each op writes its slot and filter bit, folds
    /// the op into the cell (`HotCell::fold`: `num_bytes` relaxed, an
    /// allocation's `allocs` word relaxed, then the state, Release) and
    /// publishes the length; a reset empties the cell with the length (key
    /// and state, relaxed; `num_bytes` and `allocs` are left, as the real
    /// reset leaves them); a count lookup loads the key (Acquire), the
    /// state (Acquire), the length (Acquire: the last op folded is left
    /// out while its slot is unpublished, and an allocation being added
    /// makes it scan), the `allocs` word (relaxed: it scans if its count
    /// is not the state's, or its slot is not below the length) and
    /// `num_bytes` (relaxed), and copies the latest allocation's slot, all
    /// in its window (`HotCell::read`, then `LockFreeStore::lookup_window`
    /// copies `Staging::words`). The cell's state is laid out as the real
    /// one, with the model's ref_mods (the ops' bits) for the sum: the
    /// last op's ref_mod, which the real state keeps as `CELL_LAST_DROP`
    /// for a reader to leave it out, is the sum's highest bit (a life of
    /// the buffer folds its ops in order).
    struct Buf {
        len: AtomicU64,
        filter: AtomicU64,
        slots: [AtomicU64; SLOTS_MAX],
        /// Ops the buffer holds before it is full.
        cap: usize,
        /// Whether the owner sums the hot extents' ops in the cell.
        hot: bool,
        /// The extent of op 0 (the others' is [`HOT`]).
        op0_extent: u64,
        /// The ops that are allocations, as bits.
        alloc_ops: u64,
        /// `Staging::hot_keys` (one).
        hot_key: AtomicU64,
        /// `HotCell::num_bytes`.
        cell_num_bytes: AtomicU64,
        /// `HotCell::state`.
        cell_state: AtomicU64,
        /// `HotCell::allocs`: the number of allocations << 32 | the slot
        /// of the latest.
        cell_allocs: AtomicU64,
        /// Allocations the cell counts, and the mask of the state's count
        /// (`CELL_ALLOCS_MAX` is both): `CELL_ALLOCS_MAX`, or fewer in a
        /// case that spoils the cell by one more (the order of the stores
        /// does not depend on the bound: [`Buf::with_spoilers`]).
        allocs_max: u64,
        /// The ops that carry an extent_op (neither plain ops nor
        /// allocations for the cell: they spoil it), as bits.
        extent_op_ops: u64,
        /// The ops of another size ([`OTHER_NUM_BYTES`]), as bits.
        other_size_ops: u64,
    }

    /// Slots of a model buffer, at most.
    const SLOTS_MAX: usize = 4;

    /// The size an op of `Buf::other_size_ops` names.
    const OTHER_NUM_BYTES: u64 = 2 * HOT_NUM_BYTES;

    /// What a count lookup read of a buffer in its window.
    #[derive(Clone, Copy, Debug)]
    enum Counted {
        /// The ops of its slots (`Staging::raw_of`).
        Slots(u64),
        /// The sums of its cell (`Staging::hot_sum`), with the latest
        /// allocation's slot as copied, and the cell's `num_bytes` when it
        /// has ops.
        Cell(Tally, Option<u64>),
    }

    impl Counted {
        fn ops(self) -> u64 {
            match self {
                Counted::Slots(ops) => ops,
                Counted::Cell(tally, _) => tally.ops,
            }
        }

        /// What it says of the hot extent's ops (`alloc_ops`: those that
        /// are allocations): a scan's slots are tallied as
        /// `lockfree::SummaryFold` folds them.
        fn tally(self, alloc_ops: u64) -> Tally {
            match self {
                Counted::Slots(ops) => Tally::of(ops, alloc_ops),
                Counted::Cell(tally, _) => tally,
            }
        }
    }

    /// A count of the hot extent (`lockfree::HeadSummary`, for the model's
    /// ops): which ops it holds (their sum), how many of them are
    /// allocations, and the latest allocation (its bit; 0: none), whose
    /// stamp defines the extent.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Tally {
        ops: u64,
        allocs: u64,
        latest: u64,
    }

    impl Tally {
        /// The tally of `ops`, those of `alloc_ops` allocations.
        fn of(ops: u64, alloc_ops: u64) -> Tally {
            let allocs = ops & alloc_ops;
            Tally {
                ops,
                allocs: u64::from(allocs.count_ones()),
                latest: highest_bit(allocs),
            }
        }

        /// Two counts of disjoint ops merged (as `SummaryFold` merges
        /// summaries: the latest allocation's stamp wins).
        fn merge(self, other: Tally) -> Tally {
            assert_eq!(
                self.ops & other.ops,
                0,
                "an op found twice: {self:?} {other:?}"
            );
            Tally {
                ops: self.ops | other.ops,
                allocs: self.allocs + other.allocs,
                latest: self.latest.max(other.latest),
            }
        }
    }

    /// The highest bit of `x` (0 if none).
    fn highest_bit(x: u64) -> u64 {
        x.checked_ilog2().map_or(0, |b| 1 << b)
    }

    impl Buf {
        fn new(hot: bool, op0_extent: u64, cap: usize, alloc_ops: u64) -> Buf {
            assert!((1..=SLOTS_MAX).contains(&cap));
            Buf {
                len: AtomicU64::new(0),
                filter: AtomicU64::new(0),
                slots: std::array::from_fn(|_| AtomicU64::new(0)),
                cap,
                hot,
                op0_extent,
                alloc_ops,
                hot_key: AtomicU64::new(HOT_EMPTY),
                cell_num_bytes: AtomicU64::new(0),
                cell_state: AtomicU64::new(0),
                cell_allocs: AtomicU64::new(0),
                allocs_max: CELL_ALLOCS_MAX,
                extent_op_ops: 0,
                other_size_ops: 0,
            }
        }

        /// The buffer with ops that spoil its cell: `extent_op_ops` carry
        /// an extent_op (`HotCell::fold`: not `is_plain_ref` and not an
        /// allocation), `other_size_ops` name [`OTHER_NUM_BYTES`] (`same`
        /// false once the cell has ops of the other size; the real cell
        /// also compares the kind, in the same state word), and the
        /// allocation past `allocs_max` (`allocs > CELL_ALLOCS_MAX`)
        /// spoils it. Each is one Release store of `CELL_SPOILED`, in the
        /// place of the state the op would have made, as in the real fold.
        fn with_spoilers(
            mut self,
            extent_op_ops: u64,
            other_size_ops: u64,
            allocs_max: u64,
        ) -> Buf {
            assert_eq!(
                extent_op_ops & self.alloc_ops,
                0,
                "an allocation has no extent_op"
            );
            assert!(allocs_max <= CELL_ALLOCS_MAX && (allocs_max + 1).is_power_of_two());
            self.extent_op_ops = extent_op_ops;
            self.other_size_ops = other_size_ops;
            self.allocs_max = allocs_max;
            self
        }

        /// `lockfree::cell_allocs`: the state's count of allocations, a
        /// field as wide as the bound (`CELL_ALLOCS_MAX` is its mask).
        fn allocs_of(&self, s: u64) -> u64 {
            (s >> CELL_ALLOCS_SHIFT) & self.allocs_max
        }

        /// The size `op` names.
        fn num_bytes_of(&self, op: u64) -> u64 {
            if op & self.other_size_ops != 0 {
                OTHER_NUM_BYTES
            } else {
                HOT_NUM_BYTES
            }
        }

        /// Owner: append `op` (`LockFreeHandle::append`, `Staging::note`,
        /// and with `hot` `Staging::seed_hot` first if the buffer is
        /// empty, and `Staging::fold_hot` before the length).
        fn append(&self, op: u64) {
            let n = self.len.load(Ordering::Relaxed) as usize;
            assert!(n < self.cap, "append to a full buffer");
            if self.hot && n == 0 {
                self.seed_hot(self.extent_of(op));
            }
            self.slots[n].store(op, Ordering::Relaxed);
            if self.filter.load(Ordering::Relaxed) != 1 {
                self.filter.store(1, Ordering::Relaxed);
            }
            if self.hot {
                self.fold_hot(op, n);
            }
            self.len.store(n as u64 + 1, Ordering::Release);
        }

        /// Whether the buffer holds `cap` ops (the owner's view).
        fn full(&self) -> bool {
            self.len.load(Ordering::Relaxed) as usize == self.cap
        }

        /// The extent of `op`.
        fn extent_of(&self, op: u64) -> u64 {
            if op == 0b01 {
                self.op0_extent
            } else {
                HOT
            }
        }

        /// The ops of [`HOT`], as bits.
        fn hot_ops(&self) -> u64 {
            if self.op0_extent == HOT {
                u64::MAX
            } else {
                !0b01
            }
        }

        /// `Staging::seed_hot` (the owner, the buffer empty): name the
        /// hot extent `key` (the index's hot extent then: the extent of
        /// the buffer's first op).
        fn seed_hot(&self, key: u64) {
            if self.hot_key.load(Ordering::Relaxed) != key {
                self.hot_key.store(key, Ordering::Release);
            }
        }

        /// `Staging::fold_hot` and `HotCell::fold` of an op (`op`: its
        /// bit, the model's ref_mod) about to be published in slot
        /// `slot`: a plain op, or an allocation (`alloc_ops`), whose count
        /// and slot go to the `allocs` word before the state that counts
        /// it; an op that spoils the cell ([`Buf::with_spoilers`]) stores
        /// `CELL_SPOILED` in the state's place, and a spoiled cell folds
        /// nothing more.
        fn fold_hot(&self, op: u64, slot: usize) {
            if self.hot_key.load(Ordering::Relaxed) != self.extent_of(op) {
                return;
            }
            let s = self.cell_state.load(Ordering::Relaxed);
            if s & CELL_SPOILED != 0 {
                return;
            }
            let alloc = op & self.alloc_ops != 0;
            let num_bytes = self.num_bytes_of(op);
            let last = (slot as u64) << CELL_LAST_SHIFT | if alloc { CELL_LAST_ALLOC } else { 0 };
            let allocs = self.allocs_of(s) + u64::from(alloc);
            let next = if op & self.extent_op_ops != 0 || allocs > self.allocs_max {
                CELL_SPOILED
            } else {
                let (sum, same, multi) = if s & CELL_HAS_OPS == 0 {
                    self.cell_num_bytes.store(num_bytes, Ordering::Relaxed);
                    (op, true, 0)
                } else {
                    let same = self.cell_num_bytes.load(Ordering::Relaxed) == num_bytes;
                    ((s & CELL_SUM_MASK) + op, same, CELL_MULTI)
                };
                if same {
                    if alloc {
                        self.cell_allocs
                            .store(allocs << 32 | slot as u64, Ordering::Relaxed);
                    }
                    CELL_HAS_OPS | multi | last | allocs << CELL_ALLOCS_SHIFT | sum
                } else {
                    CELL_SPOILED
                }
            };
            self.cell_state.store(next, Ordering::Release);
        }

        /// A reader's read of its ops (`Staging::raw_of`, which reads the
        /// keys, then the matching slots: all of its loads come before
        /// `try_read`'s fence, as this one's do).
        fn read(&self) -> u64 {
            let len = self.len.load(Ordering::Acquire) as usize;
            if len == 0 || self.filter.load(Ordering::Relaxed) != 1 {
                return 0;
            }
            self.slots[..len.min(self.cap)]
                .iter()
                .fold(0, |ops, slot| ops | slot.load(Ordering::Relaxed))
        }

        /// A count lookup's read (`LockFreeStore::lookup_window` with
        /// `sums`): the cell's sums and the latest allocation's slot if
        /// the buffer names the hot extent and the cell is whole
        /// (`Staging::hot_sum`, `HotCell::read`, `Staging::words`), else
        /// the slots.
        fn read_count(&self) -> Counted {
            if self.hot_key.load(Ordering::Acquire) == HOT {
                if let Some(counted) = self.read_cell() {
                    return counted;
                }
            }
            Counted::Slots(self.read() & self.hot_ops())
        }

        /// `HotCell::read` and the copy of the latest allocation's slot:
        /// `None` to scan the slots.
        fn read_cell(&self) -> Option<Counted> {
            let empty = Counted::Cell(Tally::default(), None);
            let s = self.cell_state.load(Ordering::Acquire);
            if s & CELL_SPOILED != 0 {
                return None;
            }
            if s & CELL_HAS_OPS == 0 {
                return Some(empty);
            }
            let mut ops = s & CELL_SUM_MASK;
            let len = self.len.load(Ordering::Acquire) as usize;
            if cell_last(s) >= len {
                // The last op is being added: not published yet.
                if s & CELL_LAST_ALLOC != 0 {
                    return None;
                }
                if s & CELL_MULTI == 0 {
                    return Some(empty);
                }
                ops -= highest_bit(ops);
            }
            let allocs = self.allocs_of(s);
            let mut latest_slot = None;
            if allocs > 0 {
                let w = self.cell_allocs.load(Ordering::Relaxed);
                let slot = (w & u64::from(u32::MAX)) as usize;
                if w >> 32 != allocs || slot >= len {
                    return None;
                }
                latest_slot = Some(slot);
            }
            let num_bytes = self.cell_num_bytes.load(Ordering::Relaxed);
            // `lookup_window`: the latest allocation's words (its stamp).
            let latest = latest_slot.map_or(0, |i| self.slots[i].load(Ordering::Relaxed));
            Some(Counted::Cell(
                Tally {
                    ops,
                    allocs,
                    latest,
                },
                Some(num_bytes),
            ))
        }

        /// The claimer's reads of a full buffer (`Lane::hand_off` reads it in
        /// place, `FullBuffer`, while it is HANDING).
        fn read_all(&self) -> u64 {
            let len = self.len.load(Ordering::Acquire) as usize;
            self.slots[..len.min(self.cap)]
                .iter()
                .fold(0, |ops, slot| ops | slot.load(Ordering::Relaxed))
        }

        /// `Staging::reset` (without `hot` the cell, never named, keeps
        /// what the reset would store: its stores are left out, and the
        /// model is the one before the cells).
        fn reset(&self) {
            self.len.store(0, Ordering::SeqCst);
            self.filter.store(0, Ordering::Relaxed);
            if self.hot {
                self.hot_key.store(HOT_EMPTY, Ordering::Relaxed);
                self.cell_state.store(0, Ordering::Relaxed);
            }
        }
    }
    /// One transaction index as the run view sees it.
    struct Index {
        changes: ChangeCounters,
        epochs: Epochs,
        /// Which of `views` is published (`TxnIndex::view`).
        view: AtomicU64,
        /// The views: the runs each holds (`RunView::slots`).
        views: [UnsafeCell<Vec<usize>>; 2],
        /// Each view's sum of the hot extent over its runs (`RunView::hot`:
        /// their ops; built and freed with the view).
        view_hots: [UnsafeCell<u64>; 2],
        /// The runs: the ops each holds, one bit an op (`Run`).
        runs: [UnsafeCell<u64>; 3],
        /// `TxnIndex::lock_runs`.
        writer: Mutex<()>,
        bufs: [Buf; STAGING_RING],
        /// Unlinked and not freed yet, with the epoch each waits out.
        garbage: Mutex<Vec<(Garbage, u64)>>,
    }

    /// What an unlink leaves to crossbeam-epoch.
    #[derive(Clone, Copy)]
    enum Garbage {
        /// A skiplist entry and its run.
        Run(usize),
        /// A replaced view.
        View(usize),
    }

    impl Index {
        /// An index whose view 0 holds runs `view0`, run `i` holding
        /// `runs[i]`; with `cells`, its staging buffers have a hot cell
        /// ([`Buf`]) and the op of bit 0 is of extent `cells` (the others of [`HOT`]).
        fn new(view0: Vec<usize>, runs: [u64; 3], cells: Option<u64>) -> Index {
            Index::with_bufs(view0, runs, || {
                Buf::new(cells.is_some(), cells.unwrap_or(HOT), 1, 0)
            })
        }

        /// An index whose view 0 holds runs `view0`, run `i` holding
        /// `runs[i]`, with staging buffers made by `buf`.
        fn with_bufs(view0: Vec<usize>, runs: [u64; 3], buf: impl Fn() -> Buf) -> Index {
            let bufs = std::array::from_fn(|_| buf());
            let hot0 = view0.iter().fold(0, |all, &r| all | runs[r]) & bufs[0].hot_ops();
            Index {
                changes: ChangeCounters::default(),
                epochs: Epochs::new(),
                view: AtomicU64::new(0),
                views: [UnsafeCell::new(view0), UnsafeCell::new(Vec::new())],
                view_hots: [UnsafeCell::new(hot0), UnsafeCell::new(0)],
                runs: runs.map(UnsafeCell::new),
                writer: Mutex::new(()),
                bufs,
                garbage: Mutex::new(Vec::new()),
            }
        }

        /// Build view `v` holding `runs`, with [`HOT`] summed over them
        /// (before the bracket, as `TxnIndex::next_view`).
        fn build_view(&self, v: usize, runs: Vec<usize>) {
            let hot = runs
                .iter()
                .fold(0, |all, &r| all | self.runs[r].with(|p| unsafe { *p }))
                & self.bufs[0].hot_ops();
            self.views[v].with_mut(|p| unsafe { *p = runs });
            self.view_hots[v].with_mut(|p| unsafe { *p = hot });
        }

        /// Build run `r` holding `ops` (before the bracket).
        fn build_run(&self, r: usize, ops: u64) {
            self.runs[r].with_mut(|p| unsafe { *p = ops });
        }

        /// `TxnIndex::publish_view` (inside a bracket): the old view is
        /// unlinked and retired.
        fn publish_view(&self, v: usize) {
            let old = self.view.swap(v as u64, Ordering::SeqCst);
            self.retire(Garbage::View(old as usize));
        }

        /// Leave `g`, just unlinked, to crossbeam-epoch.
        fn retire(&self, g: Garbage) {
            let mut garbage = self.garbage.lock().unwrap();
            let e = self.epochs.global.load(Ordering::Relaxed);
            garbage.push((g, e));
        }

        /// crossbeam-epoch's collection: free the garbage the reader
        /// cannot hold (a write of it, which loom orders against every
        /// read).
        fn collect(&self) {
            let mut garbage = self.garbage.lock().unwrap();
            self.epochs.global.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let pin = self.epochs.pin.load(Ordering::Acquire);
            garbage.retain(|&(g, e)| {
                if pin != 0 && pin <= e + 1 {
                    return true;
                }
                match g {
                    Garbage::Run(r) => self.runs[r].with_mut(|p| unsafe { *p = FREED }),
                    Garbage::View(v) => {
                        self.views[v].with_mut(|p| unsafe { *p = vec![FREED_VIEW] });
                        self.view_hots[v].with_mut(|p| unsafe { *p = FREED });
                    }
                }
                false
            });
        }

        /// After every thread is done: all garbage is freed.
        fn collect_all(&self) {
            self.collect();
            assert!(self.garbage.lock().unwrap().is_empty(), "garbage left");
        }

        /// What a lookup reads in its window: the published view.
        fn read_view(&self) -> usize {
            self.view.load(Ordering::Acquire) as usize
        }

        /// After the window: the ops of view `v`'s runs
        /// (`RunView::chunks_may_hold`), asserting each op is in one run.
        fn ops_in_view(&self, v: usize) -> u64 {
            let runs = self.views[v].with(|p| unsafe { (*p).clone() });
            assert!(!runs.contains(&FREED_VIEW), "a lookup read a freed view");
            runs.iter().fold(0, |all, &r| {
                let ops = self.runs[r].with(|p| unsafe { *p });
                assert_ne!(ops, FREED, "a lookup read a freed run");
                assert_eq!(all & ops, 0, "an op in two runs of one view");
                all | ops
            })
        }

        /// After the window: view `v`'s sum of the hot extent, in place of
        /// its runs (`RunView::hot_summary`).
        fn hot_in_view(&self, v: usize) -> u64 {
            let hot = self.view_hots[v].with(|p| unsafe { *p });
            assert_ne!(hot, FREED, "a lookup read a freed view's sums");
            hot
        }

        /// Hand off buffer `i` (claimed): its op into run 0 and view 1,
        /// and the buffer emptied, in one change (`Lane::hand_off`,
        /// `TxnIndex::hand_off`). Only buffer 0 is ever handed off with
        /// an op in it.
        fn hand_off(&self, i: usize) {
            let ops = self.bufs[i].read_all();
            let runs = self.writer.lock().unwrap();
            if ops != 0 {
                self.build_run(0, ops);
                self.build_view(1, vec![0]);
            }
            self.changes.begin_change();
            if ops != 0 {
                self.publish_view(1);
            }
            self.bufs[i].reset();
            self.changes.end_change();
            drop(runs);
            // The replaced view is collected after the threads are done:
            // a collection fences (SeqCst), and one here would order the
            // hand-off before the owner's reuse of the buffer for every
            // reader that fences afterwards, hiding the ring's fence
            // (`Ring::activate`), which the protocol needs without it.
        }
    }

    /// Case 1: a lookup against a compaction that merges runs 0 and 1
    /// into run 2 and publishes the view of run 2. The lookup sees the
    /// old set or the new one (each op once), and never a freed run or
    /// view; the runs it dereferences after its window are alive for
    /// its pin.
    #[test]
    fn run_view_compaction_frees_no_run_in_use() {
        model(|| {
            let idx = Arc::new(Index::new(vec![0, 1], [0b01, 0b10, 0], None));
            let c = idx.clone();
            let compactor = thread::spawn(move || {
                let runs = c.writer.lock().unwrap();
                c.build_run(2, 0b11);
                c.build_view(1, vec![2]);
                c.changes.begin_change();
                // Run 2 inserted, runs 0 and 1 removed from the skiplist:
                // their entries are destroyed once the threads pinned now
                // have unpinned.
                c.retire(Garbage::Run(0));
                c.retire(Garbage::Run(1));
                c.publish_view(1);
                c.changes.end_change();
                drop(runs);
                c.collect();
            });
            // Any thread's pin or flush collects: the epoch may advance
            // and garbage be freed at any point of the change.
            let o = idx.clone();
            let other = thread::spawn(move || o.collect());
            let pinned = idx.epochs.pin();
            let v = idx.changes.read_stable(|| idx.read_view());
            assert_eq!(idx.ops_in_view(v), 0b11, "the old runs or the new one");
            drop(pinned);
            compactor.join().unwrap();
            other.join().unwrap();
            idx.collect_all();
        });
    }

    /// Case 2: a lookup against the hand-off of buffer 0 (its op 0 into a
    /// run, the buffer emptied, in one change) while the owner moves on
    /// through its ring ([`Ring`], the real one) and appends op 1 to the
    /// buffer it reaches (buffer 0 again, reused, when the hand-off is
    /// done by then; else the owner hands a buffer off itself). The
    /// lookup's view and staging together hold each op once: no op in
    /// both, none lost (the ops found are a prefix), every op done before
    /// the lookup began is found, and none is found that had not begun
    /// before it ended.
    #[test]
    fn run_view_handoff_counts_each_op_once() {
        model(|| handoff_counts_each_op_once(None));
    }

    /// Case 2 for a count lookup of the hot extent: the view's sum stands
    /// in for its runs, and each buffer's hot cell ([`Buf`]), named again
    /// by the owner in each life of the buffer, for its slot. Besides case
    /// 2's checks: a cell the lookup takes never holds an op of another
    /// life of its buffer (that op would be found twice, or lost), and is
    /// never torn (its `num_bytes` is the ops' whenever it has ops).
    /// Preemptions bounded at 2: 1 s, where 3 took 33 s (and still 16 s
    /// with op 0 staged before the threads start), which tripled the CI
    /// loom step; every mutation that loom reported at 3 (of the cells,
    /// of the window's and the ring's fences) it reports at 2
    /// (`docs/design.md`).
    #[test]
    fn run_view_handoff_hot_cells_count_each_op_once() {
        model_bounded(2, || handoff_counts_each_op_once(Some(HOT)));
    }

    /// As the case above, with the op of bit 0 of another hot extent ([`OTHER`]),
    /// which buffer 0's first life names in the cell that its next life
    /// names [`HOT`] in: the lookup never takes the other extent's sum
    /// for its own (a new name with the state of the buffer's last life).
    /// Preemptions bounded at 2, as above.
    #[test]
    fn run_view_handoff_hot_cell_of_another_extent() {
        model_bounded(2, || handoff_counts_each_op_once(Some(OTHER)));
    }

    /// Case 2; with `cells`, for a count lookup of [`HOT`] where the op of bit 0 is of
    /// extent `cells` ([`Index::new`]).
    fn handoff_counts_each_op_once(cells: Option<u64>) {
        let hot = cells.is_some();
        let idx = Arc::new(Index::new(Vec::new(), [0; 3], cells));
        let ring = Arc::new(Ring::new());
        // Ops begun (before their append) and done (after it).
        let begun = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let (o, r, bg, d) = (idx.clone(), ring.clone(), begun.clone(), done.clone());
        let owner = thread::spawn(move || {
            stage(&o, &r, [&bg, &d], 1);
            for _ in 0..STAGING_RING {
                if let Rotate::HandOff(i) = r.rotate(|| {}) {
                    o.hand_off(i);
                    r.owner_handed_off(i);
                }
            }
            stage(&o, &r, [&bg, &d], 2);
        });
        let (b, r) = (idx.clone(), ring.clone());
        let background = thread::spawn(move || {
            if r.claim(0) {
                b.hand_off(0);
                r.handed_off(0);
            }
        });
        let done_before = done.load(Ordering::SeqCst);
        let pinned = idx.epochs.pin();
        let (v, staged) = idx.changes.read_stable(|| {
            let v = idx.read_view();
            let staged = if hot {
                idx.bufs.each_ref().map(Buf::read_count)
            } else {
                idx.bufs.each_ref().map(|b| Counted::Slots(b.read()))
            };
            (v, staged)
        });
        let in_runs = if hot {
            idx.hot_in_view(v)
        } else {
            idx.ops_in_view(v)
        };
        let all = staged.iter().fold(in_runs, |all, &counted| {
            assert_whole(counted, &idx.bufs[0]);
            let ops = counted.ops();
            assert_eq!(
                all & ops,
                0,
                "an op found twice: runs {in_runs:b}, staged {staged:?}"
            );
            all | ops
        });
        drop(pinned);
        let begun_after = begun.load(Ordering::SeqCst);
        // The lookup's ops (all, or those of `HOT`) among the first `n`,
        // for an `n` from the ops done before it to those begun before it
        // ended: none lost, none of another extent, none too early.
        let sought = if hot { idx.bufs[0].hot_ops() } else { 0b11 };
        assert!(
            (done_before..=begun_after).any(|n| all == sought & ((1 << n) - 1)),
            "found {all:b} (runs {in_runs:b}, staged {staged:?}), done before \
             {done_before}, begun before the end {begun_after}"
        );
        owner.join().unwrap();
        background.join().unwrap();
        idx.collect_all();
    }

    /// The owner stages op `k` (bit `k - 1`) in its active buffer, with
    /// the count of ops begun before and done after.
    fn stage(idx: &Index, ring: &Ring, [begun, done]: [&AtomicU64; 2], k: u64) {
        begun.store(k, Ordering::SeqCst);
        idx.bufs[ring.active()].append(1 << (k - 1));
        done.store(k, Ordering::SeqCst);
    }

    /// A cell a count lookup took (of a buffer made as `buf`) is whole:
    /// its `num_bytes` is the ops' whenever it has ops, and they all name
    /// it; and it sums no op that carries an extent_op (a sum cannot
    /// stand for one).
    fn assert_whole(counted: Counted, buf: &Buf) {
        if let Counted::Cell(tally, num_bytes) = counted {
            let (ops, other_size_ops) = (tally.ops, buf.other_size_ops);
            assert_eq!(
                ops & buf.extent_op_ops,
                0,
                "a cell summed an op with an extent_op: {counted:?}"
            );
            assert!(
                ops & other_size_ops == 0 || ops & !other_size_ops == 0,
                "a cell summed ops of two sizes: {counted:?}"
            );
            let want = if ops & other_size_ops != 0 {
                OTHER_NUM_BYTES
            } else {
                HOT_NUM_BYTES
            };
            assert_eq!(
                num_bytes,
                (ops != 0).then_some(want),
                "a torn cell: {counted:?}"
            );
        }
    }

    /// Case 4: a count lookup of the hot extent against its allocations
    /// (ADD_DELAYED_EXTENT without extent_op: cells count them beside the
    /// plain ops, `lockfree::HotCell`), in buffers of two slots
    /// ([`allocations_counted`]). Ops 2, 3 and 4 are allocations, op 1 a
    /// plain op: buffer 0's second life allocates twice (the second
    /// allocation's `allocs` word replaces the first's) in the slots where
    /// its first life had a plain op and an allocation, whose `allocs`
    /// word (count 1, slot 1) the reset leaves. Loom reports a reader
    /// that ignores the count of `allocs` (it copies the second
    /// allocation's slot for a state that counts one).
    #[test]
    fn run_view_hot_cell_counts_allocations() {
        static CELL_READS: StdAtomicUsize = StdAtomicUsize::new(0);
        model_bounded(2, || allocations_counted(0b1110, &CELL_READS));
        cell_path_taken(&CELL_READS, 0b1110);
    }

    /// Case 4 with ops 1 and 4 allocations, 2 and 3 plain ops: a plain op
    /// after an allocation (the cell's last op is not the allocation whose
    /// slot the reader copies; left out while unpublished), and a second
    /// life whose allocation has the first life's count (1) in another
    /// slot.
    #[test]
    fn run_view_hot_cell_counts_an_allocation_then_an_op() {
        static CELL_READS: StdAtomicUsize = StdAtomicUsize::new(0);
        model_bounded(2, || allocations_counted(0b1001, &CELL_READS));
        cell_path_taken(&CELL_READS, 0b1001);
    }

    /// Case 4 with plain ops only: the last op folded, unpublished, is
    /// left out of a cell that has others (`CELL_MULTI`), and the cell is
    /// whole (loom reports the state stored or loaded Relaxed: a reader
    /// that loads an older `len` takes the first op's sum without its
    /// `num_bytes`).
    #[test]
    fn run_view_hot_cell_counts_plain_ops_of_two_slots() {
        static CELL_READS: StdAtomicUsize = StdAtomicUsize::new(0);
        model_bounded(2, || allocations_counted(0, &CELL_READS));
        cell_path_taken(&CELL_READS, 0);
    }

    /// Case 5: the hot cell reset in the background while a count lookup
    /// reads it and the owner folds allocations. The owner stages ops 1
    /// (plain) and 2 (an allocation: `allocs` word count 1, slot 1) of
    /// [`HOT`] in buffer 0 (two slots), moves through its ring as in case
    /// 2 while the background hand-off thread claims buffer 0 and hands
    /// it off (run and view 1 published, the buffer and its cell emptied
    /// by `Staging::reset`, in one change: `TxnIndex::hand_off`), and
    /// stages op 3, an allocation, in the buffer it reaches: buffer 0
    /// again, reused after the background's reset and the ring's
    /// `activate` fence (its new `allocs` word: count 1, slot 0, the
    /// count of the last life's word in another slot), or buffer 1 if it
    /// handed that one off itself. A count lookup reads the view and
    /// every buffer's cell or slots ([`count_then_whole`]: exactly a
    /// prefix of the ops, allocations and the latest one's stamp
    /// included). The model copies `HotCell::fold` and `HotCell::read`,
    /// `Staging::seed_hot`, `Staging::reset`, `LockFreeHandle::append`
    /// and `TxnIndex::hand_off` in their orders ([`Buf`], [`Index`]) with
    /// the real `Ring` and `ChangeCounters`.
    ///
    /// Loom reports (at preemption bound 2, 11 s): the ring's `activate`
    /// fence dropped, `begin_change`'s fence dropped, a reset that leaves
    /// the cell's state (an op found twice), and the `CELL_LAST_ALLOC`
    /// and slot-below-`len` checks both dropped. It passes the `allocs`
    /// word loaded before the state (case 4 reports that; here it would
    /// take more preemptions) and `len` loaded Relaxed (case 4's note).
    #[test]
    fn run_view_hot_cell_reset_in_background_with_allocations() {
        static CELL_READS: StdAtomicUsize = StdAtomicUsize::new(0);
        model_bounded(2, || reset_in_background_counted(0b110, &CELL_READS));
        cell_path_taken(&CELL_READS, 0b110);
    }

    /// Case 5 ([`run_view_hot_cell_reset_in_background_with_allocations`]).
    fn reset_in_background_counted(alloc_ops: u64, cell_reads: &StdAtomicUsize) {
        let idx = Arc::new(Index::with_bufs(Vec::new(), [0; 3], || {
            Buf::new(true, HOT, 2, alloc_ops)
        }));
        let ring = Arc::new(Ring::new());
        let begun = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let (o, r, bg, d) = (idx.clone(), ring.clone(), begun.clone(), done.clone());
        let owner = thread::spawn(move || {
            stage(&o, &r, [&bg, &d], 1);
            stage(&o, &r, [&bg, &d], 2);
            assert!(o.bufs[0].full());
            for _ in 0..STAGING_RING {
                if let Rotate::HandOff(i) = r.rotate(|| {}) {
                    o.hand_off(i);
                    r.owner_handed_off(i);
                }
            }
            stage(&o, &r, [&bg, &d], 3);
        });
        let (b, r) = (idx.clone(), ring.clone());
        let background = thread::spawn(move || {
            if r.claim(0) {
                b.hand_off(0);
                r.handed_off(0);
            }
        });
        let every: [usize; STAGING_RING] = std::array::from_fn(|i| i);
        if count_then_whole(&idx, &every, [&begun, &done]) {
            cell_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        owner.join().unwrap();
        background.join().unwrap();
        idx.collect_all();
    }

    /// Case 6: the cell spoiled by one allocation more than it counts
    /// (`CELL_ALLOCS_MAX`; here a bound of 1, [`Buf::with_spoilers`])
    /// while a count lookup reads it: in one buffer of four slots, op 1
    /// is plain, ops 2 and 3 allocations (op 3 the one too many: the
    /// state becomes `CELL_SPOILED`, its `allocs` word is not written)
    /// and op 4 plain (folded into a spoiled cell: nothing changes). The
    /// reader ([`count_then_whole`]) takes the cell's sum of a prefix, or
    /// scans the slots, and finds exactly a prefix of the ops either way.
    ///
    /// Loom reports: the fold's early return on a spoiled state dropped
    /// (op 4 makes a cell of itself alone), the reader testing
    /// `CELL_HAS_OPS` before `CELL_SPOILED` (a spoiled cell read as
    /// empty), and the bound not checked (the count, a field as wide as
    /// the bound, wraps: the cell says no allocation). It passes the
    /// state stored Relaxed (op 2's state, the last an allocation, is
    /// scanned for with an older `len`): cases 7 and 8 report that.
    #[test]
    fn run_view_hot_cell_spoiled_past_the_allocations_max() {
        static CELL_READS: StdAtomicUsize = StdAtomicUsize::new(0);
        let alloc_ops = 0b0110;
        model_bounded(2, move || {
            one_life_counted(4, &CELL_READS, || {
                Buf::new(true, HOT, 4, alloc_ops).with_spoilers(0, 0, 1)
            })
        });
        cell_path_taken(&CELL_READS, alloc_ops);
    }

    /// Case 7: the cell spoiled by an op of another kind (with an
    /// extent_op: neither a plain op nor an allocation) while a count
    /// lookup reads it: ops 1 and 2 plain, op 3 carries an extent_op, op
    /// 4 plain; the reader as in case 6 (a cell never sums an op with an
    /// extent_op: [`assert_whole`]).
    ///
    /// Loom reports: the fold's early return on a spoiled state dropped,
    /// the reader testing `CELL_HAS_OPS` before `CELL_SPOILED`, the state
    /// stored Relaxed (a reader that takes op 2's state with an older
    /// `len` counts op 1 without its `num_bytes`), and the extent_op not
    /// spoiling the cell. Cases 6 to 8 take under a second each.
    #[test]
    fn run_view_hot_cell_spoiled_by_an_extent_op() {
        static CELL_READS: StdAtomicUsize = StdAtomicUsize::new(0);
        let alloc_ops = 0;
        model_bounded(2, move || {
            one_life_counted(4, &CELL_READS, || {
                Buf::new(true, HOT, 4, alloc_ops).with_spoilers(0b0100, 0, CELL_ALLOCS_MAX)
            })
        });
        cell_path_taken(&CELL_READS, alloc_ops);
    }

    /// Case 7 with an op of another shape: ops 1 and 2 plain, op 3 a
    /// plain op of another size (`same` false), op 4 plain. Loom reports
    /// the mutations of case 7 but the extent_op's, and the size left
    /// out of `same` (op 3 counted in the cell of op 1's size: a cell of
    /// two sizes).
    #[test]
    fn run_view_hot_cell_spoiled_by_another_shape() {
        static CELL_READS: StdAtomicUsize = StdAtomicUsize::new(0);
        let alloc_ops = 0;
        model_bounded(2, move || {
            one_life_counted(4, &CELL_READS, || {
                Buf::new(true, HOT, 4, alloc_ops).with_spoilers(0, 0b0100, CELL_ALLOCS_MAX)
            })
        });
        cell_path_taken(&CELL_READS, alloc_ops);
    }

    /// Cases 6 and 7: the owner stages ops 1 to `ops` of [`HOT`] in
    /// buffer 0 (made by `buf`, one life: no hand-off) while a count
    /// lookup and a whole lookup after it read it ([`count_then_whole`]).
    fn one_life_counted(ops: u64, cell_reads: &StdAtomicUsize, buf: impl Fn() -> Buf) {
        let idx = Arc::new(Index::with_bufs(Vec::new(), [0; 3], buf));
        let ring = Arc::new(Ring::new());
        let begun = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let (o, r, bg, d) = (idx.clone(), ring.clone(), begun.clone(), done.clone());
        let owner = thread::spawn(move || {
            for k in 1..=ops {
                stage(&o, &r, [&bg, &d], k);
            }
        });
        if count_then_whole(&idx, &[0], [&begun, &done]) {
            cell_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        owner.join().unwrap();
        idx.collect_all();
    }

    /// Case 4: the owner stages ops 1 and 2 of [`HOT`] in buffer 0 (its
    /// first life), hands the full buffer off itself (as
    /// the owner's own hand-off does: the ops into a run and view 1, the
    /// buffer emptied, in one change; then the ring's `activate` fence)
    /// and stages ops 3 and 4 in it again (its second life); the ops of
    /// `alloc_ops` are allocations, the others plain ops. A count lookup
    /// reads the view and buffer 0's cell (or its slots, if it scans) in
    /// its window, then the view's sums (the other buffers never hold an
    /// op: it leaves them out). What it counts (the ops, as their sum; how
    /// many are allocations; the latest allocation, its stamp taken from
    /// the slot the reader copied) is what the first `n` ops hold, for an
    /// `n` from the ops done before it began to those begun before it
    /// ended; each op is found once, and a cell it takes is whole. A
    /// lookup of the whole head after it finds at least those `n` ops.
    ///
    /// Loom reports (at preemption bound 2; `docs/design.md`): the
    /// `allocs` word loaded before the state (a second life's state with
    /// the first life's word of the same count), its count not compared
    /// with the state's, the `CELL_LAST_ALLOC` and the slot-below-`len`
    /// checks both dropped, the latest allocation's slot copied after the
    /// window, the unpublished last op counted, and the state stored or
    /// loaded Relaxed. It passes, and cannot report, these, each of which
    /// another part of the protocol covers: the `allocs` word stored after
    /// the state (`len`, loaded after the state, Acquire, orders the word
    /// of every allocation whose slot is published, and an unpublished one
    /// is the last op, which `CELL_LAST_ALLOC` scans for), or loaded
    /// between the state and `len` (the state's Acquire orders it: a newer
    /// word has another count; in both, a word of another life means a
    /// reset, a change the window sees); either of the `CELL_LAST_ALLOC` and the
    /// slot-below-`len` checks dropped (each catches what the other
    /// does: an unpublished allocation is the latest, at a slot not below
    /// `len`); `len` loaded Relaxed or before the state (the state's
    /// Acquire orders every op but its last, and an older `len` only
    /// leaves out more); `num_bytes` stored after the first state (still
    /// before `len` and every later state, which order it for a reader
    /// that takes a sum). With the `allocs` word stored after the state
    /// and `len` loaded Relaxed too, it reports. The ring's `activate` fence is not needed here (the owner
    /// empties the buffer itself, in its own bracket, before it reuses
    /// it): case 2 checks that fence.
    /// How many of a case's executions took a whole cell's sum, with an
    /// allocation in it where the case has any (a std atomic: it counts
    /// across loom's executions, which it does not model).
    type StdAtomicUsize = std::sync::atomic::AtomicUsize;

    /// After a case's executions: some took the cell's sum (with an
    /// allocation, where the case has them). Without this, a model whose
    /// reader always scanned would pass every case.
    fn cell_path_taken(cell_reads: &StdAtomicUsize, alloc_ops: u64) {
        let n = cell_reads.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            n > 0,
            "no execution read a whole cell (allocations {alloc_ops:#b})"
        );
    }

    fn allocations_counted(alloc_ops: u64, cell_reads: &StdAtomicUsize) {
        let idx = Arc::new(Index::with_bufs(Vec::new(), [0; 3], || {
            Buf::new(true, HOT, 2, alloc_ops)
        }));
        let ring = Arc::new(Ring::new());
        let begun = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let (o, r, bg, d) = (idx.clone(), ring.clone(), begun.clone(), done.clone());
        let owner = thread::spawn(move || {
            for k in 1..=4 {
                stage(&o, &r, [&bg, &d], k);
                if k == 2 {
                    assert!(o.bufs[0].full());
                    assert_eq!(r.rotate(|| {}), Rotate::Moved);
                    assert!(r.claim(0));
                    o.hand_off(0);
                    r.owner_handed_off(0);
                }
            }
        });
        if count_then_whole(&idx, &[0], [&begun, &done]) {
            cell_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        owner.join().unwrap();
        idx.collect_all();
    }

    /// The reader of cases 4 to 7: a count lookup of [`HOT`] (the view's
    /// sum, and the cells or slots of buffers `bufs`, in one window), then
    /// a lookup of the whole head (the view's runs and the slots), while
    /// the other threads stage ops (`begun` before each append, `done`
    /// after it), hand buffers off and reuse them. What it checks is
    /// stated without the cells: the count holds exactly the first `n`
    /// ops (each once; their sum, how many are allocations and the latest
    /// allocation's stamp, from the slot the reader copied), for some `n`
    /// from the ops done before it began to those begun before it ended
    /// (a spoiled cell is scanned, and the scan obeys the same rule); a
    /// cell it takes is whole; and the whole lookup right after holds the
    /// first `m` ops, for an `m` from that `n` to the ops begun before it
    /// ended. Returns whether the count took a cell's sum of some ops (of
    /// an allocation among them, where the buffers have any).
    fn count_then_whole(idx: &Index, bufs: &[usize], [begun, done]: [&AtomicU64; 2]) -> bool {
        let alloc_ops = idx.bufs[0].alloc_ops;
        let done_before = done.load(Ordering::SeqCst);
        let pinned = idx.epochs.pin();
        let (v, staged) = idx.changes.read_stable(|| {
            // The view first, as `lookup_window` reads it.
            let v = idx.read_view();
            (
                v,
                bufs.iter()
                    .map(|&i| idx.bufs[i].read_count())
                    .collect::<Vec<_>>(),
            )
        });
        let mut took_cell = false;
        let in_runs = Tally::of(idx.hot_in_view(v), alloc_ops);
        let found = staged.iter().fold(in_runs, |found, &counted| {
            assert_whole(counted, &idx.bufs[0]);
            if let Counted::Cell(tally, _) = counted {
                took_cell |= tally.ops != 0 && (alloc_ops == 0 || tally.allocs > 0);
            }
            found.merge(counted.tally(alloc_ops))
        });
        drop(pinned);
        let begun_after = begun.load(Ordering::SeqCst);
        let counted = prefix_of(found, alloc_ops, done_before..=begun_after);
        assert!(
            counted.is_some(),
            "found {found:?} (runs {in_runs:?}, staged {staged:?}), done before \
             {done_before}, begun before the end {begun_after}"
        );
        // A lookup of the whole head right after (`lookup_with` without
        // sums: the view's runs and the slots) finds every op the count
        // found: a count never holds an op whose slot is unpublished.
        let pinned = idx.epochs.pin();
        let (v, slots) = idx.changes.read_stable(|| {
            let v = idx.read_view();
            (v, bufs.iter().fold(0, |all, &i| all | idx.bufs[i].read()))
        });
        let whole = Tally::of(idx.ops_in_view(v), alloc_ops).merge(Tally::of(slots, alloc_ops));
        drop(pinned);
        let begun_after = begun.load(Ordering::SeqCst);
        assert!(
            prefix_of(whole, alloc_ops, counted.unwrap()..=begun_after).is_some(),
            "the count found {found:?}, the lookup after it {whole:?} (begun before \
             its end {begun_after})"
        );
        took_cell
    }

    /// The `n` in `range` whose first `n` ops `found` counts, if any.
    fn prefix_of(found: Tally, alloc_ops: u64, range: RangeInclusive<u64>) -> Option<u64> {
        range
            .into_iter()
            .find(|&n| found == Tally::of((1 << n) - 1, alloc_ops))
    }

    /// Case 3: a reader whose optimistic attempt a change spoils holds a
    /// quiet window and completes: the writer's changes (each writes a
    /// pair of words, relaxed) are never seen half done, and in the quiet
    /// window a read retries at most once per writer that had already
    /// begun (here one writer: at most `READ_OPTIMISTIC_MAX + 2`
    /// attempts).
    #[test]
    fn run_view_quiet_window_holds_writers_off() {
        const CHANGES: u64 = 3;
        model(|| {
            let changes = Arc::new(ChangeCounters::default());
            let pair = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
            let (c, p) = (changes.clone(), pair.clone());
            let writer = thread::spawn(move || {
                for k in 1..=CHANGES {
                    c.begin_change();
                    p[0].store(k, Ordering::Relaxed);
                    p[1].store(k, Ordering::Relaxed);
                    c.end_change();
                }
            });
            let (a, b) = changes.read_stable(|| {
                (
                    pair[0].load(Ordering::Relaxed),
                    pair[1].load(Ordering::Relaxed),
                )
            });
            assert_eq!(a, b, "a change read half done");
            assert!(
                changes.read_attempts_max() <= READ_OPTIMISTIC_MAX as u64 + 2,
                "{} attempts",
                changes.read_attempts_max()
            );
            writer.join().unwrap();
        });
    }
}
