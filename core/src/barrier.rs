//! Seq barriers: btrfs's tree-mod-log sequence numbers.
//!
//! A reader that walks backrefs while refs are being queued (btrfs: a
//! backref walker or qgroup accounting) takes a seq with [`SeqBarrier::acquire`]
//! (`btrfs_get_tree_mod_seq`). Ops queued from then on carry a seq at or
//! above it ([`SeqBarrier::current`], what `init_delayed_ref_common()` reads
//! from `fs_info->tree_mod_seq`). While the barrier is held, heads holding
//! such refs are not run ([`crate::head::Head::run_refs`]); they stay queued
//! and run at a later commit once the lowest active seq has moved past them
//! (`btrfs_check_delayed_seq`). Dropping the guard releases the seq
//! (`btrfs_put_tree_mod_seq`).
//!
//! Not on the ingest path: a small mutex guards the set of active seqs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The set of active seqs and the seq counter.
#[derive(Debug, Default)]
pub struct SeqBarrier {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    seq: AtomicU64,
    active: Mutex<BTreeMap<u64, usize>>,
}

/// A held barrier; released on drop.
#[derive(Debug)]
pub struct SeqGuard {
    inner: Arc<Inner>,
    seq: u64,
}

impl SeqGuard {
    /// The seq this barrier holds.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        let mut active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = active.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.seq);
            }
        }
    }
}

impl SeqBarrier {
    /// No barrier held, seq 0.
    pub fn new() -> SeqBarrier {
        SeqBarrier::default()
    }

    /// The seq an op queued now carries (0 until the first barrier).
    pub fn current(&self) -> u64 {
        self.inner.seq.load(Ordering::Acquire)
    }

    /// Take a new seq and hold it as a barrier.
    pub fn acquire(&self) -> SeqGuard {
        let mut active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.inner.seq.fetch_add(1, Ordering::AcqRel) + 1;
        *active.entry(seq).or_insert(0) += 1;
        SeqGuard {
            inner: self.inner.clone(),
            seq,
        }
    }

    /// The lowest active seq, 0 when none is held.
    pub fn lowest(&self) -> u64 {
        let active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        active.keys().next().copied().unwrap_or(0)
    }

    /// Number of barriers held.
    pub fn active(&self) -> usize {
        let active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        active.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_tracks_active_guards() {
        let b = SeqBarrier::new();
        assert_eq!((b.current(), b.lowest()), (0, 0));
        let g1 = b.acquire();
        let g2 = b.acquire();
        assert_eq!((g1.seq(), g2.seq(), b.current()), (1, 2, 2));
        assert_eq!(b.lowest(), 1);
        drop(g1);
        assert_eq!(b.lowest(), 2);
        drop(g2);
        assert_eq!((b.lowest(), b.active()), (0, 0));
    }
}
