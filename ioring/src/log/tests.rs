//! Unit tests of the log: ring wrap, bounds, back-pressure, trim, failure
//! latch and replay edge cases, on [`SimStorage`].

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::format::{FsId, Layout, Superblock, NODE_BYTES};
use crate::{CrashPolicy, FaultPlan, Geometry, IoFailure, SimConfig, SimStorage, Storage};
use crate::{IoOp, StorageError};

const FS: FsId = FsId([0x5A; 16]);
const LOG_START: u64 = 8192;

fn superblock(geometry: Geometry, log_bytes: u64, generation: u64, b: LogBounds) -> Superblock {
    let node_region_start = LOG_START + log_bytes;
    let mut sb = Superblock {
        generation,
        last_txn_id: generation,
        ..Superblock::empty(
            FS,
            geometry,
            Layout {
                log_start: LOG_START,
                log_bytes,
                node_region_start,
                node_region_bytes: NODE_BYTES as u64,
            },
        )
    };
    b.apply_to(&mut sb);
    sb
}

fn sim(log_bytes: u64, seed: u64) -> Arc<SimStorage> {
    let size = LOG_START + log_bytes + NODE_BYTES as u64;
    Arc::new(SimStorage::new(SimConfig::new(size, seed)).expect("sim"))
}

fn open_log<S: Storage>(storage: S, sb: &Superblock, config: LogConfig) -> (RefLog<S>, Replay) {
    let r = replay(&storage, sb).expect("replay");
    let log = RefLog::open(storage, sb, &r, config).expect("open");
    (log, r)
}

fn fresh(log_bytes: u64, config: LogConfig) -> (RefLog<Arc<SimStorage>>, Superblock) {
    let dev = sim(log_bytes, 1);
    let sb = superblock(dev.geometry(), log_bytes, 1, LogBounds::empty());
    let (log, r) = open_log(dev, &sb, config);
    assert_eq!(r.record_count(), 0);
    assert_eq!(
        r.end(),
        LogPosition {
            lsn: Lsn(1),
            offset: 0
        }
    );
    (log, sb)
}

fn record(id: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|i| (id as usize * 131 + i * 7) as u8)
        .collect();
    let n = len.min(8);
    v[..n].copy_from_slice(&id.to_le_bytes()[..n]);
    v
}

/// Every record of `r`, read from `storage`: (LSN, txn_id, bytes).
fn records_of<S: Storage + ?Sized>(r: &Replay, storage: &S) -> Vec<(Lsn, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stream = r.stream(storage);
    while let Some(x) = stream.next_record().expect("read the replayed records") {
        out.push((x.lsn, x.txn_id, x.data.to_vec()));
    }
    assert_eq!(out.len(), r.record_count());
    out
}

fn replayed<S: Storage + ?Sized>(r: &Replay, storage: &S) -> Vec<(Lsn, Vec<u8>)> {
    records_of(r, storage)
        .into_iter()
        .map(|(lsn, _, data)| (lsn, data))
        .collect()
}

/// Writes the superblock of a checkpoint covering everything below `upto`,
/// then trims: the order the engine must follow.
/// The fields of the `LogError::Damaged` that `result` must be: first and
/// last damaged LSN, log offset, intact batches and records after, and
/// the last intact LSN. Panics naming `what` otherwise.
fn damage(result: Result<Replay, LogError>, what: &str) -> (Lsn, Lsn, u64, u64, u64, Lsn) {
    match result {
        Err(LogError::Damaged {
            first,
            last,
            log_offset,
            intact_batches_after,
            intact_records_after,
            intact_last,
            ..
        }) => (
            first,
            last,
            log_offset,
            intact_batches_after,
            intact_records_after,
            intact_last,
        ),
        other => panic!("{what}: expected Damaged, got {other:?}"),
    }
}

fn checkpoint<S: Storage>(log: &RefLog<S>, sb: &mut Superblock, upto: Lsn) {
    let bounds = log.bounds(upto).expect("bounds");
    sb.generation += 1;
    bounds.apply_to(sb);
    let block = sb.encode().expect("encode superblock");
    log.storage()
        .write_durable(sb.addr(), &block)
        .expect("write superblock");
    let head = log.trim(upto).expect("trim");
    assert_eq!(head.lsn, upto);
    assert_eq!(head.offset, bounds.head_offset);
}

#[test]
fn append_sync_replay_round_trip() {
    let (log, sb) = fresh(1 << 20, LogConfig::default());
    let t1 = log.append(b"one").expect("append");
    let t2 = log.append(b"").expect("append");
    assert_eq!(t1.lsn(), Lsn(1));
    assert_eq!(t2.lsn(), Lsn(1), "both queued in the open batch");
    assert!(!t1.is_durable());
    assert_eq!(log.durable_lsn(), Lsn(0));
    assert_eq!(t2.wait().expect("wait"), Lsn(1));
    assert!(t1.is_durable());
    let lsn = log.append_durable(b"three").expect("append durable");
    assert_eq!(lsn, Lsn(2));
    assert_eq!(log.sync().expect("sync"), Lsn(2));
    let stats = log.stats();
    assert_eq!(stats.batches_written, 2);
    assert_eq!(
        stats.write_latency.count(),
        2,
        "every batch write is timed: {:?}",
        stats.write_latency
    );
    assert_eq!(stats.records_written, 3);
    assert_eq!(stats.batch_bytes_written, 8192);
    assert_eq!(stats.queued_records, 0);
    assert_eq!(log.used_bytes(), 8192);
    assert_eq!(log.free_bytes(), (1 << 20) - 8192);

    let dev = Arc::clone(log.storage());
    let r = replay(&dev, &sb).expect("replay");
    assert_eq!(
        replayed(&r, &dev),
        vec![
            (Lsn(1), b"one".to_vec()),
            (Lsn(1), vec![]),
            (Lsn(2), b"three".to_vec())
        ]
    );
    assert_eq!(
        r.end(),
        LogPosition {
            lsn: Lsn(3),
            offset: 8192
        }
    );
    assert!(matches!(
        r.report().stop,
        StopCause::Format(crate::format::FormatError::BadMagic { .. })
    ));
    assert_eq!(r.report().beyond_superblock_tail, 2);
    assert_eq!(r.batches()[0].txn_id, sb.last_txn_id + 1);
    // Replay only reads: a second run is identical.
    assert_eq!(replay(&dev, &sb).expect("replay again"), r);
    let text = r.report().to_string();
    assert!(
        text.contains("2 batches") && text.contains("lsn 3"),
        "{text}"
    );
}

#[test]
fn write_latency_buckets_and_quantiles() {
    let mut w = WriteLatency::default();
    assert_eq!(w.quantile_us(0.99), 0, "nothing counted");
    // 0 µs, 1 µs, 3 µs, 1000 µs: buckets 0, 1, 2 and 10 (512..1024 µs).
    for us in [0, 1, 3, 1000] {
        w.record(Duration::from_micros(us));
    }
    assert_eq!(w.counts[0], 1);
    assert_eq!(w.counts[1], 1);
    assert_eq!(w.counts[2], 1);
    assert_eq!(w.counts[10], 1);
    assert_eq!((w.count(), w.sum_us, w.max_us), (4, 1004, 1000));
    assert_eq!(w.quantile_us(0.5), 2, "2nd of 4: bucket 1 ends at 2 µs");
    assert_eq!(w.quantile_us(0.75), 4);
    assert_eq!(w.quantile_us(1.0), 1000, "capped at the longest write");
    // A write longer than the last bound lands in the last bucket.
    w.record(Duration::from_secs(100_000));
    assert_eq!(w.counts[WRITE_LATENCY_BUCKETS - 1], 1);
    assert_eq!(
        WriteLatency::bucket_upper_us(WRITE_LATENCY_BUCKETS - 1),
        u64::MAX
    );
    let earlier = w;
    w.record(Duration::from_micros(5));
    let d = w.since(&earlier);
    assert_eq!((d.count(), d.counts[3], d.sum_us), (1, 1, 5));
}

#[test]
fn config_and_record_bounds() {
    for (config, field) in [
        (
            LogConfig {
                batch_bytes_max: 1000,
                ..LogConfig::default()
            },
            "batch_bytes_max",
        ),
        (
            LogConfig {
                batch_bytes_max: 32 << 20,
                ..LogConfig::default()
            },
            "batch_bytes_max",
        ),
        (
            LogConfig {
                queued_records_max: 0,
                ..LogConfig::default()
            },
            "queued_records_max",
        ),
        (
            LogConfig {
                queued_bytes_max: 0,
                ..LogConfig::default()
            },
            "queued_bytes_max",
        ),
    ] {
        match config.check() {
            Err(LogError::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected Config error for {field}, got {other:?}"),
        }
    }
    // A 64 KiB log caps batches at 32 KiB whatever the config says.
    let (log, _) = fresh(64 << 10, LogConfig::default());
    assert_eq!(log.batch_bytes_cap(), 32 << 10);
    let max = log.record_bytes_max();
    // 3-byte varint prefix for bodies of 16 KiB and more.
    assert_eq!(max, (32 << 10) - 80 - 3);
    match log.append(&vec![0u8; max + 1]) {
        Err(LogError::RecordTooLarge {
            len_bytes,
            record_bytes_max,
            log_bytes,
            ..
        }) => {
            assert_eq!(
                (len_bytes, record_bytes_max, log_bytes),
                (max + 1, max, 64 << 10)
            );
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert!(log.failure().is_none(), "bad input does not latch");
    assert_eq!(
        log.append_durable(&vec![7u8; max]).expect("largest"),
        Lsn(1)
    );
    assert_eq!(log.stats().batch_bytes_written, 32 << 10);
    // A log region below the minimum is refused.
    let dev = sim(64 << 10, 2);
    let sb = superblock(dev.geometry(), 4096, 1, LogBounds::empty());
    assert!(matches!(replay(&dev, &sb), Err(LogError::Region { .. })));
}

#[test]
fn batch_cap_splits_batches_and_respects_bytes_max() {
    let config = LogConfig {
        batch_bytes_max: 8192,
        ..LogConfig::default()
    };
    let (log, sb) = fresh(1 << 20, config);
    // 1000-byte records: 8 fit in an 8 KiB batch (80 + 8 * 1002 = 8096).
    let tickets: Vec<_> = (0..20)
        .map(|i| log.append(&record(i, 1000)).expect("append"))
        .collect();
    let lsns: Vec<u64> = tickets.iter().map(|t| t.lsn().get()).collect();
    assert_eq!(&lsns[..9], &[1, 1, 1, 1, 1, 1, 1, 1, 2]);
    assert_eq!(lsns[19], 3);
    tickets[19].wait().expect("wait");
    let stats = log.stats();
    assert_eq!(stats.batches_written, 3);
    assert_eq!(stats.records_per_batch_max, 8);
    let r = replay(log.storage(), &sb).expect("replay");
    let ids: Vec<u64> = records_of(&r, log.storage())
        .iter()
        .map(|x| u64::from_le_bytes(x.2[..8].try_into().expect("id")))
        .collect();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    assert!(r.batches().iter().all(|b| b.batch_bytes <= 8192));
}

#[test]
fn ring_wraps_with_lap_skips_over_many_laps() {
    // 64 KiB log, 32 KiB batch cap: records of varying size so that
    // batches end at every block position and some do not fit before the
    // physical end.
    let log_bytes = 64 << 10;
    let (log, mut sb) = fresh(log_bytes, LogConfig::default());
    let dev = Arc::clone(log.storage());
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut expected: Vec<(Lsn, Vec<u8>)> = Vec::new();
    let mut id = 0u64;
    for round in 0..300 {
        let n = rng.gen_range(1..=6);
        let mut tickets = Vec::new();
        for _ in 0..n {
            let len = if rng.gen_bool(0.3) {
                rng.gen_range(4000..24_000)
            } else {
                rng.gen_range(0..300)
            };
            if log.used_bytes() + 2 * (len as u64 + 4096) + 4096 > log_bytes {
                log.sync().expect("sync");
                checkpoint(&log, &mut sb, log.durable_lsn().next());
                expected.clear();
            }
            let rec = record(id, len);
            id += 1;
            let t = log.append(&rec).expect("append");
            expected.push((t.lsn(), rec));
            tickets.push(t);
        }
        tickets.last().expect("ticket").wait().expect("wait");
        // Replay from the last checkpoint returns exactly what is live.
        let r = replay(&dev, &sb).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(replayed(&r, &dev), expected, "round {round}");
        assert_eq!(r.end().lsn, log.durable_lsn().next());
        // Sometimes checkpoint at a random durable LSN.
        if rng.gen_bool(0.3) {
            let head = log.head().lsn.get();
            let upto = Lsn(rng.gen_range(head..log.durable_lsn().get() + 2));
            checkpoint(&log, &mut sb, upto);
            expected.retain(|(lsn, _)| *lsn >= upto);
        }
    }
    let stats = log.stats();
    assert!(
        stats.batch_bytes_written > 20 * log_bytes,
        "many laps: {stats:?}"
    );
    assert!(stats.skipped_bytes > 0, "lap skips exercised: {stats:?}");
    assert_eq!(stats.space_waits, 0);
}

#[test]
fn replay_follows_a_lap_skip_at_the_head() {
    // Fill the first lap to 4 KiB before its end, checkpoint there, then
    // append a batch too large for the 4 KiB: it goes to the next lap start
    // and the superblock's head points at the skipped space.
    let log_bytes = 64 << 10;
    let (log, mut sb) = fresh(log_bytes, LogConfig::default());
    for i in 0..15 {
        log.append_durable(&record(i, 4000)).expect("append");
    }
    assert_eq!(log.used_bytes(), 15 * 4096);
    checkpoint(&log, &mut sb, Lsn(16));
    assert_eq!(sb.log_head_offset, 15 * 4096);
    let lsn = log.append_durable(&record(99, 6000)).expect("append");
    assert_eq!(lsn, Lsn(16));
    assert_eq!(log.stats().skipped_bytes, 4096);
    assert_eq!(log.used_bytes(), 4096 + 8192);
    let r = replay(log.storage(), &sb).expect("replay");
    assert_eq!(
        replayed(&r, log.storage()),
        vec![(Lsn(16), record(99, 6000))]
    );
    assert_eq!(r.report().skipped_bytes, 4096);
    assert_eq!(r.batches()[0].log_offset, log_bytes);
    assert_eq!(
        r.end(),
        LogPosition {
            lsn: Lsn(17),
            offset: log_bytes + 8192
        }
    );
    // Reopen from that replay and continue.
    let dev = Arc::clone(log.storage());
    drop(log);
    let (log, r2) = open_log(Arc::clone(&dev), &sb, LogConfig::default());
    assert_eq!(r2, r);
    assert_eq!(log.append_durable(b"next").expect("append"), Lsn(17));
    let r3 = replay(&dev, &sb).expect("replay");
    assert_eq!(r3.record_count(), 2);
}

#[test]
fn a_full_ring_blocks_appends_until_trim() {
    let log_bytes = 32 << 10;
    let (log, mut sb) = fresh(log_bytes, LogConfig::default());
    for i in 0..8 {
        log.append_durable(&record(i, 4000)).expect("append");
    }
    assert_eq!(log.used_bytes(), log_bytes);
    assert_eq!(log.free_bytes(), 0);
    let (tx, rx) = mpsc::channel();
    let appender = {
        let log = log.clone();
        thread::spawn(move || {
            let r = log.append_durable(&record(8, 100));
            tx.send(r.map(|l| l.get()).map_err(|e| e.to_string()))
                .expect("send");
        })
    };
    wait_until("the append to wait for space", || {
        log.stats().space_waits == 1
    });
    thread::sleep(Duration::from_millis(20));
    assert!(rx.try_recv().is_err(), "must wait for space");
    assert_eq!(log.stats().queued_records, 0, "nothing assigned yet");
    // Trim is refused above the durable LSN.
    assert!(matches!(
        log.trim(Lsn(10)),
        Err(LogError::TrimBeyondDurable { .. })
    ));
    checkpoint(&log, &mut sb, Lsn(3));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).expect("woken"),
        Ok(9)
    );
    appender.join().expect("join");
    assert_eq!(
        log.head(),
        LogPosition {
            lsn: Lsn(3),
            offset: 8192
        }
    );
    assert!(log.used_bytes() <= log_bytes);
    // Trim at or below the head is a no-op; bounds below it are refused.
    assert_eq!(log.trim(Lsn(2)).expect("noop").lsn, Lsn(3));
    assert!(matches!(
        log.bounds(Lsn(2)),
        Err(LogError::AlreadyTrimmed { .. })
    ));
    let r = replay(log.storage(), &sb).expect("replay");
    assert_eq!(r.batches().first().map(|b| b.lsn), Some(Lsn(3)));
    assert_eq!(r.end().lsn, Lsn(10));
}

#[test]
fn a_blocked_append_writes_pending_batches_so_they_can_be_trimmed() {
    // Two 16 KiB batches of queued (not durable) records fill a 32 KiB
    // ring. The next append must make them durable itself, then wait.
    let log_bytes = 32 << 10;
    let (log, mut sb) = fresh(log_bytes, LogConfig::default());
    let tickets: Vec<_> = (0..8)
        .map(|i| log.append(&record(i, 4000)).expect("append"))
        .collect();
    assert_eq!(tickets[7].lsn(), Lsn(2));
    assert_eq!(log.used_bytes(), log_bytes);
    assert_eq!(log.durable_lsn(), Lsn(0));
    let appender = {
        let log = log.clone();
        thread::spawn(move || log.append(&record(8, 4000)).map(|t| t.lsn()))
    };
    wait_until("pending batches to be written", || {
        log.durable_lsn() == Lsn(2)
    });
    wait_until("the append to wait for space", || {
        log.stats().space_waits == 1
    });
    assert!(tickets.iter().all(Ticket::is_durable));
    checkpoint(&log, &mut sb, Lsn(2));
    assert_eq!(appender.join().expect("join").expect("append"), Lsn(3));
    log.sync().expect("sync");
    let r = replay(log.storage(), &sb).expect("replay");
    assert_eq!(
        r.record_count(),
        5,
        "the four records of batch 2, and the ninth"
    );
}

/// A storage whose log writes block until the test opens the gate, and
/// which counts the writes that reached it.
struct Gate {
    inner: Arc<SimStorage>,
    state: Mutex<(bool, u64)>,
    cv: Condvar,
}

impl Gate {
    fn new(inner: Arc<SimStorage>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            state: Mutex::new((false, 0)),
            cv: Condvar::new(),
        })
    }
    fn pass(&self) {
        let mut st = self.state.lock().expect("gate");
        st.1 += 1;
        self.cv.notify_all();
        while !st.0 {
            st = self.cv.wait(st).expect("gate");
        }
    }
    fn open(&self) {
        self.state.lock().expect("gate").0 = true;
        self.cv.notify_all();
    }
    fn wait_arrivals(&self, n: u64) {
        let mut st = self.state.lock().expect("gate");
        while st.1 < n {
            st = self.cv.wait(st).expect("gate");
        }
    }
}

impl Storage for Gate {
    fn device_name(&self) -> &str {
        self.inner.device_name()
    }
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        self.pass();
        self.inner.write_batch(writes)
    }
    fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.pass();
        self.inner.write_durable(offset, data)
    }
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), StorageError> {
        self.inner.read_batch(reads)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush()
    }
    fn failure(&self) -> Option<IoFailure> {
        self.inner.failure()
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn queue_bounds_apply_back_pressure() {
    let dev = sim(1 << 20, 3);
    let gate = Gate::new(Arc::clone(&dev));
    let sb = superblock(dev.geometry(), 1 << 20, 1, LogBounds::empty());
    let config = LogConfig {
        queued_records_max: 4,
        queued_bytes_max: 1 << 20,
        ..LogConfig::default()
    };
    let (log, _) = open_log(Arc::clone(&gate), &sb, config);
    // A leader blocks in the write of batch 1 (one record, still queued).
    let leader = {
        let log = log.clone();
        thread::spawn(move || log.append_durable(b"first").map(|l| l.get()))
    };
    gate.wait_arrivals(1);
    // Three more fit under the bound of 4; the fifth record blocks.
    let appender = {
        let log = log.clone();
        thread::spawn(move || {
            let mut lsns = Vec::new();
            for i in 0..4u64 {
                lsns.push(log.append(&record(i, 10)).expect("append").lsn().get());
            }
            lsns
        })
    };
    wait_until("the appender to block", || {
        log.stats().backpressure_waits == 1
    });
    assert_eq!(log.stats().queued_records, 4);
    assert!(!appender.is_finished());
    gate.open();
    assert_eq!(leader.join().expect("leader").expect("durable"), 1);
    assert_eq!(appender.join().expect("appender"), vec![2, 2, 2, 2]);
    log.sync().expect("sync");

    // Byte bound: with 100 bytes allowed, a 60-byte record waits for the
    // previous one; a record over the bound passes when the queue is empty.
    let dev = sim(1 << 20, 4);
    let sb = superblock(dev.geometry(), 1 << 20, 1, LogBounds::empty());
    let config = LogConfig {
        queued_bytes_max: 100,
        ..LogConfig::default()
    };
    let (log, _) = open_log(dev, &sb, config);
    let big = log.append(&[1u8; 500]).expect("alone it passes");
    assert_eq!(log.stats().queued_bytes, 502);
    // No leader is active, so the blocked appender writes batch 1 itself.
    let second = log.append(&[2u8; 60]).expect("append");
    assert!(big.is_durable());
    assert_eq!(second.lsn(), Lsn(2));
    assert_eq!(log.stats().backpressure_waits, 1);
    assert_eq!(log.stats().queued_bytes, 61);
}

#[test]
fn concurrent_waiters_share_one_write() {
    const WAITERS: usize = 6;
    let dev = sim(1 << 20, 5);
    let gate = Gate::new(Arc::clone(&dev));
    let sb = superblock(dev.geometry(), 1 << 20, 1, LogBounds::empty());
    let (log, _) = open_log(Arc::clone(&gate), &sb, LogConfig::default());
    let first = {
        let log = log.clone();
        thread::spawn(move || log.append_durable(b"leader").expect("append"))
    };
    gate.wait_arrivals(1);
    let writes_before = dev.counters().writes;
    let others: Vec<_> = (0..WAITERS)
        .map(|i| {
            let log = log.clone();
            thread::spawn(move || log.append_durable(&record(i as u64, 32)).expect("append"))
        })
        .collect();
    wait_until("all submitters to queue", || {
        log.stats().queued_records == WAITERS as u64 + 1
    });
    gate.open();
    assert_eq!(first.join().expect("join"), Lsn(1));
    for h in others {
        assert_eq!(h.join().expect("join"), Lsn(2));
    }
    let stats = log.stats();
    assert_eq!(stats.batches_written, 2);
    assert_eq!(stats.records_per_batch_max, WAITERS as u64);
    assert_eq!(dev.counters().writes - writes_before, 2);
}

#[test]
fn seal_gives_an_exact_cut() {
    let (log, mut sb) = fresh(1 << 20, LogConfig::default());
    let before: Vec<_> = (0..3)
        .map(|i| log.append(&record(i, 32)).expect("append"))
        .collect();
    let cut = log.seal();
    assert_eq!(cut, Lsn(2));
    assert_eq!(log.seal(), cut, "sealing an empty log changes nothing");
    let after = log.append(&record(3, 32)).expect("append");
    assert!(before.iter().all(|t| t.lsn() < cut));
    assert_eq!(after.lsn(), cut);
    log.wait_for(cut.prev()).expect("durable below the cut");
    assert!(!after.is_durable());
    checkpoint(&log, &mut sb, cut);
    log.sync().expect("sync");
    let r = replay(log.storage(), &sb).expect("replay");
    assert_eq!(replayed(&r, log.storage()), vec![(cut, record(3, 32))]);
}

#[test]
fn txn_id_change_seals_the_batch() {
    let (log, sb) = fresh(1 << 20, LogConfig::default());
    let a = log.append(b"a").expect("append");
    log.set_txn_id(log.txn_id() + 5).expect("txn");
    let b = log.append(b"b").expect("append");
    assert_eq!((a.lsn(), b.lsn()), (Lsn(1), Lsn(2)));
    assert!(matches!(
        log.set_txn_id(0),
        Err(LogError::TxnIdBackwards { .. })
    ));
    log.sync().expect("sync");
    let r = replay(log.storage(), &sb).expect("replay");
    let txns: Vec<u64> = records_of(&r, log.storage()).iter().map(|x| x.1).collect();
    assert_eq!(txns, vec![sb.last_txn_id + 1, sb.last_txn_id + 6]);
}

#[test]
fn write_eio_latches_and_acknowledges_nothing_more() {
    for durability in [Durability::WriteDurable, Durability::WriteThenFlush] {
        let config = LogConfig {
            durability,
            ..LogConfig::default()
        };
        let (log, sb) = fresh(1 << 20, config);
        let dev = Arc::clone(log.storage());
        log.append_durable(b"acked").expect("first");
        let pending = log.append(b"lost").expect("queued");
        dev.set_fault_plan(FaultPlan {
            write_eio_at: Some(1),
            ..FaultPlan::default()
        });
        let err = pending.wait().expect_err("write fails");
        match &err {
            LogError::Failed {
                device,
                op,
                offset,
                lsn,
                cause,
                ..
            } => {
                assert_eq!(device, dev.device_name());
                let expected_op = match durability {
                    Durability::WriteDurable => IoOp::WriteDurable,
                    Durability::WriteThenFlush => IoOp::Write,
                };
                assert_eq!(*op, expected_op);
                assert_eq!(*offset, LOG_START + 4096);
                assert_eq!(*lsn, Lsn(2));
                assert_eq!(cause.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(err
            .to_string()
            .contains("nothing after the last durable batch"));
        // Latched: later appends and syncs fail, the durable LSN stays.
        assert!(log.append(b"later").expect_err("latched").is_failed());
        assert!(log.sync().expect_err("latched").is_failed());
        assert!(pending.wait().expect_err("still failed").is_failed());
        assert_eq!(log.durable_lsn(), Lsn(1));
        assert!(log.failure().is_some_and(|e| e.is_failed()));
        // After a crash the acknowledged record is there; the failed batch
        // may or may not be, depending on what reached the media.
        for policy in [CrashPolicy::KeepAll, CrashPolicy::LoseAll] {
            let crashed = dev.crash_with(policy);
            let r = replay(&crashed, &sb).expect("replay");
            let recs = replayed(&r, &crashed);
            assert_eq!(recs[0], (Lsn(1), b"acked".to_vec()));
            assert!(recs.len() <= 2);
        }
    }
}

#[test]
fn flush_eio_latches_every_waiter() {
    let config = LogConfig {
        durability: Durability::WriteThenFlush,
        ..LogConfig::default()
    };
    let dev = sim(1 << 20, 6);
    let gate = Gate::new(Arc::clone(&dev));
    let sb = superblock(dev.geometry(), 1 << 20, 1, LogBounds::empty());
    let (log, _) = open_log(Arc::clone(&gate), &sb, config);
    dev.set_fault_plan(FaultPlan {
        flush_eio_at: Some(1),
        ..FaultPlan::default()
    });
    let leader = {
        let log = log.clone();
        thread::spawn(move || log.append_durable(b"x"))
    };
    gate.wait_arrivals(1);
    let waiters: Vec<_> = (0..4)
        .map(|i| {
            let log = log.clone();
            thread::spawn(move || log.append_durable(&record(i, 16)))
        })
        .collect();
    wait_until("waiters to queue", || log.stats().queued_records == 5);
    gate.open();
    match leader.join().expect("join") {
        Err(LogError::Failed { op, .. }) => assert_eq!(op, IoOp::Flush),
        other => panic!("expected a flush failure, got {other:?}"),
    }
    for w in waiters {
        match w.join().expect("join") {
            Err(LogError::Failed { op, .. }) => assert_eq!(op, IoOp::Flush),
            other => panic!("expected the latched flush failure, got {other:?}"),
        }
    }
    assert_eq!(log.durable_lsn(), Lsn(0));
    assert_eq!(log.stats().batches_written, 0);
}

#[test]
fn a_failed_storage_fails_open() {
    let dev = sim(1 << 20, 7);
    let sb = superblock(dev.geometry(), 1 << 20, 1, LogBounds::empty());
    let r = replay(&dev, &sb).expect("replay");
    dev.set_fault_plan(FaultPlan {
        flush_eio_at: Some(1),
        ..FaultPlan::default()
    });
    match RefLog::open(Arc::clone(&dev), &sb, &r, LogConfig::default()) {
        Err(LogError::Failed {
            op: IoOp::Flush, ..
        }) => {}
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn replay_distinguishes_clean_end_from_corruption() {
    let (log, mut sb) = fresh(1 << 20, LogConfig::default());
    let dev = Arc::clone(log.storage());
    for i in 0..4 {
        log.append_durable(&record(i, 5000)).expect("append");
    }
    // Superblock records batches 1..=2 as durable; 3 and 4 come after.
    let b = log.bounds(Lsn(1)).expect("bounds");
    let tail2 = LogBounds {
        tail_lsn: Lsn(2),
        tail_offset: 2 * 8192,
        ..b
    };
    tail2.apply_to(&mut sb);
    assert_eq!(replay(&dev, &sb).expect("replay").record_count(), 4);

    // Damage batch 4 (after the tail): a clean end, reported as truncated.
    let damaged = dev.crash_with(CrashPolicy::KeepAll);
    damaged
        .flip_bit(LOG_START + 3 * 8192 + 5000, 3)
        .expect("flip");
    let r = replay(&damaged, &sb).expect("clean end");
    assert_eq!(r.record_count(), 3);
    assert!(matches!(
        r.report().stop,
        StopCause::Format(crate::format::FormatError::Torn { lsn: 4, .. })
    ));
    assert_eq!(
        r.report().truncated,
        Some(TruncatedBatch {
            lsn: Lsn(4),
            log_offset: 3 * 8192,
            batch_bytes: 8192
        })
    );
    assert_eq!(r.report().beyond_superblock_tail, 1);
    // Reopening overwrites the torn batch.
    let damaged = Arc::new(damaged);
    let (log2, _) = open_log(Arc::clone(&damaged), &sb, LogConfig::default());
    assert_eq!(log2.append_durable(b"new 4").expect("append"), Lsn(4));
    let r = replay(&damaged, &sb).expect("replay");
    assert_eq!(r.record_count(), 4);
    let last = records_of(&r, &damaged).pop().map(|x| x.2);
    assert_eq!(last.as_deref(), Some(&b"new 4"[..]));

    // Damage batch 2 (at the tail), with batches 3 and 4 intact after it:
    // corruption, refused with the damaged LSNs and what follows them.
    let damaged = dev.crash_with(CrashPolicy::KeepAll);
    damaged.flip_bit(LOG_START + 8192 + 100, 0).expect("flip");
    assert_eq!(
        damage(replay(&damaged, &sb), "batch 2"),
        (Lsn(2), Lsn(2), 8192, 2, 2, Lsn(4))
    );
    // Batches 2 and 3 damaged, 4 intact but not reachable: batch 2's header
    // is intact and nothing intact chains to it, so the superblock's tail
    // is what proves it durable: Corrupt.
    damaged
        .flip_bit(LOG_START + 2 * 8192 + 100, 0)
        .expect("flip");
    match replay(&damaged, &sb) {
        Err(LogError::Corrupt {
            lsn,
            log_offset,
            tail_lsn,
            ..
        }) => assert_eq!((lsn, log_offset, tail_lsn), (Lsn(2), 8192, Lsn(2))),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A superblock whose tail offset disagrees with the chain.
    let mut wrong = sb.clone();
    wrong.log_tail_offset = 2 * 8192 + 4096;
    assert!(matches!(
        replay(&dev, &wrong),
        Err(LogError::TailMismatch { .. })
    ));
    // A failed read-ahead is retried with the exact read: not an error.
    dev.set_fault_plan(FaultPlan {
        read_eio_at: Some(1),
        ..FaultPlan::default()
    });
    assert_eq!(replay(&dev, &sb).expect("replay").record_count(), 4);
    // A media error past the end of the log (in the read-ahead) is not
    // an error either.
    dev.set_fault_plan(FaultPlan {
        unreadable: Some((LOG_START + 5 * 8192, LOG_START + 6 * 8192)),
        ..FaultPlan::default()
    });
    assert_eq!(replay(&dev, &sb).expect("replay").record_count(), 4);
    // A media error in batch 3, which batch 4 follows: damage.
    dev.set_fault_plan(FaultPlan {
        unreadable: Some((LOG_START + 2 * 8192, LOG_START + 2 * 8192 + 512)),
        ..FaultPlan::default()
    });
    match replay(&dev, &sb) {
        Err(LogError::Damaged { first, cause, .. }) => {
            assert_eq!(first, Lsn(3));
            assert!(matches!(*cause, StopCause::Unreadable { .. }), "{cause}");
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
    // A media error in the last batch is reported, not mistaken for the
    // end of the log.
    dev.set_fault_plan(FaultPlan {
        unreadable: Some((LOG_START + 3 * 8192, LOG_START + 3 * 8192 + 512)),
        ..FaultPlan::default()
    });
    match replay(&dev, &sb) {
        Err(LogError::ReplayRead { source, lsn, .. }) => {
            assert_eq!(lsn, Lsn(4));
            assert!(matches!(source, StorageError::Io { .. }));
        }
        other => panic!("expected ReplayRead, got {other:?}"),
    }
    dev.set_fault_plan(FaultPlan::default());
    // A replay of another superblock is refused by open.
    let r = replay(&dev, &sb).expect("replay");
    let mut other = sb.clone();
    other.fs_id = FsId([1; 16]);
    assert!(matches!(
        RefLog::open(Arc::clone(&dev), &other, &r, LogConfig::default()),
        Err(LogError::ReplayMismatch { .. })
    ));
}

#[test]
fn an_append_waiting_for_space_fails_when_the_storage_fails() {
    let log_bytes = 32 << 10;
    let (log, _) = fresh(log_bytes, LogConfig::default());
    let dev = Arc::clone(log.storage());
    for i in 0..8 {
        log.append_durable(&record(i, 4000)).expect("append");
    }
    let appender = {
        let log = log.clone();
        thread::spawn(move || log.append(b"no room").map(|t| t.lsn()))
    };
    wait_until("the append to wait for space", || {
        log.stats().space_waits == 1
    });
    // The engine's next superblock write fails: no trim will ever come.
    dev.set_fault_plan(FaultPlan {
        write_eio_at: Some(1),
        ..FaultPlan::default()
    });
    assert!(dev.write_durable(0, &[0u8; 4096]).is_err());
    match appender.join().expect("join") {
        Err(LogError::Failed { offset, lsn, .. }) => assert_eq!((offset, lsn), (0, Lsn(9))),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(log.append(b"x").expect_err("latched").is_failed());
}

/// Ten durable batches of 8192 bytes (one 5000-byte record each) after a
/// checkpoint at LSN 1 whose superblock records no durable batch: all ten
/// lie beyond the superblock's tail, as after a run without a checkpoint.
fn ten_batches_beyond_the_tail() -> (Arc<SimStorage>, Superblock) {
    let (log, sb) = fresh(1 << 20, LogConfig::default());
    for i in 0..10 {
        log.append_durable(&record(i, 5000)).expect("append");
    }
    (Arc::clone(log.storage()), sb)
}

/// The case: one bit flipped in the middle of the log beyond the
/// superblock's tail (in a header or in a payload, of any batch but the
/// last) used to be taken for a torn tail, and every later batch was
/// dropped silently. Now strict replay refuses, naming the damage, and
/// the recovery modes keep exactly the intact batches they promise.
#[test]
fn a_bit_flip_in_the_middle_of_the_log_is_corruption_not_a_torn_tail() {
    let (dev, sb) = ten_batches_beyond_the_tail();
    assert_eq!(replay(&dev, &sb).expect("replay").record_count(), 10);
    // (batch index, byte in the batch): header fields, the header
    // checksum, the chain link, the first payload byte, padding.
    for (index, at) in [(0u64, 3u64), (3, 9), (4, 40), (4, 73), (5, 80), (8, 8000)] {
        let damaged = dev.crash_with(CrashPolicy::KeepAll);
        damaged
            .flip_bit(LOG_START + index * 8192 + at, 2)
            .expect("flip");
        let lsn = Lsn(index + 1);
        let what = format!("flip at batch {index} byte {at}");
        let (first, last, log_offset, batches_after, records_after, intact_last) =
            damage(replay(&damaged, &sb), &what);
        assert_eq!(
            (first, last, log_offset, batches_after, records_after),
            (lsn, lsn, index * 8192, 9 - index, 9 - index),
            "{what}: {intact_last}"
        );
        let tail = replay_with(&damaged, &sb, RecoveryMode::TolerateTail).expect("tolerate");
        assert_eq!(tail.record_count() as u64, index);
        assert_eq!(tail.end().lsn, lsn);
        let dropped = tail.report().dropped.expect("dropped");
        assert_eq!((dropped.first, dropped.last), (lsn, Lsn(10)));
        assert_eq!(
            (dropped.batches, dropped.intact_records),
            (10 - index, 9 - index)
        );
        let skip = replay_with(&damaged, &sb, RecoveryMode::SkipCorrupt).expect("skip");
        let lsns: Vec<Lsn> = records_of(&skip, &damaged).iter().map(|r| r.0).collect();
        let expected: Vec<Lsn> = (1..=10).filter(|&l| l != lsn.0).map(Lsn).collect();
        assert_eq!(lsns, expected, "skip-corrupt keeps every intact batch");
        assert_eq!(skip.end().lsn, Lsn(11));
        assert_eq!(skip.report().dropped.map(|d| d.batches), Some(1));
        // Appending goes on after the last intact batch; a strict replay
        // of the same superblock still finds the damage (the superblock
        // still points before it) until a checkpoint covers it.
        let damaged = Arc::new(damaged);
        let log = RefLog::open(Arc::clone(&damaged), &sb, &skip, LogConfig::default())
            .expect("open after skip-corrupt");
        assert_eq!(log.append_durable(b"after").expect("append"), Lsn(11));
        let mut sb2 = sb.clone();
        checkpoint(&log, &mut sb2, Lsn(11));
        let r = replay(&damaged, &sb2).expect("strict replay after the checkpoint");
        assert_eq!(replayed(&r, &damaged), vec![(Lsn(11), b"after".to_vec())]);
    }
}

/// A torn write of the last batch (the one in flight) is still the clean
/// end in strict mode: nothing intact follows it.
#[test]
fn a_torn_last_batch_is_still_a_clean_end() {
    let (dev, sb) = ten_batches_beyond_the_tail();
    for at in [3u64, 9, 73, 80, 6000] {
        let damaged = dev.crash_with(CrashPolicy::KeepAll);
        damaged
            .flip_bit(LOG_START + 9 * 8192 + at, 1)
            .expect("flip");
        let r = replay(&damaged, &sb).expect("a torn tail is a clean end");
        assert_eq!(r.record_count(), 9, "byte {at}");
        assert!(r.report().damaged.is_empty());
    }
}

/// Review item 3: a batch is identified by more than (fs_id, lsn,
/// offset). After a recovery that stops at batch 3 and writes a new batch
/// 3 of the old one's size, the old batches 4.. at the same offsets with
/// the next LSNs are intact, but they chain to the old batch 3: replay
/// must not bring them back.
#[test]
fn old_batches_do_not_come_back_after_their_lsn_and_offset_are_reused() {
    let (dev, sb) = ten_batches_beyond_the_tail();
    let damaged = Arc::new(dev.crash_with(CrashPolicy::KeepAll));
    damaged
        .flip_bit(LOG_START + 2 * 8192 + 100, 0)
        .expect("flip");
    let tail = replay_with(&*damaged, &sb, RecoveryMode::TolerateTail).expect("tolerate");
    assert_eq!(tail.end().lsn, Lsn(3));
    let log = RefLog::open(Arc::clone(&damaged), &sb, &tail, LogConfig::default()).expect("open");
    assert_eq!(
        log.append_durable(&record(100, 5000)).expect("append"),
        Lsn(3)
    );
    // Power fails before a new batch 4 is written.
    let after = damaged.crash_with(CrashPolicy::KeepAll);
    let r = replay(&after, &sb).expect("the old batch 4 ends the log");
    let ids: Vec<u64> = records_of(&r, &after)
        .iter()
        .map(|x| u64::from_le_bytes(x.2[..8].try_into().expect("8 bytes")))
        .collect();
    assert_eq!(
        ids,
        vec![0, 1, 100],
        "old batches 4..10 must not be replayed"
    );
    assert!(matches!(
        r.report().stop,
        StopCause::ChainMismatch { lsn: Lsn(4), .. }
    ));
}

/// A batch of an earlier format of the device with the same fs_id and the
/// next LSN at the head chains to the earlier format's seed: not replayed.
#[test]
fn a_batch_of_an_earlier_format_with_the_same_fs_id_is_not_replayed() {
    let (dev, mut sb) = ten_batches_beyond_the_tail();
    sb.log_head_chain ^= 1;
    let r = replay(&*dev, &sb).expect("replay");
    assert_eq!(r.record_count(), 0);
    assert!(matches!(r.report().stop, StopCause::ChainMismatch { .. }));
}

/// Review item 5: recovering from an older superblock (the newest copy
/// rotted) after the log has since wrapped over that superblock's head
/// must not end the log "cleanly" there and silently roll back what the
/// newer superblock committed: the batch found at the head claims a later
/// lap, which only a newer superblock allows. Refused.
#[test]
fn a_superblock_older_than_the_log_is_refused() {
    let log_bytes = 64 << 10;
    let (log, mut sb) = fresh(log_bytes, LogConfig::default());
    let old = sb.clone();
    // 8192-byte batches: every lap puts batches at the same places.
    for i in 0..12 {
        let lsn = log.append_durable(&record(i, 5000)).expect("append");
        checkpoint(&log, &mut sb, lsn.next());
    }
    let dev = log.storage();
    assert_eq!(replay(dev, &sb).expect("newest").record_count(), 0);
    match replay(dev, &old) {
        Err(LogError::AheadOfSuperblock {
            log_offset, found, ..
        }) => assert_eq!((log_offset, found), (0, log_bytes)),
        other => panic!("expected AheadOfSuperblock, got {other:?}"),
    }
}
