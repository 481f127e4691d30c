//! The manifest decoder (zstd + CBOR + consistency checks), unbounded and with the limit
//! a cloudlet derives from its base's sizes; raw CBOR too, by compressing the input first
//! so the fuzzer reaches the CBOR and validation code. What decodes must be valid and
//! re-encode to a manifest that decodes to the same thing.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limit = forage_format::manifest::raw_limit_for(256 << 20, 1 << 30);
    for input in [data.to_vec(), forage_format::SegmentCodec::Zstd { level: 1 }.compress(data)] {
        let _ = forage_format::Manifest::decode(&input);
        if let Ok(m) = forage_format::Manifest::decode_limited(&input, limit) {
            assert!(m.validate().is_ok());
            let again = forage_format::Manifest::decode(&m.encode()).expect("a decoded manifest re-encodes");
            assert_eq!(again, m);
        }
    }
});
