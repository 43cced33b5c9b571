//! LOOKUP (reference counts of bytenrs) and BACKREFS (one extent's
//! backrefs, paged), `docs/protocol.md` "LOOKUP" and "BACKREFS".

use super::{check_len, Message, RequestMessage};
use crate::error::BodyError;
use crate::frame::{Opcode, BODY_BYTES_MAX_DEFAULT};
use crate::wire::{len_u32, put_i64, put_u32, put_u64, put_u8, put_zeros, Reader};

/// LOOKUP: most bytenrs in one request.
pub const LOOKUP_COUNT_MAX: u32 = 16384;
/// LOOKUP request and reply: bytes before the entries.
pub const LOOKUP_FIXED_BYTES: usize = 8;
/// LOOKUP request: bytes per bytenr.
pub const LOOKUP_BYTENR_BYTES: usize = 8;
/// LOOKUP reply: bytes per entry.
pub const LOOKUP_ENTRY_BYTES: usize = 48;
/// LOOKUP entry flag: an extent item exists.
pub const LOOKUP_COMMITTED: u8 = 1 << 0;
/// LOOKUP entry flag: ops are pending.
pub const LOOKUP_PENDING: u8 = 1 << 1;
/// LOOKUP entry flag: `must_insert_reserved` is pending.
pub const LOOKUP_ALLOC_PENDING: u8 = 1 << 2;
/// LOOKUP entry flag: a data extent.
pub const LOOKUP_DATA: u8 = 1 << 3;
/// LOOKUP entry flag: the committed item has `FULL_BACKREF`.
pub const LOOKUP_FULL_BACKREF: u8 = 1 << 4;
/// Every LOOKUP entry flag the spec defines.
pub const LOOKUP_FLAGS_KNOWN: u8 = 0x1F;
/// BACKREFS request size.
pub const BACKREFS_REQUEST_BYTES: usize = 40;
/// BACKREFS: most entries per page.
pub const BACKREFS_ENTRIES_MAX: u32 = 16384;
/// BACKREFS reply: bytes before the entries.
pub const BACKREFS_REPLY_FIXED_BYTES: usize = 40;
/// BACKREFS reply: bytes per entry.
pub const BACKREF_ENTRY_BYTES: usize = 40;
/// BACKREFS reply `kind` when nothing is known of the extent.
pub const BACKREFS_KIND_UNKNOWN: u8 = 255;
/// BACKREFS reply `item_flags`: a data extent (`BTRFS_EXTENT_FLAG_DATA`).
pub const ITEM_FLAG_DATA: u64 = 1 << 0;
/// BACKREFS reply `item_flags`: a tree block (`BTRFS_EXTENT_FLAG_TREE_BLOCK`).
pub const ITEM_FLAG_TREE_BLOCK: u64 = 1 << 1;
/// BACKREFS reply `item_flags`: `BTRFS_BLOCK_FLAG_FULL_BACKREF`.
pub const ITEM_FLAG_FULL_BACKREF: u64 = 1 << 8;
/// Every `item_flags` bit the spec defines.
pub const ITEM_FLAGS_KNOWN: u64 = ITEM_FLAG_DATA | ITEM_FLAG_TREE_BLOCK | ITEM_FLAG_FULL_BACKREF;

const _: () = assert!(
    LOOKUP_FIXED_BYTES + LOOKUP_COUNT_MAX as usize * LOOKUP_BYTENR_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);
// Every reply fits in the smallest frame limit a server may announce
// (`docs/protocol.md`: `body_bytes_max` is at least 1 MiB).
const _: () = assert!(
    LOOKUP_FIXED_BYTES + LOOKUP_COUNT_MAX as usize * LOOKUP_ENTRY_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);
const _: () = assert!(
    BACKREFS_REPLY_FIXED_BYTES + BACKREFS_ENTRIES_MAX as usize * BACKREF_ENTRY_BYTES
        <= BODY_BYTES_MAX_DEFAULT as usize
);
// In-memory entries no larger than on the wire: see the module doc of
// `message`.
const _: () = assert!(std::mem::size_of::<LookupEntry>() <= LOOKUP_ENTRY_BYTES);
const _: () = assert!(std::mem::size_of::<BackrefEntry>() <= BACKREF_ENTRY_BYTES);
const _: () = assert!(std::mem::size_of::<u64>() <= LOOKUP_BYTENR_BYTES);

// --------------------------------------------------------------- LOOKUP

/// LOOKUP request: the bytenrs to look up (1 ..= [`LOOKUP_COUNT_MAX`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupRequest {
    /// Extent addresses.
    pub bytenrs: Vec<u64>,
}

impl LookupRequest {
    const WHAT: &'static str = "LOOKUP request";

    /// A request, refusing a count outside 1 ..= [`LOOKUP_COUNT_MAX`].
    pub fn new(bytenrs: Vec<u64>) -> Result<Self, BodyError> {
        check_len(
            Self::WHAT,
            "count",
            bytenrs.len(),
            1,
            LOOKUP_COUNT_MAX as usize,
        )?;
        Ok(LookupRequest { bytenrs })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(LOOKUP_FIXED_BYTES + self.bytenrs.len() * LOOKUP_BYTENR_BYTES);
        put_u32(out, len_u32(Self::WHAT, self.bytenrs.len()));
        put_zeros(out, 4);
        for &bytenr in &self.bytenrs {
            put_u64(out, bytenr);
        }
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        r.fixed(LOOKUP_FIXED_BYTES)?;
        let count = r.u32()?;
        r.check_range("count", u64::from(count), 1, u64::from(LOOKUP_COUNT_MAX))?;
        r.reserved(4)?;
        let count = r.expect_entries(count, LOOKUP_BYTENR_BYTES)?;
        let mut bytenrs = Vec::with_capacity(count);
        for _ in 0..count {
            bytenrs.push(r.u64()?);
        }
        r.finish()?;
        Ok(LookupRequest { bytenrs })
    }
}

/// One LOOKUP answer (48 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LookupEntry {
    /// The bytenr asked for.
    pub bytenr: u64,
    /// Committed refs + pending ref_mod.
    pub refs: i64,
    /// Refs of the committed extent item (0: none).
    pub committed_refs: u64,
    /// Sum of the pending ops' ref_mod.
    pub pending_ref_mod: i64,
    /// Extent size (0: nothing known).
    pub num_bytes: u64,
    /// `LOOKUP_*` flags.
    pub flags: u8,
    /// Tree block level.
    pub level: u8,
}

/// LOOKUP reply: one entry per requested bytenr, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupReply {
    /// The answers.
    pub entries: Vec<LookupEntry>,
}

impl LookupReply {
    const WHAT: &'static str = "LOOKUP reply";

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(LOOKUP_FIXED_BYTES + self.entries.len() * LOOKUP_ENTRY_BYTES);
        put_u32(out, len_u32(Self::WHAT, self.entries.len()));
        put_zeros(out, 4);
        for e in &self.entries {
            put_u64(out, e.bytenr);
            put_i64(out, e.refs);
            put_u64(out, e.committed_refs);
            put_i64(out, e.pending_ref_mod);
            put_u64(out, e.num_bytes);
            put_u8(out, e.flags);
            put_u8(out, e.level);
            put_zeros(out, 6);
        }
    }

    /// Decodes the body: count 1 ..= [`LOOKUP_COUNT_MAX`] (as the request's),
    /// undefined flag bits refused.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        r.fixed(LOOKUP_FIXED_BYTES)?;
        let count = r.u32()?;
        r.check_range("count", u64::from(count), 1, u64::from(LOOKUP_COUNT_MAX))?;
        r.reserved(4)?;
        let count = r.expect_entries(count, LOOKUP_ENTRY_BYTES)?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let e = LookupEntry {
                bytenr: r.u64()?,
                refs: r.i64()?,
                committed_refs: r.u64()?,
                pending_ref_mod: r.i64()?,
                num_bytes: r.u64()?,
                flags: r.u8()?,
                level: r.u8()?,
            };
            r.check_bits("flags", u64::from(e.flags), u64::from(LOOKUP_FLAGS_KNOWN))?;
            r.reserved(6)?;
            entries.push(e);
        }
        r.finish()?;
        Ok(LookupReply { entries })
    }
}

message!(LookupRequest => LookupReply, Opcode::Lookup);

// ------------------------------------------------------------- BACKREFS

/// A backref key: `(ref_type, k1, k2, k3)` as in an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct BackrefKey {
    /// 176, 178, 182 or 184.
    pub ref_type: u8,
    /// root or parent.
    pub k1: u64,
    /// objectid (178), else 0.
    pub k2: u64,
    /// offset (178), else 0.
    pub k3: u64,
}

/// BACKREFS request: one page of an extent's backrefs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackrefsRequest {
    /// The extent.
    pub bytenr: u64,
    /// Page size, 1 ..= [`BACKREFS_ENTRIES_MAX`].
    pub max_entries: u32,
    /// Start after this backref (the last one of the previous page);
    /// `None`: from the first. When absent the `after_` fields are unused
    /// and, like reserved bytes, must be zero on the wire.
    pub after: Option<BackrefKey>,
}

impl BackrefsRequest {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let after = self.after.unwrap_or_default();
        put_u64(out, self.bytenr);
        put_u32(out, self.max_entries);
        put_u8(out, u8::from(self.after.is_some()));
        put_u8(out, after.ref_type);
        put_zeros(out, 2);
        put_u64(out, after.k1);
        put_u64(out, after.k2);
        put_u64(out, after.k3);
    }

    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new("BACKREFS request", body);
        if body.len() != BACKREFS_REQUEST_BYTES {
            return Err(r.wrong_size(BACKREFS_REQUEST_BYTES as u64));
        }
        let bytenr = r.u64()?;
        let max_entries = r.u32()?;
        r.check_range(
            "max_entries",
            u64::from(max_entries),
            1,
            u64::from(BACKREFS_ENTRIES_MAX),
        )?;
        let after_present = r.bool("after_present")?;
        let ref_type = r.u8()?;
        r.reserved(2)?;
        let key = BackrefKey {
            ref_type,
            k1: r.u64()?,
            k2: r.u64()?,
            k3: r.u64()?,
        };
        r.finish()?;
        if !after_present && key != BackrefKey::default() {
            return Err(BodyError::ReservedNonZero {
                what: "BACKREFS request (after_ fields without after_present)",
                offset: 13,
            });
        }
        Ok(BackrefsRequest {
            bytenr,
            max_entries,
            after: after_present.then_some(key),
        })
    }
}

/// One backref with its count (40 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackrefEntry {
    /// 176, 178, 182 or 184.
    pub ref_type: u8,
    /// Committed + pending count (never 0 from a correct server).
    pub count: i64,
    /// root or parent.
    pub k1: u64,
    /// objectid (178).
    pub k2: u64,
    /// offset (178).
    pub k3: u64,
}

impl BackrefEntry {
    /// The key, e.g. for the next page's `after`.
    pub fn key(&self) -> BackrefKey {
        BackrefKey {
            ref_type: self.ref_type,
            k1: self.k1,
            k2: self.k2,
            k3: self.k3,
        }
    }
}

/// BACKREFS reply: the extent and one page of its backrefs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackrefsReply {
    /// The extent.
    pub bytenr: u64,
    /// Its size (0: nothing known).
    pub num_bytes: u64,
    /// Committed + pending refs.
    pub refs: i64,
    /// Flags of the committed extent item (`ITEM_FLAG_*`; 0: none).
    pub item_flags: u64,
    /// 0 tree block, 1 data, [`BACKREFS_KIND_UNKNOWN`].
    pub kind: u8,
    /// Tree block level.
    pub level: u8,
    /// Backrefs follow the last one of this page.
    pub more: bool,
    /// The page (at most [`BACKREFS_ENTRIES_MAX`]).
    pub entries: Vec<BackrefEntry>,
}

impl BackrefsReply {
    const WHAT: &'static str = "BACKREFS reply";

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(BACKREFS_REPLY_FIXED_BYTES + self.entries.len() * BACKREF_ENTRY_BYTES);
        put_u64(out, self.bytenr);
        put_u64(out, self.num_bytes);
        put_i64(out, self.refs);
        put_u64(out, self.item_flags);
        put_u8(out, self.kind);
        put_u8(out, self.level);
        put_u8(out, u8::from(self.more));
        put_zeros(out, 1);
        put_u32(out, len_u32(Self::WHAT, self.entries.len()));
        for e in &self.entries {
            put_u8(out, e.ref_type);
            put_zeros(out, 7);
            put_i64(out, e.count);
            put_u64(out, e.k1);
            put_u64(out, e.k2);
            put_u64(out, e.k3);
        }
    }

    /// Decodes the body: count at most [`BACKREFS_ENTRIES_MAX`], undefined
    /// `item_flags` bits refused.
    pub fn decode(body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(Self::WHAT, body);
        r.fixed(BACKREFS_REPLY_FIXED_BYTES)?;
        let bytenr = r.u64()?;
        let num_bytes = r.u64()?;
        let refs = r.i64()?;
        let item_flags = r.u64()?;
        r.check_bits("item_flags", item_flags, ITEM_FLAGS_KNOWN)?;
        let kind = r.u8()?;
        let level = r.u8()?;
        let more = r.bool("more")?;
        r.reserved(1)?;
        let count = r.u32()?;
        r.check_range(
            "count",
            u64::from(count),
            0,
            u64::from(BACKREFS_ENTRIES_MAX),
        )?;
        let count = r.expect_entries(count, BACKREF_ENTRY_BYTES)?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let ref_type = r.u8()?;
            r.reserved(7)?;
            entries.push(BackrefEntry {
                ref_type,
                count: r.i64()?,
                k1: r.u64()?,
                k2: r.u64()?,
                k3: r.u64()?,
            });
        }
        r.finish()?;
        Ok(BackrefsReply {
            bytenr,
            num_bytes,
            refs,
            item_flags,
            kind,
            level,
            more,
            entries,
        })
    }
}

message!(BackrefsRequest => BackrefsReply, Opcode::Backrefs);
