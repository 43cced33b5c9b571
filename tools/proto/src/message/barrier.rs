//! Seq barriers: BARRIER_ACQUIRE, BARRIER_RENEW, BARRIER_RELEASE
//! (`docs/protocol.md`, "Seq barriers").

use super::{decode_u64_body, Message, RequestMessage};
use crate::error::BodyError;
use crate::frame::Opcode;
use crate::wire::{put_u32, put_u64, put_zeros, Reader};

/// BARRIER_ACQUIRE reply size.
pub const BARRIER_ACQUIRE_REPLY_BYTES: usize = 24;
/// BARRIER_RENEW reply size (also BARRIER_RELEASE's).
pub const BARRIER_RENEW_REPLY_BYTES: usize = 8;

// ------------------------------------------------------------- BARRIERS

/// BARRIER_ACQUIRE request: the session that will hold the barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierAcquireRequest {
    /// The session.
    pub session_id: u64,
}

impl BarrierAcquireRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.session_id);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let session_id = decode_u64_body("BARRIER_ACQUIRE request", body, 0)?;
        Ok(BarrierAcquireRequest { session_id })
    }
}

/// BARRIER_ACQUIRE reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierAcquireReply {
    /// The barrier.
    pub barrier_id: u64,
    /// The barrier's seq.
    pub seq: u64,
    /// Its lease.
    pub lease_ms: u32,
}

impl BarrierAcquireReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.barrier_id);
        put_u64(out, self.seq);
        put_u32(out, self.lease_ms);
        put_zeros(out, 4);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("BARRIER_ACQUIRE reply", body);
        if body.len() != BARRIER_ACQUIRE_REPLY_BYTES {
            return Err(r.wrong_size(BARRIER_ACQUIRE_REPLY_BYTES as u64));
        }
        let reply = BarrierAcquireReply {
            barrier_id: r.u64()?,
            seq: r.u64()?,
            lease_ms: r.u32()?,
        };
        r.reserved(4)?;
        r.finish()?;
        Ok(reply)
    }
}

message!(BarrierAcquireRequest => BarrierAcquireReply, Opcode::BarrierAcquire);

/// BARRIER_RENEW request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierRenewRequest {
    /// The barrier.
    pub barrier_id: u64,
}

impl BarrierRenewRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.barrier_id);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let barrier_id = decode_u64_body("BARRIER_RENEW request", body, 0)?;
        Ok(BarrierRenewRequest { barrier_id })
    }
}

/// BARRIER_RENEW reply: the new lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierRenewReply {
    /// The lease from now.
    pub lease_ms: u32,
}

impl BarrierRenewReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.lease_ms);
        put_zeros(out, 4);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("BARRIER_RENEW reply", body);
        if body.len() != BARRIER_RENEW_REPLY_BYTES {
            return Err(r.wrong_size(BARRIER_RENEW_REPLY_BYTES as u64));
        }
        let lease_ms = r.u32()?;
        r.reserved(4)?;
        r.finish()?;
        Ok(BarrierRenewReply { lease_ms })
    }
}

message!(BarrierRenewRequest => BarrierRenewReply, Opcode::BarrierRenew);

/// BARRIER_RELEASE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierReleaseRequest {
    /// The barrier.
    pub barrier_id: u64,
}

impl BarrierReleaseRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.barrier_id);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let barrier_id = decode_u64_body("BARRIER_RELEASE request", body, 0)?;
        Ok(BarrierReleaseRequest { barrier_id })
    }
}

/// BARRIER_RELEASE reply: 8 reserved bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BarrierReleaseReply;

impl BarrierReleaseReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_zeros(out, BARRIER_RENEW_REPLY_BYTES);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("BARRIER_RELEASE reply", body);
        if body.len() != BARRIER_RENEW_REPLY_BYTES {
            return Err(r.wrong_size(BARRIER_RENEW_REPLY_BYTES as u64));
        }
        r.reserved(BARRIER_RENEW_REPLY_BYTES)?;
        r.finish()?;
        Ok(BarrierReleaseReply)
    }
}

message!(BarrierReleaseRequest => BarrierReleaseReply, Opcode::BarrierRelease);
