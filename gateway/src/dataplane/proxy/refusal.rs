//! An upstream's 4xx answer, as the client sees it: the status and the OpenAI error shape
//! stay (so SDKs raise the same exception), the words do not. An inference server's refusal
//! names its own model ids, limits, paths and versions, and a validation error may quote the
//! request back; the client gets a fixed message per status instead, and the operator's log
//! gets the upstream's words (its `message`, cut before anything that quotes the input, and
//! bounded), never the prompt.

use axum::http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use std::time::Duration;
use tracing::warn;

use crate::error::ApiError;

/// Most of an upstream's error body that is read.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Most of the upstream's message that is logged.
const MAX_LOGGED: usize = 300;

/// Reads the upstream's refusal (bounded in size and time), logs its words, and returns the
/// client's error with the same status.
pub async fn refusal(status: StatusCode, body: Incoming, idle: Duration, host: &str) -> ApiError {
    let read = tokio::time::timeout(idle, Limited::new(body, MAX_ERROR_BODY).collect()).await;
    let bytes = match read {
        Ok(Ok(c)) => c.to_bytes(),
        _ => Default::default(),
    };
    let upstream: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let error = &upstream["error"];
    let message = error["message"]
        .as_str()
        .or(upstream["message"].as_str())
        .or(upstream["detail"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    let words = redact(&message);
    warn!(
        host,
        status = status.as_u16(),
        upstream_type = error["type"].as_str().unwrap_or("-"),
        upstream_code = %error["code"],
        upstream_message = %words,
        "upstream refused the request"
    );
    client_error(status, &message)
}

/// The client's error for an upstream refusal with `status` saying `message`.
fn client_error(status: StatusCode, message: &str) -> ApiError {
    let lower = message.to_ascii_lowercase();
    if lower.contains("context length") || lower.contains("context window") {
        return ApiError::new(
            status,
            "invalid_request_error",
            "the prompt and the completion cap together exceed what the model can take; \
             shorten the prompt or lower `max_tokens`",
        )
        .with_code("context_length_exceeded");
    }
    let (kind, text) = match status.as_u16() {
        401 | 403 => (
            "server_error",
            "the inference server refused the gateway's credential",
        ),
        404 => (
            "invalid_request_error",
            "the inference server does not serve this model",
        ),
        413 => (
            "invalid_request_error",
            "the request is too large for the inference server",
        ),
        429 => ("requests", "the inference server is busy; retry later"),
        _ => (
            "invalid_request_error",
            "the inference server refused the request",
        ),
    };
    ApiError::new(status, kind, text).with_code("upstream_refused")
}

/// The upstream's message for the log: cut where it starts quoting the request (a validation
/// error's `input`), bounded, on one line.
fn redact(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    let cut = ["input", "prompt", "messages"]
        .iter()
        .filter_map(|w| lower.find(w))
        .filter(|&i| quotes_after(&lower[i..]))
        .min()
        .unwrap_or(message.len());
    let mut out: String = message[..cut]
        .chars()
        .take(MAX_LOGGED)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if cut < message.len() || message[..cut].chars().count() > MAX_LOGGED {
        out.push_str(" […]");
    }
    out
}

/// Whether a word is followed (within a few characters) by a value: `input_value=`,
/// `'input': `, `"prompt": …`.
fn quotes_after(at: &str) -> bool {
    at.chars()
        .skip_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(4)
        .any(|c| matches!(c, '=' | ':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_gets_the_status_and_a_fixed_message() {
        let leak = "model meta-llama/Llama-3-70B at /opt/vllm/serve.py: max_num_seqs=256 exceeded";
        for code in [400u16, 401, 403, 404, 413, 422, 429] {
            let status = StatusCode::from_u16(code).unwrap();
            let e = client_error(status, leak);
            assert_eq!(e.status, status);
            let body = e.body().to_string();
            assert!(
                !body.contains("meta-llama") && !body.contains("/opt"),
                "{body}"
            );
            assert!(e.body()["error"]["type"].is_string());
            assert_eq!(e.code, Some("upstream_refused"));
        }
        let e = client_error(
            StatusCode::BAD_REQUEST,
            "This model's maximum context length is 4096 tokens. However, you requested 9000",
        );
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(!e.message.contains("4096"));
    }

    #[test]
    fn the_log_keeps_the_words_but_not_the_request() {
        let m = "1 validation error: messages.0.content Field required [type=missing, \
                 input_value={'role': 'user', 'content': 'my secret prompt'}]";
        let r = redact(m);
        assert!(
            r.contains("validation error") && !r.contains("secret"),
            "{r}"
        );
        let m = r#"{'type': 'extra', 'loc': ('body', 'x'), 'input': 'my secret prompt'}"#;
        let r = redact(m);
        assert!(!r.contains("secret"), "{r}");
        let m = "maximum context length is 4096 tokens";
        assert_eq!(redact(m), m);
        assert!(redact(&"x".repeat(1000)).len() < 320);
        assert!(!redact("a\nb").contains('\n'));
    }
}
