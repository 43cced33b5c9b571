//! Deterministic crash simulation of the durable engine on [`SimStorage`].
//!
//! Each seed formats a small device (512 KiB log, so the log wraps and is
//! trimmed many times), allocates a few data extents, then runs several
//! *incarnations*: open (recovery), check the recovered state against the
//! model, run a random mix of `add_durable`, `add` (ticket kept), drops of
//! live refs and commits (explicit ones, and the committer's interval
//! trigger on a manual clock advanced by a seeded amount each step), with
//! an `EIO` injected at a seeded write or flush
//! (the storage latches; nothing after it is acknowledged), then lose power
//! (`SimStorage::crash`: unflushed sectors kept, lost or torn at random).
//! Sometimes the power is lost again during the next `open`.
//!
//! Every op adds or drops one data backref with a unique
//! `(root 5, objectid, offset 0)` key, so the recovered count of each key
//! tells exactly what happened to its ops. After recovery (open + commit):
//! - every acknowledged add is present and every acknowledged drop applied,
//!   exactly once (count 1 or 0);
//! - unacknowledged ops are present or absent, never twice (count ≤ 1, no
//!   quarantined head, no unknown backref);
//! - `ExtentTree::check`, `BTree::check` pass and the B+tree items decode
//!   to exactly the in-memory tree ([`DurableEngine::verify`]).
//!
//! `REFD_DURABLE_SIM_SEED=<n>` reruns one seed; `REFD_DURABLE_SIM_SEEDS`
//! sets how many run (default 300), from `REFD_DURABLE_SIM_FIRST_SEED`
//! (default 0).

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{
    CommitPolicy, Committer, DurableEngine, FormatOptions, ManualClock, OpenOptions, Ticket,
};
use refd_ioring::format::FsId;
use refd_ioring::{FaultPlan, LogConfig, SimConfig, SimStorage};

const SEEDS_DEFAULT: u64 = 300;
const INCARNATIONS: usize = 4;
const STEPS: usize = 120;
const DEVICE_BYTES: u64 = 8 << 20;
const LOG_BYTES: u64 = 512 << 10;
/// Small batches, so the 512 KiB log admits 8 concurrent appends.
const BATCH_BYTES_MAX: usize = 16 << 10;
const EXTENTS: u64 = 6;
const EXTENT_BYTES: u64 = 1 << 20;
const ROOT: u64 = 5;
/// Objectids of the base refs that keep the extents alive.
const BASE_OBJECTID: u64 = 1 << 40;
/// Where short-lived extents are allocated.
const SHORT_LIVED_BASE: u64 = 1 << 40;
/// Refs added to extent 0 before the crashes start (~140 fit inline).
const PRELOAD_HOT_REFS: u64 = 135;
/// Commit interval of the committer; each workload step advances its
/// manual clock by up to [`STEP_MS_MAX`], so the interval trigger fires
/// about every 20 steps, at seeded moments.
const INTERVAL_MS: u64 = 500;
/// See [`INTERVAL_MS`].
const STEP_MS_MAX: u64 = 50;

type Dev = Arc<SimStorage>;

/// The seeded choices: `rand_chacha`'s [`ChaCha8Rng`] (value-stable across
/// platforms and releases) with the helpers used below.
struct Gen(ChaCha8Rng);
impl Gen {
    fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.0.gen_range(0..n)
    }
    /// True with probability `p / 100` (`p <= 100`).
    fn percent(&mut self, p: u32) -> bool {
        self.0.gen_ratio(p, 100)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Add acknowledged, no drop issued.
    Live,
    /// Drop acknowledged.
    Dead,
    /// Add issued, outcome unknown (never dropped).
    MaybeLive,
    /// Add acknowledged, drop issued with unknown outcome.
    MaybeDead,
}

fn bytenr(i: u64) -> u64 {
    (1 << 30) + i * EXTENT_BYTES
}

fn key(objectid: u64) -> RefKey {
    RefKey::ExtentData {
        root: ROOT,
        objectid,
        offset: 0,
    }
}

fn op(b: u64, action: Action, objectid: u64) -> Op {
    Op::new(b, EXTENT_BYTES, ExtentKind::Data, action, key(objectid), 0).expect("valid op")
}

#[derive(Default)]
struct Model {
    /// (bytenr, objectid) -> state.
    keys: BTreeMap<(u64, u64), St>,
    next_objectid: u64,
    next_extent: u64,
}

#[derive(Default, Debug)]
struct Tally {
    incarnations: u64,
    failures_injected: u64,
    open_crashes: u64,
    acked: u64,
    unknown: u64,
    unknown_survived: u64,
    commits: u64,
    keyed_refs_seen: u64,
    extents_freed: u64,
    barriers: u64,
    heads_held: u64,
    heads_requeued: u64,
}

/// One issued op of the current incarnation.
struct Issued {
    key: (u64, u64),
    drop: bool,
    acked: bool,
    ticket: Option<Ticket<Dev>>,
}

/// The in-memory extent cache bound for `seed`: none, smaller than the
/// extents used, or all of them; commits and lookups then read the B+tree.
fn cache_for(seed: u64) -> usize {
    [0, 2, EXTENTS as usize + 2, 1 << 20][(seed % 4) as usize]
}

fn options(cache_extents_max: usize) -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: BATCH_BYTES_MAX,
            ..LogConfig::default()
        },
        cache_extents_max,
        policy: CommitPolicy {
            interval_ms: INTERVAL_MS,
            ..CommitPolicy::default()
        },
        ..OpenOptions::default()
    }
}

fn open(dev: &Dev, cache_extents_max: usize) -> Result<DurableEngine<Dev>, String> {
    DurableEngine::open(Arc::clone(dev), options(cache_extents_max))
        .map(|(e, _info)| e)
        .map_err(|e| format!("open: {e}"))
}

/// Recovery check: commit what was replayed, compare with the model, and
/// resolve the unknown states by what was observed.
fn check_recovered(
    e: &DurableEngine<Dev>,
    model: &mut Model,
    tally: &mut Tally,
) -> Result<(), String> {
    let summary = e
        .commit()
        .map_err(|x| format!("commit after recovery: {x}"))?;
    if !summary.core.quarantined.is_empty() {
        return Err(format!(
            "recovery commit quarantined {:?}",
            summary.core.quarantined
        ));
    }
    e.verify()
        .map_err(|x| format!("verify after recovery: {x}"))?;
    let tree = e
        .committed_extents()
        .map_err(|x| format!("read the committed tree: {x}"))?;
    let mut bytenrs: Vec<u64> = model.keys.keys().map(|k| k.0).collect();
    bytenrs.extend(tree.iter().map(|(b, _)| b));
    bytenrs.sort_unstable();
    bytenrs.dedup();
    for b in bytenrs {
        let item = tree.get(b);
        if let Some(item) = item {
            tally.keyed_refs_seen += item.keyed.len() as u64;
        }
        let count = |obj: u64| item.map_or(0, |i| i.count(&key(obj)));
        let mut live = 0;
        for (&(_, obj), st) in model.keys.range((b, 0)..=(b, u64::MAX)) {
            let c = count(obj);
            let ok = match st {
                St::Live => c == 1,
                St::Dead => c == 0,
                St::MaybeLive | St::MaybeDead => c <= 1,
            };
            if !ok {
                return Err(format!(
                    "extent {b} objectid {obj}: state {st:?} but count {c}"
                ));
            }
            live += c;
        }
        let (refs, backrefs) = item.map_or((0, 0), |i| (i.refs, i.backrefs().len() as u64));
        if refs != live || backrefs != live {
            return Err(format!(
                "extent {b}: refs {refs} backrefs {backrefs} but the model explains {live}"
            ));
        }
    }
    for (&(b, obj), st) in model.keys.iter_mut() {
        let c = tree.get(b).map_or(0, |i| i.count(&key(obj)));
        if matches!(st, St::MaybeLive | St::MaybeDead) && c == 1 {
            tally.unknown_survived += 1;
        }
        *st = if c == 1 { St::Live } else { St::Dead };
    }
    Ok(())
}

/// Runs the workload until an injected failure (or the end), keeping the
/// ops it issued.
fn workload(
    e: &DurableEngine<Dev>,
    g: &mut Gen,
    model: &mut Model,
    issued: &mut Vec<Issued>,
    tally: &mut Tally,
) {
    // No commit on a full log here: `add` commits by itself (back-pressure).
    // A seq barrier comes and goes: while it is held, some refs carry its
    // seq, and commits hold their heads (kept in the B+tree, requeued by
    // recovery).
    let mut barrier = None;
    let clock = ManualClock::new();
    let mut committer = Committer::new(e, &clock);
    for _ in 0..STEPS {
        clock.advance(std::time::Duration::from_millis(g.below(STEP_MS_MAX + 1)));
        match committer.tick() {
            Ok(Some(_)) => tally.commits += 1,
            Ok(None) => {}
            Err(_) => return,
        }
        if g.percent(3) {
            barrier = match barrier {
                Some(_) => None,
                None => Some(e.core().barrier().acquire()),
            };
            tally.barriers += 1;
        }
        if g.percent(2) {
            match e.commit() {
                Ok(summary) => {
                    tally.commits += 1;
                    tally.extents_freed += summary.core.freed.len() as u64;
                    tally.heads_held += summary.core.held as u64;
                    if g.percent(10) {
                        if let Err(x) = e.verify() {
                            panic!("verify after commit: {x}");
                        }
                    }
                }
                Err(_) => return,
            }
            continue;
        }
        let live: Vec<(u64, u64)> = model
            .keys
            .iter()
            .filter(|(k, s)| **s == St::Live && k.1 < BASE_OBJECTID)
            .map(|(k, _)| *k)
            .collect();
        let drop = !live.is_empty() && g.percent(30);
        let fresh = !drop && g.percent(10);
        let k = if drop {
            // Never the base refs: they keep the fixed extents alive.
            live[g.below(live.len() as u64) as usize]
        } else if fresh {
            // A new extent whose only ref is this one: dropping it frees
            // the extent (its items are deleted from the B+tree).
            model.next_extent += 1;
            model.next_objectid += 1;
            (
                SHORT_LIVED_BASE + model.next_extent * EXTENT_BYTES,
                model.next_objectid,
            )
        } else {
            // Extent 0 is hot, so its item spills backrefs to keyed items.
            let i = if g.percent(50) { 0 } else { g.below(EXTENTS) };
            model.next_objectid += 1;
            (bytenr(i), model.next_objectid)
        };
        let action = match (drop, fresh) {
            (true, _) => Action::DropRef,
            (false, true) => Action::AddExtent,
            (false, false) => Action::AddRef,
        };
        let mut o = op(k.0, action, k.1);
        if barrier.is_some() && !fresh && g.percent(50) {
            o.seq = e.core().barrier().current();
        }
        // Mark the model now: a drop is issued only once per key.
        model
            .keys
            .insert(k, if drop { St::MaybeDead } else { St::MaybeLive });
        let durable = g.percent(60);
        let mut rec = Issued {
            key: k,
            drop,
            acked: false,
            ticket: None,
        };
        let failed = if durable {
            match e.add_durable(&o) {
                Ok(_) => {
                    rec.acked = true;
                    false
                }
                Err(_) => true,
            }
        } else {
            match e.add(&o) {
                Ok(t) => {
                    rec.ticket = Some(t);
                    false
                }
                Err(_) => true,
            }
        };
        // A drop targets only acknowledged adds; an acknowledged add is
        // droppable at once.
        if rec.acked && !drop {
            model.keys.insert(k, St::Live);
        }
        if rec.acked && drop {
            model.keys.insert(k, St::Dead);
        }
        issued.push(rec);
        if failed {
            return;
        }
        if g.percent(5) {
            if let Some(t) = issued.iter().rev().find_map(|r| r.ticket.as_ref()) {
                if t.wait().is_err() {
                    return;
                }
            }
        }
    }
}

fn run_seed(seed: u64, tally: &mut Tally) -> Result<(), String> {
    let mut g = Gen::new(seed);
    let dev: Dev = Arc::new(
        SimStorage::new(SimConfig::new(DEVICE_BYTES, seed)).map_err(|e| format!("sim: {e}"))?,
    );
    DurableEngine::format(
        &dev,
        FormatOptions {
            log_bytes: Some(LOG_BYTES),
            fs_id: Some(FsId([0x5A; 16])),
        },
    )
    .map_err(|e| format!("format: {e}"))?;
    let mut model = Model::default();
    {
        let e = open(&dev, cache_for(seed))?;
        for i in 0..EXTENTS {
            e.add_durable(&op(bytenr(i), Action::AddExtent, BASE_OBJECTID + i))
                .map_err(|x| format!("allocate: {x}"))?;
            model.keys.insert((bytenr(i), BASE_OBJECTID + i), St::Live);
        }
        // Enough refs on the hot extent that later adds spill to keyed
        // backref items.
        let mut tickets = Vec::new();
        for _ in 0..PRELOAD_HOT_REFS {
            model.next_objectid += 1;
            let k = (bytenr(0), model.next_objectid);
            tickets.push(
                e.add(&op(k.0, Action::AddRef, k.1))
                    .map_err(|x| format!("preload: {x}"))?,
            );
            model.keys.insert(k, St::Live);
        }
        e.commit().map_err(|x| format!("first commit: {x}"))?;
        if !tickets.iter().all(|t| t.is_durable()) {
            return Err("a commit left an op below its cut not durable".into());
        }
    }
    let mut dev = Arc::new(dev.crash());
    for _ in 0..INCARNATIONS {
        tally.incarnations += 1;
        // Sometimes lose power during recovery itself.
        if g.percent(15) {
            dev.set_fault_plan(if g.percent(50) {
                FaultPlan {
                    flush_eio_at: Some(1),
                    ..FaultPlan::default()
                }
            } else {
                FaultPlan {
                    write_eio_at: Some(1),
                    ..FaultPlan::default()
                }
            });
            if open(&dev, cache_for(seed)).is_ok() {
                return Err("open succeeded through an injected failure".into());
            }
            tally.open_crashes += 1;
            dev = Arc::new(dev.crash());
        }
        let (e, info) = DurableEngine::open(Arc::clone(&dev), options(cache_for(seed)))
            .map_err(|e| format!("open: {e}"))?;
        tally.heads_requeued += info.heads_held as u64;
        check_recovered(&e, &mut model, tally)?;
        // The failure to inject.
        let plan = if g.percent(70) {
            FaultPlan {
                write_eio_at: Some(1 + g.below(160)),
                ..FaultPlan::default()
            }
        } else {
            FaultPlan {
                flush_eio_at: Some(1 + g.below(12)),
                ..FaultPlan::default()
            }
        };
        dev.set_fault_plan(plan);
        let mut issued = Vec::new();
        workload(&e, &mut g, &mut model, &mut issued, tally);
        if e.failure().is_some() {
            tally.failures_injected += 1;
            // Latched: nothing more is acknowledged.
            let probe = op(bytenr(0), Action::AddRef, u64::MAX - 1);
            if e.add_durable(&probe).is_ok() || e.commit().is_ok() {
                return Err("an op or commit was acknowledged after a failure".into());
            }
        }
        // Resolve what was acknowledged before the power loss.
        for r in &issued {
            let acked = r.acked || r.ticket.as_ref().is_some_and(|t| t.is_durable());
            let st = match (r.drop, acked) {
                (false, true) => St::Live,
                (true, true) => St::Dead,
                (false, false) => St::MaybeLive,
                (true, false) => St::MaybeDead,
            };
            if acked {
                tally.acked += 1;
            } else {
                tally.unknown += 1;
            }
            model.keys.insert(r.key, st);
        }
        // Drops of keys whose state was later overwritten: a drop is only
        // issued on a Live key, so the last record per key wins.
        drop(issued);
        drop(e);
        dev = Arc::new(dev.crash());
    }
    let e = open(&dev, cache_for(seed))?;
    check_recovered(&e, &mut model, tally)
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("REFD_DURABLE_SIM_SEED") {
        return vec![s.parse().expect("REFD_DURABLE_SIM_SEED")];
    }
    let n = std::env::var("REFD_DURABLE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS_DEFAULT);
    let first: u64 = std::env::var("REFD_DURABLE_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (first..first + n).collect()
}

#[test]
fn deterministic_crashes() {
    let start = std::time::Instant::now();
    let mut tally = Tally::default();
    for seed in seeds() {
        if let Err(e) = run_seed(seed, &mut tally) {
            panic!("seed {seed} failed (rerun: REFD_DURABLE_SIM_SEED={seed}): {e}");
        }
    }
    eprintln!("{tally:?} in {:?}", start.elapsed());
    if std::env::var_os("REFD_DURABLE_SIM_SEED").is_some() {
        // One seed reruns a failure; the coverage tallies are for the set.
        return;
    }
    assert!(tally.failures_injected > 0 && tally.acked > 0 && tally.unknown > 0);
    assert!(tally.keyed_refs_seen > 0, "keyed backrefs never exercised");
    assert!(tally.extents_freed > 0, "no extent was ever freed");
    assert!(tally.heads_requeued > 0, "no held head was ever recovered");
}

/// Real threads: ingest threads add unique refs (durably or not) while a
/// committer thread commits, then the power is lost. Every op acknowledged
/// before the crash is in the recovered state exactly once: an op that a
/// cut split wrongly (logged below the cut but not frozen, or frozen but
/// logged above it) would be lost or counted twice. Thread interleavings
/// make a seed reproduce the workload, not the schedule.
#[test]
fn threaded_cut_and_back_pressure() {
    const THREADS: u64 = 3;
    const OPS: u64 = 150;
    for seed in 0..12u64 {
        let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(DEVICE_BYTES, seed)).expect("sim"));
        DurableEngine::format(
            &dev,
            FormatOptions {
                log_bytes: Some(LOG_BYTES),
                fs_id: Some(FsId([0x5B; 16])),
            },
        )
        .expect("format");
        let e = open(&dev, cache_for(seed)).expect("open");
        for i in 0..EXTENTS {
            e.add_durable(&op(bytenr(i), Action::AddExtent, BASE_OBJECTID + i))
                .expect("allocate");
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        // Adds begun per extent: a lookup may never count more.
        let begun: Vec<std::sync::atomic::AtomicU64> = (0..EXTENTS)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        // (bytenr, objectid, acknowledged)
        let results: Vec<Vec<(u64, u64, bool)>> = std::thread::scope(|s| {
            let committer = s.spawn(|| {
                let mut g = Gen::new(seed ^ 0xC0);
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    e.commit().expect("commit");
                    std::thread::sleep(std::time::Duration::from_micros(g.below(300)));
                }
            });
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (e, begun) = (&e, &begun);
                    s.spawn(move || {
                        let mut g = Gen::new(seed * 31 + t);
                        let mut out = Vec::new();
                        let mut tickets = Vec::new();
                        let mut mine = [0u64; EXTENTS as usize];
                        for n in 0..OPS {
                            let i = g.below(EXTENTS);
                            let b = bytenr(i);
                            let obj = (t + 1) << 32 | n;
                            let o = op(b, Action::AddRef, obj);
                            begun[i as usize].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if g.percent(50) {
                                e.add_durable(&o).expect("add_durable");
                                out.push((b, obj, true));
                            } else {
                                tickets.push((b, obj, e.add(&o).expect("add")));
                            }
                            mine[i as usize] += 1;
                            // Every op counted exactly once by lookups,
                            // across commits, evictions and tree reads:
                            // our own adds (and the allocation) are seen,
                            // and no more adds than were begun.
                            let refs = e.lookup_extent_ref(b).expect("lookup").refs as u64;
                            let most =
                                1 + begun[i as usize].load(std::sync::atomic::Ordering::SeqCst);
                            assert!(
                                (1 + mine[i as usize]..=most).contains(&refs),
                                "seed {seed}: extent {i}: lookup counts {refs}, own adds {}, \
                                 begun {}",
                                mine[i as usize],
                                most - 1
                            );
                        }
                        for (b, obj, t) in tickets {
                            out.push((b, obj, t.is_durable()));
                        }
                        out
                    })
                })
                .collect();
            // Stop the committer before any worker panic is resumed, or the
            // scope would wait for it forever.
            let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            committer.join().expect("committer");
            joined
                .into_iter()
                .map(|r| r.unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let crashed: Dev = Arc::new(dev.crash());
        drop(e);
        let e = open(&crashed, cache_for(seed)).unwrap_or_else(|x| panic!("seed {seed}: {x}"));
        let s = e.commit().expect("commit after recovery");
        assert!(s.core.quarantined.is_empty(), "seed {seed}");
        e.verify().unwrap_or_else(|x| panic!("seed {seed}: {x}"));
        let tree = e.committed_extents().expect("committed tree");
        let mut expected_min = [1u64; EXTENTS as usize];
        let mut expected_max = [1u64; EXTENTS as usize];
        for (b, obj, acked) in results.iter().flatten() {
            let i = ((b - bytenr(0)) / EXTENT_BYTES) as usize;
            let c = tree.get(*b).map_or(0, |it| it.count(&key(*obj)));
            assert!(c <= 1, "seed {seed}: {b}/{obj} applied {c} times");
            if *acked {
                assert_eq!(c, 1, "seed {seed}: acknowledged {b}/{obj} lost");
                expected_min[i] += 1;
            }
            expected_max[i] += 1;
        }
        for i in 0..EXTENTS {
            let refs = tree.get(bytenr(i)).map_or(0, |it| it.refs);
            assert!(
                (expected_min[i as usize]..=expected_max[i as usize]).contains(&refs),
                "seed {seed}: extent {i} refs {refs}"
            );
        }
    }
}
