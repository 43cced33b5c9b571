//! Arbitrary bytes against every decoder of refd-proto, with the
//! contract of `refd_proto::selftest` (no panic, bounded allocation, a
//! typed error or a value that re-encodes to the same bytes).
//!
//! The first input byte steers: its low 6 bits are the chunk size the
//! stream is fed in, its top 2 bits the direction the frame decoder
//! expects. The rest is used three ways: as a raw stream (the fuzzer has
//! to find magic and checksums itself), as a body for every opcode's
//! request and reply decoder, and wrapped into a frame with valid
//! checksums (opcode and flags from its first two bytes) so that the
//! body decoders are reached through the frame path too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refd_proto::selftest::{all_bodies_round_trip, stream_round_trip};
use refd_proto::{Direction, FrameHeader, BODY_BYTES_MAX_DEFAULT, FLAG_REPLY};

/// A small limit for the raw stream, so FRAME_TOO_LARGE is reachable.
const RAW_BODY_BYTES_MAX: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let chunk_bytes = usize::from(steer & 0x3F) + 1;
    let expected = match steer >> 6 {
        1 => Some(Direction::Request),
        2 => Some(Direction::Reply),
        _ => None,
    };
    stream_round_trip(rest, RAW_BODY_BYTES_MAX, chunk_bytes, expected);
    all_bodies_round_trip(rest);
    if let [opcode, flags, body @ ..] = rest {
        let header = FrameHeader::for_body(*opcode, *flags & FLAG_REPLY, 1, body);
        let mut frame = header.encode().to_vec();
        frame.extend_from_slice(body);
        let outcome = stream_round_trip(&frame, BODY_BYTES_MAX_DEFAULT, chunk_bytes, None);
        assert_eq!((outcome.frames, outcome.error), (1, None));
    }
});
