//! JSON read in place and edited in place, for the output filter: an answer's JSON (a stream
//! event's `data:` payload) is read as a borrowed view, each member a [`RawValue`] slice of the
//! original bytes, strings decoded only where the filter reads their text; what the filter
//! changes (a choice's text, a finish reason, tool-call arguments) is spliced into the
//! original bytes as [`Edits`]. An answer the filter leaves alone goes out as it came: no tree
//! built, nothing re-serialised. A non-streamed answer ([`read_answer`]) and a stream event's
//! payload ([`read_event`], by a scanner of its own: `event_reader`) are each read in a single
//! pass that checks the JSON (as [`Object::top`] does) and records the places the filter reads
//! at once; only an edit that inserts into an object of an event finds that object again
//! ([`locate`]).

use std::{borrow::Cow, fmt, ops::Range};

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

mod event_reader;
pub use event_reader::read_event;

/// An object key, borrowed unless it has escapes (also read by `dataplane::openai::wire`).
#[derive(Default)]
pub(crate) struct Key<'a>(pub Cow<'a, str>);

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

/// The members of a JSON object, in order (also read by `dataplane::openai::wire`).
pub(crate) struct Members<'a>(pub Vec<(Key<'a>, &'a RawValue)>);

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
        d.deserialize_any(IsNull).map(|_| Unambiguous)
    }
}

/// A value checked like [`Unambiguous`]; `true` if it is `null`.
struct IsNull;

impl<'de> DeserializeSeed<'de> for IsNull {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IsNull {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<Unambiguous>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut keys = SeenKeys::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            keys.add::<A::Error>(key)?;
            map.next_value::<Unambiguous>()?;
        }
        Ok(false)
    }
}

/// The keys of one object read so far, to refuse a repeated one. Objects of an answer have a
/// handful of keys: a linear scan is cheapest. Keys without escapes (nearly all) are kept as
/// slices of the text, the first few without allocating; a decoded key is kept owned.
#[derive(Default)]
struct SeenKeys<'de> {
    inline: [&'de str; 8],
    len: usize,
    more: Vec<Cow<'de, str>>,
}

impl<'de> SeenKeys<'de> {
    /// `key`, unless the object already has it (an error then).
    fn add<E: serde::de::Error>(&mut self, key: Key<'de>) -> Result<(), E> {
        if !self.fresh(key) {
            return Err(E::custom("a repeated key"));
        }
        Ok(())
    }

    /// `key` kept if the object does not have it yet; whether it did not.
    #[inline]
    fn fresh(&mut self, key: Key<'de>) -> bool {
        let k: &str = &key.0;
        if self.inline[..self.len].contains(&k) || self.more.iter().any(|m| m == k) {
            return false;
        }
        match key.0 {
            Cow::Borrowed(k) if self.len < self.inline.len() => {
                self.inline[self.len] = k;
                self.len += 1;
            }
            other => self.more.push(other),
        }
        true
    }
}

/// What the output filter reads of a non-streamed answer ([`read_answer`]): per element of
/// `choices`, the places of its texts and of its finish reason, each a slice of the answer.
#[derive(Debug, Default)]
pub struct AnswerSlots<'a> {
    pub choices: Vec<ChoiceSlots<'a>>,
    /// `choices` is there and an array.
    has_choices: bool,
}

/// One element of `choices` (empty when it is not an object).
#[derive(Debug, Default)]
pub struct ChoiceSlots<'a> {
    /// Its place in `choices`.
    pub index: usize,
    /// `text` (completions).
    pub text: Option<&'a RawValue>,
    /// `message.content` (chat).
    pub content: Option<&'a RawValue>,
    /// `message.tool_calls[].function.arguments`, in order.
    pub arguments: Vec<&'a RawValue>,
    pub finish_reason: Option<&'a RawValue>,
}

impl<'a> ChoiceSlots<'a> {
    /// The texts of the choice, in the order the filter reads them: its text, its message's
    /// content, its tool calls' arguments (whatever their order in the answer).
    pub fn texts(&self) -> impl Iterator<Item = &'a RawValue> + '_ {
        self.text
            .into_iter()
            .chain(self.content)
            .chain(self.arguments.iter().copied())
    }
}

/// A non-streamed answer read in one pass: its JSON checked (valid, and no object anywhere
/// repeats a key: see [`Object::top`]) while the places the filter screens are found. `None`
/// when the answer is not valid JSON, repeats a key, or is not an object with a `choices`
/// array: not screenable. Reads what [`Object::top`] and the views over it would find (the
/// multi-pass way the stream filter reads an event), in one pass over the text instead of one
/// per level.
pub fn read_answer(text: &[u8]) -> Option<AnswerSlots<'_>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut out = AnswerSlots::default();
    let mut de = serde_json::Deserializer::from_str(text);
    Read {
        role: Role::Top,
        out: &mut out,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    out.has_choices.then_some(out)
}

/// The `index`th element of the answer's `choices` as an [`Object`] (for an edit that needs
/// the object itself: a member inserted). Reads the answer again: only for a cut choice that
/// has no finish reason.
pub fn choice_object(text: &[u8], index: usize) -> Option<Object<'_>> {
    let Top::Object(top) = Object::top(text)? else {
        return None;
    };
    let choices = top.get("choices").and_then(array)?;
    choices.get(index).copied().and_then(Object::of)
}

/// Where in an answer a value sits, for [`Read`] and the event reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Top,
    Choices,
    Choice,
    Message,
    ToolCalls,
    ToolCall,
    Function,
    /// Anywhere else (only checked).
    Other,
}

/// One value of an answer, read for the role it has there: checked like [`Unambiguous`], and
/// the places the filter screens recorded in `out`.
struct Read<'s, 'a> {
    role: Role,
    out: &'s mut AnswerSlots<'a>,
}

impl<'s, 'de> DeserializeSeed<'de> for Read<'s, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'s, 'de> Visitor<'de> for Read<'s, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.out;
        match self.role {
            Role::Choices => {
                out.has_choices = true;
                let mut index = 0;
                loop {
                    out.choices.push(ChoiceSlots {
                        index,
                        ..ChoiceSlots::default()
                    });
                    let seed = Read {
                        role: Role::Choice,
                        out: &mut *out,
                    };
                    if seq.next_element_seed(seed)?.is_none() {
                        out.choices.pop();
                        break;
                    }
                    index += 1;
                }
            }
            Role::ToolCalls => {
                while seq
                    .next_element_seed(Read {
                        role: Role::ToolCall,
                        out: &mut *out,
                    })?
                    .is_some()
                {}
            }
            _ => while seq.next_element::<Unambiguous>()?.is_some() {},
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        let mut keys = SeenKeys::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let next = match (self.role, &*key.0) {
                (Role::Top, "choices") => Some(Role::Choices),
                (Role::Choice, "message") => Some(Role::Message),
                (Role::Message, "tool_calls") => Some(Role::ToolCalls),
                (Role::ToolCall, "function") => Some(Role::Function),
                _ => None,
            };
            if let Some(role) = next {
                map.next_value_seed(Read {
                    role,
                    out: &mut *out,
                })?;
            } else {
                let slot = out.choices.last_mut();
                match (self.role, &*key.0, slot) {
                    // Kept as slices, checked where they stand as the whole text would be.
                    (Role::Choice, "text", Some(c)) => {
                        c.text = Some(map.next_value_seed(Exact { depth: 3 })?)
                    }
                    (Role::Choice, "finish_reason", Some(c)) => {
                        c.finish_reason = Some(map.next_value_seed(Exact { depth: 3 })?)
                    }
                    (Role::Message, "content", Some(c)) => {
                        c.content = Some(map.next_value_seed(Exact { depth: 4 })?)
                    }
                    (Role::Function, "arguments", Some(c)) => {
                        c.arguments.push(map.next_value_seed(Exact { depth: 7 })?)
                    }
                    _ => {
                        map.next_value::<Unambiguous>()?;
                    }
                }
            }
            keys.add::<A::Error>(key)?;
        }
        Ok(())
    }
}

/// What the stream filter reads of one event's payload ([`read_event`]).
#[derive(Debug, Default)]
pub struct EventSlots<'a> {
    /// The payload is an object.
    pub object: bool,
    /// It has a `choices` array.
    pub has_choices: bool,
    /// Its elements, in order.
    pub choices: Vec<EventChoice<'a>>,
    /// The tool calls of every choice's `delta.tool_calls` that have `function.arguments`, in
    /// order (one list for the event: no list per choice).
    pub calls: Vec<EventCall<'a>>,
    /// The identity fields: `id`, `object`, `created`, `model`, `system_fingerprint`.
    pub identity: [Option<&'a str>; 5],
    /// The `function.arguments` of the tool call being read.
    arguments: Option<Slot<'a>>,
}

/// The names of [`EventSlots::identity`].
pub const IDENTITY: [&str; 5] = ["id", "object", "created", "model", "system_fingerprint"];

/// One element of an event's `choices`.
#[derive(Debug, Default)]
pub struct EventChoice<'a> {
    /// It is an object (the rest is empty otherwise).
    pub object: bool,
    pub index: Option<&'a str>,
    pub finish_reason: Option<&'a str>,
    /// `text` (completions).
    pub text: Option<Slot<'a>>,
    /// `logprobs` is there and not `null`.
    pub logprobs: bool,
    pub delta: Delta,
    /// `delta.content` (a delta that is an object).
    pub content: Option<Slot<'a>>,
    /// The delta is an object with a member other than `content` that is not `null`.
    pub delta_other_set: bool,
    /// `delta.tool_calls`.
    pub tool_calls: Delta,
}

/// What a member is: absent, an object (an array for `tool_calls`), or something else.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    #[default]
    Absent,
    Container,
    Other,
}

/// A tool call of `delta.tool_calls` with `function.arguments`.
#[derive(Debug)]
pub struct EventCall<'a> {
    /// Its choice's place in `choices`.
    pub choice: usize,
    pub index: Option<&'a str>,
    pub arguments: Slot<'a>,
}

/// A value the filter reads: its slice, and its text if it is a string (decoded).
#[derive(Debug)]
pub struct Slot<'a> {
    /// Its JSON text, checked, a slice of the payload.
    pub raw: &'a str,
    pub text: Option<Cow<'a, str>>,
}

/// A value the output filter reads or edits, kept as its slice and checked as [`Unambiguous`]
/// checks it where it stands: a string's escapes decoded (a lone surrogate is refused), a
/// number's range, a container's keys and depth (`depth`: the containers around it).
struct Exact {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Exact {
    type Value = &'de RawValue;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'de RawValue, D::Error> {
        use serde::de::Error;
        let raw = <&'de RawValue>::deserialize(d)?;
        let s = raw.get();
        match s.as_bytes().first() {
            Some(b'"') => {
                // Its escapes decoded (the raw value checked the rest).
                if memchr::memchr(b'\\', s.as_bytes()).is_some() {
                    serde_json::from_str::<String>(s).map_err(D::Error::custom)?;
                }
            }
            Some(b'n' | b't' | b'f') => {}
            Some(b'{' | b'[') => {
                // Within the depth the whole text allows (a raw value skips the limit).
                let mut wrapped = "[".repeat(self.depth);
                wrapped.push_str(s);
                wrapped.push_str(&"]".repeat(self.depth));
                serde_json::from_str::<Unambiguous>(&wrapped).map_err(D::Error::custom)?;
            }
            // A number: in range (a raw value does not check). Without an exponent and
            // shorter than 300 characters, it is below 1e300 whatever its digits.
            _ => {
                let plain = s.len() < 300 && !s.bytes().any(|b| b == b'e' || b == b'E');
                if !plain {
                    serde_json::from_str::<Unambiguous>(s).map_err(D::Error::custom)?;
                }
            }
        }
        Ok(raw)
    }
}
/// The objects of an event's `index`th choice an edit inserts into or replaces: found again
/// in the payload (already checked by [`read_event`]), only for an event that needs it.
pub struct Located<'a> {
    pub choice: Object<'a>,
    /// `delta`, and the object it is.
    pub delta: Option<&'a RawValue>,
    pub delta_object: Option<Object<'a>>,
    /// `delta.tool_calls`.
    pub tool_calls: Option<&'a RawValue>,
}

/// See [`Located`].
pub fn locate(payload: &[u8], index: usize) -> Option<Located<'_>> {
    let top = Object::of_str(std::str::from_utf8(payload).ok()?.trim_ascii())?;
    let choice = top
        .get("choices")
        .and_then(array)?
        .get(index)
        .copied()
        .and_then(Object::of)?;
    let delta = choice.get("delta");
    let delta_object = delta.and_then(Object::of);
    let tool_calls = delta_object.as_ref().and_then(|d| d.get("tool_calls"));
    Some(Located {
        choice,
        delta,
        delta_object,
        tool_calls,
    })
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
    #[cfg(test)]
    pub fn object(&self, key: &str) -> Option<Object<'a>> {
        self.get(key).and_then(Object::of)
    }

    /// Whether any member other than `except` has a value other than `null`.
    #[cfg(test)]
    pub fn any_other_set(&self, except: &str) -> bool {
        self.members
            .iter()
            .any(|(k, v)| k.0 != except && !is_null(*v))
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

/// A checked JSON value's text, a slice of the text it was read from: a [`RawValue`] (read by
/// serde_json) or a `str` (by [`read_event`]).
pub trait Json {
    fn json(&self) -> &str;
}

impl Json for RawValue {
    fn json(&self) -> &str {
        self.get()
    }
}

impl Json for str {
    fn json(&self) -> &str {
        self
    }
}

pub fn is_null(raw: &(impl Json + ?Sized)) -> bool {
    raw.json() == "null"
}

/// A JSON string's text; `None` if `raw` is not a string. Borrowed when it has no escapes.
pub fn string(raw: &(impl Json + ?Sized)) -> Option<Cow<'_, str>> {
    let s = raw.json();
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
pub fn as_u64(raw: &(impl Json + ?Sized)) -> Option<u64> {
    let s = raw.json();
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
    pub fn replace(&mut self, value: &(impl Json + ?Sized), with: Vec<u8>) {
        let at = self.span(value.json());
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
    pub fn append(&mut self, arr: &(impl Json + ?Sized), items: &[Vec<u8>]) {
        let span = self.span(arr.json());
        let at = span.end - 1;
        let mut with = Vec::new();
        let mut first = empty_array(arr.json());
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

    /// A choice's index, texts and finish reason.
    type Seen<'a> = (usize, Vec<&'a str>, Option<&'a str>);

    /// Each choice as the one-pass reader finds it.
    fn slots(text: &str) -> Option<Vec<Seen<'_>>> {
        let a = read_answer(text.as_bytes())?;
        Some(
            a.choices
                .iter()
                .map(|c| {
                    (
                        c.index,
                        c.texts().map(RawValue::get).collect(),
                        c.finish_reason.map(RawValue::get),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn one_pass_reader_finds_every_text_of_every_choice() {
        let chat = r#"{"id":"x","object":"chat.completion","model":"m","choices":[
            {"index":0,"message":{"role":"assistant","content":"hello \"you\"",
              "tool_calls":[{"id":"a","type":"function","function":{"name":"f","arguments":"{\"q\":1}"}},
                            {"id":"b","function":{"arguments":"two","name":"g"}},
                            {"id":"c","function":{"name":"h"}},
                            "not a call"]},
             "logprobs":null,"finish_reason":"tool_calls"},
            {"finish_reason":null,"message":{"content":null},"index":1},
            7,
            {"message":{"content":"last"}}],
            "usage":{"prompt_tokens":1,"choices":[{"text":"not a choice"}]}}"#;
        assert_eq!(
            slots(chat).unwrap(),
            vec![
                (
                    0,
                    vec![r#""hello \"you\"""#, r#""{\"q\":1}""#, r#""two""#],
                    Some(r#""tool_calls""#)
                ),
                (1, vec!["null"], Some("null")),
                (2, vec![], None),
                (3, vec![r#""last""#], None),
            ]
        );
        // Completions; the text first whatever the order of the members.
        let text = r#"{"choices":[{"message":{"content":"b"},"finish_reason":"stop","text":"a"}]}"#;
        assert_eq!(
            slots(text).unwrap(),
            vec![(0, vec![r#""a""#, r#""b""#], Some(r#""stop""#))]
        );
        // Texts that are not strings are kept as they are (the filter skips them).
        assert_eq!(
            slots(r#"{"choices":[{"text":{"a":[1]}}]}"#).unwrap(),
            vec![(0, vec![r#"{"a":[1]}"#], None)]
        );
        assert_eq!(slots(r#" {"choices":[]} "#).unwrap(), vec![]);
    }

    #[test]
    fn one_pass_reader_refuses_what_is_not_screenable() {
        // Not JSON, trailing bytes, not UTF-8, not an object, no `choices` array.
        for bad in [
            r#"{"choices":[{"text":"a"}]"#,
            r#"{"choices":[{"text":"a}]}"#,
            r#"{"choices":[{"text":"a"}]} x"#,
            r#"{"choices":[{"text":"a\q"}]}"#,
            r#"[{"choices":[]}]"#,
            r#""choices""#,
            r#"{"id":"x"}"#,
            r#"{"choices":{"0":{"text":"a"}}}"#,
            r#"{"choices":"a"}"#,
        ] {
            assert!(read_answer(bad.as_bytes()).is_none(), "{bad}");
        }
        assert!(read_answer(b"{\"choices\":[{\"text\":\"\xff\"}]}").is_none());
        // A key repeated in any object, at any depth, also when one copy is escaped.
        for repeated in [
            r#"{"choices":[],"choices":[{"text":"a"}]}"#,
            r#"{"choices":[{"text":"a","text":"b"}]}"#,
            r#"{"choices":[{"text":"a","\u0074ext":"b"}]}"#,
            r#"{"choices":[{"message":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[{"message":{"content":"a"},"message":{"content":"b"}}]}"#,
            r#"{"choices":[{"finish_reason":"stop","finish_reason":"length"}]}"#,
            r#"{"choices":[{"message":{"tool_calls":[{"function":{"arguments":"a","arguments":"b"}}]}}]}"#,
            r#"{"choices":[{"message":{"tool_calls":[{"function":{},"function":{"arguments":"b"}}]}}]}"#,
            r#"{"choices":[{"text":{"k":1,"k":2}}]}"#,
            r#"{"choices":[{"text":[{"k":1,"k":2}]}]}"#,
            r#"{"choices":[{"text":"a"}],"usage":{"n":1,"n":2}}"#,
            r#"{"choices":[{"logprobs":{"content":[{"t":1,"t":2}]}}]}"#,
            r#"{"choices":{"a":1,"a":2}}"#,
        ] {
            assert!(read_answer(repeated.as_bytes()).is_none(), "{repeated}");
            // The multi-pass reader agrees.
            assert!(Object::top(repeated.as_bytes()).is_none(), "{repeated}");
        }
        // The same key in two different objects is fine.
        assert!(read_answer(br#"{"choices":[{"text":"a"},{"text":"b"}],"text":"c"}"#).is_some());
        // What the multi-pass reader refuses inside a value the one-pass reader keeps as a
        // slice: a lone surrogate, a number out of range, nesting deeper than the whole text
        // may be (its containers counted from the top).
        let deep = |levels: usize| {
            format!(
                r#"{{"choices":[{{"message":{{"content":{}1{}}}}}]}}"#,
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        for odd in [
            r#"{"choices":[{"finish_reason":"\ud800"}]}"#.to_owned(),
            r#"{"choices":[{"text":"a\udc00b"}]}"#.to_owned(),
            r#"{"choices":[{"finish_reason":1e400}]}"#.to_owned(),
            r#"{"choices":[{"message":{"tool_calls":[{"function":{"arguments":-1e999}}]}}]}"#
                .to_owned(),
            deep(124),
        ] {
            assert!(Object::top(odd.as_bytes()).is_none(), "{odd}");
            assert!(read_answer(odd.as_bytes()).is_none(), "{odd}");
        }
        let fits = deep(123);
        assert!(Object::top(fits.as_bytes()).is_some());
        assert!(read_answer(fits.as_bytes()).is_some());
    }

    #[test]
    fn the_choice_object_is_found_for_an_insertion() {
        let text = r#"{"choices":[1,{"text":"a"}]}"#;
        let a = read_answer(text.as_bytes()).unwrap();
        let c = choice_object(text.as_bytes(), a.choices[1].index).unwrap();
        let out = edited(text, |e| {
            e.insert(&c, "finish_reason", b"\"content_filter\"")
        });
        assert_eq!(
            out,
            r#"{"choices":[1,{"text":"a","finish_reason":"content_filter"}]}"#
        );
        assert!(choice_object(text.as_bytes(), 0).is_none());
    }

    #[test]
    fn not_json_and_not_objects() {
        assert!(Object::top(b"{not json").is_none());
        assert!(matches!(Object::top(b"[1]"), Some(Top::Other)));
        assert!(array(obj(r#"{"a":{}}"#).get("a").unwrap()).is_none());
    }
}
