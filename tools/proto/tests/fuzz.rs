//! Property tests of the whole codec on random and mutated frames.
//!
//! `fuzz_frames_one_million` builds valid frames of every message kind
//! (both directions and the error frame), mutates them (bit flips,
//! truncation, extension, length-field edits, count edits, opcode and
//! header-field edits with the checksums fixed up so the mutation reaches
//! the deeper checks, splices, pure random bytes) and feeds each result
//! to the header decoder, the [`FrameDecoder`] at a random chunking, and
//! every body decoder. The contract is
//! [`refd_proto::selftest`]'s: no panic, bounded allocation, and either a
//! typed error or a value that re-encodes to the same bytes. Unmutated
//! frames must decode to exactly the value that was encoded.
//!
//! Seeded, so a failure is reproducible: `REFD_PROTO_FUZZ_SEED=<n>`
//! changes the seed, `REFD_PROTO_FUZZ_CASES=<n>` the number of cases
//! (never fewer than one million).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use refd_proto::selftest::{all_bodies_round_trip, stream_round_trip};
use refd_proto::*;

const CASES_MIN: u64 = 1_000_000;

// ------------------------------------------------------------ generators

/// A number that is often a boundary.
fn num(rng: &mut SmallRng) -> u64 {
    match rng.gen_range(0..8) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => rng.gen_range(0..4096),
        4 => 1 << rng.gen_range(0..64),
        _ => rng.gen(),
    }
}

fn num32(rng: &mut SmallRng) -> u32 {
    num(rng) as u32
}

fn small_count(rng: &mut SmallRng, min: usize, max: usize) -> usize {
    let hi = if rng.gen_ratio(1, 64) {
        max
    } else {
        max.min(min + 8)
    };
    rng.gen_range(min..=hi)
}

fn bytes(rng: &mut SmallRng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.gen()).collect()
}

/// UTF-8 text of at most `max_bytes` bytes, with multi-byte chars.
fn text(rng: &mut SmallRng, min_bytes: usize, max_bytes: usize) -> String {
    const CHARS: [char; 6] = ['a', 'Z', '0', 'é', '€', '🦀'];
    let target = rng.gen_range(min_bytes..=max_bytes);
    let mut s = String::new();
    while s.len() < target {
        let c = CHARS[rng.gen_range(0..CHARS.len())];
        if s.len() + c.len_utf8() > max_bytes {
            break;
        }
        s.push(c);
    }
    while s.len() < min_bytes {
        s.push('x');
    }
    s
}

fn op(rng: &mut SmallRng) -> WireOp {
    let b = bytes(rng, OP_BYTES);
    let mut a = [0u8; OP_BYTES];
    a.copy_from_slice(&b);
    if rng.gen_bool(0.5) {
        WireOp::decode(&a)
    } else {
        WireOp::data_ref(
            ACTION_ADD_REF,
            num(rng),
            num(rng),
            num(rng),
            num(rng),
            num(rng),
        )
    }
}

fn gen_request(rng: &mut SmallRng) -> Request {
    match rng.gen_range(0..15) {
        0 => Request::Hello(HelloRequest {
            version_min: num(rng) as u16,
            version_max: num(rng) as u16,
            token: {
                let n = small_count(rng, 0, HELLO_TOKEN_BYTES_MAX);
                bytes(rng, n)
            },
            name: text(rng, 0, HELLO_NAME_BYTES_MAX),
        }),
        1 => Request::Register(RegisterRequest),
        2 => Request::Submit(SubmitRequest {
            session_id: num(rng),
            request_number: num(rng).max(1),
            flags: rng.gen_range(0..=SUBMIT_FLAGS_KNOWN),
            ops: (0..small_count(rng, 1, 300)).map(|_| op(rng)).collect(),
        }),
        3 => Request::Lookup(LookupRequest {
            bytenrs: (0..small_count(rng, 1, 2000)).map(|_| num(rng)).collect(),
        }),
        4 => Request::Backrefs(BackrefsRequest {
            bytenr: num(rng),
            max_entries: rng.gen_range(1..=BACKREFS_ENTRIES_MAX),
            after: rng.gen_bool(0.5).then(|| BackrefKey {
                ref_type: rng.gen(),
                k1: num(rng),
                k2: num(rng),
                k3: num(rng),
            }),
        }),
        5 => Request::BarrierAcquire(BarrierAcquireRequest {
            session_id: num(rng),
        }),
        6 => Request::BarrierRenew(BarrierRenewRequest {
            barrier_id: num(rng),
        }),
        7 => Request::BarrierRelease(BarrierReleaseRequest {
            barrier_id: num(rng),
        }),
        8 => Request::Commit(CommitRequest),
        9 => Request::FreedSubscribe(FreedSubscribeRequest {
            name: text(rng, 1, CONSUMER_NAME_BYTES_MAX),
        }),
        10 => Request::Freed(FreedRequest {
            generation: num(rng),
            index: num32(rng),
            max_extents: rng.gen_range(1..=FREED_EXTENTS_MAX),
        }),
        11 => Request::FreedAck(FreedAckRequest {
            consumer_id: num(rng),
            generation: num(rng),
        }),
        12 => Request::Stats(StatsRequest),
        13 => Request::FreedUnsubscribe(FreedUnsubscribeRequest {
            consumer_id: num(rng),
        }),
        _ => Request::Ping(PingRequest {
            payload: {
                let n = rng.gen_range(0..=PING_BYTES_MAX);
                bytes(rng, n)
            },
        }),
    }
}

fn lookup_entry(rng: &mut SmallRng) -> LookupEntry {
    LookupEntry {
        bytenr: num(rng),
        refs: num(rng) as i64,
        committed_refs: num(rng),
        pending_ref_mod: num(rng) as i64,
        num_bytes: num(rng),
        flags: rng.gen_range(0..=LOOKUP_FLAGS_KNOWN),
        level: rng.gen(),
    }
}

fn backref_entry(rng: &mut SmallRng) -> BackrefEntry {
    BackrefEntry {
        ref_type: rng.gen(),
        count: num(rng) as i64,
        k1: num(rng),
        k2: num(rng),
        k3: num(rng),
    }
}

fn freed_extent(rng: &mut SmallRng) -> FreedExtent {
    FreedExtent {
        generation: num(rng),
        bytenr: num(rng),
        num_bytes: num(rng),
        kind: rng.gen(),
        level: rng.gen(),
    }
}

fn gen_reply(rng: &mut SmallRng) -> Reply {
    match rng.gen_range(0..16) {
        0 => Reply::Hello(HelloReply {
            version: num(rng) as u16,
            body_bytes_max: num32(rng),
            submit_ops_max: num32(rng),
            in_flight_max: num32(rng),
            fs_id: rng.gen(),
            generation: num(rng),
            server_id: num(rng),
            barrier_lease_ms: num32(rng),
            session_replies_kept: num32(rng),
        }),
        1 => Reply::Register(RegisterReply {
            session_id: num(rng),
        }),
        2 => Reply::Submit(SubmitReply {
            lsn: num(rng),
            op_count: num32(rng),
            flags: rng.gen_range(0..=SUBMIT_REPLY_FLAGS_KNOWN),
            request_number: num(rng),
        }),
        5 => Reply::BarrierAcquire(BarrierAcquireReply {
            barrier_id: num(rng),
            seq: num(rng),
            lease_ms: num32(rng),
        }),
        6 => Reply::BarrierRenew(BarrierRenewReply {
            lease_ms: num32(rng),
        }),
        7 => Reply::BarrierRelease(BarrierReleaseReply),
        8 => Reply::Commit(CommitReply {
            generation: num(rng),
            ops: num(rng),
            heads: num(rng),
            applied: num(rng),
            freed: num(rng),
            held: num(rng),
            quarantined: num(rng),
            took_us: num(rng),
        }),
        9 => Reply::FreedSubscribe(FreedSubscribeReply {
            consumer_id: num(rng),
            acked_generation: num(rng),
            oldest_kept: num(rng),
        }),
        11 => Reply::FreedAck(FreedAckReply {
            acked_generation: num(rng),
        }),
        12 => Reply::FreedUnsubscribe(FreedUnsubscribeReply {
            acked_generation: num(rng),
        }),
        _ => gen_variable_reply(rng),
    }
}

/// The replies with lists and text.
fn gen_variable_reply(rng: &mut SmallRng) -> Reply {
    match rng.gen_range(0..6) {
        0 => Reply::Lookup(LookupReply {
            entries: (0..small_count(rng, 1, 300))
                .map(|_| lookup_entry(rng))
                .collect(),
        }),
        1 => Reply::Backrefs(BackrefsReply {
            bytenr: num(rng),
            num_bytes: num(rng),
            refs: num(rng) as i64,
            item_flags: num(rng) & ITEM_FLAGS_KNOWN,
            kind: rng.gen(),
            level: rng.gen(),
            more: rng.gen(),
            entries: (0..small_count(rng, 0, 300))
                .map(|_| backref_entry(rng))
                .collect(),
        }),
        2 => Reply::Freed(FreedReply {
            more: rng.gen(),
            next_generation: num(rng),
            next_index: num32(rng),
            oldest_kept: num(rng),
            extents: (0..small_count(rng, 0, 300))
                .map(|_| freed_extent(rng))
                .collect(),
        }),
        3 => Reply::Stats(StatsReply {
            json: text(rng, 0, 200),
        }),
        4 => Reply::Ping(PingReply {
            payload: {
                let n = rng.gen_range(0..=PING_BYTES_MAX);
                bytes(rng, n)
            },
        }),
        _ => Reply::Error(ErrorBody {
            code: ErrorCode::ALL[rng.gen_range(0..ErrorCode::ALL.len())],
            subcode: num(rng) as u16,
            index: num32(rng),
            detail: num(rng),
            message: {
                let max = small_count(rng, 0, ERROR_MESSAGE_BYTES_MAX);
                text(rng, 0, max)
            },
        }),
    }
}

// ------------------------------------------------------------- mutations

/// Rewrites the header checksum so that a header edit is trusted.
fn fix_header_crc(frame: &mut [u8]) {
    if frame.len() >= HEADER_BYTES {
        let crc = crc32c(&frame[..28]);
        frame[28..32].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Rewrites `body_bytes` and both checksums after a body edit, so that the
/// mutated body reaches the body decoders.
fn refit(frame: &mut [u8]) {
    if frame.len() >= HEADER_BYTES {
        let body_bytes = (frame.len() - HEADER_BYTES) as u32;
        let crc = crc32c(&frame[HEADER_BYTES..]);
        frame[16..20].copy_from_slice(&body_bytes.to_le_bytes());
        frame[20..24].copy_from_slice(&crc.to_le_bytes());
        fix_header_crc(frame);
    }
}

fn interesting_u32(rng: &mut SmallRng) -> u32 {
    const V: [u32; 12] = [0, 1, 2, 63, 64, 65, 256, 257, 16384, 16385, 65536, u32::MAX];
    if rng.gen_bool(0.7) {
        V[rng.gen_range(0..V.len())]
    } else {
        rng.gen()
    }
}

#[derive(Debug, Default)]
struct Stats {
    by_mutation: [u64; 12],
    frames_decoded: u64,
    bodies_accepted: u64,
    frame_errors: u64,
    direct_bodies_accepted: u64,
}

/// A body edit reaching the decoders: a count or length field, a byte,
/// or an inserted/removed byte; then the frame is refitted.
fn edit_body(rng: &mut SmallRng, f: &mut Vec<u8>, body_len: usize) {
    match rng.gen_range(0..4) {
        0 if body_len >= 4 => {
            let at = HEADER_BYTES + rng.gen_range(0..=body_len - 4);
            f[at..at + 4].copy_from_slice(&interesting_u32(rng).to_le_bytes());
        }
        1 => {
            let at = HEADER_BYTES + rng.gen_range(0..body_len);
            f[at] = [0, 1, 2, 0x7F, 0x80, 0xFF][rng.gen_range(0..6)];
        }
        2 => {
            let at = HEADER_BYTES + rng.gen_range(0..body_len);
            f.remove(at);
        }
        _ => {
            let at = HEADER_BYTES + rng.gen_range(0..=body_len);
            f.insert(at, rng.gen());
        }
    }
    refit(f);
}

/// Mutates one encoded frame in place; returns the mutation's number.
fn mutate(rng: &mut SmallRng, f: &mut Vec<u8>) -> usize {
    let m = rng.gen_range(0..12);
    let len = f.len();
    let body_len = len - HEADER_BYTES;
    match m {
        0 => {} // unmutated (checked for equality by the caller)
        1 => {
            for _ in 0..rng.gen_range(1..=4) {
                let bit = rng.gen_range(0..len * 8);
                f[bit / 8] ^= 1 << (bit % 8);
            }
        }
        2 => f.truncate(rng.gen_range(0..len)),
        3 => {
            let n = rng.gen_range(1..64);
            let extra = bytes(rng, n);
            f.extend_from_slice(&extra);
        }
        4 => {
            // Length field edit, trusted (header CRC fixed).
            let v = match rng.gen_range(0..3) {
                0 => (body_len as i64 + rng.gen_range(-8i64..=8)).max(0) as u32,
                1 => interesting_u32(rng),
                _ => rng.gen(),
            };
            f[16..20].copy_from_slice(&v.to_le_bytes());
            fix_header_crc(f);
        }
        5 | 6 if body_len >= 2 => {
            edit_body(rng, f, body_len);
        }
        7 => {
            // Another opcode for the same body.
            f[6] = [
                0, 1, 3, 4, 5, 0x0A, 0x0B, 0x0E, 0x0F, 0x10, 0x7F, 0x80, 0xFF,
            ][rng.gen_range(0..13)];
            fix_header_crc(f);
        }
        8 => {
            // Header field edits with the CRC fixed: version, flags,
            // reserved, magic.
            let at = [0, 3, 4, 5, 7, 7, 24, 27][rng.gen_range(0..8)];
            f[at] ^= 1 << rng.gen_range(0..8);
            fix_header_crc(f);
        }
        9 => {
            let n = rng.gen_range(0..200);
            *f = bytes(rng, n);
        }
        10 if body_len > 0 => {
            // Truncate or extend the body, keeping the frame consistent.
            let new_len = rng.gen_range(0..body_len * 2 + 2);
            f.resize(HEADER_BYTES + new_len, rng.gen());
            refit(f);
        }
        _ => {
            let at = rng.gen_range(0..len);
            f[at] = rng.gen();
        }
    }
    m
}

// ------------------------------------------------------------------ test

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn encode_random(rng: &mut SmallRng, id: u64, out: &mut Vec<u8>) -> (Option<Request>, Reply) {
    if rng.gen_bool(0.5) {
        let req = gen_request(rng);
        encode_request(id, &req, out);
        (Some(req), Reply::Ping(PingReply::default()))
    } else {
        let rep = gen_reply(rng);
        encode_reply(id, &rep, out);
        (None, rep)
    }
}

/// Decodes an unmutated frame and checks it is the value encoded.
fn check_exact(frame: &[u8], sent: &(Option<Request>, Reply)) {
    let mut input = frame;
    let mut dec = FrameDecoder::new(BODY_BYTES_MAX_DEFAULT);
    let got = dec.decode_from(&mut input).unwrap().unwrap();
    assert!(input.is_empty());
    match &sent.0 {
        Some(req) => {
            assert!(!got.header.is_reply());
            assert_eq!(&Request::decode(got.header.opcode, &got.body).unwrap(), req);
        }
        None => {
            assert!(got.header.is_reply());
            assert_eq!(Reply::decode(got.header.opcode, &got.body).unwrap(), sent.1);
        }
    }
}

fn one_case(rng: &mut SmallRng, stats: &mut Stats) {
    let mut frame = Vec::new();
    let id = num(rng);
    let sent = encode_random(rng, id, &mut frame);
    let m = mutate(rng, &mut frame);
    stats.by_mutation[m] += 1;
    if m == 0 {
        check_exact(&frame, &sent);
    }
    // Sometimes a stream of several frames (the mutated one in the middle).
    let mut stream = Vec::new();
    if rng.gen_ratio(1, 8) {
        encode_random(rng, 1, &mut stream);
    }
    stream.extend_from_slice(&frame);
    if rng.gen_ratio(1, 8) {
        encode_random(rng, 2, &mut stream);
    }
    let limit = if rng.gen_ratio(1, 16) {
        rng.gen_range(0..512)
    } else {
        BODY_BYTES_MAX_DEFAULT
    };
    let chunk = if rng.gen_bool(0.5) {
        stream.len().max(1)
    } else {
        rng.gen_range(1..=64)
    };
    let expected = match rng.gen_range(0..3) {
        0 => None,
        1 => Some(Direction::Request),
        _ => Some(Direction::Reply),
    };
    let outcome = stream_round_trip(&stream, limit, chunk, expected);
    stats.frames_decoded += outcome.frames as u64;
    stats.bodies_accepted += outcome.bodies_accepted as u64;
    stats.frame_errors += u64::from(outcome.error.is_some());
    // The (mutated) body straight to every body decoder.
    if rng.gen_ratio(1, 4) {
        let body = frame.get(HEADER_BYTES..).unwrap_or(&frame[..]);
        stats.direct_bodies_accepted += all_bodies_round_trip(body) as u64;
    }
}

#[test]
fn fuzz_frames_one_million() {
    let seed = env_u64("REFD_PROTO_FUZZ_SEED").unwrap_or(0x5EED_F00D);
    let cases = env_u64("REFD_PROTO_FUZZ_CASES")
        .unwrap_or(CASES_MIN)
        .max(CASES_MIN);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    let started = std::time::Instant::now();
    for _ in 0..cases {
        one_case(&mut rng, &mut stats);
    }
    println!(
        "seed {seed:#x}: {cases} cases in {:.2?}: {stats:?}",
        started.elapsed()
    );
    // The harness reached every layer, many times.
    assert!(stats.by_mutation.iter().all(|&n| n > cases / 20));
    assert!(stats.frames_decoded > cases / 4);
    assert!(stats.frame_errors > cases / 4);
    assert!(stats.bodies_accepted > cases / 4);
    assert!(stats.direct_bodies_accepted > cases / 8);
}

#[test]
fn random_bytes_never_break_the_header_decoder() {
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..100_000 {
        let mut h = [0u8; HEADER_BYTES];
        rng.fill(&mut h[..]);
        if rng.gen_bool(0.5) {
            h[..4].copy_from_slice(&MAGIC);
            h[4..6].copy_from_slice(&VERSION.to_le_bytes());
            fix_header_crc(&mut h);
        }
        let limit = num32(&mut rng);
        match decode_header(&h, limit) {
            Ok(header) => {
                assert_eq!(header.encode(), h);
                assert!(header.body_bytes <= limit);
            }
            Err(e) => {
                let _ = (e.code(), e.error_body(), e.reply_request_id());
            }
        }
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips(opcode: u8, reply: bool, request_id: u64, body_bytes: u32, crc: u32) {
            let h = FrameHeader {
                version: VERSION,
                opcode,
                flags: if reply { FLAG_REPLY } else { 0 },
                request_id,
                body_bytes,
                body_crc32c: crc,
            };
            let b = h.encode();
            prop_assert_eq!(decode_header(&b, u32::MAX), Ok(h));
            let limit = body_bytes.saturating_sub(1);
            if body_bytes > 0 {
                let too_large = matches!(
                    decode_header(&b, limit),
                    Err(FrameError::TooLarge { .. })
                );
                prop_assert!(too_large);
            }
        }

        #[test]
        fn submit_round_trips(session_id: u64, request_number in 1u64.., flags in 0u32..4,
                              raw in proptest::collection::vec(any::<u8>(), OP_BYTES..OP_BYTES * 40)) {
            let ops: Vec<WireOp> = raw
                .chunks_exact(OP_BYTES)
                .map(|c| {
                    let mut a = [0u8; OP_BYTES];
                    a.copy_from_slice(c);
                    WireOp::decode(&a)
                })
                .collect();
            let mut body = Vec::new();
            encode_submit(session_id, request_number, flags, &ops, &mut body);
            let view = SubmitRequest::parse(&body).unwrap();
            prop_assert_eq!(view.ops().collect::<Vec<_>>(), ops);
            for (i, c) in raw.chunks_exact(OP_BYTES).enumerate() {
                prop_assert_eq!(&view.op(i).unwrap().encode()[..], c);
            }
        }
    }
}
