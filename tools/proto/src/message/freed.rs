//! Freed extents: FREED_SUBSCRIBE, FREED, FREED_ACK, FREED_UNSUBSCRIBE
//! (`docs/protocol.md`, "Freed extents").

use super::{check_len, decode_u64_body, Message, RequestMessage};
use crate::error::BodyError;
use crate::frame::{Opcode, BODY_BYTES_MAX_DEFAULT};
use crate::wire::{len_u16, len_u32, put_u16, put_u32, put_u64, put_u8, put_zeros, Reader};

/// FREED_SUBSCRIBE: longest consumer name.
pub const CONSUMER_NAME_BYTES_MAX: usize = 64;
/// FREED_SUBSCRIBE request: bytes before the name (`name_bytes`, 2
/// reserved).
pub const FREED_SUBSCRIBE_FIXED_BYTES: usize = 4;
/// FREED request size (also FREED_ACK's).
pub const FREED_REQUEST_BYTES: usize = 16;
/// FREED: most extents per page.
pub const FREED_EXTENTS_MAX: u32 = 16384;
/// FREED reply: bytes before the entries.
pub const FREED_REPLY_FIXED_BYTES: usize = 32;
/// FREED reply: bytes per entry.
pub const FREED_ENTRY_BYTES: usize = 32;

const _: () = assert!(CONSUMER_NAME_BYTES_MAX <= u16::MAX as usize);
// A whole FREED page fits in the smallest frame limit (1 MiB).
const _: () = assert!(
    FREED_REPLY_FIXED_BYTES + FREED_EXTENTS_MAX as usize * FREED_ENTRY_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);
const _: () = assert!(std::mem::size_of::<FreedExtent>() <= FREED_ENTRY_BYTES);

// ---------------------------------------------------------------- FREED

/// FREED_SUBSCRIBE request: the consumer's name (1 ..= 64 bytes, UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreedSubscribeRequest {
    /// The consumer.
    pub name: String,
}

impl FreedSubscribeRequest {
    const WHAT: &'static str = "FREED_SUBSCRIBE request";

    /// A request, refusing a name outside 1 ..= [`CONSUMER_NAME_BYTES_MAX`].
    pub fn new(name: &str) -> Result<Self, BodyError> {
        check_len(
            Self::WHAT,
            "name_bytes",
            name.len(),
            1,
            CONSUMER_NAME_BYTES_MAX,
        )?;
        Ok(FreedSubscribeRequest {
            name: name.to_owned(),
        })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u16(out, len_u16(Self::WHAT, self.name.len()));
        put_zeros(out, 2);
        out.extend_from_slice(self.name.as_bytes());
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        r.fixed(FREED_SUBSCRIBE_FIXED_BYTES)?;
        let name_bytes = usize::from(r.u16()?);
        check_len(
            Self::WHAT,
            "name_bytes",
            name_bytes,
            1,
            CONSUMER_NAME_BYTES_MAX,
        )?;
        r.reserved(2)?;
        if body.len() != FREED_SUBSCRIBE_FIXED_BYTES + name_bytes {
            return Err(r.wrong_size((FREED_SUBSCRIBE_FIXED_BYTES + name_bytes) as u64));
        }
        let name = r.text("name", name_bytes)?;
        r.finish()?;
        Ok(FreedSubscribeRequest { name })
    }
}

/// FREED_SUBSCRIBE reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedSubscribeReply {
    /// The consumer's id.
    pub consumer_id: u64,
    /// Its last acknowledged generation (0: new).
    pub acked_generation: u64,
    /// Oldest generation whose list is kept (0: none).
    pub oldest_kept: u64,
}

impl FreedSubscribeReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.consumer_id);
        put_u64(out, self.acked_generation);
        put_u64(out, self.oldest_kept);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("FREED_SUBSCRIBE reply", body);
        if body.len() != 24 {
            return Err(r.wrong_size(24));
        }
        let reply = FreedSubscribeReply {
            consumer_id: r.u64()?,
            acked_generation: r.u64()?,
            oldest_kept: r.u64()?,
        };
        r.finish()?;
        Ok(reply)
    }
}

message!(FreedSubscribeRequest => FreedSubscribeReply, Opcode::FreedSubscribe);

/// FREED request: a cursor and a page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedRequest {
    /// Start with the extents freed by this commit...
    pub generation: u64,
    /// ...from its `index`-th on.
    pub index: u32,
    /// Page size, 1 ..= [`FREED_EXTENTS_MAX`].
    pub max_extents: u32,
}

impl FreedRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.generation);
        put_u32(out, self.index);
        put_u32(out, self.max_extents);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("FREED request", body);
        if body.len() != FREED_REQUEST_BYTES {
            return Err(r.wrong_size(FREED_REQUEST_BYTES as u64));
        }
        let req = FreedRequest {
            generation: r.u64()?,
            index: r.u32()?,
            max_extents: r.u32()?,
        };
        r.check_range(
            "max_extents",
            u64::from(req.max_extents),
            1,
            u64::from(FREED_EXTENTS_MAX),
        )?;
        r.finish()?;
        Ok(req)
    }
}

/// One freed extent (32 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FreedExtent {
    /// The commit that freed it.
    pub generation: u64,
    /// Extent address.
    pub bytenr: u64,
    /// Extent size.
    pub num_bytes: u64,
    /// 0 tree block, 1 data.
    pub kind: u8,
    /// Tree block level.
    pub level: u8,
}

/// FREED reply: one page of freed extents and the next cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreedReply {
    /// More are kept after this page.
    pub more: bool,
    /// Cursor of the next request: generation...
    pub next_generation: u64,
    /// ...and index.
    pub next_index: u32,
    /// Oldest generation whose list is kept.
    pub oldest_kept: u64,
    /// The page (at most [`FREED_EXTENTS_MAX`]).
    pub extents: Vec<FreedExtent>,
}

impl FreedReply {
    const WHAT: &'static str = "FREED reply";

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(FREED_REPLY_FIXED_BYTES + self.extents.len() * FREED_ENTRY_BYTES);
        put_u32(out, len_u32(Self::WHAT, self.extents.len()));
        put_u8(out, u8::from(self.more));
        put_zeros(out, 3);
        put_u64(out, self.next_generation);
        put_u32(out, self.next_index);
        put_zeros(out, 4);
        put_u64(out, self.oldest_kept);
        for e in &self.extents {
            put_u64(out, e.generation);
            put_u64(out, e.bytenr);
            put_u64(out, e.num_bytes);
            put_u8(out, e.kind);
            put_u8(out, e.level);
            put_zeros(out, 6);
        }
    }

    /// Decodes the body: count at most [`FREED_EXTENTS_MAX`].
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        r.fixed(FREED_REPLY_FIXED_BYTES)?;
        let count = r.u32()?;
        r.check_range("count", u64::from(count), 0, u64::from(FREED_EXTENTS_MAX))?;
        let more = r.bool("more")?;
        r.reserved(3)?;
        let next_generation = r.u64()?;
        let next_index = r.u32()?;
        r.reserved(4)?;
        let oldest_kept = r.u64()?;
        let count = r.expect_entries(count, FREED_ENTRY_BYTES)?;
        let mut extents = Vec::with_capacity(count);
        for _ in 0..count {
            extents.push(FreedExtent {
                generation: r.u64()?,
                bytenr: r.u64()?,
                num_bytes: r.u64()?,
                kind: r.u8()?,
                level: r.u8()?,
            });
            r.reserved(6)?;
        }
        r.finish()?;
        Ok(FreedReply {
            more,
            next_generation,
            next_index,
            oldest_kept,
            extents,
        })
    }
}

message!(FreedRequest => FreedReply, Opcode::Freed);

/// FREED_ACK request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedAckRequest {
    /// The consumer.
    pub consumer_id: u64,
    /// Every list up to and including this commit was applied.
    pub generation: u64,
}

impl FreedAckRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.consumer_id);
        put_u64(out, self.generation);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("FREED_ACK request", body);
        if body.len() != FREED_REQUEST_BYTES {
            return Err(r.wrong_size(FREED_REQUEST_BYTES as u64));
        }
        let req = FreedAckRequest {
            consumer_id: r.u64()?,
            generation: r.u64()?,
        };
        r.finish()?;
        Ok(req)
    }
}

/// FREED_ACK reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedAckReply {
    /// The consumer's acknowledged generation.
    pub acked_generation: u64,
}

impl FreedAckReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.acked_generation);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let acked_generation = decode_u64_body("FREED_ACK reply", body, 0)?;
        Ok(FreedAckReply { acked_generation })
    }
}

message!(FreedAckRequest => FreedAckReply, Opcode::FreedAck);

/// FREED_UNSUBSCRIBE request: removes a consumer by id (ids are never
/// reused, so a retry cannot remove a consumer subscribed since under the
/// same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedUnsubscribeRequest {
    /// The consumer.
    pub consumer_id: u64,
}

impl FreedUnsubscribeRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.consumer_id);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let consumer_id = decode_u64_body("FREED_UNSUBSCRIBE request", body, 0)?;
        Ok(FreedUnsubscribeRequest { consumer_id })
    }
}

/// FREED_UNSUBSCRIBE reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedUnsubscribeReply {
    /// The removed consumer's last acknowledged generation.
    pub acked_generation: u64,
}

impl FreedUnsubscribeReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.acked_generation);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let acked_generation = decode_u64_body("FREED_UNSUBSCRIBE reply", body, 0)?;
        Ok(FreedUnsubscribeReply { acked_generation })
    }
}

message!(FreedUnsubscribeRequest => FreedUnsubscribeReply, Opcode::FreedUnsubscribe);
