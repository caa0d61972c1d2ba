//! Step 2 of the pipeline: a body announced (`Content-Length`) larger than
//! `server.max_body_bytes` is refused (413) before anything else runs. Bodies without a length
//! are capped while being read (step 6, `openai`). A tower [`Layer`], inside the request id's
//! (`request_id::Layer`), so a refused request still gets an id and an access-log line.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    extract::Request,
    http::header,
    response::{IntoResponse, Response},
};
use tower::Service;

use crate::error::ApiError;

/// Step 2 as a tower layer: [`BodyLimit`] around the service below it.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    limit: usize,
}

impl Layer {
    /// Refuses bodies announced larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// The service [`Layer`] makes.
#[derive(Clone, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    limit: usize,
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
