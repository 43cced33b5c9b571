//! [`diff_extent`]: the B+tree changes that turn an extent's item before
//! a commit into its item after.

use refd_core::extent_tree::ExtentItem;
use refd_ioring::btree::{Change, Key};

use super::item::{keyed_at_home, keyed_backref_item};
use super::{encode_extent, encode_extent_item, item_key, CodecError};

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
    // Keyed backrefs on both sides, all at their home keys: only the
    // backrefs that changed are encoded (an extent with a million
    // backrefs costs a walk of its lists, not two full encodings).
    if let (Some(b), Some(a)) = (before, after) {
        if item_key(bytenr, b.num_bytes, b.kind) == item_key(bytenr, a.num_bytes, a.kind)
            && keyed_at_home(&b.keyed)
            && keyed_at_home(&a.keyed)
        {
            let start = out.len();
            diff_at_home(bytenr, b, a, out)?;
            debug_assert!(
                {
                    let mut slow = Vec::new();
                    diff_encoded(bytenr, before, after, &mut slow).is_ok()
                        && slow[..] == out[start..]
                },
                "the keyed diff of extent {bytenr} differs from the full one"
            );
            return Ok(());
        }
    }
    diff_encoded(bytenr, before, after, out)
}

/// [`diff_extent`] when both items have the same key and every keyed
/// backref is at its home key: a merge of the two sorted keyed lists.
fn diff_at_home(
    bytenr: u64,
    before: &ExtentItem,
    after: &ExtentItem,
    out: &mut Vec<(Key, Change)>,
) -> Result<(), CodecError> {
    let (k, old) = encode_extent_item(bytenr, before)?;
    let (_, new) = encode_extent_item(bytenr, after)?;
    if old != new {
        out.push((k, Change::Put(new)));
    }
    let mut changes: Vec<(Key, Change)> = Vec::new();
    let (mut b, mut a) = (
        before.keyed.iter().peekable(),
        after.keyed.iter().peekable(),
    );
    loop {
        let order = match (b.peek(), a.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => x.0.cmp(&y.0),
        };
        match order {
            std::cmp::Ordering::Less => {
                let &(key, count) = b.next().expect("peeked");
                let (k, _) = keyed_backref_item(bytenr, key, count)?;
                changes.push((k, Change::Delete));
            }
            std::cmp::Ordering::Greater => {
                let &(key, count) = a.next().expect("peeked");
                let (k, v) = keyed_backref_item(bytenr, key, count)?;
                changes.push((k, Change::Put(v)));
            }
            std::cmp::Ordering::Equal => {
                let &(_, old_count) = b.next().expect("peeked");
                let &(key, count) = a.next().expect("peeked");
                if count != old_count {
                    let (k, v) = keyed_backref_item(bytenr, key, count)?;
                    changes.push((k, Change::Put(v)));
                }
            }
        }
    }
    // Backref order is not key order (EXTENT_DATA_REF keys are hashes).
    changes.sort_unstable_by_key(|c| c.0);
    out.extend(changes);
    Ok(())
}

/// [`diff_extent`] by encoding both items whole and merging the encodings.
pub(super) fn diff_encoded(
    bytenr: u64,
    before: Option<&ExtentItem>,
    after: Option<&ExtentItem>,
    out: &mut Vec<(Key, Change)>,
) -> Result<(), CodecError> {
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
