//! Handoff segments come from another cloudlet: every codec's decoder gets the bytes,
//! with the output limit the destination uses.
#![no_main]
use forage_handoff::adapt::Codec;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for codec in [Codec::None, Codec::Zstd(3), Codec::Gzip(6), Codec::Bzip2(9), Codec::Lzma(6)] {
        let _ = forage_handoff::encode::decompress(codec, data, 1 << 20);
    }
});
