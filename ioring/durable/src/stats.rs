//! What the engine reports: [`RecoveryInfo`] (what `open` found and did),
//! [`CommitSummary`] (one commit), [`CommitTotals`] (every commit since
//! open) and [`CommitPhases`] (where a commit's time went).

use std::fmt;
use std::time::{Duration, Instant};

use refd_core::engine::CommitReport;
use refd_ioring::format::RecoveryRecord;
use refd_ioring::log::{Lsn, RecoveryReport};

/// What [`DurableEngine::open`](crate::DurableEngine::open) found and did.
#[derive(Debug, Clone)]
pub struct RecoveryInfo {
    /// Generation of the superblock recovery started from.
    pub superblock_generation: u64,
    /// Its slot (0 or 1).
    pub superblock_slot: usize,
    /// Rejected superblock copies and why (normal after a torn write, or
    /// with a freshly formatted device's older copy).
    pub superblock_rejected: Vec<String>,
    /// Extents read into the in-memory cache (at most
    /// [`crate::OpenOptions::cache_extents_max`]).
    pub extents_cached: usize,
    /// Ops replayed from the log into the core engine (now pending).
    pub ops_replayed: usize,
    /// Heads the last commit held back (seq barrier), requeued (pending).
    pub heads_held: usize,
    /// The log's replay report: where and why the log ended (and, after a
    /// recovery mode gave something up, what it dropped).
    pub replay: RecoveryReport,
    /// What an explicit recovery mode dropped, as recorded in the
    /// superblock written at open (`None`: nothing dropped).
    pub dropped: Option<RecoveryRecord>,
    /// A newer superblock generation the log names, lost (its copy rotted),
    /// that an explicit recovery mode went on without (`None`: none).
    pub superblock_lost: Option<u64>,
    /// Generation written at open to claim any generation a lost commit
    /// may have used (see `docs/durable.md`, "Generations").
    pub claimed_generation: u64,
    /// The node region's size before and after [`crate::OpenOptions::grow`]
    /// extended it to the device's end (`None`: unchanged).
    pub node_region_grown: Option<(u64, u64)>,
    /// Device bytes past the node region's end, unused, in whole nodes:
    /// what [`crate::OpenOptions::grow`] would add (a device extended since
    /// it was formatted). A last part-node, which every layout may have,
    /// is not counted: nothing can use it.
    pub device_unused_bytes: u64,
    /// Slots of the spare windows the B+tree's allocator keeps for its
    /// bitmap runs (`docs/btree.md`, "Allocator"). 0: the node region had
    /// no run's worth of consecutive free slots at open (fragmented before
    /// spares existed), so commits place their runs first fit, and may
    /// fail with `NoSpace`, until a released run becomes a spare.
    pub bitmap_spare_nodes: u64,
}

impl fmt::Display for RecoveryInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recovered from superblock generation {} (slot {}), {} extents cached, {} held \
             heads requeued, {} ops replayed, claimed generation {}; log: {}",
            self.superblock_generation,
            self.superblock_slot,
            self.extents_cached,
            self.heads_held,
            self.ops_replayed,
            self.claimed_generation,
            self.replay
        )?;
        for r in &self.superblock_rejected {
            write!(f, "; rejected {r}")?;
        }
        if let Some(g) = self.superblock_lost {
            write!(
                f,
                "; NEWER SUPERBLOCK generation {g} LOST (the log holds batches written after it was durable): recovery mode {} went on from generation {}",
                self.replay.mode, self.superblock_generation
            )?;
        }
        if let Some((old, new)) = self.node_region_grown {
            write!(
                f,
                "; node region grown to the device's end: {old} -> {new} bytes"
            )?;
        } else if self.device_unused_bytes > 0 {
            write!(
                f,
                "; {} device bytes past the node region unused (open with grow to use them)",
                self.device_unused_bytes
            )?;
        }
        if self.bitmap_spare_nodes == 0 {
            write!(
                f,
                "; NO SPARE WINDOW for the bitmap run (no run's worth of consecutive free \
                 node slots): commits place it first fit until a released run replaces it"
            )?;
        }
        if let Some(d) = &self.dropped {
            write!(
                f,
                "; RECOVERY MODE {} DROPPED log batches lsn {}..={} ({} batches, {} acknowledged \
                 ops of intact batches, plus those of damaged ones), recorded in superblock \
                 generation {}",
                self.replay.mode,
                d.dropped_first_lsn,
                d.dropped_last_lsn,
                d.dropped_batches,
                d.dropped_ops,
                self.claimed_generation
            )?;
        }
        Ok(())
    }
}

/// What one [`DurableEngine::commit`](crate::DurableEngine::commit) did.
#[derive(Debug, Clone)]
pub struct CommitSummary {
    /// Superblock generation written (the commit point).
    pub generation: u64,
    /// The cut: every op with a lower LSN is in this commit.
    pub cut: Lsn,
    /// The core engine's report (heads run, freed extents, quarantine).
    pub core: CommitReport,
    /// B+tree item changes written.
    pub item_changes: usize,
    /// B+tree nodes written (including the free-space bitmap).
    pub nodes_written: u64,
    /// In-memory bytes of the B+tree nodes this commit dirtied (pinned
    /// until it wrote them; the dirty-bytes trigger's measure).
    pub dirty_bytes: u64,
    /// Extents of frozen heads read from the B+tree (cache misses).
    pub extents_read: usize,
    /// Extents evicted from the cache after the commit.
    pub extents_evicted: usize,
    /// Ops in the committed transaction.
    pub ops: u64,
    /// Where the time went.
    pub phases: CommitPhases,
}

/// Totals over every commit since open ([`DurableEngine::commit_totals`](crate::DurableEngine::commit_totals)).
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitTotals {
    /// Successful commits.
    pub commits: u64,
    /// Ops committed.
    pub ops: u64,
    /// B+tree nodes written.
    pub nodes_written: u64,
    /// The most dirty node bytes one commit pinned.
    pub dirty_bytes_max: u64,
    /// B+tree item changes.
    pub item_changes: u64,
    /// Extents read from the B+tree (cache misses).
    pub extents_read: u64,
    /// The longest commit's steps (`total`: its length), to tell what
    /// made it long.
    pub longest_phases: CommitPhases,
    /// Ops of the longest commit.
    pub longest_ops: u64,
    /// When the longest commit started.
    pub longest_start: Option<Instant>,
    /// Longest time between the starts of two consecutive commits.
    pub gap_max: Duration,
    /// Time per step, summed.
    pub phases: CommitPhases,
    /// When the latest commit started.
    pub last_start: Option<Instant>,
}

impl CommitTotals {
    pub(crate) fn add(&mut self, start: Instant, s: &CommitSummary) {
        self.commits += 1;
        self.ops += s.ops;
        self.nodes_written += s.nodes_written;
        self.dirty_bytes_max = self.dirty_bytes_max.max(s.dirty_bytes);
        self.item_changes += s.item_changes as u64;
        self.extents_read += s.extents_read as u64;
        if s.phases.total >= self.longest_phases.total {
            self.longest_phases = s.phases;
            self.longest_ops = s.ops;
            self.longest_start = Some(start);
        }
        if let Some(last) = self.last_start {
            self.gap_max = self.gap_max.max(start.duration_since(last));
        }
        self.last_start = Some(start);
        let (p, q) = (&mut self.phases, &s.phases);
        p.freeze += q.freeze;
        p.items += q.items;
        p.run += q.run;
        p.diff += q.diff;
        p.apply += q.apply;
        p.write += q.write;
        p.superblock += q.superblock;
        p.total += q.total;
    }
}

/// Wall time of each step of a commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitPhases {
    /// Seal (the only step that stops ingest) and merge into heads.
    pub freeze: Duration,
    /// Committed items of the frozen heads (cache, else B+tree reads).
    pub items: Duration,
    /// Core: run heads (each changed extent's B+tree changes encoded on
    /// the run's workers as it runs).
    pub run: Duration,
    /// Wait for the log below the cut; each run worker's item changes in
    /// key order (part of `apply`: on a commit worker, alongside the
    /// core's cache apply).
    pub diff: Duration,
    /// B+tree apply of the item changes (on a commit worker) alongside
    /// the core's apply to its cache (here); cache eviction.
    pub apply: Duration,
    /// B+tree node writes + flush.
    pub write: Duration,
    /// Superblock, release, trim.
    pub superblock: Duration,
    /// The whole commit.
    pub total: Duration,
}
