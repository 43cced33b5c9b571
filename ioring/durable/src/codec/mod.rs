//! Bytes of the durable engine: op records in the log and extent items in
//! the B+tree. Specified in `docs/durable.md` ("Op record", "Extent items").
//!
//! **Op records.** One log record holds one [`Op`](refd_core::model::Op): a flags byte, then
//! unsigned LEB128 varints for the numbers, so a common data-ref op is 10-20
//! bytes. [`decode_op`] never panics: any malformed input (truncated,
//! overlong varint, unknown bits, trailing bytes, an op that fails
//! [`Op::check`](refd_core::model::Op::check)) is a typed [`CodecError`].
//!
//! **Extent items.** btrfs-like: one B+tree item per extent, keyed
//! `(bytenr, EXTENT_ITEM 168, num_bytes)` for data and
//! `(bytenr, METADATA_ITEM 169, level)` for tree blocks, whose value holds
//! the flags, generation, the tree block key and the *inline* backrefs (laid
//! out exactly as btrfs's inline refs, so the value is never larger than
//! what [`ExtentItem::item_bytes`](refd_core::extent_tree::ExtentItem::item_bytes) budgets); *keyed* backrefs are separate
//! items `(bytenr, 176 | 178 | 182 | 184, root | hash | parent)`. `refs` is
//! not stored: it is the sum of the backref counts and is recomputed.
//!
//! Map: `varint.rs` (LEB128 and the bounds-checked `Reader`), `op.rs`
//! (op records), `item.rs` (extent items: encode, decode, [`ExtentLoader`]),
//! `held.rs` (the held-heads stream), `diff.rs` (an extent's B+tree
//! changes from its item before to its item after), `record.rs` (the
//! other log records: SUBMIT batches, sessions, freed-list consumers),
//! `service.rs` (the daemon's state as B+tree items).

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
        /// Limit ([`VALUE_BYTES_MAX`](refd_ioring::btree::VALUE_BYTES_MAX)).
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
    /// Reading a B+tree item of the extent failed (the diff of a commit
    /// looks up where a changed backref is stored).
    #[error("extent {bytenr}: reading B+tree item {key}: {reason}")]
    Read {
        /// Extent.
        bytenr: u64,
        /// The item's key.
        key: refd_ioring::btree::Key,
        /// What failed.
        reason: String,
    },
}

use refd_core::extent_tree::ItemError;
use refd_core::model::{OpError, RefKey};

mod diff;
mod held;
mod item;
mod op;
pub mod record;
pub mod service;
#[cfg(test)]
mod tests;
mod varint;

pub use diff::{diff_extent, diff_extent_changed, KeyLookup};
pub use held::{
    decode_held, encode_held, held_items, EXTENT_BYTENR_MAX, HELD_HEADS_KEY, HELD_OBJECTID,
};
#[cfg(test)]
pub(crate) use item::keyed_backref_item;
pub use item::{
    encode_extent, encode_extent_item, hash_extent_data_ref, item_key, ExtentLoader,
    EXTENT_ITEM_KEY, METADATA_ITEM_KEY,
};
pub use op::{decode_op, encode_op, op_record, OP_RECORD_BYTES_MAX};
pub use record::{decode_record, encode_record, encode_submit, Record};
pub(crate) use varint::{get_ref_key, put_ref_key, put_varint, Reader};
