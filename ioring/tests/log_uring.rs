//! The ref log on [`UringStorage`] over a regular file opened with
//! `O_DIRECT` under the target directory: concurrent submitters, a
//! checkpoint thread that makes the ring wrap, then the file is closed,
//! reopened and replayed. Skips (printing why) where the file system does
//! not support `O_DIRECT`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{parse_record, read_superblock, record, records, superblock, write_superblock, Gen};
use refd_ioring::format::Superblock;
use refd_ioring::{
    replay, Device, DeviceError, FileAllocation, LogBounds, LogConfig, Lsn, RefLog, Storage,
    UringConfig, UringStorage,
};

const LOG_BYTES: u64 = 1 << 20;
const THREADS: u64 = 4;
const PER_THREAD: u64 = 3000;

fn scratch_file(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("refd-log-uring");
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    let path = dir.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn create(path: &PathBuf, size: u64) -> Option<UringStorage> {
    match Device::create_file(path, size, FileAllocation::Sparse) {
        Ok(device) => Some(UringStorage::new(device, UringConfig::default()).expect("ring")),
        Err(e @ DeviceError::DirectIoUnsupported { .. }) => {
            eprintln!("SKIP: {e}: the file system under the target dir has no O_DIRECT");
            None
        }
        Err(e) => panic!("create {}: {e}", path.display()),
    }
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn append_wrap_reopen_replay_on_a_file() {
    let path = scratch_file("append-replay");
    let _cleanup = Cleanup(path.clone());
    let size = common::device_bytes(LOG_BYTES);
    let Some(dev) = create(&path, size) else {
        return;
    };
    let dev = Arc::new(dev);
    let sb0 = superblock(dev.geometry(), LOG_BYTES, 1, LogBounds::empty());
    write_superblock(&*dev, &sb0).expect("format");
    let r = replay(&*dev, &sb0).expect("replay");
    let log = RefLog::open(Arc::clone(&dev), &sb0, &r, LogConfig::default()).expect("open");

    let started = Instant::now();
    let acked: Arc<Mutex<Vec<(u64, Lsn)>>> = Arc::default();
    let sb_now = Arc::new(Mutex::new(sb0.clone()));
    let done = Arc::new(AtomicBool::new(false));
    let checkpointer = {
        let (log, dev, sb_now, done) = (
            log.clone(),
            Arc::clone(&dev),
            Arc::clone(&sb_now),
            Arc::clone(&done),
        );
        thread::spawn(move || {
            let mut checkpoints = 0u64;
            while !done.load(Ordering::Acquire) {
                if log.used_bytes() * 2 < log.log_bytes() {
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let upto = log.durable_lsn().next();
                let bounds = log.bounds(upto).expect("bounds");
                let mut next: Superblock = sb_now.lock().expect("sb").clone();
                next.generation += 1;
                bounds.apply_to(&mut next);
                write_superblock(&*dev, &next).expect("superblock");
                *sb_now.lock().expect("sb") = next;
                log.trim(upto).expect("trim");
                checkpoints += 1;
            }
            checkpoints
        })
    };
    let submitters: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = log.clone();
            let acked = Arc::clone(&acked);
            thread::spawn(move || {
                let mut gen = Gen::new(t);
                let mut window = Vec::new();
                for i in 0..PER_THREAD {
                    let id = (t << 32) | i;
                    let len = if gen.percent(90) {
                        32
                    } else {
                        8 + gen.below(3000) as usize
                    };
                    let ticket = log.append(&record(id, len)).expect("append");
                    window.push((id, ticket));
                    if window.len() as u64 > gen.below(64) {
                        window.last().expect("ticket").1.wait().expect("wait");
                        let mut a = acked.lock().expect("acked");
                        a.extend(window.drain(..).map(|(id, t)| (id, t.lsn())));
                    }
                }
                if let Some((_, last)) = window.last() {
                    last.wait().expect("wait");
                    let mut a = acked.lock().expect("acked");
                    a.extend(window.drain(..).map(|(id, t)| (id, t.lsn())));
                }
            })
        })
        .collect();
    for s in submitters {
        s.join().expect("submitter");
    }
    done.store(true, Ordering::Release);
    let checkpoints = checkpointer.join().expect("checkpointer");
    let elapsed = started.elapsed();
    let stats = log.stats();
    let uring = dev.stats();
    eprintln!(
        "uring file: {} records in {} batches ({:.1} records/batch, max {}), {checkpoints} \
         checkpoints, {} laps, {:.1} bytes/record overhead, {} write chunks, in {elapsed:?}",
        stats.records_written,
        stats.batches_written,
        stats.records_written as f64 / stats.batches_written as f64,
        stats.records_per_batch_max,
        (stats.batch_bytes_written + stats.skipped_bytes) / LOG_BYTES,
        stats.overhead_bytes_per_record(),
        uring.write_chunks,
    );
    assert_eq!(stats.records_written, THREADS * PER_THREAD);
    assert!(checkpoints > 0, "the ring must wrap: {stats:?}");
    assert!(stats.batches_written < stats.records_written);
    let acked = acked.lock().expect("acked").clone();
    assert_eq!(acked.len() as u64, THREADS * PER_THREAD);
    drop(log);
    drop(dev);

    // Reopen the file and replay from the newest superblock.
    let dev = Arc::new(UringStorage::open(&path, size, UringConfig::default()).expect("reopen"));
    let sb = read_superblock(&*dev).expect("superblock");
    assert_eq!(sb, *sb_now.lock().expect("sb"));
    let r = replay(&*dev, &sb).expect("replay");
    assert_eq!(replay(&*dev, &sb).expect("replay again"), r);
    let mut found: HashMap<u64, Lsn> = HashMap::new();
    let mut last: HashMap<u64, u64> = HashMap::new();
    for rec in records(&r, &*dev) {
        let id = parse_record(&rec.data).expect("a submitted record");
        assert!(found.insert(id, rec.lsn).is_none(), "record {id} twice");
        if let Some(prev) = last.insert(id >> 32, id & 0xFFFF_FFFF) {
            assert!(prev < id & 0xFFFF_FFFF, "append order within a thread");
        }
    }
    for (id, lsn) in &acked {
        if lsn.get() >= sb.log_head_lsn {
            assert_eq!(
                found.get(id),
                Some(lsn),
                "acknowledged record {id} of {lsn}"
            );
        }
    }
    eprintln!("{}", r.report());

    // Appending continues at the next LSN and offset.
    let log = RefLog::open(Arc::clone(&dev), &sb, &r, LogConfig::default()).expect("open");
    let lsn = log
        .append_durable(&record(u64::MAX >> 1, 40))
        .expect("append");
    assert_eq!(lsn, r.end().lsn);
    let r2 = replay(&*dev, &sb).expect("replay");
    assert_eq!(r2.record_count(), r.record_count() + 1);
    assert_eq!(r2.end().lsn, r.end().lsn.next());
}
