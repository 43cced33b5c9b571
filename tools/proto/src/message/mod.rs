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
//!
//! One file per group of opcodes, every item re-exported here: `hello`
//! (HELLO, REGISTER), `submit`, `lookup` (LOOKUP, BACKREFS), `barrier`,
//! `commit` (COMMIT, STATS, PING) and `freed`.

use crate::error::BodyError;
use crate::frame::Opcode;
use crate::wire::Reader;

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

mod barrier;
mod commit;
mod freed;
mod hello;
mod lookup;
mod submit;

pub use barrier::*;
pub use commit::*;
pub use freed::*;
pub use hello::*;
pub use lookup::*;
pub use submit::*;

message!(crate::error::ErrorBody, Opcode::Error);

#[cfg(test)]
mod tests;
