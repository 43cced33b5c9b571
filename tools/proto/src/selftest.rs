//! Round-trip checks shared by the property test of the normal test run
//! (`tests/fuzz.rs`) and the cargo-fuzz target (`fuzz/`), so both hold
//! the decoders to the same contract on arbitrary bytes:
//!
//! - no decoder panics;
//! - a decoder either refuses with a typed error or returns a value that
//!   re-encodes to exactly the bytes it came from;
//! - the heap a decoded value holds is at most the length of its body,
//!   and the frame decoder never holds more than the header plus its
//!   limit;
//! - the incremental [`FrameDecoder`] and the one-shot
//!   [`decode_header`](crate::decode_header) + [`check_body`] agree,
//!   whatever the chunking of the stream.
//!
//! These functions panic when the contract is broken: that is their job.
//! They are public only so that the fuzz crate can call them.

use crate::decoder::{Frame, FrameDecoder};
use crate::dispatch::{Reply, Request};
use crate::error::BodyError;
use crate::frame::{check_body, decode_header_inner, Direction, FrameError, Opcode, HEADER_BYTES};
use crate::message::SubmitRequest;
use crate::op::WireOp;

/// Which decoders accepted a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepted {
    /// [`Request::decode`] returned a value.
    pub request: bool,
    /// [`Reply::decode`] returned a value.
    pub reply: bool,
}

/// Runs the request and the reply decoder of `opcode` on `body` and
/// checks the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn body_round_trip(opcode: u8, body: &[u8]) -> Accepted {
    let request = match Request::decode(opcode, body) {
        Ok(req) => {
            assert_reencodes("request", opcode, body, |o| req.encode(o));
            assert_eq!(req.opcode().as_u8(), opcode);
            let heap = request_heap_bytes(&req);
            assert!(
                heap <= body.len(),
                "request {opcode:#x}: heap {heap} > body"
            );
            true
        }
        Err(e) => touch(&e),
    };
    if opcode == Opcode::Submit.as_u8() {
        check_submit_view(body, request);
    }
    let reply = match Reply::decode(opcode, body) {
        Ok(rep) => {
            assert_reencodes("reply", opcode, body, |o| rep.encode(o));
            assert_eq!(rep.opcode().as_u8(), opcode);
            let heap = reply_heap_bytes(&rep);
            assert!(heap <= body.len(), "reply {opcode:#x}: heap {heap} > body");
            true
        }
        Err(e) => touch(&e),
    };
    Accepted { request, reply }
}

/// Opcodes [`all_bodies_round_trip`] tries: every known one and a few
/// unknown ones.
pub const OPCODES_TRIED: [u8; 20] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F,
    0x10, 0x7E, 0x7F, 0xFF,
];

/// [`body_round_trip`] under every opcode of [`OPCODES_TRIED`]; returns
/// how many decoders accepted the body.
///
/// # Panics
///
/// If the contract is broken.
pub fn all_bodies_round_trip(body: &[u8]) -> usize {
    OPCODES_TRIED
        .iter()
        .map(|&op| {
            let a = body_round_trip(op, body);
            usize::from(a.request) + usize::from(a.reply)
        })
        .sum()
}

/// The end of a stream fed to [`stream_round_trip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOutcome {
    /// Whole frames decoded.
    pub frames: usize,
    /// Body decoders that accepted a frame's body.
    pub bodies_accepted: usize,
    /// The error that stopped the stream, if any.
    pub error: Option<FrameError>,
}

/// Feeds `stream` to a [`FrameDecoder`] in pieces of `chunk_bytes`,
/// checks every frame and error against the one-shot functions and the
/// stream's bytes, and runs [`body_round_trip`] on every body.
///
/// # Panics
///
/// If the contract is broken.
pub fn stream_round_trip(
    stream: &[u8],
    body_bytes_max: u32,
    chunk_bytes: usize,
    expected: Option<Direction>,
) -> StreamOutcome {
    let mut decoder = match expected {
        Some(d) => FrameDecoder::expecting(body_bytes_max, d),
        None => FrameDecoder::new(body_bytes_max),
    };
    let held_max = HEADER_BYTES + body_bytes_max as usize;
    let mut out = StreamOutcome {
        frames: 0,
        bodies_accepted: 0,
        error: None,
    };
    let mut frame_start = 0usize;
    let mut consumed = 0usize;
    for piece in stream.chunks(chunk_bytes.max(1)) {
        let mut input = piece;
        loop {
            let before = input.len();
            let result = decoder.decode_from(&mut input);
            consumed += before - input.len();
            assert!(decoder.buffered_bytes() <= held_max);
            match result {
                Ok(Some(frame)) => {
                    let at = frame_start;
                    frame_start += HEADER_BYTES + frame.body.len();
                    assert_eq!(
                        consumed, frame_start,
                        "decoder took bytes of the next frame"
                    );
                    let a = check_frame(stream, at, &frame, body_bytes_max, expected);
                    out.frames += 1;
                    out.bodies_accepted += usize::from(a.request) + usize::from(a.reply);
                }
                Ok(None) => break,
                Err(e) => {
                    check_error(stream, frame_start, &e, body_bytes_max, expected);
                    assert_eq!(decoder.push(input), 0, "a failed decoder took bytes");
                    assert_eq!(decoder.next_frame(), Err(e.clone()));
                    out.error = Some(e);
                    return out;
                }
            }
        }
    }
    assert_eq!(consumed, stream.len());
    assert_eq!(decoder.buffered_bytes(), stream.len() - frame_start);
    assert_eq!(decoder.is_idle(), frame_start == stream.len());
    out
}

fn header_at(stream: &[u8], at: usize) -> Option<[u8; HEADER_BYTES]> {
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(stream.get(at..at.checked_add(HEADER_BYTES)?)?);
    Some(h)
}

fn check_frame(
    stream: &[u8],
    at: usize,
    frame: &Frame,
    body_bytes_max: u32,
    expected: Option<Direction>,
) -> Accepted {
    let raw = header_at(stream, at).expect("a frame past the end of the stream");
    assert_eq!(frame.header.encode(), raw, "header does not re-encode");
    assert_eq!(
        decode_header_inner(&raw, body_bytes_max, expected),
        Ok(frame.header)
    );
    let body_at = at + HEADER_BYTES;
    assert_eq!(
        &stream[body_at..body_at + frame.body.len()],
        &frame.body[..]
    );
    assert_eq!(frame.body.len() as u64, u64::from(frame.header.body_bytes));
    assert!(frame.body.len() <= body_bytes_max as usize);
    assert!(
        frame.body.capacity() <= frame.body.len(),
        "body buffer above its length"
    );
    assert_eq!(check_body(&frame.header, &frame.body), Ok(()));
    body_round_trip(frame.header.opcode, &frame.body)
}

fn check_error(
    stream: &[u8],
    at: usize,
    e: &FrameError,
    body_bytes_max: u32,
    expected: Option<Direction>,
) {
    let _ = (e.code(), e.error_body(), e.to_string());
    let raw = header_at(stream, at).expect("an error before a whole header");
    match decode_header_inner(&raw, body_bytes_max, expected) {
        Err(one_shot) => assert_eq!(&one_shot, e),
        Ok(header) => {
            let body_at = at + HEADER_BYTES;
            let body = &stream[body_at..body_at + header.body_bytes as usize];
            assert_eq!(check_body(&header, body).as_ref(), Err(e));
        }
    }
    let trusted = !matches!(
        e,
        FrameError::BadMagic { .. }
            | FrameError::UnsupportedVersion { .. }
            | FrameError::HeaderChecksum { .. }
    );
    assert_eq!(e.request_id().is_some(), trusted);
}

/// The borrowing SUBMIT parser agrees with the owned decoder.
fn check_submit_view(body: &[u8], owned_ok: bool) {
    // With the server's limit: the same verdict, except that a body the
    // unlimited parse accepts may carry too many ops (checked before the
    // request number and flags, so a limited refusal of another kind
    // means the unlimited parse refused too).
    const LIMIT: u32 = 8;
    match (
        SubmitRequest::parse_limited(body, LIMIT),
        SubmitRequest::parse(body),
    ) {
        (Ok(limited), unlimited) => assert_eq!(Ok(limited), unlimited),
        (Err(BodyError::TooManyOps { op_count, .. }), unlimited) => {
            assert!(op_count == 0 || op_count > LIMIT);
            let _ = touch(&BodyError::TooManyOps {
                op_count,
                submit_ops_max: LIMIT,
            });
            assert!(op_count > 0 || unlimited == Err(BodyError::NoOps));
        }
        (Err(limited), unlimited) => assert!(unlimited.is_err(), "{limited}"),
    }
    match SubmitRequest::parse(body) {
        Ok(view) => {
            assert!(owned_ok, "parse accepted what decode refused");
            let mut again = Vec::new();
            view.encode(&mut again);
            assert_eq!(again, body);
            let ops: Vec<WireOp> = view.ops().collect();
            assert_eq!(ops.len(), view.op_count());
            for (i, op) in ops.iter().enumerate() {
                assert_eq!(view.op(i), Some(*op));
            }
            assert_eq!(view.op(view.op_count()), None);
            assert_eq!(view.op(usize::MAX), None);
            assert_eq!(SubmitRequest::decode(body), Ok(view.to_request()));
        }
        Err(e) => {
            assert!(!owned_ok, "decode accepted what parse refused");
            touch(&e);
        }
    }
}

fn assert_reencodes(side: &str, opcode: u8, body: &[u8], encode: impl FnOnce(&mut Vec<u8>)) {
    let mut again = Vec::with_capacity(body.len());
    encode(&mut again);
    assert_eq!(again, body, "{side} {opcode:#x} does not re-encode");
}

/// Exercises an error's methods (they must not panic); returns false.
fn touch(e: &BodyError) -> bool {
    let _ = (e.code(), e.error_body(), e.to_string());
    false
}

fn request_heap_bytes(req: &Request) -> usize {
    match req {
        Request::Hello(h) => h.token.capacity() + h.name.capacity(),
        Request::Submit(s) => s.ops.capacity() * std::mem::size_of::<WireOp>(),
        Request::Lookup(l) => l.bytenrs.capacity() * std::mem::size_of::<u64>(),
        Request::FreedSubscribe(f) => f.name.capacity(),
        Request::Ping(p) => p.payload.capacity(),
        _ => 0,
    }
}

fn reply_heap_bytes(rep: &Reply) -> usize {
    fn vec_bytes<T>(v: &Vec<T>) -> usize {
        v.capacity() * std::mem::size_of::<T>()
    }
    match rep {
        Reply::Lookup(l) => vec_bytes(&l.entries),
        Reply::Backrefs(b) => vec_bytes(&b.entries),
        Reply::Freed(f) => vec_bytes(&f.extents),
        Reply::Stats(s) => s.json.capacity(),
        Reply::Ping(p) => p.payload.capacity(),
        Reply::Error(e) => e.message.capacity(),
        _ => 0,
    }
}
