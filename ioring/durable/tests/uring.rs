//! A plain round trip of the durable engine on [`UringStorage`], over a
//! direct-io loop device (as root) and over a regular file opened with
//! `O_DIRECT` in a scratch directory (`test_support::Scratch`): format, open,
//! ops and a commit, more durable ops left in the log, close, reopen
//! (recovery replays them), compare, verify, commit again. And a node
//! region above 2 GiB (a bitmap run of 2 nodes, written into the
//! allocator's spare window) committing and reopening on a sparse file.
//! Skips (printing why) where the file system has no `O_DIRECT`.

use std::path::Path;
use std::sync::Arc;

use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::btree::BITMAP_BITS_PER_NODE;
use refd_ioring::format::NODE_BYTES;
use refd_ioring::test_support::{LoopDevice, Scratch};
use refd_ioring::{Device, FileAllocation, UringConfig, UringStorage};

const SIZE: u64 = 640 << 20;

fn data(b: u64, action: Action, objectid: u64) -> Op {
    Op::new(
        b,
        1 << 20,
        ExtentKind::Data,
        action,
        RefKey::ExtentData {
            root: 5,
            objectid,
            offset: 0,
        },
        0,
    )
    .expect("op")
}

fn tree_block(b: u64, action: Action, root: u64) -> Op {
    Op::new(
        b,
        16384,
        ExtentKind::Tree { level: 1 },
        action,
        RefKey::TreeBlock { root },
        0,
    )
    .expect("op")
}

#[test]
fn round_trip_on_a_file() {
    // A directory on a file system with O_DIRECT (skips, saying why, if
    // there is none), removed with the device file on drop.
    let Some(scratch) = Scratch::new("durable-file") else {
        return;
    };
    let path = scratch.path().join("dev");
    let device = Device::create_file(&path, SIZE, FileAllocation::Sparse)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    drop(device);
    round_trip(&path);
}

/// The same on a direct-io loop device (block device: BLKGETSIZE64,
/// O_EXCL), when running as root with `losetup`; detached on drop.
#[test]
fn round_trip_on_a_loop_device() {
    let Some(scratch) = Scratch::new("durable-loop") else {
        return;
    };
    let Some(dev) = LoopDevice::attach(&scratch, "backing", SIZE) else {
        return;
    };
    round_trip(dev.path());
}

fn open(path: &Path) -> Arc<UringStorage> {
    Arc::new(UringStorage::open(path, SIZE, UringConfig::default()).expect("open device"))
}

fn round_trip(path: &Path) {
    let dev = open(path);
    let sb = DurableEngine::format(&dev, FormatOptions::default()).expect("format");
    assert_eq!(sb.log_bytes, 80 << 20, "1/8 of 640 MiB");
    let (e, info) = DurableEngine::open(Arc::clone(&dev), OpenOptions::default()).expect("open");
    assert_eq!(info.ops_replayed, 0);
    for i in 0..200u64 {
        e.add(&data(
            (1 << 30) + i * (1 << 20),
            Action::AddExtent,
            1000 + i,
        ))
        .expect("add");
        e.add(&tree_block((1 << 32) + i * 16384, Action::AddExtent, 5))
            .expect("add");
    }
    for k in 0..300u64 {
        e.add(&data(1 << 30, Action::AddRef, 10_000 + k))
            .expect("add");
    }
    let s = e.commit().expect("commit");
    assert!(s.item_changes >= 400 && s.nodes_written > 0);
    // Left in the log only: a drop, a free, new refs.
    e.add_durable(&data(1 << 30, Action::DropRef, 10_000))
        .expect("drop");
    e.add_durable(&tree_block(1 << 32, Action::DropRef, 5))
        .expect("free");
    let last = e
        .add(&data((1 << 30) + (1 << 20), Action::AddRef, 77))
        .expect("add");
    last.wait().expect("durable");
    let refs_before: Vec<i64> = [1u64 << 30, (1 << 30) + (1 << 20), 1 << 32]
        .iter()
        .map(|&b| e.lookup_extent_ref(b).expect("lookup").refs)
        .collect();
    assert_eq!(refs_before, vec![300, 2, 0]);
    e.verify().expect("verify");
    // Everything holding the device goes (a ticket holds the log), or a
    // block device's exclusive open fails.
    drop(last);
    drop(e);
    drop(dev);

    let dev = open(path);
    // A cache of 100 extents for a tree of 400: lookups and the commit
    // read the rest through the B+tree.
    let options = OpenOptions {
        cache_extents_max: 100,
        ..OpenOptions::default()
    };
    let (e, info) = DurableEngine::open(Arc::clone(&dev), options).expect("reopen");
    eprintln!("{info}");
    assert_eq!(info.ops_replayed, 3);
    assert_eq!(info.extents_cached, 100);
    let refs_after: Vec<i64> = [1u64 << 30, (1 << 30) + (1 << 20), 1 << 32]
        .iter()
        .map(|&b| e.lookup_extent_ref(b).expect("lookup").refs)
        .collect();
    assert_eq!(refs_after, refs_before);
    let s = e.commit().expect("commit after recovery");
    assert_eq!(s.core.freed.len(), 1);
    let check = e.verify().expect("verify");
    assert!(check.items > 400);
    assert!(s.extents_read > 0, "{s:?}");
    assert!(e.cached_extents().len() <= 100);
    let all = e.committed_extents().expect("read tree");
    assert_eq!(all.len(), 399);
    assert!(all.get(1 << 30).is_some_and(|i| !i.keyed.is_empty()));
}

/// A 4 GiB sparse file (node region 3.5 GiB: bitmap runs of K = 2 nodes):
/// open picks the spare windows (three on the empty tree, two once a run
/// is committed), the node space counts them neither free nor tree, and
/// commits, reopens and `verify` (the tree check `refctl fsck` runs:
/// the bitmap on the device marks reachable nodes and the run only) go
/// through twice.
#[test]
fn a_node_region_above_2_gib_commits_reopens_and_verifies() {
    const BIG: u64 = 4 << 30;
    let Some(scratch) = Scratch::new("durable-4g") else {
        return;
    };
    let path = scratch.path().join("dev");
    drop(
        Device::create_file(&path, BIG, FileAllocation::Sparse)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    let open_big =
        || Arc::new(UringStorage::open(&path, BIG, UringConfig::default()).expect("open device"));
    let sb = DurableEngine::format(&open_big(), FormatOptions::default()).expect("format");
    let k = (sb.node_region_bytes / NODE_BYTES as u64).div_ceil(BITMAP_BITS_PER_NODE);
    assert_eq!(k, 2);
    for round in 0..2u64 {
        let (e, info) = DurableEngine::open(open_big(), OpenOptions::default()).expect("open");
        let spares = if round == 0 { 3 } else { 2 };
        assert_eq!(info.bitmap_spare_nodes, spares * k, "{info}");
        assert!(!info.to_string().contains("NO SPARE WINDOW"), "{info}");
        let base = (1 << 30) + round * (1 << 32);
        for i in 0..3000u64 {
            e.add(&data(base + i * (1 << 20), Action::AddExtent, 1000 + i))
                .expect("add");
        }
        e.commit().expect("commit");
        for i in (0..3000u64).step_by(2) {
            e.add(&data(base + i * (1 << 20), Action::DropRef, 1000 + i))
                .expect("drop");
        }
        e.commit().expect("commit of the drops");
        let space = e.node_space();
        assert_eq!(
            space.region_nodes - space.free_nodes - space.pending_nodes,
            space.tree_nodes + 3 * k,
            "tree, the committed run and two spare windows: {space:?}"
        );
        e.verify().expect("verify");
    }
}
