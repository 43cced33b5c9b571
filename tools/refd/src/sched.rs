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
//! reader and writer); older kernels accept and ignore the field.

use std::time::Duration;

/// `struct sched_attr` of `sched_setattr(2)` (`SCHED_ATTR_SIZE_VER1`).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
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
    // SAFETY: getpriority reads the calling thread's nice value (who = 0
    // is the caller); errno is cleared first because -1 is a valid value.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime,
        deadline: 0,
        period: 0,
        util_min: 0,
        util_max: 0,
    };
    // SAFETY: `attr` is a valid, initialised `struct sched_attr` of the
    // size it declares, alive for the call; pid 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice is set on the calling thread and can be reset; read back
    /// with sched_getattr.
    #[test]
    fn a_slice_is_set_and_reset() {
        fn runtime() -> u64 {
            let mut attr = std::mem::MaybeUninit::<SchedAttr>::zeroed();
            // SAFETY: the kernel writes at most `size` bytes of a
            // `struct sched_attr` into the zeroed buffer.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_sched_getattr,
                    0,
                    attr.as_mut_ptr(),
                    std::mem::size_of::<SchedAttr>() as u32,
                    0u32,
                )
            };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            // SAFETY: zeroed then filled by the kernel: every field is an
            // integer, any bit pattern is valid.
            unsafe { attr.assume_init() }.runtime
        }
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
