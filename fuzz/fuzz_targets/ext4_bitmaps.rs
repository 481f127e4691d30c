//! ext4 introspection over a guest disk (untrusted): the input is the device, a file
//! system or a partitioned disk (MBR or GPT, `forage_synth::partition`). Both ways of
//! trusting it (a freeze seen by QEMU, or an image that shows itself clean) are run.
#![no_main]
use forage_synth::ext4::{introspect_disk, introspect_in, Checkpoint};
use forage_synth::partition::linux_partitions;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let read = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
        let start = usize::try_from(off).map_err(std::io::Error::other)?;
        let src = data.get(start..start.checked_add(buf.len()).ok_or_else(|| std::io::Error::other("overflow"))?)
            .ok_or_else(|| std::io::Error::other("past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    };
    let _ = introspect_in(&read, data.len() as u64, 4096, Checkpoint::Unknown);
    let _ = introspect_in(&read, data.len() as u64, 4096, Checkpoint::Frozen { chunks_written_after: 1 });
    for p in linux_partitions(&read, data.len() as u64) {
        assert!(p.start.checked_add(p.len).is_some_and(|end| end <= data.len() as u64), "{p:?}");
    }
    // Small chunks, so that a partition a few sectors in is on a chunk boundary.
    let _ = introspect_disk(&read, data.len() as u64, 512, Checkpoint::Unknown);
});
