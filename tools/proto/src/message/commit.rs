//! The small fixed requests: COMMIT (checkpoint now), STATS (JSON text)
//! and PING (echo), `docs/protocol.md` "COMMIT", "STATS", "PING".

use super::{check_len, decode_empty, Message, RequestMessage};
use crate::error::BodyError;
use crate::frame::Opcode;
use crate::wire::{put_u64, Reader};

/// COMMIT reply size.
pub const COMMIT_REPLY_BYTES: usize = 64;
/// PING: longest payload.
pub const PING_BYTES_MAX: usize = 64;

// --------------------------------------------------------------- COMMIT

/// COMMIT request: empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitRequest;

impl CommitRequest {
    /// Appends the (empty) body.
    pub fn encode(&self, _out: &mut Vec<u8>) {}

    /// Decodes the body: it must be empty.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        decode_empty("COMMIT request", body).map(|()| CommitRequest)
    }
}

/// COMMIT reply: what the checkpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitReply {
    /// The generation committed.
    pub generation: u64,
    /// Ops committed.
    pub ops: u64,
    /// Heads run.
    pub heads: u64,
    /// Heads applied.
    pub applied: u64,
    /// Extents freed.
    pub freed: u64,
    /// Heads held by a barrier.
    pub held: u64,
    /// Heads refused.
    pub quarantined: u64,
    /// Duration of the commit.
    pub took_us: u64,
}

impl CommitReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.generation,
            self.ops,
            self.heads,
            self.applied,
            self.freed,
            self.held,
            self.quarantined,
            self.took_us,
        ] {
            put_u64(out, v);
        }
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("COMMIT reply", body);
        if body.len() != COMMIT_REPLY_BYTES {
            return Err(r.wrong_size(COMMIT_REPLY_BYTES as u64));
        }
        let reply = CommitReply {
            generation: r.u64()?,
            ops: r.u64()?,
            heads: r.u64()?,
            applied: r.u64()?,
            freed: r.u64()?,
            held: r.u64()?,
            quarantined: r.u64()?,
            took_us: r.u64()?,
        };
        r.finish()?;
        Ok(reply)
    }
}

message!(CommitRequest => CommitReply, Opcode::Commit);

// ---------------------------------------------------------------- STATS

/// STATS request: empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsRequest;

impl StatsRequest {
    /// Appends the (empty) body.
    pub fn encode(&self, _out: &mut Vec<u8>) {}

    /// Decodes the body: it must be empty.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        decode_empty("STATS request", body).map(|()| StatsRequest)
    }
}

/// STATS reply: a JSON object, carried as text (only UTF-8 is checked;
/// parsing the JSON is the client's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsReply {
    /// The JSON text.
    pub json: String,
}

impl StatsReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.json.as_bytes());
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("STATS reply", body);
        let json = r.text("json", body.len())?;
        Ok(StatsReply { json })
    }
}

message!(StatsRequest => StatsReply, Opcode::Stats);

// ----------------------------------------------------------------- PING

/// Checks a PING payload's length and copies it.
fn decode_ping(what: &'static str, body: &[u8]) -> Result<Vec<u8>, BodyError> {
    check_len(what, "body_bytes", body.len(), 0, PING_BYTES_MAX)?;
    Ok(body.to_vec())
}

/// PING request: 0 ..= 64 bytes, echoed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PingRequest {
    /// The bytes.
    pub payload: Vec<u8>,
}

impl PingRequest {
    /// A request, refusing more than [`PING_BYTES_MAX`] bytes.
    pub fn new(payload: &[u8]) -> Result<Self, BodyError> {
        decode_ping("PING request", payload).map(|payload| PingRequest { payload })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.payload);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        PingRequest::new(body)
    }
}

/// PING reply: the request's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PingReply {
    /// The bytes.
    pub payload: Vec<u8>,
}

impl PingReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.payload);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        decode_ping("PING reply", body).map(|payload| PingReply { payload })
    }
}

message!(PingRequest => PingReply, Opcode::Ping);
