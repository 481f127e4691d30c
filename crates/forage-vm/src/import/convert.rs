//! One pass over a saved VM's stream (RAM inside): guest RAM pages go to the memory file
//! at their offsets, everything else (ROM blocks' pages, commands, device sections) into a
//! new `x-ignore-shared` state stream for the target, as a forage save would have written
//! it. Memory: one page, the device tail (capped by the parser) and a bitmap of one bit
//! per guest page.
//!
//! ```text
//! source stream                      memory.raw            state
//! QEVM 3, CONFIGURATION machine  ->  -                     QEVM 3, target's CONFIGURATION
//!                                                          (+ x-ignore-shared)
//! RAM START MEM_SIZE blocks      ->  -                     START: target's blocks + addresses
//! pages of pc.ram (or ram0)      ->  pwrite at offset       -
//! pages of ROM blocks            ->  -                     PART pages
//! END, devices, EOF, VMDESC      ->  -                     END, the same devices, EOF, VMDESC
//! ```

use std::io::{BufWriter, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use forage_migstream::{Event, Page, Parser, StreamWriter, PAGE_SIZE};

use super::error::ImportError;
use super::reference::{device_list, DeviceId, Reference};
use crate::spec::RAM_ID;

/// RAMBlock names that hold guest RAM: QEMU's default (`-m`) and forage's backend.
pub const MAIN_RAM_NAMES: [&str; 2] = ["pc.ram", RAM_ID];

/// What a conversion wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Converted {
    /// Guest RAM pages written into the memory file (last copy of each counted once per send).
    pub memory_pages: u64,
    /// Zero pages of guest RAM (holes, written only over an earlier page).
    pub zero_pages: u64,
    /// Pages of the other RAM blocks (ROMs, ACPI tables), kept in the state stream.
    pub rom_pages: u64,
    pub state_bytes: u64,
}

/// Convert `input` (a QEMU stream that starts at byte `stream_start` of its file) against
/// `reference`: guest RAM into `memory` (created, `ram_bytes` long), the rest into `state`.
pub fn convert<R: Read>(
    input: R,
    stream_start: u64,
    reference: &Reference,
    ram_bytes: u64,
    memory: &Path,
    state: &Path,
) -> Result<Converted, ImportError> {
    let refuse = |offset: u64, reason: String| ImportError::Refused { offset: stream_start + offset, reason };
    let mem = std::fs::File::create(memory).map_err(ImportError::io(memory))?;
    mem.set_len(ram_bytes).map_err(ImportError::io(memory))?;
    let out = std::fs::File::create(state).map_err(ImportError::io(state))?;
    let mut writer = Some(StreamWriter::new(BufWriter::new(out), Some(&reference.config)).map_err(write_err(state))?);
    let mut written = vec![0u64; (ram_bytes as usize / PAGE_SIZE).div_ceil(64)];
    let mut main: Option<std::sync::Arc<str>> = None;
    let mut seen_config = false;
    let mut done = Converted::default();
    let mut parser = Parser::new(input);
    loop {
        let at = parser.offset();
        let ev = parser
            .next_event()
            .map_err(|source| ImportError::Stream { offset: stream_start + source.offset(), source })?;
        let Some(ev) = ev else { break };
        if ev == Event::Eof {
            continue;
        }
        let w = writer.as_mut().expect("writer until the device tail");
        match ev {
            Event::Configuration(c) => {
                let at = 8; // the section follows the 8-byte header
                if c.ignore_shared() {
                    return Err(refuse(at, "saved with x-ignore-shared: guest RAM is not inside the stream".into()));
                }
                if c.machine != reference.config.machine {
                    return Err(refuse(
                        at,
                        format!("machine type {:?}, the target runs {:?}", c.machine, reference.config.machine),
                    ));
                }
                seen_config = true;
            }
            Event::RamBlocks { section, blocks } => {
                if !seen_config {
                    return Err(refuse(at, "no CONFIGURATION section: the machine type is unknown".into()));
                }
                main = Some(check_blocks(&blocks, reference, ram_bytes).map_err(|r| refuse(at, r))?);
                w.ram_blocks(section, &reference.blocks).map_err(write_err(state))?;
            }
            Event::Ram { block, offset, page } => {
                if Some(&block) == main.as_ref() {
                    let i = (offset / PAGE_SIZE as u64) as usize;
                    let before = written[i / 64] & (1 << (i % 64)) != 0;
                    let bytes = match &page {
                        Page::Zero(0) if !before => None,
                        p => Some(p.to_bytes()),
                    };
                    if let Some(b) = bytes {
                        mem.write_at(&b[..], offset).map_err(ImportError::io(memory))?;
                        written[i / 64] |= 1 << (i % 64);
                        done.memory_pages += 1;
                    } else {
                        done.zero_pages += 1;
                    }
                } else {
                    w.page(&block, offset, &page).map_err(write_err(state))?;
                    done.rom_pages += 1;
                }
            }
            Event::Command { cmd, data } => w.command(cmd, &data).map_err(write_err(state))?,
            Event::DeviceSection { offset, raw, vmdesc } => {
                if main.is_none() {
                    return Err(refuse(at, "no RAM section before the device state".into()));
                }
                if let Some(d) = &vmdesc {
                    let theirs = device_list(d).map_err(|r| refuse(at, r))?;
                    check_devices(&theirs, &reference.devices, &raw).map_err(|(pos, r)| refuse(offset + pos, r))?;
                }
                let w = writer.take().expect("one device tail");
                let mut f = w.finish(&raw, vmdesc.as_deref()).map_err(write_err(state))?;
                std::io::Write::flush(&mut f).map_err(ImportError::io(state))?;
                f.get_ref().sync_all().map_err(ImportError::io(state))?;
            }
            Event::Eof => {}
        }
    }
    if writer.is_some() {
        return Err(refuse(parser.offset(), "the stream ended before the device state".into()));
    }
    mem.sync_all().map_err(ImportError::io(memory))?;
    done.state_bytes = std::fs::metadata(state).map_err(ImportError::io(state))?.len();
    Ok(done)
}

fn write_err(path: &Path) -> impl Fn(forage_migstream::WriteError) -> ImportError + '_ {
    move |source| ImportError::Write { path: path.to_path_buf(), source }
}

/// The source's blocks must be the target's, guest RAM under either name and of the
/// target's size. Returns the source's name of guest RAM.
fn check_blocks(
    src: &[forage_migstream::RamBlock],
    reference: &Reference,
    ram_bytes: u64,
) -> Result<std::sync::Arc<str>, String> {
    let mut main = None;
    for b in src {
        if MAIN_RAM_NAMES.contains(&&*b.name) {
            if b.used_length != ram_bytes {
                return Err(format!(
                    "guest RAM {:?} is {} MiB, the target has {} MiB",
                    b.name,
                    b.used_length >> 20,
                    ram_bytes >> 20
                ));
            }
            if main.replace(b.name.clone()).is_some() {
                return Err("two guest RAM blocks (pc.ram and ram0)".into());
            }
            continue;
        }
        match reference.blocks.iter().find(|r| r.name == b.name) {
            Some(r) if r.used_length == b.used_length => {}
            Some(r) => {
                return Err(format!(
                    "RAM block {:?} is {} bytes, the target's is {}",
                    b.name, b.used_length, r.used_length
                ))
            }
            None => return Err(format!("RAM block {:?} that the target VM does not have (another device?)", b.name)),
        }
    }
    for r in &reference.blocks {
        if r.name.as_ref() != RAM_ID && !src.iter().any(|b| b.name == r.name) {
            return Err(format!("the target VM has RAM block {:?} that the saved VM lacks", r.name));
        }
    }
    main.ok_or_else(|| "no guest RAM block (pc.ram or ram0)".to_string())
}

/// Every device of the saved VM must be one the target has, and the other way round.
/// On a mismatch: the position in `raw` of the device's section (0 if not found) and why.
fn check_devices(theirs: &[DeviceId], ours: &[DeviceId], raw: &[u8]) -> Result<(), (u64, String)> {
    for d in theirs {
        if !ours.contains(d) {
            return Err((
                find_section(raw, d).unwrap_or(0),
                format!("device {:?} (instance {}) is not one the target VM offers", d.0, d.1),
            ));
        }
    }
    for d in ours {
        if !theirs.contains(d) {
            return Err((0, format!("the target VM has device {:?} (instance {}) the saved VM lacks", d.0, d.1)));
        }
    }
    Ok(())
}

/// Where `0x04 be32 id, u8 len, idstr, be32 instance` of `d` starts in `raw`.
fn find_section(raw: &[u8], d: &DeviceId) -> Option<u64> {
    let name = d.0.as_bytes();
    let mut pat = vec![u8::try_from(name.len()).ok()?];
    pat.extend_from_slice(name);
    pat.extend_from_slice(&d.1.to_be_bytes());
    raw.windows(pat.len()).position(|w| w == pat).and_then(|p| p.checked_sub(5)).map(|p| p as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_mismatch_names_the_section() {
        let raw = b"\x04\x00\x00\x00\x09\x05timer\x00\x00\x00\x00\x00\x00\x00\x02rest";
        let ours = vec![("cpu".to_string(), 0)];
        let theirs = vec![("timer".to_string(), 0)];
        let (pos, why) = check_devices(&theirs, &ours, raw).unwrap_err();
        assert_eq!(pos, 0);
        assert!(why.contains("timer"), "{why}");
        assert!(check_devices(&ours, &ours, raw).is_ok());
        let (_, why) = check_devices(&[], &ours, raw).unwrap_err();
        assert!(why.contains("lacks"));
        let shifted = [b"xx".as_slice(), raw].concat();
        assert_eq!(find_section(&shifted, &theirs[0]), Some(2));
    }
}
