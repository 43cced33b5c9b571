//! [`UringStorage`]: the [`Storage`] implementation on io_uring.
//!
//! # Design
//!
//! A few rings per device ([`UringConfig::rings`]), each behind its own
//! mutex: a call takes a free ring (or waits for one), submits its whole
//! batch with bounded concurrency, waits for every completion and unlocks.
//! More than one ring lets a small durable log write proceed while a
//! commit's large node write or a cache-miss read holds another one; with
//! a single ring the log's group commit waited behind ~100 MB of node
//! writes every commit.
//!
//! The durability rule needs no ordering between rings: a `flush` submits
//! one `Fsync` after every write of *its own call chain* completed, and the
//! [`Storage`] contract promises only the writes that completed before
//! `flush` was called, whichever ring carried them (a device cache flush
//! covers every completed write). A write still in flight on another ring
//! is not covered, and nothing relies on it: each caller flushes (or writes
//! `RWF_DSYNC`) after its own writes completed, never relying on the
//! completion order of unlinked SQEs.
//!
//! **Buffers.** The engine owns a pool of `queue_depth` slots of
//! `slot_bytes` each, carved from one [`AlignedBuf`] and registered with the
//! ring as fixed buffers. Every I/O goes through a slot: a write copies the
//! caller's bytes into the slot and issues `WriteFixed`; a read issues
//! `ReadFixed` and copies out on completion. Larger entries are split into
//! slot-sized chunks. Copying costs a `memcpy` but buys two properties: the
//! caller's memory needs no alignment, and the kernel only ever touches memory
//! the engine owns, so even if the ring breaks with I/O in flight no caller
//! memory can be written after the call returned (the pool is then leaked
//! instead of freed). If registration is refused (for example by
//! `RLIMIT_MEMLOCK`), the same slots are used with plain `Write`/`Read`.
//!
//! **Bounds and back-pressure.** At most `queue_depth` I/Os are in flight
//! (one per slot); the submission queue has at least that many entries and
//! the completion queue twice that, so neither can overflow. When all slots
//! are busy the engine waits for completions before submitting more chunks.
//! An overflow reported by the kernel anyway is treated as a broken ring.
//!
//! **Short and retried I/O.** A completion with fewer bytes than asked is
//! resubmitted for the remainder (offset, buffer and length advanced); a
//! zero-byte write or read is an error (`WriteZero` / `UnexpectedEof`).
//! `EAGAIN` and `EINTR` completions are retried. Each chunk gets at most
//! [`RESUBMITS_MAX`] resubmissions.
//!
//! **Durability.** [`Storage::write_durable`] sets `RWF_DSYNC` on each write
//! SQE, which the kernel turns into FUA (or a write plus cache flush) for
//! block devices and into a data sync of the range for files.
//! [`Storage::flush`] submits one `Fsync` with `IORING_FSYNC_DATASYNC` after
//! every earlier write completed, which flushes the device cache.
//!
//! **Errors.** After the first error of a call no new chunk is submitted,
//! but the call still waits for every chunk already in flight before it
//! returns. A write or flush error trips the [`FailureLatch`]; a read error is
//! returned as [`StorageError::Io`]. A broken ring (an `io_uring_enter`
//! failure that is not transient, lost completions) trips the latch whatever
//! the operation, because in-flight state is then unknown.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use io_uring::{opcode, squeue, types, IoUring};

use crate::aligned::{AlignedBuf, AlignedBufError, BLOCK_BYTES};
use crate::device::{Device, DeviceError, Geometry};
use crate::storage::{
    check_range, check_read_batch, check_write_batch, FailureLatch, IoFailure, IoOp, Storage,
    StorageError,
};

/// Largest accepted [`UringConfig::queue_depth`].
pub const QUEUE_DEPTH_MAX: u32 = 1024;
/// Largest accepted [`UringConfig::slot_bytes`] (8 MiB).
pub const SLOT_BYTES_MAX: usize = 8 << 20;
/// Largest accepted buffer pool, `queue_depth * slot_bytes` (256 MiB).
pub const POOL_BYTES_MAX: usize = 256 << 20;
/// Largest accepted [`UringConfig::rings`] (the pool bound applies per ring).
pub const RINGS_MAX: u32 = 8;
/// Most resubmissions (short transfer or `EAGAIN`/`EINTR`) of one chunk.
pub const RESUBMITS_MAX: u32 = 64;
/// Most consecutive transient `io_uring_enter` failures before the ring is
/// declared broken.
pub const ENTER_RETRIES_MAX: u32 = 1000;

/// `user_data` of the flush SQE; slot indexes are far below it.
const FLUSH_USER_DATA: u64 = u64::MAX;

/// Tunables of [`UringStorage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringConfig {
    /// Ring size and bound on I/Os in flight, `1..=QUEUE_DEPTH_MAX`.
    pub queue_depth: u32,
    /// Size of each buffer slot in bytes, a multiple of 4096 in
    /// `4096..=SLOT_BYTES_MAX`; larger I/Os are split into slot-sized chunks.
    pub slot_bytes: usize,
    /// Register the slots as fixed buffers (falls back to plain
    /// `Read`/`Write` if the kernel refuses).
    pub register_buffers: bool,
    /// Rings (each with its own pool), `1..=RINGS_MAX`: calls from
    /// different threads run on different rings when one is free.
    pub rings: u32,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            queue_depth: 32,
            slot_bytes: 128 << 10,
            register_buffers: true,
            rings: 2,
        }
    }
}

impl UringConfig {
    /// Checks the bounds documented on each field.
    pub fn check(&self) -> Result<(), UringSetupError> {
        if self.queue_depth == 0 || self.queue_depth > QUEUE_DEPTH_MAX {
            return Err(UringSetupError::InvalidConfig {
                field: "queue_depth",
                value: u64::from(self.queue_depth),
                expected: "1..=1024",
            });
        }
        if self.slot_bytes == 0
            || !self.slot_bytes.is_multiple_of(BLOCK_BYTES)
            || self.slot_bytes > SLOT_BYTES_MAX
        {
            return Err(UringSetupError::InvalidConfig {
                field: "slot_bytes",
                value: self.slot_bytes as u64,
                expected: "a multiple of 4096 in 4096..=8 MiB",
            });
        }
        if self.rings == 0 || self.rings > RINGS_MAX {
            return Err(UringSetupError::InvalidConfig {
                field: "rings",
                value: u64::from(self.rings),
                expected: "1..=8",
            });
        }
        let pool_bytes = self.slot_bytes.checked_mul(self.queue_depth as usize);
        if !matches!(pool_bytes, Some(b) if b <= POOL_BYTES_MAX) {
            return Err(UringSetupError::InvalidConfig {
                field: "queue_depth * slot_bytes",
                value: (self.slot_bytes as u64).saturating_mul(u64::from(self.queue_depth)),
                expected: "at most 256 MiB",
            });
        }
        Ok(())
    }
}

/// Errors creating a [`UringStorage`].
#[derive(Debug, thiserror::Error)]
pub enum UringSetupError {
    /// A configuration field is out of bounds.
    #[error("invalid io_uring config: {field} = {value}, expected {expected}")]
    InvalidConfig {
        /// Offending field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Accepted range.
        expected: &'static str,
    },
    /// Opening the device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// `io_uring_setup` failed (io_uring disabled, too old kernel, limits).
    #[error("cannot create an io_uring with {queue_depth} entries for {device}: {source}")]
    Ring {
        /// Device name.
        device: String,
        /// Requested entries.
        queue_depth: u32,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Allocating the buffer pool failed.
    #[error("cannot allocate the io_uring buffer pool for {device}: {source}")]
    Pool {
        /// Device name.
        device: String,
        /// Underlying error.
        #[source]
        source: AlignedBufError,
    },
}

/// Counters of one [`UringStorage`] since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UringStats {
    /// Write chunks completed (a chunk is at most one slot).
    pub write_chunks: u64,
    /// Read chunks completed.
    pub read_chunks: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Resubmissions after a short transfer.
    pub short_resubmits: u64,
    /// Resubmissions after `EAGAIN`/`EINTR`.
    pub retries: u64,
    /// Highest number of I/Os in flight at once (never above `queue_depth`).
    pub in_flight_max: u64,
}

/// Direction and flags of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Write { dsync: bool },
    Read,
}

/// The caller's buffers of one batch.
enum Job<'a, 'b> {
    Write {
        writes: &'a [(u64, &'b [u8])],
        dsync: bool,
    },
    Read {
        reads: &'a mut [(u64, &'b mut [u8])],
    },
}

impl Job<'_, '_> {
    fn dir(&self) -> Dir {
        match self {
            Job::Write { dsync, .. } => Dir::Write { dsync: *dsync },
            Job::Read { .. } => Dir::Read,
        }
    }

    fn op(&self) -> IoOp {
        match self {
            Job::Write { dsync: true, .. } => IoOp::WriteDurable,
            Job::Write { dsync: false, .. } => IoOp::Write,
            Job::Read { .. } => IoOp::Read,
        }
    }

    fn len(&self) -> usize {
        match self {
            Job::Write { writes, .. } => writes.len(),
            Job::Read { reads } => reads.len(),
        }
    }

    /// Device offset and length of entry `i` (which exists).
    fn entry(&self, i: usize) -> (u64, usize) {
        match self {
            Job::Write { writes, .. } => (writes[i].0, writes[i].1.len()),
            Job::Read { reads } => (reads[i].0, reads[i].1.len()),
        }
    }
}

/// Position in a job while it is split into chunks.
#[derive(Debug, Default)]
struct ChunkCursor {
    entry: usize,
    pos: usize,
}

/// One chunk of one entry, in flight in one slot.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    entry: usize,
    /// Offset of the chunk inside the caller's buffer.
    pos: usize,
    dev_offset: u64,
    len: u32,
    /// Bytes transferred so far.
    done: u32,
    resubmits: u32,
}

impl ChunkCursor {
    fn next(&mut self, job: &Job<'_, '_>, slot_bytes: usize) -> Option<Chunk> {
        while self.entry < job.len() {
            let (offset, len) = job.entry(self.entry);
            if self.pos >= len {
                self.entry += 1;
                self.pos = 0;
                continue;
            }
            let chunk_len = (len - self.pos).min(slot_bytes);
            let chunk = Chunk {
                entry: self.entry,
                pos: self.pos,
                dev_offset: offset + self.pos as u64,
                // slot_bytes <= SLOT_BYTES_MAX fits in u32.
                len: chunk_len as u32,
                done: 0,
                resubmits: 0,
            };
            self.pos += chunk_len;
            return Some(chunk);
        }
        None
    }
}

/// Why a run stopped.
#[derive(Debug)]
struct RunError {
    offset: u64,
    len_bytes: u64,
    cause: io::Error,
    /// The ring is unusable; the storage must latch whatever the operation.
    ring_broken: bool,
}

/// The ring, its buffer pool and the in-flight table. Only accessed under
/// the [`UringStorage`] mutex.
struct Engine {
    ring: IoUring,
    /// Backing memory of the slots. Only accessed through `base` and slot
    /// arithmetic once registered; freed in `Drop` only if nothing is in
    /// flight, leaked otherwise.
    pool: ManuallyDrop<AlignedBuf>,
    base: *mut u8,
    slot_bytes: usize,
    fixed: bool,
    fd: RawFd,
    /// In-flight chunk per slot; `None` when the slot is free.
    slots: Vec<Option<Chunk>>,
    free: Vec<u16>,
    in_flight: usize,
    /// Completions drained from the CQ, reused between calls.
    cqes: Vec<(u64, i32)>,
    /// Set once the ring is unusable.
    broken: bool,
    stats: UringStats,
}

// SAFETY: `base` points into `pool`, which the engine owns; nothing about the
// engine is tied to the creating thread (the ring is `Send`), and all access
// is serialized by the `UringStorage` mutex.
unsafe impl Send for Engine {}

impl Engine {
    fn new(fd: RawFd, config: &UringConfig, device: &str) -> Result<Self, UringSetupError> {
        let ring = IoUring::new(config.queue_depth).map_err(|source| UringSetupError::Ring {
            device: device.to_string(),
            queue_depth: config.queue_depth,
            source,
        })?;
        let slot_count = config.queue_depth as usize;
        let mut pool = AlignedBuf::zeroed(slot_count * config.slot_bytes).map_err(|source| {
            UringSetupError::Pool {
                device: device.to_string(),
                source,
            }
        })?;
        let base = pool.as_mut_ptr();
        let mut fixed = false;
        if config.register_buffers {
            let iovecs: Vec<libc::iovec> = (0..slot_count)
                .map(|i| libc::iovec {
                    // SAFETY: `i * slot_bytes` is inside the pool allocation.
                    iov_base: unsafe { base.add(i * config.slot_bytes) }.cast(),
                    iov_len: config.slot_bytes,
                })
                .collect();
            // SAFETY: every iovec describes memory inside `pool`, which lives
            // until after the buffers are unregistered or the ring is closed
            // (see `Drop`), or is leaked.
            fixed = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        }
        Ok(Self {
            ring,
            pool: ManuallyDrop::new(pool),
            base,
            slot_bytes: config.slot_bytes,
            fixed,
            fd,
            slots: vec![None; slot_count],
            // Pop from the end hands out slot 0 first.
            free: (0..slot_count as u16).rev().collect(),
            in_flight: 0,
            cqes: Vec::with_capacity(2 * slot_count),
            broken: false,
            stats: UringStats::default(),
        })
    }

    fn slot_ptr(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < self.slots.len());
        // SAFETY: `slot < slots.len()`, so the offset stays inside the pool.
        unsafe { self.base.add(slot * self.slot_bytes) }
    }

    /// The SQE for the remainder of `chunk` in `slot`.
    fn sqe(&self, dir: Dir, slot: usize, chunk: &Chunk) -> squeue::Entry {
        let done = chunk.done as usize;
        // SAFETY: `done < len <= slot_bytes`, so the pointer stays in the slot.
        let ptr = unsafe { self.slot_ptr(slot).add(done) };
        let len = chunk.len - chunk.done;
        let offset = chunk.dev_offset + u64::from(chunk.done);
        let fd = types::Fd(self.fd);
        let entry = match (dir, self.fixed) {
            (Dir::Write { dsync }, true) => opcode::WriteFixed::new(fd, ptr, len, slot as u16)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            (Dir::Write { dsync }, false) => opcode::Write::new(fd, ptr, len)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            (Dir::Read, true) => opcode::ReadFixed::new(fd, ptr, len, slot as u16)
                .offset(offset)
                .build(),
            (Dir::Read, false) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
        };
        entry.user_data(slot as u64)
    }

    fn push(&mut self, entry: &squeue::Entry) -> Result<(), RunError> {
        // SAFETY: the entry references no memory (fsync) or only a slot of
        // `pool`, which outlives the operation: a slot is reused only after
        // its completion was reaped, and the pool is leaked rather than freed
        // if the engine is dropped with I/O possibly in flight.
        let pushed = unsafe { self.ring.submission().push(entry) };
        pushed.map_err(|_| self.broken_error("submission queue full although every slot has room"))
    }

    fn broken_error(&mut self, what: &str) -> RunError {
        self.broken = true;
        RunError {
            offset: 0,
            len_bytes: 0,
            cause: io::Error::other(format!("io_uring broken: {what}")),
            ring_broken: true,
        }
    }

    /// Runs a whole job: bounded submission, completion, resubmission.
    /// Returns only when nothing of the job is in flight (or the ring broke).
    fn run(&mut self, job: &mut Job<'_, '_>) -> Result<(), RunError> {
        if self.broken {
            return Err(self.broken_error("an earlier call left it unusable"));
        }
        let dir = job.dir();
        let mut cursor = ChunkCursor::default();
        let mut first_error: Option<RunError> = None;
        let mut enter_retries = 0u32;
        loop {
            if first_error.is_none() {
                self.fill(job, dir, &mut cursor)?;
            }
            if self.in_flight == 0 {
                break;
            }
            self.enter(&mut enter_retries)?;
            self.drain_cq()?;
            let cqes = std::mem::take(&mut self.cqes);
            let mut result = Ok(());
            for &(user_data, res) in &cqes {
                result = self.complete(job, dir, user_data, res, &mut first_error);
                if result.is_err() {
                    break;
                }
            }
            self.cqes = cqes;
            result?;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Submits new chunks while a slot is free.
    fn fill(
        &mut self,
        job: &Job<'_, '_>,
        dir: Dir,
        cursor: &mut ChunkCursor,
    ) -> Result<(), RunError> {
        while let Some(&slot) = self.free.last() {
            let Some(chunk) = cursor.next(job, self.slot_bytes) else {
                break;
            };
            self.free.pop();
            let slot = usize::from(slot);
            if let Job::Write { writes, .. } = job {
                let src = &writes[chunk.entry].1[chunk.pos..chunk.pos + chunk.len as usize];
                // SAFETY: the slot is free, so the kernel does not access it,
                // and `chunk.len <= slot_bytes` keeps the copy inside it; the
                // source is caller memory that cannot overlap the pool.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), self.slot_ptr(slot), src.len())
                };
            }
            let entry = self.sqe(dir, slot, &chunk);
            self.push(&entry)?;
            self.slots[slot] = Some(chunk);
            self.in_flight += 1;
            self.stats.in_flight_max = self.stats.in_flight_max.max(self.in_flight as u64);
        }
        Ok(())
    }

    /// Submits queued SQEs and waits for at least one completion.
    fn enter(&mut self, retries: &mut u32) -> Result<(), RunError> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {
                *retries = 0;
                Ok(())
            }
            Err(e) => {
                let transient = matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                );
                *retries += 1;
                if transient && *retries <= ENTER_RETRIES_MAX {
                    if e.raw_os_error() == Some(libc::EAGAIN) {
                        std::thread::yield_now();
                    }
                    // Completions may already be waiting; the caller drains them.
                    Ok(())
                } else {
                    self.broken = true;
                    Err(RunError {
                        offset: 0,
                        len_bytes: 0,
                        cause: io::Error::new(e.kind(), format!("io_uring_enter failed: {e}")),
                        ring_broken: true,
                    })
                }
            }
        }
    }

    /// Moves every available CQE into `self.cqes`.
    fn drain_cq(&mut self) -> Result<(), RunError> {
        self.cqes.clear();
        let mut cq = self.ring.completion();
        self.cqes
            .extend(cq.by_ref().map(|cqe| (cqe.user_data(), cqe.result())));
        let lost = cq.overflow();
        drop(cq);
        if lost != 0 {
            return Err(self.broken_error(&format!("{lost} completions were dropped")));
        }
        Ok(())
    }

    /// Handles one completion of the current job.
    fn complete(
        &mut self,
        job: &mut Job<'_, '_>,
        dir: Dir,
        user_data: u64,
        res: i32,
        first_error: &mut Option<RunError>,
    ) -> Result<(), RunError> {
        let slot = usize::try_from(user_data).unwrap_or(usize::MAX);
        let Some(mut chunk) = self.slots.get(slot).copied().flatten() else {
            return Err(self.broken_error(&format!("completion for unknown user_data {user_data}")));
        };
        let remaining = chunk.len - chunk.done;
        let mut outcome: Option<io::Error> = None;
        let mut resubmit = false;
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EAGAIN | libc::EINTR)
                && chunk.resubmits < RESUBMITS_MAX
                && first_error.is_none()
            {
                chunk.resubmits += 1;
                self.stats.retries += 1;
                resubmit = true;
            } else {
                outcome = Some(io::Error::from_raw_os_error(errno));
            }
        } else {
            let n = res as u32;
            if n == 0 {
                outcome = Some(match dir {
                    Dir::Write { .. } => {
                        io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes")
                    }
                    Dir::Read => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read returned no bytes (past end of device)",
                    ),
                });
            } else if n > remaining {
                outcome = Some(io::Error::other(format!(
                    "kernel reported {n} bytes transferred for a {remaining}-byte request"
                )));
            } else if n < remaining {
                chunk.done += n;
                if first_error.is_some() {
                    // The call is already failing; do not extend it.
                    outcome = Some(io::Error::other("short transfer after an earlier failure"));
                } else if chunk.resubmits >= RESUBMITS_MAX {
                    outcome = Some(io::Error::other(format!(
                        "still {} bytes short after {RESUBMITS_MAX} resubmissions",
                        chunk.len - chunk.done
                    )));
                } else {
                    chunk.resubmits += 1;
                    self.stats.short_resubmits += 1;
                    resubmit = true;
                }
            } else {
                chunk.done = chunk.len;
            }
        }

        if resubmit {
            self.slots[slot] = Some(chunk);
            let entry = self.sqe(dir, slot, &chunk);
            return self.push(&entry);
        }

        // The chunk is finished, successfully or not: release its slot.
        self.slots[slot] = None;
        self.in_flight -= 1;
        match outcome {
            Some(cause) => {
                // Report the remainder that failed, not the whole chunk.
                let err = RunError {
                    offset: chunk.dev_offset + u64::from(chunk.done),
                    len_bytes: u64::from(chunk.len - chunk.done),
                    cause,
                    ring_broken: false,
                };
                if first_error.is_none() {
                    *first_error = Some(err);
                }
            }
            None => {
                let len = chunk.len as usize;
                match job {
                    Job::Write { .. } => {
                        self.stats.write_chunks += 1;
                        self.stats.bytes_written += len as u64;
                    }
                    Job::Read { reads } => {
                        let dst = &mut reads[chunk.entry].1[chunk.pos..chunk.pos + len];
                        // SAFETY: the read into this slot completed, so the
                        // kernel no longer accesses it; `len <= slot_bytes`.
                        let src = unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), len) };
                        dst.copy_from_slice(src);
                        self.stats.read_chunks += 1;
                        self.stats.bytes_read += len as u64;
                    }
                }
            }
        }
        self.free.push(slot as u16);
        Ok(())
    }

    /// Submits one `Fsync(DATASYNC)` and waits for it. Nothing else is in
    /// flight (every call drains before returning).
    fn fsync(&mut self) -> Result<(), RunError> {
        if self.broken {
            return Err(self.broken_error("an earlier call left it unusable"));
        }
        if self.in_flight != 0 {
            return Err(self.broken_error("flush found I/O in flight"));
        }
        let entry = opcode::Fsync::new(types::Fd(self.fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(FLUSH_USER_DATA);
        let mut attempts = 0u32;
        loop {
            self.push(&entry)?;
            let mut enter_retries = 0u32;
            let res = loop {
                self.enter(&mut enter_retries)?;
                self.drain_cq()?;
                let mut flush_res = None;
                let mut unexpected = false;
                for &(user_data, res) in &self.cqes {
                    if user_data == FLUSH_USER_DATA {
                        flush_res = Some(res);
                    } else {
                        unexpected = true;
                    }
                }
                if unexpected {
                    return Err(self.broken_error("unexpected completion during flush"));
                }
                if let Some(res) = flush_res {
                    break res;
                }
            };
            if res >= 0 {
                self.stats.flushes += 1;
                return Ok(());
            }
            let errno = -res;
            attempts += 1;
            if matches!(errno, libc::EAGAIN | libc::EINTR) && attempts <= RESUBMITS_MAX {
                self.stats.retries += 1;
                continue;
            }
            return Err(RunError {
                offset: 0,
                len_bytes: 0,
                cause: io::Error::from_raw_os_error(errno),
                ring_broken: false,
            });
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.in_flight == 0 && !self.broken {
            if self.fixed {
                // Best effort: closing the ring unregisters them anyway.
                let _ = self.ring.submitter().unregister_buffers();
            }
            // SAFETY: nothing is in flight, so the kernel holds no reference
            // to the pool, and it is never used again.
            unsafe { ManuallyDrop::drop(&mut self.pool) };
        }
        // Otherwise the pool is leaked on purpose: the kernel may still write
        // into it after the ring is closed.
    }
}

/// [`Storage`] on an io_uring over a [`Device`]; see the module docs.
pub struct UringStorage {
    // Field order matters: the engines (rings and pools) are dropped before
    // the device's file descriptor is closed.
    engines: Box<[Mutex<Engine>]>,
    /// Which ring a call waits for when none is free (round robin).
    next: AtomicUsize,
    latch: FailureLatch,
    device: Device,
    name: String,
    geometry: Geometry,
    config: UringConfig,
    fixed_buffers: bool,
}

impl std::fmt::Debug for UringStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringStorage")
            .field("device", &self.name)
            .field("geometry", &self.geometry)
            .field("config", &self.config)
            .field("fixed_buffers", &self.fixed_buffers)
            .field("failure", &self.latch.failure())
            .finish()
    }
}

impl UringStorage {
    /// Opens the device at `path` (see [`Device::open`]) and creates the ring.
    pub fn open(
        path: impl AsRef<Path>,
        min_size_bytes: u64,
        config: UringConfig,
    ) -> Result<Self, UringSetupError> {
        config.check()?;
        let device = Device::open(path, min_size_bytes)?;
        Self::new(device, config)
    }

    /// Creates the ring and buffer pool for an already opened device.
    pub fn new(device: Device, config: UringConfig) -> Result<Self, UringSetupError> {
        config.check()?;
        let name = device.path().display().to_string();
        let engines = (0..config.rings)
            .map(|_| Engine::new(device.as_raw_fd(), &config, &name).map(Mutex::new))
            .collect::<Result<Box<[_]>, _>>()?;
        let fixed_buffers = engines.iter().all(|e| e.lock().is_ok_and(|e| e.fixed));
        Ok(Self {
            engines,
            next: AtomicUsize::new(0),
            latch: FailureLatch::new(),
            geometry: device.geometry(),
            device,
            name,
            config,
            fixed_buffers,
        })
    }

    /// The underlying device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The configuration in use.
    pub fn config(&self) -> UringConfig {
        self.config
    }

    /// True if every ring's slots are registered fixed buffers
    /// (`WriteFixed` / `ReadFixed`), false if plain `Write`/`Read` are used
    /// on any.
    pub fn uses_fixed_buffers(&self) -> bool {
        self.fixed_buffers
    }

    /// Counters since open, summed over the rings (`in_flight_max`: the
    /// highest of any one ring).
    pub fn stats(&self) -> UringStats {
        let mut sum = UringStats::default();
        for e in self.engines.iter() {
            let s = match e.lock() {
                Ok(engine) => engine.stats,
                Err(poisoned) => poisoned.into_inner().stats,
            };
            sum.write_chunks += s.write_chunks;
            sum.read_chunks += s.read_chunks;
            sum.flushes += s.flushes;
            sum.bytes_written += s.bytes_written;
            sum.bytes_read += s.bytes_read;
            sum.short_resubmits += s.short_resubmits;
            sum.retries += s.retries;
            sum.in_flight_max = sum.in_flight_max.max(s.in_flight_max);
        }
        sum
    }

    /// A free ring, else the next one in turn (waiting for it).
    fn lock(&self, op: IoOp) -> Result<MutexGuard<'_, Engine>, StorageError> {
        for e in self.engines.iter() {
            match e.try_lock() {
                Ok(guard) => return Ok(guard),
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Poisoned(_)) => return Err(self.poisoned(op)),
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.engines.len();
        self.engines[i].lock().map_err(|_| self.poisoned(op))
    }

    fn poisoned(&self, op: IoOp) -> StorageError {
        self.latch.trip(IoFailure {
            device: self.name.clone(),
            op,
            offset: 0,
            len_bytes: 0,
            cause: Arc::new(io::Error::other(
                "io_uring engine poisoned by a panic during an earlier call",
            )),
        })
    }

    fn run(&self, mut job: Job<'_, '_>) -> Result<(), StorageError> {
        let op = job.op();
        let mut engine = self.lock(op)?;
        // Another thread may have failed while this one waited for the lock.
        self.latch.check()?;
        match engine.run(&mut job) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.error(op, e)),
        }
    }

    fn error(&self, op: IoOp, e: RunError) -> StorageError {
        let cause = Arc::new(e.cause);
        if op == IoOp::Read && !e.ring_broken {
            return StorageError::Io {
                device: self.name.clone(),
                op,
                offset: e.offset,
                len_bytes: e.len_bytes,
                source: cause,
            };
        }
        self.latch.trip(IoFailure {
            device: self.name.clone(),
            op,
            offset: e.offset,
            len_bytes: e.len_bytes,
            cause,
        })
    }
}

impl Storage for UringStorage {
    fn device_name(&self) -> &str {
        &self.name
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        self.latch.check()?;
        check_write_batch(&self.name, &self.geometry, IoOp::Write, writes)?;
        self.run(Job::Write {
            writes,
            dsync: false,
        })
    }

    fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.latch.check()?;
        check_range(
            &self.name,
            &self.geometry,
            IoOp::WriteDurable,
            offset,
            data.len(),
        )?;
        self.run(Job::Write {
            writes: &[(offset, data)],
            dsync: true,
        })
    }

    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), StorageError> {
        self.latch.check()?;
        check_read_batch(&self.name, &self.geometry, reads)?;
        self.run(Job::Read { reads })
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.latch.check()?;
        let mut engine = self.lock(IoOp::Flush)?;
        self.latch.check()?;
        engine.fsync().map_err(|e| self.error(IoOp::Flush, e))
    }

    fn failure(&self) -> Option<IoFailure> {
        self.latch.failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::FileAllocation;
    use crate::test_support::{random_bytes, LoopDevice, Scratch};
    use rand::{Rng as _, SeedableRng as _};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeMap;
    use std::io::Read as _;
    use std::os::unix::fs::FileExt as _;

    fn file_storage(
        scratch: &Scratch,
        name: &str,
        size_bytes: u64,
        config: UringConfig,
    ) -> UringStorage {
        let device = Device::create_file(
            scratch.path().join(name),
            size_bytes,
            FileAllocation::Sparse,
        )
        .expect("create file");
        UringStorage::new(device, config).expect("uring storage")
    }

    /// A scratch device: a loop device when possible (root + losetup), a
    /// regular file otherwise. The loop guard is dropped before the scratch dir.
    struct Target {
        storage: UringStorage,
        _lo: Option<LoopDevice>,
        _scratch: Scratch,
    }

    fn target(label: &str, size_bytes: u64, config: UringConfig) -> Option<Target> {
        let scratch = Scratch::new(label)?;
        if let Some(lo) = LoopDevice::attach(&scratch, "loop.img", size_bytes) {
            match UringStorage::open(lo.path(), size_bytes, config) {
                Ok(storage) => {
                    return Some(Target {
                        storage,
                        _lo: Some(lo),
                        _scratch: scratch,
                    })
                }
                Err(e) => eprintln!("{label}: loop device unusable ({e}); using a regular file"),
            }
        } else {
            eprintln!("{label}: using a regular file instead of a loop device");
        }
        let storage = file_storage(&scratch, "file.img", size_bytes, config);
        Some(Target {
            storage,
            _lo: None,
            _scratch: scratch,
        })
    }

    #[test]
    fn config_bounds() {
        assert!(UringConfig::default().check().is_ok());
        let bad = [
            UringConfig {
                queue_depth: 0,
                ..UringConfig::default()
            },
            UringConfig {
                queue_depth: QUEUE_DEPTH_MAX + 1,
                ..UringConfig::default()
            },
            UringConfig {
                slot_bytes: 1000,
                ..UringConfig::default()
            },
            UringConfig {
                slot_bytes: SLOT_BYTES_MAX * 2,
                ..UringConfig::default()
            },
            UringConfig {
                queue_depth: 1024,
                slot_bytes: SLOT_BYTES_MAX,
                register_buffers: true,
                rings: 1,
            },
            UringConfig {
                rings: 0,
                ..UringConfig::default()
            },
            UringConfig {
                rings: RINGS_MAX + 1,
                ..UringConfig::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(config.check(), Err(UringSetupError::InvalidConfig { .. })),
                "{config:?}"
            );
        }
    }

    /// A durable write (the log's) proceeds while another call holds a
    /// ring (a commit's node write), and a flush too; with one ring both
    /// wait.
    #[test]
    fn a_busy_ring_does_not_block_other_calls() {
        let Some(t) = target("busy ring", 1 << 20, UringConfig::default()) else {
            return;
        };
        let s = &t.storage;
        assert_eq!(s.engines.len(), 2);
        let held = s.engines[0].lock().expect("ring 0");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let w = s.write_durable(4096, &[7u8; 4096]);
                let f = s.flush();
                let _ = tx.send((w, f));
            });
            let r = rx.recv_timeout(std::time::Duration::from_secs(10));
            // Before any assertion: a blocked call waits for this lock.
            drop(held);
            let (w, f) = r.expect("a call waited behind a busy ring");
            w.expect("durable write");
            f.expect("flush");
        });
        let mut back = [0u8; 4096];
        s.read(4096, &mut back).expect("read back");
        assert_eq!(back, [7u8; 4096]);
    }

    #[test]
    fn chunk_cursor_splits_entries() {
        let a = [0u8; 10_000];
        let b: [u8; 0] = [];
        let c = [0u8; 4096];
        let writes: [(u64, &[u8]); 3] = [(0, &a), (50_000, &b), (1 << 20, &c)];
        let job = Job::Write {
            writes: &writes,
            dsync: false,
        };
        let mut cursor = ChunkCursor::default();
        let mut chunks = Vec::new();
        while let Some(chunk) = cursor.next(&job, 4096) {
            chunks.push((chunk.entry, chunk.pos, chunk.dev_offset, chunk.len));
        }
        assert_eq!(
            chunks,
            vec![
                (0, 0, 0, 4096),
                (0, 4096, 4096, 4096),
                (0, 8192, 8192, 1808),
                (2, 0, 1 << 20, 4096)
            ]
        );
    }

    /// Random batches of random sizes at random block offsets, compared with
    /// an in-memory model; small slots and queue depth force splitting and
    /// back-pressure.
    #[test]
    fn random_write_read_back_matches_model() {
        let size_bytes: u64 = 8 << 20;
        let config = UringConfig {
            queue_depth: 4,
            slot_bytes: 16 << 10,
            register_buffers: true,
            ..UringConfig::default()
        };
        let Some(t) = target("uring-random", size_bytes, config) else {
            return;
        };
        let s = &t.storage;
        let block = u64::from(s.geometry().logical_block_bytes);
        let mut model = vec![0u8; size_bytes as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(0x5EED);
        for round in 0..40 {
            // Non-overlapping entries: pick distinct 64 KiB regions.
            let entries = rng.gen_range(1..=12);
            let mut regions: Vec<u64> = Vec::new();
            while regions.len() < entries {
                let r = rng.gen_range(0..size_bytes / (64 << 10));
                if !regions.contains(&r) {
                    regions.push(r);
                }
            }
            let bufs: Vec<(u64, Vec<u8>)> = regions
                .iter()
                .map(|r| {
                    let blocks_max = (64 << 10) / block;
                    let first = rng.gen_range(0..blocks_max);
                    let count = rng.gen_range(1..=blocks_max - first);
                    let offset = r * (64 << 10) + first * block;
                    (offset, random_bytes(&mut rng, (count * block) as usize))
                })
                .collect();
            let writes: Vec<(u64, &[u8])> = bufs.iter().map(|(o, b)| (*o, b.as_slice())).collect();
            if round % 5 == 4 {
                for (offset, data) in &writes {
                    s.write_durable(*offset, data).expect("durable write");
                }
            } else {
                s.write_batch(&writes).expect("write batch");
            }
            for (offset, data) in &bufs {
                model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            if round % 7 == 0 {
                s.flush().expect("flush");
            }
        }
        // Read everything back in one batch of 256 KiB entries with an
        // unaligned destination to exercise the copy-out path.
        let mut backing = vec![0u8; size_bytes as usize + 1];
        let dest = &mut backing[1..];
        {
            let mut reads: Vec<(u64, &mut [u8])> = dest
                .chunks_mut(256 << 10)
                .enumerate()
                .map(|(i, c)| ((i as u64) * (256 << 10), c))
                .collect();
            s.read_batch(&mut reads).expect("read batch");
        }
        assert!(
            dest == model.as_slice(),
            "device content differs from the model"
        );
        let stats = s.stats();
        eprintln!(
            "random_write_read_back: {} fixed_buffers={} {stats:?}",
            s.device_name(),
            s.uses_fixed_buffers()
        );
        assert!(
            stats.in_flight_max <= u64::from(config.queue_depth),
            "{stats:?}"
        );
        assert_eq!(
            stats.in_flight_max,
            u64::from(config.queue_depth),
            "{stats:?}"
        );
        assert!(stats.write_chunks > 0 && stats.read_chunks > 0 && stats.flushes > 0);
        assert!(s.failure().is_none());
    }

    #[test]
    fn unaligned_memory_and_plain_buffers() {
        let config = UringConfig {
            queue_depth: 8,
            slot_bytes: 8192,
            register_buffers: false,
            ..UringConfig::default()
        };
        let Some(scratch) = Scratch::new("uring-plain") else {
            return;
        };
        let s = file_storage(&scratch, "plain.img", 1 << 20, config);
        assert!(!s.uses_fixed_buffers());
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let raw = random_bytes(&mut rng, 3 * 4096 + 3);
        let data = &raw[3..];
        s.write(4096, data).expect("write");
        let mut out = vec![0u8; data.len() + 5];
        s.read(4096, &mut out[5..]).expect("read");
        assert_eq!(&out[5..], data);
        // Zero-length entries are no-ops.
        s.write_batch(&[(0, &[])]).expect("empty write");
        s.read_batch(&mut [(0, &mut [][..])]).expect("empty read");
        s.write_batch(&[]).expect("empty batch");

        // The data is really in the file (read without O_DIRECT).
        let file = std::fs::File::open(scratch.path().join("plain.img")).expect("open");
        let mut check = vec![0u8; data.len()];
        file.read_exact_at(&mut check, 4096).expect("pread");
        assert_eq!(check, data);
    }

    #[test]
    fn argument_errors_do_not_latch() {
        let Some(scratch) = Scratch::new("uring-args") else {
            return;
        };
        let s = file_storage(&scratch, "args.img", 1 << 20, UringConfig::default());
        let block = [0u8; 4096];
        assert!(matches!(
            s.write(100, &block),
            Err(StorageError::Misaligned { offset: 100, .. })
        ));
        assert!(matches!(
            s.write(0, &block[..100]),
            Err(StorageError::Misaligned { len_bytes: 100, .. })
        ));
        assert!(matches!(
            s.write(1 << 20, &block),
            Err(StorageError::OutOfBounds { .. })
        ));
        assert!(matches!(
            s.write_durable(u64::MAX - 4095, &block),
            Err(StorageError::OutOfBounds { .. })
        ));
        let mut out = [0u8; 4096];
        assert!(matches!(
            s.read(1 << 20, &mut out),
            Err(StorageError::OutOfBounds { .. })
        ));
        assert!(matches!(
            s.write_batch(&[(0, &block), (0, &block)]),
            Err(StorageError::Overlap { .. })
        ));
        assert!(s.failure().is_none());
        s.write(0, &block).expect("still usable");
        s.flush().expect("flush");
    }

    /// Several threads (more than cores) write disjoint regions concurrently,
    /// then everything is read back.
    #[test]
    fn concurrent_writers() {
        let size_bytes: u64 = 8 << 20;
        let config = UringConfig {
            queue_depth: 8,
            slot_bytes: 32 << 10,
            register_buffers: true,
            ..UringConfig::default()
        };
        let Some(t) = target("uring-threads", size_bytes, config) else {
            return;
        };
        let s = &t.storage;
        let threads = 8u64;
        let region = size_bytes / threads;
        std::thread::scope(|scope| {
            for id in 0..threads {
                scope.spawn(move || {
                    let mut rng = ChaCha8Rng::seed_from_u64(100 + id);
                    for i in 0..24u64 {
                        let offset = id * region + (i % 16) * (region / 16);
                        let mut data = random_bytes(&mut rng, 16 << 10);
                        data[..8].copy_from_slice(&(id * 1000 + i).to_le_bytes());
                        let data2 = random_bytes(&mut rng, 8 << 10);
                        let second = offset + (32 << 10);
                        s.write_batch(&[(offset, &data), (second, &data2)])
                            .expect("write");
                        if i % 8 == 7 {
                            s.flush().expect("flush");
                        }
                        let mut back = vec![0u8; data.len()];
                        s.read(offset, &mut back).expect("read");
                        assert_eq!(back, data, "thread {id} iteration {i}");
                    }
                });
            }
        });
        s.flush().expect("final flush");
        assert!(s.stats().in_flight_max <= u64::from(config.queue_depth));
        assert!(s.failure().is_none());
    }

    /// Durable writes and flush reach the file: verified through a second,
    /// buffered file descriptor after the storage is dropped.
    #[test]
    fn durable_write_and_flush_reach_the_file() {
        let Some(scratch) = Scratch::new("uring-durable") else {
            return;
        };
        let path = scratch.path().join("durable.img");
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let a = random_bytes(&mut rng, 64 << 10);
        let b = random_bytes(&mut rng, 4096);
        {
            let s = UringStorage::new(
                Device::create_file(&path, 1 << 20, FileAllocation::Reserve).expect("create"),
                UringConfig {
                    queue_depth: 4,
                    slot_bytes: 16 << 10,
                    register_buffers: true,
                    ..UringConfig::default()
                },
            )
            .expect("storage");
            s.write_durable(8192, &a).expect("durable");
            s.write(1 << 19, &b).expect("write");
            s.flush().expect("flush");
            assert_eq!(s.stats().flushes, 1);
        }
        let mut content = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut content))
            .expect("read file");
        assert_eq!(&content[8192..8192 + a.len()], a.as_slice());
        assert_eq!(&content[1 << 19..(1 << 19) + 4096], b.as_slice());
    }

    /// A read crossing the end of a file that shrank underneath the storage:
    /// the kernel returns a short read, the remainder is resubmitted and hits
    /// end of file. Reads do not latch.
    #[test]
    fn short_read_resubmits_then_reports_eof() {
        let Some(scratch) = Scratch::new("uring-short-read") else {
            return;
        };
        let path = scratch.path().join("shrink.img");
        let s = UringStorage::new(
            Device::create_file(&path, 1 << 20, FileAllocation::Sparse).expect("create"),
            UringConfig::default(),
        )
        .expect("storage");
        let data = vec![0xA5u8; 64 << 10];
        s.write(0, &data).expect("write");
        // Shrink the file to 32 KiB behind the storage's back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(32 << 10))
            .expect("truncate");
        let mut out = vec![0u8; 64 << 10];
        match s.read(0, &mut out) {
            Err(StorageError::Io {
                op: IoOp::Read,
                offset,
                len_bytes,
                source,
                ..
            }) => {
                assert_eq!(
                    offset,
                    32 << 10,
                    "the remainder after the short read failed"
                );
                assert_eq!(len_bytes, 32 << 10);
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            }
            other => panic!("expected Io error, got {other:?}"),
        }
        assert!(s.stats().short_resubmits >= 1);
        assert!(s.failure().is_none(), "a read error must not latch");
        s.write(0, &data[..4096]).expect("still usable");
    }

    /// Write crossing the end of a block device that shrank underneath us:
    /// short write, resubmission of the remainder, ENOSPC, latched.
    #[test]
    fn block_device_write_past_end_latches() {
        let Some(scratch) = Scratch::new("uring-latch-loop") else {
            return;
        };
        let Some(lo) = LoopDevice::attach(&scratch, "latch.img", 4 << 20) else {
            eprintln!("SKIP block_device_write_past_end_latches: needs a loop device");
            return;
        };
        let s = UringStorage::open(lo.path(), 0, UringConfig::default()).expect("open loop");
        let data = vec![0x5Au8; 64 << 10];
        s.write(0, &data).expect("write before shrink");
        if !lo.resize(2 << 20) {
            eprintln!("SKIP block_device_write_past_end_latches: cannot shrink the loop device");
            return;
        }
        let crossing = (2 << 20) - (16 << 10);
        let err = s
            .write(crossing, &data)
            .expect_err("write past the new end must fail");
        match &err {
            StorageError::Failed {
                op,
                offset,
                len_bytes,
                cause,
                device,
            } => {
                assert_eq!(*op, IoOp::Write);
                assert_eq!(
                    *offset,
                    2 << 20,
                    "the remainder after the short write failed"
                );
                assert_eq!(*len_bytes, 48 << 10);
                assert!(
                    matches!(cause.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EIO)),
                    "{cause}"
                );
                assert_eq!(device, &lo.path().display().to_string());
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(s.stats().short_resubmits >= 1);
        assert_latched(&s, 2 << 20);
    }

    fn assert_latched(s: &UringStorage, first_offset: u64) {
        let block = [0u8; 4096];
        let mut out = [0u8; 4096];
        let results = [
            s.write(0, &block),
            s.write_durable(0, &block),
            s.read(0, &mut out),
            s.flush(),
        ];
        for r in results {
            match r {
                Err(StorageError::Failed { offset, .. }) => assert_eq!(offset, first_offset),
                other => panic!("expected latched Failed, got {other:?}"),
            }
        }
        assert_eq!(s.failure().map(|f| f.offset), Some(first_offset));
    }

    const CHILD_ENV: &str = "REFD_IORING_FSIZE_CHILD";

    /// Short write on a regular file and the failure latch, without root:
    /// `RLIMIT_FSIZE` truncates a write crossing the limit (short write) and
    /// fails the remainder with `EFBIG`. The limit is process-wide, so the
    /// check runs in a child process (this test binary, filtered to
    /// `fsize_limit_child`).
    #[test]
    fn regular_file_short_write_then_latch() {
        let Some(scratch) = Scratch::new("uring-fsize") else {
            return;
        };
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                eprintln!("SKIP regular_file_short_write_then_latch: no current_exe: {e}");
                return;
            }
        };
        let output = std::process::Command::new(exe)
            .args([
                "--exact",
                "uring::tests::fsize_limit_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, scratch.path())
            .output()
            .expect("spawn child test");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "child did not run:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("FSIZE CHILD OK"),
            "child skipped the check:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    fn fsize_limit_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            return; // Only meaningful when spawned by the test above.
        };
        let path = Path::new(&dir).join("fsize.img");
        let s = UringStorage::new(
            Device::create_file(&path, 1 << 20, FileAllocation::Sparse).expect("create"),
            UringConfig::default(),
        )
        .expect("storage");
        // SAFETY: ignoring SIGXFSZ (sent when the limit is hit) only changes
        // this child process's disposition; no handler runs.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let limit = libc::rlimit {
            rlim_cur: 256 << 10,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: `limit` is a valid rlimit that outlives the call.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) };
        assert_eq!(rc, 0, "setrlimit");
        let data = vec![0x3Cu8; 64 << 10];
        s.write(0, &data).expect("write below the limit");
        let err = s
            .write((256 << 10) - (16 << 10), &data)
            .expect_err("write crossing the limit");
        match &err {
            StorageError::Failed {
                offset,
                len_bytes,
                cause,
                op,
                ..
            } => {
                assert_eq!(*op, IoOp::Write);
                assert_eq!(*offset, 256 << 10, "remainder after the short write");
                assert_eq!(*len_bytes, 48 << 10);
                assert_eq!(cause.raw_os_error(), Some(libc::EFBIG), "{cause}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(s.stats().short_resubmits >= 1);
        assert_latched(&s, 256 << 10);
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("262144"),
            "{text}"
        );
        // The prefix before the limit did land.
        let file = std::fs::File::open(&path).expect("open");
        let mut prefix = vec![0u8; 16 << 10];
        file.read_exact_at(&mut prefix, (256 << 10) - (16 << 10))
            .expect("pread");
        assert!(prefix.iter().all(|&b| b == 0x3C));
        eprintln!("FSIZE CHILD OK");
    }

    const KILL_ENV: &str = "REFD_IORING_SIGKILL_CHILD";
    const KILL_BLOCKS: u64 = 2048;

    fn kill_pattern(i: u64) -> Vec<u8> {
        let mut block = vec![i as u8; 4096];
        block[..8].copy_from_slice(&i.to_le_bytes());
        block
    }

    /// A child process writes and flushes blocks, acknowledging each flushed
    /// block on stdout, and is killed with SIGKILL while I/O is in flight.
    /// Every acknowledged block must be intact afterwards, and the device
    /// must open again.
    #[test]
    fn sigkill_keeps_acknowledged_writes() {
        use std::io::BufRead as _;
        let Some(scratch) = Scratch::new("uring-sigkill") else {
            return;
        };
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                eprintln!("SKIP sigkill_keeps_acknowledged_writes: no current_exe: {e}");
                return;
            }
        };
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "uring::tests::sigkill_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(KILL_ENV, scratch.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut acked: Option<u64> = None;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line
                .strip_prefix("ACK ")
                .and_then(|n| n.trim().parse::<u64>().ok())
            {
                acked = Some(n);
                if n >= 300 {
                    child.kill().expect("SIGKILL");
                    break;
                }
            }
        }
        let _ = child.wait();
        let acked = acked.expect("child acknowledged nothing");
        let s = UringStorage::open(
            scratch.path().join("kill.img"),
            KILL_BLOCKS * 4096,
            UringConfig::default(),
        )
        .expect("reopen after SIGKILL");
        let mut bufs: Vec<Vec<u8>> = (0..=acked).map(|_| vec![0u8; 4096]).collect();
        let mut reads: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| (i as u64 * 4096, b.as_mut_slice()))
            .collect();
        s.read_batch(&mut reads).expect("read back");
        for (i, b) in bufs.iter().enumerate() {
            assert!(
                *b == kill_pattern(i as u64),
                "acknowledged block {i} lost or damaged"
            );
        }
    }

    #[test]
    fn sigkill_child() {
        use std::io::Write as _;
        let Some(dir) = std::env::var_os(KILL_ENV) else {
            return; // Only meaningful when spawned by the test above.
        };
        let path = Path::new(&dir).join("kill.img");
        let s = UringStorage::new(
            Device::create_file(&path, KILL_BLOCKS * 4096, FileAllocation::Sparse).expect("create"),
            UringConfig {
                queue_depth: 8,
                slot_bytes: 8192,
                register_buffers: true,
                ..UringConfig::default()
            },
        )
        .expect("storage");
        let mut out = std::io::stdout().lock();
        let batch = 16u64;
        for first in (0..KILL_BLOCKS).step_by(batch as usize) {
            let blocks: Vec<Vec<u8>> = (first..first + batch).map(kill_pattern).collect();
            let writes: Vec<(u64, &[u8])> = blocks
                .iter()
                .enumerate()
                .map(|(k, b)| ((first + k as u64) * 4096, b.as_slice()))
                .collect();
            s.write_batch(&writes).expect("write");
            s.flush().expect("flush");
            writeln!(out, "ACK {}", first + batch - 1).expect("stdout");
            out.flush().expect("stdout");
        }
    }

    /// Many writes to random blocks, larger than the pool, with an oracle.
    #[test]
    fn many_random_blocks_large_batch() {
        let Some(scratch) = Scratch::new("uring-many") else {
            return;
        };
        let s = file_storage(
            &scratch,
            "many.img",
            16 << 20,
            UringConfig {
                queue_depth: 16,
                slot_bytes: 4096,
                register_buffers: true,
                ..UringConfig::default()
            },
        );
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let blocks = (16 << 20) / 4096u64;
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for _ in 0..2 {
            let mut chosen: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            while chosen.len() < 300 {
                let b = rng.gen_range(0..blocks);
                chosen
                    .entry(b)
                    .or_insert_with(|| random_bytes(&mut rng, 4096));
            }
            let writes: Vec<(u64, &[u8])> = chosen
                .iter()
                .map(|(b, d)| (b * 4096, d.as_slice()))
                .collect();
            s.write_batch(&writes).expect("batch");
            model.extend(chosen);
        }
        let mut bufs: Vec<(u64, Vec<u8>)> =
            model.keys().map(|b| (b * 4096, vec![0u8; 4096])).collect();
        let mut reads: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .map(|(o, b)| (*o, b.as_mut_slice()))
            .collect();
        s.read_batch(&mut reads).expect("read");
        for (offset, data) in &bufs {
            assert_eq!(Some(data), model.get(&(offset / 4096)), "block at {offset}");
        }
        assert_eq!(s.stats().in_flight_max, 16);
    }
}
