//! Print an [`ExtentTree`] as text: in dump-tree's extent item format, to
//! read or diff against a kernel's `after.txt`, and in a canonical
//! one-line-per-extent form that holds exactly what the invariant compares.
//!
//! # dump-tree form ([`write_dump_items`])
//!
//! Each extent prints as btrfs-progs v6.2 prints it: the item header, the
//! `refs R gen G flags F` line, `tree block skinny level N` (or
//! `tree block key (...) level N` when a tree key is recorded, i.e. a
//! non-skinny `EXTENT_ITEM`), the inline backrefs in the kernel's on-disk
//! order (type ascending, then root/parent/hash *descending*, as
//! `lookup_inline_extent_backref()` inserts them), then the keyed backref
//! items in key order (`EXTENT_DATA_REF` keyed by
//! [`progs::extent_data_ref_hash`]). Only extent items are printed: no
//! block groups, no leaf or node headers. Items are numbered and given
//! `itemoff`s as if packed densely into leaves of `nodesize`; the kernel's
//! leaves are rarely full, so item numbers and `itemoff` differ from a real
//! dump. To diff, drop them on both sides:
//!
//! ```text
//! sed -E 's/^\titem [0-9]+ /\titem /; s/ itemoff [0-9]+//'
//! ```
//!
//! # Canonical form ([`write_canonical`])
//!
//! One line per extent in bytenr order, independent of generation and of
//! inline/keyed placement, with backrefs sorted as [`RefKey`] orders them:
//!
//! ```text
//! 13631488 len=69632 data refs=3 ed(5,260,0)=1 ed(258,260,0)=1 sd(41320448)=1
//! 30408704 len=16384 tree(1) full_backref refs=2 sb(30425088) sb(30441472)
//! ```
//!
//! `tb(root)`, `sb(parent)` are tree block backrefs (count always 1);
//! `ed(root,objectid,offset)=count`, `sd(parent)=count` data backrefs.
//! Two trees satisfy the invariant exactly when their canonical forms are
//! equal, so `diff` of the canonical forms of a replay and of `after.txt`
//! is meaningful.

use std::fmt::Write as _;
use std::io::{self, BufWriter, Write};

use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{
    DiskKey, ExtentKind, RefKey, BLOCK_FLAG_FULL_BACKREF, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK,
};

use crate::progs::{self, key_type, LEAF_HEADER_BYTES, LEAF_ITEM_BYTES};

/// Size of the body of a keyed backref item.
fn keyed_item_bytes(key: &RefKey) -> u64 {
    match key {
        RefKey::TreeBlock { .. } | RefKey::SharedBlock { .. } => 0,
        RefKey::ExtentData { .. } => 28,
        RefKey::SharedData { .. } => 4,
    }
}

/// The value the kernel orders backrefs of one type by: hash for
/// `EXTENT_DATA_REF`, root or parent otherwise.
fn order_value(key: &RefKey) -> u64 {
    match *key {
        RefKey::TreeBlock { root } => root,
        RefKey::ExtentData {
            root,
            objectid,
            offset,
        } => progs::extent_data_ref_hash(root, objectid, offset),
        RefKey::SharedBlock { parent } | RefKey::SharedData { parent } => parent,
    }
}

/// `extent_flags_to_str()`.
fn write_flags(s: &mut String, flags: u64) {
    let mut empty = true;
    if flags & EXTENT_FLAG_DATA != 0 {
        s.push_str("DATA");
        empty = false;
    }
    if flags & EXTENT_FLAG_TREE_BLOCK != 0 {
        if !empty {
            s.push('|');
        }
        s.push_str("TREE_BLOCK");
    }
    if flags & BLOCK_FLAG_FULL_BACKREF != 0 {
        s.push_str("|FULL_BACKREF");
    }
}

/// Writes items into simulated dense leaves.
#[derive(Debug)]
struct LeafPacker {
    data_bytes: u64,
    used: u64,
    index: u64,
    itemoff: u64,
}

impl LeafPacker {
    fn new(nodesize: u64) -> Self {
        let data_bytes = nodesize.saturating_sub(LEAF_HEADER_BYTES).max(1);
        LeafPacker {
            data_bytes,
            used: 0,
            index: 0,
            itemoff: data_bytes,
        }
    }

    /// Header line of the next item of `size` bytes.
    fn header(&mut self, s: &mut String, key: &DiskKey, size: u64) {
        let need = LEAF_ITEM_BYTES + size;
        if self.used > 0 && self.used + need > self.data_bytes {
            self.used = 0;
            self.index = 0;
            self.itemoff = self.data_bytes;
        }
        self.used += need;
        self.itemoff = self.itemoff.saturating_sub(size);
        let _ = write!(s, "\titem {} ", self.index);
        let _ = progs::write_key(s, key);
        let _ = writeln!(s, " itemoff {} itemsize {}", self.itemoff, size);
        self.index += 1;
    }
}

fn write_edr_body(s: &mut String, root: u64, objectid: u64, offset: u64, count: u64) {
    s.push_str("\t\textent data backref root ");
    let _ = progs::write_tree_id(s, root);
    let _ = writeln!(s, " objectid {objectid} offset {offset} count {count}");
}

/// Append the dump-tree text of one extent (item and keyed items).
fn dump_extent(s: &mut String, leaf: &mut LeafPacker, bytenr: u64, item: &ExtentItem) {
    let key = match (item.kind, item.tree_key) {
        (ExtentKind::Tree { level }, None) => DiskKey {
            objectid: bytenr,
            item_type: key_type::METADATA_ITEM,
            offset: u64::from(level),
        },
        _ => DiskKey {
            objectid: bytenr,
            item_type: key_type::EXTENT_ITEM,
            offset: item.num_bytes,
        },
    };
    leaf.header(s, &key, item.item_bytes() as u64);
    let _ = write!(s, "\t\trefs {} gen {} flags ", item.refs, item.generation);
    write_flags(s, item.flags);
    s.push('\n');
    if let ExtentKind::Tree { level } = item.kind {
        match item.tree_key {
            None => {
                let _ = writeln!(s, "\t\ttree block skinny level {level}");
            }
            Some(tree_key) => {
                s.push_str("\t\ttree block ");
                let _ = progs::write_key(s, &tree_key);
                let _ = writeln!(s, " level {level}");
            }
        }
    }
    let mut inline: Vec<&(RefKey, u64)> = item.inline.iter().collect();
    inline.sort_by(|a, b| {
        (a.0.type_code(), std::cmp::Reverse(order_value(&a.0)))
            .cmp(&(b.0.type_code(), std::cmp::Reverse(order_value(&b.0))))
    });
    for &(key, count) in inline {
        match key {
            RefKey::TreeBlock { root } => {
                s.push_str("\t\ttree block backref root ");
                let _ = progs::write_tree_id(s, root);
                s.push('\n');
            }
            RefKey::SharedBlock { parent } => {
                let _ = writeln!(s, "\t\tshared block backref parent {parent}");
            }
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => write_edr_body(s, root, objectid, offset, count),
            RefKey::SharedData { parent } => {
                let _ = writeln!(s, "\t\tshared data backref parent {parent} count {count}");
            }
        }
    }
    let mut keyed: Vec<(u8, u64, RefKey, u64)> = item
        .keyed
        .iter()
        .map(|&(key, count)| (key.type_code(), order_value(&key), key, count))
        .collect();
    keyed.sort_by_key(|k| (k.0, k.1));
    // On a hash collision the kernel bumps the key offset of the later item.
    for i in 1..keyed.len() {
        if keyed[i].0 == keyed[i - 1].0 && keyed[i].1 <= keyed[i - 1].1 {
            keyed[i].1 = keyed[i - 1].1.saturating_add(1);
        }
    }
    for (item_type, offset, key, count) in keyed {
        let disk_key = DiskKey {
            objectid: bytenr,
            item_type,
            offset,
        };
        leaf.header(s, &disk_key, keyed_item_bytes(&key));
        match key {
            RefKey::TreeBlock { .. } => s.push_str("\t\ttree block backref\n"),
            RefKey::SharedBlock { .. } => s.push_str("\t\tshared block backref\n"),
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => write_edr_body(s, root, objectid, offset, count),
            RefKey::SharedData { .. } => {
                let _ = writeln!(s, "\t\tshared data backref count {count}");
            }
        }
    }
}

/// Writes extents one at a time, in ascending bytenr order, in dump-tree's
/// extent item format (see [`write_dump_items`]): for trees streamed from
/// a device, memory is one extent.
#[derive(Debug)]
pub struct DumpWriter<W: Write> {
    out: BufWriter<W>,
    leaf: LeafPacker,
    line: String,
}

impl<W: Write> DumpWriter<W> {
    /// A writer whose simulated leaves are `nodesize` bytes.
    pub fn new(nodesize: u64, out: W) -> Self {
        DumpWriter {
            out: BufWriter::new(out),
            leaf: LeafPacker::new(nodesize),
            line: String::new(),
        }
    }

    /// The next extent (bytenrs must ascend).
    pub fn push(&mut self, bytenr: u64, item: &ExtentItem) -> io::Result<()> {
        self.line.clear();
        dump_extent(&mut self.line, &mut self.leaf, bytenr, item);
        self.out.write_all(self.line.as_bytes())
    }

    /// Flush.
    pub fn finish(mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Write every extent of `tree` in dump-tree's extent item format (see the
/// module doc for what differs from a real dump). `nodesize` sizes the
/// simulated leaves.
pub fn write_dump_items<W: Write>(tree: &ExtentTree, nodesize: u64, out: W) -> io::Result<()> {
    let mut w = DumpWriter::new(nodesize, out);
    for (bytenr, item) in tree.iter() {
        w.push(bytenr, item)?;
    }
    w.finish()
}

/// Append the canonical line of one extent (without the newline).
pub fn write_canonical_line(s: &mut String, bytenr: u64, item: &ExtentItem) {
    let _ = write!(s, "{bytenr} len={} ", item.num_bytes);
    match item.kind {
        ExtentKind::Data => s.push_str("data"),
        ExtentKind::Tree { level } => {
            let _ = write!(s, "tree({level})");
            if item.full_backref() {
                s.push_str(" full_backref");
            }
        }
    }
    let _ = write!(s, " refs={}", item.refs);
    for (key, count) in item.backrefs() {
        let _ = match key {
            RefKey::TreeBlock { root } => write!(s, " tb({root})"),
            RefKey::SharedBlock { parent } => write!(s, " sb({parent})"),
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => write!(s, " ed({root},{objectid},{offset})={count}"),
            RefKey::SharedData { parent } => write!(s, " sd({parent})={count}"),
        };
        // A tree backref with a count other than 1 is invalid, but show it.
        if key.is_tree() && count != 1 {
            let _ = write!(s, "={count}");
        }
    }
}

/// The canonical line of one extent.
pub fn canonical_line(bytenr: u64, item: &ExtentItem) -> String {
    let mut s = String::new();
    write_canonical_line(&mut s, bytenr, item);
    s
}

/// Write the canonical form of `tree`: one line per extent, in bytenr order.
pub fn write_canonical<W: Write>(tree: &ExtentTree, out: W) -> io::Result<()> {
    let mut out = BufWriter::new(out);
    let mut s = String::new();
    for (bytenr, item) in tree.iter() {
        s.clear();
        write_canonical_line(&mut s, bytenr, item);
        s.push('\n');
        out.write_all(s.as_bytes())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::{parse_dump, DumpOptions};

    const ITEMS: &str = "\titem 0 key (13631488 EXTENT_ITEM 69632) itemoff 16188 itemsize 95
\t\trefs 5 gen 9 flags DATA
\t\textent data backref root 258 objectid 260 offset 0 count 1
\t\textent data backref root FS_TREE objectid 260 offset 0 count 1
\t\tshared data backref parent 41320448 count 1
\titem 1 key (13631488 EXTENT_DATA_REF 1007496931639468316) itemoff 16160 itemsize 28
\t\textent data backref root FS_TREE objectid 661 offset 491520 count 1
\titem 2 key (13631488 SHARED_DATA_REF 50003968) itemoff 16156 itemsize 4
\t\tshared data backref count 1
\titem 3 key (30408704 METADATA_ITEM 1) itemoff 16114 itemsize 42
\t\trefs 2 gen 6 flags TREE_BLOCK|FULL_BACKREF
\t\ttree block skinny level 1
\t\tshared block backref parent 30441472
\t\tshared block backref parent 30425088
\titem 4 key (30490624 EXTENT_ITEM 16384) itemoff 16063 itemsize 51
\t\trefs 2 gen 5 flags TREE_BLOCK
\t\ttree block key (FS_TREE DIR_ITEM -1) level 0
\t\ttree block backref root TREE_RELOC
\titem 5 key (30490624 TREE_BLOCK_REF 256) itemoff 16063 itemsize 0
\t\ttree block backref
";

    #[test]
    fn dump_roundtrip_is_byte_exact() {
        let (tree, _) = parse_dump(ITEMS.as_bytes(), &DumpOptions::default()).unwrap();
        let mut out = Vec::new();
        write_dump_items(&tree, 16384, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), ITEMS);
    }

    #[test]
    fn canonical_ignores_placement_and_generation() {
        let (tree, _) = parse_dump(ITEMS.as_bytes(), &DumpOptions::default()).unwrap();
        let mut out = Vec::new();
        write_canonical(&tree, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "13631488 len=69632 data refs=5 ed(5,260,0)=1 ed(5,661,491520)=1 ed(258,260,0)=1 sd(41320448)=1 sd(50003968)=1\n\
             30408704 len=16384 tree(1) full_backref refs=2 sb(30425088) sb(30441472)\n\
             30490624 len=16384 tree(0) refs=2 tb(256) tb(18446744073709551608)\n"
        );
        let mut moved = tree.clone();
        let mut item = moved.remove(13631488).unwrap();
        let keyed = std::mem::take(&mut item.keyed);
        item.inline.extend(keyed);
        item.inline.sort_by_key(|a| a.0);
        item.generation = 77;
        moved.insert(13631488, item.clone());
        assert_eq!(
            canonical_line(13631488, &item),
            canonical_line(13631488, tree.get(13631488).unwrap())
        );
    }
}
