//! Real guests under QEMU (TCG here): boot, save, kill, restore, and the guest carries on.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use forage_agent::AgentClient;
use forage_testkit::guest::*;
use forage_vm::{Snapshot, Vm};

/// Restore `snap` into a new run folder with fresh loopback ports; returns the VM and the
/// host port of `guest_port`.
async fn restore(snap: &Snapshot, test: &str, guest_port: u16) -> (Vm, u16) {
    let run = run_paths(test);
    std::fs::create_dir_all(&run.dir).unwrap();
    let guest_ports: Vec<u16> =
        snap.manifest().spec.nic.as_ref().unwrap().forwards.iter().map(|f| f.guest_port).collect();
    let fw = forage_image::loopback_forwards(guest_ports).unwrap();
    let spec = snap.relocated_spec(&run.dir, &run.qmp_socket, Some(fw.clone()));
    let accel = forage_vm::accel::detect().accel;
    let vm = Vm::restore(snap, spec, accel, &run.dir.join("qemu.log")).await.expect("restore works");
    let port = fw.iter().find(|f| f.guest_port == guest_port).unwrap().host_port;
    (vm, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_save_restore_guest_carries_on() {
    if skip_vm_tests() {
        return;
    }
    let app = sample_app();
    let port = app.manifest().port;
    let (guest, run) = boot("lifecycle", &[port]).await;
    assert_eq!(guest.vm.status().await.unwrap(), "running");

    // The app is not in the image: install it through the agent, then use it.
    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, guest.agent_port));
    let app2 = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut agent = AgentClient::connect(agent_addr, Duration::from_secs(60)).unwrap();
        let before = agent.exec(&["ls", "/data/apps"], Duration::from_secs(10)).unwrap();
        assert!(!before.stdout.contains("hashsearch"), "app baked into the image");
        app2.install(&mut agent).unwrap();
        // A command that leaves a program running in the background answers at once...
        let t = std::time::Instant::now();
        let out = agent.exec(&["sh", "-c", "sleep 1000 & echo started"], Duration::from_secs(30)).unwrap();
        assert_eq!(out.stdout.trim(), "started");
        assert!(t.elapsed() < Duration::from_secs(10), "exec waited {:?}", t.elapsed());
        // ...and a timeout kills everything the command started.
        let out = agent.exec(&["sh", "-c", "sleep 300 & sleep 300"], Duration::from_secs(2)).unwrap();
        assert!(out.timed_out);
        let left = agent.exec(&["sh", "-c", "ps | grep -c '[s]leep 300'"], Duration::from_secs(10)).unwrap();
        assert_eq!(left.stdout.trim(), "0", "timed-out command's children still run");
    })
    .await
    .unwrap();
    let first = request(guest.ports[0], "search lifecycle 12");
    assert!(first.starts_with("ok "), "{first}");
    assert_eq!(field(&first, "served"), 1);

    // Pause and resume keep the VM, and the heartbeat stops while paused.
    guest.vm.pause().await.unwrap();
    assert_eq!(guest.vm.status().await.unwrap(), "paused");
    guest.vm.resume().await.unwrap();
    let serial = guest.vm.spec().serial_log.clone();
    wait_ticks(&serial, 2).await;

    // Save: QEMU exits, memory stays in the file, device state is small.
    let vm = guest.vm;
    let snap_dir = run.dir.parent().unwrap().join("snapshot");
    let snap = vm.save(&snap_dir).await.expect("save works");
    assert!(vm.wait_exit().await.is_some(), "QEMU exited after save");
    let last_before = *ticks(&serial).last().unwrap();
    let m = snap.manifest();
    assert_eq!(m.memory.size, (256 << 20) + forage_vm::spec::RAM_TAIL_KIB * 1024);
    assert!(m.state.size < 4 << 20, "device state is {} bytes", m.state.size);
    drop(vm);
    assert_no_qemu_with(run.qmp_socket.to_str().unwrap()).await;

    // Restore into a brand-new QEMU: the counter and the heartbeat continue.
    let (vm2, port2) = restore(&snap, "lifecycle-r1", port).await;
    let again = request(port2, "search lifecycle-2 12");
    assert_eq!(field(&again, "served"), 2, "{again}");
    let after = wait_ticks(&vm2.spec().serial_log, 1).await;
    assert!(after[0] > last_before && after[0] <= last_before + 2, "tick {last_before} -> {}", after[0]);
    vm2.shutdown().await.unwrap();

    // The snapshot was not consumed: restoring it again starts from the same point.
    let snap = Snapshot::open(&snap_dir).expect("snapshot intact");
    let (vm3, port3) = restore(&snap, "lifecycle-r2", port).await;
    assert_eq!(field(&request(port3, "count"), "served"), 1);
    vm3.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_never_gets_ready_times_out_with_its_console() {
    if skip_vm_tests() {
        return;
    }
    let run = run_paths("never-ready");
    let (spec, _) = image().fresh_run("never-ready", &run, &[]).unwrap();
    let vm = Vm::boot(spec, forage_vm::accel::detect().accel, &run.dir.join("qemu.log")).await.unwrap();
    let err = vm.wait_for_serial("MARKER-THAT-NEVER-COMES", Duration::from_secs(20)).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("MARKER-THAT-NEVER-COMES") && msg.contains("forage-tick"), "{msg}");
    drop(vm);
    assert_no_qemu_with(run.qmp_socket.to_str().unwrap()).await;
}
