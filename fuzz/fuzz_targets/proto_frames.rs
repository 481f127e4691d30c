//! Every protocol a cloudlet speaks with an untrusted peer, from frames: a device's
//! (synthesis, provisioning, apps), pairing, a peer cloudlet's (handoff), an instance
//! shim's control messages, and the service relay's preamble line.
#![no_main]
use forage_proto::{DeviceMessage, PairingMessage, PeerMessage};
use forage_shim::protocol::ShimMessage;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = forage_proto::decode::<DeviceMessage>(data);
    let _ = forage_proto::decode::<PairingMessage>(data);
    let _ = forage_proto::decode::<PeerMessage>(data);
    let _ = forage_proto::decode::<ShimMessage>(data);
    let _ = forage_proto::frame::kind_of(data);
    let _ = forage_proto::service::parse_preamble(data);
    // A stream of frames, read as each protocol would.
    let mut r = data;
    for _ in 0..64 {
        let Ok(frame) = forage_proto::blocking::read_frame(&mut r) else { break };
        let _ = forage_proto::decode::<DeviceMessage>(&frame);
        let _ = forage_proto::decode::<PeerMessage>(&frame);
    }
});
