//! `api`: the HTTP API on localhost (axum): the session endpoints of the
//! controller (`/api/v1/sessions...`, what the CLI talks to) and Prometheus
//! metrics (`/metrics`).
//!
//! Every request must carry `Authorization: Bearer <token>` with the token of
//! the config file; without a configured token the API is not started at all
//! (no token, no access).

pub mod metrics;
mod sessions;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::controller::Controller;
use crate::datastore::Datastore;
use crate::nfs::NfsMetrics;

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// The datastore being served.
    pub datastore: Arc<Datastore>,
    /// Counters of the NFS server.
    pub nfs: Arc<NfsMetrics>,
    /// The bearer token every request must present.
    pub token: Arc<str>,
    /// The session controller.
    pub controller: Controller,
}

/// The API's routes, behind the token check.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .merge(sessions::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit so timing does not reveal a prefix.
    let ok = presented.is_some_and(|p| {
        p.len() == state.token.len()
            && p.bytes()
                .zip(state.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        return (StatusCode::UNAUTHORIZED, "missing or wrong API token\n").into_response();
    }
    next.run(request).await
}

async fn metrics_handler(State(state): State<ApiState>) -> Response {
    let body = metrics::render(&state.nfs, &state.datastore, &state.controller).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::datastore::{DatastoreConfig, ExportConfig};
    use crate::repo::Repository;
    use crate::store::LocalStore;

    async fn state(dir: &std::path::Path) -> ApiState {
        let store = Arc::new(LocalStore::open(dir.join("repo")).unwrap());
        let repo = Repository::init(store, 1 << 20).await.unwrap();
        let config = DatastoreConfig {
            state_dir: dir.join("state"),
            cache_root: dir.join("cache"),
            block_cache_bytes: 1 << 20,
            readahead_chunks: 0,
            exports: vec![ExportConfig {
                path: "/revive".into(),
                allowed_clients: vec![IpAddr::from([127, 0, 0, 1])],
            }],
        };
        let datastore = Arc::new(Datastore::open(repo, config).await.unwrap());
        let mut settings = crate::config::Config::default();
        settings.datastore.state_dir = dir.join("state");
        settings.datastore.cache_root = dir.join("cache");
        let controller = Controller::start(settings.controller_config(), datastore.clone())
            .await
            .unwrap();
        ApiState {
            datastore,
            nfs: Arc::new(NfsMetrics::default()),
            token: Arc::from("s3cret"),
            controller,
        }
    }

    async fn get(state: &ApiState, auth: Option<&str>) -> (StatusCode, String) {
        call(state, "GET", "/metrics", auth, None).await
    }

    async fn call(
        state: &ApiState,
        method: &str,
        uri: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let resp = router(state.clone())
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn metrics_need_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        assert_eq!(get(&state, None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            get(&state, Some("Bearer s3cre")).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get(&state, Some("Bearer s3cretX")).await.0,
            StatusCode::UNAUTHORIZED
        );
        state
            .nfs
            .record(6, std::time::Duration::from_micros(80), true);
        let (status, body) = get(&state, Some("Bearer s3cret")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("revive_nfs_calls_total{proc=\"read\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("revive_nfs_latency_seconds_bucket{proc=\"read\",le=\"0.0001\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("revive_publications{export=\"/revive\"} 0"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn session_endpoints_refuse_bad_requests_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let auth = Some("Bearer s3cret");
        let sessions = "/api/v1/sessions";
        assert_eq!(
            call(&state, "GET", sessions, None, None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&state, "POST", sessions, Some("Bearer nope"), Some("{}"))
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        let (status, body) = call(&state, "GET", sessions, auth, None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "[]"));
        for (bad, expect) in [
            ("{not json", "parse the request body as JSON"),
            ("{\"vms\": 3}", "vms"),
            ("{\"vms\": [\"a\"], \"colour\": 1}", "colour"),
            ("{\"vms\": []}", "at least one VM"),
            ("{\"vms\": [\"a\"], \"host\": \"esx9\"}", "esx9"),
            ("{\"vms\": [\"a\", \"b\"], \"name\": \"x\"}", "single VM"),
            ("{\"vms\": [\"a\"], \"power_on\": true}", "--power-on"),
            ("{\"vms\": [\"a\"], \"name\": \"..\"}", "folder name"),
        ] {
            let (status, body) = call(&state, "POST", sessions, auth, Some(bad)).await;
            assert!(status.is_client_error(), "{bad}: {status} {body}");
            assert!(body.contains(expect), "{bad}: {body}");
        }
        for (method, uri, body) in [
            ("GET", "/api/v1/sessions/nope", None),
            ("POST", "/api/v1/sessions/nope/retry", None),
            ("POST", "/api/v1/sessions/nope/stop", None),
            (
                "POST",
                "/api/v1/sessions/nope/migrate",
                Some("{\"to\": \"/tmp/x\"}"),
            ),
        ] {
            let (status, text) = call(&state, method, uri, auth, body).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {text}");
            assert!(text.contains("no session 'nope'"), "{text}");
        }
        let (status, text) = call(&state, "GET", "/metrics", auth, None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains("revive_sessions{state=\"running\"} 0"),
            "{text}"
        );
    }
}
