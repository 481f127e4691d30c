//! The OpenAPI document: it matches `docs/openapi.json`, and every operation it lists
//! answers on a real router as documented.

mod common;

use std::path::PathBuf;

use axum::http::{Method, StatusCode};
use common::{call, call_body, call_with, fixture};
use utoipa::openapi::path::Operation;

fn docs_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

fn generated() -> String {
    serde_json::to_string_pretty(&forage_api::openapi()).unwrap() + "\n"
}

#[test]
fn docs_openapi_json_is_the_generated_document() {
    let path = docs_file();
    let want = generated();
    if std::env::var_os("FORAGE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &want).unwrap();
        eprintln!("rewrote {}", path.display());
        return;
    }
    let have = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}): FORAGE_BLESS=1 writes it", path.display()));
    if have != want {
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| have.lines().count().min(want.lines().count()));
        panic!(
            "{} differs from the generated document from line {}: \
             rerun with FORAGE_BLESS=1 if the API change is intended",
            path.display(),
            line + 1
        );
    }
}

/// Every operation in the document: method, path template, operation.
fn operations() -> Vec<(Method, String, Operation)> {
    let doc = forage_api::openapi();
    let mut ops = Vec::new();
    for (path, item) in doc.paths.paths {
        for (method, op) in [
            (Method::GET, item.get),
            (Method::PUT, item.put),
            (Method::POST, item.post),
            (Method::DELETE, item.delete),
            (Method::PATCH, item.patch),
            (Method::HEAD, item.head),
            (Method::OPTIONS, item.options),
        ] {
            if let Some(op) = op {
                ops.push((method, path.clone(), op));
            }
        }
    }
    ops
}

/// The concrete request this test makes for a path template, on the fixture's data.
fn concrete(template: &str) -> String {
    match template {
        "/v1/apps/{id}" => "/v1/apps/hs-client".into(),
        _ => template
            .replace("{id}", "vm-1")
            .replace("{digest}", "d1")
            .replace("{who}", "phone")
            .replace("{name}", "web")
            .replace("{node}", "n1"),
    }
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let mut seen: Vec<String> = Vec::new();
    for (method, template, op) in operations() {
        // A fresh state for each: DELETEs change it.
        let fx = fixture();
        let uri = concrete(&template);
        let json = ("content-type", "application/json");
        let answer = match (&method, template.as_str()) {
            (&Method::GET, "/v1/events") => {
                // A stream that does not end: its head only.
                use tower::ServiceExt;
                let request = axum::http::Request::get(&uri).body(axum::body::Body::empty()).unwrap();
                let response = fx.router.clone().oneshot(request).await.unwrap();
                common::Answer { status: response.status(), headers: response.headers().clone(), body: Vec::new() }
            }
            (&Method::POST, "/v1/signout") => {
                let signed =
                    call_body(&fx.router, Method::POST, "/v1/signin", &[json], br#"{"token":"t"}"#.to_vec()).await;
                let cookie =
                    signed.headers.get("set-cookie").unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
                let state: forage_api::SignInState = serde_json::from_slice(&signed.body).unwrap();
                let csrf = state.csrf_token.unwrap();
                call_with(&fx.router, method.clone(), &uri, &[("cookie", &cookie), ("x-csrf-token", &csrf)]).await
            }
            (&Method::POST, _) => {
                let body: &[u8] = match template.as_str() {
                    "/v1/instances/{id}/handoff" => br#"{"to":"10.0.0.2:7878"}"#,
                    "/v1/instances/{id}/dock" => br#"{"name":"web-docked"}"#,
                    "/v1/signin" => br#"{"token":"t"}"#,
                    _ => b"{}",
                };
                call_body(&fx.router, method.clone(), &uri, &[json], body.to_vec()).await
            }
            _ => call(&fx.router, method.clone(), &uri).await,
        };
        let id = format!("{method} {template}");
        assert_eq!(answer.status, StatusCode::OK, "{id}: {}", answer.text());
        assert!(op.responses.responses.contains_key("200"), "{id} answers 200, which the document does not list");
        let want_type = match template.as_str() {
            "/metrics" => "application/openmetrics-text",
            "/v1/apps/{id}" => "application/octet-stream",
            "/v1/events" => "text/event-stream",
            _ => "application/json",
        };
        assert!(answer.content_type().starts_with(want_type), "{id}: content type {:?}", answer.content_type());
        if want_type == "application/json" {
            answer.json();
        }
        seen.push(id);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "DELETE /v1/cache/{digest}",
            "DELETE /v1/instances/{id}",
            "DELETE /v1/pairing/credentials/{who}",
            "GET /metrics",
            "GET /openapi.json",
            "GET /v1/apps",
            "GET /v1/apps/{id}",
            "GET /v1/bases",
            "GET /v1/cache",
            "GET /v1/cloudlets",
            "GET /v1/cluster",
            "GET /v1/events",
            "GET /v1/handoffs",
            "GET /v1/host",
            "GET /v1/instances",
            "GET /v1/pairing/credentials",
            "GET /v1/services",
            "GET /v1/sessions",
            "GET /v1/signin",
            "GET /v1/status",
            "GET /v1/substrates",
            "GET /v1/substrates/{name}",
            "POST /v1/cluster/nodes/{node}/drain",
            "POST /v1/cluster/placements",
            "POST /v1/instances/{id}/dock",
            "POST /v1/instances/{id}/handoff",
            "POST /v1/pairing/codes",
            "POST /v1/signin",
            "POST /v1/signout",
        ],
        "the document's operations changed: update this test and docs/http-api.md"
    );
}

#[tokio::test]
async fn openapi_route_serves_the_generated_document() {
    let fx = fixture();
    let answer = call(&fx.router, Method::GET, "/openapi.json").await;
    assert_eq!(answer.json(), serde_json::to_value(forage_api::openapi()).unwrap());
}

/// Every error status a route answers with is one its document lists.
#[tokio::test]
async fn error_answers_are_documented() {
    let cases = [
        (Method::DELETE, "/v1/instances/{id}", "/v1/instances/no-such-vm", 404),
        (Method::DELETE, "/v1/instances/{id}", "/v1/instances/vm-old", 409),
        (Method::DELETE, "/v1/instances/{id}", "/v1/instances/stuck-1", 500),
        (Method::DELETE, "/v1/cache/{digest}", "/v1/cache/no-such-digest", 404),
        (Method::DELETE, "/v1/cache/{digest}", "/v1/cache/busy-1", 500),
        (Method::GET, "/v1/sessions", "/v1/sessions?limit=0", 400),
        (Method::GET, "/v1/instances", "/v1/instances?all=maybe", 400),
        (Method::DELETE, "/v1/pairing/credentials/{who}", "/v1/pairing/credentials/nobody", 404),
        (Method::GET, "/v1/events", "/v1/events", 400),
    ];
    let ops = operations();
    for (method, template, uri, status) in cases {
        let fx = fixture();
        // The feed's 400: a Last-Event-ID it never sends.
        let answer = call_with(&fx.router, method.clone(), uri, &[("last-event-id", "x")]).await;
        assert_eq!(answer.status.as_u16(), status, "{method} {uri}: {}", answer.text());
        let (_, _, op) = ops
            .iter()
            .find(|(m, t, _)| *m == method && t == template)
            .unwrap_or_else(|| panic!("{method} {template} is not in the document"));
        assert!(
            op.responses.responses.contains_key(&status.to_string()),
            "{method} {uri} answered {status}, which the document does not list"
        );
        let error = answer.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(!error.is_empty(), "{method} {uri}: no error message");
    }
}
