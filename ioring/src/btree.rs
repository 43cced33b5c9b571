//! The on-device copy-on-write B+tree (design: `docs/btree.md`; bytes:
//! `docs/format.md`, "B+tree items" and "Free-space bitmap").
//!
//! Generic over [`Storage`](crate::Storage) and ignorant of what its values
//! mean: keys are btrfs-style `(objectid, item_type, offset)` triples, values
//! opaque byte strings of at most [`VALUE_BYTES_MAX`] bytes. btrfs's
//! vocabulary is kept where the concept is the same (key, item, leaf, node,
//! level, generation, owner, CoW).
//!
//! Files:
//!
//! - `key`: [`Key`] and its encoding;
//! - [`node`]: the in-memory node, the item layout inside
//!   a 16 KiB node, split planning;
//! - `alloc`: the node allocator and its persisted bitmap run;
//! - `cache`: the bounded node cache (refcount + interlock per node);
//! - `tree`: [`BTree`]: open, reads, commit, abort, pending-free release;
//! - `apply`: mutations (one path for single and bulk sorted changes:
//!   CoW, splits, merges, root growth and shrink);
//! - `check`: [`BTree::check`], the fsck walk.
//!
//! Invariants (asserted by `check`):
//!
//! - a node written by a committed generation is never overwritten: every
//!   modified node gets a new address, and the old one is reused only after
//!   [`BTree::release_pending`] for the commit that freed it;
//! - every reference (superblock root, parent pointer) records the child's
//!   generation, checked on every read after the checksum and address;
//! - keys are strictly ascending within a node, and a parent's key for a
//!   child is exactly the child's first key; every key of child `i` is below
//!   the key of child `i + 1`;
//! - the allocator's set of allocated slots is exactly: reachable nodes,
//!   the bitmap run, nodes pending release and the open transaction's dirty
//!   nodes.

pub(crate) mod alloc;
mod apply;
mod cache;
mod check;
mod error;
mod key;
pub mod node;
mod tree;

#[cfg(test)]
mod tests;

pub use alloc::{AllocCounts, AllocInfo, BITMAP_BITS_PER_NODE, BITMAP_OWNER};
pub use apply::{ApplyReport, Change};
pub use cache::CacheStats;
pub use check::TreeCheck;
pub use error::BTreeError;
pub use key::{Key, KEY_BYTES};
pub use node::{
    INTERNAL_CHILDREN_MAX, INTERNAL_ITEM_BYTES, LEAF_ITEMS_MAX, LEAF_ITEM_BYTES_MAX,
    LEAF_ITEM_OVERHEAD_BYTES, NODE_FILL_MIN_BYTES, VALUE_BYTES_MAX,
};
pub use tree::{BTree, CommitInfo, Range, RootInfo, TreeConfig, TreeLocation, TreeSpace};
