//! The web UI's files, built into the binary (a cloudlet may run disconnected: nothing is
//! fetched at run time), and the headers every answer carries: a content security policy
//! that allows only this origin's own script, style and connections (and `data:` images,
//! the pairing QR code), no framing, no sniffing, no referrer.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// (path, content type, bytes)
const FILES: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("../web/index.html")),
    ("/ui/app.js", "text/javascript; charset=utf-8", include_str!("../web/app.js")),
    ("/ui/chart.js", "text/javascript; charset=utf-8", include_str!("../web/chart.js")),
    ("/ui/app.css", "text/css; charset=utf-8", include_str!("../web/app.css")),
    ("/ui/icon.svg", "image/svg+xml", include_str!("../web/icon.svg")),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The files' total size: what a first load of the UI costs (before headers).
pub fn total_bytes() -> usize {
    FILES.iter().map(|f| f.2.len()).sum()
}

/// Each file's entity tag: a hash of its contents (FNV-1a: no secret involved).
fn etag(body: &str) -> String {
    let h = body.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    format!("\"{h:016x}\"")
}

/// `GET` of one of the UI's files (the router sends only their paths here).
pub async fn file(request: Request) -> Response {
    let path = request.uri().path();
    let Some((_, kind, body)) = FILES.iter().find(|f| f.0 == path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let tag = etag(body);
    let fresh = request.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(tag.as_str());
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::ETAG, HeaderValue::from_str(&tag).expect("hex"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    (headers, *body).into_response()
}

/// The UI's paths, for the router.
pub fn paths() -> impl Iterator<Item = &'static str> {
    FILES.iter().map(|f| f.0)
}

/// Headers for every answer (the API's JSON as well: harmless there).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}
