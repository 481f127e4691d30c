//! Builds a migration stream from RAM pages and an opaque device tail, so a destination
//! QEMU (`-incoming`) can be fed a reconstructed stream.
//!
//! ```text
//! StreamWriter::new        header [+ CONFIGURATION]
//! ram_blocks               START "ram": MEM_SIZE + blocks, EOS, footer
//! page*                    (PART opened on demand) record, CONTINUE when same block
//! end_part                 EOS, footer   (optional: splits rounds into sections)
//! finish(devices, vmdesc)  END: EOS, footer; device bytes; EOF [; VMDESCRIPTION]
//! ```
//!
//! Footers are always written: every machine type of QEMU >= 2.6 expects them. Zero
//! pages may be omitted when the destination's RAM is fresh.

use std::io::Write;

use crate::config::write_name;
use crate::{
    ram_flag, section, Configuration, Page, RamBlock, RamSection, WriteError, FILE_MAGIC, FILE_VERSION, PAGE_SIZE,
    RAM_IDSTR,
};

/// Writes a QEMU 7.2 migration stream.
pub struct StreamWriter<W: Write> {
    w: W,
    ignore_shared: bool,
    ram: Option<RamSection>,
    blocks: Vec<RamBlock>,
    /// Index of the block of the last page written (CONTINUE).
    last: Option<usize>,
    part_open: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header and, when given, the CONFIGURATION section.
    pub fn new(mut w: W, config: Option<&Configuration>) -> Result<Self, WriteError> {
        w.write_all(&FILE_MAGIC.to_be_bytes())?;
        w.write_all(&FILE_VERSION.to_be_bytes())?;
        if let Some(c) = config {
            c.write(&mut w)?;
        }
        Ok(StreamWriter {
            w,
            ignore_shared: config.is_some_and(Configuration::ignore_shared),
            ram: None,
            blocks: Vec::new(),
            last: None,
            part_open: false,
        })
    }

    /// Writes RAM's START section announcing `blocks`. Blocks must carry `addr` exactly
    /// when the configuration has `x-ignore-shared`.
    pub fn ram_blocks(&mut self, sec: RamSection, blocks: &[RamBlock]) -> Result<(), WriteError> {
        if self.ram.is_some() {
            return Err(WriteError::Invalid("RAM blocks written twice".into()));
        }
        if blocks.is_empty() {
            return Err(WriteError::Invalid("no RAM blocks".into()));
        }
        let mut total: u64 = 0;
        for b in blocks {
            if b.used_length == 0 || b.used_length % PAGE_SIZE as u64 != 0 {
                return Err(WriteError::Invalid(format!(
                    "block {:?}: used_length {:#x} is not a positive multiple of 4096",
                    b.name, b.used_length
                )));
            }
            if b.addr.is_some() != self.ignore_shared {
                return Err(WriteError::Invalid(format!(
                    "block {:?}: address must be given exactly when x-ignore-shared is on",
                    b.name
                )));
            }
            total =
                total.checked_add(b.used_length).ok_or_else(|| WriteError::Invalid("RAM total overflows".into()))?;
        }
        self.section_header(section::START, sec.section_id)?;
        write_name(&mut self.w, RAM_IDSTR)?;
        self.w.write_all(&sec.instance.to_be_bytes())?;
        self.w.write_all(&sec.version.to_be_bytes())?;
        self.w.write_all(&(total | ram_flag::MEM_SIZE).to_be_bytes())?;
        for b in blocks {
            write_name(&mut self.w, &b.name)?;
            self.w.write_all(&b.used_length.to_be_bytes())?;
            if let Some(a) = b.addr {
                self.w.write_all(&a.to_be_bytes())?;
            }
        }
        self.ram = Some(sec);
        self.blocks = blocks.to_vec();
        self.end_of_section()
    }

    /// Writes one page, opening a PART section if none is open.
    pub fn page(&mut self, block: &str, offset: u64, page: &Page) -> Result<(), WriteError> {
        let sec = self.ram.ok_or_else(|| WriteError::Invalid("page before RAM blocks".into()))?;
        let idx = self
            .blocks
            .iter()
            .position(|b| &*b.name == block)
            .ok_or_else(|| WriteError::Invalid(format!("page for unknown block {block:?}")))?;
        let len = self.blocks[idx].used_length;
        if offset & (PAGE_SIZE as u64 - 1) != 0 || offset >= len {
            return Err(WriteError::Invalid(format!(
                "page offset {offset:#x} in {block:?} ({len:#x} bytes) is unaligned or outside"
            )));
        }
        if !self.part_open {
            self.section_header(section::PART, sec.section_id)?;
            self.part_open = true;
        }
        let kind = match page {
            Page::Zero(_) => ram_flag::ZERO,
            Page::Data(_) => ram_flag::PAGE,
        };
        let cont = if self.last == Some(idx) { ram_flag::CONTINUE } else { 0 };
        self.w.write_all(&(offset | kind | cont).to_be_bytes())?;
        if cont == 0 {
            write_name(&mut self.w, block)?;
            self.last = Some(idx);
        }
        match page {
            Page::Zero(b) => self.w.write_all(&[*b])?,
            Page::Data(d) => self.w.write_all(&d[..])?,
        }
        Ok(())
    }

    /// Closes the open PART section, if any (a "round" of pages).
    pub fn end_part(&mut self) -> Result<(), WriteError> {
        if self.part_open {
            self.part_open = false;
            self.end_of_section()?;
        }
        Ok(())
    }

    /// Writes a COMMAND section (not PACKAGED: the parser refuses it).
    pub fn command(&mut self, cmd: u16, data: &[u8]) -> Result<(), WriteError> {
        let len = u16::try_from(data.len())
            .map_err(|_| WriteError::Invalid(format!("command data of {} bytes", data.len())))?;
        self.end_part()?;
        self.w.write_all(&[section::COMMAND])?;
        self.w.write_all(&cmd.to_be_bytes())?;
        self.w.write_all(&len.to_be_bytes())?;
        self.w.write_all(data)?;
        Ok(())
    }

    /// Closes RAM with its END section, appends the device sections (as parsed into
    /// [`crate::Event::DeviceSection`]), EOF and the optional VMDESCRIPTION, flushes and
    /// returns the writer.
    pub fn finish(mut self, devices: &[u8], vmdesc: Option<&[u8]>) -> Result<W, WriteError> {
        let sec = self.ram.ok_or_else(|| WriteError::Invalid("no RAM blocks written".into()))?;
        if devices.first().is_some_and(|&b| b != section::FULL) {
            return Err(WriteError::Invalid("device state does not start with a FULL section".into()));
        }
        self.end_part()?;
        self.section_header(section::END, sec.section_id)?;
        self.end_of_section()?;
        self.w.write_all(devices)?;
        self.w.write_all(&[section::EOF])?;
        if let Some(d) = vmdesc {
            let len = u32::try_from(d.len()).map_err(|_| WriteError::Invalid("VMDESCRIPTION over 4 GiB".into()))?;
            self.w.write_all(&[section::VMDESCRIPTION])?;
            self.w.write_all(&len.to_be_bytes())?;
            self.w.write_all(d)?;
        }
        self.w.flush()?;
        Ok(self.w)
    }

    fn section_header(&mut self, ty: u8, id: u32) -> Result<(), WriteError> {
        self.w.write_all(&[ty])?;
        self.w.write_all(&id.to_be_bytes())?;
        Ok(())
    }

    /// EOS record and footer of the RAM section.
    fn end_of_section(&mut self) -> Result<(), WriteError> {
        let id = self.ram.map(|r| r.section_id).unwrap_or_default();
        self.w.write_all(&ram_flag::EOS.to_be_bytes())?;
        self.w.write_all(&[section::FOOTER])?;
        self.w.write_all(&id.to_be_bytes())?;
        Ok(())
    }
}
