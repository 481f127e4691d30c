//! What the HTTP API may ask of the daemon ([`forage_api::Control`]), answered by the
//! cloudlet.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use forage_api::{
    ActionError, CloudletList, CredentialView, Fault, HandoffEvent, HandoffView, InstanceUsage, PairingCodeRequest,
    PairingCodeView, PeerKindView, SeenCloudlet,
};
use forage_cloudlet::{Cloudlet, HandoffError};
use forage_trust::{Grant, PairingUri, PeerKind, TrustError};

pub(crate) struct DaemonControl {
    pub cloudlet: Arc<Cloudlet>,
    /// Where devices connect (what a pairing QR code names).
    pub listen: SocketAddr,
    /// Cloudlets announcing themselves on the network; none without mDNS.
    pub watcher: Option<forage_discovery::Watcher>,
    /// This node's membership, with `--cluster`.
    pub cluster: Option<Arc<forage_cluster::Member>>,
}

fn ms(unix_s: u64) -> i64 {
    unix_s as i64 * 1000
}

fn kind_view(kind: PeerKind) -> PeerKindView {
    match kind {
        PeerKind::Device => PeerKindView::Device,
        PeerKind::Cloudlet => PeerKindView::Cloudlet,
    }
}

impl forage_api::Control for DaemonControl {
    fn stop_instance(&self, id: &str) -> Result<(), ActionError> {
        match self.cloudlet.stop_instance(id) {
            true => Ok(()),
            false => Err(ActionError::new(Fault::Conflict, NotRunningHere(id.to_string()))),
        }
    }

    fn bases(&self) -> Vec<forage_api::BaseInfo> {
        forage_synth::BaseVm::list(&self.cloudlet.data)
            .into_iter()
            .filter_map(|(name, b)| b.ok().map(|b| (name, b)))
            .map(|(name, b)| forage_api::BaseInfo {
                name,
                digest: b.digest().into(),
                memory_bytes: b.manifest().memory_size,
                disk_bytes: b.manifest().disk_size,
            })
            .collect()
    }

    fn evict_cache(&self, overlay_digest: &str) -> Result<(), ActionError> {
        self.cloudlet.cache.evict(overlay_digest);
        Ok(())
    }

    fn services(&self) -> Vec<forage_api::ServiceInfo> {
        self.cloudlet
            .services
            .list()
            .into_iter()
            .map(|s| {
                let m = s.manifest();
                forage_api::ServiceInfo {
                    id: m.id.clone(),
                    os: m.os.clone(),
                    port: m.port,
                    description: m.description.clone(),
                    client_apps: m.client_apps.iter().map(|a| a.id.clone()).collect(),
                }
            })
            .collect()
    }

    fn apps(&self, platform: Option<&str>) -> Vec<forage_api::AppInfo> {
        self.cloudlet.services.apps(platform).into_iter().map(|(s, a)| s.app_info(&a)).collect()
    }

    fn handoff(&self, id: &str, request: forage_api::HandoffRequest) -> Result<forage_api::HandoffReport, ActionError> {
        let to = request.to.parse().map_err(|e| ActionError::new(Fault::BadRequest, e))?;
        let defaults = forage_cloudlet::HandoffOptions::default();
        let options = forage_cloudlet::HandoffOptions {
            mode: request.mode,
            downtime_limit_ms: request.downtime_limit_ms.unwrap_or(defaults.downtime_limit_ms),
            reason: request.reason,
        };
        // The API calls this on a blocking thread of the daemon's runtime.
        tokio::runtime::Handle::current().block_on(self.cloudlet.handoff(id, to, options)).map_err(|e| {
            let fault = match &e {
                HandoffError::NoInstance(_) => Fault::NotFound,
                HandoffError::NotMovable(_) | HandoffError::Busy(_) => Fault::Conflict,
                HandoffError::BadMode { .. } => Fault::BadRequest,
                HandoffError::Failed { .. } | HandoffError::Unresolved { .. } | HandoffError::Ended(_) => {
                    Fault::Internal
                }
            };
            ActionError::new(fault, e)
        })
    }

    fn instance_usage(&self, id: &str) -> Option<InstanceUsage> {
        // The API calls this on a blocking thread of the daemon's runtime.
        tokio::runtime::Handle::current().block_on(self.cloudlet.instance_usage(id))
    }

    fn handoffs(&self) -> Vec<HandoffView> {
        self.cloudlet.handoffs.list()
    }

    fn watch_handoffs(&self) -> tokio::sync::broadcast::Receiver<HandoffEvent> {
        self.cloudlet.handoffs.subscribe()
    }

    fn pairing_code(
        &self,
        request: &PairingCodeRequest,
        reached_at: Option<IpAddr>,
    ) -> Result<PairingCodeView, ActionError> {
        let kind = match request.kind.unwrap_or(PeerKindView::Device) {
            PeerKindView::Device => PeerKind::Device,
            PeerKindView::Cloudlet => PeerKind::Cloudlet,
        };
        let days = request.valid_days.unwrap_or(7).clamp(1, 365);
        let code = self
            .cloudlet
            .trust
            .new_code(Grant::new(kind, Duration::from_secs(u64::from(days) * 24 * 3600)))
            .map_err(|e| ActionError::new(Fault::Internal, e))?;
        // Listening on every address: the phone is told the one the operator's browser used.
        let ip = match (self.listen.ip().is_unspecified(), reached_at) {
            (true, Some(ip)) => ip,
            _ => self.listen.ip(),
        };
        let uri = PairingUri {
            cloudlet: SocketAddr::new(ip, self.listen.port()),
            name: self.cloudlet.name.clone(),
            code: code.text.clone(),
        }
        .to_string();
        let qr_svg = forage_api::qr::svg(&uri).map_err(|e| ActionError::new(Fault::Internal, QrFailed(e)))?;
        Ok(PairingCodeView {
            code: code.text,
            uri,
            qr_svg,
            expires_unix_ms: ms(code.expires_unix),
            kind: kind_view(kind),
            valid_days: days,
        })
    }

    fn credentials(&self) -> Vec<CredentialView> {
        let mut all: Vec<CredentialView> = self
            .cloudlet
            .trust
            .issued()
            .into_iter()
            .map(|i| CredentialView {
                serial: i.serial,
                name: i.name,
                kind: kind_view(i.kind),
                via: i.via,
                issued_unix_ms: ms(i.issued_unix),
                not_after_unix_ms: ms(i.not_after_unix),
                revoked_unix_ms: i.revoked_unix.map(ms),
            })
            .collect();
        all.sort_by_key(|c| std::cmp::Reverse(c.serial));
        all
    }

    fn revoke(&self, who: &str) -> Result<(), ActionError> {
        self.cloudlet.trust.revoke(who).map(|_| ()).map_err(|e| {
            let fault = match e {
                TrustError::NoCredential(_) => Fault::NotFound,
                _ => Fault::Internal,
            };
            ActionError::new(fault, e)
        })
    }

    fn substrates(&self) -> Result<forage_api::SubstrateList, ActionError> {
        crate::substrates::list(&self.cloudlet.data)
    }

    fn substrate(&self, name: &str) -> Result<forage_api::SubstrateInfo, ActionError> {
        crate::substrates::describe(&self.cloudlet.data, name)
    }

    fn dock_instance(
        &self,
        id: &str,
        request: &forage_api::InstanceDockRequest,
    ) -> Result<forage_api::InstanceDockReport, ActionError> {
        crate::substrates::dock_instance(&self.cloudlet, id, request)
    }

    fn cloudlets(&self) -> CloudletList {
        let Some(watcher) = &self.watcher else { return CloudletList { browsing: false, cloudlets: Vec::new() } };
        let cloudlets = watcher
            .seen()
            .into_iter()
            .map(|s| SeenCloudlet {
                this: s.found.ad.name == self.cloudlet.name,
                name: s.found.ad.name,
                addr: s.found.ad.addr.to_string(),
                http_port: s.found.ad.http_port,
                bases: s.found.ad.bases,
                services: s.found.ad.services,
                load: s.found.ad.load,
                free_mem_mib: s.found.ad.free_mem_mib,
                cores: s.found.ad.cores,
                rtt_ms: s.found.rtt_ms,
                last_seen_unix_ms: s.last_seen.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
            })
            .collect();
        CloudletList { browsing: true, cloudlets }
    }

    fn cluster(&self) -> Option<forage_cluster::ClusterStatus> {
        self.cluster.as_ref().map(|m| m.status())
    }

    fn place(&self, request: &forage_cluster::PlacementRequest) -> Result<forage_cluster::Placement, ActionError> {
        let Some(member) = &self.cluster else { return Err(ActionError::new(Fault::NotFound, NotInCluster)) };
        let placed = tokio::runtime::Handle::current().block_on(member.place(request));
        placed.map_err(|e| {
            let fault = match &e {
                forage_cluster::PlacementError::NoQuorum(_) => Fault::Unavailable,
                forage_cluster::PlacementError::Contended { .. } => Fault::Unavailable,
                forage_cluster::PlacementError::Unplaceable(_) => Fault::Conflict,
            };
            ActionError::new(fault, e)
        })
    }

    fn drain_node(&self, node: &str) -> Result<(), ActionError> {
        let Some(member) = &self.cluster else { return Err(ActionError::new(Fault::NotFound, NotInCluster)) };
        let asked = tokio::runtime::Handle::current().block_on(member.request_drain(node));
        asked.map_err(|e| {
            let fault = match &e {
                forage_cluster::DrainError::NoSuchNode(_) => Fault::NotFound,
                forage_cluster::DrainError::Etcd { .. } => Fault::Unavailable,
            };
            ActionError::new(fault, e)
        })
    }

    fn app_file(&self, id: &str) -> Option<(forage_api::AppInfo, Vec<u8>)> {
        let (s, a) = self.cloudlet.services.app(id).ok()?;
        let bytes = std::fs::read(s.app_path(&a)).ok()?;
        Some((s.app_info(&a), bytes))
    }
}

/// A placement asked of a daemon started without `--cluster`.
#[derive(Debug, thiserror::Error)]
#[error("this cloudlet is not in a cluster (forage serve --cluster URLS)")]
pub struct NotInCluster;

/// A QR code that could not be made of a pairing URI.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the pairing QR code: {0}")]
struct QrFailed(qrcode::types::QrError);

/// A stop of an instance that this daemon does not run.
#[derive(Debug, thiserror::Error)]
#[error("instance {0} is not running in this daemon")]
struct NotRunningHere(String);
