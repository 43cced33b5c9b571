//! Open a capture file, plain text or zstd-compressed, as a streaming
//! [`BufRead`].
//!
//! Compression is detected from the first four bytes (the zstd frame magic
//! `28 b5 2f fd`), not from the file name, so a renamed file still opens.
//! Nothing is loaded whole: a trace decompresses to ~100 MB and may be far
//! larger, so the decoder streams through a buffer of
//! [`READ_BUFFER_BYTES`]. A truncated zstd stream surfaces as an
//! [`io::ErrorKind::UnexpectedEof`] error from `read`, which the parsers
//! report with the line where it happened.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The zstd frame magic number as it appears on disk (little-endian
/// `0xFD2FB528`).
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Size of the buffer between the (decompressed) stream and the line
/// parsers.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;

/// How the input was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain text.
    None,
    /// One or more zstd frames.
    Zstd,
}

/// A streaming, possibly decompressing, buffered reader.
pub struct Input {
    reader: Box<dyn BufRead + Send>,
    compression: Compression,
}

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Input")
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl Input {
    /// Whether the input is being decompressed.
    pub fn compression(&self) -> Compression {
        self.compression
    }
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl BufRead for Input {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.reader.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        self.reader.consume(amt)
    }
}

/// A file that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {}: {source}", path.display())]
pub struct OpenError {
    /// The path given.
    pub path: PathBuf,
    /// What the OS or the decoder said.
    #[source]
    pub source: io::Error,
}

/// Open `path`, decompressing it on the fly when it starts with the zstd
/// magic.
pub fn open(path: impl AsRef<Path>) -> Result<Input, OpenError> {
    let path = path.as_ref();
    let wrap = |source| OpenError {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(wrap)?;
    from_reader(file).map_err(wrap)
}

/// Wrap any byte stream (a file, stdin, a socket), detecting zstd the same
/// way as [`open`].
pub fn from_reader<R: Read + Send + 'static>(mut inner: R) -> io::Result<Input> {
    // Peek at the magic without losing it: read up to four bytes (a short
    // read is legal, so loop), then chain them back in front of the rest.
    let mut head = [0u8; 4];
    let mut have = 0;
    while have < head.len() {
        match inner.read(&mut head[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let rejoined = io::Cursor::new(head).take(have as u64).chain(inner);
    if have == head.len() && head == ZSTD_MAGIC {
        let decoder = zstd::stream::read::Decoder::new(rejoined)?;
        Ok(Input {
            reader: Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, decoder)),
            compression: Compression::Zstd,
        })
    } else {
        Ok(Input {
            reader: Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, rejoined)),
            compression: Compression::None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut input: Input) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        input.read_to_end(&mut out)?;
        Ok(out)
    }

    /// A reader that returns one byte per call, to exercise the magic peek.
    struct Trickle(Vec<u8>, usize);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1 >= self.0.len() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[self.1];
            self.1 += 1;
            Ok(1)
        }
    }

    #[test]
    fn plain_short_and_empty_inputs_pass_through() {
        for text in [&b""[..], b"a", b"abc", b"abcd", b"hello\nworld\n"] {
            let input = from_reader(io::Cursor::new(text.to_vec())).unwrap();
            assert_eq!(input.compression(), Compression::None);
            assert_eq!(read_all(input).unwrap(), text);
        }
    }

    #[test]
    fn zstd_detected_by_magic_even_with_short_reads() {
        let text = b"line 1\nline 2\n".repeat(1000);
        let packed = zstd::encode_all(&text[..], 3).unwrap();
        assert_eq!(packed[..4], ZSTD_MAGIC);
        let input = from_reader(Trickle(packed, 0)).unwrap();
        assert_eq!(input.compression(), Compression::Zstd);
        assert_eq!(read_all(input).unwrap(), text);
    }

    #[test]
    fn concatenated_frames_are_read_in_full() {
        let mut packed = zstd::encode_all(&b"first\n"[..], 1).unwrap();
        packed.extend(zstd::encode_all(&b"second\n"[..], 1).unwrap());
        let input = from_reader(io::Cursor::new(packed)).unwrap();
        assert_eq!(read_all(input).unwrap(), b"first\nsecond\n");
    }

    #[test]
    fn truncated_zstd_is_an_error() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let packed = zstd::encode_all(&text[..], 3).unwrap();
        let cut = packed[..packed.len() / 2].to_vec();
        let err = read_all(from_reader(io::Cursor::new(cut)).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn open_missing_file_names_the_path() {
        let err = open("/nonexistent/refd/trace.txt.zst").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/refd/trace.txt.zst"));
    }
}
