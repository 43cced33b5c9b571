//! B+tree items of the daemon's durable state, written by each commit
//! with the state at its cut: client sessions (the replies that make
//! SUBMIT exactly-once), freed-list consumers, the freed lists
//! themselves, and the id counters. Their keys sort after every extent's
//! and after the held heads (objectid [`SERVICE_OBJECTID`]):
//!
//! | key | value (a version byte 1, then varints unless said) |
//! |---|---|
//! | `(MAX, 241, session)` | `last_use`, `reply_count`, then per reply `request`, `lsn`, `op_count` |
//! | `(MAX, 242, generation << 20 \| chunk)` | `count`, then per extent `bytenr`, `num_bytes`, `kind` (u8: 255 data, else the tree level) |
//! | `(MAX, 243, consumer)` | `acked_generation`, `name_len`, `name` (UTF-8) |
//! | `(MAX, 244, 0)` | `next_session`, `next_consumer`, `use_clock`, `freed_dropped_upto` |

use refd_core::model::{ExtentKind, LEVEL_MAX};
use refd_ioring::btree::{Key, VALUE_BYTES_MAX};

use super::record::CONSUMER_NAME_BYTES_MAX;
use super::{put_varint, CodecError, Reader, HELD_OBJECTID};

/// Objectid of every service item (shared with the held heads).
pub const SERVICE_OBJECTID: u64 = HELD_OBJECTID;
/// Item type of a session.
pub const SESSION_KEY: u8 = 241;
/// Item type of a freed-list chunk.
pub const FREED_KEY: u8 = 242;
/// Item type of a freed-list consumer.
pub const CONSUMER_KEY: u8 = 243;
/// Item type of the counters.
pub const META_KEY: u8 = 244;
/// Item type of the extent count: the extent items in the committed tree
/// of the same commit.
pub const EXTENTS_KEY: u8 = 245;
/// Most replies a session item keeps (each at most 25 bytes: the item
/// fits a B+tree value).
pub const SESSION_REPLIES_KEPT_MAX: usize = 128;
/// Bits of a freed chunk key's offset that number the chunk.
pub const FREED_CHUNK_BITS: u32 = 20;
/// Highest generation a freed chunk key can carry.
pub const FREED_GENERATION_MAX: u64 = (1 << (64 - FREED_CHUNK_BITS)) - 1;

const ITEM_VERSION: u8 = 1;
/// Longest freed entry: two varints and the kind byte.
pub const FREED_ENTRY_BYTES_MAX: usize = 10 + 10 + 1;
/// Room for entries in a chunk (after the version byte and the count).
const FREED_CHUNK_ROOM_BYTES: usize = VALUE_BYTES_MAX - 1 - 10;

const _: () = assert!(1 + 3 * 10 + SESSION_REPLIES_KEPT_MAX * 25 <= VALUE_BYTES_MAX);
const _: () = assert!(1 + 10 + 10 + CONSUMER_NAME_BYTES_MAX <= VALUE_BYTES_MAX);
const _: () = assert!(SESSION_KEY > super::HELD_HEADS_KEY && META_KEY > CONSUMER_KEY);
const _: () = assert!(EXTENTS_KEY > META_KEY, "written after the service items");

/// One kept SUBMIT reply of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionReply {
    /// The request number.
    pub request: u64,
    /// LSN of the log batch holding the SUBMIT.
    pub lsn: u64,
    /// Ops in it.
    pub ops: u32,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionItem {
    /// When it was last used (the service's use clock).
    pub last_use: u64,
    /// Kept replies, oldest first, request numbers rising.
    pub replies: Vec<SessionReply>,
}

/// A freed-list consumer as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerItem {
    /// Name (1..=64 bytes).
    pub name: String,
    /// Last generation it acknowledged.
    pub acked: u64,
}

/// The id counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetaItem {
    /// Next session id.
    pub next_session: u64,
    /// Next consumer id.
    pub next_consumer: u64,
    /// The use clock (orders sessions for eviction).
    pub use_clock: u64,
    /// Newest generation whose freed list was dropped (0: none): a cursor
    /// at or below it has missed extents.
    pub freed_dropped_upto: u64,
}

/// One freed extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedEntry {
    /// Address.
    pub bytenr: u64,
    /// Size.
    pub num_bytes: u64,
    /// Kind.
    pub kind: ExtentKind,
}

fn version(r: &mut Reader<'_>, what: &'static str) -> Result<(), CodecError> {
    match r.u8(what)? {
        ITEM_VERSION => Ok(()),
        v => Err(CodecError::Invalid {
            field: what,
            value: u64::from(v),
        }),
    }
}

/// The key of session `id`.
pub fn session_key(id: u64) -> Key {
    Key::new(SERVICE_OBJECTID, SESSION_KEY, id)
}

/// Encodes a session item's value.
pub fn encode_session(s: &SessionItem) -> Vec<u8> {
    assert!(s.replies.len() <= SESSION_REPLIES_KEPT_MAX);
    let mut v = Vec::with_capacity(8 + 16 * s.replies.len());
    v.push(ITEM_VERSION);
    put_varint(&mut v, s.last_use);
    put_varint(&mut v, s.replies.len() as u64);
    for r in &s.replies {
        put_varint(&mut v, r.request);
        put_varint(&mut v, r.lsn);
        put_varint(&mut v, u64::from(r.ops));
    }
    debug_assert_eq!(decode_session(&v).as_ref(), Ok(s));
    v
}

/// Decodes a session item's value.
pub fn decode_session(value: &[u8]) -> Result<SessionItem, CodecError> {
    let mut r = Reader::new(value);
    version(&mut r, "session item version")?;
    let last_use = r.varint("session last use")?;
    let n = r.varint("session reply count")?;
    if n > SESSION_REPLIES_KEPT_MAX as u64 {
        return Err(CodecError::Invalid {
            field: "session reply count",
            value: n,
        });
    }
    let mut replies: Vec<SessionReply> = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let request = r.varint("session reply request")?;
        let lsn = r.varint("session reply lsn")?;
        let ops = r.varint("session reply op count")?;
        let ops = u32::try_from(ops).map_err(|_| CodecError::Invalid {
            field: "session reply op count",
            value: ops,
        })?;
        if replies.last().is_some_and(|p| p.request >= request) {
            return Err(CodecError::Invalid {
                field: "session reply request (not rising)",
                value: request,
            });
        }
        replies.push(SessionReply { request, lsn, ops });
    }
    r.finish("session item")?;
    Ok(SessionItem { last_use, replies })
}

/// The key of consumer `id`.
pub fn consumer_key(id: u64) -> Key {
    Key::new(SERVICE_OBJECTID, CONSUMER_KEY, id)
}

/// Encodes a consumer item's value.
pub fn encode_consumer(c: &ConsumerItem) -> Vec<u8> {
    assert!((1..=CONSUMER_NAME_BYTES_MAX).contains(&c.name.len()));
    let mut v = Vec::with_capacity(16 + c.name.len());
    v.push(ITEM_VERSION);
    put_varint(&mut v, c.acked);
    put_varint(&mut v, c.name.len() as u64);
    v.extend_from_slice(c.name.as_bytes());
    debug_assert_eq!(decode_consumer(&v).as_ref(), Ok(c));
    v
}

/// Decodes a consumer item's value.
pub fn decode_consumer(value: &[u8]) -> Result<ConsumerItem, CodecError> {
    let mut r = Reader::new(value);
    version(&mut r, "consumer item version")?;
    let acked = r.varint("consumer acked generation")?;
    let len = r.varint("consumer name length")?;
    if len == 0 || len > CONSUMER_NAME_BYTES_MAX as u64 {
        return Err(CodecError::Invalid {
            field: "consumer name length",
            value: len,
        });
    }
    let name = std::str::from_utf8(r.slice(len as usize, "consumer name")?)
        .map_err(|_| CodecError::Invalid {
            field: "consumer name (UTF-8)",
            value: len,
        })?
        .to_string();
    r.finish("consumer item")?;
    Ok(ConsumerItem { name, acked })
}

/// The key of the counters.
pub fn meta_key() -> Key {
    Key::new(SERVICE_OBJECTID, META_KEY, 0)
}

/// Encodes the counters.
pub fn encode_meta(m: &MetaItem) -> Vec<u8> {
    let mut v = Vec::with_capacity(31);
    v.push(ITEM_VERSION);
    put_varint(&mut v, m.next_session);
    put_varint(&mut v, m.next_consumer);
    put_varint(&mut v, m.use_clock);
    put_varint(&mut v, m.freed_dropped_upto);
    debug_assert_eq!(decode_meta(&v), Ok(*m));
    v
}

/// Decodes the counters.
pub fn decode_meta(value: &[u8]) -> Result<MetaItem, CodecError> {
    let mut r = Reader::new(value);
    version(&mut r, "meta item version")?;
    let m = MetaItem {
        next_session: r.varint("next session")?,
        next_consumer: r.varint("next consumer")?,
        use_clock: r.varint("use clock")?,
        freed_dropped_upto: r.varint("freed dropped up to")?,
    };
    r.finish("meta item")?;
    Ok(m)
}

/// The key of the extent count.
pub fn extents_key() -> Key {
    Key::new(SERVICE_OBJECTID, EXTENTS_KEY, 0)
}

/// Encodes the extent count.
pub fn encode_extent_count(extents: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(11);
    v.push(ITEM_VERSION);
    put_varint(&mut v, extents);
    debug_assert_eq!(decode_extent_count(&v), Ok(extents));
    v
}

/// Decodes the extent count.
pub fn decode_extent_count(value: &[u8]) -> Result<u64, CodecError> {
    let mut r = Reader::new(value);
    version(&mut r, "extent count version")?;
    let extents = r.varint("extent count")?;
    r.finish("extent count item")?;
    Ok(extents)
}

/// The key of chunk `chunk` of generation `generation`'s freed list.
pub fn freed_key(generation: u64, chunk: u64) -> Key {
    assert!(generation <= FREED_GENERATION_MAX && chunk < 1 << FREED_CHUNK_BITS);
    Key::new(
        SERVICE_OBJECTID,
        FREED_KEY,
        generation << FREED_CHUNK_BITS | chunk,
    )
}

/// Generation and chunk of a freed chunk key's offset.
pub fn freed_key_parts(offset: u64) -> (u64, u64) {
    (
        offset >> FREED_CHUNK_BITS,
        offset & ((1 << FREED_CHUNK_BITS) - 1),
    )
}

/// The chunks of one generation's freed list: values of at most
/// [`VALUE_BYTES_MAX`] bytes, in order.
pub fn encode_freed_chunks(entries: &[FreedEntry]) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        // As many entries as surely fit.
        let n = rest
            .len()
            .min(FREED_CHUNK_ROOM_BYTES / FREED_ENTRY_BYTES_MAX);
        let (now, later) = rest.split_at(n);
        let mut v = Vec::with_capacity(11 + n * 12);
        v.push(ITEM_VERSION);
        put_varint(&mut v, n as u64);
        for e in now {
            put_varint(&mut v, e.bytenr);
            put_varint(&mut v, e.num_bytes);
            v.push(match e.kind {
                ExtentKind::Data => u8::MAX,
                ExtentKind::Tree { level } => level,
            });
        }
        debug_assert!(v.len() <= VALUE_BYTES_MAX);
        debug_assert_eq!(decode_freed_chunk(&v).as_deref(), Ok(now));
        chunks.push(v);
        rest = later;
    }
    chunks
}

/// Decodes one freed chunk.
pub fn decode_freed_chunk(value: &[u8]) -> Result<Vec<FreedEntry>, CodecError> {
    let mut r = Reader::new(value);
    version(&mut r, "freed chunk version")?;
    let n = r.varint("freed count")?;
    // Every entry is at least 3 bytes.
    if n == 0 || n > (r.remaining() / 3) as u64 {
        return Err(CodecError::Invalid {
            field: "freed count",
            value: n,
        });
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let bytenr = r.varint("freed bytenr")?;
        let num_bytes = r.varint("freed num_bytes")?;
        let kind = match r.u8("freed kind")? {
            u8::MAX => ExtentKind::Data,
            level if level <= LEVEL_MAX => ExtentKind::Tree { level },
            other => {
                return Err(CodecError::Invalid {
                    field: "freed kind",
                    value: u64::from(other),
                })
            }
        };
        out.push(FreedEntry {
            bytenr,
            num_bytes,
            kind,
        });
    }
    r.finish("freed chunk")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_items_round_trip() {
        let s = SessionItem {
            last_use: 77,
            replies: (1..=SESSION_REPLIES_KEPT_MAX as u64)
                .map(|r| SessionReply {
                    request: u64::MAX - 200 + r,
                    lsn: u64::MAX - r,
                    ops: u32::MAX,
                })
                .collect(),
        };
        let v = encode_session(&s);
        assert!(v.len() <= VALUE_BYTES_MAX);
        assert_eq!(decode_session(&v).unwrap(), s);
        let c = ConsumerItem {
            name: "x".repeat(CONSUMER_NAME_BYTES_MAX),
            acked: u64::MAX,
        };
        assert_eq!(decode_consumer(&encode_consumer(&c)).unwrap(), c);
        let m = MetaItem {
            next_session: 5,
            next_consumer: 6,
            use_clock: u64::MAX,
            freed_dropped_upto: 3,
        };
        assert_eq!(decode_meta(&encode_meta(&m)).unwrap(), m);
        let entries: Vec<FreedEntry> = (0..1000u64)
            .map(|i| FreedEntry {
                bytenr: u64::MAX - i,
                num_bytes: u64::MAX / 3,
                kind: if i % 2 == 0 {
                    ExtentKind::Data
                } else {
                    ExtentKind::Tree { level: 7 }
                },
            })
            .collect();
        let chunks = encode_freed_chunks(&entries);
        assert!(chunks.len() > 1 && chunks.iter().all(|c| c.len() <= VALUE_BYTES_MAX));
        let back: Vec<FreedEntry> = chunks
            .iter()
            .flat_map(|c| decode_freed_chunk(c).unwrap())
            .collect();
        assert_eq!(back, entries);
        assert_eq!(
            freed_key_parts(freed_key(FREED_GENERATION_MAX, 9).offset),
            (FREED_GENERATION_MAX, 9)
        );
    }

    #[test]
    fn corrupt_service_items_are_errors() {
        assert!(decode_session(&[]).is_err());
        assert!(decode_session(&[2, 0, 0]).is_err(), "version");
        assert!(decode_session(&[1, 0, 200, 1]).is_err(), "too many replies");
        assert!(
            decode_session(&[1, 0, 2, 5, 1, 1, 5, 1, 1]).is_err(),
            "not rising"
        );
        assert!(decode_consumer(&[1, 0, 0]).is_err(), "empty name");
        assert!(
            decode_consumer(&[1, 0, 2, 0xff, 0xfe]).is_err(),
            "not UTF-8"
        );
        assert!(
            decode_freed_chunk(&[1, 100, 1, 1, 1]).is_err(),
            "count past the end"
        );
        assert!(decode_freed_chunk(&[1, 1, 1, 1, 9]).is_err(), "level 9");
        assert!(decode_meta(&[1, 1, 1, 1, 1, 0]).is_err(), "trailing");
    }
}
