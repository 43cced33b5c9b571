//! The 32-byte frame header, opcodes, and the checks a receiver runs
//! before it trusts a length (`docs/protocol.md`, "Frame").
//!
//! Why the order of the checks is fixed: `body_bytes` decides how much a
//! receiver allocates and reads, so it is trusted only after the header
//! checksum passed; the version is checked before the checksum because a
//! later protocol version keeps only bytes 0..8 (magic, version, opcode,
//! flags) and may lay out, and checksum, the rest differently. Until the
//! header checksum passed, `request_id` is not trusted either:
//! [`FrameError::request_id`] is `None` for the first three checks, and
//! the error frame then carries request id 0.
//!
//! Every [`FrameError`] means the stream can no longer be trusted: the
//! server sends [`FrameError::error_body`] and closes. An unknown opcode
//! is *not* a frame error (the framing is intact): the header keeps the
//! raw `u8` and the body layer answers `UNKNOWN_OPCODE`.

use crate::error::{ErrorBody, ErrorCode};
use crate::wire::len_u32;

/// Size of a frame header.
pub const HEADER_BYTES: usize = 32;
/// Bytes 0..4 of every frame: ASCII `RFDP`.
pub const MAGIC: [u8; 4] = *b"RFDP";
/// The protocol version this codec speaks (header `version`).
pub const VERSION: u16 = 1;
/// Default largest frame body a receiver accepts: 1 MiB.
pub const BODY_BYTES_MAX_DEFAULT: u32 = 1 << 20;
/// Header flag bit 0: set on every frame the server sends.
pub const FLAG_REPLY: u8 = 1 << 0;
/// Every header flag bit the spec defines.
pub const FLAGS_KNOWN: u8 = FLAG_REPLY;

/// Offset of `header_crc32c`; the checksum covers bytes `0..` this.
const HEADER_CRC_OFFSET: usize = 28;

const _: () = assert!(HEADER_CRC_OFFSET + 4 == HEADER_BYTES);
const _: () = assert!(BODY_BYTES_MAX_DEFAULT == 1_048_576);

/// CRC32C (Castagnoli) as the spec defines it.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The opcodes of protocol version 1.
#[repr(u8)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Version, token and name; the first request of a connection.
    Hello = 0x01,
    /// Register a client session.
    Register = 0x02,
    /// Submit a batch of ops, exactly once.
    Submit = 0x03,
    /// Reference counts of bytenrs.
    Lookup = 0x04,
    /// Backrefs of one extent, paged.
    Backrefs = 0x05,
    /// Acquire a seq barrier.
    BarrierAcquire = 0x06,
    /// Renew a barrier's lease.
    BarrierRenew = 0x07,
    /// Release a barrier.
    BarrierRelease = 0x08,
    /// Checkpoint now.
    Commit = 0x09,
    /// Register a freed-extents consumer.
    FreedSubscribe = 0x0A,
    /// Read freed extents from a cursor.
    Freed = 0x0B,
    /// Acknowledge freed lists up to a generation.
    FreedAck = 0x0C,
    /// Daemon statistics as JSON.
    Stats = 0x0D,
    /// Echo up to 64 bytes.
    Ping = 0x0E,
    /// Remove a freed-extents consumer.
    FreedUnsubscribe = 0x0F,
    /// An error reply (server only).
    Error = 0x7F,
}

impl Opcode {
    /// Every opcode, requests first, then `Error`.
    pub const ALL: [Opcode; 16] = [
        Opcode::Hello,
        Opcode::Register,
        Opcode::Submit,
        Opcode::Lookup,
        Opcode::Backrefs,
        Opcode::BarrierAcquire,
        Opcode::BarrierRenew,
        Opcode::BarrierRelease,
        Opcode::Commit,
        Opcode::FreedSubscribe,
        Opcode::Freed,
        Opcode::FreedAck,
        Opcode::Stats,
        Opcode::Ping,
        Opcode::FreedUnsubscribe,
        Opcode::Error,
    ];

    /// The opcode with this wire value, if any.
    pub fn from_u8(opcode: u8) -> Option<Opcode> {
        match opcode {
            0x01..=0x0F => Opcode::ALL.get(usize::from(opcode) - 1).copied(),
            0x7F => Some(Opcode::Error),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The spec's name, e.g. `"BARRIER_ACQUIRE"`.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Hello => "HELLO",
            Opcode::Register => "REGISTER",
            Opcode::Submit => "SUBMIT",
            Opcode::Lookup => "LOOKUP",
            Opcode::Backrefs => "BACKREFS",
            Opcode::BarrierAcquire => "BARRIER_ACQUIRE",
            Opcode::BarrierRenew => "BARRIER_RENEW",
            Opcode::BarrierRelease => "BARRIER_RELEASE",
            Opcode::Commit => "COMMIT",
            Opcode::FreedSubscribe => "FREED_SUBSCRIBE",
            Opcode::Freed => "FREED",
            Opcode::FreedAck => "FREED_ACK",
            Opcode::Stats => "STATS",
            Opcode::Ping => "PING",
            Opcode::FreedUnsubscribe => "FREED_UNSUBSCRIBE",
            Opcode::Error => "ERROR",
        }
    }
}

/// Which way frames travel on the stream a receiver reads: a server
/// reads requests (flag `REPLY` clear), a client reads replies (set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server: `REPLY` clear.
    Request,
    /// Server to client: `REPLY` set.
    Reply,
}

impl Direction {
    /// The `flags` bits a frame of this direction has.
    pub fn flags(self) -> u8 {
        match self {
            Direction::Request => 0,
            Direction::Reply => FLAG_REPLY,
        }
    }
}

/// A decoded frame header. `magic`, `reserved` and `header_crc32c` are
/// not kept: the decoder checked them and [`FrameHeader::encode`]
/// writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// Protocol version of the frame ([`VERSION`]).
    pub version: u16,
    /// Raw opcode: an unknown one is a body-level error, not a frame one.
    pub opcode: u8,
    /// Header flags ([`FLAG_REPLY`]).
    pub flags: u8,
    /// Chosen by the client; a reply carries its request's.
    pub request_id: u64,
    /// Length of the body that follows.
    pub body_bytes: u32,
    /// CRC32C of the body.
    pub body_crc32c: u32,
}

impl FrameHeader {
    /// The header of a version-[`VERSION`] frame carrying `body`.
    ///
    /// # Panics
    ///
    /// If `body` is 4 GiB or longer (it cannot be framed).
    pub fn for_body(opcode: u8, flags: u8, request_id: u64, body: &[u8]) -> Self {
        FrameHeader {
            version: VERSION,
            opcode,
            flags,
            request_id,
            body_bytes: len_u32("frame body", body.len()),
            body_crc32c: crc32c(body),
        }
    }

    /// The opcode, if known.
    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u8(self.opcode)
    }

    /// Whether flag `REPLY` is set.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// The 32 header bytes, with magic, zero reserved and header CRC.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.opcode;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_bytes.to_le_bytes());
        b[20..24].copy_from_slice(&self.body_crc32c.to_le_bytes());
        // 24..28 reserved, zero.
        let crc = crc32c(&b[..HEADER_CRC_OFFSET]);
        b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Why a frame was refused. Each one closes the connection.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Check 1: bytes 0..4 are not `RFDP`.
    #[error("bad frame magic {found:02x?} (expected \"RFDP\")")]
    BadMagic {
        /// The bytes received.
        found: [u8; 4],
    },
    /// Check 2: a version this codec does not speak.
    #[error("unsupported frame version {found} (this side speaks {VERSION})")]
    UnsupportedVersion {
        /// The version received.
        found: u16,
    },
    /// Check 3: the header checksum does not match.
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// `header_crc32c` as received.
        stored: u32,
        /// CRC32C of the received bytes 0..28.
        computed: u32,
    },
    /// Check 4: flag bits 1-7 set.
    #[error("request {request_id}: undefined header flag bits in {flags:#04x}")]
    BadFlags {
        /// The frame's request id.
        request_id: u64,
        /// The flags received.
        flags: u8,
    },
    /// Check 4: flag `REPLY` does not match the stream's direction (a
    /// reply sent to the server, or a request sent to a client).
    #[error("request {request_id}: flags {flags:#04x} on a stream of {expected:?} frames")]
    WrongDirection {
        /// The frame's request id.
        request_id: u64,
        /// The flags received.
        flags: u8,
        /// What the receiver reads.
        expected: Direction,
    },
    /// Check 4: header bytes 24..28 not zero.
    #[error("request {request_id}: reserved header bytes are {reserved:#010x}")]
    ReservedNonZero {
        /// The frame's request id.
        request_id: u64,
        /// The reserved field received.
        reserved: u32,
    },
    /// Check 5: the body is larger than the receiver's limit.
    #[error("request {request_id}: body of {body_bytes} bytes above the limit {body_bytes_max}")]
    TooLarge {
        /// The frame's request id.
        request_id: u64,
        /// `body_bytes` received.
        body_bytes: u32,
        /// The receiver's limit.
        body_bytes_max: u32,
    },
    /// The body checksum does not match.
    #[error("request {request_id}: body checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BodyChecksum {
        /// The frame's request id.
        request_id: u64,
        /// `body_crc32c` from the header.
        stored: u32,
        /// CRC32C of the body received.
        computed: u32,
    },
}

impl FrameError {
    /// The wire error a server answers this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::BadMagic { .. }
            | FrameError::BadFlags { .. }
            | FrameError::WrongDirection { .. }
            | FrameError::ReservedNonZero { .. } => ErrorCode::BadFrame,
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            FrameError::HeaderChecksum { .. } | FrameError::BodyChecksum { .. } => {
                ErrorCode::BadChecksum
            }
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        }
    }

    /// The frame's request id, when it can be trusted (the header
    /// checksum passed); `None` for the checks before it.
    pub fn request_id(&self) -> Option<u64> {
        match *self {
            FrameError::BadMagic { .. }
            | FrameError::UnsupportedVersion { .. }
            | FrameError::HeaderChecksum { .. } => None,
            FrameError::BadFlags { request_id, .. }
            | FrameError::WrongDirection { request_id, .. }
            | FrameError::ReservedNonZero { request_id, .. }
            | FrameError::TooLarge { request_id, .. }
            | FrameError::BodyChecksum { request_id, .. } => Some(request_id),
        }
    }

    /// The `request_id` of the error frame answering it (0 when the id is
    /// not trusted).
    pub fn reply_request_id(&self) -> u64 {
        self.request_id().unwrap_or(0)
    }

    /// The error body answering it: `FRAME_TOO_LARGE` carries the limit
    /// in `detail`, `UNSUPPORTED_VERSION` this codec's version as highest
    /// (`detail`) and lowest (`index`).
    pub fn error_body(&self) -> ErrorBody {
        let body = ErrorBody::new(self.code(), &self.to_string());
        match *self {
            FrameError::TooLarge { body_bytes_max, .. } => {
                body.with_detail(u64::from(body_bytes_max))
            }
            FrameError::UnsupportedVersion { .. } => {
                ErrorBody::unsupported_version(VERSION, VERSION, &body.message)
            }
            _ => body,
        }
    }
}

/// Decodes a header, running checks 1-5 of the spec in order; accepts
/// frames of either direction (see [`decode_header_expecting`]).
pub fn decode_header(
    bytes: &[u8; HEADER_BYTES],
    body_bytes_max: u32,
) -> Result<FrameHeader, FrameError> {
    decode_header_inner(bytes, body_bytes_max, None)
}

/// [`decode_header`], and check 4 also refuses a frame whose `REPLY`
/// flag does not match `expected` (`BAD_FRAME`).
pub fn decode_header_expecting(
    bytes: &[u8; HEADER_BYTES],
    body_bytes_max: u32,
    expected: Direction,
) -> Result<FrameHeader, FrameError> {
    decode_header_inner(bytes, body_bytes_max, Some(expected))
}

fn le_u16(b: &[u8; HEADER_BYTES], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8; HEADER_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8; HEADER_BYTES], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | (u64::from(le_u32(b, at + 4)) << 32)
}

pub(crate) fn decode_header_inner(
    b: &[u8; HEADER_BYTES],
    body_bytes_max: u32,
    expected: Option<Direction>,
) -> Result<FrameHeader, FrameError> {
    let found = [b[0], b[1], b[2], b[3]];
    if found != MAGIC {
        return Err(FrameError::BadMagic { found });
    }
    let version = le_u16(b, 4);
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let stored = le_u32(b, HEADER_CRC_OFFSET);
    let computed = crc32c(&b[..HEADER_CRC_OFFSET]);
    if stored != computed {
        return Err(FrameError::HeaderChecksum { stored, computed });
    }
    let header = FrameHeader {
        version,
        opcode: b[6],
        flags: b[7],
        request_id: le_u64(b, 8),
        body_bytes: le_u32(b, 16),
        body_crc32c: le_u32(b, 20),
    };
    let request_id = header.request_id;
    if header.flags & !FLAGS_KNOWN != 0 {
        return Err(FrameError::BadFlags {
            request_id,
            flags: header.flags,
        });
    }
    if let Some(expected) = expected {
        if header.flags & FLAG_REPLY != expected.flags() {
            return Err(FrameError::WrongDirection {
                request_id,
                flags: header.flags,
                expected,
            });
        }
    }
    let reserved = le_u32(b, 24);
    if reserved != 0 {
        return Err(FrameError::ReservedNonZero {
            request_id,
            reserved,
        });
    }
    if header.body_bytes > body_bytes_max {
        return Err(FrameError::TooLarge {
            request_id,
            body_bytes: header.body_bytes,
            body_bytes_max,
        });
    }
    Ok(header)
}

/// Checks the body against the header: its CRC32C (`BAD_CHECKSUM`).
/// A body whose length differs from `body_bytes` is refused as a
/// checksum mismatch too (a reader that framed correctly never has one).
pub fn check_body(header: &FrameHeader, body: &[u8]) -> Result<(), FrameError> {
    let computed = crc32c(body);
    if computed != header.body_crc32c || body.len() as u64 != u64::from(header.body_bytes) {
        return Err(FrameError::BodyChecksum {
            request_id: header.request_id,
            stored: header.body_crc32c,
            computed,
        });
    }
    Ok(())
}

/// Appends a whole frame (header, then `body`) to `out`.
///
/// # Panics
///
/// If `body` is 4 GiB or longer.
pub fn encode_frame(opcode: Opcode, flags: u8, request_id: u64, body: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader::for_body(opcode.as_u8(), flags, request_id, body);
    out.reserve(HEADER_BYTES + body.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
}

/// Appends a frame whose body `write_body` appends in place, so that no
/// temporary body buffer is needed: the header is filled in afterwards.
///
/// # Panics
///
/// If the body is 4 GiB or longer.
pub fn encode_frame_with(
    opcode: Opcode,
    flags: u8,
    request_id: u64,
    out: &mut Vec<u8>,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    write_body(out);
    let body_start = start + HEADER_BYTES;
    let header = FrameHeader::for_body(opcode.as_u8(), flags, request_id, &out[body_start..]);
    out[start..body_start].copy_from_slice(&header.encode());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bitwise CRC32C straight from the spec's definition, independent of
    /// the `crc32c` crate.
    pub(crate) fn crc32c_reference(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                // 0x82F63B78 is 0x1EDC6F41 bit-reversed.
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        crc ^ 0xFFFF_FFFF
    }

    #[test]
    fn crc32c_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_reference(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        let bytes: Vec<u8> = (0..=255u8).collect();
        assert_eq!(crc32c(&bytes), crc32c_reference(&bytes));
    }

    #[test]
    fn opcodes_round_trip() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::from_u8(op.as_u8()), Some(op));
        }
        let known = (0..=255u8)
            .filter(|&b| Opcode::from_u8(b).is_some())
            .count();
        assert_eq!(known, 16);
        assert_eq!(Opcode::from_u8(0), None);
        assert_eq!(Opcode::from_u8(0x10), None);
        assert_eq!(Opcode::Ping.as_u8(), 0x0E);
        assert_eq!(Opcode::FreedUnsubscribe.as_u8(), 0x0F);
        assert_eq!(Opcode::Error.as_u8(), 0x7F);
    }

    /// The header of the spec's table, written by hand.
    fn hand_header() -> [u8; HEADER_BYTES] {
        #[rustfmt::skip]
        let mut b: [u8; HEADER_BYTES] = [
            0x52, 0x46, 0x44, 0x50,                         // magic "RFDP"
            0x01, 0x00,                                     // version 1
            0x04,                                           // opcode LOOKUP
            0x01,                                           // flags REPLY
            0xEF, 0xCD, 0xAB, 0x89, 0x67, 0x45, 0x23, 0x01, // request_id
            0x10, 0x00, 0x00, 0x00,                         // body_bytes 16
            0x78, 0x56, 0x34, 0x12,                         // body_crc32c
            0x00, 0x00, 0x00, 0x00,                         // reserved
            0, 0, 0, 0,                                     // header_crc32c
        ];
        let crc = crc32c_reference(&b[..28]);
        b[28..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn header_exact_layout() {
        let h = FrameHeader {
            version: 1,
            opcode: Opcode::Lookup.as_u8(),
            flags: FLAG_REPLY,
            request_id: 0x0123_4567_89AB_CDEF,
            body_bytes: 16,
            body_crc32c: 0x1234_5678,
        };
        let expected = hand_header();
        assert_eq!(h.encode(), expected);
        // Pinned: the header CRC of this header.
        assert_eq!(
            u32::from_le_bytes([expected[28], expected[29], expected[30], expected[31]]),
            crc32c(&expected[..28])
        );
        assert_eq!(decode_header(&expected, 16), Ok(h));
        assert_eq!(
            decode_header_expecting(&expected, 16, Direction::Reply),
            Ok(h)
        );
    }

    fn refit(mut b: [u8; HEADER_BYTES]) -> [u8; HEADER_BYTES] {
        let crc = crc32c(&b[..28]);
        b[28..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn header_checks_run_in_spec_order() {
        let good = hand_header();
        // Magic wins over everything, even a bad version and checksum.
        let mut b = good;
        b[0] = b'X';
        b[4] = 9;
        let e = decode_header(&b, 16).unwrap_err();
        assert!(matches!(e, FrameError::BadMagic { .. }));
        // Errors before the header checksum passed carry request id 0.
        assert_eq!(e.request_id(), None);
        assert_eq!(e.reply_request_id(), 0);
        // Version before the checksum.
        let mut b = good;
        b[4] = 2;
        let e = decode_header(&b, 16).unwrap_err();
        assert_eq!(e, FrameError::UnsupportedVersion { found: 2 });
        assert_eq!(e.request_id(), None);
        assert_eq!(e.reply_request_id(), 0);
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        // Checksum before flags and size.
        let mut b = good;
        b[7] = 0x80;
        b[16] = 0xFF;
        let e = decode_header(&b, 16).unwrap_err();
        assert!(matches!(e, FrameError::HeaderChecksum { .. }));
        assert_eq!(e.reply_request_id(), 0);
        // Flags before reserved and size.
        let mut b = good;
        b[7] = 0x03;
        b[24] = 1;
        b[16] = 0xFF;
        let e = decode_header(&refit(b), 16).unwrap_err();
        assert_eq!(
            e,
            FrameError::BadFlags {
                request_id: 0x0123_4567_89AB_CDEF,
                flags: 3
            }
        );
        assert_eq!(e.code(), ErrorCode::BadFrame);
        // Direction is part of check 4: a REPLY flag on a request (or a
        // reply without it) is BAD_FRAME, which closes.
        let e = decode_header_expecting(&good, 16, Direction::Request).unwrap_err();
        assert!(matches!(e, FrameError::WrongDirection { .. }));
        assert_eq!(e.code(), ErrorCode::BadFrame);
        assert!(e.code().closes_connection());
        assert_eq!(e.reply_request_id(), 0x0123_4567_89AB_CDEF);
        let mut request = good;
        request[7] = 0;
        let e = decode_header_expecting(&refit(request), 16, Direction::Reply).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadFrame);
        // Reserved before size.
        let mut b = good;
        b[25] = 1;
        b[16] = 0xFF;
        let e = decode_header(&refit(b), 16).unwrap_err();
        assert!(matches!(
            e,
            FrameError::ReservedNonZero {
                reserved: 0x100,
                ..
            }
        ));
        // Size last.
        let e = decode_header(&good, 15).unwrap_err();
        assert_eq!(
            e,
            FrameError::TooLarge {
                request_id: 0x0123_4567_89AB_CDEF,
                body_bytes: 16,
                body_bytes_max: 15
            }
        );
        assert_eq!(e.error_body().detail, 15);
        assert_eq!(e.error_body().code, ErrorCode::FrameTooLarge);
        assert!(e.code().closes_connection());
    }

    #[test]
    fn body_checksum_and_encode_frame() {
        let mut out = vec![0xAA];
        encode_frame(Opcode::Ping, 0, 7, b"hello", &mut out);
        assert_eq!(out.len(), 1 + HEADER_BYTES + 5);
        let mut hb = [0u8; HEADER_BYTES];
        hb.copy_from_slice(&out[1..33]);
        let h = decode_header(&hb, BODY_BYTES_MAX_DEFAULT).unwrap();
        assert_eq!(h.opcode(), Some(Opcode::Ping));
        assert_eq!(h.body_bytes, 5);
        assert!(!h.is_reply());
        assert_eq!(check_body(&h, &out[33..]), Ok(()));
        let e = check_body(&h, b"hellO").unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadChecksum);
        assert_eq!(e.request_id(), Some(7));
        assert!(check_body(&h, b"hell").is_err());

        let mut with = vec![0xAA];
        encode_frame_with(Opcode::Ping, 0, 7, &mut with, |o| {
            o.extend_from_slice(b"hello")
        });
        assert_eq!(with, out);
    }

    #[test]
    fn unsupported_version_error_body_names_the_range() {
        let e = FrameError::UnsupportedVersion { found: 3 };
        let body = e.error_body();
        assert_eq!(body.detail, 1);
        assert_eq!(body.index, 1);
    }
}
