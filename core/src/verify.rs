//! ref-verify: an optional shadow that checks every action at ingest, after
//! btrfs `fs/btrfs/ref-verify.c`.
//!
//! Per block it keeps the kind and size, every backref with its count, the
//! total, and a bounded history of the actions that touched it. Every op is
//! checked against that shadow — which is committed + pending state, since
//! it is updated at ingest — *before* it is queued:
//! - an allocation of a block that still has references;
//! - an add or drop on a block that has no entry or zero references;
//! - a second reference of the same key on a tree block;
//! - a drop of a backref the block does not have;
//! - an op naming a different size or kind than the block has;
//! - an extent_op on a missing block, or flags on a data block.
//!
//! The first violation is returned as a [`VerifyError`] carrying the block's
//! shadow and history; the op is not queued. The shadow can be rebuilt from
//! the extent tree (plus pending heads) with [`RefVerify::rebuild`].
//!
//! Blocks are spread over [`VERIFY_SHARDS`] mutex-guarded maps by bytenr:
//! verify is a debugging mode, like the kernel's (which uses one spinlock).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use crate::extent_tree::ExtentTree;
use crate::head::Head;
use crate::model::{Action, ExtentKind, Op, RefKey};

/// Maps the shadow is spread over.
pub const VERIFY_SHARDS: usize = 64;
/// Actions remembered per block.
pub const HISTORY_MAX: usize = 32;

/// One remembered action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionRecord {
    /// Ingest sequence number (per verifier).
    pub serial: u64,
    /// The op.
    pub op: Op,
}

/// Shadow state of one block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockEntry {
    /// Size.
    pub num_bytes: u64,
    /// Kind (None until known).
    pub kind: Option<ExtentKind>,
    /// Total references.
    pub refs: u64,
    /// Backrefs with counts.
    pub backrefs: BTreeMap<RefKey, u64>,
    /// Recent actions, oldest first.
    pub history: VecDeque<ActionRecord>,
}

impl fmt::Display for BlockEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.map_or("unknown".to_string(), |k| k.to_string());
        writeln!(
            f,
            "  block: {} bytes, {kind}, refs {}",
            self.num_bytes, self.refs
        )?;
        for (k, c) in &self.backrefs {
            writeln!(f, "    {k} count {c}")?;
        }
        writeln!(f, "  history (oldest first, last {}):", self.history.len())?;
        for a in &self.history {
            writeln!(f, "    #{} {}", a.serial, a.op)?;
        }
        Ok(())
    }
}

/// What ref-verify found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// `ADD_EXTENT` of a block that still has references.
    ReallocatedReferenced,
    /// Add/drop/update on a block that was never allocated.
    NoEntry,
    /// Add/drop/update on a block with zero references (freed).
    ZeroRefs,
    /// Second reference of the same key on a tree block.
    DuplicateTreeRef,
    /// Drop of a backref the block does not have.
    DropMissing,
    /// Op size or kind differs from the block's.
    ShapeMismatch,
    /// extent_op flags on a data block.
    ExtentOpOnData,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Violation::ReallocatedReferenced => {
                "re-allocated a block that still has references to it"
            }
            Violation::NoEntry => "action on a block that has no existing entry",
            Violation::ZeroRefs => "action on a block that has 0 total references",
            Violation::DuplicateTreeRef => {
                "attempting to add another ref for an existing ref on a tree block"
            }
            Violation::DropMissing => "dropping a ref the block does not have",
            Violation::ShapeMismatch => "op names a different size or kind than the block has",
            Violation::ExtentOpOnData => "extent_op on a data block",
        })
    }
}

/// A refused op with the block's shadow and history.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ref-verify: {violation} — {op}\n{block}")]
pub struct VerifyError {
    /// What is wrong.
    pub violation: Violation,
    /// The refused op.
    pub op: Op,
    /// The block as the shadow has it (with history).
    pub block: BlockEntry,
}

/// The shadow.
#[derive(Debug)]
pub struct RefVerify {
    shards: Box<[Mutex<BTreeMap<u64, BlockEntry>>]>,
    serial: std::sync::atomic::AtomicU64,
}

impl Default for RefVerify {
    fn default() -> Self {
        RefVerify::new()
    }
}

impl RefVerify {
    /// An empty shadow.
    pub fn new() -> RefVerify {
        RefVerify {
            shards: (0..VERIFY_SHARDS)
                .map(|_| Mutex::new(BTreeMap::new()))
                .collect(),
            serial: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn shard(&self, bytenr: u64) -> MutexGuard<'_, BTreeMap<u64, BlockEntry>> {
        self.shards[crate::model::partition(bytenr, VERIFY_SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A shadow of `tree` plus `pending` heads (merged per key; order
    /// within a head is lost, so history starts empty).
    pub fn rebuild(tree: &ExtentTree, pending: &[Head]) -> RefVerify {
        let v = RefVerify::new();
        for (bytenr, item) in tree.iter() {
            v.shard(bytenr).insert(
                bytenr,
                BlockEntry {
                    num_bytes: item.num_bytes,
                    kind: Some(item.kind),
                    refs: item.refs,
                    backrefs: item.backrefs().into_iter().collect(),
                    history: VecDeque::new(),
                },
            );
        }
        for h in pending {
            v.resync(h.bytenr, tree, Some(h));
        }
        v
    }

    /// Reset one block's shadow to committed + `pending` (after a
    /// quarantine, or a rebuild).
    pub fn resync(&self, bytenr: u64, tree: &ExtentTree, pending: Option<&Head>) {
        let e = shadow_of(bytenr, tree, pending);
        self.shard(bytenr).insert(bytenr, e);
    }

    /// [`RefVerify::resync`] with the pending head read by `pending` while
    /// the block's shadow is locked. With ingest going through
    /// [`RefVerify::check_with`], which queues an op while that lock is
    /// held, every op the shadow recorded is either already in `pending`
    /// or recorded after the reset: none is erased (an op recorded but not
    /// yet queued when the pending head was read used to be, and later
    /// valid drops of it were refused).
    pub fn resync_with(
        &self,
        bytenr: u64,
        tree: &ExtentTree,
        pending: impl FnOnce() -> Option<Head>,
    ) {
        let mut shard = self.shard(bytenr);
        let e = shadow_of(bytenr, tree, pending().as_ref());
        shard.insert(bytenr, e);
    }

    /// Blocks tracked.
    pub fn blocks(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// The shadow of one block.
    pub fn block(&self, bytenr: u64) -> Option<BlockEntry> {
        self.shard(bytenr).get(&bytenr).cloned()
    }

    /// Check `op` against the shadow and record it. On a violation nothing
    /// is recorded.
    pub fn check(&self, op: &Op) -> Result<(), Box<VerifyError>> {
        self.check_with(op, || ())
    }

    /// [`RefVerify::check`], then `queue` (which queues the op in the
    /// store) while the block's shadow is still locked, so that a
    /// [`RefVerify::resync_with`] of the block sees the op either in the
    /// shadow and the store, or in neither. `queue` is not called on a
    /// violation.
    pub fn check_with<T>(&self, op: &Op, queue: impl FnOnce() -> T) -> Result<T, Box<VerifyError>> {
        let serial = self.next_serial();
        let mut shard = self.shard(op.bytenr);
        check_in(&mut shard, op, serial)?;
        let out = queue();
        drop(shard);
        Ok(out)
    }

    /// Check every op of `ops`, in order (a later op sees what the earlier
    /// ones did), and record them all, or none: on the first violation the
    /// shadow of every block the batch touched is restored and the index
    /// of the refused op is returned. The shards the batch touches are
    /// locked in ascending order for the whole check, so single-op checks
    /// on other threads see the batch entirely or not at all.
    pub fn check_batch(&self, ops: &[Op]) -> Result<(), (usize, Box<VerifyError>)> {
        self.check_batch_with(ops, || ())
    }

    /// [`RefVerify::check_batch`], then `queue` while every touched shard
    /// is still locked (see [`RefVerify::check_with`]).
    pub fn check_batch_with<T>(
        &self,
        ops: &[Op],
        queue: impl FnOnce() -> T,
    ) -> Result<T, (usize, Box<VerifyError>)> {
        let shard_of = |bytenr: u64| crate::model::partition(bytenr, VERIFY_SHARDS);
        let mut indexes: Vec<usize> = ops.iter().map(|op| shard_of(op.bytenr)).collect();
        indexes.sort_unstable();
        indexes.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, BTreeMap<u64, BlockEntry>>)> = indexes
            .iter()
            .map(|&i| (i, self.shards[i].lock().unwrap_or_else(|e| e.into_inner())))
            .collect();
        let mut saved: BTreeMap<u64, Option<BlockEntry>> = BTreeMap::new();
        for (index, op) in ops.iter().enumerate() {
            let g = guards
                .binary_search_by_key(&shard_of(op.bytenr), |(i, _)| *i)
                .expect("every touched shard is locked");
            let map = &mut guards[g].1;
            saved
                .entry(op.bytenr)
                .or_insert_with(|| map.get(&op.bytenr).cloned());
            if let Err(e) = check_in(map, op, self.next_serial()) {
                for (bytenr, before) in saved {
                    let g = guards
                        .binary_search_by_key(&shard_of(bytenr), |(i, _)| *i)
                        .expect("every touched shard is locked");
                    match before {
                        Some(entry) => guards[g].1.insert(bytenr, entry),
                        None => guards[g].1.remove(&bytenr),
                    };
                }
                return Err((index, e));
            }
        }
        let out = queue();
        drop(guards);
        Ok(out)
    }

    fn next_serial(&self) -> u64 {
        self.serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// One block's shadow from its committed item and pending head.
fn shadow_of(bytenr: u64, tree: &ExtentTree, pending: Option<&Head>) -> BlockEntry {
    let mut e = match tree.get(bytenr) {
        Some(item) => BlockEntry {
            num_bytes: item.num_bytes,
            kind: Some(item.kind),
            refs: item.refs,
            backrefs: item.backrefs().into_iter().collect(),
            history: VecDeque::new(),
        },
        None => BlockEntry::default(),
    };
    if let Some(h) = pending {
        if h.summary.shape_known {
            e.num_bytes = h.summary.num_bytes;
            e.kind = Some(h.summary.kind);
        }
        for r in &h.refs {
            let c = e.backrefs.entry(r.key).or_insert(0);
            *c = (*c as i64 + r.ref_mod).max(0) as u64;
        }
        e.backrefs.retain(|_, c| *c > 0);
        e.refs = e.backrefs.values().sum();
    }
    e
}

/// [`RefVerify::check`] against the (locked) shard map holding `op`'s block.
fn check_in(
    shard: &mut BTreeMap<u64, BlockEntry>,
    op: &Op,
    serial: u64,
) -> Result<(), Box<VerifyError>> {
    let fail = |violation: Violation, block: Option<&BlockEntry>| {
        Box::new(VerifyError {
            violation,
            op: *op,
            block: block.cloned().unwrap_or_default(),
        })
    };
    let entry = shard.get(&op.bytenr);
    match op.action {
        Action::AddExtent => {
            if let Some(e) = entry {
                if e.refs > 0 {
                    return Err(fail(Violation::ReallocatedReferenced, Some(e)));
                }
            }
        }
        _ => {
            let Some(e) = entry else {
                return Err(fail(Violation::NoEntry, None));
            };
            if e.refs == 0 {
                return Err(fail(Violation::ZeroRefs, Some(e)));
            }
            let shape_ok = e.kind == Some(op.kind) && e.num_bytes == op.num_bytes;
            let data_shape_ok = e.kind.is_some_and(|k| k.is_data() == op.kind.is_data())
                && e.num_bytes == op.num_bytes;
            // An extent_op names no level (btrfs does not print one).
            let ok = if op.action == Action::UpdateHead {
                data_shape_ok
            } else {
                shape_ok
            };
            if !ok {
                return Err(fail(Violation::ShapeMismatch, Some(e)));
            }
            if op.action == Action::UpdateHead
                && op.kind.is_data()
                && op.extent_op.is_some_and(|x| x.flags_to_set != 0)
            {
                return Err(fail(Violation::ExtentOpOnData, Some(e)));
            }
            if let Some(key) = op.key {
                let have = e.backrefs.get(&key).copied().unwrap_or(0);
                if op.action == Action::DropRef && have == 0 {
                    return Err(fail(Violation::DropMissing, Some(e)));
                }
                if op.action == Action::AddRef && key.is_tree() && have >= 1 {
                    return Err(fail(Violation::DuplicateTreeRef, Some(e)));
                }
            }
        }
    }
    // Record.
    let e = shard.entry(op.bytenr).or_default();
    if op.action == Action::AddExtent {
        *e = BlockEntry {
            num_bytes: op.num_bytes,
            kind: Some(op.kind),
            ..BlockEntry::default()
        };
    }
    if let Some(key) = op.key {
        let c = e.backrefs.entry(key).or_insert(0);
        if op.ref_mod() > 0 {
            *c += 1;
            e.refs += 1;
        } else {
            *c -= 1;
            e.refs -= 1;
            if *c == 0 {
                e.backrefs.remove(&key);
            }
        }
    }
    if e.history.len() == HISTORY_MAX {
        e.history.pop_front();
    }
    e.history.push_back(ActionRecord { serial, op: *op });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(a: Action, key: RefKey) -> Op {
        Op::new(1 << 20, 16384, ExtentKind::Tree { level: 0 }, a, key, 0).unwrap()
    }

    #[test]
    fn catches_what_ref_verify_catches() {
        let v = RefVerify::new();
        let r5 = RefKey::TreeBlock { root: 5 };
        let r7 = RefKey::TreeBlock { root: 7 };
        assert_eq!(
            v.check(&op(Action::AddRef, r5)).unwrap_err().violation,
            Violation::NoEntry
        );
        v.check(&op(Action::AddExtent, r5)).unwrap();
        let e = v.check(&op(Action::AddRef, r5)).unwrap_err();
        assert_eq!(e.violation, Violation::DuplicateTreeRef);
        assert_eq!(e.block.history.len(), 1, "error carries the history");
        assert!(e.to_string().contains("ADD_EXTENT"));
        assert_eq!(
            v.check(&op(Action::DropRef, r7)).unwrap_err().violation,
            Violation::DropMissing
        );
        assert_eq!(
            v.check(&op(Action::AddExtent, r7)).unwrap_err().violation,
            Violation::ReallocatedReferenced
        );
        v.check(&op(Action::DropRef, r5)).unwrap();
        assert_eq!(
            v.check(&op(Action::AddRef, r7)).unwrap_err().violation,
            Violation::ZeroRefs
        );
        // Freed: re-allocation with another level is fine.
        let relevel = Op::new(
            1 << 20,
            16384,
            ExtentKind::Tree { level: 2 },
            Action::AddExtent,
            r7,
            0,
        )
        .unwrap();
        v.check(&relevel).unwrap();
        assert_eq!(
            v.check(&op(Action::AddRef, r5)).unwrap_err().violation,
            Violation::ShapeMismatch
        );
    }

    /// A batch is checked in order (its second op sees its first) and
    /// recorded all or nothing: a refused op restores every block the
    /// batch touched, also one it had created.
    #[test]
    fn batch_is_all_or_nothing() {
        let v = RefVerify::new();
        let r5 = RefKey::TreeBlock { root: 5 };
        let r7 = RefKey::TreeBlock { root: 7 };
        let other = |a: Action, key: RefKey| {
            Op::new(9 << 20, 16384, ExtentKind::Tree { level: 0 }, a, key, 0).unwrap()
        };
        v.check(&op(Action::AddExtent, r5)).unwrap();
        let before = v.block(1 << 20);
        let batch = [
            op(Action::AddRef, r7),
            other(Action::AddExtent, r5),
            op(Action::DropRef, r5),
            op(Action::DropRef, r5), // refused: r5 was just dropped
        ];
        let (index, e) = v.check_batch(&batch).unwrap_err();
        assert_eq!((index, e.violation), (3, Violation::DropMissing));
        assert_eq!(v.block(1 << 20), before, "restored");
        assert_eq!(v.block(9 << 20), None, "created by the batch: removed");
        // The same batch without its bad op is recorded whole.
        v.check_batch(&batch[..3]).unwrap();
        assert_eq!(v.block(1 << 20).unwrap().refs, 1);
        assert_eq!(v.block(9 << 20).unwrap().refs, 1);
    }

    #[test]
    fn rebuild_from_tree() {
        let mut tree = ExtentTree::new();
        let mut item = crate::extent_tree::ExtentItem::new(16384, ExtentKind::Tree { level: 0 }, 1);
        item.add_ref(RefKey::TreeBlock { root: 5 }, 1);
        tree.insert(1 << 20, item);
        let v = RefVerify::rebuild(&tree, &[]);
        assert_eq!(v.blocks(), 1);
        v.check(&op(Action::DropRef, RefKey::TreeBlock { root: 5 }))
            .unwrap();
        assert_eq!(v.block(1 << 20).unwrap().refs, 0);
    }
}
