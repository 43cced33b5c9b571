//! What the daemon must answer, stated independently of it: the oracle
//! (`refd_core::oracle::Model`) for commits, a ref-verify shadow written
//! from ref-verify's rules for `REFUSED`, and the extent as LOOKUP and
//! BACKREFS must show it.

use std::collections::BTreeMap;

use refd_client::{Backrefs, LookupEntry};
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_core::oracle::ModelExtent;
use refd_proto::*;

/// One block as ref-verify (btrfs `ref-verify.c`, `--verify`) sees it:
/// committed + pending, updated op by op at ingest.
#[derive(Clone, Debug, Default)]
pub struct Block {
    num_bytes: u64,
    kind: Option<ExtentKind>,
    backrefs: BTreeMap<RefKey, u64>,
}

impl Block {
    fn refs(&self) -> u64 {
        self.backrefs.values().sum()
    }
}

/// The ref-verify shadow of every block, and its rules:
/// - an allocation of a block that still has references is refused;
/// - any other op on a block with no entry or no references is refused;
/// - an op must name the block's size and kind (an UPDATE_HEAD only its
///   size and whether it is data), and an UPDATE_HEAD setting flags on a
///   data block is refused;
/// - a drop of a backref the block does not have is refused, and so is a
///   second reference of one key on a tree block;
/// - a batch is checked op by op (each sees the ones before it) and
///   recorded entirely or not at all;
/// - a commit that refuses (quarantines) a block's ops puts its shadow
///   back to the committed extent; a restart rebuilds the shadow from the
///   committed tree.
#[derive(Clone, Debug, Default)]
pub struct Shadow {
    blocks: BTreeMap<u64, Block>,
}

impl Shadow {
    /// The shadow of committed extents.
    pub fn rebuild(extents: &BTreeMap<u64, ModelExtent>) -> Shadow {
        let mut s = Shadow::default();
        for &b in extents.keys() {
            s.resync(b, extents);
        }
        s
    }

    /// The shadow a restart rebuilds when ops stay pending (heads held at
    /// the last commit, nothing replayed): each block's committed extent
    /// plus its pending ops merged per backref (recovery forgets their
    /// seqs), a count never below zero; the latest allocation, if any,
    /// gives the block its shape.
    pub fn rebuild_with_pending<'a>(
        extents: &BTreeMap<u64, ModelExtent>,
        pending: impl Iterator<Item = &'a Op>,
    ) -> Shadow {
        let mut s = Shadow::rebuild(extents);
        let mut by_block: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        pending.for_each(|op| by_block.entry(op.bytenr).or_default().push(op));
        for (b, ops) in by_block {
            let mut net: BTreeMap<RefKey, i64> = BTreeMap::new();
            for op in &ops {
                if let Some(k) = op.key {
                    *net.entry(k).or_insert(0) += op.ref_mod();
                }
            }
            let block = s.blocks.entry(b).or_default();
            if let Some(a) = ops.iter().rev().find(|o| o.action == Action::AddExtent) {
                (block.num_bytes, block.kind) = (a.num_bytes, Some(a.kind));
            }
            for (k, n) in net {
                let c = block.backrefs.get(&k).copied().unwrap_or(0) as i64 + n;
                match c.max(0) as u64 {
                    0 => block.backrefs.remove(&k),
                    c => block.backrefs.insert(k, c),
                };
            }
        }
        s
    }

    /// Block `b` back to its committed extent (none: no entry).
    pub fn resync(&mut self, b: u64, extents: &BTreeMap<u64, ModelExtent>) {
        match extents.get(&b) {
            Some(e) => {
                self.blocks.insert(
                    b,
                    Block {
                        num_bytes: e.num_bytes,
                        kind: Some(e.kind),
                        backrefs: e.refs.clone(),
                    },
                );
            }
            None => {
                self.blocks.remove(&b);
            }
        }
    }

    /// Checks and records `ops` (all or none); `Err(index)` of the first
    /// refused op.
    pub fn check_batch(&mut self, ops: &[Op]) -> Result<(), usize> {
        let mut trial = self.blocks.clone();
        for (i, op) in ops.iter().enumerate() {
            if !check_one(&mut trial, op) {
                return Err(i);
            }
        }
        self.blocks = trial;
        Ok(())
    }
}

/// ref-verify's rules for one op (see [`Shadow`]); records it if it
/// passes.
fn check_one(blocks: &mut BTreeMap<u64, Block>, op: &Op) -> bool {
    let entry = blocks.get(&op.bytenr);
    if op.action == Action::AddExtent {
        if entry.is_some_and(|e| e.refs() > 0) {
            return false;
        }
        blocks.insert(
            op.bytenr,
            Block {
                num_bytes: op.num_bytes,
                kind: Some(op.kind),
                backrefs: BTreeMap::new(),
            },
        );
    } else {
        let Some(e) = entry.filter(|e| e.refs() > 0) else {
            return false;
        };
        let same_size = e.num_bytes == op.num_bytes;
        let shape_ok = match op.action {
            Action::UpdateHead => {
                same_size && e.kind.is_some_and(|k| k.is_data() == op.kind.is_data())
            }
            _ => same_size && e.kind == Some(op.kind),
        };
        if !shape_ok {
            return false;
        }
        let sets_flags = op.extent_op.is_some_and(|x| x.flags_to_set != 0);
        if op.action == Action::UpdateHead && op.kind.is_data() && sets_flags {
            return false;
        }
        if let Some(k) = op.key {
            let have = e.backrefs.get(&k).copied().unwrap_or(0);
            if op.action == Action::DropRef && have == 0 {
                return false;
            }
            if op.action == Action::AddRef && k.is_tree() && have >= 1 {
                return false;
            }
        }
    }
    let e = blocks.get_mut(&op.bytenr).expect("recorded above");
    if let Some(k) = op.key {
        let c = e.backrefs.entry(k).or_insert(0);
        if op.ref_mod() > 0 {
            *c += 1;
        } else {
            *c -= 1;
            if *c == 0 {
                e.backrefs.remove(&k);
            }
        }
    }
    true
}

/// An extent as LOOKUP and BACKREFS show it with nothing pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub refs: i64,
    pub committed_refs: u64,
    pub num_bytes: u64,
    pub lookup_flags: u8,
    pub level: u8,
    pub item_flags: u64,
    pub kind: u8,
    /// `(ref_type, k1, k2, k3, count)` in btrfs key order.
    pub backrefs: Vec<(u8, u64, u64, u64, i64)>,
}

/// What docs/protocol.md says LOOKUP and BACKREFS show for a committed
/// extent `e` (none: nothing known) with nothing pending.
pub fn expected_view(e: Option<&ModelExtent>) -> View {
    let Some(e) = e else {
        return View {
            refs: 0,
            committed_refs: 0,
            num_bytes: 0,
            lookup_flags: 0,
            level: 0,
            item_flags: 0,
            kind: 255,
            backrefs: Vec::new(),
        };
    };
    let refs: u64 = e.refs.values().sum();
    let (data, level) = match e.kind {
        ExtentKind::Data => (true, 0),
        ExtentKind::Tree { level } => (false, level),
    };
    let mut lookup_flags = LOOKUP_COMMITTED;
    let mut item_flags = if data {
        ITEM_FLAG_DATA
    } else {
        ITEM_FLAG_TREE_BLOCK
    };
    if data {
        lookup_flags |= LOOKUP_DATA;
    }
    if e.full_backref {
        lookup_flags |= LOOKUP_FULL_BACKREF;
        item_flags |= ITEM_FLAG_FULL_BACKREF;
    }
    View {
        refs: refs as i64,
        committed_refs: refs,
        num_bytes: e.num_bytes,
        lookup_flags,
        level,
        item_flags,
        kind: if data { KIND_DATA } else { KIND_TREE_BLOCK },
        backrefs: e
            .refs
            .iter()
            .map(|(k, &n)| {
                let (t, k1, k2, k3) = key_words(k);
                (t, k1, k2, k3, n as i64)
            })
            .collect(),
    }
}

/// A backref's wire fields (docs/protocol.md, "Op": `ref_type`, `k1..k3`).
fn key_words(k: &RefKey) -> (u8, u64, u64, u64) {
    match *k {
        RefKey::TreeBlock { root } => (REF_TYPE_TREE_BLOCK, root, 0, 0),
        RefKey::ExtentData {
            root,
            objectid,
            offset,
        } => (REF_TYPE_EXTENT_DATA, root, objectid, offset),
        RefKey::SharedBlock { parent } => (REF_TYPE_SHARED_BLOCK, parent, 0, 0),
        RefKey::SharedData { parent } => (REF_TYPE_SHARED_DATA, parent, 0, 0),
    }
}

/// What the daemon showed.
pub fn daemon_view(l: &LookupEntry, b: &Backrefs) -> View {
    View {
        refs: l.refs,
        committed_refs: l.committed_refs,
        num_bytes: l.num_bytes,
        lookup_flags: l.flags,
        level: l.level,
        item_flags: b.item_flags,
        kind: b.kind,
        backrefs: b
            .entries
            .iter()
            .map(|e| (e.ref_type, e.k1, e.k2, e.k3, e.count))
            .collect(),
    }
}

/// The first extent whose view differs, if any.
pub fn first_difference(
    extents: &BTreeMap<u64, ModelExtent>,
    seen: &BTreeMap<u64, View>,
) -> Option<String> {
    seen.iter().find_map(|(&b, v)| {
        let want = expected_view(extents.get(&b));
        (want != *v).then(|| format!("extent {b}: daemon {v:?}, oracle {want:?}"))
    })
}
