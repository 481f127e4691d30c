//! Real QEMU 7.2: migrate a stopped `pc` machine to a file, parse it, rebuild the stream
//! with [`StreamWriter`] and load the rebuilt stream into a second QEMU.
//!
//! Skipped (with a message) when `qemu-system-x86_64` is absent or
//! `FORAGE_SKIP_VM_TESTS` is set.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forage_migstream::{Event, Page, Parser, StreamWriter, PAGE_SIZE};
use serde_json::{json, Value};

const QEMU: &str = "qemu-system-x86_64";

fn skip() -> bool {
    if std::env::var_os("FORAGE_SKIP_VM_TESTS").is_some() {
        eprintln!("skipping: FORAGE_SKIP_VM_TESTS is set");
        return true;
    }
    if Command::new(QEMU).arg("--version").output().is_err() {
        eprintln!("skipping: {QEMU} not found");
        return true;
    }
    false
}

/// A QEMU process killed on drop.
struct Qemu {
    child: Child,
    qmp: Qmp,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, name: &str, extra: &[&str]) -> Qemu {
    let sock = dir.join(format!("{name}.qmp"));
    let child = Command::new(QEMU)
        .args(["-machine", "pc", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none"])
        .args(["-S", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("QMP socket {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut qmp = Qmp::new(stream);
    qmp.execute("qmp_capabilities", json!({}));
    Qemu { child, qmp }
}

/// Minimal QMP client: greeting, then one command at a time, skipping events.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn new(s: UnixStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp { w: s.try_clone().unwrap(), r: BufReader::new(s) };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("read QMP");
        assert!(!line.is_empty(), "QMP connection closed");
        serde_json::from_str(&line).expect("QMP JSON")
    }

    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.w, "{msg}").unwrap();
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {cmd} failed: {e}");
            }
        }
    }

    fn wait_completed(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.execute("query-migrate", json!({}));
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return,
                Some("failed") | Some("cancelled") => panic!("{what} migration: {r}"),
                _ if Instant::now() > deadline => panic!("{what} migration timed out: {r}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// Final memory (last wins) and everything else from one stream.
struct Parsed {
    config: Option<forage_migstream::Configuration>,
    section: forage_migstream::RamSection,
    blocks: Vec<forage_migstream::RamBlock>,
    pages: HashMap<(String, u64), Page>,
    page_events: usize,
    devices: Vec<u8>,
    vmdesc: Option<Vec<u8>>,
    eof: bool,
}

fn parse(path: &Path) -> Parsed {
    let mut p = Parsed {
        config: None,
        section: Default::default(),
        blocks: vec![],
        pages: HashMap::new(),
        page_events: 0,
        devices: vec![],
        vmdesc: None,
        eof: false,
    };
    for ev in Parser::new(File::open(path).unwrap()) {
        match ev.unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            Event::Configuration(c) => p.config = Some(c),
            Event::RamBlocks { section, blocks } => (p.section, p.blocks) = (section, blocks),
            Event::Ram { block, offset, page } => {
                p.page_events += 1;
                p.pages.insert((block.to_string(), offset), page);
            }
            Event::Command { cmd, .. } => panic!("unexpected command {cmd}"),
            Event::DeviceSection { raw, vmdesc, .. } => (p.devices, p.vmdesc) = (raw, vmdesc),
            Event::Eof => p.eof = true,
        }
    }
    p
}

fn tmpdir() -> PathBuf {
    let d = tempfile::Builder::new().prefix("migstream").tempdir().unwrap();
    d.keep()
}

#[test]
fn parse_and_rebuild_real_qemu_stream() {
    if skip() {
        return;
    }
    let dir = tmpdir();
    let file = dir.join("mig.bin");
    {
        let mut src = spawn(&dir, "src", &[]);
        let uri = format!("exec:cat > {}", file.display());
        src.qmp.execute("migrate", json!({ "uri": uri }));
        src.qmp.wait_completed("outgoing");
    }
    let len = std::fs::metadata(&file).unwrap().len();
    let p = parse(&file);
    eprintln!(
        "{len} bytes: machine {:?}, {} blocks, {} page records ({} distinct), {} device bytes, vmdesc {:?} bytes",
        p.config.as_ref().map(|c| c.machine.as_str()),
        p.blocks.len(),
        p.page_events,
        p.pages.len(),
        p.devices.len(),
        p.vmdesc.as_ref().map(Vec::len)
    );
    for b in &p.blocks {
        eprintln!("  block {:?}: {:#x} bytes", b.name, b.used_length);
    }
    assert!(p.config.as_ref().is_some_and(|c| c.machine.starts_with("pc-i440fx")));
    let ram = p.blocks.iter().find(|b| &*b.name == "pc.ram").expect("pc.ram block");
    assert_eq!(ram.used_length, 64 << 20);
    for off in (0..ram.used_length).step_by(PAGE_SIZE) {
        assert!(p.pages.contains_key(&("pc.ram".to_string(), off)), "pc.ram page {off:#x} missing");
    }
    // Every block is complete in a precopy stream.
    let want: u64 = p.blocks.iter().map(|b| b.used_length / PAGE_SIZE as u64).sum();
    assert_eq!(p.pages.len() as u64, want);
    assert!(p.eof, "stream ends with EOF");
    assert_eq!(p.devices.first(), Some(&0x04), "device tail starts with a FULL section");
    let desc: Value = serde_json::from_slice(p.vmdesc.as_ref().expect("VMDESCRIPTION")).unwrap();
    assert!(desc.get("devices").is_some(), "vmdesc JSON has devices");
    // The tail as QEMU wrote it: devices, EOF, VMDESCRIPTION.
    let bytes = std::fs::read(&file).unwrap();
    let vm = p.vmdesc.as_ref().unwrap();
    assert!(bytes.ends_with(vm));
    let eof_at = bytes.len() - vm.len() - 6;
    assert_eq!(bytes[eof_at], 0x00, "EOF byte before VMDESCRIPTION");
    assert!(bytes[..eof_at].ends_with(&p.devices));

    // Rebuild: only data pages (the destination's RAM is fresh), in two rounds.
    let rebuilt = dir.join("rebuilt.bin");
    let mut w = StreamWriter::new(File::create(&rebuilt).unwrap(), p.config.as_ref()).unwrap();
    w.ram_blocks(p.section, &p.blocks).unwrap();
    let mut keys: Vec<_> = p.pages.keys().cloned().collect();
    keys.sort();
    for (i, k) in keys.iter().enumerate() {
        if i == keys.len() / 2 {
            w.end_part().unwrap();
        }
        if let page @ Page::Data(_) = &p.pages[k] {
            w.page(&k.0, k.1, page).unwrap();
        }
    }
    w.finish(&p.devices, p.vmdesc.as_deref()).unwrap();
    let q = parse(&rebuilt);
    assert_eq!(q.blocks, p.blocks);
    assert_eq!(q.devices, p.devices);
    for (k, page) in &q.pages {
        assert_eq!(page, &p.pages[k]);
    }

    // A destination QEMU accepts the rebuilt stream.
    let incoming = format!("exec:cat {}", rebuilt.display());
    let mut dst = spawn(&dir, "dst", &["-incoming", &incoming]);
    dst.qmp.wait_completed("incoming");
    let status = dst.qmp.execute("query-status", json!({}));
    eprintln!("destination after incoming: {status}");
    drop(dst);
    let _ = std::fs::remove_dir_all(&dir);
}
