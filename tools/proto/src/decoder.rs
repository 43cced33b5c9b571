//! [`FrameDecoder`]: splits a byte stream into checked frames, without
//! I/O, so that the server and the client use it with any socket.
//!
//! Bounds, which is the point of this module:
//! - [`FrameDecoder::push`] takes only the bytes of the frame it is
//!   assembling (the header, then exactly `body_bytes`) and returns how
//!   many it took; the caller keeps the rest for the next frame. So the
//!   decoder never holds more than `HEADER_BYTES + body_bytes_max` bytes,
//!   whatever the caller feeds it.
//! - Nothing is allocated for a body before its header passed every check
//!   (magic, version, header CRC, flags, reserved, size). The body buffer
//!   then grows with the bytes that actually arrived (doubling, capped at
//!   `body_bytes`), so a peer that announces 1 MiB and sends 10 bytes
//!   costs 10 bytes, not 1 MiB; its capacity never exceeds `body_bytes`.
//! - After a [`FrameError`] the decoder is poisoned: it takes no more
//!   bytes and repeats the error, since the stream can no longer be
//!   trusted (the spec closes the connection).

use crate::frame::{
    check_body, decode_header_inner, Direction, FrameError, FrameHeader, HEADER_BYTES,
};

/// One checked frame: its header and its body (CRC verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The decoded header.
    pub header: FrameHeader,
    /// The body: `header.body_bytes` long, capacity at most that.
    pub body: Vec<u8>,
}

#[derive(Debug)]
enum State {
    /// Assembling the header: `header_have` bytes of it are buffered.
    Header,
    /// Assembling the body of a checked header.
    Body { header: FrameHeader, body: Vec<u8> },
    /// A whole frame waits for [`FrameDecoder::next_frame`].
    Ready(Frame),
    /// The stream broke; every call repeats this.
    Failed(FrameError),
}

/// Incremental frame reader: feed bytes with [`push`](Self::push) (or
/// [`decode_from`](Self::decode_from)), take frames with
/// [`next_frame`](Self::next_frame).
///
/// ```
/// use refd_proto::{encode_frame, FrameDecoder, Opcode, BODY_BYTES_MAX_DEFAULT};
/// let mut stream = Vec::new();
/// encode_frame(Opcode::Ping, 0, 1, b"a", &mut stream);
/// encode_frame(Opcode::Ping, 0, 2, b"bc", &mut stream);
/// let mut decoder = FrameDecoder::new(BODY_BYTES_MAX_DEFAULT);
/// let mut input = &stream[..];
/// let mut ids = Vec::new();
/// while let Some(frame) = decoder.decode_from(&mut input).unwrap() {
///     ids.push(frame.header.request_id);
/// }
/// assert_eq!(ids, [1, 2]);
/// assert!(decoder.is_idle());
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    body_bytes_max: u32,
    expected: Option<Direction>,
    header_buf: [u8; HEADER_BYTES],
    header_have: usize,
    state: State,
}

impl FrameDecoder {
    /// A decoder accepting frames of either direction with bodies of at
    /// most `body_bytes_max` bytes.
    pub fn new(body_bytes_max: u32) -> Self {
        FrameDecoder {
            body_bytes_max,
            expected: None,
            header_buf: [0; HEADER_BYTES],
            header_have: 0,
            state: State::Header,
        }
    }

    /// A decoder that also refuses frames of the other direction: a
    /// server reads [`Direction::Request`], a client [`Direction::Reply`].
    pub fn expecting(body_bytes_max: u32, expected: Direction) -> Self {
        FrameDecoder {
            expected: Some(expected),
            ..FrameDecoder::new(body_bytes_max)
        }
    }

    /// The body limit.
    pub fn body_bytes_max(&self) -> u32 {
        self.body_bytes_max
    }

    /// Takes bytes of the current frame from the front of `bytes` and
    /// returns how many it took: 0 once a frame is complete (until
    /// [`next_frame`](Self::next_frame) takes it) or after an error.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        match &mut self.state {
            State::Header => {
                let n = (HEADER_BYTES - self.header_have).min(bytes.len());
                self.header_buf[self.header_have..self.header_have + n]
                    .copy_from_slice(&bytes[..n]);
                self.header_have += n;
                if self.header_have == HEADER_BYTES {
                    self.header_done();
                }
                n
            }
            State::Body { header, body } => {
                let want = header.body_bytes as usize - body.len();
                let n = want.min(bytes.len());
                grow_capped(body, n, header.body_bytes as usize);
                body.extend_from_slice(&bytes[..n]);
                if n == want {
                    self.body_done();
                }
                n
            }
            State::Ready(_) | State::Failed(_) => 0,
        }
    }

    /// The next complete frame, if any; the error that broke the stream,
    /// again on every call, once one was found.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match std::mem::replace(&mut self.state, State::Header) {
            State::Ready(frame) => Ok(Some(frame)),
            State::Failed(e) => {
                self.state = State::Failed(e.clone());
                Err(e)
            }
            other => {
                self.state = other;
                Ok(None)
            }
        }
    }

    /// Pushes from `input` (advancing it past what was taken) until a
    /// frame is complete or `input` is empty; returns that frame.
    /// Call it in a loop until it returns `Ok(None)`: `input` is then
    /// empty.
    pub fn decode_from(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(Some(frame));
            }
            if input.is_empty() {
                return Ok(None);
            }
            let taken = self.push(input);
            *input = &input[taken..];
        }
    }

    /// How many more bytes the current header or body needs (so a caller
    /// may read exactly that); 0 when a frame is ready or after an error.
    pub fn wanted(&self) -> usize {
        match &self.state {
            State::Header => HEADER_BYTES - self.header_have,
            State::Body { header, body } => header.body_bytes as usize - body.len(),
            State::Ready(_) | State::Failed(_) => 0,
        }
    }

    /// Whether no part of a frame is buffered (between frames). A server
    /// times a started frame from the moment this turns false.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header) && self.header_have == 0
    }

    /// Bytes held: the partial header, or the body so far.
    pub fn buffered_bytes(&self) -> usize {
        match &self.state {
            State::Header => self.header_have,
            State::Body { body, .. } => HEADER_BYTES + body.len(),
            State::Ready(frame) => HEADER_BYTES + frame.body.len(),
            State::Failed(_) => 0,
        }
    }

    fn header_done(&mut self) {
        self.header_have = 0;
        match decode_header_inner(&self.header_buf, self.body_bytes_max, self.expected) {
            Err(e) => self.state = State::Failed(e),
            Ok(header) => {
                self.state = State::Body {
                    header,
                    body: Vec::new(),
                };
                if header.body_bytes == 0 {
                    self.body_done();
                }
            }
        }
    }

    fn body_done(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Header) {
            State::Body { header, body } => match check_body(&header, &body) {
                Ok(()) => State::Ready(Frame { header, body }),
                Err(e) => State::Failed(e),
            },
            other => other,
        };
    }
}

/// Makes room for `n` more bytes in `body`, doubling but never past
/// `cap_max` (the announced body length).
fn grow_capped(body: &mut Vec<u8>, n: usize, cap_max: usize) {
    let need = body.len() + n;
    if need <= body.capacity() {
        return;
    }
    let target = need.max(body.capacity().saturating_mul(2)).min(cap_max);
    body.reserve_exact(target - body.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, Opcode, FLAG_REPLY};

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        encode_frame(Opcode::Ping, 0, 1, b"", &mut s);
        encode_frame(Opcode::Ping, 0, 2, &[7u8; 64], &mut s);
        encode_frame(Opcode::Stats, 0, 3, b"", &mut s);
        s
    }

    fn decode_all(dec: &mut FrameDecoder, bytes: &[u8], chunk: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        for piece in bytes.chunks(chunk) {
            let mut input = piece;
            while let Some(f) = dec.decode_from(&mut input).unwrap() {
                frames.push(f);
            }
            assert!(input.is_empty());
        }
        frames
    }

    #[test]
    fn splits_a_stream_at_any_chunking() {
        let s = stream();
        for chunk in [1, 2, 5, 31, 32, 33, 100, s.len()] {
            let mut dec = FrameDecoder::new(64);
            let frames = decode_all(&mut dec, &s, chunk);
            let ids: Vec<u64> = frames.iter().map(|f| f.header.request_id).collect();
            assert_eq!(ids, [1, 2, 3], "chunk {chunk}");
            assert_eq!(frames[1].body, vec![7u8; 64]);
            assert!(frames[1].body.capacity() <= 64);
            assert!(dec.is_idle());
            assert_eq!(dec.buffered_bytes(), 0);
        }
    }

    #[test]
    fn push_takes_only_the_current_frame() {
        let s = stream();
        let mut dec = FrameDecoder::new(64);
        assert_eq!(dec.wanted(), HEADER_BYTES);
        // The first frame has an empty body: only its header is taken.
        assert_eq!(dec.push(&s), HEADER_BYTES);
        assert_eq!(dec.push(&s[HEADER_BYTES..]), 0);
        assert_eq!(dec.wanted(), 0);
        assert!(dec.next_frame().unwrap().is_some());
        assert_eq!(dec.push(&s[HEADER_BYTES..]), HEADER_BYTES);
        assert_eq!(dec.wanted(), 64);
        assert!(!dec.is_idle());
        assert_eq!(dec.push(&s[2 * HEADER_BYTES..]), 64);
        assert_eq!(dec.buffered_bytes(), HEADER_BYTES + 64);
        assert_eq!(dec.next_frame().unwrap().unwrap().header.request_id, 2);
        assert_eq!(dec.next_frame(), Ok(None));
    }

    #[test]
    fn errors_poison_the_decoder() {
        let s = stream();
        let mut dec = FrameDecoder::new(63);
        let mut input = &s[..];
        assert!(dec.decode_from(&mut input).unwrap().is_some());
        let e = dec.decode_from(&mut input).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { request_id: 2, .. }));
        assert_eq!(dec.next_frame(), Err(e));
        assert_eq!(dec.push(input), 0);

        let mut bad = stream();
        bad[HEADER_BYTES] ^= 1; // bad magic of frame 2
        let mut dec = FrameDecoder::new(64);
        let mut input = &bad[..];
        assert!(dec.decode_from(&mut input).unwrap().is_some());
        assert!(matches!(
            dec.decode_from(&mut input),
            Err(FrameError::BadMagic { .. })
        ));

        let mut bad = stream();
        let last = 2 * HEADER_BYTES + 10;
        bad[last] ^= 1; // body byte of frame 2
        let mut dec = FrameDecoder::new(64);
        let mut input = &bad[..];
        assert!(dec.decode_from(&mut input).unwrap().is_some());
        assert!(matches!(
            dec.decode_from(&mut input),
            Err(FrameError::BodyChecksum { request_id: 2, .. })
        ));
    }

    #[test]
    fn direction_is_enforced_when_asked() {
        let mut s = Vec::new();
        encode_frame(Opcode::Ping, FLAG_REPLY, 9, b"x", &mut s);
        let mut dec = FrameDecoder::expecting(64, Direction::Request);
        let mut input = &s[..];
        assert!(matches!(
            dec.decode_from(&mut input),
            Err(FrameError::WrongDirection { request_id: 9, .. })
        ));
        let mut dec = FrameDecoder::expecting(64, Direction::Reply);
        let mut input = &s[..];
        assert!(dec
            .decode_from(&mut input)
            .unwrap()
            .unwrap()
            .header
            .is_reply());
    }

    #[test]
    fn body_capacity_grows_with_arrivals_and_stays_capped() {
        let body = vec![1u8; 1000];
        let mut s = Vec::new();
        encode_frame(Opcode::Ping, 0, 1, &body, &mut s);
        let mut dec = FrameDecoder::new(1000);
        assert_eq!(dec.push(&s[..HEADER_BYTES + 3]), HEADER_BYTES);
        assert_eq!(dec.push(&s[HEADER_BYTES..HEADER_BYTES + 3]), 3);
        assert!(dec.buffered_bytes() < HEADER_BYTES + 100);
        let mut input = &s[HEADER_BYTES + 3..];
        let mut seen = None;
        while !input.is_empty() {
            let n = dec.push(&input[..input.len().min(7)]);
            input = &input[n..];
            if let Some(f) = dec.next_frame().unwrap() {
                seen = Some(f);
            }
        }
        let f = seen.unwrap();
        assert_eq!(f.body, body);
        assert!(f.body.capacity() <= 1000);
    }
}
