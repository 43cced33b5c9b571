//! Tests of the durable engine on the simulated device.

use std::sync::Arc;

use refd_core::model::Op;
use refd_ioring::format::{FsId, Superblock, NODE_BYTES, SUPERBLOCK_REGION_BYTES};
use refd_ioring::log::LogConfig;

use super::open::{default_log_bytes, device_bytes_min_for_log, format_layout};
use super::read::{read_extent_count, read_held};
use super::*;
use crate::error::{AddError, CommitError, OpenError};
use refd_core::model::{Action, ExtentKind, RefKey};
use refd_ioring::{FaultPlan, SimConfig, SimStorage};

type Dev = Arc<SimStorage>;

// The integration tests' helpers, one copy (see its module doc).
#[path = "../../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

/// A simulated device of `dev_bytes` (crash seed 1), formatted with a
/// log of `log_bytes`.
fn formatted(dev_bytes: u64, log_bytes: u64) -> (Dev, Superblock) {
    common::formatted_with_superblock(dev_bytes, log_bytes, 1)
}

/// A data extent op with an `EXTENT_DATA_REF` (offset 0).
fn data_op(bytenr: u64, num_bytes: u64, action: Action, root: u64, objectid: u64, seq: u64) -> Op {
    let key = RefKey::ExtentData {
        root,
        objectid,
        offset: 0,
    };
    Op::new(bytenr, num_bytes, ExtentKind::Data, action, key, seq).unwrap()
}

fn setup() -> (Dev, DurableEngine<Dev>) {
    let (dev, sb) = formatted(8 << 20, 1 << 20);
    assert_eq!(sb.generation, 2);
    let (e, info) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
    assert_eq!(
        (info.superblock_generation, info.claimed_generation),
        (2, 3)
    );
    (dev, e)
}

fn opts() -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: 64 << 10,
            ..LogConfig::default()
        },
        ..OpenOptions::default()
    }
}

fn data(action: Action, objectid: u64) -> Op {
    Op::new(
        1 << 20,
        4096,
        ExtentKind::Data,
        action,
        RefKey::ExtentData {
            root: 5,
            objectid,
            offset: 0,
        },
        0,
    )
    .unwrap()
}

#[test]
fn commit_generations() {
    let (_dev, e) = setup();
    e.add_durable(&data(Action::AddExtent, 1)).unwrap();
    let s = e.commit().unwrap();
    assert_eq!(s.generation, 4, "one past the claimed generation");
    assert_eq!(e.superblock().generation, 4);
    assert_eq!(e.commit().unwrap().generation, 5);
    e.verify().unwrap();
    // A malformed op is refused before anything is logged.
    let mut bad = data(Action::AddRef, 2);
    bad.num_bytes = 0;
    assert!(matches!(e.add(&bad), Err(AddError::Op(_))));
    assert!(e.failure().is_none());
}

/// Heads a seq barrier holds are committed into the B+tree (their log
/// records are trimmed), survive a power loss, are requeued by
/// recovery and run by the next commit, exactly once.
#[test]
fn held_heads_survive_a_crash() {
    let (dev, e) = setup();
    e.add_durable(&data(Action::AddExtent, 1)).unwrap();
    e.commit().unwrap();
    let guard = e.core().barrier().acquire();
    let mut op = data(Action::AddRef, 2);
    op.seq = e.core().barrier().current();
    e.add_durable(&op).unwrap();
    e.add_durable(&data(Action::AddRef, 3)).unwrap();
    let s = e.commit().unwrap();
    assert_eq!((s.core.held, s.core.applied), (1, 0), "{:?}", s.core);
    assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 3);
    // Committed again while still held: the held set is rewritten.
    let s = e.commit().unwrap();
    assert_eq!(s.core.held, 1);
    assert_eq!(read_held(e.btree(), "sim").unwrap().0.len(), 1);
    e.verify().unwrap();
    assert_eq!(e.log().used_bytes(), 0, "the held ops' records are trimmed");
    drop(guard);

    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let (e, info) = DurableEngine::open(Arc::clone(&crashed), opts()).unwrap();
    assert_eq!((info.heads_held, info.ops_replayed), (1, 0), "{info}");
    assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 3);
    e.verify().unwrap();
    // A barrier of the new engine (its counter restarted) does not hold
    // the recovered head: recovery forgot its seq.
    let _new_barrier = e.core().barrier().acquire();
    let s = e.commit().unwrap();
    assert_eq!((s.core.held, s.core.applied), (0, 1));
    let item = e
        .committed_extents()
        .unwrap()
        .get(1 << 20)
        .cloned()
        .unwrap();
    assert_eq!(item.refs, 3);
    for obj in 1..=3 {
        assert_eq!(item.count(&data(Action::AddRef, obj).key.unwrap()), 1);
    }
    // The held set is gone from the B+tree.
    assert_eq!(read_held(e.btree(), "sim").unwrap(), (Vec::new(), 0));
    e.verify().unwrap();
    drop(e);
    let (e, info) = DurableEngine::open(crashed, opts()).unwrap();
    assert_eq!(info.heads_held, 0);
    assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 3);
}

/// Recovery with ref-verify rebuilds the shadow from the committed tree,
/// the held heads requeued and the replayed log: after a crash, a drop of
/// a ref that is only committed, only held (a seq barrier kept it out of
/// the tree) or only in the log is accepted, and a drop of a ref that
/// never existed is refused by ref-verify before anything is logged.
#[test]
fn recovery_with_verify_knows_committed_held_and_replayed_refs() {
    let vopts = || OpenOptions {
        verify: true,
        ..opts()
    };
    let (dev, sb) = formatted(8 << 20, 1 << 20);
    assert_eq!(sb.generation, 2);
    let (e, _) = DurableEngine::open(Arc::clone(&dev), vopts()).unwrap();
    e.add_durable(&data(Action::AddExtent, 1)).unwrap();
    e.commit().unwrap();
    let guard = e.core().barrier().acquire();
    let mut held = data(Action::AddRef, 2);
    held.seq = e.core().barrier().current();
    e.add_durable(&held).unwrap();
    let s = e.commit().unwrap();
    assert_eq!(s.core.held, 1, "{:?}", s.core);
    e.add_durable(&data(Action::AddRef, 3)).unwrap();
    drop(guard);
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);

    let (e, info) = DurableEngine::open(crashed, vopts()).unwrap();
    assert_eq!((info.heads_held, info.ops_replayed), (1, 1), "{info}");
    assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 3);
    // Never added: refused by the rebuilt shadow, nothing logged.
    let used = e.log().used_bytes();
    assert!(
        matches!(
            e.add_durable(&data(Action::DropRef, 9)),
            Err(AddError::Refused(_))
        ),
        "a drop of a ref that never existed"
    );
    assert_eq!(e.log().used_bytes(), used);
    // Held across the crash, replayed from the log, committed: accepted.
    for obj in [2, 3, 1] {
        e.add_durable(&data(Action::DropRef, obj))
            .unwrap_or_else(|err| panic!("drop of ref {obj}: {err}"));
    }
    let s = e.commit().unwrap();
    assert!(s.core.quarantined.is_empty(), "{:?}", s.core.quarantined);
    assert_eq!(s.core.freed.len(), 1);
    assert!(e.committed_extents().unwrap().get(1 << 20).is_none());
    e.verify().unwrap();
}

/// Two allocations of one bytenr in one transaction are refused by the
/// durable engine as by the core stores, and still after a crash when a
/// seq barrier held the head: the held-heads stream keeps the head's
/// allocation count (version 3), so recovery does not forget the second
/// allocation.
#[test]
fn a_double_allocation_is_refused_also_when_held_across_a_crash() {
    use refd_core::run::RunError;
    let refused = |s: &CommitSummary| {
        assert_eq!((s.core.applied, s.core.quarantined.len()), (0, 1), "{s:?}");
        assert!(matches!(
            s.core.quarantined[0].error,
            RunError::AllocatedTwice { allocs: 2, .. }
        ));
    };
    let (dev, e) = setup();
    e.add_durable(&data(Action::AddExtent, 1)).unwrap();
    e.add_durable(&data(Action::AddExtent, 2)).unwrap();
    refused(&e.commit().unwrap());
    let guard = e.core().barrier().acquire();
    let mut op = data(Action::AddExtent, 1);
    op.seq = e.core().barrier().current();
    e.add_durable(&op).unwrap();
    e.add_durable(&data(Action::AddExtent, 2)).unwrap();
    let s = e.commit().unwrap();
    assert_eq!(s.core.held, 1, "{:?}", s.core);
    assert_eq!(read_held(e.btree(), "sim").unwrap().0[0].summary.allocs, 2);
    drop(guard);
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let (e, info) = DurableEngine::open(crashed, opts()).unwrap();
    assert_eq!(info.heads_held, 1, "{info}");
    refused(&e.commit().unwrap());
    assert!(e.committed_extents().unwrap().get(1 << 20).is_none());
    e.verify().unwrap();
}

/// Issue 12: the extent count (extent items in the committed tree) is
/// kept by every commit (inserted minus deleted), recorded in the tree
/// with it, right after a crash (ops replayed from the log count once they
/// are committed), read back by an open whose cache does not hold every
/// extent, and always what `verify`'s scan of the tree counts.
#[test]
fn extent_count_after_commits_and_a_crash() {
    let at = |bytenr: u64, action, objectid| Op {
        bytenr: bytenr << 20,
        ..data(action, objectid)
    };
    let (dev, e) = setup();
    assert_eq!(e.extents(), 0);
    for b in 1..=5 {
        e.add_durable(&at(b, Action::AddExtent, 1)).unwrap();
    }
    e.add_durable(&at(1, Action::AddRef, 2)).unwrap();
    e.commit().unwrap();
    assert_eq!(e.extents(), 5);
    e.verify().unwrap();
    // Two freed, one of them allocated again, one new, one changed.
    e.add_durable(&at(2, Action::DropRef, 1)).unwrap();
    e.add_durable(&at(3, Action::DropRef, 1)).unwrap();
    e.add_durable(&at(3, Action::AddExtent, 4)).unwrap();
    e.add_durable(&at(6, Action::AddExtent, 1)).unwrap();
    e.add_durable(&at(1, Action::DropRef, 2)).unwrap();
    e.commit().unwrap();
    assert_eq!(e.extents(), 5);
    assert_eq!(read_extent_count(e.btree(), "sim").unwrap(), Some(5));
    e.verify().unwrap();
    // Acknowledged, not committed: counted once committed.
    e.add_durable(&at(7, Action::AddExtent, 1)).unwrap();
    e.add_durable(&at(4, Action::DropRef, 1)).unwrap();
    assert_eq!(e.extents(), 5);
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let (e, info) = DurableEngine::open(Arc::clone(&crashed), opts()).unwrap();
    assert_eq!(info.ops_replayed, 2, "{info}");
    assert_eq!(e.extents(), 5);
    e.verify().unwrap();
    e.commit().unwrap();
    assert_eq!(e.extents(), 5);
    e.verify().unwrap();
    drop(e);
    let small = OpenOptions {
        cache_extents_max: 2,
        ..opts()
    };
    let (e, info) = DurableEngine::open(crashed, small).unwrap();
    assert_eq!(info.extents_cached, 2);
    assert_eq!(e.extents(), 5, "read from the tree, not the cache");
    e.add_durable(&at(8, Action::AddExtent, 1)).unwrap();
    e.commit().unwrap();
    assert_eq!(e.extents(), 6);
    e.verify().unwrap();
    // A count that is not the tree's is found.
    e.extents.store(7, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(
        e.verify(),
        Err(crate::error::VerifyError::ExtentCount {
            counted: 6,
            in_memory: 7,
            recorded: Some(6)
        })
    ));
}

/// A commit big enough for every run worker, with heads inside a larger
/// extent's range (two 64 KiB extents freed and their ranges allocated
/// again: head selection wraps around inside a worker's part, so its item
/// changes come out of key order): the B+tree gets exactly the cache's
/// items.
#[test]
fn parallel_run_item_changes_reach_the_btree() {
    let (dev, _) = formatted(64 << 20, 16 << 20);
    // One commit of every head: no dirty-bytes trigger, whose estimate
    // before the first commit (one node per op) would throttle the adds
    // into an inline commit after 2 x 6553 ops.
    let options = OpenOptions {
        policy: crate::CommitPolicy {
            dirty_bytes_trigger: 0,
            ..crate::CommitPolicy::default()
        },
        ..opts()
    };
    let (e, _) = DurableEngine::open(dev, options).unwrap();
    let heads = 2 * refd_core::engine::PARALLEL_RUN_MIN_HEADS as u64 + 100;
    let at = |i: u64| (1u64 << 30) + i * (16 << 10);
    let op = |bytenr: u64, num_bytes: u64, action: Action, root: u64| {
        data_op(bytenr, num_bytes, action, root, 257, 0)
    };
    // In both workers' ranges: a 64 KiB extent over the next four heads'
    // bytenrs, which are allocated once it is freed.
    let bigs = [10, heads - 10];
    let inside = |i: u64| bigs.iter().any(|&b| i > b && i <= b + 4);
    for round in 0..2u64 {
        for i in 0..heads {
            let action = match (round, inside(i)) {
                (0, true) => continue,
                (0, false) | (1, true) => Action::AddExtent,
                _ => Action::AddRef,
            };
            e.add(&op(at(i), 4096, action, 5 + round)).unwrap();
        }
        for i in bigs {
            let action = [Action::AddExtent, Action::DropRef][round as usize];
            e.add(&op(at(i) + 4096, 64 << 10, action, 5)).unwrap();
        }
        let s = e.commit().unwrap();
        assert!(s.core.quarantined.is_empty(), "{:?}", s.core.quarantined);
        assert_eq!(s.core.applied as u64, heads + 2 - 8 * (1 - round));
        assert_eq!(e.committed_extents().unwrap(), *e.cached_extents());
        e.verify().unwrap();
    }
}

/// An allocation overlapping a committed extent that the engine's cache
/// no longer holds (the cache is smaller than the tree) is refused as
/// when it is cached: a commit reads the extents next to every
/// allocation from the B+tree (the one below it, and one inside its
/// range). The tree on the device stays without overlaps.
#[test]
fn overlap_with_an_evicted_extent_is_refused() {
    use refd_core::run::RunError;
    let (dev, _) = formatted(8 << 20, 1 << 20);
    let small = OpenOptions {
        cache_extents_max: 2,
        ..opts()
    };
    let (e, _) = DurableEngine::open(dev, small).unwrap();
    let op = |bytenr: u64, num_bytes: u64, objectid: u64| {
        data_op(bytenr, num_bytes, Action::AddExtent, 5, objectid, 0)
    };
    let mib = 1u64 << 20;
    e.add_durable(&op(mib, 64 << 10, 1)).unwrap();
    for i in 1..=4 {
        e.add_durable(&op(10 * i * mib, 4096, 2)).unwrap();
    }
    e.commit().unwrap();
    assert!(e.cached_extents().get(mib).is_none(), "evicted");
    for (bytenr, num_bytes) in [(mib + 4096, 4096), (mib - 4096, 8192)] {
        e.add_durable(&op(bytenr, num_bytes, 3)).unwrap();
        let s = e.commit().unwrap();
        assert_eq!(
            s.core
                .quarantined
                .iter()
                .map(|q| q.error.clone())
                .collect::<Vec<_>>(),
            vec![RunError::OverlapsExtent {
                bytenr,
                num_bytes,
                other: mib,
                other_bytes: 64 << 10
            }]
        );
        e.verify().unwrap();
    }
    e.committed_extents().unwrap().check().unwrap();
    assert_eq!(e.extents(), 5);
}

/// `verify` finds an extent that starts inside the one before it (damage:
/// a commit never writes one, an overlapping allocation is refused), put
/// into the B+tree behind the engine's back.
#[test]
fn verify_finds_an_extent_inside_another() {
    let (_dev, e) = setup();
    e.add_durable(&data(Action::AddExtent, 1)).unwrap();
    e.commit().unwrap();
    e.verify().unwrap();
    let mut item = refd_core::extent_tree::ExtentItem::new(4096, ExtentKind::Data, 9);
    let key = RefKey::ExtentData {
        root: 5,
        objectid: 9,
        offset: 0,
    };
    item.add_ref(key, 1);
    let mut changes = Vec::new();
    let inside = (1 << 20) + 2048;
    crate::codec::diff_extent(inside, None, Some(&item), &mut changes).unwrap();
    e.tree.apply_sorted(changes).unwrap();
    assert!(matches!(
        e.verify(),
        Err(crate::error::VerifyError::Overlap {
            bytenr,
            prev: 0x10_0000,
            prev_bytes: 4096
        }) if bytenr == inside
    ));
}

/// Replay keeps each extent's ops in log order: after a crash, the
/// latest of several allocations of one bytenr still wins, for many
/// extents at once.
#[test]
fn replay_keeps_each_extents_order() {
    let (dev, e) = setup();
    let op = |b: u64, bytes: u64, action: Action| data_op(b, bytes, action, 5, 1, 0);
    // Each pass over all extents: an extent's two allocations are far
    // apart in the log.
    let bytenr = |i: u64| (1 << 30) + i * (1 << 20);
    for i in 0..3000u64 {
        e.add(&op(bytenr(i), 4096, Action::AddExtent)).unwrap();
    }
    for i in 0..3000u64 {
        e.add(&op(bytenr(i), 4096, Action::DropRef)).unwrap();
    }
    e.add(&data(Action::AddExtent, 9)).unwrap();
    for i in 0..3000u64 {
        e.add(&op(bytenr(i), 8192 + 4096 * (i % 3), Action::AddExtent))
            .unwrap();
    }
    e.add_durable(&data(Action::AddRef, 10)).unwrap();
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let (e, info) = DurableEngine::open(crashed, opts()).unwrap();
    assert_eq!(info.ops_replayed, 9002);
    let s = e.commit().unwrap();
    assert!(s.core.quarantined.is_empty(), "{:?}", s.core.quarantined);
    let all = e.committed_extents().unwrap();
    for i in 0..3000u64 {
        let item = all.get(bytenr(i)).unwrap();
        assert_eq!(
            (item.num_bytes, item.refs),
            (8192 + 4096 * (i % 3), 1),
            "{i}"
        );
    }
}

#[test]
fn a_failed_write_latches() {
    let (dev, e) = setup();
    e.add_durable(&data(Action::AddExtent, 1)).unwrap();
    dev.set_fault_plan(FaultPlan {
        write_eio_at: Some(1),
        ..FaultPlan::default()
    });
    assert!(e.add_durable(&data(Action::AddRef, 2)).is_err());
    assert!(e.failure().is_some());
    let first = e.failure().unwrap();
    assert!(first.offset.is_some(), "{first}");
    match e.add(&data(Action::AddRef, 3)) {
        Err(AddError::Failed(f)) => assert_eq!(f, first),
        r => panic!("{r:?}"),
    }
    match e.commit() {
        Err(CommitError::Failed(f)) => assert_eq!(f, first),
        r => panic!("{r:?}"),
    }
}

/// Ten acknowledged batches (an allocation, then nine refs, one op per
/// batch) and no checkpoint after them; then one bit of batch 5 rots.
fn ten_acknowledged_batches_one_rotten() -> Dev {
    let (dev, e) = setup();
    e.add_durable(&data(Action::AddExtent, 1)).unwrap();
    for objectid in 2..=10 {
        e.add_durable(&data(Action::AddRef, objectid)).unwrap();
    }
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    // Batch 5 (4096 bytes at log offset 4 * 4096): a bit of its record.
    let log_start = refd_ioring::format::SUPERBLOCK_REGION_BYTES;
    crashed.flip_bit(log_start + 4 * 4096 + 85, 3).unwrap();
    crashed
}

/// The case on the engine: open refuses, naming the damaged LSNs
/// and the acknowledged ops after them (it used to take the rotten batch
/// for a torn tail and drop every later batch without a word); the
/// recovery modes recover exactly what they promise and record the
/// choice in the superblock.
#[test]
fn a_rotten_batch_in_the_middle_of_the_log_is_refused_then_recovered_explicitly() {
    use refd_ioring::format::{RECOVERY_MODE_SKIP_CORRUPT, RECOVERY_MODE_TOLERATE_TAIL};
    use refd_ioring::log::{LogError, Lsn, RecoveryMode};
    let dev = ten_acknowledged_batches_one_rotten();
    match DurableEngine::open(Arc::clone(&dev), opts()) {
        Err(OpenError::LogDamaged {
            ops_after, source, ..
        }) => match *source {
            LogError::Damaged { first, last, .. } => {
                assert_eq!((first, last, ops_after), (Lsn(5), Lsn(5), 5))
            }
            other => panic!("expected Damaged, got {other:?}"),
        },
        other => panic!("expected LogDamaged, got {:?}", other.map(|(_, i)| i)),
    }
    for (mode, code, refs, ops, dropped, lost) in [
        (
            RecoveryMode::SkipCorrupt,
            RECOVERY_MODE_SKIP_CORRUPT,
            9,
            9,
            (5, 5, 1),
            0,
        ),
        (
            RecoveryMode::TolerateTail,
            RECOVERY_MODE_TOLERATE_TAIL,
            4,
            4,
            (5, 10, 6),
            5,
        ),
    ] {
        let dev: Dev = Arc::new(dev.crash());
        let options = OpenOptions {
            recovery_mode: mode,
            ..opts()
        };
        let (e, info) = DurableEngine::open(Arc::clone(&dev), options).unwrap();
        assert_eq!(info.ops_replayed, ops, "{mode}: {info}");
        let record = info.dropped.expect("dropped");
        assert_eq!(
            (
                record.mode,
                record.dropped_first_lsn,
                record.dropped_last_lsn
            ),
            (code, dropped.0, dropped.1)
        );
        assert_eq!(
            (record.dropped_batches, record.dropped_ops),
            (dropped.2, lost)
        );
        assert_eq!(record.generation, info.claimed_generation);
        assert!(info.to_string().contains("DROPPED"), "{info}");
        e.commit().unwrap();
        assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, refs, "{mode}");
        e.verify().unwrap();
        // The choice stays recorded, and the device opens strictly again.
        e.add_durable(&data(Action::AddRef, 11)).unwrap();
        let again: Dev = Arc::new(dev.crash());
        drop(e);
        let (e, info) = DurableEngine::open(again, opts()).unwrap();
        assert_eq!(info.ops_replayed, 1);
        assert_eq!(e.superblock().recovery.mode, code);
        e.commit().unwrap();
        assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, refs + 1);
    }
}

/// Review item 2: a superblock slot that reads back as a media error is a
/// rejected copy, not a failed open: one good copy is enough. Both
/// unreadable is NoSuperblock naming both.
#[test]
fn an_unreadable_superblock_slot_is_a_rejected_copy() {
    let (dev, sb) = formatted(8 << 20, 1 << 20);
    let older = refd_ioring::format::superblock_addr_for_generation(sb.generation - 1);
    dev.set_fault_plan(FaultPlan {
        unreadable: Some((older, older + 4096)),
        ..FaultPlan::default()
    });
    let (_e, info) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
    assert_eq!(info.superblock_generation, sb.generation);
    assert!(
        info.superblock_rejected
            .iter()
            .any(|r| r.contains("unreadable")),
        "{info}"
    );
    drop(_e);
    dev.set_fault_plan(FaultPlan {
        unreadable: Some((0, 8192)),
        ..FaultPlan::default()
    });
    match DurableEngine::open(Arc::clone(&dev), opts()) {
        Err(OpenError::NoSuperblock { source, .. }) => {
            assert!(source.to_string().contains("unreadable"), "{source}")
        }
        other => panic!("expected NoSuperblock, got {:?}", other.map(|(_, i)| i)),
    }
}

/// Review item 4: a reformat interrupted at any of its writes after the
/// first (a power loss right after it) never brings back the file system
/// it replaced: open finds the new one or none. (It used to write the new
/// generation 1 beside the old newest copy, which open then preferred.)
/// A failed first write (the erase) leaves the old file system as it was.
#[test]
fn an_interrupted_reformat_never_brings_back_the_old_file_system() {
    let (dev, _) = formatted(8 << 20, 1 << 20);
    {
        let (e, _) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
        e.add_durable(&data(Action::AddExtent, 1)).unwrap();
        for _ in 0..5 {
            e.commit().unwrap();
        }
    }
    let old = DurableEngine::open(Arc::new(dev.crash()), opts())
        .unwrap()
        .0
        .superblock();
    assert!(old.generation > 4);
    let new_fs = FsId([7; 16]);
    assert_ne!(old.fs_id, new_fs);
    for fail_at in 1..=3u64 {
        let d: Dev = Arc::new(dev.crash());
        d.set_fault_plan(FaultPlan {
            write_eio_at: Some(fail_at),
            ..FaultPlan::default()
        });
        let formatted = DurableEngine::format(
            &d,
            FormatOptions {
                log_bytes: Some(1 << 20),
                fs_id: Some(new_fs),
            },
        );
        assert!(formatted.is_err(), "write {fail_at} failed");
        let after: Dev = Arc::new(d.crash());
        match DurableEngine::open(after, opts()) {
            Ok((e, _)) if fail_at == 1 => assert_eq!(e.superblock().fs_id, old.fs_id),
            Ok((e, _)) => assert_eq!(e.superblock().fs_id, new_fs, "write {fail_at}"),
            Err(OpenError::NoSuperblock { .. }) => {}
            Err(e) => panic!("write {fail_at}: {e}"),
        }
    }
}

/// Review item 6: a superblock describing a larger device than the one it
/// is read from (a truncated image) is refused before anything is sized
/// from it.
#[test]
fn a_superblock_of_a_larger_device_is_refused() {
    let (dev, _) = formatted(16 << 20, 1 << 20);
    let mut image = dev.durable_image();
    image.truncate(8 << 20);
    let small: Dev = Arc::new(SimStorage::from_image(SimConfig::new(8 << 20, 1), image).unwrap());
    match DurableEngine::open(small, opts()) {
        Err(OpenError::Layout { reason, .. }) => assert!(reason.contains("16777216"), "{reason}"),
        other => panic!("expected Layout, got {:?}", other.map(|(_, i)| i)),
    }
}

/// Review item 5: the newest superblock copy rots while the log has not
/// lapped. The log's batches written after that superblock was durable
/// carry its generation (`txn_id`), so open from the older copy sees that a
/// newer superblock existed: strict open refuses naming both generations;
/// an explicit recovery mode goes on from the older copy (its tree is
/// intact and its log still holds every batch since its head, so every
/// acknowledged op comes back) and records the choice.
#[test]
fn a_rotten_newest_superblock_is_refused_not_silently_rolled_back() {
    use refd_ioring::format::superblock_addr_for_generation;
    use refd_ioring::log::RecoveryMode;
    let (dev, e) = setup();
    e.add_durable(&data(Action::AddExtent, 100)).unwrap();
    for i in 1..5 {
        e.add_durable(&data(Action::AddRef, 100 + i)).unwrap();
    }
    let newest = e.commit().unwrap().generation;
    for i in 0..3 {
        e.add_durable(&data(Action::AddRef, 200 + i)).unwrap();
    }
    drop(e);
    let crashed: Dev = Arc::new(dev.crash());
    // One bit of the newest copy rots: open would fall back to the older.
    crashed
        .flip_bit(superblock_addr_for_generation(newest) + 100, 3)
        .unwrap();
    match DurableEngine::open(Arc::clone(&crashed), opts()) {
        Err(OpenError::SuperblockLost {
            generation,
            newer_generation,
            ..
        }) => assert_eq!((generation, newer_generation), (newest - 1, newest)),
        other => panic!("expected SuperblockLost, got {:?}", other.map(|(_, i)| i)),
    }
    let options = OpenOptions {
        recovery_mode: RecoveryMode::TolerateTail,
        ..opts()
    };
    let (e, info) = DurableEngine::open(Arc::clone(&crashed), options).unwrap();
    assert_eq!(info.superblock_generation, newest - 1);
    assert_eq!(info.superblock_lost, Some(newest), "{info}");
    assert!(info.to_string().contains("NEWER SUPERBLOCK"), "{info}");
    assert_eq!(info.ops_replayed, 8, "{info}");
    let record = info.dropped.expect("the choice is recorded");
    assert_eq!((record.dropped_batches, record.dropped_ops), (0, 0));
    e.commit().unwrap();
    assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 8);
    e.verify().unwrap();
    // Then the device opens strictly again: the claim and the commit are
    // newer than anything the log says.
    let again: Dev = Arc::new(crashed.crash());
    drop(e);
    let (e, _) = DurableEngine::open(again, opts()).unwrap();
    assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 8);
}

/// A log too small for the configured batches is refused with what would
/// do: the log it needs and the smallest device whose default layout
/// has it, and that device really opens.
#[test]
fn a_log_too_small_for_its_batches_names_the_device_size_that_fits() {
    let options = OpenOptions {
        log: LogConfig {
            batch_bytes_max: 2 << 20,
            ..LogConfig::default()
        },
        ..OpenOptions::default()
    };
    let default_format = |bytes: u64| {
        let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(bytes, 1)).unwrap());
        DurableEngine::format(&dev, FormatOptions::default()).unwrap();
        dev
    };
    let log_min = 4 * APPENDERS_MIN as u64 * (2 << 20);
    let min = device_bytes_min_for_log(log_min);
    assert_eq!(
        min,
        2 * log_min + SUPERBLOCK_REGION_BYTES,
        "half of the rest"
    );
    match DurableEngine::open(default_format(16 << 20), options) {
        Err(e @ OpenError::LogTooSmall { .. }) => {
            let OpenError::LogTooSmall {
                log_bytes_min,
                device_bytes,
                device_bytes_min,
                ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(
                (*log_bytes_min, *device_bytes, *device_bytes_min),
                (log_min, 16 << 20, min)
            );
            let message = e.to_string();
            assert!(
                message.contains(&format!("from {min} bytes (33 MiB) on"))
                    && message.contains(&format!("refctl format --log-bytes {log_min}"))
                    && !message.contains("LogConfig"),
                "{message}"
            );
        }
        other => panic!("expected LogTooSmall, got {:?}", other.map(|(_, i)| i)),
    }
    // One block less is still refused; the minimum opens.
    assert!(matches!(
        DurableEngine::open(default_format(min - 4096), options),
        Err(OpenError::LogTooSmall { .. })
    ));
    DurableEngine::open(default_format(min), options).unwrap();
}

/// Heads held by a seq barrier are written in bytenr order even when the
/// run selects them out of order: the run's cursor skips a head that
/// starts inside the extent run before it (btrfs `run_delayed_start`)
/// and takes it after wrapping around. (Found by the daemon's
/// adversarial test: the held set was written unsorted, and the device
/// could not be opened again, "invalid held bytenr (order)".)
#[test]
fn held_heads_selected_out_of_order_survive_a_reopen() {
    let (dev, e) = setup();
    let guard = e.core().barrier().acquire();
    let seq = e.core().barrier().current();
    let alloc = |bytenr: u64, num_bytes: u64, seq: u64, objectid: u64| {
        data_op(bytenr, num_bytes, Action::AddExtent, 5, objectid, seq)
    };
    // Runs (no seq) and moves the cursor past 1 MiB + 32 KiB; the head
    // inside it and the one at 2 MiB are held, the inner one selected
    // last.
    e.add_durable(&alloc(1 << 20, 32 << 10, 0, 1)).unwrap();
    e.add_durable(&alloc((1 << 20) + (16 << 10), 4096, seq, 2))
        .unwrap();
    e.add_durable(&alloc(2 << 20, 4096, seq, 3)).unwrap();
    let s = e.commit().unwrap();
    assert_eq!((s.core.held, s.core.applied), (2, 1), "{:?}", s.core);
    let bytenrs: Vec<u64> = s.core.held_heads.iter().map(|h| h.bytenr).collect();
    assert_eq!(bytenrs, [(1 << 20) + (16 << 10), 2 << 20]);
    e.verify().unwrap();
    drop(guard);
    drop(e);
    let (e, info) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
    assert_eq!((info.heads_held, info.ops_replayed), (2, 0), "{info}");
    e.verify().unwrap();
}

/// Lookups while a commit applies in steps (two effects per step), with a
/// cache smaller than the tree (misses read from the B+tree, frozen
/// extents from the cache until the B+tree has them): every extent's count
/// is its committed plus pending ops, each once, throughout.
#[test]
fn lookups_during_a_stepped_apply_with_a_partial_cache() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    const N: u64 = 600;
    let at = |i: u64| (1 << 30) + i * 8192;
    let (dev, _) = formatted(32 << 20, 4 << 20);
    let o = OpenOptions {
        cache_extents_max: 64,
        ..opts()
    };
    let (e, _) = DurableEngine::open(Arc::clone(&dev), o).unwrap();
    e.core().set_apply_step(2);
    for i in 0..N {
        e.add(&data_op(at(i), 4096, Action::AddExtent, 5, 256 + i, 0))
            .unwrap();
    }
    e.commit().unwrap();
    // Each round adds a ref to a third of the extents, then commits
    // while two readers check every count.
    for round in 1..=3u64 {
        for i in (0..N).filter(|i| i % 3 == round % 3) {
            e.add(&data_op(at(i), 4096, Action::AddRef, 6 + round, 256 + i, 0))
                .unwrap();
        }
        let expected = |i: u64| 1 + (1..=round).filter(|r| i % 3 == r % 3).count() as i64;
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            for r in 0..2u64 {
                let (e, done) = (&e, &done);
                s.spawn(move || {
                    let mut i = r;
                    let mut reads = 0u64;
                    while !done.load(Relaxed) || reads < N {
                        i = (i + 97) % N;
                        let refs = e.lookup_extent_ref(at(i)).unwrap().refs;
                        assert_eq!(refs, expected(i), "extent {i}, round {round}");
                        reads += 1;
                    }
                });
            }
            e.commit().unwrap();
            done.store(true, Relaxed);
        });
    }
    e.verify().unwrap();
    let committed = e.committed_extents().unwrap();
    for i in 0..N {
        assert_eq!(committed.get(at(i)).map(|c| c.refs), Some(2), "extent {i}");
    }
}

/// Pacing (`crate::policy::CommitPolicy::pace`): an add past the trigger
/// sleeps only while a commit runs (here the commit lock is held, as a
/// running commit holds it), never at or below the trigger, and never
/// when no commit runs (the kicked committer is about to start one).
#[test]
fn adds_past_the_trigger_are_paced_only_while_a_commit_runs() {
    let (dev, _) = formatted(32 << 20, 8 << 20);
    let options = OpenOptions {
        policy: crate::policy::CommitPolicy {
            interval_ms: 60_000,
            pending_ops_trigger: 4096,
            ..crate::policy::CommitPolicy::default()
        },
        ..opts()
    };
    let (e, _) = DurableEngine::open(dev, options).unwrap();
    assert_eq!(e.commit_trigger_ops(), 4096);
    let mut next = 0u64;
    let mut add = |count: u64| {
        for _ in 0..count {
            let op = data_op(
                (1 << 30) + next * 4096,
                4096,
                Action::AddExtent,
                5,
                256 + next,
                0,
            );
            e.add(&op).unwrap();
            next += 1;
        }
    };
    // Up to 1.5 × the trigger (6144) while a commit runs: no sleep.
    add(6143);
    {
        let _running = lock(&e.commit);
        add(1);
    }
    assert_eq!(e.paced().0, 0, "at 1.5 × the trigger");
    // Past it (the check at 7168) with no commit running: no sleep.
    add(1100);
    assert_eq!(e.pending_ops(), 7244);
    assert_eq!(e.paced().0, 0);
    // A commit runs: the add that crosses the next check (8192 is the
    // wall, so take it from below: back under 7168 first) sleeps.
    e.commit().unwrap();
    add(7167);
    {
        let _running = lock(&e.commit);
        add(1);
    }
    // Its 1024 ops at the unmeasured 2 µs each (the commit above had too
    // few ops to measure), times 16 × 1024 / 2048.
    let (n, slept) = e.paced();
    assert_eq!(n, 1);
    assert_eq!(slept, Duration::from_nanos(16_384_000));
    assert_eq!(e.throttled().0, 0, "below the wall at twice the trigger");
    e.commit().unwrap();
    assert_eq!(e.pending_ops(), 0);
}

/// A device extended since it was formatted ([`OpenOptions::grow`]):
/// opened without `grow` its layout stays and the extra bytes are
/// reported; with `grow` the node region reaches the device's end in the
/// superblock the open writes, before any commit rewrites the bitmap run,
/// so a power loss right then reopens (without `grow`) with the grown
/// region and the shorter run; then a tree larger than the old region
/// fits.
#[test]
fn a_grown_node_region_survives_a_crash_before_its_first_commit() {
    let extent =
        |i: u64, obj: u64| data_op((1 << 30) + i * 4096, 4096, Action::AddExtent, 5, obj, 0);
    let (dev, _) = formatted(8 << 20, 1 << 20);
    let (e, _) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
    e.add_durable(&extent(0, 1)).unwrap();
    e.commit().unwrap();
    let (start, old) = (
        e.superblock().node_region_start,
        e.superblock().node_region_bytes,
    );
    drop(e);
    let grown_bytes: u64 = 64 << 20;
    let mut image = dev.durable_image();
    image.resize(grown_bytes as usize, 0);
    let grown: Dev =
        Arc::new(SimStorage::from_image(SimConfig::new(grown_bytes, 1), image).unwrap());

    let (e, info) = DurableEngine::open(Arc::clone(&grown), opts()).unwrap();
    assert_eq!(info.node_region_grown, None);
    assert_eq!(e.superblock().node_region_bytes, old);
    assert_eq!(
        info.device_growable_bytes,
        grown_bytes - start - old,
        "{info}"
    );
    drop(e);

    let grow = OpenOptions {
        grow: true,
        ..opts()
    };
    let (e, info) = DurableEngine::open(Arc::clone(&grown), grow).unwrap();
    let new = (grown_bytes - start) / NODE_BYTES as u64 * NODE_BYTES as u64;
    assert_eq!(info.node_region_grown, Some((old, new)), "{info}");
    assert_eq!(info.device_growable_bytes, 0, "{info}");
    let crashed: Dev = Arc::new(grown.crash());
    drop(e);

    let (e, info) = DurableEngine::open(Arc::clone(&crashed), opts()).unwrap();
    assert_eq!(e.superblock().node_region_bytes, new, "{info}");
    assert_eq!(info.node_region_grown, None);
    e.verify().unwrap();
    // More extent items than the old region's nodes could hold.
    let n = (old / NODE_BYTES as u64 * 1000).next_multiple_of(10_000);
    for chunk in 0..n / 10_000 {
        let mut last = None;
        for i in chunk * 10_000..(chunk + 1) * 10_000 {
            last = Some(e.add(&extent(1 + i, 2)).unwrap());
        }
        last.unwrap().wait().unwrap();
        e.commit().unwrap();
    }
    e.verify().unwrap();
    assert!(
        e.superblock().alloc_next_unallocated > start + old,
        "allocated past the old end"
    );
    assert_eq!(e.lookup_extent_ref(1 << 30).unwrap().refs, 1);
}

/// `format` lays out the whole device: the node region ends at the
/// device's end, on every size from 64 MiB to 1 TiB by powers of two and
/// on odd ones, with the default log and a 16 MiB one. It used to start
/// right after the log and leave 8 KiB past its end on every size a
/// multiple of 16 KiB (the superblocks take 8 KiB), and `refd serve`
/// warned at every start that the device was larger than its layout.
/// Computed only (no device); [`a_formatted_device_has_nothing_to_grow`]
/// formats and opens.
#[test]
fn format_lays_the_node_region_out_to_the_devices_end() {
    let node = NODE_BYTES as u64;
    let powers = (26..=40).map(|shift| 1u64 << shift);
    let odd = [
        (64 << 20) + 4096,
        (64 << 20) + 12288,
        100 << 20,
        (3 << 30) + 8192,
        (777 << 20) + 20480,
        (1 << 40) - 4096,
    ];
    for size in powers.chain(odd) {
        for log_bytes in [default_log_bytes(size), 16 << 20] {
            let layout = format_layout(size, log_bytes)
                .unwrap_or_else(|e| panic!("{size} bytes, log {log_bytes}: {e}"));
            let log_end = SUPERBLOCK_REGION_BYTES + log_bytes;
            let what = format!("{size} bytes, log {log_bytes}: {layout:?}");
            assert_eq!(layout.log_start, SUPERBLOCK_REGION_BYTES, "{what}");
            assert_eq!(layout.log_bytes, log_bytes, "{what}");
            assert_eq!(
                layout.node_region_start + layout.node_region_bytes,
                size,
                "{what}"
            );
            assert_eq!(
                layout.node_region_bytes,
                (size - log_end) / node * node,
                "every whole node after the log: {what}"
            );
            assert!(
                layout.node_region_start >= log_end && layout.node_region_start - log_end < node,
                "{what}"
            );
            let geometry = refd_ioring::Geometry {
                size_bytes: size,
                logical_block_bytes: 4096,
                physical_block_bytes: 4096,
            };
            Superblock::empty(FsId([1; 16]), geometry, layout)
                .validate()
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}

/// A freshly formatted device has no bytes past its layout for `grow`
/// to use (it had 8 KiB, reported at every open); extended by less than
/// a node it still has none (that would be reported at every open, even
/// after a `grow`, which cannot use it); extended by more, the whole
/// nodes are reported and `grow` takes exactly them.
#[test]
fn a_formatted_device_has_nothing_to_grow() {
    let node = NODE_BYTES as u64;
    for dev_bytes in [64 << 20, (64 << 20) + 4096, 128 << 20] {
        let (dev, sb) = formatted(dev_bytes, 8 << 20);
        let (e, info) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
        assert_eq!(info.device_growable_bytes, 0, "{dev_bytes} bytes: {info}");
        e.add_durable(&data(Action::AddExtent, 1)).unwrap();
        e.commit().unwrap();
        drop(e);
        for (extra, growable) in [(8192, 0), (node - 4096, 0), (node + 8192, node)] {
            let grown_bytes = dev_bytes + extra;
            let mut image = dev.durable_image();
            image.resize(grown_bytes as usize, 0);
            let grown: Dev =
                Arc::new(SimStorage::from_image(SimConfig::new(grown_bytes, 1), image).unwrap());
            let (_, info) = DurableEngine::open(Arc::clone(&grown), opts()).unwrap();
            assert_eq!(info.device_growable_bytes, growable, "+{extra}: {info}");
            let grow = OpenOptions {
                grow: true,
                ..opts()
            };
            let (e, info) = DurableEngine::open(Arc::clone(&grown), grow).unwrap();
            let old = sb.node_region_bytes;
            let grown_to = (growable > 0).then_some((old, old + growable));
            assert_eq!(info.node_region_grown, grown_to, "+{extra}: {info}");
            assert_eq!(info.device_growable_bytes, 0, "+{extra}: {info}");
            drop(e);
        }
    }
}

/// Two sessions set the first key of the same tree block at once: one in
/// a large SUBMIT that starts with it, the other alone in a SUBMIT sent
/// while the first is being added. The key that wins is the latest
/// extent_op by stamp, taken when its op enters the core engine; a batch's
/// log record is appended after all its ops are added, and recovery stamps
/// replayed ops in log order. So the small SUBMIT, stamped second but
/// logged first, won in the live engine and lost after a restart before
/// the commit: the same acknowledged ops, two trees. Stamped ops
/// (allocations and extent_ops) are now logged in the order they are
/// stamped.
#[test]
fn concurrent_key_updates_replay_to_the_live_engines_tree() {
    use refd_core::model::{DiskKey, ExtentOp};
    let (dev, _) = formatted(96 << 20, 64 << 20);
    // Batches of 1 MiB: the large SUBMIT is one record.
    let opts = || OpenOptions {
        log: LogConfig::default(),
        ..OpenOptions::default()
    };
    let (e, _) = DurableEngine::open(Arc::clone(&dev), opts()).unwrap();
    let rounds = 24u64;
    let kind = ExtentKind::Tree { level: 0 };
    let bytenr = |j: u64| (1 << 20) + j * 16384;
    let filler_extent = 1 << 30;
    e.add(&data_op(filler_extent, 4096, Action::AddExtent, 5, 1, 0))
        .unwrap();
    for j in 0..rounds {
        let op = Op::new(
            bytenr(j),
            16384,
            kind,
            Action::AddExtent,
            RefKey::TreeBlock { root: 5 },
            0,
        );
        e.add(&op.unwrap()).unwrap();
    }
    e.commit().unwrap();
    let set_key = |j: u64, objectid: u64| {
        let key = DiskKey {
            objectid,
            item_type: 84,
            offset: 0,
        };
        let eop = ExtentOp {
            flags_to_set: 0,
            key: Some(key),
        };
        Op::update_head(bytenr(j), 16384, kind, eop).unwrap()
    };
    // References added and dropped again on another extent (net zero):
    // they take a while to add.
    let fillers = |n: usize| {
        (0..n).map(move |i| {
            let action = if i % 2 == 0 {
                Action::AddRef
            } else {
                Action::DropRef
            };
            data_op(filler_extent, 4096, action, 6, 1, 0)
        })
    };
    let sessions = [
        e.register_session().unwrap().0,
        e.register_session().unwrap().0,
    ];
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let (e, start) = (&e, &start);
        s.spawn(move || {
            for j in 0..rounds {
                // The large batch: its key update first.
                let ops: Vec<Op> = std::iter::once(set_key(j, 100 + j))
                    .chain(fillers(16000))
                    .collect();
                start.wait();
                e.submit(sessions[0], j + 1, &ops).unwrap();
            }
        });
        s.spawn(move || {
            for j in 0..rounds {
                // The small one, sent while the large one is added: its key
                // update last.
                let ops: Vec<Op> = fillers(200)
                    .chain(std::iter::once(set_key(j, 200 + j)))
                    .collect();
                start.wait();
                std::thread::sleep(std::time::Duration::from_micros(300));
                e.submit(sessions[1], j + 1, &ops).unwrap();
            }
        });
    });
    e.add_durable(&set_key(0, 1)).unwrap();
    let crashed: Dev = Arc::new(dev.crash());
    e.commit().unwrap();
    let live = e.committed_extents().unwrap();
    drop(e);
    let (e, _) = DurableEngine::open(crashed, opts()).unwrap();
    e.commit().unwrap();
    let replayed = e.committed_extents().unwrap();
    let key = |t: &refd_core::extent_tree::ExtentTree, j: u64| {
        t.get(bytenr(j)).unwrap().tree_key.unwrap().objectid
    };
    let keys: Vec<(u64, u64)> = (1..rounds)
        .map(|j| (key(&live, j), key(&replayed, j)))
        .collect();
    let differ: Vec<_> = keys.iter().filter(|(l, r)| l != r).collect();
    assert!(
        differ.is_empty(),
        "(live, after the restart) keys that differ: {differ:?}"
    );
    assert_eq!(
        refd_core::oracle::normalize_tree(&live),
        refd_core::oracle::normalize_tree(&replayed)
    );
}

/// Extents at the ends of the address space through the B+tree with a
/// cache too small to hold them: one at bytenr 0 and one of the last byte
/// (`u64::MAX - 1`, the highest an extent may start at, next to the
/// service items at objectid `u64::MAX`). Allocations reaching them from
/// below or above are refused exactly as the core engine refuses them,
/// the ones that fit are accepted, the tree verifies, and a restart reads
/// back the same extents.
#[test]
fn extents_at_the_ends_of_the_address_space_through_the_btree() {
    use refd_core::run::RunError;
    let (dev, _) = formatted(8 << 20, 1 << 20);
    let small = OpenOptions {
        cache_extents_max: 1,
        ..opts()
    };
    let (e, _) = DurableEngine::open(Arc::clone(&dev), small).unwrap();
    let alloc = |bytenr: u64, num_bytes: u64, objectid: u64| {
        data_op(bytenr, num_bytes, Action::AddExtent, 5, objectid, 0)
    };
    let last = u64::MAX - 1;
    e.add_durable(&alloc(0, 4096, 1)).unwrap();
    e.add_durable(&alloc(last, 1, 1)).unwrap();
    for i in 1..=3 {
        e.add_durable(&alloc(i << 40, 4096, 2)).unwrap();
    }
    e.commit().unwrap();
    let refused = |bytenr, num_bytes, other, other_bytes| {
        e.add_durable(&alloc(bytenr, num_bytes, 3)).unwrap();
        let s = e.commit().unwrap();
        let errors: Vec<RunError> = s.core.quarantined.iter().map(|q| q.error.clone()).collect();
        let want = RunError::OverlapsExtent {
            bytenr,
            num_bytes,
            other,
            other_bytes,
        };
        assert_eq!(errors, vec![want]);
        e.verify().unwrap();
    };
    refused(u64::MAX - 8192, 8192, last, 1);
    refused(1, 4096, 0, 4096);
    // Up to the last byte, and from the end of the first extent.
    for (bytenr, num_bytes) in [(u64::MAX - 8193, 8192), (4096, 4096)] {
        e.add_durable(&alloc(bytenr, num_bytes, 4)).unwrap();
        let s = e.commit().unwrap();
        assert!(s.core.quarantined.is_empty(), "{:?}", s.core.quarantined);
    }
    e.verify().unwrap();
    let before = e.committed_extents().unwrap();
    before.check().unwrap();
    assert_eq!(before.len(), 7);
    drop(e);
    let (e, _) = DurableEngine::open(dev, small).unwrap();
    assert_eq!(
        refd_core::oracle::normalize_tree(&e.committed_extents().unwrap()),
        refd_core::oracle::normalize_tree(&before)
    );
    assert_eq!(e.lookup_extent_ref(last).unwrap().refs, 1);
}
