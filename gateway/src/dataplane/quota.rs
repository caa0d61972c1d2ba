//! Quotas, per key and per tenant: the live counters (they outlive config reloads: the worker
//! keeps one [`Quotas`] in its `Shared`), the admission decision, and the [`Ticket`] an admitted
//! request holds until its answer ends (the answer's metering is `metered`).
//!
//! - requests per minute and tokens per minute over a sliding minute (a log of charges, so
//!   `Retry-After` says exactly when enough of the window will have expired);
//! - concurrent requests and concurrent streams.
//!
//! All limits of a request (its key's and its tenant's) are checked under one lock and charged
//! only if all pass: a refused request consumes nothing, so an SDK retrying a 429 is charged
//! once, for the attempt that gets through. An attempt that produced no generation (the
//! gateway or the upstream failed, or the upstream refused it) is refunded for the same reason.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::StatusCode;

use crate::{
    auth::Principal,
    config::{Config, Quota},
    error::ApiError,
};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Tenant(String),
    /// A key id, or `user:<id>` for password logins.
    Key(String),
}

#[derive(Debug, Default)]
struct Counter {
    requests: VecDeque<(Instant, u64)>,
    /// (when, charge id, tokens)
    tokens: VecDeque<(Instant, u64, u64)>,
    concurrent: u64,
    streams: u64,
}

impl Counter {
    fn expire(&mut self, now: Instant) {
        while self
            .requests
            .front()
            .is_some_and(|(t, _)| now >= *t + WINDOW)
        {
            self.requests.pop_front();
        }
        while self
            .tokens
            .front()
            .is_some_and(|(t, _, _)| now >= *t + WINDOW)
        {
            self.tokens.pop_front();
        }
    }

    /// `None` if `ask` fits under `q`, else the seconds until it would.
    fn refuse(&self, q: &Quota, ask: &Ask, now: Instant) -> Option<(&'static str, u64)> {
        let until = |t: Instant| (t + WINDOW).saturating_duration_since(now);
        if let Some(l) = q.concurrent_requests
            && self.concurrent >= l
        {
            // No clock says when another request ends; one second is the honest minimum.
            return Some(("concurrent requests", 1));
        }
        if ask.stream
            && let Some(l) = q.concurrent_streams
            && self.streams >= l
        {
            return Some(("concurrent streams", 1));
        }
        if let Some(l) = q.requests_per_minute
            && self.requests.len() as u64 >= l
        {
            // The oldest charges must expire until one slot is free.
            let free_at = self.requests[self.requests.len() - l as usize].0;
            return Some(("requests per minute", secs(until(free_at))));
        }
        if let Some(l) = q.tokens_per_minute {
            let used: u64 = self.tokens.iter().map(|e| e.2).sum();
            if used + ask.tokens > l {
                let mut freed = 0;
                for (t, _, n) in &self.tokens {
                    freed += n;
                    if used - freed + ask.tokens <= l {
                        return Some(("tokens per minute", secs(until(*t))));
                    }
                }
                return Some(("tokens per minute", 60));
            }
        }
        None
    }
}

fn secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

/// What a request asks of its quotas.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub tokens: u64,
    pub stream: bool,
}

/// The live counters of every key and tenant. Survives reloads; limits come from the config
/// in force for each request.
#[derive(Default)]
pub struct Quotas {
    counters: Mutex<HashMap<Subject, Counter>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Quotas {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Subject, Counter>> {
        // Plain counters: a panic mid-update leaves nothing worse than a stale count.
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits the request and charges it to its key and its tenant, or refuses it with a 429
    /// (or a 400 when it could never fit) and charges nothing.
    pub fn acquire(
        self: &Arc<Self>,
        config: &Config,
        p: &Principal,
        ask: Ask,
    ) -> Result<Ticket, ApiError> {
        let t = config.tenant(&p.tenant);
        let tenant_q = t.quota.unwrap_or(config.quotas().tenant);
        let key_q = t.key_quota.unwrap_or(config.quotas().key);
        // A password login has no key: its user is the subject, so logging in again does
        // not buy a fresh quota.
        let key = p
            .key_id
            .clone()
            .unwrap_or_else(|| format!("user:{}", p.user_id));
        let subjects = [
            (Subject::Key(key), key_q, "key"),
            (Subject::Tenant(p.tenant.clone()), tenant_q, "tenant"),
        ];
        for (_, q, who) in &subjects {
            if q.tokens_per_minute.is_some_and(|l| ask.tokens > l) {
                return Err(ApiError::bad_request(format!(
                    "this request may use up to {} tokens, more than the {who}'s tokens-per-minute \
                     quota; lower `max_tokens`",
                    ask.tokens
                ))
                .with_code("tokens_exceed_quota")
                .with_param("max_tokens"));
            }
        }
        let now = Instant::now();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.lock();
        for (s, q, who) in &subjects {
            let c = map.entry(s.clone()).or_default();
            c.expire(now);
            if let Some((what, retry)) = c.refuse(q, &ask, now) {
                crate::audit::emit(crate::audit::Event::QuotaDenied {
                    tenant: p.tenant.clone(),
                    user_id: Some(p.user_id.clone()),
                    limit: format!("{who}:{what}"),
                });
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "requests",
                    format!("the {who}'s quota of {what} is used up; retry in {retry} s"),
                )
                .with_code("rate_limit_exceeded")
                .with_retry_after(retry));
            }
        }
        for (s, _, _) in &subjects {
            let c = map.get_mut(s).expect("inserted above");
            c.requests.push_back((now, id));
            c.tokens.push_back((now, id, ask.tokens));
            c.concurrent += 1;
            if ask.stream {
                c.streams += 1;
            }
        }
        drop(map);
        Ok(Ticket {
            quotas: self.clone(),
            subjects: subjects.map(|s| s.0),
            id,
            stream: ask.stream,
        })
    }
}

/// One admitted request's hold on its quotas: its concurrency slots until dropped, and its
/// charges, which [`Ticket::refund`] or [`Ticket::reconcile`] can correct.
pub struct Ticket {
    quotas: Arc<Quotas>,
    subjects: [Subject; 2],
    id: u64,
    stream: bool,
}

impl Ticket {
    /// Takes back the request and its tokens: nothing was generated.
    pub fn refund(&self) {
        let mut map = self.quotas.lock();
        for s in &self.subjects {
            if let Some(c) = map.get_mut(s) {
                c.requests.retain(|e| e.1 != self.id);
                c.tokens.retain(|e| e.1 != self.id);
            }
        }
    }

    /// Replaces the token reservation with what the upstream reported.
    pub fn reconcile(&self, used: u64) {
        let mut map = self.quotas.lock();
        for s in &self.subjects {
            if let Some(c) = map.get_mut(s)
                && let Some(e) = c.tokens.iter_mut().find(|e| e.1 == self.id)
            {
                e.2 = used;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut map = self.quotas.lock();
        for s in &self.subjects {
            let Some(c) = map.get_mut(s) else { continue };
            c.concurrent = c.concurrent.saturating_sub(1);
            if self.stream {
                c.streams = c.streams.saturating_sub(1);
            }
            c.expire(Instant::now());
            if c.concurrent == 0 && c.requests.is_empty() && c.tokens.is_empty() {
                map.remove(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::auth::AuthMethod;

    fn config(q: &str) -> Config {
        Config::from_str(Path::new("/t.toml"), q).unwrap()
    }

    fn p(key: &str) -> Principal {
        Principal {
            user_id: "u".into(),
            username: "u".into(),
            tenant: "t".into(),
            key_id: Some(key.into()),
            session_id: None,
            roles: vec![],
            method: AuthMethod::ApiKey,
        }
    }

    const ASK: Ask = Ask {
        tokens: 10,
        stream: false,
    };

    #[test]
    fn requests_per_minute_refuse_without_charging() {
        let c = config("[quotas.key]\nrequests_per_minute = 2\n");
        let q = Arc::new(Quotas::default());
        let _a = q.acquire(&c, &p("k"), ASK).unwrap();
        let _b = q.acquire(&c, &p("k"), ASK).unwrap();
        for _ in 0..3 {
            let e = q.acquire(&c, &p("k"), ASK).err().unwrap();
            assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
            let r = e.retry_after.unwrap();
            assert!((59..=60).contains(&r), "{r}");
        }
        assert!(q.acquire(&c, &p("other"), ASK).is_ok(), "per key");
    }

    #[test]
    fn refunds_and_reconciliation_free_the_window() {
        let c = config("[quotas.tenant]\ntokens_per_minute = 25\n");
        let q = Arc::new(Quotas::default());
        let a = q.acquire(&c, &p("a"), ASK).unwrap();
        let b = q.acquire(&c, &p("b"), ASK).unwrap();
        assert!(
            q.acquire(&c, &p("c"), ASK).is_err(),
            "20 + 10 > 25 for the tenant"
        );
        a.refund();
        let _c = q.acquire(&c, &p("c"), ASK).unwrap();
        b.reconcile(1);
        let _d = q.acquire(&c, &p("d"), ASK).unwrap();
        let e = q
            .acquire(
                &c,
                &p("d"),
                Ask {
                    tokens: 26,
                    stream: false,
                },
            )
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "never fits");
    }

    #[test]
    fn concurrency_is_released_on_drop() {
        let c = config("[quotas.key]\nconcurrent_requests = 1\n");
        let q = Arc::new(Quotas::default());
        let a = q.acquire(&c, &p("k"), ASK).unwrap();
        assert_eq!(
            q.acquire(&c, &p("k"), ASK).err().unwrap().retry_after,
            Some(1)
        );
        drop(a);
        assert!(q.acquire(&c, &p("k"), ASK).is_ok());
    }
}
