//! The layer, its service, and the decision about one request.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::metrics::Metrics;
use gateway_core::{Body, BoxError, Error, ErrorKind, LogFields, RouteId};
use http::{Request, Response, request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, Service};

use super::Quota;
use super::future::{After, ResponseFuture};
use super::header::{Described, HeaderStyle, Policies, Reading};
use super::key::{Key, Sink};
#[cfg(feature = "redis")]
use super::remote::{Answer, Distributed, OnError, Remote, RemoteRate, Taken};
use super::store::{Busy, InFlight, LocalRate, Permit, RateOutcome, WhenFull};

/// The most limits one layer holds.
pub const MAX_LIMITS: usize = 8;

/// One limit of a [`RateLimitLayer`]: a rate or a number of requests in flight, per key.
#[derive(Clone, Debug)]
pub struct Limit {
    name: Arc<str>,
    kind: Kind,
    key: Option<Key>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rate(Quota),
    Concurrent(u32),
}

/// Limits requests per key: rates (governor's GCRA) and requests in flight, several stacked,
/// with bounded key memory and the IETF `RateLimit` headers. See the [module
/// docs](super).
///
/// Clones share their limiters, and so do all the services one layer makes: a layer is one
/// set of buckets however often it is applied (tower's `RateLimit` gives each clone its
/// own).
#[derive(Clone, Debug)]
#[must_use]
pub struct RateLimitLayer {
    config: Arc<Config>,
    state: Arc<OnceLock<Arc<Shared>>>,
}

/// The service of a [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Config {
    limits: Vec<Limit>,
    key: Key,
    cost: Cost,
    shadow: bool,
    headers: HeaderStyle,
    max_keys: usize,
    when_full: WhenFull,
    metrics: Option<(Metrics, RouteId)>,
    #[cfg(feature = "redis")]
    distributed: Option<Distributed>,
}

type CostFn = dyn Fn(&request::Parts) -> u32 + Send + Sync;

#[derive(Clone)]
enum Cost {
    Fixed(u32),
    Fn(Arc<CostFn>),
}

/// A layer's limits, made once and shared by every service it makes.
pub(crate) struct Shared {
    limits: Box<[Armed]>,
    keys: Box<[Key]>,
    hasher: RandomState,
    cost: Cost,
    shadow: bool,
    policies: Policies,
    #[cfg(feature = "redis")]
    remote: Option<Arc<Remote>>,
}

struct Armed {
    name: Arc<str>,
    /// Index into `Shared::keys`.
    key: usize,
    state: State,
    counters: Option<Counters>,
}

enum State {
    Rate(LocalRate),
    Concurrent(Arc<InFlight>),
    #[cfg(feature = "redis")]
    Remote(Arc<RemoteRate>),
}

/// What the layer made of one request.
pub(crate) struct Decision {
    pub(crate) readings: [Option<Reading>; MAX_LIMITS],
    pub(crate) permits: Vec<Permit>,
    refusal: Option<Refusal>,
    /// Redis could not be asked, and the request passes anyway.
    failed_open: bool,
}

/// A decision now, or once Redis has answered.
pub(crate) enum Decided {
    Now(Decision),
    #[cfg_attr(
        not(feature = "redis"),
        expect(dead_code, reason = "only limits kept in Redis decide later")
    )]
    Later(Pin<Box<dyn Future<Output = Decision> + Send>>),
}

#[derive(Clone, Copy, Debug)]
struct Refusal {
    limit: usize,
    retry_after: Option<Duration>,
    why: &'static str,
}

// === impl Armed ===

impl Armed {
    /// Whether the limit is kept in Redis.
    fn is_remote(&self) -> bool {
        #[cfg(feature = "redis")]
        if let State::Remote(_) = self.state {
            return true;
        }
        false
    }
}

// === impl Decision ===

impl Decision {
    /// A refused request holds no place in the concurrency limits.
    fn settle(&mut self) {
        if self.refusal.is_some() {
            self.permits.clear();
        }
    }

    /// Records a refusal; the one that asks the client to wait longest is kept (it is
    /// the one `Retry-After` must honour).
    fn refuse(&mut self, refusal: Refusal) {
        let keep = match &self.refusal {
            None => true,
            Some(kept) => match (kept.retry_after, refusal.retry_after) {
                (Some(a), Some(b)) => b > a,
                (Some(_), None) => true,
                (None, _) => false,
            },
        };
        if keep {
            self.refusal = Some(refusal);
        }
    }
}

/// A request let through (with what its response gets), or the answer refusing it.
pub(crate) enum Concluded {
    Pass(After),
    Refuse(Response<Body>),
}

/// A limit to ask Redis about, for one request.
#[cfg(feature = "redis")]
struct Ask {
    limit: usize,
    rate: Arc<RemoteRate>,
    cell: Option<Arc<super::remote::Cell>>,
    key: Arc<str>,
}

/// The digest of `req`'s `key` that names its bucket in Redis: the same in every instance
/// (unlike the local maps' hash, which is seeded per process), and of bounded length
/// whatever the client sent.
#[cfg(feature = "redis")]
fn digest(key: &Key, req: &request::Parts) -> String {
    use sha2::Digest as _;
    struct Sha(sha2::Sha256);
    impl Sink for Sha {
        fn part(&mut self, tag: u8, bytes: &[u8]) {
            self.0.update([tag]);
            self.0
                .update(u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_be_bytes());
            self.0.update(bytes);
        }
    }
    let mut sha = Sha(sha2::Sha256::new());
    key.feed(req, &mut sha);
    let digest = sha.0.finalize();
    let mut out = String::with_capacity(32);
    for byte in &digest[..16] {
        use std::fmt::Write as _;
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Feeds a key to a hasher.
struct Hashed<H>(H);

// === impl Limit ===

impl Limit {
    /// A rate limit named `name` (its `RateLimit-Policy` name, and the `limit` label of its
    /// series).
    pub fn rate(name: impl Into<Arc<str>>, quota: Quota) -> Self {
        Self {
            name: name.into(),
            kind: Kind::Rate(quota),
            key: None,
        }
    }

    /// A limit of `max` requests in flight at once per key; a request counts until its
    /// response body has been sent or dropped.
    ///
    /// # Panics
    ///
    /// When `max` is zero.
    #[track_caller]
    pub fn concurrent(name: impl Into<Arc<str>>, max: u32) -> Self {
        assert!(
            max > 0,
            "a concurrency limit must allow a request in flight"
        );
        Self {
            name: name.into(),
            kind: Kind::Concurrent(max),
            key: None,
        }
    }

    /// Counts by `key` instead of the layer's key.
    pub fn key(mut self, key: Key) -> Self {
        self.key = Some(key);
        self
    }

    /// The limit's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

// === impl RateLimitLayer ===

impl RateLimitLayer {
    /// Enforces `limit`, keyed by the client's address unless the limit has its own key.
    pub fn new(limit: Limit) -> Self {
        Self {
            config: Arc::new(Config {
                limits: vec![limit],
                key: Key::client_ip(),
                cost: Cost::Fixed(1),
                shadow: false,
                headers: HeaderStyle::default(),
                max_keys: 100_000,
                when_full: WhenFull::default(),
                metrics: None,
                #[cfg(feature = "redis")]
                distributed: None,
            }),
            state: Arc::default(),
        }
    }

    /// `quota` per client address ([`Key::client_ip`]).
    pub fn per_ip(quota: Quota) -> Self {
        Self::new(Limit::rate("per-ip", quota))
    }

    /// `quota` per consumer ([`Key::consumer`]: the client's address when anonymous).
    pub fn per_consumer(quota: Quota) -> Self {
        Self::new(Limit::rate("per-consumer", quota)).key(Key::consumer())
    }

    /// `quota` for the whole route ([`Key::route`]).
    pub fn per_route(quota: Quota) -> Self {
        Self::new(Limit::rate("per-route", quota)).key(Key::route())
    }

    /// Enforces `limit` as well. A request passes only when every limit has room for it,
    /// and takes nothing from any of them when one refuses.
    ///
    /// ```
    /// use gateway_middleware::rate_limit::{Limit, Quota, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::new(Limit::rate("second", Quota::per_second(10)))
    ///     .and(Limit::rate("hour", Quota::per_hour(1_000)));
    /// ```
    ///
    /// # Panics
    ///
    /// When the layer would hold more than [`MAX_LIMITS`].
    #[track_caller]
    pub fn and(mut self, limit: Limit) -> Self {
        let config = self.config_mut();
        assert!(
            config.limits.len() < MAX_LIMITS,
            "a rate-limit layer holds at most {MAX_LIMITS} limits"
        );
        config.limits.push(limit);
        self
    }

    /// Counts by `key` [default: [`Key::client_ip`]], for the limits without a key of
    /// their own.
    pub fn key(mut self, key: Key) -> Self {
        self.config_mut().key = key;
        self
    }

    /// What one request takes from the rate limits [default: 1]; 0 takes nothing.
    /// Concurrency limits count requests whatever their cost.
    pub fn cost(mut self, cost: u32) -> Self {
        self.config_mut().cost = Cost::Fixed(cost);
        self
    }

    /// What one request takes from the rate limits, as `f` judges its head (a bulk
    /// endpoint's item count, say). A cost over a limit's burst can never pass: it is
    /// refused, without `Retry-After`.
    pub fn cost_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&request::Parts) -> u32 + Send + Sync + 'static,
    {
        self.config_mut().cost = Cost::Fn(Arc::new(f));
        self
    }

    /// Counts and adds headers, but lets every request through [default: false]: to see
    /// what a new limit would refuse before enforcing it.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.config_mut().shadow = shadow;
        self
    }

    /// Which headers responses carry [default: [`HeaderStyle::Ietf`]].
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.config_mut().headers = style;
        self
    }

    /// The most keys each limit holds [default: 100,000]. Idle keys (whose bucket is full
    /// again) are evicted off the request path; when the map is full of keys in use, new
    /// keys get what [`when_full`](Self::when_full) says.
    ///
    /// # Panics
    ///
    /// When `max` is zero.
    #[track_caller]
    pub fn max_keys(mut self, max: usize) -> Self {
        assert!(max > 0, "a limit must hold at least one key");
        self.config_mut().max_keys = max;
        self
    }

    /// What new keys get when a limit holds [`max_keys`](Self::max_keys) keys in use
    /// [default: [`WhenFull::Shed`]].
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.config_mut().when_full = when_full;
        self
    }

    /// Keeps the rate limits in Redis, shared by every gateway instance that uses the same
    /// namespace and limit names (feature `redis`). Concurrency limits stay per instance.
    ///
    /// ```
    /// use gateway_middleware::rate_limit::{Batch, Distributed, OnError, Quota, RateLimitLayer};
    /// use gateway_middleware::redis::Redis;
    /// use std::time::Duration;
    ///
    /// let redis = Redis::builder("redis://127.0.0.1:6379").build().unwrap();
    /// let layer = RateLimitLayer::per_ip(Quota::per_second(50)).distributed(
    ///     Distributed::new(redis)
    ///         .namespace("api")
    ///         .on_error(OnError::Allow)
    ///         .batch(Batch::new(5, Duration::from_millis(250))),
    /// );
    /// ```
    #[cfg(feature = "redis")]
    pub fn distributed(mut self, distributed: Distributed) -> Self {
        self.config_mut().distributed = Some(distributed);
        self
    }

    /// Reports decisions and keys held in `metrics`, under the `route` label.
    pub fn metrics(mut self, metrics: &Metrics, route: &str) -> Self {
        self.config_mut().metrics = Some((metrics.clone(), RouteId::new(route)));
        self
    }

    fn config_mut(&mut self) -> &mut Config {
        // A changed layer is a new set of limiters.
        self.state = Arc::default();
        Arc::make_mut(&mut self.config)
    }

    fn shared(&self) -> Arc<Shared> {
        Arc::clone(
            self.state
                .get_or_init(|| Arc::new(Shared::new(&self.config))),
        )
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            shared: self.shared(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limits", &self.limits)
            .field("key", &self.key)
            .field("shadow", &self.shadow)
            .field("headers", &self.headers)
            .field("max_keys", &self.max_keys)
            .field("when_full", &self.when_full)
            .finish_non_exhaustive()
    }
}

// === impl RateLimit ===

impl<S> RateLimit<S> {
    /// How many keys the limit `name` holds now (buckets, or keys with requests in flight).
    pub fn keys_held(&self, name: &str) -> Option<usize> {
        let limit = self.shared.limits.iter().find(|l| &*l.name == name)?;
        Some(match &limit.state {
            State::Rate(rate) => rate.buckets().len(),
            State::Concurrent(in_flight) => in_flight.len(),
            #[cfg(feature = "redis")]
            State::Remote(rate) => rate.cells_held(),
        })
    }
}

impl<S, B, ResB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        match self.shared.decide(&parts) {
            Decided::Now(decision) => match self.shared.conclude(decision, &parts) {
                Concluded::Pass(after) => {
                    ResponseFuture::called(self.inner.call(Request::from_parts(parts, body)), after)
                }
                Concluded::Refuse(res) => ResponseFuture::answered(res),
            },
            Decided::Later(decision) => {
                // The service that was made ready goes with the request; a clone stays.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::deciding(decision, Arc::clone(&self.shared), parts, body, inner)
            }
        }
    }
}

// === impl Shared ===

impl Shared {
    fn new(config: &Config) -> Self {
        let mut keys: Vec<Key> = Vec::new();
        let mut limits = Vec::with_capacity(config.limits.len());
        for limit in &config.limits {
            let key = limit.key.as_ref().unwrap_or(&config.key);
            let index = match keys.iter().position(|k| k.same_as(key)) {
                Some(i) => i,
                None => {
                    keys.push(key.clone());
                    keys.len() - 1
                }
            };
            let counters = config
                .metrics
                .as_ref()
                .map(|(m, route)| Counters::new(m, route, &limit.name));
            let gauge = counters.as_ref().map(|c| c.keys.clone());
            let state = match limit.kind {
                #[cfg(feature = "redis")]
                Kind::Rate(quota) if config.distributed.is_some() => State::Remote(Arc::new(
                    RemoteRate::new(Arc::clone(&limit.name), quota, config.max_keys),
                )),
                Kind::Rate(quota) => State::Rate(LocalRate::new(
                    quota,
                    config.max_keys,
                    config.when_full,
                    gauge,
                )),
                Kind::Concurrent(max) => State::Concurrent(Arc::new(InFlight::new(
                    max,
                    config.max_keys,
                    config.when_full,
                    gauge,
                ))),
            };
            limits.push(Armed {
                name: Arc::clone(&limit.name),
                key: index,
                state,
                counters,
            });
        }
        let policies = Policies::new(
            config.headers,
            config.limits.iter().map(|limit| match limit.kind {
                Kind::Rate(quota) => Described::Rate {
                    name: &limit.name,
                    requests: quota.requests(),
                    period: quota.period(),
                },
                Kind::Concurrent(max) => Described::Concurrent {
                    name: &limit.name,
                    max,
                },
            }),
        );
        #[cfg(feature = "redis")]
        let remote = config.distributed.as_ref().map(|d| {
            let metrics = config.metrics.as_ref().map(|(m, route)| (m, route));
            Arc::new(Remote::new(d, metrics))
        });
        let shared = Self {
            limits: limits.into(),
            keys: keys.into(),
            hasher: RandomState::new(),
            cost: config.cost.clone(),
            shadow: config.shadow,
            policies,
            #[cfg(feature = "redis")]
            remote,
        };
        #[cfg(feature = "redis")]
        if let Some(remote) = &shared.remote {
            remote.reconcile(shared.remote_rates());
        }
        shared
    }

    /// The limits kept in Redis, for the task that gives leases back.
    #[cfg(feature = "redis")]
    fn remote_rates(&self) -> Vec<std::sync::Weak<RemoteRate>> {
        self.limits
            .iter()
            .filter_map(|l| match &l.state {
                State::Remote(rate) => Some(Arc::downgrade(rate)),
                _ => None,
            })
            .collect()
    }

    /// Checks `req` against every limit; takes from them only when all have room. Limits
    /// kept in Redis may need a round trip: then the decision comes later.
    pub(crate) fn decide(self: &Arc<Self>, req: &request::Parts) -> Decided {
        let mut hashes = [0_u64; MAX_LIMITS];
        for (key, hash) in self.keys.iter().zip(hashes.iter_mut()) {
            let mut sink = Hashed(self.hasher.build_hasher());
            key.feed(req, &mut sink);
            *hash = sink.0.finish();
        }
        let mut decision = Decision {
            readings: [None; MAX_LIMITS],
            permits: Vec::new(),
            refusal: None,
            failed_open: false,
        };
        // Every limit judges the request (so the headers can report them all); when one
        // refuses, what the others took is given back.
        for (i, limit) in self.limits.iter().enumerate() {
            let State::Concurrent(in_flight) = &limit.state else {
                continue;
            };
            match in_flight.acquire(hashes[limit.key]) {
                Ok((permit, left)) => {
                    decision.permits.push(permit);
                    decision.readings[i] = Some(Reading::new(u64::from(left), None));
                }
                Err(busy) => {
                    decision.readings[i] = Some(Reading::new(0, None));
                    decision.refuse(Refusal {
                        limit: i,
                        retry_after: Some(Duration::from_secs(1)),
                        why: match busy {
                            Busy::Full => "limited",
                            Busy::Shed => "shed",
                        },
                    });
                }
            }
        }
        let cost = match &self.cost {
            Cost::Fixed(n) => *n,
            Cost::Fn(f) => f(req),
        };
        let Some(cost) = NonZeroU32::new(cost) else {
            decision.settle();
            return Decided::Now(decision);
        };
        #[cfg(feature = "redis")]
        if self.remote.is_some() {
            return self.decide_remote(req, &hashes, cost, decision);
        }
        self.decide_local(&hashes, cost, &mut decision);
        Decided::Now(decision)
    }

    /// The rate limits kept here.
    fn decide_local(&self, hashes: &[u64; MAX_LIMITS], cost: NonZeroU32, decision: &mut Decision) {
        let mut taken = [None; MAX_LIMITS];
        for (i, limit) in self.limits.iter().enumerate() {
            let State::Rate(rate) = &limit.state else {
                continue;
            };
            let refusal = |retry_after, why| Refusal {
                limit: i,
                retry_after,
                why,
            };
            match rate.check(hashes[limit.key], cost) {
                outcome @ RateOutcome::Allowed {
                    remaining,
                    reset,
                    overflow,
                } => {
                    if overflow && let Some(c) = &limit.counters {
                        c.shared.inc();
                    }
                    taken[i] = Some(outcome);
                    decision.readings[i] = Some(Reading::new(u64::from(remaining), Some(reset)));
                }
                RateOutcome::Refused { wait, reset } => {
                    decision.readings[i] = Some(Reading::new(0, Some(reset)));
                    decision.refuse(refusal(Some(wait), "limited"));
                }
                RateOutcome::Never => {
                    decision.readings[i] = Some(Reading::new(0, None));
                    decision.refuse(refusal(None, "over_burst"));
                }
                RateOutcome::Shed => {
                    decision.readings[i] = Some(Reading::new(0, None));
                    decision.refuse(refusal(Some(Duration::from_secs(1)), "shed"));
                }
            }
        }
        if decision.refusal.is_some() {
            // NOTE: nothing is taken from a limit when another refuses: what the others
            // took is given back, and their readings say so.
            for (i, limit) in self.limits.iter().enumerate() {
                if let (State::Rate(rate), Some(outcome)) = (&limit.state, taken[i]) {
                    rate.refund(hashes[limit.key], cost, outcome);
                    if let Some(r) = &mut decision.readings[i] {
                        let burst = u64::from(rate.quota().burst_size());
                        *r = Reading::new(
                            (r.remaining() + u64::from(cost.get())).min(burst),
                            r.reset(),
                        );
                    }
                }
            }
        }
        decision.settle();
    }

    /// The rate limits kept in Redis: leases and remembered refusals answer at once; the
    /// rest asks Redis.
    #[cfg(feature = "redis")]
    fn decide_remote(
        self: &Arc<Self>,
        req: &request::Parts,
        hashes: &[u64; MAX_LIMITS],
        cost: NonZeroU32,
        mut decision: Decision,
    ) -> Decided {
        let Some(remote) = &self.remote else {
            return Decided::Now(decision);
        };
        if remote.batched() && !remote.reconciling() {
            // Started when the layer was built, unless that was outside a runtime.
            remote.reconcile(self.remote_rates());
        }
        let now = remote.now();
        let mut asks = Vec::new();
        let mut spent = Vec::new();
        for (i, limit) in self.limits.iter().enumerate() {
            let State::Remote(rate) = &limit.state else {
                continue;
            };
            let cell = rate.cell(hashes[limit.key], now);
            if let Some(cell) = &cell {
                if let Some((wait, reading)) = cell.refused(now) {
                    decision.readings[i] = Some(reading);
                    decision.refuse(Refusal {
                        limit: i,
                        retry_after: Some(wait),
                        why: "limited",
                    });
                    continue;
                }
                if remote.batched()
                    && let Some(reading) = cell.spend(cost.get(), now)
                {
                    decision.readings[i] = Some(reading);
                    spent.push(Arc::clone(cell));
                    continue;
                }
            }
            let key = &self.keys[limit.key];
            let make = || remote.redis_key(rate, &digest(key, req));
            let redis_key = match &cell {
                Some(cell) => cell.redis_key(make),
                None => make(),
            };
            asks.push(Ask {
                limit: i,
                rate: Arc::clone(rate),
                cell,
                key: redis_key,
            });
        }
        if decision.refusal.is_some() || asks.is_empty() {
            if decision.refusal.is_some() {
                for cell in &spent {
                    cell.unspend(cost.get());
                }
                // Refused without asking: the others report what Redis last said.
                for ask in &asks {
                    if let Some(cell) = &ask.cell {
                        decision.readings[ask.limit] = cell.last_reading(now);
                    }
                }
            }
            decision.settle();
            return Decided::Now(decision);
        }
        let shared = Arc::clone(self);
        Decided::Later(Box::pin(async move {
            shared.ask_redis(decision, asks, spent, cost.get()).await
        }))
    }

    /// Asks Redis for what `asks` need: one call for all of them (all or nothing), or
    /// with leases, a lease per limit that has none.
    #[cfg(feature = "redis")]
    async fn ask_redis(
        self: Arc<Self>,
        mut decision: Decision,
        asks: Vec<Ask>,
        mut spent: Vec<Arc<super::remote::Cell>>,
        cost: u32,
    ) -> Decision {
        let Some(remote) = &self.remote else {
            return decision;
        };
        let mut failed = None;
        if remote.batched() {
            for ask in &asks {
                let now = remote.now();
                let Some(cell) = &ask.cell else {
                    // A key past the cap is asked each time, without a lease.
                    match remote.take(&[(&ask.rate, &ask.key, 0)], cost, cost).await {
                        Ok(taken) => self.record(&mut decision, ask, &taken, cost, now),
                        Err(e) => failed = Some(e),
                    }
                    continue;
                };
                let _fetching = cell.fetching().await;
                let now = remote.now();
                if let Some(reading) = cell.spend(cost, now) {
                    // Another request of this key fetched a lease meanwhile.
                    decision.readings[ask.limit] = Some(reading);
                    spent.push(Arc::clone(cell));
                    continue;
                }
                if let Some((wait, reading)) = cell.refused(now) {
                    decision.readings[ask.limit] = Some(reading);
                    decision.refuse(Refusal {
                        limit: ask.limit,
                        retry_after: Some(wait),
                        why: "limited",
                    });
                    continue;
                }
                let back = cell.take_expired(now);
                let want = remote.lease().max(cost);
                match remote
                    .take(&[(&ask.rate, &ask.key, back)], cost, want)
                    .await
                {
                    Ok(taken) => {
                        if let Taken::Taken { .. } = taken {
                            spent.push(Arc::clone(cell));
                        }
                        self.record(&mut decision, ask, &taken, cost, now);
                    }
                    Err(e) => {
                        // The expired lease's tokens go back with a later call.
                        cell.unspend(back);
                        failed = Some(e);
                    }
                }
            }
        } else {
            let keys: Vec<_> = asks.iter().map(|a| (&*a.rate, &*a.key, 0)).collect();
            let now = remote.now();
            match remote.take(&keys, cost, cost).await {
                Ok(Taken::Taken { answers, .. }) => {
                    for (ask, answer) in asks.iter().zip(answers) {
                        if let Some(cell) = &ask.cell {
                            cell.observed(answer, now);
                        }
                        decision.readings[ask.limit] =
                            Some(Reading::new(answer.remaining, Some(answer.reset)));
                    }
                }
                Ok(Taken::Refused { answers }) => {
                    for (ask, answer) in asks.iter().zip(answers) {
                        let short = answer.remaining < u64::from(cost);
                        self.refused(&mut decision, ask, answer, short, now);
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            tracing::debug!(error = %e, "rate limit not checked: redis unavailable");
            match remote.on_error() {
                OnError::Allow => decision.failed_open = true,
                OnError::Deny => decision.refuse(Refusal {
                    limit: asks[0].limit,
                    retry_after: Some(Duration::from_secs(1)),
                    why: "unavailable",
                }),
            }
        }
        if decision.refusal.is_some() {
            for cell in &spent {
                cell.unspend(cost);
            }
        }
        decision.settle();
        decision
    }

    /// Records what Redis said about one limit's lease (or one request, past the cap).
    #[cfg(feature = "redis")]
    fn record(&self, decision: &mut Decision, ask: &Ask, taken: &Taken, cost: u32, now: u64) {
        let Some(remote) = &self.remote else {
            return;
        };
        match taken {
            Taken::Taken { units, answers } => {
                let Some(answer) = answers.first() else {
                    return;
                };
                let reading = match &ask.cell {
                    Some(cell) => cell.leased(
                        units.saturating_sub(cost),
                        remote.lease_until(now),
                        *answer,
                        now,
                    ),
                    None => Reading::new(answer.remaining, Some(answer.reset)),
                };
                decision.readings[ask.limit] = Some(reading);
            }
            Taken::Refused { answers } => {
                if let Some(answer) = answers.first() {
                    self.refused(decision, ask, *answer, true, now);
                }
            }
        }
    }

    /// Records one limit's answer in a refused call: refused by it when it is `short`.
    #[cfg(feature = "redis")]
    fn refused(&self, decision: &mut Decision, ask: &Ask, answer: Answer, short: bool, now: u64) {
        let Some(remote) = &self.remote else {
            return;
        };
        decision.readings[ask.limit] = Some(Reading::new(answer.remaining, Some(answer.reset)));
        if !short {
            if let Some(cell) = &ask.cell {
                cell.observed(answer, now);
            }
            return;
        }
        if let Some(cell) = &ask.cell {
            cell.refused_for(answer, remote.remember_at_most(), now);
        }
        decision.refuse(Refusal {
            limit: ask.limit,
            retry_after: Some(answer.wait),
            why: "limited",
        });
    }

    /// Counts and logs `decision`; the answer when it refuses `req`, else what the response
    /// gets on its way out.
    pub(crate) fn conclude(
        self: &Arc<Self>,
        decision: Decision,
        req: &request::Parts,
    ) -> Concluded {
        let log = req.extensions.get::<LogFields>();
        let Some(refusal) = decision.refusal else {
            for (limit, reading) in self.limits.iter().zip(&decision.readings) {
                if let Some(c) = &limit.counters {
                    match reading {
                        Some(_) => c.allowed.inc(),
                        None if decision.failed_open && limit.is_remote() => c.failed_open.inc(),
                        None => 0,
                    };
                }
            }
            if let Some(log) = log {
                let said = if decision.failed_open {
                    "failed_open"
                } else {
                    "allowed"
                };
                log.insert("rate_limit", said);
            }
            return Concluded::Pass(After::new(Arc::clone(self), decision));
        };
        if refusal.why == "unavailable" {
            for limit in self.limits.iter().filter(|l| l.is_remote()) {
                if let Some(c) = &limit.counters {
                    c.failed_closed.inc();
                }
            }
            if let Some(log) = log {
                log.insert("rate_limit", "failed_closed");
            }
            let err =
                Error::new(ErrorKind::RateLimitUnavailable).retry_after(Duration::from_secs(1));
            return Concluded::Refuse(err.to_response());
        }
        let limit = &self.limits[refusal.limit];
        let shadow = self.shadow;
        if let Some(c) = &limit.counters {
            if shadow {
                c.shadow_limited.inc();
            } else {
                c.limited.inc();
            }
            if refusal.why == "shed" {
                c.shed.inc();
            }
        }
        if let Some(log) = log {
            log.insert(
                "rate_limit",
                if shadow { "shadow_limited" } else { "limited" },
            );
            log.insert("rate_limit_policy", Arc::clone(&limit.name));
        }
        if refusal.why == "over_burst" {
            tracing::warn!(
                limit = &*limit.name,
                path = req.uri.path(),
                "a request costs more than the limit's burst: it can never pass"
            );
        } else {
            tracing::debug!(
                limit = &*limit.name,
                why = refusal.why,
                shadow,
                path = req.uri.path(),
                "rate limited"
            );
        }
        if shadow {
            return Concluded::Pass(After::new(Arc::clone(self), decision));
        }
        let mut err = Error::new(ErrorKind::TooManyRequests);
        if let Some(after) = refusal.retry_after {
            err = err.retry_after(after.max(Duration::from_millis(1)));
        }
        let mut res = err.to_response();
        self.policies.write(&decision.readings, res.headers_mut());
        Concluded::Refuse(res)
    }

    pub(crate) const fn policies(&self) -> &Policies {
        &self.policies
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field(
                "limits",
                &self.limits.iter().map(|l| &*l.name).collect::<Vec<_>>(),
            )
            .field("keys", &self.keys)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

// === impl Hashed ===

impl<H: Hasher> Sink for Hashed<H> {
    fn part(&mut self, tag: u8, bytes: &[u8]) {
        self.0.write_u8(tag);
        self.0.write_usize(bytes.len());
        self.0.write(bytes);
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    route: RouteId,
    limit: String,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    route: RouteId,
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverflowLabels {
    route: RouteId,
    limit: String,
    action: &'static str,
}

/// The series of one limit, made when its layer is.
struct Counters {
    allowed: Counter,
    limited: Counter,
    shadow_limited: Counter,
    failed_open: Counter,
    failed_closed: Counter,
    shed: Counter,
    shared: Counter,
    keys: Gauge,
}

impl Counters {
    fn new(metrics: &Metrics, route: &RouteId, limit: &str) -> Self {
        let decisions: Family<DecisionLabels, Counter> = metrics.family(
            "rate_limit_decisions",
            "Requests a rate limit judged, by limit and decision (allowed, limited, shadow_limited, failed_open, failed_closed).",
        );
        let keys: Family<KeyLabels, Gauge> = metrics.family(
            "rate_limit_keys",
            "Keys a limit holds now (buckets, or keys with requests in flight).",
        );
        let overflow: Family<OverflowLabels, Counter> = metrics.family(
            "rate_limit_overflow",
            "Requests with a new key while the limit held as many keys as it may, by what they got (shed, shared).",
        );
        let decision = |decision| {
            decisions
                .get_or_create(&DecisionLabels {
                    route: route.clone(),
                    limit: limit.to_owned(),
                    decision,
                })
                .clone()
        };
        let overflowed = |action| {
            overflow
                .get_or_create(&OverflowLabels {
                    route: route.clone(),
                    limit: limit.to_owned(),
                    action,
                })
                .clone()
        };
        Self {
            allowed: decision("allowed"),
            limited: decision("limited"),
            shadow_limited: decision("shadow_limited"),
            failed_open: decision("failed_open"),
            failed_closed: decision("failed_closed"),
            shed: overflowed("shed"),
            shared: overflowed("shared"),
            keys: keys
                .get_or_create(&KeyLabels {
                    route: route.clone(),
                    limit: limit.to_owned(),
                })
                .clone(),
        }
    }
}
