//! Input screening (pipeline step 9b): every text a caller sends, wherever it sits in the
//! body — chat message contents (strings or text parts), `tool`/`function` messages and
//! tool-call arguments (the path of indirect injection: retrieved documents, tool results),
//! completions prompts and suffixes, embeddings inputs — is normalised and matched against
//! the rules. The weights of the distinct rules hit add up to a score per source (user content,
//! tool content); a score at the source's threshold gets the policy's action.
//!
//! Then the body is rewritten for the policy: chat-template delimiters taken out of every
//! caller text that is let through (they never reach the upstream from a caller), the
//! operator's system prompt (with the canary) put first. Both are edits of the client's bytes
//! (see `dataplane::openai::wire`): the rest of the body goes upstream as it came.

use serde_json::{Map, Value};
use tracing::{info, warn};

use super::{InputAction, Policy, canary, classifier, memo, metrics, output::OutputPolicy};
use crate::{
    auth::Principal,
    dataplane::openai::{Endpoint, validate::Validated, wire::Step},
    dataplane::state::AppState,
    error::ApiError,
};

/// What the stage hands to the answer: its flags and what the output filter needs.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Rules that hit in a flagged request (for `x-moat-guardrail`).
    pub flagged: Vec<String>,
    pub output: OutputPolicy,
    pub canary: Option<String>,
    pub hold_back: usize,
    /// Whether the answer has text to screen (not embeddings).
    pub generation: bool,
    /// Whose answer it is, for the audit records of what the output filter finds.
    pub tenant: String,
    pub user_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    User,
    Tool,
}

#[cfg(test)]
#[derive(Debug)]
/// One caller text: where it is (a JSON pointer, for `param`) and from which kind of source.
struct Text {
    pointer: String,
    source: Source,
}

/// Where a caller text sits in the body: its `param` path (`messages[1].content`), written out
/// only when a response or a rewrite needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// `prompt`, `suffix`, `input`.
    Field(&'static str),
    /// `prompt[2]`.
    Item(&'static str, usize),
    /// `messages[i].content`.
    Content(usize),
    /// `messages[i].content[j].text`.
    Part(usize, usize),
    /// `messages[i].tool_calls[j].function.arguments`.
    ToolCall(usize, usize),
    /// `messages[i].function_call.arguments`.
    FunctionCall(usize),
}

impl At {
    fn param(self) -> String {
        match self {
            At::Field(k) => k.to_owned(),
            At::Item(k, i) => format!("{k}[{i}]"),
            At::Content(i) => format!("messages[{i}].content"),
            At::Part(i, j) => format!("messages[{i}].content[{j}].text"),
            At::ToolCall(i, j) => format!("messages[{i}].tool_calls[{j}].function.arguments"),
            At::FunctionCall(i) => format!("messages[{i}].function_call.arguments"),
        }
    }

    /// Its path in the body.
    fn path(self) -> Vec<Step<'static>> {
        use Step::{Index, Key};
        match self {
            At::Field(k) => vec![Key(k)],
            At::Item(k, i) => vec![Key(k), Index(i)],
            At::Content(i) => vec![Key("messages"), Index(i), Key("content")],
            At::Part(i, j) => vec![
                Key("messages"),
                Index(i),
                Key("content"),
                Index(j),
                Key("text"),
            ],
            At::ToolCall(i, j) => vec![
                Key("messages"),
                Index(i),
                Key("tool_calls"),
                Index(j),
                Key("function"),
                Key("arguments"),
            ],
            At::FunctionCall(i) => vec![
                Key("messages"),
                Index(i),
                Key("function_call"),
                Key("arguments"),
            ],
        }
    }
}

/// One caller text, borrowed from the body, with where it sits and its kind of source.
#[derive(Debug)]
struct Found<'a> {
    text: &'a str,
    at: At,
    source: Source,
}

/// Runs the stage with the request's `policy` ([`policy`]). `Ok(None)`: guardrails are off. An `Err` is the refusal to send (the
/// caller refunds the quota ticket).
pub async fn screen(
    state: &AppState,
    p: &Principal,
    endpoint: Endpoint,
    policy: Option<Policy>,
    valid: &mut Validated,
) -> Result<Option<Guard>, ApiError> {
    let g = &state.config.guardrails;
    let Some(policy) = policy.filter(|_| g.enabled) else {
        return Ok(None);
    };
    let texts = texts(endpoint, &valid.body, &policy)?;
    let rules = &g.rules;
    let mut hit_user = vec![false; rules.rules.len()];
    let mut hit_tool = vec![false; rules.rules.len()];
    let mut first_param: [Option<At>; 2] = [None, None];
    let mut with_delimiters = Vec::new();
    for t in &texts {
        let verdict = memo::verdict(g, &p.tenant, &p.user_id, t.text);
        let hits = match t.source {
            Source::User => &mut hit_user,
            Source::Tool => &mut hit_tool,
        };
        if verdict.smuggling && g.refuse_invisible {
            let action = match t.source {
                Source::User => policy.input,
                Source::Tool => policy.tool_input,
            };
            if action != InputAction::Off {
                return Err(block(
                    p,
                    &[super::rules::INVISIBLE_RULE.into()],
                    &t.at.param(),
                ));
            }
        }
        // The first text that hits a rule not hit before names the `param`.
        let mut new = false;
        for &r in &verdict.hits {
            new |= !hits[r];
            hits[r] = true;
        }
        if new {
            first_param[t.source as usize].get_or_insert(t.at);
        }
        if verdict.delimited {
            with_delimiters.push(t.at);
        }
    }
    let ids = |hits: &[bool]| -> (f32, Vec<String>) {
        let mut score = 0.0;
        let mut ids = Vec::new();
        for (r, h) in rules.rules.iter().zip(hits) {
            if *h {
                score += r.weight;
                ids.push(r.id.clone());
            }
        }
        (score, ids)
    };
    let mut flagged = Vec::new();
    let mut blocked: Option<(Vec<String>, String)> = None;
    for (source, hits, action, threshold) in [
        (Source::User, &hit_user, policy.input, policy.threshold),
        (
            Source::Tool,
            &hit_tool,
            policy.tool_input,
            policy.tool_threshold,
        ),
    ] {
        let (score, hit) = ids(hits);
        if hit.is_empty() || action == InputAction::Off || score < threshold {
            continue;
        }
        let param = first_param[source as usize]
            .map(At::param)
            .unwrap_or_default();
        metrics::input(&hit, action);
        match action {
            InputAction::Block => {
                blocked.get_or_insert((hit, param));
            }
            _ => flagged.extend(hit),
        }
    }
    if let Some((hit, param)) = blocked {
        return Err(block(p, &hit, &param));
    }
    // The classifier, when the policy asks for it and the rules let the prompt through.
    if policy.classifier
        && let Some(cl) = &g.classifier
    {
        let all: Vec<&str> = texts.iter().map(|t| t.text).collect();
        let action = policy.input.max(policy.tool_input);
        match classifier::judge(state, cl, &all.join("\n\n")).await {
            Ok(false) => {}
            Ok(true) if action == InputAction::Block => {
                metrics::input(&["classifier".into()], action);
                return Err(block(p, &["classifier".into()], ""));
            }
            Ok(true) => {
                metrics::input(&["classifier".into()], action);
                if action == InputAction::Flag {
                    flagged.push("classifier".into());
                }
            }
            Err(e) => {
                warn!(model = %cl.model, error = %e, "guardrail classifier failed");
                if cl.on_error == "block" {
                    metrics::input(&["classifier.error".into()], InputAction::Block);
                    return Err(ApiError::unavailable(
                        "the prompt could not be screened; try again later",
                    )
                    .with_code("guardrail_unavailable"));
                }
            }
        }
    }
    if !flagged.is_empty() {
        flagged.sort();
        flagged.dedup();
        info!(
            user = %p.username,
            tenant = %p.tenant,
            key_id = p.key_id.as_deref().unwrap_or("-"),
            rules = %flagged.join(","),
            "guardrail flagged the prompt"
        );
        audit_hits(p, &flagged, "flag");
    }
    // Delimiters never reach the upstream from a caller.
    // (An edit the body's bytes cannot take, while its tree could, would be a bug: refused
    // rather than sent without it.)
    for at in with_delimiters {
        let path = at.path();
        if let Some(s) = pointer_at(&valid.body, &path)
            && let Some(clean) = rules.strip_delimiters(s)
            && !valid.set_at(&path, Value::String(clean))
        {
            return Err(ApiError::internal());
        }
    }
    let canary = policy.canary.then(canary::new);
    if endpoint == Endpoint::ChatCompletions
        && let Some(system) = operator_message(&policy, canary.as_deref())
        && valid.body.get("messages").is_some_and(Value::is_array)
        && !valid.prepend(
            "messages",
            serde_json::json!({"role": "system", "content": system}),
        )
    {
        return Err(ApiError::internal());
    }
    Ok(Some(Guard {
        flagged,
        output: policy.output,
        canary: canary.filter(|_| endpoint == Endpoint::ChatCompletions),
        hold_back: g.hold_back,
        generation: endpoint != Endpoint::Embeddings,
        tenant: p.tenant.clone(),
        user_id: p.user_id.clone(),
    }))
}

/// The request's policy, `None` when the guardrails are off.
pub fn policy(state: &AppState, p: &Principal, model: &str) -> Option<Policy> {
    let g = &state.config.guardrails;
    g.enabled.then(|| g.policy(model, &p.tenant, &p.roles))
}

/// The system message the gateway puts first in a chat (the operator's prompt, the canary's
/// line), if the policy has one.
fn operator_message(policy: &Policy, canary: Option<&str>) -> Option<String> {
    match (&policy.system_prompt, canary) {
        (Some(s), Some(c)) => Some(format!("{s}\n\n{}", canary::instruction(c))),
        (Some(s), None) => Some(s.clone()),
        (None, Some(c)) => Some(canary::instruction(c)),
        (None, None) => None,
    }
}

/// The size in bytes of the system message [`screen`] will put first in a chat, known before
/// its canary is drawn: it counts like a caller's message, in the model's `max_messages` and
/// in the token reservation.
pub fn operator_message_len(endpoint: Endpoint, policy: &Policy) -> Option<usize> {
    if endpoint != Endpoint::ChatCompletions {
        return None;
    }
    let canary = policy.canary.then(|| "0".repeat(canary::LEN));
    operator_message(policy, canary.as_deref()).map(|m| m.len())
}

/// One audit record per rule that hit: its name and what was done, never the text.
fn audit_hits(p: &Principal, rules: &[String], action: &str) {
    for rule in rules {
        crate::audit::emit(crate::audit::Event::GuardrailHit {
            rule: rule.clone(),
            action: action.into(),
            tenant: Some(p.tenant.clone()),
            user_id: Some(p.user_id.clone()),
            request_id: None,
        });
    }
}

/// The 400 of a blocked prompt, logged with the rules (never the text) and counted.
fn block(p: &Principal, rules: &[String], param: &str) -> ApiError {
    info!(
        user = %p.username,
        tenant = %p.tenant,
        key_id = p.key_id.as_deref().unwrap_or("-"),
        rules = %rules.join(","),
        status = 400,
        "guardrail blocked the prompt"
    );
    audit_hits(p, rules, "block");
    let e = ApiError::bad_request(format!(
        "the request was blocked by the gateway's prompt-injection guardrails (rules: {})",
        rules.join(", ")
    ))
    .with_code("prompt_injection_detected");
    if param.is_empty() {
        e
    } else {
        e.with_param(param)
    }
}

/// Every caller text of the body, as `param`-style paths (`messages[1].content`), and the
/// system-message policy applied.
#[cfg(test)]
fn collect(
    endpoint: Endpoint,
    body: &Map<String, Value>,
    policy: &Policy,
) -> Result<Vec<Text>, ApiError> {
    Ok(texts(endpoint, body, policy)?
        .into_iter()
        .map(|t| Text {
            pointer: t.at.param(),
            source: t.source,
        })
        .collect())
}

/// Every caller text of the body, borrowed, with where it sits (see [`At`]), and the
/// system-message policy applied. Nothing is written out or looked up twice: this runs for
/// every request.
fn texts<'a>(
    endpoint: Endpoint,
    body: &'a Map<String, Value>,
    policy: &Policy,
) -> Result<Vec<Found<'a>>, ApiError> {
    let mut out = Vec::new();
    let strings =
        |v: &'a Value, key: &'static str, source: Source, out: &mut Vec<Found<'a>>| match v {
            Value::String(text) => out.push(Found {
                text,
                at: At::Field(key),
                source,
            }),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::String(text) = item {
                        out.push(Found {
                            text,
                            at: At::Item(key, i),
                            source,
                        });
                    }
                }
            }
            _ => {}
        };
    match endpoint {
        Endpoint::Completions => {
            for k in ["prompt", "suffix"] {
                if let Some(v) = body.get(k) {
                    strings(v, k, Source::User, &mut out);
                }
            }
        }
        Endpoint::Embeddings => {
            if let Some(v) = body.get("input") {
                strings(v, "input", Source::User, &mut out);
            }
        }
        Endpoint::ChatCompletions => {
            let msgs = body.get("messages").and_then(Value::as_array);
            for (i, m) in msgs.into_iter().flatten().enumerate() {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                if policy.refuse_system && matches!(role, "system" | "developer") {
                    return Err(ApiError::bad_request(format!(
                        "`{role}` messages are set by the operator and may not be sent"
                    ))
                    .with_param(format!("messages[{i}].role"))
                    .with_code("system_message_not_allowed"));
                }
                let source = if matches!(role, "tool" | "function") {
                    Source::Tool
                } else {
                    Source::User
                };
                match m.get("content") {
                    Some(Value::String(text)) => out.push(Found {
                        text,
                        at: At::Content(i),
                        source,
                    }),
                    Some(Value::Array(parts)) => {
                        for (j, part) in parts.iter().enumerate() {
                            if let Some(Value::String(text)) = part.get("text") {
                                out.push(Found {
                                    text,
                                    at: At::Part(i, j),
                                    source,
                                });
                            }
                        }
                    }
                    _ => {}
                }
                let calls = m.get("tool_calls").and_then(Value::as_array);
                for (j, c) in calls.into_iter().flatten().enumerate() {
                    if let Some(Value::String(text)) =
                        c.get("function").and_then(|f| f.get("arguments"))
                    {
                        out.push(Found {
                            text,
                            at: At::ToolCall(i, j),
                            source: Source::Tool,
                        });
                    }
                }
                if let Some(Value::String(text)) =
                    m.get("function_call").and_then(|f| f.get("arguments"))
                {
                    out.push(Found {
                        text,
                        at: At::FunctionCall(i),
                        source: Source::Tool,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The string at `path` in the body.
fn pointer_at<'a>(body: &'a Map<String, Value>, path: &[Step<'_>]) -> Option<&'a str> {
    let (Step::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut v = body.get(*first)?;
    for step in rest {
        v = match (step, v) {
            (Step::Key(k), Value::Object(o)) => o.get(*k)?,
            (Step::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    v.as_str()
}

/// `messages[1].content[0].text` as a JSON pointer (`/messages/1/content/0/text`).
#[cfg(test)]
fn ptr_path(param: &str) -> String {
    let mut out = String::with_capacity(param.len() + 4);
    for part in param.split('.') {
        let (name, idx) = part.split_once('[').unwrap_or((part, ""));
        out.push('/');
        out.push_str(name);
        for i in idx.split('[').filter(|s| !s.is_empty()) {
            out.push('/');
            out.push_str(i.trim_end_matches(']'));
        }
    }
    out
}

#[cfg(test)]
fn pointer<'a>(body: &'a Map<String, Value>, param: &str) -> Option<&'a str> {
    let path = ptr_path(param);
    let mut parts = path.split('/').skip(1);
    let first = parts.next()?;
    let mut v = body.get(first)?;
    for p in parts {
        v = match v {
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            Value::Object(o) => o.get(p)?,
            _ => return None,
        };
    }
    v.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_become_pointers() {
        assert_eq!(
            ptr_path("messages[1].content[0].text"),
            "/messages/1/content/0/text"
        );
        assert_eq!(ptr_path("prompt[2]"), "/prompt/2");
        assert_eq!(ptr_path("input"), "/input");
        let body: Map<String, Value> = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(pointer(&body, "messages[0].content[0].text"), Some("hi"));
    }

    #[test]
    fn every_caller_text_is_collected_with_its_source() {
        let body: Map<String, Value> = serde_json::from_str(
            r#"{"messages":[
                {"role":"system","content":"s"},
                {"role":"user","content":[{"type":"text","text":"u"},{"type":"image_url","image_url":{"url":"x"}}]},
                {"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"1","content":"t"}
            ]}"#,
        )
        .unwrap();
        let texts = collect(Endpoint::ChatCompletions, &body, &Policy::default()).unwrap();
        let got: Vec<(&str, Source)> = texts
            .iter()
            .map(|t| (t.pointer.as_str(), t.source))
            .collect();
        assert_eq!(
            got,
            vec![
                ("messages[0].content", Source::User),
                ("messages[1].content[0].text", Source::User),
                ("messages[2].tool_calls[0].function.arguments", Source::Tool),
                ("messages[3].content", Source::Tool),
            ]
        );
        let refuse = Policy {
            refuse_system: true,
            ..Policy::default()
        };
        let e = collect(Endpoint::ChatCompletions, &body, &refuse).unwrap_err();
        assert_eq!(e.body()["error"]["code"], "system_message_not_allowed");
        assert_eq!(e.body()["error"]["param"], "messages[0].role");
    }
}
