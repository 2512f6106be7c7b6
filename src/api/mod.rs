//! `api`: the HTTP API on localhost (axum): the session endpoints of the
//! controller (`/api/v1/sessions...`, what the CLI talks to), restore
//! points, hosts and a metrics summary (what the web console shows), and
//! Prometheus metrics (`/metrics`).
//!
//! Every data request must carry `Authorization: Bearer <token>` with the
//! token of the config file; without a configured token the API is not
//! started at all (no token, no access). The web console's page and scripts
//! ([`crate::web`]) are served on the same port without a token: they hold
//! no data, and fetch everything through the endpoints above with the token
//! the operator types in.

mod error;
mod info;
pub mod metrics;
mod points;
mod sessions;
pub mod summary;
mod verify;

pub use error::ApiError;
pub use info::ServerInfo;
pub use points::{PointSummary, Publication};
pub use summary::{History, MetricsSummary};

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
    /// Rates of the last minutes, for the metrics summary.
    pub history: Arc<History>,
    /// Serve the web console on `/` (`[api] console`).
    pub console: bool,
}

impl ApiState {
    /// The state of an API with the web console on and an empty history.
    pub fn new(
        datastore: Arc<Datastore>,
        nfs: Arc<NfsMetrics>,
        token: Arc<str>,
        controller: Controller,
    ) -> ApiState {
        ApiState {
            datastore,
            nfs,
            token,
            controller,
            history: Arc::new(History::default()),
            console: true,
        }
    }
}

/// The API's routes behind the token check, the console's assets without
/// it, and the security headers on every answer.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics_handler))
        .merge(sessions::routes())
        .merge(points::routes())
        .merge(info::routes())
        .merge(summary::routes())
        .merge(verify::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Merged after the token layer: `route_layer` covers only the routes
    // added before it, so the console's assets stay public.
    let app = if state.console {
        api.merge(crate::web::routes())
    } else {
        api
    };
    app.layer(middleware::from_fn(crate::web::security_headers))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes; samples the
/// metrics history meanwhile.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sampler = tokio::spawn(summary::sample_forever(state.clone()));
    let result = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    sampler.abort();
    result
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
mod console_tests;
#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::datastore::{DatastoreConfig, ExportConfig};
    use crate::repo::Repository;
    use crate::store::LocalStore;

    pub(super) async fn state(dir: &std::path::Path) -> ApiState {
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
        ApiState::new(
            datastore,
            Arc::new(NfsMetrics::default()),
            Arc::from("s3cret"),
            controller,
        )
    }

    async fn get(state: &ApiState, auth: Option<&str>) -> (StatusCode, String) {
        call(state, "GET", "/metrics", auth, None).await
    }

    pub(super) async fn call(
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
