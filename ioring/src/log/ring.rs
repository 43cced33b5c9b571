//! Arithmetic of the circular log region, shared by the writer and replay so
//! that both apply the same wrap rule (`docs/format.md`, "Wrap rule").
//!
//! Logical log offsets only grow; the physical address of logical offset
//! `L` is `start + L % len`. A batch never crosses the physical end of the
//! region: a batch is limited to the contiguous space left before the end,
//! and a batch that cannot fit there even with a single record is placed at
//! the start of the next lap, leaving the rest of the current lap unwritten
//! (a *lap skip*). Batches are at most half the region
//! ([`Ring::batch_bytes_cap`]), which is what guarantees that an emptied log
//! always has room for the next batch (see [`Ring::place`]).

use crate::aligned::BLOCK_BYTES;
use crate::format::LOG_BATCH_BYTES_MAX;

/// Smallest log region the log accepts: two blocks, so that half the region
/// holds at least one batch.
pub(crate) const RING_BYTES_MIN: u64 = 2 * (BLOCK_BYTES as u64);

/// The log region: `len` bytes at byte address `start`. Both are multiples
/// of 4096 and `len >= RING_BYTES_MIN` (checked by the constructors' callers
/// through [`Ring::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ring {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

impl Ring {
    /// The region, or a description of what is wrong with it.
    pub(crate) fn new(start: u64, len: u64) -> Result<Self, String> {
        if !start.is_multiple_of(BLOCK_BYTES as u64) || !len.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(format!(
                "log region at {start} of {len} bytes is not 4096-aligned"
            ));
        }
        if len < RING_BYTES_MIN {
            return Err(format!(
                "log region of {len} bytes is smaller than the minimum {RING_BYTES_MIN}"
            ));
        }
        if start.checked_add(len).is_none() {
            return Err(format!("log region at {start} of {len} bytes overflows"));
        }
        Ok(Self { start, len })
    }

    /// Byte address of logical offset `logical`.
    pub(crate) fn physical(&self, logical: u64) -> u64 {
        self.start + logical % self.len
    }

    /// Bytes from `logical` to the physical end of the region (`len` at a
    /// lap start).
    pub(crate) fn contiguous(&self, logical: u64) -> u64 {
        self.len - logical % self.len
    }

    /// Logical offset of the start of the lap after the one `logical` is in.
    pub(crate) fn next_lap(&self, logical: u64) -> u64 {
        logical + self.contiguous(logical)
    }

    /// Largest batch: `config_max` capped by the format's limit and by half
    /// the region (rounded down to a block).
    pub(crate) fn batch_bytes_cap(&self, config_max: usize) -> usize {
        let half = (self.len / 2 / (BLOCK_BYTES as u64) * (BLOCK_BYTES as u64))
            .min(usize::MAX as u64) as usize;
        config_max.min(LOG_BATCH_BYTES_MAX).min(half)
    }

    /// Where a batch starts when the previous batch ended at `end` and the
    /// batch is at least `first_batch_bytes` long (the size of the batch
    /// holding only its first record): at `end` if that fits before the
    /// physical end, else at the next lap start.
    ///
    /// With `first_batch_bytes <= len / 2` an empty log always has room:
    /// a skip happens only if `first_batch_bytes > len - end % len`, then
    /// `end % len > len / 2 >= first_batch_bytes` and the skip plus the
    /// batch take `len - end % len + first_batch_bytes < len` bytes.
    pub(crate) fn place(&self, end: u64, first_batch_bytes: u64) -> u64 {
        if first_batch_bytes <= self.contiguous(end) {
            end
        } else {
            self.next_lap(end)
        }
    }
}

#[cfg(test)]
mod tests {
    /// One block, as u64.
    const BLOCK: u64 = crate::aligned::BLOCK_BYTES as u64;
    use super::*;

    #[test]
    fn addresses_and_laps() {
        let r = Ring::new(8192, 16 * BLOCK).expect("ring");
        assert_eq!(r.physical(0), 8192);
        assert_eq!(r.physical(5 * BLOCK), 8192 + 5 * BLOCK);
        assert_eq!(r.physical(16 * BLOCK), 8192);
        assert_eq!(r.physical(35 * BLOCK), 8192 + 3 * BLOCK);
        assert_eq!(r.contiguous(0), 16 * BLOCK);
        assert_eq!(r.contiguous(15 * BLOCK), BLOCK);
        assert_eq!(r.contiguous(16 * BLOCK), 16 * BLOCK);
        assert_eq!(r.next_lap(15 * BLOCK), 16 * BLOCK);
        assert_eq!(r.next_lap(16 * BLOCK), 32 * BLOCK);
    }

    #[test]
    fn placement_never_crosses_the_end() {
        let r = Ring::new(0, 16 * BLOCK).expect("ring");
        assert_eq!(r.place(14 * BLOCK, 2 * BLOCK), 14 * BLOCK);
        assert_eq!(r.place(14 * BLOCK, 3 * BLOCK), 16 * BLOCK);
        assert_eq!(r.place(16 * BLOCK, 8 * BLOCK), 16 * BLOCK);
        // Exhaustive: every placement stays inside one lap and, for batches
        // up to half the region, skip + batch fits in an empty ring.
        for end in (0..64).map(|b| b * BLOCK) {
            for first in (1..=8).map(|b| b * BLOCK) {
                let at = r.place(end, first);
                assert!(at >= end);
                assert!(r.contiguous(at) >= first, "end {end} first {first}");
                assert!(at + first - end <= r.len, "end {end} first {first}");
            }
        }
    }

    #[test]
    fn caps_and_validation() {
        let r = Ring::new(0, 10 * BLOCK).expect("ring");
        assert_eq!(r.batch_bytes_cap(1 << 20), 5 * BLOCK as usize);
        assert_eq!(r.batch_bytes_cap(2 * BLOCK_BYTES), 2 * BLOCK_BYTES);
        let r = Ring::new(0, 11 * BLOCK).expect("ring");
        assert_eq!(r.batch_bytes_cap(1 << 20), 5 * BLOCK as usize);
        let r = Ring::new(0, 1 << 40).expect("ring");
        assert_eq!(r.batch_bytes_cap(usize::MAX), LOG_BATCH_BYTES_MAX);
        assert!(Ring::new(100, 8192).is_err());
        assert!(Ring::new(0, 4096).is_err());
        assert!(Ring::new(0, 8000).is_err());
        assert!(Ring::new(u64::MAX - 4095, 8192).is_err());
    }
}
