//! The on-device decoders and recovery facing images corrupted the way the
//! simulator's faults corrupt them (`docs/fuzzing.md`, "Corrupted
//! images"): a real image written by the durable engine (a few commits,
//! ops left in the log) gets one seeded corruption, then
//!
//! - every on-device decoder runs over the bytes it touched, through the
//!   contract checks of `refd_ioring::selftest` (the fuzz targets' checks:
//!   no panic, bounded heap, a typed error or a value that re-encodes to
//!   the same bytes): both superblock slots and `pick_newest`, every log
//!   batch place and every node place in the damaged range, the allocator's
//!   bitmap run;
//! - `DurableEngine::open` (strict), then the recovery commit and `verify`,
//!   must return a typed error or succeed: never panic.
//!
//! Corruptions (by `seed % 6`, nine in ten in a block the image uses): a bit flip at rest; a torn write (a
//! 512-byte-aligned prefix of the newer content over the older image's);
//! a lost write (a block, or a whole node, back to the older image's
//! content at the same address: a stale block that claims the right
//! address); a misdirected write (a block copied over another address); a
//! zeroed range; random bytes over a block.
//!
//! `REFD_CORRUPT_IMAGE_CASES` sets how many cases run (default 300, ~5 s);
//! `REFD_CORRUPT_IMAGE_SEED=<n>` reruns one.

use std::sync::{Arc, OnceLock};

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::btree::AllocInfo;
use refd_ioring::format::{pick_newest, FsId, NODE_BYTES, SUPERBLOCK_BYTES, SUPERBLOCK_SLOT_ADDRS};
use refd_ioring::selftest::{
    batch_round_trip, bitmap_round_trip, heap, node_round_trip, pick_newest_round_trip,
    superblock_round_trip, BitmapContext, NodeContext,
};
use refd_ioring::{LogConfig, SimConfig, SimStorage, BLOCK_BYTES};

#[global_allocator]
static METER: heap::Meter = heap::Meter;

const CASES_DEFAULT: u64 = 300;
const DEVICE_BYTES: u64 = 8 << 20;
const LOG_BYTES: u64 = 512 << 10;
const BATCH_BYTES_MAX: usize = 16 << 10;
const FS: FsId = FsId([9; 16]);
/// Most heap one decode and its contract check may hold, per input byte
/// (the checks copy the block and re-encode it; a node's items are at most
/// its bytes again), plus a constant.
const HEAP_PER_INPUT_BYTE: usize = 8;
const HEAP_CONSTANT_BYTES: usize = 1 << 20;
/// Log bytes given to a batch decode: a batch of this device is at most
/// `BATCH_BYTES_MAX`; the decoder must bound itself by its header.
const BATCH_INPUT_BYTES: usize = 4 * BATCH_BYTES_MAX;

fn options() -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: BATCH_BYTES_MAX,
            ..LogConfig::default()
        },
        ..OpenOptions::default()
    }
}

fn op(extent: u64, action: Action, objectid: u64) -> Op {
    let key = RefKey::ExtentData {
        root: 5,
        objectid,
        offset: 0,
    };
    Op::new(
        (1 << 30) + extent * (1 << 20),
        1 << 20,
        ExtentKind::Data,
        action,
        key,
        0,
    )
    .expect("valid op")
}

/// The older and the newer image of one device: the older after the first
/// commits, the newer after more commits and with ops left in the log (so
/// that many blocks differ between them: rewritten nodes, later batches).
fn images() -> &'static (Vec<u8>, Vec<u8>) {
    static IMAGES: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dev = Arc::new(SimStorage::new(SimConfig::new(DEVICE_BYTES, 7)).expect("sim"));
        let format = FormatOptions {
            log_bytes: Some(LOG_BYTES),
            fs_id: Some(FS),
        };
        DurableEngine::format(&dev, format).expect("format");
        let (e, _) = DurableEngine::open(Arc::clone(&dev), options()).expect("open");
        let mut objectid = 2;
        let mut phase = |extents: std::ops::Range<u64>, refs: u64, commits: u64| {
            for x in extents.clone() {
                e.add_durable(&op(x, Action::AddExtent, 1))
                    .expect("allocate");
            }
            for c in 0..commits {
                for i in 0..refs {
                    let x = extents.start + (i + c) % (extents.end - extents.start);
                    e.add_durable(&op(x, Action::AddRef, objectid))
                        .expect("add");
                    objectid += 1;
                }
                e.commit().expect("commit");
            }
        };
        phase(0..40, 60, 3);
        let older = dev.durable_image();
        phase(40..90, 80, 3);
        for i in 0..30 {
            e.add_durable(&op(i % 90, Action::AddRef, objectid + i))
                .expect("log only");
        }
        drop(e);
        (older, dev.durable_image())
    })
}

/// One corruption of `image` by its kind; the byte range it touched.
fn corrupt(
    kind: u64,
    g: &mut ChaCha8Rng,
    image: &mut [u8],
    older: &[u8],
) -> std::ops::Range<usize> {
    let block = BLOCK_BYTES;
    let blocks = image.len() / block;
    // Mostly where the newer image holds data (superblocks, log, live and
    // dead nodes, bitmap): most of the device is never written.
    let used = used_blocks();
    let at = if g.gen_ratio(9, 10) {
        used[g.gen_range(0..used.len())]
    } else {
        g.gen_range(0..blocks) * block
    };
    match kind {
        0 => {
            let i = at + g.gen_range(0..block);
            image[i] ^= 1 << g.gen_range(0..8);
            i..i + 1
        }
        1 => {
            // Torn: the newer content up to a 512-byte boundary, then the
            // older (the write did not finish).
            let cut = 512 * g.gen_range(1..(block / 512));
            image[at + cut..at + block].copy_from_slice(&older[at + cut..at + block]);
            at..at + block
        }
        2 => {
            // Lost: the older content of a block or a whole node.
            let len = if g.gen_bool(0.5) { NODE_BYTES } else { block };
            let end = (at + len).min(image.len());
            image[at..end].copy_from_slice(&older[at..end]);
            at..end
        }
        3 => {
            // Misdirected: another block's content lands here.
            let from = g.gen_range(0..blocks) * block;
            let src = image[from..from + block].to_vec();
            image[at..at + block].copy_from_slice(&src);
            at..at + block
        }
        4 => {
            let len = block * g.gen_range(1..=4);
            let end = (at + len).min(image.len());
            image[at..end].fill(0);
            at..end
        }
        _ => {
            g.fill(&mut image[at..at + block]);
            at..at + block
        }
    }
}

/// Offsets of the newer image's blocks that are not all zero.
fn used_blocks() -> &'static [usize] {
    static USED: OnceLock<Vec<usize>> = OnceLock::new();
    USED.get_or_init(|| {
        let (_, newer) = images();
        newer
            .chunks(BLOCK_BYTES)
            .enumerate()
            .filter(|(_, b)| b.iter().any(|&x| x != 0))
            .map(|(i, _)| i * BLOCK_BYTES)
            .collect()
    })
}

fn bounded<T>(what: &str, input_bytes: usize, f: impl FnOnce() -> T) -> T {
    let (out, peak) = heap::peak_of(f);
    let max = HEAP_PER_INPUT_BYTE * input_bytes + HEAP_CONSTANT_BYTES;
    assert!(
        peak <= max,
        "{what}: {peak} bytes of heap for {input_bytes} input bytes"
    );
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Every decoder over the damaged range (and the superblocks, always).
fn decode_damaged(image: &[u8], range: &std::ops::Range<usize>) {
    let slots = SUPERBLOCK_SLOT_ADDRS.map(|a| &image[a as usize..a as usize + SUPERBLOCK_BYTES]);
    for (slot, bytes) in slots.iter().enumerate() {
        let _ = bounded("superblock", SUPERBLOCK_BYTES, || {
            superblock_round_trip(bytes, SUPERBLOCK_SLOT_ADDRS[slot])
        });
    }
    let _ = bounded("pick_newest", 2 * SUPERBLOCK_BYTES, || {
        pick_newest_round_trip(slots[0], slots[1])
    });
    let Ok(sb) = pick_newest(slots[0], slots[1]).map(|c| c.superblock) else {
        return;
    };
    let (log_start, log_end) = (
        sb.log_start as usize,
        (sb.log_start + sb.log_bytes) as usize,
    );
    let block = BLOCK_BYTES;
    // Every place a batch or a node could start and overlap the damage.
    let first = range.start.saturating_sub(NODE_BYTES.max(BATCH_BYTES_MAX)) / block * block;
    for p in (first..range.end).step_by(block) {
        if (log_start..log_end).contains(&p) {
            let input = &image[p..(p + BATCH_INPUT_BYTES).min(log_end)];
            let physical = (p - log_start) as u64;
            // The logical offset the header claims, if it is this place.
            let claimed = u64_at(input, 48);
            let log_offset = if claimed % sb.log_bytes == physical {
                claimed
            } else {
                physical
            };
            let _ = bounded("log batch", input.len(), || {
                batch_round_trip(input, &FS, log_offset)
            });
        }
        let node_region = sb.node_region_start..sb.node_region_start + sb.node_region_bytes;
        if node_region.contains(&(p as u64)) && p + NODE_BYTES <= image.len() {
            let bytes = &image[p..p + NODE_BYTES];
            // The context a referrer would give, taken from the header so
            // that the checks behind it are reached.
            let ctx = NodeContext {
                fs_id: FS,
                addr: p as u64,
                generation: u64_at(bytes, 40),
                level: bytes[60],
                owner: u64_at(bytes, 48),
            };
            let _ = bounded("node", NODE_BYTES, || node_round_trip(bytes, &ctx));
        }
    }
    let info = AllocInfo {
        next_unallocated: sb.alloc_next_unallocated,
        bitmap_addr: sb.free_space_bitmap_addr,
        bitmap_bytes: sb.free_space_bitmap_bytes,
    };
    let at = info.bitmap_addr as usize;
    let len = info.bitmap_bytes as usize;
    if at != 0 && at + len <= image.len() && range.start < at + len && at < range.end {
        let ctx = BitmapContext {
            fs_id: FS,
            region_start: sb.node_region_start,
            region_bytes: sb.node_region_bytes,
            info,
            generation: sb.generation,
        };
        let _ = bounded("bitmap", len, || {
            bitmap_round_trip(&image[at..at + len], &ctx)
        });
    }
}

/// Strict open, the recovery commit and `verify`: a typed error or
/// success, never a panic. `true` if it recovered.
fn recover(image: Vec<u8>, seed: u64) -> bool {
    let dev =
        Arc::new(SimStorage::from_image(SimConfig::new(DEVICE_BYTES, seed), image).expect("image"));
    let Ok((e, _)) = DurableEngine::open(dev, options()) else {
        return false;
    };
    let recovered = e.commit().is_ok() && e.verify().is_ok();
    let _ = e.committed_extents().map(|t| t.len());
    recovered
}

fn run_case(seed: u64) -> bool {
    let (older, newer) = images();
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    let mut image = newer.clone();
    let range = corrupt(seed % 6, &mut g, &mut image, older);
    decode_damaged(&image, &range);
    recover(image, seed)
}

#[test]
fn decoders_and_recovery_on_corrupted_images() {
    let seeds = refd_ioring::test_support::case_seeds(
        "REFD_CORRUPT_IMAGE_SEED",
        "REFD_CORRUPT_IMAGE_CASES",
        CASES_DEFAULT,
    );
    let (older, newer) = images();
    let differ = older
        .chunks(BLOCK_BYTES)
        .zip(newer.chunks(BLOCK_BYTES))
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        differ > 50,
        "the two images share too much: {differ} blocks differ"
    );
    let mut recovered = [0u64; 6];
    let mut cases = [0u64; 6];
    for &seed in &seeds {
        cases[(seed % 6) as usize] += 1;
        recovered[(seed % 6) as usize] += u64::from(run_case(seed));
    }
    eprintln!(
        "{} cases ({differ} blocks differ between the images, {} used); recovered per kind (flip, torn, \
         lost, misdirected, zeroed, random): {recovered:?} of {cases:?}",
        seeds.len(),
        used_blocks().len()
    );
}
