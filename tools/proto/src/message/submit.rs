//! SUBMIT: a batch of ops under a session and request number
//! (`docs/protocol.md`, "SUBMIT"), owned ([`SubmitRequest`]) or
//! borrowed in place ([`SubmitView`]) for the server.

use super::{Message, RequestMessage};
use crate::error::BodyError;
use crate::frame::{Opcode, BODY_BYTES_MAX_DEFAULT};
use crate::op::{WireOp, OP_BYTES};
use crate::wire::{len_u32, put_u32, put_u64, Reader};

/// SUBMIT request: bytes before the ops.
pub const SUBMIT_FIXED_BYTES: usize = 24;
/// SUBMIT request flag: reply when queued, before durable.
pub const SUBMIT_NO_WAIT: u32 = 1 << 0;
/// SUBMIT request flag: stamp ops of seq 0 with the current barrier seq.
pub const SUBMIT_STAMP_SEQ: u32 = 1 << 1;
/// Every SUBMIT request flag the spec defines.
pub const SUBMIT_FLAGS_KNOWN: u32 = SUBMIT_NO_WAIT | SUBMIT_STAMP_SEQ;
/// Most ops in one SUBMIT at the default frame limit.
pub const SUBMIT_OPS_MAX_DEFAULT: u32 =
    ((BODY_BYTES_MAX_DEFAULT as usize - SUBMIT_FIXED_BYTES) / OP_BYTES) as u32;
/// SUBMIT reply size.
pub const SUBMIT_REPLY_BYTES: usize = 24;
/// SUBMIT reply flag: the batch was durable when the reply was sent.
pub const SUBMIT_REPLY_DURABLE: u32 = 1 << 0;
/// SUBMIT reply flag: a stored reply; nothing was applied now.
pub const SUBMIT_REPLY_DUPLICATE: u32 = 1 << 1;
/// Every SUBMIT reply flag the spec defines.
pub const SUBMIT_REPLY_FLAGS_KNOWN: u32 = SUBMIT_REPLY_DURABLE | SUBMIT_REPLY_DUPLICATE;

const _: () = assert!(SUBMIT_OPS_MAX_DEFAULT == 18724);
const _: () = assert!(
    SUBMIT_FIXED_BYTES + SUBMIT_OPS_MAX_DEFAULT as usize * OP_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);

/// SUBMIT request, owned (for clients, and [`Request`](crate::Request)).
/// A server reading many SUBMITs should use
/// [`SubmitRequest::parse_limited`], which runs the spec's checks in
/// order with its `submit_ops_max` and borrows the ops from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitRequest {
    /// The session.
    pub session_id: u64,
    /// ≥ 1, rising for each new SUBMIT of the session.
    pub request_number: u64,
    /// `SUBMIT_NO_WAIT`, `SUBMIT_STAMP_SEQ`.
    pub flags: u32,
    /// The batch (1 ..= `submit_ops_max`).
    pub ops: Vec<WireOp>,
}

/// A SUBMIT request checked in place: the ops stay in the body and are
/// decoded on demand, so parsing allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitView<'a> {
    /// The session.
    pub session_id: u64,
    /// The request number (≥ 1).
    pub request_number: u64,
    /// The request flags (only defined bits).
    pub flags: u32,
    ops: &'a [u8],
}

/// Appends a SUBMIT body without building a [`SubmitRequest`].
///
/// # Panics
///
/// If there are 2^32 ops or more.
pub fn encode_submit(
    session_id: u64,
    request_number: u64,
    flags: u32,
    ops: &[WireOp],
    out: &mut Vec<u8>,
) {
    out.reserve(SUBMIT_FIXED_BYTES + ops.len() * OP_BYTES);
    put_u64(out, session_id);
    put_u64(out, request_number);
    put_u32(out, len_u32("SUBMIT request", ops.len()));
    put_u32(out, flags);
    for op in ops {
        out.extend_from_slice(&op.encode());
    }
}

impl SubmitRequest {
    const WHAT: &'static str = "SUBMIT request";

    /// Checks a SUBMIT body without copying its ops, in the spec's order
    /// ("SUBMIT", "Checks"): size `24 + 56 × op_count` (`BAD_REQUEST`),
    /// `op_count` ≥ 1 ([`BodyError::NoOps`], answered `TOO_MANY_OPS`),
    /// `request_number` ≥ 1, defined flags only (both `BAD_REQUEST`).
    /// Without a `submit_ops_max` the upper bound is not checked: a server
    /// uses [`parse_limited`](Self::parse_limited).
    pub fn parse(body: &[u8]) -> Result<SubmitView<'_>, BodyError> {
        Self::parse_inner(body, None)
    }

    /// [`parse`](Self::parse) with the server's `submit_ops_max`: an
    /// `op_count` of 0 or above it is [`BodyError::TooManyOps`] (answered
    /// `TOO_MANY_OPS` with `detail` = `submit_ops_max`), checked right
    /// after the size and before `request_number` and the flags.
    pub fn parse_limited(body: &[u8], submit_ops_max: u32) -> Result<SubmitView<'_>, BodyError> {
        Self::parse_inner(body, Some(submit_ops_max))
    }

    fn parse_inner(body: &[u8], ops_max: Option<u32>) -> Result<SubmitView<'_>, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        r.fixed(SUBMIT_FIXED_BYTES)?;
        let session_id = r.u64()?;
        let request_number = r.u64()?;
        let op_count = r.u32()?;
        let flags = r.u32()?;
        let count = r.expect_entries(op_count, OP_BYTES)?;
        match ops_max {
            Some(submit_ops_max) if op_count == 0 || op_count > submit_ops_max => {
                return Err(BodyError::TooManyOps {
                    op_count,
                    submit_ops_max,
                });
            }
            None if op_count == 0 => return Err(BodyError::NoOps),
            _ => {}
        }
        r.check_range("request_number", request_number, 1, u64::MAX)?;
        r.check_bits("flags", u64::from(flags), u64::from(SUBMIT_FLAGS_KNOWN))?;
        Ok(SubmitView {
            session_id,
            request_number,
            flags,
            ops: r.bytes(count * OP_BYTES)?,
        })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_submit(
            self.session_id,
            self.request_number,
            self.flags,
            &self.ops,
            out,
        );
    }

    /// Decodes the body into one Vec of exactly `op_count` ops.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        Ok(SubmitRequest::parse(body)?.to_request())
    }
}

impl<'a> SubmitView<'a> {
    /// Number of ops (≥ 1).
    pub fn op_count(&self) -> usize {
        self.ops.len() / OP_BYTES
    }

    /// The ops, decoded one by one from the body.
    pub fn ops(&self) -> impl ExactSizeIterator<Item = WireOp> + 'a {
        self.ops.chunks_exact(OP_BYTES).map(op_from_chunk)
    }

    /// Op `index`, if there is one.
    pub fn op(&self, index: usize) -> Option<WireOp> {
        let start = index.checked_mul(OP_BYTES)?;
        let chunk = self.ops.get(start..start.checked_add(OP_BYTES)?)?;
        Some(op_from_chunk(chunk))
    }

    /// The raw bytes of the ops (`56 × op_count`), e.g. to log them as is.
    pub fn ops_bytes(&self) -> &'a [u8] {
        self.ops
    }

    /// An owned copy.
    pub fn to_request(&self) -> SubmitRequest {
        let mut ops = Vec::with_capacity(self.op_count());
        ops.extend(self.ops());
        SubmitRequest {
            session_id: self.session_id,
            request_number: self.request_number,
            flags: self.flags,
            ops,
        }
    }

    /// Appends the body it was parsed from.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.session_id);
        put_u64(out, self.request_number);
        put_u32(out, len_u32(SubmitRequest::WHAT, self.op_count()));
        put_u32(out, self.flags);
        out.extend_from_slice(self.ops);
    }
}

/// An op from a chunk of exactly [`OP_BYTES`] (from `chunks_exact`).
fn op_from_chunk(chunk: &[u8]) -> WireOp {
    let mut b = [0u8; OP_BYTES];
    b.copy_from_slice(chunk);
    WireOp::decode(&b)
}

/// SUBMIT reply: where the batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitReply {
    /// Log sequence number of the log batch holding the SUBMIT.
    pub lsn: u64,
    /// Ops in the SUBMIT.
    pub op_count: u32,
    /// `SUBMIT_REPLY_DURABLE`, `SUBMIT_REPLY_DUPLICATE`.
    pub flags: u32,
    /// The request number answered.
    pub request_number: u64,
}

impl SubmitReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.lsn);
        put_u32(out, self.op_count);
        put_u32(out, self.flags);
        put_u64(out, self.request_number);
    }

    /// Decodes the body; undefined flag bits are refused.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("SUBMIT reply", body);
        if body.len() != SUBMIT_REPLY_BYTES {
            return Err(r.wrong_size(SUBMIT_REPLY_BYTES as u64));
        }
        let reply = SubmitReply {
            lsn: r.u64()?,
            op_count: r.u32()?,
            flags: r.u32()?,
            request_number: r.u64()?,
        };
        r.check_bits(
            "flags",
            u64::from(reply.flags),
            u64::from(SUBMIT_REPLY_FLAGS_KNOWN),
        )?;
        r.finish()?;
        Ok(reply)
    }
}

message!(SubmitRequest => SubmitReply, Opcode::Submit);
