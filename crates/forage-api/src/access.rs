//! Who may do what (see `docs/security.md` and `docs/web-ui.md`):
//!
//! - the web UI's assets are open (the sign-in page must load anywhere);
//! - `POST /v1/signin` checks the token it is given, and `GET /v1/signin` answers
//!   anyone what they may do;
//! - a request with `Authorization: Bearer TOKEN` (the CLI, scripts) may do everything;
//! - a request with a session cookie (a signed-in browser) may read, and may change
//!   things if it also carries the session's CSRF token in `X-CSRF-Token` and does not
//!   come from another origin;
//! - anyone else may read, and only when the API listens on loopback and was reached by
//!   a loopback name (a DNS-rebinding page cannot read it through its own name).
//!
//! The middleware hands each request a [`Caller`] saying what it proved.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::context::Access;
use crate::error::ApiError;
use crate::websession::{same, CookieCheck, WebSession, CSRF_HEADER};

/// What a request proved, for the routes that answer by it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its signed-in browser session, if it has one.
    pub session: Option<WebSession>,
    /// It may change things.
    pub can_change: bool,
    /// It may read.
    pub can_read: bool,
}

/// Paths anyone may GET: the UI's page and assets.
pub(crate) fn is_asset(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

/// Refuse what the caller's credentials do not allow, and tell the routes who it is.
pub(crate) async fn check_access(State(access): State<Access>, mut request: Request, next: Next) -> Response {
    match decide(&access, request.method(), request.uri().path(), request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => {
            tracing::warn!(method = %request.method(), path = %request.uri().path(), "API request refused: {e}");
            e.into_response()
        }
    }
}

fn decide(access: &Access, method: &Method, path: &str, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let read = matches!(*method, Method::GET | Method::HEAD);
    let Some(token) = &access.token else {
        // No token (tests): everyone may do everything; a signed-in browser is still known.
        let session = match access.sessions.check(cookies(headers)) {
            CookieCheck::Valid(s) => Some(s),
            _ => None,
        };
        return Ok(Caller { session, can_change: true, can_read: true });
    };
    let anonymous_reads = access.open_reads && loopback_host(headers);
    let anonymous = Caller { session: None, can_change: false, can_read: anonymous_reads };
    if (read && is_asset(path)) || path == "/v1/signin" {
        // Sign-in answers for itself; its state is told to anyone (with a session's
        // CSRF token only to the browser that holds the session).
        return Ok(match access.sessions.check(cookies(headers)) {
            CookieCheck::Valid(s) => Caller { session: Some(s), can_change: true, can_read: true },
            _ => anonymous,
        });
    }
    if let Some(given) = headers.get(header::AUTHORIZATION) {
        let ok = given.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|g| same(g, token));
        if !ok {
            return Err(ApiError::Unauthorized("the bearer token is not this cloudlet's API token".into()));
        }
        return Ok(Caller { session: None, can_change: true, can_read: true });
    }
    match access.sessions.check(cookies(headers)) {
        CookieCheck::Valid(session) => {
            if !read {
                same_origin(headers)?;
                let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
                match csrf {
                    None => {
                        return Err(ApiError::Forbidden(format!(
                            "a change made with the session cookie needs its CSRF token in `{CSRF_HEADER}`"
                        )))
                    }
                    Some(c) if !session.csrf_matches(c) => {
                        return Err(ApiError::Forbidden("the CSRF token is not this session's: reload the page".into()))
                    }
                    Some(_) => {}
                }
            }
            Ok(Caller { session: Some(session), can_change: true, can_read: true })
        }
        CookieCheck::Unknown if !read || !anonymous_reads => Err(ApiError::Unauthorized(
            "the session cookie is not one this cloudlet knows (signed out, expired, or the daemon restarted): sign in again"
                .into(),
        )),
        _ if read && anonymous_reads => Ok(anonymous),
        _ => {
            let what = if read { "reading this API from another host" } else { "changing state" };
            Err(ApiError::Unauthorized(format!(
                "{what} needs `Authorization: Bearer TOKEN` (the token is in the cloudlet's DATA/trust/api-token), or signing in to the web UI"
            )))
        }
    }
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok())
}

/// A browser's change must come from a page of this API's own origin: `Origin` (sent
/// with every POST and DELETE by browsers) must name the host the request was sent to,
/// and `Sec-Fetch-Site`, when sent, must not say another site.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return Err(ApiError::Forbidden(format!("a change from another site ({site}) is refused")));
        }
    }
    if let (Some(origin), Some(host)) = (text("origin"), text("host")) {
        let theirs = origin.strip_prefix("http://").unwrap_or(origin);
        if theirs != host {
            return Err(ApiError::Forbidden(format!("a change from another origin ({origin}) is refused")));
        }
    }
    Ok(())
}

/// The request was sent to a loopback name (or names no host: HTTP/1.0, tests).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else { return true };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn loopback_names_only() {
        for ok in ["127.0.0.1:7879", "localhost:7879", "[::1]:7879", "127.0.0.2", "LOCALHOST"] {
            assert!(loopback_host(&headers(&[("host", ok)])), "{ok}");
        }
        for no in ["evil.example:7879", "10.0.0.5:7879", "[fd00::1]:7879", "127.0.0.1.evil.example"] {
            assert!(!loopback_host(&headers(&[("host", no)])), "{no}");
        }
    }

    #[test]
    fn changes_from_other_origins_are_refused() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:7879"), ("origin", "http://127.0.0.1:7879")])).is_ok());
        assert!(same_origin(&headers(&[("host", "127.0.0.1:7879"), ("origin", "http://127.0.0.1:8080")])).is_err());
        assert!(same_origin(&headers(&[("host", "127.0.0.1:7879"), ("origin", "null")])).is_err());
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-site")])).is_err());
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])).is_ok());
    }
}
