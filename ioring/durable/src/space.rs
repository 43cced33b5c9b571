//! Space reservation in the node region (btrfs's metadata reservations):
//! an op is acknowledged only if the commit that will write it into the
//! copy-on-write B+tree is sure to find the free nodes it needs. Ingest
//! reserves before it logs, in **units** (one per op, one per SUBMIT or
//! service record); a commit takes the live units at its cut and gives
//! them back once its nodes are written (the allocator then counts what
//! it really used). The reasoning behind [`commit_nodes_max`] is in
//! `docs/durable.md`, "Space reservation".
//!
//! Everything here is a pure function of its inputs ([`commit_nodes_max`],
//! [`units_fitting`]), plus the counters `Gate` keeps with the cut lock
//! of the engine (reservations change under its read side, the cut moves
//! them under its write side, so the split is exact).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use refd_ioring::btree::{
    TreeSpace, INTERNAL_ITEM_BYTES, LEAF_ITEM_BYTES_MAX, LEAF_ITEM_OVERHEAD_BYTES,
    NODE_FILL_MIN_BYTES,
};
use refd_ioring::format::{NODE_ITEMS_BYTES, TREE_LEVEL_MAX};

use crate::codec::service::FREED_ENTRY_BYTES_MAX;

/// B+tree items one unit (an op) can change: its extent item, one keyed
/// backref item, and an entry of this commit's freed list.
pub const UNIT_ITEMS: u64 = 3;
/// Largest extent item value with one inline backref: flags byte, two
/// varints, the tree block's num_bytes varint and key, the largest inline
/// backref (an `EXTENT_DATA_REF`: type, root, objectid, offset, count).
pub const EXTENT_ITEM_ONE_REF_BYTES_MAX: usize = 1 + 10 + 10 + 10 + 17 + (1 + 8 + 8 + 8 + 4);
/// Largest keyed backref item value (an `EXTENT_DATA_REF`'s root,
/// objectid, offset and count; checked by a test against the codec).
pub const KEYED_VALUE_BYTES_MAX: usize = 8 + 8 + 8 + 4;
/// Bytes one unit can add to the leaves: a new extent item or a new keyed
/// backref item (an inline backref, 29 bytes, is less), plus a freed-list
/// entry and its share of a freed chunk's item overhead. A SUBMIT's
/// session reply (three varints) or a new session item is less.
pub const UNIT_BYTES: u64 = 160;
const _: () = assert!(
    LEAF_ITEM_OVERHEAD_BYTES
        + EXTENT_ITEM_ONE_REF_BYTES_MAX
        + FREED_ENTRY_BYTES_MAX
        + LEAF_ITEM_OVERHEAD_BYTES
        <= UNIT_BYTES as usize
);
const _: () = assert!(KEYED_VALUE_BYTES_MAX <= EXTENT_ITEM_ONE_REF_BYTES_MAX);
/// Items every commit may change besides its units': the extent count,
/// the meta item, this commit's freed list (its entries are counted per
/// unit), the freed lists it drops (one contiguous key range: its two
/// boundary leaves), the held-heads stream's deletes (one range), and one
/// to spare.
pub const COMMIT_ITEMS: u64 = 8;
/// A leaf that overflows is cut into pieces of more than this many bytes
/// each but the last (an item is at most `LEAF_ITEM_BYTES_MAX`).
const SPLIT_PIECE_BYTES_MIN: u64 = (NODE_ITEMS_BYTES - LEAF_ITEM_BYTES_MAX) as u64;
/// Children of an internal node that is not the root (at least a quarter
/// full, `docs/btree.md`).
const FANOUT_MIN: u64 = (NODE_FILL_MIN_BYTES / INTERNAL_ITEM_BYTES) as u64;
/// Units a REGISTER, SUBSCRIBE, FREED_ACK or UNSUBSCRIBE record reserves:
/// a session or consumer item, and the one it evicts.
pub const SERVICE_RECORD_UNITS: u64 = 2;

/// What the commit will change besides its units' items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extra {
    /// Items (the held-heads stream's chunks).
    pub items: u64,
    /// Bytes those items may add.
    pub bytes: u64,
}

/// The tree a commit starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    /// Nodes reachable from its root.
    pub nodes: u64,
    /// Its levels (0: empty).
    pub levels: u64,
    /// Slots of a bitmap run.
    pub run_nodes: u64,
}

impl Shape {
    /// The working tree `space` shows: what a commit that starts now
    /// starts from.
    fn of(space: &TreeSpace) -> Shape {
        Shape {
            nodes: space.working_nodes,
            levels: space.levels,
            run_nodes: space.run_nodes,
        }
    }
}

/// Most levels a tree of at most `nodes_max` nodes can have: every
/// internal node but the root has at least [`FANOUT_MIN`] children and an
/// internal root at least 2, so `d` levels need `2 × FANOUT_MIN^(d-2)`
/// leaves. Never below `levels + 1` (a commit may add one).
fn levels_max(levels: u64, nodes_max: u64) -> u64 {
    let mut d = 1u64;
    // The fewest leaves of a tree of d + 1 levels.
    let mut next = 2u64;
    while next <= nodes_max && d < u64::from(TREE_LEVEL_MAX) + 1 {
        d += 1;
        next = next.saturating_mul(FANOUT_MIN);
    }
    d.max(levels + 1).min(u64::from(TREE_LEVEL_MAX) + 1)
}

/// An upper bound of the free nodes a commit of `units` reserved units
/// (and `extra`) can allocate at once, starting from the tree `shape`:
/// the dirty nodes it can hold at any moment plus the bitmap run it
/// writes (which normally takes the allocator's spare window, not free
/// nodes; kept as a conservative term for a tree without one). See
/// `docs/durable.md`, "Space reservation", for why each term is there.
/// Monotone in `units` and in every field of `shape`.
pub fn commit_nodes_max(units: u64, extra: Extra, shape: Shape) -> u64 {
    let items = units
        .saturating_mul(UNIT_ITEMS)
        .saturating_add(COMMIT_ITEMS)
        .saturating_add(extra.items);
    let bytes = units.saturating_mul(UNIT_BYTES).saturating_add(extra.bytes);
    // Leaves beyond the existing ones, from the bytes the commit adds.
    let grown = bytes.div_ceil(SPLIT_PIECE_BYTES_MIN).saturating_mul(2);
    let leaves_after = shape.nodes.saturating_mul(2).saturating_add(grown);
    let internal_grown = leaves_after.div_ceil(FANOUT_MIN).saturating_mul(2);
    let levels = levels_max(shape.levels, leaves_after.saturating_add(internal_grown));
    // Each changed item rewrites its path, at most 2 nodes per level (a
    // split of the touched node, or its merge with a neighbour), plus new
    // root levels.
    let by_items = items
        .saturating_mul(2)
        .saturating_mul(levels)
        .saturating_add(levels);
    // Each existing node becomes at most 2 dirty nodes; the bytes added
    // make new leaves, and those new children make internal nodes split.
    let by_size = shape
        .nodes
        .saturating_mul(2)
        .saturating_add(grown)
        .saturating_add(internal_grown)
        .saturating_add(levels.saturating_mul(2));
    // A rewrite allocates the new pieces of a node before its parent's
    // old dirty copy is freed: one node per level in flight.
    by_items
        .min(by_size)
        .saturating_add(levels + 1)
        .saturating_add(shape.run_nodes)
}

/// The live units that fit: the most `u` with `frozen_left +
/// commit_nodes_max(u, ..) + headroom ≤ free`, or `None` if not even 0
/// does. `frozen_left` is what the commit in flight may still allocate,
/// and `live` the tree the next commit starts from.
pub fn units_fitting(
    free_nodes: u64,
    frozen_left: u64,
    headroom: u64,
    extra: Extra,
    live: Shape,
) -> Option<u64> {
    let need = |u: u64| {
        frozen_left
            .saturating_add(commit_nodes_max(u, extra, live))
            .saturating_add(headroom)
    };
    if need(0) > free_nodes {
        return None;
    }
    let (mut lo, mut hi) = (0u64, 1u64 << 40);
    if need(hi) <= free_nodes {
        return Some(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if need(mid) <= free_nodes {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// Nodes a SUBMIT that allocates or adds must leave free: pure drops may
/// use them (btrfs's global reserve lets an unlink go on when the
/// metadata is full), so that a full tree can still be shrunk. A
/// sixteenth of the region.
pub fn drops_headroom(region_nodes: u64) -> u64 {
    region_nodes / 16
}

/// A SUBMIT or op refused for lack of node space: what the commit would
/// need and what is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSpace {
    /// Free nodes in the node region now.
    pub nodes_free: u64,
    /// Free nodes the pending ops plus this request could need.
    pub nodes_needed: u64,
    /// Nodes of the node region.
    pub region_nodes: u64,
}

impl std::fmt::Display for NoSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node region full: committing these ops could need {} free nodes of 16 KiB, {} of {} \
             are free (after committing what was pending); the region belongs to the extent \
             tree itself, so no consumer can free it: extend the device and restart with \
             `refd serve --grow`, or drop references",
            self.nodes_needed, self.nodes_free, self.region_nodes
        )
    }
}

/// Units of heads a seq barrier held: each changes its extent item and
/// one item per ref, like that many ops.
pub fn held_units(heads: &[refd_core::head::Head]) -> u64 {
    heads.iter().map(|h| h.refs.len() as u64 + 1).sum()
}

/// The node region's space and the reservations on it
/// ([`crate::DurableEngine::node_space`], STATS `space`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeSpace {
    /// Nodes (16 KiB slots) of the node region.
    pub region_nodes: u64,
    /// Free now.
    pub free_nodes: u64,
    /// Freed by commits, free again once their superblock is durable.
    pub pending_nodes: u64,
    /// Reachable from the working tree (the committed tree, with the
    /// running commit's changes so far).
    pub tree_nodes: u64,
    /// What the reservations of the ops not yet committed could need
    /// ([`commit_nodes_max`]): the running commit's rest plus the next.
    pub reserved_nodes: u64,
    /// Units reserved since the last cut.
    pub reserved_units: u64,
    /// Requests refused for lack of node space since open.
    pub refused: u64,
}

/// The reservations: live units (since the last cut), the bound of the
/// commit in flight, and the fast-path limits derived from them.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Units reserved since the last cut.
    live: AtomicU64,
    /// [`commit_nodes_max`] of the commit in flight (0: none); once its
    /// apply is done, its dirty nodes plus its bitmap run.
    frozen_nodes: AtomicU64,
    /// Once the apply of the commit in flight is done: the committed
    /// nodes it replaced, free again before the next commit starts (it
    /// releases them after its superblock, and commits run one at a
    /// time). 0 before and after.
    frozen_release: AtomicU64,
    /// Signalled when the commit in flight finished its apply or its
    /// writes (the limits may have grown).
    changed: (Mutex<u64>, std::sync::Condvar),
    /// Live units that fit any SUBMIT (with the drops' headroom); 0 until
    /// computed (the slow path).
    limit_all: AtomicU64,
    /// Live units that fit a drops-only SUBMIT.
    limit_drops: AtomicU64,
    /// Serializes computing the limits with invalidating them.
    slow: Mutex<()>,
    /// The held-heads stream's chunks the last commit wrote (the next
    /// rewrites them).
    held_chunks: AtomicU64,
    /// Units of the heads the last commit held (they are pending again,
    /// without a reservation of their own).
    held_units: AtomicU64,
    /// Requests refused.
    pub(crate) refused: AtomicU64,
}

/// How a reservation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserve {
    Fits,
    Full(NoSpace),
}

impl Gate {
    /// Units reserved since the last cut.
    pub(crate) fn live_units(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Nodes the commit in flight reserved (0: none).
    pub(crate) fn frozen_nodes(&self) -> u64 {
        self.frozen_nodes.load(Ordering::Acquire)
    }

    /// What the next commit writes besides the live units: the held
    /// heads' stream (chunks of at most a quarter node) and the held
    /// heads themselves (as units).
    fn extra(&self) -> Extra {
        let chunks = self.held_chunks.load(Ordering::Relaxed);
        let units = self.held_units.load(Ordering::Relaxed);
        Extra {
            items: chunks.saturating_add(units.saturating_mul(UNIT_ITEMS)),
            bytes: chunks
                .saturating_mul(NODE_ITEMS_BYTES as u64 / 4)
                .saturating_add(units.saturating_mul(UNIT_BYTES)),
        }
    }

    /// Reserves `units` without a check: ops already acknowledged
    /// (replayed) and service records.
    pub(crate) fn force(&self, units: u64) {
        self.live.fetch_add(units, Ordering::Relaxed);
    }

    /// Gives back units of a request that was not logged after all.
    pub(crate) fn unreserve(&self, units: u64) {
        self.live.fetch_sub(units, Ordering::Relaxed);
    }

    /// Reserves `units` if the live units with them fit (call it under the
    /// cut lock's read side). `space` is read only on the slow path.
    pub(crate) fn reserve(
        &self,
        units: u64,
        drops_only: bool,
        space: impl FnOnce() -> TreeSpace,
    ) -> Reserve {
        let after = self.live.fetch_add(units, Ordering::Relaxed) + units;
        let limit = if drops_only {
            &self.limit_drops
        } else {
            &self.limit_all
        };
        if after <= limit.load(Ordering::Acquire) {
            return Reserve::Fits;
        }
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        // The frozen bound first, then the space: a commit publishes its
        // space before it clears its bound, so this never pairs a cleared
        // bound with the space before the commit's writes.
        let (frozen, release) = (self.frozen_nodes(), self.frozen_release());
        let space = space();
        let (all, drops) = self.limits(frozen, release, &space);
        self.limit_all.store(all.unwrap_or(0), Ordering::Release);
        self.limit_drops
            .store(drops.unwrap_or(0), Ordering::Release);
        let fits = if drops_only { drops } else { all };
        if fits.is_some_and(|u| after <= u) {
            return Reserve::Fits;
        }
        self.live.fetch_sub(units, Ordering::Relaxed);
        let (frozen_left, live) = Self::live_shape(frozen, &space);
        let headroom = if drops_only {
            0
        } else {
            drops_headroom(space.region_nodes)
        };
        let nodes_needed = frozen_left
            .saturating_add(commit_nodes_max(after, self.extra(), live))
            .saturating_add(headroom);
        Reserve::Full(NoSpace {
            nodes_free: space.free_nodes.saturating_add(release),
            nodes_needed,
            region_nodes: space.region_nodes,
        })
    }

    /// What the commit in flight may still allocate, and the tree the
    /// next commit starts from (its nodes: the working tree's plus what
    /// the commit in flight may still add).
    fn live_shape(frozen: u64, space: &TreeSpace) -> (u64, Shape) {
        let frozen_left = frozen.saturating_sub(space.dirty_nodes);
        let shape = Shape {
            nodes: space.working_nodes.saturating_add(frozen_left),
            levels: space.levels + u64::from(frozen_left > 0),
            run_nodes: space.run_nodes,
        };
        (frozen_left, shape)
    }

    fn frozen_release(&self) -> u64 {
        self.frozen_release.load(Ordering::Acquire)
    }

    fn limits(&self, frozen: u64, release: u64, space: &TreeSpace) -> (Option<u64>, Option<u64>) {
        let (frozen_left, live) = Self::live_shape(frozen, space);
        let extra = self.extra();
        let headroom = drops_headroom(space.region_nodes);
        let free = space.free_nodes.saturating_add(release);
        (
            units_fitting(free, frozen_left, headroom, extra, live),
            units_fitting(free, frozen_left, 0, extra, live),
        )
    }

    /// The commit in flight knows its item changes, before it applies any
    /// (`space` is the tree it starts from): `items` changed, adding at
    /// most `bytes` to the leaves (each put's value and item overhead).
    /// The bound of its units only bounded those two from the ops
    /// ([`UNIT_ITEMS`], [`UNIT_BYTES`] each), so [`commit_nodes_max`] of
    /// the real ones bounds the commit as well; it replaces the units'
    /// bound when smaller. Most ops change a count, not an item's size,
    /// so it usually is, by far (`docs/durable.md`, "Space reservation").
    pub(crate) fn exact(&self, items: u64, bytes: u64, space: &TreeSpace) {
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        let frozen = self.frozen_nodes();
        if frozen == 0 {
            return;
        }
        let shape = Shape::of(space);
        let bound = commit_nodes_max(0, Extra { items, bytes }, shape);
        if bound >= frozen {
            return;
        }
        self.frozen_nodes.store(bound.max(1), Ordering::Release);
        self.limit_all.store(0, Ordering::Release);
        self.limit_drops.store(0, Ordering::Release);
        drop(_slow);
        self.signal();
    }

    /// The commit in flight applied every change (`space` published
    /// after its last apply): what it may still allocate is its bitmap
    /// run, and the committed nodes it replaced are free again before
    /// the next commit. The limits only grow.
    pub(crate) fn applied(&self, space: &TreeSpace) {
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        // Release before the smaller bound: a reader that sees the new
        // bound also sees the release (both only loosen the limits).
        self.frozen_release
            .store(space.replaced_nodes, Ordering::Release);
        self.frozen_nodes.store(
            space.dirty_nodes.saturating_add(space.run_nodes).max(1),
            Ordering::Release,
        );
        self.limit_all.store(0, Ordering::Release);
        self.limit_drops.store(0, Ordering::Release);
        drop(_slow);
        self.signal();
    }

    fn signal(&self) {
        let (m, cv) = &self.changed;
        *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    /// Waits (at most `limit`) until the commit in flight finishes its
    /// apply or its writes.
    pub(crate) fn wait_changed(&self, limit: std::time::Duration) {
        let (m, cv) = &self.changed;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let seen = *g;
        let _ = cv
            .wait_timeout_while(g, limit, |n| *n == seen)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// The cut (under the cut lock's write side): the live units become
    /// the commit's, bounded from the tree it starts from. Returns them.
    pub(crate) fn cut(&self, space: &TreeSpace) -> u64 {
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        let units = self.live.swap(0, Ordering::Relaxed);
        let shape = Shape::of(space);
        let bound = commit_nodes_max(units, self.extra(), shape);
        self.frozen_release.store(0, Ordering::Release);
        self.frozen_nodes.store(bound, Ordering::Release);
        self.limit_all.store(0, Ordering::Release);
        self.limit_drops.store(0, Ordering::Release);
        units
    }

    /// The commit's nodes are written (the tree's space says what they
    /// took): its reservation goes. `held_chunks` is the held-heads stream
    /// it wrote and `held_units` the heads it held ([`held_units`]),
    /// which the next commit writes.
    pub(crate) fn committed(&self, held_chunks: u64, held_units: u64) {
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        self.held_chunks.store(held_chunks, Ordering::Relaxed);
        self.held_units.store(held_units, Ordering::Relaxed);
        // The replaced nodes are pending now, counted free again by the
        // tree once released: no credit any more.
        self.frozen_release.store(0, Ordering::Release);
        self.frozen_nodes.store(0, Ordering::Release);
        // A larger extra makes the limits smaller.
        self.limit_all.store(0, Ordering::Release);
        self.limit_drops.store(0, Ordering::Release);
        drop(_slow);
        self.signal();
    }

    /// Nodes the reservations could need now (STATS): the commit in
    /// flight's rest plus the live units' commit.
    pub(crate) fn reserved_nodes(&self, space: &TreeSpace) -> u64 {
        let (frozen_left, live) = Self::live_shape(self.frozen_nodes(), space);
        frozen_left.saturating_add(commit_nodes_max(self.live_units(), self.extra(), live))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values_fit_the_unit() {
        use refd_core::model::RefKey;
        let key = RefKey::ExtentData {
            root: u64::MAX,
            objectid: u64::MAX,
            offset: u64::MAX,
        };
        let (_, v) =
            crate::codec::keyed_backref_item(1 << 20, key, u64::from(u32::MAX)).expect("encodes");
        assert!(v.len() <= KEYED_VALUE_BYTES_MAX, "{}", v.len());
    }

    #[test]
    fn the_bound_is_monotone_and_capped_by_the_tree() {
        let shape = Shape {
            nodes: 12_000,
            levels: 3,
            run_nodes: 1,
        };
        let mut last = 0;
        for units in [0, 1, 10, 1000, 100_000, 1_000_000, 10_000_000] {
            let b = commit_nodes_max(units, Extra::default(), shape);
            assert!(b >= last, "{units}: {b} < {last}");
            last = b;
        }
        // A million ops on a tree of 12k nodes: the tree's size, not the
        // ops, bounds it (a 1 GiB region holds 65k nodes).
        let b = commit_nodes_max(1_000_000, Extra::default(), shape);
        assert!(b < 2 * 12_000 + 30_000, "{b}");
        // One op: its paths.
        let b = commit_nodes_max(1, Extra::default(), shape);
        assert!(b < 200, "{b}");
    }

    #[test]
    fn units_fitting_is_the_largest_that_fits() {
        let shape = Shape {
            nodes: 100,
            levels: 2,
            run_nodes: 1,
        };
        let u = units_fitting(1000, 10, 5, Extra::default(), shape).expect("some fit");
        assert!(10 + commit_nodes_max(u, Extra::default(), shape) + 5 <= 1000);
        assert!(10 + commit_nodes_max(u + 1, Extra::default(), shape) + 5 > 1000);
        assert_eq!(units_fitting(10, 10, 0, Extra::default(), shape), None);
    }
}
