//! The committer: the loop that acts on the commit policy
//! (`policy.rs`), over a [`Clock`] it is given. [`SystemClock`] in
//! production; [`ManualClock`] moves only when a test says so, so the
//! interval trigger can be driven step by step ([`Committer::tick`]), as
//! TigerBeetle's simulator drives its time (`src/testing/time.zig`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use refd_core::delayed::DelayedRefStore;
use refd_ioring::Storage;

use crate::engine::{lock, DurableEngine};
use crate::error::CommitError;
use crate::policy::{commit_due, Reason};

/// Where the committer's time comes from.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that stands still until [`ManualClock::advance`].
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    nanos: AtomicU64,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl ManualClock {
    /// A clock at an arbitrary fixed start.
    pub fn new() -> Self {
        ManualClock {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let n = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(n, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

impl<C: Clock> Clock for &C {
    fn now(&self) -> Instant {
        (**self).now()
    }
}

/// What a committer did.
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
    /// ... of which the dirty-bytes estimate started.
    pub by_dirty: u64,
    /// Heads held back by a seq barrier over all its commits (kept in the
    /// B+tree by each commit, run by a later one).
    pub heads_held: u64,
}

/// Runs the commit policy of one engine (see the module docs).
#[derive(Debug)]
pub struct Committer<'e, S: Storage + Clone, D: DelayedRefStore, C: Clock> {
    engine: &'e DurableEngine<S, D>,
    clock: C,
    last_start: Instant,
    stats: CommitterStats,
}

impl<'e, S: Storage + Clone, D: DelayedRefStore, C: Clock> Committer<'e, S, D, C> {
    /// A committer of `engine`; the interval counts from now.
    pub fn new(engine: &'e DurableEngine<S, D>, clock: C) -> Self {
        let last_start = clock.now();
        Committer {
            engine,
            clock,
            last_start,
            stats: CommitterStats::default(),
        }
    }

    /// What it did so far.
    pub fn stats(&self) -> CommitterStats {
        self.stats
    }

    /// One decision at the clock's now: commits if the policy says so
    /// (and returns why). An interval or a kick that finds nothing to
    /// commit restarts the interval, as a commit does.
    pub fn tick(&mut self) -> Result<Option<Reason>, CommitError> {
        let now = self.clock.now();
        let since = now.saturating_duration_since(self.last_start);
        let kicked = self.engine.take_kick();
        let input = self.engine.policy_input(since, kicked);
        let policy = self.engine.policy();
        let reason = policy.decide(&input);
        if kicked || reason.is_some() || policy.sleep_for(since).is_zero() {
            self.last_start = now;
        }
        if let Some(reason) = reason {
            self.commit()?;
            match reason {
                Reason::Interval => self.stats.by_interval += 1,
                Reason::Pending => self.stats.by_pending += 1,
                Reason::Log => self.stats.by_log += 1,
                Reason::Dirty => self.stats.by_dirty += 1,
            }
        }
        Ok(reason)
    }

    fn commit(&mut self) -> Result<(), CommitError> {
        let summary = self.engine.commit()?;
        self.stats.commits += 1;
        self.stats.heads_held += summary.core.held as u64;
        Ok(())
    }

    /// Runs until [`DurableEngine::stop_committer`] (then commits what is
    /// pending and returns) or the first failed commit (returned; the
    /// engine is latched). Run one per engine, e.g. on a scoped thread.
    pub fn run(mut self) -> Result<CommitterStats, CommitError> {
        loop {
            if self.wait() {
                lock(&self.engine.committer).stop = false;
                let input = self.engine.policy_input(Duration::ZERO, false);
                if commit_due(&input) {
                    self.commit()?;
                }
                return Ok(self.stats);
            }
            self.tick()?;
        }
    }

    /// Sleeps until a kick, the interval or a stop (true).
    fn wait(&self) -> bool {
        let mut f = lock(&self.engine.committer);
        loop {
            if f.stop {
                return true;
            }
            if f.kicked {
                return false;
            }
            // Read each time: `set_policy` may change it.
            let since = self.clock.now().saturating_duration_since(self.last_start);
            let sleep = self.engine.policy().sleep_for(since);
            if sleep.is_zero() {
                return false;
            }
            f = self
                .engine
                .committer_cv
                .wait_timeout(f, sleep)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use refd_core::model::{Action, ExtentKind, Op, RefKey};
    use refd_ioring::format::FsId;
    use refd_ioring::log::LogConfig;
    use refd_ioring::{SimConfig, SimStorage};

    use super::*;
    use crate::engine::{FormatOptions, OpenOptions};
    use crate::policy::{CommitPolicy, ESTIMATE_OPS_MIN, POLICY_CHECK_OPS, TRIGGER_OPS_MIN};

    type Dev = Arc<SimStorage>;

    fn open(policy: CommitPolicy) -> DurableEngine<Dev> {
        open_with(32 << 20, policy, refd_ioring::btree::TreeConfig::default())
    }

    fn open_with(
        device_bytes: u64,
        policy: CommitPolicy,
        tree: refd_ioring::btree::TreeConfig,
    ) -> DurableEngine<Dev> {
        let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(device_bytes, 3)).unwrap());
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
            tree,
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

    /// Uniform refs over a tree several times the node cache: the
    /// dirty-bytes trigger starts the commits (the pending-op trigger is
    /// far above), and once its estimate has seen the workload, no commit
    /// pins more than twice the trigger's bytes (back-pressure). After
    /// the change from sequential inserts to uniform refs the estimate
    /// lags by four commits (measured: about 11, 11, 3.5 and 3.7 MiB at a
    /// 1 MiB trigger): the first was sealed under the old estimate, the
    /// second's ops were pending while the first ran, the next two
    /// shrink toward the bound; then at most 1.8 MiB. Under load (the
    /// whole suite in parallel, ingest paced while commits run) it once
    /// lagged by five: the fifth commit's 228 ops, twice a trigger set
    /// from the large second commit's bytes per op, pinned 2.79 MiB at
    /// the small third commit's 12 KiB per op; the sixth on were bounded.
    ///
    /// "Twice" is about twice: the estimate is the last commit's bytes
    /// per op, and the next commit's differ from it. In one CI run the
    /// commits of 128 ops pinned 1.51–1.94 MB (the bytes per op grew by
    /// a fifth over the run as the tree grew), and one of 152 ops, with
    /// back-pressure at 154 from a 64-op commit's 13.5 KB per op, pinned
    /// 2.12 MB (13.9 KB per op), 1% over 2 MiB. The bound checked is 2¼
    /// times the trigger (twice, with an eighth to spare).
    ///
    /// The pending-op triggers (the configured one and the time-based
    /// one) are far above, but a commit can still count as started by
    /// pending ops: an add that crossed the dirty-bytes trigger kicks the
    /// committer, and when the commit that ends meanwhile sets an estimate
    /// that puts the trigger above the ops pending, the kick starts a
    /// commit "by pending". How often depends on how adds and commits
    /// interleave: with two CPUs busy beside, 0 to 2 of 98-196 commits per
    /// run (17 runs; the one with 2 failed the former bound of 1). Checked:
    /// at most one commit in 20 (a dirty-bytes trigger that never fired,
    /// or a pending-op one below it, would start them all).
    #[test]
    fn dirty_bytes_trigger_bounds_a_commits_dirty_nodes() {
        const EXTENTS: u64 = 131_072;
        const REFS: u64 = 60_000;
        const DIRTY_TRIGGER: u64 = 1 << 20;
        const CACHE_BYTES: usize = 4 << 20;
        let e = open_with(
            64 << 20,
            CommitPolicy {
                interval_ms: 60_000,
                pending_ops_trigger: 1 << 20,
                dirty_bytes_trigger: DIRTY_TRIGGER,
                ..CommitPolicy::default()
            },
            refd_ioring::btree::TreeConfig {
                cache_bytes: CACHE_BYTES,
                ..refd_ioring::btree::TreeConfig::default()
            },
        );
        let uniform = Arc::new(AtomicBool::new(false));
        let dirty = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (seen, phase) = (Arc::clone(&dirty), Arc::clone(&uniform));
        e.set_commit_hook(move |s| {
            if phase.load(Ordering::SeqCst) {
                seen.lock().unwrap().push((s.ops, s.dirty_bytes));
            }
        });
        let extent = |i: u64| (1 << 30) + i * 4096;
        let mut x = 1u64;
        let stats = std::thread::scope(|s| {
            let committer = s.spawn(|| e.run_committer());
            for n in 0..EXTENTS + REFS {
                let (bytenr, action) = if n < EXTENTS {
                    (extent(n), Action::AddExtent)
                } else {
                    uniform.store(true, Ordering::SeqCst);
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (extent((x >> 33) % EXTENTS), Action::AddRef)
                };
                let key = RefKey::ExtentData {
                    root: 5,
                    objectid: 256 + n,
                    offset: 0,
                };
                let op = Op::new(bytenr, 4096, ExtentKind::Data, action, key, 0).unwrap();
                e.add(&op).unwrap();
            }
            e.stop_committer();
            committer.join().unwrap().unwrap()
        });
        eprintln!(
            "{stats:?}; measured {} ps/op, {} dirty bytes/op, trigger {} ops",
            e.commit_cost_ps_per_op(),
            e.commit_dirty_bytes_per_op(),
            e.commit_trigger_ops()
        );
        let tree = e.btree().check().unwrap();
        let tree_bytes = tree.nodes * refd_ioring::format::NODE_BYTES as u64;
        assert!(tree_bytes >= 3 * CACHE_BYTES as u64, "{tree:?}");
        assert!(stats.by_dirty > 0, "{stats:?}");
        assert!(stats.by_pending * 20 <= stats.commits, "{stats:?}");
        let dirty = dirty.lock().unwrap();
        assert!(dirty.len() > 20, "{dirty:?}");
        for (i, &(ops, bytes)) in dirty.iter().enumerate().skip(5) {
            assert!(
                bytes <= 2 * DIRTY_TRIGGER + DIRTY_TRIGGER / 4,
                "uniform commit {i}: {ops} ops pinned {bytes} bytes: {dirty:?}"
            );
        }
        assert!(e.btree().cache_stats().bytes <= CACHE_BYTES as u64);
        assert_eq!(e.committed_extents().unwrap().total_refs(), EXTENTS + REFS);
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
            dirty_bytes_trigger: 0,
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
            0,
        );
        assert_eq!(e.commit_trigger_ops(), 250_000);
        // Small commits do not move the estimate.
        e.record_commit(10, Duration::from_secs(1), 0);
        assert_eq!(e.commit_trigger_ops(), 250_000);
        // 8 µs per op, averaged 3:1 with the old 4 µs: 5 µs.
        e.record_commit(
            ESTIMATE_OPS_MIN,
            Duration::from_nanos(ESTIMATE_OPS_MIN * 8000),
            0,
        );
        assert_eq!(e.commit_cost_ps_per_op(), 5_000_000);
        assert_eq!(e.commit_trigger_ops(), 200_000);
        // Never below the floor.
        e.record_commit(ESTIMATE_OPS_MIN, Duration::from_secs(100), 0);
        assert!(e.commit_trigger_ops() >= TRIGGER_OPS_MIN);
    }

    /// The interval trigger, driven by a clock that moves only when told:
    /// nothing happens before the interval (less the early wake-up), a
    /// commit happens at it, and an idle interval restarts the count.
    #[test]
    fn interval_trigger_on_a_manual_clock() {
        let e = open(CommitPolicy {
            interval_ms: 1000,
            ..CommitPolicy::default()
        });
        let clock = ManualClock::new();
        let mut c = Committer::new(&e, &clock);
        e.add_durable(&op(0)).unwrap();
        clock.advance(Duration::from_millis(949));
        assert_eq!(c.tick().unwrap(), None, "before the interval");
        clock.advance(Duration::from_millis(1));
        assert_eq!(c.tick().unwrap(), Some(Reason::Interval));
        assert_eq!((e.pending_ops(), c.stats().by_interval), (0, 1));
        // Nothing pending: the next interval passes without a commit and
        // restarts the count; an op after it waits a whole interval.
        clock.advance(Duration::from_millis(950));
        assert_eq!(c.tick().unwrap(), None);
        clock.advance(Duration::from_millis(500));
        e.add_durable(&op(1)).unwrap();
        assert_eq!(c.tick().unwrap(), None, "the interval restarted when idle");
        clock.advance(Duration::from_millis(450));
        assert_eq!(c.tick().unwrap(), Some(Reason::Interval));
        assert_eq!(e.commit_totals().commits, 2);
        assert_eq!(e.committed_extents().unwrap().total_refs(), 2);
    }
}
