//! Running delayed-ref heads into the extent tree.
//!
//! [`run_head`] is btrfs `__btrfs_run_delayed_refs()` for one head: merge
//! its refs across seq ([`Head::run_refs`]), then apply them to the extent
//! item. It computes a [`HeadEffect`] against the committed tree without
//! changing it; the commit applies all effects together (see
//! [`crate::engine`]). A head whose run would be invalid returns a typed
//! [`RunError`] and is quarantined by the caller: the tree is never
//! half-changed and nothing panics.
//!
//! [`RunQueue`] is `btrfs_select_ref_head()`: heads are taken from a cursor
//! (`run_delayed_start`) in bytenr order, the cursor moves to the end of the
//! selected extent (`bytenr + num_bytes`) so neighbouring extents are run
//! together (clustering), and it wraps around to the lowest bytenr.

use crate::extent_tree::{ExtentItem, ExtentTree, BACKREF_COUNT_MAX};
use crate::head::{Head, RunRefs, ALLOCS_COUNTED_MAX};
use crate::model::{ExtentKind, RefKey, BLOCK_FLAG_FULL_BACKREF};

/// An extent whose reference count reached zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FreedExtent {
    /// Address.
    pub bytenr: u64,
    /// Size.
    pub num_bytes: u64,
    /// Kind.
    pub kind: ExtentKind,
}

/// What running one head does to the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadEffect {
    /// Extent address.
    pub bytenr: u64,
    /// The item after the run (`None`: no item at bytenr).
    pub item: Option<ExtentItem>,
    /// Extents freed by the run (an old life ended; or an allocation that
    /// was dropped again before it was ever inserted).
    pub freed: Vec<FreedExtent>,
}

/// Why a head cannot be run. The head is quarantined, the tree unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// Dropping more references of a backref than exist.
    #[error("extent {bytenr}: drop of '{key}' by {drop} but only {have} exist")]
    DropMissingRef {
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
        /// Count in the tree.
        have: u64,
        /// Net drop requested.
        drop: u64,
    },
    /// A tree block referenced twice by the same root or parent.
    #[error("extent {bytenr}: tree block backref '{key}' would have count {count} (max 1)")]
    DuplicateTreeRef {
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
        /// Resulting count.
        count: u64,
    },
    /// Adding a reference to an extent that is not in the tree, without an
    /// allocation (`ADD_EXTENT`).
    #[error("extent {bytenr}: adding '{key}' to an extent that does not exist (freed, or never allocated) without ADD_EXTENT")]
    AddToMissingExtent {
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
    },
    /// An extent_op on an extent that does not exist.
    #[error("extent {bytenr}: extent_op on an extent that does not exist")]
    ExtentOpOnMissing {
        /// Extent.
        bytenr: u64,
    },
    /// An extent_op that cannot apply to a data extent.
    #[error("extent {bytenr}: extent_op (flags {flags:#x}, key update {key}) on a data extent")]
    ExtentOpOnData {
        /// Extent.
        bytenr: u64,
        /// Flags.
        flags: u64,
        /// Key update present.
        key: bool,
    },
    /// Ops name a size or kind different from the extent in the tree.
    #[error("extent {bytenr}: ops name {got_bytes} bytes ({got_kind}) but the extent is {want_bytes} bytes ({want_kind})")]
    ShapeMismatch {
        /// Extent.
        bytenr: u64,
        /// In the tree.
        want_bytes: u64,
        /// In the tree.
        want_kind: ExtentKind,
        /// Named by ops.
        got_bytes: u64,
        /// Named by ops.
        got_kind: ExtentKind,
    },
    /// Ops without an allocation disagree on size or kind.
    #[error(
        "extent {bytenr}: pending ops disagree on the extent's size or kind and none allocates it"
    )]
    MixedShapes {
        /// Extent.
        bytenr: u64,
    },
    /// Re-allocated while backrefs of its previous life remain (not all
    /// dropped by the ops of the head that allocates it).
    #[error("extent {bytenr}: allocated as {kind} while still referenced: backref '{key}' of its previous life keeps {count} reference(s) no op dropped")]
    ReallocWhileReferenced {
        /// Extent.
        bytenr: u64,
        /// New kind.
        kind: ExtentKind,
        /// Remaining backref.
        key: RefKey,
        /// Its count.
        count: u64,
    },
    /// Allocated more than once in one transaction without the earlier
    /// lives ending: the head's drops (gross, all keys) are fewer than the
    /// committed refs plus one per earlier allocation. The kernel reserves
    /// a range once; a second allocation is a second insert of the same
    /// extent item (-EEXIST).
    #[error("extent {bytenr}: allocated {allocs} times in one transaction but its ops drop {drops} reference(s) where the lives before the last hold at least {needed} (a range is allocated again only after it is freed)")]
    AllocatedTwice {
        /// Extent.
        bytenr: u64,
        /// Allocations in the head.
        allocs: u64,
        /// Drops in the head (gross, all keys).
        drops: u64,
        /// Committed refs + earlier allocations.
        needed: u64,
    },
    /// Allocated [`ALLOCS_COUNTED_MAX`] times or more in one transaction:
    /// past the count a head keeps, so whether every earlier life ends in
    /// the head cannot be checked. Refused rather than checked against a
    /// count that may be short (which accepted a second allocation
    /// without a free in between).
    #[error("extent {bytenr}: allocated {max} times or more in one transaction, more than refd counts per extent and transaction")]
    TooManyAllocations {
        /// Extent.
        bytenr: u64,
        /// [`ALLOCS_COUNTED_MAX`].
        max: u16,
    },
    /// A ref of an allocated extent names another size or kind than the
    /// allocation, and no earlier life of the extent can own it (the
    /// committed extent, if any, has the allocation's size and kind, and
    /// the head allocates once). The kernel looks up the extent item of
    /// each ref by its own size and fails it.
    #[error("extent {bytenr}: allocated as {num_bytes} bytes ({kind}) but another op names another size or kind, which no earlier life of the extent had")]
    AllocShapeMismatch {
        /// Extent.
        bytenr: u64,
        /// Size of the allocation.
        num_bytes: u64,
        /// Kind of the allocation.
        kind: ExtentKind,
    },
    /// An allocation whose range `[bytenr, bytenr + num_bytes)` meets
    /// another extent live at the end of the commit: a committed extent
    /// this commit does not free, or an extent allocated at a lower bytenr
    /// by the same commit. The kernel's allocator never hands out such a
    /// range, so the ops are a client's bug; committed, they would make the
    /// extent tree overlap (`ExtentTree::check`, fsck). Decided after every
    /// head ran, in bytenr order (see `crate::engine`).
    #[error("extent {bytenr}: allocated as {num_bytes} bytes, overlapping the live extent at {other} ({other_bytes} bytes)")]
    OverlapsExtent {
        /// Extent.
        bytenr: u64,
        /// Size of the allocation.
        num_bytes: u64,
        /// The live extent it meets.
        other: u64,
        /// That extent's size.
        other_bytes: u64,
    },
    /// A backref of the other kind than the extent (a data backref on a
    /// tree block or the reverse).
    #[error("extent {bytenr}: backref '{key}' does not fit the extent's kind ({kind})")]
    RefKindMismatch {
        /// Extent.
        bytenr: u64,
        /// The extent's kind.
        kind: ExtentKind,
        /// The backref.
        key: RefKey,
    },
    /// A count does not fit: above [`BACKREF_COUNT_MAX`], the 32 bits
    /// btrfs (and refd's on-device format) stores a data backref's count in.
    #[error("extent {bytenr}: reference count overflow on '{key}' (at most {BACKREF_COUNT_MAX})")]
    CountOverflow {
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
    },
}

/// Outcome of running one head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadOutcome {
    /// Apply this effect.
    Effect(HeadEffect),
    /// Everything cancelled: nothing to do.
    Noop,
    /// Held back by a seq barrier; stays queued.
    Held {
        /// Held seq.
        seq: u64,
        /// Lowest active barrier.
        barrier: u64,
    },
}

/// Run one head against the committed `tree`. `generation` is the commit
/// generation recorded in newly allocated extents; `barrier` the lowest
/// active seq (0 = none).
pub fn run_head(
    tree: &ExtentTree,
    head: &Head,
    generation: u64,
    barrier: u64,
) -> Result<HeadOutcome, RunError> {
    run_head_on(tree.get(head.bytenr), head, generation, barrier)
}

/// [`run_head`] with the committed item of the head's extent already
/// looked up (`None`: the extent has no item).
pub fn run_head_on(
    committed: Option<&ExtentItem>,
    head: &Head,
    generation: u64,
    barrier: u64,
) -> Result<HeadOutcome, RunError> {
    run_head_with(committed, head, generation, barrier, &mut Vec::new())
}

/// [`run_head_on`] with a scratch vector for the head's net changes (a
/// commit's run worker reuses one for all its heads).
pub fn run_head_with(
    committed: Option<&ExtentItem>,
    head: &Head,
    generation: u64,
    barrier: u64,
    net: &mut Vec<(RefKey, i64)>,
) -> Result<HeadOutcome, RunError> {
    if let Some(RunRefs::Held { seq, barrier }) = head.run_refs_into(barrier, net) {
        return Ok(HeadOutcome::Held { seq, barrier });
    }
    let net: &[(RefKey, i64)] = net;
    let bytenr = head.bytenr;
    let s = &head.summary;
    if s.must_insert_reserved() {
        return run_allocation(head, committed, net, generation).map(HeadOutcome::Effect);
    }
    let Some(old) = committed else {
        if let Some(&(key, m)) = net.iter().find(|(_, m)| *m > 0) {
            let _ = m;
            return Err(RunError::AddToMissingExtent { bytenr, key });
        }
        if let Some(&(key, m)) = net.first() {
            return Err(RunError::DropMissingRef {
                bytenr,
                key,
                have: 0,
                drop: m.unsigned_abs(),
            });
        }
        if s.extent_op.is_some() {
            return Err(RunError::ExtentOpOnMissing { bytenr });
        }
        return Ok(HeadOutcome::Noop);
    };
    // Everything cancelled: nothing to validate or apply (cancelled ops
    // are not checked against the extent's shape).
    if net.is_empty() && s.extent_op.is_none() {
        return Ok(HeadOutcome::Noop);
    }
    if s.shape_known {
        if s.mixed {
            return Err(RunError::MixedShapes { bytenr });
        }
        if s.num_bytes != old.num_bytes || s.kind != old.kind {
            return Err(RunError::ShapeMismatch {
                bytenr,
                want_bytes: old.num_bytes,
                want_kind: old.kind,
                got_bytes: s.num_bytes,
                got_kind: s.kind,
            });
        }
    }
    let mut item = apply_net(bytenr, old, net)?;
    apply_extent_op(bytenr, &mut item, head)?;
    let mut freed = Vec::new();
    let item = if item.refs == 0 {
        freed.push(FreedExtent {
            bytenr,
            num_bytes: old.num_bytes,
            kind: old.kind,
        });
        None
    } else {
        Some(item)
    };
    Ok(HeadOutcome::Effect(HeadEffect {
        bytenr,
        item,
        freed,
    }))
}

/// A head with an allocation: the extent starts a new life with the size
/// and kind of the latest allocation.
///
/// If the bytenr is still in the tree, its previous life must end in this
/// head: every backref it has must be dropped by the head's ops, counted
/// gross ([`Head::drops_of`]), because a drop of the old life and an add of
/// the new one with the same key cancel at insert. The kernel frees and
/// re-allocates a bytenr within a transaction all the time; allocating one
/// that is still referenced is a bug it meets with -EEXIST on the extent
/// item insert. refd refuses such a head ([`RunError::ReallocWhileReferenced`]):
/// it never builds an item mixing both lives, and never reports freed an
/// extent that is still referenced.
///
/// When every old backref is dropped, an order of the ops exists in which
/// the old life ends before the allocation, and the new life's counts are
/// committed + net per key (the old life's part of the drops cancels its
/// counts).
fn run_allocation(
    head: &Head,
    committed: Option<&ExtentItem>,
    net: &[(RefKey, i64)],
    generation: u64,
) -> Result<HeadEffect, RunError> {
    let bytenr = head.bytenr;
    let s = &head.summary;
    let old_refs = committed.map(|c| c.backrefs()).unwrap_or_default();
    check_old_life_dropped(head, &old_refs)?;
    check_earlier_lives(head, committed)?;
    let counts = final_counts(&old_refs, net);
    let mut added: Vec<(RefKey, i64)> = Vec::with_capacity(counts.len());
    for (key, count) in counts {
        if count < 0 {
            let have = committed.map_or(0, |c| c.count(&key));
            return Err(RunError::DropMissingRef {
                bytenr,
                key,
                have,
                drop: (have as i64 - count) as u64,
            });
        }
        if count == 0 {
            continue;
        }
        if key.is_data() != s.kind.is_data() {
            return Err(RunError::RefKindMismatch {
                bytenr,
                kind: s.kind,
                key,
            });
        }
        if key.is_tree() && count > 1 {
            return Err(RunError::DuplicateTreeRef {
                bytenr,
                key,
                count: count as u64,
            });
        }
        if count as u64 > BACKREF_COUNT_MAX {
            return Err(RunError::CountOverflow { bytenr, key });
        }
        added.push((key, count));
    }
    // One pass, in key order as `add_ref` one by one would place them.
    let mut item = ExtentItem::new(s.num_bytes, s.kind, generation).with_refs(&added);
    check_alloc_shape(head, committed)?;
    apply_extent_op(bytenr, &mut item, head)?;
    let mut freed = Vec::new();
    if let Some(c) = committed {
        freed.push(FreedExtent {
            bytenr,
            num_bytes: c.num_bytes,
            kind: c.kind,
        });
    }
    let item = if item.refs == 0 {
        // Allocated and dropped again before it was ever inserted.
        freed.push(FreedExtent {
            bytenr,
            num_bytes: s.num_bytes,
            kind: s.kind,
        });
        None
    } else {
        Some(item)
    };
    Ok(HeadEffect {
        bytenr,
        item,
        freed,
    })
}

/// Refuse a re-allocation of a bytenr whose committed backrefs
/// (`old_refs`, sorted by key) are not all dropped by `head`. Both lists
/// are sorted by key: one merge walk.
fn check_old_life_dropped(head: &Head, old_refs: &[(RefKey, u64)]) -> Result<(), RunError> {
    let mut refs = head.refs.iter().peekable();
    for &(key, count) in old_refs {
        while refs.next_if(|r| r.key < key).is_some() {}
        let mut drops = 0u64;
        while let Some(r) = refs.next_if(|r| r.key == key) {
            drops = drops.saturating_add(r.drops);
        }
        if drops < count {
            return Err(RunError::ReallocWhileReferenced {
                bytenr: head.bytenr,
                kind: head.summary.kind,
                key,
                count: count - drops,
            });
        }
    }
    Ok(())
}

/// Refuse a head whose allocations cannot all be lives of their own: an
/// extent is allocated again only after it is freed, so every allocation
/// but the latest starts a life that ends in this head, with at least one
/// drop (its allocation's ref). Then [`check_alloc_shape`]: the ops may
/// name a size or kind other than the latest allocation's only if an
/// earlier life has it (the committed extent, or another allocation of the
/// head).
///
/// Both checks count and compare what the merged head keeps, without the
/// order of the ops: drops are matched to lives by number, not by key, and
/// in a head that does have an earlier life of another shape, which life
/// a ref of another shape belongs to is not known, so it is not checked.
fn check_earlier_lives(head: &Head, committed: Option<&ExtentItem>) -> Result<(), RunError> {
    let s = &head.summary;
    if s.allocs == ALLOCS_COUNTED_MAX {
        return Err(RunError::TooManyAllocations {
            bytenr: head.bytenr,
            max: ALLOCS_COUNTED_MAX,
        });
    }
    let allocs = u64::from(s.allocs);
    debug_assert!(allocs >= 1, "a head with an allocation counts it");
    let drops = head
        .refs
        .iter()
        .fold(0u64, |d, r| d.saturating_add(r.drops));
    let needed = committed
        .map_or(0, |c| c.refs)
        .saturating_add(allocs.saturating_sub(1));
    if drops < needed {
        return Err(RunError::AllocatedTwice {
            bytenr: head.bytenr,
            allocs,
            drops,
            needed,
        });
    }
    Ok(())
}

/// The second check of [`check_earlier_lives`], run after the final counts
/// are validated (so a backref of the other kind is reported as
/// [`RunError::RefKindMismatch`], naming it).
fn check_alloc_shape(head: &Head, committed: Option<&ExtentItem>) -> Result<(), RunError> {
    let s = &head.summary;
    let earlier_shape =
        s.allocs > 1 || committed.is_some_and(|c| (c.num_bytes, c.kind) != (s.num_bytes, s.kind));
    if s.mixed && !earlier_shape {
        return Err(RunError::AllocShapeMismatch {
            bytenr: head.bytenr,
            num_bytes: s.num_bytes,
            kind: s.kind,
        });
    }
    Ok(())
}

/// Committed counts plus net changes per key (both sorted by key).
fn final_counts(old_refs: &[(RefKey, u64)], net: &[(RefKey, i64)]) -> Vec<(RefKey, i64)> {
    let mut merged = Vec::with_capacity(old_refs.len() + net.len());
    let (mut i, mut j) = (0, 0);
    while i < old_refs.len() || j < net.len() {
        match (old_refs.get(i), net.get(j)) {
            (Some(&(ka, ca)), Some(&(kb, mb))) if ka == kb => {
                merged.push((ka, ca as i64 + mb));
                i += 1;
                j += 1;
            }
            (Some(&(ka, ca)), Some(&(kb, _))) if ka < kb => {
                merged.push((ka, ca as i64));
                i += 1;
            }
            (Some(&(ka, ca)), None) => {
                merged.push((ka, ca as i64));
                i += 1;
            }
            (_, Some(&(kb, mb))) => {
                merged.push((kb, mb));
                j += 1;
            }
            (None, None) => break,
        }
    }
    merged
}

/// `old` with the head's net changes: each is validated against `old`
/// (O(log B) each), then the new item is built in one pass
/// ([`ExtentItem::with_refs`]).
fn apply_net(bytenr: u64, old: &ExtentItem, net: &[(RefKey, i64)]) -> Result<ExtentItem, RunError> {
    // Validate everything first, then change.
    for &(key, m) in net {
        let have = old.count(&key);
        let new = (have as i64)
            .checked_add(m)
            .filter(|&n| n <= BACKREF_COUNT_MAX as i64)
            .ok_or(RunError::CountOverflow { bytenr, key })?;
        if new < 0 {
            return Err(RunError::DropMissingRef {
                bytenr,
                key,
                have,
                drop: m.unsigned_abs(),
            });
        }
        if key.is_tree() && new > 1 {
            return Err(RunError::DuplicateTreeRef {
                bytenr,
                key,
                count: new as u64,
            });
        }
        if key.is_data() != old.kind.is_data() {
            // Op validation ties key kind to op kind and the shape check ties
            // op kind to the extent; keep the tree safe regardless.
            return Err(RunError::RefKindMismatch {
                bytenr,
                kind: old.kind,
                key,
            });
        }
    }
    Ok(old.with_refs(net))
}

/// Apply the head's extent_op to `item`, the life allocated at
/// `head.summary.alloc_stamp` (extent_ops of earlier lives are dropped).
fn apply_extent_op(bytenr: u64, item: &mut ExtentItem, head: &Head) -> Result<(), RunError> {
    let Some(eop) = head
        .summary
        .extent_op
        .and_then(|e| e.for_life(head.summary.alloc_stamp))
    else {
        return Ok(());
    };
    if item.kind.is_data() {
        return Err(RunError::ExtentOpOnData {
            bytenr,
            flags: eop.flags_to_set,
            key: eop.key.is_some(),
        });
    }
    item.flags |= eop.flags_to_set & BLOCK_FLAG_FULL_BACKREF;
    if let Some((_, key)) = eop.key {
        item.tree_key = Some(key);
    }
    Ok(())
}

/// Head selection over a set of heads sorted by bytenr, with btrfs's
/// cursor, wrap-around and `processing` flags (`btrfs_select_ref_head`).
#[derive(Debug)]
pub struct RunQueue<'a> {
    heads: &'a [Head],
    processing: Vec<bool>,
    ready: usize,
    /// Index after the last selected head: where the search for the cursor
    /// ends when selection proceeds in order (the common case).
    hint: usize,
    /// `run_delayed_start`: where the next selection starts.
    pub cursor: u64,
}

impl<'a> RunQueue<'a> {
    /// A queue over `heads` (sorted by bytenr, unique) starting at `cursor`.
    pub fn new(heads: &'a [Head], cursor: u64) -> RunQueue<'a> {
        debug_assert!(heads.windows(2).all(|w| w[0].bytenr < w[1].bytenr));
        RunQueue {
            heads,
            processing: vec![false; heads.len()],
            ready: heads.len(),
            hint: 0,
            cursor,
        }
    }

    /// Heads not yet selected.
    pub fn ready(&self) -> usize {
        self.ready
    }

    /// Select the next head: the first at or after the cursor that is not
    /// being processed, wrapping around once to the lowest bytenr. Marks it
    /// processing and moves the cursor past its extent.
    pub fn select(&mut self) -> Option<usize> {
        // The first head at or after the cursor: the hint when it is that
        // head (sequential selection), else a binary search.
        let hinted = self.hint <= self.heads.len()
            && (self.hint == self.heads.len() || self.heads[self.hint].bytenr >= self.cursor)
            && (self.hint == 0 || self.heads[self.hint - 1].bytenr < self.cursor);
        let start = if hinted {
            self.hint
        } else {
            self.heads.partition_point(|h| h.bytenr < self.cursor)
        };
        let mut i = if start < self.heads.len() {
            start
        } else if self.cursor != 0 {
            self.cursor = 0;
            0
        } else {
            return None;
        };
        if self.heads.is_empty() {
            return None;
        }
        while self.processing[i] {
            i += 1;
            if i == self.heads.len() {
                if self.cursor == 0 {
                    return None;
                }
                self.cursor = 0;
                i = 0;
            }
        }
        self.processing[i] = true;
        self.ready -= 1;
        self.hint = i + 1;
        let h = &self.heads[i];
        self.cursor = h.bytenr.saturating_add(h.summary.num_bytes);
        Some(i)
    }

    /// Put a selected head back (btrfs `btrfs_unselect_ref_head`).
    pub fn unselect(&mut self, i: usize) {
        if self.processing[i] {
            self.processing[i] = false;
            self.ready += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, ExtentOp, Op, BLOCK_FLAG_FULL_BACKREF};

    const TREE: ExtentKind = ExtentKind::Tree { level: 0 };

    fn head(ops: &[(Action, RefKey, u64)], bytenr: u64, kind: ExtentKind) -> Head {
        let mut h: Option<Head> = None;
        for (n, &(a, k, seq)) in ops.iter().enumerate() {
            let nb = if kind.is_data() { 8192 } else { 16384 };
            let op = Op::new(bytenr, nb, kind, a, k, seq).unwrap();
            let stamp = n as u64 + 1;
            match &mut h {
                None => h = Some(Head::of_op(&op, stamp)),
                Some(h) => h.absorb(&op, stamp),
            }
        }
        h.unwrap()
    }

    fn effect(o: Result<HeadOutcome, RunError>) -> HeadEffect {
        match o {
            Ok(HeadOutcome::Effect(e)) => e,
            other => panic!("expected an effect, got {other:?}"),
        }
    }

    /// The 4.2 regression (btrfs-seq-merge-regression-fix.txt): on one
    /// tree block, Ref1 +1 seq 0 (allocation), Ref2 -1 seq 1 (freed in the
    /// same transaction), Ref3 +1 seq 2 (allocated again). Without merging
    /// across seq, the kernel ran Ref1, then Ref3 (adds preferred) and hit
    /// BUG_ON in insert_inline_extent_backref. refd merges first: one
    /// backref, no error.
    #[test]
    fn seq_merge_regression_4_2() {
        let root = RefKey::TreeBlock { root: 5 };
        let h = head(
            &[
                (Action::AddExtent, root, 0),
                (Action::DropRef, root, 1),
                (Action::AddExtent, root, 2),
            ],
            1 << 30,
            TREE,
        );
        assert_eq!(h.refs.len(), 3, "different seq stay apart at insert");
        let tree = ExtentTree::new();
        let e = effect(run_head(&tree, &h, 7, 0));
        let item = e.item.expect("one live extent");
        assert_eq!(item.refs, 1);
        assert_eq!(item.backrefs(), vec![(root, 1)]);
        assert_eq!(item.generation, 7);
        assert!(e.freed.is_empty());
        // With a barrier at seq 1, the head is held, not half-run.
        assert_eq!(
            run_head(&tree, &h, 7, 1),
            Ok(HeadOutcome::Held { seq: 1, barrier: 1 })
        );
    }

    #[test]
    fn invalid_heads_are_refused() {
        let tree_root = RefKey::TreeBlock { root: 5 };
        let mut tree = ExtentTree::new();
        let mut item = ExtentItem::new(16384, TREE, 1);
        item.add_ref(tree_root, 1);
        tree.insert(1 << 30, item);
        // Drop of a ref that does not exist.
        let h = head(
            &[(Action::DropRef, RefKey::TreeBlock { root: 7 }, 0)],
            1 << 30,
            TREE,
        );
        assert!(matches!(
            run_head(&tree, &h, 2, 0),
            Err(RunError::DropMissingRef { .. })
        ));
        // Second ref of the same key on a tree block.
        let h = head(&[(Action::AddRef, tree_root, 0)], 1 << 30, TREE);
        assert!(matches!(
            run_head(&tree, &h, 2, 0),
            Err(RunError::DuplicateTreeRef { .. })
        ));
        // Add to a freed extent without ADD_EXTENT.
        let h = head(&[(Action::AddRef, tree_root, 0)], 2 << 30, TREE);
        assert!(matches!(
            run_head(&tree, &h, 2, 0),
            Err(RunError::AddToMissingExtent { .. })
        ));
        // Wrong level.
        let h = head(
            &[(Action::DropRef, tree_root, 0)],
            1 << 30,
            ExtentKind::Tree { level: 1 },
        );
        assert!(matches!(
            run_head(&tree, &h, 2, 0),
            Err(RunError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn drop_to_zero_frees_and_realloc_replaces() {
        let data = |root| RefKey::ExtentData {
            root,
            objectid: 257,
            offset: 0,
        };
        let mut tree = ExtentTree::new();
        let mut item = ExtentItem::new(8192, ExtentKind::Data, 1);
        item.add_ref(data(5), 2);
        tree.insert(4096, item);
        let h = head(
            &[(Action::DropRef, data(5), 0), (Action::DropRef, data(5), 0)],
            4096,
            ExtentKind::Data,
        );
        let e = effect(run_head(&tree, &h, 2, 0));
        assert_eq!(e.item, None);
        assert_eq!(
            e.freed,
            vec![FreedExtent {
                bytenr: 4096,
                num_bytes: 8192,
                kind: ExtentKind::Data
            }]
        );

        // Freed and re-allocated as a tree block in the same head.
        let mut h = head(
            &[(Action::DropRef, data(5), 0), (Action::DropRef, data(5), 0)],
            4096,
            ExtentKind::Data,
        );
        let alloc = Op::new(
            4096,
            16384,
            TREE,
            Action::AddExtent,
            RefKey::TreeBlock { root: 2 },
            0,
        )
        .unwrap()
        .with_extent_op(ExtentOp {
            flags_to_set: BLOCK_FLAG_FULL_BACKREF,
            key: None,
        })
        .unwrap();
        h.absorb(&alloc, 99);
        let e = effect(run_head(&tree, &h, 3, 0));
        let item = e.item.unwrap();
        assert_eq!((item.num_bytes, item.kind, item.refs), (16384, TREE, 1));
        assert!(item.full_backref());
        assert_eq!(e.freed.len(), 1);

        // Re-allocated while the old life is still referenced.
        let mut h = head(&[(Action::DropRef, data(5), 0)], 4096, ExtentKind::Data);
        h.absorb(&alloc, 99);
        assert!(matches!(
            run_head(&tree, &h, 3, 0),
            Err(RunError::ReallocWhileReferenced { .. })
        ));
    }

    /// Issue 13 defect 1: a tree block still referenced by FS_TREE is
    /// allocated again with a backref from CSUM_TREE. The kernel fails the
    /// extent item insert (-EEXIST); refd used to build one item with both
    /// lives' backrefs (`refs 2`) and report the old life freed.
    #[test]
    fn realloc_of_a_referenced_extent_is_refused() {
        let fs = RefKey::TreeBlock { root: 5 };
        let csum = RefKey::TreeBlock { root: 7 };
        let bytenr = 30425088;
        let mut tree = ExtentTree::new();
        let mut item = ExtentItem::new(16384, TREE, 1);
        item.add_ref(fs, 1);
        tree.insert(bytenr, item);
        let refused = |ops: &[(Action, RefKey, u64)], key: RefKey, count: u64| {
            let h = head(ops, bytenr, TREE);
            assert_eq!(
                run_head(&tree, &h, 2, 0),
                Err(RunError::ReallocWhileReferenced {
                    bytenr,
                    kind: TREE,
                    key,
                    count
                }),
                "{ops:?}"
            );
        };
        // Allocated while FS_TREE still references it.
        refused(&[(Action::AddExtent, csum, 0)], fs, 1);
        // The new life's add and drop cancel at insert: the old life is
        // still referenced, nothing is freed.
        refused(
            &[(Action::AddExtent, csum, 0), (Action::DropRef, csum, 0)],
            fs,
            1,
        );
        // The old life's drop and the new life's add of the same key cancel
        // at insert: legal, the new life has the backref.
        let h = head(
            &[(Action::DropRef, fs, 0), (Action::AddExtent, fs, 0)],
            bytenr,
            TREE,
        );
        assert!(h.refs.iter().all(|r| r.ref_mod == 0));
        let e = effect(run_head(&tree, &h, 2, 0));
        let new = e.item.expect("the new life");
        assert_eq!((new.backrefs(), new.generation), (vec![(fs, 1)], 2));
        assert_eq!(e.freed.len(), 1, "the old life is freed");
        // Dropped, re-allocated to CSUM_TREE, shared with FS_TREE again.
        let e = effect(run_head(
            &tree,
            &head(
                &[
                    (Action::DropRef, fs, 0),
                    (Action::AddExtent, csum, 0),
                    (Action::AddRef, fs, 0),
                ],
                bytenr,
                TREE,
            ),
            2,
            0,
        ));
        assert_eq!(e.item.unwrap().backrefs(), vec![(fs, 1), (csum, 1)]);
    }

    /// Issue 13 defect 7 (the kind half): a data ref queued on a bytenr
    /// that the head allocates as a tree block is a ref of the wrong kind,
    /// not a re-allocation over a live extent (the error it used to get).
    #[test]
    fn wrong_kind_ref_of_a_new_life_is_a_kind_mismatch() {
        let tree = ExtentTree::new();
        let t = RefKey::TreeBlock { root: 2 };
        let d = RefKey::ExtentData {
            root: 5,
            objectid: 257,
            offset: 0,
        };
        let alloc = Op::new(4096, 16384, TREE, Action::AddExtent, t, 0).unwrap();
        let add = Op::new(4096, 8192, ExtentKind::Data, Action::AddRef, d, 0).unwrap();
        let mut h = Head::of_op(&alloc, 1);
        h.absorb(&add, 0);
        assert_eq!(
            run_head(&tree, &h, 2, 0),
            Err(RunError::RefKindMismatch {
                bytenr: 4096,
                kind: TREE,
                key: d
            })
        );
    }

    /// Issue 13 defect 7 (the size half) and two allocations of one
    /// bytenr, head by head: the merged head counts its allocations and
    /// notes a second size whatever the order of its ops.
    #[test]
    fn allocations_and_sizes_of_one_head() {
        let d = |root| RefKey::ExtentData {
            root,
            objectid: 257,
            offset: 0,
        };
        let op = |a, n, root| Op::new(4096, n, ExtentKind::Data, a, d(root), 0).unwrap();
        let build = |ops: &[Op]| {
            let mut h = Head::of_op(&ops[0], 1);
            for (n, o) in ops.iter().enumerate().skip(1) {
                h.absorb(o, n as u64 + 1);
            }
            h
        };
        let fresh = ExtentTree::new();
        // A ref of the new life naming 8192 where the allocation says 4096.
        for ops in [
            [op(Action::AddExtent, 4096, 5), op(Action::AddRef, 8192, 6)],
            [op(Action::AddRef, 8192, 6), op(Action::AddExtent, 4096, 5)],
        ] {
            assert_eq!(
                run_head(&fresh, &build(&ops), 2, 0),
                Err(RunError::AllocShapeMismatch {
                    bytenr: 4096,
                    num_bytes: 4096,
                    kind: ExtentKind::Data
                })
            );
        }
        // Allocated twice without a drop in between.
        let twice = [
            op(Action::AddExtent, 4096, 5),
            op(Action::AddExtent, 4096, 6),
        ];
        assert_eq!(
            run_head(&fresh, &build(&twice), 2, 0),
            Err(RunError::AllocatedTwice {
                bytenr: 4096,
                allocs: 2,
                drops: 0,
                needed: 1
            })
        );
        // Allocated, freed, allocated again with another size: legal, the
        // first life owns the 4096 ops.
        let again = [
            op(Action::AddExtent, 4096, 5),
            op(Action::DropRef, 4096, 5),
            op(Action::AddExtent, 8192, 6),
        ];
        let h = build(&again);
        assert_eq!((h.summary.allocs, h.summary.mixed), (2, true));
        let item = effect(run_head(&fresh, &h, 2, 0)).item.unwrap();
        assert_eq!((item.num_bytes, item.backrefs()), (8192, vec![(d(6), 1)]));
        // Over a committed 8192 extent: freed and re-allocated as 4096 with
        // the old life's drop naming 8192 is legal; a ref of 16384 is
        // refused only where no earlier life has another size.
        let mut tree = ExtentTree::new();
        let mut old = ExtentItem::new(8192, ExtentKind::Data, 1);
        old.add_ref(d(5), 1);
        tree.insert(4096, old);
        let realloc = [op(Action::DropRef, 8192, 5), op(Action::AddExtent, 4096, 6)];
        assert!(run_head(&tree, &build(&realloc), 2, 0).is_ok());
        let same = [
            op(Action::DropRef, 8192, 5),
            op(Action::AddExtent, 8192, 6),
            op(Action::AddRef, 16384, 7),
        ];
        assert!(matches!(
            run_head(&tree, &build(&same), 2, 0),
            Err(RunError::AllocShapeMismatch { .. })
        ));
    }

    /// A data backref with count 2 dropped once is still referenced.
    #[test]
    fn realloc_counts_every_drop_of_the_old_life() {
        let a = RefKey::ExtentData {
            root: 5,
            objectid: 257,
            offset: 0,
        };
        let mut tree = ExtentTree::new();
        let mut item = ExtentItem::new(8192, ExtentKind::Data, 1);
        item.add_ref(a, 2);
        tree.insert(4096, item);
        let once = [(Action::DropRef, a, 0), (Action::AddExtent, a, 0)];
        assert!(matches!(
            run_head(&tree, &head(&once, 4096, ExtentKind::Data), 2, 0),
            Err(RunError::ReallocWhileReferenced { count: 1, .. })
        ));
        // Dropped twice (one at another seq), re-allocated, added again.
        let twice = [
            (Action::DropRef, a, 0),
            (Action::DropRef, a, 3),
            (Action::AddExtent, a, 0),
            (Action::AddRef, a, 3),
        ];
        let e = effect(run_head(&tree, &head(&twice, 4096, ExtentKind::Data), 2, 0));
        assert_eq!(e.item.unwrap().backrefs(), vec![(a, 2)]);
    }

    /// Seen in the snapshots-1 kernel trace: FULL_BACKREF set by an
    /// UPDATE_HEAD on a tree block, the block freed and allocated again, all
    /// in one refd commit. The flag belonged to the old life; the new block
    /// must not get it. An extent_op queued after the allocation applies.
    #[test]
    fn extent_op_applies_only_to_its_life() {
        let kind = TREE;
        let r256 = RefKey::TreeBlock { root: 256 };
        let r258 = RefKey::TreeBlock { root: 258 };
        let mut tree = ExtentTree::new();
        let mut item = ExtentItem::new(16384, kind, 1);
        item.add_ref(r256, 1);
        tree.insert(1 << 30, item);
        let full = ExtentOp {
            flags_to_set: BLOCK_FLAG_FULL_BACKREF,
            key: None,
        };
        let eop = Op::update_head(1 << 30, 16384, kind, full).unwrap();
        let drop = Op::new(1 << 30, 16384, kind, Action::DropRef, r256, 0).unwrap();
        let alloc = Op::new(1 << 30, 16384, kind, Action::AddExtent, r258, 0).unwrap();
        let mut h = Head::of_op(&eop, 1);
        h.absorb(&drop, 0);
        h.absorb(&alloc, 2);
        let e = effect(run_head(&tree, &h, 5, 0));
        let new = e.item.unwrap();
        assert_eq!(new.backrefs(), vec![(r258, 1)]);
        assert!(!new.full_backref(), "old life's extent_op must not apply");
        // The same extent_op queued after the allocation applies.
        h.absorb(&eop, 3);
        let e = effect(run_head(&tree, &h, 5, 0));
        assert!(e.item.unwrap().full_backref());
    }

    #[test]
    fn select_ref_head_cursor_wraps_and_clusters() {
        let mk = |b: u64| {
            head(
                &[(Action::AddExtent, RefKey::TreeBlock { root: 5 }, 0)],
                b,
                TREE,
            )
        };
        let heads: Vec<Head> = [16384u64, 32768, 65536, 131072]
            .into_iter()
            .map(mk)
            .collect();
        let mut q = RunQueue::new(&heads, 40000);
        assert_eq!(q.select(), Some(2), "first head at or after the cursor");
        assert_eq!(q.cursor, 65536 + 16384, "cursor moves past the extent");
        assert_eq!(q.select(), Some(3));
        assert_eq!(q.select(), Some(0), "wraps to the lowest bytenr");
        assert_eq!(q.cursor, 32768, "contiguous extent is next: clustering");
        q.unselect(0);
        assert_eq!(q.select(), Some(1));
        assert_eq!(q.select(), Some(0), "skips processing heads and wraps");
        assert_eq!(q.select(), None);
        assert_eq!(q.ready(), 0);
    }
}
