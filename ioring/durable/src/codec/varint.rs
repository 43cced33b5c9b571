//! Unsigned LEB128 varints, backref keys as varints, and [`Reader`], a bounds-checked reader that
//! turns every short or malformed input into a [`CodecError`].

use refd_core::model::{RefKey, EXTENT_DATA_REF_KEY};

use super::CodecError;

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A bounds-checked reader over a byte slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        let b = *self
            .buf
            .get(self.at)
            .ok_or(CodecError::Truncated { field, at: self.at })?;
        self.at += 1;
        Ok(b)
    }

    pub(crate) fn bytes<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], CodecError> {
        let s = self
            .buf
            .get(self.at..self.at + N)
            .ok_or(CodecError::Truncated { field, at: self.at })?;
        self.at += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.bytes::<4>(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.bytes::<8>(field)?))
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u64, CodecError> {
        let start = self.at;
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(field)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(CodecError::BadVarint { field, at: start });
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(CodecError::BadVarint { field, at: start });
                }
                return Ok(v);
            }
        }
        Err(CodecError::BadVarint { field, at: start })
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The next `len` bytes.
    pub(crate) fn slice(
        &mut self,
        len: usize,
        field: &'static str,
    ) -> Result<&'a [u8], CodecError> {
        let s = self
            .buf
            .get(self.at..self.at.saturating_add(len))
            .ok_or(CodecError::Truncated { field, at: self.at })?;
        self.at += len;
        Ok(s)
    }

    pub(crate) fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            extra => Err(CodecError::Trailing { what, extra }),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// A backref key: its type code, then its words as varints.
pub(crate) fn put_ref_key(out: &mut Vec<u8>, key: RefKey) {
    out.push(key.type_code());
    let (k1, k2, k3) = key.words();
    put_varint(out, k1);
    if let RefKey::ExtentData { .. } = key {
        put_varint(out, k2);
        put_varint(out, k3);
    }
}

/// Inverse of [`put_ref_key`].
pub(crate) fn get_ref_key(r: &mut Reader<'_>) -> Result<RefKey, CodecError> {
    let code = r.u8("ref type")?;
    let k1 = r.varint("ref root or parent")?;
    let (k2, k3) = if code == EXTENT_DATA_REF_KEY {
        (r.varint("ref objectid")?, r.varint("ref offset")?)
    } else {
        (0, 0)
    };
    RefKey::from_words(code, k1, k2, k3).ok_or(CodecError::Invalid {
        field: "ref type",
        value: u64::from(code),
    })
}
