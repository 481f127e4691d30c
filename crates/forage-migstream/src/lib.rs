//! QEMU 7.2 migration streams, parsed page by page and rebuilt.
//!
//! The groundwork of VM handoff: the memory of a VM comes from QEMU's own migration
//! stream (`migrate exec:cat > FILE` or a socket). [`Parser`] reads any [`std::io::Read`]
//! and yields [`Event`]s with bounded memory (one page, or the device-state tail);
//! [`StreamWriter`] builds a stream that a destination `-incoming` accepts.
//!
//! ```text
//! be32 0x5145564d "QEVM"   be32 3
//! 0x07 CONFIGURATION  be32 len, machine name, subsections (0x05 u8 len name be32 ver ..)
//! 0x01 START  be32 id, u8 len "ram", be32 instance, be32 version
//!      be64 total|MEM_SIZE, per block: u8 len name, be64 used_length [, be64 addr]
//!      be64 EOS                                        0x7e be32 id   (footer)
//! 0x02 PART   be32 id   RAM records ... be64 EOS       0x7e be32 id   (repeated)
//! 0x08 COMMAND be16 cmd, be16 len, data                (may appear between sections)
//! 0x03 END    be32 id   RAM records ... be64 EOS       0x7e be32 id
//! 0x04 FULL   device sections (not length-prefixed: kept as one opaque blob)
//! 0x00 EOF    [0x06 VMDESCRIPTION be32 len, JSON]
//!
//! RAM record: be64 offset|flags, then u8 len + block name unless CONTINUE (0x20),
//!   ZERO 0x02: u8 fill byte   PAGE 0x08: 4096 bytes   EOS 0x10: end of section
//!   XBZRLE 0x40, HOOK 0x80, COMPRESS 0x100: refused
//! ```
//!
//! Device sections carry no length; only the vmstate descriptions of the source QEMU
//! could delimit them. Since, after RAM's END, a 7.2 precopy stream contains only FULL
//! device sections, everything from there to the end of input is returned as one
//! [`Event::DeviceSection`] (capped at [`DEFAULT_MAX_DEVICE_BYTES`]), with the trailing
//! VMDESCRIPTION JSON split off. `docs/migration-stream.md` is the reference.

mod config;
mod error;
mod input;
mod parser;
mod writer;

use std::sync::Arc;

pub use config::Configuration;
pub use error::{ParseError, WriteError};
pub use parser::Parser;
pub use writer::StreamWriter;

/// Size of a target page (x86: `TARGET_PAGE_BITS` = 12).
pub const PAGE_SIZE: usize = 4096;
/// Default cap on the opaque device-state tail.
pub const DEFAULT_MAX_DEVICE_BYTES: usize = 64 << 20;

/// `QEVM`, the first four bytes of every stream.
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU 7.2 writes and accepts.
pub const FILE_VERSION: u32 = 3;

/// Top-level section type bytes.
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// Flags in the low bits of a RAM record's be64.
pub mod ram_flag {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Bits of the be64 that are flags rather than offset.
    pub const MASK: u64 = 0xfff;
}

/// The `idstr` of QEMU's RAM section.
pub const RAM_IDSTR: &str = "ram";
/// `MIG_CMD_PACKAGED`, the postcopy command that wraps a whole sub-stream.
pub const CMD_PACKAGED: u16 = 7;

/// The content of one guest page.
#[derive(Clone, PartialEq, Eq)]
pub enum Page {
    /// Every byte of the page has this value (QEMU only sends 0, but the format allows any).
    Zero(u8),
    /// The page's bytes.
    Data(Box<[u8; PAGE_SIZE]>),
}

impl Page {
    /// The page as bytes, materialising a zero page.
    pub fn to_bytes(&self) -> Box<[u8; PAGE_SIZE]> {
        match self {
            Page::Zero(b) => Box::new([*b; PAGE_SIZE]),
            Page::Data(d) => d.clone(),
        }
    }
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Page::Zero(b) => write!(f, "Zero({b:#04x})"),
            Page::Data(d) => write!(f, "Data([{:#04x}, {:#04x}, ..])", d[0], d[1]),
        }
    }
}

/// One RAM block announced by MEM_SIZE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's `idstr`, e.g. `pc.ram`, `/rom@etc/acpi/tables`.
    pub name: Arc<str>,
    /// Bytes of the block that are migrated.
    pub used_length: u64,
    /// `mr->addr`, present only when the `x-ignore-shared` capability is on.
    pub addr: Option<u64>,
}

/// Header fields of the RAM section, needed to rebuild a stream with the same ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamSection {
    pub section_id: u32,
    pub instance: u32,
    pub version: u32,
}

impl Default for RamSection {
    /// The values of QEMU 7.2's RAM section in a `pc` machine: section id 2
    /// is typical but any id unused by device sections works.
    fn default() -> Self {
        RamSection {
            section_id: 2,
            instance: 0,
            version: 4,
        }
    }
}

/// What [`Parser::next_event`] yields, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The CONFIGURATION section (absent from streams of old machine types).
    Configuration(Configuration),
    /// The RAM blocks of the source, from MEM_SIZE in RAM's START section.
    RamBlocks {
        section: RamSection,
        blocks: Vec<RamBlock>,
    },
    /// One page. A later page with the same (block, offset) replaces an earlier one
    /// (dirty rounds): last wins.
    Ram {
        block: Arc<str>,
        offset: u64,
        page: Page,
    },
    /// A COMMAND section (length-prefixed, passed through).
    Command { cmd: u16, data: Vec<u8> },
    /// Everything after RAM's END section up to the EOF byte: the FULL device sections,
    /// opaque. `vmdesc` is the JSON of the trailing VMDESCRIPTION, if any.
    DeviceSection {
        offset: u64,
        raw: Vec<u8>,
        vmdesc: Option<Vec<u8>>,
    },
    /// The EOF byte; nothing follows.
    Eof,
}
