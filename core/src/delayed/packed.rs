//! Packed, sorted runs of heads and refs: the memory format of the
//! lock-free store's index.
//!
//! A *run* is a sorted sequence of merged heads, cut into [`Chunk`]s of at
//! most [`CHUNK_HEADS_MAX`] heads. A chunk holds its heads and their refs in
//! two flat arrays (40 bytes per head, 48 per ref, no per-item allocation),
//! plus a side table for the rare extent_ops. Merging sources (runs, sorted
//! staging batches) is a k-way merge by bytenr that copies refs straight
//! through when only one source has the head, and otherwise merges them in a
//! reused scratch buffer: no allocation per head.

use std::sync::atomic::{AtomicBool, Ordering};

use super::fence::{last_at_most_each, Fenced, Fences, Line};
use crate::head::{DelayedRef, Head, HeadSummary, PendingExtentOp, SummaryFold};
use crate::model::{Action, DiskKey, ExtentKind, ExtentOp, Op, RefKey, SEQ_MAX};

/// Words of a staged op: bytenr, num_bytes, k1, k2, k3, seq, stamp, meta
/// (action, type code, level, is_data, extent_op and key bits, key type),
/// extent_op flags, key objectid, key offset.
pub(crate) const STAGED_WORDS: usize = 11;

/// An op with its stamp as staged in a shard (plain words so readers can
/// load them atomically).
pub(crate) type Staged = [u64; STAGED_WORDS];

pub(crate) fn encode(op: &Op, stamp: u64) -> Staged {
    let (code, k1, k2, k3) = match op.key {
        Some(k) => {
            let (a, b, c) = k.words();
            (k.type_code(), a, b, c)
        }
        None => (0, 0, 0, 0),
    };
    let (is_data, level) = match op.kind {
        ExtentKind::Data => (1u64, 0u64),
        ExtentKind::Tree { level } => (0, u64::from(level)),
    };
    let (has_eop, eflags, ekey) = match op.extent_op {
        Some(e) => (1u64, e.flags_to_set, e.key),
        None => (0, 0, None),
    };
    let (has_key, kobj, ktype, koff) = match ekey {
        Some(k) => (1u64, k.objectid, u64::from(k.item_type), k.offset),
        None => (0, 0, 0, 0),
    };
    let meta = u64::from(op.action.code())
        | (u64::from(code) << 8)
        | (level << 16)
        | (is_data << 24)
        | (has_eop << 25)
        | (has_key << 26)
        | (ktype << 32);
    [
        op.bytenr,
        op.num_bytes,
        k1,
        k2,
        k3,
        op.seq,
        stamp,
        meta,
        eflags,
        kobj,
        koff,
    ]
}

/// The parts of a staged op's meta word (word 7) a hand-off needs to tell
/// a plain op (ADD_REF or DROP_REF with no extent_op, most of them) from
/// the others, and to fold and pack a plain one without decoding it.
#[derive(Clone, Copy)]
struct StagedMeta(u64);

impl StagedMeta {
    fn of(w: &Staged) -> StagedMeta {
        StagedMeta(w[7])
    }
    fn action(self) -> Option<Action> {
        Action::from_code(self.0 as u8)
    }
    fn key_code(self) -> u8 {
        (self.0 >> 8) as u8
    }
    fn kind(self) -> ExtentKind {
        if (self.0 >> 24) & 1 == 1 {
            ExtentKind::Data
        } else {
            ExtentKind::Tree {
                level: (self.0 >> 16) as u8,
            }
        }
    }
    fn has_extent_op(self) -> bool {
        (self.0 >> 25) & 1 == 1
    }
    fn has_eop_key(self) -> bool {
        (self.0 >> 26) & 1 == 1
    }
    fn eop_key_type(self) -> u8 {
        (self.0 >> 32) as u8
    }
}

/// The ref, ref count and extent kind of a plain staged op (`None`:
/// another op). Its key words are the packed ref's own (`encode` wrote
/// `RefKey::words`), so nothing is decoded: what `PackedRef::new` gives for
/// the decoded op (test `a_plain_staged_op_packs_as_its_decoded_op`).
fn plain_staged(w: &Staged) -> Option<(PackedRef, i64, ExtentKind)> {
    let meta = StagedMeta::of(w);
    let ref_mod = match meta.action()? {
        Action::AddRef if !meta.has_extent_op() => 1,
        Action::DropRef if !meta.has_extent_op() => -1,
        _ => return None,
    };
    // As `DelayedRef::of_mod`: a drop counts one drop.
    let drops = u64::from(ref_mod < 0);
    let r = PackedRef::of_words(meta.key_code(), (w[2], w[3], w[4]), w[5], ref_mod, drops);
    Some((r, ref_mod, meta.kind()))
}

/// Decode an op its own shard staged (the hand-off): it was checked once,
/// at [`crate::delayed::IngestHandle::add`], and written whole by this
/// thread, so it is not validated again (issue 13: an op was validated at
/// add and again here, on every op).
pub(crate) fn decode(w: &Staged) -> (Op, u64) {
    let out = decode_words(w).expect("a staged op written by its shard decodes");
    debug_assert!(out.0.check().is_ok(), "a staged op was checked at add");
    out
}

/// [`decode`] of words a reader copied while the writer may have been
/// reusing the slot: `None` when they are not one whole valid op (an
/// unknown action, an op that fails [`Op::check`], an allocation or
/// extent_op without a stamp). Such a read is retried by its caller (a
/// slot is only reused inside an index change, see `lockfree.rs`); it
/// must not reach the decoders' assertions first.
pub(crate) fn try_decode(w: &Staged) -> Option<(Op, u64)> {
    let (op, stamp) = decode_words(w)?;
    (op.check().is_ok() && (stamp != 0 || !op.is_stamped())).then_some((op, stamp))
}

/// The op the words spell, unvalidated: `None` only for an unknown action
/// code.
fn decode_words(w: &Staged) -> Option<(Op, u64)> {
    let meta = StagedMeta::of(w);
    let action = meta.action()?;
    let code = meta.key_code();
    let kind = meta.kind();
    let extent_op = if meta.has_extent_op() {
        Some(ExtentOp {
            flags_to_set: w[8],
            key: if meta.has_eop_key() {
                Some(DiskKey {
                    objectid: w[9],
                    item_type: meta.eop_key_type(),
                    offset: w[10],
                })
            } else {
                None
            },
        })
    } else {
        None
    };
    let op = Op {
        bytenr: w[0],
        num_bytes: w[1],
        kind,
        action,
        key: RefKey::from_words(code, w[2], w[3], w[4]),
        seq: w[5],
        extent_op,
    };
    Some((op, w[6]))
}

/// Heads per chunk (bounds one allocation and one binary search).
pub(crate) const CHUNK_HEADS_MAX: usize = 512;

const IS_DATA: u8 = 1;
const SHAPE_KNOWN: u8 = 2;
const MIXED: u8 = 4;
const HAS_EOP: u8 = 8;

/// A head without its refs: 40 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct PackedHead {
    pub bytenr: u64,
    num_bytes: u64,
    total_ref_mod: i64,
    alloc_stamp: u64,
    /// End (exclusive) of this head's refs in the chunk's ref array.
    ref_end: u32,
    level: u8,
    bits: u8,
    /// [`HeadSummary::allocs`].
    allocs: u16,
}

/// One delayed ref: 48 bytes. The backref type code sits in the top byte of
/// `seq_code` (seqs are at most [`SEQ_MAX`]); `drops` as in
/// [`DelayedRef`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct PackedRef {
    k1: u64,
    k2: u64,
    k3: u64,
    seq_code: u64,
    pub ref_mod: i64,
    pub drops: u64,
}

const _: () = assert!(std::mem::size_of::<PackedHead>() == 40);
const _: () = assert!(std::mem::size_of::<PackedRef>() == 48);

impl PackedRef {
    /// The ref of one op (`ref_mod` +1 or -1).
    pub fn new(key: RefKey, seq: u64, ref_mod: i64) -> PackedRef {
        Self::pack(&DelayedRef::of_mod(key, seq, ref_mod))
    }

    pub fn pack(r: &DelayedRef) -> PackedRef {
        Self::of_words(r.key.type_code(), r.key.words(), r.seq, r.ref_mod, r.drops)
    }

    /// The ref of a key given as its type code and words
    /// ([`RefKey::type_code`], [`RefKey::words`]), as staged ops hold it.
    fn of_words(
        code: u8,
        (k1, k2, k3): (u64, u64, u64),
        seq: u64,
        ref_mod: i64,
        drops: u64,
    ) -> PackedRef {
        debug_assert!(seq <= SEQ_MAX);
        PackedRef {
            k1,
            k2,
            k3,
            seq_code: (u64::from(code) << 56) | seq,
            ref_mod,
            drops,
        }
    }

    fn is_kept(&self) -> bool {
        self.ref_mod != 0 || self.drops != 0
    }

    fn code(&self) -> u8 {
        (self.seq_code >> 56) as u8
    }

    pub fn seq(&self) -> u64 {
        self.seq_code & SEQ_MAX
    }

    /// Ordering key equal to `(RefKey, seq)` ordering.
    #[inline]
    pub fn sort_key(&self) -> (u8, u64, u64, u64, u64) {
        (self.code(), self.k1, self.k2, self.k3, self.seq())
    }

    pub fn unpack(&self) -> DelayedRef {
        DelayedRef {
            key: RefKey::from_words(self.code(), self.k1, self.k2, self.k3)
                .expect("packed ref holds a valid type code"),
            seq: self.seq(),
            ref_mod: self.ref_mod,
            drops: self.drops,
        }
    }
}

impl PackedHead {
    fn pack(bytenr: u64, s: &HeadSummary, ref_end: u32) -> PackedHead {
        let mut bits = 0;
        let level = match s.kind {
            ExtentKind::Data => {
                bits |= IS_DATA;
                0
            }
            ExtentKind::Tree { level } => level,
        };
        if s.shape_known {
            bits |= SHAPE_KNOWN;
        }
        if s.mixed {
            bits |= MIXED;
        }
        if s.extent_op.is_some() {
            bits |= HAS_EOP;
        }
        PackedHead {
            bytenr,
            num_bytes: s.num_bytes,
            total_ref_mod: s.total_ref_mod,
            alloc_stamp: s.alloc_stamp,
            ref_end,
            level,
            bits,
            allocs: s.allocs,
        }
    }
}

/// A chunk of a run.
#[derive(Debug, Default)]
pub(crate) struct Chunk {
    heads: Box<[PackedHead]>,
    refs: Box<[PackedRef]>,
    eops: Box<[(u64, PendingExtentOp)]>,
    /// The heads' bytenrs' fences (`fence.rs`): a search of the chunk
    /// takes one round per level, 3 for a full chunk, not 9.
    fences: Fences,
}

// SAFETY: `fences` is built over exactly `heads` by `Chunk::new` (or both
// are empty: `Chunk::default`), and a chunk's fields never change after.
unsafe impl Fenced for &Chunk {
    fn len(&self) -> usize {
        self.heads.len()
    }

    fn fence_lines(&self) -> *const Line {
        self.fences.lines()
    }

    fn key(&self, i: usize) -> u64 {
        self.heads[i].bytenr
    }
}

/// A head inside a chunk, borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadRef<'a> {
    pub bytenr: u64,
    pub summary: HeadSummary,
    pub refs: &'a [PackedRef],
}

impl HeadRef<'_> {
    pub fn to_head(self) -> Head {
        Head {
            bytenr: self.bytenr,
            summary: self.summary,
            refs: self.refs.iter().map(PackedRef::unpack).collect(),
        }
    }
}

impl Chunk {
    /// A chunk of these heads (sorted by bytenr), their refs and
    /// extent_ops, with the fences of its heads' bytenrs. The only way a
    /// chunk is made: its fields never change after (`Fenced`'s contract).
    fn new(
        heads: Box<[PackedHead]>,
        refs: Box<[PackedRef]>,
        eops: Box<[(u64, PendingExtentOp)]>,
    ) -> Chunk {
        let fences = Fences::build(heads.len(), |i| heads[i].bytenr);
        Chunk {
            heads,
            refs,
            eops,
            fences,
        }
    }

    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// The bytenrs of the chunk's heads, in order.
    pub fn bytenrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.heads.iter().map(|h| h.bytenr)
    }

    pub fn first_bytenr(&self) -> u64 {
        self.heads.first().map_or(0, |h| h.bytenr)
    }

    /// Heap bytes held (for memory accounting in tests).
    pub fn heap_bytes(&self) -> usize {
        self.heads.len() * std::mem::size_of::<PackedHead>()
            + self.refs.len() * std::mem::size_of::<PackedRef>()
            + std::mem::size_of_val(&*self.eops)
            + self.fences.heap_bytes()
    }

    /// Head `i` as stored (no unpacking).
    pub fn raw(&self, i: usize) -> RawHead<'_> {
        let h = &self.heads[i];
        let start = if i == 0 {
            0
        } else {
            self.heads[i - 1].ref_end as usize
        };
        let eop = if h.bits & HAS_EOP != 0 {
            let j = self
                .eops
                .binary_search_by_key(&h.bytenr, |e| e.0)
                .expect("HAS_EOP head has an extent_op entry");
            Some(self.eops[j].1)
        } else {
            None
        };
        RawHead {
            head: h,
            refs: &self.refs[start..h.ref_end as usize],
            eop,
        }
    }

    pub fn head(&self, i: usize) -> HeadRef<'_> {
        self.raw(i).to_ref()
    }
}

/// The heads of `bytenr` in `chunks` (at most one per chunk, in the order
/// of `chunks`), appended to `out`. The searches run in lockstep, one
/// fence level of each per round (`fence::last_at_most_each`), so the cache
/// misses of different chunks overlap instead of queueing one search
/// behind another (a lookup searches one chunk per run that may hold its
/// bytenr).
pub(crate) fn find_in_chunks<'a>(chunks: &[&'a Chunk], bytenr: u64, out: &mut Vec<HeadRef<'a>>) {
    let mut found = Vec::with_capacity(chunks.len());
    last_at_most_each(chunks, bytenr, &mut found);
    for (c, i) in chunks.iter().zip(found) {
        if let Some(i) = i.filter(|&i| c.heads[i].bytenr == bytenr) {
            out.push(c.head(i));
        }
    }
}

/// A head as stored in a chunk: the packed head, its refs and extent_op.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawHead<'a> {
    head: &'a PackedHead,
    refs: &'a [PackedRef],
    eop: Option<PendingExtentOp>,
}

impl<'a> RawHead<'a> {
    pub fn bytenr(&self) -> u64 {
        self.head.bytenr
    }

    /// Unpack the summary.
    pub fn to_ref(self) -> HeadRef<'a> {
        let h = self.head;
        let kind = if h.bits & IS_DATA != 0 {
            ExtentKind::Data
        } else {
            ExtentKind::Tree { level: h.level }
        };
        HeadRef {
            bytenr: h.bytenr,
            summary: HeadSummary {
                num_bytes: h.num_bytes,
                kind,
                shape_known: h.bits & SHAPE_KNOWN != 0,
                mixed: h.bits & MIXED != 0,
                alloc_stamp: h.alloc_stamp,
                allocs: h.allocs,
                total_ref_mod: h.total_ref_mod,
                extent_op: self.eop,
            },
            refs: self.refs,
        }
    }
}

/// One merged head out of [`merge_cursors`]: a head found in a single
/// source is passed through as stored (compaction copies it without
/// unpacking); heads of several sources are merged.
#[derive(Debug)]
pub(crate) enum Merged<'a, 'b> {
    /// Only one source had this bytenr.
    Single(RawHead<'a>),
    /// Several sources, merged.
    Combined {
        /// Extent.
        bytenr: u64,
        /// Merged summary.
        summary: HeadSummary,
        /// Merged refs (sorted, each kept).
        refs: &'b [PackedRef],
    },
}

impl<'a> Merged<'a, '_> {
    /// As a borrowed head (unpacking a single source's summary).
    pub fn head_ref(&self) -> HeadRef<'_> {
        match self {
            Merged::Single(raw) => raw.to_ref(),
            Merged::Combined {
                bytenr,
                summary,
                refs,
            } => HeadRef {
                bytenr: *bytenr,
                summary: *summary,
                refs,
            },
        }
    }
}

/// Builds a run chunk by chunk from heads pushed in ascending bytenr order.
#[derive(Debug, Default)]
pub(crate) struct RunBuilder {
    chunks: Vec<Chunk>,
    heads: Vec<PackedHead>,
    refs: Vec<PackedRef>,
    eops: Vec<(u64, PendingExtentOp)>,
    last: Option<u64>,
    pub heads_total: usize,
    pub refs_total: usize,
    /// The heads built from at least [`build_run_noting`]'s `heavy_min`
    /// ops or of an extent it was told is hot, with their summary and op
    /// count, in bytenr order: what a hand-off tells its index about its
    /// hot extents (`TxnIndex::hand_off`).
    pub heavy: Vec<(u64, HeadSummary, u32)>,
}

impl RunBuilder {
    pub fn new() -> RunBuilder {
        RunBuilder {
            heads: Vec::with_capacity(CHUNK_HEADS_MAX),
            refs: Vec::with_capacity(4 * CHUNK_HEADS_MAX),
            ..RunBuilder::default()
        }
    }

    /// Append a merged head. A head whose refs all cancelled is kept: the
    /// size and kind its ops named still take part in later merges (merging
    /// is associative only if nothing is dropped before the final merge).
    /// Only the identity (nothing at all) is skipped.
    pub fn push(&mut self, bytenr: u64, summary: &HeadSummary, refs: &[PackedRef]) {
        debug_assert!(self.last.is_none_or(|l| l < bytenr), "heads out of order");
        self.last = Some(bytenr);
        if refs.is_empty()
            && summary.alloc_stamp == 0
            && summary.extent_op.is_none()
            && !summary.shape_known
        {
            return;
        }
        debug_assert!(refs.iter().all(PackedRef::is_kept));
        self.append(
            PackedHead::pack(bytenr, summary, 0),
            refs,
            summary.extent_op,
        );
    }

    /// Append a merged head, copying a single source's packed head as is.
    pub fn push_merged(&mut self, m: Merged<'_, '_>) {
        match m {
            Merged::Single(raw) => {
                debug_assert!(
                    self.last.is_none_or(|l| l < raw.bytenr()),
                    "heads out of order"
                );
                self.last = Some(raw.bytenr());
                self.append(*raw.head, raw.refs, raw.eop);
            }
            Merged::Combined {
                bytenr,
                summary,
                refs,
            } => self.push(bytenr, &summary, refs),
        }
    }

    fn append(&mut self, mut head: PackedHead, refs: &[PackedRef], eop: Option<PendingExtentOp>) {
        // Most heads have one ref: a push, not a call of memcpy.
        if let [r] = refs {
            self.refs.push(*r);
        } else {
            self.refs.extend_from_slice(refs);
        }
        head.ref_end = u32::try_from(self.refs.len()).expect("chunk refs fit u32");
        let bytenr = head.bytenr;
        self.heads.push(head);
        if let Some(e) = eop {
            self.eops.push((bytenr, e));
        }
        self.heads_total += 1;
        self.refs_total += refs.len();
        // Cut at a head count, or earlier for huge heads (bound chunk size).
        if self.heads.len() >= CHUNK_HEADS_MAX || self.refs.len() >= 64 * CHUNK_HEADS_MAX {
            self.cut();
        }
    }

    /// Seal the current chunk. A full chunk's heads (len == capacity)
    /// become the chunk's, and a new array of [`CHUNK_HEADS_MAX`] takes
    /// their place; otherwise the heads, like the refs and extent_ops, are
    /// copied at exact size and the scratch keeps its capacity.
    fn cut(&mut self) {
        if self.heads.is_empty() {
            return;
        }
        // A full chunk's heads fill the scratch exactly: it becomes the
        // chunk's (no copy) and a new one takes its place.
        let heads = if self.heads.len() == self.heads.capacity() {
            std::mem::replace(&mut self.heads, Vec::with_capacity(CHUNK_HEADS_MAX))
                .into_boxed_slice()
        } else {
            Box::from(&self.heads[..])
        };
        self.chunks.push(Chunk::new(
            heads,
            Box::from(&self.refs[..]),
            Box::from(&self.eops[..]),
        ));
        self.heads.clear();
        self.refs.clear();
        self.eops.clear();
    }

    pub fn finish(mut self) -> Vec<Chunk> {
        self.cut();
        self.chunks
    }
}

/// How many heads ahead a merge's cursor asks for a head's refs.
const PREFETCH_REFS_AHEAD: usize = 10;

/// Whether merges and run builds prefetch ahead: on, but for
/// `refd-bench merge`'s runs without it ([`set_prefetching`]).
static PREFETCH: AtomicBool = AtomicBool::new(true);

pub(crate) fn prefetching() -> bool {
    PREFETCH.load(Ordering::Relaxed)
}

/// Turns prefetching in merges and run builds on or off for the whole
/// process (`refd-bench merge` measures what it saves; nothing else
/// turns it off).
pub(crate) fn set_prefetching(on: bool) {
    PREFETCH.store(on, Ordering::Relaxed);
}

/// Asks the CPU to bring the cache line holding `p` into its caches
/// ahead of a read: a hint, on x86_64 only (elsewhere nothing).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults and changes no memory,
    // whatever the address (`p` may be past its allocation), and SSE is in
    // the baseline of every x86_64 target.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A cursor over a sorted sequence of chunks (one source of a merge). The
/// next head's bytenr is cached (`u64::MAX` at the end: bytenr + num_bytes
/// cannot overflow, so no real head sits there).
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    chunks: Vec<&'a Chunk>,
    c: usize,
    i: usize,
    next: u64,
    /// Heads at or above this bytenr are past the end (`u64::MAX`: none).
    end: u64,
}

impl<'a> Cursor<'a> {
    pub fn new(chunks: Vec<&'a Chunk>) -> Cursor<'a> {
        Cursor::range(chunks, 0, u64::MAX)
    }

    /// A cursor over the heads of `chunks` with `start <= bytenr < end`
    /// (one part of a merge split by bytenr).
    pub fn range(chunks: Vec<&'a Chunk>, start: u64, end: u64) -> Cursor<'a> {
        // The first chunk whose last head is at or after `start`, and in it
        // the first such head.
        let c = chunks.partition_point(|ch| ch.heads.last().is_none_or(|h| h.bytenr < start));
        let i = chunks
            .get(c)
            .map_or(0, |ch| ch.heads.partition_point(|h| h.bytenr < start));
        let mut cur = Cursor {
            chunks,
            c,
            i,
            next: u64::MAX,
            end,
        };
        cur.settle();
        cur
    }

    fn settle(&mut self) {
        while self.c < self.chunks.len() && self.i >= self.chunks[self.c].len() {
            self.c += 1;
            self.i = 0;
        }
        self.next = match self.chunks.get(self.c) {
            Some(ch) if ch.heads[self.i].bytenr < self.end => ch.heads[self.i].bytenr,
            _ => u64::MAX,
        };
    }

    #[inline]
    pub fn peek(&self) -> Option<u64> {
        (self.next != u64::MAX).then_some(self.next)
    }

    pub fn next_raw(&mut self) -> Option<RawHead<'a>> {
        self.peek()?;
        let ch: &'a Chunk = self.chunks.get(self.c)?;
        let h = ch.raw(self.i);
        self.i += 1;
        if prefetching() {
            // A merge of many sources (a commit's: 64 and more) reads too
            // many streams for the hardware prefetcher: ask for the two
            // lines around the end of the refs of the head
            // `PREFETCH_REFS_AHEAD` on (the start of the next one's), and
            // for the heads 4x further (measured: section "Issue 13: the
            // merge pass" of docs/benchmarks.md; with 8 sources it changes
            // nothing measurable).
            if let Some(ahead) = ch.heads.get(self.i + PREFETCH_REFS_AHEAD) {
                let refs = ch.refs.as_ptr().wrapping_add(ahead.ref_end as usize);
                prefetch(refs);
                prefetch(refs.cast::<u8>().wrapping_sub(64));
            }
            prefetch(
                ch.heads
                    .as_ptr()
                    .wrapping_add(self.i + 4 * PREFETCH_REFS_AHEAD),
            );
        }
        self.settle();
        Some(h)
    }
}

/// Heads of `chunks` (a sorted sequence) with `start <= bytenr < end`.
pub(crate) fn heads_in_range(chunks: &[&Chunk], start: u64, end: u64) -> usize {
    // Heads before `x`: whole chunks that end before it, plus a prefix of
    // the chunk it falls in.
    let before = |x: u64| -> usize {
        let c = chunks.partition_point(|ch| ch.heads.last().is_none_or(|h| h.bytenr < x));
        let whole: usize = chunks[..c].iter().map(|ch| ch.len()).sum();
        whole
            + chunks
                .get(c)
                .map_or(0, |ch| ch.heads.partition_point(|h| h.bytenr < x))
    };
    before(end) - before(start)
}

/// Bytenrs that split the heads of `sources` (each a sorted sequence of
/// chunks) into at most `parts` ranges of about equal head counts, judged
/// by chunk: ascending, each the first bytenr of some chunk, none 0.
/// Part `k` is `[splits[k-1], splits[k])`, with 0 and `u64::MAX` at the
/// ends.
pub(crate) fn split_points(sources: &[Vec<&Chunk>], parts: usize) -> Vec<u64> {
    let mut firsts: Vec<(u64, usize)> = sources
        .iter()
        .flatten()
        .filter(|ch| ch.len() > 0)
        .map(|ch| (ch.first_bytenr(), ch.len()))
        .collect();
    firsts.sort_unstable();
    let total: usize = firsts.iter().map(|&(_, n)| n).sum();
    let per = total.div_ceil(parts.max(1)).max(1);
    let mut splits = Vec::with_capacity(parts);
    let mut seen = 0;
    for (bytenr, n) in firsts {
        if seen >= per * (splits.len() + 1) && bytenr > splits.last().copied().unwrap_or(0) {
            splits.push(bytenr);
            if splits.len() + 1 == parts {
                break;
            }
        }
        seen += n;
    }
    splits
}

/// Sort and merge packed refs of one head in place: sum equal `(key, seq)`
/// (ref_mod and drops), drop refs that are no longer kept. Past
/// [`MERGE_HASHED_MIN`] refs, equal ones are summed through a small hash
/// table first ([`sum_equal_hashed`]), so that only the distinct ones are
/// sorted: a hot extent's hundreds of ops in one hand-off name few
/// distinct refs, and sorting them all (48-byte refs, a five-field key)
/// was two fifths of a zipf hand-off's time.
pub(crate) fn merge_refs(scratch: &mut Vec<PackedRef>) {
    if scratch.len() >= MERGE_HASHED_MIN {
        sum_equal_hashed(scratch);
    }
    scratch.sort_unstable_by_key(PackedRef::sort_key);
    let mut w = 0;
    for r in 0..scratch.len() {
        if w > 0 && scratch[w - 1].sort_key() == scratch[r].sort_key() {
            scratch[w - 1].ref_mod += scratch[r].ref_mod;
            scratch[w - 1].drops += scratch[r].drops;
        } else {
            scratch[w] = scratch[r];
            w += 1;
        }
    }
    scratch.truncate(w);
    scratch.retain(PackedRef::is_kept);
}

/// Refs of one head from which [`merge_refs`] sums equal ones by hashing
/// before it sorts.
const MERGE_HASHED_MIN: usize = 32;

/// Slots of [`sum_equal_hashed`]'s table (on the stack: 1 KiB).
const MERGE_HASH_SLOTS: usize = 512;

/// The home slot of `r` in [`sum_equal_hashed`]'s table: every word of
/// the key and the seq folded into one, multiplied, and the product's top
/// bits taken (a product's bit i depends only on the factors' bits up to
/// i, so only its top bits see all of them: with bits 40.. of the product,
/// 512 refs of one inode at 4 KiB offsets all had one slot).
fn ref_slot(r: &PackedRef) -> usize {
    let x = r.k1 ^ r.k2.rotate_left(21) ^ r.k3.rotate_left(42) ^ r.seq_code.rotate_left(11);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - MERGE_HASH_SLOTS.trailing_zeros())) as usize
}

/// Sum equal `(key, seq)` refs of `refs` in place, leaving one ref per
/// distinct key and seq (in first-seen order, unsorted) followed by
/// nothing: linear probing over a table of [`MERGE_HASH_SLOTS`] indices.
/// Once half the table is used (that many distinct refs: hashing no longer
/// pays), the refs not yet seen are kept as they are, after the distinct
/// ones; the caller's sort and merge then finishes (sums are additive, so
/// summing some equal refs first changes nothing).
fn sum_equal_hashed(refs: &mut Vec<PackedRef>) {
    const _: () = assert!(MERGE_HASH_SLOTS.is_power_of_two() && MERGE_HASH_SLOTS < 1 << 16);
    let mut table = [u16::MAX; MERGE_HASH_SLOTS];
    let mask = MERGE_HASH_SLOTS - 1;
    let mut w = 0;
    let mut r = 0;
    while r < refs.len() && w < MERGE_HASH_SLOTS / 2 {
        let x = refs[r];
        let mut slot = ref_slot(&x);
        loop {
            let i = table[slot];
            if i == u16::MAX {
                table[slot] = w as u16;
                refs[w] = x;
                w += 1;
                break;
            }
            let i = usize::from(i);
            if refs[i].sort_key() == x.sort_key() {
                refs[i].ref_mod += x.ref_mod;
                refs[i].drops += x.drops;
                break;
            }
            slot = (slot + 1) & mask;
        }
        r += 1;
    }
    // w <= r: the distinct refs occupy the front; move the unseen rest
    // behind them.
    refs.copy_within(r.., w);
    refs.truncate(w + (refs.len() - r));
}

/// k-way merge of sorted sources by bytenr; `emit` gets each merged head
/// once, in ascending bytenr order (a head of one source as stored). A
/// linear scan picks the minimum for up to `LINEAR_MAX` = 8 sources
/// (compaction merges `COMPACT_FANOUT` = 8), a heap for more (a commit
/// merges every run and staging batch).
pub(crate) fn merge_cursors<'a>(
    mut cursors: Vec<Cursor<'a>>,
    mut emit: impl FnMut(Merged<'a, '_>),
) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    const LINEAR_MAX: usize = 8;
    cursors.retain(|c| c.peek().is_some());
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = if cursors.len() > LINEAR_MAX {
        cursors
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.peek().map(|b| Reverse((b, i))))
            .collect()
    } else {
        BinaryHeap::new()
    };
    let linear = cursors.len() <= LINEAR_MAX;
    let mut scratch: Vec<PackedRef> = Vec::new();
    let mut same: Vec<usize> = Vec::with_capacity(cursors.len());
    loop {
        // Collect the sources whose next head has the lowest bytenr.
        same.clear();
        let bytenr = if linear {
            // Over the (at most 8) sources, no branch per source: the
            // minimum in one pass, then a bit mask of the sources at it,
            // in ascending order (a finished cursor's next is `u64::MAX`).
            let min = cursors.iter().map(|c| c.next).min().unwrap_or(u64::MAX);
            if min == u64::MAX {
                break;
            }
            let mut at_min = cursors
                .iter()
                .enumerate()
                .fold(0u32, |m, (i, c)| m | (u32::from(c.next == min) << i));
            while at_min != 0 {
                same.push(at_min.trailing_zeros() as usize);
                at_min &= at_min - 1;
            }
            min
        } else {
            let Some(Reverse((min, i))) = heap.pop() else {
                break;
            };
            same.push(i);
            while let Some(&Reverse((b, j))) = heap.peek() {
                if b != min {
                    break;
                }
                heap.pop();
                same.push(j);
            }
            min
        };
        let first = cursors[same[0]].next_raw().expect("peeked");
        if same.len() == 1 {
            emit(Merged::Single(first));
        } else {
            let first = first.to_ref();
            let mut summary = first.summary;
            scratch.clear();
            scratch.extend_from_slice(first.refs);
            for &j in &same[1..] {
                let other = cursors[j].next_raw().expect("peeked").to_ref();
                summary = summary.merge(other.summary);
                scratch.extend_from_slice(other.refs);
            }
            merge_refs(&mut scratch);
            emit(Merged::Combined {
                bytenr,
                summary,
                refs: &scratch,
            });
        }
        if !linear {
            for &j in &same {
                if let Some(b) = cursors[j].peek() {
                    heap.push(Reverse((b, j)));
                }
            }
        }
    }
}

/// Bits of one digit of [`sort_by_bytenr`]: 2^11 counters (8 KiB) stay
/// in L1.
const RADIX_DIGIT_BITS: u32 = 11;

/// Sort `(bytenr, index)` keys by bytenr (stable): a least-significant-
/// digit radix sort over only the bits in which the keys differ (bytenrs
/// are sector multiples and share their high bits, so a staging buffer's
/// 4096 keys over a 4 GiB range take 2 passes). It replaced a comparison
/// sort that was about a quarter of a hand-off's CPU (perf, issue 13:
/// "the compactor's memory"). `tmp` is scratch.
pub(crate) fn sort_by_bytenr(keys: &mut Vec<(u64, u32)>, tmp: &mut Vec<(u64, u32)>) {
    let Some(&(first, _)) = keys.first() else {
        return;
    };
    let differ = keys.iter().fold(0u64, |d, &(b, _)| d | (b ^ first));
    if differ == 0 {
        return;
    }
    let (lo, hi) = (differ.trailing_zeros(), 64 - differ.leading_zeros());
    let buckets = 1usize << RADIX_DIGIT_BITS;
    let mut counts = vec![0usize; buckets];
    tmp.clear();
    tmp.resize(keys.len(), (0, 0));
    let mut shift = lo;
    while shift < hi {
        let mask = (buckets - 1) as u64;
        let digit = |b: u64| ((b >> shift) & mask) as usize;
        counts.iter_mut().for_each(|c| *c = 0);
        for &(b, _) in keys.iter() {
            counts[digit(b)] += 1;
        }
        let mut at = 0;
        for c in counts.iter_mut() {
            let n = *c;
            *c = at;
            at += n;
        }
        for &k in keys.iter() {
            let d = digit(k.0);
            tmp[counts[d]] = k;
            counts[d] += 1;
        }
        std::mem::swap(keys, tmp);
        shift += RADIX_DIGIT_BITS;
    }
    debug_assert!(keys.windows(2).all(|w| w[0].0 <= w[1].0), "radix sort");
}

/// Build a run from staged ops: sort by a 16-byte `(bytenr, index)` key
/// (not the 88-byte ops; [`sort_by_bytenr`]), merge each bytenr's ops at
/// insert: a plain op folded and packed from its words ([`plain_staged`]),
/// any other decoded once.
pub(crate) fn build_run(staged: &[Staged]) -> RunBuilder {
    build_run_noting(staged, usize::MAX, &[])
}

/// Staged ops a run is built from: a copy ([`Staged`] words) or a full
/// staging buffer read in place (`lockfree.rs`).
pub(crate) trait StagedOps {
    /// Ops held.
    fn count(&self) -> usize;
    /// Op `i`'s bytenr (its word 0).
    fn bytenr(&self, i: usize) -> u64;
    /// Op `i`'s words.
    fn words(&self, i: usize) -> Staged;
    /// Asks for op `i`'s words ahead of [`StagedOps::words`] (a hint).
    fn prefetch_op(&self, i: usize);
}

impl StagedOps for [Staged] {
    fn count(&self) -> usize {
        self.len()
    }

    fn bytenr(&self, i: usize) -> u64 {
        self[i][0]
    }

    fn words(&self, i: usize) -> Staged {
        self[i]
    }

    fn prefetch_op(&self, i: usize) {
        let w = self.as_ptr().wrapping_add(i);
        prefetch(w);
        prefetch(w.cast::<u8>().wrapping_add(64));
    }
}

/// [`build_run`], noting in [`RunBuilder::heavy`] each head merged from at
/// least `heavy_min` ops or whose bytenr is in `hot` (ascending).
pub(crate) fn build_run_noting(
    staged: &(impl StagedOps + ?Sized),
    heavy_min: usize,
    hot: &[u64],
) -> RunBuilder {
    debug_assert!(hot.is_sorted());
    let mut hot = hot.iter().copied().peekable();
    let n = staged.count();
    let mut order: Vec<(u64, u32)> = (0..n).map(|i| (staged.bytenr(i), i as u32)).collect();
    sort_by_bytenr(&mut order, &mut Vec::with_capacity(n));
    let mut b = RunBuilder::new();
    let mut scratch: Vec<PackedRef> = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let bytenr = order[i].0;
        let first = i;
        let mut summary = SummaryFold::default();
        scratch.clear();
        while i < order.len() && order[i].0 == bytenr {
            // The ops are read in bytenr order, at random in the buffer.
            if let Some(&(_, j)) = order.get(i + 8).filter(|_| prefetching()) {
                staged.prefetch_op(j as usize);
            }
            let w = &staged.words(order[i].1 as usize);
            // Read twice (for the sort, then with the op): equal, as
            // no one writes the ops meanwhile.
            debug_assert_eq!(w[0], bytenr, "a staged op changed during its build");
            if let Some((r, ref_mod, kind)) = plain_staged(w) {
                // Most ops: folded and packed from their words.
                summary.plain(w[1], kind, ref_mod);
                scratch.push(r);
            } else {
                let (op, stamp) = decode(w);
                summary.op(&op, stamp);
                if let Some(key) = op.key {
                    scratch.push(PackedRef::new(key, op.seq, op.ref_mod()));
                }
            }
            i += 1;
        }
        if scratch.len() > 1 {
            merge_refs(&mut scratch);
        }
        let summary = summary.finish().expect("at least one op");
        let pushed = b.heads_total;
        b.push(bytenr, &summary, &scratch);
        let ops = i - first;
        while hot.next_if(|&h| h < bytenr).is_some() {}
        let is_hot = hot.next_if_eq(&bytenr).is_some();
        if (ops >= heavy_min || is_hot) && b.heads_total > pushed {
            b.heavy.push((bytenr, summary, ops as u32));
        }
    }
    b
}

/// Chunks of one tree-block head per bytenr (ascending), each with one
/// ref from root 5: runs for tests of the searches.
#[cfg(test)]
pub(crate) fn tree_block_chunks(bytenrs: &[u64]) -> Vec<Chunk> {
    let key = RefKey::TreeBlock { root: 5 };
    let mut b = RunBuilder::new();
    for &bytenr in bytenrs {
        let op = Op::new(
            bytenr,
            4096,
            ExtentKind::Tree { level: 0 },
            Action::AddRef,
            key,
            0,
        )
        .expect("a valid tree-block op");
        b.push(
            bytenr,
            &HeadSummary::of_op(&op, 0),
            &[PackedRef::new(key, 0, 1)],
        );
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, Op};

    /// A plain op (ADD_REF or DROP_REF, no extent_op) packed and folded
    /// from its staged words is what decoding it gives, for every key
    /// kind, data and tree levels, seqs; every other op is left to the
    /// decoder.
    #[test]
    fn a_plain_staged_op_packs_as_its_decoded_op() {
        use crate::model::{DiskKey, ExtentOp, BLOCK_FLAG_FULL_BACKREF};
        let keys = [
            (RefKey::TreeBlock { root: 5 }, ExtentKind::Tree { level: 3 }),
            (
                RefKey::SharedBlock { parent: 1 << 30 },
                ExtentKind::Tree { level: 0 },
            ),
            (
                RefKey::ExtentData {
                    root: 7,
                    objectid: 257,
                    offset: 1 << 20,
                },
                ExtentKind::Data,
            ),
            (RefKey::SharedData { parent: 1 << 31 }, ExtentKind::Data),
        ];
        for (key, kind) in keys {
            for action in [Action::AddRef, Action::DropRef, Action::AddExtent] {
                for seq in [0, 1, SEQ_MAX] {
                    for eop in [false, true] {
                        let mut op = Op::new(1 << 20, 16384, kind, action, key, seq).unwrap();
                        if eop {
                            op.extent_op = Some(ExtentOp {
                                flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                                key: Some(DiskKey {
                                    objectid: 1,
                                    item_type: 2,
                                    offset: 3,
                                }),
                            });
                        }
                        let w = encode(&op, 9);
                        let plain = matches!(action, Action::AddRef | Action::DropRef) && !eop;
                        match plain_staged(&w) {
                            Some((r, ref_mod, kind)) => {
                                assert!(plain, "{op:?}");
                                assert_eq!(r, PackedRef::new(key, seq, op.ref_mod()), "{op:?}");
                                assert_eq!(ref_mod, op.ref_mod());
                                let mut a = SummaryFold::default();
                                a.plain(w[1], kind, ref_mod);
                                let mut b = SummaryFold::default();
                                b.op(&op, 9);
                                assert_eq!(a.finish(), b.finish(), "{op:?}");
                            }
                            None => assert!(!plain, "{op:?}"),
                        }
                    }
                }
            }
        }
    }

    /// Refs that differ in one field only (an inode's 4 KiB offsets, the
    /// objectids of one root, roots, parents, seqs) spread over the hash
    /// table's slots: a slot shared by many of them makes the linear
    /// probing quadratic (a hot extent reflinked at many offsets).
    #[test]
    fn ref_slots_spread_keys_that_differ_in_one_field() {
        let families: [&dyn Fn(u64) -> PackedRef; 5] = [
            &|i| {
                PackedRef::new(
                    RefKey::ExtentData {
                        root: 5,
                        objectid: 257,
                        offset: i << 12,
                    },
                    0,
                    1,
                )
            },
            &|i| {
                PackedRef::new(
                    RefKey::ExtentData {
                        root: 5,
                        objectid: 256 + i,
                        offset: 0,
                    },
                    0,
                    1,
                )
            },
            &|i| PackedRef::new(RefKey::TreeBlock { root: 256 + i }, 0, 1),
            &|i| {
                PackedRef::new(
                    RefKey::SharedBlock {
                        parent: (1 + i) << 14,
                    },
                    0,
                    1,
                )
            },
            &|i| PackedRef::new(RefKey::TreeBlock { root: 5 }, i, 1),
        ];
        for (f, refs) in families.iter().enumerate() {
            let slots: std::collections::HashSet<usize> =
                (0..256).map(|i| ref_slot(&refs(i))).collect();
            assert!(
                slots.len() >= 128,
                "family {f}: 256 refs in {} slots",
                slots.len()
            );
        }
    }

    proptest::proptest! {
        /// `merge_refs` (summing by hash past `MERGE_HASHED_MIN` refs, and
        /// falling back to sorting past half its table) gives what sorting
        /// and summing every ref gives: few distinct refs repeated many
        /// times, and more distinct ones than the table takes.
        #[test]
        fn merge_refs_is_sort_and_sum(
            refs in proptest::collection::vec((0u64..600, 0u64..3, proptest::bool::ANY), 0..1500),
            distinct in 1u64..600,
        ) {
            let refs: Vec<PackedRef> = refs
                .iter()
                .map(|&(k, seq, add)| {
                    let k = k % distinct;
                    let key = if k % 2 == 0 {
                        RefKey::TreeBlock { root: 5 + k }
                    } else {
                        RefKey::ExtentData { root: 5, objectid: 256 + k, offset: k << 12 }
                    };
                    PackedRef::new(key, seq, if add { 1 } else { -1 })
                })
                .collect();
            let mut want = refs.clone();
            want.sort_by_key(PackedRef::sort_key);
            let mut sums: Vec<PackedRef> = Vec::new();
            for r in want {
                match sums.last_mut() {
                    Some(l) if l.sort_key() == r.sort_key() => {
                        l.ref_mod += r.ref_mod;
                        l.drops += r.drops;
                    }
                    _ => sums.push(r),
                }
            }
            sums.retain(|r| r.ref_mod != 0 || r.drops != 0);
            let mut got = refs;
            merge_refs(&mut got);
            proptest::prop_assert_eq!(got, sums);
        }
    }

    /// The lockstep searches find exactly what one binary search per
    /// chunk finds: every head present (first, last, middle, chunks of one
    /// head and of a full 512), nothing absent, in the order of the chunks.
    #[test]
    fn lockstep_search_finds_what_binary_search_finds() {
        let chunk = tree_block_chunks;
        let runs: Vec<Vec<Chunk>> = vec![
            chunk(&[4096]),
            chunk(&(1..=512).map(|i| i * 8192).collect::<Vec<_>>()),
            chunk(&(1..=300).map(|i| i * 4096 * 3).collect::<Vec<_>>()),
            chunk(&[]),
        ];
        let chunks: Vec<&Chunk> = runs.iter().flatten().collect();
        for bytenr in (0..1600).map(|i| i * 4096) {
            let mut found = Vec::new();
            find_in_chunks(&chunks, bytenr, &mut found);
            let want: Vec<u64> = chunks
                .iter()
                .filter(|c| c.bytenrs().any(|b| b == bytenr))
                .map(|_| bytenr)
                .collect();
            let got: Vec<u64> = found.iter().map(|h| h.bytenr).collect();
            assert_eq!(got, want, "bytenr {bytenr}");
        }
    }

    #[test]
    fn packed_ref_order_matches_ref_key_order() {
        let keys = [
            RefKey::TreeBlock { root: 3 },
            RefKey::TreeBlock { root: 9 },
            RefKey::ExtentData {
                root: 1,
                objectid: 2,
                offset: 9,
            },
            RefKey::ExtentData {
                root: 1,
                objectid: 3,
                offset: 0,
            },
            RefKey::SharedBlock { parent: 1 },
            RefKey::SharedData { parent: 1 },
        ];
        for w in keys.windows(2) {
            for (s1, s2) in [(0, 0), (5, 1), (0, 7)] {
                let a = PackedRef::new(w[0], s1, 1);
                let b = PackedRef::new(w[1], s2, 1);
                assert!(a.sort_key() < b.sort_key());
                assert_eq!(a.unpack().key, w[0]);
            }
        }
        let a = PackedRef::new(keys[0], 1, 1);
        let b = PackedRef::new(keys[0], 2, -1);
        assert!(a.sort_key() < b.sort_key());
        assert_eq!(b.unpack().seq, 2);
    }

    /// Range cursors over split points cover every head of every source
    /// exactly once: merging the ranges one after another gives what one
    /// merge of the whole gives, whatever the number of parts, with chunk
    /// boundaries, empty ranges and a bytenr stored in every source.
    #[test]
    fn range_cursors_over_split_points_cover_every_head_once() {
        let key = RefKey::ExtentData {
            root: 5,
            objectid: 300,
            offset: 0,
        };
        let run_of = |bytenrs: &[u64]| -> Vec<Chunk> {
            let mut b = RunBuilder::new();
            for &x in bytenrs {
                let op = Op::new(x, 4096, ExtentKind::Data, Action::AddRef, key, 0).unwrap();
                let h = Head::of_op(&op, 1);
                let refs: Vec<PackedRef> = h.refs.iter().map(PackedRef::pack).collect();
                b.push(h.bytenr, &h.summary, &refs);
            }
            b.finish()
        };
        // Three sources, more than one chunk each; 78 << 12 in all three.
        let a: Vec<u64> = (0..3 * CHUNK_HEADS_MAX as u64)
            .map(|i| (i * 3) << 12)
            .collect();
        let b: Vec<u64> = (0..CHUNK_HEADS_MAX as u64 + 5)
            .map(|i| (i * 5 + 2) << 12)
            .collect();
        let c: Vec<u64> = vec![78 << 12, 1 << 40];
        let mut b2 = b.clone();
        b2.push(78 << 12);
        b2.sort_unstable();
        b2.dedup();
        let runs = [run_of(&a), run_of(&b2), run_of(&c)];
        let sources: Vec<Vec<&Chunk>> = runs.iter().map(|r| r.iter().collect()).collect();
        let collect = |cursors: Vec<Cursor<'_>>, out: &mut Vec<(u64, i64)>| {
            merge_cursors(cursors, |m| {
                let h = m.head_ref();
                out.push((h.bytenr, h.summary.total_ref_mod));
            });
        };
        let mut whole = Vec::new();
        collect(
            sources.iter().map(|s| Cursor::new(s.clone())).collect(),
            &mut whole,
        );
        assert!(
            whole.contains(&(78 << 12, 3)),
            "the shared bytenr merged once"
        );
        for parts in [1, 2, 3, 7, 64] {
            let splits = split_points(&sources, parts);
            assert!(splits.len() < parts.max(1));
            assert!(splits.windows(2).all(|w| w[0] < w[1]) && splits.iter().all(|&s| s > 0));
            if parts > 1 {
                assert!(!splits.is_empty(), "{parts} parts: no split");
            }
            let mut lo = 0;
            let mut got = Vec::new();
            for hi in splits.iter().copied().chain([u64::MAX]) {
                let stored: usize = sources.iter().map(|s| heads_in_range(s, lo, hi)).sum();
                let by_hand = [&a, &b2, &c]
                    .iter()
                    .map(|v| v.iter().filter(|&&x| lo <= x && x < hi).count())
                    .sum::<usize>();
                assert_eq!(stored, by_hand, "heads in [{lo}, {hi})");
                collect(
                    sources
                        .iter()
                        .map(|s| Cursor::range(s.clone(), lo, hi))
                        .collect(),
                    &mut got,
                );
                lo = hi;
            }
            assert_eq!(got, whole, "{parts} parts");
        }
        // A range that holds nothing, and one inside a single chunk.
        let mut none = Vec::new();
        collect(
            sources
                .iter()
                .map(|s| Cursor::range(s.clone(), 1 << 41, u64::MAX))
                .collect(),
            &mut none,
        );
        assert!(none.is_empty());
        let mut inside = Vec::new();
        collect(
            sources
                .iter()
                .map(|s| Cursor::range(s.clone(), 6 << 12, 10 << 12))
                .collect(),
            &mut inside,
        );
        assert_eq!(
            inside.iter().map(|h| h.0 >> 12).collect::<Vec<_>>(),
            vec![6, 7, 9]
        );
    }

    /// The radix sort orders like a comparison sort and keeps equal
    /// bytenrs in input order, whatever bits the keys differ in: none, only
    /// low or high ones, all 64, a digit boundary crossed.
    #[test]
    fn radix_sort_by_bytenr_matches_a_stable_sort() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let shapes: [&dyn Fn(u64) -> u64; 6] = [
            &|_| 7 << 12,
            &|r| (r % 1_000_000) << 12,
            &|r| r,
            &|r| (r % 5) << 60,
            &|r| (1 << 40) | ((r % 3000) << 9),
            &|r| r & (1 << 63 | 1),
        ];
        let mut tmp = Vec::new();
        for (s, shape) in shapes.iter().enumerate() {
            for n in [0usize, 1, 2, 100, 4096] {
                let mut keys: Vec<(u64, u32)> = (0..n).map(|i| (shape(next()), i as u32)).collect();
                let mut want = keys.clone();
                want.sort_by_key(|k| k.0);
                sort_by_bytenr(&mut keys, &mut tmp);
                assert_eq!(keys, want, "shape {s}, {n} keys");
            }
        }
    }

    #[test]
    fn build_and_merge_runs_agree_with_heads() {
        let data = |root| RefKey::ExtentData {
            root,
            objectid: 300,
            offset: 0,
        };
        let mk = |b: u64, a: Action, root: u64, seq: u64| {
            Op::new(b * 4096, 4096, ExtentKind::Data, a, data(root), seq).unwrap()
        };
        let ops = vec![
            (mk(3, Action::AddExtent, 5, 0), 1),
            (mk(1, Action::AddRef, 5, 0), 0),
            (mk(3, Action::AddRef, 6, 0), 0),
            (mk(1, Action::DropRef, 5, 0), 0),
            (mk(2, Action::AddRef, 5, 4), 0),
        ];
        let a: Vec<Staged> = ops[..3].iter().map(|(o, s)| encode(o, *s)).collect();
        let b: Vec<Staged> = ops[3..].iter().map(|(o, s)| encode(o, *s)).collect();
        let run_a = build_run(&a).finish();
        let run_b = build_run(&b).finish();
        let mut got = Vec::new();
        merge_cursors(
            vec![
                Cursor::new(run_a.iter().collect()),
                Cursor::new(run_b.iter().collect()),
            ],
            |m| got.push(m.head_ref().to_head()),
        );
        let mut want: Vec<Head> = Vec::new();
        for (op, stamp) in &ops {
            match want.iter_mut().find(|h| h.bytenr == op.bytenr) {
                Some(h) => h.absorb(op, *stamp),
                None => want.push(Head::of_op(op, *stamp)),
            }
        }
        let want = crate::delayed::merge_heads(want);
        // Head 1 cancelled to a no-op at merge time: dropped by consumers.
        got.retain(|h| !h.is_noop());
        assert_eq!(got, want);
    }
}
