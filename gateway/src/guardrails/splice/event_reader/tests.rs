//! The event reader checked against the serde-driven reader it replaced (the oracle, kept
//! here): on the stream filter's own payloads, on hand-written edge cases put at every place
//! the filter reads, and on a few hundred thousand random mutations of realistic chunks. The
//! two must agree exactly: refused or not, and every recorded slice at the same place.

use std::{borrow::Cow, fmt, fmt::Write as _};

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::read_event;
use crate::guardrails::splice::{
    Delta, EventCall, EventChoice, EventSlots, Exact, IDENTITY, IsNull, Key, Role, SeenKeys, Slot,
    Unambiguous, string,
};

/// The reader [`read_event`] replaced, driving serde_json with visitors: the oracle it is
/// checked against.
fn oracle(text: &[u8]) -> Option<EventSlots<'_>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut out = EventSlots::default();
    let mut de = serde_json::Deserializer::from_str(text);
    EventRead {
        role: Role::Top,
        out: &mut out,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    Some(out)
}

/// One value of an event, read for the role it has there: checked like [`Unambiguous`]
/// (returns whether it is `null`), what the stream filter reads recorded in `out`. Roles:
/// `Top`, `Choices`, `Choice`, `Message` (the delta), `ToolCalls`, `ToolCall`, `Function`.
struct EventRead<'s, 'a> {
    role: Role,
    out: &'s mut EventSlots<'a>,
}

impl<'s, 'de> DeserializeSeed<'de> for EventRead<'s, 'de> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

/// A slot as the oracle recorded it: the value's text, and its string's text decoded.
fn slot(raw: &RawValue) -> Slot<'_> {
    Slot {
        raw: raw.get(),
        text: string(raw),
    }
}

impl<'s, 'de> Visitor<'de> for EventRead<'s, 'de> {
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
        let out = self.out;
        match self.role {
            Role::Choices => {
                out.has_choices = true;
                loop {
                    out.choices.push(EventChoice::default());
                    let seed = EventRead {
                        role: Role::Choice,
                        out: &mut *out,
                    };
                    if seq.next_element_seed(seed)?.is_none() {
                        out.choices.pop();
                        break;
                    }
                }
            }
            Role::ToolCalls => {
                if let Some(c) = out.choices.last_mut() {
                    c.tool_calls = Delta::Container;
                }
                while seq
                    .next_element_seed(EventRead {
                        role: Role::ToolCall,
                        out: &mut *out,
                    })?
                    .is_some()
                {}
            }
            _ => while seq.next_element::<Unambiguous>()?.is_some() {},
        }
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let out = self.out;
        let role = self.role;
        match role {
            Role::Top => out.object = true,
            Role::Choice => {
                if let Some(c) = out.choices.last_mut() {
                    c.object = true;
                }
            }
            Role::Message => {
                if let Some(c) = out.choices.last_mut() {
                    c.delta = Delta::Container;
                }
            }
            _ => {}
        }
        // A tool call's, recorded at its end.
        let (mut call_index, mut arguments) = (None, None);
        let mut keys = SeenKeys::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let choice = out.choices.len().saturating_sub(1);
            match (role, &*key.0) {
                (Role::Top, "choices") => {
                    map.next_value_seed(EventRead {
                        role: Role::Choices,
                        out: &mut *out,
                    })?;
                }
                (Role::Top, k) if IDENTITY.contains(&k) => {
                    let at = IDENTITY.iter().position(|i| *i == k).unwrap_or(0);
                    out.identity[at] = Some(map.next_value_seed(Exact { depth: 1 })?.get());
                }
                (Role::Choice, "delta") => {
                    out.choices[choice].delta = Delta::Other;
                    map.next_value_seed(EventRead {
                        role: Role::Message,
                        out: &mut *out,
                    })?;
                }
                (Role::Choice, "index") => {
                    out.choices[choice].index = Some(map.next_value_seed(Exact { depth: 3 })?.get())
                }
                (Role::Choice, "finish_reason") => {
                    out.choices[choice].finish_reason =
                        Some(map.next_value_seed(Exact { depth: 3 })?.get())
                }
                (Role::Choice, "text") => {
                    out.choices[choice].text = Some(slot(map.next_value_seed(Exact { depth: 3 })?))
                }
                (Role::Choice, "logprobs") => {
                    out.choices[choice].logprobs = !map.next_value_seed(IsNull)?
                }
                (Role::Message, "content") => {
                    out.choices[choice].content =
                        Some(slot(map.next_value_seed(Exact { depth: 4 })?))
                }
                (Role::Message, k) => {
                    let null = if k == "tool_calls" {
                        out.choices[choice].tool_calls = Delta::Other;
                        map.next_value_seed(EventRead {
                            role: Role::ToolCalls,
                            out: &mut *out,
                        })?
                    } else {
                        map.next_value_seed(IsNull)?
                    };
                    out.choices[choice].delta_other_set |= !null;
                }
                (Role::ToolCall, "index") => {
                    call_index = Some(map.next_value_seed(Exact { depth: 6 })?.get())
                }
                (Role::ToolCall, "function") => {
                    map.next_value_seed(EventRead {
                        role: Role::Function,
                        out: &mut *out,
                    })?;
                    arguments = out.arguments.take();
                }
                (Role::Function, "arguments") => {
                    out.arguments = Some(slot(map.next_value_seed(Exact { depth: 7 })?))
                }
                _ => {
                    map.next_value::<Unambiguous>()?;
                }
            }
            keys.add::<A::Error>(key)?;
        }
        if let Some(arguments) = arguments {
            out.calls.push(EventCall {
                choice: out.choices.len().saturating_sub(1),
                index: call_index,
                arguments,
            });
        }
        Ok(false)
    }
}

/// Everything `e` records, each slice with its offset in `base`.
fn describe(base: &[u8], e: &EventSlots<'_>) -> String {
    let at = |s: &str| {
        let off = (s.as_ptr() as usize)
            .checked_sub(base.as_ptr() as usize)
            .filter(|o| o + s.len() <= base.len())
            .expect("a slice of the payload");
        format!("{s:?}@{off}")
    };
    let opt = |s: Option<&str>| s.map_or_else(|| "-".to_owned(), at);
    let slot = |s: &Slot<'_>| {
        let text = match &s.text {
            None => "-".to_owned(),
            Some(Cow::Borrowed(t)) => format!("borrowed {}", at(t)),
            Some(Cow::Owned(t)) => format!("owned {t:?}"),
        };
        format!("{} text {text}", at(s.raw))
    };
    let mut d = String::new();
    let _ = writeln!(
        d,
        "object {} has_choices {} arguments {:?}",
        e.object,
        e.has_choices,
        e.arguments.as_ref().map(slot)
    );
    for (k, v) in IDENTITY.iter().zip(&e.identity) {
        let _ = writeln!(d, "{k} {}", opt(*v));
    }
    for c in &e.choices {
        let _ = writeln!(
            d,
            "choice object {} index {} finish {} text {:?} logprobs {} delta {:?} content {:?} \
             other {} tool_calls {:?}",
            c.object,
            opt(c.index),
            opt(c.finish_reason),
            c.text.as_ref().map(slot),
            c.logprobs,
            c.delta,
            c.content.as_ref().map(slot),
            c.delta_other_set,
            c.tool_calls
        );
    }
    for c in &e.calls {
        let _ = writeln!(
            d,
            "call choice {} index {} arguments {}",
            c.choice,
            opt(c.index),
            slot(&c.arguments)
        );
    }
    d
}

/// The two readers agree on `p`; whether it was read.
fn agree(p: &[u8]) -> bool {
    let new = read_event(p).map(|e| describe(p, &e));
    let old = oracle(p).map(|e| describe(p, &e));
    assert_eq!(new, old, "{}", String::from_utf8_lossy(p));
    new.is_some()
}

#[test]
fn the_stream_filters_payloads_are_read_as_before() {
    let payloads = crate::guardrails::stream::tests::payloads();
    let read = payloads.iter().filter(|p| agree(p)).count();
    assert!(read > 50 && read < payloads.len() - 30, "{read}");
}

/// A chunk as a model streams most of them.
const TYPICAL: &str = r#"{"id":"chatcmpl-9x","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","system_fingerprint":"fp_0a1b","choices":[{"index":0,"delta":{"content":" quick"},"logprobs":null,"finish_reason":null}]}"#;

/// Realistic chunks: chat (role, content with escapes, tool calls, logprobs, finish reason,
/// usage), completions, several choices, an error.
const CHUNKS: &[&str] = &[
    TYPICAL,
    r#"{"id":"chatcmpl-9x","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","system_fingerprint":"fp_0a1b","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}"#,
    r#"{"id":"chatcmpl-9x","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hello \"world\"\n\tcaf\u00e9 \ud83d\ude00 a\/b"},"logprobs":{"content":[{"token":"Hello","logprob":-0.0012,"bytes":[72,101],"top_logprobs":[{"token":"Hi","logprob":-6.5e-3,"bytes":null}]}],"refusal":null},"finish_reason":null}]}"#,
    r#"{"id":"chatcmpl-9x","object":"chat.completion.chunk","created":1733000000,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}]}"#,
    r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": \"Par"}},{"index":1,"function":{"arguments":"is\"}"}}]},"finish_reason":null},{"index":1,"delta":{"tool_calls":[{"function":{"arguments":"x"},"index":3}]}}]}"#,
    r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}"#,
    r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":340,"total_tokens":352,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#,
    r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"text":" some\u0020text","index":0,"logprobs":{"tokens":[" some"],"token_logprobs":[-0.5],"top_logprobs":[{" some":-0.5}],"text_offset":[0]},"finish_reason":null}]}"#,
    r#"{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null},{"index":1,"delta":{"content":"b"},"finish_reason":"stop"},{"index":2,"text":"c","finish_reason":"length"}]}"#,
    " {\"choices\" :[ {\"index\": 0 ,\"delta\" :{ \"content\":\"x\" } } ] }\r\n",
    r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":529}}"#,
];

/// A tiny deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One random byte-level change to `p`.
fn mutate(rng: &mut Rng, p: &mut Vec<u8>) {
    const INSERTS: &[u8] = b"\"\\{}[],:0e-.u";
    let at = rng.below(p.len() + 1);
    match rng.below(6) {
        // A byte changed.
        0 if at < p.len() => p[at] = rng.next() as u8,
        1 if at < p.len() => p[at] ^= 1 << rng.below(8),
        2 => p.insert(at, INSERTS[rng.below(INSERTS.len())]),
        3 => p.insert(at, rng.next() as u8),
        4 if at < p.len() => {
            let len = 1 + rng.below(4.min(p.len() - at));
            p.drain(at..at + len);
        }
        // A span duplicated (a repeated member, a longer number, a deeper nesting).
        _ if at < p.len() => {
            let len = 1 + rng.below(24.min(p.len() - at));
            let span = p[at..at + len].to_vec();
            p.splice(at..at, span);
        }
        _ => p.push(INSERTS[rng.below(INSERTS.len())]),
    }
}

#[test]
fn random_mutations_of_chunks_are_read_as_before() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut mutations, mut read) = (0, 0);
    let mut tried = 0;
    while mutations < 200_000 {
        let mut p = CHUNKS[rng.below(CHUNKS.len())].as_bytes().to_vec();
        // Mostly one change (the reading stays close to valid), sometimes a few.
        let n = if rng.below(4) == 0 {
            1 + rng.below(4)
        } else {
            1
        };
        for _ in 0..n {
            mutate(&mut rng, &mut p);
        }
        mutations += n;
        tried += 1;
        read += usize::from(agree(&p));
    }
    // Both outcomes are well represented.
    assert!(
        read > tried / 20 && read < tried * 19 / 20,
        "{read} of {tried}"
    );
}

/// Places a value `V` can stand in an event: every place the filter reads, and some it does
/// not.
const PLACES: &[&str] = &[
    "V",
    "[V]",
    r#"{"id":V,"choices":[{"index":0,"delta":{"content":"x"}}]}"#,
    r#"{"created":V,"choices":[]}"#,
    r#"{"choices":V}"#,
    r#"{"choices":[V]}"#,
    r#"{"choices":[{"index":0},V,{"index":2,"delta":{"content":"x"}}]}"#,
    r#"{"choices":[{"index":V,"delta":{"content":"x"}}]}"#,
    r#"{"choices":[{"index":0,"finish_reason":V}]}"#,
    r#"{"choices":[{"index":0,"text":V}]}"#,
    r#"{"choices":[{"index":0,"logprobs":V,"delta":{}}]}"#,
    r#"{"choices":[{"index":0,"delta":V,"finish_reason":null}]}"#,
    r#"{"choices":[{"index":0,"delta":{"content":V}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"role":V}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":V}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":[V]}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":V,"function":{"arguments":"a"}}]}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":V}]}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":V}}]}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":V,"arguments":"a"}}]}},{"index":1,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"b"}},{"function":{"arguments":V}}]}}]}"#,
    r#"{"choices":[],"usage":V}"#,
];

/// Keys, at each level the filter reads.
const KEY_PLACES: &[&str] = &[
    r#"{K:V}"#,
    r#"{"id":"a",K:V,"choices":[]}"#,
    r#"{"choices":[{"index":0,K:V}]}"#,
    r#"{"choices":[{"index":0,"delta":{"content":"x",K:V}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,K:V,"function":{"arguments":"a"}}]}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"a",K:V}}]}}]}"#,
];

/// Values of every kind, valid or not: strings (escapes, surrogates, control characters),
/// numbers (grammar, range), literals, containers (repeated keys, commas), whitespace.
fn values() -> Vec<String> {
    let mut v: Vec<String> = [
        r#""plain""#,
        r#""""#,
        r#""a\"b""#,
        r#""\\""#,
        r#""\/""#,
        r#""\b\f\n\r\t""#,
        r#""\u0041\u00e9\u20AC""#,
        r#""\u0000""#,
        r#""\uD83D\uDE00""#,
        r#""x\ud83d\ude00y""#,
        r#""\ud83d""#,
        r#""\ud83dx""#,
        r#""\ude00""#,
        r#""\ude00\ud83d""#,
        r#""\ud83d\ud83d""#,
        r#""\ud83d\ud83d\ude00""#,
        r#""\ud83d\n""#,
        r#""\ud83d\u""#,
        r#""\ud83d\u12""#,
        r#""\ud83d\u00e9""#,
        r#""\ud83d\Ude00""#,
        r#""\ud83d/ude00""#,
        r#""\udbff\udfff""#,
        r#""\ud800\udc00""#,
        r#""\u12""#,
        r#""\u12g4""#,
        r#""\U0041""#,
        r#""\x41""#,
        r#""\'""#,
        r#""\""#,
        r#""\\\"""#,
        r#""a"#,
        "\"a\u{1}b\"",
        "\"a\u{1f}b\"",
        "\"a\u{7f}b\"",
        "\"tab\there\"",
        "\"new\nline\"",
        r#""é ü 😀""#,
        r#""a longer text of many words, more than eight bytes at a time: \" then \\ then end""#,
        "0",
        "-0",
        "01",
        "-01",
        "00",
        "1.",
        ".5",
        "1.5",
        "-1.25",
        "-",
        "-a",
        "+1",
        "1e5",
        "1E+5",
        "1e-5",
        "1e",
        "1e+",
        "1.e5",
        "1.0e",
        "2.5E-3",
        "1e400",
        "-1e400",
        "1e308",
        "1.7976931348623157e308",
        "1.7976931348623159e308",
        "0e99999999999",
        "1e298",
        "1e299",
        "1e300",
        "9.99e299",
        "123e297",
        "-1E+0299",
        "1e000000000000000000000000000307",
        "0.5e308",
        "1e-300",
        "1e-400",
        "12345678901234567890123e290",
        "1e99999999999",
        "1e-99999999999",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "0x1",
        "Infinity",
        "NaN",
        "true",
        "false",
        "null",
        "nul",
        "nulll",
        "True",
        "tru",
        "[]",
        "{}",
        "[ ]",
        "{ }",
        "[1,]",
        "[,1]",
        "[1 2]",
        r#"{"a":1,}"#,
        r#"{"a"}"#,
        r#"{"a":}"#,
        r#"{1:2}"#,
        r#"{"a":1 "b":2}"#,
        r#"{"k":1,"k":2}"#,
        r#"{"k":1,"\u006b":2}"#,
        r#"{"\u006b":1,"k":2}"#,
        r#"{"k\u0000":1,"k":2}"#,
        r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9,"\u0061":10}"#,
        r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9,"j":10}"#,
        r#"[{"k":1},{"k":2}]"#,
        r#"{"content":"a","content":"b"}"#,
        r#"{"index":0,"function":{"arguments":"a"},"function":{}}"#,
        r#"{"index":0,"function":{"arguments":"a"}}"#,
        r#"{"index":0,"delta":{"content":"c"},"text":"t"}"#,
        r#"[[[]]]"#,
        r#"{"a":{"a":{"a":[1,"x",null]}}}"#,
        " 1 ",
        "\t\n\r1\r\n\t",
        "\u{b}1",
        "\u{c}1",
        "\u{a0}1",
        "\u{feff}1",
        "",
    ]
    .map(str::to_owned)
    .into();
    v.push("1".repeat(299));
    v.push("1".repeat(300));
    v.push("1".repeat(320));
    v.push(format!("0.{}1", "0".repeat(400)));
    v.push(format!("{}.5", "9".repeat(310)));
    // Nesting around the limit.
    for n in 118..=129 {
        v.push(format!("{}1{}", "[".repeat(n), "]".repeat(n)));
        v.push(format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n)));
    }
    v
}

#[test]
fn edge_cases_at_every_place_are_read_as_before() {
    let values = values();
    let mut read = 0;
    let mut total = 0;
    for place in PLACES {
        for v in &values {
            read += usize::from(agree(place.replace('V', v).as_bytes()));
            total += 1;
        }
    }
    let keys: Vec<&String> = values.iter().filter(|v| v.starts_with('"')).collect();
    for place in KEY_PLACES {
        for k in &keys {
            for v in [r#""v""#, "null", "1", r#"{"k":1}"#, "[1]"] {
                let p = place.replace('K', k).replace('V', v);
                read += usize::from(agree(p.as_bytes()));
                // The key repeated: escaped or not, each copy refused alike.
                let twice = place.replace('K', &format!("{k}:1,{k}")).replace('V', v);
                agree(twice.as_bytes());
                total += 2;
            }
        }
    }
    // Known members under their escaped names, repeated as they are.
    for p in [
        r#"{"choices":[{"index":0,"delta":{"con\u0074ent":"x","content":"y"}}]}"#,
        r#"{"\u0063hoices":[{"index":0,"delta":{"content":"x"}}]}"#,
        r#"{"choices":[{"\u0069ndex":3,"\u0064elta":{"\u0063ontent":"x\ny"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"tool_\u0063alls":[{"function":{"arguments":"a"}}]}}]}"#,
    ] {
        agree(p.as_bytes());
    }
    // Whole payloads: a BOM, trailing bytes, whitespace only, not UTF-8.
    let chunk = CHUNKS[1];
    for p in [
        format!("\u{feff}{chunk}"),
        format!("{chunk} x"),
        format!("{chunk}}}"),
        format!("{chunk},"),
        format!("{chunk}\u{0}"),
        format!(" \t\r\n{chunk} \t\r\n"),
        format!("{chunk}{chunk}"),
        " ".into(),
        String::new(),
    ] {
        agree(p.as_bytes());
    }
    for p in [
        &b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\"}}]}"[..],
        b"{\"id\":\"\xc3\",\"choices\":[]}",
        b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xed\xa0\x80\"}}]}",
    ] {
        assert!(!agree(p));
    }
    // Both outcomes are well represented.
    assert!(
        read > total / 10 && read < total * 9 / 10,
        "{read} of {total}"
    );
}

/// What each reader costs per chunk, for a look (`cargo test --release -p moat --lib
/// read_cost -- --ignored --nocapture`); no figure is asserted.
#[test]
#[ignore]
fn read_cost() {
    let n = 200_000;
    for chunk in [TYPICAL, CHUNKS[2], CHUNKS[4]] {
        let time = |read: &dyn Fn(&[u8]) -> bool| {
            let start = std::time::Instant::now();
            let read = (0..n)
                .filter(|_| read(std::hint::black_box(chunk.as_bytes())))
                .count();
            assert_eq!(read, n);
            start.elapsed().as_secs_f64() * 1e9 / n as f64
        };
        // The second of two rounds each (the first warms up).
        let (_, new) = (
            time(&|p| read_event(p).is_some()),
            time(&|p| read_event(p).is_some()),
        );
        let (_, old) = (
            time(&|p| oracle(p).is_some()),
            time(&|p| oracle(p).is_some()),
        );
        println!(
            "{} B: {new:.0} ns, serde-driven {old:.0} ns ({:.1}x)",
            chunk.len(),
            old / new
        );
    }
}
