//! Bounded cache of clean (committed) nodes, keyed by address.
//!
//! Every slot carries a [`refd_sync::interlock::Interlock`]: its count is
//! the number of readers using the node right now. As in HAMMER:
//!
//! - **0->1** ([`Interlock::ref_interlock`] returns true): the caller holds
//!   the interlock and *loads* the node (reads and decodes it, unless it is
//!   still resident), then [`Interlock::ref_interlock_done`]. Racing readers
//!   of the same address park until the load is done and then share it: a
//!   node is read once however many threads want it.
//! - **1->0** ([`Interlock::rel_interlock`] returns true): the last user
//!   *unloads*, which here means "becomes evictable": the node is stamped
//!   and queued at the LRU tail, then [`Interlock::rel_interlock_done`].
//! - **eviction** takes the interlock only with no references
//!   ([`Interlock::try_interlock_norefs`]), so a node in use is never
//!   evicted; a reader that raced the eviction finds the slot dead when it
//!   gets the interlock and retries the lookup.
//!
//! The budget ([`crate::btree::TreeConfig::cache_bytes`]) bounds resident clean nodes plus
//! the writer's dirty nodes (reported with [`NodeCache::set_dirty_bytes`]),
//! which are pinned outside the cache until commit. Nodes in use can push
//! the cache over budget by at most one node per reader and tree level; the
//! excess is evicted as soon as they are released.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use refd_sync::interlock::Interlock;

use crate::btree::error::BTreeError;
use crate::btree::node::Node;

/// Cache counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that read the node from storage.
    pub misses: u64,
    /// Nodes evicted under pressure.
    pub evictions: u64,
    /// Resident clean nodes.
    pub nodes: u64,
    /// Their accounted bytes.
    pub bytes: u64,
    /// Dirty bytes pinned by the writer.
    pub dirty_bytes: u64,
    /// The budget.
    pub budget_bytes: u64,
}

#[derive(Debug, Default)]
struct SlotState {
    node: Option<Arc<Node>>,
    mem_bytes: usize,
    dead: bool,
}

#[derive(Debug)]
struct Slot {
    addr: u64,
    interlock: Interlock,
    state: Mutex<SlotState>,
    /// Stamp of the slot's latest entry in the LRU queue.
    stamp: AtomicU64,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<u64, Arc<Slot>>,
    /// `(addr, stamp)` in release order; entries whose stamp is no longer
    /// the slot's are stale and skipped.
    lru: VecDeque<(u64, u64)>,
    bytes: usize,
    next_stamp: u64,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct NodeCache {
    inner: Mutex<Inner>,
    budget_bytes: usize,
    dirty_bytes: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// A node in use: holds one reference on its slot until dropped.
#[derive(Debug)]
pub(crate) struct CacheRef<'a> {
    cache: &'a NodeCache,
    slot: Arc<Slot>,
    node: Arc<Node>,
}

impl CacheRef<'_> {
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for CacheRef<'_> {
    fn drop(&mut self) {
        if self.slot.interlock.rel_interlock(false) {
            // 1->0: the node becomes evictable (HAMMER's unload step).
            self.cache.queue_evictable(&self.slot);
            self.slot.interlock.rel_interlock_done();
            self.cache.evict_over_budget();
        }
    }
}

/// Unload `slot`, whose interlock the caller took with no references
/// (`try_interlock_norefs`): mark it dead, drop its node, remove it from the
/// map and the byte count, and release the interlock. The release is "with
/// error": a reader who referenced the slot while the interlock was held
/// finds CHECK still set, takes the load path and sees the slot dead
/// (HAMMER's hammer_put_interlock(lock, error)); clearing CHECK would tell
/// it the node was loaded when it is gone.
/// Removes `slot` from the cache and returns its node, for the caller to
/// drop (outside the cache's locks: a leaf holds hundreds of values).
fn unload(inner: &mut Inner, slot: &Slot) -> Option<Arc<Node>> {
    let (node, freed) = {
        let mut st = slot.state();
        st.dead = true;
        (st.node.take(), std::mem::take(&mut st.mem_bytes))
    };
    inner.map.remove(&slot.addr);
    inner.bytes -= freed;
    slot.interlock.put_interlock(true);
    node
}

impl NodeCache {
    pub(crate) fn new(budget_bytes: usize) -> Self {
        NodeCache {
            inner: Mutex::new(Inner::default()),
            budget_bytes,
            dirty_bytes: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the cache how many bytes the writer's dirty nodes hold.
    pub(crate) fn set_dirty_bytes(&self, bytes: usize) {
        self.dirty_bytes.store(bytes, Ordering::Relaxed);
        self.evict_over_budget();
    }

    /// The node at `addr`, loading it with `load` on a miss. `load` runs
    /// without any cache lock held.
    pub(crate) fn get(
        &self,
        addr: u64,
        load: impl Fn() -> Result<Node, BTreeError>,
    ) -> Result<CacheRef<'_>, BTreeError> {
        loop {
            let slot = {
                let mut inner = self.inner();
                Arc::clone(inner.map.entry(addr).or_insert_with(|| {
                    Arc::new(Slot {
                        addr,
                        interlock: Interlock::new(),
                        state: Mutex::new(SlotState::default()),
                        stamp: AtomicU64::new(0),
                    })
                }))
            };
            if !slot.interlock.ref_interlock() {
                // Already referenced and loaded by someone else.
                let node = slot.state().node.clone();
                match node {
                    Some(node) => {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(CacheRef {
                            cache: self,
                            slot,
                            node,
                        });
                    }
                    // A referenced slot without CHECK is loaded.
                    None => unreachable!("cache slot {addr} referenced but not loaded"),
                }
            }
            // We hold the interlock (0->1, or a failed load left CHECK).
            let (dead, resident) = {
                let st = slot.state();
                (st.dead, st.node.clone())
            };
            if dead {
                // Evicted between the lookup and the reference: retry.
                slot.interlock.rel_interlock(true);
                slot.interlock.put_interlock(true);
                continue;
            }
            if let Some(node) = resident {
                self.hits.fetch_add(1, Ordering::Relaxed);
                slot.interlock.ref_interlock_done();
                return Ok(CacheRef {
                    cache: self,
                    slot,
                    node,
                });
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            match load() {
                Ok(node) => {
                    let node = Arc::new(node);
                    let mem = node.mem_bytes();
                    {
                        let mut st = slot.state();
                        st.node = Some(Arc::clone(&node));
                        st.mem_bytes = mem;
                    }
                    self.inner().bytes += mem;
                    slot.interlock.ref_interlock_done();
                    self.evict_over_budget();
                    return Ok(CacheRef {
                        cache: self,
                        slot,
                        node,
                    });
                }
                Err(e) => {
                    // Drop our reference, keep the interlock, remove the
                    // empty slot if nobody else waits on it.
                    slot.interlock.rel_interlock(true);
                    if slot.interlock.refs() == 0 {
                        let mut inner = self.inner();
                        if inner.map.get(&addr).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                            inner.map.remove(&addr);
                            slot.state().dead = true;
                        }
                    }
                    slot.interlock.put_interlock(true);
                    return Err(e);
                }
            }
        }
    }

    fn queue_evictable(&self, slot: &Slot) {
        let mut inner = self.inner();
        inner.next_stamp += 1;
        let stamp = inner.next_stamp;
        slot.stamp.store(stamp, Ordering::Relaxed);
        inner.lru.push_back((slot.addr, stamp));
        // Bound the queue: drop stale entries when it grows past twice the
        // resident slots.
        if inner.lru.len() > 2 * inner.map.len() + 64 {
            let Inner { map, lru, .. } = &mut *inner;
            lru.retain(|(addr, stamp)| {
                map.get(addr)
                    .is_some_and(|s| s.stamp.load(Ordering::Relaxed) == *stamp)
            });
        }
    }

    /// Evicts least recently released, unreferenced nodes until resident
    /// plus dirty bytes fit the budget (or nothing evictable is left).
    pub(crate) fn evict_over_budget(&self) {
        let mut inner = self.inner();
        let mut scanned = 0usize;
        let scan_max = inner.lru.len();
        while inner.bytes + self.dirty_bytes.load(Ordering::Relaxed) > self.budget_bytes
            && scanned < scan_max
        {
            scanned += 1;
            let Some((addr, stamp)) = inner.lru.pop_front() else {
                break;
            };
            let Some(slot) = inner.map.get(&addr).cloned() else {
                continue;
            };
            if slot.stamp.load(Ordering::Relaxed) != stamp {
                continue;
            }
            if !slot.interlock.try_interlock_norefs() {
                // In use: it is queued again when released.
                continue;
            }
            unload(&mut inner, &slot);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Installs a node just written by a commit (replacing anything cached
    /// at that address) as resident and evictable.
    pub(crate) fn insert(&self, addr: u64, node: Arc<Node>) -> Result<(), BTreeError> {
        self.invalidate(addr)?;
        let mem = node.mem_bytes();
        let slot = Arc::new(Slot {
            addr,
            interlock: Interlock::new(),
            state: Mutex::new(SlotState {
                node: Some(node),
                mem_bytes: mem,
                dead: false,
            }),
            stamp: AtomicU64::new(0),
        });
        {
            let mut inner = self.inner();
            inner.bytes += mem;
            inner.map.insert(addr, Arc::clone(&slot));
        }
        self.queue_evictable(&slot);
        self.evict_over_budget();
        Ok(())
    }

    /// Removes the node at `addr` (its slot was freed or is being reused)
    /// and returns it for the caller to drop. It must not be in use: the
    /// writer calls this with every reader excluded.
    pub(crate) fn invalidate(&self, addr: u64) -> Result<Option<Arc<Node>>, BTreeError> {
        let mut inner = self.inner();
        let Some(slot) = inner.map.get(&addr).cloned() else {
            return Ok(None);
        };
        assert!(
            slot.interlock.try_interlock_norefs(),
            "node {addr} is invalidated while a reader uses it"
        );
        Ok(unload(&mut inner, &slot))
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let inner = self.inner();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            nodes: inner.map.len() as u64,
            bytes: inner.bytes as u64,
            dirty_bytes: self.dirty_bytes.load(Ordering::Relaxed) as u64,
            budget_bytes: self.budget_bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btree::key::Key;
    use std::sync::atomic::AtomicUsize;

    fn leaf(i: u64) -> Node {
        Node::leaf(vec![(Key::new(i, 0, 0), vec![0; 1000])])
    }

    #[test]
    fn loads_once_evicts_unreferenced_only() {
        let one = leaf(0).mem_bytes();
        let cache = NodeCache::new(3 * one);
        let loads = AtomicUsize::new(0);
        let load = |i: u64| {
            let loads = &loads;
            move || {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(leaf(i))
            }
        };
        let held: Vec<_> = (0..5)
            .map(|i| cache.get(i, load(i)).expect("get"))
            .collect();
        // Five nodes in use: none evicted although over budget.
        assert_eq!(cache.stats().nodes, 5);
        assert_eq!(loads.load(Ordering::SeqCst), 5);
        let again = cache.get(2, load(2)).expect("get");
        assert_eq!(loads.load(Ordering::SeqCst), 5, "shared, not reloaded");
        drop(held);
        assert_eq!(cache.stats().nodes, 3, "evicted down to budget");
        assert!(cache.stats().bytes as usize <= 3 * one);
        // Node 2 is still referenced by `again` and stays resident.
        assert_eq!(again.node().first_key(), Some(Key::new(2, 0, 0)));
        drop(again);
        cache.get(2, load(2)).expect("get");
        assert_eq!(loads.load(Ordering::SeqCst), 5, "2 was kept (most recent)");
        // A failed load leaves nothing behind and the next get retries.
        let err = cache.get(9, || Err(BTreeError::corrupt(9, 0, "boom")));
        assert!(err.is_err());
        cache.get(9, load(9)).expect("retry loads");
        assert!(cache.invalidate(9).is_ok());
    }

    #[test]
    fn concurrent_readers_share_loads() {
        let cache = Arc::new(NodeCache::new(4 * leaf(0).mem_bytes()));
        let loads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (cache, loads) = (Arc::clone(&cache), Arc::clone(&loads));
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let addr = (i * 7 + t) % 16;
                        let r = cache
                            .get(addr, || {
                                loads.fetch_add(1, Ordering::SeqCst);
                                Ok(leaf(addr))
                            })
                            .expect("get");
                        assert_eq!(r.node().first_key(), Some(Key::new(addr, 0, 0)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        let s = cache.stats();
        assert!(s.nodes <= 4 + 8, "{s:?}");
        assert_eq!(s.misses, loads.load(Ordering::SeqCst) as u64);
    }
}
