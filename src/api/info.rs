//! `GET /api/v1/info` (what this server is and the defaults a recover
//! request gets; also how a client checks its token) and `GET
//! /api/v1/hosts` (where sessions can run).

use std::path::PathBuf;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::ApiState;
use crate::controller::HostView;
use crate::datastore::FileOps;

/// The routes, relative to the API root.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/info", get(info))
        .route("/api/v1/hosts", get(hosts))
}

/// The server as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// revive's version.
    pub version: String,
    /// Every export path.
    pub exports: Vec<String>,
    /// Export sessions publish in.
    pub session_export: String,
    /// Datastore name hypervisors show.
    pub datastore_name: String,
    /// Where a session's write cache goes when the request names no location.
    pub cache_root: PathBuf,
    /// Automatic retries of a transient failure.
    pub retries: u32,
    /// Seconds between automatic retries.
    pub retry_interval_secs: u64,
    /// Bytes per second a copy migration may write (0: no limit).
    pub migration_bandwidth: u64,
    /// Chunk size of the repository.
    pub chunk_size: u32,
}

async fn info(State(state): State<ApiState>) -> Json<ServerInfo> {
    let settings = state.controller.settings();
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        exports: state
            .datastore
            .exports()
            .iter()
            .map(|e| e.path.clone())
            .collect(),
        session_export: settings.export.clone(),
        datastore_name: settings.datastore_name.clone(),
        cache_root: settings.cache_root.clone(),
        retries: settings.retries,
        retry_interval_secs: settings.retry_interval.as_secs(),
        migration_bandwidth: settings.migration_bandwidth,
        chunk_size: state.datastore.repo().chunk_size(),
    })
}

async fn hosts(State(state): State<ApiState>) -> Json<Vec<HostView>> {
    Json(state.controller.hosts())
}
