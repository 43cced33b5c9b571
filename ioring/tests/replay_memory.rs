//! Replay keeps memory bounded by its read window, not by the log: a log of
//! 64 MiB of records is replayed and streamed with at most a few MiB of
//! heap held at once. A counting global allocator
//! (`refd_ioring::selftest::heap`, this test binary only) measures the
//! largest heap held at once by replay and its stream.

mod common;

use std::sync::Arc;

use common::{device_bytes, parse_record, record, superblock};
use refd_ioring::log::REPLAY_READ_BYTES;
use refd_ioring::selftest::heap;
use refd_ioring::{replay, LogBounds, LogConfig, RefLog, SimConfig, SimStorage, Storage};

#[global_allocator]
static METER: heap::Meter = heap::Meter;

const LOG_BYTES: u64 = 96 << 20;
const RECORD_BYTES: usize = 4000;
/// 64 MB of record bodies: 16 times the bound asserted below.
const RECORDS: u64 = 16_000;
/// Heap replay and its stream may hold: the first pass's read window
/// (dropped when `replay` returns), the stream's, the batch list (40 bytes
/// a batch) and slack for the report and small vectors.
const HELD_BYTES_MAX: usize = 2 * REPLAY_READ_BYTES + (1 << 20);

#[test]
fn replay_of_a_log_far_larger_than_its_window_holds_one_window() {
    let dev = Arc::new(SimStorage::new(SimConfig::new(device_bytes(LOG_BYTES), 7)).expect("sim"));
    let sb = superblock(dev.geometry(), LOG_BYTES, 1, LogBounds::empty());
    let empty = replay(&dev, &sb).expect("replay an empty log");
    let log = RefLog::open(Arc::clone(&dev), &sb, &empty, LogConfig::default()).expect("open");
    for chunk in 0..RECORDS / 1000 {
        let mut last = None;
        for id in chunk * 1000..(chunk + 1) * 1000 {
            last = Some(log.append(&record(id, RECORD_BYTES)).expect("append"));
        }
        last.expect("a ticket").wait().expect("durable");
    }
    drop(log);
    let log_bytes: u64 = RECORDS * RECORD_BYTES as u64;

    // Replay and the stream run on this thread: the meter counts them.
    let ((r, window), held) = heap::peak_of(|| {
        let r = replay(&*dev, &sb).expect("replay");
        assert_eq!(r.record_count() as u64, RECORDS);
        assert_eq!(r.report().record_bytes, log_bytes);
        // The same records, in append order, byte for byte.
        let mut next_id = 0u64;
        let mut stream = r.stream(&*dev);
        while let Some(rec) = stream.next_record().expect("stream") {
            assert_eq!(rec.data.len(), RECORD_BYTES);
            assert_eq!(parse_record(rec.data), Some(next_id), "{}", rec.lsn);
            next_id += 1;
        }
        assert_eq!(next_id, RECORDS);
        let window = stream.window_bytes_max();
        drop(stream);
        (r, window)
    });
    println!(
        "replayed {RECORDS} records ({log_bytes} bytes) in {} batches: {held} bytes of heap held \
         at most, stream window {window} bytes",
        r.batches().len()
    );
    assert!(window <= REPLAY_READ_BYTES, "window {window}");
    assert!(
        held <= HELD_BYTES_MAX,
        "replay held {held} bytes for a {log_bytes}-byte log (bound {HELD_BYTES_MAX})"
    );
}
