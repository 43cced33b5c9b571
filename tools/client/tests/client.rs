//! The client against the in-process fake daemon (`common`): HELLO and
//! limits, pipelining, out-of-order replies, reconnect and resend with
//! exactly-once application, coalescing, INVALID_OP in a coalesced batch,
//! timeouts, protocol violations, and every typed request.

mod common;

use std::time::{Duration, Instant};

use common::{test_config, Fake, FakeConfig, Garbage, POISON_ROOT};
use refd_client::*;

/// A distinct data ref per (thread, i): each must end with refcount 1.
fn op(thread: u64, i: u64) -> WireOp {
    let bytenr = (thread << 32) | (i << 12) | 0x1000_0000_0000;
    WireOp::data_ref(ACTION_ADD_REF, bytenr, 4096, 5, 257 + thread, i * 4096)
}

fn poisoned(thread: u64, i: u64) -> WireOp {
    WireOp {
        k1: POISON_ROOT,
        ..op(thread, i)
    }
}

/// Every op of `threads × per_thread` (skipping `skip`) applied exactly once.
fn assert_applied_once(
    fake: &Fake,
    threads: u64,
    per_thread: u64,
    skip: impl Fn(u64, u64) -> bool,
) {
    let world = fake.world();
    for t in 0..threads {
        for i in 0..per_thread {
            let want = if skip(t, i) { 0 } else { 1 };
            let got = world.refs.get(&op(t, i).bytenr).copied().unwrap_or(0);
            assert_eq!(got, want, "thread {t} op {i}");
        }
    }
}

/// Waits until the fake has applied `ops` ops (it applies a SUBMIT when
/// its connection thread reads it), at most 30 s; then exactly that many.
fn wait_applied(fake: &Fake, ops: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.counters().ops_applied < ops && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fake.counters().ops_applied, ops);
}

fn connect(fake: &Fake) -> Client {
    Client::connect(&fake.addr, test_config()).unwrap()
}

#[test]
fn hello_exposes_the_limits_over_unix_and_tcp() {
    for tcp in [false, true] {
        let fake = Fake::start(FakeConfig {
            tcp,
            in_flight_max: 32,
            session_replies_kept: 16,
            ..FakeConfig::default()
        });
        let client = connect(&fake);
        let h = client.hello();
        assert_eq!(h.version, 1);
        assert_eq!(h.in_flight_max, 32);
        assert_eq!(h.session_replies_kept, 16);
        assert_eq!(h.submit_ops_max, 18724);
        assert_eq!(h.body_bytes_max, 1 << 20);
        assert_eq!(h.server_id, fake.server_id());
        assert_eq!(&h.fs_id, b"refd-fake-device");
        assert!(client.ping().is_ok());
        assert_eq!(client.session_id(), None);
    }
}

#[test]
fn connect_errors_are_typed() {
    assert!(matches!(
        Client::connect("tcp:nohost", test_config()),
        Err(Error::Address { .. })
    ));
    let mut config = test_config();
    config.connect_timeout = Duration::from_millis(100);
    let started = Instant::now();
    let missing = std::env::temp_dir().join("refd-client-test-no-such-dir/refd.sock");
    let e = Client::connect(&format!("unix:{}", missing.display()), config).unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let fake = Fake::start(FakeConfig {
        token: b"secret".to_vec(),
        ..FakeConfig::default()
    });
    let e = Client::connect(&fake.addr, test_config()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AuthFailed));
    let mut config = test_config();
    config.token = b"secret".to_vec();
    assert!(Client::connect(&fake.addr, config).is_ok());
}

#[test]
fn pipelining_keeps_many_requests_in_flight_within_the_limit() {
    let fake = Fake::start(FakeConfig {
        in_flight_max: 16,
        ..FakeConfig::default()
    });
    fake.faults().reply_delay = Duration::from_millis(10);
    let client = connect(&fake);
    std::thread::scope(|s| {
        for t in 0..32u64 {
            let client = &client;
            s.spawn(move || {
                for i in 0..10 {
                    let e = client.lookup(&[op(t, i).bytenr]).unwrap();
                    assert_eq!(e[0].bytenr, op(t, i).bytenr);
                }
            });
        }
    });
    let wire = fake.wire();
    assert!(wire.max_outstanding >= 8, "{wire:?}");
    assert!(wire.max_outstanding <= 16, "{wire:?}");
    assert_eq!(client.connections(), 1);
}

#[test]
fn replies_out_of_order_reach_their_callers() {
    let fake = Fake::start(FakeConfig::default());
    fake.faults().jitter = Duration::from_millis(15);
    let client = connect(&fake);
    client.register().unwrap();
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let client = &client;
            s.spawn(move || {
                for i in 0..15 {
                    let r = client
                        .submit(&[op(t, i)], SubmitOptions::default())
                        .unwrap();
                    assert_eq!(r.op_count, 1);
                    let e = client.lookup(&[op(t, i).bytenr]).unwrap();
                    assert_eq!((e[0].bytenr, e[0].refs), (op(t, i).bytenr, 1));
                }
            });
        }
    });
    assert!(fake.wire().out_of_order > 0, "{:?}", fake.wire());
    assert_applied_once(&fake, 16, 15, |_, _| false);
}

#[test]
fn dropped_connections_resend_and_apply_every_op_exactly_once() {
    let fake = Fake::start(FakeConfig::default());
    fake.faults().drop_every_submit = 7;
    fake.faults().jitter = Duration::from_millis(2);
    let client = connect(&fake);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let client = &client;
            s.spawn(move || {
                for i in 0..40 {
                    let ops = [op(t, 2 * i), op(t, 2 * i + 1)];
                    let r = client.submit(&ops, SubmitOptions::default()).unwrap();
                    assert_eq!(r.op_count, 2);
                }
            });
        }
    });
    let c = fake.counters();
    assert_eq!(c.ops_applied, 8 * 80);
    assert!(c.duplicates > 0, "{c:?}");
    assert_eq!(c.too_old, 0);
    assert_eq!(c.window_violations, 0);
    assert!(client.connections() > 10);
    assert_applied_once(&fake, 8, 80, |_, _| false);
}

#[test]
fn daemon_restarts_mid_load_lose_nothing_and_apply_nothing_twice() {
    let fake = Fake::start(FakeConfig::default());
    fake.faults().submit_delay = Duration::from_millis(1);
    let client = connect(&fake);
    let first_server = client.hello().server_id;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..100 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
                fake.restart();
            }
        });
        let workers: Vec<_> = (0..8u64)
            .map(|t| {
                let client = &client;
                s.spawn(move || {
                    for i in 0..50 {
                        client.add(op(t, i)).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(fake.counters().ops_applied, 8 * 50);
    assert_applied_once(&fake, 8, 50, |_, _| false);
    client.ping().unwrap();
    assert_ne!(client.hello().server_id, first_server);
    assert_eq!(client.hello().server_id, fake.server_id());
}

#[test]
fn sixty_four_threads_adding_one_op_each_are_coalesced() {
    let fake = Fake::start(FakeConfig::default());
    fake.faults().submit_delay = Duration::from_millis(3);
    let client = connect(&fake);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..64u64 {
            let client = &client;
            s.spawn(move || {
                for i in 0..40 {
                    let r = client.submit_one(op(t, i)).unwrap();
                    assert!(r.op_count >= 1);
                    assert_eq!(r.flags & SUBMIT_REPLY_DURABLE, SUBMIT_REPLY_DURABLE);
                }
            });
        }
    });
    let c = fake.counters();
    let ops = 64 * 40;
    assert_eq!(c.ops_applied, ops);
    // 64 callers over 4 batches in flight: about 16 ops per SUBMIT.
    assert!(c.batches_applied * 6 < ops, "{c:?}: batches not coalesced");
    assert_applied_once(&fake, 64, 40, |_, _| false);
    println!(
        "{ops} ops in {} SUBMITs, {:.2?}",
        c.batches_applied,
        started.elapsed()
    );
}

/// Callers whose deadlines pass while their ops wait in the queue, while
/// their batch is out, and while it is being answered: each outcome is
/// true (an `Ok` op applied once, a `NotApplied` one not at all), and the
/// batcher is left consistent (a caller asked to lead that gave up passed
/// it on: the next adds all go through).
#[test]
fn callers_timing_out_around_their_answers_get_true_outcomes() {
    let fake = Fake::start(FakeConfig::default());
    let mut config = test_config();
    config.request_timeout = Duration::from_millis(150);
    config.batches_in_flight_max = 1;
    let client = Client::connect(&fake.addr, config).unwrap();
    client.register().unwrap();
    {
        let mut f = fake.faults();
        f.submit_delay = Duration::from_millis(100);
        f.jitter = Duration::from_millis(100);
    }
    let (threads, per_thread) = (32u64, 6u64);
    // Replies take 100-200 ms against a 150 ms timeout, so both answered
    // and timed-out adds are expected; on a loaded machine one round can
    // still end with only one of them, so rounds (new ops each) run until
    // both were met, at most ROUNDS_MAX. Every outcome of every round is
    // checked.
    const ROUNDS_MAX: u64 = 5;
    let (mut ok, mut not_applied, mut unknown) = (0, 0, 0);
    let mut round = 0;
    while round < ROUNDS_MAX && (ok == 0 || unknown == 0) {
        let first = round * per_thread;
        round += 1;
        let started = Instant::now();
        let outcomes: Vec<Vec<Option<Outcome>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let client = &client;
                    s.spawn(move || {
                        let add = |i| client.add(op(t, i)).err().map(|e| e.outcome());
                        (first..first + per_thread).map(add).collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        // Every add ends by its deadline (plus the leader's round, and
        // the scheduling of 32 threads).
        assert!(started.elapsed() < Duration::from_secs(20));
        // Batches given up on by their callers are still answered by the
        // fake; wait until none is out.
        std::thread::sleep(Duration::from_millis(500));
        let world = fake.world();
        for (t, ops) in outcomes.iter().enumerate() {
            for (k, outcome) in ops.iter().enumerate() {
                let i = first + k as u64;
                let got = world.refs.get(&op(t as u64, i).bytenr).copied();
                let got = got.unwrap_or(0);
                match outcome {
                    None => (ok += 1, assert_eq!(got, 1, "op ({t}, {i}) acked")),
                    Some(Outcome::NotApplied) => (not_applied += 1, assert_eq!(got, 0)),
                    Some(_) => (unknown += 1, assert!(got == 0 || got == 1)),
                };
            }
        }
    }
    println!("{round} round(s): ok {ok}, not applied {not_applied}, unknown {unknown}");
    // (A queued op times out only when its leader is slow to run, so
    // `NotApplied` is not required.)
    assert!(ok > 0 && unknown > 0, "answered and timed out both met");
    let after = ROUNDS_MAX * per_thread;
    {
        let mut f = fake.faults();
        f.submit_delay = Duration::ZERO;
        f.jitter = Duration::ZERO;
    }
    // With no delay every add goes through: a batcher left wedged would
    // fail them all. (Each thread may try 3 new ops: on a loaded machine
    // one add can still miss the 150 ms timeout.)
    let acked: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let client = &client;
                s.spawn(move || {
                    (after..after + 3)
                        .find(|&i| client.add(op(t, i)).is_ok())
                        .unwrap_or_else(|| panic!("thread {t}: no add went through"))
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let world = fake.world();
    for (t, i) in acked.into_iter().enumerate() {
        assert_eq!(world.refs.get(&op(t as u64, i).bytenr), Some(&1));
    }
}

#[test]
fn invalid_op_in_a_coalesced_batch_goes_to_its_caller_only() {
    let fake = Fake::start(FakeConfig::default());
    fake.faults().submit_delay = Duration::from_millis(3);
    let client = connect(&fake);
    let bad = |t: u64, i: u64| (t * 31 + i) % 9 == 4;
    std::thread::scope(|s| {
        for t in 0..64u64 {
            let client = &client;
            s.spawn(move || {
                for i in 0..20 {
                    if bad(t, i) {
                        let e = client.add(poisoned(t, i)).unwrap_err();
                        let body = e.server_error().expect("a server error");
                        assert_eq!(body.code, ErrorCode::InvalidOp);
                        assert_eq!(body.op_error(), Some(OpErrorCode::MissingRoot));
                        assert_eq!(body.index, 0);
                        assert_eq!(body.detail, op(t, i).bytenr);
                        assert_eq!(e.outcome(), Outcome::NotApplied);
                    } else {
                        client.add(op(t, i)).unwrap();
                    }
                }
            });
        }
    });
    let c = fake.counters();
    let bad_ops = (0..64)
        .flat_map(|t| (0..20).map(move |i| (t, i)))
        .filter(|&(t, i)| bad(t, i));
    let bad_ops = bad_ops.count() as u64;
    assert_eq!(c.ops_applied, 64 * 20 - bad_ops);
    assert!(c.invalid >= bad_ops);
    assert!(
        c.invalid_batch_ops_max > 1,
        "{c:?}: no INVALID_OP in a coalesced batch"
    );
    assert_applied_once(&fake, 64, 20, bad);
}

#[test]
fn a_timeout_reports_an_unknown_outcome_and_resubmit_is_exactly_once() {
    let fake = Fake::start(FakeConfig::default());
    let mut config = test_config();
    config.request_timeout = Duration::from_millis(200);
    let client = Client::connect(&fake.addr, config).unwrap();
    client.register().unwrap();
    fake.faults().submit_delay = Duration::from_millis(800);
    let ops = [op(1, 1)];
    let e = client.submit(&ops, SubmitOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert_eq!(e.outcome(), Outcome::Unknown);
    let Error::Timeout {
        submit: Some(ticket),
        ..
    } = e
    else {
        panic!("no ticket in {e:?}");
    };
    assert_eq!(ticket.session_id, client.session_id().unwrap());
    // The fake applies a SUBMIT when it reads it and holds only the
    // reply; the reply comes too late for the caller. (Its connection
    // thread may read the SUBMIT after the 200 ms timeout on a loaded
    // machine: wait for it, bounded.)
    wait_applied(&fake, 1);
    fake.faults().submit_delay = Duration::ZERO;
    let r = client
        .resubmit(ticket, &ops, SubmitOptions::default())
        .unwrap();
    assert_eq!(r.request_number, ticket.request_number);
    assert_ne!(r.flags & SUBMIT_REPLY_DUPLICATE, 0);
    assert_eq!(fake.counters().ops_applied, 1);
    // The window moved on: new SUBMITs work.
    client
        .submit(&[op(1, 2)], SubmitOptions::default())
        .unwrap();
    // An add that times out while still queued was never sent.
    fake.faults().submit_delay = Duration::from_millis(800);
    std::thread::scope(|s| {
        let outcomes: Vec<_> = (0..6)
            .map(|i| {
                let client = &client;
                s.spawn(move || client.add(op(2, i)).unwrap_err().outcome())
            })
            .collect();
        for o in outcomes {
            assert!(matches!(
                o.join().unwrap(),
                Outcome::Unknown | Outcome::NotApplied
            ));
        }
    });
}

#[test]
fn protocol_violations_are_typed_errors_and_the_client_recovers() {
    let fake = Fake::start(FakeConfig::default());
    let client = connect(&fake);
    for (garbage, check) in [
        (
            Garbage::Oversized,
            (|v: &ProtocolViolation| {
                matches!(
                    v,
                    ProtocolViolation::Frame(refd_proto::FrameError::TooLarge { .. })
                )
            }) as fn(&ProtocolViolation) -> bool,
        ),
        (Garbage::RandomBytes, |v| {
            matches!(v, ProtocolViolation::Frame(_))
        }),
        (Garbage::UnknownId, |v| {
            matches!(v, ProtocolViolation::UnknownRequestId { .. })
        }),
    ] {
        fake.faults().garbage = Some(garbage);
        match client.ping() {
            Err(Error::Protocol { violation, .. }) => assert!(check(&violation), "{violation}"),
            other => panic!("{garbage:?}: {other:?}"),
        }
        // The next request opens a new connection.
        client.ping().unwrap();
    }
    assert_eq!(client.connections(), 4);
}

#[test]
fn the_session_window_bounds_unanswered_submits() {
    let fake = Fake::start(FakeConfig {
        session_replies_kept: 4,
        ..FakeConfig::default()
    });
    fake.faults().jitter = Duration::from_millis(6);
    let client = connect(&fake);
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let client = &client;
            s.spawn(move || {
                for i in 0..8 {
                    client
                        .submit(&[op(t, i)], SubmitOptions::default())
                        .unwrap();
                }
            });
        }
    });
    let c = fake.counters();
    assert_eq!(c.ops_applied, 16 * 8);
    assert_eq!(c.window_violations, 0, "{c:?}");
    assert!(fake.wire().max_outstanding <= 4);
}

#[test]
fn an_evicted_session_is_replaced_when_nothing_was_applied() {
    let fake = Fake::start(FakeConfig::default());
    let client = connect(&fake);
    let first = client.register().unwrap();
    client
        .submit(&[op(0, 0)], SubmitOptions::default())
        .unwrap();
    fake.world().evict(first);
    let r = client
        .submit(&[op(0, 1)], SubmitOptions::default())
        .unwrap();
    assert_eq!(r.request_number, 1);
    assert_ne!(client.session_id(), Some(first));
    assert_applied_once(&fake, 1, 2, |_, _| false);
    // A barrier needs a live session too.
    fake.world().evict(client.session_id().unwrap());
    let e = client.barrier_acquire().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SessionEvicted));
}

#[test]
fn a_daemon_that_stays_down_ends_in_a_connect_error() {
    let fake = Fake::start(FakeConfig::default());
    let mut config = test_config();
    config.reconnect_timeout = Duration::from_millis(300);
    let client = Client::connect(&fake.addr, config).unwrap();
    client.register().unwrap();
    fake.faults().refuse_connections = true;
    fake.drop_connections();
    let started = Instant::now();
    let e = client
        .submit(&[op(0, 0)], SubmitOptions::default())
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    fake.faults().refuse_connections = false;
    client
        .submit(&[op(0, 0)], SubmitOptions::default())
        .unwrap();
    assert_eq!(fake.counters().ops_applied, 1);
}

#[test]
fn every_typed_request() {
    let fake = Fake::start(FakeConfig::default());
    let client = connect(&fake);
    let session = client.register().unwrap();
    assert_eq!(client.session_id(), Some(session));
    // An explicit batch with options, and the limits.
    let options = SubmitOptions {
        no_wait: true,
        stamp_seq: true,
    };
    assert_eq!(options.flags(), 3);
    let r = client.submit(&[op(0, 0), op(0, 1)], options).unwrap();
    assert_eq!((r.op_count, r.request_number), (2, 1));
    assert_eq!(client.next_request_number(), Some(2));
    let e = client.submit(&[], SubmitOptions::default()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
    // One extent with more backrefs than a page holds.
    let bytenr = 0x7700_0000;
    let refs: Vec<WireOp> = (0..16384 + 100)
        .map(|root| WireOp::data_ref(ACTION_ADD_REF, bytenr, 4096, root + 1, 257, 0))
        .collect();
    client.submit(&refs, SubmitOptions::default()).unwrap();
    let all = client.backrefs(bytenr).unwrap();
    assert_eq!(all.entries.len(), refs.len());
    assert_eq!(all.refs, refs.len() as i64);
    assert!(all.entries.windows(2).all(|w| w[0].key() < w[1].key()));
    let page = client.backrefs_page(bytenr, None, 10).unwrap();
    assert!(page.more && page.entries.len() == 10);
    // LOOKUP splits above 16384 bytenrs.
    let many: Vec<u64> = (0..20_000).map(|i| op(0, i % 2).bytenr).collect();
    let counts = client.lookup(&many).unwrap();
    assert_eq!(counts.len(), 20_000);
    assert!(counts.iter().all(|e| e.refs == 1));
    assert!(client.lookup(&[]).unwrap().is_empty());
    // Barriers.
    let b = client.barrier_acquire().unwrap();
    assert_eq!(client.barrier_renew(b.barrier_id).unwrap(), 30_000);
    client.barrier_release(b.barrier_id).unwrap();
    let e = client.barrier_release(b.barrier_id).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BarrierUnknown));
    // Drop one ref to zero, commit, read it back as freed.
    let drop_op = WireOp {
        action: ACTION_DROP_REF,
        ..op(0, 0)
    };
    client.submit(&[drop_op], SubmitOptions::default()).unwrap();
    let commit = client.commit().unwrap();
    assert!(commit.freed >= 1);
    let consumer = client.freed_subscribe("space-map").unwrap();
    assert_eq!(consumer.acked_generation, 0);
    let page = client.freed(FreedCursor::after_ack(0), 16384).unwrap();
    assert!(page.extents.iter().any(|e| e.bytenr == op(0, 0).bytenr));
    assert!(!page.more);
    assert_eq!(FreedCursor::next(&page).generation, commit.generation + 1);
    let acked = client
        .freed_ack(consumer.consumer_id, commit.generation)
        .unwrap();
    assert_eq!(acked, commit.generation);
    assert_eq!(client.freed_ack(consumer.consumer_id, 1).unwrap(), acked);
    assert!(client.freed(FreedCursor::default(), 0).is_err());
    assert!(client.stats().unwrap().contains("ops_applied"));
    assert!(client.ping().unwrap() < Duration::from_secs(5));
}

/// FREED_UNSUBSCRIBE through the client: a removal returns the consumer's
/// acknowledged generation; when the reply is lost (the daemon applied it
/// and the connection closed) the client resends, the resend is answered
/// `CONSUMER_UNKNOWN`, and the client reports the removal as done
/// (`Ok(None)`) since ids are never reused; a first send for an unknown
/// id is an error.
#[test]
fn unsubscribe_survives_a_lost_reply() {
    let fake = Fake::start(FakeConfig::default());
    let client = connect(&fake);
    let a = client.freed_subscribe("space-map").unwrap();
    let b = client.freed_subscribe("backup").unwrap();
    assert_ne!(a.consumer_id, b.consumer_id);
    assert_eq!(client.freed_unsubscribe(a.consumer_id).unwrap(), Some(0));
    fake.faults().lose_reply_of = Some(refd_proto::Opcode::FreedUnsubscribe.as_u8());
    assert_eq!(client.freed_unsubscribe(b.consumer_id).unwrap(), None);
    assert!(fake.faults().lose_reply_of.is_none(), "the reply was lost");
    let e = client.freed_unsubscribe(b.consumer_id).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::ConsumerUnknown));
    // The name subscribes again as a new consumer.
    let again = client.freed_subscribe("space-map").unwrap();
    assert!(again.consumer_id > b.consumer_id);
}

#[test]
fn a_recorded_submit_is_resent_exactly_once_after_a_client_crash() {
    let fake = Fake::start(FakeConfig::default());
    let ops = [op(3, 1), op(3, 2)];
    let mut recorded = None;
    {
        let mut config = test_config();
        config.request_timeout = Duration::from_millis(150);
        let crashed = Client::connect(&fake.addr, config).unwrap();
        // The reply never arrives in time: the process "crashes".
        fake.faults().submit_delay = Duration::from_millis(600);
        let e = crashed
            .submit_recorded(&ops, SubmitOptions::default(), |ticket| {
                recorded = Some(ticket);
                Ok(())
            })
            .unwrap_err();
        assert_eq!(e.outcome(), Outcome::Unknown);
        // A failing record sends nothing.
        let e = crashed
            .submit_recorded(&ops, SubmitOptions::default(), |_| {
                Err(std::io::Error::other("disk full"))
            })
            .unwrap_err();
        assert!(matches!(e, Error::Record { .. }));
    }
    // The crashed client's SUBMIT reached the daemon: the fake applies it
    // when its connection thread reads it, which on a loaded machine can
    // be after the new connection's resend (then the resend would be
    // the first copy, not the duplicate this test is about).
    wait_applied(&fake, 2);
    fake.faults().submit_delay = Duration::ZERO;
    let ticket = recorded.expect("the ticket was recorded before sending");
    let restarted = connect(&fake);
    restarted.resume_session(ticket.session_id, ticket.request_number + 2);
    let r = restarted
        .resubmit(ticket, &ops, SubmitOptions::default())
        .unwrap();
    assert_ne!(r.flags & SUBMIT_REPLY_DUPLICATE, 0);
    let next = restarted
        .submit(&[op(3, 3)], SubmitOptions::default())
        .unwrap();
    assert_eq!(next.request_number, ticket.request_number + 2);
    assert_eq!(fake.counters().ops_applied, 3);
    assert_eq!(fake.counters().sessions, 1);
}
