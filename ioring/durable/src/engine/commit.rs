//! A commit (checkpoint): cut the log and seal the core transaction
//! atomically with respect to ingest, run the frozen heads against their
//! committed items, write the item changes into the copy-on-write B+tree,
//! then the superblock (the commit point), then release and trim. Every
//! failure latches the engine.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use refd_core::delayed::DelayedRefStore;
use refd_core::engine::{CommitReport, RunSink};
use refd_core::extent_tree::ExtentItem;
use refd_core::head::Head;
use refd_core::model::RefKey;
use refd_ioring::btree::{BTree, Change, Key, LEAF_ITEM_OVERHEAD_BYTES};
use refd_ioring::format::SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
use refd_ioring::log::Lsn;
use refd_ioring::Storage;

use super::open::write_superblock;
use super::read::{alloc_neighbours, extents_inside, read_extents};
use super::{lock, CommitState, DurableEngine};
use crate::codec::{self, CodecError};
use crate::error::{CommitError, CommitStep, Failure};
use crate::stats::{CommitPhases, CommitSummary};

/// The B+tree changes of a commit, encoded on the core run's workers as
/// each head runs ([`RunSink`]): each changed extent from its committed
/// item to its new one. The B+tree is the committed one while heads run
/// (this commit changes it only afterwards, in `apply_items`): the diff
/// of an extent with many keyed backrefs looks up where its changed ones
/// are stored (`codec::diff_extent_changed`).
struct ItemDiff<'a, S: Storage> {
    tree: &'a BTree<S>,
}

/// What the B+tree side of a commit did (`DurableEngine::apply_items`).
#[derive(Debug)]
struct AppliedItems {
    /// Item puts and deletes applied.
    item_changes: usize,
    /// Extent items in the tree after the commit (recorded in it).
    extents: u64,
    /// Chunks of held heads now in the B+tree.
    held_chunks: usize,
    /// Units of the held heads (`crate::space::held_units`).
    held_units: u64,
    /// Time to wait for the log and sort the changes.
    diff: Duration,
}

/// B+tree changes of items, by key.
type ItemChanges = Vec<(Key, Change)>;

/// One run worker's item changes, in its selection order.
#[derive(Debug)]
struct ItemDiffPart {
    changes: ItemChanges,
    /// Extent items inserted minus deleted.
    extents_delta: i64,
    /// The first extent that could not be encoded (the rest of the part is
    /// skipped: the commit fails).
    error: Option<(u64, CodecError)>,
}

impl<S: Storage> RunSink for ItemDiff<'_, S> {
    type Part = ItemDiffPart;

    fn part(&self, heads: usize) -> ItemDiffPart {
        ItemDiffPart {
            // Most extents change only their extent item.
            changes: Vec::with_capacity(heads + heads / 8),
            extents_delta: 0,
            error: None,
        }
    }

    fn effect(
        &self,
        part: &mut ItemDiffPart,
        bytenr: u64,
        before: Option<&ExtentItem>,
        after: Option<&ExtentItem>,
        changed: Option<&[(RefKey, i64)]>,
    ) {
        // With the changes known, a hot extent is not compared backref by
        // backref: a change other than 0 changes a count; without one,
        // only an extent_op (flags, tree key) changed the item.
        let same = match (before, after, changed) {
            (Some(b), Some(a), Some(c)) => {
                let same = c.iter().all(|&(_, d)| d == 0)
                    && (b.flags, b.tree_key) == (a.flags, a.tree_key);
                debug_assert_eq!(same, b == a, "extent {bytenr}");
                same
            }
            _ => before == after,
        };
        if part.error.is_some() || same {
            return;
        }
        part.extents_delta += i64::from(after.is_some()) - i64::from(before.is_some());
        let lookup = |key: &Key| {
            self.tree.get(key).map_err(|e| CodecError::Read {
                bytenr,
                key: *key,
                reason: e.to_string(),
            })
        };
        let out = &mut part.changes;
        if let Err(e) = codec::diff_extent_changed(bytenr, before, after, changed, &lookup, out) {
            part.error = Some((bytenr, e));
        }
    }
}

/// The run workers' item changes, each part sorted by key (keys begin
/// with the bytenr, and a part is in bytenr order except after a rare
/// wrap-around of head selection); the parts cover ascending bytenr ranges,
/// so applied one after the other they are one ascending list. Not joined:
/// that would copy them all. The first error in part order. With the
/// extent items inserted minus deleted.
fn sorted_item_diffs(
    parts: Vec<ItemDiffPart>,
) -> Result<(Vec<ItemChanges>, i64), (u64, CodecError)> {
    let mut sorted = Vec::with_capacity(parts.len());
    let mut extents_delta = 0i64;
    for part in parts {
        if let Some(e) = part.error {
            return Err(e);
        }
        extents_delta += part.extents_delta;
        let mut changes = part.changes;
        if !changes.is_sorted_by(|a, b| a.0 < b.0) {
            changes.sort_unstable_by_key(|c| c.0);
        }
        sorted.push(changes);
    }
    Ok((sorted, extents_delta))
}

impl<S: Storage + Clone, D: DelayedRefStore> DurableEngine<S, D> {
    /// Checkpoint: every op added before the call becomes part of the
    /// on-disk extent tree and its log space is released. See
    /// `docs/durable.md` for the order of steps.
    pub fn commit(&self) -> Result<CommitSummary, CommitError> {
        self.check_failed().map_err(CommitError::Failed)?;
        let mut st = lock(&self.commit);
        self.commit_locked(&mut st)
    }

    /// Latches `failure` as the failure of `step` of commit `generation`.
    fn fail(&self, generation: u64, step: CommitStep, failure: Failure) -> CommitError {
        CommitError::Step {
            generation,
            step,
            failure: self.latch(failure),
        }
    }

    pub(super) fn commit_locked(&self, st: &mut CommitState) -> Result<CommitSummary, CommitError> {
        self.check_failed().map_err(CommitError::Failed)?;
        let generation = st.next_generation;
        // 1. Cut + seal, atomically w.r.t. ingest: every op with an LSN
        // below the cut is in the sealed transaction, every later op in the
        // next one. Only this step (microseconds) holds the ingest lock;
        // merging and running the frozen heads does not stall ingest.
        let t0 = Instant::now();
        let (cut, sealed, ops, snap) = {
            let _cut = self.cut.write().unwrap_or_else(|e| e.into_inner());
            let ops = self.pending_ops.swap(0, Ordering::Relaxed);
            // The live reservations become this commit's (`crate::space`).
            self.space.cut(&self.tree.space());
            let snap = self.service_snapshot();
            (self.log.seal(), self.engine.seal(), ops, snap)
        };
        let frozen = sealed.merge();
        let mut phases = CommitPhases {
            freeze: t0.elapsed(),
            ..CommitPhases::default()
        };
        // The committed items of every frozen head: the cache's, else the
        // B+tree's (the tree changes only in commits, and this one holds
        // the core commit lock). A failure here is fatal like any commit
        // failure; the dropped frozen transaction is aborted (its heads
        // requeued in the core store, see `refd_core::engine::Frozen`).
        let t1 = Instant::now();
        let extents_read = self.cache_frozen(frozen.heads()).map_err(|e| {
            let failure = Failure::new(self.device_name(), "read committed items", e.offset(), &e);
            self.fail(generation, CommitStep::ReadItems, failure)
        })?;
        phases.items = t1.elapsed();
        let t2 = Instant::now();
        let (ran, diffs) = self
            .engine
            .run_frozen_parts(frozen, &ItemDiff { tree: &self.tree });
        self.cache_freed_covers(ran.report()).map_err(|e| {
            let failure = Failure::new(self.device_name(), "read committed items", e.offset(), &e);
            self.fail(generation, CommitStep::ReadItems, failure)
        })?;
        phases.run = t2.elapsed();
        // The B+tree gets the item changes on a commit worker while the
        // core applies the same commit to its cache here. Lookups never
        // read the B+tree for a frozen extent until both are done (the
        // in-flight set, see `cache_frozen`), and the B+tree changes no
        // other extent.
        let t3 = Instant::now();
        let held_heads = ran.report().held_heads.clone();
        let held_chunks_before = st.held_chunks;
        let extents_before = (self.extents(), st.extents_recorded);
        let (service, dropped, freed_list) =
            self.service_changes(&snap, generation, &ran.freed_unreused());
        let (items, core) = refd_core::engine::alongside(
            || {
                let held = (held_heads.as_slice(), held_chunks_before);
                self.apply_items(generation, cut, diffs, held, service, extents_before)
            },
            || {
                let mut core = ran.apply();
                // The items before: hundreds of thousands of frees, off
                // this path, started while the B+tree side may still run.
                let displaced = std::mem::take(&mut core.displaced);
                if displaced.iter().map(Vec::len).sum::<usize>()
                    >= refd_sync::background::SMALL_ITEMS_MIN
                {
                    refd_sync::background::drop_later(displaced, 0);
                }
                core
            },
        );
        phases.apply = t3.elapsed();
        let items = items?;
        // Every change is in the working tree: the reservation shrinks to
        // what the commit really dirtied plus its bitmap run.
        self.space.applied(&self.tree.space());
        let mut summary = self.commit_tail(st, cut, core, items, &mut phases)?;
        self.service_committed(generation, freed_list, &dropped);
        self.generation.store(generation, Ordering::Release);
        phases.total = t0.elapsed();
        self.record_commit(ops, phases.total, summary.dirty_bytes);
        summary.extents_read = extents_read;
        summary.ops = ops;
        summary.phases = phases;
        lock(&self.totals).add(t0, &summary);
        if let Some(hook) = self.commit_hook.get() {
            hook(&summary);
        }
        // Requeued held heads are pending again: the interval commits them
        // once the barrier is gone. They do not count toward back-pressure
        // (committing again would not free them; the barrier holder
        // bounds them).
        self.heads_held
            .store(summary.core.held as u64, Ordering::Relaxed);
        Ok(summary)
    }

    /// Makes the committed item of every frozen head's bytenr cached (the
    /// core engine runs heads against its cache), and of the extents next
    /// to every allocation (its overlap check, see `alloc_neighbours`):
    /// when the cache is not complete, the misses are read from the
    /// B+tree, and the frozen bytenrs are
    /// published as the running commit's in-flight set. Returns how many
    /// were read.
    fn cache_frozen(&self, heads: &[Head]) -> Result<usize, crate::error::ReadError> {
        if self.cache_complete.load(Ordering::Acquire) {
            // Every miss is an extent without item; the in-flight set is
            // not needed either (a miss means the same at every moment).
            return Ok(0);
        }
        // With the extents next to each allocation, for its overlap check.
        let mut near = alloc_neighbours(&self.tree, self.storage.device_name(), heads)?;
        near.sort_unstable();
        near.dedup();
        let misses: Vec<u64> = {
            let tree = self.engine.tree();
            let mut misses: Vec<u64> = heads.iter().map(|h| h.bytenr).collect();
            if !near.is_empty() {
                // Not frozen bytenrs: no repeats.
                misses.extend(near);
                misses.sort_unstable();
            }
            misses.retain(|&b| tree.get(b).is_none());
            misses
        };
        let read = read_extents(&self.tree, self.storage.device_name(), &misses)?;
        self.engine.cache_committed(
            misses
                .iter()
                .zip(read)
                .filter_map(|(&b, item)| item.map(|i| (b, i))),
        );
        // Only now: a miss among these bytenrs means "no item".
        *self.inflight.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(heads.iter().map(|h| h.bytenr).collect());
        Ok(misses.len())
    }

    /// Before `Ran::freed_unreused`: cache the committed extents that
    /// start inside a freed extent that is not the committed item at its
    /// bytenr (an allocation dropped again before it was inserted), which
    /// it must see to leave their ranges out of what may be reused.
    fn cache_freed_covers(&self, report: &CommitReport) -> Result<(), crate::error::ReadError> {
        if self.cache_complete.load(Ordering::Acquire) || report.freed.is_empty() {
            return Ok(());
        }
        let ranges: Vec<(u64, u64)> = {
            let tree = self.engine.tree();
            report
                .freed
                .iter()
                .filter(|f| {
                    tree.get(f.bytenr)
                        .is_none_or(|c| c.num_bytes != f.num_bytes)
                })
                .map(|f| (f.bytenr, f.bytenr.saturating_add(f.num_bytes)))
                .collect()
        };
        if ranges.is_empty() {
            return Ok(());
        }
        let inside = extents_inside(&self.tree, self.storage.device_name(), &ranges)?;
        let tree = self.engine.tree();
        let missing: Vec<(u64, ExtentItem)> = inside
            .into_iter()
            .filter(|(b, _)| tree.get(*b).is_none())
            .collect();
        drop(tree);
        self.engine.cache_committed(missing);
        Ok(())
    }

    /// The B+tree side of a commit (on a commit worker, see
    /// `commit_locked`): once every record below the cut is durable, the
    /// run workers' item changes, the held heads (and how many chunks the
    /// last commit kept of them), the service state at the cut and the
    /// extent count (the last commit's, whether the tree records it, and
    /// this commit's change) go into the working B+tree.
    fn apply_items(
        &self,
        generation: u64,
        cut: Lsn,
        diffs: Vec<ItemDiffPart>,
        (held_heads, held_chunks_before): (&[Head], usize),
        service: ItemChanges,
        (extents_before, recorded): (u64, bool),
    ) -> Result<AppliedItems, CommitError> {
        let t = Instant::now();
        let device = self.storage.device_name();
        // 2. Every record below the cut is durable.
        self.log.wait_for(cut.prev()).map_err(|e| {
            let operation = format!("wait for LSN {}", cut.prev().get());
            let failure = Failure::of_log(device, operation, &e);
            self.fail(generation, CommitStep::WaitLog, failure)
        })?;
        // 3. Tree nodes: the items of every extent the core engine changed,
        // encoded by its run workers.
        let (mut parts, extents_delta) = sorted_item_diffs(diffs).map_err(|(bytenr, e)| {
            let failure = Failure::new(device, format!("encode extent {bytenr}"), None, &e);
            self.fail(generation, CommitStep::EncodeItems, failure)
        })?;
        let diff = t.elapsed();
        // Heads a seq barrier held are requeued in memory, and their log
        // records are trimmed below: the B+tree keeps them instead (the
        // whole held set replaces the last commit's), and recovery
        // requeues them before replaying the log. Their keys sort after
        // every extent's.
        let held = if held_heads.is_empty() {
            Vec::new()
        } else {
            codec::held_items(&codec::encode_held(held_heads))
        };
        let held_chunks = held.len();
        let held_units = crate::space::held_units(held_heads);
        let mut held_changes: ItemChanges =
            held.into_iter().map(|(k, v)| (k, Change::Put(v))).collect();
        for i in held_chunks..held_chunks_before {
            held_changes.push((
                Key::new(codec::HELD_OBJECTID, codec::HELD_HEADS_KEY, i as u64),
                Change::Delete,
            ));
        }
        parts.push(held_changes);
        // The service items sort after the held heads', the extent count
        // after them.
        parts.push(service);
        // Saturating: a count read from the device is not trusted to be
        // above what a commit deletes (a wrong one is reported by
        // `refctl fsck` and `verify`, never a panic here).
        let extents = extents_before.saturating_add_signed(extents_delta);
        if extents_delta != 0 || !recorded {
            let value = codec::service::encode_extent_count(extents);
            parts.push(vec![(codec::service::extents_key(), Change::Put(value))]);
        }
        let item_changes = parts.iter().map(Vec::len).sum();
        // The reservation of this commit, from what it really changes
        // (nothing applied yet: the tree is the one it starts from).
        let put_bytes: u64 = parts
            .iter()
            .flatten()
            .map(|(_, c)| match c {
                Change::Put(v) => (v.len() + LEAF_ITEM_OVERHEAD_BYTES) as u64,
                Change::Delete => 0,
            })
            .sum();
        self.space
            .exact(item_changes as u64, put_bytes, &self.tree.space());
        for changes in parts {
            if !changes.is_empty() {
                self.tree.apply_sorted(changes).map_err(|e| {
                    let failure = Failure::new(device, "apply item changes", e.offset(), &e);
                    self.fail(generation, CommitStep::ApplyItems, failure)
                })?;
            }
        }
        Ok(AppliedItems {
            item_changes,
            extents,
            held_chunks,
            held_units,
            diff,
        })
    }

    fn commit_tail(
        &self,
        st: &mut CommitState,
        cut: Lsn,
        core: CommitReport,
        items: AppliedItems,
        phases: &mut CommitPhases,
    ) -> Result<CommitSummary, CommitError> {
        let device = self.storage.device_name();
        let generation = st.next_generation;
        assert_eq!(
            core.generation, generation,
            "the core engine ran another generation than the durable commit"
        );
        phases.diff = items.diff;
        let t_apply = Instant::now();
        // The B+tree (working tree) has this commit: lookups may read it
        // for any bytenr again, and the cache may shrink.
        *self.inflight.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Vec::new());
        let cached = self.engine.tree().len();
        let extents_evicted = if cached > self.cache_extents_max {
            // From here on misses must be read from the B+tree. Set before
            // the eviction: a lookup that misses an evicted item then reads
            // the B+tree, which already has this commit.
            self.cache_complete.store(false, Ordering::Release);
            // Down to 7/8 of the bound, so that not every commit evicts.
            self.engine
                .evict_committed(self.cache_extents_max - self.cache_extents_max / 8)
        } else {
            0
        };
        phases.apply += t_apply.elapsed();
        let fail = |step: CommitStep, failure: Failure| self.fail(generation, step, failure);
        let t_write = Instant::now();
        let info = self.tree.commit(generation).map_err(|e| {
            fail(
                CommitStep::WriteNodes,
                Failure::new(device, "write nodes", e.offset(), &e),
            )
        })?;
        phases.write = t_write.elapsed();
        // Its nodes are allocated now (the tree's space counts them): the
        // reservation goes. The heads it held were reserved by the ops
        // this commit took: they and their stream are the next commit's.
        self.space
            .committed(items.held_chunks as u64, items.held_units);
        let t_sb = Instant::now();
        // 4. The superblock: the commit point.
        let mut sb = st.sb.clone();
        info.apply_to(&mut sb);
        let bounds = self.log.bounds(cut).map_err(|e| {
            let operation = format!("log bounds at cut {}", cut.get());
            fail(
                CommitStep::LogBounds,
                Failure::of_log(device, operation, &e),
            )
        })?;
        bounds.apply_to(&mut sb);
        sb.generation = generation;
        sb.flags &= !SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
        write_superblock(&self.storage, &sb).map_err(|e| {
            let operation = format!("write superblock generation {generation}");
            fail(
                CommitStep::WriteSuperblock,
                Failure::new(device, operation, e.offset(), &e),
            )
        })?;
        st.sb = sb;
        st.next_generation = generation + 1;
        // Batches opened from now on say that this superblock is durable:
        // if it rots later, open from the older copy sees it was there
        // (`open::newer_superblock`). Before the release and the trim, the
        // first steps that make the older copy's nodes and log reusable.
        self.log.set_txn_id(generation).map_err(|e| {
            let operation = format!("stamp later log batches with generation {generation}");
            fail(
                CommitStep::WriteSuperblock,
                Failure::of_log(device, operation, &e),
            )
        })?;
        st.held_chunks = items.held_chunks;
        st.extents_recorded = true;
        self.extents.store(items.extents, Ordering::Relaxed);
        // 5. Only now: the dropped nodes and the log space are reusable.
        self.tree.release_pending(generation).map_err(|e| {
            let failure = Failure::new(device, "release dropped nodes", e.offset(), &e);
            fail(CommitStep::ReleaseNodes, failure)
        })?;
        self.log.trim(cut).map_err(|e| {
            let operation = format!("trim to {}", cut.get());
            fail(CommitStep::TrimLog, Failure::of_log(device, operation, &e))
        })?;
        phases.superblock = t_sb.elapsed();
        Ok(CommitSummary {
            generation,
            cut,
            core,
            item_changes: items.item_changes,
            nodes_written: info.nodes_written,
            dirty_bytes: info.dirty_bytes,
            extents_read: 0,
            extents_evicted,
            ops: 0,
            phases: CommitPhases::default(),
        })
    }
}
