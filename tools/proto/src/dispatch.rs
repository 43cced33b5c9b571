//! [`Request`] and [`Reply`]: one enum per direction over every opcode,
//! so that the server and the client dispatch on a frame's opcode in one
//! place, and whole-frame encoders ([`encode_request`], [`encode_reply`])
//! that write the body in place behind its header.
//!
//! An unknown opcode decodes to [`BodyError::UnknownOpcode`] (the server
//! answers `UNKNOWN_OPCODE` and keeps the connection), and so does the
//! opcode `ERROR` in a request ([`BodyError::ErrorOpcodeInRequest`]).

use crate::error::{BodyError, ErrorBody};
use crate::frame::{encode_frame_with, Opcode, FLAG_REPLY};
use crate::message::*;

/// Every request body, by opcode.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// 0x01.
    Hello(HelloRequest),
    /// 0x02.
    Register(RegisterRequest),
    /// 0x03 (owned; see [`SubmitRequest::parse`] for the borrowing path).
    Submit(SubmitRequest),
    /// 0x04.
    Lookup(LookupRequest),
    /// 0x05.
    Backrefs(BackrefsRequest),
    /// 0x06.
    BarrierAcquire(BarrierAcquireRequest),
    /// 0x07.
    BarrierRenew(BarrierRenewRequest),
    /// 0x08.
    BarrierRelease(BarrierReleaseRequest),
    /// 0x09.
    Commit(CommitRequest),
    /// 0x0A.
    FreedSubscribe(FreedSubscribeRequest),
    /// 0x0B.
    Freed(FreedRequest),
    /// 0x0C.
    FreedAck(FreedAckRequest),
    /// 0x0D.
    Stats(StatsRequest),
    /// 0x0E.
    Ping(PingRequest),
    /// 0x0F.
    FreedUnsubscribe(FreedUnsubscribeRequest),
}

/// Every reply body, by opcode, and the error body (opcode 0x7F).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 0x01.
    Hello(HelloReply),
    /// 0x02.
    Register(RegisterReply),
    /// 0x03.
    Submit(SubmitReply),
    /// 0x04.
    Lookup(LookupReply),
    /// 0x05.
    Backrefs(BackrefsReply),
    /// 0x06.
    BarrierAcquire(BarrierAcquireReply),
    /// 0x07.
    BarrierRenew(BarrierRenewReply),
    /// 0x08.
    BarrierRelease(BarrierReleaseReply),
    /// 0x09.
    Commit(CommitReply),
    /// 0x0A.
    FreedSubscribe(FreedSubscribeReply),
    /// 0x0B.
    Freed(FreedReply),
    /// 0x0C.
    FreedAck(FreedAckReply),
    /// 0x0D.
    Stats(StatsReply),
    /// 0x0E.
    Ping(PingReply),
    /// 0x0F.
    FreedUnsubscribe(FreedUnsubscribeReply),
    /// 0x7F: the request failed.
    Error(ErrorBody),
}

/// Applies `$f` to the payload of any variant of `$enum`.
macro_rules! each_variant {
    ($value:expr, $enum:ident, |$x:ident| $body:expr) => {
        match $value {
            $enum::Hello($x) => $body,
            $enum::Register($x) => $body,
            $enum::Submit($x) => $body,
            $enum::Lookup($x) => $body,
            $enum::Backrefs($x) => $body,
            $enum::BarrierAcquire($x) => $body,
            $enum::BarrierRenew($x) => $body,
            $enum::BarrierRelease($x) => $body,
            $enum::Commit($x) => $body,
            $enum::FreedSubscribe($x) => $body,
            $enum::Freed($x) => $body,
            $enum::FreedAck($x) => $body,
            $enum::Stats($x) => $body,
            $enum::Ping($x) => $body,
            $enum::FreedUnsubscribe($x) => $body,
        }
    };
}

impl Request {
    /// Decodes the body of a request frame with this raw opcode.
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Request, BodyError> {
        let opcode = match Opcode::from_u8(opcode) {
            Some(Opcode::Error) => return Err(BodyError::ErrorOpcodeInRequest),
            Some(op) => op,
            None => return Err(BodyError::UnknownOpcode { opcode }),
        };
        Ok(match opcode {
            Opcode::Hello => Request::Hello(HelloRequest::decode(body)?),
            Opcode::Register => Request::Register(RegisterRequest::decode(body)?),
            Opcode::Submit => Request::Submit(SubmitRequest::decode(body)?),
            Opcode::Lookup => Request::Lookup(LookupRequest::decode(body)?),
            Opcode::Backrefs => Request::Backrefs(BackrefsRequest::decode(body)?),
            Opcode::BarrierAcquire => Request::BarrierAcquire(BarrierAcquireRequest::decode(body)?),
            Opcode::BarrierRenew => Request::BarrierRenew(BarrierRenewRequest::decode(body)?),
            Opcode::BarrierRelease => Request::BarrierRelease(BarrierReleaseRequest::decode(body)?),
            Opcode::Commit => Request::Commit(CommitRequest::decode(body)?),
            Opcode::FreedSubscribe => Request::FreedSubscribe(FreedSubscribeRequest::decode(body)?),
            Opcode::Freed => Request::Freed(FreedRequest::decode(body)?),
            Opcode::FreedAck => Request::FreedAck(FreedAckRequest::decode(body)?),
            Opcode::Stats => Request::Stats(StatsRequest::decode(body)?),
            Opcode::Ping => Request::Ping(PingRequest::decode(body)?),
            Opcode::FreedUnsubscribe => {
                Request::FreedUnsubscribe(FreedUnsubscribeRequest::decode(body)?)
            }
            Opcode::Error => return Err(BodyError::ErrorOpcodeInRequest),
        })
    }

    /// The opcode of its frame.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::Hello,
            Request::Register(_) => Opcode::Register,
            Request::Submit(_) => Opcode::Submit,
            Request::Lookup(_) => Opcode::Lookup,
            Request::Backrefs(_) => Opcode::Backrefs,
            Request::BarrierAcquire(_) => Opcode::BarrierAcquire,
            Request::BarrierRenew(_) => Opcode::BarrierRenew,
            Request::BarrierRelease(_) => Opcode::BarrierRelease,
            Request::Commit(_) => Opcode::Commit,
            Request::FreedSubscribe(_) => Opcode::FreedSubscribe,
            Request::Freed(_) => Opcode::Freed,
            Request::FreedAck(_) => Opcode::FreedAck,
            Request::Stats(_) => Opcode::Stats,
            Request::Ping(_) => Opcode::Ping,
            Request::FreedUnsubscribe(_) => Opcode::FreedUnsubscribe,
        }
    }

    /// Appends the body (not the header).
    pub fn encode(&self, out: &mut Vec<u8>) {
        each_variant!(self, Request, |x| x.encode(out))
    }
}

impl Reply {
    /// Decodes the body of a reply frame with this raw opcode (0x7F: an
    /// error body).
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Reply, BodyError> {
        let Some(opcode) = Opcode::from_u8(opcode) else {
            return Err(BodyError::UnknownOpcode { opcode });
        };
        Ok(match opcode {
            Opcode::Hello => Reply::Hello(HelloReply::decode(body)?),
            Opcode::Register => Reply::Register(RegisterReply::decode(body)?),
            Opcode::Submit => Reply::Submit(SubmitReply::decode(body)?),
            Opcode::Lookup => Reply::Lookup(LookupReply::decode(body)?),
            Opcode::Backrefs => Reply::Backrefs(BackrefsReply::decode(body)?),
            Opcode::BarrierAcquire => Reply::BarrierAcquire(BarrierAcquireReply::decode(body)?),
            Opcode::BarrierRenew => Reply::BarrierRenew(BarrierRenewReply::decode(body)?),
            Opcode::BarrierRelease => Reply::BarrierRelease(BarrierReleaseReply::decode(body)?),
            Opcode::Commit => Reply::Commit(CommitReply::decode(body)?),
            Opcode::FreedSubscribe => Reply::FreedSubscribe(FreedSubscribeReply::decode(body)?),
            Opcode::Freed => Reply::Freed(FreedReply::decode(body)?),
            Opcode::FreedAck => Reply::FreedAck(FreedAckReply::decode(body)?),
            Opcode::Stats => Reply::Stats(StatsReply::decode(body)?),
            Opcode::Ping => Reply::Ping(PingReply::decode(body)?),
            Opcode::FreedUnsubscribe => {
                Reply::FreedUnsubscribe(FreedUnsubscribeReply::decode(body)?)
            }
            Opcode::Error => Reply::Error(ErrorBody::decode(body)?),
        })
    }

    /// The opcode of its frame.
    pub fn opcode(&self) -> Opcode {
        match self {
            Reply::Hello(_) => Opcode::Hello,
            Reply::Register(_) => Opcode::Register,
            Reply::Submit(_) => Opcode::Submit,
            Reply::Lookup(_) => Opcode::Lookup,
            Reply::Backrefs(_) => Opcode::Backrefs,
            Reply::BarrierAcquire(_) => Opcode::BarrierAcquire,
            Reply::BarrierRenew(_) => Opcode::BarrierRenew,
            Reply::BarrierRelease(_) => Opcode::BarrierRelease,
            Reply::Commit(_) => Opcode::Commit,
            Reply::FreedSubscribe(_) => Opcode::FreedSubscribe,
            Reply::Freed(_) => Opcode::Freed,
            Reply::FreedAck(_) => Opcode::FreedAck,
            Reply::Stats(_) => Opcode::Stats,
            Reply::Ping(_) => Opcode::Ping,
            Reply::FreedUnsubscribe(_) => Opcode::FreedUnsubscribe,
            Reply::Error(_) => Opcode::Error,
        }
    }

    /// Appends the body (not the header).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Error(e) => e.encode(out),
            Reply::Hello(x) => x.encode(out),
            Reply::Register(x) => x.encode(out),
            Reply::Submit(x) => x.encode(out),
            Reply::Lookup(x) => x.encode(out),
            Reply::Backrefs(x) => x.encode(out),
            Reply::BarrierAcquire(x) => x.encode(out),
            Reply::BarrierRenew(x) => x.encode(out),
            Reply::BarrierRelease(x) => x.encode(out),
            Reply::Commit(x) => x.encode(out),
            Reply::FreedSubscribe(x) => x.encode(out),
            Reply::Freed(x) => x.encode(out),
            Reply::FreedAck(x) => x.encode(out),
            Reply::Stats(x) => x.encode(out),
            Reply::Ping(x) => x.encode(out),
            Reply::FreedUnsubscribe(x) => x.encode(out),
        }
    }
}

/// Appends a whole request frame (flags 0).
pub fn encode_request(request_id: u64, request: &Request, out: &mut Vec<u8>) {
    encode_frame_with(request.opcode(), 0, request_id, out, |o| request.encode(o));
}

/// Appends a whole reply frame (flag `REPLY`; opcode 0x7F for an error).
pub fn encode_reply(request_id: u64, reply: &Reply, out: &mut Vec<u8>) {
    encode_frame_with(reply.opcode(), FLAG_REPLY, request_id, out, |o| {
        reply.encode(o)
    });
}

/// Appends a whole request frame for one typed request body.
pub fn encode_request_message<M: RequestMessage>(request_id: u64, request: &M, out: &mut Vec<u8>) {
    encode_frame_with(M::OPCODE, 0, request_id, out, |o| request.encode(o));
}

/// Appends a whole reply frame for one typed reply body.
pub fn encode_reply_message<M: Message>(request_id: u64, reply: &M, out: &mut Vec<u8>) {
    encode_frame_with(M::OPCODE, FLAG_REPLY, request_id, out, |o| reply.encode(o));
}
