//! Framing: turning a byte stream into messages, and back. Pure and I/O-free.
//!
//! TCP delivers bytes, not messages: one read may hold half a message or
//! several ("sticky packets"). A codec finds message boundaries, and every
//! codec here has a limit, checked before any memory is committed:
//!
//! - [`Delimited`]: messages end with a byte; [`Delimited::lines`] ends
//!   them with `\n` and accepts `\r\n` too.
//! - [`LengthPrefixed`]: each message starts with its length as a 1, 2, 4
//!   or 8-byte big-endian number, the fix for sticky packets that needs no
//!   escaping. A length above the limit is rejected as soon as the header
//!   is complete.
//!
//! Decoders never allocate: a frame is a slice of the bytes they were
//! given. Feeding them one byte at a time or everything at once gives the
//! same frames (the tests check every chunk size).
//!
//! [`Framed`](crate::framed::Framed) runs a codec for a service, so
//! protocol code gets one callback per message.

use std::fmt;

/// What a decoder found at the start of its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// One whole message; `consumed` counts its framing too.
    Frame {
        /// The message, without framing.
        frame: &'a [u8],
        /// Bytes of input it took.
        consumed: usize,
    },
    /// `consumed` bytes of an over-long message that is being dropped
    /// (the decoder's policy is [`Overlong::Skip`]).
    Skipped {
        /// Bytes of input dropped.
        consumed: usize,
        /// Why, on the first piece of the message only, so the service
        /// can complain once.
        error: Option<FrameError>,
    },
}

/// Why a stream cannot be decoded (or a message encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// A message longer than the limit.
    TooLong {
        /// The limit, in bytes.
        limit: usize,
        /// The length announced by a header, when there is one.
        announced: Option<u64>,
    },
    /// A message that cannot be encoded as given (it contains the
    /// delimiter, say).
    Invalid(&'static str),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong {
                limit,
                announced: Some(n),
            } => write!(f, "message of {n} bytes announced, limit is {limit}"),
            FrameError::TooLong { limit, .. } => write!(f, "message longer than {limit} bytes"),
            FrameError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for FrameError {}

/// Finds messages in a byte stream.
pub trait Decoder {
    /// Looks for one message at the start of `buf`.
    ///
    /// `Ok(None)`: not yet, come back with more bytes (and the same ones
    /// first). `Err`: the stream is corrupt and the connection should end.
    fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Option<Decoded<'a>>, FrameError>;

    /// True while the decoder is dropping an over-long message: a message
    /// is in progress even though no bytes of it are kept.
    fn is_skipping(&self) -> bool {
        false
    }
}

/// Frames messages for the wire.
pub trait Encoder {
    /// Appends `frame`, framed, to `out`.
    fn encode(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError>;
}

/// What to do with a message longer than the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlong {
    /// Report an error; the connection should close (after an error reply).
    Close,
    /// Drop it up to the next delimiter, report it once, and carry on.
    Skip,
}

/// Default longest line: 16 KiB, as Twisted's `LineReceiver` (its
/// `MAX_LENGTH`). Past it a line is an error, not a reason to buffer more.
pub const MAX_LINE: usize = 16 * 1024;

/// Default longest length-prefixed frame: 1 MiB (memcached's item limit).
pub const MAX_FRAME: usize = 1024 * 1024;

/// Messages that end with a delimiter byte (lines are the common case).
#[derive(Clone, Debug)]
pub struct Delimited {
    delim: u8,
    max: usize,
    /// Lines: a `\r` before the `\n` is framing too, and the encoder ends
    /// lines with `\r\n`.
    crlf: bool,
    overlong: Overlong,
    /// Bytes of the pending input already searched for the delimiter, so a
    /// long message arriving in small pieces is scanned once, not
    /// quadratically.
    scanned: usize,
    /// Dropping an over-long message up to its delimiter.
    skipping: bool,
}

impl Delimited {
    /// Messages ending with `delim`, at most `max` bytes each (delimiter
    /// not counted).
    pub fn new(delim: u8, max: usize) -> Delimited {
        Delimited {
            delim,
            max,
            crlf: false,
            overlong: Overlong::Close,
            scanned: 0,
            skipping: false,
        }
    }

    /// Lines ending in `\n` or `\r\n`, at most `max` bytes each without the
    /// line end. Encoded lines end in `\r\n`.
    pub fn lines(max: usize) -> Delimited {
        Delimited {
            crlf: true,
            ..Delimited::new(b'\n', max)
        }
    }

    /// Chooses what happens to over-long messages (default: close).
    pub fn overlong(mut self, policy: Overlong) -> Delimited {
        self.overlong = policy;
        self
    }

    /// The longest message accepted.
    pub fn max(&self) -> usize {
        self.max
    }

    fn too_long(
        &mut self,
        buf: &[u8],
        end: Option<usize>,
    ) -> Result<Option<Decoded<'static>>, FrameError> {
        self.scanned = 0;
        match self.overlong {
            Overlong::Close => Err(FrameError::TooLong {
                limit: self.max,
                announced: None,
            }),
            Overlong::Skip => {
                // Drop through the delimiter if it is anywhere in `buf`
                // (only the first `max` + 2 bytes were searched so far);
                // otherwise drop everything and keep skipping.
                let end = end.or_else(|| buf.iter().position(|&b| b == self.delim));
                let consumed = match end {
                    Some(i) => i + 1,
                    None => {
                        self.skipping = true;
                        buf.len()
                    }
                };
                Ok(Some(Decoded::Skipped {
                    consumed,
                    error: Some(FrameError::TooLong {
                        limit: self.max,
                        announced: None,
                    }),
                }))
            }
        }
    }
}

impl Decoder for Delimited {
    fn is_skipping(&self) -> bool {
        self.skipping
    }

    fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Option<Decoded<'a>>, FrameError> {
        if self.skipping {
            if buf.is_empty() {
                return Ok(None);
            }
            let consumed = match buf.iter().position(|&b| b == self.delim) {
                Some(i) => {
                    self.skipping = false;
                    i + 1
                }
                None => buf.len(),
            };
            return Ok(Some(Decoded::Skipped {
                consumed,
                error: None,
            }));
        }
        // A line of `max` bytes may be followed by "\r\n": search that far.
        let window = self.max + 1 + usize::from(self.crlf);
        let limit = buf.len().min(window);
        let from = self.scanned.min(limit);
        match buf[from..limit].iter().position(|&b| b == self.delim) {
            Some(i) => {
                let end = from + i;
                self.scanned = 0;
                let mut frame = &buf[..end];
                if self.crlf {
                    if let [rest @ .., b'\r'] = frame {
                        frame = rest;
                    }
                }
                if frame.len() > self.max {
                    return self.too_long(buf, Some(end));
                }
                Ok(Some(Decoded::Frame {
                    frame,
                    consumed: end + 1,
                }))
            }
            None => {
                self.scanned = limit;
                // Without a delimiter in sight, is the message already too
                // long? Only a trailing '\r' (half of a line end) may sit
                // past `max`.
                let over = buf.len() > self.max + 1
                    || (buf.len() == self.max + 1 && !(self.crlf && buf[self.max] == b'\r'));
                if over {
                    self.too_long(buf, None)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

impl Encoder for Delimited {
    fn encode(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        if frame.contains(&self.delim) {
            return Err(FrameError::Invalid("message contains the delimiter"));
        }
        if frame.len() > self.max {
            return Err(FrameError::TooLong {
                limit: self.max,
                announced: None,
            });
        }
        out.extend_from_slice(frame);
        if self.crlf {
            out.push(b'\r');
        }
        out.push(self.delim);
        Ok(())
    }
}

/// Messages preceded by their length as a big-endian unsigned number.
#[derive(Clone, Debug)]
pub struct LengthPrefixed {
    width: usize,
    max: usize,
}

impl LengthPrefixed {
    /// A header of `width` bytes (1, 2, 4 or 8) and messages of at most
    /// `max` bytes.
    ///
    /// # Panics
    /// If `width` is not 1, 2, 4 or 8.
    pub fn new(width: usize, max: usize) -> LengthPrefixed {
        assert!(
            matches!(width, 1 | 2 | 4 | 8),
            "header width must be 1, 2, 4 or 8 bytes, not {width}"
        );
        LengthPrefixed { width, max }
    }

    /// The header width in bytes.
    pub fn width(&self) -> usize {
        self.width
    }
}

impl Decoder for LengthPrefixed {
    fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Option<Decoded<'a>>, FrameError> {
        let Some(header) = buf.get(..self.width) else {
            return Ok(None);
        };
        let announced = header.iter().fold(0u64, |n, &b| n << 8 | u64::from(b));
        // Checked before anything else: a hostile header must not make
        // anyone wait for, or reserve room for, gigabytes.
        if announced > self.max as u64 {
            return Err(FrameError::TooLong {
                limit: self.max,
                announced: Some(announced),
            });
        }
        let end = self.width + announced as usize;
        match buf.get(self.width..end) {
            Some(frame) => Ok(Some(Decoded::Frame {
                frame,
                consumed: end,
            })),
            None => Ok(None),
        }
    }
}

impl Encoder for LengthPrefixed {
    fn encode(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        let fits_header = self.width == 8 || (frame.len() as u64) < 1u64 << (8 * self.width);
        if frame.len() > self.max || !fits_header {
            return Err(FrameError::TooLong {
                limit: self.max,
                announced: None,
            });
        }
        let len = (frame.len() as u64).to_be_bytes();
        out.extend_from_slice(&len[8 - self.width..]);
        out.extend_from_slice(frame);
        Ok(())
    }
}

/// Decodes every whole message in `buf`, for tests and simple callers.
/// Returns the messages, and bytes consumed (whatever is left is a partial
/// message). On a corrupt stream it returns only the error; decode message
/// by message (as [`Framed`](crate::framed::Framed) does) to keep the
/// messages before it.
pub fn decode_all<D: Decoder>(
    decoder: &mut D,
    buf: &[u8],
) -> Result<(Vec<Vec<u8>>, usize), FrameError> {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some(d) = decoder.decode(&buf[at..])? {
        match d {
            Decoded::Frame { frame, consumed } => {
                frames.push(frame.to_vec());
                at += consumed;
            }
            Decoded::Skipped { consumed, .. } => at += consumed,
        }
    }
    Ok((frames, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_accept_lf_and_crlf() {
        let mut d = Delimited::lines(10);
        let (frames, used) = decode_all(&mut d, b"one\ntwo\r\nthr").unwrap();
        assert_eq!(frames, [b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(used, 9);
    }

    #[test]
    fn a_max_length_line_with_split_crlf_is_accepted() {
        let mut d = Delimited::lines(4);
        // First read ends with the '\r'.
        assert_eq!(d.decode(b"abcd\r").unwrap(), None);
        let got = d.decode(b"abcd\r\n").unwrap();
        assert_eq!(
            got,
            Some(Decoded::Frame {
                frame: b"abcd",
                consumed: 6
            })
        );
    }

    #[test]
    fn max_plus_one_is_rejected_before_its_end_arrives() {
        let mut d = Delimited::lines(4);
        assert!(matches!(
            d.decode(b"abcde"),
            Err(FrameError::TooLong { limit: 4, .. })
        ));
        let mut d = Delimited::lines(4);
        assert!(matches!(
            d.decode(b"abcde\r\n"),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn skip_policy_drops_the_long_line_and_carries_on() {
        let mut d = Delimited::lines(3).overlong(Overlong::Skip);
        let input = b"toolong\nok\n";
        assert_eq!(
            d.decode(&input[..5]).unwrap(),
            Some(Decoded::Skipped {
                consumed: 5,
                error: Some(FrameError::TooLong {
                    limit: 3,
                    announced: None
                })
            })
        );
        assert_eq!(
            d.decode(&input[5..]).unwrap(),
            Some(Decoded::Skipped {
                consumed: 3,
                error: None
            })
        );
        assert_eq!(
            d.decode(&input[8..]).unwrap(),
            Some(Decoded::Frame {
                frame: b"ok",
                consumed: 3
            })
        );
    }

    #[test]
    fn length_prefix_rejects_a_huge_header_at_once() {
        let mut d = LengthPrefixed::new(4, MAX_FRAME);
        let err = d.decode(&[0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLong {
                limit: MAX_FRAME,
                announced: Some(u32::MAX as u64)
            }
        );
        assert_eq!(d.decode(&[0, 0, 0]).unwrap(), None);
    }

    #[test]
    fn encoders_refuse_what_they_cannot_frame() {
        let mut out = Vec::new();
        assert!(Delimited::lines(10).encode(b"a\nb", &mut out).is_err());
        assert!(LengthPrefixed::new(1, 1000)
            .encode(&[0; 256], &mut out)
            .is_err());
        LengthPrefixed::new(2, 1000)
            .encode(b"hi", &mut out)
            .unwrap();
        Delimited::lines(10).encode(b"yo", &mut out).unwrap();
        assert_eq!(out, b"\x00\x02hiyo\r\n");
    }

    #[test]
    #[should_panic(expected = "header width")]
    fn odd_header_widths_panic() {
        LengthPrefixed::new(3, 10);
    }
}
