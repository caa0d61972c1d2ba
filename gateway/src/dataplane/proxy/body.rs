//! The upstream's response body on its way to the client: passed on frame by frame as it
//! arrives, never gathered whole.
//!
//! - Idle timeout: no frame for `idle_timeout_ms` ends the response.
//! - Event streams are cut at event boundaries (a blank line), so a stream that breaks ends
//!   with a whole OpenAI-shaped `data: {"error": …}` event the SDKs raise on, never with half
//!   an event. Whatever is ready at once is sent together; nothing ready is ever held back
//!   waiting for more (events arrive whole from real servers, so this adds no delay). A frame
//!   of whole events that nothing joins goes out as it came, without a copy.
//! - Dropping this body (the client went away) drops the upstream response at once, which
//!   closes that upstream connection: the inference server sees the request cancelled.
//! - It holds the host's [`Lease`]: the request counts as outstanding until the body ends, and
//!   the body's outcome (clean end, error, timeout) feeds passive health.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;
use tracing::{info, warn};

use crate::{clock::Coarse, dataplane::route::Lease, error::ApiError, logging};

/// Largest event held back while waiting for its end.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Events already complete are sent once this much is gathered, even if more is ready.
const FLUSH_BYTES: usize = 16 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct ProxyBody {
    inner: Option<Incoming>,
    idle: Duration,
    /// Armed the first time the upstream makes the body wait: a body that arrives whole (the
    /// usual JSON answer) never touches the timer wheel.
    deadline: Option<Pin<Box<Sleep>>>,
    last_frame: Coarse,
    /// `Some` for event streams: bytes of an event not yet complete.
    pending: Option<BytesMut>,
    /// Event streams: a frame of whole events, kept as it came (not copied) while nothing
    /// was gathered before it; it joins `pending` only if more is ready at once.
    whole: Option<Bytes>,
    lease: Option<Lease>,
    /// The request's id, for its log lines (`logging::enter`).
    request: Option<Arc<str>>,
    bytes: u64,
    ended: bool,
}

impl ProxyBody {
    pub fn new(inner: Incoming, event_stream: bool, idle: Duration, lease: Lease) -> Self {
        Self {
            inner: Some(inner),
            idle,
            deadline: None,
            last_frame: Coarse::now(),
            pending: event_stream.then(BytesMut::new),
            whole: None,
            lease: Some(lease),
            request: logging::current_request(),
            bytes: 0,
            ended: false,
        }
    }

    /// The upstream body ended cleanly: the host did its job.
    fn finish(&mut self) {
        self.inner = None;
        self.ended = true;
        if let Some(lease) = &mut self.lease {
            lease.success();
        }
    }

    /// Ends the response after an upstream failure: the upstream connection is dropped now;
    /// an event stream gets a last error event, any other body an error (the client sees the
    /// connection cut rather than a truncated JSON document it might trust).
    fn fail(&mut self, reason: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner = None;
        self.ended = true;
        if let Some(lease) = &mut self.lease {
            lease.failure();
        }
        if let (Some(w), Some(p)) = (self.whole.take(), &mut self.pending) {
            p.extend_from_slice(&w);
        }
        let _e = logging::enter(&mut self.request);
        warn!(
            bytes = self.bytes,
            host = self.lease.as_ref().map(|l| l.host().name.as_str()),
            "{reason}"
        );
        match self.pending.take() {
            Some(mut gathered) => {
                // Whole events still held are sent; a trailing partial one is dropped.
                gathered.truncate(last_event_end(&gathered).unwrap_or(0));
                let event = format!("data: {}\n\n", ApiError::bad_gateway(reason).body());
                gathered.extend_from_slice(event.as_bytes());
                Poll::Ready(Some(Ok(Frame::data(gathered.freeze()))))
            }
            None => Poll::Ready(Some(Err(reason.into()))),
        }
    }
}

/// The end of the last complete event in `buf` (just after its blank line), if any.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::rfind(buf, b"\n\n").map(|i| i + 2);
    // A CRLF blank line can only end later than the last LF one if it starts after it.
    let from = lf.map_or(0, |e| e.saturating_sub(3));
    let crlf = memchr::memmem::rfind(&buf[from..], b"\r\n\r\n").map(|i| from + i + 4);
    lf.max(crlf)
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // The idle timer is re-armed lazily (when it fires), not per frame: a
                    // timer-wheel update per chunk is measurable on the streaming path.
                    this.last_frame = Coarse::now();
                    // Trailers are not relayed (allowlist: none).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    this.bytes += data.len() as u64;
                    // A body of known length is never polled past its last byte, so its end
                    // is recognised here rather than by a final `None`.
                    let last = this.inner.as_ref().is_some_and(|i| i.is_end_stream());
                    if last {
                        this.finish();
                    }
                    let Some(pending) = &mut this.pending else {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    };
                    if let Some(w) = this.whole.take() {
                        pending.extend_from_slice(&w);
                    }
                    // Whole events, nothing gathered before them: kept as they are, copied
                    // only if more turns out to be ready (the usual server writes whole events).
                    if pending.is_empty() {
                        if last {
                            this.pending = None;
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        if data.ends_with(b"\n\n") {
                            this.whole = Some(data);
                            continue;
                        }
                    }
                    pending.extend_from_slice(&data);
                    if last {
                        let rest = std::mem::take(pending).freeze();
                        this.pending = None;
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    // Take whatever else is ready too (fewer, larger writes to the client),
                    // but never sit on a large batch.
                    if pending.len() >= FLUSH_BYTES
                        && let Some(end) = last_event_end(pending)
                    {
                        return Poll::Ready(Some(Ok(Frame::data(pending.split_to(end).freeze()))));
                    }
                    if pending.len() > MAX_EVENT_BYTES {
                        return this.fail("upstream event too large; stream ended");
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    return this.fail("upstream connection lost mid-response");
                }
                Poll::Ready(None) => {
                    this.finish();
                    if let Some(w) = this.whole.take() {
                        this.pending = None;
                        return Poll::Ready(Some(Ok(Frame::data(w))));
                    }
                    let rest = this.pending.take().filter(|p| !p.is_empty());
                    return Poll::Ready(rest.map(|p| Ok(Frame::data(p.freeze()))));
                }
                Poll::Pending => {
                    // Nothing more right now: send the complete events gathered so far.
                    if let Some(w) = this.whole.take() {
                        return Poll::Ready(Some(Ok(Frame::data(w))));
                    }
                    if let Some(pending) = &mut this.pending
                        && let Some(end) = last_event_end(pending)
                    {
                        return Poll::Ready(Some(Ok(Frame::data(pending.split_to(end).freeze()))));
                    }
                    let idle = this.idle;
                    let deadline = this
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    while deadline.as_mut().poll(cx).is_ready() {
                        let left = (this.last_frame + idle).since(Coarse::now());
                        if left.is_zero() {
                            return this.fail("upstream idle timeout; response ended");
                        }
                        deadline.as_mut().reset(tokio::time::Instant::now() + left);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none()
            && self.whole.is_none()
            && self.pending.as_ref().is_none_or(|p| p.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.pending) {
            // A plain body passes through unchanged, so its length is the upstream's.
            (Some(inner), None) => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if !self.ended {
            let _e = logging::enter(&mut self.request);
            info!(
                bytes = self.bytes,
                "client went away; upstream request cancelled"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::last_event_end;

    #[test]
    fn event_boundaries() {
        assert_eq!(last_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n\n"), Some(18));
        assert_eq!(last_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(last_event_end(b"data: a\n"), None);
    }
}
