//! What the HTTP API may ask of the daemon ([`forage_api::Control`]), answered by the
//! cloudlet.

use std::sync::Arc;

use forage_api::{ActionError, Fault};
use forage_cloudlet::{Cloudlet, HandoffError};

pub(crate) struct DaemonControl {
    pub cloudlet: Arc<Cloudlet>,
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

    fn app_file(&self, id: &str) -> Option<(forage_api::AppInfo, Vec<u8>)> {
        let (s, a) = self.cloudlet.services.app(id).ok()?;
        let bytes = std::fs::read(s.app_path(&a)).ok()?;
        Some((s.app_info(&a), bytes))
    }
}

/// A stop of an instance that this daemon does not run.
#[derive(Debug, thiserror::Error)]
#[error("instance {0} is not running in this daemon")]
struct NotRunningHere(String);
