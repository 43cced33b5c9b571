//! The byte dumps of `docs/protocol.md` ("Worked example") are the
//! codec's own bytes: every ```` ```hex NAME ```` block of the document is
//! compared with the frame this codec encodes for the same values, and
//! decoded back by the codec, so the example a client author tests an
//! encoder against cannot go stale.

use refd_proto::*;

/// The document, read at test time (not embedded), so that editing it
/// alone is enough to fail the test.
fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    std::fs::read_to_string(path).expect("read docs/protocol.md")
}

/// The ```` ```hex NAME ```` blocks of `doc`: each line's bytes are the
/// hex pairs before its `|` (what follows is the field's description).
fn hex_blocks(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, Vec<u8>)> = None;
    for (n, line) in doc.lines().enumerate() {
        if let Some(name) = line.strip_prefix("```hex ") {
            assert!(current.is_none(), "line {}: nested hex block", n + 1);
            current = Some((name.trim().to_string(), Vec::new()));
        } else if line.trim() == "```" {
            if let Some(block) = current.take() {
                blocks.push(block);
            }
        } else if let Some((_, bytes)) = current.as_mut() {
            let (hex, _) = line
                .split_once('|')
                .unwrap_or_else(|| panic!("line {}: no `|` in {line:?}", n + 1));
            for pair in hex.split_whitespace() {
                assert_eq!(pair.len(), 2, "line {}: {pair:?} is not one byte", n + 1);
                bytes.push(
                    u8::from_str_radix(pair, 16)
                        .unwrap_or_else(|e| panic!("line {}: {pair:?}: {e}", n + 1)),
                );
            }
        }
    }
    assert!(current.is_none(), "a hex block is not closed");
    blocks
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The op of the example SUBMIT: the allocation of data extent
/// `[0x100000, 0x101000)` by root 5, inode 257, offset 0.
fn example_op() -> WireOp {
    WireOp::data_ref(ACTION_ADD_EXTENT, 0x10_0000, 0x1000, 5, 257, 0)
}

/// What the codec encodes for each block name of the document.
fn expected(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    match name {
        "hello-request" => {
            let hello = HelloRequest::new(1, 1, b"", "example").unwrap();
            encode_request(1, &Request::Hello(hello), &mut out);
        }
        "hello-reply" => {
            let reply = HelloReply {
                version: 1,
                body_bytes_max: BODY_BYTES_MAX_DEFAULT,
                submit_ops_max: 18724,
                in_flight_max: 256,
                fs_id: std::array::from_fn(|i| 0x10 + i as u8),
                generation: 3,
                server_id: 0x1122_3344_5566_7788,
                barrier_lease_ms: 30_000,
                session_replies_kept: 64,
            };
            encode_reply(1, &Reply::Hello(reply), &mut out);
        }
        "submit-request" => {
            let submit = SubmitRequest {
                session_id: 1,
                request_number: 1,
                flags: 0,
                ops: vec![example_op()],
            };
            encode_request(2, &Request::Submit(submit), &mut out);
        }
        "submit-reply" => {
            let reply = SubmitReply {
                lsn: 7,
                op_count: 1,
                flags: SUBMIT_REPLY_DURABLE,
                request_number: 1,
            };
            encode_reply(2, &Reply::Submit(reply), &mut out);
        }
        "error-reply" => {
            let e =
                ErrorBody::invalid_op(OpErrorCode::ZeroNumBytes, 0, 0x10_0000, "num_bytes is 0");
            encode_reply(3, &Reply::Error(e), &mut out);
        }
        other => panic!("docs/protocol.md has a hex block {other:?} this test does not know"),
    }
    out
}

#[test]
fn the_worked_example_of_the_protocol_document_is_what_the_codec_encodes() {
    let blocks = hex_blocks(&protocol_md());
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "hello-request",
            "hello-reply",
            "submit-request",
            "submit-reply",
            "error-reply"
        ],
        "the worked example's frames"
    );
    for (name, doc_bytes) in &blocks {
        let codec = expected(name);
        assert!(
            *doc_bytes == codec,
            "docs/protocol.md block {name} differs from the codec's bytes:\n{}\n\
             document:\n{}",
            hex(&codec),
            hex(doc_bytes)
        );
    }
}

#[test]
fn the_worked_example_frames_decode() {
    for (name, bytes) in hex_blocks(&protocol_md()) {
        let direction = if name.ends_with("request") {
            Direction::Request
        } else {
            Direction::Reply
        };
        let mut decoder = FrameDecoder::expecting(BODY_BYTES_MAX_DEFAULT, direction);
        let mut input = &bytes[..];
        let frame = decoder
            .decode_from(&mut input)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: not a whole frame"));
        assert!(input.is_empty(), "{name}: bytes after the frame");
        assert_eq!(frame.header.version, VERSION, "{name}");
        let opcode = frame.header.opcode;
        match direction {
            Direction::Request => {
                let r = Request::decode(opcode, &frame.body).unwrap();
                let mut again = Vec::new();
                encode_request(frame.header.request_id, &r, &mut again);
                assert_eq!(again, bytes, "{name}: re-encoded");
            }
            Direction::Reply => {
                let r = Reply::decode(opcode, &frame.body).unwrap();
                let mut again = Vec::new();
                encode_reply(frame.header.request_id, &r, &mut again);
                assert_eq!(again, bytes, "{name}: re-encoded");
            }
        }
    }
    assert_eq!(
        crc32c(b"123456789"),
        0xE306_9283,
        "the check value the document gives"
    );
}
