//! Defects found by attacking a running daemon over the wire (clients
//! written from `docs/protocol.md`), one test each, so that they stay
//! fixed. Each runs the release daemon as a real process on a small file
//! device, over a unix socket or loopback TCP, and takes seconds.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use refd_proto::*;

const MIB: u64 = 1 << 20;

/// Text a client chooses (its HELLO name, a freed-list consumer's name)
/// cannot forge lines in the daemon's log: a name with a newline or a
/// terminal escape is logged escaped, on its own line. Before, the name
/// went into the line as it was (`Display`), so a TCP peer that had not
/// even authenticated wrote whole lines of its choosing (a fake
/// `ERROR ... engine failed`, colours) into the operator's log through
/// the `authentication failed` warning.
#[test]
fn client_text_cannot_forge_log_lines() {
    let Some(t) = Target::new("refd-logforge", 128 * MIB, false) else {
        return;
    };
    let token = t.scratch.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let d = Daemon::start(
        &t,
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let port = tcp_port(&d.ready);
    // An unauthenticated TCP peer: a wrong token, a name that ends the
    // warning's line and starts one of its own.
    let forged_hello = "x\nFORGED-BY-HELLO ERROR engine failed\x1b[31m";
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut f = Vec::new();
    let h = HelloRequest {
        version_min: 1,
        version_max: 1,
        token: b"wrong".to_vec(),
        name: forged_hello.into(),
    };
    encode_request(1, &Request::Hello(h), &mut f);
    s.write_all(&f).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(reply.len() > HEADER_BYTES, "an AUTH_FAILED frame");
    // A consumer's name, logged when it is unsubscribed.
    let (mut c, _) = Raw::hello(&d.socket);
    let name = "c\nFORGED-BY-CONSUMER WARN x";
    let sub = FreedSubscribeRequest::new(name).unwrap();
    let consumer_id = match c.call(&Request::FreedSubscribe(sub)) {
        Reply::FreedSubscribe(r) => r.consumer_id,
        r => panic!("{r:?}"),
    };
    let unsub = FreedUnsubscribeRequest { consumer_id };
    assert!(matches!(
        c.call(&Request::FreedUnsubscribe(unsub)),
        Reply::FreedUnsubscribe(_)
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = d.log();
        if log.contains("authentication failed") && log.contains("unsubscribed") {
            break log;
        }
        assert!(Instant::now() < deadline, "no log lines yet: {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for line in log.lines() {
        assert!(
            !line.starts_with("FORGED") && !line.contains('\x1b'),
            "a client's text forged a log line: {line:?}\n{log}"
        );
    }
    assert!(log.contains("FORGED-BY-HELLO") && log.contains("FORGED-BY-CONSUMER"));
}

/// The port of the metrics endpoint a ready line names.
fn metrics_port(ready: &str) -> u16 {
    ready
        .split("metrics on http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no metrics port in {ready}"))
}

/// Peers trickling their HTTP requests to the metrics endpoint a byte now
/// and then (slowloris) do not hold it. It served one connection at a
/// time with only a per-read timeout (2 s): a byte every 1.5 s kept it,
/// and every scrape queued behind it, for as long as the peer went on
/// (up to 8 KiB of header bytes: hours). Now each request has 2 s in all
/// to arrive and connections are served side by side (a few at once), so
/// a scrape behind four such peers is answered at once.
#[test]
fn a_trickled_metrics_request_does_not_hold_the_endpoint() {
    let Some(t) = Target::new("refd-metrics-slow", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &["--metrics", "127.0.0.1:0"]);
    let port = metrics_port(&d.ready);
    let trickling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let trickling = std::sync::Arc::clone(&trickling);
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::thread::spawn(move || {
                let start = Instant::now();
                // "GET /metrics" a byte every 1.5 s, for at most 12 s.
                for b in b"GET /metrics".iter().cycle() {
                    if !trickling.load(std::sync::atomic::Ordering::Relaxed)
                        || start.elapsed() > Duration::from_secs(12)
                        || s.write_all(&[*b]).is_err()
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1500));
                }
            })
        })
        .collect();
    // The scrape comes after them.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let took = start.elapsed();
    trickling.store(false, std::sync::atomic::Ordering::Relaxed);
    for t in slow {
        t.join().unwrap();
    }
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Less than one trickled request's 2 s: not queued behind them.
    assert!(
        took < Duration::from_millis(1900),
        "a scrape waited {took:?} behind trickled requests"
    );
}

/// A client that connects while the daemon drains after SIGTERM (here a
/// slow reader keeps it answering for seconds) is refused at once, on
/// the unix socket and on TCP: "no new connections". Before, the
/// listeners stayed open until the drain was over, so such a client's
/// connect succeeded into the backlog and its HELLO went unanswered for
/// the whole drain (up to the 30 s a reply may take, 60 s at most), then
/// the connection was reset.
#[test]
fn a_client_connecting_during_the_drain_is_refused_at_once() {
    let Some(t) = Target::new("refd-drain", 128 * MIB, false) else {
        return;
    };
    let mut d = Daemon::start(&t, &["--listen", "tcp:127.0.0.1:0"]);
    let tcp = tcp_listener(&d.ready);
    // The slow reader: 16 LOOKUPs of 1000 bytenrs (8 KiB each, replies of
    // 48 KiB) sent at once, replies taken 8 KiB every 100 ms. At the
    // SIGTERM the daemon has read a 64 KiB chunk of them it must answer
    // (several hundred KiB of replies: seconds), then it closes.
    let (mut slow, _) = Raw::hello(&d.socket);
    let bytenrs: Vec<u64> = (0..1000).collect();
    let mut frame = Vec::new();
    encode_request(
        7,
        &Request::Lookup(LookupRequest::new(bytenrs).unwrap()),
        &mut frame,
    );
    let mut stream = slow.stream.try_clone().unwrap();
    let fast = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let fast = std::sync::Arc::clone(&fast);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8 << 10];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if fast.load(std::sync::atomic::Ordering::Relaxed) => {}
                    Ok(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
    };
    for _ in 0..16 {
        slow.send_raw(&frame);
    }
    std::thread::sleep(Duration::from_millis(500));
    signal(&d.child, libc::SIGTERM);
    // The accept loops stop within their 200 ms poll.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "still draining (the slow reader)"
    );
    let refused_in_time = |connected: std::io::Result<Box<dyn ReadWrite>>| {
        let Ok(mut s) = connected else {
            return true; // refused: no socket file, or no listener
        };
        let mut f = Vec::new();
        encode_request(1, &hello_request("late"), &mut f);
        let _ = s.write_all(&f);
        let mut byte = [0u8; 1];
        // Closed, reset or answered at once; not left waiting.
        !matches!(s.read(&mut byte), Err(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    };
    let start = Instant::now();
    let unix = std::os::unix::net::UnixStream::connect(&d.socket).map(|s| {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Box::new(s) as Box<dyn ReadWrite>
    });
    assert!(refused_in_time(unix), "a unix client waited for the drain");
    let tcp = std::net::TcpStream::connect(&tcp).map(|s| {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Box::new(s) as Box<dyn ReadWrite>
    });
    assert!(refused_in_time(tcp), "a TCP client waited for the drain");
    assert!(start.elapsed() < Duration::from_secs(3));
    // The slow reader takes the rest at once: the drain ends.
    fast.store(true, std::sync::atomic::Ordering::Relaxed);
    let status = wait_bounded(&mut d.child, Duration::from_secs(60), "the drain");
    assert!(status.success(), "{status:?}: {}", d.log());
    reader.join().unwrap();
    drop(slow);
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Heads a seq barrier holds keep their room in the node region reserved
/// until a commit runs them (`docs/protocol.md`, `NO_SPACE`): with a
/// barrier held, SUBMITs are refused with `NO_SPACE` long before the tree
/// fills (measured on a 1 GiB device: 60,138 of 64,511 nodes reserved for
/// 999,424 held heads, whose commit then took 3,132), and once the
/// barrier is released the next commit runs them and the refused SUBMIT
/// (same request number) is accepted. The document said nothing of
/// barriers there: an operator told to extend the device or drop
/// references.
#[test]
fn heads_held_by_a_barrier_keep_their_room_until_released() {
    let Some(t) = Target::new("refd-held-space", 24 * MIB, false) else {
        return;
    };
    {
        let storage = std::sync::Arc::new(
            refd_ioring::UringStorage::open(&t.device, 0, Default::default()).expect("open"),
        );
        let small_nodes = refd_durable::FormatOptions {
            log_bytes: Some(16 << 20),
            ..Default::default()
        };
        refd_durable::DurableEngine::format(&storage, small_nodes).expect("format");
    }
    const BATCH: u64 = 1024;
    let batch = |b: u64| -> Vec<WireOp> {
        (0..BATCH)
            .map(|i| data(ACTION_ADD_EXTENT, (1 << 30) + (b * BATCH + i) * 4096, 1))
            .collect()
    };
    let stamped = |s: u64, b: u64| {
        Request::Submit(SubmitRequest {
            session_id: s,
            request_number: b + 1,
            flags: SUBMIT_STAMP_SEQ,
            ops: batch(b),
        })
    };
    let d = Daemon::start(&t, &["--commit-interval-ms", "600000"]);
    let (mut c, _) = Raw::hello(&d.socket);
    let s = c.register();
    let barrier = match c.call(&Request::BarrierAcquire(BarrierAcquireRequest {
        session_id: s,
    })) {
        Reply::BarrierAcquire(r) => r.barrier_id,
        r => panic!("{r:?}"),
    };
    let mut refused = None;
    for b in 0..64 {
        match c.call(&stamped(s, b)) {
            Reply::Submit(_) => {}
            Reply::Error(e) => {
                assert_eq!(e.code, ErrorCode::NoSpace, "{e:?}");
                assert!(e.message.contains("held by seq barriers"), "{e:?}");
                refused = Some(b);
                break;
            }
            r => panic!("{r:?}"),
        }
        let commit = c.commit();
        assert_eq!(commit.held, (b + 1) * BATCH, "the barrier holds them");
    }
    let refused = refused.expect("held heads never filled the reservation");
    let st = c.stats();
    assert!(st["failed"].is_null(), "not latched: {st}");
    assert_eq!(st["engine"]["heads_held"], refused * BATCH, "{st}");
    // Released: the next commit runs them, their room comes back.
    let release = BarrierReleaseRequest {
        barrier_id: barrier,
    };
    assert!(matches!(
        c.call(&Request::BarrierRelease(release)),
        Reply::BarrierRelease(_)
    ));
    let commit = c.commit();
    assert_eq!(
        (commit.held, commit.applied),
        (0, refused * BATCH),
        "{commit:?}"
    );
    match c.call(&stamped(s, refused)) {
        Reply::Submit(r) => assert_eq!(r.flags & SUBMIT_REPLY_DUPLICATE, 0, "{r:?}"),
        r => panic!("the refused SUBMIT again, no barrier held: {r:?}"),
    }
    assert_eq!(c.refs((1 << 30) + refused * BATCH * 4096), 1);
}

/// `--idle-timeout-s 0` and `--barrier-lease-ms 0` are refused at start,
/// as `--hello-timeout-ms 0` is. Accepted before, they made a daemon that
/// closed every connection at its first 200 ms without a byte (a HELLO,
/// then a pause, then a broken pipe) and handed out barriers already
/// expired (a RENEW right after the ACQUIRE got `BARRIER_UNKNOWN`).
#[test]
fn zero_idle_timeout_and_barrier_lease_are_refused() {
    let Some(t) = Target::new("refd-zero-flags", 64 * MIB, false) else {
        return;
    };
    let log = t.scratch.path().join("refused.log");
    for (flag, value) in [("--idle-timeout-s", "0"), ("--barrier-lease-ms", "0")] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_refd"))
            .arg("serve")
            .arg("--device")
            .arg(&t.device)
            .arg("--listen")
            .arg(format!("unix:{}", t.socket().display()))
            .args(["--metrics", "off", flag, value])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn refd");
        // A daemon that took the flag serves on: killed after 10 s.
        let what = format!("refd with {flag} {value}");
        let status = wait_bounded(&mut child, Duration::from_secs(10), &what);
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(
            !status.success() && err.contains(flag),
            "{flag} {value}: {status:?} {err}"
        );
    }
}

/// SIGHUP (the terminal of a daemon started by hand goes away) stops the
/// daemon gracefully, as SIGTERM does: exit status 0, everything
/// acknowledged committed, nothing to replay. Before, its default action
/// ended the process at once, as kill -9 would: no `SHUTTING_DOWN`, the
/// NO_WAIT batches not yet durable lost.
#[test]
fn sighup_stops_gracefully() {
    let Some(t) = Target::new("refd-sighup", 64 * MIB, false) else {
        return;
    };
    let mut d = Daemon::start(&t, &["--commit-interval-ms", "600000"]);
    let (mut c, _) = Raw::hello(&d.socket);
    let s = c.register();
    let no_wait = Request::Submit(SubmitRequest {
        session_id: s,
        request_number: 1,
        flags: SUBMIT_NO_WAIT,
        ops: vec![data(ACTION_ADD_EXTENT, 1 << 30, 1)],
    });
    assert!(matches!(c.call(&no_wait), Reply::Submit(_)));
    signal(&d.child, libc::SIGHUP);
    let mut last = None;
    while let Some((id, reply)) = c.try_recv() {
        last = Some((id, reply));
    }
    assert!(
        matches!(&last, Some((0, r)) if code(r) == Some(ErrorCode::ShuttingDown)),
        "{last:?}"
    );
    let status = wait_bounded(&mut d.child, Duration::from_secs(60), "refd's stop");
    assert!(status.success(), "{status:?}: {}", d.log());
    let d = Daemon::start(&t, &[]);
    assert!(d.ready.contains("with 0 ops replayed"), "{}", d.ready);
    let (mut c, _) = Raw::hello(&d.socket);
    assert_eq!(c.refs(1 << 30), 1);
}
