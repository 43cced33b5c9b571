//! Delayed-ref stores: where ops wait between ingest and commit.
//!
//! Two implementations of one trait, [`DelayedRefStore`], with identical
//! behaviour (both merge through [`crate::head`], whose merge is
//! commutative, so their results depend only on the set of ops queued):
//! - [`mutex::MutexStore`]: the baseline, btrfs's shape — one lock around
//!   a map of heads, each with a map of refs;
//! - [`lockfree::LockFreeStore`]: per-CPU shards absorbing ops in
//!   cache-resident staging buffers, handed off in sorted, merged batches to
//!   an epoch-reclaimed crossbeam-skiplist index; no lock on the ingest
//!   path.
//!
//! # Transactions
//!
//! The store holds the *live* transaction, into which ingest goes, and
//! during a commit the *frozen* one. [`DelayedRefStore::freeze`] makes the
//! live transaction frozen and opens a new live one; new ops go to the new
//! one and no op is lost or counted twice. The frozen transaction stays
//! visible to [`DelayedRefStore::pending`] until
//! [`DelayedRefStore::release`], which the engine calls while holding its
//! tree write lock, so a lookup sees each op exactly once: either still
//! pending or applied in the tree. Heads held back by a seq barrier are
//! requeued into the live transaction by `release`. (A commit applying in
//! steps releases at its end; meanwhile the engine reads the extents it
//! applied already with [`DelayedRefStore::pending_live`], see
//! `refd_core::engine`, "Applying in steps".)
//!
//! # For a reader of delayed-ref.c
//!
//! The path of one op, with the kernel function each step stands for:
//!
//! | step | refd | btrfs |
//! |---|---|---|
//! | queue an op | `EngineHandle::add_batch` → `IngestHandle::add_batch`; lock-free: `LockFreeHandle::append` writes the op's words to the shard's staging buffer | `btrfs_add_delayed_tree_ref` / `btrfs_add_delayed_data_ref` / `btrfs_add_delayed_extent_op` |
//! | merge at insert | the hand-off thread (or the ingesting thread, when the background is behind) sorts a full buffer and folds each extent's ops into one head (`packed::build_run_noting`; refs of one `(key, seq)` summed by `packed::merge_refs`); the mutex store does it at `add` | `add_delayed_ref_head` (`update_existing_head_ref`) and `insert_delayed_ref` |
//! | keep merging | compaction merges runs of a level into one (`TxnIndex::maybe_compact`, `packed::merge_cursors`) | nothing later: one head per bytenr and one node per (key, seq) from insert; one key's nodes of several seqs wait for `btrfs_merge_delayed_refs` at run time |
//! | look up | [`DelayedRefStore::pending`] / [`DelayedRefStore::pending_summary`] | `btrfs_find_delayed_ref_head` (in `btrfs_lookup_extent_info`) |
//! | start a commit | [`DelayedRefStore::seal`], then the merge of the sealed transaction ([`DelayedRefStore::sealed_heads`]) | the transaction commit's `btrfs_run_delayed_refs(trans, U64_MAX)` |
//! | run a head | `crate::run::run_head_with`: `Head::run_refs` holds the whole head back if a ref's seq is at or above the lowest held barrier, else merges its refs across seqs into net changes; then the new extent item (inserted, updated or freed) is computed, and the engine applies it | `btrfs_merge_delayed_refs`, `btrfs_check_delayed_seq`, `run_one_delayed_ref`, `__btrfs_free_extent` (the kernel merges tree-block heads only, below the lowest seq, and may run part of a head: `docs/design.md`, "Running a head") |
//! | held back by a seq | [`DelayedRefStore::release`] requeues them into the live transaction | the head stays in the rbtree with the refs not yet run (earlier ones may have run) |
//!
//! The head types. The kernel has a head, a tree or data ref node and an
//! extent_op; refd has [`crate::head::Head`], [`crate::head::HeadSummary`]
//! and [`crate::head::DelayedRef`] in memory and, in the lock-free store
//! only, the forms they take in its staging buffers and runs:
//!
//! | type | what it is | btrfs |
//! |---|---|---|
//! | [`crate::head::Head`] | a head with its refs, owned: what lookups and the commit get | `btrfs_delayed_ref_head` and its ref rbtree |
//! | [`crate::head::HeadSummary`] | a head without its refs | the head's counters and flags |
//! | [`crate::head::DelayedRef`] | one ref: key, seq, signed `ref_mod` | `btrfs_delayed_ref_node` |
//! | `packed::Staged` (a type alias: an array of words) | one op's words in a staging buffer, not merged yet | (none: the kernel merges at once) |
//! | `packed::PackedHead`, `packed::PackedRef` | a head and a ref as stored in a run's chunk (40 and 48 bytes, no pointers) | (none) |
//! | `packed::RawHead` | a stored head borrowed from its chunk, not unpacked: compaction copies it as it is | (none) |
//! | `packed::HeadRef` | a stored head borrowed with its summary unpacked: what lookups and a merge of several sources read | (none) |
//! | `packed::Merged` | a merge's output: one source's `RawHead` passed through, or several sources' heads combined | (none) |
//!
//! `Staged` lets ingest write an op as plain words, without a lock or an
//! allocation. The packed forms keep a run small (bytes per pending ref)
//! and free of pointers, and the borrowed forms let compaction and lookups
//! read and copy runs without allocating per head. Fewer types (issue 13's
//! readability item) is not done.

pub(crate) mod fence;
pub(crate) mod gate;
pub mod handoff;
pub mod lockfree;
pub mod merge_bench;
pub mod mutex;
pub(crate) mod packed;
pub(crate) mod window;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::head::{Head, HeadSummary};
use crate::model::{Op, OpError};

/// Errors of a delayed-ref store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The op is malformed.
    #[error(transparent)]
    Op(#[from] OpError),
    /// Every shard is claimed by a live handle.
    #[error("all {shards} ingest shards are in use; drop a handle or configure more shards")]
    ShardsExhausted {
        /// Configured shards.
        shards: usize,
    },
}

/// Pending work counted over a merged snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingStats {
    /// Heads with pending work.
    pub heads: usize,
    /// Delayed refs after merging at insert (distinct `(bytenr, key, seq)`
    /// with a non-zero ref_mod).
    pub refs: usize,
}

/// One ingest handle: a thread's way in. For the lock-free store it owns a
/// per-CPU shard, so keep one per ingest thread.
pub trait IngestHandle: Send {
    /// Queue one op. Returns once the op is visible to lookups and will be
    /// in the next frozen transaction (or the one after, never lost).
    fn add(&mut self, op: &Op) -> Result<(), StoreError>;

    /// Queue several ops; all are checked before any is queued.
    fn add_batch(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            op.check()?;
        }
        for op in ops {
            self.add(op)?;
        }
        Ok(())
    }
}

/// A delayed-ref store. See the module doc for the transaction protocol.
pub trait DelayedRefStore: Send + Sync {
    /// Ingest handle type.
    type Handle<'a>: IngestHandle
    where
        Self: 'a;

    /// Short name for reports ("lockfree", "mutex").
    fn name(&self) -> &'static str;

    /// A new ingest handle.
    fn handle(&self) -> Result<Self::Handle<'_>, StoreError>;

    /// The merged pending head of `bytenr` over the frozen (until released)
    /// and live transactions and requeued heads; `None` if nothing is
    /// pending.
    fn pending(&self, bytenr: u64) -> Option<Head>;

    /// [`DelayedRefStore::pending`] without the sealed transaction: the
    /// live transaction and the heads requeued into it only. Between a
    /// seal and its release this leaves out the ops being committed; with
    /// no sealed transaction it is `pending`. The engine reads it while a
    /// commit's apply runs in steps, for extents whose effects are in the
    /// tree already (see `refd_core::engine`, "Applying in steps"). Only
    /// meaningful while no seal or release runs (the engine's commit lock).
    fn pending_live(&self, bytenr: u64) -> Option<Head>;

    /// The summary of [`DelayedRefStore::pending`]'s head: all a lookup of
    /// an extent's count needs, which a store may get without merging the
    /// head's refs (a hot extent's refs are spread over many runs in the
    /// lock-free store).
    fn pending_summary(&self, bytenr: u64) -> Option<HeadSummary> {
        self.pending(bytenr).map(|h| h.summary)
    }

    /// The summary of [`DelayedRefStore::pending_live`]'s head.
    fn pending_live_summary(&self, bytenr: u64) -> Option<HeadSummary> {
        self.pending_live(bytenr).map(|h| h.summary)
    }

    /// Every pending head, merged, sorted by bytenr (expensive; for tools,
    /// tests and stats).
    fn pending_all(&self) -> Vec<Head>;

    /// Counts over [`DelayedRefStore::pending_all`].
    fn stats(&self) -> PendingStats {
        let all = self.pending_all();
        PendingStats {
            heads: all.len(),
            refs: all.iter().map(Head::refs_changing).sum(),
        }
    }

    /// One line on the store's internal layout (for benchmark reports).
    fn layout(&self) -> String {
        String::new()
    }

    /// Waits until the background work asked for so far (hand-offs,
    /// compaction) is done: benchmark reports of the store once idle. A
    /// store without background threads returns at once.
    fn settle(&self) {}

    /// Seal the live transaction and open a new one: every op whose `add`
    /// returned before this call is in the sealed transaction, every op
    /// whose `add` starts after it returns in the new live transaction (an
    /// add in progress meanwhile may land in either). Cheap (no merging,
    /// and it does not wait for ingesters: [`DelayedRefStore::sealed_heads`]
    /// does), so a durable layer can cut its log atomically with it
    /// without stalling ingest. Only one commit at a time: the engine
    /// serializes callers.
    fn seal(&self);

    /// The sealed transaction's heads merged and sorted by bytenr (no-op
    /// heads dropped), once the adds in progress at the seal have
    /// finished. Called once after [`DelayedRefStore::seal`], while ingest
    /// goes on into the new live transaction.
    fn sealed_heads(&self) -> Vec<Head>;

    /// [`DelayedRefStore::seal`] then [`DelayedRefStore::sealed_heads`].
    fn freeze(&self) -> Vec<Head> {
        self.seal();
        self.sealed_heads()
    }

    /// End the frozen transaction: hide it from lookups and requeue `held`
    /// heads into the live transaction. Called under the engine's tree write
    /// lock.
    fn release(&self, held: Vec<Head>);

    /// Free what the last release hid (called outside the tree lock, before
    /// the next freeze). Stores that free inside `release` need nothing.
    /// Optional: a store must stay correct when it is never called (the
    /// lock-free store empties a reused index in `seal` if it was not).
    fn reclaim_released(&self) {}

    /// Queue whole heads into the live transaction, as a commit requeues
    /// heads held by a seq barrier: for recovery, which reloads the heads a
    /// durable commit held. Their stamps come from an earlier clock, so
    /// they are re-stamped from this store's clock in their old order
    /// ([`restamp`]). Call it before any op is added, so that the requeued
    /// heads stay older than every op. Each head's `total_ref_mod` is the
    /// sum of its refs' `ref_mod`s, as in every head a store builds
    /// ([`DelayedRefStore::pending_summary`] relies on it;
    /// [`crate::engine::Engine::requeue`] checks it).
    fn requeue(&self, heads: Vec<Head>);
}

/// Re-stamp `heads` from `clock`: every distinct non-zero stamp gets a
/// fresh one, in the order of the old stamps, so that "latest allocation
/// wins" and extent_op ordering are kept among them.
pub fn restamp(heads: &mut [Head], clock: &StampClock) {
    let mut old: Vec<u64> = heads
        .iter()
        .flat_map(|h| {
            let s = &h.summary;
            let e = s.extent_op.as_ref();
            [
                s.alloc_stamp,
                e.map_or(0, |e| e.flags_stamp),
                e.and_then(|e| e.key.map(|k| k.0)).unwrap_or(0),
            ]
        })
        .filter(|&s| s != 0)
        .collect();
    old.sort_unstable();
    old.dedup();
    let new: Vec<u64> = old.iter().map(|_| clock.next()).collect();
    let map = |s: u64| {
        if s == 0 {
            0
        } else {
            new[old.binary_search(&s).expect("every stamp was collected")]
        }
    };
    for h in heads {
        let s = &mut h.summary;
        s.alloc_stamp = map(s.alloc_stamp);
        if let Some(e) = s.extent_op.as_mut() {
            e.flags_stamp = map(e.flags_stamp);
            if let Some(k) = e.key.as_mut() {
                k.0 = map(k.0);
            }
        }
    }
}

/// The global stamp counter ordering allocations and extent_ops (see
/// [`crate::head`]). Only those ops touch it.
#[derive(Debug, Default)]
pub struct StampClock(AtomicU64);

impl StampClock {
    /// A fresh stamp.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The stamp of `op`: a fresh one for an allocation or an op carrying
    /// an extent_op, 0 otherwise.
    pub fn stamp(&self, op: &Op) -> u64 {
        if op.is_stamped() {
            self.next()
        } else {
            0
        }
    }
}

/// Merge `heads` (any order, duplicates allowed) into one head per bytenr,
/// sorted, dropping no-op heads: for a final merge (every source of the
/// bytenrs in it), since a no-op head still carries the shapes its ops
/// named ([`merge_heads_keeping_all`]).
pub fn merge_heads(heads: Vec<Head>) -> Vec<Head> {
    let mut out = merge_heads_keeping_all(heads);
    out.retain(|h| !h.is_noop());
    out
}

/// Merge `heads` into one head per bytenr, sorted, keeping every head:
/// one whose refs cancelled and that has no allocation or extent_op is a
/// no-op alone, but the size and kind its ops named (`mixed`) still count
/// when it meets other ops of its extent later (a head of a held or
/// requeued transaction does).
pub fn merge_heads_keeping_all(mut heads: Vec<Head>) -> Vec<Head> {
    heads.sort_by_key(|h| h.bytenr);
    let mut out: Vec<Head> = Vec::with_capacity(heads.len());
    for h in heads {
        match out.last_mut() {
            Some(last) if last.bytenr == h.bytenr => last.merge(&h),
            _ => out.push(h),
        }
    }
    out
}
