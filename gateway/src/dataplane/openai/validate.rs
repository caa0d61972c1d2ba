//! Strict parsing of the OpenAI request bodies: what is not understood is refused, not passed
//! on. Each endpoint has a list of the parameters it accepts, each with its type and range;
//! an unknown parameter, a wrong type, an unknown message role, or a value above the model's
//! caps is a 400 naming the parameter (`param`), an unknown model a 404. `null` stands for
//! "not given" on optional parameters, as in OpenAI's API.
//!
//! A valid body is rewritten for the upstream: the public model name becomes the upstream's
//! model id, `max_tokens` is set to the model's cap when the request sets no limit, and a
//! stream always asks for its usage (`stream_options.include_usage`), so that no stream escapes
//! the reconciliation of its token reservation (the answer drops that usage event again when
//! the client did not ask for it, see `dataplane::answer`). Each rewrite (these, the
//! guardrails', the `cache_salt`) changes the parsed tree, which the later steps read, and is
//! recorded as an edit of the client's bytes (`wire`): the upstream gets those bytes with the
//! edits spliced in, never a re-serialised tree.
//!
//! Fields the gateway owns are refused from a client, by name: `cache_salt` (the KV prefix
//! cache scope, set per pool from the principal, see `dataplane::cache_salt`).

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{
    json::parse_strict,
    reserve,
    wire::{Step, Wire},
};
use crate::{
    config::{Config, ModelConfig},
    error::ApiError,
};

/// The inference endpoints of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// A request that passed every check, ready for its pool.
#[derive(Debug)]
pub struct Validated {
    pub endpoint: Endpoint,
    /// Public model name (as the client asked and the policy knows it).
    pub model: String,
    pub stream: bool,
    /// The body as parsed and rewritten: what the upstream will read (the later steps read
    /// it here; rewrite it with [`Validated::set`], [`Validated::set_at`] and
    /// [`Validated::prepend`], which edit the bytes too).
    pub body: Map<String, Value>,
    /// The client's bytes and the edits to them: the body that is sent.
    wire: Wire,
    /// Asks for `logprobs`, `top_logprobs` or `logit_bias` (needs the `logprobs` permission).
    pub logprobs: bool,
    /// Tokens to reserve against the tokens-per-minute quotas (see `reserve`).
    pub reserve_tokens: u64,
    /// Of them, the prompt's estimate.
    pub prompt_tokens: u64,
    /// A stream whose usage event the gateway asked for on its own behalf: the answer drops
    /// it again.
    pub hide_usage: bool,
}

impl Validated {
    /// Counts a system message of `len` bytes the gateway will put first (the guardrails'
    /// operator prompt) like one of the caller's: in the model's `max_messages` (400 when it
    /// no longer fits) and in the token reservation.
    pub fn count_system_message(&mut self, len: usize, config: &Config) -> Result<()> {
        let count = self
            .body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let max = config
            .models()
            .get(&self.model)
            .map_or(usize::MAX, |m| m.max_messages);
        if count + 1 > max {
            return Err(bad(
                "messages",
                format!(
                    "too many messages: {count} and the gateway's system prompt (at most {max} \
                     in all)"
                ),
            ));
        }
        // The message as it goes in the body: `{"role":"system","content":"…"},`.
        let bytes = len + r#"{"role":"system","content":""},"#.len();
        let tokens = bytes.div_ceil(4) as u64;
        self.reserve_tokens = self.reserve_tokens.saturating_add(tokens);
        self.prompt_tokens = self.prompt_tokens.saturating_add(tokens);
        Ok(())
    }

    /// The top-level member `key` set to `value` (replaced where it is, or added last).
    pub fn set(&mut self, key: &str, value: Value) {
        self.wire.set(key, to_json(&value));
        self.body.insert(key.into(), value);
    }

    /// The value at `path` (its first step a top-level key) replaced by `value`. `false`, and
    /// nothing changed, if there is none.
    pub fn set_at(&mut self, path: &[Step<'_>], value: Value) -> bool {
        let Some(node) = node_mut(&mut self.body, path) else {
            return false;
        };
        let done = self.wire.set_at(path, to_json(&value));
        if done {
            *node = value;
        }
        done
    }

    /// `value` put first in the top-level array `key`. `false`, and nothing changed, if it is
    /// not an array.
    pub fn prepend(&mut self, key: &str, value: Value) -> bool {
        let Some(Value::Array(items)) = self.body.get_mut(key) else {
            return false;
        };
        let done = self.wire.prepend(key, to_json(&value));
        if done {
            items.insert(0, value);
        }
        done
    }

    /// The upstream's body, with the gateway's `cache_salt` (generation endpoints only): the
    /// client's bytes with the rewrites spliced in.
    pub fn upstream_body(mut self, cache_salt: Option<String>) -> Result<Bytes> {
        if let Some(salt) = cache_salt
            && self.endpoint != Endpoint::Embeddings
        {
            self.set(CACHE_SALT, Value::String(salt));
        }
        let out = self.wire.into_bytes();
        // The spliced bytes say what the rewritten tree says (checked in debug builds, where
        // every test runs through here).
        debug_assert_eq!(
            serde_json::from_slice::<Value>(&out).ok(),
            Some(Value::Object(self.body)),
            "the spliced body differs from the rewritten one"
        );
        Ok(out)
    }
}

/// A value as JSON text.
fn to_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a JSON value serialises")
}

/// The value at `path` in the tree.
fn node_mut<'a>(body: &'a mut Map<String, Value>, path: &[Step<'_>]) -> Option<&'a mut Value> {
    let (Step::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut node = body.get_mut(*first)?;
    for step in rest {
        node = match (step, node) {
            (Step::Key(k), Value::Object(o)) => o.get_mut(*k)?,
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

/// Set by the gateway only (see `dataplane::cache_salt`).
const CACHE_SALT: &str = "cache_salt";

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];
const MESSAGE_KEYS: &[&str] = &[
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "refusal",
    "audio",
];

type Result<T> = std::result::Result<T, ApiError>;

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).with_param(param)
}

/// [`validate_body`] of a borrowed body (copied).
pub fn validate(endpoint: Endpoint, bytes: &[u8], config: &Config) -> Result<Validated> {
    validate_body(endpoint, Bytes::copy_from_slice(bytes), config)
}

/// Checks the client's body `bytes` for `endpoint` and rewrites it for the upstream.
pub fn validate_body(endpoint: Endpoint, bytes: Bytes, config: &Config) -> Result<Validated> {
    let value = parse_strict(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(bad("model", "`model` must be a string")),
        None => return Err(bad("model", "`model` is required")),
    };
    let Some(model_config) = config.models().get(&model) else {
        return Err(
            ApiError::not_found(format!("the model `{model}` does not exist"))
                .with_param("model")
                .with_code("model_not_found"),
        );
    };

    if body.contains_key(CACHE_SALT) {
        return Err(bad(
            CACHE_SALT,
            "`cache_salt` is set by the gateway and may not be sent",
        ));
    }
    for (name, value) in &body {
        if value.is_null() && !matches!(name.as_str(), "model" | "messages" | "input") {
            continue;
        }
        match endpoint {
            Endpoint::ChatCompletions => chat_param(name, value, model_config)?,
            Endpoint::Completions => completion_param(name, value, model_config)?,
            Endpoint::Embeddings => embedding_param(name, value, model_config)?,
        }
    }
    let required = match endpoint {
        Endpoint::ChatCompletions => "messages",
        Endpoint::Completions => "prompt",
        Endpoint::Embeddings => "input",
    };
    if body.get(required).is_none_or(Value::is_null) {
        return Err(bad(required, format!("`{required}` is required")));
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream && body.get("stream_options").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }

    let logprobs = ["logprobs", "top_logprobs", "logit_bias"].iter().any(|k| {
        body.get(*k)
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
    });
    let asked_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let body_len = bytes.len();
    // Cannot fail: the strict parse read an object.
    let wire = Wire::new(bytes).ok_or_else(ApiError::internal)?;
    let mut valid = Validated {
        endpoint,
        model,
        stream,
        body,
        wire,
        logprobs,
        reserve_tokens: 0,
        prompt_tokens: 0,
        hide_usage: stream && !asked_usage,
    };
    rewrite(&mut valid, model_config);
    if stream && !asked_usage {
        // `continuous_usage_stats` only applies with `include_usage`: dropping it changes
        // nothing the client would have seen.
        valid.set("stream_options", serde_json::json!({"include_usage": true}));
    }
    valid.reserve_tokens = reserve::tokens(endpoint, &valid.body, body_len);
    valid.prompt_tokens = reserve::prompt_tokens(endpoint, &valid.body, body_len);
    Ok(valid)
}

fn rewrite(v: &mut Validated, m: &ModelConfig) {
    let upstream = upstream_model(&v.model, m);
    if upstream != v.model {
        v.set("model", Value::String(upstream.to_owned()));
    }
    if v.endpoint != Endpoint::Embeddings {
        let limited = ["max_tokens", "max_completion_tokens"]
            .iter()
            .any(|k| v.body.get(*k).is_some_and(|v| !v.is_null()));
        if !limited {
            v.set("max_tokens", m.max_tokens.into());
        }
    }
}

/// The model id the upstream knows `model` by.
pub fn upstream_model<'a>(model: &'a str, m: &'a ModelConfig) -> &'a str {
    m.upstream_model.as_deref().unwrap_or(model)
}

fn chat_param(name: &str, v: &Value, m: &ModelConfig) -> Result<()> {
    match name {
        "model" => Ok(()),
        "messages" => messages(v, m),
        "stream" | "logprobs" | "parallel_tool_calls" | "store" => boolean(name, v),
        "stream_options" => stream_options(v),
        "max_tokens" | "max_completion_tokens" => tokens(name, v, m),
        "n" => int_in(name, v, 1, m.max_n),
        "temperature" => number_in(name, v, 0.0, 2.0),
        "top_p" => number_in(name, v, 0.0, 1.0),
        "presence_penalty" | "frequency_penalty" => number_in(name, v, -2.0, 2.0),
        "seed" => integer(name, v),
        "top_logprobs" => int_in(name, v, 0, 20),
        "stop" => stop(v),
        "user" | "service_tier" | "reasoning_effort" => string(name, v),
        "logit_bias" => logit_bias(v),
        "tools" | "functions" => tools(name, v, m),
        "modalities" => array(name, v),
        "tool_choice" | "function_call" => string_or_object(name, v),
        "response_format" | "metadata" | "prediction" | "audio" | "web_search_options" => {
            object(name, v)
        }
        _ => Err(unknown(name)),
    }
}

fn completion_param(name: &str, v: &Value, m: &ModelConfig) -> Result<()> {
    match name {
        "model" => Ok(()),
        "prompt" => inputs(name, v, m),
        "stream" | "echo" => boolean(name, v),
        "stream_options" => stream_options(v),
        "max_tokens" => tokens(name, v, m),
        "n" | "best_of" => int_in(name, v, 1, m.max_n),
        "temperature" => number_in(name, v, 0.0, 2.0),
        "top_p" => number_in(name, v, 0.0, 1.0),
        "presence_penalty" | "frequency_penalty" => number_in(name, v, -2.0, 2.0),
        "seed" => integer(name, v),
        "logprobs" => int_in(name, v, 0, 5),
        "stop" => stop(v),
        "suffix" | "user" => string(name, v),
        "logit_bias" => logit_bias(v),
        _ => Err(unknown(name)),
    }
}

fn embedding_param(name: &str, v: &Value, m: &ModelConfig) -> Result<()> {
    match name {
        "model" => Ok(()),
        "input" => inputs(name, v, m),
        "encoding_format" => match v.as_str() {
            Some("float" | "base64") => Ok(()),
            _ => Err(bad(name, "`encoding_format` must be `float` or `base64`")),
        },
        "dimensions" => int_in(name, v, 1, 65_536),
        "user" => string(name, v),
        _ => Err(unknown(name)),
    }
}

fn unknown(name: &str) -> ApiError {
    bad(
        name,
        format!("unrecognized request argument supplied: `{name}`"),
    )
}

fn messages(v: &Value, m: &ModelConfig) -> Result<()> {
    let Value::Array(list) = v else {
        return Err(bad("messages", "`messages` must be an array"));
    };
    if list.is_empty() {
        return Err(bad("messages", "`messages` must not be empty"));
    }
    if list.len() > m.max_messages {
        return Err(bad(
            "messages",
            format!(
                "too many messages: {} (at most {})",
                list.len(),
                m.max_messages
            ),
        ));
    }
    for (i, msg) in list.iter().enumerate() {
        let p = |k: &str| format!("messages[{i}].{k}");
        let Value::Object(msg) = msg else {
            return Err(bad(
                &format!("messages[{i}]"),
                "a message must be an object",
            ));
        };
        let role = match msg.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            Some(Value::String(_)) => {
                return Err(bad(
                    &p("role"),
                    format!("unknown role (expected one of: {})", ROLES.join(", ")),
                ));
            }
            _ => return Err(bad(&p("role"), "`role` is required and must be a string")),
        };
        for key in msg.keys() {
            if !MESSAGE_KEYS.contains(&key.as_str()) {
                return Err(bad(&p(key), format!("unrecognized message field `{key}`")));
            }
        }
        match msg.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    if !part.get("type").is_some_and(Value::is_string) {
                        return Err(bad(
                            &format!("messages[{i}].content[{j}].type"),
                            "a content part must be an object with a string `type`",
                        ));
                    }
                }
            }
            // Assistant turns that only call tools carry no content.
            None | Some(Value::Null) if role == "assistant" => {}
            _ => {
                return Err(bad(
                    &p("content"),
                    "`content` must be a string or an array of content parts",
                ));
            }
        }
        for key in ["name", "tool_call_id", "refusal"] {
            if let Some(v) = msg.get(key).filter(|v| !v.is_null()) {
                string(&p(key), v)?;
            }
        }
        if let Some(v) = msg.get("tool_calls").filter(|v| !v.is_null()) {
            array(&p("tool_calls"), v)?;
        }
    }
    Ok(())
}

/// A prompt or embeddings input: a string, or a non-empty array of strings, of token ids (one
/// tokenised input), or of token-id arrays — at most `max_inputs` inputs (a flat token-id array
/// is one input, however many ids it holds: the body size bounds those).
fn inputs(name: &str, v: &Value, m: &ModelConfig) -> Result<()> {
    let items = match v {
        Value::String(_) => return Ok(()),
        Value::Array(items) if !items.is_empty() => items,
        _ => {
            return Err(bad(
                name,
                format!("`{name}` must be a string or a non-empty array"),
            ));
        }
    };
    let token = |t: &Value| t.as_u64().is_some_and(|t| t <= u32::MAX as u64);
    let all = |f: &dyn Fn(&Value) -> bool| items.iter().all(f);
    if all(&token) {
        return Ok(());
    }
    let ok = all(&Value::is_string)
        || all(&|i| {
            i.as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(token))
        });
    if !ok {
        return Err(bad(
            name,
            format!("`{name}` items must all be strings, all token ids, or all token-id arrays"),
        ));
    }
    if items.len() > m.max_inputs {
        return Err(bad(
            name,
            format!(
                "too many inputs: {} (at most {})",
                items.len(),
                m.max_inputs
            ),
        ));
    }
    Ok(())
}

/// `tools` (or the older `functions`): an array of at most `max_tools` entries — each one is
/// prompt the model reads on every turn.
fn tools(name: &str, v: &Value, m: &ModelConfig) -> Result<()> {
    array(name, v)?;
    let count = v.as_array().map_or(0, Vec::len);
    if count > m.max_tools {
        return Err(bad(
            name,
            format!("too many {name}: {count} (at most {})", m.max_tools),
        ));
    }
    Ok(())
}

fn tokens(name: &str, v: &Value, m: &ModelConfig) -> Result<()> {
    int_in(name, v, 1, m.max_tokens)
}

fn stream_options(v: &Value) -> Result<()> {
    let Value::Object(o) = v else {
        return Err(bad("stream_options", "`stream_options` must be an object"));
    };
    for (k, v) in o {
        match k.as_str() {
            "include_usage" | "continuous_usage_stats" => {
                boolean(&format!("stream_options.{k}"), v)?
            }
            _ => return Err(unknown(&format!("stream_options.{k}"))),
        }
    }
    Ok(())
}

fn stop(v: &Value) -> Result<()> {
    match v {
        Value::String(_) => Ok(()),
        Value::Array(a) if a.len() <= 4 && a.iter().all(Value::is_string) => Ok(()),
        _ => Err(bad(
            "stop",
            "`stop` must be a string or an array of at most 4 strings",
        )),
    }
}

fn logit_bias(v: &Value) -> Result<()> {
    match v {
        Value::Object(o)
            if o.iter().all(|(k, v)| {
                k.parse::<u32>().is_ok()
                    && v.as_f64().is_some_and(|b| (-100.0..=100.0).contains(&b))
            }) =>
        {
            Ok(())
        }
        _ => Err(bad(
            "logit_bias",
            "`logit_bias` must map token ids to numbers between -100 and 100",
        )),
    }
}

/// A type check: `ok`, or a 400 saying what `name` must be.
fn must_be(name: &str, ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(bad(name, format!("`{name}` must be {what}")))
    }
}

fn boolean(name: &str, v: &Value) -> Result<()> {
    must_be(name, v.is_boolean(), "a boolean")
}

fn string(name: &str, v: &Value) -> Result<()> {
    must_be(name, v.is_string(), "a string")
}

fn array(name: &str, v: &Value) -> Result<()> {
    must_be(name, v.is_array(), "an array")
}

fn object(name: &str, v: &Value) -> Result<()> {
    must_be(name, v.is_object(), "an object")
}

fn string_or_object(name: &str, v: &Value) -> Result<()> {
    must_be(
        name,
        v.is_string() || v.is_object(),
        "a string or an object",
    )
}

fn integer(name: &str, v: &Value) -> Result<()> {
    must_be(name, v.is_i64() || v.is_u64(), "an integer")
}

fn int_in(name: &str, v: &Value, min: u64, max: u64) -> Result<()> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(()),
        Some(_) | None if v.is_i64() || v.is_u64() => Err(bad(
            name,
            format!("`{name}` must be between {min} and {max}"),
        )),
        _ => Err(bad(name, format!("`{name}` must be an integer"))),
    }
}

fn number_in(name: &str, v: &Value, min: f64, max: f64) -> Result<()> {
    match v.as_f64() {
        Some(n) if (min..=max).contains(&n) => Ok(()),
        Some(_) => Err(bad(
            name,
            format!("`{name}` must be between {min} and {max}"),
        )),
        None => Err(bad(name, format!("`{name}` must be a number"))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use axum::http::StatusCode;

    use super::*;

    fn config() -> Config {
        Config::from_str(
            Path::new("/t.toml"),
            "[pools.p]\nhosts = [\"127.0.0.1:1\"]\n\
             [models.m]\npool = \"p\"\nupstream_model = \"org/M\"\nmax_messages = 2\n\
             max_tokens = 100\nmax_n = 2\nmax_inputs = 3\nmax_tools = 2\n",
        )
        .unwrap()
    }

    fn check(endpoint: Endpoint, body: &str) -> Result<Validated> {
        validate(endpoint, body.as_bytes(), &config())
    }

    fn param(endpoint: Endpoint, body: &str) -> (StatusCode, Option<String>) {
        let e = check(endpoint, body).unwrap_err();
        (e.status, e.param)
    }

    const CHAT: Endpoint = Endpoint::ChatCompletions;

    #[test]
    fn a_good_chat_is_rewritten_for_the_upstream() {
        let v = check(
            CHAT,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,
                "stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert!(v.stream);
        let up = Value::Object(v.body.clone());
        assert_eq!(up["model"], "org/M");
        assert_eq!(up["max_tokens"], 100, "the cap is injected when unset");
        let v = check(
            CHAT,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":7}"#,
        )
        .unwrap();
        let up = Value::Object(v.body.clone());
        assert_eq!(up["max_tokens"], 7);
        assert!(!v.stream);
    }

    #[test]
    fn bad_chats_name_their_parameter() {
        let cases = [
            (r#"{"model":"m","model":"m","messages":[]}"#, None),
            (r#"{"model":"nope","messages":[]}"#, Some("model")),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (r#"{"model":"m"}"#, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},{"role":"user","content":"c"}]}"#,
                Some("messages"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"root","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","tenant":"b"}]}"#,
                Some("messages[0].tenant"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":101}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"9"}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":3}"#,
                Some("n"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                Some("stream"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tenant":"b"}"#,
                Some("tenant"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                Some("stream_options"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
            ),
        ];
        for (body, want) in cases {
            let (status, got) = param(CHAT, body);
            let expected = if want == Some("model") && body.contains("nope") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            assert_eq!(status, expected, "{body}");
            assert_eq!(got.as_deref(), want, "{body}");
        }
    }

    #[test]
    fn embeddings_and_completions() {
        let e = Endpoint::Embeddings;
        assert!(check(e, r#"{"model":"m","input":"x","encoding_format":"base64"}"#).is_ok());
        assert!(check(e, r#"{"model":"m","input":[[1,2],[3]]}"#).is_ok());
        let v = check(e, r#"{"model":"m","input":["a","b"]}"#).unwrap();
        let up = Value::Object(v.body.clone());
        assert!(up.get("max_tokens").is_none());
        assert_eq!(
            param(e, r#"{"model":"m","input":["a",1]}"#).1.unwrap(),
            "input"
        );
        assert_eq!(
            param(e, r#"{"model":"m","input":["a","b","c","d"]}"#)
                .1
                .unwrap(),
            "input"
        );
        assert_eq!(
            param(e, r#"{"model":"m","input":"x","stream":true}"#)
                .1
                .unwrap(),
            "stream"
        );
        let c = Endpoint::Completions;
        assert!(check(c, r#"{"model":"m","prompt":"x","stream":true}"#).is_ok());
        assert_eq!(
            param(c, r#"{"model":"m","prompt":"x","best_of":5}"#)
                .1
                .unwrap(),
            "best_of"
        );
    }

    #[test]
    fn a_client_cache_salt_is_refused_on_every_endpoint() {
        for (e, body) in [
            (
                CHAT,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"cache_salt":"s"}"#,
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","cache_salt":"s"}"#,
            ),
            (
                Endpoint::Embeddings,
                r#"{"model":"m","input":"x","cache_salt":"s"}"#,
            ),
            // Even `null`, which elsewhere means "not given": the field is the gateway's.
            (
                CHAT,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"cache_salt":null}"#,
            ),
        ] {
            let e = check(e, body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some("cache_salt"), "{body}");
            assert!(e.message.contains("set by the gateway"), "{}", e.message);
        }
        // The gateway's own salt goes to the generation endpoints only.
        let v = check(
            CHAT,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        let up: Value =
            serde_json::from_slice(&v.upstream_body(Some("salt".into())).unwrap()).unwrap();
        assert_eq!(up["cache_salt"], "salt");
        let v = check(Endpoint::Embeddings, r#"{"model":"m","input":"x"}"#).unwrap();
        let up: Value =
            serde_json::from_slice(&v.upstream_body(Some("salt".into())).unwrap()).unwrap();
        assert!(up.get("cache_salt").is_none());
    }

    #[test]
    fn every_stream_asks_for_usage_and_hides_what_the_client_did_not_ask_for() {
        let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
        let v = check(CHAT, &format!(r#"{{"model":"m",{msgs},"stream":true}}"#)).unwrap();
        assert_eq!(
            v.body["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        assert!(v.hide_usage);
        let v = check(
            CHAT,
            &format!(
                r#"{{"model":"m",{msgs},"stream":true,"stream_options":{{"include_usage":false,"continuous_usage_stats":true}}}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            v.body["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        assert!(v.hide_usage);
        let v = check(
            CHAT,
            &format!(
                r#"{{"model":"m",{msgs},"stream":true,"stream_options":{{"include_usage":true}}}}"#
            ),
        )
        .unwrap();
        assert!(!v.hide_usage, "the client asked: its usage event stays");
        let v = check(
            Endpoint::Completions,
            r#"{"model":"m","prompt":"x","stream":true}"#,
        )
        .unwrap();
        assert_eq!(v.body["stream_options"]["include_usage"], true);
        let v = check(CHAT, &format!(r#"{{"model":"m",{msgs}}}"#)).unwrap();
        assert!(v.body.get("stream_options").is_none() && !v.hide_usage);
    }

    /// The reservation of `body` minus its prompt estimate (a quarter of its bytes).
    fn generation(e: Endpoint, body: &str) -> u64 {
        check(e, body).unwrap().reserve_tokens - (body.len() as u64).div_ceil(4)
    }

    #[test]
    fn the_reservation_takes_the_larger_completion_cap() {
        let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
        // The bypass: a small `max_tokens` first, a large `max_completion_tokens` after.
        let g = |extra: &str| generation(CHAT, &format!(r#"{{"model":"m",{msgs},{extra}}}"#));
        assert_eq!(
            g(r#""max_tokens":1,"max_completion_tokens":90,"stream":true"#),
            90
        );
        assert_eq!(g(r#""max_completion_tokens":90,"max_tokens":1"#), 90);
        assert_eq!(g(r#""max_tokens":50"#), 50);
        assert_eq!(g(r#""max_completion_tokens":60"#), 60);
        assert_eq!(g(r#""stream":false"#), 100, "no cap given: the model's cap");
        // The model's cap holds for both.
        for k in ["max_tokens", "max_completion_tokens"] {
            let body = format!(r#"{{"model":"m",{msgs},"{k}":101}}"#);
            assert_eq!(param(CHAT, &body).1.as_deref(), Some(k), "{body}");
        }
    }

    #[test]
    fn the_reservation_multiplies_by_choices() {
        let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
        let g = |extra: &str| generation(CHAT, &format!(r#"{{"model":"m",{msgs},{extra}}}"#));
        assert_eq!(g(r#""max_tokens":10,"n":2"#), 20);
        assert_eq!(g(r#""max_completion_tokens":10,"n":2,"max_tokens":3"#), 20);
        let c = Endpoint::Completions;
        assert_eq!(
            generation(c, r#"{"model":"m","prompt":"x","max_tokens":10,"n":2}"#),
            20
        );
    }

    #[test]
    fn the_reservation_multiplies_by_best_of() {
        let c = Endpoint::Completions;
        // `best_of` sequences are generated even though `n` are returned.
        assert_eq!(
            generation(
                c,
                r#"{"model":"m","prompt":"x","max_tokens":10,"n":1,"best_of":2}"#
            ),
            20
        );
        assert_eq!(
            generation(
                c,
                r#"{"model":"m","prompt":"x","max_tokens":10,"best_of":2}"#
            ),
            20
        );
    }

    #[test]
    fn the_reservation_multiplies_by_prompts() {
        let c = Endpoint::Completions;
        let g = |prompt: &str| {
            generation(
                c,
                &format!(r#"{{"model":"m","prompt":{prompt},"max_tokens":10,"n":2}}"#),
            )
        };
        assert_eq!(g(r#"["a","b","c"]"#), 60, "3 prompts × 2 choices × 10");
        assert_eq!(g(r#"[[1,2],[3]]"#), 40, "2 token-id prompts");
        assert_eq!(g(r#"[1,2,3]"#), 20, "one prompt of token ids");
        assert_eq!(g(r#""abc""#), 20);
    }

    #[test]
    fn the_reservation_counts_token_id_inputs() {
        // Token ids take ~2 bytes each: the byte estimate alone would count half of them.
        let ids: Vec<String> = (0..200).map(|i| (i % 10).to_string()).collect();
        let body = format!(r#"{{"model":"m","input":[[{}]]}}"#, ids.join(","));
        assert!(body.len() / 4 < 200);
        assert_eq!(
            check(Endpoint::Embeddings, &body).unwrap().reserve_tokens,
            200
        );
        let body = format!(
            r#"{{"model":"m","prompt":[[{}]],"max_tokens":1}}"#,
            ids.join(",")
        );
        assert_eq!(
            check(Endpoint::Completions, &body).unwrap().reserve_tokens,
            201
        );
        // Text inputs: a quarter of the bytes, more inputs more tokens.
        let one = r#"{"model":"m","input":["aaaaaaaaaaaaaaaa"]}"#;
        let three =
            r#"{"model":"m","input":["aaaaaaaaaaaaaaaa","aaaaaaaaaaaaaaaa","aaaaaaaaaaaaaaaa"]}"#;
        let r = |b: &str| check(Endpoint::Embeddings, b).unwrap().reserve_tokens;
        assert_eq!(r(one), (one.len() as u64).div_ceil(4));
        assert_eq!(r(three), (three.len() as u64).div_ceil(4));
        assert!(r(three) >= r(one) + 8);
    }

    #[test]
    fn a_flat_token_id_prompt_is_one_input_however_long() {
        // max_inputs = 3: ten ids are one tokenised input; four token-id arrays are four.
        let ids = (1..=10)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        for (endpoint, field) in [
            (Endpoint::Completions, "prompt"),
            (Endpoint::Embeddings, "input"),
        ] {
            let flat = format!(r#"{{"model":"m","{field}":[{ids}]}}"#);
            assert!(check(endpoint, &flat).is_ok(), "{field}: {flat}");
            let four = format!(r#"{{"model":"m","{field}":[[1],[2],[3],[4]]}}"#);
            assert_eq!(param(endpoint, &four).1.unwrap(), field);
        }
    }

    #[test]
    fn tools_beyond_the_models_cap_are_refused() {
        let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
        let tool = r#"{"type":"function","function":{"name":"f"}}"#;
        for field in ["tools", "functions"] {
            let two = format!(r#"{{"model":"m",{msgs},"{field}":[{tool},{tool}]}}"#);
            assert!(check(CHAT, &two).is_ok(), "{two}");
            let three = format!(r#"{{"model":"m",{msgs},"{field}":[{tool},{tool},{tool}]}}"#);
            let (status, param_name) = param(CHAT, &three);
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(param_name.unwrap(), field);
        }
    }

    #[test]
    fn the_reservation_counts_tools_as_prompt() {
        let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
        let plain = format!(r#"{{"model":"m",{msgs},"max_tokens":5}}"#);
        let tool = r#"{"type":"function","function":{"name":"lookup","description":"looks a thing up in a large catalogue","parameters":{"type":"object","properties":{"q":{"type":"string"}}}}}"#;
        let tools = format!(r#"{{"model":"m",{msgs},"max_tokens":5,"tools":[{tool},{tool}]}}"#);
        let r = |b: &str| check(CHAT, b).unwrap().reserve_tokens;
        assert_eq!(r(&plain), 5 + (plain.len() as u64).div_ceil(4));
        assert_eq!(r(&tools), 5 + (tools.len() as u64).div_ceil(4));
        assert!(r(&tools) >= r(&plain) + 2 * tool.len() as u64 / 4);
    }

    #[test]
    fn not_an_object() {
        assert_eq!(param(CHAT, "[1]").0, StatusCode::BAD_REQUEST);
        assert_eq!(param(CHAT, "").0, StatusCode::BAD_REQUEST);
    }

    /// The gateway's own system prompt counts in `max_messages` and in the reservation.
    #[test]
    fn the_gateways_system_prompt_counts() {
        let two = r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"a"},
            {"role":"user","content":"b"}]}"#;
        let mut v = check(CHAT, two).unwrap();
        let e = v.count_system_message(100, &config()).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.contains("system prompt"), "{}", e.message);
        let one = r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"a"}]}"#;
        let mut v = check(CHAT, one).unwrap();
        let (reserve, prompt) = (v.reserve_tokens, v.prompt_tokens);
        assert_eq!(reserve - prompt, 10);
        v.count_system_message(100, &config()).unwrap();
        // 100 bytes of prompt and the message's 30 bytes of JSON: 33 tokens more.
        assert_eq!(v.reserve_tokens, reserve + 33);
        assert_eq!(v.prompt_tokens, prompt + 33);
    }
}

/// The spliced upstream body against the one the gateway used to send: the rewritten tree,
/// re-serialised (kept here as the oracle).
#[cfg(test)]
mod splice_tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;

    /// Read once: a config compiles the guardrails' rules (slow in a debug build).
    fn config() -> &'static Config {
        static CONFIG: std::sync::LazyLock<Config> = std::sync::LazyLock::new(read_config);
        &CONFIG
    }

    fn read_config() -> Config {
        Config::from_str(
            Path::new("/t.toml"),
            "[pools.p]\nhosts = [\"127.0.0.1:1\"]\n\
             [models.m]\npool = \"p\"\nupstream_model = \"org/M \\\"q\\\" é\"\nmax_messages = 8\n\
             max_tokens = 100\nmax_n = 2\nmax_inputs = 3\nmax_tools = 2\n\
             [models.same]\npool = \"p\"\nmax_tokens = 50\nmax_n = 2\n",
        )
        .unwrap()
    }

    /// A guardrails-like rewrite: the string at `path` with `<|x|>` taken out, and a system
    /// message put first.
    struct Guard<'a> {
        strip: Vec<Vec<Step<'a>>>,
        system: Option<&'a str>,
    }

    const NO_GUARD: Guard<'static> = Guard {
        strip: Vec::new(),
        system: None,
    };

    fn pointer(path: &[Step<'_>]) -> String {
        path.iter()
            .map(|s| match s {
                Step::Key(k) => format!("/{k}"),
                Step::Index(i) => format!("/{i}"),
            })
            .collect()
    }

    /// What the old code sent: the tree rewritten in place, serialised.
    fn old(endpoint: Endpoint, bytes: &[u8], guard: &Guard<'_>, salt: Option<&str>) -> Value {
        let config = config();
        let Value::Object(mut body) = parse_strict(bytes).unwrap() else {
            panic!("not an object")
        };
        let model = body["model"].as_str().unwrap().to_owned();
        let m = &config.models()[&model];
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let asked_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        body.insert(
            "model".into(),
            Value::String(upstream_model(&model, m).to_owned()),
        );
        if endpoint != Endpoint::Embeddings {
            let limited = ["max_tokens", "max_completion_tokens"]
                .iter()
                .any(|k| body.get(*k).is_some_and(|v| !v.is_null()));
            if !limited {
                body.insert("max_tokens".into(), m.max_tokens.into());
            }
        }
        if stream && !asked_usage {
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        let mut tree = Value::Object(body);
        for path in &guard.strip {
            let v = tree.pointer_mut(&pointer(path)).unwrap();
            *v = Value::String(v.as_str().unwrap().replace("<|x|>", ""));
        }
        if let Some(system) = guard.system
            && let Some(Value::Array(msgs)) = tree.get_mut("messages")
        {
            msgs.insert(0, json!({"role": "system", "content": system}));
        }
        if let Some(salt) = salt
            && endpoint != Endpoint::Embeddings
        {
            tree["cache_salt"] = salt.into();
        }
        serde_json::from_slice(&serde_json::to_vec(&tree).unwrap()).unwrap()
    }

    /// What is sent now: the client's bytes, edited.
    fn new(endpoint: Endpoint, bytes: &[u8], guard: &Guard<'_>, salt: Option<&str>) -> Bytes {
        let mut v = validate(endpoint, bytes, config()).unwrap();
        for path in &guard.strip {
            let s = v.body.clone();
            let text = Value::Object(s).pointer(&pointer(path)).unwrap().clone();
            let clean = text.as_str().unwrap().replace("<|x|>", "");
            assert!(v.set_at(path, Value::String(clean)));
        }
        if let Some(system) = guard.system {
            assert!(v.prepend("messages", json!({"role": "system", "content": system})));
        }
        v.upstream_body(salt.map(str::to_owned)).unwrap()
    }

    fn same(endpoint: Endpoint, body: &str, guard: &Guard<'_>) {
        for salt in [None, Some("s\u{e9}\"lt")] {
            let sent = new(endpoint, body.as_bytes(), guard, salt);
            let got: Value = serde_json::from_slice(&sent)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&sent)));
            assert_eq!(got, old(endpoint, body.as_bytes(), guard, salt), "{body}");
            // Strict too: no key came out twice.
            parse_strict(&sent).unwrap();
        }
    }

    /// `compact` with whitespace of every kind between all of its tokens, picked by `seed`.
    fn spaced(compact: &str, seed: u64) -> String {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut ws = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = (state >> 60) as usize % 4;
            (0..n)
                .map(|i| [" ", "\n", "\t", "\r\n"][((state >> (40 + 4 * i)) & 3) as usize])
                .collect::<String>()
        };
        let mut out = ws();
        let (mut in_str, mut escaped) = (false, false);
        for c in compact.chars() {
            out.push(c);
            if in_str {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        in_str = false;
                        out.push_str(&ws());
                    }
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_str = true,
                '{' | '}' | '[' | ']' | ',' | ':' => out.push_str(&ws()),
                _ => {}
            }
        }
        out.push_str(&ws());
        out
    }

    const CHAT: Endpoint = Endpoint::ChatCompletions;

    fn chats() -> Vec<&'static str> {
        vec![
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"same"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"a \"quoted\" \\ back\nslash \u00e9 \ud83d\ude00 \u0000 </script>"}],"temperature":0.5}"#,
            r#"{"m\u006fdel":"m","messages":[{"role":"user","content":"x"}],"max_tokens":null}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":null,"max_completion_tokens":7}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":null}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":9,"stream":true}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":null}"#,
            r#"{"model":"m","stream_options":{"include_usage":true},"stream":true,"messages":[{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":false,"stream_options":null}"#,
            r#"{"model":"same","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a<|x|>b"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{\"a\":[1,2.5e3,-0,1E-2]}"}}]},{"role":"tool","tool_call_id":"1","content":"t<|x|>"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"q":{"type":"string","enum":["a",null,true]}}}}}],"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{"a":{"b":{"c":[[[]],{}]}}}}},"metadata":{},"logit_bias":{"50256":-100,"1":1.5},"seed":-3,"n":2,"user":"u"}"#,
            r#"{"model":"m","messages":[{"role":"assistant","function_call":{"name":"f","arguments":"<|x|>{}"}},{"role":"user","content":"x"}]}"#,
        ]
    }

    #[test]
    fn chats_are_sent_as_the_old_code_sent_them() {
        let guards = [
            NO_GUARD,
            Guard {
                strip: Vec::new(),
                system: Some("Be safe.\n\nCanary: \"c-123\" \u{2028} é"),
            },
        ];
        for (n, body) in chats().into_iter().enumerate() {
            for guard in &guards {
                same(CHAT, body, guard);
                for seed in 0..8 {
                    same(CHAT, &spaced(body, seed * 31 + n as u64), guard);
                }
            }
        }
    }

    #[test]
    fn delimiters_are_stripped_in_place() {
        use Step::{Index, Key};
        let body = chats()[11];
        let guard = Guard {
            strip: vec![
                vec![
                    Key("messages"),
                    Index(1),
                    Key("content"),
                    Index(0),
                    Key("text"),
                ],
                vec![Key("messages"), Index(3), Key("content")],
            ],
            system: Some("sys"),
        };
        for seed in 0..16 {
            same(CHAT, &spaced(body, seed), &guard);
        }
        let body = chats()[12];
        let guard = Guard {
            strip: vec![vec![
                Key("messages"),
                Index(0),
                Key("function_call"),
                Key("arguments"),
            ]],
            system: None,
        };
        same(CHAT, body, &guard);
        // Escaped keys on the way.
        let body =
            r#"{"model":"m","messages":[{"r\u006fle":"user","c\u006fntent":"<|x|>\u003c|x|>"}]}"#;
        let guard = Guard {
            strip: vec![vec![Key("messages"), Index(0), Key("content")]],
            system: Some("s"),
        };
        same(CHAT, body, &guard);
        let sent = new(CHAT, body.as_bytes(), &guard, None);
        let got: Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(got["messages"][1]["content"], "", "both copies stripped");
    }

    #[test]
    fn completions_and_embeddings_are_sent_as_the_old_code_sent_them() {
        use Step::{Index, Key};
        let completions = [
            (
                r#"{"model":"m","prompt":"a<|x|>b","suffix":"<|x|>"}"#,
                vec![vec![Key("prompt")], vec![Key("suffix")]],
            ),
            (
                r#"{"model":"m","prompt":["a","b<|x|>"],"stream":true,"max_tokens":3,"echo":false}"#,
                vec![vec![Key("prompt"), Index(1)]],
            ),
            (
                r#"{"model":"same","prompt":[[1,2],[3]],"best_of":1,"logprobs":null}"#,
                vec![],
            ),
            (
                r#"{"model":"m","prompt":[1,2,3],"stop":["\n","\u0000"],"max_tokens":null}"#,
                vec![],
            ),
        ];
        for (body, strip) in completions {
            let guard = Guard {
                strip,
                system: None,
            };
            for seed in 0..8 {
                same(Endpoint::Completions, &spaced(body, seed), &guard);
            }
        }
        let embeddings = [
            (
                r#"{"model":"m","input":"a<|x|>"}"#,
                vec![vec![Key("input")]],
            ),
            (
                r#"{"input":["a","<|x|>b"],"model":"same","encoding_format":"float","dimensions":8}"#,
                vec![vec![Key("input"), Index(1)]],
            ),
            (r#"{"model":"m","input":[[1,2]],"user":null}"#, vec![]),
        ];
        for (body, strip) in embeddings {
            let guard = Guard {
                strip,
                system: None,
            };
            for seed in 0..8 {
                same(Endpoint::Embeddings, &spaced(body, seed), &guard);
            }
        }
    }

    #[test]
    fn a_body_only_renamed_is_one_copy_and_an_untouched_one_none() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5}"#;
        let sent = new(CHAT, body.as_bytes(), &NO_GUARD, None);
        assert_eq!(
            std::str::from_utf8(&sent).unwrap(),
            body.replace(r#""m""#, r#""org/M \"q\" é""#),
            "the client's bytes, the model's value replaced"
        );
        let body = Bytes::from_static(br#"{"model":"same", "input" : ["x"]}"#);
        let v = validate_body(Endpoint::Embeddings, body.clone(), config()).unwrap();
        let sent = v.upstream_body(Some("salt".into())).unwrap();
        assert_eq!(
            sent.as_ptr(),
            body.as_ptr(),
            "the client's bytes themselves"
        );
    }

    #[test]
    fn an_empty_messages_array_is_refused_before_any_edit() {
        let e = validate(CHAT, br#"{"model":"m","messages":[ ]}"#, config()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }
}
