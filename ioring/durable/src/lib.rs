//! refd's durable engine: acknowledged ops survive any crash.
//!
//! An op's path, by file:
//! - [`engine`] (`engine/ingest.rs`): validated, queued in the core
//!   engine and appended to the ref log; acknowledged through its
//!   [`Ticket`] once the log record is durable;
//! - [`codec`]: the bytes: op records in the log, extent items and held
//!   heads as B+tree items;
//! - [`policy`]: when to commit (interval, pending ops, log space) and
//!   when ingest must wait, as pure decisions; [`committer`]: the loop
//!   that acts on them over an injected clock;
//! - [`engine`] (`engine/commit.rs`): the commit (checkpoint) in the order
//!   of `docs/log.md` and `docs/btree.md`; `engine/open.rs`: format,
//!   mount and recovery; `engine/read.rs`: lookups of committed state;
//!   `engine/verify.rs`: fsck of a live engine;
//! - [`service`] (and `engine/service.rs`): the daemon's state beside the
//!   extent tree: client sessions (exactly-once SUBMIT batches) and the
//!   freed lists with their consumers;
//! - [`error`]: one error enum per operation; [`stats`]: what open and
//!   commits report;
//! - [`selftest`]: the round-trip contract of the decoders above, shared
//!   by the property test `tests/fuzz_decoders.rs` and the cargo-fuzz
//!   targets in `fuzz/` (`docs/fuzzing.md`).
//!
//! `docs/durable.md` describes the ordering and recovery. Vocabulary
//! follows btrfs (head, extent item, inline/keyed backref) and the ioring
//! docs (cut, seal, trim, generation).

pub mod codec;
pub mod committer;
pub mod engine;
pub mod error;
pub mod policy;
pub mod progress;
pub mod selftest;
pub mod service;
pub mod space;
pub mod stats;

// The crate by its own name, for the unit tests: they include the
// integration tests' helpers (`tests/common`), written against the
// public API as `refd_durable::...`, instead of keeping a copy.
#[cfg(test)]
extern crate self as refd_durable;

pub use codec::CodecError;
pub use committer::{Clock, Committer, CommitterStats, ManualClock, SystemClock};
pub use engine::open::{
    default_log_bytes, device_bytes_min_for_log, format_layout, newer_superblock, ops_in,
    read_newest_superblock,
};
pub use engine::{
    count_extents, load_extents, read_extent_count, read_held, read_service, scan_extents,
    DurableEngine, FormatOptions, FreedPage, OpenOptions, ServiceStats, Submitted, Ticket,
};
pub use error::{
    AddError, CommitError, CommitStep, Failure, FormatDeviceError, OpenError, ReadError,
    ServiceError, SubmitError, VerifyError,
};
pub use policy::{CommitPolicy, PolicyInput, Reason, DIRTY_BYTES_TRIGGER_DEFAULT};
pub use service::{Admission, Consumer, ServiceOptions, SessionError};
pub use space::{NoSpace, NodeSpace};
pub use stats::{CommitPhases, CommitSummary, CommitTotals, RecoveryInfo};
