//! Service packages come from other cloudlets and operators: their `package.json` and the
//! `service.json` inside it are parsed before anything is written.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = forage_service::ServiceManifest::parse(data);
    if let Ok((meta, _files)) = forage_synth::package::parse_package_json(data, "forage-service-package", 1, "service") {
        let _ = forage_service::ServiceManifest::parse(meta.to_string().as_bytes());
    }
});
