//! The output classes an answer is screened for, and the incremental filter that screens a
//! text as it grows ([`TextFilter`]): secrets (moat's own API keys with their checksum, JWTs,
//! PEM private keys, cloud keys, GitHub and Slack tokens, high-entropy values assigned to
//! secret-looking names), PII (emails, phone numbers, card numbers with a Luhn check, IBANs
//! with their mod-97 check), markdown links and images to hosts off the allowlist, and the
//! request's canary.
//!
//! Every pattern is a `regex` (linear time). A candidate must also pass its class's check
//! (checksum, Luhn, entropy…), so a look-alike is left alone.
//!
//! Streaming: text is released only once the filter has passed it. A hold-back window of
//! `hold_back` bytes stays unreleased, and the release point never falls inside a run of
//! non-whitespace (a token, a key, a JWT of any length) nor inside a match that may still grow
//! (one touching the end of what arrived: an open PEM block). So a secret split across chunks
//! is seen whole before any of it leaves.

use std::{ops::Range, sync::LazyLock};

use aho_corasick::{AhoCorasick, AhoCorasickKind};
use base64::Engine as _;
use regex::Regex;

/// An output class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    MoatKey,
    Jwt,
    PrivateKey,
    CloudKey,
    GithubToken,
    SlackToken,
    Secret,
    Email,
    Phone,
    Card,
    Iban,
    Link,
    Canary,
}

impl Class {
    /// Every class screened by a pattern (the canary is matched as a literal).
    pub const PATTERNS: [Class; 12] = [
        Class::MoatKey,
        Class::Jwt,
        Class::PrivateKey,
        Class::CloudKey,
        Class::GithubToken,
        Class::SlackToken,
        Class::Secret,
        Class::Email,
        Class::Phone,
        Class::Card,
        Class::Iban,
        Class::Link,
    ];
    /// The secret classes (`secrets = …` in the policy).
    pub const SECRETS: [Class; 7] = [
        Class::MoatKey,
        Class::Jwt,
        Class::PrivateKey,
        Class::CloudKey,
        Class::GithubToken,
        Class::SlackToken,
        Class::Secret,
    ];
    /// The PII classes (`pii = [...]`).
    pub const PII: [Class; 4] = [Class::Email, Class::Phone, Class::Card, Class::Iban];

    /// The name in the config, the marker (`[REDACTED:<name>]`), metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Class::MoatKey => "moat_key",
            Class::Jwt => "jwt",
            Class::PrivateKey => "private_key",
            Class::CloudKey => "cloud_key",
            Class::GithubToken => "github_token",
            Class::SlackToken => "slack_token",
            Class::Secret => "secret",
            Class::Email => "email",
            Class::Phone => "phone",
            Class::Card => "card",
            Class::Iban => "iban",
            Class::Link => "link",
            Class::Canary => "canary",
        }
    }

    pub fn from_name(name: &str) -> Option<Class> {
        Class::PATTERNS
            .into_iter()
            .chain([Class::Canary])
            .find(|c| c.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What to do when a class is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum OutputAction {
    #[default]
    Off,
    Redact,
    Block,
}

/// Each class's action (the canary always blocks when present).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputPolicy {
    pub actions: [OutputAction; 13],
    /// Hosts markdown links may point at (a host or any subdomain of it).
    pub link_allowlist: Vec<String>,
}

impl OutputPolicy {
    pub fn action(&self, c: Class) -> OutputAction {
        self.actions[c.index()]
    }

    pub fn set(&mut self, c: Class, a: OutputAction) {
        self.actions[c.index()] = a;
    }

    pub fn any(&self) -> bool {
        self.actions.iter().any(|a| *a != OutputAction::Off)
    }
}

/// The class's pattern. ASCII classes (`(?-u)`) where a class is about ASCII tokens: a
/// Unicode `\b`, `\w` or `\d` would make the regex engine leave its DFA for a slower one on
/// any non-ASCII answer, for nothing (keys, numbers and addresses are ASCII). Long runs are
/// unbounded (`+`) rather than bounded (`{0,2000}`): a bounded repetition of a class is that
/// many copies of it in the automaton.
fn pattern(c: Class) -> &'static str {
    match c {
        Class::MoatKey => r"(?-u)\bmoat_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}\b",
        Class::Jwt => r"(?-u)\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        Class::PrivateKey => {
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\z)"
        }
        Class::CloudKey => {
            r"(?-u)\b(?:(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}|AIza[0-9A-Za-z_-]{35})\b|(?i:aws_secret_access_key)\s*[=:]\s*[A-Za-z0-9/+]{40}"
        }
        Class::GithubToken => {
            r"(?-u)\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b"
        }
        Class::SlackToken => {
            r"(?-u)\bxox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}"
        }
        Class::Secret => {
            r#"(?i-u)\b[\w.-]{0,40}(?:secret|token|passw(?:or)?d|pwd|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credential|auth)s?[\w.-]{0,20}["']?\s*[:=]\s*["']?([A-Za-z0-9+/_.~!@#$%^&*-]{12,256})"#
        }
        Class::Email => {
            r"(?-u)\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,24}\b"
        }
        Class::Phone => {
            r"(?-u)(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)|\b[0-9]{2,4})[ .-][0-9]{3,4}[ .-][0-9]{3,4}\b"
        }
        Class::Card => r"(?-u)\b[0-9](?:[ -]?[0-9]){12,18}\b",
        Class::Iban => r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
        Class::Link => {
            r#"!?\[[^\]\n]*\]\(\s*<?(?:https?:)?//([^/\s)>?#:]+)[^\s)>]*>?(?:\s+"[^"\n]*")?\s*\)"#
        }
        Class::Canary => unreachable!("the canary is a literal"),
    }
}

/// The literals that a class's match must contain (ASCII case-insensitive), so that a regex
/// runs only on a text that may hold its class. Email, phone, card and IBAN are gated by
/// `@` and digit counts instead (see [`candidates`]).
fn triggers(c: Class) -> &'static [&'static str] {
    match c {
        Class::MoatKey => &["moat_"],
        Class::Jwt => &["eyj"],
        Class::PrivateKey => &["-----begin "],
        Class::CloudKey => &[
            "akia",
            "asia",
            "agpa",
            "aida",
            "aroa",
            "anpa",
            "anva",
            "aipa",
            "aiza",
            "aws_secret_access_key",
        ],
        Class::GithubToken => &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
        Class::SlackToken => &["xox", "hooks.slack.com"],
        Class::Secret => &[
            "secret",
            "token",
            "passw",
            "pwd",
            "apikey",
            "api_key",
            "api-key",
            "accesskey",
            "access_key",
            "access-key",
            "privatekey",
            "private_key",
            "private-key",
            "credential",
            "auth",
        ],
        Class::Link => &["]("],
        _ => &[],
    }
}

struct Compiled {
    each: Vec<Regex>,
    /// Every class's triggers; `trigger_class[pattern]` says whose.
    triggers: AhoCorasick,
    trigger_class: Vec<Class>,
}

static COMPILED: LazyLock<Compiled> = LazyLock::new(|| {
    let mut lits = Vec::new();
    let mut trigger_class = Vec::new();
    for c in Class::PATTERNS {
        for t in triggers(c) {
            lits.push(*t);
            trigger_class.push(c);
        }
    }
    Compiled {
        each: Class::PATTERNS
            .iter()
            .map(|c| Regex::new(pattern(*c)).expect("shipped output patterns compile"))
            .collect(),
        triggers: AhoCorasick::builder()
            .ascii_case_insensitive(true)
            // A DFA: the fastest overlapping search, and the automaton is small.
            .kind(Some(AhoCorasickKind::DFA))
            .build(&lits)
            .expect("shipped output triggers build"),
        trigger_class,
    }
});

/// Compiles the output patterns now (at config load) rather than on the first answer.
pub fn warm_up() {
    LazyLock::force(&COMPILED);
}

/// The classes `text` may hold (a superset: each candidate's regex and check decide).
fn candidates(text: &str) -> [bool; N] {
    let mut g = Gate::default();
    g.feed(text);
    g.may()
}

const N: usize = Class::PATTERNS.len();
/// The longest trigger, less one: how far back a trigger may start that ends in new text.
const TRIGGER_OVERLAP: usize = 20;

/// What the triggers say of a text that grows at the end and shrinks at the start (a stream's
/// hold-back window), kept up to date from the new bytes alone: so a chunk costs a pass over
/// itself, not over the window. Offsets are absolute (from the start of the stream), plus one
/// (0: never seen).
#[derive(Debug, Default)]
struct Gate {
    /// The start of each class's last trigger.
    last: [usize; N],
    at_sign: usize,
    assign: usize,
    upper: usize,
    /// ASCII digits in the text.
    digits: usize,
    /// Where the text starts and ends.
    base: usize,
    end: usize,
}

impl Gate {
    /// `text` is the whole text now; its last `text.len() - (end - base)` bytes are new.
    fn feed(&mut self, text: &str) {
        let c = &*COMPILED;
        let known = self.end - self.base;
        let new = &text.as_bytes()[known..];
        // Triggers ending in the new bytes (those wholly before were seen already).
        let from = known.saturating_sub(TRIGGER_OVERLAP);
        for m in c.triggers.find_overlapping_iter(&text.as_bytes()[from..]) {
            let at = self.base + from + m.start() + 1;
            let slot = &mut self.last[c.trigger_class[m.pattern().as_usize()].index()];
            *slot = (*slot).max(at);
        }
        let abs = |i: usize| self.base + known + i + 1;
        if let Some(i) = memchr::memrchr(b'@', new) {
            self.at_sign = abs(i);
        }
        if let Some(i) = memchr::memrchr2(b':', b'=', new) {
            self.assign = abs(i);
        }
        if let Some(i) = new.iter().rposition(u8::is_ascii_uppercase) {
            self.upper = abs(i);
        }
        self.digits += new.iter().filter(|b| b.is_ascii_digit()).count();
        self.end += new.len();
    }

    /// The text loses its first bytes, `gone`.
    fn drop_front(&mut self, gone: &[u8]) {
        self.digits -= gone.iter().filter(|b| b.is_ascii_digit()).count();
        self.base += gone.len();
    }

    fn may(&self) -> [bool; N] {
        let held = |at: usize| at > self.base;
        let mut may = self.last.map(held);
        may[Class::Email.index()] = held(self.at_sign);
        may[Class::Phone.index()] = self.digits >= 9;
        may[Class::Card.index()] = self.digits >= 13;
        may[Class::Iban.index()] = self.digits >= 2 && held(self.upper);
        // An assignment needs `:` or `=`.
        may[Class::Secret.index()] &= held(self.assign);
        may
    }
}

/// One finding: its class and the span to take out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub class: Class,
    /// The whole match (what must not be cut in two).
    pub span: Range<usize>,
    /// What a redaction replaces (the value alone for an assignment).
    pub redact: Range<usize>,
}

/// Every finding in `text` of the classes `policy` acts on, plus the canary, in order.
pub fn scan(text: &str, policy: &OutputPolicy, canary: Option<&str>) -> Vec<Found> {
    scan_classes(text, candidates(text), policy, canary)
}

/// [`scan`] for the classes `may` says the text may hold.
fn scan_classes(
    text: &str,
    may: [bool; N],
    policy: &OutputPolicy,
    canary: Option<&str>,
) -> Vec<Found> {
    let mut out = Vec::new();
    let c = &*COMPILED;
    for (i, class) in Class::PATTERNS.into_iter().enumerate() {
        if !may[i] || policy.action(class) == OutputAction::Off {
            continue;
        }
        let re = &c.each[i];
        if class == Class::Secret {
            for caps in re.captures_iter(text) {
                let (m, v) = (caps.get(0).unwrap(), caps.get(1).unwrap());
                if high_entropy(v.as_str()) {
                    out.push(Found {
                        class,
                        span: m.range(),
                        redact: v.range(),
                    });
                }
            }
            continue;
        }
        for m in re.find_iter(text) {
            if check(class, m.as_str(), policy) && context_ok(class, text, m.range()) {
                out.push(Found {
                    class,
                    span: m.range(),
                    redact: m.range(),
                });
            }
        }
    }
    if let Some(canary) = canary.filter(|c| !c.is_empty()) {
        for (at, _) in text.match_indices(canary) {
            out.push(Found {
                class: Class::Canary,
                span: at..at + canary.len(),
                redact: at..at + canary.len(),
            });
        }
    }
    out.sort_by_key(|f| (f.redact.start, std::cmp::Reverse(f.redact.end)));
    out
}

/// The class's own check of a candidate.
fn check(class: Class, m: &str, policy: &OutputPolicy) -> bool {
    match class {
        Class::MoatKey => crate::auth::api_key::parse(m).is_some(),
        Class::Jwt => {
            let header = m.split('.').next().unwrap_or("");
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header.trim_end_matches('='))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v.get("alg").is_some() || v.get("typ").is_some())
        }
        Class::Phone => {
            let digits = m.bytes().filter(u8::is_ascii_digit).count();
            // Dotted quads are addresses, not numbers.
            (9..=15).contains(&digits) && (m.starts_with('+') || m.contains(['-', ' ', '(']))
        }
        Class::Card => luhn(m),
        Class::Iban => iban(m),
        Class::Link => !allowed_link(m, &policy.link_allowlist),
        _ => true,
    }
}

/// A phone number is not part of a longer run of digit groups (a card number, an id).
fn context_ok(class: Class, text: &str, r: Range<usize>) -> bool {
    if class != Class::Phone {
        return true;
    }
    let digit_group = |s: &[u8]| matches!(s, [b' ' | b'-' | b'.', d, ..] if d.is_ascii_digit());
    let after = &text.as_bytes()[r.end..];
    let before: Vec<u8> = text.as_bytes()[..r.start]
        .iter()
        .rev()
        .take(2)
        .copied()
        .collect();
    !digit_group(after) && !digit_group(&before) && !before.first().is_some_and(u8::is_ascii_digit)
}

/// The Luhn check over the digits of `s` (13 to 19 of them).
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) || digits.iter().all(|d| *d == digits[0]) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The IBAN mod-97 check.
pub fn iban(s: &str) -> bool {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        for d in if v >= 10 {
            vec![v / 10, v % 10]
        } else {
            vec![v]
        } {
            rem = (rem * 10 + d) % 97;
        }
    }
    rem == 1
}

/// Shannon entropy of at least 3.5 bits a character, and letters with digits or symbols: a
/// key, not a word or a placeholder (`changeme`, `********`).
fn high_entropy(v: &str) -> bool {
    let mut counts = [0u32; 256];
    for b in v.bytes() {
        counts[b as usize] += 1;
    }
    let n = v.len() as f64;
    let h: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    let alpha = v.bytes().any(|b| b.is_ascii_alphabetic());
    let other = v.bytes().any(|b| !b.is_ascii_alphabetic());
    h >= 3.5 && alpha && other
}

/// Whether a markdown link's host is on the allowlist (the host or a subdomain of it).
fn allowed_link(m: &str, allow: &[String]) -> bool {
    let Some(host) = COMPILED.each[Class::PATTERNS.len() - 1]
        .captures(m)
        .and_then(|c| c.get(1))
        .map(|h| h.as_str().to_ascii_lowercase())
    else {
        return false;
    };
    let host = host.rsplit('@').next().unwrap_or(&host).to_owned();
    allow.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        host == a || host.ends_with(&format!(".{a}"))
    })
}

/// The text a redaction leaves: `[REDACTED:<class>]`.
pub fn marker(c: Class) -> String {
    format!("[REDACTED:{}]", c.name())
}

/// What the filter decided about the text it was given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Screened text the client may see now.
    pub release: String,
    /// A class whose action is `block` (or the canary) was found: the answer ends after
    /// `release` (the text before it).
    pub blocked: Option<Class>,
    /// Classes redacted in `release`.
    pub redacted: Vec<Class>,
}

/// The incremental filter of one text (a stream's choice, or a whole answer).
#[derive(Debug)]
pub struct TextFilter {
    pending: String,
    hold_back: usize,
    gate: Gate,
}

impl TextFilter {
    pub fn new(hold_back: usize) -> Self {
        Self {
            pending: String::new(),
            hold_back,
            gate: Gate::default(),
        }
    }

    /// Takes `text` in; releases what is safe to release (everything when `last`).
    pub fn push(
        &mut self,
        text: &str,
        last: bool,
        policy: &OutputPolicy,
        canary: Option<&str>,
    ) -> Step {
        self.pending.push_str(text);
        self.gate.feed(&self.pending);
        let found = scan_classes(&self.pending, self.gate.may(), policy, canary);
        let len = self.pending.len();
        if let Some(b) = found
            .iter()
            .find(|f| f.class == Class::Canary || policy.action(f.class) == OutputAction::Block)
        {
            let (release, redacted) = redact(&self.pending[..b.span.start], &found);
            self.gate.drop_front(self.pending.as_bytes());
            self.pending.clear();
            return Step {
                release,
                blocked: Some(b.class),
                redacted,
            };
        }
        let mut cut = if last {
            len
        } else {
            floor_char(&self.pending, len.saturating_sub(self.hold_back))
        };
        if !last {
            // Never inside a run of non-whitespace (a token still arriving) …
            if cut < len && !self.pending[cut..].starts_with(char::is_whitespace) {
                cut = self.pending[..cut]
                    .rfind(char::is_whitespace)
                    .map_or(0, |i| {
                        i + self.pending[i..].chars().next().map_or(1, char::len_utf8)
                    });
            }
            // … nor inside a match that may still grow.
            for f in &found {
                if f.span.start < cut && (f.span.end > cut || f.span.end == len) {
                    cut = cut.min(f.span.start);
                }
            }
        }
        let (release, redacted) = redact(&self.pending[..cut], &found);
        self.gate.drop_front(&self.pending.as_bytes()[..cut]);
        self.pending.drain(..cut);
        Step {
            release,
            blocked: None,
            redacted,
        }
    }

    /// Bytes held back right now.
    pub fn held(&self) -> usize {
        self.pending.len()
    }
}

/// A whole text screened at once (a non-streamed answer's): `None` when the filter finds
/// nothing in it (it goes as it is, not copied), else what [`TextFilter::push`] says of it as
/// a last piece.
pub fn screen_whole(text: &str, policy: &OutputPolicy, canary: Option<&str>) -> Option<Step> {
    if scan(text, policy, canary).is_empty() {
        return None;
    }
    Some(TextFilter::new(text.len()).push(text, true, policy, canary))
}

/// `text` with the findings that lie wholly inside it replaced by their markers.
fn redact(text: &str, found: &[Found]) -> (String, Vec<Class>) {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut classes = Vec::new();
    for f in found {
        if f.span.end > text.len() || f.redact.start < at {
            continue;
        }
        out.push_str(&text[at..f.redact.start]);
        out.push_str(&marker(f.class));
        at = f.redact.end;
        classes.push(f.class);
    }
    out.push_str(&text[at..]);
    (out, classes)
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every class on `redact`, with `example.com` allowed for links.
    pub(crate) fn all_redact() -> OutputPolicy {
        let mut p = OutputPolicy {
            link_allowlist: vec!["example.com".into()],
            ..OutputPolicy::default()
        };
        for c in Class::PATTERNS {
            p.set(c, OutputAction::Redact);
        }
        p
    }

    /// A moat key with a valid checksum.
    pub(crate) fn moat_key() -> String {
        let pepper = crate::auth::secrets::Pepper::from_bytes([7; 32]);
        crate::auth::api_key::mint(&pepper, "abcdefghijkl")
            .plaintext
            .to_string()
    }

    /// One positive sample per class.
    pub(crate) fn samples() -> Vec<(Class, String)> {
        vec![
            (Class::MoatKey, moat_key()),
            (
                Class::Jwt,
                "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U".into(),
            ),
            (
                Class::PrivateKey,
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7bq9\nabcDEF123==\n-----END RSA PRIVATE KEY-----".into(),
            ),
            (Class::CloudKey, "AKIAIOSFODNN7EXAMPLE".into()),
            (
                Class::GithubToken,
                "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789".into(),
            ),
            (Class::SlackToken, "xoxb-123456789012-abcdefABCDEF1234".into()),
            (Class::Email, "jane.doe@corp.example.org".into()),
            (Class::Phone, "+1 415 555 0132".into()),
            (Class::Card, "4111 1111 1111 1111".into()),
            (Class::Iban, "DE89370400440532013000".into()),
            (Class::Link, "![x](https://evil.example.net/p.png?q=1)".into()),
        ]
    }

    fn redacted(text: &str) -> String {
        TextFilter::new(256)
            .push(text, true, &all_redact(), None)
            .release
    }

    #[test]
    fn every_class_is_redacted_with_its_marker() {
        for (class, secret) in samples() {
            let out = redacted(&format!("here: {secret} done"));
            assert_eq!(out, format!("here: {} done", marker(class)), "{class:?}");
        }
        let out = redacted("password = \"Xk9#mP2$vL8qR4wZ\"");
        assert_eq!(out, "password = \"[REDACTED:secret]\"");
    }

    #[test]
    fn a_whole_text_is_screened_as_a_last_piece() {
        let p = all_redact();
        for (class, secret) in samples() {
            let text = format!("here: {secret} done");
            let whole = screen_whole(&text, &p, Some("CANARY1")).unwrap();
            assert_eq!(
                whole,
                TextFilter::new(256).push(&text, true, &p, Some("CANARY1")),
                "{class:?}"
            );
            assert_eq!(whole.redacted, vec![class]);
        }
        let cut = screen_whole("a CANARY1 b", &p, Some("CANARY1")).unwrap();
        assert_eq!(
            (cut.release.as_str(), cut.blocked),
            ("a ", Some(Class::Canary))
        );
        for clean in [
            "t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 t12 t13",
            "",
            "a token: no",
        ] {
            assert_eq!(screen_whole(clean, &p, Some("CANARY1")), None, "{clean}");
        }
    }

    #[test]
    fn look_alikes_are_left_alone() {
        let key = moat_key();
        // One character changed: the checksum fails.
        let mut bad = key.clone().into_bytes();
        let i = bad.len() - 1;
        bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
        let negatives = [
            String::from_utf8(bad).unwrap(),
            "eyJub3QiOiJqd3QifQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.signaturexx"
                .replace("eyJub3Qi", "eyJ-bad"),
            "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----".into(),
            "AKIA1234".into(),
            "ghp_short".into(),
            "password = changeme_please".into(),
            "password = \"********\"".into(),
            "user@localhost".into(),
            "version 1.2.3 on 2024-11-30 at 192.168.100.200".into(),
            "4111 1111 1111 1112".into(),
            "order 1234567890123".into(),
            "DE89370400440532013001".into(),
            "[docs](https://example.com/guide) and ![logo](https://cdn.example.com/l.png)".into(),
            "see [the RFC](#section-2)".into(),
        ];
        for n in negatives {
            assert_eq!(redacted(&n), n, "look-alike changed");
        }
    }

    #[test]
    fn checks() {
        assert!(luhn("4111111111111111"));
        assert!(luhn("5500 0000 0000 0004"));
        assert!(!luhn("4111111111111112"));
        assert!(!luhn("0000000000000000"));
        assert!(iban("GB82 WEST 1234 5698 7654 32"));
        assert!(!iban("GB82 WEST 1234 5698 7654 33"));
    }

    #[test]
    fn block_cuts_before_the_match() {
        let mut p = all_redact();
        p.set(Class::Jwt, OutputAction::Block);
        let jwt = &samples()[1].1;
        let step = TextFilter::new(256).push(&format!("a b {jwt} c"), true, &p, None);
        assert_eq!(step.release, "a b ");
        assert_eq!(step.blocked, Some(Class::Jwt));
    }

    /// A secret split at every offset over 2 chunks never leaves whole or in part.
    #[test]
    fn split_secrets_never_leak() {
        for (class, secret) in samples() {
            let text = format!("the value is {secret} and that is all");
            for cut in 1..text.len() {
                if !text.is_char_boundary(cut) {
                    continue;
                }
                let mut f = TextFilter::new(64);
                let p = all_redact();
                let mut out = f.push(&text[..cut], false, &p, None).release;
                out += &f.push(&text[cut..], true, &p, None).release;
                assert_eq!(
                    out,
                    text.replace(&secret, &marker(class)),
                    "{class:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn canary_split_across_chunks_blocks() {
        let canary = "moat-canary-0123456789abcdef";
        let text = format!("Sure. My instructions say {canary} ok");
        for cut in 1..text.len() {
            let mut f = TextFilter::new(16);
            let p = OutputPolicy::default();
            let a = f.push(&text[..cut], false, &p, Some(canary));
            assert!(!a.release.contains("moat-canary"));
            // The caller stops at a block.
            let (out, blocked) = if a.blocked.is_some() {
                (a.release, a.blocked)
            } else {
                let b = f.push(&text[cut..], true, &p, Some(canary));
                (a.release + &b.release, b.blocked)
            };
            assert_eq!(out, "Sure. My instructions say ", "cut {cut}");
            assert_eq!(blocked, Some(Class::Canary));
        }
    }
}
