//! Rate limits kept in Redis, shared by every gateway instance: the same GCRA as the local
//! limits, run by an atomic Lua script (one round trip, all of a request's limits at once),
//! with leases that spare most requests the round trip, and a failure mode for when Redis
//! is down.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;

use gateway_core::RouteId;
use gateway_core::metrics::{Histograms, Metrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::Quota;
use super::header::Reading;
use super::store::{Shard, TokioClock, duration_nanos};
use crate::redis::{Redis, Unavailable};

/// Limits kept in Redis, so that every gateway instance sharing it holds one combined
/// limit: see [`RateLimitLayer::distributed`](super::RateLimitLayer::distributed).
///
/// A limit's buckets in Redis are named `{namespace}:{limit}:{digest of the key}`:
/// instances (and routes) with the same namespace and limit name share them. Without
/// [`batch`](Self::batch), every request costs one round trip (one script run for all of
/// its limits, all or nothing); with it, an instance takes tokens in small leases.
///
/// Concurrency limits stay per instance.
#[derive(Clone, Debug)]
#[must_use]
pub struct Distributed {
    pub(crate) redis: Redis,
    pub(crate) namespace: Arc<str>,
    pub(crate) on_error: OnError,
    pub(crate) batch: Option<Batch>,
}

/// What a request gets when Redis cannot be asked (down, slow, or being backed off from).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnError {
    /// Let it through (fail open, the default): a limiter outage does not become an API
    /// outage. Counted as `failed_open`.
    #[default]
    Allow,
    /// Refuse it with 503 and `Retry-After: 1` (fail closed). Counted as `failed_closed`.
    Deny,
}

/// Leases: an instance takes up to `lease` tokens of a key at once and spends them
/// locally, so only about one request in `lease` waits for Redis; tokens it has not spent
/// after `sync` go back to Redis.
///
/// A lease never lets more through than the limit: its tokens were taken in Redis before
/// they are spent. What it costs is the other way round: tokens leased by one instance and
/// not yet spent are unavailable to the others for at most `sync`, so a fleet of `n`
/// instances may refuse up to `n × (lease − 1)` requests early for a key near its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    lease: u32,
    sync: Duration,
}

/// The Redis side of one layer.
pub(crate) struct Remote {
    redis: Redis,
    namespace: Arc<str>,
    on_error: OnError,
    batch: Option<Batch>,
    clock: TokioClock,
    counters: Option<RemoteCounters>,
    reconciling: AtomicBool,
}

/// One rate limit kept in Redis.
pub(crate) struct RemoteRate {
    name: Arc<str>,
    quota: Quota,
    cells: Cells,
}

/// What this instance knows of one key of one limit: its lease, and until when Redis
/// refuses it.
#[derive(Default)]
pub(crate) struct Cell {
    state: Mutex<CellState>,
    /// Held while a lease is fetched, so one key's requests wait for one fetch.
    fetch: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CellState {
    /// Leased tokens not spent yet.
    tokens: u32,
    /// When the lease's tokens go back (clock nanoseconds).
    expires: u64,
    /// What Redis had left after the lease was taken.
    remaining: u64,
    /// When the bucket is full again, as of the last answer.
    full_at: u64,
    /// Redis refused until then: refused here without asking.
    refused_until: u64,
    /// Whether Redis has answered about this key yet (so `remaining` and `full_at` say
    /// something).
    answered: bool,
    /// `{namespace}:{limit}:{digest}`, once made.
    redis_key: Option<Arc<str>>,
    touched: u64,
}

/// The cells of one limit, bounded: a key past the cap is asked of Redis every time.
pub(crate) struct Cells {
    shards: Box<[Mutex<Shard<Arc<Cell>>>]>,
    cap_per_shard: usize,
}

/// The script's answer for one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
    pub(crate) wait: Duration,
}

/// What Redis made of a request's limits.
pub(crate) enum Taken {
    /// `units` taken from every key.
    Taken { units: u32, answers: Vec<Answer> },
    /// Not enough room in at least one key.
    Refused { answers: Vec<Answer> },
}

const SHARDS: usize = 16;

/// GCRA over several keys, all or none, on the server's clock (so instances with skewed
/// clocks agree). Per key: first give back `back` units (an expired lease's), then take
/// as many units as every key has room for, up to `want`, if that is at least `cost`.
/// A bucket's key expires when the bucket is full again, so idle keys cost Redis nothing.
const TAKE: &str = r"
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local cost = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local tats, iv, cap = {}, {}, {}
local take = want
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 3
  iv[i] = tonumber(ARGV[b + 1])
  cap[i] = iv[i] * tonumber(ARGV[b + 2])
  local back = tonumber(ARGV[b + 3])
  local t = tonumber(redis.call('GET', KEYS[i]) or '0') - back * iv[i]
  if t < now then t = now end
  tats[i] = t
  local room = math.floor((now + cap[i] - t) / iv[i])
  if room < take then take = room end
end
local ok = take >= cost
if not ok then take = 0 end
local out = { take, ok and 1 or 0 }
for i = 1, #KEYS do
  local t = tats[i] + take * iv[i]
  if t > now then
    redis.call('SET', KEYS[i], string.format('%.0f', t), 'PX', math.ceil((t - now) / 1000))
  else
    redis.call('DEL', KEYS[i])
  end
  local wait = tats[i] + cost * iv[i] - cap[i] - now
  if ok or wait < 0 then wait = 0 end
  out[#out + 1] = math.floor((now + cap[i] - t) / iv[i])
  out[#out + 1] = t - now
  out[#out + 1] = wait
end
return out
";

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TAKE));

// === impl Distributed ===

impl Distributed {
    /// Limits kept in `redis`, in the namespace `default` (see
    /// [`namespace`](Self::namespace)), failing open, one round trip per request.
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            namespace: Arc::from("default"),
            on_error: OnError::default(),
            batch: None,
        }
    }

    /// The namespace of the limits' keys [default: `default`]: give each route (or each
    /// group of routes that share limits) its own; the config file uses the route's id.
    pub fn namespace(mut self, namespace: impl Into<Arc<str>>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// What requests get when Redis cannot be asked [default: [`OnError::Allow`]].
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// Takes tokens in leases (see [`Batch`]) instead of asking Redis for every request.
    pub fn batch(mut self, batch: Batch) -> Self {
        self.batch = Some(batch);
        self
    }
}

// === impl Batch ===

impl Batch {
    /// Leases of up to `lease` tokens, unspent ones given back after `sync`.
    ///
    /// # Panics
    ///
    /// When `lease` or `sync` is zero (use [`Batch::try_new`] for configuration).
    #[track_caller]
    pub fn new(lease: u32, sync: Duration) -> Self {
        match Self::try_new(lease, sync) {
            Ok(batch) => batch,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Batch::new`], for values from configuration.
    ///
    /// # Errors
    ///
    /// When `lease` or `sync` is zero.
    pub fn try_new(lease: u32, sync: Duration) -> Result<Self, &'static str> {
        if lease == 0 {
            return Err("a lease must hold at least one token");
        }
        if sync.is_zero() {
            return Err("leases must be given back after more than 0");
        }
        Ok(Self { lease, sync })
    }
}

// === impl Remote ===

impl Remote {
    pub(crate) fn new(config: &Distributed, metrics: Option<(&Metrics, &RouteId)>) -> Self {
        Self {
            redis: config.redis.clone(),
            namespace: Arc::clone(&config.namespace),
            on_error: config.on_error,
            batch: config.batch,
            clock: TokioClock::new(),
            counters: metrics.map(|(m, route)| RemoteCounters::new(m, route)),
            reconciling: AtomicBool::new(false),
        }
    }

    pub(crate) const fn on_error(&self) -> OnError {
        self.on_error
    }

    pub(crate) const fn batched(&self) -> bool {
        self.batch.is_some()
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.nanos()
    }

    /// The Redis key of `limit` for a key whose digest is `digest`.
    pub(crate) fn redis_key(&self, limit: &RemoteRate, digest: &str) -> Arc<str> {
        Arc::from(format!("{}:{}:{digest}", self.namespace, limit.name))
    }

    /// Runs the script: `cost` (at least) and up to `want` units from each of `keys`, after
    /// giving back what each says.
    pub(crate) async fn take(
        &self,
        keys: &[(&RemoteRate, &str, u32)],
        cost: u32,
        want: u32,
    ) -> Result<Taken, Unavailable> {
        let mut call = SCRIPT.prepare_invoke();
        call.arg(cost).arg(want);
        for (limit, key, back) in keys {
            let interval = limit.quota.interval().as_micros().max(1);
            call.key(*key)
                .arg(u64::try_from(interval).unwrap_or(u64::MAX))
                .arg(limit.quota.burst_size())
                .arg(*back);
        }
        let started = tokio::time::Instant::now();
        let result: Result<Vec<i64>, Unavailable> = self.redis.invoke(&call).await;
        if let Some(c) = &self.counters {
            match &result {
                Err(Unavailable::Backoff) => {}
                _ => c.duration.observe(started.elapsed().as_secs_f64()),
            }
            if let Err(e) = &result {
                c.error(e.reason());
            }
        }
        let reply = result?;
        let micros = |n: i64| Duration::from_micros(u64::try_from(n).unwrap_or(0));
        let answers: Vec<Answer> = reply
            .get(2..)
            .unwrap_or_default()
            .chunks_exact(3)
            .map(|a| Answer {
                remaining: u64::try_from(a[0]).unwrap_or(0),
                reset: micros(a[1]),
                wait: micros(a[2]),
            })
            .collect();
        if answers.len() != keys.len() {
            return Err(Unavailable::Failed(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "the rate-limit script answered with an unexpected shape",
            ))));
        }
        Ok(match reply.get(..2) {
            Some([units, 1]) => Taken::Taken {
                units: u32::try_from(*units).unwrap_or(0),
                answers,
            },
            _ => Taken::Refused { answers },
        })
    }

    /// Starts the task that gives back the tokens of expired leases every `sync`, once.
    pub(crate) fn reconcile(self: &Arc<Self>, limits: Vec<Weak<RemoteRate>>) {
        let Some(batch) = self.batch else {
            return;
        };
        if self.reconciling.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reconciling.store(false, Ordering::Release);
            return;
        };
        let remote = Arc::downgrade(self);
        drop(runtime.spawn(async move {
            let mut tick = tokio::time::interval(batch.sync);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(remote) = remote.upgrade() else {
                    return;
                };
                for limit in &limits {
                    let Some(limit) = limit.upgrade() else {
                        return;
                    };
                    remote.give_back(&limit).await;
                }
            }
        }));
    }

    /// Gives back the unspent tokens of `limit`'s expired leases, and drops the cells
    /// that hold nothing any more.
    async fn give_back(&self, limit: &RemoteRate) {
        let now = self.now();
        let mut returns = Vec::new();
        limit.cells.retain(|cell| {
            let mut state = cell.lock();
            if state.expires <= now && state.tokens > 0 {
                if let Some(key) = &state.redis_key {
                    returns.push((Arc::clone(key), state.tokens));
                }
                state.tokens = 0;
            }
            let idle = state.tokens == 0
                && state.refused_until <= now
                && now.saturating_sub(state.touched) > duration_nanos(Duration::from_secs(10));
            !idle
        });
        for (key, tokens) in returns {
            if self.take(&[(limit, &key, tokens)], 0, 0).await.is_err() {
                // Redis is down: the tokens come back by themselves as the bucket refills.
                break;
            }
        }
    }

    /// How long a refusal is remembered at most: with leases, tokens given back can make
    /// room before the wait Redis computed is over.
    pub(crate) fn remember_at_most(&self) -> Option<Duration> {
        self.batch.map(|b| b.sync)
    }

    /// Whether the task that gives leases back is running.
    pub(crate) fn reconciling(&self) -> bool {
        self.reconciling.load(Ordering::Relaxed)
    }

    pub(crate) fn lease(&self) -> u32 {
        self.batch.map_or(1, |b| b.lease)
    }

    pub(crate) fn lease_until(&self, now: u64) -> u64 {
        now.saturating_add(self.batch.map_or(0, |b| duration_nanos(b.sync)))
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("redis", &self.redis)
            .field("namespace", &self.namespace)
            .field("on_error", &self.on_error)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

// === impl RemoteRate ===

impl RemoteRate {
    pub(crate) fn new(name: Arc<str>, quota: Quota, max_keys: usize) -> Self {
        Self {
            name,
            quota,
            cells: Cells {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                cap_per_shard: max_keys.div_ceil(SHARDS),
            },
        }
    }

    /// How many keys have a cell here.
    pub(crate) fn cells_held(&self) -> usize {
        self.cells
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// The cell of `key`, made if there is room.
    pub(crate) fn cell(&self, key: u64, now: u64) -> Option<Arc<Cell>> {
        self.cells.get_or_insert(key, now)
    }
}

// === impl Cell ===

impl Cell {
    fn lock(&self) -> std::sync::MutexGuard<'_, CellState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Until when Redis refused this key (and the reading to report), if that is later
    /// than `now`.
    pub(crate) fn refused(&self, now: u64) -> Option<(Duration, Reading)> {
        let state = self.lock();
        (state.refused_until > now).then(|| {
            (
                Duration::from_nanos(state.refused_until - now),
                Reading::new(
                    0,
                    Some(Duration::from_nanos(state.full_at.saturating_sub(now))),
                ),
            )
        })
    }

    /// Spends `cost` of the lease, if it holds that much and has not expired.
    pub(crate) fn spend(&self, cost: u32, now: u64) -> Option<Reading> {
        let mut state = self.lock();
        state.touched = now;
        if state.expires <= now || state.tokens < cost {
            return None;
        }
        state.tokens -= cost;
        Some(state.reading(now))
    }

    /// Gives `cost` back to the lease (a stacked limit refused).
    pub(crate) fn unspend(&self, cost: u32) {
        let mut state = self.lock();
        state.tokens = state.tokens.saturating_add(cost);
    }

    /// Takes the tokens of an expired lease out, to give back to Redis with the next
    /// fetch.
    pub(crate) fn take_expired(&self, now: u64) -> u32 {
        let mut state = self.lock();
        if state.expires > now {
            return 0;
        }
        std::mem::take(&mut state.tokens)
    }

    /// Records a new lease of `tokens` (what is left of it once the request that
    /// fetched it is counted), and what Redis said.
    pub(crate) fn leased(&self, tokens: u32, until: u64, answer: Answer, now: u64) -> Reading {
        let mut state = self.lock();
        state.tokens = tokens;
        state.expires = until;
        state.remaining = answer.remaining;
        state.full_at = now.saturating_add(duration_nanos(answer.reset));
        state.refused_until = 0;
        state.answered = true;
        state.reading(now)
    }

    /// Records a refusal: no asking again until the wait is over, or `at_most` (leases
    /// given back can make room sooner).
    pub(crate) fn refused_for(&self, answer: Answer, at_most: Option<Duration>, now: u64) {
        let mut state = self.lock();
        let wait = at_most.map_or(answer.wait, |most| answer.wait.min(most));
        state.refused_until = now.saturating_add(duration_nanos(wait));
        state.remaining = answer.remaining;
        state.full_at = now.saturating_add(duration_nanos(answer.reset));
        state.answered = true;
    }

    /// Records what Redis said about the key (without a lease).
    pub(crate) fn observed(&self, answer: Answer, now: u64) {
        let mut state = self.lock();
        state.remaining = answer.remaining;
        state.full_at = now.saturating_add(duration_nanos(answer.reset));
        state.answered = true;
    }

    /// What Redis last said about the key, for the headers of a request that did not ask.
    pub(crate) fn last_reading(&self, now: u64) -> Option<Reading> {
        let state = self.lock();
        state.answered.then(|| state.reading(now))
    }

    /// The cell's Redis key, made by `make` the first time.
    pub(crate) fn redis_key(&self, make: impl FnOnce() -> Arc<str>) -> Arc<str> {
        let mut state = self.lock();
        Arc::clone(state.redis_key.get_or_insert_with(make))
    }

    pub(crate) async fn fetching(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.fetch.lock().await
    }
}

impl CellState {
    fn reading(&self, now: u64) -> Reading {
        Reading::new(
            self.remaining + u64::from(self.tokens),
            Some(Duration::from_nanos(self.full_at.saturating_sub(now))),
        )
    }
}

// === impl Cells ===

impl Cells {
    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard<Arc<Cell>>> {
        self.shards[(key >> 48) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn get_or_insert(&self, key: u64, now: u64) -> Option<Arc<Cell>> {
        let mut shard = self.shard(key);
        if let Some(cell) = shard.get(&key) {
            return Some(Arc::clone(cell));
        }
        if shard.len() >= self.cap_per_shard {
            return None;
        }
        let cell = Arc::new(Cell::default());
        cell.lock().touched = now;
        shard.insert(key, Arc::clone(&cell));
        Some(cell)
    }

    /// Keeps the cells `keep` says (and any a request holds now).
    fn retain(&self, mut keep: impl FnMut(&Cell) -> bool) {
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            map.retain(|_, cell| keep(cell) || Arc::strong_count(cell) > 1);
        }
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    route: RouteId,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: RouteId,
}

struct RemoteCounters {
    route: RouteId,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
}

impl RemoteCounters {
    fn new(metrics: &Metrics, route: &RouteId) -> Self {
        let errors: Family<ErrorLabels, Counter> = metrics.family(
            "rate_limit_redis_errors",
            "Calls to Redis for rate limits that failed or were not made, by reason (timeout, connection, server, backoff).",
        );
        let durations: Histograms<RouteLabels> = metrics.histograms(
            "rate_limit_redis_duration_seconds",
            "Round trips to Redis for rate limits.",
        );
        let duration = durations
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .clone();
        Self {
            route: route.clone(),
            errors,
            duration,
        }
    }

    fn error(&self, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                route: self.route.clone(),
                reason,
            })
            .inc();
    }
}
