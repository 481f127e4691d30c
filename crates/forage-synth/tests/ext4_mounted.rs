//! ext4 introspection on a real, kernel-mounted ext4 (a loop mount; needs root, skipped
//! with a line without): an image taken while the file system is mounted and not frozen is
//! refused (its bitmaps may lag the kernel's); one taken while it is frozen is read, its
//! free blocks and empty journal found, and nothing of a live file is claimed.

use std::path::{Path, PathBuf};
use std::process::Command;

use forage_synth::ext4::{introspect, Checkpoint, Introspection, NotCheckpointed};

struct Mounted {
    dir: PathBuf,
    frozen: bool,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.frozen {
            let _ = Command::new("fsfreeze").arg("--unfreeze").arg(&self.dir).status();
        }
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn copy(from: &Path, to: &Path) {
    run(Command::new("cp").arg("--sparse=always").arg(from).arg(to)).unwrap();
}

#[test]
fn ext4_introspection_refuses_an_unfrozen_file_system_and_reads_a_frozen_one() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096"]).arg(&img).arg("64M")).expect("mkfs.ext4");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt)) {
        eprintln!("skipped: a loop mount is not possible here ({e})");
        return;
    }
    let mut m = Mounted { dir: mnt.clone(), frozen: false };
    // A live file, and garbage: a file written, synced, deleted.
    let live: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(mnt.join("live"), &live).unwrap();
    std::fs::write(mnt.join("garbage"), vec![0x5au8; 4 << 20]).unwrap();
    run(&mut Command::new("sync")).unwrap();
    std::fs::remove_file(mnt.join("garbage")).unwrap();
    run(&mut Command::new("sync")).unwrap();

    // Mounted and not frozen: the image needs recovery, and its journal holds the
    // transactions just committed (either shows it is not checkpointed); nothing is claimed.
    let unfrozen = tmp.path().join("unfrozen.img");
    copy(&img, &unfrozen);
    match introspect(&unfrozen, 4096, Checkpoint::Unknown).unwrap() {
        Introspection::Skipped(NotCheckpointed::NeedsRecovery | NotCheckpointed::JournalNotEmpty { .. }) => {}
        other => panic!("an unfrozen file system was introspected: {other:?}"),
    }

    // Frozen: complete on disk, journal checkpointed.
    run(Command::new("fsfreeze").arg("--freeze").arg(&mnt)).unwrap();
    m.frozen = true;
    let frozen = tmp.path().join("frozen.img");
    copy(&img, &frozen);
    run(Command::new("fsfreeze").arg("--unfreeze").arg(&mnt)).unwrap();
    m.frozen = false;
    let Introspection::Known(fs) = introspect(&frozen, 4096, Checkpoint::Unknown).unwrap() else {
        panic!("a frozen file system was not introspected")
    };
    assert!(fs.free_chunks() * 4096 > 40 << 20, "{} free chunks", fs.free_chunks());
    assert!(fs.journal_chunks() > 0, "the empty journal's blocks are dead");
    let bytes = std::fs::read(&frozen).unwrap();
    let mut garbage_free = 0;
    for (c, chunk) in bytes.chunks(4096).enumerate() {
        let c = c as u64;
        if fs.is_free(c) || fs.is_dead_journal(c) {
            assert!(!live.chunks(4096).any(|l| l == chunk), "chunk {c} holds the live file's data");
            garbage_free += chunk.iter().all(|b| *b == 0x5a) as u64;
        }
    }
    assert!(garbage_free * 4096 >= 3 << 20, "the deleted file's blocks are free: {garbage_free}");
    drop(m);
}
