//! The substrate pool of the cloudlet's data folder as the API shows it
//! (`GET /v1/substrates`, `/metrics`): the same pool `forage substrate` manages; and an
//! instance docked into it (`POST /v1/instances/{id}/dock`).

use forage_api::{
    ActionError, Fault, InstanceDockReport, InstanceDockRequest, SubstrateInfo, SubstrateList, SubstrateSection,
    SubstrateTier, SubstrateView,
};
use forage_cloudlet::{Cloudlet, DockInstanceError};
use forage_datadir::DataDir;
use forage_substrate::{DescribeError, Pool, PoolEntry, PoolError, Tier};

fn fault(e: &PoolError) -> Fault {
    match e {
        PoolError::NotFound(_) => Fault::NotFound,
        PoolError::BadName(_) => Fault::BadRequest,
        _ => Fault::Internal,
    }
}

fn view(e: PoolEntry) -> SubstrateView {
    let tier = match e.tier {
        Tier::Memory => SubstrateTier::Memory,
        Tier::Disk => SubstrateTier::Disk,
    };
    SubstrateView { name: e.name, bytes: e.bytes, tier, last_used_unix_ms: e.last_used_unix_ms }
}

pub(crate) fn list(data: &DataDir) -> Result<SubstrateList, ActionError> {
    let summary = Pool::open(data).and_then(|p| p.summary()).map_err(|e| ActionError::new(fault(&e), e))?;
    Ok(SubstrateList {
        budget_bytes: summary.budget_bytes,
        memory_bytes: summary.memory_bytes,
        disk_bytes: summary.disk_bytes,
        substrates: summary.substrates.into_iter().map(view).collect(),
    })
}

pub(crate) fn describe(data: &DataDir, name: &str) -> Result<SubstrateInfo, ActionError> {
    let pool = Pool::open(data).map_err(|e| ActionError::new(fault(&e), e))?;
    let (entry, m) = pool.describe(name).map_err(|e| match e {
        DescribeError::Pool(p) => ActionError::new(fault(&p), p),
        other => ActionError::new(Fault::Internal, other),
    })?;
    let spec = &m.snapshot.spec;
    Ok(SubstrateInfo {
        pool: view(entry),
        max_vcpus: spec.max_vcpus.unwrap_or(spec.vcpus),
        max_memory_mib: spec.memory_mib,
        source: m.source,
        image: m.image,
        service_port: m.service_port,
        docked_memory_bytes: m.docked_memory_bytes,
        docked_at_unix: m.docked_at_unix,
        sections: m
            .sections
            .into_iter()
            .map(|s| SubstrateSection {
                name: s.name,
                raw_bytes: s.raw_size,
                data_bytes: s.data_bytes,
                encoded_bytes: s.encoded_bytes,
            })
            .collect(),
    })
}

/// Whose fault it is that an instance was not docked.
fn dock_fault(e: &DockInstanceError) -> Fault {
    match e {
        DockInstanceError::BadName(_) => Fault::BadRequest,
        DockInstanceError::NoInstance(_) => Fault::NotFound,
        DockInstanceError::Exists(_)
        | DockInstanceError::NotDockable(_)
        | DockInstanceError::HandoffUnderWay(_)
        | DockInstanceError::Busy(_) => Fault::Conflict,
        DockInstanceError::Pool(_)
        | DockInstanceError::NoImage { .. }
        | DockInstanceError::NoKernel { .. }
        | DockInstanceError::Vcpus { .. }
        | DockInstanceError::Save { .. }
        | DockInstanceError::Saved { .. }
        | DockInstanceError::Flatten { .. }
        | DockInstanceError::Dock { .. }
        | DockInstanceError::Ended(_) => Fault::Internal,
    }
}

/// Dock running instance `id` (called on a blocking thread of the daemon's runtime).
pub(crate) fn dock_instance(
    cloudlet: &Cloudlet,
    id: &str,
    request: &InstanceDockRequest,
) -> Result<InstanceDockReport, ActionError> {
    let docked = tokio::runtime::Handle::current().block_on(cloudlet.dock_instance(id, &request.name, request.public));
    let r = docked.map_err(|e| ActionError::new(dock_fault(&e), e))?;
    Ok(InstanceDockReport {
        instance: id.into(),
        substrate: r.name,
        restore_seconds: r.boot_seconds,
        dock_seconds: r.dock_seconds,
        shrink_seconds: r.shrink_seconds,
        encode_seconds: r.encode_seconds,
        memory_bytes: r.memory_bytes,
        docked_memory_bytes: r.docked_memory_bytes,
        memory_data_bytes: r.memory_data_bytes,
        compressed_bytes: r.compressed_bytes,
        raw_bytes: r.raw_bytes,
        spilled: r.spilled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_pool_and_hostile_names() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::at(t.path().join("data"));
        let list = list(&data).unwrap();
        assert!(list.substrates.is_empty() && list.budget_bytes > 0);
        assert_eq!(describe(&data, "nope").unwrap_err().fault, Fault::NotFound);
        assert_eq!(describe(&data, "../x").unwrap_err().fault, Fault::BadRequest);
        let _ = std::fs::remove_dir_all(Pool::open(&data).unwrap().memory_dir());
    }

    #[test]
    fn docking_refusals_are_the_callers_fault_and_change_nothing() {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::at(t.path().join("data"));
        let addr = std::net::Ipv4Addr::LOCALHOST;
        let cloudlet = Cloudlet::open("dock-t".into(), data.clone(), forage_vm::Accel::Tcg, addr).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in = rt.enter();
        let ask = |name: &str| {
            let request = InstanceDockRequest { name: name.into(), public: false };
            dock_instance(&cloudlet, "no-such-instance", &request).unwrap_err()
        };
        let bad = ask("../x");
        assert_eq!(bad.fault, Fault::BadRequest, "{bad}");
        let missing = ask("fine-name");
        assert_eq!(missing.fault, Fault::NotFound, "{missing}");
        assert!(missing.to_string().contains("no running instance no-such-instance"), "{missing}");
        let pool = Pool::open(&data).unwrap();
        assert!(pool.summary().unwrap().substrates.is_empty());
        let _ = std::fs::remove_dir_all(pool.memory_dir());
    }
}
