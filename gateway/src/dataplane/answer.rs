//! What the client sees of a successful answer ([`Answer`]), on its way out after metering:
//!
//! - the `model` field says the public model name the client asked for, never the upstream's
//!   model id (`meta-llama/…`: an internal detail), in a JSON answer and in every stream event;
//! - on a stream whose client did not ask for usage, the usage event the gateway asked for on
//!   its own behalf (so that the reservation is always reconciled) is taken out; the rest of
//!   the stream, `data: [DONE]` included, is unchanged.
//!
//! Cheap by design: nothing is reserialized. The top-level `model` value is found by a small
//! JSON scanner ([`ModelField`], which skips through strings with `memchr`) and spliced;
//! events are handled one by one as they arrive (the proxy hands them over whole), and a JSON
//! answer is held back only while the scanner is inside a top-level string, so it streams
//! through too. Only a candidate usage event is parsed. Events left as they are go out as
//! slices of the upstream's bytes, not copies: only an event that changes is copied.
//!
//! A non-streamed answer the upstream sent with a `Content-Length` leaves with one too
//! ([`with_length`]): gathered once every wrapper has seen it, so that it goes out as one write
//! with its length rather than re-framed as chunks.

use std::{
    collections::VecDeque,
    ops::Range,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
};

use axum::{body::Body, response::Response};
use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use memchr::memmem;

use crate::dataplane::proxy::headers::is_event_stream;

/// Largest answer gathered to keep its length (larger ones stream through, chunked).
const WITH_LENGTH_LIMIT: u64 = 4 << 20;
/// Unchanged stream bytes shorter than this are copied next to the changed events around them
/// rather than sent as a frame of their own (a frame costs a chunk header and a buffer).
const SLICE_MIN: usize = 512;

/// Whether `resp` (the upstream's answer, before any wrapper) is a successful, non-streamed
/// answer of a length the upstream announced and [`with_length`] may gather.
pub fn has_length(resp: &Response) -> bool {
    resp.status().is_success()
        && !is_event_stream(resp.headers())
        && resp
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= WITH_LENGTH_LIMIT)
}

/// The answer gathered whole, so that it goes out with a `Content-Length`. A body that fails
/// on the way (the upstream broke off, the credential was revoked) still fails the response,
/// as it would have mid-stream.
pub async fn with_length(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let body = match body.collect().await {
        Ok(whole) => Body::from(whole.to_bytes()),
        Err(e) => Body::new(Failed(Some(e))),
    };
    Response::from_parts(parts, body)
}

/// A body that is only an error.
struct Failed(Option<axum::Error>);

impl http_body::Body for Failed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Poll::Ready(self.0.take().map(Err))
    }
}

/// Wraps a successful answer (anything else is the gateway's own words and passes as is).
pub fn rewrite(resp: Response, public_model: &str, hide_usage: bool) -> Response {
    if !resp.status().is_success() {
        return resp;
    }
    let sse = is_event_stream(resp.headers());
    let model = serde_json::to_vec(public_model).map_or_else(|_| Bytes::new(), Bytes::from);
    let (parts, inner) = resp.into_parts();
    let body = Answer {
        inner,
        model,
        hide_usage: sse && hide_usage,
        sse,
        held: BytesMut::new(),
        scan: (!sse).then(ModelField::default),
        seen: None,
        ready: VecDeque::new(),
        done: false,
    };
    Response::from_parts(parts, Body::new(body))
}

pub struct Answer {
    inner: Body,
    /// The public model name as a JSON string (quotes included).
    model: Bytes,
    hide_usage: bool,
    sse: bool,
    /// SSE: the start of an event not yet complete; JSON: bytes held while the scanner is in a
    /// top-level string that may be the model's name.
    held: BytesMut,
    /// JSON: the scanner, until the model field is found or known absent.
    scan: Option<ModelField>,
    /// SSE: the start of the last event scanned, through its model value, and that value's
    /// span in it.
    seen: Option<(Vec<u8>, Range<usize>)>,
    /// What is ready to go out, in order (sent before the upstream is polled again).
    ready: VecDeque<Bytes>,
    /// The upstream's body ended (or failed).
    done: bool,
}

impl Answer {
    /// SSE: the complete events of `held` + `data`, rewritten, queued in `ready`; the incomplete
    /// tail is held. Runs of events left as they are go as slices of `data`; changed events are
    /// copied (with the short unchanged runs between them) into one buffer.
    fn events(&mut self, data: Bytes) {
        let buf = if self.held.is_empty() {
            data
        } else {
            self.held.extend_from_slice(&data);
            self.held.split().freeze()
        };
        let mut edited = BytesMut::new();
        // Start of the unchanged bytes not queued yet.
        let mut run = 0;
        let mut at = 0;
        while let Some(len) = event_len(&buf[at..]) {
            let ev = &buf[at..at + len];
            if let Some(edit) = self.edit(ev) {
                self.unchanged(&buf, run..at, &mut edited);
                if let Edit::Model(r) = edit {
                    edited.extend_from_slice(&ev[..r.start]);
                    edited.extend_from_slice(&self.model);
                    edited.extend_from_slice(&ev[r.end..]);
                }
                run = at + len;
            }
            at += len;
        }
        self.unchanged(&buf, run..at, &mut edited);
        if !edited.is_empty() {
            self.ready.push_back(edited.freeze());
        }
        self.held.extend_from_slice(&buf[at..]);
    }

    /// Queues `buf[r]`, unchanged: as a slice when long enough, else copied into `edited`.
    fn unchanged(&mut self, buf: &Bytes, r: Range<usize>, edited: &mut BytesMut) {
        if r.len() < SLICE_MIN {
            edited.extend_from_slice(&buf[r]);
            return;
        }
        if !edited.is_empty() {
            self.ready.push_back(edited.split().freeze());
        }
        self.ready.push_back(buf.slice(r));
    }

    /// What to do with one event (with its blank line): `None` to send it as it is.
    fn edit(&mut self, ev: &[u8]) -> Option<Edit> {
        let payload = data_line(ev)?;
        let json = &ev[payload.clone()];
        if self.hide_usage && is_usage_event(json) {
            return Some(Edit::Drop);
        }
        // A stream's events usually start alike (same id, object, created) up to the model:
        // the scanner would find it at the same place, so an event that starts with the
        // bytes the last scan read is not scanned again.
        let scan = match &self.seen {
            Some((prefix, r)) if json.starts_with(prefix) => Scan::Found(r.clone()),
            _ => {
                let scan = ModelField::default().scan(json);
                if let Scan::Found(r) = &scan {
                    self.seen = Some((json[..r.end].to_vec(), r.clone()));
                }
                scan
            }
        };
        match scan {
            Scan::Found(r) if json[r.clone()] != self.model[..] => {
                Some(Edit::Model(payload.start + r.start..payload.start + r.end))
            }
            _ => None,
        }
    }

    /// JSON: what of `held` + `data` can go now, the model spliced once found.
    fn json(&mut self, data: Bytes) -> Bytes {
        let Some(scan) = &mut self.scan else {
            return data;
        };
        self.held.extend_from_slice(&data);
        match scan.scan(&self.held) {
            Scan::Found(r) => {
                self.scan = None;
                let mut out = BytesMut::with_capacity(self.held.len() + self.model.len());
                out.extend_from_slice(&self.held[..r.start]);
                out.extend_from_slice(&self.model);
                out.extend_from_slice(&self.held[r.end..]);
                self.held.clear();
                out.freeze()
            }
            Scan::Absent => {
                self.scan = None;
                self.held.split().freeze()
            }
            Scan::More => {
                let keep = scan.hold_from();
                scan.rebase(keep);
                self.held.split_to(keep).freeze()
            }
        }
    }
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        loop {
            // What is ready goes first: nothing waits for the upstream's next frame.
            if let Some(out) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if this.sse {
                        this.events(data);
                    } else {
                        let out = this.json(data);
                        if !out.is_empty() {
                            this.ready.push_back(out);
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    // Whatever is left (an unterminated last event, a JSON tail) goes as it is.
                    this.done = true;
                    let rest = this.held.split().freeze();
                    if !rest.is_empty() {
                        this.ready.push_back(rest);
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.ready.is_empty()
    }
}

/// A substring searcher built once (`memmem::find` builds one a call, which costs more than
/// the search in an event of a few hundred bytes).
type Finder = LazyLock<memmem::Finder<'static>>;

/// How one stream event changes on its way out.
enum Edit {
    /// Left out (the usage event the client did not ask for).
    Drop,
    /// The `model` value at this span of the event replaced by the public name.
    Model(Range<usize>),
}

/// The length of the first complete event of `buf` (through its blank line), if any. The data
/// plane's one SSE event splitter (the guardrails' stream filter splits with it too).
pub(crate) fn event_len(buf: &[u8]) -> Option<usize> {
    static LF: Finder = LazyLock::new(|| memmem::Finder::new(b"\n\n"));
    static CRLF: Finder = LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));
    let lf = LF.find(buf).map(|i| i + 2);
    // A CRLF blank line can only come before the first LF one if it starts before it.
    let crlf_in = &buf[..lf.map_or(buf.len(), |e| (e + 2).min(buf.len()))];
    let crlf = CRLF.find(crlf_in).map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An event's `data:` payload (its line, without the `data:` and one space).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Data {
    /// No `data:` line (a comment, another field).
    None,
    One(Range<usize>),
    /// Several `data:` lines: not what an OpenAI server sends.
    Several,
}

/// The `data:` payload of one event (as [`event_len`] splits them).
pub(crate) fn data(ev: &[u8]) -> Data {
    static DATA: Finder = LazyLock::new(|| memmem::Finder::new(b"\ndata:"));
    let start = if ev.starts_with(b"data:") {
        0
    } else {
        match DATA.find(ev) {
            Some(i) => i + 1,
            None => return Data::None,
        }
    };
    let mut from = start + 5;
    if ev.get(from) == Some(&b' ') {
        from += 1;
    }
    let end = memchr::memchr2(b'\n', b'\r', &ev[from..]).map_or(ev.len(), |i| from + i);
    if DATA.find(&ev[end..]).is_some() {
        return Data::Several;
    }
    Data::One(from..end)
}

/// The span of the payload of an event's `data:` line when it is a JSON object. An event of
/// several `data:` lines is not one an OpenAI server sends; it is left alone.
fn data_line(ev: &[u8]) -> Option<Range<usize>> {
    match data(ev) {
        Data::One(r) if ev.get(r.start) == Some(&b'{') => Some(r),
        _ => None,
    }
}

/// The usage event of a stream: a usage object and no choices. Only an event that carries a
/// usage object is parsed (the others say `"usage":null` or nothing).
fn is_usage_event(json: &[u8]) -> bool {
    static USAGE: Finder = LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
    let Some(at) = USAGE.find(json) else {
        return false;
    };
    let after = json[at + 7..]
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b':' | b'\n' | b'\r'));
    if after != Some(&b'{') {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return false;
    };
    v["usage"].is_object() && v["choices"].as_array().is_some_and(Vec::is_empty)
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// The span of the top-level `model` string value, quotes included.
    Found(Range<usize>),
    /// Not a JSON object, or its `model` is not a string, or it has none.
    Absent,
    /// Not yet seen: give more of the document.
    More,
}

/// A resumable scan of a JSON document for the value of its top-level `model` key. It only
/// tracks strings (with escapes) and nesting: at depth 1, a string followed by `:` is a key,
/// and a quote can only open or close a string (inside one it is escaped), so nothing in a
/// message's content can be mistaken for the key.
#[derive(Debug, Default)]
struct ModelField {
    pos: usize,
    depth: u32,
    started: bool,
    in_str: bool,
    escaped: bool,
    str_start: usize,
    /// The last string closed at depth 1 was `"model"`.
    last_was_model: bool,
    /// A `:` followed `"model"` at depth 1: the next value is the model's.
    want_value: bool,
}

impl ModelField {
    fn scan(&mut self, buf: &[u8]) -> Scan {
        while self.pos < buf.len() {
            if self.in_str && !self.escaped {
                // Inside a string only a quote or a backslash matters: skip to the next one.
                match memchr::memchr2(b'"', b'\\', &buf[self.pos..]) {
                    Some(n) => self.pos += n,
                    None => {
                        self.pos = buf.len();
                        break;
                    }
                }
            }
            let i = self.pos;
            let b = buf[i];
            self.pos += 1;
            if self.in_str {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_str = false;
                    if self.depth == 1 {
                        if self.want_value {
                            return Scan::Found(self.str_start..i + 1);
                        }
                        self.last_was_model = &buf[self.str_start..=i] == b"\"model\"";
                    }
                }
                continue;
            }
            if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                continue;
            }
            if !self.started {
                if b != b'{' {
                    return Scan::Absent;
                }
                self.started = true;
                self.depth = 1;
                continue;
            }
            if self.want_value && b != b'"' {
                return Scan::Absent;
            }
            match b {
                b'"' => {
                    self.in_str = true;
                    self.str_start = i;
                }
                b':' if self.depth == 1 => {
                    self.want_value = self.last_was_model;
                    self.last_was_model = false;
                }
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Scan::Absent;
                    }
                }
                _ => self.last_was_model = false,
            }
        }
        Scan::More
    }

    /// Where the bytes still needed start: a top-level string being read may be the key or
    /// the value; everything before can go.
    fn hold_from(&self) -> usize {
        if self.in_str && self.depth == 1 {
            self.str_start
        } else {
            self.pos
        }
    }

    /// The first `n` bytes of the buffer were sent and dropped.
    fn rebase(&mut self, n: usize) {
        self.pos -= n;
        self.str_start = self.str_start.saturating_sub(n);
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{StatusCode, header};
    use http_body_util::BodyExt;

    use super::*;
    use crate::dataplane::test_bodies::Frames;

    fn found(json: &str) -> Option<String> {
        match ModelField::default().scan(json.as_bytes()) {
            Scan::Found(r) => Some(json[r].to_owned()),
            _ => None,
        }
    }

    #[test]
    fn only_the_top_level_model_key_is_found() {
        assert_eq!(
            found(r#"{"id":"x","model":"org/M","choices":[]}"#).as_deref(),
            Some(r#""org/M""#)
        );
        assert_eq!(
            found(r#" { "model" : "a\"b" }"#).as_deref(),
            Some(r#""a\"b""#)
        );
        // Nested, inside content, as a value, not a string: not the field.
        assert_eq!(
            found(r#"{"data":[{"model":"inner"}],"model":"top"}"#).as_deref(),
            Some(r#""top""#)
        );
        assert_eq!(
            found(r#"{"c":"say \"model\":\"x\"","model":"top"}"#).as_deref(),
            Some(r#""top""#)
        );
        assert_eq!(found(r#"{"x":"model","y":"model"}"#), None);
        assert_eq!(found(r#"{"model":null,"x":"model"}"#), None);
        assert_eq!(found(r#"[{"model":"a"}]"#), None);
        assert_eq!(ModelField::default().scan(br#"{"id":"x","mod"#), Scan::More);
    }

    async fn through(
        content_type: &str,
        chunks: &[&str],
        model: &str,
        hide_usage: bool,
    ) -> (Vec<String>, String) {
        let body = Body::new(Frames::ending(
            chunks.iter().map(|c| Bytes::from(c.to_string())),
        ));
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .unwrap();
        let mut body = rewrite(resp, model, hide_usage).into_body();
        let mut frames = Vec::new();
        while let Some(f) = body.frame().await {
            frames.push(String::from_utf8(f.unwrap().into_data().unwrap().to_vec()).unwrap());
        }
        let all = frames.concat();
        (frames, all)
    }

    const CHUNK: &str = r#"data: {"id":"c","object":"chat.completion.chunk","model":"meta-llama/L-3","choices":[{"index":0,"delta":{"content":"\"model\":\"meta-llama/L-3\""}}]}"#;
    const USAGE: &str = r#"data: {"id":"c","object":"chat.completion.chunk","model":"meta-llama/L-3","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;

    #[tokio::test]
    async fn every_event_names_the_public_model() {
        let ev = format!("{CHUNK}\n\n");
        let usage = format!("{USAGE}\n\n");
        let (_, all) = through(
            "text/event-stream",
            &[&ev, &ev, &usage, "data: [DONE]\n\n"],
            "chat",
            false,
        )
        .await;
        let want_chunk = CHUNK.replacen(r#""model":"meta-llama/L-3""#, r#""model":"chat""#, 1);
        let want_usage = USAGE.replace("meta-llama/L-3", "chat");
        assert_eq!(
            all,
            format!("{want_chunk}\n\n{want_chunk}\n\n{want_usage}\n\ndata: [DONE]\n\n")
        );
        // The content that merely looks like the field is untouched.
        assert!(all.contains(r#"\"model\":\"meta-llama/L-3\""#));
    }

    #[tokio::test]
    async fn the_usage_event_the_client_did_not_ask_for_is_dropped() {
        let ev = format!("{CHUNK}\n\n");
        // An event split over two frames, and the usage event with [DONE] in one frame.
        let (half1, half2) = ev.split_at(20);
        let tail = format!("{USAGE}\r\n\r\ndata: [DONE]\n\n");
        let (frames, all) = through(
            "text/event-stream; charset=utf-8",
            &[half1, half2, &ev, &tail],
            "chat",
            true,
        )
        .await;
        let want_chunk = CHUNK.replacen("meta-llama/L-3", "chat", 1);
        assert_eq!(
            all,
            format!("{want_chunk}\n\n{want_chunk}\n\ndata: [DONE]\n\n")
        );
        assert!(frames.iter().all(|f| f.ends_with("\n\n")), "{frames:?}");
        // An event carrying `"usage":null` with choices is not the usage event.
        let with_null = format!(
            "{}\n\n",
            CHUNK.replace(r#""choices""#, r#""usage":null,"choices""#)
        );
        let (_, all) = through("text/event-stream", &[&with_null], "chat", true).await;
        assert!(all.contains(r#""usage":null"#) && all.contains(r#""model":"chat""#));
    }

    /// Events that need no change go out as slices of the upstream's frame, not copies; a
    /// dropped usage event splits the frame around it.
    #[tokio::test]
    async fn events_left_as_they_are_are_not_copied() {
        let ev = format!("{}\n\n", CHUNK.replace("meta-llama/L-3", "chat"));
        let usage = format!("{}\n\n", USAGE.replace("meta-llama/L-3", "chat"));
        let events = ev.repeat(4);
        let frame = Bytes::from(format!("{events}{usage}data: [DONE]\n\n"));
        let resp = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::new(Frames::ending([frame.clone()])))
            .unwrap();
        let mut body = rewrite(resp, "chat", true).into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.as_ptr(), frame.as_ptr(), "a slice of the frame");
        assert_eq!(first, events.as_bytes());
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "data: [DONE]\n\n".as_bytes());
    }

    #[tokio::test]
    async fn an_answer_of_known_length_keeps_one() {
        let json = r#"{"id":"x","model":"org/M-1","usage":{"total_tokens":1}}"#;
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json))
            .unwrap();
        assert!(has_length(&resp));
        let out = with_length(rewrite(resp, "chat", false)).await;
        let want = json.replace("org/M-1", "chat");
        assert_eq!(out.body().size_hint().exact(), Some(want.len() as u64));
        let body = out.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, want);
        // An event stream, or a body of unknown length: left to stream.
        let sse = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from("data: x\n\n"))
            .unwrap();
        assert!(!has_length(&sse));
        let chunks = Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::new(Frames::ending([Bytes::from("{}")])))
            .unwrap();
        assert!(!has_length(&chunks));
    }

    #[tokio::test]
    async fn a_json_answer_names_the_public_model_even_in_pieces() {
        let body = r#"{"object":"list","data":[{"object":"embedding","embedding":[0.1,-2e-3],"index":0}],"model":"org/E-5","usage":{"total_tokens":1}}"#;
        let want = body.replace("org/E-5", r#"pub\"lic"#);
        for at in [0, 5, 60, body.find("org/E").unwrap(), body.len() - 3] {
            let (a, b) = body.split_at(at);
            let (_, all) = through("application/json", &[a, b], "pub\"lic", true).await;
            assert_eq!(all, want, "split at {at}");
        }
        // Not an object: untouched.
        let (_, all) = through("application/json", &["[1,2]"], "chat", false).await;
        assert_eq!(all, "[1,2]");
    }
}
