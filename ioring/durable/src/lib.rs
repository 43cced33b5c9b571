//! refd's durable engine, first slice: acknowledged ops survive any crash.
//!
//! - [`codec`]: the bytes: op records in the log, extent items as B+tree
//!   items (btrfs-like keys and inline/keyed backrefs).
//! - [`engine`]: [`DurableEngine`]: format, open (recovery), ingest with
//!   tickets, commit (checkpoint) in the order of `docs/log.md` and
//!   `docs/btree.md`; a failure latches; the extent cache over the
//!   B+tree.
//! - [`policy`]: when to commit (interval, pending ops, log space) and
//!   back-pressure; the committer loop.
//!
//! `docs/durable.md` describes the ordering, recovery and what v1 does not
//! do yet. Vocabulary follows btrfs (head, extent item, inline/keyed
//! backref) and the ioring docs (cut, seal, trim, generation).

pub mod codec;
pub mod engine;
pub mod policy;
pub mod progress;

pub use codec::CodecError;
pub use engine::{
    load_extents, read_held, read_newest_superblock, scan_extents, CommitPhases, CommitSummary,
    CommitTotals, DurableEngine, DurableError, FormatOptions, OpenOptions, RecoveryInfo, Ticket,
};
pub use policy::{CommitPolicy, CommitterStats};
