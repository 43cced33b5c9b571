//! Delayed-ref heads: the merged pending state of one extent.
//!
//! A [`Head`] is what btrfs keeps in a `btrfs_delayed_ref_head` and its ref
//! rbtree: a [`HeadSummary`] (`total_ref_mod`, `must_insert_reserved`,
//! `extent_op`, size and kind) and the delayed refs ordered by
//! `(RefKey, seq)` with their signed `ref_mod`.
//!
//! # Merging is a commutative monoid
//!
//! Every field merges with an operation that is commutative and
//! associative, so the merged state depends only on the *set* of ops
//! queued, never on the order in which shards, batches or runs are
//! combined. That is what lets the per-CPU lock-free store, the mutex
//! baseline and the sequential model agree exactly:
//!
//! - refs with the same `(key, seq)` merge at insert by signed sum, which is
//!   btrfs `insert_delayed_ref()`: same action adds, opposite actions
//!   cancel, a zero sum removes the ref. Refs with different seq stay apart
//!   (they are merged when the head is run, see [`Head::run_refs`]);
//! - `total_ref_mod` is a sum;
//! - `extent_op` flags are OR-ed; a key update is last-writer-wins by a
//!   global stamp (btrfs replaces the key with the newer one); an
//!   extent_op applies only to the life it was queued in (see
//!   [`PendingExtentOp`]);
//! - an allocation (`ADD_EXTENT`) sets `must_insert_reserved` and defines
//!   size and kind of the new extent; when a bytenr is freed and allocated
//!   again before its head runs, the *latest* allocation (highest stamp)
//!   wins, like `update_existing_head_ref()` which sets
//!   `must_insert_reserved` again and takes the new `num_bytes`;
//! - the head counts its allocations (a sum) and marks itself `mixed` when
//!   its ops name more than one size or kind (with or without an
//!   allocation); when run, a head without an allocation must not be
//!   `mixed`, and one with an allocation may be only where an earlier life
//!   can own the other shape (see [`crate::run`]). Neither needs the order
//!   of the ops, so both stay a commutative merge.
//!
//! Stamps come from one global counter that is touched only by
//! allocations and extent_ops (rare), so real-time order is respected for
//! exactly the fields that need an order.

use crate::model::{Action, DiskKey, ExtentKind, Op, RefKey};

/// One delayed ref of a head: a backref key, the seq it was queued with,
/// its merged signed count (`ref_mod` with the sign of the action) and the
/// gross count of drops merged into it.
///
/// `drops` is what merging at insert would otherwise lose: a drop and an
/// add of one key cancel in `ref_mod`, but when the head also re-allocates
/// the extent, the run must know whether the previous life's backrefs were
/// dropped ([`crate::run`]). So a ref whose `ref_mod` cancelled to 0 stays
/// in the head while `drops != 0`; it changes no count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DelayedRef {
    /// Backref key.
    pub key: RefKey,
    /// Tree-mod-log seq (0 = none).
    pub seq: u64,
    /// Signed merged count: > 0 adds, < 0 drops.
    pub ref_mod: i64,
    /// Drops merged into this ref (each `DROP` counts 1), `>= -ref_mod`;
    /// a ref has `ref_mod != 0` or `drops != 0`.
    pub drops: u64,
}

impl DelayedRef {
    /// A ref with this `ref_mod` and the drops it implies (`-ref_mod` if
    /// negative): one op's, or several of one action.
    pub fn of_mod(key: RefKey, seq: u64, ref_mod: i64) -> DelayedRef {
        DelayedRef {
            key,
            seq,
            ref_mod,
            drops: if ref_mod < 0 {
                ref_mod.unsigned_abs()
            } else {
                0
            },
        }
    }

    /// True when the ref is kept in a head: it changes a count or records
    /// drops.
    pub fn is_kept(&self) -> bool {
        self.ref_mod != 0 || self.drops != 0
    }
}

/// Pending extent_op of a head.
///
/// An extent_op belongs to the life of the extent it was queued in: when a
/// bytenr is freed and allocated again before its head runs, an extent_op
/// queued for the old life must not reach the new extent. Every extent_op
/// carries a stamp, and at run time only those stamped at or after the
/// latest allocation apply. `flags_stamp` is the latest stamp of an
/// extent_op setting flags; that is exact because a single flag
/// ([`crate::model::EXTENT_OP_FLAGS_SETTABLE`]) can be set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingExtentOp {
    /// Flags to OR into the extent item.
    pub flags_to_set: u64,
    /// Stamp of the latest extent_op that set flags (0 = none).
    pub flags_stamp: u64,
    /// New tree block key and the stamp that orders key updates.
    pub key: Option<(u64, DiskKey)>,
}

const _: () = assert!(
    crate::model::EXTENT_OP_FLAGS_SETTABLE.count_ones() == 1,
    "one flags_stamp per head is exact only for a single settable flag"
);

impl PendingExtentOp {
    /// Merge (commutative, associative).
    pub fn merge(self, other: PendingExtentOp) -> PendingExtentOp {
        let key = match (self.key, other.key) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        PendingExtentOp {
            flags_to_set: self.flags_to_set | other.flags_to_set,
            flags_stamp: self.flags_stamp.max(other.flags_stamp),
            key,
        }
    }

    /// The part that applies to the life allocated at `alloc_stamp` (0: no
    /// allocation pending, everything applies).
    pub fn for_life(self, alloc_stamp: u64) -> Option<PendingExtentOp> {
        let flags = self.flags_stamp >= alloc_stamp && self.flags_to_set != 0;
        let key = self.key.filter(|(stamp, _)| *stamp >= alloc_stamp);
        (flags || key.is_some()).then_some(PendingExtentOp {
            flags_to_set: if flags { self.flags_to_set } else { 0 },
            flags_stamp: if flags { self.flags_stamp } else { 0 },
            key,
        })
    }
}

/// Most allocations of one extent in one transaction a head counts (the
/// 16 bits a packed head keeps the count in); the sum saturates here.
/// A head that reaches it cannot tell how many lives must end in it, so
/// it is refused ([`crate::run::RunError::TooManyAllocations`]) rather
/// than checked against a count that may be short.
pub const ALLOCS_COUNTED_MAX: u16 = u16::MAX;

const _: () = assert!(
    ALLOCS_COUNTED_MAX == u16::MAX,
    "HeadSummary::merge saturates the count at its type's maximum"
);

/// Head-level accounting of pending ops on one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadSummary {
    /// Extent size: of the latest allocation if any, else as named by the
    /// ref ops (meaningful when `shape_known`).
    pub num_bytes: u64,
    /// Extent kind, same rule as `num_bytes`.
    pub kind: ExtentKind,
    /// False when only extent_ops are queued (they do not name a shape).
    pub shape_known: bool,
    /// The ops (all but extent_op-only ones) named more than one size or
    /// kind. Without an allocation the head is then refused; with one, an
    /// earlier life must be able to own the other shape
    /// ([`crate::run`]).
    pub mixed: bool,
    /// Stamp of the latest allocation; non-zero means
    /// `must_insert_reserved`.
    pub alloc_stamp: u64,
    /// Allocations (`ADD_EXTENT` ops) merged into the head, saturating at
    /// [`ALLOCS_COUNTED_MAX`]: every one but the latest starts a life that
    /// must end in the same transaction.
    pub allocs: u16,
    /// Sum of the ref_mod of every op queued on the head.
    pub total_ref_mod: i64,
    /// Pending extent_op, if any.
    pub extent_op: Option<PendingExtentOp>,
}

impl HeadSummary {
    /// The summary of one op. `stamp` must be non-zero for an allocation or
    /// an op carrying an extent_op and is ignored otherwise.
    pub fn of_op(op: &Op, stamp: u64) -> HeadSummary {
        let is_alloc = op.action == Action::AddExtent;
        debug_assert!(!is_alloc || stamp != 0, "allocation without a stamp");
        let extent_op = op.extent_op.map(|e| {
            debug_assert!(stamp != 0, "extent_op without a stamp");
            PendingExtentOp {
                flags_to_set: e.flags_to_set,
                flags_stamp: if e.flags_to_set != 0 { stamp } else { 0 },
                key: e.key.map(|k| (stamp, k)),
            }
        });
        HeadSummary {
            num_bytes: op.num_bytes,
            kind: op.kind,
            shape_known: op.action != Action::UpdateHead,
            mixed: false,
            alloc_stamp: if is_alloc { stamp } else { 0 },
            allocs: u16::from(is_alloc),
            total_ref_mod: op.ref_mod(),
            extent_op,
        }
    }

    /// True when an allocation is pending (`must_insert_reserved`).
    pub fn must_insert_reserved(&self) -> bool {
        self.alloc_stamp != 0
    }

    /// btrfs `ref_mod`: refd runs a head as a whole, so it always equals
    /// `total_ref_mod` (btrfs decrements `ref_mod` ref by ref while running).
    pub fn ref_mod(&self) -> i64 {
        self.total_ref_mod
    }

    /// Merge two summaries (commutative, associative).
    /// `a` and `b` merged (`None`: nothing).
    pub fn merge_opt(a: Option<HeadSummary>, b: Option<HeadSummary>) -> Option<HeadSummary> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.merge(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn merge(self, o: HeadSummary) -> HeadSummary {
        let total_ref_mod = self.total_ref_mod + o.total_ref_mod;
        let extent_op = match (self.extent_op, o.extent_op) {
            (Some(a), Some(b)) => Some(a.merge(b)),
            (a, b) => a.or(b),
        };
        // Two shapes were named if either side named two, or both named
        // one (a side's shape is then the one it named) and they differ.
        let mixed = self.mixed
            || o.mixed
            || (self.shape_known
                && o.shape_known
                && (self.num_bytes, self.kind) != (o.num_bytes, o.kind));
        let shape_known = self.shape_known || o.shape_known;
        let (num_bytes, kind, alloc_stamp) = if self.alloc_stamp != 0 || o.alloc_stamp != 0 {
            // The latest allocation defines the extent.
            let w = if self.alloc_stamp >= o.alloc_stamp {
                self
            } else {
                o
            };
            (w.num_bytes, w.kind, w.alloc_stamp)
        } else {
            match (self.shape_known, o.shape_known) {
                (true, false) => (self.num_bytes, self.kind, 0),
                (false, true) => (o.num_bytes, o.kind, 0),
                // Both or neither named a shape: keep a deterministic value
                // so the merge stays commutative.
                _ => {
                    let (nb, k) = (self.num_bytes, self.kind).min((o.num_bytes, o.kind));
                    (nb, k, 0)
                }
            }
        };
        HeadSummary {
            num_bytes,
            kind,
            shape_known,
            mixed,
            alloc_stamp,
            allocs: self.allocs.saturating_add(o.allocs),
            total_ref_mod,
            extent_op,
        }
    }
}

/// The merged pending state of one extent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Head {
    /// Extent address.
    pub bytenr: u64,
    /// Head accounting.
    pub summary: HeadSummary,
    /// Delayed refs sorted by `(key, seq)`, each kept
    /// ([`DelayedRef::is_kept`]).
    pub refs: Vec<DelayedRef>,
}

/// What running a head's refs gives, see [`Head::run_refs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunRefs {
    /// Refs merged across seq: the net change per backref key (non-zero),
    /// sorted by key.
    Ready(Vec<(RefKey, i64)>),
    /// A ref is at or above the lowest active seq barrier: the head must be
    /// skipped and stay queued (`btrfs_check_delayed_seq`).
    Held {
        /// The seq that is held back.
        seq: u64,
        /// The lowest active barrier.
        barrier: u64,
    },
}

impl Head {
    /// A head holding one op.
    pub fn of_op(op: &Op, stamp: u64) -> Head {
        let mut refs = Vec::new();
        if let Some(key) = op.key {
            refs.push(DelayedRef::of_mod(key, op.seq, op.ref_mod()));
        }
        Head {
            bytenr: op.bytenr,
            summary: HeadSummary::of_op(op, stamp),
            refs,
        }
    }

    /// Queue one more op (btrfs `add_delayed_ref_head()` +
    /// `insert_delayed_ref()`).
    pub fn absorb(&mut self, op: &Op, stamp: u64) {
        debug_assert_eq!(op.bytenr, self.bytenr);
        self.summary = self.summary.merge(HeadSummary::of_op(op, stamp));
        if let Some(key) = op.key {
            self.add_ref(key, op.seq, op.ref_mod());
        }
    }

    /// Add `ref_mod` to the ref `(key, seq)`: merge at insert (a negative
    /// `ref_mod` counts as that many drops).
    pub fn add_ref(&mut self, key: RefKey, seq: u64, ref_mod: i64) {
        self.merge_ref(DelayedRef::of_mod(key, seq, ref_mod));
    }

    /// Merge `r` into the ref `(r.key, r.seq)` (counts and drops add).
    pub fn merge_ref(&mut self, r: DelayedRef) {
        match self
            .refs
            .binary_search_by(|x| (x.key, x.seq).cmp(&(r.key, r.seq)))
        {
            Ok(i) => {
                self.refs[i].ref_mod += r.ref_mod;
                self.refs[i].drops += r.drops;
                if !self.refs[i].is_kept() {
                    self.refs.remove(i);
                }
            }
            Err(i) => {
                if r.is_kept() {
                    self.refs.insert(i, r);
                }
            }
        }
    }

    /// Merge another head of the same bytenr into this one.
    pub fn merge(&mut self, other: &Head) {
        debug_assert_eq!(other.bytenr, self.bytenr);
        self.summary = self.summary.merge(other.summary);
        if other.refs.is_empty() {
            return;
        }
        // Both sorted: merge linearly.
        let mut out = Vec::with_capacity(self.refs.len() + other.refs.len());
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.refs, &other.refs);
        while i < a.len() || j < b.len() {
            let take_a =
                j >= b.len() || (i < a.len() && (a[i].key, a[i].seq) <= (b[j].key, b[j].seq));
            let take_b =
                i >= a.len() || (j < b.len() && (b[j].key, b[j].seq) <= (a[i].key, a[i].seq));
            if take_a && take_b {
                let m = DelayedRef {
                    ref_mod: a[i].ref_mod + b[j].ref_mod,
                    drops: a[i].drops + b[j].drops,
                    ..a[i]
                };
                if m.is_kept() {
                    out.push(m);
                }
                i += 1;
                j += 1;
            } else if take_a {
                out.push(a[i]);
                i += 1;
            } else {
                out.push(b[j]);
                j += 1;
            }
        }
        self.refs = out;
    }

    /// True when the head changes nothing (all refs cancelled, no
    /// allocation, no extent_op). Such a head is dropped when run.
    pub fn is_noop(&self) -> bool {
        self.refs.iter().all(|r| r.ref_mod == 0)
            && self.summary.alloc_stamp == 0
            && self.summary.extent_op.is_none()
    }

    /// Gross drops of `key` over all its seqs.
    pub fn drops_of(&self, key: &RefKey) -> u64 {
        self.refs
            .iter()
            .filter(|r| r.key == *key)
            .map(|r| r.drops)
            .sum()
    }

    /// Refs that change a count (`ref_mod != 0`).
    pub fn refs_changing(&self) -> usize {
        self.refs.iter().filter(|r| r.ref_mod != 0).count()
    }

    /// Merge the refs across seq for running, as btrfs
    /// `btrfs_merge_delayed_refs()` does at run time, unless a seq barrier
    /// holds them back. `barrier` is the lowest active seq (0 = none): a ref
    /// queued with `seq >= barrier` (seq != 0) may still be needed by a
    /// tree-mod-log reader, so the whole head is held.
    ///
    /// Merging happens *before* any ref is applied: adds and drops of one
    /// key become one net change, so the 4.2 regression (an ADD run before
    /// the DROP it should cancel) cannot happen.
    pub fn run_refs(&self, barrier: u64) -> RunRefs {
        let mut net = Vec::with_capacity(self.refs.len());
        match self.run_refs_into(barrier, &mut net) {
            Some(held) => held,
            None => RunRefs::Ready(net),
        }
    }

    /// [`Head::run_refs`] into `net` (cleared first; a commit's run worker
    /// reuses one vector for all its heads): `None` when ready (the net
    /// changes are in `net`), else the [`RunRefs::Held`] answer.
    pub fn run_refs_into(&self, barrier: u64, net: &mut Vec<(RefKey, i64)>) -> Option<RunRefs> {
        net.clear();
        if barrier != 0 {
            if let Some(r) = self
                .refs
                .iter()
                .find(|r| r.ref_mod != 0 && r.seq != 0 && r.seq >= barrier)
            {
                return Some(RunRefs::Held {
                    seq: r.seq,
                    barrier,
                });
            }
        }
        for r in &self.refs {
            match net.last_mut() {
                Some((k, m)) if *k == r.key => *m += r.ref_mod,
                _ => net.push((r.key, r.ref_mod)),
            }
        }
        net.retain(|(_, m)| *m != 0);
        None
    }

    /// Check the head invariants (sorted, unique, every ref kept, drops at
    /// least the net drop).
    pub fn check(&self) -> bool {
        self.refs
            .iter()
            .all(|r| r.is_kept() && r.drops as i128 >= -(r.ref_mod as i128))
            && self
                .refs
                .windows(2)
                .all(|w| (w[0].key, w[0].seq) < (w[1].key, w[1].seq))
    }
}

/// [`HeadSummary::merge`] of many ops' [`HeadSummary::of_op`], in any
/// order (the merge is commutative and associative), with the common ops,
/// refs added or dropped with no extent_op, summed in place: their
/// summaries differ only in the ref count and the shape they name, so the
/// fold keeps the sum, the least shape (what `merge` keeps of two named
/// shapes) and whether any other was named. A hot extent's lookup folds
/// hundreds of staged ops; merging a full summary for each was a fifth of
/// its time.
#[derive(Clone, Debug, Default)]
pub struct SummaryFold {
    /// The plain ops' least shape and whether another was named.
    plain: Option<(u64, ExtentKind, bool)>,
    /// The plain ops' ref counts, summed.
    plain_total: i64,
    /// Everything else, merged.
    rest: Option<HeadSummary>,
}

impl SummaryFold {
    /// Fold one op (as [`HeadSummary::of_op`]).
    pub fn op(&mut self, op: &Op, stamp: u64) {
        if !op.is_plain_ref() {
            self.summary(HeadSummary::of_op(op, stamp));
            return;
        }
        self.plain(op.num_bytes, op.kind, op.ref_mod());
    }

    /// Fold a plain op (an ADD_REF or DROP_REF, `ref_mod` +1 or -1, with
    /// no extent_op) of this shape: what [`SummaryFold::op`] does with one.
    pub fn plain(&mut self, num_bytes: u64, kind: ExtentKind, ref_mod: i64) {
        self.plain_total += ref_mod;
        let shape = (num_bytes, kind);
        match &mut self.plain {
            None => self.plain = Some((shape.0, shape.1, false)),
            Some((num_bytes, kind, mixed)) => {
                if shape != (*num_bytes, *kind) {
                    *mixed = true;
                    (*num_bytes, *kind) = shape.min((*num_bytes, *kind));
                }
            }
        }
    }

    /// Fold a summary.
    pub fn summary(&mut self, s: HeadSummary) {
        self.rest = Some(match self.rest {
            None => s,
            Some(r) => r.merge(s),
        });
    }

    /// The merged summary (`None`: nothing was folded).
    pub fn finish(self) -> Option<HeadSummary> {
        let plain = self.plain.map(|(num_bytes, kind, mixed)| HeadSummary {
            num_bytes,
            kind,
            shape_known: true,
            mixed,
            alloc_stamp: 0,
            allocs: 0,
            total_ref_mod: self.plain_total,
            extent_op: None,
        });
        HeadSummary::merge_opt(plain, self.rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExtentOp, BLOCK_FLAG_FULL_BACKREF};

    fn tree_op(action: Action, root: u64, seq: u64) -> Op {
        Op::new(
            1 << 20,
            16384,
            ExtentKind::Tree { level: 0 },
            action,
            RefKey::TreeBlock { root },
            seq,
        )
        .unwrap()
    }

    #[test]
    fn same_seq_merges_at_insert_and_cancels() {
        let mut h = Head::of_op(&tree_op(Action::AddRef, 5, 0), 0);
        h.absorb(&tree_op(Action::DropRef, 5, 0), 0);
        assert_eq!(
            h.refs,
            vec![DelayedRef {
                key: RefKey::TreeBlock { root: 5 },
                seq: 0,
                ref_mod: 0,
                drops: 1
            }],
            "opposite actions with the same seq cancel; the drop is counted"
        );
        assert!(h.is_noop());
        assert_eq!(h.summary.total_ref_mod, 0);
        h.absorb(&tree_op(Action::AddRef, 5, 0), 0);
        h.absorb(&tree_op(Action::AddRef, 5, 0), 0);
        assert_eq!(h.refs.len(), 1);
        assert_eq!(h.refs[0].ref_mod, 2, "same action adds");
        assert_eq!(h.refs[0].drops, 1);
    }

    #[test]
    fn different_seq_stays_apart_until_run() {
        let mut h = Head::of_op(&tree_op(Action::AddRef, 5, 1), 0);
        h.absorb(&tree_op(Action::DropRef, 5, 2), 0);
        assert_eq!(h.refs.len(), 2, "different seq are not merged at insert");
        assert_eq!(h.run_refs(0), RunRefs::Ready(vec![]));
        assert_eq!(
            h.run_refs(3),
            RunRefs::Ready(vec![]),
            "barrier above both seqs"
        );
        assert_eq!(h.run_refs(2), RunRefs::Held { seq: 2, barrier: 2 });
    }

    proptest::proptest! {
        /// The fold gives what merging each op's summary gives, for any
        /// mix of actions, shapes (sizes, data and tree levels, one size of
        /// both kinds), extent_ops and stamps, with summaries folded among
        /// the ops.
        #[test]
        fn summary_fold_is_merge_of_each_op(
            ops in proptest::collection::vec((0u8..4, 0u8..5, 0u8..3, 1u64..100), 1..40)
        ) {
            let ops: Vec<(Op, u64)> = ops
                .iter()
                .map(|&(action, shape, eop, stamp)| {
                    let action = [Action::AddRef, Action::DropRef, Action::AddExtent, Action::UpdateHead][action as usize];
                    let (num_bytes, kind) = [
                        (16384, ExtentKind::Tree { level: 0 }),
                        (16384, ExtentKind::Tree { level: 1 }),
                        (4096, ExtentKind::Data),
                        (8192, ExtentKind::Data),
                        (16384, ExtentKind::Data),
                    ][shape as usize];
                    let key = if kind.is_data() {
                        RefKey::ExtentData { root: 5, objectid: 257, offset: 0 }
                    } else {
                        RefKey::TreeBlock { root: 5 }
                    };
                    let extent_op = match (eop, action) {
                        (_, Action::UpdateHead) | (1, _) => Some(ExtentOp {
                            flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                            key: None,
                        }),
                        (2, _) => Some(ExtentOp {
                            flags_to_set: 0,
                            key: Some(DiskKey { objectid: stamp, item_type: 1, offset: 0 }),
                        }),
                        _ => None,
                    };
                    let op = Op {
                        bytenr: 1 << 20,
                        num_bytes,
                        kind,
                        action,
                        key: (action != Action::UpdateHead).then_some(key),
                        seq: 0,
                        extent_op,
                    };
                    (op, stamp)
                })
                .collect();
            let want = ops
                .iter()
                .map(|(op, stamp)| HeadSummary::of_op(op, *stamp))
                .reduce(HeadSummary::merge);
            // Every third as a summary (a run's or carried head's, as a
            // lookup folds them), the others as ops.
            let mut fold = SummaryFold::default();
            for (i, (op, stamp)) in ops.iter().enumerate() {
                if i % 3 == 0 {
                    fold.summary(HeadSummary::of_op(op, *stamp));
                } else {
                    fold.op(op, *stamp);
                }
            }
            proptest::prop_assert_eq!(fold.finish(), want);
        }
    }

    #[test]
    fn merge_is_order_independent() {
        let ops = [
            tree_op(Action::AddExtent, 5, 0),
            tree_op(Action::DropRef, 5, 1),
            tree_op(Action::AddExtent, 5, 2),
            Op::update_head(
                1 << 20,
                16384,
                ExtentKind::Tree { level: 0 },
                ExtentOp {
                    flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                    key: None,
                },
            )
            .unwrap(),
        ];
        let stamps = [1, 0, 2, 3];
        let build = |order: &[usize]| {
            let mut h: Option<Head> = None;
            for &i in order {
                let one = Head::of_op(&ops[i], stamps[i]);
                match &mut h {
                    None => h = Some(one),
                    Some(h) => h.merge(&one),
                }
            }
            h.unwrap()
        };
        let a = build(&[0, 1, 2, 3]);
        for order in [[3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
            assert_eq!(build(&order), a);
        }
        assert!(a.summary.must_insert_reserved());
        assert_eq!(a.summary.alloc_stamp, 2);
    }
}
