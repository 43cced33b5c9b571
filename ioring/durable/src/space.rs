//! Space reservation in the node region (btrfs's metadata reservations):
//! an op is acknowledged only if the commit that will write it into the
//! copy-on-write B+tree is sure to find the free nodes it needs. Ingest
//! reserves before it logs a [`Charge`]: **units** (one per op, one per
//! SUBMIT or service record; each changes at most [`UNIT_ITEMS`] items)
//! and the **bytes** they can add to the leaves, by the op's action (an
//! allocation a new extent item, a reference a new backref, a drop a
//! freed-list entry). A commit takes the live charge at its cut and gives
//! it back once its nodes are written (the allocator then counts what it
//! really used). The reasoning behind [`commit_nodes_max`] is in
//! `docs/durable.md`, "Space reservation".
//!
//! Everything here is a pure function of its inputs ([`commit_nodes_max`],
//! [`largest_fitting`]), plus the counters `Gate` keeps with the cut lock
//! of the engine (reservations change under its read side, the cut moves
//! them under its write side, so the split is exact).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use refd_core::model::{Action, Op};
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
/// Bytes any unit can add to the leaves, and what an allocation
/// (`AddExtent`) reserves: a new extent item with one inline backref and
/// its item overhead, plus a freed-list entry (the extent may be freed in
/// the same commit). A keyed backref item is less; a SUBMIT's session
/// reply (three varints) or a new session item is less.
pub const UNIT_BYTES: u64 = 160;
const _: () = assert!(KEYED_VALUE_BYTES_MAX <= EXTENT_ITEM_ONE_REF_BYTES_MAX);
/// A freed-list entry with, at worst, a chunk item of its own: the item
/// overhead, the chunk's version byte and its count varint.
const FREED_ENTRY_ALONE_BYTES: usize = FREED_ENTRY_BYTES_MAX + LEAF_ITEM_OVERHEAD_BYTES + 1 + 10;
const _: () = assert!(
    LEAF_ITEM_OVERHEAD_BYTES + EXTENT_ITEM_ONE_REF_BYTES_MAX + FREED_ENTRY_ALONE_BYTES
        <= UNIT_BYTES as usize
);
/// Largest inline backref (an `EXTENT_DATA_REF`: type byte, root,
/// objectid, offset, count; `RefKey::inline_bytes`, checked by a test).
pub const INLINE_BACKREF_BYTES_MAX: usize = 1 + 8 + 8 + 8 + 4;
/// Largest growth of an extent item by an extent_op (`UpdateHead`): a
/// tree block key where there was none (objectid, type, offset) and the
/// flags varint growing from 1 byte to at most 10.
pub const EXTENT_OP_BYTES_MAX: usize = 8 + 1 + 8 + 10;
/// Bytes an `AddRef` or an `UpdateHead` can add: a reference to an
/// extent that is not allocated in the same commit never creates an
/// extent item (the run refuses it, `AddToMissingExtent`), and an op
/// changes one backref, so it adds at most a keyed backref item (value
/// and item overhead) or an inline backref; an extent_op adds at most
/// [`EXTENT_OP_BYTES_MAX`]. A backref's count is a fixed-width field, so
/// a count change adds nothing.
pub const ADD_REF_BYTES: u64 = 48;
const _: () = assert!(LEAF_ITEM_OVERHEAD_BYTES + KEYED_VALUE_BYTES_MAX <= ADD_REF_BYTES as usize);
const _: () = assert!(INLINE_BACKREF_BYTES_MAX <= ADD_REF_BYTES as usize);
const _: () = assert!(EXTENT_OP_BYTES_MAX <= ADD_REF_BYTES as usize);
/// Bytes a `DropRef` can add: a drop only shrinks its backref and extent
/// item, but the extent it frees gets an entry in the commit's freed list
/// (every freed extent has at least one drop in its commit: its last
/// reference, or the drop of an allocation that never reached the tree).
pub const DROP_REF_BYTES: u64 = 56;
const _: () = assert!(FREED_ENTRY_ALONE_BYTES <= DROP_REF_BYTES as usize);
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

/// What a request reserves (and what the ops since the last cut have
/// reserved): units, each changing at most [`UNIT_ITEMS`] items, and the
/// bytes they can add to the leaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    /// Units: ops, SUBMIT records, service records.
    pub units: u64,
    /// Bytes they can add to the leaves, at most [`UNIT_BYTES`] a unit.
    pub bytes: u64,
}

impl Charge {
    /// `units` that may each add [`UNIT_BYTES`]: records, replayed ops.
    pub fn units(units: u64) -> Charge {
        Charge {
            units,
            bytes: units.saturating_mul(UNIT_BYTES),
        }
    }

    /// One op: a unit, with the bytes its action can add.
    pub fn op(op: &Op) -> Charge {
        Charge {
            units: 1,
            bytes: action_bytes(op.action),
        }
    }

    /// The ops of a SUBMIT and its record (the session reply).
    pub fn submit(ops: &[Op]) -> Charge {
        ops.iter()
            .map(Charge::op)
            .fold(Charge::units(1), Charge::plus)
    }

    /// Both charges.
    pub fn plus(self, other: Charge) -> Charge {
        Charge {
            units: self.units.saturating_add(other.units),
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }
}

/// Bytes an op with `action` can add to the leaves: [`UNIT_BYTES`] for
/// an allocation, [`ADD_REF_BYTES`] for a reference or an extent_op,
/// [`DROP_REF_BYTES`] for a drop.
pub fn action_bytes(action: Action) -> u64 {
    match action {
        Action::AddExtent => UNIT_BYTES,
        Action::AddRef | Action::UpdateHead => ADD_REF_BYTES,
        Action::DropRef => DROP_REF_BYTES,
    }
}

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

/// An upper bound of the free nodes a commit of the reserved `charge`
/// (and `extra`) can allocate at once, starting from the tree `shape`:
/// the dirty nodes it can hold at any moment plus the bitmap run it
/// writes (which normally takes the allocator's spare window, not free
/// nodes; kept as a conservative term for a tree without one). See
/// `docs/durable.md`, "Space reservation", for why each term is there.
/// Monotone in both fields of `charge` and in every field of `shape`.
pub fn commit_nodes_max(charge: Charge, extra: Extra, shape: Shape) -> u64 {
    let items = charge
        .units
        .saturating_mul(UNIT_ITEMS)
        .saturating_add(COMMIT_ITEMS)
        .saturating_add(extra.items);
    let bytes = charge.bytes.saturating_add(extra.bytes);
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

/// The largest `x` (below 2^40) for which `fits(x)`, for a `fits` that
/// holds up to some point and not after it; `None` if not even 0 fits.
pub fn largest_fitting(fits: impl Fn(u64) -> bool) -> Option<u64> {
    if !fits(0) {
        return None;
    }
    let (mut lo, mut hi) = (0u64, 1u64 << 40);
    if fits(hi) {
        return Some(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// Units so many that the by-items term never bounds a commit (its
/// products saturate): a charge of them is bounded by its bytes alone.
const UNITS_UNBOUNDED: u64 = u64::MAX / 4;

/// The limits of the live charge for one kind of request: a charge fits
/// if its units fit at [`UNIT_BYTES`] each, or if its bytes fit with any
/// number of units (the bound is monotone in both, so either is enough).
/// `frozen_left` is what the commit in flight may still allocate, and
/// `live` the tree the next commit starts from.
pub fn charge_limits(
    free_nodes: u64,
    frozen_left: u64,
    headroom: u64,
    extra: Extra,
    live: Shape,
) -> Option<Limits> {
    let fits = |c: Charge| {
        frozen_left
            .saturating_add(commit_nodes_max(c, extra, live))
            .saturating_add(headroom)
            <= free_nodes
    };
    let units = largest_fitting(|u| fits(Charge::units(u)))?;
    let bytes = largest_fitting(|b| {
        fits(Charge {
            units: UNITS_UNBOUNDED,
            bytes: b,
        })
    })
    .unwrap_or(0);
    Some(Limits { units, bytes })
}

/// See [`charge_limits`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Units that fit at [`UNIT_BYTES`] each.
    pub units: u64,
    /// Bytes that fit with any number of units.
    pub bytes: u64,
}

impl Limits {
    /// Whether `c` is within the limits.
    pub fn admit(&self, c: Charge) -> bool {
        c.units <= self.units || c.bytes <= self.bytes
    }
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
    /// Bytes those units can add to the leaves.
    pub reserved_bytes: u64,
    /// Requests refused for lack of node space since open.
    pub refused: u64,
    /// Slots of a free-space bitmap run, `K` (`docs/btree.md`,
    /// "Allocator"): the size of each spare window.
    pub bitmap_run_nodes: u64,
    /// Slots of the spare windows kept for the next bitmap runs (`K`
    /// each; counted neither free nor in the tree).
    pub spare_nodes: u64,
    /// The "no spare window" fallback is in force: the next commit's
    /// bitmap run (or the running one's) goes first fit into free slots,
    /// and may fail with `NoSpace`, until a released run becomes a spare.
    pub no_spare_window: bool,
}

/// The live charge in one word, so that a reservation adds to both of
/// its fields and reads them back in one step (and the last reservation
/// admitted saw every one before it): units in the high 32 bits, bytes
/// in 8-byte words in the low 32. Each field saturates (2^32 units, or
/// 32 GiB of leaves, are far beyond what any node region admits: such a
/// charge is refused until the next cut).
#[derive(Debug, Default)]
struct LiveCharge(AtomicU64);

const HALF: u64 = u32::MAX as u64;
const WORD_BYTES: u64 = 8;

impl LiveCharge {
    fn unpack(w: u64) -> Charge {
        Charge {
            units: w >> 32,
            bytes: (w & HALF) * WORD_BYTES,
        }
    }

    fn pack(units: u64, words: u64) -> u64 {
        units.min(HALF) << 32 | words.min(HALF)
    }

    /// Applies `f` to (units, words) atomically; returns the new charge.
    fn update(&self, f: impl Fn(u64, u64) -> (u64, u64)) -> Charge {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (u, w) = f(cur >> 32, cur & HALF);
            let new = Self::pack(u, w);
            match self
                .0
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Self::unpack(new),
                Err(now) => cur = now,
            }
        }
    }

    fn add(&self, c: Charge) -> Charge {
        let words = c.bytes.div_ceil(WORD_BYTES);
        self.update(|u, w| (u.saturating_add(c.units), w.saturating_add(words)))
    }

    fn sub(&self, c: Charge) {
        let words = c.bytes.div_ceil(WORD_BYTES);
        self.update(|u, w| (u.saturating_sub(c.units), w.saturating_sub(words)));
    }

    fn get(&self) -> Charge {
        Self::unpack(self.0.load(Ordering::Relaxed))
    }

    fn take(&self) -> Charge {
        Self::unpack(self.0.swap(0, Ordering::Relaxed))
    }
}

/// The reservations: the live charge (since the last cut), the bound of
/// the commit in flight, and the fast-path limits derived from them.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Reserved since the last cut.
    live: LiveCharge,
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
    /// The live charge that fits any SUBMIT (with the drops' headroom):
    /// units at [`UNIT_BYTES`] each, and bytes with any units
    /// ([`Limits`]); 0 until computed (the slow path).
    limit_all: LimitCell,
    /// The live charge that fits a drops-only SUBMIT.
    limit_drops: LimitCell,
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

/// [`Limits`] for the fast path: 0 and 0 (nothing fits) until computed.
#[derive(Debug, Default)]
struct LimitCell {
    units: AtomicU64,
    bytes: AtomicU64,
}

impl LimitCell {
    fn load(&self) -> Limits {
        Limits {
            units: self.units.load(Ordering::Acquire),
            bytes: self.bytes.load(Ordering::Acquire),
        }
    }

    fn store(&self, l: Option<Limits>) {
        let l = l.unwrap_or_default();
        self.units.store(l.units, Ordering::Release);
        self.bytes.store(l.bytes, Ordering::Release);
    }

    fn clear(&self) {
        self.store(None);
    }
}

/// How a reservation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserve {
    Fits,
    Full(NoSpace),
}

impl Gate {
    /// Reserved since the last cut.
    pub(crate) fn live(&self) -> Charge {
        self.live.get()
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

    /// Reserves `charge` without a check: ops already acknowledged
    /// (replayed) and service records.
    pub(crate) fn force(&self, charge: Charge) {
        self.live.add(charge);
    }

    /// Gives back the charge of a request that was not logged after all.
    pub(crate) fn unreserve(&self, charge: Charge) {
        self.live.sub(charge);
    }

    /// Reserves `charge` if the live charge with it fits (call it under
    /// the cut lock's read side). `space` is read only on the slow path.
    pub(crate) fn reserve(
        &self,
        charge: Charge,
        drops_only: bool,
        space: impl FnOnce() -> TreeSpace,
    ) -> Reserve {
        let after = self.live.add(charge);
        let limit = if drops_only {
            &self.limit_drops
        } else {
            &self.limit_all
        };
        if limit.load().admit(after) {
            return Reserve::Fits;
        }
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        // The frozen bound first, then the space: a commit publishes its
        // space before it clears its bound, so this never pairs a cleared
        // bound with the space before the commit's writes.
        let (frozen, release) = (self.frozen_nodes(), self.frozen_release());
        let space = space();
        let (all, drops) = self.limits(frozen, release, &space);
        self.limit_all.store(all);
        self.limit_drops.store(drops);
        // This request against the bound itself: the limits are each
        // only enough, not necessary.
        let (frozen_left, live) = Self::live_shape(frozen, &space);
        let headroom = if drops_only {
            0
        } else {
            drops_headroom(space.region_nodes)
        };
        let nodes_needed = frozen_left
            .saturating_add(commit_nodes_max(after, self.extra(), live))
            .saturating_add(headroom);
        let nodes_free = space.free_nodes.saturating_add(release);
        if nodes_needed <= nodes_free {
            return Reserve::Fits;
        }
        self.live.sub(charge);
        Reserve::Full(NoSpace {
            nodes_free,
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

    fn limits(
        &self,
        frozen: u64,
        release: u64,
        space: &TreeSpace,
    ) -> (Option<Limits>, Option<Limits>) {
        let (frozen_left, live) = Self::live_shape(frozen, space);
        let extra = self.extra();
        let headroom = drops_headroom(space.region_nodes);
        let free = space.free_nodes.saturating_add(release);
        (
            charge_limits(free, frozen_left, headroom, extra, live),
            charge_limits(free, frozen_left, 0, extra, live),
        )
    }

    /// The commit in flight knows its item changes, before it applies any
    /// (`space` is the tree it starts from): `items` changed, adding at
    /// most `bytes` to the leaves (each put's value and item overhead).
    /// The bound of its charge only bounded those two from the ops
    /// ([`UNIT_ITEMS`] each, and [`action_bytes`]), so [`commit_nodes_max`] of
    /// the real ones bounds the commit as well; it replaces the charge's
    /// bound when smaller. Most ops change a count, not an item's size,
    /// so it usually is, by far (`docs/durable.md`, "Space reservation").
    pub(crate) fn exact(&self, items: u64, bytes: u64, space: &TreeSpace) {
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        let frozen = self.frozen_nodes();
        if frozen == 0 {
            return;
        }
        let shape = Shape::of(space);
        let bound = commit_nodes_max(Charge::default(), Extra { items, bytes }, shape);
        if bound >= frozen {
            return;
        }
        self.frozen_nodes.store(bound.max(1), Ordering::Release);
        self.limit_all.clear();
        self.limit_drops.clear();
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
        self.limit_all.clear();
        self.limit_drops.clear();
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

    /// The cut (under the cut lock's write side): the live charge becomes
    /// the commit's, bounded from the tree it starts from. Returns it.
    pub(crate) fn cut(&self, space: &TreeSpace) -> Charge {
        let _slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        let charge = self.live.take();
        let shape = Shape::of(space);
        let bound = commit_nodes_max(charge, self.extra(), shape);
        self.frozen_release.store(0, Ordering::Release);
        self.frozen_nodes.store(bound, Ordering::Release);
        self.limit_all.clear();
        self.limit_drops.clear();
        charge
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
        self.limit_all.clear();
        self.limit_drops.clear();
        drop(_slow);
        self.signal();
    }

    /// Nodes the reservations could need now (STATS): the commit in
    /// flight's rest plus the live units' commit.
    pub(crate) fn reserved_nodes(&self, space: &TreeSpace) -> u64 {
        let (frozen_left, live) = Self::live_shape(self.frozen_nodes(), space);
        frozen_left.saturating_add(commit_nodes_max(self.live(), self.extra(), live))
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

    /// Each action's bytes against the codec: the largest inline backref
    /// of every kind and what an extent_op adds fit [`ADD_REF_BYTES`], a
    /// freed entry alone in its chunk fits [`DROP_REF_BYTES`], and a new
    /// extent item with its largest inline backref fits [`UNIT_BYTES`]
    /// with a freed entry.
    #[test]
    fn each_action_adds_at_most_its_bytes() {
        use refd_core::extent_tree::ExtentItem;
        use refd_core::model::{DiskKey, ExtentKind, RefKey, BLOCK_FLAG_FULL_BACKREF};
        let m = u64::MAX;
        let len = |item: &ExtentItem| {
            crate::codec::encode_extent_item(1 << 20, item)
                .expect("encodes")
                .1
                .len()
        };
        let data = ExtentKind::Data;
        let tree = ExtentKind::Tree { level: 7 };
        let keys = [
            (tree, RefKey::TreeBlock { root: m }),
            (tree, RefKey::SharedBlock { parent: m }),
            (
                data,
                RefKey::ExtentData {
                    root: m,
                    objectid: m,
                    offset: m,
                },
            ),
            (data, RefKey::SharedData { parent: m }),
        ];
        for (kind, key) in keys {
            assert!(key.inline_bytes() <= INLINE_BACKREF_BYTES_MAX, "{key}");
            let mut item = ExtentItem::new(1 << 30, kind, m);
            let other = match kind {
                ExtentKind::Data => RefKey::SharedData { parent: 1 },
                ExtentKind::Tree { .. } => RefKey::SharedBlock { parent: 1 },
            };
            item.add_ref(other, 1);
            let before = len(&item);
            item.add_ref(key, 1);
            assert_eq!(item.keyed.len(), 0, "{key}: inline");
            let grown = len(&item) - before;
            assert!(grown as u64 <= ADD_REF_BYTES, "{key}: {grown}");
            // A new extent item with this backref, its item overhead and
            // a freed entry alone in a chunk.
            let mut alone = ExtentItem::new(m, kind, m);
            alone.add_ref(key, 1);
            if let ExtentKind::Tree { .. } = kind {
                alone.tree_key = Some(DiskKey {
                    objectid: m,
                    item_type: u8::MAX,
                    offset: m,
                });
            }
            let new = len(&alone) + LEAF_ITEM_OVERHEAD_BYTES;
            assert!(new <= EXTENT_ITEM_ONE_REF_BYTES_MAX + LEAF_ITEM_OVERHEAD_BYTES);
            assert!(
                (new + FREED_ENTRY_ALONE_BYTES) as u64 <= UNIT_BYTES,
                "{key}: {new}"
            );
        }
        // An extent_op: a tree key where there was none, and the full
        // backref flag.
        let mut item = ExtentItem::new(16384, tree, m);
        item.add_ref(RefKey::TreeBlock { root: 5 }, 1);
        let before = len(&item);
        item.flags |= BLOCK_FLAG_FULL_BACKREF;
        item.tree_key = Some(DiskKey {
            objectid: m,
            item_type: u8::MAX,
            offset: m,
        });
        let grown = len(&item) - before;
        assert!(grown <= EXTENT_OP_BYTES_MAX, "{grown}");
        // A freed entry alone in its chunk.
        let chunks =
            crate::codec::service::encode_freed_chunks(&[crate::codec::service::FreedEntry {
                bytenr: m,
                num_bytes: m,
                kind: tree,
            }]);
        assert_eq!(chunks.len(), 1);
        let alone = chunks[0].len() + LEAF_ITEM_OVERHEAD_BYTES;
        assert!(alone <= FREED_ENTRY_ALONE_BYTES, "{alone}");
        assert!(alone as u64 <= DROP_REF_BYTES);
    }

    #[test]
    fn the_live_charge_holds_both_fields_and_saturates() {
        let live = LiveCharge::default();
        let a = live.add(Charge {
            units: 3,
            bytes: 100,
        });
        assert_eq!(
            a,
            Charge {
                units: 3,
                bytes: 104
            }
        );
        let b = live.add(Charge::units(2));
        assert_eq!(b.units, 5);
        assert_eq!(b.bytes, 104 + 2 * UNIT_BYTES);
        live.sub(Charge::units(2));
        assert_eq!(live.get(), a);
        // Past 2^32 units (or words), a field stays at its largest value:
        // more than any region admits.
        let big = live.add(Charge::units(1 << 33));
        assert_eq!(big.units, HALF);
        assert_eq!(big.bytes, HALF * WORD_BYTES);
        assert_eq!(live.take(), big);
        assert_eq!(live.get(), Charge::default());
    }

    #[test]
    fn a_charge_within_either_limit_fits() {
        let shape = Shape {
            nodes: 3000,
            levels: 3,
            run_nodes: 1,
        };
        let (free, frozen_left, headroom) = (50_000, 2000, 1000);
        let l =
            charge_limits(free, frozen_left, headroom, Extra::default(), shape).expect("some fit");
        let need =
            |c: Charge| frozen_left + commit_nodes_max(c, Extra::default(), shape) + headroom;
        assert!(need(Charge::units(l.units)) <= free);
        assert!(need(Charge::units(l.units + 1)) > free);
        // The bytes limit holds whatever the units.
        for units in [1, 1000, l.units * 10, UNITS_UNBOUNDED] {
            let c = Charge {
                units,
                bytes: l.bytes,
            };
            assert!(need(c) <= free, "{units}");
            assert!(l.admit(c));
        }
        assert!(
            need(Charge {
                units: UNITS_UNBOUNDED,
                bytes: l.bytes + 1
            }) > free
        );
        // Drops: about three times the ops of allocations fit by bytes.
        let drops = l.bytes / DROP_REF_BYTES;
        assert!(drops > 2 * l.units, "{drops} drops, {} units", l.units);
        assert_eq!(
            charge_limits(10, 10, 0, Extra::default(), shape),
            None,
            "nothing fits"
        );
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
            let b = commit_nodes_max(Charge::units(units), Extra::default(), shape);
            assert!(b >= last, "{units}: {b} < {last}");
            last = b;
        }
        // A million ops on a tree of 12k nodes: the tree's size, not the
        // ops, bounds it (a 1 GiB region holds 65k nodes).
        let b = commit_nodes_max(Charge::units(1_000_000), Extra::default(), shape);
        assert!(b < 2 * 12_000 + 30_000, "{b}");
        // One op: its paths.
        let b = commit_nodes_max(Charge::units(1), Extra::default(), shape);
        assert!(b < 200, "{b}");
    }
}
