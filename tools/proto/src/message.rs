//! Request and reply bodies of every opcode (`docs/protocol.md`, one
//! section per opcode), with their limits.
//!
//! Every decoder checks, before it allocates: the body's size against
//! its fixed part and the counts or lengths it carries (so a `count` is
//! trusted only once `body.len()` agrees with it), the allowed ranges of
//! counts and lengths, that reserved bytes and undefined flag bits are
//! zero, booleans are 0 or 1, and text is UTF-8. Whatever a decoder
//! returns re-encodes to exactly the bytes it was decoded from (the
//! fuzz tests hold it to that), so a decoded value loses nothing.
//!
//! Plain numbers are *not* judged here (an op's meaning, a session id of
//! 0, a `kind` of 7 in a reply): they are the server's and the client's
//! business, answered with their own error codes.
//!
//! Vectors are allocated once, at the exact count, and each in-memory
//! entry is no larger than its wire entry (checked at compile time), so a
//! decoded message never holds more heap than its body's length.
//!
//! Encoders write what they are given: a value that breaks a limit (a
//! 300-byte token) is encoded faithfully and refused by the peer's
//! decoder; use the checked constructors (`HelloRequest::new`, ...) for
//! input from users. An encoder panics only when a length does not fit
//! its wire field (a programmer error).

use crate::error::BodyError;
use crate::frame::{Opcode, BODY_BYTES_MAX_DEFAULT};
use crate::op::{WireOp, OP_BYTES};
use crate::wire::{
    len_u16, len_u32, put_i64, put_u16, put_u32, put_u64, put_u8, put_zeros, Reader,
};

/// HELLO: longest token.
pub const HELLO_TOKEN_BYTES_MAX: usize = 256;
/// HELLO: longest client name.
pub const HELLO_NAME_BYTES_MAX: usize = 64;
/// HELLO request: bytes before the token.
pub const HELLO_FIXED_BYTES: usize = 8;
/// HELLO reply size.
pub const HELLO_REPLY_BYTES: usize = 64;
/// REGISTER reply size.
pub const REGISTER_REPLY_BYTES: usize = 16;
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
/// LOOKUP: most bytenrs in one request.
pub const LOOKUP_COUNT_MAX: u32 = 65536;
/// LOOKUP request and reply: bytes before the entries.
pub const LOOKUP_FIXED_BYTES: usize = 8;
/// LOOKUP request: bytes per bytenr.
pub const LOOKUP_BYTENR_BYTES: usize = 8;
/// LOOKUP reply: bytes per entry.
pub const LOOKUP_ENTRY_BYTES: usize = 48;
/// LOOKUP entry flag: an extent item exists.
pub const LOOKUP_COMMITTED: u8 = 1 << 0;
/// LOOKUP entry flag: ops are pending.
pub const LOOKUP_PENDING: u8 = 1 << 1;
/// LOOKUP entry flag: `must_insert_reserved` is pending.
pub const LOOKUP_ALLOC_PENDING: u8 = 1 << 2;
/// LOOKUP entry flag: a data extent.
pub const LOOKUP_DATA: u8 = 1 << 3;
/// LOOKUP entry flag: the committed item has `FULL_BACKREF`.
pub const LOOKUP_FULL_BACKREF: u8 = 1 << 4;
/// Every LOOKUP entry flag the spec defines.
pub const LOOKUP_FLAGS_KNOWN: u8 = 0x1F;
/// BACKREFS request size.
pub const BACKREFS_REQUEST_BYTES: usize = 40;
/// BACKREFS: most entries per page.
pub const BACKREFS_ENTRIES_MAX: u32 = 16384;
/// BACKREFS reply: bytes before the entries.
pub const BACKREFS_REPLY_FIXED_BYTES: usize = 40;
/// BACKREFS reply: bytes per entry.
pub const BACKREF_ENTRY_BYTES: usize = 40;
/// BACKREFS reply `kind` when nothing is known of the extent.
pub const BACKREFS_KIND_UNKNOWN: u8 = 255;
/// BARRIER_ACQUIRE reply size.
pub const BARRIER_ACQUIRE_REPLY_BYTES: usize = 24;
/// BARRIER_RENEW reply size (also BARRIER_RELEASE's).
pub const BARRIER_RENEW_REPLY_BYTES: usize = 8;
/// COMMIT reply size.
pub const COMMIT_REPLY_BYTES: usize = 64;
/// FREED_SUBSCRIBE: longest consumer name.
pub const CONSUMER_NAME_BYTES_MAX: usize = 64;
/// FREED request size (also FREED_ACK's).
pub const FREED_REQUEST_BYTES: usize = 16;
/// FREED: most extents per page.
pub const FREED_EXTENTS_MAX: u32 = 32768;
/// FREED reply: bytes before the entries.
pub const FREED_REPLY_FIXED_BYTES: usize = 32;
/// FREED reply: bytes per entry.
pub const FREED_ENTRY_BYTES: usize = 32;
/// PING: longest payload.
pub const PING_BYTES_MAX: usize = 64;

const _: () = assert!(SUBMIT_OPS_MAX_DEFAULT == 18724);
const _: () = assert!(
    SUBMIT_FIXED_BYTES + SUBMIT_OPS_MAX_DEFAULT as usize * OP_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);
const _: () = assert!(
    LOOKUP_FIXED_BYTES + LOOKUP_COUNT_MAX as usize * LOOKUP_BYTENR_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);
const _: () = assert!(
    BACKREFS_REPLY_FIXED_BYTES + BACKREFS_ENTRIES_MAX as usize * BACKREF_ENTRY_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);
const _: () =
    assert!(HELLO_FIXED_BYTES + HELLO_TOKEN_BYTES_MAX + HELLO_NAME_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(CONSUMER_NAME_BYTES_MAX <= u16::MAX as usize);
// Not asserted because the spec's own limits break it (see the crate
// report): a LOOKUP reply of LOOKUP_COUNT_MAX entries is 3 MiB and a FREED
// reply of FREED_EXTENTS_MAX entries is 1 MiB + 32 bytes, both above the
// default frame limit. A server must keep its replies under its limit.
// In-memory entries no larger than on the wire: see the module doc.
const _: () = assert!(std::mem::size_of::<LookupEntry>() <= LOOKUP_ENTRY_BYTES);
const _: () = assert!(std::mem::size_of::<BackrefEntry>() <= BACKREF_ENTRY_BYTES);
const _: () = assert!(std::mem::size_of::<FreedExtent>() <= FREED_ENTRY_BYTES);
const _: () = assert!(std::mem::size_of::<u64>() <= LOOKUP_BYTENR_BYTES);

/// A body of one opcode and direction: encode and decode.
pub trait Message: Sized {
    /// The frame opcode carrying it.
    const OPCODE: Opcode;
    /// Appends the body to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes a body, refusing anything the spec does not allow.
    fn decode(body: &[u8]) -> Result<Self, BodyError>;
}

/// A request body, and the body of its successful reply.
pub trait RequestMessage: Message {
    /// The reply to this request.
    type Reply: Message;
}

/// Implements the traits by forwarding to the inherent methods.
macro_rules! message {
    ($request:ty => $reply:ty, $opcode:expr) => {
        message!($request, $opcode);
        message!($reply, $opcode);
        impl RequestMessage for $request {
            type Reply = $reply;
        }
    };
    ($ty:ty, $opcode:expr) => {
        impl Message for $ty {
            const OPCODE: Opcode = $opcode;
            fn encode(&self, out: &mut Vec<u8>) {
                <$ty>::encode(self, out)
            }
            fn decode(body: &[u8]) -> Result<Self, BodyError> {
                <$ty>::decode(body)
            }
        }
    };
}

/// Refuses a non-empty body.
fn decode_empty(what: &'static str, body: &[u8]) -> Result<(), BodyError> {
    Reader::new(what, body).finish()
}

/// Refuses a length outside `min..=max`.
fn check_len(
    what: &'static str,
    field: &'static str,
    len: usize,
    min: usize,
    max: usize,
) -> Result<(), BodyError> {
    if len < min || len > max {
        return Err(BodyError::OutOfRange {
            what,
            field,
            value: len as u64,
            min: min as u64,
            max: max as u64,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------- HELLO

/// HELLO request: version range, token, client name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRequest {
    /// Lowest protocol version the client speaks.
    pub version_min: u16,
    /// Highest protocol version the client speaks.
    pub version_max: u16,
    /// The auth token (at most [`HELLO_TOKEN_BYTES_MAX`]); empty if none.
    pub token: Vec<u8>,
    /// Client name for the daemon's log (at most [`HELLO_NAME_BYTES_MAX`]).
    pub name: String,
}

impl HelloRequest {
    const WHAT: &'static str = "HELLO request";

    /// A request, refusing a token or name over the limits.
    pub fn new(
        version_min: u16,
        version_max: u16,
        token: &[u8],
        name: &str,
    ) -> Result<Self, BodyError> {
        check_len(
            Self::WHAT,
            "token_bytes",
            token.len(),
            0,
            HELLO_TOKEN_BYTES_MAX,
        )?;
        check_len(
            Self::WHAT,
            "name_bytes",
            name.len(),
            0,
            HELLO_NAME_BYTES_MAX,
        )?;
        Ok(HelloRequest {
            version_min,
            version_max,
            token: token.to_vec(),
            name: name.to_owned(),
        })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u16(out, self.version_min);
        put_u16(out, self.version_max);
        put_u16(out, len_u16(Self::WHAT, self.token.len()));
        put_u16(out, len_u16(Self::WHAT, self.name.len()));
        out.extend_from_slice(&self.token);
        out.extend_from_slice(self.name.as_bytes());
    }

    /// Decodes the body. An empty version range is not refused here: the
    /// server answers it `UNSUPPORTED_VERSION` (no version in the range).
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        let version_min = r.u16()?;
        let version_max = r.u16()?;
        let token_bytes = r.u16()?;
        let name_bytes = r.u16()?;
        let (token_bytes, name_bytes) = (usize::from(token_bytes), usize::from(name_bytes));
        check_len(
            Self::WHAT,
            "token_bytes",
            token_bytes,
            0,
            HELLO_TOKEN_BYTES_MAX,
        )?;
        check_len(
            Self::WHAT,
            "name_bytes",
            name_bytes,
            0,
            HELLO_NAME_BYTES_MAX,
        )?;
        let expected = HELLO_FIXED_BYTES + token_bytes + name_bytes;
        if body.len() != expected {
            return Err(r.wrong_size(expected as u64));
        }
        let token = r.bytes(token_bytes)?.to_vec();
        let name = r.text("name", name_bytes)?;
        r.finish()?;
        Ok(HelloRequest {
            version_min,
            version_max,
            token,
            name,
        })
    }
}

/// HELLO reply: the chosen version and the server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// The version chosen.
    pub version: u16,
    /// Largest frame body the server accepts.
    pub body_bytes_max: u32,
    /// Most ops in one SUBMIT.
    pub submit_ops_max: u32,
    /// Requests per connection read ahead of replies.
    pub in_flight_max: u32,
    /// The device's file system id.
    pub fs_id: [u8; 16],
    /// Last committed generation.
    pub generation: u64,
    /// Random per daemon start.
    pub server_id: u64,
    /// Lease of a seq barrier.
    pub barrier_lease_ms: u32,
    /// Replies kept per session.
    pub session_replies_kept: u32,
}

impl HelloReply {
    const WHAT: &'static str = "HELLO reply";

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u16(out, self.version);
        put_zeros(out, 2);
        put_u32(out, self.body_bytes_max);
        put_u32(out, self.submit_ops_max);
        put_u32(out, self.in_flight_max);
        out.extend_from_slice(&self.fs_id);
        put_u64(out, self.generation);
        put_u64(out, self.server_id);
        put_u32(out, self.barrier_lease_ms);
        put_u32(out, self.session_replies_kept);
        put_zeros(out, 8);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        if body.len() != HELLO_REPLY_BYTES {
            return Err(r.wrong_size(HELLO_REPLY_BYTES as u64));
        }
        let version = r.u16()?;
        r.reserved(2)?;
        let reply = HelloReply {
            version,
            body_bytes_max: r.u32()?,
            submit_ops_max: r.u32()?,
            in_flight_max: r.u32()?,
            fs_id: r.array()?,
            generation: r.u64()?,
            server_id: r.u64()?,
            barrier_lease_ms: r.u32()?,
            session_replies_kept: r.u32()?,
        };
        r.reserved(8)?;
        r.finish()?;
        Ok(reply)
    }
}

message!(HelloRequest => HelloReply, Opcode::Hello);

// ------------------------------------------------------------- REGISTER

/// REGISTER request: empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegisterRequest;

impl RegisterRequest {
    /// Appends the (empty) body.
    pub fn encode(&self, _out: &mut Vec<u8>) {}

    /// Decodes the body: it must be empty.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        decode_empty("REGISTER request", body).map(|()| RegisterRequest)
    }
}

/// REGISTER reply: the new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterReply {
    /// The session id (never 0 from a correct server; not refused here).
    pub session_id: u64,
}

impl RegisterReply {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.session_id);
        put_zeros(out, 8);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("REGISTER reply", body);
        if body.len() != REGISTER_REPLY_BYTES {
            return Err(r.wrong_size(REGISTER_REPLY_BYTES as u64));
        }
        let session_id = r.u64()?;
        r.reserved(8)?;
        r.finish()?;
        Ok(RegisterReply { session_id })
    }
}

message!(RegisterRequest => RegisterReply, Opcode::Register);

// --------------------------------------------------------------- SUBMIT

/// SUBMIT request, owned (for clients, and [`Request`](crate::Request)).
/// A server reading many SUBMITs should use [`SubmitRequest::parse`],
/// which borrows the ops from the body.
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

    /// Checks a SUBMIT body without copying its ops: size `24 + 56 ×
    /// op_count`, defined flags only, `request_number` ≥ 1, then
    /// `op_count` ≥ 1 ([`BodyError::NoOps`], answered `TOO_MANY_OPS`).
    /// The upper bound `submit_ops_max` is the server's to check.
    pub fn parse(body: &[u8]) -> Result<SubmitView<'_>, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        let session_id = r.u64()?;
        let request_number = r.u64()?;
        let op_count = r.u32()?;
        let flags = r.u32()?;
        let count = r.expect_entries(op_count, OP_BYTES)?;
        r.check_bits("flags", u64::from(flags), u64::from(SUBMIT_FLAGS_KNOWN))?;
        r.check_range("request_number", request_number, 1, u64::MAX)?;
        if count == 0 {
            return Err(BodyError::NoOps);
        }
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

// --------------------------------------------------------------- LOOKUP

/// LOOKUP request: the bytenrs to look up (1 ..= [`LOOKUP_COUNT_MAX`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupRequest {
    /// Extent addresses.
    pub bytenrs: Vec<u64>,
}

impl LookupRequest {
    const WHAT: &'static str = "LOOKUP request";

    /// A request, refusing a count outside 1 ..= [`LOOKUP_COUNT_MAX`].
    pub fn new(bytenrs: Vec<u64>) -> Result<Self, BodyError> {
        check_len(
            Self::WHAT,
            "count",
            bytenrs.len(),
            1,
            LOOKUP_COUNT_MAX as usize,
        )?;
        Ok(LookupRequest { bytenrs })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(LOOKUP_FIXED_BYTES + self.bytenrs.len() * LOOKUP_BYTENR_BYTES);
        put_u32(out, len_u32(Self::WHAT, self.bytenrs.len()));
        put_zeros(out, 4);
        for &bytenr in &self.bytenrs {
            put_u64(out, bytenr);
        }
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        let count = r.u32()?;
        r.check_range("count", u64::from(count), 1, u64::from(LOOKUP_COUNT_MAX))?;
        r.reserved(4)?;
        let count = r.expect_entries(count, LOOKUP_BYTENR_BYTES)?;
        let mut bytenrs = Vec::with_capacity(count);
        for _ in 0..count {
            bytenrs.push(r.u64()?);
        }
        r.finish()?;
        Ok(LookupRequest { bytenrs })
    }
}

/// One LOOKUP answer (48 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LookupEntry {
    /// The bytenr asked for.
    pub bytenr: u64,
    /// Committed refs + pending ref_mod.
    pub refs: i64,
    /// Refs of the committed extent item (0: none).
    pub committed_refs: u64,
    /// Sum of the pending ops' ref_mod.
    pub pending_ref_mod: i64,
    /// Extent size (0: nothing known).
    pub num_bytes: u64,
    /// `LOOKUP_*` flags.
    pub flags: u8,
    /// Tree block level.
    pub level: u8,
}

/// LOOKUP reply: one entry per requested bytenr, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupReply {
    /// The answers.
    pub entries: Vec<LookupEntry>,
}

impl LookupReply {
    const WHAT: &'static str = "LOOKUP reply";

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(LOOKUP_FIXED_BYTES + self.entries.len() * LOOKUP_ENTRY_BYTES);
        put_u32(out, len_u32(Self::WHAT, self.entries.len()));
        put_zeros(out, 4);
        for e in &self.entries {
            put_u64(out, e.bytenr);
            put_i64(out, e.refs);
            put_u64(out, e.committed_refs);
            put_i64(out, e.pending_ref_mod);
            put_u64(out, e.num_bytes);
            put_u8(out, e.flags);
            put_u8(out, e.level);
            put_zeros(out, 6);
        }
    }

    /// Decodes the body: count 1 ..= [`LOOKUP_COUNT_MAX`] (as the request's),
    /// undefined flag bits refused.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        let count = r.u32()?;
        r.check_range("count", u64::from(count), 1, u64::from(LOOKUP_COUNT_MAX))?;
        r.reserved(4)?;
        let count = r.expect_entries(count, LOOKUP_ENTRY_BYTES)?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let e = LookupEntry {
                bytenr: r.u64()?,
                refs: r.i64()?,
                committed_refs: r.u64()?,
                pending_ref_mod: r.i64()?,
                num_bytes: r.u64()?,
                flags: r.u8()?,
                level: r.u8()?,
            };
            r.check_bits("flags", u64::from(e.flags), u64::from(LOOKUP_FLAGS_KNOWN))?;
            r.reserved(6)?;
            entries.push(e);
        }
        r.finish()?;
        Ok(LookupReply { entries })
    }
}

message!(LookupRequest => LookupReply, Opcode::Lookup);

// ------------------------------------------------------------- BACKREFS

/// A backref key: `(ref_type, k1, k2, k3)` as in an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct BackrefKey {
    /// 176, 178, 182 or 184.
    pub ref_type: u8,
    /// root or parent.
    pub k1: u64,
    /// objectid (178), else 0.
    pub k2: u64,
    /// offset (178), else 0.
    pub k3: u64,
}

/// BACKREFS request: one page of an extent's backrefs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackrefsRequest {
    /// The extent.
    pub bytenr: u64,
    /// Page size, 1 ..= [`BACKREFS_ENTRIES_MAX`].
    pub max_entries: u32,
    /// Start after this backref (the last one of the previous page);
    /// `None`: from the first. When absent the `after_` fields are unused
    /// and, like reserved bytes, must be zero on the wire.
    pub after: Option<BackrefKey>,
}

impl BackrefsRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let after = self.after.unwrap_or_default();
        put_u64(out, self.bytenr);
        put_u32(out, self.max_entries);
        put_u8(out, u8::from(self.after.is_some()));
        put_u8(out, after.ref_type);
        put_zeros(out, 2);
        put_u64(out, after.k1);
        put_u64(out, after.k2);
        put_u64(out, after.k3);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("BACKREFS request", body);
        if body.len() != BACKREFS_REQUEST_BYTES {
            return Err(r.wrong_size(BACKREFS_REQUEST_BYTES as u64));
        }
        let bytenr = r.u64()?;
        let max_entries = r.u32()?;
        r.check_range(
            "max_entries",
            u64::from(max_entries),
            1,
            u64::from(BACKREFS_ENTRIES_MAX),
        )?;
        let after_present = r.bool("after_present")?;
        let ref_type = r.u8()?;
        r.reserved(2)?;
        let key = BackrefKey {
            ref_type,
            k1: r.u64()?,
            k2: r.u64()?,
            k3: r.u64()?,
        };
        r.finish()?;
        if !after_present && key != BackrefKey::default() {
            return Err(BodyError::ReservedNonZero {
                what: "BACKREFS request (after_ fields without after_present)",
                offset: 13,
            });
        }
        Ok(BackrefsRequest {
            bytenr,
            max_entries,
            after: after_present.then_some(key),
        })
    }
}

/// One backref with its count (40 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackrefEntry {
    /// 176, 178, 182 or 184.
    pub ref_type: u8,
    /// Committed + pending count (never 0 from a correct server).
    pub count: i64,
    /// root or parent.
    pub k1: u64,
    /// objectid (178).
    pub k2: u64,
    /// offset (178).
    pub k3: u64,
}

impl BackrefEntry {
    /// The key, e.g. for the next page's `after`.
    pub fn key(&self) -> BackrefKey {
        BackrefKey {
            ref_type: self.ref_type,
            k1: self.k1,
            k2: self.k2,
            k3: self.k3,
        }
    }
}

/// BACKREFS reply: the extent and one page of its backrefs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackrefsReply {
    /// The extent.
    pub bytenr: u64,
    /// Its size (0: nothing known).
    pub num_bytes: u64,
    /// Committed + pending refs.
    pub refs: i64,
    /// Flags of the committed extent item (0: none).
    pub item_flags: u64,
    /// 0 tree block, 1 data, [`BACKREFS_KIND_UNKNOWN`].
    pub kind: u8,
    /// Tree block level.
    pub level: u8,
    /// Backrefs follow the last one of this page.
    pub more: bool,
    /// The page (at most [`BACKREFS_ENTRIES_MAX`]).
    pub entries: Vec<BackrefEntry>,
}

impl BackrefsReply {
    const WHAT: &'static str = "BACKREFS reply";

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(BACKREFS_REPLY_FIXED_BYTES + self.entries.len() * BACKREF_ENTRY_BYTES);
        put_u64(out, self.bytenr);
        put_u64(out, self.num_bytes);
        put_i64(out, self.refs);
        put_u64(out, self.item_flags);
        put_u8(out, self.kind);
        put_u8(out, self.level);
        put_u8(out, u8::from(self.more));
        put_zeros(out, 1);
        put_u32(out, len_u32(Self::WHAT, self.entries.len()));
        for e in &self.entries {
            put_u8(out, e.ref_type);
            put_zeros(out, 7);
            put_i64(out, e.count);
            put_u64(out, e.k1);
            put_u64(out, e.k2);
            put_u64(out, e.k3);
        }
    }

    /// Decodes the body: count at most [`BACKREFS_ENTRIES_MAX`].
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        let bytenr = r.u64()?;
        let num_bytes = r.u64()?;
        let refs = r.i64()?;
        let item_flags = r.u64()?;
        let kind = r.u8()?;
        let level = r.u8()?;
        let more = r.bool("more")?;
        r.reserved(1)?;
        let count = r.u32()?;
        r.check_range(
            "count",
            u64::from(count),
            0,
            u64::from(BACKREFS_ENTRIES_MAX),
        )?;
        let count = r.expect_entries(count, BACKREF_ENTRY_BYTES)?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let ref_type = r.u8()?;
            r.reserved(7)?;
            entries.push(BackrefEntry {
                ref_type,
                count: r.i64()?,
                k1: r.u64()?,
                k2: r.u64()?,
                k3: r.u64()?,
            });
        }
        r.finish()?;
        Ok(BackrefsReply {
            bytenr,
            num_bytes,
            refs,
            item_flags,
            kind,
            level,
            more,
            entries,
        })
    }
}

message!(BackrefsRequest => BackrefsReply, Opcode::Backrefs);

// ------------------------------------------------------------- BARRIERS

/// Decodes a body made of one u64 then `reserved` zero bytes.
fn decode_u64_body(what: &'static str, body: &[u8], reserved: usize) -> Result<u64, BodyError> {
    let mut r = Reader::new(what, body);
    let expected = 8 + reserved;
    if body.len() != expected {
        return Err(r.wrong_size(expected as u64));
    }
    let v = r.u64()?;
    r.reserved(reserved)?;
    r.finish()?;
    Ok(v)
}

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
        let name_bytes = usize::from(r.u16()?);
        check_len(
            Self::WHAT,
            "name_bytes",
            name_bytes,
            1,
            CONSUMER_NAME_BYTES_MAX,
        )?;
        r.reserved(2)?;
        if body.len() != 4 + name_bytes {
            return Err(r.wrong_size(4 + name_bytes as u64));
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
message!(crate::error::ErrorBody, Opcode::Error);

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
