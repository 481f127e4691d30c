//! Fuzzes the QEMU migration stream parser (`forage-migstream`): any bytes must give
//! events or an error naming an offset inside the input, never a panic.
#![no_main]

use forage_migstream::{Event, Parser, StreamWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parser = Parser::new(data).with_max_device_bytes(1 << 20);
    let mut events = Vec::new();
    loop {
        match parser.next_event() {
            Ok(Some(ev)) => events.push(ev),
            Ok(None) => break,
            Err(e) => {
                assert!(e.offset() <= data.len() as u64, "{e}");
                return;
            }
        }
    }
    // A fully parsed stream can be written again and parses to the same events.
    let mut w = None;
    for ev in &events {
        match ev {
            Event::Configuration(c) => w = StreamWriter::new(Vec::new(), Some(c)).ok(),
            Event::RamBlocks { section, blocks } => {
                if w.is_none() {
                    w = StreamWriter::new(Vec::new(), None).ok();
                }
                if let Some(w) = w.as_mut() {
                    if w.ram_blocks(*section, blocks).is_err() {
                        return;
                    }
                }
            }
            Event::Ram {
                block,
                offset,
                page,
            } => {
                if let Some(w) = w.as_mut() {
                    let _ = w.page(block, *offset, page);
                }
            }
            Event::Command { cmd, data } => {
                if let Some(w) = w.as_mut() {
                    let _ = w.command(*cmd, data);
                }
            }
            Event::DeviceSection { raw, vmdesc, .. } => {
                if let Some(w) = w.take() {
                    if let Ok(bytes) = w.finish(raw, vmdesc.as_deref()) {
                        let again: Result<Vec<_>, _> = Parser::new(&bytes[..]).collect();
                        assert!(again.is_ok(), "rewritten stream does not parse");
                    }
                }
            }
            Event::Eof => {}
        }
    }
});
