//! Round-trip checks of the durable engine's decoders (op records and the
//! other log records, the held-heads stream, extent items through
//! [`ExtentLoader`], the service items), shared by
//! the property test of the normal test run (`tests/fuzz_decoders.rs`)
//! and the cargo-fuzz targets (`fuzz/`, see `docs/fuzzing.md`), so both
//! hold the decoders to the same contract on arbitrary bytes:
//!
//! - no decoder panics;
//! - a decoder either refuses with a typed [`CodecError`] or returns a
//!   value that re-encodes to the bytes it came from. Log records, the
//!   held-heads stream and the session, consumer, counter and extent count items are
//!   canonical (shortest varints only, every flag and order checked): the
//!   re-encoding is the input, byte for byte. A freed-list chunk is too
//!   when it holds no more entries than the encoder puts in one chunk;
//!   a longer one (still a valid chunk) must re-encode to chunks holding
//!   the same entries.
//!   Extent items are canonical except for one field: the key offset of
//!   a keyed `EXTENT_DATA_REF` item is a hash, probed past collisions, and
//!   the loader takes the value as authoritative; so the re-encoding must
//!   equal the input with those offsets left out;
//! - the heap a decoded value holds is bounded by its input (every count
//!   read is checked against the bytes left, or never sizes an
//!   allocation);
//! - the loader returns extents in strictly ascending bytenr order, each
//!   passing [`ExtentItem::check`], and [`ExtentLoader::load_all`] agrees
//!   with its streaming `push`/`finish`.
//!
//! These functions panic when the contract is broken: that is their job.
//! They are public only so that the fuzz crate and the integration tests
//! can call them.

use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::head::Head;
use refd_core::model::{Op, EXTENT_DATA_REF_KEY};
use refd_ioring::btree::{Key, VALUE_BYTES_MAX};

use crate::codec::service::{
    decode_consumer, decode_extent_count, decode_freed_chunk, decode_meta, decode_session,
    encode_consumer, encode_extent_count, encode_freed_chunks, encode_meta, encode_session,
    CONSUMER_KEY, EXTENTS_KEY, FREED_KEY, META_KEY, SESSION_KEY,
};
use crate::codec::{
    decode_held, decode_op, decode_record, encode_extent, encode_held, encode_record, held_items,
    op_record, CodecError, ExtentLoader, Record, OP_RECORD_BYTES_MAX,
};

/// Fewest bytes one head takes in a held-heads stream: bytenr, num_bytes,
/// kind, flags, alloc stamp, total_ref_mod, ref count (version 3 adds an
/// allocation count; the older versions are still read).
pub const HELD_HEAD_BYTES_MIN: usize = 7;
/// Fewest bytes one ref takes in a held-heads stream: type, root or
/// parent, seq, ref_mod.
pub const HELD_REF_BYTES_MIN: usize = 4;
/// Fewest bytes one inline backref takes in an extent item value: type
/// and root or parent.
pub const INLINE_REF_BYTES_MIN: usize = 9;

/// Decodes one op record and checks the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn op_round_trip(buf: &[u8]) -> Result<Op, CodecError> {
    match decode_op(buf) {
        Ok(op) => {
            assert_eq!(op.check(), Ok(()));
            let again = op_record(&op);
            assert!(again.len() <= OP_RECORD_BYTES_MAX);
            assert_eq!(again, buf, "op record does not re-encode: {op}");
            Ok(op)
        }
        Err(e) => {
            let _ = e.to_string();
            Err(e)
        }
    }
}

/// Fewest bytes one op takes in a log record: flags, bytenr, num_bytes.
pub const OP_RECORD_BYTES_MIN: usize = 3;

/// Decodes one log record of any kind and checks the contract (module
/// doc), and that [`decode_op`] accepts exactly its op records.
///
/// # Panics
///
/// If the contract is broken.
pub fn record_round_trip(buf: &[u8]) -> Result<Record, CodecError> {
    let as_op = decode_op(buf);
    let record = match decode_record(buf) {
        Ok(record) => record,
        Err(e) => {
            let _ = e.to_string();
            assert!(
                as_op.is_err(),
                "decode_op accepted what decode_record refused"
            );
            return Err(e);
        }
    };
    let mut again = Vec::with_capacity(buf.len());
    encode_record(&record, &mut again);
    assert_eq!(again, buf, "record does not re-encode: {record:?}");
    match &record {
        Record::Op(op) => assert_eq!(as_op.as_ref(), Ok(op)),
        other => {
            assert!(as_op.is_err(), "decode_op accepted {other:?}");
            if let Record::Submit { ops, .. } = other {
                assert!(!ops.is_empty() && ops.capacity() * OP_RECORD_BYTES_MIN <= buf.len());
                assert!(ops.iter().all(|op| op.check().is_ok()));
            }
        }
    }
    Ok(record)
}

/// Decodes `value` as the service item of type `item_type` (session,
/// freed-list chunk, consumer, counters or extent count; any other type is refused
/// with [`CodecError::Invalid`]) and checks the contract (module doc).
/// Returns the number of entries (replies, freed extents; 1 otherwise).
///
/// # Panics
///
/// If the contract is broken.
pub fn service_round_trip(item_type: u8, value: &[u8]) -> Result<usize, CodecError> {
    let decoded = match item_type {
        SESSION_KEY => decode_session(value).map(|s| {
            assert_eq!(encode_session(&s), value, "session does not re-encode");
            assert!(s.replies.capacity() <= crate::codec::service::SESSION_REPLIES_KEPT_MAX);
            s.replies.len()
        }),
        CONSUMER_KEY => decode_consumer(value).map(|c| {
            assert_eq!(encode_consumer(&c), value, "consumer does not re-encode");
            1
        }),
        META_KEY => decode_meta(value).map(|m| {
            assert_eq!(encode_meta(&m), value, "counters do not re-encode");
            1
        }),
        EXTENTS_KEY => decode_extent_count(value).map(|n| {
            assert_eq!(
                encode_extent_count(n),
                value,
                "extent count does not re-encode"
            );
            1
        }),
        FREED_KEY => decode_freed_chunk(value).map(|entries| {
            assert!(!entries.is_empty() && entries.capacity() * 3 <= value.len());
            let chunks = encode_freed_chunks(&entries);
            if chunks.len() == 1 {
                assert_eq!(chunks[0], value, "freed chunk does not re-encode");
            }
            let again: Vec<_> = chunks
                .iter()
                .flat_map(|c| decode_freed_chunk(c).expect("re-encoded chunk decodes"))
                .collect();
            assert_eq!(again, entries, "freed chunks do not re-encode");
            entries.len()
        }),
        other => Err(CodecError::Invalid {
            field: "service item type",
            value: u64::from(other),
        }),
    };
    if let Err(e) = &decoded {
        let _ = e.to_string();
    }
    decoded
}

/// Decodes a held-heads stream and checks the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn held_round_trip(buf: &[u8]) -> Result<Vec<Head>, CodecError> {
    let heads = match decode_held(buf) {
        Ok(heads) => heads,
        Err(e) => {
            let _ = e.to_string();
            return Err(e);
        }
    };
    assert!(!heads.is_empty(), "an empty held set has no stream");
    if matches!(buf.first(), Some(&1) | Some(&2)) {
        // A version 1 stream (no drop counts) or 2 (no allocation counts)
        // is re-encoded as version 3, which must decode to the same heads.
        let v3 = encode_held(&heads);
        assert_eq!(
            decode_held(&v3).as_ref(),
            Ok(&heads),
            "v1/v2 heads re-encode"
        );
    } else {
        assert_eq!(encode_held(&heads), buf, "held heads do not re-encode");
    }
    let refs: usize = heads.iter().map(|h| h.refs.len()).sum();
    let ref_capacity: usize = heads.iter().map(|h| h.refs.capacity()).sum();
    assert!(heads.len() * HELD_HEAD_BYTES_MIN <= buf.len());
    assert!(refs * HELD_REF_BYTES_MIN <= buf.len());
    // Vectors grow by doubling from what the input actually held.
    assert!(heads.capacity() <= 2 * heads.len().max(4));
    assert!(ref_capacity <= 2 * refs + 4 * heads.len());
    let chunks = held_items(buf);
    assert!(chunks.iter().all(|(_, v)| v.len() <= VALUE_BYTES_MAX));
    let joined: Vec<u8> = chunks.into_iter().flat_map(|(_, v)| v).collect();
    assert_eq!(joined, buf);
    Ok(heads)
}

/// The items with the key offsets of keyed `EXTENT_DATA_REF` items (a
/// probed hash, not part of the contract) zeroed, sorted.
fn without_hash_offsets(items: &[(Key, Vec<u8>)]) -> Vec<(Key, Vec<u8>)> {
    let mut out: Vec<(Key, Vec<u8>)> = items
        .iter()
        .map(|(k, v)| {
            let mut k = *k;
            if k.item_type == EXTENT_DATA_REF_KEY {
                k.offset = 0;
            }
            (k, v.clone())
        })
        .collect();
    out.sort();
    out
}

/// Streams `items` (B+tree items, as a range scan returns them; values of
/// at most [`VALUE_BYTES_MAX`] bytes, as the tree guarantees) through
/// [`ExtentLoader::push`] and [`ExtentLoader::finish`] and checks the
/// contract (module doc).
///
/// # Panics
///
/// If the contract is broken, or a value exceeds [`VALUE_BYTES_MAX`].
pub fn items_round_trip(items: &[(Key, Vec<u8>)]) -> Result<Vec<(u64, ExtentItem)>, CodecError> {
    assert!(items.iter().all(|(_, v)| v.len() <= VALUE_BYTES_MAX));
    let streamed = load_streaming(items);
    let all = ExtentLoader::load_all(items.iter().map(|(k, v)| (k, v.as_slice())));
    let extents = match streamed {
        Ok(extents) => extents,
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(all.err().as_ref(), Some(&e), "load_all disagrees");
            return Err(e);
        }
    };
    assert!(
        extents.windows(2).all(|w| w[0].0 < w[1].0),
        "extents not in strictly ascending bytenr order"
    );
    let mut tree = ExtentTree::new();
    for (bytenr, item) in &extents {
        assert_eq!(item.check(), Ok(()));
        tree.insert(*bytenr, item.clone());
    }
    assert_eq!(all.as_ref().ok(), Some(&tree), "load_all disagrees");
    let value_bytes: usize = items.iter().map(|(_, v)| v.len()).sum();
    let refs_capacity: usize = extents
        .iter()
        .map(|(_, i)| i.inline.capacity() + i.keyed.capacity())
        .sum();
    assert!(refs_capacity <= 2 * (items.len() + value_bytes / INLINE_REF_BYTES_MIN) + 8);
    let mut again = Vec::with_capacity(items.len());
    for (bytenr, item) in &extents {
        again.extend(encode_extent(*bytenr, item).expect("a loaded extent encodes"));
    }
    assert!(
        without_hash_offsets(&again) == without_hash_offsets(items),
        "extent items do not re-encode"
    );
    Ok(extents)
}

fn load_streaming(items: &[(Key, Vec<u8>)]) -> Result<Vec<(u64, ExtentItem)>, CodecError> {
    let mut loader = ExtentLoader::new();
    let mut out = Vec::new();
    for (k, v) in items {
        if let Some(extent) = loader.push(k, v)? {
            out.push(extent);
        }
    }
    out.extend(loader.finish()?);
    Ok(out)
}

/// B+tree items from arbitrary bytes, for [`items_round_trip`]. The first
/// byte steers: bit 0 lets objectids go down (else they only ascend).
/// Then each item is `delta u8 | item_type u8 | offset u64 LE | len u16
/// LE | value`: its objectid is the previous one plus `delta` (minus, for
/// odd deltas, when going down is allowed); a value is cut at
/// [`VALUE_BYTES_MAX`] and at the end of the input.
pub fn items_from_bytes(data: &[u8]) -> Vec<(Key, Vec<u8>)> {
    let Some((&steer, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut objectid = 1u64 << 20;
    let mut out = Vec::new();
    while let [delta, item_type, tail @ ..] = rest {
        let Some((offset, tail)) = tail.split_first_chunk::<8>() else {
            break;
        };
        let Some((len, tail)) = tail.split_first_chunk::<2>() else {
            break;
        };
        let delta = u64::from(*delta);
        objectid = if steer & 1 != 0 && delta % 2 == 1 {
            objectid.wrapping_sub(delta)
        } else {
            objectid.wrapping_add(delta)
        };
        let len = usize::from(u16::from_le_bytes(*len))
            .min(VALUE_BYTES_MAX)
            .min(tail.len());
        out.push((
            Key::new(objectid, *item_type, u64::from_le_bytes(*offset)),
            tail[..len].to_vec(),
        ));
        rest = &tail[len..];
    }
    out
}

/// Arbitrary bytes as one op record.
///
/// # Panics
///
/// If the contract of [`op_round_trip`] is broken.
pub fn fuzz_op(data: &[u8]) {
    let _ = op_round_trip(data);
}

/// Arbitrary bytes as one log record of any kind.
///
/// # Panics
///
/// If the contract of [`record_round_trip`] is broken.
pub fn fuzz_record(data: &[u8]) {
    let _ = record_round_trip(data);
}

/// Service item types [`fuzz_service`] picks from.
pub const SERVICE_ITEM_TYPES: [u8; 4] = [SESSION_KEY, FREED_KEY, CONSUMER_KEY, META_KEY];

/// Arbitrary bytes as a service item value: the first byte picks the
/// item type ([`SERVICE_ITEM_TYPES`]), the rest is the value (cut at
/// [`VALUE_BYTES_MAX`], as the tree holds no longer value).
///
/// # Panics
///
/// If the contract of [`service_round_trip`] is broken.
pub fn fuzz_service(data: &[u8]) {
    let Some((&steer, value)) = data.split_first() else {
        return;
    };
    let item_type = SERVICE_ITEM_TYPES[usize::from(steer % 4)];
    let _ = service_round_trip(item_type, &value[..value.len().min(VALUE_BYTES_MAX)]);
}

/// Arbitrary bytes as a held-heads stream.
///
/// # Panics
///
/// If the contract of [`held_round_trip`] is broken.
pub fn fuzz_held(data: &[u8]) {
    let _ = held_round_trip(data);
}

/// Arbitrary bytes as B+tree items ([`items_from_bytes`]) for the loader.
///
/// # Panics
///
/// If the contract of [`items_round_trip`] is broken.
pub fn fuzz_items(data: &[u8]) {
    let _ = items_round_trip(&items_from_bytes(data));
}
