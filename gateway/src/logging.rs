//! Structured logs: JSON lines on stderr, level from `MOAT_LOG` (default `info`). A line is
//! `{"timestamp","level",<the event's fields, message among them>,"target"}`, and a line
//! written while a request is worked on ([`InRequest`], [`enter`]) also carries
//! `"span":{"request_id":…,"name":"request"}` ([`JsonLines`]).
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
    cell::Cell,
    future::Future,
    io::Write,
    pin::Pin,
    sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock},
    task::{Context, Poll},
    thread::JoinHandle,
    time::Duration,
};

use tracing::{Event, Subscriber, field::Field};
use tracing_log::NormalizeEvent;
use tracing_subscriber::{
    EnvFilter, fmt,
    fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter, format::Writer},
    registry::LookupSpan,
};

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
        .event_format(JsonLines)
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
    line_start(&mut line, &tracing::Level::INFO);
    line.extend_from_slice(b",\"message\":\"request\",\"method\":");
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

/// `{"timestamp":"…","level":"…"`, the start of every line.
fn line_start(line: &mut Vec<u8>, level: &tracing::Level) {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    line.extend_from_slice(b"{\"timestamp\":\"");
    SECOND.with(|s| {
        let mut s = s.borrow_mut();
        let secs = since_epoch.as_secs();
        if s.0 != secs {
            *s = (secs, render_second(secs));
        }
        line.extend_from_slice(&s.1);
    });
    // `.uuuuuuZ`: six digits of microseconds, zero-padded.
    let mut micros = since_epoch.subsec_micros();
    let mut frac = *b".000000Z";
    for d in frac[1..7].iter_mut().rev() {
        *d = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    line.extend_from_slice(&frac);
    line.extend_from_slice(b"\",\"level\":\"");
    line.extend_from_slice(level.as_str().as_bytes());
    line.push(b'"');
}

thread_local! {
    /// The last second a line was stamped in and its `YYYY-MM-DDTHH:MM:SS`: most lines share
    /// their second with the line before, so the calendar arithmetic runs once a second.
    static SECOND: std::cell::RefCell<(u64, [u8; 19])> = const { std::cell::RefCell::new((u64::MAX, [0; 19])) };
}

fn render_second(secs: u64) -> [u8; 19] {
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = [0u8; 19];
    let _ = write!(
        &mut out[..],
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    out
}

/// `s` as a JSON string.
fn text(line: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *line, s);
}

thread_local! {
    /// The id of the request this thread is working for right now (see [`InRequest`]).
    static REQUEST: Cell<Option<Arc<str>>> = const { Cell::new(None) };
}

/// The id of the request this thread is working for right now, if any.
pub fn current_request() -> Option<Arc<str>> {
    REQUEST.with(|r| {
        let id = r.take();
        r.set(id.clone());
        id
    })
}

/// While it lives, this thread works for the request whose id it took from `slot` (log lines
/// name it); dropped, it gives the id back and restores the one before. Moves the id, so
/// entering costs no reference count.
pub struct Entered<'a> {
    slot: &'a mut Option<Arc<str>>,
    before: Option<Arc<str>>,
}

/// Enters the request `slot` holds (none: the thread works for no request meanwhile).
pub fn enter(slot: &mut Option<Arc<str>>) -> Entered<'_> {
    let before = REQUEST.replace(slot.take());
    Entered { slot, before }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        *self.slot = REQUEST.replace(self.before.take());
    }
}

pin_project_lite::pin_project! {
    /// A future that works for one request: every log line written while it is polled names
    /// the request's id. (A `tracing` span did this before, at about a twentieth of the data
    /// plane's CPU: registering, entering and closing a span costs far more than moving one
    /// pointer in and out of a thread-local.)
    pub struct InRequest<F> {
        id: Option<Arc<str>>,
        #[pin]
        inner: F,
    }
}

impl<F> InRequest<F> {
    pub fn new(id: Arc<str>, inner: F) -> Self {
        Self {
            id: Some(id),
            inner,
        }
    }

    /// The future `make` returns, made in the request's scope too: what it logs when called,
    /// not only when polled, names the request.
    pub fn make(id: Arc<str>, make: impl FnOnce() -> F) -> Self {
        let mut id = Some(id);
        let inner = {
            let _entered = enter(&mut id);
            make()
        };
        Self { id, inner }
    }
}

impl<F: Future> Future for InRequest<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _entered = enter(this.id);
        this.inner.poll(cx)
    }
}

/// The shape of every line: `timestamp`, `level`, the event's fields (`message` among them),
/// `target`, and when the line is written for a request, `"span":{"request_id":…,"name":"request"}`
/// — the shape `tracing_subscriber`'s JSON format gave them with the request's span.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        // A `log` record's own target, not `log`.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Vec::with_capacity(256);
        line_start(&mut line, meta.level());
        event.record(&mut JsonFields(&mut line));
        line.extend_from_slice(b",\"target\":");
        text(&mut line, meta.target());
        if let Some(id) = current_request() {
            line.extend_from_slice(b",\"span\":{\"request_id\":");
            text(&mut line, &id);
            line.extend_from_slice(b",\"name\":\"request\"}");
        }
        line.extend_from_slice(b"}\n");
        // Only JSON strings and numbers were written: UTF-8.
        w.write_str(std::str::from_utf8(&line).map_err(|_| std::fmt::Error)?)
    }
}

/// An event's fields as `,"name":value` members.
struct JsonFields<'a>(&'a mut Vec<u8>);

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) {
        let name = field.name();
        self.0.push(b',');
        text(self.0, name.strip_prefix("r#").unwrap_or(name));
        self.0.push(b':');
    }

    fn number(&mut self, field: &Field, n: impl serde::Serialize) {
        if field.name().starts_with("log.") {
            return;
        }
        self.key(field);
        let _ = serde_json::to_writer(&mut *self.0, &n);
    }
}

impl tracing::field::Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name().starts_with("log.") {
            return;
        }
        self.key(field);
        text(self.0, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name().starts_with("log.") {
            return;
        }
        self.key(field);
        let _ = serde_json::to_writer(&mut *self.0, &format_args!("{value:?}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.number(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
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

    #[test]
    fn timestamps_are_now_in_utc_to_the_microsecond() {
        assert_eq!(&render_second(1_764_547_200), b"2025-12-01T00:00:00");
        assert_eq!(&render_second(951_825_599), b"2000-02-29T11:59:59");
        for _ in 0..3 {
            let before = time::OffsetDateTime::now_utc();
            let mut line = Vec::new();
            line_start(&mut line, &tracing::Level::WARN);
            line.push(b'}');
            let after = time::OffsetDateTime::now_utc();
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["level"], "WARN");
            let ts = v["timestamp"].as_str().unwrap();
            assert_eq!(ts.len(), "2025-12-01T00:00:00.000000Z".len(), "{ts}");
            let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                .unwrap();
            let slack = time::Duration::microseconds(1);
            assert!(
                before - slack <= t && t <= after + slack,
                "{before} <= {t} <= {after}"
            );
        }
    }

    /// Lines written for a request name it (`span.request_id`), inside a future or a scope;
    /// others do not; every line is one JSON object with its fields at the top level.
    #[tokio::test]
    async fn event_lines_name_the_request_they_were_written_for() {
        #[derive(Clone, Default)]
        struct Out(Arc<Mutex<Vec<u8>>>);
        impl Write for Out {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Out::default();
        let writer = out.clone();
        let subscriber = fmt()
            .event_format(JsonLines)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        tracing::info!(user = %"ann\"\n", n = 3u64, neg = -2i64, ok = true, "outside");
        let mut id = Some(Arc::<str>::from("req_1"));
        {
            let _e = enter(&mut id);
            tracing::warn!(bytes = 5, "in a scope");
            let mut inner = Some(Arc::<str>::from("req_2"));
            drop(enter(&mut inner));
            assert_eq!(inner.as_deref(), Some("req_2"), "the id goes back");
            tracing::info!("the outer request again");
        }
        assert_eq!(id.as_deref(), Some("req_1"), "the id goes back");
        InRequest::new("req_3".into(), async {
            tracing::info!("in a future");
            tokio::task::yield_now().await;
            tracing::info!(r#type = "raw", "after a yield");
        })
        .await;
        tracing::info!("after");
        let out = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let request = |i: usize| lines[i]["span"]["request_id"].as_str();
        assert_eq!(lines.len(), 6, "{out}");
        assert_eq!(lines[0]["message"], "outside");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["user"], "ann\"\n");
        assert_eq!(lines[0]["n"], 3);
        assert_eq!(lines[0]["neg"], -2);
        assert_eq!(lines[0]["ok"], true);
        assert_eq!(lines[0]["target"], "moat::logging::tests");
        assert!(lines[0].get("span").is_none());
        assert_eq!(
            (lines[1]["level"].as_str(), request(1)),
            (Some("WARN"), Some("req_1"))
        );
        assert_eq!(lines[1]["bytes"], 5);
        assert_eq!(request(2), Some("req_1"));
        assert_eq!((request(3), request(4)), (Some("req_3"), Some("req_3")));
        assert_eq!(lines[4]["type"], "raw");
        assert_eq!(lines[3]["span"]["name"], "request");
        assert!(lines[5].get("span").is_none());
        let ts = lines[0]["timestamp"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{ts}"
        );
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
