//! A reference count and an interlock in one atomic word, after DragonFly
//! HAMMER's `hammer_ref_interlock()` family (seed:
//! `hammer-refcount-interlock.diff`).
//!
//! The low bits count references; three flag bits sit above them:
//! - `LOCKED`: someone holds the interlock (loading or unloading);
//! - `WANTED`: a thread is parked waiting for `LOCKED` to clear or for the
//!   count to reach zero;
//! - `CHECK`: a 0->1 transition happened and the object must be loaded or
//!   validated before use.
//!
//! Transitions, each one compare-and-swap:
//! - [`Interlock::ref_interlock`]: +1. On 0->1 (or when `CHECK` is found
//!   set) the caller gets the interlock and must load/validate the object,
//!   then call [`Interlock::ref_interlock_done`]; racing adders park until
//!   that is done instead of using a half-loaded object. Otherwise +1 only.
//! - [`Interlock::rel_interlock`]: -1. On 1->0 the caller gets the
//!   interlock and must unload/retire, then [`Interlock::rel_interlock_done`].
//! - [`Interlock::rel`]: -1 without taking the interlock; wakes a thread
//!   waiting in [`Interlock::wait_unreferenced`] when the count reaches 0.
//! - [`Interlock::wait_unreferenced`]: park until the count is 0 (used by
//!   the committer to wait for adders still in a frozen shard).
//! - [`Interlock::try_interlock_norefs`]: take the interlock if the count is
//!   0 (retire an idle object).
//!
//! Waiters never spin forever: they set `WANTED` with a CAS and park on a
//! condition variable; whoever clears `LOCKED` or drops the count to 0 with
//! `WANTED` set wakes them. The parking mutex is taken only on those slow
//! paths. Model-checked with loom (`RUSTFLAGS="--cfg loom" cargo test -p
//! refd-sync --release --lib interlock`).

use crate::shim::{AtomicU32, Condvar, Mutex, Ordering};

const LOCKED: u32 = 0x4000_0000;
const WANTED: u32 = 0x2000_0000;
const CHECK: u32 = 0x1000_0000;
const FLAGS: u32 = LOCKED | WANTED | CHECK;
/// Largest reference count.
pub const REFS_MAX: u32 = CHECK - 1;

/// Reference count + interlock word.
#[derive(Debug)]
pub struct Interlock {
    word: AtomicU32,
    park: Mutex<()>,
    wake: Condvar,
}

impl Default for Interlock {
    fn default() -> Self {
        Interlock::new()
    }
}

impl Interlock {
    /// Count 0, no flags.
    pub fn new() -> Interlock {
        Interlock {
            word: AtomicU32::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Current reference count (racy snapshot).
    pub fn refs(&self) -> u32 {
        self.word.load(Ordering::SeqCst) & !FLAGS
    }

    /// True when the interlock is held (racy snapshot).
    pub fn is_locked(&self) -> bool {
        self.word.load(Ordering::SeqCst) & LOCKED != 0
    }

    fn cas(&self, old: u32, new: u32) -> bool {
        self.word
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Park until `ready(word)` holds. Sets WANTED so the thread that
    /// changes the word wakes us.
    fn park_until(&self, ready: impl Fn(u32) -> bool) {
        let mut g = self.park.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            if ready(lv) {
                return;
            }
            if lv & WANTED != 0 || self.cas(lv, lv | WANTED) {
                g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn wakeup(&self) {
        let _g = self.park.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    /// +1 reference. Returns true when the caller now holds the interlock
    /// and must load/validate (0->1 transition, or CHECK found set); it must
    /// then call [`Interlock::ref_interlock_done`] (or
    /// [`Interlock::rel_interlock`] with `locked = true` on failure).
    pub fn ref_interlock(&self) -> bool {
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            assert!(lv & !FLAGS < REFS_MAX, "interlock refcount overflow");
            if lv == 0 {
                if self.cas(lv, 1 | LOCKED | CHECK) {
                    return true;
                }
                continue;
            }
            let mut nlv = lv + 1;
            if lv & !FLAGS == 0 {
                nlv |= CHECK;
            }
            if nlv & CHECK == 0 {
                if self.cas(lv, nlv) {
                    return false;
                }
            } else if lv & LOCKED != 0 {
                // CHECK set and someone is loading: count ourselves in, then
                // wait for the check to be resolved.
                if self.cas(lv, nlv) {
                    break;
                }
            } else if self.cas(lv, nlv | LOCKED) {
                return true;
            }
        }
        // Deferred check: block until another thread handled it, or take
        // the interlock ourselves if it was released with CHECK still set.
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            if lv & CHECK == 0 {
                return false;
            }
            if lv & LOCKED != 0 {
                self.park_until(|w| w & LOCKED == 0 || w & CHECK == 0);
            } else if self.cas(lv, lv | LOCKED) {
                return true;
            }
        }
    }

    /// +1 reference for a caller that has already validated the object by
    /// other means (the lock-free store checks a buffer's generation tag
    /// before and after): no CHECK on 0->1, so no load step, one atomic add.
    /// Use [`Interlock::ref_interlock`] when the object may need loading.
    pub fn ref_plain(&self) {
        let lv = self.word.fetch_add(1, Ordering::SeqCst);
        assert!(lv & !FLAGS < REFS_MAX, "interlock refcount overflow");
    }

    /// Loading succeeded: release the interlock and clear CHECK.
    pub fn ref_interlock_done(&self) {
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            debug_assert!(lv & LOCKED != 0);
            if self.cas(lv, lv & !FLAGS) {
                if lv & WANTED != 0 {
                    self.wakeup();
                }
                return;
            }
        }
    }

    /// -1 reference. Returns true on a 1->0 transition: the caller holds the
    /// interlock and must unload/retire, then call
    /// [`Interlock::rel_interlock_done`]. With `locked = true` the caller
    /// already holds the interlock (failure path of a load): the count drops
    /// and the interlock stays held; returns true.
    pub fn rel_interlock(&self, locked: bool) -> bool {
        if locked {
            self.rel();
            return true;
        }
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            let n = lv & !FLAGS;
            assert!(n > 0, "interlock released below zero");
            if n == 1 {
                if lv & LOCKED == 0 {
                    if self.cas(lv, (lv - 1) | LOCKED) {
                        return true;
                    }
                } else {
                    self.park_until(|w| w & LOCKED == 0 || w & !FLAGS != 1);
                }
            } else if self.cas(lv, lv - 1) {
                return false;
            }
        }
    }

    /// Unloading done: release the interlock (CHECK cleared if the count is
    /// 0, kept otherwise so a racing adder re-validates).
    pub fn rel_interlock_done(&self) {
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            debug_assert!(lv & LOCKED != 0);
            let mut nlv = lv & !(LOCKED | WANTED);
            if lv & !FLAGS == 0 {
                nlv &= !CHECK;
            }
            if self.cas(lv, nlv) {
                if lv & WANTED != 0 {
                    self.wakeup();
                }
                return;
            }
        }
    }

    /// -1 reference without the interlock. Wakes waiters when the count
    /// reaches 0 with WANTED set.
    pub fn rel(&self) {
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            let n = lv & !FLAGS;
            assert!(n > 0, "interlock released below zero");
            let mut nlv = lv - 1;
            if n == 1 {
                nlv &= !CHECK;
                if lv & LOCKED == 0 {
                    nlv &= !WANTED;
                }
            }
            if self.cas(lv, nlv) {
                if n == 1 && lv & WANTED != 0 && lv & LOCKED == 0 {
                    self.wakeup();
                }
                return;
            }
        }
    }

    /// Park until no reference is held.
    pub fn wait_unreferenced(&self) {
        if self.word.load(Ordering::SeqCst) & !FLAGS == 0 {
            return;
        }
        self.park_until(|w| w & !FLAGS == 0);
    }

    /// Take the interlock if the count is 0; false otherwise.
    pub fn try_interlock_norefs(&self) -> bool {
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            if lv & !FLAGS != 0 || lv & LOCKED != 0 {
                return false;
            }
            if self.cas(lv, lv | LOCKED) {
                return true;
            }
        }
    }

    /// Release an interlock taken by [`Interlock::try_interlock_norefs`].
    /// With `error` and a non-zero count, CHECK is set so the next adder
    /// re-validates (HAMMER `hammer_put_interlock`).
    pub fn put_interlock(&self, error: bool) {
        loop {
            let lv = self.word.load(Ordering::SeqCst);
            debug_assert!(lv & LOCKED != 0);
            let mut nlv = lv & !(LOCKED | WANTED);
            if nlv & !FLAGS == 0 || !error {
                nlv &= !CHECK;
            } else {
                nlv |= CHECK;
            }
            if self.cas(lv, nlv) {
                if lv & WANTED != 0 {
                    self.wakeup();
                }
                return;
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        let l = Interlock::new();
        assert!(l.ref_interlock(), "0->1 takes the interlock");
        assert!(l.is_locked());
        l.ref_interlock_done();
        assert!(!l.ref_interlock(), "1->2 does not");
        assert_eq!(l.refs(), 2);
        assert!(!l.rel_interlock(false));
        assert!(l.rel_interlock(false), "1->0 takes the interlock");
        assert_eq!(l.refs(), 0);
        assert!(l.is_locked());
        l.rel_interlock_done();
        assert!(!l.is_locked());
        assert!(l.try_interlock_norefs());
        l.put_interlock(false);
        l.wait_unreferenced();
    }

    #[test]
    fn failed_load_leaves_object_unloaded() {
        let l = Interlock::new();
        assert!(l.ref_interlock());
        // Load failed: drop our ref but keep the interlock, then release.
        assert!(l.rel_interlock(true));
        assert_eq!(l.refs(), 0);
        assert!(l.is_locked());
        l.put_interlock(true);
        assert!(!l.is_locked());
        assert!(l.ref_interlock(), "the next adder loads again");
        l.ref_interlock_done();
    }

    #[test]
    fn put_interlock_with_error_sets_check_while_referenced() {
        let l = Interlock::new();
        assert!(l.ref_interlock());
        l.ref_interlock_done();
        assert!(!l.ref_interlock());
        // A holder takes the interlock while refs are held and fails.
        loop {
            let lv = l.word.load(Ordering::SeqCst);
            if l.cas(lv, lv | LOCKED) {
                break;
            }
        }
        l.put_interlock(true);
        assert!(l.ref_interlock(), "CHECK set: the next adder re-validates");
        l.ref_interlock_done();
        assert_eq!(l.refs(), 3);
    }

    #[test]
    fn stress_load_once_per_transition() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let l = Arc::new(Interlock::new());
        let loaded = Arc::new(AtomicUsize::new(0));
        let unloaded = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(AtomicUsize::new(0)); // 1 = loaded
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (l, loaded, unloaded, state) =
                    (l.clone(), loaded.clone(), unloaded.clone(), state.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if l.ref_interlock() {
                            assert_eq!(state.swap(1, Ordering::SeqCst), 0, "double load");
                            loaded.fetch_add(1, Ordering::SeqCst);
                            l.ref_interlock_done();
                        }
                        assert_eq!(state.load(Ordering::SeqCst), 1, "used while unloaded");
                        if l.rel_interlock(false) {
                            assert_eq!(state.swap(0, Ordering::SeqCst), 1, "double unload");
                            unloaded.fetch_add(1, Ordering::SeqCst);
                            l.rel_interlock_done();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.refs(), 0);
        assert_eq!(
            loaded.load(Ordering::SeqCst),
            unloaded.load(Ordering::SeqCst)
        );
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;

    /// Two users each ref, use and release: the object is loaded exactly
    /// when the count leaves 0, unloaded when it returns to 0, and never
    /// used while unloaded.
    #[test]
    fn load_unload_two_users() {
        loom::model(|| {
            let l = Arc::new(Interlock::new());
            let state = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (l, state) = (l.clone(), state.clone());
                    loom::thread::spawn(move || {
                        if l.ref_interlock() {
                            assert_eq!(state.swap(1, Ordering::SeqCst), 0);
                            l.ref_interlock_done();
                        }
                        assert_eq!(state.load(Ordering::SeqCst), 1);
                        if l.rel_interlock(false) {
                            assert_eq!(state.swap(0, Ordering::SeqCst), 1);
                            l.rel_interlock_done();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(l.refs(), 0);
            assert_eq!(state.load(Ordering::SeqCst), 0);
        });
    }

    /// A waiter parks until the holder drops the last reference.
    #[test]
    fn wait_unreferenced_wakes() {
        loom::model(|| {
            let l = Arc::new(Interlock::new());
            let done = Arc::new(AtomicUsize::new(0));
            assert!(l.ref_interlock());
            l.ref_interlock_done();
            let (l2, d2) = (l.clone(), done.clone());
            let t = loom::thread::spawn(move || {
                d2.store(1, Ordering::SeqCst);
                l2.rel();
            });
            l.wait_unreferenced();
            assert_eq!(done.load(Ordering::SeqCst), 1);
            assert_eq!(l.refs(), 0);
            t.join().unwrap();
        });
    }

    /// An adder racing a loader waits for the load (CHECK) to finish.
    #[test]
    fn adder_waits_for_loader() {
        loom::model(|| {
            let l = Arc::new(Interlock::new());
            let state = Arc::new(AtomicUsize::new(0));
            let (l2, s2) = (l.clone(), state.clone());
            let t = loom::thread::spawn(move || {
                if l2.ref_interlock() {
                    s2.store(1, Ordering::SeqCst);
                    l2.ref_interlock_done();
                }
                assert_eq!(s2.load(Ordering::SeqCst), 1);
            });
            if l.ref_interlock() {
                state.store(1, Ordering::SeqCst);
                l.ref_interlock_done();
            }
            assert_eq!(state.load(Ordering::SeqCst), 1);
            t.join().unwrap();
            assert_eq!(l.refs(), 2);
        });
    }
}
