//! The streaming parser: a state machine over [`Input`] that yields one [`Event`] at a
//! time.
//!
//! ```text
//! Header --magic,version[,CONFIGURATION]--> Sections
//! Sections --START "ram"/PART/END id--> InRam --EOS [footer]--> Sections (or Tail after END)
//! Sections --COMMAND--> Sections        Sections --EOF without RAM--> Tail
//! Tail --rest of input: devices, EOF[, VMDESCRIPTION]--> Done
//! ```
//!
//! Memory is bounded by one page plus the device tail (capped, see
//! [`Parser::with_max_device_bytes`]). The block of a CONTINUE record is the block of
//! the previous page, even across sections, as in QEMU's `ram_block_from_stream`.

use std::io::Read;
use std::sync::Arc;

use tracing::{debug, trace};

use crate::input::Input;
use crate::{
    ram_flag, section, Configuration, Event, Page, ParseError, RamBlock, RamSection, CMD_PACKAGED,
    DEFAULT_MAX_DEVICE_BYTES, FILE_MAGIC, FILE_VERSION, PAGE_SIZE, RAM_IDSTR,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Sections,
    /// Inside a RAM section; `end` when it is the END section.
    InRam {
        end: bool,
    },
    Tail,
    /// The device tail was returned; `Eof` comes next.
    Eof,
    Done,
}

/// Parses a QEMU 7.2 migration stream from any reader, one [`Event`] at a time.
pub struct Parser<R> {
    inp: Input<R>,
    state: State,
    config: Option<Configuration>,
    ram: Option<RamSection>,
    blocks: Vec<RamBlock>,
    /// Index into `blocks` of the last page's block (CONTINUE).
    current: Option<usize>,
    max_device_bytes: usize,
}

impl<R: Read> Parser<R> {
    /// A parser over `r` (buffered internally).
    pub fn new(r: R) -> Self {
        Parser {
            inp: Input::new(r),
            state: State::Header,
            config: None,
            ram: None,
            blocks: Vec::new(),
            current: None,
            max_device_bytes: DEFAULT_MAX_DEVICE_BYTES,
        }
    }

    /// Caps the opaque device-state tail (default [`DEFAULT_MAX_DEVICE_BYTES`]).
    pub fn with_max_device_bytes(mut self, limit: usize) -> Self {
        self.max_device_bytes = limit;
        self
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.inp.pos()
    }

    /// The RAM blocks announced so far.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The next event; `Ok(None)` after [`Event::Eof`]. After an error the parser is
    /// done and returns `Ok(None)`.
    pub fn next_event(&mut self) -> Result<Option<Event>, ParseError> {
        let r = self.step();
        if r.is_err() {
            self.state = State::Done;
        }
        r
    }

    fn step(&mut self) -> Result<Option<Event>, ParseError> {
        loop {
            match self.state {
                State::Header => {
                    if let Some(ev) = self.header()? {
                        return Ok(Some(ev));
                    }
                }
                State::Sections => {
                    if let Some(ev) = self.section()? {
                        return Ok(Some(ev));
                    }
                }
                State::InRam { end } => {
                    if let Some(ev) = self.ram_record(end)? {
                        return Ok(Some(ev));
                    }
                }
                State::Tail => return self.tail().map(Some),
                State::Eof => {
                    self.state = State::Done;
                    return Ok(Some(Event::Eof));
                }
                State::Done => return Ok(None),
            }
        }
    }

    fn header(&mut self) -> Result<Option<Event>, ParseError> {
        let magic = self.inp.be32("file magic 0x5145564d (be32)")?;
        if magic != FILE_MAGIC {
            return Err(ParseError::Malformed {
                offset: 0,
                expected: "file magic 0x5145564d",
                found: format!("{magic:#010x}"),
            });
        }
        let version = self.inp.be32("file version 3 (be32)")?;
        if version != FILE_VERSION {
            return Err(ParseError::Unsupported { offset: 4, what: format!("file version {version}, expected 3") });
        }
        self.state = State::Sections;
        if self.inp.peek("configuration or first section")? == Some(section::CONFIGURATION) {
            self.inp.u8("configuration marker")?;
            let cfg = Configuration::read(&mut self.inp)?;
            debug!(machine = %cfg.machine, caps = ?cfg.capabilities, "migration stream configuration");
            self.config = Some(cfg.clone());
            return Ok(Some(Event::Configuration(cfg)));
        }
        Ok(None)
    }

    fn section(&mut self) -> Result<Option<Event>, ParseError> {
        let at = self.inp.pos();
        let ty = self.inp.u8("section type byte")?;
        match ty {
            section::START | section::FULL => {
                let id = self.inp.be32("section id (be32)")?;
                let name_at = self.inp.pos();
                let idstr = self.inp.name("section idstr")?;
                let instance = self.inp.be32("section instance id (be32)")?;
                let version = self.inp.be32("section version id (be32)")?;
                if idstr != RAM_IDSTR {
                    return Err(ParseError::Unsupported {
                        offset: at,
                        what: format!(
                            "non-RAM section {idstr:?} (id {id}) before RAM's END: device \
                             sections are not length-prefixed and cannot be delimited"
                        ),
                    });
                }
                if ty == section::FULL {
                    return Err(ParseError::Unsupported {
                        offset: at,
                        what: "RAM sent as a FULL section (savevm snapshot?)".into(),
                    });
                }
                if self.ram.is_some() {
                    return Err(ParseError::Malformed {
                        offset: name_at,
                        expected: "a single RAM START section",
                        found: "a second one".into(),
                    });
                }
                self.ram = Some(RamSection { section_id: id, instance, version });
                self.state = State::InRam { end: false };
                Ok(None)
            }
            section::PART | section::END => {
                let id_at = self.inp.pos();
                let id = self.inp.be32("section id (be32)")?;
                match self.ram {
                    Some(r) if r.section_id == id => {}
                    Some(_) => {
                        return Err(ParseError::Unsupported {
                            offset: id_at,
                            what: format!(
                                "PART/END of non-RAM iterative section id {id} (block \
                                 migration, dirty bitmaps?) cannot be delimited"
                            ),
                        })
                    }
                    None => {
                        return Err(ParseError::Malformed {
                            offset: id_at,
                            expected: "RAM's START section before any PART/END",
                            found: format!("section id {id}"),
                        })
                    }
                }
                self.state = State::InRam { end: ty == section::END };
                Ok(None)
            }
            section::COMMAND => {
                let cmd = self.inp.be16("command number (be16)")?;
                let len = self.inp.be16("command length (be16)")?;
                if cmd == CMD_PACKAGED {
                    return Err(ParseError::Unsupported { offset: at, what: "postcopy PACKAGED command".into() });
                }
                let data = self.inp.bytes(len as usize, "command data")?;
                trace!(cmd, len, "migration command");
                Ok(Some(Event::Command { cmd, data }))
            }
            section::EOF => {
                if self.ram.is_some() {
                    return Err(ParseError::Malformed {
                        offset: at,
                        expected: "RAM's END section before EOF",
                        found: "EOF".into(),
                    });
                }
                // No RAM at all: the tail is just EOF [+ VMDESCRIPTION].
                let rest = self.inp.rest(self.max_device_bytes, "VMDESCRIPTION after EOF")?;
                let mut tail = vec![section::EOF];
                tail.extend_from_slice(&rest);
                self.split_tail(at, tail).map(Some)
            }
            other => Err(ParseError::Malformed {
                offset: at,
                expected: "a section type (START, PART, END, FULL, COMMAND or EOF)",
                found: format!("{other:#04x}"),
            }),
        }
    }

    /// One RAM record; `None` when it produced no event (EOS, MEM_SIZE handled inline).
    fn ram_record(&mut self, end: bool) -> Result<Option<Event>, ParseError> {
        let at = self.inp.pos();
        let v = self.inp.be64("RAM record offset|flags (be64)")?;
        let flags = v & ram_flag::MASK;
        let addr = v & !ram_flag::MASK;
        let unsupported = |what: &str| ParseError::Unsupported {
            offset: at,
            what: format!("{what} (flags {flags:#x}); turn the capability off on the source"),
        };
        if flags & ram_flag::XBZRLE != 0 {
            return Err(unsupported("XBZRLE-encoded page"));
        }
        if flags & ram_flag::COMPRESS_PAGE != 0 {
            return Err(unsupported("compressed page"));
        }
        if flags & ram_flag::HOOK != 0 {
            return Err(unsupported("RDMA hook"));
        }
        let block = if flags & (ram_flag::ZERO | ram_flag::PAGE) != 0 {
            Some(self.block_from_stream(flags, at)?)
        } else {
            None
        };
        match flags & !ram_flag::CONTINUE {
            ram_flag::MEM_SIZE => self.mem_size(at, addr).map(Some),
            ram_flag::ZERO | ram_flag::PAGE => {
                let idx = block.expect("block read for ZERO/PAGE");
                let b = &self.blocks[idx];
                if !matches!(addr.checked_add(PAGE_SIZE as u64), Some(e) if e <= b.used_length) {
                    return Err(ParseError::Malformed {
                        offset: at,
                        expected: "a page offset inside the block's used_length",
                        found: format!("offset {addr:#x} in {:?} of {:#x} bytes", b.name, b.used_length),
                    });
                }
                let name = b.name.clone();
                let page = if flags & ram_flag::ZERO != 0 {
                    Page::Zero(self.inp.u8("zero page fill byte")?)
                } else {
                    let mut d = Box::new([0u8; PAGE_SIZE]);
                    self.inp.exact(&mut d[..], "4096 bytes of page data")?;
                    Page::Data(d)
                };
                Ok(Some(Event::Ram { block: name, offset: addr, page }))
            }
            ram_flag::EOS => {
                self.footer()?;
                self.state = if end { State::Tail } else { State::Sections };
                Ok(None)
            }
            _ => Err(ParseError::Malformed {
                offset: at,
                expected: "a RAM record with flags ZERO, PAGE, MEM_SIZE or EOS",
                found: format!("flags {flags:#x}"),
            }),
        }
    }

    fn block_from_stream(&mut self, flags: u64, at: u64) -> Result<usize, ParseError> {
        if flags & ram_flag::CONTINUE != 0 {
            return self.current.ok_or(ParseError::Malformed {
                offset: at,
                expected: "a block name before the first CONTINUE record",
                found: "CONTINUE".into(),
            });
        }
        let name_at = self.inp.pos();
        let name = self.inp.name("RAM block name")?;
        let idx = self.blocks.iter().position(|b| *b.name == *name).ok_or_else(|| ParseError::Malformed {
            offset: name_at,
            expected: "a RAM block announced by MEM_SIZE",
            found: format!("{name:?}"),
        })?;
        self.current = Some(idx);
        Ok(idx)
    }

    fn mem_size(&mut self, at: u64, total: u64) -> Result<Event, ParseError> {
        let Some(section) = self.ram else { unreachable!("InRam implies a RAM section") };
        if !self.blocks.is_empty() {
            return Err(ParseError::Malformed {
                offset: at,
                expected: "a single MEM_SIZE record",
                found: "a second one".into(),
            });
        }
        let ignore_shared = self.config.as_ref().is_some_and(Configuration::ignore_shared);
        let mut left = total;
        while left > 0 {
            let block_at = self.inp.pos();
            let name = self.inp.name("RAM block name in MEM_SIZE")?;
            let used_length = self.inp.be64("RAM block used_length (be64)")?;
            let addr = if ignore_shared { Some(self.inp.be64("RAM block address (be64)")?) } else { None };
            if used_length == 0 || used_length > left || self.blocks.iter().any(|b| *b.name == *name) {
                return Err(ParseError::Malformed {
                    offset: block_at,
                    expected: "a new RAM block whose length fits in the MEM_SIZE total",
                    found: format!("{name:?} of {used_length:#x} bytes, {left:#x} left"),
                });
            }
            left -= used_length;
            self.blocks.push(RamBlock { name: Arc::from(name), used_length, addr });
        }
        debug!(blocks = self.blocks.len(), total, "RAM blocks");
        Ok(Event::RamBlocks { section, blocks: self.blocks.clone() })
    }

    /// The optional section footer: 0x7e + be32 id of the current RAM section.
    fn footer(&mut self) -> Result<(), ParseError> {
        if self.inp.peek("section footer or next section")? != Some(section::FOOTER) {
            return Ok(());
        }
        self.inp.u8("footer marker")?;
        let at = self.inp.pos();
        let id = self.inp.be32("footer section id (be32)")?;
        let want = self.ram.map(|r| r.section_id).unwrap_or_default();
        if id != want {
            return Err(ParseError::Malformed {
                offset: at,
                expected: "the footer's section id to match the RAM section",
                found: format!("{id}, section is {want}"),
            });
        }
        Ok(())
    }

    fn tail(&mut self) -> Result<Event, ParseError> {
        let at = self.inp.pos();
        let tail = self.inp.rest(self.max_device_bytes, "device sections")?;
        self.split_tail(at, tail)
    }

    /// Splits `tail` (starting at stream offset `at`) into device bytes, EOF and the
    /// optional VMDESCRIPTION, and checks the device bytes start like a FULL section.
    fn split_tail(&mut self, at: u64, tail: Vec<u8>) -> Result<Event, ParseError> {
        let (eof, vmdesc) = match find_vmdesc(&tail) {
            Some(p) => (p, Some(tail[p + 6..].to_vec())),
            None if tail.last() == Some(&section::EOF) => (tail.len() - 1, None),
            None => {
                return Err(if tail.is_empty() {
                    ParseError::Truncated { offset: at, what: "device sections and EOF (0x00)" }
                } else {
                    ParseError::Malformed {
                        offset: at + tail.len() as u64 - 1,
                        expected: "EOF (0x00) or a VMDESCRIPTION at the end of the stream",
                        found: format!("{:#04x}", tail[tail.len() - 1]),
                    }
                })
            }
        };
        if eof > 0 && tail[0] != section::FULL {
            return Err(ParseError::Unsupported {
                offset: at,
                what: format!("section type {:#04x} after RAM's END, expected FULL (0x04)", tail[0]),
            });
        }
        let mut raw = tail;
        raw.truncate(eof);
        debug!(bytes = raw.len(), vmdesc = vmdesc.as_ref().map(Vec::len), "device state");
        self.state = State::Eof;
        Ok(Event::DeviceSection { offset: at, raw, vmdesc })
    }
}

impl<R: Read> Iterator for Parser<R> {
    type Item = Result<Event, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

/// Position of the EOF byte when `tail` ends with `EOF 0x06 be32 len JSON[len]`.
/// JSON contains no NUL byte, so the last candidate that fits is the real one.
fn find_vmdesc(tail: &[u8]) -> Option<usize> {
    (0..tail.len().saturating_sub(6)).rev().find(|&p| {
        tail[p] == section::EOF
            && tail[p + 1] == section::VMDESCRIPTION
            && u32::from_be_bytes(tail[p + 2..p + 6].try_into().unwrap()) as usize == tail.len() - p - 6
            && tail.get(p + 6) == Some(&b'{')
    })
}

#[cfg(test)]
mod tests {
    use super::find_vmdesc;

    #[test]
    fn vmdesc_is_found_from_the_end() {
        let mut t = b"\x04dev\x00\x06\x00\x00\x00\x02xx".to_vec(); // decoy: wrong length
        t.extend_from_slice(b"\x00\x06\x00\x00\x00\x02{}");
        assert_eq!(find_vmdesc(&t), Some(t.len() - 8));
        assert_eq!(find_vmdesc(b"\x04dev\x00"), None);
        assert_eq!(find_vmdesc(b"\x00\x06\x00\x00\x00\x02[]"), None);
        assert_eq!(find_vmdesc(b""), None);
    }
}
