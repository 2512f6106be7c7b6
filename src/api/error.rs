//! The API's one error type: every failure a handler returns becomes
//! `{"error": "..."}` with a 4xx status for anything the caller can fix, a
//! 503 when the repository is unreachable (retrying may help), else a 500.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::controller::ControllerError;
use crate::repo::RepoError;

/// An error as the API answers it: a status and a message for the operator.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        let status = match &e {
            ControllerError::BadRequest(_)
            | ControllerError::UnknownHost { .. }
            | ControllerError::Validation { .. } => StatusCode::BAD_REQUEST,
            ControllerError::UnknownSession { .. } => StatusCode::NOT_FOUND,
            ControllerError::WrongState { .. } | ControllerError::NameTaken { .. } => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(e.status(), e.body_text())
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        let status = match &e {
            RepoError::PointNotFound { .. } | RepoError::AmbiguousPoint { .. } => {
                StatusCode::NOT_FOUND
            }
            e if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, format!("read the repository - {e}"))
    }
}
