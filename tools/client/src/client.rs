//! [`Client`]: the connection it keeps (opened again on demand, with
//! backoff, after it breaks), request ids, and [`Client::call`], the one
//! path every request takes: get a live connection, send, wait for the
//! reply, and resend after a broken connection when that is safe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use refd_proto::{encode_frame, HelloReply, Opcode, Reply, HEADER_BYTES};

use crate::address::Address;
use crate::batch::Batcher;
use crate::config::ClientConfig;
use crate::conn::{lock, wait_until, Conn, Lost, OpenError, SendError, SlotResult};
use crate::error::{Error, Outcome};
use crate::session::Session;

/// How many times one request went out (a resend after a broken
/// connection counts).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Attempts {
    pub(crate) sends: u32,
}

#[derive(Debug)]
struct Link {
    /// The current connection, broken or not; `None` after `close`.
    conn: Option<Arc<Conn>>,
    /// A thread is opening a connection; the others wait for it.
    connecting: bool,
    /// The HELLO reply of the latest connection.
    hello: HelloReply,
    /// The device of the first connection.
    fs_id: [u8; 16],
    closed: bool,
    /// Connections opened so far.
    connections: u64,
}

/// A client of the refd daemon; see the crate documentation. Share it
/// between threads by reference (`&Client`, `Arc<Client>`): every method
/// takes `&self`. Dropping it closes the connection and joins its reader
/// threads.
#[derive(Debug)]
pub struct Client {
    address: Address,
    pub(crate) config: ClientConfig,
    link: Mutex<Link>,
    link_changed: Condvar,
    next_request_id: AtomicU64,
    pub(crate) session: Session,
    /// Held while registering a session implicitly, so that concurrent
    /// callers register one session, not one each.
    pub(crate) register_lock: Mutex<()>,
    pub(crate) batcher: Batcher,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl Client {
    /// Connects to `addr` (`unix:PATH`, `tcp:HOST:PORT` or a path) and
    /// says HELLO, within `config.connect_timeout`. No session is
    /// registered yet: [`register`](Self::register) does, or the first
    /// SUBMIT.
    pub fn connect(addr: &str, config: ClientConfig) -> Result<Client, Error> {
        Client::connect_address(Address::parse(addr)?, config)
    }

    /// [`connect`](Self::connect) to an address already parsed.
    pub fn connect_address(address: Address, config: ClientConfig) -> Result<Client, Error> {
        let (conn, reader) = match Conn::open(&address, &config, 1) {
            Ok(opened) => opened,
            Err(OpenError::Retry(e) | OpenError::Fatal(e)) => return Err(e),
        };
        let hello = *conn.hello();
        Ok(Client {
            address,
            config,
            link: Mutex::new(Link {
                conn: Some(conn),
                connecting: false,
                hello,
                fs_id: hello.fs_id,
                closed: false,
                connections: 1,
            }),
            link_changed: Condvar::new(),
            next_request_id: AtomicU64::new(2),
            session: Session::default(),
            register_lock: Mutex::new(()),
            batcher: Batcher::default(),
            readers: Mutex::new(vec![reader]),
        })
    }

    /// The daemon's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The HELLO reply of the latest connection: the negotiated version
    /// and the server's limits (`body_bytes_max`, `submit_ops_max`,
    /// `in_flight_max`, `barrier_lease_ms`, `session_replies_kept`),
    /// `fs_id` and `server_id` (a new value after a daemon restart).
    pub fn hello(&self) -> HelloReply {
        lock(&self.link).hello
    }

    /// Connections opened so far (1 + reconnects).
    pub fn connections(&self) -> u64 {
        lock(&self.link).connections
    }

    /// Closes the connection and joins the reader threads; calls still
    /// running on other threads return [`Error::Closed`] (the same as
    /// dropping the client).
    pub fn close(self) {}

    pub(crate) fn next_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.config.request_timeout
    }

    /// A live connection, opened (once, by one thread) if the last one
    /// broke.
    fn connection(&self, what: &'static str, deadline: Instant) -> Result<Arc<Conn>, Error> {
        let mut link = lock(&self.link);
        loop {
            if link.closed {
                return Err(Error::Closed);
            }
            if let Some(conn) = link.conn.as_ref().filter(|c| !c.is_broken()) {
                return Ok(Arc::clone(conn));
            }
            if !link.connecting {
                break;
            }
            let (next, expired) = wait_until(&self.link_changed, link, deadline);
            link = next;
            if expired && link.connecting {
                return Err(self.timeout(what, Outcome::NotApplied));
            }
        }
        link.connecting = true;
        drop(link);
        let opened = self.reconnect(deadline);
        let mut link = lock(&self.link);
        link.connecting = false;
        self.link_changed.notify_all();
        let (conn, reader) = opened?;
        let mut readers = lock(&self.readers);
        readers.retain(|h| !h.is_finished());
        readers.push(reader);
        drop(readers);
        let hello = *conn.hello();
        if link.closed || hello.fs_id != link.fs_id {
            conn.fail(Lost::Shutdown);
            return Err(match link.closed {
                true => Error::Closed,
                false => Error::DeviceChanged {
                    old: link.fs_id,
                    new: hello.fs_id,
                },
            });
        }
        link.hello = hello;
        link.conn = Some(Arc::clone(&conn));
        link.connections += 1;
        Ok(conn)
    }

    /// Opens a connection, retrying with backoff until
    /// `reconnect_timeout` (or `deadline`) is over.
    fn reconnect(&self, deadline: Instant) -> Result<(Arc<Conn>, JoinHandle<()>), Error> {
        let budget = deadline.min(Instant::now() + self.config.reconnect_timeout);
        let mut pause = self.config.backoff_min;
        loop {
            match Conn::open(&self.address, &self.config, self.next_id()) {
                Ok(opened) => return Ok(opened),
                Err(OpenError::Fatal(e)) => return Err(e),
                Err(OpenError::Retry(e)) => {
                    if lock(&self.link).closed {
                        return Err(Error::Closed);
                    }
                    if Instant::now() + pause >= budget {
                        return Err(e);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(self.config.backoff_max);
                }
            }
        }
    }

    /// Sends one request and waits for its reply until `deadline`.
    /// After a broken connection the request goes out again on a new one
    /// if `resend` (the caller knows that is safe), at most
    /// `resends_max` times. An error frame is returned as
    /// [`Error::Server`] with outcome `NotApplied` (a SUBMIT reclassifies
    /// it). `attempts` counts the sends.
    pub(crate) fn call(
        &self,
        what: &'static str,
        opcode: Opcode,
        body: &[u8],
        resend: bool,
        deadline: Instant,
        attempts: &mut Attempts,
    ) -> Result<Reply, Error> {
        let mut frame = Vec::with_capacity(HEADER_BYTES + body.len());
        let mut last = Lost::Closed;
        for _round in 0..=self.config.resends_max.saturating_mul(2) {
            let if_sent = match attempts.sends {
                0 => Outcome::NotApplied,
                _ => Outcome::Unknown,
            };
            let conn = self
                .connection(what, deadline)
                .map_err(|e| e.with_outcome(if_sent))?;
            let request_id = self.next_id();
            frame.clear();
            encode_frame(opcode, 0, request_id, body, &mut frame);
            let slot = match conn.send(opcode, request_id, &frame, deadline) {
                Ok(slot) => slot,
                Err(SendError::Timeout) => return Err(self.timeout(what, if_sent)),
                Err(SendError::Lost(lost)) => {
                    last = lost;
                    continue;
                }
            };
            attempts.sends += 1;
            let lost = match slot.wait(deadline) {
                None => return Err(self.timeout(what, Outcome::Unknown)),
                Some(SlotResult::Reply(Reply::Error(error))) => {
                    return Err(Error::Server {
                        request: what,
                        error,
                        outcome: Outcome::NotApplied,
                    })
                }
                Some(SlotResult::Reply(reply)) => return Ok(reply),
                // A server that broke the protocol is not trusted with a
                // resend either: every request in flight on that
                // connection fails (outcome unknown).
                Some(
                    SlotResult::Violation(violation) | SlotResult::Lost(Lost::Violation(violation)),
                ) => {
                    return Err(Error::Protocol {
                        request: what,
                        violation,
                    })
                }
                Some(SlotResult::Lost(lost)) => lost,
            };
            if !resend || attempts.sends > self.config.resends_max {
                return Err(self.lost(what, &lost));
            }
            self.pause_before_resend(attempts.sends, deadline);
            last = lost;
        }
        Err(self.lost(what, &last))
    }

    fn lost(&self, what: &'static str, lost: &Lost) -> Error {
        Error::ConnectionLost {
            request: what,
            addr: self.address.to_string(),
            reason: lost.to_string(),
            outcome: Outcome::Unknown,
        }
    }

    /// The first resend goes at once (a daemon restart is the usual
    /// cause); later ones back off, as reconnects do.
    fn pause_before_resend(&self, sends: u32, deadline: Instant) {
        if sends < 2 {
            return;
        }
        let shift = (sends - 2).min(16);
        let pause = (self.config.backoff_min * (1 << shift)).min(self.config.backoff_max);
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(pause.min(left));
    }
}

impl Client {
    /// A timeout of `what` (after the configured request timeout).
    pub(crate) fn timeout(&self, what: &'static str, outcome: Outcome) -> Error {
        Error::Timeout {
            request: what,
            timeout_ms: u64::try_from(self.config.request_timeout.as_millis()).unwrap_or(u64::MAX),
            outcome,
            submit: None,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let conn = {
            let mut link = lock(&self.link);
            link.closed = true;
            link.conn.take()
        };
        if let Some(conn) = conn {
            conn.fail(Lost::Shutdown);
        }
        self.link_changed.notify_all();
        for reader in lock(&self.readers).drain(..) {
            // A reader that panicked has nothing left to clean up.
            let _ = reader.join();
        }
    }
}
