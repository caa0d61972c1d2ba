//! Dispatch of a validated request to its pool: pick a host (`route`), send with the pool's
//! credential and timeouts, relay the answer as it streams (`body`), retry on another host only
//! when nothing reached the upstream.
//!
//! Failure posture, per attempt:
//! - connect refused / connect timeout / TLS handshake failure: nothing was sent, so the next
//!   host is tried (up to `max_attempts`). A kept connection the upstream closed before the
//!   request was written is retried on a fresh one to the same host (`client`); a fresh one
//!   closed before the request was written counts as nothing sent.
//! - any other error once the request may have been written: 502, never retried (a generation
//!   may have started; a retry could run it twice).
//! - no response head within `first_byte_timeout_ms`: 504, not retried, the attempt is dropped
//!   (which closes the connection, so the upstream sees the request cancelled).
//! - upstream 5xx: 502 without the upstream's words (they may carry internals); 4xx keeps its
//!   status but not its words either (`refusal`).

mod body;
pub mod client;
pub mod headers;
pub mod health;
mod refusal;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{HeaderValue, Method, Request, Uri, uri::PathAndQuery},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http_body_util::Full;
use tracing::{debug, warn};

use crate::{
    config::Config,
    dataplane::request_id::RequestId,
    dataplane::route::{self, Pools},
    error::ApiError,
};

pub use body::ProxyBody;

/// One pool's way out: its client and the settings of its requests.
pub struct Upstream {
    client: client::Clients,
    credential: Option<HeaderValue>,
    first_byte: Duration,
    idle: Duration,
    max_attempts: u32,
    health_path: PathAndQuery,
    health_interval: Duration,
    health_timeout: Duration,
}

/// Every pool's upstream, by pool name.
pub struct Upstreams(BTreeMap<String, Arc<Upstream>>);

impl Upstreams {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let mut map = BTreeMap::new();
        for pool in config.pools.values() {
            let credential = pool
                .credential
                .as_ref()
                .map(|c| headers::bearer(c.expose()))
                .transpose()?;
            let up = Upstream {
                client: client::build(pool)?,
                credential,
                first_byte: pool.timeouts.first_byte,
                idle: pool.timeouts.idle,
                max_attempts: pool.max_attempts,
                health_path: pool.health.path.parse().map_err(|e| {
                    anyhow::anyhow!(
                        "pools.{}.health.path: `{}`: {e}",
                        pool.name,
                        pool.health.path
                    )
                })?,
                health_interval: pool.health.interval,
                health_timeout: pool.health.timeout,
            };
            map.insert(pool.name.clone(), Arc::new(up));
        }
        Ok(Self(map))
    }

    pub fn get(&self, pool: &str) -> Option<&Arc<Upstream>> {
        self.0.get(pool)
    }
}

/// What goes upstream: the path of the OpenAI endpoint and the rewritten body.
pub struct Outbound {
    pub path: &'static str,
    pub body: Bytes,
    pub stream: bool,
    pub request_id: RequestId,
}

impl Upstream {
    /// The request for `out` (origin-form: the client names the host).
    fn request(&self, out: &Outbound) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(out.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from(PathAndQuery::from_static(out.path));
        *req.headers_mut() =
            headers::upstream(out.stream, &out.request_id, self.credential.as_ref());
        req
    }
}

/// Sends `out` to a host of `pool` and relays the answer.
pub async fn forward(pools: &Pools, upstreams: &Upstreams, pool: &str, out: Outbound) -> Response {
    let (Some(pool), Some(upstream)) = (pools.get(pool), upstreams.get(pool)) else {
        return ApiError::internal().into_response();
    };
    match dispatch(pool, upstream, &out).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(
    pool: &route::Pool,
    upstream: &Upstream,
    out: &Outbound,
) -> Result<Response, ApiError> {
    let mut tried = Vec::new();
    for attempt in 1..=upstream.max_attempts {
        let Some(mut lease) = pool.pick(&tried) else {
            break;
        };
        let host = lease.host().clone();
        tried.push(host.index);
        let req = upstream.request(out);
        let answer = upstream.client.send(host.index, req);
        match tokio::time::timeout(upstream.first_byte, answer).await {
            Err(_) => {
                lease.failure();
                warn!(host = %host.name, attempt, "upstream sent no response in time");
                return Err(ApiError::gateway_timeout(
                    "the inference server did not answer in time",
                ));
            }
            Ok(Err(e @ client::Error::NotSent(_))) => {
                lease.failure();
                // The whole chain: the TLS alert (an unknown CA, a certificate required or
                // expired) sits below the connector's error.
                warn!(pool = %pool.name, host = %host.name, attempt, error = %error_chain(&e),
                    "upstream connect failed; nothing sent");
            }
            Ok(Err(e)) => {
                lease.failure();
                warn!(pool = %pool.name, host = %host.name, attempt, error = %error_chain(&e),
                    "upstream request failed after sending");
                return Err(ApiError::bad_gateway(
                    "the inference server failed to answer",
                ));
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                debug!(host = %host.name, attempt, status = status.as_u16(), "upstream answered");
                if status.is_server_error() {
                    lease.failure();
                    return Err(ApiError::bad_gateway(format!(
                        "the inference server failed (status {})",
                        status.as_u16()
                    )));
                }
                let (parts, incoming) = resp.into_parts();
                if status.is_client_error() {
                    // The host did its job: refusing is an answer, not a failure.
                    lease.success();
                    let e = refusal::refusal(status, incoming, upstream.idle, &host.name).await;
                    return Err(e);
                }
                let sse = headers::is_event_stream(&parts.headers);
                let body = ProxyBody::new(incoming, sse, upstream.idle, lease);
                let mut resp = Response::new(Body::new(body));
                *resp.status_mut() = status;
                *resp.headers_mut() = headers::downstream(&parts.headers, sse);
                resp.extensions_mut().insert(ServedBy(host));
                return Ok(resp);
            }
        }
    }
    if tried.is_empty() {
        Err(ApiError::unavailable(
            "no healthy inference host for this model",
        ))
    } else {
        Err(ApiError::bad_gateway("no inference host could be reached"))
    }
}

/// On an answer relayed from an inference host: which one (for the access log).
#[derive(Clone)]
pub struct ServedBy(pub Arc<route::Host>);

/// An error and its sources, `: `-joined.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
