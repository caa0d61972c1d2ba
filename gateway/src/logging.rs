//! Structured logs: JSON lines on stderr, level from `MOAT_LOG` (default `info`).
//!
//! Nothing that reaches a log may carry a prompt, an answer, a password, a key or a token;
//! keys are logged as their key id only.
//!
//! Lines are written by a dedicated thread (`tracing-appender`), so a request never waits on a
//! `write(2)` to stderr: with a synchronous writer the access log alone halved the data plane's
//! throughput. The writer blocks rather than drops when its queue is full — no line is lost.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt};

/// Keep this for as long as the process logs: dropping it flushes what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init() -> LogGuard {
    let filter = EnvFilter::try_from_env("MOAT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("moat-log")
        // Buffered: the writer thread drains its queue, then flushes — one write(2) per batch.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let installed = fmt()
        .json()
        .flatten_event(true)
        // The current span carries the request id, so every line of a request names it.
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init()
        .is_ok();
    LogGuard {
        _writer: installed.then_some(guard),
    }
}
