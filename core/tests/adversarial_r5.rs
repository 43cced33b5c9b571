//! Adversarial op streams, round 5: refd's semantics against the kernel's
//! delayed refs (`../shared/seeds/`: `btrfs-delayed-ref-6.x.c`, the 4.2
//! seq-merge regression fix, `btrfs-ref-verify.c`).
//!
//! Each test is a concrete stream with seq barriers acquired and released
//! between its ops and commits, run through the lock-free store (two
//! configurations: staging buffers of 2 ops, so every op goes through
//! hand-offs and runs, and of 64 ops, so hot extents are summed in their
//! cells), the mutex store and the sequential model (`oracle.rs`). They
//! must agree after every commit on the tree, the freed, refused and held
//! extents and the freed list, and before it on every lookup. The outcome
//! the kernel gives, or why refd differs, is stated on each test with the
//! seed function it comes from, and asserted.

mod common;

use common::*;
use refd_core::barrier::SeqGuard;
use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::{DelayedRefStore, StoreError};
use refd_core::engine::{CommitReport, Engine, EngineError};
use refd_core::model::{
    Action, DiskKey, ExtentKind, ExtentOp, Op, OpError, RawOp, RefKey, BLOCK_FLAG_FULL_BACKREF,
    EXTENT_DATA_REF_KEY, SEQ_MAX, TREE_BLOCK_REF_KEY,
};
use refd_core::oracle::{Model, ModelCommit};
use refd_core::run::RunError;

const DATA: ExtentKind = ExtentKind::Data;
const TREE0: ExtentKind = ExtentKind::Tree { level: 0 };
const MIB: u64 = 1 << 20;

/// One step of a stream.
#[derive(Clone, Debug)]
enum Step {
    /// Queue an op (in every engine and the model).
    Op(Op),
    /// Take a seq barrier (the n-th `Acquire` of the stream is barrier n,
    /// holding seq n + 1 as no other takes one).
    Acquire,
    /// Release barrier n.
    Release(usize),
    /// Check the lookup of every bytenr named so far.
    Lookup,
    /// Commit (the lowest barrier held then applies).
    Commit,
}

use Step::{Acquire, Commit, Lookup, Release};

/// Pending ops up to which a commit checks every lookup first.
const LOOKUP_PENDING_MAX: usize = 4096;

/// What each commit gave: the lock-free report (staging of 2 ops) and the
/// model's.
struct Run {
    reports: Vec<CommitReport>,
    models: Vec<ModelCommit>,
}

impl Run {
    fn errors(&self, n: usize) -> Vec<&RunError> {
        self.reports[n]
            .quarantined
            .iter()
            .map(|q| &q.error)
            .collect()
    }
}

/// Run `steps` through the lock-free store (staging of 2 and of 64 ops),
/// the mutex store and the model, checking that they agree at every
/// `Lookup` and `Commit`.
fn agree_steps(steps: &[Step]) -> Run {
    let lf = Engine::new(LockFreeStore::with_config(2, 2));
    let hot = Engine::new(LockFreeStore::with_config(1, 64));
    let mx = Engine::new(MutexStore::new());
    let mut model = Model::new();
    let mut lf_h = [lf.handle().unwrap(), lf.handle().unwrap()];
    let mut hot_h = hot.handle().unwrap();
    let mut mx_h = mx.handle().unwrap();
    let mut guards: Vec<Option<[SeqGuard; 3]>> = Vec::new();
    let mut named: Vec<u64> = Vec::new();
    let mut run = Run {
        reports: Vec::new(),
        models: Vec::new(),
    };
    let mut queued = 0usize;
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Op(op) => {
                lf_h[queued % 2].add(op).unwrap();
                hot_h.add(op).unwrap();
                mx_h.add(op).unwrap();
                model.add(op);
                queued += 1;
                if let Err(at) = named.binary_search(&op.bytenr) {
                    named.insert(at, op.bytenr);
                }
            }
            Step::Acquire => {
                let g = [
                    lf.barrier().acquire(),
                    hot.barrier().acquire(),
                    mx.barrier().acquire(),
                ];
                assert!(g[0].seq() == g[1].seq() && g[1].seq() == g[2].seq());
                guards.push(Some(g));
            }
            Step::Release(n) => {
                // Releasing one already released changes nothing.
                guards[*n].take();
            }
            Step::Lookup => {
                for &b in &named {
                    let want = model.lookup(b);
                    assert_eq!(lf.lookup_extent_ref(b).refs, want, "step {i}: lookup {b}");
                    assert_eq!(hot.lookup_extent_ref(b).refs, want, "step {i}: hot {b}");
                    assert_eq!(mx.lookup_extent_ref(b).refs, want, "step {i}: mutex {b}");
                    // The whole pending state, and the summary a count
                    // lookup folds (from hot cells where it can): the
                    // stores stamp the same ops in the same order.
                    let pending = mx.store().pending(b);
                    assert_eq!(lf.store().pending(b), pending, "step {i}: pending {b}");
                    assert_eq!(hot.store().pending(b), pending, "step {i}: hot pending {b}");
                    let summary = pending.map(|h| h.summary);
                    assert_eq!(hot.store().pending_summary(b), summary, "step {i}: hot {b}");
                    assert_eq!(lf.store().pending_summary(b), summary, "step {i}: {b}");
                }
            }
            Step::Commit => {
                // The model's lookup scans every pending op: skipped for the
                // streams of tens of thousands of ops (their `Lookup`
                // steps still check).
                let few = model.pending().count() <= LOOKUP_PENDING_MAX;
                for &b in named.iter().filter(|_| few) {
                    let want = model.lookup(b);
                    assert_eq!(lf.lookup_extent_ref(b).refs, want, "step {i}: lookup {b}");
                    assert_eq!(hot.lookup_extent_ref(b).refs, want, "step {i}: hot {b}");
                    assert_eq!(mx.lookup_extent_ref(b).refs, want, "step {i}: mutex {b}");
                }
                let barrier = lf.barrier().lowest();
                assert_eq!(barrier, hot.barrier().lowest());
                assert_eq!(barrier, mx.barrier().lowest());
                let (r_lf, listed_lf) = commit_listed(&lf);
                let (r_hot, listed_hot) = commit_listed(&hot);
                let (r_mx, listed_mx) = commit_listed(&mx);
                let m = model.commit(barrier);
                for (name, r, listed) in
                    [("hot", &r_hot, &listed_hot), ("mutex", &r_mx, &listed_mx)]
                {
                    assert_eq!(r.quarantined, r_lf.quarantined, "step {i}: {name} refused");
                    assert_eq!(r.freed, r_lf.freed, "step {i}: {name} freed");
                    assert_eq!(r.held, r_lf.held, "step {i}: {name} held");
                    assert_eq!(listed, &listed_lf, "step {i}: {name} freed list");
                }
                let s = summary(&r_lf);
                assert_eq!(s.freed, m.freed, "step {i}: freed vs model");
                assert_eq!(s.quarantined, m.quarantined, "step {i}: refused vs model");
                assert_eq!(r_lf.held, m.held.len(), "step {i}: held vs model");
                assert_eq!(listed_lf, model.reusable(&m.freed), "step {i}: freed list");
                check_equal(&lf, &mx, &model, i);
                check_equal(&hot, &mx, &model, i);
                run.reports.push(r_lf);
                run.models.push(m);
            }
        }
    }
    run
}

fn op(b: u64, n: u64, kind: ExtentKind, a: Action, key: RefKey, seq: u64) -> Step {
    Step::Op(Op::new(b, n, kind, a, key, seq).unwrap())
}

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

fn eop(b: u64, n: u64, kind: ExtentKind, flags: u64, key: Option<u64>) -> Step {
    Step::Op(
        Op::update_head(
            b,
            n,
            kind,
            ExtentOp {
                flags_to_set: flags,
                key: key.map(|objectid| DiskKey {
                    objectid,
                    item_type: 84,
                    offset: 0,
                }),
            },
        )
        .unwrap(),
    )
}

/// The committed item of `b` in a fresh run's final tree, through the
/// model (the stores agree with it, `agree_steps`).
fn final_extent(steps: &[Step], b: u64) -> Option<refd_core::oracle::ModelExtent> {
    let mut model = Model::new();
    let mut held: Vec<Option<u64>> = Vec::new();
    let mut seq = 0;
    for s in steps {
        match s {
            Step::Op(o) => model.add(o),
            Step::Acquire => {
                seq += 1;
                held.push(Some(seq));
            }
            Step::Release(n) => held[*n] = None,
            Step::Lookup => {}
            Step::Commit => {
                let low = held.iter().flatten().min().copied().unwrap_or(0);
                model.commit(low);
            }
        }
    }
    model.extents.get(&b).cloned()
}

// ---------------------------------------------------------------------
// Seq barriers
// ---------------------------------------------------------------------

/// `btrfs_merge_delayed_refs()` merges refs whose seq is below the lowest
/// tree-mod-log seq held (`btrfs_tree_mod_log_lowest_seq`) and
/// `btrfs_check_delayed_seq()` holds back a ref at or above it. Two
/// barriers (seqs 1 and 2): a head with a ref at seq 1 is held while
/// barrier 1 is; once only barrier 2 is held, seq 1 is below the lowest and
/// its add and drop merge to nothing (a no-op), while a head with a ref at
/// seq 2 stays held until barrier 2 goes. refd holds a head whole where
/// the kernel runs the refs below the barrier and stops at the first held
/// one; the tree after the last release is the same.
#[test]
fn seq_below_the_lowest_barrier_merges_at_or_above_it_holds() {
    let (a, c) = (MIB, 2 * MIB);
    let t = |b, act, root, seq| op(b, 16384, TREE0, act, tree_key(root), seq);
    let steps = [
        t(a, Action::AddExtent, 5, 0),
        t(c, Action::AddExtent, 5, 0),
        Commit,
        Acquire,
        Acquire,
        t(a, Action::AddRef, 6, 0),
        t(a, Action::DropRef, 6, 1),
        t(c, Action::AddRef, 7, 2),
        Commit,
        Release(0),
        Lookup,
        Commit,
        Release(1),
        Commit,
    ];
    let r = agree_steps(&steps);
    assert_eq!(r.models[1].held, vec![a, c], "seqs 1 and 2 at or above 1");
    assert_eq!(r.models[2].held, vec![c], "seq 1 below 2 runs; seq 2 holds");
    assert_eq!(r.reports[2].noop, 1, "the add and drop of root 6 merged");
    assert_eq!((r.reports[3].held, r.reports[3].applied), (0, 1));
    assert!(r.models.iter().all(|m| m.quarantined.is_empty()));
    assert_eq!(final_extent(&steps, a).unwrap().refs.len(), 1);
    assert_eq!(final_extent(&steps, c).unwrap().refs.len(), 2);
}

/// A head held back while its barrier is, whose refs below a second,
/// higher barrier merge once the first is released: the seq-merge
/// regression (ADD seq 0, DROP seq 1, ADD seq 2 of one tree block's
/// backref) with the lowest barrier between the DROP and the second ADD.
/// The kernel (after the fix) merges the first two and holds the third;
/// before the fix it ran an ADD before the DROP it cancels and hit the
/// BUG_ON in `insert_inline_extent_backref()`. refd holds the head whole
/// until no barrier is at or below seq 2, then runs it merged: one
/// allocation with one backref, never a count of 2.
#[test]
fn the_regression_with_the_barrier_between_drop_and_add() {
    let b = 3 * MIB;
    let t = |act, seq| op(b, 16384, TREE0, act, tree_key(5), seq);
    let r = agree_steps(&[
        Acquire,
        Acquire,
        t(Action::AddExtent, 0),
        t(Action::DropRef, 1),
        t(Action::AddExtent, 2),
        Commit,
        Release(0),
        Commit,
        Release(1),
        Commit,
    ]);
    assert_eq!(r.models[0].held, vec![b]);
    assert_eq!(r.models[1].held, vec![b], "seq 2 is at barrier 2");
    assert!(r.models[2].held.is_empty() && r.models[2].quarantined.is_empty());
    // One head: the life begun and ended inside it is never inserted, nor
    // reported freed.
    assert!(r.reports[2].freed.is_empty() && r.reports[2].applied == 1);
}

/// A barrier taken and released before the commit holds nothing: the
/// kernel reads the lowest seq when it runs the head
/// (`btrfs_check_delayed_seq()` at run time), not when the ref was
/// queued. refd reads it once per commit.
#[test]
fn a_barrier_released_before_the_commit_holds_nothing() {
    let b = 4 * MIB;
    let d = |act, seq| op(b, 4096, DATA, act, data_key(5), seq);
    let r = agree_steps(&[
        Acquire,
        d(Action::AddExtent, 1),
        d(Action::AddRef, 1),
        Lookup,
        Release(0),
        Commit,
    ]);
    assert_eq!((r.reports[0].held, r.reports[0].applied), (0, 1));
    assert_eq!(
        final_extent(&[d(Action::AddExtent, 1), d(Action::AddRef, 1), Commit], b)
            .unwrap()
            .refs
            .values()
            .sum::<u64>(),
        2
    );
}

/// Seq 0 means "no seq" (`init_delayed_ref_common()` gives one only for
/// fs trees; `btrfs_check_delayed_seq()` is called only for `ref->seq !=
/// 0`): a ref at seq 0 is never held, whatever barrier is. A ref below the
/// lowest barrier is not held either.
#[test]
fn seq_zero_and_seqs_below_the_barrier_are_never_held() {
    let (a, c) = (5 * MIB, 6 * MIB);
    let r = agree_steps(&[
        Acquire,
        Acquire,
        Release(0),
        op(a, 4096, DATA, Action::AddExtent, data_key(5), 0),
        op(c, 4096, DATA, Action::AddExtent, data_key(5), 1),
        Commit,
    ]);
    assert!(r.models[0].held.is_empty(), "{:?}", r.models[0].held);
    assert_eq!(r.reports[0].applied, 2);
}

/// The largest seq refd takes (`SEQ_MAX` = 2^56 - 1: the top byte of a
/// packed ref holds the backref type) is held by any barrier and runs once
/// it is released; one past it is refused at validation with a typed
/// error, and an `Op` built by hand with it (its fields are public) is
/// refused by both stores' handles, which stay usable. The kernel's seq is
/// a u64 counter that never gets near.
#[test]
fn seq_at_the_maximum_is_held_and_one_past_it_is_refused() {
    let b = 7 * MIB;
    let r = agree_steps(&[
        Acquire,
        op(b, 4096, DATA, Action::AddExtent, data_key(5), SEQ_MAX),
        Commit,
        Release(0),
        Commit,
    ]);
    assert_eq!(r.models[0].held, vec![b]);
    assert_eq!(r.reports[1].applied, 1);
    let past = Op::new(b, 4096, DATA, Action::AddRef, data_key(5), SEQ_MAX + 1);
    assert!(matches!(past, Err(OpError::SeqOutOfRange { .. })));
    let raw = RawOp {
        bytenr: b,
        num_bytes: 4096,
        action: Action::AddRef.code(),
        is_data: true,
        ref_type: EXTENT_DATA_REF_KEY,
        root: 5,
        objectid: 257,
        seq: u64::MAX,
        ..RawOp::default()
    };
    assert!(matches!(raw.validate(), Err(OpError::SeqOutOfRange { .. })));
    let mut forged = Op::new(b, 4096, DATA, Action::AddExtent, data_key(5), 0).unwrap();
    forged.seq = u64::MAX;
    refused_by_both_stores(&forged, |e| matches!(e, OpError::SeqOutOfRange { .. }));
}

/// `op`, which fails `Op::check` with an error `pred` accepts, is refused
/// by `add` and `add_batch` of both stores with a typed error, nothing of
/// the batch is queued, and the store goes on: a valid allocation after it
/// commits.
fn refused_by_both_stores(bad: &Op, pred: fn(&OpError) -> bool) {
    fn go<S: DelayedRefStore>(store: S, bad: &Op, pred: fn(&OpError) -> bool) {
        let e = Engine::new(store);
        let mut h = e.handle().unwrap();
        let good = Op::new(64 * MIB, 4096, DATA, Action::AddExtent, data_key(9), 0).unwrap();
        match h.add(bad) {
            Err(EngineError::Store(StoreError::Op(err))) => assert!(pred(&err), "{err:?}"),
            other => panic!("{bad:?} accepted or wrong error: {other:?}"),
        }
        match h.add_batch(&[good, *bad]) {
            Err((1, EngineError::Store(StoreError::Op(err)))) => assert!(pred(&err)),
            other => panic!("batch: {other:?}"),
        }
        assert_eq!(
            e.lookup_extent_ref(64 * MIB).refs,
            0,
            "nothing of the batch"
        );
        h.add(&good).unwrap();
        let r = e.commit();
        assert!(r.quarantined.is_empty() && r.applied == 1, "{r:?}");
        assert_eq!(e.tree().len(), 1);
    }
    go(LockFreeStore::with_config(2, 2), bad, pred);
    go(MutexStore::new(), bad, pred);
}

/// An add and a drop of one key at the same seq merge at insert
/// (`insert_delayed_ref()`, `comp_refs(.., check_seq = true)`) and the
/// kernel drops the node whose ref_mod reached 0, so nothing is left to
/// hold the head. refd keeps the cancelled ref (it counts its drop, for a
/// re-allocation) but it changes no count and holds nothing: the head runs
/// under the barrier. Here it re-allocates a committed block whose only
/// backref the cancelled pair drops and adds back.
#[test]
fn a_ref_cancelled_at_insert_holds_nothing() {
    let (a, c) = (8 * MIB, 9 * MIB);
    let t = |b, act, root, seq| op(b, 16384, TREE0, act, tree_key(root), seq);
    let r = agree_steps(&[
        t(a, Action::AddExtent, 5, 0),
        Commit,
        Acquire,
        t(c, Action::AddExtent, 5, 0),
        t(c, Action::AddRef, 6, 1),
        t(c, Action::DropRef, 6, 1),
        t(a, Action::DropRef, 5, 1),
        t(a, Action::AddExtent, 5, 1),
        Commit,
    ]);
    assert!(r.models[1].held.is_empty(), "{:?}", r.models[1].held);
    assert!(r.models[1].quarantined.is_empty());
    assert_eq!(r.reports[1].freed.len(), 1, "the old life of a ends");
    assert_eq!(r.reports[1].applied, 2);
}

/// An allocation dropped again by the same transaction, the drop queued at
/// a seq a barrier holds: the head stays queued (both ops, lookups 0) until
/// the barrier goes, then the extent is freed without ever being inserted
/// (`cleanup_ref_head()` with `must_insert_reserved` and no ref left: the
/// kernel unpins the reservation), reported freed once.
#[test]
fn a_held_allocation_dropped_again_is_freed_once_released() {
    let b = 10 * MIB;
    let d = |act, key, seq| op(b, 8192, DATA, act, key, seq);
    let shared = RefKey::SharedData { parent: 32 * MIB };
    let r = agree_steps(&[
        Acquire,
        d(Action::AddExtent, shared, 0),
        d(Action::DropRef, shared, 1),
        Commit,
        Lookup,
        Release(0),
        Commit,
    ]);
    assert_eq!(r.models[0].held, vec![b]);
    assert!(r.reports[0].freed.is_empty());
    assert_eq!(r.models[1].freed, vec![(b, 8192)]);
    assert!(final_extent(
        &[
            d(Action::AddExtent, shared, 0),
            d(Action::DropRef, shared, 1),
            Commit
        ],
        b
    )
    .is_none());
}

// ---------------------------------------------------------------------
// Counts
// ---------------------------------------------------------------------

/// An add and a drop of a backref the extent does not have cancel across
/// seqs (no barrier: all merge), and one more drop leaves a net drop of
/// a count that is 0: refused (`DropMissingRef`), the extent as it was.
/// The kernel does not merge data refs at run time
/// (`btrfs_merge_delayed_refs()` returns for `head->is_data`) and runs
/// adds first, so it adds, drops, and fails the second drop in
/// `__btrfs_free_extent()` (abort); refd refuses the head instead.
#[test]
fn a_drop_after_an_add_and_drop_cancel_across_seqs_is_refused() {
    let b = 11 * MIB;
    let d = |act, root, seq| op(b, 4096, DATA, act, data_key(root), seq);
    let r = agree_steps(&[
        d(Action::AddExtent, 5, 0),
        Commit,
        d(Action::AddRef, 6, 1),
        d(Action::DropRef, 6, 2),
        d(Action::DropRef, 6, 0),
        Commit,
        d(Action::DropRef, 5, 3),
        d(Action::AddRef, 5, 0),
        d(Action::DropRef, 5, 0),
        Commit,
        d(Action::DropRef, 5, 0),
        Commit,
    ]);
    assert!(
        matches!(
            r.errors(1)[..],
            [RunError::DropMissingRef {
                have: 0,
                drop: 1,
                ..
            }]
        ),
        "{:?}",
        r.reports[1].quarantined
    );
    assert!(r.models[2].quarantined.is_empty());
    assert_eq!(
        r.models[2].freed,
        vec![(b, 4096)],
        "net -1 of count 1 frees it"
    );
    assert!(matches!(
        r.errors(3)[..],
        [RunError::DropMissingRef { have: 0, .. }]
    ));
}

/// Drops and adds of one data backref at four seqs net to what the count
/// allows: committed 3, three drops and one add leave 1. Across commits
/// the count reaches 0 exactly once.
#[test]
fn drops_across_seqs_net_to_the_count() {
    let b = 12 * MIB;
    let d = |act, seq| op(b, 4096, DATA, act, data_key(5), seq);
    let r = agree_steps(&[
        d(Action::AddExtent, 0),
        d(Action::AddRef, 0),
        d(Action::AddRef, 1),
        Commit,
        d(Action::DropRef, 0),
        d(Action::DropRef, 1),
        d(Action::DropRef, 2),
        d(Action::AddRef, 3),
        Commit,
        d(Action::DropRef, 4),
        Commit,
    ]);
    assert!(r.models.iter().all(|m| m.quarantined.is_empty()));
    assert!(r.models[1].freed.is_empty());
    assert_eq!(r.models[2].freed, vec![(b, 4096)]);
}

/// Two adds of one tree block backref at different seqs are not merged at
/// insert; at run time they merge into a count of 2, which the kernel
/// warns about in `merge_ref()` ("Can't have multiples of the same ref on
/// a tree block") and then hits the BUG_ON of
/// `insert_inline_extent_backref()`. refd refuses the head
/// (`DuplicateTreeRef`), the block as it was; the same for a
/// `SHARED_BLOCK_REF`.
#[test]
fn a_tree_backref_added_twice_across_seqs_is_refused() {
    let b = 13 * MIB;
    let shared = RefKey::SharedBlock { parent: 40 * MIB };
    let t = |act, key, seq| op(b, 16384, TREE0, act, key, seq);
    let r = agree_steps(&[
        t(Action::AddExtent, tree_key(5), 0),
        Commit,
        t(Action::AddRef, tree_key(6), 1),
        t(Action::AddRef, tree_key(6), 2),
        Commit,
        t(Action::AddRef, shared, 0),
        t(Action::AddRef, shared, 3),
        Commit,
        t(Action::AddRef, shared, 0),
        Commit,
    ]);
    assert!(matches!(
        r.errors(1)[..],
        [RunError::DuplicateTreeRef { count: 2, .. }]
    ));
    assert!(matches!(
        r.errors(2)[..],
        [RunError::DuplicateTreeRef { count: 2, .. }]
    ));
    assert!(r.models[3].quarantined.is_empty());
}

// ---------------------------------------------------------------------
// The four backref kinds
// ---------------------------------------------------------------------

/// A tree block with a `TREE_BLOCK_REF` and two `SHARED_BLOCK_REF`s, and a
/// data extent with two `EXTENT_DATA_REF`s that differ only in their
/// offset (distinct keys: `comp_data_refs()` compares root, objectid,
/// offset) and a `SHARED_DATA_REF` of count 3, dropped in another order
/// than they were added: counted per key, freed with the last.
#[test]
fn all_four_backref_kinds_count_per_key() {
    let (t, d) = (14 * MIB, 15 * MIB);
    let tb = |act, key| op(t, 16384, ExtentKind::Tree { level: 3 }, act, key, 0);
    let da = |act, key| op(d, 12288, DATA, act, key, 0);
    let ed = |offset| RefKey::ExtentData {
        root: 5,
        objectid: 257,
        offset,
    };
    let sb = |p| RefKey::SharedBlock { parent: p };
    let sd = RefKey::SharedData { parent: 48 * MIB };
    let r = agree_steps(&[
        tb(Action::AddExtent, tree_key(2)),
        tb(Action::AddRef, sb(44 * MIB)),
        tb(Action::AddRef, sb(45 * MIB)),
        da(Action::AddExtent, ed(0)),
        da(Action::AddRef, ed(4096)),
        da(Action::AddRef, sd),
        da(Action::AddRef, sd),
        da(Action::AddRef, sd),
        Commit,
        tb(Action::DropRef, tree_key(2)),
        da(Action::DropRef, sd),
        da(Action::DropRef, ed(4096)),
        Commit,
        tb(Action::DropRef, sb(45 * MIB)),
        da(Action::DropRef, sd),
        da(Action::DropRef, ed(0)),
        Commit,
        tb(Action::DropRef, sb(44 * MIB)),
        da(Action::DropRef, sd),
        Commit,
    ]);
    assert!(r.models.iter().all(|m| m.quarantined.is_empty()));
    assert!(r.models[..3].iter().all(|m| m.freed.is_empty()));
    assert_eq!(r.models[3].freed, vec![(t, 16384), (d, 12288)]);
}

/// A backref of the other kind than its extent cannot even be queued: the
/// op carries the extent's kind, and `Op::check` ties the key to it
/// (`KindMismatch`), from the typed constructor, the wire's `RawOp`, or an
/// `Op` built by hand. The kernel picks the ref type from the ref
/// (`btrfs_add_delayed_tree_ref()` / `_data_ref()`) and a data head meeting
/// a tree head of one bytenr is a BUG_ON in `update_existing_head_ref()`.
/// A data op on a committed tree block (the kind named by the op, the key
/// of its kind) is `ShapeMismatch` at run time.
#[test]
fn a_backref_of_the_wrong_kind_is_refused() {
    let b = 16 * MIB;
    for (kind, key) in [
        (TREE0, data_key(5)),
        (TREE0, RefKey::SharedData { parent: MIB }),
        (DATA, tree_key(5)),
        (DATA, RefKey::SharedBlock { parent: MIB }),
    ] {
        let e = Op::new(b, 16384, kind, Action::AddRef, key, 0);
        assert!(matches!(e, Err(OpError::KindMismatch { .. })), "{e:?}");
    }
    let raw = RawOp {
        bytenr: b,
        num_bytes: 16384,
        action: Action::AddRef.code(),
        is_data: false,
        ref_type: EXTENT_DATA_REF_KEY,
        root: 5,
        objectid: 257,
        ..RawOp::default()
    };
    assert!(matches!(raw.validate(), Err(OpError::KindMismatch { .. })));
    let raw = RawOp {
        is_data: true,
        ref_type: TREE_BLOCK_REF_KEY,
        objectid: 0,
        ..raw
    };
    assert!(matches!(raw.validate(), Err(OpError::KindMismatch { .. })));
    let mut forged = Op::new(b, 16384, TREE0, Action::AddExtent, tree_key(5), 0).unwrap();
    forged.key = Some(data_key(5));
    refused_by_both_stores(&forged, |e| matches!(e, OpError::KindMismatch { .. }));
    let r = agree_steps(&[
        op(b, 16384, TREE0, Action::AddExtent, tree_key(5), 0),
        Commit,
        op(b, 16384, DATA, Action::AddRef, data_key(5), 0),
        Commit,
    ]);
    assert!(matches!(r.errors(1)[..], [RunError::ShapeMismatch { .. }]));
}

/// `num_bytes` 0 and a range past the end of the address space are refused
/// at validation (`ZeroNumBytes`, `RangeOverflow`); an extent at bytenr 0
/// and one of one byte ending at `u64::MAX` are fine. A drop naming
/// another size than the committed extent is `ShapeMismatch`: the kernel
/// looks the extent item up by `(bytenr, EXTENT_ITEM, num_bytes)` and
/// fails to find it (abort).
#[test]
fn sizes_zero_past_the_end_and_mismatched() {
    for (b, n) in [(MIB, 0), (u64::MAX, 1), (1, u64::MAX)] {
        let e = Op::new(b, n, DATA, Action::AddExtent, data_key(5), 0);
        assert!(
            matches!(
                e,
                Err(OpError::ZeroNumBytes { .. } | OpError::RangeOverflow { .. })
            ),
            "{b} {n}: {e:?}"
        );
    }
    let mut forged = Op::new(MIB, 4096, DATA, Action::AddExtent, data_key(5), 0).unwrap();
    forged.num_bytes = 0;
    refused_by_both_stores(&forged, |e| matches!(e, OpError::ZeroNumBytes { .. }));
    forged.num_bytes = u64::MAX;
    refused_by_both_stores(&forged, |e| matches!(e, OpError::RangeOverflow { .. }));
    let top = u64::MAX - 1;
    let r = agree_steps(&[
        op(0, 4096, DATA, Action::AddExtent, data_key(5), 0),
        op(top, 1, DATA, Action::AddExtent, data_key(5), 0),
        Commit,
        op(0, 8192, DATA, Action::DropRef, data_key(5), 0),
        op(top, 1, DATA, Action::DropRef, data_key(5), 0),
        Commit,
    ]);
    assert!(r.models[0].quarantined.is_empty());
    assert!(matches!(r.errors(1)[..], [RunError::ShapeMismatch { .. }]));
    assert_eq!(r.models[1].freed, vec![(top, 1)]);
}

// ---------------------------------------------------------------------
// extent_ops
// ---------------------------------------------------------------------

/// An extent_op (FULL_BACKREF and a key) queued with the drop of a tree
/// block's last reference: the kernel runs the extent_op with the head
/// (`run_delayed_extent_op()`) and frees the block in
/// `__btrfs_free_extent()`; nothing is refused and the block is freed.
#[test]
fn an_extent_op_on_a_block_dropped_to_zero_frees_it() {
    let b = 17 * MIB;
    let t = |act| op(b, 16384, TREE0, act, tree_key(5), 0);
    let r = agree_steps(&[
        t(Action::AddExtent),
        Commit,
        eop(b, 16384, TREE0, BLOCK_FLAG_FULL_BACKREF, Some(300)),
        t(Action::DropRef),
        Commit,
    ]);
    assert!(r.models[1].quarantined.is_empty());
    assert_eq!(r.models[1].freed, vec![(b, 16384)]);
}

/// extent_ops with the allocation and after it, in one transaction: the
/// kernel merges them into the head's extent_op
/// (`update_existing_head_ref()`: flags OR-ed, the newer key replaces the
/// older) and `alloc_reserved_tree_block()` inserts the block with them.
/// The latest key by queue order wins.
#[test]
fn extent_ops_with_and_after_an_allocation_apply_at_insert() {
    let b = 18 * MIB;
    let alloc = Op::new(b, 16384, TREE0, Action::AddExtent, tree_key(5), 0)
        .unwrap()
        .with_extent_op(ExtentOp {
            flags_to_set: 0,
            key: Some(DiskKey {
                objectid: 100,
                item_type: 1,
                offset: 0,
            }),
        })
        .unwrap();
    let steps = [
        Step::Op(alloc),
        eop(b, 16384, TREE0, 0, Some(200)),
        eop(b, 16384, TREE0, BLOCK_FLAG_FULL_BACKREF, None),
        eop(b, 16384, TREE0, 0, Some(150)),
        Commit,
    ];
    let r = agree_steps(&steps);
    assert!(r.models[0].quarantined.is_empty());
    let e = final_extent(&steps, b).unwrap();
    assert!(e.full_backref);
    assert_eq!(e.tree_key.map(|k| k.objectid), Some(150), "the latest key");
}

/// An allocation with an extent_op, dropped again by the same transaction:
/// the kernel never inserts it and discards the extent_op
/// (`cleanup_extent_op()` frees it for a `must_insert_reserved` head);
/// refd frees the extent, refuses nothing.
#[test]
fn an_extent_op_on_an_allocation_dropped_again_is_discarded() {
    let b = 19 * MIB;
    let t = |act| op(b, 16384, TREE0, act, tree_key(5), 0);
    let r = agree_steps(&[
        t(Action::AddExtent),
        eop(b, 16384, TREE0, BLOCK_FLAG_FULL_BACKREF, Some(7)),
        t(Action::DropRef),
        Commit,
    ]);
    assert!(r.models[0].quarantined.is_empty());
    assert_eq!(r.models[0].freed, vec![(b, 16384)]);
}

/// FULL_BACKREF on a data allocation. The kernel only sets it on tree
/// blocks (`btrfs_set_disk_extent_flags()`); were one queued, it would
/// OR the flag into the new data item (`run_delayed_data_ref()`). refd
/// refuses the head (`ExtentOpOnData`, documented in docs/design.md's
/// invariants), the bytenr stays free, and the next transaction allocates
/// it normally.
#[test]
fn an_extent_op_on_a_data_allocation_is_refused() {
    let b = 20 * MIB;
    let d = |act| op(b, 4096, DATA, act, data_key(5), 0);
    let r = agree_steps(&[
        d(Action::AddExtent),
        eop(b, 4096, DATA, BLOCK_FLAG_FULL_BACKREF, None),
        Commit,
        d(Action::AddExtent),
        Commit,
    ]);
    assert!(matches!(r.errors(0)[..], [RunError::ExtentOpOnData { .. }]));
    assert!(r.models[1].quarantined.is_empty());
}

/// An extent_op queued before the first allocation of a bytenr that has
/// no extent: the kernel never queues one (it sets flags on a block it
/// holds, which exists), and would merge it into the head and insert the
/// block with it. refd applies an extent_op only to the life it was
/// queued in (stamped at or after the latest allocation, docs/btrfs.md
/// "extent_op across lives"), so this one, of no life, is dropped: the
/// block is inserted without FULL_BACKREF or the key, and nothing is
/// refused. A divergence (documented in docs/design.md, "Semantics"):
/// refd cannot tell this extent_op from one of an earlier life of the
/// same head when the head allocates more than once.
#[test]
fn an_extent_op_queued_before_the_first_allocation_is_dropped() {
    let b = 21 * MIB;
    let steps = [
        eop(b, 16384, TREE0, BLOCK_FLAG_FULL_BACKREF, Some(9)),
        op(b, 16384, TREE0, Action::AddExtent, tree_key(5), 0),
        Commit,
    ];
    let r = agree_steps(&steps);
    assert!(r.models[0].quarantined.is_empty());
    let e = final_extent(&steps, b).unwrap();
    assert!(!e.full_backref && e.tree_key.is_none(), "{e:?}");
}

/// An extent_op-only op (`UPDATE_HEAD`) names a size and kind, but refd
/// compares neither with the extent (docs/design.md, "shape": extent_op-only
/// ops name no shape; a kernel trace's `UPDATE_DELAYED_HEAD` has no level,
/// docs/btrfs.md): FULL_BACKREF queued as for a 4 KiB data extent applies
/// to the committed 16 KiB level-1 tree block. The kernel's extent_op head
/// is never data (`btrfs_add_delayed_extent_op()` passes `is_data` false)
/// and `run_delayed_extent_op()` looks the item up by its level or, without
/// skinny metadata, by `num_bytes`, failing (-EUCLEAN) on a wrong size. A
/// divergence: refd is lenient here. Its flags still never reach a data
/// extent (`ExtentOpOnData`).
#[test]
fn an_extent_op_only_op_names_no_shape() {
    let (t, d) = (32 * MIB, 33 * MIB);
    let level1 = ExtentKind::Tree { level: 1 };
    let steps = [
        op(t, 16384, level1, Action::AddExtent, tree_key(5), 0),
        op(d, 16384, DATA, Action::AddExtent, data_key(5), 0),
        Commit,
        eop(t, 4096, DATA, BLOCK_FLAG_FULL_BACKREF, None),
        eop(d, 16384, TREE0, BLOCK_FLAG_FULL_BACKREF, None),
        Commit,
    ];
    let r = agree_steps(&steps);
    assert_eq!(r.models[1].quarantined, vec![d]);
    assert!(matches!(r.errors(1)[..], [RunError::ExtentOpOnData { .. }]));
    assert!(final_extent(&steps, t).unwrap().full_backref);
}

// ---------------------------------------------------------------------
// Allocations
// ---------------------------------------------------------------------

/// An allocation of an extent that still has a reference, for each
/// backref kind (the drop of one of two data references is not enough):
/// the kernel's insert of the extent item fails with -EEXIST (abort);
/// ref-verify calls it "re-allocated a block that still has references".
/// refd refuses the head (`ReallocWhileReferenced`), the committed extent
/// as it was.
#[test]
fn an_allocation_of_an_extent_still_referenced_is_refused_for_each_kind() {
    let t = |b, act, key| op(b, 16384, TREE0, act, key, 0);
    let d = |b, act, key| op(b, 4096, DATA, act, key, 0);
    let (b1, b2, b3, b4) = (22 * MIB, 23 * MIB, 24 * MIB, 25 * MIB);
    let sb = RefKey::SharedBlock { parent: MIB };
    let sd = RefKey::SharedData { parent: MIB };
    let r = agree_steps(&[
        t(b1, Action::AddExtent, tree_key(5)),
        t(b2, Action::AddExtent, sb),
        d(b3, Action::AddExtent, data_key(5)),
        d(b3, Action::AddRef, data_key(5)),
        d(b4, Action::AddExtent, sd),
        Commit,
        t(b1, Action::AddExtent, tree_key(6)),
        t(b2, Action::AddExtent, sb),
        d(b3, Action::DropRef, data_key(5)),
        d(b3, Action::AddExtent, data_key(5)),
        d(b4, Action::AddExtent, sd),
        d(b4, Action::AddRef, sd),
        Commit,
    ]);
    assert_eq!(r.models[1].quarantined, vec![b1, b2, b3, b4]);
    assert!(r
        .errors(1)
        .iter()
        .all(|e| matches!(e, RunError::ReallocWhileReferenced { .. })));
}

/// The allocation queued before the drop that ends the committed life,
/// in one transaction: alloc, add, drop of a `SHARED_DATA_REF` whose
/// committed count is 1. In queue order the kernel merges the three into
/// one node of ref_mod +1 on a `must_insert_reserved` head
/// (`insert_delayed_ref()`, `update_existing_head_ref()`) and fails to
/// insert the extent item that still exists (-EEXIST, abort). refd's
/// merge depends only on the set of a head's ops (docs/design.md,
/// "Semantics"; ops of one extent may come from several ingest threads),
/// and an order exists that ends the old life first (drop, alloc, add):
/// the head is accepted, the old life freed, the new one at count 2. A
/// divergence by design: refd accepts what the kernel aborts on.
#[test]
fn an_allocation_queued_before_the_drop_that_frees_it_is_accepted() {
    let b = 30 * MIB;
    let sd = RefKey::SharedData { parent: MIB };
    let d = |act| op(b, 4096, DATA, act, sd, 0);
    let steps = [
        d(Action::AddExtent),
        Commit,
        d(Action::AddExtent),
        d(Action::AddRef),
        d(Action::DropRef),
        Commit,
    ];
    let r = agree_steps(&steps);
    assert!(r.models[1].quarantined.is_empty());
    assert_eq!(r.models[1].freed, vec![(b, 4096)]);
    let e = final_extent(&steps, b).unwrap();
    assert_eq!((e.refs.get(&sd), e.generation), (Some(&2), 2));
}

/// Freed and allocated again in one transaction, larger: over a neighbour
/// still live it is refused (`OverlapsExtent`: the kernel's allocator
/// never hands out a range holding an extent), over a neighbour freed by
/// the same transaction it is fine (refd's commit spans many kernel
/// transactions, and the kernel reuses a range once the freeing one
/// commits).
#[test]
fn a_reallocation_grows_over_a_live_or_a_freed_neighbour() {
    let (a, c) = (26 * MIB, 26 * MIB + 4096);
    let d = |b, n, act, root| op(b, n, DATA, act, data_key(root), 0);
    let r = agree_steps(&[
        d(a, 4096, Action::AddExtent, 5),
        d(c, 4096, Action::AddExtent, 5),
        Commit,
        d(a, 4096, Action::DropRef, 5),
        d(a, 8192, Action::AddExtent, 6),
        Commit,
        d(c, 4096, Action::DropRef, 5),
        d(a, 4096, Action::DropRef, 5),
        d(a, 8192, Action::AddExtent, 6),
        Commit,
    ]);
    assert!(matches!(r.errors(1)[..], [RunError::OverlapsExtent { other, .. }] if *other == c));
    assert!(r.models[2].quarantined.is_empty());
    assert_eq!(r.models[2].freed, vec![(a, 4096), (c, 4096)]);
}

/// Ops on an extent that does not exist: an extent_op
/// (`ExtentOpOnMissing`: `run_delayed_extent_op()` finds no item, -EUCLEAN
/// in the kernel), an add (`AddToMissingExtent`: `lookup_inline_extent_backref()`
/// fails, abort), a drop (`DropMissingRef`), an extent_op with an add and a
/// drop that cancel (still `ExtentOpOnMissing`), and an add and a drop that
/// cancel alone (nothing: the kernel never runs a node merged to 0).
#[test]
fn ops_on_an_extent_that_does_not_exist() {
    let b = 27 * MIB;
    let t = |act| op(b, 16384, TREE0, act, tree_key(5), 0);
    let r = agree_steps(&[
        eop(b, 16384, TREE0, BLOCK_FLAG_FULL_BACKREF, None),
        Commit,
        t(Action::AddRef),
        Commit,
        t(Action::DropRef),
        Commit,
        t(Action::AddRef),
        eop(b, 16384, TREE0, 0, Some(1)),
        t(Action::DropRef),
        Commit,
        t(Action::AddRef),
        t(Action::DropRef),
        Commit,
    ]);
    assert!(matches!(
        r.errors(0)[..],
        [RunError::ExtentOpOnMissing { .. }]
    ));
    assert!(matches!(
        r.errors(1)[..],
        [RunError::AddToMissingExtent { .. }]
    ));
    assert!(matches!(
        r.errors(2)[..],
        [RunError::DropMissingRef { have: 0, .. }]
    ));
    assert!(matches!(
        r.errors(3)[..],
        [RunError::ExtentOpOnMissing { .. }]
    ));
    assert!(r.models[4].quarantined.is_empty() && r.reports[4].applied == 0);
}

/// A commit with nothing queued still takes a generation (the kernel
/// commits a transaction with no delayed refs just the same), in both
/// stores and the model: the next allocation is stamped with the next
/// generation.
#[test]
fn a_commit_with_nothing() {
    let b = 28 * MIB;
    let steps = [
        Commit,
        Commit,
        op(b, 4096, DATA, Action::AddExtent, data_key(5), 0),
        Commit,
    ];
    let r = agree_steps(&steps);
    assert_eq!((r.reports[0].heads, r.reports[0].applied), (0, 0));
    assert_eq!(r.reports[2].generation, 3);
    assert_eq!(final_extent(&steps, b).unwrap().generation, 3);
}

// ---------------------------------------------------------------------
// Fields at their limits, hot extents
// ---------------------------------------------------------------------

/// Every key field at `u64::MAX` (root, objectid, offset, parent), an
/// extent_op key at its maximum, seqs at `SEQ_MAX`, an extent of one byte
/// ending at `u64::MAX` and one at bytenr 0, each with enough ops to be a
/// hot extent of the 64-op staging (its count summed in cells): the packed
/// encodings (a seq and a type code share a word) keep every field apart.
#[test]
fn fields_at_their_maximum() {
    let top = u64::MAX - 1;
    let max_ed = RefKey::ExtentData {
        root: u64::MAX,
        objectid: u64::MAX,
        offset: u64::MAX,
    };
    let near_ed = RefKey::ExtentData {
        root: u64::MAX,
        objectid: u64::MAX,
        offset: u64::MAX - 1,
    };
    let sd = RefKey::SharedData { parent: u64::MAX };
    let sb = RefKey::SharedBlock { parent: u64::MAX };
    let mut steps = Vec::new();
    for round in 0..3u64 {
        let seq = if round == 1 { SEQ_MAX } else { 0 };
        if round == 0 {
            steps.push(op(top, 1, DATA, Action::AddExtent, max_ed, 0));
            steps.push(op(
                0,
                16384,
                TREE0,
                Action::AddExtent,
                tree_key(u64::MAX),
                0,
            ));
        }
        for _ in 0..40 {
            steps.push(op(top, 1, DATA, Action::AddRef, max_ed, seq));
            steps.push(op(top, 1, DATA, Action::AddRef, near_ed, seq));
            steps.push(op(top, 1, DATA, Action::AddRef, sd, seq));
            steps.push(op(top, 1, DATA, Action::DropRef, near_ed, seq));
        }
        steps.push(op(0, 16384, TREE0, Action::AddRef, sb, seq));
        steps.push(Step::Op(
            Op::update_head(
                0,
                16384,
                TREE0,
                ExtentOp {
                    flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                    key: Some(DiskKey {
                        objectid: u64::MAX,
                        item_type: u8::MAX,
                        offset: u64::MAX - round,
                    }),
                },
            )
            .unwrap(),
        ));
        steps.push(op(0, 16384, TREE0, Action::DropRef, sb, seq));
        steps.push(Lookup);
        steps.push(Commit);
    }
    let r = agree_steps(&steps);
    assert!(r.models.iter().all(|m| m.quarantined.is_empty()));
    let e = final_extent(&steps, top).unwrap();
    assert_eq!(e.refs.get(&max_ed), Some(&121));
    assert_eq!(e.refs.get(&sd), Some(&120));
    assert_eq!(e.refs.get(&near_ed), None);
    let t = final_extent(&steps, 0).unwrap();
    assert_eq!(t.tree_key.map(|k| k.offset), Some(u64::MAX - 2));
}

/// A hot extent freed and allocated again a hundred times in one
/// transaction, so that the 64-op staging buffers of the hot engine hold
/// 32 allocations of it (one more than a staging cell counts: the cell is
/// spoiled and the buffer scanned), with a lookup every few lives: every
/// count, the final life and the freed extents agree with the model. The
/// kernel does this with every short-lived tree block
/// (btrfs-seq-merge-regression-fix.txt, step 4). Once in a while a life
/// also adds and drops a second backref.
#[test]
fn a_hot_extent_reallocated_past_what_a_cell_counts() {
    let b = 29 * MIB;
    let t = |act, root| op(b, 16384, TREE0, act, tree_key(root), 0);
    let lives = 100u64;
    let mut steps = Vec::new();
    for round in 0..3u64 {
        for i in 0..lives {
            let life = round * lives + i;
            if life > 0 {
                steps.push(t(Action::DropRef, 5 + (life - 1) % 7));
            }
            steps.push(t(Action::AddExtent, 5 + life % 7));
            if i % 16 == 15 {
                steps.push(t(Action::AddRef, 100));
                steps.push(t(Action::DropRef, 100));
            }
            if i % 5 == 0 {
                steps.push(Lookup);
            }
        }
        steps.push(Commit);
    }
    let r = agree_steps(&steps);
    assert!(
        r.models.iter().all(|m| m.quarantined.is_empty()),
        "{:?}",
        r.models
    );
    // A merged head reports the committed life and the final one, not the
    // lives begun and ended inside the commit (never inserted).
    assert_eq!(r.models[1].freed, vec![(b, 16384)]);
}

// ---------------------------------------------------------------------
// Across the run workers' parts
// ---------------------------------------------------------------------

/// Allocations dropped again by their commit (docs/design.md "overlap",
/// the oracle's rule 9) whose range crosses from one run worker's part of
/// the heads into the next one's, over a committed extent whose head is
/// in the second part: held by a seq barrier (legal: it may have been
/// free for a moment), freed by its head (legal), or changed and kept
/// live (refused: the range was handed out over it). Each commit has
/// enough heads for two parts (`PARALLEL_RUN_MIN_HEADS` each) where the
/// machine has two cores; with one the same streams run in one part.
#[test]
fn dropped_allocations_across_run_parts() {
    use refd_core::engine::PARALLEL_RUN_MIN_HEADS;
    let n = 2 * PARALLEL_RUN_MIN_HEADS as u64 + 100;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let workers = cores.min(n as usize / PARALLEL_RUN_MIN_HEADS).max(1) as u64;
    // Index of the first head of the second part (as `in_parts` cuts).
    let p = if workers > 1 {
        n.div_ceil(workers)
    } else {
        n / 2
    };
    let d = |b, bytes, act, root, seq| op(b, bytes, DATA, act, data_key(root), seq);
    // Region r: heads at `at(r, i)`, 64 KiB apart; the committed extent
    // the trap meets lies 16 KiB past the first head of the second part.
    let at = |r: u64, i: u64| ((r + 1) << 36) + (i << 16);
    let x = |r: u64| at(r, p) + (16 << 10);
    let mut steps = vec![
        d(x(0), 4096, Action::AddExtent, 5, 0),
        d(x(1), 4096, Action::AddExtent, 5, 0),
        d(x(2), 4096, Action::AddExtent, 5, 0),
        Commit,
        Acquire,
    ];
    for r in 0..3 {
        for i in 0..n {
            if i == p - 1 {
                // 96 KiB: over the first head of the second part and x.
                steps.push(d(at(r, i), 96 << 10, Action::AddExtent, 6, 0));
                steps.push(d(at(r, i), 96 << 10, Action::DropRef, 6, 0));
            } else {
                steps.push(d(at(r, i), 4096, Action::AddExtent, 5, 0));
            }
        }
        steps.push(match r {
            // Held: a ref at the barrier's seq.
            0 => d(x(r), 4096, Action::AddRef, 7, 1),
            // Freed.
            1 => d(x(r), 4096, Action::DropRef, 5, 0),
            // Changed, live.
            _ => d(x(r), 4096, Action::AddRef, 7, 0),
        });
        steps.push(Commit);
    }
    steps.push(Release(0));
    steps.push(Commit);
    let r = agree_steps(&steps);
    assert_eq!(r.models[1].held, vec![x(0)]);
    assert!(
        r.models[1].quarantined.is_empty(),
        "{:?}",
        r.models[1].quarantined
    );
    assert!(
        r.models[2].quarantined.is_empty(),
        "{:?}",
        r.models[2].quarantined
    );
    assert_eq!(r.models[3].quarantined, vec![at(2, p - 1)]);
    assert!(matches!(
        r.errors(3)[..],
        [RunError::OverlapsExtent { other, .. }] if *other == x(2)
    ));
    assert_eq!(r.reports[3].applied as u64, n);
    assert_eq!(r.reports[4].applied, 1, "the held head, released");
}

/// One data extent with more distinct backrefs than a chunk of a run holds
/// (`CHUNK_HEADS_MAX` heads or 32768 refs: a head is never split), plus a
/// few at seqs a barrier holds: merged per `(key, seq)` as
/// `insert_delayed_ref()` does, counted at every lookup, all committed,
/// then all dropped in another order and the extent freed once.
#[test]
fn one_extent_with_more_distinct_backrefs_than_a_chunk_holds() {
    let b = 31 * MIB;
    let refs = 40_000u64;
    let ed = |i: u64| RefKey::ExtentData {
        root: 5,
        objectid: 257 + i % 3,
        offset: i << 12,
    };
    let d = |act, i, seq| op(b, 1 << 20, DATA, act, ed(i), seq);
    let mut steps = vec![d(Action::AddExtent, 0, 0), Acquire];
    steps.extend((1..refs).map(|i| d(Action::AddRef, i, u64::from(i % 1000 == 0))));
    steps.extend([Lookup, Commit, Release(0), Lookup, Commit]);
    steps.extend((0..refs).rev().map(|i| d(Action::DropRef, i, 0)));
    steps.extend([Lookup, Commit]);
    let r = agree_steps(&steps);
    assert_eq!(r.models[0].held, vec![b]);
    assert_eq!(r.reports[1].applied, 1);
    assert!(r.models.iter().all(|m| m.quarantined.is_empty()));
    assert_eq!(r.models[2].freed, vec![(b, 1 << 20)]);
}

// ---------------------------------------------------------------------
// Random streams on a few hot extents
// ---------------------------------------------------------------------

/// One random step over four extents (two data, two tree blocks; the
/// second of each kind 4 KiB into the first, so they overlap when both
/// live): every action with keys of all four kinds, extent_ops with and
/// on allocations, seqs at 0 or at the newest barrier, barrier changes and
/// commits. `barriers` is how many `Acquire`s came before.
fn random_step(w: (u8, u8, u8, u8, u8), barriers: usize) -> Step {
    let (b, act, key, seq, extra) = w;
    let base = 40 * MIB;
    let (bytenr, tree) = match b % 4 {
        0 => (base, false),
        1 => (base + 4096, false),
        2 => (base + MIB, true),
        _ => (base + MIB + 4096, true),
    };
    let (num_bytes, kind) = if tree {
        (16384, ExtentKind::Tree { level: extra % 2 })
    } else {
        (if extra % 5 == 0 { 4096 } else { 8192 }, DATA)
    };
    let k = u64::from(key % 3);
    let key = match (tree, key % 2) {
        (true, 0) => tree_key(5 + k),
        (true, _) => RefKey::SharedBlock { parent: MIB << k },
        (false, 0) => data_key(5 + k),
        (false, _) => RefKey::SharedData { parent: MIB << k },
    };
    let seq = if seq % 4 == 0 { barriers as u64 } else { 0 };
    match act % 32 {
        0..=11 => op(bytenr, num_bytes, kind, Action::AddRef, key, seq),
        12..=20 => op(bytenr, num_bytes, kind, Action::DropRef, key, seq),
        21..=25 => op(bytenr, num_bytes, kind, Action::AddExtent, key, seq),
        26 if tree => Step::Op(
            Op::new(bytenr, num_bytes, kind, Action::AddExtent, key, seq)
                .unwrap()
                .with_extent_op(ExtentOp {
                    flags_to_set: BLOCK_FLAG_FULL_BACKREF * u64::from(extra % 2),
                    key: Some(DiskKey {
                        objectid: u64::from(extra),
                        item_type: 1,
                        offset: 0,
                    }),
                })
                .unwrap(),
        ),
        26 | 27 => eop(
            bytenr,
            num_bytes,
            kind,
            BLOCK_FLAG_FULL_BACKREF,
            (tree && extra % 3 == 0).then_some(u64::from(extra)),
        ),
        28 => Acquire,
        29 => Release(usize::from(extra) % barriers.max(1)),
        _ => Commit,
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: cases(48),
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Random streams of a few hundred steps on four extents, a lookup
    /// after every op: with 64-op staging buffers each extent's ops fill
    /// buffers after its first hand-offs, so it is hot and counted in
    /// cells (allocations, extent_ops and barriers included), which the
    /// proptests of `model.rs` (staging of 3 or 4096 ops, a few hundred
    /// ops) never reach.
    #[test]
    fn random_streams_on_hot_extents_agree(
        words in proptest::collection::vec(
            (0u8..4, 0u8..32, 0u8..6, 0u8..8, 0u8..10),
            100..600,
        )
    ) {
        let mut steps = Vec::with_capacity(2 * words.len() + 1);
        let mut barriers = 0;
        for w in words {
            let s = random_step(w, barriers);
            match s {
                Acquire => barriers += 1,
                Release(_) if barriers == 0 => continue,
                _ => {}
            }
            let is_op = matches!(s, Step::Op(_));
            steps.push(s);
            if is_op {
                steps.push(Lookup);
            }
        }
        steps.push(Commit);
        agree_steps(&steps);
    }
}
