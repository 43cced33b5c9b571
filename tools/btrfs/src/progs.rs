//! What btrfs-progs prints, and how to read it back: names of well-known
//! tree ids, key type names, key printing, and the `EXTENT_DATA_REF` key
//! hash.
//!
//! The tables follow `kernel-shared/print-tree.c` of btrfs-progs v6.2
//! (`print_objectid()`, `print_key_type()`, `btrfs_print_key()`) and
//! `hash_extent_data_ref()` of the kernel's `fs/btrfs/extent-tree.c`. The
//! parsers use the inverse direction; the exporter prints exactly what
//! progs would, so its output diffs cleanly against a real dump.

use std::fmt;

use refd_core::model::DiskKey;

/// Bytes of a tree block header (`struct btrfs_header`): a leaf's items
/// are packed from the end of the block, so the data of its item 0 ends at
/// `nodesize - LEAF_HEADER_BYTES` (as `itemoff + itemsize` of item 0).
pub const LEAF_HEADER_BYTES: u64 = 101;
/// Bytes of an item header in a leaf (`struct btrfs_item`).
pub const LEAF_ITEM_BYTES: u64 = 25;
/// `BTRFS_TREE_RELOC_OBJECTID` (-8 as u64): relocation trees.
pub const TREE_RELOC_OBJECTID: u64 = -8i64 as u64;
/// `BTRFS_DATA_RELOC_TREE_OBJECTID` (-9 as u64): the data relocation tree.
pub const DATA_RELOC_TREE_OBJECTID: u64 = -9i64 as u64;
/// `BTRFS_FREE_SPACE_OBJECTID` (-11 as u64).
const FREE_SPACE_OBJECTID: u64 = -11i64 as u64;
/// Object id of the device stats persistent item.
const DEV_STATS_OBJECTID: u64 = 0;
/// `BTRFS_FIRST_CHUNK_TREE_OBJECTID`.
const FIRST_CHUNK_TREE_OBJECTID: u64 = 256;

/// Object ids that `print_objectid()` prints by name whatever the key type
/// (type-specific names are handled separately).
pub const OBJECTID_NAMES: &[(u64, &str)] = &[
    (1, "ROOT_TREE"),
    (2, "EXTENT_TREE"),
    (3, "CHUNK_TREE"),
    (4, "DEV_TREE"),
    (5, "FS_TREE"),
    (6, "ROOT_TREE_DIR"),
    (7, "CSUM_TREE"),
    (8, "QUOTA_TREE"),
    (9, "UUID_TREE"),
    (10, "FREE_SPACE_TREE"),
    (11, "BLOCK_GROUP_TREE"),
    (-4i64 as u64, "BALANCE"),
    (-5i64 as u64, "ORPHAN"),
    (-6i64 as u64, "TREE_LOG"),
    (-7i64 as u64, "LOG_FIXUP"),
    (TREE_RELOC_OBJECTID, "TREE_RELOC"),
    (DATA_RELOC_TREE_OBJECTID, "DATA_RELOC_TREE"),
    (-10i64 as u64, "EXTENT_CSUM"),
    (FREE_SPACE_OBJECTID, "FREE_SPACE"),
    (-12i64 as u64, "FREE_INO"),
    (-255i64 as u64, "MULTIPLE"),
];

/// btrfs key type numbers used by the extent tree parsers and printers.
pub mod key_type {
    /// `BTRFS_ROOT_ITEM_KEY`.
    pub const ROOT_ITEM: u8 = 132;
    /// `BTRFS_EXTENT_ITEM_KEY`.
    pub const EXTENT_ITEM: u8 = 168;
    /// `BTRFS_METADATA_ITEM_KEY` (skinny tree block).
    pub const METADATA_ITEM: u8 = 169;
    /// `BTRFS_TREE_BLOCK_REF_KEY`.
    pub const TREE_BLOCK_REF: u8 = 176;
    /// `BTRFS_EXTENT_DATA_REF_KEY`.
    pub const EXTENT_DATA_REF: u8 = 178;
    /// `BTRFS_SHARED_BLOCK_REF_KEY`.
    pub const SHARED_BLOCK_REF: u8 = 182;
    /// `BTRFS_SHARED_DATA_REF_KEY`.
    pub const SHARED_DATA_REF: u8 = 184;
    /// `BTRFS_BLOCK_GROUP_ITEM_KEY`.
    pub const BLOCK_GROUP_ITEM: u8 = 192;
    /// `BTRFS_DEV_ITEM_KEY`.
    pub const DEV_ITEM: u8 = 216;
    /// `BTRFS_CHUNK_ITEM_KEY`.
    pub const CHUNK_ITEM: u8 = 228;
    /// `BTRFS_QGROUP_INFO_KEY`.
    pub const QGROUP_INFO: u8 = 242;
    /// `BTRFS_QGROUP_LIMIT_KEY`.
    pub const QGROUP_LIMIT: u8 = 244;
    /// `BTRFS_QGROUP_RELATION_KEY`.
    pub const QGROUP_RELATION: u8 = 246;
    /// `BTRFS_PERSISTENT_ITEM_KEY`.
    pub const PERSISTENT_ITEM: u8 = 249;
    /// `BTRFS_UUID_KEY_SUBVOL`.
    pub const UUID_KEY_SUBVOL: u8 = 251;
    /// `BTRFS_UUID_KEY_RECEIVED_SUBVOL`.
    pub const UUID_KEY_RECEIVED_SUBVOL: u8 = 252;
}

/// Key type names as `print_key_type()` prints them.
pub const KEY_TYPE_NAMES: &[(u8, &str)] = &[
    (1, "INODE_ITEM"),
    (12, "INODE_REF"),
    (13, "INODE_EXTREF"),
    (24, "XATTR_ITEM"),
    (36, "VERITY_DESC_ITEM"),
    (37, "VERITY_MERKLE_ITEM"),
    (48, "ORPHAN_ITEM"),
    (60, "DIR_LOG_ITEM"),
    (72, "DIR_LOG_INDEX"),
    (84, "DIR_ITEM"),
    (96, "DIR_INDEX"),
    (108, "EXTENT_DATA"),
    (120, "CSUM_ITEM"),
    (128, "EXTENT_CSUM"),
    (key_type::ROOT_ITEM, "ROOT_ITEM"),
    (144, "ROOT_BACKREF"),
    (156, "ROOT_REF"),
    (key_type::EXTENT_ITEM, "EXTENT_ITEM"),
    (key_type::METADATA_ITEM, "METADATA_ITEM"),
    (key_type::TREE_BLOCK_REF, "TREE_BLOCK_REF"),
    (key_type::EXTENT_DATA_REF, "EXTENT_DATA_REF"),
    (180, "EXTENT_REF_V0"),
    (key_type::SHARED_BLOCK_REF, "SHARED_BLOCK_REF"),
    (key_type::SHARED_DATA_REF, "SHARED_DATA_REF"),
    (key_type::BLOCK_GROUP_ITEM, "BLOCK_GROUP_ITEM"),
    (198, "FREE_SPACE_INFO"),
    (199, "FREE_SPACE_EXTENT"),
    (200, "FREE_SPACE_BITMAP"),
    (204, "DEV_EXTENT"),
    (key_type::DEV_ITEM, "DEV_ITEM"),
    (key_type::CHUNK_ITEM, "CHUNK_ITEM"),
    (240, "QGROUP_STATUS"),
    (key_type::QGROUP_INFO, "QGROUP_INFO"),
    (key_type::QGROUP_LIMIT, "QGROUP_LIMIT"),
    (key_type::QGROUP_RELATION, "QGROUP_RELATION"),
    (248, "TEMPORARY_ITEM"),
    (key_type::PERSISTENT_ITEM, "PERSISTENT_ITEM"),
    (250, "DEV_REPLACE"),
    (key_type::UUID_KEY_SUBVOL, "UUID_KEY_SUBVOL"),
    (
        key_type::UUID_KEY_RECEIVED_SUBVOL,
        "UUID_KEY_RECEIVED_SUBVOL",
    ),
    (253, "STRING_ITEM"),
];

/// The name progs prints for a tree id in backrefs (`print_objectid(id,
/// 0)`), if it has one.
pub fn tree_id_name(id: u64) -> Option<&'static str> {
    OBJECTID_NAMES
        .iter()
        .find(|(v, _)| *v == id)
        .map(|(_, name)| *name)
}

/// Parse an object id as progs prints it with `print_objectid(id, 0)`: a
/// well-known name, `-1`, or an unsigned decimal.
pub fn parse_tree_id(token: &[u8]) -> Option<u64> {
    if token == b"-1" {
        return Some(u64::MAX);
    }
    if let Some(v) = crate::lex::parse_u64(token) {
        return Some(v);
    }
    OBJECTID_NAMES
        .iter()
        .find(|(_, name)| name.as_bytes() == token)
        .map(|(v, _)| *v)
}

/// Write a tree id the way progs does in backrefs (`print_objectid(id, 0)`).
pub fn write_tree_id(out: &mut impl fmt::Write, id: u64) -> fmt::Result {
    if id == u64::MAX {
        return out.write_str("-1");
    }
    match tree_id_name(id) {
        Some(name) => out.write_str(name),
        None => write!(out, "{id}"),
    }
}

/// A tree id as progs prints it, as an owned string.
pub fn tree_id_string(id: u64) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = write_tree_id(&mut s, id);
    s
}

/// The name of a key type, if progs has one.
pub fn key_type_name(item_type: u8) -> Option<&'static str> {
    KEY_TYPE_NAMES
        .iter()
        .find(|(v, _)| *v == item_type)
        .map(|(_, name)| *name)
}

/// Parse a key type as `print_key_type()` prints it: a name, `UNKNOWN.N`,
/// or `UNTYPED` (type 0 of the free space cache).
pub fn parse_key_type(token: &[u8]) -> Option<u8> {
    if token == b"UNTYPED" {
        return Some(0);
    }
    if let Some(num) = token.strip_prefix(b"UNKNOWN.") {
        return crate::lex::parse_u64(num).and_then(|v| u8::try_from(v).ok());
    }
    KEY_TYPE_NAMES
        .iter()
        .find(|(_, name)| name.as_bytes() == token)
        .map(|(v, _)| *v)
}

/// Mask of the qgroup id bits in a qgroup key part (level in the top 16).
const QGROUP_SUBVOLID_MASK: u64 = (1 << 48) - 1;

fn parse_qgroup(token: &[u8]) -> Option<u64> {
    let slash = token.iter().position(|&c| c == b'/')?;
    let level = crate::lex::parse_u64(&token[..slash])?;
    let id = crate::lex::parse_u64(&token[slash + 1..])?;
    if level > u64::from(u16::MAX) || id > QGROUP_SUBVOLID_MASK {
        return None;
    }
    Some(level << 48 | id)
}

fn parse_hex(token: &[u8]) -> Option<u64> {
    let digits = token.strip_prefix(b"0x")?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &c in digits {
        v = v << 4 | u64::from(char::from(c).to_digit(16)?);
    }
    Some(v)
}

/// Parse any key part progs may print for the objectid or offset of a key:
/// a decimal, `-1`, a tree name (including the type-specific `DEV_ITEMS`,
/// `FIRST_CHUNK_TREE`, `DEV_STATS`), a qgroup `LEVEL/ID` or `0x` hex.
pub fn parse_key_part(token: &[u8]) -> Option<u64> {
    if let Some(v) = parse_tree_id(token) {
        return Some(v);
    }
    match token {
        b"DEV_ITEMS" => return Some(1),
        b"FIRST_CHUNK_TREE" => return Some(FIRST_CHUNK_TREE_OBJECTID),
        b"DEV_STATS" => return Some(DEV_STATS_OBJECTID),
        _ => {}
    }
    parse_qgroup(token).or_else(|| parse_hex(token))
}

/// Parse the inside of a printed key, `OBJECTID TYPE OFFSET` (without the
/// parentheses).
pub fn parse_key(inner: &[u8]) -> Option<DiskKey> {
    let mut parts = inner.split(|&c| c == b' ').filter(|t| !t.is_empty());
    let objectid = parse_key_part(parts.next()?)?;
    let item_type = parse_key_type(parts.next()?)?;
    let offset = parse_key_part(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some(DiskKey {
        objectid,
        item_type,
        offset,
    })
}

/// `print_objectid(objectid, type)`.
fn write_objectid(out: &mut impl fmt::Write, objectid: u64, item_type: u8) -> fmt::Result {
    match item_type {
        key_type::PERSISTENT_ITEM if objectid == DEV_STATS_OBJECTID => {
            return out.write_str("DEV_STATS")
        }
        key_type::PERSISTENT_ITEM | 204 => return write!(out, "{objectid}"),
        key_type::QGROUP_RELATION => {
            return write!(
                out,
                "{}/{}",
                objectid >> 48,
                objectid & QGROUP_SUBVOLID_MASK
            )
        }
        key_type::UUID_KEY_SUBVOL | key_type::UUID_KEY_RECEIVED_SUBVOL => {
            return write!(out, "0x{objectid:016x}")
        }
        _ => {}
    }
    if objectid == 1 && item_type == key_type::DEV_ITEM {
        return out.write_str("DEV_ITEMS");
    }
    if objectid == FIRST_CHUNK_TREE_OBJECTID && item_type == key_type::CHUNK_ITEM {
        return out.write_str("FIRST_CHUNK_TREE");
    }
    write_tree_id(out, objectid)
}

/// Write `key (OBJECTID TYPE OFFSET)` exactly as `btrfs_print_key()` does.
pub fn write_key(out: &mut impl fmt::Write, key: &DiskKey) -> fmt::Result {
    out.write_str("key (")?;
    write_objectid(out, key.objectid, key.item_type)?;
    out.write_char(' ')?;
    if key.item_type == 0 && key.objectid == FREE_SPACE_OBJECTID {
        out.write_str("UNTYPED")?;
    } else {
        match key_type_name(key.item_type) {
            Some(name) => out.write_str(name)?,
            None => write!(out, "UNKNOWN.{}", key.item_type)?,
        }
    }
    let offset = key.offset;
    match key.item_type {
        key_type::QGROUP_RELATION | key_type::QGROUP_INFO | key_type::QGROUP_LIMIT => {
            write!(out, " {}/{})", offset >> 48, offset & QGROUP_SUBVOLID_MASK)
        }
        key_type::UUID_KEY_SUBVOL | key_type::UUID_KEY_RECEIVED_SUBVOL => {
            write!(out, " 0x{offset:016x})")
        }
        key_type::ROOT_ITEM if key.objectid == TREE_RELOC_OBJECTID => {
            out.write_char(' ')?;
            write_objectid(out, offset, key.item_type)?;
            out.write_char(')')
        }
        key_type::ROOT_ITEM => write!(out, " {offset})"),
        _ if offset == u64::MAX => out.write_str(" -1)"),
        _ => write!(out, " {offset})"),
    }
}

/// The kernel's `crc32c(seed, data)`: the raw Castagnoli CRC update,
/// without the customary inversion on entry and exit.
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The key offset of a keyed `EXTENT_DATA_REF` item: the kernel's
/// `hash_extent_data_ref(root, owner, offset)`. (On a hash collision the
/// kernel bumps the key offset by one, so a stored offset may exceed this.)
pub fn extent_data_ref_hash(root: u64, objectid: u64, offset: u64) -> u64 {
    let high = crc32c_raw(!0, &root.to_le_bytes());
    let low = crc32c_raw(!0, &objectid.to_le_bytes());
    let low = crc32c_raw(low, &offset.to_le_bytes());
    (u64::from(high) << 31) ^ u64::from(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_ids_roundtrip() {
        for &(id, name) in OBJECTID_NAMES {
            assert_eq!(tree_id_string(id), name);
            assert_eq!(parse_tree_id(name.as_bytes()), Some(id));
        }
        assert_eq!(tree_id_string(256), "256");
        assert_eq!(tree_id_string(u64::MAX), "-1");
        assert_eq!(parse_tree_id(b"-1"), Some(u64::MAX));
        assert_eq!(parse_tree_id(b"TREE_RELOC"), Some(18446744073709551608));
        assert_eq!(
            parse_tree_id(b"DATA_RELOC_TREE"),
            Some(18446744073709551607)
        );
        assert_eq!(parse_tree_id(b"NOT_A_TREE"), None);
        assert_eq!(parse_tree_id(b"12a"), None);
    }

    #[test]
    fn keys_print_and_parse_like_progs() {
        let cases = [
            ((256, 1, 0), "key (256 INODE_ITEM 0)"),
            ((13631488, 168, 69632), "key (13631488 EXTENT_ITEM 69632)"),
            ((2, 132, 0), "key (EXTENT_TREE ROOT_ITEM 0)"),
            (
                (TREE_RELOC_OBJECTID, 132, 5),
                "key (TREE_RELOC ROOT_ITEM FS_TREE)",
            ),
            ((5, 84, u64::MAX), "key (FS_TREE DIR_ITEM -1)"),
            ((1, 216, 1), "key (DEV_ITEMS DEV_ITEM 1)"),
            (
                (256, 228, 22020096),
                "key (FIRST_CHUNK_TREE CHUNK_ITEM 22020096)",
            ),
            (
                (1 << 48 | 100, 246, 256),
                "key (1/100 QGROUP_RELATION 0/256)",
            ),
            (
                (0xab, 251, 0x12),
                "key (0x00000000000000ab UUID_KEY_SUBVOL 0x0000000000000012)",
            ),
            ((FREE_SPACE_OBJECTID, 0, 7), "key (FREE_SPACE UNTYPED 7)"),
            ((300, 7, 1), "key (300 UNKNOWN.7 1)"),
        ];
        for ((objectid, item_type, offset), text) in cases {
            let key = DiskKey {
                objectid,
                item_type,
                offset,
            };
            let mut s = String::new();
            write_key(&mut s, &key).unwrap();
            assert_eq!(s, text);
            let inner = &text["key (".len()..text.len() - 1];
            assert_eq!(parse_key(inner.as_bytes()), Some(key), "{text}");
        }
        assert_eq!(parse_key(b"1 EXTENT_ITEM"), None);
        assert_eq!(parse_key(b"1 EXTENT_ITEM 2 3"), None);
        assert_eq!(parse_key(b"1 BOGUS 2"), None);
        assert_eq!(parse_key(b"1 UNKNOWN.300 2"), None);
    }

    #[test]
    fn extent_data_ref_hash_matches_a_real_dump() {
        // dedupe-1/after.txt: item key (13664256 EXTENT_DATA_REF
        // 1007496931639468316), body: root FS_TREE objectid 661 offset 491520.
        assert_eq!(extent_data_ref_hash(5, 661, 491520), 1007496931639468316);
        assert_eq!(extent_data_ref_hash(5, 556, 262144), 1007496931926768338);
    }
}
