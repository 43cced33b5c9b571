//! What the engine-level tests share: op streams run through both stores
//! and the sequential model, which must agree.

#![allow(dead_code)]

use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::delayed::mutex::MutexStore;
use refd_core::delayed::DelayedRefStore;
use refd_core::engine::{CommitReport, Engine};
use refd_core::model::Op;
use refd_core::oracle::{normalize_tree, Model, ModelCommit};

/// Cases of a proptest block: `PROPTEST_CASES` when set (a soak; the
/// blocks set their own count, which proptest's environment variable does
/// not override), else `default` (CI's budget).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A commit, with what its freed lists give a consumer of freed space
/// (`Ran::freed_unreused`) as `(bytenr, num_bytes)`.
pub fn commit_listed<S: DelayedRefStore>(e: &Engine<S>) -> (CommitReport, Vec<(u64, u64)>) {
    let (ran, _) = e.run_frozen_parts(e.freeze(), &());
    let listed = ran
        .freed_unreused()
        .iter()
        .map(|f| (f.bytenr, f.num_bytes))
        .collect();
    (ran.apply(), listed)
}

/// A commit report as the model states one: freed extents and refused
/// bytenrs, each sorted.
pub fn summary(r: &CommitReport) -> ModelCommit {
    let mut freed: Vec<(u64, u64)> = r.freed.iter().map(|f| (f.bytenr, f.num_bytes)).collect();
    freed.sort_unstable();
    let mut quarantined: Vec<u64> = r.quarantined.iter().map(|q| q.head.bytenr).collect();
    quarantined.sort_unstable();
    ModelCommit {
        freed,
        quarantined,
        held: Vec::new(),
    }
}

/// Both engines' trees equal the model's, and the lock-free one's keeps
/// its invariants.
pub fn check_equal<A: DelayedRefStore, B: DelayedRefStore>(
    lf: &Engine<A>,
    mx: &Engine<B>,
    model: &Model,
    step: usize,
) {
    let t_lf = normalize_tree(&lf.tree());
    let t_mx = normalize_tree(&mx.tree());
    assert_eq!(t_lf, t_mx, "lockfree vs mutex tree after step {step}");
    assert_eq!(
        t_lf,
        model.normalized(),
        "engine vs model tree after step {step}"
    );
    lf.tree().check().expect("tree invariants");
}

/// Run `commits` (each a list of ops, spread over two handles of the
/// lock-free store) through both stores and the model, checking lookups
/// of every bytenr named before each commit, and the commit's freed and
/// refused extents and the trees after it. Returns the lock-free engine's
/// reports.
pub fn agree(commits: &[Vec<Op>]) -> Vec<CommitReport> {
    let lf = Engine::new(LockFreeStore::with_config(2, 2));
    let mx = Engine::new(MutexStore::new());
    let mut model = Model::new();
    let mut reports = Vec::new();
    let mut lf_h = [lf.handle().unwrap(), lf.handle().unwrap()];
    let mut mx_h = mx.handle().unwrap();
    for (n, ops) in commits.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            lf_h[i % 2].add(op).unwrap();
            mx_h.add(op).unwrap();
            model.add(op);
        }
        let mut bytenrs: Vec<u64> = ops.iter().map(|o| o.bytenr).collect();
        bytenrs.sort_unstable();
        bytenrs.dedup();
        for &b in &bytenrs {
            let want = model.lookup(b);
            assert_eq!(lf.lookup_extent_ref(b).refs, want, "lock-free lookup {b}");
            assert_eq!(mx.lookup_extent_ref(b).refs, want, "mutex lookup {b}");
        }
        let ((r_lf, listed_lf), (r_mx, listed_mx)) = (commit_listed(&lf), commit_listed(&mx));
        let m = model.commit(0);
        assert_eq!(r_lf.quarantined, r_mx.quarantined, "commit {n}");
        assert_eq!(listed_lf, listed_mx, "freed list, commit {n}");
        assert_eq!(
            listed_lf,
            model.reusable(&m.freed),
            "freed list vs model, commit {n}"
        );
        assert_eq!(r_lf.freed, r_mx.freed, "commit {n}");
        let s = summary(&r_lf);
        assert_eq!(s.freed, m.freed, "freed vs model, commit {n}");
        assert_eq!(s.quarantined, m.quarantined, "refused vs model, commit {n}");
        check_equal(&lf, &mx, &model, n);
        reports.push(r_lf);
    }
    reports
}
