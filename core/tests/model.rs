//! Random op streams with seq barriers, re-allocations, overlapping
//! allocations, extent_ops and interleaved commits: after every commit, lock-free == mutex == model
//! (extent tree, freed extents, quarantined and held heads), and lookups
//! agree at every step; so does the freed list a consumer gets
//! (`Ran::freed_unreused`), against the rule stated from the model alone
//! (`Model::reusable`).

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
use refd_core::oracle::Model;
use refd_core::run::RunError;

#[derive(Clone, Debug)]
enum Cmd {
    Op {
        b: u8,
        act: u8,
        key: u8,
        seq: u8,
        shape: u8,
        eop: u8,
    },
    Commit,
    Acquire,
    Release,
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        20 => (0u8..8, 0u8..20, 0u8..12, 0u8..8, 0u8..10, 0u8..8)
            .prop_map(|(b, act, key, seq, shape, eop)| Cmd::Op { b, act, key, seq, shape, eop }),
        2 => Just(Cmd::Commit),
        1 => Just(Cmd::Acquire),
        1 => Just(Cmd::Release),
    ]
}

/// Build an op: bytenr b is mostly data or mostly tree; shape 9 picks the
/// other kind (re-allocation with another kind/size). Bytenrs 6 and 7 lie
/// 4 KiB into those of 0 and 1, so their extents overlap whenever both are
/// live (1's only when it is 8 KiB, or a tree block).
fn build(b: u8, act: u8, key: u8, seq: u8, shape: u8, eop: u8, cur_seq: u64) -> Op {
    let bytenr = match b {
        6 => (1 << 20) + 4096,
        7 => (2 << 20) + 4096,
        _ => (u64::from(b) + 1) << 20,
    };
    let tree_bytenr = b.is_multiple_of(2);
    let is_tree = if shape == 9 {
        !tree_bytenr
    } else {
        tree_bytenr
    };
    let kind = if is_tree {
        ExtentKind::Tree {
            level: if shape == 8 { 1 } else { 0 },
        }
    } else {
        ExtentKind::Data
    };
    let num_bytes = if is_tree {
        16384
    } else if shape == 7 {
        8192
    } else {
        4096
    };
    let action = match act {
        0..=6 => Action::AddRef,
        7..=14 => Action::DropRef,
        15..=18 => Action::AddExtent,
        _ => Action::UpdateHead,
    };
    let seq = match seq {
        0..=3 => 0,
        4 | 5 => cur_seq,
        6 => cur_seq.saturating_sub(1),
        _ => u64::from(seq),
    };
    if action == Action::UpdateHead {
        let key = if eop.is_multiple_of(2) && is_tree {
            Some(DiskKey {
                objectid: u64::from(eop),
                item_type: 1,
                offset: 0,
            })
        } else {
            None
        };
        let flags = if eop < 6 { BLOCK_FLAG_FULL_BACKREF } else { 0 };
        let flags = if key.is_none() {
            BLOCK_FLAG_FULL_BACKREF
        } else {
            flags
        };
        return Op::update_head(
            bytenr,
            num_bytes,
            kind,
            ExtentOp {
                flags_to_set: flags,
                key,
            },
        )
        .unwrap();
    }
    let k = u64::from(key % 4);
    let key = if is_tree {
        if key < 8 {
            RefKey::TreeBlock { root: 5 + k }
        } else {
            RefKey::SharedBlock {
                parent: (k + 1) << 14,
            }
        }
    } else if key < 9 {
        RefKey::ExtentData {
            root: 5 + k % 2,
            objectid: 257 + k / 2,
            offset: 0,
        }
    } else {
        RefKey::SharedData {
            parent: (k + 1) << 14,
        }
    };
    let op = Op::new(bytenr, num_bytes, kind, action, key, seq).unwrap();
    if action == Action::AddExtent && is_tree && eop < 3 {
        op.with_extent_op(ExtentOp {
            flags_to_set: if eop == 0 { BLOCK_FLAG_FULL_BACKREF } else { 0 },
            key: Some(DiskKey {
                objectid: u64::from(eop) + 256,
                item_type: 84,
                offset: 0,
            }),
        })
        .unwrap()
    } else {
        op
    }
}

fn run(cmds: Vec<Cmd>, staging: usize) {
    let lf = Engine::new(LockFreeStore::with_config(4, staging));
    // Every commit of more than one effect applies in steps here, in one
    // hold of the lock in the mutex engine: both must equal the model.
    lf.set_apply_step(1);
    let mx = Engine::new(MutexStore::new());
    let mut model = Model::new();
    let mut lf_handles = [lf.handle().unwrap(), lf.handle().unwrap()];
    let mut mx_handle = mx.handle().unwrap();
    let mut guards = (Vec::new(), Vec::new());
    for (step, c) in cmds.into_iter().enumerate() {
        match c {
            Cmd::Op {
                b,
                act,
                key,
                seq,
                shape,
                eop,
            } => {
                let op = build(b, act, key, seq, shape, eop, lf.barrier().current());
                lf_handles[step % 2].add(&op).unwrap();
                mx_handle.add(&op).unwrap();
                model.add(&op);
                let refs = model.lookup(op.bytenr);
                assert_eq!(
                    lf.lookup_extent_ref(op.bytenr).refs,
                    refs,
                    "lockfree lookup at step {step}"
                );
                assert_eq!(
                    mx.lookup_extent_ref(op.bytenr).refs,
                    refs,
                    "mutex lookup at step {step}"
                );
                let pending = lf.store().pending(op.bytenr);
                assert_eq!(
                    pending,
                    mx.store().pending(op.bytenr),
                    "pending head at step {step}"
                );
                // The count's lookup reads summaries only (lock-free: no
                // merge of the refs unless the head may be a no-op).
                assert_eq!(
                    lf.store().pending_summary(op.bytenr),
                    pending.map(|h| h.summary),
                    "pending summary at step {step}"
                );
            }
            Cmd::Commit => {
                let barrier = lf.barrier().lowest();
                assert_eq!(barrier, mx.barrier().lowest());
                let (r_lf, listed_lf) = commit_listed(&lf);
                let (r_mx, listed_mx) = commit_listed(&mx);
                let m = model.commit(barrier);
                assert_eq!(listed_lf, listed_mx, "freed list at step {step}");
                assert_eq!(
                    listed_lf,
                    model.reusable(&m.freed),
                    "freed list vs model at step {step}"
                );
                assert_eq!(
                    r_lf.quarantined, r_mx.quarantined,
                    "quarantine (with errors) at step {step}"
                );
                assert_eq!(r_lf.freed, r_mx.freed, "freed at step {step}");
                assert_eq!(
                    (r_lf.held, r_lf.applied, r_lf.noop),
                    (r_mx.held, r_mx.applied, r_mx.noop)
                );
                let s = summary(&r_lf);
                assert_eq!(s.freed, m.freed, "freed vs model at step {step}");
                assert_eq!(
                    s.quarantined, m.quarantined,
                    "quarantined vs model at step {step}"
                );
                assert_eq!(r_lf.held, m.held.len(), "held vs model at step {step}");
                check_equal(&lf, &mx, &model, step);
            }
            Cmd::Acquire => {
                guards.0.push(lf.barrier().acquire());
                guards.1.push(mx.barrier().acquire());
            }
            Cmd::Release => {
                if !guards.0.is_empty() {
                    guards.0.remove(0);
                    guards.1.remove(0);
                }
            }
        }
    }
    drop(guards);
    let barrier = lf.barrier().lowest();
    let (r_lf, r_mx, m) = (lf.commit(), mx.commit(), model.commit(barrier));
    assert_eq!(r_lf.quarantined, r_mx.quarantined);
    assert_eq!(summary(&r_lf).quarantined, m.quarantined);
    check_equal(&lf, &mx, &model, usize::MAX);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn lockfree_mutex_model_agree(cmds in prop::collection::vec(cmd(), 1..300)) {
        run(cmds, 3);
    }

    #[test]
    fn lockfree_mutex_model_agree_big_staging(cmds in prop::collection::vec(cmd(), 1..300)) {
        run(cmds, 4096);
    }
}

/// The seed regression through the whole engine, both stores.
#[test]
fn seq_merge_regression_4_2_engine() {
    fn go<S: DelayedRefStore>(store: S) {
        let e = Engine::new(store);
        let mut h = e.handle().unwrap();
        let key = RefKey::TreeBlock { root: 5 };
        let kind = ExtentKind::Tree { level: 0 };
        for (action, seq) in [
            (Action::AddExtent, 0),
            (Action::DropRef, 1),
            (Action::AddExtent, 2),
        ] {
            h.add(&Op::new(1 << 30, 16384, kind, action, key, seq).unwrap())
                .unwrap();
        }
        let r = e.commit();
        assert!(r.quarantined.is_empty(), "{:?}", r.quarantined);
        let item = e.tree().get(1 << 30).cloned().unwrap();
        assert_eq!(item.backrefs(), vec![(key, 1)]);
    }
    go(MutexStore::new());
    go(LockFreeStore::with_config(2, 2));
}

/// Issue 13 defect 1 through the engine (both stores and the model): a
/// tree block still referenced by FS_TREE allocated again with a backref
/// from CSUM_TREE is quarantined, never merged, never reported freed; the
/// same bytenr dropped and allocated again in one commit (drop and add of
/// one key cancelling at insert, across shards) is a new life.
#[test]
fn realloc_while_referenced_is_quarantined_engine() {
    let kind = ExtentKind::Tree { level: 0 };
    let fs = RefKey::TreeBlock { root: 5 };
    let csum = RefKey::TreeBlock { root: 7 };
    let b = 30425088;
    let op = |a, k| Op::new(b, 16384, kind, a, k, 0).unwrap();
    let r = agree(&[
        vec![op(Action::AddExtent, fs)],
        vec![op(Action::AddExtent, csum)],
        vec![op(Action::AddExtent, csum), op(Action::DropRef, csum)],
        vec![op(Action::DropRef, fs), op(Action::AddExtent, fs)],
    ]);
    for q in [&r[1], &r[2]] {
        assert_eq!(q.quarantined.len(), 1);
        assert!(
            matches!(
                q.quarantined[0].error,
                RunError::ReallocWhileReferenced { key, count: 1, .. } if key == fs
            ),
            "{:?}",
            q.quarantined[0].error
        );
        assert!(q.freed.is_empty(), "a referenced extent is never freed");
    }
    assert!(r[3].quarantined.is_empty());
    assert_eq!(r[3].freed.len(), 1, "the old life ends");
}

/// A data op on `bytenr` of `num_bytes`, its backref inode 257 at offset
/// 0 of `root`.
fn data_op(bytenr: u64, num_bytes: u64, action: Action, root: u64) -> Op {
    let key = RefKey::ExtentData {
        root,
        objectid: 257,
        offset: 0,
    };
    Op::new(bytenr, num_bytes, ExtentKind::Data, action, key, 0).unwrap()
}

/// The one quarantine error of the head at `bytenr` in `r`.
fn refused(r: &CommitReport, bytenr: u64) -> &RunError {
    assert_eq!(r.quarantined.len(), 1, "{:?}", r.quarantined);
    assert_eq!(r.quarantined[0].head.bytenr, bytenr);
    assert!(r.freed.is_empty(), "a refused head frees nothing");
    &r.quarantined[0].error
}

/// Issue 13 defect 7, the size half: a data extent allocated as 4096
/// bytes with a ref of the same life naming 8192 bytes. The kernel looks
/// up the extent item of each ref by (bytenr, num_bytes) and fails it; refd
/// used to accept the ref (the allocation hid the shape). Refused in both
/// stores and the model, freshly allocated or re-allocated over a committed
/// extent of the same size; legal when an earlier life owns the other size.
#[test]
fn ref_naming_another_size_than_its_allocation_is_refused_engine() {
    let b = 1 << 30;
    let op = |a, n, root| data_op(b, n, a, root);
    let r = agree(&[
        // Fresh allocation, a ref of another size.
        vec![op(Action::AddExtent, 4096, 5), op(Action::AddRef, 8192, 6)],
        vec![op(Action::AddExtent, 4096, 5)],
        // Freed and re-allocated with the same size, a ref of another.
        vec![
            op(Action::DropRef, 4096, 5),
            op(Action::AddExtent, 4096, 6),
            op(Action::AddRef, 8192, 7),
        ],
        // Freed and re-allocated with another size: the drop names the old
        // life's size, legal.
        vec![op(Action::DropRef, 4096, 5), op(Action::AddExtent, 8192, 6)],
        // Allocated, freed and allocated again with another size in one
        // commit (over the committed 8192 life, freed first).
        vec![
            op(Action::DropRef, 8192, 6),
            op(Action::AddExtent, 4096, 7),
            op(Action::DropRef, 4096, 7),
            op(Action::AddExtent, 16384, 8),
        ],
    ]);
    for n in [0, 2] {
        assert!(
            matches!(
                refused(&r[n], b),
                RunError::AllocShapeMismatch {
                    num_bytes: 4096,
                    ..
                }
            ),
            "commit {n}: {:?}",
            r[n].quarantined
        );
    }
    assert!(r[1].quarantined.is_empty() && r[3].quarantined.is_empty());
    assert!(r[4].quarantined.is_empty(), "{:?}", r[4].quarantined);
    assert_eq!(r[3].freed.len(), 1, "the 4096 life ends");
    // The 4096 life was never inserted: only the committed life is freed.
    assert_eq!(r[4].freed.len(), 1, "the 8192 life ends");
}

/// Two allocations of one bytenr in one transaction without a free of the
/// first in between: the kernel reserves a range once, so a second
/// ADD_EXTENT is a second insert of the same extent item (-EEXIST). refd
/// used to merge them into one extent with both backrefs (or one data
/// backref with count 2). Allocate, drop everything, allocate again is
/// legal (the kernel reuses a range freed in the same transaction).
#[test]
fn second_allocation_without_a_free_is_refused_engine() {
    let b = 1 << 30;
    let data = |root| RefKey::ExtentData {
        root,
        objectid: 257,
        offset: 0,
    };
    let tree = RefKey::TreeBlock { root: 5 };
    let dop = |a, root| Op::new(b, 4096, ExtentKind::Data, a, data(root), 0).unwrap();
    let top = |a, k| Op::new(b, 16384, ExtentKind::Tree { level: 0 }, a, k, 0).unwrap();
    let r = agree(&[
        // Twice, two backrefs.
        vec![dop(Action::AddExtent, 5), dop(Action::AddExtent, 6)],
        // Twice, the same data backref (would be count 2).
        vec![dop(Action::AddExtent, 5), dop(Action::AddExtent, 5)],
        // Allocated, freed, allocated again: legal.
        vec![
            dop(Action::AddExtent, 5),
            dop(Action::DropRef, 5),
            dop(Action::AddExtent, 6),
        ],
        // Over the committed life: freed once, allocated twice.
        vec![
            dop(Action::DropRef, 6),
            dop(Action::AddExtent, 7),
            dop(Action::AddExtent, 8),
        ],
        // Freed, allocated as a tree block, freed, allocated again: legal.
        vec![
            dop(Action::DropRef, 6),
            top(Action::AddExtent, tree),
            top(Action::DropRef, tree),
            top(Action::AddExtent, tree),
        ],
    ]);
    for n in [0, 1, 3] {
        assert!(
            matches!(
                refused(&r[n], b),
                RunError::AllocatedTwice { allocs: 2, .. }
            ),
            "commit {n}: {:?}",
            r[n].quarantined
        );
    }
    assert!(r[2].quarantined.is_empty() && r[4].quarantined.is_empty());
    assert_eq!(r[4].freed.len(), 1, "the data life ends");
}

/// An allocation whose range meets a live extent (issue 13): the kernel's
/// allocator never hands out a range that overlaps an extent, so such an
/// op stream is a client bug, and refd used to commit a tree that
/// `ExtentTree::check` calls broken. Refused in both stores and the model,
/// whether the live extent is committed (before or inside the new range)
/// or allocated in the same commit (the allocation at the higher bytenr is
/// refused); legal when the extent it meets is freed in the same commit.
#[test]
fn allocation_overlapping_a_live_extent_is_refused_engine() {
    let op = data_op;
    let mib = 1u64 << 20;
    let r = agree(&[
        vec![op(mib, 64 << 10, Action::AddExtent, 5)],
        // Inside the committed 64 KiB extent.
        vec![op(mib + 4096, 4096, Action::AddExtent, 6)],
        // Starting before it and reaching into it.
        vec![op(mib - 4096, 8192, Action::AddExtent, 6)],
        // Two allocations of one commit, the second inside the first.
        vec![
            op(4 * mib, 16384, Action::AddExtent, 5),
            op(4 * mib + 8192, 4096, Action::AddExtent, 6),
        ],
        // The 64 KiB extent freed and its range allocated again in the
        // same commit, at its bytenr and inside it: legal.
        vec![
            op(mib, 64 << 10, Action::DropRef, 5),
            op(mib, 4096, Action::AddExtent, 7),
            op(mib + 8192, 4096, Action::AddExtent, 8),
        ],
    ]);
    let overlaps = |n: usize, bytenr, num_bytes, other, other_bytes| {
        assert_eq!(
            refused(&r[n], bytenr),
            &RunError::OverlapsExtent {
                bytenr,
                num_bytes,
                other,
                other_bytes
            },
            "commit {n}"
        );
    };
    overlaps(1, mib + 4096, 4096, mib, 64 << 10);
    overlaps(2, mib - 4096, 8192, mib, 64 << 10);
    overlaps(3, 4 * mib + 8192, 4096, 4 * mib, 16384);
    assert_eq!(r[3].applied, 1, "the lower allocation stays");
    assert!(r[4].quarantined.is_empty(), "{:?}", r[4].quarantined);
    assert_eq!(r[4].freed.len(), 1, "the 64 KiB extent ends");
}

/// An allocation dropped again by the commit that made it (it leaves no
/// extent) over a committed extent that stays live all through the
/// commit was handed out over it: refused in both stores and the model
/// (rule 9), nothing freed. Over a committed extent that the same commit
/// frees, or frees and allocates again, it is legal and its free is
/// listed where nothing is live afterwards.
#[test]
fn allocation_dropped_over_a_live_extent_is_refused_engine() {
    let op = data_op;
    let mib = 1u64 << 20;
    let r = agree(&[
        vec![
            op(mib, 4096, Action::AddExtent, 5),
            op(mib + 16384, 4096, Action::AddExtent, 5),
        ],
        // Over both, both live: refused, naming the first.
        vec![
            op(mib - 4096, 32768, Action::AddExtent, 6),
            op(mib - 4096, 32768, Action::DropRef, 6),
        ],
        // The first freed, the second freed and allocated again: legal.
        vec![
            op(mib, 4096, Action::DropRef, 5),
            op(mib + 16384, 4096, Action::DropRef, 5),
            op(mib + 16384, 8192, Action::AddExtent, 7),
            op(mib - 4096, 32768, Action::AddExtent, 6),
            op(mib - 4096, 32768, Action::DropRef, 6),
        ],
    ]);
    assert_eq!(
        refused(&r[1], mib - 4096),
        &RunError::OverlapsExtent {
            bytenr: mib - 4096,
            num_bytes: 32768,
            other: mib,
            other_bytes: 4096
        }
    );
    assert!(r[1].freed.is_empty(), "{:?}", r[1].freed);
    assert!(r[2].quarantined.is_empty(), "{:?}", r[2].quarantined);
    assert_eq!(r[2].freed.len(), 3, "two old lives and the dropped one");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    /// Dense overlaps: data extents of 4-12 KiB allocated and dropped at
    /// 16 bytenrs 4 KiB apart, over several commits: chains of
    /// overlapping allocations, allocations inside extents freed in the
    /// same commit, refused ones restoring their committed extent. Both
    /// stores and the model agree after every commit, and the tree never
    /// overlaps.
    #[test]
    fn dense_overlaps_agree(
        commits in prop::collection::vec(
            prop::collection::vec((0u64..16, 1u64..4, any::<bool>(), 0u64..2), 1..12),
            1..8,
        )
    ) {
        let ops: Vec<Vec<Op>> = commits
            .iter()
            .map(|c| {
                c.iter()
                    .map(|&(k, units, alloc, root)| {
                        let action = if alloc { Action::AddExtent } else { Action::DropRef };
                        let key = RefKey::ExtentData {
                            root: 5 + root,
                            objectid: 257,
                            offset: 0,
                        };
                        let b = (1 << 20) + k * 4096;
                        Op::new(b, units * 4096, ExtentKind::Data, action, key, 0).unwrap()
                    })
                    .collect()
            })
            .collect();
        agree(&ops);
    }
}
