//! A commit on a hot extent (tens of thousands of backrefs) against the
//! sequential model, on the simulated device. A binary of its own: it
//! loads both cores for half a second, which the timing-sensitive unit
//! tests of the engine (the committer's dirty-bytes trigger) must not
//! share.

use std::sync::Arc;

use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_core::oracle::{normalize_tree, Model};
use refd_durable::{DurableEngine, OpenOptions};
use refd_ioring::btree::Key;
use refd_ioring::SimStorage;

mod common;

type Dev = Arc<SimStorage>;

/// A commit on a hot extent (50k backrefs, most keyed) gives the item the
/// sequential model gives, and the B+tree holds exactly its encoding
/// (`codec::encode_extent`, item by item): after the allocation, after
/// commits of a few adds, drops to zero and recounts spread over the
/// backrefs (the changed-keys diff), after a reopen, and after a drop of
/// everything (the extent is freed, no item of it is left).
#[test]
fn a_commit_on_a_hot_extent_matches_the_model() {
    const BACKREFS: u64 = 50_000;
    let dev = common::formatted(256 << 20, 64 << 20, 1);
    let options = || OpenOptions {
        policy: refd_durable::CommitPolicy {
            dirty_bytes_trigger: 0,
            ..refd_durable::CommitPolicy::default()
        },
        ..OpenOptions::default()
    };
    let bytenr = 1u64 << 30;
    let key = |n: u64| match n % 7 {
        0 => RefKey::SharedData {
            parent: (n + 1) << 12,
        },
        _ => RefKey::ExtentData {
            root: 256 + n,
            objectid: 257,
            offset: n % 3,
        },
    };
    let op = |action: Action, n: u64| {
        Op::new(bytenr, 128 << 10, ExtentKind::Data, action, key(n), 0).unwrap()
    };
    let mut model = Model::new();
    let check = |e: &DurableEngine<Dev>, model: &Model, step: &str| {
        let committed = e.committed_extents().unwrap();
        // Not printed whole: tens of thousands of backrefs.
        let (got, want) = (normalize_tree(&committed), model.normalized());
        assert!(
            got == want,
            "{step}: {} extents, the model {}",
            got.len(),
            want.len()
        );
        assert!(
            committed == *e.cached_extents(),
            "{step}: cache and B+tree differ"
        );
        let stored: Vec<(Key, Vec<u8>)> = e
            .btree()
            .range(Key::new(bytenr, 0, 0)..Key::new(bytenr + 1, 0, 0))
            .collect::<Result<_, _>>()
            .unwrap();
        let want = committed.get(bytenr).map_or(Vec::new(), |i| {
            refd_durable::codec::encode_extent(bytenr, i).unwrap()
        });
        assert!(
            stored == want,
            "{step}: the B+tree items are not the item's encoding"
        );
        e.verify().unwrap();
    };
    let run = |e: &DurableEngine<Dev>, model: &mut Model, ops: &[Op], step: &str| {
        for o in ops {
            e.add(o).unwrap();
            model.add(o);
        }
        let s = e.commit().unwrap();
        let m = model.commit(0);
        assert!(
            s.core.quarantined.is_empty(),
            "{step}: {:?}",
            s.core.quarantined
        );
        assert!(m.quarantined.is_empty(), "{step}");
        let freed: Vec<(u64, u64)> = s
            .core
            .freed
            .iter()
            .map(|f| (f.bytenr, f.num_bytes))
            .collect();
        assert_eq!(freed, m.freed, "{step}");
    };
    let (e, _) = DurableEngine::open(Arc::clone(&dev), options()).unwrap();
    model.generation = e.generation();
    // Every backref once, every tenth twice.
    let mut ops = vec![op(Action::AddExtent, 0)];
    ops.extend((1..BACKREFS).map(|n| op(Action::AddRef, n)));
    ops.extend((0..BACKREFS).step_by(10).map(|n| op(Action::AddRef, n)));
    run(&e, &mut model, &ops, "allocation");
    check(&e, &model, "allocation");
    for round in 0..3u64 {
        let mut ops = Vec::new();
        for j in 0..8 {
            // New backrefs, drops to zero (of counts 1 and 2), recounts
            // up and down, spread over the whole list.
            let n = round * 8 + j;
            ops.push(op(Action::AddRef, BACKREFS + n));
            ops.push(op(Action::DropRef, n * 997 + 1));
            ops.push(op(Action::DropRef, n * 1_990));
            ops.push(op(Action::DropRef, n * 1_990));
            ops.push(op(Action::AddRef, n * 1_013 + 3));
            ops.push(op(Action::DropRef, n * 2_010 + 20));
        }
        run(&e, &mut model, &ops, &format!("round {round}"));
        check(&e, &model, &format!("round {round}"));
    }
    drop(e);
    let (e, _) = DurableEngine::open(Arc::clone(&dev), options()).unwrap();
    check(&e, &model, "reopened");
    let item = e.cached_extents().get(bytenr).unwrap().clone();
    assert!(item.keyed.len() > 45_000, "most backrefs are keyed");
    let mut ops = Vec::new();
    for (k, count) in item.backrefs() {
        let n = match k {
            RefKey::SharedData { parent } => (parent >> 12) - 1,
            RefKey::ExtentData { root, .. } => root - 256,
            other => panic!("a tree backref {other} on a data extent"),
        };
        assert_eq!(key(n), k);
        ops.extend((0..count).map(|_| op(Action::DropRef, n)));
    }
    run(&e, &mut model, &ops, "full free");
    check(&e, &model, "full free");
    assert!(e.cached_extents().get(bytenr).is_none());
}
