//! The cloudlet's HTTP management API: JSON routes over the daemon's state, Prometheus
//! metrics, and the OpenAPI 3 document that describes them (see `docs/http-api.md`).
//!
//! ```text
//! GET    /v1/status           name, version, accel, uptime, counts
//! GET    /v1/bases            base VMs held here                    (Control::bases)
//! GET    /v1/sessions?limit=N synthesis sessions, newest first
//! GET    /v1/instances?all=B  launch VMs (running only unless all=true)
//! DELETE /v1/instances/{id}   stop one                              (Control::stop_instance)
//! GET    /v1/cache            launch cache, least recently used first
//! DELETE /v1/cache/{digest}   evict one                             (Control::evict_cache)
//! GET    /metrics             OpenMetrics text
//! GET    /openapi.json        the document generated from this crate
//! ```
//!
//! Access ([`Access`]): with a token set (the daemon always sets one), every request that
//! changes state needs `Authorization: Bearer TOKEN`; reads need it too unless the API
//! listens on loopback only.
//!
//! Reads come from [`forage_state::State`]; actions go to the daemon through the
//! [`Control`] trait, and the API records their outcome in the state. Every error answers
//! `{"error": "..."}` with a status code saying whose fault it is (4xx the caller's,
//! 5xx the cloudlet's). `docs/openapi.json` is this crate's [`openapi`] output, checked
//! byte for byte by a test (`FORAGE_BLESS=1` rewrites it).

pub mod client;
mod context;
mod error;
mod metrics;
mod openapi;
mod routes;
pub mod token;
mod views;

use std::future::Future;
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;

pub use context::{Access, ApiContext, Control};
pub use error::{one_line, ActionError, ApiError, Fault};
pub use metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;
pub use openapi::openapi;
pub use routes::{DEFAULT_SESSION_LIMIT, MAX_SESSION_LIMIT};
pub use views::{
    AppInfo, AppList, BaseInfo, BaseList, CacheEntryView, CacheList, ErrorBody, HandoffReason, HandoffReport,
    HandoffRequest, InstanceList, InstanceStatus, InstanceView, InstancesQuery, ServiceInfo, ServiceList, SessionList,
    SessionMode, SessionStatus, SessionView, SessionsQuery, StatusView,
};

/// The API's routes over `ctx`.
pub fn router(ctx: ApiContext) -> Router {
    Router::new()
        .route("/v1/status", get(routes::status))
        .route("/v1/bases", get(routes::bases))
        .route("/v1/services", get(routes::services))
        .route("/v1/apps", get(routes::apps))
        .route("/v1/apps/{id}", get(routes::app_file))
        .route("/v1/sessions", get(routes::sessions))
        .route("/v1/instances", get(routes::instances))
        .route("/v1/instances/{id}", delete(routes::stop_instance))
        .route("/v1/instances/{id}/handoff", post(routes::handoff))
        .route("/v1/cache", get(routes::cache))
        .route("/v1/cache/{digest}", delete(routes::evict_cache))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(middleware::from_fn_with_state(ctx.access.clone(), check_access))
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

/// Refuse what the caller's token does not allow (see [`Access`]).
async fn check_access(
    axum::extract::State(access): axum::extract::State<Access>,
    request: Request,
    next: Next,
) -> Response {
    use axum::response::IntoResponse;
    let Some(token) = &access.token else { return next.run(request).await };
    let read = matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if read && access.open_reads {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time: the token is a secret.
    let ok = given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if ok {
        return next.run(request).await;
    }
    tracing::warn!(method = %request.method(), path = %request.uri().path(), "API request refused: no valid token");
    let what = if read { "reading this API from another host" } else { "changing state" };
    error::ApiError::Unauthorized(format!(
        "{what} needs `Authorization: Bearer TOKEN` (the token is in the cloudlet's DATA/trust/api-token)"
    ))
    .into_response()
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
