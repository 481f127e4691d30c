//! The CONFIGURATION section (0x07): the machine type and the subsections QEMU 7.2 may
//! add to it.
//!
//! ```text
//! 0x07 be32 len, machine name[len]
//!   { 0x05 u8 len, subsection name, be32 version, fields }*
//!     configuration/target-page-bits  be32 bits
//!     configuration/capabilities      be32 count, { u8 len, capability name }*
//!     configuration/uuid              16 bytes
//! ```
//!
//! Subsections are not length-prefixed, so an unknown one is an error.

use std::io::{Read, Write};

use crate::input::Input;
use crate::{section, ParseError, WriteError};

const SUB_PAGE_BITS: &str = "configuration/target-page-bits";
const SUB_CAPS: &str = "configuration/capabilities";
const SUB_UUID: &str = "configuration/uuid";
const MAX_MACHINE_NAME: u32 = 1024;
const MAX_CAPS: u32 = 256;

/// The content of a CONFIGURATION section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configuration {
    /// Machine type, e.g. `pc-i440fx-7.2`; the destination must run the same.
    pub machine: String,
    /// Sent only when the target page size is not the architecture's minimum.
    pub target_page_bits: Option<u32>,
    /// Capabilities the destination must also have (7.2: only `x-ignore-shared`).
    pub capabilities: Vec<String>,
    /// Sent when UUID validation is on.
    pub uuid: Option<[u8; 16]>,
}

impl Configuration {
    /// Whether RAM blocks carry their guest address (`x-ignore-shared`).
    pub fn ignore_shared(&self) -> bool {
        self.capabilities.iter().any(|c| c == "x-ignore-shared")
    }

    /// Parses the section after its 0x07 type byte has been consumed.
    pub(crate) fn read<R: Read>(inp: &mut Input<R>) -> Result<Self, ParseError> {
        let offset = inp.pos();
        let len = inp.be32("configuration name length (be32)")?;
        if len > MAX_MACHINE_NAME {
            return Err(ParseError::Malformed {
                offset,
                expected: "a machine name length of at most 1024",
                found: len.to_string(),
            });
        }
        let name_at = inp.pos();
        let raw = inp.bytes(len as usize, "configuration machine name")?;
        let machine = String::from_utf8(raw).map_err(|_| ParseError::Malformed {
            offset: name_at,
            expected: "a UTF-8 machine name",
            found: "non-UTF-8 bytes".into(),
        })?;
        let mut cfg = Configuration { machine, ..Default::default() };
        while inp.peek("configuration subsection or next section")? == Some(section::SUBSECTION) {
            inp.u8("subsection marker")?;
            let name_at = inp.pos();
            let name = inp.name("configuration subsection name")?;
            let _version = inp.be32("configuration subsection version (be32)")?;
            match name.as_str() {
                SUB_PAGE_BITS => cfg.target_page_bits = Some(inp.be32("target page bits (be32)")?),
                SUB_CAPS => {
                    let at = inp.pos();
                    let count = inp.be32("capability count (be32)")?;
                    if count > MAX_CAPS {
                        return Err(ParseError::Malformed {
                            offset: at,
                            expected: "at most 256 capabilities",
                            found: count.to_string(),
                        });
                    }
                    for _ in 0..count {
                        cfg.capabilities.push(inp.name("capability name")?);
                    }
                }
                SUB_UUID => {
                    let mut u = [0u8; 16];
                    inp.exact(&mut u, "configuration UUID (16 bytes)")?;
                    cfg.uuid = Some(u);
                }
                other => {
                    return Err(ParseError::Unsupported {
                        offset: name_at,
                        what: format!("unknown configuration subsection {other:?}"),
                    })
                }
            }
        }
        if let Some(bits) = cfg.target_page_bits {
            if bits != 12 {
                return Err(ParseError::Unsupported {
                    offset,
                    what: format!("target page bits {bits}; only 4 KiB pages are parsed"),
                });
            }
        }
        Ok(cfg)
    }

    /// Writes the section including its 0x07 type byte, in QEMU's subsection order.
    pub(crate) fn write<W: Write>(&self, w: &mut W) -> Result<(), WriteError> {
        let name = self.machine.as_bytes();
        if name.len() > MAX_MACHINE_NAME as usize {
            return Err(WriteError::Invalid(format!("machine name of {} bytes", name.len())));
        }
        w.write_all(&[section::CONFIGURATION])?;
        w.write_all(&(name.len() as u32).to_be_bytes())?;
        w.write_all(name)?;
        if let Some(bits) = self.target_page_bits {
            write_sub(w, SUB_PAGE_BITS)?;
            w.write_all(&bits.to_be_bytes())?;
        }
        if !self.capabilities.is_empty() {
            write_sub(w, SUB_CAPS)?;
            w.write_all(&(self.capabilities.len() as u32).to_be_bytes())?;
            for c in &self.capabilities {
                write_name(w, c)?;
            }
        }
        if let Some(u) = &self.uuid {
            write_sub(w, SUB_UUID)?;
            w.write_all(u)?;
        }
        Ok(())
    }
}

fn write_sub<W: Write>(w: &mut W, name: &str) -> Result<(), WriteError> {
    w.write_all(&[section::SUBSECTION])?;
    write_name(w, name)?;
    w.write_all(&1u32.to_be_bytes())?;
    Ok(())
}

/// A `u8` length and the bytes of `name`.
pub(crate) fn write_name<W: Write>(w: &mut W, name: &str) -> Result<(), WriteError> {
    let len =
        u8::try_from(name.len()).map_err(|_| WriteError::Invalid(format!("name {name:?} is longer than 255 bytes")))?;
    w.write_all(&[len])?;
    w.write_all(name.as_bytes())?;
    Ok(())
}
