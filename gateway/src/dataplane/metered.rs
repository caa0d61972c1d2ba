//! The metering of an answer on its way to the client ([`Metered`]): it reconciles the
//! request's token reservation with the usage the upstream reports, holds the request's
//! concurrency slots (its quota [`Ticket`]) until the answer ends, and ends the answer when the
//! principal's credential is revoked meanwhile. Nothing it reads is logged.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, response::Response};
use bytes::{Bytes, BytesMut};
use http_body::Frame;

use crate::{
    auth::{Identity, Principal},
    dataplane::quota::Ticket,
    error::ApiError,
};

/// How often an open answer checks whether its credential was revoked.
const REVOCATION_CHECK: Duration = Duration::from_millis(100);
/// Most of a non-streamed answer kept to read its `usage` from.
const USAGE_SCAN_LIMIT: usize = 4 << 20;

/// Wraps an answer: refunds a failed attempt at once; otherwise meters the body (see
/// [`Metered`]).
pub fn meter(
    resp: Response,
    ticket: Ticket,
    identity: Arc<Identity>,
    principal: Principal,
    metrics: Timing,
) -> Response {
    if !resp.status().is_success() {
        ticket.refund();
        return resp;
    }
    let sse = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let (parts, body) = resp.into_parts();
    let generation = identity.generation();
    let metered = Metered {
        inner: body,
        ticket: Some(ticket),
        sse,
        scan: BytesMut::new(),
        usage: None,
        identity,
        principal,
        generation,
        check: None,
        // Only streams can stay open long enough to need a clock; a JSON answer checks the
        // generation whenever it moves.
        tick: sse.then(|| {
            tokio::time::interval_at(
                tokio::time::Instant::now() + REVOCATION_CHECK,
                REVOCATION_CHECK,
            )
        }),
        done: false,
        timing: Some(metrics),
        first_byte: false,
        tokens: None,
    };
    Response::from_parts(parts, Body::new(metered))
}

/// For the metrics: the request's model and when it went upstream (time to first token).
pub struct Timing {
    pub model: String,
    pub sent: std::time::Instant,
}

type Check = Pin<Box<dyn Future<Output = bool> + Send>>;

/// An answer on its way to the client: reads the `usage` it reports (the last SSE event that
/// carries one, or the JSON body) to reconcile the ticket when it ends, holds the ticket's
/// slots until then, and ends it early if the principal's credential is revoked meanwhile.
/// Nothing it reads is logged.
pub struct Metered {
    inner: Body,
    ticket: Option<Ticket>,
    sse: bool,
    /// SSE: the current partial line; JSON: the body so far (capped).
    scan: BytesMut,
    usage: Option<u64>,
    identity: Arc<Identity>,
    principal: Principal,
    generation: u64,
    check: Option<Check>,
    tick: Option<tokio::time::Interval>,
    done: bool,
    /// The model and send time, for time to first token and the token counts.
    timing: Option<Timing>,
    first_byte: bool,
    /// Prompt and completion tokens, as the usage reports them.
    tokens: Option<(u64, u64)>,
}

impl Metered {
    fn observe(&mut self, chunk: &Bytes) {
        if let Some(t) = &self.timing
            && !chunk.is_empty()
            && !self.first_byte
        {
            crate::metrics::gateway::METRICS.time_to_first_token(&t.model, t.sent.elapsed());
            self.first_byte = true;
        }
        if !self.sse {
            if self.scan.len() + chunk.len() <= USAGE_SCAN_LIMIT {
                self.scan.extend_from_slice(chunk);
            }
            return;
        }
        self.scan.extend_from_slice(chunk);
        while let Some(i) = self.scan.iter().position(|b| *b == b'\n') {
            let line = self.scan.split_to(i + 1);
            if let Some(data) = line.strip_prefix(b"data:")
                && mentions_usage(data)
                && let Some((total, io)) = usage(data)
            {
                self.usage = Some(total);
                self.tokens = Some(io);
            }
        }
        // A line longer than the scan limit carries no usage worth keeping.
        if self.scan.len() > USAGE_SCAN_LIMIT {
            self.scan.clear();
        }
    }

    fn finish(&mut self) {
        if !self.sse
            && self.usage.is_none()
            && let Some((total, io)) = usage(&self.scan)
        {
            self.usage = Some(total);
            self.tokens = Some(io);
        }
        if let (Some(t), Some((input, output))) = (&self.timing, self.tokens)
            && self.usage.is_some()
        {
            crate::metrics::gateway::METRICS.tokens(&t.model, input, output);
        }
        if let (Some(t), Some(u)) = (self.ticket.take(), self.usage) {
            t.reconcile(u);
        }
        // Without a reported usage the reservation stands (the conservative charge).
    }

    /// Whether the credential was found revoked (polls the pending check).
    fn revoked(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(t) = &mut self.tick {
            while t.poll_tick(cx).is_ready() {}
        }
        if self.check.is_none() {
            let g = self.identity.generation();
            if g == self.generation {
                return false;
            }
            self.generation = g;
            let identity = self.identity.clone();
            let p = self.principal.clone();
            self.check = Some(Box::pin(async move { identity.still_valid(&p).await }));
        }
        match self.check.as_mut().map(|c| c.as_mut().poll(cx)) {
            Some(Poll::Ready(valid)) => {
                self.check = None;
                !valid
            }
            _ => false,
        }
    }
}

/// Whether an SSE event mentions `"usage"`: a cheap test, so that only the (usually last) event
/// carrying usage is parsed as JSON.
fn mentions_usage(data: &[u8]) -> bool {
    data.windows(7).any(|w| w == b"\"usage\"")
}

/// The `usage` of an answer or event: only that member is kept, the rest of the document is
/// skipped without being built (an answer is read once, not parsed into a tree).
#[derive(serde::Deserialize)]
struct Report {
    #[serde(default)]
    usage: Option<Usage>,
}

/// Lenient like a tree lookup: a count that is not a whole number reads as absent.
#[derive(serde::Deserialize)]
struct Usage {
    #[serde(default)]
    total_tokens: serde_json::Value,
    #[serde(default)]
    prompt_tokens: serde_json::Value,
    #[serde(default)]
    completion_tokens: serde_json::Value,
}

/// `usage.total_tokens`, and `usage.prompt_tokens` and `usage.completion_tokens` (0 when
/// absent, as for embeddings).
fn usage(json: &[u8]) -> Option<(u64, (u64, u64))> {
    let r: Report = serde_json::from_slice(json.trim_ascii()).ok()?;
    let u = r.usage?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Some((
        u.total_tokens.as_u64()?,
        (n(&u.prompt_tokens), n(&u.completion_tokens)),
    ))
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.revoked(cx) {
            this.done = true;
            tracing::info!(
                key_id = this.principal.key_id.as_deref().unwrap_or("-"),
                user = %this.principal.username,
                "credential revoked: open answer ended"
            );
            // The charge stands (a generation was running); the slots are freed now.
            this.ticket = None;
            if this.sse {
                let e = ApiError::unauthorized("the credential was revoked");
                let event = format!("data: {}\n\n", e.body());
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))));
            }
            return Poll::Ready(Some(Err(axum::Error::new("credential revoked"))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.observe(d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // Broken mid-answer: a generation ran, so the reservation stands.
                this.ticket = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish();
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::{mentions_usage, usage};

    #[test]
    fn usage_is_read_only_from_what_reports_it() {
        let event = br#" {"choices":[],"usage":{"prompt_tokens":2,"total_tokens":7}}"#;
        assert!(mentions_usage(event));
        assert_eq!(usage(event), Some((7, (2, 0))));
        assert!(!mentions_usage(
            br#" {"choices":[{"delta":{"content":"x"}}]}"#
        ));
        assert_eq!(usage(b" [DONE]\n"), None);
        assert_eq!(usage(br#"{"usage":null}"#), None);
        assert_eq!(usage(br#"{"usage":{"total_tokens":-1}}"#), None);
        // Everything else in the answer is skipped, whatever its shape.
        let answer = br#"{"id":"x","choices":[{"message":{"content":"{\"usage\":1}"}}],
            "usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"extra":[1]}}"#;
        assert_eq!(usage(answer), Some((7, (3, 4))));
    }
}
