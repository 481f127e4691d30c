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
                       sessions, launch VMs, handoffs, launch cache, service VMs, app store, pairing, \
                       cloudlets on the network, substrates, the cluster and placement, the web UI's sign-in and live feed, metrics."
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
        crate::routes_live::host,
        crate::routes_live::handoffs,
        crate::routes_live::pairing_code,
        crate::routes_live::credentials,
        crate::routes_live::revoke,
        crate::routes_live::cloudlets,
        crate::routes_cluster::cluster,
        crate::routes_cluster::place,
        crate::routes_cluster::drain,
        crate::routes_live::signin_state,
        crate::routes_live::signin,
        crate::routes_live::signout,
        crate::feed::events,
        crate::substrates::substrates,
        crate::substrates::substrate,
        crate::substrates::dock_instance,
    ),
    components(schemas(crate::views_live::FeedEvent)),
    tags(
        (name = "cloudlet", description = "The cloudlet itself"),
        (name = "cluster", description = "A cloudlet of many hosts coordinated through etcd"),
        (name = "sessions", description = "Synthesis sessions"),
        (name = "instances", description = "Launch VMs"),
        (name = "cache", description = "The launch cache"),
        (name = "apps", description = "The app store: client apps for the services held here"),
        (name = "pairing", description = "Pairing codes and the credentials they gave"),
        (name = "web", description = "The web UI: signing in, the live feed"),
        (name = "substrates", description = "VM substrates: docked VMs in a memory-budgeted pool"),
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
