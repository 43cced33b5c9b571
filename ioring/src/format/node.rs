//! Header of a copy-on-write B+tree node.
//!
//! A node is [`NODE_BYTES`] (16 KiB) at a 4096-aligned address in the node
//! region. Its first [`NODE_HEADER_BYTES`] bytes are the header defined here;
//! the remaining [`NODE_ITEMS_BYTES`] hold items whose layout belongs to the
//! tree code (see `docs/format.md`). The checksum covers the *whole* node,
//! header and items, so any flipped byte is detected before the tree
//! interprets a single item.
//!
//! As in btrfs, a reference to a node records the node's generation; after
//! decoding, [`NodeHeader::check_generation`] compares it, which catches a
//! lost write (the old node still at that address with a valid checksum).

use crate::aligned::BLOCK_BYTES;
use crate::format::le::{get_u32, get_u64, get_u8, put_bytes, put_u32, put_u64, put_u8};
use crate::format::{
    block_checksum, check_preamble, BlockKind, FormatError, FsId, CHECKSUM_OFFSET,
};

/// Magic of a node.
pub const NODE_MAGIC: [u8; 8] = *b"REFDNODE";
/// Layout version written and read by this build.
pub const NODE_VERSION: u32 = 1;
/// Size of a node in bytes.
pub const NODE_BYTES: usize = 16384;
/// Size of the node header in bytes; items start right after it.
pub const NODE_HEADER_BYTES: usize = 64;
/// Bytes available to items.
pub const NODE_ITEMS_BYTES: usize = NODE_BYTES - NODE_HEADER_BYTES;
/// Highest level (0 = leaf); a tree has at most `TREE_LEVEL_MAX + 1` levels.
pub const TREE_LEVEL_MAX: u8 = 7;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = crate::format::PREAMBLE_OFF_VERSION;
const OFF_FS_ID: usize = crate::format::PREAMBLE_OFF_FS_ID;
const OFF_ADDR: usize = 32;
const OFF_GENERATION: usize = 40;
const OFF_OWNER: usize = 48;
const OFF_ITEM_COUNT: usize = 56;
const OFF_LEVEL: usize = 60;
const OFF_RESERVED: usize = 61;

// A node is whole blocks, and header + items area is exactly the node.
const _: () = assert!(NODE_BYTES.is_multiple_of(BLOCK_BYTES));
const _: () = assert!(NODE_HEADER_BYTES + NODE_ITEMS_BYTES == NODE_BYTES);
// Header fields follow the shared preamble, in order, without overlap, and
// the reserved tail ends the header.
const _: () = assert!(OFF_MAGIC + 8 == crate::format::CHECKSUM_OFFSET);
const _: () = assert!(OFF_FS_ID + 16 == OFF_ADDR);
const _: () = assert!(OFF_ADDR + 8 == OFF_GENERATION);
const _: () = assert!(OFF_GENERATION + 8 == OFF_OWNER);
const _: () = assert!(OFF_OWNER + 8 == OFF_ITEM_COUNT);
const _: () = assert!(OFF_ITEM_COUNT + 4 == OFF_LEVEL);
const _: () = assert!(OFF_LEVEL + 1 == OFF_RESERVED);
const _: () = assert!(OFF_RESERVED < NODE_HEADER_BYTES);
// `item_count` (u32) can count every byte of the items area; the checksum
// needs more than the 12 preamble bytes to cover.
const _: () = assert!(NODE_ITEMS_BYTES <= u32::MAX as usize);
const _: () = assert!(NODE_HEADER_BYTES > crate::format::CHECKSUM_OFFSET + 4);

/// Decoded node header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeHeader {
    /// File system the node belongs to.
    pub fs_id: FsId,
    /// Byte address the node must live at.
    pub addr: u64,
    /// Generation (transaction) that wrote the node.
    pub generation: u64,
    /// Id of the tree owning the node.
    pub owner: u64,
    /// Number of items in the node.
    pub item_count: u32,
    /// Level, 0 for leaves, at most [`TREE_LEVEL_MAX`].
    pub level: u8,
}

fn invalid(addr: u64, field: &'static str, reason: String) -> FormatError {
    FormatError::Invalid {
        what: BlockKind::Node,
        addr,
        field,
        reason,
    }
}

impl NodeHeader {
    fn validate(&self) -> Result<(), FormatError> {
        if !self.addr.is_multiple_of(4096) {
            return Err(invalid(
                self.addr,
                "addr",
                format!("{} is not 4096-aligned", self.addr),
            ));
        }
        if self.level > TREE_LEVEL_MAX {
            return Err(invalid(
                self.addr,
                "level",
                format!("{} > {TREE_LEVEL_MAX}", self.level),
            ));
        }
        if self.item_count as usize > NODE_ITEMS_BYTES {
            return Err(invalid(
                self.addr,
                "item_count",
                format!(
                    "{} items cannot fit in {NODE_ITEMS_BYTES} bytes",
                    self.item_count
                ),
            ));
        }
        Ok(())
    }

    /// Writes this header into `node[..NODE_HEADER_BYTES]` and seals the node
    /// with a checksum over all of it. `node` must be exactly [`NODE_BYTES`];
    /// the items must already be in place (any later change to the node
    /// requires sealing again).
    pub fn seal(&self, node: &mut [u8]) -> Result<(), FormatError> {
        if node.len() < NODE_BYTES {
            return Err(FormatError::Truncated {
                what: BlockKind::Node,
                addr: self.addr,
                len_bytes: node.len(),
                need_bytes: NODE_BYTES,
            });
        }
        if node.len() > NODE_BYTES {
            return Err(invalid(
                self.addr,
                "length",
                format!(
                    "node buffer has {} bytes, expected {NODE_BYTES}",
                    node.len()
                ),
            ));
        }
        self.validate()?;
        node[..NODE_HEADER_BYTES].fill(0);
        put_bytes(node, OFF_MAGIC, &NODE_MAGIC);
        put_u32(node, OFF_VERSION, NODE_VERSION);
        put_bytes(node, OFF_FS_ID, &self.fs_id.0);
        put_u64(node, OFF_ADDR, self.addr);
        put_u64(node, OFF_GENERATION, self.generation);
        put_u64(node, OFF_OWNER, self.owner);
        put_u32(node, OFF_ITEM_COUNT, self.item_count);
        put_u8(node, OFF_LEVEL, self.level);
        let crc = block_checksum(node);
        put_u32(node, CHECKSUM_OFFSET, crc);
        debug_assert_eq!(
            NodeHeader::decode(node, &self.fs_id, self.addr),
            Ok(*self),
            "a sealed node header must decode to itself"
        );
        Ok(())
    }

    /// Decodes and verifies the node read from byte address `expected_addr`
    /// (the first [`NODE_BYTES`] of `node`; extra bytes are ignored): length,
    /// magic, checksum, version, file system, claimed address, reserved
    /// bytes and field ranges.
    pub fn decode(
        node: &[u8],
        fs_id: &FsId,
        expected_addr: u64,
    ) -> Result<NodeHeader, FormatError> {
        let what = BlockKind::Node;
        let addr = expected_addr;
        let node = check_preamble(
            node,
            what,
            addr,
            NODE_BYTES,
            NODE_MAGIC,
            NODE_VERSION,
            Some(fs_id),
        )?;
        let claimed = get_u64(node, OFF_ADDR);
        if claimed != expected_addr {
            return Err(FormatError::WrongAddress {
                what,
                expected: expected_addr,
                found: claimed,
            });
        }
        if node[OFF_RESERVED..NODE_HEADER_BYTES]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(invalid(
                addr,
                "reserved",
                "reserved bytes are not zero".to_string(),
            ));
        }
        let header = NodeHeader {
            fs_id: *fs_id,
            addr: claimed,
            generation: get_u64(node, OFF_GENERATION),
            owner: get_u64(node, OFF_OWNER),
            item_count: get_u32(node, OFF_ITEM_COUNT),
            level: get_u8(node, OFF_LEVEL),
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks the generation recorded by the node's referrer (parent pointer
    /// or superblock).
    pub fn check_generation(&self, expected: u64) -> Result<(), FormatError> {
        if self.generation != expected {
            return Err(FormatError::GenerationMismatch {
                what: BlockKind::Node,
                addr: self.addr,
                expected,
                found: self.generation,
            });
        }
        Ok(())
    }

    /// The items area of a node buffer (bytes after the header).
    pub fn items(node: &[u8]) -> Option<&[u8]> {
        node.get(NODE_HEADER_BYTES..NODE_BYTES)
    }

    /// The mutable items area of a node buffer.
    pub fn items_mut(node: &mut [u8]) -> Option<&mut [u8]> {
        node.get_mut(NODE_HEADER_BYTES..NODE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FS: FsId = FsId([3; 16]);

    fn sample() -> (NodeHeader, Vec<u8>) {
        let header = NodeHeader {
            fs_id: FS,
            addr: 1 << 20,
            generation: 17,
            owner: 5,
            item_count: 12,
            level: 1,
        };
        let mut node = vec![0u8; NODE_BYTES];
        for (i, b) in NodeHeader::items_mut(&mut node)
            .expect("items")
            .iter_mut()
            .enumerate()
        {
            *b = (i % 251) as u8;
        }
        header.seal(&mut node).expect("seal");
        (header, node)
    }

    #[test]
    fn round_trip() {
        let (header, node) = sample();
        let decoded = NodeHeader::decode(&node, &FS, 1 << 20).expect("decode");
        assert_eq!(decoded, header);
        decoded.check_generation(17).expect("generation");
        assert!(matches!(
            decoded.check_generation(18),
            Err(FormatError::GenerationMismatch {
                expected: 18,
                found: 17,
                ..
            })
        ));
        assert_eq!(
            NodeHeader::items(&node).expect("items")[300],
            (300 % 251) as u8
        );
    }

    /// Pins the byte layout of the header and the whole-node checksum.
    #[test]
    fn golden_bytes() {
        let (_, node) = sample();
        let head: String = node[..NODE_HEADER_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            head,
            "524546444e4f44454d3beb5101000000030303030303030303030303030303030000100000000000110000000000000005000000000000000c00000001000000"
        );
    }

    #[test]
    fn every_byte_flip_is_detected() {
        let (_, node) = sample();
        let mut bad = node.clone();
        for i in 0..NODE_BYTES {
            bad[i] ^= 0x04;
            let err = NodeHeader::decode(&bad, &FS, 1 << 20).expect_err("flip must be detected");
            assert!(
                matches!(
                    err,
                    FormatError::BadMagic { .. } | FormatError::BadChecksum { .. }
                ),
                "byte {i}: {err:?}"
            );
            bad[i] ^= 0x04;
        }
    }

    #[test]
    fn misdirected_foreign_and_invalid() {
        let (header, node) = sample();
        assert!(matches!(
            NodeHeader::decode(&node, &FS, 2 << 20),
            Err(FormatError::WrongAddress { .. })
        ));
        assert!(matches!(
            NodeHeader::decode(&node, &FsId([4; 16]), 1 << 20),
            Err(FormatError::ForeignFs { .. })
        ));
        assert!(matches!(
            NodeHeader::decode(&node[..4096], &FS, 1 << 20),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            NodeHeader::decode(&vec![0u8; NODE_BYTES], &FS, 1 << 20),
            Err(FormatError::BadMagic { .. })
        ));
        let mut small = vec![0u8; 100];
        assert!(matches!(
            header.seal(&mut small),
            Err(FormatError::Truncated { .. })
        ));
        let mut large = vec![0u8; NODE_BYTES + 4096];
        assert!(matches!(
            header.seal(&mut large),
            Err(FormatError::Invalid {
                field: "length",
                ..
            })
        ));
        large[..NODE_BYTES].copy_from_slice(&node);
        assert_eq!(NodeHeader::decode(&large, &FS, 1 << 20), Ok(header));
        let mut node2 = node.clone();
        for (field, bad) in [
            (
                "level",
                NodeHeader {
                    level: TREE_LEVEL_MAX + 1,
                    ..header
                },
            ),
            (
                "addr",
                NodeHeader {
                    addr: 100,
                    ..header
                },
            ),
            (
                "item_count",
                NodeHeader {
                    item_count: u32::MAX,
                    ..header
                },
            ),
        ] {
            match bad.seal(&mut node2) {
                Err(FormatError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected Invalid {field}, got {other:?}"),
            }
        }
        // A correct checksum over wrong fields is still refused.
        let mut forged = node.clone();
        put_u8(&mut forged, OFF_LEVEL, 200);
        let crc = block_checksum(&forged);
        put_u32(&mut forged, CHECKSUM_OFFSET, crc);
        assert!(matches!(
            NodeHeader::decode(&forged, &FS, 1 << 20),
            Err(FormatError::Invalid { field: "level", .. })
        ));
        let mut forged = node.clone();
        put_u8(&mut forged, OFF_RESERVED + 1, 1);
        let crc = block_checksum(&forged);
        put_u32(&mut forged, CHECKSUM_OFFSET, crc);
        assert!(matches!(
            NodeHeader::decode(&forged, &FS, 1 << 20),
            Err(FormatError::Invalid {
                field: "reserved",
                ..
            })
        ));
    }
}
