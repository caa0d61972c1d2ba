//! The shared quota backend: counters in Redis (or Valkey), so a quota of N per minute admits N
//! across all replicas together.
//!
//! - **One atomic script per decision.** [`RESERVE`] checks every charge of a request and
//!   charges them all or none, in one `EVALSHA`; [`SETTLE`] reconciles or refunds a
//!   reservation and releases its slots in another. Time is the Redis server's (`TIME`), so
//!   replicas' clocks do not matter.
//! - **Sliding minute in per-second buckets**, as in [`super::local`]: a hash per subject with
//!   fields `r:<second>` (requests) and `t:<second>` (tokens); fields older than the window are
//!   dropped when read. A reservation remembers its second, so reconciling corrects one bucket
//!   (or nothing, once it left the window).
//! - **Concurrency slots are leases**: a sorted set per subject whose members are live
//!   reservations scored by their lease's end. This replica renews its live leases every
//!   third of the lease (`[quotas] redis_lease_secs`, default 30 s); a replica that dies stops
//!   renewing and its slots free themselves within one lease of its last renewal.
//! - **Failure posture** ([`OnBackendError`]): Redis unreachable → `deny` (503 with
//!   `Retry-After`) or `local` (this replica's own counters, logged loudly). Never uncounted.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{Script, aio::ConnectionManager};
use tracing::{error, warn};

use super::{Ask, BoxFuture, Charge, QuotaBackend, Refusal, Reservation, SubjectKind, local};
use crate::config::OnBackendError;

/// How long one call may take before Redis counts as unreachable.
const TIMEOUT: Duration = Duration::from_millis(500);
/// `Retry-After` of a refusal because Redis is unreachable.
const RETRY_UNAVAILABLE: u64 = 2;

/// KEYS: per charge, its window hash, slots set, streams set. ARGV: n, tokens, stream (0/1),
/// reservation id, lease ms, then per charge: rpm, tpm, concurrent, streams (-1: no limit).
/// Returns {1, second} when admitted, {0, charge index, limit, retry after} when refused
/// (limit 1 concurrent requests, 2 concurrent streams, 3 requests/min, 4 tokens/min).
const RESERVE: &str = r#"
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local stream = ARGV[3] == '1'
local id = ARGV[4]
local lease = tonumber(ARGV[5])
local function retry(list, excess)
  table.sort(list, function(a, b) return a[1] < b[1] end)
  local freed = 0
  for _, e in ipairs(list) do
    freed = freed + e[2]
    if freed >= excess then return math.max(1, e[1] + 60 - sec) end
  end
  return 60
end
for i = 0, n - 1 do
  local w, slots, streams = KEYS[3*i+1], KEYS[3*i+2], KEYS[3*i+3]
  local rpm, tpm = tonumber(ARGV[6+4*i]), tonumber(ARGV[7+4*i])
  local conc, smax = tonumber(ARGV[8+4*i]), tonumber(ARGV[9+4*i])
  if conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
    if redis.call('ZCARD', slots) >= conc then return {0, i, 1, 1} end
  end
  if stream and smax >= 0 then
    redis.call('ZREMRANGEBYSCORE', streams, '-inf', now_ms)
    if redis.call('ZCARD', streams) >= smax then return {0, i, 2, 1} end
  end
  if rpm >= 0 or tpm >= 0 then
    local h = redis.call('HGETALL', w)
    local reqs, toks, rsum, tsum = {}, {}, 0, 0
    for j = 1, #h, 2 do
      local f, v = h[j], tonumber(h[j+1])
      local s = tonumber(string.sub(f, 3))
      if s <= sec - 60 then
        redis.call('HDEL', w, f)
      elseif string.sub(f, 1, 1) == 'r' then
        rsum = rsum + v
        reqs[#reqs+1] = {s, v}
      else
        tsum = tsum + v
        toks[#toks+1] = {s, v}
      end
    end
    if rpm >= 0 and rsum + 1 > rpm then return {0, i, 3, retry(reqs, rsum + 1 - rpm)} end
    if tpm >= 0 and tsum + tokens > tpm then return {0, i, 4, retry(toks, tsum + tokens - tpm)} end
  end
end
for i = 0, n - 1 do
  local w, slots, streams = KEYS[3*i+1], KEYS[3*i+2], KEYS[3*i+3]
  local rpm, tpm = tonumber(ARGV[6+4*i]), tonumber(ARGV[7+4*i])
  local conc, smax = tonumber(ARGV[8+4*i]), tonumber(ARGV[9+4*i])
  if rpm >= 0 or tpm >= 0 then
    redis.call('HINCRBY', w, 'r:' .. sec, 1)
    redis.call('HINCRBY', w, 't:' .. sec, tokens)
    redis.call('PEXPIRE', w, 61000)
  end
  if conc >= 0 then
    redis.call('ZADD', slots, now_ms + lease, id)
    redis.call('PEXPIRE', slots, lease * 2)
  end
  if stream and smax >= 0 then
    redis.call('ZADD', streams, now_ms + lease, id)
    redis.call('PEXPIRE', streams, lease * 2)
  end
end
return {1, sec}
"#;

/// KEYS as for [`RESERVE`]. ARGV: n, second charged, requests delta, tokens delta, id.
/// Corrects the buckets of that second (when still in the window) and frees the slots.
const SETTLE: &str = r#"
local n = tonumber(ARGV[1])
local sec, dreq, dtok, id = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
for i = 0, n - 1 do
  local w = KEYS[3*i+1]
  if redis.call('HEXISTS', w, 'r:' .. sec) == 1 then
    if dreq ~= 0 then redis.call('HINCRBY', w, 'r:' .. sec, dreq) end
    if dtok ~= 0 then redis.call('HINCRBY', w, 't:' .. sec, dtok) end
  end
  redis.call('ZREM', KEYS[3*i+2], id)
  redis.call('ZREM', KEYS[3*i+3], id)
end
return 1
"#;

/// KEYS: slot and stream sets of one reservation. ARGV: id, lease ms. Extends its leases
/// (only where it still holds a slot).
const RENEW: &str = r#"
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
for _, k in ipairs(KEYS) do redis.call('ZADD', k, 'XX', until_ms, ARGV[1]) end
return 1
"#;

struct Scripts {
    reserve: Script,
    settle: Script,
    renew: Script,
}

pub struct RedisQuotas {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    /// Live reservations' slot keys, for the lease renewer.
    live: Arc<Mutex<HashMap<String, Vec<String>>>>,
    next_id: AtomicU64,
    /// Unique per process: reservation ids of two replicas never collide.
    instance: String,
    on_error: OnBackendError,
    fallback: local::Local,
    /// How long a slot lives without renewal.
    lease: Duration,
    /// Whether the last call failed (to log the outage and the recovery once each).
    down: Arc<AtomicBool>,
}

fn subject_prefix(c: &Charge<'_>) -> String {
    let kind = match c.subject.kind {
        SubjectKind::Tenant => "tenant",
        SubjectKind::Key => "key",
        SubjectKind::User => "user",
    };
    format!("moat:quota:{kind}:{}", c.subject.id)
}

fn limit(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| v.min(i64::MAX as u64) as i64)
}

impl RedisQuotas {
    /// Connects lazily (a replica starts, and follows its posture, while Redis is down) and
    /// starts the lease renewer on the current runtime.
    pub fn new(
        url: &str,
        password: Option<&str>,
        on_error: OnBackendError,
        lease: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
        if let Some(p) = password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd)?;
        let me = Arc::new(Self {
            conn,
            scripts: Arc::new(Scripts {
                reserve: Script::new(RESERVE),
                settle: Script::new(SETTLE),
                renew: Script::new(RENEW),
            }),
            live: Arc::default(),
            next_id: AtomicU64::new(0),
            instance: rnd.iter().map(|b| format!("{b:02x}")).collect(),
            on_error,
            fallback: local::Local::default(),
            lease,
            down: Arc::default(),
        });
        me.spawn_renewer();
        Ok(me)
    }

    fn spawn_renewer(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let me_lease = self.lease;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me_lease / 3);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let live: Vec<(String, Vec<String>)> = me
                    .live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut conn = me.conn.clone();
                for (id, keys) in live {
                    let mut inv = me.scripts.renew.prepare_invoke();
                    for k in &keys {
                        inv.key(k);
                    }
                    inv.arg(&id).arg(me.lease.as_millis() as u64);
                    if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
                        warn!(error = %e, "cannot renew quota leases in Redis");
                        break;
                    }
                }
            }
        });
    }

    fn went_down(&self, e: &redis::RedisError) {
        if !self.down.swap(true, Ordering::AcqRel) {
            match self.on_error {
                OnBackendError::Deny => error!(
                    error = %e,
                    "quota backend Redis unreachable: refusing quota-limited requests with 503 \
                     (quotas.on_backend_error = \"deny\")"
                ),
                OnBackendError::Local => error!(
                    error = %e,
                    "quota backend Redis unreachable: COUNTING ON THIS REPLICA ONLY \
                     (quotas.on_backend_error = \"local\"); limits hold per replica, not across \
                     the cluster, until Redis is back"
                ),
            }
        }
    }
}

impl QuotaBackend for RedisQuotas {
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge<'a>],
        ask: Ask,
    ) -> BoxFuture<'a, Result<Box<dyn Reservation>, Refusal>> {
        Box::pin(async move {
            let id = format!(
                "{}:{}",
                self.instance,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            );
            let mut keys = Vec::with_capacity(charges.len() * 3);
            for c in charges {
                let p = subject_prefix(c);
                keys.push(format!("{p}:window"));
                keys.push(format!("{p}:slots"));
                keys.push(format!("{p}:streams"));
            }
            let mut inv = self.scripts.reserve.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            inv.arg(charges.len())
                .arg(ask.tokens)
                .arg(u8::from(ask.stream))
                .arg(&id)
                .arg(self.lease.as_millis() as u64);
            for c in charges {
                inv.arg(limit(c.quota.requests_per_minute))
                    .arg(limit(c.quota.tokens_per_minute))
                    .arg(limit(c.quota.concurrent_requests))
                    .arg(limit(c.quota.concurrent_streams));
            }
            let mut conn = self.conn.clone();
            let answer: Vec<i64> = match inv.invoke_async(&mut conn).await {
                Ok(a) => {
                    if self.down.swap(false, Ordering::AcqRel) {
                        warn!("quota backend Redis reachable again: counting across replicas");
                    }
                    a
                }
                Err(e) => {
                    self.went_down(&e);
                    return match self.on_error {
                        OnBackendError::Deny => Err(Refusal {
                            who: "gateway",
                            what: "the shared quota counters (unreachable)",
                            retry_after: RETRY_UNAVAILABLE,
                            unavailable: true,
                        }),
                        OnBackendError::Local => self.fallback.reserve(charges, ask).await,
                    };
                }
            };
            match answer.as_slice() {
                [1, sec] => {
                    // Only the slot sets need renewing.
                    let slot_keys: Vec<String> = keys
                        .chunks(3)
                        .flat_map(|k| [k[1].clone(), k[2].clone()])
                        .collect();
                    self.live
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), slot_keys);
                    Ok(Box::new(Held {
                        id,
                        keys,
                        second: *sec,
                        tokens: ask.tokens,
                        conn: self.conn.clone(),
                        scripts: self.scripts.clone(),
                        live: self.live.clone(),
                        settled: false,
                    }) as Box<dyn Reservation>)
                }
                [0, i, what, retry] => Err(Refusal {
                    who: charges.get(*i as usize).map_or("key", |c| c.who),
                    what: match what {
                        1 => "concurrent requests",
                        2 => "concurrent streams",
                        3 => "requests per minute",
                        _ => "tokens per minute",
                    },
                    retry_after: (*retry).max(1) as u64,
                    unavailable: false,
                }),
                other => {
                    error!(?other, "unexpected answer from the quota script");
                    Err(Refusal {
                        who: "gateway",
                        what: "the shared quota counters (unexpected answer)",
                        retry_after: RETRY_UNAVAILABLE,
                        unavailable: true,
                    })
                }
            }
        })
    }
}

/// A reservation in Redis. Settling (or dropping) runs [`SETTLE`] in the background: the
/// answer has already been sent, and a lost settle only over-counts until the window moves
/// (the slots' leases run out on their own).
struct Held {
    id: String,
    keys: Vec<String>,
    second: i64,
    tokens: u64,
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    live: Arc<Mutex<HashMap<String, Vec<String>>>>,
    settled: bool,
}

impl Held {
    fn settle(&mut self, dreq: i64, dtok: i64) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let (mut conn, scripts, keys, id, sec) = (
            self.conn.clone(),
            self.scripts.clone(),
            std::mem::take(&mut self.keys),
            self.id.clone(),
            self.second,
        );
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut inv = scripts.settle.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            inv.arg(keys.len() / 3)
                .arg(sec)
                .arg(dreq)
                .arg(dtok)
                .arg(&id);
            if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
                warn!(error = %e, "cannot settle a quota reservation in Redis (its leases expire)");
            }
        });
    }
}

impl Reservation for Held {
    fn reconcile(mut self: Box<Self>, used: u64) {
        let d = used as i64 - self.tokens as i64;
        self.settle(0, d);
    }

    fn refund(mut self: Box<Self>) {
        let d = -(self.tokens as i64);
        self.settle(-1, d);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.settle(0, 0);
    }
}
