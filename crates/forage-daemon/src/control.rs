//! What the HTTP API may ask of the daemon ([`forage_api::Control`]), answered by the
//! cloudlet.

use std::sync::Arc;

use forage_cloudlet::Cloudlet;

pub(crate) struct DaemonControl {
    pub cloudlet: Arc<Cloudlet>,
}

impl forage_api::Control for DaemonControl {
    fn stop_instance(&self, id: &str) -> Result<(), String> {
        match self.cloudlet.stop_instance(id) {
            true => Ok(()),
            false => Err(format!("instance {id} is not running in this daemon")),
        }
    }

    fn bases(&self) -> Vec<forage_api::BaseInfo> {
        forage_synth::BaseVm::list(&self.cloudlet.data)
            .into_iter()
            .filter_map(|(name, b)| b.ok().map(|b| (name, b)))
            .map(|(name, b)| forage_api::BaseInfo { name, digest: b.digest().into(), memory_bytes: b.manifest().memory_size, disk_bytes: b.manifest().disk_size })
            .collect()
    }

    fn evict_cache(&self, overlay_digest: &str) -> Result<(), String> {
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
                forage_api::ServiceInfo { id: m.id.clone(), os: m.os.clone(), port: m.port, description: m.description.clone(), client_apps: m.client_apps.iter().map(|a| a.id.clone()).collect() }
            })
            .collect()
    }

    fn apps(&self, platform: Option<&str>) -> Vec<forage_api::AppInfo> {
        self.cloudlet.services.apps(platform).into_iter().map(|(s, a)| app_info(&s, &a)).collect()
    }

    fn handoff(&self, id: &str, request: forage_api::HandoffRequest) -> Result<forage_api::HandoffView, String> {
        let to = request.to.parse().map_err(|_| format!("destination {:?} is not HOST:PORT", request.to))?;
        let options = forage_cloudlet::HandoffOptions { mode: request.mode, downtime_limit_ms: request.downtime_limit_ms.unwrap_or(2000) };
        // The API calls this on a blocking thread of the daemon's runtime.
        let report = tokio::runtime::Handle::current().block_on(self.cloudlet.handoff(id, to, options)).map_err(|e| e.to_string())?;
        serde_json::to_value(&report).and_then(serde_json::from_value).map_err(|e| e.to_string())
    }

    fn app_file(&self, id: &str) -> Option<(forage_api::AppInfo, Vec<u8>)> {
        let (s, a) = self.cloudlet.services.app(id).ok()?;
        let bytes = std::fs::read(s.app_path(&a)).ok()?;
        Some((app_info(&s, &a), bytes))
    }
}

fn app_info(s: &forage_service::ServiceVm, a: &forage_service::ClientApp) -> forage_api::AppInfo {
    forage_api::AppInfo { id: a.id.clone(), service: s.id().to_string(), platform: a.platform.clone(), file: a.file.clone(), size: a.size, sha256: a.sha256.clone() }
}
