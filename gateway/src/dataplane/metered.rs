//! The metering of an answer on its way to the client ([`Metered`]): it reconciles the
//! request's token reservation with the usage the upstream reports, holds the request's
//! concurrency slots (its quota [`Ticket`]) until the answer ends, and ends the answer when the
//! principal's credential is revoked meanwhile. Nothing it reads is logged.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use axum::{body::Body, response::Response};
use bytes::{Bytes, BytesMut};
use http_body::Frame;
use tokio::sync::futures::OwnedNotified;

use crate::{
    auth::{Identity, Principal},
    dataplane::quota::Ticket,
    error::ApiError,
};

/// Most of a non-streamed answer kept to read its `usage` from.
const USAGE_SCAN_LIMIT: usize = 4 << 20;

/// Put in a metered answer's extensions for whoever ends the answer early on purpose (the
/// guardrails' output filter cutting a stream): the request is then charged its prompt and
/// what the upstream generated up to the cut, not its whole reservation. (An answer that ends
/// early otherwise, client gone or upstream broken, keeps the reservation.)
#[derive(Debug, Clone, Default)]
pub struct EndEarly(Arc<AtomicBool>);

impl EndEarly {
    /// The answer is being ended on purpose.
    pub fn cut(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_cut(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Wraps an answer: refunds a failed attempt at once; otherwise meters the body (see
/// [`Metered`]). `reserved` is what the ticket reserved, and of it the prompt's estimate.
pub fn meter(
    resp: Response,
    ticket: Ticket,
    identity: Arc<Identity>,
    principal: Arc<Principal>,
    metrics: Timing,
    reserved: Reserved,
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
    let (mut parts, body) = resp.into_parts();
    let end_early = EndEarly::default();
    parts.extensions.insert(end_early.clone());
    let generation = identity.generation();
    // Only streams stay open long enough to need waking; a JSON answer checks the generation
    // whenever it is polled.
    let moved = sse.then(|| Box::pin(identity.generation_moved()));
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
        moved,
        recheck: false,
        done: false,
        timing: Some(metrics),
        first_byte: false,
        tokens: None,
        end_early,
        reserved,
        events: 0,
    };
    Response::from_parts(parts, Body::new(metered))
}

/// The tokens a request reserved, and of them its prompt's estimate.
#[derive(Debug, Clone, Copy)]
pub struct Reserved {
    pub prompt: u64,
    pub total: u64,
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
    principal: Arc<Principal>,
    generation: u64,
    check: Option<Check>,
    /// Streams: wakes the answer when a credential may have been revoked.
    moved: Option<Pin<Box<OwnedNotified>>>,
    /// Streams: woken since the last check began, so check (again).
    recheck: bool,
    done: bool,
    /// The model and send time, for time to first token and the token counts.
    timing: Option<Timing>,
    first_byte: bool,
    /// Prompt and completion tokens, as the usage reports them.
    tokens: Option<(u64, u64)>,
    end_early: EndEarly,
    reserved: Reserved,
    /// The stream's events seen so far (one token an event, as OpenAI-compatible servers
    /// stream them): with the prompt, the charge of a stream cut early.
    events: u64,
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
        // Lines are read in place; only a line split across chunks is gathered in `scan`.
        let mut rest: &[u8] = chunk;
        if !self.scan.is_empty() {
            let Some(i) = memchr::memchr(b'\n', chunk) else {
                self.scan.extend_from_slice(chunk);
                // A line longer than the scan limit carries no usage worth keeping.
                if self.scan.len() > USAGE_SCAN_LIMIT {
                    self.scan.clear();
                }
                return;
            };
            self.scan.extend_from_slice(&chunk[..=i]);
            let line = self.scan.split();
            self.line(&line);
            rest = &chunk[i + 1..];
        }
        let mut start = 0;
        for i in memchr::memchr_iter(b'\n', rest) {
            self.line(&rest[start..=i]);
            start = i + 1;
        }
        let tail = &rest[start..];
        if tail.len() <= USAGE_SCAN_LIMIT {
            self.scan.extend_from_slice(tail);
        }
    }

    /// One whole line of an event stream: a `data:` line is the usage or an event.
    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if mentions_usage(data)
            && let Some((total, io)) = usage(data)
        {
            self.usage = Some(total);
            self.tokens = Some(io);
        } else if data.trim_ascii() != b"[DONE]" {
            self.events += 1;
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
        // Armed again after each wake-up, before the generation is read below: a move in
        // between is then either seen below or wakes the new one. A wake-up always checks
        // (again, if a check is under way): the generation moves before the caches are
        // cleared and the wake-up comes after, so a check made in between may have been
        // answered from a cache entry about to go.
        if let Some(moved) = &mut self.moved {
            while moved.as_mut().poll(cx).is_ready() {
                self.recheck = true;
                *moved = Box::pin(self.identity.generation_moved());
            }
        }
        loop {
            if self.check.is_none() {
                let g = self.identity.generation();
                if g == self.generation && !self.recheck {
                    return false;
                }
                self.generation = g;
                self.recheck = false;
                let identity = self.identity.clone();
                let p = self.principal.clone();
                self.check = Some(Box::pin(async move { identity.still_valid(&p).await }));
            }
            match self.check.as_mut().map(|c| c.as_mut().poll(cx)) {
                Some(Poll::Ready(valid)) => {
                    self.check = None;
                    if !valid {
                        return true;
                    }
                }
                _ => return false,
            }
        }
    }
}

/// Whether an SSE event mentions `"usage"`: a cheap test, so that only the (usually last) event
/// carrying usage is parsed as JSON.
fn mentions_usage(data: &[u8]) -> bool {
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE.find(data).is_some()
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

impl Drop for Metered {
    /// An answer cut on purpose before its usage came ([`EndEarly`]): charged its prompt and
    /// the events generated up to the cut, at most the reservation. Any other early end keeps
    /// the reservation.
    fn drop(&mut self) {
        if self.end_early.is_cut()
            && let Some(t) = self.ticket.take()
        {
            let used = self.reserved.prompt.saturating_add(self.events);
            t.reconcile(used.min(self.reserved.total));
        }
    }
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
    use std::sync::Mutex;

    use http_body_util::BodyExt as _;

    use super::*;
    use crate::dataplane::test_bodies::Frames;
    use crate::{
        auth::AuthMethod, config::Config, dataplane::quota::Reservation, store::sqlite::SqliteStore,
    };

    /// What a ticket's reservation was told: `Some(used)` when reconciled.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    struct Watched(Seen);

    impl Reservation for Watched {
        fn reconcile(self: Box<Self>, used: u64) {
            self.0.0.lock().unwrap().push(format!("reconcile {used}"));
        }
        fn refund(self: Box<Self>) {
            self.0.0.lock().unwrap().push("refund".into());
        }
    }

    fn identity(dir: &std::path::Path) -> Arc<Identity> {
        let config = Config::from_str(
            &dir.join("moat.toml"),
            &format!("[server]\ndata_dir = \"{}\"\n", dir.join("data").display()),
        )
        .unwrap();
        let store = Arc::new(SqliteStore::open_in(&config.data_dir).unwrap());
        Arc::new(Identity::new(&config, store).unwrap())
    }

    /// A stream of `n` text events that never ends by itself, metered; returns the answer and
    /// what its reservation is told.
    fn stream(dir: &std::path::Path, n: usize, reserved: Reserved) -> (Response, Seen) {
        let events = (0..n).map(|i| {
            Bytes::from(format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            ))
        });
        metered(Frames::open(events), identity(dir), reserved)
    }

    /// The upstream stream `body`, metered; returns the answer and what its reservation is
    /// told.
    fn metered(body: Frames, identity: Arc<Identity>, reserved: Reserved) -> (Response, Seen) {
        let resp = Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::new(body))
            .unwrap();
        let seen = Seen::default();
        let p = Arc::new(Principal {
            user_id: "u".into(),
            username: "u".into(),
            tenant: "t".into(),
            key_id: Some("k".into()),
            session_id: None,
            roles: vec![],
            method: AuthMethod::ApiKey,
        });
        let timing = Timing {
            model: "m".into(),
            sent: std::time::Instant::now(),
        };
        let ticket = Ticket::holding(Box::new(Watched(seen.clone())));
        let resp = meter(resp, ticket, identity, p, timing, reserved);
        (resp, seen)
    }

    async fn read(resp: &mut Response, frames: usize) {
        for _ in 0..frames {
            resp.body_mut().frame().await.unwrap().unwrap();
        }
    }

    /// A stream the guardrails cut is charged its prompt and the events generated up to the
    /// cut, at most the reservation; any other early end keeps the reservation.
    #[tokio::test]
    async fn a_stream_cut_on_purpose_is_charged_what_was_generated() {
        let dir = tempfile::tempdir().unwrap();
        let reserved = Reserved {
            prompt: 40,
            total: 1040,
        };
        let (mut resp, seen) = stream(dir.path(), 3, reserved);
        read(&mut resp, 3).await;
        resp.extensions().get::<EndEarly>().unwrap().cut();
        drop(resp);
        assert_eq!(*seen.0.lock().unwrap(), ["reconcile 43"]);

        // The client went away: the reservation stands.
        let (mut resp, seen) = stream(dir.path(), 3, reserved);
        read(&mut resp, 2).await;
        drop(resp);
        assert!(seen.0.lock().unwrap().is_empty());

        // Never more than the reservation.
        let small = Reserved {
            prompt: 40,
            total: 42,
        };
        let (mut resp, seen) = stream(dir.path(), 5, small);
        read(&mut resp, 5).await;
        resp.extensions().get::<EndEarly>().unwrap().cut();
        drop(resp);
        assert_eq!(*seen.0.lock().unwrap(), ["reconcile 42"]);
    }

    /// An idle stream (the upstream sends nothing) is left alone until its key is revoked, and
    /// then ends at once with the OpenAI-shaped error event: the revocation wakes it.
    #[tokio::test]
    async fn a_revocation_wakes_and_ends_an_idle_stream() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let identity = identity(dir.path());
        let events = [Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
        )];
        let reserved = Reserved {
            prompt: 1,
            total: 10,
        };
        let (mut resp, _seen) = metered(Frames::open(events), identity.clone(), reserved);
        read(&mut resp, 1).await;
        let idle = tokio::time::timeout(Duration::from_millis(300), resp.body_mut().frame()).await;
        assert!(idle.is_err(), "nothing happens while nothing is revoked");

        let revoker = identity.clone();
        tokio::spawn(async move { revoker.evict_key("k") });
        let frame = tokio::time::timeout(Duration::from_secs(5), resp.body_mut().frame())
            .await
            .expect("the revocation woke the stream")
            .unwrap()
            .unwrap();
        let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
        assert!(text.starts_with("data: {\"error\""), "{text}");
        assert!(text.contains("revoked"), "{text}");
        assert!(resp.body_mut().frame().await.is_none(), "the stream ended");
    }

    /// However the upstream splits its stream into frames (mid-line, mid-`data:`, CRLF), the
    /// usage is read and the events are counted exactly.
    #[tokio::test]
    async fn a_stream_is_metered_exactly_however_it_is_split() {
        let dir = tempfile::tempdir().unwrap();
        let identity = identity(dir.path());
        let event = |i: usize| {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            )
        };
        let mut text: String = (0..3).map(event).collect();
        let three = text.len();
        text += ": keep-alive\r\n\r\n";
        text += "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3,\"total_tokens\":7}}\r\n\r\n";
        text += "data: [DONE]\n\n";
        for cut in [
            1,
            5,
            6,
            40,
            three,
            three + 5,
            text.len() - 20,
            text.len() - 1,
        ] {
            for end_early in [false, true] {
                let frames =
                    [&text[..cut], &text[cut..]].map(|p| Bytes::copy_from_slice(p.as_bytes()));
                let reserved = Reserved {
                    prompt: 40,
                    total: 1040,
                };
                let (mut resp, seen) = metered(Frames::ending(frames), identity.clone(), reserved);
                if end_early {
                    // Cut once the 3 events (and not the usage) were relayed.
                    let mut relayed = String::new();
                    while relayed.matches(":\"t").count() < 3 || !relayed.ends_with("\n\n") {
                        let f = resp.body_mut().frame().await.unwrap().unwrap();
                        relayed += std::str::from_utf8(f.data_ref().unwrap()).unwrap();
                        if relayed.contains("usage") {
                            break;
                        }
                    }
                    if relayed.contains("usage") {
                        continue;
                    }
                    resp.extensions().get::<EndEarly>().unwrap().cut();
                    drop(resp);
                    assert_eq!(*seen.0.lock().unwrap(), ["reconcile 43"], "cut at {cut}");
                } else {
                    let all = resp.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(all, text.as_bytes());
                    assert_eq!(*seen.0.lock().unwrap(), ["reconcile 7"], "cut at {cut}");
                }
            }
        }
    }

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
