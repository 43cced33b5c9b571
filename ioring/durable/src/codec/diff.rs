//! [`diff_extent`]: the B+tree changes that turn an extent's item before
//! a commit into its item after.

use refd_core::extent_tree::ExtentItem;
use refd_core::model::{RefKey, EXTENT_DATA_REF_KEY};
use refd_ioring::btree::{Change, Key};

use super::item::{
    decode_keyed_ref, encode_checked_item, hash_extent_data_ref, keyed_at_home, keyed_backref_item,
};
use super::{encode_extent, encode_extent_item, item_key, CodecError};

/// The value of a key in the B+tree as the last commit left it (`None`:
/// no item), for [`diff_extent_changed`].
pub type KeyLookup<'a> = dyn Fn(&Key) -> Result<Option<Vec<u8>>, CodecError> + Sync + 'a;

/// [`diff_extent_changed`] looks changes up one by one only when the
/// item's keyed backrefs outnumber its changes this many times (below,
/// one walk of both lists costs about as much as the lookups).
const KEYED_PER_CHANGE_MIN: usize = 32;

/// [`diff_extent`] when `after` is `before` with the backref count changes
/// `changed` (see `refd_core::engine::RunSink::effect`; `None`: the item
/// was built anew): the B+tree changes in O(|changed| · log B) plus the
/// encoding of the extent item (header and inline backrefs), without a
/// walk of the keyed backrefs, when the extent has many of them.
///
/// A keyed `EXTENT_DATA_REF` is stored at its home key (the hash) unless
/// it collided; whether a change moves other backrefs is decided from the
/// committed B+tree through `lookup` (O(log N) each): a removed backref
/// must be at its home with the next key free (so no probe went past it),
/// an added one's home must be free (then it lands there and moves no
/// other), a recounted one must be at its home, and no two changed homes
/// may be equal or adjacent. Otherwise, and for small extents, this is
/// [`diff_extent`].
pub fn diff_extent_changed(
    bytenr: u64,
    before: Option<&ExtentItem>,
    after: Option<&ExtentItem>,
    changed: Option<&[(RefKey, i64)]>,
    lookup: &KeyLookup<'_>,
    out: &mut Vec<(Key, Change)>,
) -> Result<(), CodecError> {
    if let (Some(b), Some(a), Some(c)) = (before, after, changed) {
        if b.keyed.len() > c.len().saturating_mul(KEYED_PER_CHANGE_MIN)
            && item_key(bytenr, b.num_bytes, b.kind) == item_key(bytenr, a.num_bytes, a.kind)
        {
            let start = out.len();
            if diff_changed(bytenr, b, a, c, lookup, out)? {
                debug_assert!(
                    is_full_diff(bytenr, before, after, &out[start..]),
                    "the changed-keys diff of extent {bytenr} differs from the full one"
                );
                return Ok(());
            }
            out.truncate(start);
        }
    }
    diff_extent(bytenr, before, after, out)
}

/// The B+tree change of a keyed backref of `bytenr` stored at B+tree key
/// `at` whose count becomes `new` (0: removed).
fn keyed_change(bytenr: u64, key: RefKey, new: u64, at: Key) -> Result<(Key, Change), CodecError> {
    if new == 0 {
        return Ok((at, Change::Delete));
    }
    let (_, v) = keyed_backref_item(bytenr, key, new)?;
    Ok((at, Change::Put(v)))
}

/// See [`diff_extent_changed`]. Returns false (with `out` partly
/// written) when the changes may move backrefs they do not name.
pub(super) fn diff_changed(
    bytenr: u64,
    before: &ExtentItem,
    after: &ExtentItem,
    changed: &[(RefKey, i64)],
    lookup: &KeyLookup<'_>,
    out: &mut Vec<(Key, Change)>,
) -> Result<bool, CodecError> {
    after
        .check_changed(before, changed)
        .map_err(|source| CodecError::Item { bytenr, source })?;
    // The extent item's value is its header and inline backrefs (refs is
    // their sum with the keyed ones and is not stored).
    let same_value = (
        before.num_bytes,
        before.flags,
        before.generation,
        before.tree_key,
    ) == (
        after.num_bytes,
        after.flags,
        after.generation,
        after.tree_key,
    ) && before.inline == after.inline;
    if !same_value {
        let (k, v) = encode_checked_item(bytenr, after)?;
        out.push((k, Change::Put(v)));
    }
    let count = |list: &[(RefKey, u64)], key: &RefKey| {
        list.binary_search_by(|(k, _)| k.cmp(key))
            .map_or(0, |i| list[i].1)
    };
    let mut changes: Vec<(Key, Change)> = Vec::with_capacity(changed.len());
    // (home, key, count before, count after) of changed EXTENT_DATA_REFs.
    let mut data: Vec<(u64, RefKey, u64, u64)> = Vec::new();
    for &(key, _) in changed {
        let (old, new) = (count(&before.keyed, &key), count(&after.keyed, &key));
        if old == new {
            // Unchanged, or inline (in the extent item).
            continue;
        }
        match key {
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => data.push((hash_extent_data_ref(root, objectid, offset), key, old, new)),
            // Stored at a key of its own (root or parent): no collisions.
            _ => {
                let (at, _) = keyed_backref_item(bytenr, key, new.max(old))?;
                changes.push(keyed_change(bytenr, key, new, at)?);
            }
        }
    }
    data.sort_unstable_by_key(|d| d.0);
    if data.windows(2).any(|w| w[1].0 - w[0].0 <= 1) {
        return Ok(false);
    }
    let read = |offset: u64| {
        let at = Key::new(bytenr, EXTENT_DATA_REF_KEY, offset);
        let value = lookup(&at)?;
        value
            .map(|v| decode_keyed_ref(bytenr, &at, &v).map(|(k, _)| k))
            .transpose()
    };
    for &(home, key, old, new) in &data {
        let at = Key::new(bytenr, EXTENT_DATA_REF_KEY, home);
        let found = read(home)?;
        let in_place = if old == 0 {
            found.is_none()
        } else {
            // The hash is 63 bits: `home + 1` does not wrap.
            found == Some(key) && (new != 0 || read(home + 1)?.is_none())
        };
        if !in_place {
            return Ok(false);
        }
        changes.push(keyed_change(bytenr, key, new, at)?);
    }
    // Backref order is not key order (EXTENT_DATA_REF keys are hashes).
    changes.sort_unstable_by_key(|c| c.0);
    out.extend(changes);
    Ok(true)
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
                is_full_diff(bytenr, before, after, &out[start..]),
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

/// Whether `fast` is exactly what [`diff_encoded`] gives (the debug
/// check of the diffs that skip the full encodings).
fn is_full_diff(
    bytenr: u64,
    before: Option<&ExtentItem>,
    after: Option<&ExtentItem>,
    fast: &[(Key, Change)],
) -> bool {
    let mut slow = Vec::new();
    diff_encoded(bytenr, before, after, &mut slow).is_ok() && slow[..] == fast[..]
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
