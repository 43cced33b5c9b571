//! refd-proto: the wire codec of the refd daemon, exactly as
//! `docs/protocol.md` specifies it. Pure encode and decode: no I/O, no
//! dependency on the other refd crates, so the server (`tools/refd`),
//! the client (`tools/client`) and a fuzzer all use the same bytes.
//!
//! Module map, in the order a frame is read:
//! - [`frame`]: the 32-byte header, opcodes, the five header checks in
//!   the spec's order ([`decode_header`]) and the body checksum
//!   ([`check_body`]); [`FrameError`] maps to the wire error code and says
//!   whether the `request_id` can be trusted;
//! - [`decoder`]: [`FrameDecoder`], an incremental frame reader that
//!   never holds more than one header plus the body limit;
//! - [`message`]: the request and reply body of every opcode, with the
//!   spec's limits as constants, one file per group of opcodes; SUBMIT
//!   has a zero-copy [`SubmitRequest::parse_limited`] for the server,
//!   which runs the spec's SUBMIT checks in order;
//! - [`op`]: the 56-byte [`WireOp`] of a SUBMIT (plain numbers; the server
//!   validates their meaning);
//! - [`error`]: wire error codes ([`ErrorCode`], [`OpErrorCode`]), the
//!   error frame body ([`ErrorBody`]) and the decoders' [`BodyError`];
//! - [`dispatch`]: [`Request`] and [`Reply`] over all opcodes, and
//!   whole-frame encoders;
//! - [`selftest`]: the round-trip contract checked by the property test
//!   and the cargo-fuzz target (`fuzz/`).
//!
//! The contract every decoder keeps: it checks sizes, ranges, reserved
//! bytes, flag bits and UTF-8 before it allocates, never allocates more
//! than the body it reads, never panics, and returns either a typed error
//! or a value that re-encodes to exactly the bytes it was read from.
//!
//! A server reading one request:
//!
//! ```
//! use refd_proto::*;
//! // What a client sends.
//! let mut wire = Vec::new();
//! let ping = Request::Ping(PingRequest::new(b"hi").unwrap());
//! encode_request(42, &ping, &mut wire);
//!
//! // The server side.
//! let mut decoder = FrameDecoder::expecting(BODY_BYTES_MAX_DEFAULT, Direction::Request);
//! let mut input = &wire[..];
//! let frame = decoder.decode_from(&mut input).unwrap().unwrap();
//! let reply = match Request::decode(frame.header.opcode, &frame.body) {
//!     Ok(Request::Ping(p)) => Reply::Ping(PingReply { payload: p.payload }),
//!     Ok(_) => unreachable!(),
//!     Err(e) => Reply::Error(e.error_body()),
//! };
//! let mut answer = Vec::new();
//! encode_reply(frame.header.request_id, &reply, &mut answer);
//! assert_eq!(answer.len(), HEADER_BYTES + 2);
//! ```

pub mod decoder;
pub mod dispatch;
pub mod error;
pub mod frame;
pub mod message;
pub mod op;
pub mod selftest;
mod wire;

pub use decoder::{Frame, FrameDecoder};
pub use dispatch::{
    encode_reply, encode_reply_message, encode_request, encode_request_message, Reply, Request,
};
pub use error::{
    BodyError, ErrorBody, ErrorCode, OpErrorCode, ERROR_BODY_FIXED_BYTES, ERROR_MESSAGE_BYTES_MAX,
    INDEX_NONE,
};
pub use frame::{
    check_body, crc32c, decode_header, decode_header_expecting, encode_frame, encode_frame_with,
    Direction, FrameError, FrameHeader, Opcode, BODY_BYTES_MAX_DEFAULT, FLAGS_KNOWN, FLAG_REPLY,
    HEADER_BYTES, MAGIC, VERSION,
};
pub use message::*;
pub use op::*;
