//! The in-memory extent tree: what btrfs stores in its extent tree, keyed by
//! bytenr.
//!
//! Each [`ExtentItem`] holds `refs`, `flags`, `generation`, the first key of
//! a tree block when one is recorded (`tree_key`, non-skinny metadata), and
//! its backrefs with counts. As in btrfs, backrefs live *inline* in the
//! extent item while the item stays under [`INLINE_ITEM_BYTES_MAX`]; once it
//! would grow past that, new backrefs become *keyed* items
//! (`(bytenr, TREE_BLOCK_REF, root)` and friends). A backref that already
//! exists stays where it is; a removed one is removed from where it is.
//!
//! Invariants (checked by [`ExtentItem::check`] and asserted after every
//! apply in debug builds):
//! - `refs` equals the sum of the counts of all backrefs and is > 0;
//! - every backref has count >= 1 and at most [`BACKREF_COUNT_MAX`];
//!   tree-block backrefs have count exactly 1;
//! - backrefs match the extent's kind (tree refs on tree blocks only);
//! - no backref key appears both inline and keyed;
//! - `flags` has exactly one of DATA / TREE_BLOCK, matching `kind`.

use std::collections::BTreeMap;

use crate::model::{
    DiskKey, ExtentKind, RefKey, BLOCK_FLAG_FULL_BACKREF, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK,
};

/// Largest extent item (header + inline refs) before new backrefs are keyed.
/// btrfs uses `BTRFS_MAX_EXTENT_ITEM_SIZE` = max item size / 4; for a 16 KiB
/// node that is (16384 - 101 - 25) / 4 = 4064 bytes.
pub const INLINE_ITEM_BYTES_MAX: usize = 4064;

/// Most references one backref counts: btrfs stores the count of a data
/// backref (`btrfs_extent_data_ref`, `btrfs_shared_data_ref`) in 32 bits,
/// and so does refd's on-device format (`docs/format.md`). A run that
/// would count more is refused (`RunError::CountOverflow`).
pub const BACKREF_COUNT_MAX: u64 = u32::MAX as u64;

/// Bytes of the extent item header (`btrfs_extent_item`: refs, generation,
/// flags), plus `btrfs_tree_block_info` when a tree key is recorded.
const ITEM_HEADER_BYTES: usize = 24;
const TREE_BLOCK_INFO_BYTES: usize = 18;
/// The most backrefs an item holds inline: the smallest inline backref is
/// 9 bytes (`RefKey::inline_bytes`).
const INLINE_REFS_MAX: usize = (INLINE_ITEM_BYTES_MAX - ITEM_HEADER_BYTES) / 9;

/// One extent item with its backrefs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentItem {
    /// Size of the extent in bytes.
    pub num_bytes: u64,
    /// Data or tree block (with level).
    pub kind: ExtentKind,
    /// Total reference count.
    pub refs: u64,
    /// Extent flags (DATA / TREE_BLOCK, FULL_BACKREF).
    pub flags: u64,
    /// Transaction (commit generation) that allocated the extent.
    pub generation: u64,
    /// First key of a tree block, when recorded (non-skinny metadata).
    pub tree_key: Option<DiskKey>,
    /// Backrefs stored inline, sorted by key.
    pub inline: Vec<(RefKey, u64)>,
    /// Backrefs stored as separate keyed items, sorted by key.
    pub keyed: Vec<(RefKey, u64)>,
}

/// What is wrong with an extent item.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// refs != sum of backref counts.
    #[error("refs {refs} != sum of backref counts {sum}")]
    RefsMismatch {
        /// Recorded refs.
        refs: u64,
        /// Sum of counts.
        sum: u64,
    },
    /// An extent with zero references.
    #[error("extent has zero references")]
    ZeroRefs,
    /// A backref with count 0 or above [`BACKREF_COUNT_MAX`], or a tree
    /// backref with count > 1.
    #[error("backref '{key}' has invalid count {count}")]
    BadCount {
        /// Backref.
        key: RefKey,
        /// Count.
        count: u64,
    },
    /// A backref of the wrong kind.
    #[error("backref '{key}' does not fit a {kind} extent")]
    WrongKind {
        /// Backref.
        key: RefKey,
        /// Extent kind.
        kind: ExtentKind,
    },
    /// The same backref twice.
    #[error("backref '{key}' stored twice")]
    Duplicate {
        /// Backref.
        key: RefKey,
    },
    /// Flags do not match the kind.
    #[error("flags {flags:#x} do not match a {kind} extent")]
    BadFlags {
        /// Flags.
        flags: u64,
        /// Kind.
        kind: ExtentKind,
    },
    /// The extent starts inside the previous one's range.
    #[error("extent overlaps the previous extent at {prev} ({prev_bytes} bytes)")]
    Overlaps {
        /// The previous extent's bytenr.
        prev: u64,
        /// Its size.
        prev_bytes: u64,
    },
}

impl ExtentItem {
    /// A new, empty item (no refs yet: call [`ExtentItem::add_ref`]).
    pub fn new(num_bytes: u64, kind: ExtentKind, generation: u64) -> ExtentItem {
        ExtentItem {
            num_bytes,
            kind,
            refs: 0,
            flags: kind.flags(),
            generation,
            tree_key: None,
            inline: Vec::new(),
            keyed: Vec::new(),
        }
    }

    /// Encoded size of the item with its inline refs, as btrfs lays it out.
    pub fn item_bytes(&self) -> usize {
        let mut n = ITEM_HEADER_BYTES;
        if self.tree_key.is_some() {
            n += TREE_BLOCK_INFO_BYTES;
        }
        n + self
            .inline
            .iter()
            .map(|(k, _)| k.inline_bytes())
            .sum::<usize>()
    }

    /// Count of one backref (0 if absent).
    pub fn count(&self, key: &RefKey) -> u64 {
        find(&self.inline, key)
            .or_else(|| find(&self.keyed, key))
            .unwrap_or(0)
    }

    /// All backrefs with counts, sorted by key (inline and keyed merged).
    pub fn backrefs(&self) -> Vec<(RefKey, u64)> {
        let mut all: Vec<(RefKey, u64)> = self
            .inline
            .iter()
            .chain(self.keyed.iter())
            .copied()
            .collect();
        all.sort_unstable_by_key(|a| a.0);
        all
    }

    /// True when the tree block uses full backrefs.
    pub fn full_backref(&self) -> bool {
        self.flags & BLOCK_FLAG_FULL_BACKREF != 0
    }

    /// Change the count of `key` by `delta` (refs follows). The caller has
    /// already checked that the result is valid (>= 0, <= 1 for tree refs);
    /// this is asserted.
    pub fn add_ref(&mut self, key: RefKey, delta: i64) {
        if delta == 0 {
            return;
        }
        for list_is_inline in [true, false] {
            let list = if list_is_inline {
                &mut self.inline
            } else {
                &mut self.keyed
            };
            if let Ok(i) = list.binary_search_by(|(k, _)| k.cmp(&key)) {
                let new = list[i].1 as i64 + delta;
                assert!(new >= 0, "add_ref below zero: caller must check");
                if new == 0 {
                    list.remove(i);
                } else {
                    list[i].1 = new as u64;
                }
                self.refs = (self.refs as i64 + delta) as u64;
                return;
            }
        }
        assert!(
            delta > 0,
            "add_ref of a missing backref with negative delta"
        );
        let inline_fits = self.item_bytes() + key.inline_bytes() <= INLINE_ITEM_BYTES_MAX;
        let list = if inline_fits {
            &mut self.inline
        } else {
            &mut self.keyed
        };
        let pos = list.binary_search_by(|(k, _)| k.cmp(&key)).unwrap_err();
        list.insert(pos, (key, delta as u64));
        self.refs += delta as u64;
    }

    /// [`add_ref`](Self::add_ref) of every `(key, delta)` of `net` in
    /// order (`net` sorted by key, each key once), with the same result:
    /// `*self = self.with_refs(net)`.
    pub fn add_refs(&mut self, net: &[(RefKey, i64)]) {
        *self = self.with_refs(net);
    }

    /// A copy of the item with [`add_ref`](Self::add_ref) of every
    /// `(key, delta)` of `net` applied in order (`net` sorted by key, each
    /// key once; the caller has checked every result, as for `add_ref`).
    ///
    /// Its cost is O(|net| · log B) plus one copy of the keyed backrefs,
    /// B of them: a commit that changes a few backrefs of an extent
    /// holding millions neither shifts the keyed list once per change nor
    /// walks it element by element. Inline backrefs (a few, under
    /// [`INLINE_ITEM_BYTES_MAX`]) are placed one by one exactly as
    /// `add_ref` places them; each keyed change is found by binary search
    /// in the old list, and the new list is the old one's unchanged runs
    /// copied between them.
    pub fn with_refs(&self, net: &[(RefKey, i64)]) -> ExtentItem {
        debug_assert!(net.windows(2).all(|w| w[0].0 < w[1].0), "net not sorted");
        let mut item = ExtentItem {
            inline: Vec::with_capacity(self.inline.len() + net.len().min(INLINE_REFS_MAX)),
            keyed: Vec::new(),
            ..*self
        };
        item.inline.extend_from_slice(&self.inline);
        // `item.item_bytes()`, kept as inline backrefs come and go.
        let mut bytes = item.item_bytes();
        // Changes to the keyed list, in key order.
        let mut edits: Vec<KeyedEdit> = Vec::new();
        for &(key, delta) in net {
            if delta == 0 {
                continue;
            }
            if let Ok(i) = item.inline.binary_search_by(|(k, _)| k.cmp(&key)) {
                let new = item.inline[i].1 as i64 + delta;
                assert!(new >= 0, "add_ref below zero: caller must check");
                if new == 0 {
                    item.inline.remove(i);
                    bytes -= key.inline_bytes();
                } else {
                    item.inline[i].1 = new as u64;
                }
            } else {
                match self.keyed.binary_search_by(|(k, _)| k.cmp(&key)) {
                    Ok(i) => {
                        let new = self.keyed[i].1 as i64 + delta;
                        assert!(new >= 0, "add_ref below zero: caller must check");
                        edits.push(KeyedEdit {
                            at: i,
                            entry: (new > 0).then_some((key, new as u64)),
                            insert: false,
                        });
                    }
                    Err(i) => {
                        assert!(
                            delta > 0,
                            "add_ref of a missing backref with negative delta"
                        );
                        if bytes + key.inline_bytes() <= INLINE_ITEM_BYTES_MAX {
                            let pos = item
                                .inline
                                .binary_search_by(|(k, _)| k.cmp(&key))
                                .unwrap_err();
                            item.inline.insert(pos, (key, delta as u64));
                            bytes += key.inline_bytes();
                        } else {
                            edits.push(KeyedEdit {
                                at: i,
                                entry: Some((key, delta as u64)),
                                insert: true,
                            });
                        }
                    }
                }
            }
            item.refs = (item.refs as i64 + delta) as u64;
        }
        item.keyed = splice_keyed(&self.keyed, &edits);
        debug_assert_eq!(bytes, item.item_bytes());
        item
    }

    /// Check every invariant listed in the module doc.
    pub fn check(&self) -> Result<(), ItemError> {
        self.check_flags()?;
        let mut sum = 0u64;
        for list in [&self.inline, &self.keyed] {
            for w in list.windows(2) {
                if w[0].0 >= w[1].0 {
                    return Err(ItemError::Duplicate { key: w[1].0 });
                }
            }
            for &(key, count) in list.iter() {
                self.check_backref(key, count)?;
                sum = sum.saturating_add(count);
            }
        }
        for (key, _) in &self.keyed {
            if find(&self.inline, key).is_some() {
                return Err(ItemError::Duplicate { key: *key });
            }
        }
        Self::check_refs(self.refs, sum)
    }

    /// [`check`](Self::check) of an item that is `before` (itself valid)
    /// with the backref count changes `changed` (sorted by key, as
    /// [`ExtentItem::with_refs`] applies them; its flags and tree key may
    /// differ too): the flags, the inline backrefs (a few), each changed
    /// backref, and `refs` against `before.refs` plus the changes, in
    /// O(|changed| · log B). The unchanged keyed backrefs are `before`'s
    /// (asserted in debug builds, with the whole check).
    pub fn check_changed(
        &self,
        before: &ExtentItem,
        changed: &[(RefKey, i64)],
    ) -> Result<(), ItemError> {
        self.check_flags()?;
        for w in self.inline.windows(2) {
            if w[0].0 >= w[1].0 {
                return Err(ItemError::Duplicate { key: w[1].0 });
            }
        }
        for &(key, count) in &self.inline {
            self.check_backref(key, count)?;
        }
        let mut refs = i128::from(before.refs);
        for (key, _) in changed {
            let (inline, keyed) = (find(&self.inline, key), find(&self.keyed, key));
            if inline.is_some() && keyed.is_some() {
                return Err(ItemError::Duplicate { key: *key });
            }
            if let Some(count) = keyed {
                self.check_backref(*key, count)?;
            }
            let count = inline.or(keyed).unwrap_or(0);
            refs += i128::from(count) - i128::from(before.count(key));
        }
        if refs != i128::from(self.refs) {
            return Err(ItemError::RefsMismatch {
                refs: self.refs,
                sum: u64::try_from(refs).unwrap_or(u64::MAX),
            });
        }
        debug_assert_eq!(self.check(), Ok(()));
        Self::check_refs(self.refs, self.refs)
    }

    fn check_flags(&self) -> Result<(), ItemError> {
        let want_flags = match self.kind {
            ExtentKind::Data => EXTENT_FLAG_DATA,
            ExtentKind::Tree { .. } => EXTENT_FLAG_TREE_BLOCK,
        };
        let kind_bits = self.flags & (EXTENT_FLAG_DATA | EXTENT_FLAG_TREE_BLOCK);
        if kind_bits != want_flags
            || (self.kind.is_data() && self.flags & BLOCK_FLAG_FULL_BACKREF != 0)
        {
            return Err(ItemError::BadFlags {
                flags: self.flags,
                kind: self.kind,
            });
        }
        Ok(())
    }

    fn check_backref(&self, key: RefKey, count: u64) -> Result<(), ItemError> {
        if key.is_data() != self.kind.is_data() {
            return Err(ItemError::WrongKind {
                key,
                kind: self.kind,
            });
        }
        if count == 0 || count > BACKREF_COUNT_MAX || (key.is_tree() && count != 1) {
            return Err(ItemError::BadCount { key, count });
        }
        Ok(())
    }

    fn check_refs(refs: u64, sum: u64) -> Result<(), ItemError> {
        if sum != refs {
            return Err(ItemError::RefsMismatch { refs, sum });
        }
        if refs == 0 {
            return Err(ItemError::ZeroRefs);
        }
        Ok(())
    }
}

/// One change to an item's keyed backrefs ([`ExtentItem::with_refs`]).
#[derive(Clone, Copy, Debug)]
struct KeyedEdit {
    /// Index in the old list.
    at: usize,
    /// The new entry; `None`: the one at `at` is removed.
    entry: Option<(RefKey, u64)>,
    /// Inserted before `at` (else it replaces the entry at `at`).
    insert: bool,
}

/// `old` with `edits` applied (in key order, so by index): the unchanged
/// runs between edits are copied whole.
fn splice_keyed(old: &[(RefKey, u64)], edits: &[KeyedEdit]) -> Vec<(RefKey, u64)> {
    let inserted = edits.iter().filter(|e| e.insert).count();
    let mut out = Vec::with_capacity(old.len() + inserted);
    let mut from = 0;
    for e in edits {
        debug_assert!(e.at >= from, "keyed edits out of order");
        out.extend_from_slice(&old[from..e.at]);
        out.extend(e.entry);
        from = if e.insert { e.at } else { e.at + 1 };
    }
    out.extend_from_slice(&old[from..]);
    out
}

fn find(list: &[(RefKey, u64)], key: &RefKey) -> Option<u64> {
    list.binary_search_by(|(k, _)| k.cmp(key))
        .ok()
        .map(|i| list[i].1)
}

/// Entries a [`Walker`] steps over before it searches again instead.
const WALK_STEPS_MAX: usize = 8;

/// See [`ExtentTree::walker`].
#[derive(Debug)]
pub struct Walker<'a> {
    tree: &'a ExtentTree,
    /// Entries with bytenr ≥ `at`.
    next: std::iter::Peekable<std::collections::btree_map::Range<'a, u64, ExtentItem>>,
    at: u64,
    /// The last entry below `at`, when known (`None`: look it up).
    prev: Option<Option<Entry<'a>>>,
}

/// An item of the tree with its bytenr.
pub type Entry<'a> = (u64, &'a ExtentItem);

impl<'a> Walker<'a> {
    /// The item at `bytenr` (as [`ExtentTree::get`]).
    pub fn get(&mut self, bytenr: u64) -> Option<&'a ExtentItem> {
        if bytenr < self.at {
            self.seek(bytenr);
        }
        let mut steps = 0;
        while let Some((&b, _)) = self.next.peek() {
            if b >= bytenr {
                break;
            }
            if steps == WALK_STEPS_MAX {
                self.seek(bytenr);
                break;
            }
            let (&b, item) = self.next.next().expect("peeked");
            self.prev = Some(Some((b, item)));
            steps += 1;
        }
        self.at = bytenr;
        match self.next.peek() {
            Some((&b, item)) if b == bytenr => Some(*item),
            _ => None,
        }
    }

    /// The entries next to `bytenr`: the last one below it and the first
    /// one above it (moves the walker to `bytenr`, as [`Walker::get`]).
    pub fn neighbours(&mut self, bytenr: u64) -> (Option<Entry<'a>>, Option<Entry<'a>>) {
        self.get(bytenr);
        let mut ahead = self.next.clone();
        ahead.next_if(|(&b, _)| b == bytenr);
        let above = ahead.next().map(|(&b, item)| (b, item));
        let below = *self.prev.get_or_insert_with(|| {
            let below = self.tree.items.range(..bytenr).next_back();
            below.map(|(&b, item)| (b, item))
        });
        (below, above)
    }

    fn seek(&mut self, bytenr: u64) {
        self.next = self.tree.items.range(bytenr..).peekable();
        self.at = bytenr;
        self.prev = None;
    }
}

/// The extent tree: extent items by bytenr.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentTree {
    items: BTreeMap<u64, ExtentItem>,
}

impl ExtentTree {
    /// An empty tree.
    pub fn new() -> ExtentTree {
        ExtentTree::default()
    }

    /// A tree of the `(bytenr, item)` pairs of `items`, in ascending
    /// bytenr order (checked in debug builds): built in one pass, not one
    /// insert per item.
    pub fn from_sorted(items: impl IntoIterator<Item = (u64, ExtentItem)>) -> ExtentTree {
        ExtentTree {
            items: items
                .into_iter()
                .inspect(|(bytenr, item)| debug_assert_eq!(item.check(), Ok(()), "extent {bytenr}"))
                .collect(),
        }
    }

    /// The item at `bytenr`.
    pub fn get(&self, bytenr: u64) -> Option<&ExtentItem> {
        self.items.get(&bytenr)
    }

    /// Insert or replace the item at `bytenr` (checked in debug builds).
    pub fn insert(&mut self, bytenr: u64, item: ExtentItem) -> Option<ExtentItem> {
        debug_assert_eq!(item.check(), Ok(()), "extent {bytenr}");
        self.items.insert(bytenr, item)
    }

    /// Apply `(bytenr, item or removal)` changes sorted by bytenr, and
    /// return what each change displaced, in the order of the changes: the
    /// same vector, each slot now holding the item that was at its bytenr
    /// (moved out, not copied: a durable layer may diff them against the
    /// new items; no second vector is allocated). When there are at least
    /// as many changes as items, the tree is rebuilt in one sorted merge
    /// (bulk-built B-tree) instead of one insert per change; below that,
    /// in-place replacement wins (a rebuild copies every item into freshly
    /// faulted memory). Unsorted input is applied one change at a time.
    pub fn apply_sorted(
        &mut self,
        mut changes: Vec<(u64, Option<ExtentItem>)>,
    ) -> Vec<(u64, Option<ExtentItem>)> {
        let sorted = changes.windows(2).all(|w| w[0].0 < w[1].0);
        if sorted && changes.len() < self.items.len() && changes.len() * 8 >= self.items.len() {
            self.apply_walking(&mut changes);
            return changes;
        }
        if !sorted || changes.len() < self.items.len() {
            self.apply_each(&mut changes);
            return changes;
        }
        let old = std::mem::take(&mut self.items);
        let mut old = old.into_iter().peekable();
        let mut merged: Vec<(u64, ExtentItem)> = Vec::with_capacity(old.len() + changes.len());
        for (bytenr, slot) in changes.iter_mut() {
            while let Some((b, _)) = old.peek() {
                if *b >= *bytenr {
                    break;
                }
                merged.extend(old.next());
            }
            let was = old.next_if(|(b, _)| *b == *bytenr).map(|(_, item)| item);
            if let Some(item) = slot.take() {
                debug_assert_eq!(item.check(), Ok(()), "extent {bytenr}");
                merged.push((*bytenr, item));
            }
            *slot = was;
        }
        merged.extend(old);
        self.items = merged.into_iter().collect();
        changes
    }

    /// One step of a larger sorted change set, applied in place as
    /// [`ExtentTree::apply_sorted`] does (each slot then holds what its
    /// change displaced): walking the tree (`walk`, for changes dense in
    /// it) or searching it per change. Never rebuilds the tree.
    pub fn apply_step(&mut self, changes: &mut [(u64, Option<ExtentItem>)], walk: bool) {
        if walk && changes.windows(2).all(|w| w[0].0 < w[1].0) {
            self.apply_walking(changes);
        } else {
            self.apply_each(changes);
        }
    }

    /// Changes applied one at a time (any order), each slot then holding
    /// what its change displaced.
    fn apply_each(&mut self, changes: &mut [(u64, Option<ExtentItem>)]) {
        for (bytenr, slot) in changes.iter_mut() {
            *slot = match slot.take() {
                Some(item) => self.insert(*bytenr, item),
                None => self.remove(*bytenr),
            };
        }
    }

    /// [`ExtentTree::apply_sorted`] for sorted changes dense in the tree:
    /// replacements swapped in place during one ordered walk (no search
    /// from the root per change), then the few removals and insertions.
    fn apply_walking(&mut self, changes: &mut [(u64, Option<ExtentItem>)]) {
        let (Some(&(first, _)), Some(&(last, _))) = (changes.first(), changes.last()) else {
            return;
        };
        let mut removes: Vec<usize> = Vec::new();
        let mut inserts: Vec<usize> = Vec::new();
        {
            let mut walk = self.items.range_mut(first..=last).peekable();
            for (i, (bytenr, slot)) in changes.iter_mut().enumerate() {
                while walk.peek().is_some_and(|(b, _)| **b < *bytenr) {
                    walk.next();
                }
                let present = walk.peek_mut().filter(|(b, _)| **b == *bytenr);
                match (present, slot.as_mut()) {
                    (Some((_, old)), Some(new)) => {
                        debug_assert_eq!(new.check(), Ok(()), "extent {bytenr}");
                        std::mem::swap(&mut **old, new);
                    }
                    (Some(_), None) => removes.push(i),
                    (None, Some(_)) => inserts.push(i),
                    (None, None) => {}
                }
            }
        }
        for i in removes {
            changes[i].1 = self.items.remove(&changes[i].0);
        }
        for i in inserts {
            let (bytenr, slot) = &mut changes[i];
            let item = slot.take().expect("an insertion has an item");
            // Absent (the walk did not find it): nothing is displaced.
            self.insert(*bytenr, item);
        }
    }

    /// Remove `n` items (or all there are), the first at or after `from`
    /// in bytenr order, wrapping around to the start; returns the bytenr
    /// after the last removed one (a clock hand for the next call).
    pub fn evict(&mut self, from: u64, n: usize) -> u64 {
        let n = n.min(self.items.len());
        let mut victims: Vec<u64> = self.items.range(from..).map(|(b, _)| *b).take(n).collect();
        if victims.len() < n {
            let rest = n - victims.len();
            victims.extend(self.items.range(..from).map(|(b, _)| *b).take(rest));
        }
        for b in &victims {
            self.items.remove(b);
        }
        victims.last().map_or(from, |b| b.wrapping_add(1))
    }

    /// Remove the item at `bytenr`.
    pub fn remove(&mut self, bytenr: u64) -> Option<ExtentItem> {
        self.items.remove(&bytenr)
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Extents in bytenr order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &ExtentItem)> + '_ {
        self.items.iter().map(|(b, i)| (*b, i))
    }

    /// A lookup cursor for ascending bytenrs: [`Walker::get`] answers like
    /// [`ExtentTree::get`], stepping forward through the tree instead of
    /// searching from the root when the next bytenr is close behind the
    /// last (a commit's heads are sorted).
    pub fn walker(&self) -> Walker<'_> {
        Walker {
            tree: self,
            next: self.items.range(0..).peekable(),
            at: 0,
            prev: Some(None),
        }
    }

    /// Extents with bytenr in `range`, in order.
    pub fn range(
        &self,
        range: impl std::ops::RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = (u64, &ExtentItem)> + '_ {
        self.items.range(range).map(|(b, i)| (*b, i))
    }

    /// Check every item ([`ExtentItem::check`]) but not how extents lie
    /// against each other: for trees that may legitimately overlap (a
    /// parsed dump under fuzzing). A tree refd commits never overlaps: an
    /// allocation that would overlap a live extent is refused
    /// (`RunError::OverlapsExtent`), and [`ExtentTree::check`] says so.
    pub fn check_items(&self) -> Result<(), (u64, ItemError)> {
        for (bytenr, item) in self.iter() {
            item.check().map_err(|e| (bytenr, e))?;
        }
        Ok(())
    }

    /// Check every item, and that extents do not overlap (each starts at
    /// or after the end of the one before).
    pub fn check(&self) -> Result<(), (u64, ItemError)> {
        let mut prev: Option<(u64, u64)> = None;
        for (bytenr, item) in self.iter() {
            item.check().map_err(|e| (bytenr, e))?;
            if let Some((p, n)) = prev {
                if p.saturating_add(n) > bytenr {
                    return Err((
                        bytenr,
                        ItemError::Overlaps {
                            prev: p,
                            prev_bytes: n,
                        },
                    ));
                }
            }
            prev = Some((bytenr, item.num_bytes));
        }
        Ok(())
    }

    /// Total of all `refs`.
    pub fn total_refs(&self) -> u64 {
        self.items.values().map(|i| i.refs).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data extent item with one ref of `count` from inode `objectid`.
    fn data_item(objectid: u64, count: i64) -> ExtentItem {
        let mut i = ExtentItem::new(1, ExtentKind::Data, 1);
        i.add_ref(
            RefKey::ExtentData {
                root: 5,
                objectid,
                offset: 0,
            },
            count,
        );
        i
    }

    /// The tree check finds overlapping extents (it said it did, and did
    /// not).
    #[test]
    fn check_finds_overlapping_extents() {
        let mut t = ExtentTree::new();
        t.insert(1 << 20, data_item(257, 1));
        t.insert((1 << 20) + 1, data_item(258, 1));
        assert_eq!(t.check(), Ok(()), "adjacent (1-byte items) is fine");
        let mut big = data_item(259, 1);
        big.num_bytes = 8192;
        t.insert(2 << 20, big);
        t.insert((2 << 20) + 4096, data_item(260, 1));
        assert_eq!(
            t.check(),
            Err((
                (2 << 20) + 4096,
                ItemError::Overlaps {
                    prev: 2 << 20,
                    prev_bytes: 8192
                }
            ))
        );
    }

    /// `add_refs` is `add_ref` of each change in order: random items
    /// (inline only, and spilled to keyed) and random net changes that
    /// add, raise, lower and remove backrefs of both places.
    #[test]
    fn add_refs_is_add_ref_in_order() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let key = |n: u64| {
            if n.is_multiple_of(5) {
                RefKey::SharedData { parent: n << 12 }
            } else {
                RefKey::ExtentData {
                    root: 5,
                    objectid: n,
                    offset: 0,
                }
            }
        };
        for case in 0..2000 {
            let mut item = ExtentItem::new(1, ExtentKind::Data, 1);
            let span = if case % 2 == 0 { 40 } else { 2000 };
            for _ in 0..rng.gen_range(0..span) {
                item.add_ref(key(rng.gen_range(0..span as u64)), rng.gen_range(1..3));
            }
            let mut net: Vec<(RefKey, i64)> = Vec::new();
            // Dense changes, and a few among many backrefs.
            let p = if case % 4 < 2 { 0.3 } else { 0.01 };
            for n in 0..span as u64 {
                if rng.gen_bool(p) {
                    let have = item.count(&key(n)) as i64;
                    let delta = rng.gen_range(-have..=3);
                    net.push((key(n), delta));
                }
            }
            net.sort_by_key(|a| a.0);
            let mut one_by_one = item.clone();
            for &(k, d) in &net {
                one_by_one.add_ref(k, d);
            }
            item.add_refs(&net);
            assert_eq!(item, one_by_one, "case {case}");
            if item.refs > 0 {
                item.check().unwrap();
            }
        }
    }

    /// Every apply path (walking, per change, bulk rebuild) gives the same
    /// tree and displaced items as one change at a time.
    #[test]
    fn apply_paths_agree() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        let item = |n: u64| data_item(n, 1 + (n % 3) as i64);
        for round in 0..300 {
            let mut t = ExtentTree::new();
            for _ in 0..rng.gen_range(0..400) {
                let b = rng.gen_range(0..1000u64);
                t.insert(b, item(b));
            }
            // From sparse to denser than the tree.
            let n = [1, 10, 60, 200, 900][round % 5];
            let mut bs: Vec<u64> = (0..n).map(|_| rng.gen_range(0..1000u64)).collect();
            bs.sort_unstable();
            bs.dedup();
            let changes: Vec<(u64, Option<ExtentItem>)> = bs
                .iter()
                .map(|&b| (b, rng.gen_bool(0.7).then(|| item(b + 7))))
                .collect();
            let mut want = t.clone();
            let want_displaced: Vec<(u64, Option<ExtentItem>)> = changes
                .iter()
                .map(|(b, i)| {
                    let old = match i {
                        Some(i) => want.insert(*b, i.clone()),
                        None => want.remove(*b),
                    };
                    (*b, old)
                })
                .collect();
            let displaced = t.apply_sorted(changes);
            assert_eq!(t, want, "round {round}");
            assert_eq!(displaced, want_displaced, "round {round}");
        }
    }

    /// A walker answers every lookup like `get`: ascending runs, small and
    /// large gaps, repeats and steps back.
    #[test]
    fn walker_agrees_with_get() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut t = ExtentTree::new();
        for _ in 0..2000 {
            let b = rng.gen_range(0..20_000u64);
            t.insert(b, data_item(b, 1));
        }
        let mut w = t.walker();
        let mut b = 0u64;
        for _ in 0..50_000 {
            b = match rng.gen_range(0..10) {
                0 => rng.gen_range(0..20_000),
                1 => b,
                2 => b.saturating_sub(rng.gen_range(0..50)),
                3 => b + rng.gen_range(0..5_000),
                _ => b + rng.gen_range(0..20),
            };
            assert_eq!(w.get(b), t.get(b), "bytenr {b}");
        }
    }

    #[test]
    fn evict_sweeps_like_a_clock_hand() {
        let mut t = ExtentTree::new();
        for b in 1..=10u64 {
            t.insert(b * 10, data_item(b, 1));
        }
        let hand = t.evict(35, 4);
        assert_eq!(hand, 71);
        let left: Vec<u64> = t.iter().map(|(b, _)| b).collect();
        assert_eq!(left, [10, 20, 30, 80, 90, 100]);
        // Wraps around past the end.
        let hand = t.evict(hand, 4);
        assert_eq!(hand, 11);
        assert_eq!(t.iter().map(|(b, _)| b).collect::<Vec<_>>(), [20, 30]);
        assert_eq!(t.evict(hand, 99), 31);
        assert!(t.is_empty());
        assert_eq!(t.evict(7, 1), 7, "nothing to evict");
    }

    #[test]
    fn inline_then_keyed() {
        let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
        let mut n = 0u64;
        while item.keyed.is_empty() {
            item.add_ref(
                RefKey::ExtentData {
                    root: 5,
                    objectid: 257 + n,
                    offset: 0,
                },
                1,
            );
            n += 1;
        }
        assert!(item.item_bytes() <= INLINE_ITEM_BYTES_MAX);
        assert_eq!(item.refs, n);
        item.check().unwrap();
        // Removing an inline ref does not move keyed ones back.
        item.add_ref(
            RefKey::ExtentData {
                root: 5,
                objectid: 257,
                offset: 0,
            },
            -1,
        );
        assert_eq!(item.keyed.len(), 1);
        item.check().unwrap();
        assert_eq!(item.backrefs().len() as u64, n - 1);
    }

    #[test]
    fn apply_sorted_bulk_and_unsorted() {
        let item = |n: u64| {
            let mut i = ExtentItem::new(4096, ExtentKind::Data, 1);
            i.add_ref(
                RefKey::ExtentData {
                    root: 5,
                    objectid: 256 + n,
                    offset: 0,
                },
                1,
            );
            i
        };
        let mut t = ExtentTree::new();
        for b in [1u64, 3, 5] {
            t.insert(b << 12, item(b));
        }
        // Bulk: replace 3, remove 5, add 2 and 9.
        let displaced = t.apply_sorted(vec![
            (2 << 12, Some(item(2))),
            (3 << 12, Some(item(7))),
            (5 << 12, None),
            (9 << 12, Some(item(9))),
        ]);
        let keys: Vec<u64> = t.iter().map(|(b, _)| b >> 12).collect();
        assert_eq!(keys, vec![1, 2, 3, 9]);
        assert_eq!(
            displaced,
            vec![
                (2 << 12, None),
                (3 << 12, Some(item(3))),
                (5 << 12, Some(item(5))),
                (9 << 12, None)
            ]
        );
        assert_eq!(
            t.get(3 << 12).unwrap().backrefs()[0].0,
            RefKey::ExtentData {
                root: 5,
                objectid: 263,
                offset: 0
            }
        );
        // Unsorted input still applies every change.
        let displaced = t.apply_sorted(vec![
            (9 << 12, None),
            (4 << 12, Some(item(4))),
            (1 << 12, None),
        ]);
        assert_eq!(
            displaced,
            vec![
                (9 << 12, Some(item(9))),
                (4 << 12, None),
                (1 << 12, Some(item(1)))
            ]
        );
        let keys: Vec<u64> = t.iter().map(|(b, _)| b >> 12).collect();
        assert_eq!(keys, vec![2, 3, 4]);
    }

    #[test]
    fn check_catches_bad_items() {
        let mut item = ExtentItem::new(16384, ExtentKind::Tree { level: 0 }, 1);
        assert_eq!(item.check(), Err(ItemError::ZeroRefs));
        item.add_ref(RefKey::TreeBlock { root: 5 }, 1);
        item.check().unwrap();
        let mut bad = item.clone();
        bad.inline[0].1 = 2;
        bad.refs = 2;
        assert!(matches!(bad.check(), Err(ItemError::BadCount { .. })));
        let mut bad = item.clone();
        bad.refs = 3;
        assert!(matches!(bad.check(), Err(ItemError::RefsMismatch { .. })));
        let mut bad = item.clone();
        bad.flags = EXTENT_FLAG_DATA;
        assert!(matches!(bad.check(), Err(ItemError::BadFlags { .. })));
    }
}
