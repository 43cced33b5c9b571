//! Scheduling of latency-bound threads: a priority ceiling for the extent
//! tree's write lock, and short time slices.
//!
//! A commit applies its effects in steps under the tree's write lock
//! ([`crate::engine`], "Applying in steps"). On busy cores the applying
//! thread can be preempted while it holds the lock, and every lookup then
//! waits until the scheduler gives it a core back (milliseconds: measured
//! 0.5–28 ms holds of a ~30 µs step with the daemon at ~1.4M ops/s on 2
//! cores). Run at a real-time priority (`SCHED_FIFO`), the applying thread
//! is not preempted by ordinary threads, so a step holds the lock for its
//! own work only. Off unless the process asks for it
//! ([`set_apply_rt_priority`]): it needs `CAP_SYS_NICE` (or an
//! `RLIMIT_RTPRIO`), and the kernel's real-time throttling
//! (`sched_rt_runtime_us`) still leaves other threads a share. The thread
//! gets back exactly the scheduling attributes it had (policy, nice, time
//! slice): a daemon's request thread that runs a client's COMMIT keeps its
//! short slice.
//!
//! The same ceiling serves a daemon's request thread while it answers a
//! short read (a LOOKUP): [`Boost`] is public so that such a thread takes
//! it around bounded work and gives it back; the daemon bounds how much
//! CPU time its threads spend boosted (`tools/refd/src/sched.rs`).
//!
//! [`request_slice`]: since Linux 6.12 (EEVDF custom slices), a
//! SCHED_OTHER thread may ask for a shorter time slice with
//! `sched_setattr(2)`'s `sched_runtime`; a thread with a shorter slice gets
//! an earlier deadline and preempts on wake-up, without taking more than
//! its fair share of CPU. Older kernels accept and ignore the field.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// The `SCHED_FIFO` priority of a commit's stepped apply; 0: none.
static APPLY_RT_PRIORITY: AtomicU8 = AtomicU8::new(0);

/// Run commits' stepped applies at `SCHED_FIFO` priority `priority`
/// (1..=99; 0 turns it off). Checked here, on the calling thread (set and
/// set back): the error is the kernel's when the process may not use it
/// (`EPERM` without `CAP_SYS_NICE`), and the setting is then left off.
pub fn set_apply_rt_priority(priority: u8) -> std::io::Result<()> {
    if priority > 0 {
        let boost = Boost::to(priority)?;
        drop(boost);
    }
    APPLY_RT_PRIORITY.store(priority, Ordering::Relaxed);
    Ok(())
}

/// The configured priority of a stepped apply (0: none).
pub fn apply_rt_priority() -> u8 {
    APPLY_RT_PRIORITY.load(Ordering::Relaxed)
}

/// Shortest and longest slice Linux accepts (`sched_runtime` is clamped
/// to this range by the kernel, 0.1–100 ms).
const SLICE_MIN: Duration = Duration::from_micros(100);
const SLICE_MAX: Duration = Duration::from_millis(100);

/// Asks for a time slice of `slice` for the calling thread, keeping its
/// policy (SCHED_OTHER) and nice value. `Duration::ZERO` returns to the
/// kernel's default slice.
pub fn request_slice(slice: Duration) -> std::io::Result<()> {
    let runtime = if slice.is_zero() {
        0
    } else {
        slice.clamp(SLICE_MIN, SLICE_MAX).as_nanos() as u64
    };
    let mut attr = sys::get()?;
    attr.policy = sys::SCHED_OTHER;
    attr.priority = 0;
    attr.flags = 0;
    attr.runtime = runtime;
    sys::set(&attr)
}

/// The calling thread at a real-time priority until dropped, then back to
/// the scheduling attributes it had (policy, nice value, slice). Not
/// `Send`: it must be dropped by the thread it boosted.
#[derive(Debug)]
pub struct Boost(sys::SchedAttr, std::marker::PhantomData<*const ()>);

impl Boost {
    /// The calling thread at `SCHED_FIFO` priority `priority` (clamped to
    /// 1..=99); the kernel's error when it refuses (`EPERM` without
    /// `CAP_SYS_NICE` or an `RLIMIT_RTPRIO`).
    pub fn to(priority: u8) -> std::io::Result<Boost> {
        let before = sys::get()?;
        let fifo = sys::SchedAttr {
            policy: sys::SCHED_FIFO,
            priority: u32::from(priority.clamp(1, 99)),
            flags: 0,
            runtime: 0,
            ..before
        };
        sys::set(&fifo)?;
        Ok(Boost(before, std::marker::PhantomData))
    }

    /// [`Boost::to`] the configured apply priority, or `None` when it is
    /// off or refused (a refusal after the check in
    /// [`set_apply_rt_priority`] only costs the boost).
    pub(crate) fn for_apply() -> Option<Boost> {
        match apply_rt_priority() {
            0 => None,
            p => Boost::to(p).ok(),
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        // Lowering a priority back is always allowed; nothing better could
        // be done about a failure here.
        let _ = sys::set(&self.0);
    }
}

/// A wake-up on every CPU every `period`, so that a thread woken on a busy
/// CPU waits at most about `period` for it, not for the kernel's next
/// scheduler tick.
///
/// Why: the kernel notices that a running SCHED_OTHER thread's time slice
/// ended only at a scheduler tick (HZ: 250 on this project's machine,
/// every 4 ms) or at a scheduling event on that CPU. A thread woken while
/// the running one is inside its protected slice (EEVDF's run-to-parity)
/// does not preempt it, so it waits for the tick: traced on 2 cores at
/// 1.4M ops/s, the loop device's kernel workers (which complete the log's
/// writes) and the daemon's connection threads waited 1–11 ms behind the
/// commit's run workers, the compactor and kernel threads that ran whole
/// ticks (`docs/benchmarks.md`, "A wake-up every millisecond on each
/// CPU"). Neither a short slice for the woken threads
/// ([`request_slice`]) nor one for the running ones changed that: the
/// waiting is for the tick, not the slice.
///
/// Each CPU the process may run on gets a thread pinned to it that sleeps
/// to absolute deadlines one `period` apart (no drift, and no catch-up
/// burst after a late wake-up) at `SCHED_FIFO` priority `rt_priority`. A
/// real-time wake-up always reschedules the CPU it lands on, so the
/// scheduler then picks the fair thread that should run, which is what
/// HZ=1000 would give.
/// Refused a real-time priority (no `CAP_SYS_NICE` or `RLIMIT_RTPRIO`),
/// or with `rt_priority` 0, the threads tick as ordinary threads: a fair
/// wake-up reschedules only when the woken thread should preempt, so that
/// helps less ([`ReschedTick::is_real_time`] says which).
///
/// Each wake-up costs its CPU ~23 µs on this project's VM (measured: an
/// idle daemon's two tick threads, 2.3–2.5% of a CPU each at 1 ms), so a
/// tick started with a linger ticks only while poked
/// ([`TickPoker::poke`], e.g. on every request) and for a while after;
/// otherwise it checks again every [`RESCHED_TICK_IDLE`].
///
/// Stopped and joined on drop (within one period, or one
/// [`RESCHED_TICK_IDLE`] when idle).
#[derive(Debug)]
pub struct ReschedTick {
    /// Ticks while the monotonic clock (ns) is below it.
    active_until: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    ticks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cpus: Vec<usize>,
    /// How long a poke keeps it ticking (zero: always ticks).
    linger: Duration,
    real_time: bool,
}

/// Shortest tick period accepted: below it the ticks' own cost (~23 µs
/// each on this project's VM, on every CPU) is no longer small.
pub const RESCHED_TICK_MIN: Duration = Duration::from_micros(100);

/// How often an on-demand tick that is not poked looks again.
pub const RESCHED_TICK_IDLE: Duration = Duration::from_millis(100);

/// Keeps an on-demand [`ReschedTick`] ticking: cheap to clone and to call
/// on every request (a read of the monotonic clock and a relaxed load; a
/// store at most twice per `linger`).
#[derive(Debug, Clone)]
pub struct TickPoker {
    active_until: std::sync::Arc<std::sync::atomic::AtomicU64>,
    linger_ns: u64,
}

impl TickPoker {
    /// Tick for at least `linger` from now.
    pub fn poke(&self) {
        let now = sys::monotonic_ns();
        if self.active_until.load(Ordering::Relaxed) < now + self.linger_ns / 2 {
            self.active_until
                .store(now + self.linger_ns, Ordering::Relaxed);
        }
    }
}

impl ReschedTick {
    /// Starts a ticking thread on each CPU of the calling thread's
    /// affinity mask, every `period` (at least [`RESCHED_TICK_MIN`]), at
    /// `SCHED_FIFO` priority `rt_priority` if the kernel allows it (0:
    /// ordinary threads). With `linger`, it ticks only for that long after
    /// each [`TickPoker::poke`] of its [`ReschedTick::poker`] (and from the
    /// start); `None`: always. An error when the mask cannot be read, the
    /// period is too short, or a thread cannot be started.
    pub fn start(
        period: Duration,
        rt_priority: u8,
        linger: Option<Duration>,
    ) -> std::io::Result<ReschedTick> {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        if period < RESCHED_TICK_MIN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a tick period of {period:?} is shorter than {RESCHED_TICK_MIN:?}"),
            ));
        }
        let cpus = sys::allowed_cpus()?;
        // Checked here, as set_apply_rt_priority does: refused, the threads
        // tick at the normal priority.
        let real_time = rt_priority > 0 && Boost::to(rt_priority).map(drop).is_ok();
        let until = match linger {
            Some(l) => sys::monotonic_ns().saturating_add(l.as_nanos() as u64),
            None => u64::MAX,
        };
        let mut tick = ReschedTick {
            active_until: Arc::new(AtomicU64::new(until)),
            linger: linger.unwrap_or(Duration::ZERO),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(cpus.len()),
            ticks: Arc::new(AtomicU64::new(0)),
            cpus: cpus.clone(),
            real_time,
        };
        for &cpu in &cpus {
            let stop = Arc::clone(&tick.stop);
            let ticks = Arc::clone(&tick.ticks);
            let active_until = Arc::clone(&tick.active_until);
            let handle = std::thread::Builder::new()
                .name(format!("refd-tick-{cpu}"))
                .spawn(move || {
                    // A CPU that went offline since the mask was read: no
                    // tick for it.
                    if sys::pin_to(cpu).is_err() {
                        return;
                    }
                    let _boost = if real_time {
                        Boost::to(rt_priority).ok()
                    } else {
                        None
                    };
                    let period_ns = period.as_nanos() as u64;
                    let idle_ns = RESCHED_TICK_IDLE.as_nanos() as u64;
                    let mut next = sys::monotonic_ns();
                    while !stop.load(Ordering::Relaxed) {
                        let now = sys::monotonic_ns();
                        if now >= active_until.load(Ordering::Relaxed) {
                            // Not poked lately: look again later, without
                            // counting a tick.
                            sys::sleep_until_ns(now + idle_ns);
                            next = sys::monotonic_ns();
                            continue;
                        }
                        next += period_ns;
                        if next <= now {
                            // Woken late (the CPU was taken): start again
                            // from now, no burst of missed ticks.
                            next = now + period_ns;
                        }
                        sys::sleep_until_ns(next);
                        ticks.fetch_add(1, Ordering::Relaxed);
                    }
                })?;
            tick.threads.push(handle);
        }
        Ok(tick)
    }

    /// Whether the threads tick at a real-time priority.
    pub fn is_real_time(&self) -> bool {
        self.real_time
    }

    /// The CPUs ticked.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// A poker that keeps this tick going for its linger (for a tick
    /// that always ticks, a no-op in effect).
    pub fn poker(&self) -> TickPoker {
        TickPoker {
            active_until: std::sync::Arc::clone(&self.active_until),
            linger_ns: self.linger.as_nanos() as u64,
        }
    }

    /// Wake-ups so far, all CPUs.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }
}

impl Drop for ReschedTick {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    /// `struct sched_attr` of `sched_setattr(2)` (`SCHED_ATTR_SIZE_VER1`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub(crate) struct SchedAttr {
        pub(crate) size: u32,
        pub(crate) policy: u32,
        pub(crate) flags: u64,
        pub(crate) nice: i32,
        pub(crate) priority: u32,
        pub(crate) runtime: u64,
        pub(crate) deadline: u64,
        pub(crate) period: u64,
        pub(crate) util_min: u32,
        pub(crate) util_max: u32,
    }

    pub(crate) const SCHED_OTHER: u32 = libc::SCHED_OTHER as u32;
    pub(crate) const SCHED_FIFO: u32 = libc::SCHED_FIFO as u32;
    const SIZE: u32 = std::mem::size_of::<SchedAttr>() as u32;

    /// The calling thread's scheduling attributes.
    pub(crate) fn get() -> std::io::Result<SchedAttr> {
        let mut attr = SchedAttr::default();
        // SAFETY: pid 0 is the calling thread; the kernel writes at most
        // `SIZE` bytes of a `struct sched_attr` into `attr`, a valid,
        // initialised value of that size whose fields are all integers.
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut SchedAttr,
                SIZE,
                0u32,
            )
        };
        if r == 0 {
            attr.size = SIZE;
            Ok(attr)
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Set the calling thread's scheduling attributes.
    pub(crate) fn set(attr: &SchedAttr) -> std::io::Result<()> {
        let attr = SchedAttr {
            size: SIZE,
            ..*attr
        };
        // SAFETY: `attr` is a valid, initialised `struct sched_attr` of the
        // size it declares, alive for the call; pid 0 is the calling thread.
        let r =
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The CPUs the calling thread may run on.
    pub(crate) fn allowed_cpus() -> std::io::Result<Vec<usize>> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the kernel writes at most
        // the given size into `set`, which is valid for that size.
        let r =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect())
    }

    /// Pins the calling thread to `cpu`.
    pub(crate) fn pin_to(cpu: usize) -> std::io::Result<()> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below the set's capacity (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t
        // of the size given, alive for the call.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    pub(crate) fn monotonic_ns() -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid timespec for the kernel to write.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }

    /// Sleeps until CLOCK_MONOTONIC reaches `deadline_ns` (an absolute
    /// deadline: no drift; interrupted sleeps resume).
    pub(crate) fn sleep_until_ns(deadline_ns: u64) {
        let t = libc::timespec {
            tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
        };
        loop {
            // SAFETY: `t` is a valid timespec alive for the call; no
            // remaining-time output with TIMER_ABSTIME.
            let r = unsafe {
                libc::clock_nanosleep(
                    libc::CLOCK_MONOTONIC,
                    libc::TIMER_ABSTIME,
                    &t,
                    std::ptr::null_mut(),
                )
            };
            if r != libc::EINTR {
                return;
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub(crate) struct SchedAttr {
        pub(crate) policy: u32,
        pub(crate) flags: u64,
        pub(crate) nice: i32,
        pub(crate) priority: u32,
        pub(crate) runtime: u64,
    }
    pub(crate) const SCHED_OTHER: u32 = 0;
    pub(crate) const SCHED_FIFO: u32 = 1;
    fn unsupported() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::Unsupported)
    }
    pub(crate) fn get() -> std::io::Result<SchedAttr> {
        Err(unsupported())
    }
    pub(crate) fn set(_: &SchedAttr) -> std::io::Result<()> {
        Err(unsupported())
    }
    pub(crate) fn allowed_cpus() -> std::io::Result<Vec<usize>> {
        Err(unsupported())
    }
    pub(crate) fn pin_to(_: usize) -> std::io::Result<()> {
        Err(unsupported())
    }
    pub(crate) fn monotonic_ns() -> u64 {
        0
    }
    pub(crate) fn sleep_until_ns(_: u64) {}
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The setting is kept only when the kernel allows it, and the thread
    /// that checked it is back to its normal policy.
    #[test]
    fn apply_priority_is_checked_and_the_thread_restored() {
        std::thread::spawn(|| {
            match set_apply_rt_priority(1) {
                Ok(()) => assert_eq!(apply_rt_priority(), 1),
                Err(e) => {
                    assert_eq!(apply_rt_priority(), 0, "refused: {e}");
                }
            }
            assert_eq!(sys::get().unwrap().policy, sys::SCHED_OTHER);
            set_apply_rt_priority(0).unwrap();
            assert_eq!(apply_rt_priority(), 0);
        })
        .join()
        .unwrap();
    }

    /// A boosted thread gets back its own attributes, its time slice and
    /// nice value included (a daemon's request thread running a client's
    /// COMMIT keeps its short slice).
    #[test]
    fn a_boost_restores_the_slice_and_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: sets the calling thread's nice value (who = 0).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) };
            request_slice(Duration::from_micros(300)).unwrap();
            let before = sys::get().unwrap();
            match Boost::to(1) {
                Ok(b) => {
                    assert_eq!(sys::get().unwrap().policy, sys::SCHED_FIFO);
                    drop(b);
                }
                Err(e) => eprintln!("no real-time priority here ({e}): restore not exercised"),
            }
            assert_eq!(sys::get().unwrap(), before);
        })
        .join()
        .unwrap();
    }

    /// The slice is set on the calling thread and can be reset; read back
    /// with sched_getattr.
    #[test]
    fn a_slice_is_set_and_reset() {
        let runtime = || sys::get().unwrap().runtime;
        // Custom slices are Linux 6.12 and later; before, the field is
        // accepted and not kept.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .trim()
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        let kept = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 12);
        std::thread::spawn(move || {
            request_slice(Duration::from_micros(200)).expect("set");
            if kept {
                assert_eq!(runtime(), 200_000);
            }
            request_slice(Duration::from_nanos(1)).expect("clamped up");
            if kept {
                assert_eq!(runtime(), 100_000);
            }
            request_slice(Duration::ZERO).expect("reset");
            if kept {
                assert_ne!(runtime(), 100_000);
            }
        })
        .join()
        .expect("thread");
    }
}
