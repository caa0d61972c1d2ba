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
use tracing::{debug, info};

use crate::{
    auth::Principal,
    dataplane::app::SharedState,
    dataplane::authz::{self, Permissions},
    dataplane::limits::{self, Ask},
    dataplane::proxy::{self, Outbound},
    dataplane::request_id::RequestId,
    error::ApiError,
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

/// Steps 4–9 of the pipeline, in order (steps 1–3 ran in the layers, see `app`): strict parse,
/// authorize (model, provider, tenant routing), quotas, route and call upstream, meter the
/// answer. The principal's tenant and roles come from the credential only; nothing in the body
/// or the headers can change them.
async fn handle(endpoint: Endpoint, State(state): State<SharedState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Some(principal) = parts.extensions.get::<Principal>().cloned() else {
        // Only reachable through a mis-wired route: fail closed.
        return ApiError::unauthorized("missing bearer credential").into_response();
    };
    if !is_json(&parts.headers) {
        return ApiError::unsupported_media_type().into_response();
    }
    let limit = state.config.server().max_body_bytes;
    let bytes = match read_body(body, limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let valid = match validate::validate(endpoint, &bytes, &state.config) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    debug!(model = %valid.model, stream = valid.stream, bytes = bytes.len(), "request valid");
    // 5. authorize: permissions resolved now from the principal's current roles.
    let perms = Permissions::of(&state.config, &principal.roles);
    let route = match authz::authorize(
        &state.config,
        &principal,
        &perms,
        &valid.model,
        valid.logprobs,
    ) {
        Ok(r) => r,
        Err(e) => {
            info!(
                user = %principal.username,
                tenant = %principal.tenant,
                key_id = principal.key_id.as_deref().unwrap_or("-"),
                model = %valid.model,
                "authorization denied"
            );
            return e.into_response();
        }
    };
    // 6. quotas: charged only if every limit passes.
    let ask = Ask {
        tokens: valid.reserve_tokens,
        stream: valid.stream,
    };
    let ticket = match state.quotas.acquire(&state.config, &principal, ask) {
        Ok(t) => t,
        Err(e) => {
            info!(
                user = %principal.username,
                tenant = %principal.tenant,
                key_id = principal.key_id.as_deref().unwrap_or("-"),
                status = e.status.as_u16(),
                "quota denied"
            );
            return e.into_response();
        }
    };
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
    // 8–9. route to the pool authorization chose (a dedicated tenant's own pool only), call.
    let resp = proxy::forward(&state.pools, &state.upstreams, &route.pool, out).await;
    // 11. meter the answer: reconcile the reservation, release the slots when it ends, end
    // it if the credential is revoked meanwhile.
    limits::meter(resp, ticket, state.identity.clone(), principal)
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
    let limit = state.config.server().max_body_bytes;
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
