//! The client's errors: one enum, because every request can fail the
//! same ways (connection, timeout, server error, protocol violation),
//! with [`Error::outcome`] telling whether a SUBMIT may have been applied.

use std::io;
use std::sync::Arc;

use refd_proto::{BodyError, ErrorBody, ErrorCode, FrameError, INDEX_NONE};

/// What a failed request did on the server, as far as the client knows.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Certainly not executed (for a SUBMIT: nothing was applied).
    NotApplied,
    /// May or may not have been executed: the reply was lost, the wait
    /// timed out, or the server cannot tell. For a SUBMIT, retry it with
    /// [`Client::resubmit`](crate::Client::resubmit) (same session, same
    /// request number, same ops: exactly once) or reconcile by LOOKUP.
    Unknown,
}

/// The identity of one SUBMIT: retrying it with the same ops is exactly
/// once (`docs/protocol.md`, "Exactly once").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubmitTicket {
    /// The session.
    pub session_id: u64,
    /// The request number within the session.
    pub request_number: u64,
}

/// How the server broke the protocol. The connection is closed when one
/// is seen (its byte stream can no longer be trusted).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// A frame failed the header or body checks (bad magic, checksum,
    /// flags, a body above the negotiated `body_bytes_max`).
    #[error("bad frame: {0}")]
    Frame(FrameError),
    /// A reply body the spec does not allow.
    #[error("bad reply body: {0}")]
    Body(BodyError),
    /// A reply whose opcode is neither the request's nor `ERROR`.
    #[error("reply opcode {got:#04x} to a {expected} request")]
    WrongOpcode {
        /// The request's opcode name.
        expected: &'static str,
        /// The opcode received.
        got: u8,
    },
    /// A reply to a request id that is not in flight.
    #[error("reply to request id {request_id}, which is not in flight")]
    UnknownRequestId {
        /// The id received.
        request_id: u64,
    },
    /// A reply field that does not match its request.
    #[error("reply field {field} is {got}, expected {expected}")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// What the request implies.
        expected: u64,
        /// What the reply says.
        got: u64,
    },
    /// A HELLO reply announcing a value the spec does not allow.
    #[error("HELLO reply: {field} = {value} is not allowed")]
    BadHello {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// Every error of the client.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The address text is not `unix:PATH`, `tcp:HOST:PORT` or a path.
    #[error("bad address {addr:?}: {reason}")]
    Address {
        /// The text given.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Could not (re)connect and HELLO within the deadline.
    #[error("cannot connect to {addr}: {source} (outcome {outcome:?})")]
    Connect {
        /// The daemon's address.
        addr: String,
        /// The last failure.
        #[source]
        source: Arc<io::Error>,
        /// Of the request that needed the connection.
        outcome: Outcome,
    },
    /// The connection broke under a request the client does not resend
    /// by itself (BARRIER_ACQUIRE), or broke too many times in a row.
    #[error("{request}: connection to {addr} lost: {reason} (outcome {outcome:?})")]
    ConnectionLost {
        /// The request.
        request: &'static str,
        /// The daemon's address.
        addr: String,
        /// Why it broke.
        reason: String,
        /// Of the request.
        outcome: Outcome,
    },
    /// No reply within the request timeout.
    #[error("{request}: no reply within {timeout_ms} ms (outcome {outcome:?})")]
    Timeout {
        /// The request.
        request: &'static str,
        /// The request timeout that expired.
        timeout_ms: u64,
        /// `NotApplied` if it was never sent, else `Unknown`.
        outcome: Outcome,
        /// For a SUBMIT that may have been sent: what to resubmit.
        submit: Option<SubmitTicket>,
    },
    /// The server answered with an error frame.
    #[error("{request}: {}{}: {}{}", error.code.name(), subcode_text(error), error.message, outcome_text(*outcome))]
    Server {
        /// The request.
        request: &'static str,
        /// The error frame's body: code, subcode, index, detail, message.
        error: ErrorBody,
        /// `Unknown` when the error does not prove that nothing happened
        /// (`FAILED`, `INTERNAL`, `REQUEST_TOO_OLD`, or a session error
        /// answering a resent SUBMIT).
        outcome: Outcome,
    },
    /// The server broke the protocol (see [`ProtocolViolation`]).
    #[error("{request}: protocol violation by the server: {violation}")]
    Protocol {
        /// The request (or `"connection"`).
        request: &'static str,
        /// What was wrong.
        violation: ProtocolViolation,
    },
    /// After a reconnect the daemon serves another device: the session
    /// and its request numbers mean nothing there, so nothing is resent.
    #[error("the daemon now serves another device: fs_id {old:02x?} before, {new:02x?} now")]
    DeviceChanged {
        /// The device of the first connection.
        old: [u8; 16],
        /// The device now.
        new: [u8; 16],
    },
    /// A request the client refuses to send (empty, over a limit).
    #[error("{request}: invalid argument: {reason}")]
    InvalidArgument {
        /// The request.
        request: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The `record` callback of [`Client::submit_recorded`](crate::Client::submit_recorded)
    /// failed; the SUBMIT was not sent.
    #[error("SUBMIT not sent: recording its ticket failed: {source}")]
    Record {
        /// The callback's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The client is shutting down.
    #[error("the client is closed")]
    Closed,
}

impl Error {
    /// Whether the request may have been executed.
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::Connect { outcome, .. }
            | Error::ConnectionLost { outcome, .. }
            | Error::Timeout { outcome, .. }
            | Error::Server { outcome, .. } => *outcome,
            Error::Protocol { .. } => Outcome::Unknown,
            Error::Address { .. }
            | Error::DeviceChanged { .. }
            | Error::InvalidArgument { .. }
            | Error::Record { .. }
            | Error::Closed => Outcome::NotApplied,
        }
    }

    /// The server's error body, for [`Error::Server`].
    pub fn server_error(&self) -> Option<&ErrorBody> {
        match self {
            Error::Server { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The server's error code, for [`Error::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        self.server_error().map(|e| e.code)
    }

    /// For a SUBMIT refused with `NO_SPACE` (nothing of it applied: the
    /// daemon's node region cannot be sure to hold its commit), the free
    /// nodes of 16 KiB the daemon reported. The daemon goes on serving;
    /// the way out is a larger device (`refd serve --grow`) or drops.
    pub fn no_space_free_nodes(&self) -> Option<u64> {
        let e = self.server_error()?;
        (e.code == ErrorCode::NoSpace).then_some(e.detail)
    }

    /// The index of the op an `INVALID_OP` or `REFUSED` names.
    pub(crate) fn op_index(&self) -> Option<usize> {
        let e = self.server_error()?;
        let names_an_op = matches!(e.code, ErrorCode::InvalidOp | ErrorCode::Refused);
        (names_an_op && e.index != INDEX_NONE).then_some(e.index as usize)
    }

    /// The same error with another outcome (connection errors are
    /// created without knowing whether the request had been sent).
    pub(crate) fn with_outcome(self, new: Outcome) -> Self {
        match self {
            Error::Connect {
                addr,
                source,
                outcome: _,
            } => Error::Connect {
                addr,
                source,
                outcome: new,
            },
            Error::Timeout {
                request,
                timeout_ms,
                submit,
                outcome: _,
            } => Error::Timeout {
                request,
                timeout_ms,
                outcome: new,
                submit,
            },
            other => other,
        }
    }
}

/// The outcome of a SUBMIT answered with this error code, `resent` when
/// the same request number went out more than once.
pub(crate) fn submit_error_outcome(code: ErrorCode, resent: bool) -> Outcome {
    match code {
        ErrorCode::SessionUnknown | ErrorCode::SessionEvicted if resent => Outcome::Unknown,
        ErrorCode::RequestTooOld | ErrorCode::Failed | ErrorCode::Internal => Outcome::Unknown,
        _ => Outcome::NotApplied,
    }
}

/// ` (op N: SUBCODE)` for an error about one op of a SUBMIT.
fn subcode_text(e: &ErrorBody) -> String {
    let mut out = String::new();
    if let Some(code) = e.op_error() {
        out.push_str(&format!("/{}", code.name()));
    }
    if e.index != refd_proto::INDEX_NONE {
        out.push_str(&format!(" (op {})", e.index));
    }
    out
}

fn outcome_text(o: Outcome) -> &'static str {
    match o {
        Outcome::NotApplied => "",
        Outcome::Unknown => " (outcome unknown: the request may have been applied)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_is_typed_and_applied_nothing() {
        let server = |code: ErrorCode| Error::Server {
            request: "SUBMIT",
            error: ErrorBody::new(code, "node region full").with_detail(186),
            outcome: submit_error_outcome(code, false),
        };
        let e = server(ErrorCode::NoSpace);
        assert_eq!(e.no_space_free_nodes(), Some(186));
        assert_eq!(e.code(), Some(ErrorCode::NoSpace));
        assert_eq!(e.outcome(), Outcome::NotApplied);
        assert!(e.to_string().contains("NO_SPACE"), "{e}");
        assert_eq!(server(ErrorCode::Failed).no_space_free_nodes(), None);
    }
}
