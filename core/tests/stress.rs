//! Concurrency stress: more threads than cores ingest while a committer
//! commits, a reader looks up and a barrier thread takes and drops seq
//! barriers. Every thread's op sequence is valid under any transaction
//! split, so no head may be quarantined, and at the end the extent tree
//! must equal the sequential model of all ops: every op applied exactly
//! once. Runs against both stores.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use refd_core::delayed::lockfree::{LockFreeStore, READ_OPTIMISTIC_MAX};
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::{DelayedRefStore, IngestHandle};
use refd_core::engine::Engine;
use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{Action, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF};
use refd_core::oracle::{normalize_tree, Model};

const THREADS: u64 = 6;
const OWN_EXTENTS: u64 = 64;
const SHARED_EXTENTS: u64 = 16;
/// Ops per ingest thread; `REFD_STRESS_OPS` overrides it (CI runs the
/// stress tests in a debug build, where its assertions on torn reads are
/// live, with fewer ops).
const OPS_PER_THREAD_DEFAULT: usize = 100_000;

fn ops_per_thread() -> usize {
    std::env::var("REFD_STRESS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(OPS_PER_THREAD_DEFAULT)
}

fn shared_bytenr(j: u64) -> u64 {
    (1 << 40) + j * 4096
}

fn data(bytenr: u64, action: Action, root: u64, seq: u64) -> Op {
    Op::new(
        bytenr,
        4096,
        ExtentKind::Data,
        action,
        RefKey::ExtentData {
            root,
            objectid: 257,
            offset: 0,
        },
        seq,
    )
    .unwrap()
}

fn tree_op(bytenr: u64, action: Action, root: u64, level: u8, seq: u64) -> Op {
    Op::new(
        bytenr,
        16384,
        ExtentKind::Tree { level },
        action,
        RefKey::TreeBlock { root },
        seq,
    )
    .unwrap()
}

/// A thread's op stream, valid in its own order: own extents are
/// allocated, shared, dropped to zero and re-allocated (sometimes with
/// another kind); shared extents get and lose the thread's own data ref.
fn stream(t: u64, seed: u64, seq_of: impl Fn() -> u64) -> Vec<Op> {
    let mut rng = SmallRng::seed_from_u64(seed ^ t);
    // Per own extent: None = free; Some((is_tree, level, roots held)).
    let mut own: Vec<Option<(bool, u8, Vec<u64>)>> = vec![None; OWN_EXTENTS as usize];
    let mut shared = vec![0u64; SHARED_EXTENTS as usize];
    let mut ops = Vec::with_capacity(ops_per_thread());
    while ops.len() < ops_per_thread() {
        let seq = if rng.gen_bool(0.2) { seq_of() } else { 0 };
        if rng.gen_bool(0.3) {
            let j = rng.gen_range(0..SHARED_EXTENTS);
            let b = shared_bytenr(j);
            if shared[j as usize] > 0 && rng.gen_bool(0.5) {
                shared[j as usize] -= 1;
                ops.push(data(b, Action::DropRef, 100 + t, seq));
            } else {
                shared[j as usize] += 1;
                ops.push(data(b, Action::AddRef, 100 + t, seq));
            }
            continue;
        }
        let i = rng.gen_range(0..OWN_EXTENTS);
        let b = (1 << 30) + ((t * OWN_EXTENTS + i) << 16);
        match &mut own[i as usize] {
            None => {
                let is_tree = rng.gen_bool(0.5);
                let level = rng.gen_range(0..3);
                ops.push(if is_tree {
                    tree_op(b, Action::AddExtent, 5, level, seq)
                } else {
                    data(b, Action::AddExtent, 5, seq)
                });
                own[i as usize] = Some((is_tree, level, vec![5]));
            }
            Some((is_tree, level, roots)) => {
                let (is_tree, level) = (*is_tree, *level);
                let r = rng.gen_range(5..12u64);
                let add = rng.gen_bool(0.5) && !roots.contains(&r);
                if add {
                    roots.push(r);
                    ops.push(if is_tree {
                        tree_op(b, Action::AddRef, r, level, seq)
                    } else {
                        data(b, Action::AddRef, r, seq)
                    });
                } else {
                    let k = rng.gen_range(0..roots.len());
                    let r = roots.swap_remove(k);
                    ops.push(if is_tree {
                        tree_op(b, Action::DropRef, r, level, seq)
                    } else {
                        data(b, Action::DropRef, r, seq)
                    });
                    if roots.is_empty() {
                        own[i as usize] = None;
                    }
                }
            }
        }
    }
    ops
}

fn initial_tree() -> ExtentTree {
    let mut tree = ExtentTree::new();
    for j in 0..SHARED_EXTENTS {
        let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
        item.add_ref(
            RefKey::ExtentData {
                root: 1,
                objectid: 257,
                offset: 0,
            },
            1,
        );
        tree.insert(shared_bytenr(j), item);
    }
    tree
}

fn stress<S: DelayedRefStore>(store: S, seed: u64) {
    let engine = Arc::new(Engine::with_tree(store, initial_tree(), 1));
    // Commits apply in steps of 4 effects: the reader's lookups fall
    // between steps.
    engine.set_apply_step(4);
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let lookups = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let all_ops: Vec<Vec<Op>> = std::thread::scope(|s| {
        // Committer.
        {
            let (engine, stop, commits) = (engine.clone(), stop.clone(), commits.clone());
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let r = engine.commit();
                    assert!(
                        r.quarantined.is_empty(),
                        "seed {seed}: quarantined {:?}",
                        r.quarantined.first()
                    );
                    commits.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
        }
        // Reader: shared extents always hold the base ref; a lookup can
        // never see fewer (a lost op) or more than every thread's adds.
        {
            let (engine, stop, lookups) = (engine.clone(), stop.clone(), lookups.clone());
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed);
                while !stop.load(Ordering::SeqCst) {
                    let b = shared_bytenr(rng.gen_range(0..SHARED_EXTENTS));
                    let refs = engine.lookup_extent_ref(b).refs;
                    assert!(
                        (1..=1 + (THREADS as i64) * ops_per_thread() as i64).contains(&refs),
                        "seed {seed}: lookup({b}) = {refs}"
                    );
                    lookups.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Barrier churn.
        {
            let (engine, stop) = (engine.clone(), stop.clone());
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let g = engine.barrier().acquire();
                    std::thread::sleep(Duration::from_micros(200));
                    drop(g);
                    std::thread::sleep(Duration::from_micros(100));
                }
            });
        }
        let ingesters: Vec<_> = (0..THREADS)
            .map(|t| {
                let (engine, commits) = (engine.clone(), commits.clone());
                s.spawn(move || {
                    let ops = stream(t, seed, || engine.barrier().current());
                    let mut h = engine.handle().unwrap();
                    let chunks = ops.len().div_ceil(7);
                    for (i, chunk) in ops.chunks(7).enumerate() {
                        // At each fifth of its stream the ingester waits
                        // for one more commit: on two cores shared with
                        // other tests a commit can wait tens of ms for
                        // preempted threads to leave a buffer, and ingest
                        // could otherwise end before four commits ran.
                        let checkpoint = (i * 5 / chunks) as u64;
                        while commits.load(Ordering::SeqCst) < checkpoint {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        if i % 2 == 0 {
                            h.add_batch(chunk).unwrap();
                        } else {
                            for op in chunk {
                                h.add(op).unwrap();
                            }
                        }
                    }
                    ops
                })
            })
            .collect();
        let all: Vec<Vec<Op>> = ingesters.into_iter().map(|t| t.join().unwrap()).collect();
        stop.store(true, Ordering::SeqCst);
        all
    });
    // Drain: no barrier is held now.
    let r = engine.commit();
    assert!(r.quarantined.is_empty(), "seed {seed}");
    assert_eq!(engine.barrier().active(), 0);
    assert_eq!(
        engine.store().stats().heads,
        0,
        "seed {seed}: work left pending"
    );

    let mut model = Model::new();
    for j in 0..SHARED_EXTENTS {
        model.add(&data(shared_bytenr(j), Action::AddExtent, 1, 0));
    }
    model.commit(0);
    for ops in &all_ops {
        for op in ops {
            model.add(op);
        }
    }
    let m = model.commit(0);
    assert!(m.quarantined.is_empty());
    let strip = |v: Vec<refd_core::oracle::NormExtent>| {
        v.into_iter()
            .map(|mut e| {
                e.generation = 0;
                e
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(normalize_tree(&engine.tree())),
        strip(model.normalized()),
        "seed {seed}: final tree differs from the model"
    );
    engine.tree().check().unwrap();
    eprintln!(
        "{}: {} ops, {} commits, {} lookups in {:?}",
        engine.store().name(),
        all_ops.iter().map(Vec::len).sum::<usize>(),
        commits.load(Ordering::SeqCst),
        lookups.load(Ordering::SeqCst),
        started.elapsed()
    );
    assert!(
        commits.load(Ordering::SeqCst) > 3,
        "at least four commits ran concurrently with ingest"
    );
}

fn seed() -> u64 {
    std::env::var("REFD_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed)
}

#[test]
fn stress_lockfree() {
    stress(LockFreeStore::with_config(16, 64), seed());
}

#[test]
fn stress_lockfree_default_staging() {
    stress(LockFreeStore::new(), seed() + 1);
}

#[test]
fn stress_mutex() {
    stress(MutexStore::new(), seed());
}

/// Issue 13 defect 2: reads must complete in bounded time whatever the
/// ingest rate. Four threads (on this 2-core machine: more than cores)
/// ingest at full speed into the lock-free store while three readers run
/// lookups, stats and pending_all. Each reader must complete
/// [`READS_WANTED`] reads that started and ended while ingest ran; ingest
/// stops as soon as they have, or after [`INGEST_OPS_MAX`] ops per thread,
/// and the test fails if that came first. An optimistic read retried
/// whenever a hand-off or compaction published during it, so a long one
/// (pending_all, stats) starved until ingest stopped.
#[test]
fn reads_complete_under_full_ingest() {
    const INGESTERS: u64 = 4;
    const INGEST_OPS_MAX: u64 = 6_000_000;
    const READS_WANTED: u64 = 1;
    const EXTENTS: u64 = 50_000;
    // 0: ingest warming up (reads not counted), 1: measuring, 2: done.
    let phase = AtomicU64::new(0);
    let store = LockFreeStore::new();
    let done = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let ingested = AtomicU64::new(0);
    std::thread::scope(|s| {
        for kind in 0..3 {
            let (store, phase, done) = (&store, &phase, &done);
            s.spawn(move || {
                let mut i = 0u64;
                loop {
                    let p0 = phase.load(Ordering::SeqCst);
                    if p0 == 2 {
                        break;
                    }
                    match kind {
                        0 => drop(store.pending((i % EXTENTS) << 12)),
                        1 => drop(store.stats()),
                        _ => drop(store.pending_all()),
                    }
                    // Started and ended while ingest ran at full speed.
                    if p0 == 1 && phase.load(Ordering::SeqCst) == 1 {
                        done[kind].fetch_add(1, Ordering::SeqCst);
                    }
                    i += 1;
                }
            });
        }
        let ingesters: Vec<_> = (0..INGESTERS)
            .map(|t| {
                let (store, phase, ingested) = (&store, &phase, &ingested);
                s.spawn(move || {
                    let mut h = store.handle().unwrap();
                    let mut rng = SmallRng::seed_from_u64(t);
                    for i in 0..INGEST_OPS_MAX {
                        if i % 1024 == 0 {
                            match phase.load(Ordering::SeqCst) {
                                0 if t == 0 && i >= 200_000 => phase.store(1, Ordering::SeqCst),
                                2 => break,
                                _ => {}
                            }
                        }
                        let b = rng.gen_range(0..EXTENTS) << 12;
                        let action = if i % 2 == 0 {
                            Action::AddRef
                        } else {
                            Action::DropRef
                        };
                        h.add(&data(b, action, 5 + t, 0)).unwrap();
                        ingested.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        while !ingesters.iter().all(|t| t.is_finished())
            && !done
                .iter()
                .all(|d| d.load(Ordering::SeqCst) >= READS_WANTED)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        phase.store(2, Ordering::SeqCst);
    });
    let done: Vec<u64> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
    eprintln!(
        "reads started and completed during ingest: lookups {}, stats {}, pending_all {}; {} ops ingested; most attempts of a read {}",
        done[0],
        done[1],
        done[2],
        ingested.load(Ordering::SeqCst),
        store.read_attempts_max()
    );
    assert!(
        done.iter().all(|&n| n >= READS_WANTED),
        "reads starved by ingest: lookups {}, stats {}, pending_all {}",
        done[0],
        done[1],
        done[2]
    );
    // Every read took a bounded number of attempts: the optimistic ones,
    // then one per writer that could have begun a change (the handles,
    // the hand-off thread, the compactor and the small compactor) plus
    // one.
    let bound = READ_OPTIMISTIC_MAX as u64 + INGESTERS + 4;
    assert!(
        store.read_attempts_max() <= bound,
        "a read took {} attempts (bound {bound})",
        store.read_attempts_max()
    );
}

/// Lookups count every op exactly once while hand-offs and compactions
/// change the runs under them (small staging buffers: a hand-off every 16
/// ops, compactions all the time): each ingester only adds, and counts
/// each extent's adds it has begun (before the add) and done (after it),
/// so a lookup must see at least the adds done before it began and at
/// most those begun before it ended. A run counted twice (in a view and
/// in staging, or in two views) or missed (a view without a run that left
/// staging) breaks the bounds, for the full head (`pending`) and for the
/// count's summary path (`pending_summary`) alike, and one reader's
/// counts by either path never go down (32 extents, each hot: their
/// counts come from the staging cells and the views' sums).
#[test]
fn lookups_count_exactly_under_handoffs_and_compactions() {
    const INGESTERS: u64 = 2;
    const EXTENTS: u64 = 32;
    let ops = ops_per_thread() as u64;
    let store = LockFreeStore::with_config(4, 16);
    let counters = || -> Vec<AtomicU64> {
        (0..INGESTERS * EXTENTS)
            .map(|_| AtomicU64::new(0))
            .collect()
    };
    // Adds begun and done per (ingester, extent).
    let (begun, done) = (counters(), counters());
    let sum = |of: &[AtomicU64], b: u64| -> i64 {
        (0..INGESTERS)
            .map(|t| of[(t * EXTENTS + b) as usize].load(Ordering::SeqCst) as i64)
            .sum()
    };
    let ingesting = AtomicU64::new(INGESTERS);
    let lookups = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..INGESTERS {
            let (store, begun, done, ingesting) = (&store, &begun, &done, &ingesting);
            s.spawn(move || {
                let mut h = store.handle().unwrap();
                let mut rng = SmallRng::seed_from_u64(t);
                for i in 0..ops {
                    let b = rng.gen_range(0..EXTENTS);
                    let at = (t * EXTENTS + b) as usize;
                    begun[at].fetch_add(1, Ordering::SeqCst);
                    h.add(&data((b + 1) << 12, Action::AddRef, 5 + i % 3, i % 5))
                        .unwrap();
                    done[at].fetch_add(1, Ordering::SeqCst);
                }
                ingesting.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let (store, begun, done, lookups, ingesting) =
            (&store, &begun, &done, &lookups, &ingesting);
        s.spawn(move || {
            let mut rng = SmallRng::seed_from_u64(99);
            // At least one lookup, however the threads are scheduled.
            loop {
                let ingest_done = ingesting.load(Ordering::SeqCst) == 0;
                let b = rng.gen_range(0..EXTENTS);
                let bytenr = (b + 1) << 12;
                let low = sum(done, b);
                let count = || store.pending_summary(bytenr).map_or(0, |s| s.total_ref_mod);
                let before = count();
                let full = store.pending(bytenr).map_or(0, |h| h.summary.total_ref_mod);
                let summary = count();
                let high = sum(begun, b);
                for (what, n) in [("pending", full), ("pending_summary", summary)] {
                    assert!(
                        (low..=high).contains(&n),
                        "{what}({bytenr}) = {n}, outside [{low}, {high}]"
                    );
                }
                // Adds only: one reader's counts never go down, whichever
                // path (the hot extents' sums or the heads) gives them.
                assert!(
                    before <= full && full <= summary,
                    "pending_summary {before}, then pending {full}, then pending_summary \
                     {summary} of {bytenr}"
                );
                lookups.fetch_add(1, Ordering::Relaxed);
                if ingest_done {
                    break;
                }
            }
        });
    });
    let lookups = lookups.load(Ordering::Relaxed);
    eprintln!(
        "{lookups} lookups checked, {} runs at the end",
        store.live_runs()
    );
    for b in 0..EXTENTS {
        let n = store
            .pending((b + 1) << 12)
            .map_or(0, |h| h.summary.total_ref_mod);
        assert_eq!(n, sum(&done, b), "extent {b} at the end");
    }
}

/// Hot extents per ingester in [`stress_hot`].
const HOT_PER_THREAD: u64 = 2;
/// Ingesters in [`stress_hot`].
const HOT_INGESTERS: u64 = 3;
/// Ops of a buffer of the lock-free store in [`stress_hot_lockfree`].
const HOT_STAGING_OPS: usize = 256;

fn hot_bytenr(t: u64, e: u64) -> u64 {
    (1 << 36) + ((t * HOT_PER_THREAD + e) << 20)
}

/// One life of a hot extent in [`hot_stream`]: its shape, the roots that
/// hold a ref, and how many more ops it takes before its refs are dropped.
struct Life {
    tree: Option<u8>,
    num_bytes: u64,
    roots: Vec<u64>,
    more: u32,
}

impl Life {
    fn op(&self, bytenr: u64, action: Action, root: u64, seq: u64) -> Op {
        match self.tree {
            Some(level) => tree_op(bytenr, action, root, level, seq),
            None => {
                let mut op = data(bytenr, action, root, seq);
                op.num_bytes = self.num_bytes;
                op
            }
        }
    }
}

/// A thread's op stream for [`stress_hot`], valid in its own order: 70%
/// of its ops go to its [`HOT_PER_THREAD`] hot extents, each allocated,
/// given refs (and, as a tree block, extent_ops: ops of another kind than
/// the cells sum), dropped to zero and allocated again, now and then with
/// another size or kind (an op of another shape in the same buffer); in
/// every other 2048 ops a life is an allocation and its drop only (past
/// `CELL_ALLOCS_MAX` = 31 allocations of one extent in a buffer of 256
/// ops), else 1 to 6 more ops. The rest add or drop the thread's ref on
/// the shared extents. Also returns, per hot extent, its refs after the
/// first `n` ops of the stream, for every `n`.
fn hot_stream(t: u64, seed: u64, seq_of: impl Fn() -> u64) -> (Vec<Op>, Vec<Vec<i64>>) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (t << 8) ^ 0x407);
    let n = ops_per_thread();
    let mut lives: Vec<Option<Life>> = (0..HOT_PER_THREAD).map(|_| None).collect();
    let mut refs_at: Vec<Vec<i64>> = vec![vec![0]; HOT_PER_THREAD as usize];
    let mut shared = vec![0u64; SHARED_EXTENTS as usize];
    let mut ops = Vec::with_capacity(n);
    while ops.len() < n {
        let seq = if rng.gen_bool(0.2) { seq_of() } else { 0 };
        if rng.gen_bool(0.3) {
            let j = rng.gen_range(0..SHARED_EXTENTS);
            let b = shared_bytenr(j);
            if shared[j as usize] > 0 && rng.gen_bool(0.5) {
                shared[j as usize] -= 1;
                ops.push(data(b, Action::DropRef, 100 + t, seq));
            } else {
                shared[j as usize] += 1;
                ops.push(data(b, Action::AddRef, 100 + t, seq));
            }
        } else {
            let e = rng.gen_range(0..HOT_PER_THREAD);
            let b = hot_bytenr(t, e);
            let short = (ops.len() / 2048) % 2 == 0;
            let life = &mut lives[e as usize];
            match life {
                None => {
                    let (tree, num_bytes) = match rng.gen_range(0..8) {
                        0 => (Some(rng.gen_range(0..2)), 16384),
                        1 => (None, 8192),
                        _ => (None, 4096),
                    };
                    let l = Life {
                        tree,
                        num_bytes,
                        roots: vec![5],
                        more: if short { 0 } else { rng.gen_range(1..=6) },
                    };
                    ops.push(l.op(b, Action::AddExtent, 5, seq));
                    *life = Some(l);
                }
                Some(l) if l.more > 0 => {
                    l.more -= 1;
                    let r = rng.gen_range(5..12u64);
                    if let Some(level) = l.tree.filter(|_| rng.gen_bool(0.2)) {
                        ops.push(
                            Op::update_head(
                                b,
                                16384,
                                ExtentKind::Tree { level },
                                ExtentOp {
                                    flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                                    key: None,
                                },
                            )
                            .unwrap(),
                        );
                    } else if !l.roots.contains(&r) && (l.roots.len() < 2 || rng.gen_bool(0.5)) {
                        l.roots.push(r);
                        ops.push(l.op(b, Action::AddRef, r, seq));
                    } else {
                        // Keep one ref until the life's last op.
                        let k = rng.gen_range(0..l.roots.len());
                        let r = l.roots[k];
                        if l.roots.len() > 1 {
                            l.roots.swap_remove(k);
                            ops.push(l.op(b, Action::DropRef, r, seq));
                        } else {
                            ops.push(l.op(b, Action::AddRef, 12 + u64::from(l.more), seq));
                            l.roots.push(12 + u64::from(l.more));
                        }
                    }
                }
                Some(l) => {
                    let r = l.roots.pop().unwrap();
                    ops.push(l.op(b, Action::DropRef, r, seq));
                    if l.roots.is_empty() {
                        *life = None;
                    }
                }
            }
        }
        for (e, at) in refs_at.iter_mut().enumerate() {
            let last = *at.last().unwrap();
            let op = ops.last().unwrap();
            let now = if op.bytenr == hot_bytenr(t, e as u64) {
                last + op.ref_mod()
            } else {
                last
            };
            at.push(now);
        }
    }
    (ops, refs_at)
}

/// Hot extents under real threads: each ingester's [`hot_stream`]
/// (allocated again and again, past 31 allocations per buffer, dropped
/// to zero and allocated again, mixed with ops of another shape) while a
/// committer commits, a barrier thread takes and drops seq barriers and a
/// reader looks the hot extents up (`lookup_extent_ref`: the committed
/// item and the pending summary, which the lock-free store sums from its
/// hot cells and views). Only its ingester changes a hot extent, so a
/// lookup of it must give exactly its refs after the first `n` ops of
/// its ingester's stream, for an `n` from the ops done before the lookup
/// began to those begun before it ended; each ingester also looks its
/// own extents up between its ops (exactly after `n`). At the end the
/// extent tree equals the sequential model's.
fn stress_hot<S: DelayedRefStore>(store: S, seed: u64) {
    let engine = Arc::new(Engine::with_tree(store, initial_tree(), 1));
    engine.set_apply_step(4);
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let lookups = Arc::new(AtomicU64::new(0));
    // Ops of each ingester's stream begun (before their add) and done
    // (after it).
    let begun: Arc<Vec<AtomicU64>> =
        Arc::new((0..HOT_INGESTERS).map(|_| AtomicU64::new(0)).collect());
    let done: Arc<Vec<AtomicU64>> =
        Arc::new((0..HOT_INGESTERS).map(|_| AtomicU64::new(0)).collect());
    let streams: Vec<(Vec<Op>, Vec<Vec<i64>>)> = (0..HOT_INGESTERS)
        .map(|t| hot_stream(t, seed, || engine.barrier().current()))
        .collect();
    // The streams hold what the test is for: more allocations of one hot
    // extent than a cell counts (31) within a buffer's worth of ops.
    for (t, (ops, _)) in streams.iter().enumerate() {
        let most = ops
            .chunks(HOT_STAGING_OPS)
            .flat_map(|c| {
                (0..HOT_PER_THREAD).map(move |e| {
                    c.iter()
                        .filter(|o| {
                            o.action == Action::AddExtent && o.bytenr == hot_bytenr(t as u64, e)
                        })
                        .count()
                })
            })
            .max()
            .unwrap_or(0);
        assert!(
            most > 31,
            "at most {most} allocations of a hot extent per buffer"
        );
    }
    let streams = Arc::new(streams);
    let started = Instant::now();
    std::thread::scope(|s| {
        {
            let (engine, stop, commits) = (engine.clone(), stop.clone(), commits.clone());
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let r = engine.commit();
                    assert!(
                        r.quarantined.is_empty(),
                        "seed {seed}: quarantined {:?}",
                        r.quarantined.first()
                    );
                    commits.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
        }
        {
            let (engine, stop) = (engine.clone(), stop.clone());
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let g = engine.barrier().acquire();
                    std::thread::sleep(Duration::from_micros(200));
                    drop(g);
                    std::thread::sleep(Duration::from_micros(100));
                }
            });
        }
        {
            let (engine, stop, lookups) = (engine.clone(), stop.clone(), lookups.clone());
            let (begun, done, streams) = (begun.clone(), done.clone(), streams.clone());
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ 0xbead);
                while !stop.load(Ordering::SeqCst) {
                    let t = rng.gen_range(0..HOT_INGESTERS);
                    let e = rng.gen_range(0..HOT_PER_THREAD);
                    let b = hot_bytenr(t, e);
                    // The count (`lookup_extent_ref`: the pending summary,
                    // which the lock-free store sums from its hot cells and
                    // views) and, in turn, the whole pending head.
                    let whole = rng.gen_bool(0.5);
                    let from = done[t as usize].load(Ordering::SeqCst) as usize;
                    let refs = if whole {
                        let tree = engine.tree();
                        let committed = tree.get(b).map_or(0, |c| c.refs as i64);
                        let head = engine.pending_with(&tree, b);
                        committed + head.map_or(0, |h| h.summary.total_ref_mod)
                    } else {
                        engine.lookup_extent_ref(b).refs
                    };
                    let to = begun[t as usize].load(Ordering::SeqCst) as usize;
                    let at = &streams[t as usize].1[e as usize];
                    assert!(
                        at[from..=to].contains(&refs),
                        "seed {seed}: hot extent {e} of ingester {t}: {refs} refs (whole head: \
                         {whole}), not its refs after any of its ops {from}..={to}"
                    );
                    lookups.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let ingesters: Vec<_> = (0..HOT_INGESTERS)
            .map(|t| {
                let (engine, commits) = (engine.clone(), commits.clone());
                let (begun, done, streams) = (begun.clone(), done.clone(), streams.clone());
                s.spawn(move || {
                    let (ops, at) = &streams[t as usize];
                    let mut h = engine.handle().unwrap();
                    let chunks = ops.len().div_ceil(7);
                    let (begun, done) = (&begun[t as usize], &done[t as usize]);
                    for (i, chunk) in ops.chunks(7).enumerate() {
                        // Bounded: a committer that died (its panic is
                        // reported) must not hang the ingesters.
                        let checkpoint = (i * 5 / chunks) as u64;
                        let waiting = Instant::now();
                        while commits.load(Ordering::SeqCst) < checkpoint
                            && waiting.elapsed() < Duration::from_secs(10)
                        {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        let n = i * 7;
                        if i % 2 == 0 {
                            begun.store((n + chunk.len()) as u64, Ordering::SeqCst);
                            h.add_batch(chunk).unwrap();
                            done.store((n + chunk.len()) as u64, Ordering::SeqCst);
                        } else {
                            for (k, op) in chunk.iter().enumerate() {
                                begun.store((n + k + 1) as u64, Ordering::SeqCst);
                                h.add(op).unwrap();
                                done.store((n + k + 1) as u64, Ordering::SeqCst);
                            }
                        }
                        if i % 8 == 0 {
                            let n = n + chunk.len();
                            let e = (i / 8) as u64 % HOT_PER_THREAD;
                            let refs = engine.lookup_extent_ref(hot_bytenr(t, e)).refs;
                            assert_eq!(
                                refs, at[e as usize][n],
                                "seed {seed}: ingester {t}'s own lookup of its hot extent {e} \
                                 after {n} ops"
                            );
                        }
                    }
                })
            })
            .collect();
        // Stop the other threads even if an ingester failed (else they
        // would run on, and the scope would wait for them forever).
        let joined: Vec<_> = ingesters.into_iter().map(|t| t.join()).collect();
        stop.store(true, Ordering::SeqCst);
        for r in joined {
            if let Err(panic) = r {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let r = engine.commit();
    assert!(r.quarantined.is_empty(), "seed {seed}");
    assert_eq!(engine.barrier().active(), 0);
    assert_eq!(
        engine.store().stats().heads,
        0,
        "seed {seed}: work left pending"
    );
    let mut model = Model::new();
    for j in 0..SHARED_EXTENTS {
        model.add(&data(shared_bytenr(j), Action::AddExtent, 1, 0));
    }
    model.commit(0);
    for (ops, _) in streams.iter() {
        for op in ops {
            model.add(op);
        }
    }
    let m = model.commit(0);
    assert!(m.quarantined.is_empty());
    let strip = |v: Vec<refd_core::oracle::NormExtent>| {
        v.into_iter()
            .map(|mut e| {
                e.generation = 0;
                e
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(normalize_tree(&engine.tree())),
        strip(model.normalized()),
        "seed {seed}: final tree differs from the model"
    );
    engine.tree().check().unwrap();
    eprintln!(
        "{} (hot extents): {} ops, {} commits, {} lookups in {:?}",
        engine.store().name(),
        streams.iter().map(|s| s.0.len()).sum::<usize>(),
        commits.load(Ordering::SeqCst),
        lookups.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(commits.load(Ordering::SeqCst) > 3);
}

/// Found two ways a lookup of a hot extent gave refs that no prefix of
/// its ingester's ops has (-1, or one too many: an op seen without an
/// earlier one of the same extent), only when threads were preempted:
/// - a lookup read the owner's buffers one after another and could see
///   the ops it appended after moving to the next buffer without the rest
///   of the one it left (no change of the index spoiled the read); a lane
///   is now read again when its owner moved (`Ring::moves`; named test
///   `a_lookup_never_sees_ops_after_a_move_without_those_before`). With
///   two busy loops on the 2 cores, seeds 200-359: 7 of 160 runs failed
///   before, 0 of 160 after; 1 of 120 more still failed (seed 10: "hot
///   extent 0 of ingester 0: 2 refs (whole head: false), not its refs
///   after any of its ops 4550..=5581");
/// - that one (found by a review): a lookup read the sealed generation,
///   then the live one, and an ingester still inside the sealed one could
///   finish its batch there and go on in the live one meanwhile; the
///   generations are now read newest first (`read_visible`). 0 of 300
///   runs failed after both fixes, beside two busy loops.
#[test]
fn stress_hot_lockfree() {
    stress_hot(LockFreeStore::with_config(8, HOT_STAGING_OPS), seed() + 2);
}

#[test]
fn stress_hot_mutex() {
    stress_hot(MutexStore::new(), seed() + 2);
}
