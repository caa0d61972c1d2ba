//! The output filter applied to an answer on its way out ([`filter`], pipeline step 13):
//!
//! - a JSON answer is read whole, in one pass that checks it and finds each choice's text (and
//!   tool-call arguments) (`splice::read_answer`); each text is screened and redacted, or cut
//!   at a `block` finding with `finish_reason: "content_filter"`; an answer that cannot be
//!   parsed is refused (502), never passed unscreened;
//! - both are read in place (`splice`): only the texts are decoded, and what the filter
//!   changes is spliced into the upstream's bytes; an answer or event it leaves alone goes out
//!   as it came, nothing re-serialised;
//! - a stream ([`SseFilter`]) is screened event by event, each event's payload read in one
//!   pass (`splice::read_event`: checked, and each choice's index, finish reason, delta,
//!   text and tool-call arguments recorded); each choice's text goes through its
//!   own [`TextFilter`] (the hold-back window), and each event carries only the text the
//!   filter has released (events left with nothing to say are dropped); the rest is released
//!   on the choice's last event. A `block` finding ends the stream: a last event with
//!   `finish_reason: "content_filter"`, then `data: [DONE]`. Events stay in the upstream's
//!   shape, so the SDKs read them as usual. A panic in the filter ends the stream the same way.
//!
//! Streamed tool-call arguments (`delta.tool_calls[].function.arguments`) get a filter each,
//! released the same way; what they hold goes with the choice's last event.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    body::Body,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use http_body::Frame;
use serde_json::{Value, json};
use tracing::warn;

use super::{
    Guard, metrics,
    output::{self, Class, TextFilter},
    splice::{self, Delta, Edits},
};
use crate::{
    dataplane::{
        answer::{self, Data},
        metered::EndEarly,
        proxy::headers::is_event_stream,
    },
    error::ApiError,
};

/// Most of a JSON answer read to screen it.
const JSON_LIMIT: usize = 16 << 20;

/// Screens `resp` as `guard` says (nothing to do without one).
pub async fn filter(resp: Response, guard: Option<Guard>) -> Response {
    let Some(guard) = guard else {
        return resp;
    };
    let mut resp = resp;
    if !guard.flagged.is_empty()
        && let Ok(v) = HeaderValue::from_str(&guard.flagged.join(","))
    {
        resp.headers_mut().insert("x-moat-guardrail", v);
    }
    let active = guard.output.any() || guard.canary.is_some();
    if !resp.status().is_success() || !guard.generation || !active {
        return resp;
    }
    if is_event_stream(resp.headers()) {
        let (parts, inner) = resp.into_parts();
        let end_early = parts.extensions.get::<EndEarly>().cloned();
        let body = SseFilter {
            inner,
            guard,
            end_early,
            buf: BytesMut::new(),
            choices: BTreeMap::new(),
            tools: BTreeMap::new(),
            template: None,
            audited: Audited::new(),
            state: State::Open,
        };
        return Response::from_parts(parts, Body::new(body));
    }
    let (mut parts, inner) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(inner, JSON_LIMIT).await else {
        return ApiError::bad_gateway("the answer could not be screened").into_response();
    };
    match catch_unwind(AssertUnwindSafe(|| screen_in_place(&bytes, &guard))) {
        Ok(Some(out)) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            let out = match out {
                Cow::Borrowed(_) => bytes.clone(),
                Cow::Owned(v) => Bytes::from(v),
            };
            Response::from_parts(parts, Body::from(out))
        }
        _ => {
            metrics::output(None, "error");
            warn!("guardrail output filter failed on a JSON answer; refused");
            ApiError::bad_gateway("the answer could not be screened")
                .with_code("content_filter_failed")
                .into_response()
        }
    }
}

/// A JSON answer, screened; `None` if it cannot be.
#[cfg(test)]
fn screen_json(bytes: &[u8], g: &Guard) -> Option<Vec<u8>> {
    screen_in_place(bytes, g).map(|c| c.into_owned())
}

/// A JSON answer, screened; `None` if it cannot be. Read in place: an answer the filter
/// leaves alone is the same bytes (borrowed), a changed one has its changes spliced in.
fn screen_in_place<'a>(bytes: &'a [u8], g: &Guard) -> Option<Cow<'a, [u8]>> {
    let answer = splice::read_answer(bytes)?;
    let mut edits = Edits::new(bytes);
    let mut audited = Audited::new();
    for choice in &answer.choices {
        let mut cut = false;
        for slot in choice.texts() {
            let Some(text) = splice::string(slot) else {
                // Not a string: nothing to screen. A string that cannot be decoded (a lone
                // surrogate) cannot be screened: the answer is refused.
                if slot.get().starts_with('"') {
                    return None;
                }
                continue;
            };
            if cut {
                if !text.is_empty() {
                    edits.replace(slot, b"\"\"".to_vec());
                }
                continue;
            }
            let Some(step) = output::screen_whole(&text, &g.output, g.canary.as_deref()) else {
                continue;
            };
            count(g, &mut audited, &step.redacted, step.blocked);
            if *text != step.release {
                edits.replace(slot, splice::quote(&step.release));
            }
            cut = step.blocked.is_some();
        }
        if cut {
            let cf = b"\"content_filter\"".to_vec();
            match choice.finish_reason {
                Some(f) => edits.replace(f, cf),
                None => edits.insert(
                    &splice::choice_object(bytes, choice.index)?,
                    "finish_reason",
                    &cf,
                ),
            }
        }
    }
    if edits.is_empty() {
        return Some(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len() + 64);
    edits.apply(0..bytes.len(), &mut out);
    Some(Cow::Owned(out))
}

/// The (class, action) pairs of an answer already audited.
type Audited = Vec<(Class, &'static str)>;

/// What a step found: each finding counted in `/metrics`, and each class audited once per
/// answer (one `guardrail_hit` record naming the class and the action, never the text).
fn count(g: &Guard, audited: &mut Audited, redacted: &[Class], blocked: Option<Class>) {
    let hits = redacted
        .iter()
        .map(|c| (*c, "redact"))
        .chain(blocked.map(|c| (c, "block")));
    for (c, action) in hits {
        metrics::output(Some(c), action);
        if !audited.contains(&(c, action)) {
            audited.push((c, action));
            crate::audit::emit(crate::audit::Event::GuardrailHit {
                rule: format!("output.{}", c.name()),
                action: action.into(),
                tenant: Some(g.tenant.clone()),
                user_id: Some(g.user_id.clone()),
                request_id: None,
            });
        }
    }
    if let Some(c) = blocked {
        // The class, never the text.
        tracing::info!(class = c.name(), "guardrail cut the answer");
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Open,
    /// Cut by the filter: the closing events are out, nothing more is read.
    Closed,
}

/// A stream on its way out, screened (see the module docs).
pub struct SseFilter {
    inner: Body,
    guard: Guard,
    /// The start of an event not yet complete.
    buf: BytesMut,
    /// Each choice's filter, by index.
    choices: BTreeMap<u64, TextFilter>,
    /// Each streamed tool call's arguments' filter, by (choice, tool-call index).
    tools: BTreeMap<(u64, u64), TextFilter>,
    /// The last chunk's identity fields (id, object, created, model, system_fingerprint),
    /// for the events the filter writes itself.
    template: Option<Value>,
    /// Told when the filter cuts the stream (the metering then charges what was generated).
    end_early: Option<EndEarly>,
    /// The classes audited so far (once per answer).
    audited: Audited,
    state: State,
}

impl SseFilter {
    /// Every complete event of `buf` + `data`, screened, into `out`.
    fn feed(&mut self, data: &[u8], out: &mut BytesMut) {
        self.buf.extend_from_slice(data);
        while self.state == State::Open {
            let Some(len) = answer::event_len(&self.buf) else {
                break;
            };
            let ev = self.buf.split_to(len).freeze();
            self.event(&ev, out);
        }
    }

    fn event(&mut self, ev: &[u8], out: &mut BytesMut) {
        let payload = match answer::data(ev) {
            Data::One(r) => &ev[r],
            // Several data lines: not what an OpenAI server sends; screened as one
            // unparseable payload (dropped).
            Data::Several => return,
            Data::None => {
                // Comments and other fields carry no text.
                out.extend_from_slice(ev);
                return;
            }
        };
        if payload.trim_ascii() == b"[DONE]" {
            self.flush_all(out);
            out.extend_from_slice(ev);
            return;
        }
        // Not an event we can screen: it does not go out.
        let Some(read) = splice::read_event(payload) else {
            return;
        };
        if !read.object || !read.has_choices || read.choices.is_empty() {
            // Valid JSON but no text of a choice (an error event, the usage event that comes
            // after every choice ended): flush what is held first.
            self.flush_all(out);
            out.extend_from_slice(ev);
            return;
        }
        // A choice that is not an object: not what an OpenAI server sends; not screenable.
        if read.choices.iter().any(|c| !c.object) {
            return;
        }
        self.remember(&read.identity);
        let mut edits = Edits::new(ev);
        let mut cut = None;
        let mut any_left = false;
        let g = &self.guard;
        for (at, choice) in read.choices.iter().enumerate() {
            let index = choice.index.and_then(splice::as_u64).unwrap_or(0);
            let finish = choice.finish_reason;
            let last = finish.is_some_and(|f| !splice::is_null(f));
            // A chat chunk's text is its `delta.content`, a completion chunk's its `text`.
            let slot = match choice.delta {
                Delta::Container => choice.content.as_ref(),
                Delta::Other => None,
                Delta::Absent => choice.text.as_ref(),
            };
            let text = slot.and_then(|s| s.text.as_deref());
            // The choice's objects, found again only for an edit that inserts into them.
            let mut found = None;
            let f = self
                .choices
                .entry(index)
                .or_insert_with(|| TextFilter::new(g.hold_back));
            let step = f.push(text.unwrap_or(""), last, &g.output, g.canary.as_deref());
            count(g, &mut self.audited, &step.redacted, step.blocked);
            // The text is set to what the filter released (unless there is none to set and
            // there was none); written only where it differs.
            let set_text =
                (text.is_some() || !step.release.is_empty()) && text != Some(step.release.as_str());
            let mut finish_filtered = false;
            if step.blocked.is_some() {
                finish_filtered = true;
                cut = step.blocked;
            }
            if cut.is_none()
                && choice.delta == Delta::Container
                && choice.tool_calls == Delta::Container
            {
                for call in read.calls.iter().filter(|c| c.choice == at) {
                    let k = call.index.and_then(splice::as_u64).unwrap_or(0);
                    let Some(args) = call.arguments.text.as_deref() else {
                        continue;
                    };
                    let f = self
                        .tools
                        .entry((index, k))
                        .or_insert_with(|| TextFilter::new(g.hold_back));
                    let step = f.push(args, false, &g.output, g.canary.as_deref());
                    count(g, &mut self.audited, &step.redacted, step.blocked);
                    if args != step.release {
                        edits.replace(call.arguments.raw, splice::quote(&step.release));
                    }
                    if step.blocked.is_some() {
                        cut = step.blocked;
                        break;
                    }
                }
                if cut.is_some() {
                    finish_filtered = true;
                }
            }
            // Tool-call arguments the choice's filters still hold (JSON texts).
            let mut rest = Vec::new();
            if last && cut.is_none() {
                // What the tool-call filters of this choice hold goes with its last event.
                let keys: Vec<(u64, u64)> = self
                    .tools
                    .range((index, 0)..=(index, u64::MAX))
                    .map(|(k, _)| *k)
                    .collect();
                for key in keys {
                    let Some(mut f) = self.tools.remove(&key) else {
                        continue;
                    };
                    let step = f.push("", true, &g.output, g.canary.as_deref());
                    count(g, &mut self.audited, &step.redacted, step.blocked);
                    if step.blocked.is_some() {
                        finish_filtered = true;
                        cut = step.blocked;
                    }
                    if !step.release.is_empty() {
                        let call = json!({"index": key.1, "function": {"arguments": step.release}});
                        rest.push(serde_json::to_vec(&call).unwrap_or_default());
                    }
                }
            }
            if last || step.blocked.is_some() || cut.is_some() {
                self.choices.remove(&index);
                self.tools.retain(|k, _| k.0 != index);
            }
            // The edits of this choice.
            let text_json = set_text.then(|| splice::quote(&step.release));
            let calls_json = (!rest.is_empty()).then(|| {
                let mut a = b"[".to_vec();
                a.extend_from_slice(&rest.join(&b","[..]));
                a.push(b']');
                a
            });
            match choice.delta {
                Delta::Container => {
                    if let Some(t) = text_json {
                        match slot {
                            Some(s) => edits.replace(s.raw, t),
                            None => edits.insert(
                                located(&mut found, payload, at)
                                    .delta_object
                                    .as_ref()
                                    .expect("an object"),
                                "content",
                                &t,
                            ),
                        }
                    }
                    if let Some(c) = calls_json {
                        let l = located(&mut found, payload, at);
                        let d = l.delta_object.as_ref().expect("an object");
                        match (choice.tool_calls, l.tool_calls) {
                            (Delta::Container, Some(a)) => edits.append(a, &rest),
                            (_, Some(a)) => edits.replace(a, c),
                            (_, None) => edits.insert(d, "tool_calls", &c),
                        }
                    }
                }
                // A delta that is no object becomes one if there is something to put in.
                Delta::Other => {
                    let mut members = Vec::new();
                    if let Some(t) = &text_json {
                        members.push(["\"content\":".as_bytes(), t].concat());
                    }
                    if let Some(c) = &calls_json {
                        members.push(["\"tool_calls\":".as_bytes(), c].concat());
                    }
                    if !members.is_empty() {
                        let raw = located(&mut found, payload, at).delta.expect("a delta");
                        edits.replace(raw, [&b"{"[..], &members.join(&b","[..]), b"}"].concat());
                    }
                }
                Delta::Absent => {
                    if let Some(t) = text_json {
                        match slot {
                            Some(s) => edits.replace(s.raw, t),
                            None => {
                                edits.insert(&located(&mut found, payload, at).choice, "text", &t)
                            }
                        }
                    }
                    if let Some(c) = calls_json {
                        edits.insert(
                            &located(&mut found, payload, at).choice,
                            "delta",
                            &[&b"{\"tool_calls\":"[..], &c, b"}"].concat(),
                        );
                    }
                }
            }
            if finish_filtered {
                let cf = b"\"content_filter\"".to_vec();
                match finish {
                    Some(f) => edits.replace(f, cf),
                    None => edits.insert(
                        &located(&mut found, payload, at).choice,
                        "finish_reason",
                        &cf,
                    ),
                }
            }
            // A choice that says nothing now: no text, no finish, no role, no tool calls, no
            // logprobs.
            let says_nothing = step.release.is_empty()
                && !last
                && !finish_filtered
                && !choice.logprobs
                && !choice.delta_other_set
                && rest.is_empty();
            any_left |= !says_nothing;
        }
        if any_left || cut.is_some() {
            // The event as it came, with the edits (none: the same bytes).
            edits.apply(0..ev.len(), out);
        }
        if cut.is_some() {
            self.close(out, true);
        }
    }

    /// The identity fields of the first chunk, for the events the filter writes itself.
    fn remember(&mut self, identity: &[Option<&str>; 5]) {
        if self.template.is_none() {
            let mut t = serde_json::Map::new();
            for (k, x) in splice::IDENTITY.iter().zip(identity) {
                if let Some(x) = x
                    && let Ok(v) = serde_json::from_str::<Value>(x)
                {
                    t.insert((*k).into(), v);
                }
            }
            self.template = Some(Value::Object(t));
        }
    }

    /// An event of the filter's own for one choice: `text` and/or a finish reason.
    fn own_event(&self, index: u64, text: Option<String>, finish: Value, out: &mut BytesMut) {
        let mut v = self.template.clone().unwrap_or_else(|| json!({}));
        let chat = v["object"] != "text_completion";
        let choice = if chat {
            let delta = text.map_or_else(|| json!({}), |t| json!({"content": t}));
            json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": index, "text": text.unwrap_or_default(), "logprobs": null,
                "finish_reason": finish})
        };
        v["choices"] = json!([choice]);
        write_event(&v, out);
    }

    /// Releases what every choice still holds (the stream is ending).
    fn flush_all(&mut self, out: &mut BytesMut) {
        let tools = std::mem::take(&mut self.tools);
        for ((index, k), mut f) in tools {
            let step = f.push("", true, &self.guard.output, self.guard.canary.as_deref());
            count(&self.guard, &mut self.audited, &step.redacted, step.blocked);
            if step.blocked.is_some() {
                self.own_event(index, None, json!("content_filter"), out);
                self.close(out, true);
                return;
            }
            if !step.release.is_empty() {
                let mut v = self.template.clone().unwrap_or_else(|| json!({}));
                v["choices"] = json!([{"index": index, "delta": {"tool_calls": [{"index": k,
                    "function": {"arguments": step.release}}]}, "logprobs": null,
                    "finish_reason": null}]);
                write_event(&v, out);
            }
        }
        let held = std::mem::take(&mut self.choices);
        for (index, mut f) in held {
            let step = f.push("", true, &self.guard.output, self.guard.canary.as_deref());
            count(&self.guard, &mut self.audited, &step.redacted, step.blocked);
            if !step.release.is_empty() {
                self.own_event(index, Some(step.release), Value::Null, out);
            }
            if step.blocked.is_some() {
                self.own_event(index, None, json!("content_filter"), out);
                self.close(out, false);
                return;
            }
        }
    }

    /// Ends the stream after a cut: the other choices end too, then `[DONE]`.
    fn close(&mut self, out: &mut BytesMut, others: bool) {
        if let Some(e) = &self.end_early {
            e.cut();
        }
        self.tools.clear();
        if others {
            let held: Vec<u64> = std::mem::take(&mut self.choices).into_keys().collect();
            for index in held {
                self.own_event(index, None, json!("content_filter"), out);
            }
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        self.state = State::Closed;
        self.buf.clear();
    }

    /// The filter failed: end the stream as a cut.
    fn fail(&mut self) -> Bytes {
        if let Some(e) = &self.end_early {
            e.cut();
        }
        metrics::output(None, "error");
        warn!("guardrail output filter failed on a stream; cut");
        let mut out = BytesMut::new();
        let held: Vec<u64> = std::mem::take(&mut self.choices).into_keys().collect();
        for index in held {
            self.own_event(index, None, json!("content_filter"), &mut out);
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        self.state = State::Closed;
        out.freeze()
    }
}

impl http_body::Body for SseFilter {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        loop {
            if this.state == State::Closed {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let mut out = BytesMut::new();
                    let r = catch_unwind(AssertUnwindSafe(|| this.feed(&data, &mut out)));
                    let out = match r {
                        Ok(()) => out.freeze(),
                        Err(_) => this.fail(),
                    };
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.state = State::Closed;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    // The upstream ended: an unterminated last event is screened like the
                    // others, then whatever the choices hold is released.
                    let mut out = BytesMut::new();
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        if !this.buf.is_empty() {
                            this.feed(b"\n\n", &mut out);
                        }
                        if this.state == State::Open {
                            this.flush_all(&mut out);
                        }
                    }));
                    let out = match r {
                        Ok(()) => out.freeze(),
                        Err(_) => this.fail(),
                    };
                    this.state = State::Closed;
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Closed
    }
}

/// The objects of an event's `at`th choice, found again once (see `splice::locate`).
fn located<'a, 'l>(
    cache: &'l mut Option<splice::Located<'a>>,
    payload: &'a [u8],
    at: usize,
) -> &'l splice::Located<'a> {
    // The payload was read whole already: reading it again cannot fail.
    cache.get_or_insert_with(|| splice::locate(payload, at).expect("a checked event is read again"))
}

/// The stream filter without a body around it: bytes of an upstream stream in, screened bytes
/// out (for the benchmark, which measures the cost per chunk).
pub struct EventScreen(SseFilter);

impl EventScreen {
    pub fn new(guard: Guard) -> Self {
        Self(SseFilter {
            inner: Body::empty(),
            guard,
            end_early: None,
            buf: BytesMut::new(),
            choices: BTreeMap::new(),
            tools: BTreeMap::new(),
            template: None,
            audited: Audited::new(),
            state: State::Open,
        })
    }

    pub fn feed(&mut self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        self.0.feed(data, &mut out);
        out.freeze()
    }
}

fn write_event(v: &Value, out: &mut BytesMut) {
    out.extend_from_slice(b"data: ");
    if let Ok(s) = serde_json::to_vec(v) {
        out.extend_from_slice(&s);
    }
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::guardrails::output::{OutputAction, marker, tests as out};
    use crate::guardrails::splice::{Object, Top};

    /// The multi-pass reading the stream filter had before `splice::read_event` (each level
    /// parsed again: `Object::top`, `choices`, each choice, its delta), kept as the oracle
    /// the one-pass reading is checked against.
    impl SseFilter {
        fn event_multi_pass(&mut self, ev: &[u8], out: &mut BytesMut) {
            let payload = match answer::data(ev) {
                Data::One(r) => &ev[r],
                // Several data lines: not what an OpenAI server sends; screened as one
                // unparseable payload (dropped).
                Data::Several => return,
                Data::None => {
                    // Comments and other fields carry no text.
                    out.extend_from_slice(ev);
                    return;
                }
            };
            if payload.trim_ascii() == b"[DONE]" {
                self.flush_all(out);
                out.extend_from_slice(ev);
                return;
            }
            let top = match Object::top(payload) {
                Some(Top::Object(o)) => o,
                // Valid JSON but no object: no text of a choice.
                Some(Top::Other) => {
                    self.flush_all(out);
                    out.extend_from_slice(ev);
                    return;
                }
                // Not an event we can screen: it does not go out.
                None => return,
            };
            let Some(choices) = top.get("choices").and_then(splice::array) else {
                // An error event or the like: no text of a choice, but flush what is held first.
                self.flush_all(out);
                out.extend_from_slice(ev);
                return;
            };
            if choices.is_empty() {
                // The usage event comes after every choice ended.
                self.flush_all(out);
                out.extend_from_slice(ev);
                return;
            }
            // A choice that is not an object: not what an OpenAI server sends; not screenable.
            let Some(choices) = choices
                .into_iter()
                .map(Object::of)
                .collect::<Option<Vec<_>>>()
            else {
                return;
            };
            self.remember_top(&top);
            let mut edits = Edits::new(ev);
            let mut cut = None;
            let mut any_left = false;
            let g = &self.guard;
            for choice in &choices {
                let index = choice.get("index").and_then(splice::as_u64).unwrap_or(0);
                let finish = choice.get("finish_reason");
                let last = finish.is_some_and(|f| !splice::is_null(f));
                // A chat chunk's text is its `delta.content`, a completion chunk's its `text`.
                let delta_raw = choice.get("delta");
                let delta = delta_raw.and_then(Object::of);
                let slot = match (delta_raw, &delta) {
                    (Some(_), Some(d)) => d.get("content"),
                    (Some(_), None) => None,
                    (None, _) => choice.get("text"),
                };
                let text = slot.and_then(splice::string);
                let f = self
                    .choices
                    .entry(index)
                    .or_insert_with(|| TextFilter::new(g.hold_back));
                let step = f.push(
                    text.as_deref().unwrap_or(""),
                    last,
                    &g.output,
                    g.canary.as_deref(),
                );
                count(g, &mut self.audited, &step.redacted, step.blocked);
                // The text is set to what the filter released (unless there is none to set and
                // there was none); written only where it differs.
                let set_text = (text.is_some() || !step.release.is_empty())
                    && text.as_deref() != Some(step.release.as_str());
                let mut finish_filtered = false;
                if step.blocked.is_some() {
                    finish_filtered = true;
                    cut = step.blocked;
                }
                if cut.is_none()
                    && let Some(calls) = delta
                        .as_ref()
                        .and_then(|d| d.get("tool_calls"))
                        .and_then(splice::array)
                {
                    for call in calls {
                        let Some(call) = Object::of(call) else {
                            continue;
                        };
                        let k = call.get("index").and_then(splice::as_u64).unwrap_or(0);
                        let Some(raw) = call.object("function").and_then(|f| f.get("arguments"))
                        else {
                            continue;
                        };
                        let Some(args) = splice::string(raw) else {
                            continue;
                        };
                        let f = self
                            .tools
                            .entry((index, k))
                            .or_insert_with(|| TextFilter::new(g.hold_back));
                        let step = f.push(&args, false, &g.output, g.canary.as_deref());
                        count(g, &mut self.audited, &step.redacted, step.blocked);
                        if *args != step.release {
                            edits.replace(raw, splice::quote(&step.release));
                        }
                        if step.blocked.is_some() {
                            cut = step.blocked;
                            break;
                        }
                    }
                    if cut.is_some() {
                        finish_filtered = true;
                    }
                }
                // Tool-call arguments the choice's filters still hold (JSON texts).
                let mut rest = Vec::new();
                if last && cut.is_none() {
                    // What the tool-call filters of this choice hold goes with its last event.
                    let keys: Vec<(u64, u64)> = self
                        .tools
                        .range((index, 0)..=(index, u64::MAX))
                        .map(|(k, _)| *k)
                        .collect();
                    for key in keys {
                        let Some(mut f) = self.tools.remove(&key) else {
                            continue;
                        };
                        let step = f.push("", true, &g.output, g.canary.as_deref());
                        count(g, &mut self.audited, &step.redacted, step.blocked);
                        if step.blocked.is_some() {
                            finish_filtered = true;
                            cut = step.blocked;
                        }
                        if !step.release.is_empty() {
                            let call =
                                json!({"index": key.1, "function": {"arguments": step.release}});
                            rest.push(serde_json::to_vec(&call).unwrap_or_default());
                        }
                    }
                }
                if last || step.blocked.is_some() || cut.is_some() {
                    self.choices.remove(&index);
                    self.tools.retain(|k, _| k.0 != index);
                }
                // The edits of this choice.
                let text_json = set_text.then(|| splice::quote(&step.release));
                let calls_json = (!rest.is_empty()).then(|| {
                    let mut a = b"[".to_vec();
                    a.extend_from_slice(&rest.join(&b","[..]));
                    a.push(b']');
                    a
                });
                match (delta_raw, &delta) {
                    (Some(_), Some(d)) => {
                        if let Some(t) = text_json {
                            match slot {
                                Some(s) => edits.replace(s, t),
                                None => edits.insert(d, "content", &t),
                            }
                        }
                        match (d.get("tool_calls"), calls_json) {
                            (_, None) => {}
                            (Some(a), Some(_)) if a.get().starts_with('[') => {
                                edits.append(a, &rest)
                            }
                            (Some(a), Some(c)) => edits.replace(a, c),
                            (None, Some(c)) => edits.insert(d, "tool_calls", &c),
                        }
                    }
                    // A delta that is no object becomes one if there is something to put in.
                    (Some(raw), None) => {
                        let mut members = Vec::new();
                        if let Some(t) = &text_json {
                            members.push(["\"content\":".as_bytes(), t].concat());
                        }
                        if let Some(c) = &calls_json {
                            members.push(["\"tool_calls\":".as_bytes(), c].concat());
                        }
                        if !members.is_empty() {
                            edits
                                .replace(raw, [&b"{"[..], &members.join(&b","[..]), b"}"].concat());
                        }
                    }
                    (None, _) => {
                        if let Some(t) = text_json {
                            match slot {
                                Some(s) => edits.replace(s, t),
                                None => edits.insert(choice, "text", &t),
                            }
                        }
                        if let Some(c) = calls_json {
                            edits.insert(
                                choice,
                                "delta",
                                &[&b"{\"tool_calls\":"[..], &c, b"}"].concat(),
                            );
                        }
                    }
                }
                if finish_filtered {
                    let cf = b"\"content_filter\"".to_vec();
                    match finish {
                        Some(f) => edits.replace(f, cf),
                        None => edits.insert(choice, "finish_reason", &cf),
                    }
                }
                // A choice that says nothing now: no text, no finish, no role, no tool calls, no
                // logprobs.
                let says_nothing = step.release.is_empty()
                    && !last
                    && !finish_filtered
                    && choice.get("logprobs").is_none_or(splice::is_null)
                    && !delta.as_ref().is_some_and(|d| d.any_other_set("content"))
                    && rest.is_empty();
                any_left |= !says_nothing;
            }
            if any_left || cut.is_some() {
                // The event as it came, with the edits (none: the same bytes).
                edits.apply(0..ev.len(), out);
            }
            if cut.is_some() {
                self.close(out, true);
            }
        }

        fn remember_top(&mut self, top: &Object<'_>) {
            if self.template.is_none() {
                let mut t = serde_json::Map::new();
                for k in ["id", "object", "created", "model", "system_fingerprint"] {
                    if let Some(x) = top.get(k)
                        && let Ok(v) = serde_json::from_str::<Value>(x.get())
                    {
                        t.insert(k.into(), v);
                    }
                }
                self.template = Some(Value::Object(t));
            }
        }
    }

    fn guard(canary: Option<&str>) -> Guard {
        Guard {
            flagged: vec![],
            output: out::all_redact(),
            canary: canary.map(str::to_owned),
            hold_back: 64,
            generation: true,
            tenant: "t".into(),
            user_id: "u".into(),
        }
    }

    fn chunk(text: &str, finish: Option<&str>) -> String {
        let v = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [{"index": 0, "delta": {"content": text},
            "logprobs": null, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    }

    /// Runs the events through the filter in the given network pieces; returns the text the
    /// client sees and the finish reasons.
    fn run(g: Guard, wire: &[u8], pieces: &[usize]) -> (String, Vec<String>, bool) {
        let mut f = SseFilter {
            inner: Body::empty(),
            guard: g,
            end_early: None,
            buf: BytesMut::new(),
            choices: BTreeMap::new(),
            tools: BTreeMap::new(),
            template: None,
            audited: Audited::new(),
            state: State::Open,
        };
        let mut out = BytesMut::new();
        let mut at = 0;
        for p in pieces.iter().copied().chain([wire.len()]) {
            let p = p.min(wire.len());
            if p > at {
                f.feed(&wire[at..p], &mut out);
                at = p;
            }
        }
        let text = String::from_utf8(out.to_vec()).unwrap();
        let mut content = String::new();
        let mut finishes = Vec::new();
        let mut done = false;
        for ev in text.split("\n\n").filter(|e| !e.is_empty()) {
            let d = ev
                .strip_prefix("data: ")
                .expect("every event is a data line");
            if d == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(d).expect("valid JSON");
            let c = &v["choices"][0];
            content += c["delta"]["content"].as_str().unwrap_or("");
            if let Some(f) = c["finish_reason"].as_str() {
                finishes.push(f.to_owned());
            }
        }
        (content, finishes, done)
    }

    /// Each secret, split over 2 to 5 stream chunks at every offset, comes out redacted and
    /// the stream stays well-formed.
    #[test]
    fn secrets_split_over_chunks_are_redacted() {
        for (class, secret) in out::samples() {
            let text = format!("key: {secret} end");
            let want = text.replace(&secret, &marker(class));
            let n = text.len();
            for parts in 2..=5usize {
                for first in 1..n {
                    // Cuts at `first` and then evenly.
                    let mut cuts: Vec<usize> = vec![first];
                    for k in 1..parts - 1 {
                        cuts.push(first + k * (n - first) / (parts - 1));
                    }
                    cuts.retain(|c| *c < n && text.is_char_boundary(*c));
                    let mut wire = String::new();
                    let mut at = 0;
                    for c in cuts.iter().copied().chain([n]) {
                        if c > at {
                            wire += &chunk(&text[at..c], None);
                            at = c;
                        }
                    }
                    wire += &chunk("", Some("stop"));
                    wire += "data: [DONE]\n\n";
                    let (got, finishes, done) = run(guard(None), wire.as_bytes(), &[]);
                    assert_eq!(got, want, "{class:?} {parts} parts at {first}");
                    assert_eq!(finishes, vec!["stop"]);
                    assert!(done);
                }
            }
        }
    }

    #[test]
    fn network_pieces_do_not_matter() {
        let (class, secret) = &out::samples()[1];
        let wire = format!(
            "{}{}{}data: [DONE]\n\n",
            chunk("a ", None),
            chunk(secret, None),
            chunk(" b", Some("stop"))
        );
        for cut in 1..wire.len() {
            let (got, _, done) = run(guard(None), wire.as_bytes(), &[cut]);
            assert_eq!(got, format!("a {} b", marker(*class)));
            assert!(done);
        }
    }

    #[test]
    fn canary_cuts_the_stream_with_content_filter() {
        let canary = "moat-canary-00112233aabbccdd";
        let wire = format!(
            "{}{}{}{}data: [DONE]\n\n",
            chunk("The marker is moat-can", None),
            chunk("ary-00112233", None),
            chunk("aabbccdd and more", None),
            chunk("", Some("stop"))
        );
        let (got, finishes, done) = run(guard(Some(canary)), wire.as_bytes(), &[]);
        assert_eq!(got, "The marker is ");
        assert_eq!(finishes, vec!["content_filter"]);
        assert!(done);
    }

    /// Tool-call arguments split over chunks are screened too.
    #[test]
    fn streamed_tool_call_arguments_are_redacted() {
        let (class, secret) = &out::samples()[1];
        let args = format!("{{\"token\": \"{secret}\"}}");
        let (a, b) = args.split_at(20);
        let call = |s: &str, finish: Option<&str>| {
            let v = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                "function": {"arguments": s}}]}, "logprobs": null, "finish_reason": finish}]});
            format!("data: {v}\n\n")
        };
        let wire = format!(
            "{}{}{}data: [DONE]\n\n",
            call(a, None),
            call(b, None),
            chunk("", Some("tool_calls"))
        );
        let mut f = EventScreen::new(guard(None));
        let out = String::from_utf8(f.feed(wire.as_bytes()).to_vec()).unwrap();
        let mut got = String::new();
        for ev in out
            .split("\n\n")
            .filter(|e| !e.is_empty() && !e.ends_with("[DONE]"))
        {
            let v: Value = serde_json::from_str(ev.strip_prefix("data: ").unwrap()).unwrap();
            for c in v["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                got += c["function"]["arguments"].as_str().unwrap_or("");
            }
        }
        assert_eq!(got, args.replace(secret.as_str(), &marker(*class)));
        assert!(!out.contains(&secret[..20]), "{out}");
    }

    /// The events a filter with a 16-byte window sends for `wire`, as text.
    fn screened(g: Guard, wire: &str) -> String {
        let mut f = EventScreen::new(g);
        String::from_utf8(f.feed(wire.as_bytes()).to_vec()).unwrap()
    }

    fn small(canary: Option<&str>) -> Guard {
        Guard {
            hold_back: 16,
            ..guard(canary)
        }
    }

    /// Text the filter passes whole leaves in the event's own bytes: escapes, unicode
    /// escapes, field order and spacing as the upstream wrote them.
    #[test]
    fn events_released_whole_keep_their_bytes() {
        let ev = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tab\\tq\\\" \\u00e9 \\ud83d\\ude00 end\"},  \"finish_reason\":\"stop\"}]}\n\n";
        assert_eq!(screened(small(None), ev), ev);
        // A role-only first event and a usage event: untouched.
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        assert_eq!(screened(small(None), role), role);
    }

    /// A redaction is spliced into the event: the re-encoded string replaces the old one,
    /// everything around it stays byte for byte.
    #[test]
    fn redactions_are_spliced_with_escapes() {
        let (class, secret) = &out::samples()[1];
        let text = format!("\"quoted\" \u{e9}\u{1F600}\n{secret} \\ end");
        let content = serde_json::to_string(&text).unwrap();
        // Non-ASCII as \u escapes, as some servers write them.
        let content = content
            .replace('\u{e9}', "\\u00e9")
            .replace('\u{1F600}', "\\ud83d\\ude00");
        let ev = format!(
            "data: {{\"id\":\"c\", \"choices\":[{{\"index\":0,\"delta\":{{\"content\":{content}}},\"logprobs\":null,\"finish_reason\":\"stop\"}}], \"x\":[1, 2]}}\n\n"
        );
        let got = screened(small(None), &ev);
        let want_text = text.replace(secret.as_str(), &marker(*class));
        let want = ev.replace(&content, &serde_json::to_string(&want_text).unwrap());
        assert_eq!(got, want);
        let v: Value = serde_json::from_str(got.strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(v["choices"][0]["delta"]["content"], want_text.as_str());
    }

    /// Several choices in one event: each has its own filter, each text is spliced in place.
    #[test]
    fn multiple_choices_are_spliced_each() {
        let (class, secret) = &out::samples()[0];
        let ev = json!({"id": "c", "choices": [
            {"index": 0, "delta": {"content": format!("a {secret} b")}, "finish_reason": "stop"},
            {"index": 1, "delta": {"content": "plain text"}, "finish_reason": "stop"},
            {"index": 2, "delta": {"content": format!("{secret}!")}, "finish_reason": "stop"},
        ]});
        let got = screened(small(None), &format!("data: {ev}\n\n"));
        let v: Value = serde_json::from_str(got.strip_prefix("data: ").unwrap().trim()).unwrap();
        let m = marker(*class);
        assert_eq!(v["choices"][0]["delta"]["content"], format!("a {m} b"));
        assert_eq!(v["choices"][1]["delta"]["content"], "plain text");
        assert_eq!(v["choices"][2]["delta"]["content"], format!("{m}!"));
        assert!(!got.contains(secret.as_str()));
    }

    /// `content: null` and a missing `content` take the text the filter still held when the
    /// choice ends; a null left alone stays null.
    #[test]
    fn null_and_missing_content_take_the_held_text() {
        let held = "some words held back";
        let first = format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0,
            "delta": {"content": held}, "finish_reason": null}]})
        );
        for last in [
            r#"{"choices":[{"index":0,"delta":{"content":null},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":0,"delta":null,"finish_reason":"stop"}]}"#,
        ] {
            let got = screened(guard(None), &format!("{first}data: {last}\n\n"));
            // The window holds the whole text: the first event says nothing and is dropped.
            let evs: Vec<&str> = got.split("\n\n").filter(|e| !e.is_empty()).collect();
            assert_eq!(evs.len(), 1, "{got}");
            let v: Value = serde_json::from_str(evs[0].strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(v["choices"][0]["delta"]["content"], held, "{last}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }
        // Nothing held: a null stays as it came.
        let ev = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":null},\"finish_reason\":\"stop\"}]}\n\n";
        assert_eq!(screened(guard(None), ev), ev);
    }

    /// A tool-call chunk whose arguments pass goes out with its bytes untouched (no text of
    /// the choice to set).
    #[test]
    fn tool_call_chunks_pass_untouched() {
        let ev = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n";
        assert_eq!(screened(small(None), ev), ev);
        // Short arguments are held (then released with the last event, appended to its
        // tool calls); the chunk still goes out for its name and id.
        let args = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n";
        let end =
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n";
        let got = screened(guard(None), &format!("{ev}{args}{end}"));
        let mut all = String::new();
        for e in got.split("\n\n").filter(|e| !e.is_empty()) {
            let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
            for c in v["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                all += c["function"]["arguments"].as_str().unwrap_or("");
            }
        }
        assert_eq!(all, "{\"city\": \"Paris\"}");
        assert!(got.starts_with(ev), "{got}");
    }

    /// A cut with no `finish_reason` in the event gets one inserted.
    #[test]
    fn a_cut_inserts_the_finish_reason() {
        let canary = "moat-canary-00112233aabbccdd";
        let ev = format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"ok {canary}\"}}]}}\n\n");
        let got = screened(small(Some(canary)), &ev);
        assert_eq!(
            got,
            "data: {\"choices\":[{\"index\":0,\"text\":\"ok \",\"finish_reason\":\"content_filter\"}]}\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn unparseable_events_do_not_pass() {
        let wire = "data: {not json\n\ndata: [DONE]\n\n";
        let (got, _, done) = run(guard(None), wire.as_bytes(), &[]);
        assert_eq!(got, "");
        assert!(done);
    }

    /// A JSON answer the filter leaves alone is the upstream's bytes, borrowed; a redaction
    /// in a tool call's arguments is spliced in.
    #[test]
    fn json_answers_left_alone_are_not_copied() {
        let body = r#"{"id":"x", "choices":[{"index":0,"message":{"role":"assistant","content":"caf\u00e9 \"ok\""},"finish_reason":"stop"}]}"#;
        let out = screen_in_place(body.as_bytes(), &guard(None)).unwrap();
        assert!(matches!(out, Cow::Borrowed(b) if b == body.as_bytes()));
        let (class, secret) = &out::samples()[3];
        let args = serde_json::to_string(&format!("{{\"key\": \"{secret}\"}}")).unwrap();
        let body = format!(
            r#"{{"choices":[{{"index":0,"message":{{"content":null,"tool_calls":[{{"id":"1","function":{{"name":"f","arguments":{args}}}}}]}},"finish_reason":"tool_calls"}}]}}"#
        );
        let out = screen_json(body.as_bytes(), &guard(None)).unwrap();
        let want = serde_json::to_string(&format!("{{\"key\": \"{}\"}}", marker(*class))).unwrap();
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            body.replace(&args, &want)
        );
    }

    #[test]
    fn json_answers_are_redacted_or_cut() {
        let (class, secret) = &out::samples()[0];
        let body = json!({"choices": [{"index": 0, "message": {"role": "assistant",
            "content": format!("it is {secret}")}, "finish_reason": "stop"}]});
        let out = screen_json(body.to_string().as_bytes(), &guard(None)).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            format!("it is {}", marker(*class))
        );
        let mut g = guard(None);
        g.output.set(*class, OutputAction::Block);
        let out = screen_json(body.to_string().as_bytes(), &g).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "it is ");
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
        assert!(screen_json(b"not json", &g).is_none());
    }

    #[test]
    fn json_answers_with_several_choices_are_screened_each() {
        let (class, secret) = &out::samples()[0];
        let mut g = guard(None);
        g.output.set(*class, OutputAction::Block);
        // The first choice is cut (no finish reason: one is added), its tool call emptied; the
        // second, in the other member order, is cut after its text; the third is left alone.
        let body = format!(
            r#"{{"choices":[{{"index":0,"message":{{"content":"a {secret}","tool_calls":[{{"function":{{"arguments":"b"}}}}]}}}},{{"finish_reason":"stop","message":{{"content":"c"}},"text":"{secret}","index":1}},{{"index":2,"text":"fine"}}]}}"#
        );
        let out = screen_json(body.as_bytes(), &g).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let c = &v["choices"];
        assert_eq!(c[0]["message"]["content"], "a ");
        assert_eq!(
            c[0]["message"]["tool_calls"][0]["function"]["arguments"],
            ""
        );
        assert_eq!(c[0]["finish_reason"], "content_filter");
        assert_eq!(
            (&c[1]["text"], &c[1]["message"]["content"]),
            (&json!(""), &json!(""))
        );
        assert_eq!(c[1]["finish_reason"], "content_filter");
        assert_eq!(c[2], json!({"index": 2, "text": "fine"}));
        // A text that cannot be decoded (a lone surrogate) is not passed unscreened.
        let body = r#"{"choices":[{"message":{"content":"x \ud800 y"}}]}"#;
        assert!(screen_json(body.as_bytes(), &g).is_none());
    }

    /// A repeated key anywhere is refused, stream event or whole answer: a client that reads
    /// the first copy would otherwise get the text the filter did not screen.
    #[test]
    fn repeated_keys_are_not_screenable() {
        let (_, secret) = &out::samples()[0];
        for (what, payload) in [
            (
                "content",
                format!(
                    r#"{{"choices":[{{"index":0,"delta":{{"content":"{secret}","content":"ok"}}}}]}}"#
                ),
            ),
            (
                "delta",
                format!(
                    r#"{{"choices":[{{"index":0,"delta":{{"content":"{secret}"}},"delta":{{"content":"ok"}}}}]}}"#
                ),
            ),
            (
                "choices",
                format!(
                    r#"{{"choices":[{{"index":0,"delta":{{"content":"{secret}"}}}}],"choices":[]}}"#
                ),
            ),
            (
                "function",
                format!(
                    r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":"{secret}"}},"function":{{}}}}]}}}}]}}"#
                ),
            ),
        ] {
            let wire = format!("data: {payload}\n\ndata: [DONE]\n\n");
            let (got, _, _) = run(guard(None), wire.as_bytes(), &[]);
            assert!(!got.contains(secret.as_str()), "{what}: {got}");
        }
        let body = format!(
            r#"{{"choices":[{{"index":0,"message":{{"content":"{secret}","content":"ok"}}}}]}}"#
        );
        assert!(screen_json(body.as_bytes(), &guard(None)).is_none());
    }

    /// `wire` through the filter as it reads events now (one pass) and as it read them before
    /// (the multi-pass oracle), then the end of the stream: the same bytes out, the same
    /// filters left.
    fn same_as_multi_pass(g: &Guard, wire: &[u8]) {
        let new = |g: &Guard| SseFilter {
            inner: Body::empty(),
            guard: g.clone(),
            end_early: None,
            buf: BytesMut::new(),
            choices: BTreeMap::new(),
            tools: BTreeMap::new(),
            template: None,
            audited: Audited::new(),
            state: State::Open,
        };
        let (mut one, mut multi) = (new(g), new(g));
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        one.feed(wire, &mut a);
        multi.buf.extend_from_slice(wire);
        while multi.state == State::Open {
            let Some(len) = answer::event_len(&multi.buf) else {
                break;
            };
            let ev = multi.buf.split_to(len).freeze();
            multi.event_multi_pass(&ev, &mut b);
        }
        let show = |b: &BytesMut| String::from_utf8_lossy(b).into_owned();
        assert_eq!(show(&a), show(&b), "{}", String::from_utf8_lossy(wire));
        assert_eq!(one.state, multi.state);
        assert_eq!(
            one.choices.keys().collect::<Vec<_>>(),
            multi.choices.keys().collect::<Vec<_>>()
        );
        assert_eq!(
            one.tools.keys().collect::<Vec<_>>(),
            multi.tools.keys().collect::<Vec<_>>()
        );
        assert_eq!(one.template, multi.template);
        if one.state == State::Open {
            one.flush_all(&mut a);
            multi.flush_all(&mut b);
        }
        assert_eq!(show(&a), show(&b), "{}", String::from_utf8_lossy(wire));
    }

    /// Event payloads of every shape the filter meets, and some it should never meet.
    pub(crate) fn payloads() -> Vec<Vec<u8>> {
        let (_, secret) = &out::samples()[1];
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let mut p: Vec<String> = vec![
            // Chat chunks.
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#.into(),
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"plain words here"},"logprobs":null,"finish_reason":null}]}"#.into(),
            format!(r#"{{"id":"c1","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"key {secret} end"}},"finish_reason":null}}]}}"#),
            format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}"#, &secret[..20]),
            format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}"#, &secret[20..]),
            r#"{"choices":[{"index":0,"delta":{"content":"tab\t q\" \u00e9 \ud83d\ude00 \/ end"},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"con\u0074ent":"escaped key"},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{ },"finish_reason":"length"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":null},"finish_reason":"stop"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"refusal":null},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"refusal":"no"},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":null,"finish_reason":"stop"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":"x","finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":[1],"finish_reason":"stop"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#.into(),
            r#"{"choices":[{"delta":{"content":"no index"},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":"1","delta":{"content":"odd index"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":5},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":{"a":[1]}},"finish_reason":"stop"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x"},"logprobs":{"content":[{"token":"x","logprob":-0.1}]},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{},"logprobs":{"content":[]},"finish_reason":null}]}"#.into(),
            " \t{ \"id\" : \"c\" , \"choices\" : [ { \"index\" : 0 , \"delta\" : { \"content\" : \"spaced out\" } , \"finish_reason\" : null } ] }\t ".into(),
            " { \"choices\" : [ { \"index\" : 0 , \"delta\" : { } , \"finish_reason\" : \"stop\" } ] } ".into(),
            " { \"choices\" : [ { \"index\" : 0 , \"delta\" : { \"role\" : \"assistant\" } } ] } ".into(),
            " { \"choices\" : [ { \"index\" : 0 , \"text\" : \"t\" } , { \"index\" : 1 } ] } ".into(),
            // Completion chunks.
            r#"{"id":"t","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"some text","logprobs":null,"finish_reason":null}]}"#.into(),
            format!(r#"{{"object":"text_completion","choices":[{{"index":0,"text":"{secret}","finish_reason":null}}]}}"#),
            r#"{"object":"text_completion","choices":[{"index":0,"logprobs":null,"finish_reason":"stop"}]}"#.into(),
            r#"{"object":"text_completion","choices":[{"index":0,"finish_reason":"length","text":""}]}"#.into(),
            r#"{"choices":[{"index":0,"text":"x","delta":{"content":"y"}}]}"#.into(),
            // Several choices.
            format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"zero"}}}},{{"index":1,"delta":{{"content":"one {secret}"}}}},{{"index":2,"delta":{{}},"finish_reason":"stop"}}]}}"#),
            r#"{"choices":[{"index":1,"delta":{"content":"b"},"finish_reason":"stop"},{"index":0,"delta":{"content":"a"},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"text":"a"},{"index":1,"text":"b","finish_reason":"stop"}]}"#.into(),
            // Tool calls.
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":""}}]},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": "}}]},"finish_reason":null}]}"#.into(),
            format!(r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{{"function":{{"arguments":"\"{}"}},"index":0}}]}}}}]}}"#, &secret[..30]),
            format!(r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":"{}\"}}"}}}}]}}}}]}}"#, &secret[30..]),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_2","function":{"name":"f","arguments":"{\"q\": 1"}},{"index":2,"function":{"arguments":"two"}}]},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":["not a call",{"index":0,"function":"no object"},{"index":0,"function":{"arguments":7}},{"index":0,"function":{"name":"f"}}]}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":{"index":0}},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":null},"finish_reason":"tool_calls"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[]},"finish_reason":"tool_calls"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[ ]},"finish_reason":"tool_calls"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"both","tool_calls":[{"index":0,"function":{"arguments":"x"}}]},"finish_reason":null}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#.into(),
            r#"{"choices":[{"index":0,"finish_reason":"tool_calls"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":"none","finish_reason":"tool_calls"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":"x"},"finish_reason":"tool_calls"}]}"#.into(),
            // No choices to screen.
            r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#.into(),
            r#"{"choices":[ ]}"#.into(),
            r#"{"choices":{}}"#.into(),
            r#"{"choices":{"index":0,"delta":{"content":"x"}}}"#.into(),
            r#"{"choices":null}"#.into(),
            r#"{"choices":"x"}"#.into(),
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#.into(),
            r#"[{"choices":[]}]"#.into(),
            r#""a string""#.into(),
            "5".into(),
            "null".into(),
            " {} ".into(),
            // Choices that are not objects.
            r#"{"choices":[1]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x"}},"x"]}"#.into(),
            r#"{"choices":[[{"index":0}]]}"#.into(),
            // Not screenable: not JSON, repeated keys at each level (escaped too).
            r#"{"choices":[{"index":0,"delta":{"content":"x"}}]"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x"}}]} x"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"a\q"}}]}"#.into(),
            r#"{"id":"a","id":"b","choices":[{"index":0,"delta":{"content":"x"}}]}"#.into(),
            r#"{"choices":[],"choices":[{"index":0,"delta":{"content":"x"}}]}"#.into(),
            r#"{"choices":[{"index":0,"index":1,"delta":{"content":"x"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x"},"delta":{}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x","content":"y"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x","con\u0074ent":"y"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"role":"a","r\u006fle":"b"}}]}"#.into(),
            r#"{"choices":[{"index":0,"finish_reason":null,"finish_reason":"stop"}]}"#.into(),
            r#"{"choices":[{"index":0,"text":"a","t\u0065xt":"b"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"a","arguments":"b"}}]}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{},"function":{"arguments":"b"}}]}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"index":1,"function":{"arguments":"b"}}]}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"function":{"name":"a","name":"b"}}]}}]}"#.into(),
            r#"{"choices":[{"index":0,"logprobs":{"content":[{"t":1,"t":2}]}}]}"#.into(),
            r#"{"choices":[],"usage":{"n":1,"n":2}}"#.into(),
            r#"{"choices":{"a":1,"a":2}}"#.into(),
            r#"{"error":{"m":1,"\u006d":2}}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":{"k":1,"k":2}}}]}"#.into(),
            r#"{"choices":[{"index":0,"text":[{"k":1,"k":2}]}]}"#.into(),
            // Strings that cannot be decoded (lone surrogates), anywhere.
            r#"{"choices":[{"index":0,"delta":{"content":"x \ud800 y"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x \udc00"}}]}"#.into(),
            r#"{"id":"\ud800","choices":[{"index":0,"delta":{"content":"x"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"\ud800"}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\ud800"}}]}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"role":"\udfff"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"\ud800":1}}]}"#.into(),
            // Numbers out of range, anywhere.
            r#"{"created":1e400,"choices":[{"index":0,"delta":{"content":"x"}}]}"#.into(),
            r#"{"choices":[{"index":1e400,"delta":{"content":"x"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":-1e999}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1e400,"function":{"arguments":"x"}}]}}]}"#.into(),
            r#"{"choices":[{"index":18446744073709551616,"delta":{"content":"big"}}]}"#.into(),
            r#"{"choices":[{"index":1.0,"delta":{"content":"float"}}]}"#.into(),
            r#"{"choices":[{"index":-0,"delta":{"content":"neg"}}]}"#.into(),
        ];
        // Nesting around the depth limit, at places read as a whole value and elsewhere.
        for n in [120, 122, 123, 124, 125, 127] {
            p.push(format!(
                r#"{{"choices":[{{"index":0,"delta":{{"content":{}}}}}]}}"#,
                deep(n)
            ));
            p.push(format!(
                r#"{{"choices":[{{"index":0,"text":{}}}]}}"#,
                deep(n)
            ));
            p.push(format!(
                r#"{{"id":{},"choices":[{{"index":0,"text":"x"}}]}}"#,
                deep(n)
            ));
            p.push(format!(r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}}}]}}"#, deep(n)));
            p.push(format!(
                r#"{{"choices":[{{"index":0,"logprobs":{},"delta":{{}}}}]}}"#,
                deep(n)
            ));
        }
        let mut p: Vec<Vec<u8>> = p.into_iter().map(String::into_bytes).collect();
        // Not UTF-8.
        p.push(b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\"}}]}".to_vec());
        p.push(b"{\"id\":\"\xc3\",\"choices\":[]}".to_vec());
        p
    }

    fn event_of(payload: &[u8]) -> Vec<u8> {
        [b"data: ", payload, b"\n\n"].concat()
    }

    /// The one-pass reading decides as `Object::top` did on every payload: screenable or not.
    #[test]
    fn one_pass_reading_decides_as_the_multi_pass_one() {
        let mut refused = 0;
        for p in payloads() {
            let old = Object::top(&p).is_some();
            let new = splice::read_event(&p).is_some();
            assert_eq!(new, old, "{}", String::from_utf8_lossy(&p));
            refused += usize::from(!old);
        }
        // The corpus has both kinds.
        assert!(refused > 30, "{refused}");
    }

    /// Every payload, alone and after and before every other, through filters that redact,
    /// block, watch for a canary and hold back different windows: the same bytes out as the
    /// multi-pass reading.
    #[test]
    fn one_pass_filter_writes_what_the_multi_pass_one_did() {
        let canary = "moat-canary-00112233aabbccdd";
        let mut block = small(None);
        block.output.set(out::samples()[1].0, OutputAction::Block);
        let guards = [guard(None), small(None), block, small(Some(canary))];
        let payloads = payloads();
        let held = chunk("held words ", None);
        let end = chunk("", Some("stop"));
        let tail = format!("{}data: [DONE]\n\n", end);
        for g in &guards {
            for p in &payloads {
                let ev = event_of(p);
                same_as_multi_pass(g, &ev);
                same_as_multi_pass(g, &[held.as_bytes(), &ev, tail.as_bytes()].concat());
                same_as_multi_pass(
                    g,
                    &[&b": keep-alive\n\n"[..], &ev, b"event: x\ndata: [DONE]\n\n"].concat(),
                );
            }
        }
        // Pairs: what one event leaves held, the next releases or edits.
        for g in &guards[1..3] {
            for a in &payloads {
                for b in &payloads {
                    same_as_multi_pass(g, &[event_of(a), event_of(b)].concat());
                }
            }
        }
    }

    /// Tool-call arguments with a secret split over events, with and without a last event
    /// that has a delta to add them to, in chat and completion shapes.
    #[test]
    fn one_pass_filter_screens_split_tool_calls_as_before() {
        let (class, secret) = &out::samples()[1];
        let mut block = small(None);
        block.output.set(*class, OutputAction::Block);
        let args = format!("{{\"token\": \"{secret}\"}}");
        let call = |k: u64, s: &str| {
            event_of(
                json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0,
                "delta": {"tool_calls": [{"index": k, "function": {"arguments": s}}]},
                "finish_reason": null}]})
                .to_string()
                .as_bytes(),
            )
        };
        let ends: [&[u8]; 6] = [
            br#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            br#"{"choices":[{"index":0,"finish_reason":"tool_calls"}]}"#,
            br#"{"choices":[{"index":0,"delta":null,"finish_reason":"tool_calls"}]}"#,
            br#"{"choices":[{"index":0,"delta":{"tool_calls":[]},"finish_reason":"tool_calls"}]}"#,
            br#"{"choices":[{"index":0,"delta":{"tool_calls":7},"finish_reason":"tool_calls"}]}"#,
            br#"{"choices":[],"usage":{"total_tokens":3}}"#,
        ];
        for g in [guard(None), small(None), block] {
            for cut in (1..args.len()).step_by(7) {
                let (a, b) = args.split_at(cut);
                for end in ends {
                    let wire = [
                        call(0, a),
                        call(1, "other "),
                        call(0, b),
                        event_of(end),
                        b"data: [DONE]\n\n".to_vec(),
                    ]
                    .concat();
                    same_as_multi_pass(&g, &wire);
                }
            }
        }
    }
}
