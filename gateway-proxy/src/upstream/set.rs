//! The upstream: an endpoint set, its balancer and its health settings.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use gateway_core::classify::Class;
use gateway_core::{BoxError, Error, ErrorKind, LogFields, TriedEndpoints};
use http::request;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::discover::Discover;

use super::balance::{Balance, LeastRequest, PeakEwma, PickContext, Random, RoundRobin};
use super::hash::{ConsistentHash, HashKey};
use super::health::HealthCheck;
use super::outlier::OutlierDetection;
use super::{Endpoint, InvalidEndpoint, discover};
use prometheus_client::metrics::histogram::Histogram;

/// A set of endpoints and the balancer that spreads requests over them.
///
/// Cloning is cheap (one `Arc`); clones share endpoints and their state. Background tasks
/// (active health checks, discovery) stop when the last clone is dropped.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    /// The current endpoint set with its prepared balancer, swapped whole on changes.
    current: ArcSwap<Snapshot>,
    outlier: Option<OutlierDetection>,
    all_unhealthy: WhenAllUnhealthy,
    slow_start: Option<Duration>,
    health: Option<Arc<HealthCheck>>,
    /// Serializes ejection decisions so the cap on ejected endpoints holds.
    ejecting: Mutex<()>,
    /// Serializes set changes; holds each endpoint's health-check cancellation.
    checks: Mutex<Vec<(u64, CancellationToken)>>,
    /// Cancelled on drop: stops discovery and every health check.
    tasks: CancellationToken,
    /// Response times of every endpoint (each holds a handle on it).
    latency: Histogram,
}

struct Snapshot {
    endpoints: Vec<Arc<Endpoint>>,
    balancer: Box<dyn Balance>,
}

/// The endpoints of an upstream at one moment (the set may change afterwards).
pub struct Endpoints(Arc<Snapshot>);

type StartDiscovery = Box<dyn FnOnce(Weak<Inner>, CancellationToken) + Send>;

/// Builds an [`Upstream`] with health settings and discovery.
#[must_use]
pub struct UpstreamBuilder {
    endpoints: Vec<Endpoint>,
    balancer: Box<dyn Balance>,
    outlier: Option<OutlierDetection>,
    all_unhealthy: WhenAllUnhealthy,
    slow_start: Option<Duration>,
    health: Option<HealthCheck>,
    discovery: Vec<StartDiscovery>,
}

/// What to do when no endpoint is available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenAllUnhealthy {
    /// Panic mode: ignore health and spread requests over every endpoint (Envoy's choice:
    /// a degraded upstream beats none).
    #[default]
    TryAnyway,
    /// Answer 503 (`NoHealthyUpstream`) without sending.
    Refuse,
}

/// The endpoint chosen for one request; counts the request as in flight until dropped.
///
/// [`ReverseProxy`](crate::ReverseProxy) keeps it with the response body, so a request is
/// in flight until its response has streamed to the end (or failed, or was dropped).
pub struct Selected {
    endpoint: Arc<Endpoint>,
    started: Instant,
    /// The upstream, kept only when it has outlier detection to apply on `record`.
    upstream: Option<Arc<Inner>>,
    /// The request's access-log fields, when it has them.
    log: Option<LogFields>,
}

// === impl Upstream ===

impl Upstream {
    /// An upstream over `endpoints`, balanced by `balancer`, without health checks.
    pub fn new(endpoints: impl IntoIterator<Item = Endpoint>, balancer: impl Balance) -> Self {
        Self::builder(endpoints, balancer).build()
    }

    /// Starts an upstream with health settings or discovery.
    pub fn builder(
        endpoints: impl IntoIterator<Item = Endpoint>,
        balancer: impl Balance,
    ) -> UpstreamBuilder {
        UpstreamBuilder {
            endpoints: endpoints.into_iter().collect(),
            balancer: Box::new(balancer),
            outlier: None,
            all_unhealthy: WhenAllUnhealthy::default(),
            slow_start: None,
            health: None,
            discovery: Vec::new(),
        }
    }
    /// Smooth weighted round robin over `targets` (see [`Endpoint`]'s `FromStr` for the
    /// accepted forms; all weights 1).
    ///
    /// # Errors
    ///
    /// The first target that does not parse.
    pub fn round_robin<I>(targets: I) -> Result<Self, InvalidEndpoint>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Ok(Self::new(parse(targets)?, RoundRobin::default()))
    }

    /// Least request (power of two choices by requests in flight) over `targets`.
    ///
    /// # Errors
    ///
    /// The first target that does not parse.
    pub fn least_request<I>(targets: I) -> Result<Self, InvalidEndpoint>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Ok(Self::new(parse(targets)?, LeastRequest::default()))
    }

    /// Peak-EWMA (power of two choices by response time × load) over `targets`.
    ///
    /// # Errors
    ///
    /// The first target that does not parse.
    pub fn peak_ewma<I>(targets: I) -> Result<Self, InvalidEndpoint>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Ok(Self::new(parse(targets)?, PeakEwma::default()))
    }

    /// Random choice over `targets`.
    ///
    /// # Errors
    ///
    /// The first target that does not parse.
    pub fn random<I>(targets: I) -> Result<Self, InvalidEndpoint>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Ok(Self::new(parse(targets)?, Random::default()))
    }

    /// Consistent hashing (Maglev) on `key` over `targets`.
    ///
    /// # Errors
    ///
    /// The first target that does not parse.
    pub fn consistent_hash<I>(key: HashKey, targets: I) -> Result<Self, InvalidEndpoint>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Ok(Self::new(parse(targets)?, ConsistentHash::new(key)))
    }

    /// A single endpoint.
    ///
    /// # Errors
    ///
    /// When `target` does not parse.
    pub fn single(target: &str) -> Result<Self, InvalidEndpoint> {
        Self::round_robin([target])
    }

    /// The response times of its endpoints (to the response head), in seconds.
    pub(crate) fn latency(&self) -> &Histogram {
        &self.inner.latency
    }

    /// The current endpoints, for observation.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints(self.inner.current.load_full())
    }

    /// Picks the endpoint for `req`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NoHealthyUpstream`] when the set is empty or the balancer finds no
    /// endpoint.
    pub fn select(&self, req: &request::Parts) -> Result<Selected, Error> {
        let inner = &*self.inner;
        let snapshot = inner.current.load();
        let endpoints = snapshot.endpoints.as_slice();
        if endpoints.is_empty() {
            return Err(Error::new(ErrorKind::NoHealthyUpstream));
        }
        let now = Instant::now();
        let mut tried = req
            .extensions
            .get::<TriedEndpoints>()
            .map(TriedEndpoints::lock);
        let (tried_ids, barred) = tried
            .as_deref()
            .map_or((&[][..], &[][..]), |t| (t.ids(), t.barred()));
        let both;
        let excluded = match (tried_ids.is_empty(), barred.is_empty()) {
            (_, true) => tried_ids,
            (true, false) => barred,
            (false, false) => {
                both = [tried_ids, barred].concat();
                &both[..]
            }
        };
        let attempt = |excluded: &[u64], ignore_health: bool| {
            snapshot.balancer.pick(
                endpoints,
                &PickContext::at(req, excluded, now, ignore_health, inner.slow_start),
            )
        };
        // Relax constraints one at a time: first an endpoint tried before (all were), then,
        // in panic mode, an unavailable one. A barred endpoint is never picked.
        let picked = attempt(excluded, false)
            .or_else(|| {
                (!tried_ids.is_empty())
                    .then(|| attempt(barred, false))
                    .flatten()
            })
            .or_else(|| match inner.all_unhealthy {
                WhenAllUnhealthy::TryAnyway => {
                    attempt(excluded, true).or_else(|| attempt(barred, true))
                }
                WhenAllUnhealthy::Refuse => None,
            });
        let Some(endpoint) = picked.and_then(|i| endpoints.get(i)) else {
            return Err(Error::new(if barred.is_empty() {
                ErrorKind::NoHealthyUpstream
            } else {
                ErrorKind::CircuitOpen
            }));
        };
        if let Some(tried) = tried.as_mut() {
            tried.push(endpoint.id(), Some(endpoint.authority().clone()));
        }
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        // The request's span, when it has one, names the endpoint.
        if let Some(span) = req.extensions.get::<tracing::Span>() {
            span.record("upstream", tracing::field::display(endpoint.authority()));
        }
        Ok(Selected {
            endpoint: Arc::clone(endpoint),
            started: now,
            upstream: inner.outlier.is_some().then(|| Arc::clone(&self.inner)),
            log: req.extensions.get::<LogFields>().cloned(),
        })
    }
}

// === impl Inner ===

impl Inner {
    /// Removes the endpoints whose ids are in `removed` and adds `added`, keeping every
    /// other endpoint (and its state) as it is; the balancer is prepared for the new set
    /// and swapped in with it. Requests in flight keep their endpoint.
    pub(super) fn apply(&self, removed: &[u64], added: Vec<Endpoint>) {
        let mut checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.current.load_full();
        let now = Instant::now();
        // Joining an empty set there is nobody to protect them from: full weight at once.
        let warm_up = self.slow_start.is_some() && !old.endpoints.is_empty();
        let mut endpoints: Vec<Arc<Endpoint>> = old
            .endpoints
            .iter()
            .filter(|e| !removed.contains(&e.id()))
            .cloned()
            .collect();
        let (kept, added_count) = (endpoints.len(), added.len());
        checks.retain(|(id, cancel)| {
            let keep = !removed.contains(id);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        for mut endpoint in added {
            endpoint.latency = Some(self.latency.clone());
            if warm_up {
                endpoint.mark_ready(now);
            }
            let endpoint = Arc::new(endpoint);
            if let Some(check) = &self.health {
                let cancel = self.tasks.child_token();
                check.spawn(Arc::clone(&endpoint), cancel.clone());
                checks.push((endpoint.id(), cancel));
            }
            endpoints.push(endpoint);
        }
        let mut balancer = old.balancer.clone_box();
        balancer.prepare(&endpoints);
        let total = endpoints.len();
        self.current.store(Arc::new(Snapshot {
            endpoints,
            balancer,
        }));
        tracing::debug!(
            added = added_count,
            removed = old.endpoints.len() - kept,
            total,
            "upstream endpoints changed"
        );
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.tasks.cancel();
    }
}

// === impl Endpoints ===

impl Deref for Endpoints {
    type Target = [Arc<Endpoint>];

    fn deref(&self) -> &[Arc<Endpoint>] {
        &self.0.endpoints
    }
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.endpoints.iter()).finish()
    }
}

// === impl UpstreamBuilder ===

impl UpstreamBuilder {
    /// Ejects endpoints that keep failing (passive health checking).
    pub const fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = Some(outlier);
        self
    }

    /// Probes every endpoint in the background (active health checking); endpoints that
    /// fail their checks get no traffic until they pass again.
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.health = Some(check);
        self
    }

    /// Ramps the weight of an endpoint that joins the set, passes its health checks again
    /// or returns from an ejection linearly from 10% to 100% over `window`, so a cold
    /// instance is not flooded. Applies to round robin, random, least request and
    /// peak-EWMA; not to consistent hashing. Endpoints there at the start, or joining an
    /// empty set, start at full weight.
    pub const fn slow_start(mut self, window: Duration) -> Self {
        self.slow_start = if window.is_zero() { None } else { Some(window) };
        self
    }

    /// What to do when no endpoint is available (default: try them anyway).
    pub const fn when_all_unhealthy(mut self, choice: WhenAllUnhealthy) -> Self {
        self.all_unhealthy = choice;
        self
    }

    /// Follows `discover`, a [`tower::discover::Discover`] of endpoints (for example
    /// [`DnsDiscovery`](super::DnsDiscovery)), in a background task: inserted keys add
    /// endpoints and removed keys remove them, while every other endpoint keeps its state.
    /// An insert for a key that is already there with the same address and weight changes
    /// nothing. Discovery errors are logged and the last set is kept.
    ///
    /// The endpoints given to [`Upstream::builder`] are the initial set; discovered ones
    /// come in addition. Call it again to follow several sources (say, one per host name):
    /// each adds and removes only its own endpoints.
    pub fn discover<D>(mut self, discover: D) -> Self
    where
        D: Discover<Service = Endpoint> + Send + 'static,
        D::Key: std::hash::Hash + fmt::Debug + Send,
        D::Error: Into<BoxError> + Send,
    {
        self.discovery.push(Box::new(move |upstream, cancel| {
            discover::spawn(discover, upstream, cancel);
        }));
        self
    }

    /// Builds the upstream and starts its background tasks.
    ///
    /// # Panics
    ///
    /// With health checks or discovery, when called outside a Tokio runtime (like
    /// `tokio::spawn`).
    pub fn build(self) -> Upstream {
        let inner = Arc::new(Inner {
            current: ArcSwap::from_pointee(Snapshot {
                endpoints: Vec::new(),
                balancer: self.balancer,
            }),
            outlier: self.outlier,
            all_unhealthy: self.all_unhealthy,
            slow_start: self.slow_start,
            health: self.health.map(Arc::new),
            ejecting: Mutex::new(()),
            checks: Mutex::new(Vec::new()),
            tasks: CancellationToken::new(),
            latency: super::latency_histogram(),
        });
        if !self.endpoints.is_empty() {
            inner.apply(&[], self.endpoints);
        }
        for start in self.discovery {
            start(Arc::downgrade(&inner), inner.tasks.child_token());
        }
        Upstream { inner }
    }
}

impl fmt::Debug for UpstreamBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBuilder")
            .field("endpoints", &self.endpoints)
            .field("balancer", &self.balancer)
            .field("outlier", &self.outlier)
            .field("slow_start", &self.slow_start)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

fn parse<I>(targets: I) -> Result<Vec<Endpoint>, InvalidEndpoint>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    targets.into_iter().map(|t| t.as_ref().parse()).collect()
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.inner.current.load();
        f.debug_struct("Upstream")
            .field("endpoints", &snapshot.endpoints)
            .field("balancer", &snapshot.balancer)
            .finish_non_exhaustive()
    }
}

// === impl Selected ===

impl Selected {
    /// The chosen endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The start of the request's time on the endpoint: when the endpoint was chosen, or
    /// when the request's body had all been sent, once [`request_sent`](Self::request_sent)
    /// has said so.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Says the request's streamed body was all sent at `at`: the endpoint's time (its
    /// response-time sample) starts then, so that a client's slow upload is not counted as
    /// the upstream's latency.
    pub fn request_sent(&mut self, at: Instant) {
        self.started = self.started.max(at);
    }

    /// Records the request's outcome (as judged by [`gateway_core::classify`]) and, as a
    /// response-time sample, the time since [`started`](Self::started).
    ///
    /// An outcome of [`Class::Client`] (the client's side broke the exchange) says
    /// nothing about the endpoint and is not recorded at all: neither as a failure for
    /// outlier detection nor as a response time for the balancer.
    pub fn record(&self, class: Class) {
        self.endpoint.count(class);
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started);
        if let Some(log) = &self.log {
            log.set_upstream(self.endpoint.authority(), rtt);
        }
        if !class.is_upstream() {
            return;
        }
        self.endpoint.observe_rtt(rtt, now);
        if let Some(latency) = &self.endpoint.latency {
            latency.observe(rtt.as_secs_f64());
        }
        if !class.is_failure() {
            self.endpoint.failures.store(0, Ordering::Relaxed);
            return;
        }
        let failures = self.endpoint.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(upstream) = &self.upstream
            && let Some(outlier) = &upstream.outlier
            && outlier.is_due(failures)
        {
            let _decision = upstream
                .ejecting
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            outlier.maybe_eject(&self.endpoint, &upstream.current.load().endpoints, now);
        }
    }
}

impl fmt::Debug for Selected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selected")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Drop for Selected {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> request::Parts {
        http::Request::new(()).into_parts().0
    }

    #[test]
    fn round_robin_cycles_and_counts_in_flight() {
        let up = Upstream::round_robin(["a:1", "b:2", "c:3"]).unwrap();
        let picks: Vec<String> = (0..6)
            .map(|_| up.select(&parts()).unwrap().endpoint().to_string())
            .collect();
        assert_eq!(
            picks,
            [
                "http://a:1",
                "http://b:2",
                "http://c:3",
                "http://a:1",
                "http://b:2",
                "http://c:3"
            ]
        );
        let held = up.select(&parts()).unwrap();
        assert_eq!(held.endpoint().in_flight(), 1);
        drop(held);
        assert!(up.endpoints().iter().all(|e| e.in_flight() == 0));
    }

    #[test]
    fn empty_upstream_is_unavailable() {
        let up = Upstream::new(Vec::new(), RoundRobin::default());
        let err = up.select(&parts()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoHealthyUpstream);
    }

    #[test]
    fn outcomes_track_consecutive_failures() {
        let up = Upstream::single("a:1").unwrap();
        let s = up.select(&parts()).unwrap();
        s.record(Class::Retryable);
        s.record(Class::Failure);
        assert_eq!(s.endpoint().consecutive_failures(), 2);
        s.record(Class::Success);
        assert_eq!(s.endpoint().consecutive_failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn client_caused_outcomes_say_nothing_about_the_endpoint() {
        let up = Upstream::single("a:1").unwrap();
        let s = up.select(&parts()).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        s.record(Class::Failure);
        let slow = up.select(&parts()).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        let before = s.endpoint().rtt_estimate(now);
        for _ in 0..10 {
            slow.record(Class::Client);
        }
        // Neither failures, nor a success that resets the count, nor a 1 s sample.
        assert_eq!(s.endpoint().consecutive_failures(), 1);
        assert_eq!(s.endpoint().rtt_estimate(now), before);
        // An outcome of the upstream's is recorded (the test can fail).
        slow.record(Class::Success);
        assert_eq!(s.endpoint().consecutive_failures(), 0);
        assert_ne!(s.endpoint().rtt_estimate(now), before);
    }

    fn outlier_upstream(n: usize, outlier: OutlierDetection, all: WhenAllUnhealthy) -> Upstream {
        let eps = (0..n).map(|i| format!("e{i}:80").parse::<Endpoint>().unwrap());
        Upstream::builder(eps, RoundRobin::default())
            .outlier_detection(outlier)
            .when_all_unhealthy(all)
            .build()
    }

    /// Sends `rounds` requests; those to endpoints in `failing` fail.
    fn drive(up: &Upstream, failing: &[&str], rounds: usize) -> Vec<String> {
        (0..rounds)
            .map(|_| {
                let s = up.select(&parts()).unwrap();
                let name = s.endpoint().to_string();
                let class = if failing.iter().any(|f| name.contains(f)) {
                    Class::Retryable
                } else {
                    Class::Success
                };
                s.record(class);
                name
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_longer_each_time() {
        let outlier = OutlierDetection::new(3)
            .base_ejection(Duration::from_secs(10))
            .max_ejection(Duration::from_secs(100))
            .max_ejected_percent(100);
        let up = outlier_upstream(3, outlier, WhenAllUnhealthy::TryAnyway);
        let e0 = Arc::clone(&up.endpoints()[0]);
        // Round robin: e0 gets every third request; its third failure ejects it.
        drive(&up, &["e0"], 9);
        assert!(e0.is_ejected(Instant::now()));
        assert_eq!(e0.ejections(), 1);
        assert!(
            drive(&up, &[], 30).iter().all(|n| !n.contains("e0")),
            "ejected: no traffic"
        );

        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            !e0.is_ejected(Instant::now()),
            "first ejection lasts the base time"
        );
        drive(&up, &["e0"], 9);
        assert_eq!(e0.ejections(), 2);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(
            e0.is_ejected(Instant::now()),
            "second ejection is longer than the first"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!e0.is_ejected(Instant::now()));
        assert!(
            drive(&up, &[], 30).iter().any(|n| n.contains("e0")),
            "back in rotation"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ejected_share_is_capped() {
        let outlier = OutlierDetection::new(1).max_ejected_percent(25);
        let up = outlier_upstream(4, outlier, WhenAllUnhealthy::TryAnyway);
        drive(&up, &["e0", "e1", "e2"], 40);
        let now = Instant::now();
        let ejected = up.endpoints().iter().filter(|e| e.is_ejected(now)).count();
        assert_eq!(ejected, 1, "25% of 4 endpoints");
        // Even 0% lets one endpoint go.
        let up = outlier_upstream(
            4,
            OutlierDetection::new(1).max_ejected_percent(0),
            WhenAllUnhealthy::TryAnyway,
        );
        drive(&up, &["e0", "e1"], 20);
        assert_eq!(
            up.endpoints().iter().filter(|e| e.is_ejected(now)).count(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn all_unhealthy_tries_anyway_or_refuses_as_configured() {
        let outlier = OutlierDetection::new(1).max_ejected_percent(100);
        let anyway = outlier_upstream(2, outlier, WhenAllUnhealthy::TryAnyway);
        drive(&anyway, &["e0", "e1"], 4);
        let now = Instant::now();
        assert!(anyway.endpoints().iter().all(|e| e.is_ejected(now)));
        assert!(anyway.select(&parts()).is_ok(), "panic mode sends anyway");

        let refuse = outlier_upstream(2, outlier, WhenAllUnhealthy::Refuse);
        drive(&refuse, &["e0", "e1"], 2);
        let err = refuse.select(&parts()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoHealthyUpstream);
    }

    #[test]
    fn retries_get_endpoints_not_tried_yet_then_any() {
        for up in every_balancer(&["a:1", "b:2", "c:3"]) {
            let mut parts = parts();
            let tried = TriedEndpoints::new();
            parts.extensions.insert(tried.clone());
            let mut seen: Vec<String> = (0..3)
                .map(|_| up.select(&parts).unwrap().endpoint().to_string())
                .collect();
            seen.sort();
            assert_eq!(seen, ["http://a:1", "http://b:2", "http://c:3"], "{up:?}");
            assert_eq!(tried.len(), 3);
            // Everything tried: the exclusion is lifted rather than failing.
            assert!(up.select(&parts).is_ok());
        }
    }

    #[test]
    fn barred_endpoints_are_never_picked() {
        for up in every_balancer(&["a:1", "b:2", "c:3"]) {
            let ids: Vec<u64> = up.endpoints().iter().map(|e| e.id()).collect();
            let mut parts = parts();
            let tried = TriedEndpoints::new();
            parts.extensions.insert(tried.clone());
            tried.lock().bar([ids[0], ids[2]]);
            for _ in 0..6 {
                let picked = up.select(&parts).unwrap();
                assert_eq!(picked.endpoint().id(), ids[1], "{up:?}");
                let (id, authority) = tried
                    .lock()
                    .since(0)
                    .last()
                    .map(|(id, a)| (id, a.cloned()))
                    .unwrap();
                assert_eq!((id, authority.unwrap().as_str()), (ids[1], "b:2"));
            }
            // b was tried (every time): the exclusion of tried ones is lifted, not the bar.
            tried.lock().bar(ids.iter().copied());
            let err = up.select(&parts).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::CircuitOpen, "{up:?}");
        }
    }

    fn every_balancer(targets: &[&str]) -> Vec<Upstream> {
        vec![
            Upstream::round_robin(targets).unwrap(),
            Upstream::least_request(targets).unwrap(),
            Upstream::peak_ewma(targets).unwrap(),
            Upstream::random(targets).unwrap(),
            Upstream::consistent_hash(HashKey::Path, targets).unwrap(),
        ]
    }

    #[test]
    fn set_changes_keep_the_endpoints_that_stay() {
        for up in every_balancer(&["a:1", "b:2"]) {
            let a = Arc::clone(&up.endpoints()[0]);
            let b_id = up.endpoints()[1].id();
            a.observe_rtt(Duration::from_millis(7), Instant::now());
            let held = up.select(&parts()).unwrap();
            let held_id = held.endpoint().id();

            up.inner
                .apply(&[b_id], vec!["c:3".parse::<Endpoint>().unwrap()]);
            let now: Vec<String> = up.endpoints().iter().map(|e| e.to_string()).collect();
            assert_eq!(now, ["http://a:1", "http://c:3"], "{up:?}");
            assert!(
                Arc::ptr_eq(&up.endpoints()[0], &a),
                "a stays the same endpoint"
            );
            assert!(
                a.rtt_estimate(Instant::now()).is_some(),
                "and keeps its EWMA"
            );
            for _ in 0..50 {
                assert_ne!(up.select(&parts()).unwrap().endpoint().id(), b_id, "{up:?}");
            }
            // The request in flight finishes on its endpoint, gone or not.
            assert_eq!(held.endpoint().id(), held_id);
            assert_eq!(held.endpoint().in_flight(), 1);
            drop(held);

            // Down to nothing and back (Maglev over an empty set must not spin).
            let all: Vec<u64> = up.endpoints().iter().map(|e| e.id()).collect();
            up.inner.apply(&all, Vec::new());
            let err = up.select(&parts()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NoHealthyUpstream);
            up.inner
                .apply(&[], vec!["d:4".parse::<Endpoint>().unwrap()]);
            assert_eq!(
                up.select(&parts()).unwrap().endpoint().to_string(),
                "http://d:4"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_new_endpoint_up() {
        let window = Duration::from_secs(10);
        let eps = ["a:1", "b:2"].map(|t| t.parse::<Endpoint>().unwrap());
        let up = Upstream::builder(eps, RoundRobin::default())
            .slow_start(window)
            .build();
        up.inner
            .apply(&[], vec!["new:3".parse::<Endpoint>().unwrap()]);
        let share_of_new = |up: &Upstream| {
            let picks = 10_000;
            let new = (0..picks)
                .filter(|_| up.select(&parts()).unwrap().endpoint().to_string() == "http://new:3")
                .count();
            new as f64 / picks as f64
        };
        // Weight shares: 0.1 / 2.1 at first, 0.5 / 2.5 half-way, 1 / 3 after the window.
        let at_start = share_of_new(&up);
        assert!((0.02..0.08).contains(&at_start), "{at_start}");
        tokio::time::advance(window / 2).await;
        let half_way = share_of_new(&up);
        assert!((0.15..0.25).contains(&half_way), "{half_way}");
        tokio::time::advance(window / 2).await;
        let after = share_of_new(&up);
        assert!((0.31..0.36).contains(&after), "{after}");
    }
}
