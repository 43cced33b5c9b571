//! Crash tests of the copy-on-write B+tree on the simulated device.
//!
//! Each seed runs rounds of "random sorted changes, `commit`, durable
//! superblock write, `release_pending`" on a device that loses power at a
//! seeded random mutating operation: a node batch write, the commit's
//! flush, or the superblock write (before or after each, since an
//! operation that returned is in the image and the one in flight may be
//! lost, kept or torn sector by sector). After the crash the tree is
//! reopened from the newest valid superblock: it must be exactly the
//! contents of the commit that superblock names (the last acknowledged one,
//! or the one whose superblock write was in flight), `check` must pass, and
//! the recovered tree must accept further commits. A failing seed is
//! printed and reproduces the same crash: `REFD_BTREE_CRASH_SEED=<n>`
//! reruns it; `REFD_BTREE_CRASH_SEEDS=<count>` (default 48) seeds run from
//! `REFD_BTREE_CRASH_FIRST_SEED` (default 0xB7EE0000, a decimal number).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{read_superblock, write_superblock, CrashAt, Gen, FS};
use refd_ioring::btree::{BTree, Change, Key, TreeConfig};
use refd_ioring::format::{Layout, Superblock, NODE_BYTES};
use refd_ioring::{SimConfig, SimStorage, Storage};

const REGION_START: u64 = 16384;
const REGION_NODES: u64 = 1024;
const SEEDS: u64 = 48;

fn config() -> TreeConfig {
    TreeConfig {
        owner: 3,
        cache_bytes: 16 * NODE_BYTES,
        write_batch_nodes: 8,
    }
}

fn format(sim: &SimStorage) -> Superblock {
    let sb = Superblock::empty(
        FS,
        sim.geometry(),
        Layout {
            log_start: 8192,
            log_bytes: 8192,
            node_region_start: REGION_START,
            node_region_bytes: REGION_NODES * NODE_BYTES as u64,
        },
    );
    write_superblock(sim, &sb).expect("format");
    sb
}

fn value(k: u64, round: u64, len: usize) -> Vec<u8> {
    let mut v = k.to_le_bytes().to_vec();
    v.extend_from_slice(&round.to_le_bytes());
    v.resize(len.max(16), (k ^ round) as u8);
    v
}

/// A random sorted batch, applied to `model` too.
fn batch(g: &mut Gen, round: u64, model: &mut BTreeMap<Key, Vec<u8>>) -> Vec<(Key, Change)> {
    let mut b: BTreeMap<Key, Change> = BTreeMap::new();
    let n = 20 + g.below(400);
    for _ in 0..n {
        let k = g.below(6000);
        let key = Key::new(k, (k % 4) as u8, k * 3);
        let change = if g.percent(30) {
            Change::Delete
        } else {
            let len = if g.percent(5) {
                3000
            } else {
                16 + g.below(120) as usize
            };
            Change::Put(value(k, round, len))
        };
        b.insert(key, change);
    }
    for (k, c) in &b {
        match c {
            Change::Put(v) => {
                model.insert(*k, v.clone());
            }
            Change::Delete => {
                model.remove(k);
            }
        }
    }
    b.into_iter().collect()
}

fn contents<S: Storage>(t: &BTree<S>) -> Result<Vec<(Key, Vec<u8>)>, String> {
    t.range(..)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// How a seed's run ended, for the summary.
#[derive(Debug, Default)]
struct Outcome {
    crashed_in_run: bool,
    in_flight_survived: bool,
    commits_acked: u64,
}

fn run_seed(seed: u64) -> Result<Outcome, String> {
    let mut g = Gen::new(seed);
    let sim = SimStorage::new(SimConfig::new(
        REGION_START + REGION_NODES * NODE_BYTES as u64,
        seed,
    ))
    .map_err(|e| e.to_string())?;
    let mut sb = format(&sim);
    let crash_at = 1 + g.below(90);
    let dev = Arc::new(CrashAt::new(sim, crash_at));
    let tree =
        BTree::open_superblock(Arc::clone(&dev), &sb, config()).map_err(|e| e.to_string())?;

    // Snapshot of the model per superblock generation that may be durable.
    let mut snapshots: BTreeMap<u64, BTreeMap<Key, Vec<u8>>> = BTreeMap::new();
    snapshots.insert(1, BTreeMap::new());
    let mut model = BTreeMap::new();
    let mut acked = 1u64;
    for round in 1..=14u64 {
        let changes = batch(&mut g, round, &mut model);
        tree.apply_sorted(changes).map_err(|e| e.to_string())?;
        if g.percent(20) {
            // Not every round commits: uncommitted changes must vanish.
            continue;
        }
        let generation = sb.generation + 1;
        let info = match tree.commit(generation) {
            Ok(info) => info,
            Err(_) if dev.crashed() => break,
            Err(e) => return Err(format!("commit {generation}: {e}")),
        };
        let mut next = sb.clone();
        next.generation = generation;
        info.apply_to(&mut next);
        snapshots.insert(generation, model.clone());
        match write_superblock(&*dev, &next) {
            Ok(()) => {}
            Err(_) if dev.crashed() => break,
            Err(e) => return Err(format!("superblock {generation}: {e}")),
        }
        sb = next;
        acked = generation;
        tree.release_pending(generation)
            .map_err(|e| e.to_string())?;
    }
    drop(tree);
    let crashed_in_run = dev.crashed();
    let image = Arc::new(dev.take_image());

    let sb2 = read_superblock(&*image)?;
    if sb2.generation < acked {
        return Err(format!(
            "superblock {} found, but {acked} was acknowledged (crash_at {crash_at}, \
             crashed in run: {crashed_in_run})",
            sb2.generation
        ));
    }
    let Some(expected) = snapshots.get(&sb2.generation) else {
        return Err(format!(
            "superblock generation {} was never written",
            sb2.generation
        ));
    };
    let tree = BTree::open_superblock(Arc::clone(&image), &sb2, config())
        .map_err(|e| format!("reopen at generation {}: {e}", sb2.generation))?;
    tree.check()
        .map_err(|e| format!("check at generation {}: {e}", sb2.generation))?;
    let got = contents(&tree)?;
    let want: Vec<_> = expected.iter().map(|(k, v)| (*k, v.clone())).collect();
    if got != want {
        return Err(format!(
            "generation {}: recovered {} items, expected {}",
            sb2.generation,
            got.len(),
            want.len()
        ));
    }

    // The recovered tree keeps working: two more commits, then a reopen.
    let mut model = expected.clone();
    let recovered_generation = sb2.generation;
    let mut sb = sb2;
    for round in 100..102u64 {
        let changes = batch(&mut g, round, &mut model);
        tree.apply_sorted(changes).map_err(|e| e.to_string())?;
        sb.generation += 1;
        let info = tree.commit(sb.generation).map_err(|e| e.to_string())?;
        info.apply_to(&mut sb);
        write_superblock(&*image, &sb).map_err(|e| e.to_string())?;
        tree.release_pending(sb.generation)
            .map_err(|e| e.to_string())?;
        tree.check()
            .map_err(|e| format!("check after recovery: {e}"))?;
    }
    drop(tree);
    let tree = BTree::open_superblock(Arc::clone(&image), &read_superblock(&*image)?, config())
        .map_err(|e| e.to_string())?;
    let want: Vec<_> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
    if contents(&tree)? != want {
        return Err("contents differ after post-recovery commits".to_string());
    }
    tree.check().map_err(|e| e.to_string())?;
    Ok(Outcome {
        crashed_in_run,
        in_flight_survived: recovered_generation > acked,
        commits_acked: acked - 1,
    })
}

#[test]
fn crash_at_random_points_recovers_last_durable_commit() {
    let base = std::env::var("REFD_BTREE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds: Vec<u64> = match base {
        Some(seed) => vec![seed],
        None => {
            let first = env("REFD_BTREE_CRASH_FIRST_SEED").unwrap_or(0xB7EE_0000);
            let count = env("REFD_BTREE_CRASH_SEEDS").unwrap_or(SEEDS);
            (first..first + count).collect()
        }
    };
    let several = seeds.len() > 1;
    let mut outcomes = Vec::new();
    for seed in seeds {
        match run_seed(seed) {
            Ok(o) => outcomes.push(o),
            Err(e) => panic!("seed {seed} (rerun with REFD_BTREE_CRASH_SEED={seed}): {e}"),
        }
    }
    let crashed = outcomes.iter().filter(|o| o.crashed_in_run).count();
    let survived = outcomes.iter().filter(|o| o.in_flight_survived).count();
    let acked: u64 = outcomes.iter().map(|o| o.commits_acked).sum();
    eprintln!(
        "{} seeds: {crashed} crashed mid-run, {survived} kept an in-flight superblock, \
         {acked} commits acknowledged",
        outcomes.len()
    );
    if several {
        // The crash points must cover the run, not only its end.
        assert!(crashed * 2 >= outcomes.len(), "too few mid-run crashes");
        assert!(acked > 0);
    }
}
