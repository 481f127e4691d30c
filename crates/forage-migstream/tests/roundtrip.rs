//! Writer -> parser round trips and malformed inputs (no QEMU needed).

use std::sync::Arc;

use forage_migstream::{
    ram_flag, Configuration, Event, Page, ParseError, Parser, RamBlock, RamSection, StreamWriter, PAGE_SIZE,
};

fn block(name: &str, pages: u64) -> RamBlock {
    RamBlock { name: Arc::from(name), used_length: pages * PAGE_SIZE as u64, addr: None }
}

fn data(seed: u8) -> Page {
    let mut d = Box::new([0u8; PAGE_SIZE]);
    for (i, b) in d.iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8);
    }
    Page::Data(d)
}

const DEVICES: &[u8] = b"\x04\x00\x00\x00\x03\x05timer\x00\x00\x00\x00\x00\x00\x00\x02opaque\x7e\x00\x00\x00\x03";
const VMDESC: &[u8] = br#"{"page_size":4096,"devices":[]}"#;

fn config() -> Configuration {
    Configuration { machine: "pc-i440fx-7.2".into(), target_page_bits: None, capabilities: vec![], uuid: Some([7; 16]) }
}

/// A stream with two rounds, CONTINUE across sections, a rewritten page and a command.
fn sample() -> (Vec<u8>, Vec<Event>) {
    let blocks = vec![block("pc.ram", 4), block("pc.bios", 2)];
    let sec = RamSection { section_id: 9, instance: 0, version: 4 };
    let pages = [("pc.ram", 0, data(1)), ("pc.ram", 4096, Page::Zero(0)), ("pc.bios", 4096, data(2))];
    let round2 = [("pc.bios", 0, Page::Zero(0xaa)), ("pc.ram", 0, data(3))];
    let mut w = StreamWriter::new(Vec::new(), Some(&config())).unwrap();
    w.ram_blocks(sec, &blocks).unwrap();
    let mut events = vec![Event::Configuration(config()), Event::RamBlocks { section: sec, blocks }];
    for (b, o, p) in &pages {
        w.page(b, *o, p).unwrap();
        events.push(Event::Ram { block: Arc::from(*b), offset: *o, page: p.clone() });
    }
    w.command(2, &[0, 0, 0, 1]).unwrap();
    events.push(Event::Command { cmd: 2, data: vec![0, 0, 0, 1] });
    for (b, o, p) in &round2 {
        w.page(b, *o, p).unwrap();
        events.push(Event::Ram { block: Arc::from(*b), offset: *o, page: p.clone() });
    }
    let bytes = w.finish(DEVICES, Some(VMDESC)).unwrap();
    events.push(Event::DeviceSection { offset: 0, raw: DEVICES.to_vec(), vmdesc: Some(VMDESC.to_vec()) });
    events.push(Event::Eof);
    (bytes, events)
}

fn parse_all(bytes: &[u8]) -> Result<Vec<Event>, ParseError> {
    let mut out = Vec::new();
    for ev in Parser::new(bytes) {
        out.push(match ev? {
            Event::DeviceSection { raw, vmdesc, .. } => Event::DeviceSection { offset: 0, raw, vmdesc },
            e => e,
        });
    }
    Ok(out)
}

#[test]
fn round_trip_events_and_bytes() {
    let (bytes, events) = sample();
    assert_eq!(parse_all(&bytes).unwrap(), events);
    // Writing the parsed events again gives the same bytes.
    let mut w = None;
    let mut rounds = 0;
    for ev in parse_all(&bytes).unwrap() {
        match ev {
            Event::Configuration(c) => w = Some(StreamWriter::new(Vec::new(), Some(&c)).unwrap()),
            Event::RamBlocks { section, blocks } => w.as_mut().unwrap().ram_blocks(section, &blocks).unwrap(),
            Event::Ram { block, offset, page } => w.as_mut().unwrap().page(&block, offset, &page).unwrap(),
            Event::Command { cmd, data } => {
                rounds += 1;
                w.as_mut().unwrap().command(cmd, &data).unwrap()
            }
            Event::DeviceSection { raw, vmdesc, .. } => {
                let again = w.take().unwrap().finish(&raw, vmdesc.as_deref()).unwrap();
                assert_eq!(again, bytes);
            }
            Event::Eof => {}
        }
    }
    assert_eq!(rounds, 1);
}

#[test]
fn continue_carries_across_sections() {
    let blocks = vec![block("pc.ram", 2)];
    let mut w = StreamWriter::new(Vec::new(), None).unwrap();
    w.ram_blocks(RamSection::default(), &blocks).unwrap();
    w.page("pc.ram", 0, &Page::Zero(0)).unwrap();
    w.end_part().unwrap();
    w.page("pc.ram", 4096, &Page::Zero(0)).unwrap();
    let bytes = w.finish(&[], None).unwrap();
    // The second PART's first record is 0x1000 | ZERO | CONTINUE, no block name.
    let rec = (4096 | ram_flag::ZERO | ram_flag::CONTINUE).to_be_bytes();
    assert!(bytes.windows(8).any(|w| w == rec));
    let evs = parse_all(&bytes).unwrap();
    assert!(evs.contains(&Event::Ram { block: Arc::from("pc.ram"), offset: 4096, page: Page::Zero(0) }));
    assert_eq!(evs.last(), Some(&Event::Eof));
}

#[test]
fn ignore_shared_blocks_carry_addresses() {
    let cfg = Configuration { capabilities: vec!["x-ignore-shared".into()], ..config() };
    let b = RamBlock { addr: Some(0x1_0000_0000), ..block("pc.ram", 1) };
    let mut w = StreamWriter::new(Vec::new(), Some(&cfg)).unwrap();
    assert!(w.ram_blocks(RamSection::default(), &[block("pc.ram", 1)]).is_err());
    w.ram_blocks(RamSection::default(), std::slice::from_ref(&b)).unwrap();
    let bytes = w.finish(&[], None).unwrap();
    let evs = parse_all(&bytes).unwrap();
    assert!(matches!(&evs[1], Event::RamBlocks { blocks, .. } if blocks == std::slice::from_ref(&b)));
}

#[test]
fn every_truncation_is_an_error_with_an_offset() {
    let (bytes, _) = sample();
    // Cutting inside the device tail or VMDESCRIPTION cannot be told from a shorter
    // tail unless the EOF byte is lost; every other cut must fail.
    for cut in 0..bytes.len() {
        match parse_all(&bytes[..cut]) {
            Err(e) => assert!(e.offset() <= cut as u64, "cut {cut}: {e} names offset past the end"),
            Ok(evs) => {
                // Accepted only when the prefix happens to end like a complete tail.
                assert_eq!(evs.last(), Some(&Event::Eof), "cut {cut}");
                assert_eq!(bytes[cut - 1], 0, "cut {cut} accepted without EOF");
            }
        }
    }
}

fn err(bytes: &[u8]) -> ParseError {
    parse_all(bytes).expect_err("must fail")
}

/// Header, no configuration, START "ram" id 1 with one 2-page block "b".
fn prefix() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), None).unwrap();
    w.ram_blocks(RamSection { section_id: 1, instance: 0, version: 4 }, &[block("b", 2)]).unwrap();
    let mut v = w.finish(&[], None).unwrap();
    // Drop END (1 + 4 + 8 + 5 bytes) and EOF: keep header + START.
    v.truncate(v.len() - 19);
    v
}

fn part(mut v: Vec<u8>, records: &[u8]) -> Vec<u8> {
    v.extend_from_slice(&[0x02, 0, 0, 0, 1]);
    v.extend_from_slice(records);
    v
}

#[test]
fn malformed_inputs_name_offset_and_expectation() {
    let e = err(b"QEVN\0\0\0\x03");
    assert!(matches!(e, ParseError::Malformed { offset: 0, .. }), "{e}");
    assert!(e.to_string().contains("magic"));

    let xbzrle = part(prefix(), &(ram_flag::XBZRLE | ram_flag::CONTINUE).to_be_bytes());
    let e = err(&xbzrle);
    assert!(matches!(e, ParseError::Unsupported { .. }) && e.to_string().contains("XBZRLE"), "{e}");
    assert_eq!(e.offset(), prefix().len() as u64 + 5);

    let compress = part(prefix(), &(ram_flag::COMPRESS_PAGE).to_be_bytes());
    assert!(err(&compress).to_string().contains("compressed page"));

    let cont = part(prefix(), &(ram_flag::ZERO | ram_flag::CONTINUE).to_be_bytes());
    assert!(err(&cont).to_string().contains("CONTINUE"), "{}", err(&cont));

    let mut rec = (ram_flag::ZERO).to_be_bytes().to_vec();
    rec.extend_from_slice(b"\x01x\x00");
    let e = err(&part(prefix(), &rec));
    assert!(e.to_string().contains("\"x\""), "{e}");

    let mut rec = (0x2000 | ram_flag::ZERO).to_be_bytes().to_vec();
    rec.extend_from_slice(b"\x01b\x00");
    assert!(err(&part(prefix(), &rec)).to_string().contains("used_length"));

    let mut v = prefix();
    v.extend_from_slice(b"\x01\0\0\0\x05\x05block\0\0\0\0\0\0\0\x01");
    assert!(err(&v).to_string().contains("cannot be delimited"));

    let mut v = prefix();
    v.extend_from_slice(b"\x03\0\0\0\x01\0\0\0\0\0\0\0\x10\x7e\0\0\0\x01\x04abc\x01");
    let e = err(&v);
    assert!(e.to_string().contains("EOF (0x00)"), "{e}");
    assert_eq!(e.offset(), v.len() as u64 - 1);

    let mut v = prefix();
    v.extend_from_slice(b"\x03\0\0\0\x01\0\0\0\0\0\0\0\x10\x7e\0\0\0\x01");
    v.extend_from_slice(&[0x04; 100]);
    v.push(0);
    let mut p = Parser::new(&v[..]).with_max_device_bytes(64);
    let e = p.find_map(Result::err).unwrap();
    assert!(matches!(e, ParseError::TooLarge { limit: 64, .. }), "{e}");

    let e = err(&part(prefix(), &0x05u64.to_be_bytes()));
    assert!(e.to_string().contains("flags 0x5"), "{e}");
}

#[test]
fn writer_refuses_inconsistent_input() {
    let mut w = StreamWriter::new(Vec::new(), None).unwrap();
    assert!(w.page("pc.ram", 0, &Page::Zero(0)).is_err());
    w.ram_blocks(RamSection::default(), &[block("pc.ram", 1)]).unwrap();
    assert!(w.page("pc.ram", 4096, &Page::Zero(0)).is_err());
    assert!(w.page("pc.ram", 1, &Page::Zero(0)).is_err());
    assert!(w.page("other", 0, &Page::Zero(0)).is_err());
    assert!(w.finish(b"\x01", None).is_err());
}
