//! A call's batch ([`Job`]) and how it is cut into slot-sized chunks.

use crate::storage::IoOp;

/// Direction and flags of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    Write { dsync: bool },
    Read,
}

/// The caller's buffers of one batch.
pub(super) enum Job<'a, 'b> {
    Write {
        writes: &'a [(u64, &'b [u8])],
        dsync: bool,
    },
    Read {
        reads: &'a mut [(u64, &'b mut [u8])],
    },
}

impl Job<'_, '_> {
    pub(super) fn dir(&self) -> Dir {
        match self {
            Job::Write { dsync, .. } => Dir::Write { dsync: *dsync },
            Job::Read { .. } => Dir::Read,
        }
    }

    pub(super) fn op(&self) -> IoOp {
        match self {
            Job::Write { dsync: true, .. } => IoOp::WriteDurable,
            Job::Write { dsync: false, .. } => IoOp::Write,
            Job::Read { .. } => IoOp::Read,
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Job::Write { writes, .. } => writes.len(),
            Job::Read { reads } => reads.len(),
        }
    }

    /// Device offset and length of entry `i` (which exists).
    pub(super) fn entry(&self, i: usize) -> (u64, usize) {
        match self {
            Job::Write { writes, .. } => (writes[i].0, writes[i].1.len()),
            Job::Read { reads } => (reads[i].0, reads[i].1.len()),
        }
    }
}

/// Position in a job while it is split into chunks.
#[derive(Debug, Default)]
pub(super) struct ChunkCursor {
    pub(super) entry: usize,
    pub(super) pos: usize,
}

/// One chunk of one entry, in flight in one slot.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk {
    pub(super) entry: usize,
    /// Offset of the chunk inside the caller's buffer.
    pub(super) pos: usize,
    pub(super) dev_offset: u64,
    pub(super) len: u32,
    /// Bytes transferred so far.
    pub(super) done: u32,
    pub(super) resubmits: u32,
}

impl ChunkCursor {
    pub(super) fn next(&mut self, job: &Job<'_, '_>, slot_bytes: usize) -> Option<Chunk> {
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
