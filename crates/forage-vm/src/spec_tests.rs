//! Tests of `spec.rs`: command lines, fingerprints, what older specs say.

use super::*;

pub(crate) fn sample() -> VmSpec {
    VmSpec {
        name: "t".into(),
        machine: "pc".into(),
        cpu_model: None,
        vcpus: 1,
        max_vcpus: None,
        memory_mib: 256,
        memory_tail_kib: 0,
        memory_file: "/d/mem,ory.raw".into(),
        boot: Some(DirectBoot {
            kernel: "/i/vmlinuz".into(),
            initrd: "/i/initrd.img".into(),
            cmdline: "console=ttyS0".into(),
        }),
        disks: vec![DiskSpec { path: "/d/disk.raw".into(), format: DiskFormat::Raw, read_only: false, discard: true }],
        nic: Some(NicSpec {
            pci_slot: None,
            forwards: vec![PortForward { host_addr: Ipv4Addr::LOCALHOST, host_port: 40000, guest_port: 8080 }],
        }),
        balloon: Some(BalloonSpec { free_page_reporting: true }),
        guest_agent: None,
        virtio_rng: false,
        virtio_blk_queues: None,
        cdrom: None,
        serial_log: "/d/serial.log".into(),
        serial_socket: None,
        qmp_socket: "/r/qmp.sock".into(),
        control_socket: Some("/r/ctl.sock".into()),
    }
}

fn joined(args: &[OsString]) -> String {
    args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

#[test]
fn ram_tail_keeps_tcg_dirty_tracking_exact() {
    let mut spec = sample();
    assert!(!spec.dirty_tracking_exact(Accel::Tcg), "256 MiB is whole 256 KiB words");
    assert!(spec.dirty_tracking_exact(Accel::Kvm));
    let fingerprint = spec.hardware_fingerprint();
    spec.memory_tail_kib = RAM_TAIL_KIB;
    assert_eq!(spec.memory_bytes(), (256 << 20) + 8192);
    assert!(spec.dirty_tracking_exact(Accel::Tcg));
    assert_ne!(spec.hardware_fingerprint(), fingerprint, "the guest sees the tail");
    let s = joined(&spec.qemu_args(Accel::Tcg, false));
    assert!(s.contains("-m 262152k"), "{s}");
    assert!(s.contains("size=262152K,share=on"), "{s}");
}

#[test]
fn command_line_has_file_backed_ram_and_devices() {
    let s = joined(&sample().qemu_args(Accel::Tcg, false));
    assert!(s.contains("-machine pc,accel=tcg,memory-backend=ram0"));
    assert!(s.contains("memory-backend-file,id=ram0,size=262144K,share=on,mem-path=/d/mem,,ory.raw"));
    assert!(s.contains("virtio-blk-pci,drive=disk0,id=vd0,discard=on"));
    assert!(s.contains("discard=unmap"));
    assert!(s.contains("hostfwd=tcp:127.0.0.1:40000-:8080"));
    assert!(s.contains("user,id=net0,restrict=on"), "guests are isolated: {s}");
    assert!(s.contains("free-page-reporting=on"));
    assert!(s.contains("-mon chardev=qmp0,mode=control"));
    assert!(s.contains("path=/r/ctl.sock -mon chardev=qmp1,mode=control"));
    assert!(!s.contains("-incoming"));
    let r = joined(&sample().qemu_args(Accel::Kvm, true));
    assert!(r.contains("accel=kvm") && r.ends_with("-S -incoming defer"));
}

#[test]
fn fingerprint_ignores_paths_and_host_ports_but_not_hardware() {
    let a = sample();
    let mut b = sample();
    b.memory_file = "/elsewhere/m".into();
    b.nic.as_mut().unwrap().forwards[0].host_port = 41000;
    assert_eq!(a.hardware_fingerprint(), b.hardware_fingerprint());
    let mut c = sample();
    c.memory_mib = 512;
    assert_ne!(a.hardware_fingerprint(), c.hardware_fingerprint());
}

#[test]
fn guest_agent_channel_is_a_virtio_serial_port_on_a_socket() {
    let mut spec = sample();
    let without = joined(&spec.qemu_args(Accel::Tcg, false));
    assert!(!without.contains("virtio-serial"));
    let fingerprint_without = spec.hardware_fingerprint();
    spec.guest_agent = Some(GuestAgentSpec { socket: "/r/q,ga.sock".into() });
    let with = joined(&spec.qemu_args(Accel::Tcg, false));
    assert!(with.contains("-chardev socket,id=qga0,server=on,wait=off,path=/r/q,,ga.sock"), "{with}");
    assert!(with.contains("-device virtio-serial-pci,id=vserial0"));
    assert!(with.contains("virtserialport,bus=vserial0.0,chardev=qga0,id=qga0port,name=org.qemu.guest_agent.0"));
    assert_ne!(spec.hardware_fingerprint(), fingerprint_without, "the channel is guest-visible hardware");
    let with_channel = spec.hardware_fingerprint();
    spec.virtio_rng = true;
    let rng = joined(&spec.qemu_args(Accel::Tcg, false));
    assert!(rng.contains("-object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0"), "{rng}");
    assert_ne!(spec.hardware_fingerprint(), with_channel);
    // A spec without the field (older snapshot.json) still reads, and writes no field.
    let v = serde_json::to_value(sample()).unwrap();
    assert!(v.get("guest_agent").is_none() && v.get("virtio_rng").is_none());
}

#[test]
fn fingerprint_without_guest_agent_is_unchanged() {
    // The fingerprint of a VM without the channel is that of forage before the channel
    // existed: snapshots saved then still restore.
    let hw = serde_json::json!({
        "machine": "pc", "cpu": null, "vcpus": 1, "memory_mib": 256,
        "direct_boot": "console=ttyS0", "disks": [[false, true]], "nic": true, "balloon": true,
    });
    assert_eq!(sample().hardware_fingerprint(), hex::encode(Sha256::digest(hw.to_string().as_bytes())));
}

#[test]
fn serial_console_on_a_socket_keeps_the_log_and_the_fingerprint() {
    let mut spec = sample();
    let before = spec.hardware_fingerprint();
    spec.serial_socket = Some("/r/con,sole".into());
    let s = joined(&spec.qemu_args(Accel::Tcg, false));
    assert!(s.contains("-chardev socket,id=serial0,server=on,wait=off,path=/r/con,,sole,logfile=/d/serial.log"), "{s}");
    assert_eq!(spec.hardware_fingerprint(), before, "the console's host end is not guest-visible");
    assert!(serde_json::to_value(sample()).unwrap().get("serial_socket").is_none());
}

#[test]
fn cd_drive_is_hardware_its_medium_is_not() {
    let mut spec = sample();
    let before = spec.hardware_fingerprint();
    spec.cdrom = Some(CdromSpec { medium: Some("/r/se,ed.iso".into()) });
    let with = spec.hardware_fingerprint();
    assert_ne!(with, before);
    let s = joined(&spec.qemu_args(Accel::Tcg, false));
    assert!(s.contains("filename=/r/se,,ed.iso -blockdev driver=raw,node-name=cd0-medium"), "{s}");
    assert!(s.contains("-device ide-cd,bus=ide.1,unit=0,id=cd0,drive=cd0-medium"), "{s}");
    spec.cdrom = Some(CdromSpec { medium: None });
    assert_eq!(spec.hardware_fingerprint(), with);
    assert!(!joined(&spec.qemu_args(Accel::Tcg, false)).contains("cd0-file"));
}

#[test]
fn vcpus_to_plug_later_are_hardware() {
    let mut spec = sample();
    let before = spec.hardware_fingerprint();
    spec.max_vcpus = Some(4);
    assert!(joined(&spec.qemu_args(Accel::Tcg, false)).contains("-smp 1,maxcpus=4"));
    assert_ne!(spec.hardware_fingerprint(), before, "a restore needs the same hot-plug slots");
    assert!(serde_json::to_value(sample()).unwrap().get("max_vcpus").is_none());
}

#[test]
fn spec_json_refuses_unknown_fields() {
    let mut v = serde_json::to_value(sample()).unwrap();
    assert_eq!(serde_json::from_value::<VmSpec>(v.clone()).unwrap(), sample());
    v["memroy_mib"] = 3.into();
    assert!(serde_json::from_value::<VmSpec>(v).is_err());
}

#[test]
fn pinned_virtio_blk_queues_are_on_the_command_line_and_in_the_fingerprint() {
    let mut spec = sample();
    let before = spec.hardware_fingerprint();
    assert!(!joined(&spec.qemu_args(Accel::Tcg, false)).contains("num-queues"));
    spec.virtio_blk_queues = Some(1);
    let s = joined(&spec.qemu_args(Accel::Tcg, false));
    assert!(s.contains("virtio-blk-pci,drive=disk0,id=vd0,discard=on,num-queues=1"), "{s}");
    assert_ne!(spec.hardware_fingerprint(), before);
    assert!(
        serde_json::to_value(sample()).unwrap().get("virtio_blk_queues").is_none(),
        "older specs stay as they were"
    );
}
