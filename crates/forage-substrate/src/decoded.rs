//! A substrate decoded once, for all its activations: `DATA/substrates/disks/NAME/` holds
//! its base disks (this host's image disk with the substrate's differences written over
//! it), its guest memory and its device state, all read-only.
//!
//! The first activation reads the substrate file in one pass that verifies it whole
//! (structure, caps, every zstd frame, the checksum at its end) while decoding it into a
//! partial folder, which becomes the decoded folder by a rename only when the file checked
//! out; otherwise it is removed and nothing has run. Every activation then copies memory
//! and device state out of the decoded folder (data ranges only, inside the kernel:
//! `copy_file_range`) into its own run folder, because QEMU writes guest memory back into
//! its memory file (`share=on`), and runs its disk as a qcow2 layer over the base disks.
//! Decompressing and hashing the substrate again for each activation would cost more than
//! that copy; the price is the decoded memory's data on disk, once per substrate, removed
//! with it (`forage substrate rm`).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::activate_error::{io, ActivateError};
use crate::format::{self, DecodeError, SubstrateManifest, ToFiles};

/// File names inside the decoded folder.
pub const MEMORY: &str = "memory.raw";
pub const STATE: &str = "state";

pub struct Decoded {
    pub disks: Vec<PathBuf>,
    pub memory: PathBuf,
    pub state: PathBuf,
    /// Decoded now (the first activation), not found from an earlier one.
    pub fresh: bool,
}

fn disk_name(i: usize) -> String {
    format!("disk{i}.raw")
}

/// The decoded folder `dir` of substrate `file` (manifest `m`, read from it), decoded now
/// if no earlier activation left it whole. `tag` names this activation's partial folder.
pub fn ensure(
    file: &Path,
    m: &SubstrateManifest,
    dir: &Path,
    image_disk: &Path,
    tag: &str,
) -> Result<Decoded, ActivateError> {
    let disks: Vec<PathBuf> = (0..m.snapshot.disks.len()).map(|i| dir.join(disk_name(i))).collect();
    let mut decoded = Decoded { disks, memory: dir.join(MEMORY), state: dir.join(STATE), fresh: false };
    let whole = |d: &Decoded| d.disks.iter().chain([&d.memory, &d.state]).all(|p| p.is_file());
    if whole(&decoded) {
        return Ok(decoded);
    }
    let partial = dir.with_extension(format!("partial-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let result = decode_into(file, m, &partial, image_disk);
    let result = result.and_then(|names| {
        for n in &names {
            let p = partial.join(n);
            let mut perm = std::fs::metadata(&p).map_err(io(&p))?.permissions();
            perm.set_readonly(true);
            std::fs::set_permissions(&p, perm).map_err(io(&p))?;
        }
        Ok(names)
    });
    let names = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    // The folder only ever appears whole (a rename). If another activation got there
    // first (a rename onto a non-empty folder fails), its copy is used and ours dropped:
    // VMs may already run on its disks. A folder of base disks alone (decoded before
    // memory was kept too) gets the memory and state files moved in, disks untouched.
    if std::fs::rename(&partial, dir).is_err() {
        for n in names.iter().filter(|n| *n == MEMORY || *n == STATE) {
            if !dir.join(n).is_file() {
                std::fs::rename(partial.join(n), dir.join(n)).map_err(io(dir))?;
            }
        }
        let _ = std::fs::remove_dir_all(&partial);
        if !whole(&decoded) {
            return Err(io(dir)(std::io::Error::other("the decoded substrate folder is incomplete")));
        }
    }
    decoded.fresh = true;
    Ok(decoded)
}

/// One verified pass over `file` into `partial`; the names of the files written.
fn decode_into(
    file: &Path,
    m: &SubstrateManifest,
    partial: &Path,
    image_disk: &Path,
) -> Result<Vec<String>, ActivateError> {
    let refused = |source| ActivateError::Refused { name: m.name.clone(), source };
    let mut names = vec![MEMORY.to_string(), STATE.to_string()];
    names.extend((0..m.snapshot.disks.len()).map(disk_name));
    let mut targets = vec![("memory".to_string(), partial.join(MEMORY)), ("state".to_string(), partial.join(STATE))];
    targets.extend((0..m.snapshot.disks.len()).map(|i| (format!("disk{i}"), partial.join(disk_name(i)))));
    let f = File::open(file).map_err(io(file))?;
    let mut sink = ToFiles::new(targets).with_base("disk0", image_disk.to_path_buf());
    match format::decode(std::io::BufReader::with_capacity(1 << 20, f), &mut sink) {
        // The file may have been replaced since its manifest was read: then it is not the
        // substrate the request was checked against.
        Ok(d) if serde_json::to_value(&d).ok() == serde_json::to_value(m).ok() => Ok(names),
        Ok(_) => Err(refused(DecodeError::Manifest("the file changed while it was activated".into()))),
        Err(e) => Err(refused(e)),
    }
}

/// Copy `from` to a new file `to` of the same size: its data ranges by `copy_file_range`
/// (in the kernel, no user-space buffer), its holes left holes. Nothing is synced: the
/// copy is a running VM's memory file, not something to keep.
pub fn copy_data(from: &Path, to: &Path) -> std::io::Result<()> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = File::create(to)?;
    dst.set_len(len)?;
    for (start, end) in forage_vm::sparse::data_ranges(&src, len)? {
        let (mut off_in, mut off_out) = (start, start);
        while off_in < end {
            let len = (end - off_in) as usize;
            let n = rustix::fs::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), len)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} shrank", from.display()),
                ));
            }
        }
    }
    Ok(())
}
