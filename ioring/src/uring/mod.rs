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
//! **Buffers.** Each ring owns a pool of `queue_depth` slots of
//! `slot_bytes` each, carved from one [`AlignedBuf`](crate::AlignedBuf) and registered with the
//! ring as fixed buffers. Every I/O goes through a slot: a write copies the
//! caller's bytes into the slot and issues `WriteFixed`; a read issues
//! `ReadFixed` and copies out on completion. Larger entries are split into
//! slot-sized chunks. Copying costs a `memcpy` but buys two properties: the
//! caller's memory needs no alignment, and the kernel only ever touches memory
//! the ring owns, so even if the ring breaks with I/O in flight no caller
//! memory can be written after the call returned (the pool is then leaked
//! instead of freed). If registration is refused (for example by
//! `RLIMIT_MEMLOCK`), the same slots are used with plain `Write`/`Read`.
//!
//! **Bounds and back-pressure.** At most `queue_depth` I/Os are in flight
//! (one per slot); the submission queue has at least that many entries and
//! the completion queue twice that, so neither can overflow. When all slots
//! are busy the ring waits for completions before submitting more chunks.
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
//!
//! Map: `config.rs` (tunables, setup errors, stats), `job.rs` (a call's
//! batch cut into chunks), `ring.rs` (one ring and its pool), this file
//! ([`UringStorage`]: ring choice, the [`Storage`] contract, the latch).

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use crate::device::{Device, Geometry};
use crate::storage::{
    check_range, check_read_batch, check_write_batch, FailureLatch, IoFailure, IoOp, Storage,
    StorageError,
};

mod config;
mod job;
mod ring;
#[cfg(test)]
mod tests;

pub use config::{UringConfig, UringSetupError, UringStats};
use job::Job;
use ring::{Ring, RunError};

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

/// [`Storage`] on an io_uring over a [`Device`]; see the module docs.
pub struct UringStorage {
    // Field order matters: the rings (and their pools) are dropped before
    // the device's file descriptor is closed.
    rings: Box<[Mutex<Ring>]>,
    /// Which ring a call waits for when none is free (round robin).
    next: AtomicUsize,
    latch: FailureLatch,
    device: Device,
    name: String,
    geometry: Geometry,
    config: UringConfig,
    fixed_buffers: bool,
}

impl Drop for UringStorage {
    fn drop(&mut self) {
        // With nothing in flight on any ring (every submitted I/O reaped,
        // no ring broken with I/O abandoned in the kernel), the device's
        // exclusive lock can go now; otherwise it stays with the open file
        // until the kernel lets go of it (see `Device::unlock_idle`).
        let idle = self.rings.iter_mut().all(|r| {
            let r = r.get_mut().unwrap_or_else(|e| e.into_inner());
            r.in_flight == 0 && !r.broken
        });
        if idle {
            self.device.unlock_idle();
        }
    }
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

    /// [`UringStorage::open`] on [`Device::open_when_free`]: waits up to
    /// `wait` for a device another (killed) opener still holds.
    pub fn open_when_free(
        path: impl AsRef<Path>,
        min_size_bytes: u64,
        config: UringConfig,
        wait: std::time::Duration,
    ) -> Result<Self, UringSetupError> {
        config.check()?;
        let device = Device::open_when_free(path, min_size_bytes, wait)?;
        Self::new(device, config)
    }

    /// Creates the ring and buffer pool for an already opened device.
    pub fn new(mut device: Device, config: UringConfig) -> Result<Self, UringSetupError> {
        config.check()?;
        // Our drop releases the lock, only with nothing in flight.
        device.keep_lock_on_drop();
        let name = device.path().display().to_string();
        let rings = (0..config.rings)
            .map(|_| Ring::new(device.as_raw_fd(), &config, &name).map(Mutex::new))
            .collect::<Result<Box<[_]>, _>>()?;
        let fixed_buffers = rings.iter().all(|e| e.lock().is_ok_and(|e| e.fixed));
        Ok(Self {
            rings,
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
        for e in self.rings.iter() {
            let s = match e.lock() {
                Ok(ring) => ring.stats,
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
    fn lock(&self, op: IoOp) -> Result<MutexGuard<'_, Ring>, StorageError> {
        for e in self.rings.iter() {
            match e.try_lock() {
                Ok(guard) => return Ok(guard),
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Poisoned(_)) => return Err(self.poisoned(op)),
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.rings.len();
        self.rings[i].lock().map_err(|_| self.poisoned(op))
    }

    fn poisoned(&self, op: IoOp) -> StorageError {
        self.latch.trip(IoFailure {
            device: self.name.clone(),
            op,
            offset: 0,
            len_bytes: 0,
            cause: Arc::new(io::Error::other(
                "io_uring ring poisoned by a panic during an earlier call",
            )),
        })
    }

    fn run(&self, mut job: Job<'_, '_>) -> Result<(), StorageError> {
        let op = job.op();
        let mut ring = self.lock(op)?;
        // Another thread may have failed while this one waited for the lock.
        self.latch.check()?;
        match ring.run(&mut job) {
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
        let mut ring = self.lock(IoOp::Flush)?;
        self.latch.check()?;
        ring.fsync().map_err(|e| self.error(IoOp::Flush, e))
    }

    fn failure(&self) -> Option<IoFailure> {
        self.latch.failure()
    }
}
