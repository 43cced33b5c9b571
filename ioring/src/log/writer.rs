//! [`RefLog`]: record assignment, group commit, ring space and the failure
//! latch.
//!
//! # State machine
//!
//! All state is in one mutex ([`State`]); I/O is done without it.
//!
//! - `open`: the batch currently accepting records. Its LSN, logical offset
//!   and capacity are fixed when it is opened (by the first record that
//!   does not fit in the previous batch), so [`RefLog::append`] can return
//!   the LSN at once.
//! - `sealed`: batches closed because they were full, in LSN order, waiting
//!   to be written.
//! - `writing`: the LSN of the batch the leader is writing, if any. Only the
//!   leader writes, one batch at a time, in LSN order.
//! - `durable_lsn` / `durable_end`: the last durable batch and where it ends.
//! - `head` and `spans`: the first batch still needed and the spans of the
//!   durable batches from it on; [`RefLog::trim`] advances the head.
//!
//! Invariants (checked in debug builds by [`State::check`]):
//!
//! - LSNs of `spans`, the batch being written, `sealed` and `open` are
//!   consecutive and increasing, and so are their offsets.
//! - Everything assigned ends at most `head.offset + len`: a batch is
//!   opened or grown only where it overwrites nothing a replay from the head
//!   could need (otherwise `append` waits for [`RefLog::trim`]), so the
//!   leader never waits for space and `used_bytes() <= log_bytes()`.
//! - `queued_records` / `queued_bytes` count exactly the records of the
//!   batch being written, `sealed` and `open`.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::replay::Replay;
use super::ring::Ring;
use super::{Durability, LogBounds, LogConfig, LogError, LogPosition, LogStats, Lsn};
use crate::format::{
    batch_bytes_for_payload, batch_checksum, encode_batch, framed_record_bytes, BatchId, FsId,
    Superblock, LOG_BATCH_HEADER_BYTES,
};
use crate::storage::{IoOp, Storage, StorageError};

/// How often an append waiting for ring space checks whether the storage
/// failed (in which case no trim will ever come).
const SPACE_WAIT_POLL: Duration = Duration::from_millis(100);

/// A batch accepting records (`open`) or waiting to be written (`sealed`).
#[derive(Debug)]
struct PendingBatch {
    lsn: Lsn,
    /// Logical log offset, fixed at opening.
    offset: u64,
    txn_id: u64,
    /// Largest `batch_bytes` this batch may grow to: the batch cap, or less
    /// near the physical end of the region.
    cap_bytes: usize,
    /// Sum of the framed sizes of the records.
    payload_bytes: usize,
    /// Record bodies back to back.
    data: Vec<u8>,
    /// Length of each record body, in order.
    lens: Vec<u32>,
}

impl PendingBatch {
    fn batch_bytes(&self) -> usize {
        // `payload_bytes` never makes the batch exceed `cap_bytes` (checked
        // before each record is added), so this cannot be `None`.
        batch_bytes_for_payload(self.payload_bytes).unwrap_or(usize::MAX)
    }

    fn end(&self) -> u64 {
        self.offset + self.batch_bytes() as u64
    }

    fn fits(&self, framed: usize) -> bool {
        matches!(batch_bytes_for_payload(self.payload_bytes + framed), Some(b) if b <= self.cap_bytes)
    }

    fn push(&mut self, record: &[u8], framed: usize) {
        self.data.extend_from_slice(record);
        // The caller checked that the record fits in a batch (< 16 MiB).
        self.lens.push(record.len() as u32);
        self.payload_bytes += framed;
    }

    fn records(&self) -> Vec<&[u8]> {
        let mut out = Vec::with_capacity(self.lens.len());
        let mut at = 0usize;
        for &len in &self.lens {
            let end = at + len as usize;
            out.push(&self.data[at..end]);
            at = end;
        }
        out
    }
}

/// A durable batch that is not trimmed yet.
#[derive(Debug, Clone, Copy)]
struct Span {
    lsn: Lsn,
    offset: u64,
    bytes: u64,
    /// Its header checksum: the chain link of the batch after it.
    checksum: u32,
}

#[derive(Debug)]
struct State {
    open: Option<PendingBatch>,
    sealed: VecDeque<PendingBatch>,
    /// LSN of the next batch to open.
    next_lsn: Lsn,
    /// End of the last sealed (or written) batch: where the next batch is
    /// placed from.
    next_offset: u64,
    txn_id: u64,
    queued_records: usize,
    queued_bytes: usize,
    /// The batch the leader is writing.
    writing: Option<Lsn>,
    durable_lsn: Lsn,
    durable_end: u64,
    head: LogPosition,
    /// Chain link the batch at the head carries (`log_head_chain`).
    head_chain: u32,
    /// Chain link of the next batch written: the checksum of the last
    /// durable batch (of the head's if none since).
    durable_chain: u32,
    spans: VecDeque<Span>,
    failed: Option<LogError>,
    stats: LogStats,
    /// Size of the region (for the invariant checks).
    log_bytes: u64,
}

impl State {
    /// End of everything assigned so far (open batch included).
    fn assigned_end(&self) -> u64 {
        match &self.open {
            Some(open) => open.end(),
            None => self.next_offset,
        }
    }

    /// Head offset and chain link a checkpoint covering every batch below
    /// `upto` records: the end and checksum of batch `upto - 1`, or the
    /// current head's.
    fn head_for(&self, upto: Lsn) -> Result<(u64, u32), LogError> {
        if upto < self.head.lsn {
            return Err(LogError::AlreadyTrimmed {
                lsn: upto,
                head: self.head.lsn,
            });
        }
        if upto > self.durable_lsn.next() {
            return Err(LogError::TrimBeyondDurable {
                upto,
                durable: self.durable_lsn,
            });
        }
        if upto == self.head.lsn {
            return Ok((self.head.offset, self.head_chain));
        }
        // head.lsn < upto <= durable + 1, and spans hold head.lsn..=durable.
        let index = (upto.0 - 1 - self.head.lsn.0) as usize;
        let span = self.spans.get(index);
        assert!(
            span.is_some_and(|s| s.lsn == upto.prev()),
            "no span for {} (head {}, durable {})",
            upto.prev(),
            self.head.lsn,
            self.durable_lsn
        );
        Ok(span.map_or((0, 0), |s| (s.offset + s.bytes, s.checksum)))
    }

    /// Debug-build check of the invariants in the module docs.
    fn check(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let mut lsn = self.head.lsn;
        let mut end = self.head.offset;
        for s in &self.spans {
            debug_assert_eq!(s.lsn, lsn, "spans are consecutive");
            debug_assert!(s.offset >= end, "spans are ordered");
            end = s.offset + s.bytes;
            lsn = lsn.next();
        }
        debug_assert_eq!(lsn, self.durable_lsn.next());
        debug_assert_eq!(end, self.durable_end);
        debug_assert!(self.assigned_end() >= self.head.offset);
        debug_assert!(self.assigned_end() <= self.head.offset + self.log_bytes);
        if self.failed.is_some() {
            // The failed batch left a hole; nothing pending will be written.
            return;
        }
        let mut next = self.durable_lsn.next();
        if let Some(w) = self.writing {
            debug_assert_eq!(w, next, "the batch in flight follows the durable one");
            next = next.next();
        }
        let mut records = 0;
        for b in self.sealed.iter().chain(self.open.iter()) {
            debug_assert_eq!(b.lsn, next, "pending batches are consecutive");
            next = next.next();
            records += b.lens.len();
        }
        debug_assert_eq!(next, self.next_lsn);
        if self.writing.is_none() {
            debug_assert_eq!(records, self.queued_records);
        } else {
            debug_assert!(records <= self.queued_records);
        }
    }
}

/// Shared part of a [`RefLog`] and its [`Ticket`]s.
struct Inner<S: Storage> {
    storage: S,
    ring: Ring,
    fs_id: FsId,
    config: LogConfig,
    batch_bytes_cap: usize,
    record_bytes_max: usize,
    state: Mutex<State>,
    /// Signalled on every durable advance, leader step-down, trim and
    /// failure.
    changed: Condvar,
    /// Mirrors of `used_bytes` and `failed.is_some()` (and `durable_lsn`
    /// below), stored under the
    /// lock by every section that changes them ([`Inner::publish`]), so
    /// that the per-op checks of a caller need not take the lock.
    used_mirror: AtomicU64,
    failed_mirror: AtomicBool,
    /// Mirror of `durable_lsn`, for [`Ticket::is_durable`].
    durable_mirror: AtomicU64,
}

/// The append side of the ref log; see the module docs of
/// [`crate::log`]. Cloning gives another handle to the same log, so threads
/// can share it without an extra `Arc`.
pub struct RefLog<S: Storage> {
    inner: Arc<Inner<S>>,
}

impl<S: Storage> Clone for RefLog<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Storage> fmt::Debug for RefLog<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("RefLog")
            .field("device", &self.inner.storage.device_name())
            .field("log_start", &self.inner.ring.start)
            .field("log_bytes", &self.inner.ring.len)
            .field("head", &st.head)
            .field("durable_lsn", &st.durable_lsn)
            .field("next_lsn", &st.next_lsn)
            .field("failed", &st.failed.is_some())
            .finish()
    }
}

/// Proof that a record was assigned to batch [`Ticket::lsn`]; wait on it to
/// learn when the record is durable. Holds the log alive.
pub struct Ticket<S: Storage> {
    lsn: Lsn,
    inner: Arc<Inner<S>>,
}

impl<S: Storage> fmt::Debug for Ticket<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("lsn", &self.lsn).finish()
    }
}

impl<S: Storage> Ticket<S> {
    /// LSN of the batch holding the record.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Returns once the record is durable, writing batches as the leader if
    /// no write is in progress. `Err(Failed)` if the log failed before the
    /// record became durable.
    pub fn wait(&self) -> Result<Lsn, LogError> {
        self.inner.wait_durable(self.lsn)?;
        Ok(self.lsn)
    }

    /// True if the record is durable now (never blocks, takes no lock).
    pub fn is_durable(&self) -> bool {
        self.inner.durable_mirror.load(Ordering::Acquire) >= self.lsn.0
    }
}

/// Unlatches leadership if the leader unwinds, so that waiters are not left
/// waiting forever; the log is then failed (its in-flight batch is lost).
struct LeaderGuard<'a, S: Storage> {
    inner: &'a Inner<S>,
    lsn: Lsn,
    armed: bool,
}

impl<S: Storage> Drop for LeaderGuard<'_, S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.inner.lock();
        st.writing = None;
        if st.failed.is_none() {
            st.failed = Some(LogError::Failed {
                device: self.inner.storage.device_name().to_string(),
                op: IoOp::WriteDurable,
                offset: 0,
                len_bytes: 0,
                lsn: self.lsn,
                cause: Arc::new(io::Error::other("the log leader panicked while writing")),
            });
        }
        self.inner.publish(&st);
        drop(st);
        self.inner.changed.notify_all();
    }
}

impl<S: Storage> Inner<S> {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before it can
        // panic (there is no I/O under the lock), so a poisoned lock still
        // guards a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores the lock-free mirrors of `st` (call under the lock after a
    /// change to the assigned end, the head or the failure).
    fn publish(&self, st: &State) {
        self.used_mirror
            .store(st.assigned_end() - st.head.offset, Ordering::Release);
        self.failed_mirror
            .store(st.failed.is_some(), Ordering::Release);
        self.durable_mirror
            .store(st.durable_lsn.0, Ordering::Release);
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(st).unwrap_or_else(|p| p.into_inner())
    }

    fn too_large(&self, len_bytes: usize) -> LogError {
        LogError::RecordTooLarge {
            len_bytes,
            record_bytes_max: self.record_bytes_max,
            batch_bytes_cap: self.batch_bytes_cap,
            log_bytes: self.ring.len,
        }
    }

    /// Assigns `record` to a batch; blocks only on the queue bounds.
    fn append(&self, record: &[u8]) -> Result<Lsn, LogError> {
        if record.len() > self.record_bytes_max {
            return Err(self.too_large(record.len()));
        }
        let framed = framed_record_bytes(record.len());
        let mut st = self.lock();
        let (mut waited_queue, mut waited_space) = (false, false);
        loop {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            let over_queue = st.queued_records > 0
                && (st.queued_records >= self.config.queued_records_max
                    || st.queued_bytes + framed > self.config.queued_bytes_max);
            let over_space = self.end_after_append(&st, framed) > st.head.offset + self.ring.len;
            if !over_queue && !over_space {
                break;
            }
            if over_queue && !waited_queue {
                st.stats.backpressure_waits += 1;
                waited_queue = true;
            }
            if over_space && !waited_space {
                st.stats.space_waits += 1;
                waited_space = true;
            }
            let pending = !st.sealed.is_empty() || st.open.is_some();
            st = if st.writing.is_none() && pending {
                // Nobody is draining the queue: write the oldest batch. Its
                // records become durable, so a checkpoint can trim them.
                self.lead_one(st)
            } else {
                // A leader is writing (it wakes us), or everything assigned
                // is durable and only a trim can make room.
                self.wait_polling(st)
            };
        }
        let open_fits = st.open.as_ref().is_some_and(|o| o.fits(framed));
        if !open_fits {
            self.seal(&mut st);
            self.open_batch(&mut st, framed);
        }
        let open = st.open.as_mut().expect("a batch is open after open_batch");
        open.push(record, framed);
        let lsn = open.lsn;
        st.queued_records += 1;
        st.queued_bytes += framed;
        st.check();
        self.publish(&st);
        Ok(lsn)
    }

    /// Logical offset where everything assigned would end if `framed`
    /// bytes were appended now (the same placement `append` then does).
    fn end_after_append(&self, st: &State, framed: usize) -> u64 {
        let single = batch_bytes_for_payload(framed).unwrap_or(usize::MAX) as u64;
        match &st.open {
            Some(open) if open.fits(framed) => {
                let grown = batch_bytes_for_payload(open.payload_bytes + framed);
                open.offset + grown.unwrap_or(usize::MAX) as u64
            }
            Some(open) => self.ring.place(open.end(), single) + single,
            None => self.ring.place(st.next_offset, single) + single,
        }
    }

    /// Waits for a change, but wakes up every [`SPACE_WAIT_POLL`] to check
    /// whether the storage failed elsewhere (for example the checkpoint's
    /// superblock write): then no trim will come, and the log latches
    /// instead of hanging.
    fn wait_polling<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let mut st = self
            .changed
            .wait_timeout(st, SPACE_WAIT_POLL)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        if st.failed.is_none() {
            if let Some(f) = self.storage.failure() {
                st.failed = Some(LogError::Failed {
                    device: f.device,
                    op: f.op,
                    offset: f.offset,
                    len_bytes: f.len_bytes,
                    lsn: st.durable_lsn.next(),
                    cause: f.cause,
                });
                self.publish(&st);
                self.changed.notify_all();
            }
        }
        st
    }

    /// Closes the open batch, if any, queueing it for the leader.
    fn seal(&self, st: &mut State) {
        if let Some(open) = st.open.take() {
            st.next_offset = open.end();
            st.sealed.push_back(open);
        }
    }

    /// Opens a batch for a first record of `framed` bytes at the place the
    /// wrap rule gives.
    fn open_batch(&self, st: &mut State, framed: usize) {
        debug_assert!(st.open.is_none());
        let first = batch_bytes_for_payload(framed).unwrap_or(usize::MAX);
        debug_assert!(first <= self.batch_bytes_cap);
        let offset = self.ring.place(st.next_offset, first as u64);
        st.stats.skipped_bytes += offset - st.next_offset;
        let contiguous = self.ring.contiguous(offset).min(usize::MAX as u64) as usize;
        let lsn = st.next_lsn;
        st.next_lsn = lsn.next();
        st.open = Some(PendingBatch {
            lsn,
            offset,
            txn_id: st.txn_id,
            cap_bytes: self.batch_bytes_cap.min(contiguous),
            payload_bytes: 0,
            data: Vec::new(),
            lens: Vec::new(),
        });
    }

    /// Becomes the leader for one batch: takes the oldest batch not yet
    /// durable (sealing the open one if it is the oldest), writes it without
    /// the lock and publishes the result. The
    /// caller checked that no write is in progress. Returns the relocked
    /// state; a failure is recorded in `failed`.
    fn lead_one<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        debug_assert!(st.writing.is_none());
        if st.sealed.is_empty() {
            self.seal(&mut st);
        }
        let Some(batch) = st.sealed.pop_front() else {
            return st;
        };
        st.writing = Some(batch.lsn);
        let end = batch.end();
        // `append` assigns a batch only where it ends at most one region
        // past the head, and the head only moves forward.
        assert!(
            end <= st.head.offset + self.ring.len,
            "{} at log offset {} ends at {end}, past head {} + {} bytes",
            batch.lsn,
            batch.offset,
            st.head.offset,
            self.ring.len
        );
        let prev_checksum = st.durable_chain;
        let result = match st.failed.clone() {
            Some(e) => Err(e),
            None => {
                drop(st);
                // Armed only while the lock is not held, so its `Drop` can
                // take the lock.
                let mut guard = LeaderGuard {
                    inner: self,
                    lsn: batch.lsn,
                    armed: true,
                };
                let started = std::time::Instant::now();
                let r = self.write(&batch, prev_checksum);
                let took = started.elapsed();
                guard.armed = false;
                drop(guard);
                st = self.lock();
                st.stats.write_latency.record(took);
                r
            }
        };
        st.writing = None;
        let records = batch.lens.len();
        st.queued_records -= records;
        st.queued_bytes -= batch.payload_bytes;
        match result {
            Ok(checksum) => {
                let bytes = batch.batch_bytes() as u64;
                st.durable_lsn = batch.lsn;
                st.durable_end = end;
                st.durable_chain = checksum;
                st.spans.push_back(Span {
                    lsn: batch.lsn,
                    offset: batch.offset,
                    bytes,
                    checksum,
                });
                let s = &mut st.stats;
                s.batches_written += 1;
                s.records_written += records as u64;
                s.record_bytes_written += batch.data.len() as u64;
                s.batch_bytes_written += bytes;
                s.records_per_batch_max = s.records_per_batch_max.max(records as u64);
            }
            Err(e) => {
                // The batch's records are lost, never acknowledged.
                if st.failed.is_none() {
                    st.failed = Some(e);
                }
            }
        }
        st.check();
        self.publish(&st);
        self.changed.notify_all();
        st
    }

    /// Encodes and durably writes one batch chained to `prev_checksum` (the
    /// batch before it is durable: one batch in flight); returns its header
    /// checksum. Called by the leader only, without the lock.
    fn write(&self, batch: &PendingBatch, prev_checksum: u32) -> Result<u32, LogError> {
        let physical = self.ring.physical(batch.offset);
        let expected = batch.batch_bytes();
        let fail = |op: IoOp, len_bytes: u64, cause: io::Error| LogError::Failed {
            device: self.storage.device_name().to_string(),
            op,
            offset: physical,
            len_bytes,
            lsn: batch.lsn,
            cause: Arc::new(cause),
        };
        let records = batch.records();
        let id = BatchId {
            fs_id: self.fs_id,
            lsn: batch.lsn.0,
            txn_id: batch.txn_id,
            log_offset: batch.offset,
            prev_checksum,
        };
        let buf = encode_batch(&id, &records)
            .map_err(|e| fail(IoOp::Write, expected as u64, io::Error::other(e)))?;
        // Postconditions of the wrap rule and of the sizing done at append.
        if buf.len() != expected || (buf.len() as u64) > self.ring.contiguous(batch.offset) {
            return Err(fail(
                IoOp::Write,
                buf.len() as u64,
                io::Error::other(format!(
                    "internal: batch of {} bytes (expected {expected}) at log offset {} crosses \
                     the region end or was mis-sized",
                    buf.len(),
                    batch.offset
                )),
            ));
        }
        let io_result = match self.config.durability {
            Durability::WriteDurable => self.storage.write_durable(physical, &buf),
            Durability::WriteThenFlush => self
                .storage
                .write(physical, &buf)
                .and_then(|()| self.storage.flush()),
        };
        io_result.map_err(|e| {
            storage_failure(
                e,
                self.storage.device_name(),
                IoOp::Write,
                batch.lsn,
                physical,
                buf.len() as u64,
            )
        })?;
        Ok(batch_checksum(&buf))
    }

    /// Blocks until `target` is durable, leading writes when nobody else is.
    fn wait_durable(&self, target: Lsn) -> Result<(), LogError> {
        let mut st = self.lock();
        // Only assigned LSNs can become durable.
        let target = target.min(st.next_lsn.prev());
        loop {
            // A batch that became durable before a failure stays
            // acknowledged: it is on the media.
            if target <= st.durable_lsn {
                return Ok(());
            }
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            st = if st.writing.is_none() {
                self.lead_one(st)
            } else {
                self.wait(st)
            };
        }
    }
}

impl<S: Storage> RefLog<S> {
    /// Opens the log for appending after [`super::replay`]: appending
    /// continues at the LSN and offset where replay stopped, overwriting
    /// the damaged tail if any.
    ///
    /// `replay` must come from `sb` on this storage. Opening flushes the
    /// device once, so that the replayed tail (which a process crash may
    /// have left only in the device's volatile cache) is durable before
    /// anything is written after it.
    pub fn open(
        storage: S,
        sb: &Superblock,
        replay: &Replay,
        config: LogConfig,
    ) -> Result<Self, LogError> {
        config.check()?;
        let ring = Ring::new(sb.log_start, sb.log_bytes).map_err(|reason| LogError::Region {
            device: storage.device_name().to_string(),
            reason,
        })?;
        let bounds = LogBounds::of(sb);
        let report = replay.report();
        let head = LogPosition {
            lsn: bounds.head_lsn,
            offset: bounds.head_offset,
        };
        if replay.fs_id() != sb.fs_id
            || replay.log_region() != (sb.log_start, sb.log_bytes)
            || report.head != head
        {
            return Err(LogError::ReplayMismatch {
                reason: format!(
                    "replay of fs {} log {:?} from {} vs superblock fs {} log {:?} head {}",
                    replay.fs_id(),
                    replay.log_region(),
                    report.head,
                    sb.fs_id,
                    (sb.log_start, sb.log_bytes),
                    head
                ),
            });
        }
        let batch_bytes_cap = ring.batch_bytes_cap(config.batch_bytes_max);
        let record_bytes_max = record_bytes_max_for(batch_bytes_cap);
        storage.flush().map_err(|e| {
            storage_failure(e, storage.device_name(), IoOp::Flush, report.end.lsn, 0, 0)
        })?;
        let spans: VecDeque<Span> = replay
            .spans()
            .into_iter()
            .map(|(lsn, offset, bytes, checksum)| Span {
                lsn,
                offset,
                bytes,
                checksum,
            })
            .collect();
        let end = report.end;
        let state = State {
            open: None,
            sealed: VecDeque::new(),
            next_lsn: end.lsn,
            next_offset: end.offset,
            txn_id: sb.last_txn_id.saturating_add(1),
            queued_records: 0,
            queued_bytes: 0,
            writing: None,
            durable_lsn: end.lsn.prev(),
            durable_end: end.offset,
            head,
            head_chain: bounds.head_chain,
            durable_chain: replay.end_chain(),
            spans,
            failed: None,
            stats: LogStats::default(),
            log_bytes: ring.len,
        };
        state.check();
        let used = state.assigned_end() - state.head.offset;
        Ok(Self {
            inner: Arc::new(Inner {
                used_mirror: AtomicU64::new(used),
                failed_mirror: AtomicBool::new(false),
                durable_mirror: AtomicU64::new(state.durable_lsn.0),
                fs_id: sb.fs_id,
                storage,
                ring,
                config,
                batch_bytes_cap,
                record_bytes_max,
                state: Mutex::new(state),
                changed: Condvar::new(),
            }),
        })
    }

    /// Assigns `record` to the open batch and returns its ticket without
    /// waiting for I/O. Blocks only when a queue bound of [`LogConfig`] is
    /// reached or when the record's batch would not fit in the ring before
    /// the head (until [`RefLog::trim`] frees space); while blocked, it
    /// writes the oldest pending batch itself if no write is in progress, so
    /// that a checkpoint can cover and trim it. A record appended is written when someone waits for it or
    /// for a later LSN ([`Ticket::wait`], [`RefLog::sync`]) or when the
    /// queue bounds force a write; records nobody waits for may stay queued.
    pub fn append(&self, record: &[u8]) -> Result<Ticket<S>, LogError> {
        let lsn = self.inner.append(record)?;
        Ok(Ticket {
            lsn,
            inner: Arc::clone(&self.inner),
        })
    }

    /// Appends `record` and returns once it is durable, with its LSN.
    pub fn append_durable(&self, record: &[u8]) -> Result<Lsn, LogError> {
        let lsn = self.inner.append(record)?;
        self.inner.wait_durable(lsn)?;
        Ok(lsn)
    }

    /// Makes every record appended before the call durable; returns the
    /// durable LSN.
    pub fn sync(&self) -> Result<Lsn, LogError> {
        let target = self.inner.lock().next_lsn.prev();
        self.inner.wait_durable(target)?;
        Ok(self.durable_lsn())
    }

    /// Blocks until every batch up to `lsn` is durable (see
    /// [`Ticket::wait`]). An `lsn` never assigned is clamped to the last
    /// assigned one.
    pub fn wait_for(&self, lsn: Lsn) -> Result<(), LogError> {
        self.inner.wait_durable(lsn)
    }

    /// The last durable LSN: every record of every batch up to it is on the
    /// media.
    pub fn durable_lsn(&self) -> Lsn {
        self.inner.lock().durable_lsn
    }

    /// The first batch still needed (not trimmed) and its offset.
    pub fn head(&self) -> LogPosition {
        self.inner.lock().head
    }

    /// What a checkpoint covering every batch below `upto` must record in
    /// the superblock: head at batch `upto`, tail at the last durable batch.
    /// `upto` must be in `head_lsn..=durable_lsn + 1`. Write these bounds
    /// durably in the superblock *before* calling [`RefLog::trim`] with the
    /// same `upto`.
    pub fn bounds(&self, upto: Lsn) -> Result<LogBounds, LogError> {
        let st = self.inner.lock();
        let (head_offset, head_chain) = st.head_for(upto)?;
        Ok(LogBounds {
            head_offset,
            head_lsn: upto,
            tail_offset: st.durable_end,
            tail_lsn: st.durable_lsn,
            head_chain,
        })
    }

    /// Releases the log space of every batch below `upto`: their records
    /// are covered by a checkpoint whose superblock (with
    /// [`RefLog::bounds`]`(upto)`) is already durable. Wakes appends
    /// waiting for space. A `upto` at or below the head is a no-op; above
    /// `durable_lsn + 1` it is [`LogError::TrimBeyondDurable`]. Returns the
    /// new head.
    pub fn trim(&self, upto: Lsn) -> Result<LogPosition, LogError> {
        let mut st = self.inner.lock();
        if upto <= st.head.lsn {
            return Ok(st.head);
        }
        let (offset, chain) = st.head_for(upto)?;
        while st.spans.front().is_some_and(|s| s.lsn < upto) {
            st.spans.pop_front();
        }
        st.head = LogPosition { lsn: upto, offset };
        st.head_chain = chain;
        st.check();
        self.inner.publish(&st);
        let head = st.head;
        drop(st);
        self.inner.changed.notify_all();
        Ok(head)
    }

    /// Bytes of the region in use: from the head to the end of everything
    /// assigned (durable, in flight, queued and the open batch, including
    /// lap skips). Never exceeds [`RefLog::log_bytes`].
    /// Lock-free: the value stored by the last change under the lock (a
    /// caller that must see a given append's bytes orders its read after
    /// that append, as [`RefLog::append`]'s return does for its own).
    pub fn used_bytes(&self) -> u64 {
        self.inner.used_mirror.load(Ordering::Acquire)
    }

    /// Bytes of the region not in use: `log_bytes - used_bytes`. Appends
    /// block when the next record's batch does not fit in it.
    pub fn free_bytes(&self) -> u64 {
        self.inner.ring.len.saturating_sub(self.used_bytes())
    }

    /// Size of the log region in bytes.
    pub fn log_bytes(&self) -> u64 {
        self.inner.ring.len
    }

    /// Largest batch this log writes (see [`LogConfig::batch_bytes_max`]).
    pub fn batch_bytes_cap(&self) -> usize {
        self.inner.batch_bytes_cap
    }

    /// Largest record this log accepts.
    pub fn record_bytes_max(&self) -> usize {
        self.inner.record_bytes_max
    }

    /// Transaction id written in the header of batches opened from now on;
    /// initially the superblock's `last_txn_id + 1`. The log does not
    /// interpret it.
    pub fn txn_id(&self) -> u64 {
        self.inner.lock().txn_id
    }

    /// Sets the transaction id of later batches. The open batch is sealed
    /// first, so every record of a batch was appended under the batch's
    /// `txn_id`. Ids never go back ([`LogError::TxnIdBackwards`]).
    pub fn set_txn_id(&self, txn_id: u64) -> Result<(), LogError> {
        let mut st = self.inner.lock();
        if txn_id < st.txn_id {
            return Err(LogError::TxnIdBackwards {
                current: st.txn_id,
                requested: txn_id,
            });
        }
        if txn_id != st.txn_id {
            self.inner.seal(&mut st);
            st.txn_id = txn_id;
        }
        Ok(())
    }

    /// Closes the open batch and returns the *cut*: every record appended
    /// before the call has a lower LSN, every record appended after has
    /// this LSN or a higher one. A checkpoint that reflects exactly the
    /// records appended before the cut covers the batches below it:
    /// [`RefLog::bounds`] and [`RefLog::trim`] with the cut, once every
    /// batch below it is durable ([`RefLog::wait_for`]`(cut.prev())`).
    pub fn seal(&self) -> Lsn {
        let mut st = self.inner.lock();
        self.inner.seal(&mut st);
        st.next_lsn
    }

    /// The latched failure, if any.
    pub fn failure(&self) -> Option<LogError> {
        if !self.inner.failed_mirror.load(Ordering::Acquire) {
            return None;
        }
        self.inner.lock().failed.clone()
    }

    /// Counters and the current queue.
    pub fn stats(&self) -> LogStats {
        let st = self.inner.lock();
        let mut s = st.stats;
        s.queued_records = st.queued_records as u64;
        s.queued_bytes = st.queued_bytes as u64;
        s
    }

    /// The storage the log writes to.
    pub fn storage(&self) -> &S {
        &self.inner.storage
    }
}

/// Largest record body whose single-record batch fits in `cap` bytes.
fn record_bytes_max_for(cap: usize) -> usize {
    let room = cap.saturating_sub(LOG_BATCH_HEADER_BYTES);
    (1..=crate::format::LOG_RECORD_LEN_BYTES_MAX)
        .filter_map(|prefix| {
            let body = room.checked_sub(prefix)?;
            (framed_record_bytes(body) <= room).then_some(body)
        })
        .max()
        .unwrap_or(0)
}

/// The log's view of a storage error: a latched storage failure keeps its
/// device, operation and range and gains the batch's LSN; any other storage
/// error (an argument the storage refused: misaligned, out of bounds) is
/// reported as a failure of `op` at `offset` on `device`.
fn storage_failure(
    e: StorageError,
    device: &str,
    op: IoOp,
    lsn: Lsn,
    offset: u64,
    len_bytes: u64,
) -> LogError {
    match e {
        StorageError::Failed {
            device,
            op,
            offset,
            len_bytes,
            cause,
        } => LogError::Failed {
            device,
            op,
            offset,
            len_bytes,
            lsn,
            cause,
        },
        other => LogError::Failed {
            device: device.to_string(),
            op,
            offset,
            len_bytes,
            lsn,
            cause: Arc::new(io::Error::new(io::ErrorKind::InvalidInput, other)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_record_fills_the_cap_exactly() {
        for cap in [4096usize, 8192, 1 << 20, 16 << 20] {
            let max = record_bytes_max_for(cap);
            assert_eq!(batch_bytes_for_payload(framed_record_bytes(max)), Some(cap));
            assert!(!matches!(
                batch_bytes_for_payload(framed_record_bytes(max + 1)),
                Some(b) if b <= cap
            ));
        }
        assert_eq!(record_bytes_max_for(4096), 4096 - 80 - 2);
    }
}
