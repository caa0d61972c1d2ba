//! The stream filter's reader of an event's `data:` payload ([`read_event`]): a hand-written,
//! single-pass scanner over the bytes that checks the JSON exactly as serde_json 1.0.154's
//! `deserialize_any` with the duplicate-key check of [`SeenKeys`] does (what
//! [`Object::top`](super::Object::top) accepts) and records, in the same pass, the places the
//! filter reads ([`EventSlots`]), each a slice of the payload.
//!
//! It exists because every event of every streamed answer goes through it: driven through
//! serde's visitors the same reading was a sixth of a gateway worker's CPU under streaming
//! load. The serde-driven reader it replaces is kept as the oracle of its tests.
//!
//! What it refuses, as serde_json does: anything but whitespace (` \t\n\r`) around the value;
//! a string with a raw control character, an unknown escape, or a UTF-16 surrogate not in a
//! leading-then-trailing pair (every string is decoded by `deserialize_any`, read or not);
//! a number off the JSON grammar or out of `f64` range; nesting deeper than serde_json's
//! recursion limit; an object anywhere repeating a key (compared decoded).

use std::borrow::Cow;

use super::{Delta, EventCall, EventChoice, EventSlots, IDENTITY, Key, Role, SeenKeys, Slot};

/// The most containers serde_json accepts nested (its recursion limit, 128, refuses the
/// 128th).
const MAX_DEPTH: usize = 127;

/// A payload the filter cannot screen (see the module docs).
struct Refused;

type Read<T> = Result<T, Refused>;

/// A stream event's payload read in one pass: checked exactly as [`super::Object::top`]
/// checks it (UTF-8, valid JSON, no object anywhere repeating a key) while what the stream
/// filter reads is recorded. `None` when it is not screenable. The objects an edit inserts a
/// member into are found again on demand ([`super::locate`]): only for the few events that
/// need it.
pub fn read_event(text: &[u8]) -> Option<EventSlots<'_>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut r = Reader {
        text,
        at: 0,
        depth: 0,
        out: EventSlots::default(),
    };
    r.whitespace();
    r.value(Role::Top).ok()?;
    r.whitespace();
    (r.at == text.len()).then_some(r.out)
}

struct Reader<'a> {
    text: &'a str,
    /// The next byte to read.
    at: usize,
    /// The containers the reader is in.
    depth: usize,
    out: EventSlots<'a>,
}

// The small helpers are inlined: a payload is a few dozen tokens, and the calls per token
// were a fifth of the reading's time.
impl<'a> Reader<'a> {
    /// The next byte; 0 at the end (never valid where a byte is peeked).
    #[inline(always)]
    fn peek(&self) -> u8 {
        self.text.as_bytes().get(self.at).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn whitespace(&mut self) {
        while matches!(self.peek(), b' ' | b'\t' | b'\n' | b'\r') {
            self.at += 1;
        }
    }

    /// Past `byte`, which must come next.
    #[inline(always)]
    fn expect(&mut self, byte: u8) -> Read<()> {
        if self.peek() != byte {
            return Err(Refused);
        }
        self.at += 1;
        Ok(())
    }

    /// The choice being read (a role below `Choice` only comes after one is pushed).
    #[inline(always)]
    fn choice(&mut self) -> &mut EventChoice<'a> {
        let last = self.out.choices.len().saturating_sub(1);
        &mut self.out.choices[last]
    }

    /// One value, read for the role it has; whether it is `null`.
    fn value(&mut self, role: Role) -> Read<bool> {
        match self.peek() {
            b'{' => {
                self.enter()?;
                self.object(role)?;
                self.depth -= 1;
            }
            b'[' => {
                self.enter()?;
                self.array(role)?;
                self.depth -= 1;
            }
            b'"' => {
                self.string()?;
            }
            b'n' => {
                self.literal(b"null")?;
                return Ok(true);
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return Err(Refused),
        }
        Ok(false)
    }

    /// One value, checked; its text.
    #[inline(always)]
    fn raw(&mut self) -> Read<&'a str> {
        let start = self.at;
        self.value(Role::Other)?;
        Ok(&self.text[start..self.at])
    }

    /// One value the filter reads or edits: its text, and its string's text decoded.
    fn slot(&mut self) -> Read<Slot<'a>> {
        let start = self.at;
        let text = if self.peek() == b'"' {
            Some(self.text_of_string()?)
        } else {
            self.value(Role::Other)?;
            None
        };
        Ok(Slot {
            raw: &self.text[start..self.at],
            text,
        })
    }

    fn enter(&mut self) -> Read<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Refused);
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Read<()> {
        let end = self.at + word.len();
        if self.text.as_bytes().get(self.at..end) != Some(word) {
            return Err(Refused);
        }
        self.at = end;
        Ok(())
    }

    fn array(&mut self, role: Role) -> Read<()> {
        self.at += 1;
        match role {
            Role::Choices => self.out.has_choices = true,
            Role::ToolCalls => self.choice().tool_calls = Delta::Container,
            _ => {}
        }
        self.whitespace();
        if self.peek() == b']' {
            self.at += 1;
            return Ok(());
        }
        loop {
            match role {
                Role::Choices => {
                    self.out.choices.push(EventChoice::default());
                    self.value(Role::Choice)?;
                }
                Role::ToolCalls => {
                    self.value(Role::ToolCall)?;
                }
                _ => {
                    self.value(Role::Other)?;
                }
            }
            self.whitespace();
            match self.peek() {
                b',' => {
                    self.at += 1;
                    self.whitespace();
                }
                b']' => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Refused),
            }
        }
    }

    fn object(&mut self, role: Role) -> Read<()> {
        self.at += 1;
        match role {
            Role::Top => self.out.object = true,
            Role::Choice => self.choice().object = true,
            Role::Message => self.choice().delta = Delta::Container,
            _ => {}
        }
        // A tool call's, recorded at its end.
        let (mut call_index, mut arguments) = (None, None);
        let mut keys = SeenKeys::default();
        self.whitespace();
        if self.peek() == b'}' {
            self.at += 1;
            return Ok(());
        }
        loop {
            if self.peek() != b'"' {
                return Err(Refused);
            }
            let key = Key(self.text_of_string()?);
            self.whitespace();
            self.expect(b':')?;
            self.whitespace();
            match (role, &*key.0) {
                (Role::Top, "choices") => {
                    self.value(Role::Choices)?;
                }
                (Role::Top, k) => match IDENTITY.iter().position(|i| *i == k) {
                    Some(at) => self.out.identity[at] = Some(self.raw()?),
                    None => {
                        self.value(Role::Other)?;
                    }
                },
                (Role::Choice, "delta") => {
                    self.choice().delta = Delta::Other;
                    self.value(Role::Message)?;
                }
                (Role::Choice, "index") => self.choice().index = Some(self.raw()?),
                (Role::Choice, "finish_reason") => self.choice().finish_reason = Some(self.raw()?),
                (Role::Choice, "text") => self.choice().text = Some(self.slot()?),
                (Role::Choice, "logprobs") => self.choice().logprobs = !self.value(Role::Other)?,
                (Role::Message, "content") => self.choice().content = Some(self.slot()?),
                (Role::Message, k) => {
                    let null = if k == "tool_calls" {
                        self.choice().tool_calls = Delta::Other;
                        self.value(Role::ToolCalls)?
                    } else {
                        self.value(Role::Other)?
                    };
                    self.choice().delta_other_set |= !null;
                }
                (Role::ToolCall, "index") => call_index = Some(self.raw()?),
                (Role::ToolCall, "function") => {
                    self.value(Role::Function)?;
                    arguments = self.out.arguments.take();
                }
                (Role::Function, "arguments") => self.out.arguments = Some(self.slot()?),
                _ => {
                    self.value(Role::Other)?;
                }
            }
            if !keys.fresh(key) {
                return Err(Refused);
            }
            self.whitespace();
            match self.peek() {
                b',' => {
                    self.at += 1;
                    self.whitespace();
                }
                b'}' => {
                    self.at += 1;
                    break;
                }
                _ => return Err(Refused),
            }
        }
        if let Some(arguments) = arguments {
            self.out.calls.push(EventCall {
                choice: self.out.choices.len().saturating_sub(1),
                index: call_index,
                arguments,
            });
        }
        Ok(())
    }

    /// The string at its opening quote, checked; whether it has escapes.
    #[inline(always)]
    fn string(&mut self) -> Read<bool> {
        let bytes = self.text.as_bytes();
        let mut i = self.at + 1;
        let mut escaped = false;
        loop {
            i = special(bytes, i).ok_or(Refused)?;
            match bytes[i] {
                b'"' => {
                    self.at = i + 1;
                    return Ok(escaped);
                }
                b'\\' => {
                    escaped = true;
                    i += 1 + escape(bytes, i + 1)?.1;
                }
                // A raw control character.
                _ => return Err(Refused),
            }
        }
    }

    /// The string at its opening quote, checked; its text, borrowed unless it has escapes.
    #[inline(always)]
    fn text_of_string(&mut self) -> Read<Cow<'a, str>> {
        let start = self.at;
        let escaped = self.string()?;
        let body = &self.text[start + 1..self.at - 1];
        Ok(if escaped {
            Cow::Owned(decode(body)?)
        } else {
            Cow::Borrowed(body)
        })
    }

    /// A number, checked as serde_json checks it: its grammar here; its range by serde_json
    /// itself where it could be out of `f64` range.
    fn number(&mut self) -> Read<()> {
        let start = self.at;
        if self.peek() == b'-' {
            self.at += 1;
        }
        let integer = self.at;
        match self.peek() {
            // One leading zero, alone.
            b'0' => {
                self.at += 1;
                if self.peek().is_ascii_digit() {
                    return Err(Refused);
                }
            }
            b'1'..=b'9' => self.digits(),
            _ => return Err(Refused),
        }
        let integer_digits = self.at - integer;
        if self.peek() == b'.' {
            self.at += 1;
            self.some_digits()?;
        }
        // Below 10 to the power of its integer digits plus its exponent.
        let mut magnitude = integer_digits;
        if matches!(self.peek(), b'e' | b'E') {
            self.at += 1;
            let negative = self.peek() == b'-';
            if matches!(self.peek(), b'+' | b'-') {
                self.at += 1;
            }
            let digits = self.at;
            self.some_digits()?;
            // A negative exponent only shrinks it (at worst to zero: never out of range).
            if !negative {
                let exponent = self.text[digits..self.at].parse().unwrap_or(usize::MAX);
                magnitude = magnitude.saturating_add(exponent);
            }
        }
        // Shorter than 300 characters and below 1e300: in range whatever its digits.
        if magnitude >= 300 || self.at - start >= 300 {
            serde_json::from_str::<super::Unambiguous>(&self.text[start..self.at])
                .map_err(|_| Refused)?;
        }
        Ok(())
    }

    fn digits(&mut self) {
        while self.peek().is_ascii_digit() {
            self.at += 1;
        }
    }

    /// At least one digit.
    fn some_digits(&mut self) -> Read<()> {
        if !self.peek().is_ascii_digit() {
            return Err(Refused);
        }
        self.digits();
        Ok(())
    }
}

/// Where from `i` on the first `"`, `\` or control character of a string is (`None`: the
/// text ends first). Eight bytes at a time: a string's text is most of a payload.
#[inline(always)]
fn special(bytes: &[u8], mut i: usize) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    // A byte of `x` below `n` (n <= 128): its high bit set in the result. Bits above the
    // first such byte may be set wrongly; the first is exact.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let hit = below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            | below(x, 0x20);
        if hit != 0 {
            return Some(i + hit.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    bytes[i.min(bytes.len())..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|p| i + p)
}

/// The escape whose letter is at `i` (after its backslash): what it stands for and how many
/// bytes it takes after the backslash. A `\u` escape of a leading surrogate must be followed
/// at once by one of a trailing surrogate; a trailing one alone is refused.
fn escape(bytes: &[u8], i: usize) -> Read<(char, usize)> {
    let c = match bytes.get(i) {
        Some(b'"') => '"',
        Some(b'\\') => '\\',
        Some(b'/') => '/',
        Some(b'b') => '\x08',
        Some(b'f') => '\x0c',
        Some(b'n') => '\n',
        Some(b'r') => '\r',
        Some(b't') => '\t',
        Some(b'u') => {
            let n = hex4(bytes, i + 1)?;
            let (code, len) = match n {
                0xDC00..=0xDFFF => return Err(Refused),
                0xD800..=0xDBFF => {
                    if bytes.get(i + 5..i + 7) != Some(b"\\u") {
                        return Err(Refused);
                    }
                    let low = hex4(bytes, i + 7)?;
                    if !(0xDC00..=0xDFFF).contains(&low) {
                        return Err(Refused);
                    }
                    let high = u32::from(n - 0xD800) << 10;
                    (0x1_0000 + (high | u32::from(low - 0xDC00)), 11)
                }
                _ => (u32::from(n), 5),
            };
            return char::from_u32(code).map(|c| (c, len)).ok_or(Refused);
        }
        _ => return Err(Refused),
    };
    Ok((c, 1))
}

/// A checked string's text (between its quotes) with its escapes decoded: checked first, then
/// decoded into a buffer of the right size.
fn decode(body: &str) -> Read<String> {
    let bytes = body.as_bytes();
    let mut out = String::with_capacity(body.len());
    let mut plain = 0;
    while let Some(at) = memchr::memchr(b'\\', &bytes[plain..]) {
        let i = plain + at;
        out.push_str(&body[plain..i]);
        let (c, len) = escape(bytes, i + 1)?;
        out.push(c);
        plain = i + 1 + len;
    }
    out.push_str(&body[plain..]);
    Ok(out)
}

/// Four hex digits at `i`.
fn hex4(bytes: &[u8], i: usize) -> Read<u16> {
    let digits = bytes.get(i..i + 4).ok_or(Refused)?;
    digits.iter().try_fold(0u16, |n, &d| {
        let v = (d as char).to_digit(16).ok_or(Refused)?;
        Ok((n << 4) | v as u16)
    })
}

#[cfg(test)]
mod tests;
