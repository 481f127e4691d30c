//! What a destination remembers of an arriving instance, so that a source that did not
//! hear the outcome of its commit can ask (HandoffQuery): `arrival.json` in the session
//! folder, written once the commit has arrived and applied, before the VM resumes; the
//! session's `instance.json` follows once it runs. A session that fails is removed with
//! its folder, and with it what it remembered.

use std::path::Path;

use forage_proto::ServiceEndpoint;
use serde::{Deserialize, Serialize};

use crate::instance::InstanceFile;
use crate::Cloudlet;

const ARRIVAL_FILE: &str = "arrival.json";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Arrival {
    format: u32,
    /// The source cloudlet (its certificate's name).
    from: String,
    /// The instance's id at the source.
    instance: String,
}

/// What became of an instance a source sent.
#[derive(Debug)]
pub(crate) enum Fate {
    /// It runs here, its service at this endpoint.
    Running(ServiceEndpoint),
    /// Its commit arrived; it is being resumed (ask again).
    Resuming,
    /// Nothing of it is here.
    Unknown,
}

/// Note, in session folder `dir`, that the instance `instance` of `from` has all it needs.
pub(crate) fn note(dir: &Path, from: &str, instance: &str) -> std::io::Result<()> {
    let a = Arrival { format: 1, from: from.into(), instance: instance.into() };
    let tmp = dir.join(format!("{ARRIVAL_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&a).expect("serializes"))?;
    std::fs::rename(&tmp, dir.join(ARRIVAL_FILE))
}

/// What became of the instance `instance` that `from` sent here.
pub(crate) fn fate(cloudlet: &Cloudlet, from: &str, instance: &str) -> Fate {
    let Ok(sessions) = std::fs::read_dir(cloudlet.data.work()) else { return Fate::Unknown };
    for dir in sessions.flatten().map(|e| e.path()) {
        let Some(bytes) = std::fs::read(dir.join(ARRIVAL_FILE)).ok() else { continue };
        let Ok(a) = serde_json::from_slice::<Arrival>(&bytes) else { continue };
        if a.from != from || a.instance != instance {
            continue;
        }
        return match InstanceFile::read(&dir) {
            Ok(f) if forage_vm::process::alive(f.qemu_pid) => Fate::Running(f.service),
            Ok(_) => Fate::Unknown,
            Err(_) => Fate::Resuming,
        };
    }
    Fate::Unknown
}
