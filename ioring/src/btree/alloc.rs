//! Node allocator: one bit per 16 KiB node slot of the node region, kept in
//! memory, persisted at every commit as a copy-on-write **bitmap run** in
//! the node region itself (`docs/btree.md`, "Allocator").
//!
//! States of a slot, in memory:
//!
//! - *free*: bit clear; may be handed out.
//! - *allocated*: bit set. Reachable from the committed root, dirty (written
//!   by the open transaction), part of the committed bitmap run, the spare
//!   window (below), or *pending*: freed by a commit whose superblock is
//!   not yet known durable.
//!
//! The persisted bitmap of a commit describes the state *after* that commit
//! is durable: reachable nodes plus its own run; pending slots and the
//! spare window are clear in it (nothing reachable from the new superblock
//! uses them). A committed
//! slot is never handed out again before [`Allocator::release_pending`],
//! which the caller calls after the superblock write; so a crash at any
//! point leaves every node of the previous superblock intact.
//!
//! **Spare windows** keep the run's placement structural: a spare window is
//! `K` consecutive slots (`K` = [`Allocator::run_nodes`]) set in memory and
//! never handed out, clear in every persisted bitmap. A commit writes its
//! run into a spare window; the run it replaces becomes pending like any
//! freed slot, and when [`Allocator::release_pending`] releases it, it
//! becomes a spare window again instead of free slots. So a run needs no
//! `K` consecutive free slots, however fragmented the region is: three
//! windows take turns, the committed run and two spares, used oldest
//! first. Three, not two: the run a release just made spare belongs to
//! the older superblock copy, which stays on the device until the next
//! superblock write overwrites it (a recovery mode may open it when the
//! newest copy rots), so the next commit writes into the other spare.
//! Without a committed run of `K` slots (an empty tree, or a run written
//! before the region grew) nothing would come back to replace the spare a
//! commit takes, so then three spares are kept. [`Allocator::pick_spares`]
//! tops them up from free slots at open (the tree's `open`) and after each
//! release; only when no `K` consecutive free slots exist then (a device
//! fragmented before spares existed) does a run fall back to first fit.
//! The guarantees hold when each commit is released before the next one
//! starts, as the durable engine does; a second commit before a release
//! takes the newest spare (the older copy's run), a third finds none and
//! falls back to first fit too (`docs/btree.md`, "Allocator").
//!
//! **A window search that failed is remembered** ([`WindowHint`]): a
//! search for `K` consecutive free slots scans the region (64 ms on a
//! 1 TiB region fragmented slot by slot), and a region without such a
//! window, short of spares, searched at every release. Slots only become
//! free one by one ([`Allocator::clear`]), so once a scan found no window
//! every window that appears later holds a slot freed since: the
//! allocator keeps those slots, and the next searches look around them
//! only, until more than [`WINDOW_HINT_SLOTS_MAX`] were freed (then it
//! scans again).
//!
//! Bitmap run layout: `ceil(node_count / BITMAP_BITS_PER_NODE)` consecutive
//! nodes, each a node header (owner [`BITMAP_OWNER`], level 0, `item_count`
//! = bitmap bytes in this node) followed by bitmap bytes, bit `i % 8` of
//! byte `i / 8` (LSB first) for slot `i`.

use std::collections::{BTreeMap, VecDeque};

use crate::btree::error::BTreeError;
use crate::format::{FsId, NodeHeader, NODE_BYTES, NODE_HEADER_BYTES, NODE_ITEMS_BYTES};

/// Owner id written in the header of bitmap nodes (not a tree id).
pub const BITMAP_OWNER: u64 = u64::MAX;
/// Slots described by one bitmap node.
pub const BITMAP_BITS_PER_NODE: u64 = NODE_ITEMS_BYTES as u64 * 8;
const NODE: u64 = NODE_BYTES as u64;
/// Slots freed since a window search failed that the allocator keeps to
/// search around ([`WindowHint::Around`]); one more and the next search
/// scans the region again. A bound on the hint's memory (512 KiB) and on
/// a search around it, which looks at most at twice `K` slots around
/// each, and at every free stretch once.
pub(crate) const WINDOW_HINT_SLOTS_MAX: usize = 1 << 16;

/// What the allocator knows about where `K` ([`Allocator::run_nodes`])
/// consecutive free slots, a window for a bitmap run, may be.
#[derive(Debug, Clone)]
enum WindowHint {
    /// Anywhere: a search scans the region, first fit.
    Unknown,
    /// A scan found none, and every window since holds one of these slots
    /// (freed since the scan; freeing is the only way a window appears).
    Around(Vec<u64>),
}

/// Allocator state that goes into the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocInfo {
    /// First byte address in the node region never allocated
    /// (superblock `alloc_next_unallocated`).
    pub next_unallocated: u64,
    /// Byte address of the bitmap run, 0 if none (empty tree)
    /// (superblock `free_space_bitmap_addr`).
    pub bitmap_addr: u64,
    /// Length of the bitmap run in bytes (superblock
    /// `free_space_bitmap_bytes`).
    pub bitmap_bytes: u64,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Allocator {
    region_start: u64,
    region_bytes: u64,
    node_count: u64,
    /// Bit per slot; see the module docs for what "set" means.
    bits: Vec<u64>,
    /// Slot index of the high-water mark (`next_unallocated`).
    hwm: u64,
    /// First-fit hint: no free slot below it (below `hwm`).
    cursor: u64,
    /// Committed slots freed by the open transaction.
    txn_freed: Vec<u64>,
    /// Slots freed by commits, by commit generation, not yet released.
    pending: BTreeMap<u64, Vec<u64>>,
    /// Committed bitmap run: first slot and slot count.
    run: Option<(u64, u64)>,
    /// First slots of the spare windows (`run_nodes()` consecutive slots
    /// each, set, never handed out), where the next commits write their
    /// runs, oldest first; at most [`Allocator::spares_wanted`].
    spares: VecDeque<u64>,
    /// The committed run the open transaction's commit replaces (its
    /// slots are also in `txn_freed`).
    txn_freed_run: Option<(u64, u64)>,
    /// Runs replaced by commits, by commit generation, not yet released
    /// (their slots are also in `pending`).
    pending_runs: BTreeMap<u64, (u64, u64)>,
    /// Slots set (allocated in any sense above): kept with the bits, so
    /// that the free count is O(1) (`Allocator::space`).
    used: u64,
    /// Slots in `pending`, over all commits.
    pending_count: u64,
    /// Where a window may be (see [`WindowHint`]).
    window_hint: WindowHint,
    /// Window searches that scanned the region (the others looked only
    /// around the slots of the hint).
    window_scans: u64,
    /// No spare window for the bitmap run: the run goes first fit (see
    /// [`AllocCounts::run_first_fit`]).
    run_first_fit: bool,
}

/// The allocator's counts of slots, for space accounting
/// ([`crate::btree::BTree::space`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocCounts {
    /// Slots in the node region.
    pub region_nodes: u64,
    /// Slots free now: neither reachable, dirty, pending, the run nor the
    /// spare windows.
    pub free_nodes: u64,
    /// Slots freed by commits, reusable after their superblock
    /// (`release_pending`; a replaced bitmap run there becomes a spare
    /// window instead, when one is missing).
    pub pending_nodes: u64,
    /// Slots of a bitmap run (the run a commit writes).
    pub run_nodes: u64,
    /// Committed slots the open transaction replaced (pending at its
    /// commit).
    pub txn_freed_nodes: u64,
    /// Slots of the committed bitmap run (0 for an empty tree).
    pub committed_run_nodes: u64,
    /// Slots of the spare windows (`run_nodes` each; 0 when there is none:
    /// the next run is then placed first fit in free slots).
    pub spare_nodes: u64,
    /// Searches for a window of `run_nodes` free slots that scanned the
    /// region (the others, after one found none, looked only around the
    /// slots freed since).
    pub window_scans: u64,
    /// The "no spare window" fallback is in force: no spare window was
    /// left for the bitmap run, which goes first fit into free slots (and
    /// may fail with `NoSpace`). Set by the open's and each release's
    /// top-up for the next commit's run, and by a commit placing its run
    /// for that run: false again once a top-up or a released run gives
    /// a spare.
    pub run_first_fit: bool,
}

impl Allocator {
    /// Slots in a region; errors unless the region is 4096-aligned whole
    /// nodes and non-empty.
    fn node_count_of(region_start: u64, region_bytes: u64) -> Result<u64, BTreeError> {
        if !region_start.is_multiple_of(4096)
            || region_bytes == 0
            || !region_bytes.is_multiple_of(NODE)
            || region_start.checked_add(region_bytes).is_none()
        {
            return Err(BTreeError::Config {
                field: "node region",
                reason: format!(
                    "{region_start}+{region_bytes} must be 4096-aligned, non-empty whole nodes"
                ),
            });
        }
        Ok(region_bytes / NODE)
    }

    /// An allocator with every slot free (fresh format).
    pub(crate) fn empty(region_start: u64, region_bytes: u64) -> Result<Self, BTreeError> {
        let node_count = Self::node_count_of(region_start, region_bytes)?;
        Ok(Allocator {
            region_start,
            region_bytes,
            node_count,
            bits: vec![0; node_count.div_ceil(64) as usize],
            hwm: 0,
            cursor: 0,
            txn_freed: Vec::new(),
            pending: BTreeMap::new(),
            run: None,
            spares: VecDeque::new(),
            txn_freed_run: None,
            pending_runs: BTreeMap::new(),
            used: 0,
            pending_count: 0,
            window_hint: WindowHint::Unknown,
            window_scans: 0,
            run_first_fit: false,
        })
    }

    pub(crate) fn node_count(&self) -> u64 {
        self.node_count
    }

    /// Slots of a bitmap run for this region.
    pub(crate) fn run_nodes(&self) -> u64 {
        self.node_count.div_ceil(BITMAP_BITS_PER_NODE)
    }

    pub(crate) fn addr_of(&self, slot: u64) -> u64 {
        self.region_start + slot * NODE
    }

    /// Slot of a node address, or `None` if it is not a slot start inside
    /// the region.
    pub(crate) fn slot_of(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.region_start)?;
        (off.is_multiple_of(NODE) && off / NODE < self.node_count).then_some(off / NODE)
    }

    pub(crate) fn is_set(&self, slot: u64) -> bool {
        self.bits
            .get((slot / 64) as usize)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    fn set(&mut self, slot: u64) {
        let word = &mut self.bits[(slot / 64) as usize];
        self.used += u64::from(*word & (1 << (slot % 64)) == 0);
        *word |= 1 << (slot % 64);
    }

    fn clear(&mut self, slot: u64) {
        let word = &mut self.bits[(slot / 64) as usize];
        self.used -= u64::from(*word & (1 << (slot % 64)) != 0);
        *word &= !(1 << (slot % 64));
        self.cursor = self.cursor.min(slot);
        if let WindowHint::Around(slots) = &mut self.window_hint {
            if slots.len() < WINDOW_HINT_SLOTS_MAX {
                slots.push(slot);
            } else {
                self.window_hint = WindowHint::Unknown;
            }
        }
    }

    /// The counts of slots now (O(1)).
    pub(crate) fn counts(&self) -> AllocCounts {
        debug_assert_eq!(
            self.used,
            self.bits
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
        );
        AllocCounts {
            region_nodes: self.node_count,
            free_nodes: self.node_count - self.used,
            pending_nodes: self.pending_count,
            run_nodes: self.run_nodes(),
            txn_freed_nodes: self.txn_freed.len() as u64,
            committed_run_nodes: self.run.map_or(0, |(_, count)| count),
            spare_nodes: self.spares.len() as u64 * self.run_nodes(),
            window_scans: self.window_scans,
            run_first_fit: self.run_first_fit,
        }
    }

    fn no_space(&self, nodes_needed: u64) -> BTreeError {
        BTreeError::NoSpace {
            region_start: self.region_start,
            region_bytes: self.region_bytes,
            nodes_needed,
        }
    }

    /// Allocates one slot: the lowest free slot below the high-water mark,
    /// else the high-water mark. Returns its byte address.
    pub(crate) fn alloc(&mut self) -> Result<u64, BTreeError> {
        let mut word = (self.cursor / 64) as usize;
        let hwm_word = self.hwm.div_ceil(64) as usize;
        while word < hwm_word {
            let free = !self.bits[word];
            if free != 0 {
                let slot = word as u64 * 64 + u64::from(free.trailing_zeros());
                if slot < self.hwm {
                    self.set(slot);
                    self.cursor = slot + 1;
                    return Ok(self.addr_of(slot));
                }
                break;
            }
            word += 1;
        }
        self.cursor = self.hwm;
        if self.hwm >= self.node_count {
            return Err(self.no_space(1));
        }
        let slot = self.hwm;
        self.hwm += 1;
        self.set(slot);
        self.cursor = self.hwm;
        Ok(self.addr_of(slot))
    }

    /// Allocates a window of `run_nodes()` consecutive slots (first fit,
    /// else at the high-water mark) and returns the first slot.
    fn alloc_run(&mut self) -> Result<u64, BTreeError> {
        let count = self.run_nodes();
        let start = self.find_window().ok_or_else(|| self.no_space(count))?;
        self.hwm = self.hwm.max(start + count);
        for slot in start..start + count {
            self.set(slot);
        }
        Ok(start)
    }

    /// The first of `run_nodes()` consecutive free slots, first fit, or
    /// `None`: a scan of the region ([`Allocator::scan_window`]), or,
    /// once a scan found none, a look around the slots freed since
    /// ([`WindowHint`]); either way the same slot.
    fn find_window(&mut self) -> Option<u64> {
        let slots = match std::mem::replace(&mut self.window_hint, WindowHint::Unknown) {
            WindowHint::Around(slots) => slots,
            WindowHint::Unknown => {
                self.window_scans += 1;
                let found = self.scan_window();
                if found.is_none() {
                    self.window_hint = WindowHint::Around(Vec::new());
                }
                return found;
            }
        };
        let (found, slots) = self.window_around(slots);
        self.window_hint = WindowHint::Around(slots);
        found
    }

    /// The first of `run_nodes()` consecutive free slots: first fit below
    /// the high-water mark, else the free tail below it continued above
    /// it; `None` if that passes the region's end. Scans the region.
    fn scan_window(&self) -> Option<u64> {
        let count = self.run_nodes();
        let mut start = 0u64;
        let mut slot = 0u64;
        while slot < self.hwm {
            // Whole words in use are skipped at once (a large, full region).
            if slot.is_multiple_of(64)
                && slot + 64 <= self.hwm
                && self.bits[(slot / 64) as usize] == u64::MAX
            {
                slot += 64;
                start = slot;
                continue;
            }
            if self.is_set(slot) {
                start = slot + 1;
            } else if slot + 1 - start == count {
                return Some(start);
            }
            slot += 1;
        }
        // The free tail below the high-water mark continues above it.
        (start + count <= self.node_count).then_some(start)
    }

    /// The first window that holds one of `slots` (freed since a scan
    /// found none, so every window holds one: the first of these is the
    /// first of all), and the slots still free, sorted, to keep. Each
    /// free stretch is looked at once, at most `2·K` slots of it.
    fn window_around(&self, mut slots: Vec<u64>) -> (Option<u64>, Vec<u64>) {
        let count = self.run_nodes();
        slots.retain(|&slot| !self.is_set(slot));
        slots.sort_unstable();
        slots.dedup();
        // Slots below it are in a stretch already found too short.
        let mut looked_to = 0;
        for &slot in &slots {
            if slot < looked_to {
                continue;
            }
            // The first window holding `slot` starts at `lo`, as far left
            // as the stretch goes but not past `slot + 1 - count`, and
            // fits if the stretch reaches `lo + count`.
            let mut lo = slot;
            while lo > 0 && slot - lo + 1 < count && !self.is_set(lo - 1) {
                lo -= 1;
            }
            let mut hi = slot + 1;
            while hi < lo + count && hi < self.node_count && !self.is_set(hi) {
                hi += 1;
            }
            if hi == lo + count {
                return (Some(lo), slots);
            }
            looked_to = hi;
        }
        // No window at all: every one that appears holds a slot freed
        // from now on.
        (None, Vec::new())
    }

    /// Spare windows to keep (see the module docs): 2 while the committed
    /// run has `run_nodes()` slots (it becomes a spare once a commit
    /// replaced and released it), else 3.
    fn spares_wanted(&self) -> usize {
        match self.run {
            Some((_, count)) if count == self.run_nodes() => 2,
            _ => 3,
        }
    }

    /// Tops the spare windows up to [`Allocator::spares_wanted`] from
    /// `run_nodes()` consecutive free slots (first fit, else at the
    /// high-water mark), used before the released runs. Returns false if some are missing and no such
    /// slots exist (a fragmented region: a run may fall back to first fit).
    pub(crate) fn pick_spares(&mut self) -> bool {
        let mut all = true;
        while all && self.spares.len() < self.spares_wanted() {
            match self.alloc_run() {
                // Free slots are no superblock's: usable first.
                Ok(first) => self.spares.push_front(first),
                Err(_) => all = false,
            }
        }
        self.run_first_fit = self.spares.is_empty();
        all
    }

    /// The slots of the spare windows.
    pub(crate) fn spare_slots(&self) -> impl Iterator<Item = u64> + '_ {
        let k = self.run_nodes();
        self.spares.iter().flat_map(move |&first| first..first + k)
    }

    /// Frees a slot allocated by the open transaction and never committed:
    /// reusable at once.
    pub(crate) fn free_dirty(&mut self, addr: u64) -> Result<(), BTreeError> {
        // A dirty node was allocated by this transaction: its slot is set.
        let slot = self.slot_of(addr).filter(|&s| self.is_set(s));
        let slot =
            slot.unwrap_or_else(|| panic!("free of dirty node {addr}, not an allocated slot"));
        self.clear(slot);
        Ok(())
    }

    /// Frees a committed slot: it stays allocated until the commit that
    /// drops it is durable and released.
    pub(crate) fn free_committed(&mut self, addr: u64) -> Result<(), BTreeError> {
        let slot = self.checked_slot(addr)?;
        self.txn_freed.push(slot);
        Ok(())
    }

    /// The slot of committed node `addr`, which the tree references: a
    /// slot the bitmap read from the device says is free is corruption.
    fn checked_slot(&self, addr: u64) -> Result<u64, BTreeError> {
        match self.slot_of(addr) {
            Some(slot) if self.is_set(slot) => Ok(slot),
            _ => Err(BTreeError::corrupt(
                addr,
                0,
                "the tree references this node but the allocator bitmap has its slot free",
            )),
        }
    }

    /// Forgets the open transaction: `dirty` slots are freed, committed
    /// slots freed by it stay allocated.
    pub(crate) fn abort(&mut self, dirty: impl IntoIterator<Item = u64>) -> Result<(), BTreeError> {
        for addr in dirty {
            self.free_dirty(addr)?;
        }
        self.txn_freed.clear();
        self.txn_freed_run = None;
        Ok(())
    }

    /// Commit step 1: replaces the bitmap run (the old one becomes pending
    /// with the slots freed by the transaction) and returns the new run's
    /// first slot, or `None` for an empty tree (no run). The new run takes
    /// the oldest spare window; without one, `run_nodes()` consecutive
    /// free slots (first fit), or `NoSpace`.
    pub(crate) fn prepare_commit(&mut self, tree_empty: bool) -> Result<Option<u64>, BTreeError> {
        if let Some((first, count)) = self.run.take() {
            self.txn_freed.extend(first..first + count);
            self.txn_freed_run = Some((first, count));
        }
        if tree_empty {
            return Ok(None);
        }
        let count = self.run_nodes();
        self.run_first_fit = self.spares.is_empty();
        let first = match self.spares.pop_front() {
            Some(first) => first,
            None => self.alloc_run()?,
        };
        self.run = Some((first, count));
        Ok(Some(first))
    }

    /// Commit step 2: encodes the bitmap run of the state after this commit
    /// (allocated minus pending minus freed by this commit minus the spare
    /// windows) into sealed nodes, in address order.
    pub(crate) fn encode_run(
        &self,
        fs_id: FsId,
        generation: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, BTreeError> {
        let Some((first, count)) = self.run else {
            return Ok(Vec::new());
        };
        let mut bits = self.bits.clone();
        let pending = self.pending.values().flatten().chain(&self.txn_freed);
        for slot in pending.copied().chain(self.spare_slots()) {
            bits[(slot / 64) as usize] &= !(1 << (slot % 64));
        }
        let bitmap_bytes_total = self.node_count.div_ceil(8);
        let mut out = Vec::with_capacity(count as usize);
        for k in 0..count {
            let mut buf = vec![0u8; NODE_BYTES];
            let first_byte = k * NODE_ITEMS_BYTES as u64;
            let n = (bitmap_bytes_total - first_byte).min(NODE_ITEMS_BYTES as u64);
            for i in 0..n {
                let byte_index = first_byte + i;
                let word = bits[(byte_index / 8) as usize];
                buf[NODE_HEADER_BYTES + i as usize] = (word >> ((byte_index % 8) * 8)) as u8;
            }
            let addr = self.addr_of(first + k);
            NodeHeader {
                fs_id,
                addr,
                generation,
                owner: BITMAP_OWNER,
                item_count: n as u32,
                level: 0,
            }
            .seal(&mut buf)
            .map_err(|source| BTreeError::Node {
                addr,
                expected_generation: generation,
                source,
            })?;
            out.push((addr, buf));
        }
        Ok(out)
    }

    /// Commit step 3 (after the writes and flush succeeded): the slots
    /// freed by the transaction become pending under `generation`.
    pub(crate) fn finish_commit(&mut self, generation: u64) {
        let freed = std::mem::take(&mut self.txn_freed);
        if !freed.is_empty() {
            self.pending_count += freed.len() as u64;
            self.pending.entry(generation).or_default().extend(freed);
        }
        if let Some(run) = self.txn_freed_run.take() {
            self.pending_runs.insert(generation, run);
        }
        self.cursor = 0;
    }

    /// Releases the slots freed by every commit up to `generation`; returns
    /// their addresses (the caller drops them from the cache). Released
    /// runs of `run_nodes()` slots become the missing spare windows (their
    /// slots stay set); then any still missing are picked from the free
    /// slots ([`Allocator::pick_spares`]).
    pub(crate) fn release_pending(&mut self, generation: u64) -> Vec<u64> {
        let later = self.pending.split_off(&generation.saturating_add(1));
        let released = std::mem::replace(&mut self.pending, later);
        let later_runs = self.pending_runs.split_off(&generation.saturating_add(1));
        let runs = std::mem::replace(&mut self.pending_runs, later_runs);
        let k = self.run_nodes();
        let mut kept = Vec::new();
        for (first, count) in runs.into_values() {
            if count == k && self.spares.len() < self.spares_wanted() {
                self.spares.push_back(first);
                kept.push(first..first + count);
            }
        }
        let mut addrs = Vec::new();
        for slot in released.into_values().flatten() {
            self.pending_count -= 1;
            if !kept.iter().any(|window| window.contains(&slot)) {
                self.clear(slot);
            }
            addrs.push(self.addr_of(slot));
        }
        self.pick_spares();
        addrs
    }

    /// Slots pending release, over all commits.
    pub(crate) fn pending_slots(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.values().flatten().copied()
    }

    /// Slots freed by the open transaction (still allocated).
    pub(crate) fn txn_freed_slots(&self) -> &[u64] {
        &self.txn_freed
    }

    /// The superblock fields for the current committed state.
    pub(crate) fn info(&self) -> AllocInfo {
        match self.run {
            Some((first, count)) => AllocInfo {
                next_unallocated: self.addr_of(self.hwm),
                bitmap_addr: self.addr_of(first),
                bitmap_bytes: count * NODE,
            },
            None => AllocInfo {
                next_unallocated: self.addr_of(self.hwm),
                bitmap_addr: 0,
                bitmap_bytes: 0,
            },
        }
    }

    /// The committed bitmap run, as slots.
    pub(crate) fn run(&self) -> Option<(u64, u64)> {
        self.run
    }

    /// Slots currently set, in order.
    pub(crate) fn set_slots(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.hwm).filter(|&s| self.is_set(s))
    }

    /// Rebuilds the allocator from a committed bitmap run read from disk,
    /// exactly as it says (no spare window: the caller picks them,
    /// [`Allocator::pick_spares`]).
    /// `read` reads `len` bytes at an address. Every bitmap node is checked
    /// (header, owner, generation = `generation`, item count), and the
    /// bitmap must be consistent with the run and the high-water mark.
    pub(crate) fn load(
        region_start: u64,
        region_bytes: u64,
        info: AllocInfo,
        fs_id: &FsId,
        generation: u64,
        read: impl FnOnce(u64, &mut [u8]) -> Result<(), BTreeError>,
    ) -> Result<Self, BTreeError> {
        let mut a = Self::empty(region_start, region_bytes)?;
        let hwm_slot = match info.next_unallocated.checked_sub(region_start) {
            Some(off) if off.is_multiple_of(NODE) && off / NODE <= a.node_count => off / NODE,
            _ => {
                return Err(BTreeError::Config {
                    field: "alloc_next_unallocated",
                    reason: format!(
                    "{} is not a slot boundary of the node region {region_start}+{region_bytes}",
                    info.next_unallocated
                ),
                })
            }
        };
        a.hwm = hwm_slot;
        if info.bitmap_addr == 0 {
            if info.bitmap_bytes != 0 {
                return Err(BTreeError::Config {
                    field: "free_space_bitmap_bytes",
                    reason: "non-zero without a bitmap".to_string(),
                });
            }
            return Ok(a);
        }
        // A bitmap written before the node region grew (a device extended
        // since, see `refd serve --grow`) covers fewer slots than the
        // region: fewer nodes, or a shorter last node. The slots past it
        // are free (they are at or above the high-water mark of then).
        let count_max = a.run_nodes();
        let count = info.bitmap_bytes / NODE;
        let first = match a.slot_of(info.bitmap_addr) {
            Some(first)
                if info.bitmap_bytes.is_multiple_of(NODE)
                    && (1..=count_max).contains(&count)
                    && first + count <= hwm_slot =>
            {
                first
            }
            _ => {
                return Err(BTreeError::corrupt(
                    info.bitmap_addr,
                    generation,
                    format!(
                        "bitmap run {}+{} is not 1 to {count_max} node(s) below the high-water \
                         mark {}",
                        info.bitmap_addr, info.bitmap_bytes, info.next_unallocated
                    ),
                ))
            }
        };
        let mut buf = vec![0u8; (count * NODE) as usize];
        read(info.bitmap_addr, &mut buf)?;
        let bitmap_bytes_total = a.node_count.div_ceil(8);
        for k in 0..count {
            let addr = a.addr_of(first + k);
            let node = &buf[(k * NODE) as usize..((k + 1) * NODE) as usize];
            let err = |source| BTreeError::Node {
                addr,
                expected_generation: generation,
                source,
            };
            let h = NodeHeader::decode(node, fs_id, addr).map_err(err)?;
            h.check_generation(generation).map_err(err)?;
            let first_byte = k * NODE_ITEMS_BYTES as u64;
            // This region's bitmap would hold `full` bytes here; one of a
            // smaller region holds as many in every node but its last.
            let full = (bitmap_bytes_total - first_byte).min(NODE_ITEMS_BYTES as u64);
            let n = u64::from(h.item_count);
            let fits = if k + 1 < count {
                n == full
            } else {
                (1..=full).contains(&n)
            };
            if h.owner != BITMAP_OWNER || h.level != 0 || !fits {
                return Err(BTreeError::corrupt(
                    addr,
                    generation,
                    format!(
                        "bitmap node has owner {}, level {}, {} bytes; expected owner {BITMAP_OWNER}, \
                         level 0, {} bytes",
                        h.owner,
                        h.level,
                        h.item_count,
                        if k + 1 < count {
                            full.to_string()
                        } else {
                            format!("1 to {full}")
                        }
                    ),
                ));
            }
            if k + 1 == count && (first_byte + n) * 8 < hwm_slot {
                return Err(BTreeError::corrupt(
                    addr,
                    generation,
                    format!(
                        "bitmap covers {} slots, below the high-water mark slot {hwm_slot}",
                        (first_byte + n) * 8
                    ),
                ));
            }
            let items = &node[NODE_HEADER_BYTES..];
            if items[n as usize..].iter().any(|&b| b != 0) {
                return Err(BTreeError::corrupt(
                    addr,
                    generation,
                    "bitmap node has non-zero bytes after its bitmap",
                ));
            }
            for i in 0..n {
                let byte = items[i as usize];
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        let slot = (first_byte + i) * 8 + bit;
                        if slot >= hwm_slot {
                            return Err(BTreeError::corrupt(
                                addr,
                                generation,
                                format!(
                                    "bitmap marks slot {slot} allocated, at or above the \
                                     high-water mark slot {hwm_slot}"
                                ),
                            ));
                        }
                        a.set(slot);
                    }
                }
            }
        }
        for slot in first..first + count {
            if !a.is_set(slot) {
                return Err(BTreeError::corrupt(
                    info.bitmap_addr,
                    generation,
                    format!("bitmap does not mark its own slot {slot} allocated"),
                ));
            }
        }
        a.run = Some((first, count));
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FS: FsId = FsId([9; 16]);

    #[test]
    fn alloc_first_fit_and_pending() {
        let mut a = Allocator::empty(1 << 20, 8 * NODE).expect("alloc");
        let x: Vec<u64> = (0..3).map(|_| a.alloc().expect("alloc")).collect();
        assert_eq!(x, vec![1 << 20, (1 << 20) + NODE, (1 << 20) + 2 * NODE]);
        a.free_dirty(x[1]).expect("free");
        assert_eq!(a.alloc().expect("alloc"), x[1], "dirty slot reused at once");
        a.free_committed(x[0]).expect("free");
        assert_eq!(a.alloc().expect("alloc"), (1 << 20) + 3 * NODE);
        let c = a.counts();
        assert_eq!(
            (c.free_nodes, c.txn_freed_nodes, c.pending_nodes),
            (4, 1, 0)
        );
        assert_eq!(a.prepare_commit(false).expect("run"), Some(4));
        a.finish_commit(5);
        let c = a.counts();
        assert_eq!(
            (c.free_nodes, c.pending_nodes, c.committed_run_nodes),
            (3, 1, 1)
        );
        assert!(a.is_set(0), "pending until released");
        assert_eq!(a.release_pending(4), Vec::<u64>::new());
        // A release picks the two missing spare windows: the first free
        // slots, the latest picked used first.
        assert_eq!(a.spare_slots().collect::<Vec<_>>(), vec![6, 5]);
        assert_eq!(a.release_pending(5), vec![1 << 20]);
        let c = a.counts();
        assert_eq!(
            (c.region_nodes, c.free_nodes, c.pending_nodes, c.spare_nodes),
            (8, 2, 0, 2)
        );
        for slot in [0, 7] {
            assert_eq!(a.alloc().expect("alloc"), (1 << 20) + slot * NODE);
        }
        assert!(matches!(a.alloc(), Err(BTreeError::NoSpace { .. })));
        // The next run takes the oldest spare, and the old run becomes the
        // newest.
        assert_eq!(a.prepare_commit(false).expect("run"), Some(6));
        a.finish_commit(6);
        a.release_pending(6);
        assert_eq!(a.spare_slots().collect::<Vec<_>>(), vec![5, 4]);
        assert!(matches!(
            a.free_committed((1 << 20) + 100 * NODE),
            Err(BTreeError::Corrupt { .. })
        ));
    }

    #[test]
    fn bitmap_round_trip() {
        let region = (BITMAP_BITS_PER_NODE + 100) * NODE;
        let mut a = Allocator::empty(1 << 20, region).expect("alloc");
        assert_eq!(a.run_nodes(), 2);
        let addrs: Vec<u64> = (0..50).map(|_| a.alloc().expect("alloc")).collect();
        a.free_committed(addrs[3]).expect("free");
        let first = a.prepare_commit(false).expect("run").expect("some");
        assert_eq!(first, 50);
        let run = a.encode_run(FS, 7).expect("encode");
        a.finish_commit(7);
        let info = a.info();
        let mut image = Vec::new();
        for (_, b) in &run {
            image.extend_from_slice(b);
        }
        let loaded = Allocator::load(1 << 20, region, info, &FS, 7, |addr, buf| {
            assert_eq!(addr, info.bitmap_addr);
            buf.copy_from_slice(&image);
            Ok(())
        })
        .expect("load");
        let expect: Vec<u64> = (0..52).filter(|&s| s != 3).collect();
        assert_eq!(loaded.set_slots().collect::<Vec<_>>(), expect);
        assert_eq!(loaded.info(), info);
        // Wrong generation is refused.
        assert!(Allocator::load(1 << 20, region, info, &FS, 8, |_, buf| {
            buf.copy_from_slice(&image);
            Ok(())
        })
        .is_err());
        // A flipped bit anywhere is refused.
        let mut bad = image.clone();
        bad[NODE_HEADER_BYTES + 40] ^= 1;
        assert!(Allocator::load(1 << 20, region, info, &FS, 7, |_, buf| {
            buf.copy_from_slice(&bad);
            Ok(())
        })
        .is_err());
    }

    /// A bitmap written for a smaller node region (a device grown since)
    /// loads into the larger one: the same slots set, the new ones free
    /// and allocated after the old end; a larger bitmap than the region
    /// holds is refused.
    #[test]
    fn a_bitmap_of_a_smaller_region_loads_into_a_grown_one() {
        let small = 100 * NODE;
        let mut a = Allocator::empty(1 << 20, small).expect("alloc");
        let addrs: Vec<u64> = (0..60).map(|_| a.alloc().expect("alloc")).collect();
        a.free_committed(addrs[7]).expect("free");
        a.prepare_commit(false).expect("run").expect("some");
        let run = a.encode_run(FS, 3).expect("encode");
        a.finish_commit(3);
        let info = a.info();
        let image: Vec<u8> = run.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let read = |buf: &mut [u8]| {
            buf.copy_from_slice(&image);
            Ok(())
        };
        // Slot 7 is free on the device (pending only in memory).
        let expect: Vec<u64> = a.set_slots().filter(|&s| s != 7).collect();
        for grown in [200 * NODE, (2 * BITMAP_BITS_PER_NODE + 5) * NODE] {
            let mut g = Allocator::load(1 << 20, grown, info, &FS, 3, |_, buf| read(buf))
                .expect("load into the grown region");
            assert_eq!(g.set_slots().collect::<Vec<_>>(), expect);
            // Spare windows of the grown region's run length, at the old
            // end: three while the committed run is shorter (K = 3 here).
            assert!(g.pick_spares());
            let k = g.run_nodes();
            let spare: Vec<u64> = g.spare_slots().collect();
            let windows = if k == 1 { 2 } else { 3 };
            assert_eq!(spare.len() as u64, windows * k);
            assert!(spare.iter().all(|s| !expect.contains(s)), "{spare:?}");
            let mut last = 0;
            while let Ok(addr) = g.alloc() {
                last = addr;
            }
            assert_eq!(last, (1 << 20) + grown - NODE, "the whole grown region");
            // A full region commits twice: each run takes a spare, and the
            // released old run becomes a spare only if it is K long.
            for generation in [4, 5] {
                g.prepare_commit(false).expect("a run in a spare window");
                g.finish_commit(generation);
                g.release_pending(generation);
                assert_eq!(g.run().map(|(_, count)| count), Some(k));
                assert_eq!(g.counts().spare_nodes, 2 * k);
            }
        }
        // The other way round: a bitmap of a larger region than recorded.
        let shrunk = 50 * NODE;
        assert!(Allocator::load(1 << 20, shrunk, info, &FS, 3, |_, buf| read(buf)).is_err());
        // A bitmap node cut shorter than the high-water mark needs.
        let mut short = image.clone();
        let h = NodeHeader::decode(&short[..NODE as usize], &FS, info.bitmap_addr).unwrap();
        assert_eq!(h.item_count, 13, "100 slots");
        let mut cut = h;
        cut.item_count = 2;
        short[NODE_HEADER_BYTES + 2..NODE_HEADER_BYTES + 13].fill(0);
        cut.seal(&mut short[..NODE as usize]).unwrap();
        assert!(
            Allocator::load(1 << 20, 200 * NODE, info, &FS, 3, |_, buf| {
                buf.copy_from_slice(&short);
                Ok(())
            })
            .is_err()
        );
    }

    /// An allocator as `BTree::open` makes it for a fresh region.
    fn opened(region_bytes: u64) -> Allocator {
        let mut a = Allocator::empty(1 << 20, region_bytes).expect("alloc");
        assert!(a.pick_spares(), "an empty region has spare windows");
        a
    }

    /// One commit as the engine runs it: prepare, encode, finish, then
    /// (the superblock durable) release.
    fn commit(a: &mut Allocator, generation: u64) -> Result<(), BTreeError> {
        a.prepare_commit(false)?;
        a.finish_commit(generation);
        a.release_pending(generation);
        Ok(())
    }

    /// A 3 GiB region (bitmap run of K = 2 consecutive slots) filled to
    /// its end, then every other tree slot freed by a commit: half the
    /// region is free, in single slots. The next commit's run used to
    /// find no 2 consecutive free slots and fail with `NoSpace` (the
    /// durable engine then latched, and replayed into the same failure).
    #[test]
    fn a_fragmented_region_above_2_gib_still_commits_its_bitmap_run() {
        let mut a = opened(3 << 30);
        assert_eq!(a.run_nodes(), 2);
        let mut tree = Vec::new();
        while a.counts().free_nodes > a.run_nodes() {
            tree.push(a.alloc().expect("alloc"));
        }
        commit(&mut a, 1).expect("commit of the full region");
        let mut kept = Vec::new();
        for (i, addr) in tree.into_iter().enumerate() {
            if i % 2 == 0 {
                a.free_committed(addr).expect("free");
            } else {
                kept.push(addr);
            }
        }
        commit(&mut a, 2).expect("commit of the frees");
        let free = a.counts().free_nodes;
        assert!(free > a.node_count() / 2 - 10, "{free} free");
        for generation in 3..8 {
            commit(&mut a, generation).expect("a commit of a fragmented region");
        }
        // The freed slots are handed out again, and commits go on.
        for _ in 0..free {
            a.alloc().expect("a free slot");
        }
        assert!(matches!(a.alloc(), Err(BTreeError::NoSpace { .. })));
        commit(&mut a, 8).expect("a commit of the refilled region");
        a.free_committed(kept[0]).expect("free");
        commit(&mut a, 9).expect("commit");
        commit(&mut a, 10).expect("commit");
    }

    /// The allocator's slots add up: every set slot is a tree slot of the
    /// model, the run, the spares or pending, and the persisted bitmap
    /// marks the tree and the run only.
    fn assert_accounted(a: &Allocator, tree: &[u64], generation: u64) {
        let c = a.counts();
        let run = c.committed_run_nodes;
        assert_eq!(
            c.region_nodes - c.free_nodes,
            tree.len() as u64 + run + c.spare_nodes + c.pending_nodes,
            "{c:?}"
        );
        assert_eq!(
            c.spare_nodes,
            2 * a.run_nodes(),
            "two spare windows after a release"
        );
        let image: Vec<u8> = a
            .encode_run(FS, generation)
            .expect("encode")
            .into_iter()
            .flat_map(|(_, b)| b)
            .collect();
        let disk = Allocator::load(
            1 << 20,
            a.region_bytes,
            a.info(),
            &FS,
            generation,
            |_, b| {
                b.copy_from_slice(&image);
                Ok(())
            },
        )
        .expect("load");
        let (first, count) = a.run().expect("run");
        let mut expect: Vec<u64> = tree.iter().map(|&addr| a.slot_of(addr).unwrap()).collect();
        expect.extend(first..first + count);
        expect.sort_unstable();
        assert_eq!(disk.set_slots().collect::<Vec<_>>(), expect);
        assert!(a.spare_slots().all(|s| a.is_set(s) && !disk.is_set(s)));
    }

    /// Random allocations, frees (in runs of every other slot, and
    /// scattered) and commits on regions with runs of 2 and 3 slots, each
    /// filled to its end early: no commit ever fails, whatever the
    /// fragmentation (each needs no free slot, its run takes a spare), no
    /// run overwrites either of the last two, and the slots always add up.
    #[test]
    fn commits_of_a_fragmented_region_always_find_their_run() {
        use rand::{Rng, SeedableRng};
        for (seed, region_nodes) in [
            (1u64, BITMAP_BITS_PER_NODE + 3000),
            (2, 2 * BITMAP_BITS_PER_NODE + 77),
            (3, BITMAP_BITS_PER_NODE + 1),
        ] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut a = opened(region_nodes * NODE);
            let k = a.run_nodes();
            assert!(k >= 2);
            let mut tree: Vec<u64> = Vec::new();
            let mut runs: [Option<u64>; 2] = [None, None];
            for generation in 1..=40u64 {
                match rng.gen_range(0..4) {
                    // Fill to the region's end.
                    0 => tree.extend(std::iter::from_fn(|| a.alloc().ok())),
                    // Allocate some.
                    1 => {
                        let n = rng.gen_range(0..region_nodes / 4);
                        tree.extend((0..n).map_while(|_| a.alloc().ok()));
                    }
                    // Free every other slot of a random stretch.
                    2 => {
                        tree.sort_unstable();
                        let from = rng.gen_range(0..=tree.len());
                        let to = rng.gen_range(from..=tree.len());
                        let mut i = to;
                        while i > from + 1 {
                            i -= 2;
                            a.free_committed(tree.swap_remove(i)).expect("free");
                        }
                    }
                    // Free scattered slots.
                    _ => {
                        let n = rng.gen_range(0..=tree.len() / 3);
                        for _ in 0..n {
                            let i = rng.gen_range(0..tree.len());
                            a.free_committed(tree.swap_remove(i)).expect("free");
                        }
                    }
                }
                let free = a.counts().free_nodes;
                let run = a.prepare_commit(false).unwrap_or_else(|e| {
                    panic!("seed {seed} generation {generation}, {free} free: {e}")
                });
                // The runs of both superblock copies on the device (the
                // last two commits') are never the one written.
                assert!(!runs.contains(&run), "{run:?} over one of {runs:?}");
                runs = [runs[1], run];
                a.finish_commit(generation);
                a.release_pending(generation);
                assert_accounted(&a, &tree, generation);
                assert_eq!(a.run().map(|(_, count)| count), Some(k));
            }
        }
    }

    /// A region with no run's worth of consecutive free slots and no
    /// spare (a device fragmented before spares existed; here an
    /// allocator that never picked one): `pick_spares` says so, a commit
    /// falls back to first fit (`NoSpace` without a window, as before
    /// spares existed, and no panic), and the first window that appears
    /// is kept as a spare, after which every commit finds its run.
    #[test]
    fn a_region_fragmented_before_spares_falls_back_to_first_fit() {
        let mut a = Allocator::empty(1 << 20, 3 << 30).expect("alloc");
        let slots: Vec<u64> = std::iter::from_fn(|| a.alloc().ok()).collect();
        for addr in slots.iter().step_by(2) {
            a.free_dirty(*addr).expect("free");
        }
        assert!(!a.pick_spares());
        assert_eq!(a.counts().spare_nodes, 0);
        assert!(a.counts().run_first_fit, "the fallback is in force");
        assert!(matches!(
            a.prepare_commit(false),
            Err(BTreeError::NoSpace {
                nodes_needed: 2,
                ..
            })
        ));
        a.free_dirty(slots[1]).expect("free");
        a.free_dirty(slots[3]).expect("free");
        // Slots 0..5 are free: the run takes 0..2, the release keeps 2..4
        // (no room for a second spare).
        assert_eq!(a.prepare_commit(false).expect("first fit"), Some(0));
        a.finish_commit(1);
        a.release_pending(1);
        assert_eq!(a.spare_slots().collect::<Vec<_>>(), vec![2, 3]);
        assert!(!a.counts().run_first_fit, "a spare: the fallback is over");
        for generation in 2..6 {
            commit(&mut a, generation).expect("a commit with a spare");
            assert_eq!(a.counts().spare_nodes, 2, "one window of K = 2");
            assert!(!a.counts().run_first_fit);
        }
        // Two commits before a release: the second finds no spare.
        a.prepare_commit(false).expect("the spare");
        a.finish_commit(6);
        assert!(!a.counts().run_first_fit, "its run took the spare");
        assert!(a.prepare_commit(false).is_err(), "no window");
        assert!(a.counts().run_first_fit, "the second run went first fit");
    }

    /// A region with one window (the committed run's and one spare take
    /// turns) is short of a spare, and each release looks for one in the
    /// free slots. It used to scan the region every time (64 ms on a
    /// 1 TiB region fragmented slot by slot); now one scan finds none and
    /// the releases after it look only around the slots freed since: the
    /// scans are counted, and the window that freeing makes is found all
    /// the same, where a scan finds it.
    #[test]
    fn a_region_without_a_window_is_scanned_once_not_at_every_release() {
        let mut a = Allocator::empty(1 << 20, 3 << 30).expect("alloc");
        assert_eq!(a.run_nodes(), 2);
        let slots: Vec<u64> = std::iter::from_fn(|| a.alloc().ok()).collect();
        // Slots 0 to 4 free, then every other slot: two windows, one
        // for the first run and one spare.
        for addr in slots.iter().step_by(2).chain([&slots[1], &slots[3]]) {
            a.free_dirty(*addr).expect("free");
        }
        assert!(!a.pick_spares(), "two windows, three wanted");
        let scans = a.counts().window_scans;
        assert_eq!(scans, 3, "two found a window, one found none");
        for generation in 1..100 {
            commit(&mut a, generation).expect("a commit in a window");
            // A tree slot freed by the next commit and released: not a
            // window.
            let tree = a.alloc().expect("a free slot");
            a.free_committed(tree).expect("free");
        }
        assert_eq!(a.counts().spare_nodes, 2, "one window of K = 2");
        assert_eq!(a.counts().window_scans, scans, "no scan since");
        // Two slots freed side by side with free ones make a window: the
        // next release finds it, the one a scan finds, without a scan.
        a.free_committed(slots[1001]).expect("free");
        a.free_committed(slots[1003]).expect("free");
        let mut scanned = a.clone();
        scanned.window_hint = WindowHint::Unknown;
        commit(&mut a, 100).expect("commit");
        commit(&mut scanned, 100).expect("commit");
        let spares: Vec<u64> = a.spare_slots().collect();
        assert_eq!(spares, scanned.spare_slots().collect::<Vec<_>>());
        assert!(
            spares.contains(&1000) && spares.contains(&1001),
            "{spares:?}"
        );
        assert_eq!(a.counts().spare_nodes, 4, "two windows");
        assert_eq!(a.counts().window_scans, scans, "no scan since");
        assert_eq!(scanned.counts().window_scans, scans + 1);
    }

    /// The look around the freed slots finds the window a scan finds,
    /// on seeded random frees and window allocations over a region with
    /// runs of 3 slots (windows at the region's end included), and the
    /// hint's bound sends the search back to a scan.
    #[test]
    fn a_look_around_freed_slots_finds_the_window_a_scan_finds() {
        use rand::{Rng, SeedableRng};
        for seed in 0..4u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let nodes = 2 * BITMAP_BITS_PER_NODE + 77;
            let mut a = Allocator::empty(1 << 20, nodes * NODE).expect("alloc");
            assert_eq!(a.run_nodes(), 3);
            let slots: Vec<u64> = std::iter::from_fn(|| a.alloc().ok()).collect();
            // No window: every third slot free.
            for addr in slots.iter().step_by(3) {
                a.free_dirty(*addr).expect("free");
            }
            assert_eq!(a.find_window(), None);
            let scans = a.counts().window_scans;
            let mut found = 0;
            for step in 0..2000 {
                match rng.gen_range(0..10) {
                    0 | 1 => {
                        let expect = a.scan_window();
                        assert_eq!(a.find_window(), expect, "seed {seed} step {step}");
                        if expect.is_some() {
                            a.alloc_run().expect("the window found");
                            found += 1;
                        }
                    }
                    2 => {
                        a.alloc().expect("a free slot");
                    }
                    pick => {
                        // Free a slot: mostly in the first stretch, so
                        // that windows appear, and near the end.
                        let slot = match pick {
                            3 => rng.gen_range(nodes - 10..nodes),
                            4 => rng.gen_range(0..nodes),
                            _ => rng.gen_range(0..600),
                        };
                        if a.is_set(slot) {
                            a.free_dirty(a.addr_of(slot)).expect("free");
                        }
                    }
                }
            }
            assert_eq!(a.counts().window_scans, scans, "seed {seed}");
            assert!(found >= 20, "seed {seed}: {found} windows found");
        }
        // Past the bound, a search scans again.
        let mut a = Allocator::empty(1 << 20, 3 << 30).expect("alloc");
        let slots: Vec<u64> = std::iter::from_fn(|| a.alloc().ok()).collect();
        let every_other: Vec<u64> = slots.iter().step_by(2).copied().collect();
        let (first, rest) = every_other.split_at(1000);
        assert!(rest.len() > WINDOW_HINT_SLOTS_MAX);
        for &addr in first {
            a.free_dirty(addr).expect("free");
        }
        assert_eq!(a.find_window(), None);
        let scans = a.counts().window_scans;
        for &addr in rest {
            a.free_dirty(addr).expect("free");
        }
        assert!(matches!(a.window_hint, WindowHint::Unknown));
        assert_eq!(a.find_window(), None);
        assert_eq!(a.counts().window_scans, scans + 1);
    }
}
