//! The synthesis protocol from an untrusted peer: a stream of frames.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = forage_proto::decode_body(data);
    let mut r = data;
    for _ in 0..64 {
        if forage_proto::blocking::read(&mut r).is_err() {
            break;
        }
    }
});
