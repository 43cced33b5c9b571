//! Crash test of the on-disk framing on the simulated device: a log is
//! appended batch by batch over the remains of an earlier lap, flushed at
//! random points, and the device crashes (lost, reordered and torn sectors).
//! Replay from the head must return every acknowledged (flushed) batch,
//! byte for byte, then stop at a typed error; it must never return a batch
//! whose content differs from what was written. The superblock written
//! alternately to its two slots must always yield the newest durable copy.
//!
//! This is also the reference for how the log and recovery are expected to
//! use `Storage`, `encode_batch`/`decode_batch` and `pick_newest`.

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use refd_ioring::format::{
    decode_batch, decode_batch_header, encode_batch, pick_newest, superblock_addr_for_generation,
    BatchId, FormatError, FsId, Layout, Superblock, SUPERBLOCK_BYTES, SUPERBLOCK_SLOT_ADDRS,
};
use refd_ioring::{CrashPolicy, Geometry, SimConfig, SimStorage, Storage};

const DEVICE_BYTES: u64 = 4 << 20;
const LOG_START: u64 = 8192;
const LOG_BYTES: u64 = 1 << 20;
const FS: FsId = FsId([9; 16]);

fn physical(log_offset: u64) -> u64 {
    LOG_START + log_offset % LOG_BYTES
}

fn superblock(geometry: Geometry, generation: u64, head: u64, head_lsn: u64) -> Superblock {
    let node_region_start = LOG_START + LOG_BYTES;
    Superblock {
        generation,
        log_head_offset: head,
        log_head_lsn: head_lsn,
        log_tail_offset: head,
        log_tail_lsn: head_lsn - 1,
        last_txn_id: generation,
        ..Superblock::empty(
            FS,
            geometry,
            Layout {
                log_start: LOG_START,
                log_bytes: LOG_BYTES,
                node_region_start,
                node_region_bytes: 2 << 20,
            },
        )
    }
}

fn write_superblock_durable(dev: &SimStorage, sb: &Superblock) {
    let block = sb.encode().expect("encode superblock");
    dev.write_durable(superblock_addr_for_generation(sb.generation), &block)
        .expect("write superblock");
}

struct Written {
    lsn: u64,
    log_offset: u64,
    records: Vec<Vec<u8>>,
}

fn append(dev: &SimStorage, gen: &mut ChaCha8Rng, lsn: u64, log_offset: u64) -> Written {
    let count = gen.gen_range(1..=6);
    let records: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let len = gen.gen_range(0..6000);
            (0..len)
                .map(|j| (lsn as usize * 31 + i * 7 + j) as u8)
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
    let buf =
        encode_batch(&BatchId::new(&FS, lsn, lsn * 10, log_offset), &refs).expect("encode batch");
    assert!(buf.len() as u64 <= LOG_BYTES);
    dev.write(physical(log_offset), &buf).expect("append");
    Written {
        lsn,
        log_offset,
        records,
    }
}

/// Replays from `head`, returning the decoded batches and the error that
/// ended the log.
fn replay(dev: &SimStorage, head: u64, expected_lsn: u64) -> (Vec<Written>, FormatError) {
    let mut out = Vec::new();
    let mut offset = head;
    let mut lsn = expected_lsn;
    loop {
        let mut first = vec![0u8; 4096];
        dev.read(physical(offset), &mut first)
            .expect("read head block");
        let header = match decode_batch_header(&first, &FS, offset) {
            Ok(h) => h,
            Err(e) => return (out, e),
        };
        let mut full = vec![0u8; header.batch_bytes as usize];
        dev.read(physical(offset), &mut full).expect("read batch");
        let view = match decode_batch(&full, &FS, offset) {
            Ok(v) => v,
            Err(e) => return (out, e),
        };
        assert_eq!(view.header.lsn, lsn, "LSNs must be consecutive");
        out.push(Written {
            lsn,
            log_offset: offset,
            records: view.records().map(<[u8]>::to_vec).collect(),
        });
        offset = view.header.next_log_offset();
        lsn += 1;
    }
}

#[test]
fn replay_after_crash_returns_every_acknowledged_batch() {
    let mut end_reasons = std::collections::BTreeMap::<&'static str, u32>::new();
    for seed in 0..150u64 {
        let mut config = SimConfig::new(DEVICE_BYTES, seed);
        config.torn_probability = 0.3;
        let dev = SimStorage::new(config).expect("sim");
        let geometry = dev.geometry();
        let mut gen = ChaCha8Rng::seed_from_u64(seed);

        // An earlier lap: batches at logical offsets 0.. filling the region.
        let mut lsn = 1u64;
        let mut offset = 0u64;
        loop {
            let w = append(&dev, &mut gen, lsn, offset);
            let next = offset + encoded_len(&w);
            lsn += 1;
            if next + (32 << 10) > LOG_BYTES {
                break;
            }
            offset = next;
        }
        dev.flush().expect("flush old lap");

        // The current lap starts at logical LOG_BYTES (physical LOG_START).
        let head = LOG_BYTES;
        let head_lsn = lsn;
        let mut sb_generation = 1u64;
        write_superblock_durable(&dev, &superblock(geometry, sb_generation, head, head_lsn));

        let mut written = Vec::new();
        let mut acked = 0usize;
        let mut offset = head;
        let batches = gen.gen_range(1..=20);
        for _ in 0..batches {
            let w = append(&dev, &mut gen, lsn, offset);
            offset += encoded_len(&w);
            lsn += 1;
            written.push(w);
            if gen.gen_ratio(1, 3) {
                dev.flush().expect("flush");
                acked = written.len();
                if gen.gen_bool(0.5) {
                    sb_generation += 1;
                    write_superblock_durable(
                        &dev,
                        &superblock(geometry, sb_generation, head, head_lsn),
                    );
                }
            }
        }
        // Sometimes a superblock write is in the volatile cache at the crash.
        let unflushed_sb = gen.gen_bool(0.5);
        if unflushed_sb {
            let sb = superblock(geometry, sb_generation + 1, head, head_lsn);
            dev.write(sb.addr(), &sb.encode().expect("encode"))
                .expect("write sb");
        }

        let policy = match seed % 5 {
            0 => CrashPolicy::LoseAll,
            1 => CrashPolicy::KeepAll,
            _ => CrashPolicy::Random,
        };
        let crashed = dev.crash_with(policy);

        // Superblock: the newest durable generation, or the unflushed one if
        // it survived intact; never an error.
        let mut slot0 = vec![0u8; SUPERBLOCK_BYTES];
        let mut slot1 = vec![0u8; SUPERBLOCK_BYTES];
        crashed
            .read(SUPERBLOCK_SLOT_ADDRS[0], &mut slot0)
            .expect("read sb0");
        crashed
            .read(SUPERBLOCK_SLOT_ADDRS[1], &mut slot1)
            .expect("read sb1");
        let choice = pick_newest(&slot0, &slot1).expect("a valid superblock");
        let picked = choice.superblock.generation;
        assert!(
            picked == sb_generation || (unflushed_sb && picked == sb_generation + 1),
            "seed {seed}: picked generation {picked}, durable {sb_generation}"
        );

        // Log: every acknowledged batch, byte for byte, then a clean end.
        let (replayed, end) = replay(&crashed, head, head_lsn);
        assert!(
            replayed.len() >= acked,
            "seed {seed}: replayed {} batches but {acked} were acknowledged (end: {end})",
            replayed.len()
        );
        for r in &replayed {
            let w = &written[(r.lsn - head_lsn) as usize];
            assert_eq!(r.log_offset, w.log_offset, "seed {seed} lsn {}", r.lsn);
            assert_eq!(r.records, w.records, "seed {seed} lsn {}", r.lsn);
        }
        let reason = match end {
            FormatError::BadMagic { .. } => "bad magic",
            FormatError::BadChecksum { .. } => "bad header checksum",
            FormatError::Torn { .. } => "torn",
            FormatError::Stale { .. } => "stale",
            other => panic!("seed {seed}: unexpected end of log: {other}"),
        };
        *end_reasons.entry(reason).or_default() += 1;
        if policy == CrashPolicy::KeepAll {
            assert_eq!(replayed.len(), written.len(), "seed {seed}");
        }
    }
    eprintln!("end of log over all seeds: {end_reasons:?}");
    // The scenario must exercise the interesting endings, not only one.
    for reason in ["stale", "torn"] {
        assert!(end_reasons.contains_key(reason), "{end_reasons:?}");
    }
}

fn encoded_len(w: &Written) -> u64 {
    let refs: Vec<&[u8]> = w.records.iter().map(Vec::as_slice).collect();
    refd_ioring::format::batch_bytes_for(&refs).expect("size") as u64
}
