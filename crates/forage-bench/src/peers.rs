//! What forage's overlays are measured against, computed in the same run:
//! - the paper's baseline: `xdelta3` of the whole disk and memory images against the
//!   base's, then `xz -6` (LZMA);
//! - `zstd --patch-from --long -19`, the disk cut into pieces of at most 1 GiB (zstd
//!   refuses larger references);
//! - the oracle: the launch VM's changed 4 KiB chunks, SHA-256 deduplicated against the
//!   base and among themselves (memory against disk), zero chunks and ext4 free blocks
//!   out, as ONE `xz -6` stream (memory chunks first, then disk, by offset).
//!
//! Every tool streams: its output is counted, not kept.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use forage_format::chunk::is_zero;
use forage_format::CHUNK_SIZE;
use forage_synth::ext4::Introspection;
use forage_synth::launch::LaunchVm;
use forage_synth::BaseVm;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::launch_cache::input;

/// Largest piece given to `zstd --patch-from`: the reference and the target must both fit
/// in the `--long=31` window (2 GiB). With 2 GiB pieces, the target's matches in the
/// reference lay up to 4 GiB back: a 2 GiB disk image's data was compressed as if new.
const ZSTD_PIECE: u64 = 1 << 30;

/// Bytes of a delta, per part of the VM.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sized {
    pub memory: u64,
    pub disk: u64,
    pub seconds: f64,
}

impl Sized {
    pub fn total(&self) -> u64 {
        self.memory + self.disk
    }
}

/// Writes a command's stdin.
type Feed<'a> = &'a mut dyn FnMut(&mut dyn Write) -> anyhow::Result<()>;

/// Bytes a command writes to its stdout (fed from `feed`, if given), and its success.
fn count_output(cmd: &mut Command, feed: Option<Feed<'_>>) -> anyhow::Result<u64> {
    let program = format!("{:?}", cmd.get_program());
    // Fed: a pipe; otherwise the caller's stdin (another process's output for xz).
    if feed.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("running {program}"))?;
    let mut out = child.stdout.take().expect("piped");
    let counter = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match out.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k as u64,
            }
        }
    });
    let fed = match (feed, child.stdin.take()) {
        (Some(f), Some(mut stdin)) => {
            let r = f(&mut stdin);
            drop(stdin);
            r
        }
        _ => Ok(()),
    };
    let o = child.wait_with_output()?;
    let n = counter.join().map_err(|_| anyhow::anyhow!("counting {program}'s output"))??;
    if !o.status.success() {
        bail!("{program} failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
    }
    fed?;
    Ok(n)
}

/// The paper's baseline on one pair of images: `xdelta3 -e -9 -S none` | `xz -6`.
fn xdelta3_xz(src: &Path, target: &Path) -> anyhow::Result<u64> {
    let mut xd = Command::new("nice")
        .args(["-n", "5", "xdelta3", "-e", "-9", "-c", "-f", "-S", "none", "-B", "536870912", "-s"])
        .arg(src)
        .arg(target)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running xdelta3")?;
    let vcdiff = xd.stdout.take().expect("piped");
    let n = count_output(Command::new("nice").args(["-n", "5", "xz", "-6", "-T1", "-c"]).stdin(vcdiff), None);
    let st = xd.wait_with_output()?;
    if !st.status.success() {
        bail!("xdelta3 failed ({}): {}", st.status, String::from_utf8_lossy(&st.stderr).trim());
    }
    n
}

/// Baseline of a launch VM (its disk and memory against the base's).
pub fn baseline(base: &BaseVm, l: &LaunchVm) -> anyhow::Result<Sized> {
    let t = Instant::now();
    let disk = xdelta3_xz(&base.disk_path(), &l.snapshot.disk_paths()[0])?;
    let memory = xdelta3_xz(&base.memory_path(), &l.snapshot.memory_path())?;
    Ok(Sized { memory, disk, seconds: t.elapsed().as_secs_f64() })
}

/// `zstd --patch-from --long -19` of a launch VM, the disk in pieces of at most 1 GiB
/// (written sparsely to `scratch`, removed after).
pub fn zstd_patch(base: &BaseVm, l: &LaunchVm, scratch: &Path) -> anyhow::Result<Sized> {
    let t = Instant::now();
    let one = |src: &Path, target: &Path| -> anyhow::Result<u64> {
        count_output(
            Command::new("nice")
                .args(["-n", "5", "zstd", "-19", "--long=31", "-T1", "-q", "-c"])
                .stdin(Stdio::null())
                .arg(format!("--patch-from={}", src.display()))
                .arg(target),
            None,
        )
    };
    let memory = one(&base.memory_path(), &l.snapshot.memory_path())?;
    let (b, t_disk) = (base.disk_path(), l.snapshot.disk_paths()[0].clone());
    let len = std::fs::metadata(&t_disk)?.len();
    std::fs::create_dir_all(scratch)?;
    let mut disk = 0;
    let mut off = 0;
    while off < len {
        let n = ZSTD_PIECE.min(len - off);
        let (bp, tp) = (scratch.join("base.piece"), scratch.join("target.piece"));
        copy_range_sparse(&b, off, n, &bp)?;
        copy_range_sparse(&t_disk, off, n, &tp)?;
        let r = one(&bp, &tp);
        let _ = std::fs::remove_file(&bp);
        let _ = std::fs::remove_file(&tp);
        disk += r?;
        off += n;
    }
    Ok(Sized { memory, disk, seconds: t.elapsed().as_secs_f64() })
}

/// `len` bytes of `src` at `off` into a new sparse file `dst` (zero blocks left as holes).
fn copy_range_sparse(src: &Path, off: u64, len: u64, dst: &Path) -> anyhow::Result<()> {
    let (s, d) = (File::open(src)?, File::create(dst)?);
    d.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        s.read_exact_at(&mut buf[..n], off + done)?;
        for (k, block) in buf[..n].chunks(CHUNK_SIZE).enumerate() {
            if !is_zero(block) {
                d.write_all_at(block, done + (k * CHUNK_SIZE) as u64)?;
            }
        }
        done += n as u64;
    }
    Ok(())
}

/// What the oracle measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Oracle {
    /// The one `xz -6` stream.
    pub bytes: u64,
    /// Unique chunks that went into it, per space.
    pub memory_chunks: u64,
    pub disk_chunks: u64,
    /// Modified chunks dropped as ext4 free blocks.
    pub ext4_free_chunks: u64,
    pub seconds: f64,
}

/// The oracle of a launch VM (see the module's documentation).
pub fn oracle(base: &BaseVm, l: &LaunchVm) -> anyhow::Result<Oracle> {
    let t = Instant::now();
    let launch = input(l);
    let (memory, disk) = forage_synth::create::modified_chunks(base, &launch)?;
    let l_disk = l.snapshot.disk_paths()[0].clone();
    let fs = match forage_synth::ext4::introspect(&l_disk, CHUNK_SIZE as u64, l.checkpoint)? {
        Introspection::Known(fs) => Some(fs),
        _ => None,
    };
    let index = base.index()?;
    let files = [File::open(l.snapshot.memory_path())?, File::open(&l_disk)?];
    let mut o = Oracle::default();
    let mut feed = |w: &mut dyn Write| -> anyhow::Result<()> {
        let mut seen: HashSet<[u8; 32]> = HashSet::new();
        let mut buf = vec![0u8; CHUNK_SIZE];
        for (slot, list) in [(0usize, &memory), (1, &disk)] {
            for &i in list.iter() {
                if slot == 1 && fs.as_ref().is_some_and(|f| f.is_free(i)) {
                    o.ext4_free_chunks += 1;
                    continue;
                }
                read_chunk(&files[slot], i, &mut buf)?;
                if is_zero(&buf) {
                    continue;
                }
                let h: [u8; 32] = Sha256::digest(&buf).into();
                if index.lookup(&h).is_some() || !seen.insert(h) {
                    continue;
                }
                if slot == 0 {
                    o.memory_chunks += 1;
                } else {
                    o.disk_chunks += 1;
                }
                w.write_all(&buf)?;
            }
        }
        Ok(())
    };
    let bytes = count_output(Command::new("nice").args(["-n", "5", "xz", "-6", "-T1", "-c"]), Some(&mut feed))?;
    o.bytes = bytes;
    o.seconds = t.elapsed().as_secs_f64();
    Ok(o)
}

fn read_chunk(f: &File, i: u64, buf: &mut [u8]) -> std::io::Result<()> {
    buf.fill(0);
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], i * CHUNK_SIZE as u64 + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(())
}
