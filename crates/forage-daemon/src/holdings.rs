//! What this cloudlet holds, as its mDNS announcement and its cluster record both tell it.

use forage_cloudlet::Cloudlet;

/// Digests of the base VMs that open (unreadable ones are left out).
pub(crate) fn base_digests(c: &Cloudlet) -> Vec<String> {
    forage_synth::BaseVm::list(&c.data)
        .into_iter()
        .filter_map(|(_, b)| b.ok().map(|b| b.digest().to_string()))
        .collect()
}

/// Ids of the service VMs it offers (the baseline services left out).
pub(crate) fn service_ids(c: &Cloudlet) -> Vec<String> {
    c.services.list().into_iter().filter(|s| !s.manifest().is_baseline()).map(|s| s.id().to_string()).collect()
}
