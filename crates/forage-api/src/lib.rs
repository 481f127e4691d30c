//! The cloudlet's HTTP management API: JSON routes over the daemon's state, Prometheus
//! metrics, and the OpenAPI 3 document that describes them (see `docs/http-api.md`).
//!
//! ```text
//! GET    /v1/status           name, version, accel, uptime, counts
//! GET    /v1/host             the machine: load, memory, cores
//! GET    /v1/bases            base VMs held here                    (Control::bases)
//! GET    /v1/sessions?limit=N sessions, newest first, with their first-response breakdown
//! GET    /v1/instances?all=B  launch VMs (running only unless all=true), traffic
//! DELETE /v1/instances/{id}   stop one                              (Control::stop_instance)
//! POST   /v1/instances/{id}/handoff  move one                       (Control::handoff)
//! POST   /v1/instances/{id}/dock     dock one as a substrate; it ends  (Control::dock_instance)
//! GET    /v1/handoffs         handoffs running (trace so far) and the last that ended
//! GET    /v1/cache            launch cache, least recently used first
//! DELETE /v1/cache/{digest}   evict one                             (Control::evict_cache)
//! POST   /v1/pairing/codes    a one-time pairing code and its QR code
//! GET    /v1/pairing/credentials, DELETE .../{who}   issued credentials, revoke
//! GET    /v1/cloudlets        cloudlets seen on the network (mDNS)
//! GET    /v1/substrates       the substrate pool: budget, memory and spilled bytes
//! GET    /v1/substrates/{name}  one substrate from its manifest    (Control::substrate)
//! GET    /v1/cluster          the cluster's nodes and instances (forage serve --cluster)
//! POST   /v1/cluster/placements  the best node for a device's request (Control::place)
//! POST   /v1/cluster/nodes/{node}/drain  hand a node's instances off to the others
//! GET|POST /v1/signin, POST /v1/signout   the web UI's session cookie and CSRF token
//! GET    /v1/events           the live feed (server-sent events)
//! GET    /, /ui/*             the web UI (built in)
//! GET    /metrics             OpenMetrics text
//! GET    /openapi.json        the document generated from this crate
//! ```
//!
//! Access ([`Access`], `access`): with a token set (the daemon always sets one), every
//! request that changes state needs `Authorization: Bearer TOKEN`, or a browser's
//! session cookie with its CSRF token; reads need one of them too unless the API listens
//! on loopback only. The UI's page and files are open.
//!
//! Reads come from [`forage_state::State`]; actions go to the daemon through the
//! [`Control`] trait, and the API records their outcome in the state. Every error answers
//! `{"error": "..."}` with a status code saying whose fault it is (4xx the caller's,
//! 5xx the cloudlet's). `docs/openapi.json` is this crate's [`openapi`] output, checked
//! byte for byte by a test (`FORAGE_BLESS=1` rewrites it).

mod access;
mod assets;
pub mod client;
mod context;
mod error;
mod feed;
mod host;
mod metrics;
mod openapi;
pub mod qr;
mod routes;
mod routes_cluster;
mod routes_live;
mod substrate_views;
mod substrates;
pub mod token;
mod views;
mod views_live;
pub mod websession;

use std::future::Future;
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;

pub use access::Caller;
pub use assets::total_bytes as ui_bytes;
pub use context::{Access, ApiContext, Control};
pub use error::{one_line, ActionError, ApiError, Fault};
pub use feed::MAX_FEEDS;
pub use metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;
pub use openapi::openapi;
pub use routes::{DEFAULT_SESSION_LIMIT, MAX_SESSION_LIMIT};
pub use substrate_views::{
    InstanceDockReport, InstanceDockRequest, SubstrateInfo, SubstrateList, SubstrateSection, SubstrateTier,
    SubstrateView,
};
pub use views::{
    AppInfo, AppList, BaseInfo, BaseList, CacheEntryView, CacheList, ErrorBody, HandoffReason, HandoffReport,
    HandoffRequest, InstanceList, InstanceStatus, InstanceUsage, InstanceView, InstancesQuery, ServiceInfo,
    ServiceList, SessionList, SessionMode, SessionStatus, SessionTimings, SessionView, SessionsQuery, StatusView,
};
pub use views_live::{
    CloudletList, CredentialList, CredentialView, FeedEvent, HandoffEvent, HandoffList, HandoffStatus, HandoffTick,
    HandoffView, HostView, PairingCodeRequest, PairingCodeView, PeerKindView, SeenCloudlet, SignInRequest, SignInState,
};

/// The API's routes over `ctx`, and the web UI's page and files.
pub fn router(ctx: ApiContext) -> Router {
    let mut router = Router::new()
        .route("/v1/status", get(routes::status))
        .route("/v1/host", get(routes_live::host))
        .route("/v1/bases", get(routes::bases))
        .route("/v1/services", get(routes::services))
        .route("/v1/apps", get(routes::apps))
        .route("/v1/apps/{id}", get(routes::app_file))
        .route("/v1/sessions", get(routes::sessions))
        .route("/v1/instances", get(routes::instances))
        .route("/v1/instances/{id}", delete(routes::stop_instance))
        .route("/v1/instances/{id}/handoff", post(routes::handoff))
        .route("/v1/instances/{id}/dock", post(substrates::dock_instance))
        .route("/v1/handoffs", get(routes_live::handoffs))
        .route("/v1/cache", get(routes::cache))
        .route("/v1/cache/{digest}", delete(routes::evict_cache))
        .route("/v1/pairing/codes", post(routes_live::pairing_code))
        .route("/v1/pairing/credentials", get(routes_live::credentials))
        .route("/v1/pairing/credentials/{who}", delete(routes_live::revoke))
        .route("/v1/cloudlets", get(routes_live::cloudlets))
        .route("/v1/substrates", get(substrates::substrates))
        .route("/v1/substrates/{name}", get(substrates::substrate))
        .route("/v1/cluster", get(routes_cluster::cluster))
        .route("/v1/cluster/placements", post(routes_cluster::place))
        .route("/v1/cluster/nodes/{node}/drain", post(routes_cluster::drain))
        .route("/v1/signin", get(routes_live::signin_state).post(routes_live::signin))
        .route("/v1/signout", post(routes_live::signout))
        .route("/v1/events", get(feed::events))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::openapi_json));
    for path in assets::paths() {
        router = router.route(path, get(assets::file));
    }
    router
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(middleware::from_fn_with_state(ctx.access.clone(), access::check_access))
        .layer(middleware::from_fn(assets::security_headers))
        .layer(middleware::from_fn(log_request))
        .with_state(ctx)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: ApiContext,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, cloudlet = %ctx.name, "management API listening");
    }
    axum::serve(listener, router(ctx)).with_graceful_shutdown(shutdown).await
}

/// One debug line per request: method, path, status, time taken.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    tracing::debug!(
        %method,
        %path,
        status = response.status().as_u16(),
        ms = start.elapsed().as_millis() as u64,
        "api request"
    );
    response
}
