//! Step 2 of the pipeline: a body announced (`Content-Length`) larger than
//! `server.max_body_bytes` is refused (413) before anything else runs. Bodies without a length
//! are capped while being read (step 6, `openai`). A tower [`Layer`], inside the request id's
//! (`request_id::Layer`), so a refused request still gets an id and an access-log line.
//!
//! The same step gives the body its deadline ([`Deadline`]): a client that sends a head and
//! then trickles its body cannot hold a connection and a request open. (The head's own
//! deadline is the server's, `daemon::worker::serve`.)

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::header,
    response::{IntoResponse, Response},
};
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;
use tower::Service;

use crate::error::ApiError;

/// Step 2 as a tower layer: [`BodyLimit`] around the service below it.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    limit: usize,
    timeout: Duration,
}

impl Layer {
    /// Refuses bodies announced larger than `limit` bytes; a body must have arrived `timeout`
    /// after the first wait for it.
    pub fn new(limit: usize, timeout: Duration) -> Self {
        Self { limit, timeout }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            limit: self.limit,
            timeout: self.timeout,
        }
    }
}

/// The service [`Layer`] makes.
#[derive(Clone, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    limit: usize,
    timeout: Duration,
}

impl<S> Service<Request> for BodyLimit<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Capped<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.limit as u64) {
            return Capped::Refused { limit: self.limit };
        }
        // A request without a body (a GET) has nothing to wait for.
        let timeout = self.timeout;
        let req = if http_body::Body::is_end_stream(req.body()) {
            req
        } else {
            req.map(|body| Body::new(Deadline::new(body, timeout)))
        };
        Capped::Passed {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer: the rest of the pipeline's, or the 413.
    #[project = CappedProj]
    pub enum Capped<F> {
        Passed { #[pin] inner: F },
        Refused { limit: usize },
    }
}

impl<F> Future for Capped<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CappedProj::Passed { inner } => inner.poll(cx),
            CappedProj::Refused { limit } => {
                Poll::Ready(Ok(ApiError::payload_too_large(*limit).into_response()))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that must arrive within its timeout of the first wait for it; after
    /// that, reading it fails with [`BodyTimedOut`]. A body already there when it is read (a
    /// small request's, in the same packets as its head) never starts a timer.
    pub struct Deadline {
        #[pin]
        inner: Body,
        timeout: Duration,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl Deadline {
    pub fn new(inner: Body, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: None,
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
        }
        match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut)))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that did not arrive in time ([`Deadline`]).
#[derive(Debug)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

/// Whether reading a body failed because its deadline passed (anywhere in `e`'s chain).
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(e) = at {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        at = e.source();
    }
    false
}
