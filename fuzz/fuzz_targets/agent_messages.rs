//! Guest agent messages: requests (parsed by the agent in the guest) and responses (parsed
//! by the host from an untrusted guest).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = forage_agent::parse_request(data);
    let _ = serde_json::from_slice::<forage_agent::Response>(data);
    let _ = serde_json::from_slice::<forage_agent::app::AppManifest>(data);
});
