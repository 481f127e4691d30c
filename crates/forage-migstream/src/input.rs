//! A buffered reader that knows its stream offset and turns short reads into
//! [`ParseError::Truncated`] naming what was expected.

use std::io::{BufRead, BufReader, ErrorKind, Read};

use crate::ParseError;

pub(crate) struct Input<R> {
    r: BufReader<R>,
    pos: u64,
}

impl<R: Read> Input<R> {
    pub(crate) fn new(r: R) -> Self {
        Input { r: BufReader::with_capacity(64 * 1024, r), pos: 0 }
    }

    /// Offset of the next byte to be read.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    pub(crate) fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), ParseError> {
        let offset = self.pos;
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(ParseError::Truncated { offset, what }),
            Err(source) => Err(ParseError::Io { offset, what, source }),
        }
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        let mut b = [0u8; 1];
        self.exact(&mut b, what)?;
        Ok(b[0])
    }

    pub(crate) fn be16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        let mut b = [0u8; 2];
        self.exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    pub(crate) fn be32(&mut self, what: &'static str) -> Result<u32, ParseError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    pub(crate) fn be64(&mut self, what: &'static str) -> Result<u64, ParseError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    pub(crate) fn bytes(&mut self, len: usize, what: &'static str) -> Result<Vec<u8>, ParseError> {
        let mut v = vec![0u8; len];
        self.exact(&mut v, what)?;
        Ok(v)
    }

    /// A `u8` length followed by that many bytes of text (QEMU idstrs).
    pub(crate) fn name(&mut self, what: &'static str) -> Result<String, ParseError> {
        let len = self.u8(what)? as usize;
        let offset = self.pos;
        let raw = self.bytes(len, what)?;
        String::from_utf8(raw).map_err(|e| ParseError::Malformed {
            offset,
            expected: what,
            found: format!("non-UTF-8 bytes {:02x?}", e.as_bytes()),
        })
    }

    /// The next byte without consuming it; `None` at end of input.
    pub(crate) fn peek(&mut self, what: &'static str) -> Result<Option<u8>, ParseError> {
        loop {
            match self.r.fill_buf() {
                Ok(buf) => return Ok(buf.first().copied()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => return Err(ParseError::Io { offset: self.pos, what, source }),
            }
        }
    }

    /// The rest of the input, failing if it exceeds `limit` bytes.
    pub(crate) fn rest(&mut self, limit: usize, what: &'static str) -> Result<Vec<u8>, ParseError> {
        let offset = self.pos;
        let mut v = Vec::new();
        let n = (&mut self.r).take(limit as u64 + 1).read_to_end(&mut v).map_err(|source| ParseError::Io {
            offset,
            what,
            source,
        })?;
        if n > limit {
            return Err(ParseError::TooLarge { offset, limit });
        }
        self.pos += n as u64;
        Ok(v)
    }
}
