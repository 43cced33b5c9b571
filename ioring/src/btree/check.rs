//! [`BTree::check`]: the fsck walk of the committed tree on the device.

use std::collections::HashSet;

use crate::btree::alloc::Allocator;
use crate::btree::error::BTreeError;
use crate::btree::key::Key;
use crate::btree::node::{Body, Node, NODE_FILL_MIN_BYTES};
use crate::btree::tree::BTree;
use crate::format::NODE_BYTES;
use crate::storage::Storage;

/// Nodes read per `read_batch` by the check walk.
pub const CHECK_READ_BATCH_NODES: usize = 64;

/// What [`BTree::check`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeCheck {
    /// Generation of the committed root (0 for an empty tree).
    pub root_generation: u64,
    /// Levels (0 for an empty tree, 1 for a single leaf).
    pub levels: u8,
    /// Reachable nodes.
    pub nodes: u64,
    /// Of which leaves.
    pub leaves: u64,
    /// Key/value items.
    pub items: u64,
    /// Bytes used by items in all nodes.
    pub item_bytes: u64,
    /// Non-root nodes below the fill minimum (allowed; reported).
    pub underfull_nodes: u64,
    /// Nodes of the committed bitmap run.
    pub bitmap_nodes: u64,
    /// Slots pending release (freed by commits not yet released).
    pub pending_free_nodes: u64,
    /// Dirty nodes of the open transaction.
    pub dirty_nodes: u64,
    /// Slots of the node region.
    pub region_nodes: u64,
}

/// A node to visit and what its referrer says about it.
struct Expect {
    addr: u64,
    generation: u64,
    level: u8,
    /// Exact first key (the parent's separator); None for the root.
    first: Option<Key>,
    /// Exclusive upper bound of its keys.
    upper: Option<Key>,
}

impl<S: Storage> BTree<S> {
    /// Walks every node of the **committed** tree as it is on the device
    /// (not through the cache) and verifies: checksum, claimed address and
    /// header fields; the generation recorded by the parent or superblock;
    /// level and owner; item layout; keys strictly ascending within a node,
    /// first key equal to the parent's separator and every key below the
    /// next separator; no node referenced twice; root shape. Then checks
    /// the allocator: the bitmap run on the device marks exactly the
    /// reachable nodes and itself, and the in-memory allocator additionally
    /// exactly the pending and dirty nodes and the spare windows. The
    /// first inconsistency is returned as an error.
    pub fn check(&self) -> Result<TreeCheck, BTreeError> {
        let st = self.lock_read();
        let root = st.committed;
        let alloc = &st.alloc;
        let mut out = TreeCheck {
            root_generation: root.generation,
            region_nodes: alloc.node_count(),
            dirty_nodes: st.dirty.len() as u64,
            ..TreeCheck::default()
        };
        let mut reachable: HashSet<u64> = HashSet::new();
        let mut frontier = Vec::new();
        if root.addr != 0 {
            frontier.push(Expect {
                addr: root.addr,
                generation: root.generation,
                level: root.level,
                first: None,
                upper: None,
            });
            out.levels = root.level + 1;
        }
        let mut buf = vec![0u8; CHECK_READ_BATCH_NODES * NODE_BYTES];
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for chunk in frontier.chunks(CHECK_READ_BATCH_NODES) {
                for e in chunk {
                    let Some(slot) = alloc.slot_of(e.addr) else {
                        return Err(BTreeError::corrupt(
                            e.addr,
                            e.generation,
                            "node address is not a slot of the node region",
                        ));
                    };
                    if !reachable.insert(slot) {
                        return Err(BTreeError::corrupt(
                            e.addr,
                            e.generation,
                            "node is referenced twice",
                        ));
                    }
                }
                let mut reads: Vec<(u64, &mut [u8])> = chunk
                    .iter()
                    .zip(buf.chunks_mut(NODE_BYTES))
                    .map(|(e, b)| (e.addr, b))
                    .collect();
                self.storage.read_batch(&mut reads).map_err(|err| {
                    BTreeError::storage(
                        format!("check: read {} node(s) from {}", chunk.len(), chunk[0].addr),
                        err,
                    )
                })?;
                for (e, b) in chunk.iter().zip(buf.chunks(NODE_BYTES)) {
                    let node = Node::decode(
                        b,
                        &self.fs_id,
                        e.addr,
                        e.generation,
                        e.level,
                        self.config.owner,
                    )?;
                    self.check_node(e, &node, &mut out, &mut next)?;
                }
            }
            frontier = next;
        }

        // The bitmap run on the device.
        let info = st.committed_alloc;
        let disk = Allocator::load(
            self.region_start(&st),
            alloc.node_count() * NODE_BYTES as u64,
            info,
            &self.fs_id,
            root.generation,
            |addr, b| {
                self.storage.read(addr, b).map_err(|err| {
                    BTreeError::storage(format!("check: read bitmap run at {addr}"), err)
                })
            },
        )?;
        let run: Vec<u64> = match disk.run() {
            Some((first, count)) => (first..first + count).collect(),
            None => Vec::new(),
        };
        out.bitmap_nodes = run.len() as u64;
        let mut expect: Vec<u64> = reachable
            .iter()
            .copied()
            .chain(run.iter().copied())
            .collect();
        expect.sort_unstable();
        let on_disk: Vec<u64> = disk.set_slots().collect();
        compare_sets(
            "bitmap on the device",
            info.bitmap_addr,
            root.generation,
            &expect,
            &on_disk,
        )?;

        // The in-memory allocator.
        let pending: Vec<u64> = alloc.pending_slots().collect();
        out.pending_free_nodes = pending.len() as u64;
        let mut dirty = Vec::with_capacity(st.dirty.len());
        for addr in st.dirty.keys() {
            match alloc.slot_of(*addr) {
                Some(slot) => dirty.push(slot),
                None => {
                    return Err(BTreeError::corrupt(
                        *addr,
                        0,
                        "dirty node outside the node region",
                    ))
                }
            }
        }
        let spare: Vec<u64> = alloc.spare_slots().collect();
        for &slot in pending.iter().chain(&dirty).chain(&spare) {
            if reachable.contains(&slot) || run.contains(&slot) {
                return Err(BTreeError::corrupt(
                    alloc.addr_of(slot),
                    0,
                    "a pending, dirty or spare slot is reachable from the committed root or in \
                     its bitmap run",
                ));
            }
        }
        let current_run: Vec<u64> = match alloc.run() {
            Some((first, count)) => (first..first + count).collect(),
            None => Vec::new(),
        };
        if current_run != run {
            return Err(BTreeError::corrupt(
                info.bitmap_addr,
                root.generation,
                "in-memory bitmap run differs from the committed one",
            ));
        }
        let mut expect_mem = expect;
        expect_mem.extend(pending.iter().chain(&dirty).chain(&spare));
        expect_mem.sort_unstable();
        let before = expect_mem.len();
        expect_mem.dedup();
        if expect_mem.len() != before {
            return Err(BTreeError::corrupt(
                info.bitmap_addr,
                root.generation,
                "a slot is two of pending, dirty and spare, or pending twice",
            ));
        }
        let in_memory: Vec<u64> = alloc.set_slots().collect();
        compare_sets(
            "in-memory allocator",
            info.bitmap_addr,
            root.generation,
            &expect_mem,
            &in_memory,
        )?;
        Ok(out)
    }

    fn region_start(&self, st: &crate::btree::tree::State) -> u64 {
        st.alloc.addr_of(0)
    }

    fn check_node(
        &self,
        e: &Expect,
        node: &Node,
        out: &mut TreeCheck,
        next: &mut Vec<Expect>,
    ) -> Result<(), BTreeError> {
        let corrupt = |reason: String| BTreeError::corrupt(e.addr, e.generation, reason);
        out.nodes += 1;
        let used = node.used_bytes();
        out.item_bytes += used as u64;
        if e.first.is_some() && used < NODE_FILL_MIN_BYTES {
            out.underfull_nodes += 1;
        }
        let first = node.first_key();
        if let (Some(expected), Some(found)) = (e.first, first) {
            if expected != found {
                return Err(corrupt(format!(
                    "first key {found} differs from the parent's separator {expected}"
                )));
            }
        }
        let last = match &node.body {
            Body::Leaf(items) => items.last().map(|i| i.0),
            Body::Internal(children) => children.last().map(|c| c.key),
        };
        if let (Some(upper), Some(last)) = (e.upper, last) {
            if last >= upper {
                return Err(corrupt(format!(
                    "key {last} is not below the parent's next separator {upper}"
                )));
            }
        }
        match &node.body {
            Body::Leaf(items) => {
                out.leaves += 1;
                out.items += items.len() as u64;
            }
            Body::Internal(children) => {
                if e.first.is_none() && children.len() < 2 {
                    return Err(corrupt("internal root with a single child".to_string()));
                }
                for (i, c) in children.iter().enumerate() {
                    next.push(Expect {
                        addr: c.addr,
                        generation: c.generation,
                        level: node.level - 1,
                        first: Some(c.key),
                        upper: children.get(i + 1).map(|n| n.key).or(e.upper),
                    });
                }
            }
        }
        Ok(())
    }
}

fn compare_sets(
    what: &str,
    addr: u64,
    generation: u64,
    expected: &[u64],
    found: &[u64],
) -> Result<(), BTreeError> {
    if expected == found {
        return Ok(());
    }
    let missing = expected.iter().find(|s| found.binary_search(s).is_err());
    let extra = found.iter().find(|s| expected.binary_search(s).is_err());
    Err(BTreeError::corrupt(
        addr,
        generation,
        format!(
            "{what} disagrees with the reachable nodes: {} slot(s) marked, {} expected; first \
             unmarked in-use slot {missing:?}, first marked unused slot {extra:?}",
            found.len(),
            expected.len()
        ),
    ))
}
