//! Handoff segments come from another cloudlet: the segment decoder (CBOR, bounds,
//! checksum, deltas against the destination's chunks), the destination's applier (order,
//! places inside the VM), and every codec's decoder with the destination's output limit.
//! Also the source's split of a migration stream into guest RAM and the rest.
#![no_main]
use forage_handoff::adapt::Codec;
use forage_handoff::apply::{Applier, ChunkStore};
use forage_handoff::segment::{ChunkId, CHUNK};

struct Store;

impl ChunkStore for Store {
    fn base(&mut self, id: ChunkId) -> Option<Vec<u8>> {
        (id.index % 2 == 0).then(|| vec![7u8; CHUNK])
    }
    fn write(&mut self, _: ChunkId, data: &[u8]) -> std::io::Result<()> {
        assert_eq!(data.len(), CHUNK, "the applier writes whole chunks only");
        Ok(())
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut own = |id: ChunkId| (id.index % 2 == 0).then(|| vec![7u8; CHUNK]);
    let _ = forage_handoff::segment::decode(data, &mut own);
    let mut applier = Applier::new(Store, 64 * CHUNK as u64, 16 * CHUNK as u64);
    let _ = applier.apply(0, data);
    for codec in [Codec::None, Codec::Zstd(3), Codec::Gzip(6), Codec::Bzip2(9), Codec::Lzma(6)] {
        let _ = forage_handoff::encode::decompress(codec, data, 1 << 20);
    }
    if let Ok(rest) = forage_handoff::migration::split(data, "ram0", |_, _| true) {
        let _ = rest.to_stream();
    }
});
