//! `GET /v1/substrates` and `GET /v1/substrates/{name}`: the VM substrates held by this
//! cloudlet (`docs/substrates.md`), as [`crate::substrate_views`] shapes them; and
//! `POST /v1/instances/{id}/dock`, which makes one of a running instance.

use axum::extract::{Path, State as Ctx};
use axum::Json;

use crate::context::ApiContext;
use crate::error::ApiError;
use crate::routes::{blocking, running_instance};
use crate::substrate_views::{InstanceDockReport, InstanceDockRequest, SubstrateInfo, SubstrateList};
use crate::views::ErrorBody;

/// The substrates this cloudlet holds, and the pool's budget.
#[utoipa::path(
    get, path = "/v1/substrates", tag = "substrates",
    responses((status = 200, description = "The substrate pool", body = SubstrateList))
)]
pub async fn substrates(Ctx(ctx): Ctx<ApiContext>) -> Result<Json<SubstrateList>, ApiError> {
    let control = ctx.control.clone();
    let list = blocking(move || control.substrates()).await?;
    list.map(Json).map_err(|source| ApiError::Control { action: "list", id: "substrates".into(), source })
}

/// One substrate: where it is, what it runs, what an activation may ask of it.
#[utoipa::path(
    get, path = "/v1/substrates/{name}", tag = "substrates",
    params(("name" = String, Path, description = "Substrate name")),
    responses(
        (status = 200, description = "The substrate", body = SubstrateInfo),
        (status = 404, description = "No such substrate", body = ErrorBody),
    )
)]
pub async fn substrate(Ctx(ctx): Ctx<ApiContext>, Path(name): Path<String>) -> Result<Json<SubstrateInfo>, ApiError> {
    let control = ctx.control.clone();
    let wanted = name.clone();
    let info = blocking(move || control.substrate(&wanted)).await?;
    info.map(Json).map_err(|source| ApiError::Control { action: "describe substrate", id: name, source })
}

/// Docks a running instance into a substrate: the daemon saves it, restores it, shrinks
/// it and writes the substrate into the pool. Docking ends the instance: it leaves the
/// instance list and its device is told why; activating the substrate starts a new VM
/// (its own id, endpoint and token).
#[utoipa::path(
    post, path = "/v1/instances/{id}/dock", tag = "substrates",
    params(("id" = String, Path, description = "Instance id")),
    request_body = InstanceDockRequest,
    responses(
        (status = 200, description = "Docked; the instance has ended", body = InstanceDockReport),
        (status = 400, description = "Not a substrate name, or not a request body", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The instance is not running here, a handoff or dock of it is under way, or the substrate exists", body = ErrorBody),
        (status = 500, description = "The dock failed (the instance runs on if it failed before its save)", body = ErrorBody),
    )
)]
pub async fn dock_instance(
    Ctx(ctx): Ctx<ApiContext>,
    Path(id): Path<String>,
    body: Result<Json<InstanceDockRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<InstanceDockReport>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    running_instance(&ctx, &id)?;
    let control = ctx.control.clone();
    let target = id.clone();
    let report = blocking(move || control.dock_instance(&target, &request))
        .await?
        .map_err(|source| ApiError::Control { action: "dock instance", id: id.clone(), source })?;
    // The daemon recorded it as well; recording a stop again changes nothing.
    ctx.state.instance_stopped(&id)?;
    tracing::info!(instance = %id, substrate = %report.substrate, "instance docked through the API");
    Ok(Json(report))
}
