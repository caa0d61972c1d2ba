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
    dataplane::authz,
    dataplane::health,
    dataplane::limits::Quotas,
    dataplane::openai,
    dataplane::proxy::Upstreams,
    dataplane::request_id,
    dataplane::route::Pools,
    error::ApiError,
};

/// What every handler can reach.
pub struct AppState {
    pub config: Config,
    pub identity: Arc<Identity>,
    /// Live routing state of every pool (outstanding requests, health, ejection).
    pub pools: Pools,
    /// Every pool's upstream client and request settings.
    pub upstreams: Upstreams,
    /// Quota counters: shared across reloads (owned by the worker's `Shared`).
    pub quotas: Arc<Quotas>,
}

impl AppState {
    pub fn new(
        config: Config,
        identity: Arc<Identity>,
        quotas: Arc<Quotas>,
    ) -> anyhow::Result<Self> {
        let pools = Pools::from_config(&config);
        let upstreams = Upstreams::from_config(&config)?;
        Ok(Self {
            config,
            identity,
            pools,
            upstreams,
            quotas,
        })
    }
}

pub type SharedState = Arc<AppState>;

/// Builds the data-plane router. Layers run outside-in, so the pipeline reads:
/// 1. request id (span, `X-Request-Id`, access log) — outermost, so even a 404 carries one
/// 2. body size limit on the announced length (413)
/// 3. routing: only the routes below exist (404/405 otherwise)
/// 4. `protected` routes: bearer authentication (401) before any handler runs; the principal
///    (tenant and roles from the credential, through the identity cache) rides along
/// 5. inference handlers (`openai::handle`, in this order): content type (415), body read
///    under the cap (413), strict parse and caps (400/404); authorize (`authz`: model and
///    provider permissions, `logprobs`, the tenant's routing — 403); quotas (`limits`: 429
///    with `Retry-After`); then `proxy`: a healthy host of the pool authorization chose, the
///    upstream call with the pool's credential, the answer relayed as it streams and metered
///    (`limits::Metered`: usage reconciled, slots released, ended on revocation)
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

/// `GET /v1/models`: only the models the caller may use, as its tenant would be routed.
async fn models(
    axum::extract::State(state): axum::extract::State<SharedState>,
    principal: Principal,
) -> impl IntoResponse {
    let perms = authz::Permissions::of(&state.config, &principal.roles);
    let data: Vec<_> = authz::visible_models(&state.config, &principal.tenant, &perms)
        .into_iter()
        .map(|(name, route)| {
            json!({"id": name, "object": "model", "created": 0, "owned_by": route.provider})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;

    /// The order of the checks, as a client sees it: the body cap (413) before the route
    /// (404/405) and the bearer (401), the bearer before the content type (415).
    #[tokio::test]
    async fn checks_answer_in_pipeline_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_str(
            &dir.path().join("moat.toml"),
            &format!(
                "[server]\ndata_dir = \"{}\"\nmax_body_bytes = 16\n\
                 [pools.p]\nhosts = [\"127.0.0.1:1\"]\n[models.m]\npool = \"p\"\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let identity = Identity::open(&config).unwrap();
        let state = AppState::new(config, identity, Arc::default()).unwrap();
        let app = router(Arc::new(state));
        let send =
            |method: &'static str, path: &'static str, ctype: &'static str, body: &'static str| {
                let req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header("content-type", ctype)
                    .header("content-length", body.len())
                    .body(Body::from(body))
                    .unwrap();
                let app = app.clone();
                async move {
                    let resp = app.oneshot(req).await.unwrap();
                    assert!(resp.headers().contains_key("x-request-id"), "{path}");
                    let status = resp.status().as_u16();
                    let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await;
                    let body: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
                    if status != 200 {
                        assert!(body["error"]["message"].is_string(), "{path}: {body}");
                    }
                    status
                }
            };
        let big = "{\"model\": \"m\", \"messages\": []}";
        let json = "application/json";
        assert_eq!(send("POST", "/v1/chat/completions", json, big).await, 413);
        assert_eq!(send("POST", "/v1/nope", json, big).await, 413);
        assert_eq!(send("GET", "/v1/chat/completions", json, big).await, 413);
        assert_eq!(send("GET", "/v1/chat/completions", json, "").await, 405);
        assert_eq!(send("POST", "/v1/nope", json, "{}").await, 404);
        assert_eq!(send("POST", "/v1/chat/completions", json, "{}").await, 401);
        assert_eq!(
            send("POST", "/v1/chat/completions", "text/plain", "{}").await,
            401
        );
        assert_eq!(send("GET", "/healthz", json, "").await, 200);
    }
}
