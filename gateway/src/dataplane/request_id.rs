//! The request id: 128 random bits, made by the gateway for every request (a client-sent
//! `X-Request-Id` is not trusted, so ids stay unique and unforgeable in logs). It goes back on
//! every response, upstream with the request, and onto every log line written while the request
//! is worked on (`logging::InRequest`), including lines written while a stream is being relayed. The
//! request's access-log line (`logging::access`) names it and the host that answered.
//!
//! [`Layer`] is step 1 of the pipeline, outermost on the data plane's and the admin plane's
//! routers: a tower layer (no boxed future of its own), whose [`Logged`] future writes the
//! access-log line and the request metric when the answer is ready. It hands the rest of the
//! pipeline one extension, [`InFlight`]: the id and the slot the model is named in.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderName, HeaderValue, Method},
    response::Response,
};
use tower::Service;

use crate::{dataplane::proxy::ServedBy, logging, metrics::gateway::ModelSlot};

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

/// What step 1 puts in every request, as one extension (one insert, not one per field): the
/// request's id and the slot the inference handler names the model in.
#[derive(Clone)]
pub struct InFlight {
    pub id: RequestId,
    pub model: ModelSlot,
}

/// Step 1 as a tower layer: [`WithRequestId`] around the service below it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Layer;

impl<S> tower::Layer<S> for Layer {
    type Service = WithRequestId<S>;

    fn layer(&self, inner: S) -> WithRequestId<S> {
        WithRequestId { inner }
    }
}

/// The service [`Layer`] makes: gives the request its id, calls the rest of the pipeline in
/// the request's log scope, and finishes the answer ([`Logged`]).
#[derive(Clone, Debug)]
pub struct WithRequestId<S> {
    inner: S,
}

impl<S> Service<Request> for WithRequestId<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Logged<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let id = RequestId::generate();
        let model = ModelSlot::default();
        req.extensions_mut().insert(InFlight {
            id: id.clone(),
            model: model.clone(),
        });
        let done = Done {
            method: req.method().clone(),
            // The route pattern, never the raw path or query: those are client-chosen text.
            route: req.extensions().get::<MatchedPath>().cloned(),
            started: Instant::now(),
            model,
            id: id.clone(),
        };
        Logged {
            inner: logging::InRequest::make(id.0, || self.inner.call(req)),
            done: Some(done),
        }
    }
}

/// What the access-log line and the request metric need once the answer is ready.
struct Done {
    id: RequestId,
    method: Method,
    route: Option<MatchedPath>,
    model: ModelSlot,
    started: Instant,
}

impl Done {
    /// The metric, the `X-Request-Id` header, the access-log line.
    fn finish(self, resp: &mut Response) {
        let route = self
            .route
            .as_ref()
            .map_or("(no route)", MatchedPath::as_str);
        crate::metrics::gateway::METRICS.request(route, self.model.get(), resp.status().as_u16());
        resp.headers_mut()
            .insert(REQUEST_ID, self.id.header_value());
        logging::access(&logging::Access {
            request_id: self.id.as_str(),
            upstream: resp
                .extensions()
                .get::<ServedBy>()
                .map(|s| s.0.name.as_str()),
            method: self.method.as_str(),
            route,
            status: resp.status().as_u16(),
            ms: self.started.elapsed().as_millis() as u64,
        });
    }
}

pin_project_lite::pin_project! {
    /// The answer of the rest of the pipeline, polled in the request's log scope, finished
    /// ([`Done::finish`]) when it is ready.
    pub struct Logged<F> {
        #[pin]
        inner: logging::InRequest<F>,
        done: Option<Done>,
    }
}

impl<F> Future for Logged<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut resp) = ready!(this.inner.poll(cx));
        if let Some(done) = this.done.take() {
            done.finish(&mut resp);
        }
        Poll::Ready(Ok(resp))
    }
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
