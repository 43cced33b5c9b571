//! The B+tree on [`UringStorage`] over a regular file opened with `O_DIRECT`
//! under the target directory: bulk load, mixed updates and deletes over
//! several commits with durable superblocks, then the file is closed,
//! reopened from the newest superblock, compared with a model and checked.
//! Skips (printing why) where the file system does not support `O_DIRECT`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{read_superblock, write_superblock, Gen, FS};
use refd_ioring::btree::{BTree, Change, Key, TreeConfig};
use refd_ioring::format::{Layout, Superblock};
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

#[test]
fn commit_reopen_check_on_a_file() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("refd-btree-uring");
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    let path = dir.join(format!("tree-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let _cleanup = Cleanup(path.clone());
    let size = REGION_START + REGION_BYTES;
    let dev = match Device::create_file(&path, size, FileAllocation::Sparse) {
        Ok(device) => UringStorage::new(device, UringConfig::default()).expect("ring"),
        Err(e @ DeviceError::DirectIoUnsupported { .. }) => {
            eprintln!("SKIP: {e}: the file system under the target dir has no O_DIRECT");
            return;
        }
        Err(e) => panic!("create {}: {e}", path.display()),
    };
    let mut sb = Superblock::empty(
        FS,
        dev.geometry(),
        Layout {
            log_start: 8192,
            log_bytes: 8192,
            node_region_start: REGION_START,
            node_region_bytes: REGION_BYTES,
        },
    );
    write_superblock(&dev, &sb).expect("format");
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
