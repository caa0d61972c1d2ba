//! Model-based screening: a prompt-guard or moderation model of `[models]`, served by the
//! inference hosts through its pool like any model, asked on `/v1/chat/completions` with the
//! caller's texts as one user message. The first word of its answer is the verdict (a label
//! of `unsafe_labels` means "injection"). A failure or a timeout is an error, which the
//! caller's `on_error` turns into a refusal (`block`, the default) or a pass.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    config::ClassifierConfig,
    dataplane::{openai::validate::upstream_model, proxy, request_id::RequestId, state::AppState},
};

/// Most of an answer read (a verdict is a word or two).
const ANSWER_LIMIT: usize = 64 * 1024;

/// `Ok(true)`: the classifier says injection.
pub async fn judge(state: &AppState, c: &ClassifierConfig, text: &str) -> Result<bool, String> {
    let model = state
        .config
        .models()
        .get(&c.model)
        .ok_or("the classifier model is gone")?;
    let body = json!({
        "model": upstream_model(&c.model, model),
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let out = proxy::Outbound {
        path: "/v1/chat/completions",
        body: serde_json::to_vec(&body).map_err(|e| e.to_string())?.into(),
        stream: false,
        request_id: RequestId::generate(),
    };
    let call = async {
        let resp = proxy::forward(&state.pools, &state.upstreams, &model.pool, out).await;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status().as_u16()));
        }
        let bytes = axum::body::to_bytes(resp.into_body(), ANSWER_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let answer = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or("no answer")?;
        let word: String = answer
            .trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect::<String>()
            .to_lowercase();
        Ok(c.unsafe_labels.iter().any(|l| l.to_lowercase() == word))
    };
    tokio::time::timeout(Duration::from_millis(c.timeout_ms), call)
        .await
        .map_err(|_| "timed out".to_owned())?
}
