//! The gateway's own metrics, kept by the worker and rendered on the admin plane's `/metrics`
//! next to the kernel's counters: requests by route, model and status; upstream latency and
//! time to first token; tokens in and out; authentication failures by reason; quota and
//! guardrail denials; pool host health; audit records written and dropped.
//!
//! Labels only ever hold bounded values: route patterns, configured model names (anything
//! else is `(unknown)`), status codes, fixed reason strings. Nothing a client sends becomes a
//! label as it is.
//!
//! Counted per request, so the hot path takes no shared lock and allocates nothing once a
//! series exists: each thread counts into its own shard (a mutex only `/metrics` ever
//! contends for), and `/metrics` adds the shards up.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        LazyLock, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::audit::Event;

/// Histogram buckets in seconds: from a cached embedding to a long generation.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn add(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// One shard's counts. The per-request series are nested by label, so that counting into an
/// existing series looks it up by `&str` and allocates nothing.
#[derive(Default)]
struct Inner {
    /// route → model → status → count.
    requests: BTreeMap<String, BTreeMap<String, BTreeMap<u16, u64>>>,
    upstream: BTreeMap<String, Histogram>,
    ttft: BTreeMap<String, Histogram>,
    /// model → [in, out].
    tokens: BTreeMap<String, [u64; 2]>,
    auth_failures: BTreeMap<String, u64>,
    quota_denials: BTreeMap<(String, String), u64>,
    guardrail_denials: BTreeMap<(String, String), u64>,
}

impl Inner {
    /// Adds `other`'s counts to these.
    fn add(&mut self, other: &Inner) {
        for (route, models) in &other.requests {
            let r = entry(&mut self.requests, route);
            for (model, statuses) in models {
                let m = entry(r, model);
                for (status, n) in statuses {
                    *m.entry(*status).or_default() += n;
                }
            }
        }
        for (mine, theirs) in [
            (&mut self.upstream, &other.upstream),
            (&mut self.ttft, &other.ttft),
        ] {
            for (model, h) in theirs {
                entry(mine, model).add(h);
            }
        }
        for (model, [i, o]) in &other.tokens {
            let t = entry(&mut self.tokens, model);
            t[0] += i;
            t[1] += o;
        }
        for (reason, n) in &other.auth_failures {
            *entry(&mut self.auth_failures, reason) += n;
        }
        for (mine, theirs) in [
            (&mut self.quota_denials, &other.quota_denials),
            (&mut self.guardrail_denials, &other.guardrail_denials),
        ] {
            for (k, n) in theirs {
                *mine.entry(k.clone()).or_default() += n;
            }
        }
    }
}

/// The value under `key`, made (and `key` copied) only the first time.
fn entry<'a, V: Default>(map: &'a mut BTreeMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key).expect("just inserted")
}

/// Shards: more than the threads that count at once (one per core, plus the odd blocking
/// thread), each on its own cache line.
const SHARDS: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Inner>);

/// This process's gateway metrics.
pub struct Metrics([Shard; SHARDS]);

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

impl Default for Metrics {
    fn default() -> Self {
        Self(std::array::from_fn(|_| Shard::default()))
    }
}

/// This thread's shard: threads are numbered in the order they first count.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// A request's model, set by the handler once the body is parsed (the request-id layer reads it
/// when the answer is done; it rides in `request_id::InFlight`). Only configured names are kept.
#[derive(Clone, Default)]
pub struct ModelSlot(pub std::sync::Arc<std::sync::OnceLock<String>>);

impl ModelSlot {
    pub fn set(&self, model: &str) {
        let _ = self.0.set(model.to_owned());
    }

    pub fn get(&self) -> &str {
        self.0.get().map_or("", String::as_str)
    }
}

impl Metrics {
    /// This thread's shard, locked (contended only by `render`).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.0[shard_index()])
    }

    pub fn request(&self, route: &str, model: &str, status: u16) {
        let model = if model.is_empty() { "-" } else { model };
        let mut m = self.lock();
        let statuses = entry(entry(&mut m.requests, route), model);
        *statuses.entry(status).or_default() += 1;
    }

    /// From the request going upstream to the answer's head.
    pub fn upstream_latency(&self, model: &str, d: Duration) {
        entry(&mut self.lock().upstream, model).observe(d.as_secs_f64());
    }

    /// From the request going upstream to the first byte of the answer's body.
    pub fn time_to_first_token(&self, model: &str, d: Duration) {
        entry(&mut self.lock().ttft, model).observe(d.as_secs_f64());
    }

    pub fn tokens(&self, model: &str, input: u64, output: u64) {
        let mut m = self.lock();
        let t = entry(&mut m.tokens, model);
        t[0] += input;
        t[1] += output;
    }

    /// Counts what an audit event says about failures and denials (called by `audit::emit`).
    pub fn observe(&self, e: &Event) {
        match e {
            Event::AuthFailure { reason, .. } => {
                *self
                    .lock()
                    .auth_failures
                    .entry(reason_label(reason).to_owned())
                    .or_default() += 1;
            }
            Event::QuotaDenied { limit, .. } => {
                let (scope, what) = limit.split_once(':').unwrap_or(("", limit));
                let what = what.trim().replace(' ', "_");
                *self
                    .lock()
                    .quota_denials
                    .entry((bounded(scope), bounded(&what)))
                    .or_default() += 1;
            }
            Event::GuardrailHit { rule, action, .. } => {
                *self
                    .lock()
                    .guardrail_denials
                    .entry((bounded(rule), bounded(action)))
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    /// Prometheus text for everything above, the pools' host health and the audit counts.
    pub fn render(
        &self,
        out: &mut String,
        pools: &[(String, Vec<(String, bool)>)],
        audit: (u64, u64),
    ) {
        let mut m = Inner::default();
        for shard in &self.0 {
            m.add(&lock(shard));
        }
        family(
            out,
            "moat_requests_total",
            "counter",
            "Requests by route, model and status.",
        );
        for (route, models) in &m.requests {
            for (model, statuses) in models {
                for (status, n) in statuses {
                    let _ = writeln!(
                        out,
                        "moat_requests_total{{route=\"{}\",model=\"{}\",status=\"{status}\"}} {n}",
                        esc(route),
                        esc(model)
                    );
                }
            }
        }
        histograms(
            out,
            "moat_upstream_latency_seconds",
            "From a request going upstream to the answer's head.",
            &m.upstream,
        );
        histograms(
            out,
            "moat_time_to_first_token_seconds",
            "From a request going upstream to the first byte of the answer's body.",
            &m.ttft,
        );
        family(
            out,
            "moat_tokens_total",
            "counter",
            "Tokens by model and direction (in: prompt, out: completion), as the upstream reports them.",
        );
        for (model, counts) in &m.tokens {
            for (dir, n) in ["in", "out"].iter().zip(counts) {
                let _ = writeln!(
                    out,
                    "moat_tokens_total{{model=\"{}\",direction=\"{dir}\"}} {n}",
                    esc(model)
                );
            }
        }
        family(
            out,
            "moat_auth_failures_total",
            "counter",
            "Refused credentials by reason.",
        );
        for (reason, n) in &m.auth_failures {
            let _ = writeln!(
                out,
                "moat_auth_failures_total{{reason=\"{}\"}} {n}",
                esc(reason)
            );
        }
        family(
            out,
            "moat_quota_denials_total",
            "counter",
            "Requests refused by a quota, by scope (key, tenant) and limit.",
        );
        for ((scope, limit), n) in &m.quota_denials {
            let _ = writeln!(
                out,
                "moat_quota_denials_total{{scope=\"{}\",limit=\"{}\"}} {n}",
                esc(scope),
                esc(limit)
            );
        }
        family(
            out,
            "moat_guardrail_denials_total",
            "counter",
            "Guardrail hits by rule and action.",
        );
        for ((rule, action), n) in &m.guardrail_denials {
            let _ = writeln!(
                out,
                "moat_guardrail_denials_total{{rule=\"{}\",action=\"{}\"}} {n}",
                esc(rule),
                esc(action)
            );
        }
        family(
            out,
            "moat_pool_host_healthy",
            "gauge",
            "1 when a pool's host may be routed to (health checks, ejection), else 0.",
        );
        for (pool, hosts) in pools {
            for (host, ok) in hosts {
                let _ = writeln!(
                    out,
                    "moat_pool_host_healthy{{pool=\"{}\",host=\"{}\"}} {}",
                    esc(pool),
                    esc(host),
                    u8::from(*ok)
                );
            }
        }
        family(
            out,
            "moat_audit_records_written_total",
            "counter",
            "Audit records written and synced to the log.",
        );
        let _ = writeln!(out, "moat_audit_records_written_total {}", audit.0);
        family(
            out,
            "moat_audit_records_dropped_total",
            "counter",
            "Audit records lost: queue full, undecodable, or a failed write.",
        );
        let _ = writeln!(out, "moat_audit_records_dropped_total {}", audit.1);
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, Inner> {
    // A poisoned lock only means a panic elsewhere mid-update of plain counters.
    shard.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reason as a label: one of the fixed reasons, else `invalid token` (token errors may name
/// attacker-chosen header text).
fn reason_label(reason: &str) -> &str {
    const KNOWN: &[&str] = &[
        "malformed",
        "bad secret",
        "unknown key",
        "inactive key",
        "expired",
        "session ended",
        "claims do not match the session",
        "invalid credentials",
        "throttled",
        "unknown token",
        "session ended or token expired",
        "missing bearer",
        "not an API key or access token",
        "refresh token presented as a bearer",
    ];
    KNOWN
        .iter()
        .find(|k| **k == reason)
        .copied()
        .unwrap_or("invalid token")
}

fn bounded(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).take(64).collect();
    if s.is_empty() { "-".into() } else { s }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histograms(out: &mut String, name: &str, help: &str, h: &BTreeMap<String, Histogram>) {
    family(out, name, "histogram", help);
    for (model, h) in h {
        let model = esc(model);
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{model=\"{model}\",le=\"{b}\"}} {}",
                h.counts.get(i).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_with_bounded_labels() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", "chat", 200);
        m.upstream_latency("chat", Duration::from_millis(30));
        m.time_to_first_token("chat", Duration::from_millis(40));
        m.tokens("chat", 3, 5);
        m.observe(&Event::AuthFailure {
            method: "access_token".into(),
            reason: "unexpected header `x\"y` (only alg, typ and kid are accepted)".into(),
            user_id: None,
            key_id: None,
            sid: None,
            source: None,
        });
        let mut out = String::new();
        m.render(
            &mut out,
            &[("p".into(), vec![("h:1".into(), true)])],
            (7, 1),
        );
        assert!(out.contains(
            "moat_requests_total{route=\"/v1/chat/completions\",model=\"chat\",status=\"200\"} 1"
        ));
        assert!(out.contains("moat_upstream_latency_seconds_bucket{model=\"chat\",le=\"0.05\"} 1"));
        assert!(
            out.contains("moat_upstream_latency_seconds_bucket{model=\"chat\",le=\"0.025\"} 0")
        );
        assert!(out.contains("moat_tokens_total{model=\"chat\",direction=\"out\"} 5"));
        assert!(
            out.contains("moat_auth_failures_total{reason=\"invalid token\"} 1"),
            "{out}"
        );
        assert!(out.contains("moat_pool_host_healthy{pool=\"p\",host=\"h:1\"} 1"));
        assert!(out.contains("moat_audit_records_written_total 7"));
    }

    /// Counts made on different threads (different shards) are added up in one series.
    #[test]
    fn shards_add_up() {
        let m = std::sync::Arc::new(Metrics::default());
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    m.request("/v1/chat/completions", "chat", 200);
                    m.tokens("chat", 1, 2);
                    m.upstream_latency("chat", Duration::from_millis(30));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        m.request("/v1/chat/completions", "", 404);
        let mut out = String::new();
        m.render(&mut out, &[], (0, 0));
        assert!(out.contains(
            "moat_requests_total{route=\"/v1/chat/completions\",model=\"chat\",status=\"200\"} 3"
        ));
        assert!(out.contains(
            "moat_requests_total{route=\"/v1/chat/completions\",model=\"-\",status=\"404\"} 1"
        ));
        assert!(out.contains("moat_tokens_total{model=\"chat\",direction=\"in\"} 3"));
        assert!(out.contains("moat_tokens_total{model=\"chat\",direction=\"out\"} 6"));
        assert!(out.contains("moat_upstream_latency_seconds_count{model=\"chat\"} 3"));
        assert!(out.contains("moat_upstream_latency_seconds_bucket{model=\"chat\",le=\"0.05\"} 3"));
    }
}
