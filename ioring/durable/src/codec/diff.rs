//! [`diff_extent`]: the B+tree changes that turn an extent's item before
//! a commit into its item after.

use refd_core::extent_tree::ExtentItem;
use refd_ioring::btree::{Change, Key};

use super::{encode_extent, encode_extent_item, item_key, CodecError};

/// (either may be absent), appended to `out` in key order.
/// The B+tree changes turning extent `bytenr` from `before` into `after`
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
