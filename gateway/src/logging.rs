//! Structured logs: JSON lines on stderr, level from `MOAT_LOG` (default `info`).
//!
//! Nothing that reaches a log may carry a prompt, an answer, a password, a key or a token;
//! keys are logged as their key id only.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env("MOAT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .json()
        .flatten_event(true)
        // The current span carries the request id, so every line of a request names it.
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
