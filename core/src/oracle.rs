//! A simple sequential model of refd's semantics: the test oracle.
//!
//! Written independently of [`crate::head`] and [`crate::run`]: it keeps
//! the raw list of ops of the transaction and, at commit, evaluates each
//! extent from scratch with plain maps. Tests compare the lock-free store
//! and the mutex baseline against it after every commit.
//!
//! The semantics it states (see `docs/design.md`):
//! 1. Ops of one extent are summed per `(key, seq)`; if every sum is zero
//!    and there is no allocation and no extent_op, the extent has no
//!    pending work.
//! 2. A seq barrier `B != 0` holds the extent (all its ops stay queued) if
//!    some `(key, seq)` with `seq != 0`, `seq >= B` has a non-zero sum.
//! 3. Otherwise per-key nets (summed over seq) are applied at once.
//! 4. With an allocation, the latest one (highest stamp) gives size and
//!    kind. If the extent is committed, its life must end in this commit:
//!    every committed backref needs at least as many DROP ops of its key
//!    (counted one by one, whatever cancels) as its count; else the extent
//!    was allocated while still referenced and is refused (the kernel's
//!    -EEXIST). Every allocation but the latest starts a life that must
//!    also end in this commit (an extent is allocated again only after it
//!    is freed): the DROP ops of the extent (all keys, counted one by one)
//!    must number at least the committed refs plus one per earlier
//!    allocation, else it was allocated twice and is refused. (refd's one
//!    limit here: an extent allocated `ALLOCS_COUNTED_MAX` = 65535 times
//!    or more in one transaction is refused, whatever its drops: the
//!    stores count no further, and a count that may be short must not
//!    let a second allocation through.) The ops may
//!    name one size/kind (that of the latest allocation); they may name
//!    several only when an earlier life can own the other: the committed
//!    extent has another size/kind than the latest allocation, or there
//!    is more than one allocation; else a ref names another size than its
//!    extent and is refused. Final counts are committed + net, which must
//!    be >= 0, of the new kind where non-zero, and at most 1 for tree
//!    backrefs (and, like every count, at most `u32::MAX`: btrfs keeps a
//!    data backref's count in 32 bits). The old life (if any) is reported
//!    freed; so is the new one if it ends at 0.
//! 5. Without allocation, if the per-key nets are all zero and there is no
//!    extent_op, nothing happens (cancelled ops are not validated).
//!    Otherwise the extent must exist (else adding, dropping or an
//!    extent_op is an error); all ref ops must name one size/kind, the
//!    extent's; counts stay >= 0 and <= `u32::MAX`, tree backrefs <= 1;
//!    reaching 0 refs frees the extent.
//! 6. extent_op flags are OR-ed in and the latest key (by stamp) is set;
//!    with an allocation only extent_ops stamped at or after it count (the
//!    others belonged to a life that ended); on a data extent an applying
//!    extent_op is an error.
//! 7. An error quarantines the extent's ops for this commit: the tree is
//!    unchanged for it.
//! 8. No two extents overlap at the end of a commit. Once every extent is
//!    evaluated, allocations whose new extent (1-7 accepted, refs > 0)
//!    overlaps another are refused, deciding in ascending bytenr order: an
//!    allocation at `b` of `n` bytes is refused if a live extent settled
//!    before `b` (at a lower bytenr, in its state after this commit)
//!    reaches past `b`, or if a committed extent starting inside
//!    `(b, b + n)` stays live whatever is decided (its ops do not free it).
//!    A refused allocation leaves its bytenr's committed extent as it was
//!    (rule 7). So of two overlapping allocations of one commit, the one at
//!    the higher bytenr is refused; a committed extent is never refused or
//!    changed for an overlap; an allocation inside an extent freed in the
//!    same commit is legal, as re-allocating a freed bytenr in the same
//!    commit is (rule 4): refd's commit spans many kernel transactions,
//!    and the kernel reuses a range once the transaction that freed it
//!    commits (a tree block freed in the transaction that allocated it, at
//!    once).
//! 9. An allocation dropped again in the commit that made it (1-7
//!    accepted, no extent left) is refused if its range `[b, b + n)` (`n`
//!    the latest allocation's size) meets a committed extent at another
//!    bytenr that has no ops in this commit, or ops that are not held by
//!    a seq barrier, include no allocation and do not free it (refused,
//!    or applied with refs left): that extent was live all through the
//!    commit, so the range was handed out over it. A held extent does not
//!    count: its ops may free it before the barrier's seq and allocate it
//!    again after. Decided before rule 8 (it depends on no other allocation's
//!    decision, and a refused one keeps its bytenr's committed extent
//!    live for rule 8).

use std::collections::BTreeMap;

use crate::model::{Action, DiskKey, ExtentKind, Op, RefKey, BLOCK_FLAG_FULL_BACKREF};

/// What evaluating one extent's ops gives: `Ok(None)` = no change;
/// `Ok(Some((new state, freed)))`; `Err` = refused.
type Evaluated = Result<Option<(Option<ModelExtent>, Vec<(u64, u64)>)>, ()>;

/// An extent as the model keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelExtent {
    /// Size.
    pub num_bytes: u64,
    /// Kind.
    pub kind: ExtentKind,
    /// FULL_BACKREF set.
    pub full_backref: bool,
    /// Tree key set by an extent_op.
    pub tree_key: Option<DiskKey>,
    /// Generation of the commit that allocated it.
    pub generation: u64,
    /// Backrefs with counts (all > 0).
    pub refs: BTreeMap<RefKey, u64>,
}

/// What the model's commit did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelCommit {
    /// Extents freed, as `(bytenr, num_bytes)`, sorted.
    pub freed: Vec<(u64, u64)>,
    /// Extents whose ops were refused.
    pub quarantined: Vec<u64>,
    /// Extents held by a barrier.
    pub held: Vec<u64>,
}

/// The sequential model.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Committed extents.
    pub extents: BTreeMap<u64, ModelExtent>,
    /// Commit generation.
    pub generation: u64,
    pending: Vec<(Op, u64)>,
    stamp: u64,
}

impl Model {
    /// Empty.
    pub fn new() -> Model {
        Model::default()
    }

    /// Queue an op (must be valid: `op.check()` passes). Stamps follow the
    /// same rule as the stores: allocations and key updates take the next
    /// stamp.
    pub fn add(&mut self, op: &Op) {
        debug_assert!(op.check().is_ok());
        let needs = op.action == Action::AddExtent || op.extent_op.is_some();
        let stamp = if needs {
            self.stamp += 1;
            self.stamp
        } else {
            0
        };
        self.pending.push((*op, stamp));
    }

    /// What a restart does to the ops still pending (held by a seq
    /// barrier at the last commit, or logged after it and not yet
    /// committed): seq barriers do not survive it, and recovery forgets
    /// the seqs of pending refs (`docs/protocol.md`, "Seq barriers").
    pub fn forget_seqs(&mut self) {
        self.pending.iter_mut().for_each(|(op, _)| op.seq = 0);
    }

    /// The pending ops, in the order they were queued.
    pub fn pending(&self) -> impl Iterator<Item = &Op> {
        self.pending.iter().map(|(op, _)| op)
    }

    /// Would-be refcount: committed + sum of pending ref_mods.
    pub fn lookup(&self, bytenr: u64) -> i64 {
        let committed = self
            .extents
            .get(&bytenr)
            .map_or(0, |e| e.refs.values().sum::<u64>() as i64);
        committed
            + self
                .pending
                .iter()
                .filter(|(o, _)| o.bytenr == bytenr)
                .map(|(o, _)| o.ref_mod())
                .sum::<i64>()
    }

    /// What a freed list (`Ran::freed_unreused`, FREED) must give for a
    /// commit that freed `freed` ([`ModelCommit::freed`]), called after
    /// that commit: the freed ranges, each byte once (sorted by bytenr,
    /// then size; a byte two of them share stays with the first), minus
    /// every byte an extent of the tree after the commit covers, in
    /// pieces. A range freed and allocated again by the same commit is not
    /// reusable, nor is the part of an allocation dropped again that a
    /// live extent covers (one allocated by the commit, or a committed one
    /// whose ops were held or whose re-allocation was refused: rule 9
    /// refuses the rest);
    /// two lives ended over one range make it reusable once.
    pub fn reusable(&self, freed: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut sorted = freed.to_vec();
        sorted.sort_unstable();
        let mut once: Vec<(u64, u64)> = Vec::new();
        for (bytenr, num_bytes) in sorted {
            let end = bytenr + num_bytes;
            let at = once.last().map_or(bytenr, |&(b, n)| bytenr.max(b + n));
            if at < end {
                once.push((at, end - at));
            }
        }
        let mut out = Vec::new();
        for (bytenr, num_bytes) in once {
            let end = bytenr + num_bytes;
            // Live extents are disjoint: the one starting at or before
            // `bytenr` may reach into the range, then those starting inside.
            let before = self.extents.range(..=bytenr).next_back();
            let inside = self.extents.range(bytenr + 1..end);
            let mut at = bytenr;
            for (&b, e) in before.into_iter().chain(inside) {
                if b + e.num_bytes <= at {
                    continue;
                }
                if b > at {
                    out.push((at, b - at));
                }
                at = at.max(b + e.num_bytes);
            }
            if at < end {
                out.push((at, end - at));
            }
        }
        out
    }

    /// Run every pending op; `barrier` is the lowest active seq (0 = none).
    pub fn commit(&mut self, barrier: u64) -> ModelCommit {
        self.generation += 1;
        let generation = self.generation;
        let mut by_bytenr: BTreeMap<u64, Vec<(Op, u64)>> = BTreeMap::new();
        for (op, stamp) in self.pending.drain(..) {
            by_bytenr.entry(op.bytenr).or_default().push((op, stamp));
        }
        let mut out = ModelCommit::default();
        let mut results: BTreeMap<u64, (bool, Evaluated)> = BTreeMap::new();
        // The latest allocation's size, by bytenr.
        let mut alloc_sizes: BTreeMap<u64, u64> = BTreeMap::new();
        for (bytenr, ops) in by_bytenr {
            let mut sums: BTreeMap<(RefKey, u64), i64> = BTreeMap::new();
            for (op, _) in &ops {
                if let Some(k) = op.key {
                    *sums.entry((k, op.seq)).or_insert(0) += op.ref_mod();
                }
            }
            let alloc_at = ops
                .iter()
                .filter(|(o, _)| o.action == Action::AddExtent)
                .max_by_key(|(_, s)| *s)
                .map(|(o, s)| (*o, *s));
            let alloc = alloc_at.map(|(o, _)| o);
            // extent_ops of the life being committed: at or after the
            // latest allocation.
            let life = alloc_at.map_or(0, |(_, s)| s);
            let has_eop = ops.iter().any(|(o, _)| o.extent_op.is_some());
            if sums.values().all(|&s| s == 0) && alloc.is_none() && !has_eop {
                continue;
            }
            let held = barrier != 0
                && sums
                    .iter()
                    .any(|(&(_, seq), &s)| s != 0 && seq != 0 && seq >= barrier);
            if held {
                out.held.push(bytenr);
                self.pending.extend(ops);
                continue;
            }
            let mut net: BTreeMap<RefKey, i64> = BTreeMap::new();
            for (&(k, _), &s) in &sums {
                *net.entry(k).or_insert(0) += s;
            }
            net.retain(|_, v| *v != 0);
            let eop_flags = ops
                .iter()
                .filter(|(_, s)| *s >= life)
                .filter_map(|(o, _)| o.extent_op)
                .fold(0, |f, e| f | e.flags_to_set);
            let eop_key = ops
                .iter()
                .filter(|(_, s)| *s >= life)
                .filter_map(|(o, s)| o.extent_op.and_then(|e| e.key).map(|k| (*s, k)))
                .max_by_key(|(s, _)| *s)
                .map(|(_, k)| k);
            let applies_eop = ops
                .iter()
                .any(|(o, s)| *s >= life && o.extent_op.is_some_and(|e| !e.is_empty()));
            let result = self.evaluate(
                bytenr,
                &ops,
                alloc,
                &net,
                has_eop,
                applies_eop,
                eop_flags,
                eop_key,
                generation,
            );
            if let Some(a) = alloc {
                alloc_sizes.insert(bytenr, a.num_bytes);
            }
            results.insert(bytenr, (alloc.is_some(), result));
        }
        self.refuse_dropped_over_live(&mut results, &alloc_sizes, &out.held);
        self.refuse_overlaps(&mut results);
        for (bytenr, (_, result)) in results {
            match result {
                Ok(Some((new, freed))) => {
                    out.freed.extend(freed);
                    match new {
                        Some(e) => {
                            self.extents.insert(bytenr, e);
                        }
                        None => {
                            self.extents.remove(&bytenr);
                        }
                    }
                }
                Ok(None) => {}
                Err(()) => out.quarantined.push(bytenr),
            }
        }
        out.freed.sort_unstable();
        out
    }

    /// Rule 9: refuse every allocation dropped again whose range meets a
    /// committed extent that stays as it was (`alloc_sizes`: the latest
    /// allocation's size of every extent with one).
    fn refuse_dropped_over_live(
        &self,
        results: &mut BTreeMap<u64, (bool, Evaluated)>,
        alloc_sizes: &BTreeMap<u64, u64>,
        held: &[u64],
    ) {
        let stays = |results: &BTreeMap<u64, (bool, Evaluated)>, c: u64| {
            !held.contains(&c)
                && !alloc_sizes.contains_key(&c)
                && !matches!(results.get(&c), Some((_, Ok(Some((None, _))))))
        };
        let mut refused = Vec::new();
        for (&b, &n) in alloc_sizes {
            if !matches!(results.get(&b), Some((true, Ok(Some((None, _)))))) {
                continue;
            }
            let meets = self
                .extents
                .iter()
                .filter(|(&c, e)| c != b && c < b + n && b < c + e.num_bytes)
                .any(|(&c, _)| stays(results, c));
            if meets {
                refused.push(b);
            }
        }
        for b in refused {
            results.insert(b, (true, Err(())));
        }
    }

    /// Rule 8: refuse every allocation whose new extent would overlap
    /// another extent live at the end of the commit, deciding in ascending
    /// bytenr order. `results` holds every extent evaluated this commit
    /// (with whether it allocates); an extent not in it (no ops, or held)
    /// keeps its committed state.
    fn refuse_overlaps(&self, results: &mut BTreeMap<u64, (bool, Evaluated)>) {
        let committed_size = |b: u64| self.extents.get(&b).map(|e| e.num_bytes);
        // A committed extent is gone at the end of the commit only if its
        // ops end with no item (freed), whatever else is decided.
        let freed = |results: &BTreeMap<u64, (bool, Evaluated)>, b: u64| {
            matches!(results.get(&b), Some((_, Ok(Some((None, _))))))
        };
        let mut bytenrs: Vec<u64> = self.extents.keys().copied().collect();
        bytenrs.extend(results.keys().copied());
        bytenrs.sort_unstable();
        bytenrs.dedup();
        // The settled live extent before the current bytenr reaching
        // furthest: (bytenr, num_bytes).
        let mut reach: Option<(u64, u64)> = None;
        for b in bytenrs {
            let new_size = match results.get(&b) {
                Some((true, Ok(Some((Some(e), _))))) => Some(e.num_bytes),
                _ => None,
            };
            let live = match results.get(&b) {
                Some((_, Ok(Some((new, _))))) => new.as_ref().map(|e| e.num_bytes),
                _ => committed_size(b),
            };
            let live = match new_size {
                Some(n) => {
                    let end = b + n;
                    let covered = reach.is_some_and(|(p, m)| p + m > b);
                    let inside = self
                        .extents
                        .range(b + 1..end)
                        .any(|(&c, _)| !freed(results, c));
                    if covered || inside {
                        results.insert(b, (true, Err(())));
                        committed_size(b)
                    } else {
                        live
                    }
                }
                None => live,
            };
            if let Some(n) = live {
                if reach.is_none_or(|(p, m)| b + n > p + m) {
                    reach = Some((b, n));
                }
            }
        }
    }

    /// Ok(None) = no change; Ok(Some((new state, freed))); Err = refused.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &self,
        bytenr: u64,
        ops: &[(Op, u64)],
        alloc: Option<Op>,
        net: &BTreeMap<RefKey, i64>,
        has_eop: bool,
        applies_eop: bool,
        eop_flags: u64,
        eop_key: Option<DiskKey>,
        generation: u64,
    ) -> Evaluated {
        let committed = self.extents.get(&bytenr);
        let mut freed = Vec::new();
        let mut e = if let Some(a) = alloc {
            let mut fin: BTreeMap<RefKey, i64> = BTreeMap::new();
            if let Some(c) = committed {
                for (k, v) in &c.refs {
                    let drops = ops
                        .iter()
                        .filter(|(o, _)| o.action == Action::DropRef && o.key == Some(*k))
                        .count() as u64;
                    if drops < *v {
                        return Err(());
                    }
                    fin.insert(*k, *v as i64);
                }
                freed.push((bytenr, c.num_bytes));
            }
            let allocs = ops
                .iter()
                .filter(|(o, _)| o.action == Action::AddExtent)
                .count() as u64;
            if allocs >= u64::from(crate::head::ALLOCS_COUNTED_MAX) {
                return Err(());
            }
            let drops = ops
                .iter()
                .filter(|(o, _)| o.action == Action::DropRef)
                .count() as u64;
            let committed_refs = committed.map_or(0, |c| c.refs.values().sum::<u64>());
            if drops < committed_refs + (allocs - 1) {
                return Err(());
            }
            let shapes: std::collections::BTreeSet<(u64, ExtentKind)> = ops
                .iter()
                .filter(|(o, _)| o.action != Action::UpdateHead)
                .map(|(o, _)| (o.num_bytes, o.kind))
                .collect();
            let earlier_shape = allocs > 1
                || committed.is_some_and(|c| (c.num_bytes, c.kind) != (a.num_bytes, a.kind));
            if shapes.len() > 1 && !earlier_shape {
                return Err(());
            }
            for (k, v) in net {
                *fin.entry(*k).or_insert(0) += v;
            }
            let mut refs = BTreeMap::new();
            for (k, v) in fin {
                if v < 0
                    || v > i64::from(u32::MAX)
                    || (v > 0 && k.is_data() != a.kind.is_data())
                    || (k.is_tree() && v > 1)
                {
                    return Err(());
                }
                if v > 0 {
                    refs.insert(k, v as u64);
                }
            }
            ModelExtent {
                num_bytes: a.num_bytes,
                kind: a.kind,
                full_backref: false,
                tree_key: None,
                generation,
                refs,
            }
        } else {
            let Some(c) = committed else {
                if !net.is_empty() || has_eop {
                    return Err(());
                }
                return Ok(None);
            };
            if net.is_empty() && !has_eop {
                return Ok(None);
            }
            let shapes: std::collections::BTreeSet<(u64, ExtentKind)> = ops
                .iter()
                .filter(|(o, _)| o.action != Action::UpdateHead)
                .map(|(o, _)| (o.num_bytes, o.kind))
                .collect();
            if shapes.len() > 1 || shapes.iter().any(|&s| s != (c.num_bytes, c.kind)) {
                return Err(());
            }
            let mut e = c.clone();
            for (k, v) in net {
                let new = e.refs.get(k).copied().unwrap_or(0) as i64 + v;
                if new < 0
                    || new > i64::from(u32::MAX)
                    || (k.is_tree() && new > 1)
                    || k.is_data() != e.kind.is_data()
                {
                    return Err(());
                }
                if new == 0 {
                    e.refs.remove(k);
                } else {
                    e.refs.insert(*k, new as u64);
                }
            }
            e
        };
        if applies_eop {
            if e.kind.is_data() {
                return Err(());
            }
            if eop_flags & BLOCK_FLAG_FULL_BACKREF != 0 {
                e.full_backref = true;
            }
            if let Some(k) = eop_key {
                e.tree_key = Some(k);
            }
        }
        if e.refs.is_empty() {
            if alloc.is_some() {
                freed.push((bytenr, e.num_bytes));
            } else if let Some(c) = committed {
                freed.push((bytenr, c.num_bytes));
            }
            return Ok(Some((None, freed)));
        }
        Ok(Some((Some(e), freed)))
    }

    /// Normalized view of the committed extents, comparable with
    /// [`normalize_tree`].
    pub fn normalized(&self) -> Vec<NormExtent> {
        self.extents
            .iter()
            .map(|(&bytenr, e)| NormExtent {
                bytenr,
                num_bytes: e.num_bytes,
                kind: e.kind,
                refs: e.refs.values().sum(),
                full_backref: e.full_backref,
                tree_key: e.tree_key,
                generation: e.generation,
                backrefs: e.refs.iter().map(|(k, v)| (*k, *v)).collect(),
            })
            .collect()
    }
}

/// One extent in comparable form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormExtent {
    /// Address.
    pub bytenr: u64,
    /// Size.
    pub num_bytes: u64,
    /// Kind.
    pub kind: ExtentKind,
    /// Total refs.
    pub refs: u64,
    /// FULL_BACKREF.
    pub full_backref: bool,
    /// Tree key.
    pub tree_key: Option<DiskKey>,
    /// Generation.
    pub generation: u64,
    /// Backrefs sorted.
    pub backrefs: Vec<(RefKey, u64)>,
}

/// Normalized view of an engine's extent tree.
pub fn normalize_tree(tree: &crate::extent_tree::ExtentTree) -> Vec<NormExtent> {
    tree.iter()
        .map(|(bytenr, i)| NormExtent {
            bytenr,
            num_bytes: i.num_bytes,
            kind: i.kind,
            refs: i.refs,
            full_backref: i.full_backref(),
            tree_key: i.tree_key,
            generation: i.generation,
            backrefs: i.backrefs(),
        })
        .collect()
}
