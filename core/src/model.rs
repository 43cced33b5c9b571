//! The data model: extents, backref keys, actions and ops.
//!
//! Vocabulary follows btrfs (`fs/btrfs/delayed-ref.[ch]`, `ctree.h`) wherever
//! the concept is the same, so a reader who knows the kernel can map one to
//! the other:
//!
//! | refd                      | btrfs                                        |
//! |---------------------------|----------------------------------------------|
//! | [`RefKey::TreeBlock`]     | `BTRFS_TREE_BLOCK_REF_KEY` (176) `{root}`    |
//! | [`RefKey::ExtentData`]    | `BTRFS_EXTENT_DATA_REF_KEY` (178) `{root, objectid, offset}` |
//! | [`RefKey::SharedBlock`]   | `BTRFS_SHARED_BLOCK_REF_KEY` (182) `{parent}`|
//! | [`RefKey::SharedData`]    | `BTRFS_SHARED_DATA_REF_KEY` (184) `{parent}` |
//! | [`Action::AddRef`]        | `BTRFS_ADD_DELAYED_REF`                      |
//! | [`Action::DropRef`]       | `BTRFS_DROP_DELAYED_REF`                     |
//! | [`Action::AddExtent`]     | `BTRFS_ADD_DELAYED_EXTENT` (sets `must_insert_reserved`) |
//! | [`Action::UpdateHead`]    | `BTRFS_UPDATE_DELAYED_HEAD` (an `extent_op`) |
//!
//! The derived `Ord` of [`RefKey`] is exactly the kernel's `comp_refs()`
//! without seq: first the key type number, then `root`/`parent` for tree
//! refs, then `root, objectid, offset` (or `parent`) for data refs. Delayed
//! refs are ordered by `(RefKey, seq)`, which is `comp_refs(.., check_seq =
//! true)`.
//!
//! Input from outside (the wire, the CLI, a trace) arrives as a flat
//! [`RawOp`] shaped like the kernel's `struct btrfs_ref`; [`RawOp::validate`]
//! turns it into a typed [`Op`] or a typed [`OpError`]. No input panics.

use std::fmt;

/// Highest tree block level (btrfs `BTRFS_MAX_LEVEL` is 8: levels 0..=7).
pub const LEVEL_MAX: u8 = 7;

/// Largest seq: the top byte is reserved so packed encodings can carry the
/// backref type beside it (btrfs seqs are a counter far below 2^56).
pub const SEQ_MAX: u64 = (1 << 56) - 1;

/// Extent item flag: a data extent (`BTRFS_EXTENT_FLAG_DATA`).
pub const EXTENT_FLAG_DATA: u64 = 1 << 0;
/// Extent item flag: a tree block (`BTRFS_EXTENT_FLAG_TREE_BLOCK`).
pub const EXTENT_FLAG_TREE_BLOCK: u64 = 1 << 1;
/// Extent item flag: the tree block uses full (shared) backrefs
/// (`BTRFS_BLOCK_FLAG_FULL_BACKREF`).
pub const BLOCK_FLAG_FULL_BACKREF: u64 = 1 << 8;
/// The flags an `extent_op` may set. Setting the kind bits through an
/// extent_op would change what an extent is, so it is refused.
pub const EXTENT_OP_FLAGS_SETTABLE: u64 = BLOCK_FLAG_FULL_BACKREF;

/// btrfs key type numbers of the four backref kinds.
pub const TREE_BLOCK_REF_KEY: u8 = 176;
/// See [`TREE_BLOCK_REF_KEY`].
pub const EXTENT_DATA_REF_KEY: u8 = 178;
/// See [`TREE_BLOCK_REF_KEY`].
pub const SHARED_BLOCK_REF_KEY: u8 = 182;
/// See [`TREE_BLOCK_REF_KEY`].
pub const SHARED_DATA_REF_KEY: u8 = 184;

/// Which of `parts` partitions an extent belongs to: a multiplicative hash
/// of the bytenr (in 4 KiB units), so neighbouring extents spread out while
/// all ops of one extent land in one partition (one ingest worker, one
/// ref-verify shard). `parts` must be at least 1.
pub fn partition(bytenr: u64, parts: usize) -> usize {
    debug_assert!(parts > 0);
    (((bytenr >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % parts.max(1) as u64) as usize
}

/// What an extent is: data, or a tree block at a level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExtentKind {
    /// A data extent.
    Data,
    /// A tree block (metadata) at `level` (0 = leaf).
    Tree {
        /// Tree level, 0..=[`LEVEL_MAX`].
        level: u8,
    },
}

impl ExtentKind {
    /// True for data extents.
    pub fn is_data(self) -> bool {
        matches!(self, ExtentKind::Data)
    }

    /// The kind bits of the extent item flags.
    pub fn flags(self) -> u64 {
        match self {
            ExtentKind::Data => EXTENT_FLAG_DATA,
            ExtentKind::Tree { .. } => EXTENT_FLAG_TREE_BLOCK,
        }
    }
}

impl fmt::Display for ExtentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtentKind::Data => write!(f, "data"),
            ExtentKind::Tree { level } => write!(f, "tree block level {level}"),
        }
    }
}

/// A backref key: who references the extent. Ordered exactly as btrfs
/// `comp_refs()` orders delayed refs of one head (type, then fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefKey {
    /// `TREE_BLOCK_REF`: the tree `root` points at this block.
    TreeBlock {
        /// Owning tree id.
        root: u64,
    },
    /// `EXTENT_DATA_REF`: file `objectid` (inode) of tree `root` at file
    /// `offset` (minus the offset into the extent) references this data.
    ExtentData {
        /// Owning tree (subvolume) id.
        root: u64,
        /// Inode number.
        objectid: u64,
        /// File offset minus the offset into the extent.
        offset: u64,
    },
    /// `SHARED_BLOCK_REF`: the tree block at `parent` points at this block.
    SharedBlock {
        /// Bytenr of the referencing tree block.
        parent: u64,
    },
    /// `SHARED_DATA_REF`: the leaf at `parent` references this data.
    SharedData {
        /// Bytenr of the referencing leaf.
        parent: u64,
    },
}

impl RefKey {
    /// The btrfs key type number of this backref kind.
    pub fn type_code(&self) -> u8 {
        match self {
            RefKey::TreeBlock { .. } => TREE_BLOCK_REF_KEY,
            RefKey::ExtentData { .. } => EXTENT_DATA_REF_KEY,
            RefKey::SharedBlock { .. } => SHARED_BLOCK_REF_KEY,
            RefKey::SharedData { .. } => SHARED_DATA_REF_KEY,
        }
    }

    /// True for the two data kinds.
    pub fn is_data(&self) -> bool {
        matches!(self, RefKey::ExtentData { .. } | RefKey::SharedData { .. })
    }

    /// True for keys whose count is implicitly one per reference holder: a
    /// tree block cannot be referenced twice by the same root or parent.
    pub fn is_tree(&self) -> bool {
        !self.is_data()
    }

    /// The three key words `(k1, k2, k3)` used by packed encodings: root or
    /// parent, then objectid and offset for `EXTENT_DATA_REF`.
    pub fn words(&self) -> (u64, u64, u64) {
        match *self {
            RefKey::TreeBlock { root } => (root, 0, 0),
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => (root, objectid, offset),
            RefKey::SharedBlock { parent } => (parent, 0, 0),
            RefKey::SharedData { parent } => (parent, 0, 0),
        }
    }

    /// Inverse of [`RefKey::type_code`] + [`RefKey::words`].
    pub fn from_words(code: u8, k1: u64, k2: u64, k3: u64) -> Option<RefKey> {
        match code {
            TREE_BLOCK_REF_KEY => Some(RefKey::TreeBlock { root: k1 }),
            EXTENT_DATA_REF_KEY => Some(RefKey::ExtentData {
                root: k1,
                objectid: k2,
                offset: k3,
            }),
            SHARED_BLOCK_REF_KEY => Some(RefKey::SharedBlock { parent: k1 }),
            SHARED_DATA_REF_KEY => Some(RefKey::SharedData { parent: k1 }),
            _ => None,
        }
    }

    /// Size in bytes of this backref stored inline in a btrfs extent item
    /// (`btrfs_extent_inline_ref_size()`).
    pub fn inline_bytes(&self) -> usize {
        match self {
            RefKey::TreeBlock { .. } | RefKey::SharedBlock { .. } => 9,
            RefKey::ExtentData { .. } => 1 + 28,
            RefKey::SharedData { .. } => 1 + 8 + 4,
        }
    }
}

impl fmt::Display for RefKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefKey::TreeBlock { root } => write!(f, "tree block backref root {root}"),
            RefKey::ExtentData {
                root,
                objectid,
                offset,
            } => write!(
                f,
                "extent data backref root {root} objectid {objectid} offset {offset}"
            ),
            RefKey::SharedBlock { parent } => write!(f, "shared block backref parent {parent}"),
            RefKey::SharedData { parent } => write!(f, "shared data backref parent {parent}"),
        }
    }
}

/// A btrfs disk key `(objectid, type, offset)`, the first key of a tree
/// block, carried by an extent_op that updates it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskKey {
    /// Object id.
    pub objectid: u64,
    /// Item type.
    pub item_type: u8,
    /// Offset.
    pub offset: u64,
}

/// An extent_op: flags to set on the extent item and/or a new first key of a
/// tree block (`struct btrfs_delayed_extent_op`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtentOp {
    /// Flags OR-ed into the extent item (only [`EXTENT_OP_FLAGS_SETTABLE`]).
    pub flags_to_set: u64,
    /// Replace the tree block key, if `Some`.
    pub key: Option<DiskKey>,
}

impl ExtentOp {
    /// True when the op changes nothing.
    pub fn is_empty(&self) -> bool {
        self.flags_to_set == 0 && self.key.is_none()
    }
}

/// What an op does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Add one reference (`BTRFS_ADD_DELAYED_REF`).
    AddRef,
    /// Drop one reference (`BTRFS_DROP_DELAYED_REF`).
    DropRef,
    /// The extent was just allocated and gets its first reference
    /// (`BTRFS_ADD_DELAYED_EXTENT`): the extent item is created from it.
    AddExtent,
    /// Only an extent_op; no reference changes (`BTRFS_UPDATE_DELAYED_HEAD`).
    UpdateHead,
}

impl Action {
    /// The signed change of the reference count.
    pub fn ref_mod(self) -> i64 {
        match self {
            Action::AddRef | Action::AddExtent => 1,
            Action::DropRef => -1,
            Action::UpdateHead => 0,
        }
    }

    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            Action::AddRef => 1,
            Action::DropRef => 2,
            Action::AddExtent => 3,
            Action::UpdateHead => 4,
        }
    }

    /// Inverse of [`Action::code`].
    pub fn from_code(code: u8) -> Option<Action> {
        match code {
            1 => Some(Action::AddRef),
            2 => Some(Action::DropRef),
            3 => Some(Action::AddExtent),
            4 => Some(Action::UpdateHead),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::AddRef => "ADD_REF",
            Action::DropRef => "DROP_REF",
            Action::AddExtent => "ADD_EXTENT",
            Action::UpdateHead => "UPDATE_HEAD",
        })
    }
}

/// A validated op on one extent. Construct through [`Op::new`],
/// [`Op::update_head`] or [`RawOp::validate`]; the fields are public for
/// reading, and every constructor upholds the invariants listed on
/// [`RawOp::validate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    /// Logical address of the extent.
    pub bytenr: u64,
    /// Size of the extent.
    pub num_bytes: u64,
    /// Data or tree block (with level).
    pub kind: ExtentKind,
    /// What the op does.
    pub action: Action,
    /// The backref; `None` exactly for [`Action::UpdateHead`].
    pub key: Option<RefKey>,
    /// Tree-mod-log sequence number in force when the op was queued
    /// (0 = none).
    pub seq: u64,
    /// Flags/key update; required for `UpdateHead`, optional for a tree
    /// block `AddExtent` (btrfs passes the new block's flags and key), and
    /// refused elsewhere.
    pub extent_op: Option<ExtentOp>,
}

impl Op {
    /// A reference op (`AddRef`, `DropRef`, `AddExtent`), validated.
    pub fn new(
        bytenr: u64,
        num_bytes: u64,
        kind: ExtentKind,
        action: Action,
        key: RefKey,
        seq: u64,
    ) -> Result<Op, OpError> {
        let op = Op {
            bytenr,
            num_bytes,
            kind,
            action,
            key: Some(key),
            seq,
            extent_op: None,
        };
        op.check()?;
        Ok(op)
    }

    /// An `UpdateHead` op carrying `extent_op`, validated.
    pub fn update_head(
        bytenr: u64,
        num_bytes: u64,
        kind: ExtentKind,
        extent_op: ExtentOp,
    ) -> Result<Op, OpError> {
        let op = Op {
            bytenr,
            num_bytes,
            kind,
            action: Action::UpdateHead,
            key: None,
            seq: 0,
            extent_op: Some(extent_op),
        };
        op.check()?;
        Ok(op)
    }

    /// Attach an extent_op to a tree block `AddExtent`, validated.
    pub fn with_extent_op(mut self, extent_op: ExtentOp) -> Result<Op, OpError> {
        self.extent_op = Some(extent_op);
        self.check()?;
        Ok(self)
    }

    /// Check every invariant of a well-formed op.
    pub fn check(&self) -> Result<(), OpError> {
        let bytenr = self.bytenr;
        if self.num_bytes == 0 {
            return Err(OpError::ZeroNumBytes { bytenr });
        }
        if bytenr.checked_add(self.num_bytes).is_none() {
            return Err(OpError::RangeOverflow {
                bytenr,
                num_bytes: self.num_bytes,
            });
        }
        if self.seq > SEQ_MAX {
            return Err(OpError::SeqOutOfRange {
                bytenr,
                seq: self.seq,
            });
        }
        if let ExtentKind::Tree { level } = self.kind {
            if level > LEVEL_MAX {
                return Err(OpError::LevelOutOfRange { bytenr, level });
            }
        }
        match (self.action, self.key) {
            (Action::UpdateHead, Some(_)) => {
                return Err(OpError::UpdateHeadWithKey { bytenr });
            }
            (Action::UpdateHead, None) => match self.extent_op {
                None => return Err(OpError::MissingExtentOp { bytenr }),
                Some(eop) if eop.is_empty() => {
                    return Err(OpError::MissingExtentOp { bytenr });
                }
                Some(_) => {}
            },
            (_, None) => return Err(OpError::MissingKey { bytenr }),
            (_, Some(key)) => {
                if key.is_data() != self.kind.is_data() {
                    return Err(OpError::KindMismatch {
                        bytenr,
                        kind: self.kind,
                        key,
                    });
                }
                match key {
                    RefKey::TreeBlock { root } | RefKey::ExtentData { root, .. } if root == 0 => {
                        return Err(OpError::MissingRoot { bytenr });
                    }
                    RefKey::SharedBlock { parent } | RefKey::SharedData { parent }
                        if parent == 0 =>
                    {
                        return Err(OpError::MissingParent { bytenr });
                    }
                    _ => {}
                }
                if let Some(eop) = self.extent_op {
                    if self.action != Action::AddExtent || self.kind.is_data() {
                        return Err(OpError::UnexpectedExtentOp {
                            bytenr,
                            action: self.action,
                        });
                    }
                    let _ = eop;
                }
            }
        }
        if let Some(eop) = self.extent_op {
            if eop.flags_to_set & !EXTENT_OP_FLAGS_SETTABLE != 0 {
                return Err(OpError::BadExtentOpFlags {
                    bytenr,
                    flags: eop.flags_to_set,
                });
            }
            if eop.key.is_some() && self.kind.is_data() {
                return Err(OpError::KeyOnData { bytenr });
            }
        }
        Ok(())
    }

    /// The signed reference change of this op.
    pub fn ref_mod(&self) -> i64 {
        self.action.ref_mod()
    }

    /// Whether the op is a plain ref op: an ADD_REF or DROP_REF with no
    /// extent_op (what `SummaryFold` sums in place and a staging buffer's
    /// hot cell sums).
    pub fn is_plain_ref(&self) -> bool {
        self.extent_op.is_none() && matches!(self.action, Action::AddRef | Action::DropRef)
    }

    /// Whether the op takes a stamp when it is queued: an allocation or an
    /// op carrying an extent_op, the fields merged by the latest stamp
    /// ([`crate::head`]). Whoever replays queued ops must queue these in
    /// the order they were stamped.
    pub fn is_stamped(&self) -> bool {
        self.action == Action::AddExtent || self.extent_op.is_some()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytenr {} num_bytes {} ({})",
            self.action, self.bytenr, self.num_bytes, self.kind
        )?;
        if let Some(key) = self.key {
            write!(f, " {key}")?;
        }
        if self.seq != 0 {
            write!(f, " seq {}", self.seq)?;
        }
        if let Some(eop) = self.extent_op {
            write!(f, " extent_op flags {:#x}", eop.flags_to_set)?;
            if let Some(k) = eop.key {
                write!(f, " key ({} {} {})", k.objectid, k.item_type, k.offset)?;
            }
        }
        Ok(())
    }
}

/// A flat, unvalidated op as it arrives from outside, shaped like the
/// kernel's `struct btrfs_ref` plus head fields. Numbers only; nothing here
/// is trusted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawOp {
    /// Extent address.
    pub bytenr: u64,
    /// Extent size.
    pub num_bytes: u64,
    /// [`Action::code`].
    pub action: u8,
    /// True for data extents.
    pub is_data: bool,
    /// Tree block level (ignored for data).
    pub level: u8,
    /// Backref key type number (176, 178, 182, 184), 0 for `UpdateHead`.
    pub ref_type: u8,
    /// Owning root (`TREE_BLOCK_REF`, `EXTENT_DATA_REF`), else 0.
    pub root: u64,
    /// Parent block (`SHARED_*_REF`), else 0.
    pub parent: u64,
    /// Inode number (`EXTENT_DATA_REF`), else 0.
    pub objectid: u64,
    /// File offset (`EXTENT_DATA_REF`), else 0.
    pub offset: u64,
    /// Tree-mod-log seq.
    pub seq: u64,
    /// extent_op flags to set (0 = none).
    pub flags_to_set: u64,
    /// extent_op new key, if any.
    pub key: Option<DiskKey>,
}

impl RawOp {
    /// Validate into an [`Op`]. Invariants of a valid op:
    /// - `num_bytes > 0` and `bytenr + num_bytes` does not overflow;
    /// - a tree block level is at most [`LEVEL_MAX`];
    /// - the action code and the ref type code are known;
    /// - a reference op has a backref of the extent's kind (tree refs on tree
    ///   blocks, data refs on data); `UpdateHead` has none;
    /// - `TREE_BLOCK_REF`/`EXTENT_DATA_REF` name a non-zero root and no
    ///   parent; `SHARED_*_REF` name a non-zero parent and no root;
    /// - objectid/offset only on `EXTENT_DATA_REF`;
    /// - an extent_op only on `UpdateHead` (where it is required) or on a
    ///   tree block `AddExtent`, setting only settable flags, and a key only
    ///   for tree blocks.
    pub fn validate(&self) -> Result<Op, OpError> {
        let bytenr = self.bytenr;
        let action = Action::from_code(self.action).ok_or(OpError::UnknownAction {
            bytenr,
            code: self.action,
        })?;
        let kind = if self.is_data {
            ExtentKind::Data
        } else {
            ExtentKind::Tree { level: self.level }
        };
        let extent_op = if self.flags_to_set != 0 || self.key.is_some() {
            Some(ExtentOp {
                flags_to_set: self.flags_to_set,
                key: self.key,
            })
        } else {
            None
        };
        let key = if action == Action::UpdateHead {
            if self.ref_type != 0 || self.root != 0 || self.parent != 0 {
                return Err(OpError::UpdateHeadWithKey { bytenr });
            }
            None
        } else {
            let shared = matches!(self.ref_type, SHARED_BLOCK_REF_KEY | SHARED_DATA_REF_KEY);
            if !matches!(
                self.ref_type,
                TREE_BLOCK_REF_KEY
                    | EXTENT_DATA_REF_KEY
                    | SHARED_BLOCK_REF_KEY
                    | SHARED_DATA_REF_KEY
            ) {
                return Err(OpError::UnknownRefType {
                    bytenr,
                    code: self.ref_type,
                });
            }
            if self.root != 0 && self.parent != 0 {
                return Err(OpError::ParentAndRoot {
                    bytenr,
                    root: self.root,
                    parent: self.parent,
                });
            }
            if shared && self.root != 0 {
                return Err(OpError::ParentAndRoot {
                    bytenr,
                    root: self.root,
                    parent: self.parent,
                });
            }
            if !shared && self.parent != 0 {
                return Err(OpError::ParentAndRoot {
                    bytenr,
                    root: self.root,
                    parent: self.parent,
                });
            }
            if self.ref_type != EXTENT_DATA_REF_KEY && (self.objectid != 0 || self.offset != 0) {
                return Err(OpError::StrayDataFields { bytenr });
            }
            let key = RefKey::from_words(
                self.ref_type,
                if shared { self.parent } else { self.root },
                self.objectid,
                self.offset,
            )
            .ok_or(OpError::UnknownRefType {
                bytenr,
                code: self.ref_type,
            })?;
            Some(key)
        };
        let op = Op {
            bytenr,
            num_bytes: self.num_bytes,
            kind,
            action,
            key,
            seq: self.seq,
            extent_op,
        };
        op.check()?;
        Ok(op)
    }
}

impl From<&Op> for RawOp {
    fn from(op: &Op) -> RawOp {
        let (ref_type, root, parent, objectid, offset) = match op.key {
            None => (0, 0, 0, 0, 0),
            Some(k) => {
                let (k1, k2, k3) = k.words();
                match k {
                    RefKey::TreeBlock { .. } | RefKey::ExtentData { .. } => {
                        (k.type_code(), k1, 0, k2, k3)
                    }
                    _ => (k.type_code(), 0, k1, 0, 0),
                }
            }
        };
        RawOp {
            bytenr: op.bytenr,
            num_bytes: op.num_bytes,
            action: op.action.code(),
            is_data: op.kind.is_data(),
            level: match op.kind {
                ExtentKind::Tree { level } => level,
                ExtentKind::Data => 0,
            },
            ref_type,
            root,
            parent,
            objectid,
            offset,
            seq: op.seq,
            flags_to_set: op.extent_op.map_or(0, |e| e.flags_to_set),
            key: op.extent_op.and_then(|e| e.key),
        }
    }
}

/// Why an op was refused at validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// `num_bytes` is zero.
    #[error("extent {bytenr}: num_bytes is 0")]
    ZeroNumBytes {
        /// Extent.
        bytenr: u64,
    },
    /// `bytenr + num_bytes` overflows u64.
    #[error("extent {bytenr}: bytenr + num_bytes ({num_bytes}) overflows")]
    RangeOverflow {
        /// Extent.
        bytenr: u64,
        /// Size given.
        num_bytes: u64,
    },
    /// Tree level above [`LEVEL_MAX`].
    #[error("extent {bytenr}: tree level {level} out of range 0..={LEVEL_MAX}")]
    LevelOutOfRange {
        /// Extent.
        bytenr: u64,
        /// Level given.
        level: u8,
    },
    /// seq above [`SEQ_MAX`].
    #[error("extent {bytenr}: seq {seq} above the maximum {SEQ_MAX}")]
    SeqOutOfRange {
        /// Extent.
        bytenr: u64,
        /// Seq given.
        seq: u64,
    },
    /// Unknown action code.
    #[error("extent {bytenr}: unknown action code {code}")]
    UnknownAction {
        /// Extent.
        bytenr: u64,
        /// Code given.
        code: u8,
    },
    /// Unknown backref type code.
    #[error("extent {bytenr}: unknown backref type {code} (expected 176, 178, 182 or 184)")]
    UnknownRefType {
        /// Extent.
        bytenr: u64,
        /// Code given.
        code: u8,
    },
    /// Both, or the wrong one of, parent and root were given.
    #[error("extent {bytenr}: root {root} and parent {parent} given; tree/data refs take a root, shared refs a parent, never both")]
    ParentAndRoot {
        /// Extent.
        bytenr: u64,
        /// Root given.
        root: u64,
        /// Parent given.
        parent: u64,
    },
    /// A root-keyed backref without a root.
    #[error("extent {bytenr}: backref needs a non-zero root")]
    MissingRoot {
        /// Extent.
        bytenr: u64,
    },
    /// A shared backref without a parent.
    #[error("extent {bytenr}: shared backref needs a non-zero parent")]
    MissingParent {
        /// Extent.
        bytenr: u64,
    },
    /// objectid/offset on a kind that has none.
    #[error("extent {bytenr}: objectid/offset are only valid on EXTENT_DATA_REF")]
    StrayDataFields {
        /// Extent.
        bytenr: u64,
    },
    /// Data backref on a tree block or tree backref on data.
    #[error("extent {bytenr}: backref '{key}' does not fit a {kind} extent")]
    KindMismatch {
        /// Extent.
        bytenr: u64,
        /// Extent kind.
        kind: ExtentKind,
        /// Backref given.
        key: RefKey,
    },
    /// A reference op without a backref.
    #[error("extent {bytenr}: reference op without a backref key")]
    MissingKey {
        /// Extent.
        bytenr: u64,
    },
    /// `UpdateHead` carrying a backref.
    #[error("extent {bytenr}: UPDATE_HEAD carries no backref")]
    UpdateHeadWithKey {
        /// Extent.
        bytenr: u64,
    },
    /// `UpdateHead` without an extent_op (or an empty one).
    #[error("extent {bytenr}: UPDATE_HEAD needs a non-empty extent_op")]
    MissingExtentOp {
        /// Extent.
        bytenr: u64,
    },
    /// An extent_op on an op that cannot carry one.
    #[error("extent {bytenr}: {action} cannot carry an extent_op (only UPDATE_HEAD and tree block ADD_EXTENT)")]
    UnexpectedExtentOp {
        /// Extent.
        bytenr: u64,
        /// Action given.
        action: Action,
    },
    /// extent_op flags outside [`EXTENT_OP_FLAGS_SETTABLE`].
    #[error("extent {bytenr}: extent_op flags {flags:#x} include bits that cannot be set")]
    BadExtentOpFlags {
        /// Extent.
        bytenr: u64,
        /// Flags given.
        flags: u64,
    },
    /// A key update on a data extent.
    #[error("extent {bytenr}: extent_op key update on a data extent")]
    KeyOnData {
        /// Extent.
        bytenr: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawOp {
        RawOp {
            bytenr: 4096,
            num_bytes: 4096,
            action: Action::AddRef.code(),
            is_data: true,
            ref_type: EXTENT_DATA_REF_KEY,
            root: 5,
            objectid: 257,
            ..RawOp::default()
        }
    }

    #[test]
    fn ref_key_order_matches_btrfs_comp_refs() {
        // Type order 176 < 178 < 182 < 184, then fields.
        let keys = [
            RefKey::TreeBlock { root: 9 },
            RefKey::ExtentData {
                root: 1,
                objectid: 1,
                offset: 0,
            },
            RefKey::SharedBlock { parent: 1 },
            RefKey::SharedData { parent: 1 },
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].type_code() < w[1].type_code());
        }
        let a = RefKey::ExtentData {
            root: 5,
            objectid: 300,
            offset: 0,
        };
        let b = RefKey::ExtentData {
            root: 5,
            objectid: 257,
            offset: 4096,
        };
        assert!(b < a, "objectid compares before offset");
    }

    #[test]
    fn validation_rejects_bad_input() {
        let ok = raw().validate().unwrap();
        assert_eq!(ok.key.unwrap().type_code(), EXTENT_DATA_REF_KEY);
        assert_eq!(RawOp::from(&ok), raw());

        type Case = (RawOp, fn(&OpError) -> bool);
        let cases: Vec<Case> = vec![
            (
                RawOp {
                    num_bytes: 0,
                    ..raw()
                },
                |e| matches!(e, OpError::ZeroNumBytes { .. }),
            ),
            (
                RawOp {
                    bytenr: u64::MAX,
                    ..raw()
                },
                |e| matches!(e, OpError::RangeOverflow { .. }),
            ),
            (
                RawOp {
                    is_data: false,
                    level: 8,
                    ref_type: TREE_BLOCK_REF_KEY,
                    objectid: 0,
                    ..raw()
                },
                |e| matches!(e, OpError::LevelOutOfRange { level: 8, .. }),
            ),
            (RawOp { action: 9, ..raw() }, |e| {
                matches!(e, OpError::UnknownAction { .. })
            }),
            (
                RawOp {
                    ref_type: 7,
                    ..raw()
                },
                |e| matches!(e, OpError::UnknownRefType { .. }),
            ),
            (
                RawOp {
                    parent: 8192,
                    ..raw()
                },
                |e| matches!(e, OpError::ParentAndRoot { .. }),
            ),
            (
                RawOp {
                    ref_type: SHARED_DATA_REF_KEY,
                    objectid: 0,
                    parent: 8192,
                    ..raw()
                },
                |e| matches!(e, OpError::ParentAndRoot { .. }),
            ),
            (RawOp { root: 0, ..raw() }, |e| {
                matches!(e, OpError::MissingRoot { .. })
            }),
            (
                RawOp {
                    ref_type: TREE_BLOCK_REF_KEY,
                    ..raw()
                },
                |e| matches!(e, OpError::StrayDataFields { .. }),
            ),
            (
                RawOp {
                    ref_type: TREE_BLOCK_REF_KEY,
                    objectid: 0,
                    ..raw()
                },
                |e| matches!(e, OpError::KindMismatch { .. }),
            ),
            (
                RawOp {
                    action: Action::UpdateHead.code(),
                    ..raw()
                },
                |e| matches!(e, OpError::UpdateHeadWithKey { .. }),
            ),
            (
                RawOp {
                    action: Action::UpdateHead.code(),
                    is_data: false,
                    ref_type: 0,
                    root: 0,
                    objectid: 0,
                    ..raw()
                },
                |e| matches!(e, OpError::MissingExtentOp { .. }),
            ),
            (
                RawOp {
                    flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                    ..raw()
                },
                |e| matches!(e, OpError::UnexpectedExtentOp { .. }),
            ),
            (
                RawOp {
                    action: Action::UpdateHead.code(),
                    is_data: false,
                    ref_type: 0,
                    root: 0,
                    objectid: 0,
                    flags_to_set: EXTENT_FLAG_DATA,
                    ..raw()
                },
                |e| matches!(e, OpError::BadExtentOpFlags { .. }),
            ),
        ];
        for (i, (r, pred)) in cases.into_iter().enumerate() {
            let e = r.validate().expect_err(&format!("case {i} must fail"));
            assert!(pred(&e), "case {i}: unexpected error {e:?}");
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn raw_roundtrip_all_kinds() {
        let ops = [
            Op::new(
                16384,
                16384,
                ExtentKind::Tree { level: 1 },
                Action::AddExtent,
                RefKey::TreeBlock { root: 2 },
                0,
            )
            .unwrap()
            .with_extent_op(ExtentOp {
                flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                key: Some(DiskKey {
                    objectid: 1,
                    item_type: 2,
                    offset: 3,
                }),
            })
            .unwrap(),
            Op::new(
                16384,
                16384,
                ExtentKind::Tree { level: 0 },
                Action::DropRef,
                RefKey::SharedBlock { parent: 32768 },
                7,
            )
            .unwrap(),
            Op::new(
                4096,
                8192,
                ExtentKind::Data,
                Action::AddRef,
                RefKey::SharedData { parent: 32768 },
                0,
            )
            .unwrap(),
            Op::update_head(
                16384,
                16384,
                ExtentKind::Tree { level: 0 },
                ExtentOp {
                    flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                    key: None,
                },
            )
            .unwrap(),
        ];
        for op in ops {
            assert_eq!(RawOp::from(&op).validate().unwrap(), op);
        }
    }
}
