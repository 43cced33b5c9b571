//! Group-commit throughput of the ref log on a file-backed `UringStorage`.
//!
//! ```text
//! cargo run --release -p refd-ioring --example log_bench -- \
//!     [--threads 2] [--records 2000000] [--record-bytes 32] [--window 4096] \
//!     [--log-mib 256] [--dir target/refd-log-bench] [--flush]
//! ```
//!
//! Each submitter thread appends `--records / --threads` records of
//! `--record-bytes` bytes and keeps at most `--window` records not yet
//! acknowledged: when the window is full it waits for the newest ticket
//! (which acknowledges the whole window). `--window 1` is one
//! `append_durable` per record. A checkpoint thread stands in for the
//! engine's commit: when half the ring is used it writes a superblock with
//! the durable bounds and trims, so the ring wraps as in production.
//! `--flush` uses write + flush instead of `RWF_DSYNC` writes.
//!
//! Prints durable records per second and the log bytes consumed per record
//! (header, varint framing, padding, lap skips). Measures; asserts nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use refd_ioring::format::{FsId, Layout, Superblock, NODE_BYTES};
use refd_ioring::{
    replay, Device, Durability, FileAllocation, LogBounds, LogConfig, RefLog, Storage, UringConfig,
    UringStorage,
};

const LOG_START: u64 = 8192;

#[derive(Debug)]
struct Args {
    threads: u64,
    records: u64,
    record_bytes: usize,
    window: usize,
    log_mib: u64,
    dir: PathBuf,
    flush: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        threads: 2,
        records: 2_000_000,
        record_bytes: 32,
        window: 4096,
        log_mib: 256,
        dir: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/refd-log-bench"
        )),
        flush: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--flush" {
            a.flush = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--threads" => a.threads = num()?.max(1),
            "--records" => a.records = num()?,
            "--record-bytes" => a.record_bytes = num()? as usize,
            "--window" => a.window = num()?.max(1) as usize,
            "--log-mib" => a.log_mib = num()?.max(1),
            "--dir" => a.dir = PathBuf::from(&value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn superblock(dev: &UringStorage, log_bytes: u64) -> Superblock {
    let node_region_start = LOG_START + log_bytes;
    let mut sb = Superblock {
        last_txn_id: 1,
        ..Superblock::empty(
            FsId([0xBE; 16]),
            dev.geometry(),
            Layout {
                log_start: LOG_START,
                log_bytes,
                node_region_start,
                node_region_bytes: NODE_BYTES as u64,
            },
        )
    };
    LogBounds::empty().apply_to(&mut sb);
    sb
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.dir)?;
    let path = args.dir.join(format!("log-{}", std::process::id()));
    let log_bytes = args.log_mib << 20;
    let size = LOG_START + log_bytes + NODE_BYTES as u64;
    let device = match Device::create_file(&path, size, FileAllocation::Reserve) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create {}: {e}", path.display());
            return Err(e.into());
        }
    };
    let dev = Arc::new(UringStorage::new(device, UringConfig::default())?);
    let result = run(&args, &dev, log_bytes);
    drop(dev);
    let _ = std::fs::remove_file(&path);
    result
}

fn run(
    args: &Args,
    dev: &Arc<UringStorage>,
    log_bytes: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    // Write the whole log region once so that the measured writes overwrite
    // allocated, written blocks (as a log does after its first lap).
    let chunk = vec![0u8; 8 << 20];
    let mut at = 0;
    while at < log_bytes {
        let n = chunk.len().min((log_bytes - at) as usize);
        dev.write(LOG_START + at, &chunk[..n])?;
        at += n as u64;
    }
    dev.flush()?;
    let sb0 = superblock(dev, log_bytes);
    dev.write_durable(sb0.addr(), &sb0.encode()?)?;
    let r = replay(&**dev, &sb0)?;
    let config = LogConfig {
        durability: if args.flush {
            Durability::WriteThenFlush
        } else {
            Durability::WriteDurable
        },
        ..LogConfig::default()
    };
    let log = RefLog::open(Arc::clone(dev), &sb0, &r, config)?;

    let done = Arc::new(AtomicBool::new(false));
    let sb_now = Arc::new(Mutex::new(sb0));
    let checkpointer = {
        let (log, dev, done, sb_now) = (
            log.clone(),
            Arc::clone(dev),
            Arc::clone(&done),
            Arc::clone(&sb_now),
        );
        thread::spawn(move || -> Result<u64, String> {
            let mut n = 0;
            while !done.load(Ordering::Acquire) {
                if log.used_bytes() * 2 < log.log_bytes() {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let upto = log.durable_lsn().next();
                let bounds = log.bounds(upto).map_err(|e| e.to_string())?;
                let mut sb = sb_now.lock().map_err(|e| e.to_string())?;
                sb.generation += 1;
                bounds.apply_to(&mut sb);
                let block = sb.encode().map_err(|e| e.to_string())?;
                dev.write_durable(sb.addr(), &block)
                    .map_err(|e| e.to_string())?;
                drop(sb);
                log.trim(upto).map_err(|e| e.to_string())?;
                n += 1;
            }
            Ok(n)
        })
    };

    let per_thread = args.records / args.threads;
    let record = vec![0x5Au8; args.record_bytes];
    let started = Instant::now();
    let submitters: Vec<_> = (0..args.threads)
        .map(|_| {
            let log = log.clone();
            let record = record.clone();
            let window = args.window;
            thread::spawn(move || -> Result<(), String> {
                if window == 1 {
                    for _ in 0..per_thread {
                        log.append_durable(&record).map_err(|e| e.to_string())?;
                    }
                    return Ok(());
                }
                let mut in_window = 0;
                let mut last = None;
                for _ in 0..per_thread {
                    last = Some(log.append(&record).map_err(|e| e.to_string())?);
                    in_window += 1;
                    if in_window == window {
                        if let Some(t) = last.take() {
                            t.wait().map_err(|e| e.to_string())?;
                        }
                        in_window = 0;
                    }
                }
                if let Some(t) = last {
                    t.wait().map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        })
        .collect();
    for s in submitters {
        s.join().map_err(|_| "submitter panicked")??;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Release);
    let checkpoints = checkpointer.join().map_err(|_| "checkpointer panicked")??;

    let s = log.stats();
    let u = dev.stats();
    let secs = elapsed.as_secs_f64();
    let log_per_record =
        (s.batch_bytes_written + s.skipped_bytes) as f64 / s.records_written as f64;
    println!(
        "threads {} window {} record {} B durability {:?}: {} records in {:.3} s = {:.0} durable records/s",
        args.threads, args.window, args.record_bytes, config.durability, s.records_written, secs,
        s.records_written as f64 / secs
    );
    println!(
        "  {} batches ({:.0}/s, {:.1} records/batch avg, {} max), log {:.1} B/record = {} B record + {:.1} B overhead (framing+header+padding+skips), {} checkpoints, {} uring write chunks, {} flushes",
        s.batches_written,
        s.batches_written as f64 / secs,
        s.records_written as f64 / s.batches_written as f64,
        s.records_per_batch_max,
        log_per_record,
        args.record_bytes,
        s.overhead_bytes_per_record(),
        checkpoints,
        u.write_chunks,
        u.flushes,
    );
    Ok(())
}
