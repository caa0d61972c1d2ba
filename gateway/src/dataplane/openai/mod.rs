//! The OpenAI-compatible endpoints: `GET /v1/models`, and the inference endpoints, which run
//! steps 5–12 of the pipeline (numbered as in `app` and docs/data-plane.md): content type, body size,
//! strict parsing (`validate`, the token reservation in `reserve`), authorization (`authz`),
//! the prefix-cache salt (`cache_salt`), quotas (`quota`), the guardrails' prompt screening
//! (`crate::guardrails`), then hand-off to the pool (`proxy`),
//! metering of the answer (`metered`), what the client sees of it (`answer`) and the guardrails'
//! output filter. Nothing reaches an upstream before
//! all of the checks passed. Neither the body nor the answer is ever logged.

mod json;
mod reserve;
pub mod validate;
pub mod wire;

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tracing::{debug, info};

use crate::{
    auth::Principal,
    dataplane::answer,
    dataplane::authz::{self, Permissions},
    dataplane::body_limit,
    dataplane::cache_salt,
    dataplane::metered,
    dataplane::proxy::{self, Outbound},
    dataplane::quota::Ask,
    dataplane::request_id::{InFlight, RequestId},
    dataplane::state::SharedState,
    error::ApiError,
    guardrails,
};
pub use validate::Endpoint;

type Result<T> = std::result::Result<T, ApiError>;

/// `GET /v1/models`: only the models the caller may use, as its tenant would be routed.
pub async fn models(State(state): State<SharedState>, principal: Principal) -> impl IntoResponse {
    let perms = Permissions::of(&state.config, &principal.roles);
    let data: Vec<_> = authz::visible_models(&state.config, &principal.tenant, &perms)
        .into_iter()
        .map(|(name, route)| {
            json!({"id": name, "object": "model", "created": 0, "owned_by": route.provider})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn chat_completions(State(state): State<SharedState>, req: Request) -> Result<Response> {
    handle(Endpoint::ChatCompletions, state, req).await
}

pub async fn completions(State(state): State<SharedState>, req: Request) -> Result<Response> {
    handle(Endpoint::Completions, state, req).await
}

pub async fn embeddings(State(state): State<SharedState>, req: Request) -> Result<Response> {
    handle(Endpoint::Embeddings, state, req).await
}

/// Steps 5–12 of the pipeline, in order (1–4 ran in the layers, see `app`). The principal's
/// tenant and roles come from the credential only (the bearer check put it in the request's
/// extensions; a request without one is refused); nothing in the body or the headers can
/// change them.
async fn handle(endpoint: Endpoint, state: SharedState, req: Request) -> Result<Response> {
    let (mut parts, body) = req.into_parts();
    // Taken, not cloned (as the `Principal` extractor would): nothing after needs it there.
    let principal = parts
        .extensions
        .remove::<Arc<Principal>>()
        .ok_or_else(|| ApiError::unauthorized("missing bearer credential"))?;
    // The request's id and model slot (step 1's), taken too: the id goes upstream.
    let in_flight = parts.extensions.remove::<InFlight>();
    // 5. content type.
    if !is_json(&parts.headers) {
        return Err(ApiError::unsupported_media_type());
    }
    // 6. body size while reading.
    let limit = state.config.server().max_body_bytes;
    let bytes = read_body(body, limit).await?;
    // 7. strict parse, the model's caps.
    let len = bytes.len();
    let valid = validate::validate_body(endpoint, bytes, &state.config)?;
    if let Some(f) = &in_flight {
        f.model.set(&valid.model);
    }
    debug!(model = %valid.model, stream = valid.stream, bytes = len, "request valid");
    // The system prompt the guardrails will put first counts like a caller's message: in the
    // model's `max_messages` and in the reservation.
    let mut valid = valid;
    let policy = guardrails::policy(&state, &principal, &valid.model);
    if let Some(len) = policy
        .as_ref()
        .and_then(|p| guardrails::operator_message_len(endpoint, p))
    {
        valid.count_system_message(len, &state.config)?;
    }
    // 8. authorize: permissions resolved now from the principal's current roles.
    let perms = Permissions::of(&state.config, &principal.roles);
    let route = authz::authorize(
        &state.config,
        &principal,
        &perms,
        &valid.model,
        valid.logprobs,
    )
    .inspect_err(|e| refused(&principal, &valid.model, e, "authorization denied"))?;
    // The pool's prefix-cache scope for this principal (the field is the gateway's alone).
    let salt = state.config.pools.get(&route.pool).and_then(|p| {
        cache_salt::salt(
            state.identity.pepper(),
            p.prefix_cache_isolation,
            &principal,
        )
    });
    let (model, stream, hide_usage) = (valid.model.clone(), valid.stream, valid.hide_usage);
    let ask = Ask {
        tokens: valid.reserve_tokens,
        stream,
    };
    let reserved = metered::Reserved {
        prompt: valid.prompt_tokens,
        total: valid.reserve_tokens,
    };
    // 9. quotas: charged only if every limit passes.
    let ticket = state
        .quotas
        .acquire(&state.config, &principal, ask)
        .await
        .inspect_err(|e| refused(&principal, &model, e, "quota denied"))?;
    // 9b. guardrails: the prompt screened, the operator's system prompt put in; a blocked
    // prompt is refunded like any refused attempt.
    let guard = match guardrails::screen(&state, &principal, endpoint, policy, &mut valid).await {
        Ok(guard) => guard,
        Err(e) => {
            ticket.refund();
            return Err(e);
        }
    };
    let body = valid.upstream_body(salt)?;
    let request_id = in_flight.map_or_else(RequestId::generate, |f| f.id);
    let out = Outbound {
        path: endpoint.path(),
        body,
        stream,
        request_id,
    };
    // 10. a healthy host of the pool authorization chose (a dedicated tenant's own pool only),
    // called with the pool's credential.
    let sent = std::time::Instant::now();
    let resp = proxy::forward(&state.pools, &state.upstreams, &route.pool, out).await;
    crate::metrics::gateway::METRICS.upstream_latency(&model, sent.elapsed());
    let has_length = answer::has_length(&resp);
    // 11. meter the answer: reconcile the reservation, release the slots when it ends, end
    // it if the credential is revoked meanwhile (and count its tokens, time its first byte).
    let timing = metered::Timing {
        model: model.clone(),
        sent,
    };
    let resp = metered::meter(
        resp,
        ticket,
        state.identity.clone(),
        principal,
        timing,
        reserved,
    );
    // 12. the answer as the client may see it: the public model name, and no usage event the
    // client did not ask for (metering read it above).
    let resp = answer::rewrite(resp, &model, hide_usage);
    // 13. the answer screened by the guardrails' output filter (secrets, PII, links, canary).
    let resp = guardrails::filter(resp, guard).await;
    // A non-streamed answer the upstream sent with a length leaves with one (after 11–13).
    Ok(if has_length {
        answer::with_length(resp).await
    } else {
        resp
    })
}

/// One line per refused request: who was refused and why, never what they sent.
fn refused(p: &Principal, model: &str, e: &ApiError, what: &str) {
    info!(
        user = %p.username,
        tenant = %p.tenant,
        key_id = p.key_id.as_deref().unwrap_or("-"),
        model,
        status = e.status.as_u16(),
        "{what}"
    );
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Err(e) if body_limit::timed_out(&*e) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "the request body did not arrive in time",
        )
        .with_code("request_timeout")),
        Err(_) => Err(ApiError::bad_request("the request body could not be read")),
    }
}
