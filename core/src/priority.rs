//! A priority ceiling for the extent tree's write lock.
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
//! (`sched_rt_runtime_us`) still leaves other threads a share.

use std::sync::atomic::{AtomicU8, Ordering};

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

/// The calling thread at a real-time priority until dropped (then back
/// to the normal policy; its nice value is kept).
#[derive(Debug)]
pub(crate) struct Boost(());

impl Boost {
    /// The calling thread at `SCHED_FIFO` priority `priority`.
    pub(crate) fn to(priority: u8) -> std::io::Result<Boost> {
        set_policy(true, priority)?;
        Ok(Boost(()))
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
        // Back to the policy every thread of ours starts with; failing to
        // lower a priority is not expected, and nothing better could be
        // done about it here.
        let _ = set_policy(false, 0);
    }
}

#[cfg(target_os = "linux")]
fn set_policy(fifo: bool, priority: u8) -> std::io::Result<()> {
    let (policy, priority) = if fifo {
        (libc::SCHED_FIFO, i32::from(priority.min(99)))
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid, initialised
    // sched_param that outlives the call, which only reads it.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_policy(fifo: bool, _priority: u8) -> std::io::Result<()> {
    if fifo {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    } else {
        Ok(())
    }
}

#[cfg(test)]
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
            #[cfg(target_os = "linux")]
            // SAFETY: reads the calling thread's policy.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
            set_apply_rt_priority(0).unwrap();
            assert_eq!(apply_rt_priority(), 0);
        })
        .join()
        .unwrap();
    }
}
