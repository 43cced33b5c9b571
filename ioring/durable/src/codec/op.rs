//! Op records: one [`Op`] per log record, a flags byte then varints.

use refd_core::model::{Action, DiskKey, ExtentKind, ExtentOp, Op};

use super::{get_ref_key, put_ref_key, put_varint, CodecError, Reader};

/// Longest op record [`encode_op`] produces.
pub const OP_RECORD_BYTES_MAX: usize = 1 + 10 * 9 + 1 + 1 + 1;

const OP_ACTION_MASK: u8 = 0x07;
const OP_DATA: u8 = 0x08;
const OP_SEQ: u8 = 0x10;
const OP_EXTENT_OP: u8 = 0x20;
const OP_EXTENT_OP_KEY: u8 = 0x40;
/// Never set in an op record: a first byte with it is another kind of
/// record (`record.rs`).
pub(crate) const OP_RESERVED: u8 = 0x80;

/// Encodes `op` as one log record (see `docs/durable.md`, "Op record").
pub fn encode_op(op: &Op, out: &mut Vec<u8>) {
    let mut flags = op.action.code() & OP_ACTION_MASK;
    if op.kind.is_data() {
        flags |= OP_DATA;
    }
    if op.seq != 0 {
        flags |= OP_SEQ;
    }
    if let Some(eop) = op.extent_op {
        flags |= OP_EXTENT_OP;
        if eop.key.is_some() {
            flags |= OP_EXTENT_OP_KEY;
        }
    }
    out.push(flags);
    put_varint(out, op.bytenr);
    put_varint(out, op.num_bytes);
    if let ExtentKind::Tree { level } = op.kind {
        out.push(level);
    }
    if let Some(key) = op.key {
        put_ref_key(out, key);
    }
    if op.seq != 0 {
        put_varint(out, op.seq);
    }
    if let Some(eop) = op.extent_op {
        put_varint(out, eop.flags_to_set);
        if let Some(k) = eop.key {
            put_varint(out, k.objectid);
            out.push(k.item_type);
            put_varint(out, k.offset);
        }
    }
}

/// The record of `op` in a new buffer.
pub fn op_record(op: &Op) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    encode_op(op, &mut out);
    debug_assert!(out.len() <= OP_RECORD_BYTES_MAX);
    out
}

/// Decodes one op record; the whole input must be consumed and the op must
/// pass [`Op::check`].
pub fn decode_op(buf: &[u8]) -> Result<Op, CodecError> {
    let mut r = Reader::new(buf);
    let op = read_op(&mut r)?;
    r.finish("op record")?;
    Ok(op)
}

/// Reads one op (self-delimiting: the flags byte says which fields
/// follow) and checks it.
pub(crate) fn read_op(r: &mut Reader<'_>) -> Result<Op, CodecError> {
    let flags = r.u8("op flags")?;
    if flags & OP_RESERVED != 0 || (flags & OP_EXTENT_OP_KEY != 0 && flags & OP_EXTENT_OP == 0) {
        return Err(CodecError::Invalid {
            field: "op flags",
            value: u64::from(flags),
        });
    }
    let action = Action::from_code(flags & OP_ACTION_MASK).ok_or(CodecError::Invalid {
        field: "op action",
        value: u64::from(flags & OP_ACTION_MASK),
    })?;
    let bytenr = r.varint("bytenr")?;
    let num_bytes = r.varint("num_bytes")?;
    let kind = if flags & OP_DATA != 0 {
        ExtentKind::Data
    } else {
        ExtentKind::Tree {
            level: r.u8("level")?,
        }
    };
    let key = if action == Action::UpdateHead {
        None
    } else {
        Some(get_ref_key(r)?)
    };
    let seq = if flags & OP_SEQ != 0 {
        let seq = r.varint("seq")?;
        if seq == 0 {
            return Err(CodecError::Invalid {
                field: "seq",
                value: 0,
            });
        }
        seq
    } else {
        0
    };
    let extent_op = if flags & OP_EXTENT_OP != 0 {
        let flags_to_set = r.varint("extent_op flags")?;
        let key = if flags & OP_EXTENT_OP_KEY != 0 {
            Some(DiskKey {
                objectid: r.varint("extent_op key objectid")?,
                item_type: r.u8("extent_op key type")?,
                offset: r.varint("extent_op key offset")?,
            })
        } else {
            None
        };
        Some(ExtentOp { flags_to_set, key })
    } else {
        None
    };
    let op = Op {
        bytenr,
        num_bytes,
        kind,
        action,
        key,
        seq,
        extent_op,
    };
    op.check()?;
    Ok(op)
}
