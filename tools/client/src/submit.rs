//! SUBMIT, exactly once.
//!
//! A SUBMIT gets the next request number of the session (waiting while
//! the window is full, see `session`), goes out, and is resent with the
//! same session, number and ops after every broken connection until it
//! is answered or the request timeout passes: the server answers a
//! number it already applied with the stored reply (`DUPLICATE`), so a
//! resend is never applied twice. A timeout returns the
//! [`SubmitTicket`] so that the caller can resend it later with
//! [`Client::resubmit`].

use std::io;
use std::sync::Arc;
use std::time::Instant;

use refd_proto::{
    encode_submit, ErrorCode, Opcode, Reply, SubmitReply, WireOp, SUBMIT_NO_WAIT, SUBMIT_STAMP_SEQ,
};

use crate::client::{Attempts, Client};
use crate::error::{submit_error_outcome, Error, Outcome, ProtocolViolation, SubmitTicket};
use crate::session::AllocateError;

/// Options of an explicit SUBMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubmitOptions {
    /// Reply once the batch is queued (visible to LOOKUP), before it is
    /// durable: a daemon crash may still lose it.
    pub no_wait: bool,
    /// The server sets the seq of every op whose seq is 0 to its current
    /// barrier seq.
    pub stamp_seq: bool,
}

impl SubmitOptions {
    /// The request's `flags` field.
    pub fn flags(self) -> u32 {
        let mut flags = 0;
        if self.no_wait {
            flags |= SUBMIT_NO_WAIT;
        }
        if self.stamp_seq {
            flags |= SUBMIT_STAMP_SEQ;
        }
        flags
    }
}

/// Most times one SUBMIT switches to a new session (after
/// `SESSION_EVICTED` on a first send, or a concurrent `register`).
const SESSION_SWITCHES_MAX: u32 = 4;

impl Client {
    /// SUBMIT `ops` (1 ..= `submit_ops_max`) as one atomic batch under
    /// this client's session (registered if there is none), exactly once;
    /// see the crate documentation for what an error's
    /// [`outcome`](Error::outcome) means.
    pub fn submit(&self, ops: &[WireOp], options: SubmitOptions) -> Result<SubmitReply, Error> {
        self.submit_inner(ops, options.flags(), self.deadline(), &mut |_| Ok(()))
    }

    /// [`submit`](Self::submit), calling `record` with the SUBMIT's
    /// ticket after its request number is chosen and before anything is
    /// sent: a client that must survive its own crash persists the
    /// ticket (and the ops) there, and after a restart calls
    /// [`resume_session`](Self::resume_session) and
    /// [`resubmit`](Self::resubmit) for each SUBMIT it recorded but never
    /// saw answered. If `record` fails nothing is sent
    /// ([`Error::Record`]).
    pub fn submit_recorded(
        &self,
        ops: &[WireOp],
        options: SubmitOptions,
        mut record: impl FnMut(SubmitTicket) -> io::Result<()>,
    ) -> Result<SubmitReply, Error> {
        self.submit_inner(ops, options.flags(), self.deadline(), &mut record)
    }

    /// Sends the SUBMIT of `ticket` again with the same ops: exactly
    /// once, whatever happened to the first send. The answer is the
    /// stored reply (flag `DUPLICATE`) if it was applied, else it is
    /// applied now; `REQUEST_TOO_OLD` if the server no longer keeps its
    /// reply (outcome unknown for good).
    pub fn resubmit(
        &self,
        ticket: SubmitTicket,
        ops: &[WireOp],
        options: SubmitOptions,
    ) -> Result<SubmitReply, Error> {
        self.check_ops(ops)?;
        self.submit_ticket(ticket, ops, options.flags(), self.deadline(), true)
    }

    /// Continues an existing session (e.g. one persisted before a crash,
    /// see [`submit_recorded`](Self::submit_recorded)): new SUBMITs use
    /// `session_id` with request numbers from `next_request_number` on,
    /// which must be above every number the session ever used.
    pub fn resume_session(&self, session_id: u64, next_request_number: u64) {
        self.session.install(session_id, next_request_number);
    }

    /// The request number the next SUBMIT of the current session gets
    /// (`None`: no session yet).
    pub fn next_request_number(&self) -> Option<u64> {
        self.session.current().map(|_| self.session.next_number())
    }

    fn check_ops(&self, ops: &[WireOp]) -> Result<(), Error> {
        let max = self.hello().submit_ops_max as usize;
        if ops.is_empty() || ops.len() > max {
            return Err(Error::InvalidArgument {
                request: "SUBMIT",
                reason: format!("{} ops, allowed 1..={max}", ops.len()),
            });
        }
        Ok(())
    }

    /// Chooses the ticket and sends; switches to a new session when the
    /// daemon evicted this one before a first send was applied.
    pub(crate) fn submit_inner(
        &self,
        ops: &[WireOp],
        flags: u32,
        deadline: Instant,
        record: &mut dyn FnMut(SubmitTicket) -> io::Result<()>,
    ) -> Result<SubmitReply, Error> {
        self.check_ops(ops)?;
        for _switch in 0..SESSION_SWITCHES_MAX {
            let session_id = self.ensure_session()?;
            let kept = self.hello().session_replies_kept;
            let ticket = match self.session.allocate(session_id, kept, deadline) {
                Ok(ticket) => ticket,
                Err(AllocateError::Changed) => continue,
                Err(AllocateError::Timeout) => {
                    return Err(self.timeout("SUBMIT", Outcome::NotApplied))
                }
            };
            let result = record(ticket)
                .map_err(|e| Error::Record {
                    source: Arc::new(e),
                })
                .and_then(|()| self.submit_ticket(ticket, ops, flags, deadline, false));
            self.session.release(ticket);
            let evicted = matches!(
                result.as_ref().map_err(Error::code),
                Err(Some(ErrorCode::SessionEvicted | ErrorCode::SessionUnknown))
            );
            match result {
                Err(e) if evicted && e.outcome() == Outcome::NotApplied => {
                    self.session.forget(session_id);
                }
                other => return other,
            }
        }
        Err(Error::InvalidArgument {
            request: "SUBMIT",
            reason: format!("the session changed {SESSION_SWITCHES_MAX} times during one SUBMIT"),
        })
    }

    /// Sends (and resends) one SUBMIT; `resent` if this number went out
    /// before (a session error then leaves the outcome unknown).
    fn submit_ticket(
        &self,
        ticket: SubmitTicket,
        ops: &[WireOp],
        flags: u32,
        deadline: Instant,
        resent: bool,
    ) -> Result<SubmitReply, Error> {
        let mut body = Vec::new();
        encode_submit(
            ticket.session_id,
            ticket.request_number,
            flags,
            ops,
            &mut body,
        );
        let mut attempts = Attempts::default();
        let result = self.call(
            "SUBMIT",
            Opcode::Submit,
            &body,
            true,
            deadline,
            &mut attempts,
        );
        let resent = resent || attempts.sends > 1;
        match result {
            Ok(Reply::Submit(reply)) => check_reply(reply, ticket, ops.len()),
            Ok(other) => Err(Error::Protocol {
                request: "SUBMIT",
                violation: ProtocolViolation::WrongOpcode {
                    expected: "SUBMIT",
                    got: other.opcode().as_u8(),
                },
            }),
            Err(Error::Server { request, error, .. }) => Err(Error::Server {
                request,
                outcome: submit_error_outcome(error.code, resent),
                error,
            }),
            Err(Error::Timeout {
                request,
                timeout_ms,
                outcome,
                ..
            }) => Err(Error::Timeout {
                request,
                timeout_ms,
                outcome,
                submit: (outcome == Outcome::Unknown).then_some(ticket),
            }),
            Err(e) => Err(e),
        }
    }
}

/// A SUBMIT reply answers its request: same number, same op count.
fn check_reply(reply: SubmitReply, ticket: SubmitTicket, ops: usize) -> Result<SubmitReply, Error> {
    let mismatch = |field, expected, got| Error::Protocol {
        request: "SUBMIT",
        violation: ProtocolViolation::Mismatch {
            field,
            expected,
            got,
        },
    };
    if reply.request_number != ticket.request_number {
        return Err(mismatch(
            "request_number",
            ticket.request_number,
            reply.request_number,
        ));
    }
    if reply.op_count as usize != ops {
        return Err(mismatch("op_count", ops as u64, u64::from(reply.op_count)));
    }
    Ok(reply)
}
