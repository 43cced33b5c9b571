//! The reschedule tick (`refd_core::priority::ReschedTick`), in its own
//! test binary: its real-time threads wake every CPU each millisecond,
//! which would perturb the timing-sensitive tests of the library run
//! beside it.

#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use refd_core::priority::ReschedTick;

/// The tests count this process's tick threads: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The CPUs of `tid`'s affinity mask (0: the calling thread).
fn affinity(tid: i32) -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes thread `tid`'s mask (a thread of this
    // process, or the caller) into `set`, valid for the size given.
    let r =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below the set's capacity.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// This process's threads whose name starts with `prefix`.
fn threads_named(prefix: &str) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            comm.trim()
                .starts_with(prefix)
                .then(|| (tid, comm.trim().to_string()))
        })
        .collect()
}

/// One thread per allowed CPU, each pinned to its CPU, at SCHED_FIFO when
/// the kernel allows it, waking about once a period; drop stops and joins
/// them all.
#[test]
fn a_resched_tick_ticks_on_every_cpu_and_stops() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(ReschedTick::start(Duration::from_micros(50), 1, None).is_err());
    let cpus = affinity(0);
    let started = Instant::now();
    let tick = ReschedTick::start(Duration::from_millis(1), 1, None).unwrap();
    assert_eq!(tick.cpus(), &cpus[..]);
    std::thread::sleep(Duration::from_millis(300));
    let ticks = tick.ticks();
    let elapsed = started.elapsed();
    // About 300 per CPU; a loaded machine delays some. Never more than
    // one per period per CPU (plus the one in progress) in the time that
    // really passed: on a loaded machine this thread may wake well after
    // its 300 ms.
    let most = (elapsed.as_millis() as u64 + 1) * cpus.len() as u64;
    assert!(
        ticks >= 50 * cpus.len() as u64 && ticks <= most,
        "{ticks} ticks on {} CPUs in {elapsed:?} (at most {most})",
        cpus.len()
    );
    let threads = threads_named("refd-tick-");
    assert_eq!(threads.len(), cpus.len(), "{threads:?}");
    for (tid, name) in &threads {
        let cpu: usize = name["refd-tick-".len()..].parse().unwrap();
        assert_eq!(affinity(*tid), vec![cpu], "{name}");
        // SAFETY: a plain query of thread `tid`'s policy.
        let policy = unsafe { libc::sched_getscheduler(*tid) };
        let expect = if tick.is_real_time() {
            libc::SCHED_FIFO
        } else {
            libc::SCHED_OTHER
        };
        assert_eq!(policy, expect, "{name}");
    }
    drop(tick);
    assert!(threads_named("refd-tick-").is_empty());
}

/// Started with a linger, the tick stops counting once its linger has passed
/// without a poke, and ticks again within one idle period of a poke.
#[test]
fn an_on_demand_tick_ticks_only_while_poked() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cpus = affinity(0).len() as u64;
    let tick = ReschedTick::start(
        Duration::from_millis(1),
        1,
        Some(Duration::from_millis(100)),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let a = tick.ticks();
    assert!(a >= 20 * cpus, "ticks during the first linger: {a}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tick.ticks(), a, "no tick 200 ms past the linger");
    let poker = tick.poker();
    for _ in 0..40 {
        poker.poke();
        std::thread::sleep(Duration::from_millis(10));
    }
    let busy = tick.ticks() - a;
    // ~300 ms of the 400 ms poked (the first idle period may pass first).
    assert!(busy >= 50 * cpus, "{busy} ticks while poked on {cpus} CPUs");
    drop(tick);
}
