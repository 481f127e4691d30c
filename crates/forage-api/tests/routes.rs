//! What each route answers, on a router over a temporary state and a fake daemon.

mod common;

use axum::http::{Method, StatusCode};
use common::{call, call_body, fixture};
use forage_state::InstanceStatus;

#[tokio::test]
async fn status_reports_the_cloudlet_and_its_counts() {
    let fx = fixture();
    let a = call(&fx.router, Method::GET, "/v1/status").await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(v["name"], "test-cloudlet");
    assert_eq!(v["version"], "9.9.9");
    assert_eq!(v["accel"], "tcg");
    assert_eq!(v["sessions_running"], 1);
    assert_eq!(v["instances_running"], 2);
    assert_eq!(v["cache_entries"], 2);
    assert!(v["uptime_s"].is_u64());
}

#[tokio::test]
async fn bases_come_from_the_daemon() {
    let fx = fixture();
    let v = call(&fx.router, Method::GET, "/v1/bases").await.json();
    let bases: forage_api::BaseList = serde_json::from_value(v).unwrap();
    assert_eq!(bases.bases.len(), 1);
    assert_eq!(bases.bases[0].name, "demo-base");
    assert_eq!(bases.bases[0].memory_bytes, 256 << 20);
}

#[tokio::test]
async fn the_app_store_lists_and_serves_client_apps() {
    let fx = fixture();
    let v: forage_api::ServiceList =
        serde_json::from_value(call(&fx.router, Method::GET, "/v1/services").await.json()).unwrap();
    assert_eq!(v.services[0].client_apps, ["hs-client"]);
    let apps: forage_api::AppList =
        serde_json::from_value(call(&fx.router, Method::GET, "/v1/apps?platform=linux-x86_64").await.json()).unwrap();
    assert_eq!(apps.apps[0].id, "hs-client");
    let file = call(&fx.router, Method::GET, "/v1/apps/hs-client").await;
    assert_eq!(file.text(), "hello");
    let missing = call(&fx.router, Method::GET, "/v1/apps/nope").await;
    assert_eq!(missing.status, axum::http::StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn substrates_are_listed_described_and_counted_in_metrics() {
    let fx = fixture();
    let list: forage_api::SubstrateList =
        serde_json::from_value(call(&fx.router, Method::GET, "/v1/substrates").await.json()).unwrap();
    assert_eq!((list.substrates.len(), list.disk_bytes), (2, 30 << 20));
    let web = call(&fx.router, Method::GET, "/v1/substrates/web").await.json();
    assert_eq!((web["name"].as_str(), web["tier"].as_str()), (Some("web"), Some("memory")), "{web}");
    let info: forage_api::SubstrateInfo = serde_json::from_value(web).unwrap();
    assert_eq!((info.max_vcpus, info.sections[0].name.as_str()), (2, "memory"));
    let missing = call(&fx.router, Method::GET, "/v1/substrates/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.json()["error"].as_str().unwrap().contains("no substrate"), "{}", missing.text());
    let text = call(&fx.router, Method::GET, "/metrics").await.text();
    for line in [
        "forage_substrates{tier=\"memory\"} 1",
        "forage_substrates{tier=\"disk\"} 1",
        "forage_substrate_bytes{tier=\"disk\"} 31457280",
        "forage_substrate_budget_bytes 1073741824",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn docking_an_instance_ends_it_and_refusals_keep_their_status() {
    let fx = fixture();
    let post = |id: &'static str, body: &'static str| {
        let router = fx.router.clone();
        async move {
            let path = format!("/v1/instances/{id}/dock");
            call_body(&router, Method::POST, &path, &[("content-type", "application/json")], body.as_bytes().to_vec())
                .await
        }
    };
    // Refused before the daemon is asked: no body, unknown fields, no such instance, not running.
    assert_eq!(post("vm-1", r#"{"public":true}"#).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(post("vm-1", r#"{"name":"a","size":1}"#).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(post("vm-404", r#"{"name":"a"}"#).await.status, StatusCode::NOT_FOUND);
    assert_eq!(post("vm-old", r#"{"name":"a"}"#).await.status, StatusCode::CONFLICT);
    assert!(fx.control.calls.lock().unwrap().is_empty());
    // The daemon's refusals keep their status, and the instance runs on.
    let a = post("vm-1", r#"{"name":"../x"}"#).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    let a = post("stuck-1", r#"{"name":"a"}"#).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(a.json()["error"].as_str().unwrap().contains("did not answer"), "{}", a.text());
    assert_eq!(fx.state.instance("vm-1").unwrap().unwrap().status, InstanceStatus::Running);
    // Docked: the report, and the instance has left the running ones.
    let a = post("vm-1", r#"{"name":"web-docked","public":true}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let r: forage_api::InstanceDockReport = serde_json::from_value(a.json()).unwrap();
    assert_eq!((r.instance.as_str(), r.substrate.as_str()), ("vm-1", "web-docked"));
    assert_ne!(fx.state.instance("vm-1").unwrap().unwrap().status, InstanceStatus::Running);
    assert_eq!(post("vm-1", r#"{"name":"again"}"#).await.status, StatusCode::CONFLICT);
    assert_eq!(
        *fx.control.calls.lock().unwrap(),
        ["dock vm-1 as ../x", "dock stuck-1 as a", "dock vm-1 as web-docked"]
    );
}

#[tokio::test]
async fn sessions_are_listed_newest_first_up_to_the_limit() {
    let fx = fixture();
    let all: forage_api::SessionList =
        serde_json::from_value(call(&fx.router, Method::GET, "/v1/sessions").await.json()).unwrap();
    let ids: Vec<_> = all.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s-new", "s-old"]);
    let old = &all.sessions[1];
    assert_eq!(old.status, forage_api::SessionStatus::Done);
    assert_eq!(old.mode, forage_api::SessionMode::Pipelined);
    assert_eq!((old.first_ready_ms, old.bytes_received), (Some(410), 985_000));

    let one = call(&fx.router, Method::GET, "/v1/sessions?limit=1").await.json();
    assert_eq!(one["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(one["sessions"][0]["id"], "s-new");
    assert_eq!(one["sessions"][0]["status"], "running");

    for bad in ["0", "1001", "abc", "-1"] {
        let a = call(&fx.router, Method::GET, &format!("/v1/sessions?limit={bad}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "limit={bad}");
        assert!(a.json()["error"].is_string(), "limit={bad}: {}", a.text());
    }
}

#[tokio::test]
async fn instances_are_running_ones_unless_all() {
    let fx = fixture();
    let ids = |v: serde_json::Value| -> Vec<String> {
        let mut ids: Vec<String> =
            v["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
        ids.sort();
        ids
    };
    let running = call(&fx.router, Method::GET, "/v1/instances").await.json();
    assert_eq!(ids(running), ["stuck-1", "vm-1"]);
    let explicit = call(&fx.router, Method::GET, "/v1/instances?all=false").await.json();
    assert_eq!(ids(explicit), ["stuck-1", "vm-1"]);
    let all = call(&fx.router, Method::GET, "/v1/instances?all=true").await.json();
    assert_eq!(ids(all), ["stuck-1", "vm-1", "vm-old"]);
}

#[tokio::test]
async fn deleting_an_instance_stops_it_through_the_daemon() {
    let fx = fixture();
    let a = call(&fx.router, Method::DELETE, "/v1/instances/vm-1").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let v: forage_api::InstanceView = serde_json::from_value(a.json()).unwrap();
    assert_eq!(v.status, forage_api::InstanceStatus::Stopped);
    assert!(v.stopped_unix_ms.is_some());
    assert_eq!(*fx.control.calls.lock().unwrap(), ["stop vm-1"]);
    assert_eq!(fx.state.instance("vm-1").unwrap().unwrap().status, InstanceStatus::Stopped);

    // Again: it is no longer running, and the daemon is not asked twice.
    let again = call(&fx.router, Method::DELETE, "/v1/instances/vm-1").await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.json()["error"], "instance \"vm-1\" is stopped, not running");
    assert_eq!(fx.control.calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn deleting_an_unknown_instance_is_404() {
    let fx = fixture();
    let a = call(&fx.router, Method::DELETE, "/v1/instances/vm-404").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"], "no instance with id \"vm-404\"");
    assert!(fx.control.calls.lock().unwrap().is_empty(), "the daemon was not asked");
}

#[tokio::test]
async fn a_stop_the_daemon_refuses_leaves_the_instance_running() {
    let fx = fixture();
    let a = call(&fx.router, Method::DELETE, "/v1/instances/stuck-1").await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.json()["error"], "cannot stop instance \"stuck-1\": QEMU did not exit");
    assert_eq!(fx.state.instance("stuck-1").unwrap().unwrap().status, InstanceStatus::Running);
}

#[tokio::test]
async fn a_handoff_goes_through_the_daemon_and_says_what_it_did() {
    let fx = fixture();
    let post = |id: &'static str, body: &'static str| {
        let router = fx.router.clone();
        async move {
            call_body(
                &router,
                Method::POST,
                &format!("/v1/instances/{id}/handoff"),
                &[("content-type", "application/json")],
                body.as_bytes().to_vec(),
            )
            .await
        }
    };
    let a = post("vm-1", r#"{"to":"10.0.0.2:7878","mode":"xor+zstd-1"}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let v: forage_api::HandoffReport = serde_json::from_value(a.json()).unwrap();
    assert_eq!((v.to.as_str(), v.endpoint.as_str()), ("10.0.0.2:7878", "10.77.0.2:40000"));
    // Refused before the daemon is asked: not an address, no such instance, not running.
    assert_eq!(post("vm-1", r#"{"to":"cloudlet-b"}"#).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(post("vm-1", r#"{"where":"b"}"#).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(post("vm-404", r#"{"to":"10.0.0.2:7878"}"#).await.status, StatusCode::NOT_FOUND);
    assert_eq!(post("vm-old", r#"{"to":"10.0.0.2:7878"}"#).await.status, StatusCode::CONFLICT);
    assert_eq!(*fx.control.calls.lock().unwrap(), ["handoff vm-1 10.0.0.2:7878"]);
    // A handoff that fails: 500 naming why; the instance stays running.
    let a = post("stuck-1", r#"{"to":"10.0.0.2:7878"}"#).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(a.json()["error"].as_str().unwrap().contains("went silent"), "{}", a.text());
    assert_eq!(fx.state.instance("stuck-1").unwrap().unwrap().status, InstanceStatus::Running);
    // The daemon's own refusals keep their status: a busy (or not movable) instance is
    // the caller's conflict, not the cloudlet's failure.
    fx.state
        .instance_started(&forage_state::NewInstance {
            id: "busy-1".into(),
            session_id: "s-new".into(),
            name: "vm".into(),
            qemu_pid: 1,
            dir: "/tmp/x".into(),
            endpoint: "127.0.0.1:1".into(),
        })
        .unwrap();
    let a = post("busy-1", r#"{"to":"10.0.0.2:7878"}"#).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
    assert!(a.json()["error"].as_str().unwrap().contains("already being handed off"), "{}", a.text());
}

#[tokio::test]
async fn cache_is_listed_and_evicted_through_the_daemon() {
    let fx = fixture();
    let list: forage_api::CacheList =
        serde_json::from_value(call(&fx.router, Method::GET, "/v1/cache").await.json()).unwrap();
    let d1 = list.entries.iter().find(|e| e.overlay_digest == "d1").unwrap();
    assert_eq!((d1.hits, d1.bytes), (1, 1000));
    assert_eq!(list.entries.len(), 2);

    let a = call(&fx.router, Method::DELETE, "/v1/cache/d1").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["overlay_digest"], "d1");
    assert_eq!(*fx.control.calls.lock().unwrap(), ["evict d1"]);
    assert_eq!(fx.state.cache_entry("d1").unwrap(), None);
    let gone = call(&fx.router, Method::DELETE, "/v1/cache/d1").await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.json()["error"], "no cache entry with id \"d1\"");

    let busy = call(&fx.router, Method::DELETE, "/v1/cache/busy-1").await;
    assert_eq!(busy.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(fx.state.cache_entry("busy-1").unwrap().is_some(), "a refused eviction keeps the entry");
}

#[tokio::test]
async fn metrics_follow_the_state() {
    let fx = fixture();
    let a = call(&fx.router, Method::GET, "/metrics").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.content_type(), forage_api::METRICS_CONTENT_TYPE);
    let text = a.text();
    for line in [
        "forage_sessions_total{status=\"running\"} 1",
        "forage_sessions_total{status=\"done\"} 1",
        "forage_sessions_total{status=\"failed\"} 0",
        "forage_instances_running 2",
        "forage_cache_entries 2",
        "forage_cache_bytes 2000",
        "forage_cache_hits_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("forage_uptime_seconds ")), "{text}");

    // A stop through the API shows on the next scrape.
    call(&fx.router, Method::DELETE, "/v1/instances/vm-1").await;
    let text = call(&fx.router, Method::GET, "/metrics").await.text();
    assert!(text.lines().any(|l| l == "forage_instances_running 1"), "{text}");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let fx = fixture();
    let a = call(&fx.router, Method::GET, "/v1/nothing").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"], "no route /v1/nothing");
    let b = call(&fx.router, Method::POST, "/v1/status").await;
    assert_eq!(b.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(b.json()["error"], "method POST not allowed on /v1/status");
}

#[tokio::test]
async fn changes_need_the_token_and_reads_off_loopback_too() {
    let fx = fixture();
    let ctx = forage_api::ApiContext::new(fx.state.clone(), "c", "1", "tcg", fx.control.clone())
        .with_access("s3cret".into(), true);
    let router = forage_api::router(ctx);
    assert_eq!(call(&router, Method::GET, "/v1/status").await.status, StatusCode::OK, "reads are open on loopback");
    let refused = call(&router, Method::DELETE, "/v1/instances/vm-1").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.text().contains("Bearer"), "{}", refused.text());
    assert!(fx.control.calls.lock().unwrap().is_empty(), "nothing was done");
    let ok =
        common::call_with(&router, Method::DELETE, "/v1/instances/vm-1", &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let wrong = common::call_with(&router, Method::DELETE, "/v1/cache/d1", &[("authorization", "Bearer s3cre7")]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    let ctx = forage_api::ApiContext::new(fx.state.clone(), "c", "1", "tcg", fx.control.clone())
        .with_access("s3cret".into(), false);
    let router = forage_api::router(ctx);
    assert_eq!(
        call(&router, Method::GET, "/v1/status").await.status,
        StatusCode::UNAUTHORIZED,
        "reads need it off loopback"
    );
    assert_eq!(
        common::call_with(&router, Method::GET, "/v1/status", &[("authorization", "Bearer s3cret")]).await.status,
        StatusCode::OK
    );
}
