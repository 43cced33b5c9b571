//! Concrete adversarial op streams at the boundaries the random generators
//! of `model.rs` rarely reach (values near `u64::MAX`, bytenr 0, extents
//! ending at the top of the address space, counters past 16 bits, every
//! refusal rule one by one): both stores and the sequential model
//! (`oracle.rs`) must agree on the tree, the freed and refused extents
//! after every commit and on every lookup before it, and the tree must
//! pass its invariants.
//!
//! Each case is named by what it attacks; the refusals expected are
//! asserted, so a rule wrong in the stores and the model alike fails too.

mod common;

use common::*;
use proptest::prelude::*;
use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::engine::{CommitReport, Engine};
use refd_core::model::{
    Action, DiskKey, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF,
};
use refd_core::oracle::{normalize_tree, Model};
use refd_core::run::RunError;

const DATA: ExtentKind = ExtentKind::Data;
const TREE0: ExtentKind = ExtentKind::Tree { level: 0 };

fn data_key(root: u64) -> RefKey {
    RefKey::ExtentData {
        root,
        objectid: 257,
        offset: 0,
    }
}

fn tree_key(root: u64) -> RefKey {
    RefKey::TreeBlock { root }
}

fn op(b: u64, n: u64, kind: ExtentKind, a: Action, key: RefKey) -> Op {
    Op::new(b, n, kind, a, key, 0).unwrap()
}

fn set_key(b: u64, n: u64, kind: ExtentKind, objectid: u64) -> Op {
    Op::update_head(
        b,
        n,
        kind,
        ExtentOp {
            flags_to_set: 0,
            key: Some(DiskKey {
                objectid,
                item_type: 84,
                offset: 0,
            }),
        },
    )
    .unwrap()
}

fn full_backref(b: u64, n: u64, kind: ExtentKind) -> Op {
    Op::update_head(
        b,
        n,
        kind,
        ExtentOp {
            flags_to_set: BLOCK_FLAG_FULL_BACKREF,
            key: None,
        },
    )
    .unwrap()
}

/// The errors of a commit's refused heads, in bytenr order.
fn errors(r: &CommitReport) -> Vec<&RunError> {
    r.quarantined.iter().map(|q| &q.error).collect()
}

const MIB: u64 = 1 << 20;

/// Drops past the count: within one transaction, across commits, and of a
/// backref never added. Each is `DropMissingRef`; the extent stays.
#[test]
fn drops_past_the_count_are_refused() {
    let b = MIB;
    let d = |a, root| op(b, 4096, DATA, a, data_key(root));
    let r = agree(&[
        // Allocated and dropped twice in one transaction.
        vec![
            d(Action::AddExtent, 5),
            d(Action::DropRef, 5),
            d(Action::DropRef, 5),
        ],
        vec![d(Action::AddExtent, 5)],
        // Dropped twice across a commit boundary (second in the next).
        vec![d(Action::DropRef, 5), d(Action::DropRef, 5)],
        // A backref never added.
        vec![d(Action::DropRef, 6)],
        // One add and two drops of another key: net -1.
        vec![
            d(Action::AddRef, 6),
            d(Action::DropRef, 6),
            d(Action::DropRef, 6),
        ],
        vec![d(Action::DropRef, 5)],
    ]);
    for n in [0, 2, 3, 4] {
        assert!(
            matches!(errors(&r[n])[..], [RunError::DropMissingRef { .. }]),
            "commit {n}: {:?}",
            r[n].quarantined
        );
    }
    assert_eq!(r[5].freed.len(), 1, "the last real drop frees it");
}

/// An add and a drop cancelling to zero: on a missing extent inside one
/// transaction nothing happens (cancelled ops are not validated, as the
/// kernel never runs a ref whose ref_mod merged to 0); split by a commit,
/// the add is refused (no extent) and so is the drop after it.
#[test]
fn add_drop_cancelling_around_a_commit() {
    let b = 2 * MIB;
    let d = |a| op(b, 4096, DATA, a, data_key(5));
    let r = agree(&[
        vec![d(Action::AddRef), d(Action::DropRef)],
        vec![d(Action::AddRef)],
        vec![d(Action::DropRef)],
    ]);
    assert!(r[0].quarantined.is_empty() && r[0].applied == 0);
    assert!(matches!(
        errors(&r[1])[..],
        [RunError::AddToMissingExtent { .. }]
    ));
    assert!(matches!(
        errors(&r[2])[..],
        [RunError::DropMissingRef { .. }]
    ));
}

/// Free and allocate again in one transaction with another kind and
/// backref kind (data -> tree block -> data), and with another tree level;
/// then a ref naming the old kind or level after the new life is committed.
#[test]
fn realloc_with_another_kind_or_level() {
    let b = 3 * MIB;
    let d = |a, root| op(b, 4096, DATA, a, data_key(root));
    let t = |a, level, root| op(b, 16384, ExtentKind::Tree { level }, a, tree_key(root));
    let r = agree(&[
        vec![d(Action::AddExtent, 5)],
        vec![d(Action::DropRef, 5), t(Action::AddExtent, 1, 5)],
        // The old kind's ref after the commit: the extent is a tree block.
        vec![d(Action::AddRef, 6)],
        // A level the block does not have.
        vec![t(Action::AddRef, 0, 6)],
        // Freed and allocated again at level 0 with a data life between.
        vec![
            t(Action::DropRef, 1, 5),
            d(Action::AddExtent, 7),
            d(Action::DropRef, 7),
            t(Action::AddExtent, 0, 8),
        ],
    ]);
    assert!(r[1].quarantined.is_empty(), "{:?}", r[1].quarantined);
    assert!(matches!(
        errors(&r[2])[..],
        [RunError::ShapeMismatch { .. }]
    ));
    assert!(matches!(
        errors(&r[3])[..],
        [RunError::ShapeMismatch { .. }]
    ));
    assert!(r[4].quarantined.is_empty(), "{:?}", r[4].quarantined);
}

/// Ops naming one bytenr with different sizes or levels and no allocation:
/// `MixedShapes`, even when the odd one cancels; a tree block backref
/// added twice (count 2) is `DuplicateTreeRef`; SHARED and keyed backrefs
/// of one tree block live side by side.
#[test]
fn shapes_and_tree_backrefs() {
    let b = 4 * MIB;
    let t = |a, n, level, k| op(b, n, ExtentKind::Tree { level }, a, k);
    let shared = RefKey::SharedBlock { parent: 8 * MIB };
    let r = agree(&[
        vec![t(Action::AddExtent, 16384, 0, tree_key(5))],
        vec![
            t(Action::AddRef, 16384, 0, tree_key(6)),
            t(Action::AddRef, 8192, 0, tree_key(7)),
            t(Action::DropRef, 8192, 0, tree_key(7)),
        ],
        vec![
            t(Action::AddRef, 16384, 0, tree_key(6)),
            t(Action::AddRef, 16384, 1, tree_key(7)),
        ],
        vec![t(Action::AddRef, 16384, 0, tree_key(5))],
        vec![t(Action::AddRef, 16384, 0, shared)],
        vec![t(Action::DropRef, 16384, 0, tree_key(5))],
        vec![t(Action::DropRef, 16384, 0, shared)],
    ]);
    assert!(matches!(errors(&r[1])[..], [RunError::MixedShapes { .. }]));
    assert!(matches!(errors(&r[2])[..], [RunError::MixedShapes { .. }]));
    assert!(matches!(
        errors(&r[3])[..],
        [RunError::DuplicateTreeRef { count: 2, .. }]
    ));
    assert!(r[4].quarantined.is_empty() && r[5].quarantined.is_empty());
    assert!(r[5].freed.is_empty(), "the shared backref keeps it");
    assert_eq!(r[6].freed.len(), 1);
}

/// Extents at the ends of the address space: bytenr 0, an extent ending
/// exactly at `u64::MAX`, one of `u64::MAX` bytes at 0 (covering every
/// other), and an allocation at the last byte. Overlap arithmetic must not
/// wrap; the tree must hold no overlap.
#[test]
fn extents_at_the_ends_of_the_address_space() {
    let top = u64::MAX - 16384;
    let d = |b, n, a, root| op(b, n, DATA, a, data_key(root));
    let r = agree(&[
        vec![
            d(0, 4096, Action::AddExtent, 5),
            d(top, 16384, Action::AddExtent, 5),
        ],
        // Inside the top extent, the last byte.
        vec![d(u64::MAX - 1, 1, Action::AddExtent, 6)],
        // Everything but the last byte, from 0: meets both.
        vec![d(0, u64::MAX - 1, Action::AddExtent, 6)],
        // Free both and allocate the whole space but the last byte.
        vec![
            d(0, 4096, Action::DropRef, 5),
            d(top, 16384, Action::DropRef, 5),
            d(0, u64::MAX - 1, Action::AddExtent, 7),
        ],
        // The last byte is outside it.
        vec![d(u64::MAX - 1, 1, Action::AddExtent, 8)],
        // Anything else is inside.
        vec![d(top, 4096, Action::AddExtent, 9)],
    ]);
    assert!(r[0].quarantined.is_empty());
    assert!(matches!(
        errors(&r[1])[..],
        [RunError::OverlapsExtent { .. }]
    ));
    assert!(
        matches!(errors(&r[2])[..], [RunError::ReallocWhileReferenced { .. }]),
        "{:?}",
        r[2].quarantined
    );
    assert!(r[3].quarantined.is_empty(), "{:?}", r[3].quarantined);
    assert!(r[4].quarantined.is_empty(), "{:?}", r[4].quarantined);
    assert!(matches!(
        errors(&r[5])[..],
        [RunError::OverlapsExtent { other: 0, .. }]
    ));
}

/// extent_ops where the kernel has none to update: on a missing extent,
/// on a data extent (a flag only: a key on data is invalid as an op),
/// and one queued for a life that ends in the same transaction (it must
/// not reach the next life).
#[test]
fn extent_ops_on_missing_data_and_ended_lives() {
    let b = 5 * MIB;
    let t = |a, root| op(b, 16384, TREE0, a, tree_key(root));
    let r = agree(&[
        vec![set_key(b, 16384, TREE0, 300)],
        vec![op(b, 4096, DATA, Action::AddExtent, data_key(5))],
        vec![full_backref(b, 4096, DATA)],
        vec![
            op(b, 4096, DATA, Action::DropRef, data_key(5)),
            t(Action::AddExtent, 5),
            set_key(b, 16384, TREE0, 301),
        ],
        vec![
            full_backref(b, 16384, TREE0),
            set_key(b, 16384, TREE0, 302),
            t(Action::DropRef, 5),
            t(Action::AddExtent, 6),
        ],
    ]);
    assert!(matches!(
        errors(&r[0])[..],
        [RunError::ExtentOpOnMissing { .. }]
    ));
    assert!(matches!(
        errors(&r[2])[..],
        [RunError::ExtentOpOnData { .. }]
    ));
    assert!(r[3].quarantined.is_empty() && r[4].quarantined.is_empty());
}

/// Many references on one data backref, added and dropped in one
/// transaction and across commits: counts are exact far past 16 bits.
#[test]
fn counts_past_sixteen_bits_are_exact() {
    let b = 6 * MIB;
    let d = |a| op(b, 4096, DATA, a, data_key(5));
    let n = 70_000;
    let mut first = vec![d(Action::AddExtent)];
    first.extend(std::iter::repeat_n(d(Action::AddRef), n));
    let r = agree(&[
        first,
        std::iter::repeat_n(d(Action::DropRef), n).collect(),
        vec![d(Action::DropRef), d(Action::DropRef)],
    ]);
    assert!(r[1].quarantined.is_empty());
    assert!(matches!(
        errors(&r[2])[..],
        [RunError::DropMissingRef { .. }]
    ));
}

/// The seed's 4.2 regression with a barrier held between the ops: the
/// allocation, its drop (freed in the same transaction) and the second
/// allocation carry rising seqs; while the barrier holds them the head is
/// held whole (never an ADD run before the DROP it cancels), and once it
/// is released one commit runs them merged. Both stores and the model.
#[test]
fn seq_merge_regression_across_a_held_barrier() {
    fn go<S: DelayedRefStore>(store: S) -> Vec<refd_core::oracle::NormExtent> {
        let e = Engine::new(store);
        let mut model = Model::new();
        let b = 7 * MIB;
        let mut h = e.handle().unwrap();
        let guard = e.barrier().acquire();
        let seq = e.barrier().current();
        for (action, s) in [
            (Action::AddExtent, 0),
            (Action::DropRef, seq),
            (Action::AddExtent, seq + 1),
        ] {
            let o = Op::new(b, 16384, TREE0, action, tree_key(5), s).unwrap();
            h.add(&o).unwrap();
            model.add(&o);
        }
        let low = e.barrier().lowest();
        let (r, m) = (e.commit(), model.commit(low));
        assert_eq!((r.held, r.quarantined.len()), (1, 0));
        assert_eq!(m.held, vec![b]);
        drop(guard);
        let (r, m) = (e.commit(), model.commit(e.barrier().lowest()));
        assert!(r.quarantined.is_empty() && m.quarantined.is_empty());
        let tree = normalize_tree(&e.tree());
        assert_eq!(tree, model.normalized());
        tree
    }
    let lf = go(LockFreeStore::with_config(2, 2));
    assert_eq!(lf, go(MutexStore::new()));
    assert_eq!(lf.len(), 1);
    assert_eq!(lf[0].backrefs, vec![(tree_key(5), 1)]);
}

/// `allocs` allocations of one data backref in one transaction, each but
/// the last `lives_ended` followed by its drop.
fn allocations(b: u64, allocs: usize, lives_ended: usize) -> Vec<Op> {
    let d = |a| op(b, 4096, DATA, a, data_key(5));
    let mut ops = Vec::with_capacity(allocs + lives_ended);
    for i in 0..allocs {
        ops.push(d(Action::AddExtent));
        if i < lives_ended {
            ops.push(d(Action::DropRef));
        }
    }
    ops
}

/// More allocations of one extent in one transaction than 16 bits count,
/// with one drop too few for them all to be lives of their own: 65537
/// `ADD_EXTENT`s of one data backref and 65535 drops leave two
/// allocations without a free between them (the kernel's second insert
/// of one extent item, -EEXIST). The stores counted allocations in 16
/// saturating bits, so they needed only 65534 drops and committed the
/// extent with count 2 where the model refused it. Now a head that
/// reaches the count is refused whatever its drops (refd's limit, stated
/// by the model too); below it the count is exact.
#[test]
fn allocations_past_sixteen_bits_are_counted_exactly() {
    let b = 8 * MIB;
    let max = usize::from(refd_core::head::ALLOCS_COUNTED_MAX);
    for (allocs, ended) in [(max + 2, max), (max + 2, max + 1), (max, max - 1)] {
        let r = agree(&[allocations(b, allocs, ended)]);
        assert!(
            matches!(errors(&r[0])[..], [RunError::TooManyAllocations { .. }]),
            "{allocs} allocations: {:?}",
            r[0].quarantined
        );
    }
    let r = agree(&[allocations(b, max - 1, max - 3)]);
    assert!(
        matches!(
            errors(&r[0])[..],
            [RunError::AllocatedTwice {
                drops: 65532,
                needed: 65533,
                ..
            }]
        ),
        "{:?}",
        r[0].quarantined
    );
    let r = agree(&[allocations(b, max - 1, max - 2)]);
    assert!(r[0].quarantined.is_empty(), "{:?}", r[0].quarantined);
}

/// Bytenrs at the edges: 0, a few in the first pages, and the same near
/// the top of the address space, so extents meet, nest and end at
/// `u64::MAX`.
const EDGE_BYTENRS: [u64; 8] = [
    0,
    4096,
    8192,
    65536,
    u64::MAX - 65536,
    u64::MAX - 8192,
    u64::MAX - 4096,
    u64::MAX - 1,
];

/// One op of the boundary generator: bytenr `b` of [`EDGE_BYTENRS`],
/// size class `n` (1 byte, a page, two, up to the end of the space),
/// kind, action and key; `None` when the size does not fit below
/// `u64::MAX` (such an op is invalid and never reaches a store).
fn edge_op(b: u8, n: u8, tree: bool, act: u8, key: u8) -> Option<Op> {
    let bytenr = EDGE_BYTENRS[usize::from(b) % EDGE_BYTENRS.len()];
    let num_bytes = match n % 4 {
        0 => 1,
        1 => 4096,
        2 => 8192,
        _ => (u64::MAX - bytenr).max(1),
    };
    bytenr.checked_add(num_bytes)?;
    let kind = if tree { TREE0 } else { DATA };
    let action = match act % 8 {
        0..=2 => Action::AddExtent,
        3 | 4 => Action::AddRef,
        5 | 6 => Action::DropRef,
        _ => return Some(full_backref(bytenr, num_bytes, kind)),
    };
    let k = u64::from(key % 3);
    let key = match (tree, key % 2) {
        (true, 0) => tree_key(5 + k),
        (true, _) => RefKey::SharedBlock { parent: 4096 << k },
        (false, 0) => data_key(5 + k),
        (false, _) => RefKey::SharedData { parent: 4096 << k },
    };
    Some(op(bytenr, num_bytes, kind, action, key))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), ..ProptestConfig::default() })]

    /// Random streams over [`EDGE_BYTENRS`] with sizes up to the end of
    /// the address space, both kinds and every action, over a few
    /// commits: both stores and the model agree and the tree never
    /// overlaps (the `model.rs` generators keep every extent within the
    /// first 16 MiB).
    #[test]
    fn edges_of_the_address_space_agree(
        commits in prop::collection::vec(
            prop::collection::vec((0u8..8, 0u8..4, any::<bool>(), 0u8..8, 0u8..6), 1..16),
            1..6,
        )
    ) {
        let ops: Vec<Vec<Op>> = commits
            .iter()
            .map(|c| c.iter().filter_map(|&(b, n, t, a, k)| edge_op(b, n, t, a, k)).collect())
            .collect();
        agree(&ops);
    }
}

/// A data backref at the most references its item can store (btrfs
/// keeps data backref counts in 32 bits, and so does refd's on-device
/// format) gets one more, alone or with a re-allocation of the extent
/// keeping the count. The stores accepted it and the durable commit then
/// failed to encode the item, latching the engine, and every restart
/// replayed the same ops into the same failure. Refused like any count
/// that does not fit (`CountOverflow`), in both stores and the model;
/// starting from a committed count of `u32::MAX` (no test can send 2^32
/// ops).
#[test]
fn a_data_backref_count_past_32_bits_is_refused() {
    use refd_core::extent_tree::{ExtentItem, ExtentTree, BACKREF_COUNT_MAX};
    use refd_core::oracle::ModelExtent;
    let b = 9 * MIB;
    let key = data_key(5);
    let mut tree = ExtentTree::new();
    tree.insert(
        b,
        ExtentItem::new(4096, DATA, 1).with_refs(&[(key, BACKREF_COUNT_MAX as i64)]),
    );
    let commit = |ops: &[Op]| {
        let lf = Engine::with_tree(LockFreeStore::with_config(2, 2), tree.clone(), 1);
        let mx = Engine::with_tree(MutexStore::new(), tree.clone(), 1);
        let mut model = Model::new();
        model.generation = 1;
        model.extents.insert(
            b,
            ModelExtent {
                num_bytes: 4096,
                kind: DATA,
                full_backref: false,
                tree_key: None,
                generation: 1,
                refs: [(key, BACKREF_COUNT_MAX)].into(),
            },
        );
        for o in ops {
            lf.handle().unwrap().add(o).unwrap();
            mx.handle().unwrap().add(o).unwrap();
            model.add(o);
        }
        let (r_lf, r_mx, m) = (lf.commit(), mx.commit(), model.commit(0));
        assert_eq!(r_lf.quarantined, r_mx.quarantined);
        let refused: Vec<u64> = r_lf.quarantined.iter().map(|q| q.head.bytenr).collect();
        assert_eq!(refused, m.quarantined);
        assert_eq!(normalize_tree(&lf.tree()), model.normalized());
        assert_eq!(normalize_tree(&mx.tree()), model.normalized());
        r_lf
    };
    let d = |a| op(b, 4096, DATA, a, key);
    let r = commit(&[d(Action::AddRef)]);
    assert!(
        matches!(errors(&r)[..], [RunError::CountOverflow { .. }]),
        "{:?}",
        r.quarantined
    );
    // Freed and allocated again in one transaction: the new life counts
    // from what the drops leave.
    let mut ops: Vec<Op> = vec![d(Action::DropRef), d(Action::AddExtent), d(Action::AddRef)];
    let r = commit(&ops);
    assert!(
        matches!(errors(&r)[..], [RunError::ReallocWhileReferenced { .. }]),
        "{:?}",
        r.quarantined
    );
    ops = vec![d(Action::AddRef), d(Action::DropRef)];
    let r = commit(&ops);
    assert!(
        r.quarantined.is_empty() && r.applied == 0,
        "cancelled: nothing to check"
    );
    let r = commit(&[d(Action::DropRef), d(Action::AddRef), d(Action::AddRef)]);
    assert!(matches!(errors(&r)[..], [RunError::CountOverflow { .. }]));
    let r = commit(&[d(Action::DropRef)]);
    assert!(r.quarantined.is_empty());
}

/// A head requeued into the live transaction (recovery requeues the
/// heads a seq barrier held, their seqs forgotten) whose refs cancel: an
/// `ADD_REF` naming level 0 and a `DROP_REF` naming level 1 of one tree
/// block. Alone it changes nothing, but it named two shapes, so with an
/// extent_op queued after it the head must be refused (`MixedShapes`), as
/// the model and the mutex store do. The lock-free store merged its carry
/// with `merge_heads`, which drops no-op heads, before the final merge:
/// the shapes were lost and the extent_op applied (found by
/// `ioring/durable/tests/oracle_restarts.rs`, seed 51: held across a
/// restart).
#[test]
fn a_requeued_head_whose_refs_cancel_keeps_its_shapes() {
    use refd_core::extent_tree::{ExtentItem, ExtentTree};
    use refd_core::head::Head;
    use refd_core::oracle::ModelExtent;
    let b = 10 * MIB;
    let t = |a, level| op(b, 16384, ExtentKind::Tree { level }, a, tree_key(6));
    let held = [t(Action::AddRef, 0), t(Action::DropRef, 1)];
    let eop = full_backref(b, 4096, DATA);
    let mut tree = ExtentTree::new();
    tree.insert(
        b,
        ExtentItem::new(16384, TREE0, 1).with_refs(&[(tree_key(7), 1)]),
    );
    let mut model = Model::new();
    model.generation = 1;
    model.extents.insert(
        b,
        ModelExtent {
            num_bytes: 16384,
            kind: TREE0,
            full_backref: false,
            tree_key: None,
            generation: 1,
            refs: [(tree_key(7), 1)].into(),
        },
    );
    held.iter().chain([&eop]).for_each(|o| model.add(o));
    let m = model.commit(0);
    assert_eq!(m.quarantined, vec![b]);
    fn go<S: DelayedRefStore>(store: S, tree: &ExtentTree, held: &[Op], eop: &Op) -> CommitReport {
        let e = Engine::with_tree(store, tree.clone(), 1);
        let mut head = Head::of_op(&held[0], 0);
        head.merge(&Head::of_op(&held[1], 0));
        e.requeue(vec![head]).unwrap();
        e.handle().unwrap().add(eop).unwrap();
        let r = e.commit();
        assert_eq!(normalize_tree(&e.tree()), normalize_tree(tree), "unchanged");
        r
    }
    let lf = go(LockFreeStore::with_config(2, 2), &tree, &held, &eop);
    let mx = go(MutexStore::new(), &tree, &held, &eop);
    assert!(
        matches!(errors(&lf)[..], [RunError::MixedShapes { .. }]),
        "{:?}",
        lf.quarantined
    );
    assert_eq!(lf.quarantined, mx.quarantined);
}
