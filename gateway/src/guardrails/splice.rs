//! JSON read in place and edited in place, for the output filter: an answer's JSON (a stream
//! event's `data:` payload) is read as a borrowed view, each member a [`RawValue`] slice of the
//! original bytes, strings decoded only where the filter reads their text; what the filter
//! changes (a choice's text, a finish reason, tool-call arguments) is spliced into the
//! original bytes as [`Edits`]. An answer the filter leaves alone goes out as it came: no tree
//! built, nothing re-serialised.

use std::{borrow::Cow, fmt, ops::Range};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// An object key, borrowed unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The members of a JSON object, in order.
struct Members<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(kv) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    out.push(kv);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON text in which no object repeats a key (its deserialisation fails otherwise).
struct Unambiguous;

impl<'de> Deserialize<'de> for Unambiguous {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Unambiguous;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Unambiguous, E> {
                Ok(Unambiguous)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Unambiguous, E> {
                Ok(Unambiguous)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Unambiguous, E> {
                Ok(Unambiguous)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Unambiguous, E> {
                Ok(Unambiguous)
            }
            fn visit_str<E>(self, _: &str) -> Result<Unambiguous, E> {
                Ok(Unambiguous)
            }
            fn visit_unit<E>(self) -> Result<Unambiguous, E> {
                Ok(Unambiguous)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unambiguous, A::Error> {
                while seq.next_element::<Unambiguous>()?.is_some() {}
                Ok(Unambiguous)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unambiguous, A::Error> {
                // Objects of an answer have a handful of keys: a linear scan is cheapest.
                let mut keys: Vec<Key<'de>> = Vec::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if keys.iter().any(|k| k.0 == key.0) {
                        return Err(serde::de::Error::custom("a repeated key"));
                    }
                    map.next_value::<Unambiguous>()?;
                    keys.push(key);
                }
                Ok(Unambiguous)
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON object read in place.
pub struct Object<'a> {
    /// The object's own text (`{` to `}`).
    raw: &'a str,
    members: Vec<(Key<'a>, &'a RawValue)>,
}

/// What a JSON text is at the top.
pub enum Top<'a> {
    Object(Object<'a>),
    /// Valid JSON, not an object.
    Other,
}

impl<'a> Object<'a> {
    /// A whole JSON text; `None` if it is not valid JSON.
    /// `None` also when an object anywhere in it repeats a key: readers disagree on which copy
    /// counts (the first or the last), so a filter that screened one copy could let the other
    /// through to a client that reads it. Such a text is not screenable.
    pub fn top(text: &'a [u8]) -> Option<Top<'a>> {
        let text = std::str::from_utf8(text).ok()?;
        serde_json::from_str::<Unambiguous>(text).ok()?;
        let text = text.trim_ascii();
        Some(match Object::of_str(text) {
            Some(o) => Top::Object(o),
            None => Top::Other,
        })
    }

    /// The object `raw` is, if it is one.
    pub fn of(raw: &'a RawValue) -> Option<Object<'a>> {
        Object::of_str(raw.get())
    }

    fn of_str(raw: &'a str) -> Option<Object<'a>> {
        if !raw.starts_with('{') {
            return None;
        }
        let Members(members) = serde_json::from_str(raw).ok()?;
        Some(Object { raw, members })
    }

    /// A member's value (keys are unique: see [`Object::top`]).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k.0 == key)
            .map(|(_, v)| *v)
    }

    /// A member that is an object.
    pub fn object(&self, key: &str) -> Option<Object<'a>> {
        self.get(key).and_then(Object::of)
    }

    /// Whether any member other than `except` has a value other than `null`.
    pub fn any_other_set(&self, except: &str) -> bool {
        self.members
            .iter()
            .any(|(k, v)| k.0 != except && !is_null(v))
    }
}

/// The elements of a JSON array; `None` if `raw` is not one.
pub fn array(raw: &RawValue) -> Option<Vec<&RawValue>> {
    if !raw.get().starts_with('[') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// Whether an array's text has no elements.
fn empty_array(raw: &str) -> bool {
    raw.len() < 2 || raw[1..raw.len() - 1].trim_ascii().is_empty()
}

pub fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A JSON string's text; `None` if `raw` is not a string. Borrowed when it has no escapes.
pub fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    if !s.starts_with('"') {
        return None;
    }
    let inner = &s[1..s.len() - 1];
    // A valid JSON string without a backslash is its text as it stands.
    if memchr::memchr(b'\\', inner.as_bytes()).is_none() {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(s).ok().map(Cow::Owned)
}

/// A JSON number as `serde_json::Value::as_u64` reads it.
pub fn as_u64(raw: &RawValue) -> Option<u64> {
    let s = raw.get();
    s.parse::<u64>().ok().or_else(|| {
        serde_json::from_str::<serde_json::Number>(s)
            .ok()
            .and_then(|n| n.as_u64())
    })
}

/// `s` as a JSON string.
pub fn quote(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    serde_json::to_writer(&mut out, s).expect("a string serialises");
    out
}

/// Changes to one JSON text, applied in one pass ([`Edits::apply`]). Positions are offsets in
/// the text the views were read from (`base`).
pub struct Edits<'a> {
    base: &'a [u8],
    /// (where, with what); an empty range is an insertion.
    list: Vec<(Range<usize>, Vec<u8>)>,
}

impl<'a> Edits<'a> {
    pub fn new(base: &'a [u8]) -> Self {
        Self {
            base,
            list: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Where `s`, a slice of the base text, lies in it.
    fn span(&self, s: &str) -> Range<usize> {
        let start = (s.as_ptr() as usize)
            .checked_sub(self.base.as_ptr() as usize)
            .filter(|at| at + s.len() <= self.base.len())
            .expect("views are slices of the base text");
        start..start + s.len()
    }

    /// `value` replaced by the JSON text `with`.
    pub fn replace(&mut self, value: &RawValue, with: Vec<u8>) {
        let at = self.span(value.get());
        self.list.push((at, with));
    }

    /// A member `key` added at the end of `obj`, its value the JSON text `value`.
    pub fn insert(&mut self, obj: &Object<'_>, key: &str, value: &[u8]) {
        let span = self.span(obj.raw);
        // Before the closing brace.
        let at = span.end - 1;
        let after_other = !obj.members.is_empty() || self.list.iter().any(|(r, _)| r == &(at..at));
        let mut with = Vec::with_capacity(key.len() + value.len() + 4);
        if after_other {
            with.push(b',');
        }
        with.extend_from_slice(&quote(key));
        with.push(b':');
        with.extend_from_slice(value);
        self.list.push((at..at, with));
    }

    /// Elements (JSON texts) added at the end of the array `arr`.
    pub fn append(&mut self, arr: &RawValue, items: &[Vec<u8>]) {
        let span = self.span(arr.get());
        let at = span.end - 1;
        let mut with = Vec::new();
        let mut first = empty_array(arr.get());
        for item in items {
            if !first {
                with.push(b',');
            }
            first = false;
            with.extend_from_slice(item);
        }
        self.list.push((at..at, with));
    }

    /// The base text's `range`, edited, appended to `out`.
    pub fn apply(mut self, range: Range<usize>, out: &mut impl Sink) {
        // Stable: insertions at one place keep their order.
        self.list.sort_by_key(|(r, _)| r.start);
        let mut at = range.start;
        for (r, with) in self.list {
            out.put(&self.base[at..r.start]);
            out.put(&with);
            at = r.end;
        }
        out.put(&self.base[at..range.end]);
    }
}

/// Where edited text goes.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for bytes::BytesMut {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(text: &str) -> Object<'_> {
        match Object::top(text.as_bytes()) {
            Some(Top::Object(o)) => o,
            _ => panic!("not an object: {text}"),
        }
    }

    fn edited(text: &str, f: impl FnOnce(&mut Edits<'_>)) -> String {
        let mut e = Edits::new(text.as_bytes());
        f(&mut e);
        let mut out = Vec::new();
        e.apply(0..text.len(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_decoded_and_borrowed_when_plain() {
        let o = obj(r#"{"a":"plain","b":"tab\tquote\" \u00e9\ud83d\ude00","c":null,"d":5}"#);
        assert!(matches!(
            string(o.get("a").unwrap()),
            Some(Cow::Borrowed("plain"))
        ));
        assert_eq!(
            string(o.get("b").unwrap()).unwrap(),
            "tab\tquote\" é\u{1F600}"
        );
        assert!(string(o.get("c").unwrap()).is_none());
        assert!(string(o.get("d").unwrap()).is_none());
        assert_eq!(as_u64(o.get("d").unwrap()), Some(5));
        assert!(is_null(o.get("c").unwrap()));
    }

    #[test]
    fn repeated_keys_are_refused_also_when_escaped() {
        assert!(Object::top(br#"{"k":1,"\u006b":2}"#).is_none());
        assert!(Object::top(br#"{"a":[{"k":1,"k":2}]}"#).is_none());
        assert!(Object::top(br#"{"a":{"k":1},"b":{"k":2}}"#).is_some());
        let o = obj(r#"{"\u006b":2}"#);
        assert_eq!(o.get("k").unwrap().get(), "2");
    }

    #[test]
    fn replacements_and_insertions_splice_into_the_original() {
        let text = r#"{ "x" : "old" , "o":{}, "p":{"a":1}, "arr":[ ], "full":[1] }"#;
        let o = obj(text);
        let out = edited(text, |e| {
            e.replace(o.get("x").unwrap(), quote("new \"one\""));
            e.insert(&o.object("o").unwrap(), "k", b"1");
            e.insert(&o.object("o").unwrap(), "l", b"2");
            e.insert(&o.object("p").unwrap(), "b", b"true");
            e.append(o.get("arr").unwrap(), &[b"1".to_vec(), b"2".to_vec()]);
            e.append(o.get("full").unwrap(), &[b"2".to_vec()]);
        });
        assert_eq!(
            out,
            r#"{ "x" : "new \"one\"" , "o":{"k":1,"l":2}, "p":{"a":1,"b":true}, "arr":[ 1,2], "full":[1,2] }"#
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["x"], "new \"one\"");
    }

    #[test]
    fn not_json_and_not_objects() {
        assert!(Object::top(b"{not json").is_none());
        assert!(matches!(Object::top(b"[1]"), Some(Top::Other)));
        assert!(array(obj(r#"{"a":{}}"#).get("a").unwrap()).is_none());
    }
}
