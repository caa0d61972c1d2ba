//! The data plane, assembled in one place so its order reads top to bottom (see the pipeline
//! in the README): only documented routes exist, everything else is an OpenAI-shaped 404/405.
//!
//! Public routes: health, the token endpoint, revocation, JWKS. Everything under `protected`
//! passes the bearer check first (`auth::http::require_bearer`) and its handlers can take a
//! `Principal` argument.

use std::sync::Arc;

use axum::{
    Json, Router, middleware,
    response::IntoResponse,
    routing::{get, post},
};
use serde_json::json;

use crate::{
    auth::{Identity, Principal, http as auth_http},
    config::Config,
    error::ApiError,
    health, openai,
    proxy::Upstreams,
    request_id,
    route::Pools,
};

/// What every handler can reach.
pub struct AppState {
    pub config: Config,
    pub identity: Arc<Identity>,
    /// Live routing state of every pool (outstanding requests, health, ejection).
    pub pools: Pools,
    /// Every pool's upstream client and request settings.
    pub upstreams: Upstreams,
}

impl AppState {
    pub fn new(config: Config, identity: Arc<Identity>) -> anyhow::Result<Self> {
        let pools = Pools::from_config(&config);
        let upstreams = Upstreams::from_config(&config)?;
        Ok(Self {
            config,
            identity,
            pools,
            upstreams,
        })
    }
}

pub type SharedState = Arc<AppState>;

/// Builds the data-plane router. Layers run outside-in, so the pipeline reads:
/// 1. request id (span, `X-Request-Id`, access log) — outermost, so even a 404 carries one
/// 2. body size limit on the announced length (413)
/// 3. routing: only the routes below exist (404/405 otherwise)
/// 4. `protected` routes: bearer authentication (401) before any handler runs
/// 5. inference handlers (`openai`): content type (415), body read under the cap (413),
///    strict parse and caps (400/404), then `proxy`: a healthy host of the model's pool,
///    the upstream call with the pool's credential, the answer relayed as it streams
pub fn router(state: SharedState) -> Router {
    let identity = state.identity.clone();
    let auth_routes = Router::new()
        .route("/v1/auth/token", post(auth_http::token))
        .route("/v1/auth/revoke", post(auth_http::revoke))
        .route("/.well-known/jwks.json", get(auth_http::jwks))
        .with_state(identity.clone());
    // Every route here requires a valid bearer (API key or access token).
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route_layer(middleware::from_fn_with_state(
            identity,
            auth_http::require_bearer,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(protected)
        .with_state(state.clone())
        .merge(auth_routes)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state, openai::body_limit))
        .layer(middleware::from_fn(request_id::layer))
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
