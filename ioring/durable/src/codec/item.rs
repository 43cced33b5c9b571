//! Extent items: one B+tree item per extent (inline backrefs in its
//! value), keyed backrefs as items of their own; [`ExtentLoader`]
//! reassembles an extent from its items in key order.

use std::collections::BTreeMap;

use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{
    DiskKey, ExtentKind, RefKey, EXTENT_DATA_REF_KEY, SHARED_BLOCK_REF_KEY, SHARED_DATA_REF_KEY,
    TREE_BLOCK_REF_KEY,
};
use refd_ioring::btree::{Key, VALUE_BYTES_MAX};

use super::{put_varint, CodecError, Reader};

/// B+tree item type of a data extent item (btrfs `EXTENT_ITEM_KEY`).
pub const EXTENT_ITEM_KEY: u8 = 168;
/// B+tree item type of a tree block extent item (btrfs `METADATA_ITEM_KEY`).
pub const METADATA_ITEM_KEY: u8 = 169;

/// Header flag bit: a tree block key follows.
const ITEM_HAS_TREE_KEY: u8 = 0x01;

// An extent's items sort as the loader reads them: its extent item (data
// or tree block) first, then its keyed backrefs, which the loader tells
// apart by `item_type < TREE_BLOCK_REF_KEY`.
const _: () = assert!(EXTENT_ITEM_KEY < METADATA_ITEM_KEY);
const _: () = assert!(METADATA_ITEM_KEY < TREE_BLOCK_REF_KEY);
const _: () = assert!(TREE_BLOCK_REF_KEY < EXTENT_DATA_REF_KEY);
const _: () = assert!(EXTENT_DATA_REF_KEY < SHARED_BLOCK_REF_KEY);
const _: () = assert!(SHARED_BLOCK_REF_KEY < SHARED_DATA_REF_KEY);

/// The B+tree key of the extent item of `bytenr`.
pub fn item_key(bytenr: u64, num_bytes: u64, kind: ExtentKind) -> Key {
    match kind {
        ExtentKind::Data => Key::new(bytenr, EXTENT_ITEM_KEY, num_bytes),
        ExtentKind::Tree { level } => Key::new(bytenr, METADATA_ITEM_KEY, u64::from(level)),
    }
}

/// btrfs-like `hash_extent_data_ref` (FNV-1a here, 63 bits): the offset of
/// a keyed `EXTENT_DATA_REF` item. Collisions inside one extent are
/// resolved by probing the next offset.
pub fn hash_extent_data_ref(root: u64, objectid: u64, offset: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in [root, objectid, offset] {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h >> 1
}

fn count_u32(bytenr: u64, key: RefKey, count: u64) -> Result<u32, CodecError> {
    u32::try_from(count).map_err(|_| CodecError::CountTooLarge { bytenr, key, count })
}

/// The extent item alone (with its inline backrefs): the first item of
/// [`encode_extent`]. The whole item is checked.
pub fn encode_extent_item(bytenr: u64, item: &ExtentItem) -> Result<(Key, Vec<u8>), CodecError> {
    item.check()
        .map_err(|source| CodecError::Item { bytenr, source })?;
    encode_checked_item(bytenr, item)
}

/// [`encode_extent_item`] of an item its caller has checked.
pub(super) fn encode_checked_item(
    bytenr: u64,
    item: &ExtentItem,
) -> Result<(Key, Vec<u8>), CodecError> {
    let mut v = Vec::with_capacity(item.item_bytes());
    v.push(if item.tree_key.is_some() {
        ITEM_HAS_TREE_KEY
    } else {
        0
    });
    put_varint(&mut v, item.flags);
    put_varint(&mut v, item.generation);
    if let ExtentKind::Tree { .. } = item.kind {
        put_varint(&mut v, item.num_bytes);
    }
    if let Some(k) = item.tree_key {
        v.extend_from_slice(&k.objectid.to_le_bytes());
        v.push(k.item_type);
        v.extend_from_slice(&k.offset.to_le_bytes());
    }
    for &(key, count) in &item.inline {
        v.push(key.type_code());
        match key {
            RefKey::TreeBlock { root } => v.extend_from_slice(&root.to_le_bytes()),
            RefKey::SharedBlock { parent } => v.extend_from_slice(&parent.to_le_bytes()),
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => {
                v.extend_from_slice(&root.to_le_bytes());
                v.extend_from_slice(&objectid.to_le_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(&count_u32(bytenr, key, count)?.to_le_bytes());
            }
            RefKey::SharedData { parent } => {
                v.extend_from_slice(&parent.to_le_bytes());
                v.extend_from_slice(&count_u32(bytenr, key, count)?.to_le_bytes());
            }
        }
    }
    if v.len() > VALUE_BYTES_MAX {
        return Err(CodecError::ValueTooLarge {
            bytenr,
            len_bytes: v.len(),
            max_bytes: VALUE_BYTES_MAX,
        });
    }
    let key = item_key(bytenr, item.num_bytes, item.kind);
    debug_assert!(
        decodes_to_item(bytenr, &key, &v, item),
        "an encoded extent item must decode to the item (extent {bytenr})"
    );
    Ok((key, v))
}

/// Whether the extent item value `v` decodes to the item-level fields and
/// inline backrefs of `item` (the keyed backrefs are items of their own):
/// the postcondition of [`encode_extent_item`] (debug builds).
fn decodes_to_item(bytenr: u64, key: &Key, v: &[u8], item: &ExtentItem) -> bool {
    decode_item_value(bytenr, key, v).is_ok_and(|d| {
        (d.num_bytes, d.kind, d.flags, d.generation, d.tree_key)
            == (
                item.num_bytes,
                item.kind,
                item.flags,
                item.generation,
                item.tree_key,
            )
            && d.inline == item.inline
    })
}

/// Encodes the extent item of `bytenr` and its keyed backrefs as B+tree
/// items, sorted by key.
pub fn encode_extent(bytenr: u64, item: &ExtentItem) -> Result<Vec<(Key, Vec<u8>)>, CodecError> {
    let mut out = vec![encode_extent_item(bytenr, item)?];
    let mut home = item
        .keyed
        .iter()
        .map(|&(key, count)| keyed_backref_item(bytenr, key, count))
        .collect::<Result<Vec<_>, _>>()?;
    home.sort_unstable_by_key(|h| h.0);
    if home.windows(2).all(|w| w[0].0 != w[1].0) {
        // No collision: every backref at its home key (the common case,
        // without a map of hundreds of thousands of entries).
        out.extend(home);
    } else {
        // Probe past a hash collision (only EXTENT_DATA_REF can collide),
        // in the order of the keyed backrefs.
        let mut keyed: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
        for &(key, count) in &item.keyed {
            let (mut k, value) = keyed_backref_item(bytenr, key, count)?;
            while keyed.contains_key(&k) {
                k.offset = k.offset.wrapping_add(1);
            }
            keyed.insert(k, value);
        }
        out.extend(keyed);
    }
    debug_assert!(
        {
            let mut l = ExtentLoader::new();
            out.iter().all(|(k, v)| matches!(l.push(k, v), Ok(None)))
                && l.finish().ok() == Some(Some((bytenr, item.clone())))
        },
        "encoded extent items must load back to the extent (extent {bytenr})"
    );
    Ok(out)
}

/// The B+tree item of one keyed backref, at its home key: for an
/// `EXTENT_DATA_REF` the hash of (root, objectid, offset), which
/// [`encode_extent`] moves past a collision.
pub(crate) fn keyed_backref_item(
    bytenr: u64,
    key: RefKey,
    count: u64,
) -> Result<(Key, Vec<u8>), CodecError> {
    Ok(match key {
        RefKey::TreeBlock { root } => (Key::new(bytenr, TREE_BLOCK_REF_KEY, root), Vec::new()),
        RefKey::SharedBlock { parent } => {
            (Key::new(bytenr, SHARED_BLOCK_REF_KEY, parent), Vec::new())
        }
        RefKey::SharedData { parent } => (
            Key::new(bytenr, SHARED_DATA_REF_KEY, parent),
            count_u32(bytenr, key, count)?.to_le_bytes().to_vec(),
        ),
        RefKey::ExtentData {
            root,
            objectid,
            offset,
        } => {
            let mut v = Vec::with_capacity(28);
            v.extend_from_slice(&root.to_le_bytes());
            v.extend_from_slice(&objectid.to_le_bytes());
            v.extend_from_slice(&offset.to_le_bytes());
            v.extend_from_slice(&count_u32(bytenr, key, count)?.to_le_bytes());
            (
                Key::new(
                    bytenr,
                    EXTENT_DATA_REF_KEY,
                    hash_extent_data_ref(root, objectid, offset),
                ),
                v,
            )
        }
    })
}

/// Whether no two `EXTENT_DATA_REF`s of `keyed` share a hash: then every
/// keyed backref is at its home key ([`keyed_backref_item`]; nothing was
/// moved by a collision).
pub(super) fn keyed_at_home(keyed: &[(RefKey, u64)]) -> bool {
    let mut hashes: Vec<u64> = keyed
        .iter()
        .filter_map(|&(k, _)| match k {
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => Some(hash_extent_data_ref(root, objectid, offset)),
            _ => None,
        })
        .collect();
    hashes.sort_unstable();
    hashes.windows(2).all(|w| w[0] != w[1])
}

fn decode_item_value(bytenr: u64, key: &Key, value: &[u8]) -> Result<ExtentItem, CodecError> {
    let mut r = Reader::new(value);
    let head = r.u8("item flags byte")?;
    if head & !ITEM_HAS_TREE_KEY != 0 {
        return Err(CodecError::Invalid {
            field: "item flags byte",
            value: u64::from(head),
        });
    }
    let flags = r.varint("item flags")?;
    let generation = r.varint("item generation")?;
    let (kind, num_bytes) = match key.item_type {
        EXTENT_ITEM_KEY => (ExtentKind::Data, key.offset),
        METADATA_ITEM_KEY => {
            let level = u8::try_from(key.offset).map_err(|_| CodecError::Invalid {
                field: "metadata item level",
                value: key.offset,
            })?;
            (ExtentKind::Tree { level }, r.varint("item num_bytes")?)
        }
        other => {
            return Err(CodecError::Invalid {
                field: "extent item type",
                value: u64::from(other),
            })
        }
    };
    let tree_key = if head & ITEM_HAS_TREE_KEY != 0 {
        Some(DiskKey {
            objectid: r.u64("tree key objectid")?,
            item_type: r.u8("tree key type")?,
            offset: r.u64("tree key offset")?,
        })
    } else {
        None
    };
    let mut item = ExtentItem::new(num_bytes, kind, generation);
    item.flags = flags;
    item.tree_key = tree_key;
    while !r.is_empty() {
        let code = r.u8("inline ref type")?;
        let (key, count) = match code {
            TREE_BLOCK_REF_KEY => (
                RefKey::TreeBlock {
                    root: r.u64("inline ref root")?,
                },
                1,
            ),
            SHARED_BLOCK_REF_KEY => (
                RefKey::SharedBlock {
                    parent: r.u64("inline ref parent")?,
                },
                1,
            ),
            EXTENT_DATA_REF_KEY => (
                RefKey::ExtentData {
                    root: r.u64("inline ref root")?,
                    objectid: r.u64("inline ref objectid")?,
                    offset: r.u64("inline ref offset")?,
                },
                u64::from(r.u32("inline ref count")?),
            ),
            SHARED_DATA_REF_KEY => (
                RefKey::SharedData {
                    parent: r.u64("inline ref parent")?,
                },
                u64::from(r.u32("inline ref count")?),
            ),
            other => {
                return Err(CodecError::Invalid {
                    field: "inline ref type",
                    value: u64::from(other),
                })
            }
        };
        if item.inline.last().is_some_and(|(k, _)| *k >= key) {
            return Err(CodecError::Extent {
                bytenr,
                reason: format!("inline backref '{key}' out of order or repeated"),
            });
        }
        item.inline.push((key, count));
        item.refs = item.refs.saturating_add(count);
    }
    Ok(item)
}

pub(super) fn decode_keyed_ref(
    bytenr: u64,
    key: &Key,
    value: &[u8],
) -> Result<(RefKey, u64), CodecError> {
    let mut r = Reader::new(value);
    let out = match key.item_type {
        TREE_BLOCK_REF_KEY => (RefKey::TreeBlock { root: key.offset }, 1),
        SHARED_BLOCK_REF_KEY => (RefKey::SharedBlock { parent: key.offset }, 1),
        SHARED_DATA_REF_KEY => (
            RefKey::SharedData { parent: key.offset },
            u64::from(r.u32("shared data ref count")?),
        ),
        EXTENT_DATA_REF_KEY => (
            RefKey::ExtentData {
                root: r.u64("extent data ref root")?,
                objectid: r.u64("extent data ref objectid")?,
                offset: r.u64("extent data ref offset")?,
            },
            u64::from(r.u32("extent data ref count")?),
        ),
        other => {
            return Err(CodecError::Extent {
                bytenr,
                reason: format!("unknown item type {other} at offset {}", key.offset),
            })
        }
    };
    r.finish("keyed backref")?;
    Ok(out)
}

/// Rebuilds extent items from B+tree items in key order, one extent at a
/// time, streaming: [`ExtentLoader::push`] every item, and take each
/// extent, decoded and checked, as soon as the next one begins; the last
/// one comes from [`ExtentLoader::finish`]. Memory is one extent. Keys
/// must ascend strictly; any other order is refused, so an extent is
/// never returned twice or out of order.
#[derive(Debug, Default)]
pub struct ExtentLoader {
    current: Option<(u64, ExtentItem)>,
    /// Key of the previous item.
    last_key: Option<Key>,
}

impl ExtentLoader {
    /// An empty loader.
    pub fn new() -> Self {
        Self::default()
    }

    fn complete(&mut self) -> Result<Option<(u64, ExtentItem)>, CodecError> {
        let Some((bytenr, mut item)) = self.current.take() else {
            return Ok(None);
        };
        item.keyed.sort_unstable_by_key(|a| a.0);
        item.check()
            .map_err(|source| CodecError::Item { bytenr, source })?;
        Ok(Some((bytenr, item)))
    }

    /// Takes the next item (keys must ascend). Returns the previous extent
    /// when `key` begins a new one.
    pub fn push(
        &mut self,
        key: &Key,
        value: &[u8],
    ) -> Result<Option<(u64, ExtentItem)>, CodecError> {
        let bytenr = key.objectid;
        if let Some(last) = self.last_key.filter(|last| last >= key) {
            return Err(CodecError::Extent {
                bytenr,
                reason: format!("item {key} does not follow item {last} in key order"),
            });
        }
        self.last_key = Some(*key);
        if key.item_type < TREE_BLOCK_REF_KEY {
            // Extent items sort before keyed backrefs, so a second extent
            // item of one bytenr follows the first directly.
            if self.current.as_ref().is_some_and(|(b, _)| *b == bytenr) {
                return Err(CodecError::Extent {
                    bytenr,
                    reason: "two extent items".into(),
                });
            }
            let done = self.complete()?;
            self.current = Some((bytenr, decode_item_value(bytenr, key, value)?));
            return Ok(done);
        }
        let (ref_key, count) = decode_keyed_ref(bytenr, key, value)?;
        let Some((_, item)) = self.current.as_mut().filter(|(cur, _)| *cur == bytenr) else {
            return Err(CodecError::Extent {
                bytenr,
                reason: format!("keyed backref '{ref_key}' without an extent item"),
            });
        };
        // For EXTENT_DATA_REF the key offset is a (possibly probed) hash;
        // the value is authoritative.
        item.keyed.push((ref_key, count));
        item.refs = item.refs.saturating_add(count);
        Ok(None)
    }

    /// The last extent, checked.
    pub fn finish(mut self) -> Result<Option<(u64, ExtentItem)>, CodecError> {
        self.complete()
    }

    /// Every extent of `items` (ascending keys) in one in-memory tree.
    pub fn load_all<'a>(
        items: impl IntoIterator<Item = (&'a Key, &'a [u8])>,
    ) -> Result<ExtentTree, CodecError> {
        let mut l = ExtentLoader::new();
        let mut tree = ExtentTree::new();
        for (k, v) in items {
            if let Some((b, item)) = l.push(k, v)? {
                tree.insert(b, item);
            }
        }
        if let Some((b, item)) = l.finish()? {
            tree.insert(b, item);
        }
        Ok(tree)
    }
}
