//! `GET /v1/substrates` and `GET /v1/substrates/{name}`: the VM substrates held by this
//! cloudlet (`docs/substrates.md`), as [`crate::substrate_views`] shapes them.

use axum::extract::{Path, State as Ctx};
use axum::Json;

use crate::context::ApiContext;
use crate::error::ApiError;
use crate::routes::blocking;
use crate::substrate_views::{SubstrateInfo, SubstrateList};
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
