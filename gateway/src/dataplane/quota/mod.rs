//! Quotas, per key and per tenant: the admission decision and the [`Ticket`] an admitted request
//! holds until its answer ends (the answer's metering is `metered`). The counters live behind a
//! [`QuotaBackend`] (the in-process one is [`local`]); they outlive config reloads (the worker
//! keeps one [`Quotas`] in its `Shared`), and the limits come from the config in force for each
//! request.
//!
//! - requests per minute and tokens per minute over a sliding minute;
//! - concurrent requests and concurrent streams.
//!
//! The protocol every backend keeps: **reserve, then reconcile.** All limits of a request (its
//! key's and its tenant's) are checked together and charged only if all pass: a refused request
//! consumes nothing, so an SDK retrying a 429 is charged once, for the attempt that gets
//! through. The charge reserves the most the request may use; when the answer ends the
//! reservation is replaced by the usage the upstream reported ([`Ticket::reconcile`]), or taken
//! back when the attempt produced no generation ([`Ticket::refund`]: the gateway or the upstream
//! failed, or the upstream refused it). The concurrency slots are held until the ticket is
//! dropped, whichever way it ends.
//!
//! A subject with no limit configured is not counted at all, and a request none of whose
//! subjects has a limit costs nothing here (no lock, no allocation). So a limit added by a
//! reload counts the requests admitted from then on, not those already running.

pub mod local;
pub mod redis;

use std::{future::Future, pin::Pin, sync::Arc};

use axum::http::StatusCode;

use crate::{
    auth::Principal,
    config::{Config, Quota},
    error::ApiError,
};

/// Whose quota a charge counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectKind {
    Tenant,
    /// An API key, by its key id.
    Key,
    /// A password login, by its user id (it has no key; logging in again buys no fresh quota).
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subject<'a> {
    pub kind: SubjectKind,
    pub id: &'a str,
}

/// One subject's part of a request: the limits that apply to it (at least one is set).
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub subject: Subject<'a>,
    pub quota: Quota,
    /// "key" or "tenant", for the refusal's message.
    pub who: &'static str,
}

/// What a request asks of its quotas.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub tokens: u64,
    pub stream: bool,
}

/// Why a backend refused a request (nothing was charged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub who: &'static str,
    /// Which limit: "requests per minute", "concurrent streams", …
    pub what: &'static str,
    /// Seconds until the request would fit (at least 1).
    pub retry_after: u64,
    /// The counters could not be reached (`on_backend_error = "deny"`): a 503, not a 429.
    pub unavailable: bool,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where quota counters are kept. A backend checks and charges all of a request's charges
/// atomically and hands back the [`Reservation`] that corrects and releases them; it never
/// searches for a charge when reconciling (the reservation is the handle).
pub trait QuotaBackend: Send + Sync {
    /// Admits the request and charges every subject in `charges` (one request, `ask.tokens`
    /// tokens, a concurrency slot, and a stream slot if `ask.stream`), or refuses it and
    /// charges nothing.
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge<'a>],
        ask: Ask,
    ) -> BoxFuture<'a, Result<Box<dyn Reservation>, Refusal>>;

    /// Gives back what this replica holds ahead of requests (the Redis backend's leased
    /// shares) when it stops serving; the default holds nothing.
    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// An admitted request's charges. Dropping it releases its concurrency slots; the token
/// charge stands as reserved unless reconciled or refunded first.
pub trait Reservation: Send + Sync {
    /// Replaces the token reservation with what the upstream reported, then releases.
    fn reconcile(self: Box<Self>, used: u64);
    /// Takes back the request and its tokens (nothing was generated), then releases.
    fn refund(self: Box<Self>);
}

/// The quota front: limits from the config, then the backend.
pub struct Quotas {
    backend: Arc<dyn QuotaBackend>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self::new(Arc::new(local::Local::default()))
    }
}

impl Quotas {
    pub fn new(backend: Arc<dyn QuotaBackend>) -> Self {
        Self { backend }
    }

    /// The backend `[quotas]` names: this process's memory, or Redis shared by the replicas.
    /// Chosen when the worker starts (a reload keeps it).
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let q = config.quotas();
        Ok(match q.backend {
            crate::config::QuotaBackendKind::Memory => Self::default(),
            crate::config::QuotaBackendKind::Redis => {
                let url = q.redis_url.as_deref().unwrap_or_default();
                Self::new(redis::RedisQuotas::new(
                    url,
                    config.redis_password.as_ref().map(|p| p.expose()),
                    q.on_backend_error,
                    q.redis_lease(),
                )?)
            }
        })
    }

    /// Gives back what the backend holds ahead of requests (call once the server stopped).
    pub async fn release(&self) {
        self.backend.release().await;
    }

    /// Admits the request and charges it to its key and its tenant, or refuses it with a 429
    /// (or a 400 when it could never fit) and charges nothing.
    pub async fn acquire(
        &self,
        config: &Config,
        p: &Principal,
        ask: Ask,
    ) -> Result<Ticket, ApiError> {
        let t = config.tenant(&p.tenant);
        let tenant_q = t.quota.unwrap_or(config.quotas().tenant);
        let key_q = t.key_quota.unwrap_or(config.quotas().key);
        let key = match &p.key_id {
            Some(k) => Subject {
                kind: SubjectKind::Key,
                id: k,
            },
            None => Subject {
                kind: SubjectKind::User,
                id: &p.user_id,
            },
        };
        let tenant = Subject {
            kind: SubjectKind::Tenant,
            id: &p.tenant,
        };
        let all = [
            Charge {
                subject: key,
                quota: key_q,
                who: "key",
            },
            Charge {
                subject: tenant,
                quota: tenant_q,
                who: "tenant",
            },
        ];
        let mut charges = [all[0]; 2];
        let mut n = 0;
        for c in all {
            if !limited(&c.quota) {
                continue;
            }
            if c.quota.tokens_per_minute.is_some_and(|l| ask.tokens > l) {
                return Err(ApiError::bad_request(format!(
                    "this request may use up to {} tokens, more than the {}'s tokens-per-minute \
                     quota; lower `max_tokens`",
                    ask.tokens, c.who
                ))
                .with_code("tokens_exceed_quota")
                .with_param("max_tokens"));
            }
            charges[n] = c;
            n += 1;
        }
        if n == 0 {
            return Ok(Ticket { hold: None });
        }
        match self.backend.reserve(&charges[..n], ask).await {
            Ok(hold) => Ok(Ticket { hold: Some(hold) }),
            Err(r) if r.unavailable => Err(ApiError::unavailable(
                "quota counters unavailable; try again",
            )
            .with_code("quota_backend_unavailable")
            .with_retry_after(r.retry_after)),
            Err(r) => Err({
                crate::audit::emit(crate::audit::Event::QuotaDenied {
                    tenant: p.tenant.clone(),
                    user_id: Some(p.user_id.clone()),
                    limit: format!("{}:{}", r.who, r.what),
                });
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "requests",
                    format!(
                        "the {}'s quota of {} is used up; retry in {} s",
                        r.who, r.what, r.retry_after
                    ),
                )
                .with_code("rate_limit_exceeded")
                .with_retry_after(r.retry_after)
            }),
        }
    }
}

fn limited(q: &Quota) -> bool {
    q.requests_per_minute.is_some()
        || q.tokens_per_minute.is_some()
        || q.concurrent_requests.is_some()
        || q.concurrent_streams.is_some()
}

/// One admitted request's hold on its quotas: its concurrency slots until dropped, and its
/// charges, which [`Ticket::refund`] or [`Ticket::reconcile`] correct (and then release).
/// Empty when no limit applies to the request.
pub struct Ticket {
    hold: Option<Box<dyn Reservation>>,
}

impl Ticket {
    /// Takes back the request and its tokens: nothing was generated.
    pub fn refund(mut self) {
        if let Some(h) = self.hold.take() {
            h.refund();
        }
    }

    /// Replaces the token reservation with what the upstream reported.
    pub fn reconcile(mut self, used: u64) {
        if let Some(h) = self.hold.take() {
            h.reconcile(used);
        }
    }

    /// A ticket over any reservation (tests that watch what an answer does with it).
    #[cfg(test)]
    pub(crate) fn holding(hold: Box<dyn Reservation>) -> Ticket {
        Ticket { hold: Some(hold) }
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

    fn local() -> (Arc<local::Local>, Quotas) {
        let l = Arc::new(local::Local::default());
        (l.clone(), Quotas::new(l))
    }

    #[tokio::test]
    async fn requests_per_minute_refuse_without_charging() {
        let c = config("[quotas.key]\nrequests_per_minute = 2\n");
        let (_, q) = local();
        let _a = q.acquire(&c, &p("k"), ASK).await.unwrap();
        let _b = q.acquire(&c, &p("k"), ASK).await.unwrap();
        for _ in 0..3 {
            let e = q.acquire(&c, &p("k"), ASK).await.err().unwrap();
            assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
            let r = e.retry_after.unwrap();
            assert!((59..=60).contains(&r), "{r}");
        }
        assert!(q.acquire(&c, &p("other"), ASK).await.is_ok(), "per key");
    }

    #[tokio::test]
    async fn refunds_and_reconciliation_free_the_window() {
        let c = config("[quotas.tenant]\ntokens_per_minute = 25\n");
        let (_, q) = local();
        let a = q.acquire(&c, &p("a"), ASK).await.unwrap();
        let b = q.acquire(&c, &p("b"), ASK).await.unwrap();
        assert!(
            q.acquire(&c, &p("c"), ASK).await.is_err(),
            "20 + 10 > 25 for the tenant"
        );
        a.refund();
        let _c = q.acquire(&c, &p("c"), ASK).await.unwrap();
        b.reconcile(1);
        let _d = q.acquire(&c, &p("d"), ASK).await.unwrap();
        let e = q
            .acquire(
                &c,
                &p("d"),
                Ask {
                    tokens: 26,
                    stream: false,
                },
            )
            .await
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "never fits");
    }

    #[tokio::test]
    async fn concurrency_is_released_on_drop() {
        let c = config("[quotas.key]\nconcurrent_requests = 1\nconcurrent_streams = 1\n");
        let (_, q) = local();
        let a = q.acquire(&c, &p("k"), ASK).await.unwrap();
        assert_eq!(
            q.acquire(&c, &p("k"), ASK).await.err().unwrap().retry_after,
            Some(1)
        );
        drop(a);
        let b = q.acquire(&c, &p("k"), ASK).await.unwrap();
        // Reconciling ends the hold too.
        b.reconcile(3);
        assert!(q.acquire(&c, &p("k"), ASK).await.is_ok());
    }

    /// No limit for the key nor the tenant: nothing is counted, nothing is kept.
    #[tokio::test]
    async fn no_quota_costs_nothing() {
        let c = config("");
        let (l, q) = local();
        for _ in 0..100 {
            let t = q.acquire(&c, &p("k"), ASK).await.unwrap();
            assert!(t.hold.is_none());
            t.reconcile(5);
        }
        assert_eq!(l.subjects(), 0);
        // Only the subject with a limit is counted.
        let c = config("[quotas.tenant]\nrequests_per_minute = 1000\n");
        let _t = q.acquire(&c, &p("k"), ASK).await.unwrap();
        assert_eq!(l.subjects(), 1);
    }
}
