//! [`AlignedBuf`]: a zeroed heap buffer whose address is aligned to
//! [`BLOCK_BYTES`] and whose length is a non-zero multiple of it.
//!
//! `O_DIRECT` I/O requires the memory, the file offset and the length to be
//! aligned to the device's logical block size. Every block size refd supports
//! divides 4096, so one alignment serves all devices. The buffer is allocated
//! with [`std::alloc::alloc_zeroed`] so that padding written to disk is always
//! zero, never stale heap contents.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment and length granule of an [`AlignedBuf`], in bytes. This is also
/// the unit of every on-disk structure in [`crate::format`].
pub const BLOCK_BYTES: usize = 4096;

/// Upper bound on a single buffer, in bytes (1 GiB). Larger requests are
/// refused rather than attempted: nothing in refd needs them and a corrupt
/// length field must not turn into a huge allocation.
pub const ALIGNED_BUF_BYTES_MAX: usize = 1 << 30;

// Every supported logical block size (a power of two up to 4096) divides
// BLOCK_BYTES, and `round_up_to_block` masks with it.
const _: () = assert!(BLOCK_BYTES.is_power_of_two());
const _: () = assert!(ALIGNED_BUF_BYTES_MAX.is_multiple_of(BLOCK_BYTES));

/// Why an [`AlignedBuf`] could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlignedBufError {
    /// The requested length is zero.
    #[error("aligned buffer length must be non-zero")]
    ZeroLength,
    /// The requested length is not a multiple of [`BLOCK_BYTES`].
    #[error("aligned buffer length {len_bytes} is not a multiple of {BLOCK_BYTES}")]
    NotBlockMultiple {
        /// Requested length.
        len_bytes: usize,
    },
    /// The requested length exceeds [`ALIGNED_BUF_BYTES_MAX`].
    #[error("aligned buffer length {len_bytes} exceeds the maximum {ALIGNED_BUF_BYTES_MAX}")]
    TooLarge {
        /// Requested length.
        len_bytes: usize,
    },
    /// The allocator returned null.
    #[error("out of memory allocating an aligned buffer of {len_bytes} bytes")]
    OutOfMemory {
        /// Requested length.
        len_bytes: usize,
    },
}

/// A zeroed, [`BLOCK_BYTES`]-aligned heap buffer; see the module docs.
///
/// Invariants: `ptr` is the start of a live allocation made with
/// `layout_for(len)`, `len` is a non-zero multiple of [`BLOCK_BYTES`] and at
/// most [`ALIGNED_BUF_BYTES_MAX`], and the buffer is uniquely owned.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); moving
// it to another thread moves that ownership, and no thread-local state is used.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give `&[u8]` access (through `Deref`), which
// is safe to use from several threads at once, exactly like `&Box<[u8]>`.
unsafe impl Sync for AlignedBuf {}

fn layout_for(len_bytes: usize) -> Result<Layout, AlignedBufError> {
    if len_bytes == 0 {
        return Err(AlignedBufError::ZeroLength);
    }
    if !len_bytes.is_multiple_of(BLOCK_BYTES) {
        return Err(AlignedBufError::NotBlockMultiple { len_bytes });
    }
    if len_bytes > ALIGNED_BUF_BYTES_MAX {
        return Err(AlignedBufError::TooLarge { len_bytes });
    }
    Layout::from_size_align(len_bytes, BLOCK_BYTES)
        .map_err(|_| AlignedBufError::TooLarge { len_bytes })
}

impl AlignedBuf {
    /// Allocates a zeroed buffer of `len_bytes`, which must be a non-zero
    /// multiple of [`BLOCK_BYTES`] no larger than [`ALIGNED_BUF_BYTES_MAX`].
    pub fn zeroed(len_bytes: usize) -> Result<Self, AlignedBufError> {
        let layout = layout_for(len_bytes)?;
        // SAFETY: `layout` has a non-zero size (checked by `layout_for`) and a
        // valid power-of-two alignment, as `alloc_zeroed` requires.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(AlignedBufError::OutOfMemory { len_bytes })?;
        Ok(Self {
            ptr,
            len: len_bytes,
        })
    }

    /// Allocates a buffer of `data.len()` rounded up to a multiple of
    /// [`BLOCK_BYTES`] (at least one block), copies `data` to its start and
    /// leaves the padding zeroed.
    pub fn copy_padded(data: &[u8]) -> Result<Self, AlignedBufError> {
        let len_bytes = round_up_to_block(data.len().max(1)).ok_or(AlignedBufError::TooLarge {
            len_bytes: data.len(),
        })?;
        let mut buf = Self::zeroed(len_bytes)?;
        buf[..data.len()].copy_from_slice(data);
        Ok(buf)
    }

    /// Length in bytes (a non-zero multiple of [`BLOCK_BYTES`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an `AlignedBuf` holds at least one block. Provided for
    /// symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Pointer to the first byte; aligned to [`BLOCK_BYTES`].
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable pointer to the first byte; aligned to [`BLOCK_BYTES`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Sets every byte to zero.
    pub fn fill_zero(&mut self) {
        self.fill(0);
    }
}

/// Rounds `len_bytes` up to the next multiple of [`BLOCK_BYTES`], or `None` on
/// overflow.
pub fn round_up_to_block(len_bytes: usize) -> Option<usize> {
    len_bytes
        .checked_add(BLOCK_BYTES - 1)
        .map(|v| v / BLOCK_BYTES * BLOCK_BYTES)
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes
        // owned by `self`; the shared borrow of `self` prevents mutation for the
        // lifetime of the returned slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` guarantees the
        // returned slice is the only access to the allocation.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // The layout was valid when the buffer was created and `len` never
        // changes, so recomputing it cannot fail; if it somehow did, leaking is
        // the only sound choice.
        if let Ok(layout) = layout_for(self.len) {
            // SAFETY: `ptr` was returned by `alloc_zeroed` with this exact layout
            // and is freed only here, once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        match Self::zeroed(self.len) {
            Ok(mut copy) => {
                copy.copy_from_slice(self);
                copy
            }
            Err(_) => match layout_for(self.len) {
                Ok(layout) => alloc::handle_alloc_error(layout),
                // Unreachable by the type invariant; abort rather than return an
                // invalid buffer.
                Err(_) => std::process::abort(),
            },
        }
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for blocks in [1usize, 2, 3, 16] {
            let buf = AlignedBuf::zeroed(blocks * BLOCK_BYTES).expect("alloc");
            assert_eq!(buf.len(), blocks * BLOCK_BYTES);
            assert_eq!(buf.as_ptr() as usize % BLOCK_BYTES, 0);
            assert!(buf.iter().all(|&b| b == 0));
            assert!(!buf.is_empty());
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(
            AlignedBuf::zeroed(0).unwrap_err(),
            AlignedBufError::ZeroLength
        );
        assert_eq!(
            AlignedBuf::zeroed(4095).unwrap_err(),
            AlignedBufError::NotBlockMultiple { len_bytes: 4095 }
        );
        assert_eq!(
            AlignedBuf::zeroed(ALIGNED_BUF_BYTES_MAX + BLOCK_BYTES).unwrap_err(),
            AlignedBufError::TooLarge {
                len_bytes: ALIGNED_BUF_BYTES_MAX + BLOCK_BYTES
            }
        );
    }

    #[test]
    fn write_read_clone_and_pad() {
        let mut buf = AlignedBuf::zeroed(2 * BLOCK_BYTES).expect("alloc");
        buf[4095] = 7;
        buf[4096] = 9;
        let copy = buf.clone();
        assert_eq!(copy, buf);
        assert_ne!(copy.as_ptr(), buf.as_ptr());
        buf.fill_zero();
        assert!(buf.iter().all(|&b| b == 0));

        let padded = AlignedBuf::copy_padded(b"hello").expect("alloc");
        assert_eq!(padded.len(), BLOCK_BYTES);
        assert_eq!(&padded[..5], b"hello");
        assert!(padded[5..].iter().all(|&b| b == 0));
        let exact = AlignedBuf::copy_padded(&[1u8; BLOCK_BYTES]).expect("alloc");
        assert_eq!(exact.len(), BLOCK_BYTES);
        let empty = AlignedBuf::copy_padded(&[]).expect("alloc");
        assert_eq!(empty.len(), BLOCK_BYTES);
    }

    #[test]
    fn is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AlignedBuf>();
        let buf = AlignedBuf::zeroed(BLOCK_BYTES).expect("alloc");
        let handle = std::thread::spawn(move || buf.len());
        assert_eq!(handle.join().expect("thread"), BLOCK_BYTES);
    }

    #[test]
    fn round_up() {
        assert_eq!(round_up_to_block(0), Some(0));
        assert_eq!(round_up_to_block(1), Some(4096));
        assert_eq!(round_up_to_block(4096), Some(4096));
        assert_eq!(round_up_to_block(4097), Some(8192));
        assert_eq!(round_up_to_block(usize::MAX), None);
    }
}
