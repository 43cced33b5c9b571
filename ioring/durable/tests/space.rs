//! Space reservation (`refd_durable::space`, `docs/durable.md`, "Space
//! reservation"): on tiny node regions, random SUBMIT and add streams
//! (clustered allocations that split leaves, allocations spread over a
//! deep tree, a hot extent whose item grows until its backrefs are keyed,
//! drops that free items, mixed) are either refused at admission with a
//! typed `NoSpace` and nothing logged, or committed: no commit ever fails,
//! every acknowledged op is in the tree after a commit and after a
//! reopen, and no op of a refused request is. `REFD_SPACE_SEED=<n>` reruns one seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{
    AddError, CommitPolicy, DurableEngine, FormatOptions, OpenOptions, SubmitError, Submitted,
};
use refd_ioring::format::FsId;
use refd_ioring::{LogConfig, SimConfig, SimStorage};

type Dev = Arc<SimStorage>;

const SEEDS: u64 = 24;
const STEPS_MAX: usize = 400;
const LOG_BYTES: u64 = 1 << 20;

fn device(dev_bytes: u64, seed: u64) -> Dev {
    device_with_log(dev_bytes, LOG_BYTES, seed)
}

fn device_with_log(dev_bytes: u64, log_bytes: u64, seed: u64) -> Dev {
    let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(dev_bytes, seed)).unwrap());
    DurableEngine::format(
        &dev,
        FormatOptions {
            log_bytes: Some(log_bytes),
            fs_id: Some(FsId([9; 16])),
        },
    )
    .unwrap();
    dev
}

fn open(dev: &Dev) -> DurableEngine<Dev> {
    open_with(dev, CommitPolicy::default())
}

fn open_with(dev: &Dev, policy: CommitPolicy) -> DurableEngine<Dev> {
    let options = OpenOptions {
        log: LogConfig {
            batch_bytes_max: 64 << 10,
            ..LogConfig::default()
        },
        policy,
        ..OpenOptions::default()
    };
    DurableEngine::open(Arc::clone(dev), options).unwrap().0
}

fn data(action: Action, bytenr: u64, objectid: u64) -> Op {
    let key = RefKey::ExtentData {
        root: 5,
        objectid,
        offset: objectid.wrapping_mul(4096),
    };
    Op::new(bytenr, 4096, ExtentKind::Data, action, key, 0).unwrap()
}

/// Refs by extent and objectid, acknowledged.
type Model = BTreeMap<u64, BTreeMap<u64, i64>>;

struct Run {
    rng: ChaCha8Rng,
    model: Model,
    /// Allocations of refused requests (never acknowledged later).
    refused_allocs: BTreeSet<u64>,
    /// Every bytenr ever allocated or refused.
    used: BTreeSet<u64>,
    next_bytenr: u64,
    next_objectid: u64,
    request: u64,
    admitted_ops: u64,
    refused: u64,
    drops_after_refusal: u64,
}

impl Run {
    fn new(seed: u64) -> Run {
        Run {
            rng: ChaCha8Rng::seed_from_u64(seed),
            model: Model::new(),
            refused_allocs: BTreeSet::new(),
            used: BTreeSet::new(),
            next_bytenr: 1 << 30,
            next_objectid: 1000,
            request: 0,
            admitted_ops: 0,
            refused: 0,
            drops_after_refusal: 0,
        }
    }

    fn fresh_bytenr(&mut self, spread: bool) -> u64 {
        loop {
            let b = if spread {
                (1u64 << 32) + self.rng.gen_range(0..1u64 << 24) * 4096
            } else {
                self.next_bytenr += 4096;
                self.next_bytenr
            };
            // Never reused: a freed extent allocated again before its
            // free is committed is another test.
            if self.used.insert(b) {
                return b;
            }
        }
    }

    fn objectid(&mut self) -> u64 {
        self.next_objectid += 1;
        self.next_objectid
    }

    fn some_extent(&mut self) -> Option<u64> {
        if self.model.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.model.len());
        self.model.keys().nth(i).copied()
    }

    /// A random request: its ops (valid against the model).
    fn ops(&mut self) -> Vec<Op> {
        let k = self.rng.gen_range(1..=400usize);
        let mut ops = Vec::new();
        match self.rng.gen_range(0..9) {
            // New extents, consecutive: leaves fill and split.
            0..=3 => {
                for _ in 0..k {
                    let (b, o) = (self.fresh_bytenr(false), self.objectid());
                    ops.push(data(Action::AddExtent, b, o));
                }
            }
            // New extents anywhere: many leaves, a deeper tree.
            4 | 5 => {
                for _ in 0..k {
                    let (b, o) = (self.fresh_bytenr(true), self.objectid());
                    ops.push(data(Action::AddExtent, b, o));
                }
            }
            // One hot extent gains backrefs: its item grows, then keyed.
            6 => {
                if let Some(b) = self.some_extent() {
                    for _ in 0..k {
                        let o = self.objectid();
                        ops.push(data(Action::AddRef, b, o));
                    }
                }
            }
            // Drops of existing refs (items shrink and go).
            _ => {
                let mut taken: BTreeMap<(u64, u64), i64> = BTreeMap::new();
                for _ in 0..k {
                    let Some(b) = self.some_extent() else { break };
                    let refs = &self.model[&b];
                    let i = self.rng.gen_range(0..refs.len());
                    let (&o, &n) = refs.iter().nth(i).unwrap();
                    let t = taken.entry((b, o)).or_default();
                    if *t < n {
                        *t += 1;
                        ops.push(data(Action::DropRef, b, o));
                    }
                }
            }
        }
        ops
    }

    fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            let Some(RefKey::ExtentData { objectid, .. }) = op.key else {
                unreachable!()
            };
            let d = if op.action == Action::DropRef { -1 } else { 1 };
            let refs = self.model.entry(op.bytenr).or_default();
            *refs.entry(objectid).or_default() += d;
            refs.retain(|_, n| *n > 0);
            if refs.is_empty() {
                self.model.remove(&op.bytenr);
            }
        }
        self.admitted_ops += ops.len() as u64;
    }

    fn refuse(&mut self, ops: &[Op]) {
        self.refused += 1;
        for op in ops {
            if op.action == Action::AddExtent {
                self.refused_allocs.insert(op.bytenr);
            }
        }
    }
}

/// One seeded stream on a device of `dev_bytes`.
fn run_seed(seed: u64) -> (u64, u64, u64) {
    run_seed_with(seed, false)
}

/// [`run_seed`]; with `beside`, commits run on another thread back to
/// back while the stream is submitted (so a commit's reservation meets
/// the next one's while it applies), instead of at random steps.
fn run_seed_with(seed: u64, beside: bool) -> (u64, u64, u64) {
    let dev_bytes = [3u64 << 20, 4 << 20, 6 << 20][(seed % 3) as usize] + LOG_BYTES;
    let dev = device(dev_bytes, seed);
    let e = open(&dev);
    let (session, t) = e.register_session().unwrap();
    t.wait().unwrap();
    let mut r = Run::new(seed);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let committer = beside.then(|| {
            s.spawn(|| {
                let mut commits = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    e.commit().unwrap_or_else(|err| {
                        panic!("seed {seed}: commit {commits} failed: {err}")
                    });
                    commits += 1;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                commits
            })
        });
        submit_stream(&e, &mut r, session, seed, beside);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = committer {
            assert!(
                c.join().expect("the committer") > 0,
                "seed {seed}: no commit ran"
            );
        }
    });
    e.commit().expect("the last commit");
    e.verify().expect("verify");
    check(&e, &r, seed, "after the last commit");
    drop(e);
    let e = open(&dev);
    check(&e, &r, seed, "after a reopen");
    e.commit().expect("commit after reopen");
    (r.admitted_ops, r.refused, r.drops_after_refusal)
}

/// The stream of one seed; commits at random steps unless `beside`.
fn submit_stream(e: &DurableEngine<Dev>, r: &mut Run, session: u64, seed: u64, beside: bool) {
    let mut last_refused = false;
    for step in 0..STEPS_MAX {
        if !beside && r.rng.gen_bool(0.1) {
            e.commit()
                .unwrap_or_else(|err| panic!("seed {seed} step {step}: commit failed: {err}"));
            continue;
        }
        let ops = r.ops();
        if ops.is_empty() {
            continue;
        }
        let drops_only = ops.iter().all(|op| op.action == Action::DropRef);
        let outcome = if r.rng.gen_bool(0.2) {
            // The in-process path, one op at a time.
            add_each(e, &ops, r, seed)
        } else {
            r.request += 1;
            match e.submit(session, r.request, &ops) {
                Ok(Submitted::Queued { ticket, .. }) => {
                    ticket.wait().unwrap();
                    r.apply(&ops);
                    true
                }
                Ok(other) => panic!("seed {seed}: not a new request: {other:?}"),
                Err(SubmitError::NoSpace(n)) => {
                    assert!(n.nodes_needed > n.nodes_free, "seed {seed}: {n:?}");
                    r.refuse(&ops);
                    false
                }
                Err(err) => panic!("seed {seed} step {step}: SUBMIT failed: {err}"),
            }
        };
        if drops_only && last_refused && outcome {
            r.drops_after_refusal += 1;
        }
        last_refused = !outcome || (last_refused && drops_only);
    }
}

/// The ops one by one through `add`: a refused op ends the request (the
/// ops before it are acknowledged, as `add` acknowledges each).
fn add_each(e: &DurableEngine<Dev>, ops: &[Op], r: &mut Run, seed: u64) -> bool {
    for (i, op) in ops.iter().enumerate() {
        match e.add_durable(op) {
            Ok(_) => r.apply(std::slice::from_ref(op)),
            Err(AddError::NoSpace(_)) => {
                r.refuse(&ops[i..]);
                return false;
            }
            Err(err) => panic!("seed {seed}: add failed: {err}"),
        }
    }
    true
}

fn check(e: &DurableEngine<Dev>, r: &Run, seed: u64, when: &str) {
    for (&b, refs) in &r.model {
        let want: i64 = refs.values().sum();
        let got = e.lookup_extent_ref(b).unwrap().refs;
        assert_eq!(got, want, "seed {seed} {when}: extent {b}");
    }
    for &b in &r.refused_allocs {
        assert_eq!(
            e.lookup_extent_ref(b).unwrap().refs,
            0,
            "seed {seed} {when}: refused extent {b} is there"
        );
    }
}

#[test]
fn admitted_ops_always_commit_on_tiny_node_regions() {
    let seeds: Vec<u64> = match std::env::var("REFD_SPACE_SEED") {
        Ok(s) => vec![s.parse().expect("REFD_SPACE_SEED is a number")],
        Err(_) => (0..SEEDS).collect(),
    };
    let (mut admitted, mut refused, mut drops) = (0, 0, 0);
    for &seed in &seeds {
        let (a, f, d) = run_seed(seed);
        admitted += a;
        refused += f;
        drops += d;
    }
    eprintln!(
        "{} seeds: {admitted} ops acknowledged, {refused} requests refused, {drops} drop-only \
         requests admitted right after a refusal",
        seeds.len()
    );
    if seeds.len() as u64 == SEEDS {
        // The streams must reach the limit (else nothing was tested).
        assert!(
            refused >= SEEDS,
            "{refused} refusals: the regions never filled"
        );
    }
}

/// The same streams with commits running beside them: an op admitted
/// while a commit applies must fit beside that commit's reservation
/// (which shrinks to what the commit really changes once it knows, see
/// `Gate::exact`), so no commit may fail for lack of nodes either.
#[test]
fn admitted_ops_always_commit_with_commits_running_beside() {
    let seeds: Vec<u64> = match std::env::var("REFD_SPACE_SEED") {
        Ok(s) => vec![s.parse().expect("REFD_SPACE_SEED is a number")],
        Err(_) => (0..SEEDS / 2).collect(),
    };
    let (mut admitted, mut refused) = (0, 0);
    for &seed in &seeds {
        let (a, f, _) = run_seed_with(seed, true);
        admitted += a;
        refused += f;
    }
    eprintln!(
        "{} seeds, commits beside: {admitted} ops acknowledged, {refused} requests refused",
        seeds.len()
    );
    if seeds.len() as u64 == SEEDS / 2 {
        assert!(refused > 0, "the regions never filled");
    }
}

/// The reference bytes (`ADD_REF_BYTES`) against the worst stream for
/// them: every op adds a new keyed backref (47 bytes: the extents' items
/// are full of inline backrefs after the first few) at a hashed place in
/// the leaves, until the region refuses. Each refusal first commits what
/// is pending, and that commit must find its nodes. Charged 1 byte per
/// reference instead, the first commit runs out of nodes after a
/// million references were admitted (checked when this test was
/// written).
#[test]
fn new_keyed_backrefs_up_to_the_limit_always_commit() {
    // A log large enough that one commit can carry the region's worth.
    let log_bytes = 32 << 20;
    let dev = device_with_log((4 << 20) + log_bytes, log_bytes, 7);
    // Commits only when the region refuses (no dirty-bytes trigger).
    let policy = CommitPolicy {
        dirty_bytes_trigger: 0,
        ..CommitPolicy::default()
    };
    let e = open_with(&dev, policy);
    let (session, t) = e.register_session().unwrap();
    t.wait().unwrap();
    let extents: Vec<u64> = (0..4).map(|i| (1u64 << 30) + i * 4096).collect();
    let mut request = 1;
    let allocs: Vec<Op> = extents
        .iter()
        .map(|&b| data(Action::AddExtent, b, 1))
        .collect();
    match e.submit(session, request, &allocs).unwrap() {
        Submitted::Queued { ticket, .. } => ticket.wait().map(drop).unwrap(),
        other => panic!("{other:?}"),
    }
    e.commit().unwrap();
    let (mut objectid, mut acknowledged, mut refused) = (1u64, 0u64, 0u64);
    while refused < 3 && request < 10_000 {
        let ops: Vec<Op> = (0..500)
            .map(|i| {
                objectid += 1;
                data(Action::AddRef, extents[i % extents.len()], objectid)
            })
            .collect();
        request += 1;
        match e.submit(session, request, &ops) {
            Ok(Submitted::Queued { ticket, .. }) => {
                ticket.wait().unwrap();
                acknowledged += ops.len() as u64;
            }
            Ok(other) => panic!("not a new request: {other:?}"),
            Err(SubmitError::NoSpace(_)) => refused += 1,
            Err(err) => panic!("request {request} ({acknowledged} refs acknowledged): {err}"),
        }
    }
    assert_eq!(refused, 3, "the region never filled");
    e.commit().expect("the last commit");
    e.verify().expect("verify");
    let total: u64 = extents
        .iter()
        .map(|&b| e.lookup_extent_ref(b).unwrap().refs as u64)
        .sum();
    assert_eq!(total, acknowledged + extents.len() as u64);
    eprintln!("{acknowledged} new keyed backrefs acknowledged before the region refused");
    drop(e);
    let e = open(&dev);
    e.verify().expect("verify after a reopen");
}
