//! VM residue at the end of a session: the instance's changes against its launch VM, as
//! an overlay the device merges into its own (`forage overlay merge`), so its next session
//! starts from the updated state.
//!
//! The instance is saved (device state; QEMU exits, which flushes its memory writes),
//! the changed chunks are found, and `forage_synth::residue` writes the residue, which is
//! then sent in order as Residue pieces of at most 1 MiB.
//! Changed chunks: with early start, exactly the chunks the VM wrote through its view
//! (the shim's assembly records them); otherwise by comparing the instance's files with
//! the launch VM's, chunk by chunk, streaming.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use forage_format::{Manifest, Space, CHUNK_SIZE};
use forage_proto::asynchronous::write;
use forage_proto::{DeviceMessage, ErrorCode};
use forage_vm::Snapshot;

use super::context::Ctx;
use crate::error::{internal, refused, SessionError};
use crate::instance::Instance;

/// What the instance started from.
pub(crate) enum LaunchRef<'a> {
    /// A launch VM on disk (pipelined, cached).
    Files(&'a Snapshot),
    /// The early-start view: its shim knows what the VM wrote.
    View,
}

const PIECE: usize = 1 << 20;

/// Save the instance (QEMU exits), write its residue and send it; the instance ends.
pub(crate) async fn send_residue(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    mut instance: Instance,
    parent: &Manifest,
    parent_digest: &str,
    launch: LaunchRef<'_>,
) -> Result<u64, SessionError> {
    let result = residue(stream, ctx, &mut instance, parent, parent_digest, launch).await;
    instance.finish(ctx.cloudlet).await;
    result
}

async fn residue(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    live: &mut Instance,
    parent: &Manifest,
    parent_digest: &str,
    launch: LaunchRef<'_>,
) -> Result<u64, SessionError> {
    let instance_dir = ctx.dir.join("instance");
    let instance = live.vm.save(&instance_dir).await.map_err(internal)?;
    let (memory, disk) = match launch {
        LaunchRef::View => (
            live.shim.written_chunks(Space::Memory).await.map_err(internal)?,
            live.shim.written_chunks(Space::Disk).await.map_err(internal)?,
        ),
        LaunchRef::Files(launch) => {
            let pairs = [
                (launch.memory_path(), instance.memory_path()),
                (launch.disk_paths()[0].clone(), instance.disk_paths()[0].clone()),
            ];
            let [m, d] = pairs.map(|(a, b)| tokio::task::spawn_blocking(move || changed_chunks(&a, &b)));
            (m.await.expect("no panic").map_err(internal)?, d.await.expect("no panic").map_err(internal)?)
        }
    };
    tracing::info!(session = %ctx.id, memory = memory.len(), disk = disk.len(), "residue: changed chunks");
    let out = ctx.dir.join("residue.ovl");
    let (base, parent, digest, out2) = (ctx.base.clone(), parent.clone(), parent_digest.to_string(), out.clone());
    tokio::task::spawn_blocking(move || {
        forage_synth::residue::create_residue(
            &base,
            &parent,
            &digest,
            &instance,
            &memory,
            &disk,
            &forage_synth::create::CreateOptions::default(),
            &out2,
        )
    })
    .await
    .expect("no panic")
    .map_err(|e| refused(ErrorCode::Internal, format!("residue: {e}")))?;

    let mut file = File::open(&out).map_err(internal)?;
    let total = file.metadata().map_err(internal)?.len();
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; PIECE];
        let n = read_full(&mut file, &mut buf).map_err(internal)?;
        buf.truncate(n);
        let last = offset + n as u64 >= total;
        write(stream, &DeviceMessage::Residue { offset, bytes: buf, last }).await?;
        offset += n as u64;
        if last {
            return Ok(total);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Chunks that differ between two files of the same size (read 1 MiB at a time).
fn changed_chunks(a: &Path, b: &Path) -> std::io::Result<Vec<u64>> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    let mut changed = Vec::new();
    let mut index = 0u64;
    loop {
        let (na, nb) = (read_full(&mut fa, &mut ba)?, read_full(&mut fb, &mut bb)?);
        let n = na.max(nb);
        if n == 0 {
            return Ok(changed);
        }
        ba[na..n].fill(0);
        bb[nb..n].fill(0);
        for (ca, cb) in ba[..n].chunks(CHUNK_SIZE).zip(bb[..n].chunks(CHUNK_SIZE)) {
            if ca != cb {
                changed.push(index);
            }
            index += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn changed_chunks_are_found() {
        let t = tempfile::tempdir().unwrap();
        let mut a = vec![0u8; 3 * super::CHUNK_SIZE + 100];
        let mut b = a.clone();
        b[super::CHUNK_SIZE + 5] = 1;
        b[3 * super::CHUNK_SIZE + 99] = 1;
        a[0] = 0;
        std::fs::write(t.path().join("a"), &a).unwrap();
        std::fs::write(t.path().join("b"), &b).unwrap();
        assert_eq!(super::changed_chunks(&t.path().join("a"), &t.path().join("b")).unwrap(), vec![1, 3]);
    }
}
