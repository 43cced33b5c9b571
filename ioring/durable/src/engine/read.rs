//! Reads of committed state: extents streamed from the B+tree (decoded and
//! checked one at a time), the held-heads stream, and
//! [`DurableEngine::lookup_extent_ref`] (committed + pending).

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use refd_core::delayed::DelayedRefStore;
use refd_core::engine::{ExtentRefs, TreeRead};
use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::head::Head;
use refd_ioring::btree::{BTree, Key, VALUE_BYTES_MAX};
use refd_ioring::Storage;

use super::{lock, DurableEngine};
use crate::codec::{self, ExtentLoader};
use crate::error::ReadError;

/// Extents read from the B+tree per thread below which a commit reads its
/// misses on one thread.
const PARALLEL_READ_MIN_EXTENTS: usize = 4096;

/// Calls `f` with every extent of `tree` whose bytenr is in `bytenrs`,
/// in bytenr order, decoded and checked (one extent in memory at a time),
/// until `f` breaks.
pub fn scan_extents<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    bytenrs: std::ops::RangeInclusive<u64>,
    mut f: impl FnMut(u64, ExtentItem) -> ControlFlow<()>,
) -> Result<(), ReadError> {
    let items_err = |key: Option<Key>| {
        move |source| ReadError::Items {
            device: device.to_string(),
            key,
            source,
        }
    };
    let mut loader = ExtentLoader::new();
    let range = Key::new(*bytenrs.start(), 0, 0)..=Key::new(*bytenrs.end(), u8::MAX, u64::MAX);
    for item in tree.range(range) {
        let (key, value) = item.map_err(|source| ReadError::Tree {
            device: device.to_string(),
            what: "extent items",
            source: Box::new(source),
        })?;
        if let Some((bytenr, item)) = loader.push(&key, &value).map_err(items_err(Some(key)))? {
            if f(bytenr, item).is_break() {
                return Ok(());
            }
        }
    }
    if let Some((bytenr, item)) = loader.finish().map_err(items_err(None))? {
        let _ = f(bytenr, item);
    }
    Ok(())
}

/// Load every extent item of a committed B+tree into an in-memory extent
/// tree (every item is decoded and checked). Needs memory for all of them:
/// for tools and tests; the engine reads through [`scan_extents`].
pub fn load_extents<S: Storage>(tree: &BTree<S>, device: &str) -> Result<ExtentTree, ReadError> {
    let mut out = ExtentTree::new();
    scan_extents(tree, device, 0..=codec::EXTENT_BYTENR_MAX, |b, item| {
        out.insert(b, item);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// The held-heads stream of a committed B+tree, decoded, and its chunk
/// count (chunks must be numbered 0, 1, ... without a gap).
pub fn read_held<S: Storage>(
    tree: &BTree<S>,
    device: &str,
) -> Result<(Vec<Head>, usize), ReadError> {
    let mut stream = Vec::new();
    let mut chunks = 0u64;
    let range = Key::new(codec::HELD_OBJECTID, codec::HELD_HEADS_KEY, 0)
        ..=Key::new(codec::HELD_OBJECTID, codec::HELD_HEADS_KEY, u64::MAX);
    for item in tree.range(range) {
        let (key, value) = item.map_err(|source| ReadError::Tree {
            device: device.to_string(),
            what: "held heads",
            source: Box::new(source),
        })?;
        // Chunks are numbered from 0 without a gap, and only the last may
        // be short (`codec::held_items`).
        let short_before = stream.len() as u64 != chunks * VALUE_BYTES_MAX as u64;
        if key.offset != chunks || short_before || value.is_empty() {
            return Err(ReadError::HeldChunk {
                device: device.to_string(),
                chunk: key.offset,
                expected: chunks,
                len_bytes: value.len(),
            });
        }
        stream.extend_from_slice(&value);
        chunks += 1;
    }
    if chunks == 0 {
        return Ok((Vec::new(), 0));
    }
    let heads = codec::decode_held(&stream).map_err(|source| ReadError::Held {
        device: device.to_string(),
        chunks: chunks as usize,
        source,
    })?;
    Ok((heads, chunks as usize))
}

/// The extent count a committed B+tree records (`None`: not recorded, a
/// tree written before the count was kept, or a fresh one).
pub fn read_extent_count<S: Storage>(
    tree: &BTree<S>,
    device: &str,
) -> Result<Option<u64>, ReadError> {
    let key = codec::service::extents_key();
    let value = tree.get(&key).map_err(|source| ReadError::Tree {
        device: device.to_string(),
        what: "extent count",
        source: Box::new(source),
    })?;
    value
        .map(|v| codec::service::decode_extent_count(&v))
        .transpose()
        .map_err(|source| ReadError::Items {
            device: device.to_string(),
            key: Some(key),
            source,
        })
}

/// The extent items of a committed B+tree, counted by a scan of all of
/// them (what a recorded count must equal).
pub fn count_extents<S: Storage>(tree: &BTree<S>, device: &str) -> Result<u64, ReadError> {
    let mut n = 0u64;
    scan_extents(tree, device, 0..=codec::EXTENT_BYTENR_MAX, |_, _| {
        n += 1;
        ControlFlow::Continue(())
    })?;
    Ok(n)
}

/// The committed item of `bytenr` in `tree`.
pub(super) fn read_extent<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    bytenr: u64,
) -> Result<Option<ExtentItem>, ReadError> {
    let mut found = None;
    scan_extents(tree, device, bytenr..=bytenr, |b, item| {
        debug_assert_eq!(b, bytenr);
        found = Some(item);
        ControlFlow::Break(())
    })?;
    Ok(found)
}

/// The committed items of `bytenrs`, read on up to one thread per core
/// (the commit run's workers, `refd_core::engine::in_parts`; at least
/// [`PARALLEL_READ_MIN_EXTENTS`] per part, else on this thread), in
/// order; the first error (in part order) is returned.
pub(super) fn read_extents<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    bytenrs: &[u64],
) -> Result<Vec<Option<ExtentItem>>, ReadError> {
    let parts = refd_core::engine::in_parts(bytenrs, PARALLEL_READ_MIN_EXTENTS, |_, part| {
        part.iter()
            .map(|&b| read_extent(tree, device, b))
            .collect::<Result<Vec<_>, _>>()
    });
    let mut out: Vec<Option<ExtentItem>> = Vec::with_capacity(bytenrs.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// The committed extents starting inside the ranges `(bytenr, end)`
/// (the extent below each, which may reach into it, is read before the
/// run by [`alloc_neighbours`]): for `Ran::freed_unreused` of
/// `refd_core`, which leaves out of what a consumer may reuse every range
/// an untouched committed extent covers. Only an allocation dropped again
/// in the commit that made it can meet one, and only one whose head was
/// held by a seq barrier or whose re-allocation in that commit was refused
/// (over an extent live all through the commit it is refused); the ranges
/// are those.
pub(super) fn extents_inside<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    ranges: &[(u64, u64)],
) -> Result<Vec<(u64, ExtentItem)>, ReadError> {
    // Overlapping ranges are scanned once: a client's allocations dropped
    // again in their commit may all cover the same huge range, and each
    // would otherwise walk every extent in it again.
    let mut out = Vec::new();
    for (bytenr, end) in merge_ranges(ranges) {
        let last = end.saturating_sub(1).min(codec::EXTENT_BYTENR_MAX);
        if last <= bytenr {
            continue;
        }
        scan_extents(tree, device, bytenr + 1..=last, |b, item| {
            out.push((b, item));
            ControlFlow::Continue(())
        })?;
    }
    Ok(out)
}

/// `ranges` (`(start, end)`, end exclusive) sorted, with overlapping ones
/// joined: a point in any of them is in exactly one of the result.
fn merge_ranges(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut merged = ranges.to_vec();
    merged.sort_unstable();
    merged.dedup_by(|next, kept| {
        let overlaps = next.0 < kept.1;
        if overlaps {
            kept.1 = kept.1.max(next.1);
        }
        overlaps
    });
    merged
}

/// The committed extents the overlap check of a commit's allocations
/// needs besides the frozen heads' own (`refd_core`'s `overlap` module:
/// an allocation is refused if it meets a live extent): for every head
/// that allocates, the extent with the greatest bytenr below its own, and
/// the first extent inside its range that is not a frozen head's (a
/// frozen head's item is read anyway; any other extent there stays live,
/// and one is enough to refuse). `heads` are sorted by bytenr. Read on
/// the commit run's workers; bytenrs in no particular order, maybe
/// repeated.
pub(super) fn alloc_neighbours<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    heads: &[Head],
) -> Result<Vec<u64>, ReadError> {
    let tree_err = |source| ReadError::Tree {
        device: device.to_string(),
        what: "extents next to an allocation",
        source: Box::new(source),
    };
    let frozen = |b: u64| heads.binary_search_by_key(&b, |h| h.bytenr).is_ok();
    let parts = refd_core::engine::in_parts(heads, PARALLEL_READ_MIN_EXTENTS, |_, part| {
        let mut out = Vec::new();
        for h in part.iter().filter(|h| h.summary.must_insert_reserved()) {
            let b = h.bytenr;
            let below = tree.last_below(&Key::new(b, 0, 0)).map_err(tree_err)?;
            out.extend(below.map(|k| k.objectid).filter(|&p| !frozen(p)));
            let end = b.saturating_add(h.summary.num_bytes);
            let inside = Key::new(b.saturating_add(1), 0, 0)..Key::new(end, 0, 0);
            for item in tree.range(inside) {
                let (key, _) = item.map_err(tree_err)?;
                if key.objectid <= codec::EXTENT_BYTENR_MAX && !frozen(key.objectid) {
                    out.push(key.objectid);
                    break;
                }
            }
        }
        Ok(out)
    });
    let mut out = Vec::new();
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

impl<S: Storage + Clone, D: DelayedRefStore> DurableEngine<S, D> {
    /// Would-be reference count of `bytenr`: committed item + pending ops,
    /// each acknowledged op counted exactly once (as in core: the core
    /// tree's read lock is held across the lookup, and a commit moves ops
    /// from pending to the cache under its write lock). The committed item
    /// comes from the cache, else from the B+tree, except for the running
    /// commit's frozen heads, which are all cached until the B+tree has
    /// their changes: a miss among them is an extent without item.
    pub fn lookup_extent_ref(&self, bytenr: u64) -> Result<ExtentRefs, ReadError> {
        let (committed, pending) = self.read_state(bytenr, |tree| {
            self.engine.pending_summary_with(tree, bytenr)
        })?;
        let refs = committed.as_ref().map_or(0, |c| c.refs as i64)
            + pending.as_ref().map_or(0, |s| s.total_ref_mod);
        Ok(ExtentRefs {
            committed,
            pending,
            refs,
        })
    }

    /// The committed item and the pending head of `bytenr`, read together
    /// exactly as [`DurableEngine::lookup_extent_ref`] reads them (each
    /// acknowledged op in exactly one of the two): what BACKREFS lists.
    pub fn extent_state(
        &self,
        bytenr: u64,
    ) -> Result<(Option<ExtentItem>, Option<Head>), ReadError> {
        self.read_state(bytenr, |tree| self.engine.pending_with(tree, bytenr))
    }

    /// The committed item of `bytenr` and what `pending` reads of its
    /// pending head, under one hold of the core tree's read lock.
    fn read_state<P>(
        &self,
        bytenr: u64,
        pending: impl FnOnce(&TreeRead<'_>) -> P,
    ) -> Result<(Option<ExtentItem>, P), ReadError> {
        let tree = self.engine.tree();
        let committed = match tree.get(bytenr) {
            Some(item) => Some(item.clone()),
            None if self.cache_complete.load(Ordering::Acquire) => None,
            None => {
                let inflight = Arc::clone(&self.inflight.read().unwrap_or_else(|e| e.into_inner()));
                if inflight.binary_search(&bytenr).is_ok() {
                    None
                } else {
                    read_extent(&self.tree, self.storage.device_name(), bytenr)?
                }
            }
        };
        let pending = pending(&tree);
        drop(tree);
        Ok((committed, pending))
    }

    /// Every committed extent, read from the B+tree into memory (for tools
    /// and tests: needs memory for the whole tree). Takes the commit lock.
    pub fn committed_extents(&self) -> Result<ExtentTree, ReadError> {
        let _st = lock(&self.commit);
        load_extents(&self.tree, self.storage.device_name())
    }
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    #[test]
    fn overlapping_ranges_are_scanned_once() {
        let big = (1 << 20, u64::MAX);
        let ranges = [
            big,
            (4096, 8192),
            big,
            (1 << 30, 1 << 31),
            (8192, 12288),
            big,
        ];
        assert_eq!(
            merge_ranges(&ranges),
            vec![(4096, 8192), (8192, 12288), (1 << 20, u64::MAX)]
        );
        assert_eq!(merge_ranges(&[(0, 10), (5, 7), (9, 20)]), vec![(0, 20)]);
        assert!(merge_ranges(&[]).is_empty());
    }
}
