//! The device's sending side: segments in the overlay's order, with segments the cloudlet
//! fetched sent before the next bulk one, and control messages (Checkpoint, Bye) first
//! of all. A segment is one frame: a fetch waits at most for the bulk segment already
//! being written (segments are about 1 MiB before compression).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use forage_format::Manifest;
use forage_proto::asynchronous::write;
use forage_proto::DeviceMessage as Message;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, oneshot};

pub(crate) struct Plan {
    pub overlay: PathBuf,
    pub prefix_len: u64,
    pub manifest: Manifest,
    /// The cloudlet has the launch VM cached: send no segments.
    pub skip_all: bool,
    pub sent: Option<Arc<AtomicU64>>,
}

/// Runs until the control channel closes (the session ends) or the connection fails.
/// Reports (transfer seconds, bytes) on `done` once the last segment is on its way.
pub(crate) async fn run(
    plan: Plan,
    mut wr: tokio::io::WriteHalf<crate::CloudletStream>,
    mut fetches: mpsc::UnboundedReceiver<u32>,
    mut control: mpsc::UnboundedReceiver<Message>,
    done: oneshot::Sender<(f64, u64)>,
    start: Instant,
) {
    let n = plan.manifest.segments.len();
    let mut offsets = Vec::with_capacity(n);
    let mut at = plan.prefix_len;
    for s in &plan.manifest.segments {
        offsets.push(at);
        at += s.compressed_len;
    }
    let mut sent = vec![plan.skip_all; n];
    // Nothing to read when nothing is to be sent (cached, or fetched by the cloudlet).
    let mut file = match plan.skip_all {
        true => None,
        false => match tokio::fs::File::open(&plan.overlay).await {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("{}: {e}", plan.overlay.display());
                return;
            }
        },
    };
    let mut bytes = 0u64;
    let mut next_bulk = 0;
    let mut done = Some(done);
    loop {
        // Control first, then fetched segments, then the next bulk segment.
        let msg = if let Ok(m) = control.try_recv() {
            m
        } else if let Some(i) =
            std::iter::from_fn(|| fetches.try_recv().ok()).find(|&i| (i as usize) < n && !sent[i as usize])
        {
            match read_segment(
                file.as_mut().expect("segments to send come from the file"),
                i as usize,
                offsets[i as usize],
                plan.manifest.segments[i as usize].compressed_len,
            )
            .await
            {
                Ok(m) => m,
                Err(e) => return tracing::warn!("reading segment {i}: {e}"),
            }
        } else if next_bulk < n {
            let i = next_bulk;
            next_bulk += 1;
            if sent[i] {
                continue;
            }
            match read_segment(
                file.as_mut().expect("segments to send come from the file"),
                i,
                offsets[i],
                plan.manifest.segments[i].compressed_len,
            )
            .await
            {
                Ok(m) => m,
                Err(e) => return tracing::warn!("reading segment {i}: {e}"),
            }
        } else {
            if let Some(d) = done.take() {
                let _ = d.send((start.elapsed().as_secs_f64(), bytes));
            }
            // Everything is sent: only control messages (late fetches are answered).
            tokio::select! {
                m = control.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
                Some(_) = fetches.recv() => continue,
            }
        };
        if let Message::Segment { index, bytes: data } = &msg {
            sent[*index as usize] = true;
            bytes += data.len() as u64;
            if let Some(s) = &plan.sent {
                s.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        if write(&mut wr, &msg).await.is_err() {
            return; // the cloudlet hung up; the reader reports why
        }
    }
}

async fn read_segment(file: &mut tokio::fs::File, i: usize, at: u64, len: u64) -> std::io::Result<Message> {
    let mut data = vec![0u8; len as usize];
    file.seek(std::io::SeekFrom::Start(at)).await?;
    file.read_exact(&mut data).await?;
    Ok(Message::Segment { index: i as u32, bytes: data })
}
