//! What a valid request may cost in tokens, reserved against the tokens-per-minute quotas
//! before it is sent (and reconciled with the reported usage when its answer ends).
//!
//! Every parameter that multiplies the work of a request counts, at its largest:
//! - the completion cap: the larger of `max_tokens` and `max_completion_tokens` (servers honour
//!   either; reserving on the smaller would let a request ask for 1 and generate 4096);
//! - the sequences per prompt: the larger of `n` and `best_of` (`best_of` sequences are
//!   generated even when only `n` are returned);
//! - the prompts: a completion's `prompt` list is one generation per item;
//! - the prompt itself, tools and all: one token per 4 bytes of the body, or, for token-id
//!   inputs (which take ~2 bytes per token), the number of ids, whichever is more.

use serde_json::{Map, Value};

use super::validate::Endpoint;

/// Tokens to reserve for the (already rewritten) upstream body; `body_len` is the size of the
/// client's body.
pub fn tokens(endpoint: Endpoint, body: &Map<String, Value>, body_len: usize) -> u64 {
    let prompt = prompt_tokens(endpoint, body, body_len);
    if endpoint == Endpoint::Embeddings {
        return prompt;
    }
    let get = |k: &str| body.get(k).and_then(Value::as_u64);
    let per_sequence = get("max_tokens")
        .max(get("max_completion_tokens"))
        .unwrap_or(0);
    let sequences = get("n").max(get("best_of")).unwrap_or(1).max(1);
    let prompts = match (endpoint, body.get("prompt")) {
        (Endpoint::Completions, Some(Value::Array(items))) if items.iter().all(|i| !i.is_u64()) => {
            items.len() as u64
        }
        _ => 1,
    };
    per_sequence
        .saturating_mul(sequences)
        .saturating_mul(prompts)
        .saturating_add(prompt)
}

/// The prompt's tokens, estimated: a quarter of the body's bytes, or the token ids it carries.
pub fn prompt_tokens(endpoint: Endpoint, body: &Map<String, Value>, body_len: usize) -> u64 {
    let by_bytes = (body_len as u64).div_ceil(4);
    let input = match endpoint {
        Endpoint::ChatCompletions => return by_bytes,
        Endpoint::Completions => body.get("prompt"),
        Endpoint::Embeddings => body.get("input"),
    };
    let ids = match input {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::Array(ids) => ids.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .sum(),
        _ => 0,
    };
    by_bytes.max(ids)
}
