//! Bytes of the durable engine: op records in the log and extent items in
//! the B+tree. Specified in `docs/durable.md` ("Op record", "Extent items").
//!
//! **Op records.** One log record holds one [`Op`]: a flags byte, then
//! unsigned LEB128 varints for the numbers, so a common data-ref op is 10-20
//! bytes. [`decode_op`] never panics: any malformed input (truncated,
//! overlong varint, unknown bits, trailing bytes, an op that fails
//! [`Op::check`]) is a typed [`CodecError`].
//!
//! **Extent items.** btrfs-like: one B+tree item per extent, keyed
//! `(bytenr, EXTENT_ITEM 168, num_bytes)` for data and
//! `(bytenr, METADATA_ITEM 169, level)` for tree blocks, whose value holds
//! the flags, generation, the tree block key and the *inline* backrefs (laid
//! out exactly as btrfs's inline refs, so the value is never larger than
//! what [`ExtentItem::item_bytes`] budgets); *keyed* backrefs are separate
//! items `(bytenr, 176 | 178 | 182 | 184, root | hash | parent)`. `refs` is
//! not stored: it is the sum of the backref counts and is recomputed.

use std::collections::BTreeMap;

use refd_core::extent_tree::{ExtentItem, ExtentTree, ItemError};
use refd_core::head::{DelayedRef, Head, HeadSummary, PendingExtentOp};
use refd_core::model::{
    Action, DiskKey, ExtentKind, ExtentOp, Op, OpError, RefKey, EXTENT_DATA_REF_KEY,
    SHARED_BLOCK_REF_KEY, SHARED_DATA_REF_KEY, TREE_BLOCK_REF_KEY,
};
use refd_ioring::btree::{Change, Key, VALUE_BYTES_MAX};

/// B+tree item type of a data extent item (btrfs `EXTENT_ITEM_KEY`).
pub const EXTENT_ITEM_KEY: u8 = 168;
/// B+tree item type of a tree block extent item (btrfs `METADATA_ITEM_KEY`).
pub const METADATA_ITEM_KEY: u8 = 169;

/// Longest op record [`encode_op`] produces.
pub const OP_RECORD_BYTES_MAX: usize = 1 + 10 * 9 + 1 + 1 + 1;

/// Why bytes could not be decoded (or an item not encoded).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input ended inside `field`.
    #[error("truncated at byte {at} reading {field}")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Byte offset in the input.
        at: usize,
    },
    /// A varint longer than 10 bytes, overflowing 64 bits, or not in its
    /// shortest form.
    #[error("bad varint at byte {at} reading {field}")]
    BadVarint {
        /// Field being read.
        field: &'static str,
        /// Byte offset in the input.
        at: usize,
    },
    /// A field holds a value this version does not know.
    #[error("invalid {field}: {value:#x}")]
    Invalid {
        /// Field.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// Bytes left after a complete record or value.
    #[error("{extra} trailing bytes after {what}")]
    Trailing {
        /// What was decoded.
        what: &'static str,
        /// Bytes left over.
        extra: usize,
    },
    /// The decoded op breaks an op invariant.
    #[error("decoded op is invalid: {0}")]
    Op(#[from] OpError),
    /// A decoded extent item breaks an item invariant.
    #[error("extent {bytenr}: decoded item is invalid: {source}")]
    Item {
        /// Extent.
        bytenr: u64,
        /// Why.
        source: ItemError,
    },
    /// A keyed backref or an inconsistency between items of one extent.
    #[error("extent {bytenr}: {reason}")]
    Extent {
        /// Extent.
        bytenr: u64,
        /// What is wrong.
        reason: String,
    },
    /// An extent item whose value does not fit a B+tree item.
    #[error("extent {bytenr}: item value of {len_bytes} bytes exceeds {max_bytes}")]
    ValueTooLarge {
        /// Extent.
        bytenr: u64,
        /// Encoded length.
        len_bytes: usize,
        /// Limit ([`VALUE_BYTES_MAX`]).
        max_bytes: usize,
    },
    /// A data backref count above `u32::MAX` (btrfs stores counts as u32).
    #[error("extent {bytenr}: backref '{key}' count {count} exceeds u32")]
    CountTooLarge {
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
        /// Count.
        count: u64,
    },
}

// ---------------------------------------------------------------- varints

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        let b = *self
            .buf
            .get(self.at)
            .ok_or(CodecError::Truncated { field, at: self.at })?;
        self.at += 1;
        Ok(b)
    }

    fn bytes<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CodecError> {
        let s = self
            .buf
            .get(self.at..self.at + N)
            .ok_or(CodecError::Truncated { field, at: self.at })?;
        self.at += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.bytes::<4>(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.bytes::<8>(field)?))
    }

    fn varint(&mut self, field: &'static str) -> Result<u64, CodecError> {
        let start = self.at;
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(field)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(CodecError::BadVarint { field, at: start });
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(CodecError::BadVarint { field, at: start });
                }
                return Ok(v);
            }
        }
        Err(CodecError::BadVarint { field, at: start })
    }

    fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            extra => Err(CodecError::Trailing { what, extra }),
        }
    }

    fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }
}

// ------------------------------------------------------------- op records

const OP_ACTION_MASK: u8 = 0x07;
const OP_DATA: u8 = 0x08;
const OP_SEQ: u8 = 0x10;
const OP_EXTENT_OP: u8 = 0x20;
const OP_EXTENT_OP_KEY: u8 = 0x40;
const OP_RESERVED: u8 = 0x80;

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
        Some(get_ref_key(&mut r)?)
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
    r.finish("op record")?;
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

// ----------------------------------------------------------- extent items

/// Header flag bit: a tree block key follows.
const ITEM_HAS_TREE_KEY: u8 = 0x01;

/// The B+tree key of the extent item of `bytenr`.
pub fn item_key(bytenr: u64, num_bytes: u64, kind: ExtentKind) -> Key {
    match kind {
        ExtentKind::Data => Key::new(bytenr, EXTENT_ITEM_KEY, num_bytes),
        ExtentKind::Tree { level } => Key::new(bytenr, METADATA_ITEM_KEY, u64::from(level)),
    }
}

/// btrfs-like `hash_extent_data_ref` (FNV-1a here, 63 bits): the offset of
/// a keyed `EXTENT_DATA_REF` item. Collisions inside one extent are
/// resolved by probing the next offset.
pub fn hash_extent_data_ref(root: u64, objectid: u64, offset: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in [root, objectid, offset] {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h >> 1
}

fn count_u32(bytenr: u64, key: RefKey, count: u64) -> Result<u32, CodecError> {
    u32::try_from(count).map_err(|_| CodecError::CountTooLarge { bytenr, key, count })
}

/// The extent item alone (with its inline backrefs): the first item of
/// [`encode_extent`]. The whole item is checked.
pub fn encode_extent_item(bytenr: u64, item: &ExtentItem) -> Result<(Key, Vec<u8>), CodecError> {
    item.check()
        .map_err(|source| CodecError::Item { bytenr, source })?;
    let mut v = Vec::with_capacity(item.item_bytes());
    v.push(if item.tree_key.is_some() {
        ITEM_HAS_TREE_KEY
    } else {
        0
    });
    put_varint(&mut v, item.flags);
    put_varint(&mut v, item.generation);
    if let ExtentKind::Tree { .. } = item.kind {
        put_varint(&mut v, item.num_bytes);
    }
    if let Some(k) = item.tree_key {
        v.extend_from_slice(&k.objectid.to_le_bytes());
        v.push(k.item_type);
        v.extend_from_slice(&k.offset.to_le_bytes());
    }
    for &(key, count) in &item.inline {
        v.push(key.type_code());
        match key {
            RefKey::TreeBlock { root } => v.extend_from_slice(&root.to_le_bytes()),
            RefKey::SharedBlock { parent } => v.extend_from_slice(&parent.to_le_bytes()),
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => {
                v.extend_from_slice(&root.to_le_bytes());
                v.extend_from_slice(&objectid.to_le_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(&count_u32(bytenr, key, count)?.to_le_bytes());
            }
            RefKey::SharedData { parent } => {
                v.extend_from_slice(&parent.to_le_bytes());
                v.extend_from_slice(&count_u32(bytenr, key, count)?.to_le_bytes());
            }
        }
    }
    if v.len() > VALUE_BYTES_MAX {
        return Err(CodecError::ValueTooLarge {
            bytenr,
            len_bytes: v.len(),
            max_bytes: VALUE_BYTES_MAX,
        });
    }
    Ok((item_key(bytenr, item.num_bytes, item.kind), v))
}

/// Encodes the extent item of `bytenr` and its keyed backrefs as B+tree
/// items, sorted by key.
pub fn encode_extent(bytenr: u64, item: &ExtentItem) -> Result<Vec<(Key, Vec<u8>)>, CodecError> {
    let mut out = vec![encode_extent_item(bytenr, item)?];
    let mut keyed: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
    for &(key, count) in &item.keyed {
        let (mut k, value) = match key {
            RefKey::TreeBlock { root } => (Key::new(bytenr, TREE_BLOCK_REF_KEY, root), Vec::new()),
            RefKey::SharedBlock { parent } => {
                (Key::new(bytenr, SHARED_BLOCK_REF_KEY, parent), Vec::new())
            }
            RefKey::SharedData { parent } => (
                Key::new(bytenr, SHARED_DATA_REF_KEY, parent),
                count_u32(bytenr, key, count)?.to_le_bytes().to_vec(),
            ),
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => {
                let mut v = Vec::with_capacity(28);
                v.extend_from_slice(&root.to_le_bytes());
                v.extend_from_slice(&objectid.to_le_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(&count_u32(bytenr, key, count)?.to_le_bytes());
                (
                    Key::new(
                        bytenr,
                        EXTENT_DATA_REF_KEY,
                        hash_extent_data_ref(root, objectid, offset),
                    ),
                    v,
                )
            }
        };
        // Probe past a hash collision (only EXTENT_DATA_REF can collide).
        while keyed.contains_key(&k) {
            k.offset = k.offset.wrapping_add(1);
        }
        keyed.insert(k, value);
    }
    out.extend(keyed);
    Ok(out)
}

// ------------------------------------------------------------- held heads

/// Objectid of the held-heads items (no extent can start there: an extent
/// at `u64::MAX` would end past the address space).
pub const HELD_OBJECTID: u64 = u64::MAX;
/// Item type of the held-heads items: `(HELD_OBJECTID, HELD_HEADS_KEY, i)`
/// holds chunk `i` of the held-heads stream.
pub const HELD_HEADS_KEY: u8 = 240;
/// Largest bytenr an extent item can have (see [`HELD_OBJECTID`]).
pub const EXTENT_BYTENR_MAX: u64 = u64::MAX - 1;
/// Version byte at the start of the held-heads stream.
const HELD_STREAM_VERSION: u8 = 1;
const HELD_SHAPE_KNOWN: u8 = 0x01;
const HELD_MIXED: u8 = 0x02;
const HELD_EXTENT_OP: u8 = 0x04;
const HELD_EXTENT_OP_KEY: u8 = 0x08;

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_ref_key(out: &mut Vec<u8>, key: RefKey) {
    out.push(key.type_code());
    let (k1, k2, k3) = key.words();
    put_varint(out, k1);
    if let RefKey::ExtentData { .. } = key {
        put_varint(out, k2);
        put_varint(out, k3);
    }
}

fn get_ref_key(r: &mut Reader<'_>) -> Result<RefKey, CodecError> {
    let code = r.u8("ref type")?;
    let k1 = r.varint("ref root or parent")?;
    let (k2, k3) = if code == EXTENT_DATA_REF_KEY {
        (r.varint("ref objectid")?, r.varint("ref offset")?)
    } else {
        (0, 0)
    };
    RefKey::from_words(code, k1, k2, k3).ok_or(CodecError::Invalid {
        field: "ref type",
        value: u64::from(code),
    })
}

/// Encodes the heads a commit held back (seq barrier) as one stream: a
/// version byte, the head count, then each head (see `docs/durable.md`,
/// "Held heads"). Stored in the B+tree in chunks ([`held_items`]).
pub fn encode_held(heads: &[Head]) -> Vec<u8> {
    let mut out = vec![HELD_STREAM_VERSION];
    put_varint(&mut out, heads.len() as u64);
    for h in heads {
        let s = &h.summary;
        put_varint(&mut out, h.bytenr);
        put_varint(&mut out, s.num_bytes);
        match s.kind {
            ExtentKind::Data => out.push(0),
            ExtentKind::Tree { level } => {
                out.push(1);
                out.push(level);
            }
        }
        let mut flags = 0;
        if s.shape_known {
            flags |= HELD_SHAPE_KNOWN;
        }
        if s.mixed {
            flags |= HELD_MIXED;
        }
        if let Some(e) = &s.extent_op {
            flags |= HELD_EXTENT_OP;
            if e.key.is_some() {
                flags |= HELD_EXTENT_OP_KEY;
            }
        }
        out.push(flags);
        put_varint(&mut out, s.alloc_stamp);
        put_varint(&mut out, zigzag(s.total_ref_mod));
        if let Some(e) = &s.extent_op {
            put_varint(&mut out, e.flags_to_set);
            put_varint(&mut out, e.flags_stamp);
            if let Some((stamp, k)) = e.key {
                put_varint(&mut out, stamp);
                put_varint(&mut out, k.objectid);
                out.push(k.item_type);
                put_varint(&mut out, k.offset);
            }
        }
        put_varint(&mut out, h.refs.len() as u64);
        for r in &h.refs {
            put_ref_key(&mut out, r.key);
            put_varint(&mut out, r.seq);
            put_varint(&mut out, zigzag(r.ref_mod));
        }
    }
    out
}

/// Decodes a held-heads stream: the whole input must be consumed, at least
/// one head, heads strictly ascending by bytenr, refs of a head strictly
/// ascending by (key, seq) with non-zero ref_mods summing to its
/// total_ref_mod.
pub fn decode_held(buf: &[u8]) -> Result<Vec<Head>, CodecError> {
    let mut r = Reader::new(buf);
    let version = r.u8("held stream version")?;
    if version != HELD_STREAM_VERSION {
        return Err(CodecError::Invalid {
            field: "held stream version",
            value: u64::from(version),
        });
    }
    let count = r.varint("held head count")?;
    if count == 0 {
        // An empty held set is stored as no stream at all.
        return Err(CodecError::Invalid {
            field: "held head count",
            value: 0,
        });
    }
    let mut heads: Vec<Head> = Vec::new();
    for _ in 0..count {
        let bytenr = r.varint("held bytenr")?;
        if heads.last().is_some_and(|h| h.bytenr >= bytenr) || bytenr > EXTENT_BYTENR_MAX {
            return Err(CodecError::Invalid {
                field: "held bytenr (order)",
                value: bytenr,
            });
        }
        let num_bytes = r.varint("held num_bytes")?;
        let kind = match r.u8("held kind")? {
            0 => ExtentKind::Data,
            1 => ExtentKind::Tree {
                level: r.u8("held level")?,
            },
            other => {
                return Err(CodecError::Invalid {
                    field: "held kind",
                    value: u64::from(other),
                })
            }
        };
        let flags = r.u8("held flags")?;
        let known = HELD_SHAPE_KNOWN | HELD_MIXED | HELD_EXTENT_OP | HELD_EXTENT_OP_KEY;
        if flags & !known != 0 || (flags & HELD_EXTENT_OP_KEY != 0 && flags & HELD_EXTENT_OP == 0) {
            return Err(CodecError::Invalid {
                field: "held flags",
                value: u64::from(flags),
            });
        }
        let alloc_stamp = r.varint("held alloc stamp")?;
        let total_ref_mod = unzigzag(r.varint("held total_ref_mod")?);
        let extent_op = if flags & HELD_EXTENT_OP != 0 {
            let flags_to_set = r.varint("held extent_op flags")?;
            let flags_stamp = r.varint("held extent_op flags stamp")?;
            let key = if flags & HELD_EXTENT_OP_KEY != 0 {
                let stamp = r.varint("held extent_op key stamp")?;
                Some((
                    stamp,
                    DiskKey {
                        objectid: r.varint("held extent_op key objectid")?,
                        item_type: r.u8("held extent_op key type")?,
                        offset: r.varint("held extent_op key offset")?,
                    },
                ))
            } else {
                None
            };
            Some(PendingExtentOp {
                flags_to_set,
                flags_stamp,
                key,
            })
        } else {
            None
        };
        let nrefs = r.varint("held ref count")?;
        let mut refs: Vec<DelayedRef> = Vec::new();
        for _ in 0..nrefs {
            let key = get_ref_key(&mut r)?;
            let seq = r.varint("held ref seq")?;
            let ref_mod = unzigzag(r.varint("held ref_mod")?);
            if ref_mod == 0 || refs.last().is_some_and(|p| (p.key, p.seq) >= (key, seq)) {
                return Err(CodecError::Invalid {
                    field: "held ref (zero or order)",
                    value: bytenr,
                });
            }
            refs.push(DelayedRef { key, seq, ref_mod });
        }
        // A head's total is the sum of its refs (both merge additively).
        let sum = refs
            .iter()
            .try_fold(0i64, |acc, r| acc.checked_add(r.ref_mod));
        if sum != Some(total_ref_mod) {
            return Err(CodecError::Invalid {
                field: "held total_ref_mod (not the sum of the refs)",
                value: bytenr,
            });
        }
        heads.push(Head {
            bytenr,
            summary: HeadSummary {
                num_bytes,
                kind,
                shape_known: flags & HELD_SHAPE_KNOWN != 0,
                mixed: flags & HELD_MIXED != 0,
                alloc_stamp,
                total_ref_mod,
                extent_op,
            },
            refs,
        });
    }
    r.finish("held heads")?;
    Ok(heads)
}

/// The B+tree items of a held-heads stream: chunks of at most
/// `VALUE_BYTES_MAX` bytes at `(HELD_OBJECTID, HELD_HEADS_KEY, i)`.
pub fn held_items(stream: &[u8]) -> Vec<(Key, Vec<u8>)> {
    stream
        .chunks(VALUE_BYTES_MAX)
        .enumerate()
        .map(|(i, c)| {
            (
                Key::new(HELD_OBJECTID, HELD_HEADS_KEY, i as u64),
                c.to_vec(),
            )
        })
        .collect()
}

fn decode_item_value(bytenr: u64, key: &Key, value: &[u8]) -> Result<ExtentItem, CodecError> {
    let mut r = Reader::new(value);
    let head = r.u8("item flags byte")?;
    if head & !ITEM_HAS_TREE_KEY != 0 {
        return Err(CodecError::Invalid {
            field: "item flags byte",
            value: u64::from(head),
        });
    }
    let flags = r.varint("item flags")?;
    let generation = r.varint("item generation")?;
    let (kind, num_bytes) = match key.item_type {
        EXTENT_ITEM_KEY => (ExtentKind::Data, key.offset),
        METADATA_ITEM_KEY => {
            let level = u8::try_from(key.offset).map_err(|_| CodecError::Invalid {
                field: "metadata item level",
                value: key.offset,
            })?;
            (ExtentKind::Tree { level }, r.varint("item num_bytes")?)
        }
        other => {
            return Err(CodecError::Invalid {
                field: "extent item type",
                value: u64::from(other),
            })
        }
    };
    let tree_key = if head & ITEM_HAS_TREE_KEY != 0 {
        Some(DiskKey {
            objectid: r.u64("tree key objectid")?,
            item_type: r.u8("tree key type")?,
            offset: r.u64("tree key offset")?,
        })
    } else {
        None
    };
    let mut item = ExtentItem::new(num_bytes, kind, generation);
    item.flags = flags;
    item.tree_key = tree_key;
    while !r.is_empty() {
        let code = r.u8("inline ref type")?;
        let (key, count) = match code {
            TREE_BLOCK_REF_KEY => (
                RefKey::TreeBlock {
                    root: r.u64("inline ref root")?,
                },
                1,
            ),
            SHARED_BLOCK_REF_KEY => (
                RefKey::SharedBlock {
                    parent: r.u64("inline ref parent")?,
                },
                1,
            ),
            EXTENT_DATA_REF_KEY => (
                RefKey::ExtentData {
                    root: r.u64("inline ref root")?,
                    objectid: r.u64("inline ref objectid")?,
                    offset: r.u64("inline ref offset")?,
                },
                u64::from(r.u32("inline ref count")?),
            ),
            SHARED_DATA_REF_KEY => (
                RefKey::SharedData {
                    parent: r.u64("inline ref parent")?,
                },
                u64::from(r.u32("inline ref count")?),
            ),
            other => {
                return Err(CodecError::Invalid {
                    field: "inline ref type",
                    value: u64::from(other),
                })
            }
        };
        if item.inline.last().is_some_and(|(k, _)| *k >= key) {
            return Err(CodecError::Extent {
                bytenr,
                reason: format!("inline backref '{key}' out of order or repeated"),
            });
        }
        item.inline.push((key, count));
        item.refs = item.refs.saturating_add(count);
    }
    Ok(item)
}

fn decode_keyed_ref(bytenr: u64, key: &Key, value: &[u8]) -> Result<(RefKey, u64), CodecError> {
    let mut r = Reader::new(value);
    let out = match key.item_type {
        TREE_BLOCK_REF_KEY => (RefKey::TreeBlock { root: key.offset }, 1),
        SHARED_BLOCK_REF_KEY => (RefKey::SharedBlock { parent: key.offset }, 1),
        SHARED_DATA_REF_KEY => (
            RefKey::SharedData { parent: key.offset },
            u64::from(r.u32("shared data ref count")?),
        ),
        EXTENT_DATA_REF_KEY => (
            RefKey::ExtentData {
                root: r.u64("extent data ref root")?,
                objectid: r.u64("extent data ref objectid")?,
                offset: r.u64("extent data ref offset")?,
            },
            u64::from(r.u32("extent data ref count")?),
        ),
        other => {
            return Err(CodecError::Extent {
                bytenr,
                reason: format!("unknown item type {other} at offset {}", key.offset),
            })
        }
    };
    r.finish("keyed backref")?;
    Ok(out)
}

/// Rebuilds extent items from B+tree items in key order, one extent at a
/// time, streaming: [`ExtentLoader::push`] every item, and take each
/// extent, decoded and checked, as soon as the next one begins; the last
/// one comes from [`ExtentLoader::finish`]. Memory is one extent.
#[derive(Debug, Default)]
pub struct ExtentLoader {
    current: Option<(u64, ExtentItem)>,
}

impl ExtentLoader {
    /// An empty loader.
    pub fn new() -> Self {
        Self::default()
    }

    fn complete(&mut self) -> Result<Option<(u64, ExtentItem)>, CodecError> {
        let Some((bytenr, mut item)) = self.current.take() else {
            return Ok(None);
        };
        item.keyed.sort_unstable_by_key(|a| a.0);
        item.check()
            .map_err(|source| CodecError::Item { bytenr, source })?;
        Ok(Some((bytenr, item)))
    }

    /// Takes the next item (keys must ascend). Returns the previous extent
    /// when `key` begins a new one.
    pub fn push(
        &mut self,
        key: &Key,
        value: &[u8],
    ) -> Result<Option<(u64, ExtentItem)>, CodecError> {
        let bytenr = key.objectid;
        if key.item_type < TREE_BLOCK_REF_KEY {
            // Extent items sort before keyed backrefs, so a second extent
            // item of one bytenr follows the first directly.
            if self.current.as_ref().is_some_and(|(b, _)| *b == bytenr) {
                return Err(CodecError::Extent {
                    bytenr,
                    reason: "two extent items".into(),
                });
            }
            let done = self.complete()?;
            self.current = Some((bytenr, decode_item_value(bytenr, key, value)?));
            return Ok(done);
        }
        let (ref_key, count) = decode_keyed_ref(bytenr, key, value)?;
        let Some((_, item)) = self.current.as_mut().filter(|(cur, _)| *cur == bytenr) else {
            return Err(CodecError::Extent {
                bytenr,
                reason: format!("keyed backref '{ref_key}' without an extent item"),
            });
        };
        // For EXTENT_DATA_REF the key offset is a (possibly probed) hash;
        // the value is authoritative.
        item.keyed.push((ref_key, count));
        item.refs = item.refs.saturating_add(count);
        Ok(None)
    }

    /// The last extent, checked.
    pub fn finish(mut self) -> Result<Option<(u64, ExtentItem)>, CodecError> {
        self.complete()
    }

    /// Every extent of `items` (ascending keys) in one in-memory tree.
    pub fn load_all<'a>(
        items: impl IntoIterator<Item = (&'a Key, &'a [u8])>,
    ) -> Result<ExtentTree, CodecError> {
        let mut l = ExtentLoader::new();
        let mut tree = ExtentTree::new();
        for (k, v) in items {
            if let Some((b, item)) = l.push(k, v)? {
                tree.insert(b, item);
            }
        }
        if let Some((b, item)) = l.finish()? {
            tree.insert(b, item);
        }
        Ok(tree)
    }
}

/// The B+tree changes turning extent `bytenr` from `before` into `after`
/// (either may be absent), appended to `out` in key order.
pub fn diff_extent(
    bytenr: u64,
    before: Option<&ExtentItem>,
    after: Option<&ExtentItem>,
    out: &mut Vec<(Key, Change)>,
) -> Result<(), CodecError> {
    // The common case: only the extent item changes (no keyed backrefs
    // before or after, same key). Its new value is a Put (the items
    // differ, so the values do: every field is encoded); the old item
    // need not be encoded.
    if let (Some(b), Some(a)) = (before, after) {
        if b.keyed.is_empty()
            && a.keyed.is_empty()
            && item_key(bytenr, b.num_bytes, b.kind) == item_key(bytenr, a.num_bytes, a.kind)
            && b != a
        {
            let (k, v) = encode_extent_item(bytenr, a)?;
            out.push((k, Change::Put(v)));
            return Ok(());
        }
    }
    let old = match before {
        Some(i) => encode_extent(bytenr, i)?,
        None => Vec::new(),
    };
    let new = match after {
        Some(i) => encode_extent(bytenr, i)?,
        None => Vec::new(),
    };
    // Both are sorted by key: merge them.
    let (mut old, mut new) = (old.into_iter().peekable(), new.into_iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return Ok(()),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(a), Some(b)) => a.0.cmp(&b.0),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (k, _) = old.next().expect("peeked");
                out.push((k, Change::Delete));
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = new.next().expect("peeked");
                out.push((k, Change::Put(v)));
            }
            std::cmp::Ordering::Equal => {
                let (_, a) = old.next().expect("peeked");
                let (k, b) = new.next().expect("peeked");
                if a != b {
                    out.push((k, Change::Put(b)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};
    use rand_chacha::ChaCha8Rng;

    /// Seeded choices: `rand_chacha`'s [`ChaCha8Rng`] (value-stable across
    /// platforms and releases) with the helpers used below.
    struct Gen(ChaCha8Rng);
    impl Gen {
        fn new(seed: u64) -> Self {
            Self(ChaCha8Rng::seed_from_u64(seed))
        }
        fn next(&mut self) -> u64 {
            self.0.gen()
        }
        /// Uniform in `0..n` (`n > 0`).
        fn below(&mut self, n: u64) -> u64 {
            self.0.gen_range(0..n)
        }
        fn wide(&mut self) -> u64 {
            // Mix of small and huge numbers.
            match self.below(4) {
                0 => self.below(128),
                1 => self.below(1 << 20),
                2 => self.next() >> self.below(64),
                _ => self.next(),
            }
        }
    }

    fn random_op(g: &mut Gen) -> Op {
        let data = g.below(2) == 0;
        let kind = if data {
            ExtentKind::Data
        } else {
            ExtentKind::Tree {
                level: g.below(8) as u8,
            }
        };
        let bytenr = g.wide() >> 1;
        let num_bytes = 1 + g.below(1 << 30);
        let action = Action::from_code(1 + g.below(4) as u8).unwrap();
        if action == Action::UpdateHead {
            let key = (!data && g.below(2) == 0).then(|| DiskKey {
                objectid: g.wide(),
                item_type: g.below(256) as u8,
                offset: g.wide(),
            });
            let flags_to_set = if key.is_none() || g.below(2) == 0 {
                refd_core::model::BLOCK_FLAG_FULL_BACKREF
            } else {
                0
            };
            return Op::update_head(bytenr, num_bytes, kind, ExtentOp { flags_to_set, key })
                .unwrap();
        }
        let nz = |g: &mut Gen| g.wide().max(1);
        let key = if data {
            if g.below(2) == 0 {
                RefKey::ExtentData {
                    root: nz(g),
                    objectid: g.wide(),
                    offset: g.wide(),
                }
            } else {
                RefKey::SharedData { parent: nz(g) }
            }
        } else if g.below(2) == 0 {
            RefKey::TreeBlock { root: nz(g) }
        } else {
            RefKey::SharedBlock { parent: nz(g) }
        };
        let seq = if g.below(3) == 0 { g.below(1 << 40) } else { 0 };
        let op = Op::new(bytenr, num_bytes, kind, action, key, seq).unwrap();
        if !data && action == Action::AddExtent && g.below(2) == 0 {
            op.with_extent_op(ExtentOp {
                flags_to_set: 0,
                key: Some(DiskKey {
                    objectid: 256,
                    item_type: 1,
                    offset: 0,
                }),
            })
            .unwrap()
        } else {
            op
        }
    }

    #[test]
    fn op_round_trip_and_size() {
        let mut g = Gen::new(7);
        for _ in 0..20_000 {
            let op = random_op(&mut g);
            let rec = op_record(&op);
            assert!(rec.len() <= OP_RECORD_BYTES_MAX);
            assert_eq!(decode_op(&rec), Ok(op), "{op}");
            // Every strict prefix is refused.
            for n in 0..rec.len() {
                assert!(decode_op(&rec[..n]).is_err());
            }
        }
        // A common data ref: bytenr ~1 TiB, 128 KiB, small root/inode.
        let op = Op::new(
            1 << 40,
            128 << 10,
            ExtentKind::Data,
            Action::AddRef,
            RefKey::ExtentData {
                root: 5,
                objectid: 260_000,
                offset: 1 << 20,
            },
            0,
        )
        .unwrap();
        let n = op_record(&op).len();
        assert!((10..=20).contains(&n), "{n} bytes");
    }

    #[test]
    fn golden_op_record() {
        let op = Op::new(
            4096,
            4096,
            ExtentKind::Data,
            Action::DropRef,
            RefKey::ExtentData {
                root: 5,
                objectid: 257,
                offset: 0,
            },
            0,
        )
        .unwrap();
        assert_eq!(
            op_record(&op),
            [0x0a, 0x80, 0x20, 0x80, 0x20, 178, 5, 0x81, 0x02, 0]
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut g = Gen::new(99);
        let mut ok = 0;
        for _ in 0..200_000 {
            let len = g.below(40) as usize;
            let buf: Vec<u8> = (0..len).map(|_| g.next() as u8).collect();
            if let Ok(op) = decode_op(&buf) {
                ok += 1;
                assert_eq!(op_record(&op), buf, "decode accepts only canonical bytes");
            }
        }
        // Also mutate valid records.
        for _ in 0..50_000 {
            let mut rec = op_record(&random_op(&mut g));
            let i = g.below(rec.len() as u64) as usize;
            rec[i] ^= 1 << g.below(8);
            if let Ok(op) = decode_op(&rec) {
                assert_eq!(op_record(&op), rec);
            }
        }
        assert!(ok < 200_000);
    }

    /// Random heads (random ops merged per bytenr, seqs and stamps set):
    /// the held-heads stream round trips, splits into chunks that
    /// reassemble, refuses every strict prefix, and decodes bit flips only
    /// to canonical bytes.
    #[test]
    fn held_heads_round_trip() {
        let mut g = Gen::new(7);
        for round in 0..200 {
            let mut heads = Vec::new();
            for _ in 0..g.below(20) {
                let mut op = random_op(&mut g);
                op.bytenr = g.below(64) << 12;
                if op.key.is_some() && g.below(2) == 0 {
                    op.seq = 1 + g.below(5);
                }
                let stamp = 1 + g.below(1000);
                heads.push(Head::of_op(&op, stamp));
            }
            let heads = refd_core::delayed::merge_heads(heads);
            let stream = encode_held(&heads);
            if heads.is_empty() {
                assert!(
                    decode_held(&stream).is_err(),
                    "no stream is stored for no heads"
                );
                continue;
            }
            assert_eq!(decode_held(&stream).unwrap(), heads, "round {round}");
            let joined: Vec<u8> = held_items(&stream)
                .into_iter()
                .flat_map(|(_, v)| v)
                .collect();
            assert_eq!(joined, stream);
            for cut in 0..stream.len() {
                assert!(decode_held(&stream[..cut]).is_err(), "prefix {cut}");
            }
            for _ in 0..20 {
                let mut bad = stream.clone();
                let i = g.below(bad.len() as u64) as usize;
                bad[i] ^= 1 << g.below(8);
                if let Ok(h) = decode_held(&bad) {
                    assert_eq!(encode_held(&h), bad, "canonical");
                }
            }
        }
        // A big head spans chunks.
        let mut big = Head::of_op(&random_op(&mut g), 1);
        big.refs = (1..2000u64)
            .map(|i| DelayedRef {
                key: RefKey::TreeBlock { root: i },
                seq: 0,
                ref_mod: 1,
            })
            .collect();
        big.summary.total_ref_mod = 1999;
        let stream = encode_held(std::slice::from_ref(&big));
        assert!(held_items(&stream).len() > 1);
        assert_eq!(decode_held(&stream).unwrap(), vec![big]);
    }

    #[test]
    fn varint_edges() {
        for v in [0, 1, 127, 128, 16383, 16384, u64::MAX >> 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut r = Reader::new(&b);
            assert_eq!(r.varint("v"), Ok(v));
            assert!(r.is_empty());
        }
        // Overlong (non-shortest) and overflowing forms.
        assert!(Reader::new(&[0x80, 0x00]).varint("v").is_err());
        assert!(Reader::new(&[0xff; 10]).varint("v").is_err());
        assert!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02])
                .varint("v")
                .is_err()
        );
    }

    fn load(items: &[(Key, Vec<u8>)]) -> Result<ExtentTree, CodecError> {
        ExtentLoader::load_all(items.iter().map(|(k, v)| (k, v.as_slice())))
    }

    #[test]
    fn extent_items_round_trip_with_keyed_refs() {
        let mut tree = ExtentTree::new();
        // Data extent growing past the inline budget.
        let mut big = ExtentItem::new(1 << 20, ExtentKind::Data, 9);
        for n in 0..400u64 {
            big.add_ref(
                RefKey::ExtentData {
                    root: 5 + n % 3,
                    objectid: 257 + n,
                    offset: n * 4096,
                },
                1 + (n % 4) as i64,
            );
        }
        big.add_ref(RefKey::SharedData { parent: 1 << 30 }, 3);
        assert!(!big.keyed.is_empty() && !big.inline.is_empty());
        tree.insert(1 << 30, big);
        // Tree block with many shared refs, a key and full backref.
        let mut tb = ExtentItem::new(16384, ExtentKind::Tree { level: 2 }, 4);
        tb.tree_key = Some(DiskKey {
            objectid: 256,
            item_type: 84,
            offset: 7,
        });
        tb.flags |= refd_core::model::BLOCK_FLAG_FULL_BACKREF;
        for n in 0..600u64 {
            tb.add_ref(
                RefKey::SharedBlock {
                    parent: 16384 * (n + 1),
                },
                1,
            );
        }
        tb.add_ref(RefKey::TreeBlock { root: 2 }, 1);
        assert!(!tb.keyed.is_empty());
        tree.insert(2 << 30, tb);
        // Small ones.
        let mut small = ExtentItem::new(4096, ExtentKind::Data, 1);
        small.add_ref(
            RefKey::ExtentData {
                root: 5,
                objectid: 300,
                offset: 0,
            },
            1,
        );
        tree.insert(4096, small);
        let mut leaf = ExtentItem::new(16384, ExtentKind::Tree { level: 0 }, 2);
        leaf.add_ref(RefKey::TreeBlock { root: 5 }, 1);
        tree.insert(8192, leaf);

        let mut all = Vec::new();
        for (b, item) in tree.iter() {
            let items = encode_extent(b, item).unwrap();
            assert!(items.iter().all(|(_, v)| v.len() <= VALUE_BYTES_MAX));
            all.extend(items);
        }
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(load(&all).unwrap(), tree);

        // diff from nothing = all puts; diff to nothing = all deletes.
        let item = tree.get(1 << 30).unwrap();
        let mut out = Vec::new();
        diff_extent(1 << 30, None, Some(item), &mut out).unwrap();
        assert_eq!(out.len(), 1 + item.keyed.len());
        out.clear();
        let mut changed = item.clone();
        changed.add_ref(changed.keyed[0].0, 1);
        diff_extent(1 << 30, Some(item), Some(&changed), &mut out).unwrap();
        assert_eq!(out.len(), 1, "only the keyed item changes");
        out.clear();
        diff_extent(1 << 30, Some(item), None, &mut out).unwrap();
        assert!(out.iter().all(|(_, c)| matches!(c, Change::Delete)));
    }

    /// Applying a diff to the old encoding gives the new encoding, on the
    /// fast path (only the extent item changes) and off it.
    #[test]
    fn diffs_turn_old_items_into_new_ones() {
        let data_ref = |objectid: u64| RefKey::ExtentData {
            root: 5,
            objectid,
            offset: 0,
        };
        let mut base = ExtentItem::new(8192, ExtentKind::Data, 3);
        base.add_ref(data_ref(1), 2);
        let mut more = base.clone();
        more.add_ref(data_ref(2), 1);
        let mut newer = more.clone();
        newer.generation = 9;
        let mut resized = ExtentItem::new(4096, ExtentKind::Data, 3);
        resized.add_ref(data_ref(1), 2);
        let mut keyed = base.clone();
        let mut n = 10;
        while keyed.keyed.is_empty() {
            keyed.add_ref(data_ref(n), 1);
            n += 1;
        }
        let mut tree = ExtentItem::new(16384, ExtentKind::Tree { level: 1 }, 4);
        tree.add_ref(RefKey::TreeBlock { root: 5 }, 1);
        let mut tree2 = tree.clone();
        tree2.add_ref(RefKey::SharedBlock { parent: 1 << 20 }, 1);
        let mut flagged = tree.clone();
        flagged.flags |= 1 << 8; // FULL_BACKREF
        let pairs = [
            (Some(&base), Some(&more)),
            (Some(&more), Some(&newer)),
            (Some(&tree), Some(&flagged)),
            (Some(&base), Some(&resized)),
            (Some(&base), Some(&keyed)),
            (Some(&keyed), Some(&base)),
            (Some(&tree), Some(&tree2)),
            (Some(&base), Some(&base)),
            (None, Some(&keyed)),
            (Some(&keyed), None),
        ];
        for (i, (before, after)) in pairs.into_iter().enumerate() {
            let encode = |item: Option<&ExtentItem>| -> BTreeMap<Key, Vec<u8>> {
                item.map_or_else(BTreeMap::new, |it| {
                    encode_extent(1 << 30, it).unwrap().into_iter().collect()
                })
            };
            let mut items = encode(before);
            let mut out = Vec::new();
            diff_extent(1 << 30, before, after, &mut out).unwrap();
            assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "pair {i}: sorted");
            for (k, c) in out {
                match c {
                    Change::Put(v) => {
                        items.insert(k, v);
                    }
                    Change::Delete => {
                        assert!(items.remove(&k).is_some(), "pair {i}: delete of {k:?}");
                    }
                }
            }
            assert_eq!(items, encode(after), "pair {i}");
        }
    }

    #[test]
    fn hash_collisions_probe() {
        // Force a collision by decoding two keyed refs at adjacent offsets.
        let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
        item.add_ref(
            RefKey::ExtentData {
                root: 5,
                objectid: 1,
                offset: 0,
            },
            1,
        );
        item.keyed.push(item.inline.pop().unwrap());
        let items = encode_extent(4096, &item).unwrap();
        let (k, v) = items[1].clone();
        let mut extra = v.clone();
        extra[8] = 2; // objectid 2, stored at the probed offset
        let forged = vec![
            items[0].clone(),
            (k, v),
            (Key::new(k.objectid, k.item_type, k.offset + 1), extra),
        ];
        let t = load(&forged).unwrap();
        assert_eq!(t.get(4096).unwrap().refs, 2);
    }

    #[test]
    fn corrupt_items_are_errors() {
        let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
        item.add_ref(
            RefKey::ExtentData {
                root: 5,
                objectid: 1,
                offset: 0,
            },
            2,
        );
        let items = encode_extent(4096, &item).unwrap();
        let (k, v) = &items[0];
        let mut g = Gen::new(3);
        for _ in 0..20_000 {
            let mut v = v.clone();
            let len = g.below(v.len() as u64 + 1) as usize;
            v.truncate(len);
            if !v.is_empty() && g.below(2) == 0 {
                let i = g.below(v.len() as u64) as usize;
                v[i] = g.next() as u8;
            }
            let _ = load(&[(*k, v)]);
        }
        // Keyed ref without its extent item.
        assert!(load(&[(Key::new(1, TREE_BLOCK_REF_KEY, 5), Vec::new())]).is_err());
        // Zero refs.
        assert!(load(&[(*k, v[..3].to_vec())]).is_err());
        // Unknown type.
        assert!(load(&[(Key::new(1, 170, 5), v.clone())]).is_err());
    }
}
