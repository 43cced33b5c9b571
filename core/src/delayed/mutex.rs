//! The mutex baseline: btrfs's shape of `delayed_refs->lock` around the
//! head rbtree, with a ref tree per head (here `BTreeMap`s under one
//! `std::sync::Mutex`). It is the reference for correctness and the
//! baseline for speed; semantics are those of [`crate::head`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{merge_heads, DelayedRefStore, IngestHandle, StampClock, StoreError};
use crate::head::{DelayedRef, Head, HeadSummary};
use crate::model::{Op, RefKey};

/// A head as the baseline keeps it: summary plus a map of refs, each
/// `(ref_mod, drops)` (see [`DelayedRef`]).
#[derive(Clone, Debug)]
struct MapHead {
    summary: HeadSummary,
    refs: BTreeMap<(RefKey, u64), (i64, u64)>,
}

impl MapHead {
    fn to_head(&self, bytenr: u64) -> Head {
        Head {
            bytenr,
            summary: self.summary,
            refs: self
                .refs
                .iter()
                .map(|(&(key, seq), &(ref_mod, drops))| DelayedRef {
                    key,
                    seq,
                    ref_mod,
                    drops,
                })
                .collect(),
        }
    }

    fn of_head(h: &Head) -> MapHead {
        MapHead {
            summary: h.summary,
            refs: h
                .refs
                .iter()
                .map(|r| ((r.key, r.seq), (r.ref_mod, r.drops)))
                .collect(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    live: BTreeMap<u64, MapHead>,
    frozen: Option<Arc<BTreeMap<u64, MapHead>>>,
    /// Released transaction, dropped outside the engine's tree lock.
    released: Option<Arc<BTreeMap<u64, MapHead>>>,
}

/// One lock around everything.
#[derive(Debug, Default)]
pub struct MutexStore {
    inner: Mutex<Inner>,
    clock: StampClock,
}

impl MutexStore {
    /// An empty store.
    pub fn new() -> MutexStore {
        MutexStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle of the baseline: every op takes the one lock.
#[derive(Debug)]
pub struct MutexHandle<'a> {
    store: &'a MutexStore,
}

impl IngestHandle for MutexHandle<'_> {
    fn add(&mut self, op: &Op) -> Result<(), StoreError> {
        op.check()?;
        let stamp = self.store.clock.stamp(op);
        let one = HeadSummary::of_op(op, stamp);
        let mut inner = self.store.lock();
        match inner.live.get_mut(&op.bytenr) {
            Some(h) => {
                h.summary = h.summary.merge(one);
                if let Some(key) = op.key {
                    let one = DelayedRef::of_mod(key, op.seq, op.ref_mod());
                    let e = h.refs.entry((key, op.seq)).or_insert((0, 0));
                    e.0 += one.ref_mod;
                    e.1 += one.drops;
                    if *e == (0, 0) {
                        h.refs.remove(&(key, op.seq));
                    }
                }
            }
            None => {
                let mut refs = BTreeMap::new();
                if let Some(key) = op.key {
                    let one = DelayedRef::of_mod(key, op.seq, op.ref_mod());
                    refs.insert((key, op.seq), (one.ref_mod, one.drops));
                }
                inner.live.insert(op.bytenr, MapHead { summary: one, refs });
            }
        }
        Ok(())
    }
}

impl DelayedRefStore for MutexStore {
    fn reclaim_released(&self) {
        let released = self.lock().released.take();
        drop(released);
    }

    type Handle<'a> = MutexHandle<'a>;

    fn name(&self) -> &'static str {
        "mutex"
    }

    fn handle(&self) -> Result<MutexHandle<'_>, StoreError> {
        Ok(MutexHandle { store: self })
    }

    fn pending(&self, bytenr: u64) -> Option<Head> {
        self.pending_in(bytenr, true)
    }

    fn pending_live(&self, bytenr: u64) -> Option<Head> {
        self.pending_in(bytenr, false)
    }

    fn pending_all(&self) -> Vec<Head> {
        let inner = self.lock();
        let mut all: Vec<Head> = inner.live.iter().map(|(b, h)| h.to_head(*b)).collect();
        if let Some(f) = &inner.frozen {
            all.extend(f.iter().map(|(b, h)| h.to_head(*b)));
        }
        drop(inner);
        merge_heads(all)
    }

    fn seal(&self) {
        let mut inner = self.lock();
        assert!(
            inner.frozen.is_none(),
            "freeze while a transaction is frozen"
        );
        let live = std::mem::take(&mut inner.live);
        inner.frozen = Some(Arc::new(live));
    }

    fn sealed_heads(&self) -> Vec<Head> {
        let frozen = self
            .lock()
            .frozen
            .clone()
            .expect("sealed_heads without seal");
        // Convert outside the lock: ingest continues into the new live map.
        let mut out: Vec<Head> = frozen.iter().map(|(b, h)| h.to_head(*b)).collect();
        out.retain(|h| !h.is_noop());
        out
    }

    fn requeue(&self, mut heads: Vec<Head>) {
        super::restamp(&mut heads, &self.clock);
        let mut inner = self.lock();
        Self::merge_into_live(&mut inner, heads);
    }

    fn release(&self, held: Vec<Head>) {
        let mut inner = self.lock();
        inner.released = inner.frozen.take();
        Self::merge_into_live(&mut inner, held);
    }
}

impl MutexStore {
    /// The merged pending head of `bytenr` in the live transaction, and in
    /// the frozen one when `frozen`.
    fn pending_in(&self, bytenr: u64, frozen: bool) -> Option<Head> {
        let inner = self.lock();
        let mut out: Option<Head> = inner
            .frozen
            .as_ref()
            .filter(|_| frozen)
            .and_then(|f| f.get(&bytenr))
            .map(|h| h.to_head(bytenr));
        if let Some(h) = inner.live.get(&bytenr) {
            let h = h.to_head(bytenr);
            match &mut out {
                Some(o) => o.merge(&h),
                None => out = Some(h),
            }
        }
        out.filter(|h| !h.is_noop())
    }

    fn merge_into_live(inner: &mut Inner, heads: Vec<Head>) {
        for h in heads {
            match inner.live.get_mut(&h.bytenr) {
                Some(live) => {
                    let mut merged = live.to_head(h.bytenr);
                    merged.merge(&h);
                    *live = MapHead::of_head(&merged);
                }
                None => {
                    inner.live.insert(h.bytenr, MapHead::of_head(&h));
                }
            }
        }
    }
}
