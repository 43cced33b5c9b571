//! Crash simulation of the ref log on [`SimStorage`], driven by seeds.
//!
//! Each seed formats a small device, then runs several *incarnations*: read
//! the newest superblock, replay, check the replay against a model, open the
//! log, run a random mix of appends, durable appends, waits, syncs,
//! checkpoints (superblock write, then trim) and transaction id changes, and
//! lose power at a seeded mutating storage operation ([`common::CrashAt`]):
//! in the middle of a batch write (the batch may survive, vanish or tear),
//! of a flush, of a superblock write, or of the flush done by `open`.
//!
//! After every crash the replay must:
//! - succeed (no `Corrupt`: the log may only end after the superblock tail);
//! - contain every acknowledged record (and every record an earlier replay
//!   returned) whose LSN is at or after the superblock's head, with the LSN
//!   its ticket named, exactly once;
//! - contain nothing that was never submitted (records carry an id and
//!   content derived from it);
//! - be in LSN order, records in append order, each batch holding exactly
//!   the records assigned to its LSN (batches are atomic);
//! - be identical when run twice.
//!
//! `deterministic_crashes` drives everything from one thread, so a seed
//! reproduces the same run bit for bit: `REFD_LOG_SIM_SEED=<n>` reruns one
//! seed, `REFD_LOG_SIM_SEEDS=<count>` changes how many run, from
//! `REFD_LOG_SIM_FIRST_SEED` (default 0).
//! `threaded_crashes` uses real submitter threads and a checkpoint thread;
//! thread interleavings make a seed reproduce the workload and crash point,
//! not the exact schedule: `REFD_LOG_SIM_THREADED_SEEDS=<count>` (default
//! 150) from `REFD_LOG_SIM_THREADED_FIRST_SEED` (default 0).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    device_bytes, parse_record, read_superblock, record, records, superblock, write_superblock,
    CrashAt, Gen, Rec,
};
use refd_ioring::format::Superblock;
use refd_ioring::log::StopCause;
use refd_ioring::{
    replay, Durability, LogBounds, LogConfig, LogError, Lsn, RefLog, Replay, SimConfig, SimStorage,
    Storage, Ticket,
};

const SEEDS_DEFAULT: u64 = 4000;
const INCARNATIONS: usize = 3;
const STEPS: usize = 200;
const CRASH_OPS_MAX: u64 = 260;

/// What the test knows about the records.
#[derive(Debug, Default)]
struct Model {
    /// Every record ever submitted: id -> length.
    submitted: HashMap<u64, usize>,
    /// Records that must survive while their LSN is at or after the
    /// superblock head: acknowledged ones, and those an earlier replay
    /// returned (durable since `open` flushed them).
    must_have: BTreeMap<u64, Lsn>,
    /// Records assigned to each LSN, in append order.
    by_lsn: BTreeMap<Lsn, Vec<u64>>,
    next_id: u64,
}

#[derive(Debug, Default)]
struct Tally {
    crash_points: u64,
    crashes_mid_run: u64,
    stop_reasons: BTreeMap<&'static str, u64>,
    truncated: u64,
    records_replayed: u64,
    lap_skips: u64,
    acked: u64,
}

fn stop_reason(cause: &StopCause) -> &'static str {
    use refd_ioring::format::FormatError as F;
    match cause {
        StopCause::Format(F::BadMagic { .. }) => "bad magic",
        StopCause::Format(F::BadChecksum { .. }) => "bad header checksum",
        StopCause::Format(F::Torn { .. }) => "torn",
        StopCause::Format(F::Stale { .. }) => "stale",
        StopCause::Format(F::WrongAddress { .. }) => "wrong address",
        StopCause::Format(_) => "other format error",
        StopCause::LsnMismatch { .. } => "lsn mismatch",
        StopCause::CrossesRegionEnd { .. } => "crosses region end",
        StopCause::BeyondHead { .. } => "beyond head",
        StopCause::NotALapSkip { .. } => "not a lap skip",
        StopCause::RegionFull { .. } => "region full",
        StopCause::ChainMismatch { .. } => "chain mismatch",
        StopCause::Unreadable { .. } => "unreadable",
    }
}

/// Checks a replay against the model; see the module docs.
fn check_replay(
    (r, recs): (&Replay, &[Rec]),
    sb: &Superblock,
    model: &Model,
    ordered_ids: bool,
) -> Result<(), String> {
    let head = Lsn(sb.log_head_lsn);
    let mut seen = HashSet::new();
    let mut per_lsn: BTreeMap<Lsn, Vec<u64>> = BTreeMap::new();
    let mut last_lsn = Lsn(0);
    let mut last_id: Option<u64> = None;
    for rec in recs {
        let id = parse_record(&rec.data)
            .ok_or_else(|| format!("{}: a record that was never submitted", rec.lsn))?;
        if model.submitted.get(&id) != Some(&rec.data.len()) {
            return Err(format!("{}: record {id} was never submitted", rec.lsn));
        }
        if !seen.insert(id) {
            return Err(format!("{}: record {id} replayed twice", rec.lsn));
        }
        if rec.lsn < last_lsn || rec.lsn < head {
            return Err(format!(
                "{}: out of order (previous {last_lsn}, head {head})",
                rec.lsn
            ));
        }
        if ordered_ids && last_id.is_some_and(|l| id <= l) {
            return Err(format!(
                "{}: record {id} replayed after {last_id:?}",
                rec.lsn
            ));
        }
        last_lsn = rec.lsn;
        last_id = Some(id);
        per_lsn.entry(rec.lsn).or_default().push(id);
    }
    for (id, lsn) in model.must_have.range(..) {
        if *lsn < head {
            continue;
        }
        if !per_lsn.get(lsn).is_some_and(|ids| ids.contains(id)) {
            return Err(format!(
                "acknowledged record {id} of {lsn} is missing (head {head}); {}",
                r.report()
            ));
        }
    }
    for b in r.batches() {
        let got = per_lsn.get(&b.lsn).cloned().unwrap_or_default();
        let assigned = model.by_lsn.get(&b.lsn).cloned().unwrap_or_default();
        let got_sorted: Vec<u64> = {
            let mut v = got.clone();
            v.sort_unstable();
            v
        };
        let assigned_sorted: Vec<u64> = {
            let mut v = assigned.clone();
            v.sort_unstable();
            v
        };
        if got_sorted != assigned_sorted {
            return Err(format!(
                "{} holds records {got:?} but {assigned:?} were assigned to it",
                b.lsn
            ));
        }
        if ordered_ids && got != assigned {
            return Err(format!("{}: records not in append order", b.lsn));
        }
    }
    let end = r.end();
    let expected_end = r.batches().last().map_or(head, |b| b.lsn.next());
    if end.lsn != expected_end {
        return Err(format!(
            "report end {end} after batches ending at {expected_end}"
        ));
    }
    Ok(())
}

/// After a successful replay: the replayed records are what the next
/// incarnation must keep; LSNs from the replay end on are reused.
fn adopt_replay(model: &mut Model, recs: &[Rec]) {
    model.by_lsn.clear();
    model.must_have.clear();
    for rec in recs {
        if let Some(id) = parse_record(&rec.data) {
            model.by_lsn.entry(rec.lsn).or_default().push(id);
            model.must_have.insert(id, rec.lsn);
        }
    }
}

fn record_len(gen: &mut Gen, max: usize) -> usize {
    let len = match gen.below(100) {
        0..=69 => 32,
        70..=89 => 8 + gen.below(300) as usize,
        90..=97 => 300 + gen.below(2700) as usize,
        _ => 3000 + gen.below(20_000) as usize,
    };
    len.min(max)
}

fn config_for(gen: &mut Gen, seed: u64) -> (u64, LogConfig) {
    let log_bytes = [32u64 << 10, 64 << 10, 128 << 10, 256 << 10][gen.below(4) as usize];
    let config = LogConfig {
        batch_bytes_max: [4096usize, 16 << 10, 1 << 20][gen.below(3) as usize],
        queued_records_max: [1usize, 3, 16, 1000][gen.below(4) as usize],
        queued_bytes_max: [200usize, 4096, 1 << 20][gen.below(3) as usize],
        durability: if seed.is_multiple_of(2) {
            Durability::WriteDurable
        } else {
            Durability::WriteThenFlush
        },
    };
    (log_bytes, config)
}

/// One incarnation's driver state.
struct Run<'a> {
    gen: &'a mut Gen,
    model: &'a mut Model,
    log: RefLog<Arc<CrashAt>>,
    storage: Arc<CrashAt>,
    sb: Superblock,
    /// A superblock write in flight at the crash (it may have survived).
    sb_in_flight: Option<Superblock>,
    outstanding: Vec<(u64, Ticket<Arc<CrashAt>>)>,
    acked: u64,
}

/// `Ok(true)` to continue, `Ok(false)` when the crash stopped the run.
type Step = Result<bool, String>;

impl Run<'_> {
    fn stopped(&self, e: LogError, what: &str) -> Step {
        if e.is_failed() && self.storage.crashed() {
            Ok(false)
        } else {
            Err(format!("{what}: unexpected error {e}"))
        }
    }

    fn promote(&mut self) {
        let durable = self.log.durable_lsn();
        let model = &mut *self.model;
        let mut acked = 0;
        self.outstanding.retain(|(id, t)| {
            if t.lsn() <= durable {
                model.must_have.insert(*id, t.lsn());
                acked += 1;
                false
            } else {
                true
            }
        });
        self.acked += acked;
    }

    fn checkpoint(&mut self, upto: Lsn) -> Step {
        let bounds = match self.log.bounds(upto) {
            Ok(b) => b,
            Err(e) => return Err(format!("bounds({upto}): {e}")),
        };
        let mut next = self.sb.clone();
        next.generation += 1;
        next.last_txn_id = self.log.txn_id();
        bounds.apply_to(&mut next);
        if let Err(e) = write_superblock(&*self.storage, &next) {
            if self.storage.crashed() {
                self.sb_in_flight = Some(next);
                return Ok(false);
            }
            return Err(format!("superblock write: {e}"));
        }
        self.sb = next;
        match self.log.trim(upto) {
            Ok(head) if head.offset == bounds.head_offset => Ok(true),
            Ok(head) => Err(format!(
                "trim gave head {head}, bounds said {}",
                bounds.head_offset
            )),
            Err(e) => Err(format!("trim({upto}): {e}")),
        }
    }

    /// Keeps the ring from filling: a single-threaded driver must never
    /// make the leader wait for a trim only it could do.
    fn make_room(&mut self, len: usize) -> Step {
        let margin = 2 * (len as u64 + 4096 + 100) + 4096;
        if self.log.used_bytes() + margin <= self.log.log_bytes() {
            return Ok(true);
        }
        if let Err(e) = self.log.sync() {
            return self.stopped(e, "sync before checkpoint");
        }
        self.promote();
        self.checkpoint(self.log.durable_lsn().next())
    }

    fn append(&mut self, durable: bool) -> Step {
        let len = record_len(self.gen, self.log.record_bytes_max());
        if !self.make_room(len)? {
            return Ok(false);
        }
        let id = self.model.next_id;
        self.model.next_id += 1;
        let rec = record(id, len);
        self.model.submitted.insert(id, rec.len());
        let ticket = match self.log.append(&rec) {
            Ok(t) => t,
            Err(e) => return self.stopped(e, "append"),
        };
        self.model.by_lsn.entry(ticket.lsn()).or_default().push(id);
        let lsn = ticket.lsn();
        self.outstanding.push((id, ticket));
        if durable {
            match self.log.wait_for(lsn) {
                Ok(()) => self.promote(),
                Err(e) => return self.stopped(e, "append_durable"),
            }
        }
        Ok(true)
    }

    fn step(&mut self) -> Step {
        match self.gen.below(100) {
            0..=59 => self.append(false),
            60..=69 => self.append(true),
            70..=79 => {
                if self.outstanding.is_empty() {
                    return Ok(true);
                }
                let i = self.gen.below(self.outstanding.len() as u64) as usize;
                let r = self.outstanding[i].1.wait();
                match r {
                    Ok(_) => {
                        self.promote();
                        Ok(true)
                    }
                    Err(e) => self.stopped(e, "wait"),
                }
            }
            80..=84 => match self.log.sync() {
                Ok(_) => {
                    self.promote();
                    Ok(true)
                }
                Err(e) => self.stopped(e, "sync"),
            },
            85..=95 => {
                let head = self.log.head().lsn.get();
                let durable = self.log.durable_lsn().get();
                let upto = Lsn(head + self.gen.below(durable + 2 - head));
                self.checkpoint(upto)
            }
            _ => {
                let txn = self.log.txn_id() + 1;
                match self.log.set_txn_id(txn) {
                    Ok(()) => Ok(true),
                    Err(e) => Err(format!("set_txn_id: {e}")),
                }
            }
        }
    }
}

fn run_seed(seed: u64, tally: &mut Tally) -> Result<(), String> {
    let mut gen = Gen::new(seed);
    let (log_bytes, config) = config_for(&mut gen, seed);
    let mut sim_config = SimConfig::new(device_bytes(log_bytes), seed);
    sim_config.torn_probability = [0.0, 0.2, 0.5][gen.below(3) as usize];
    let mut dev = SimStorage::new(sim_config).map_err(|e| e.to_string())?;
    let first = superblock(dev.geometry(), log_bytes, 1, LogBounds::empty());
    write_superblock(&dev, &first).map_err(|e| e.to_string())?;
    let mut model = Model::default();
    let mut expected_generations = vec![1u64];

    for inc in 0..=INCARNATIONS {
        let sb = read_superblock(&dev).map_err(|e| format!("incarnation {inc}: {e}"))?;
        if !expected_generations.contains(&sb.generation) {
            return Err(format!(
                "incarnation {inc}: picked superblock generation {}, expected one of {expected_generations:?}",
                sb.generation
            ));
        }
        let r = replay(&dev, &sb).map_err(|e| format!("incarnation {inc}: replay failed: {e}"))?;
        let again = replay(&dev, &sb).map_err(|e| format!("incarnation {inc}: replay 2: {e}"))?;
        if again != r {
            return Err(format!("incarnation {inc}: replay is not idempotent"));
        }
        let recs = records(&r, &dev);
        check_replay((&r, &recs), &sb, &model, true)
            .map_err(|e| format!("incarnation {inc}: {e}"))?;
        let report = r.report();
        *tally
            .stop_reasons
            .entry(stop_reason(&report.stop))
            .or_default() += 1;
        tally.truncated += u64::from(report.truncated.is_some());
        tally.records_replayed += report.records;
        tally.lap_skips += u64::from(report.skipped_bytes > 0);
        adopt_replay(&mut model, &recs);
        if inc == INCARNATIONS {
            break;
        }

        tally.crash_points += 1;
        let crash_at = 1 + gen.below(CRASH_OPS_MAX);
        let storage = Arc::new(CrashAt::new(dev, crash_at));
        let log = match RefLog::open(Arc::clone(&storage), &sb, &r, config) {
            Ok(log) => log,
            Err(e) if e.is_failed() && storage.crashed() => {
                tally.crashes_mid_run += 1;
                dev = storage.take_image();
                expected_generations = vec![sb.generation];
                continue;
            }
            Err(e) => return Err(format!("incarnation {inc}: open: {e}")),
        };
        let mut run = Run {
            gen: &mut gen,
            model: &mut model,
            log,
            storage: Arc::clone(&storage),
            sb,
            sb_in_flight: None,
            outstanding: Vec::new(),
            acked: 0,
        };
        for step in 0..STEPS {
            match run.step() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(format!("incarnation {inc} step {step}: {e}")),
            }
        }
        // Nothing is acknowledged after the crash: the durable LSN froze.
        let durable = run.log.durable_lsn();
        run.promote();
        if storage.crashed() {
            tally.crashes_mid_run += 1;
            // Nothing can become durable any more, whatever is retried.
            let _ = run.log.sync();
            if run.log.durable_lsn() != durable {
                return Err(format!(
                    "incarnation {inc}: durable LSN moved after the crash"
                ));
            }
        }
        tally.acked += run.acked;
        expected_generations = vec![run.sb.generation];
        expected_generations.extend(run.sb_in_flight.as_ref().map(|s| s.generation));
        drop(run);
        dev = storage.take_image();
    }
    Ok(())
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("REFD_LOG_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("REFD_LOG_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS_DEFAULT);
    let first: u64 = std::env::var("REFD_LOG_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (first..first + count).collect()
}

#[test]
fn deterministic_crashes() {
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let seeds = seeds();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed, &mut tally) {
            eprintln!("FAILED seed {seed}: {e} (rerun: REFD_LOG_SIM_SEED={seed})");
            failures.push(seed);
        }
    }
    eprintln!(
        "{} seeds, {} crash points ({} during the run), {} records acknowledged, {} replayed, \
         {} replays truncated a torn batch, {} crossed a lap skip, in {:?}; log ends: {:?}",
        seeds.len(),
        tally.crash_points,
        tally.crashes_mid_run,
        tally.acked,
        tally.records_replayed,
        tally.truncated,
        tally.lap_skips,
        started.elapsed(),
        tally.stop_reasons
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
    if seeds.len() as u64 >= SEEDS_DEFAULT {
        for reason in ["bad magic", "torn", "stale"] {
            assert!(
                tally.stop_reasons.contains_key(reason),
                "scenario never ends with {reason}: {:?}",
                tally.stop_reasons
            );
        }
        assert!(tally.truncated > 0 && tally.lap_skips > 0, "{tally:?}");
    }
}

/// Real threads: 4 submitters (windows of tickets and durable appends) and
/// a checkpoint thread that trims when half the ring is used, crashing at a
/// seeded storage operation.
#[test]
fn threaded_crashes() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 300;
    let seeds: u64 = std::env::var("REFD_LOG_SIM_THREADED_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let first: u64 = std::env::var("REFD_LOG_SIM_THREADED_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let started = Instant::now();
    let mut crashed_runs = 0;
    for seed in first..first + seeds {
        let mut gen = Gen::new(seed ^ 0x7EAD);
        let log_bytes = [64u64 << 10, 256 << 10][gen.below(2) as usize];
        let config = LogConfig {
            batch_bytes_max: 16 << 10,
            queued_records_max: [8usize, 256][gen.below(2) as usize],
            durability: if seed % 2 == 0 {
                Durability::WriteDurable
            } else {
                Durability::WriteThenFlush
            },
            ..LogConfig::default()
        };
        let dev = SimStorage::new(SimConfig::new(device_bytes(log_bytes), seed)).expect("sim");
        let sb0 = superblock(dev.geometry(), log_bytes, 1, LogBounds::empty());
        write_superblock(&dev, &sb0).expect("format");
        let r = replay(&dev, &sb0).expect("replay");
        let crash_at = 1 + gen.below(400);
        let storage = Arc::new(CrashAt::new(dev, crash_at));
        let log = match RefLog::open(Arc::clone(&storage), &sb0, &r, config) {
            Ok(l) => l,
            Err(e) => {
                assert!(e.is_failed() && storage.crashed(), "seed {seed}: open: {e}");
                continue;
            }
        };
        let submitted: Arc<Mutex<HashMap<u64, (usize, Lsn)>>> = Arc::default();
        let acked: Arc<Mutex<Vec<(u64, Lsn)>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let sbs: Arc<Mutex<(Superblock, Option<Superblock>)>> =
            Arc::new(Mutex::new((sb0.clone(), None)));

        let submitters: Vec<_> = (0..THREADS)
            .map(|t| {
                let log = log.clone();
                let submitted = Arc::clone(&submitted);
                let acked = Arc::clone(&acked);
                let storage = Arc::clone(&storage);
                let mut gen = Gen::new(seed * 31 + t);
                thread::spawn(move || {
                    let mut window: Vec<(u64, Ticket<Arc<CrashAt>>)> = Vec::new();
                    for i in 0..PER_THREAD {
                        let id = (t << 32) | i;
                        let len = record_len(&mut gen, 2000);
                        let rec = record(id, len);
                        let ticket = match log.append(&rec) {
                            Ok(t) => t,
                            Err(e) => {
                                assert!(e.is_failed() && storage.crashed(), "seed {seed}: {e}");
                                return;
                            }
                        };
                        submitted
                            .lock()
                            .expect("submitted")
                            .insert(id, (rec.len(), ticket.lsn()));
                        window.push((id, ticket));
                        if window.len() as u64 > gen.below(16) {
                            let last = &window[window.len() - 1].1;
                            match last.wait() {
                                Ok(_) => {
                                    let mut a = acked.lock().expect("acked");
                                    a.extend(window.drain(..).map(|(id, t)| (id, t.lsn())));
                                }
                                Err(e) => {
                                    assert!(e.is_failed() && storage.crashed(), "seed {seed}: {e}");
                                    return;
                                }
                            }
                        }
                    }
                    if let Some((_, last)) = window.last() {
                        if last.wait().is_ok() {
                            let mut a = acked.lock().expect("acked");
                            a.extend(window.drain(..).map(|(id, t)| (id, t.lsn())));
                        }
                    }
                })
            })
            .collect();
        let checkpointer = {
            let log = log.clone();
            let storage = Arc::clone(&storage);
            let done = Arc::clone(&done);
            let sbs = Arc::clone(&sbs);
            thread::spawn(move || {
                while !done.load(Ordering::Acquire) && !storage.crashed() {
                    if log.used_bytes() * 2 < log.log_bytes() {
                        thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    let upto = log.durable_lsn().next();
                    let Ok(bounds) = log.bounds(upto) else { break };
                    let mut next = sbs.lock().expect("sbs").0.clone();
                    next.generation += 1;
                    bounds.apply_to(&mut next);
                    if write_superblock(&*storage, &next).is_err() {
                        sbs.lock().expect("sbs").1 = Some(next);
                        break;
                    }
                    sbs.lock().expect("sbs").0 = next;
                    log.trim(upto).expect("trim");
                }
            })
        };
        for s in submitters {
            s.join().expect("submitter");
        }
        done.store(true, Ordering::Release);
        checkpointer.join().expect("checkpointer");
        crashed_runs += u64::from(storage.crashed());
        drop(log);
        let image = storage.take_image();

        let sb = read_superblock(&image).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let (durable_sb, in_flight) = sbs.lock().expect("sbs").clone();
        assert!(
            sb.generation == durable_sb.generation
                || in_flight.is_some_and(|s| s.generation == sb.generation),
            "seed {seed}: picked generation {}",
            sb.generation
        );
        let r = replay(&image, &sb).unwrap_or_else(|e| panic!("seed {seed}: replay: {e}"));
        let submitted = submitted.lock().expect("submitted");
        let mut model = Model::default();
        for (&id, &(len, lsn)) in submitted.iter() {
            model.submitted.insert(id, len);
            model.by_lsn.entry(lsn).or_default().push(id);
        }
        for (id, lsn) in acked.lock().expect("acked").iter() {
            model.must_have.insert(*id, *lsn);
        }
        let recs = records(&r, &image);
        if let Err(e) = check_replay((&r, &recs), &sb, &model, false) {
            panic!("seed {seed} (thread schedule not reproducible): {e}");
        }
        // Per thread, records come back in append order.
        let mut last: HashMap<u64, u64> = HashMap::new();
        for rec in &recs {
            let id = parse_record(&rec.data).expect("checked");
            let (t, i) = (id >> 32, id & 0xFFFF_FFFF);
            if let Some(prev) = last.insert(t, i) {
                assert!(prev < i, "seed {seed}: thread {t} record {i} after {prev}");
            }
        }
    }
    eprintln!(
        "threaded: {seeds} seeds, {crashed_runs} crashed during the run, in {:?}",
        started.elapsed()
    );
}
