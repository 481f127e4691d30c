//! Handoff segments come from another cloudlet: the segment decoder (CBOR, bounds,
//! checksum, deltas against the destination's chunks) and every codec's decoder with the
//! destination's output limit.
#![no_main]
use forage_handoff::adapt::Codec;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut own = |id: forage_handoff::segment::ChunkId| (id.index % 2 == 0).then(|| vec![7u8; forage_handoff::segment::CHUNK]);
    let _ = forage_handoff::segment::decode(data, &mut own);
    for codec in [Codec::None, Codec::Zstd(3), Codec::Gzip(6), Codec::Bzip2(9), Codec::Lzma(6)] {
        let _ = forage_handoff::encode::decompress(codec, data, 1 << 20);
    }
});
