//! The held-heads stream: the heads a seq barrier held at a commit, kept
//! in the B+tree in chunks (their log records are trimmed).

use refd_core::head::{DelayedRef, Head, HeadSummary, PendingExtentOp};
use refd_core::model::{DiskKey, ExtentKind};
use refd_ioring::btree::{Key, VALUE_BYTES_MAX};

use super::{get_ref_key, put_ref_key, put_varint, CodecError, Reader};

/// Objectid of the held-heads items (no extent can start there: an extent
/// at `u64::MAX` would end past the address space).
pub const HELD_OBJECTID: u64 = u64::MAX;
/// Item type of the held-heads items: `(HELD_OBJECTID, HELD_HEADS_KEY, i)`
/// holds chunk `i` of the held-heads stream.
pub const HELD_HEADS_KEY: u8 = 240;
/// Largest bytenr an extent item can have (see [`HELD_OBJECTID`]).
pub const EXTENT_BYTENR_MAX: u64 = u64::MAX - 1;
/// Version byte at the start of the held-heads stream. Version 2 added
/// each ref's gross drop count, version 3 each head's allocation count;
/// version 1 and 2 streams (written before) are still read, see
/// [`decode_held`].
const HELD_STREAM_VERSION: u8 = 3;
/// The version without allocation counts.
const HELD_STREAM_VERSION_2: u8 = 2;
/// The version without drop counts (nor allocation counts).
const HELD_STREAM_VERSION_1: u8 = 1;

// Held-heads items sort after every extent's items: no extent item has
// their objectid, and their type is above every extent and backref type.
const _: () = assert!(EXTENT_BYTENR_MAX < HELD_OBJECTID);
const _: () = assert!(HELD_HEADS_KEY > refd_core::model::SHARED_DATA_REF_KEY);
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

/// Encodes the heads a commit held back (seq barrier) as one stream: a
/// version byte, the head count, then each head (see `docs/durable.md`,
/// "Held heads"). Stored in the B+tree in chunks ([`held_items`]).
///
/// # Panics
///
/// If `heads` are not in strictly ascending bytenr order (as a commit
/// reports them): [`decode_held`] would refuse the stream.
pub fn encode_held(heads: &[Head]) -> Vec<u8> {
    // What `decode_held` refuses must never be written: a device whose
    // held set is out of order cannot be opened.
    assert!(
        heads.windows(2).all(|w| w[0].bytenr < w[1].bytenr),
        "held heads must be in strictly ascending bytenr order"
    );
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
        put_varint(&mut out, u64::from(s.allocs));
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
            put_varint(&mut out, r.drops);
        }
    }
    debug_assert!(
        heads.is_empty() || decode_held(&out).as_deref() == Ok(heads),
        "an encoded held-heads stream must decode to its heads"
    );
    out
}

/// Decodes a held-heads stream: the whole input must be consumed, at least
/// one head, heads strictly ascending by bytenr, refs of a head strictly
/// ascending by (key, seq), each with a non-zero ref_mod or drop count
/// (drops at least the net drop), ref_mods summing to its total_ref_mod.
/// A version 1 stream has no drop counts: each ref gets the least its
/// ref_mod implies (`max(0, -ref_mod)`), so a held re-allocation whose old
/// life's drops cancelled against adds is refused when run rather than
/// trusted.
pub fn decode_held(buf: &[u8]) -> Result<Vec<Head>, CodecError> {
    let mut r = Reader::new(buf);
    let version = r.u8("held stream version")?;
    if !matches!(
        version,
        HELD_STREAM_VERSION | HELD_STREAM_VERSION_2 | HELD_STREAM_VERSION_1
    ) {
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
        let allocs = if version == HELD_STREAM_VERSION {
            let allocs = r.varint("held allocation count")?;
            // Some allocation exactly when there is a latest one.
            if (allocs == 0) != (alloc_stamp == 0) || allocs > u64::from(u16::MAX) {
                return Err(CodecError::Invalid {
                    field: "held allocation count",
                    value: allocs,
                });
            }
            allocs as u16
        } else {
            // Not recorded: at least one where there is an allocation.
            u16::from(alloc_stamp != 0)
        };
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
            let drops = if version == HELD_STREAM_VERSION_1 {
                if ref_mod < 0 {
                    ref_mod.unsigned_abs()
                } else {
                    0
                }
            } else {
                r.varint("held ref drops")?
            };
            let d = DelayedRef {
                key,
                seq,
                ref_mod,
                drops,
            };
            if !d.is_kept()
                || i128::from(drops) < -i128::from(ref_mod)
                || refs.last().is_some_and(|p| (p.key, p.seq) >= (key, seq))
            {
                return Err(CodecError::Invalid {
                    field: "held ref (zero, drops below the net drop, or order)",
                    value: bytenr,
                });
            }
            refs.push(d);
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
                allocs,
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
