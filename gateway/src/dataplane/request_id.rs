//! The request id: 128 random bits, made by the gateway for every request (a client-sent
//! `X-Request-Id` is not trusted, so ids stay unique and unforgeable in logs). It goes back on
//! every response, upstream with the request, and onto every log line written while the request
//! is worked on (`logging::InRequest`), including lines written while a stream is being relayed. The
//! request's access-log line (`logging::access`) names it and the host that answered.

use std::{future::Future, sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};

use crate::{dataplane::proxy::ServedBy, logging};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Debug)]
pub struct RequestId(Arc<str>);

impl RequestId {
    pub fn generate() -> Self {
        let raw = random_16();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = [0u8; 4 + 32];
        id[..4].copy_from_slice(b"req_");
        for (i, b) in raw.iter().enumerate() {
            id[4 + 2 * i] = HEX[usize::from(b >> 4)];
            id[5 + 2 * i] = HEX[usize::from(b & 0xf)];
        }
        Self(std::str::from_utf8(&id).expect("ascii").into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.0).expect("hex is a valid header value")
    }
}

/// 16 bytes from the OS CSPRNG, drawn 4 KiB at a time per thread: one `getrandom(2)` per
/// 256 requests instead of one per request. (The worker is started by `exec`, never forked
/// after drawing, so no two processes share a buffer.)
fn random_16() -> [u8; 16] {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<([u8; 4096], usize)> = const { RefCell::new(([0; 4096], 4096)) };
    }
    POOL.with_borrow_mut(|(bytes, used)| {
        if *used == bytes.len() {
            // The OS CSPRNG does not fail on Linux once booted; were it to, the ids would
            // repeat but never be mistaken for a secret.
            let _ = getrandom::fill(bytes);
            *used = 0;
        }
        let mut raw = [0u8; 16];
        raw.copy_from_slice(&bytes[*used..*used + 16]);
        // Each id's bytes are used once.
        bytes[*used..*used + 16].fill(0);
        *used += 16;
        raw
    })
}

/// [`around`] as a middleware of its own (the admin plane's router).
pub async fn layer(req: Request, next: Next) -> Response {
    around(req, |req| next.run(req)).await
}

/// Outermost step of the pipeline, around `inner` (the rest of it): id, span, response header,
/// one access-log line.
pub async fn around<F, Fut>(mut req: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let id = RequestId::generate();
    req.extensions_mut().insert(id.clone());
    let method = req.method().clone();
    // The route pattern, never the raw path or query: those are client-chosen text.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("(no route)", MatchedPath::as_str);
    let started = Instant::now();
    let model = crate::metrics::gateway::ModelSlot::default();
    req.extensions_mut().insert(model.clone());
    let mut resp = logging::InRequest::new(id.0.clone(), inner(req)).await;
    crate::metrics::gateway::METRICS.request(route, model.get(), resp.status().as_u16());
    resp.headers_mut().insert(REQUEST_ID, id.header_value());
    logging::access(&logging::Access {
        request_id: id.as_str(),
        upstream: resp
            .extensions()
            .get::<ServedBy>()
            .map(|s| s.0.name.as_str()),
        method: method.as_str(),
        route,
        status: resp.status().as_u16(),
        ms: started.elapsed().as_millis() as u64,
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::RequestId;

    #[test]
    fn ids_are_unique_and_well_formed() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.as_str().len(), 4 + 32);
        assert!(a.as_str()[4..].bytes().all(|c| c.is_ascii_hexdigit()));
        // Across several refills of the thread's pool of random bytes.
        let ids: std::collections::HashSet<_> = (0..1_000)
            .map(|_| RequestId::generate().as_str().to_owned())
            .collect();
        assert_eq!(ids.len(), 1_000);
    }
}
