//! The routes the web UI adds to the API: the host, handoffs, pairing, cloudlets seen on
//! the network, and signing in and out. Like every route, usable with the bearer token
//! as well (`docs/http-api.md`).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State as Ctx};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::access::Caller;
use crate::context::ApiContext;
use crate::error::ApiError;
use crate::routes::blocking;
use crate::views::ErrorBody;
use crate::views_live::{
    CloudletList, CredentialList, HandoffList, HostView, PairingCodeRequest, PairingCodeView, SignInRequest,
    SignInState,
};
use crate::websession::{clear_cookie, same, set_cookie};

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The machine this cloudlet runs on: load, memory, cores.
#[utoipa::path(
    get, path = "/v1/host", tag = "cloudlet",
    responses((status = 200, description = "The host", body = HostView))
)]
pub async fn host() -> ApiResult<HostView> {
    Ok(Json(blocking(crate::host::host).await?))
}

/// Handoffs sent from here: running ones with their trace so far, and the last few
/// that ended.
#[utoipa::path(
    get, path = "/v1/handoffs", tag = "instances",
    responses((status = 200, description = "Handoffs, newest first", body = HandoffList))
)]
pub async fn handoffs(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<HandoffList> {
    let control = ctx.control.clone();
    Ok(Json(HandoffList { handoffs: blocking(move || control.handoffs()).await? }))
}

/// Credentials this cloudlet issued (devices and cloudlets), revoked ones included.
#[utoipa::path(
    get, path = "/v1/pairing/credentials", tag = "pairing",
    responses((status = 200, description = "Credentials, newest first", body = CredentialList))
)]
pub async fn credentials(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<CredentialList> {
    let control = ctx.control.clone();
    Ok(Json(CredentialList { credentials: blocking(move || control.credentials()).await? }))
}

/// Makes a one-time pairing code (ten minutes, used once), with a QR code of it.
#[utoipa::path(
    post, path = "/v1/pairing/codes", tag = "pairing",
    request_body = PairingCodeRequest,
    responses(
        (status = 200, description = "A new code", body = PairingCodeView),
        (status = 400, description = "A lifetime out of 1..=365 days, or not JSON", body = ErrorBody),
        (status = 401, description = "No valid token or session", body = ErrorBody),
        (status = 403, description = "No valid CSRF token", body = ErrorBody),
    )
)]
pub async fn pairing_code(
    Ctx(ctx): Ctx<ApiContext>,
    headers: HeaderMap,
    body: Result<Json<PairingCodeRequest>, JsonRejection>,
) -> ApiResult<PairingCodeView> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(days) = request.valid_days {
        if !(1..=365).contains(&days) {
            return Err(ApiError::BadRequest(format!("valid_days must be 1 to 365, not {days}")));
        }
    }
    let reached_at = headers.get(header::HOST).and_then(|h| h.to_str().ok()).and_then(host_ip);
    let control = ctx.control.clone();
    let code = blocking(move || control.pairing_code(&request, reached_at)).await?.map_err(|source| {
        ApiError::Control { action: "make a pairing code for", id: "this cloudlet".into(), source }
    })?;
    tracing::info!(kind = ?code.kind, valid_days = code.valid_days, "pairing code made through the API");
    Ok(Json(code))
}

/// The IP address in a `Host` header, if it names one.
fn host_ip(host: &str) -> Option<std::net::IpAddr> {
    host.parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| host.trim_start_matches('[').trim_end_matches(']').parse())
        .ok()
}

/// Revokes the credentials named `who` (a name, or a serial): refused from their next
/// connection on. Answers every credential, as after.
#[utoipa::path(
    delete, path = "/v1/pairing/credentials/{who}", tag = "pairing",
    params(("who" = String, Path, description = "Name or serial")),
    responses(
        (status = 200, description = "Revoked", body = CredentialList),
        (status = 401, description = "No valid token or session", body = ErrorBody),
        (status = 403, description = "No valid CSRF token", body = ErrorBody),
        (status = 404, description = "No such credential", body = ErrorBody),
    )
)]
pub async fn revoke(Ctx(ctx): Ctx<ApiContext>, Path(who): Path<String>) -> ApiResult<CredentialList> {
    let control = ctx.control.clone();
    let target = who.clone();
    blocking(move || control.revoke(&target)).await?.map_err(|source| ApiError::Control {
        action: "revoke",
        id: who.clone(),
        source,
    })?;
    tracing::info!(%who, "credentials revoked through the API");
    credentials(Ctx(ctx)).await
}

/// Cloudlets announcing themselves on the local network (mDNS, `_cloudlet._tcp`).
#[utoipa::path(
    get, path = "/v1/cloudlets", tag = "cloudlet",
    responses((status = 200, description = "Cloudlets seen", body = CloudletList))
)]
pub async fn cloudlets(Ctx(ctx): Ctx<ApiContext>) -> ApiResult<CloudletList> {
    let control = ctx.control.clone();
    Ok(Json(blocking(move || control.cloudlets()).await?))
}

fn state_of(caller: &Caller) -> SignInState {
    SignInState {
        signed_in: caller.session.is_some(),
        can_read: caller.can_read,
        can_change: caller.can_change,
        csrf_token: caller.session.as_ref().map(|s| s.csrf.clone()),
        expires_unix_ms: caller.session.as_ref().map(|s| s.expires_unix_ms),
    }
}

/// What the caller may do; a signed-in browser also gets its CSRF token.
#[utoipa::path(
    get, path = "/v1/signin", tag = "web",
    responses((status = 200, description = "The caller's rights", body = SignInState))
)]
pub async fn signin_state(Extension(caller): Extension<Caller>) -> Json<SignInState> {
    Json(state_of(&caller))
}

/// Signs a browser in with the API token: sets the session cookie (`forage_session`,
/// HttpOnly, SameSite=Strict) and answers the CSRF token its changes must carry.
#[utoipa::path(
    post, path = "/v1/signin", tag = "web",
    request_body = SignInRequest,
    responses(
        (status = 200, description = "Signed in; the cookie is set", body = SignInState),
        (status = 400, description = "Not a JSON sign-in", body = ErrorBody),
        (status = 401, description = "Not this cloudlet's API token", body = ErrorBody),
        (status = 403, description = "From another origin", body = ErrorBody),
    )
)]
pub async fn signin(
    Ctx(ctx): Ctx<ApiContext>,
    headers: HeaderMap,
    body: Result<Json<SignInRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    // Another site's page may not sign a browser in (into its own session).
    crate::access::same_origin(&headers)?;
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(token) = &ctx.access.token {
        if !same(request.token.trim(), token) {
            return Err(ApiError::Unauthorized("that is not this cloudlet's API token (DATA/trust/api-token)".into()));
        }
    }
    let (cookie, session) = ctx.access.sessions.create()?;
    tracing::info!("signed in to the web UI");
    let caller = Caller { session: Some(session), can_change: true, can_read: true };
    Ok(([(header::SET_COOKIE, set_cookie(&cookie))], Json(state_of(&caller))).into_response())
}

/// Signs the browser out: its session ends and the cookie is removed.
#[utoipa::path(
    post, path = "/v1/signout", tag = "web",
    responses(
        (status = 200, description = "Signed out", body = SignInState),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "No valid CSRF token", body = ErrorBody),
    )
)]
pub async fn signout(Ctx(ctx): Ctx<ApiContext>, Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    let Some(session) = &caller.session else {
        return Err(ApiError::Unauthorized("not signed in with a session cookie".into()));
    };
    ctx.access.sessions.remove(session);
    tracing::info!("signed out of the web UI");
    let after = SignInState {
        signed_in: false,
        can_read: ctx.access.open_reads,
        can_change: false,
        csrf_token: None,
        expires_unix_ms: None,
    };
    Ok(([(header::SET_COOKIE, clear_cookie())], Json(after)).into_response())
}
