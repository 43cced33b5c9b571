//! [`BTreeError`]: every way a tree operation can fail, with the address,
//! generation or key a user needs to act on it.

use crate::btree::key::Key;
use crate::format::FormatError;
use crate::storage::StorageError;

/// Errors of the copy-on-write B+tree.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BTreeError {
    /// A storage call failed; `context` says what the tree was doing.
    #[error("b+tree: {context}: {source}")]
    Storage {
        /// What the tree was doing (e.g. "read node at 1048576").
        context: String,
        /// The storage error.
        #[source]
        source: StorageError,
    },
    /// A node failed its header checks (magic, checksum, version, fs id,
    /// claimed address, generation recorded by the parent).
    #[error("b+tree: node at {addr} (expected generation {expected_generation}): {source}")]
    Node {
        /// Byte address the node was read from.
        addr: u64,
        /// Generation recorded by the referrer.
        expected_generation: u64,
        /// The decode error.
        #[source]
        source: FormatError,
    },
    /// A node passed its header checks but its content is inconsistent
    /// (item layout, key order, level, owner, tree shape, allocator).
    #[error("b+tree: corrupt node at {addr} (generation {generation}): {reason}")]
    Corrupt {
        /// Byte address of the node (or of the bitmap run).
        addr: u64,
        /// Generation of the node as recorded by its referrer, 0 if unknown.
        generation: u64,
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// A value is longer than [`crate::btree::VALUE_BYTES_MAX`].
    #[error("b+tree: value of {len_bytes} bytes for key {key} exceeds the maximum of {max_bytes}")]
    ValueTooLarge {
        /// Key of the value.
        key: Key,
        /// Its length.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// `insert` of a key that is present.
    #[error("b+tree: key {key} already exists")]
    KeyExists {
        /// The key.
        key: Key,
    },
    /// `update` or `delete` of a key that is absent.
    #[error("b+tree: key {key} not found")]
    NotFound {
        /// The key.
        key: Key,
    },
    /// `apply_sorted` input is not strictly ascending.
    #[error("b+tree: changes not strictly ascending at index {index}: {key} after {prev}")]
    Unsorted {
        /// Index of the offending change.
        index: usize,
        /// Its key.
        key: Key,
        /// Key of the change before it.
        prev: Key,
    },
    /// The node region has no free node left.
    #[error(
        "b+tree: node region {region_start}+{region_bytes} is full: need {nodes_needed} more \
         free node(s)"
    )]
    NoSpace {
        /// Byte address of the node region.
        region_start: u64,
        /// Its length.
        region_bytes: u64,
        /// Contiguous nodes that were requested.
        nodes_needed: u64,
    },
    /// `commit` with a generation not above the last committed one.
    #[error(
        "b+tree: commit generation {generation} is not above the last committed generation {last}"
    )]
    GenerationNotIncreasing {
        /// Requested generation.
        generation: u64,
        /// Last committed generation.
        last: u64,
    },
    /// The tree would need more levels than the node format allows.
    #[error("b+tree: tree would grow to level {level}, above the maximum {max}")]
    TooDeep {
        /// Level that was needed.
        level: u8,
        /// The maximum.
        max: u8,
    },
    /// A configuration or location value is out of range.
    #[error("b+tree: invalid {field}: {reason}")]
    Config {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An earlier mutation failed half-way; the uncommitted changes are in
    /// an unknown state. Call [`crate::btree::BTree::abort`] to return to the
    /// last commit.
    #[error("b+tree: uncommitted changes are unusable after an earlier failure ({reason}); abort to the last commit")]
    Poisoned {
        /// The first failure.
        reason: String,
    },
    /// A commit failed (its writes or flush, usually): nothing more is
    /// accepted by this handle; reopen from the newest valid superblock.
    #[error("b+tree: failed during commit of generation {generation}; reopen from the superblock: {source}")]
    Failed {
        /// Generation being committed.
        generation: u64,
        /// The first failure.
        #[source]
        source: Box<BTreeError>,
    },
}

impl BTreeError {
    pub(crate) fn storage(context: impl Into<String>, source: StorageError) -> Self {
        BTreeError::Storage {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(addr: u64, generation: u64, reason: impl Into<String>) -> Self {
        BTreeError::Corrupt {
            addr,
            generation,
            reason: reason.into(),
        }
    }

    /// The device offset this error is about (the failed I/O, or the
    /// node), if any: for messages that name where a device failed.
    pub fn offset(&self) -> Option<u64> {
        match self {
            BTreeError::Storage { source, .. } => source.offset(),
            BTreeError::Node { addr, .. } | BTreeError::Corrupt { addr, .. } => Some(*addr),
            BTreeError::Failed { source, .. } => source.offset(),
            _ => None,
        }
    }
}
