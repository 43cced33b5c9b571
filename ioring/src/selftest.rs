//! Round-trip checks of the on-device decoders (B+tree nodes, the
//! allocator's bitmap run, superblocks, log batches), shared by the property
//! test of the normal test run (`tests/fuzz_decoders.rs`) and the
//! cargo-fuzz targets (`fuzz/`, see `docs/fuzzing.md`), so both hold the
//! decoders to the same contract on arbitrary bytes:
//!
//! - no decoder panics;
//! - a decoder either refuses with a typed error or returns a value that
//!   re-encodes to the bytes it came from. Superblocks, nodes and bitmap
//!   runs are canonical: the re-encoding is the block, byte for byte. Log
//!   batches
//!   are not: `batch_bytes` may be larger than the records need and the
//!   padding is covered by the payload checksum but not required to be
//!   zero; for them the re-encoding must have the same header fields and
//!   the same payload bytes, and equal the batch exactly when that batch
//!   is minimal with zero padding;
//! - the heap a decoded value holds is bounded by the block it came from
//!   (a count read from the device never sizes an allocation unchecked);
//! - decoders that answer the same question agree (a node's header alone
//!   and the whole node; a batch header alone and the whole batch; each
//!   superblock copy alone and [`pick_newest`]).
//!
//! The `fuzz_*` functions turn arbitrary bytes into inputs for these
//! checks (the first byte steers: raw bytes, or bytes wrapped into a block
//! with valid checksums so that the checks behind the checksum are
//! reached). The `reseal_*` functions recompute checksums after an edit.
//!
//! These functions panic when the contract is broken: that is their job.
//! They are public only so that the fuzz crate and the integration tests
//! can call them.

use crate::aligned::BLOCK_BYTES;
use crate::btree::alloc::Allocator;
use crate::btree::node::{Body, Child, Node, INTERNAL_CHILDREN_MAX, LEAF_ITEMS_MAX};
use crate::btree::{AllocInfo, BTreeError, Key, BITMAP_BITS_PER_NODE, BITMAP_OWNER};
use crate::device::Geometry;
use crate::format::le::{get_u32, get_u64, put_u32};
use crate::format::log_batch::{
    OFF_BATCH_BYTES, OFF_PAYLOAD_BYTES, OFF_PAYLOAD_CRC, OFF_RECORD_COUNT,
};
use crate::format::{
    block_checksum, decode_batch, decode_batch_header, encode_batch, pick_newest, BatchHeader,
    BatchId, FormatError, FsId, Layout, NodeHeader, Superblock, SuperblockChoice, CHECKSUM_OFFSET,
    LOG_BATCH_HEADER_BYTES, NODE_BYTES, NODE_HEADER_BYTES, NODE_ITEMS_BYTES, SUPERBLOCK_BYTES,
    SUPERBLOCK_SLOT_ADDRS,
};

/// File system id of the blocks the `fuzz_*` functions build.
pub const FUZZ_FS_ID: FsId = FsId([0x5A; 16]);
/// Address the `fuzz_*` functions read a node from.
pub const FUZZ_NODE_ADDR: u64 = 1 << 20;
/// Tree id the `fuzz_*` functions expect a node to belong to.
pub const FUZZ_OWNER: u64 = 7;

/// Where a node is read from and what its referrer recorded about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeContext {
    /// File system of the tree.
    pub fs_id: FsId,
    /// Address the node is read from.
    pub addr: u64,
    /// Generation the referrer recorded.
    pub generation: u64,
    /// Level the referrer expects.
    pub level: u8,
    /// Tree the node must belong to.
    pub owner: u64,
}

/// A child pointer of an internal node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildRef {
    /// First key of the child's subtree.
    pub key: Key,
    /// Address of the child.
    pub addr: u64,
    /// Generation of the child.
    pub generation: u64,
}

/// The items of a node, as the tree decodes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeItems {
    /// A leaf's key/value items.
    Leaf(Vec<(Key, Vec<u8>)>),
    /// An internal node's children.
    Internal(Vec<ChildRef>),
}

fn to_node(ctx: &NodeContext, items: &NodeItems) -> Node {
    let mut node = match items {
        NodeItems::Leaf(leaf) => Node::leaf(leaf.clone()),
        NodeItems::Internal(children) => Node::internal(
            ctx.level,
            children
                .iter()
                .map(|c| Child {
                    key: c.key,
                    addr: c.addr,
                    generation: c.generation,
                })
                .collect(),
        ),
    };
    node.generation = ctx.generation;
    node
}

fn from_node(node: &Node) -> NodeItems {
    match &node.body {
        Body::Leaf(leaf) => NodeItems::Leaf(leaf.clone()),
        Body::Internal(children) => NodeItems::Internal(
            children
                .iter()
                .map(|c| ChildRef {
                    key: c.key,
                    addr: c.addr,
                    generation: c.generation,
                })
                .collect(),
        ),
    }
}

/// Encodes a node as the tree writes it (a leaf when `items` is a leaf,
/// else at `ctx.level`).
///
/// # Panics
///
/// If the items do not fit a node or the header is invalid.
pub fn encode_node(ctx: &NodeContext, items: &NodeItems) -> Vec<u8> {
    let mut buf = vec![0u8; NODE_BYTES];
    to_node(ctx, items)
        .encode_into(&mut buf, ctx.fs_id, ctx.addr, ctx.owner)
        .expect("encode node");
    buf
}

/// Decodes `buf` as the tree reads a node ([`NodeHeader::decode`], then the
/// items) and checks the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn node_round_trip(buf: &[u8], ctx: &NodeContext) -> Result<NodeItems, BTreeError> {
    let header = NodeHeader::decode(buf, &ctx.fs_id, ctx.addr);
    if let Ok(h) = &header {
        // The header is canonical: sealing it again over the same items
        // gives the same node.
        let mut again = buf[..NODE_BYTES].to_vec();
        h.seal(&mut again).expect("a decoded header seals");
        assert!(again == buf[..NODE_BYTES], "node header does not re-encode");
    }
    let decoded = Node::decode(
        buf,
        &ctx.fs_id,
        ctx.addr,
        ctx.generation,
        ctx.level,
        ctx.owner,
    );
    let node = match decoded {
        Ok(node) => node,
        Err(e) => {
            let _ = (e.to_string(), e.offset());
            match (&header, &e) {
                (Err(he), BTreeError::Node { source, .. }) => assert_eq!(he, source),
                (Err(he), other) => panic!("header error {he:?} but node error {other:?}"),
                (Ok(_), BTreeError::Node { source, .. }) => assert!(
                    matches!(source, FormatError::GenerationMismatch { .. }),
                    "header accepted, node refused it: {source:?}"
                ),
                (Ok(_), BTreeError::Corrupt { .. }) => {}
                (Ok(_), other) => panic!("unexpected node error {other:?}"),
            }
            return Err(e);
        }
    };
    let h = header.expect("node decoded, its header did not");
    assert_eq!(
        (node.level, node.generation, node.len()),
        (h.level, h.generation, h.item_count as usize)
    );
    assert_eq!((node.level, node.generation), (ctx.level, ctx.generation));
    assert!(node.used_bytes() <= NODE_ITEMS_BYTES);
    match &node.body {
        Body::Leaf(leaf) => {
            assert!(
                leaf.capacity() <= LEAF_ITEMS_MAX,
                "leaf of {} items holds room for {}",
                leaf.len(),
                leaf.capacity()
            );
            let values: usize = leaf.iter().map(|(_, v)| v.capacity()).sum();
            assert!(values <= NODE_ITEMS_BYTES, "values hold {values} bytes");
        }
        Body::Internal(children) => assert!(children.capacity() <= INTERNAL_CHILDREN_MAX),
    }
    let mut again = vec![0u8; NODE_BYTES];
    node.encode_into(&mut again, ctx.fs_id, ctx.addr, ctx.owner)
        .expect("a decoded node encodes");
    assert!(again == buf[..NODE_BYTES], "node does not re-encode");
    Ok(from_node(&node))
}

/// Recomputes the whole-node checksum of `buf[..NODE_BYTES]` (no-op on a
/// shorter buffer).
pub fn reseal_node(buf: &mut [u8]) {
    if buf.len() >= NODE_BYTES {
        let crc = block_checksum(&buf[..NODE_BYTES]);
        put_u32(buf, CHECKSUM_OFFSET, crc);
    }
}

/// Arbitrary bytes against the node decoders. The first byte steers: bit
/// 0 reseals the checksum, bit 1 wraps the rest into a node with a valid
/// header (item count from two bytes, generation from one, the rest the
/// items area), bits 2..5 the expected level, bit 5 keeps a raw input at
/// its own length (else it is zero-padded to a node).
///
/// # Panics
///
/// If the contract of [`node_round_trip`] is broken.
pub fn fuzz_node(data: &[u8]) {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let mut ctx = NodeContext {
        fs_id: FUZZ_FS_ID,
        addr: FUZZ_NODE_ADDR,
        generation: 1,
        level: (steer >> 2) & 7,
        owner: FUZZ_OWNER,
    };
    if steer & 2 != 0 {
        let [c0, c1, generation, items @ ..] = rest else {
            return;
        };
        let count = u32::from(u16::from_le_bytes([*c0, *c1])) % (NODE_ITEMS_BYTES as u32 + 1);
        ctx.generation = u64::from(*generation);
        let mut buf = vec![0u8; NODE_BYTES];
        let n = items.len().min(NODE_ITEMS_BYTES);
        buf[NODE_HEADER_BYTES..NODE_HEADER_BYTES + n].copy_from_slice(&items[..n]);
        NodeHeader {
            fs_id: ctx.fs_id,
            addr: ctx.addr,
            generation: ctx.generation,
            owner: ctx.owner,
            item_count: count,
            level: ctx.level,
        }
        .seal(&mut buf)
        .expect("a valid header seals");
        let _ = node_round_trip(&buf, &ctx);
        return;
    }
    let mut buf = rest.to_vec();
    if steer & 0x20 == 0 {
        buf.resize(NODE_BYTES, 0);
    }
    if steer & 1 != 0 {
        reseal_node(&mut buf);
    }
    if buf.len() >= NODE_BYTES {
        // Expect what the header claims, so that only the items can fail.
        ctx.generation = get_u64(&buf, 40);
        ctx.owner = get_u64(&buf, 48);
    }
    let _ = node_round_trip(&buf, &ctx);
}

/// Where the allocator reads its bitmap run from at open: the node region
/// and the superblock's allocator fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapContext {
    /// File system of the tree.
    pub fs_id: FsId,
    /// First byte of the node region.
    pub region_start: u64,
    /// Size of the node region.
    pub region_bytes: u64,
    /// `alloc_next_unallocated`, `free_space_bitmap_addr` and
    /// `free_space_bitmap_bytes` of the superblock.
    pub info: AllocInfo,
    /// Generation of the commit that wrote the run.
    pub generation: u64,
}

impl BitmapContext {
    /// The allocator as open loads it, with the run's bytes from `read`.
    fn load(
        &self,
        read: impl FnOnce(u64, &mut [u8]) -> Result<(), BTreeError>,
    ) -> Result<Allocator, BTreeError> {
        Allocator::load(
            self.region_start,
            self.region_bytes,
            self.info,
            &self.fs_id,
            self.generation,
            read,
        )
    }
}

/// The bitmap run of `ctx`'s region as a commit writes it, with slot `s`
/// marked allocated when `allocated(s)`: sealed nodes, in address order,
/// for a run at `ctx.info.bitmap_addr` (the run's own slots are not
/// forced: a caller that wants a valid run marks them).
pub fn encode_bitmap(ctx: &BitmapContext, allocated: impl Fn(u64) -> bool) -> Vec<u8> {
    let node_count = ctx.region_bytes / NODE_BYTES as u64;
    let bytes_total = node_count.div_ceil(8);
    let run_nodes = node_count.div_ceil(BITMAP_BITS_PER_NODE);
    let mut out = vec![0u8; (run_nodes as usize) * NODE_BYTES];
    for (k, node) in out.chunks_mut(NODE_BYTES).enumerate() {
        let first_byte = k as u64 * NODE_ITEMS_BYTES as u64;
        let n = (bytes_total - first_byte).min(NODE_ITEMS_BYTES as u64);
        for i in 0..n {
            let mut byte = 0u8;
            for bit in 0..8 {
                let slot = (first_byte + i) * 8 + bit;
                if slot < node_count && allocated(slot) {
                    byte |= 1 << bit;
                }
            }
            node[NODE_HEADER_BYTES + i as usize] = byte;
        }
        NodeHeader {
            fs_id: ctx.fs_id,
            addr: ctx.info.bitmap_addr + (k * NODE_BYTES) as u64,
            generation: ctx.generation,
            owner: BITMAP_OWNER,
            item_count: n as u32,
            level: 0,
        }
        .seal(node)
        .expect("bitmap node header");
    }
    out
}

/// Decodes `buf` as the bitmap run the allocator reads at open (the bytes
/// read at `ctx.info.bitmap_addr`; a shorter buffer reads as zeros past
/// its end) and checks the contract (module doc). Returns the number of
/// allocated slots.
///
/// # Panics
///
/// If the contract is broken.
pub fn bitmap_round_trip(buf: &[u8], ctx: &BitmapContext) -> Result<u64, BTreeError> {
    let mut read_len = 0;
    let loaded = ctx.load(|_, out| {
        read_len = out.len();
        let n = out.len().min(buf.len());
        out[..n].copy_from_slice(&buf[..n]);
        out[n..].fill(0);
        Ok(())
    });
    let a = match loaded {
        Ok(a) => a,
        Err(e) => {
            let _ = (e.to_string(), e.offset());
            return Err(e);
        }
    };
    assert_eq!(a.info(), ctx.info, "allocator fields do not re-encode");
    // The allocator holds a bit per slot of the region, never more.
    assert_eq!(read_len as u64, ctx.info.bitmap_bytes);
    let mut again = Vec::with_capacity(read_len);
    for (_, node) in a
        .encode_run(ctx.fs_id, ctx.generation)
        .expect("a loaded bitmap encodes")
    {
        again.extend_from_slice(&node);
    }
    assert_eq!(again.len(), read_len);
    let mut read = buf[..read_len.min(buf.len())].to_vec();
    read.resize(read_len, 0);
    if again != read {
        // Only a run of a smaller region than this one (a grown node
        // region, docs/format.md) re-encodes differently: its last node
        // is shorter than this region's would be. What it says must be
        // the same: the re-encoded run loads to the same slots.
        let last = read_len - NODE_BYTES;
        let header = |b: &[u8]| {
            NodeHeader::decode(&b[last..], &ctx.fs_id, ctx.info.bitmap_addr + last as u64)
                .expect("a loaded bitmap node decodes")
        };
        assert!(
            header(&read).item_count < header(&again).item_count,
            "bitmap run does not re-encode"
        );
        let b = ctx
            .load(|_, out| {
                out.copy_from_slice(&again);
                Ok(())
            })
            .expect("a re-encoded bitmap loads");
        assert!(
            b.set_slots().eq(a.set_slots()),
            "a short bitmap run re-encodes to other slots"
        );
    }
    Ok(a.set_slots().count() as u64)
}

/// Node region start of the bitmap runs [`fuzz_bitmap`] builds.
pub const FUZZ_REGION_START: u64 = 1 << 20;

/// Arbitrary bytes against the allocator's bitmap decoder. The first byte
/// steers: bit 0 wraps the rest into sealed bitmap nodes (else the rest
/// is the bytes read, resealed node by node when bit 1 is set), bit 1 in
/// wrapped mode marks the run's own slots, bit 2 makes the region a
/// two-node run. Then two bytes each give the region's nodes, the
/// high-water mark and the run's first slot, one the generation; the rest
/// is the bitmap (wrapped) or the run's bytes (raw).
///
/// # Panics
///
/// If the contract of [`bitmap_round_trip`] is broken.
pub fn fuzz_bitmap(data: &[u8]) {
    let [steer, n0, n1, h0, h1, f0, f1, generation, rest @ ..] = data else {
        return;
    };
    let mut nodes = 1 + u64::from(u16::from_le_bytes([*n0, *n1]));
    if steer & 4 != 0 {
        nodes += BITMAP_BITS_PER_NODE;
    }
    let hwm = u64::from(u16::from_le_bytes([*h0, *h1])) % (nodes + 1);
    let first = u64::from(u16::from_le_bytes([*f0, *f1])) % nodes;
    let run_nodes = nodes.div_ceil(BITMAP_BITS_PER_NODE);
    let node = NODE_BYTES as u64;
    let ctx = BitmapContext {
        fs_id: FUZZ_FS_ID,
        region_start: FUZZ_REGION_START,
        region_bytes: nodes * node,
        info: AllocInfo {
            next_unallocated: FUZZ_REGION_START + hwm * node,
            bitmap_addr: FUZZ_REGION_START + first * node,
            bitmap_bytes: run_nodes * node,
        },
        generation: u64::from(*generation),
    };
    let buf = if steer & 1 != 0 {
        let run = first..first + run_nodes;
        encode_bitmap(&ctx, |slot| {
            let byte = rest.get((slot / 8) as usize).copied().unwrap_or(0);
            byte & (1 << (slot % 8)) != 0 || (steer & 2 != 0 && run.contains(&slot))
        })
    } else {
        let mut buf = rest.to_vec();
        if steer & 2 != 0 {
            for chunk in buf.chunks_mut(NODE_BYTES) {
                reseal_node(chunk);
            }
        }
        buf
    };
    let _ = bitmap_round_trip(&buf, &ctx);
}

/// Decodes `buf` as the superblock copy read from `slot_addr` and checks
/// the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn superblock_round_trip(buf: &[u8], slot_addr: u64) -> Result<Superblock, FormatError> {
    match Superblock::decode(buf, slot_addr) {
        Ok(sb) => {
            assert_eq!(sb.addr(), slot_addr);
            assert_eq!(sb.validate(), Ok(()));
            let again = sb.encode().expect("a decoded superblock encodes");
            assert!(
                again[..] == buf[..SUPERBLOCK_BYTES],
                "superblock does not re-encode"
            );
            Ok(sb)
        }
        Err(e) => {
            let _ = e.to_string();
            Err(e)
        }
    }
}

/// [`pick_newest`] over two copies, checked against decoding each copy
/// alone with [`superblock_round_trip`].
///
/// # Panics
///
/// If the contract is broken.
pub fn pick_newest_round_trip(copy0: &[u8], copy1: &[u8]) -> Result<SuperblockChoice, FormatError> {
    let alone = [
        superblock_round_trip(copy0, SUPERBLOCK_SLOT_ADDRS[0]),
        superblock_round_trip(copy1, SUPERBLOCK_SLOT_ADDRS[1]),
    ];
    let picked = pick_newest(copy0, copy1);
    match (&alone, &picked) {
        ([Err(e0), Err(e1)], Err(FormatError::NoValidSuperblock { slot0, slot1 })) => {
            assert_eq!((e0, e1), (slot0.as_ref(), slot1.as_ref()));
        }
        ([Ok(a), Ok(b)], Ok(choice)) => {
            let (newest, older) = if a.generation > b.generation {
                (a, b)
            } else {
                (b, a)
            };
            assert_ne!(a.generation, b.generation, "slot parity");
            assert_eq!(&choice.superblock, newest);
            assert_eq!(choice.slot, (newest.generation % 2) as usize);
            let foreign = older.fs_id != newest.fs_id;
            assert_eq!(choice.rejected.len(), usize::from(foreign));
        }
        ([Ok(a), Err(e)], Ok(choice)) => {
            assert_eq!((&choice.superblock, choice.slot), (a, 0));
            assert_eq!(choice.rejected, vec![(1, e.clone())]);
        }
        ([Err(e), Ok(b)], Ok(choice)) => {
            assert_eq!((&choice.superblock, choice.slot), (b, 1));
            assert_eq!(choice.rejected, vec![(0, e.clone())]);
        }
        (alone, picked) => panic!("pick_newest {picked:?} disagrees with {alone:?}"),
    }
    picked
}

/// Recomputes the checksum of `buf[..SUPERBLOCK_BYTES]` (no-op on a
/// shorter buffer).
pub fn reseal_superblock(buf: &mut [u8]) {
    if buf.len() >= SUPERBLOCK_BYTES {
        let crc = block_checksum(&buf[..SUPERBLOCK_BYTES]);
        put_u32(buf, CHECKSUM_OFFSET, crc);
    }
}

/// A valid superblock of generation `generation` on a 64 MiB device: an 8
/// MiB log, a 32 MiB node region, a root node and a bitmap.
pub fn sample_superblock(generation: u64) -> Superblock {
    let geometry = Geometry {
        size_bytes: 64 << 20,
        logical_block_bytes: 512,
        physical_block_bytes: 4096,
    };
    let node_region_start = 8192 + (8 << 20);
    let layout = Layout {
        log_start: 8192,
        log_bytes: 8 << 20,
        node_region_start,
        node_region_bytes: 32 << 20,
    };
    Superblock {
        generation,
        log_head_offset: 3 * 4096,
        log_head_lsn: 10,
        log_tail_offset: 9 * 4096,
        log_tail_lsn: 14,
        tree_root_addr: node_region_start + 5 * NODE_BYTES as u64,
        tree_root_generation: generation,
        tree_root_level: 2,
        alloc_next_unallocated: node_region_start + 64 * NODE_BYTES as u64,
        free_space_bitmap_addr: node_region_start + 6 * NODE_BYTES as u64,
        free_space_bitmap_bytes: NODE_BYTES as u64,
        last_txn_id: 99,
        ..Superblock::empty(FUZZ_FS_ID, geometry, layout)
    }
}

/// Arbitrary bytes against the superblock decoders. The first byte steers:
/// bits 0..2 pick the mode (0: one raw copy; 1: two raw copies for
/// [`pick_newest`]; 2, 3: a valid superblock with the rest XOR-ed into its
/// fields after the checksum, resealed, paired with a valid copy of the
/// previous generation), bit 2 keeps raw copies at their own length, bit 3
/// reseals raw copies, bit 4 picks the slot.
///
/// # Panics
///
/// If the contract is broken.
pub fn fuzz_superblock(data: &[u8]) {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let slot = usize::from((steer >> 4) & 1);
    let raw = |bytes: &[u8]| {
        let mut b = bytes.to_vec();
        if steer & 4 == 0 {
            b.resize(SUPERBLOCK_BYTES, 0);
        }
        if steer & 8 != 0 {
            reseal_superblock(&mut b);
        }
        b
    };
    match steer & 3 {
        0 => {
            let _ = superblock_round_trip(&raw(rest), SUPERBLOCK_SLOT_ADDRS[slot]);
        }
        1 => {
            let (a, b) = rest.split_at(rest.len() / 2);
            let _ = pick_newest_round_trip(&raw(a), &raw(b));
        }
        _ => {
            let generation = 10 + slot as u64;
            let mut edited = sample_superblock(generation)
                .encode()
                .expect("sample")
                .to_vec();
            for (b, x) in edited[CHECKSUM_OFFSET + 4..].iter_mut().zip(rest) {
                *b ^= x;
            }
            reseal_superblock(&mut edited);
            let other = sample_superblock(generation - 1).encode().expect("sample");
            let _ = if slot == 0 {
                pick_newest_round_trip(&edited, &other)
            } else {
                pick_newest_round_trip(&other, &edited)
            };
        }
    }
}

/// Decodes `buf` as the log batch expected at logical offset `log_offset`
/// ([`decode_batch_header`], then [`decode_batch`], as replay does) and
/// checks the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn batch_round_trip(
    buf: &[u8],
    fs_id: &FsId,
    log_offset: u64,
) -> Result<BatchHeader, FormatError> {
    let header = decode_batch_header(buf, fs_id, log_offset);
    let view = match decode_batch(buf, fs_id, log_offset) {
        Ok(view) => view,
        Err(e) => {
            let _ = e.to_string();
            match &header {
                Err(he) => assert_eq!(he, &e),
                Ok(_) => assert!(
                    matches!(
                        e,
                        FormatError::Truncated { .. }
                            | FormatError::Torn { .. }
                            | FormatError::Invalid {
                                field: "record framing",
                                ..
                            }
                    ),
                    "header accepted, batch refused it: {e:?}"
                ),
            }
            return Err(e);
        }
    };
    let h = view.header;
    assert_eq!(header.as_ref(), Ok(&h));
    let records: Vec<&[u8]> = view.records().collect();
    assert_eq!(records.len(), h.record_count as usize);
    assert_eq!(view.payload().len(), h.payload_bytes as usize);
    let id = BatchId {
        prev_checksum: h.prev_checksum,
        ..BatchId::new(fs_id, h.lsn, h.txn_id, h.log_offset)
    };
    let again = encode_batch(&id, &records).expect("decoded records encode");
    let again_h = decode_batch_header(&again, fs_id, log_offset).expect("re-encoded header");
    assert_eq!(
        (again_h.lsn, again_h.txn_id, again_h.log_offset),
        (h.lsn, h.txn_id, h.log_offset)
    );
    assert_eq!(
        (again_h.payload_bytes, again_h.record_count),
        (h.payload_bytes, h.record_count)
    );
    assert!(
        again_h.batch_bytes <= h.batch_bytes,
        "batch_bytes below the minimum"
    );
    let payload_end = LOG_BATCH_HEADER_BYTES + h.payload_bytes as usize;
    assert!(
        again[LOG_BATCH_HEADER_BYTES..payload_end] == *view.payload(),
        "payload does not re-encode"
    );
    let batch = &buf[..h.batch_bytes as usize];
    let canonical =
        again_h.batch_bytes == h.batch_bytes && batch[payload_end..].iter().all(|&b| b == 0);
    if canonical {
        assert!(again[..] == *batch, "minimal batch does not re-encode");
    }
    Ok(h)
}

/// Recomputes both checksums of a batch: the payload checksum over
/// `buf[LOG_BATCH_HEADER_BYTES..batch_bytes]` (clamped to the buffer),
/// then the header checksum. No-op on a buffer shorter than a header.
pub fn reseal_batch(buf: &mut [u8]) {
    if buf.len() < LOG_BATCH_HEADER_BYTES {
        return;
    }
    let end = (get_u32(buf, OFF_BATCH_BYTES) as usize).clamp(LOG_BATCH_HEADER_BYTES, buf.len());
    let payload_crc = crc32c::crc32c(&buf[LOG_BATCH_HEADER_BYTES..end]);
    put_u32(buf, OFF_PAYLOAD_CRC, payload_crc);
    let crc = block_checksum(&buf[..LOG_BATCH_HEADER_BYTES]);
    put_u32(buf, CHECKSUM_OFFSET, crc);
}

/// Logical log offsets the `fuzz_*` functions expect a batch at.
const FUZZ_LOG_OFFSETS: [u64; 4] = [0, 4096, 1 << 20, u64::MAX - 4095];

/// Arbitrary bytes against the log batch decoders. The first byte steers:
/// bits 0..2 pick the mode (0: raw bytes, resealed when bit 2 is set; 1: a
/// valid header, with both checksums, around the rest as a payload whose
/// record count and extra padding blocks come from its first three bytes;
/// 2: records cut from the rest by one-byte lengths, encoded, then one
/// byte edited and both checksums resealed when bit 2 is set; 3: the rest
/// as a header with magic, version, file system and log offset put right,
/// resealed), bits 3..5 the expected log offset.
///
/// # Panics
///
/// If the contract is broken.
pub fn fuzz_log_batch(data: &[u8]) {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let log_offset = FUZZ_LOG_OFFSETS[usize::from((steer >> 3) & 3)];
    let fs = FUZZ_FS_ID;
    let reseal = steer & 4 != 0;
    match steer & 3 {
        0 => {
            let mut buf = rest.to_vec();
            if reseal {
                reseal_batch(&mut buf);
            }
            let _ = batch_round_trip(&buf, &fs, log_offset);
        }
        1 => {
            let [c0, c1, extra, payload @ ..] = rest else {
                return;
            };
            let mut buf = encode_batch(&BatchId::new(&fs, 1, 1, log_offset), &[])
                .expect("empty batch")
                .to_vec();
            let used = LOG_BATCH_HEADER_BYTES + payload.len();
            let blocks = used.div_ceil(BLOCK_BYTES) + usize::from(extra & 3);
            buf.resize(blocks * BLOCK_BYTES, 0);
            buf[LOG_BATCH_HEADER_BYTES..used].copy_from_slice(payload);
            let batch_bytes = buf.len() as u32;
            put_u32(&mut buf, OFF_BATCH_BYTES, batch_bytes);
            put_u32(&mut buf, OFF_PAYLOAD_BYTES, payload.len() as u32);
            put_u32(
                &mut buf,
                OFF_RECORD_COUNT,
                u32::from(u16::from_le_bytes([*c0, *c1])),
            );
            reseal_batch(&mut buf);
            let _ = batch_round_trip(&buf, &fs, log_offset);
        }
        2 => {
            let mut records = Vec::new();
            let mut r = rest;
            while let Some((&len, tail)) = r.split_first() {
                let len = usize::from(len).min(tail.len());
                records.push(&tail[..len]);
                r = &tail[len..];
            }
            let Ok(buf) = encode_batch(&BatchId::new(&fs, 3, 2, log_offset), &records) else {
                return;
            };
            let mut buf = buf.to_vec();
            if let Some(&at) = rest.first() {
                let i = usize::from(at) * 31 % buf.len();
                buf[i] ^= rest.last().copied().unwrap_or(1) | 1;
            }
            if reseal {
                reseal_batch(&mut buf);
            }
            let _ = batch_round_trip(&buf, &fs, log_offset);
        }
        _ => {
            let template =
                encode_batch(&BatchId::new(&fs, 1, 1, log_offset), &[]).expect("empty batch");
            let mut buf = rest.to_vec();
            if buf.len() < LOG_BATCH_HEADER_BYTES {
                buf.resize(LOG_BATCH_HEADER_BYTES, 0);
            }
            // Magic, checksum, version, fs id; log offset.
            buf[..32].copy_from_slice(&template[..32]);
            buf[48..56].copy_from_slice(&template[48..56]);
            reseal_batch(&mut buf);
            let _ = batch_round_trip(&buf, &fs, log_offset);
        }
    }
}

/// A counting global allocator, so that a test can measure the peak heap
/// a decode adds: a count read from a corrupt block must never size an
/// allocation beyond what the block can hold. Register [`heap::Meter`]
/// as the `#[global_allocator]` of a test binary, then call
/// [`heap::peak_of`].
pub mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn grew(n: usize) {
        let _ = LIVE.try_with(|live| {
            let v = live.get() + n;
            live.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    fn shrank(n: usize) {
        // Memory freed by another thread than the one that allocated it
        // makes the count drift down; it only matters relative to a base.
        let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
    }

    /// The system allocator, counting.
    #[derive(Debug)]
    pub struct Meter;

    // SAFETY: every call is forwarded to `System` unchanged; the counters
    // are thread-local cells that never allocate.
    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: as for `alloc`.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` was allocated by `System` with `layout`.
            unsafe { System.dealloc(ptr, layout) };
            shrank(layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                shrank(layout.size());
                grew(new_size);
            }
            p
        }
    }

    /// Runs `f` and returns its result with the most heap bytes it held at
    /// once on this thread.
    pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        (out, PEAK.with(Cell::get) - base)
    }
}
