//! Where local limits keep their state: a bounded, sharded map from a key's hash to its
//! bucket (governor's GCRA state) or to its count of requests in flight.
//!
//! NOTE: governor's keyed limiters own their key map and cannot bound it; its
//! `StateStore` trait lets the map be ours. Here the *key* handed to governor is the
//! bucket itself (found in our map first), and [`Cells`] only runs governor's update on it.
//! That keeps governor's GCRA and quota arithmetic while the map gets a cap, idle eviction
//! off the request path, refunds (a stacked limit that refuses takes nothing from the
//! others) and an overflow bucket.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{NotUntil, RateLimiter};
use prometheus_client::metrics::gauge::Gauge;

use super::Quota;

/// What happens to a new key when a limit holds as many keys as it may.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Refuse requests with new keys (429) until idle keys are evicted: keys already held
    /// keep their buckets, and no client gets a fresh one by crowding others out.
    #[default]
    Shed,
    /// Count every new key in one shared overflow bucket with the limit's quota, until idle
    /// keys are evicted.
    Share,
}

/// How often, at most, a map that takes new keys is swept of idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

const SHARDS: usize = 16;

/// The clock of every local limit: `tokio::time`, so tests with paused time drive it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokioClock {
    origin: tokio::time::Instant,
}

/// One key's bucket: governor's theoretical arrival time (0: fresh) and when it was last
/// used (on [`TokioClock`], in nanoseconds).
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    tat: AtomicU64,
    touched: AtomicU64,
}

/// governor's state store over [`Bucket`]s: the key *is* the bucket.
#[derive(Debug)]
pub(crate) struct Cells;

type Limiter = RateLimiter<Bucket, Cells, TokioClock, StateInformationMiddleware>;

/// A map keyed by an already-uniform hash.
pub(crate) type Shard<V> = HashMap<u64, V, BuildHasherDefault<Prehashed>>;

/// A rate limit kept in memory.
#[derive(Debug)]
pub(crate) struct LocalRate {
    limiter: Limiter,
    quota: Quota,
    buckets: Arc<Buckets>,
}

/// What a rate limit made of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RateOutcome {
    /// Admitted; `remaining` more fit now; the bucket is full again in `reset`.
    Allowed {
        remaining: u32,
        reset: Duration,
        overflow: bool,
    },
    /// Refused: the request fits in `wait`; the bucket is full again in `reset`.
    Refused { wait: Duration, reset: Duration },
    /// The request costs more than the burst: it never fits.
    Never,
    /// The map is full and new keys are shed.
    Shed,
}

/// The buckets of one rate limit.
#[derive(Debug)]
pub(crate) struct Buckets {
    shards: Box<[RwLock<Shard<Bucket>>]>,
    overflow: Bucket,
    held: AtomicUsize,
    cap: usize,
    when_full: WhenFull,
    /// A bucket unused this long is full again: indistinguishable from a fresh one.
    idle_after: u64,
    clock: TokioClock,
    last_sweep: AtomicU64,
    sweeping: AtomicBool,
    gauge: Option<Gauge>,
}

/// The in-flight counts of one concurrency limit.
#[derive(Debug)]
pub(crate) struct InFlight {
    shards: Box<[Mutex<Shard<u32>>]>,
    overflow: AtomicU32,
    max: u32,
    held: AtomicUsize,
    cap: usize,
    when_full: WhenFull,
    gauge: Option<Gauge>,
}

/// A request counted in flight until this drops.
#[derive(Debug)]
pub(crate) struct Permit {
    in_flight: Arc<InFlight>,
    /// `None`: counted in the overflow.
    key: Option<u64>,
}

/// Why a concurrency limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Busy {
    /// The key has `max` requests in flight.
    Full,
    /// The map is full and new keys are shed.
    Shed,
}

/// A hasher for keys that are hashes already.
#[derive(Default)]
pub(crate) struct Prehashed(u64);

// === impl TokioClock ===

impl TokioClock {
    pub(crate) fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn nanos(&self) -> u64 {
        duration_nanos(self.origin.elapsed())
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// === impl Bucket ===

impl Bucket {
    /// Gives back `amount` of the bucket's time: what a request took, when a limit stacked
    /// with this one refused it.
    fn refund(&self, amount: u64) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                // NOTE: 0 means fresh; a bucket refunded to before now is as good as fresh,
                // so flooring at 1 changes nothing.
                (tat != 0).then(|| tat.saturating_sub(amount).max(1))
            });
    }
}

// NOTE: governor's keyed API wants its key `Hash + Eq + Clone`; a bucket is never hashed,
// compared or cloned by it (it only passes the key back to `Cells`), so the impls are the
// plainest lawful ones: identity for equality, nothing to hash, a copy of the state.

impl Hash for Bucket {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

impl PartialEq for Bucket {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Bucket {}

impl Clone for Bucket {
    fn clone(&self) -> Self {
        Self {
            tat: AtomicU64::new(self.tat.load(Ordering::Relaxed)),
            touched: AtomicU64::new(self.touched.load(Ordering::Relaxed)),
        }
    }
}

// === impl Cells ===

impl StateStore for Cells {
    type Key = Bucket;

    fn measure_and_replace<T, F, E>(&self, bucket: &Bucket, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let current = |tat: u64| (tat != 0).then(|| Nanos::from(tat));
        let mut prev = bucket.tat.load(Ordering::Acquire);
        loop {
            let (result, next) = f(current(prev))?;
            // NOTE: a TAT of 0 would read as fresh; governor's are after its start, so > 0
            // for any request but one at the very nanosecond the limiter was made.
            let next = next.as_u64().max(1);
            match bucket
                .tat
                .compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

// === impl LocalRate ===

impl LocalRate {
    pub(crate) fn new(quota: Quota, cap: usize, when_full: WhenFull, gauge: Option<Gauge>) -> Self {
        let clock = TokioClock::new();
        let idle_after = quota
            .interval()
            .saturating_mul(quota.burst_size())
            .saturating_add(quota.interval());
        let buckets = Buckets {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            overflow: Bucket::default(),
            held: AtomicUsize::new(0),
            cap,
            when_full,
            idle_after: duration_nanos(idle_after),
            clock,
            last_sweep: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
            gauge,
        };
        Self {
            limiter: RateLimiter::new(quota.governor(), Cells, clock),
            quota,
            buckets: Arc::new(buckets),
        }
    }

    /// Takes `cost` from the bucket of `key`.
    pub(crate) fn check(&self, key: u64, cost: NonZeroU32) -> RateOutcome {
        let limiter = &self.limiter;
        let interval = self.quota.interval();
        let burst = self.quota.burst_size();
        let found = self.buckets.with(key, |bucket| {
            match limiter.check_key_n(bucket, cost) {
                Ok(Ok(state)) => {
                    let remaining = state.remaining_burst_capacity();
                    RateOutcome::Allowed {
                        remaining,
                        // The bucket refills one request per interval.
                        reset: interval.saturating_mul(burst - remaining.min(burst)),
                        overflow: false,
                    }
                }
                Ok(Err(not_until)) => {
                    let wait = wait(&not_until, limiter);
                    // Full again once the wait is over and the rest of the burst is back.
                    let rest = burst.saturating_sub(cost.get());
                    RateOutcome::Refused {
                        wait,
                        reset: wait.saturating_add(interval.saturating_mul(rest)),
                    }
                }
                Err(_) => RateOutcome::Never,
            }
        });
        match found {
            Found::Held(outcome) => outcome,
            Found::Overflow(RateOutcome::Allowed {
                remaining, reset, ..
            }) => RateOutcome::Allowed {
                remaining,
                reset,
                overflow: true,
            },
            Found::Overflow(outcome) => outcome,
            Found::Shed => RateOutcome::Shed,
        }
    }

    /// Gives `cost` back to the bucket of `key` (or the overflow, as `outcome` says).
    pub(crate) fn refund(&self, key: u64, cost: NonZeroU32, outcome: RateOutcome) {
        let amount = duration_nanos(self.quota.interval()).saturating_mul(u64::from(cost.get()));
        match outcome {
            RateOutcome::Allowed { overflow: true, .. } => self.buckets.overflow.refund(amount),
            RateOutcome::Allowed { .. } => self.buckets.refund(key, amount),
            _ => {}
        }
    }

    pub(crate) const fn quota(&self) -> &Quota {
        &self.quota
    }

    pub(crate) fn buckets(&self) -> &Arc<Buckets> {
        &self.buckets
    }
}

fn wait(not_until: &NotUntil<Duration>, limiter: &Limiter) -> Duration {
    use governor::clock::Clock as _;
    not_until.wait_time_from(limiter.clock().now())
}

/// Where a key's bucket was found.
enum Found<R> {
    Held(R),
    Overflow(R),
    Shed,
}

// === impl Buckets ===

impl Buckets {
    fn shard(&self, key: u64) -> &RwLock<Shard<Bucket>> {
        // NOTE: the map inside uses the low bits (and hashbrown the top 7); the shard is
        // picked by bits in between so a shard's keys still spread over its map.
        &self.shards[(key >> 48) as usize % SHARDS]
    }

    /// Runs `f` on the bucket of `key`, made when it is new and there is room.
    fn with<R>(self: &Arc<Self>, key: u64, f: impl FnOnce(&Bucket) -> R) -> Found<R> {
        let now = self.clock.nanos();
        let shard = self.shard(key);
        {
            let map = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(bucket) = map.get(&key) {
                bucket.touched.store(now, Ordering::Relaxed);
                return Found::Held(f(bucket));
            }
        }
        let full = self.held.load(Ordering::Relaxed) >= self.cap;
        self.sweep_soon(now, full);
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = map.get(&key) {
            bucket.touched.store(now, Ordering::Relaxed);
            return Found::Held(f(bucket));
        }
        // NOTE: `held` is checked and bumped under one shard's lock, so concurrent inserts
        // into other shards may pass the cap by at most one key per shard.
        if self.held.load(Ordering::Relaxed) >= self.cap {
            drop(map);
            return match self.when_full {
                WhenFull::Shed => Found::Shed,
                WhenFull::Share => Found::Overflow(f(&self.overflow)),
            };
        }
        let bucket = map.entry(key).or_default();
        bucket.touched.store(now, Ordering::Relaxed);
        self.held.fetch_add(1, Ordering::Relaxed);
        if let Some(gauge) = &self.gauge {
            gauge.inc();
        }
        Found::Held(f(bucket))
    }

    fn refund(&self, key: u64, amount: u64) {
        let map = self
            .shard(key)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = map.get(&key) {
            bucket.refund(amount);
        }
    }

    /// How many keys are held.
    pub(crate) fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Starts a sweep off the request path when one is due: every [`SWEEP_EVERY`] while
    /// new keys arrive, at once when the map is full.
    fn sweep_soon(self: &Arc<Self>, now: u64, full: bool) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        let due = full || now.saturating_sub(last) >= duration_nanos(SWEEP_EVERY);
        if !due || self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last_sweep.store(now, Ordering::Relaxed);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let buckets = Arc::clone(self);
                drop(runtime.spawn(async move { buckets.sweep() }));
            }
            // Without a runtime (a limiter driven by hand) there is no "later": sweep now.
            Err(_) => self.sweep(),
        }
    }

    /// Evicts the buckets that are full again (unused for longer than a refill), shard by
    /// shard, and gives memory back when a map shrank a lot.
    pub(crate) fn sweep(&self) {
        let now = self.clock.nanos();
        let mut evicted = 0;
        for shard in self.shards.iter() {
            let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, b| {
                now.saturating_sub(b.touched.load(Ordering::Relaxed)) < self.idle_after
            });
            evicted += before - map.len();
            let len = map.len();
            if map.capacity() > 64 && map.capacity() > len * 4 {
                map.shrink_to(len * 2);
            }
        }
        self.held.fetch_sub(evicted, Ordering::Relaxed);
        if let Some(gauge) = &self.gauge {
            gauge.dec_by(i64::try_from(evicted).unwrap_or(i64::MAX));
        }
        self.sweeping.store(false, Ordering::Release);
    }
}

impl Drop for Buckets {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.dec_by(i64::try_from(self.len()).unwrap_or(i64::MAX));
        }
    }
}

// === impl InFlight ===

impl InFlight {
    pub(crate) fn new(max: u32, cap: usize, when_full: WhenFull, gauge: Option<Gauge>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            overflow: AtomicU32::new(0),
            max,
            held: AtomicUsize::new(0),
            cap,
            when_full,
            gauge,
        }
    }

    /// Counts a request of `key` in flight, if it has room; the answer also says how many
    /// more fit.
    pub(crate) fn acquire(self: &Arc<Self>, key: u64) -> Result<(Permit, u32), Busy> {
        let mut map = self.shards[(key >> 48) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&key) {
            if *n >= self.max {
                return Err(Busy::Full);
            }
            *n += 1;
            let left = self.max - *n;
            drop(map);
            return Ok((self.permit(Some(key)), left));
        }
        if self.held.load(Ordering::Relaxed) < self.cap {
            map.insert(key, 1);
            drop(map);
            self.held.fetch_add(1, Ordering::Relaxed);
            if let Some(gauge) = &self.gauge {
                gauge.inc();
            }
            return Ok((self.permit(Some(key)), self.max - 1));
        }
        drop(map);
        match self.when_full {
            WhenFull::Shed => Err(Busy::Shed),
            WhenFull::Share => {
                let taken = self
                    .overflow
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.max).then_some(n + 1)
                    });
                match taken {
                    Ok(n) => Ok((self.permit(None), self.max - n - 1)),
                    Err(_) => Err(Busy::Full),
                }
            }
        }
    }

    fn permit(self: &Arc<Self>, key: Option<u64>) -> Permit {
        Permit {
            in_flight: Arc::clone(self),
            key,
        }
    }

    /// How many keys have requests in flight.
    pub(crate) fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn release(&self, key: Option<u64>) {
        let Some(key) = key else {
            self.overflow.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let mut map = self.shards[(key >> 48) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
                drop(map);
                self.held.fetch_sub(1, Ordering::Relaxed);
                if let Some(gauge) = &self.gauge {
                    gauge.dec();
                }
            }
        }
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.release(self.key);
    }
}

// === impl Prehashed ===

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else is folded in, to stay correct.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
