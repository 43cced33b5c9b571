//! The in-memory node and the item layout inside a 16 KiB node
//! (`docs/format.md`, "B+tree items").
//!
//! Items are packed from the start of the items area in ascending key order
//! and the rest of the area is zero:
//!
//! - leaf item: `objectid u64 | item_type u8 | offset u64 | value_len u16 |
//!   value` (19 + `value_len` bytes);
//! - internal item: `objectid u64 | item_type u8 | offset u64 | child_addr u64
//!   | child_generation u64` (33 bytes). The key is the first key of the
//!   child's subtree, exactly.
//!
//! A node is decoded completely (and its every byte checksummed by
//! [`NodeHeader::decode`]) before anything in it is used; decoding never
//! panics and reports every inconsistency with the node's address.

use std::ops::Range;

use crate::btree::error::BTreeError;
use crate::btree::key::{Key, KEY_BYTES};
use crate::format::le::{get_u64, put_u64};
use crate::format::{FsId, NodeHeader, NODE_BYTES, NODE_HEADER_BYTES, NODE_ITEMS_BYTES};

/// Bytes of a leaf item besides its value: key and `value_len`.
pub const LEAF_ITEM_OVERHEAD_BYTES: usize = KEY_BYTES + 2;
/// Bytes of an internal item: key, child address, child generation.
pub const INTERNAL_ITEM_BYTES: usize = KEY_BYTES + 16;
/// Largest leaf item (overhead + value): a quarter of the items area, so at
/// least four items fit in a leaf and a split never needs more than one
/// extra node per inserted item.
pub const LEAF_ITEM_BYTES_MAX: usize = NODE_ITEMS_BYTES / 4;
/// Largest value accepted by the tree (4061 bytes).
pub const VALUE_BYTES_MAX: usize = LEAF_ITEM_BYTES_MAX - LEAF_ITEM_OVERHEAD_BYTES;
/// Most children of an internal node (494).
pub const INTERNAL_CHILDREN_MAX: usize = NODE_ITEMS_BYTES / INTERNAL_ITEM_BYTES;
/// Most items of a leaf (858): every item takes at least its key and its
/// value length. A leaf claiming more is corrupt and is refused before
/// anything is allocated for its items.
pub const LEAF_ITEMS_MAX: usize = NODE_ITEMS_BYTES / LEAF_ITEM_OVERHEAD_BYTES;
/// A non-root node with fewer item bytes than this is underfull and is
/// merged with a neighbour when a mutation touches it.
pub const NODE_FILL_MIN_BYTES: usize = NODE_ITEMS_BYTES / 4;

// `plan_split` keeps every piece at least a quarter full only if every
// item takes at most a quarter of the items area.
const _: () = assert!(4 * LEAF_ITEM_BYTES_MAX <= NODE_ITEMS_BYTES);
const _: () = assert!(4 * INTERNAL_ITEM_BYTES <= NODE_ITEMS_BYTES);
// `value_len` is a u16.
const _: () = assert!(VALUE_BYTES_MAX <= u16::MAX as usize);
// The numbers the docs give (`docs/format.md`, `docs/btree.md`).
const _: () = assert!(VALUE_BYTES_MAX == 4061 && INTERNAL_CHILDREN_MAX == 494);
const _: () = assert!(LEAF_ITEMS_MAX == 858);

/// A pointer from an internal node to a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Child {
    /// First key of the child's subtree.
    pub key: Key,
    /// Byte address of the child.
    pub addr: u64,
    /// Generation of the child. Meaningless (0) while the child is dirty:
    /// commit fills in the commit generation.
    pub generation: u64,
}

/// Leaf item: key and value.
pub(crate) type LeafItem = (Key, Vec<u8>);

/// Items of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// Level 0: key/value items.
    Leaf(Vec<LeafItem>),
    /// Level > 0: children.
    Internal(Vec<Child>),
}

/// A decoded (or not yet written) node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// 0 for leaves.
    pub level: u8,
    /// Generation written in the header; 0 while dirty.
    pub generation: u64,
    /// Items.
    pub body: Body,
}

/// Encoded size of one leaf item.
pub(crate) fn leaf_item_bytes(item: &LeafItem) -> usize {
    LEAF_ITEM_OVERHEAD_BYTES + item.1.len()
}

impl Node {
    pub(crate) fn leaf(items: Vec<LeafItem>) -> Node {
        Node {
            level: 0,
            generation: 0,
            body: Body::Leaf(items),
        }
    }

    pub(crate) fn internal(level: u8, children: Vec<Child>) -> Node {
        Node {
            level,
            generation: 0,
            body: Body::Internal(children),
        }
    }

    /// Number of items.
    pub(crate) fn len(&self) -> usize {
        match &self.body {
            Body::Leaf(items) => items.len(),
            Body::Internal(children) => children.len(),
        }
    }

    /// Bytes the items take in the items area.
    pub(crate) fn used_bytes(&self) -> usize {
        match &self.body {
            Body::Leaf(items) => items.iter().map(leaf_item_bytes).sum(),
            Body::Internal(children) => children.len() * INTERNAL_ITEM_BYTES,
        }
    }

    /// Approximate heap footprint, for the cache budget.
    pub(crate) fn mem_bytes(&self) -> usize {
        const NODE_OVERHEAD: usize = 128;
        match &self.body {
            Body::Leaf(items) => {
                NODE_OVERHEAD
                    + items
                        .iter()
                        .map(|(_, v)| std::mem::size_of::<LeafItem>() + v.capacity())
                        .sum::<usize>()
            }
            Body::Internal(children) => {
                NODE_OVERHEAD + children.capacity() * std::mem::size_of::<Child>()
            }
        }
    }

    /// First key, if any.
    pub(crate) fn first_key(&self) -> Option<Key> {
        match &self.body {
            Body::Leaf(items) => items.first().map(|i| i.0),
            Body::Internal(children) => children.first().map(|c| c.key),
        }
    }

    /// Encodes into `buf` (exactly [`NODE_BYTES`]) and seals it.
    pub(crate) fn encode_into(
        &self,
        buf: &mut [u8],
        fs_id: FsId,
        addr: u64,
        owner: u64,
    ) -> Result<(), BTreeError> {
        assert_eq!(buf.len(), NODE_BYTES, "node buffer for node at {addr}");
        let used = self.used_bytes();
        assert!(
            used <= NODE_ITEMS_BYTES,
            "node at {addr} holds {used} item bytes, more than {NODE_ITEMS_BYTES}"
        );
        let items = &mut buf[NODE_HEADER_BYTES..];
        let mut at = 0;
        match &self.body {
            Body::Leaf(leaf) => {
                for (key, value) in leaf {
                    key.encode(items, at);
                    // Values are at most VALUE_BYTES_MAX (checked on insert).
                    let len = u16::try_from(value.len()).expect("leaf value above u16::MAX");
                    items[at + KEY_BYTES..at + KEY_BYTES + 2].copy_from_slice(&len.to_le_bytes());
                    at += LEAF_ITEM_OVERHEAD_BYTES;
                    items[at..at + value.len()].copy_from_slice(value);
                    at += value.len();
                }
            }
            Body::Internal(children) => {
                for child in children {
                    child.key.encode(items, at);
                    put_u64(items, at + KEY_BYTES, child.addr);
                    put_u64(items, at + KEY_BYTES + 8, child.generation);
                    at += INTERNAL_ITEM_BYTES;
                }
            }
        }
        items[at..].fill(0);
        let header = NodeHeader {
            fs_id,
            addr,
            generation: self.generation,
            owner,
            item_count: self.len() as u32,
            level: self.level,
        };
        header.seal(buf).map_err(|source| BTreeError::Node {
            addr,
            expected_generation: self.generation,
            source,
        })?;
        debug_assert_eq!(
            Node::decode(buf, &fs_id, addr, self.generation, self.level, owner)
                .map_err(|e| e.to_string())
                .as_ref(),
            Ok(self),
            "an encoded node must decode to itself"
        );
        Ok(())
    }

    /// Decodes the node read from `addr`: header checks, the generation the
    /// referrer recorded, the expected level and owner, the item layout,
    /// strictly ascending keys, zero padding.
    pub(crate) fn decode(
        buf: &[u8],
        fs_id: &FsId,
        addr: u64,
        expected_generation: u64,
        expected_level: u8,
        owner: u64,
    ) -> Result<Node, BTreeError> {
        let node_err = |source| BTreeError::Node {
            addr,
            expected_generation,
            source,
        };
        let header = NodeHeader::decode(buf, fs_id, addr).map_err(node_err)?;
        header
            .check_generation(expected_generation)
            .map_err(node_err)?;
        let corrupt = |reason: String| BTreeError::corrupt(addr, expected_generation, reason);
        if header.level != expected_level {
            return Err(corrupt(format!(
                "level {} where level {expected_level} is expected",
                header.level
            )));
        }
        if header.owner != owner {
            return Err(corrupt(format!(
                "owner {} where tree {owner} is expected",
                header.owner
            )));
        }
        let count = header.item_count as usize;
        if count == 0 {
            return Err(corrupt("node has no items".to_string()));
        }
        let items = &buf[NODE_HEADER_BYTES..NODE_BYTES];
        let mut at = 0usize;
        let body = if header.level == 0 {
            // The header allows a count up to the bytes of the items area;
            // a leaf holds far fewer items. Bound it before allocating.
            if count > LEAF_ITEMS_MAX {
                return Err(corrupt(format!(
                    "{count} leaf items, maximum {LEAF_ITEMS_MAX}"
                )));
            }
            let mut leaf = Vec::with_capacity(count);
            for i in 0..count {
                if at + LEAF_ITEM_OVERHEAD_BYTES > items.len() {
                    return Err(corrupt(format!(
                        "leaf item {i} of {count} at item offset {at} runs past the node"
                    )));
                }
                let key = Key::decode(items, at);
                let len =
                    u16::from_le_bytes([items[at + KEY_BYTES], items[at + KEY_BYTES + 1]]) as usize;
                if len > VALUE_BYTES_MAX {
                    return Err(corrupt(format!(
                        "leaf item {i} (key {key}) has a {len}-byte value, maximum \
                         {VALUE_BYTES_MAX}"
                    )));
                }
                at += LEAF_ITEM_OVERHEAD_BYTES;
                let Some(value) = items.get(at..at + len) else {
                    return Err(corrupt(format!(
                        "leaf item {i} (key {key}) value of {len} bytes runs past the node"
                    )));
                };
                leaf.push((key, value.to_vec()));
                at += len;
            }
            if let Some(pair) = leaf.windows(2).position(|w| w[0].0 >= w[1].0) {
                return Err(corrupt(format!(
                    "leaf keys out of order at item {}: {} then {}",
                    pair + 1,
                    leaf[pair].0,
                    leaf[pair + 1].0
                )));
            }
            Body::Leaf(leaf)
        } else {
            if count > INTERNAL_CHILDREN_MAX {
                return Err(corrupt(format!(
                    "{count} children, maximum {INTERNAL_CHILDREN_MAX}"
                )));
            }
            let mut children = Vec::with_capacity(count);
            for _ in 0..count {
                children.push(Child {
                    key: Key::decode(items, at),
                    addr: get_u64(items, at + KEY_BYTES),
                    generation: get_u64(items, at + KEY_BYTES + 8),
                });
                at += INTERNAL_ITEM_BYTES;
            }
            if let Some(pair) = children.windows(2).position(|w| w[0].key >= w[1].key) {
                return Err(corrupt(format!(
                    "separator keys out of order at child {}: {} then {}",
                    pair + 1,
                    children[pair].key,
                    children[pair + 1].key
                )));
            }
            if let Some(c) = children.iter().find(|c| c.generation > header.generation) {
                return Err(corrupt(format!(
                    "child at {} has generation {}, newer than its parent's {}",
                    c.addr, c.generation, header.generation
                )));
            }
            Body::Internal(children)
        };
        if items[at..].iter().any(|&b| b != 0) {
            return Err(corrupt(format!(
                "bytes after the last item (item offset {at}) are not zero"
            )));
        }
        Ok(Node {
            level: header.level,
            generation: header.generation,
            body,
        })
    }
}

/// Index of the child whose subtree holds `key`: the last child whose
/// separator is `<= key`, or the first child.
pub(crate) fn route(children: &[Child], key: &Key) -> usize {
    children
        .partition_point(|c| c.key <= *key)
        .saturating_sub(1)
}

/// Splits items of the given encoded sizes into consecutive pieces that each
/// fit in `cap` bytes. Pieces are filled greedily to `cap`; if the last one
/// ends up below `cap / 4`, the last two are re-cut at their midpoint. With
/// every size `<= cap / 4`, every piece of a split (more than one piece)
/// therefore holds at least `cap / 4` bytes: greedy pieces hold more than
/// `cap - cap / 4`, and the re-cut pair holds more than `cap`, so each half
/// more than `cap / 2 - cap / 8`.
///
/// Sorted bulk inserts thus produce full nodes, and a single overflowing
/// node splits into two halves.
pub(crate) fn plan_split(sizes: &[usize], cap: usize) -> Vec<Range<usize>> {
    let n = sizes.len();
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut start = 0usize;
    let mut acc = 0usize;
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && acc + s > cap {
            out.push(start..i);
            start = i;
            acc = 0;
        }
        acc += s;
    }
    out.push(start..n);
    if out.len() >= 2 && acc < cap / 4 {
        let last = out.pop().unwrap_or(0..0);
        let prev = out.pop().unwrap_or(0..0);
        let pair = prev.start..last.end;
        let total: usize = sizes[pair.clone()].iter().sum();
        let mut half = 0usize;
        let mut cut = pair.start + 1;
        for i in pair.clone() {
            if i > pair.start && half + sizes[i] / 2 >= total / 2 {
                cut = i;
                break;
            }
            half += sizes[i];
        }
        out.push(pair.start..cut);
        out.push(cut..pair.end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FS: FsId = FsId([7; 16]);

    #[test]
    fn key_order_is_lexicographic() {
        let a = Key::new(1, 200, u64::MAX);
        let b = Key::new(2, 0, 0);
        let c = Key::new(2, 1, 0);
        let d = Key::new(2, 1, 5);
        assert!(a < b && b < c && c < d);
        assert_eq!(Key::new(1, 2, 3).to_string(), "(1 2 3)");
    }

    #[test]
    fn leaf_round_trip_and_golden_items() {
        let node = Node {
            level: 0,
            generation: 9,
            body: Body::Leaf(vec![
                (Key::new(1, 2, 3), b"ab".to_vec()),
                (Key::new(1, 2, 4), Vec::new()),
            ]),
        };
        let mut buf = vec![0u8; NODE_BYTES];
        node.encode_into(&mut buf, FS, 1 << 20, 5).expect("encode");
        let items: String = buf[NODE_HEADER_BYTES..NODE_HEADER_BYTES + 40]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            items,
            "01000000000000000203000000000000000200616201000000000000000204000000000000000000"
        );
        let back = Node::decode(&buf, &FS, 1 << 20, 9, 0, 5).expect("decode");
        assert_eq!(back, node);
        assert!(matches!(
            Node::decode(&buf, &FS, 1 << 20, 8, 0, 5),
            Err(BTreeError::Node { .. })
        ));
        assert!(matches!(
            Node::decode(&buf, &FS, 1 << 20, 9, 1, 5),
            Err(BTreeError::Corrupt { .. })
        ));
        assert!(matches!(
            Node::decode(&buf, &FS, 1 << 20, 9, 0, 6),
            Err(BTreeError::Corrupt { .. })
        ));
    }

    #[test]
    fn internal_round_trip_and_golden_items() {
        let node = Node {
            level: 2,
            generation: 9,
            body: Body::Internal(vec![
                Child {
                    key: Key::new(1, 2, 3),
                    addr: 0x4000,
                    generation: 8,
                },
                Child {
                    key: Key::new(5, 0, 0),
                    addr: 0x8000,
                    generation: 9,
                },
            ]),
        };
        let mut buf = vec![0u8; NODE_BYTES];
        node.encode_into(&mut buf, FS, 1 << 20, 5).expect("encode");
        let items: String = buf[NODE_HEADER_BYTES..NODE_HEADER_BYTES + 33]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            items,
            "010000000000000002030000000000000000400000000000000800000000000000"
        );
        assert_eq!(
            Node::decode(&buf, &FS, 1 << 20, 9, 2, 5).expect("decode"),
            node
        );
    }

    /// Forged nodes with valid checksums but bad items are refused, never
    /// panic.
    #[test]
    fn forged_items_are_refused() {
        let reseal = |buf: &mut Vec<u8>, count: u32, level: u8| {
            NodeHeader {
                fs_id: FS,
                addr: 0x4000,
                generation: 3,
                owner: 1,
                item_count: count,
                level,
            }
            .seal(buf)
            .expect("seal");
        };
        let node = Node::leaf(vec![
            (Key::new(1, 0, 0), vec![1; 10]),
            (Key::new(2, 0, 0), vec![2; 10]),
        ]);
        let mut buf = vec![0u8; NODE_BYTES];
        node.encode_into(&mut buf, FS, 0x4000, 1).expect("encode");
        // Count larger than the items present: runs into zeroes, which decode
        // as key (0 0 0) out of order, or past the end.
        for count in [0u32, 3, 900, 16000] {
            let mut b = buf.clone();
            reseal(&mut b, count, 0);
            assert!(
                Node::decode(&b, &FS, 0x4000, 3, 0, 1).is_err(),
                "count {count}"
            );
        }
        // Keys swapped.
        let mut b = buf.clone();
        b[NODE_HEADER_BYTES] = 3;
        reseal(&mut b, 2, 0);
        assert!(matches!(
            Node::decode(&b, &FS, 0x4000, 3, 0, 1),
            Err(BTreeError::Corrupt { .. })
        ));
        // Garbage after the items.
        let mut b = buf.clone();
        b[NODE_BYTES - 1] = 1;
        reseal(&mut b, 2, 0);
        assert!(matches!(
            Node::decode(&b, &FS, 0x4000, 3, 0, 1),
            Err(BTreeError::Corrupt { .. })
        ));
        // Oversized value length.
        let mut b = buf.clone();
        b[NODE_HEADER_BYTES + KEY_BYTES] = 0xff;
        b[NODE_HEADER_BYTES + KEY_BYTES + 1] = 0xff;
        reseal(&mut b, 2, 0);
        assert!(matches!(
            Node::decode(&b, &FS, 0x4000, 3, 0, 1),
            Err(BTreeError::Corrupt { .. })
        ));
        // Internal node claiming too many children.
        let mut b = vec![0u8; NODE_BYTES];
        reseal(&mut b, 600, 1);
        assert!(Node::decode(&b, &FS, 0x4000, 3, 1, 1).is_err());
    }

    /// Found by the `node` fuzz target's property test: a forged leaf
    /// `item_count` of 13490 (valid for the header, which allows up to
    /// the items area's 16320 bytes) sized a 647 KB item vector before
    /// the items ran past the node. Now refused before any allocation.
    #[test]
    fn forged_leaf_item_count_is_refused_before_allocating() {
        let node = Node::leaf(vec![(Key::new(1, 0, 0), vec![1; 10])]);
        let mut buf = vec![0u8; NODE_BYTES];
        node.encode_into(&mut buf, FS, 0x4000, 1).expect("encode");
        for count in [LEAF_ITEMS_MAX as u32 + 1, 13490, NODE_ITEMS_BYTES as u32] {
            NodeHeader {
                fs_id: FS,
                addr: 0x4000,
                generation: 0,
                owner: 1,
                item_count: count,
                level: 0,
            }
            .seal(&mut buf)
            .expect("seal");
            match Node::decode(&buf, &FS, 0x4000, 0, 0, 1) {
                Err(BTreeError::Corrupt { reason, .. }) => {
                    assert!(reason.contains("maximum 858"), "{reason}")
                }
                other => panic!("count {count}: {other:?}"),
            }
        }
    }

    #[test]
    fn route_picks_the_covering_child() {
        let c = |k: u64| Child {
            key: Key::new(k, 0, 0),
            addr: k,
            generation: 1,
        };
        let children = [c(10), c(20), c(30)];
        assert_eq!(route(&children, &Key::new(5, 0, 0)), 0);
        assert_eq!(route(&children, &Key::new(10, 0, 0)), 0);
        assert_eq!(route(&children, &Key::new(19, 9, 9)), 0);
        assert_eq!(route(&children, &Key::new(20, 0, 0)), 1);
        assert_eq!(route(&children, &Key::new(99, 0, 0)), 2);
    }

    #[test]
    fn split_plan_bounds() {
        let cap = NODE_ITEMS_BYTES;
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        for _ in 0..500 {
            let n = 1 + (next() % 3000) as usize;
            let big = next() % 4 == 0;
            let sizes: Vec<usize> = (0..n)
                .map(|_| {
                    let max = if big { LEAF_ITEM_BYTES_MAX } else { 100 };
                    LEAF_ITEM_OVERHEAD_BYTES + (next() as usize % (max - 18))
                })
                .collect();
            let plan = plan_split(&sizes, cap);
            let total: usize = sizes.iter().sum();
            assert_eq!(plan.first().map(|r| r.start), Some(0));
            assert_eq!(plan.last().map(|r| r.end), Some(n));
            for w in plan.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for r in &plan {
                let bytes: usize = sizes[r.clone()].iter().sum();
                assert!(!r.is_empty());
                assert!(bytes <= cap, "piece {bytes} > cap");
                if plan.len() > 1 {
                    assert!(bytes >= cap / 4, "piece {bytes} underfull of {total}");
                }
            }
            if total > cap {
                assert!(plan.len() <= total.div_ceil(cap * 3 / 4) + 1);
            }
        }
    }
}
