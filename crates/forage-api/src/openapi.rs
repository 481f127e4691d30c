//! The OpenAPI 3 document of this API, generated from the route handlers and body types,
//! and the route that serves it.

use axum::Json;
use utoipa::OpenApi;

use crate::routes;

/// The OpenAPI description, generated from the route handlers and body types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "forage cloudlet API",
        version = "1.0.0",
        description = "Management API of a forage cloudlet: status, base VMs, synthesis \
                       sessions, launch VMs, launch cache, service VMs, app store, metrics."
    ),
    paths(
        routes::status,
        routes::bases,
        routes::services,
        routes::apps,
        routes::app_file,
        routes::sessions,
        routes::instances,
        routes::stop_instance,
        routes::handoff,
        routes::cache,
        routes::evict_cache,
        routes::metrics,
        openapi_json,
    ),
    tags(
        (name = "cloudlet", description = "The cloudlet itself"),
        (name = "sessions", description = "Synthesis sessions"),
        (name = "instances", description = "Launch VMs"),
        (name = "cache", description = "The launch cache"),
        (name = "apps", description = "The app store: client apps for the services held here"),
    )
)]
struct ApiDoc;

/// This API's OpenAPI 3 document (the one `GET /openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This API's OpenAPI 3 document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "cloudlet",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}
