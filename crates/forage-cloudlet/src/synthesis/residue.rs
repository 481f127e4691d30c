//! VM residue at the end of a session: the instance's changes against its launch VM, as
//! an overlay the device merges into its own (`forage overlay merge`), so its next session
//! starts from the updated state.
//!
//! The instance is saved (device state; QEMU exits, which flushes its memory writes),
//! the changed chunks are found, and `forage_synth::residue` writes the residue, which is
//! then sent in order as Residue pieces of at most 1 MiB.
//! Changed chunks: exactly the chunks the VM wrote through its view (every instance runs
//! on one; its shim records them).

use std::fs::File;
use std::io::Read;

use forage_format::{Manifest, Space};
use forage_proto::asynchronous::write;
use forage_proto::{DeviceMessage, ErrorCode};

use super::context::Ctx;
use crate::error::{internal, refused, SessionError};
use crate::instance::Instance;

const PIECE: usize = 1 << 20;

/// Save the instance (QEMU exits), write its residue and send it; the instance ends.
pub(crate) async fn send_residue(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    mut instance: Instance,
    parent: &Manifest,
    parent_digest: &str,
) -> Result<u64, SessionError> {
    let result = residue(stream, ctx, &mut instance, parent, parent_digest).await;
    instance.finish(ctx.cloudlet).await;
    result
}

async fn residue(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    live: &mut Instance,
    parent: &Manifest,
    parent_digest: &str,
) -> Result<u64, SessionError> {
    let instance_dir = ctx.dir.join("instance");
    let instance = live.vm.save(&instance_dir).await.map_err(internal)?;
    // Every instance runs on a view whose shim knows what the VM wrote.
    let (memory, disk) = (
        live.shim.written_chunks(Space::Memory).await.map_err(internal)?,
        live.shim.written_chunks(Space::Disk).await.map_err(internal)?,
    );
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
