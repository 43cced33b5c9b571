//! Byte-slice lexing shared by the line parsers: no allocation, no regex,
//! no panics on any input.

use std::io::{self, BufRead};

/// Parse an unsigned decimal with no sign, no spaces and no overflow.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Iterator over the space-separated tokens of a line (runs of spaces and
/// tabs count as one separator).
pub(crate) fn tokens(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    s.split(|&c| c == b' ' || c == b'\t')
        .filter(|t| !t.is_empty())
}

/// `s` without leading spaces and tabs.
pub(crate) fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    &s[n..]
}

/// `s` without trailing whitespace (`\n`, `\r`, spaces, tabs).
pub(crate) fn trim_end(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rev()
        .take_while(|&&c| matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
        .count();
    &s[..s.len() - n]
}

/// A line for error messages: lossy UTF-8, without the line end.
pub(crate) fn show(line: &[u8]) -> String {
    String::from_utf8_lossy(trim_end(line)).into_owned()
}

/// Longest line accepted. Real lines are under 300 bytes; the bound stops a
/// corrupt input without line ends from growing the buffer without limit.
pub const LINE_BYTES_MAX: usize = 1 << 20;

/// Reads lines into one reused buffer and counts them.
#[derive(Debug)]
pub(crate) struct LineReader<R> {
    input: R,
    /// The current line, with its terminator.
    pub(crate) buf: Vec<u8>,
    /// 1-based number of the current line (0 before the first).
    pub(crate) line_no: u64,
    /// Byte offset (in the decompressed stream) where the current line
    /// starts.
    pub(crate) line_offset: u64,
    /// Bytes consumed so far.
    pub(crate) bytes: u64,
}

impl<R: BufRead> LineReader<R> {
    /// Initial capacity of the line buffer; lines are short.
    const LINE_BYTES_INITIAL: usize = 512;

    pub(crate) fn new(input: R) -> Self {
        LineReader {
            input,
            buf: Vec::with_capacity(Self::LINE_BYTES_INITIAL),
            line_no: 0,
            line_offset: 0,
            bytes: 0,
        }
    }

    /// Read the next line into `buf`; `Ok(false)` at end of input. The
    /// error of a failed read (e.g. a truncated zstd frame, or a line longer
    /// than [`LINE_BYTES_MAX`]) is returned with `line_no` already pointing
    /// at the line being read.
    pub(crate) fn next_line(&mut self) -> io::Result<bool> {
        self.buf.clear();
        self.line_offset = self.bytes;
        self.line_no += 1;
        loop {
            let avail = match self.input.fill_buf() {
                Ok(avail) => avail,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                break;
            }
            let (take, complete) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            if self.buf.len() + take > LINE_BYTES_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line longer than {LINE_BYTES_MAX} bytes"),
                ));
            }
            self.buf.extend_from_slice(&avail[..take]);
            self.input.consume(take);
            self.bytes += take as u64;
            if complete {
                break;
            }
        }
        if self.buf.is_empty() {
            self.line_no -= 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// The current line without its terminator.
    pub(crate) fn line(&self) -> &[u8] {
        let mut l = &self.buf[..];
        if let Some(rest) = l.strip_suffix(b"\n") {
            l = rest;
        }
        if let Some(rest) = l.strip_suffix(b"\r") {
            l = rest;
        }
        l
    }
}

/// Keep at most this many example lines per category of anomaly.
pub const SAMPLES_MAX: usize = 20;

/// One example line kept for a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineSample {
    /// 1-based line number.
    pub line: u64,
    /// The line text (lossy UTF-8).
    pub text: String,
}

/// A count of lines of one category, with the first [`SAMPLES_MAX`] as
/// examples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// How many lines.
    pub count: u64,
    /// The first [`SAMPLES_MAX`] of them.
    pub samples: Vec<LineSample>,
}

impl Tally {
    /// Count one line and keep it as an example while there is room.
    pub fn record(&mut self, line: u64, text: &[u8]) {
        self.count += 1;
        if self.samples.len() < SAMPLES_MAX {
            self.samples.push(LineSample {
                line,
                text: show(text),
            });
        }
    }

    /// Count one line described by `text` (not a raw line).
    pub(crate) fn record_note(&mut self, line: u64, text: String) {
        self.count += 1;
        if self.samples.len() < SAMPLES_MAX {
            self.samples.push(LineSample { line, text });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"99999999999999999999"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"12 "), None);
        assert_eq!(parse_u64(b"1x"), None);
    }

    #[test]
    fn lines_are_counted_and_stripped() {
        let mut r = LineReader::new(&b"a\r\nbb\n\nlast"[..]);
        let mut seen = Vec::new();
        while r.next_line().unwrap() {
            seen.push((r.line_no, r.line_offset, r.line().to_vec()));
        }
        assert_eq!(
            seen,
            vec![
                (1, 0, b"a".to_vec()),
                (2, 3, b"bb".to_vec()),
                (3, 6, b"".to_vec()),
                (4, 7, b"last".to_vec()),
            ]
        );
        assert_eq!(r.line_no, 4);
        assert_eq!(r.bytes, 11);
    }

    #[test]
    fn overlong_lines_are_refused() {
        let text = vec![b'x'; LINE_BYTES_MAX + 1];
        let mut r = LineReader::new(&text[..]);
        let e = r.next_line().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(r.line_no, 1);
        let mut ok = vec![b'y'; LINE_BYTES_MAX - 1];
        ok.push(b'\n');
        let mut r = LineReader::new(&ok[..]);
        assert!(r.next_line().unwrap());
        assert_eq!(r.line().len(), LINE_BYTES_MAX - 1);
        assert!(!r.next_line().unwrap());
    }

    #[test]
    fn tally_keeps_the_first_examples() {
        let mut t = Tally::default();
        for i in 0..50 {
            t.record(i, format!("line {i}\n").as_bytes());
        }
        assert_eq!(t.count, 50);
        assert_eq!(t.samples.len(), SAMPLES_MAX);
        assert_eq!(t.samples[3].text, "line 3");
    }
}
