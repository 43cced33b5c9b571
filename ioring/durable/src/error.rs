//! Errors of the durable engine, one enum per operation (format, open,
//! add, commit, read, verify), each with the fields a caller can act on:
//! which device, which offset, which extent, which step. A broken
//! invariant is asserted, not returned; corruption read from the device is
//! an error.
//!
//! [`Failure`] is what the engine latches when a write or flush fails (or a
//! commit cannot finish): every later add and commit returns it, and the
//! daemon sends it to its clients as `FAILED`.

use std::fmt;
use std::sync::Arc;

use refd_core::engine::{EngineError, RequeueError};
use refd_core::model::OpError;
use refd_ioring::btree::{BTreeError, Key};
use refd_ioring::format::FormatError;
use refd_ioring::log::LogError;
use refd_ioring::{IoFailure, StorageError};

use crate::codec::CodecError;

/// The first failure of a durable engine: after it nothing more is
/// acknowledged until the device is opened again (recovery replays the
/// log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {operation} failed{}: {cause}", at(*.offset))]
pub struct Failure {
    /// The device.
    pub device: String,
    /// What was being done (e.g. "commit 12: write nodes", "log append").
    pub operation: String,
    /// The device offset of the failed I/O, when one is known.
    pub offset: Option<u64>,
    /// The error, as text (the first failure is shared by every caller).
    pub cause: Arc<str>,
}

fn at(offset: Option<u64>) -> String {
    offset.map_or_else(String::new, |o| format!(" at offset {o}"))
}

impl Failure {
    /// A failure of `operation` on `device` caused by `cause`, at `offset`.
    pub fn new(
        device: &str,
        operation: impl Into<String>,
        offset: Option<u64>,
        cause: &dyn fmt::Display,
    ) -> Self {
        Failure {
            device: device.to_string(),
            operation: operation.into(),
            offset,
            cause: cause.to_string().into(),
        }
    }

    /// The storage's own latch.
    pub(crate) fn of_io(f: &IoFailure) -> Self {
        Failure::new(&f.device, f.op.to_string(), Some(f.offset), &f.cause)
    }

    pub(crate) fn of_log(device: &str, operation: impl Into<String>, e: &LogError) -> Self {
        Failure::new(device, operation, e.offset(), e)
    }
}

/// Errors of [`crate::DurableEngine::format`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatDeviceError {
    /// The device cannot hold the requested layout.
    #[error("layout of {device}: {reason}")]
    Layout {
        /// Device.
        device: String,
        /// Why.
        reason: String,
    },
    /// No random file system id could be generated.
    #[error("{device}: generate a file system id: {source}")]
    FsId {
        /// Device.
        device: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The new superblock is not valid for this device.
    #[error("{device}: new superblock: {source}")]
    Superblock {
        /// Device.
        device: String,
        /// Cause.
        source: FormatError,
    },
    /// Writing a superblock copy failed.
    #[error("{device}: write superblock at {addr}: {source}")]
    Write {
        /// Device.
        device: String,
        /// Address of the copy.
        addr: u64,
        /// Cause.
        source: StorageError,
    },
}

/// Errors reading committed state from the B+tree (lookups, scans, the
/// held heads): the device returned an error or bytes that do not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The B+tree could not be read.
    #[error("{device}: read {what}: {source}")]
    Tree {
        /// Device.
        device: String,
        /// What was read.
        what: &'static str,
        /// Cause (names the node and offset).
        source: Box<BTreeError>,
    },
    /// Extent items that do not decode or break an item invariant.
    #[error("{device}: extent items at {}: {source}", key_text(*.key))]
    Items {
        /// Device.
        device: String,
        /// The item being decoded (`None`: the end of the last extent).
        key: Option<Key>,
        /// Cause.
        source: CodecError,
    },
    /// A chunk of the held-heads stream is missing, out of order or of
    /// the wrong length.
    #[error(
        "{device}: held heads chunk {chunk} of {len_bytes} bytes where chunk {expected} is due \
         after {expected} full chunks"
    )]
    HeldChunk {
        /// Device.
        device: String,
        /// Chunk number found.
        chunk: u64,
        /// Chunk number due.
        expected: u64,
        /// Its length.
        len_bytes: usize,
    },
    /// The held-heads stream does not decode.
    #[error("{device}: held heads ({chunks} chunks): {source}")]
    Held {
        /// Device.
        device: String,
        /// Chunks read.
        chunks: usize,
        /// Cause.
        source: CodecError,
    },
}

fn key_text(key: Option<Key>) -> String {
    key.map_or_else(|| "the end of the last extent".into(), |k| k.to_string())
}

impl ReadError {
    /// The device offset this error is about, if any.
    pub fn offset(&self) -> Option<u64> {
        match self {
            ReadError::Tree { source, .. } => source.offset(),
            _ => None,
        }
    }
}

/// Errors of [`crate::DurableEngine::open`] (mount and recovery). Nothing
/// is written before the log's open flush, so a failed open can be retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Neither superblock copy is valid: not a refd device, or both damaged
    /// (a slot that cannot be read counts as damaged).
    #[error("{device}: no valid superblock: {source}")]
    NoSuperblock {
        /// Device.
        device: String,
        /// Why the copies were rejected.
        source: FormatError,
    },
    /// The B+tree of the superblock could not be opened.
    #[error("{device}: open B+tree of superblock generation {generation}: {source}")]
    Tree {
        /// Device.
        device: String,
        /// Superblock generation.
        generation: u64,
        /// Cause.
        source: Box<BTreeError>,
    },
    /// Committed state could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The log could not be replayed (damaged before its durable tail, or
    /// unreadable).
    #[error("{device}: replay the log of generation {generation}: {source}")]
    Replay {
        /// Device.
        device: String,
        /// Superblock generation.
        generation: u64,
        /// Cause.
        source: LogError,
    },
    /// The log is damaged in the middle ([`LogError::Damaged`]): an intact
    /// batch follows an unreadable one, so acknowledged ops were lost on
    /// the device. Open refuses in [`refd_ioring::log::RecoveryMode::Strict`];
    /// an operator may go on with another mode.
    #[error(
        "{device}: the log of superblock generation {generation} is damaged: {source}; going on \
         would lose {ops_after} acknowledged ops of the intact batches after the damage (with \
         tolerate-tail) besides those of the damaged batches: check with `refctl fsck`, then \
         choose a recovery mode (`refd serve --recovery-mode tolerate-tail|skip-corrupt` or \
         `refctl recover`)"
    )]
    LogDamaged {
        /// Device.
        device: String,
        /// Superblock generation.
        generation: u64,
        /// Ops in the intact batches after the damage.
        ops_after: u64,
        /// The log's error (damaged LSNs, offset, cause).
        source: Box<LogError>,
    },
    /// The log holds batches written after a superblock newer than the
    /// one open found was durable (their `txn_id` is its generation): the
    /// newest superblock copy is lost (rotten or unreadable) and the copy
    /// found is older. Replaying from it is refused in
    /// [`refd_ioring::log::RecoveryMode::Strict`]: what the newer commit
    /// held may be gone (its released log space or nodes reused).
    #[error(
        "{device}: superblock generation {generation} is not the newest: log batch {lsn} was          written after superblock generation {newer_generation} was durable, and no copy of it          is readable (the newest superblock copy rotted): check with `refctl fsck`, then go on          from the older copy only by choosing a recovery mode (`refd serve --recovery-mode          tolerate-tail|skip-corrupt` or `refctl recover`)"
    )]
    SuperblockLost {
        /// Device.
        device: String,
        /// Generation of the superblock found.
        generation: u64,
        /// The newest generation the log names.
        newer_generation: u64,
        /// The first batch that names it.
        lsn: u64,
    },
    /// A replayed log record does not decode.
    #[error("{device}: log record in the batch of LSN {lsn}: {source}")]
    Record {
        /// Device.
        device: String,
        /// LSN of its batch.
        lsn: u64,
        /// Cause.
        source: CodecError,
    },
    /// The core engine refused a head the last commit held (its decoder
    /// checks the same rule, so this means a decoder bug, not damage).
    #[error("{device}: a head held by the commit of generation {generation} refused: {source}")]
    HeldRefused {
        /// Device.
        device: String,
        /// Superblock generation.
        generation: u64,
        /// Cause.
        source: RequeueError,
    },
    /// The core engine refused a replayed op.
    #[error("{device}: replayed op of LSN {lsn} refused: {source}")]
    Refused {
        /// Device.
        device: String,
        /// LSN of its batch.
        lsn: u64,
        /// Cause.
        source: EngineError,
    },
    /// The log could not be opened for appending.
    #[error("{device}: open the log: {source}")]
    Log {
        /// Device.
        device: String,
        /// Cause.
        source: LogError,
    },
    /// The log region is too small for the configured batch size: fewer
    /// than [`crate::engine::APPENDERS_MIN`] appends could be in flight. Says
    /// what log, and what device formatted with the default layout, would
    /// do.
    #[error(
        "{device}: its log region of {log_bytes} bytes is too small for log batches of up to \
         {batch_bytes_max} bytes: it needs at least {log_bytes_min} bytes (room for {} \
         appends in flight). The device is {device_bytes} bytes; a device formatted with \
         the default layout (refd serve creating a file, or refctl format without \
         --log-bytes) has a large enough log from {device_bytes_min} bytes ({} MiB) on: use a \
         device at least that large, or one formatted with `refctl format --log-bytes \
         {log_bytes_min}`",
        crate::engine::APPENDERS_MIN,
        device_bytes_min.div_ceil(1 << 20)
    )]
    LogTooSmall {
        /// Device.
        device: String,
        /// Its log region.
        log_bytes: u64,
        /// The batch size configured (capped by the format's largest).
        batch_bytes_max: u64,
        /// The smallest log region that admits enough appends.
        log_bytes_min: u64,
        /// The device's size.
        device_bytes: u64,
        /// The smallest device whose default layout has such a log.
        device_bytes_min: u64,
    },
    /// The log's configuration does not suit its region.
    #[error("{device}: {reason}")]
    Layout {
        /// Device.
        device: String,
        /// Why.
        reason: String,
    },
    /// The superblock claiming the next generation could not be written.
    #[error("{device}: write superblock generation {generation} at {addr}: {source}")]
    WriteSuperblock {
        /// Device.
        device: String,
        /// Generation claimed.
        generation: u64,
        /// Slot address.
        addr: u64,
        /// Cause.
        source: StorageError,
    },
}

/// Errors of [`crate::DurableEngine::add`] and its batch forms.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddError {
    /// The op is malformed (nothing was logged).
    #[error("op refused: {0}")]
    Op(#[from] OpError),
    /// The core engine refused the op: ref-verify, or no ingest shard
    /// (nothing was logged).
    #[error("op refused by the engine: {0}")]
    Refused(#[from] EngineError),
    /// Op `index` of a batch is refused (nothing of the batch was logged).
    #[error("op {index} of the batch refused: {source}")]
    InBatch {
        /// The op's index in the batch.
        index: usize,
        /// Why.
        source: Box<AddError>,
    },
    /// The node region could not be sure to hold the commit of the op
    /// (`crate::space`): nothing was logged, the engine goes on.
    #[error("op refused: {0}")]
    NoSpace(crate::space::NoSpace),
    /// The engine failed (now or earlier): nothing more is acknowledged.
    /// An op that was already queued when the failure happened is one more
    /// unacknowledged op, present after recovery at most once.
    #[error("durable engine failed, acknowledging nothing more: {0}")]
    Failed(Failure),
}

/// A step of a commit, for [`CommitError::Step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitStep {
    /// Reading the committed items of the frozen heads from the B+tree.
    ReadItems,
    /// Waiting for the log below the cut to be durable.
    WaitLog,
    /// Encoding the extents' item changes.
    EncodeItems,
    /// Applying item changes to the working B+tree.
    ApplyItems,
    /// Writing the B+tree's nodes and flushing them.
    WriteNodes,
    /// Computing the log bounds for the superblock.
    LogBounds,
    /// Writing the superblock (the commit point).
    WriteSuperblock,
    /// Releasing the nodes the commit dropped.
    ReleaseNodes,
    /// Trimming the log.
    TrimLog,
}

impl fmt::Display for CommitStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommitStep::ReadItems => "read committed items",
            CommitStep::WaitLog => "wait for the log",
            CommitStep::EncodeItems => "encode item changes",
            CommitStep::ApplyItems => "apply item changes",
            CommitStep::WriteNodes => "write nodes",
            CommitStep::LogBounds => "log bounds",
            CommitStep::WriteSuperblock => "write superblock",
            CommitStep::ReleaseNodes => "release dropped nodes",
            CommitStep::TrimLog => "trim the log",
        })
    }
}

/// Errors of [`crate::DurableEngine::commit`]. Every commit failure latches
/// the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The engine failed earlier: nothing more is acknowledged.
    #[error("durable engine failed earlier, acknowledging nothing more: {0}")]
    Failed(Failure),
    /// This commit failed at `step`; the engine is now latched with it.
    #[error("commit {generation}: {step}: {failure}")]
    Step {
        /// Generation being committed.
        generation: u64,
        /// The step.
        step: CommitStep,
        /// The failure latched.
        failure: Failure,
    },
}

impl CommitError {
    /// The failure the engine latched.
    pub fn failure(&self) -> &Failure {
        match self {
            CommitError::Failed(f) | CommitError::Step { failure: f, .. } => f,
        }
    }
}

impl From<CommitError> for AddError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Failed(f) | CommitError::Step { failure: f, .. } => AddError::Failed(f),
        }
    }
}

/// Errors of [`crate::DurableEngine::verify`]: on-disk and in-memory state
/// disagree, or the device does not read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The B+tree's own check failed.
    #[error("{device}: B+tree check: {source}")]
    Check {
        /// Device.
        device: String,
        /// Cause.
        source: Box<BTreeError>,
    },
    /// Committed state could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The held heads on disk are not the engine's.
    #[error(
        "the B+tree keeps {on_disk} held heads in {chunks} chunks; the engine's last commit held \
         {in_memory} in {in_memory_chunks} chunks"
    )]
    Held {
        /// Heads on disk.
        on_disk: usize,
        /// Their chunks.
        chunks: usize,
        /// Heads the engine holds.
        in_memory: u64,
        /// Chunks the engine's last commit wrote.
        in_memory_chunks: usize,
    },
    /// The extent count kept by the commits is not the tree's.
    #[error(
        "the B+tree has {counted} extent items; the engine counts {in_memory}, the tree records \
         {recorded:?}"
    )]
    ExtentCount {
        /// Extent items found by a scan.
        counted: u64,
        /// The engine's count.
        in_memory: u64,
        /// The count the tree records (`None`: not yet recorded).
        recorded: Option<u64>,
    },
    /// An extent starts inside the previous extent's range (a tree refd
    /// commits never has this: an overlapping allocation is refused).
    #[error("extent {bytenr}: starts inside the extent at {prev} ({prev_bytes} bytes)")]
    Overlap {
        /// Extent.
        bytenr: u64,
        /// The extent before it.
        prev: u64,
        /// Its size.
        prev_bytes: u64,
    },
    /// A cached extent differs from the B+tree's.
    #[error("extent {bytenr}: the cached item differs from the B+tree's")]
    CacheDiffers {
        /// Extent.
        bytenr: u64,
    },
    /// Cached extents are missing from the B+tree.
    #[error("{count} cached extents are not in the B+tree, the first at {first:?}")]
    CacheMissing {
        /// How many.
        count: usize,
        /// The first found.
        first: Option<u64>,
    },
}

/// Errors of [`crate::DurableEngine::submit`]: a session's batch, applied
/// all or nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The session or request number refuses it (nothing applied).
    #[error(transparent)]
    Session(#[from] crate::service::SessionError),
    /// Op `index` is malformed or refused by the engine (ref-verify);
    /// nothing of the batch was applied or logged.
    #[error("op {index} of the batch refused: {source}")]
    Refused {
        /// The op's index in the batch.
        index: usize,
        /// Why.
        source: EngineError,
    },
    /// The batch's log record does not fit one log batch.
    #[error("a batch of {ops} ops needs a {bytes}-byte log record; the log holds at most {max}")]
    TooLarge {
        /// Ops in the batch.
        ops: usize,
        /// Its record.
        bytes: usize,
        /// Largest record.
        max: usize,
    },
    /// The node region could not be sure to hold the commit of the batch
    /// (`crate::space`): nothing of it was logged, the engine goes on.
    #[error("batch refused: {0}")]
    NoSpace(crate::space::NoSpace),
    /// The engine failed (now or earlier): nothing more is acknowledged.
    #[error("durable engine failed, acknowledging nothing more: {0}")]
    Failed(Failure),
}

impl From<AddError> for SubmitError {
    fn from(e: AddError) -> Self {
        match e {
            AddError::Failed(f) => SubmitError::Failed(f),
            AddError::NoSpace(n) => SubmitError::NoSpace(n),
            AddError::Refused(source) => SubmitError::Refused { index: 0, source },
            AddError::Op(op) => SubmitError::Refused {
                index: 0,
                source: EngineError::Store(op.into()),
            },
            AddError::InBatch { index, source } => match SubmitError::from(*source) {
                SubmitError::Refused { source, .. } => SubmitError::Refused { index, source },
                other => other,
            },
        }
    }
}

/// Errors of the freed-list consumer and session requests
/// ([`crate::DurableEngine::register_session`],
/// [`crate::DurableEngine::subscribe_freed`],
/// [`crate::DurableEngine::ack_freed`],
/// [`crate::DurableEngine::unsubscribe_freed`],
/// [`crate::DurableEngine::read_freed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// No consumer has this id (never subscribed, or unsubscribed).
    #[error("freed-list consumer {consumer} is not subscribed (never was, or was unsubscribed)")]
    ConsumerUnknown {
        /// Consumer id.
        consumer: u64,
    },
    /// [`crate::service::CONSUMERS_MAX`] consumers are subscribed.
    #[error(
        "{max} freed-list consumers are subscribed already; unsubscribe one that is no longer \
         used (FREED_UNSUBSCRIBE, `refctl freed --unsubscribe`)"
    )]
    ConsumersFull {
        /// The bound.
        max: usize,
    },
    /// A FREED_ACK of a generation not committed yet.
    #[error("cannot acknowledge generation {generation}: the last committed one is {committed}")]
    AckBeyondCommitted {
        /// Generation given.
        generation: u64,
        /// Last committed.
        committed: u64,
    },
    /// A consumer name must be 1..=64 bytes.
    #[error("consumer name of {len} bytes: must be 1..=64")]
    BadName {
        /// Its length.
        len: usize,
    },
    /// The cursor is at or below a generation whose freed list was dropped
    /// (retention bound): extents were missed.
    #[error(
        "freed lists up to generation {dropped_upto} were dropped; the oldest kept is {oldest:?}"
    )]
    FreedExpired {
        /// Newest dropped generation.
        dropped_upto: u64,
        /// Oldest kept.
        oldest: Option<u64>,
    },
    /// Freed lists could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The engine failed (now or earlier): nothing more is acknowledged.
    #[error("durable engine failed, acknowledging nothing more: {0}")]
    Failed(Failure),
}
