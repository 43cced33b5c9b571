//! The B+tree on [`UringStorage`] over a regular file opened with `O_DIRECT`
//! under the target directory: bulk load, mixed updates and deletes over
//! several commits with durable superblocks, then the file is closed,
//! reopened from the newest superblock, compared with a model and checked.
//! A node region above 2 GiB (a bitmap run of 2 nodes) commits its runs
//! into three windows in turn and reopens clean. Skips (printing why) where
//! the file system does not support `O_DIRECT`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{read_superblock, write_superblock, Gen, FS};
use refd_ioring::btree::{BTree, Change, Key, TreeConfig, BITMAP_BITS_PER_NODE};
use refd_ioring::format::{Layout, Superblock, NODE_BYTES};
use refd_ioring::{Device, DeviceError, FileAllocation, Storage, UringConfig, UringStorage};

const REGION_START: u64 = 16384;
const REGION_BYTES: u64 = 64 << 20;

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config() -> TreeConfig {
    TreeConfig {
        owner: 7,
        cache_bytes: 2 << 20,
        write_batch_nodes: 64,
    }
}

/// A sparse file named `name` under the target dir with a node region of
/// `region_bytes`, formatted (removed on drop), or `None` (skip) without
/// `O_DIRECT`.
fn formatted(name: &str, region_bytes: u64) -> Option<(UringStorage, Superblock, Cleanup)> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("refd-btree-uring");
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    let path = dir.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let cleanup = Cleanup(path.clone());
    let size = REGION_START + region_bytes;
    let dev = match Device::create_file(&path, size, FileAllocation::Sparse) {
        Ok(device) => UringStorage::new(device, UringConfig::default()).expect("ring"),
        Err(e @ DeviceError::DirectIoUnsupported { .. }) => {
            eprintln!("SKIP: {e}: the file system under the target dir has no O_DIRECT");
            return None;
        }
        Err(e) => panic!("create {}: {e}", path.display()),
    };
    let sb = Superblock::empty(
        FS,
        dev.geometry(),
        Layout {
            log_start: 8192,
            log_bytes: 8192,
            node_region_start: REGION_START,
            node_region_bytes: region_bytes,
        },
    );
    write_superblock(&dev, &sb).expect("format");
    Some((dev, sb, cleanup))
}

#[test]
fn commit_reopen_check_on_a_file() {
    let Some((dev, mut sb, cleanup)) = formatted("tree", REGION_BYTES) else {
        return;
    };
    let path = cleanup.0.clone();
    let size = REGION_START + REGION_BYTES;
    let tree = BTree::open_superblock(dev, &sb, config()).expect("open");
    let mut model: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
    let mut g = Gen::new(42);
    let changes: Vec<_> = (0..50_000u64)
        .map(|i| {
            let v = vec![(i % 256) as u8; 64];
            model.insert(Key::new(i, 1, 0), v.clone());
            (Key::new(i, 1, 0), Change::Put(v))
        })
        .collect();
    tree.apply_sorted(changes).expect("bulk load");
    for round in 0..4u64 {
        let mut b = BTreeMap::new();
        for _ in 0..3000 {
            let k = Key::new(g.below(60_000), 1, 0);
            let c = if g.percent(40) {
                Change::Delete
            } else {
                Change::Put(vec![round as u8; 1 + g.below(200) as usize])
            };
            b.insert(k, c);
        }
        for (k, c) in &b {
            match c {
                Change::Put(v) => {
                    model.insert(*k, v.clone());
                }
                Change::Delete => {
                    model.remove(k);
                }
            }
        }
        tree.apply_sorted(b.into_iter().collect()).expect("apply");
        sb.generation += 1;
        let info = tree.commit(sb.generation).expect("commit");
        info.apply_to(&mut sb);
        write_superblock(tree.storage(), &sb).expect("superblock");
        tree.release_pending(sb.generation).expect("release");
    }
    let before = tree.check().expect("check");
    drop(tree);

    let device = Device::open(&path, size).expect("reopen file");
    let dev = UringStorage::new(device, UringConfig::default()).expect("ring");
    let sb2 = read_superblock(&dev).expect("superblock");
    assert_eq!(sb2, sb);
    let tree = BTree::open_superblock(dev, &sb2, config()).expect("open");
    let after = tree.check().expect("check after reopen");
    assert_eq!(before, after);
    assert_eq!(after.items, model.len() as u64);
    let got: Vec<_> = tree
        .range(..)
        .collect::<Result<Vec<_>, _>>()
        .expect("range");
    let want: Vec<_> = model.into_iter().collect();
    assert!(got == want, "contents differ after reopen");
}

/// Commits `changes` at the next generation: nodes, superblock, release.
/// Returns the bitmap run's address.
fn commit(tree: &BTree<UringStorage>, sb: &mut Superblock, changes: Vec<(Key, Change)>) -> u64 {
    tree.apply_sorted(changes).expect("apply");
    sb.generation += 1;
    let info = tree.commit(sb.generation).expect("commit");
    info.apply_to(sb);
    write_superblock(tree.storage(), sb).expect("superblock");
    tree.release_pending(sb.generation).expect("release");
    assert_eq!(info.alloc.bitmap_bytes, 2 * NODE_BYTES as u64, "K = 2");
    info.alloc.bitmap_addr
}

/// A 3 GiB node region (the bitmap run is K = 2 consecutive nodes) on a
/// sparse `O_DIRECT` file: each commit writes its run into a spare
/// window, never over the run of either superblock copy on the device,
/// three windows take turns, `check` (what `refctl fsck` runs) is clean
/// after every commit (the spares are not marked in the bitmap on the
/// device), and the tree reopens, commits and checks again.
#[test]
fn a_node_region_above_2_gib_commits_its_runs_in_three_windows() {
    let region_bytes: u64 = 3 << 30;
    assert_eq!(
        (region_bytes / NODE_BYTES as u64).div_ceil(BITMAP_BITS_PER_NODE),
        2
    );
    let Some((dev, mut sb, cleanup)) = formatted("tree-3g", region_bytes) else {
        return;
    };
    let update = |round: u64| -> Vec<(Key, Change)> {
        (0..2000u64)
            .map(|i| (Key::new(i * 7, 1, 0), Change::Put(vec![round as u8; 80])))
            .collect()
    };
    let tree = BTree::open_superblock(dev, &sb, config()).expect("open");
    let mut runs = vec![commit(&tree, &mut sb, update(0))];
    for round in 1..6 {
        runs.push(commit(&tree, &mut sb, update(round)));
        tree.check().expect("check");
    }
    let before = tree.check().expect("check");
    assert_eq!(before.bitmap_nodes, 2);
    assert!(
        runs.windows(3)
            .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2]),
        "{runs:?}"
    );
    assert!(runs.windows(4).all(|w| w[0] == w[3]), "{runs:?}");
    drop(tree);

    let size = REGION_START + region_bytes;
    for reopen in 0..2u64 {
        let device = Device::open(&cleanup.0, size).expect("reopen file");
        let dev = UringStorage::new(device, UringConfig::default()).expect("ring");
        let sb2 = read_superblock(&dev).expect("superblock");
        assert_eq!(sb2, sb);
        let tree = BTree::open_superblock(dev, &sb2, config()).expect("open");
        tree.check().expect("check after reopen");
        for round in 0..3 {
            let run = commit(&tree, &mut sb, update(10 * reopen + round));
            // Open picks its spares from the slots free in the newest
            // superblock's bitmap, which may hold the older copy's run
            // (refd-durable's open overwrites that copy first).
            let kept = if round == 0 { 1 } else { 2 };
            assert!(!runs[runs.len() - kept..].contains(&run), "{run} {runs:?}");
            runs.push(run);
            tree.check().expect("check after a commit");
        }
        let got = tree.get(&Key::new(7, 1, 0)).expect("get");
        assert_eq!(got, Some(vec![(10 * reopen + 2) as u8; 80]));
    }
}
