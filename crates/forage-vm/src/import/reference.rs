//! What the target VM offers, read from QEMU itself: the target spec is started, stopped
//! at once and its state saved (`x-ignore-shared`, as every forage save), and that stream
//! names the machine type, the RAM blocks with their guest addresses, and the devices
//! (from its VMDESCRIPTION). An imported stream must match it; this is cheaper and more
//! exact than a table of QEMU's device names, which change with machine types.

use std::path::{Path, PathBuf};

use forage_migstream::{Configuration, Event, Parser, RamBlock, RamSection};

use crate::accel::Accel;
use crate::spec::VmSpec;
use crate::vm::Vm;

use super::error::ImportError;

/// A device section's identity: QEMU's idstr and instance id.
pub type DeviceId = (String, u32);

/// The target's machine, RAM blocks and devices.
#[derive(Debug, Clone)]
pub struct Reference {
    pub config: Configuration,
    pub section: RamSection,
    pub blocks: Vec<RamBlock>,
    pub devices: Vec<DeviceId>,
}

/// Start `spec` (its files moved into `work`, a blank disk of each size), stop, save
/// the state, quit, and read the stream.
pub async fn capture(spec: &VmSpec, accel: Accel, work: &Path, qmp_socket: &Path) -> Result<Reference, ImportError> {
    std::fs::create_dir_all(work).map_err(ImportError::io(work))?;
    let mut s = spec.clone();
    s.name = format!("{}-reference", spec.name);
    s.memory_file = work.join("reference-memory.raw");
    let _ = std::fs::remove_file(&s.memory_file);
    for (i, d) in s.disks.iter_mut().enumerate() {
        let blank = work.join(format!("reference-disk{i}.raw"));
        let len = std::fs::metadata(&d.path).map_err(ImportError::io(&d.path))?.len();
        let f = std::fs::File::create(&blank).map_err(ImportError::io(&blank))?;
        f.set_len(len).map_err(ImportError::io(&blank))?;
        d.path = blank;
        d.format = crate::spec::DiskFormat::Raw;
    }
    if let Some(nic) = s.nic.as_mut() {
        nic.forwards.clear(); // nothing to reach; ports may be taken
    }
    s.serial_log = work.join("reference-serial.log");
    s.qmp_socket = qmp_socket.to_path_buf();
    s.control_socket = None;
    if let Some(ga) = s.guest_agent.as_mut() {
        ga.socket = qmp_socket.with_extension("qga");
    }
    let state = work.join("reference-state");
    let vm = Vm::boot(s, accel, &work.join("reference-qemu.log")).await.map_err(ImportError::Reference)?;
    vm.qmp().execute("stop", None).await.map_err(|e| ImportError::Reference(e.into()))?;
    let saved = vm.write_state(&state).await;
    let _ = vm.shutdown().await;
    saved.map_err(|e| ImportError::ReferenceSave(Box::new(e)))?;
    let r = read(&state);
    for f in ["reference-memory.raw", "reference-state", "reference-serial.log"] {
        let _ = std::fs::remove_file(work.join(f));
    }
    for i in 0..spec.disks.len() {
        let _ = std::fs::remove_file(work.join(format!("reference-disk{i}.raw")));
    }
    r
}

fn read(state: &Path) -> Result<Reference, ImportError> {
    let f = std::fs::File::open(state).map_err(ImportError::io(state))?;
    let bad = |detail: String| ImportError::ReferenceStream { path: PathBuf::from(state), detail };
    let mut config = None;
    let mut ram = None;
    let mut devices = None;
    for ev in Parser::new(std::io::BufReader::new(f)) {
        match ev.map_err(|e| bad(e.to_string()))? {
            Event::Configuration(c) => config = Some(c),
            Event::RamBlocks { section, blocks } => ram = Some((section, blocks)),
            Event::DeviceSection { vmdesc, .. } => {
                devices = Some(device_list(vmdesc.as_deref().unwrap_or(b"{}")).map_err(bad)?)
            }
            _ => {}
        }
    }
    let config = config.ok_or_else(|| bad("no CONFIGURATION section".into()))?;
    let (section, blocks) = ram.ok_or_else(|| bad("no RAM section".into()))?;
    Ok(Reference { config, section, blocks, devices: devices.unwrap_or_default() })
}

/// The devices a VMDESCRIPTION lists: `{"devices": [{"name": .., "instance_id": ..}, ..]}`.
pub fn device_list(vmdesc: &[u8]) -> Result<Vec<DeviceId>, String> {
    let v: serde_json::Value = serde_json::from_slice(vmdesc).map_err(|e| format!("VMDESCRIPTION is not JSON: {e}"))?;
    let Some(list) = v.get("devices") else { return Ok(Vec::new()) };
    let list = list.as_array().ok_or("VMDESCRIPTION devices is not a list")?;
    list.iter()
        .map(|d| {
            let name = d["name"].as_str().ok_or("a VMDESCRIPTION device without a name")?;
            let inst = d["instance_id"].as_u64().unwrap_or(0);
            Ok((name.to_string(), u32::try_from(inst).map_err(|_| "instance id over 32 bits")?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::device_list;

    #[test]
    fn devices_come_from_the_vmdescription() {
        let d = br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0},{"name":"cpu","instance_id":1}]}"#;
        assert_eq!(device_list(d).unwrap(), vec![("timer".to_string(), 0), ("cpu".to_string(), 1)]);
        assert!(device_list(b"{\"devices\":3}").is_err());
        assert!(device_list(b"nope").is_err());
    }
}
