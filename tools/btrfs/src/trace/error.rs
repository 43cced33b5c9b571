//! [`TraceError`]: why a trace was refused, with the line and its text.

use std::io;

use refd_core::model::OpError;

#[cfg(doc)]
use super::{TraceStats, HOLDBACK_SLOTS_MAX};

/// Why a trace was refused.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading failed (for `.zst`: a truncated or corrupt stream).
    #[error("line {line} (byte {offset}): read error: {source}")]
    Io {
        /// Line being read.
        line: u64,
        /// Byte offset of that line in the decompressed stream.
        offset: u64,
        /// The I/O or decoder error.
        #[source]
        source: io::Error,
    },
    /// A line of a known event that does not parse.
    #[error("line {line}: {reason}: {text:?}")]
    Malformed {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// The fields do not make a valid op.
    #[error("line {line}: {source}: {text:?}")]
    InvalidOp {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// Validation error.
        #[source]
        source: OpError,
    },
    /// A ref event with no pending head of its task.
    #[error("line {line}: ref event of pid {pid} has no pending add_delayed_ref_head: {text:?}")]
    OrphanRef {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// Task.
        pid: u32,
    },
    /// A ref event that does not match its task's pending head.
    #[error("line {line}: ref event does not match the head of pid {pid} at line {head_line} ({reason}): {text:?}")]
    PairMismatch {
        /// Line of the ref event.
        line: u64,
        /// Line text.
        text: String,
        /// Task.
        pid: u32,
        /// Line of the head event.
        head_line: u64,
        /// Which field differs.
        reason: String,
    },
    /// A head event of a task whose previous head still waits for its ref.
    #[error("line {line}: pid {pid} queued a new head before the ref event of its head at line {head_line}: {text:?}")]
    HeadBeforeRef {
        /// Line of the new head.
        line: u64,
        /// Line text.
        text: String,
        /// Task.
        pid: u32,
        /// Line of the waiting head.
        head_line: u64,
    },
    /// A head whose ref event never arrived.
    #[error("line {head_line}: head of pid {pid} on extent {bytenr} never got its ref event (end of input at line {eof_line})")]
    HeadWithoutRef {
        /// Line of the head.
        head_line: u64,
        /// Task.
        pid: u32,
        /// Extent.
        bytenr: u64,
        /// Last line of the input.
        eof_line: u64,
    },
    /// The holdback queue is full behind a head that waits for its ref.
    #[error("line {line}: {bound} slots held back behind the head at line {head_line} (pid {pid}, extent {bytenr}) whose ref event has not arrived")]
    HoldbackFull {
        /// Line being processed.
        line: u64,
        /// The bound ([`HOLDBACK_SLOTS_MAX`]).
        bound: usize,
        /// Line of the stuck head.
        head_line: u64,
        /// Its task.
        pid: u32,
        /// Its extent.
        bytenr: u64,
    },
    /// ftrace lost events: the op stream is incomplete.
    #[error("line {line}: the trace lost events: {text:?}")]
    LostEvents {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
    },
    /// An event of another filesystem.
    #[error("line {line}: fsid {fsid} differs from {expected} of the first event: {text:?}")]
    OtherFsid {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// fsid of this line (escaped as [`TraceStats::fsid`]).
        fsid: String,
        /// fsid of the first event (escaped as [`TraceStats::fsid`]).
        expected: String,
    },
}
