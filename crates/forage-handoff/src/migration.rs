//! QEMU's outgoing migration stream, split for handoff: the pages of guest RAM (the
//! memory backend's block) become handoff chunks, and everything else (configuration,
//! the RAM block list, the pages of the small ROM and ACPI blocks, the device sections)
//! is kept as the [`Residual`], from which the destination's QEMU is fed a stream without
//! guest RAM: it keeps the memory file the destination rebuilt from the chunks.
//!
//! QEMU's precopy rounds appear as later pages for places already sent; the last one
//! wins on both sides. The stream must be plain: no xbzrle, compression, multifd or
//! postcopy (QEMU's defaults).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use forage_migstream::{Configuration, Event, Page, Parser, RamBlock, RamSection, StreamWriter};

/// Largest residual stream accepted (ROMs, ACPI tables and device state of a small VM
/// are about 1 MiB).
pub const MAX_RESIDUAL: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("migration stream at byte {offset}: {detail}")]
    Stream { offset: u64, detail: String },
    #[error("migration stream: the RAM block {0:?} (guest memory) is not in the stream")]
    NoRamBlock(String),
    #[error("migration stream: the ROM and device part is over {MAX_RESIDUAL} bytes")]
    TooLarge,
}

/// What of the stream is not guest RAM.
#[derive(Debug, Default)]
pub struct Residual {
    config: Option<Configuration>,
    section: Option<RamSection>,
    blocks: Vec<RamBlock>,
    pages: BTreeMap<(Arc<str>, u64), Page>,
    devices: Vec<u8>,
    vmdesc: Option<Vec<u8>>,
    bytes: usize,
}

impl Residual {
    /// The stream for the destination's `-incoming`: configuration, every RAM block
    /// announced, the pages of all blocks but guest RAM, the device sections.
    pub fn to_stream(&self) -> Result<Vec<u8>, String> {
        let err = |e: forage_migstream::WriteError| e.to_string();
        let mut w = StreamWriter::new(Vec::new(), self.config.as_ref()).map_err(err)?;
        w.ram_blocks(self.section.unwrap_or_default(), &self.blocks).map_err(err)?;
        for ((block, offset), page) in &self.pages {
            w.page(block, *offset, page).map_err(err)?;
        }
        w.finish(&self.devices, self.vmdesc.as_deref()).map_err(err)
    }

    /// Bytes of guest RAM announced for `block`.
    pub fn block_len(&self, block: &str) -> Option<u64> {
        self.blocks.iter().find(|b| &*b.name == block).map(|b| b.used_length)
    }
}

/// Read a whole outgoing stream from `r`. Every page of `ram_block` goes to `page` (its
/// byte offset and content) in stream order; `page` returning false stops the reading
/// (the consumer is gone). Returns the rest.
pub fn split<R: Read>(r: R, ram_block: &str, mut page: impl FnMut(u64, Page) -> bool) -> Result<Residual, SplitError> {
    let mut parser = Parser::new(r);
    let mut rest = Residual::default();
    loop {
        let event =
            parser.next_event().map_err(|e| SplitError::Stream { offset: e.offset(), detail: e.to_string() })?;
        let Some(event) = event else {
            return Err(SplitError::Stream { offset: parser.offset(), detail: "ended before EOF".into() });
        };
        match event {
            Event::Configuration(c) => rest.config = Some(c),
            Event::RamBlocks { section, blocks } => {
                if !blocks.iter().any(|b| &*b.name == ram_block) {
                    return Err(SplitError::NoRamBlock(ram_block.into()));
                }
                rest.section = Some(section);
                rest.blocks = blocks;
            }
            Event::Ram { block, offset, page: p } if &*block == ram_block => {
                if !page(offset, p) {
                    return Err(SplitError::Stream {
                        offset: parser.offset(),
                        detail: "the handoff stopped reading".into(),
                    });
                }
            }
            Event::Ram { block, offset, page: p } => {
                if rest.pages.insert((block, offset), p).is_none() {
                    rest.bytes += forage_migstream::PAGE_SIZE;
                }
            }
            Event::Command { cmd, .. } => {
                return Err(SplitError::Stream {
                    offset: parser.offset(),
                    detail: format!("command {cmd} in a precopy stream (postcopy is not used by handoff)"),
                });
            }
            Event::DeviceSection { raw, vmdesc, .. } => {
                rest.bytes += raw.len();
                rest.devices.extend_from_slice(&raw);
                if vmdesc.is_some() {
                    rest.vmdesc = vmdesc;
                }
            }
            Event::Eof => return Ok(rest),
        }
        if rest.bytes > MAX_RESIDUAL {
            return Err(SplitError::TooLarge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of guest RAM "ram0" (4 pages) and a ROM block, written twice for ram0
    /// page 1 (a dirty round).
    fn stream() -> Vec<u8> {
        let blocks = vec![
            RamBlock { name: "ram0".into(), used_length: 4 * 4096, addr: None },
            RamBlock { name: "/rom@etc/acpi/tables".into(), used_length: 4096, addr: None },
        ];
        let mut w = StreamWriter::new(Vec::new(), None).unwrap();
        w.ram_blocks(RamSection::default(), &blocks).unwrap();
        w.page("ram0", 0, &Page::Zero(0)).unwrap();
        w.page("ram0", 4096, &Page::Data(Box::new([1; 4096]))).unwrap();
        w.page("/rom@etc/acpi/tables", 0, &Page::Data(Box::new([7; 4096]))).unwrap();
        w.end_part().unwrap();
        w.page("ram0", 4096, &Page::Data(Box::new([2; 4096]))).unwrap();
        // A FULL section header is all the writer checks of device bytes.
        w.finish(&[0x04, 0, 0, 0, 9], None).unwrap()
    }

    #[test]
    fn ram_pages_go_out_and_the_rest_rebuilds_a_stream_without_them() {
        let mut got = Vec::new();
        let rest = split(&stream()[..], "ram0", |off, p| {
            got.push((off, p.to_bytes()[0]));
            true
        })
        .unwrap();
        assert_eq!(got, vec![(0, 0), (4096, 1), (4096, 2)]);
        assert_eq!(rest.block_len("ram0"), Some(4 * 4096));
        let rebuilt = rest.to_stream().unwrap();
        let mut pages = Vec::new();
        let again = split(&rebuilt[..], "ram0", |off, _| {
            pages.push(off);
            true
        })
        .unwrap();
        assert!(pages.is_empty(), "no guest RAM in the residual stream");
        assert_eq!(again.pages.len(), 1);
        assert_eq!(again.devices, vec![0x04, 0, 0, 0, 9]);
    }

    #[test]
    fn truncated_and_foreign_streams_are_errors() {
        let s = stream();
        for cut in [0, 7, 30, s.len() - 1] {
            assert!(split(&s[..cut], "ram0", |_, _| true).is_err(), "cut at {cut}");
        }
        assert!(matches!(split(&s[..], "pc.ram", |_, _| true), Err(SplitError::NoRamBlock(_))));
        assert!(split(&s[..], "ram0", |_, _| false).is_err());
    }
}
