//! [`Ring`]: one io_uring with its registered buffer pool and in-flight
//! table, running one job at a time (submit, resubmit short transfers,
//! wait for every completion).

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use crate::aligned::AlignedBuf;

use super::job::{Chunk, ChunkCursor, Dir, Job};
use super::{
    UringConfig, UringSetupError, UringStats, ENTER_RETRIES_MAX, FLUSH_USER_DATA, RESUBMITS_MAX,
};

/// Why a run stopped.
#[derive(Debug)]
pub(super) struct RunError {
    pub(super) offset: u64,
    pub(super) len_bytes: u64,
    pub(super) cause: io::Error,
    /// The ring is unusable; the storage must latch whatever the operation.
    pub(super) ring_broken: bool,
}

/// One io_uring, its buffer pool and the in-flight table. Only accessed
/// under its mutex in [`UringStorage`].
pub(super) struct Ring {
    pub(super) ring: IoUring,
    /// Backing memory of the slots. Only accessed through `base` and slot
    /// arithmetic once registered; freed in `Drop` only if nothing is in
    /// flight, leaked otherwise.
    pub(super) pool: ManuallyDrop<AlignedBuf>,
    pub(super) base: *mut u8,
    pub(super) slot_bytes: usize,
    pub(super) fixed: bool,
    pub(super) fd: RawFd,
    /// In-flight chunk per slot; `None` when the slot is free.
    pub(super) slots: Vec<Option<Chunk>>,
    pub(super) free: Vec<u16>,
    pub(super) in_flight: usize,
    /// Completions drained from the CQ, reused between calls.
    pub(super) cqes: Vec<(u64, i32)>,
    /// Set once the ring is unusable.
    pub(super) broken: bool,
    pub(super) stats: UringStats,
}

// SAFETY: `base` points into `pool`, which the ring owns; nothing about the
// ring is tied to the creating thread (`IoUring` is `Send`), and all access
// is serialized by the `UringStorage` mutex.
unsafe impl Send for Ring {}

impl Ring {
    pub(super) fn new(
        fd: RawFd,
        config: &UringConfig,
        device: &str,
    ) -> Result<Self, UringSetupError> {
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

    pub(super) fn slot_ptr(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < self.slots.len());
        // SAFETY: `slot < slots.len()`, so the offset stays inside the pool.
        unsafe { self.base.add(slot * self.slot_bytes) }
    }

    /// The SQE for the remainder of `chunk` in `slot`.
    pub(super) fn sqe(&self, dir: Dir, slot: usize, chunk: &Chunk) -> squeue::Entry {
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

    pub(super) fn push(&mut self, entry: &squeue::Entry) -> Result<(), RunError> {
        // SAFETY: the entry references no memory (fsync) or only a slot of
        // `pool`, which outlives the operation: a slot is reused only after
        // its completion was reaped, and the pool is leaked rather than freed
        // if the ring is dropped with I/O possibly in flight.
        let pushed = unsafe { self.ring.submission().push(entry) };
        pushed.map_err(|_| self.broken_error("submission queue full although every slot has room"))
    }

    pub(super) fn broken_error(&mut self, what: &str) -> RunError {
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
    pub(super) fn run(&mut self, job: &mut Job<'_, '_>) -> Result<(), RunError> {
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
    pub(super) fn fill(
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
    pub(super) fn enter(&mut self, retries: &mut u32) -> Result<(), RunError> {
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
    pub(super) fn drain_cq(&mut self) -> Result<(), RunError> {
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
    pub(super) fn complete(
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
    pub(super) fn fsync(&mut self) -> Result<(), RunError> {
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

impl Drop for Ring {
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
