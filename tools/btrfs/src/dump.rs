//! Streaming parser of `btrfs inspect-internal dump-tree -t extent` text
//! (btrfs-progs v6.2) into an [`ExtentTree`].
//!
//! What is read:
//! - `(BYTENR EXTENT_ITEM NUM_BYTES)`: a data extent, or on filesystems
//!   without skinny metadata a tree block whose body has a
//!   `tree block key (...) level N` line (kept as `tree_key` and level);
//! - `(BYTENR METADATA_ITEM LEVEL)`: a skinny tree block; its size is the
//!   nodesize (see below), and its body repeats the level
//!   (`tree block skinny level N`), which is checked;
//! - the body line `refs R gen G flags F` (`DATA`, `TREE_BLOCK`,
//!   `TREE_BLOCK|FULL_BACKREF`) and the inline backrefs of the four kinds,
//!   attached to [`ExtentItem::inline`];
//! - the keyed backref items that follow their extent item in key order,
//!   `(B TREE_BLOCK_REF ROOT)`, `(B SHARED_BLOCK_REF PARENT)`,
//!   `(B EXTENT_DATA_REF HASH)` and `(B SHARED_DATA_REF PARENT)`, attached to
//!   [`ExtentItem::keyed`]. A leaf may end between an extent item and its
//!   keyed items; node and leaf headers in between do not matter.
//!
//! The nodesize: a skinny item does not record its tree block's size, but
//! every leaf of the dump does. Items are packed from the end of the
//! block, so the first item after a `leaf ...` header, item 0, ends where
//! the block does: `itemoff + itemsize + LEAF_HEADER_BYTES` (101) is the
//! nodesize (16283 + 101 = 16384 with mkfs's default, 3995 + 101 = 4096
//! with `mkfs.btrfs -n 4096`). [`DumpOptions::nodesize`] `None` takes it
//! from the first leaf; a given nodesize, or the one the first leaf gave,
//! must agree with every later leaf ([`DumpError::Nodesize`]). A fragment
//! without leaf headers has nothing to tell and gets [`NODESIZE_DEFAULT`].
//!
//! Everything else is skipped knowingly and counted in [`DumpStats`]: other
//! items (`BLOCK_GROUP_ITEM`, ...) by type name, leaf and node headers,
//! node key pointers. Lines that fit nowhere (outside an extent's body) are
//! counted with examples.
//!
//! Every extent is checked when complete: the stored `refs` must equal the
//! sum of the backref counts ([`ExtentItem::check`]), the `itemsize` must
//! equal the encoded size of what was listed (progs stops printing inline
//! refs at a type it does not know, so a short listing shows up here), and
//! every field must be present and well formed. Any violation is a typed
//! [`DumpError`] with the line number and text; nothing panics.

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::path::Path;

use refd_core::extent_tree::{ExtentItem, ExtentTree, ItemError};
use refd_core::model::{
    DiskKey, ExtentKind, RefKey, BLOCK_FLAG_FULL_BACKREF, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK,
    LEVEL_MAX,
};

use crate::lex::{self, parse_u64, tokens, LineReader, Tally};
use crate::open::{self, OpenError};
use crate::progs::{self, key_type};

/// The default nodesize of `mkfs.btrfs` (and of every capture in
/// `../shared/traces`).
pub const NODESIZE_DEFAULT: u64 = 16384;

/// How to read a dump.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpOptions {
    /// Size of a tree block; skinny `METADATA_ITEM`s do not record it.
    /// `None`: the one the dump's leaves show (module doc), or
    /// [`NODESIZE_DEFAULT`] for a fragment without leaf headers. A given
    /// size must agree with every leaf.
    pub nodesize: Option<u64>,
}

/// What was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Lines read.
    pub lines: u64,
    /// Bytes read (decompressed).
    pub bytes: u64,
    /// Every item header, by the type name progs printed.
    pub items_by_type: BTreeMap<String, u64>,
    /// Extents loaded (data + tree blocks).
    pub extents: u64,
    /// Data extents loaded.
    pub data_extents: u64,
    /// Tree blocks loaded.
    pub tree_extents: u64,
    /// Backrefs stored inline in extent items.
    pub inline_refs: u64,
    /// Backrefs stored as keyed items.
    pub keyed_refs: u64,
    /// Leaf/node headers, uuids, the progs banner and the trailer.
    pub header_lines: u64,
    /// `key (...) block N gen G` lines of interior nodes.
    pub node_ptr_lines: u64,
    /// Body lines of items that are not extents or backrefs.
    pub skipped_body_lines: u64,
    /// Lines outside any extent that match nothing known.
    pub unrecognized: Tally,
    /// Keyed `EXTENT_DATA_REF` items whose key offset is not the hash of
    /// their body (legal only after a hash collision).
    pub hash_mismatches: Tally,
    /// The nodesize the tree blocks were given: the one asked for, or the
    /// one the leaves showed, or [`NODESIZE_DEFAULT`] (module doc).
    pub nodesize: u64,
    /// Leaves whose item 0 showed the nodesize (all agreed with it).
    pub leaves_measured: u64,
}

/// Why a dump was refused.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The file could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Reading failed (for `.zst`: a truncated or corrupt stream).
    #[error("line {line}: read error: {source}")]
    Io {
        /// Line being read.
        line: u64,
        /// The I/O or decoder error.
        #[source]
        source: io::Error,
    },
    /// A line that should hold known fields does not parse.
    #[error("line {line}: {reason}: {text:?}")]
    Malformed {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// An item lacks a line it must have.
    #[error("line {line}: item has no {field} line: {text:?}")]
    MissingField {
        /// Line of the item header.
        line: u64,
        /// Item header text.
        text: String,
        /// The missing line.
        field: &'static str,
    },
    /// A keyed backref item with no extent item before it.
    #[error(
        "line {line}: keyed backref of extent {bytenr} does not follow its extent item: {text:?}"
    )]
    KeyedWithoutExtent {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// Extent named by the key.
        bytenr: u64,
    },
    /// The same extent twice.
    #[error("line {line}: extent {bytenr} listed twice: {text:?}")]
    DuplicateExtent {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// Extent.
        bytenr: u64,
    },
    /// The same backref twice in one extent.
    #[error("line {line}: extent {bytenr}: backref '{key}' listed twice: {text:?}")]
    DuplicateBackref {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// Extent.
        bytenr: u64,
        /// Backref.
        key: RefKey,
    },
    /// `itemsize` disagrees with the fields listed.
    #[error("line {line}: extent {bytenr}: itemsize {itemsize} but the listed fields take {listed} bytes: {text:?}")]
    ItemSize {
        /// Line of the item header.
        line: u64,
        /// Item header text.
        text: String,
        /// Extent.
        bytenr: u64,
        /// Size printed.
        itemsize: u64,
        /// Size of what was listed.
        listed: u64,
    },
    /// A leaf's geometry shows another nodesize than the one given or
    /// shown by an earlier leaf (a wrong `--nodesize`, or two dumps in one).
    #[error("line {line}: the leaf's item 0 ends at nodesize {leaf} (itemoff + itemsize + {header}), not {expected}: {text:?}", header = progs::LEAF_HEADER_BYTES)]
    Nodesize {
        /// Line of item 0.
        line: u64,
        /// Its text.
        text: String,
        /// The nodesize given or shown before.
        expected: u64,
        /// The nodesize this leaf shows.
        leaf: u64,
    },
    /// A complete extent that breaks an invariant (refs != sum of counts,
    /// zero count, wrong kind, ...).
    #[error("line {line}: extent {bytenr}: {source}: {text:?}")]
    InvalidItem {
        /// Line of the item header.
        line: u64,
        /// Item header text.
        text: String,
        /// Extent.
        bytenr: u64,
        /// The broken invariant.
        #[source]
        source: ItemError,
    },
}

/// Load a dump file (plain or `.zst`).
pub fn load_dump(
    path: impl AsRef<Path>,
    opts: &DumpOptions,
) -> Result<(ExtentTree, DumpStats), DumpError> {
    parse_dump(open::open(path)?, opts)
}

/// Parse a dump from any buffered reader.
pub fn parse_dump<R: BufRead>(
    input: R,
    opts: &DumpOptions,
) -> Result<(ExtentTree, DumpStats), DumpError> {
    let mut lines = LineReader::new(input);
    let mut p = Parser::new(opts);
    loop {
        match lines.next_line() {
            Ok(true) => p.line(lines.line_no, lines.line())?,
            Ok(false) => break,
            Err(source) => {
                return Err(DumpError::Io {
                    line: lines.line_no,
                    source,
                })
            }
        }
    }
    p.end_item()?;
    p.stats.lines = lines.line_no;
    p.stats.bytes = lines.bytes;
    p.stats.nodesize = p.nodesize.unwrap_or(NODESIZE_DEFAULT);
    Ok((p.tree, p.stats))
}

/// The extent item being read, kept until the next non-backref item so
/// that its keyed backrefs can be attached.
#[derive(Debug)]
struct Pending {
    bytenr: u64,
    line: u64,
    text: String,
    key_type: u8,
    key_offset: u64,
    itemsize: u64,
    /// Set by the `refs` line.
    item: Option<ExtentItem>,
    /// Set by the `tree block ...` line of a tree block.
    tree_line: bool,
}

/// What the body lines that follow belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Current {
    /// Before the first item.
    Nothing,
    /// The pending extent item.
    Extent,
    /// A keyed backref item; `body` says whether its body line was seen.
    Keyed {
        item_type: u8,
        offset: u64,
        body: bool,
    },
    /// An item that is not an extent; its body is skipped.
    Other,
}

#[derive(Debug)]
struct Parser {
    /// The nodesize: given, or shown by the first leaf, or taken as
    /// [`NODESIZE_DEFAULT`] by a tree block before any leaf showed one.
    nodesize: Option<u64>,
    /// A `leaf` header was read and no item since: the next item is the
    /// leaf's item 0, whose end shows the nodesize.
    leaf_started: bool,
    tree: ExtentTree,
    stats: DumpStats,
    pending: Option<Pending>,
    current: Current,
    /// Header of the current item (for errors about it).
    current_line: u64,
    current_text: String,
}

fn malformed(line: u64, text: &[u8], reason: impl Into<String>) -> DumpError {
    DumpError::Malformed {
        line,
        text: lex::show(text),
        reason: reason.into(),
    }
}

/// An item header: `item N key (OBJ TYPE OFF) itemoff O itemsize S`.
struct ItemHeader<'a> {
    index: u64,
    objectid: &'a [u8],
    type_name: &'a [u8],
    offset: &'a [u8],
    itemoff: u64,
    itemsize: u64,
}

fn parse_item_header(rest: &[u8]) -> Option<ItemHeader<'_>> {
    // rest starts after "item ".
    let open = rest.iter().position(|&c| c == b'(')?;
    let close = open + rest[open..].iter().position(|&c| c == b')')?;
    let mut pre = tokens(&rest[..open]);
    let index = parse_u64(pre.next()?)?;
    if pre.next()? != b"key" || pre.next().is_some() {
        return None;
    }
    let mut key = tokens(&rest[open + 1..close]);
    let objectid = key.next()?;
    let type_name = key.next()?;
    let offset = key.next()?;
    if key.next().is_some() {
        return None;
    }
    let mut post = tokens(&rest[close + 1..]);
    if post.next()? != b"itemoff" {
        return None;
    }
    let itemoff = parse_u64(post.next()?)?;
    if post.next()? != b"itemsize" {
        return None;
    }
    let itemsize = parse_u64(post.next()?)?;
    if post.next().is_some() {
        return None;
    }
    Some(ItemHeader {
        index,
        objectid,
        type_name,
        offset,
        itemoff,
        itemsize,
    })
}

/// Expect exactly the words of `pattern` with values where the pattern has
/// `None`; returns the values in order.
fn fields<'a, const N: usize>(line: &'a [u8], pattern: &[Option<&str>]) -> Option<[&'a [u8]; N]> {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut n = 0;
    let mut toks = tokens(line);
    for want in pattern {
        let tok = toks.next()?;
        match want {
            Some(word) => {
                if tok != word.as_bytes() {
                    return None;
                }
            }
            None => {
                *out.get_mut(n)? = tok;
                n += 1;
            }
        }
    }
    if toks.next().is_some() || n != N {
        return None;
    }
    Some(out)
}

fn insert_ref(list: &mut Vec<(RefKey, u64)>, key: RefKey, count: u64) -> bool {
    match list.binary_search_by(|(k, _)| k.cmp(&key)) {
        Ok(_) => false,
        Err(pos) => {
            list.insert(pos, (key, count));
            true
        }
    }
}

impl Parser {
    fn new(opts: &DumpOptions) -> Self {
        Parser {
            nodesize: opts.nodesize,
            leaf_started: false,
            tree: ExtentTree::new(),
            stats: DumpStats::default(),
            pending: None,
            current: Current::Nothing,
            current_line: 0,
            current_text: String::new(),
        }
    }

    fn line(&mut self, no: u64, raw: &[u8]) -> Result<(), DumpError> {
        let text = lex::trim_end(raw);
        let indent = text.iter().take_while(|&&c| c == b'\t').count();
        let body = lex::trim_start(text);
        if body.is_empty() {
            return Ok(());
        }
        if let Some(rest) = body.strip_prefix(b"item ") {
            if indent <= 1 {
                return self.item(no, text, rest);
            }
        }
        if indent >= 2 {
            return self.body(no, text, body);
        }
        if body.starts_with(b"key (") && body.windows(7).any(|w| w == b" block ") {
            self.stats.node_ptr_lines += 1;
            return Ok(());
        }
        const HEADERS: [&[u8]; 9] = [
            b"btrfs-progs ",
            b"extent tree key ",
            b"leaf ",
            b"node ",
            b"fs uuid ",
            b"chunk uuid ",
            b"total bytes ",
            b"bytes used ",
            b"uuid ",
        ];
        if indent == 0 && HEADERS.iter().any(|h| body.starts_with(h)) {
            if body.starts_with(b"leaf ") {
                self.leaf_started = true;
            }
            self.stats.header_lines += 1;
            return Ok(());
        }
        self.stats.unrecognized.record(no, text);
        Ok(())
    }

    /// Item 0 of a leaf ends where the block does (module doc): check or
    /// learn the nodesize.
    fn measure_leaf(&mut self, no: u64, text: &[u8], h: &ItemHeader<'_>) -> Result<(), DumpError> {
        let leaf = h
            .itemoff
            .checked_add(h.itemsize)
            .and_then(|end| end.checked_add(progs::LEAF_HEADER_BYTES))
            .ok_or_else(|| malformed(no, text, "itemoff + itemsize overflows"))?;
        match *self.nodesize.get_or_insert(leaf) {
            expected if expected != leaf => Err(DumpError::Nodesize {
                line: no,
                text: lex::show(text),
                expected,
                leaf,
            }),
            _ => {
                self.stats.leaves_measured += 1;
                Ok(())
            }
        }
    }

    fn item(&mut self, no: u64, text: &[u8], rest: &[u8]) -> Result<(), DumpError> {
        self.end_keyed()?;
        let h = parse_item_header(rest).ok_or_else(|| malformed(no, text, "bad item header"))?;
        if std::mem::take(&mut self.leaf_started) && h.index == 0 {
            self.measure_leaf(no, text, &h)?;
        }
        let type_name = String::from_utf8_lossy(h.type_name);
        match self.stats.items_by_type.get_mut(type_name.as_ref()) {
            Some(n) => *n += 1,
            None => {
                self.stats.items_by_type.insert(type_name.into_owned(), 1);
            }
        }
        self.current_line = no;
        self.current_text.clear();
        self.current_text.push_str(&String::from_utf8_lossy(text));
        let item_type = match progs::parse_key_type(h.type_name) {
            Some(
                t @ (key_type::EXTENT_ITEM
                | key_type::METADATA_ITEM
                | key_type::TREE_BLOCK_REF
                | key_type::SHARED_BLOCK_REF
                | key_type::EXTENT_DATA_REF
                | key_type::SHARED_DATA_REF),
            ) => t,
            _ => {
                self.end_item()?;
                self.current = Current::Other;
                return Ok(());
            }
        };
        let bytenr = progs::parse_key_part(h.objectid)
            .ok_or_else(|| malformed(no, text, "bad key objectid"))?;
        let offset =
            progs::parse_key_part(h.offset).ok_or_else(|| malformed(no, text, "bad key offset"))?;
        if matches!(item_type, key_type::EXTENT_ITEM | key_type::METADATA_ITEM) {
            self.end_item()?;
            let duplicate = self.tree.get(bytenr).is_some();
            if duplicate {
                return Err(DumpError::DuplicateExtent {
                    line: no,
                    text: lex::show(text),
                    bytenr,
                });
            }
            if item_type == key_type::METADATA_ITEM && offset > u64::from(LEVEL_MAX) {
                return Err(malformed(
                    no,
                    text,
                    format!("tree level {offset} > {LEVEL_MAX}"),
                ));
            }
            if item_type == key_type::EXTENT_ITEM && offset == 0 {
                return Err(malformed(no, text, "extent size 0"));
            }
            self.pending = Some(Pending {
                bytenr,
                line: no,
                text: lex::show(text),
                key_type: item_type,
                key_offset: offset,
                itemsize: h.itemsize,
                item: None,
                tree_line: false,
            });
            self.current = Current::Extent;
            return Ok(());
        }
        // A keyed backref: it must belong to the pending extent, whose
        // header and refs line have been read.
        let owner_ok = matches!(&self.pending, Some(p) if p.bytenr == bytenr && p.item.is_some());
        if !owner_ok {
            return Err(DumpError::KeyedWithoutExtent {
                line: no,
                text: lex::show(text),
                bytenr,
            });
        }
        self.current = Current::Keyed {
            item_type,
            offset,
            body: false,
        };
        match item_type {
            key_type::TREE_BLOCK_REF => {
                self.attach(no, text, RefKey::TreeBlock { root: offset }, 1, false)
            }
            key_type::SHARED_BLOCK_REF => {
                self.attach(no, text, RefKey::SharedBlock { parent: offset }, 1, false)
            }
            _ => Ok(()),
        }
    }

    /// Attach a backref to the pending extent.
    fn attach(
        &mut self,
        no: u64,
        text: &[u8],
        key: RefKey,
        count: u64,
        inline: bool,
    ) -> Result<(), DumpError> {
        let Some(p) = self.pending.as_mut() else {
            return Err(malformed(no, text, "backref outside an extent item"));
        };
        let Some(item) = p.item.as_mut() else {
            return Err(malformed(no, text, "backref before the refs line"));
        };
        let list = if inline {
            &mut item.inline
        } else {
            &mut item.keyed
        };
        if !insert_ref(list, key, count) {
            return Err(DumpError::DuplicateBackref {
                line: no,
                text: lex::show(text),
                bytenr: p.bytenr,
                key,
            });
        }
        if inline {
            self.stats.inline_refs += 1;
        } else {
            self.stats.keyed_refs += 1;
        }
        Ok(())
    }

    fn body(&mut self, no: u64, text: &[u8], body: &[u8]) -> Result<(), DumpError> {
        match self.current {
            Current::Extent => self.extent_body(no, text, body),
            Current::Keyed {
                item_type,
                offset,
                body: seen,
            } => {
                if seen {
                    return Err(malformed(no, text, "second body line of a keyed backref"));
                }
                self.keyed_body(no, text, body, item_type, offset)?;
                self.current = Current::Keyed {
                    item_type,
                    offset,
                    body: true,
                };
                Ok(())
            }
            Current::Other => {
                self.stats.skipped_body_lines += 1;
                Ok(())
            }
            Current::Nothing => {
                self.stats.unrecognized.record(no, text);
                Ok(())
            }
        }
    }

    fn keyed_body(
        &mut self,
        no: u64,
        text: &[u8],
        body: &[u8],
        item_type: u8,
        key_offset: u64,
    ) -> Result<(), DumpError> {
        match item_type {
            key_type::TREE_BLOCK_REF if body == b"tree block backref" => Ok(()),
            key_type::SHARED_BLOCK_REF if body == b"shared block backref" => Ok(()),
            key_type::EXTENT_DATA_REF => {
                let (key, count) = parse_extent_data_ref(body)
                    .ok_or_else(|| malformed(no, text, "bad extent data backref"))?;
                if let RefKey::ExtentData {
                    root,
                    objectid,
                    offset,
                } = key
                {
                    if progs::extent_data_ref_hash(root, objectid, offset) != key_offset {
                        self.stats.hash_mismatches.record(no, text);
                    }
                }
                self.attach(no, text, key, count, false)
            }
            key_type::SHARED_DATA_REF => {
                let [count] = fields::<1>(
                    body,
                    &[
                        Some("shared"),
                        Some("data"),
                        Some("backref"),
                        Some("count"),
                        None,
                    ],
                )
                .and_then(|[c]| parse_u64(c).map(|c| [c]))
                .ok_or_else(|| malformed(no, text, "bad shared data backref"))?;
                self.attach(
                    no,
                    text,
                    RefKey::SharedData { parent: key_offset },
                    count,
                    false,
                )
            }
            _ => Err(malformed(no, text, "unexpected body of a keyed backref")),
        }
    }

    fn extent_body(&mut self, no: u64, text: &[u8], body: &[u8]) -> Result<(), DumpError> {
        let nodesize = &mut self.nodesize;
        let Some(p) = self.pending.as_mut() else {
            return Err(malformed(no, text, "extent body without an extent item"));
        };
        if p.item.is_none() {
            // The first body line must be `refs R gen G flags F`.
            let [refs, gen, flags] = fields::<3>(
                body,
                &[Some("refs"), None, Some("gen"), None, Some("flags"), None],
            )
            .or_else(|| {
                // `flags` with no bit set prints an empty string.
                fields::<2>(
                    body,
                    &[Some("refs"), None, Some("gen"), None, Some("flags")],
                )
                .map(|[r, g]| [r, g, &b""[..]])
            })
            .ok_or_else(|| malformed(no, text, "expected 'refs R gen G flags F'"))?;
            let refs = parse_u64(refs).ok_or_else(|| malformed(no, text, "bad refs"))?;
            let gen = parse_u64(gen).ok_or_else(|| malformed(no, text, "bad gen"))?;
            let mut bits = 0;
            for name in flags.split(|&c| c == b'|').filter(|n| !n.is_empty()) {
                bits |= match name {
                    b"DATA" => EXTENT_FLAG_DATA,
                    b"TREE_BLOCK" => EXTENT_FLAG_TREE_BLOCK,
                    b"FULL_BACKREF" => BLOCK_FLAG_FULL_BACKREF,
                    _ => return Err(malformed(no, text, "unknown extent flag")),
                };
            }
            let kind_bits = bits & (EXTENT_FLAG_DATA | EXTENT_FLAG_TREE_BLOCK);
            let (kind, num_bytes) = match (p.key_type, kind_bits) {
                (key_type::EXTENT_ITEM, EXTENT_FLAG_DATA) => (ExtentKind::Data, p.key_offset),
                // Non-skinny tree block: the level comes with the key line.
                (key_type::EXTENT_ITEM, EXTENT_FLAG_TREE_BLOCK) => {
                    (ExtentKind::Tree { level: 0 }, p.key_offset)
                }
                (key_type::METADATA_ITEM, EXTENT_FLAG_TREE_BLOCK) => (
                    ExtentKind::Tree {
                        // Checked <= LEVEL_MAX at the header.
                        level: u8::try_from(p.key_offset).unwrap_or(u8::MAX),
                    },
                    *nodesize.get_or_insert(NODESIZE_DEFAULT),
                ),
                _ => {
                    return Err(malformed(
                        no,
                        text,
                        "extent flags do not name exactly one of DATA and TREE_BLOCK matching the item type",
                    ))
                }
            };
            let mut item = ExtentItem::new(num_bytes, kind, gen);
            item.flags |= bits;
            item.refs = refs;
            p.item = Some(item);
            return Ok(());
        }
        if let Some(rest) = body.strip_prefix(b"tree block ") {
            let is_tree = matches!(
                p.item.as_ref().map(|i| i.kind),
                Some(ExtentKind::Tree { .. })
            );
            if let Some(level) = rest.strip_prefix(b"skinny level ") {
                let level = parse_u64(level).ok_or_else(|| malformed(no, text, "bad level"))?;
                if p.key_type != key_type::METADATA_ITEM || !is_tree || p.tree_line {
                    return Err(malformed(no, text, "unexpected skinny level line"));
                }
                if level != p.key_offset {
                    return Err(malformed(
                        no,
                        text,
                        format!(
                            "level {level} differs from the key's level {}",
                            p.key_offset
                        ),
                    ));
                }
                p.tree_line = true;
                return Ok(());
            }
            if let Some(keyed) = rest.strip_prefix(b"key (") {
                if p.key_type != key_type::EXTENT_ITEM || !is_tree || p.tree_line {
                    return Err(malformed(no, text, "unexpected tree block key line"));
                }
                let (key, level) = parse_tree_block_key(keyed)
                    .ok_or_else(|| malformed(no, text, "expected 'tree block key (K) level N'"))?;
                if let Some(item) = p.item.as_mut() {
                    item.kind = ExtentKind::Tree { level };
                    item.tree_key = Some(key);
                }
                p.tree_line = true;
                return Ok(());
            }
            if let Some(root) = rest.strip_prefix(b"backref root ") {
                let root = progs::parse_tree_id(root)
                    .ok_or_else(|| malformed(no, text, "bad tree block backref root"))?;
                return self.attach(no, text, RefKey::TreeBlock { root }, 1, true);
            }
            return Err(malformed(no, text, "unknown tree block line"));
        }
        if let Some(parent) = body.strip_prefix(b"shared block backref parent ") {
            let parent =
                parse_u64(parent).ok_or_else(|| malformed(no, text, "bad shared block backref"))?;
            return self.attach(no, text, RefKey::SharedBlock { parent }, 1, true);
        }
        if body.starts_with(b"extent data backref ") {
            let (key, count) = parse_extent_data_ref(body)
                .ok_or_else(|| malformed(no, text, "bad extent data backref"))?;
            return self.attach(no, text, key, count, true);
        }
        if body.starts_with(b"shared data backref ") {
            let [parent, count] = fields::<2>(
                body,
                &[
                    Some("shared"),
                    Some("data"),
                    Some("backref"),
                    Some("parent"),
                    None,
                    Some("count"),
                    None,
                ],
            )
            .ok_or_else(|| malformed(no, text, "bad shared data backref"))?;
            let parent = parse_u64(parent).ok_or_else(|| malformed(no, text, "bad parent"))?;
            let count = parse_u64(count).ok_or_else(|| malformed(no, text, "bad count"))?;
            return self.attach(no, text, RefKey::SharedData { parent }, count, true);
        }
        Err(malformed(no, text, "unknown line in an extent item"))
    }

    /// Close a keyed backref item: those with a body must have shown it.
    fn end_keyed(&mut self) -> Result<(), DumpError> {
        if let Current::Keyed {
            item_type,
            body: false,
            ..
        } = self.current
        {
            let field = match item_type {
                key_type::EXTENT_DATA_REF => Some("'extent data backref'"),
                key_type::SHARED_DATA_REF => Some("'shared data backref count'"),
                _ => None,
            };
            if let Some(field) = field {
                return Err(DumpError::MissingField {
                    line: self.current_line,
                    text: self.current_text.clone(),
                    field,
                });
            }
        }
        Ok(())
    }

    /// Complete, check and store the pending extent (if any).
    fn end_item(&mut self) -> Result<(), DumpError> {
        self.end_keyed()?;
        self.current = Current::Nothing;
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let Some(mut item) = p.item else {
            return Err(DumpError::MissingField {
                line: p.line,
                text: p.text,
                field: "'refs R gen G flags F'",
            });
        };
        if item.kind != ExtentKind::Data && !p.tree_line {
            return Err(DumpError::MissingField {
                line: p.line,
                text: p.text,
                field: if p.key_type == key_type::METADATA_ITEM {
                    "'tree block skinny level N'"
                } else {
                    "'tree block key (K) level N'"
                },
            });
        }
        if let ExtentKind::Tree { level } = item.kind {
            if level > LEVEL_MAX {
                return Err(malformed(
                    p.line,
                    p.text.as_bytes(),
                    format!("tree level {level} > {LEVEL_MAX}"),
                ));
            }
        }
        if let Err(source) = item.check() {
            return Err(DumpError::InvalidItem {
                line: p.line,
                text: p.text,
                bytenr: p.bytenr,
                source,
            });
        }
        let listed = item.item_bytes() as u64;
        if listed != p.itemsize {
            return Err(DumpError::ItemSize {
                line: p.line,
                text: p.text,
                bytenr: p.bytenr,
                itemsize: p.itemsize,
                listed,
            });
        }
        self.stats.extents += 1;
        match item.kind {
            ExtentKind::Data => self.stats.data_extents += 1,
            ExtentKind::Tree { .. } => self.stats.tree_extents += 1,
        }
        item.inline.shrink_to_fit();
        self.tree.insert(p.bytenr, item);
        Ok(())
    }
}

/// `extent data backref root ROOT objectid INO offset OFF count C`.
fn parse_extent_data_ref(body: &[u8]) -> Option<(RefKey, u64)> {
    let [root, objectid, offset, count] = fields::<4>(
        body,
        &[
            Some("extent"),
            Some("data"),
            Some("backref"),
            Some("root"),
            None,
            Some("objectid"),
            None,
            Some("offset"),
            None,
            Some("count"),
            None,
        ],
    )?;
    Some((
        RefKey::ExtentData {
            root: progs::parse_tree_id(root)?,
            objectid: parse_u64(objectid)?,
            offset: parse_u64(offset)?,
        },
        parse_u64(count)?,
    ))
}

/// The rest of `tree block key (K) level N` after `key (`.
fn parse_tree_block_key(rest: &[u8]) -> Option<(DiskKey, u8)> {
    let close = rest.iter().position(|&c| c == b')')?;
    let key = progs::parse_key(&rest[..close])?;
    let [level] = fields::<1>(&rest[close + 1..], &[Some("level"), None])?;
    let level = u8::try_from(parse_u64(level)?).ok()?;
    Some((key, level))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str =
        "node 72204288 level 1 items 2 free space 491 generation 22 owner EXTENT_TREE
node 72204288 flags 0x1(WRITTEN) backref revision 1
fs uuid 478e4c36-bb93-4ded-8726-18c223b23df8
chunk uuid 0f4afcff-0f45-4555-be2f-fd4fb538de1b
\tkey (13631488 EXTENT_ITEM 16384) block 72384512 gen 22
\tkey (13697024 EXTENT_DATA_REF 1007496934617490580) block 72400896 gen 22
";

    fn parse(text: &str) -> Result<(ExtentTree, DumpStats), DumpError> {
        parse_dump(text.as_bytes(), &DumpOptions::default())
    }

    fn leaf(items: &str) -> String {
        format!(
            "btrfs-progs v6.2\nextent tree key (EXTENT_TREE ROOT_ITEM 0) \n{NODE}leaf 30408704 items 12 free space 15614 generation 6 owner EXTENT_TREE\n\
             leaf 30408704 flags 0x1(WRITTEN) backref revision 1\nfs uuid 1\nchunk uuid 2\n{items}total bytes 2147483648\nbytes used 147456\nuuid 1260dcc0\n"
        )
    }

    #[test]
    fn skinny_data_keyed_and_full_backref() {
        let text = leaf(
            "\titem 0 key (13631488 BLOCK_GROUP_ITEM 8388608) itemoff 16259 itemsize 24
\t\tblock group used 0 chunk_objectid 256 flags DATA|single
\titem 1 key (13631488 EXTENT_ITEM 69632) itemoff 15900 itemsize 95
\t\trefs 5 gen 9 flags DATA
\t\textent data backref root FS_TREE objectid 260 offset 0 count 1
\t\textent data backref root 258 objectid 260 offset 0 count 1
\t\tshared data backref parent 41320448 count 1
\titem 2 key (13631488 EXTENT_DATA_REF 1007496931639468316) itemoff 14709 itemsize 28
\t\textent data backref root FS_TREE objectid 661 offset 491520 count 1
\titem 3 key (13631488 SHARED_DATA_REF 50003968) itemoff 14705 itemsize 4
\t\tshared data backref count 1
\titem 4 key (30408704 METADATA_ITEM 1) itemoff 16169 itemsize 42
\t\trefs 2 gen 6 flags TREE_BLOCK|FULL_BACKREF
\t\ttree block skinny level 1
\t\tshared block backref parent 30425088
\t\tshared block backref parent 30441472
\titem 5 key (30408704 BLOCK_GROUP_ITEM 107347968) itemoff 16145 itemsize 24
\t\tblock group used 131072 chunk_objectid 256 flags METADATA|DUP
\titem 6 key (30490624 METADATA_ITEM 0) itemoff 16079 itemsize 33
\t\trefs 3 gen 5 flags TREE_BLOCK
\t\ttree block skinny level 0
\t\ttree block backref root TREE_RELOC
",
        ) + "leaf 2 items 2 free space 1 generation 6 owner EXTENT_TREE\n\
             \titem 0 key (30490624 TREE_BLOCK_REF 256) itemoff 16283 itemsize 0\n\t\ttree block backref\n\
             \titem 1 key (30490624 SHARED_BLOCK_REF 30408704) itemoff 16283 itemsize 0\n\t\tshared block backref\n";
        let (tree, stats) = parse(&text).unwrap();
        assert_eq!(tree.len(), 3);
        let data = tree.get(13631488).unwrap();
        assert_eq!(data.kind, ExtentKind::Data);
        assert_eq!(data.num_bytes, 69632);
        assert_eq!(data.generation, 9);
        assert_eq!(data.refs, 5);
        assert_eq!(data.inline.len(), 3);
        assert_eq!(
            data.keyed,
            vec![
                (
                    RefKey::ExtentData {
                        root: 5,
                        objectid: 661,
                        offset: 491520
                    },
                    1
                ),
                (RefKey::SharedData { parent: 50003968 }, 1)
            ]
        );
        let node = tree.get(30408704).unwrap();
        assert_eq!(node.kind, ExtentKind::Tree { level: 1 });
        assert_eq!(node.num_bytes, NODESIZE_DEFAULT);
        assert!(node.full_backref());
        let leaf = tree.get(30490624).unwrap();
        assert_eq!(
            leaf.inline,
            vec![(
                RefKey::TreeBlock {
                    root: progs::TREE_RELOC_OBJECTID
                },
                1
            )]
        );
        assert_eq!(leaf.keyed.len(), 2);
        assert_eq!(stats.items_by_type["BLOCK_GROUP_ITEM"], 2);
        assert_eq!(stats.items_by_type["METADATA_ITEM"], 2);
        assert_eq!(stats.extents, 3);
        assert_eq!(stats.inline_refs, 6);
        assert_eq!(stats.keyed_refs, 4);
        assert_eq!(stats.node_ptr_lines, 2);
        assert_eq!(stats.skipped_body_lines, 2);
        assert_eq!(stats.hash_mismatches.count, 0);
        assert_eq!(stats.unrecognized.count, 0);
    }

    /// The start of `before.txt` of a filesystem made with
    /// `mkfs.btrfs -n 4096` (capture snapshots-8-n4k, 2026-12-07).
    const LEAF_4K: &str = "btrfs-progs v6.2
extent tree key (EXTENT_TREE ROOT_ITEM 0) \n\
leaf 30408704 items 12 free space 3326 generation 6 owner EXTENT_TREE
leaf 30408704 flags 0x1(WRITTEN) backref revision 1
fs uuid 7eb14c1d-d747-4778-bdab-c962f7d24c8b
chunk uuid 2b1a1573-5767-4f74-985e-12e7a4272949
\titem 0 key (13631488 BLOCK_GROUP_ITEM 8388608) itemoff 3971 itemsize 24
\t\tblock group used 0 chunk_objectid 256 flags DATA|single
\titem 1 key (22020096 BLOCK_GROUP_ITEM 8388608) itemoff 3947 itemsize 24
\t\tblock group used 4096 chunk_objectid 256 flags SYSTEM|DUP
\titem 2 key (22024192 METADATA_ITEM 0) itemoff 3914 itemsize 33
\t\trefs 1 gen 6 flags TREE_BLOCK
\t\ttree block skinny level 0
\t\ttree block backref root CHUNK_TREE
";

    /// Regression: skinny tree blocks were given 16384 bytes whatever the
    /// filesystem's nodesize, so a capture made with `mkfs.btrfs -n 4096`
    /// replayed with 4697 mismatches unless `--nodesize 4096` was passed,
    /// and `refd-bench load --workload btrfs-trace` could not replay it.
    #[test]
    fn nodesize_comes_from_the_leaves() {
        let (tree, stats) = parse(LEAF_4K).unwrap();
        assert_eq!(tree.get(22024192).unwrap().num_bytes, 4096);
        assert_eq!((stats.nodesize, stats.leaves_measured), (4096, 1));
        // The default leaf of `leaf()` shows mkfs's default.
        let (_, stats) = parse(&leaf("")).unwrap();
        assert_eq!(stats.nodesize, NODESIZE_DEFAULT);
    }

    #[test]
    fn a_nodesize_the_leaves_contradict_is_refused() {
        let given = DumpOptions {
            nodesize: Some(NODESIZE_DEFAULT),
        };
        let e = parse_dump(LEAF_4K.as_bytes(), &given).unwrap_err();
        assert!(
            matches!(
                e,
                DumpError::Nodesize {
                    line: 7,
                    expected: NODESIZE_DEFAULT,
                    leaf: 4096,
                    ..
                }
            ),
            "{e}"
        );
        // A second leaf of another geometry (two dumps in one).
        let two = format!(
            "{LEAF_4K}leaf 30425088 items 1 free space 15000 generation 7 owner EXTENT_TREE\n\
             \titem 0 key (22028288 BLOCK_GROUP_ITEM 8388608) itemoff 16259 itemsize 24\n"
        );
        let e = parse(&two).unwrap_err();
        assert!(
            matches!(
                e,
                DumpError::Nodesize {
                    line: 16,
                    expected: 4096,
                    leaf: 16384,
                    ..
                }
            ),
            "{e}"
        );
        // A tree block before any leaf header takes the default; a leaf
        // that shows another size after it is refused, not ignored.
        let e = parse(&format!(
            "\titem 0 key (4096 METADATA_ITEM 0) itemoff 3914 itemsize 33\n\
             \t\trefs 1 gen 6 flags TREE_BLOCK\n\t\ttree block skinny level 0\n\
             \t\ttree block backref root CHUNK_TREE\n{LEAF_4K}"
        ))
        .unwrap_err();
        assert!(
            matches!(
                e,
                DumpError::Nodesize {
                    expected: NODESIZE_DEFAULT,
                    leaf: 4096,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn non_skinny_tree_block() {
        let text = leaf(
            "\titem 0 key (22036480 EXTENT_ITEM 4096) itemoff 16232 itemsize 51
\t\trefs 1 gen 6 flags TREE_BLOCK
\t\ttree block key (256 DEV_ITEM 1) level 2
\t\ttree block backref root CHUNK_TREE
",
        );
        // The size comes from the key, not from the nodesize (the leaf's).
        let (tree, stats) = parse(&text).unwrap();
        assert_eq!(stats.nodesize, NODESIZE_DEFAULT);
        let item = tree.get(22036480).unwrap();
        assert_eq!(item.kind, ExtentKind::Tree { level: 2 });
        assert_eq!(item.num_bytes, 4096);
        assert_eq!(
            item.tree_key,
            Some(DiskKey {
                objectid: 256,
                item_type: key_type::DEV_ITEM,
                offset: 1
            })
        );
    }

    fn err_of(items: &str) -> DumpError {
        parse(&leaf(items)).expect_err("must fail")
    }

    /// Line of the first item in `leaf()`.
    const FIRST: u64 = 13;
    const L1: u64 = FIRST + 1;
    const L2: u64 = FIRST + 2;
    const L3: u64 = FIRST + 3;

    #[test]
    fn inconsistent_dumps_are_typed_errors_with_lines() {
        let e = err_of(
            "\titem 0 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 53\n\t\trefs 3 gen 1 flags DATA\n\
             \t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n",
        );
        assert!(
            matches!(
                e,
                DumpError::InvalidItem {
                    line: FIRST,
                    source: ItemError::RefsMismatch { refs: 3, sum: 1 },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("line 13"), "{e}");

        let e = err_of(
            "\titem 0 key (4096 TREE_BLOCK_REF 5) itemoff 1 itemsize 0\n\t\ttree block backref\n",
        );
        assert!(
            matches!(
                e,
                DumpError::KeyedWithoutExtent {
                    line: FIRST,
                    bytenr: 4096,
                    ..
                }
            ),
            "{e}"
        );

        let e = err_of(
            "\titem 0 key (4096 METADATA_ITEM 0) itemoff 1 itemsize 33\n\t\trefs 1 gen 1 flags TREE_BLOCK\n\t\ttree block backref root 5\n",
        );
        assert!(
            matches!(e, DumpError::MissingField { line: FIRST, .. }),
            "{e}"
        );

        let e = err_of("\titem 0 key (4096 METADATA_ITEM 0) itemoff 1 itemsize 33\n\t\ttree block skinny level 0\n");
        assert!(matches!(e, DumpError::Malformed { line: L1, .. }), "{e}");

        let e = err_of("\titem 0 key (4096 METADATA_ITEM 0) itemoff 1 itemsize 33\n\t\trefs 1x gen 1 flags TREE_BLOCK\n");
        assert!(
            matches!(e, DumpError::Malformed { line: L1, ref reason, .. } if reason == "bad refs"),
            "{e}"
        );

        let e = err_of("\titem 0 key (4096 METADATA_ITEM 0) itemoff 1 itemsize 33\n\t\trefs 1 gen 1 flags TREE_BLOCK|BOGUS\n");
        assert!(matches!(e, DumpError::Malformed { line: L1, .. }), "{e}");

        let e = err_of("\titem 0 key (4096 METADATA_ITEM 0) itemoff 1 itemsize 33\n\t\trefs 1 gen 1 flags DATA\n");
        assert!(matches!(e, DumpError::Malformed { line: L1, .. }), "{e}");

        let e = err_of("\titem 0 key (4096 METADATA_ITEM 9) itemoff 1 itemsize 33\n");
        assert!(matches!(e, DumpError::Malformed { line: FIRST, .. }), "{e}");

        let e = err_of("\titem 0 key (4096 EXTENT_ITEM 4096 itemoff 1 itemsize 33\n");
        assert!(matches!(e, DumpError::Malformed { line: FIRST, .. }), "{e}");

        let e = err_of("\titem 0 key (40x96 EXTENT_ITEM 4096) itemoff 1 itemsize 33\n");
        assert!(matches!(e, DumpError::Malformed { line: FIRST, .. }), "{e}");

        let e = err_of(
            "\titem 0 key (4096 METADATA_ITEM 0) itemoff 1 itemsize 33\n\t\trefs 1 gen 1 flags TREE_BLOCK\n\
             \t\ttree block skinny level 1\n",
        );
        assert!(matches!(e, DumpError::Malformed { line: L2, .. }), "{e}");

        // A data ref on a tree block.
        let e = err_of(
            "\titem 0 key (4096 METADATA_ITEM 0) itemoff 1 itemsize 53\n\t\trefs 1 gen 1 flags TREE_BLOCK\n\
             \t\ttree block skinny level 0\n\t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n",
        );
        assert!(
            matches!(
                e,
                DumpError::InvalidItem {
                    source: ItemError::WrongKind { .. },
                    ..
                }
            ),
            "{e}"
        );

        // FULL_BACKREF on data.
        let e = err_of(
            "\titem 0 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 53\n\t\trefs 1 gen 1 flags DATA|FULL_BACKREF\n\
             \t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n",
        );
        assert!(
            matches!(
                e,
                DumpError::InvalidItem {
                    source: ItemError::BadFlags { .. },
                    ..
                }
            ),
            "{e}"
        );

        // Listed refs do not fill the item (progs stopped at an unknown type).
        let e = err_of(
            "\titem 0 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 70\n\t\trefs 1 gen 1 flags DATA\n\
             \t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n",
        );
        assert!(
            matches!(
                e,
                DumpError::ItemSize {
                    itemsize: 70,
                    listed: 53,
                    ..
                }
            ),
            "{e}"
        );

        let e = err_of(
            "\titem 0 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 82\n\t\trefs 2 gen 1 flags DATA\n\
             \t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n\
             \t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n",
        );
        assert!(
            matches!(e, DumpError::DuplicateBackref { line: L3, .. }),
            "{e}"
        );

        let e = err_of(
            "\titem 0 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 53\n\t\trefs 1 gen 1 flags DATA\n\
             \t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n\
             \titem 1 key (4096 EXTENT_DATA_REF 5) itemoff 1 itemsize 28\n\
             \titem 2 key (8192 BLOCK_GROUP_ITEM 5) itemoff 1 itemsize 24\n",
        );
        assert!(matches!(e, DumpError::MissingField { line: L3, .. }), "{e}");

        let e = err_of(
            "\titem 0 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 53\n\t\trefs 1 gen 1 flags DATA\n\
             \t\textent data backref root FS_TREE objectid 257 offset zero count 1\n",
        );
        assert!(matches!(e, DumpError::Malformed { line: L2, .. }), "{e}");

        let e = err_of(
            "\titem 0 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 53\n\t\trefs 1 gen 1 flags DATA\n\
             \t\textent data backref root FS_TREE objectid 257 offset 0 count 1\n\
             \titem 1 key (4096 EXTENT_ITEM 4096) itemoff 1 itemsize 53\n",
        );
        assert!(
            matches!(e, DumpError::DuplicateExtent { line: L3, .. }),
            "{e}"
        );
    }

    #[test]
    fn unknown_lines_are_counted_not_fatal() {
        let text = leaf(
            "some stray text\n\titem 0 key (1 UNKNOWN.7 0) itemoff 1 itemsize 1\n\t\twhatever\n",
        );
        let (tree, stats) = parse(&text).unwrap();
        assert!(tree.is_empty());
        assert_eq!(stats.unrecognized.count, 1);
        assert_eq!(stats.unrecognized.samples[0].line, FIRST);
        assert_eq!(stats.items_by_type["UNKNOWN.7"], 1);
        assert_eq!(stats.skipped_body_lines, 1);
    }

    #[test]
    fn truncated_zst_is_an_io_error_with_a_line() {
        let mut text = String::new();
        for i in 0..20000u64 {
            text.push_str(&format!(
                "\titem 0 key ({} EXTENT_ITEM 4096) itemoff 1 itemsize 53\n\t\trefs 1 gen 1 flags DATA\n\
                 \t\textent data backref root FS_TREE objectid {} offset 0 count 1\n",
                (i + 1) * 4096,
                i + 256
            ));
        }
        let packed = zstd::encode_all(text.as_bytes(), 3).unwrap();
        let cut = packed[..packed.len() * 2 / 3].to_vec();
        let input = crate::open::from_reader(io::Cursor::new(cut)).unwrap();
        let e = parse_dump(input, &DumpOptions::default()).unwrap_err();
        assert!(matches!(e, DumpError::Io { line, .. } if line > 1), "{e}");
    }
}
