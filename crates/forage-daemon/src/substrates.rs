//! The substrate pool of the cloudlet's data folder as the API shows it
//! (`GET /v1/substrates`, `/metrics`): the same pool `forage substrate` manages.

use forage_api::{ActionError, Fault, SubstrateInfo, SubstrateList, SubstrateSection, SubstrateTier, SubstrateView};
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
}
