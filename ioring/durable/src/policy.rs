//! When to commit, and when ingest must wait: pure decisions over a
//! snapshot of the engine ([`PolicyInput`]); the loop that acts on them is
//! `committer.rs`, its time comes from a clock it is given.
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
//! - **pending ops**: a commit starts when the pending ops reach the
//!   trigger ([`CommitPolicy::trigger_ops`]): the fewer of
//!   [`CommitPolicy::pending_ops_trigger`] and the ops whose commit is
//!   estimated to take [`CommitPolicy::commit_target_ms`] (the measured
//!   time per op of earlier large commits, like btrfs's average runtime;
//!   [`OP_COST_PS_UNMEASURED`] before the first);
//! - **log space**: a commit starts when the log is
//!   [`CommitPolicy::log_used_pct_trigger`] percent full;
//! - **dirty bytes**: a commit's apply pins every B+tree node it rewrites
//!   until the commit writes it, so the pending ops whose commit is
//!   estimated to dirty [`CommitPolicy::dirty_bytes_trigger`] bytes of
//!   nodes start a commit: the trigger in force is also at most
//!   `dirty_bytes_trigger` / the dirty node bytes per op measured on the
//!   last commit of at least [`DIRTY_ESTIMATE_OPS_MIN`] ops
//!   ([`DIRTY_BYTES_PER_OP_UNMEASURED`] before the first), never below
//!   [`DIRTY_TRIGGER_OPS_MIN`]. Ops spread uniformly over a large tree
//!   dirty about one leaf each, ops on few extents share their leaves (a
//!   commit that pinned more than the trigger counts more, see
//!   [`next_dirty_bytes_per_op`]);
//! - **pacing** ([`CommitPolicy::pace`]): while a commit runs, an add
//!   that finds more than the trigger pending (the next commit already
//!   full) sleeps in proportion to how far past it the pending ops are,
//!   so that ingest slows to the commits' pace gradually instead of
//!   meeting the wall below all at once (a wait of up to a whole commit,
//!   about `commit_target_ms`: measured 0.7–1 s stalls of a closed loop
//!   at 1.5M ops/s whose ingest slightly outran its commits);
//! - **back-pressure** ([`CommitPolicy::throttles`]): an add that finds
//!   twice the trigger pending (the memory bound: the running commit's
//!   transaction plus a full next one; with the dirty-bytes trigger, a
//!   commit of at most twice its estimate) waits for the running commit, or
//!   commits itself if none runs, like btrfs's throttled task. An add that
//!   finds no log space does the same (see `DurableEngine::add`).
//!
//! Ops are counted under the cut lock, so the count of a transaction is
//! exact. Triggers are checked every [`POLICY_CHECK_OPS`] ops per engine
//! (or every `trigger` ops when the trigger is smaller), so the hot path
//! costs one shared counter increment.

use std::time::Duration;

/// Pacing's gain: pacing starts at one and a half times the trigger; a
/// sixteenth of the way from there to twice the trigger, an add sleeps as
/// long as committing the ops it brought is estimated to take; past that,
/// proportionally more (up to `PACE_GAIN` times at twice the trigger). N
/// adding threads settle where they add no faster than the commits run:
/// about `trigger × (1.5 + N / (2 × PACE_GAIN))` pending.
pub const PACE_GAIN: u64 = 16;
/// One add sleeps at most this long for pacing (the wall at twice the
/// trigger bounds the pending ops anyway).
pub const PACE_SLEEP_MAX: Duration = Duration::from_millis(20);

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
/// Dirty node bytes per op assumed until a commit has been measured: one
/// full node per op (16 KiB encoded, about 20 KiB in memory), what ops
/// spread over a tree of many more leaves than ops cost. The first commit
/// of a busy engine is then small, and measured.
pub const DIRTY_BYTES_PER_OP_UNMEASURED: u64 = 20 << 10;
/// Commits with fewer frozen ops do not update the dirty-bytes-per-op
/// estimate: a commit of a few ops dirties a whole root-to-leaf path per
/// op, far more per op than a large one.
pub const DIRTY_ESTIMATE_OPS_MIN: u64 = DIRTY_TRIGGER_OPS_MIN;
/// The dirty-bytes trigger never takes the pending-op trigger below this
/// (a commit's fixed costs, a superblock and two flushes, would dominate);
/// it matters only for a trigger below 64 nodes' bytes.
pub const DIRTY_TRIGGER_OPS_MIN: u64 = 64;

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

/// Default [`CommitPolicy::dirty_bytes_trigger`]: half the default node
/// cache ([`crate::engine::NODE_CACHE_BYTES_DEFAULT`], whose budget counts
/// dirty nodes too), 256 MiB. Back-pressure lets a commit have up to twice
/// the trigger's ops, so a commit pins at most about the whole cache (the
/// cache then evicts every clean node it can): memory stays within the
/// node cache's budget. A quarter (128 MiB) was measured to start 35 of 48
/// commits of the default 1M-extent `refd-bench durable` run, whose tree
/// (196 MB) fits the cache and whose commits pinned up to 153 MB: the
/// trigger then shrank commits to ~13k ops, where each of them rewrites
/// most leaves. With a smaller node cache, set it to half that cache.
pub const DIRTY_BYTES_TRIGGER_DEFAULT: u64 = (crate::engine::NODE_CACHE_BYTES_DEFAULT / 2) as u64;

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
    /// Dirty B+tree node bytes (in memory) that one commit is estimated to
    /// pin; more pending ops start a commit, and twice as many throttle
    /// ingest. 0: no dirty-bytes trigger.
    pub dirty_bytes_trigger: u64,
}

impl Default for CommitPolicy {
    fn default() -> Self {
        CommitPolicy {
            interval_ms: 1000,
            pending_ops_trigger: 4_000_000,
            commit_target_ms: 1000,
            log_used_pct_trigger: 50,
            dirty_bytes_trigger: DIRTY_BYTES_TRIGGER_DEFAULT,
        }
    }
}

/// Why a commit starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The interval passed with something to commit.
    Interval,
    /// The pending ops reached the trigger.
    Pending,
    /// The log reached its fill trigger.
    Log,
    /// The pending ops are estimated to dirty the dirty-bytes trigger.
    Dirty,
}

/// What the policy looks at: a snapshot of the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyInput {
    /// Ops added since the last seal.
    pub pending_ops: u64,
    /// Heads the last commit held back (seq barrier).
    pub heads_held: u64,
    /// Seq barriers held now.
    pub barriers_active: usize,
    /// Log bytes in use.
    pub log_used_bytes: u64,
    /// Size of the log region.
    pub log_bytes: u64,
    /// The pending-op trigger in force ([`CommitPolicy::trigger_ops`]).
    pub trigger_ops: u64,
    /// Dirty node bytes per op (measured, see
    /// [`next_dirty_bytes_per_op`]; 0: not measured yet).
    pub dirty_bytes_per_op: u64,
    /// Time since the last commit started (or since the committer started).
    pub since_last_start: Duration,
    /// An add asked the committer to look now (it saw a trigger).
    pub kicked: bool,
}

impl CommitPolicy {
    /// Whether a commit starts now, and why. A kick starts one only if
    /// something is to be committed; the interval likewise.
    pub fn decide(&self, input: &PolicyInput) -> Option<Reason> {
        let log = self.log_full(input.log_used_bytes, input.log_bytes);
        let due = commit_due(input);
        if input.kicked {
            return if log {
                Some(Reason::Log)
            } else if self.dirty_full(input.pending_ops, input.dirty_bytes_per_op) {
                Some(Reason::Dirty)
            } else {
                due.then_some(Reason::Pending)
            };
        }
        if self.interval_due(input.since_last_start) && (due || log) {
            return Some(Reason::Interval);
        }
        None
    }

    /// How long the committer may sleep from a snapshot taken
    /// `since_last_start` after the last commit start: until the interval
    /// is due.
    pub fn sleep_for(&self, since_last_start: Duration) -> Duration {
        wake_after(self.interval()).saturating_sub(since_last_start)
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.max(1))
    }

    fn interval_due(&self, since_last_start: Duration) -> bool {
        since_last_start >= wake_after(self.interval())
    }

    /// The log has reached its fill trigger.
    pub fn log_full(&self, log_used_bytes: u64, log_bytes: u64) -> bool {
        let pct = u128::from(self.log_used_pct_trigger);
        u128::from(log_used_bytes) * 100 >= u128::from(log_bytes) * pct
    }

    /// `pending_ops` are estimated to dirty the dirty-bytes trigger, at
    /// `dirty_bytes_per_op` (0: not measured yet).
    pub fn dirty_full(&self, pending_ops: u64, dirty_bytes_per_op: u64) -> bool {
        self.dirty_bytes_trigger > 0 && pending_ops >= self.dirty_trigger_ops(dirty_bytes_per_op)
    }

    /// The pending ops estimated to dirty the dirty-bytes trigger
    /// (`u64::MAX` without one), never below [`DIRTY_TRIGGER_OPS_MIN`].
    pub fn dirty_trigger_ops(&self, dirty_bytes_per_op: u64) -> u64 {
        if self.dirty_bytes_trigger == 0 {
            return u64::MAX;
        }
        let per_op = match dirty_bytes_per_op {
            0 => DIRTY_BYTES_PER_OP_UNMEASURED,
            b => b,
        };
        (self.dirty_bytes_trigger / per_op).max(DIRTY_TRIGGER_OPS_MIN)
    }

    /// The pending-op trigger for a measured commit cost per op
    /// (picoseconds; 0: not measured yet) and measured dirty node bytes
    /// per op (0: not measured yet): the fewest of the configured trigger,
    /// the ops of a `commit_target_ms` commit (never below
    /// [`TRIGGER_OPS_MIN`]) and the ops estimated to dirty
    /// `dirty_bytes_trigger` (never below [`DIRTY_TRIGGER_OPS_MIN`]).
    pub fn trigger_ops(&self, op_cost_ps: u64, dirty_bytes_per_op: u64) -> u64 {
        let ps = match op_cost_ps {
            0 => OP_COST_PS_UNMEASURED,
            ps => ps,
        };
        let by_time = self
            .commit_target_ms
            .saturating_mul(1_000_000_000)
            .checked_div(ps)
            .unwrap_or(u64::MAX);
        by_time
            .min(self.pending_ops_trigger)
            .max(TRIGGER_OPS_MIN.min(self.pending_ops_trigger).max(1))
            .min(self.dirty_trigger_ops(dirty_bytes_per_op))
    }

    /// Whether an add that took the pending ops from `before` to `after`
    /// checks the triggers: when it crossed a multiple of
    /// [`POLICY_CHECK_OPS`] (or of `trigger` when smaller).
    pub fn check_now(before: u64, after: u64, trigger: u64) -> bool {
        let every = POLICY_CHECK_OPS.min(trigger).max(1);
        after / every != before / every
    }

    /// Pacing: how long an add that took the pending ops from `before` to
    /// `after` sleeps while a commit runs, at a measured commit cost of
    /// `op_cost_ps` per op (0: not measured yet). Zero at or below one
    /// and a half times the trigger (a commit that runs while the next
    /// one fills usually ends before the wall at twice the trigger:
    /// pacing from the trigger itself cost 10% of the ops/s of a closed
    /// loop whose stalls it removed); above it, the estimated commit time
    /// of the ops the add is accounted for (those since the previous
    /// check, [`CommitPolicy::check_now`]) times `PACE_GAIN × (after −
    /// 1.5 × trigger) / (trigger / 2)`, at most [`PACE_SLEEP_MAX`].
    pub fn pace(before: u64, after: u64, trigger: u64, op_cost_ps: u64) -> Duration {
        let trigger = trigger.max(2);
        let half = trigger / 2;
        let from = trigger.saturating_add(half);
        if after <= from {
            return Duration::ZERO;
        }
        let every = POLICY_CHECK_OPS.min(trigger);
        let ops = (after / every - before / every) * every;
        let over = (after - from).min(half);
        let ps = match op_cost_ps {
            0 => OP_COST_PS_UNMEASURED,
            ps => ps,
        };
        let ns = u128::from(ops) * u128::from(ps) * u128::from(PACE_GAIN) * u128::from(over)
            / (u128::from(half) * 1000);
        Duration::from_nanos(ns.min(PACE_SLEEP_MAX.as_nanos()) as u64)
    }

    /// Back-pressure: the pending ops reached twice the trigger (the
    /// memory bound), so the adding thread waits for, or runs, a commit.
    pub fn throttles(pending: u64, trigger: u64) -> bool {
        pending >= trigger.saturating_mul(2)
    }
}

/// Something a commit would change: pending ops, or held heads whose
/// barriers are all gone (while one is held, committing them again would
/// only rewrite the same held set).
pub fn commit_due(input: &PolicyInput) -> bool {
    input.pending_ops > 0 || (input.heads_held > 0 && input.barriers_active == 0)
}

/// The dirty-bytes-per-op estimate after a commit of `ops` frozen ops
/// that left `dirty_bytes` of dirty nodes to write, from the estimate
/// `old` (0: none yet), under `trigger` ([`CommitPolicy::dirty_bytes_trigger`]):
/// the latest commit's own ratio (rounded up), so that a workload that
/// starts spreading its ops over more leaves takes the trigger down at the
/// next commit. A commit that pinned more than the trigger counts
/// `dirty_bytes / trigger` times its ratio, so the next one has
/// `(trigger / dirty_bytes)²` as many ops: dirty bytes grow less than
/// linearly with ops (ops share leaves, most of all when nearly every leaf
/// is touched), and scaling the ops linearly took eight commits to get
/// below twice the trigger after such a change, against three now (the
/// test `dirty_bytes_trigger_bounds_a_commits_dirty_nodes`). Commits of
/// fewer than [`DIRTY_ESTIMATE_OPS_MIN`] ops keep `old`.
pub fn next_dirty_bytes_per_op(old: u64, ops: u64, dirty_bytes: u64, trigger: u64) -> u64 {
    if ops < DIRTY_ESTIMATE_OPS_MIN {
        return old;
    }
    let per_op = dirty_bytes.div_ceil(ops).max(1);
    if trigger == 0 || dirty_bytes <= trigger {
        return per_op;
    }
    let scaled = u128::from(per_op) * u128::from(dirty_bytes) / u128::from(trigger);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// The time-per-op estimate after a commit of `ops` frozen ops that took
/// `took`, from the estimate `old_ps` (0: none yet). btrfs averages its
/// runtime the same way: (old + new) / 2 with weights 3:1.
pub fn next_op_cost_ps(old_ps: u64, ops: u64, took: Duration) -> u64 {
    if ops < ESTIMATE_OPS_MIN {
        return old_ps;
    }
    let now_ps = (took.as_nanos() as u64).saturating_mul(1000) / ops;
    let ps = if old_ps == 0 {
        now_ps
    } else {
        (3 * old_ps + now_ps) / 4
    };
    ps.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PolicyInput {
        PolicyInput {
            log_bytes: 1 << 20,
            trigger_ops: 1000,
            ..PolicyInput::default()
        }
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
    fn interval_needs_something_to_commit() {
        let p = CommitPolicy::default();
        let mut i = input();
        i.since_last_start = Duration::from_millis(950);
        assert_eq!(p.decide(&i), None, "nothing pending");
        i.pending_ops = 1;
        assert_eq!(p.decide(&i), Some(Reason::Interval));
        i.since_last_start = Duration::from_millis(949);
        assert_eq!(p.decide(&i), None, "not yet");
        assert_eq!(p.sleep_for(i.since_last_start), Duration::from_millis(1));
        // Held heads count once no barrier holds them.
        let mut i = input();
        i.since_last_start = Duration::from_secs(2);
        i.heads_held = 3;
        i.barriers_active = 1;
        assert_eq!(p.decide(&i), None);
        i.barriers_active = 0;
        assert_eq!(p.decide(&i), Some(Reason::Interval));
    }

    #[test]
    fn kicks_say_why() {
        let p = CommitPolicy::default();
        let mut i = input();
        i.kicked = true;
        assert_eq!(p.decide(&i), None, "a kick with nothing to commit");
        i.pending_ops = 1000;
        assert_eq!(p.decide(&i), Some(Reason::Pending));
        i.log_used_bytes = 1 << 19;
        assert_eq!(p.decide(&i), Some(Reason::Log));
    }

    #[test]
    fn trigger_follows_measured_commit_time() {
        let p = CommitPolicy {
            pending_ops_trigger: 10_000_000,
            commit_target_ms: 1000,
            dirty_bytes_trigger: 0,
            ..CommitPolicy::default()
        };
        // Before any measurement, 2 µs per op is assumed: a 1 s commit is
        // half a million ops.
        assert_eq!(p.trigger_ops(0, 0), 500_000);
        // The first measurement replaces the assumption: 4 µs per op.
        let four = next_op_cost_ps(0, ESTIMATE_OPS_MIN, ns(ESTIMATE_OPS_MIN * 4000));
        assert_eq!(p.trigger_ops(four, 0), 250_000);
        // Small commits do not move the estimate.
        assert_eq!(next_op_cost_ps(four, 10, Duration::from_secs(1)), four);
        // 8 µs per op, averaged 3:1 with the old 4 µs: 5 µs.
        let five = next_op_cost_ps(four, ESTIMATE_OPS_MIN, ns(ESTIMATE_OPS_MIN * 8000));
        assert_eq!(five, 5_000_000);
        assert_eq!(p.trigger_ops(five, 0), 200_000);
        // Never below the floor.
        let slow = next_op_cost_ps(five, ESTIMATE_OPS_MIN, Duration::from_secs(100));
        assert!(p.trigger_ops(slow, 0) >= TRIGGER_OPS_MIN);
    }

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    #[test]
    fn dirty_bytes_trigger_follows_measured_dirty_bytes_per_op() {
        let p = CommitPolicy {
            pending_ops_trigger: 10_000_000,
            dirty_bytes_trigger: 64 << 20,
            ..CommitPolicy::default()
        };
        // Unmeasured: one node per op, 64 MiB / 20 KiB.
        assert_eq!(p.dirty_trigger_ops(0), 3276);
        assert_eq!(p.trigger_ops(0, 0), 3276, "below the time trigger's floor");
        // A commit of 100k ops that dirtied 48 MiB: 504 bytes per op.
        let t = p.dirty_bytes_trigger;
        let per_op = next_dirty_bytes_per_op(0, 100_000, 48 << 20, t);
        assert_eq!(per_op, 504);
        assert_eq!(p.trigger_ops(0, per_op), 133_152);
        // 128 MiB, twice the trigger, in 100k ops: 1343 bytes per op
        // counted twice, a quarter of the ops next time.
        let over = next_dirty_bytes_per_op(per_op, 100_000, 128 << 20, t);
        assert_eq!(over, 2 * 1343);
        assert_eq!(p.trigger_ops(0, over), 24_984);
        // Ops sharing few leaves: the time trigger is the fewer again.
        let shared = next_dirty_bytes_per_op(over, 1_000_000, 4 << 20, t);
        assert_eq!(shared, 5);
        assert_eq!(p.trigger_ops(0, shared), 500_000);
        // Small commits keep the estimate.
        assert_eq!(next_dirty_bytes_per_op(shared, 63, 1 << 30, t), shared);
        // Without a trigger, no scaling.
        assert_eq!(next_dirty_bytes_per_op(0, 100, 1 << 30, 0), 10_737_419);
        // Never below the floor, even at a whole path per op.
        assert_eq!(p.trigger_ops(0, 4 << 20), DIRTY_TRIGGER_OPS_MIN);
        // 0 disables it.
        let off = CommitPolicy {
            dirty_bytes_trigger: 0,
            ..p
        };
        assert_eq!(off.trigger_ops(0, 1 << 20), 500_000);
        assert!(!off.dirty_full(u64::MAX, 1 << 20));
    }

    #[test]
    fn kicks_name_the_dirty_trigger() {
        let p = CommitPolicy {
            dirty_bytes_trigger: 1 << 20,
            ..CommitPolicy::default()
        };
        let mut i = input();
        i.kicked = true;
        i.dirty_bytes_per_op = 512;
        i.pending_ops = 2047;
        assert_eq!(p.decide(&i), Some(Reason::Pending), "below 1 MiB");
        i.pending_ops = 2048;
        assert_eq!(p.decide(&i), Some(Reason::Dirty));
        i.log_used_bytes = 1 << 19;
        assert_eq!(p.decide(&i), Some(Reason::Log), "log space first");
        // The interval does not care which trigger is near.
        let mut i = input();
        i.pending_ops = 1 << 20;
        i.dirty_bytes_per_op = 512;
        i.since_last_start = Duration::from_secs(1);
        assert_eq!(p.decide(&i), Some(Reason::Interval));
    }

    #[test]
    fn pacing_grows_with_the_pending_ops_past_the_trigger() {
        let t = 1 << 20;
        let ps = 1_000_000; // 1 µs per op
        let from = t + t / 2;
        // At or below 1.5 × the trigger, none; a check with no multiple
        // crossed accounts no ops.
        assert_eq!(CommitPolicy::pace(t - 1024, t, t, ps), Duration::ZERO);
        assert_eq!(CommitPolicy::pace(from - 1024, from, t, ps), Duration::ZERO);
        assert_eq!(
            CommitPolicy::pace(from + 1, from + 2, t, ps),
            Duration::ZERO
        );
        // 1024 ops at 1 µs, a sixteenth of the way to the wall: their
        // commit time, 1.024 ms.
        let at = from + t / 2 / PACE_GAIN;
        assert_eq!(
            CommitPolicy::pace(at - 1024, at, t, ps),
            Duration::from_micros(1024)
        );
        // Twice as far past: twice as long; twice the ops: twice again.
        let at2 = from + 2 * (t / 2) / PACE_GAIN;
        assert_eq!(
            CommitPolicy::pace(at2 - 1024, at2, t, ps),
            Duration::from_micros(2048)
        );
        assert_eq!(
            CommitPolicy::pace(at2 - 2048, at2, t, ps),
            Duration::from_micros(4096)
        );
        // Never more than the cap; unmeasured cost counts as 2 µs.
        assert_eq!(
            CommitPolicy::pace(2 * t - 65536, 2 * t, t, ps),
            PACE_SLEEP_MAX
        );
        assert_eq!(
            CommitPolicy::pace(at - 1024, at, t, 0),
            Duration::from_micros(2048)
        );
        // Monotonic in the pending ops.
        let mut last = Duration::ZERO;
        for k in 0..=64u64 {
            let after = t + k * t / 64;
            let d = CommitPolicy::pace(after - 1024, after, t, ps);
            assert!(d >= last, "{k}");
            last = d;
        }
        // Small triggers: checked at their multiples, no overflow.
        assert!(CommitPolicy::pace(6, 13, 7, u64::MAX) <= PACE_SLEEP_MAX);
        assert!(CommitPolicy::pace(0, 3, 1, u64::MAX) <= PACE_SLEEP_MAX);
        assert_eq!(
            CommitPolicy::pace(0, u64::MAX, u64::MAX, ps),
            Duration::ZERO
        );
    }

    #[test]
    fn back_pressure_at_twice_the_trigger() {
        assert!(!CommitPolicy::throttles(1999, 1000));
        assert!(CommitPolicy::throttles(2000, 1000));
        assert!(CommitPolicy::check_now(2047, 2048, 1 << 20));
        assert!(!CommitPolicy::check_now(2046, 2047, 1 << 20));
        assert!(
            CommitPolicy::check_now(1000, 5000, 1 << 20),
            "a batch that crosses a multiple"
        );
        assert!(
            CommitPolicy::check_now(6, 7, 7),
            "small triggers are checked at their multiples"
        );
    }
}
