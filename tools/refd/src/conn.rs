//! One connection: a reader thread that decodes frames and handles each
//! request as it arrives, and a writer thread that sends the replies that
//! must wait, in the order the requests were read, each once it may go (a
//! SUBMIT's once its batch is durable). Between them a bounded queue: at
//! `in_flight_max` replies, or `reply_bytes_max` bytes of them, the reader
//! stops reading the socket until the writer catches up, so neither a slow
//! reader of replies nor a slow device grows the daemon's memory; the
//! client sees TCP (or unix socket) back-pressure.
//!
//! A reply that waits for nothing (LOOKUP, BACKREFS, STATS, a SUBMIT
//! answered when queued, ...; not an error) is written by the reader
//! itself as soon as it is handled: it does not wait behind durable
//! SUBMITs read before it (replies are matched by request id; the
//! protocol promises no order), and it costs no hand-off to the writer
//! thread, a wake-up that takes up to a scheduler tick when the cores are
//! busy. The two threads write whole frames under one lock.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use refd_core::delayed::DelayedRefStore;
use refd_durable::Ticket;
use refd_ioring::log::Lsn;
use refd_proto::{
    encode_reply, Direction, ErrorBody, ErrorCode, Frame, FrameDecoder, Opcode, Reply, FLAG_REPLY,
    LOOKUP_BYTENR_BYTES, LOOKUP_FIXED_BYTES,
};

use crate::config::{FRAME_TIMEOUT, READ_POLL, WRITE_TIMEOUT};
use crate::device::Dev;
use crate::handler::Handler;
use crate::listen::Stream;
use crate::sched::{ReadBoost, ReadPriority, LOOKUP_RT_BYTENRS_MAX};
use crate::server::Shared;

/// What a reply waits for before it is sent.
#[derive(Debug)]
pub enum Wait {
    /// Nothing.
    None,
    /// A batch's ticket.
    Ticket(Ticket<Dev>),
    /// The log up to an LSN (a duplicate's original batch).
    Lsn(Lsn),
}

/// A reply in the queue.
#[derive(Debug)]
pub struct Pending {
    /// The request's id.
    pub request_id: u64,
    /// What it waits for.
    pub wait: Wait,
    /// The reply (sent as an error if the wait fails).
    pub reply: Reply,
    /// Close the connection after sending it.
    pub close: bool,
    /// When the request was read.
    pub received: Instant,
}

impl Pending {
    /// A reply sent as soon as the ones before it.
    pub fn now(request_id: u64, reply: Reply) -> Self {
        Pending {
            request_id,
            wait: Wait::None,
            reply,
            close: false,
            received: Instant::now(),
        }
    }

    /// An error reply (closing the connection if its code does).
    pub fn error(request_id: u64, body: ErrorBody) -> Self {
        let close = body.code.closes_connection();
        Pending {
            request_id,
            wait: Wait::None,
            reply: Reply::Error(body),
            close,
            received: Instant::now(),
        }
    }

    /// A reply sent once `wait` is over.
    pub fn after(request_id: u64, wait: Wait, reply: Reply) -> Self {
        Pending {
            request_id,
            wait,
            reply,
            close: false,
            received: Instant::now(),
        }
    }
}

/// Bytes a reply takes in the queue, about (its body).
fn reply_bytes(r: &Reply) -> usize {
    64 + match r {
        Reply::Lookup(l) => 48 * l.entries.len(),
        Reply::Backrefs(b) => 40 * b.entries.len(),
        Reply::Freed(f) => 32 * f.extents.len(),
        Reply::Stats(s) => s.json.len(),
        Reply::Ping(p) => p.payload.len(),
        Reply::Error(e) => e.message.len(),
        _ => 0,
    }
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Pending>,
    /// [`reply_bytes`] of the queued replies.
    bytes: usize,
    /// The reader stopped: the writer ends once the queue is empty.
    closed: bool,
    /// The writer stopped (write error or a closing reply): the reader
    /// ends too.
    dead: bool,
}

/// The bounded reply queue of one connection.
#[derive(Debug)]
pub struct ReplyQueue {
    state: Mutex<QueueState>,
    cv: Condvar,
    max_items: usize,
    max_bytes: usize,
}

impl ReplyQueue {
    fn new(max_items: usize, max_bytes: usize) -> Self {
        ReplyQueue {
            state: Mutex::new(QueueState::default()),
            cv: Condvar::new(),
            max_items: max_items.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `p`, waiting while the queue is full; false once the writer
    /// is dead. Returns whether it had to wait (back-pressure).
    fn push(&self, p: Pending) -> (bool, bool) {
        let mut st = self.lock();
        let mut waited = false;
        // A reply larger than the byte bound still goes, alone.
        while (st.items.len() >= self.max_items
            || (!st.items.is_empty() && st.bytes + reply_bytes(&p.reply) > self.max_bytes))
            && !st.dead
        {
            waited = true;
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.dead {
            return (false, waited);
        }
        st.bytes += reply_bytes(&p.reply);
        st.items.push_back(p);
        self.cv.notify_all();
        (true, waited)
    }

    fn pop(&self) -> Option<Pending> {
        let mut st = self.lock();
        loop {
            if let Some(p) = st.items.pop_front() {
                st.bytes -= reply_bytes(&p.reply);
                self.cv.notify_all();
                return Some(p);
            }
            if st.closed || st.dead {
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    fn kill(&self) {
        let mut st = self.lock();
        st.dead = true;
        st.items.clear();
        st.bytes = 0;
        self.cv.notify_all();
    }

    fn is_dead(&self) -> bool {
        self.lock().dead
    }
}

/// Asks for the configured time slice on the calling thread (see
/// `sched.rs`); a kernel that refuses it leaves the default, logged once.
fn latency_slice(config: &crate::config::ServeConfig) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if config.latency_slice.is_zero() {
        return;
    }
    if let Err(e) = crate::sched::request_slice(config.latency_slice) {
        WARNED.call_once(|| {
            tracing::warn!(error = %e, "cannot set the request threads' time slice; using the kernel's default");
        });
    }
}

/// Writes one whole frame to the client, or fails (`TimedOut`) once
/// `timeout` has passed since it started: a reply the client does not take
/// in time closes the connection (`docs/protocol.md`, "Transport"). The
/// socket's write timeout, `timeout` too, bounds one `write` call only,
/// and a call that moved a byte returns it and starts a new wait: alone,
/// it let a client that takes a byte now and then hold a reply, and the
/// connection's threads, for ever. So once a write is partial the rest
/// is written against the frame's deadline, and the socket's timeout set
/// back after (the common frame goes in one call, with no extra syscall).
pub(crate) fn write_frame(stream: &mut Stream, frame: &[u8], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut rest = frame;
    let mut shortened = false;
    let written = loop {
        match stream.write(rest) {
            Ok(0) => break Err(ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break Err(ErrorKind::TimedOut.into());
            }
            Err(e) => break Err(e),
        }
        if rest.is_empty() {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(ErrorKind::TimedOut.into());
        }
        shortened = true;
        if let Err(e) = stream.set_write_timeout(Some(left)) {
            break Err(e);
        }
    };
    if shortened {
        stream.set_write_timeout(Some(timeout))?;
    }
    written
}

/// Serves one accepted connection until it ends; returns when both of its
/// threads are done.
pub fn serve<D: DelayedRefStore + 'static>(
    shared: Arc<Shared<D>>,
    stream: Stream,
    peer: String,
    requires_token: bool,
) {
    latency_slice(&shared.config);
    let writer_stream = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot clone the connection's socket");
            return;
        }
    };
    let _ = writer_stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = stream.set_read_timeout(Some(READ_POLL));
    let out = Arc::new(Mutex::new(writer_stream));
    let queue = Arc::new(ReplyQueue::new(
        shared.config.in_flight_max as usize,
        shared.config.reply_bytes_max,
    ));
    let writer = {
        let (shared, queue, out) = (Arc::clone(&shared), Arc::clone(&queue), Arc::clone(&out));
        std::thread::Builder::new()
            .name("refd-conn-w".into())
            .stack_size(256 << 10)
            .spawn(move || write_loop(&shared, &out, &queue))
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot start the connection's writer");
            return;
        }
    };
    read_loop(&shared, stream, &out, &peer, requires_token, &queue);
    queue.close();
    let _ = writer.join();
    tracing::debug!(%peer, "connection closed");
}

/// Why the reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Closed,
    Idle,
    Stalled,
    NoHello,
    Shutdown,
    ReadError,
}

/// The connection's write side: whole frames only, from either thread.
fn lock_out(out: &Mutex<Stream>) -> MutexGuard<'_, Stream> {
    out.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the reader sends `p` itself at once (see the module docs):
/// it waits for nothing, and it is not an error (errors go through the
/// queue, which closes the connection after those that close it).
fn sends_at_once(p: &Pending) -> bool {
    matches!(p.wait, Wait::None) && !p.close && !matches!(p.reply, Reply::Error(_))
}

/// Whether `frame` is a LOOKUP short enough to be served at the real-time
/// priority ceiling ([`ReadBoost`]).
fn short_lookup(frame: &Frame) -> bool {
    frame.header.opcode == Opcode::Lookup.as_u8()
        && frame.body.len() <= LOOKUP_FIXED_BYTES + LOOKUP_RT_BYTENRS_MAX * LOOKUP_BYTENR_BYTES
}

fn read_loop<D: DelayedRefStore + 'static>(
    shared: &Arc<Shared<D>>,
    mut stream: Stream,
    out: &Mutex<Stream>,
    peer: &str,
    requires_token: bool,
    queue: &ReplyQueue,
) {
    let mut decoder = FrameDecoder::expecting(shared.config.frame_bytes_max, Direction::Request);
    let mut handler = Handler::new(Arc::clone(shared), peer.to_string(), requires_token);
    let mut buf = vec![0u8; 64 << 10];
    let mut frame_out = Vec::with_capacity(4096);
    let accepted = Instant::now();
    let mut last_activity = accepted;
    // When the first byte of the frame being read arrived (`None`: the
    // decoder is between frames).
    let mut partial_since: Option<Instant> = None;
    let mut boost = ReadBoost::new(&shared.lookup_rt, refd_core::priority::apply_rt_priority());
    let end = 'conn: loop {
        if shared.stopping() {
            break End::Shutdown;
        }
        if queue.is_dead() {
            break End::Closed;
        }
        // Checked on every pass, not only when a read times out: a client
        // trickling bytes never lets a read time out.
        if !handler.helloed() && accepted.elapsed() > shared.config.hello_timeout {
            break End::NoHello;
        }
        if partial_since.is_some_and(|t| t.elapsed() > FRAME_TIMEOUT) {
            break End::Stalled;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let now = Instant::now();
                if decoder.is_idle() && now - last_activity > shared.config.idle_timeout {
                    break End::Idle;
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break End::ReadError,
        };
        shared.metrics.bytes_in.inc_by(n as u64);
        last_activity = Instant::now();
        if let Some(p) = &shared.resched_poker {
            p.poke();
        }
        let mut input = &buf[..n];
        loop {
            match decoder.decode_from(&mut input) {
                Ok(Some(frame)) => {
                    partial_since = None;
                    let served_at = match boost.before(short_lookup(&frame)) {
                        ReadPriority::Boosted => Some(&shared.metrics.lookup_rt_boosted),
                        ReadPriority::BudgetSpent => Some(&shared.metrics.lookup_rt_budget_spent),
                        ReadPriority::NotShort | ReadPriority::Off => None,
                    };
                    if let Some(counter) = served_at {
                        counter.inc();
                    }
                    let received = Instant::now();
                    let mut pending = handler.handle(frame);
                    pending.received = received;
                    if sends_at_once(&pending) {
                        frame_out.clear();
                        encode_reply(pending.request_id, &pending.reply, &mut frame_out);
                        if write_frame(&mut lock_out(out), &frame_out, WRITE_TIMEOUT).is_err() {
                            queue.kill();
                            break 'conn End::Closed;
                        }
                        shared.metrics.bytes_out.inc_by(frame_out.len() as u64);
                        let seconds = pending.received.elapsed().as_secs_f64();
                        match pending.reply {
                            Reply::Submit(_) => shared.metrics.submit_seconds.observe(seconds),
                            Reply::Lookup(_) => shared.metrics.lookup_seconds.observe(seconds),
                            _ => {}
                        }
                        boost.account();
                        continue;
                    }
                    let close = pending.close;
                    let (queued, waited) = queue.push(pending);
                    if waited {
                        shared.metrics.backpressure_waits.inc();
                    }
                    if !queued || close {
                        break 'conn End::Closed;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let body = e.error_body();
                    tracing::info!(%peer, error = %e, "bad frame; closing the connection");
                    queue.push(Pending::error(e.reply_request_id(), body));
                    break 'conn End::Closed;
                }
            }
        }
        // A frame still partial after this read began in it, or earlier
        // (then `partial_since` was kept: no frame completed since).
        partial_since = if decoder.is_idle() {
            None
        } else {
            partial_since.or(Some(last_activity))
        };
    };
    drop(boost);
    match end {
        End::Idle => tracing::info!(%peer, "idle connection closed"),
        End::Stalled => tracing::info!(%peer, "a frame stalled half sent; connection closed"),
        End::NoHello => {
            shared.metrics.hello_timeouts.inc();
            tracing::info!(%peer, "no HELLO in time (--hello-timeout-ms); connection closed");
        }
        End::Shutdown => {
            // Requests already read are answered; the client is told why
            // the rest is not.
            let body = ErrorBody::new(ErrorCode::ShuttingDown, "refd is shutting down");
            queue.push(Pending::error(0, body));
        }
        _ => {}
    }
}

fn write_loop<D: DelayedRefStore>(shared: &Shared<D>, out: &Mutex<Stream>, queue: &ReplyQueue) {
    latency_slice(&shared.config);
    let mut frame = Vec::with_capacity(4096);
    while let Some(p) = queue.pop() {
        let t0 = Instant::now();
        let reply = match p.wait {
            Wait::None => Ok(()),
            Wait::Ticket(t) => t.wait().map(|_| ()),
            Wait::Lsn(lsn) => shared.engine.wait_durable(lsn),
        };
        if t0.elapsed() > std::time::Duration::from_millis(5) {
            tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "slow durable wait");
        }
        let reply = match reply {
            Ok(()) => p.reply,
            Err(failure) => Reply::Error(crate::handler::failed(&failure)),
        };
        // The one place error frames are counted: every one the
        // connection sends passes here.
        if let Reply::Error(e) = &reply {
            shared.metrics.error(e.code.name());
        }
        frame.clear();
        encode_reply(p.request_id, &reply, &mut frame);
        debug_assert!(frame[7] & FLAG_REPLY != 0);
        if write_frame(&mut lock_out(out), &frame, WRITE_TIMEOUT).is_err() {
            break;
        }
        shared.metrics.bytes_out.inc_by(frame.len() as u64);
        if matches!(reply, Reply::Submit(_)) {
            let seconds = p.received.elapsed().as_secs_f64();
            shared.metrics.submit_seconds.observe(seconds);
        }
        if p.close {
            // Closing after an error: shut our side, then take what the
            // client still sends for a moment, so that the close does not
            // turn into a reset that loses the error frame.
            linger(&mut lock_out(out));
            break;
        }
    }
    queue.kill();
    lock_out(out).shutdown();
}

/// Half-closes `stream` and reads (and drops) what arrives for up to a
/// second, until the peer closes too.
pub fn linger(stream: &mut Stream) {
    stream.shutdown_write();
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(100)));
    let until = Instant::now() + std::time::Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    while Instant::now() < until {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering;

    /// A client that takes a byte of a reply now and then does not hold it
    /// (and the connection's two threads) past the timeout. With the
    /// socket's write timeout alone, each `write` that moved a byte
    /// returned it and started a new wait: the frame below took as long
    /// as the client kept trickling (5 s here, for ever in general), and
    /// a client that stopped reading was dropped 30 to 60 s later.
    #[test]
    fn a_reply_taken_a_byte_at_a_time_times_out() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let timeout = Duration::from_millis(500);
        server.set_write_timeout(Some(timeout)).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = Arc::clone(&done);
        let trickle = std::thread::spawn(move || {
            let start = Instant::now();
            let mut byte = [0u8; 1];
            while start.elapsed() < Duration::from_secs(5) && !stop.load(Ordering::Relaxed) {
                if client.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut server = Stream::Unix(server);
        let frame = vec![7u8; 4 << 20];
        let start = Instant::now();
        let written = write_frame(&mut server, &frame, timeout);
        let took = start.elapsed();
        done.store(true, Ordering::Relaxed);
        server.shutdown();
        trickle.join().unwrap();
        assert_eq!(
            written.map_err(|e| e.kind()),
            Err(ErrorKind::TimedOut),
            "a 4 MiB frame taken a byte every 20 ms"
        );
        assert!(took < Duration::from_secs(2), "the write took {took:?}");
    }

    /// A frame the client takes at once is written whole, and the next one
    /// too (the write timeout is the same after).
    #[test]
    fn a_reply_taken_at_once_is_written() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut server = Stream::Unix(server);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all
        });
        let frame: Vec<u8> = (0..(1u32 << 20)).map(|i| i as u8).collect();
        write_frame(&mut server, &frame, Duration::from_secs(10)).unwrap();
        write_frame(&mut server, b"next", Duration::from_secs(10)).unwrap();
        server.shutdown();
        let all = reader.join().unwrap();
        assert_eq!(all.len(), frame.len() + 4);
        assert!(all[..frame.len()] == frame[..] && &all[frame.len()..] == b"next");
    }
}
