//! [`BTree`]: opening, reads, commit, abort and pending-free release.
//!
//! # Locking
//!
//! One `RwLock` guards the mutable part (working root, dirty nodes,
//! allocator, generations). Readers ([`BTree::get`], each leaf step of a
//! [`Range`], [`BTree::check`]) take it shared and run concurrently with
//! each other; the node cache is internally synchronized, so parallel
//! readers load and share nodes without the writer. Mutations, `commit`,
//! `abort` and `release_pending` take it exclusively: one writer at a time,
//! and no reader sees a half-applied mutation. Readers see the *working*
//! tree, uncommitted changes included.
//!
//! A [`Range`] does not hold the lock between leaves: it re-descends from
//! the root for each leaf, starting at the first key of the next leaf, so a
//! long scan never blocks the writer. Each leaf's items are a consistent
//! snapshot; a mutation between two leaves may or may not be seen by the
//! rest of the scan, but keys are always returned ascending, at most once.

use std::collections::HashMap;
use std::ops::{Bound, Deref, RangeBounds};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::btree::alloc::{AllocCounts, AllocInfo, Allocator};
use crate::btree::cache::{CacheRef, CacheStats, NodeCache};
use crate::btree::error::BTreeError;
use crate::btree::key::Key;
use crate::btree::node::{route, Body, LeafItem, Node};
use crate::format::{FsId, Superblock, NODE_BYTES};
use crate::storage::Storage;

/// Default cache budget: 64 MiB.
pub const CACHE_BYTES_DEFAULT: usize = 64 << 20;
/// Default nodes per `write_batch` at commit (1 MiB).
pub const WRITE_BATCH_NODES_DEFAULT: usize = 64;
/// Largest accepted [`TreeConfig::write_batch_nodes`] (16 MiB per batch).
pub const WRITE_BATCH_NODES_MAX: usize = 1024;

/// Tunables of a [`BTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeConfig {
    /// Tree id written in every node's `owner` field and checked on read.
    pub owner: u64,
    /// Byte budget of the node cache, dirty nodes included (see
    /// `docs/btree.md`, "Node cache").
    pub cache_bytes: usize,
    /// Nodes per `write_batch` call at commit, `1..=WRITE_BATCH_NODES_MAX`.
    pub write_batch_nodes: usize,
}

impl Default for TreeConfig {
    fn default() -> Self {
        TreeConfig {
            owner: 1,
            cache_bytes: CACHE_BYTES_DEFAULT,
            write_batch_nodes: WRITE_BATCH_NODES_DEFAULT,
        }
    }
}

impl TreeConfig {
    fn check(&self) -> Result<(), BTreeError> {
        if self.write_batch_nodes == 0 || self.write_batch_nodes > WRITE_BATCH_NODES_MAX {
            return Err(BTreeError::Config {
                field: "write_batch_nodes",
                reason: format!(
                    "{} is outside 1..={WRITE_BATCH_NODES_MAX}",
                    self.write_batch_nodes
                ),
            });
        }
        if self.owner == crate::btree::BITMAP_OWNER {
            return Err(BTreeError::Config {
                field: "owner",
                reason: format!("{} is reserved for bitmap nodes", self.owner),
            });
        }
        Ok(())
    }
}

/// Where a tree's root is: the superblock's `tree_root_*` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootInfo {
    /// Byte address of the root node, 0 for an empty tree.
    pub addr: u64,
    /// Level of the root (0 = leaf; 0 for an empty tree).
    pub level: u8,
    /// Generation in the root's header (0 for an empty tree).
    pub generation: u64,
}

/// Everything needed to open a tree; normally from the superblock
/// ([`TreeLocation::from_superblock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeLocation {
    /// File system id every node must carry.
    pub fs_id: FsId,
    /// Byte address of the node region.
    pub node_region_start: u64,
    /// Its length (whole nodes).
    pub node_region_bytes: u64,
    /// The committed root.
    pub root: RootInfo,
    /// The committed allocator state.
    pub alloc: AllocInfo,
}

impl TreeLocation {
    /// The location recorded in a superblock.
    pub fn from_superblock(sb: &Superblock) -> Self {
        TreeLocation {
            fs_id: sb.fs_id,
            node_region_start: sb.node_region_start,
            node_region_bytes: sb.node_region_bytes,
            root: RootInfo {
                addr: sb.tree_root_addr,
                level: sb.tree_root_level,
                generation: sb.tree_root_generation,
            },
            alloc: AllocInfo {
                next_unallocated: sb.alloc_next_unallocated,
                bitmap_addr: sb.free_space_bitmap_addr,
                bitmap_bytes: sb.free_space_bitmap_bytes,
            },
        }
    }
}

/// Result of [`BTree::commit`]: what the caller puts in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// The generation committed.
    pub generation: u64,
    /// New root (superblock `tree_root_*`).
    pub root: RootInfo,
    /// New allocator state (superblock `alloc_next_unallocated`,
    /// `free_space_bitmap_*`).
    pub alloc: AllocInfo,
    /// False when nothing changed since the last commit: no I/O was done and
    /// root and allocator are the previous ones.
    pub changed: bool,
    /// Nodes written (tree nodes and bitmap nodes).
    pub nodes_written: u64,
    /// Nodes this commit freed; reusable after
    /// [`BTree::release_pending`]`(generation)`.
    pub pending_free_nodes: u64,
    /// In-memory bytes of the dirty nodes this commit wrote: what the
    /// transaction pinned until now ([`CacheStats::dirty_bytes`] before the
    /// commit).
    pub dirty_bytes: u64,
}

impl CommitInfo {
    /// Copies root and allocator fields into `sb` (the caller sets the
    /// superblock's own generation and writes it durably).
    pub fn apply_to(&self, sb: &mut Superblock) {
        sb.tree_root_addr = self.root.addr;
        sb.tree_root_level = self.root.level;
        sb.tree_root_generation = self.root.generation;
        sb.alloc_next_unallocated = self.alloc.next_unallocated;
        sb.free_space_bitmap_addr = self.alloc.bitmap_addr;
        sb.free_space_bitmap_bytes = self.alloc.bitmap_bytes;
    }
}

/// A reference to a node: address, expected level and generation (0 while
/// the node is dirty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ptr {
    pub addr: u64,
    pub level: u8,
    pub generation: u64,
}

/// The mutable part of the tree, behind the lock.
#[derive(Debug)]
pub(crate) struct State {
    /// Working root (uncommitted changes included).
    pub root: Option<Ptr>,
    /// Last committed root.
    pub committed: RootInfo,
    /// Last committed allocator state.
    pub committed_alloc: AllocInfo,
    /// Nodes written by the open transaction, pinned until commit.
    pub dirty: HashMap<u64, Arc<Node>>,
    pub dirty_bytes: usize,
    pub alloc: Allocator,
    pub last_generation: u64,
    /// True when the open transaction changed something.
    pub changed: bool,
    pub poisoned: Option<String>,
    pub failed: Option<(u64, BTreeError)>,
}

/// The node region's space as the last call that changed the tree left
/// it ([`BTree::space`]): published at the end of every mutation, commit,
/// abort and release, so that it is read without the tree's lock (a
/// commit's apply holds that for long) and is always the state between
/// two calls, never the middle of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeSpace {
    /// Slots (nodes) of the node region.
    pub region_nodes: u64,
    /// Slots free now (the allocator may hand them out).
    pub free_nodes: u64,
    /// Slots freed by commits and reusable only after their superblock.
    pub pending_nodes: u64,
    /// Nodes written by the open transaction (allocated, not committed).
    pub dirty_nodes: u64,
    /// Nodes reachable from the working root: the committed ones the open
    /// transaction did not replace, plus its dirty ones.
    pub working_nodes: u64,
    /// Levels of the working tree (0: empty).
    pub levels: u64,
    /// Slots of the bitmap run a commit writes.
    pub run_nodes: u64,
    /// Slots of the spare windows the next commits write their bitmap
    /// runs into (`run_nodes` each, counted neither free nor working), or
    /// 0 when there is none (a run then takes free slots, first fit).
    pub spare_nodes: u64,
    /// The "no spare window" fallback is in force: the bitmap run of the
    /// next commit (or of the running one) has no spare window and goes
    /// first fit ([`crate::btree::AllocCounts::run_first_fit`]).
    pub run_first_fit: bool,
    /// Committed nodes the open transaction replaced: pending once it
    /// commits, free after its superblock (`release_pending`).
    pub replaced_nodes: u64,
}

impl TreeSpace {
    fn of(st: &State) -> TreeSpace {
        let c: AllocCounts = st.alloc.counts();
        let dirty_nodes = st.dirty.len() as u64;
        let used = c.region_nodes - c.free_nodes;
        TreeSpace {
            region_nodes: c.region_nodes,
            free_nodes: c.free_nodes,
            pending_nodes: c.pending_nodes,
            dirty_nodes,
            working_nodes: used
                - c.pending_nodes
                - c.committed_run_nodes
                - c.txn_freed_nodes
                - c.spare_nodes,
            levels: st.root.map_or(0, |r| u64::from(r.level) + 1),
            run_nodes: c.run_nodes,
            spare_nodes: c.spare_nodes,
            run_first_fit: c.run_first_fit,
            replaced_nodes: c.txn_freed_nodes,
        }
    }
}

/// The copy-on-write B+tree; see the module docs of `crate::btree`.
#[derive(Debug)]
pub struct BTree<S: Storage> {
    pub(crate) storage: S,
    pub(crate) config: TreeConfig,
    pub(crate) fs_id: FsId,
    pub(crate) cache: NodeCache,
    pub(crate) state: RwLock<State>,
    space: Mutex<TreeSpace>,
}

/// A node being used: dirty (owned by the writer) or cached (holding a
/// reference on its cache slot).
pub(crate) enum Handle<'a> {
    Dirty(Arc<Node>),
    Cached(CacheRef<'a>),
}

impl Handle<'_> {
    /// The node, releasing the cache reference.
    pub(crate) fn into_arc(self) -> Arc<Node> {
        match self {
            Handle::Dirty(n) => n,
            Handle::Cached(r) => Arc::clone(r.node()),
        }
    }
}

impl Deref for Handle<'_> {
    type Target = Node;
    fn deref(&self) -> &Node {
        match self {
            Handle::Dirty(n) => n,
            Handle::Cached(r) => r.node(),
        }
    }
}

impl<S: Storage> BTree<S> {
    /// Opens the tree committed at `location` (read from the newest valid
    /// superblock). Reads the allocator's bitmap run and the root node and
    /// checks both; on an empty tree (root address 0) there is no bitmap.
    /// Then picks the allocator's spare windows (`docs/btree.md`,
    /// "Allocator").
    pub fn open(
        storage: S,
        location: TreeLocation,
        config: TreeConfig,
    ) -> Result<Self, BTreeError> {
        config.check()?;
        let root = location.root;
        if (root.addr == 0) != (location.alloc.bitmap_addr == 0) {
            return Err(BTreeError::corrupt(
                root.addr,
                root.generation,
                format!(
                    "root address {} and free-space bitmap address {} must be both zero or both \
                     set",
                    root.addr, location.alloc.bitmap_addr
                ),
            ));
        }
        if root.addr == 0 && (root.level != 0 || root.generation != 0) {
            return Err(BTreeError::Config {
                field: "root",
                reason: format!(
                    "empty tree with level {} generation {}",
                    root.level, root.generation
                ),
            });
        }
        // The allocator holds a bit per slot of the region: a region that
        // a corrupt superblock claims beyond the device must be refused
        // before it sizes that allocation.
        let device_bytes = storage.geometry().size_bytes;
        let region_end = location
            .node_region_start
            .checked_add(location.node_region_bytes);
        if region_end.is_none_or(|end| end > device_bytes) {
            return Err(BTreeError::Config {
                field: "node region",
                reason: format!(
                    "{}+{} ends beyond the device's {device_bytes} bytes",
                    location.node_region_start, location.node_region_bytes
                ),
            });
        }
        let mut alloc = Allocator::load(
            location.node_region_start,
            location.node_region_bytes,
            location.alloc,
            &location.fs_id,
            root.generation,
            |addr, buf| {
                storage.read(addr, buf).map_err(|e| {
                    BTreeError::storage(format!("read free-space bitmap at {addr}"), e)
                })
            },
        )?;
        let root_ptr = (root.addr != 0).then_some(Ptr {
            addr: root.addr,
            level: root.level,
            generation: root.generation,
        });
        if let Some(ptr) = root_ptr {
            match alloc.slot_of(ptr.addr) {
                Some(slot) if alloc.is_set(slot) => {}
                _ => {
                    return Err(BTreeError::corrupt(
                        ptr.addr,
                        ptr.generation,
                        "root is not an allocated slot of the node region",
                    ))
                }
            }
        }
        // Before any node is allocated: the windows the next commits write
        // their bitmap runs into. A region fragmented before spares
        // existed may have none: `TreeSpace::spare_nodes` is then 0 (the
        // durable engine's open says so) and runs are placed first fit
        // until a released run becomes a spare.
        alloc.pick_spares();
        let tree = BTree {
            cache: NodeCache::new(config.cache_bytes),
            config,
            fs_id: location.fs_id,
            storage,
            state: RwLock::new(State {
                root: root_ptr,
                committed: root,
                committed_alloc: location.alloc,
                dirty: HashMap::new(),
                dirty_bytes: 0,
                alloc,
                last_generation: root.generation,
                changed: false,
                poisoned: None,
                failed: None,
            }),
            space: Mutex::new(TreeSpace::default()),
        };
        tree.publish_space(&tree.lock_read());
        if let Some(ptr) = root_ptr {
            let st = tree.read_state()?;
            tree.node(&st, ptr)?;
        }
        Ok(tree)
    }

    /// Opens the tree recorded in `sb`.
    pub fn open_superblock(
        storage: S,
        sb: &Superblock,
        config: TreeConfig,
    ) -> Result<Self, BTreeError> {
        Self::open(storage, TreeLocation::from_superblock(sb), config)
    }

    /// The node region's space after the last call that changed the tree
    /// ([`TreeSpace`]); takes no tree lock.
    pub fn space(&self) -> TreeSpace {
        *self.space.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the space of `st` (the caller holds the write lock).
    pub(crate) fn publish_space(&self, st: &State) {
        *self.space.lock().unwrap_or_else(|e| e.into_inner()) = TreeSpace::of(st);
    }

    /// The storage the tree lives on.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The configuration.
    pub fn config(&self) -> TreeConfig {
        self.config
    }

    /// Cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The last committed root (what the superblock should hold).
    pub fn committed_root(&self) -> RootInfo {
        self.lock_read().committed
    }

    /// The last committed generation (or the opened root's generation).
    pub fn last_generation(&self) -> u64 {
        self.lock_read().last_generation
    }

    /// True when there are uncommitted changes.
    pub fn has_changes(&self) -> bool {
        self.lock_read().changed
    }

    pub(crate) fn lock_read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(st: &State) -> Result<(), BTreeError> {
        if let Some((generation, e)) = &st.failed {
            return Err(BTreeError::Failed {
                generation: *generation,
                source: Box::new(e.clone()),
            });
        }
        if let Some(reason) = &st.poisoned {
            return Err(BTreeError::Poisoned {
                reason: reason.clone(),
            });
        }
        Ok(())
    }

    pub(crate) fn read_state(&self) -> Result<RwLockReadGuard<'_, State>, BTreeError> {
        let st = self.lock_read();
        Self::usable(&st)?;
        Ok(st)
    }

    pub(crate) fn write_state(&self) -> Result<RwLockWriteGuard<'_, State>, BTreeError> {
        let st = self.lock_write();
        Self::usable(&st)?;
        Ok(st)
    }

    /// Reads and fully decodes the node `ptr` from storage.
    pub(crate) fn read_node(&self, ptr: Ptr) -> Result<Node, BTreeError> {
        let mut buf = vec![0u8; NODE_BYTES];
        self.storage
            .read(ptr.addr, &mut buf)
            .map_err(|e| BTreeError::storage(format!("read node at {}", ptr.addr), e))?;
        Node::decode(
            &buf,
            &self.fs_id,
            ptr.addr,
            ptr.generation,
            ptr.level,
            self.config.owner,
        )
    }

    /// The node `ptr`: dirty from the writer's map, else through the cache.
    /// A cached node is checked against the generation and level recorded
    /// by the referrer on every use, not only when read.
    pub(crate) fn node(&self, st: &State, ptr: Ptr) -> Result<Handle<'_>, BTreeError> {
        if let Some(n) = st.dirty.get(&ptr.addr) {
            return Ok(Handle::Dirty(Arc::clone(n)));
        }
        if st.alloc.slot_of(ptr.addr).is_none() {
            return Err(BTreeError::corrupt(
                ptr.addr,
                ptr.generation,
                "node address is not a slot of the node region",
            ));
        }
        let r = self.cache.get(ptr.addr, || self.read_node(ptr))?;
        let n = r.node();
        if n.generation != ptr.generation {
            return Err(BTreeError::Node {
                addr: ptr.addr,
                expected_generation: ptr.generation,
                source: crate::format::FormatError::GenerationMismatch {
                    what: crate::format::BlockKind::Node,
                    addr: ptr.addr,
                    expected: ptr.generation,
                    found: n.generation,
                },
            });
        }
        if n.level != ptr.level {
            return Err(BTreeError::corrupt(
                ptr.addr,
                ptr.generation,
                format!("cached level {} where {} is expected", n.level, ptr.level),
            ));
        }
        Ok(Handle::Cached(r))
    }

    /// The value of `key` in the working tree.
    pub fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, BTreeError> {
        let st = self.read_state()?;
        self.get_locked(&st, key)
    }

    pub(crate) fn get_locked(&self, st: &State, key: &Key) -> Result<Option<Vec<u8>>, BTreeError> {
        let Some(mut ptr) = st.root else {
            return Ok(None);
        };
        loop {
            let h = self.node(st, ptr)?;
            match &h.body {
                Body::Leaf(items) => {
                    return Ok(items
                        .binary_search_by(|(k, _)| k.cmp(key))
                        .ok()
                        .map(|i| items[i].1.clone()));
                }
                Body::Internal(children) => {
                    let c = children[route(children, key)];
                    ptr = Ptr {
                        addr: c.addr,
                        level: h.level - 1,
                        generation: c.generation,
                    };
                }
            }
        }
    }

    /// The greatest key below `key` in the working tree (`None`: no key is
    /// below it). One descent, and one more down the nearest subtree to
    /// the left when the path's leaf has no key below `key`.
    pub fn last_below(&self, key: &Key) -> Result<Option<Key>, BTreeError> {
        let st = self.read_state()?;
        let Some(mut ptr) = st.root else {
            return Ok(None);
        };
        let child = |c: &super::node::Child, level: u8| Ptr {
            addr: c.addr,
            level: level - 1,
            generation: c.generation,
        };
        // The nearest subtree left of the path: every key in it is below
        // `key`, and above every key further left.
        let mut left = None;
        loop {
            let h = self.node(&st, ptr)?;
            match &h.body {
                Body::Leaf(items) => {
                    let below = items.partition_point(|(k, _)| k < key);
                    if below > 0 {
                        return Ok(Some(items[below - 1].0));
                    }
                    break;
                }
                Body::Internal(children) => {
                    let i = route(children, key);
                    if i > 0 {
                        left = Some(child(&children[i - 1], h.level));
                    }
                    ptr = child(&children[i], h.level);
                }
            }
        }
        let Some(mut ptr) = left else {
            return Ok(None);
        };
        loop {
            let h = self.node(&st, ptr)?;
            match &h.body {
                Body::Leaf(items) => return Ok(items.last().map(|(k, _)| *k)),
                Body::Internal(children) => match children.last() {
                    Some(c) => ptr = child(c, h.level),
                    None => return Ok(None),
                },
            }
        }
    }

    /// Iterates the items with keys in `range`, ascending. See the module
    /// docs for what a scan sees when the writer runs concurrently.
    pub fn range(&self, range: impl RangeBounds<Key>) -> Range<'_, S> {
        let (next, skip) = match range.start_bound() {
            Bound::Included(k) => (Some(*k), None),
            Bound::Excluded(k) => (Some(*k), Some(*k)),
            Bound::Unbounded => (Some(Key::MIN), None),
        };
        Range {
            tree: self,
            next,
            skip,
            end: range.end_bound().cloned(),
            buf: Vec::new().into_iter(),
        }
    }

    /// One leaf's items from `from` (inclusive) up to `end`, and the first
    /// key of the next leaf (None at the last leaf).
    fn leaf_batch(
        &self,
        from: &Key,
        end: &Bound<Key>,
    ) -> Result<(Vec<LeafItem>, Option<Key>), BTreeError> {
        let st = self.read_state()?;
        let Some(mut ptr) = st.root else {
            return Ok((Vec::new(), None));
        };
        let mut upper = None;
        loop {
            let h = self.node(&st, ptr)?;
            match &h.body {
                Body::Leaf(items) => {
                    let start = items.partition_point(|(k, _)| k < from);
                    let out = items[start..]
                        .iter()
                        .take_while(|(k, _)| before_end(k, end))
                        .cloned()
                        .collect();
                    return Ok((out, upper));
                }
                Body::Internal(children) => {
                    let i = route(children, from);
                    if let Some(next) = children.get(i + 1) {
                        upper = Some(next.key);
                    }
                    let c = children[i];
                    ptr = Ptr {
                        addr: c.addr,
                        level: h.level - 1,
                        generation: c.generation,
                    };
                }
            }
        }
    }

    /// Discards every uncommitted change and returns to the last commit;
    /// also clears the poisoned state left by a failed mutation.
    pub fn abort(&self) -> Result<(), BTreeError> {
        let mut st = self.lock_write();
        if let Some((generation, e)) = &st.failed {
            return Err(BTreeError::Failed {
                generation: *generation,
                source: Box::new(e.clone()),
            });
        }
        let dirty: Vec<u64> = st.dirty.drain().map(|(a, _)| a).collect();
        st.dirty_bytes = 0;
        self.cache.set_dirty_bytes(0);
        if let Err(e) = st.alloc.abort(dirty) {
            st.failed = Some((st.last_generation, e.clone()));
            return Err(e);
        }
        let c = st.committed;
        st.root = (c.addr != 0).then_some(Ptr {
            addr: c.addr,
            level: c.level,
            generation: c.generation,
        });
        st.changed = false;
        st.poisoned = None;
        self.publish_space(&st);
        Ok(())
    }

    /// Writes every dirty node and the new bitmap run in ascending address
    /// order through `write_batch` (batches of
    /// [`TreeConfig::write_batch_nodes`]), then `flush`, and returns the new
    /// root and allocator state for the superblock.
    ///
    /// `generation` is written into every new node and must be above every
    /// earlier commit's (normally the generation of the superblock the
    /// caller writes next). **The caller must then write the superblock
    /// durably and only after that call [`BTree::release_pending`]**: until
    /// the superblock is durable, the previous superblock's tree is the one
    /// recovery opens, and its nodes must stay intact.
    ///
    /// Any failure here is fatal for this handle ([`BTreeError::Failed`]):
    /// reopen from the newest valid superblock.
    pub fn commit(&self, generation: u64) -> Result<CommitInfo, BTreeError> {
        let mut st = self.write_state()?;
        if generation <= st.last_generation {
            return Err(BTreeError::GenerationNotIncreasing {
                generation,
                last: st.last_generation,
            });
        }
        if !st.changed {
            st.last_generation = generation;
            return Ok(CommitInfo {
                generation,
                root: st.committed,
                alloc: st.committed_alloc,
                changed: false,
                nodes_written: 0,
                pending_free_nodes: 0,
                dirty_bytes: 0,
            });
        }
        let result = self.commit_locked(&mut st, generation);
        self.publish_space(&st);
        match result {
            Ok(info) => Ok(info),
            Err(e) => {
                st.failed = Some((generation, e.clone()));
                Err(BTreeError::Failed {
                    generation,
                    source: Box::new(e),
                })
            }
        }
    }

    fn commit_locked(&self, st: &mut State, generation: u64) -> Result<CommitInfo, BTreeError> {
        // Fill in the generation of every dirty node and of every pointer to
        // a dirty node.
        let mut addrs: Vec<u64> = st.dirty.keys().copied().collect();
        addrs.sort_unstable();
        for addr in &addrs {
            let arc = st.dirty.get_mut(addr).expect("dirty node vanished");
            let node = Arc::make_mut(arc);
            node.generation = generation;
            if let Body::Internal(children) = &mut node.body {
                for c in children {
                    if addrs.binary_search(&c.addr).is_ok() {
                        c.generation = generation;
                    }
                }
            }
        }
        let run_first = st.alloc.prepare_commit(st.root.is_none())?;
        // Freed by this transaction, old bitmap run included.
        let pending_free_nodes = st.alloc.txn_freed_slots().len() as u64;
        let run = st.alloc.encode_run(self.fs_id, generation)?;
        if run_first.is_some() {
            for (addr, _) in &run {
                self.cache.invalidate(*addr)?;
            }
        }

        // Merge the two sorted address lists and write in batches.
        let mut order: Vec<(u64, Option<usize>)> = addrs.iter().map(|&a| (a, None)).collect();
        order.extend(run.iter().enumerate().map(|(i, (a, _))| (*a, Some(i))));
        order.sort_unstable_by_key(|&(a, _)| a);
        let batch_nodes = self.config.write_batch_nodes;
        let buf_bytes = batch_nodes.min(order.len()).max(1) * NODE_BYTES;
        let write_err = |chunk: &[(u64, Option<usize>)], e| {
            BTreeError::storage(
                format!(
                    "write {} node(s) at {}..{} for generation {generation}",
                    chunk.len(),
                    chunk[0].0,
                    chunk[chunk.len() - 1].0 + NODE_BYTES as u64
                ),
                e,
            )
        };
        // Nodes are encoded on this thread while a writer thread writes the
        // previous batch (two buffers), and adjacent addresses go out as one
        // write: encoding and I/O overlap, and a batch of mostly contiguous
        // slots is a few large writes instead of one per node.
        let dirty = &st.dirty;
        std::thread::scope(|scope| -> Result<(), BTreeError> {
            let (to_writer, batches) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(1);
            let (to_encoder, free_bufs) = std::sync::mpsc::channel::<Vec<u8>>();
            let order = &order;
            let writer = scope.spawn(move || -> Result<(), BTreeError> {
                for (buf, k) in batches {
                    let chunk = &order[k * batch_nodes..((k + 1) * batch_nodes).min(order.len())];
                    let mut writes: Vec<(u64, &[u8])> = Vec::new();
                    let mut i = 0;
                    while i < chunk.len() {
                        let mut j = i + 1;
                        while j < chunk.len() && chunk[j].0 == chunk[j - 1].0 + NODE_BYTES as u64 {
                            j += 1;
                        }
                        writes.push((chunk[i].0, &buf[i * NODE_BYTES..j * NODE_BYTES]));
                        i = j;
                    }
                    self.storage
                        .write_batch(&writes)
                        .map_err(|e| write_err(chunk, e))?;
                    drop(writes);
                    // The encoder may be gone (it failed): nothing to return.
                    let _ = to_encoder.send(buf);
                }
                Ok(())
            });
            let mut spare = 2usize;
            for (k, chunk) in order.chunks(batch_nodes).enumerate() {
                let mut buf = if spare > 0 {
                    spare -= 1;
                    vec![0u8; buf_bytes]
                } else {
                    match free_bufs.recv() {
                        Ok(buf) => buf,
                        // The writer stopped on an error: its join says which.
                        Err(_) => break,
                    }
                };
                for (i, &(addr, run_index)) in chunk.iter().enumerate() {
                    let slice = &mut buf[i * NODE_BYTES..(i + 1) * NODE_BYTES];
                    match run_index {
                        Some(r) => slice.copy_from_slice(&run[r].1),
                        None => {
                            let node = dirty.get(&addr).expect("dirty node vanished");
                            node.encode_into(slice, self.fs_id, addr, self.config.owner)?;
                        }
                    }
                }
                if to_writer.send((buf, k)).is_err() {
                    break;
                }
            }
            drop(to_writer);
            writer.join().expect("node writer panicked")
        })?;
        self.storage.flush().map_err(|e| {
            BTreeError::storage(format!("flush after writing generation {generation}"), e)
        })?;

        // Durable: the dirty nodes become clean cached nodes.
        let dirty_bytes = st.dirty_bytes as u64;
        for addr in &addrs {
            if let Some(node) = st.dirty.remove(addr) {
                self.cache.insert(*addr, node)?;
            }
        }
        st.dirty_bytes = 0;
        self.cache.set_dirty_bytes(0);
        st.alloc.finish_commit(generation);
        let root = match st.root {
            None => RootInfo::default(),
            Some(mut ptr) => {
                if addrs.binary_search(&ptr.addr).is_ok() {
                    ptr.generation = generation;
                    st.root = Some(ptr);
                }
                RootInfo {
                    addr: ptr.addr,
                    level: ptr.level,
                    generation: ptr.generation,
                }
            }
        };
        let alloc = st.alloc.info();
        st.committed = root;
        st.committed_alloc = alloc;
        st.last_generation = generation;
        st.changed = false;
        Ok(CommitInfo {
            generation,
            root,
            alloc,
            changed: true,
            nodes_written: order.len() as u64,
            dirty_bytes,
            pending_free_nodes,
        })
    }

    /// Makes the nodes freed by every commit up to `generation` reusable.
    /// Call it only after the superblock of that commit is durable. Returns
    /// the number of nodes released.
    ///
    /// The released nodes still cached are dropped on a short-lived thread
    /// (a uniformly updated tree of a million extents releases ~10k
    /// leaves, millions of values: ~70 ms of frees measured on the
    /// committing thread, which delayed the next commit).
    pub fn release_pending(&self, generation: u64) -> Result<u64, BTreeError> {
        let mut st = self.write_state()?;
        let released = st.alloc.release_pending(generation);
        self.publish_space(&st);
        let mut nodes = Vec::with_capacity(released.len());
        for addr in &released {
            nodes.extend(self.cache.invalidate(*addr)?);
        }
        drop(st);
        refd_sync::background::drop_later(nodes, DEFERRED_DROP_NODES_MIN);
        Ok(released.len() as u64)
    }
}

/// Released nodes from which [`BTree::release_pending`] drops them on
/// another thread.
const DEFERRED_DROP_NODES_MIN: usize = 256;

fn before_end(key: &Key, end: &Bound<Key>) -> bool {
    match end {
        Bound::Included(e) => key <= e,
        Bound::Excluded(e) => key < e,
        Bound::Unbounded => true,
    }
}

/// Iterator returned by [`BTree::range`]; yields `(key, value)` in ascending
/// key order, or the first error (then ends).
#[derive(Debug)]
pub struct Range<'a, S: Storage> {
    tree: &'a BTree<S>,
    /// Where the next leaf fetch starts (inclusive); None when done.
    next: Option<Key>,
    /// A start bound that is excluded.
    skip: Option<Key>,
    end: Bound<Key>,
    buf: std::vec::IntoIter<LeafItem>,
}

impl<S: Storage> Iterator for Range<'_, S> {
    type Item = Result<(Key, Vec<u8>), BTreeError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.buf.next() {
                if self.skip == Some(item.0) {
                    continue;
                }
                return Some(Ok(item));
            }
            let from = self.next.take()?;
            if !before_end(&from, &self.end) {
                return None;
            }
            match self.tree.leaf_batch(&from, &self.end) {
                Ok((items, upper)) => {
                    self.buf = items.into_iter();
                    self.next = upper;
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
