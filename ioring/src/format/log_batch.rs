//! Log batch framing.
//!
//! A batch is what one group commit writes: a header, then the payload (a
//! sequence of length-prefixed opaque records), then zero padding up to a
//! multiple of 4096 bytes. Each batch claims its *logical* log offset: a
//! byte position in the log stream that only grows (it never wraps), while
//! the physical position is `log_start + log_offset % log_bytes`. Replay
//! starts at the superblock's `log_head_offset` and decodes batches until
//! the first error; each error kind says why the log ends there:
//!
//! - [`FormatError::BadMagic`]: never written (or garbage).
//! - [`FormatError::BadChecksum`]: the header itself is corrupt or torn.
//! - [`FormatError::Stale`]: a valid batch from an earlier pass over the
//!   circular log (its logical offset is lower than expected).
//! - [`FormatError::Torn`]: the header is intact but the payload is not —
//!   the typical result of a crash during the batch write.
//! - [`FormatError::WrongAddress`], [`FormatError::ForeignFs`]: misdirected
//!   write, or a leftover of an earlier format of the device.
//!
//! Whether an error at a given position is a clean end or corruption in the
//! middle of the log is the recovery's decision (it knows `log_tail_lsn`).
//!
//! Two checksums: the header checksum covers the header (including the
//! payload checksum), the payload checksum covers everything after the
//! header up to `batch_bytes` (payload and padding). Together they cover the
//! whole batch, and they let a torn payload be told apart from a torn header.

use crate::aligned::{round_up_to_block, AlignedBuf, BLOCK_BYTES};
use crate::format::le::{get_u32, get_u64, put_bytes, put_u32, put_u64};
use crate::format::{
    block_checksum, check_preamble, BlockKind, FormatError, FsId, CHECKSUM_OFFSET,
};

/// Magic of a log batch header.
pub const LOG_BATCH_MAGIC: [u8; 8] = *b"REFDLOG1";
/// Layout version written and read by this build. Version 2 framed each
/// record with a varint length (version 1 used a fixed 4-byte length);
/// version 3 chains every batch to the one before it (`prev_checksum`), so
/// that replay can tell a torn tail from corruption in the middle of the log.
pub const LOG_BATCH_VERSION: u32 = 3;
/// Size of the batch header in bytes; the payload starts right after it.
pub const LOG_BATCH_HEADER_BYTES: usize = 80;
/// Largest batch in bytes (16 MiB), header and padding included.
pub const LOG_BATCH_BYTES_MAX: usize = 16 << 20;
/// Largest length prefix of a record: an unsigned LEB128 varint of a `u32`
/// (1 byte for bodies shorter than 128 bytes, 2 below 16 KiB, 3 below
/// 2 MiB, 4 for anything that fits in a batch).
pub const LOG_RECORD_LEN_BYTES_MAX: usize = 5;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = crate::format::PREAMBLE_OFF_VERSION;
const OFF_FS_ID: usize = crate::format::PREAMBLE_OFF_FS_ID;
const OFF_LSN: usize = 32;
const OFF_TXN_ID: usize = 40;
const OFF_LOG_OFFSET: usize = 48;
pub(crate) const OFF_BATCH_BYTES: usize = 56;
pub(crate) const OFF_PAYLOAD_BYTES: usize = 60;
pub(crate) const OFF_RECORD_COUNT: usize = 64;
pub(crate) const OFF_PAYLOAD_CRC: usize = 68;
pub(crate) const OFF_PREV_CHECKSUM: usize = 72;
const OFF_RESERVED: usize = 76;

// Header fields are packed in order after the preamble; the reserved word
// ends the header, which fits in the first block (`decode_batch_header`
// reads only that block).
const _: () = assert!(OFF_MAGIC + 8 == CHECKSUM_OFFSET && OFF_FS_ID + 16 == OFF_LSN);
const _: () = assert!(OFF_LSN + 8 == OFF_TXN_ID && OFF_TXN_ID + 8 == OFF_LOG_OFFSET);
const _: () = assert!(OFF_LOG_OFFSET + 8 == OFF_BATCH_BYTES);
const _: () = assert!(OFF_BATCH_BYTES + 4 == OFF_PAYLOAD_BYTES);
const _: () = assert!(OFF_PAYLOAD_BYTES + 4 == OFF_RECORD_COUNT);
const _: () = assert!(OFF_RECORD_COUNT + 4 == OFF_PAYLOAD_CRC);
const _: () = assert!(OFF_PAYLOAD_CRC + 4 == OFF_PREV_CHECKSUM);
const _: () = assert!(OFF_PREV_CHECKSUM + 4 == OFF_RESERVED);
const _: () = assert!(OFF_RESERVED + 4 == LOG_BATCH_HEADER_BYTES);
const _: () = assert!(LOG_BATCH_HEADER_BYTES <= BLOCK_BYTES);
// Batches are whole blocks; their size (and so every length and count in
// them) fits the u32 header fields; one fits an aligned buffer.
const _: () = assert!(LOG_BATCH_BYTES_MAX.is_multiple_of(BLOCK_BYTES));
const _: () = assert!(LOG_BATCH_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(LOG_BATCH_BYTES_MAX <= crate::aligned::ALIGNED_BUF_BYTES_MAX);
// A varint of LOG_RECORD_LEN_BYTES_MAX bytes holds any u32 length.
const _: () = assert!(7 * LOG_RECORD_LEN_BYTES_MAX >= 32);

/// Decoded batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// File system the batch belongs to.
    pub fs_id: FsId,
    /// Log sequence number; increases by one per batch.
    pub lsn: u64,
    /// Transaction id of the commit that wrote the batch.
    pub txn_id: u64,
    /// Logical log offset the batch was written for.
    pub log_offset: u64,
    /// Total length of the batch on disk, a multiple of 4096.
    pub batch_bytes: u32,
    /// Length of the payload (records with their length prefixes).
    pub payload_bytes: u32,
    /// Number of records in the payload.
    pub record_count: u32,
    /// CRC-32C of bytes `LOG_BATCH_HEADER_BYTES..batch_bytes`.
    pub payload_crc: u32,
    /// The chain link: the header checksum of the batch before this one
    /// (LSN - 1), or the superblock's `log_head_chain` seed for the first
    /// batch of a fresh log.
    pub prev_checksum: u32,
    /// This header's own checksum (bytes 8..12): what the next batch's
    /// `prev_checksum` must be.
    pub checksum: u32,
}

impl BatchHeader {
    /// Logical log offset of the next batch.
    pub fn next_log_offset(&self) -> u64 {
        self.log_offset + u64::from(self.batch_bytes)
    }
}

/// A decoded, fully verified batch borrowing the buffer it was read into.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// The header.
    pub header: BatchHeader,
    payload: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// The records, in the order they were encoded.
    pub fn records(&self) -> Records<'a> {
        Records {
            rest: self.payload,
            left: self.header.record_count,
        }
    }

    /// The raw payload (records with their length prefixes).
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// Iterator over the records of a [`BatchView`]. The framing was verified
/// by [`decode_batch`], so iteration cannot fail.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
    left: u32,
}

/// Bytes of the varint length prefix of a record body of `len_bytes`.
pub fn record_len_prefix_bytes(len_bytes: usize) -> usize {
    let mut n = 1;
    let mut v = len_bytes >> 7;
    while v != 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// Bytes a record body of `len_bytes` occupies in a payload: its varint
/// length prefix plus the body.
pub fn framed_record_bytes(len_bytes: usize) -> usize {
    record_len_prefix_bytes(len_bytes) + len_bytes
}

/// Writes the varint length prefix of `len` at `buf[at..]`; returns the
/// number of bytes written. The caller sized `buf` with
/// [`record_len_prefix_bytes`].
fn put_varint(buf: &mut [u8], at: usize, len: u32) -> usize {
    let mut v = len;
    let mut i = at;
    loop {
        let low = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            buf[i] = low;
            return i + 1 - at;
        }
        buf[i] = low | 0x80;
        i += 1;
    }
}

/// Reads a minimal (canonical) LEB128 `u32` at the start of `buf`: returns
/// the value and the bytes it took, or `None` if it is truncated, longer
/// than [`LOG_RECORD_LEN_BYTES_MAX`] bytes, overflows `u32` or is not the
/// shortest encoding (the encoder only writes shortest encodings, so any
/// other form is corruption, never accepted silently).
fn get_varint(buf: &[u8]) -> Option<(u32, usize)> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().take(LOG_RECORD_LEN_BYTES_MAX).enumerate() {
        value |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let used = i + 1;
            // A zero final byte after the first is a non-minimal encoding.
            if used > 1 && b == 0 {
                return None;
            }
            return u32::try_from(value).ok().map(|v| (v, used));
        }
    }
    None
}

/// Splits one record off `rest`, or `None` if the framing is broken.
fn split_record(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, prefix) = get_varint(rest)?;
    let end = prefix.checked_add(len as usize)?;
    let body = rest.get(prefix..end)?;
    Some((body, &rest[end..]))
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let (record, rest) = split_record(self.rest)?;
        self.rest = rest;
        self.left -= 1;
        Some(record)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl ExactSizeIterator for Records<'_> {}

/// Bytes a batch holding `records` occupies on disk (header, framed records,
/// padding), or `None` if it would exceed [`LOG_BATCH_BYTES_MAX`]. Lets the
/// log writer check for space before encoding.
pub fn batch_bytes_for(records: &[&[u8]]) -> Option<usize> {
    let mut payload_bytes: usize = 0;
    for r in records {
        payload_bytes = payload_bytes.checked_add(framed_record_bytes(r.len()))?;
    }
    batch_bytes_for_payload(payload_bytes)
}

/// Bytes a batch whose payload (framed records) is `payload_bytes` long
/// occupies on disk, or `None` above [`LOG_BATCH_BYTES_MAX`]. With
/// [`framed_record_bytes`] this lets a writer size a batch incrementally.
pub fn batch_bytes_for_payload(payload_bytes: usize) -> Option<usize> {
    let total = round_up_to_block(LOG_BATCH_HEADER_BYTES.checked_add(payload_bytes)?)?;
    (total <= LOG_BATCH_BYTES_MAX).then_some(total)
}

fn invalid(addr: u64, field: &'static str, reason: String) -> FormatError {
    FormatError::Invalid {
        what: BlockKind::LogBatch,
        addr,
        field,
        reason,
    }
}

/// Identity of a batch to encode: where it goes and what it chains to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchId {
    /// File system the batch belongs to.
    pub fs_id: FsId,
    /// Its LSN.
    pub lsn: u64,
    /// Transaction id of the commit writing it.
    pub txn_id: u64,
    /// Logical log offset (a multiple of 4096).
    pub log_offset: u64,
    /// Header checksum of the previous batch ([`BatchHeader::checksum`]),
    /// or the superblock's `log_head_chain` for the first batch.
    pub prev_checksum: u32,
}

impl BatchId {
    /// A batch of `fs_id` with LSN `lsn` at `log_offset`, chained to
    /// `prev_checksum` 0 (set [`BatchId::prev_checksum`] for a real chain).
    pub fn new(fs_id: &FsId, lsn: u64, txn_id: u64, log_offset: u64) -> Self {
        Self {
            fs_id: *fs_id,
            lsn,
            txn_id,
            log_offset,
            prev_checksum: 0,
        }
    }
}

/// Encodes one batch for logical log offset `log_offset` (a multiple of
/// 4096), chained to the batch before it by `prev_checksum`. Each record is
/// written as its length (unsigned LEB128 varint, shortest form) followed
/// by its bytes; records may be empty; zero records is allowed. The
/// header's checksum (what the next batch chains to) is at bytes 8..12 of
/// the result ([`batch_checksum`]).
pub fn encode_batch(id: &BatchId, records: &[&[u8]]) -> Result<AlignedBuf, FormatError> {
    let BatchId {
        fs_id,
        lsn,
        txn_id,
        log_offset,
        prev_checksum,
    } = *id;
    let fs_id = &fs_id;
    if !log_offset.is_multiple_of(BLOCK_BYTES as u64) {
        return Err(invalid(
            log_offset,
            "log_offset",
            format!("{log_offset} is not a multiple of 4096"),
        ));
    }
    let batch_bytes = batch_bytes_for(records).ok_or_else(|| {
        invalid(
            log_offset,
            "batch_bytes",
            format!(
                "{} records exceed the {LOG_BATCH_BYTES_MAX}-byte batch limit",
                records.len()
            ),
        )
    })?;
    let record_count = u32::try_from(records.len()).map_err(|_| {
        invalid(
            log_offset,
            "record_count",
            format!("{} records", records.len()),
        )
    })?;
    let mut buf = AlignedBuf::zeroed(batch_bytes)
        .map_err(|e| invalid(log_offset, "batch_bytes", e.to_string()))?;
    let mut at = LOG_BATCH_HEADER_BYTES;
    for r in records {
        // Lengths fit in u32: the whole batch is at most 16 MiB.
        at += put_varint(&mut buf, at, r.len() as u32);
        put_bytes(&mut buf, at, r);
        at += r.len();
    }
    let payload_bytes = (at - LOG_BATCH_HEADER_BYTES) as u32;
    let payload_crc = crc32c::crc32c(&buf[LOG_BATCH_HEADER_BYTES..]);
    put_bytes(&mut buf, OFF_MAGIC, &LOG_BATCH_MAGIC);
    put_u32(&mut buf, OFF_VERSION, LOG_BATCH_VERSION);
    put_bytes(&mut buf, OFF_FS_ID, &fs_id.0);
    put_u64(&mut buf, OFF_LSN, lsn);
    put_u64(&mut buf, OFF_TXN_ID, txn_id);
    put_u64(&mut buf, OFF_LOG_OFFSET, log_offset);
    put_u32(&mut buf, OFF_BATCH_BYTES, batch_bytes as u32);
    put_u32(&mut buf, OFF_PAYLOAD_BYTES, payload_bytes);
    put_u32(&mut buf, OFF_RECORD_COUNT, record_count);
    put_u32(&mut buf, OFF_PAYLOAD_CRC, payload_crc);
    put_u32(&mut buf, OFF_PREV_CHECKSUM, prev_checksum);
    let header_crc = block_checksum(&buf[..LOG_BATCH_HEADER_BYTES]);
    put_u32(&mut buf, CHECKSUM_OFFSET, header_crc);
    debug_assert!(
        decodes_to(&buf, id, records),
        "an encoded log batch must decode to its records"
    );
    Ok(buf)
}

/// The header checksum of an encoded batch (bytes 8..12): the value the
/// next batch's `prev_checksum` carries.
pub fn batch_checksum(buf: &[u8]) -> u32 {
    get_u32(buf, CHECKSUM_OFFSET)
}

/// Whether `buf` decodes as the batch `encode_batch` was asked for: the
/// postcondition of [`encode_batch`] (debug builds).
fn decodes_to(buf: &[u8], id: &BatchId, records: &[&[u8]]) -> bool {
    let Ok(view) = decode_batch(buf, &id.fs_id, id.log_offset) else {
        return false;
    };
    let h = view.header;
    h.lsn == id.lsn
        && h.txn_id == id.txn_id
        && h.log_offset == id.log_offset
        && h.prev_checksum == id.prev_checksum
        && h.checksum == batch_checksum(buf)
        && h.batch_bytes as usize == buf.len()
        && view.records().len() == records.len()
        && view.records().zip(records).all(|(a, b)| a == *b)
}

/// Decodes and verifies the header at the start of `buf` (at least
/// [`LOG_BATCH_HEADER_BYTES`]; reading the first 4096-byte block is enough)
/// for the batch expected at logical offset `expected_log_offset`. Use it to
/// learn `batch_bytes` before reading the rest, then call [`decode_batch`].
pub fn decode_batch_header(
    buf: &[u8],
    fs_id: &FsId,
    expected_log_offset: u64,
) -> Result<BatchHeader, FormatError> {
    let what = BlockKind::LogBatch;
    let addr = expected_log_offset;
    let h = check_preamble(
        buf,
        what,
        addr,
        LOG_BATCH_HEADER_BYTES,
        LOG_BATCH_MAGIC,
        LOG_BATCH_VERSION,
        Some(fs_id),
    )?;
    let header = BatchHeader {
        fs_id: *fs_id,
        lsn: get_u64(h, OFF_LSN),
        txn_id: get_u64(h, OFF_TXN_ID),
        log_offset: get_u64(h, OFF_LOG_OFFSET),
        batch_bytes: get_u32(h, OFF_BATCH_BYTES),
        payload_bytes: get_u32(h, OFF_PAYLOAD_BYTES),
        record_count: get_u32(h, OFF_RECORD_COUNT),
        payload_crc: get_u32(h, OFF_PAYLOAD_CRC),
        prev_checksum: get_u32(h, OFF_PREV_CHECKSUM),
        checksum: get_u32(h, CHECKSUM_OFFSET),
    };
    if get_u32(h, OFF_RESERVED) != 0 {
        return Err(invalid(
            addr,
            "reserved",
            "reserved bytes are not zero".to_string(),
        ));
    }
    let batch_bytes = header.batch_bytes as usize;
    if batch_bytes == 0
        || !batch_bytes.is_multiple_of(BLOCK_BYTES)
        || batch_bytes > LOG_BATCH_BYTES_MAX
    {
        return Err(invalid(
            addr,
            "batch_bytes",
            format!("{batch_bytes} is not a non-zero multiple of 4096 up to {LOG_BATCH_BYTES_MAX}"),
        ));
    }
    if LOG_BATCH_HEADER_BYTES + header.payload_bytes as usize > batch_bytes {
        return Err(invalid(
            addr,
            "payload_bytes",
            format!(
                "{} does not fit in a {batch_bytes}-byte batch",
                header.payload_bytes
            ),
        ));
    }
    if header.log_offset < expected_log_offset {
        return Err(FormatError::Stale {
            expected_log_offset,
            found_log_offset: header.log_offset,
            lsn: header.lsn,
        });
    }
    if header.log_offset > expected_log_offset {
        return Err(FormatError::WrongAddress {
            what,
            expected: expected_log_offset,
            found: header.log_offset,
        });
    }
    Ok(header)
}

/// Decodes and verifies a whole batch expected at logical offset
/// `expected_log_offset`. `buf` must hold at least `batch_bytes` (else
/// [`FormatError::Truncated`] with the size needed); extra bytes are ignored.
pub fn decode_batch<'a>(
    buf: &'a [u8],
    fs_id: &FsId,
    expected_log_offset: u64,
) -> Result<BatchView<'a>, FormatError> {
    let header = decode_batch_header(buf, fs_id, expected_log_offset)?;
    let batch_bytes = header.batch_bytes as usize;
    if buf.len() < batch_bytes {
        return Err(FormatError::Truncated {
            what: BlockKind::LogBatch,
            addr: expected_log_offset,
            len_bytes: buf.len(),
            need_bytes: batch_bytes,
        });
    }
    let computed = crc32c::crc32c(&buf[LOG_BATCH_HEADER_BYTES..batch_bytes]);
    if computed != header.payload_crc {
        return Err(FormatError::Torn {
            log_offset: header.log_offset,
            lsn: header.lsn,
            stored: header.payload_crc,
            computed,
        });
    }
    let payload =
        &buf[LOG_BATCH_HEADER_BYTES..LOG_BATCH_HEADER_BYTES + header.payload_bytes as usize];
    // Verify the framing once so that `Records` cannot fail.
    let mut rest = payload;
    for i in 0..header.record_count {
        rest = match split_record(rest) {
            Some((_, rest)) => rest,
            None => {
                return Err(invalid(
                    expected_log_offset,
                    "record framing",
                    format!("record {i} of {} overruns the payload", header.record_count),
                ))
            }
        };
    }
    if !rest.is_empty() {
        return Err(invalid(
            expected_log_offset,
            "record framing",
            format!(
                "{} bytes left after {} records",
                rest.len(),
                header.record_count
            ),
        ));
    }
    Ok(BatchView { header, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FS: FsId = FsId([7; 16]);

    /// `encode_batch` with a chain link of 0x5EED.
    fn encode(
        fs_id: &FsId,
        lsn: u64,
        txn_id: u64,
        log_offset: u64,
        records: &[&[u8]],
    ) -> Result<AlignedBuf, FormatError> {
        let id = BatchId {
            fs_id: *fs_id,
            lsn,
            txn_id,
            log_offset,
            prev_checksum: 0x5EED,
        };
        encode_batch(&id, records)
    }

    fn reseal_header(buf: &mut [u8]) {
        let crc = block_checksum(&buf[..LOG_BATCH_HEADER_BYTES]);
        put_u32(buf, CHECKSUM_OFFSET, crc);
    }

    #[test]
    fn round_trip() {
        let big = vec![0xEEu8; 10_000];
        let records: Vec<&[u8]> = vec![b"alpha", b"", &big, b"omega"];
        let buf = encode(&FS, 42, 7, 8192, &records).expect("encode");
        assert_eq!(buf.len(), batch_bytes_for(&records).expect("size"));
        assert_eq!(buf.len(), 12288);
        let view = decode_batch(&buf, &FS, 8192).expect("decode");
        assert_eq!(view.header.lsn, 42);
        assert_eq!(view.header.txn_id, 7);
        assert_eq!(view.header.log_offset, 8192);
        assert_eq!(view.header.record_count, 4);
        assert_eq!(view.header.next_log_offset(), 8192 + 12288);
        let decoded: Vec<&[u8]> = view.records().collect();
        assert_eq!(decoded, records);
        assert_eq!(view.records().len(), 4);
        // Varint prefixes: 1 + 1 + 2 + 1 bytes.
        assert_eq!(view.payload().len(), 5 + 5 + 10_000 + 5);

        let empty = encode(&FS, 1, 1, 0, &[]).expect("encode");
        assert_eq!(empty.len(), 4096);
        assert_eq!(
            decode_batch(&empty, &FS, 0)
                .expect("decode")
                .records()
                .count(),
            0
        );

        // Header-only decode from the first block, then the rest is needed.
        let header = decode_batch_header(&buf[..4096], &FS, 8192).expect("header");
        assert_eq!(header.batch_bytes, 12288);
        assert!(matches!(
            decode_batch(&buf[..4096], &FS, 8192),
            Err(FormatError::Truncated {
                need_bytes: 12288,
                ..
            })
        ));
    }

    /// Pins the byte layout: if this fails, the on-disk format changed and
    /// `docs/format.md` and the version must change with it.
    #[test]
    fn golden_header_bytes() {
        let buf = encode(&FsId([0xAB; 16]), 0x0102, 0x0304, 0x5000, &[b"hi"]).expect("encode");
        let header: String = buf[..LOG_BATCH_HEADER_BYTES + 6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            header,
            "524546444c4f4731b2ce0f9703000000abababababababababababababababab02010000000000000403000000000000005000000000000000100000030000000100000004363d4eed5e000000000000026869000000"
        );
    }

    #[test]
    fn varint_lengths() {
        for (len, prefix) in [
            (0usize, 1usize),
            (1, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            ((1 << 21) - 1, 3),
            (1 << 21, 4),
            ((1 << 28) - 1, 4),
            (1 << 28, 5),
            (u32::MAX as usize, 5),
        ] {
            assert_eq!(record_len_prefix_bytes(len), prefix, "len {len}");
            assert_eq!(framed_record_bytes(len), prefix + len);
            let mut buf = [0xAAu8; 8];
            let n = put_varint(&mut buf, 1, len as u32);
            assert_eq!(n, prefix, "len {len}");
            assert_eq!(
                get_varint(&buf[1..]),
                Some((len as u32, prefix)),
                "len {len}"
            );
        }
        // Non-minimal, overlong, overflowing and truncated forms are refused.
        assert_eq!(get_varint(&[0x80, 0x00]), None);
        assert_eq!(get_varint(&[0x81, 0x80, 0x00]), None);
        assert_eq!(get_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x10]), None);
        assert_eq!(get_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]), None);
        assert_eq!(get_varint(&[0x80]), None);
        assert_eq!(get_varint(&[]), None);
        assert_eq!(
            get_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x0F]),
            Some((u32::MAX, 5))
        );
        assert_eq!(batch_bytes_for_payload(0), Some(4096));
        assert_eq!(batch_bytes_for_payload(4096 - 80), Some(4096));
        assert_eq!(batch_bytes_for_payload(4097 - 80), Some(8192));
        assert_eq!(batch_bytes_for_payload(LOG_BATCH_BYTES_MAX), None);
    }

    #[test]
    fn non_minimal_record_length_is_refused() {
        // "hi" framed as 0x82 0x00 (a two-byte encoding of 2), checksums
        // recomputed: the framing is corrupt even though both CRCs match.
        let mut buf = encode(&FS, 1, 1, 0, &[b"hi!"]).expect("encode");
        buf[LOG_BATCH_HEADER_BYTES] = 0x82;
        buf[LOG_BATCH_HEADER_BYTES + 1] = 0x00;
        buf[LOG_BATCH_HEADER_BYTES + 2] = b'h';
        buf[LOG_BATCH_HEADER_BYTES + 3] = b'i';
        let crc = crc32c::crc32c(&buf[LOG_BATCH_HEADER_BYTES..]);
        put_u32(&mut buf, OFF_PAYLOAD_CRC, crc);
        reseal_header(&mut buf);
        assert!(matches!(
            decode_batch(&buf, &FS, 0),
            Err(FormatError::Invalid {
                field: "record framing",
                ..
            })
        ));
    }

    #[test]
    fn encode_limits() {
        assert!(matches!(
            encode(&FS, 1, 1, 100, &[]),
            Err(FormatError::Invalid {
                field: "log_offset",
                ..
            })
        ));
        let huge = vec![0u8; LOG_BATCH_BYTES_MAX];
        assert!(batch_bytes_for(&[&huge]).is_none());
        assert!(matches!(
            encode(&FS, 1, 1, 0, &[&huge]),
            Err(FormatError::Invalid {
                field: "batch_bytes",
                ..
            })
        ));
        let fits = vec![0u8; LOG_BATCH_BYTES_MAX - LOG_BATCH_HEADER_BYTES - 4];
        assert_eq!(batch_bytes_for(&[&fits]), Some(LOG_BATCH_BYTES_MAX));
    }

    #[test]
    fn every_byte_flip_is_detected() {
        let payload = vec![0x11u8; 5000];
        let buf = encode(&FS, 9, 3, 4096, &[&payload, b"x"]).expect("encode");
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x80;
            let err = decode_batch(&bad, &FS, 4096).expect_err("flip must be detected");
            if i < 8 {
                assert!(
                    matches!(err, FormatError::BadMagic { .. }),
                    "byte {i}: {err:?}"
                );
            } else if i < LOG_BATCH_HEADER_BYTES {
                assert!(
                    matches!(err, FormatError::BadChecksum { .. }),
                    "byte {i}: {err:?}"
                );
            } else {
                assert!(
                    matches!(err, FormatError::Torn { lsn: 9, .. }),
                    "byte {i}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn torn_stale_wrong_address_foreign() {
        let payload = vec![0x22u8; 9000];
        let buf = encode(&FS, 5, 2, 3 * 4096, &[&payload]).expect("encode");
        // Torn: the first block is new, the rest still holds old zeros.
        let mut torn = buf.clone();
        torn[4096..].fill(0);
        assert!(matches!(
            decode_batch(&torn, &FS, 3 * 4096),
            Err(FormatError::Torn { lsn: 5, .. })
        ));
        // Stale: a valid batch of an earlier lap at this physical place.
        match decode_batch(&buf, &FS, 3 * 4096 + (1 << 20)) {
            Err(FormatError::Stale {
                lsn,
                found_log_offset,
                expected_log_offset,
            }) => {
                assert_eq!((lsn, found_log_offset), (5, 3 * 4096));
                assert_eq!(expected_log_offset, 3 * 4096 + (1 << 20));
            }
            other => panic!("expected Stale, got {other:?}"),
        }
        assert!(matches!(
            decode_batch(&buf, &FS, 0),
            Err(FormatError::WrongAddress {
                expected: 0,
                found: 12288,
                ..
            })
        ));
        assert!(matches!(
            decode_batch(&buf, &FsId([8; 16]), 3 * 4096),
            Err(FormatError::ForeignFs { .. })
        ));
        assert!(matches!(
            decode_batch(&[0u8; 4096], &FS, 0),
            Err(FormatError::BadMagic { .. })
        ));
        assert!(matches!(
            decode_batch(&buf[..10], &FS, 0),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn corrupt_fields_with_valid_checksums_are_refused() {
        let buf = encode(&FS, 5, 2, 0, &[b"abc", b"defg"]).expect("encode");
        type Mutation = Box<dyn Fn(&mut [u8])>;
        let cases: Vec<(&'static str, Mutation)> = vec![
            (
                "batch_bytes",
                Box::new(|b| put_u32(b, OFF_BATCH_BYTES, 100)),
            ),
            ("batch_bytes", Box::new(|b| put_u32(b, OFF_BATCH_BYTES, 0))),
            (
                "batch_bytes",
                Box::new(|b| put_u32(b, OFF_BATCH_BYTES, (LOG_BATCH_BYTES_MAX + 4096) as u32)),
            ),
            (
                "payload_bytes",
                Box::new(|b| put_u32(b, OFF_PAYLOAD_BYTES, 4096)),
            ),
            ("reserved", Box::new(|b| put_u32(b, OFF_RESERVED, 1))),
            (
                "record framing",
                Box::new(|b| put_u32(b, OFF_RECORD_COUNT, 3)),
            ),
            (
                "record framing",
                Box::new(|b| put_u32(b, OFF_RECORD_COUNT, 1)),
            ),
            (
                "record framing",
                Box::new(|b| {
                    // A record length pointing past the payload, with a
                    // payload checksum that matches it.
                    put_u32(b, LOG_BATCH_HEADER_BYTES, u32::MAX);
                    let crc = crc32c::crc32c(&b[LOG_BATCH_HEADER_BYTES..4096]);
                    put_u32(b, OFF_PAYLOAD_CRC, crc);
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut bad = buf.clone();
            mutate(&mut bad);
            reseal_header(&mut bad);
            match decode_batch(&bad, &FS, 0) {
                Err(FormatError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected Invalid {field}, got {other:?}"),
            }
        }
        let mut bad = buf.clone();
        put_u32(&mut bad, OFF_VERSION, 9);
        reseal_header(&mut bad);
        assert!(matches!(
            decode_batch(&bad, &FS, 0),
            Err(FormatError::UnsupportedVersion { found: 9, .. })
        ));
    }
}
