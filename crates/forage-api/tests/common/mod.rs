//! A router over a temporary state with known contents and a fake daemon.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use forage_api::{
    ActionError, ApiContext, AppInfo, BaseInfo, CloudletList, Control, CredentialView, Fault, HandoffEvent,
    HandoffReport, HandoffRequest, HandoffView, InstanceDockReport, InstanceDockRequest, InstanceUsage,
    PairingCodeRequest, PairingCodeView, PeerKindView, ServiceInfo, SubstrateInfo, SubstrateList, SubstrateSection,
    SubstrateTier, SubstrateView,
};
use forage_state::{NewCacheEntry, NewInstance, NewSession, SessionMode, State};
use tower::ServiceExt;

/// An error of the fake daemon.
#[derive(Debug)]
pub struct Fake(pub &'static str);

impl std::fmt::Display for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Fake {}

/// Records what it was asked; refuses ids starting with "stuck" or "busy". Its handoff
/// board is whatever a test puts there (`handoffs`, `events`).
pub struct FakeControl {
    pub calls: Mutex<Vec<String>>,
    pub handoffs: Mutex<Vec<HandoffView>>,
    pub events: tokio::sync::broadcast::Sender<HandoffEvent>,
    pub credentials: Mutex<Vec<CredentialView>>,
}

impl Default for FakeControl {
    fn default() -> Self {
        Self {
            calls: Mutex::default(),
            handoffs: Mutex::default(),
            events: tokio::sync::broadcast::channel(64).0,
            credentials: Mutex::new(vec![CredentialView {
                serial: 2,
                name: "phone".into(),
                kind: PeerKindView::Device,
                via: "code".into(),
                issued_unix_ms: 1_767_225_600_000,
                not_after_unix_ms: 1_767_830_400_000,
                revoked_unix_ms: None,
            }]),
        }
    }
}

impl Control for FakeControl {
    fn stop_instance(&self, id: &str) -> Result<(), ActionError> {
        self.calls.lock().unwrap().push(format!("stop {id}"));
        if id.starts_with("stuck") {
            return Err(ActionError::new(Fault::Internal, Fake("QEMU did not exit")));
        }
        Ok(())
    }
    fn bases(&self) -> Vec<BaseInfo> {
        vec![BaseInfo {
            name: "demo-base".into(),
            digest: "3253eaf611ee".into(),
            memory_bytes: 256 << 20,
            disk_bytes: 1 << 30,
        }]
    }
    fn evict_cache(&self, overlay_digest: &str) -> Result<(), ActionError> {
        self.calls.lock().unwrap().push(format!("evict {overlay_digest}"));
        if overlay_digest.starts_with("busy") {
            return Err(ActionError::new(Fault::Internal, Fake("in use by a running instance")));
        }
        Ok(())
    }
    fn services(&self) -> Vec<ServiceInfo> {
        vec![ServiceInfo {
            id: "hashsearch".into(),
            os: "linux-x86_64".into(),
            port: Some(8080),
            description: "hash search".into(),
            client_apps: vec!["hs-client".into()],
        }]
    }
    fn apps(&self, platform: Option<&str>) -> Vec<AppInfo> {
        let app = AppInfo {
            id: "hs-client".into(),
            service: "hashsearch".into(),
            platform: "any".into(),
            file: "hs-client.sh".into(),
            size: 5,
            sha256: "ab".repeat(32),
        };
        let _ = platform;
        vec![app]
    }
    fn app_file(&self, id: &str) -> Option<(AppInfo, Vec<u8>)> {
        (id == "hs-client").then(|| (self.apps(None).remove(0), b"hello".to_vec()))
    }
    fn handoff(&self, id: &str, request: HandoffRequest) -> Result<HandoffReport, ActionError> {
        self.calls.lock().unwrap().push(format!("handoff {id} {}", request.to));
        if id.starts_with("stuck") {
            return Err(ActionError::new(Fault::Internal, Fake("the destination went silent")));
        }
        if id.starts_with("busy") {
            return Err(ActionError::new(Fault::Conflict, Fake("instance busy-1 is already being handed off")));
        }
        Ok(HandoffReport {
            instance: id.into(),
            to: request.to,
            endpoint: "10.77.0.2:40000".into(),
            ca_sha256: "ab".repeat(32),
            has_base: true,
            total_s: 12.5,
            downtime_s: 1.5,
            bytes: 5 << 20,
            modified_bytes: 40 << 20,
            memory_pages: 70000,
            disk_chunks: 10,
            segments: 30,
            state_bytes: 100_000,
            boot_file_bytes: 0,
            qemu_rounds: 4,
            mode: "xor+zstd-1".into(),
            switches: vec![],
            prior: None,
            trace: vec![],
            stopped_at_s: None,
        })
    }
    fn instance_usage(&self, id: &str) -> Option<InstanceUsage> {
        (id == "vm-1").then_some(InstanceUsage {
            idle_ms: 1500,
            connections: 2,
            bytes_to_guest: 40,
            bytes_from_guest: 90,
        })
    }
    fn handoffs(&self) -> Vec<HandoffView> {
        self.handoffs.lock().unwrap().clone()
    }
    fn watch_handoffs(&self) -> tokio::sync::broadcast::Receiver<HandoffEvent> {
        self.events.subscribe()
    }
    fn pairing_code(
        &self,
        request: &PairingCodeRequest,
        reached_at: Option<std::net::IpAddr>,
    ) -> Result<PairingCodeView, ActionError> {
        self.calls.lock().unwrap().push(format!("pairing code {request:?} {reached_at:?}"));
        let code = "POOZX-BTV6V-HPU3D-QWLCO-FRI".to_string();
        let uri = format!("forage://pair?cloudlet=10.0.0.5:7878&name=test-cloudlet&code={code}");
        Ok(PairingCodeView {
            qr_svg: forage_api::qr::svg(&uri).unwrap(),
            code,
            uri,
            expires_unix_ms: 1_767_226_200_000,
            kind: request.kind.unwrap_or(PeerKindView::Device),
            valid_days: request.valid_days.unwrap_or(7),
        })
    }
    fn credentials(&self) -> Vec<CredentialView> {
        self.credentials.lock().unwrap().clone()
    }
    fn revoke(&self, who: &str) -> Result<(), ActionError> {
        self.calls.lock().unwrap().push(format!("revoke {who}"));
        let mut all = self.credentials.lock().unwrap();
        let Some(c) = all.iter_mut().find(|c| c.name == who || c.serial.to_string() == who) else {
            return Err(ActionError::new(Fault::NotFound, Fake("no credential of that name")));
        };
        c.revoked_unix_ms = Some(1_767_226_000_000);
        Ok(())
    }
    fn cloudlets(&self) -> CloudletList {
        CloudletList { browsing: false, cloudlets: vec![] }
    }
    fn substrates(&self) -> Result<SubstrateList, ActionError> {
        let view = |name: &str, bytes, tier| SubstrateView { name: name.into(), bytes, tier, last_used_unix_ms: 7 };
        Ok(SubstrateList {
            budget_bytes: 1 << 30,
            memory_bytes: 16 << 20,
            disk_bytes: 30 << 20,
            substrates: vec![view("web", 16 << 20, SubstrateTier::Memory), view("deb", 30 << 20, SubstrateTier::Disk)],
        })
    }
    fn dock_instance(&self, id: &str, request: &InstanceDockRequest) -> Result<InstanceDockReport, ActionError> {
        self.calls.lock().unwrap().push(format!("dock {id} as {}", request.name));
        if request.name.contains('/') {
            return Err(ActionError::new(Fault::BadRequest, Fake("not a substrate name")));
        }
        if id.starts_with("busy") {
            return Err(ActionError::new(Fault::Conflict, Fake("instance busy-1 is being handed off")));
        }
        if id.starts_with("stuck") {
            return Err(ActionError::new(Fault::Internal, Fake("the guest agent did not answer")));
        }
        Ok(InstanceDockReport {
            instance: id.into(),
            substrate: request.name.clone(),
            restore_seconds: 1.5,
            dock_seconds: 2.0,
            shrink_seconds: 1.0,
            encode_seconds: 0.5,
            memory_bytes: 256 << 20,
            docked_memory_bytes: 60 << 20,
            memory_data_bytes: 40 << 20,
            compressed_bytes: 9 << 20,
            raw_bytes: 300 << 20,
            spilled: Vec::new(),
        })
    }
    fn substrate(&self, name: &str) -> Result<SubstrateInfo, ActionError> {
        let pool = self.substrates()?.substrates.into_iter().find(|s| s.name == name);
        let pool = pool.ok_or_else(|| ActionError::new(Fault::NotFound, Fake("no substrate of that name")))?;
        Ok(SubstrateInfo {
            pool,
            source: "image:tiny+app:hashsearch".into(),
            image: "tiny".into(),
            service_port: Some(8080),
            max_vcpus: 2,
            max_memory_mib: 256,
            docked_memory_bytes: 89 << 20,
            docked_at_unix: 1_767_225_600,
            sections: vec![SubstrateSection {
                name: "memory".into(),
                raw_bytes: 256 << 20,
                data_bytes: 58 << 20,
                encoded_bytes: 16 << 20,
            }],
        })
    }
    fn cluster(&self) -> Option<forage_cluster::ClusterStatus> {
        Some(forage_cluster::ClusterStatus {
            cluster: "c".into(),
            node: "n1".into(),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            lease_ttl_s: 10,
            quorum: true,
            error: None,
            nodes: vec![],
            instances: vec![],
            read_unix_ms: 1_767_226_000_000,
            refused_objects: 0,
            draining: vec![],
            announcer: Some("n1".into()),
        })
    }
    fn drain_node(&self, _node: &str) -> Result<(), forage_api::ActionError> {
        Ok(())
    }
    fn place(
        &self,
        _request: &forage_cluster::PlacementRequest,
    ) -> Result<forage_cluster::Placement, forage_api::ActionError> {
        Ok(forage_cluster::Placement {
            node: "n2".into(),
            device_addr: "10.0.0.2:7878".parse().unwrap(),
            score: 11.0,
            utility: "holds-then-least-loaded".into(),
            considered: 2,
            able: 1,
            place_ms: 1.5,
            reservation: None,
            conflicts: 0,
        })
    }
}

pub struct Fixture {
    pub router: Router,
    pub state: State,
    pub control: Arc<FakeControl>,
    _dir: tempfile::TempDir,
}

/// Sessions s-old (done) then s-new (running); instances vm-1 and stuck-1 (running),
/// vm-old (stopped); cache entries d1 and busy-1, with one hit on d1.
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    for id in ["s-old", "s-new"] {
        state
            .session_started(&NewSession {
                id: id.into(),
                device: "10.0.0.7".into(),
                base_digest: "3253eaf611ee".into(),
                overlay_digest: "d1".into(),
                mode: SessionMode::Pipelined,
            })
            .unwrap();
        // Distinct start times, so that "newest first" is well defined.
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    state.session_ready("s-old", 410).unwrap();
    state.session_ended("s-old", Ok(985_000)).unwrap();
    for id in ["vm-1", "stuck-1", "vm-old"] {
        state
            .instance_started(&NewInstance {
                id: id.into(),
                session_id: "s-new".into(),
                name: id.into(),
                qemu_pid: 4242,
                dir: PathBuf::from(format!("/srv/forage/work/{id}")),
                endpoint: "127.0.0.1:42061".into(),
            })
            .unwrap();
    }
    state.instance_stopped("vm-old").unwrap();
    for digest in ["d1", "busy-1"] {
        state
            .cache_put(&NewCacheEntry {
                overlay_digest: digest.into(),
                base_digest: "3253eaf611ee".into(),
                dir: PathBuf::from(format!("/srv/forage/cache/{digest}")),
                bytes: 1000,
            })
            .unwrap();
    }
    state.cache_get("d1").unwrap();
    let control = Arc::new(FakeControl::default());
    let ctx = ApiContext::new(state.clone(), "test-cloudlet", "9.9.9", "tcg", control.clone());
    Fixture { router: forage_api::router(ctx), state, control, _dir: dir }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
    pub fn content_type(&self) -> &str {
        self.headers.get("content-type").map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

pub async fn call(router: &Router, method: Method, uri: &str) -> Answer {
    call_with(router, method, uri, &[]).await
}

/// [`call`] with request headers.
pub async fn call_with(router: &Router, method: Method, uri: &str, headers: &[(&str, &str)]) -> Answer {
    call_body(router, method, uri, headers, Vec::new()).await
}

/// [`call_with`] with a request body.
pub async fn call_body(router: &Router, method: Method, uri: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Body::from(body)).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec();
    Answer { status, headers, body }
}
