//! Mutations. Single-key `insert`/`update`/`delete` and bulk
//! [`BTree::apply_sorted`] share one path: the sorted changes are
//! partitioned among the children of each node on the way down, so every
//! touched root-to-leaf path is rewritten once per call however many
//! changes land in it.
//!
//! Copy-on-write: a node is never modified where a commit wrote it. Its
//! new content goes to freshly allocated slots (dirty nodes, pinned in the
//! writer's map until commit), and its old slot is freed: at once if it
//! was dirty (never written), else *pending* until the commit that drops it
//! is durable and released.
//!
//! Shape rules, applied bottom-up on the way back:
//!
//! - a node whose items exceed the items area is split by
//!   [`plan_split`](crate::btree::node) into pieces of more than a quarter
//!   each (sorted bulk inserts give nearly full nodes);
//! - an empty node disappears from its parent;
//! - a touched non-root node below [`NODE_FILL_MIN_BYTES`] is merged with a
//!   neighbour and the pair re-split if needed (merge or borrow in one
//!   step), until it is not underfull or is its parent's only child;
//! - the root grows a level while there is more than one piece, and
//!   shrinks while it is an internal node with one child.
//!
//! A failure half-way (I/O, no space) leaves the working tree unusable
//! ([`BTreeError::Poisoned`]) until [`BTree::abort`] returns to the last
//! commit; the committed tree is never affected.

use std::sync::Arc;

use crate::btree::error::BTreeError;
use crate::btree::key::Key;
use crate::btree::node::{
    leaf_item_bytes, plan_split, Body, Child, LeafItem, Node, INTERNAL_ITEM_BYTES,
    NODE_FILL_MIN_BYTES, VALUE_BYTES_MAX,
};
use crate::btree::tree::{BTree, Ptr, State};
use crate::format::{NODE_ITEMS_BYTES, TREE_LEVEL_MAX};
use crate::storage::Storage;

/// One change of [`BTree::apply_sorted`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Insert the value, or replace the existing one.
    Put(Vec<u8>),
    /// Remove the key if present.
    Delete,
}

/// What [`BTree::apply_sorted`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// `Put`s of absent keys.
    pub inserted: u64,
    /// `Put`s of present keys.
    pub replaced: u64,
    /// `Delete`s of present keys.
    pub deleted: u64,
    /// `Delete`s of absent keys (no-ops).
    pub absent: u64,
}

/// A dirty node produced by a rewrite: its first key and address.
#[derive(Debug, Clone, Copy)]
struct Piece {
    key: Key,
    addr: u64,
}

impl Piece {
    fn child(self) -> Child {
        Child {
            key: self.key,
            addr: self.addr,
            generation: 0,
        }
    }
}

fn check_value(key: &Key, value: &[u8]) -> Result<(), BTreeError> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(BTreeError::ValueTooLarge {
            key: *key,
            len_bytes: value.len(),
            max_bytes: VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

/// Merges sorted `changes` into sorted `items` (`len` of them). `owned`
/// turns a kept item into an owned one: the identity when the items are
/// ours, a clone when they are borrowed from a committed node; items that
/// a change replaces or deletes are never copied.
fn merge_leaf<T: std::borrow::Borrow<LeafItem>>(
    items: impl Iterator<Item = T>,
    len: usize,
    owned: impl Fn(T) -> LeafItem,
    changes: &mut [(Key, Change)],
    report: &mut ApplyReport,
) -> Vec<LeafItem> {
    let mut out = Vec::with_capacity(len + changes.len());
    let mut it = items.peekable();
    for (key, change) in changes.iter_mut() {
        while let Some(item) = it.next_if(|x| x.borrow().0 < *key) {
            out.push(owned(item));
        }
        let existed = it.next_if(|x| x.borrow().0 == *key).is_some();
        match change {
            Change::Put(value) => {
                if existed {
                    report.replaced += 1;
                } else {
                    report.inserted += 1;
                }
                out.push((*key, std::mem::take(value)));
            }
            Change::Delete => {
                if existed {
                    report.deleted += 1;
                } else {
                    report.absent += 1;
                }
            }
        }
    }
    out.extend(it.map(owned));
    out
}

/// True if applying `changes` to `items` changes anything (a `Put`, or a
/// `Delete` of a present key).
fn leaf_changes(items: &[LeafItem], changes: &[(Key, Change)]) -> bool {
    changes.iter().any(|(key, change)| match change {
        Change::Put(_) => true,
        Change::Delete => items.binary_search_by(|(k, _)| k.cmp(key)).is_ok(),
    })
}

impl<S: Storage> BTree<S> {
    /// Inserts `key`; fails with [`BTreeError::KeyExists`] if present.
    pub fn insert(&self, key: Key, value: Vec<u8>) -> Result<(), BTreeError> {
        check_value(&key, &value)?;
        let mut st = self.write_state()?;
        if self.get_locked(&st, &key)?.is_some() {
            return Err(BTreeError::KeyExists { key });
        }
        self.mutate(&mut st, vec![(key, Change::Put(value))])
            .map(|_| ())
    }

    /// Replaces the value of `key`; fails with [`BTreeError::NotFound`] if
    /// absent. Returns the old value.
    pub fn update(&self, key: Key, value: Vec<u8>) -> Result<Vec<u8>, BTreeError> {
        check_value(&key, &value)?;
        let mut st = self.write_state()?;
        let Some(old) = self.get_locked(&st, &key)? else {
            return Err(BTreeError::NotFound { key });
        };
        self.mutate(&mut st, vec![(key, Change::Put(value))])?;
        Ok(old)
    }

    /// Removes `key`; fails with [`BTreeError::NotFound`] if absent.
    /// Returns the removed value.
    pub fn delete(&self, key: &Key) -> Result<Vec<u8>, BTreeError> {
        let mut st = self.write_state()?;
        let Some(old) = self.get_locked(&st, key)? else {
            return Err(BTreeError::NotFound { key: *key });
        };
        self.mutate(&mut st, vec![(*key, Change::Delete)])?;
        Ok(old)
    }

    /// Applies strictly ascending changes, rewriting each touched path once.
    /// The input is validated (order, value sizes) before anything changes.
    pub fn apply_sorted(&self, changes: Vec<(Key, Change)>) -> Result<ApplyReport, BTreeError> {
        for (i, pair) in changes.windows(2).enumerate() {
            if pair[0].0 >= pair[1].0 {
                return Err(BTreeError::Unsorted {
                    index: i + 1,
                    key: pair[1].0,
                    prev: pair[0].0,
                });
            }
        }
        for (key, change) in &changes {
            if let Change::Put(value) = change {
                check_value(key, value)?;
            }
        }
        let mut st = self.write_state()?;
        self.mutate(&mut st, changes)
    }

    fn mutate(
        &self,
        st: &mut State,
        mut changes: Vec<(Key, Change)>,
    ) -> Result<ApplyReport, BTreeError> {
        let mut report = ApplyReport::default();
        let result = self.apply_locked(st, &mut changes, &mut report);
        self.cache.set_dirty_bytes(st.dirty_bytes);
        self.publish_space(st);
        match result {
            Ok(()) => Ok(report),
            Err(e) => {
                st.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn apply_locked(
        &self,
        st: &mut State,
        changes: &mut [(Key, Change)],
        report: &mut ApplyReport,
    ) -> Result<(), BTreeError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (pieces, level) = match st.root {
            None => {
                let items = merge_leaf(std::iter::empty::<LeafItem>(), 0, |i| i, changes, report);
                if items.is_empty() {
                    return Ok(());
                }
                (self.write_pieces(st, 0, Body::Leaf(items))?, 0)
            }
            Some(root) => match self.apply_rec(st, root, changes, report)? {
                None => return Ok(()),
                Some(pieces) => (pieces, root.level),
            },
        };
        st.changed = true;
        self.finish_root(st, pieces, level)
    }

    /// Applies `changes` (all routed to this subtree) to the node `ptr`.
    /// Returns `None` if nothing changed, else the dirty pieces replacing
    /// the node (possibly none).
    fn apply_rec(
        &self,
        st: &mut State,
        ptr: Ptr,
        changes: &mut [(Key, Change)],
        report: &mut ApplyReport,
    ) -> Result<Option<Vec<Piece>>, BTreeError> {
        let node = self.node(st, ptr)?.into_arc();
        match &node.body {
            Body::Leaf(items) => {
                if !leaf_changes(items, changes) {
                    report.absent += changes.len() as u64;
                    return Ok(None);
                }
                let merged = if st.dirty.contains_key(&ptr.addr) {
                    // Written by this commit: ours, its items are moved.
                    let items = match self.take(st, ptr, node)?.body {
                        Body::Leaf(items) => items,
                        // Levels are checked on every read.
                        Body::Internal(_) => unreachable!("leaf {} became internal", ptr.addr),
                    };
                    let len = items.len();
                    merge_leaf(items.into_iter(), len, |i| i, changes, report)
                } else {
                    // Committed: it stays as it is until this commit is
                    // durable (readers may hold it), so only the items
                    // kept are copied, not the ones being replaced.
                    self.retire(st, ptr.addr)?;
                    merge_leaf(items.iter(), items.len(), LeafItem::clone, changes, report)
                };
                if merged.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                self.write_pieces(st, 0, Body::Leaf(merged)).map(Some)
            }
            Body::Internal(children) => {
                let child_level = ptr.level - 1;
                let mut new_children = Vec::with_capacity(children.len() + 1);
                let mut changed = false;
                let mut rest = changes;
                for (i, c) in children.iter().enumerate() {
                    let n = match children.get(i + 1) {
                        Some(next) => rest.partition_point(|(k, _)| *k < next.key),
                        None => rest.len(),
                    };
                    let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n);
                    rest = tail;
                    if mine.is_empty() {
                        new_children.push(*c);
                        continue;
                    }
                    let cptr = Ptr {
                        addr: c.addr,
                        level: child_level,
                        generation: c.generation,
                    };
                    match self.apply_rec(st, cptr, mine, report)? {
                        None => new_children.push(*c),
                        Some(pieces) => {
                            changed = true;
                            new_children.extend(pieces.into_iter().map(Piece::child));
                        }
                    }
                }
                if !changed {
                    return Ok(None);
                }
                drop(node);
                self.rebalance(st, child_level, &mut new_children)?;
                self.retire(st, ptr.addr)?;
                if new_children.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                self.write_pieces(st, ptr.level, Body::Internal(new_children))
                    .map(Some)
            }
        }
    }

    /// Takes ownership of the content of node `ptr` (already loaded as
    /// `node`) and retires its slot.
    fn take(&self, st: &mut State, ptr: Ptr, node: Arc<Node>) -> Result<Node, BTreeError> {
        match self.retire(st, ptr.addr)? {
            Some(dirty) => {
                drop(node);
                Ok(Arc::unwrap_or_clone(dirty))
            }
            None => Ok(Arc::unwrap_or_clone(node)),
        }
    }

    /// Frees the slot of a node being replaced: at once if dirty (returns
    /// its content), else pending until the commit is durable.
    fn retire(&self, st: &mut State, addr: u64) -> Result<Option<Arc<Node>>, BTreeError> {
        match st.dirty.remove(&addr) {
            Some(node) => {
                st.dirty_bytes = st.dirty_bytes.saturating_sub(node.mem_bytes());
                st.alloc.free_dirty(addr)?;
                Ok(Some(node))
            }
            None => {
                st.alloc.free_committed(addr)?;
                Ok(None)
            }
        }
    }

    fn alloc_node(&self, st: &mut State) -> Result<u64, BTreeError> {
        let addr = st.alloc.alloc()?;
        // A slot released by an earlier commit may still be cached.
        self.cache.invalidate(addr)?;
        Ok(addr)
    }

    /// Splits `body` into nodes that fit, allocates and pins them.
    fn write_pieces(
        &self,
        st: &mut State,
        level: u8,
        body: Body,
    ) -> Result<Vec<Piece>, BTreeError> {
        let mut pieces = Vec::new();
        match body {
            Body::Leaf(items) => {
                let sizes: Vec<usize> = items.iter().map(leaf_item_bytes).collect();
                let plan = plan_split(&sizes, NODE_ITEMS_BYTES);
                let mut it = items.into_iter();
                for r in plan {
                    let chunk: Vec<LeafItem> = it.by_ref().take(r.len()).collect();
                    let key = chunk.first().expect("plan_split gives non-empty pieces").0;
                    let addr = self.alloc_node(st)?;
                    self.pin(st, addr, Node::leaf(chunk));
                    pieces.push(Piece { key, addr });
                }
            }
            Body::Internal(children) => {
                let sizes = vec![INTERNAL_ITEM_BYTES; children.len()];
                let plan = plan_split(&sizes, NODE_ITEMS_BYTES);
                for r in plan {
                    let chunk = children[r].to_vec();
                    let key = chunk
                        .first()
                        .expect("plan_split gives non-empty pieces")
                        .key;
                    let addr = self.alloc_node(st)?;
                    self.pin(st, addr, Node::internal(level, chunk));
                    pieces.push(Piece { key, addr });
                }
            }
        }
        Ok(pieces)
    }

    fn pin(&self, st: &mut State, addr: u64, node: Node) {
        st.dirty_bytes += node.mem_bytes();
        st.dirty.insert(addr, Arc::new(node));
    }

    /// Merges every touched (dirty) underfull child with a neighbour, and
    /// re-splits the pair if it does not fit one node.
    fn rebalance(
        &self,
        st: &mut State,
        child_level: u8,
        children: &mut Vec<Child>,
    ) -> Result<(), BTreeError> {
        let mut i = 0;
        while i < children.len() && children.len() > 1 {
            let underfull = st
                .dirty
                .get(&children[i].addr)
                .is_some_and(|n| n.used_bytes() < NODE_FILL_MIN_BYTES);
            if !underfull {
                i += 1;
                continue;
            }
            let (l, r) = if i + 1 < children.len() {
                (i, i + 1)
            } else {
                (i - 1, i)
            };
            let lp = self.child_ptr(children[l], child_level);
            let rp = self.child_ptr(children[r], child_level);
            let left = self.node(st, lp)?.into_arc();
            let left = self.take(st, lp, left)?;
            let right = self.node(st, rp)?.into_arc();
            let right = self.take(st, rp, right)?;
            let body = match (left.body, right.body) {
                (Body::Leaf(mut a), Body::Leaf(b)) => {
                    a.extend(b);
                    Body::Leaf(a)
                }
                (Body::Internal(mut a), Body::Internal(b)) => {
                    a.extend(b);
                    Body::Internal(a)
                }
                // Both were read at `child_level`, checked on read.
                _ => unreachable!(
                    "siblings {} and {} at level {child_level} differ in kind",
                    lp.addr, rp.addr
                ),
            };
            let pieces = self.write_pieces(st, child_level, body)?;
            children.splice(l..=r, pieces.into_iter().map(Piece::child));
            i = l;
        }
        Ok(())
    }

    fn child_ptr(&self, c: Child, level: u8) -> Ptr {
        Ptr {
            addr: c.addr,
            level,
            generation: c.generation,
        }
    }

    /// Installs the pieces left at the top as the new root: none is an
    /// empty tree, several grow new levels, an internal root with one child
    /// is replaced by that child.
    fn finish_root(
        &self,
        st: &mut State,
        mut pieces: Vec<Piece>,
        mut level: u8,
    ) -> Result<(), BTreeError> {
        while pieces.len() > 1 {
            if level >= TREE_LEVEL_MAX {
                return Err(BTreeError::TooDeep {
                    level: level + 1,
                    max: TREE_LEVEL_MAX,
                });
            }
            let children = pieces.into_iter().map(Piece::child).collect();
            level += 1;
            pieces = self.write_pieces(st, level, Body::Internal(children))?;
        }
        let Some(top) = pieces.first() else {
            st.root = None;
            return Ok(());
        };
        let mut root = Ptr {
            addr: top.addr,
            level,
            generation: 0,
        };
        while root.level > 0 {
            let node = self.node(st, root)?.into_arc();
            let only = match &node.body {
                Body::Internal(children) if children.len() == 1 => children[0],
                _ => break,
            };
            drop(node);
            self.retire(st, root.addr)?;
            root = self.child_ptr(only, root.level - 1);
        }
        st.root = Some(root);
        Ok(())
    }
}
