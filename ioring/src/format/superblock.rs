//! The superblock: one 4096-byte block, kept in two copies at byte offsets 0
//! and 4096. Generation `g` is written to slot `g % 2`, so a commit never
//! overwrites the newest valid copy: if the write of generation `g` tears,
//! the copy of generation `g - 1` in the other slot is still intact.
//! [`pick_newest`] reads both and keeps the valid one with the highest
//! generation.
//!
//! Write protocol for the engine: make everything the new superblock points
//! to durable first (log batches, tree nodes), then write the new superblock
//! with [`crate::Storage::write_durable`] at
//! [`superblock_addr_for_generation`]. The superblock is the commit point of
//! a checkpoint.

use crate::aligned::BLOCK_BYTES;
use crate::device::Geometry;
use crate::format::le::{get_array, get_u32, get_u64, get_u8, put_bytes, put_u32, put_u64, put_u8};
use crate::format::{
    block_checksum, check_preamble, BlockKind, FormatError, FsId, CHECKSUM_OFFSET, NODE_BYTES,
    TREE_LEVEL_MAX,
};

/// Magic of a superblock.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"REFDSB01";
/// Layout version written and read by this build. Version 2 added the log
/// chain seed, the writer's in-flight bound and the recovery record
/// (bytes 200..248).
pub const SUPERBLOCK_VERSION: u32 = 2;
/// Size of a superblock copy in bytes.
pub const SUPERBLOCK_BYTES: usize = BLOCK_BYTES;
/// Byte addresses of the two superblock slots.
pub const SUPERBLOCK_SLOT_ADDRS: [u64; 2] = [0, SUPERBLOCK_BYTES as u64];
/// Bytes reserved at the start of the device for the two slots; the log and
/// node regions start at or after this.
pub const SUPERBLOCK_REGION_BYTES: u64 = 8192;
/// Flag: the file system was unmounted cleanly (the log is empty).
pub const SUPERBLOCK_FLAG_CLEAN_UNMOUNT: u64 = 1;
/// Every flag this build understands; other bits are refused.
pub const SUPERBLOCK_FLAGS_KNOWN: u64 = SUPERBLOCK_FLAG_CLEAN_UNMOUNT;

// Field offsets (see docs/format.md).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = crate::format::PREAMBLE_OFF_VERSION;
const OFF_FS_ID: usize = crate::format::PREAMBLE_OFF_FS_ID;
const OFF_GENERATION: usize = 32;
const OFF_SELF_ADDR: usize = 40;
const OFF_DEVICE_BYTES: usize = 48;
const OFF_LOGICAL_BLOCK: usize = 56;
const OFF_PHYSICAL_BLOCK: usize = 60;
const OFF_NODE_BYTES: usize = 64;
const OFF_RESERVED0: usize = 68;
const OFF_FLAGS: usize = 72;
const OFF_LOG_START: usize = 80;
const OFF_LOG_BYTES: usize = 88;
const OFF_LOG_HEAD_OFFSET: usize = 96;
const OFF_LOG_HEAD_LSN: usize = 104;
const OFF_LOG_TAIL_OFFSET: usize = 112;
const OFF_LOG_TAIL_LSN: usize = 120;
const OFF_NODE_REGION_START: usize = 128;
const OFF_NODE_REGION_BYTES: usize = 136;
const OFF_TREE_ROOT_ADDR: usize = 144;
const OFF_TREE_ROOT_GENERATION: usize = 152;
const OFF_TREE_ROOT_LEVEL: usize = 160;
const OFF_RESERVED1: usize = 161;
const OFF_ALLOC_NEXT: usize = 168;
const OFF_BITMAP_ADDR: usize = 176;
const OFF_BITMAP_BYTES: usize = 184;
const OFF_LAST_TXN_ID: usize = 192;
const OFF_LOG_HEAD_CHAIN: usize = 200;
const OFF_LOG_INFLIGHT_MAX: usize = 204;
const OFF_RECOVERY_GENERATION: usize = 208;
const OFF_RECOVERY_MODE: usize = 216;
const OFF_RECOVERY_DROPPED_BATCHES: usize = 220;
const OFF_RECOVERY_DROPPED_FIRST_LSN: usize = 224;
const OFF_RECOVERY_DROPPED_LAST_LSN: usize = 232;
const OFF_RECOVERY_DROPPED_OPS: usize = 240;
const OFF_RESERVED_TAIL: usize = 248;

// The two slots are consecutive blocks filling the superblock region, and
// the log and node regions (which start at or after the region) stay
// block-aligned.
const _: () = assert!(SUPERBLOCK_BYTES.is_multiple_of(BLOCK_BYTES));
const _: () = assert!(SUPERBLOCK_SLOT_ADDRS[0] == 0);
const _: () =
    assert!(SUPERBLOCK_SLOT_ADDRS[1] == SUPERBLOCK_SLOT_ADDRS[0] + SUPERBLOCK_BYTES as u64);
const _: () =
    assert!(SUPERBLOCK_REGION_BYTES == SUPERBLOCK_SLOT_ADDRS[1] + SUPERBLOCK_BYTES as u64);
const _: () = assert!(SUPERBLOCK_REGION_BYTES.is_multiple_of(BLOCK_BYTES as u64));
const _: () = assert!(SUPERBLOCK_FLAGS_KNOWN & SUPERBLOCK_FLAG_CLEAN_UNMOUNT != 0);
// Fields are packed in order after the preamble and end before the
// reserved tail, which ends the block.
const _: () = assert!(OFF_MAGIC + 8 == CHECKSUM_OFFSET && OFF_FS_ID + 16 == OFF_GENERATION);
const _: () = assert!(OFF_GENERATION + 8 == OFF_SELF_ADDR && OFF_SELF_ADDR + 8 == OFF_DEVICE_BYTES);
const _: () = assert!(OFF_DEVICE_BYTES + 8 == OFF_LOGICAL_BLOCK);
const _: () = assert!(OFF_LOGICAL_BLOCK + 4 == OFF_PHYSICAL_BLOCK);
const _: () = assert!(OFF_PHYSICAL_BLOCK + 4 == OFF_NODE_BYTES);
const _: () = assert!(OFF_NODE_BYTES + 4 == OFF_RESERVED0 && OFF_RESERVED0 + 4 == OFF_FLAGS);
const _: () = assert!(OFF_FLAGS + 8 == OFF_LOG_START && OFF_LOG_START + 8 == OFF_LOG_BYTES);
const _: () = assert!(OFF_LOG_BYTES + 8 == OFF_LOG_HEAD_OFFSET);
const _: () = assert!(OFF_LOG_HEAD_OFFSET + 8 == OFF_LOG_HEAD_LSN);
const _: () = assert!(OFF_LOG_HEAD_LSN + 8 == OFF_LOG_TAIL_OFFSET);
const _: () = assert!(OFF_LOG_TAIL_OFFSET + 8 == OFF_LOG_TAIL_LSN);
const _: () = assert!(OFF_LOG_TAIL_LSN + 8 == OFF_NODE_REGION_START);
const _: () = assert!(OFF_NODE_REGION_START + 8 == OFF_NODE_REGION_BYTES);
const _: () = assert!(OFF_NODE_REGION_BYTES + 8 == OFF_TREE_ROOT_ADDR);
const _: () = assert!(OFF_TREE_ROOT_ADDR + 8 == OFF_TREE_ROOT_GENERATION);
const _: () = assert!(OFF_TREE_ROOT_GENERATION + 8 == OFF_TREE_ROOT_LEVEL);
const _: () = assert!(OFF_TREE_ROOT_LEVEL + 1 == OFF_RESERVED1);
const _: () = assert!(OFF_RESERVED1 + 7 == OFF_ALLOC_NEXT);
const _: () = assert!(OFF_ALLOC_NEXT + 8 == OFF_BITMAP_ADDR);
const _: () = assert!(OFF_BITMAP_ADDR + 8 == OFF_BITMAP_BYTES);
const _: () = assert!(OFF_BITMAP_BYTES + 8 == OFF_LAST_TXN_ID);
const _: () = assert!(OFF_LAST_TXN_ID + 8 == OFF_LOG_HEAD_CHAIN);
const _: () = assert!(OFF_LOG_HEAD_CHAIN + 4 == OFF_LOG_INFLIGHT_MAX);
const _: () = assert!(OFF_LOG_INFLIGHT_MAX + 4 == OFF_RECOVERY_GENERATION);
const _: () = assert!(OFF_RECOVERY_GENERATION + 8 == OFF_RECOVERY_MODE);
const _: () = assert!(OFF_RECOVERY_MODE + 4 == OFF_RECOVERY_DROPPED_BATCHES);
const _: () = assert!(OFF_RECOVERY_DROPPED_BATCHES + 4 == OFF_RECOVERY_DROPPED_FIRST_LSN);
const _: () = assert!(OFF_RECOVERY_DROPPED_FIRST_LSN + 8 == OFF_RECOVERY_DROPPED_LAST_LSN);
const _: () = assert!(OFF_RECOVERY_DROPPED_LAST_LSN + 8 == OFF_RECOVERY_DROPPED_OPS);
const _: () = assert!(OFF_RECOVERY_DROPPED_OPS + 8 == OFF_RESERVED_TAIL);
const _: () = assert!(OFF_RESERVED_TAIL < SUPERBLOCK_BYTES);
// `node_bytes` is stored as a u32.
const _: () = assert!(NODE_BYTES <= u32::MAX as usize);

/// Decoded superblock. Byte layout in `docs/format.md`; the address it must
/// live at is derived from `generation` ([`Superblock::addr`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// File system identity, shared by every block.
    pub fs_id: FsId,
    /// Incremented by every superblock write; selects the slot.
    pub generation: u64,
    /// Geometry of the device at format time.
    pub geometry: Geometry,
    /// B+tree node size in bytes; always [`NODE_BYTES`].
    pub node_bytes: u32,
    /// `SUPERBLOCK_FLAG_*` bits.
    pub flags: u64,
    /// Byte address of the circular log region.
    pub log_start: u64,
    /// Length of the log region in bytes.
    pub log_bytes: u64,
    /// Logical log offset (monotonic, never wraps) where replay starts: the
    /// oldest batch not yet reflected in the tree.
    pub log_head_offset: u64,
    /// LSN of the batch expected at `log_head_offset`.
    pub log_head_lsn: u64,
    /// Logical log offset just past the last batch known durable when this
    /// superblock was written (replay continues past it while batches decode).
    pub log_tail_offset: u64,
    /// LSN of the last batch known durable when this superblock was written
    /// (`log_head_lsn - 1` if none).
    pub log_tail_lsn: u64,
    /// Byte address of the node region.
    pub node_region_start: u64,
    /// Length of the node region in bytes (a multiple of [`NODE_BYTES`]).
    pub node_region_bytes: u64,
    /// Byte address of the tree root node, 0 for an empty tree.
    pub tree_root_addr: u64,
    /// Generation stored in the root node's header.
    pub tree_root_generation: u64,
    /// Level of the root node (0 = leaf).
    pub tree_root_level: u8,
    /// Allocator: first byte address in the node region never allocated.
    pub alloc_next_unallocated: u64,
    /// Allocator: byte address of the free-space bitmap, 0 if none.
    pub free_space_bitmap_addr: u64,
    /// Allocator: length of the free-space bitmap in bytes.
    pub free_space_bitmap_bytes: u64,
    /// Highest transaction id committed.
    pub last_txn_id: u64,
    /// The log chain link the batch at `log_head_offset` must carry
    /// (`prev_checksum`): the header checksum of the batch before it, or a
    /// random seed written by format (so that batches of an earlier format
    /// of the device never chain on, even with the same `fs_id`).
    pub log_head_chain: u32,
    /// Most batches the log writer has in flight (written, not yet known
    /// durable) at any time: a damaged batch followed by an intact batch at
    /// least this many LSNs later was durable, so it is corruption, not a
    /// torn tail. Always [`LOG_INFLIGHT_BATCHES_MAX`] in this version.
    pub log_inflight_max: u32,
    /// The last recovery that dropped log batches by an operator's choice.
    pub recovery: RecoveryRecord,
}

/// Largest value of the superblock's counters and offsets (`generation`,
/// the log offsets and LSNs, `last_txn_id`, `device_bytes`): 2^62. Far
/// beyond any real use (2^62 bytes of log at 1 GB/s take 146 years), and
/// low enough that no sum of two of them (a log offset plus a region
/// length, a generation plus one) overflows a `u64`, so a crafted
/// superblock cannot make recovery's arithmetic wrap.
pub const SUPERBLOCK_COUNTER_MAX: u64 = 1 << 62;

/// The log writer's in-flight bound recorded by this version (the writer
/// writes batch `n + 1` only after batch `n` is durable).
pub const LOG_INFLIGHT_BATCHES_MAX: u32 = 1;

/// What the last explicit recovery mode dropped (all zero: none ever did).
/// Written by the recovery that dropped the batches and carried by every
/// later superblock, so `refctl fsck` can say that data was given up and
/// when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryRecord {
    /// Generation of the superblock the recovery wrote (0: never).
    pub generation: u64,
    /// The recovery mode: [`RECOVERY_MODE_NONE`],
    /// [`RECOVERY_MODE_TOLERATE_TAIL`] or [`RECOVERY_MODE_SKIP_CORRUPT`].
    pub mode: u32,
    /// Log batches dropped (damaged ones, and for tolerate-tail the intact
    /// ones after them).
    pub dropped_batches: u32,
    /// LSN of the first batch dropped.
    pub dropped_first_lsn: u64,
    /// LSN of the last batch dropped.
    pub dropped_last_lsn: u64,
    /// Ops known lost: those of the intact batches dropped (a damaged
    /// batch's ops cannot be counted).
    pub dropped_ops: u64,
}

/// [`RecoveryRecord::mode`]: no recovery mode ever dropped anything.
pub const RECOVERY_MODE_NONE: u32 = 0;
/// [`RecoveryRecord::mode`]: everything from the first damaged batch on was
/// dropped.
pub const RECOVERY_MODE_TOLERATE_TAIL: u32 = 1;
/// [`RecoveryRecord::mode`]: only the damaged batches were dropped.
pub const RECOVERY_MODE_SKIP_CORRUPT: u32 = 2;

/// Byte address of the slot that generation `generation` is written to.
pub fn superblock_addr_for_generation(generation: u64) -> u64 {
    SUPERBLOCK_SLOT_ADDRS[(generation % 2) as usize]
}

fn invalid(addr: u64, field: &'static str, reason: String) -> FormatError {
    FormatError::Invalid {
        what: BlockKind::Superblock,
        addr,
        field,
        reason,
    }
}

/// `start..start+len` as a checked range.
fn region_end(addr: u64, field: &'static str, start: u64, len: u64) -> Result<u64, FormatError> {
    start
        .checked_add(len)
        .ok_or_else(|| invalid(addr, field, format!("{start} + {len} overflows")))
}

/// Where the ref log and the node region sit on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// First byte of the log region.
    pub log_start: u64,
    /// Size of the log region.
    pub log_bytes: u64,
    /// First byte of the node region.
    pub node_region_start: u64,
    /// Size of the node region (a multiple of the node size).
    pub node_region_bytes: u64,
}

impl Superblock {
    /// The superblock of a freshly formatted device: generation 1, an
    /// empty log (the next batch is LSN 1 at log offset 0), an empty tree,
    /// nothing allocated. Override fields with struct update syntax where a
    /// caller needs more; [`Superblock::validate`] checks the result.
    pub fn empty(fs_id: FsId, geometry: Geometry, layout: Layout) -> Superblock {
        Superblock {
            fs_id,
            generation: 1,
            geometry,
            node_bytes: NODE_BYTES as u32,
            flags: 0,
            log_start: layout.log_start,
            log_bytes: layout.log_bytes,
            log_head_offset: 0,
            log_head_lsn: 1,
            log_tail_offset: 0,
            log_tail_lsn: 0,
            node_region_start: layout.node_region_start,
            node_region_bytes: layout.node_region_bytes,
            tree_root_addr: 0,
            tree_root_generation: 0,
            tree_root_level: 0,
            alloc_next_unallocated: layout.node_region_start,
            free_space_bitmap_addr: 0,
            free_space_bitmap_bytes: 0,
            last_txn_id: 0,
            log_head_chain: 0,
            log_inflight_max: LOG_INFLIGHT_BATCHES_MAX,
            recovery: RecoveryRecord::default(),
        }
    }

    /// The slot address this superblock must be written to and read from.
    pub fn addr(&self) -> u64 {
        superblock_addr_for_generation(self.generation)
    }

    /// Checks the invariants between fields (documented in
    /// `docs/format.md`). [`Superblock::encode`] and [`Superblock::decode`]
    /// both call it, so an inconsistent superblock is never written.
    pub fn validate(&self) -> Result<(), FormatError> {
        let addr = self.addr();
        for (field, value) in [
            ("generation", self.generation),
            ("device_bytes", self.geometry.size_bytes),
            ("log_head_offset", self.log_head_offset),
            ("log_tail_offset", self.log_tail_offset),
            ("log_head_lsn", self.log_head_lsn),
            ("log_tail_lsn", self.log_tail_lsn),
            ("last_txn_id", self.last_txn_id),
        ] {
            if value > SUPERBLOCK_COUNTER_MAX {
                return Err(invalid(
                    addr,
                    field,
                    format!("{value} is above the limit {SUPERBLOCK_COUNTER_MAX}"),
                ));
            }
        }
        let g = &self.geometry;
        g.check()
            .map_err(|e| invalid(addr, "geometry", e.to_string()))?;
        let size = g.size_bytes;
        if self.node_bytes as usize != NODE_BYTES {
            return Err(invalid(
                addr,
                "node_bytes",
                format!("{} != {NODE_BYTES}", self.node_bytes),
            ));
        }
        if self.flags & !crate::format::SUPERBLOCK_FLAGS_KNOWN != 0 {
            return Err(invalid(
                addr,
                "flags",
                format!("unknown bits {:#x}", self.flags),
            ));
        }

        // Log region: block aligned, after the superblocks, inside the device.
        let log_end = region_end(addr, "log_bytes", self.log_start, self.log_bytes)?;
        if self.log_start < SUPERBLOCK_REGION_BYTES
            || !self.log_start.is_multiple_of(BLOCK_BYTES as u64)
            || self.log_bytes == 0
            || !self.log_bytes.is_multiple_of(BLOCK_BYTES as u64)
            || log_end > size
        {
            return Err(invalid(
                addr,
                "log_start/log_bytes",
                format!(
                    "log region {}..{log_end} must be non-empty, 4096-aligned and inside \
                     {SUPERBLOCK_REGION_BYTES}..{size}",
                    self.log_start
                ),
            ));
        }

        // Node region: same rules, whole nodes, disjoint from the log.
        let nodes_end = region_end(
            addr,
            "node_region_bytes",
            self.node_region_start,
            self.node_region_bytes,
        )?;
        if self.node_region_start < SUPERBLOCK_REGION_BYTES
            || !self.node_region_start.is_multiple_of(BLOCK_BYTES as u64)
            || !self.node_region_bytes.is_multiple_of(NODE_BYTES as u64)
            || nodes_end > size
        {
            return Err(invalid(
                addr,
                "node_region_start/node_region_bytes",
                format!(
                    "node region {}..{nodes_end} must be 4096-aligned, whole nodes and inside \
                     {SUPERBLOCK_REGION_BYTES}..{size}",
                    self.node_region_start
                ),
            ));
        }
        if self.node_region_bytes != 0
            && self.node_region_start < log_end
            && self.log_start < nodes_end
        {
            return Err(invalid(
                addr,
                "node_region_start",
                format!(
                    "node region {}..{nodes_end} overlaps log region {}..{log_end}",
                    self.node_region_start, self.log_start
                ),
            ));
        }

        // Log positions: block aligned, head <= tail, at most one log's worth
        // of live batches.
        if !self.log_head_offset.is_multiple_of(BLOCK_BYTES as u64)
            || !self.log_tail_offset.is_multiple_of(BLOCK_BYTES as u64)
            || self.log_head_offset > self.log_tail_offset
            || self.log_tail_offset - self.log_head_offset > self.log_bytes
        {
            return Err(invalid(
                addr,
                "log_head_offset/log_tail_offset",
                format!(
                    "head {} and tail {} must be 4096-aligned with head <= tail <= head + {}",
                    self.log_head_offset, self.log_tail_offset, self.log_bytes
                ),
            ));
        }
        if self.log_head_lsn > self.log_tail_lsn.saturating_add(1) {
            return Err(invalid(
                addr,
                "log_head_lsn",
                format!(
                    "head lsn {} is beyond tail lsn {} + 1",
                    self.log_head_lsn, self.log_tail_lsn
                ),
            ));
        }

        // Tree root.
        if self.tree_root_level > TREE_LEVEL_MAX {
            return Err(invalid(
                addr,
                "tree_root_level",
                format!("{} > {TREE_LEVEL_MAX}", self.tree_root_level),
            ));
        }
        if self.tree_root_addr == 0 {
            if self.tree_root_level != 0 || self.tree_root_generation != 0 {
                return Err(invalid(
                    addr,
                    "tree_root_addr",
                    "empty tree (address 0) must have level 0 and generation 0".to_string(),
                ));
            }
        } else {
            let root_end = region_end(
                addr,
                "tree_root_addr",
                self.tree_root_addr,
                NODE_BYTES as u64,
            )?;
            if !self.tree_root_addr.is_multiple_of(BLOCK_BYTES as u64)
                || self.tree_root_addr < self.node_region_start
                || root_end > nodes_end
            {
                return Err(invalid(
                    addr,
                    "tree_root_addr",
                    format!(
                        "{} is not a 4096-aligned node inside the node region {}..{nodes_end}",
                        self.tree_root_addr, self.node_region_start
                    ),
                ));
            }
            if self.tree_root_generation > self.generation {
                return Err(invalid(
                    addr,
                    "tree_root_generation",
                    format!(
                        "root generation {} is newer than the superblock generation {}",
                        self.tree_root_generation, self.generation
                    ),
                ));
            }
        }

        // Allocator.
        if !self
            .alloc_next_unallocated
            .is_multiple_of(BLOCK_BYTES as u64)
            || self.alloc_next_unallocated < self.node_region_start
            || self.alloc_next_unallocated > nodes_end
        {
            return Err(invalid(
                addr,
                "alloc_next_unallocated",
                format!(
                    "{} is not 4096-aligned within the node region {}..={nodes_end}",
                    self.alloc_next_unallocated, self.node_region_start
                ),
            ));
        }
        if self.free_space_bitmap_addr == 0 {
            if self.free_space_bitmap_bytes != 0 {
                return Err(invalid(
                    addr,
                    "free_space_bitmap_bytes",
                    "must be 0 when there is no bitmap".to_string(),
                ));
            }
        } else {
            let end = region_end(
                addr,
                "free_space_bitmap_bytes",
                self.free_space_bitmap_addr,
                self.free_space_bitmap_bytes,
            )?;
            if !self
                .free_space_bitmap_addr
                .is_multiple_of(BLOCK_BYTES as u64)
                || self.free_space_bitmap_addr < SUPERBLOCK_REGION_BYTES
                || self.free_space_bitmap_bytes == 0
                || !self
                    .free_space_bitmap_bytes
                    .is_multiple_of(BLOCK_BYTES as u64)
                || end > size
            {
                return Err(invalid(
                    addr,
                    "free_space_bitmap_addr",
                    format!(
                        "bitmap {}..{end} must be non-empty, 4096-aligned and inside \
                         {SUPERBLOCK_REGION_BYTES}..{size}",
                        self.free_space_bitmap_addr
                    ),
                ));
            }
        }
        self.validate_log_chain_and_recovery()
    }

    /// The checks of the version 2 fields: the in-flight bound and the
    /// recovery record.
    fn validate_log_chain_and_recovery(&self) -> Result<(), FormatError> {
        let addr = self.addr();
        if self.log_inflight_max != LOG_INFLIGHT_BATCHES_MAX {
            return Err(invalid(
                addr,
                "log_inflight_max",
                format!(
                    "{} (this version writes at most {LOG_INFLIGHT_BATCHES_MAX} batch in flight)",
                    self.log_inflight_max
                ),
            ));
        }
        let r = &self.recovery;
        let consistent = match r.mode {
            RECOVERY_MODE_NONE => *r == RecoveryRecord::default(),
            RECOVERY_MODE_TOLERATE_TAIL | RECOVERY_MODE_SKIP_CORRUPT => {
                let dropped = r.dropped_batches != 0
                    && r.dropped_first_lsn != 0
                    && r.dropped_first_lsn <= r.dropped_last_lsn;
                // Going on from an older copy after the newest superblock
                // was lost drops nothing from the log.
                let older_copy = r.dropped_batches == 0
                    && r.dropped_first_lsn == 0
                    && r.dropped_last_lsn == 0
                    && r.dropped_ops == 0;
                r.generation != 0 && r.generation <= self.generation && (dropped || older_copy)
            }
            _ => false,
        };
        if !consistent {
            return Err(invalid(
                addr,
                "recovery",
                format!(
                    "mode {} generation {} dropped {} batches (lsn {}..={}), {} ops: not a \
                     recovery record",
                    r.mode,
                    r.generation,
                    r.dropped_batches,
                    r.dropped_first_lsn,
                    r.dropped_last_lsn,
                    r.dropped_ops
                ),
            ));
        }
        Ok(())
    }

    /// Encodes into one 4096-byte block (with checksum and the slot address
    /// from the generation) after [`Superblock::validate`].
    pub fn encode(&self) -> Result<[u8; SUPERBLOCK_BYTES], FormatError> {
        self.validate()?;
        let mut b = [0u8; SUPERBLOCK_BYTES];
        put_bytes(&mut b, OFF_MAGIC, &SUPERBLOCK_MAGIC);
        put_u32(&mut b, OFF_VERSION, SUPERBLOCK_VERSION);
        put_bytes(&mut b, OFF_FS_ID, &self.fs_id.0);
        put_u64(&mut b, OFF_GENERATION, self.generation);
        put_u64(&mut b, OFF_SELF_ADDR, self.addr());
        put_u64(&mut b, OFF_DEVICE_BYTES, self.geometry.size_bytes);
        put_u32(&mut b, OFF_LOGICAL_BLOCK, self.geometry.logical_block_bytes);
        put_u32(
            &mut b,
            OFF_PHYSICAL_BLOCK,
            self.geometry.physical_block_bytes,
        );
        put_u32(&mut b, OFF_NODE_BYTES, self.node_bytes);
        put_u64(&mut b, OFF_FLAGS, self.flags);
        put_u64(&mut b, OFF_LOG_START, self.log_start);
        put_u64(&mut b, OFF_LOG_BYTES, self.log_bytes);
        put_u64(&mut b, OFF_LOG_HEAD_OFFSET, self.log_head_offset);
        put_u64(&mut b, OFF_LOG_HEAD_LSN, self.log_head_lsn);
        put_u64(&mut b, OFF_LOG_TAIL_OFFSET, self.log_tail_offset);
        put_u64(&mut b, OFF_LOG_TAIL_LSN, self.log_tail_lsn);
        put_u64(&mut b, OFF_NODE_REGION_START, self.node_region_start);
        put_u64(&mut b, OFF_NODE_REGION_BYTES, self.node_region_bytes);
        put_u64(&mut b, OFF_TREE_ROOT_ADDR, self.tree_root_addr);
        put_u64(&mut b, OFF_TREE_ROOT_GENERATION, self.tree_root_generation);
        put_u8(&mut b, OFF_TREE_ROOT_LEVEL, self.tree_root_level);
        put_u64(&mut b, OFF_ALLOC_NEXT, self.alloc_next_unallocated);
        put_u64(&mut b, OFF_BITMAP_ADDR, self.free_space_bitmap_addr);
        put_u64(&mut b, OFF_BITMAP_BYTES, self.free_space_bitmap_bytes);
        put_u64(&mut b, OFF_LAST_TXN_ID, self.last_txn_id);
        put_u32(&mut b, OFF_LOG_HEAD_CHAIN, self.log_head_chain);
        put_u32(&mut b, OFF_LOG_INFLIGHT_MAX, self.log_inflight_max);
        let r = &self.recovery;
        put_u64(&mut b, OFF_RECOVERY_GENERATION, r.generation);
        put_u32(&mut b, OFF_RECOVERY_MODE, r.mode);
        put_u32(&mut b, OFF_RECOVERY_DROPPED_BATCHES, r.dropped_batches);
        put_u64(&mut b, OFF_RECOVERY_DROPPED_FIRST_LSN, r.dropped_first_lsn);
        put_u64(&mut b, OFF_RECOVERY_DROPPED_LAST_LSN, r.dropped_last_lsn);
        put_u64(&mut b, OFF_RECOVERY_DROPPED_OPS, r.dropped_ops);
        let crc = block_checksum(&b);
        put_u32(&mut b, CHECKSUM_OFFSET, crc);
        debug_assert_eq!(
            Superblock::decode(&b, self.addr()).as_ref(),
            Ok(self),
            "an encoded superblock must decode to itself"
        );
        Ok(b)
    }

    /// Decodes the copy read from slot address `expected_addr` (0 or 4096).
    /// Checks, in order: length, magic, checksum, version, claimed address,
    /// slot parity of the generation, reserved bytes, field invariants.
    pub fn decode(buf: &[u8], expected_addr: u64) -> Result<Superblock, FormatError> {
        let what = BlockKind::Superblock;
        let Some(slot) = SUPERBLOCK_SLOT_ADDRS
            .iter()
            .position(|&a| a == expected_addr)
        else {
            return Err(invalid(
                expected_addr,
                "expected_addr",
                format!("{expected_addr} is not a superblock slot (0 or 4096)"),
            ));
        };
        let b = check_preamble(
            buf,
            what,
            expected_addr,
            SUPERBLOCK_BYTES,
            SUPERBLOCK_MAGIC,
            SUPERBLOCK_VERSION,
            None,
        )?;
        let self_addr = get_u64(b, OFF_SELF_ADDR);
        if self_addr != expected_addr {
            return Err(FormatError::WrongAddress {
                what,
                expected: expected_addr,
                found: self_addr,
            });
        }
        let generation = get_u64(b, OFF_GENERATION);
        if generation % 2 != slot as u64 {
            return Err(invalid(
                expected_addr,
                "generation",
                format!(
                    "generation {generation} belongs in slot {}, found in slot {slot}",
                    generation % 2
                ),
            ));
        }
        let reserved_zero = get_u32(b, OFF_RESERVED0) == 0
            && b[OFF_RESERVED1..OFF_ALLOC_NEXT].iter().all(|&x| x == 0)
            // A slice comparison (memcmp): cheap also in debug builds,
            // where `encode` decodes every superblock it writes.
            && b[OFF_RESERVED_TAIL..] == [0u8; SUPERBLOCK_BYTES - OFF_RESERVED_TAIL];
        if !reserved_zero {
            return Err(invalid(
                expected_addr,
                "reserved",
                "reserved bytes are not zero".to_string(),
            ));
        }
        let sb = Superblock {
            fs_id: FsId(get_array(b, OFF_FS_ID)),
            generation,
            geometry: Geometry {
                size_bytes: get_u64(b, OFF_DEVICE_BYTES),
                logical_block_bytes: get_u32(b, OFF_LOGICAL_BLOCK),
                physical_block_bytes: get_u32(b, OFF_PHYSICAL_BLOCK),
            },
            node_bytes: get_u32(b, OFF_NODE_BYTES),
            flags: get_u64(b, OFF_FLAGS),
            log_start: get_u64(b, OFF_LOG_START),
            log_bytes: get_u64(b, OFF_LOG_BYTES),
            log_head_offset: get_u64(b, OFF_LOG_HEAD_OFFSET),
            log_head_lsn: get_u64(b, OFF_LOG_HEAD_LSN),
            log_tail_offset: get_u64(b, OFF_LOG_TAIL_OFFSET),
            log_tail_lsn: get_u64(b, OFF_LOG_TAIL_LSN),
            node_region_start: get_u64(b, OFF_NODE_REGION_START),
            node_region_bytes: get_u64(b, OFF_NODE_REGION_BYTES),
            tree_root_addr: get_u64(b, OFF_TREE_ROOT_ADDR),
            tree_root_generation: get_u64(b, OFF_TREE_ROOT_GENERATION),
            tree_root_level: get_u8(b, OFF_TREE_ROOT_LEVEL),
            alloc_next_unallocated: get_u64(b, OFF_ALLOC_NEXT),
            free_space_bitmap_addr: get_u64(b, OFF_BITMAP_ADDR),
            free_space_bitmap_bytes: get_u64(b, OFF_BITMAP_BYTES),
            last_txn_id: get_u64(b, OFF_LAST_TXN_ID),
            log_head_chain: get_u32(b, OFF_LOG_HEAD_CHAIN),
            log_inflight_max: get_u32(b, OFF_LOG_INFLIGHT_MAX),
            recovery: RecoveryRecord {
                generation: get_u64(b, OFF_RECOVERY_GENERATION),
                mode: get_u32(b, OFF_RECOVERY_MODE),
                dropped_batches: get_u32(b, OFF_RECOVERY_DROPPED_BATCHES),
                dropped_first_lsn: get_u64(b, OFF_RECOVERY_DROPPED_FIRST_LSN),
                dropped_last_lsn: get_u64(b, OFF_RECOVERY_DROPPED_LAST_LSN),
                dropped_ops: get_u64(b, OFF_RECOVERY_DROPPED_OPS),
            },
        };
        sb.validate()?;
        Ok(sb)
    }
}

/// Result of [`pick_newest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockChoice {
    /// The valid copy with the highest generation.
    pub superblock: Superblock,
    /// Its slot (0 or 1).
    pub slot: usize,
    /// Copies that were rejected, with the reason: log them. A rejected copy
    /// is normal after a crash during a superblock write, or on a fresh
    /// device where only one slot was written.
    pub rejected: Vec<(usize, FormatError)>,
}

/// Decodes both copies (read from slot addresses 0 and 4096) and returns the
/// valid one with the highest generation. If both are valid but belong to
/// different file systems, the older copy is reported as rejected with
/// [`FormatError::ForeignFs`]. Fails with [`FormatError::NoValidSuperblock`]
/// when neither copy is valid.
pub fn pick_newest(copy0: &[u8], copy1: &[u8]) -> Result<SuperblockChoice, FormatError> {
    pick_newest_decoded([
        Superblock::decode(copy0, SUPERBLOCK_SLOT_ADDRS[0]),
        Superblock::decode(copy1, SUPERBLOCK_SLOT_ADDRS[1]),
    ])
}

/// [`pick_newest`] of two copies already decoded (or not: a slot that could
/// not be read is an `Err`, such as [`FormatError::Unreadable`]).
pub fn pick_newest_decoded(
    decoded: [Result<Superblock, FormatError>; 2],
) -> Result<SuperblockChoice, FormatError> {
    match decoded {
        [Ok(a), Ok(b)] => {
            // Parity makes equal generations impossible.
            let (newest, newest_slot, older, older_slot) = if a.generation > b.generation {
                (a, 0, b, 1)
            } else {
                (b, 1, a, 0)
            };
            let mut rejected = Vec::new();
            if older.fs_id != newest.fs_id {
                rejected.push((
                    older_slot,
                    FormatError::ForeignFs {
                        what: BlockKind::Superblock,
                        addr: SUPERBLOCK_SLOT_ADDRS[older_slot],
                        expected: newest.fs_id,
                        found: older.fs_id,
                    },
                ));
            }
            Ok(SuperblockChoice {
                superblock: newest,
                slot: newest_slot,
                rejected,
            })
        }
        [Ok(a), Err(e)] => Ok(SuperblockChoice {
            superblock: a,
            slot: 0,
            rejected: vec![(1, e)],
        }),
        [Err(e), Ok(b)] => Ok(SuperblockChoice {
            superblock: b,
            slot: 1,
            rejected: vec![(0, e)],
        }),
        [Err(e0), Err(e1)] => Err(FormatError::NoValidSuperblock {
            slot0: Box::new(e0),
            slot1: Box::new(e1),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(generation: u64) -> Superblock {
        let size = 64u64 << 20;
        Superblock {
            fs_id: FsId([0xA5; 16]),
            generation,
            geometry: Geometry {
                size_bytes: size,
                logical_block_bytes: 512,
                physical_block_bytes: 4096,
            },
            node_bytes: NODE_BYTES as u32,
            flags: 0,
            log_start: 8192,
            log_bytes: 8 << 20,
            log_head_offset: 3 * 4096,
            log_head_lsn: 10,
            log_tail_offset: 9 * 4096,
            log_tail_lsn: 14,
            node_region_start: 8192 + (8 << 20),
            node_region_bytes: 32 << 20,
            tree_root_addr: 8192 + (8 << 20) + 5 * NODE_BYTES as u64,
            tree_root_generation: generation,
            tree_root_level: 2,
            alloc_next_unallocated: 8192 + (8 << 20) + 64 * NODE_BYTES as u64,
            free_space_bitmap_addr: 0,
            free_space_bitmap_bytes: 0,
            last_txn_id: 99,
            log_head_chain: 0xC0FF_EE11,
            log_inflight_max: LOG_INFLIGHT_BATCHES_MAX,
            recovery: RecoveryRecord::default(),
        }
    }

    /// Review item 6: counters and offsets near 2^64 (which made recovery's
    /// arithmetic overflow: a panic in debug builds, a wrap in release) are
    /// refused by the decoder, with the field named.
    #[test]
    fn counters_near_the_top_of_u64_are_refused() {
        type Set = fn(&mut Superblock);
        let cases: [(&str, Set); 5] = [
            ("generation", |sb| sb.generation = u64::MAX - 1),
            ("log_head_offset", |sb| {
                sb.log_head_offset = u64::MAX - 4095;
                sb.log_tail_offset = u64::MAX - 4095;
            }),
            ("log_tail_lsn", |sb| sb.log_tail_lsn = u64::MAX),
            ("last_txn_id", |sb| sb.last_txn_id = u64::MAX),
            ("device_bytes", |sb| {
                sb.geometry.size_bytes = u64::MAX - 4095
            }),
        ];
        for (field, set) in cases {
            let mut sb = sample(4);
            set(&mut sb);
            match sb.validate() {
                Err(FormatError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected Invalid, got {other:?}"),
            }
        }
        let mut sb = sample(4);
        sb.generation = SUPERBLOCK_COUNTER_MAX;
        assert!(sb.validate().is_ok());
    }

    #[test]
    fn round_trip_both_slots() {
        for generation in [1u64, 2, 7, 1 << 40] {
            let sb = sample(generation);
            let block = sb.encode().expect("encode");
            let addr = sb.addr();
            assert_eq!(addr, SUPERBLOCK_SLOT_ADDRS[(generation % 2) as usize]);
            assert_eq!(Superblock::decode(&block, addr).expect("decode"), sb);
            let other = SUPERBLOCK_SLOT_ADDRS[1 - (generation % 2) as usize];
            assert!(matches!(
                Superblock::decode(&block, other),
                Err(FormatError::WrongAddress { .. })
            ));
        }
    }

    /// Pins the byte layout of the fields and the checksum.
    #[test]
    fn golden_bytes() {
        let block = sample(3).encode().expect("encode");
        let head: String = block[..256].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            head,
            "52454644534230313dfde2fe02000000a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a50300000000000000001000000000000000000004000000000002000000100000004000000000000000000000000000000020000000000000000080000000000000300000000000000a0000000000000000900000000000000e0000000000000000208000000000000000000200000000006081000000000003000000000000000200000000000000002090000000000000000000000000000000000000000000630000000000000011eeffc001000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        );
    }

    #[test]
    fn every_byte_flip_is_detected() {
        let sb = sample(3);
        let block = sb.encode().expect("encode");
        for i in 0..SUPERBLOCK_BYTES {
            let mut bad = block;
            bad[i] ^= 0x01;
            let err = Superblock::decode(&bad, sb.addr()).expect_err("flip must be detected");
            assert!(
                matches!(
                    err,
                    FormatError::BadMagic { .. } | FormatError::BadChecksum { .. }
                ),
                "byte {i}: {err:?}"
            );
        }
    }

    #[test]
    fn semantic_checks_run_after_a_valid_checksum() {
        // A block with a correct checksum but a wrong field (written by a
        // buggy encoder) is still refused, with the field named.
        let sb = sample(3);
        let mut block = sb.encode().expect("encode");
        put_u32(&mut block, OFF_VERSION, 9);
        let crc = block_checksum(&block);
        put_u32(&mut block, CHECKSUM_OFFSET, crc);
        assert!(matches!(
            Superblock::decode(&block, sb.addr()),
            Err(FormatError::UnsupportedVersion { found: 9, .. })
        ));

        let mut block = sb.encode().expect("encode");
        put_u64(&mut block, OFF_GENERATION, 4);
        let crc = block_checksum(&block);
        put_u32(&mut block, CHECKSUM_OFFSET, crc);
        assert!(matches!(
            Superblock::decode(&block, sb.addr()),
            Err(FormatError::Invalid {
                field: "generation",
                ..
            })
        ));

        let mut block = sb.encode().expect("encode");
        block[4000] = 1;
        let crc = block_checksum(&block);
        put_u32(&mut block, CHECKSUM_OFFSET, crc);
        assert!(matches!(
            Superblock::decode(&block, sb.addr()),
            Err(FormatError::Invalid {
                field: "reserved",
                ..
            })
        ));
        assert!(matches!(
            Superblock::decode(&block[..100], sb.addr()),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            Superblock::decode(&block, 8192),
            Err(FormatError::Invalid {
                field: "expected_addr",
                ..
            })
        ));
    }

    #[test]
    fn validate_rejects_inconsistent_fields() {
        type Mutation = Box<dyn Fn(&mut Superblock)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("geometry", Box::new(|s| s.geometry.size_bytes += 512)),
            ("node_bytes", Box::new(|s| s.node_bytes = 4096)),
            ("flags", Box::new(|s| s.flags = 0x80)),
            ("log_start/log_bytes", Box::new(|s| s.log_start = 4096)),
            ("log_start/log_bytes", Box::new(|s| s.log_bytes = 0)),
            ("log_bytes", Box::new(|s| s.log_bytes = u64::MAX)),
            ("log_start/log_bytes", Box::new(|s| s.log_bytes = 128 << 20)),
            (
                "node_region_start",
                Box::new(|s| s.node_region_start = 8192 + 4096),
            ),
            (
                "node_region_start/node_region_bytes",
                Box::new(|s| s.node_region_bytes = 4096),
            ),
            (
                "log_head_offset/log_tail_offset",
                Box::new(|s| s.log_head_offset = 100 * 4096),
            ),
            (
                "log_head_offset/log_tail_offset",
                Box::new(|s| s.log_tail_offset = 4097),
            ),
            (
                "log_head_offset/log_tail_offset",
                Box::new(|s| s.log_tail_offset = s.log_head_offset + (9 << 20)),
            ),
            ("log_head_lsn", Box::new(|s| s.log_head_lsn = 16)),
            (
                "tree_root_level",
                Box::new(|s| s.tree_root_level = TREE_LEVEL_MAX + 1),
            ),
            ("tree_root_addr", Box::new(|s| s.tree_root_addr = 8192)),
            ("tree_root_addr", Box::new(|s| s.tree_root_addr += 1)),
            (
                "tree_root_addr",
                Box::new(|s| {
                    s.tree_root_addr = 0;
                    s.tree_root_level = 1;
                }),
            ),
            (
                "tree_root_generation",
                Box::new(|s| s.tree_root_generation = s.generation + 1),
            ),
            (
                "alloc_next_unallocated",
                Box::new(|s| s.alloc_next_unallocated = 8192),
            ),
            (
                "free_space_bitmap_bytes",
                Box::new(|s| s.free_space_bitmap_bytes = 4096),
            ),
            (
                "free_space_bitmap_addr",
                Box::new(|s| {
                    s.free_space_bitmap_addr = 4096;
                    s.free_space_bitmap_bytes = 4096;
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut sb = sample(5);
            mutate(&mut sb);
            match sb.encode() {
                Err(FormatError::Invalid { field: f, .. }) => assert_eq!(f, field, "{sb:?}"),
                other => panic!("expected Invalid {field}, got {other:?}"),
            }
        }
        // Valid corner cases.
        let mut sb = sample(5);
        sb.tree_root_addr = 0;
        sb.tree_root_level = 0;
        sb.tree_root_generation = 0;
        sb.free_space_bitmap_addr = 60 << 20;
        sb.free_space_bitmap_bytes = 4096;
        sb.flags = SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
        sb.log_head_lsn = sb.log_tail_lsn + 1;
        sb.log_head_offset = sb.log_tail_offset;
        let block = sb.encode().expect("encode");
        assert_eq!(Superblock::decode(&block, sb.addr()).expect("decode"), sb);
    }

    /// A recovery record says either what was dropped from the log, or,
    /// all dropped fields zero, that the operator went on from an older
    /// copy after a newer superblock was lost; a mix of both is invalid.
    #[test]
    fn recovery_records_dropped_or_older_copy() {
        let record = |batches, first, last, ops| RecoveryRecord {
            generation: 4,
            mode: RECOVERY_MODE_TOLERATE_TAIL,
            dropped_batches: batches,
            dropped_first_lsn: first,
            dropped_last_lsn: last,
            dropped_ops: ops,
        };
        for (r, valid) in [
            (record(2, 7, 8, 5), true),
            (record(0, 0, 0, 0), true),
            (record(0, 7, 8, 0), false),
            (record(0, 0, 0, 5), false),
            (record(2, 0, 0, 0), false),
            (record(1, 8, 7, 0), false),
        ] {
            let mut sb = sample(5);
            sb.recovery = r;
            match sb.encode() {
                Ok(block) if valid => {
                    assert_eq!(Superblock::decode(&block, sb.addr()).expect("decode"), sb)
                }
                Err(FormatError::Invalid { field, .. }) if !valid => {
                    assert_eq!(field, "recovery")
                }
                other => panic!("{r:?}: valid {valid}, got {other:?}"),
            }
        }
    }

    #[test]
    fn pick_newest_cases() {
        let old = sample(6);
        let new = sample(7);
        let b_old = old.encode().expect("encode");
        let b_new = new.encode().expect("encode");
        let choice = pick_newest(&b_old, &b_new).expect("pick");
        assert_eq!((choice.slot, choice.superblock.generation), (1, 7));
        assert!(choice.rejected.is_empty());

        let newer = sample(8);
        let b_newer = newer.encode().expect("encode");
        let choice = pick_newest(&b_newer, &b_new).expect("pick");
        assert_eq!((choice.slot, choice.superblock.generation), (0, 8));

        // Torn newest copy: fall back to the older one and say why.
        let mut torn = b_newer;
        torn[100..].fill(0);
        let choice = pick_newest(&torn, &b_new).expect("pick");
        assert_eq!((choice.slot, choice.superblock.generation), (1, 7));
        assert_eq!(choice.rejected.len(), 1);
        assert!(matches!(
            choice.rejected[0],
            (0, FormatError::BadChecksum { .. })
        ));

        // Fresh device: only slot 1 written.
        let zero = [0u8; SUPERBLOCK_BYTES];
        let choice = pick_newest(&zero, &b_new).expect("pick");
        assert_eq!(choice.slot, 1);
        assert!(matches!(
            choice.rejected[0],
            (0, FormatError::BadMagic { .. })
        ));

        // A copy written to the wrong slot is rejected.
        let choice = pick_newest(&b_new, &b_old);
        assert!(matches!(choice, Err(FormatError::NoValidSuperblock { .. })));

        // Different file systems: newest wins, the other is reported.
        let mut foreign = sample(6);
        foreign.fs_id = FsId([1; 16]);
        let choice = pick_newest(&foreign.encode().expect("encode"), &b_new).expect("pick");
        assert_eq!(choice.slot, 1);
        assert!(matches!(
            choice.rejected[0],
            (0, FormatError::ForeignFs { .. })
        ));

        match pick_newest(&zero, &zero[..10]) {
            Err(FormatError::NoValidSuperblock { slot0, slot1 }) => {
                assert!(matches!(*slot0, FormatError::BadMagic { .. }));
                assert!(matches!(*slot1, FormatError::Truncated { .. }));
            }
            other => panic!("expected NoValidSuperblock, got {other:?}"),
        }
    }
}
