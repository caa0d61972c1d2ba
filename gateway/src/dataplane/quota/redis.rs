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
//! - **Local admission from leased shares** ([`Shares`]), far from the limit: a replica leases
//!   a share of a subject's budget (requests and tokens of the minute, charged in Redis at
//!   once, and a block of slots: one lease member `<share id>*<k>` whose k - 1 extra slots
//!   are summed in `<slots set>:n`) and admits from it in memory, with no round trip. A share
//!   lasts [`SHARE_PERIOD`]; its unused part goes back when it ends, runs dry, the limits
//!   change or the replica shuts down, in the same call that leases the next. Since shares are
//!   charged before use, the replicas together never admit more than N; near the limit the
//!   script grants none and every request is an exact reserve (see the script's `share`).
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
/// - `L`, instance, share id, then [`ShareAsk::args`]; KEYS: the subject's window hash and
///   slots set, and [`REPLICAS_KEY`]. Returns the previous share's unused part, leases the
///   next and resizes the block. Answers {requests, tokens, block slots, second charged}.
const BATCH: &str = r#"
local lease = tonumber(ARGV[1])
local now_ms = tonumber(ARGV[2])
if now_ms == 0 then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local sec = math.floor(now_ms / 1000)
local FAR = 4
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

-- Slots taken in a lease set: one per member, except a replica's block of k slots (member
-- `<share id>*<k>`), whose k - 1 extra slots are summed in `<set>:n` (same expiry as the set).
local function used(set)
  local c = redis.call('ZCARD', set)
  if c == 0 then return 0 end
  return c + (tonumber(redis.call('GET', set .. ':n')) or 0)
end

-- Drops the leases that ran out (a replica died, a settle was lost), blocks with their extra.
local function purge(set)
  local gone = redis.call('ZRANGEBYSCORE', set, '-inf', now_ms)
  if #gone == 0 then return end
  local extra = 0
  for _, m in ipairs(gone) do
    local b = tonumber(string.match(m, '%*(%d+)$'))
    if b then extra = extra + b - 1 end
  end
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now_ms)
  if extra > 0 then redis.call('DECRBY', set .. ':n', int(extra)) end
end

-- Whether the lease set holds `max` live slots. Leases that ran out are purged only when the
-- set looks full: live ones leave by their settle.
local function full(set, max)
  if used(set) < max then return false end
  purge(set)
  return used(set) >= max
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
      redis.call('PEXPIRE', slots .. ':n', lease * 2)
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

-- A replica's share of one subject: returns the unused part of its previous window share (to
-- the second that share was charged in) and leases a new one, and resizes its block of slots.
-- Shares are granted only far from the limit: at most 1 / (1 + FAR * replicas) of what is
-- left, and none when less than FAR * replicas * `least` is left (the requests then take the
-- exact path, one reserve each). Replicas: those that took a share in the last 5 s.
local function share()
  local inst, id, osec = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local rreq, rtok = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local wreq, wtok = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local least, leastt = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local oblock, keep, wblock = tonumber(ARGV[a + 9]), tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11])
  local rpm, tpm, conc = tonumber(ARGV[a + 12]), tonumber(ARGV[a + 13]), tonumber(ARGV[a + 14])
  a = a + 15
  local w, slots, reps = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 3
  redis.call('ZADD', reps, now_ms, inst)
  redis.call('ZREMRANGEBYSCORE', reps, '-inf', now_ms - 5000)
  redis.call('PEXPIRE', reps, 60000)
  local far = FAR * redis.call('ZCARD', reps)
  if osec ~= '0' and (rreq ~= 0 or rtok ~= 0) and redis.call('HEXISTS', w, 'r:' .. osec) == 1 then
    -- (Integers as strings: Redis refuses the "-0" a Lua number may print as.)
    if rreq ~= 0 then
      redis.call('HINCRBY', w, 'r:' .. osec, int(-rreq))
      redis.call('HINCRBY', w, 'R', int(-rreq))
    end
    if rtok ~= 0 then
      redis.call('HINCRBY', w, 't:' .. osec, int(-rtok))
      redis.call('HINCRBY', w, 'T', int(-rtok))
    end
  end
  local gr, gt = 0, 0
  if wreq > 0 and (rpm >= 0 or tpm >= 0) then
    local rs, ts, mv = advance(w)
    gr, gt = wreq, wtok
    if rpm >= 0 then
      local left = rpm - rs
      gr = left < far * least and 0 or math.min(gr, math.floor(left / (1 + far)))
    end
    if tpm >= 0 then
      local left = tpm - ts
      gt = left < far * leastt and 0 or math.min(gt, math.floor(left / (1 + far)))
    end
    if gr >= 1 and gt >= 1 then
      redis.call('HINCRBY', w, 'r:' .. sec, int(gr))
      redis.call('HINCRBY', w, 't:' .. sec, int(gt))
      redis.call('HINCRBY', w, 'R', int(gr))
      redis.call('HINCRBY', w, 'T', int(gt))
      if mv then
        redis.call('HSET', w, 'h', sec)
        redis.call('PEXPIRE', w, 61000)
      end
    else
      gr, gt = 0, 0
    end
  end
  local block = 0
  if conc >= 0 then
    if oblock > 0 and redis.call('ZREM', slots, id .. '*' .. int(oblock)) == 1 and oblock > 1 then
      redis.call('DECRBY', slots .. ':n', int(oblock - 1))
    end
    -- The slots of requests admitted from the block and still running are kept as they are.
    local head = wblock - keep
    if head > 0 then
      local left = conc - used(slots) - keep
      if left < far * head then
        purge(slots)
        left = conc - used(slots) - keep
      end
      head = left < far * least and 0 or math.min(head, math.floor(left / (1 + far)))
    end
    block = keep + math.max(head, 0)
    if block > 0 then
      if redis.call('ZCARD', slots) == 0 then redis.call('DEL', slots .. ':n') end
      redis.call('ZADD', slots, now_ms + lease, id .. '*' .. int(block))
      if block > 1 then redis.call('INCRBY', slots .. ':n', int(block - 1)) end
      redis.call('PEXPIRE', slots, lease * 2)
      redis.call('PEXPIRE', slots .. ':n', lease * 2)
    end
  end
  return {gr, gt, block, sec}
end

while a <= #ARGV do
  local op = ARGV[a]
  a = a + 1
  if op == 'R' then
    local r = reserve()
    for j = 1, 4 do out[#out + 1] = r[j] end
  elseif op == 'L' then
    local r = share()
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
    redis.call('PEXPIRE', KEYS[k + i] .. ':n', lease * 2)
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
    /// Returns a subject's share and leases the next ([`share`]).
    Share {
        /// Window hash, slots set, the replicas set.
        keys: [String; 3],
        instance: Arc<str>,
        id: Arc<str>,
        /// [`ShareAsk::args`].
        args: [i64; 13],
        reply: oneshot::Sender<Result<[i64; 4], Failure>>,
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
    /// This replica's leased shares, by subject (`None`: every request takes the exact path).
    shares: Option<Arc<Shares>>,
    /// The background tasks (the tests stop them to play a replica that died).
    #[cfg_attr(not(test), allow(dead_code))]
    tasks: Vec<tokio::task::AbortHandle>,
}

/// How long a leased share is used before its unused part goes back (and the next is leased,
/// sized by the use in this one).
const SHARE_PERIOD: Duration = Duration::from_millis(500);
/// How often the share keeper looks for shares that ended (it is also woken when one runs dry).
const SHARE_TICK: Duration = Duration::from_millis(50);
/// The smallest share asked for, in requests and in slots; the script grants none when less
/// than `FAR * replicas` of these is left (see [`BATCH`]).
const SHARE_LEAST: u64 = 8;
/// The Redis set of the replicas taking shares (each scored by its last lease).
const REPLICAS_KEY: &str = "moat:quota:replicas";

/// The shares of one replica: per kind of subject, by id.
struct Shares {
    cells: Mutex<[HashMap<Arc<str>, Arc<Cell>>; 3]>,
    ops: mpsc::UnboundedSender<Op>,
    instance: Arc<str>,
    wake: tokio::sync::Notify,
    next: AtomicU64,
    /// Requests admitted from a share (tests and the debug log).
    local_admits: AtomicU64,
    /// The runtime that built the backend: a lease's answer is put in place there, not on
    /// the serving thread that asked (which may stop first, at shutdown, and leave the share
    /// pending for good).
    runtime: tokio::runtime::Handle,
}

fn kind_index(k: SubjectKind) -> usize {
    match k {
        SubjectKind::Tenant => 0,
        SubjectKind::Key => 1,
        SubjectKind::User => 2,
    }
}

/// One subject's share on this replica.
struct Cell {
    kind: SubjectKind,
    subject: Arc<str>,
    /// Window hash, slots set, streams set (as a reservation's keys, for settles).
    keys: Arc<[String]>,
    /// The block's member in the slots set is `<id>*<slots>`.
    id: Arc<str>,
    st: Mutex<CellState>,
}

struct CellState {
    /// rpm, tpm, concurrent, streams (-1: none) the share was leased under; a request under
    /// other limits (a reload) takes the exact path and ends the share.
    limits: [i64; 4],
    /// A lease call is under way: nothing is admitted locally until it answers.
    pending: bool,
    /// Returned for good (idle subject, or shutting down).
    dead: bool,
    /// Wants its next lease now (ran dry, or the limits changed).
    due: bool,
    /// Which window share requests were admitted from: a settle of an older one goes to Redis.
    generation: u64,
    /// The second the window share was charged in (0: none).
    second: i64,
    req_left: i64,
    tok_left: i64,
    /// Slots leased as a block, and how many of them requests admitted here hold.
    block: u64,
    in_flight: u64,
    /// This share's use, to size the next.
    started: std::time::Instant,
    ends: std::time::Instant,
    used_req: u64,
    used_tok: u64,
    peak: u64,
    /// The tokens the last request asked for (the smallest token share worth having).
    last_tokens: u64,
}

impl CellState {
    fn window(&self) -> bool {
        self.limits[0] >= 0 || self.limits[1] >= 0
    }

    fn slots(&self) -> bool {
        self.limits[2] >= 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a share call asks, in the script's order after the instance and the share id.
struct ShareAsk {
    second: i64,
    ret_req: i64,
    ret_tok: i64,
    want_req: i64,
    want_tok: i64,
    least_tok: i64,
    block: i64,
    keep: i64,
    want_block: i64,
    limits: [i64; 3],
}

impl ShareAsk {
    fn args(&self) -> [i64; 13] {
        [
            self.second,
            self.ret_req,
            self.ret_tok,
            self.want_req,
            self.want_tok,
            SHARE_LEAST as i64,
            self.least_tok,
            self.block,
            self.keep,
            self.want_block,
            self.limits[0],
            self.limits[1],
            self.limits[2],
        ]
    }
}

fn sat(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl Shares {
    /// Admits a request from the shares of all its subjects, or returns `None` (nothing
    /// charged) when one of them has none, or not enough, or the request holds a stream slot
    /// (those stay exact). A subject without a share gets one leased for the next requests.
    fn admit(
        self: &Arc<Self>,
        charges: &[Charge<'_>],
        limits: &[i64],
        ask: Ask,
        make: impl Fn(&Charge<'_>) -> (Arc<[String]>, Arc<str>),
    ) -> Option<LocalHeld> {
        let now = std::time::Instant::now();
        let mut cells = Vec::with_capacity(charges.len());
        {
            let mut map = lock(&self.cells);
            let mut created = false;
            for (i, c) in charges.iter().enumerate() {
                let l: [i64; 4] = limits[4 * i..4 * i + 4].try_into().ok()?;
                let by_id = &mut map[kind_index(c.subject.kind)];
                match by_id.get(c.subject.id) {
                    Some(cell) => cells.push(cell.clone()),
                    None => {
                        let (keys, id) = make(c);
                        let subject: Arc<str> = c.subject.id.into();
                        let cell = Arc::new(Cell {
                            kind: c.subject.kind,
                            subject: subject.clone(),
                            keys,
                            id,
                            st: Mutex::new(CellState {
                                limits: l,
                                pending: false,
                                dead: false,
                                due: true,
                                generation: 0,
                                second: 0,
                                req_left: 0,
                                tok_left: 0,
                                block: 0,
                                in_flight: 0,
                                started: now,
                                ends: now,
                                // The request that asked counts as this share's use.
                                used_req: 1,
                                used_tok: ask.tokens,
                                peak: 1,
                                last_tokens: ask.tokens,
                            }),
                        });
                        by_id.insert(subject, cell);
                        created = true;
                    }
                }
            }
            if created {
                self.wake.notify_one();
                return None;
            }
        }
        // Charges come key first, then tenant: the locks are always taken in that order.
        let mut states: Vec<_> = cells.iter().map(|c| lock(&c.st)).collect();
        let mut fits = true;
        for (i, st) in states.iter_mut().enumerate() {
            let l = &limits[4 * i..4 * i + 4];
            if st.dead || (ask.stream && l[3] >= 0) {
                fits = false;
                continue;
            }
            st.last_tokens = ask.tokens;
            if st.limits != l {
                // A reload changed the limits: this share ends, the next is leased under them.
                st.limits.copy_from_slice(l);
                st.ends = now;
            }
            let ok = !st.pending
                && now < st.ends
                && (!st.window() || (st.req_left >= 1 && st.tok_left >= sat(ask.tokens)))
                && (!st.slots() || st.in_flight < st.block);
            if !ok {
                fits = false;
                if !st.pending {
                    // Ended or ran dry: its unused part goes back ahead of this request's exact
                    // reserve (the batcher keeps the order), so it cannot stand in its way.
                    st.used_req += 1;
                    self.lease(&cells[i], st, false, now);
                }
            }
        }
        if !fits {
            return None;
        }
        let mut parts = Vec::with_capacity(states.len());
        for (st, cell) in states.iter_mut().zip(&cells) {
            st.used_req += 1;
            if st.window() {
                st.req_left -= 1;
                st.tok_left -= sat(ask.tokens);
                st.used_tok += ask.tokens;
            }
            if st.slots() {
                st.in_flight += 1;
                st.peak = st.peak.max(st.in_flight);
            }
            parts.push(Part {
                cell: cell.clone(),
                generation: st.generation,
                second: st.second,
                window: st.window(),
                slot: st.slots(),
            });
        }
        drop(states);
        self.local_admits.fetch_add(1, Ordering::Relaxed);
        Some(LocalHeld {
            parts,
            ops: self.ops.clone(),
        })
    }

    /// Sends the next lease of every share that ended (or all of them, `closing`). Returns
    /// what to wait for to see them answered.
    fn renew(self: &Arc<Self>, closing: bool) -> Vec<oneshot::Receiver<()>> {
        let now = std::time::Instant::now();
        let cells: Vec<Arc<Cell>> = lock(&self.cells)
            .iter()
            .flat_map(|m| m.values().cloned())
            .collect();
        let mut waits = Vec::new();
        for cell in cells {
            let mut st = lock(&cell.st);
            if st.pending || st.dead || !(closing || st.due || now >= st.ends) {
                continue;
            }
            let (wait, end) = self.lease(&cell, &mut st, closing, now);
            drop(st);
            waits.push(wait);
            if end {
                let mut map = lock(&self.cells);
                let by_id = &mut map[kind_index(cell.kind)];
                if by_id
                    .get(&cell.subject)
                    .is_some_and(|c| Arc::ptr_eq(c, &cell))
                {
                    by_id.remove(&cell.subject);
                }
            }
        }
        waits
    }

    /// Ends `cell`'s share and asks for the next (in one call): the unused part goes back, the
    /// next share is sized by this one's pace. A share that admitted nothing asks for nothing
    /// but the slots still held; with none held (or `closing`) the subject's share is over
    /// (`true`: the caller takes it out of the map). Nothing is admitted from the cell until
    /// the answer is in place; requests take the exact path meanwhile.
    fn lease(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        st: &mut CellState,
        closing: bool,
        now: std::time::Instant,
    ) -> (oneshot::Receiver<()>, bool) {
        let quiet = closing || st.used_req == 0;
        let end = closing || (quiet && st.in_flight == 0);
        // Asks for 1.5 times this share's pace over a whole period.
        let took = now
            .duration_since(st.started)
            .max(Duration::from_millis(10));
        let pace = |used: u64| {
            (used as f64 * 1.5 * SHARE_PERIOD.as_secs_f64() / took.as_secs_f64()).ceil() as u64
        };
        let least_tok = SHARE_LEAST * st.last_tokens.max(1);
        let window = !quiet && st.window();
        let ask = ShareAsk {
            second: st.second,
            ret_req: if st.second != 0 { st.req_left } else { 0 },
            ret_tok: if st.second != 0 { st.tok_left } else { 0 },
            want_req: if window {
                sat(pace(st.used_req).max(SHARE_LEAST))
            } else {
                0
            },
            want_tok: if window {
                sat(pace(st.used_tok).max(least_tok))
            } else {
                0
            },
            least_tok: sat(least_tok),
            block: sat(st.block),
            keep: sat(st.in_flight),
            want_block: if quiet || !st.slots() {
                sat(st.in_flight)
            } else {
                sat((st.in_flight + SHARE_LEAST).max(st.peak + st.peak / 2))
            },
            limits: [st.limits[0], st.limits[1], st.limits[2]],
        };
        st.pending = true;
        st.generation += 1;
        st.second = 0;
        st.req_left = 0;
        st.tok_left = 0;
        st.dead = end;
        let (reply, answer) = oneshot::channel();
        let sent = self.ops.send(Op::Share {
            keys: [
                cell.keys[0].clone(),
                cell.keys[1].clone(),
                REPLICAS_KEY.to_owned(),
            ],
            instance: self.instance.clone(),
            id: cell.id.clone(),
            args: ask.args(),
            reply,
        });
        let (done, wait) = oneshot::channel();
        if sent.is_err() {
            Self::install(st, Err(Failure::Unreachable));
            let _ = done.send(());
            return (wait, end);
        }
        let cell = cell.clone();
        self.runtime.spawn(async move {
            let answer = answer.await.unwrap_or(Err(Failure::Unreachable));
            Self::install(&mut lock(&cell.st), answer);
            let _ = done.send(());
        });
        (wait, end)
    }

    /// Puts a lease's answer in place: the new share, or none when Redis did not answer (the
    /// old block may still stand there: it only over-counts until its lease ends).
    fn install(st: &mut CellState, answer: Result<[i64; 4], Failure>) {
        let now = std::time::Instant::now();
        st.pending = false;
        st.due = false;
        st.started = now;
        st.ends = now + SHARE_PERIOD;
        st.used_req = 0;
        st.used_tok = 0;
        st.peak = st.in_flight;
        match answer {
            Ok([req, tok, block, second]) => {
                if req > 0 {
                    st.second = second;
                    st.req_left = req;
                    st.tok_left = tok;
                }
                st.block = block.max(0) as u64;
            }
            Err(_) => st.block = 0,
        }
    }
}

/// A request admitted from this replica's shares. Settling it corrects the share it came
/// from (or, when that share has gone back already, the second it was charged in, through a
/// settle to Redis) and frees its slot in the block.
struct LocalHeld {
    parts: Vec<Part>,
    ops: mpsc::UnboundedSender<Op>,
}

struct Part {
    cell: Arc<Cell>,
    generation: u64,
    second: i64,
    window: bool,
    slot: bool,
}

impl Settle for LocalHeld {
    fn settle(self, dreq: i64, dtok: i64) {
        for p in &self.parts {
            let mut st = lock(&p.cell.st);
            if p.slot {
                st.in_flight = st.in_flight.saturating_sub(1);
            }
            if !p.window || dreq == 0 && dtok == 0 {
                continue;
            }
            if st.generation == p.generation {
                st.req_left -= dreq;
                st.tok_left -= dtok;
            } else {
                let _ = self.ops.send(Op::Settle {
                    id: p.cell.id.clone(),
                    keys: p.cell.keys.clone(),
                    second: p.second,
                    dreq,
                    dtok,
                    holds: "1".to_owned(),
                });
            }
        }
    }
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
        Self::with_clock(url, password, on_error, lease, None, true)
    }

    /// As [`RedisQuotas::new`], with the scripts' time read from `clock` (ms) instead of
    /// Redis's `TIME`: the tests move time by hand.
    fn with_clock(
        url: &str,
        password: Option<&str>,
        on_error: OnBackendError,
        lease: Duration,
        clock: Option<Arc<AtomicU64>>,
        shares: bool,
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
        let instance: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let mut tasks = vec![
            tokio::spawn(batcher(
                rx,
                conn.clone(),
                lease.as_millis() as u64,
                link.clone(),
                clock.clone(),
            ))
            .abort_handle(),
            tokio::spawn(renewer(Arc::downgrade(&live), conn, lease, clock)).abort_handle(),
        ];
        let shares = shares.then(|| {
            Arc::new(Shares {
                cells: Mutex::default(),
                ops: tx.clone(),
                instance: instance.as_str().into(),
                wake: tokio::sync::Notify::new(),
                next: AtomicU64::new(0),
                local_admits: AtomicU64::new(0),
                runtime: tokio::runtime::Handle::current(),
            })
        });
        if let Some(s) = &shares {
            tasks.push(tokio::spawn(share_keeper(Arc::downgrade(s))).abort_handle());
        }
        Ok(Arc::new(Self {
            ops: tx,
            live,
            next_id: AtomicU64::new(0),
            instance,
            on_error,
            fallback: local::Local::default(),
            shares,
            tasks,
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
                Op::Share {
                    keys,
                    instance,
                    id,
                    args,
                    ..
                } => {
                    reserves += 1;
                    for k in keys {
                        inv.key(k);
                    }
                    inv.arg("L").arg(&**instance).arg(&**id);
                    for v in args {
                        inv.arg(*v);
                    }
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
                Op::Share { reply, .. } => {
                    let r = match &mut answers {
                        None => Err(Failure::Unreachable),
                        Some(a) => a
                            .next()
                            .map(|c| [c[0], c[1], c[2], c[3]])
                            .ok_or(Failure::Unexpected),
                    };
                    let _ = reply.send(r);
                }
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

impl RedisQuotas {
    /// Stops this replica's background tasks without giving anything back: a replica that
    /// died, for the tests.
    #[cfg(test)]
    fn halt(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl QuotaBackend for RedisQuotas {
    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(shares) = &self.shares else { return };
            // Shares being renewed come back first, then go back with the rest.
            for _ in 0..2 {
                let waits = shares.renew(true);
                let all = async {
                    for w in waits {
                        let _ = w.await;
                    }
                };
                let _ = tokio::time::timeout(TIMEOUT * 2, all).await;
            }
        })
    }

    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge<'a>],
        ask: Ask,
    ) -> BoxFuture<'a, Result<Box<dyn Reservation>, Refusal>> {
        Box::pin(async move {
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
            if let Some(shares) = &self.shares {
                let local = shares.admit(charges, &limits, ask, |c| {
                    let p = subject_prefix(c);
                    let keys: Arc<[String]> = [
                        format!("{p}:win"),
                        format!("{p}:slots"),
                        format!("{p}:streams"),
                    ]
                    .into();
                    let n = shares.next.fetch_add(1, Ordering::Relaxed);
                    (keys, format!("{}:s{n}", self.instance).into())
                });
                if let Some(held) = local {
                    return Ok(Box::new(Settles::new(ask.tokens, held)) as Box<dyn Reservation>);
                }
            }
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
                    let held = Held {
                        id,
                        keys,
                        second: sec,
                        holds: held,
                        ops: self.ops.clone(),
                        live: self.live.clone(),
                    };
                    Ok(Box::new(Settles::new(ask.tokens, held)) as Box<dyn Reservation>)
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
    holds: String,
    ops: mpsc::UnboundedSender<Op>,
    live: Live,
}

impl Settle for Held {
    fn settle(self, dreq: i64, dtok: i64) {
        lock_live(&self.live).remove(&self.id);
        let _ = self.ops.send(Op::Settle {
            id: self.id,
            keys: self.keys,
            second: self.second,
            dreq,
            dtok,
            holds: self.holds,
        });
    }
}

/// What [`Held`] and [`LocalHeld`] share: a reservation corrected by a (requests, tokens)
/// difference. Settling consumes it, so it happens once.
trait Settle: Send + Sync {
    /// Applies the correction and releases.
    fn settle(self, dreq: i64, dtok: i64);
}

/// A [`Settle`] of `tokens` reserved, as a [`Reservation`]; dropped unsettled, it releases as
/// charged.
struct Settles<T: Settle> {
    tokens: u64,
    held: Option<T>,
}

impl<T: Settle> Settles<T> {
    fn new(tokens: u64, held: T) -> Self {
        Self {
            tokens,
            held: Some(held),
        }
    }

    fn settle(&mut self, dreq: i64, dtok: i64) {
        if let Some(held) = self.held.take() {
            held.settle(dreq, dtok);
        }
    }
}

impl<T: Settle> Reservation for Settles<T> {
    fn reconcile(mut self: Box<Self>, used: u64) {
        let d = sat(used) - sat(self.tokens);
        self.settle(0, d);
    }

    fn refund(mut self: Box<Self>) {
        let d = -sat(self.tokens);
        self.settle(-1, d);
    }
}

impl<T: Settle> Drop for Settles<T> {
    fn drop(&mut self) {
        self.settle(0, 0);
    }
}

/// Ends shares as they run out (every [`SHARE_TICK`], or at once when one runs dry); ends
/// with the backend.
async fn share_keeper(shares: std::sync::Weak<Shares>) {
    loop {
        let Some(s) = shares.upgrade() else { return };
        s.renew(false);
        let wake = async {
            tokio::select! {
                _ = s.wake.notified() => {}
                _ = tokio::time::sleep(SHARE_TICK) => {}
            }
        };
        wake.await;
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
        /// One replica that takes the exact path for every request.
        fn new() -> Fixture {
            Self::with_shares(false)
        }

        fn with_shares(shares: bool) -> Fixture {
            let server = server();
            let clock = Arc::new(AtomicU64::new(1_000_000_500));
            let q = replica_on(&server, &clock, shares);
            Fixture { server, clock, q }
        }

        /// Another replica on the same Redis and clock.
        fn replica(&self, shares: bool) -> Arc<RedisQuotas> {
            replica_on(&self.server, &self.clock, shares)
        }

        async fn count(&self, cmd: &str, key: &str) -> i64 {
            redis::cmd(cmd)
                .arg(key)
                .query_async::<Option<i64>>(&mut self.conn().await)
                .await
                .unwrap()
                .unwrap_or(0)
        }

        /// Slots taken for key `k` (members, plus the extra slots of blocks).
        async fn slots(&self) -> i64 {
            let members = self.count("ZCARD", "moat:quota:key:k:slots").await;
            if members == 0 {
                return 0;
            }
            members + self.count("GET", "moat:quota:key:k:slots:n").await
        }

        /// The members of key `k`'s slots set.
        async fn slot_members(&self) -> Vec<String> {
            redis::cmd("ZRANGE")
                .arg("moat:quota:key:k:slots")
                .arg(0)
                .arg(-1)
                .query_async(&mut self.conn().await)
                .await
                .unwrap()
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
            reserve_on(&self.q, quota, ask).await
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

    fn replica_on(server: &Server, clock: &Arc<AtomicU64>, shares: bool) -> Arc<RedisQuotas> {
        RedisQuotas::with_clock(
            &format!("redis://127.0.0.1:{}/", server.port),
            None,
            OnBackendError::Deny,
            Duration::from_secs(30),
            Some(clock.clone()),
            shares,
        )
        .unwrap()
    }

    /// A request of key `k` on replica `q`.
    async fn reserve_on(
        q: &RedisQuotas,
        quota: Quota,
        ask: Ask,
    ) -> Result<Box<dyn Reservation>, Refusal> {
        let charges = [Charge {
            subject: Subject {
                kind: SubjectKind::Key,
                id: "k",
            },
            quota,
            who: "key",
        }];
        q.reserve(&charges, ask).await
    }

    fn local_admits(q: &RedisQuotas) -> u64 {
        q.shares
            .as_ref()
            .map_or(0, |s| s.local_admits.load(Ordering::Relaxed))
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
            false,
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

    /// Two replicas taking shares under concurrent load far beyond the limit: never more
    /// than the limit is admitted, and the shares' unused parts go back (a share lasts
    /// [`SHARE_PERIOD`]): the requests that go on get exactly the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shares_never_over_admit_under_concurrency() {
        let f = Fixture::with_shares(true);
        let b = f.replica(true);
        f.at_ms(8_000_000_000);
        let q = Quota {
            requests_per_minute: Some(2000),
            concurrent_requests: Some(10_000),
            ..Quota::default()
        };
        let total = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..32 {
            let r = if i % 2 == 0 { f.q.clone() } else { b.clone() };
            let total = total.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..150 {
                    if let Ok(h) = reserve_on(&r, q, ASK).await {
                        let n = total.fetch_add(1, Ordering::Relaxed) + 1;
                        assert!(n <= 2000, "{n} admitted");
                        tokio::task::yield_now().await;
                        h.reconcile(5);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            local_admits(&f.q) > 0 && local_admits(&b) > 0,
            "both replicas admitted from shares: {} and {}",
            local_admits(&f.q),
            local_admits(&b)
        );
        // What is still out in shares comes back to whoever asks next.
        let deadline = std::time::Instant::now() + SHARE_PERIOD * 8;
        let mut n = 0;
        while total.load(Ordering::Relaxed) < 2000 && std::time::Instant::now() < deadline {
            let r = if n % 2 == 0 { &f.q } else { &b };
            n += 1;
            if reserve_on(r, q, ASK).await.is_ok() {
                total.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000);
        tokio::time::sleep(SHARE_PERIOD * 3).await;
        for r in [&f.q, &b, &f.q, &b] {
            assert!(reserve_on(r, q, ASK).await.is_err(), "over the limit");
        }
        assert_eq!(f.window().await.0, 2000);
        tokio::time::sleep(SHARE_PERIOD * 3).await;
        assert_eq!(
            f.slots().await,
            0,
            "{:?} live {:?} {:?}",
            f.slot_members().await,
            lock_live(&f.q.live).keys().collect::<Vec<_>>(),
            lock_live(&b.live).keys().collect::<Vec<_>>()
        );
    }

    /// A share is charged in Redis when leased; what it did not admit goes back when it ends,
    /// and a subject left idle keeps nothing (its block of slots goes back too).
    #[tokio::test]
    async fn unused_shares_are_returned() {
        let f = Fixture::with_shares(true);
        f.at_ms(9_000_000_000);
        let q = Quota {
            requests_per_minute: Some(100_000),
            concurrent_requests: Some(1000),
            ..Quota::default()
        };
        let mut admitted = 0;
        while local_admits(&f.q) == 0 {
            f.reserve(q, ASK).await.unwrap().reconcile(10);
            admitted += 1;
            assert!(admitted < 1000, "no share was ever leased");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let held = f.reserve(q, ASK).await.unwrap();
        admitted += 1;
        let (r, _, _) = f.window().await;
        assert!(
            r > admitted,
            "the share is charged ahead: {r} for {admitted}"
        );
        let members = f.slot_members().await;
        assert!(
            members.iter().any(|m| m.contains('*')),
            "a block of slots: {members:?}"
        );
        assert!(f.slots().await > 1);
        // The request still running keeps its slot while the rest goes back.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while f.window().await.0 != admitted || f.slots().await != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "not returned: {:?}, {} slots",
                f.window().await,
                f.slots().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(held);
        while f.slots().await != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                f.slot_members().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(f.window().await.0, admitted);
    }

    /// Shutting down gives every share back at once, without waiting for it to end.
    #[tokio::test]
    async fn release_returns_the_shares() {
        let f = Fixture::with_shares(true);
        f.at_ms(13_000_000_000);
        let q = Quota {
            requests_per_minute: Some(100_000),
            concurrent_requests: Some(1000),
            ..Quota::default()
        };
        let mut admitted = 0;
        while local_admits(&f.q) < 3 {
            f.reserve(q, ASK).await.unwrap().reconcile(10);
            admitted += 1;
            assert!(admitted < 1000, "no share was ever leased");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(f.window().await.0 > admitted);
        let started = std::time::Instant::now();
        f.q.release().await;
        assert!(started.elapsed() < SHARE_PERIOD, "{:?}", started.elapsed());
        // The returns went in the last call; one more (exact) reserve after them sees them.
        let exact = f.replica(false);
        let _held = reserve_on(&exact, q, ASK).await.unwrap();
        assert_eq!(f.window().await.0, admitted + 1);
        // Only that reserve's slot is taken: the block went back.
        assert_eq!(f.slots().await, 1, "{:?}", f.slot_members().await);
    }

    /// Near the limit no share is leased: every request takes the exact path, and one replica
    /// sending one request after another gets exactly the limit.
    #[tokio::test]
    async fn near_the_limit_the_exact_path_is_used() {
        let f = Fixture::with_shares(true);
        f.at_ms(10_000_000_000);
        // Less than FAR * SHARE_LEAST (32 for one replica) left from the start: never a share.
        let mut admitted = 0;
        for _ in 0..40 {
            admitted += u32::from(f.reserve(rpm(30), ASK).await.is_ok());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!((admitted, local_admits(&f.q)), (30, 0));
        // Far from the limit shares are used; the last 25 or more are exact.
        f.at_ms(20_000_000_000);
        let mut admitted = 0;
        for _ in 0..260 {
            admitted += u32::from(f.reserve(rpm(200), ASK).await.is_ok());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let local = local_admits(&f.q);
        assert_eq!(admitted, 200);
        assert!((1..=175).contains(&local), "{local} admitted from shares");
        tokio::time::sleep(SHARE_PERIOD * 3).await;
        assert_eq!(f.window().await.0, 200);
    }

    /// Tokens from a share are reserved, then reconciled within the share: the window ends up
    /// holding exactly what the requests used, and never more than the limit.
    #[tokio::test]
    async fn token_shares_reconcile_exactly() {
        let f = Fixture::with_shares(true);
        f.at_ms(12_000_000_000);
        let q = Quota {
            tokens_per_minute: Some(10_000),
            ..Quota::default()
        };
        let (mut admitted, mut refused) = (0u64, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while refused < 20 {
            assert!(std::time::Instant::now() < deadline, "{admitted} admitted");
            match f.reserve(q, ASK).await {
                Ok(h) => {
                    h.reconcile(4);
                    admitted += 1;
                    refused = 0;
                }
                Err(_) => refused += 1,
            }
            tokio::task::yield_now().await;
        }
        assert!(local_admits(&f.q) > 0);
        tokio::time::sleep(SHARE_PERIOD * 3).await;
        let (_, t, _) = f.window().await;
        assert_eq!(t, 4 * admitted as i64);
        assert!((9_984..=10_000).contains(&t), "{t} tokens");
    }

    /// A replica that dies keeps its block of slots only until the block's lease runs out.
    #[tokio::test]
    async fn a_dead_replicas_share_expires() {
        let f = Fixture::with_shares(true);
        f.at_ms(11_000_000_000);
        let q = Quota {
            concurrent_requests: Some(100),
            ..Quota::default()
        };
        let _running = f.reserve(q, ASK).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let block = loop {
            let block = f
                .slot_members()
                .await
                .iter()
                .find_map(|m| m.split_once('*').and_then(|(_, n)| n.parse::<i64>().ok()));
            if let Some(b) = block {
                break b;
            }
            assert!(std::time::Instant::now() < deadline, "no block leased");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(block >= 1);
        assert_eq!(f.slots().await, 1 + block);
        // Replica A stops: no return, no renewal.
        f.q.halt();
        // B's leases end 20 s after A's.
        f.at_ms(11_000_000_000 + 20_000);
        let b = f.replica(false);
        let mut held = Vec::new();
        while let Ok(h) = reserve_on(&b, q, ASK).await {
            held.push(h);
        }
        assert_eq!(held.len() as i64, 100 - 1 - block);
        // A's leases (its running request's and its block's) run out.
        f.at_ms(11_000_000_000 + 30_001);
        while let Ok(h) = reserve_on(&b, q, ASK).await {
            held.push(h);
        }
        assert_eq!(held.len(), 100);
    }
}
