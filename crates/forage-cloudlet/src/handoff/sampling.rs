//! The adaptation's table measured on the moving VM's own memory as the handoff starts
//! (`forage_handoff::sample`): up to [`SAMPLE_CHUNKS`] guest pages (a segment's worth)
//! that differ from the base, found by probing places spread over the memory file and
//! taking runs of neighbouring pages there (as a segment holds them), each with the
//! destination's page at its place, go through the candidate modes in parallel (the
//! fastest and smallest level of each codec on the table's frontier, and the fastest
//! level of each codec off it: LZMA, off the reference table's frontier, is the smallest
//! and fast enough on a Debian guest's memory), while the migration
//! already runs on the table it had (the cloudlet's profile or the reference); the
//! adaptation takes the measured table at its next tick. A VM that changed too little to
//! sample keeps the table it had. A later handoff of the same app (its base and its VM's
//! name) to the same destination, within `board::OWN_TABLE_FOR` (10 min), takes the table
//! measured here and samples nothing (`HandoffBoard::own_table`): the sample takes
//! 0.3-0.5 s of every core while the encoders need them, which cost the Debian app +19%
//! against the static winner at 25 Mbit/s (medians of 3; -5% without it at 25 Mbit/s
//! alone, +5-8% in the whole benches after). The price: one draw of pages decides every
//! handoff of the app for those 10 minutes (docs/handoff-bench.md, steps 8-10), so the
//! draw is a whole segment's worth.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use forage_handoff::adapt::{LookupTable, Mode};
use forage_handoff::encode::SampleChunk;
use forage_handoff::segment::CHUNK;

/// Modified pages in a sample: 1 MiB in sixteen runs, one segment of the pipeline, so
/// that each codec compresses what it will on the wire (bzip2-9's 900 KB blocks, zstd's
/// window). 64 pages (256 KiB) through every frontier mode were too few to rank modes
/// that differ by 5-10%: every Debian adaptive run kept none+zstd-1, which sent 9-10%
/// more than none+bzip2-9 (docs/handoff-bench.md, step 10). Fewer modes
/// ([`forage_handoff::sample::candidates`]) keep the sample's time about what it was.
pub const SAMPLE_CHUNKS: usize = forage_handoff::encode::SEGMENT_BYTES / CHUNK;
/// Places looked at, at most, to find them.
const PROBES: u64 = 8192;
/// Pages read from a place found modified: a segment holds runs of neighbouring pages
/// (QEMU streams a 1 MiB window in address order), and what a compressor finds across
/// neighbours is what a delta of each page against the base cannot. Pages scattered one
/// by one over the memory made bsdiff look 3-5% smaller than none+bzip2-9 on
/// hashsearch; on the wire it was larger, and the adaptive run lost 11-15% to it. Two
/// runs of 32 were too few places: on the Debian app at 25 Mbit/s, three adaptive runs'
/// first decisions went to bsdiff+bzip2-9, none+bzip2-9 and bsdiff+bzip2-8, and the
/// bsdiff ones were undone a second later.
const RUN: u64 = 16;
/// Fewer modified pages than this: no sample.
const ENOUGH: usize = 16;
/// Time the modes may take, all together.
const BUDGET: Duration = Duration::from_millis(800);

/// Start measuring `table`'s candidate modes (and `current`, the mode the pipeline starts in) on
/// `memory` (the running VM's RAM file) against `base_memory`, in the background; the
/// pipeline takes the result when it is there. Nothing arrives when the VM changed too
/// little or reading fails (the log says why): the pipeline keeps `table`.
pub(super) fn start(
    memory: PathBuf,
    base_memory: PathBuf,
    has_base: bool,
    table: &LookupTable,
    current: Mode,
) -> Arc<OnceLock<LookupTable>> {
    let slot = Arc::new(OnceLock::new());
    let mut modes = forage_handoff::sample::candidates(table);
    if !modes.contains(&current) {
        modes.insert(0, current);
    }
    let filled = slot.clone();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let sample = match sample(&memory, &base_memory, has_base) {
            Ok(s) if s.len() >= ENOUGH => s,
            Ok(s) => return tracing::info!("{} modified pages found: too few to sample, the table stays", s.len()),
            Err(e) => return tracing::warn!("sampling {}: {e}; the table stays", memory.display()),
        };
        let found_ms = t.elapsed().as_millis() as u64;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let measured = forage_handoff::sample::measure(&modes, &sample, CHUNK as u64, cores, BUDGET);
        tracing::info!(
            found_ms,
            ms = t.elapsed().as_millis() as u64,
            "adaptation table from the VM's own data: {} of {} candidate modes measured on {} of its pages",
            measured.modes.len(),
            modes.len(),
            sample.len()
        );
        if !measured.modes.is_empty() {
            let _ = filled.set(measured);
        }
    });
    slot
}

/// Pages of `memory` that differ from `base_memory` (and are not zero), each with the
/// destination's page at its place: the base's, or none (zeros) without the base.
fn sample(memory: &Path, base_memory: &Path, has_base: bool) -> std::io::Result<Vec<SampleChunk>> {
    let (mem, base) = (File::open(memory)?, File::open(base_memory)?);
    let pages = mem.metadata()?.len() / CHUNK as u64;
    if pages == 0 {
        return Ok(Vec::new());
    }
    // A stride coprime with the page count visits pages spread over the whole file.
    let stride = [7919u64, 104_729, 1_299_709].into_iter().find(|s| !pages.is_multiple_of(*s)).unwrap_or(1);
    let mut out = Vec::new();
    let (mut page, mut at_base) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    // The page at `index` if it is modified (not zero, not the base's), with the base's.
    let mut modified = |index: u64| -> std::io::Result<Option<SampleChunk>> {
        mem.read_exact_at(&mut page, index * CHUNK as u64)?;
        if page.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        at_base.fill(0);
        if has_base {
            let _ = base.read_at(&mut at_base, index * CHUNK as u64)?;
        }
        Ok((page != at_base).then(|| (page.clone(), has_base.then(|| at_base.clone()))))
    };
    for i in 0..PROBES.min(pages) {
        let start = (i * stride) % pages;
        let Some(first) = modified(start)? else { continue };
        out.push(first);
        for index in start + 1..(start + RUN).min(pages) {
            if out.len() == SAMPLE_CHUNKS {
                break;
            }
            out.extend(modified(index)?);
        }
        if out.len() == SAMPLE_CHUNKS {
            break;
        }
    }
    Ok(out)
}
