//! Round trips, golden bytes and corrupt input for every codec.

use std::collections::BTreeMap;

use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::head::{DelayedRef, Head};
use refd_core::model::{Action, DiskKey, ExtentKind, ExtentOp, Op, RefKey, TREE_BLOCK_REF_KEY};
use refd_ioring::btree::{Change, Key, VALUE_BYTES_MAX};

use super::*;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

/// Seeded choices: `rand_chacha`'s [`ChaCha8Rng`] (value-stable across
/// platforms and releases) with the helpers used below.
struct Gen(ChaCha8Rng);
impl Gen {
    fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.gen()
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.0.gen_range(0..n)
    }
    fn wide(&mut self) -> u64 {
        // Mix of small and huge numbers.
        match self.below(4) {
            0 => self.below(128),
            1 => self.below(1 << 20),
            2 => self.next() >> self.below(64),
            _ => self.next(),
        }
    }
}

fn random_op(g: &mut Gen) -> Op {
    let data = g.below(2) == 0;
    let kind = if data {
        ExtentKind::Data
    } else {
        ExtentKind::Tree {
            level: g.below(8) as u8,
        }
    };
    let bytenr = g.wide() >> 1;
    let num_bytes = 1 + g.below(1 << 30);
    let action = Action::from_code(1 + g.below(4) as u8).unwrap();
    if action == Action::UpdateHead {
        let key = (!data && g.below(2) == 0).then(|| DiskKey {
            objectid: g.wide(),
            item_type: g.below(256) as u8,
            offset: g.wide(),
        });
        let flags_to_set = if key.is_none() || g.below(2) == 0 {
            refd_core::model::BLOCK_FLAG_FULL_BACKREF
        } else {
            0
        };
        return Op::update_head(bytenr, num_bytes, kind, ExtentOp { flags_to_set, key }).unwrap();
    }
    let nz = |g: &mut Gen| g.wide().max(1);
    let key = if data {
        if g.below(2) == 0 {
            RefKey::ExtentData {
                root: nz(g),
                objectid: g.wide(),
                offset: g.wide(),
            }
        } else {
            RefKey::SharedData { parent: nz(g) }
        }
    } else if g.below(2) == 0 {
        RefKey::TreeBlock { root: nz(g) }
    } else {
        RefKey::SharedBlock { parent: nz(g) }
    };
    let seq = if g.below(3) == 0 { g.below(1 << 40) } else { 0 };
    let op = Op::new(bytenr, num_bytes, kind, action, key, seq).unwrap();
    if !data && action == Action::AddExtent && g.below(2) == 0 {
        op.with_extent_op(ExtentOp {
            flags_to_set: 0,
            key: Some(DiskKey {
                objectid: 256,
                item_type: 1,
                offset: 0,
            }),
        })
        .unwrap()
    } else {
        op
    }
}

#[test]
fn op_round_trip_and_size() {
    let mut g = Gen::new(7);
    for _ in 0..20_000 {
        let op = random_op(&mut g);
        let rec = op_record(&op);
        assert!(rec.len() <= OP_RECORD_BYTES_MAX);
        assert_eq!(decode_op(&rec), Ok(op), "{op}");
        // Every strict prefix is refused.
        for n in 0..rec.len() {
            assert!(decode_op(&rec[..n]).is_err());
        }
    }
    // A common data ref: bytenr ~1 TiB, 128 KiB, small root/inode.
    let op = Op::new(
        1 << 40,
        128 << 10,
        ExtentKind::Data,
        Action::AddRef,
        RefKey::ExtentData {
            root: 5,
            objectid: 260_000,
            offset: 1 << 20,
        },
        0,
    )
    .unwrap();
    let n = op_record(&op).len();
    assert!((10..=20).contains(&n), "{n} bytes");
}

#[test]
fn golden_op_record() {
    let op = Op::new(
        4096,
        4096,
        ExtentKind::Data,
        Action::DropRef,
        RefKey::ExtentData {
            root: 5,
            objectid: 257,
            offset: 0,
        },
        0,
    )
    .unwrap();
    assert_eq!(
        op_record(&op),
        [0x0a, 0x80, 0x20, 0x80, 0x20, 178, 5, 0x81, 0x02, 0]
    );
}

/// `docs/format.md`, "Other records": UNSUBSCRIBE of consumer 300 is the
/// kind byte and one varint; trailing bytes and a missing id are refused.
#[test]
fn golden_unsubscribe_record() {
    let record = Record::Unsubscribe { consumer: 300 };
    let mut buf = Vec::new();
    encode_record(&record, &mut buf);
    assert_eq!(buf, [0x85, 0xac, 0x02]);
    assert_eq!(decode_record(&buf), Ok(record));
    assert!(decode_record(&[0x85]).is_err());
    assert!(decode_record(&[0x85, 0xac, 0x02, 0]).is_err());
}

#[test]
fn random_bytes_never_panic() {
    let mut g = Gen::new(99);
    let mut ok = 0;
    for _ in 0..200_000 {
        let len = g.below(40) as usize;
        let buf: Vec<u8> = (0..len).map(|_| g.next() as u8).collect();
        if let Ok(op) = decode_op(&buf) {
            ok += 1;
            assert_eq!(op_record(&op), buf, "decode accepts only canonical bytes");
        }
    }
    // Also mutate valid records.
    for _ in 0..50_000 {
        let mut rec = op_record(&random_op(&mut g));
        let i = g.below(rec.len() as u64) as usize;
        rec[i] ^= 1 << g.below(8);
        if let Ok(op) = decode_op(&rec) {
            assert_eq!(op_record(&op), rec);
        }
    }
    assert!(ok < 200_000);
}

/// Random heads (random ops merged per bytenr, seqs and stamps set):
/// the held-heads stream round trips, splits into chunks that
/// reassemble, refuses every strict prefix, and decodes bit flips only
/// to canonical bytes.
#[test]
fn held_heads_round_trip() {
    let mut g = Gen::new(7);
    for round in 0..200 {
        let mut heads = Vec::new();
        for _ in 0..g.below(20) {
            let mut op = random_op(&mut g);
            op.bytenr = g.below(64) << 12;
            if op.key.is_some() && g.below(2) == 0 {
                op.seq = 1 + g.below(5);
            }
            let stamp = 1 + g.below(1000);
            heads.push(Head::of_op(&op, stamp));
        }
        let heads = refd_core::delayed::merge_heads(heads);
        let stream = encode_held(&heads);
        if heads.is_empty() {
            assert!(
                decode_held(&stream).is_err(),
                "no stream is stored for no heads"
            );
            continue;
        }
        assert_eq!(decode_held(&stream).unwrap(), heads, "round {round}");
        let joined: Vec<u8> = held_items(&stream)
            .into_iter()
            .flat_map(|(_, v)| v)
            .collect();
        assert_eq!(joined, stream);
        for cut in 0..stream.len() {
            assert!(decode_held(&stream[..cut]).is_err(), "prefix {cut}");
        }
        for _ in 0..20 {
            let mut bad = stream.clone();
            let i = g.below(bad.len() as u64) as usize;
            bad[i] ^= 1 << g.below(8);
            if let Ok(h) = decode_held(&bad) {
                if bad[0] == stream[0] {
                    assert_eq!(encode_held(&h), bad, "canonical");
                } else {
                    // An older version (read, never written) re-encodes
                    // as the current one.
                    assert_eq!(decode_held(&encode_held(&h)).unwrap(), h);
                }
            }
        }
    }
    // A big head spans chunks.
    let mut big = Head::of_op(&random_op(&mut g), 1);
    big.refs = (1..2000u64)
        .map(|i| DelayedRef {
            key: RefKey::TreeBlock { root: i },
            seq: 0,
            ref_mod: 1,
            drops: i % 3,
        })
        .collect();
    big.summary.total_ref_mod = 1999;
    let stream = encode_held(std::slice::from_ref(&big));
    assert!(held_items(&stream).len() > 1);
    assert_eq!(decode_held(&stream).unwrap(), vec![big]);
}

/// Version 3 added each head's allocation count; a version 2 stream
/// (the same bytes without it) is read with one allocation where there is
/// one, and re-encodes as version 3. A count that contradicts the
/// allocation stamp is refused.
#[test]
fn held_heads_version_2_reads_one_allocation() {
    let op = Op::new(
        1 << 20,
        4096,
        ExtentKind::Data,
        Action::AddExtent,
        RefKey::ExtentData {
            root: 5,
            objectid: 257,
            offset: 0,
        },
        3,
    )
    .unwrap();
    let mut head = Head::of_op(&op, 300);
    head.absorb(&Op { seq: 4, ..op }, 301);
    assert_eq!(head.summary.allocs, 2);
    let v3 = encode_held(std::slice::from_ref(&head));
    assert_eq!(v3[0], 3);
    // version, count, bytenr, num_bytes, kind, flags, alloc_stamp (2 bytes).
    let mut prefix = Vec::new();
    put_varint(&mut prefix, 1);
    put_varint(&mut prefix, 1 << 20);
    put_varint(&mut prefix, 4096);
    let at = 1 + prefix.len() + 1 + 1 + 2;
    assert_eq!(v3[at], 2, "the allocation count");
    let mut v2 = v3.clone();
    v2[0] = 2;
    v2.remove(at);
    let read = decode_held(&v2).unwrap();
    assert_eq!(read[0].summary.allocs, 1);
    assert_eq!(read[0].refs, head.refs);
    assert_eq!(encode_held(&read)[0], 3);
    for bad in [0, u64::from(u16::MAX) + 1] {
        let mut count = Vec::new();
        put_varint(&mut count, bad);
        let mut b = v3.clone();
        b.splice(at..=at, count);
        assert!(decode_held(&b).is_err(), "allocation count {bad}");
    }
}

#[test]
fn varint_edges() {
    for v in [0, 1, 127, 128, 16383, 16384, u64::MAX >> 1, u64::MAX] {
        let mut b = Vec::new();
        put_varint(&mut b, v);
        let mut r = Reader::new(&b);
        assert_eq!(r.varint("v"), Ok(v));
        assert!(r.is_empty());
    }
    // Overlong (non-shortest) and overflowing forms.
    assert!(Reader::new(&[0x80, 0x00]).varint("v").is_err());
    assert!(Reader::new(&[0xff; 10]).varint("v").is_err());
    assert!(
        Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02])
            .varint("v")
            .is_err()
    );
}

fn load(items: &[(Key, Vec<u8>)]) -> Result<ExtentTree, CodecError> {
    ExtentLoader::load_all(items.iter().map(|(k, v)| (k, v.as_slice())))
}

#[test]
fn extent_items_round_trip_with_keyed_refs() {
    let mut tree = ExtentTree::new();
    // Data extent growing past the inline budget.
    let mut big = ExtentItem::new(1 << 20, ExtentKind::Data, 9);
    for n in 0..400u64 {
        big.add_ref(
            RefKey::ExtentData {
                root: 5 + n % 3,
                objectid: 257 + n,
                offset: n * 4096,
            },
            1 + (n % 4) as i64,
        );
    }
    big.add_ref(RefKey::SharedData { parent: 1 << 30 }, 3);
    assert!(!big.keyed.is_empty() && !big.inline.is_empty());
    tree.insert(1 << 30, big);
    // Tree block with many shared refs, a key and full backref.
    let mut tb = ExtentItem::new(16384, ExtentKind::Tree { level: 2 }, 4);
    tb.tree_key = Some(DiskKey {
        objectid: 256,
        item_type: 84,
        offset: 7,
    });
    tb.flags |= refd_core::model::BLOCK_FLAG_FULL_BACKREF;
    for n in 0..600u64 {
        tb.add_ref(
            RefKey::SharedBlock {
                parent: 16384 * (n + 1),
            },
            1,
        );
    }
    tb.add_ref(RefKey::TreeBlock { root: 2 }, 1);
    assert!(!tb.keyed.is_empty());
    tree.insert(2 << 30, tb);
    // Small ones.
    let mut small = ExtentItem::new(4096, ExtentKind::Data, 1);
    small.add_ref(
        RefKey::ExtentData {
            root: 5,
            objectid: 300,
            offset: 0,
        },
        1,
    );
    tree.insert(4096, small);
    let mut leaf = ExtentItem::new(16384, ExtentKind::Tree { level: 0 }, 2);
    leaf.add_ref(RefKey::TreeBlock { root: 5 }, 1);
    tree.insert(8192, leaf);

    let mut all = Vec::new();
    for (b, item) in tree.iter() {
        let items = encode_extent(b, item).unwrap();
        assert!(items.iter().all(|(_, v)| v.len() <= VALUE_BYTES_MAX));
        all.extend(items);
    }
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(load(&all).unwrap(), tree);

    // diff from nothing = all puts; diff to nothing = all deletes.
    let item = tree.get(1 << 30).unwrap();
    let mut out = Vec::new();
    diff_extent(1 << 30, None, Some(item), &mut out).unwrap();
    assert_eq!(out.len(), 1 + item.keyed.len());
    out.clear();
    let mut changed = item.clone();
    changed.add_ref(changed.keyed[0].0, 1);
    diff_extent(1 << 30, Some(item), Some(&changed), &mut out).unwrap();
    assert_eq!(out.len(), 1, "only the keyed item changes");
    out.clear();
    diff_extent(1 << 30, Some(item), None, &mut out).unwrap();
    assert!(out.iter().all(|(_, c)| matches!(c, Change::Delete)));
}

/// Applying a diff to the old encoding gives the new encoding, on the
/// fast path (only the extent item changes) and off it.
#[test]
fn diffs_turn_old_items_into_new_ones() {
    let data_ref = |objectid: u64| RefKey::ExtentData {
        root: 5,
        objectid,
        offset: 0,
    };
    let mut base = ExtentItem::new(8192, ExtentKind::Data, 3);
    base.add_ref(data_ref(1), 2);
    let mut more = base.clone();
    more.add_ref(data_ref(2), 1);
    let mut newer = more.clone();
    newer.generation = 9;
    let mut resized = ExtentItem::new(4096, ExtentKind::Data, 3);
    resized.add_ref(data_ref(1), 2);
    let mut keyed = base.clone();
    let mut n = 10;
    while keyed.keyed.is_empty() {
        keyed.add_ref(data_ref(n), 1);
        n += 1;
    }
    let mut tree = ExtentItem::new(16384, ExtentKind::Tree { level: 1 }, 4);
    tree.add_ref(RefKey::TreeBlock { root: 5 }, 1);
    let mut tree2 = tree.clone();
    tree2.add_ref(RefKey::SharedBlock { parent: 1 << 20 }, 1);
    let mut flagged = tree.clone();
    flagged.flags |= 1 << 8; // FULL_BACKREF
    let pairs = [
        (Some(&base), Some(&more)),
        (Some(&more), Some(&newer)),
        (Some(&tree), Some(&flagged)),
        (Some(&base), Some(&resized)),
        (Some(&base), Some(&keyed)),
        (Some(&keyed), Some(&base)),
        (Some(&tree), Some(&tree2)),
        (Some(&base), Some(&base)),
        (None, Some(&keyed)),
        (Some(&keyed), None),
    ];
    for (i, (before, after)) in pairs.into_iter().enumerate() {
        let encode = |item: Option<&ExtentItem>| -> BTreeMap<Key, Vec<u8>> {
            item.map_or_else(BTreeMap::new, |it| {
                encode_extent(1 << 30, it).unwrap().into_iter().collect()
            })
        };
        let mut items = encode(before);
        let mut out = Vec::new();
        diff_extent(1 << 30, before, after, &mut out).unwrap();
        assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "pair {i}: sorted");
        for (k, c) in out {
            match c {
                Change::Put(v) => {
                    items.insert(k, v);
                }
                Change::Delete => {
                    assert!(items.remove(&k).is_some(), "pair {i}: delete of {k:?}");
                }
            }
        }
        assert_eq!(items, encode(after), "pair {i}");
    }
}

#[test]
fn hash_collisions_probe() {
    // Force a collision by decoding two keyed refs at adjacent offsets.
    let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
    item.add_ref(
        RefKey::ExtentData {
            root: 5,
            objectid: 1,
            offset: 0,
        },
        1,
    );
    item.keyed.push(item.inline.pop().unwrap());
    let items = encode_extent(4096, &item).unwrap();
    let (k, v) = items[1].clone();
    let mut extra = v.clone();
    extra[8] = 2; // objectid 2, stored at the probed offset
    let forged = vec![
        items[0].clone(),
        (k, v),
        (Key::new(k.objectid, k.item_type, k.offset + 1), extra),
    ];
    let t = load(&forged).unwrap();
    assert_eq!(t.get(4096).unwrap().refs, 2);
}

#[test]
fn corrupt_items_are_errors() {
    let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
    item.add_ref(
        RefKey::ExtentData {
            root: 5,
            objectid: 1,
            offset: 0,
        },
        2,
    );
    let items = encode_extent(4096, &item).unwrap();
    let (k, v) = &items[0];
    let mut g = Gen::new(3);
    for _ in 0..20_000 {
        let mut v = v.clone();
        let len = g.below(v.len() as u64 + 1) as usize;
        v.truncate(len);
        if !v.is_empty() && g.below(2) == 0 {
            let i = g.below(v.len() as u64) as usize;
            v[i] = g.next() as u8;
        }
        let _ = load(&[(*k, v)]);
    }
    // Keyed ref without its extent item.
    assert!(load(&[(Key::new(1, TREE_BLOCK_REF_KEY, 5), Vec::new())]).is_err());
    // Zero refs.
    assert!(load(&[(*k, v[..3].to_vec())]).is_err());
    // Unknown type.
    assert!(load(&[(Key::new(1, 170, 5), v.clone())]).is_err());
}

/// The diff of two items with keyed backrefs (the walk of the sorted
/// lists) is exactly the diff of their full encodings, for random items
/// of every backref kind, growing, shrinking and changing counts.
#[test]
fn keyed_diff_is_the_full_diff() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let key = |n: u64| match n % 4 {
        0 => RefKey::SharedData { parent: n << 12 },
        _ => RefKey::ExtentData {
            root: 5,
            objectid: n,
            offset: n % 3,
        },
    };
    for case in 0..300 {
        let span = rng.gen_range(50..3000u64);
        let mut before = ExtentItem::new(4096, ExtentKind::Data, 1);
        for n in 0..span {
            if rng.gen_bool(0.5) {
                before.add_ref(key(n), rng.gen_range(1..4));
            }
        }
        let mut net: Vec<(RefKey, i64)> = Vec::new();
        for n in 0..span {
            if rng.gen_bool(0.2) {
                let have = before.count(&key(n)) as i64;
                net.push((key(n), rng.gen_range(-have..=2)));
            }
        }
        net.sort_by_key(|a| a.0);
        let mut after = before.clone();
        after.add_refs(&net);
        after.generation = if case % 3 == 0 { 2 } else { 1 };
        let mut fast = Vec::new();
        diff_extent(1 << 30, Some(&before), Some(&after), &mut fast).unwrap();
        let mut slow = Vec::new();
        diff::diff_encoded(1 << 30, Some(&before), Some(&after), &mut slow).unwrap();
        assert_eq!(fast, slow, "case {case}");
    }
}

/// The diff from the changed keys alone (lookups in the committed B+tree,
/// here a map of the full encoding of the item before) is exactly the
/// diff of the full encodings, for large items of both keyed kinds with
/// a few adds, drops to zero and recounts; and a B+tree that shows a
/// changed backref's home taken by another backref (a collision) makes it
/// decline, leaving the full diff to [`diff_extent`].
#[test]
fn changed_keys_diff_is_the_full_diff() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let key = |n: u64| match n % 5 {
        0 => RefKey::SharedData { parent: n << 12 },
        _ => RefKey::ExtentData {
            root: 256 + n,
            objectid: 257,
            offset: n % 3,
        },
    };
    let bytenr = 1 << 30;
    for case in 0..100 {
        let span = rng.gen_range(2000..8000u64);
        let mut before = ExtentItem::new(4096, ExtentKind::Data, 1);
        let mut counts: Vec<(RefKey, i64)> = Vec::new();
        for n in 0..span {
            if rng.gen_bool(0.7) {
                counts.push((key(n), rng.gen_range(1..4)));
            }
        }
        counts.sort_by_key(|a| a.0);
        before.add_refs(&counts);
        let mut net: Vec<(RefKey, i64)> = Vec::new();
        for _ in 0..rng.gen_range(1..20) {
            let n = rng.gen_range(0..span + 100);
            if net.iter().any(|(k, _)| *k == key(n)) {
                continue;
            }
            let have = before.count(&key(n)) as i64;
            let delta = match rng.gen_range(0..3) {
                0 => -have,
                1 => 1,
                _ => rng.gen_range(-have..=2),
            };
            net.push((key(n), delta));
        }
        net.sort_by_key(|a| a.0);
        let after = before.with_refs(&net);
        if after.refs == 0 {
            continue;
        }
        let stored: BTreeMap<Key, Vec<u8>> = encode_extent(bytenr, &before)
            .unwrap()
            .into_iter()
            .collect();
        let lookup = |k: &Key| Ok(stored.get(k).cloned());
        let mut slow = Vec::new();
        diff::diff_encoded(bytenr, Some(&before), Some(&after), &mut slow).unwrap();
        let mut fast = Vec::new();
        assert_eq!(
            diff::diff_changed(bytenr, &before, &after, &net, &lookup, &mut fast),
            Ok(true),
            "case {case}: no collision, the changed keys suffice"
        );
        assert_eq!(fast, slow, "case {case}");
        let mut via = Vec::new();
        diff_extent_changed(
            bytenr,
            Some(&before),
            Some(&after),
            Some(&net),
            &lookup,
            &mut via,
        )
        .unwrap();
        assert_eq!(via, slow, "case {case}");
        // Every home taken by a backref that is not the changed one.
        let other = item::keyed_backref_item(bytenr, key(5 * span + 1001), 1)
            .unwrap()
            .1;
        let taken = |_: &Key| Ok(Some(other.clone()));
        let data_changes = net.iter().any(|(k, d)| {
            matches!(k, RefKey::ExtentData { .. })
                && *d != 0
                && !before.inline.iter().any(|(i, _)| i == k)
                && !after.inline.iter().any(|(i, _)| i == k)
        });
        let mut declined = Vec::new();
        assert_eq!(
            diff::diff_changed(bytenr, &before, &after, &net, &taken, &mut declined),
            Ok(!data_changes),
            "case {case}"
        );
        let mut via = Vec::new();
        diff_extent_changed(
            bytenr,
            Some(&before),
            Some(&after),
            Some(&net),
            &taken,
            &mut via,
        )
        .unwrap();
        assert_eq!(via, slow, "case {case}: declined, the full diff");
    }
}
