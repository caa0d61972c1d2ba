//! The data-plane router and the layers around it, assembled in one place so the pipeline
//! reads top to bottom. Only documented routes exist; everything else is an OpenAI-shaped
//! 404/405.
//!
//! Public routes: health, the token endpoint, revocation, JWKS. Everything under `protected`
//! passes the bearer check first (`auth::http::BearerLayer`) and its handlers can take a
//! `Principal` argument.
//!
//! The pipeline, numbered as in docs/data-plane.md ("What is checked before anything goes upstream"):
//! 1. request id: log scope, `X-Request-Id`, access log, request metric (`request_id`);
//! 2. announced body size (413) and the body's deadline (408), `body_limit`;
//! 3. route (404) and method (405);
//! 4. bearer (401) on `protected` routes; the principal (tenant and roles from the credential,
//!    through the identity cache) rides along;
//! 5. content type (415);
//! 6. body size while reading (413);
//! 7. strict parse and the model's caps (400; an unknown model 404), `openai::validate`;
//! 8. authorization (403), `authz`;
//! 9. quotas (429), `quota`; then the guardrails (step 9b): the prompt screened (400
//!    `prompt_injection_detected`), the operator's system prompt and canary put in,
//!    `crate::guardrails`;
//! 10. a healthy host of the pool authorization chose, called (`route`, `proxy`);
//! 11. the answer metered as it is relayed (`metered`);
//! 12. the answer as the client may see it: public model name, no usage it did not ask for
//!     (`answer`);
//! 13. the answer screened by the guardrails' output filter (redacted or cut).
//!
//! Steps 1–2 are the outer layer (`request_id::Layer` around `body_limit::Layer`, applied as
//! one layer), 3–4 the routing and its `route_layer` (`auth::http::BearerLayer`), 5–13 the
//! inference handlers (`openai::handle`). The layers are hand-written tower services, so they
//! add no boxed future or cloned inner service per request as `axum::middleware::from_fn`
//! would (the bearer check boxes one, and clones its route, only for a credential it must
//! await the store for: not an API key in the key cache). Axum matches
//! the route before any layer runs (so the access log can name the route pattern), but a
//! 404/405 is answered by the fallbacks, inside steps 1 and 2: even a request to no route gets
//! an id and the body cap.

use std::time::Duration;

use axum::{
    Router,
    routing::{get, post},
};

use crate::{
    auth::http as auth_http,
    dataplane::{body_limit, health, openai, request_id, state::SharedState},
    error::ApiError,
};

/// Builds the data-plane router (the steps are those of the module docs).
pub fn router(state: SharedState) -> Router {
    let identity = state.identity.clone();
    let auth_routes = Router::new()
        .route("/v1/auth/token", post(auth_http::token))
        .route("/v1/auth/revoke", post(auth_http::revoke))
        .route("/.well-known/jwks.json", get(auth_http::jwks))
        .with_state(identity.clone());
    // 4. Every route here requires a valid bearer (API key or access token); `route_layer`, so
    // a wrong method is still a 405, not a 401.
    let protected = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route_layer(auth_http::BearerLayer::new(identity));
    // 1. Outermost, so even a 404 or a 413 carries an id; 2. then a body announced larger than
    // the cap is refused before anything else runs. One `layer` call: each wraps every route
    // in one more boxed service of axum's.
    let front = (
        request_id::Layer,
        body_limit::Layer::new(
            state.config.server().max_body_bytes,
            Duration::from_millis(state.config.server().body_timeout_ms),
        ),
    );
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(protected)
        .with_state(state)
        .merge(auth_routes)
        // 3.
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        // 1–2, around every route and both fallbacks.
        .layer(front)
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use std::sync::Arc;

    use tower::ServiceExt;

    use super::*;
    use crate::{auth::Identity, config::Config, dataplane::state::AppState};

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
