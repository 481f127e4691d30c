//! Growing and shrinking a running VM without a restart: vCPU hot-plug (the VM was started
//! with [`VmSpec::max_vcpus`](crate::VmSpec::max_vcpus)) and the virtio balloon (guest
//! memory given back to the host, and returned).
//!
//! Both are QMP requests the guest must act on: a hot-plugged vCPU arrives offline in a
//! Linux guest until something writes `1` to `/sys/devices/system/cpu/cpuN/online`, and
//! the balloon moves only as fast as the guest's driver allocates or frees pages.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Vm, VmError};

impl Vm {
    /// Plug vCPUs until the VM has `total` (at most its `max_vcpus`). Returns how many
    /// were plugged now.
    pub async fn plug_vcpus(&self, total: u32) -> Result<u32, VmError> {
        let max = self.spec().max_vcpus.unwrap_or(self.spec().vcpus);
        if total > max {
            return Err(VmError::BadSpec {
                vm: self.spec().name.clone(),
                detail: format!("{total} vCPUs asked, it was started for at most {max}"),
            });
        }
        let slots = self.qmp().execute("query-hotpluggable-cpus", None).await?;
        let slots = slots.as_array().cloned().unwrap_or_default();
        let present = present(&slots);
        let mut plugged = 0;
        // QEMU lists slots from the highest id down; plug the lowest free ones first.
        for slot in slots.iter().rev().filter(|s| s.get("qom-path").is_none()) {
            if present + plugged >= total {
                break;
            }
            let mut args = json!({ "driver": slot["type"], "id": format!("vcpu{}", present + plugged) });
            if let (Some(props), Some(obj)) = (slot["props"].as_object(), args.as_object_mut()) {
                for (k, v) in props {
                    // node-id only exists with NUMA; the rest place the vCPU.
                    if k != "node-id" {
                        obj.insert(k.clone(), v.clone());
                    }
                }
            }
            self.qmp().execute("device_add", Some(args)).await?;
            plugged += 1;
        }
        Ok(plugged)
    }

    /// vCPUs the VM has now: those it started with and those plugged since (its spec
    /// says only the first).
    pub async fn vcpus_present(&self) -> Result<u32, VmError> {
        let slots = self.qmp().execute("query-hotpluggable-cpus", None).await?;
        Ok(present(slots.as_array().map(Vec::as_slice).unwrap_or_default()))
    }

    /// Ask the balloon for a guest memory size of `target` bytes (inflate to shrink,
    /// deflate to grow) and wait up to `wait` until the guest's driver has moved it, or it
    /// stops moving. Returns the size the guest ended with.
    pub async fn set_balloon(&self, target: u64, wait: Duration) -> Result<u64, VmError> {
        self.qmp().execute("balloon", Some(json!({ "value": target }))).await?;
        let start = Instant::now();
        let mut last = u64::MAX;
        let mut still_since = Instant::now();
        loop {
            let actual = self.balloon_actual().await?;
            // Within one MiB: the driver works in pages, QEMU reports what it has.
            if actual.abs_diff(target) <= 1 << 20 || start.elapsed() > wait {
                return Ok(actual);
            }
            if actual != last {
                last = actual;
                still_since = Instant::now();
            } else if still_since.elapsed() > Duration::from_secs(3) {
                return Ok(actual);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The guest memory size the balloon leaves (`query-balloon`'s `actual`).
    pub async fn balloon_actual(&self) -> Result<u64, VmError> {
        let info = self.qmp().execute("query-balloon", None).await?;
        Ok(info.get("actual").and_then(Value::as_u64).unwrap_or(0))
    }
}

/// Slots of `query-hotpluggable-cpus` with a vCPU in them.
fn present(slots: &[Value]) -> u32 {
    slots.iter().filter(|s| s.get("qom-path").is_some()).count() as u32
}
