//! The layer, its service, and the decision about one request.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU32;
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
}

/// What the layer made of one request.
pub(crate) struct Decision {
    pub(crate) readings: [Option<Reading>; MAX_LIMITS],
    pub(crate) permits: Vec<Permit>,
    refusal: Option<Refusal>,
}

#[derive(Clone, Copy, Debug)]
struct Refusal {
    limit: usize,
    retry_after: Option<Duration>,
    why: &'static str,
}

// === impl Decision ===

impl Decision {
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
        })
    }
}

impl<S, B, ResB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let decision = self.shared.decide(&parts);
        match self.shared.conclude(decision, &parts) {
            Concluded::Pass(after) => {
                ResponseFuture::called(self.inner.call(Request::from_parts(parts, body)), after)
            }
            Concluded::Refuse(res) => ResponseFuture::answered(res),
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
        Self {
            limits: limits.into(),
            keys: keys.into(),
            hasher: RandomState::new(),
            cost: config.cost.clone(),
            shadow: config.shadow,
            policies,
        }
    }

    /// Checks `req` against every limit; takes from them only when all have room.
    pub(crate) fn decide(&self, req: &request::Parts) -> Decision {
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
        };
        // Every limit judges the request (so the headers can report them all); when one
        // refuses, what the others took is given back below.
        for (i, limit) in self.limits.iter().enumerate() {
            let State::Concurrent(in_flight) = &limit.state else {
                continue;
            };
            match in_flight.acquire(hashes[limit.key]) {
                Ok((permit, left)) => {
                    decision.permits.push(permit);
                    decision.readings[i] = Some(Reading {
                        remaining: u64::from(left),
                        reset: None,
                    });
                }
                Err(busy) => {
                    decision.readings[i] = Some(Reading::default());
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
            if decision.refusal.is_some() {
                decision.permits.clear();
            }
            return decision;
        };
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
                    decision.readings[i] = Some(Reading {
                        remaining: u64::from(remaining),
                        reset: Some(reset),
                    });
                }
                RateOutcome::Refused { wait, reset } => {
                    decision.readings[i] = Some(Reading {
                        remaining: 0,
                        reset: Some(reset),
                    });
                    decision.refuse(refusal(Some(wait), "limited"));
                }
                RateOutcome::Never => {
                    decision.readings[i] = Some(Reading::default());
                    decision.refuse(refusal(None, "over_burst"));
                }
                RateOutcome::Shed => {
                    decision.readings[i] = Some(Reading::default());
                    decision.refuse(refusal(Some(Duration::from_secs(1)), "shed"));
                }
            }
        }
        if decision.refusal.is_some() {
            // NOTE: nothing is taken from a limit when another refuses: what the ones
            // before took is given back, and their readings say so.
            decision.permits.clear();
            for (i, limit) in self.limits.iter().enumerate() {
                if let (State::Rate(rate), Some(outcome)) = (&limit.state, taken[i]) {
                    rate.refund(hashes[limit.key], cost, outcome);
                    if let Some(r) = &mut decision.readings[i] {
                        let burst = u64::from(rate.quota().burst_size());
                        r.remaining = (r.remaining + u64::from(cost.get())).min(burst);
                    }
                }
            }
        }
        decision
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
                if let (Some(c), Some(_)) = (&limit.counters, reading) {
                    c.allowed.inc();
                }
            }
            if let Some(log) = log {
                log.insert("rate_limit", "allowed");
            }
            return Concluded::Pass(After::new(Arc::clone(self), decision));
        };
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
    shed: Counter,
    shared: Counter,
    keys: Gauge,
}

impl Counters {
    fn new(metrics: &Metrics, route: &RouteId, limit: &str) -> Self {
        let decisions: Family<DecisionLabels, Counter> = metrics.family(
            "rate_limit_decisions",
            "Requests a rate limit judged, by limit and decision (allowed, limited, shadow_limited).",
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
