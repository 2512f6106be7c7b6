//! Session endpoints: what `revive recover`, `sessions`, `session`,
//! `migrate`, `switchover`, `retry`, `discard-cache` and `stop` call. Errors are JSON `{"error": "..."}`
//! with a 4xx status for anything the caller can fix.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::error::ApiError;
use super::ApiState;
use crate::controller::{MigrateRequest, RecoverRequest};

/// The routes, relative to the API root.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/sessions", get(list).post(recover))
        .route("/api/v1/sessions/{id}", get(one))
        .route("/api/v1/sessions/{id}/migrate", post(migrate))
        .route("/api/v1/sessions/{id}/retry", post(retry))
        .route("/api/v1/sessions/{id}/stop", post(stop))
        .route("/api/v1/sessions/{id}/discard-cache", post(discard_cache))
        .route("/api/v1/sessions/{id}/switchover", post(switchover))
}

async fn list(State(state): State<ApiState>) -> Response {
    Json(state.controller.list().await).into_response()
}

async fn recover(
    State(state): State<ApiState>,
    body: Result<Json<RecoverRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let sessions = state.controller.recover(req).await?;
    Ok((StatusCode::CREATED, Json(sessions)).into_response())
}

async fn one(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(state.controller.get(&id).await?).into_response())
}

async fn migrate(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<MigrateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    Ok(Json(state.controller.migrate(&id, req).await?).into_response())
}

async fn retry(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.controller.retry(&id).await?).into_response())
}

async fn discard_cache(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.controller.discard_cache(&id).await?).into_response())
}

async fn stop(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(state.controller.stop(&id).await?).into_response())
}

async fn switchover(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.controller.switchover(&id).await?).into_response())
}
