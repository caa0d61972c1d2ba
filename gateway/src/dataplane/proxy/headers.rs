//! Which headers cross the gateway, in each direction. Both directions are allowlists, so
//! hop-by-hop headers (`Connection`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`, `TE`, …), the
//! client's `Authorization`, cookies, `X-Forwarded-*` and any internal header never pass:
//! nothing is copied that is not named here.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::dataplane::request_id::{REQUEST_ID, RequestId};

/// The headers of a request to an upstream: built from scratch, never copied from the client.
/// The pool's own credential is the only `Authorization` that goes upstream.
pub fn upstream(
    stream: bool,
    request_id: &RequestId,
    credential: Option<&HeaderValue>,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(6);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::ACCEPT,
        HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    // Identity only: a compressed body could not be screened or relayed chunk by chunk.
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("moat/", env!("CARGO_PKG_VERSION"))),
    );
    h.insert(REQUEST_ID, request_id.header_value());
    if let Some(c) = credential {
        h.insert(header::AUTHORIZATION, c.clone());
    }
    h
}

/// Upstream response headers that reach the client.
const DOWNSTREAM_ALLOW: &[HeaderName] = &[header::CONTENT_TYPE, header::CACHE_CONTROL];

/// The headers of the client's response, taken from the upstream's by the allowlist. An event
/// stream is marked uncacheable and unbuffered for any proxy in front of moat.
pub fn downstream(upstream: &HeaderMap, event_stream: bool) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4);
    for name in DOWNSTREAM_ALLOW {
        if let Some(v) = upstream.get(name) {
            h.insert(name.clone(), v.clone());
        }
    }
    if event_stream {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
    }
    h
}

/// Whether a response is a server-sent event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("text/event-stream")
        })
}

/// `Authorization: Bearer <credential>`, marked sensitive so it is never printed.
pub fn bearer(credential: &str) -> anyhow::Result<HeaderValue> {
    let mut v = HeaderValue::try_from(format!("Bearer {credential}"))
        .map_err(|_| anyhow::anyhow!("the upstream credential is not a valid header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowlisted_headers_come_back() {
        let mut up = HeaderMap::new();
        up.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        up.insert(header::SET_COOKIE, "a=b".parse().unwrap());
        up.insert(header::CONNECTION, "close".parse().unwrap());
        up.insert(header::SERVER, "uvicorn".parse().unwrap());
        up.insert("x-internal-host", "gpu-7".parse().unwrap());
        let down = downstream(&up, false);
        assert_eq!(down.len(), 1);
        assert_eq!(down[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn event_stream_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        assert!(is_event_stream(&h));
        let down = downstream(&h, true);
        assert_eq!(down[header::CACHE_CONTROL], "no-cache");
    }
}
