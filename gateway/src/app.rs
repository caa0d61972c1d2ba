//! The data plane, assembled in one place so its order reads top to bottom (see the pipeline
//! in the README): only documented routes exist, everything else is an OpenAI-shaped 404/405.

use std::sync::Arc;

use axum::{Json, Router, http::StatusCode, response::IntoResponse, routing::get};
use serde_json::json;

use crate::{config::Config, error::ApiError};

/// What every handler can reach.
pub struct AppState {
    pub config: Config,
}

pub type SharedState = Arc<AppState>;

/// Builds the data-plane router.
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz() -> impl IntoResponse {
    (StatusCode::OK, Json(json!({"status": "ready"})))
}
