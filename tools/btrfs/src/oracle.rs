//! The reference semantics of a trace: a simple sequential applier.
//!
//! This is the oracle the engine is compared against: no delayed refs, no
//! merging, no concurrency — each op is applied to the extent tree the
//! moment it comes, in the kernel's queue order:
//!
//! - `AddExtent`: creates the extent item (size and kind from the op, the
//!   extent_op's flags OR-ed in) with the op's backref at count 1. The
//!   bytenr must be free: an extent whose count dropped to zero was removed,
//!   so a bytenr freed earlier in the trace may be allocated again, with
//!   another size or kind;
//! - `AddRef` / `DropRef`: change the backref's count by one; the extent
//!   must exist with the op's size and kind, a dropped backref must exist,
//!   and a tree block backref cannot be added twice. An extent whose `refs`
//!   reaches zero is removed;
//! - `UpdateHead`: ORs `flags_to_set` (FULL_BACKREF) into an existing tree
//!   block; its level is taken from the extent (the trace does not print
//!   it, see [`crate::trace`]).
//!
//! Any op that does not fit is a typed [`ApplyError`], never a panic.

use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{Action, ExtentKind, Op, RefKey};

use crate::trace::{TraceError, TraceItem, TracedOp};

/// Why an op does not apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// `AddExtent` on a bytenr that holds a live extent.
    #[error("extent {bytenr}: ADD_EXTENT but the extent exists with {refs} refs")]
    ExtentExists {
        /// Extent.
        bytenr: u64,
        /// Its current refs.
        refs: u64,
    },
    /// An op on an extent that does not exist.
    #[error("extent {bytenr}: {action} on a missing extent")]
    NoExtent {
        /// Extent.
        bytenr: u64,
        /// The op's action.
        action: Action,
    },
    /// The op's size differs from the extent's.
    #[error("extent {bytenr}: op num_bytes {op} but the extent has {extent}")]
    SizeMismatch {
        /// Extent.
        bytenr: u64,
        /// Size of the extent.
        extent: u64,
        /// Size in the op.
        op: u64,
    },
    /// The op's kind (or tree level) differs from the extent's.
    #[error("extent {bytenr}: op on a {op} but the extent is a {extent}")]
    KindMismatch {
        /// Extent.
        bytenr: u64,
        /// Kind of the extent.
        extent: ExtentKind,
        /// Kind in the op.
        op: ExtentKind,
    },
    /// `DropRef` of a backref the extent does not have.
    #[error("extent {bytenr}: DROP_REF of absent backref '{key}'")]
    NoBackref {
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
    },
    /// A tree block backref added while present.
    #[error("extent {bytenr}: tree backref '{key}' added twice")]
    TreeRefTwice {
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
    },
    /// A reference op without a key (not produced by [`Op`] constructors).
    #[error("extent {bytenr}: {action} without a backref")]
    NoKey {
        /// Extent.
        bytenr: u64,
        /// The op's action.
        action: Action,
    },
}

/// Apply one op to `tree` (see the module doc). On error `tree` is
/// unchanged.
pub fn reference_apply(tree: &mut ExtentTree, op: &Op) -> Result<(), ApplyError> {
    let bytenr = op.bytenr;
    if op.action == Action::UpdateHead {
        let item = tree.get(bytenr).ok_or(ApplyError::NoExtent {
            bytenr,
            action: op.action,
        })?;
        if item.kind.is_data() {
            return Err(ApplyError::KindMismatch {
                bytenr,
                extent: item.kind,
                op: op.kind,
            });
        }
        let flags = op.extent_op.map_or(0, |e| e.flags_to_set);
        if item.flags & flags != flags {
            if let Some(mut item) = tree.remove(bytenr) {
                item.flags |= flags;
                tree.insert(bytenr, item);
            }
        }
        return Ok(());
    }
    let key = op.key.ok_or(ApplyError::NoKey {
        bytenr,
        action: op.action,
    })?;
    if op.action == Action::AddExtent {
        if let Some(item) = tree.get(bytenr) {
            return Err(ApplyError::ExtentExists {
                bytenr,
                refs: item.refs,
            });
        }
        let mut item = ExtentItem::new(op.num_bytes, op.kind, 0);
        item.flags |= op.extent_op.map_or(0, |e| e.flags_to_set);
        item.add_ref(key, 1);
        tree.insert(bytenr, item);
        return Ok(());
    }
    let item = tree.get(bytenr).ok_or(ApplyError::NoExtent {
        bytenr,
        action: op.action,
    })?;
    if item.num_bytes != op.num_bytes {
        return Err(ApplyError::SizeMismatch {
            bytenr,
            extent: item.num_bytes,
            op: op.num_bytes,
        });
    }
    if item.kind != op.kind {
        return Err(ApplyError::KindMismatch {
            bytenr,
            extent: item.kind,
            op: op.kind,
        });
    }
    let count = item.count(&key);
    let delta = match op.action {
        Action::DropRef if count == 0 => return Err(ApplyError::NoBackref { bytenr, key }),
        Action::DropRef => -1,
        _ if key.is_tree() && count > 0 => return Err(ApplyError::TreeRefTwice { bytenr, key }),
        _ => 1,
    };
    if let Some(mut item) = tree.remove(bytenr) {
        item.add_ref(key, delta);
        if item.refs > 0 {
            tree.insert(bytenr, item);
        }
    }
    Ok(())
}

/// Why a reference replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace could not be read.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// An op did not apply.
    #[error("op of head line {} (ref line {}) {}: {source}", .op.head_line, .op.ref_line.map_or_else(|| "-".to_string(), |l| l.to_string()), .op.op)]
    Apply {
        /// The op, with its lines (boxed: it is large).
        op: Box<TracedOp>,
        /// Why.
        #[source]
        source: ApplyError,
    },
}

/// Apply every op of a trace stream to `tree` with [`reference_apply`];
/// returns the number of ops applied. Run items are ignored.
pub fn replay_reference(
    tree: &mut ExtentTree,
    items: impl IntoIterator<Item = Result<TraceItem, TraceError>>,
) -> Result<u64, ReplayError> {
    let mut applied = 0;
    for item in items {
        if let TraceItem::Op(op) = item? {
            reference_apply(tree, &op.op).map_err(|source| ReplayError::Apply {
                op: Box::new(op),
                source,
            })?;
            applied += 1;
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use refd_core::model::{ExtentOp, BLOCK_FLAG_FULL_BACKREF};

    const B: u64 = 1 << 20;
    const LEAF: ExtentKind = ExtentKind::Tree { level: 0 };

    fn tree_op(action: Action, key: RefKey) -> Op {
        Op::new(B, 16384, LEAF, action, key, 0).unwrap()
    }

    #[test]
    fn lifecycle_and_reuse() {
        let mut t = ExtentTree::new();
        let root5 = RefKey::TreeBlock { root: 5 };
        let shared = RefKey::SharedBlock { parent: 2 * B };
        reference_apply(&mut t, &tree_op(Action::AddExtent, root5)).unwrap();
        reference_apply(&mut t, &tree_op(Action::AddRef, shared)).unwrap();
        assert_eq!(t.get(B).unwrap().refs, 2);
        let fb = Op::update_head(
            B,
            16384,
            ExtentKind::Tree { level: 0 },
            ExtentOp {
                flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                key: None,
            },
        )
        .unwrap();
        reference_apply(&mut t, &fb).unwrap();
        assert!(t.get(B).unwrap().full_backref());
        assert_eq!(
            reference_apply(&mut t, &tree_op(Action::AddRef, root5)),
            Err(ApplyError::TreeRefTwice {
                bytenr: B,
                key: root5
            })
        );
        assert_eq!(
            reference_apply(&mut t, &tree_op(Action::AddExtent, root5)),
            Err(ApplyError::ExtentExists { bytenr: B, refs: 2 })
        );
        reference_apply(&mut t, &tree_op(Action::DropRef, root5)).unwrap();
        reference_apply(&mut t, &tree_op(Action::DropRef, shared)).unwrap();
        assert!(t.is_empty());
        assert_eq!(
            reference_apply(&mut t, &tree_op(Action::DropRef, shared)),
            Err(ApplyError::NoExtent {
                bytenr: B,
                action: Action::DropRef
            })
        );
        // Reuse with another size and kind.
        let edr = RefKey::ExtentData {
            root: 5,
            objectid: 257,
            offset: 0,
        };
        let data = Op::new(B, 8192, ExtentKind::Data, Action::AddExtent, edr, 0).unwrap();
        reference_apply(&mut t, &data).unwrap();
        let wrong = Op::new(B, 4096, ExtentKind::Data, Action::AddRef, edr, 0).unwrap();
        assert!(matches!(
            reference_apply(&mut t, &wrong),
            Err(ApplyError::SizeMismatch { .. })
        ));
        assert!(matches!(
            reference_apply(&mut t, &tree_op(Action::AddRef, root5)),
            Err(ApplyError::SizeMismatch { .. })
        ));
        assert!(matches!(
            reference_apply(&mut t, &fb),
            Err(ApplyError::KindMismatch { .. })
        ));
        let add = Op::new(B, 8192, ExtentKind::Data, Action::AddRef, edr, 0).unwrap();
        reference_apply(&mut t, &add).unwrap();
        assert_eq!(t.get(B).unwrap().count(&edr), 2);
        let other = RefKey::SharedData { parent: 3 * B };
        let drop = Op::new(B, 8192, ExtentKind::Data, Action::DropRef, other, 0).unwrap();
        assert_eq!(
            reference_apply(&mut t, &drop),
            Err(ApplyError::NoBackref {
                bytenr: B,
                key: other
            })
        );
        t.check().unwrap();
    }

    #[test]
    fn reloc_block_is_created_with_full_backref() {
        let mut t = ExtentTree::new();
        let op = tree_op(Action::AddExtent, RefKey::SharedBlock { parent: B })
            .with_extent_op(ExtentOp {
                flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                key: None,
            })
            .unwrap();
        reference_apply(&mut t, &op).unwrap();
        let item = t.get(B).unwrap();
        assert!(item.full_backref());
        item.check().unwrap();
    }
}
