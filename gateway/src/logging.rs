//! Structured logs: JSON lines on stderr, level from `MOAT_LOG` (default `info`).
//!
//! Nothing that reaches a log may carry a prompt, an answer, a password, a key or a token;
//! keys are logged as their key id only.
//!
//! Lines are written by a dedicated thread, so a request never waits on a `write(2)` to
//! stderr: with a synchronous writer the access log alone halved the data plane's throughput.
//! A line is appended to a shared buffer ([`Batch`]); the writer thread is woken once per
//! batch, not once per line, gathers for up to [`GATHER`], then writes the whole batch at
//! once. (A queue with a wake-up and a `write(2)` per line cost the data plane about a tenth of
//! its CPU under load.) The buffer blocks its writers rather than drop lines when stderr does
//! not keep up — no line is lost — and what is buffered is written when the guard is dropped.

use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock},
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::{EnvFilter, fmt, fmt::MakeWriter};

/// How long the writer thread gathers lines after the first one of a batch.
const GATHER: Duration = Duration::from_millis(10);
/// A batch this large is written at once, without waiting out [`GATHER`].
const WRITE_AT: usize = 64 * 1024;
/// Writers wait while this much is queued (stderr is not keeping up).
const FULL_AT: usize = 8 * 1024 * 1024;

/// Keep this for as long as the process logs: dropping it writes what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    writer: Option<(Arc<Batch>, JoinHandle<()>)>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((batch, thread)) = self.writer.take() {
            batch.lock().closed = true;
            batch.queued.notify_one();
            let _ = thread.join();
        }
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init() -> LogGuard {
    let filter = EnvFilter::try_from_env("MOAT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let batch = Arc::new(Batch::default());
    let installed = fmt()
        .json()
        .flatten_event(true)
        // The current span carries the request id, so every line of a request names it.
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(Lines(batch.clone()))
        .try_init()
        .is_ok();
    if installed {
        let _ = LINES.set(batch.clone());
    }
    let writer = installed
        .then(|| {
            let b = batch.clone();
            std::thread::Builder::new()
                .name("moat-log".into())
                .spawn(move || b.write_out(&mut std::io::stderr()))
                .ok()
                .map(|t| (batch, t))
        })
        .flatten();
    LogGuard { writer }
}

/// The installed subscriber's batch, for [`access`].
static LINES: OnceLock<Arc<Batch>> = OnceLock::new();

/// The target the access log's lines name (and `MOAT_LOG` filters by).
pub const ACCESS_TARGET: &str = "moat::dataplane::request_id";

/// One request's access-log line.
pub struct Access<'a> {
    pub request_id: &'a str,
    /// The inference host that answered, if one did.
    pub upstream: Option<&'a str>,
    pub method: &'a str,
    /// The route pattern, never the raw path.
    pub route: &'a str,
    pub status: u16,
    pub ms: u64,
}

/// Writes the access-log line: the same JSON shape as the subscriber's lines (the request's
/// span nested as `span`), formatted here because it is written for every request and the
/// subscriber's generic formatter cost about a twentieth of the data plane's CPU.
pub fn access(a: &Access<'_>) {
    let Some(batch) = LINES.get() else { return };
    if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
        return;
    }
    batch.append(&access_line(a));
}

fn access_line(a: &Access<'_>) -> Vec<u8> {
    let mut line = Vec::with_capacity(320);
    let now = time::OffsetDateTime::now_utc();
    let _ = write!(
        line,
        "{{\"timestamp\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\",\"level\":\"INFO\",\
         \"message\":\"request\",\"method\":",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    );
    let text = |line: &mut Vec<u8>, s: &str| {
        let _ = serde_json::to_writer(&mut *line, s);
    };
    text(&mut line, a.method);
    line.extend_from_slice(b",\"route\":");
    text(&mut line, a.route);
    let _ = write!(
        line,
        ",\"status\":{},\"ms\":{},\"target\":\"{ACCESS_TARGET}\",\"span\":{{\"request_id\":",
        a.status, a.ms
    );
    text(&mut line, a.request_id);
    if let Some(u) = a.upstream {
        line.extend_from_slice(b",\"upstream\":");
        text(&mut line, u);
    }
    line.extend_from_slice(b",\"name\":\"request\"}}\n");
    line
}

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Batch {
    state: Mutex<Pending>,
    /// The first line of a batch, a full batch, or the guard dropped.
    queued: Condvar,
    /// The queue was drained.
    drained: Condvar,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closed: bool,
}

impl Batch {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only bytes behind; keep logging.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut p = self.lock();
        while p.bytes.len() >= FULL_AT && !p.closed {
            p = self.drained.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        let was_empty = p.bytes.is_empty();
        p.bytes.extend_from_slice(line);
        let full = p.bytes.len() >= WRITE_AT;
        drop(p);
        if was_empty || full {
            self.queued.notify_one();
        }
    }

    /// The writer thread: waits for a first line, gathers for [`GATHER`] (or until a batch is
    /// full), writes the batch, until the guard is dropped and nothing is left.
    fn write_out(&self, out: &mut impl Write) {
        let mut spare = Vec::new();
        loop {
            let mut p = self.lock();
            while p.bytes.is_empty() && !p.closed {
                p = self.queued.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.bytes.len() < WRITE_AT && !p.closed {
                p = self
                    .queued
                    .wait_timeout_while(p, GATHER, |p| p.bytes.len() < WRITE_AT && !p.closed)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut p.bytes, &mut spare);
            let done = p.closed && spare.is_empty();
            drop(p);
            self.drained.notify_all();
            if done {
                return;
            }
            // Nowhere to report a failed write to stderr; the line is gone either way.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
        }
    }
}

/// The subscriber's writer: one `write` per formatted event, appended whole to the batch.
struct Lines(Arc<Batch>);

impl<'a> MakeWriter<'a> for Lines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

struct LineWriter<'a>(&'a Batch);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The access line is one JSON object in the subscriber's shape, its texts escaped.
    #[test]
    fn the_access_line_is_json_in_the_subscribers_shape() {
        let a = Access {
            request_id: "req_00ff",
            upstream: Some("gpu\"1\n"),
            method: "POST",
            route: "/v1/chat/completions",
            status: 429,
            ms: 12,
        };
        let line = access_line(&a);
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(line.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request");
        assert_eq!(v["route"], "/v1/chat/completions");
        assert_eq!(v["status"], 429);
        assert_eq!(v["ms"], 12);
        assert_eq!(v["target"], ACCESS_TARGET);
        assert_eq!(v["span"]["request_id"], "req_00ff");
        assert_eq!(v["span"]["upstream"], "gpu\"1\n");
        let ts = v["timestamp"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{ts}"
        );
        let none = access_line(&Access {
            upstream: None,
            ..a
        });
        let v: serde_json::Value = serde_json::from_slice(&none).unwrap();
        assert!(v["span"].get("upstream").is_none());
    }

    /// Every line arrives, whole and in order, and what is queued when the guard goes is
    /// written before the writer thread ends.
    #[test]
    fn lines_are_batched_and_none_is_lost() {
        let batch = Arc::new(Batch::default());
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>, Arc<Mutex<usize>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                *self.1.lock().unwrap() += 1;
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writes = Arc::new(Mutex::new(0));
        let thread = {
            let (b, o, w) = (batch.clone(), out.clone(), writes.clone());
            std::thread::spawn(move || b.write_out(&mut Shared(o, w)))
        };
        let producers: Vec<_> = (0..4)
            .map(|t| {
                let b = batch.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        b.append(format!("{t} {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        drop(LogGuard {
            writer: Some((batch, thread)),
        });
        let out = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let mut next = [0; 4];
        for line in out.lines() {
            let (t, i) = line.split_once(' ').unwrap();
            let t: usize = t.parse().unwrap();
            assert_eq!(
                i.parse::<usize>().unwrap(),
                next[t],
                "thread {t} out of order"
            );
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
        // Batched: far fewer writes than lines.
        assert!(
            *writes.lock().unwrap() < 20_000 / 10,
            "{} writes",
            writes.lock().unwrap()
        );
    }
}
