//! The route handlers, each with the OpenAPI description it is documented by.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State as Ctx};
use axum::http::{header, Method, Uri};
use axum::response::IntoResponse;
use axum::Json;

use crate::context::ApiContext;
use crate::error::ApiError;
use crate::metrics;
use crate::views::{
    AppInfo, AppList, AppsQuery, BaseList, CacheEntryView, CacheList, ErrorBody, HandoffReport, HandoffRequest,
    InstanceList, InstanceView, InstancesQuery, ServiceList, SessionList, SessionsQuery, StatusView,
};

/// Sessions listed when the query gives no limit.
pub const DEFAULT_SESSION_LIMIT: u32 = 50;
/// The most sessions one listing returns.
pub const MAX_SESSION_LIMIT: u32 = 1000;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The cloudlet's name, version, accelerator, uptime and counts.
#[utoipa::path(
    get, path = "/v1/status", tag = "cloudlet",
    responses(
        (status = 200, description = "The cloudlet at a glance", body = StatusView),
        (status = 500, description = "The state file failed", body = ErrorBody),
    )
)]
pub async fn status(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<StatusView> {
    Ok(Json(status_view(&ctx)?))
}

/// The cloudlet at a glance, now.
pub(crate) fn status_view(ctx: &ApiContext) -> Result<StatusView, ApiError> {
    let totals = ctx.state.totals()?;
    Ok(StatusView {
        name: ctx.name.clone(),
        version: ctx.version.clone(),
        accel: ctx.accel.clone(),
        uptime_s: ctx.started.elapsed().as_secs(),
        sessions_running: totals.sessions_running,
        instances_running: totals.instances_running,
        cache_entries: totals.cache_entries,
    })
}

/// The base VMs this cloudlet holds.
#[utoipa::path(
    get, path = "/v1/bases", tag = "cloudlet",
    responses((status = 200, description = "Bases held here", body = BaseList))
)]
pub async fn bases(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<BaseList> {
    let control = ctx.control.clone();
    let bases = blocking(move || control.bases()).await?;
    Ok(Json(BaseList { bases }))
}

/// The service VMs this cloudlet holds (cached-VM offload, app store, baselines).
#[utoipa::path(
    get, path = "/v1/services", tag = "cloudlet",
    responses((status = 200, description = "Services held here", body = ServiceList))
)]
pub async fn services(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<ServiceList> {
    let control = ctx.control.clone();
    let services = blocking(move || control.services()).await?;
    Ok(Json(ServiceList { services }))
}

/// The app store: client apps for the services held here.
#[utoipa::path(
    get, path = "/v1/apps", tag = "apps", params(AppsQuery),
    responses((status = 200, description = "Client apps", body = AppList))
)]
pub async fn apps(Ctx(ctx): Ctx<ApiContext>, query: Result<Query<AppsQuery>, QueryRejection>) -> ApiResult<AppList> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let control = ctx.control.clone();
    let apps = blocking(move || control.apps(q.platform.as_deref())).await?;
    Ok(Json(AppList { apps }))
}

/// Download a client app's file (its SHA-256 is in the listing and in a header).
#[utoipa::path(
    get, path = "/v1/apps/{id}", tag = "apps",
    params(("id" = String, Path, description = "App id")),
    responses(
        (status = 200, description = "The app's file", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 404, description = "No such app", body = ErrorBody),
    )
)]
pub async fn app_file(Ctx(ctx): Ctx<ApiContext>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let control = ctx.control.clone();
    let wanted = id.clone();
    let (info, bytes): (AppInfo, Vec<u8>) =
        blocking(move || control.app_file(&wanted)).await?.ok_or(ApiError::NotFound { kind: "app", id })?;
    let disposition = format!("attachment; filename=\"{}\"", info.file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::HeaderName::from_static("x-forage-sha256"), info.sha256),
        ],
        bytes,
    ))
}

/// The most recent synthesis sessions, newest first.
#[utoipa::path(
    get, path = "/v1/sessions", tag = "sessions", params(SessionsQuery),
    responses(
        (status = 200, description = "Sessions, newest first", body = SessionList),
        (status = 400, description = "Limit not in 1..=1000", body = ErrorBody),
        (status = 500, description = "The state file failed", body = ErrorBody),
    )
)]
pub async fn sessions(
    Ctx(ctx): Ctx<ApiContext>,
    query: Result<Query<SessionsQuery>, QueryRejection>,
) -> ApiResult<SessionList> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_SESSION_LIMIT);
    if !(1..=MAX_SESSION_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_SESSION_LIMIT}, not {limit}")));
    }
    let sessions = ctx.state.list_sessions(limit as usize)?;
    Ok(Json(SessionList { sessions: sessions.into_iter().map(Into::into).collect() }))
}

/// Launch VMs, newest first: running ones, or all with `all=true`.
#[utoipa::path(
    get, path = "/v1/instances", tag = "instances", params(InstancesQuery),
    responses(
        (status = 200, description = "Instances, newest first", body = InstanceList),
        (status = 400, description = "`all` is not a boolean", body = ErrorBody),
        (status = 500, description = "The state file failed", body = ErrorBody),
    )
)]
pub async fn instances(
    Ctx(ctx): Ctx<ApiContext>,
    query: Result<Query<InstancesQuery>, QueryRejection>,
) -> ApiResult<InstanceList> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    Ok(Json(instance_list(&ctx, query.all.unwrap_or(false)).await?))
}

/// Instances (running ones, or all), each with how it was provisioned and for which
/// device (its session's), and its relay's traffic while it runs.
pub(crate) async fn instance_list(ctx: &ApiContext, all: bool) -> Result<InstanceList, ApiError> {
    let records = ctx.state.list_instances(!all)?;
    let mut views: Vec<InstanceView> = Vec::with_capacity(records.len());
    for r in records {
        let session = ctx.state.session(&r.session_id)?;
        let running = r.status == forage_state::InstanceStatus::Running;
        let mut v = InstanceView::from(r);
        if let Some(s) = session {
            v.mechanism = Some(s.mode.into());
            v.device = Some(s.device);
        }
        if running {
            let (control, id) = (ctx.control.clone(), v.id.clone());
            v.usage = blocking(move || control.instance_usage(&id)).await?;
        }
        views.push(v);
    }
    Ok(InstanceList { instances: views })
}

/// Stops a running instance and returns it, now "stopped".
#[utoipa::path(
    delete, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    responses(
        (status = 200, description = "Stopped", body = InstanceView),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The instance is not running", body = ErrorBody),
        (status = 500, description = "The daemon could not stop it", body = ErrorBody),
    )
)]
pub async fn stop_instance(Ctx(ctx): Ctx<ApiContext>, Path(id): Path<String>) -> ApiResult<InstanceView> {
    running_instance(&ctx, &id)?;
    let control = ctx.control.clone();
    let target = id.clone();
    blocking(move || control.stop_instance(&target)).await?.map_err(|source| ApiError::Control {
        action: "stop instance",
        id: id.clone(),
        source,
    })?;
    let record = ctx.state.instance_stopped(&id)?;
    tracing::info!(instance = %id, "instance stopped through the API");
    Ok(Json(record.into()))
}

/// Moves a running instance to another cloudlet (VM handoff) and returns what the
/// handoff did; the instance then runs there. On failure it runs on here.
#[utoipa::path(
    post, path = "/v1/instances/{id}/handoff", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    request_body = HandoffRequest,
    responses(
        (status = 200, description = "Moved", body = HandoffReport),
        (status = 400, description = "Not a destination address", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The instance is not running, cannot move, or is moving already", body = ErrorBody),
        (status = 500, description = "The handoff failed; the instance runs on here", body = ErrorBody),
    )
)]
pub async fn handoff(
    Ctx(ctx): Ctx<ApiContext>,
    Path(id): Path<String>,
    body: Result<Json<HandoffRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<HandoffReport> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if request.to.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::BadRequest(format!("destination {:?} is not HOST:PORT", request.to)));
    }
    running_instance(&ctx, &id)?;
    let control = ctx.control.clone();
    let target = id.clone();
    let view = blocking(move || control.handoff(&target, request)).await?.map_err(|source| ApiError::Control {
        action: "hand off instance",
        id: id.clone(),
        source,
    })?;
    tracing::info!(instance = %id, to = %view.to, total_s = view.total_s, "instance handed off through the API");
    Ok(Json(view))
}

/// The record of instance `id`: 404 if there is none, 409 if it is not running.
pub(crate) fn running_instance(ctx: &ApiContext, id: &str) -> Result<forage_state::InstanceRecord, ApiError> {
    let record = ctx.state.instance(id)?.ok_or_else(|| ApiError::NotFound { kind: "instance", id: id.to_string() })?;
    if record.status != forage_state::InstanceStatus::Running {
        return Err(ApiError::Conflict(format!("instance {id:?} is {}, not running", record.status)));
    }
    Ok(record)
}

/// The launch cache, least recently used first.
#[utoipa::path(
    get, path = "/v1/cache", tag = "cache",
    responses(
        (status = 200, description = "Launch cache entries", body = CacheList),
        (status = 500, description = "The state file failed", body = ErrorBody),
    )
)]
pub async fn cache(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<CacheList> {
    let entries = ctx.state.cache_list()?;
    Ok(Json(CacheList { entries: entries.into_iter().map(Into::into).collect() }))
}

/// Evicts a launch-cache entry (the daemon removes its files) and returns it.
#[utoipa::path(
    delete, path = "/v1/cache/{digest}", tag = "cache",
    params(("digest" = String, Path, description = "Overlay digest")),
    responses(
        (status = 200, description = "Evicted", body = CacheEntryView),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 404, description = "No such entry", body = ErrorBody),
        (status = 500, description = "The daemon could not evict it", body = ErrorBody),
    )
)]
pub async fn evict_cache(Ctx(ctx): Ctx<ApiContext>, Path(digest): Path<String>) -> ApiResult<CacheEntryView> {
    if ctx.state.cache_entry(&digest)?.is_none() {
        return Err(ApiError::NotFound { kind: "cache entry", id: digest });
    }
    let control = ctx.control.clone();
    let target = digest.clone();
    blocking(move || control.evict_cache(&target)).await?.map_err(|source| ApiError::Control {
        action: "evict cache entry",
        id: digest.clone(),
        source,
    })?;
    // Gone meanwhile (a concurrent eviction): the files are gone either way.
    let entry = ctx
        .state
        .cache_remove(&digest)?
        .ok_or_else(|| ApiError::NotFound { kind: "cache entry", id: digest.clone() })?;
    tracing::info!(overlay = %digest, "cache entry evicted through the API");
    Ok(Json(entry.into()))
}

/// Counters and gauges in the Prometheus (OpenMetrics) text format.
#[utoipa::path(
    get, path = "/metrics", tag = "cloudlet",
    responses(
        (status = 200, description = "Metrics", body = String, content_type = "application/openmetrics-text"),
        (status = 500, description = "The state file failed", body = ErrorBody),
    )
)]
pub async fn metrics(Ctx(ctx): Ctx<ApiContext>) -> Result<impl IntoResponse, ApiError> {
    let totals = ctx.state.totals()?;
    let control = ctx.control.clone();
    // An unreadable pool leaves its metrics out rather than every other metric.
    let substrates = match blocking(move || control.substrates()).await? {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %crate::one_line(&e), "substrate metrics left out");
            None
        }
    };
    let cluster = ctx.control.cluster();
    let text = metrics::encode(&totals, substrates.as_ref(), ctx.started.elapsed(), cluster.as_ref())?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text))
}

/// Answers a path no route has.
pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}

/// Answers a known path asked with the wrong method.
pub async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

/// Runs a [`Control`](crate::context::Control) call off the async threads: stopping a VM may wait
/// for QEMU to exit.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f).await?)
}
