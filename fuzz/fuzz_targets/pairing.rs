//! Pairing bundles arrive on USB sticks and codes are typed by people: both are parsed
//! before anything is trusted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(b) = forage_trust::Bundle::parse(data) {
        let dir = std::env::temp_dir().join(format!("forage-fuzz-pair-{}", std::process::id()));
        let _ = forage_trust::DeviceTrust::new(&dir).import_bundle(&serde_json::to_vec(&b).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = forage_trust::PairingCode::parse(text);
    }
});
