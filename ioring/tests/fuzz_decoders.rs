//! Property tests of every on-device decoder of refd-ioring (B+tree nodes,
//! the allocator's bitmap run, superblocks and `pick_newest`, log batches)
//! on random and mutated
//! inputs: the cargo-fuzz targets of `fuzz/` (`docs/fuzzing.md`) run as
//! part of the normal test suite.
//!
//! Each test builds valid encodings from random values, mutates them (bit
//! flips, truncation, extension, byte edits, count and length field
//! edits, header field edits, splices, pure random bytes; most edits with
//! the checksums recomputed so that they reach the checks behind them)
//! and feeds the result to the checks of [`refd_ioring::selftest`]: no
//! panic, bounded allocation, and either a typed error or a value that
//! re-encodes to the same bytes. Unmutated and merely extended blocks must
//! decode to exactly the value that was encoded. A tenth of the cases go
//! through the cargo-fuzz entry points (`fuzz_node`, ...) instead.
//!
//! Seeded (`ChaCha8Rng`), so a failure is reproducible:
//! `REFD_FUZZ_SEED=<n>` changes the seed, `REFD_FUZZ_CASES=<n>` the
//! number of cases per decoder (never fewer than 100,000).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refd_ioring::btree::{
    BITMAP_BITS_PER_NODE, INTERNAL_CHILDREN_MAX, LEAF_ITEMS_MAX, LEAF_ITEM_OVERHEAD_BYTES,
    VALUE_BYTES_MAX,
};
use refd_ioring::format::{
    encode_batch, BatchId, FormatError, FsId, Superblock, LOG_BATCH_HEADER_BYTES, NODE_BYTES,
    NODE_HEADER_BYTES, NODE_ITEMS_BYTES, SUPERBLOCK_BYTES, SUPERBLOCK_SLOT_ADDRS,
};
use refd_ioring::selftest::*;
use refd_ioring::{BTreeError, Geometry, Key};

const CASES_MIN: u64 = 100_000;

#[global_allocator]
static METER: heap::Meter = heap::Meter;

/// Most heap a node decode and its round-trip check may hold: the node's
/// copies made by the check, plus the items (at most `LEAF_ITEMS_MAX`
/// entries and the node's bytes of values), twice.
const NODE_HEAP_BYTES_MAX: usize = 4 * NODE_BYTES + 2 * (LEAF_ITEMS_MAX * 48 + NODE_BYTES);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn setup(salt: u64) -> (ChaCha8Rng, u64) {
    let seed = env_u64("REFD_FUZZ_SEED").unwrap_or(0x5EED_10A1);
    let cases = env_u64("REFD_FUZZ_CASES")
        .unwrap_or(CASES_MIN)
        .max(CASES_MIN);
    (ChaCha8Rng::seed_from_u64(seed ^ salt), cases)
}

// ------------------------------------------------------------ mutations

/// Uniform below `2^k` for a random `k` in `1..bits` (small and large
/// numbers alike).
fn wide(rng: &mut ChaCha8Rng, bits: u32) -> u64 {
    let k = rng.gen_range(1..bits);
    rng.gen_range(0..1u64 << k)
}

/// A number that is often a boundary.
fn interesting_u64(rng: &mut ChaCha8Rng) -> u64 {
    const V: [u64; 14] = [
        0,
        1,
        2,
        7,
        8,
        255,
        4095,
        4096,
        16384,
        65535,
        1 << 20,
        u32::MAX as u64,
        u64::MAX - 4095,
        u64::MAX,
    ];
    if rng.gen_bool(0.7) {
        V[rng.gen_range(0..V.len())]
    } else {
        rng.gen::<u64>() >> rng.gen_range(0..64)
    }
}

fn flip_bits(rng: &mut ChaCha8Rng, buf: &mut [u8]) {
    if buf.is_empty() {
        return;
    }
    for _ in 0..rng.gen_range(1..=4) {
        let bit = rng.gen_range(0..buf.len() * 8);
        buf[bit / 8] ^= 1 << (bit % 8);
    }
}

fn random_bytes(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Writes the low `width` bytes of an interesting value at `at`.
fn edit_field(rng: &mut ChaCha8Rng, buf: &mut [u8], at: usize, width: usize) {
    let v = interesting_u64(rng).to_le_bytes();
    if at + width <= buf.len() {
        buf[at..at + width].copy_from_slice(&v[..width]);
    }
}

/// One of the generic edits on `buf[range]`: a byte set to an interesting
/// value, a random byte, an interesting 2/4/8-byte field, or a splice of
/// another part of the buffer.
fn edit_bytes(rng: &mut ChaCha8Rng, buf: &mut [u8], range: std::ops::Range<usize>) {
    let range = range.start.min(buf.len())..range.end.min(buf.len());
    if range.is_empty() {
        return;
    }
    let at = rng.gen_range(range.clone());
    match rng.gen_range(0..4) {
        0 => buf[at] = [0, 1, 0x7F, 0x80, 0xFF][rng.gen_range(0..5)],
        1 => buf[at] = rng.gen(),
        2 => {
            let width = [2, 4, 8][rng.gen_range(0..3)];
            edit_field(rng, buf, at, width.min(range.end - at));
        }
        _ => {
            let len = rng.gen_range(1..=64).min(range.end - at);
            let from = rng.gen_range(range.start..=range.end - len);
            buf.copy_within(from..from + len, at);
        }
    }
}

/// Steering byte plus bytes for a `fuzz_*` entry point.
fn with_steer(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![rng.gen::<u8>()];
    v.extend_from_slice(bytes);
    v
}

// ----------------------------------------------------------------- nodes

fn random_key(rng: &mut ChaCha8Rng) -> Key {
    Key::new(wide(rng, 64), rng.gen(), wide(rng, 64))
}

fn sorted_keys(rng: &mut ChaCha8Rng, n: usize) -> Vec<Key> {
    let mut keys: Vec<Key> = (0..n).map(|_| random_key(rng)).collect();
    keys.sort();
    keys.dedup();
    keys
}

fn random_leaf(rng: &mut ChaCha8Rng) -> NodeItems {
    let n = if rng.gen_ratio(1, 16) {
        rng.gen_range(1..=NODE_ITEMS_BYTES / LEAF_ITEM_OVERHEAD_BYTES)
    } else {
        rng.gen_range(1..=24)
    };
    let big = rng.gen_ratio(1, 8);
    let mut used = 0;
    let mut items = Vec::new();
    for key in sorted_keys(rng, n) {
        let len = if big {
            rng.gen_range(0..=VALUE_BYTES_MAX)
        } else {
            rng.gen_range(0..=40)
        };
        if used + LEAF_ITEM_OVERHEAD_BYTES + len > NODE_ITEMS_BYTES {
            break;
        }
        used += LEAF_ITEM_OVERHEAD_BYTES + len;
        items.push((key, random_bytes(rng, len)));
    }
    NodeItems::Leaf(items)
}

fn random_internal(rng: &mut ChaCha8Rng, generation: u64) -> NodeItems {
    let n = if rng.gen_ratio(1, 16) {
        rng.gen_range(1..=INTERNAL_CHILDREN_MAX)
    } else {
        rng.gen_range(1..=24)
    };
    NodeItems::Internal(
        sorted_keys(rng, n)
            .into_iter()
            .map(|key| ChildRef {
                key,
                addr: rng.gen_range(0..1u64 << 40) * 4096,
                generation: rng.gen_range(0..=generation),
            })
            .collect(),
    )
}

fn random_node(rng: &mut ChaCha8Rng) -> (NodeContext, NodeItems) {
    let mut ctx = NodeContext {
        fs_id: FUZZ_FS_ID,
        addr: if rng.gen_bool(0.5) {
            FUZZ_NODE_ADDR
        } else {
            rng.gen_range(0..1u64 << 40) * 4096
        },
        generation: wide(rng, 40),
        level: 0,
        owner: rng.gen_range(0..300),
    };
    let items = if rng.gen_bool(0.6) {
        random_leaf(rng)
    } else {
        ctx.level = rng.gen_range(1..=7);
        random_internal(rng, ctx.generation)
    };
    (ctx, items)
}

/// Header field offsets of a node (`docs/format.md`): version, fs id,
/// addr, generation, owner, item_count, level, reserved.
const NODE_FIELDS: [(usize, usize); 8] = [
    (12, 4),
    (16, 8),
    (32, 8),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 1),
    (61, 3),
];

#[derive(Debug, Default)]
struct Tally {
    by_mutation: [u64; 12],
    ok: u64,
    errors: u64,
    deep_errors: u64,
    heap_max: usize,
}

fn mutate_node(rng: &mut ChaCha8Rng, buf: &mut Vec<u8>, ctx: &mut NodeContext) -> usize {
    let m = rng.gen_range(0..12);
    match m {
        0 => {}
        1 => flip_bits(rng, buf),
        2 => buf.truncate(rng.gen_range(0..NODE_BYTES)),
        3 => {
            let n = rng.gen_range(1..5000);
            buf.extend(random_bytes(rng, n));
        }
        4 | 5 => {
            for _ in 0..rng.gen_range(1..=3) {
                let end = if rng.gen_bool(0.8) {
                    NODE_HEADER_BYTES + 600
                } else {
                    NODE_BYTES
                };
                edit_bytes(rng, buf, NODE_HEADER_BYTES..end);
            }
            reseal_node(buf);
        }
        6 => {
            // item_count.
            let v = interesting_u64(rng) as u32 % (NODE_ITEMS_BYTES as u32 + 2);
            buf[56..60].copy_from_slice(&v.to_le_bytes());
            reseal_node(buf);
        }
        7 => {
            let (at, width) = NODE_FIELDS[rng.gen_range(0..NODE_FIELDS.len())];
            edit_field(rng, buf, at, width);
            reseal_node(buf);
        }
        8 => {
            let keep = buf[..NODE_HEADER_BYTES].to_vec();
            *buf = random_bytes(rng, NODE_BYTES);
            if rng.gen_bool(0.5) {
                buf[..NODE_HEADER_BYTES].copy_from_slice(&keep);
                reseal_node(buf);
            }
        }
        9 => {
            // What the referrer expects differs from the node.
            match rng.gen_range(0..4) {
                0 => ctx.generation = ctx.generation.wrapping_add(1),
                1 => ctx.level = rng.gen_range(0..=8),
                2 => ctx.owner ^= 1,
                _ => ctx.addr += 4096,
            }
        }
        10 => {
            let at = rng.gen_range(0..buf.len());
            buf[at] = rng.gen();
        }
        _ => {
            // Drop or duplicate a byte in the items, shifting the rest.
            let at = rng.gen_range(NODE_HEADER_BYTES..NODE_HEADER_BYTES + 200);
            if rng.gen_bool(0.5) {
                buf.remove(at);
                buf.push(0);
            } else {
                buf.insert(at, buf[at]);
                buf.pop();
            }
            reseal_node(buf);
        }
    }
    m
}

#[test]
fn nodes_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(1);
    let mut t = Tally::default();
    for _ in 0..cases {
        let (mut ctx, items) = random_node(&mut rng);
        let mut buf = encode_node(&ctx, &items);
        if rng.gen_ratio(1, 10) {
            mutate_node(&mut rng, &mut buf, &mut ctx);
            fuzz_node(&with_steer(&mut rng, &buf));
            continue;
        }
        let m = mutate_node(&mut rng, &mut buf, &mut ctx);
        t.by_mutation[m] += 1;
        let (decoded, heap_bytes) = heap::peak_of(|| node_round_trip(&buf, &ctx));
        assert!(
            heap_bytes <= NODE_HEAP_BYTES_MAX,
            "node decode held {heap_bytes} heap bytes (mutation {m}): {:?}",
            decoded.as_ref().map(|_| ()).map_err(|e| e.to_string())
        );
        t.heap_max = t.heap_max.max(heap_bytes);
        match decoded {
            Ok(back) => {
                t.ok += 1;
                if m == 0 || m == 3 {
                    assert_eq!(back, items);
                }
            }
            Err(e) => {
                assert!(m != 0 && m != 3, "valid node refused: {e}");
                t.errors += 1;
                t.deep_errors += u64::from(matches!(e, BTreeError::Corrupt { .. }));
            }
        }
    }
    println!("nodes: {cases} cases: {t:?}");
    assert!(t.by_mutation.iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 5 && t.errors > cases / 3 && t.deep_errors > cases / 10);
}

/// Found by this test (mutation 6, a forged `item_count`): a leaf whose
/// header claims 13490 items made the decoder reserve room for all of
/// them (647 KB for a 16 KiB node) before finding that they run past the
/// node. The count is now bounded by `LEAF_ITEMS_MAX` first.
#[test]
fn regression_forged_leaf_item_count_allocates_nothing_large() {
    let ctx = NodeContext {
        fs_id: FUZZ_FS_ID,
        addr: FUZZ_NODE_ADDR,
        generation: 6,
        level: 0,
        owner: FUZZ_OWNER,
    };
    let items = NodeItems::Leaf(vec![(Key::new(1, 2, 3), vec![9; 100])]);
    let mut buf = encode_node(&ctx, &items);
    buf[56..60].copy_from_slice(&13490u32.to_le_bytes());
    reseal_node(&mut buf);
    let (decoded, heap_bytes) = heap::peak_of(|| node_round_trip(&buf, &ctx));
    assert!(matches!(decoded, Err(BTreeError::Corrupt { .. })));
    assert!(heap_bytes < 4 * NODE_BYTES, "{heap_bytes} heap bytes");
}

#[test]
fn node_steering_reaches_the_items() {
    let (mut rng, cases) = setup(2);
    for _ in 0..cases / 10 {
        let n = rng.gen_range(0..600);
        let mut data = random_bytes(&mut rng, n);
        if let Some(s) = data.first_mut() {
            *s |= 2;
        }
        fuzz_node(&data);
    }
}

// ------------------------------------------------------------ bitmap runs

/// A region, a committed bitmap run inside it and random allocated slots
/// below the high-water mark (the run's own slots among them), encoded.
fn random_bitmap(rng: &mut ChaCha8Rng) -> (BitmapContext, Vec<u8>, u64) {
    let nodes = if rng.gen_ratio(1, 1024) {
        rng.gen_range(1..3 * BITMAP_BITS_PER_NODE)
    } else {
        rng.gen_range(1..600)
    };
    let run_nodes = nodes.div_ceil(BITMAP_BITS_PER_NODE);
    let node = NODE_BYTES as u64;
    let region_start = rng.gen_range(2..1u64 << 20) * 4096;
    let hwm = rng.gen_range(run_nodes.min(nodes)..=nodes);
    let first = rng.gen_range(0..=hwm.saturating_sub(run_nodes));
    let density = rng.gen_range(0..=256u32);
    let seed: u64 = rng.gen();
    let ctx = BitmapContext {
        fs_id: FUZZ_FS_ID,
        region_start,
        region_bytes: nodes * node,
        info: refd_ioring::AllocInfo {
            next_unallocated: region_start + hwm * node,
            bitmap_addr: region_start + first * node,
            bitmap_bytes: run_nodes * node,
        },
        generation: wide(rng, 40),
    };
    // A cheap hash of the slot decides, so that the encoder and the count
    // agree without a slot list.
    let allocated = |slot: u64| {
        let h = (slot ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56;
        slot < hwm && ((h as u32) < density || (first..first + run_nodes).contains(&slot))
    };
    let buf = encode_bitmap(&ctx, allocated);
    let count = (0..hwm).filter(|&s| allocated(s)).count() as u64;
    (ctx, buf, count)
}

fn mutate_bitmap(rng: &mut ChaCha8Rng, buf: &mut Vec<u8>, ctx: &mut BitmapContext) -> usize {
    let m = rng.gen_range(0..9);
    let node = NODE_BYTES as u64;
    let reseal_all = |buf: &mut Vec<u8>| {
        for chunk in buf.chunks_mut(NODE_BYTES) {
            reseal_node(chunk);
        }
    };
    match m {
        0 => {}
        1 => flip_bits(rng, buf),
        2 => buf.truncate(rng.gen_range(0..buf.len())),
        3 | 4 => {
            // Bits of the bitmap, resealed: slots above the high-water
            // mark, the run's own slots cleared, bytes past the bitmap.
            let k = rng.gen_range(0..buf.len() / NODE_BYTES);
            let at = k * NODE_BYTES;
            edit_bytes(rng, buf, at + NODE_HEADER_BYTES..at + NODE_BYTES);
            reseal_all(buf);
        }
        5 => {
            let (at, width) = NODE_FIELDS[rng.gen_range(0..NODE_FIELDS.len())];
            let k = rng.gen_range(0..buf.len() / NODE_BYTES);
            edit_field(rng, buf, k * NODE_BYTES + at, width);
            reseal_all(buf);
        }
        6 => {
            // The superblock's allocator fields disagree with the run.
            let info = &mut ctx.info;
            match rng.gen_range(0..4) {
                0 => info.next_unallocated = info.next_unallocated.wrapping_sub(node),
                1 => info.next_unallocated += node,
                2 => info.bitmap_addr = info.bitmap_addr.wrapping_add(node),
                _ => info.bitmap_bytes = interesting_u64(rng),
            }
        }
        7 => ctx.generation = ctx.generation.wrapping_add(1),
        _ => {
            ctx.region_bytes = match rng.gen_range(0..3) {
                0 => ctx.region_bytes + node,
                1 => ctx.region_bytes.saturating_sub(node),
                _ => interesting_u64(rng),
            }
        }
    }
    m
}

#[test]
fn bitmap_runs_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(7);
    let mut t = Tally::default();
    for _ in 0..cases {
        let (mut ctx, mut buf, count) = random_bitmap(&mut rng);
        if rng.gen_ratio(1, 10) {
            mutate_bitmap(&mut rng, &mut buf, &mut ctx);
            let mut data = random_bytes(&mut rng, 8);
            if !rng.gen_ratio(1, 16) {
                data[0] &= !4; // a two-node run takes 130560 slots
            }
            data.extend_from_slice(&buf[..buf.len().min(2 * NODE_BYTES)]);
            fuzz_bitmap(&data);
            continue;
        }
        let m = mutate_bitmap(&mut rng, &mut buf, &mut ctx);
        t.by_mutation[m] += 1;
        let (decoded, heap_bytes) = heap::peak_of(|| bitmap_round_trip(&buf, &ctx));
        // The run read and its re-encoding, and a bit per slot of the
        // region (whose size comes from the superblock, not the run).
        let slots = ctx.region_bytes.min(1 << 40) / NODE_BYTES as u64;
        let bound = 4 * ctx.info.bitmap_bytes.min(1 << 30) as usize + slots as usize / 4 + 65536;
        assert!(
            heap_bytes <= bound,
            "bitmap load held {heap_bytes} > {bound}"
        );
        t.heap_max = t.heap_max.max(heap_bytes);
        match decoded {
            Ok(n) => {
                t.ok += 1;
                if m == 0 {
                    assert_eq!(n, count);
                }
            }
            Err(e) => {
                assert_ne!(m, 0, "valid bitmap refused: {e}");
                t.errors += 1;
                t.deep_errors += u64::from(matches!(e, BTreeError::Corrupt { .. }));
            }
        }
    }
    println!("bitmap runs: {cases} cases: {t:?}");
    assert!(t.by_mutation[..9].iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 8 && t.errors > cases / 3 && t.deep_errors > cases / 20);
}

// ----------------------------------------------------------- superblocks

/// A random superblock that passes `validate`: random geometry, log and
/// node regions, log positions, root and allocator.
fn random_superblock(rng: &mut ChaCha8Rng) -> Superblock {
    let blocks = |rng: &mut ChaCha8Rng, max: u64| rng.gen_range(1..=max) * 4096;
    let logical = [512u32, 1024, 2048, 4096][rng.gen_range(0..4)];
    let log_start = 8192 + blocks(rng, 16) - 4096;
    let log_bytes = blocks(rng, 4096);
    let node_region_start = log_start + log_bytes + blocks(rng, 4) - 4096;
    let nodes = rng.gen_range(0..=4096u64);
    let node_region_bytes = nodes * NODE_BYTES as u64;
    let size = node_region_start + node_region_bytes + blocks(rng, 64) - 4096;
    let generation = 1 + wide(rng, 62);
    let head = rng.gen_range(0..1u64 << 40) * 4096;
    let tail = head + rng.gen_range(0..=log_bytes / 4096) * 4096;
    let head_lsn = rng.gen_range(1..1u64 << 50);
    let mut sb = Superblock {
        generation,
        flags: rng.gen_range(0..2),
        log_head_offset: head,
        log_head_lsn: head_lsn,
        log_tail_offset: tail,
        log_tail_lsn: head_lsn - 1 + rng.gen_range(0..100),
        last_txn_id: rng.gen_range(0..=refd_ioring::format::SUPERBLOCK_COUNTER_MAX),
        log_head_chain: rng.gen(),
        ..Superblock::empty(
            FsId(rng.gen()),
            Geometry {
                size_bytes: size,
                logical_block_bytes: logical,
                physical_block_bytes: logical << rng.gen_range(0..3),
            },
            refd_ioring::format::Layout {
                log_start,
                log_bytes,
                node_region_start,
                node_region_bytes,
            },
        )
    };
    if nodes > 0 {
        let hwm = rng.gen_range(0..=nodes);
        sb.alloc_next_unallocated = node_region_start + hwm * NODE_BYTES as u64;
        if hwm > 1 {
            sb.tree_root_addr = node_region_start + rng.gen_range(0..hwm) * NODE_BYTES as u64;
            sb.tree_root_generation = rng.gen_range(0..=generation);
            sb.tree_root_level = rng.gen_range(0..=7);
            sb.free_space_bitmap_addr = node_region_start;
            sb.free_space_bitmap_bytes = NODE_BYTES as u64;
        }
    }
    if rng.gen_bool(0.3) {
        let first = rng.gen_range(1..=head_lsn);
        sb.recovery = refd_ioring::format::RecoveryRecord {
            generation: rng.gen_range(1..=generation),
            mode: rng.gen_range(1..=2),
            dropped_batches: rng.gen_range(1..1000),
            dropped_first_lsn: first,
            dropped_last_lsn: first + rng.gen_range(0..1000),
            dropped_ops: rng.gen_range(0..1 << 20),
        };
    }
    sb.validate().expect("generated superblock is valid");
    sb
}

fn mutate_superblock(rng: &mut ChaCha8Rng, buf: &mut Vec<u8>) -> usize {
    let m = rng.gen_range(0..8);
    match m {
        0 => {}
        1 => flip_bits(rng, buf),
        2 => buf.truncate(rng.gen_range(0..SUPERBLOCK_BYTES)),
        3 => {
            let n = rng.gen_range(1..5000);
            buf.extend(random_bytes(rng, n));
        }
        4 | 5 => {
            // A field (8-byte aligned words from the generation to the
            // last transaction id, or any 4-byte word) set to a boundary
            // value, then resealed: reaches `validate`.
            let (at, width) = if rng.gen_bool(0.7) {
                (rng.gen_range(4..25) * 8, 8)
            } else {
                (rng.gen_range(3..50) * 4, 4)
            };
            edit_field(rng, buf, at, width);
            reseal_superblock(buf);
        }
        6 => {
            edit_bytes(rng, buf, 12..SUPERBLOCK_BYTES);
            reseal_superblock(buf);
        }
        _ => {
            *buf = random_bytes(rng, SUPERBLOCK_BYTES);
            if rng.gen_bool(0.5) {
                buf[..8].copy_from_slice(b"REFDSB01");
                reseal_superblock(buf);
            }
        }
    }
    m
}

#[test]
fn superblocks_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(3);
    let mut t = Tally::default();
    for _ in 0..cases {
        let sb = random_superblock(&mut rng);
        let mut buf = sb.encode().expect("encode").to_vec();
        if rng.gen_ratio(1, 10) {
            mutate_superblock(&mut rng, &mut buf);
            fuzz_superblock(&with_steer(&mut rng, &buf));
            continue;
        }
        let m = mutate_superblock(&mut rng, &mut buf);
        t.by_mutation[m] += 1;
        let slot = if rng.gen_ratio(1, 20) {
            (sb.addr() + 4096) % 8192
        } else {
            sb.addr()
        };
        let (decoded, heap_bytes) = heap::peak_of(|| superblock_round_trip(&buf, slot));
        assert!(
            heap_bytes <= 4 * SUPERBLOCK_BYTES,
            "superblock decode held {heap_bytes}"
        );
        t.heap_max = t.heap_max.max(heap_bytes);
        match decoded {
            Ok(back) => {
                t.ok += 1;
                if m == 0 || m == 3 {
                    assert_eq!(back, sb);
                }
            }
            Err(e) => {
                assert!(
                    m != 0 && m != 3 || slot != sb.addr(),
                    "valid superblock refused: {e}"
                );
                t.errors += 1;
                t.deep_errors += u64::from(matches!(e, FormatError::Invalid { .. }));
            }
        }
    }
    println!("superblocks: {cases} cases: {t:?}");
    assert!(t.by_mutation.iter().take(8).all(|&n| n > cases / 20));
    assert!(t.ok > cases / 5 && t.errors > cases / 3 && t.deep_errors > cases / 10);
}

#[test]
fn pick_newest_agrees_with_each_copy() {
    let (mut rng, cases) = setup(4);
    let mut picked = [0u64; 2];
    for _ in 0..cases / 4 {
        let mut a = random_superblock(&mut rng);
        let mut b = if rng.gen_bool(0.5) {
            Superblock {
                generation: a.generation + 1,
                ..a.clone()
            }
        } else {
            random_superblock(&mut rng)
        };
        if a.generation % 2 == 1 {
            std::mem::swap(&mut a, &mut b);
        }
        let mut copies = [a, b].map(|sb| {
            sb.encode()
                .map(|b| b.to_vec())
                .unwrap_or_else(|_| vec![0u8; SUPERBLOCK_BYTES])
        });
        for c in copies.iter_mut() {
            if rng.gen_bool(0.5) {
                mutate_superblock(&mut rng, c);
            }
        }
        if let Ok(choice) = pick_newest_round_trip(&copies[0], &copies[1]) {
            picked[choice.slot] += 1;
        }
    }
    println!("pick_newest: slots chosen {picked:?}");
    assert!(picked.iter().all(|&n| n > cases / 100));
    // Slots that are not superblock slots are refused, never a panic.
    let sb = sample_superblock(2).encode().expect("encode");
    assert!(superblock_round_trip(&sb, SUPERBLOCK_SLOT_ADDRS[0]).is_ok());
    assert!(matches!(
        superblock_round_trip(&sb, 12288),
        Err(FormatError::Invalid {
            field: "expected_addr",
            ..
        })
    ));
}

// ----------------------------------------------------------- log batches

fn random_records(rng: &mut ChaCha8Rng) -> Vec<Vec<u8>> {
    let max = if rng.gen_ratio(1, 8) { 300 } else { 12 };
    let n = rng.gen_range(0..=max);
    (0..n)
        .map(|_| {
            let len = match rng.gen_range(0..16) {
                0 => rng.gen_range(100..6_000),
                1 => rng.gen_range(120..140),
                _ => rng.gen_range(0..40),
            };
            random_bytes(rng, len)
        })
        .collect()
}

/// Header field offsets of a batch (`docs/format.md`): version, fs id,
/// lsn, txn id, log offset, batch_bytes, payload_bytes, record_count,
/// payload_crc, reserved.
const BATCH_FIELDS: [(usize, usize); 10] = [
    (12, 4),
    (16, 8),
    (32, 8),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 4),
    (68, 4),
    (72, 8),
];

fn mutate_batch(rng: &mut ChaCha8Rng, buf: &mut Vec<u8>, payload_bytes: usize) -> usize {
    let m = rng.gen_range(0..10);
    let payload = LOG_BATCH_HEADER_BYTES..LOG_BATCH_HEADER_BYTES + payload_bytes;
    match m {
        0 => {}
        1 => flip_bits(rng, buf),
        2 => buf.truncate(rng.gen_range(0..buf.len())),
        3 => {
            let n = rng.gen_range(1..5000);
            buf.extend(random_bytes(rng, n));
        }
        4 => {
            // batch_bytes, payload_bytes or record_count, resealed.
            let at = [56, 60, 64][rng.gen_range(0..3)];
            let v = match rng.gen_range(0..3) {
                0 => interesting_u64(rng) as u32,
                1 => rng.gen_range(0..buf.len() as u32 + 8192),
                _ => {
                    let old = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
                    old.wrapping_add(rng.gen_range(0..9)).wrapping_sub(4)
                }
            };
            buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
            reseal_batch(buf);
        }
        5 | 6 => {
            // Payload edits (record lengths, bodies) with both checksums
            // recomputed: reaches the record framing.
            edit_bytes(rng, buf, payload);
            reseal_batch(buf);
        }
        7 => {
            let (at, width) = BATCH_FIELDS[rng.gen_range(0..BATCH_FIELDS.len())];
            edit_field(rng, buf, at, width);
            reseal_batch(buf);
        }
        8 => {
            // Non-zero padding, resealed: still a valid batch, not a
            // canonical one.
            let end = buf.len();
            edit_bytes(rng, buf, payload.end..end);
            reseal_batch(buf);
        }
        _ => {
            let n = rng.gen_range(0..3 * 4096);
            *buf = random_bytes(rng, n);
            if rng.gen_bool(0.5) {
                reseal_batch(buf);
            }
        }
    }
    m
}

#[test]
fn log_batches_decode_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(5);
    let mut t = Tally::default();
    for _ in 0..cases {
        let records = random_records(&mut rng);
        let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let log_offset = rng.gen_range(0..1u64 << 40) * 4096;
        let (lsn, txn_id) = (rng.gen(), rng.gen());
        let mut buf = encode_batch(&BatchId::new(&FUZZ_FS_ID, lsn, txn_id, log_offset), &refs)
            .expect("encode")
            .to_vec();
        let payload_bytes = u32::from_le_bytes(buf[60..64].try_into().expect("4 bytes")) as usize;
        if rng.gen_ratio(1, 10) {
            mutate_batch(&mut rng, &mut buf, payload_bytes);
            fuzz_log_batch(&with_steer(&mut rng, &buf));
            continue;
        }
        let m = mutate_batch(&mut rng, &mut buf, payload_bytes);
        t.by_mutation[m] += 1;
        let expected_offset = if rng.gen_ratio(1, 20) {
            log_offset ^ 4096
        } else {
            log_offset
        };
        let (decoded, heap_bytes) =
            heap::peak_of(|| batch_round_trip(&buf, &FUZZ_FS_ID, expected_offset));
        // The decoder borrows; the check holds the records' slices and one
        // re-encoded batch.
        let bound = 2 * buf.len() + 64 * 1024;
        assert!(
            heap_bytes <= bound,
            "batch decode held {heap_bytes} > {bound}"
        );
        t.heap_max = t.heap_max.max(heap_bytes);
        match decoded {
            Ok(h) => {
                t.ok += 1;
                if (m == 0 || m == 3) && expected_offset == log_offset {
                    assert_eq!(
                        (h.lsn, h.txn_id, h.record_count),
                        (lsn, txn_id, refs.len() as u32)
                    );
                }
            }
            Err(e) => {
                assert!(
                    m != 0 && m != 3 || expected_offset != log_offset,
                    "valid batch refused: {e}"
                );
                t.errors += 1;
                t.deep_errors += u64::from(matches!(e, FormatError::Invalid { .. }));
            }
        }
    }
    println!("log batches: {cases} cases: {t:?}");
    assert!(t.by_mutation.iter().take(10).all(|&n| n > cases / 20));
    assert!(t.ok > cases / 5 && t.errors > cases / 3 && t.deep_errors > cases / 20);
}

#[test]
fn log_batch_steering_reaches_the_framing() {
    let (mut rng, cases) = setup(6);
    for _ in 0..cases / 10 {
        let n = rng.gen_range(0..300);
        let mut data = random_bytes(&mut rng, n);
        if let Some(s) = data.first_mut() {
            *s = (*s & !3) | rng.gen_range(1..4);
        }
        fuzz_log_batch(&data);
        fuzz_superblock(&data);
    }
}

/// Writes seed inputs for the cargo-fuzz targets (valid blocks in each
/// target's input format, see `selftest::fuzz_*`) to
/// `fuzz/corpus/<target>/`. Not part of the normal run: `cargo test
/// --release -p refd-ioring --test fuzz_decoders -- --ignored
/// write_fuzz_seeds` (see `docs/fuzzing.md`).
#[test]
#[ignore = "writes files; run by hand to seed the fuzz corpora"]
fn write_fuzz_seeds() {
    let (mut rng, _) = setup(7);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, i: usize, steer: u8, data: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("corpus dir");
        let mut v = vec![steer];
        v.extend_from_slice(data);
        std::fs::write(d.join(format!("seed-{i:03}")), v).expect("seed");
    };
    for i in 0..32 {
        // Raw mode (steer bit 1 clear), the expected level in bits 2..5.
        let (mut ctx, items) = random_node(&mut rng);
        ctx.fs_id = FUZZ_FS_ID;
        ctx.addr = FUZZ_NODE_ADDR;
        write("node", i, ctx.level << 2, &encode_node(&ctx, &items));
        // One raw copy at slot 0 (generation even), or a pair.
        let mut sb = random_superblock(&mut rng);
        sb.generation = (sb.generation + 1) & !1;
        let copy = sb.encode().expect("encode");
        if i % 2 == 0 {
            write("superblock", i, 0, &copy);
        } else {
            let next = Superblock {
                generation: sb.generation + 1,
                ..sb.clone()
            };
            let mut pair = copy.to_vec();
            pair.extend_from_slice(&next.encode().expect("encode"));
            write("superblock", i, 1, &pair);
        }
        // Raw mode at the first expected offset (0).
        let records = random_records(&mut rng);
        let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let batch = encode_batch(&BatchId::new(&FUZZ_FS_ID, 1, 1, 0), &refs).expect("encode");
        write("log_batch", i, 0, &batch);
        // Wrapped mode (steer bit 0) with the run's slots marked (bit 1):
        // region nodes, high-water mark, run slot, generation, bitmap.
        let nodes = rng.gen_range(1..2000u16);
        let hwm = rng.gen_range(1..=nodes);
        let first = rng.gen_range(0..hwm);
        let mut data = Vec::new();
        for v in [nodes - 1, hwm, first] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        data.push(rng.gen());
        data.extend(random_bytes(&mut rng, usize::from(hwm / 8)));
        write("bitmap", i, 3, &data);
    }
}
