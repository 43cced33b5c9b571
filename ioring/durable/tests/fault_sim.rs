//! Fault injection beyond power loss, on [`SimStorage`]: what real NVMe and
//! loop devices also do. Each seeded case formats a small device (512 KiB
//! log, 16 KiB batches), allocates a few extents, then adds refs with
//! `add_durable` (each acknowledged op is one log batch) and commits now
//! and then, with one fault of its kind (by `seed % 7`):
//!
//! - `log-bit-flip`, `node-bit-flip`, `superblock-bit-flip`: after a power
//!   loss, one random bit of the log region, the node region or the newest
//!   superblock copy flips at rest;
//! - `misdirected-write`: a seeded write is acknowledged but lands at
//!   another seeded address;
//! - `lost-write`: a seeded write is acknowledged but never lands;
//! - `stale-read`: a seeded read returns what the device held when the
//!   fault was armed;
//! - `fsync-eio-clean`: a seeded flush fails with `EIO` and the unflushed
//!   writes are dropped without the device latching (Linux's fsync after a
//!   write-back error): the engine must latch by itself and acknowledge
//!   nothing after it.
//!
//! - `process-crash-in-flight`: the process dies (`SIGKILL`) during a
//!   seeded write, with that call's writes submitted but not completed
//!   (`SimStorage::process_crash`: the cache survives; each in-flight
//!   write lands in the next process's cache during its first reads, at
//!   the latest before its first write or flush, or never); the next
//!   process opens (strict), runs the workload again (more acknowledged
//!   ops), and only then the power is lost. A process crash is no damage:
//!   these cases must be neither refused nor lose any op. Removing the
//!   open-time flush of `RefLog::open` fails them (a replayed batch that
//!   had landed only in the cache is lost at the power loss while the
//!   next process's durable batches chain to it: `LogDamaged`).
//!
//! Then the power is lost and the device opened (strict recovery mode).
//! Every case ends one of two ways: **refused** (open, the recovery
//! commit or `verify` returns a typed error naming the damage), or
//! **recovered**, and then each acknowledged op is counted: present once
//! (good), absent (**lost**) or more than once (**duplicated**); an op
//! whose add failed may be present once or absent. Nothing may panic.
//!
//! What this proves and what it does not: duplicates must be zero, and so
//! must losses of any acknowledged op but those of the *last* acknowledged
//! log batch (and any loss at all after a failed fsync). A bit flip in, or
//! a lost or misdirected write of, the last batch after the last commit
//! leaves a log that ends one batch early, which a format that writes each
//! batch once cannot tell from a torn tail (nothing durable follows it);
//! those losses are counted and printed, not hidden (`docs/benchmarks.md`,
//! "Crash tests"). Every earlier damaged batch is refused (`LogDamaged`).
//!
//! `REFD_FAULT_SIM_CASES` sets how many cases run (default 400, 50 per
//! kind); `REFD_FAULT_SIM_SEED=<n>` reruns one.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::format::{FsId, SUPERBLOCK_REGION_BYTES};
use refd_ioring::{FaultPlan, LogConfig, SimConfig, SimStorage};

type Dev = Arc<SimStorage>;

const CASES_DEFAULT: u64 = 400;
const PROCESS_CRASH_CASES_DEFAULT: u64 = 400;
const DEVICE_BYTES: u64 = 8 << 20;
const LOG_BYTES: u64 = 512 << 10;
const BATCH_BYTES_MAX: usize = 16 << 10;
const EXTENTS: u64 = 4;
const EXTENT_BYTES: u64 = 1 << 20;
const STEPS: u64 = 80;

const KINDS: [&str; 8] = [
    "log-bit-flip",
    "node-bit-flip",
    "superblock-bit-flip",
    "misdirected-write",
    "lost-write",
    "stale-read",
    "fsync-eio-clean",
    "process-crash-in-flight",
];
/// Objectids of the second process's ops (`process-crash-in-flight`).
const SECOND_PROCESS_OBJECTIDS: u64 = 1 << 20;
/// Most workload steps of the second process before the power loss.
const SECOND_PROCESS_STEPS_MAX: u64 = 16;

fn key(objectid: u64) -> RefKey {
    RefKey::ExtentData {
        root: 5,
        objectid,
        offset: 0,
    }
}

fn op(extent: u64, action: Action, objectid: u64) -> Op {
    let bytenr = (1 << 30) + extent * EXTENT_BYTES;
    Op::new(
        bytenr,
        EXTENT_BYTES,
        ExtentKind::Data,
        action,
        key(objectid),
        0,
    )
    .expect("valid op")
}

fn options() -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: BATCH_BYTES_MAX,
            ..LogConfig::default()
        },
        ..OpenOptions::default()
    }
}

/// Per kind: cases, acknowledged ops, and how the cases ended.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    cases: u64,
    acked: u64,
    recovered_cases: u64,
    refused: u64,
    lost: u64,
    /// Of `lost`, ops of the last acknowledged batch.
    lost_last: u64,
    duplicated: u64,
    /// Cases where the engine latched during the workload.
    latched: u64,
}

/// What the workload issued: (extent, objectid) -> acknowledged.
type Issued = BTreeMap<(u64, u64), bool>;

/// The fault plan of a case armed during the workload, if its kind is one.
fn armed_plan(kind: &str, g: &mut ChaCha8Rng) -> Option<FaultPlan> {
    let n = g.gen_range(1..=40u64);
    let plan = match kind {
        "misdirected-write" => FaultPlan {
            misdirected_write_at: Some((n, g.gen_range(SUPERBLOCK_REGION_BYTES..DEVICE_BYTES))),
            ..FaultPlan::default()
        },
        "lost-write" => FaultPlan {
            lost_write_at: Some(n),
            ..FaultPlan::default()
        },
        "stale-read" => FaultPlan {
            stale_read_at: Some(g.gen_range(1..=8)),
            ..FaultPlan::default()
        },
        "fsync-eio-clean" => FaultPlan {
            flush_eio_clean_at: Some(g.gen_range(1..=4)),
            ..FaultPlan::default()
        },
        "process-crash-in-flight" => FaultPlan {
            process_crash_at: Some(g.gen_range(1..=4)),
            ..FaultPlan::default()
        },
        _ => return None,
    };
    Some(plan)
}

/// Runs the workload with the fault armed at a seeded step; returns what
/// was issued and whether the engine latched.
fn workload(
    e: &DurableEngine<Dev>,
    dev: &Dev,
    kind: &str,
    g: &mut ChaCha8Rng,
    (objectid_base, steps): (u64, u64),
) -> (Issued, bool) {
    let mut issued = Issued::new();
    let arm_at = g.gen_range(0..steps);
    for step in 0..steps {
        if step == arm_at {
            if let Some(plan) = armed_plan(kind, g) {
                dev.set_fault_plan(plan);
            }
        }
        let ok = if g.gen_ratio(1, 8) {
            e.commit().is_ok()
        } else {
            let extent = g.gen_range(0..EXTENTS);
            let objectid = objectid_base + step;
            let r = e.add_durable(&op(extent, Action::AddRef, objectid));
            issued.insert((extent, objectid), r.is_ok());
            r.is_ok()
        };
        if !ok || e.failure().is_some() {
            return (issued, true);
        }
    }
    let latched = e.failure().is_some();
    (issued, latched)
}

/// Flips one bit at rest for the bit-flip kinds.
fn flip_at_rest(kind: &str, dev: &SimStorage, newest_slot: u64) {
    let log = SUPERBLOCK_REGION_BYTES..SUPERBLOCK_REGION_BYTES + LOG_BYTES;
    let range = match kind {
        "log-bit-flip" => log,
        "node-bit-flip" => log.end..DEVICE_BYTES,
        "superblock-bit-flip" => newest_slot..newest_slot + 4096,
        _ => return,
    };
    dev.flip_random_bit(range).expect("flip");
}

/// Opens, commits and verifies; `Err` is a refusal with a typed error.
fn recover(dev: Dev) -> Result<DurableEngine<Dev>, String> {
    let (e, _) = DurableEngine::open(dev, options()).map_err(|x| format!("open: {x}"))?;
    e.commit().map_err(|x| format!("commit: {x}"))?;
    e.verify().map_err(|x| format!("verify: {x}"))?;
    Ok(e)
}

fn run_case(seed: u64, tally: &mut Tally) {
    let kind = KINDS[(seed % KINDS.len() as u64) as usize];
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(DEVICE_BYTES, seed)).expect("sim"));
    DurableEngine::format(
        &dev,
        FormatOptions {
            log_bytes: Some(LOG_BYTES),
            fs_id: Some(FsId([3; 16])),
        },
    )
    .expect("format");
    let (e, _) = DurableEngine::open(Arc::clone(&dev), options()).expect("open");
    for extent in 0..EXTENTS {
        e.add_durable(&op(extent, Action::AddExtent, 1))
            .expect("allocate");
    }
    e.commit().expect("commit");
    let (mut issued, latched) = workload(&e, &dev, kind, &mut g, (1000, STEPS));
    let mut newest_slot = e.superblock().addr();
    drop(e);
    let mut dev = dev;
    if kind == "process-crash-in-flight" {
        // The next process: strict open, the workload again, then the
        // power loss below.
        let next: Dev = Arc::new(dev.process_crash());
        let e = match DurableEngine::open(Arc::clone(&next), options()) {
            Ok((e, _)) => e,
            Err(x) => {
                eprintln!("seed {seed} ({kind}): open after the process crash refused: {x}");
                tally.cases += 1;
                tally.refused += 1;
                return;
            }
        };
        // Power fails after a seeded number of steps: often before the
        // first commit's flush, which would make the landed writes durable.
        let steps = g.gen_range(1..=SECOND_PROCESS_STEPS_MAX);
        let (more, _) = workload(&e, &next, "none", &mut g, (SECOND_PROCESS_OBJECTIDS, steps));
        issued.extend(more);
        newest_slot = e.superblock().addr();
        drop(e);
        dev = next;
    }
    let crashed = dev.crash();
    flip_at_rest(kind, &crashed, newest_slot);
    tally.cases += 1;
    tally.acked += issued.values().filter(|&&a| a).count() as u64;
    tally.latched += u64::from(latched);
    let e = match recover(Arc::new(crashed)) {
        Ok(e) => e,
        Err(x) => {
            if kind == "process-crash-in-flight" {
                eprintln!("seed {seed} ({kind}): refused after the power loss: {x}");
            }
            tally.refused += 1;
            return;
        }
    };
    tally.recovered_cases += 1;
    let tree = match e.committed_extents() {
        Ok(t) => t,
        Err(_) => {
            tally.refused += 1;
            return;
        }
    };
    let last_acked = issued
        .iter()
        .filter(|(_, &a)| a)
        .map(|(&(_, o), _)| o)
        .max();
    for (&(extent, objectid), &acked) in &issued {
        let bytenr = (1 << 30) + extent * EXTENT_BYTES;
        let count = tree.get(bytenr).map_or(0, |i| i.count(&key(objectid)));
        match (acked, count) {
            (true, 0) => {
                tally.lost += 1;
                tally.lost_last += u64::from(Some(objectid) == last_acked);
                eprintln!(
                    "seed {seed} ({kind}): acknowledged op {objectid} lost (the last \
                     acknowledged was {last_acked:?})"
                );
            }
            (_, c) if c > 1 => tally.duplicated += 1,
            _ => {}
        }
    }
}

/// Only `process-crash-in-flight` cases (seeds `≡ 7 mod 8` from
/// 1,000,007): the hazard it exists for (a replayed batch only in the
/// cache, lost at the next power loss under the next process's durable
/// batches) needs the in-flight write to be a log batch, to land before
/// replay reads it and to be lost before the next process's first commit:
/// about 2 cases in 100 without the open-time flush. 400 cases by default
/// (~5 s); `REFD_PROCESS_CRASH_CASES` sets how many.
#[test]
fn process_crashes_with_io_in_flight() {
    let n: u64 = std::env::var("REFD_PROCESS_CRASH_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(PROCESS_CRASH_CASES_DEFAULT);
    let mut t = Tally::default();
    for k in 0..n {
        let seed = 1_000_000 + 8 * k + 7;
        run_case(seed, &mut t);
    }
    eprintln!(
        "process-crash-in-flight: cases {} acked {} recovered {} refused {} lost {} duplicated {} \
         (engine latched in {})",
        t.cases, t.acked, t.recovered_cases, t.refused, t.lost, t.duplicated, t.latched
    );
    assert_eq!(t.cases, n);
    assert_eq!(
        (t.refused, t.lost, t.duplicated),
        (0, 0, 0),
        "a process crash is no damage"
    );
}

#[test]
fn faults_of_real_devices() {
    let seeds = refd_ioring::test_support::case_seeds(
        "REFD_FAULT_SIM_SEED",
        "REFD_FAULT_SIM_CASES",
        CASES_DEFAULT,
    );
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    for seed in seeds {
        let kind = KINDS[(seed % KINDS.len() as u64) as usize];
        run_case(seed, tallies.entry(kind).or_default());
    }
    let mut total = Tally::default();
    for (kind, t) in &tallies {
        eprintln!(
            "{kind:20} cases {:5} acked {:6} recovered {:5} refused {:5} lost {:4} (of the \
             last batch {}) duplicated {} (engine latched in {})",
            t.cases,
            t.acked,
            t.recovered_cases,
            t.refused,
            t.lost,
            t.lost_last,
            t.duplicated,
            t.latched
        );
        total.cases += t.cases;
        total.acked += t.acked;
        total.recovered_cases += t.recovered_cases;
        total.refused += t.refused;
        total.lost += t.lost;
        total.lost_last += t.lost_last;
        total.duplicated += t.duplicated;
    }
    eprintln!(
        "total: cases {} acked {} recovered {} refused {} lost {} (of the last batch {}) \
         duplicated {}",
        total.cases,
        total.acked,
        total.recovered_cases,
        total.refused,
        total.lost,
        total.lost_last,
        total.duplicated
    );
    assert_eq!(total.duplicated, 0, "an acknowledged op applied twice");
    assert_eq!(
        total.lost, total.lost_last,
        "an acknowledged op lost silently before the last acknowledged batch"
    );
    if let Some(t) = tallies.get("fsync-eio-clean") {
        assert_eq!(t.lost, 0, "fsync-eio-clean: an acknowledged op lost");
    }
    if let Some(t) = tallies.get("process-crash-in-flight") {
        assert_eq!(
            (t.refused, t.lost),
            (0, 0),
            "process-crash-in-flight: a process crash is no damage"
        );
    }
}
