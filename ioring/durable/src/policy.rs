//! When to commit, and when ingest must wait: the commit policy and the
//! committer loop of [`DurableEngine`].
//!
//! btrfs commits a transaction every `commit_interval` seconds, and
//! throttles a task adding delayed refs when running the pending ones
//! would take a second or more (`btrfs_should_throttle_delayed_refs`:
//! `avg_delayed_ref_runtime × entries ≥ NSEC_PER_SEC`); the throttled task
//! then runs refs itself. refd does the same with whole commits, which run
//! while ingest goes on (only the seal stops it, for microseconds):
//!
//! - **interval**: a commit starts at least every
//!   [`CommitPolicy::interval_ms`] while ops are pending, measured start
//!   to start (a commit longer than the interval is followed at once; the
//!   committer wakes slightly early, see [`wake_after`]);
//! - **pending ops**: a commit starts when the pending ops reach
//!   [`DurableEngine::commit_trigger_ops`]: the fewer of
//!   [`CommitPolicy::pending_ops_trigger`] and the ops whose commit is
//!   estimated to take [`CommitPolicy::commit_target_ms`] (the measured
//!   time per op of earlier large commits, like btrfs's average runtime;
//!   [`OP_COST_PS_UNMEASURED`] before the first);
//! - **log space**: a commit starts when the log is
//!   [`CommitPolicy::log_used_pct_trigger`] percent full;
//! - **back-pressure**: an add that finds twice the trigger pending (the
//!   memory bound: the running commit's transaction plus a full next one)
//!   waits for the running commit, or commits itself if none runs, like
//!   btrfs's throttled task. An add that finds no log space does the same
//!   (see [`DurableEngine::add`]).
//!
//! Ops are counted under the cut lock, so the count of a transaction is
//! exact. Triggers are checked every [`POLICY_CHECK_OPS`] ops per engine
//! (or every `trigger` ops when the trigger is smaller), so the hot path
//! costs one shared counter increment.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use refd_ioring::Storage;

use crate::engine::{lock, DurableEngine, Result};

/// Triggers are checked when the pending-op count crosses a multiple of
/// this.
pub const POLICY_CHECK_OPS: u64 = 1024;
/// Commits with fewer frozen ops do not update the time-per-op estimate
/// (their fixed costs would dominate it).
pub const ESTIMATE_OPS_MIN: u64 = 64 * 1024;
/// The pending-op trigger never goes below this.
pub const TRIGGER_OPS_MIN: u64 = 64 * 1024;
/// Commit time per op (picoseconds) assumed until a commit has been
/// measured: 2 µs, so that with the default target the first commit of a
/// busy engine has at most half a million ops. Measured steady-state costs
/// on a 2-core VM are 0.5-1 µs per op; a first commit on a fresh device,
/// which inserts every extent it sees into memory the process has not yet
/// touched, is the dearest. Without it the first commit ran every op of
/// its first second: 1.8M ops in 1.7 s at 1.4M ops/s.
pub const OP_COST_PS_UNMEASURED: u64 = 2_000_000;

/// How long after a commit start the committer wakes up for the next one,
/// to start it within `interval`: early by 5% of it (at most 50 ms), so
/// that timer and scheduling latency never stretch the gap past
/// `interval`. (Measured at a 1 s interval on a 2-core VM under full load:
/// waking at exactly 1 s, gaps were 1.001-1.004 s; 10 ms early, one run in
/// five still had a 1.002 s gap, 20 ms early one in nine a 1.005 s gap;
/// the committer woke up to 30 ms late, about once in 240 wake-ups.)
pub fn wake_after(interval: Duration) -> Duration {
    interval - (interval / 20).min(Duration::from_millis(50))
}

/// When to commit (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPolicy {
    /// Longest time between commit starts while ops are pending.
    pub interval_ms: u64,
    /// Most ops pending before a commit starts.
    pub pending_ops_trigger: u64,
    /// Target length of one commit: fewer ops trigger a commit when the
    /// measured time per op says a commit of the pending ones would take
    /// longer.
    pub commit_target_ms: u64,
    /// Log fill (percent of the log region) that starts a commit.
    pub log_used_pct_trigger: u64,
}

impl Default for CommitPolicy {
    fn default() -> Self {
        CommitPolicy {
            interval_ms: 1000,
            pending_ops_trigger: 4_000_000,
            commit_target_ms: 1000,
            log_used_pct_trigger: 50,
        }
    }
}

/// What [`DurableEngine::run_committer`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitterStats {
    /// Commits run by the committer.
    pub commits: u64,
    /// ... of which the interval started.
    pub by_interval: u64,
    /// ... of which the pending-op count started.
    pub by_pending: u64,
    /// ... of which log space started.
    pub by_log: u64,
    /// Heads held back by a seq barrier over all its commits (kept in the
    /// B+tree by each commit, run by a later one).
    pub heads_held: u64,
}

/// Committer wake-up state, behind `DurableEngine::committer`.
#[derive(Debug, Default)]
pub(crate) struct CommitterFlags {
    pub stop: bool,
    pub kicked: bool,
}

/// Why the committer commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Interval,
    Pending,
    Log,
}

impl<S: Storage + Clone> DurableEngine<S> {
    /// The commit policy in force.
    pub fn policy(&self) -> CommitPolicy {
        *lock(&self.policy)
    }

    /// Replaces the commit policy (the pending-op trigger is recomputed at
    /// once; a running committer takes a new interval after its next
    /// wake-up).
    pub fn set_policy(&self, policy: CommitPolicy) {
        *lock(&self.policy) = policy;
        self.record_commit(0, Duration::ZERO);
    }

    /// The pending-op count that starts a commit now (see the module docs).
    pub fn commit_trigger_ops(&self) -> u64 {
        self.trigger_ops.load(Ordering::Relaxed)
    }

    /// Ops pending (added since the last seal), counted exactly.
    pub fn pending_ops(&self) -> u64 {
        self.pending_ops.load(Ordering::Relaxed)
    }

    /// Heads the last commit (or recovery) requeued because a seq barrier
    /// held them: pending too, committed by the interval (not counted in
    /// [`DurableEngine::pending_ops`] or back-pressure).
    pub fn heads_held(&self) -> u64 {
        self.heads_held.load(Ordering::Relaxed)
    }

    /// Called by an add that made `pending` ops pending, outside the cut
    /// lock: wake the committer, or apply back-pressure.
    pub(crate) fn after_add(&self, pending: u64) -> Result<()> {
        let trigger = self.commit_trigger_ops();
        if !pending.is_multiple_of(POLICY_CHECK_OPS.min(trigger).max(1)) {
            return Ok(());
        }
        let bound = trigger.saturating_mul(2);
        if pending >= bound {
            return self.throttle(bound);
        }
        if pending >= trigger || self.log_trigger() {
            self.kick_committer();
        }
        Ok(())
    }

    fn log_trigger(&self) -> bool {
        let log = self.log();
        let pct = u128::from(self.policy().log_used_pct_trigger);
        u128::from(log.used_bytes()) * 100 >= u128::from(log.log_bytes()) * pct
    }

    /// Back-pressure: wait for the running commit; if the pending ops are
    /// still at `bound` after it, commit here.
    fn throttle(&self, bound: u64) -> Result<()> {
        let mut st = lock(&self.commit);
        if self.pending_ops() < bound {
            return Ok(());
        }
        self.commit_locked(&mut st).map(|_| ())
    }

    /// Update the time-per-op estimate with a commit of `ops` frozen ops
    /// that took `took`, and the pending-op trigger with it.
    pub(crate) fn record_commit(&self, ops: u64, took: Duration) {
        if ops >= ESTIMATE_OPS_MIN {
            let now_ps = (took.as_nanos() as u64).saturating_mul(1000) / ops;
            let old_ps = self.op_cost_ps.load(Ordering::Relaxed);
            // Average with the previous estimate (btrfs averages its
            // runtime the same way: (old + new) / 2 with weights 3:1).
            let ps = if old_ps == 0 {
                now_ps
            } else {
                (3 * old_ps + now_ps) / 4
            };
            self.op_cost_ps.store(ps.max(1), Ordering::Relaxed);
        }
        let ps = match self.op_cost_ps.load(Ordering::Relaxed) {
            0 => OP_COST_PS_UNMEASURED,
            ps => ps,
        };
        let policy = self.policy();
        let by_time = policy
            .commit_target_ms
            .saturating_mul(1_000_000_000)
            .checked_div(ps)
            .unwrap_or(u64::MAX);
        let trigger = by_time
            .min(policy.pending_ops_trigger)
            .max(TRIGGER_OPS_MIN.min(policy.pending_ops_trigger).max(1));
        self.trigger_ops.store(trigger, Ordering::Relaxed);
    }

    /// The measured commit time per op (picoseconds; 0 until a commit of
    /// at least [`ESTIMATE_OPS_MIN`] ops).
    pub fn commit_cost_ps_per_op(&self) -> u64 {
        self.op_cost_ps.load(Ordering::Relaxed)
    }

    fn kick_committer(&self) {
        let mut f = lock(&self.committer);
        if !f.kicked {
            f.kicked = true;
            self.committer_cv.notify_all();
        }
    }

    /// Asks [`DurableEngine::run_committer`] to return.
    pub fn stop_committer(&self) {
        lock(&self.committer).stop = true;
        self.committer_cv.notify_all();
    }

    /// Runs the commit policy on this thread until
    /// [`DurableEngine::stop_committer`] (then commits what is pending and
    /// returns) or the first failed commit (returned; the engine is
    /// latched). Run one per engine, e.g. on a scoped thread.
    pub fn run_committer(&self) -> Result<CommitterStats> {
        let mut stats = CommitterStats::default();
        let mut last_start = Instant::now();
        loop {
            let reason = {
                let mut f = lock(&self.committer);
                loop {
                    if f.stop {
                        break None;
                    }
                    if std::mem::take(&mut f.kicked) {
                        break Some(if self.log_trigger() {
                            Reason::Log
                        } else {
                            Reason::Pending
                        });
                    }
                    // Read each time: `set_policy` may change it. An
                    // interval too large to add is "never".
                    let interval = Duration::from_millis(self.policy().interval_ms.max(1));
                    let now = Instant::now();
                    f = match last_start.checked_add(wake_after(interval)) {
                        Some(due) if now >= due => break Some(Reason::Interval),
                        Some(due) => {
                            self.committer_cv
                                .wait_timeout(f, due - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0
                        }
                        None => self.committer_cv.wait(f).unwrap_or_else(|e| e.into_inner()),
                    };
                }
            };
            let Some(reason) = reason else {
                lock(&self.committer).stop = false;
                if self.commit_due() {
                    self.commit_for_committer(&mut stats)?;
                }
                return Ok(stats);
            };
            last_start = Instant::now();
            if !self.commit_due() && !self.log_trigger() {
                continue;
            }
            if self.commit_for_committer(&mut stats)? {
                match reason {
                    Reason::Interval => stats.by_interval += 1,
                    Reason::Pending => stats.by_pending += 1,
                    Reason::Log => stats.by_log += 1,
                }
            }
        }
    }

    /// Something a commit would change: pending ops, or held heads whose
    /// barriers are all gone (while one is held, committing them again
    /// would only rewrite the same held set).
    fn commit_due(&self) -> bool {
        self.pending_ops() > 0 || (self.heads_held() > 0 && self.core().barrier().active() == 0)
    }

    /// One commit of the committer.
    fn commit_for_committer(&self, stats: &mut CommitterStats) -> Result<bool> {
        let summary = self.commit()?;
        stats.commits += 1;
        stats.heads_held += summary.core.held as u64;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use refd_core::model::{Action, ExtentKind, Op, RefKey};
    use refd_ioring::format::FsId;
    use refd_ioring::log::LogConfig;
    use refd_ioring::{SimConfig, SimStorage};

    use super::*;
    use crate::engine::{FormatOptions, OpenOptions};

    type Dev = Arc<SimStorage>;

    fn open(policy: CommitPolicy) -> DurableEngine<Dev> {
        let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(32 << 20, 3)).unwrap());
        DurableEngine::format(
            &dev,
            FormatOptions {
                log_bytes: Some(8 << 20),
                fs_id: Some(FsId([9; 16])),
            },
        )
        .unwrap();
        let options = OpenOptions {
            log: LogConfig {
                batch_bytes_max: 64 << 10,
                ..LogConfig::default()
            },
            policy,
            ..OpenOptions::default()
        };
        DurableEngine::open(dev, options).unwrap().0
    }

    /// Op `n` of a valid stream: extent `n % 64` allocated first, then
    /// refs from distinct inodes.
    fn op(n: u64) -> Op {
        let e = n % 64;
        let action = if n < 64 {
            Action::AddExtent
        } else {
            Action::AddRef
        };
        Op::new(
            (1 << 30) + e * 4096,
            4096,
            ExtentKind::Data,
            action,
            RefKey::ExtentData {
                root: 5,
                objectid: 256 + n,
                offset: 0,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn pending_ops_trigger_and_back_pressure() {
        let e = open(CommitPolicy {
            interval_ms: 60_000,
            pending_ops_trigger: 2048,
            ..CommitPolicy::default()
        });
        assert_eq!(e.commit_trigger_ops(), 2048);
        let stats = std::thread::scope(|s| {
            let committer = s.spawn(|| e.run_committer());
            for n in 0..40_000 {
                e.add(&op(n)).unwrap();
                // Back-pressure: never more than twice the trigger (plus
                // the ops between two checks) pending.
                assert!(e.pending_ops() <= 2 * 2048 + POLICY_CHECK_OPS, "{n}");
            }
            e.stop_committer();
            committer.join().unwrap().unwrap()
        });
        assert!(stats.by_pending > 0, "{stats:?}");
        assert_eq!(stats.by_interval, 0, "{stats:?}");
        assert_eq!(e.pending_ops(), 0, "stop commits what is pending");
        let all = e.committed_extents().unwrap();
        assert_eq!(all.total_refs(), 40_000);
        e.verify().unwrap();
    }

    #[test]
    fn throttle_commits_inline_without_a_committer() {
        let e = open(CommitPolicy {
            interval_ms: 60_000,
            pending_ops_trigger: 1024,
            ..CommitPolicy::default()
        });
        for n in 0..10_000 {
            e.add(&op(n)).unwrap();
            assert!(e.pending_ops() <= 2 * 1024 + POLICY_CHECK_OPS, "{n}");
        }
        assert!(e.commit_totals().commits >= 4);
    }

    #[test]
    fn wakes_early_enough_for_the_interval() {
        let ms = Duration::from_millis;
        assert_eq!(wake_after(ms(1000)), ms(950));
        assert_eq!(wake_after(ms(60_000)), ms(59_950));
        assert_eq!(wake_after(ms(20)), ms(19));
        assert_eq!(wake_after(ms(1)), Duration::from_micros(950));
    }

    #[test]
    fn interval_commits_and_stop() {
        let e = open(CommitPolicy {
            interval_ms: 20,
            ..CommitPolicy::default()
        });
        let stats = std::thread::scope(|s| {
            let committer = s.spawn(|| e.run_committer());
            for n in 0..100 {
                e.add_durable(&op(n)).unwrap();
            }
            // Ops pending for at least two intervals are committed.
            let t = Instant::now();
            while e.pending_ops() > 0 && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            e.stop_committer();
            committer.join().unwrap().unwrap()
        });
        assert!(stats.by_interval >= 1, "{stats:?}");
        assert_eq!(e.pending_ops(), 0);
        assert_eq!(e.committed_extents().unwrap().total_refs(), 100);
    }

    /// Held heads are committed by the interval once the barrier goes, and
    /// do not count toward back-pressure while held.
    #[test]
    fn interval_commits_held_heads_after_the_barrier() {
        let e = open(CommitPolicy {
            interval_ms: 10,
            ..CommitPolicy::default()
        });
        let wait_for = |what: &str, f: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !f() {
                assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        std::thread::scope(|s| {
            let committer = s.spawn(|| e.run_committer());
            e.add_durable(&op(0)).unwrap();
            let guard = e.core().barrier().acquire();
            let mut held = op(64);
            held.seq = e.core().barrier().current();
            e.add_durable(&held).unwrap();
            wait_for("a commit holds the head", &|| e.heads_held() == 1);
            assert_eq!(e.pending_ops(), 0, "held heads are not pending ops");
            drop(guard);
            wait_for("the interval runs it", &|| e.heads_held() == 0);
            e.stop_committer();
            committer.join().unwrap().unwrap();
        });
        assert_eq!(e.committed_extents().unwrap().total_refs(), 2);
    }

    #[test]
    fn trigger_follows_measured_commit_time() {
        let e = open(CommitPolicy {
            pending_ops_trigger: 10_000_000,
            commit_target_ms: 1000,
            ..CommitPolicy::default()
        });
        // Before any measurement, 2 µs per op is assumed: a 1 s commit is
        // half a million ops.
        assert_eq!(e.commit_cost_ps_per_op(), 0);
        assert_eq!(e.commit_trigger_ops(), 500_000);
        // The first measurement replaces the assumption (an average would
        // give 2.5 µs): 4 µs per op.
        e.record_commit(
            ESTIMATE_OPS_MIN,
            Duration::from_nanos(ESTIMATE_OPS_MIN * 4000),
        );
        assert_eq!(e.commit_trigger_ops(), 250_000);
        // Small commits do not move the estimate.
        e.record_commit(10, Duration::from_secs(1));
        assert_eq!(e.commit_trigger_ops(), 250_000);
        // 8 µs per op, averaged 3:1 with the old 4 µs: 5 µs.
        e.record_commit(
            ESTIMATE_OPS_MIN,
            Duration::from_nanos(ESTIMATE_OPS_MIN * 8000),
        );
        assert_eq!(e.commit_cost_ps_per_op(), 5_000_000);
        assert_eq!(e.commit_trigger_ops(), 200_000);
        // Never below the floor.
        e.record_commit(ESTIMATE_OPS_MIN, Duration::from_secs(100));
        assert!(e.commit_trigger_ops() >= TRIGGER_OPS_MIN);
    }
}
