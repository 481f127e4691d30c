//! ext4 free-block introspection over a guest disk (untrusted): the input is the device.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let read = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
        let start = usize::try_from(off).map_err(std::io::Error::other)?;
        let src = data.get(start..start.checked_add(buf.len()).ok_or_else(|| std::io::Error::other("overflow"))?)
            .ok_or_else(|| std::io::Error::other("past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    };
    let _ = forage_synth::ext4::free_chunks_in(&read, data.len() as u64, 4096);
});
