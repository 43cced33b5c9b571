//! The 56-byte op of a SUBMIT (`docs/protocol.md`, "Op").
//!
//! An op carries the fields of the kernel's `struct btrfs_ref` plus the
//! head's `extent_op`, with btrfs's names: `bytenr`, `num_bytes`, `seq`,
//! the backref key types 176/178/182/184 (`BTRFS_TREE_BLOCK_REF_KEY`,
//! `BTRFS_EXTENT_DATA_REF_KEY`, `BTRFS_SHARED_BLOCK_REF_KEY`,
//! `BTRFS_SHARED_DATA_REF_KEY`) and `FULL_BACKREF`.
//!
//! [`WireOp`] is deliberately plain numbers: this codec does not validate
//! an op's meaning. The server does, because a refused op must be
//! answered as `INVALID_OP` with its index and subcode, not as a
//! malformed body; so even the reserved bytes are kept ([`WireOp::reserved`])
//! for the server to refuse with `RESERVED_NONZERO`. Decoding an op
//! cannot fail: any 56 bytes are an op, and it re-encodes to the same
//! 56 bytes.

/// Size of an op on the wire.
pub const OP_BYTES: usize = 56;

/// Action 1: add a reference.
pub const ACTION_ADD_REF: u8 = 1;
/// Action 2: drop a reference.
pub const ACTION_DROP_REF: u8 = 2;
/// Action 3: allocate: creates the extent item (btrfs `must_insert_reserved`).
pub const ACTION_ADD_EXTENT: u8 = 3;
/// Action 4: extent_op only.
pub const ACTION_UPDATE_HEAD: u8 = 4;

/// `BTRFS_TREE_BLOCK_REF_KEY`: `k1` = root.
pub const REF_TYPE_TREE_BLOCK: u8 = 176;
/// `BTRFS_EXTENT_DATA_REF_KEY`: `k1` = root, `k2` = objectid, `k3` = offset.
pub const REF_TYPE_EXTENT_DATA: u8 = 178;
/// `BTRFS_SHARED_BLOCK_REF_KEY`: `k1` = parent.
pub const REF_TYPE_SHARED_BLOCK: u8 = 182;
/// `BTRFS_SHARED_DATA_REF_KEY`: `k1` = parent.
pub const REF_TYPE_SHARED_DATA: u8 = 184;

/// `kind` of a tree block.
pub const KIND_TREE_BLOCK: u8 = 0;
/// `kind` of a data extent.
pub const KIND_DATA: u8 = 1;

/// `eop_flags` bit 0: the extent_op sets `FULL_BACKREF` (flag 0x100).
pub const EOP_FULL_BACKREF: u8 = 1 << 0;
/// `eop_flags` bit 1: the extent_op carries a new first key.
pub const EOP_KEY: u8 = 1 << 1;
/// Every `eop_flags` bit the spec defines.
pub const EOP_FLAGS_KNOWN: u8 = EOP_FULL_BACKREF | EOP_KEY;

/// Highest tree block level.
pub const LEVEL_MAX: u8 = 7;
/// Highest `seq` (2^56 - 1).
pub const SEQ_MAX: u64 = (1 << 56) - 1;

/// The first key an extent_op sets (btrfs `btrfs_disk_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ExtentOpKey {
    /// Key objectid (`k2`).
    pub objectid: u64,
    /// Key item type (`key_type`).
    pub key_type: u8,
    /// Key offset (`k3`).
    pub offset: u64,
}

/// One op as it travels: plain numbers, see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WireOp {
    /// Extent address.
    pub bytenr: u64,
    /// Extent size.
    pub num_bytes: u64,
    /// Tree-mod-log seq (0: none).
    pub seq: u64,
    /// root (176, 178) or parent (182, 184); 0 for UPDATE_HEAD.
    pub k1: u64,
    /// objectid (178) or extent_op key objectid.
    pub k2: u64,
    /// offset (178) or extent_op key offset.
    pub k3: u64,
    /// `ACTION_*`.
    pub action: u8,
    /// `REF_TYPE_*`, 0 for UPDATE_HEAD.
    pub ref_type: u8,
    /// `KIND_*`.
    pub kind: u8,
    /// Tree block level.
    pub level: u8,
    /// `EOP_*` bits.
    pub eop_flags: u8,
    /// extent_op key type when `EOP_KEY` is set.
    pub key_type: u8,
    /// Bytes 54..56, zero on the wire; kept so the server can refuse them.
    pub reserved: u16,
}

// Six u64, six u8 and one u16: the in-memory op is no larger than the
// wire op, so a Vec of ops decoded from a body is never larger than it.
const _: () = assert!(6 * 8 + 6 + 2 == OP_BYTES);
const _: () = assert!(std::mem::size_of::<WireOp>() <= OP_BYTES);

impl WireOp {
    /// Writes the op's 56 bytes.
    pub fn encode_into(&self, out: &mut [u8; OP_BYTES]) {
        out[0..8].copy_from_slice(&self.bytenr.to_le_bytes());
        out[8..16].copy_from_slice(&self.num_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.k1.to_le_bytes());
        out[32..40].copy_from_slice(&self.k2.to_le_bytes());
        out[40..48].copy_from_slice(&self.k3.to_le_bytes());
        out[48] = self.action;
        out[49] = self.ref_type;
        out[50] = self.kind;
        out[51] = self.level;
        out[52] = self.eop_flags;
        out[53] = self.key_type;
        out[54..56].copy_from_slice(&self.reserved.to_le_bytes());
    }

    /// The op's 56 bytes.
    pub fn encode(&self) -> [u8; OP_BYTES] {
        let mut b = [0u8; OP_BYTES];
        self.encode_into(&mut b);
        b
    }

    /// Reads an op; any 56 bytes are one (see the module doc).
    pub fn decode(b: &[u8; OP_BYTES]) -> WireOp {
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        WireOp {
            bytenr: u64_at(0),
            num_bytes: u64_at(8),
            seq: u64_at(16),
            k1: u64_at(24),
            k2: u64_at(32),
            k3: u64_at(40),
            action: b[48],
            ref_type: b[49],
            kind: b[50],
            level: b[51],
            eop_flags: b[52],
            key_type: b[53],
            reserved: u16::from_le_bytes([b[54], b[55]]),
        }
    }

    /// A reference op on a data extent by (root, inode, file offset):
    /// backref 178.
    pub fn data_ref(
        action: u8,
        bytenr: u64,
        num_bytes: u64,
        root: u64,
        objectid: u64,
        offset: u64,
    ) -> WireOp {
        WireOp {
            bytenr,
            num_bytes,
            k1: root,
            k2: objectid,
            k3: offset,
            action,
            ref_type: REF_TYPE_EXTENT_DATA,
            kind: KIND_DATA,
            ..WireOp::default()
        }
    }

    /// A reference op on a data extent by parent tree block: backref 184.
    pub fn shared_data_ref(action: u8, bytenr: u64, num_bytes: u64, parent: u64) -> WireOp {
        WireOp {
            bytenr,
            num_bytes,
            k1: parent,
            action,
            ref_type: REF_TYPE_SHARED_DATA,
            kind: KIND_DATA,
            ..WireOp::default()
        }
    }

    /// A reference op on a tree block by root: backref 176.
    pub fn tree_ref(action: u8, bytenr: u64, num_bytes: u64, root: u64, level: u8) -> WireOp {
        WireOp {
            bytenr,
            num_bytes,
            k1: root,
            action,
            ref_type: REF_TYPE_TREE_BLOCK,
            kind: KIND_TREE_BLOCK,
            level,
            ..WireOp::default()
        }
    }

    /// A reference op on a tree block by parent: backref 182.
    pub fn shared_tree_ref(
        action: u8,
        bytenr: u64,
        num_bytes: u64,
        parent: u64,
        level: u8,
    ) -> WireOp {
        WireOp {
            bytenr,
            num_bytes,
            k1: parent,
            action,
            ref_type: REF_TYPE_SHARED_BLOCK,
            kind: KIND_TREE_BLOCK,
            level,
            ..WireOp::default()
        }
    }

    /// An `UPDATE_HEAD`: only an extent_op (set `FULL_BACKREF` and/or a
    /// new first key) on the head of `bytenr`.
    pub fn update_head(
        bytenr: u64,
        num_bytes: u64,
        kind: u8,
        level: u8,
        full_backref: bool,
        key: Option<ExtentOpKey>,
    ) -> WireOp {
        WireOp {
            bytenr,
            num_bytes,
            action: ACTION_UPDATE_HEAD,
            kind,
            level,
            ..WireOp::default()
        }
        .with_extent_op(full_backref, key)
    }

    /// The same op with this extent_op (for `UPDATE_HEAD` and a tree-block
    /// `ADD_EXTENT`): sets `eop_flags`, and `k2`/`key_type`/`k3` for a key.
    pub fn with_extent_op(self, full_backref: bool, key: Option<ExtentOpKey>) -> WireOp {
        let mut op = self;
        op.eop_flags = if full_backref { EOP_FULL_BACKREF } else { 0 };
        if let Some(key) = key {
            op.eop_flags |= EOP_KEY;
            op.k2 = key.objectid;
            op.key_type = key.key_type;
            op.k3 = key.offset;
        }
        op
    }

    /// The same op with this `seq`.
    pub fn with_seq(self, seq: u64) -> WireOp {
        WireOp { seq, ..self }
    }

    /// The extent_op key, when `EOP_KEY` is set.
    pub fn extent_op_key(&self) -> Option<ExtentOpKey> {
        (self.eop_flags & EOP_KEY != 0).then_some(ExtentOpKey {
            objectid: self.k2,
            key_type: self.key_type,
            offset: self.k3,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn op_exact_layout() {
        let op = WireOp::data_ref(
            ACTION_DROP_REF,
            0x0102_0304_0506_0708,
            0x1000,
            5,
            257,
            0x8000,
        )
        .with_seq(0x00AA_BBCC);
        #[rustfmt::skip]
        let expected: [u8; OP_BYTES] = [
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // bytenr
            0x00, 0x10, 0, 0, 0, 0, 0, 0,                   // num_bytes 4096
            0xCC, 0xBB, 0xAA, 0, 0, 0, 0, 0,                // seq
            5, 0, 0, 0, 0, 0, 0, 0,                         // k1 root
            0x01, 0x01, 0, 0, 0, 0, 0, 0,                   // k2 objectid 257
            0x00, 0x80, 0, 0, 0, 0, 0, 0,                   // k3 offset
            2,                                              // action DROP_REF
            178,                                            // ref_type EXTENT_DATA_REF
            1,                                              // kind data
            0,                                              // level
            0,                                              // eop_flags
            0,                                              // key_type
            0, 0,                                           // reserved
        ];
        assert_eq!(op.encode(), expected);
        assert_eq!(WireOp::decode(&expected), op);
    }

    #[test]
    fn update_head_with_key_layout() {
        let key = ExtentOpKey {
            objectid: 256,
            key_type: 84,
            offset: 9,
        };
        let op = WireOp::update_head(4096, 16384, KIND_TREE_BLOCK, 3, true, Some(key));
        let b = op.encode();
        assert_eq!(b[24..32], [0; 8]); // k1
        assert_eq!(b[32..40], 256u64.to_le_bytes());
        assert_eq!(b[40..48], 9u64.to_le_bytes());
        assert_eq!(&b[48..56], &[4, 0, 0, 3, 3, 84, 0, 0]);
        assert_eq!(op.extent_op_key(), Some(key));
        let t = WireOp::tree_ref(ACTION_ADD_EXTENT, 1, 2, 5, 1).with_extent_op(true, None);
        assert_eq!(t.eop_flags, EOP_FULL_BACKREF);
        assert_eq!(t.extent_op_key(), None);
        let s = WireOp::shared_tree_ref(ACTION_ADD_REF, 1, 2, 77, 2);
        assert_eq!((s.ref_type, s.k1, s.level), (182, 77, 2));
        let d = WireOp::shared_data_ref(ACTION_ADD_REF, 1, 2, 78);
        assert_eq!((d.ref_type, d.k1, d.kind), (184, 78, KIND_DATA));
    }

    #[test]
    fn seq_max_is_2_pow_56_minus_1() {
        assert_eq!(SEQ_MAX, 0x00FF_FFFF_FFFF_FFFF);
    }

    proptest! {
        #[test]
        fn any_56_bytes_are_an_op_that_re_encodes(bytes in proptest::array::uniform32(any::<u8>()),
                                                  tail in proptest::array::uniform24(any::<u8>())) {
            let mut b = [0u8; OP_BYTES];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&tail);
            prop_assert_eq!(WireOp::decode(&b).encode(), b);
        }
    }
}
