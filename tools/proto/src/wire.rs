//! Little-endian readers and writers shared by every body codec.
//!
//! Why a cursor that returns errors instead of indexing at fixed offsets:
//! the bytes come from a socket, so a short body must be a typed
//! [`BodyError`], never a slice-index panic. The cursor reports the size
//! the body needed at the point it ran out, which is what a peer needs to
//! find its bug. Encoders are plain appends: they cannot fail.

use crate::error::BodyError;

/// A forward cursor over one body; `what` names the message in errors.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    what: &'static str,
    body: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(what: &'static str, body: &'a [u8]) -> Self {
        Reader { what, body, pos: 0 }
    }

    /// The error for a body that is not `expected_bytes` long.
    pub(crate) fn wrong_size(&self, expected_bytes: u64) -> BodyError {
        BodyError::WrongSize {
            what: self.what,
            body_bytes: self.body.len(),
            expected_bytes,
        }
    }

    /// Refuses a body shorter than `fixed_bytes`, the fixed fields of a
    /// body whose size one of them gives: called first by such decoders,
    /// so the error names the whole fixed part rather than the field that
    /// ran out.
    pub(crate) fn fixed(&self, fixed_bytes: usize) -> Result<(), BodyError> {
        if self.body.len() < fixed_bytes {
            return Err(BodyError::TooShort {
                what: self.what,
                body_bytes: self.body.len(),
                fixed_bytes,
            });
        }
        Ok(())
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], BodyError> {
        let end = self.pos.saturating_add(n);
        match self.body.get(self.pos..end) {
            Some(s) => {
                self.pos = end;
                Ok(s)
            }
            None => Err(self.wrong_size(end as u64)),
        }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], BodyError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, BodyError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, BodyError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, BodyError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, BodyError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, BodyError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// `n` reserved bytes, which must be zero.
    pub(crate) fn reserved(&mut self, n: usize) -> Result<(), BodyError> {
        let offset = self.pos;
        if self.bytes(n)?.iter().any(|&b| b != 0) {
            return Err(BodyError::ReservedNonZero {
                what: self.what,
                offset,
            });
        }
        Ok(())
    }

    /// A one-byte boolean: 0 or 1, anything else is refused.
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, BodyError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.out_of_range(field, u64::from(v), 0, 1)),
        }
    }

    /// Flag bits: refused if any bit outside `known` is set.
    pub(crate) fn check_bits(
        &self,
        field: &'static str,
        bits: u64,
        known: u64,
    ) -> Result<(), BodyError> {
        if bits & !known != 0 {
            return Err(BodyError::UnknownBits {
                what: self.what,
                field,
                bits: bits & !known,
            });
        }
        Ok(())
    }

    /// Refuses `value` outside `min..=max`.
    pub(crate) fn check_range(
        &self,
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    ) -> Result<(), BodyError> {
        if value < min || value > max {
            return Err(self.out_of_range(field, value, min, max));
        }
        Ok(())
    }

    fn out_of_range(&self, field: &'static str, value: u64, min: u64, max: u64) -> BodyError {
        BodyError::OutOfRange {
            what: self.what,
            field,
            value,
            min,
            max,
        }
    }

    /// UTF-8 text of `n` bytes, copied into a String of capacity `n`.
    pub(crate) fn text(&mut self, field: &'static str, n: usize) -> Result<String, BodyError> {
        let what = self.what;
        let bytes = self.bytes(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(BodyError::BadUtf8 {
                what,
                field,
                valid_up_to: e.valid_up_to(),
            }),
        }
    }

    /// Checks that exactly `count` entries of `entry_bytes` follow and
    /// nothing after them, before the caller allocates for them.
    pub(crate) fn expect_entries(
        &self,
        count: u32,
        entry_bytes: usize,
    ) -> Result<usize, BodyError> {
        let expected = self.pos as u64 + u64::from(count) * entry_bytes as u64;
        if expected != self.body.len() as u64 {
            return Err(self.wrong_size(expected));
        }
        Ok(count as usize)
    }

    /// The body must end here.
    pub(crate) fn finish(self) -> Result<(), BodyError> {
        if self.pos != self.body.len() {
            return Err(self.wrong_size(self.pos as u64));
        }
        Ok(())
    }
}

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_zeros(out: &mut Vec<u8>, n: usize) {
    out.resize(out.len() + n, 0);
}

/// A length as the `N`-bit wire field that carries it.
///
/// # Panics
///
/// If `len` does not fit: the caller built a message whose length cannot
/// be expressed on the wire (a programmer error; decoded messages always
/// fit, and the limits of `docs/protocol.md` are far below the field
/// widths).
pub(crate) fn len_u16(what: &'static str, len: usize) -> u16 {
    match u16::try_from(len) {
        Ok(v) => v,
        Err(_) => panic!("{what}: length {len} does not fit its u16 wire field"),
    }
}

/// See [`len_u16`].
pub(crate) fn len_u32(what: &'static str, len: usize) -> u32 {
    match u32::try_from(len) {
        Ok(v) => v,
        Err(_) => panic!("{what}: length {len} does not fit its u32 wire field"),
    }
}
