//! HELLO (version range, token, name; the server's limits) and REGISTER
//! (a client session), `docs/protocol.md` "HELLO" and "REGISTER".

use super::{check_len, decode_empty, Message, RequestMessage};
use crate::error::BodyError;
use crate::frame::Opcode;
use crate::wire::{len_u16, put_u16, put_u32, put_u64, put_zeros, Reader};

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

const _: () =
    assert!(HELLO_FIXED_BYTES + HELLO_TOKEN_BYTES_MAX + HELLO_NAME_BYTES_MAX <= u16::MAX as usize);

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

    /// The version a server speaking `lowest..=highest` chooses: the
    /// highest one both sides speak. `None` when there is none, an empty
    /// range (`version_max < version_min`) included: the server answers
    /// [`ErrorBody::unsupported_version`](crate::ErrorBody::unsupported_version) and closes.
    pub fn choose_version(&self, lowest: u16, highest: u16) -> Option<u16> {
        let hi = self.version_max.min(highest);
        let lo = self.version_min.max(lowest);
        (self.version_min <= self.version_max && lo <= hi).then_some(hi)
    }

    /// Decodes the body. An empty version range is not refused here: the
    /// server answers it `UNSUPPORTED_VERSION` (see
    /// [`choose_version`](Self::choose_version)). A name that is not UTF-8
    /// is [`BodyError::BadUtf8`] (`BAD_REQUEST`).
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        r.fixed(HELLO_FIXED_BYTES)?;
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
