//! `refd-bench durable`: durable ingest on a device. Ops go through the
//! durable engine (logged, acknowledged when durable, committed into the
//! on-device B+tree on an interval); measured: durable ops/s, ack latency,
//! commits/s, log and tree bytes written per op, and the device's own
//! durable sequential write rate measured by this tool in the same run.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use refd_durable::{DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::{Device, FileAllocation, Storage, UringStorage};

use crate::workload::{deal, generate, Workload};

/// Size of a device file the benchmark creates.
const DEVICE_BYTES_DEFAULT: u64 = 4 << 30;
/// Block written per durable write when measuring the device.
const PROBE_BLOCK_BYTES: usize = 256 << 10;

/// Arguments of `durable`.
#[derive(Debug, clap::Args)]
pub struct DurableArgs {
    /// Block device or file (created if missing). Its content is destroyed.
    #[arg(long)]
    pub device: PathBuf,
    /// Ingest threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Workload.
    #[arg(long, value_enum, default_value = "uniform")]
    pub workload: Workload,
    /// Distinct extents.
    #[arg(long, default_value_t = 1_000_000)]
    pub extents: u64,
    /// Ops in total.
    #[arg(long, default_value_t = 4_000_000)]
    pub ops: usize,
    /// Ops each thread keeps in flight (appended, not yet acknowledged).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Commit interval.
    #[arg(long, default_value_t = 1000)]
    pub commit_interval_ms: u64,
    /// RNG seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `durable` measured.
#[derive(Debug, serde::Serialize)]
pub struct DurableReport {
    /// Ops acknowledged.
    pub ops: u64,
    /// Wall time of the ingest (to the last acknowledgement).
    pub ingest_s: f64,
    /// Acknowledged ops per second.
    pub durable_ops_per_sec: f64,
    /// Ack latency p50 (ms).
    pub p50_ack_ms: f64,
    /// Ack latency p99 (ms).
    pub p99_ack_ms: f64,
    /// Ack latency max (ms).
    pub max_ack_ms: f64,
    /// Commits during the ingest.
    pub commits: u64,
    /// Commits per second.
    pub commits_per_sec: f64,
    /// Longest commit (ms).
    pub commit_ms_max: f64,
    /// Log bytes written (batches) per acknowledged op.
    pub log_bytes_per_op: f64,
    /// B+tree bytes written per op.
    pub tree_bytes_per_op: f64,
    /// The device's durable sequential write rate (this run, same tool).
    pub device_durable_mb_per_sec: f64,
    /// durable MB/s of refd's log writes / the device's rate.
    pub log_mb_per_sec: f64,
}

/// The device's own durable sequential write rate: 256 KiB durable writes
/// (RWF_DSYNC) for about a second at the end of the device.
fn device_rate(s: &UringStorage) -> Result<f64, String> {
    let size = s.geometry().size_bytes;
    let block = vec![0xA5u8; PROBE_BLOCK_BYTES];
    let blocks = (size / 4 / PROBE_BLOCK_BYTES as u64).max(1);
    let start_at = size - blocks * PROBE_BLOCK_BYTES as u64;
    let t = Instant::now();
    let mut written = 0u64;
    let mut i = 0u64;
    while t.elapsed() < Duration::from_secs(1) {
        s.write_durable(start_at + (i % blocks) * PROBE_BLOCK_BYTES as u64, &block)
            .map_err(|e| e.to_string())?;
        written += PROBE_BLOCK_BYTES as u64;
        i += 1;
    }
    Ok(written as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Run `durable`.
pub fn run(args: &DurableArgs) -> Result<DurableReport, String> {
    if args.threads == 0 || args.window == 0 {
        return Err("--threads and --window must be at least 1".into());
    }
    if args.workload == Workload::BtrfsTrace {
        return Err("durable runs the generated workloads".into());
    }
    let path = &args.device;
    if !path.exists() {
        Device::create_file(path, DEVICE_BYTES_DEFAULT, FileAllocation::Reserve)
            .map_err(|e| e.to_string())?;
    }
    let dev = crate::crash::open_device(path)?;
    let device_mb = device_rate(&dev)?;
    DurableEngine::format(&dev, FormatOptions::default()).map_err(|e| e.to_string())?;
    let (engine, _) =
        DurableEngine::open(dev, OpenOptions::default()).map_err(|e| e.to_string())?;
    if !args.json {
        eprintln!("generating {} ops of {:?}...", args.ops, args.workload);
    }
    let stream = generate(args.workload, args.extents, args.ops, args.seed);
    let per_thread = deal(&stream.ops, args.threads, true);
    let log_before = engine.log().stats();
    let stop = AtomicBool::new(false);
    let commits = AtomicU64::new(0);
    let nodes_written = AtomicU64::new(0);
    let commit_ms_max = Mutex::new(0f64);
    let barrier = Barrier::new(args.threads + 1);
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let results: Vec<Result<Histogram<u64>, String>> = std::thread::scope(|s| {
        let committer = s.spawn(|| -> Result<(), String> {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(args.commit_interval_ms));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let t = Instant::now();
                let r = engine.commit().map_err(|e| e.to_string())?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let mut m = commit_ms_max.lock().unwrap_or_else(|p| p.into_inner());
                *m = m.max(ms);
                commits.fetch_add(1, Ordering::SeqCst);
                nodes_written.fetch_add(r.nodes_written, Ordering::SeqCst);
            }
            Ok(())
        });
        let workers: Vec<_> = per_thread
            .iter()
            .map(|ops| {
                let (engine, barrier) = (&engine, &barrier);
                s.spawn(move || -> Result<Histogram<u64>, String> {
                    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
                        .map_err(|e| e.to_string())?;
                    let mut inflight = VecDeque::with_capacity(args.window);
                    barrier.wait();
                    for op in ops {
                        let t = Instant::now();
                        let ticket = engine.add(op).map_err(|e| e.to_string())?;
                        inflight.push_back((t, ticket));
                        if inflight.len() >= args.window {
                            let (t, ticket) = inflight.pop_front().expect("window is non-empty");
                            ticket.wait().map_err(|e| e.to_string())?;
                            h.saturating_record(t.elapsed().as_nanos() as u64);
                        }
                    }
                    for (t, ticket) in inflight {
                        ticket.wait().map_err(|e| e.to_string())?;
                        h.saturating_record(t.elapsed().as_nanos() as u64);
                    }
                    Ok(h)
                })
            })
            .collect();
        barrier.wait();
        let out: Vec<_> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("ingest thread panicked".into()))
            })
            .collect();
        stop.store(true, Ordering::SeqCst);
        let committed = committer
            .join()
            .unwrap_or_else(|_| Err("committer panicked".into()));
        let mut out = out;
        if let Err(e) = committed {
            out.push(Err(e));
        }
        out
    });
    let ingest = started.elapsed();
    for r in results {
        hist.add(r?).map_err(|e| format!("{e:?}"))?;
    }
    let log_after = engine.log().stats();
    let ops = hist.len();
    let commits = commits.load(Ordering::SeqCst);
    let log_bytes = log_after.batch_bytes_written - log_before.batch_bytes_written;
    let tree_bytes = nodes_written.load(Ordering::SeqCst) * refd_ioring::format::NODE_BYTES as u64;
    let commit_ms_max = commit_ms_max
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    Ok(DurableReport {
        ops,
        ingest_s: ingest.as_secs_f64(),
        durable_ops_per_sec: ops as f64 / ingest.as_secs_f64(),
        p50_ack_ms: hist.value_at_quantile(0.5) as f64 / 1e6,
        p99_ack_ms: hist.value_at_quantile(0.99) as f64 / 1e6,
        max_ack_ms: hist.max() as f64 / 1e6,
        commits,
        commits_per_sec: commits as f64 / ingest.as_secs_f64(),
        commit_ms_max,
        log_bytes_per_op: log_bytes as f64 / ops.max(1) as f64,
        tree_bytes_per_op: tree_bytes as f64 / ops.max(1) as f64,
        device_durable_mb_per_sec: device_mb,
        log_mb_per_sec: log_bytes as f64 / ingest.as_secs_f64() / 1e6,
    })
}
