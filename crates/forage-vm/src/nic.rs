//! The NIC of a running VM, unplugged and plugged back: a docked substrate holds no NIC,
//! an activation gives it one with its own port forwards.
//!
//! Unplugging is a request the guest acts on: QMP `device_del` asks for an ACPI PCI
//! hot-plug eject (the `pc` machine's root bus supports it; Linux's `acpiphp` answers),
//! and QEMU sends `DEVICE_DELETED` once the guest let the device go; only then does the
//! host side (`netdev_del`) go. Plugging is the other way round: the host side first
//! (`netdev_add` with the forwards), then the device (`device_add`), which the guest
//! probes as a new NIC (its network configuration must bring it up: systemd-networkd in
//! Debian guests, a watch in the tiny guest's init).
//!
//! Both use the command-line syntax of `-netdev` and `-device` ([`NicSpec::netdev`],
//! [`NicSpec::device`]) through QMP's `human-monitor-command`, so a plugged NIC is exactly
//! the one a restore's command line would give (one source for both).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::spec::{NETDEV_ID, NIC_ID};
use crate::{NicSpec, Vm, VmError};

impl NicSpec {
    /// `-netdev` (and `netdev_add`) options: user-mode networking with the forwards.
    /// restrict=on: the guest reaches nothing (not the host's other ports, not other
    /// guests, not the outside); only the forwarded ports reach it.
    pub fn netdev(&self) -> String {
        let mut netdev = format!("user,id={NETDEV_ID},restrict=on");
        for f in &self.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:{}:{}-:{}", f.host_addr, f.host_port, f.guest_port));
        }
        netdev
    }

    /// `-device` (and `device_add`) options of the guest's virtio NIC.
    pub fn device(&self) -> String {
        let mut device = format!("virtio-net-pci,netdev={NETDEV_ID},id={NIC_ID},romfile=");
        if let Some(slot) = self.pci_slot {
            device.push_str(&format!(",addr={slot:#x}"));
        }
        device
    }
}

impl Vm {
    /// Unplug the NIC: the guest ejects it (waited for up to `wait`), then its host side
    /// goes. The VM's spec has no NIC afterwards (a save records none); the NIC it had is
    /// returned. Only a NIC on a fixed PCI slot ([`NicSpec::pci_slot`]) is unplugged: a
    /// restore without one on an automatic slot would move the devices after it.
    pub async fn unplug_nic(&mut self, wait: Duration) -> Result<NicSpec, VmError> {
        let vm = self.spec().name.clone();
        let Some(nic) = self.spec().nic.clone() else {
            return Err(VmError::Hotplug { vm, detail: "it has no NIC to unplug".into() });
        };
        if nic.pci_slot.is_none() {
            return Err(VmError::Hotplug {
                vm,
                detail: "its NIC sits on an automatic PCI slot: restoring it without the NIC would move the \
                         devices after it"
                    .into(),
            });
        }
        let mut events = self.qmp().events();
        self.qmp().execute("device_del", Some(json!({ "id": NIC_ID }))).await?;
        let start = Instant::now();
        loop {
            let left = wait.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, events.recv()).await {
                Ok(Ok(e))
                    if e.name == "DEVICE_DELETED" && e.data.get("device").and_then(|d| d.as_str()) == Some(NIC_ID) =>
                {
                    break
                }
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) | Err(_) => {
                    return Err(VmError::Hotplug {
                        vm,
                        detail: format!(
                            "the guest did not let its NIC go within {:.1} s (no ACPI PCI hot-plug in the guest?)",
                            start.elapsed().as_secs_f64()
                        ),
                    });
                }
            }
        }
        self.qmp().execute("netdev_del", Some(json!({ "id": NETDEV_ID }))).await?;
        self.spec_mut().nic = None;
        Ok(nic)
    }

    /// Plug `nic` in (its host side with its forwards, then the device); the VM's spec
    /// has it afterwards. The guest brings the new NIC up on its own.
    pub async fn plug_nic(&mut self, nic: NicSpec) -> Result<(), VmError> {
        if self.spec().nic.is_some() {
            return Err(VmError::Hotplug { vm: self.spec().name.clone(), detail: "it has a NIC already".into() });
        }
        for line in [format!("netdev_add {}", nic.netdev()), format!("device_add {}", nic.device())] {
            self.hmp(&line).await?;
        }
        self.spec_mut().nic = Some(nic);
        Ok(())
    }

    /// Run a human-monitor command; its output is an error message when not empty
    /// (`netdev_add` and `device_add` print nothing when they succeed).
    async fn hmp(&self, line: &str) -> Result<(), VmError> {
        let out = self.qmp().execute("human-monitor-command", Some(json!({ "command-line": line }))).await?;
        match out.as_str().map(str::trim).unwrap_or("") {
            "" => Ok(()),
            said => Err(VmError::Hotplug { vm: self.spec().name.clone(), detail: format!("{line}: {said}") }),
        }
    }
}
