//! Recovery: [`replay`] reads the log from the superblock's head and returns
//! every record of every valid batch, in LSN order.
//!
//! Replay expects batch `lsn` at logical offset `offset` (starting with the
//! superblock's `log_head_lsn` / `log_head_offset`) and accepts it if its
//! header and payload decode there with that LSN (`decode_batch`). If not,
//! and `offset` is not a lap start, the wrap rule may have placed the batch
//! at the next lap start; replay accepts it there if it decodes with that
//! LSN *and* is larger than the space it skipped (otherwise the writer
//! would have put it before the end). The first batch found in neither
//! place ends the log.
//!
//! Every batch also carries the header checksum of the batch before it
//! (`prev_checksum`, a chain starting at the superblock's `log_head_chain`):
//! a batch that decodes at the right place with the right LSN but links to
//! another predecessor is a leftover of an abandoned chain (say, the old
//! batch `n + 1` after a new batch `n` reused its place) and ends the log.
//!
//! **Torn tail or corruption.** The writer has at most one batch in flight
//! (the superblock's `log_inflight_max`) and writes batch `n + 1` only after
//! batch `n` is durable. So when batch `n` does not decode, replay looks for
//! an intact batch after it ([`find_successor`]): at the end of `n` if `n`'s
//! header is intact (and then the successor must chain to it), otherwise in
//! every 4096-byte block of the next two batch lengths. If one exists, `n`
//! was durable and acknowledged and is now damaged: **corruption**, which
//! [`RecoveryMode::Strict`] refuses with [`LogError::Damaged`] (naming the
//! damaged LSNs and what follows them). If none exists, batch `n` was in
//! flight at the crash: a torn tail, the clean end. A stop at or before the
//! superblock's `log_tail_lsn` with no successor contradicts the
//! superblock too: [`LogError::Corrupt`].
//!
//! An operator who accepts the loss chooses [`RecoveryMode::TolerateTail`]
//! (keep the batches before the first damaged one) or
//! [`RecoveryMode::SkipCorrupt`] (drop only the damaged batches, keep every
//! intact batch after them); the [`RecoveryReport`] says what was dropped.
//!
//! Replay only reads. Running it twice gives the same [`Replay`];
//! [`super::RefLog::open`] then continues at [`RecoveryReport::end`] and
//! overwrites the damaged tail.

use std::fmt;

use super::ring::Ring;
use super::{LogBounds, LogError, LogPosition, Lsn};
use crate::aligned::BLOCK_BYTES;
use crate::format::{
    decode_batch, decode_batch_header, BatchHeader, FormatError, FsId, Superblock,
    LOG_BATCH_BYTES_MAX,
};
use crate::storage::{Storage, StorageError};

/// Bytes replay reads at a time (bounded by the batch size, the region end
/// and the ring), so that a log of small batches is read in large I/Os.
pub const REPLAY_READ_BYTES: usize = 1 << 20;

/// Why replay did not accept a batch at a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopCause {
    /// The bytes there do not decode as the expected batch: never written
    /// (`BadMagic`), torn header (`BadChecksum`), torn payload (`Torn`), an
    /// earlier lap (`Stale`), a misdirected write (`WrongAddress`), another
    /// file system (`ForeignFs`), an unknown version or invalid fields.
    #[error("{0}")]
    Format(FormatError),
    /// A valid batch for this offset but with another LSN.
    #[error("batch has {found}, expected {expected}")]
    LsnMismatch {
        /// LSN in the batch header.
        found: Lsn,
        /// LSN replay expected.
        expected: Lsn,
    },
    /// The header claims a batch that would cross the physical end of the
    /// region, which the writer never does.
    #[error(
        "batch of {batch_bytes} bytes at log offset {log_offset} would cross the end of the \
         log region"
    )]
    CrossesRegionEnd {
        /// Logical offset of the batch.
        log_offset: u64,
        /// Its claimed size.
        batch_bytes: u32,
    },
    /// The header claims a batch that would reach past `head + log_bytes`,
    /// into space the writer may not use.
    #[error(
        "batch of {batch_bytes} bytes at log offset {log_offset} would overwrite the head at log \
         offset {head_offset}"
    )]
    BeyondHead {
        /// Logical offset of the batch.
        log_offset: u64,
        /// Its claimed size.
        batch_bytes: u32,
        /// Head offset of the replay.
        head_offset: u64,
    },
    /// A batch at a lap start that would have fit before the end of the
    /// previous lap, so the wrap rule did not put it there.
    #[error(
        "batch of {batch_bytes} bytes at lap start {log_offset} would have fit in the \
         {skipped_bytes} bytes before the region end: not a lap skip"
    )]
    NotALapSkip {
        /// Lap start.
        log_offset: u64,
        /// Its size.
        batch_bytes: u32,
        /// Bytes a skip would have left unwritten.
        skipped_bytes: u64,
    },
    /// A valid batch with the expected LSN whose chain link names another
    /// predecessor: a leftover of an abandoned chain.
    #[error(
        "batch {lsn} at log offset {log_offset} chains to a predecessor with checksum \
         {found:#010x}, expected {expected:#010x}: a leftover of an abandoned chain"
    )]
    ChainMismatch {
        /// Its LSN.
        lsn: Lsn,
        /// Its logical offset.
        log_offset: u64,
        /// The checksum of the batch before it (or the superblock's seed).
        expected: u32,
        /// Its `prev_checksum`.
        found: u32,
    },
    /// The device could not read the batch there (a media error, such as a
    /// sector torn by a power loss that reads back as an error).
    #[error("reading {len_bytes} bytes at device offset {offset} failed: {error}")]
    Unreadable {
        /// Byte address on the device.
        offset: u64,
        /// Length of the read.
        len_bytes: u64,
        /// The storage error.
        error: String,
    },
    /// A batch there would end more than one region past the head, where
    /// the writer never writes (the chain already spans the region).
    #[error(
        "no batch can start at log offset {log_offset}: it would end more than one log region \
         past the head"
    )]
    RegionFull {
        /// Where the next batch would start.
        log_offset: u64,
    },
}

/// A batch whose header was intact but which was not accepted (its payload
/// is torn, or its LSN is wrong): the bytes that are abandoned and will be
/// overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TruncatedBatch {
    /// LSN in its header.
    pub lsn: Lsn,
    /// Its logical offset.
    pub log_offset: u64,
    /// Its size on disk.
    pub batch_bytes: u32,
}

/// Where and why replay stopped, and what it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Where replay started: the superblock's head.
    pub head: LogPosition,
    /// The superblock's durable tail: LSN of the last batch known durable.
    pub superblock_tail_lsn: Lsn,
    /// Where the log continues: the LSN of the first batch not returned and
    /// the offset just past the last batch returned (`head` if none).
    pub end: LogPosition,
    /// Batches returned.
    pub batches: u64,
    /// Records returned.
    pub records: u64,
    /// Record body bytes returned.
    pub record_bytes: u64,
    /// Bytes skipped at lap ends by the wrap rule between returned batches.
    pub skipped_bytes: u64,
    /// Batches returned beyond the superblock's tail (durable, or at least
    /// intact, after the superblock was written).
    pub beyond_superblock_tail: u64,
    /// Why the batch `end.lsn` was not accepted at `end.offset`.
    pub stop: StopCause,
    /// If `end.offset` is not a lap start: why it was not accepted at the
    /// next lap start either (the offset tried, the cause).
    pub stop_at_lap_start: Option<(u64, StopCause)>,
    /// The abandoned batch, if its header was intact.
    pub truncated: Option<TruncatedBatch>,
    /// The recovery mode replay ran in.
    pub mode: RecoveryMode,
    /// Damaged batches found before the end (each followed by an intact
    /// batch, or before the superblock's tail): empty on a healthy log.
    pub damaged: Vec<DamagedRange>,
    /// What the recovery mode dropped (`None` in [`RecoveryMode::Strict`],
    /// which drops nothing).
    pub dropped: Option<DroppedLog>,
}

/// Most damaged ranges replay skips over; a log damaged in more places is
/// refused in every mode.
pub const DAMAGED_RANGES_MAX: usize = 64;

/// What replay does with a log damaged in the middle (a batch that does not
/// decode followed by an intact one, or before the superblock's tail).
/// A torn tail is the normal end of a log in every mode. After
/// `raft-engine`'s `RecoveryMode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Refuse ([`LogError::Damaged`] / [`LogError::Corrupt`]): nothing
    /// acknowledged is dropped without an operator's decision. The default.
    #[default]
    Strict,
    /// Keep every batch before the first damaged one; drop it and every
    /// batch after it (they are overwritten by the next appends).
    TolerateTail,
    /// Drop only the damaged batches; keep every intact batch after them.
    SkipCorrupt,
}

impl RecoveryMode {
    /// Every mode, in order of what it gives up.
    pub const ALL: [RecoveryMode; 3] = [
        RecoveryMode::Strict,
        RecoveryMode::TolerateTail,
        RecoveryMode::SkipCorrupt,
    ];

    /// The name used on command lines (`strict`, `tolerate-tail`,
    /// `skip-corrupt`).
    pub fn name(self) -> &'static str {
        match self {
            RecoveryMode::Strict => "strict",
            RecoveryMode::TolerateTail => "tolerate-tail",
            RecoveryMode::SkipCorrupt => "skip-corrupt",
        }
    }

    /// The mode named `name` ([`RecoveryMode::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Its code in the superblock's recovery record.
    pub fn record_code(self) -> u32 {
        match self {
            RecoveryMode::Strict => crate::format::RECOVERY_MODE_NONE,
            RecoveryMode::TolerateTail => crate::format::RECOVERY_MODE_TOLERATE_TAIL,
            RecoveryMode::SkipCorrupt => crate::format::RECOVERY_MODE_SKIP_CORRUPT,
        }
    }
}

impl fmt::Display for RecoveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Batches `first..=last` do not decode; `at` is where the first was
/// expected (the end of the batch before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    /// First damaged LSN.
    pub first: Lsn,
    /// Last damaged LSN.
    pub last: Lsn,
    /// Logical offset where `first` was expected.
    pub at: u64,
    /// Why `first` was not accepted there.
    pub cause: StopCause,
    /// The intact batch that follows (proof that the damaged ones were
    /// durable), or `None` for damage found only because it lies before the
    /// superblock's tail.
    pub successor: Option<LogPosition>,
    /// `prev_checksum` of the successor: the chain value of `last`.
    pub successor_chain: u32,
}

/// What a recovery mode dropped from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DroppedLog {
    /// First LSN dropped.
    pub first: Lsn,
    /// Last LSN dropped.
    pub last: Lsn,
    /// Batches dropped (damaged and intact).
    pub batches: u64,
    /// Of them, intact batches (their records were readable).
    pub intact_batches: u64,
    /// Records of the intact batches dropped.
    pub intact_records: u64,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "log replay from {}: {} batches, {} records ({} bytes), {} beyond the superblock tail \
             ({}); log ends before {} at log offset {}: {}",
            self.head,
            self.batches,
            self.records,
            self.record_bytes,
            self.beyond_superblock_tail,
            self.superblock_tail_lsn,
            self.end.lsn,
            self.end.offset,
            self.stop
        )?;
        if let Some((offset, cause)) = &self.stop_at_lap_start {
            write!(f, "; not at lap start {offset} either: {cause}")?;
        }
        if let Some(t) = &self.truncated {
            write!(
                f,
                "; truncated {} ({} bytes at log offset {})",
                t.lsn, t.batch_bytes, t.log_offset
            )?;
        }
        for d in &self.damaged {
            write!(
                f,
                "; DAMAGED {}..={} at log offset {} ({})",
                d.first, d.last, d.at, d.cause
            )?;
            if let Some(s) = d.successor {
                write!(f, ", intact again from {s}")?;
            }
        }
        if let Some(d) = &self.dropped {
            write!(
                f,
                "; recovery mode {} DROPPED {}..={}: {} batches, {} of them intact with {} records",
                self.mode, d.first, d.last, d.batches, d.intact_batches, d.intact_records
            )?;
        }
        Ok(())
    }
}

/// A batch returned by replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayedBatch {
    /// Its LSN.
    pub lsn: Lsn,
    /// The `txn_id` in its header.
    pub txn_id: u64,
    /// Its logical offset.
    pub log_offset: u64,
    /// Its size on disk.
    pub batch_bytes: u32,
    /// Records in it.
    pub record_count: u32,
    /// Bytes of its records' bodies.
    pub record_bytes: u32,
    /// Its header checksum (what the next batch chains to).
    pub checksum: u32,
}

/// One replayed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayedRecord<'a> {
    /// LSN of its batch.
    pub lsn: Lsn,
    /// `txn_id` of its batch.
    pub txn_id: u64,
    /// The record bytes, as appended.
    pub data: &'a [u8],
}

/// Result of [`replay`]: the records in LSN order (and in append order
/// within a batch), the batches, and the [`RecoveryReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    fs_id: FsId,
    ring: Ring,
    /// No batch reaches this logical offset (`head + log_bytes`).
    limit: u64,
    batches: Vec<ReplayedBatch>,
    report: RecoveryReport,
    /// `prev_checksum` for the batch written at `report.end`.
    end_chain: u32,
}

impl Replay {
    /// Reads the records of the batches replay kept, batch by batch, in LSN
    /// order (records of a batch in append order): a second pass over the
    /// log that holds at most one read window ([`REPLAY_READ_BYTES`], or one
    /// batch if larger) of record bytes at a time. Each batch read must be
    /// the one the first pass accepted (same LSN and header checksum),
    /// otherwise [`RecordStream::next_record`] returns
    /// [`LogError::ReplayChanged`].
    pub fn stream<'a, S: Storage + ?Sized>(&'a self, storage: &'a S) -> RecordStream<'a, S> {
        RecordStream {
            replay: self,
            reader: Reader {
                storage,
                ring: self.ring,
                limit: self.limit,
                window_start: 0,
                window: Vec::new(),
                failed_read: None,
            },
            next_batch: 0,
            loaded: None,
            spans: Vec::new(),
        }
    }

    /// Number of records.
    pub fn record_count(&self) -> usize {
        usize::try_from(self.report.records).unwrap_or(usize::MAX)
    }

    /// The batches, in LSN order.
    pub fn batches(&self) -> &[ReplayedBatch] {
        &self.batches
    }

    /// Where and why replay stopped.
    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Where appending continues ([`RecoveryReport::end`]).
    pub fn end(&self) -> LogPosition {
        self.report.end
    }

    /// File system id of the superblock replayed.
    pub fn fs_id(&self) -> FsId {
        self.fs_id
    }

    /// `(log_start, log_bytes)` of the superblock replayed.
    pub fn log_region(&self) -> (u64, u64) {
        (self.ring.start, self.ring.len)
    }

    /// The chain link (`prev_checksum`) of the batch written next, at
    /// [`Replay::end`].
    pub fn end_chain(&self) -> u32 {
        self.end_chain
    }

    /// Every batch from the head to the end as `(lsn, offset, bytes,
    /// checksum)` spans with consecutive LSNs, damaged ranges kept by
    /// [`RecoveryMode::SkipCorrupt`] included (the first damaged LSN spans
    /// up to its successor, the others are empty; their checksum is the
    /// chain value the next one carries where known, else 0).
    pub(crate) fn spans(&self) -> Vec<(Lsn, u64, u64, u32)> {
        let mut out = Vec::with_capacity(self.batches.len());
        let mut damaged = self.report.damaged.iter().peekable();
        for b in &self.batches {
            while let Some(d) = damaged.next_if(|d| d.first < b.lsn) {
                let upto = d.successor.map_or(d.at, |s| s.offset);
                let mut lsn = d.first;
                while lsn <= d.last {
                    let (offset, bytes) = if lsn == d.first {
                        (d.at, upto - d.at)
                    } else {
                        (upto, 0)
                    };
                    let chain = if lsn == d.last { d.successor_chain } else { 0 };
                    out.push((lsn, offset, bytes, chain));
                    lsn = lsn.next();
                }
            }
            out.push((b.lsn, b.log_offset, u64::from(b.batch_bytes), b.checksum));
        }
        out
    }
}

/// The records of a [`Replay`], read again from the device batch by batch
/// ([`Replay::stream`]). Not an [`Iterator`]: each record borrows the
/// stream's read window, which the next call may refill.
pub struct RecordStream<'a, S: Storage + ?Sized> {
    replay: &'a Replay,
    reader: Reader<'a, S>,
    /// Index in `replay.batches` of the next batch to load.
    next_batch: usize,
    /// The batch being read: its LSN, `txn_id`, where its bytes start in
    /// the window, and the index in `spans` of its next record.
    loaded: Option<Loaded>,
    /// Records of the loaded batch: (start in the batch, length). At most
    /// one per framed record of one batch.
    spans: Vec<(u32, u32)>,
}

impl<S: Storage + ?Sized> fmt::Debug for RecordStream<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordStream")
            .field("next_batch", &self.next_batch)
            .field("batches", &self.replay.batches.len())
            .field("loaded", &self.loaded)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Loaded {
    lsn: Lsn,
    txn_id: u64,
    at: usize,
    next: usize,
}

impl<S: Storage + ?Sized> RecordStream<'_, S> {
    /// The next record, `None` after the last. Errors: [`LogError::ReplayRead`]
    /// if a batch cannot be read again, [`LogError::ReplayChanged`] if it no
    /// longer holds what the first pass accepted.
    pub fn next_record(&mut self) -> Result<Option<ReplayedRecord<'_>>, LogError> {
        while self.loaded.is_none_or(|l| l.next >= self.spans.len()) {
            let Some(b) = self.replay.batches.get(self.next_batch).copied() else {
                self.loaded = None;
                return Ok(None);
            };
            self.next_batch += 1;
            self.load(&b)?;
        }
        let Some(l) = self.loaded.as_mut() else {
            return Ok(None);
        };
        let (start, len) = self.spans[l.next];
        l.next += 1;
        let from = l.at + start as usize;
        Ok(Some(ReplayedRecord {
            lsn: l.lsn,
            txn_id: l.txn_id,
            data: &self.reader.window[from..from + len as usize],
        }))
    }

    /// Largest read window held so far, in bytes: the record bytes this
    /// stream keeps in memory.
    pub fn window_bytes_max(&self) -> usize {
        self.reader.window.capacity()
    }

    /// Reads batch `b` into the window and indexes its records.
    fn load(&mut self, b: &ReplayedBatch) -> Result<(), LogError> {
        let changed = |reason: String| LogError::ReplayChanged {
            lsn: b.lsn,
            log_offset: b.log_offset,
            reason,
        };
        let fs_id = self.replay.fs_id;
        let full = match self.reader.get(b.log_offset, b.batch_bytes as usize) {
            Ok(full) => full,
            Err(cause) => {
                return Err(match self.reader.failed_read.take() {
                    Some((offset, len_bytes, source)) => LogError::ReplayRead {
                        lsn: b.lsn,
                        offset,
                        len_bytes,
                        source,
                    },
                    None => changed(cause.to_string()),
                })
            }
        };
        let view = decode_batch(full, &fs_id, b.log_offset).map_err(|e| changed(e.to_string()))?;
        if view.header.lsn != b.lsn.0 || view.header.checksum != b.checksum {
            return Err(changed(format!(
                "found batch {} with header checksum {:#010x}, replay accepted {:#010x}",
                Lsn(view.header.lsn),
                view.header.checksum,
                b.checksum
            )));
        }
        let txn_id = view.header.txn_id;
        let base = full.as_ptr() as usize;
        self.spans.clear();
        for record in view.records() {
            // A record lies inside its batch (at most 16 MiB).
            let start = record.as_ptr() as usize - base;
            self.spans.push((start as u32, record.len() as u32));
        }
        let at = (b.log_offset - self.reader.window_start) as usize;
        self.loaded = Some(Loaded {
            lsn: b.lsn,
            txn_id,
            at,
            next: 0,
        });
        Ok(())
    }
}

/// Reads the log through a window of up to [`REPLAY_READ_BYTES`].
struct Reader<'a, S: Storage + ?Sized> {
    storage: &'a S,
    ring: Ring,
    /// No read reaches this logical offset (`head + log_bytes`).
    limit: u64,
    window_start: u64,
    window: Vec<u8>,
    /// The last read that failed: device offset, length, error.
    failed_read: Option<(u64, u64, StorageError)>,
}

impl<S: Storage + ?Sized> Reader<'_, S> {
    /// `len` bytes at logical `offset`; the caller checked that they lie in
    /// one lap and below `limit`. Reads ahead up to [`REPLAY_READ_BYTES`];
    /// if the read-ahead fails, reads exactly `len` bytes, so that an
    /// unreadable sector past the end of the log never fails replay. The
    /// error is a [`StopCause::Unreadable`]: the caller decides whether the
    /// place matters.
    fn get(&mut self, offset: u64, len: usize) -> Result<&[u8], StopCause> {
        let have = offset >= self.window_start
            && offset + len as u64 <= self.window_start + self.window.len() as u64;
        if !have {
            let ahead = (REPLAY_READ_BYTES as u64)
                .min(self.ring.contiguous(offset))
                .min(self.limit - offset);
            let n = (len as u64).max(ahead) as usize;
            self.window_start = offset;
            if let Err(e) = self.fill(offset, n) {
                if n == len {
                    return Err(e);
                }
                self.fill(offset, len)?;
            }
        }
        let from = (offset - self.window_start) as usize;
        Ok(&self.window[from..from + len])
    }

    fn fill(&mut self, offset: u64, n: usize) -> Result<(), StopCause> {
        self.window.clear();
        self.window.resize(n, 0);
        let physical = self.ring.physical(offset);
        self.storage.read(physical, &mut self.window).map_err(|e| {
            // Forget the partly filled window.
            self.window.clear();
            let cause = StopCause::Unreadable {
                offset: physical,
                len_bytes: n as u64,
                error: e.to_string(),
            };
            self.failed_read = Some((physical, n as u64, e));
            cause
        })
    }
}

/// Records being collected.
struct Collector {
    batches: Vec<ReplayedBatch>,
    records: u64,
    record_bytes: u64,
}

/// Outcome of trying to read the expected batch at one offset.
enum Attempt {
    Accepted(BatchHeader),
    /// Not accepted, with the header found there if it was intact (its
    /// checksum held), whatever batch it names.
    Refused(StopCause, Option<BatchHeader>),
}

/// What replay expects at one place.
#[derive(Debug, Clone, Copy)]
struct Expect {
    offset: u64,
    lsn: Lsn,
    /// The chain link the batch must carry (`None`: unknown, after a
    /// damaged range skipped by [`RecoveryMode::SkipCorrupt`]).
    chain: Option<u32>,
    /// The size the batch must exceed (the skipped space, for a lap-start
    /// attempt; 0 otherwise).
    larger_than: u64,
}

/// Checks the header of the batch expected at `e` (everything but the
/// payload); the refusal if it is not that batch.
fn check_header<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    fs_id: &FsId,
    head_offset: u64,
    e: Expect,
) -> Attempt {
    if e.offset + BLOCK_BYTES as u64 > reader.limit {
        let cause = StopCause::RegionFull {
            log_offset: e.offset,
        };
        return Attempt::Refused(cause, None);
    }
    let first = match reader.get(e.offset, BLOCK_BYTES) {
        Ok(first) => first,
        Err(cause) => return Attempt::Refused(cause, None),
    };
    let header = match decode_batch_header(first, fs_id, e.offset) {
        Ok(h) => h,
        Err(f) => return Attempt::Refused(StopCause::Format(f), None),
    };
    let refuse = |cause| Attempt::Refused(cause, Some(header));
    if header.lsn != e.lsn.0 {
        return refuse(StopCause::LsnMismatch {
            found: Lsn(header.lsn),
            expected: e.lsn,
        });
    }
    if let Some(chain) = e.chain.filter(|&c| c != header.prev_checksum) {
        return refuse(StopCause::ChainMismatch {
            lsn: e.lsn,
            log_offset: e.offset,
            expected: chain,
            found: header.prev_checksum,
        });
    }
    let batch_bytes = u64::from(header.batch_bytes);
    if batch_bytes > reader.ring.contiguous(e.offset) {
        return refuse(StopCause::CrossesRegionEnd {
            log_offset: e.offset,
            batch_bytes: header.batch_bytes,
        });
    }
    if e.offset + batch_bytes > reader.limit {
        return refuse(StopCause::BeyondHead {
            log_offset: e.offset,
            batch_bytes: header.batch_bytes,
            head_offset,
        });
    }
    if batch_bytes <= e.larger_than {
        return refuse(StopCause::NotALapSkip {
            log_offset: e.offset,
            batch_bytes: header.batch_bytes,
            skipped_bytes: e.larger_than,
        });
    }
    Attempt::Accepted(header)
}

/// Tries to decode the batch expected at `e`; on success appends its
/// records to `out`.
fn attempt<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    fs_id: &FsId,
    head_offset: u64,
    e: Expect,
    out: &mut Collector,
) -> Attempt {
    let header = match check_header(reader, fs_id, head_offset, e) {
        Attempt::Accepted(h) => h,
        refused => return refused,
    };
    let full = match reader.get(e.offset, header.batch_bytes as usize) {
        Ok(full) => full,
        Err(cause) => return Attempt::Refused(cause, Some(header)),
    };
    let view = match decode_batch(full, fs_id, e.offset) {
        Ok(v) => v,
        Err(f) => return Attempt::Refused(StopCause::Format(f), Some(header)),
    };
    // Only counted here: the records are read again by `Replay::stream`.
    let record_bytes: usize = view.records().map(<[u8]>::len).sum();
    out.records += u64::from(header.record_count);
    out.record_bytes += record_bytes as u64;
    out.batches.push(ReplayedBatch {
        lsn: e.lsn,
        txn_id: header.txn_id,
        log_offset: e.offset,
        batch_bytes: header.batch_bytes,
        record_count: header.record_count,
        // Shorter than its batch (at most 16 MiB).
        record_bytes: record_bytes as u32,
        checksum: header.checksum,
    });
    Attempt::Accepted(header)
}

/// Whether a fully intact batch of this file system with an LSN above
/// `after` starts at `offset` (claiming that offset); its header if so.
fn intact_batch_at<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    fs_id: &FsId,
    offset: u64,
    after: Lsn,
) -> Option<BatchHeader> {
    if offset + BLOCK_BYTES as u64 > reader.limit {
        return None;
    }
    let header = decode_batch_header(reader.get(offset, BLOCK_BYTES).ok()?, fs_id, offset).ok()?;
    let bytes = u64::from(header.batch_bytes);
    if header.lsn <= after.0
        || bytes > reader.ring.contiguous(offset)
        || offset + bytes > reader.limit
    {
        return None;
    }
    let full = reader.get(offset, header.batch_bytes as usize).ok()?;
    decode_batch(full, fs_id, offset).ok().map(|v| v.header)
}

/// The places where batch `n` was looked for, with the header intact
/// there if any.
type Places = [(u64, Option<BatchHeader>); 2];

/// Looks for an intact batch after the batch `pos.lsn` that was not
/// accepted at `pos.offset` (nor at the next lap start): proof that it was
/// durable, so that its damage is corruption, not a torn tail (the writer
/// writes batch `n + 1` only after batch `n` is durable; the superblock's
/// `log_inflight_max` is 1). Where batch `n`'s header is intact (and
/// chains as expected), its successor can only be right after it and must
/// chain to it. Where no header is intact, the successor lies within two
/// batch lengths ([`LOG_BATCH_BYTES_MAX`] each) of the first such place:
/// every 4096-byte block there is tried. Such a candidate's chain cannot
/// be checked, so batches with LSNs up to `ignore_upto` (those an operator
/// gave up with [`RecoveryMode::TolerateTail`], whose old copies may
/// still be on the device) are not taken as proof. Bounded: at most
/// `2 × LOG_BATCH_BYTES_MAX` bytes read, never past `head + log_bytes`.
fn find_successor<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    fs_id: &FsId,
    head_offset: u64,
    expect: Expect,
    places: Places,
    ignore_upto: Lsn,
) -> Option<(LogPosition, BatchHeader)> {
    let n = expect.lsn;
    let mut scan_from = None;
    for (offset, header) in places {
        match header {
            Some(h) if h.lsn == n.0 && expect.chain.is_none_or(|c| c == h.prev_checksum) => {
                return successor_of(reader, fs_id, head_offset, offset, &h);
            }
            // Another batch's intact header: batch n was not written here.
            Some(_) => {}
            None => {
                scan_from.get_or_insert(offset);
            }
        }
    }
    let step = BLOCK_BYTES as u64;
    let from = scan_from? + step;
    let to = (from + 2 * LOG_BATCH_BYTES_MAX as u64).min(reader.limit);
    let mut offset = from;
    while offset < to {
        if let Some(h) = intact_batch_at(reader, fs_id, offset, n.max(ignore_upto)) {
            return Some((
                LogPosition {
                    lsn: Lsn(h.lsn),
                    offset,
                },
                h,
            ));
        }
        offset += step;
    }
    None
}

/// The batch right after the batch `h` (intact header, at `offset`), at
/// its end or at the next lap start, if it is intact and chains to `h`.
fn successor_of<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    fs_id: &FsId,
    head_offset: u64,
    offset: u64,
    h: &BatchHeader,
) -> Option<(LogPosition, BatchHeader)> {
    let end = offset + u64::from(h.batch_bytes);
    let mut next = Expect {
        offset: end,
        lsn: Lsn(h.lsn).next(),
        chain: Some(h.checksum),
        larger_than: 0,
    };
    let mut places = vec![next];
    if !end.is_multiple_of(reader.ring.len) {
        next.larger_than = reader.ring.contiguous(end);
        next.offset = reader.ring.next_lap(end);
        places.push(next);
    }
    for e in places {
        if let Attempt::Accepted(found) = check_header(reader, fs_id, head_offset, e) {
            if intact_batch_at(reader, fs_id, e.offset, Lsn(h.lsn)).is_some() {
                let at = LogPosition {
                    lsn: e.lsn,
                    offset: e.offset,
                };
                return Some((at, found));
            }
        }
    }
    // Batch n's own header is here and nothing follows it: it was in
    // flight (a torn tail).
    None
}

/// The chain walked from the head, before a recovery mode decides what to
/// keep.
struct Walk {
    out: Collector,
    /// Where the walk ended (the batch not accepted).
    end: LogPosition,
    /// Chain link of the batch at `end` (of the last batch accepted).
    end_chain: u32,
    skipped_bytes: u64,
    stop: StopCause,
    stop_at_lap_start: Option<(u64, StopCause)>,
    truncated: Option<TruncatedBatch>,
    damaged: Vec<DamagedRange>,
    /// The end is a place that could not be read (where batch `end.lsn`
    /// could be): the failed read.
    unreadable: Option<(u64, u64, StorageError)>,
    /// At the end, a batch of this file system written for a later lap of
    /// the same place: the log went on past this superblock (its offset).
    ahead: Option<u64>,
}

/// The later-lap offset a batch at the end claims, if `cause` is a batch of
/// this file system written for `expected + k * ring_len` (`k ≥ 1`).
fn later_lap(cause: &StopCause, ring_len: u64) -> Option<u64> {
    match cause {
        StopCause::Format(FormatError::WrongAddress {
            expected, found, ..
        }) if found > expected && (found - expected).is_multiple_of(ring_len) => Some(*found),
        _ => None,
    }
}

/// Why the batch at `pos` was not accepted, at its place and at the next
/// lap start.
struct Refusal {
    cause: StopCause,
    lap: Option<(u64, StopCause, Option<BatchHeader>)>,
    header: Option<BatchHeader>,
}

/// Accepts the batch expected at `pos` (or at the next lap start);
/// `Ok(position after it, its checksum)`, or why not.
fn step<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    fs_id: &FsId,
    head_offset: u64,
    pos: LogPosition,
    chain: Option<u32>,
    out: &mut Collector,
) -> Result<(LogPosition, BatchHeader, u64), Box<Refusal>> {
    let here = Expect {
        offset: pos.offset,
        lsn: pos.lsn,
        chain,
        larger_than: 0,
    };
    let (cause, header) = match attempt(reader, fs_id, head_offset, here, out) {
        Attempt::Accepted(h) => return Ok((pos, h, 0)),
        Attempt::Refused(cause, header) => (cause, header),
    };
    let mut lap = None;
    if !pos.offset.is_multiple_of(reader.ring.len) {
        let lap_start = reader.ring.next_lap(pos.offset);
        let skipped = lap_start - pos.offset;
        let there = Expect {
            offset: lap_start,
            larger_than: skipped,
            ..here
        };
        match attempt(reader, fs_id, head_offset, there, out) {
            Attempt::Accepted(h) => {
                let at = LogPosition {
                    lsn: pos.lsn,
                    offset: lap_start,
                };
                return Ok((at, h, skipped));
            }
            Attempt::Refused(c, h) => lap = Some((lap_start, c, h)),
        }
    }
    Err(Box::new(Refusal { cause, lap, header }))
}

/// Walks the chain from the head: every intact batch, skipping damaged
/// ranges that an intact successor proves durable (at most
/// [`DAMAGED_RANGES_MAX`]).
fn walk<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    sb: &Superblock,
    bounds: LogBounds,
) -> Result<Walk, LogError> {
    let head = LogPosition {
        lsn: bounds.head_lsn,
        offset: bounds.head_offset,
    };
    let mut out = Collector {
        batches: Vec::new(),
        records: 0,
        record_bytes: 0,
    };
    let mut pos = head;
    let mut chain = Some(bounds.head_chain);
    let mut last_chain = bounds.head_chain;
    let mut skipped_bytes = 0u64;
    let mut damaged = Vec::new();
    let ignore_upto = if sb.recovery.mode == crate::format::RECOVERY_MODE_TOLERATE_TAIL {
        Lsn(sb.recovery.dropped_last_lsn)
    } else {
        Lsn(0)
    };
    loop {
        let refusal = match step(reader, &sb.fs_id, head.offset, pos, chain, &mut out) {
            Ok((at, h, skipped)) => {
                skipped_bytes += skipped;
                pos = next_position(&h, at, bounds)?;
                chain = Some(h.checksum);
                last_chain = h.checksum;
                continue;
            }
            Err(r) => r,
        };
        let expect = Expect {
            offset: pos.offset,
            lsn: pos.lsn,
            chain,
            larger_than: 0,
        };
        let places: Places = [
            (pos.offset, refusal.header),
            refusal
                .lap
                .as_ref()
                .map_or((pos.offset, refusal.header), |(o, _, h)| (*o, *h)),
        ];
        // A read error where the batch could be: the end cannot be known.
        let unreadable_here = matches!(refusal.cause, StopCause::Unreadable { .. })
            || (refusal.header.is_none()
                && matches!(&refusal.lap, Some((_, StopCause::Unreadable { .. }, _))));
        let unreadable = if unreadable_here {
            reader.failed_read.clone()
        } else {
            None
        };
        let ahead = later_lap(&refusal.cause, reader.ring.len).or_else(|| {
            let (_, cause, _) = refusal.lap.as_ref()?;
            later_lap(cause, reader.ring.len)
        });
        let successor = if damaged.len() < DAMAGED_RANGES_MAX && ahead.is_none() {
            find_successor(reader, &sb.fs_id, head.offset, expect, places, ignore_upto)
        } else {
            None
        };
        if let Some((next, h)) = successor {
            damaged.push(DamagedRange {
                first: pos.lsn,
                last: next.lsn.prev(),
                at: pos.offset,
                cause: refusal.cause,
                successor: Some(next),
                successor_chain: h.prev_checksum,
            });
            // The chain link of the damaged batch is unknown: the
            // successor's own link is taken as it is.
            pos = next;
            chain = None;
            continue;
        }
        let truncated = places
            .iter()
            .filter_map(|(o, h)| h.map(|h| (*o, h)))
            .find(|(_, h)| h.lsn == pos.lsn.0)
            .map(|(log_offset, h)| TruncatedBatch {
                lsn: Lsn(h.lsn),
                log_offset,
                batch_bytes: h.batch_bytes,
            });
        return Ok(Walk {
            out,
            end: pos,
            end_chain: last_chain,
            skipped_bytes,
            stop: refusal.cause,
            stop_at_lap_start: refusal.lap.map(|(o, c, _)| (o, c)),
            truncated,
            damaged,
            unreadable,
            ahead,
        });
    }
}

/// [`replay_with`] in [`RecoveryMode::Strict`]: refuses a damaged log.
pub fn replay<S: Storage + ?Sized>(storage: &S, sb: &Superblock) -> Result<Replay, LogError> {
    replay_with(storage, sb, RecoveryMode::Strict)
}

/// Replays the log of `sb` from its head; see the module docs. Returns every
/// record of the valid chain of batches and a report of where and why it
/// ends. Errors: [`LogError::Region`] if the superblock's log region is
/// unusable on this storage; in [`RecoveryMode::Strict`],
/// [`LogError::Damaged`] if an intact batch follows a damaged one and
/// [`LogError::Corrupt`] if the log ends before the superblock's durable
/// tail; [`LogError::TailMismatch`] if the chain passes the tail elsewhere
/// than the superblock says. The other modes go on past damage and report
/// what they dropped ([`RecoveryReport::dropped`]).
pub fn replay_with<S: Storage + ?Sized>(
    storage: &S,
    sb: &Superblock,
    mode: RecoveryMode,
) -> Result<Replay, LogError> {
    let region_error = |reason: String| LogError::Region {
        device: storage.device_name().to_string(),
        reason,
    };
    sb.validate().map_err(|e| region_error(e.to_string()))?;
    let ring = Ring::new(sb.log_start, sb.log_bytes).map_err(region_error)?;
    let device_bytes = storage.geometry().size_bytes;
    if sb.log_start + sb.log_bytes > device_bytes {
        return Err(region_error(format!(
            "log region {}..{} ends past the {device_bytes}-byte device",
            sb.log_start,
            sb.log_start + sb.log_bytes
        )));
    }
    let bounds = LogBounds::of(sb);
    let limit = bounds.head_offset.checked_add(ring.len).ok_or_else(|| {
        region_error(format!(
            "log head offset {} + {} bytes overflows",
            bounds.head_offset, ring.len
        ))
    })?;
    let mut reader = Reader {
        storage,
        ring,
        limit,
        window_start: 0,
        window: Vec::new(),
        failed_read: None,
    };
    let walk = walk(&mut reader, sb, bounds)?;
    finish(sb, ring, limit, bounds, walk, mode)
}

/// Applies the recovery mode to a walk: refuses, truncates or keeps.
fn finish(
    sb: &Superblock,
    ring: Ring,
    limit: u64,
    bounds: LogBounds,
    mut walk: Walk,
    mode: RecoveryMode,
) -> Result<Replay, LogError> {
    // A read error where the next batch could be: in strict mode that is
    // an error to report (retry, or replace the device), never an end.
    if let Some((offset, len_bytes, source)) = walk.unreadable.clone() {
        if mode == RecoveryMode::Strict {
            return Err(LogError::ReplayRead {
                lsn: walk.end.lsn,
                offset,
                len_bytes,
                source,
            });
        }
    }
    // The log went on past this superblock: a newer one is lost.
    if let Some(found) = walk.ahead {
        if mode == RecoveryMode::Strict {
            return Err(LogError::AheadOfSuperblock {
                lsn: walk.end.lsn,
                log_offset: walk.end.offset,
                found,
            });
        }
    }
    // Damage before the superblock's tail with no successor: acknowledged
    // batches are missing up to the tail; an unreadable place or a log
    // that went on may be.
    if walk.end.lsn <= bounds.tail_lsn || walk.unreadable.is_some() || walk.ahead.is_some() {
        walk.damaged.push(DamagedRange {
            first: walk.end.lsn,
            last: bounds.tail_lsn.max(walk.end.lsn),
            at: walk.end.offset,
            cause: walk.stop.clone(),
            successor: None,
            successor_chain: 0,
        });
    }
    let mut dropped = None;
    if let Some(first) = walk.damaged.first().cloned() {
        let after: Vec<&ReplayedBatch> = walk
            .out
            .batches
            .iter()
            .filter(|b| b.lsn > first.first)
            .collect();
        let intact_records: u64 = after.iter().map(|b| u64::from(b.record_count)).sum();
        let last_intact = after.last().map(|b| b.lsn);
        match mode {
            RecoveryMode::Strict if first.successor.is_none() => {
                return Err(LogError::Corrupt {
                    lsn: first.first,
                    log_offset: first.at,
                    tail_lsn: bounds.tail_lsn,
                    cause: Box::new(first.cause),
                });
            }
            RecoveryMode::Strict => {
                return Err(LogError::Damaged {
                    first: first.first,
                    last: first.last,
                    log_offset: first.at,
                    intact_batches_after: after.len() as u64,
                    intact_records_after: intact_records,
                    intact_last: last_intact.unwrap_or(first.last),
                    cause: Box::new(first.cause),
                });
            }
            RecoveryMode::TolerateTail => {
                let last = walk
                    .end
                    .lsn
                    .prev()
                    .max(first.last)
                    .max(walk.damaged.last().map_or(first.last, |d| d.last));
                dropped = Some(DroppedLog {
                    first: first.first,
                    last,
                    batches: last.0 - first.first.0 + 1,
                    intact_batches: after.len() as u64,
                    intact_records,
                });
                truncate_at(&mut walk, &first, bounds.head_chain);
            }
            RecoveryMode::SkipCorrupt => {
                let damaged_batches: u64 =
                    walk.damaged.iter().map(|d| d.last.0 - d.first.0 + 1).sum();
                dropped = Some(DroppedLog {
                    first: first.first,
                    last: walk.damaged.last().map_or(first.last, |d| d.last),
                    batches: damaged_batches,
                    intact_batches: 0,
                    intact_records: 0,
                });
                // Damage with no successor (before the tail, unreadable, a
                // log ahead) is where the log ends: not a span to skip.
                walk.damaged.retain(|d| d.successor.is_some());
            }
        }
    }
    let beyond = walk
        .out
        .batches
        .iter()
        .filter(|b| b.lsn > bounds.tail_lsn)
        .count() as u64;
    let head = LogPosition {
        lsn: bounds.head_lsn,
        offset: bounds.head_offset,
    };
    let report = RecoveryReport {
        head,
        superblock_tail_lsn: bounds.tail_lsn,
        end: walk.end,
        batches: walk.out.batches.len() as u64,
        records: walk.out.records,
        record_bytes: walk.out.record_bytes,
        skipped_bytes: walk.skipped_bytes,
        beyond_superblock_tail: beyond,
        stop: walk.stop,
        stop_at_lap_start: walk.stop_at_lap_start,
        truncated: walk.truncated,
        mode,
        damaged: walk.damaged,
        dropped,
    };
    Ok(Replay {
        fs_id: sb.fs_id,
        ring,
        limit,
        batches: walk.out.batches,
        report,
        end_chain: walk.end_chain,
    })
}

/// Keeps only the batches before the damaged range `first` and ends the
/// walk there ([`RecoveryMode::TolerateTail`]).
fn truncate_at(walk: &mut Walk, first: &DamagedRange, head_chain: u32) {
    let keep = walk
        .out
        .batches
        .iter()
        .take_while(|b| b.lsn < first.first)
        .count();
    walk.out.batches.truncate(keep);
    let kept = &walk.out.batches;
    walk.out.records = kept.iter().map(|b| u64::from(b.record_count)).sum();
    walk.out.record_bytes = kept.iter().map(|b| u64::from(b.record_bytes)).sum();
    walk.end_chain = walk.out.batches.last().map_or(head_chain, |b| b.checksum);
    walk.end = LogPosition {
        lsn: first.first,
        offset: first.at,
    };
    walk.stop = first.cause.clone();
    walk.stop_at_lap_start = None;
    walk.truncated = None;
}

/// Position after the accepted batch `h` found at `at`; checks the
/// superblock's tail when passing it.
fn next_position(
    h: &BatchHeader,
    at: LogPosition,
    bounds: LogBounds,
) -> Result<LogPosition, LogError> {
    let end = at.offset + u64::from(h.batch_bytes);
    if at.lsn == bounds.tail_lsn && end != bounds.tail_offset {
        return Err(LogError::TailMismatch {
            tail_lsn: bounds.tail_lsn,
            expected_offset: bounds.tail_offset,
            found_offset: end,
        });
    }
    Ok(LogPosition {
        lsn: at.lsn.next(),
        offset: end,
    })
}
