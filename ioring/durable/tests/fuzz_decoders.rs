//! Property tests of the durable engine's decoders (op records and the
//! other log records, the held-heads stream, extent items through
//! `ExtentLoader`, the service items) on random and mutated inputs: the cargo-fuzz targets of `fuzz/` (`docs/fuzzing.md`)
//! run as part of the normal test suite.
//!
//! Each test encodes random values (ops, records, merged heads, extent
//! items with inline and keyed backrefs, service items), mutates the encoding (bit flips,
//! truncation, extension, byte edits, varint and count edits, splices,
//! pure random bytes; for items also key edits, dropped, duplicated and
//! reordered items) and feeds it to the checks of
//! [`refd_durable::selftest`]: no panic, bounded allocation, and either a
//! typed error or a value that re-encodes to the same bytes. Unmutated
//! encodings must decode to exactly the value that was encoded. A tenth
//! of the cases go through the cargo-fuzz entry points (`fuzz_op`, ...).
//!
//! Seeded (`ChaCha8Rng`), so a failure is reproducible:
//! `REFD_FUZZ_SEED=<n>` changes the seed, `REFD_FUZZ_CASES=<n>` the
//! number of cases per decoder (never fewer than 100,000).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refd_core::extent_tree::ExtentItem;
use refd_core::head::Head;
use refd_core::model::{
    Action, DiskKey, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF,
    EXTENT_DATA_REF_KEY, SHARED_BLOCK_REF_KEY, SHARED_DATA_REF_KEY, TREE_BLOCK_REF_KEY,
};
use refd_durable::codec::record::CONSUMER_NAME_BYTES_MAX;
use refd_durable::codec::service::{
    encode_consumer, encode_freed_chunks, encode_meta, encode_session, ConsumerItem, FreedEntry,
    MetaItem, SessionItem, SessionReply, CONSUMER_KEY, FREED_KEY, META_KEY, SESSION_KEY,
    SESSION_REPLIES_KEPT_MAX,
};
use refd_durable::codec::{encode_extent, encode_held, encode_record, op_record, Record};
use refd_durable::selftest::*;
use refd_ioring::btree::Key;
use refd_ioring::selftest::heap;

const CASES_MIN: u64 = 100_000;

#[global_allocator]
static METER: heap::Meter = heap::Meter;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn setup(salt: u64) -> (ChaCha8Rng, u64) {
    let seed = env_u64("REFD_FUZZ_SEED").unwrap_or(0x5EED_D0AB);
    let cases = env_u64("REFD_FUZZ_CASES")
        .unwrap_or(CASES_MIN)
        .max(CASES_MIN);
    (ChaCha8Rng::seed_from_u64(seed ^ salt), cases)
}

#[derive(Debug, Default)]
struct Tally {
    by_mutation: [u64; 12],
    ok: u64,
    errors: u64,
    heap_max: usize,
}

impl Tally {
    /// Checks and counts one decode of an input changed by mutation `m`
    /// (0: none): it held at most `bound` heap bytes; an unmutated input
    /// decodes (back to `want`, if given); a mutated one decodes or is a
    /// typed error.
    fn count<T: PartialEq + std::fmt::Debug, E: std::fmt::Display>(
        &mut self,
        what: &str,
        m: usize,
        (decoded, heap_bytes): (Result<T, E>, usize),
        bound: usize,
        want: Option<&T>,
    ) {
        self.by_mutation[m] += 1;
        assert!(
            heap_bytes <= bound,
            "{what} decode held {heap_bytes} > {bound}"
        );
        self.heap_max = self.heap_max.max(heap_bytes);
        match decoded {
            Ok(back) => {
                self.ok += 1;
                if let Some(want) = want.filter(|_| m == 0) {
                    assert_eq!(&back, want);
                }
            }
            Err(e) => {
                assert_ne!(m, 0, "valid {what} refused: {e}");
                self.errors += 1;
            }
        }
    }
}

// ------------------------------------------------------------ generators

/// Uniform below `2^k` for a random `k` in `1..bits`.
fn wide(rng: &mut ChaCha8Rng, bits: u32) -> u64 {
    let k = rng.gen_range(1..bits);
    rng.gen_range(0..1u64 << k)
}

fn random_op(rng: &mut ChaCha8Rng) -> Op {
    let data = rng.gen_bool(0.5);
    let kind = if data {
        ExtentKind::Data
    } else {
        ExtentKind::Tree {
            level: rng.gen_range(0..8),
        }
    };
    let bytenr = wide(rng, 63);
    let num_bytes = 1 + wide(rng, 31);
    let action = Action::from_code(rng.gen_range(1..=4)).expect("action");
    if action == Action::UpdateHead {
        let key = (!data && rng.gen_bool(0.5)).then(|| DiskKey {
            objectid: wide(rng, 64),
            item_type: rng.gen(),
            offset: wide(rng, 64),
        });
        let flags_to_set = if key.is_none() || rng.gen_bool(0.5) {
            BLOCK_FLAG_FULL_BACKREF
        } else {
            0
        };
        return Op::update_head(bytenr, num_bytes, kind, ExtentOp { flags_to_set, key })
            .expect("update_head");
    }
    let key = random_ref_key(rng, data);
    let seq = if rng.gen_ratio(1, 3) {
        rng.gen_range(1..1 << 40)
    } else {
        0
    };
    let op = Op::new(bytenr, num_bytes, kind, action, key, seq).expect("op");
    if !data && action == Action::AddExtent && rng.gen_bool(0.5) {
        op.with_extent_op(ExtentOp {
            flags_to_set: 0,
            key: Some(DiskKey {
                objectid: 256,
                item_type: 1,
                offset: 0,
            }),
        })
        .expect("extent_op")
    } else {
        op
    }
}

fn random_ref_key(rng: &mut ChaCha8Rng, data: bool) -> RefKey {
    let nz = |rng: &mut ChaCha8Rng| wide(rng, 64).max(1);
    match (data, rng.gen_bool(0.5)) {
        (true, true) => RefKey::ExtentData {
            root: nz(rng),
            objectid: wide(rng, 64),
            offset: wide(rng, 64),
        },
        (true, false) => RefKey::SharedData { parent: nz(rng) },
        (false, true) => RefKey::TreeBlock { root: nz(rng) },
        (false, false) => RefKey::SharedBlock { parent: nz(rng) },
    }
}

/// Heads a seq barrier may hold: random ops merged per bytenr.
fn random_heads(rng: &mut ChaCha8Rng) -> Vec<Head> {
    let max = if rng.gen_ratio(1, 16) { 200 } else { 8 };
    let n = rng.gen_range(1..=max);
    let heads: Vec<Head> = (0..n)
        .map(|_| {
            let mut op = random_op(rng);
            op.bytenr = rng.gen_range(0..64) << 12;
            if op.key.is_some() && rng.gen_bool(0.5) {
                op.seq = rng.gen_range(1..6);
            }
            Head::of_op(&op, rng.gen_range(1..1000))
        })
        .collect();
    refd_core::delayed::merge_heads(heads)
}

fn random_extent(rng: &mut ChaCha8Rng) -> ExtentItem {
    let data = rng.gen_bool(0.5);
    let kind = if data {
        ExtentKind::Data
    } else {
        ExtentKind::Tree {
            level: rng.gen_range(0..8),
        }
    };
    let mut item = ExtentItem::new(1 + wide(rng, 30), kind, wide(rng, 40));
    if !data && rng.gen_bool(0.3) {
        item.tree_key = Some(DiskKey {
            objectid: wide(rng, 64),
            item_type: rng.gen(),
            offset: wide(rng, 64),
        });
    }
    if !data && rng.gen_bool(0.3) {
        item.flags |= BLOCK_FLAG_FULL_BACKREF;
    }
    // Mostly a few refs; sometimes enough to spill into keyed items.
    let max = if rng.gen_ratio(1, 32) { 400 } else { 6 };
    let n = rng.gen_range(1..=max);
    for _ in 0..n {
        let key = random_ref_key(rng, data);
        let count = if key.is_tree() {
            1
        } else {
            rng.gen_range(1..4)
        };
        if item
            .inline
            .iter()
            .chain(&item.keyed)
            .all(|(k, _)| *k != key)
        {
            item.add_ref(key, count);
        }
    }
    item
}

/// B+tree items: key and value.
type Items = Vec<(Key, Vec<u8>)>;

/// The B+tree items of one to four extents at ascending bytenrs.
fn random_items(rng: &mut ChaCha8Rng) -> (Vec<(u64, ExtentItem)>, Items) {
    let mut bytenr = wide(rng, 50);
    let mut extents = Vec::new();
    let mut items = Vec::new();
    for _ in 0..rng.gen_range(1..=4) {
        bytenr += 1 + wide(rng, 30);
        let item = random_extent(rng);
        items.extend(encode_extent(bytenr, &item).expect("encode extent"));
        extents.push((bytenr, item));
    }
    (extents, items)
}

// ------------------------------------------------------------- mutations

fn random_bytes(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// A byte-level mutation of an encoding; returns its number (0: none).
fn mutate_bytes(rng: &mut ChaCha8Rng, buf: &mut Vec<u8>) -> usize {
    let m = rng.gen_range(0..9);
    let len = buf.len();
    match m {
        0 => {}
        1 if len > 0 => {
            for _ in 0..rng.gen_range(1..=3) {
                let bit = rng.gen_range(0..len * 8);
                buf[bit / 8] ^= 1 << (bit % 8);
            }
        }
        2 => buf.truncate(rng.gen_range(0..len.max(1))),
        3 => {
            let n = rng.gen_range(1..16);
            buf.extend(random_bytes(rng, n));
        }
        4 if len > 0 => {
            // A byte that changes varint structure or a flag.
            let at = rng.gen_range(0..len);
            buf[at] = [0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF][rng.gen_range(0..6)];
        }
        5 if len > 0 => {
            // A longer (non-shortest) or overflowing varint.
            let at = rng.gen_range(0..len);
            let b = buf[at];
            let fill = if rng.gen_bool(0.5) { 0x80 } else { 0xFF };
            buf.splice(at..at, std::iter::repeat_n(fill, rng.gen_range(1..10)));
            if rng.gen_bool(0.5) {
                buf.insert(at, b | 0x80);
            }
        }
        6 if len > 1 => {
            // A count or length: a varint at a random place set to a
            // boundary value.
            let at = rng.gen_range(0..len);
            let v: u64 = [0, 1, 2, 127, 128, 1 << 32, u64::MAX][rng.gen_range(0..7)];
            let mut varint = Vec::new();
            let mut x = v;
            while x >= 0x80 {
                varint.push((x as u8) | 0x80);
                x >>= 7;
            }
            varint.push(x as u8);
            let end = (at + 1).min(len);
            buf.splice(at..end, varint);
        }
        7 if len > 1 => {
            // Splice a piece of the encoding into itself.
            let from = rng.gen_range(0..len);
            let to = rng.gen_range(0..len);
            let piece: Vec<u8> = buf[from..(from + rng.gen_range(1..16)).min(len)].to_vec();
            buf.splice(to..to, piece);
        }
        8 => {
            let n = rng.gen_range(0..48);
            *buf = random_bytes(rng, n);
        }
        _ => {}
    }
    m
}

// -------------------------------------------------------------- op records

#[test]
fn op_records_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(1);
    let mut t = Tally::default();
    for _ in 0..cases {
        let op = random_op(&mut rng);
        let mut rec = op_record(&op);
        if rng.gen_ratio(1, 10) {
            mutate_bytes(&mut rng, &mut rec);
            fuzz_op(&rec);
            continue;
        }
        let m = mutate_bytes(&mut rng, &mut rec);
        let decoded = heap::peak_of(|| op_round_trip(&rec));
        t.count("op", m, decoded, 1024, Some(&op));
    }
    println!("op records: {cases} cases: {t:?}");
    assert!(t.by_mutation[..9].iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 5 && t.errors > cases / 3);
}

// ------------------------------------------------------------- log records

fn random_record(rng: &mut ChaCha8Rng) -> Record {
    match rng.gen_range(0..6) {
        0 => Record::Op(random_op(rng)),
        1 => {
            let max = if rng.gen_ratio(1, 16) { 300 } else { 6 };
            let n = rng.gen_range(1..=max);
            Record::Submit {
                session: wide(rng, 64),
                request: wide(rng, 64),
                ops: (0..n).map(|_| random_op(rng)).collect(),
            }
        }
        2 => Record::Register {
            session: wide(rng, 64),
        },
        3 => {
            const CHARS: [char; 5] = ['a', 'Z', '-', 'é', '🦀'];
            let mut name = String::new();
            let target = rng.gen_range(1..=CONSUMER_NAME_BYTES_MAX);
            while name.len() < target {
                let c = CHARS[rng.gen_range(0..CHARS.len())];
                if name.len() + c.len_utf8() > CONSUMER_NAME_BYTES_MAX {
                    break;
                }
                name.push(c);
            }
            Record::Subscribe {
                consumer: wide(rng, 64),
                name,
                acked: wide(rng, 64),
            }
        }
        4 => Record::FreedAck {
            consumer: wide(rng, 64),
            generation: wide(rng, 64),
        },
        _ => Record::Unsubscribe {
            consumer: wide(rng, 64),
        },
    }
}

#[test]
fn log_records_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(5);
    let mut t = Tally::default();
    for _ in 0..cases {
        let record = random_record(&mut rng);
        let mut buf = Vec::new();
        encode_record(&record, &mut buf);
        if rng.gen_ratio(1, 10) {
            mutate_bytes(&mut rng, &mut buf);
            fuzz_record(&buf);
            continue;
        }
        let m = mutate_bytes(&mut rng, &mut buf);
        let decoded = heap::peak_of(|| record_round_trip(&buf));
        // A SUBMIT's ops: at most one per 3 bytes, each an `Op` in memory.
        let bound = 2 * (buf.len() / 3 + 1) * std::mem::size_of::<Op>() + 2 * buf.len() + 1024;
        t.count("record", m, decoded, bound, Some(&record));
    }
    println!("log records: {cases} cases: {t:?}");
    assert!(t.by_mutation[..9].iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 8 && t.errors > cases / 3);
}

// ----------------------------------------------------------- service items

fn random_service_item(rng: &mut ChaCha8Rng) -> (u8, Vec<u8>) {
    match rng.gen_range(0..4) {
        0 => {
            let n = rng.gen_range(0..=SESSION_REPLIES_KEPT_MAX);
            let mut request = wide(rng, 40);
            let replies = (0..n)
                .map(|_| {
                    request += 1 + wide(rng, 8);
                    SessionReply {
                        request,
                        lsn: wide(rng, 64),
                        ops: wide(rng, 32) as u32,
                    }
                })
                .collect();
            let s = SessionItem {
                last_use: wide(rng, 64),
                replies,
            };
            (SESSION_KEY, encode_session(&s))
        }
        1 => {
            let n = rng.gen_range(1..=190);
            let entries: Vec<FreedEntry> = (0..n)
                .map(|_| FreedEntry {
                    bytenr: wide(rng, 64),
                    num_bytes: wide(rng, 64),
                    kind: if rng.gen_bool(0.5) {
                        ExtentKind::Data
                    } else {
                        ExtentKind::Tree {
                            level: rng.gen_range(0..8),
                        }
                    },
                })
                .collect();
            let mut chunks = encode_freed_chunks(&entries);
            (FREED_KEY, chunks.swap_remove(0))
        }
        2 => {
            let len = rng.gen_range(1..=CONSUMER_NAME_BYTES_MAX);
            let name: String = (0..len).map(|_| rng.gen_range('a'..='z')).collect();
            let c = ConsumerItem {
                name,
                acked: wide(rng, 64),
            };
            (CONSUMER_KEY, encode_consumer(&c))
        }
        _ => {
            let m = MetaItem {
                next_session: wide(rng, 64),
                next_consumer: wide(rng, 64),
                use_clock: wide(rng, 64),
                freed_dropped_upto: wide(rng, 64),
            };
            (META_KEY, encode_meta(&m))
        }
    }
}

#[test]
fn service_items_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(6);
    let mut t = Tally::default();
    for _ in 0..cases {
        let (item_type, mut value) = random_service_item(&mut rng);
        if rng.gen_ratio(1, 10) {
            mutate_bytes(&mut rng, &mut value);
            let steer = SERVICE_ITEM_TYPES
                .iter()
                .position(|&t| t == item_type)
                .unwrap_or(0) as u8;
            let mut data = vec![steer];
            data.extend_from_slice(&value);
            fuzz_service(&data);
            continue;
        }
        let m = mutate_bytes(&mut rng, &mut value);
        value.truncate(refd_ioring::btree::VALUE_BYTES_MAX);
        let decoded = heap::peak_of(|| service_round_trip(item_type, &value));
        let bound = 16 * value.len() + 8192;
        t.count("service", m, decoded, bound, None);
    }
    println!("service items: {cases} cases: {t:?}");
    assert!(t.by_mutation[..9].iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 8 && t.errors > cases / 3);
}

// -------------------------------------------------------------- held heads

#[test]
fn held_heads_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(2);
    let mut t = Tally::default();
    for _ in 0..cases {
        let heads = random_heads(&mut rng);
        let mut stream = encode_held(&heads);
        if rng.gen_ratio(1, 10) {
            mutate_bytes(&mut rng, &mut stream);
            fuzz_held(&stream);
            continue;
        }
        let m = mutate_bytes(&mut rng, &mut stream);
        let decoded = heap::peak_of(|| held_round_trip(&stream));
        // Decoded heads and their re-encoding: a small multiple of the
        // stream, never sized by a count read from it.
        let bound = 64 * stream.len() + 4096;
        t.count("held", m, decoded, bound, Some(&heads));
    }
    println!("held heads: {cases} cases: {t:?}");
    assert!(t.by_mutation[..9].iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 8 && t.errors > cases / 3);
}

// ------------------------------------------------------------ extent items

const ITEM_TYPES: [u8; 10] = [
    0,
    167,
    168,
    169,
    170,
    TREE_BLOCK_REF_KEY,
    EXTENT_DATA_REF_KEY,
    SHARED_BLOCK_REF_KEY,
    SHARED_DATA_REF_KEY,
    240,
];

/// An item-level mutation of an extent's items; returns its number.
fn mutate_items(rng: &mut ChaCha8Rng, items: &mut Items) -> usize {
    let m = rng.gen_range(0..12);
    let n = items.len();
    let i = rng.gen_range(0..n);
    match m {
        0 => {}
        1..=3 => {
            // The value's bytes, as for op records.
            let mut v = std::mem::take(&mut items[i].1);
            while mutate_bytes(rng, &mut v) == 0 {}
            v.truncate(refd_ioring::btree::VALUE_BYTES_MAX);
            items[i].1 = v;
        }
        4 => items[i].0.item_type = ITEM_TYPES[rng.gen_range(0..ITEM_TYPES.len())],
        5 => {
            let k = &mut items[i].0;
            match rng.gen_range(0..3) {
                0 => k.offset = [0, 1, 7, 8, 255, 256, u64::MAX][rng.gen_range(0..7)],
                1 => k.offset ^= 1 << rng.gen_range(0..64),
                _ => k.objectid = k.objectid.wrapping_add(rng.gen_range(0..3)).wrapping_sub(1),
            }
        }
        6 => {
            items.remove(i);
        }
        7 => {
            let copy = items[i].clone();
            items.insert(i, copy);
        }
        8 if n > 1 => items.swap(i, (i + 1) % n),
        9 => {
            // A keyed backref of this extent, of any type and value size.
            let key = Key::new(
                items[i].0.objectid,
                ITEM_TYPES[rng.gen_range(5..9)],
                rng.gen_range(0..1 << 20),
            );
            let len = [0, 4, 28, 3, 29][rng.gen_range(0..5)];
            let value = random_bytes(rng, len);
            items.insert((i + 1).min(n), (key, value));
        }
        10 => {
            // Items of another extent placed before this one.
            let (_, other) = random_items(rng);
            let at = rng.gen_range(0..=n);
            items.splice(at..at, other);
        }
        _ => {
            let len = rng.gen_range(0..200);
            let mut data = random_bytes(rng, len);
            if let Some(s) = data.first_mut() {
                *s &= !1;
            }
            *items = items_from_bytes(&data);
        }
    }
    m
}

#[test]
fn extent_items_load_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(3);
    let mut t = Tally::default();
    for _ in 0..cases {
        let (extents, mut items) = random_items(&mut rng);
        if rng.gen_ratio(1, 10) {
            let mut data = vec![rng.gen::<u8>()];
            for (k, v) in &items {
                data.push(rng.gen_range(0..3));
                data.push(k.item_type);
                data.extend_from_slice(&k.offset.to_le_bytes());
                data.extend_from_slice(&(v.len() as u16).to_le_bytes());
                data.extend_from_slice(v);
            }
            mutate_bytes(&mut rng, &mut data);
            fuzz_items(&data);
            continue;
        }
        let m = mutate_items(&mut rng, &mut items);
        let input_bytes: usize = items.iter().map(|(_, v)| v.len() + 64).sum();
        let decoded = heap::peak_of(|| items_round_trip(&items));
        // The extents, the check's copies of them (a tree, `load_all`'s
        // tree, the re-encoded and the sorted items): a small multiple of
        // the input, never sized by a count read from it.
        let bound = 64 * input_bytes + 8192;
        t.count("item", m, decoded, bound, Some(&extents));
    }
    println!("extent items: {cases} cases: {t:?}");
    assert!(t.by_mutation.iter().all(|&n| n > cases / 40));
    assert!(t.ok > cases / 8 && t.errors > cases / 3);
}

/// Found by `extent_items_load_to_typed_errors_or_round_trip` (items of
/// another extent placed before an extent's items): the loader took keys
/// in any order, so items `(8192 EXTENT_ITEM)`, `(4096 EXTENT_ITEM)`,
/// `(8192 EXTENT_ITEM)` gave extents 8192, 4096 and 8192 again, and
/// `load_all` silently kept only the second 8192. A B+tree scan yields
/// ascending keys, but one through a corrupt internal node need not. Keys
/// out of order are now refused.
#[test]
fn regression_items_out_of_key_order_are_refused() {
    let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
    item.add_ref(RefKey::SharedData { parent: 1 << 20 }, 1);
    let mut other = item.clone();
    other.generation = 2;
    let mut items = encode_extent(8192, &item).expect("encode");
    items.extend(encode_extent(4096, &item).expect("encode"));
    items.extend(encode_extent(8192, &other).expect("encode"));
    assert!(matches!(
        items_round_trip(&items),
        Err(refd_durable::CodecError::Extent { bytenr: 4096, .. })
    ));
    // The same key twice is out of order too.
    let twice = [items[0].clone(), items[0].clone()];
    assert!(items_round_trip(&twice).is_err());
    assert!(items_round_trip(&items[..1]).is_ok());
}

#[test]
fn item_bytes_reach_the_loader() {
    let (mut rng, cases) = setup(4);
    let mut loaded = 0u64;
    for _ in 0..cases / 10 {
        // Extent items with a small valid head: flags byte 0, flags DATA,
        // generation, then random inline refs.
        let mut data = vec![0u8];
        for _ in 0..rng.gen_range(1..4) {
            data.push(1);
            data.push(168);
            data.extend_from_slice(&4096u64.to_le_bytes());
            let mut value = vec![0, 1, 5, 184];
            value.extend_from_slice(&rng.gen_range(1u64..4).to_le_bytes());
            value.extend_from_slice(&rng.gen_range(1u32..3).to_le_bytes());
            if rng.gen_bool(0.5) {
                let at = rng.gen_range(0..value.len());
                value[at] = rng.gen();
            }
            data.extend_from_slice(&(value.len() as u16).to_le_bytes());
            data.extend_from_slice(&value);
        }
        if let Ok(extents) = items_round_trip(&items_from_bytes(&data)) {
            loaded += extents.len() as u64;
        }
    }
    assert!(loaded > cases / 100, "{loaded}");
}

/// Writes seed inputs for the cargo-fuzz targets (valid encodings in each
/// target's input format) to `fuzz/corpus/<target>/`. Not part of the
/// normal run: `cargo test --release -p refd-durable --test fuzz_decoders
/// -- --ignored write_fuzz_seeds` (see `docs/fuzzing.md`).
#[test]
#[ignore = "writes files; run by hand to seed the fuzz corpora"]
fn write_fuzz_seeds() {
    let (mut rng, _) = setup(7);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, i: usize, data: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("corpus dir");
        std::fs::write(d.join(format!("seed-{i:03}")), data).expect("seed");
    };
    for i in 0..64 {
        write("op", i, &op_record(&random_op(&mut rng)));
        write("held", i, &encode_held(&random_heads(&mut rng)));
        let mut rec = Vec::new();
        encode_record(&random_record(&mut rng), &mut rec);
        write("record", i, &rec);
        let (item_type, value) = random_service_item(&mut rng);
        let mut data = vec![SERVICE_ITEM_TYPES
            .iter()
            .position(|&t| t == item_type)
            .unwrap_or(0) as u8];
        data.extend_from_slice(&value);
        write("service", i, &data);
        // Items in `items_from_bytes` form: objectid deltas from 1 MiB.
        let mut data = vec![0u8];
        let mut prev = 1u64 << 20;
        for k in 0..rng.gen_range(1..4u64) {
            let bytenr = (1 << 20) + 1 + k * 64 + rng.gen_range(0..32);
            for (key, value) in encode_extent(bytenr, &random_extent(&mut rng)).expect("encode") {
                data.push((key.objectid - prev) as u8);
                prev = key.objectid;
                data.push(key.item_type);
                data.extend_from_slice(&key.offset.to_le_bytes());
                data.extend_from_slice(&(value.len() as u16).to_le_bytes());
                data.extend_from_slice(&value);
            }
        }
        write("items", i, &data);
    }
}
