//! refd-client: a blocking client of the refd daemon, speaking
//! `docs/protocol.md` through [`refd_proto`]. Plain std sockets and
//! threads, no async runtime.
//!
//! ```no_run
//! use refd_client::{Client, ClientConfig, SubmitOptions, WireOp, ACTION_ADD_REF};
//!
//! let mut config = ClientConfig::default();
//! config.name = "example".into();
//! let client = Client::connect("unix:/run/refd.sock", config)?;
//! println!("server {:#x}, {} ops per SUBMIT", client.hello().server_id,
//!          client.hello().submit_ops_max);
//!
//! // One atomic batch, exactly once, durable when this returns.
//! let op = WireOp::data_ref(ACTION_ADD_REF, 0x10_0000, 4096, 5, 257, 0);
//! let reply = client.submit(&[op], SubmitOptions::default())?;
//! println!("logged at lsn {}", reply.lsn);
//!
//! // Or one op per call from many threads: the client coalesces them.
//! std::thread::scope(|s| {
//!     for t in 0..64u64 {
//!         let client = &client;
//!         s.spawn(move || {
//!             let op = WireOp::data_ref(ACTION_ADD_REF, 0x20_0000 + t * 4096, 4096, 5, 258, 0);
//!             client.add(op).map(|r| r.lsn)
//!         });
//!     }
//! });
//! let counts = client.lookup(&[0x10_0000])?;
//! assert_eq!(counts.len(), 1);
//! # Ok::<(), refd_client::Error>(())
//! ```
//!
//! # Exactly once
//!
//! Every SUBMIT carries the client's session id and a request number
//! that rises with each new SUBMIT of the session ([`Client::register`]
//! registers a session; the first SUBMIT does it if none is). The daemon
//! keeps the replies of the session's last `session_replies_kept`
//! SUBMITs, durably with the batches, so a SUBMIT sent again with the
//! same session, number and ops is never applied twice: if it was
//! applied, the stored reply comes back (flag `DUPLICATE`).
//!
//! - **Built in:** when the connection breaks (the daemon restarted,
//!   closed the connection, or a frame was lost) the client reconnects
//!   with backoff for up to `reconnect_timeout`, says HELLO again
//!   (`server_id` may change; `fs_id` must not, else
//!   [`Error::DeviceChanged`] and nothing is resent), and every caller
//!   whose SUBMIT is unanswered sends it again with the same number.
//!   Other requests are resent where that is harmless (all but
//!   BARRIER_ACQUIRE; see the protocol's "Retrying other requests").
//! - **Unknown outcome:** when a call gives up (the request timeout
//!   passed, or the connection could not be restored in time), its error
//!   says whether the SUBMIT may have been applied:
//!   [`Error::outcome`] is [`Outcome::NotApplied`] (it was never sent, or
//!   the server refused it) or [`Outcome::Unknown`]. For a timeout the
//!   error carries the [`SubmitTicket`]: [`Client::resubmit`] with the
//!   same ops is exactly once, and answers the question.
//! - **Window:** at most `session_replies_kept` SUBMITs of the session
//!   are unanswered at once (by request number: a new number is handed
//!   out only while every unanswered one is above it minus
//!   `session_replies_kept`); a caller beyond blocks. So a resend is
//!   always answered from the kept replies, never `REQUEST_TOO_OLD`.
//! - **Eviction:** a session evicted by the daemon (`SESSION_EVICTED`) is
//!   replaced by a new one automatically when the SUBMIT that met it had
//!   been sent once (so nothing was applied); after a resend the outcome
//!   is unknown and the error says so.
//!
//! # After a client crash
//!
//! The request numbers live in this process. A process that crashes with
//! SUBMITs unanswered cannot know their outcome from memory, and must
//! not reuse its old session blindly. Two ways (the protocol's "After a
//! client crash"):
//!
//! 1. **Persist before sending.** Use [`Client::submit_recorded`]: its
//!    callback gets the [`SubmitTicket`] (session id, request number)
//!    before anything is sent; store it with the ops. After a restart,
//!    [`Client::resume_session`] with that session and a number above
//!    every recorded one, then [`Client::resubmit`] each recorded SUBMIT
//!    whose reply was not recorded: exactly once. (Within
//!    `session_replies_kept` SUBMITs; older ones answer `REQUEST_TOO_OLD`.)
//! 2. **Start afresh and reconcile.** Register a new session (a new
//!    client does that by itself) and find out what the unanswered
//!    SUBMITs did with [`Client::lookup`] / [`Client::backrefs`] of the
//!    extents they touched: a SUBMIT is atomic, applied entirely or not
//!    at all.
//!
//! # Threading model
//!
//! A [`Client`] is `Send + Sync`; share it by reference. Each connection
//! has one reader thread, which reads every reply and hands it to the
//! caller waiting for its `request_id` (replies may come in any order);
//! callers write their own requests under one writer lock and then block
//! on their own reply slot until the request timeout. So many requests
//! are in flight on one connection (pipelining) without a thread per
//! request. [`Client::add`] uses no extra thread either: a waiting
//! caller leads the next coalesced batch. Dropping the client closes the
//! connection and joins the reader threads.
//!
//! # Bounds
//!
//! - requests in flight per connection: the server's `in_flight_max`
//!   (callers block beyond it; a permit comes back when the reply is read
//!   or the connection breaks, even for a caller that stopped waiting);
//! - unanswered SUBMITs per session: `session_replies_kept` (above);
//! - coalesced SUBMITs in flight: `batches_in_flight_max`; ops waiting
//!   to be coalesced: `add_queue_ops_max` (callers block beyond);
//! - ops per SUBMIT: `submit_ops_max` (larger explicit batches are
//!   refused, never split: a SUBMIT is atomic);
//! - replies: the reader never accepts a frame above the negotiated
//!   `body_bytes_max` (a larger one, or any frame or body the spec does
//!   not allow, is [`Error::Protocol`] and closes the connection) and
//!   reads through one buffer of 64 KiB;
//! - time: every call ends by `request_timeout` (plus at most one
//!   connect attempt), reconnects by `reconnect_timeout`, resends after
//!   `resends_max`.

mod address;
mod api;
mod batch;
mod client;
mod config;
mod conn;
mod error;
mod session;
mod submit;
mod token;

pub use address::{Address, Stream};
pub use api::{Backrefs, FreedCursor, BACKREFS_COLLECT_MAX};
pub use client::Client;
pub use config::ClientConfig;
pub use error::{Error, Outcome, ProtocolViolation, SubmitTicket};
pub use submit::SubmitOptions;
pub use token::{read_token_file, TokenFileError};

pub use refd_proto;
pub use refd_proto::{
    BackrefEntry, BackrefKey, BackrefsReply, BarrierAcquireReply, CommitReply, ErrorBody,
    ErrorCode, ExtentOpKey, FreedExtent, FreedReply, FreedSubscribeReply, HelloReply, LookupEntry,
    OpErrorCode, SubmitReply, WireOp, ACTION_ADD_EXTENT, ACTION_ADD_REF, ACTION_DROP_REF,
    ACTION_UPDATE_HEAD, SUBMIT_REPLY_DUPLICATE, SUBMIT_REPLY_DURABLE,
};
