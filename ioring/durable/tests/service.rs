//! The daemon's durable state on the simulated device: SUBMIT batches are
//! exactly once and all or nothing across power losses, sessions and
//! consumers survive through commits and through log replay alike (their
//! removal too), and freed lists are kept, paged, acknowledged and
//! bounded.

use std::sync::Arc;

use refd_core::delayed::mutex::MutexStore;
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_core::run::RunError;
use refd_durable::service::CONSUMERS_MAX;
use refd_durable::{
    DurableEngine, OpenOptions, ServiceError, ServiceOptions, SessionError, SubmitError, Submitted,
};
use refd_ioring::{LogConfig, SimStorage};

mod common;

type Dev = Arc<SimStorage>;

fn device() -> Dev {
    common::formatted(16 << 20, 4 << 20, 5)
}

fn options(service: ServiceOptions) -> OpenOptions {
    OpenOptions {
        log: LogConfig {
            batch_bytes_max: 256 << 10,
            ..LogConfig::default()
        },
        service,
        ..OpenOptions::default()
    }
}

fn open(dev: &Dev, service: ServiceOptions) -> DurableEngine<Dev> {
    DurableEngine::open(Arc::clone(dev), options(service))
        .unwrap()
        .0
}

fn data(action: Action, bytenr: u64, objectid: u64) -> Op {
    let key = RefKey::ExtentData {
        root: 5,
        objectid,
        offset: 0,
    };
    Op::new(bytenr, 4096, ExtentKind::Data, action, key, 0).unwrap()
}

/// Allocates the data extents `range` (4 KiB apart from 1 GiB), commits,
/// drops them and commits again: the generation whose freed list holds
/// them.
fn allocate_and_free(e: &DurableEngine<Dev>, range: std::ops::Range<u64>) -> u64 {
    let at = |i: u64| (1 << 30) + i * 4096;
    for i in range.clone() {
        e.add(&data(Action::AddExtent, at(i), 1)).unwrap();
    }
    e.commit().unwrap();
    for i in range {
        e.add(&data(Action::DropRef, at(i), 1)).unwrap();
    }
    e.commit().unwrap().generation
}

fn refs(e: &DurableEngine<Dev>, bytenr: u64) -> i64 {
    e.lookup_extent_ref(bytenr).unwrap().refs
}

fn queued(s: Submitted<Dev>) -> u64 {
    match s {
        Submitted::Queued { ticket, .. } => ticket.wait().unwrap().get(),
        Submitted::Duplicate { .. } => panic!("not a duplicate"),
    }
}

/// A retried SUBMIT is never applied twice: not before a commit, not after
/// one, not after a power loss with or without a commit in between.
#[test]
fn a_retried_submit_is_applied_once() {
    let dev = device();
    let e = open(&dev, ServiceOptions::default());
    let (s, t) = e.register_session().unwrap();
    t.wait().unwrap();
    let alloc = [data(Action::AddExtent, 1 << 20, 1)];
    let lsn1 = queued(e.submit(s, 1, &alloc).unwrap());
    let batch2: Vec<Op> = (2..10).map(|o| data(Action::AddRef, 1 << 20, o)).collect();
    let lsn2 = queued(e.submit(s, 2, &batch2).unwrap());
    let dup = |e: &DurableEngine<Dev>, r: u64, ops: &[Op], lsn: u64| match e.submit(s, r, ops) {
        Ok(Submitted::Duplicate { lsn: l, ops: n }) => {
            assert_eq!((l.get(), n as usize), (lsn, ops.len()))
        }
        other => panic!("request {r}: {other:?}"),
    };
    dup(&e, 2, &batch2, lsn2);
    assert_eq!(refs(&e, 1 << 20), 9);
    // Replayed from the log only.
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let e = open(&crashed, ServiceOptions::default());
    dup(&e, 1, &alloc, lsn1);
    dup(&e, 2, &batch2, lsn2);
    assert_eq!(refs(&e, 1 << 20), 9);
    // Kept by a commit, the log trimmed.
    e.commit().unwrap();
    assert_eq!(e.log().used_bytes(), 0);
    let crashed: Dev = Arc::new(crashed.crash());
    drop(e);
    let e = open(&crashed, ServiceOptions::default());
    dup(&e, 2, &batch2, lsn2);
    assert_eq!(refs(&e, 1 << 20), 9);
    // New request numbers apply; unknown sessions are refused.
    queued(
        e.submit(s, 3, &[data(Action::DropRef, 1 << 20, 9)])
            .unwrap(),
    );
    assert_eq!(refs(&e, 1 << 20), 8);
    assert!(matches!(
        e.submit(s + 1, 1, &alloc),
        Err(SubmitError::Session(SessionError::Unknown { .. }))
    ));
    e.commit().unwrap();
    e.verify().unwrap();
}

/// An invalid op refuses the whole batch: nothing is applied or logged,
/// and the request number stays unused.
#[test]
fn a_refused_batch_applies_nothing() {
    let dev = device();
    let mut o = options(ServiceOptions::default());
    o.verify = true;
    let e = DurableEngine::open(Arc::clone(&dev), o).unwrap().0;
    let (s, t) = e.register_session().unwrap();
    t.wait().unwrap();
    queued(
        e.submit(s, 1, &[data(Action::AddExtent, 1 << 20, 1)])
            .unwrap(),
    );
    let used = e.log().used_bytes();
    let bad = [
        data(Action::AddRef, 1 << 20, 2),
        data(Action::AddRef, 1 << 20, 3),
        data(Action::DropRef, 1 << 20, 77), // no such backref
    ];
    match e.submit(s, 2, &bad) {
        Err(SubmitError::Refused { index: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(refs(&e, 1 << 20), 1, "nothing of the batch applied");
    assert_eq!(e.log().used_bytes(), used, "nothing logged");
    // The same request number with a valid batch applies now.
    queued(e.submit(s, 2, &bad[..2]).unwrap());
    assert_eq!(refs(&e, 1 << 20), 3);
}

/// A batch lost in a power loss before it was durable is lost whole;
/// retried under the same request number after recovery, it applies once.
#[test]
fn an_unacknowledged_batch_is_all_or_nothing() {
    let dev = device();
    let e = open(&dev, ServiceOptions::default());
    let (s, t) = e.register_session().unwrap();
    t.wait().unwrap();
    queued(
        e.submit(s, 1, &[data(Action::AddExtent, 1 << 20, 1)])
            .unwrap(),
    );
    let batch: Vec<Op> = (2..=2000)
        .map(|o| data(Action::AddRef, 1 << 20, o))
        .collect();
    // Queued, never waited for: the power loss may keep or lose it.
    let _ = e.submit(s, 2, &batch).unwrap();
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let e = open(&crashed, ServiceOptions::default());
    let before = refs(&e, 1 << 20);
    assert!(before == 1 || before == 2000, "all or nothing: {before}");
    match e.submit(s, 2, &batch).unwrap() {
        Submitted::Duplicate { .. } => assert_eq!(before, 2000),
        Submitted::Queued { ticket, .. } => {
            ticket.wait().unwrap();
            assert_eq!(before, 1);
        }
    }
    assert_eq!(refs(&e, 1 << 20), 2000);
}

/// The least recently used session is evicted at the bound, and recovery
/// (replay, or commit + replay) evicts the same one.
#[test]
fn eviction_replays_identically() {
    let dev = device();
    let bound = ServiceOptions {
        sessions_max: 2,
        ..ServiceOptions::default()
    };
    let e = open(&dev, bound);
    let a = e.register_session().unwrap().0;
    let b = e.register_session().unwrap().0;
    queued(
        e.submit(a, 1, &[data(Action::AddExtent, 1 << 20, 1)])
            .unwrap(),
    );
    e.commit().unwrap();
    let c = e.register_session().unwrap().0; // evicts b
    let (_, t) = e.register_session().unwrap(); // evicts a
    t.wait().unwrap();
    let evicted = |e: &DurableEngine<Dev>, s: u64| {
        matches!(
            e.submit(s, 9, &[data(Action::AddRef, 1 << 20, 9)]),
            Err(SubmitError::Session(SessionError::Evicted { .. }))
        )
    };
    assert!(evicted(&e, a) && evicted(&e, b) && !evicted(&e, c));
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let e = open(&crashed, bound);
    assert!(evicted(&e, a) && evicted(&e, b));
    assert_eq!(e.service_stats().sessions, 2);
    assert_eq!(e.service_stats().sessions_registered, 4);
}

/// Freed lists: kept by the commit that freed, paged by cursor, durable,
/// dropped once every consumer acknowledged them, bounded.
#[test]
fn freed_lists_are_durable_and_bounded() {
    let dev = device();
    let bound = ServiceOptions {
        freed_kept_max: 700,
        ..ServiceOptions::default()
    };
    let e = open(&dev, bound);
    let (consumer, t) = e.subscribe_freed("space-map").unwrap();
    t.unwrap().wait().unwrap();
    assert_eq!(consumer.acked, 0);
    let at = |i: u64| (1 << 30) + i * 4096;
    let g1 = allocate_and_free(&e, 0..600);
    // Page through it.
    let mut cursor = (consumer.acked + 1, 0u32);
    let mut seen = Vec::new();
    loop {
        let page = e.read_freed(cursor.0, cursor.1, 250).unwrap();
        seen.extend(page.extents.iter().map(|(g, x)| (*g, x.bytenr)));
        cursor = page.next;
        if !page.more {
            break;
        }
    }
    assert_eq!(seen.len(), 600);
    assert!(seen.iter().all(|&(g, _)| g == g1));
    // Survives a power loss.
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let e = open(&crashed, bound);
    assert_eq!(e.read_freed(g1, 599, 10).unwrap().extents.len(), 1);
    let c = e.subscribe_freed("space-map").unwrap();
    assert_eq!(
        (c.0.id, c.1.is_none()),
        (consumer.id, true),
        "found by name"
    );
    // 600 more freed would pass the bound of 700: the oldest list goes,
    // and a consumer behind it is told.
    let g2 = allocate_and_free(&e, 600..1200);
    assert!(matches!(
        e.read_freed(g1, 0, 10),
        Err(ServiceError::FreedExpired { .. })
    ));
    assert_eq!(e.read_freed(g2, 0, 1000).unwrap().extents.len(), 600);
    // Acknowledged: dropped by the next commit.
    let (acked, t) = e.ack_freed(consumer.id, g2).unwrap();
    t.unwrap().wait().unwrap();
    assert_eq!(acked, g2);
    e.add_durable(&data(Action::AddExtent, at(5000), 1))
        .unwrap();
    e.commit().unwrap();
    assert_eq!(e.service_stats().freed_extents, 0);
    assert!(matches!(
        e.ack_freed(consumer.id + 1, 1),
        Err(ServiceError::ConsumerUnknown { .. })
    ));
    assert!(matches!(
        e.ack_freed(consumer.id, e.superblock().generation + 1),
        Err(ServiceError::AckBeyondCommitted { .. })
    ));
    e.verify().unwrap();
}

/// A consumer that never acknowledges (a decommissioned storage system)
/// holds every list back; unsubscribing it lets the next commit drop what
/// the remaining consumers acknowledged, exactly as an ACK would. The
/// removal is durable from the log (power loss before any commit) and
/// from the tree (power loss after one), a retry is `ConsumerUnknown`,
/// and the name subscribes again as a new consumer.
#[test]
fn an_unsubscribed_consumer_no_longer_holds_lists() {
    let dev = device();
    let e = open(&dev, ServiceOptions::default());
    let (live, t) = e.subscribe_freed("live").unwrap();
    t.unwrap().wait().unwrap();
    let (dead, t) = e.subscribe_freed("dead").unwrap();
    t.unwrap().wait().unwrap();
    let g = allocate_and_free(&e, 0..10);
    e.ack_freed(live.id, g).unwrap().1.unwrap().wait().unwrap();
    e.commit().unwrap();
    e.commit().unwrap();
    assert_eq!(e.service_stats().freed_extents, 10, "the dead one holds it");
    let (removed, t) = e.unsubscribe_freed(dead.id).unwrap();
    t.wait().unwrap();
    assert_eq!((removed.id, removed.name.as_str()), (dead.id, "dead"));
    let ids = |e: &DurableEngine<Dev>| -> Vec<u64> {
        e.service_stats().consumers.iter().map(|c| c.id).collect()
    };
    // A power loss before any commit: replayed from the log.
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let e = open(&crashed, ServiceOptions::default());
    assert_eq!(ids(&e), vec![live.id]);
    assert_eq!(e.service_stats().freed_extents, 10, "kept until a commit");
    assert!(matches!(
        e.unsubscribe_freed(dead.id),
        Err(ServiceError::ConsumerUnknown { consumer }) if consumer == dead.id
    ));
    assert!(matches!(
        e.ack_freed(dead.id, g),
        Err(ServiceError::ConsumerUnknown { .. })
    ));
    e.commit().unwrap();
    assert_eq!(
        e.service_stats().freed_extents,
        0,
        "dropped as an ACK would"
    );
    // A power loss after the commit that deleted its item.
    let crashed: Dev = Arc::new(crashed.crash());
    drop(e);
    let e = open(&crashed, ServiceOptions::default());
    assert_eq!(ids(&e), vec![live.id]);
    // The name again: a new consumer, starting like any new one.
    let (again, t) = e.subscribe_freed("dead").unwrap();
    t.expect("a new consumer is logged").wait().unwrap();
    assert!(again.id > dead.id, "ids are never reused");
    assert_eq!(again.acked, g, "starts after the newest dropped list");
    assert_eq!(ids(&e), vec![live.id, again.id]);
    e.commit().unwrap();
    e.verify().unwrap();
}

/// An unsubscribed consumer's slot counts no longer: with
/// `CONSUMERS_MAX` subscribed a new name is refused until one is removed.
#[test]
fn unsubscribing_frees_a_consumer_slot() {
    let dev = device();
    let e = open(&dev, ServiceOptions::default());
    let mut last = None;
    for i in 0..CONSUMERS_MAX {
        last = e.subscribe_freed(&format!("c{i}")).unwrap().1;
    }
    last.unwrap().wait().unwrap();
    assert!(matches!(
        e.subscribe_freed("one-more"),
        Err(ServiceError::ConsumersFull { max: CONSUMERS_MAX })
    ));
    let c5 = e.subscribe_freed("c5").unwrap().0;
    e.unsubscribe_freed(c5.id).unwrap().1.wait().unwrap();
    let (c, t) = e.subscribe_freed("one-more").unwrap();
    t.unwrap().wait().unwrap();
    assert_eq!(c.id, CONSUMERS_MAX as u64 + 1);
    // Through a commit and a power loss, still full at the bound.
    e.commit().unwrap();
    let crashed: Dev = Arc::new(dev.crash());
    drop(e);
    let e = open(&crashed, ServiceOptions::default());
    assert_eq!(e.service_stats().consumers.len(), CONSUMERS_MAX);
    assert!(matches!(
        e.subscribe_freed("c5"),
        Err(ServiceError::ConsumersFull { .. })
    ));
}

/// A cursor below the oldest kept list where no list was dropped starts
/// at that list (`docs/protocol.md`, FREED), generation 0 included: 0 is
/// also what `freed_dropped_upto` holds when nothing was dropped, and it
/// must not read as "generation 0 was dropped".
#[test]
fn a_cursor_before_every_list_starts_at_the_oldest_when_none_was_dropped() {
    let dev = device();
    let e = open(&dev, ServiceOptions::default());
    let g = allocate_and_free(&e, 0..3);
    for cursor in [0, 1, g] {
        let page = e
            .read_freed(cursor, 0, 10)
            .unwrap_or_else(|err| panic!("cursor ({cursor}, 0) with nothing dropped: {err}"));
        assert_eq!(page.extents.len(), 3, "cursor ({cursor}, 0)");
        assert!(page.extents.iter().all(|(gen, _)| *gen == g));
        assert_eq!(page.oldest_kept, g);
    }
}

/// The mutex store serves the same engine.
#[test]
fn the_mutex_store_is_durable_too() {
    let dev = device();
    let e: DurableEngine<Dev, MutexStore> =
        DurableEngine::open_with_store(Arc::clone(&dev), options(ServiceOptions::default()))
            .unwrap()
            .0;
    let (s, _) = e.register_session().unwrap();
    match e
        .submit(s, 1, &[data(Action::AddExtent, 1 << 20, 1)])
        .unwrap()
    {
        Submitted::Queued { ticket, .. } => ticket.wait().unwrap(),
        other => panic!("{other:?}"),
    };
    e.commit().unwrap();
    assert_eq!(e.lookup_extent_ref(1 << 20).unwrap().refs, 1);
}

/// An allocation dropped again in the commit that made it, over two
/// committed extents the cache evicted and the commit does not touch: the
/// range was handed out over live extents, so it is refused (the commit
/// reads the first extent inside its range for the overlap check) and
/// nothing is freed. Before, it was listed around them in FREED, one
/// entry per gap, which its one drop had not reserved space for. (The
/// wire adversarial test's seed 1001 first found a freed list giving a
/// range inside a live extent.)
#[test]
fn an_allocation_dropped_over_evicted_extents_is_refused() {
    let dev = device();
    let small_cache = OpenOptions {
        cache_extents_max: 8,
        ..options(ServiceOptions::default())
    };
    let e: DurableEngine<Dev> = DurableEngine::open(Arc::clone(&dev), small_cache)
        .unwrap()
        .0;
    let base = 1u64 << 30;
    let (a, b) = (base + 4096, base + 8192);
    e.add(&data(Action::AddExtent, a, 1)).unwrap();
    e.add(&data(Action::AddExtent, b, 1)).unwrap();
    // Above them, enough extents that the eviction (lowest bytenrs first)
    // takes them out of the cache.
    for i in 0..32 {
        e.add(&data(Action::AddExtent, (2 << 30) + i * 4096, 1))
            .unwrap();
    }
    e.commit().unwrap();
    assert!(e.cached_extents().get(a).is_none(), "evicted");
    assert!(e.cached_extents().get(b).is_none(), "evicted");
    let key = RefKey::ExtentData {
        root: 5,
        objectid: 2,
        offset: 0,
    };
    for action in [Action::AddExtent, Action::DropRef] {
        e.add(&Op::new(base, 16 << 10, ExtentKind::Data, action, key, 0).unwrap())
            .unwrap();
    }
    let s = e.commit().unwrap();
    assert_eq!(s.core.freed, [], "nothing freed");
    assert_eq!(
        s.core
            .quarantined
            .iter()
            .map(|q| q.error.clone())
            .collect::<Vec<_>>(),
        [RunError::OverlapsExtent {
            bytenr: base,
            num_bytes: 16 << 10,
            other: a,
            other_bytes: 4096
        }]
    );
    let page = e.read_freed(s.generation, 0, 100).unwrap();
    assert_eq!(page.extents.len(), 0, "{page:?}");
    assert_eq!((refs(&e, a), refs(&e, b)), (1, 1));
    e.verify().unwrap();
}
