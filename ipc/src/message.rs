//! The wire format of worker-to-master messages, and its decoder.
//!
//! A frame is a 4-byte header and a payload:
//!
//! ```text
//! byte 0     version (1)
//! byte 1     kind: 1 = Ready, 2 = Suicide, 3 = Busy, 4 = Idle
//! bytes 2-3  payload length, u16 little-endian, at most MAX_REASON
//! payload    Ready, Idle: empty; Suicide: the reason; Busy: what starts
//!            (`GET / HTTP/1.1 from 127.0.0.1:5555`); UTF-8
//! ```
//!
//! Busy and Idle are for workers that cannot write the scoreboard (a
//! program in another language, started by `respawn -- CMD`): the master
//! writes their row for them. docs/protocol.md is the contract for
//! implementers in other languages.
//!
//! Every frame fits in [`MAX_FRAME`] bytes, far below `PIPE_BUF` (4096 on
//! Linux), so one `write(2)` puts a whole frame in the pipe or none of it.

use std::fmt;

/// The version byte every frame starts with. A master refuses frames of
/// another version rather than guess at their meaning.
pub const VERSION: u8 = 1;
/// Bytes before the payload: version, kind, length.
pub const HEADER_LEN: usize = 4;
/// The longest reason a Suicide carries, in bytes. Longer ones are cut (on a
/// character boundary) when encoded: a panic message is for a log line.
pub const MAX_REASON: usize = 240;
/// The longest frame: what the decoder's buffer holds.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_REASON;

// The whole point of the frame size: one write(2) of a frame is atomic.
const _: () = assert!(MAX_FRAME <= libc::PIPE_BUF);

const KIND_READY: u8 = 1;
const KIND_SUICIDE: u8 = 2;
const KIND_BUSY: u8 = 3;
const KIND_IDLE: u8 = 4;

/// What a worker tells its master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The worker is set up and about to accept its first connection.
    Ready,
    /// The worker will not serve again (it panicked, say): replace it now.
    /// It finishes what it holds and exits on its own.
    Suicide { reason: String },
    /// A request started (`what`: its line and peer, for the log). A worker
    /// that serves several at once says it at each start.
    Busy { what: String },
    /// Nothing is in flight any more.
    Idle,
}

impl Message {
    /// A Suicide whose reason is cut to [`MAX_REASON`] bytes if need be.
    pub fn suicide(reason: &str) -> Message {
        Message::Suicide {
            reason: truncate(reason, MAX_REASON).to_owned(),
        }
    }

    /// The frame for this message. Never fails: an over-long reason is cut.
    pub fn encode(&self) -> Frame {
        let mut frame = Frame {
            bytes: [0; MAX_FRAME],
            len: HEADER_LEN,
        };
        frame.bytes[0] = VERSION;
        let (kind, text) = match self {
            Message::Ready => (KIND_READY, ""),
            Message::Suicide { reason } => (KIND_SUICIDE, reason.as_str()),
            Message::Busy { what } => (KIND_BUSY, what.as_str()),
            Message::Idle => (KIND_IDLE, ""),
        };
        let text = truncate(text, MAX_REASON).as_bytes();
        frame.bytes[1] = kind;
        frame.bytes[HEADER_LEN..HEADER_LEN + text.len()].copy_from_slice(text);
        frame.len += text.len();
        let payload = (frame.len - HEADER_LEN) as u16;
        frame.bytes[2..4].copy_from_slice(&payload.to_le_bytes());
        frame
    }
}

/// One encoded message, on the stack: sending never allocates.
pub struct Frame {
    bytes: [u8; MAX_FRAME],
    len: usize,
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Why bytes from a worker are not a message. Any of these means the worker
/// does not keep the contract; the master stops listening to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Version(u8),
    Kind(u8),
    Length { kind: u8, len: usize },
    Utf8,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Version(v) => {
                write!(f, "unknown protocol version {v} (this master speaks {VERSION})")
            }
            DecodeError::Kind(k) => write!(f, "unknown message kind {k}"),
            DecodeError::Length { kind, len } => write!(f, "message kind {kind} cannot be {len} bytes long"),
            DecodeError::Utf8 => write!(f, "suicide reason is not UTF-8"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes the first frame of `bytes`: `Ok(Some((message, bytes used)))`,
/// `Ok(None)` if more bytes are needed, or the reason they are garbage.
/// The header is checked as soon as each byte of it is there, so garbage is
/// caught on its first byte, not after waiting for a frame that never ends.
pub fn decode(bytes: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    if let Some(&version) = bytes.first() {
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
    }
    if let Some(&kind) = bytes.get(1) {
        if !(KIND_READY..=KIND_IDLE).contains(&kind) {
            return Err(DecodeError::Kind(kind));
        }
    }
    if bytes.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = bytes[1];
    let len = u16::from_le_bytes([bytes[2], bytes[3]]) as usize;
    let allowed = match kind {
        KIND_READY | KIND_IDLE => len == 0,
        _ => len <= MAX_REASON,
    };
    if !allowed {
        return Err(DecodeError::Length { kind, len });
    }
    let Some(payload) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let text = || {
        std::str::from_utf8(payload)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8)
    };
    let message = match kind {
        KIND_READY => Message::Ready,
        KIND_IDLE => Message::Idle,
        KIND_BUSY => Message::Busy { what: text()? },
        _ => Message::Suicide { reason: text()? },
    };
    Ok(Some((message, HEADER_LEN + len)))
}

/// A stream decoder with a fixed buffer of one frame.
///
/// Read into [`Decoder::spare`], report how much with [`Decoder::filled`],
/// then take messages with [`Decoder::next`] until it says `Ok(None)`. Because
/// a whole frame always fits in the buffer, `spare` is never empty after
/// `next` returned `Ok(None)`: the buffer cannot fill up with a frame that
/// never completes.
pub struct Decoder {
    buf: [u8; MAX_FRAME],
    len: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: [0; MAX_FRAME],
            len: 0,
        }
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// The free part of the buffer, to read into.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// Records that `n` bytes were written at the start of [`Decoder::spare`].
    /// `n` is clamped to the free space, so a wrong count cannot overflow.
    pub fn filled(&mut self, n: usize) {
        self.len = self.len.saturating_add(n).min(MAX_FRAME);
    }

    /// Copies as much of `bytes` as fits, and says how much that was.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let spare = self.spare();
        let n = bytes.len().min(spare.len());
        spare[..n].copy_from_slice(&bytes[..n]);
        self.filled(n);
        n
    }

    /// The next complete message, `Ok(None)` if it is not all there yet, or
    /// an error. After an error the decoder keeps returning it: a stream
    /// that lost its framing cannot be trusted again.
    #[allow(clippy::should_implement_trait)] // fallible, so not an Iterator
    pub fn next(&mut self) -> Result<Option<Message>, DecodeError> {
        let Some((message, used)) = decode(&self.buf[..self.len])? else {
            return Ok(None);
        };
        self.buf.copy_within(used..self.len, 0);
        self.len -= used;
        Ok(Some(message))
    }

    /// Bytes held that do not make a whole message yet.
    pub fn pending(&self) -> usize {
        self.len
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let end = (0..=max).rev().find(|&end| s.is_char_boundary(end));
    &s[..end.unwrap_or(0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suicide(reason: &str) -> Message {
        Message::Suicide {
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn every_message_round_trips() {
        for message in [
            Message::Ready,
            suicide(""),
            suicide("panicked: boom"),
            suicide("é"),
            Message::Busy {
                what: "GET / HTTP/1.1 from 127.0.0.1:5555".to_owned(),
            },
            Message::Busy { what: String::new() },
            Message::Idle,
        ] {
            let frame = message.encode();
            assert_eq!(decode(&frame), Ok(Some((message.clone(), frame.len()))));
        }
    }

    #[test]
    fn the_exact_bytes_of_busy_and_idle_as_docs_protocol_md_gives_them() {
        assert_eq!(&*Message::Idle.encode(), &[1, 4, 0, 0]);
        assert_eq!(
            &*Message::Busy {
                what: "GET /".to_owned()
            }
            .encode(),
            b"\x01\x03\x05\x00GET /"
        );
        assert_eq!(
            decode(&[1, 4, 1, 0, b'x']),
            Err(DecodeError::Length { kind: 4, len: 1 })
        );
        assert_eq!(decode(&[1, 5]), Err(DecodeError::Kind(5)));
    }

    #[test]
    fn frames_are_atomic_pipe_writes() {
        let longest = Message::suicide(&"x".repeat(10_000)).encode();
        assert_eq!(longest.len(), MAX_FRAME);
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON); // two bytes each
        let Message::Suicide { reason: cut } = Message::suicide(&reason) else {
            unreachable!()
        };
        assert!(cut.len() <= MAX_REASON && cut.len() >= MAX_REASON - 1);
        assert!(reason.starts_with(&cut));
        // encode cuts too, for a Suicide built by hand
        let frame = suicide(&reason).encode();
        assert_eq!(frame.len(), HEADER_LEN + cut.len());
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // 239 ASCII bytes then a 3-byte character: byte 240 is inside it.
        let reason = format!("{}€ and more", "x".repeat(MAX_REASON - 1));
        assert_eq!(Message::suicide(&reason), suicide(&"x".repeat(MAX_REASON - 1)));
        let frame = suicide(&reason).encode();
        assert_eq!(frame.len(), HEADER_LEN + MAX_REASON - 1);
        assert_eq!(frame[2..4], ((MAX_REASON - 1) as u16).to_le_bytes());
        assert_eq!(
            decode(&frame),
            Ok(Some((suicide(&"x".repeat(MAX_REASON - 1)), frame.len())))
        );

        // 238 ASCII bytes then the same character: it ends exactly at 241,
        // so it goes; 237 then it: it ends at 240 and stays.
        let ends_past = format!("{}€", "x".repeat(MAX_REASON - 2));
        assert_eq!(Message::suicide(&ends_past), suicide(&"x".repeat(MAX_REASON - 2)));
        let fits = format!("{}€", "x".repeat(MAX_REASON - 3));
        assert_eq!(Message::suicide(&fits), suicide(&fits));

        // Exactly MAX_REASON bytes is kept whole; one more is cut.
        let exact = "y".repeat(MAX_REASON);
        assert_eq!(Message::suicide(&exact), suicide(&exact));
        assert_eq!(Message::suicide(&format!("{exact}z")), suicide(&exact));
    }

    #[test]
    fn frames_are_laid_out_as_documented() {
        assert_eq!(*Message::Ready.encode(), [VERSION, KIND_READY, 0, 0]);
        assert_eq!(*suicide("ab").encode(), [VERSION, KIND_SUICIDE, 2, 0, b'a', b'b']);
        let long = suicide(&"r".repeat(MAX_REASON)).encode();
        assert_eq!(long[..4], [VERSION, KIND_SUICIDE, MAX_REASON as u8, 0]);
        assert_eq!((VERSION, KIND_READY, KIND_SUICIDE), (1, 1, 2));
    }

    #[test]
    fn truncated_frames_need_more() {
        let frame = suicide("panicked: boom").encode();
        for end in 0..frame.len() {
            assert_eq!(decode(&frame[..end]), Ok(None), "prefix of {end} bytes");
        }
    }

    #[test]
    fn garbage_is_an_error_at_its_first_byte() {
        assert_eq!(decode(b"G"), Err(DecodeError::Version(b'G')));
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(DecodeError::Version(b'G')));
        assert_eq!(decode(&[VERSION, 9]), Err(DecodeError::Kind(9)));
        assert_eq!(decode(&[0]), Err(DecodeError::Version(0)));
    }

    #[test]
    fn oversize_and_inconsistent_lengths_are_errors() {
        let too_long = (MAX_REASON as u16 + 1).to_le_bytes();
        assert_eq!(
            decode(&[VERSION, KIND_SUICIDE, too_long[0], too_long[1]]),
            Err(DecodeError::Length {
                kind: KIND_SUICIDE,
                len: MAX_REASON + 1
            })
        );
        assert_eq!(
            decode(&[VERSION, KIND_READY, 1, 0, b'x']),
            Err(DecodeError::Length {
                kind: KIND_READY,
                len: 1
            })
        );
        assert_eq!(
            decode(&[VERSION, KIND_SUICIDE, 1, 0, 0xff]),
            Err(DecodeError::Utf8)
        );
    }

    #[test]
    fn decoder_reassembles_messages_split_across_reads() {
        let mut stream = Vec::new();
        let sent = [
            Message::Ready,
            suicide("panicked: index out of bounds"),
            Message::Ready,
        ];
        for message in &sent {
            stream.extend_from_slice(&message.encode());
        }
        for chunk in 1..=stream.len() {
            let mut decoder = Decoder::new();
            let mut received = Vec::new();
            for piece in stream.chunks(chunk) {
                let mut piece = piece;
                while !piece.is_empty() {
                    let n = decoder.push(piece);
                    assert!(n > 0, "decoder full with chunk size {chunk}");
                    piece = &piece[n..];
                    while let Some(message) = decoder.next().unwrap() {
                        received.push(message);
                        assert!(received.len() <= sent.len(), "messages out of nothing");
                    }
                }
            }
            assert_eq!(received, sent, "chunk size {chunk}");
            assert_eq!(decoder.pending(), 0);
        }
    }

    #[test]
    fn pending_counts_the_bytes_of_an_unfinished_frame() {
        let frame = suicide("boom").encode();
        let mut decoder = Decoder::new();
        assert_eq!(decoder.pending(), 0);
        assert_eq!(decoder.push(&frame[..5]), 5);
        assert_eq!(decoder.next(), Ok(None));
        assert_eq!(decoder.pending(), 5);
        assert_eq!(decoder.spare().len(), MAX_FRAME - 5);
        assert_eq!(decoder.push(&frame[5..]), frame.len() - 5);
        assert_eq!(decoder.next(), Ok(Some(suicide("boom"))));
        assert_eq!(decoder.pending(), 0);
        // A count larger than the free space is clamped, never overflows.
        decoder.filled(usize::MAX);
        assert_eq!(decoder.pending(), MAX_FRAME);
        assert_eq!(decoder.push(b"more"), 0, "full");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases = [
            (
                DecodeError::Version(2),
                "unknown protocol version 2 (this master speaks 1)",
            ),
            (DecodeError::Kind(9), "unknown message kind 9"),
            (
                DecodeError::Length { kind: 1, len: 3 },
                "message kind 1 cannot be 3 bytes long",
            ),
            (DecodeError::Utf8, "suicide reason is not UTF-8"),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn decoder_reports_garbage_and_stays_failed() {
        let mut decoder = Decoder::new();
        decoder.push(&Message::Ready.encode());
        decoder.push(b"\x00garbage");
        assert_eq!(decoder.next(), Ok(Some(Message::Ready)));
        assert_eq!(decoder.next(), Err(DecodeError::Version(0)));
        assert_eq!(decoder.next(), Err(DecodeError::Version(0)));
    }

    #[test]
    fn decoder_never_panics_on_any_short_input() {
        // Every 1- and 2-byte input, and a sweep of 4-byte headers with a
        // payload of 0xff: each is a message, need-more, or an error.
        for a in 0..=255u8 {
            let _ = decode(&[a]);
            for b in 0..=255u8 {
                let _ = decode(&[a, b]);
                let mut decoder = Decoder::new();
                decoder.push(&[VERSION, a, b, 0]);
                decoder.push(&[0xff; MAX_FRAME]);
                // Each message takes at least a header off the buffer.
                let mut decoded = 0;
                while let Ok(Some(_)) = decoder.next() {
                    decoded += 1;
                    assert!(decoded <= MAX_FRAME / HEADER_LEN, "messages out of nothing");
                }
            }
        }
    }

    #[test]
    fn decoder_buffer_never_fills_without_a_decision() {
        // Whatever arrives, once next() says "need more", there is room.
        let mut state = 0x2545_f491_u32;
        for _ in 0..2000 {
            let mut decoder = Decoder::new();
            // Garbage comes within a few frames; a decoder that never
            // decides would spin here for good.
            for pushed in 0.. {
                assert!(pushed < 100_000, "no decision after {pushed} bytes");
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let byte = [VERSION, KIND_READY, KIND_SUICIDE, 0, state as u8][state as usize % 5];
                if decoder.push(&[byte]) == 0 {
                    panic!("buffer full with {} bytes pending", decoder.pending());
                }
                match decoder.next() {
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
