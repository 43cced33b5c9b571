//! Refusing an allocation that overlaps a live extent.
//!
//! The kernel's allocator never hands out a range that overlaps an extent,
//! so an allocation (`must_insert_reserved`) whose range
//! `[bytenr, bytenr + num_bytes)` meets another extent is a client's bug;
//! committed, it would leave an extent tree that `ExtentTree::check` and
//! fsck call broken. The rule (`docs/design.md`, "Semantics"; the oracle's
//! rule 8 states it on its own): at the end of a commit no two extents
//! overlap. Allocations are decided in ascending bytenr order, after every
//! head ran on its own ([`crate::run`]): an allocation at `b` is refused
//! ([`RunError::OverlapsExtent`]) if the live extent settled before `b`
//! reaches past `b`, or if a committed extent starting inside the new
//! range stays live whatever is decided (its head does not free it). So
//! of two overlapping allocations of one commit the higher is refused, a
//! committed extent is never touched, and an allocation inside an extent
//! freed by the same commit is legal (refd's commit spans many kernel
//! transactions; the kernel reuses a range once the transaction that
//! freed it commits).
//!
//! Most allocations meet nothing, and the run workers accept them as they
//! go. A worker defers ("contests") an allocation only if its range meets a
//! committed extent, or if it lies inside the range of an allocating head
//! at a lower bytenr ([`covered_heads`], one pass over the sorted heads
//! before the run, so a range crossing a worker's boundary is seen). The
//! contested ones are then settled on one thread ([`settle`]), in bytenr
//! order, against every head's outcome: the decision is the same however
//! the heads were cut into parts.
//!
//! An allocation dropped again by the commit that made it leaves no
//! extent, but its range was still handed out while the commit ran, and
//! its free is reported (FREED): it is refused too, with the same error,
//! if its range meets a committed extent at another bytenr that stays as
//! it was through the commit (it has no head, or its head, not held by a
//! seq barrier, neither allocates nor frees it). That extent was live the whole time, so the range was allocated
//! over it. A committed extent that this commit frees or allocates again
//! had a moment free, and the dropped allocation may have used it then
//! (refd's commit spans many kernel transactions). Without this rule such
//! an allocation's free would be listed in pieces around every live
//! extent inside it: one freed-list entry each, which its one drop did
//! not reserve space for.

use crate::engine::{RunPart, RunSink};
use crate::extent_tree::{ExtentItem, ExtentTree, Walker};
use crate::head::Head;
use crate::run::{HeadEffect, RunError};

/// Indices of the heads (sorted by bytenr) whose bytenr lies inside the
/// range of an allocating head at a lower bytenr, ascending.
pub(crate) fn covered_heads(heads: &[Head]) -> Vec<usize> {
    let mut reach = 0u64;
    let mut covered = Vec::new();
    for (i, h) in heads.iter().enumerate() {
        if h.bytenr < reach {
            covered.push(i);
        }
        if h.summary.must_insert_reserved() {
            reach = reach.max(h.bytenr.saturating_add(h.summary.num_bytes));
        }
    }
    covered
}

/// Whether the run worker must leave the effect `e` of `head` to
/// [`settle`]: an allocation with a new extent that lies inside an earlier
/// allocating head's range (`covered`), or whose range meets a committed
/// extent (found with the worker's tree `walker`); or an allocation
/// dropped again by this commit whose range meets a committed extent.
pub(crate) fn contested(
    head: &Head,
    e: &HeadEffect,
    covered: bool,
    walker: &mut Walker<'_>,
) -> bool {
    if !head.summary.must_insert_reserved() {
        return false;
    }
    let num_bytes = match &e.item {
        Some(_) if covered => return true,
        Some(item) => item.num_bytes,
        // Dropped again: it can only meet a committed extent.
        None => head.summary.num_bytes,
    };
    let b = head.bytenr;
    let (below, above) = walker.neighbours(b);
    below.is_some_and(|(p, i)| p.saturating_add(i.num_bytes) > b)
        || above.is_some_and(|(c, _)| c < b.saturating_add(num_bytes))
}

/// What [`settle`] knows of the extents below the last bytenr it decided:
/// the nearest extent live after the commit at or below `at`.
#[derive(Clone, Copy, Debug)]
struct Floor {
    at: u64,
    nearest: Option<(u64, u64)>,
}

/// What a scan of [`first_inside`] found: the committed extents in
/// `[from, to)` do not block (for [`Settled::live_inside`]: all are freed
/// by this commit; for [`Settled::stays_meeting`]: none stays as it was);
/// `blocker` is the committed extent at `to` that does, where the scan
/// stopped on it (`None`: the scan ended at `to`).
#[derive(Clone, Copy, Debug)]
struct FreedSpan {
    from: u64,
    to: u64,
    blocker: Option<(u64, u64)>,
}

/// Decide the contested allocations of every part, in ascending bytenr
/// order (those dropped again by this commit first): refused ones are
/// quarantined with [`RunError::OverlapsExtent`] (their bytenr keeps its
/// committed item), accepted ones are shown to `sink` and join their
/// part's effects and freed extents. `tree` is the committed tree the
/// heads ran against.
pub(crate) fn settle<K: RunSink>(
    tree: &ExtentTree,
    heads: &[Head],
    parts: &mut [RunPart<K::Part>],
    sink: &K,
) {
    let mut contested: Vec<(usize, HeadEffect)> = parts
        .iter_mut()
        .flat_map(|p| std::mem::take(&mut p.contested))
        .collect();
    if contested.is_empty() {
        return;
    }
    contested.sort_unstable_by_key(|c| c.0);
    for p in parts.iter_mut() {
        if !p.effects.is_sorted_by_key(|e| e.0) {
            p.effects.sort_by_key(|e| e.0);
        }
    }
    let mut late: Vec<Vec<(u64, Option<ExtentItem>)>> = vec![Vec::new(); parts.len()];
    let mut state = Settled {
        tree,
        heads,
        decided: Vec::with_capacity(contested.len()),
        floor: None,
        span: None,
        stay_span: None,
        held: Vec::new(),
    };
    // Allocations dropped again first: their decisions depend only on
    // committed extents that no head allocates, and the others' depend on
    // theirs (a refused one keeps its bytenr's committed item live).
    let (dropped, inserted): (Vec<_>, Vec<_>) =
        contested.into_iter().partition(|(_, e)| e.item.is_none());
    if !dropped.is_empty() {
        state.held = parts.iter().flat_map(|p| p.held.iter().copied()).collect();
        state.held.sort_unstable();
    }
    for (idx, e) in dropped {
        let k = parts.partition_point(|p| p.base <= idx) - 1;
        let b = heads[idx].bytenr;
        let num_bytes = heads[idx].summary.num_bytes;
        match state.stays_meeting(b, num_bytes, &parts[..]) {
            Some(other) => refuse(&mut parts[k], idx, b, num_bytes, other),
            None => {
                let part = &mut parts[k];
                sink.effect(&mut part.sink, b, tree.get(b), None, None);
                part.freed.extend(e.freed);
                late[k].push((b, None));
            }
        }
    }
    for (part, late) in parts.iter_mut().zip(&mut late) {
        if !late.is_empty() {
            part.effects.append(late);
            part.effects.sort_by_key(|e| e.0);
        }
    }
    for (idx, e) in inserted {
        let k = parts.partition_point(|p| p.base <= idx) - 1;
        let b = heads[idx].bytenr;
        let num_bytes = e.item.as_ref().map_or(0, |i| i.num_bytes);
        let committed = tree.get(b);
        let nearest = state.nearest_below(idx, &parts[..]);
        let covering = nearest.filter(|&(p, n)| p.saturating_add(n) > b);
        let other = covering.or_else(|| state.live_inside(b, num_bytes, &parts[..]));
        let live = match other {
            Some(other) => {
                refuse(&mut parts[k], idx, b, num_bytes, other);
                committed.map(|i| i.num_bytes)
            }
            None => {
                let part = &mut parts[k];
                // An allocation: its item is built anew.
                sink.effect(&mut part.sink, b, committed, e.item.as_ref(), None);
                part.freed.extend(e.freed);
                late[k].push((b, e.item));
                Some(num_bytes)
            }
        };
        state.decided.push((b, live));
        state.floor = Some(Floor {
            at: b,
            nearest: live.map(|n| (b, n)).or(nearest),
        });
    }
    for (part, late) in parts.iter_mut().zip(late) {
        part.effects.extend(late);
    }
}

/// Quarantine the contested allocation of head `idx` (`bytenr`,
/// `num_bytes`) for meeting the live extent `other` (bytenr, size).
fn refuse<P>(part: &mut RunPart<P>, idx: usize, bytenr: u64, num_bytes: u64, other: (u64, u64)) {
    let (other, other_bytes) = other;
    part.quarantined.push((
        idx,
        RunError::OverlapsExtent {
            bytenr,
            num_bytes,
            other,
            other_bytes,
        },
    ));
}

/// [`settle`]'s view of the commit while it decides.
struct Settled<'a> {
    tree: &'a ExtentTree,
    heads: &'a [Head],
    /// Contested allocations decided so far: bytenr, size of the extent
    /// live there after the commit (ascending).
    decided: Vec<(u64, Option<u64>)>,
    floor: Option<Floor>,
    /// What [`Settled::live_inside`] found last.
    span: Option<FreedSpan>,
    /// What [`Settled::stays_meeting`] found last (its `blocker`: an
    /// extent that stays).
    stay_span: Option<FreedSpan>,
    /// Indices of the heads a seq barrier held, ascending (filled only for
    /// [`Settled::stays`]).
    held: Vec<usize>,
}

impl Settled<'_> {
    /// The effect the run computed for the head at `bytenr` (`None`: none
    /// applied: noop, held, refused, or contested).
    fn effect<'p, P>(
        &self,
        bytenr: u64,
        parts: &'p [RunPart<P>],
    ) -> Option<&'p Option<ExtentItem>> {
        let idx = self
            .heads
            .binary_search_by_key(&bytenr, |h| h.bytenr)
            .ok()?;
        let k = parts.partition_point(|p| p.base <= idx) - 1;
        let effects = &parts[k].effects;
        let at = effects.binary_search_by_key(&bytenr, |e| e.0).ok()?;
        Some(&effects[at].1)
    }

    /// Size of the extent live at the head `idx`'s bytenr after the commit
    /// (heads below the contested allocation being decided: all settled).
    fn live_at_head<P>(&self, idx: usize, parts: &[RunPart<P>]) -> Option<u64> {
        let b = self.heads[idx].bytenr;
        if let Ok(d) = self.decided.binary_search_by_key(&b, |d| d.0) {
            return self.decided[d].1;
        }
        match self.effect(b, parts) {
            Some(item) => item.as_ref().map(|i| i.num_bytes),
            None => self.tree.get(b).map(|i| i.num_bytes),
        }
    }

    /// The nearest extent live after the commit below the head `idx`'s
    /// bytenr: its bytenr and size. Extents below the last decided bytenr
    /// are known from the floor, so every position is looked at once over
    /// a whole settle.
    fn nearest_below<P>(&self, idx: usize, parts: &[RunPart<P>]) -> Option<(u64, u64)> {
        let b = self.heads[idx].bytenr;
        let mut head = idx;
        let mut below = self.tree.range(..b).rev().peekable();
        loop {
            let at_head = head.checked_sub(1).map(|j| self.heads[j].bytenr);
            let at_item = below.peek().map(|&(p, _)| p);
            let pos = at_head.max(at_item)?;
            if let Some(floor) = self.floor.filter(|f| pos <= f.at) {
                return floor.nearest;
            }
            let live = if at_head == Some(pos) {
                head -= 1;
                below.next_if(|&(p, _)| p == pos);
                self.live_at_head(head, parts)
            } else {
                below.next().map(|(_, i)| i.num_bytes)
            };
            if let Some(n) = live {
                return Some((pos, n));
            }
        }
    }

    /// The first committed extent starting inside `(b, b + num_bytes)` that
    /// stays live whatever is decided: its head does not free it.
    fn live_inside<P>(
        &mut self,
        b: u64,
        num_bytes: u64,
        parts: &[RunPart<P>],
    ) -> Option<(u64, u64)> {
        let (start, end) = (b.saturating_add(1), b.saturating_add(num_bytes));
        let mut span = self.span;
        let blocker = first_inside(self.tree, &mut span, start, end, |c| {
            !matches!(self.effect(c, parts), Some(None))
        });
        self.span = span;
        blocker
    }

    /// For an allocation at `b` dropped again by this commit: the first
    /// committed extent at another bytenr meeting `[b, b + num_bytes)`
    /// that stays as it was through the commit (its head, if any,
    /// neither allocates nor frees it). Such an extent was live the whole
    /// time, so the allocation was made over it: the client's bug, as an
    /// inserted overlapping allocation is. Committed extents are disjoint,
    /// so only the one below `b` can reach into the range; those starting
    /// inside it are scanned once over a whole settle, as in
    /// [`Settled::live_inside`].
    fn stays_meeting<P>(
        &mut self,
        b: u64,
        num_bytes: u64,
        parts: &[RunPart<P>],
    ) -> Option<(u64, u64)> {
        let below = self.tree.range(..b).next_back();
        if let Some((p, item)) = below.filter(|(p, i)| p.saturating_add(i.num_bytes) > b) {
            if self.stays(p, parts) {
                return Some((p, item.num_bytes));
            }
        }
        let (start, end) = (b.saturating_add(1), b.saturating_add(num_bytes));
        let mut span = self.stay_span;
        let blocker = first_inside(self.tree, &mut span, start, end, |c| self.stays(c, parts));
        self.stay_span = span;
        blocker
    }

    /// Whether the committed extent at `c` stays as it was through the
    /// commit: no head, or a head that does not allocate and did not free
    /// it (applied with an item, refused or cancelled). A head that
    /// allocates (run, whatever its outcome) had the extent free at some
    /// moment. So may a head a seq barrier held: the whole head is held
    /// when one of its refs is at or above the barrier, and its other ops
    /// may have freed the extent long before (a drop at seq 0, then an
    /// allocation of the bytenr under the barrier), so it never stays.
    fn stays<P>(&self, c: u64, parts: &[RunPart<P>]) -> bool {
        match self.heads.binary_search_by_key(&c, |h| h.bytenr) {
            Err(_) => true,
            Ok(idx) if self.held.binary_search(&idx).is_ok() => false,
            Ok(idx) => {
                !self.heads[idx].summary.must_insert_reserved()
                    && !matches!(self.effect(c, parts), Some(None))
            }
        }
    }
}

/// The first extent of `tree` in `[start, end)` that `blocks`, with its
/// size. `span` is what the last call found (extents in `[from, to)` do not
/// block; `blocker` at `to`, if any, does), and is updated: starts only
/// ascend over a settle and `blocks` depends on no decision, so each
/// extent is looked at once over a whole settle.
fn first_inside(
    tree: &ExtentTree,
    span: &mut Option<FreedSpan>,
    start: u64,
    end: u64,
    mut blocks: impl FnMut(u64) -> bool,
) -> Option<(u64, u64)> {
    let mut from = start;
    let mut scan = start;
    if let Some(s) = span.filter(|s| s.from <= start && start <= s.to) {
        if end <= s.to {
            return None;
        }
        if s.blocker.is_some() {
            return s.blocker;
        }
        (from, scan) = (s.from, s.to);
    }
    let mut blocker = None;
    for (c, item) in tree.range(scan..end) {
        if blocks(c) {
            blocker = Some((c, item.num_bytes));
            break;
        }
    }
    let to = blocker.map_or(end, |(c, _)| c);
    *span = Some(FreedSpan { from, to, blocker });
    blocker
}
