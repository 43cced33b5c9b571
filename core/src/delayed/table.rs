//! The merge-in-place shard table: where a shard's ops are merged at
//! insert, as btrfs `insert_delayed_ref()` merges them into the head's ref
//! tree, and where lookups find them.
//!
//! # Layout
//!
//! One open-addressing table (linear probing, power-of-two slots) per
//! shard and transaction parity, keyed by bytenr. Every slot holds one
//! *entry* of [`ENTRY_WORDS`] words; an extent's state is up to three kinds
//! of entries, all hashed by its bytenr, so they sit in one probe run:
//!
//! ```text
//!  word:  0          1                          2..=6
//!  head   bytenr+1   HEAD                       num_bytes total_ref_mod alloc_stamp meta -
//!  ref    bytenr+1   type code << 56 | seq      k1 k2 k3 ref_mod drops
//!  eop    bytenr+1   EOP | has_key << 8 | type  flags_to_set flags_stamp key_stamp objectid offset
//! ```
//!
//! An op adds to its head entry (the summary merge of [`crate::head`]), to
//! the ref entry of its `(key, seq)` (signed sum and gross drops) and, with
//! an extent_op, to the extent_op entry. Entries are never deleted (a ref
//! that cancels keeps its slot with `ref_mod` and `drops` 0 and is not
//! read back) and never move, so the table only fills; past
//! [`LOAD_NUM`]/[`LOAD_DEN`] the owner grows it (a larger copy, published
//! by the store through crossbeam-epoch) or, at the store's size cap,
//! hands it to the index as a spilled table and starts an empty one.
//!
//! # Readers: per-group sequence counters
//!
//! Slots are grouped by [`GROUP_SLOTS`]; each group has a sequence counter
//! that only the owner (the shard's one ingest handle) writes. An op's
//! writes all happen inside one *section* of the group of its bytenr's home
//! slot: counter to odd, release fence, the entry words, counter to even
//! (release). A reader loads the counter (acquire), reads the probe run
//! with relaxed loads, fences (acquire) and loads the counter again; equal
//! and even means it saw no write of a section of that group, so every
//! entry of its bytenr is whole and of one moment (the fence pair: had it
//! read a word written in a section, the counter load after its fence
//! would see that section's odd value). Entries of other bytenrs in the
//! same probe run may be mid-write; the reader only matches word 0
//! (written once, at insert, before anything depends on it) and stops at
//! the first empty slot, which is safe: an entry of its bytenr beyond a
//! slot that looks empty was inserted after that slot was filled, so in a
//! later section of its own group than the one the reader saw completed.
//! Modelled with loom below.
//!
//! A reader that keeps meeting sections (the owner hammering one group)
//! asks the owner to pause after [`READ_TRIES_OPTIMISTIC`] tries: the owner
//! checks `readers_waiting` before each op and waits while it is non-zero,
//! so every read completes in bounded time whatever the ingest rate, and
//! the owner waits at most for one read of one probe run.

use crossbeam_utils::CachePadded;
use refd_sync::shim::{fence, AtomicU32, AtomicU64, Ordering};

use super::packed::{Chunk, PackedRef, RunBuilder};
use crate::head::{DelayedRef, Head, HeadSummary, PendingExtentOp};
use crate::model::{DiskKey, ExtentKind, Op, RefKey, SEQ_MAX};

/// Words per entry (see the module doc).
pub(crate) const ENTRY_WORDS: usize = 7;
/// Bytes per slot.
pub(crate) const SLOT_BYTES: usize = ENTRY_WORDS * 8;
/// Slots per sequence-counter group.
#[cfg(not(loom))]
pub(crate) const GROUP_SLOTS: usize = 64;
/// Slots per sequence-counter group (small, for the loom model).
#[cfg(loom)]
pub(crate) const GROUP_SLOTS: usize = 4;
/// Fewest slots of a table (one group).
pub(crate) const TABLE_SLOTS_MIN: usize = GROUP_SLOTS;
/// A table is full past `LOAD_NUM / LOAD_DEN` of its slots (linear
/// probing's runs stay short below it).
pub(crate) const LOAD_NUM: usize = 3;
/// See [`LOAD_NUM`].
pub(crate) const LOAD_DEN: usize = 4;
/// Entries one op can add: head, ref, extent_op.
pub(crate) const ENTRIES_PER_OP_MAX: usize = 3;
/// Tries of a read before it asks the owner to pause.
pub(crate) const READ_TRIES_OPTIMISTIC: u32 = 64;

const _: () = assert!(TABLE_SLOTS_MIN.is_power_of_two() && TABLE_SLOTS_MIN >= GROUP_SLOTS);
const _: () = assert!(TABLE_SLOTS_MIN * LOAD_NUM / LOAD_DEN > ENTRIES_PER_OP_MAX);

/// Entry kind, top byte of word 1 (0 = empty slot; ref entries carry
/// their backref type code there, 176..=184).
const KIND_HEAD: u64 = 1;
const KIND_EOP: u64 = 2;
const KIND_SHIFT: u32 = 56;

const IS_DATA: u64 = 1;
const SHAPE_KNOWN: u64 = 2;
const MIXED: u64 = 4;

/// One shard's merge-in-place table (see the module doc).
#[derive(Debug)]
pub(crate) struct Table {
    shift: u32,
    mask: usize,
    words: Box<[AtomicU64]>,
    seqs: Box<[AtomicU64]>,
    /// Entries in use (owner writes; readers use it for stats).
    used: AtomicU64,
    /// Head entries.
    heads: AtomicU64,
    /// Ref entries.
    refs: AtomicU64,
    /// Readers that asked the owner to pause (see the module doc).
    readers_waiting: CachePadded<AtomicU32>,
}

/// The words of an entry as read.
type Entry = [u64; ENTRY_WORDS];

impl Table {
    /// An empty table of `slots` (a power of two, at least
    /// [`TABLE_SLOTS_MIN`]).
    pub fn new(slots: usize) -> Table {
        assert!(slots.is_power_of_two() && slots >= TABLE_SLOTS_MIN);
        Table {
            shift: 64 - slots.trailing_zeros(),
            mask: slots - 1,
            words: (0..slots * ENTRY_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            seqs: (0..slots / GROUP_SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            used: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            refs: AtomicU64::new(0),
            readers_waiting: CachePadded::new(AtomicU32::new(0)),
        }
    }

    pub fn slots(&self) -> usize {
        self.mask + 1
    }

    /// Heap bytes (slots and counters).
    pub fn heap_bytes(&self) -> usize {
        self.slots() * SLOT_BYTES + self.seqs.len() * 8
    }

    /// `(heads, refs)` entries stored (refs that cancelled included).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.heads.load(Ordering::Relaxed) as usize,
            self.refs.load(Ordering::Relaxed) as usize,
        )
    }

    /// True when one more op might take the table past its load limit.
    pub fn full(&self) -> bool {
        (self.used.load(Ordering::Relaxed) as usize + ENTRIES_PER_OP_MAX) * LOAD_DEN
            > self.slots() * LOAD_NUM
    }

    fn home(&self, bytenr: u64) -> usize {
        // A full 64-bit mix (splitmix64's finalizer), then the top bits:
        // bytenrs are multiples of the sector size and their low bits
        // carry nothing.
        let mut z = bytenr;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> self.shift) as usize
    }

    fn word(&self, slot: usize, i: usize) -> &AtomicU64 {
        &self.words[slot * ENTRY_WORDS + i]
    }

    fn load(&self, slot: usize) -> Entry {
        std::array::from_fn(|i| self.word(slot, i).load(Ordering::Relaxed))
    }

    /// Owner: wait while a reader asked for a pause (outside any section).
    pub fn wait_readers(&self) {
        let mut spins = 0u32;
        while self.readers_waiting.load(Ordering::Relaxed) != 0 {
            backoff(&mut spins);
        }
    }

    /// Owner: merge one checked op (with its stamp) in place. The caller
    /// made room ([`Table::full`] is false).
    pub fn absorb(&self, op: &Op, stamp: u64) {
        debug_assert!(!self.full(), "absorb into a full table");
        let home = self.home(op.bytenr);
        let seq = &self.seqs[home / GROUP_SLOTS];
        let s = seq.load(Ordering::Relaxed);
        seq.store(s + 1, Ordering::Relaxed);
        // No write of the section may be seen before the odd counter.
        fence(Ordering::Release);
        let one = HeadSummary::of_op(op, stamp);
        let key0 = op.bytenr + 1;
        let (h, new) = self.find_or_insert(home, key0, KIND_HEAD << KIND_SHIFT, [0; 3]);
        let summary = if new {
            bump(&self.heads);
            one
        } else {
            decode_summary(&self.load(h)).merge(one)
        };
        self.store_summary(h, &summary);
        if let Some(key) = op.key {
            let (k1, k2, k3) = key.words();
            let tag = (u64::from(key.type_code()) << KIND_SHIFT) | op.seq;
            let (r, new) = self.find_or_insert(home, key0, tag, [k1, k2, k3]);
            if new {
                bump(&self.refs);
            }
            let d = DelayedRef::of_mod(key, op.seq, op.ref_mod());
            let w = |i| self.word(r, i);
            w(5).store(
                w(5).load(Ordering::Relaxed).wrapping_add(d.ref_mod as u64),
                Ordering::Relaxed,
            );
            w(6).store(w(6).load(Ordering::Relaxed) + d.drops, Ordering::Relaxed);
        }
        if let Some(e) = one.extent_op {
            let (x, _) = self.find_or_insert(home, key0, KIND_EOP << KIND_SHIFT, [0; 3]);
            let merged = decode_eop(&self.load(x)).merge(e);
            self.store_eop(x, &merged);
        }
        seq.store(s + 2, Ordering::Release);
    }

    /// Owner: the slot of the entry `(key0, tag, k)` in the probe run from
    /// `home`, inserting it in the first empty slot if absent (whether it
    /// was inserted is returned). Extent_op entries match on kind alone
    /// (their tag's low bits, key present and key type, are written by
    /// [`Table::store_eop`]).
    fn find_or_insert(&self, home: usize, key0: u64, tag: u64, k: [u64; 3]) -> (usize, bool) {
        let kind = tag >> KIND_SHIFT;
        let mut p = home;
        loop {
            let t = self.word(p, 1).load(Ordering::Relaxed);
            if t == 0 {
                self.word(p, 0).store(key0, Ordering::Relaxed);
                for (i, v) in k.iter().enumerate() {
                    self.word(p, 2 + i).store(*v, Ordering::Relaxed);
                }
                self.word(p, 1).store(tag, Ordering::Relaxed);
                bump(&self.used);
                return (p, true);
            }
            if self.word(p, 0).load(Ordering::Relaxed) == key0 {
                let hit = match kind {
                    KIND_HEAD => t == tag,
                    KIND_EOP => t >> KIND_SHIFT == KIND_EOP,
                    _ => {
                        t == tag
                            && (2..5).all(|i| self.word(p, i).load(Ordering::Relaxed) == k[i - 2])
                    }
                };
                if hit {
                    return (p, false);
                }
            }
            p = (p + 1) & self.mask;
        }
    }

    fn store_summary(&self, slot: usize, s: &HeadSummary) {
        let (level, mut bits) = match s.kind {
            ExtentKind::Data => (0, IS_DATA),
            ExtentKind::Tree { level } => (u64::from(level), 0),
        };
        if s.shape_known {
            bits |= SHAPE_KNOWN;
        }
        if s.mixed {
            bits |= MIXED;
        }
        let w = |i| self.word(slot, i);
        w(2).store(s.num_bytes, Ordering::Relaxed);
        w(3).store(s.total_ref_mod as u64, Ordering::Relaxed);
        w(4).store(s.alloc_stamp, Ordering::Relaxed);
        w(5).store(level | (bits << 8), Ordering::Relaxed);
    }

    fn store_eop(&self, slot: usize, e: &PendingExtentOp) {
        let w = |i| self.word(slot, i);
        w(2).store(e.flags_to_set, Ordering::Relaxed);
        w(3).store(e.flags_stamp, Ordering::Relaxed);
        let (stamp, k) = e.key.unwrap_or_default();
        let has_key = u64::from(e.key.is_some());
        let tag = (KIND_EOP << KIND_SHIFT) | (has_key << 8) | u64::from(k.item_type);
        w(1).store(tag, Ordering::Relaxed);
        w(4).store(stamp, Ordering::Relaxed);
        w(5).store(k.objectid, Ordering::Relaxed);
        w(6).store(k.offset, Ordering::Relaxed);
    }

    /// Owner: a copy with twice the slots (not yet published; nothing else
    /// writes either table meanwhile).
    pub fn grown(&self) -> Table {
        let t = Table::new(self.slots() * 2);
        for p in 0..self.slots() {
            let e = self.load(p);
            if e[1] == 0 {
                continue;
            }
            let mut q = t.home(e[0] - 1);
            while t.word(q, 1).load(Ordering::Relaxed) != 0 {
                q = (q + 1) & t.mask;
            }
            for (i, v) in e.iter().enumerate() {
                t.word(q, i).store(*v, Ordering::Relaxed);
            }
        }
        for c in [&t.used, &t.heads, &t.refs]
            .into_iter()
            .zip([&self.used, &self.heads, &self.refs])
        {
            c.0.store(c.1.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        t
    }

    /// Any thread: the pending head of `bytenr` held here, read
    /// consistently (see the module doc); `None` if the table has none.
    pub fn find(&self, bytenr: u64) -> Option<Head> {
        let home = self.home(bytenr);
        let mut buf = Vec::new();
        self.read_group(home / GROUP_SLOTS, |t| {
            buf.clear();
            t.probe_run(home, bytenr + 1, &mut buf);
        });
        decode_head(bytenr, &buf)
    }

    /// The entries of `key0` in the probe run from `home` (relaxed loads;
    /// inside a [`Table::read_group`]).
    fn probe_run(&self, home: usize, key0: u64, out: &mut Vec<Entry>) {
        let mut p = home;
        for _ in 0..self.slots() {
            let e = self.load(p);
            if e[1] == 0 {
                return;
            }
            if e[0] == key0 {
                out.push(e);
            }
            p = (p + 1) & self.mask;
        }
    }

    /// Run `read` until it saw no section of group `g` (the sequence
    /// counter protocol of the module doc).
    fn read_group(&self, g: usize, mut read: impl FnMut(&Table)) {
        let seq = &self.seqs[g];
        let (mut tries, mut spins) = (0u32, 0u32);
        let mut asked = false;
        loop {
            let s1 = seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                read(self);
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) == s1 {
                    break;
                }
            }
            tries += 1;
            if tries >= READ_TRIES_OPTIMISTIC && !asked {
                self.readers_waiting.fetch_add(1, Ordering::SeqCst);
                asked = true;
            }
            backoff(&mut spins);
        }
        if asked {
            self.readers_waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Any thread: every head held here as a sorted run (each head read
    /// consistently; on a table nobody writes, as it is).
    pub fn to_run(&self) -> RunBuilder {
        let mut heads: Vec<(u64, HeadSummary, u32, u32)> = Vec::new();
        let mut refs: Vec<PackedRef> = Vec::new();
        let mut region: Vec<Entry> = Vec::new();
        for g in 0..self.seqs.len() {
            self.read_group(g, |t| {
                region.clear();
                t.group_region(g, &mut region);
            });
            region.sort_unstable_by_key(|e| e[0]);
            for same in region.chunk_by(|a, b| a[0] == b[0]) {
                let bytenr = same[0][0] - 1;
                let Some((summary, start)) = decode_parts(same, &mut refs) else {
                    continue;
                };
                let n = refs.len() - start;
                heads.push((bytenr, summary, start as u32, n as u32));
            }
        }
        heads.sort_unstable_by_key(|h| h.0);
        let mut b = RunBuilder::new();
        for (bytenr, summary, start, n) in &heads {
            let (s, n) = (*start as usize, *n as usize);
            b.push(*bytenr, summary, &refs[s..s + n]);
        }
        b
    }

    /// The entries whose home slot is in group `g`: they lie between the
    /// group's first slot and the first empty slot at or after its end
    /// (an entry's probe run from its home is full, and nothing moves).
    fn group_region(&self, g: usize, out: &mut Vec<Entry>) {
        let start = g * GROUP_SLOTS;
        for i in 0..self.slots() {
            let p = (start + i) & self.mask;
            let e = self.load(p);
            if e[1] == 0 {
                if i >= GROUP_SLOTS {
                    return;
                }
                continue;
            }
            if e[0] != 0 && self.home(e[0] - 1) / GROUP_SLOTS == g {
                out.push(e);
            }
        }
    }
}

#[cfg(test)]
impl Table {
    /// Tests: set the kind byte of the first entry of `bytenr` whose kind
    /// is `from` to `to` (returns whether one was found).
    pub fn poke_kind(&self, bytenr: u64, from: u64, to: u64) -> bool {
        let mut p = self.home(bytenr);
        while self.word(p, 1).load(Ordering::Relaxed) != 0 {
            let t = self.word(p, 1).load(Ordering::Relaxed);
            if self.word(p, 0).load(Ordering::Relaxed) == bytenr + 1 && t >> KIND_SHIFT == from {
                let low = t & ((1 << KIND_SHIFT) - 1);
                self.word(p, 1)
                    .store((to << KIND_SHIFT) | low, Ordering::Relaxed);
                return true;
            }
            p = (p + 1) & self.mask;
        }
        false
    }

    /// Tests: overwrite the meta word of the head entry of `bytenr`.
    pub fn poke_meta(&self, bytenr: u64, meta: u64) {
        let mut p = self.home(bytenr);
        while self.word(p, 1).load(Ordering::Relaxed) != KIND_HEAD << KIND_SHIFT
            || self.word(p, 0).load(Ordering::Relaxed) != bytenr + 1
        {
            p = (p + 1) & self.mask;
        }
        self.word(p, 5).store(meta, Ordering::Relaxed);
    }
}

/// A head from its entries: `None` without a head entry (or when a word
/// does not decode: readers never assert on what they read).
fn decode_head(bytenr: u64, entries: &[Entry]) -> Option<Head> {
    let mut refs = Vec::new();
    let (summary, _) = decode_parts(entries, &mut refs)?;
    Some(Head {
        bytenr,
        summary,
        refs: refs.iter().map(PackedRef::unpack).collect(),
    })
}

/// The summary of one extent's entries, its kept refs appended to `refs`
/// sorted (returns where they start).
fn decode_parts(entries: &[Entry], refs: &mut Vec<PackedRef>) -> Option<(HeadSummary, usize)> {
    let start = refs.len();
    let mut summary = None;
    let mut eop = None;
    for e in entries {
        match e[1] >> KIND_SHIFT {
            KIND_HEAD => summary = Some(decode_summary(e)),
            KIND_EOP => eop = Some(decode_eop(e)),
            code => {
                let key = RefKey::from_words(code as u8, e[2], e[3], e[4]);
                let r = key.map(|key| DelayedRef {
                    key,
                    seq: e[1] & SEQ_MAX,
                    ref_mod: e[5] as i64,
                    drops: e[6],
                });
                refs.extend(r.filter(DelayedRef::is_kept).map(|r| PackedRef::pack(&r)));
            }
        }
    }
    let Some(mut summary) = summary else {
        refs.truncate(start);
        return None;
    };
    summary.extent_op = eop;
    // One entry per (key, seq): sorting is all that is left to do.
    refs[start..].sort_unstable_by_key(PackedRef::sort_key);
    Some((summary, start))
}

fn decode_summary(e: &Entry) -> HeadSummary {
    let bits = e[5] >> 8;
    HeadSummary {
        num_bytes: e[2],
        kind: if bits & IS_DATA != 0 {
            ExtentKind::Data
        } else {
            ExtentKind::Tree { level: e[5] as u8 }
        },
        shape_known: bits & SHAPE_KNOWN != 0,
        mixed: bits & MIXED != 0,
        alloc_stamp: e[4],
        total_ref_mod: e[3] as i64,
        extent_op: None,
    }
}

fn decode_eop(e: &Entry) -> PendingExtentOp {
    let has_key = (e[1] >> 8) & 1 == 1;
    PendingExtentOp {
        flags_to_set: e[2],
        flags_stamp: e[3],
        key: has_key.then_some((
            e[4],
            DiskKey {
                objectid: e[5],
                item_type: e[1] as u8,
                offset: e[6],
            },
        )),
    }
}

/// Run builders of several tables, sorted in parallel on the commit's run
/// workers where there are several.
pub(crate) fn tables_to_runs(tables: &[std::sync::Arc<Table>]) -> Vec<Vec<Chunk>> {
    crate::engine::in_parts(tables, 1, |_, part| {
        part.iter().map(|t| t.to_run().finish()).collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

/// Single-writer increment (the owner's counters: no locked RMW).
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// One step of a bounded wait (loom: a yield, so the model can progress).
#[cfg(loom)]
fn backoff(_spins: &mut u32) {
    loom::thread::yield_now();
}

/// One step of a bounded wait: spin, then yield, then sleep 50 µs.
#[cfg(not(loom))]
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 128 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}
