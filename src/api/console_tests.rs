//! Tests of the endpoints the web console reads (points, hosts, info,
//! metrics summary) and of how the console's page is served (public,
//! locked down by headers), through the router like any client.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use super::tests::{call, state};
use super::ApiState;
use crate::progress::NoProgress;
use crate::repo::{backup, BackupOptions};

const AUTH: Option<&str> = Some("Bearer s3cret");

/// GET `uri` with the token; the status and the parsed JSON.
async fn get_json(state: &ApiState, uri: &str) -> (StatusCode, Value) {
    let (status, body) = call(state, "GET", uri, AUTH, None).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{uri}: {e}: {body}"));
    (status, json)
}

/// GET `uri` without a token: status, headers, body.
async fn get_raw(state: &ApiState, uri: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
    let resp = super::router(state.clone()).oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn console_page_is_public_and_locked_down() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path()).await;
    let (status, headers, body) = get_raw(&state, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert!(body.contains("/js/app.js"), "{body}");
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    for rule in [
        "default-src 'none'",
        "script-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(rule), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");

    let (status, headers, body) = get_raw(&state, "/js/sessions.js").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    assert!(body.contains("waiting"), "{body}");

    // Data stays behind the token, and its answers carry the same headers.
    for uri in [
        "/api/v1/points",
        "/api/v1/hosts",
        "/api/v1/info",
        "/api/v1/metrics/summary",
    ] {
        let (status, headers, _) = get_raw(&state, uri).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{uri}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store", "{uri}");
    }
    assert_eq!(get_raw(&state, "/nope.js").await.0, StatusCode::NOT_FOUND);

    // `[api] console = false`: the API without the page.
    let off = ApiState {
        console: false,
        ..state.clone()
    };
    assert_eq!(get_raw(&off, "/").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get_json(&off, "/api/v1/hosts").await.0, StatusCode::OK);
}

#[tokio::test]
async fn points_are_listed_with_their_backup_figures() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path()).await;
    let (status, json) = get_json(&state, "/api/v1/points").await;
    assert_eq!((status, json), (StatusCode::OK, Value::Array(vec![])));

    let vm = dir.path().join("src");
    std::fs::create_dir(&vm).unwrap();
    let disk: Vec<u8> = (0..(3u32 << 18))
        .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
        .collect();
    std::fs::write(vm.join("disk.img"), &disk).unwrap();
    let options = BackupOptions {
        vm: Some("<script>alert(1)</script>".into()),
        ..Default::default()
    };
    let point = backup(state.datastore.repo(), &vm, &options, &NoProgress)
        .await
        .unwrap();

    let (status, json) = get_json(&state, "/api/v1/points").await;
    assert_eq!(status, StatusCode::OK);
    let p = &json[0];
    assert_eq!(p["id"], point.id.as_str());
    assert_eq!(p["vm"], "<script>alert(1)</script>");
    assert_eq!(p["size"], disk.len() as u64);
    assert_eq!(p["files"], 1);
    assert_eq!(p["bytes_new"], point.stats.bytes_new);
    assert!(point.stats.bytes_new > 0);
    assert_eq!(p["bytes_stored"], point.stats.bytes_stored);
    assert_eq!(p["verify"], Value::Null);
    assert_eq!(p["published"], Value::Array(vec![]));

    state
        .datastore
        .publish("/revive", "xss-ir", &point.id, None)
        .await
        .unwrap();
    let (_, json) = get_json(
        &state,
        "/api/v1/points?vm=%3Cscript%3Ealert(1)%3C/script%3E",
    )
    .await;
    assert_eq!(json[0]["published"][0]["name"], "xss-ir");
    assert_eq!(json[0]["published"][0]["export"], "/revive");
    let (_, json) = get_json(&state, "/api/v1/points?vm=other").await;
    assert_eq!(json, Value::Array(vec![]));
}

#[tokio::test]
async fn hosts_info_and_metrics_summary() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path()).await;
    let (status, hosts) = get_json(&state, "/api/v1/hosts").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        hosts,
        serde_json::json!([{"name": "none", "driver": "none", "available": true, "publish_only": true}])
    );

    let (status, info) = get_json(&state, "/api/v1/info").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["session_export"], "/revive");
    assert_eq!(info["exports"], serde_json::json!(["/revive"]));
    assert_eq!(
        info["cache_root"],
        dir.path().join("cache").to_str().unwrap()
    );
    assert_eq!(info["chunk_size"], 1 << 20);

    state
        .nfs
        .bytes_read
        .fetch_add(4096, std::sync::atomic::Ordering::Relaxed);
    state
        .nfs
        .record(6, std::time::Duration::from_micros(80), true);
    let (status, m) = get_json(&state, "/api/v1/metrics/summary").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m["frontends"][0]["name"], "nfs");
    assert_eq!(m["frontends"][0]["read_bytes"], 4096);
    assert_eq!(m["frontends"][0]["calls"], 1);
    assert_eq!(m["block_cache"]["hit_ratio"], Value::Null);
    assert_eq!(m["sessions"], serde_json::json!({}));
    assert_eq!(m["sample_interval_secs"], 2);
    assert_eq!(m["history_secs"], 300);
    assert_eq!(m["history"], Value::Array(vec![]));
}
