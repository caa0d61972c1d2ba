//! The upstream body as the client's own bytes with the gateway's edits spliced in: the untouched
//! spans are copied as they came, only what the gateway changes is written (a member's new
//! value, a string with its delimiters taken out, a message put first, a member added before
//! the closing brace). Nothing is re-serialised; a body nobody edits goes out as it came.
//!
//! Sound because the body was parsed strictly first (`json::parse_strict`): it is valid JSON and
//! no object in it repeats a key, so the one occurrence of a member is the one every reader
//! uses, and an edit of its span changes exactly that member. Members keep the client's order;
//! added ones come last.

use std::{fmt, ops::Range};

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::guardrails::splice::Members;

/// One step of a path into the body: a member of an object or an element of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The client's body and the edits to it.
pub struct Wire {
    raw: Bytes,
    /// The top-level members: key (as decoded) and the span of its value.
    members: Vec<(String, Range<usize>)>,
    /// Where the top-level object's closing brace is.
    close: usize,
    /// (span, replacement); an empty span is an insertion. Spans never overlap.
    edits: Vec<(Range<usize>, Vec<u8>)>,
}

// The body's text is the caller's: never printed.
impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wire")
            .field("len", &self.raw.len())
            .field("edits", &self.edits.len())
            .finish()
    }
}

impl Wire {
    /// `raw`, a JSON object already parsed strictly, with no edits yet. `None` if it is not a
    /// JSON object (the strict parse would have refused it first).
    pub fn new(raw: Bytes) -> Option<Wire> {
        let (members, close) = {
            let Members(list) = serde_json::from_slice(&raw).ok()?;
            let members = list
                .into_iter()
                .map(|(k, v)| (k.0.into_owned(), span_in(&raw, v)))
                .collect();
            let close = raw.trim_ascii_end().len().checked_sub(1)?;
            (members, close)
        };
        (raw.get(close) == Some(&b'}')).then_some(Wire {
            raw,
            members,
            close,
            edits: Vec::new(),
        })
    }

    /// The span of the top-level member `key`'s value.
    fn member(&self, key: &str) -> Option<Range<usize>> {
        self.members
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, span)| span.clone())
    }

    /// The top-level member `key` set to the JSON text `value`: its value replaced where it is,
    /// or the member added at the end.
    pub fn set(&mut self, key: &str, value: Vec<u8>) {
        if let Some(span) = self.member(key) {
            return self.edit(span, value);
        }
        let at = self.close;
        // Members of the body, or ones added before: a comma first.
        let after_other =
            !self.members.is_empty() || self.edits.iter().any(|(r, _)| r == &(at..at));
        let mut with = Vec::with_capacity(key.len() + value.len() + 4);
        if after_other {
            with.push(b',');
        }
        serde_json::to_writer(&mut with, key).expect("a string serialises");
        with.push(b':');
        with.extend_from_slice(&value);
        self.edits.push((at..at, with));
    }

    /// The value at `path` (whose first step is a top-level key) replaced by the JSON text
    /// `value`. `false` if there is no such value.
    pub fn set_at(&mut self, path: &[Step<'_>], value: Vec<u8>) -> bool {
        match self.locate(path) {
            Some(span) => {
                self.edit(span, value);
                true
            }
            None => false,
        }
    }

    /// The JSON text `element` put first in the top-level array `key`. `false` if `key` is not
    /// an array.
    pub fn prepend(&mut self, key: &str, mut element: Vec<u8>) -> bool {
        let Some(span) = self.member(key) else {
            return false;
        };
        let text = &self.raw[span.clone()];
        if text.first() != Some(&b'[') {
            return false;
        }
        if !text[1..text.len() - 1].trim_ascii().is_empty() {
            element.push(b',');
        }
        let at = span.start + 1;
        self.edits.push((at..at, element));
        true
    }

    /// The body to send: the client's bytes with the edits spliced in (the client's bytes
    /// themselves, not a copy, when there are none).
    pub fn into_bytes(mut self) -> Bytes {
        if self.edits.is_empty() {
            return self.raw;
        }
        // Stable: insertions at one place keep the order they were made in.
        self.edits.sort_by_key(|(r, _)| r.start);
        let extra: usize = self.edits.iter().map(|(_, w)| w.len()).sum();
        let mut out = Vec::with_capacity(self.raw.len() + extra);
        let mut at = 0;
        for (span, with) in &self.edits {
            debug_assert!(span.start >= at, "edits of the body overlap");
            out.extend_from_slice(&self.raw[at..span.start]);
            out.extend_from_slice(with);
            at = span.end;
        }
        out.extend_from_slice(&self.raw[at..]);
        Bytes::from(out)
    }

    fn edit(&mut self, span: Range<usize>, value: Vec<u8>) {
        // One edit per span: a later one of the same value wins.
        self.edits.retain(|(r, _)| r != &span);
        self.edits.push((span, value));
    }

    /// The span of the value at `path`, read again from the bytes (only for the rare edits
    /// inside a member: a string whose delimiters are taken out).
    fn locate(&self, path: &[Step<'_>]) -> Option<Range<usize>> {
        let (Step::Key(first), rest) = path.split_first()? else {
            return None;
        };
        let mut span = self.member(first)?;
        for step in rest {
            let text = &self.raw[span.clone()];
            let value = match *step {
                Step::Key(key) => {
                    let Members(list) = serde_json::from_slice(text).ok()?;
                    list.into_iter().find(|(k, _)| k.0 == key).map(|(_, v)| v)?
                }
                Step::Index(i) => {
                    let items: Vec<&RawValue> = serde_json::from_slice(text).ok()?;
                    items.get(i).copied()?
                }
            };
            span = span_in(&self.raw, value);
        }
        Some(span)
    }
}

/// Where `value`, read from `base`, lies in it.
fn span_in(base: &[u8], value: &RawValue) -> Range<usize> {
    let s = value.get();
    let start = (s.as_ptr() as usize)
        .checked_sub(base.as_ptr() as usize)
        .filter(|at| at + s.len() <= base.len())
        .expect("values are read from the base text");
    start..start + s.len()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn wire(text: &str) -> Wire {
        Wire::new(Bytes::copy_from_slice(text.as_bytes())).unwrap()
    }

    fn out(w: Wire) -> Value {
        serde_json::from_slice(&w.into_bytes()).unwrap()
    }

    #[test]
    fn an_unedited_body_is_the_clients_bytes() {
        let raw = Bytes::from_static(b" {\"a\" : 1 }\n");
        let w = Wire::new(raw.clone()).unwrap();
        let sent = w.into_bytes();
        assert_eq!(sent, raw);
        assert_eq!(sent.as_ptr(), raw.as_ptr(), "not a copy");
    }

    #[test]
    fn members_are_replaced_added_and_prepended() {
        let mut w = wire(
            " {\n \"m\\u006fdel\" : \"a\" ,\"messages\" : [ \n {\"x\":1} ] , \"n\":null \t}\r\n",
        );
        w.set("model", b"\"b\"".to_vec());
        w.set("n", b"2".to_vec());
        w.set("max_tokens", b"5".to_vec());
        w.set("cache_salt", b"\"s\"".to_vec());
        assert!(w.prepend("messages", b"{\"y\":2}".to_vec()));
        assert!(!w.prepend("model", b"1".to_vec()));
        assert_eq!(
            out(w),
            json!({"model":"b","messages":[{"y":2},{"x":1}],"n":2,"max_tokens":5,"cache_salt":"s"})
        );
        let mut w = wire(r#"{"messages":[ ]}"#);
        assert!(w.prepend("messages", b"1".to_vec()));
        assert_eq!(out(w), json!({"messages":[1]}));
        let mut w = wire("{ }");
        w.set("a", b"1".to_vec());
        w.set("b", b"2".to_vec());
        assert_eq!(out(w), json!({"a":1,"b":2}));
    }

    #[test]
    fn nested_values_are_found_by_path() {
        let text = r#"{"messages":[{"role":"user","content":"a"},{"content":[{"type":"text","t\u0065xt":"b\"c"}]}]}"#;
        let mut w = wire(text);
        let path = [
            Step::Key("messages"),
            Step::Index(1),
            Step::Key("content"),
            Step::Index(0),
            Step::Key("text"),
        ];
        assert!(w.set_at(&path, b"\"d\"".to_vec()));
        assert!(!w.set_at(&[Step::Key("messages"), Step::Index(5)], b"1".to_vec()));
        assert!(!w.set_at(&[Step::Key("nope")], b"1".to_vec()));
        assert!(w.set_at(
            &[Step::Key("messages"), Step::Index(0), Step::Key("content")],
            b"\"e\"".to_vec()
        ));
        assert_eq!(
            out(w),
            json!({"messages":[{"role":"user","content":"e"},{"content":[{"type":"text","text":"d"}]}]})
        );
    }
}
