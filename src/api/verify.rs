//! Verification boot endpoints: what `revive verify --boot` calls. A POST
//! starts a job and answers at once; the job's GET shows each point's phase
//! and verdict; a point's last screenshot is served as PNG.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::error::ApiError;
use super::ApiState;
use crate::controller::VerifyBootRequest;

/// The routes, relative to the API root.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/verify-boots", post(start))
        .route("/api/v1/verify-boots/{id}", get(job))
        .route("/api/v1/points/{id}/boot.png", get(screenshot))
}

async fn start(
    State(state): State<ApiState>,
    body: Result<Json<VerifyBootRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let job = state.controller.verify_boot(req).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn job(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(state.controller.verify_boot_job(&id)?).into_response())
}

async fn screenshot(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.datastore.repo().boot_screenshot(&id).await? {
        Some(png) => Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response()),
        None => Ok((
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": format!("no verification boot screenshot of point '{id}'")
            })),
        )
            .into_response()),
    }
}
