//! Log records beyond single ops: the daemon's SUBMIT batches (with the
//! session and request number that make them exactly-once), session
//! registrations, and the freed-list consumers' subscriptions,
//! acknowledgements and removals. All are replayed by recovery, in log order.
//!
//! The first byte tells them apart: an op record's flags byte never has
//! bit 7 set (`op.rs`), so every other record starts with a kind
//! byte that has it:
//!
//! | kind | record | then (varints unless said) |
//! |---|---|---|
//! | `0x81` | SUBMIT | `session`, `request`, `op_count`, then `op_count` op records |
//! | `0x82` | REGISTER | `session` |
//! | `0x83` | SUBSCRIBE | `consumer`, `name_len`, `name` (UTF-8 bytes, 1..=64), `acked` |
//! | `0x84` | FREED_ACK | `consumer`, `generation` |
//! | `0x85` | UNSUBSCRIBE | `consumer` |
//!
//! A SUBMIT is one record, so one log batch holds it whole: after a crash
//! its ops are all present or all absent, together with the request
//! number the server answered it under.

use refd_core::model::Op;

use super::op::{read_op, OP_RESERVED};
use super::{encode_op, put_varint, CodecError, Reader, OP_RECORD_BYTES_MAX};

/// Kind byte of a SUBMIT record.
pub const RECORD_SUBMIT: u8 = 0x81;
/// Kind byte of a REGISTER record.
pub const RECORD_REGISTER: u8 = 0x82;
/// Kind byte of a SUBSCRIBE record.
pub const RECORD_SUBSCRIBE: u8 = 0x83;
/// Kind byte of a FREED_ACK record.
pub const RECORD_FREED_ACK: u8 = 0x84;
/// Kind byte of an UNSUBSCRIBE record.
pub const RECORD_UNSUBSCRIBE: u8 = 0x85;
/// Longest consumer name.
pub const CONSUMER_NAME_BYTES_MAX: usize = 64;
/// Bytes of a SUBMIT record besides its ops, at most (kind + 3 varints).
pub const SUBMIT_RECORD_OVERHEAD_BYTES_MAX: usize = 1 + 3 * 10;

const _: () = assert!(
    RECORD_SUBMIT & OP_RESERVED != 0
        && RECORD_FREED_ACK & OP_RESERVED != 0
        && RECORD_UNSUBSCRIBE & OP_RESERVED != 0
);

/// Longest SUBMIT record of `ops` ops.
pub const fn submit_record_bytes_max(ops: usize) -> usize {
    SUBMIT_RECORD_OVERHEAD_BYTES_MAX + ops * OP_RECORD_BYTES_MAX
}

/// A decoded log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// One op (the in-process API, `DurableEngine::add`).
    Op(Op),
    /// A SUBMIT batch of a session.
    Submit {
        /// Session id.
        session: u64,
        /// The session's request number.
        request: u64,
        /// The batch, in order.
        ops: Vec<Op>,
    },
    /// A session was registered.
    Register {
        /// Its id.
        session: u64,
    },
    /// A freed-list consumer was subscribed.
    Subscribe {
        /// Its id.
        consumer: u64,
        /// Its name.
        name: String,
        /// The generation it starts acknowledged up to (the newest dropped
        /// list's: it never starts behind what is kept).
        acked: u64,
    },
    /// A consumer acknowledged every freed list up to `generation`.
    FreedAck {
        /// Consumer id.
        consumer: u64,
        /// Generation acknowledged.
        generation: u64,
    },
    /// A freed-list consumer was removed (its id is never handed out
    /// again).
    Unsubscribe {
        /// Its id.
        consumer: u64,
    },
}

/// Encodes a SUBMIT record of `ops` into `out` (appended).
pub fn encode_submit(session: u64, request: u64, ops: &[Op], out: &mut Vec<u8>) {
    let start = out.len();
    out.push(RECORD_SUBMIT);
    put_varint(out, session);
    put_varint(out, request);
    put_varint(out, ops.len() as u64);
    for op in ops {
        encode_op(op, out);
    }
    debug_assert!(out.len() - start <= submit_record_bytes_max(ops.len()));
    debug_assert_eq!(
        decode_record(&out[start..]),
        Ok(Record::Submit {
            session,
            request,
            ops: ops.to_vec()
        })
    );
}

/// Encodes any record (appended to `out`).
pub fn encode_record(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Op(op) => encode_op(op, out),
        Record::Submit {
            session,
            request,
            ops,
        } => encode_submit(*session, *request, ops, out),
        Record::Register { session } => {
            out.push(RECORD_REGISTER);
            put_varint(out, *session);
        }
        Record::Subscribe {
            consumer,
            name,
            acked,
        } => {
            out.push(RECORD_SUBSCRIBE);
            put_varint(out, *consumer);
            put_varint(out, name.len() as u64);
            out.extend_from_slice(name.as_bytes());
            put_varint(out, *acked);
        }
        Record::FreedAck {
            consumer,
            generation,
        } => {
            out.push(RECORD_FREED_ACK);
            put_varint(out, *consumer);
            put_varint(out, *generation);
        }
        Record::Unsubscribe { consumer } => {
            out.push(RECORD_UNSUBSCRIBE);
            put_varint(out, *consumer);
        }
    }
}

/// Decodes one log record of any kind; the whole input must be consumed.
/// Every count and length is checked against the bytes left before it
/// sizes anything.
pub fn decode_record(buf: &[u8]) -> Result<Record, CodecError> {
    let mut r = Reader::new(buf);
    let first = *buf.first().ok_or(CodecError::Truncated {
        field: "record kind",
        at: 0,
    })?;
    if first & OP_RESERVED == 0 {
        let op = read_op(&mut r)?;
        r.finish("op record")?;
        return Ok(Record::Op(op));
    }
    let kind = r.u8("record kind")?;
    let record = match kind {
        RECORD_SUBMIT => {
            let session = r.varint("session")?;
            let request = r.varint("request number")?;
            let count = r.varint("op count")?;
            // Every op record is at least 3 bytes (flags, bytenr, size).
            if count == 0 || count > (r.remaining() / 3) as u64 {
                return Err(CodecError::Invalid {
                    field: "op count",
                    value: count,
                });
            }
            // Grown as ops decode: a forged count costs no memory up front.
            let mut ops = Vec::with_capacity((count as usize).min(1024));
            for _ in 0..count {
                ops.push(read_op(&mut r)?);
            }
            Record::Submit {
                session,
                request,
                ops,
            }
        }
        RECORD_REGISTER => Record::Register {
            session: r.varint("session")?,
        },
        RECORD_SUBSCRIBE => {
            let consumer = r.varint("consumer")?;
            let len = r.varint("name length")?;
            if len == 0 || len > CONSUMER_NAME_BYTES_MAX as u64 {
                return Err(CodecError::Invalid {
                    field: "consumer name length",
                    value: len,
                });
            }
            let bytes = r.slice(len as usize, "consumer name")?;
            let name = std::str::from_utf8(bytes)
                .map_err(|_| CodecError::Invalid {
                    field: "consumer name (UTF-8)",
                    value: len,
                })?
                .to_string();
            let acked = r.varint("acked generation")?;
            Record::Subscribe {
                consumer,
                name,
                acked,
            }
        }
        RECORD_FREED_ACK => Record::FreedAck {
            consumer: r.varint("consumer")?,
            generation: r.varint("generation")?,
        },
        RECORD_UNSUBSCRIBE => Record::Unsubscribe {
            consumer: r.varint("consumer")?,
        },
        other => {
            return Err(CodecError::Invalid {
                field: "record kind",
                value: u64::from(other),
            })
        }
    };
    r.finish("record")?;
    Ok(record)
}
