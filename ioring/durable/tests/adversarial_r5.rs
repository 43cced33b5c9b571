//! Named adversarial streams of `refd-core`'s `tests/adversarial_r5.rs`
//! through the durable engine, where its path differs from the core
//! engine's: heads held by a seq barrier written to the B+tree and
//! requeued by recovery with their seqs forgotten (no barrier survives a
//! restart, as no tree-mod-log seq survives a reboot), extent items with
//! every key field at its maximum encoded on the device (keyed
//! `EXTENT_DATA_REF`s at their hash), and a cache of one extent, so that
//! each commit reads its extents back from the B+tree. After every commit
//! the device's tree equals the sequential model's (`refd_core::oracle`),
//! with the same freed, refused and held extents; every lookup before a
//! commit equals the model's. Both stores.

use std::sync::Arc;

use refd_core::barrier::SeqGuard;
use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::model::{
    Action, DiskKey, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF, SEQ_MAX,
};
use refd_core::oracle::{normalize_tree, Model, ModelCommit};
use refd_durable::{DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::format::FsId;
use refd_ioring::{LogConfig, SimConfig, SimStorage};

type Dev = Arc<SimStorage>;

const DATA: ExtentKind = ExtentKind::Data;
const TREE0: ExtentKind = ExtentKind::Tree { level: 0 };
const MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    /// Take a seq barrier (the n-th `Acquire` since the last reopen holds
    /// seq n + 1).
    Acquire,
    /// Commit with the lowest barrier held.
    Commit,
    /// Power lost with every op durable: recovery replays the log and
    /// requeues the held heads; barriers are gone, pending seqs forgotten.
    Reopen,
}

use Step::{Acquire, Commit, Reopen};

fn opts() -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: 64 << 10,
            ..LogConfig::default()
        },
        // Every commit reads its extents (and their neighbours) back.
        cache_extents_max: 1,
        ..OpenOptions::default()
    }
}

/// Run `steps` through a fresh durable engine with store `D` and the
/// model; the models' commits.
fn agree_durable<D: DelayedRefStore + Default>(steps: &[Step]) -> Vec<ModelCommit> {
    let mut dev: Dev = Arc::new(SimStorage::new(SimConfig::new(32 << 20, 5)).unwrap());
    let format = FormatOptions {
        log_bytes: Some(8 << 20),
        fs_id: Some(FsId([5; 16])),
    };
    DurableEngine::format(&dev, format).unwrap();
    let mut e = DurableEngine::<Dev, D>::open_with_store(Arc::clone(&dev), opts())
        .unwrap()
        .0;
    let mut model = Model::new();
    let mut guards: Vec<SeqGuard> = Vec::new();
    let mut named: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Op(op) => {
                e.add_durable(op).unwrap();
                model.add(op);
                if let Err(at) = named.binary_search(&op.bytenr) {
                    named.insert(at, op.bytenr);
                }
            }
            Step::Acquire => guards.push(e.core().barrier().acquire()),
            Step::Reopen => {
                guards.clear();
                dev = Arc::new(dev.crash());
                drop(e);
                e = DurableEngine::open_with_store(Arc::clone(&dev), opts())
                    .unwrap()
                    .0;
                model.forget_seqs();
                e.verify().unwrap();
            }
            Step::Commit => {
                for &b in &named {
                    let want = model.lookup(b);
                    assert_eq!(e.lookup_extent_ref(b).unwrap().refs, want, "step {i}: {b}");
                }
                let barrier = e.core().barrier().lowest();
                let s = e.commit().unwrap();
                model.generation = s.generation - 1;
                let m = model.commit(barrier);
                let mut freed: Vec<(u64, u64)> = s
                    .core
                    .freed
                    .iter()
                    .map(|f| (f.bytenr, f.num_bytes))
                    .collect();
                freed.sort_unstable();
                let mut refused: Vec<u64> =
                    s.core.quarantined.iter().map(|q| q.head.bytenr).collect();
                refused.sort_unstable();
                assert_eq!(freed, m.freed, "step {i}: freed");
                assert_eq!(refused, m.quarantined, "step {i}: refused");
                assert_eq!(s.core.held, m.held.len(), "step {i}: held");
                let tree = e.committed_extents().unwrap();
                tree.check().unwrap();
                assert_eq!(normalize_tree(&tree), model.normalized(), "step {i}");
                out.push(m);
            }
        }
    }
    out
}

/// Both stores.
fn agree(steps: &[Step]) -> Vec<ModelCommit> {
    let m = agree_durable::<LockFreeStore>(steps);
    assert_eq!(m, agree_durable::<MutexStore>(steps));
    m
}

fn op(b: u64, n: u64, kind: ExtentKind, a: Action, key: RefKey, seq: u64) -> Step {
    Step::Op(Op::new(b, n, kind, a, key, seq).unwrap())
}

/// The seq-merge regression (ADD seq 0, DROP seq 1, ADD seq 2 of one tree
/// block's backref: btrfs-seq-merge-regression-fix.txt) held by a barrier
/// at seq 1, written to the device as a held head, and requeued by
/// recovery with its seqs forgotten: the commit after the restart runs it
/// merged (one block, one backref), never the ADD before the DROP.
#[test]
fn the_regression_held_across_a_restart() {
    let b = 3 * MIB;
    let t = |act, seq| op(b, 16384, TREE0, act, RefKey::TreeBlock { root: 5 }, seq);
    let m = agree(&[
        Acquire,
        t(Action::AddExtent, 0),
        t(Action::DropRef, 1),
        t(Action::AddExtent, 2),
        Commit,
        Reopen,
        Commit,
    ]);
    assert_eq!(m[0].held, vec![b]);
    assert!(m[1].held.is_empty() && m[1].quarantined.is_empty());
}

/// An allocation dropped again, the drop at a seq a barrier holds, across
/// a restart: held (nothing inserted, lookups 0), then freed once after
/// recovery, never inserted.
#[test]
fn a_held_allocation_dropped_again_across_a_restart() {
    let b = 10 * MIB;
    let sd = RefKey::SharedData { parent: 32 * MIB };
    let d = |act, seq| op(b, 8192, DATA, act, sd, seq);
    let m = agree(&[
        Acquire,
        d(Action::AddExtent, 0),
        d(Action::DropRef, 1),
        Commit,
        Reopen,
        Commit,
    ]);
    assert_eq!(m[0].held, vec![b]);
    assert_eq!(m[1].freed, vec![(b, 8192)]);
}

/// Every key field at `u64::MAX` (root, objectid, offset, parent), an
/// extent_op key at its maximum, seqs at `SEQ_MAX` under a barrier (held,
/// across a restart), an extent of one byte at the highest bytenr an
/// extent item can have, and one at bytenr 0: encoded on the device,
/// read back and compared after every commit.
#[test]
fn fields_at_their_maximum_on_the_device() {
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
    let max_key = Op::update_head(
        0,
        16384,
        TREE0,
        ExtentOp {
            flags_to_set: BLOCK_FLAG_FULL_BACKREF,
            key: Some(DiskKey {
                objectid: u64::MAX,
                item_type: u8::MAX,
                offset: u64::MAX,
            }),
        },
    )
    .unwrap();
    let m = agree(&[
        op(top, 1, DATA, Action::AddExtent, max_ed, 0),
        op(top, 1, DATA, Action::AddRef, near_ed, 0),
        op(top, 1, DATA, Action::AddRef, sd, 0),
        op(top, 1, DATA, Action::AddRef, sd, 0),
        op(
            0,
            16384,
            TREE0,
            Action::AddExtent,
            RefKey::TreeBlock { root: u64::MAX },
            0,
        ),
        op(0, 16384, TREE0, Action::AddRef, sb, 0),
        Step::Op(max_key),
        Commit,
        Acquire,
        op(top, 1, DATA, Action::DropRef, near_ed, SEQ_MAX),
        op(top, 1, DATA, Action::AddRef, max_ed, SEQ_MAX),
        op(0, 16384, TREE0, Action::DropRef, sb, SEQ_MAX),
        Commit,
        Reopen,
        Commit,
    ]);
    assert!(m[0].quarantined.is_empty());
    assert_eq!(m[1].held, vec![0, top]);
    assert!(m[2].held.is_empty() && m[2].quarantined.is_empty());
}
