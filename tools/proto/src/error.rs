//! Error codes on the wire, the error frame body, and the typed error of
//! every body decoder (`docs/protocol.md`, "Errors").
//!
//! Two kinds of error live here and must not be confused:
//! - [`ErrorCode`], [`OpErrorCode`] and [`ErrorBody`] are *values of the
//!   protocol*: what the server puts in an `ERROR` frame (opcode `0x7F`);
//! - [`BodyError`] is what a *decoder* of this crate returns for a body
//!   that breaks the spec; [`BodyError::code`] says which wire code the
//!   server answers it with, so the mapping lives in one place.
//!
//! The codes are typed enums: decoding an error body with a code outside
//! `1..=23` is refused ([`BodyError::UnknownErrorCode`]); a protocol
//! version that adds codes is a new version, negotiated by HELLO. The
//! subcode is kept as a raw `u16` (it is only meaningful for
//! `INVALID_OP`, see [`ErrorBody::op_error`]) so an error frame is never
//! lost over a subcode this client does not know.

use crate::wire::{len_u16, put_u16, put_u32, put_u64, Reader};

/// Longest error message, in bytes of UTF-8.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;
/// Fixed part of an error body, before the message.
pub const ERROR_BODY_FIXED_BYTES: usize = 18;
/// `index` of an error that does not name an op.
pub const INDEX_NONE: u32 = u32::MAX;

const _: () = assert!(ERROR_MESSAGE_BYTES_MAX <= u16::MAX as usize);

/// Error codes of the `ERROR` frame (`code`, offset 0 of the body).
#[repr(u16)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Bad magic, flags or reserved header bytes. Closes.
    BadFrame = 1,
    /// Header or body checksum mismatch. Closes.
    BadChecksum = 2,
    /// `body_bytes` above the limit; `detail` = the limit. Closes.
    FrameTooLarge = 3,
    /// `detail` = highest version spoken, `index` = lowest. Closes.
    UnsupportedVersion = 4,
    /// An opcode this server does not know.
    UnknownOpcode = 5,
    /// A body of the wrong size or with a bad field.
    BadRequest = 6,
    /// A request before HELLO. Closes.
    HelloRequired = 7,
    /// Wrong or missing token. Closes.
    AuthFailed = 8,
    /// An op failed validation; `index`, `subcode`; `detail` = its bytenr.
    InvalidOp = 9,
    /// Ref-verify refused an op; `index`; `detail` = its bytenr.
    Refused = 10,
    /// The session id was never registered.
    SessionUnknown = 11,
    /// The session was evicted (least recently used).
    SessionEvicted = 12,
    /// `detail` = the session's oldest kept request number.
    RequestTooOld = 13,
    /// `op_count` is 0 or above `submit_ops_max`; `detail` = the maximum.
    TooManyOps = 14,
    /// The engine latched an I/O failure; `detail` = device offset.
    Failed = 15,
    /// `--connections-max` reached. Closes.
    Busy = 16,
    /// The daemon is stopping. Closes.
    ShuttingDown = 17,
    /// Barrier expired, released or never acquired.
    BarrierUnknown = 18,
    /// The session holds the most barriers it may.
    BarrierLimit = 19,
    /// The freed cursor is older than the lists kept; `detail` = oldest kept.
    FreedExpired = 20,
    /// FREED_ACK for a consumer id not subscribed.
    ConsumerUnknown = 21,
    /// A bug; the message says what.
    Internal = 22,
    /// The node region cannot be sure to hold the commit of this SUBMIT's
    /// ops: nothing of it was logged; `detail` = free nodes (16 KiB).
    NoSpace = 23,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::BadFrame,
        ErrorCode::BadChecksum,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownOpcode,
        ErrorCode::BadRequest,
        ErrorCode::HelloRequired,
        ErrorCode::AuthFailed,
        ErrorCode::InvalidOp,
        ErrorCode::Refused,
        ErrorCode::SessionUnknown,
        ErrorCode::SessionEvicted,
        ErrorCode::RequestTooOld,
        ErrorCode::TooManyOps,
        ErrorCode::Failed,
        ErrorCode::Busy,
        ErrorCode::ShuttingDown,
        ErrorCode::BarrierUnknown,
        ErrorCode::BarrierLimit,
        ErrorCode::FreedExpired,
        ErrorCode::ConsumerUnknown,
        ErrorCode::Internal,
        ErrorCode::NoSpace,
    ];

    /// The code with this wire value, if any.
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        let i = usize::from(code).checked_sub(1)?;
        ErrorCode::ALL.get(i).copied()
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Whether the server closes the connection after sending this error
    /// (the "closes" column of the spec).
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::BadFrame
                | ErrorCode::BadChecksum
                | ErrorCode::FrameTooLarge
                | ErrorCode::UnsupportedVersion
                | ErrorCode::HelloRequired
                | ErrorCode::AuthFailed
                | ErrorCode::Busy
                | ErrorCode::ShuttingDown
        )
    }

    /// The spec's name, e.g. `"BAD_FRAME"`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "BAD_FRAME",
            ErrorCode::BadChecksum => "BAD_CHECKSUM",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::UnknownOpcode => "UNKNOWN_OPCODE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::HelloRequired => "HELLO_REQUIRED",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::InvalidOp => "INVALID_OP",
            ErrorCode::Refused => "REFUSED",
            ErrorCode::SessionUnknown => "SESSION_UNKNOWN",
            ErrorCode::SessionEvicted => "SESSION_EVICTED",
            ErrorCode::RequestTooOld => "REQUEST_TOO_OLD",
            ErrorCode::TooManyOps => "TOO_MANY_OPS",
            ErrorCode::Failed => "FAILED",
            ErrorCode::Busy => "BUSY",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::BarrierUnknown => "BARRIER_UNKNOWN",
            ErrorCode::BarrierLimit => "BARRIER_LIMIT",
            ErrorCode::FreedExpired => "FREED_EXPIRED",
            ErrorCode::ConsumerUnknown => "CONSUMER_UNKNOWN",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::NoSpace => "NO_SPACE",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// `INVALID_OP` subcodes: why an op failed validation.
#[repr(u16)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpErrorCode {
    /// `num_bytes` is 0.
    ZeroNumBytes = 1,
    /// `bytenr + num_bytes` overflows.
    RangeOverflow = 2,
    /// Level above 7.
    LevelOutOfRange = 3,
    /// Seq above 2^56 - 1.
    SeqOutOfRange = 4,
    /// Action not 1-4.
    UnknownAction = 5,
    /// ref_type not 176, 178, 182, 184 (or not 0 on UPDATE_HEAD).
    UnknownRefType = 6,
    /// Backref of the other kind.
    KindMismatch = 7,
    /// `k1` (root) is 0.
    MissingRoot = 8,
    /// `k1` (parent) is 0.
    MissingParent = 9,
    /// UPDATE_HEAD with a backref.
    UpdateHeadWithKey = 10,
    /// UPDATE_HEAD without an extent_op.
    MissingExtentOp = 11,
    /// An extent_op on an op other than UPDATE_HEAD or tree-block ADD_EXTENT.
    UnexpectedExtentOp = 12,
    /// Unknown `eop_flags` bits.
    BadExtentOpFlags = 13,
    /// An extent_op key on a data extent.
    KeyOnData = 14,
    /// A field the op does not use is not 0.
    StrayFields = 15,
    /// `kind` not 0 or 1.
    BadKind = 16,
    /// Reserved op bytes not 0.
    ReservedNonzero = 17,
}

impl OpErrorCode {
    /// Every subcode, in wire order.
    pub const ALL: [OpErrorCode; 17] = [
        OpErrorCode::ZeroNumBytes,
        OpErrorCode::RangeOverflow,
        OpErrorCode::LevelOutOfRange,
        OpErrorCode::SeqOutOfRange,
        OpErrorCode::UnknownAction,
        OpErrorCode::UnknownRefType,
        OpErrorCode::KindMismatch,
        OpErrorCode::MissingRoot,
        OpErrorCode::MissingParent,
        OpErrorCode::UpdateHeadWithKey,
        OpErrorCode::MissingExtentOp,
        OpErrorCode::UnexpectedExtentOp,
        OpErrorCode::BadExtentOpFlags,
        OpErrorCode::KeyOnData,
        OpErrorCode::StrayFields,
        OpErrorCode::BadKind,
        OpErrorCode::ReservedNonzero,
    ];

    /// The subcode with this wire value, if any.
    pub fn from_u16(subcode: u16) -> Option<OpErrorCode> {
        let i = usize::from(subcode).checked_sub(1)?;
        OpErrorCode::ALL.get(i).copied()
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The spec's name, e.g. `"ZERO_NUM_BYTES"`.
    pub fn name(self) -> &'static str {
        match self {
            OpErrorCode::ZeroNumBytes => "ZERO_NUM_BYTES",
            OpErrorCode::RangeOverflow => "RANGE_OVERFLOW",
            OpErrorCode::LevelOutOfRange => "LEVEL_OUT_OF_RANGE",
            OpErrorCode::SeqOutOfRange => "SEQ_OUT_OF_RANGE",
            OpErrorCode::UnknownAction => "UNKNOWN_ACTION",
            OpErrorCode::UnknownRefType => "UNKNOWN_REF_TYPE",
            OpErrorCode::KindMismatch => "KIND_MISMATCH",
            OpErrorCode::MissingRoot => "MISSING_ROOT",
            OpErrorCode::MissingParent => "MISSING_PARENT",
            OpErrorCode::UpdateHeadWithKey => "UPDATE_HEAD_WITH_KEY",
            OpErrorCode::MissingExtentOp => "MISSING_EXTENT_OP",
            OpErrorCode::UnexpectedExtentOp => "UNEXPECTED_EXTENT_OP",
            OpErrorCode::BadExtentOpFlags => "BAD_EXTENT_OP_FLAGS",
            OpErrorCode::KeyOnData => "KEY_ON_DATA",
            OpErrorCode::StrayFields => "STRAY_FIELDS",
            OpErrorCode::BadKind => "BAD_KIND",
            OpErrorCode::ReservedNonzero => "RESERVED_NONZERO",
        }
    }
}

impl std::fmt::Display for OpErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// Why a body decoder refused a body. [`BodyError::code`] is the wire
/// error the server answers with; none of these closes the connection
/// (the framing is intact).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is not the size its opcode or its fields say (a body
    /// shorter than the fixed fields of a sized body is
    /// [`BodyError::TooShort`]).
    #[error("{what}: body is {body_bytes} bytes, expected {expected_bytes}")]
    WrongSize {
        /// The message, e.g. `"LOOKUP request"`.
        what: &'static str,
        /// Length of the body received.
        body_bytes: usize,
        /// Length the body must have.
        expected_bytes: u64,
    },
    /// The body is shorter than the fixed fields before its sized part
    /// (checked first, so that the error names the whole fixed part).
    #[error(
        "{what}: body is {body_bytes} bytes, shorter than its fixed part of {fixed_bytes} bytes"
    )]
    TooShort {
        /// The message.
        what: &'static str,
        /// Length of the body received.
        body_bytes: usize,
        /// Length of the fixed part.
        fixed_bytes: usize,
    },
    /// Reserved bytes are not zero.
    #[error("{what}: reserved bytes at body offset {offset} are not zero")]
    ReservedNonZero {
        /// The message.
        what: &'static str,
        /// Offset of the reserved field in the body.
        offset: usize,
    },
    /// A count, length or boolean outside its allowed range.
    #[error("{what}: {field} is {value}, allowed {min}..={max}")]
    OutOfRange {
        /// The message.
        what: &'static str,
        /// The field, as the spec names it.
        field: &'static str,
        /// The value received.
        value: u64,
        /// Lowest allowed.
        min: u64,
        /// Highest allowed.
        max: u64,
    },
    /// Flag bits the spec does not define are set.
    #[error("{what}: {field} has undefined bits {bits:#x} set")]
    UnknownBits {
        /// The message.
        what: &'static str,
        /// The field.
        field: &'static str,
        /// The undefined bits that were set.
        bits: u64,
    },
    /// Text that is not UTF-8.
    #[error("{what}: {field} is not UTF-8 (valid up to byte {valid_up_to})")]
    BadUtf8 {
        /// The message.
        what: &'static str,
        /// The field.
        field: &'static str,
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// A SUBMIT with `op_count` 0 (the wire answer is `TOO_MANY_OPS`),
    /// from a check without the server's limit.
    #[error("SUBMIT request: op_count is 0")]
    NoOps,
    /// A SUBMIT with `op_count` 0 or above the server's `submit_ops_max`
    /// (`TOO_MANY_OPS`, `detail` = `submit_ops_max`).
    #[error("SUBMIT request: op_count {op_count} outside 1..={submit_ops_max}")]
    TooManyOps {
        /// The `op_count` received.
        op_count: u32,
        /// The server's limit.
        submit_ops_max: u32,
    },
    /// An opcode outside the spec's table.
    #[error("unknown opcode {opcode:#04x}")]
    UnknownOpcode {
        /// The opcode received.
        opcode: u8,
    },
    /// A request with opcode `ERROR` (0x7F), which only the server sends.
    #[error("opcode ERROR (0x7f) in a request: only the server sends it")]
    ErrorOpcodeInRequest,
    /// An error body whose code is outside `1..=23`.
    #[error("error body: unknown error code {code}")]
    UnknownErrorCode {
        /// The code received.
        code: u16,
    },
}

impl BodyError {
    /// The wire error a server answers this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            BodyError::NoOps | BodyError::TooManyOps { .. } => ErrorCode::TooManyOps,
            BodyError::UnknownOpcode { .. } | BodyError::ErrorOpcodeInRequest => {
                ErrorCode::UnknownOpcode
            }
            _ => ErrorCode::BadRequest,
        }
    }

    /// The error body a server sends for it: `detail` is
    /// `submit_ops_max` for [`BodyError::TooManyOps`], else 0 (for
    /// [`BodyError::NoOps`] the server sets it to its `submit_ops_max`).
    pub fn error_body(&self) -> ErrorBody {
        let body = ErrorBody::new(self.code(), &self.to_string());
        match *self {
            BodyError::TooManyOps { submit_ops_max, .. } => {
                body.with_detail(u64::from(submit_ops_max))
            }
            _ => body,
        }
    }
}

/// The body of an `ERROR` frame (`18 + message_bytes` bytes).
///
/// Encoding truncates a message longer than [`ERROR_MESSAGE_BYTES_MAX`]
/// at a char boundary; decoding refuses a longer one and refuses a
/// message that is not UTF-8 (rather than converting it lossily, so that
/// every decoded body re-encodes to the same bytes and a server bug is
/// seen as one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong.
    pub code: ErrorCode,
    /// For `INVALID_OP`, the [`OpErrorCode`]; else 0.
    pub subcode: u16,
    /// The op's index for `INVALID_OP`/`REFUSED`, the lowest version for
    /// `UNSUPPORTED_VERSION`, else [`INDEX_NONE`].
    pub index: u32,
    /// Per code, see [`ErrorCode`]; else 0.
    pub detail: u64,
    /// Human-readable, for logs.
    pub message: String,
}

impl ErrorBody {
    /// An error with subcode 0, index [`INDEX_NONE`], detail 0; the
    /// message is truncated to [`ERROR_MESSAGE_BYTES_MAX`].
    pub fn new(code: ErrorCode, message: &str) -> Self {
        ErrorBody {
            code,
            subcode: 0,
            index: INDEX_NONE,
            detail: 0,
            message: truncate_message(message).to_owned(),
        }
    }

    /// `INVALID_OP` for op `index` of a SUBMIT whose bytenr is `bytenr`.
    pub fn invalid_op(subcode: OpErrorCode, index: u32, bytenr: u64, message: &str) -> Self {
        ErrorBody {
            subcode: subcode.as_u16(),
            index,
            detail: bytenr,
            ..ErrorBody::new(ErrorCode::InvalidOp, message)
        }
    }

    /// `UNSUPPORTED_VERSION` for a server speaking `lowest..=highest`:
    /// `detail` = `highest`, `index` = `lowest` (frame level and HELLO).
    pub fn unsupported_version(lowest: u16, highest: u16, message: &str) -> Self {
        ErrorBody::new(ErrorCode::UnsupportedVersion, message)
            .with_detail(u64::from(highest))
            .with_index(u32::from(lowest))
    }

    /// The same error with `detail` set.
    pub fn with_detail(self, detail: u64) -> Self {
        ErrorBody { detail, ..self }
    }

    /// The same error with `index` set.
    pub fn with_index(self, index: u32) -> Self {
        ErrorBody { index, ..self }
    }

    /// The subcode as an [`OpErrorCode`], for `INVALID_OP` errors.
    pub fn op_error(&self) -> Option<OpErrorCode> {
        match self.code {
            ErrorCode::InvalidOp => OpErrorCode::from_u16(self.subcode),
            _ => None,
        }
    }

    /// Appends the body; a message above [`ERROR_MESSAGE_BYTES_MAX`] is
    /// truncated at a char boundary.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let message = truncate_message(&self.message);
        put_u16(out, self.code.as_u16());
        put_u16(out, self.subcode);
        put_u32(out, self.index);
        put_u64(out, self.detail);
        put_u16(out, len_u16("error message", message.len()));
        out.extend_from_slice(message.as_bytes());
    }

    /// Decodes an error body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("ERROR reply", body);
        r.fixed(ERROR_BODY_FIXED_BYTES)?;
        let code = r.u16()?;
        let code = ErrorCode::from_u16(code).ok_or(BodyError::UnknownErrorCode { code })?;
        let subcode = r.u16()?;
        let index = r.u32()?;
        let detail = r.u64()?;
        let message_bytes = r.u16()?;
        r.check_range(
            "message_bytes",
            u64::from(message_bytes),
            0,
            ERROR_MESSAGE_BYTES_MAX as u64,
        )?;
        let expected = ERROR_BODY_FIXED_BYTES as u64 + u64::from(message_bytes);
        if body.len() as u64 != expected {
            return Err(r.wrong_size(expected));
        }
        let message = r.text("message", usize::from(message_bytes))?;
        r.finish()?;
        Ok(ErrorBody {
            code,
            subcode,
            index,
            detail,
            message,
        })
    }
}

/// The longest prefix of `message` that fits the wire and ends on a char
/// boundary.
fn truncate_message(message: &str) -> &str {
    if message.len() <= ERROR_MESSAGE_BYTES_MAX {
        return message;
    }
    let mut end = ERROR_MESSAGE_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_and_close_as_the_spec_table() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.as_u16() as usize, i + 1);
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(*code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(24), None);
        let closing: Vec<u16> = ErrorCode::ALL
            .iter()
            .filter(|c| c.closes_connection())
            .map(|c| c.as_u16())
            .collect();
        assert_eq!(closing, [1, 2, 3, 4, 7, 8, 16, 17]);
        assert_eq!(ErrorCode::Internal.as_u16(), 22);
        assert_eq!(ErrorCode::NoSpace.as_u16(), 23);
        assert_eq!(ErrorCode::NoSpace.name(), "NO_SPACE");
        assert_eq!(ErrorCode::FreedExpired.name(), "FREED_EXPIRED");
    }

    #[test]
    fn op_error_codes_round_trip() {
        for (i, code) in OpErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.as_u16() as usize, i + 1);
            assert_eq!(OpErrorCode::from_u16(code.as_u16()), Some(*code));
        }
        assert_eq!(OpErrorCode::from_u16(0), None);
        assert_eq!(OpErrorCode::from_u16(18), None);
        assert_eq!(OpErrorCode::ReservedNonzero.as_u16(), 17);
        assert_eq!(OpErrorCode::StrayFields.name(), "STRAY_FIELDS");
    }

    #[test]
    fn error_body_exact_layout() {
        let e = ErrorBody::invalid_op(OpErrorCode::KindMismatch, 3, 0x1122_3344_5566_7788, "héllo");
        let mut out = Vec::new();
        e.encode(&mut out);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[9, 0][..],                                      // code INVALID_OP
            &[7, 0],                                          // subcode KIND_MISMATCH
            &[3, 0, 0, 0],                                    // index
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11], // detail
            &[6, 0],                                          // message_bytes
            "héllo".as_bytes(),
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(ErrorBody::decode(&out), Ok(e.clone()));
        assert_eq!(e.op_error(), Some(OpErrorCode::KindMismatch));
    }

    #[test]
    fn error_body_message_is_truncated_at_a_char_boundary() {
        // 1023 ASCII bytes then a 2-byte char: 1025 bytes, cut to 1023.
        let message = format!("{}é", "a".repeat(1023));
        let e = ErrorBody::new(ErrorCode::Internal, &message);
        assert_eq!(e.message.len(), 1023);
        let long = ErrorBody {
            message: message.clone(),
            ..e.clone()
        };
        let mut out = Vec::new();
        long.encode(&mut out);
        assert_eq!(out.len(), ERROR_BODY_FIXED_BYTES + 1023);
        assert_eq!(ErrorBody::decode(&out), Ok(e));
    }

    #[test]
    fn error_body_decode_refuses_bad_bodies() {
        let mut out = Vec::new();
        ErrorBody::new(ErrorCode::Busy, "abc").encode(&mut out);
        assert!(matches!(
            ErrorBody::decode(&out[..out.len() - 1]),
            Err(BodyError::WrongSize { .. })
        ));
        let mut longer = out.clone();
        longer.push(b'x');
        assert!(matches!(
            ErrorBody::decode(&longer),
            Err(BodyError::WrongSize { .. })
        ));
        let mut bad_code = out.clone();
        bad_code[0] = 24;
        assert_eq!(
            ErrorBody::decode(&bad_code),
            Err(BodyError::UnknownErrorCode { code: 24 })
        );
        let mut bad_utf8 = out.clone();
        bad_utf8[19] = 0xFF;
        assert!(matches!(
            ErrorBody::decode(&bad_utf8),
            Err(BodyError::BadUtf8 { .. })
        ));
        let mut too_long = vec![0u8; ERROR_BODY_FIXED_BYTES + 1025];
        too_long[0] = 22;
        too_long[16..18].copy_from_slice(&1025u16.to_le_bytes());
        assert!(matches!(
            ErrorBody::decode(&too_long),
            Err(BodyError::OutOfRange { .. })
        ));
    }

    #[test]
    fn body_errors_map_to_wire_codes() {
        assert_eq!(BodyError::NoOps.code(), ErrorCode::TooManyOps);
        assert_eq!(
            BodyError::UnknownOpcode { opcode: 0x42 }.code(),
            ErrorCode::UnknownOpcode
        );
        assert_eq!(
            BodyError::ErrorOpcodeInRequest.code(),
            ErrorCode::UnknownOpcode
        );
        let e = BodyError::ReservedNonZero {
            what: "x",
            offset: 4,
        };
        assert_eq!(e.code(), ErrorCode::BadRequest);
        assert!(!e.code().closes_connection());
        assert_eq!(e.error_body().code, ErrorCode::BadRequest);
    }
}
