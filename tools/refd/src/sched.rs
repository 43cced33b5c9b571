//! Scheduling of the daemon's latency-bound threads.
//!
//! On a machine whose cores are all busy (the committer, its run workers
//! and the compactor are CPU-bound), a thread woken by a socket or by a
//! durable log write can wait for a CPU until the running thread's time
//! slice ends (1.4 ms on a 2-core machine with Linux's default). Since
//! Linux 6.12 (EEVDF custom slices), a SCHED_OTHER thread may ask for a
//! shorter slice with `sched_setattr(2)`'s `sched_runtime`; a thread with
//! a shorter slice gets an earlier deadline and preempts on wake-up,
//! without taking more than its fair share of CPU. The daemon asks for
//! it on the threads that wake to answer requests (each connection's
//! reader and writer); older kernels accept and ignore the field. The
//! call lives in `refd_core::priority` beside the commit's real-time
//! priority ceiling, which restores a thread's slice after a boost.
//!
//! # Readers at the priority ceiling ([`ReadBoost`])
//!
//! A short slice is not enough for a LOOKUP: measured on 2 cores at
//! 1.0–1.3M ops/s, a LOOKUP's reader still waited 0.17–0.31 ms (p99) to
//! run once its request arrived, and one that lost its core to the
//! commit's apply (which runs at `SCHED_FIFO`) while it read waited for
//! the rest of the apply (up to 66 ms; `docs/benchmarks.md`, "LOOKUP
//! while ingesting"; the apply now gives its core back every
//! `refd_core::engine::BOOST_SLICE`). So a connection's reader serves a short LOOKUP (at most
//! [`LOOKUP_RT_BYTENRS_MAX`] bytenrs) at the apply's real-time priority,
//! and keeps it while it waits for the connection's next request, so that
//! the next one wakes it at once. Any other request (a SUBMIT, which
//! ingests and may lead a log write; a long LOOKUP) gives the thread its
//! own attributes back first. Work at real-time priority is bounded
//! twice: each boosted request is short, and the CPU time all readers
//! spend boosted is charged to one budget ([`RtBudget`],
//! `--lookup-rt-ms-per-s`), so a client that floods LOOKUPs gets them
//! served at the normal priority once the budget is spent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use refd_core::priority::request_slice;
use refd_core::priority::Boost;

/// Most bytenrs of a LOOKUP served at real-time priority (a bytenr is
/// tens of microseconds at most: a tree read and a pending read); a
/// longer one is served at the thread's own priority.
pub const LOOKUP_RT_BYTENRS_MAX: usize = 64;

/// The budget's bucket holds at most this share of a second's budget:
/// readers may spend a burst of a tenth of it at once.
const BURST_PER_SECOND: u32 = 10;

/// The real-time CPU time left to the daemon's readers, refilled at a
/// fixed rate (a token bucket), shared by every connection.
#[derive(Debug)]
pub struct RtBudget {
    /// Refill per second; zero turns boosting off.
    per_second: Duration,
    /// When the budget was made: the clock's zero.
    epoch: Instant,
    bucket: Mutex<Bucket>,
}

/// The bucket at a point of time (nanoseconds since the budget's epoch):
/// a pure function of the calls made on it, so tests drive its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    /// Nanoseconds of CPU time left; below zero after an overrun.
    left_ns: i64,
    /// When it was last refilled.
    at_ns: u64,
}

impl Bucket {
    fn full(per_second: Duration) -> Bucket {
        Bucket {
            left_ns: cap_ns(per_second),
            at_ns: 0,
        }
    }

    /// Refilled to `now_ns` at `per_second`, up to the cap.
    fn refill(&mut self, now_ns: u64, per_second: Duration) {
        let elapsed_ns = now_ns.saturating_sub(self.at_ns);
        let per_second_ns = per_second.as_nanos().min(i64::MAX as u128) as u64;
        let add = (u128::from(elapsed_ns) * u128::from(per_second_ns) / 1_000_000_000)
            .min(i64::MAX as u128) as i64;
        self.left_ns = self.left_ns.saturating_add(add).min(cap_ns(per_second));
        self.at_ns = self.at_ns.max(now_ns);
    }
}

fn cap_ns(per_second: Duration) -> i64 {
    (per_second.as_nanos() / u128::from(BURST_PER_SECOND)).min(i64::MAX as u128) as i64
}

impl RtBudget {
    /// A budget of `per_second` of CPU time per second (zero: readers are
    /// never boosted).
    pub fn new(per_second: Duration) -> RtBudget {
        RtBudget {
            per_second,
            epoch: Instant::now(),
            bucket: Mutex::new(Bucket::full(per_second)),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether some of the budget is left now.
    fn allows(&self) -> bool {
        if self.per_second.is_zero() {
            return false;
        }
        let now = self.now_ns();
        let mut b = self.lock();
        b.refill(now, self.per_second);
        b.left_ns > 0
    }

    /// Takes `used` from the budget; whether some is left after it.
    fn charge(&self, used: Duration) -> bool {
        let now = self.now_ns();
        let mut b = self.lock();
        b.refill(now, self.per_second);
        let used_ns = used.as_nanos().min(i64::MAX as u128) as i64;
        b.left_ns = b.left_ns.saturating_sub(used_ns);
        b.left_ns > 0
    }
}

/// How [`ReadBoost::before`] serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPriority {
    /// Not a short read: at the thread's own attributes.
    NotShort,
    /// A short read at the real-time priority.
    Boosted,
    /// A short read at the normal priority: the readers' budget is spent
    /// (`refd_lookup_rt_budget_spent_total`).
    BudgetSpent,
    /// A short read at the normal priority: boosting is off (no apply
    /// priority, no budget, or refused by the kernel).
    Off,
}

/// A kernel refusal turns boosting off for the process (logged once).
static REFUSED: AtomicBool = AtomicBool::new(false);

/// One request thread's boost for short reads (see the module docs): at
/// `priority` while it serves a short LOOKUP and waits for the next
/// request, at its own attributes otherwise. Dropped, the thread gets its
/// attributes back.
#[derive(Debug)]
pub struct ReadBoost<'a> {
    budget: &'a RtBudget,
    /// `SCHED_FIFO` priority (0: never boosted).
    priority: u8,
    boost: Option<Boost>,
    /// The thread's CPU time when the boost was last charged.
    charged_at: Duration,
}

impl<'a> ReadBoost<'a> {
    /// The calling thread's boost at `priority` (the commit's apply
    /// priority: one ceiling for the tree's lock), charged to `budget`.
    pub fn new(budget: &'a RtBudget, priority: u8) -> ReadBoost<'a> {
        ReadBoost {
            budget,
            priority,
            boost: None,
            charged_at: Duration::ZERO,
        }
    }

    /// Whether the thread is boosted now.
    pub fn is_boosted(&self) -> bool {
        self.boost.is_some()
    }

    /// Before serving a request: boosted when it is a short read
    /// (`short_read`) and the budget allows it, at the thread's own
    /// attributes otherwise. Says which, for a short read.
    pub fn before(&mut self, short_read: bool) -> ReadPriority {
        if !short_read {
            self.end();
            return ReadPriority::NotShort;
        }
        if self.boost.is_some() {
            self.account();
            return if self.boost.is_some() {
                ReadPriority::Boosted
            } else {
                ReadPriority::BudgetSpent
            };
        }
        if self.priority == 0 || REFUSED.load(Ordering::Relaxed) {
            return ReadPriority::Off;
        }
        if !self.budget.allows() {
            return ReadPriority::BudgetSpent;
        }
        match Boost::to(self.priority) {
            Ok(b) => {
                self.charged_at = thread_cpu_time();
                self.boost = Some(b);
                ReadPriority::Boosted
            }
            Err(e) => {
                if !REFUSED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        priority = self.priority,
                        "cannot serve LOOKUPs at a real-time priority; serving them at the normal one"
                    );
                }
                ReadPriority::Off
            }
        }
    }

    /// Charges the CPU time spent boosted since the last charge; ends the
    /// boost when the budget is spent.
    pub fn account(&mut self) {
        if self.boost.is_none() {
            return;
        }
        let now = thread_cpu_time();
        let used = now.saturating_sub(self.charged_at);
        self.charged_at = now;
        if !self.budget.charge(used) {
            self.boost = None;
        }
    }

    /// Back to the thread's own attributes (the time boosted charged).
    pub fn end(&mut self) {
        if self.boost.is_some() {
            let used = thread_cpu_time().saturating_sub(self.charged_at);
            self.budget.charge(used);
            self.boost = None;
        }
    }
}

impl Drop for ReadBoost<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`; zero
/// where it cannot be read, which leaves the budget uncharged). Also
/// `refd-bench ingest`'s measure of its own threads' CPU.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` for the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy.
    fn policy() -> u32 {
        // SAFETY: a plain query of the calling thread's policy (pid 0).
        let policy = unsafe { libc::sched_getscheduler(0) };
        u32::try_from(policy).expect("sched_getscheduler")
    }

    #[test]
    fn the_bucket_refills_at_its_rate_up_to_its_cap() {
        let rate = Duration::from_millis(100);
        let mut b = Bucket::full(rate);
        assert_eq!(b.left_ns, 10_000_000, "a tenth of a second's budget");
        b.left_ns -= 25_000_000;
        b.refill(100_000_000, rate); // 0.1 s: +10 ms
        assert_eq!(b.left_ns, -5_000_000);
        b.refill(150_000_000, rate); // +5 ms
        assert_eq!(b.left_ns, 0);
        b.refill(10_000_000_000, rate);
        assert_eq!(b.left_ns, 10_000_000, "capped");
        b.refill(5, rate);
        assert_eq!(b.at_ns, 10_000_000_000, "the clock does not go back");
    }

    #[test]
    fn a_spent_budget_refuses_and_a_zero_one_never_allows() {
        let b = RtBudget::new(Duration::from_millis(100));
        assert!(b.allows());
        assert!(!b.charge(Duration::from_millis(50)));
        assert!(!b.allows(), "50 ms overrun: refills in ~0.5 s");
        assert!(!RtBudget::new(Duration::ZERO).allows());
    }

    /// A short read boosts the thread (where the kernel allows it); any
    /// other request, a spent budget and the drop give the thread back its
    /// own attributes.
    #[test]
    fn a_read_boost_is_given_back() {
        std::thread::spawn(|| {
            request_slice(Duration::from_micros(300)).expect("slice");
            let own = policy();
            let budget = RtBudget::new(Duration::from_secs(1));
            let mut rb = ReadBoost::new(&budget, 1);
            if rb.before(true) != ReadPriority::Boosted {
                eprintln!("no real-time priority here: the give-back is not exercised");
                return;
            }
            assert_eq!(policy(), libc::SCHED_FIFO as u32);
            rb.before(true);
            assert!(rb.is_boosted(), "kept for the next short read");
            rb.before(false);
            assert!(!rb.is_boosted());
            assert_eq!(
                policy(),
                own,
                "a SUBMIT is served at the thread's own policy"
            );
            rb.before(true);
            assert_eq!(policy(), libc::SCHED_FIFO as u32);
            drop(rb);
            assert_eq!(policy(), own, "dropped: given back");

            // A budget spent by the boosted work ends the boost.
            let small = RtBudget::new(Duration::from_micros(1000));
            let mut rb = ReadBoost::new(&small, 1);
            rb.before(true);
            assert!(rb.is_boosted());
            let t0 = thread_cpu_time();
            while thread_cpu_time() - t0 < Duration::from_micros(500) {
                std::hint::spin_loop();
            }
            rb.account();
            assert!(!rb.is_boosted(), "spent: 500 us of a 100 us bucket");
            assert_eq!(policy(), own);
            assert_eq!(rb.before(true), ReadPriority::BudgetSpent);
            assert!(!rb.is_boosted(), "not before it refills");
        })
        .join()
        .expect("thread");
    }
}
