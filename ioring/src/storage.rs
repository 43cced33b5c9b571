//! The [`Storage`] trait the engine is generic over, its error type and the
//! failure latch shared by every implementation.
//!
//! # Contract
//!
//! - **Alignment.** Every offset and every length is a multiple of
//!   [`Geometry::logical_block_bytes`] and the range lies inside
//!   [`Geometry::size_bytes`]; otherwise the call returns
//!   [`StorageError::Misaligned`] or [`StorageError::OutOfBounds`] before any
//!   I/O is issued. Buffer *memory* needs no alignment: implementations copy
//!   through their own aligned buffers. Zero-length entries are no-ops.
//! - **Completion is not durability.** [`Storage::write_batch`] returns when
//!   every write of the batch has completed: a later read returns the new
//!   data, but a power loss may still lose or tear it. Data is durable once
//!   [`Storage::write_durable`] returned for it, or once a [`Storage::flush`]
//!   *called after its write returned* has returned.
//! - **No ordering inside a batch.** The writes of one batch are in flight
//!   together and may reach the media in any order, so entries of one batch
//!   must not overlap ([`StorageError::Overlap`]). Order between calls is the
//!   call order: a call starts its I/O only after the previous call's I/O
//!   completed.
//! - **Failure latch.** The first error of a write or a flush latches the
//!   storage: that call and every later call (reads included) return
//!   [`StorageError::Failed`] naming the first failure, because after a failed
//!   write or flush nothing can be known to be durable. A failed read returns
//!   [`StorageError::Io`] and does not latch. Argument errors never latch.
//! - **Threads.** Every method takes `&self` and implementations are
//!   `Send + Sync`; concurrent calls are allowed and are executed as if in
//!   some serial order.

use std::fmt;
use std::io;
use std::sync::{Arc, OnceLock};

use crate::device::Geometry;

/// Kind of operation, for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// A write from [`Storage::write_batch`].
    Write,
    /// A write from [`Storage::write_durable`].
    WriteDurable,
    /// A read from [`Storage::read_batch`].
    Read,
    /// A [`Storage::flush`].
    Flush,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Write => "write",
            IoOp::WriteDurable => "durable write",
            IoOp::Read => "read",
            IoOp::Flush => "flush",
        })
    }
}

/// The first failed write or flush, kept by the latch.
#[derive(Debug, Clone)]
pub struct IoFailure {
    /// Device name (path of the device, or the simulated device's name).
    pub device: String,
    /// What failed.
    pub op: IoOp,
    /// Byte offset of the failed I/O on the device (0 for a flush).
    pub offset: u64,
    /// Length of the failed I/O in bytes (0 for a flush).
    pub len_bytes: u64,
    /// Error reported by the kernel or the simulator.
    pub cause: Arc<io::Error>,
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} bytes at offset {} on {} failed: {}",
            self.op, self.len_bytes, self.offset, self.device, self.cause
        )
    }
}

/// Errors of [`Storage`] calls. Every variant names the device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// An offset or length is not a multiple of the logical block size.
    #[error(
        "{device}: {op} at offset {offset} of {len_bytes} bytes is not aligned to the \
         {block_bytes}-byte logical block"
    )]
    Misaligned {
        /// Device name.
        device: String,
        /// Requested operation.
        op: IoOp,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len_bytes: u64,
        /// Required alignment.
        block_bytes: u32,
    },
    /// The range ends past the end of the device.
    #[error(
        "{device}: {op} at offset {offset} of {len_bytes} bytes ends past the device size \
         {size_bytes}"
    )]
    OutOfBounds {
        /// Device name.
        device: String,
        /// Requested operation.
        op: IoOp,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len_bytes: u64,
        /// Device size.
        size_bytes: u64,
    },
    /// Two writes of one batch overlap; their order would be undefined.
    #[error(
        "{device}: writes in one batch overlap: offset {first_offset} ({first_len_bytes} bytes) \
         and offset {second_offset} ({second_len_bytes} bytes)"
    )]
    Overlap {
        /// Device name.
        device: String,
        /// Lower of the two offsets.
        first_offset: u64,
        /// Its length.
        first_len_bytes: u64,
        /// Higher of the two offsets.
        second_offset: u64,
        /// Its length.
        second_len_bytes: u64,
    },
    /// A read failed. Reads do not latch the storage.
    #[error("{device}: {op} at offset {offset} of {len_bytes} bytes failed: {source}")]
    Io {
        /// Device name.
        device: String,
        /// Operation.
        op: IoOp,
        /// Offset of the failed I/O.
        offset: u64,
        /// Length of the failed I/O.
        len_bytes: u64,
        /// Kernel or simulator error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The storage is latched failed: a write or flush failed (in this call
    /// or earlier) and no further I/O is accepted. The fields name the
    /// *first* failure.
    #[error(
        "storage {device} is failed since a {op} at offset {offset} of {len_bytes} bytes \
         failed ({cause}); nothing written since can be trusted to be durable"
    )]
    Failed {
        /// Device name.
        device: String,
        /// Operation of the first failure.
        op: IoOp,
        /// Offset of the first failure (0 for a flush).
        offset: u64,
        /// Length of the first failure (0 for a flush).
        len_bytes: u64,
        /// Error of the first failure.
        #[source]
        cause: Arc<io::Error>,
    },
}

impl StorageError {
    /// True for [`StorageError::Failed`]: the storage accepts no more I/O.
    pub fn is_failed(&self) -> bool {
        matches!(self, StorageError::Failed { .. })
    }

    /// The device offset of the I/O this error is about.
    pub fn offset(&self) -> Option<u64> {
        match self {
            StorageError::Misaligned { offset, .. }
            | StorageError::OutOfBounds { offset, .. }
            | StorageError::Io { offset, .. }
            | StorageError::Failed { offset, .. } => Some(*offset),
            StorageError::Overlap { first_offset, .. } => Some(*first_offset),
        }
    }

    fn from_failure(failure: &IoFailure) -> Self {
        StorageError::Failed {
            device: failure.device.clone(),
            op: failure.op,
            offset: failure.offset,
            len_bytes: failure.len_bytes,
            cause: Arc::clone(&failure.cause),
        }
    }
}

/// A block storage device as seen by the engine; see the module docs for the
/// contract every implementation follows.
pub trait Storage: Send + Sync {
    /// Name used in errors (the device path for real devices).
    fn device_name(&self) -> &str;

    /// Size and block sizes; constant for the lifetime of the value.
    fn geometry(&self) -> Geometry;

    /// Writes every `(offset, data)` entry, all submitted together; returns
    /// when all have completed. Not durable by itself. Entries must not
    /// overlap. On error any subset of the entries may have been written,
    /// possibly partially, and the storage is latched failed.
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError>;

    /// Writes `data` at `offset` and returns once it is durable (FUA /
    /// `RWF_DSYNC` semantics). Says nothing about other writes that are not
    /// yet flushed.
    fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), StorageError>;

    /// Reads every `(offset, buffer)` entry, all submitted together; returns
    /// when all buffers are filled. Entries may overlap.
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), StorageError>;

    /// Durability barrier: when it returns `Ok`, every write that completed
    /// before `flush` was called is durable.
    fn flush(&self) -> Result<(), StorageError>;

    /// The latched first failure, if any.
    fn failure(&self) -> Option<IoFailure>;

    /// Writes one buffer; see [`Storage::write_batch`].
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.write_batch(&[(offset, data)])
    }

    /// Reads one buffer; see [`Storage::read_batch`].
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        self.read_batch(&mut [(offset, buf)])
    }
}

impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn device_name(&self) -> &str {
        (**self).device_name()
    }
    fn geometry(&self) -> Geometry {
        (**self).geometry()
    }
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        (**self).write_batch(writes)
    }
    fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        (**self).write_durable(offset, data)
    }
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), StorageError> {
        (**self).read_batch(reads)
    }
    fn flush(&self) -> Result<(), StorageError> {
        (**self).flush()
    }
    fn failure(&self) -> Option<IoFailure> {
        (**self).failure()
    }
}

/// Records the first write or flush failure of a storage; once tripped it
/// stays tripped. Lock-free to check.
#[derive(Debug, Default)]
pub struct FailureLatch {
    first: OnceLock<IoFailure>,
}

impl FailureLatch {
    /// A latch that has not tripped.
    pub fn new() -> Self {
        Self::default()
    }

    /// `Err(Failed)` naming the first failure if the latch has tripped.
    pub fn check(&self) -> Result<(), StorageError> {
        match self.first.get() {
            Some(failure) => Err(StorageError::from_failure(failure)),
            None => Ok(()),
        }
    }

    /// Trips the latch with `failure` unless it already tripped, and returns
    /// the `Failed` error naming whichever failure came first.
    pub fn trip(&self, failure: IoFailure) -> StorageError {
        let first = self.first.get_or_init(|| failure);
        StorageError::from_failure(first)
    }

    /// The first failure, if the latch has tripped.
    pub fn failure(&self) -> Option<IoFailure> {
        self.first.get().cloned()
    }
}

/// Checks that `[offset, offset + len_bytes)` is block aligned and inside the
/// device.
pub fn check_range(
    device: &str,
    geometry: &Geometry,
    op: IoOp,
    offset: u64,
    len_bytes: usize,
) -> Result<(), StorageError> {
    let len_bytes = len_bytes as u64;
    if !geometry.is_block_aligned(offset) || !geometry.is_block_aligned(len_bytes) {
        return Err(StorageError::Misaligned {
            device: device.to_string(),
            op,
            offset,
            len_bytes,
            block_bytes: geometry.logical_block_bytes,
        });
    }
    match offset.checked_add(len_bytes) {
        Some(end) if end <= geometry.size_bytes => Ok(()),
        _ => Err(StorageError::OutOfBounds {
            device: device.to_string(),
            op,
            offset,
            len_bytes,
            size_bytes: geometry.size_bytes,
        }),
    }
}

/// Checks every entry of a write batch with [`check_range`] and that no two
/// non-empty entries overlap.
pub fn check_write_batch(
    device: &str,
    geometry: &Geometry,
    op: IoOp,
    writes: &[(u64, &[u8])],
) -> Result<(), StorageError> {
    for (offset, data) in writes {
        check_range(device, geometry, op, *offset, data.len())?;
    }
    if writes.len() < 2 {
        return Ok(());
    }
    let mut ranges: Vec<(u64, u64)> = writes
        .iter()
        .filter(|(_, data)| !data.is_empty())
        .map(|(offset, data)| (*offset, data.len() as u64))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let (first_offset, first_len_bytes) = pair[0];
        let (second_offset, second_len_bytes) = pair[1];
        // In bounds was checked above, so the addition cannot overflow.
        if first_offset + first_len_bytes > second_offset {
            return Err(StorageError::Overlap {
                device: device.to_string(),
                first_offset,
                first_len_bytes,
                second_offset,
                second_len_bytes,
            });
        }
    }
    Ok(())
}

/// Checks every entry of a read batch with [`check_range`].
pub fn check_read_batch(
    device: &str,
    geometry: &Geometry,
    reads: &[(u64, &mut [u8])],
) -> Result<(), StorageError> {
    for (offset, buf) in reads {
        check_range(device, geometry, IoOp::Read, *offset, buf.len())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry {
            size_bytes: 1 << 20,
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
        }
    }

    #[test]
    fn range_checks() {
        let g = geometry();
        assert!(check_range("d", &g, IoOp::Write, 0, 512).is_ok());
        assert!(check_range("d", &g, IoOp::Write, (1 << 20) - 512, 512).is_ok());
        assert!(check_range("d", &g, IoOp::Write, 0, 0).is_ok());
        assert!(matches!(
            check_range("d", &g, IoOp::Write, 100, 512),
            Err(StorageError::Misaligned { offset: 100, .. })
        ));
        assert!(matches!(
            check_range("d", &g, IoOp::Read, 0, 100),
            Err(StorageError::Misaligned {
                len_bytes: 100,
                op: IoOp::Read,
                ..
            })
        ));
        assert!(matches!(
            check_range("d", &g, IoOp::Write, 1 << 20, 512),
            Err(StorageError::OutOfBounds { .. })
        ));
        // Offset + length overflowing u64 is out of bounds, not a panic.
        let top = u64::MAX - 511;
        assert!(matches!(
            check_range("d", &g, IoOp::Write, top, 1024),
            Err(StorageError::OutOfBounds { .. })
        ));
        let text = check_range("dev0", &g, IoOp::Write, 7, 512)
            .unwrap_err()
            .to_string();
        assert!(text.contains("dev0") && text.contains("offset 7"), "{text}");
    }

    #[test]
    fn overlap_checks() {
        let g = geometry();
        let a = [0u8; 1024];
        let b = [0u8; 512];
        assert!(check_write_batch("d", &g, IoOp::Write, &[(0, &a), (1024, &b)]).is_ok());
        assert!(check_write_batch("d", &g, IoOp::Write, &[(1024, &b), (0, &a)]).is_ok());
        assert!(
            check_write_batch("d", &g, IoOp::Write, &[(0, &a), (512, &[]), (512, &[])]).is_ok()
        );
        match check_write_batch("d", &g, IoOp::Write, &[(512, &b), (0, &a)]) {
            Err(StorageError::Overlap {
                first_offset,
                second_offset,
                ..
            }) => {
                assert_eq!((first_offset, second_offset), (0, 512));
            }
            other => panic!("expected overlap, got {other:?}"),
        }
    }

    #[test]
    fn implementations_are_send_sync_and_object_safe() {
        fn check<T: Storage + Send + Sync + ?Sized>() {}
        check::<crate::UringStorage>();
        check::<crate::SimStorage>();
        check::<dyn Storage>();
        check::<Arc<dyn Storage>>();
        let sim: Arc<dyn Storage> =
            Arc::new(crate::SimStorage::new(crate::SimConfig::new(1 << 20, 1)).expect("sim"));
        sim.write(0, &[1u8; 4096])
            .expect("write through Arc<dyn Storage>");
        let mut out = [0u8; 4096];
        sim.read(0, &mut out).expect("read");
        assert_eq!(out, [1u8; 4096]);
        sim.flush().expect("flush");
        assert!(sim.failure().is_none());
        assert_eq!(sim.geometry().size_bytes, 1 << 20);
        assert!(sim.device_name().starts_with("sim-"));
    }

    #[test]
    fn latch_keeps_first_failure() {
        let latch = FailureLatch::new();
        assert!(latch.check().is_ok());
        assert!(latch.failure().is_none());
        let first = IoFailure {
            device: "d".into(),
            op: IoOp::Write,
            offset: 4096,
            len_bytes: 512,
            cause: Arc::new(io::Error::from_raw_os_error(libc::EIO)),
        };
        let err = latch.trip(first);
        assert!(err.is_failed());
        let second = IoFailure {
            device: "d".into(),
            op: IoOp::Flush,
            offset: 0,
            len_bytes: 0,
            cause: Arc::new(io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        match latch.trip(second) {
            StorageError::Failed { op, offset, .. } => {
                assert_eq!(op, IoOp::Write);
                assert_eq!(offset, 4096);
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        match latch.check() {
            Err(StorageError::Failed { cause, .. }) => {
                assert_eq!(cause.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        let text = latch.check().unwrap_err().to_string();
        assert!(text.contains("write at offset 4096"), "{text}");
        assert_eq!(latch.failure().map(|f| f.offset), Some(4096));
    }
}
