//! Per-chunk delta decoders against a fixed base chunk, and segment decompressors.
#![no_main]
use forage_format::{DeltaCodec, SegmentCodec, CHUNK_SIZE};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let base: Vec<u8> = (0..CHUNK_SIZE).map(|i| (i * 31 % 251) as u8).collect();
    match sel % 5 {
        0 => { let _ = DeltaCodec::Xor.decode(&base, rest); }
        1 => { let _ = DeltaCodec::Bsdiff.decode(&base, rest); }
        2 => { let _ = SegmentCodec::Zstd { level: 3 }.decompress(rest, 1 << 16); }
        3 => { let _ = SegmentCodec::Lzma { level: 6 }.decompress(rest, 1 << 16); }
        _ => { let _ = SegmentCodec::None.decompress(rest, rest.len()); }
    }
});
