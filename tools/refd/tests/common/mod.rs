//! What the daemon tests share: a device (a direct-io loop device when
//! one can be had, else an O_DIRECT file; cleaned up on drop), the daemon
//! as a real process, and a raw protocol client written against
//! `docs/protocol.md` with refd-proto's codec only.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refd_durable::{DurableEngine, FormatOptions};
use refd_ioring::test_support::{LoopDevice, Scratch};
use refd_ioring::{UringConfig, UringStorage};
use refd_proto::*;

/// A device for one test, formatted.
pub struct Target {
    // Field order: the loop device is detached before the scratch dir goes.
    pub loop_dev: Option<LoopDevice>,
    pub scratch: Scratch,
    pub device: PathBuf,
}

impl Target {
    /// A `size`-byte device: a loop device if possible, else a file.
    pub fn new(label: &str, size: u64, want_loop: bool) -> Option<Target> {
        let scratch = Scratch::new(label)?;
        let loop_dev = if want_loop {
            LoopDevice::attach(&scratch, "dev.img", size)
        } else {
            None
        };
        let device = match &loop_dev {
            Some(l) => l.path().to_path_buf(),
            None => {
                let p = scratch.path().join("refd.img");
                let f = std::fs::File::create(&p).expect("create device file");
                f.set_len(size).expect("size device file");
                p
            }
        };
        let storage =
            Arc::new(UringStorage::open(&device, 0, UringConfig::default()).expect("open"));
        DurableEngine::format(&storage, FormatOptions::default()).expect("format");
        drop(storage);
        Some(Target {
            loop_dev,
            scratch,
            device,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.scratch.path().join("refd.sock")
    }
}

/// The daemon as a child process.
pub struct Daemon {
    pub child: Child,
    pub ready: String,
    pub socket: PathBuf,
    pub stderr: PathBuf,
}

impl Daemon {
    /// Starts `refd serve` on `target` with extra `args`, waits for its
    /// ready line (at most 60 s).
    pub fn start(target: &Target, args: &[&str]) -> Daemon {
        let socket = target.socket();
        // One log per start: a daemon restarted on the same target keeps
        // the log of the one before (the name was the pid, in effect).
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = target
            .scratch
            .path()
            .join(format!("refd-{}-{n}.log", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_refd"))
            .arg("serve")
            .arg("--device")
            .arg(&target.device)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(if args.contains(&"--metrics") {
                &[][..]
            } else {
                &["--metrics", "off"][..]
            })
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn refd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let ready = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&stderr).unwrap_or_default();
                panic!("refd did not become ready:\n{log}");
            }
        };
        assert!(ready.starts_with("refd ready"), "{ready}");
        Daemon {
            child,
            ready,
            socket,
            stderr,
        }
    }

    /// SIGKILL, reaped.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then its exit status (at most 60 s).
    pub fn term(&mut self) -> ExitStatus {
        signal(&self.child, libc::SIGTERM);
        wait_bounded(&mut self.child, Duration::from_secs(60), "refd's stop")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Resident memory of the daemon (bytes).
    pub fn rss_bytes(&self) -> u64 {
        refd::metrics::resident_bytes(Some(self.child.id())).unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let exited = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- refd had exited before the end of the test: {exited:?}");
            eprintln!("--- refd log ({}):\n{}", self.stderr.display(), self.log());
        }
    }
}

/// Waits for `child` at most `limit`; past it, kills it and panics naming
/// `what`.
pub fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} ran over {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `tcp:127.0.0.1:PORT` listener a ready line names, as `HOST:PORT`.
pub fn tcp_listener(ready: &str) -> String {
    let at = ready
        .find("tcp:127.0.0.1:")
        .expect("a TCP listener in the ready line")
        + "tcp:".len();
    ready[at..]
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .next()
        .expect("listener")
        .to_string()
}

/// The port of the `tcp:127.0.0.1:PORT` listener a ready line names.
pub fn tcp_port(ready: &str) -> u16 {
    tcp_listener(ready)
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no TCP port in {ready}"))
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// A HELLO for protocol version 1 without a token, named `name`.
pub fn hello_request(name: &str) -> Request {
    Request::Hello(HelloRequest {
        version_min: 1,
        version_max: 1,
        token: Vec::new(),
        name: name.into(),
    })
}

/// A raw protocol client over a unix socket.
pub struct Raw {
    pub stream: UnixStream,
    decoder: FrameDecoder,
    next_id: u64,
    buf: Vec<u8>,
    /// Bytes read but not yet decoded.
    rest: Vec<u8>,
}

impl Raw {
    pub fn connect(socket: &Path) -> Raw {
        let stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Raw {
            stream,
            decoder: FrameDecoder::expecting(BODY_BYTES_MAX_DEFAULT, Direction::Reply),
            next_id: 1,
            buf: vec![0; 64 << 10],
            rest: Vec::new(),
        }
    }

    /// Connects and says HELLO.
    pub fn hello(socket: &Path) -> (Raw, HelloReply) {
        let mut r = Raw::connect(socket);
        match r.call(&hello_request("test")) {
            Reply::Hello(h) => (r, h),
            other => panic!("{other:?}"),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends a request; returns its id, and whether the whole frame was
    /// written (an error: the connection broke, e.g. a daemon killed by
    /// the test; whether the daemon read the request is unknown).
    pub fn try_send(&mut self, request: &Request) -> (u64, std::io::Result<()>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = Vec::new();
        encode_request(id, request, &mut frame);
        (id, self.stream.write_all(&frame))
    }

    /// Sends a request; returns its id.
    pub fn send(&mut self, request: &Request) -> u64 {
        let (id, written) = self.try_send(request);
        written.expect("send");
        id
    }

    /// The next reply frame (panics on a timeout or a closed socket).
    pub fn recv(&mut self) -> (u64, Reply) {
        self.try_recv().expect("a reply")
    }

    /// The next reply, or `None` once the server closed the connection.
    pub fn try_recv(&mut self) -> Option<(u64, Reply)> {
        loop {
            let mut input = &self.rest[..];
            let frame = self
                .decoder
                .decode_from(&mut input)
                .expect("valid reply frame");
            let consumed = self.rest.len() - input.len();
            self.rest.drain(..consumed);
            if let Some(f) = frame {
                let reply = Reply::decode(f.header.opcode, &f.body).expect("reply body");
                return Some((f.header.request_id, reply));
            }
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => return None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
                Ok(n) => n,
            };
            self.rest.extend_from_slice(&self.buf[..n]);
        }
    }

    pub fn call(&mut self, request: &Request) -> Reply {
        let id = self.send(request);
        let (rid, reply) = self.recv();
        assert_eq!(rid, id, "{reply:?}");
        reply
    }

    pub fn register(&mut self) -> u64 {
        match self.call(&Request::Register(RegisterRequest)) {
            Reply::Register(r) => r.session_id,
            other => panic!("{other:?}"),
        }
    }

    pub fn submit(&mut self, session: u64, request: u64, ops: &[WireOp]) -> Reply {
        self.call(&submit(session, request, ops))
    }

    pub fn lookup(&mut self, bytenrs: &[u64]) -> Vec<LookupEntry> {
        match self.call(&Request::Lookup(
            LookupRequest::new(bytenrs.to_vec()).unwrap(),
        )) {
            Reply::Lookup(l) => l.entries,
            other => panic!("{other:?}"),
        }
    }

    pub fn refs(&mut self, bytenr: u64) -> i64 {
        self.lookup(&[bytenr])[0].refs
    }

    pub fn commit(&mut self) -> CommitReply {
        match self.call(&Request::Commit(CommitRequest)) {
            Reply::Commit(c) => c,
            other => panic!("{other:?}"),
        }
    }

    pub fn stats(&mut self) -> serde_json::Value {
        match self.call(&Request::Stats(StatsRequest)) {
            Reply::Stats(s) => serde_json::from_str(&s.json).expect("stats JSON"),
            other => panic!("{other:?}"),
        }
    }
}

pub fn submit(session: u64, request: u64, ops: &[WireOp]) -> Request {
    Request::Submit(SubmitRequest {
        session_id: session,
        request_number: request,
        flags: 0,
        ops: ops.to_vec(),
    })
}

/// A data ref op on extent `bytenr` from inode `objectid`.
pub fn data(action: u8, bytenr: u64, objectid: u64) -> WireOp {
    WireOp::data_ref(action, bytenr, 4096, 5, objectid, 0)
}

/// The error code of a reply, if it is an error.
pub fn code(r: &Reply) -> Option<ErrorCode> {
    match r {
        Reply::Error(e) => Some(e.code),
        _ => None,
    }
}
