//! The ring of staging buffers of one shard and transaction parity, and the
//! hand-off of a full buffer from its ingest thread to the background.
//!
//! Sorting a full staging buffer and building a run from it (with its Bloom
//! filter) costs ~250 µs per 4096 ops; done by the ingest thread that
//! filled the buffer it was the p99.99 of ingest. So a shard's buffers of a
//! parity form a ring of [`STAGING_RING`]: the ingest thread (the shard's
//! owner) appends to the *active* buffer; when it is full the owner marks it
//! `FULL`, moves to an empty one and asks the background hand-off thread
//! to turn the full one into a run. When no buffer of the ring is empty
//! (the background is behind), the owner waits for one (back-pressure) for
//! at most [`HANDOFF_WAIT_STEPS_MAX`] steps (about 1 ms when the cores
//! are free, a scheduler tick per yield when not), then hands the
//! oldest full one off itself: a wait for a thread that does not get a
//! core is otherwise unbounded, the owner's own hand-off is not. Measured
//! on 2 cores (`docs/benchmarks.md`, "Issue 13: no sort on the ingest
//! thread"): handing off at once whenever the ring was full left the
//! p99.99 where it was (half the hand-offs fell to the ingest threads);
//! waiting brought it down by 8–40x, at ~20% of the throughput.
//!
//! Each buffer has a state word; every transition is one atomic operation:
//!
//! ```text
//!            owner: full             background or owner: claim (CAS)
//!  FILLING ───────────────► FULL ─────────────────────────────► HANDING
//!     ▲                       │                                    │
//!     │                       │ committer: hold (CAS,             │ run published and
//!     │                       ▼ after the gate's quiesce)          │ buffer emptied in one
//!     │                     HELD                                   │ change of the index
//!     └──── release: reset ───┘◄───────────────────────────────────┘
//! ```
//!
//! - Only the owner writes a buffer's slots, and only while it is
//!   `FILLING`; it never writes a buffer it marked full until the
//!   hand-off returned it (it reads `FILLING` again, then a release fence,
//!   so a reader that sees its new slots also sees the hand-off's change of
//!   the index begun, and retries).
//! - A full buffer is handed off by exactly one thread: the one whose CAS
//!   `FULL -> HANDING` won.
//! - The committer's merge of a sealed generation (`Ring::hold`), after
//!   the gate's quiesce (no owner inside the generation's buffers), turns
//!   every `FULL` buffer into `HELD` (its ops are merged from the staging
//!   buffer) and waits for every `HANDING` one (its run is then in the
//!   index). From then on nobody changes the ring or publishes into its
//!   index until release resets it: a hand-off of generation `g` never
//!   publishes into the index when it holds `g + 2`, nor empties a buffer
//!   that `g + 2` is filling.
//!
//! Model-checked with loom below (`handoff_*`).

use refd_sync::shim::{fence, AtomicU32, Ordering};

/// Staging buffers per shard and transaction parity: the active one and
/// up to `STAGING_RING - 1` full ones waiting for the background.
pub const STAGING_RING: usize = 4;
const _: () = assert!(STAGING_RING >= 2, "the owner needs a buffer to move to");

/// Steps of `wait_step` an owner whose ring is full waits for the
/// background before it hands a buffer off itself: 64 spins, 64 yields and
/// 14 sleeps of 50 µs, about 1 ms when each yield returns at once
/// (measured in `docs/benchmarks.md`: waiting, not the owner's own
/// hand-off, is what keeps the p99.99 of ingest low on 2 cores). A yield
/// on busy cores can give the core to the background for a scheduler tick
/// (4 ms here): one wait of five such yields was traced at 22 ms. Bounding
/// the wait by the clock (1 ms) instead was measured worse: more hand-offs
/// on the ingest threads (13–92 of 2,440 against 0–5), 10.4–10.7 against
/// 11.7–12.7 Mops/s, max 4.1–22.5 ms against 3.4–3.8 ms
/// (`docs/benchmarks.md`, "Issue 13: where the max comes from"). Under
/// loom, one step.
pub const HANDOFF_WAIT_STEPS_MAX: u32 = if cfg!(loom) { 1 } else { 128 + 14 };

/// Appended to by the owner (the active buffer), or empty.
pub(crate) const FILLING: u32 = 0;
/// Full, waiting for its hand-off; the owner writes it no more.
pub(crate) const FULL: u32 = 1;
/// Being handed off (sorted, built into a run, published) by the thread
/// that claimed it.
pub(crate) const HANDING: u32 = 2;
/// Full, kept in staging for the merge of its sealed generation.
pub(crate) const HELD: u32 = 3;

/// What the owner does after [`Ring::rotate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rotate {
    /// An empty buffer is active now; the full one waits for the
    /// background (ask it).
    Moved,
    /// No buffer was empty: the owner claimed buffer `i` and must hand it
    /// off itself, then call [`Ring::owner_handed_off`].
    HandOff(usize),
}

/// The states of one shard's buffers of one parity, and which is active.
#[derive(Debug)]
pub(crate) struct Ring {
    states: [AtomicU32; STAGING_RING],
    /// The buffer the owner appends to (written by the owner only; a new
    /// owner of the shard takes it over with the shard's claim).
    active: AtomicU32,
    /// How many times the owner moved to another buffer (wrapping): a
    /// reader of the ring's buffers compares it before and after
    /// ([`Ring::moves`]).
    moves: AtomicU32,
}

impl Ring {
    pub fn new() -> Ring {
        Ring {
            states: std::array::from_fn(|_| AtomicU32::new(FILLING)),
            active: AtomicU32::new(0),
            moves: AtomicU32::new(0),
        }
    }

    /// Reader: how many times the owner moved to another buffer. The
    /// index's change counters do not see a move to a buffer emptied
    /// before the read began, so a reader that reads the buffers one after
    /// another could see ops the owner appended after a move and miss the
    /// ones it appended before it (the rest of the buffer it left), which
    /// is no prefix of the owner's ops: a lookup counted a drop without
    /// its add (found by `core/tests/stress.rs` `stress_hot_lockfree`).
    /// A read of the ring's buffers that loads this before and after and
    /// gets the same value saw no move: the owner's appends after a move
    /// are published (`len`, a hot cell's state: Release) after the move
    /// is counted, so a reader that saw one of them loads the new count.
    pub fn moves(&self) -> u32 {
        self.moves.load(Ordering::Acquire)
    }

    /// Owner: the buffer it appends to.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed) as usize
    }

    /// State of buffer `i` (tests and assertions).
    pub fn state(&self, i: usize) -> u32 {
        self.states[i].load(Ordering::SeqCst)
    }

    /// Owner: the active buffer is full (its ops and length are written
    /// before this). Marks it full, asks the background to hand it off
    /// (`ask`) and moves to an empty buffer. If there is none (the
    /// background is behind), waits for one: back-pressure, up to
    /// [`HANDOFF_WAIT_STEPS_MAX`] steps (about 1 ms); after that claims a
    /// full buffer for the owner to hand off itself, the oldest first (the
    /// one after the active buffer in ring order), so that an ingest
    /// thread never waits unboundedly for a thread that does not get a
    /// core.
    pub fn rotate(&self, ask: impl FnOnce()) -> Rotate {
        let cur = self.active();
        debug_assert_eq!(
            self.state(cur),
            FILLING,
            "owner filled a buffer it gave away"
        );
        self.states[cur].store(FULL, Ordering::SeqCst);
        ask();
        let mut spins = 0u32;
        loop {
            for k in 1..STAGING_RING {
                let i = (cur + k) % STAGING_RING;
                if self.states[i].load(Ordering::SeqCst) == FILLING {
                    self.activate(i);
                    return Rotate::Moved;
                }
            }
            if spins >= HANDOFF_WAIT_STEPS_MAX {
                for k in 1..=STAGING_RING {
                    let i = (cur + k) % STAGING_RING;
                    if self.claim(i) {
                        return Rotate::HandOff(i);
                    }
                }
            }
            // Every buffer is full or being handed off: wait (after the
            // bound, for one being handed off by others to finish).
            wait_step(&mut spins);
        }
    }

    /// Owner: it handed off buffer `i` itself ([`Rotate::HandOff`]); the
    /// buffer is empty and active now.
    pub fn owner_handed_off(&self, i: usize) {
        self.handed_off(i);
        self.activate(i);
    }

    fn activate(&self, i: usize) {
        // The buffer's slots are rewritten from here on: readers that see
        // a new slot must also see the change of the index that emptied
        // the buffer begun (it happened before the `FILLING` just read);
        // see `ChangeCounters::begin_change` (`window.rs`).
        fence(Ordering::Release);
        self.active.store(i as u32, Ordering::Relaxed);
        // Before the first append to buffer `i` (see `Ring::moves`).
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// Take full buffer `i` to hand it off: true for exactly one caller
    /// per time the buffer was full.
    pub fn claim(&self, i: usize) -> bool {
        self.states[i]
            .compare_exchange(FULL, HANDING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The claimer of buffer `i`: its run is published and the buffer
    /// emptied (both in one change of the index); the owner may fill it.
    pub fn handed_off(&self, i: usize) {
        let was = self.states[i].swap(FILLING, Ordering::SeqCst);
        assert_eq!(was, HANDING, "hand-off of a buffer not claimed");
    }

    /// Committer, after the gate's quiesce of the ring's generation (no
    /// owner appends or rotates): keep every full buffer in staging for the
    /// merge, and wait for the hand-offs in progress to publish. Afterwards
    /// nothing changes the ring or its index until [`Ring::reset`].
    pub fn hold(&self) {
        for s in &self.states {
            let mut spins = 0u32;
            // FULL becomes HELD; FILLING or HELD stay; HANDING is waited for.
            while let Err(HANDING) =
                s.compare_exchange(FULL, HELD, Ordering::SeqCst, Ordering::SeqCst)
            {
                wait_step(&mut spins);
            }
        }
    }

    /// Release of the ring's generation (buffers emptied by the caller):
    /// every buffer is `FILLING` again and the first one active. A hand-off
    /// still in progress (possible only if [`Ring::hold`] was not called)
    /// is waited for first.
    pub fn reset(&self) {
        self.hold();
        for s in &self.states {
            s.store(FILLING, Ordering::SeqCst);
        }
        self.active.store(0, Ordering::Relaxed);
    }
}

/// One step of a wait for a hand-off in progress (~0.2–1 ms), or of an
/// index's readers and writers for each other (`window.rs`): the store's
/// `lockfree::backoff` (spin, then yield, then sleep 50 µs). Under loom,
/// a yield (loom needs spin loops to yield).
pub(super) fn wait_step(spins: &mut u32) {
    #[cfg(loom)]
    {
        *spins = spins.saturating_add(1);
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    super::lockfree::backoff(spins);
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicU64;
    use loom::sync::Arc;

    /// The owner fills three buffers' worth (one op each) through a ring
    /// of `STAGING_RING` while the background hands off what it can claim;
    /// then (the gate's quiesce = the owner is done) the committer holds
    /// the ring, merges what is published plus what is staged, and
    /// releases it. Every op is in exactly one of the two, the owner never
    /// writes a buffer that is not empty and its own, and nothing is
    /// published or emptied after the hold.
    #[test]
    fn handoff_loses_nothing_and_stops_at_hold() {
        // Preemptions bounded (3) so that the model runs in seconds; the
        // interleavings of each thread's state transitions are all tried.
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            const FILLS: u64 = STAGING_RING as u64 + 1;
            let ring = Arc::new(Ring::new());
            let staged: Arc<[AtomicU64; STAGING_RING]> =
                Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
            let published = Arc::new(AtomicU64::new(0));
            // A hand-off: the buffer's ops into the index, the buffer empty.
            fn hand_off(staged: &[AtomicU64], published: &AtomicU64, i: usize) {
                published.fetch_add(staged[i].swap(0, Ordering::Relaxed), Ordering::Relaxed);
            }
            let (r, s, p) = (ring.clone(), staged.clone(), published.clone());
            let owner = loom::thread::spawn(move || {
                for _ in 0..FILLS {
                    let a = r.active();
                    assert_eq!(r.state(a), FILLING, "owner writes a buffer it gave away");
                    assert_eq!(
                        s[a].load(Ordering::Relaxed),
                        0,
                        "owner reuses a full buffer"
                    );
                    s[a].store(1, Ordering::Relaxed);
                    if let Rotate::HandOff(i) = r.rotate(|| {}) {
                        hand_off(&s[..], &p, i);
                        r.owner_handed_off(i);
                    }
                }
            });
            let (r, s, p) = (ring.clone(), staged.clone(), published.clone());
            let background = loom::thread::spawn(move || {
                for i in 0..2 {
                    if r.claim(i) {
                        hand_off(&s[..], &p, i);
                        r.handed_off(i);
                    }
                }
            });
            owner.join().unwrap();
            ring.hold();
            let at_hold = published.load(Ordering::Relaxed);
            let held: u64 = staged.iter().map(|s| s.load(Ordering::Relaxed)).sum();
            assert_eq!(at_hold + held, FILLS, "every op published or staged, once");
            background.join().unwrap();
            assert_eq!(
                published.load(Ordering::Relaxed),
                at_hold,
                "published after the hold"
            );
            let after: u64 = staged.iter().map(|s| s.load(Ordering::Relaxed)).sum();
            assert_eq!(after, held, "a held buffer emptied");
            ring.reset();
            for i in 0..STAGING_RING {
                assert_eq!(ring.state(i), FILLING);
            }
        });
    }
}
