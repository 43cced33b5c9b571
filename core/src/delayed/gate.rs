//! The transaction hand-off between ingest shards and the committer.
//!
//! A [`Generation`] counter names the live transaction. Each shard has a
//! buffer per transaction parity, guarded by a [`BufGate`]: a refcount
//! interlock (held by the shard's ingester while it appends) and the tag of
//! the generation the buffer holds.
//!
//! Protocol:
//! - ingester ([`ShardGate::enter`]): read `g`; take a reference on buffer
//!   `g & 1` (when the buffer is not yet tagged with `g`, through the
//!   interlock: the 0->1 transition "loads" it, tagging it; otherwise a
//!   plain increment); SeqCst
//!   fence; re-read the generation; if it moved, drop the reference and
//!   start over.
//! - committer ([`Generation::advance`] then [`ShardGate::quiesce`]): store
//!   `g + 1`; SeqCst fence; wait until the reference count of buffer `g & 1`
//!   is 0.
//!
//! This is Dekker's pattern: store; fence; load on both sides. By the
//! fence rules of the C++/Rust memory model, either the ingester's re-read
//! sees `g + 1` (it moves to the new buffer), or the committer's wait sees
//! its reference (it waits for the append to finish). The fences are
//! needed: SeqCst loads and stores alone give the same guarantee in the
//! language model, but loom models them as AcqRel (tokio-rs/loom#180), and
//! with fences the exact code that runs is the code loom checks. So after `quiesce`, buffer `g & 1` holds every op
//! acknowledged in generation `g` and no later op. Ingesters never wait;
//! the committer parks (the interlock's WANTED bit), it does not spin.
//! Model-checked with loom below.

use refd_sync::interlock::Interlock;
use refd_sync::shim::{fence, AtomicU64, Ordering};

/// The live transaction generation (starts at 1).
#[derive(Debug)]
pub(crate) struct Generation(AtomicU64);

impl Generation {
    pub fn new() -> Generation {
        Generation(AtomicU64::new(1))
    }

    pub fn live(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Open generation `g + 1`; returns `g`, the one to freeze. Callers
    /// serialize commits.
    pub fn advance(&self) -> u64 {
        let g = self.0.load(Ordering::SeqCst);
        self.0.store(g + 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        g
    }
}

/// One buffer's gate.
#[derive(Debug)]
pub(crate) struct BufGate {
    refs: Interlock,
    tag: AtomicU64,
}

/// A shard's two buffer gates.
#[derive(Debug)]
pub(crate) struct ShardGate {
    bufs: [BufGate; 2],
}

pub(crate) fn parity(g: u64) -> usize {
    (g & 1) as usize
}

impl ShardGate {
    pub fn new() -> ShardGate {
        ShardGate {
            bufs: std::array::from_fn(|_| BufGate {
                refs: Interlock::new(),
                tag: AtomicU64::new(0),
            }),
        }
    }

    /// Enter the live generation's buffer; returns its generation with a
    /// reference held. `load(parity)` runs on the 0->1 transition when the
    /// buffer is not yet tagged for the generation (it must find the
    /// buffer empty).
    pub fn enter(&self, gen: &Generation, mut load: impl FnMut(usize)) -> u64 {
        loop {
            let g = gen.live();
            let b = &self.bufs[parity(g)];
            if b.tag.load(Ordering::SeqCst) == g {
                // Already loaded for g: a plain reference; the fence and
                // re-read below decide as on the load path.
                b.refs.ref_plain();
            } else if b.refs.ref_interlock() {
                if gen.live() == g && b.tag.load(Ordering::SeqCst) != g {
                    load(parity(g));
                    b.tag.store(g, Ordering::SeqCst);
                }
                b.refs.ref_interlock_done();
            }
            fence(Ordering::SeqCst);
            if gen.live() == g {
                return g;
            }
            b.refs.rel();
        }
    }

    /// Leave the buffer of `g` entered with [`ShardGate::enter`].
    pub fn leave(&self, g: u64) {
        self.bufs[parity(g)].refs.rel();
    }

    /// True when the buffer of parity `g` holds generation `g`.
    pub fn holds(&self, g: u64) -> bool {
        self.bufs[parity(g)].tag.load(Ordering::SeqCst) == g
    }

    /// Committer: wait until no ingester is inside the buffer of `g`
    /// (after [`Generation::advance`] returned `g`).
    pub fn quiesce(&self, g: u64) {
        self.bufs[parity(g)].refs.wait_unreferenced();
    }

    /// Committer: retire the buffer of `g` under the interlock; `reset`
    /// empties it. No ingester can be inside it afterwards until it is
    /// loaded for a later generation.
    pub fn retire(&self, g: u64, reset: impl FnOnce()) {
        let b = &self.bufs[parity(g)];
        while !b.refs.try_interlock_norefs() {
            b.refs.wait_unreferenced();
        }
        reset();
        b.tag.store(0, Ordering::SeqCst);
        b.refs.put_interlock(false);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicU64 as LAtomic;
    use loom::sync::Arc;

    /// An ingester appends two ops while the committer freezes once. Every
    /// op lands in exactly one generation, and nothing is appended to the
    /// frozen buffer after `quiesce` returned.
    #[test]
    fn handoff_loses_nothing() {
        loom::model(|| {
            let gen = Arc::new(Generation::new());
            let shard = Arc::new(ShardGate::new());
            // ops appended per parity, and a "frozen" flag the committer
            // sets after quiesce.
            let count: Arc<[LAtomic; 2]> = Arc::new([LAtomic::new(0), LAtomic::new(0)]);
            let frozen = Arc::new(LAtomic::new(0));
            let (g2, s2, c2, f2) = (gen.clone(), shard.clone(), count.clone(), frozen.clone());
            let ingester = loom::thread::spawn(move || {
                for _ in 0..2 {
                    let g = s2.enter(&g2, |_| {});
                    // Appending to a frozen buffer would be a lost op.
                    assert!(f2.load(Ordering::SeqCst) != g, "append into frozen txn");
                    c2[parity(g)].fetch_add(1, Ordering::SeqCst);
                    s2.leave(g);
                }
            });
            let g = gen.advance();
            shard.quiesce(g);
            frozen.store(g, Ordering::SeqCst);
            let held_then = shard.holds(g);
            let in_frozen = if held_then {
                count[parity(g)].load(Ordering::SeqCst)
            } else {
                0
            };
            ingester.join().unwrap();
            // After the ingester is done, the frozen count has not moved.
            let after = if shard.holds(g) {
                count[parity(g)].load(Ordering::SeqCst)
            } else {
                0
            };
            assert_eq!(
                in_frozen,
                after,
                "op appended after freeze: g {g} held_then {held_then} held_now {} counts {} {}",
                shard.holds(g),
                count[0].load(Ordering::SeqCst),
                count[1].load(Ordering::SeqCst)
            );
            let next = count[parity(g + 1)].load(Ordering::SeqCst);
            assert_eq!(in_frozen + next, 2, "every op in exactly one txn");
        });
    }
}
