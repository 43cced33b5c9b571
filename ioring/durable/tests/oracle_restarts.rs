//! The durable engine against the sequential model (`refd_core::oracle`)
//! across restarts: hostile op streams (every action, both kinds, sizes
//! that disagree, re-allocations, overlaps, extents at bytenr 0 and at the
//! top of the address space, extent_ops, seqs under barriers held across
//! commits) with commits and reopens at random points. A reopen is a
//! power loss with every op durable: recovery replays the log after the
//! last commit and requeues the held heads, barriers are gone and pending
//! seqs forgotten (the model's `forget_seqs`). After every commit the
//! device's extent tree (read back from the B+tree) equals the model's,
//! with the same freed and refused extents; every lookup equals the
//! model's would-be count. The in-process tests of `refd-core` cover the
//! live engine; the over-the-wire adversarial test gives each client its
//! own extents; this one sends every op of one extent through one engine
//! whose life is cut by restarts.
//!
//! It found the lock-free store dropping a requeued head whose refs
//! cancelled before its final merge (seed 51; `refd-core`'s
//! `a_requeued_head_whose_refs_cancel_keeps_its_shapes`).
//!
//! Each seed runs with the lock-free store and with the mutex one.
//! `REFD_ORACLE_RESTART_SEEDS=N` runs N seeds (default 56) from
//! `REFD_ORACLE_RESTART_FIRST_SEED` (default 0),
//! `REFD_ORACLE_RESTART_SEED=S` one; a refused-set mismatch prints the
//! seed's steps.

use std::sync::Arc;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use refd_core::barrier::SeqGuard;
use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::model::{
    Action, DiskKey, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF,
};
use refd_core::oracle::{normalize_tree, Model};
use refd_durable::{DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::format::FsId;
use refd_ioring::{LogConfig, SimConfig, SimStorage};

type Dev = Arc<SimStorage>;

const SEEDS_DEFAULT: u64 = 56;
const STEPS: usize = 400;

/// Bytenrs: two pairs 4 KiB apart (overlaps), bytenr 0 and two at the
/// top of the address space.
const BYTENRS: [u64; 7] = [
    0,
    1 << 20,
    (1 << 20) + 4096,
    2 << 20,
    (2 << 20) + 4096,
    u64::MAX - 16384,
    u64::MAX - 4096,
];

fn opts() -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: 64 << 10,
            ..LogConfig::default()
        },
        // A small cache: overlap checks and lookups read the B+tree too.
        cache_extents_max: 3,
        ..OpenOptions::default()
    }
}

/// One random op; `barrier_seq` is the newest barrier's seq (0: none).
fn random_op(rng: &mut ChaCha8Rng, barrier_seq: u64) -> Op {
    let bytenr = BYTENRS[rng.gen_range(0..BYTENRS.len())];
    let tree = rng.gen_bool(0.4);
    let kind = if tree {
        ExtentKind::Tree {
            level: u8::from(rng.gen_ratio(1, 8)),
        }
    } else {
        ExtentKind::Data
    };
    let num_bytes = match rng.gen_range(0..10) {
        0 => 8192,
        1 => 1,
        _ if tree => 16384,
        _ => 4096,
    };
    // Up to the end of the address space at most.
    let num_bytes = num_bytes.min(u64::MAX - bytenr);
    let seq = match rng.gen_range(0..6) {
        0 | 1 if barrier_seq != 0 => barrier_seq,
        2 => barrier_seq.saturating_sub(1),
        _ => 0,
    };
    let action = match rng.gen_range(0..20) {
        0..=6 => Action::AddRef,
        7..=13 => Action::DropRef,
        14..=17 => Action::AddExtent,
        _ => {
            let key = (tree && rng.gen_bool(0.5)).then(|| DiskKey {
                objectid: rng.gen_range(256..260),
                item_type: 84,
                offset: 0,
            });
            let flags_to_set = if key.is_none() || rng.gen_bool(0.5) {
                BLOCK_FLAG_FULL_BACKREF
            } else {
                0
            };
            let eop = ExtentOp { flags_to_set, key };
            return Op::update_head(bytenr, num_bytes, kind, eop).unwrap();
        }
    };
    let k = rng.gen_range(0..3u64);
    let key = match (tree, rng.gen_bool(0.7)) {
        (true, true) => RefKey::TreeBlock { root: 5 + k },
        (true, false) => RefKey::SharedBlock { parent: 4096 << k },
        (false, true) => RefKey::ExtentData {
            root: 5,
            objectid: 257 + k,
            offset: 0,
        },
        (false, false) => RefKey::SharedData { parent: 4096 << k },
    };
    Op::new(bytenr, num_bytes, kind, action, key, seq).unwrap()
}

/// One seed with the store `D` (the lock-free store or the mutex one).
fn run_seed<D: DelayedRefStore + Default>(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut dev: Dev = Arc::new(SimStorage::new(SimConfig::new(16 << 20, seed)).unwrap());
    let format = FormatOptions {
        log_bytes: Some(4 << 20),
        fs_id: Some(FsId([9; 16])),
    };
    DurableEngine::format(&dev, format).unwrap();
    let mut e = DurableEngine::<Dev, D>::open_with_store(Arc::clone(&dev), opts())
        .unwrap()
        .0;
    let mut model = Model::new();
    let mut guards: Vec<SeqGuard> = Vec::new();
    let mut events: Vec<String> = Vec::new();
    for step in 0..STEPS {
        let ctx = || format!("seed {seed} step {step}");
        match rng.gen_range(0..40) {
            0..=2 => {
                let barrier = e.core().barrier().lowest();
                let pending: Vec<Op> = model.pending().copied().collect();
                let before = model.extents.clone();
                let s = e.commit().unwrap();
                let held: Vec<u64> = s.core.held_heads.iter().map(|h| h.bytenr).collect();
                events.push(format!("{step}: commit, barrier {barrier}, held {held:?}"));
                model.generation = s.generation - 1;
                let m = model.commit(barrier);
                let mut freed: Vec<(u64, u64)> = s
                    .core
                    .freed
                    .iter()
                    .map(|f| (f.bytenr, f.num_bytes))
                    .collect();
                freed.sort_unstable();
                let mut refused: Vec<u64> =
                    s.core.quarantined.iter().map(|q| q.head.bytenr).collect();
                refused.sort_unstable();
                assert_eq!(freed, m.freed, "freed, {}", ctx());
                if refused != m.quarantined {
                    for b in refused.iter().chain(&m.quarantined) {
                        eprintln!("{b}: committed {:?}", before.get(b));
                        for o in pending.iter().filter(|o| o.bytenr == *b) {
                            eprintln!("  {o} seq {}", o.seq);
                        }
                    }
                    eprintln!("barrier {barrier}; engine: {:?}", s.core.quarantined);
                    for ev in &events {
                        eprintln!("{ev}");
                    }
                }
                assert_eq!(refused, m.quarantined, "refused, {}", ctx());
                assert_eq!(s.core.held, m.held.len(), "held, {}", ctx());
                let tree = e.committed_extents().unwrap();
                tree.check().unwrap();
                assert_eq!(normalize_tree(&tree), model.normalized(), "{}", ctx());
            }
            3 => {
                // Power lost with every op durable (each was added with
                // add_durable): recovery replays them.
                guards.clear();
                events.push(format!("{step}: reopen"));
                dev = Arc::new(dev.crash());
                drop(e);
                e = DurableEngine::open_with_store(Arc::clone(&dev), opts())
                    .unwrap()
                    .0;
                model.forget_seqs();
                e.verify().unwrap();
            }
            4 => {
                guards.push(e.core().barrier().acquire());
                events.push(format!("{step}: acquire {}", e.core().barrier().current()));
            }
            5 if !guards.is_empty() => {
                guards.remove(0);
                events.push(format!("{step}: release"));
            }
            _ => {
                let held = if guards.is_empty() {
                    0
                } else {
                    e.core().barrier().current()
                };
                let op = random_op(&mut rng, held);
                e.add_durable(&op).unwrap();
                events.push(format!("{step}: {op} seq {}", op.seq));
                model.add(&op);
                let b = op.bytenr;
                assert_eq!(
                    e.lookup_extent_ref(b).unwrap().refs,
                    model.lookup(b),
                    "lookup {b} after {op}, {}",
                    ctx()
                );
            }
        }
    }
}

#[test]
fn durable_engine_agrees_with_the_model_across_restarts() {
    let seeds = std::env::var("REFD_ORACLE_RESTART_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS_DEFAULT);
    if let Some(seed) = std::env::var("REFD_ORACLE_RESTART_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed::<LockFreeStore>(seed);
        return run_seed::<MutexStore>(seed);
    }
    let first: u64 = std::env::var("REFD_ORACLE_RESTART_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in first..first + seeds {
        run_seed::<LockFreeStore>(seed);
        run_seed::<MutexStore>(seed);
    }
}
