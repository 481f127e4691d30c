//! A whole overlay file from untrusted bytes: header, manifest, every segment, trailer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = forage_format::OverlayReader::open(data) {
        let blobs = r.manifest().blobs.clone();
        while let Ok(Some(seg)) = r.next_segment() {
            for b in blobs.iter().filter(|b| b.segment as usize == seg.index) {
                let _ = seg.blob(b);
            }
        }
        let _ = r.finish();
    }
});
