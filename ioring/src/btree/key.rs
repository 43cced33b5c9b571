//! [`Key`]: a btrfs-style `(objectid, item_type, offset)` key, ordered
//! field by field, and its 17-byte encoding inside a node (`docs/format.md`,
//! "B+tree items").

use std::fmt;

use crate::format::le::{get_u64, get_u8, put_u64, put_u8};

/// Encoded size of a [`Key`]: `objectid u64 | item_type u8 | offset u64`.
pub const KEY_BYTES: usize = 17;
const _: () = assert!(KEY_BYTES == 8 + 1 + 8);

/// A btrfs-style key, ordered by `(objectid, item_type, offset)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    /// Object id (for the extent tree: the bytenr).
    pub objectid: u64,
    /// Item type.
    pub item_type: u8,
    /// Offset (meaning depends on the item type).
    pub offset: u64,
}

impl Key {
    /// A key from its three fields.
    pub const fn new(objectid: u64, item_type: u8, offset: u64) -> Self {
        Key {
            objectid,
            item_type,
            offset,
        }
    }

    /// The smallest key.
    pub const MIN: Key = Key::new(0, 0, 0);
    /// The largest key.
    pub const MAX: Key = Key::new(u64::MAX, u8::MAX, u64::MAX);

    pub(crate) fn encode(&self, buf: &mut [u8], at: usize) {
        put_u64(buf, at, self.objectid);
        put_u8(buf, at + 8, self.item_type);
        put_u64(buf, at + 9, self.offset);
    }

    pub(crate) fn decode(buf: &[u8], at: usize) -> Key {
        Key {
            objectid: get_u64(buf, at),
            item_type: get_u8(buf, at + 8),
            offset: get_u64(buf, at + 9),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({} {} {})", self.objectid, self.item_type, self.offset)
    }
}
