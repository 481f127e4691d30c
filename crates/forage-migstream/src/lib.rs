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
mod event;
mod input;
mod parser;
mod wire;
mod writer;

pub use config::Configuration;
pub use error::{ParseError, WriteError};
pub use event::{Event, Page, RamBlock, RamSection};
pub use parser::Parser;
pub use wire::{
    ram_flag, section, CMD_PACKAGED, DEFAULT_MAX_DEVICE_BYTES, FILE_MAGIC, FILE_VERSION, PAGE_SIZE, RAM_IDSTR,
};
pub use writer::StreamWriter;
