//! The OpenAI-compatible inference endpoints: content type, body size, strict parsing
//! (`validate`), then hand-off to the pool (`proxy`). Nothing reaches an upstream before all
//! of that passed. Neither the body nor the answer is ever logged.

mod json;
pub mod validate;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::debug;

use crate::{
    app::SharedState,
    error::ApiError,
    proxy::{self, Outbound},
    request_id::RequestId,
};
pub use validate::Endpoint;

pub async fn chat_completions(state: State<SharedState>, req: Request) -> Response {
    handle(Endpoint::ChatCompletions, state, req).await
}

pub async fn completions(state: State<SharedState>, req: Request) -> Response {
    handle(Endpoint::Completions, state, req).await
}

pub async fn embeddings(state: State<SharedState>, req: Request) -> Response {
    handle(Endpoint::Embeddings, state, req).await
}

async fn handle(endpoint: Endpoint, State(state): State<SharedState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if !is_json(&parts.headers) {
        return ApiError::unsupported_media_type().into_response();
    }
    let limit = state.config.raw.server.max_body_bytes;
    let bytes = match read_body(body, limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let valid = match validate::validate(endpoint, &bytes, &state.config) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    debug!(model = %valid.model, stream = valid.stream, bytes = bytes.len(), "request valid");
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(RequestId::generate);
    let out = Outbound {
        path: endpoint.path(),
        body: valid.body,
        stream: valid.stream,
        request_id,
    };
    proxy::forward(&state.pools, &state.upstreams, &valid.pool, out).await
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Err(_) => Err(ApiError::bad_request("the request body could not be read")),
    }
}

/// Step 1 of the pipeline: a body announced larger than the cap is refused before anything
/// else runs (bodies without a length are capped while being read, in the handler).
pub async fn body_limit(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let limit = state.config.raw.server.max_body_bytes;
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return ApiError::payload_too_large(limit).into_response();
    }
    next.run(req).await
}
