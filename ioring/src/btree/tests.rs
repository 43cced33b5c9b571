//! Unit tests of the tree on the simulated device: shape changes, a
//! random-op model check against `BTreeMap`, cache pressure, concurrent
//! readers, error paths and corruption detection. Crash tests are in
//! `tests/btree_crash_sim.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::format::{FsId, Layout, Superblock, NODE_BYTES};
use crate::{Geometry, SimConfig, SimStorage, Storage};

const FS: FsId = FsId([0x5E; 16]);
const REGION_START: u64 = 16384;

fn superblock(geometry: Geometry, region_bytes: u64) -> Superblock {
    Superblock::empty(
        FS,
        geometry,
        Layout {
            log_start: 8192,
            log_bytes: 8192,
            node_region_start: REGION_START,
            node_region_bytes: region_bytes,
        },
    )
}

struct Fixture {
    dev: Arc<SimStorage>,
    sb: Superblock,
    config: TreeConfig,
}

impl Fixture {
    fn new(region_nodes: u64, cache_bytes: usize) -> Self {
        let region_bytes = region_nodes * NODE_BYTES as u64;
        let dev =
            Arc::new(SimStorage::new(SimConfig::new(REGION_START + region_bytes, 7)).expect("sim"));
        let sb = superblock(dev.geometry(), region_bytes);
        Fixture {
            dev,
            sb,
            config: TreeConfig {
                owner: 5,
                cache_bytes,
                write_batch_nodes: 16,
            },
        }
    }

    fn open(&self) -> BTree<Arc<SimStorage>> {
        BTree::open_superblock(Arc::clone(&self.dev), &self.sb, self.config).expect("open")
    }

    /// Commits, writes the superblock durably, releases pending frees.
    fn commit(&mut self, tree: &BTree<Arc<SimStorage>>) -> CommitInfo {
        let generation = self.sb.generation + 1;
        let info = tree.commit(generation).expect("commit");
        self.sb.generation = generation;
        info.apply_to(&mut self.sb);
        let block = self.sb.encode().expect("superblock");
        self.dev
            .write_durable(self.sb.addr(), &block)
            .expect("superblock write");
        tree.release_pending(generation).expect("release");
        info
    }
}

fn key(i: u64) -> Key {
    Key::new(i / 3, (i % 3) as u8, i * 7)
}

fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    v.resize(len.max(8), (i % 251) as u8);
    v.truncate(len);
    v
}

fn contents(tree: &BTree<Arc<SimStorage>>) -> Vec<(Key, Vec<u8>)> {
    tree.range(..)
        .collect::<Result<Vec<_>, _>>()
        .expect("range")
}

#[test]
fn empty_tree_and_single_ops() {
    let mut f = Fixture::new(64, 1 << 20);
    let t = f.open();
    assert_eq!(t.get(&key(1)).expect("get"), None);
    assert_eq!(contents(&t), vec![]);
    let c = t.check().expect("check");
    assert_eq!((c.nodes, c.levels, c.bitmap_nodes), (0, 0, 0));

    t.insert(key(1), b"one".to_vec()).expect("insert");
    assert!(matches!(
        t.insert(key(1), b"again".to_vec()),
        Err(BTreeError::KeyExists { .. })
    ));
    assert_eq!(t.get(&key(1)).expect("get"), Some(b"one".to_vec()));
    assert_eq!(
        t.update(key(1), b"uno".to_vec()).expect("update"),
        b"one".to_vec()
    );
    assert!(matches!(
        t.update(key(2), vec![]),
        Err(BTreeError::NotFound { .. })
    ));
    assert!(matches!(
        t.delete(&key(2)),
        Err(BTreeError::NotFound { .. })
    ));
    let info = f.commit(&t);
    assert!(info.changed);
    assert_eq!(info.root.level, 0);
    assert_eq!(info.nodes_written, 2, "one leaf and one bitmap node");
    let c = t.check().expect("check");
    assert_eq!((c.nodes, c.items, c.levels, c.bitmap_nodes), (1, 1, 1, 1));

    // Nothing changed: no I/O, same root.
    let writes = f.dev.counters().writes;
    f.sb.generation += 1;
    let again = t.commit(f.sb.generation).expect("commit");
    assert!(!again.changed);
    assert_eq!(again.root, info.root);
    assert_eq!(f.dev.counters().writes, writes);

    assert_eq!(t.delete(&key(1)).expect("delete"), b"uno".to_vec());
    let info = f.commit(&t);
    assert_eq!(info.root, RootInfo::default());
    assert_eq!(info.alloc.bitmap_addr, 0);
    let t = f.open();
    assert_eq!(contents(&t), vec![]);
    t.check().expect("check");
}

/// Inserts until the tree has three levels, reopens, deletes everything in
/// two orders and watches the root shrink; `check` passes at every commit
/// and every slot is free at the end.
#[test]
fn splits_merges_root_growth_and_shrink() {
    let mut f = Fixture::new(4096, 8 << 20);
    let t = f.open();
    let n = 2000u64;
    let mut levels_seen = Vec::new();
    for i in 0..n {
        // Interleaved order: both appends and inserts in the middle.
        let k = (i * 7919) % n;
        t.insert(key(k), value(k, 3000)).expect("insert");
        if i % 300 == 299 {
            f.commit(&t);
            let c = t.check().expect("check");
            assert_eq!(c.underfull_nodes, 0, "{c:?}");
            levels_seen.push(c.levels);
        }
    }
    f.commit(&t);
    let c = t.check().expect("check");
    assert!(c.levels >= 3, "{c:?}");
    assert_eq!(c.items, n);
    assert!(levels_seen.windows(2).all(|w| w[0] <= w[1]));

    let t = f.open();
    for i in 0..n {
        assert_eq!(t.get(&key(i)).expect("get"), Some(value(i, 3000)), "{i}");
    }
    // Delete the even keys one by one, then the odd ones in one batch.
    for i in (0..n).step_by(2) {
        t.delete(&key(i)).expect("delete");
        if i % 400 == 0 {
            f.commit(&t);
            let c = t.check().expect("check");
            assert_eq!(c.underfull_nodes, 0, "{c:?}");
        }
    }
    f.commit(&t);
    let c = t.check().expect("check");
    assert_eq!(c.items, n / 2);
    assert_eq!(c.underfull_nodes, 0, "{c:?}");
    let changes: Vec<_> = (1..n)
        .step_by(2)
        .map(|i| (key(i), Change::Delete))
        .collect();
    let r = t.apply_sorted(changes).expect("apply");
    assert_eq!((r.deleted, r.absent), (n / 2, 0));
    let info = f.commit(&t);
    assert_eq!(info.root, RootInfo::default());
    let c = t.check().expect("check");
    assert_eq!((c.nodes, c.pending_free_nodes), (0, 0));
    let t = f.open();
    assert_eq!(contents(&t), vec![]);
}

#[test]
fn bulk_sorted_inserts_fill_leaves() {
    let mut f = Fixture::new(1024, 8 << 20);
    let t = f.open();
    let changes: Vec<_> = (0..20_000u64)
        .map(|i| (key(i), Change::Put(value(i, 64))))
        .collect();
    let r = t.apply_sorted(changes).expect("apply");
    assert_eq!(r.inserted, 20_000);
    f.commit(&t);
    let c = t.check().expect("check");
    let per_leaf = NODE_ITEMS_BYTES / (LEAF_ITEM_OVERHEAD_BYTES + 64);
    assert!(
        c.leaves <= (20_000 / per_leaf as u64) + 2,
        "sorted bulk load should fill leaves: {c:?}"
    );
    // Mixed batch: replace, delete, insert, delete absent.
    let mut changes = Vec::new();
    for i in (0..25_000u64).step_by(5) {
        let change = match i % 4 {
            0 => Change::Put(value(i + 1, 10)),
            1 => Change::Delete,
            2 => Change::Put(value(i, 300)),
            _ => Change::Delete,
        };
        changes.push((key(i), change));
    }
    let r = t.apply_sorted(changes).expect("apply");
    assert_eq!(r.inserted + r.replaced + r.deleted + r.absent, 5000);
    assert!(r.absent > 0 && r.inserted > 0 && r.replaced > 0 && r.deleted > 0);
    f.commit(&t);
    t.check().expect("check");
    // Only absent deletes: nothing changes, nothing is written.
    let r = t
        .apply_sorted(vec![(Key::new(u64::MAX, 0, 0), Change::Delete)])
        .expect("apply");
    assert_eq!(r.absent, 1);
    assert!(!t.has_changes());
}

use crate::format::NODE_ITEMS_BYTES;

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, usize),
    Update(u64, usize),
    Delete(u64),
    Batch(Vec<(u64, Option<usize>)>),
    Commit,
    Abort,
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let len = prop_oneof![8 => 0usize..200, 1 => 200usize..=VALUE_BYTES_MAX];
    prop_oneof![
        6 => (0u64..3000, len.clone()).prop_map(|(k, l)| Op::Insert(k, l)),
        2 => (0u64..3000, len.clone()).prop_map(|(k, l)| Op::Update(k, l)),
        4 => (0u64..3000).prop_map(Op::Delete),
        3 => proptest::collection::vec((0u64..3000, proptest::option::of(0usize..300)), 0..400)
            .prop_map(Op::Batch),
        2 => Just(Op::Commit),
        1 => Just(Op::Abort),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Random operations against a `BTreeMap` model: after every step the
    /// working tree equals the model; after every commit `check` passes;
    /// abort and reopen return exactly the last committed model.
    #[test]
    fn matches_btreemap_model(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        let mut f = Fixture::new(2048, 256 << 10);
        let mut t = f.open();
        let mut model: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
        let mut committed = model.clone();
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Insert(k, l) => {
                    let r = t.insert(key(*k), value(*k + step as u64, *l));
                    match model.entry(key(*k)) {
                        std::collections::btree_map::Entry::Occupied(_) => prop_assert!(
                            matches!(r, Err(BTreeError::KeyExists { .. })),
                            "expected KeyExists"
                        ),
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            r.expect("insert");
                            slot.insert(value(*k + step as u64, *l));
                        }
                    }
                }
                Op::Update(k, l) => {
                    let r = t.update(key(*k), value(*k, *l));
                    match model.get_mut(&key(*k)) {
                        Some(v) => {
                            prop_assert_eq!(&r.expect("update"), &*v);
                            *v = value(*k, *l);
                        }
                        None => prop_assert!(matches!(r, Err(BTreeError::NotFound { .. })), "expected NotFound"),
                    }
                }
                Op::Delete(k) => {
                    let r = t.delete(&key(*k));
                    match model.remove(&key(*k)) {
                        Some(v) => prop_assert_eq!(r.expect("delete"), v),
                        None => prop_assert!(matches!(r, Err(BTreeError::NotFound { .. })), "expected NotFound"),
                    }
                }
                Op::Batch(raw) => {
                    let mut b: BTreeMap<Key, Option<usize>> = BTreeMap::new();
                    for (k, l) in raw {
                        b.insert(key(*k), *l);
                    }
                    let changes: Vec<_> = b
                        .iter()
                        .map(|(k, l)| match l {
                            Some(l) => (*k, Change::Put(value(k.offset, *l))),
                            None => (*k, Change::Delete),
                        })
                        .collect();
                    let mut expect = ApplyReport::default();
                    for (k, l) in &b {
                        match (l, model.contains_key(k)) {
                            (Some(l), true) => {
                                expect.replaced += 1;
                                model.insert(*k, value(k.offset, *l));
                            }
                            (Some(l), false) => {
                                expect.inserted += 1;
                                model.insert(*k, value(k.offset, *l));
                            }
                            (None, true) => {
                                expect.deleted += 1;
                                model.remove(k);
                            }
                            (None, false) => expect.absent += 1,
                        }
                    }
                    prop_assert_eq!(t.apply_sorted(changes).expect("apply"), expect);
                }
                Op::Commit => {
                    f.commit(&t);
                    committed = model.clone();
                    let c = t.check().expect("check");
                    prop_assert_eq!(c.items, model.len() as u64);
                    prop_assert_eq!(c.underfull_nodes, 0);
                }
                Op::Abort => {
                    t.abort().expect("abort");
                    model = committed.clone();
                    t.check().expect("check");
                }
                Op::Reopen => {
                    drop(t);
                    t = f.open();
                    model = committed.clone();
                }
            }
            if step % 10 == 0 || step + 1 == ops.len() {
                let got = contents(&t);
                let want: Vec<_> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
                prop_assert_eq!(got, want);
            }
        }
        for (k, v) in &model {
            let got = t.get(k).expect("get");
            prop_assert_eq!(got.as_ref(), Some(v));
        }
    }
}

#[test]
fn range_bounds() {
    let mut f = Fixture::new(512, 1 << 20);
    let t = f.open();
    let changes: Vec<_> = (0..5000u64)
        .map(|i| (Key::new(i, 0, 0), Change::Put(value(i, 40))))
        .collect();
    t.apply_sorted(changes).expect("apply");
    let keys = |r: Range<'_, Arc<SimStorage>>| -> Vec<u64> {
        r.map(|x| x.expect("item").0.objectid).collect()
    };
    let k = |i| Key::new(i, 0, 0);
    assert_eq!(keys(t.range(k(10)..k(13))), vec![10, 11, 12]);
    assert_eq!(keys(t.range(k(10)..=k(13))), vec![10, 11, 12, 13]);
    assert_eq!(
        keys(t.range((
            std::ops::Bound::Excluded(k(10)),
            std::ops::Bound::Included(k(12))
        ))),
        vec![11, 12]
    );
    assert_eq!(keys(t.range(k(4998)..)), vec![4998, 4999]);
    assert_eq!(keys(t.range(..k(2))), vec![0, 1]);
    assert_eq!(keys(t.range(Key::new(3, 0, 1)..Key::new(5, 0, 0))), vec![4]);
    assert_eq!(t.range(..).count(), 5000);
    f.commit(&t);
    let all = keys(t.range(..));
    assert_eq!(all, (0..5000).collect::<Vec<_>>());
}

/// `last_below` is the greatest key below its argument at every position
/// of a multi-level tree: inside a leaf, at a leaf's first key (the answer
/// is in the leaf to the left), below the first key and past the last,
/// committed or not, and after deletes empty a stretch of leaves.
#[test]
fn last_below_finds_the_predecessor() {
    let mut f = Fixture::new(512, 1 << 20);
    let t = f.open();
    let changes: Vec<_> = (0..5000u64)
        .map(|i| (Key::new(2 * i + 1, 0, 0), Change::Put(value(i, 40))))
        .collect();
    t.apply_sorted(changes).expect("apply");
    let check = |t: &BTree<Arc<SimStorage>>| {
        let all: Vec<Key> = t.range(..).map(|x| x.expect("item").0).collect();
        for probe in 0..10_003u64 {
            let k = Key::new(probe, 0, 0);
            let want = all[..all.partition_point(|a| *a < k)].last().copied();
            assert_eq!(t.last_below(&k).expect("read"), want, "below {probe}");
        }
    };
    check(&t);
    f.commit(&t);
    check(&t);
    let deletes: Vec<_> = (1000..3000u64)
        .map(|i| (Key::new(2 * i + 1, 0, 0), Change::Delete))
        .collect();
    t.apply_sorted(deletes).expect("delete");
    check(&t);
}

/// A tree many times larger than the cache: every read goes through
/// eviction, the budget holds, the results are right.
#[test]
fn cache_much_smaller_than_tree() {
    let mut f = Fixture::new(1024, 8 << 20);
    let t = f.open();
    let changes: Vec<_> = (0..30_000u64)
        .map(|i| (key(i), Change::Put(value(i, 64))))
        .collect();
    t.apply_sorted(changes).expect("apply");
    f.commit(&t);
    let c = t.check().expect("check");
    assert!(c.nodes > 100, "{c:?}");
    drop(t);

    let budget = 4 * NODE_BYTES;
    f.config.cache_bytes = budget;
    let t = f.open();
    for round in 0..2u64 {
        for i in (0..30_000u64).step_by(7) {
            let i = (i * 31 + round) % 30_000;
            assert_eq!(t.get(&key(i)).expect("get"), Some(value(i, 64)));
        }
        let s = t.cache_stats();
        assert!(s.bytes <= budget as u64, "{s:?}");
    }
    assert_eq!(t.range(..).count(), 30_000);
    let s = t.cache_stats();
    assert!(s.evictions > 100 && s.misses > 100, "{s:?}");
    // Writes with a tiny cache: dirty nodes are pinned beyond the budget,
    // clean ones are evicted, and the commit is correct.
    let changes: Vec<_> = (0..30_000u64)
        .step_by(3)
        .map(|i| (key(i), Change::Put(value(i, 65))))
        .collect();
    t.apply_sorted(changes).expect("apply");
    assert!(t.cache_stats().dirty_bytes > budget as u64);
    f.commit(&t);
    assert_eq!(t.cache_stats().dirty_bytes, 0);
    assert!(t.cache_stats().bytes <= budget as u64);
    t.check().expect("check");
    for i in (0..30_000u64).step_by(11) {
        let len = if i % 3 == 0 { 65 } else { 64 };
        assert_eq!(t.get(&key(i)).expect("get"), Some(value(i, len)));
    }
}

/// Readers in more threads than cores, with a small cache, while a writer
/// updates and commits: every value read is one the writer wrote for that
/// key, and scans are ascending.
#[test]
fn concurrent_readers_and_writer() {
    let mut f = Fixture::new(2048, 6 * NODE_BYTES);
    let t = f.open();
    let n = 20_000u64;
    let changes: Vec<_> = (0..n)
        .map(|i| (key(i), Change::Put(versioned(i, 0))))
        .collect();
    t.apply_sorted(changes).expect("apply");
    f.commit(&t);
    let t = Arc::new(t);
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..6u64)
        .map(|r| {
            let (t, stop) = (Arc::clone(&t), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut x = r + 1;
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) || reads < 2000 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let i = (x >> 33) % n;
                    let v = t.get(&key(i)).expect("get").expect("present");
                    assert_eq!(u64::from_le_bytes(v[..8].try_into().expect("8")), i);
                    reads += 1;
                    if reads.is_multiple_of(500) {
                        let start = key(i);
                        let mut prev = None;
                        for item in t.range(start..).take(2000) {
                            let (k, v) = item.expect("range");
                            assert!(prev.is_none_or(|p| p < k));
                            assert_eq!(v.len(), 16);
                            prev = Some(k);
                        }
                    }
                }
                reads
            })
        })
        .collect();
    for round in 1..=5u64 {
        let changes: Vec<_> = (0..n)
            .step_by(5 + round as usize)
            .map(|i| (key(i), Change::Put(versioned(i, round))))
            .collect();
        t.apply_sorted(changes).expect("apply");
        f.commit(&t);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("reader") >= 2000);
    }
    t.check().expect("check");
}

fn versioned(i: u64, version: u64) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v
}

#[test]
fn input_errors_do_not_change_anything() {
    let mut f = Fixture::new(64, 1 << 20);
    let t = f.open();
    assert!(matches!(
        t.insert(key(1), vec![0; VALUE_BYTES_MAX + 1]),
        Err(BTreeError::ValueTooLarge { .. })
    ));
    t.insert(key(1), vec![0; VALUE_BYTES_MAX])
        .expect("max value");
    assert!(matches!(
        t.apply_sorted(vec![(key(2), Change::Delete), (key(2), Change::Delete)]),
        Err(BTreeError::Unsorted { index: 1, .. })
    ));
    assert!(matches!(
        t.apply_sorted(vec![(key(3), Change::Delete), (key(2), Change::Delete)]),
        Err(BTreeError::Unsorted { .. })
    ));
    f.commit(&t);
    assert!(matches!(
        t.commit(f.sb.generation),
        Err(BTreeError::GenerationNotIncreasing { .. })
    ));
    t.check().expect("check");
    assert_eq!(contents(&t).len(), 1);
}

/// Filling the region fails with `NoSpace`, poisons the working tree, and
/// abort returns to the last commit.
#[test]
fn no_space_poisons_until_abort() {
    let mut f = Fixture::new(16, 1 << 20);
    let t = f.open();
    t.insert(key(0), vec![1; 100]).expect("insert");
    f.commit(&t);
    let mut i = 1;
    let err = loop {
        match t.insert(key(i), vec![1; 4000]) {
            Ok(()) => i += 1,
            Err(e) => break e,
        }
        assert!(i < 1000);
    };
    assert!(matches!(err, BTreeError::NoSpace { .. }), "{err}");
    assert!(matches!(t.get(&key(0)), Err(BTreeError::Poisoned { .. })));
    assert!(matches!(t.commit(99), Err(BTreeError::Poisoned { .. })));
    t.abort().expect("abort");
    assert_eq!(contents(&t), vec![(key(0), vec![1; 100])]);
    t.check().expect("check");
    // Space is usable again.
    t.insert(key(1), vec![2; 10]).expect("insert");
    f.commit(&t);
    t.check().expect("check");
}

/// A flipped bit in a node is reported with its address by reads and by
/// `check`; a lost write (old node left in place) by the generation check.
#[test]
fn corruption_is_detected() {
    let mut f = Fixture::new(256, 1 << 20);
    let t = f.open();
    let changes: Vec<_> = (0..3000u64)
        .map(|i| (key(i), Change::Put(value(i, 64))))
        .collect();
    t.apply_sorted(changes).expect("apply");
    let info = f.commit(&t);
    assert!(info.root.level >= 1);
    drop(t);

    // Flip a bit in the root: open fails.
    f.dev.flip_bit(info.root.addr + 5000, 3).expect("flip");
    let err = BTree::open_superblock(Arc::clone(&f.dev), &f.sb, f.config).expect_err("corrupt");
    assert!(
        matches!(err, BTreeError::Node { addr, .. } if addr == info.root.addr),
        "{err}"
    );
    f.dev.flip_bit(info.root.addr + 5000, 3).expect("unflip");

    // Flip a bit in a leaf: the read of that leaf and check fail.
    let t = f.open();
    let leaf_key = key(1500);
    let leaf_addr = {
        let st = t.lock_read();
        let root = st.root.expect("root");
        let node = t.node(&st, root).expect("root node");
        match &node.body {
            node::Body::Internal(ch) => ch[node::route(ch, &leaf_key)].addr,
            node::Body::Leaf(_) => panic!("expected an internal root"),
        }
    };
    drop(t);
    f.dev.flip_bit(leaf_addr + 100, 0).expect("flip");
    let t = f.open();
    let err = t.get(&leaf_key).expect_err("corrupt leaf");
    assert!(
        matches!(err, BTreeError::Node { addr, .. } if addr == leaf_addr),
        "{err}"
    );
    assert!(t.get(&key(0)).is_ok() || leaf_addr == 0);
    let err = t.check().expect_err("check finds it");
    assert!(
        matches!(err, BTreeError::Node { addr, .. } if addr == leaf_addr),
        "{err}"
    );
    f.dev.flip_bit(leaf_addr + 100, 0).expect("unflip");

    // A stale superblock generation for the root is a generation mismatch.
    let mut stale = f.sb.clone();
    stale.tree_root_generation -= 1;
    let err = BTree::open_superblock(Arc::clone(&f.dev), &stale, f.config).expect_err("stale");
    assert!(matches!(err, BTreeError::Node { .. }), "{err}");
}

#[test]
fn pending_frees_are_not_reused_before_release() {
    let mut f = Fixture::new(64, 1 << 20);
    let t = f.open();
    t.insert(key(1), vec![1; 10]).expect("insert");
    let first = f.commit(&t);
    // Commit without releasing: the old root must not be reused.
    t.update(key(1), vec![2; 10]).expect("update");
    let g = f.sb.generation + 1;
    let second = t.commit(g).expect("commit");
    assert_eq!(second.pending_free_nodes, 2, "old leaf and old bitmap node");
    t.update(key(1), vec![3; 10]).expect("update");
    let third = t.commit(g + 1).expect("commit");
    let used = [
        first.root.addr,
        first.alloc.bitmap_addr,
        second.root.addr,
        second.alloc.bitmap_addr,
    ];
    assert!(
        !used.contains(&third.root.addr),
        "{third:?} reuses {used:?}"
    );
    assert!(!used.contains(&third.alloc.bitmap_addr));
    let c = t.check().expect("check");
    assert_eq!(c.pending_free_nodes, 4);
    assert_eq!(t.release_pending(g + 1).expect("release"), 4);
    t.update(key(1), vec![4; 10]).expect("update");
    let fourth = t.commit(g + 2).expect("commit");
    assert!(
        used.contains(&fourth.root.addr),
        "released slots are reused first"
    );
    t.check().expect("check");
}

/// Found while writing the `bitmap` fuzz target: the allocator sizes its
/// bit per slot from the node region the superblock claims, and nothing
/// compared that region with the device, so a checksum-valid superblock
/// claiming a 2^60-byte device made `open` try to allocate 8 TiB (an
/// abort, not an error). The region must now end inside the device.
#[test]
fn node_region_beyond_the_device_is_refused_before_allocating() {
    let f = Fixture::new(8, 1 << 20);
    let mut sb = f.sb.clone();
    sb.geometry.size_bytes = 1 << 60;
    sb.node_region_bytes = (1 << 60) - (1 << 20);
    sb.validate().expect("a valid superblock on its own");
    match BTree::open_superblock(Arc::clone(&f.dev), &sb, f.config) {
        Err(BTreeError::Config { field, reason }) => {
            assert_eq!(field, "node region");
            assert!(reason.contains("beyond the device"), "{reason}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a region beyond the device opened"),
    }
    f.open();
}
