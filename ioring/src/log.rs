//! The durable ref log: group commit of opaque records into the circular log
//! region, space management, failure latch and recovery.
//!
//! This layer knows nothing about delayed refs: a record is an opaque byte
//! string (the engine encodes its ops into records elsewhere). What it
//! guarantees is in `docs/log.md`; the bytes are in `docs/format.md`
//! ("Log"). In short:
//!
//! - [`RefLog::append`] assigns a record to the open batch and returns a
//!   [`Ticket`] naming the batch's [`Lsn`] without waiting for I/O;
//!   [`Ticket::wait`] / [`RefLog::append_durable`] / [`RefLog::sync`] return
//!   once the record is durable.
//! - **Group commit, leader based.** There is no log thread. A caller that
//!   needs a batch durable and finds no write in progress becomes the
//!   *leader*: it seals the open batch (every record queued so far),
//!   encodes it as one batch, writes it durably, publishes the new durable
//!   LSN and wakes everyone; callers that arrive while a write is in
//!   progress queue their records into the next batch and wait. One write
//!   and one durability point are thus shared by every record queued during
//!   the previous write. See `docs/log.md` for why a leader rather than a
//!   flusher thread.
//! - **At most one batch in flight**, and batch `n + 1` is written only after
//!   batch `n` is durable. Therefore after a crash the media holds a chain of
//!   durable batches followed by at most one damaged batch, and replay can
//!   stop at the first batch that does not decode without losing anything
//!   that was acknowledged.
//! - **Bounds**: batch size ([`LogConfig::batch_bytes_max`]), records and
//!   bytes queued but not yet durable ([`LogConfig::queued_records_max`],
//!   [`LogConfig::queued_bytes_max`]). At a bound, `append` blocks (and
//!   writes the oldest batch itself if no write is in progress) instead of
//!   failing or growing.
//! - **Space**: a record is assigned only where its batch overwrites
//!   nothing from the head on (at most `log_bytes` past the head); when the
//!   ring is full, `append` blocks until [`RefLog::trim`] frees space (and
//!   meanwhile writes pending batches if nobody is, so they can be
//!   checkpointed). Only a record that can never fit is an error
//!   ([`LogError::RecordTooLarge`]).
//! - **Failure latch**: the first write or flush error latches the log;
//!   every waiting and later caller gets [`LogError::Failed`] and nothing
//!   written later is acknowledged.
//! - **Checkpoint cut**: [`RefLog::seal`] returns the LSN separating the
//!   records appended before it from those after; a checkpoint covering
//!   the batches below it writes [`RefLog::bounds`] into the superblock
//!   *durably before* calling [`RefLog::trim`].
//! - **Recovery**: [`replay`] reads from the superblock's head, returns every
//!   record of every valid batch of the chain in LSN order, and stops at the
//!   first batch that does not decode, with a [`RecoveryReport`] saying
//!   where and why, unless an intact later batch proves the damaged one
//!   durable: that is corruption, [`LogError::Damaged`] in the default
//!   [`RecoveryMode::Strict`] ([`replay_with`] takes the mode). A stop at
//!   or before the superblock's durable tail is [`LogError::Corrupt`].
//!
//! Map: `ring.rs` (wrap arithmetic shared by writer and replay),
//! `writer.rs` ([`RefLog`], [`Ticket`], group commit), `replay.rs`
//! ([`replay`], [`Replay`], [`RecoveryReport`]).

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::format::{Superblock, LOG_BATCH_BYTES_MAX};
use crate::storage::{IoOp, StorageError};

mod replay;
mod ring;
#[cfg(test)]
mod tests;
mod writer;

pub use replay::{
    replay, replay_with, DamagedRange, RecordStream, RecoveryMode, RecoveryReport, Replay,
    ReplayedBatch, ReplayedRecord, StopCause, TruncatedBatch, DAMAGED_RANGES_MAX,
    REPLAY_READ_BYTES,
};
pub use writer::{RefLog, Ticket};

/// Default [`LogConfig::batch_bytes_max`]: 1 MiB.
pub const LOG_BATCH_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default [`LogConfig::queued_records_max`].
pub const LOG_QUEUED_RECORDS_MAX_DEFAULT: usize = 1 << 18;
/// Default [`LogConfig::queued_bytes_max`]: 32 MiB.
pub const LOG_QUEUED_BYTES_MAX_DEFAULT: usize = 32 << 20;

/// Log sequence number: the number of a batch. The first batch of a fresh
/// log has LSN 1; every batch has the LSN of the previous one plus one.
/// Every record of a batch carries the batch's LSN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The numeric value (as stored in the superblock and batch headers).
    pub fn get(self) -> u64 {
        self.0
    }

    /// The next LSN.
    pub fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
    }

    /// The previous LSN (0 stays 0).
    pub fn prev(self) -> Lsn {
        Lsn(self.0.saturating_sub(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lsn {}", self.0)
    }
}

/// A batch boundary in the log: the batch `lsn` starts at logical offset
/// `offset`, or at the next lap start if it did not fit before the physical
/// end of the region (the wrap rule of `docs/format.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogPosition {
    /// LSN of the batch at this position.
    pub lsn: Lsn,
    /// Logical log offset (multiple of 4096).
    pub offset: u64,
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at log offset {}", self.lsn, self.offset)
    }
}

/// The four log fields of a superblock: what a checkpoint records about the
/// log. Obtained from [`RefLog::bounds`]; written with
/// [`LogBounds::apply_to`]; read back with [`LogBounds::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// `log_head_offset`: where replay starts.
    pub head_offset: u64,
    /// `log_head_lsn`: the first LSN replay returns.
    pub head_lsn: Lsn,
    /// `log_tail_offset`: just past the last durable batch.
    pub tail_offset: u64,
    /// `log_tail_lsn`: the last durable batch (`head_lsn - 1` if none).
    pub tail_lsn: Lsn,
    /// `log_head_chain`: the `prev_checksum` the batch at the head carries.
    pub head_chain: u32,
}

impl LogBounds {
    /// The bounds of a freshly formatted, empty log: head at offset 0 with
    /// LSN 1, tail LSN 0, chain seed 0 (format writes a random seed).
    pub fn empty() -> Self {
        Self {
            head_offset: 0,
            head_lsn: Lsn(1),
            tail_offset: 0,
            tail_lsn: Lsn(0),
            head_chain: 0,
        }
    }

    /// The log fields of `sb`.
    pub fn of(sb: &Superblock) -> Self {
        Self {
            head_offset: sb.log_head_offset,
            head_lsn: Lsn(sb.log_head_lsn),
            tail_offset: sb.log_tail_offset,
            tail_lsn: Lsn(sb.log_tail_lsn),
            head_chain: sb.log_head_chain,
        }
    }

    /// Writes these bounds into the log fields of `sb`.
    pub fn apply_to(&self, sb: &mut Superblock) {
        sb.log_head_offset = self.head_offset;
        sb.log_head_lsn = self.head_lsn.0;
        sb.log_tail_offset = self.tail_offset;
        sb.log_tail_lsn = self.tail_lsn.0;
        sb.log_head_chain = self.head_chain;
    }
}

/// How the leader makes a batch durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// One [`crate::Storage::write_durable`] per batch (`RWF_DSYNC` / FUA):
    /// a single round trip. The default.
    #[default]
    WriteDurable,
    /// [`crate::Storage::write`] then [`crate::Storage::flush`]: for devices
    /// where FUA is slow or missing. Same guarantees, two round trips.
    WriteThenFlush,
}

/// Tunables of a [`RefLog`]. Every queue and batch is bounded by one of
/// these; at a bound callers block (back-pressure), they never fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Largest batch on disk in bytes: a multiple of 4096 in
    /// `4096..=LOG_BATCH_BYTES_MAX`. The effective limit is also capped at
    /// half the log region ([`RefLog::batch_bytes_cap`]), which bounds the
    /// largest record ([`RefLog::record_bytes_max`]).
    pub batch_bytes_max: usize,
    /// Most records appended but not yet durable, at least 1.
    pub queued_records_max: usize,
    /// Most framed record bytes appended but not yet durable, at least 1. A
    /// record larger than this is still accepted when nothing is queued, so
    /// every record that fits in a batch can make progress.
    pub queued_bytes_max: usize,
    /// How a batch is made durable.
    pub durability: Durability,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            batch_bytes_max: LOG_BATCH_BYTES_MAX_DEFAULT,
            queued_records_max: LOG_QUEUED_RECORDS_MAX_DEFAULT,
            queued_bytes_max: LOG_QUEUED_BYTES_MAX_DEFAULT,
            durability: Durability::WriteDurable,
        }
    }
}

impl LogConfig {
    /// Checks the bounds documented on each field.
    pub fn check(&self) -> Result<(), LogError> {
        let b = self.batch_bytes_max;
        if b < 4096 || !b.is_multiple_of(4096) || b > LOG_BATCH_BYTES_MAX {
            return Err(LogError::Config {
                field: "batch_bytes_max",
                value: b as u64,
                expected: "a multiple of 4096 in 4096..=16 MiB",
            });
        }
        if self.queued_records_max == 0 {
            return Err(LogError::Config {
                field: "queued_records_max",
                value: 0,
                expected: "at least 1",
            });
        }
        if self.queued_bytes_max == 0 {
            return Err(LogError::Config {
                field: "queued_bytes_max",
                value: 0,
                expected: "at least 1",
            });
        }
        Ok(())
    }
}

/// Buckets of [`WriteLatency`]: bucket 0 holds writes under 1 µs, bucket
/// `i` those of `2^(i-1)..2^i` µs, the last one everything longer
/// (`2^30` µs is about 18 minutes).
pub const WRITE_LATENCY_BUCKETS: usize = 32;

/// How long the log's batch writes took (write and flush, what every
/// acknowledgement of the batch waited for), in power-of-two microsecond
/// buckets: fixed size, so the log can keep it for its whole life; a
/// quantile is known within a factor of 2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteLatency {
    /// Writes per bucket (see [`WRITE_LATENCY_BUCKETS`]).
    pub counts: [u64; WRITE_LATENCY_BUCKETS],
    /// Sum of the write times, in microseconds.
    pub sum_us: u64,
    /// Longest write, in microseconds.
    pub max_us: u64,
}

impl WriteLatency {
    /// Counts one write of `took`.
    pub fn record(&mut self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (u64::BITS - us.leading_zeros()) as usize;
        self.counts[bucket.min(WRITE_LATENCY_BUCKETS - 1)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// Writes counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Exclusive upper bound of bucket `i` in microseconds (`u64::MAX`
    /// for the last bucket).
    pub fn bucket_upper_us(i: usize) -> u64 {
        if i + 1 >= WRITE_LATENCY_BUCKETS {
            u64::MAX
        } else {
            1u64 << i
        }
    }

    /// The `q` quantile (`0.0..=1.0`) in microseconds: the upper bound of
    /// the bucket that holds it, never above the longest write; 0 with
    /// no write counted.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        // The rank of the quantile, 1-based: at least the first write.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bucket_upper_us(i).min(self.max_us);
            }
        }
        self.max_us
    }

    /// What was counted after `earlier` (a copy taken before from the
    /// same log); the maximum is this one's, over the log's whole life.
    pub fn since(&self, earlier: &WriteLatency) -> WriteLatency {
        let mut d = *self;
        for (c, e) in d.counts.iter_mut().zip(earlier.counts) {
            *c = c.saturating_sub(e);
        }
        d.sum_us = d.sum_us.saturating_sub(earlier.sum_us);
        d
    }
}

/// Counters of a [`RefLog`] since it was opened, plus its current queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// How long each batch write took (write and flush).
    pub write_latency: WriteLatency,
    /// Batches written and durable.
    pub batches_written: u64,
    /// Records in those batches.
    pub records_written: u64,
    /// Record body bytes in those batches (what callers appended).
    pub record_bytes_written: u64,
    /// On-disk bytes of those batches: header, framed records, padding.
    pub batch_bytes_written: u64,
    /// Bytes left unwritten at the end of a lap by the wrap rule.
    pub skipped_bytes: u64,
    /// Most records in one batch.
    pub records_per_batch_max: u64,
    /// Times an append waited for [`RefLog::trim`] to free ring space.
    pub space_waits: u64,
    /// Times an append blocked on a queue bound.
    pub backpressure_waits: u64,
    /// Records appended and not yet durable, now.
    pub queued_records: u64,
    /// Framed bytes appended and not yet durable, now.
    pub queued_bytes: u64,
}

impl LogStats {
    /// Log bytes consumed per record beyond the record body (framing,
    /// header, padding, lap skips), averaged over everything written.
    pub fn overhead_bytes_per_record(&self) -> f64 {
        if self.records_written == 0 {
            return 0.0;
        }
        let used = self.batch_bytes_written + self.skipped_bytes;
        (used.saturating_sub(self.record_bytes_written)) as f64 / self.records_written as f64
    }
}

/// Errors of the log. `Clone`, because one failure is handed to every
/// waiting caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The log is latched failed: a write or flush of a batch failed (this
    /// or an earlier call). Nothing appended since the last durable LSN is
    /// or will be acknowledged. The fields name the first failure.
    #[error(
        "ref log on {device} is failed: {op} at offset {offset} ({len_bytes} bytes) failed while \
         writing {lsn}: {cause}; nothing after the last durable batch is acknowledged"
    )]
    Failed {
        /// Device name.
        device: String,
        /// Operation that failed.
        op: IoOp,
        /// Byte address on the device of the failed I/O (0 for a flush).
        offset: u64,
        /// Length of the failed I/O (0 for a flush).
        len_bytes: u64,
        /// Batch the log was writing when it noticed the failure.
        lsn: Lsn,
        /// The error.
        #[source]
        cause: Arc<io::Error>,
    },
    /// A record can never fit in a batch of this log.
    #[error(
        "record of {len_bytes} bytes can never fit in the log: the largest record is \
         {record_bytes_max} bytes (batch cap {batch_bytes_cap} bytes, half of a \
         {log_bytes}-byte log at most)"
    )]
    RecordTooLarge {
        /// Length of the record.
        len_bytes: usize,
        /// Largest record this log accepts.
        record_bytes_max: usize,
        /// Largest batch of this log.
        batch_bytes_cap: usize,
        /// Size of the log region.
        log_bytes: u64,
    },
    /// [`RefLog::trim`] or [`RefLog::bounds`] past the durable log: only
    /// durable batches can be covered by a checkpoint.
    #[error("cannot trim the log to {upto}: only batches up to {durable} are durable")]
    TrimBeyondDurable {
        /// Requested first LSN to keep.
        upto: Lsn,
        /// Last durable LSN.
        durable: Lsn,
    },
    /// [`RefLog::bounds`] below the current head: that part of the log is
    /// already released.
    #[error("log position of {lsn} is unknown: the log was already trimmed to {head}")]
    AlreadyTrimmed {
        /// Requested LSN.
        lsn: Lsn,
        /// Current head.
        head: Lsn,
    },
    /// [`RefLog::set_txn_id`] with a lower id than the current one.
    #[error("transaction id cannot go back from {current} to {requested}")]
    TxnIdBackwards {
        /// Current id.
        current: u64,
        /// Requested id.
        requested: u64,
    },
    /// A configuration field is out of range.
    #[error("invalid log config: {field} = {value}, expected {expected}")]
    Config {
        /// Field name.
        field: &'static str,
        /// Value given.
        value: u64,
        /// What is accepted.
        expected: &'static str,
    },
    /// The log region of the superblock is unusable on this device.
    #[error("log region of the superblock is unusable on {device}: {reason}")]
    Region {
        /// Device name.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// [`RefLog::open`] was given a [`Replay`] of another superblock or
    /// another log region.
    #[error("replay does not match the superblock: {reason}")]
    ReplayMismatch {
        /// What differs.
        reason: String,
    },
    /// A batch that replay accepted no longer holds the same bytes when
    /// [`Replay::stream`] reads it again (the device changed under
    /// recovery, or returned other data for the same read).
    #[error(
        "replay: batch {lsn} at log offset {log_offset} changed since it was accepted: {reason}"
    )]
    ReplayChanged {
        /// Its LSN.
        lsn: Lsn,
        /// Its logical offset.
        log_offset: u64,
        /// What differs.
        reason: String,
    },
    /// Replay could not read the log (reads do not latch the storage; retry
    /// or report the device).
    #[error("replay: reading {len_bytes} bytes at offset {offset} for {lsn} failed: {source}")]
    ReplayRead {
        /// LSN being read.
        lsn: Lsn,
        /// Byte address on the device.
        offset: u64,
        /// Length of the read.
        len_bytes: u64,
        /// The storage error (names the device).
        #[source]
        source: StorageError,
    },
    /// The log is damaged before the tail the superblock recorded as
    /// durable: a batch that was acknowledged is unreadable. Not a clean end
    /// of log; the file system needs repair.
    #[error(
        "log corrupt: {lsn} at log offset {log_offset} is unreadable ({cause}) but the \
         superblock records the log as durable up to {tail_lsn}"
    )]
    Corrupt {
        /// LSN expected at the damaged place.
        lsn: Lsn,
        /// Logical log offset of the damaged place.
        log_offset: u64,
        /// Durable tail recorded by the superblock.
        tail_lsn: Lsn,
        /// Why the batch does not decode.
        cause: Box<StopCause>,
    },
    /// The log is damaged in the middle: batches `first..=last` do not
    /// decode, but an intact batch follows them beyond the writer's
    /// in-flight bound, so they were durable (and acknowledged): not a torn
    /// tail. Refused in [`RecoveryMode::Strict`]; the other modes go on.
    #[error(
        "log corrupt: {first} ..= {last} at log offset {log_offset} unreadable ({cause}), but \
         {intact_batches_after} intact batches ({intact_records_after} records, up to \
         {intact_last}) follow them: acknowledged data would be lost; recover with an explicit \
         recovery mode (tolerate-tail or skip-corrupt) to go on"
    )]
    Damaged {
        /// First damaged LSN.
        first: Lsn,
        /// Last damaged LSN.
        last: Lsn,
        /// Logical log offset of the first damaged batch.
        log_offset: u64,
        /// Intact batches after the damage (to the real end of the log).
        intact_batches_after: u64,
        /// Records in them: what [`RecoveryMode::TolerateTail`] would drop
        /// beyond the damaged batches.
        intact_records_after: u64,
        /// LSN of the last intact batch.
        intact_last: Lsn,
        /// Why the first damaged batch does not decode.
        cause: Box<StopCause>,
    },
    /// Where the log ends for this superblock, a valid batch of this file
    /// system claims a later lap of the same place: the writer went on past
    /// this superblock's head, which only a newer superblock (now lost or
    /// rotten) allows. Going on would silently roll back what that
    /// superblock committed.
    #[error(
        "log is ahead of the superblock: where {lsn} was expected at log offset {log_offset}, \
         a batch written for log offset {found} (a later lap) was found: a newer superblock was \
         lost; recovering from this one would roll back what it committed"
    )]
    AheadOfSuperblock {
        /// LSN expected.
        lsn: Lsn,
        /// Logical offset expected.
        log_offset: u64,
        /// The later offset the batch there claims.
        found: u64,
    },
    /// The chain of batches passes the superblock's tail LSN at another
    /// offset than the superblock recorded.
    #[error(
        "log corrupt: {tail_lsn} ends at log offset {found_offset} but the superblock records \
         {expected_offset}"
    )]
    TailMismatch {
        /// The superblock's tail LSN.
        tail_lsn: Lsn,
        /// The superblock's tail offset.
        expected_offset: u64,
        /// Where the replayed batch ends.
        found_offset: u64,
    },
}

impl LogError {
    /// True for [`LogError::Failed`]: the log acknowledges nothing more.
    pub fn is_failed(&self) -> bool {
        matches!(self, LogError::Failed { .. })
    }

    /// The device this error names, if any.
    pub fn device(&self) -> Option<&str> {
        match self {
            LogError::Failed { device, .. } | LogError::Region { device, .. } => Some(device),
            _ => None,
        }
    }

    /// The device offset of the failed I/O this error is about, if any.
    pub fn offset(&self) -> Option<u64> {
        match self {
            LogError::Failed { offset, .. } | LogError::ReplayRead { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}
