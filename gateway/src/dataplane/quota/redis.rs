//! The shared quota backend: counters in Redis (or Valkey), so a quota of N per minute admits N
//! across all replicas together.
//!
//! - **One atomic script, many decisions.** [`BATCH`] runs a list of operations in order, each
//!   atomic: a *reserve* checks every charge of one request and charges them all or none; a
//!   *settle* reconciles or refunds a reservation and releases its slots. Time is the Redis
//!   server's (`TIME`), so replicas' clocks do not matter.
//! - **Group commit.** One batcher task per replica owns the calls: it takes every operation
//!   queued at that moment (up to [`MAX_BATCH`]) and sends them in one `EVALSHA`, then hands
//!   each reserve its answer through a oneshot channel. Nothing waits for a timer: an idle
//!   replica sends a lone request at once, and under load the requests that arrive while one
//!   round trip is in flight ride the next (c=32 costs a few round trips, not 32). Settles are
//!   queued without waiting (the answer has already gone), so they cost no request any time.
//!   The connection is one multiplexed [`ConnectionManager`]; the script is loaded once
//!   (`EVALSHA`, `SCRIPT LOAD` only when the server does not know it).
//! - **Sliding minute in per-second buckets with running totals**, as in [`super::local`]:
//!   a hash per subject with fields `r:<second>` and `t:<second>` (requests and tokens charged
//!   in that second), `R` and `T` (their sums over the window) and `h` (the second the window
//!   was last moved to). Moving the window subtracts the buckets that left it, each second
//!   once, so a decision costs O(1) amortised, not a read of every bucket; the buckets are
//!   read in full only to compute a refusal's `Retry-After`. A reservation remembers its
//!   second, so reconciling corrects one bucket and the totals (or nothing, once it left).
//! - **Concurrency slots are leases**: a sorted set per subject whose members are live
//!   reservations scored by their lease's end. This replica renews its live leases every
//!   third of the lease (`[quotas] redis_lease_secs`, default 30 s), all in one call; a replica
//!   that dies stops renewing and its slots free themselves within one lease of its last
//!   renewal. A reserve whose caller went away before the answer came is refunded at once.
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
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{Ask, BoxFuture, Charge, QuotaBackend, Refusal, Reservation, SubjectKind, local};
use crate::config::OnBackendError;

/// How long one call may take before Redis counts as unreachable.
const TIMEOUT: Duration = Duration::from_millis(500);
/// `Retry-After` of a refusal because Redis is unreachable.
const RETRY_UNAVAILABLE: u64 = 2;
/// Operations sent in one script call at most (one call holds Redis for its length).
const MAX_BATCH: usize = 128;
/// Reservations renewed in one call at most.
const MAX_RENEW: usize = 512;

/// ARGV[1]: lease ms; ARGV[2]: the time in ms (0: the server's `TIME`; tests pass their own).
/// Then the operations, in order:
/// - `R`, n, tokens, stream (0/1), reservation id, then per charge: rpm, tpm, concurrent,
///   streams (-1: no limit); it takes 3n KEYS: per charge its window hash, slots set, streams
///   set. Answers 4 numbers: {1, second, 0, 0} when admitted, {0, charge index, limit, retry
///   after} when refused (limit 1 concurrent requests, 2 concurrent streams, 3 requests/min,
///   4 tokens/min).
/// - `S`, n, second charged, requests delta, tokens delta, reservation id, then one digit per
///   charge saying what it holds (1: window charges, 2: a slot, 4: a stream slot; see
///   [`holds`]); 3n KEYS as for `R`. Corrects that second's buckets and the totals (when still
///   in the window) and frees the slots. Answers nothing.
const BATCH: &str = r#"
local lease = tonumber(ARGV[1])
local now_ms = tonumber(ARGV[2])
if now_ms == 0 then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local sec = math.floor(now_ms / 1000)
local a, k = 3, 0
local out = {}

local function int(x) return string.format('%d', x) end

-- Moves window w to `sec`: subtracts from the totals, and deletes, the buckets that left it
-- (each second once). Returns the request and token totals over the window, and whether the
-- head moved (or the window is new): the charge then sets the head and the expiry, once a
-- second rather than on every charge.
local function advance(w)
  local v = redis.call('HMGET', w, 'h', 'R', 'T')
  local h = tonumber(v[1])
  if not h then return 0, 0, true end
  local rs, ts = tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if sec <= h then return rs, ts, false end
  if sec - h >= 60 then
    redis.call('DEL', w)
    return 0, 0, true
  end
  for s = h - 59, sec - 60 do
    local b = redis.call('HMGET', w, 'r:' .. s, 't:' .. s)
    if b[1] or b[2] then
      rs = rs - (tonumber(b[1]) or 0)
      ts = ts - (tonumber(b[2]) or 0)
      redis.call('HDEL', w, 'r:' .. s, 't:' .. s)
    end
  end
  redis.call('HSET', w, 'h', sec, 'R', int(rs), 'T', int(ts))
  return rs, ts, true
end

-- Seconds until `excess` of the buckets `p` .. second has left the window (oldest first).
local function retry(w, p, excess)
  local fields = {}
  for s = sec - 59, sec do fields[#fields + 1] = p .. s end
  local v = redis.call('HMGET', w, unpack(fields))
  local freed = 0
  for j = 1, #v do
    freed = freed + (tonumber(v[j]) or 0)
    if freed >= excess then return math.max(1, j) end
  end
  return 60
end

-- Whether the lease set holds `max` live leases. Leases that ran out (a replica died, a settle
-- was lost) are purged only when the set looks full: live ones leave by their settle.
local function full(set, max)
  if redis.call('ZCARD', set) < max then return false end
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now_ms)
  return redis.call('ZCARD', set) >= max
end

local function reserve()
  local n, tokens, stream, id = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2] == '1', ARGV[a + 3]
  local ntok = tonumber(tokens)
  local l, base = a + 4, k
  a = l + 4 * n
  k = k + 3 * n
  local moved = {}
  for i = 0, n - 1 do
    local w, slots, streams = KEYS[base + 3*i + 1], KEYS[base + 3*i + 2], KEYS[base + 3*i + 3]
    local rpm, tpm = tonumber(ARGV[l + 4*i]), tonumber(ARGV[l + 4*i + 1])
    local conc, smax = tonumber(ARGV[l + 4*i + 2]), tonumber(ARGV[l + 4*i + 3])
    if conc >= 0 and full(slots, conc) then return {0, i, 1, 1} end
    if stream and smax >= 0 and full(streams, smax) then return {0, i, 2, 1} end
    if rpm >= 0 or tpm >= 0 then
      local rs, ts, mv = advance(w)
      moved[i] = mv
      if rpm >= 0 and rs + 1 > rpm then return {0, i, 3, retry(w, 'r:', rs + 1 - rpm)} end
      if tpm >= 0 and ts + ntok > tpm then return {0, i, 4, retry(w, 't:', ts + ntok - tpm)} end
    end
  end
  for i = 0, n - 1 do
    local w, slots, streams = KEYS[base + 3*i + 1], KEYS[base + 3*i + 2], KEYS[base + 3*i + 3]
    local rpm, tpm = tonumber(ARGV[l + 4*i]), tonumber(ARGV[l + 4*i + 1])
    local conc, smax = tonumber(ARGV[l + 4*i + 2]), tonumber(ARGV[l + 4*i + 3])
    if rpm >= 0 or tpm >= 0 then
      redis.call('HINCRBY', w, 'r:' .. sec, 1)
      redis.call('HINCRBY', w, 't:' .. sec, tokens)
      redis.call('HINCRBY', w, 'R', 1)
      redis.call('HINCRBY', w, 'T', tokens)
      if moved[i] then
        -- Every charge of this second leaves the window before the hash expires.
        redis.call('HSET', w, 'h', sec)
        redis.call('PEXPIRE', w, 61000)
      end
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
  return {1, sec, 0, 0}
end

local function settle()
  local n, s, dreq, dtok, id = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local holds = ARGV[a + 5]
  local base = k
  a = a + 6
  k = k + 3 * n
  for i = 0, n - 1 do
    local w = KEYS[base + 3*i + 1]
    local f = string.byte(holds, i + 1) - 48
    if f % 2 == 1 and (dreq ~= '0' or dtok ~= '0')
      and redis.call('HEXISTS', w, 'r:' .. s) == 1 then
      if dreq ~= '0' then
        redis.call('HINCRBY', w, 'r:' .. s, dreq)
        redis.call('HINCRBY', w, 'R', dreq)
      end
      if dtok ~= '0' then
        redis.call('HINCRBY', w, 't:' .. s, dtok)
        redis.call('HINCRBY', w, 'T', dtok)
      end
    end
    if math.floor(f / 2) % 2 == 1 then redis.call('ZREM', KEYS[base + 3*i + 2], id) end
    if math.floor(f / 4) % 2 == 1 then redis.call('ZREM', KEYS[base + 3*i + 3], id) end
  end
end

while a <= #ARGV do
  local op = ARGV[a]
  a = a + 1
  if op == 'R' then
    local r = reserve()
    for j = 1, 4 do out[#out + 1] = r[j] end
  elseif op == 'S' then
    settle()
  else
    return redis.error_reply('unknown quota operation ' .. tostring(op))
  end
end
return out
"#;

/// KEYS: the slot and stream sets of the reservations, in order. ARGV: lease ms, the time in
/// ms (0: `TIME`), then per reservation: its id and how many of KEYS are its. Extends the
/// leases (only where the reservation still holds a slot).
const RENEW: &str = r#"
local now_ms = tonumber(ARGV[2])
if now_ms == 0 then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local lease = tonumber(ARGV[1])
local until_ms = now_ms + lease
local k = 0
for j = 3, #ARGV, 2 do
  local id, m = ARGV[j], tonumber(ARGV[j + 1])
  for i = 1, m do
    redis.call('ZADD', KEYS[k + i], 'XX', until_ms, id)
    -- The set outlives its longest lease: a slot held past two leases is not dropped with it.
    redis.call('PEXPIRE', KEYS[k + i], lease * 2)
  end
  k = k + m
end
return 1
"#;

/// Why a reserve got no answer from Redis.
#[derive(Debug)]
enum Failure {
    /// The call failed (connection, timeout, server error); the batcher logged it.
    Unreachable,
    /// Redis answered something the script never returns.
    Unexpected,
}

/// One operation for the batcher.
enum Op {
    Reserve {
        id: Arc<str>,
        /// Per charge: window hash, slots set, streams set.
        keys: Arc<[String]>,
        tokens: u64,
        stream: bool,
        /// Per charge: rpm, tpm, concurrent, streams (-1: no limit).
        limits: Vec<i64>,
        reply: oneshot::Sender<Result<[i64; 4], Failure>>,
    },
    Settle {
        id: Arc<str>,
        keys: Arc<[String]>,
        second: i64,
        dreq: i64,
        dtok: i64,
        /// See [`holds`].
        holds: String,
    },
}

/// What each charge of a reservation holds, one digit per charge: 1 window charges, 2 a
/// concurrency slot, 4 a stream slot; so a settle touches only those.
fn holds(limits: &[i64], stream: bool) -> String {
    limits
        .chunks(4)
        .map(|l| {
            let d = u8::from(l[0] >= 0 || l[1] >= 0)
                + 2 * u8::from(l[2] >= 0)
                + 4 * u8::from(stream && l[3] >= 0);
            char::from(b'0' + d)
        })
        .collect()
}

/// Whether Redis is reachable, to log the outage and the recovery once each.
struct Link {
    down: AtomicBool,
    on_error: OnBackendError,
}

impl Link {
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

    fn came_back(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            warn!("quota backend Redis reachable again: counting across replicas");
        }
    }
}

/// Live reservations' keys, by id.
type LiveMap = HashMap<Arc<str>, Arc<[String]>>;
/// The live reservations, for the lease renewer.
type Live = Arc<Mutex<LiveMap>>;

fn lock_live(live: &Mutex<LiveMap>) -> std::sync::MutexGuard<'_, LiveMap> {
    live.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct RedisQuotas {
    ops: mpsc::UnboundedSender<Op>,
    live: Live,
    next_id: AtomicU64,
    /// Unique per process: reservation ids of two replicas never collide.
    instance: String,
    on_error: OnBackendError,
    fallback: local::Local,
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
    /// starts the batcher and the lease renewer on the current runtime.
    pub fn new(
        url: &str,
        password: Option<&str>,
        on_error: OnBackendError,
        lease: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        Self::with_clock(url, password, on_error, lease, None)
    }

    /// As [`RedisQuotas::new`], with the scripts' time read from `clock` (ms) instead of
    /// Redis's `TIME`: the tests move time by hand.
    fn with_clock(
        url: &str,
        password: Option<&str>,
        on_error: OnBackendError,
        lease: Duration,
        clock: Option<Arc<AtomicU64>>,
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
        let link = Arc::new(Link {
            down: AtomicBool::new(false),
            on_error,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let live = Live::default();
        tokio::spawn(batcher(
            rx,
            conn.clone(),
            lease.as_millis() as u64,
            link.clone(),
            clock.clone(),
        ));
        tokio::spawn(renewer(Arc::downgrade(&live), conn, lease, clock));
        Ok(Arc::new(Self {
            ops: tx,
            live,
            next_id: AtomicU64::new(0),
            instance: rnd.iter().map(|b| format!("{b:02x}")).collect(),
            on_error,
            fallback: local::Local::default(),
        }))
    }
}

/// Sends the queued operations, as many as are waiting (at most [`MAX_BATCH`]), in one script
/// call, one call at a time; ends when every sender is gone.
async fn batcher(
    mut rx: mpsc::UnboundedReceiver<Op>,
    mut conn: ConnectionManager,
    lease_ms: u64,
    link: Arc<Link>,
    clock: Option<Arc<AtomicU64>>,
) {
    let script = Script::new(BATCH);
    let mut ops: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    // Refunds of reserves whose caller left before the answer: sent with the next call.
    let mut carry: Vec<Op> = Vec::new();
    loop {
        if ops.is_empty() {
            if rx.recv_many(&mut ops, MAX_BATCH).await == 0 {
                return;
            }
        } else {
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
        }
        let mut inv = script.prepare_invoke();
        inv.arg(lease_ms)
            .arg(clock.as_ref().map_or(0, |c| c.load(Ordering::Relaxed)));
        let mut reserves = 0;
        for op in &ops {
            match op {
                Op::Reserve {
                    id,
                    keys,
                    tokens,
                    stream,
                    limits,
                    ..
                } => {
                    reserves += 1;
                    for k in keys.iter() {
                        inv.key(k);
                    }
                    inv.arg("R")
                        .arg(keys.len() / 3)
                        .arg(*tokens)
                        .arg(u8::from(*stream))
                        .arg(&**id);
                    for l in limits {
                        inv.arg(*l);
                    }
                }
                Op::Settle {
                    id,
                    keys,
                    second,
                    dreq,
                    dtok,
                    holds,
                } => {
                    for k in keys.iter() {
                        inv.key(k);
                    }
                    inv.arg("S")
                        .arg(keys.len() / 3)
                        .arg(*second)
                        .arg(*dreq)
                        .arg(*dtok)
                        .arg(&**id)
                        .arg(holds.as_str());
                }
            }
        }
        let answer: Result<Vec<i64>, redis::RedisError> = inv.invoke_async(&mut conn).await;
        let mut answers = match &answer {
            Ok(a) => {
                link.came_back();
                if a.len() != 4 * reserves {
                    error!(
                        got = a.len(),
                        reserves, "unexpected answer from the quota script"
                    );
                }
                Some(a.chunks_exact(4))
            }
            Err(e) => {
                link.went_down(e);
                None
            }
        };
        let mut lost_settles = 0;
        for op in ops.drain(..) {
            match op {
                Op::Reserve {
                    id,
                    keys,
                    tokens,
                    stream,
                    limits,
                    reply,
                } => {
                    let r = match &mut answers {
                        None => Err(Failure::Unreachable),
                        Some(a) => a
                            .next()
                            .map(|c| [c[0], c[1], c[2], c[3]])
                            .ok_or(Failure::Unexpected),
                    };
                    let admitted = match &r {
                        Ok([1, sec, ..]) => Some(*sec),
                        _ => None,
                    };
                    if reply.send(r).is_err()
                        && let Some(second) = admitted
                    {
                        // Nobody holds this reservation: take it back now rather than leave
                        // its request charged and its slots taken until the lease ends.
                        carry.push(Op::Settle {
                            id,
                            keys,
                            second,
                            dreq: -1,
                            dtok: -(tokens.min(i64::MAX as u64) as i64),
                            holds: holds(&limits, stream),
                        });
                    }
                }
                Op::Settle { .. } => lost_settles += u32::from(answers.is_none()),
            }
        }
        if lost_settles > 0 {
            warn!(
                settles = lost_settles,
                "cannot settle quota reservations in Redis (their leases expire; their charges \
                 stand until they leave the minute)"
            );
        }
        std::mem::swap(&mut ops, &mut carry);
    }
}

/// Every third of the lease, extends the leases of this replica's live reservations (in calls
/// of [`MAX_RENEW`]); ends with the backend.
async fn renewer(
    live: std::sync::Weak<Mutex<LiveMap>>,
    mut conn: ConnectionManager,
    lease: Duration,
    clock: Option<Arc<AtomicU64>>,
) {
    let script = Script::new(RENEW);
    let mut tick = tokio::time::interval(lease / 3);
    loop {
        tick.tick().await;
        let Some(live) = live.upgrade() else { return };
        let all: Vec<(Arc<str>, Arc<[String]>)> = lock_live(&live)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        drop(live);
        for chunk in all.chunks(MAX_RENEW) {
            let mut inv = script.prepare_invoke();
            inv.arg(lease.as_millis() as u64)
                .arg(clock.as_ref().map_or(0, |c| c.load(Ordering::Relaxed)));
            for (id, keys) in chunk {
                // Only the slot sets have leases: the second and third key of each charge.
                let mut m = 0;
                for k in keys.chunks(3).flat_map(|c| &c[1..]) {
                    inv.key(k);
                    m += 1;
                }
                inv.arg(&**id).arg(m);
            }
            if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
                warn!(error = %e, "cannot renew quota leases in Redis");
                break;
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
            let id: Arc<str> = format!(
                "{}:{}",
                self.instance,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            )
            .into();
            let keys: Arc<[String]> = charges
                .iter()
                .flat_map(|c| {
                    let p = subject_prefix(c);
                    [
                        format!("{p}:win"),
                        format!("{p}:slots"),
                        format!("{p}:streams"),
                    ]
                })
                .collect();
            let limits: Vec<i64> = charges
                .iter()
                .flat_map(|c| {
                    [
                        limit(c.quota.requests_per_minute),
                        limit(c.quota.tokens_per_minute),
                        limit(c.quota.concurrent_requests),
                        limit(c.quota.concurrent_streams),
                    ]
                })
                .collect();
            let held = holds(&limits, ask.stream);
            let (reply, answer) = oneshot::channel();
            let sent = self.ops.send(Op::Reserve {
                id: id.clone(),
                keys: keys.clone(),
                tokens: ask.tokens,
                stream: ask.stream,
                limits,
                reply,
            });
            let answer = match sent {
                // A batcher gone (its runtime is shutting down) is as good as unreachable.
                Ok(()) => answer.await.unwrap_or(Err(Failure::Unreachable)),
                Err(_) => Err(Failure::Unreachable),
            };
            match answer {
                Ok([1, sec, ..]) => {
                    lock_live(&self.live).insert(id.clone(), keys.clone());
                    Ok(Box::new(Held {
                        id,
                        keys,
                        second: sec,
                        tokens: ask.tokens,
                        holds: held,
                        ops: self.ops.clone(),
                        live: self.live.clone(),
                        settled: false,
                    }) as Box<dyn Reservation>)
                }
                Ok([0, i, what, retry]) => Err(Refusal {
                    who: charges.get(i as usize).map_or("key", |c| c.who),
                    what: match what {
                        1 => "concurrent requests",
                        2 => "concurrent streams",
                        3 => "requests per minute",
                        _ => "tokens per minute",
                    },
                    retry_after: retry.max(1) as u64,
                    unavailable: false,
                }),
                Err(Failure::Unreachable) => match self.on_error {
                    OnBackendError::Deny => Err(Refusal {
                        who: "gateway",
                        what: "the shared quota counters (unreachable)",
                        retry_after: RETRY_UNAVAILABLE,
                        unavailable: true,
                    }),
                    OnBackendError::Local => self.fallback.reserve(charges, ask).await,
                },
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

/// A reservation in Redis. Settling (or dropping) queues a settle for the batcher and returns:
/// the answer has already been sent, and a lost settle only over-counts until the window
/// moves (the slots' leases run out on their own).
struct Held {
    id: Arc<str>,
    keys: Arc<[String]>,
    second: i64,
    tokens: u64,
    holds: String,
    ops: mpsc::UnboundedSender<Op>,
    live: Live,
    settled: bool,
}

impl Held {
    fn settle(&mut self, dreq: i64, dtok: i64) {
        if self.settled {
            return;
        }
        self.settled = true;
        lock_live(&self.live).remove(&self.id);
        let _ = self.ops.send(Op::Settle {
            id: self.id.clone(),
            keys: self.keys.clone(),
            second: self.second,
            dreq,
            dtok,
            holds: std::mem::take(&mut self.holds),
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

#[cfg(test)]
mod tests {
    //! Against a real `redis-server` of the test's own (installed by `cargo xtask setup`), with
    //! the scripts' clock moved by hand.

    use std::process::{Child, Command, Stdio};

    use super::*;
    use crate::config::Quota;
    use crate::dataplane::quota::Subject;

    struct Server {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn server() -> Server {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("redis-server is not installed: run `cargo xtask setup`");
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Server {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    struct Fixture {
        server: Server,
        clock: Arc<AtomicU64>,
        q: Arc<RedisQuotas>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let server = server();
            let clock = Arc::new(AtomicU64::new(1_000_000_500));
            let q = RedisQuotas::with_clock(
                &format!("redis://127.0.0.1:{}/", server.port),
                None,
                OnBackendError::Deny,
                Duration::from_secs(30),
                Some(clock.clone()),
            )
            .unwrap();
            Fixture { server, clock, q }
        }

        fn at_ms(&self, ms: u64) {
            self.clock.store(ms, Ordering::Relaxed);
        }

        async fn conn(&self) -> redis::aio::MultiplexedConnection {
            redis::Client::open(format!("redis://127.0.0.1:{}/", self.server.port))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }

        async fn reserve(&self, quota: Quota, ask: Ask) -> Result<Box<dyn Reservation>, Refusal> {
            let charges = [Charge {
                subject: Subject {
                    kind: SubjectKind::Key,
                    id: "k",
                },
                quota,
                who: "key",
            }];
            self.q.reserve(&charges, ask).await
        }

        /// The window hash: its totals must equal the sum of its buckets.
        async fn window(&self) -> (i64, i64, usize) {
            let h: HashMap<String, i64> = redis::cmd("HGETALL")
                .arg("moat:quota:key:k:win")
                .query_async(&mut self.conn().await)
                .await
                .unwrap();
            let sum = |p: &str| {
                h.iter()
                    .filter(|(f, _)| f.starts_with(p))
                    .map(|(_, v)| v)
                    .sum::<i64>()
            };
            let (r, t) = (h.get("R").copied(), h.get("T").copied());
            assert_eq!(r.unwrap_or(0), sum("r:"), "{h:?}");
            assert_eq!(t.unwrap_or(0), sum("t:"), "{h:?}");
            (r.unwrap_or(0), t.unwrap_or(0), h.len())
        }

        async fn evalsha_calls(&self) -> u64 {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut self.conn().await)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|l| l.split(',').next()?.parse().ok())
                .unwrap_or(0)
        }
    }

    const ASK: Ask = Ask {
        tokens: 10,
        stream: false,
    };

    fn rpm(n: u64) -> Quota {
        Quota {
            requests_per_minute: Some(n),
            ..Quota::default()
        }
    }

    /// A charge made in second s counts until second s + 60 starts, and `Retry-After` says
    /// when the oldest charge that must go leaves.
    #[tokio::test]
    async fn the_minute_slides_by_the_second() {
        let f = Fixture::new();
        let base = 1_000_000_000;
        f.at_ms(base + 500);
        for _ in 0..2 {
            drop(f.reserve(rpm(3), ASK).await.unwrap());
        }
        f.at_ms(base + 20_000);
        drop(f.reserve(rpm(3), ASK).await.unwrap());
        let r = f.reserve(rpm(3), ASK).await.err().unwrap();
        assert_eq!(
            (r.what, r.retry_after, r.unavailable),
            ("requests per minute", 40, false)
        );
        f.at_ms(base + 59_999);
        assert_eq!(f.reserve(rpm(3), ASK).await.err().unwrap().retry_after, 1);
        assert_eq!(f.window().await.0, 3);
        // The two charges of second 0 leave; the one of second 20 stays.
        f.at_ms(base + 60_000);
        let _a = f.reserve(rpm(3), ASK).await.unwrap();
        let _b = f.reserve(rpm(3), ASK).await.unwrap();
        assert_eq!(f.reserve(rpm(3), ASK).await.err().unwrap().retry_after, 20);
        assert_eq!(f.window().await.0, 3);
        // Long idle: everything left the window.
        f.at_ms(base + 500_000);
        for _ in 0..3 {
            drop(f.reserve(rpm(3), ASK).await.unwrap());
        }
        assert!(f.reserve(rpm(3), ASK).await.is_err());
    }

    /// Buckets that left the window are deleted as the window moves: the hash never holds
    /// more than a minute of them, whatever the traffic.
    #[tokio::test]
    async fn the_window_keeps_one_minute_of_buckets() {
        let f = Fixture::new();
        let q = Quota {
            requests_per_minute: Some(1_000_000),
            tokens_per_minute: Some(1_000_000),
            ..Quota::default()
        };
        for s in 0..150u64 {
            f.at_ms(2_000_000_000 + s * 1000);
            f.reserve(q, ASK).await.unwrap().reconcile(3);
        }
        f.reserve(q, ASK).await.unwrap().refund();
        // Settles are queued: one more reserve after them sees their effect.
        let _last = f.reserve(q, ASK).await.unwrap();
        let (r, t, fields) = f.window().await;
        assert_eq!((r, t), (61, 60 * 3 + 10));
        assert!(fields <= 2 * 60 + 3, "{fields} fields");
    }

    #[tokio::test]
    async fn refunds_and_reconciliation_correct_the_window() {
        let f = Fixture::new();
        f.at_ms(3_000_000_000);
        let q = Quota {
            tokens_per_minute: Some(25),
            ..Quota::default()
        };
        let a = f.reserve(q, ASK).await.unwrap();
        let b = f.reserve(q, ASK).await.unwrap();
        let r = f.reserve(q, ASK).await.err().unwrap();
        assert_eq!((r.what, r.retry_after), ("tokens per minute", 60));
        a.refund();
        let _c = f.reserve(q, ASK).await.unwrap();
        b.reconcile(1);
        let _d = f.reserve(q, ASK).await.unwrap();
        assert_eq!(f.window().await.1, 10 + 1 + 10);
        // A reservation reconciled after its second left the window changes nothing.
        let wide = Quota {
            tokens_per_minute: Some(100),
            ..Quota::default()
        };
        let e = f.reserve(wide, ASK).await.unwrap();
        f.at_ms(3_000_000_000 + 30_000);
        let _x = f.reserve(wide, ASK).await.unwrap();
        f.at_ms(3_000_000_000 + 61_000);
        e.reconcile(0);
        let _g = f.reserve(wide, ASK).await.unwrap();
        assert_eq!(f.window().await.1, 10 + 10);
    }

    #[tokio::test]
    async fn concurrency_slots_are_held_until_settled() {
        let f = Fixture::new();
        f.at_ms(4_000_000_000);
        let q = Quota {
            concurrent_requests: Some(1),
            concurrent_streams: Some(1),
            ..Quota::default()
        };
        let a = f.reserve(q, ASK).await.unwrap();
        let r = f.reserve(q, ASK).await.err().unwrap();
        assert_eq!((r.what, r.retry_after), ("concurrent requests", 1));
        drop(a);
        let b = f.reserve(q, ASK).await.unwrap();
        b.reconcile(3);
        let _s = f
            .reserve(
                q,
                Ask {
                    tokens: 1,
                    stream: true,
                },
            )
            .await
            .unwrap();
        // A lease that ran out frees its slot without a settle (a replica that died).
        f.at_ms(4_000_000_000 + 30_001);
        let _c = f.reserve(q, ASK).await.unwrap();
    }

    /// Many requests at once: exactly the limit is admitted, and the batcher sends them in
    /// far fewer script calls than requests.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reserves_are_batched_and_exact() {
        let f = Arc::new(Fixture::new());
        f.at_ms(5_000_000_000);
        let before = f.evalsha_calls().await;
        let mut tasks = Vec::new();
        for _ in 0..300 {
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                f.reserve(rpm(100), ASK)
                    .await
                    .map(|h| h.reconcile(1))
                    .is_ok()
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += u32::from(t.await.unwrap());
        }
        assert_eq!(admitted, 100);
        let calls = f.evalsha_calls().await - before;
        assert!(
            calls < 100,
            "{calls} script calls for 300 reserves and 100 settles"
        );
        assert_eq!(f.window().await.0, 100);
    }

    /// A slot held for longer than two leases (a long stream) stays taken: renewing a lease
    /// also keeps its set alive.
    #[tokio::test]
    async fn a_slot_held_past_two_leases_stays_taken() {
        let server = server();
        let q = RedisQuotas::with_clock(
            &format!("redis://127.0.0.1:{}/", server.port),
            None,
            OnBackendError::Deny,
            Duration::from_millis(900),
            Some(Arc::new(AtomicU64::new(7_000_000_000))),
        )
        .unwrap();
        let charges = |n| {
            [Charge {
                subject: Subject {
                    kind: SubjectKind::Key,
                    id: "k",
                },
                quota: Quota {
                    concurrent_requests: Some(n),
                    ..Quota::default()
                },
                who: "key",
            }]
        };
        let _a = q.reserve(&charges(1), ASK).await.unwrap();
        // The set was made with a 1.8 s expiry; the renewer runs every 0.3 s.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = q.reserve(&charges(1), ASK).await.err().unwrap();
        assert_eq!(r.what, "concurrent requests");
    }

    /// Redis gone: `deny` refuses with 503 (unavailable), and nothing is let through.
    #[tokio::test]
    async fn unreachable_redis_is_denied() {
        let mut f = Fixture::new();
        f.at_ms(6_000_000_000);
        drop(f.reserve(rpm(10), ASK).await.unwrap());
        let _ = f.server.child.kill();
        let _ = f.server.child.wait();
        let r = f.reserve(rpm(10), ASK).await.err().unwrap();
        assert!(r.unavailable);
        assert_eq!(r.retry_after, RETRY_UNAVAILABLE);
    }
}
