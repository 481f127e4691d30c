//! What a stream is made of, as the parser yields it and the writer takes it: pages, RAM
//! blocks, sections.

use std::sync::Arc;

use crate::config::Configuration;
use crate::wire::PAGE_SIZE;

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
        RamSection { section_id: 2, instance: 0, version: 4 }
    }
}

/// What [`Parser::next_event`] yields, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The CONFIGURATION section (absent from streams of old machine types).
    Configuration(Configuration),
    /// The RAM blocks of the source, from MEM_SIZE in RAM's START section.
    RamBlocks { section: RamSection, blocks: Vec<RamBlock> },
    /// One page. A later page with the same (block, offset) replaces an earlier one
    /// (dirty rounds): last wins.
    Ram { block: Arc<str>, offset: u64, page: Page },
    /// A COMMAND section (length-prefixed, passed through).
    Command { cmd: u16, data: Vec<u8> },
    /// Everything after RAM's END section up to the EOF byte: the FULL device sections,
    /// opaque. `vmdesc` is the JSON of the trailing VMDESCRIPTION, if any.
    DeviceSection { offset: u64, raw: Vec<u8>, vmdesc: Option<Vec<u8>> },
    /// The EOF byte; nothing follows.
    Eof,
}
