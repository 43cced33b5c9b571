//! On-disk building blocks: the superblock, the log batch framing and the
//! B+tree node header. `docs/format.md` documents every byte.
//!
//! Common rules of every block:
//!
//! - Bytes 0..8 hold an 8-byte ASCII magic, bytes 8..12 a CRC-32C
//!   (Castagnoli) checksum, little-endian. The checksum is computed over the
//!   block's covered range with bytes 8..12 taken as zero.
//! - Every block stores the version of its layout, the [`FsId`] of the file
//!   system it belongs to and the address it must live at. A block read from
//!   another address ([`FormatError::WrongAddress`]), written by another file
//!   system ([`FormatError::ForeignFs`]) or left over from an earlier pass of
//!   the log ([`FormatError::Stale`]) is rejected even though its checksum is
//!   correct: misdirected and lost writes are detected, not only bit rot.
//! - Integers are little-endian and encoded field by field (no transmutes,
//!   no `repr(C)`), so the layout is independent of the compiler.
//! - Reserved bytes are written as zero and must read as zero.
//! - Decoding never panics on any input; every problem is a typed
//!   [`FormatError`] naming the block kind, address and field.

use std::fmt;
use std::io::{self, Read};

pub mod log_batch;
pub mod node;
pub mod superblock;

pub use log_batch::{
    batch_bytes_for, batch_bytes_for_payload, batch_checksum, decode_batch, decode_batch_header,
    encode_batch, framed_record_bytes, record_len_prefix_bytes, BatchHeader, BatchId, BatchView,
    Records, LOG_BATCH_BYTES_MAX, LOG_BATCH_HEADER_BYTES, LOG_BATCH_MAGIC, LOG_BATCH_VERSION,
    LOG_RECORD_LEN_BYTES_MAX,
};
pub use node::{
    NodeHeader, NODE_BYTES, NODE_HEADER_BYTES, NODE_ITEMS_BYTES, NODE_MAGIC, NODE_VERSION,
    TREE_LEVEL_MAX,
};
pub use superblock::{
    pick_newest, pick_newest_decoded, superblock_addr_for_generation, Layout, RecoveryRecord,
    Superblock, SuperblockChoice, LOG_INFLIGHT_BATCHES_MAX, RECOVERY_MODE_NONE,
    RECOVERY_MODE_SKIP_CORRUPT, RECOVERY_MODE_TOLERATE_TAIL, SUPERBLOCK_BYTES,
    SUPERBLOCK_COUNTER_MAX, SUPERBLOCK_FLAGS_KNOWN, SUPERBLOCK_FLAG_CLEAN_UNMOUNT,
    SUPERBLOCK_MAGIC, SUPERBLOCK_REGION_BYTES, SUPERBLOCK_SLOT_ADDRS, SUPERBLOCK_VERSION,
};

/// Offset of the checksum field in every block.
pub const CHECKSUM_OFFSET: usize = 8;

/// Identity of one refd file system, chosen at format time and stored in
/// every block so that blocks of an earlier format of the same device are
/// never mistaken for current ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FsId(pub [u8; 16]);

impl FsId {
    /// A random id read from `/dev/urandom`.
    pub fn generate() -> io::Result<Self> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for FsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for FsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FsId({self})")
    }
}

/// Which kind of block an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// A superblock copy.
    Superblock,
    /// A log batch (addresses are logical log offsets).
    LogBatch,
    /// A B+tree node.
    Node,
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Superblock => "superblock",
            BlockKind::LogBatch => "log batch",
            BlockKind::Node => "node",
        })
    }
}

/// Why a block could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The device could not read the block (a media error).
    #[error("{what} at {addr}: unreadable: {error}")]
    Unreadable {
        /// Block kind.
        what: BlockKind,
        /// Address read.
        addr: u64,
        /// The read error.
        error: String,
    },
    /// The buffer is shorter than the block needs.
    #[error("{what} at {addr}: buffer has {len_bytes} bytes, need {need_bytes}")]
    Truncated {
        /// Block kind.
        what: BlockKind,
        /// Address being decoded.
        addr: u64,
        /// Bytes available.
        len_bytes: usize,
        /// Bytes needed.
        need_bytes: usize,
    },
    /// The magic does not match (never written, or not this kind of block).
    #[error("{what} at {addr}: bad magic {found:02x?}")]
    BadMagic {
        /// Block kind.
        what: BlockKind,
        /// Address being decoded.
        addr: u64,
        /// Bytes found where the magic belongs.
        found: [u8; 8],
    },
    /// The checksum does not match: corruption, or a torn write of the
    /// checksummed header itself.
    #[error(
        "{what} at {addr}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BadChecksum {
        /// Block kind.
        what: BlockKind,
        /// Address being decoded.
        addr: u64,
        /// Checksum stored in the block.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The layout version is not the one this build reads.
    #[error("{what} at {addr}: unsupported version {found}, this build reads version {supported}")]
    UnsupportedVersion {
        /// Block kind.
        what: BlockKind,
        /// Address being decoded.
        addr: u64,
        /// Version found.
        found: u32,
        /// Version supported.
        supported: u32,
    },
    /// The block belongs to another file system (an earlier format of the
    /// device).
    #[error("{what} at {addr}: belongs to file system {found}, expected {expected}")]
    ForeignFs {
        /// Block kind.
        what: BlockKind,
        /// Address being decoded.
        addr: u64,
        /// Expected file system.
        expected: FsId,
        /// File system found.
        found: FsId,
    },
    /// The block claims another address than the one it was read from: a
    /// misdirected write, or a read from the wrong place.
    #[error("{what} read from {expected} claims address {found} (misdirected write?)")]
    WrongAddress {
        /// Block kind.
        what: BlockKind,
        /// Address it was read from.
        expected: u64,
        /// Address it claims.
        found: u64,
    },
    /// A valid log batch from an earlier pass over the same log space: the
    /// log ends before it.
    #[error(
        "log batch at log offset {expected_log_offset} is stale: found lsn {lsn} written for log \
         offset {found_log_offset}"
    )]
    Stale {
        /// Log offset that was expected.
        expected_log_offset: u64,
        /// Log offset the old batch was written for.
        found_log_offset: u64,
        /// Its LSN.
        lsn: u64,
    },
    /// The batch header is intact but its payload does not match the payload
    /// checksum: the batch was torn by a crash (or its payload corrupted).
    #[error(
        "log batch at log offset {log_offset} (lsn {lsn}) is torn: payload checksum stored \
         {stored:#010x}, computed {computed:#010x}"
    )]
    Torn {
        /// Log offset of the batch.
        log_offset: u64,
        /// LSN in its header.
        lsn: u64,
        /// Payload checksum in the header.
        stored: u32,
        /// Checksum of the payload read.
        computed: u32,
    },
    /// A node's generation differs from what its parent (or the superblock)
    /// recorded: a lost or misdirected write.
    #[error("{what} at {addr}: generation {found}, expected {expected}")]
    GenerationMismatch {
        /// Block kind.
        what: BlockKind,
        /// Address.
        addr: u64,
        /// Generation recorded by the referrer.
        expected: u64,
        /// Generation in the block.
        found: u64,
    },
    /// A field is out of range or inconsistent (when decoding), or a value
    /// cannot be encoded.
    #[error("{what} at {addr}: invalid {field}: {reason}")]
    Invalid {
        /// Block kind.
        what: BlockKind,
        /// Address.
        addr: u64,
        /// Field name as in `docs/format.md`.
        field: &'static str,
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// Neither superblock copy is valid.
    #[error("no valid superblock: slot 0: {slot0}; slot 1: {slot1}")]
    NoValidSuperblock {
        /// Why copy 0 was rejected.
        slot0: Box<FormatError>,
        /// Why copy 1 was rejected.
        slot1: Box<FormatError>,
    },
}

/// Offset of the format version in the preamble every block shares: magic
/// (8 bytes) at 0, checksum at [`CHECKSUM_OFFSET`], version at 12, file
/// system id at 16.
pub(crate) const PREAMBLE_OFF_VERSION: usize = 12;
/// Offset of the file system id in the shared preamble.
pub(crate) const PREAMBLE_OFF_FS_ID: usize = 16;

// The preamble: magic (8), checksum (4), version (4), fs id (16), packed.
const _: () = assert!(CHECKSUM_OFFSET == 8);
const _: () = assert!(CHECKSUM_OFFSET + 4 == PREAMBLE_OFF_VERSION);
const _: () = assert!(PREAMBLE_OFF_VERSION + 4 == PREAMBLE_OFF_FS_ID);

/// Check the preamble every block shares, in order: length (at least
/// `need_bytes`), magic, checksum, version, and the file system id when
/// `fs_id` is given (a superblock carries the id of record and checks its
/// own). Returns the first `need_bytes` of `buf`.
pub(crate) fn check_preamble<'a>(
    buf: &'a [u8],
    what: BlockKind,
    addr: u64,
    need_bytes: usize,
    magic: [u8; 8],
    version: u32,
    fs_id: Option<&FsId>,
) -> Result<&'a [u8], FormatError> {
    use le::{get_array, get_u32};
    if buf.len() < need_bytes {
        return Err(FormatError::Truncated {
            what,
            addr,
            len_bytes: buf.len(),
            need_bytes,
        });
    }
    let b = &buf[..need_bytes];
    let found: [u8; 8] = get_array(b, 0);
    if found != magic {
        return Err(FormatError::BadMagic { what, addr, found });
    }
    let stored = get_u32(b, CHECKSUM_OFFSET);
    let computed = block_checksum(b);
    if stored != computed {
        return Err(FormatError::BadChecksum {
            what,
            addr,
            stored,
            computed,
        });
    }
    let found = get_u32(b, PREAMBLE_OFF_VERSION);
    if found != version {
        return Err(FormatError::UnsupportedVersion {
            what,
            addr,
            found,
            supported: version,
        });
    }
    if let Some(expected) = fs_id {
        let found = FsId(get_array(b, PREAMBLE_OFF_FS_ID));
        if found != *expected {
            return Err(FormatError::ForeignFs {
                what,
                addr,
                expected: *expected,
                found,
            });
        }
    }
    Ok(b)
}

/// CRC-32C of `buf` with the four checksum bytes at [`CHECKSUM_OFFSET`]
/// taken as zero. `buf` must be longer than 12 bytes (callers check).
pub(crate) fn block_checksum(buf: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&buf[..CHECKSUM_OFFSET]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[CHECKSUM_OFFSET + 4..])
}

/// Little-endian field access at fixed offsets. Callers check the buffer
/// length once before using these; offsets are constants of the layout.
pub(crate) mod le {
    pub(crate) fn get_u8(buf: &[u8], at: usize) -> u8 {
        buf[at]
    }
    pub(crate) fn get_u32(buf: &[u8], at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&buf[at..at + 4]);
        u32::from_le_bytes(b)
    }
    pub(crate) fn get_u64(buf: &[u8], at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(b)
    }
    pub(crate) fn get_array<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
        let mut b = [0u8; N];
        b.copy_from_slice(&buf[at..at + N]);
        b
    }
    pub(crate) fn put_u8(buf: &mut [u8], at: usize, v: u8) {
        buf[at] = v;
    }
    pub(crate) fn put_u32(buf: &mut [u8], at: usize, v: u32) {
        buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn put_u64(buf: &mut [u8], at: usize, v: u64) {
        buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn put_bytes(buf: &mut [u8], at: usize, v: &[u8]) {
        buf[at..at + v.len()].copy_from_slice(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_id_display_and_generate() {
        let id = FsId([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
            0x66, 0x77,
        ]);
        assert_eq!(id.to_string(), "01234567-89ab-cdef-0011-223344556677");
        let a = FsId::generate().expect("urandom");
        let b = FsId::generate().expect("urandom");
        assert_ne!(a, b);
    }

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut buf = vec![7u8; 64];
        let c = block_checksum(&buf);
        buf[8..12].copy_from_slice(&c.to_le_bytes());
        assert_eq!(block_checksum(&buf), c);
        buf[20] ^= 1;
        assert_ne!(block_checksum(&buf), c);
    }
}
