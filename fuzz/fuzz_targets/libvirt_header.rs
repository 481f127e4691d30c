//! Fuzzes the reader of libvirt's save-image header (`virsh save`, forage-vm's import)
//! and of the VMDESCRIPTION device list: any bytes give a header whose stream lies after
//! it, or an error, never a panic.
#![no_main]

use forage_vm::import::{libvirt, reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if libvirt::is_libvirt(data) {
        if let Ok(h) = libvirt::decode(data) {
            assert!(h.stream_offset() >= libvirt::HEADER_LEN as u64);
            assert!(h.data_len <= libvirt::MAX_DATA_LEN);
        }
    } else {
        let _ = libvirt::decode(data);
    }
    let _ = reference::device_list(data);
});
