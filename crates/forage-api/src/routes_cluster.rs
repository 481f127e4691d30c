//! The cluster's routes: what this node knows of the cluster, and placement of a
//! device's request on its best node (`docs/cluster.md`).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State as Ctx};
use axum::Json;
use forage_cluster::{ClusterStatus, Placement, PlacementRequest};

use crate::context::ApiContext;
use crate::error::ApiError;
use crate::routes::blocking;
use crate::views::ErrorBody;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The cluster as this node last read it from etcd: live nodes (capacity, what they
/// hold), every node's instances (lost ones too), whether etcd has quorum.
#[utoipa::path(
    get, path = "/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The cluster", body = ClusterStatus),
        (status = 404, description = "Not in a cluster", body = ErrorBody),
    )
)]
pub async fn cluster(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<ClusterStatus> {
    ctx.control.cluster().map(Json).ok_or(ApiError::NotInCluster)
}

/// The best live node for a device's request (holds its cached launch VM, service VM or
/// base; least loaded), read from etcd now: the device is redirected there.
#[utoipa::path(
    post, path = "/v1/cluster/placements", tag = "cluster",
    request_body = PlacementRequest,
    responses(
        (status = 200, description = "Where the request goes", body = Placement),
        (status = 400, description = "Not a placement request", body = ErrorBody),
        (status = 404, description = "Not in a cluster", body = ErrorBody),
        (status = 409, description = "No live node can serve it", body = ErrorBody),
        (status = 503, description = "etcd has no quorum: no new placements", body = ErrorBody),
    )
)]
pub async fn place(
    Ctx(ctx): Ctx<ApiContext>,
    body: Result<Json<PlacementRequest>, JsonRejection>,
) -> ApiResult<Placement> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let control = ctx.control.clone();
    let placed = blocking(move || control.place(&request)).await?;
    placed.map(Json).map_err(|source| ApiError::Control { action: "place", id: "the request".into(), source })
}

/// Asks a live node to hand every instance off to the other nodes (the VM handoff, one
/// after the other); it takes no new placements meanwhile. Answers the cluster as this
/// node last read it; follow the drain in `GET /v1/cluster` (`draining`).
#[utoipa::path(
    post, path = "/v1/cluster/nodes/{node}/drain", tag = "cluster",
    params(("node" = String, Path, description = "The node's name")),
    responses(
        (status = 200, description = "The drain is asked for", body = ClusterStatus),
        (status = 404, description = "Not in a cluster, or no such live node", body = ErrorBody),
        (status = 503, description = "etcd has no quorum", body = ErrorBody),
    )
)]
pub async fn drain(Ctx(ctx): Ctx<ApiContext>, Path(node): Path<String>) -> ApiResult<ClusterStatus> {
    let control = ctx.control.clone();
    let target = node.clone();
    blocking(move || control.drain_node(&target)).await?.map_err(|source| ApiError::Control {
        action: "drain",
        id: node,
        source,
    })?;
    ctx.control.cluster().map(Json).ok_or(ApiError::NotInCluster)
}
