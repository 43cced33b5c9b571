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
//! Why stopping there loses nothing acknowledged: the writer has at most one
//! batch in flight and writes batch `n + 1` only after batch `n` is durable,
//! so everything before the first damaged batch is intact and nothing after
//! it was acknowledged. A stop at or before the superblock's `log_tail_lsn`
//! contradicts the superblock (those batches were durable when it was
//! written): that is [`LogError::Corrupt`], not a clean end.
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
};
use crate::storage::Storage;

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
    /// A batch there would end more than one region past the head, where
    /// the writer never writes (the chain already spans the region).
    #[error(
        "no batch can start at log offset {log_offset}: it would end more than one log region          past the head"
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
    log_start: u64,
    log_bytes: u64,
    batches: Vec<ReplayedBatch>,
    /// Record bodies back to back.
    data: Vec<u8>,
    /// Per record: index into `batches`, body length.
    records: Vec<(u32, u32)>,
    report: RecoveryReport,
}

impl Replay {
    /// Every record, in LSN order.
    pub fn records(&self) -> ReplayedRecords<'_> {
        ReplayedRecords {
            replay: self,
            index: 0,
            at: 0,
        }
    }

    /// Number of records.
    pub fn record_count(&self) -> usize {
        self.records.len()
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
        (self.log_start, self.log_bytes)
    }
}

/// Iterator over [`Replay::records`].
#[derive(Debug, Clone)]
pub struct ReplayedRecords<'a> {
    replay: &'a Replay,
    index: usize,
    at: usize,
}

impl<'a> Iterator for ReplayedRecords<'a> {
    type Item = ReplayedRecord<'a>;

    fn next(&mut self) -> Option<ReplayedRecord<'a>> {
        let &(batch, len) = self.replay.records.get(self.index)?;
        let batch = self.replay.batches.get(batch as usize)?;
        let end = self.at + len as usize;
        let data = self.replay.data.get(self.at..end)?;
        self.index += 1;
        self.at = end;
        Some(ReplayedRecord {
            lsn: batch.lsn,
            txn_id: batch.txn_id,
            data,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.replay.records.len() - self.index;
        (left, Some(left))
    }
}

impl ExactSizeIterator for ReplayedRecords<'_> {}

/// Reads the log through a window of up to [`REPLAY_READ_BYTES`].
struct Reader<'a, S: Storage + ?Sized> {
    storage: &'a S,
    ring: Ring,
    /// No read reaches this logical offset (`head + log_bytes`).
    limit: u64,
    window_start: u64,
    window: Vec<u8>,
}

impl<S: Storage + ?Sized> Reader<'_, S> {
    /// `len` bytes at logical `offset`; the caller checked that they lie in
    /// one lap and below `limit`.
    fn get(&mut self, offset: u64, len: usize, lsn: Lsn) -> Result<&[u8], LogError> {
        let have = offset >= self.window_start
            && offset + len as u64 <= self.window_start + self.window.len() as u64;
        if !have {
            let ahead = (REPLAY_READ_BYTES as u64)
                .min(self.ring.contiguous(offset))
                .min(self.limit - offset);
            let n = (len as u64).max(ahead) as usize;
            self.window.clear();
            self.window.resize(n, 0);
            self.window_start = offset;
            let physical = self.ring.physical(offset);
            if let Err(source) = self.storage.read(physical, &mut self.window) {
                // Forget the partly filled window.
                self.window.clear();
                return Err(LogError::ReplayRead {
                    lsn,
                    offset: physical,
                    len_bytes: n as u64,
                    source,
                });
            }
        }
        let from = (offset - self.window_start) as usize;
        Ok(&self.window[from..from + len])
    }
}

/// Records being collected.
struct Collector {
    batches: Vec<ReplayedBatch>,
    data: Vec<u8>,
    records: Vec<(u32, u32)>,
    record_bytes: u64,
}

/// Outcome of trying to read the expected batch at one offset.
enum Attempt {
    Accepted(BatchHeader),
    Refused(StopCause, Option<BatchHeader>),
}

/// Tries to decode batch `lsn` at `offset`; on success appends its records
/// to `out`. `larger_than` is the size the batch must exceed (the skipped
/// space, for a lap-start attempt; 0 otherwise).
fn attempt<S: Storage + ?Sized>(
    reader: &mut Reader<'_, S>,
    fs_id: &FsId,
    head_offset: u64,
    offset: u64,
    lsn: Lsn,
    larger_than: u64,
    out: &mut Collector,
) -> Result<Attempt, LogError> {
    if offset + BLOCK_BYTES as u64 > reader.limit {
        return Ok(Attempt::Refused(
            StopCause::RegionFull { log_offset: offset },
            None,
        ));
    }
    let first = reader.get(offset, BLOCK_BYTES, lsn)?;
    let header = match decode_batch_header(first, fs_id, offset) {
        Ok(h) => h,
        Err(e) => return Ok(Attempt::Refused(StopCause::Format(e), None)),
    };
    let refuse = |cause| Ok(Attempt::Refused(cause, Some(header)));
    if header.lsn != lsn.0 {
        return refuse(StopCause::LsnMismatch {
            found: Lsn(header.lsn),
            expected: lsn,
        });
    }
    let batch_bytes = u64::from(header.batch_bytes);
    if batch_bytes > reader.ring.contiguous(offset) {
        return refuse(StopCause::CrossesRegionEnd {
            log_offset: offset,
            batch_bytes: header.batch_bytes,
        });
    }
    if offset + batch_bytes > reader.limit {
        return refuse(StopCause::BeyondHead {
            log_offset: offset,
            batch_bytes: header.batch_bytes,
            head_offset,
        });
    }
    if batch_bytes <= larger_than {
        return refuse(StopCause::NotALapSkip {
            log_offset: offset,
            batch_bytes: header.batch_bytes,
            skipped_bytes: larger_than,
        });
    }
    let full = reader.get(offset, header.batch_bytes as usize, lsn)?;
    let view = match decode_batch(full, fs_id, offset) {
        Ok(v) => v,
        Err(e) => return refuse(StopCause::Format(e)),
    };
    let index = out.batches.len() as u32;
    for record in view.records() {
        out.data.extend_from_slice(record);
        // A record is shorter than its batch (at most 16 MiB).
        out.records.push((index, record.len() as u32));
        out.record_bytes += record.len() as u64;
    }
    out.batches.push(ReplayedBatch {
        lsn,
        txn_id: header.txn_id,
        log_offset: offset,
        batch_bytes: header.batch_bytes,
        record_count: header.record_count,
    });
    Ok(Attempt::Accepted(header))
}

/// Replays the log of `sb` from its head; see the module docs. Returns every
/// record of the valid chain of batches and a report of where and why it
/// ends. Errors: [`LogError::Region`] if the superblock's log region is
/// unusable on this storage, [`LogError::ReplayRead`] on a read error,
/// [`LogError::Corrupt`] / [`LogError::TailMismatch`] if the log ends or
/// diverges before the superblock's durable tail.
pub fn replay<S: Storage + ?Sized>(storage: &S, sb: &Superblock) -> Result<Replay, LogError> {
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
    let head = LogPosition {
        lsn: bounds.head_lsn,
        offset: bounds.head_offset,
    };
    let mut reader = Reader {
        storage,
        ring,
        limit: head.offset.saturating_add(ring.len),
        window_start: 0,
        window: Vec::new(),
    };
    let mut out = Collector {
        batches: Vec::new(),
        data: Vec::new(),
        records: Vec::new(),
        record_bytes: 0,
    };
    let mut pos = head;
    let mut skipped_bytes = 0u64;
    let (stop, stop_at_lap_start, truncated) = loop {
        let (cause, header) = match attempt(
            &mut reader,
            &sb.fs_id,
            head.offset,
            pos.offset,
            pos.lsn,
            0,
            &mut out,
        )? {
            Attempt::Accepted(h) => {
                pos = next_position(&h, pos, bounds)?;
                continue;
            }
            Attempt::Refused(cause, header) => (cause, header),
        };
        let mut lap = None;
        if !pos.offset.is_multiple_of(ring.len) {
            let lap_start = ring.next_lap(pos.offset);
            let skipped = lap_start - pos.offset;
            match attempt(
                &mut reader,
                &sb.fs_id,
                head.offset,
                lap_start,
                pos.lsn,
                skipped,
                &mut out,
            )? {
                Attempt::Accepted(h) => {
                    skipped_bytes += skipped;
                    pos = next_position(
                        &h,
                        LogPosition {
                            lsn: pos.lsn,
                            offset: lap_start,
                        },
                        bounds,
                    )?;
                    continue;
                }
                Attempt::Refused(lap_cause, lap_header) => {
                    lap = Some((lap_start, lap_cause, lap_header))
                }
            }
        }
        // The abandoned batch: whichever place had an intact header for
        // this LSN.
        let truncated = [
            header.map(|h| (pos.offset, h)),
            lap.as_ref().and_then(|(o, _, h)| h.map(|h| (*o, h))),
        ]
        .into_iter()
        .flatten()
        .find(|(_, h)| h.lsn == pos.lsn.0)
        .map(|(log_offset, h)| TruncatedBatch {
            lsn: Lsn(h.lsn),
            log_offset,
            batch_bytes: h.batch_bytes,
        });
        break (cause, lap.map(|(o, c, _)| (o, c)), truncated);
    };
    if pos.lsn <= bounds.tail_lsn {
        return Err(LogError::Corrupt {
            lsn: pos.lsn,
            log_offset: pos.offset,
            tail_lsn: bounds.tail_lsn,
            cause: Box::new(stop),
        });
    }
    let beyond = out
        .batches
        .iter()
        .filter(|b| b.lsn > bounds.tail_lsn)
        .count() as u64;
    let report = RecoveryReport {
        head,
        superblock_tail_lsn: bounds.tail_lsn,
        end: pos,
        batches: out.batches.len() as u64,
        records: out.records.len() as u64,
        record_bytes: out.record_bytes,
        skipped_bytes,
        beyond_superblock_tail: beyond,
        stop,
        stop_at_lap_start,
        truncated,
    };
    Ok(Replay {
        fs_id: sb.fs_id,
        log_start: sb.log_start,
        log_bytes: sb.log_bytes,
        batches: out.batches,
        data: out.data,
        records: out.records,
        report,
    })
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
