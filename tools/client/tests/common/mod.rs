//! An in-process fake refd daemon for the client's tests: it listens on
//! a unix socket in a temp dir (or on 127.0.0.1:0), speaks the protocol
//! with refd-proto, keeps sessions and their kept replies as
//! `docs/protocol.md` describes ([`world`]), and can be told to drop
//! connections, delay or reorder replies, restart (new `server_id`, same
//! sessions), refuse connections, or send garbage.
//!
//! Every loop is bounded: threads stop when the fake is dropped (their
//! sockets are shut down), accepting polls a stop flag every 2 ms.

#![allow(dead_code)]

pub mod world;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use refd_client::refd_proto::*;
use refd_client::ClientConfig;

pub use world::{Counters, World, POISON_ROOT};

/// The fake's limits.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub in_flight_max: u32,
    pub session_replies_kept: u32,
    pub submit_ops_max: u32,
    pub token: Vec<u8>,
    pub tcp: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            in_flight_max: 256,
            session_replies_kept: 64,
            submit_ops_max: SUBMIT_OPS_MAX_DEFAULT,
            token: Vec::new(),
            tcp: false,
        }
    }
}

/// What a reply is replaced with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Garbage {
    /// A valid header announcing a body of 1 MiB + 1.
    Oversized,
    /// 64 random bytes.
    RandomBytes,
    /// A well-formed reply for a request id never sent.
    UnknownId,
}

/// Faults the test switches on and off while the fake runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Close the connection on every Nth SUBMIT received (0: never):
    /// alternately after applying it (the reply is lost) and before.
    pub drop_every_submit: u64,
    /// Added to every reply.
    pub reply_delay: Duration,
    /// Added to every SUBMIT reply.
    pub submit_delay: Duration,
    /// A random extra delay up to this per reply: replies out of order.
    pub jitter: Duration,
    /// The next reply is replaced (then this is cleared).
    pub garbage: Option<Garbage>,
    /// Accept and close at once (a daemon that is down).
    pub refuse_connections: bool,
    /// The next request with this opcode (after HELLO) is applied and its
    /// connection closed instead of answered: the reply is lost (then
    /// this is cleared).
    pub lose_reply_of: Option<u8>,
}

#[derive(Debug)]
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Sock> {
        Ok(match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Sock::Unix(s)
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Sock::Tcp(s)
            }
        })
    }
}

/// Per-connection and overall numbers the tests check.
#[derive(Debug, Default, Clone)]
pub struct WireStats {
    pub connections: u64,
    /// Most requests of one connection received and not yet answered.
    pub max_outstanding: usize,
    /// Replies written with a request id lower than an earlier reply's.
    pub out_of_order: u64,
    pub requests: u64,
}

struct Inner {
    config: FakeConfig,
    world: Mutex<World>,
    faults: Mutex<Faults>,
    wire: Mutex<WireStats>,
    server_id: AtomicU64,
    stop: AtomicBool,
    socks: Mutex<Vec<Sock>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    submits_seen: AtomicU64,
}

/// The fake daemon; stops and cleans up when dropped.
pub struct Fake {
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
    pub addr: String,
    dir: Option<PathBuf>,
}

static FAKES: AtomicUsize = AtomicUsize::new(0);

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(FAKES.load(Ordering::Relaxed) as u64);
    h.finish() | 1
}

impl Fake {
    pub fn start(config: FakeConfig) -> Fake {
        let n = FAKES.fetch_add(1, Ordering::Relaxed);
        let (listener, addr, dir) = if config.tcp {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = format!("tcp:{}", l.local_addr().unwrap());
            l.set_nonblocking(true).unwrap();
            (Listener::Tcp(l), addr, None)
        } else {
            let dir = std::env::temp_dir().join(format!(
                "refd-client-test-{}-{n}-{:x}",
                std::process::id(),
                random_u64() & 0xFFFF_FFFF
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("refd.sock");
            let l = UnixListener::bind(&path).unwrap();
            l.set_nonblocking(true).unwrap();
            (
                Listener::Unix(l),
                format!("unix:{}", path.display()),
                Some(dir),
            )
        };
        let inner = Arc::new(Inner {
            world: Mutex::new(World::new(
                config.session_replies_kept as usize,
                config.submit_ops_max,
            )),
            config,
            faults: Mutex::new(Faults::default()),
            wire: Mutex::new(WireStats::default()),
            server_id: AtomicU64::new(random_u64()),
            stop: AtomicBool::new(false),
            socks: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            submits_seen: AtomicU64::new(0),
        });
        let for_accept = Arc::clone(&inner);
        let accept = std::thread::spawn(move || accept_loop(for_accept, listener));
        Fake {
            inner,
            accept: Some(accept),
            addr,
            dir,
        }
    }

    pub fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.inner.faults.lock().unwrap()
    }

    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.inner.world.lock().unwrap()
    }

    pub fn counters(&self) -> Counters {
        self.world().counters.clone()
    }

    pub fn wire(&self) -> WireStats {
        self.inner.wire.lock().unwrap().clone()
    }

    pub fn server_id(&self) -> u64 {
        self.inner.server_id.load(Ordering::Relaxed)
    }

    /// Closes every open connection.
    pub fn drop_connections(&self) {
        for s in self.inner.socks.lock().unwrap().drain(..) {
            s.shutdown();
        }
    }

    /// A daemon restart: a new `server_id`, every connection closed, the
    /// sessions and their kept replies kept (they are durable).
    pub fn restart(&self) {
        self.inner
            .server_id
            .fetch_add(0x1_0000_0001, Ordering::Relaxed);
        self.drop_connections();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        self.drop_connections();
        let threads: Vec<_> = self.inner.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn accept_loop(inner: Arc<Inner>, listener: Listener) {
    while !inner.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok(sock) => {
                if inner.faults.lock().unwrap().refuse_connections {
                    drop(sock);
                    continue;
                }
                inner.wire.lock().unwrap().connections += 1;
                let (Ok(reader), Ok(control)) = (sock.try_clone(), sock.try_clone()) else {
                    continue;
                };
                inner.socks.lock().unwrap().push(control);
                let for_conn = Arc::clone(&inner);
                let t = std::thread::spawn(move || serve(for_conn, reader, sock));
                inner.threads.lock().unwrap().push(t);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// One reply waiting for its time.
struct Outgoing {
    due: Instant,
    seq: u64,
    request_id: u64,
    reply: Reply,
    close_after: bool,
    submit: Option<(u64, u64)>,
}

impl PartialEq for Outgoing {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Outgoing {}
impl PartialOrd for Outgoing {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Outgoing {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// Reads requests and queues replies for the writer thread.
fn serve(inner: Arc<Inner>, mut reader: Sock, writer: Sock) {
    let (tx, rx) = mpsc::channel::<Outgoing>();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let for_writer = (Arc::clone(&inner), Arc::clone(&outstanding));
    let w = std::thread::spawn(move || write_loop(for_writer.0, writer, rx, for_writer.1));
    let mut decoder = FrameDecoder::expecting(BODY_BYTES_MAX_DEFAULT, Direction::Request);
    let mut buf = vec![0u8; 64 * 1024];
    let mut hello_done = false;
    let mut seq = 0u64;
    let mut rng = random_u64();
    'read: loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut input = &buf[..n];
        loop {
            let frame = match decoder.decode_from(&mut input) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let reply = Reply::Error(e.error_body());
                    let out = Outgoing {
                        due: Instant::now(),
                        seq,
                        request_id: e.reply_request_id(),
                        reply,
                        close_after: true,
                        submit: None,
                    };
                    let _ = tx.send(out);
                    break 'read;
                }
            };
            seq += 1;
            let count = outstanding.fetch_add(1, Ordering::SeqCst) + 1;
            {
                let mut wire = inner.wire.lock().unwrap();
                wire.max_outstanding = wire.max_outstanding.max(count);
                wire.requests += 1;
            }
            let Some(out) = handle(&inner, &frame, &mut hello_done, seq, &mut rng) else {
                reader.shutdown();
                break 'read;
            };
            let close = out.close_after;
            if tx.send(out).is_err() || close {
                break 'read;
            }
        }
    }
    drop(tx);
    let _ = w.join();
}

/// The reply to one request; `None`: drop the connection instead.
fn handle(
    inner: &Inner,
    frame: &Frame,
    hello_done: &mut bool,
    seq: u64,
    rng: &mut u64,
) -> Option<Outgoing> {
    let opcode = frame.header.opcode;
    let mut faults = inner.faults.lock().unwrap();
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let jitter_ms = faults.jitter.as_millis() as u64;
    let jitter = Duration::from_millis(if jitter_ms > 0 {
        *rng % (jitter_ms + 1)
    } else {
        0
    });
    let mut due = Instant::now() + faults.reply_delay + jitter;
    let drop_every = faults.drop_every_submit;
    let lose_reply = *hello_done && faults.lose_reply_of == Some(opcode);
    if lose_reply {
        faults.lose_reply_of = None;
    }
    if opcode == Opcode::Submit.as_u8() {
        due += faults.submit_delay;
    }
    drop(faults);
    let mut out = Outgoing {
        due,
        seq,
        request_id: frame.header.request_id,
        reply: Reply::Ping(PingReply::default()),
        close_after: false,
        submit: None,
    };
    if !*hello_done {
        out.reply = hello(inner, opcode, &frame.body, hello_done);
        out.close_after = matches!(&out.reply, Reply::Error(e) if e.code.closes_connection());
        return Some(out);
    }
    let mut world = inner.world.lock().unwrap();
    if opcode == Opcode::Submit.as_u8() {
        out.submit = world.submit_received(&frame.body);
        let n = inner.submits_seen.fetch_add(1, Ordering::Relaxed) + 1;
        if drop_every > 0 && n.is_multiple_of(drop_every) {
            if (n / drop_every).is_multiple_of(2) {
                world.handle(opcode, &frame.body);
            }
            return None;
        }
    }
    out.reply = world.handle(opcode, &frame.body);
    if lose_reply {
        return None;
    }
    Some(out)
}

fn hello(inner: &Inner, opcode: u8, body: &[u8], hello_done: &mut bool) -> Reply {
    if opcode != Opcode::Hello.as_u8() {
        return Reply::Error(ErrorBody::new(ErrorCode::HelloRequired, "HELLO first"));
    }
    let request = match HelloRequest::decode(body) {
        Ok(r) => r,
        Err(e) => return Reply::Error(e.error_body()),
    };
    let Some(version) = request.choose_version(VERSION, VERSION) else {
        return Reply::Error(ErrorBody::unsupported_version(VERSION, VERSION, "v1 only"));
    };
    if !inner.config.token.is_empty() && request.token != inner.config.token {
        return Reply::Error(ErrorBody::new(ErrorCode::AuthFailed, "bad token"));
    }
    *hello_done = true;
    let c = &inner.config;
    Reply::Hello(HelloReply {
        version,
        body_bytes_max: BODY_BYTES_MAX_DEFAULT,
        submit_ops_max: c.submit_ops_max,
        in_flight_max: c.in_flight_max,
        fs_id: *b"refd-fake-device",
        generation: inner.world.lock().unwrap().generation(),
        server_id: inner.server_id.load(Ordering::Relaxed),
        barrier_lease_ms: 30_000,
        session_replies_kept: c.session_replies_kept,
    })
}

/// Writes replies when they are due, in due order (so a jitter reorders
/// them), and replaces one with garbage when told to.
fn write_loop(
    inner: Arc<Inner>,
    mut sock: Sock,
    rx: mpsc::Receiver<Outgoing>,
    outstanding: Arc<AtomicUsize>,
) {
    let mut heap: BinaryHeap<Reverse<Outgoing>> = BinaryHeap::new();
    let mut highest_id = 0u64;
    let mut open = true;
    while open || !heap.is_empty() {
        let wait = heap.peek().map_or(Duration::from_millis(50), |Reverse(o)| {
            o.due.saturating_duration_since(Instant::now())
        });
        if open {
            match rx.recv_timeout(wait) {
                Ok(o) => heap.push(Reverse(o)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        } else {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
        }
        while heap
            .peek()
            .is_some_and(|Reverse(o)| o.due <= Instant::now())
        {
            let Reverse(o) = heap.pop().unwrap();
            if o.request_id < highest_id {
                inner.wire.lock().unwrap().out_of_order += 1;
            }
            highest_id = highest_id.max(o.request_id);
            let bytes = reply_bytes(&inner, &o);
            outstanding.fetch_sub(1, Ordering::SeqCst);
            if let Some((sid, r)) = o.submit {
                inner.world.lock().unwrap().submit_answered(sid, r);
            }
            if sock.write_all(&bytes).is_err() || o.close_after {
                sock.shutdown();
                return;
            }
        }
        if inner.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

fn reply_bytes(inner: &Inner, o: &Outgoing) -> Vec<u8> {
    let garbage = inner.faults.lock().unwrap().garbage.take();
    let mut out = Vec::new();
    match garbage {
        None => encode_reply(o.request_id, &o.reply, &mut out),
        Some(Garbage::Oversized) => {
            let mut h = FrameHeader::for_body(Opcode::Ping.as_u8(), FLAG_REPLY, o.request_id, b"");
            h.body_bytes = BODY_BYTES_MAX_DEFAULT + 1;
            out.extend_from_slice(&h.encode());
        }
        Some(Garbage::RandomBytes) => {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.push(x as u8);
            }
        }
        Some(Garbage::UnknownId) => {
            let reply = Reply::Ping(PingReply::default());
            encode_reply(o.request_id ^ (1 << 60), &reply, &mut out);
        }
    }
    out
}

/// A client configuration with short timeouts for tests.
pub fn test_config() -> ClientConfig {
    let mut c = ClientConfig::default();
    c.name = "test".into();
    c.connect_timeout = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(10);
    c.reconnect_timeout = Duration::from_secs(5);
    c.backoff_min = Duration::from_millis(2);
    c.backoff_max = Duration::from_millis(50);
    c
}
