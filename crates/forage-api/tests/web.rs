//! The web UI's side of the API without a browser: its files and headers, signing in,
//! the session cookie and CSRF token, hostile cookies, tokens and origins, the pairing
//! and handoff routes, and the live feed's first messages and refusals. (The browser
//! itself: `crates/forage/tests/web_ui.rs`.)

mod common;

use axum::http::{Method, StatusCode};
use common::{call_body, call_with, fixture, Answer};
use forage_api::{
    CredentialList, FeedEvent, HandoffEvent, HandoffStatus, HandoffTick, HandoffView, InstanceList, PairingCodeView,
    SignInState,
};
use forage_handoff::pipeline::TraceRow;

const TOKEN: &str = "s3cret-token";
const HOST: (&str, &str) = ("host", "127.0.0.1:7879");

fn protected(open_reads: bool) -> (common::Fixture, axum::Router) {
    let fx = fixture();
    let ctx = forage_api::ApiContext::new(fx.state.clone(), "test-cloudlet", "9.9.9", "tcg", fx.control.clone())
        .with_access(TOKEN.into(), open_reads);
    let router = forage_api::router(ctx);
    (fx, router)
}

async fn sign_in(router: &axum::Router) -> (String, SignInState) {
    let a = call_body(
        router,
        Method::POST,
        "/v1/signin",
        &[HOST, ("content-type", "application/json"), ("origin", "http://127.0.0.1:7879")],
        format!("{{\"token\":\"{TOKEN}\"}}").into_bytes(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let set = a.headers.get("set-cookie").unwrap().to_str().unwrap().to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(flag), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let state: SignInState = serde_json::from_slice(&a.body).unwrap();
    (cookie, state)
}

fn error(a: &Answer) -> String {
    serde_json::from_slice::<forage_api::ErrorBody>(&a.body).map(|e| e.error).unwrap_or_default()
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_a_strict_policy() {
    let (_fx, router) = protected(false);
    for (path, kind) in [("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")] {
        let a = call_with(&router, Method::GET, path, &[("host", "10.0.0.5:7879")]).await;
        assert_eq!(a.status, StatusCode::OK, "{path} is open, even off loopback");
        assert!(a.content_type().starts_with(kind), "{path}: {}", a.content_type());
        let csp = a.headers.get("content-security-policy").unwrap().to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'")
                && csp.contains("script-src 'self'")
                && csp.contains("frame-ancestors 'none'")
        );
        assert_eq!(a.headers.get("x-frame-options").unwrap(), "DENY");
        let tag = a.headers.get("etag").unwrap().to_str().unwrap().to_string();
        let again = call_with(&router, Method::GET, path, &[("if-none-match", &tag)]).await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    }
    let html = call_with(&router, Method::GET, "/", &[]).await.text();
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing is fetched from elsewhere");
    assert!(forage_api::ui_bytes() < 100_000, "{} bytes", forage_api::ui_bytes());
}

#[tokio::test]
async fn signing_in_takes_the_token_and_nothing_else() {
    let (_fx, router) = protected(true);
    let json = ("content-type", "application/json");
    let wrong = call_body(&router, Method::POST, "/v1/signin", &[json], br#"{"token":"guess"}"#.to_vec()).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.headers.get("set-cookie").is_none());
    for (body, kind) in [(&b"token=s3cret-token"[..], "text/plain"), (&br#"{"token":1}"#[..], "application/json")] {
        let a = call_body(&router, Method::POST, "/v1/signin", &[("content-type", kind)], body.to_vec()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    }
    let other_site = call_body(
        &router,
        Method::POST,
        "/v1/signin",
        &[HOST, json, ("origin", "http://evil.example")],
        format!("{{\"token\":\"{TOKEN}\"}}").into_bytes(),
    )
    .await;
    assert_eq!(other_site.status, StatusCode::FORBIDDEN, "another site may not sign a browser in");

    let anonymous: SignInState =
        serde_json::from_slice(&call_with(&router, Method::GET, "/v1/signin", &[HOST]).await.body).unwrap();
    assert_eq!((anonymous.signed_in, anonymous.can_read, anonymous.can_change), (false, true, false));
    assert_eq!(anonymous.csrf_token, None);
    let (cookie, state) = sign_in(&router).await;
    assert!(state.signed_in && state.can_change && state.csrf_token.as_ref().is_some_and(|t| t.len() == 64));
    let now: SignInState =
        serde_json::from_slice(&call_with(&router, Method::GET, "/v1/signin", &[("cookie", &cookie)]).await.body)
            .unwrap();
    assert_eq!(now.csrf_token, state.csrf_token, "the page learns its CSRF token again after a reload");
}

#[tokio::test]
async fn a_change_needs_the_cookie_and_its_csrf_token_from_this_origin() {
    let (fx, router) = protected(true);
    let (cookie, state) = sign_in(&router).await;
    let csrf = state.csrf_token.unwrap();
    let stop = |headers: Vec<(&'static str, String)>| {
        let router = router.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            call_with(&router, Method::DELETE, "/v1/instances/vm-1", &h).await
        }
    };
    let c = || ("cookie", cookie.clone());
    let refusals = [
        (vec![], StatusCode::UNAUTHORIZED, "Bearer"),
        (vec![c()], StatusCode::FORBIDDEN, "CSRF token in"),
        (vec![c(), ("x-csrf-token", "0".repeat(64))], StatusCode::FORBIDDEN, "not this session's"),
        (vec![c(), ("x-csrf-token", csrf[..63].to_string())], StatusCode::FORBIDDEN, "not this session's"),
        (
            vec![
                c(),
                ("x-csrf-token", csrf.clone()),
                ("origin", "http://127.0.0.1:8080".into()),
                ("host", "127.0.0.1:7879".into()),
            ],
            StatusCode::FORBIDDEN,
            "another origin",
        ),
        (
            vec![c(), ("x-csrf-token", csrf.clone()), ("sec-fetch-site", "same-site".into())],
            StatusCode::FORBIDDEN,
            "another site",
        ),
        (
            vec![("cookie", format!("forage_session={}", "ab".repeat(32))), ("x-csrf-token", csrf.clone())],
            StatusCode::UNAUTHORIZED,
            "sign in again",
        ),
        (
            vec![("cookie", "forage_session=%00%0d%0aSet-Cookie:x".into()), ("x-csrf-token", csrf.clone())],
            StatusCode::UNAUTHORIZED,
            "sign in again",
        ),
        (
            vec![c(), ("x-csrf-token", csrf.clone()), ("authorization", "Bearer nope".into())],
            StatusCode::UNAUTHORIZED,
            "bearer token",
        ),
    ];
    for (headers, status, says) in refusals {
        let shown = format!("{headers:?}");
        let a = stop(headers).await;
        assert_eq!(a.status, status, "{shown}: {}", a.text());
        assert!(error(&a).contains(says), "{shown}: {}", error(&a));
    }
    assert!(fx.control.calls.lock().unwrap().is_empty(), "nothing reached the daemon");
    let running: InstanceList =
        serde_json::from_slice(&call_with(&router, Method::GET, "/v1/instances", &[]).await.body).unwrap();
    assert!(running.instances.iter().any(|i| i.id == "vm-1"), "still running");

    let ok = stop(vec![
        c(),
        ("x-csrf-token", csrf.clone()),
        ("origin", "http://127.0.0.1:7879".into()),
        ("host", "127.0.0.1:7879".into()),
        ("sec-fetch-site", "same-origin".into()),
    ])
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(fx.control.calls.lock().unwrap().as_slice(), ["stop vm-1"]);

    // Signed out: the cookie is worth nothing, even with its old CSRF token.
    let out = call_with(&router, Method::POST, "/v1/signout", &[("cookie", &cookie), ("x-csrf-token", &csrf)]).await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.text());
    assert!(out.headers.get("set-cookie").unwrap().to_str().unwrap().contains("Max-Age=0"));
    let after =
        call_with(&router, Method::DELETE, "/v1/instances/stuck-1", &[("cookie", &cookie), ("x-csrf-token", &csrf)])
            .await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn reads_off_loopback_need_the_cookie_and_a_rebound_name_reads_nothing() {
    let (_fx, closed) = protected(false);
    let a = call_with(&closed, Method::GET, "/v1/instances", &[("host", "10.0.0.5:7879")]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(error(&a).contains("signing in"), "{}", error(&a));
    let (cookie, _) = sign_in(&closed).await;
    let a = call_with(&closed, Method::GET, "/v1/instances", &[("host", "10.0.0.5:7879"), ("cookie", &cookie)]).await;
    assert_eq!(a.status, StatusCode::OK, "signed in, reads work anywhere");

    let (_fx, open) = protected(true);
    assert_eq!(call_with(&open, Method::GET, "/v1/status", &[HOST]).await.status, StatusCode::OK);
    let rebound = call_with(&open, Method::GET, "/v1/status", &[("host", "evil.example:7879")]).await;
    assert_eq!(rebound.status, StatusCode::UNAUTHORIZED, "a DNS-rebinding page reads nothing");
}

#[tokio::test]
async fn instances_say_how_they_came_for_whom_and_what_they_carried() {
    let fx = fixture();
    let list: InstanceList =
        serde_json::from_slice(&call_with(&fx.router, Method::GET, "/v1/instances", &[]).await.body).unwrap();
    let vm1 = list.instances.iter().find(|i| i.id == "vm-1").unwrap();
    assert_eq!(vm1.mechanism, Some(forage_api::SessionMode::Pipelined));
    assert_eq!(vm1.device.as_deref(), Some("10.0.0.7"));
    assert_eq!(vm1.usage.unwrap().bytes_from_guest, 90);
    assert_eq!(list.instances.iter().find(|i| i.id == "stuck-1").unwrap().usage, None);
}

#[tokio::test]
async fn pairing_codes_come_with_a_qr_code_and_credentials_can_be_revoked() {
    let fx = fixture();
    let json = ("content-type", "application/json");
    let a = call_body(
        &fx.router,
        Method::POST,
        "/v1/pairing/codes",
        &[json, HOST],
        br#"{"kind":"cloudlet","valid_days":3}"#.to_vec(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let code: PairingCodeView = serde_json::from_slice(&a.body).unwrap();
    assert!(code.qr_svg.starts_with("<?xml") && code.qr_svg.contains("<svg"), "{}", &code.qr_svg[..60]);
    assert_eq!((code.valid_days, code.kind), (3, forage_api::PeerKindView::Cloudlet));
    assert!(
        fx.control.calls.lock().unwrap()[0].ends_with("Some(127.0.0.1)"),
        "the address the browser used is passed on"
    );
    for bad in [
        &br#"{"valid_days":0}"#[..],
        br#"{"valid_days":366}"#,
        br#"{"kind":"root"}"#,
        br#"{"valid_days":7,"admin":true}"#,
        b"null",
        b"{",
    ] {
        let a = call_body(&fx.router, Method::POST, "/v1/pairing/codes", &[json], bad.to_vec()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}: {}", String::from_utf8_lossy(bad), a.text());
    }
    let after: CredentialList =
        serde_json::from_slice(&call_with(&fx.router, Method::DELETE, "/v1/pairing/credentials/phone", &[]).await.body)
            .unwrap();
    assert!(after.credentials[0].revoked_unix_ms.is_some());
    let missing = call_with(&fx.router, Method::DELETE, "/v1/pairing/credentials/nobody", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

/// The next piece of a streamed body, as text.
async fn next(body: &mut axum::body::BodyDataStream) -> String {
    use futures_util::StreamExt;
    let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
    String::from_utf8(chunk.to_vec()).unwrap()
}

/// The `data:` of each SSE event in `text`.
fn feed_events(text: &str) -> Vec<FeedEvent> {
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test]
async fn the_feed_starts_with_the_whole_state_then_sends_handoff_points_as_they_come() {
    use tower::ServiceExt;
    let fx = fixture();
    let request = axum::http::Request::get("/v1/events").body(axum::body::Body::empty()).unwrap();
    let response = fx.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers().get("content-type").unwrap(), "text/event-stream");
    let mut body = response.into_body().into_data_stream();
    let mut text = String::new();
    while feed_events(&text).len() < 11 {
        text.push_str(&next(&mut body).await);
    }
    let kinds: Vec<&str> = feed_events(&text).iter().map(|e| e.name()).collect();
    assert_eq!(
        kinds[..11],
        [
            "hello",
            "status",
            "instances",
            "sessions",
            "cache",
            "host",
            "bases",
            "services",
            "credentials",
            "cloudlets",
            "handoffs"
        ],
        "hello, the state's tables, the rest, handoffs"
    );
    assert!(text.contains("\nid: ") || text.starts_with("id: "), "events carry ids for reconnection");
    // A handoff starts and makes a point: the feed says so without being asked.
    let view = HandoffView {
        id: "h1".into(),
        instance: "vm-1".into(),
        to: "10.0.0.2:7878".into(),
        mode: None,
        started_unix_ms: 1,
        ended_unix_ms: None,
        status: HandoffStatus::Running,
        error: None,
        trace: vec![],
        total_s: None,
        downtime_s: None,
        bytes: None,
        modified_bytes: None,
    };
    fx.control.handoffs.lock().unwrap().push(view.clone());
    fx.control.events.send(HandoffEvent::Changed(view)).unwrap();
    let row = TraceRow {
        t_s: 0.1,
        input_bps: 1e6,
        output_bps: 5e5,
        potential_output_bps: 2e6,
        mode: "xor+zstd-1".into(),
        ..Default::default()
    };
    fx.control.events.send(HandoffEvent::Tick(HandoffTick { id: "h1".into(), row: row.clone() })).unwrap();
    let mut tail = String::new();
    while !feed_events(&tail).iter().any(|e| matches!(e, FeedEvent::HandoffTick(_))) {
        tail.push_str(&next(&mut body).await);
    }
    let events = feed_events(&tail);
    assert!(events.iter().any(|e| matches!(e, FeedEvent::Handoffs(l) if l.handoffs[0].id == "h1")));
    assert!(events.iter().any(|e| matches!(e, FeedEvent::HandoffTick(t) if t.row == row)));
}

#[tokio::test]
async fn the_feed_refuses_strange_reconnections_and_too_many_tabs() {
    let fx = fixture();
    for bad in ["garbage", "1-2-3", "ffffffffffffffffff-1", "1-", "../../x"] {
        let a = call_with(&fx.router, Method::GET, "/v1/events", &[("last-event-id", bad)]).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(error(&a).contains("Last-Event-ID"), "{}", a.text());
    }
    // A well-formed id (of this run or another): the whole state again.
    use tower::ServiceExt;
    let ok = axum::http::Request::get("/v1/events")
        .header("last-event-id", "abc-42")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(fx.router.clone().oneshot(ok).await.unwrap().status(), StatusCode::OK);
    let mut open = Vec::new();
    for _ in 0..forage_api::MAX_FEEDS + 1 {
        let r = axum::http::Request::get("/v1/events").body(axum::body::Body::empty()).unwrap();
        open.push(fx.router.clone().oneshot(r).await.unwrap());
    }
    let refused = open.iter().filter(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE).count();
    assert!(refused >= 1, "beyond {} feeds, one is refused", forage_api::MAX_FEEDS);
}
