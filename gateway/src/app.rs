//! The data plane, assembled in one place so its order reads top to bottom (see the pipeline
//! in the README): only documented routes exist, everything else is an OpenAI-shaped 404/405.
//!
//! Public routes: health, the token endpoint, revocation, JWKS. Everything under `protected`
//! passes the bearer check first (`auth::http::require_bearer`) and its handlers can take a
//! `Principal` argument.

use std::sync::Arc;

use axum::{
    Json, Router,
    http::StatusCode,
    middleware,
    response::IntoResponse,
    routing::{get, post},
};
use serde_json::json;

use crate::{
    auth::{Identity, Principal, http as auth_http},
    config::Config,
    error::ApiError,
};

/// What every handler can reach.
pub struct AppState {
    pub config: Config,
    pub identity: Arc<Identity>,
}

pub type SharedState = Arc<AppState>;

/// Builds the data-plane router.
pub fn router(state: SharedState) -> Router {
    let identity = state.identity.clone();
    let auth_routes = Router::new()
        .route("/v1/auth/token", post(auth_http::token))
        .route("/v1/auth/revoke", post(auth_http::revoke))
        .route("/.well-known/jwks.json", get(auth_http::jwks))
        .with_state(identity.clone());
    // Every route here requires a valid bearer (API key or access token).
    let protected =
        Router::new()
            .route("/v1/models", get(models))
            .route_layer(middleware::from_fn_with_state(
                identity,
                auth_http::require_bearer,
            ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state)
        .merge(auth_routes)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz() -> impl IntoResponse {
    (StatusCode::OK, Json(json!({"status": "ready"})))
}

/// `GET /v1/models`: the configured models. (Per-caller filtering comes with authorization.)
async fn models(
    axum::extract::State(state): axum::extract::State<SharedState>,
    _principal: Principal,
) -> impl IntoResponse {
    let data: Vec<_> = state
        .config
        .raw
        .models
        .iter()
        .map(|(name, m)| {
            let owned_by = state
                .config
                .pools
                .get(&m.pool)
                .map_or("moat", |p| p.provider.as_str());
            json!({"id": name, "object": "model", "created": 0, "owned_by": owned_by})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
