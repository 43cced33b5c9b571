//! The daemon against clients that misbehave and environments that
//! refuse: slow readers, half frames, many connections, a second daemon,
//! a device that is not refd's or too small, a symlinked socket path, a latched I/O
//! failure; and its metrics checked by Prometheus's own promtool and
//! against the README's list.
//!
//! The node allocator's "no spare window" fallback (STATS
//! `space.no_spare_window`, the `refd_node_region_no_spare_window` gauge,
//! `NO SPARE WINDOW` in `refctl stats`) is checked here only while it is
//! off (`metrics_pass_promtool`): no client can drive a daemon into it. It
//! is in force only when an open finds no run's worth (`K`) of consecutive
//! free node slots, and a region refd wrote always has them at open: the
//! spare windows are clear in every persisted bitmap (free again at the
//! next open, as is everything above the high-water mark), and the durable
//! engine releases each commit before the next one starts, so a running
//! daemon's run always finds a spare. Below a 2 GiB region `K` is 1, so the
//! fallback means no free slot at all (and then no commit can succeed);
//! above it, reaching the fallback takes a region fragmented slot by slot
//! up to its end (some 65 000 tree nodes, 1 GiB written) or one an older
//! refd wrote before spares existed, and while the fallback is in force a
//! commit finds `K` consecutive free slots for its run only where slots
//! were freed since the open. The refd-durable engine the daemon serves
//! (`DurableEngine`, with its service state) has the same reach on a
//! simulated device, short of forging a bitmap run and a superblock. The
//! fallback itself is tested on the allocator
//! (`a_region_fragmented_before_spares_falls_back_to_first_fit`,
//! ioring/src/btree/alloc.rs) and its rendering in refctl
//! (tools/ctl/src/client/stats.rs).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use refd_proto::*;

const MIB: u64 = 1 << 20;

/// A client that sends and never reads its replies cannot grow the
/// daemon's memory, and others are served meanwhile; more clients than
/// cores are served side by side.
#[test]
fn a_client_that_never_reads_is_bounded() {
    let Some(t) = Target::new("refd-slow", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &[]);
    let (mut good, _) = Raw::hello(&d.socket);
    let s = good.register();
    let x = 1 << 30;
    assert!(matches!(
        good.submit(s, 1, &[data(ACTION_ADD_EXTENT, x, 1)]),
        Reply::Submit(_)
    ));
    let rss_before = d.rss_bytes();
    // The greedy client: big LOOKUP replies, never read.
    let (mut greedy, _) = Raw::hello(&d.socket);
    greedy
        .stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let bytenrs: Vec<u64> = (0..16384).map(|i| x + i * 4096).collect();
    let mut frame = Vec::new();
    encode_request(
        7,
        &Request::Lookup(LookupRequest::new(bytenrs).unwrap()),
        &mut frame,
    );
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match greedy.stream.write_all(&frame) {
            Ok(()) => sent += 1,
            Err(_) => break, // the daemon stopped reading: back-pressure
        }
    }
    assert!(sent < 5_000, "the daemon kept reading {sent} requests");
    // Meanwhile others are served, several at once (more than the cores).
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                let (mut c, _) = Raw::hello(&socket);
                for _ in 0..20 {
                    assert_eq!(c.refs(1 << 30), 1);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let grown = d.rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 256 * MIB,
        "RSS grew by {grown} bytes for one slow reader"
    );
    drop(greedy);
    assert_eq!(good.refs(x), 1);
}

/// Half a frame, then silence: the connection is closed after the frame
/// timeout, and the daemon serves everyone else meanwhile.
#[test]
fn a_half_sent_frame_is_dropped() {
    let Some(t) = Target::new("refd-half", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &[]);
    let (mut half, _) = Raw::hello(&d.socket);
    let mut frame = Vec::new();
    encode_request(
        3,
        &Request::Ping(PingRequest::new(b"abcdef").unwrap()),
        &mut frame,
    );
    half.send_raw(&frame[..HEADER_BYTES + 2]);
    let (mut other, _) = Raw::hello(&d.socket);
    let t0 = Instant::now();
    for _ in 0..10 {
        assert!(matches!(
            other.call(&Request::Ping(PingRequest::new(b"x").unwrap())),
            Reply::Ping(_)
        ));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "others were not held up"
    );
    // Closed by the daemon (frame timeout 10 s).
    assert!(half.try_recv().is_none());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(25),
        "closed after {waited:?}"
    );
}

/// A frame trickled a byte every 50 ms after HELLO is closed 10 s after
/// its first byte ("Transport": "a frame whose first byte arrived but
/// which is not whole 10 s later"). The timer was looked at only when a
/// read timed out (200 ms of silence), so a client that never paused that
/// long held a half frame, and its connection's slot and threads, for as
/// long as it liked (a 1 MiB frame at 20 bytes/s: 14 hours).
#[test]
fn a_frame_trickled_after_hello_is_closed_in_time() {
    let Some(t) = Target::new("refd-trickle", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &[]);
    let (mut trickle, _) = Raw::hello(&d.socket);
    let bytenrs: Vec<u64> = (1..=16384).collect();
    let mut frame = Vec::new();
    encode_request(
        7,
        &Request::Lookup(LookupRequest::new(bytenrs).unwrap()),
        &mut frame,
    );
    trickle.stream.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let mut sent = 0;
    let mut probe = [0u8; 64];
    let closed_after = loop {
        if t0.elapsed() > Duration::from_secs(20) {
            break None;
        }
        // EOF (or a reset) from the daemon: closed, without a reply.
        match trickle.stream.read(&mut probe) {
            Ok(0) => break Some(t0.elapsed()),
            Ok(n) => panic!("a reply to half a frame: {:?}", &probe[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break Some(t0.elapsed()),
        }
        match trickle.stream.write(&frame[sent..=sent]) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break Some(t0.elapsed()),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let closed_after = closed_after
        .unwrap_or_else(|| panic!("a frame trickled for 20 s ({sent} bytes) was not closed"));
    assert!(
        closed_after >= Duration::from_secs(9) && closed_after < Duration::from_secs(14),
        "closed after {closed_after:?} ({sent} bytes sent)"
    );
}

/// A client whose every write ends inside a frame (the tail of one PING
/// and the head of the next, every 20 ms, for 12 s) is not taken for a
/// stalled one: the frame timer runs from the first byte of the frame
/// being read, not from the first partial read of the connection.
#[test]
fn a_stream_always_ending_mid_frame_is_served() {
    let Some(t) = Target::new("refd-midframe", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &[]);
    let (mut c, _) = Raw::hello(&d.socket);
    let frame = |id: u64| {
        let mut f = Vec::new();
        let ping = PingRequest::new(&id.to_le_bytes()).unwrap();
        encode_request(id, &Request::Ping(ping), &mut f);
        f
    };
    let half = frame(0).len() / 2;
    c.send_raw(&frame(1)[..half]);
    let t0 = Instant::now();
    let mut id = 1;
    while t0.elapsed() < Duration::from_secs(12) {
        let mut bytes = frame(id)[half..].to_vec();
        bytes.extend_from_slice(&frame(id + 1)[..half]);
        c.send_raw(&bytes);
        let (rid, reply) = c
            .try_recv()
            .unwrap_or_else(|| panic!("closed after {:?}, at PING {id}", t0.elapsed()));
        assert_eq!(rid, id);
        assert!(matches!(reply, Reply::Ping(p) if p.payload == id.to_le_bytes()));
        id += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send_raw(&frame(id)[half..]);
    assert_eq!(c.recv().0, id);
}

/// A connection that does not complete HELLO within --hello-timeout-ms
/// is closed, whether it sends nothing or trickles a HELLO a byte at a
/// time (so that reads never time out); a connection that said HELLO
/// stays open past it.
#[test]
fn a_connection_without_hello_is_closed_in_time() {
    let Some(t) = Target::new("refd-nohello", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &["--hello-timeout-ms", "1000"]);
    let (mut helloed, _) = Raw::hello(&d.socket);
    let silent = Raw::connect(&d.socket);
    let mut trickle = Raw::connect(&d.socket);
    let mut frame = Vec::new();
    encode_request(1, &hello_request("slow"), &mut frame);
    let t0 = Instant::now();
    // One byte every 100 ms: the whole HELLO would take seconds, and the
    // daemon's 200 ms read poll never times out meanwhile.
    let mut sent = 0;
    while sent + 1 < frame.len() && t0.elapsed() < Duration::from_secs(4) {
        if trickle.stream.write_all(&frame[sent..=sent]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_after = t0.elapsed();
    assert!(
        sent + 1 < frame.len(),
        "the trickled HELLO was still read after {closed_after:?}"
    );
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(4),
        "a trickling connection closed after {closed_after:?}"
    );
    for mut c in [silent, trickle] {
        c.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(c.try_recv().is_none(), "closed without a reply");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "closed after {:?}",
        t0.elapsed()
    );
    assert!(matches!(
        helloed.call(&Request::Ping(PingRequest::new(b"still here").unwrap())),
        Reply::Ping(_)
    ));
    assert_eq!(helloed.stats()["wire"]["hello_timeouts"], 2);
}

/// A thousand connections opened and dropped (some mid-HELLO), then the
/// daemon still serves; past --connections-max a connection gets BUSY.
#[test]
fn a_thousand_connections_and_the_bound() {
    let Some(t) = Target::new("refd-conns", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &["--connections-max", "64"]);
    for i in 0..1000 {
        let mut s = UnixStream::connect(&d.socket).expect("connect");
        if i % 3 == 0 {
            let mut f = Vec::new();
            encode_request(1, &hello_request("x"), &mut f);
            let _ = s.write_all(&f[..f.len() / 2]);
        }
        drop(s);
    }
    // Wait until the daemon has let them all go (BUSY meanwhile: with the
    // HELLO's request id, or 0 when the refusals of the thousand still
    // fill the daemon's threads for them and it answers at once,
    // docs/protocol.md).
    let t0 = Instant::now();
    let mut c = loop {
        let mut c = Raw::connect(&d.socket);
        let id = c.send(&hello_request("after"));
        let (rid, r) = c.recv();
        match r {
            Reply::Hello(_) => {
                assert_eq!(rid, id);
                break c;
            }
            r => {
                assert_eq!(code(&r), Some(ErrorCode::Busy));
                assert!(rid == id || rid == 0, "BUSY for request {rid}");
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "still busy");
        std::thread::sleep(Duration::from_millis(50));
    };
    while c.stats()["connections"]["open"].as_u64() != Some(1) {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", c.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Fill up to the bound; the next one is refused with BUSY.
    let held: Vec<Raw> = (0..63).map(|_| Raw::hello(&d.socket).0).collect();
    let mut over = Raw::connect(&d.socket);
    let id = over.send(&hello_request("one too many"));
    let (rid, r) = over.recv();
    assert_eq!((rid, code(&r)), (id, Some(ErrorCode::Busy)));
    drop(held);
    let st = c.stats();
    assert!(st["connections"]["refused"].as_u64().unwrap() >= 1, "{st}");
}

/// Connections over `--connections-max` that send nothing are refused
/// beside the accept loop, not in it: each waits up to a second for its
/// first frame, and ten of them held off every connection behind them for
/// ten seconds, also once a slot was free again.
#[test]
fn silent_connections_over_the_bound_do_not_hold_off_the_accept() {
    let Some(t) = Target::new("refd-silent", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &["--connections-max", "1"]);
    let (mut held, _) = Raw::hello(&d.socket);
    let t0 = Instant::now();
    let silent: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    // Every silent one taken off the queue (refused) before the slot is
    // freed: else a silent one would take the slot, as a connection that
    // has not sent its HELLO yet.
    while held.stats()["connections"]["refused"].as_u64() < Some(10) {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", held.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(held);
    loop {
        let mut c = Raw::connect(&d.socket);
        match c.call(&hello_request("after the silent ones")) {
            Reply::Hello(_) => break,
            r => assert_eq!(code(&r), Some(ErrorCode::Busy)),
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still busy");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    drop(silent);
    assert!(
        took < Duration::from_secs(5),
        "a free slot was reached {took:?} after 10 silent connections"
    );
}

/// Refusals the daemon waits on at once (`REFUSING_MAX` in server.rs,
/// docs/protocol.md "at most 256 such connections at once").
const REFUSING_MAX: usize = 256;

/// Past 256 refusals waiting at once, one more connection over
/// `--connections-max` is answered `BUSY` with request id 0 at once, without
/// its HELLO being read, and closed; the admitted client is served all
/// along and a slot freed afterwards is reached. "At once" is told by the
/// request id, not by a clock: a refusal that read the HELLO answers with
/// its id. A silent refusal holds its place up to 2 s (1 s for a first
/// frame, 1 s of linger after its BUSY), so a round in which the first
/// refusals ran out before the probe was accepted (a machine busy
/// elsewhere) is done again, at most five times.
#[test]
fn busy_at_once_past_the_refusals_waiting() {
    const SILENT: usize = REFUSING_MAX + 4;
    // This process holds SILENT sockets, and the daemon (which inherits
    // the limit) as many again besides its own files.
    if !open_files_at_least(2 * SILENT as u64 + 256) {
        eprintln!("skipped: RLIMIT_NOFILE cannot be raised to hold {SILENT} connections");
        return;
    }
    let Some(t) = Target::new("refd-busy-at-once", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &["--connections-max", "1"]);
    let (mut held, _) = Raw::hello(&d.socket);
    let s = held.register();
    let t0 = Instant::now();
    let mut refused = 0;
    let mut answered_at_once = false;
    for round in 0..5 {
        let silent: Vec<UnixStream> = (0..SILENT)
            .map(|_| UnixStream::connect(&d.socket).expect("connect"))
            .collect();
        refused += SILENT as u64;
        // Every silent one taken off the accept queue (refused).
        while held.stats()["connections"]["refused"].as_u64() < Some(refused) {
            assert!(t0.elapsed() < Duration::from_secs(60), "{}", held.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut probe = Raw::connect(&d.socket);
        // The write may find the connection closed already (answered at
        // once): the BUSY is read all the same.
        let (id, _) = probe.try_send(&hello_request("past the refusals"));
        assert_ne!(id, 0);
        let (rid, r) = probe.recv();
        refused += 1;
        assert_eq!(code(&r), Some(ErrorCode::Busy), "{r:?}");
        assert!(probe.try_recv().is_none(), "closed after BUSY");
        drop(silent);
        if rid == 0 {
            answered_at_once = true;
            break;
        }
        assert_eq!(rid, id, "BUSY for request {rid}");
        eprintln!("round {round}: the probe's HELLO was read, the refusals had run out");
    }
    assert!(
        answered_at_once,
        "five rounds and the probe's HELLO was read each time: never answered at once"
    );
    // The admitted client is served.
    assert!(matches!(
        held.submit(s, 1, &[data(ACTION_ADD_EXTENT, 1 << 30, 1)]),
        Reply::Submit(_)
    ));
    assert_eq!(held.refs(1 << 30), 1);
    assert!(held.stats()["connections"]["refused"].as_u64() >= Some(refused));
    // And its slot, once free, is reached.
    drop(held);
    loop {
        let mut c = Raw::connect(&d.socket);
        match c.call(&hello_request("after the refusals")) {
            Reply::Hello(_) => {
                assert_eq!(c.refs(1 << 30), 1);
                break;
            }
            r => assert_eq!(code(&r), Some(ErrorCode::Busy)),
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "still busy");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this process may open `n` files, raising its soft
/// RLIMIT_NOFILE (up to the hard one) if it is lower.
fn open_files_at_least(n: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) and setrlimit(2) on a struct of ours.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return false;
        }
        if lim.rlim_cur >= n {
            return true;
        }
        if lim.rlim_max < n {
            return false;
        }
        lim.rlim_cur = n;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
    }
}

/// One daemon per device; never a device that is not refd's; never a
/// socket through a symlink or over a file.
#[test]
fn refusals_at_start() {
    let Some(t) = Target::new("refd-refuse", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &[]);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_refd"))
            .arg("serve")
            .args(["--metrics", "off"])
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .expect("run refd")
    };
    let dev = t.device.to_str().unwrap();
    let sock2 = t.scratch.path().join("second.sock");
    let out = run(&["--device", dev, "--listen", sock2.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use"), "{err}");
    // The socket of a live daemon is not taken over.
    let other = t.scratch.path().join("other.img");
    let out = run(&[
        "--device",
        other.to_str().unwrap(),
        "--device-size",
        "64M",
        "--listen",
        d.socket.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("listening on it already"),
        "{err}"
    );
    drop(d);
    // Not a refd device: refused, and left as it was.
    let junk = t.scratch.path().join("junk.img");
    std::fs::write(&junk, vec![0xabu8; 8 << 20]).unwrap();
    let out = run(&[
        "--device",
        junk.to_str().unwrap(),
        "--listen",
        sock2.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refctl format --force"),
        "{err}"
    );
    assert!(
        std::fs::read(&junk).unwrap().iter().all(|&b| b == 0xab),
        "untouched"
    );
    // A device too small for the log batches: the message says which
    // device size would do, not an internal setting.
    let small = t.scratch.path().join("small.img");
    let out = run(&[
        "--device",
        small.to_str().unwrap(),
        "--device-size",
        "16M",
        "--listen",
        sock2.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let log_min =
        (4 * refd_durable::engine::APPENDERS_MIN * refd::config::LOG_BATCH_BYTES_MAX) as u64;
    let min = refd_durable::device_bytes_min_for_log(log_min);
    assert_eq!(min, refd::config::device_bytes_min());
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "--device-size 16777216 is too small for a new device: refd needs at least \
                 {min} bytes ({} MiB)",
                min.div_ceil(MIB)
            )),
        "{err}"
    );
    assert!(!small.exists(), "nothing created");
    // One formatted elsewhere with the default layout of 16 MiB: refused
    // at open, naming the device size that would do.
    {
        let device = refd_ioring::Device::create_file(
            &small,
            16 * MIB,
            refd_ioring::FileAllocation::Reserve,
        )
        .unwrap();
        let storage = std::sync::Arc::new(
            refd_ioring::UringStorage::new(device, refd_ioring::UringConfig::default()).unwrap(),
        );
        refd_durable::DurableEngine::format(&storage, refd_durable::FormatOptions::default())
            .unwrap();
    }
    let out = run(&[
        "--device",
        small.to_str().unwrap(),
        "--listen",
        sock2.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!("from {min} bytes ({} MiB) on", min.div_ceil(MIB)))
            && !err.contains("LogConfig"),
        "{err}"
    );
    // A symlink at the socket path, or a regular file.
    let target_file = t.scratch.path().join("precious.txt");
    std::fs::write(&target_file, b"keep me").unwrap();
    let link = t.scratch.path().join("link.sock");
    std::os::unix::fs::symlink(&target_file, &link).unwrap();
    for path in [&link, &target_file] {
        let out = run(&["--device", dev, "--listen", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
    }
    assert_eq!(std::fs::read(&target_file).unwrap(), b"keep me");
    // A TCP listener off loopback without a token.
    let out = run(&["--device", dev, "--listen", "tcp:0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--token-file"),
        "{err}"
    );
}

/// TCP with a token: the token is required and failures are counted.
#[test]
fn tcp_needs_the_token() {
    let Some(t) = Target::new("refd-token", 128 * MIB, false) else {
        return;
    };
    let token = t.scratch.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    // Port 0: the kernel picks a free port, read from the ready line (a
    // port found free and given to the daemon could be taken meanwhile
    // by another test or process).
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
    let hello = |tok: &[u8]| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut f = Vec::new();
        let h = HelloRequest {
            version_min: 1,
            version_max: 1,
            token: tok.to_vec(),
            name: "tcp".into(),
        };
        encode_request(1, &Request::Hello(h), &mut f);
        s.write_all(&f).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        let mut dec = FrameDecoder::expecting(BODY_BYTES_MAX_DEFAULT, Direction::Reply);
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed without a reply");
            got.extend_from_slice(&buf[..n]);
            let mut input = &got[..];
            if let Some(f) = dec.decode_from(&mut input).unwrap() {
                return Reply::decode(f.header.opcode, &f.body).unwrap();
            }
            got.clear();
        }
    };
    assert_eq!(code(&hello(b"wrong")), Some(ErrorCode::AuthFailed));
    assert!(matches!(hello(b"s3cret"), Reply::Hello(_)));
    // The unix listener relies on the socket's 0660 mode instead.
    let (mut c, _) = Raw::hello(&d.socket);
    assert_eq!(c.stats()["wire"]["auth_failures"], 1);
    let mode = std::fs::metadata(&d.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o660);
}

/// `promtool check metrics` (Prometheus's own linter) accepts the metrics
/// endpoint; skipped where promtool is not installed.
#[test]
fn metrics_pass_promtool() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!(
            "SKIP metrics_pass_promtool: promtool is not installed (apt-get install prometheus)"
        );
        return;
    }
    let Some(t) = Target::new("refd-metrics", 128 * MIB, false) else {
        return;
    };
    // Port 0, read from the ready line, as in tcp_needs_the_token.
    let d = Daemon::start(&t, &["--metrics", "127.0.0.1:0"]);
    let port = metrics_port(&d.ready);
    let (mut c, _) = Raw::hello(&d.socket);
    let s = c.register();
    assert!(matches!(
        c.submit(s, 1, &[data(ACTION_ADD_EXTENT, 1 << 30, 1)]),
        Reply::Submit(_)
    ));
    c.commit();
    // A short LOOKUP: served at the real-time priority where allowed.
    assert_eq!(c.lookup(&[1 << 30]).len(), 1);
    let _ = c.call(&Request::Ping(PingRequest::new(b"").unwrap()));
    // One error frame sent (a PING body over 64 bytes: BAD_REQUEST, the
    // connection stays open): counted once.
    let mut frame = Vec::new();
    encode_frame(Opcode::Ping, 0, 99, &[0; 65], &mut frame);
    c.send_raw(&frame);
    assert_eq!(code(&c.recv().1), Some(ErrorCode::BadRequest));
    let body = http_get(port, "/metrics");
    for name in [
        "refd_ingest_ops_total",
        "refd_commit_seconds_bucket",
        "refd_log_used_bytes",
        "refd_connections ",
        "refd_failed 0",
        "refd_requests_total{opcode=\"SUBMIT\"}",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    let value = |name: &str| -> f64 {
        let line = body.lines().find(|l| l.starts_with(name));
        let line = line.unwrap_or_else(|| panic!("{name} missing:\n{body}"));
        line[name.len()..].trim().parse().unwrap()
    };
    // The SUBMIT's ack latency was observed; the daemon's memory is read.
    assert!(value("refd_submit_seconds_count ") >= 1.0);
    assert_eq!(
        value("refd_errors_total{code=\"BAD_REQUEST\"} "),
        1.0,
        "{body}"
    );
    // The durable SUBMIT's log batch write was timed by the log, and the
    // histogram ends with its +Inf bucket holding every write.
    let writes = value("refd_log_write_seconds_count ");
    assert!(writes >= 1.0, "{body}");
    assert_eq!(value("refd_log_write_seconds_bucket{le=\"+Inf\"} "), writes);
    assert_eq!(c.stats()["log"]["writes"].as_f64(), Some(writes));
    assert!(value("refd_resident_memory_bytes ") > f64::from(1u32 << 20));
    let boosted = if d.log().contains("at a real-time priority") {
        0.0
    } else {
        1.0
    };
    assert_eq!(value("refd_lookup_rt_boosted_total "), boosted, "{body}");
    assert_eq!(value("refd_lookup_rt_budget_spent_total "), 0.0, "{body}");
    // The node region's spare windows for the bitmap runs: K = 1 node on
    // 128 MiB, two windows beside the committed run, no fallback; the
    // same in STATS.
    assert_eq!(value("refd_node_region_bitmap_run_nodes "), 1.0, "{body}");
    assert_eq!(value("refd_node_region_spare_nodes "), 2.0, "{body}");
    assert_eq!(value("refd_node_region_no_spare_window "), 0.0, "{body}");
    let space = &c.stats()["space"];
    let spare = [&space["bitmap_run_nodes"], &space["spare_nodes"]];
    assert_eq!(spare, [1, 2], "{space}");
    assert_eq!(space["no_spare_window"], false, "{space}");
    // Formatted to the device's end: no warning that it is larger than
    // its layout (there was one at every start, 8 KiB past the end).
    assert!(!d.log().contains("larger than its layout"), "{}", d.log());
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tools/refd/README.md` ("Metrics") names every metric `/metrics`
/// exports and no other, each family with its label, and says which are
/// histograms. Every family is made to appear first (a SUBMIT, a COMMIT,
/// an error frame), since a labelled family is exported once it has a
/// label value.
#[test]
fn metrics_are_the_readme_list() {
    let Some(t) = Target::new("refd-metrics-doc", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &["--metrics", "127.0.0.1:0"]);
    let port = metrics_port(&d.ready);
    let (mut c, _) = Raw::hello(&d.socket);
    let s = c.register();
    assert!(matches!(
        c.submit(s, 1, &[data(ACTION_ADD_EXTENT, 1 << 30, 1)]),
        Reply::Submit(_)
    ));
    c.commit();
    let mut frame = Vec::new();
    encode_frame(Opcode::Ping, 0, 99, &[0; 65], &mut frame);
    c.send_raw(&frame);
    assert_eq!(code(&c.recv().1), Some(ErrorCode::BadRequest));
    let body = http_get(port, "/metrics");
    // name -> type, from the `# TYPE` lines.
    let exported: std::collections::BTreeMap<&str, &str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section: String = readme
        .lines()
        .skip_while(|l| *l != "## Metrics")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect::<Vec<_>>()
        .join("\n");
    // `refd_x`, `refd_x{label}`, each with the text up to the next name.
    let mut documented = std::collections::BTreeMap::new();
    let parts: Vec<&str> = section.split('`').collect();
    for (i, word) in parts.iter().enumerate().skip(1).step_by(2) {
        let Some(name) = word.strip_prefix("refd_").map(|_| *word) else {
            continue;
        };
        let (name, label) = match name.split_once('{') {
            Some((n, l)) => (n, Some(l.trim_end_matches('}'))),
            None => (name, None),
        };
        let after = parts.get(i + 1).copied().unwrap_or("");
        documented.insert(name, (label, after.trim_start().starts_with("(histogram")));
    }
    let names = |m: &std::collections::BTreeMap<&str, _>| -> Vec<String> {
        m.keys().map(|k: &&str| k.to_string()).collect()
    };
    assert_eq!(
        names(&documented),
        exported.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        "README metrics against /metrics:\n{body}"
    );
    for (name, (label, histogram)) in &documented {
        assert_eq!(
            exported[name] == "histogram",
            *histogram,
            "{name}: type {} (README says histogram: {histogram})",
            exported[name]
        );
        let labelled = body.lines().find(|l| l.starts_with(&format!("{name}{{")));
        match (label, labelled) {
            (Some(label), Some(line)) => assert!(
                line.starts_with(&format!("{name}{{{label}=\"")),
                "{name}: README label {label}, exported {line}"
            ),
            (Some(label), None) => panic!("{name}: no sample with label {label}:\n{body}"),
            (None, Some(line)) if exported[name] != "histogram" => {
                panic!("{name}: exported with a label the README does not name: {line}")
            }
            _ => {}
        }
    }
}

/// The port of the metrics endpoint a ready line names
/// (`metrics on http://127.0.0.1:PORT/metrics`).
fn metrics_port(ready: &str) -> u16 {
    ready
        .split("metrics on http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no metrics port in {ready}"))
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let i = out.find("\r\n\r\n").unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out[i + 4..].to_string()
}

/// An I/O error latches the engine: every later write gets FAILED naming
/// the device, the offset and the operation, reads of committed state and
/// STATS still work, and STATS shows the failure. The device: a loop
/// device over a sparse file on a tmpfs that is then filled up, so that
/// the first write into a hole fails (ENOSPC, an I/O error on the loop
/// device). Needs root, losetup and mount; skipped otherwise.
#[test]
fn an_io_error_latches_and_reads_go_on() {
    let Some(scratch) = refd_ioring::test_support::Scratch::new("refd-eio") else {
        return;
    };
    let Some(full) = FullDevice::new(&scratch) else {
        return;
    };
    let t = Target {
        loop_dev: None,
        device: full.dev.clone(),
        scratch,
    };
    let d = Daemon::start(&t, &["--commit-interval-ms", "600000"]);
    let (mut c, _) = Raw::hello(&d.socket);
    let r = c.call(&Request::Register(RegisterRequest));
    let Reply::Error(e) = r else {
        panic!("REGISTER should fail on a full device: {r:?}")
    };
    assert_eq!(e.code, ErrorCode::Failed);
    let dev = full.dev.display().to_string();
    assert!(
        e.message.contains(&dev) && e.message.contains("offset"),
        "{e:?}"
    );
    assert_ne!(e.detail, u64::MAX, "the offset is named: {e:?}");
    // Every later write fails the same way, at once.
    let r = c.submit(1, 1, &[data(ACTION_ADD_EXTENT, 1 << 30, 1)]);
    assert!(
        matches!(
            code(&r),
            Some(ErrorCode::Failed | ErrorCode::SessionUnknown)
        ),
        "{r:?}"
    );
    assert_eq!(
        code(&c.call(&Request::Commit(CommitRequest))),
        Some(ErrorCode::Failed)
    );
    // Reads go on.
    assert_eq!(c.refs(1 << 30), 0);
    let st = c.stats();
    assert_eq!(st["failed"]["device"], dev.as_str(), "{st}");
    assert!(
        st["failed"]["message"].as_str().unwrap().contains("offset"),
        "{st}"
    );
    wait_for_error_log(&d, &dev);
}

/// The daemon logs a latched failure once at ERROR, naming `what`,
/// within a few of its quarter-second checks.
fn wait_for_error_log(d: &Daemon, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = d.log();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("engine failed"))
            .collect();
        if !errors.is_empty() {
            assert_eq!(errors.len(), 1, "logged once: {log}");
            assert!(errors[0].contains(what), "{log}");
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no ERROR line: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A device whose node region fills up: SUBMITs of new allocations are
/// refused with NO_SPACE before anything is logged (`detail` = free
/// nodes, the message names `--grow`), the daemon is not latched (COMMIT,
/// STATS, LOOKUP go on), every acknowledged op is in the tree after a
/// COMMIT and after a restart, no op of a refused SUBMIT is, and after the
/// file is extended and the daemon restarted with `--grow` the same
/// SUBMIT (same request number) is accepted. Before space reservation
/// the commit of acknowledged ops failed and latched the engine, and
/// every restart failed too. A 20 MiB file device with a 16 MiB log (the
/// least the daemon takes), so 4 MiB of nodes; no root needed.
#[test]
fn a_full_node_region_refuses_with_no_space_and_grows() {
    let Some(t) = Target::new("refd-full", 20 << 20, false) else {
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
    let bytenr = |batch: u64, i: u64| (1 << 30) + (batch * BATCH + i) * 4096;
    let batch_ops = |batch: u64| -> Vec<WireOp> {
        (0..BATCH)
            .map(|i| data(ACTION_ADD_EXTENT, bytenr(batch, i), 1))
            .collect()
    };
    let batch_bytenrs = |batch: u64| -> Vec<u64> { (0..BATCH).map(|i| bytenr(batch, i)).collect() };
    let d = Daemon::start(&t, &["--commit-interval-ms", "600000"]);
    let (mut c, _) = Raw::hello(&d.socket);
    let s = c.register();
    let mut refused = None;
    let mut acked = 0;
    // 256 nodes hold at most ~80k extent items; refusals come well before.
    for batch in 0..80u64 {
        match c.submit(s, batch + 1, &batch_ops(batch)) {
            Reply::Submit(_) => acked = batch + 1,
            Reply::Error(e) => {
                refused = Some((batch, e));
                break;
            }
            r => panic!("{r:?}"),
        }
        assert!(
            matches!(c.call(&Request::Commit(CommitRequest)), Reply::Commit(_)),
            "commit of acknowledged batch {batch}"
        );
    }
    let (refused_batch, e) = refused.expect("80k extent items cannot fit 4 MiB of nodes");
    assert!(acked >= 4, "only {acked} batches before the refusal");
    eprintln!("{acked} batches of {BATCH} acknowledged, then {e:?}");
    assert_eq!(e.code, ErrorCode::NoSpace, "{e:?}");
    assert!(e.message.contains("--grow"), "{e:?}");
    let st = c.stats();
    assert!(st["failed"].is_null(), "not latched: {st}");
    assert!(
        e.detail <= st["space"]["region_nodes"].as_u64().unwrap(),
        "{e:?} {st}"
    );
    assert!(st["space"]["refused"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["engine"]["extents"], acked * BATCH, "{st}");
    // Not latched: COMMIT works, drops are taken, reads go on.
    assert!(matches!(
        c.call(&Request::Commit(CommitRequest)),
        Reply::Commit(_)
    ));
    let check = |c: &mut Raw, when: &str| {
        for batch in 0..acked {
            for e in c.lookup(&batch_bytenrs(batch)) {
                assert_eq!((e.refs, e.committed_refs), (1, 1), "{when}: {e:?}");
            }
        }
        for e in c.lookup(&batch_bytenrs(refused_batch)) {
            assert_eq!(e.refs, 0, "{when}: refused op {e:?}");
        }
    };
    check(&mut c, "after the refusal");
    wait_for_warn_log(&d, "NO_SPACE");
    drop(c);
    let mut d = d;
    assert!(d.term().success(), "a daemon that refused stops cleanly");
    drop(d);

    // A restart replays and commits nothing it cannot hold.
    let d = Daemon::start(&t, &["--commit-interval-ms", "600000"]);
    let (mut c, _) = Raw::hello(&d.socket);
    check(&mut c, "after a restart");
    let r = c.submit(s, refused_batch + 1, &batch_ops(refused_batch));
    assert_eq!(code(&r), Some(ErrorCode::NoSpace), "{r:?}");
    drop(c);
    let mut d = d;
    assert!(d.term().success());
    drop(d);

    // The same device, extended, and --grow: the same SUBMIT is accepted.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&t.device)
        .expect("device file");
    f.set_len(64 << 20).expect("extend the device file");
    drop(f);
    let d = Daemon::start(&t, &["--grow", "--commit-interval-ms", "600000"]);
    assert!(d.log().contains("node region grown"), "{}", d.log());
    let (mut c, _) = Raw::hello(&d.socket);
    let r = c.submit(s, refused_batch + 1, &batch_ops(refused_batch));
    assert!(matches!(r, Reply::Submit(_)), "{r:?}");
    c.commit();
    acked += 1;
    check_all(&mut c, acked, &batch_bytenrs);
    assert_eq!(c.stats()["engine"]["extents"], acked * BATCH);
    assert!(c.stats()["failed"].is_null());
}

fn check_all(c: &mut Raw, batches: u64, bytenrs: &dyn Fn(u64) -> Vec<u64>) {
    for batch in 0..batches {
        for e in c.lookup(&bytenrs(batch)) {
            assert_eq!((e.refs, e.committed_refs), (1, 1), "after --grow: {e:?}");
        }
    }
}

/// The daemon logs a line at WARN naming `what` within a few seconds.
fn wait_for_warn_log(d: &Daemon, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = d.log();
        if log.lines().any(|l| l.contains("WARN") && l.contains(what)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no WARN line: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loop device over a sparse file on a tmpfs filled to the brim.
struct FullDevice {
    mount: std::path::PathBuf,
    dev: std::path::PathBuf,
}

impl FullDevice {
    fn new(scratch: &refd_ioring::test_support::Scratch) -> Option<FullDevice> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP an_io_error_latches: not root");
            return None;
        }
        let mount = scratch.path().join("tmpfs");
        std::fs::create_dir_all(&mount).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP an_io_error_latches: cannot mount a tmpfs");
            return None;
        }
        let file = mount.join("dev.img");
        let f = std::fs::File::create(&file).ok()?;
        f.set_len(256 * MIB).ok()?;
        drop(f);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("SKIP an_io_error_latches: losetup failed");
            let _ = Command::new("umount").arg(&mount).status();
            return None;
        }
        let dev = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let me = FullDevice { mount, dev };
        let storage = std::sync::Arc::new(
            refd_ioring::UringStorage::open(&me.dev, 0, refd_ioring::UringConfig::default())
                .ok()?,
        );
        refd_durable::DurableEngine::format(&storage, refd_durable::FormatOptions::default())
            .ok()?;
        drop(storage);
        // Fill the tmpfs: every hole of the device is now unwritable.
        let mut filler = std::fs::File::create(me.mount.join("filler")).ok()?;
        let chunk = vec![1u8; 1 << 20];
        while filler.write_all(&chunk).is_ok() {}
        Some(me)
    }
}

impl Drop for FullDevice {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .status()
                .is_ok_and(|s| s.success())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        // The scratch directory (declared after this in the test, so
        // dropped first) could not be removed while the tmpfs was mounted
        // in it: remove what is left now.
        if let Some(parent) = self.mount.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// A daemon whose stdout and stderr readers went away (a closed pipe)
/// keeps serving and still stops on SIGTERM with status 0: no thread may
/// die on a log line (a regression: the signal thread panicked writing
/// its log line, and the daemon never stopped).
#[test]
fn closed_output_does_not_wedge_the_daemon() {
    let Some(t) = Target::new("refd-pipes", 128 * MIB, false) else {
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_refd"))
        .arg("serve")
        .arg("--device")
        .arg(&t.device)
        .arg("--listen")
        .arg(format!("unix:{}", t.socket().display()))
        .args(["--metrics", "off"])
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"refd ready");
    drop(out);
    drop(child.stderr.take());
    // Served, with logging going nowhere.
    let (mut c, _) = Raw::hello(&t.socket());
    let s = c.register();
    assert!(matches!(
        c.submit(s, 1, &[data(ACTION_ADD_EXTENT, 1 << 30, 1)]),
        Reply::Submit(_)
    ));
    drop(c);
    signal(&child, libc::SIGTERM);
    let status = wait_bounded(
        &mut child,
        Duration::from_secs(20),
        "refd's stop on SIGTERM with its output closed",
    );
    assert!(status.success(), "{status:?}");
}

/// A log damaged in the middle (a bit flipped in an acknowledged batch
/// with intact batches after it): the daemon refuses to start, naming the
/// damage and the way on; `--recovery-mode skip-corrupt` starts it,
/// logging what was dropped.
#[test]
fn a_damaged_log_stops_the_daemon_until_a_recovery_mode_is_chosen() {
    use refd_core::model::{Action, ExtentKind, Op, RefKey};
    use refd_durable::{DurableEngine, OpenOptions};
    use refd_ioring::{UringConfig, UringStorage};
    let Some(t) = Target::new("refd-rotten-log", 64 * MIB, false) else {
        return;
    };
    let sb = {
        let s = std::sync::Arc::new(
            UringStorage::open(&t.device, 0, UringConfig::default()).expect("open"),
        );
        let (e, _) = DurableEngine::open(std::sync::Arc::clone(&s), OpenOptions::default())
            .expect("open engine");
        for objectid in 0..5 {
            let action = if objectid == 0 {
                Action::AddExtent
            } else {
                Action::AddRef
            };
            let key = RefKey::ExtentData {
                root: 5,
                objectid,
                offset: 0,
            };
            let op = Op::new(1 << 30, 4096, ExtentKind::Data, action, key, 0).unwrap();
            e.add_durable(&op).expect("add");
        }
        e.superblock()
    };
    // One 4096-byte batch per op after the head: a bit of the second.
    let at = sb.log_start + (sb.log_head_offset + 4096) % sb.log_bytes + 85;
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&t.device)
            .unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] ^= 0x04;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&b).unwrap();
        f.sync_all().unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_refd"))
        .arg("serve")
        .args(["--metrics", "off", "--device", t.device.to_str().unwrap()])
        .arg("--listen")
        .arg(format!("unix:{}", t.socket().display()))
        .env("RUST_LOG", "error")
        .output()
        .expect("run refd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("log corrupt") && err.contains("--recovery-mode"),
        "{err}"
    );
    assert!(!t.socket().exists(), "nothing was served");
    let mut d = Daemon::start(&t, &["--recovery-mode", "skip-corrupt"]);
    assert!(d.ready.contains("4 ops replayed"), "{}", d.ready);
    let status = d.term();
    assert!(status.success(), "{status}: {}", d.log());
    assert!(d.log().contains("DROPPED"), "{}", d.log());
}

/// One request id used by many requests in flight at once (a client's
/// mistake the protocol leaves to the client): each is executed and
/// answered once, every reply carrying that id; the SUBMITs are told
/// apart by their request numbers, the PINGs by their bytes.
#[test]
fn a_request_id_reused_in_flight_is_answered_per_request() {
    let Some(t) = Target::new("refd-reused-id", 128 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &[]);
    let (mut c, _) = Raw::hello(&d.socket);
    let s = c.register();
    let x = 1 << 30;
    assert!(matches!(
        c.submit(s, 1, &[data(ACTION_ADD_EXTENT, x, 1)]),
        Reply::Submit(_)
    ));
    const ID: u64 = 7;
    let mut burst = Vec::new();
    for i in 0..50u64 {
        let ping = Request::Ping(PingRequest::new(&i.to_le_bytes()).unwrap());
        encode_request(ID, &ping, &mut burst);
        if i % 5 == 0 {
            let number = 2 + i / 5;
            let add = submit(s, number, &[data(ACTION_ADD_REF, x, 100 + number)]);
            encode_request(ID, &add, &mut burst);
        }
    }
    c.send_raw(&burst);
    let (mut pings, mut numbers) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        match c.recv() {
            (ID, Reply::Ping(p)) => {
                pings.push(u64::from_le_bytes(p.payload[..].try_into().unwrap()))
            }
            (ID, Reply::Submit(r)) => {
                assert_ne!(r.flags & SUBMIT_REPLY_DURABLE, 0, "{r:?}");
                numbers.push(r.request_number);
            }
            other => panic!("{other:?}"),
        }
    }
    pings.sort_unstable();
    numbers.sort_unstable();
    assert_eq!(pings, (0..50).collect::<Vec<_>>());
    assert_eq!(numbers, (2..12).collect::<Vec<_>>());
    assert_eq!(c.refs(x), 11, "each SUBMIT applied once");
}

/// Frames of the largest size, back to back without reading: four
/// SUBMITs of `submit_ops_max` ops, a PING of `body_bytes_max` bytes
/// (`BAD_REQUEST`, the connection stays open), then a header announcing
/// one byte more (`FRAME_TOO_LARGE`, closed). Every op of every SUBMIT
/// is applied.
#[test]
fn largest_frames_back_to_back() {
    let Some(t) = Target::new("refd-largest", 256 * MIB, false) else {
        return;
    };
    let d = Daemon::start(&t, &[]);
    let (mut c, hello) = Raw::hello(&d.socket);
    let s = c.register();
    let x = 1 << 30;
    assert!(matches!(
        c.submit(s, 1, &[data(ACTION_ADD_EXTENT, x, 1)]),
        Reply::Submit(_)
    ));
    let max_ops = hello.submit_ops_max as u64;
    let limit = hello.body_bytes_max;
    let mut burst = Vec::new();
    for b in 0..4u64 {
        let ops: Vec<WireOp> = (0..max_ops)
            .map(|i| data(ACTION_ADD_REF, x, 1_000_000 * (b + 1) + i))
            .collect();
        encode_request(10 + b, &submit(s, 2 + b, &ops), &mut burst);
    }
    let body = vec![0u8; limit as usize];
    encode_frame(Opcode::Ping, 0, 20, &body, &mut burst);
    let too_large = FrameHeader {
        body_bytes: limit + 1,
        ..FrameHeader::for_body(Opcode::Ping.as_u8(), 0, 21, &[])
    };
    burst.extend_from_slice(&too_large.encode());
    let mut writer = c.stream.try_clone().expect("clone");
    let w = std::thread::spawn(move || writer.write_all(&burst));
    let mut got = Vec::new();
    while let Some((id, reply)) = c.try_recv() {
        got.push((id, code(&reply)));
    }
    w.join().unwrap().expect("the burst was read whole");
    got.sort_unstable_by_key(|g| g.0);
    let want: Vec<(u64, Option<ErrorCode>)> = (10..14)
        .map(|id| (id, None))
        .chain([
            (20, Some(ErrorCode::BadRequest)),
            (21, Some(ErrorCode::FrameTooLarge)),
        ])
        .collect();
    assert_eq!(got, want);
    let (mut c, _) = Raw::hello(&d.socket);
    assert_eq!(c.refs(x), 1 + 4 * max_ops as i64);
}

/// Seeds of [`no_space_refusals_and_kill9_are_exactly_once`] CI runs.
const FULL_KILL_SEEDS: u64 = 1;
/// Kills per seed.
const FULL_KILLS: usize = 2;
/// SUBMITs kept in flight on the connection.
const FULL_INFLIGHT: usize = 8;
/// Replies per life before the kill (at most; the region fills on the way).
const FULL_REPLIES_MAX: u64 = 160;

/// A pipelined stream of SUBMITs on a device whose 4 MiB node region
/// fills up, with the daemon killed (-9) twice while SUBMITs are in
/// flight and commits run every 20 ms: allocations of new extents, refs
/// added to live ones, drops (drops-only SUBMITs on a full region). Each
/// extent is in at most one SUBMIT in flight, so the outcome does not
/// depend on their order. After each restart the unanswered SUBMITs are
/// sent again with their request numbers, in order: `DUPLICATE` (applied
/// before the kill), a new reply (applied now) or `NO_SPACE` (never
/// applied); anything else fails. Then, and at the end, LOOKUP of every
/// extent ever named equals the model (acknowledged ops exactly once, no
/// op of a refused SUBMIT), and at the end the daemon stops cleanly and
/// `refctl fsck` finds the model's extents and nothing wrong.
/// `REFD_FULL_KILL_SEEDS=<n>` runs n seeds (1) from
/// `REFD_FULL_KILL_FIRST_SEED` (0), `REFD_FULL_KILL_SEED=<s>` seed s.
#[test]
fn no_space_refusals_and_kill9_are_exactly_once() {
    let var = |name: &str| {
        std::env::var(name).ok().map(|s| {
            s.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} is a number"))
        })
    };
    let seeds: Vec<u64> = match var("REFD_FULL_KILL_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = var("REFD_FULL_KILL_FIRST_SEED").unwrap_or(0);
            (first..first + var("REFD_FULL_KILL_SEEDS").unwrap_or(FULL_KILL_SEEDS)).collect()
        }
    };
    let mut refused = 0;
    for &seed in &seeds {
        let Some(tally) = full_kill_seed(seed) else {
            return;
        };
        eprintln!("seed {seed}: {tally:?}");
        refused += tally.refused;
    }
    assert!(refused > 0, "the node region never filled");
}

/// What one seed of the full-region kill test saw.
#[derive(Debug, Default)]
struct FullTally {
    acknowledged: u64,
    refused: u64,
    drops_only_acknowledged: u64,
    retried_duplicate: u64,
    retried_applied: u64,
    retried_refused: u64,
}

/// The client's state: the acknowledged refs and what is in flight.
struct Full {
    rng: rand::rngs::SmallRng,
    /// Refs by extent and objectid, acknowledged.
    model: std::collections::BTreeMap<u64, std::collections::BTreeMap<u64, i64>>,
    /// Extents some SUBMIT in flight names.
    busy: std::collections::BTreeSet<u64>,
    /// Every bytenr a SUBMIT named.
    named: std::collections::BTreeSet<u64>,
    next_bytenr: u64,
    next_objectid: u64,
    next_request: u64,
    tally: FullTally,
}

impl Full {
    /// A new SUBMIT's ops, naming no busy extent (allocations when
    /// every live extent is busy).
    fn ops(&mut self) -> Vec<WireOp> {
        use rand::Rng;
        let k = self.rng.gen_range(1..=512usize);
        let mut kind = self.rng.gen_range(0..10);
        let idle: Vec<u64> = if kind < 6 {
            Vec::new()
        } else {
            self.model
                .keys()
                .copied()
                .filter(|b| !self.busy.contains(b))
                .collect()
        };
        if idle.is_empty() {
            kind = 0;
        }
        let mut ops = Vec::new();
        if kind < 6 {
            for _ in 0..k {
                self.next_bytenr += 4096;
                self.next_objectid += 1;
                ops.push(data(
                    ACTION_ADD_EXTENT,
                    self.next_bytenr,
                    self.next_objectid,
                ));
            }
        } else if kind < 8 {
            for _ in 0..k.min(idle.len()) {
                let b = idle[self.rng.gen_range(0..idle.len())];
                self.next_objectid += 1;
                ops.push(data(ACTION_ADD_REF, b, self.next_objectid));
            }
        } else {
            let mut taken: std::collections::BTreeMap<(u64, u64), i64> = Default::default();
            for _ in 0..k.min(idle.len()) {
                let b = idle[self.rng.gen_range(0..idle.len())];
                let refs = &self.model[&b];
                let (&o, &n) = refs.iter().nth(self.rng.gen_range(0..refs.len())).unwrap();
                let t = taken.entry((b, o)).or_default();
                if *t < n {
                    *t += 1;
                    ops.push(data(ACTION_DROP_REF, b, o));
                }
            }
        }
        assert!(!ops.is_empty(), "each kind names at least one extent");
        for op in &ops {
            self.busy.insert(op.bytenr);
            self.named.insert(op.bytenr);
        }
        ops
    }

    /// The ops of an acknowledged SUBMIT.
    fn apply(&mut self, ops: &[WireOp]) {
        for op in ops {
            let d = if op.action == ACTION_DROP_REF { -1 } else { 1 };
            let refs = self.model.entry(op.bytenr).or_default();
            *refs.entry(op.k2).or_default() += d;
            refs.retain(|_, n| *n > 0);
            if refs.is_empty() {
                self.model.remove(&op.bytenr);
            }
        }
    }

    /// A SUBMIT's outcome: `applied` or not (refused for space).
    fn answered(&mut self, ops: &[WireOp], applied: bool) {
        if applied {
            self.apply(ops);
            self.tally.acknowledged += 1;
            if ops.iter().all(|op| op.action == ACTION_DROP_REF) {
                self.tally.drops_only_acknowledged += 1;
            }
        } else {
            self.tally.refused += 1;
        }
        for op in ops {
            self.busy.remove(&op.bytenr);
        }
    }

    /// LOOKUP of every extent ever named equals the model.
    fn check(&self, c: &mut Raw, when: &str) {
        let named: Vec<u64> = self.named.iter().copied().collect();
        for chunk in named.chunks(4096) {
            for e in c.lookup(chunk) {
                let want: i64 = self.model.get(&e.bytenr).map_or(0, |r| r.values().sum());
                assert_eq!(e.refs, want, "{when}: extent {}: {e:?}", e.bytenr);
            }
        }
    }
}

/// One seed: `None` if no device could be had.
fn full_kill_seed(seed: u64) -> Option<FullTally> {
    use rand::{Rng, SeedableRng};
    let t = Target::new(&format!("refd-full-kill-{seed}"), 20 << 20, false)?;
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
    let args = ["--commit-interval-ms", "20"];
    let mut full = Full {
        rng: rand::rngs::SmallRng::seed_from_u64(seed),
        model: Default::default(),
        busy: Default::default(),
        named: Default::default(),
        next_bytenr: 1 << 30,
        next_objectid: 0,
        next_request: 1,
        tally: FullTally::default(),
    };
    let mut d = Daemon::start(&t, &args);
    let session = Raw::hello(&d.socket).0.register();
    let mut unanswered: Vec<(u64, Vec<WireOp>)> = Vec::new();
    for life in 0..=FULL_KILLS {
        let (mut c, _) = Raw::hello(&d.socket);
        for (request, ops) in std::mem::take(&mut unanswered) {
            match c.submit(session, request, &ops) {
                Reply::Submit(r) if r.flags & SUBMIT_REPLY_DUPLICATE != 0 => {
                    full.tally.retried_duplicate += 1;
                    full.answered(&ops, true);
                }
                Reply::Submit(_) => {
                    full.tally.retried_applied += 1;
                    full.answered(&ops, true);
                }
                Reply::Error(e) if e.code == ErrorCode::NoSpace => {
                    full.tally.retried_refused += 1;
                    full.answered(&ops, false);
                }
                r => panic!("seed {seed} life {life}: retry of {request}: {r:?}"),
            }
        }
        full.check(&mut c, &format!("seed {seed} after restart {life}"));
        let replies = full.rng.gen_range(FULL_REPLIES_MAX / 4..=FULL_REPLIES_MAX);
        let mut inflight: std::collections::BTreeMap<u64, (u64, Vec<WireOp>)> = Default::default();
        for _ in 0..replies {
            while inflight.len() < FULL_INFLIGHT {
                let ops = full.ops();
                let request = full.next_request;
                full.next_request += 1;
                let id = c.send(&submit(session, request, &ops));
                inflight.insert(id, (request, ops));
            }
            let (id, reply) = c.recv();
            let (request, ops) = inflight.remove(&id).expect("a reply to a SUBMIT sent");
            match reply {
                Reply::Submit(r) if r.flags & SUBMIT_REPLY_DUPLICATE == 0 => {
                    full.answered(&ops, true)
                }
                Reply::Error(e) if e.code == ErrorCode::NoSpace => full.answered(&ops, false),
                r => panic!("seed {seed} life {life}: request {request}: {r:?}"),
            }
        }
        if life < FULL_KILLS {
            d.kill9();
            drop(c);
            unanswered = inflight.into_values().collect();
            unanswered.sort_by_key(|(request, _)| *request);
            d = Daemon::start(&t, &args);
        } else {
            while !inflight.is_empty() {
                let (id, reply) = c.recv();
                let (request, ops) = inflight.remove(&id).expect("a reply to a SUBMIT sent");
                match reply {
                    Reply::Submit(_) => full.answered(&ops, true),
                    Reply::Error(e) if e.code == ErrorCode::NoSpace => full.answered(&ops, false),
                    r => panic!("seed {seed}: request {request}: {r:?}"),
                }
            }
            c.commit();
            full.check(&mut c, &format!("seed {seed} at the end"));
            let st = c.stats();
            assert!(st["failed"].is_null(), "seed {seed}: {st}");
            assert_eq!(st["engine"]["extents"], full.model.len() as u64, "{st}");
        }
    }
    assert!(d.term().success(), "seed {seed}: a clean stop");
    drop(d);
    let mut progress = refd_durable::progress::Progress::new(|_| {});
    let report = refd_ctl::device::fsck(&t.device, &mut progress).expect("fsck");
    assert!(report.clean(), "seed {seed}: fsck: {:?}", report.problems);
    assert_eq!(
        report.extents,
        full.model.len(),
        "seed {seed}: fsck extents"
    );
    Some(full.tally)
}
