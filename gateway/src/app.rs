//! The data plane, assembled in one place so its order reads top to bottom (see the pipeline
//! in the README): only documented routes exist, everything else is an OpenAI-shaped 404/405.

use std::sync::Arc;

use axum::{
    Router, middleware,
    routing::{get, post},
};

use crate::{
    config::Config, error::ApiError, health, openai, proxy::Upstreams, request_id, route::Pools,
};

/// What every handler can reach.
pub struct AppState {
    pub config: Config,
    /// Live routing state of every pool (outstanding requests, health, ejection).
    pub pools: Pools,
    /// Every pool's upstream client and request settings.
    pub upstreams: Upstreams,
}

impl AppState {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let pools = Pools::from_config(&config);
        let upstreams = Upstreams::from_config(&config)?;
        Ok(Self {
            config,
            pools,
            upstreams,
        })
    }
}

pub type SharedState = Arc<AppState>;

/// Builds the data-plane router. Layers run outside-in, so read the pipeline bottom-up in the
/// `.layer` calls and top-down in this list:
/// 1. request id (span, `X-Request-Id`, access log) — outermost, so even a 404 carries one
/// 2. body size limit on the announced length (413)
/// 3. routing: only the routes below exist (404/405 otherwise)
/// 4. inference routes: authentication goes here, in front of them, as a layer on `inference`
/// 5. handler: content type (415), body read with the cap (413), strict parse (400/404),
///    then `proxy`: route to a healthy host, upstream call, streamed relay
pub fn router(state: SharedState) -> Router {
    let public = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz));
    let inference = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings));
    Router::new()
        .merge(public)
        .merge(inference)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            openai::body_limit,
        ))
        .layer(middleware::from_fn(request_id::layer))
        .with_state(state)
}
