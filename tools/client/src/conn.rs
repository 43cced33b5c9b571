//! One connection: the HELLO handshake, a writer shared by the callers,
//! and a reader thread that matches replies to waiting callers by
//! `request_id` (the server may answer in any order).
//!
//! Bounds: at most the server's `in_flight_max` requests are unanswered
//! on a connection ([`Conn::send`] blocks for a permit); a permit is
//! returned only when the reply is read or the connection breaks, also
//! for a caller that stopped waiting, because the server still counts
//! that request. The reader holds one read buffer of
//! [`READ_CHUNK_BYTES`] and a [`FrameDecoder`] limited to the negotiated
//! `body_bytes_max`, so a server cannot make it allocate more.
//!
//! Whatever breaks the stream (EOF, an I/O error, a frame or body the
//! spec does not allow, an error frame that closes) breaks the
//! connection once: every waiting caller is woken with the reason, the
//! socket is shut down, and the client opens a new connection on demand.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use refd_proto::{
    encode_request_message, ErrorBody, ErrorCode, Frame, FrameDecoder, HelloReply, HelloRequest,
    Opcode, Reply, BODY_BYTES_MAX_DEFAULT, ERROR_BODY_FIXED_BYTES, ERROR_MESSAGE_BYTES_MAX,
    HELLO_REPLY_BYTES, OP_BYTES, SUBMIT_FIXED_BYTES, VERSION,
};

use crate::address::{Address, Stream};
use crate::config::ClientConfig;
use crate::error::{Error, Outcome, ProtocolViolation};

/// Bytes the reader thread reads from the socket at once.
pub(crate) const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Largest body of the reply to HELLO: an error with the longest message.
const HELLO_REPLY_BODY_BYTES_MAX: u32 = (ERROR_BODY_FIXED_BYTES + ERROR_MESSAGE_BYTES_MAX) as u32;

const _: () = assert!(HELLO_REPLY_BYTES <= HELLO_REPLY_BODY_BYTES_MAX as usize);

/// Locks, recovering from poison: a panicking caller must not wedge the
/// other callers of the client (the state it guards stays consistent:
/// every update is a single step under the lock).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` until `deadline`; returns the guard and whether the
/// deadline has passed.
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    deadline: Instant,
) -> (MutexGuard<'a, T>, bool) {
    let now = Instant::now();
    if now >= deadline {
        return (guard, true);
    }
    let (g, _) = cv
        .wait_timeout(guard, deadline - now)
        .unwrap_or_else(|e| e.into_inner());
    (g, Instant::now() >= deadline)
}

/// Why a connection broke.
#[derive(Debug, Clone)]
pub(crate) enum Lost {
    /// The server closed it.
    Closed,
    /// Reading or writing failed.
    Io(Arc<io::Error>),
    /// The server sent an error that closes the connection (or an error
    /// about the connection itself, with request id 0).
    Server(ErrorBody),
    /// The server broke the protocol.
    Violation(ProtocolViolation),
    /// The client closed it.
    Shutdown,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Closed => write!(f, "closed by the server"),
            Lost::Io(e) => write!(f, "I/O error: {e}"),
            Lost::Server(e) => write!(f, "server error {}: {}", e.code, e.message),
            Lost::Violation(v) => write!(f, "protocol violation: {v}"),
            Lost::Shutdown => write!(f, "closed by the client"),
        }
    }
}

/// What a caller waiting for a reply gets.
#[derive(Debug)]
pub(crate) enum SlotResult {
    /// The reply (an error frame included).
    Reply(Reply),
    /// The connection broke before the reply came.
    Lost(Lost),
    /// This reply broke the protocol (the connection is broken too).
    Violation(ProtocolViolation),
}

/// Where the reader thread leaves one request's reply.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    result: Mutex<Option<SlotResult>>,
    ready: Condvar,
}

impl Slot {
    fn fill(&self, result: SlotResult) {
        let mut g = lock(&self.result);
        if g.is_none() {
            *g = Some(result);
            drop(g);
            // After the unlock: the woken caller does not wait for it.
            self.ready.notify_all();
        }
    }

    /// The result, or `None` once `deadline` passed without one.
    pub(crate) fn wait(&self, deadline: Instant) -> Option<SlotResult> {
        let mut g = lock(&self.result);
        loop {
            if let Some(r) = g.take() {
                return Some(r);
            }
            let (next, expired) = wait_until(&self.ready, g, deadline);
            g = next;
            if expired && g.is_none() {
                return None;
            }
        }
    }
}

/// Why [`Conn::send`] did not send.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No in-flight permit before the deadline (nothing was sent).
    Timeout,
    /// The connection is broken (nothing was sent on it).
    Lost(Lost),
}

/// Why [`Conn::open`] failed.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Worth another attempt after a pause (no listener yet, `BUSY`,
    /// `SHUTTING_DOWN`, an I/O error).
    Retry(Error),
    /// Will fail again (`AUTH_FAILED`, `UNSUPPORTED_VERSION`, a HELLO
    /// reply that breaks the protocol).
    Fatal(Error),
}

struct Waiter {
    opcode: Opcode,
    slot: Arc<Slot>,
}

#[derive(Default)]
struct ConnState {
    waiters: HashMap<u64, Waiter>,
    in_flight: u32,
    broken: Option<Lost>,
}

/// One open, HELLO'd connection.
pub(crate) struct Conn {
    hello: HelloReply,
    writer: Mutex<Stream>,
    control: Stream,
    state: Mutex<ConnState>,
    permit_freed: Condvar,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("server_id", &self.hello.server_id)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Connects, says HELLO (request id `hello_id`) and starts the reader
    /// thread.
    pub(crate) fn open(
        address: &Address,
        config: &ClientConfig,
        hello_id: u64,
    ) -> Result<(Arc<Conn>, JoinHandle<()>), OpenError> {
        let io_error = |e: io::Error| {
            OpenError::Retry(Error::Connect {
                addr: address.to_string(),
                source: Arc::new(e),
                outcome: Outcome::NotApplied,
            })
        };
        let mut stream = address.connect(config.connect_timeout).map_err(io_error)?;
        stream
            .set_timeouts(Some(config.connect_timeout), Some(config.connect_timeout))
            .map_err(io_error)?;
        let hello = handshake(&mut stream, config, hello_id, &io_error)?;
        // The reader blocks until a reply, EOF or a shutdown; a write
        // blocked for a whole request timeout breaks the connection.
        stream
            .set_timeouts(None, Some(config.request_timeout))
            .map_err(io_error)?;
        let reader = stream.try_clone().map_err(io_error)?;
        let control = stream.try_clone().map_err(io_error)?;
        let conn = Arc::new(Conn {
            hello,
            writer: Mutex::new(stream),
            control,
            state: Mutex::new(ConnState::default()),
            permit_freed: Condvar::new(),
        });
        let for_reader = Arc::clone(&conn);
        let handle = std::thread::Builder::new()
            .name("refd-client-reader".into())
            .spawn(move || for_reader.read_loop(reader))
            .map_err(io_error)?;
        Ok((conn, handle))
    }

    /// The server's HELLO reply on this connection.
    pub(crate) fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// Whether the connection broke.
    pub(crate) fn is_broken(&self) -> bool {
        lock(&self.state).broken.is_some()
    }

    /// Sends one whole request frame (its header carries `request_id`)
    /// once an in-flight permit is free, and returns where its reply will
    /// be left. A failed write breaks the connection, and the slot then
    /// holds [`SlotResult::Lost`].
    pub(crate) fn send(
        &self,
        opcode: Opcode,
        request_id: u64,
        frame: &[u8],
        deadline: Instant,
    ) -> Result<Arc<Slot>, SendError> {
        let slot = Arc::new(Slot::default());
        {
            let mut st = lock(&self.state);
            loop {
                if let Some(lost) = &st.broken {
                    return Err(SendError::Lost(lost.clone()));
                }
                if st.in_flight < self.hello.in_flight_max {
                    break;
                }
                let (next, expired) = wait_until(&self.permit_freed, st, deadline);
                st = next;
                if expired && st.in_flight >= self.hello.in_flight_max {
                    return Err(SendError::Timeout);
                }
            }
            st.in_flight += 1;
            let waiter = Waiter {
                opcode,
                slot: Arc::clone(&slot),
            };
            let previous = st.waiters.insert(request_id, waiter);
            assert!(previous.is_none(), "request id {request_id} reused");
        }
        let written = lock(&self.writer).write_all(frame);
        if let Err(e) = written {
            self.fail(Lost::Io(Arc::new(e)));
        }
        Ok(slot)
    }

    /// Breaks the connection (once): wakes every waiting caller with the
    /// reason and shuts the socket down.
    pub(crate) fn fail(&self, lost: Lost) {
        let (reason, waiters) = {
            let mut st = lock(&self.state);
            let reason = st.broken.get_or_insert(lost).clone();
            st.in_flight = 0;
            (reason, std::mem::take(&mut st.waiters))
        };
        self.permit_freed.notify_all();
        self.control.shutdown();
        for waiter in waiters.into_values() {
            waiter.slot.fill(SlotResult::Lost(reason.clone()));
        }
    }

    fn read_loop(self: Arc<Self>, mut stream: Stream) {
        let mut decoder =
            FrameDecoder::expecting(self.hello.body_bytes_max, refd_proto::Direction::Reply);
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let lost = loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break Lost::Closed,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Lost::Io(Arc::new(e)),
            };
            if let Err(lost) = self.take_frames(&mut decoder, &buf[..n]) {
                break lost;
            }
        };
        self.fail(lost);
    }

    fn take_frames(&self, decoder: &mut FrameDecoder, mut input: &[u8]) -> Result<(), Lost> {
        loop {
            match decoder.decode_from(&mut input) {
                Ok(Some(frame)) => self.deliver(frame)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Lost::Violation(ProtocolViolation::Frame(e))),
            }
        }
    }

    /// Hands one reply to its caller; an error breaks the connection.
    fn deliver(&self, frame: Frame) -> Result<(), Lost> {
        let request_id = frame.header.request_id;
        let waiter = {
            let mut st = lock(&self.state);
            let waiter = st.waiters.remove(&request_id);
            if waiter.is_some() {
                st.in_flight -= 1;
            }
            waiter
        };
        let Some(waiter) = waiter else {
            return Err(unsolicited(&frame));
        };
        self.permit_freed.notify_one();
        match decode_reply(waiter.opcode, &frame) {
            Ok(Reply::Error(body))
                if matches!(body.code, ErrorCode::Busy | ErrorCode::ShuttingDown) =>
            {
                // Not executed: the caller resends it on a new connection.
                let lost = Lost::Server(body);
                waiter.slot.fill(SlotResult::Lost(lost.clone()));
                Err(lost)
            }
            Ok(Reply::Error(body)) if body.code.closes_connection() => {
                waiter
                    .slot
                    .fill(SlotResult::Reply(Reply::Error(body.clone())));
                Err(Lost::Server(body))
            }
            Ok(reply) => {
                waiter.slot.fill(SlotResult::Reply(reply));
                Ok(())
            }
            Err(v) => {
                waiter.slot.fill(SlotResult::Violation(v.clone()));
                Err(Lost::Violation(v))
            }
        }
    }
}

/// A frame for no request in flight: an error about the connection (id
/// 0, e.g. `SHUTTING_DOWN`) or a protocol violation.
fn unsolicited(frame: &Frame) -> Lost {
    if frame.header.opcode == Opcode::Error.as_u8() {
        if let Ok(body) = ErrorBody::decode(&frame.body) {
            return Lost::Server(body);
        }
    }
    Lost::Violation(ProtocolViolation::UnknownRequestId {
        request_id: frame.header.request_id,
    })
}

/// Decodes a reply to a request of `opcode`: that opcode or `ERROR`.
fn decode_reply(opcode: Opcode, frame: &Frame) -> Result<Reply, ProtocolViolation> {
    let got = frame.header.opcode;
    if got != opcode.as_u8() && got != Opcode::Error.as_u8() {
        return Err(ProtocolViolation::WrongOpcode {
            expected: opcode.name(),
            got,
        });
    }
    Reply::decode(got, &frame.body).map_err(ProtocolViolation::Body)
}

/// Sends HELLO and reads its reply, with the socket's timeouts set to
/// the connect timeout.
fn handshake(
    stream: &mut Stream,
    config: &ClientConfig,
    hello_id: u64,
    io_error: &dyn Fn(io::Error) -> OpenError,
) -> Result<HelloReply, OpenError> {
    let fatal = |violation| {
        OpenError::Fatal(Error::Protocol {
            request: "HELLO",
            violation,
        })
    };
    let request =
        HelloRequest::new(VERSION, VERSION, &config.token, &config.name).map_err(|e| {
            OpenError::Fatal(Error::InvalidArgument {
                request: "HELLO",
                reason: e.to_string(),
            })
        })?;
    let mut out = Vec::new();
    encode_request_message(hello_id, &request, &mut out);
    stream.write_all(&out).map_err(io_error)?;
    let frame = read_one_frame(stream, HELLO_REPLY_BODY_BYTES_MAX)
        .map_err(io_error)?
        .map_err(|e| fatal(ProtocolViolation::Frame(e)))?;
    if frame.header.request_id != hello_id {
        return Err(fatal(ProtocolViolation::Mismatch {
            field: "request_id",
            expected: hello_id,
            got: frame.header.request_id,
        }));
    }
    match decode_reply(Opcode::Hello, &frame).map_err(fatal)? {
        Reply::Hello(hello) => {
            check_hello(&hello).map_err(fatal)?;
            Ok(hello)
        }
        Reply::Error(body) => {
            let retry = matches!(body.code, ErrorCode::Busy | ErrorCode::ShuttingDown);
            let e = Error::Server {
                request: "HELLO",
                error: body,
                outcome: Outcome::NotApplied,
            };
            Err(if retry {
                OpenError::Retry(e)
            } else {
                OpenError::Fatal(e)
            })
        }
        other => Err(fatal(ProtocolViolation::WrongOpcode {
            expected: "HELLO",
            got: other.opcode().as_u8(),
        })),
    }
}

/// Reads exactly one frame (never a byte of the next one).
fn read_one_frame(
    stream: &mut Stream,
    body_bytes_max: u32,
) -> io::Result<Result<Frame, refd_proto::FrameError>> {
    let mut decoder = FrameDecoder::expecting(body_bytes_max, refd_proto::Direction::Reply);
    let mut buf = [0u8; 4096];
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => return Ok(Ok(frame)),
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        let want = decoder.wanted().clamp(1, buf.len());
        let n = match stream.read(&mut buf[..want]) {
            // Linux fails a read with a timeout with EINTR after a signal
            // or a stop and continue of the process, even without a
            // handler: read again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the HELLO reply",
            ));
        }
        let taken = decoder.push(&buf[..n]);
        debug_assert_eq!(taken, n);
    }
}

/// The limits a correct server announces (`docs/protocol.md`, "HELLO").
fn check_hello(h: &HelloReply) -> Result<(), ProtocolViolation> {
    let bad = |field, value: u64| Err(ProtocolViolation::BadHello { field, value });
    if h.version != VERSION {
        return bad("version", u64::from(h.version));
    }
    if h.body_bytes_max < BODY_BYTES_MAX_DEFAULT {
        return bad("body_bytes_max", u64::from(h.body_bytes_max));
    }
    let ops_fit = (h.body_bytes_max as usize - SUBMIT_FIXED_BYTES) / OP_BYTES;
    if h.submit_ops_max == 0 || h.submit_ops_max as usize > ops_fit {
        return bad("submit_ops_max", u64::from(h.submit_ops_max));
    }
    if h.in_flight_max == 0 {
        return bad("in_flight_max", 0);
    }
    if h.session_replies_kept == 0 {
        return bad("session_replies_kept", 0);
    }
    Ok(())
}
