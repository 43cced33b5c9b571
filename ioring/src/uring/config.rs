//! [`UringConfig`] (tunables and their bounds), [`UringSetupError`] and
//! [`UringStats`].

use std::io;

use crate::aligned::{AlignedBufError, BLOCK_BYTES};
use crate::device::DeviceError;

use super::{POOL_BYTES_MAX, QUEUE_DEPTH_MAX, RINGS_MAX, SLOT_BYTES_MAX};

/// Tunables of [`UringStorage`](super::UringStorage).
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

/// Errors creating a [`UringStorage`](super::UringStorage).
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

/// Counters of one [`UringStorage`](super::UringStorage) since it was opened.
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
