//! Unit tests of every body: exact layouts written by hand from the
//! spec's tables, round trips, and the refusals the spec asks for.

use super::*;
use crate::dispatch::{encode_reply, encode_request, Reply, Request};
use crate::error::{ErrorBody, ErrorCode};
use crate::frame::{decode_header, Opcode, HEADER_BYTES};
use crate::op::{WireOp, ACTION_ADD_EXTENT, ACTION_ADD_REF, OP_BYTES};

fn enc<M: Message>(m: &M) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut out);
    out
}

/// Encodes, decodes, compares, and checks the enums agree.
fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Vec<u8> {
    let bytes = enc(m);
    assert_eq!(&M::decode(&bytes).unwrap(), m);
    bytes
}

fn le(v: u64, n: usize) -> Vec<u8> {
    v.to_le_bytes()[..n].to_vec()
}

#[test]
fn submit_exact_layout() {
    let ops = [
        WireOp::tree_ref(ACTION_ADD_EXTENT, 0x10000, 0x4000, 5, 1),
        WireOp::data_ref(ACTION_ADD_REF, 0x20000, 0x1000, 5, 257, 0),
    ];
    let mut out = Vec::new();
    encode_submit(0xAB, 7, SUBMIT_NO_WAIT | SUBMIT_STAMP_SEQ, &ops, &mut out);
    #[rustfmt::skip]
    let head: Vec<u8> = [
        &[0xAB, 0, 0, 0, 0, 0, 0, 0][..], // session_id
        &[7, 0, 0, 0, 0, 0, 0, 0],        // request_number
        &[2, 0, 0, 0],                    // op_count
        &[3, 0, 0, 0],                    // flags NO_WAIT | STAMP_SEQ
    ]
    .concat();
    #[rustfmt::skip]
    let op0: Vec<u8> = [
        &[0, 0, 1, 0, 0, 0, 0, 0][..],    // bytenr 0x10000
        &[0, 0x40, 0, 0, 0, 0, 0, 0],     // num_bytes 0x4000
        &[0; 8],                          // seq
        &[5, 0, 0, 0, 0, 0, 0, 0],        // k1 root
        &[0; 8], &[0; 8],                 // k2, k3
        &[3, 176, 0, 1, 0, 0, 0, 0],      // ADD_EXTENT, TREE_BLOCK_REF, tree, level 1
    ]
    .concat();
    let expected = [head, op0, ops[1].encode().to_vec()].concat();
    assert_eq!(out.len(), SUBMIT_FIXED_BYTES + 2 * OP_BYTES);
    assert_eq!(out, expected);

    let view = SubmitRequest::parse(&out).unwrap();
    assert_eq!(view.session_id, 0xAB);
    assert_eq!(view.request_number, 7);
    assert_eq!(view.op_count(), 2);
    assert_eq!(view.ops().collect::<Vec<_>>(), ops);
    assert_eq!(view.op(1), Some(ops[1]));
    assert_eq!(view.op(2), None);
    assert_eq!(view.ops_bytes().len(), 2 * OP_BYTES);
    let owned = SubmitRequest::decode(&out).unwrap();
    assert_eq!(owned.ops, ops);
    assert_eq!(owned.ops.capacity(), 2);
    assert_eq!(round_trip(&owned), out);
}

#[test]
fn submit_refusals() {
    let op = WireOp::shared_data_ref(ACTION_ADD_REF, 1, 2, 3);
    let body = |n: u64, flags: u32, ops: usize| {
        let mut out = Vec::new();
        encode_submit(1, n, flags, &vec![op; ops], &mut out);
        out
    };
    // op_count 0 with a consistent size: TOO_MANY_OPS.
    let e = SubmitRequest::parse(&body(1, 0, 0)).unwrap_err();
    assert_eq!(e, BodyError::NoOps);
    assert_eq!(e.code(), ErrorCode::TooManyOps);
    // Undefined flag bits, request number 0: BAD_REQUEST.
    let e = SubmitRequest::parse(&body(1, 4, 1)).unwrap_err();
    assert!(matches!(e, BodyError::UnknownBits { bits: 4, .. }));
    let e = SubmitRequest::parse(&body(0, 0, 1)).unwrap_err();
    assert!(matches!(
        e,
        BodyError::OutOfRange {
            field: "request_number",
            ..
        }
    ));
    assert_eq!(e.code(), ErrorCode::BadRequest);
    // Sizes: one byte short or long, a short fixed part, a huge count.
    // (Size first, so the size errors below win over everything else.)
    let good = body(1, 0, 3);
    assert!(matches!(
        SubmitRequest::parse(&good[..good.len() - 1]),
        Err(BodyError::WrongSize { .. })
    ));
    assert!(matches!(
        SubmitRequest::parse(&good[..10]),
        Err(BodyError::TooShort {
            fixed_bytes: 24,
            ..
        })
    ));
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        SubmitRequest::parse(&long),
        Err(BodyError::WrongSize { .. })
    ));
    let mut huge = good.clone();
    huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        SubmitRequest::parse(&huge),
        Err(BodyError::WrongSize {
            what: "SUBMIT request",
            body_bytes: good.len(),
            expected_bytes: 24 + 56 * u64::from(u32::MAX),
        })
    );
    // A non-zero reserved op field is the server's to refuse, not ours.
    let mut reserved = good;
    reserved[24 + 55] = 1;
    let view = SubmitRequest::parse(&reserved).unwrap();
    assert_eq!(view.op(0).unwrap().reserved, 0x100);
}

#[test]
fn submit_checks_run_in_spec_order() {
    let op = WireOp::shared_data_ref(ACTION_ADD_REF, 1, 2, 3);
    let body = |n: u64, flags: u32, ops: usize| {
        let mut out = Vec::new();
        encode_submit(1, n, flags, &vec![op; ops], &mut out);
        out
    };
    // Size before everything: a short body with op_count 0, number 0 and
    // bad flags is BAD_REQUEST for its size.
    let mut short = body(0, 4, 0);
    short[16..20].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        SubmitRequest::parse_limited(&short, 8),
        Err(BodyError::WrongSize { .. })
    ));
    // op_count before request_number and flags, with the server's limit.
    for (ops, max) in [(0, 8), (9, 8)] {
        let e = SubmitRequest::parse_limited(&body(0, 4, ops), max).unwrap_err();
        assert_eq!(
            e,
            BodyError::TooManyOps {
                op_count: ops as u32,
                submit_ops_max: max
            }
        );
        assert_eq!(e.code(), ErrorCode::TooManyOps);
        assert_eq!(e.error_body().detail, u64::from(max));
    }
    assert_eq!(
        SubmitRequest::parse(&body(0, 4, 0)).unwrap_err(),
        BodyError::NoOps
    );
    // request_number before flags.
    let e = SubmitRequest::parse_limited(&body(0, 4, 8), 8).unwrap_err();
    assert!(matches!(
        e,
        BodyError::OutOfRange {
            field: "request_number",
            ..
        }
    ));
    let e = SubmitRequest::parse_limited(&body(1, 4, 8), 8).unwrap_err();
    assert!(matches!(e, BodyError::UnknownBits { bits: 4, .. }));
    assert_eq!(e.code(), ErrorCode::BadRequest);
    let ok = body(1, 3, 8);
    assert_eq!(SubmitRequest::parse_limited(&ok, 8).unwrap().op_count(), 8);
}

#[test]
fn submit_reply_layout_and_flags() {
    let r = SubmitReply {
        lsn: 9,
        op_count: 3,
        flags: SUBMIT_REPLY_DURABLE | SUBMIT_REPLY_DUPLICATE,
        request_number: 11,
    };
    let b = round_trip(&r);
    assert_eq!(b, [le(9, 8), le(3, 4), le(3, 4), le(11, 8)].concat());
    let mut bad = b.clone();
    bad[12] = 4;
    assert!(matches!(
        SubmitReply::decode(&bad),
        Err(BodyError::UnknownBits { .. })
    ));
}

#[test]
fn hello_request_layout_and_limits() {
    let h = HelloRequest::new(1, 3, b"tok", "cli").unwrap();
    let b = round_trip(&h);
    assert_eq!(b, [&[1, 0, 3, 0, 3, 0, 3, 0][..], b"tok", b"cli"].concat());
    assert!(HelloRequest::new(1, 1, &[0; 257], "").is_err());
    assert!(HelloRequest::new(1, 1, &[0; 256], &"n".repeat(64)).is_ok());
    assert!(HelloRequest::new(1, 1, b"", &"n".repeat(65)).is_err());
    // A 257-byte token encoded anyway is refused by the decoder.
    let long = HelloRequest {
        token: vec![1; 257],
        ..h.clone()
    };
    let e = HelloRequest::decode(&enc(&long)).unwrap_err();
    assert!(matches!(
        e,
        BodyError::OutOfRange {
            field: "token_bytes",
            value: 257,
            ..
        }
    ));
    let mut bad_name = b.clone();
    bad_name[11] = 0xC0;
    assert!(matches!(
        HelloRequest::decode(&bad_name),
        Err(BodyError::BadUtf8 { .. })
    ));
    assert!(matches!(
        HelloRequest::decode(&b[..13]),
        Err(BodyError::WrongSize { .. })
    ));
    assert_eq!(
        HelloRequest::decode(&bad_name).unwrap_err().code(),
        ErrorCode::BadRequest
    );
    // An empty version range is the server's UNSUPPORTED_VERSION, not ours.
    let empty_range = HelloRequest::new(3, 1, b"", "").unwrap();
    round_trip(&empty_range);
    assert_eq!(empty_range.choose_version(1, 5), None);
    assert_eq!(h.choose_version(1, 1), Some(1));
    assert_eq!(h.choose_version(2, 9), Some(3));
    assert_eq!(h.choose_version(4, 9), None);
    let e = ErrorBody::unsupported_version(1, 2, "no");
    assert_eq!(
        (e.code, e.detail, e.index),
        (ErrorCode::UnsupportedVersion, 2, 1)
    );
}

#[test]
fn hello_reply_layout() {
    let r = HelloReply {
        version: 1,
        body_bytes_max: 1 << 20,
        submit_ops_max: SUBMIT_OPS_MAX_DEFAULT,
        in_flight_max: 256,
        fs_id: *b"0123456789abcdef",
        generation: 77,
        server_id: 0xDEAD,
        barrier_lease_ms: 30000,
        session_replies_kept: 64,
    };
    let b = round_trip(&r);
    #[rustfmt::skip]
    let expected = [
        le(1, 2), le(0, 2), le(1 << 20, 4), le(18724, 4), le(256, 4),
        b"0123456789abcdef".to_vec(), le(77, 8), le(0xDEAD, 8),
        le(30000, 4), le(64, 4), le(0, 8),
    ]
    .concat();
    assert_eq!(b, expected);
    assert_eq!(b.len(), HELLO_REPLY_BYTES);
    for reserved_at in [2, 3, 56, 63] {
        let mut bad = b.clone();
        bad[reserved_at] = 1;
        assert!(matches!(
            HelloReply::decode(&bad),
            Err(BodyError::ReservedNonZero { .. })
        ));
    }
}

#[test]
fn register_and_empty_bodies() {
    assert_eq!(round_trip(&RegisterRequest), b"");
    assert_eq!(round_trip(&CommitRequest), b"");
    assert_eq!(round_trip(&StatsRequest), b"");
    for e in [
        RegisterRequest::decode(b"x").unwrap_err(),
        CommitRequest::decode(b"x").unwrap_err(),
        StatsRequest::decode(b"x").unwrap_err(),
    ] {
        assert!(matches!(
            e,
            BodyError::WrongSize {
                body_bytes: 1,
                expected_bytes: 0,
                ..
            }
        ));
    }
    let r = RegisterReply { session_id: 5 };
    assert_eq!(round_trip(&r), [le(5, 8), le(0, 8)].concat());
    let mut bad = enc(&r);
    bad[15] = 1;
    assert!(RegisterReply::decode(&bad).is_err());
}

#[test]
fn lookup_layouts_and_limits() {
    let req = LookupRequest::new(vec![0x1000, 0x2000]).unwrap();
    let b = round_trip(&req);
    assert_eq!(
        b,
        [le(2, 4), le(0, 4), le(0x1000, 8), le(0x2000, 8)].concat()
    );
    assert!(LookupRequest::new(vec![]).is_err());
    assert!(LookupRequest::new(vec![0; 16385]).is_err());
    let max = LookupRequest::new(vec![7; 16384]).unwrap();
    round_trip(&max);
    let zero = LookupRequest { bytenrs: vec![] };
    assert!(matches!(
        LookupRequest::decode(&enc(&zero)),
        Err(BodyError::OutOfRange {
            field: "count",
            value: 0,
            ..
        })
    ));
    let mut over = vec![0u8; 8];
    over[..4].copy_from_slice(&16385u32.to_le_bytes());
    assert!(matches!(
        LookupRequest::decode(&over),
        Err(BodyError::OutOfRange { .. })
    ));
    // The reply's count has the request's range; a whole reply fits 1 MiB.
    let full = LookupReply {
        entries: vec![LookupEntry::default(); 16384],
    };
    assert!(enc(&full).len() <= 1 << 20);
    round_trip(&full);
    let mut over = enc(&full);
    over[..4].copy_from_slice(&16385u32.to_le_bytes());
    over.extend_from_slice(&[0; LOOKUP_ENTRY_BYTES]);
    assert!(matches!(
        LookupReply::decode(&over),
        Err(BodyError::OutOfRange { field: "count", .. })
    ));

    let entry = LookupEntry {
        bytenr: 0x1000,
        refs: -1,
        committed_refs: 1,
        pending_ref_mod: -2,
        num_bytes: 4096,
        flags: LOOKUP_COMMITTED | LOOKUP_PENDING | LOOKUP_DATA,
        level: 0,
    };
    let rep = LookupReply {
        entries: vec![entry],
    };
    let b = round_trip(&rep);
    #[rustfmt::skip]
    let expected = [
        le(1, 4), le(0, 4),
        le(0x1000, 8), (-1i64).to_le_bytes().to_vec(), le(1, 8),
        (-2i64).to_le_bytes().to_vec(), le(4096, 8), vec![0x0B, 0], le(0, 6),
    ]
    .concat();
    assert_eq!(b, expected);
    let mut bad = b.clone();
    bad[8 + 40] = 0x20;
    assert!(matches!(
        LookupReply::decode(&bad),
        Err(BodyError::UnknownBits { .. })
    ));
    let mut bad = b;
    bad[8 + 47] = 1;
    assert!(matches!(
        LookupReply::decode(&bad),
        Err(BodyError::ReservedNonZero { offset: 50, .. })
    ));
}

#[test]
fn backrefs_request_layout_and_limits() {
    let after = BackrefKey {
        ref_type: 178,
        k1: 5,
        k2: 257,
        k3: 4096,
    };
    let req = BackrefsRequest {
        bytenr: 0x3000,
        max_entries: 100,
        after: Some(after),
    };
    let b = round_trip(&req);
    #[rustfmt::skip]
    let expected = [
        le(0x3000, 8), le(100, 4), vec![1, 178], le(0, 2), le(5, 8), le(257, 8), le(4096, 8),
    ]
    .concat();
    assert_eq!(b, expected);
    let first = BackrefsRequest { after: None, ..req };
    assert_eq!(&round_trip(&first)[12..], &[0u8; 28][..]);
    // after_ fields without after_present, after_present 2, bad page sizes.
    let mut bad = b.clone();
    bad[12] = 0;
    assert!(matches!(
        BackrefsRequest::decode(&bad),
        Err(BodyError::ReservedNonZero { .. })
    ));
    bad[12] = 2;
    assert!(matches!(
        BackrefsRequest::decode(&bad),
        Err(BodyError::OutOfRange {
            field: "after_present",
            ..
        })
    ));
    for max_entries in [0, 16385] {
        let r = BackrefsRequest { max_entries, ..req };
        assert!(matches!(
            BackrefsRequest::decode(&enc(&r)),
            Err(BodyError::OutOfRange {
                field: "max_entries",
                ..
            })
        ));
    }
    round_trip(&BackrefsRequest {
        max_entries: 16384,
        ..req
    });
}

#[test]
fn backrefs_reply_layout() {
    let rep = BackrefsReply {
        bytenr: 0x3000,
        num_bytes: 0x1000,
        refs: 2,
        item_flags: 1,
        kind: 1,
        level: 0,
        more: true,
        entries: vec![BackrefEntry {
            ref_type: 178,
            count: 2,
            k1: 5,
            k2: 257,
            k3: 0,
        }],
    };
    let b = round_trip(&rep);
    #[rustfmt::skip]
    let expected = [
        le(0x3000, 8), le(0x1000, 8), le(2, 8), le(1, 8), vec![1, 0, 1, 0], le(1, 4),
        vec![178], le(0, 7), le(2, 8), le(5, 8), le(257, 8), le(0, 8),
    ]
    .concat();
    assert_eq!(b, expected);
    assert_eq!(rep.entries[0].key().k2, 257);
    let mut bad = b.clone();
    bad[34] = 2;
    assert!(BackrefsReply::decode(&bad).is_err());
    // item_flags: only DATA, TREE_BLOCK and FULL_BACKREF are defined.
    let known = BackrefsReply {
        item_flags: ITEM_FLAGS_KNOWN,
        ..rep.clone()
    };
    round_trip(&known);
    for bit in [4u64, 0x80, 0x200, 1 << 63] {
        let mut bad = b.clone();
        bad[24..32].copy_from_slice(&(1u64 | bit).to_le_bytes());
        assert!(matches!(
            BackrefsReply::decode(&bad),
            Err(BodyError::UnknownBits {
                field: "item_flags",
                ..
            })
        ));
    }
    let full = BackrefsReply {
        entries: vec![BackrefEntry::default(); 16384],
        ..rep.clone()
    };
    assert!(enc(&full).len() <= 1 << 20);
    let mut bad = b;
    bad[41] = 1;
    assert!(matches!(
        BackrefsReply::decode(&bad),
        Err(BodyError::ReservedNonZero { offset: 41, .. })
    ));
}

#[test]
fn barrier_layouts() {
    let b = round_trip(&BarrierAcquireRequest { session_id: 3 });
    assert_eq!(b, le(3, 8));
    let b = round_trip(&BarrierAcquireReply {
        barrier_id: 1,
        seq: 2,
        lease_ms: 30000,
    });
    assert_eq!(b, [le(1, 8), le(2, 8), le(30000, 4), le(0, 4)].concat());
    let b = round_trip(&BarrierRenewRequest { barrier_id: 1 });
    assert_eq!(b, le(1, 8));
    let b = round_trip(&BarrierRenewReply { lease_ms: 5 });
    assert_eq!(b, [le(5, 4), le(0, 4)].concat());
    let b = round_trip(&BarrierReleaseRequest { barrier_id: 1 });
    assert_eq!(b, le(1, 8));
    assert_eq!(round_trip(&BarrierReleaseReply), vec![0; 8]);
    assert!(BarrierReleaseReply::decode(&[0, 0, 0, 0, 0, 0, 0, 1]).is_err());
    assert!(BarrierRenewReply::decode(&[0, 0, 0, 0, 0, 0, 0, 1]).is_err());
    assert!(BarrierAcquireRequest::decode(&[0; 9]).is_err());
}

#[test]
fn commit_reply_layout() {
    let r = CommitReply {
        generation: 1,
        ops: 2,
        heads: 3,
        applied: 4,
        freed: 5,
        held: 6,
        quarantined: 7,
        took_us: 8,
    };
    let b = round_trip(&r);
    assert_eq!(b, (1..=8).flat_map(|v| le(v, 8)).collect::<Vec<u8>>());
    assert!(CommitReply::decode(&b[..63]).is_err());
}

#[test]
fn freed_subscribe_layout_and_limits() {
    let s = FreedSubscribeRequest::new("space").unwrap();
    assert_eq!(round_trip(&s), [&[5, 0, 0, 0][..], b"space"].concat());
    assert!(FreedSubscribeRequest::new("").is_err());
    assert!(FreedSubscribeRequest::new(&"x".repeat(65)).is_err());
    assert!(matches!(
        FreedSubscribeRequest::decode(&[0, 0, 0, 0]),
        Err(BodyError::OutOfRange {
            field: "name_bytes",
            ..
        })
    ));
    assert!(matches!(
        FreedSubscribeRequest::decode(&[1, 0, 0, 0, 0xFF]),
        Err(BodyError::BadUtf8 { .. })
    ));
    assert!(matches!(
        FreedSubscribeRequest::decode(&[1, 0, 1, 0, b'a']),
        Err(BodyError::ReservedNonZero { offset: 2, .. })
    ));
    let r = FreedSubscribeReply {
        consumer_id: 1,
        acked_generation: 2,
        oldest_kept: 3,
    };
    assert_eq!(round_trip(&r), [le(1, 8), le(2, 8), le(3, 8)].concat());
}

#[test]
fn freed_page_and_ack_layouts() {
    let q = FreedRequest {
        generation: 9,
        index: 2,
        max_extents: 16384,
    };
    assert_eq!(round_trip(&q), [le(9, 8), le(2, 4), le(16384, 4)].concat());
    for max_extents in [0, 16385] {
        let bad = FreedRequest { max_extents, ..q };
        assert!(FreedRequest::decode(&enc(&bad)).is_err());
    }
    let rep = FreedReply {
        more: true,
        next_generation: 10,
        next_index: 0,
        oldest_kept: 8,
        extents: vec![FreedExtent {
            generation: 9,
            bytenr: 0x1000,
            num_bytes: 0x4000,
            kind: 0,
            level: 2,
        }],
    };
    let b = round_trip(&rep);
    #[rustfmt::skip]
    let expected = [
        le(1, 4), vec![1, 0, 0, 0], le(10, 8), le(0, 4), le(0, 4), le(8, 8),
        le(9, 8), le(0x1000, 8), le(0x4000, 8), vec![0, 2], le(0, 6),
    ]
    .concat();
    assert_eq!(b, expected);
    let mut bad = b.clone();
    bad[5] = 1;
    assert!(FreedReply::decode(&bad).is_err());
    let mut bad = b;
    bad[0..4].copy_from_slice(&16385u32.to_le_bytes());
    let full = FreedReply {
        extents: vec![FreedExtent::default(); 16384],
        ..rep.clone()
    };
    assert!(enc(&full).len() <= 1 << 20);
    round_trip(&full);
    assert!(matches!(
        FreedReply::decode(&bad),
        Err(BodyError::OutOfRange { .. })
    ));

    let a = FreedAckRequest {
        consumer_id: 4,
        generation: 5,
    };
    assert_eq!(round_trip(&a), [le(4, 8), le(5, 8)].concat());
    assert_eq!(
        round_trip(&FreedAckReply {
            acked_generation: 5
        }),
        le(5, 8)
    );

    let u = FreedUnsubscribeRequest { consumer_id: 9 };
    assert_eq!(round_trip(&u), le(9, 8));
    assert!(FreedUnsubscribeRequest::decode(&[9; 16]).is_err());
    assert!(FreedUnsubscribeRequest::decode(&[9]).is_err());
    assert_eq!(
        round_trip(&FreedUnsubscribeReply {
            acked_generation: 6
        }),
        le(6, 8)
    );
    assert!(FreedUnsubscribeReply::decode(&[6; 9]).is_err());
}

#[test]
fn stats_and_ping() {
    let s = StatsReply {
        json: "{\"heads\":1}".into(),
    };
    assert_eq!(round_trip(&s), b"{\"heads\":1}");
    assert!(StatsReply::decode(&[0xFF]).is_err());
    let p = PingRequest::new(&[9; 64]).unwrap();
    assert_eq!(round_trip(&p), vec![9; 64]);
    assert!(PingRequest::new(&[9; 65]).is_err());
    assert!(PingReply::decode(&[9; 65]).is_err());
    round_trip(&PingReply { payload: vec![] });
}

#[test]
fn request_and_reply_enums_dispatch_by_opcode() {
    let requests = [
        Request::Hello(HelloRequest::new(1, 1, b"", "t").unwrap()),
        Request::Register(RegisterRequest),
        Request::Commit(CommitRequest),
        Request::Ping(PingRequest::new(b"p").unwrap()),
        Request::Freed(FreedRequest {
            generation: 1,
            index: 0,
            max_extents: 1,
        }),
    ];
    for req in &requests {
        let mut wire = Vec::new();
        encode_request(5, req, &mut wire);
        let mut h = [0u8; HEADER_BYTES];
        h.copy_from_slice(&wire[..HEADER_BYTES]);
        let header = decode_header(&h, 1 << 20).unwrap();
        assert!(!header.is_reply());
        assert_eq!(header.request_id, 5);
        let back = Request::decode(header.opcode, &wire[HEADER_BYTES..]).unwrap();
        assert_eq!(&back, req);
    }
    let err = Reply::Error(ErrorBody::new(ErrorCode::Busy, "full"));
    let mut wire = Vec::new();
    encode_reply(6, &err, &mut wire);
    assert_eq!(wire[6], 0x7F);
    assert_eq!(wire[7], 1);
    assert_eq!(Reply::decode(0x7F, &wire[HEADER_BYTES..]), Ok(err));
    assert_eq!(
        Request::decode(0x7F, b""),
        Err(BodyError::ErrorOpcodeInRequest)
    );
    let e = Request::decode(0x42, b"").unwrap_err();
    assert_eq!(e.code(), ErrorCode::UnknownOpcode);
    assert!(Reply::decode(0x42, b"").is_err());

    let mut typed = Vec::new();
    crate::dispatch::encode_request_message(5, &PingRequest::new(b"p").unwrap(), &mut typed);
    let mut generic = Vec::new();
    encode_request(5, &requests[3], &mut generic);
    assert_eq!(typed, generic);
}

/// A body shorter than its fixed fields is refused naming the whole fixed
/// part. It named the field that ran out: a 2-byte HELLO got "body is 2
/// bytes, expected 4" and a 10-byte SUBMIT "expected 16", which sends a
/// client author looking for a 4-byte HELLO.
#[test]
fn a_body_shorter_than_its_fixed_part_names_the_whole_fixed_part() {
    use crate::error::ERROR_BODY_FIXED_BYTES;
    let requests = [
        (Opcode::Hello, "HELLO request", HELLO_FIXED_BYTES),
        (Opcode::Submit, "SUBMIT request", SUBMIT_FIXED_BYTES),
        (Opcode::Lookup, "LOOKUP request", LOOKUP_FIXED_BYTES),
        (
            Opcode::FreedSubscribe,
            "FREED_SUBSCRIBE request",
            FREED_SUBSCRIBE_FIXED_BYTES,
        ),
    ];
    let replies = [
        (Opcode::Lookup, "LOOKUP reply", LOOKUP_FIXED_BYTES),
        (
            Opcode::Backrefs,
            "BACKREFS reply",
            BACKREFS_REPLY_FIXED_BYTES,
        ),
        (Opcode::Freed, "FREED reply", FREED_REPLY_FIXED_BYTES),
        (Opcode::Error, "ERROR reply", ERROR_BODY_FIXED_BYTES),
    ];
    let cases = requests
        .iter()
        .map(|c| (true, c))
        .chain(replies.iter().map(|c| (false, c)));
    for (request, &(opcode, what, fixed)) in cases {
        for len in 0..fixed {
            let body = vec![0u8; len];
            let e = if request {
                Request::decode(opcode.as_u8(), &body).unwrap_err()
            } else {
                Reply::decode(opcode.as_u8(), &body).unwrap_err()
            };
            assert_eq!(e.code(), ErrorCode::BadRequest, "{what} of {len} bytes");
            assert_eq!(
                e.to_string(),
                format!(
                    "{what}: body is {len} bytes, shorter than its fixed part of {fixed} bytes"
                ),
            );
        }
    }
}
