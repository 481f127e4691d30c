//! The first bytes of a disk image brought to `forage base create --disk`: its format as
//! claimed or sniffed, and a qcow2 header's fields (backing file, data file, size).
#![no_main]
use forage_synth::disk_image::{sniff, InputFormat};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let head = &data[..data.len().min(512)];
    for claimed in [None, Some(InputFormat::Raw), Some(InputFormat::Qcow2)] {
        let _ = sniff(std::path::Path::new("disk"), head, claimed);
    }
});
