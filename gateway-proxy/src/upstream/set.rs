//! The upstream: an endpoint set and its balancer.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gateway_core::classify::Class;
use gateway_core::{Error, ErrorKind};
use http::request;
use tokio::time::Instant;

use super::balance::{Balance, LeastRequest, PeakEwma, PickContext, Random, RoundRobin};
use super::hash::{ConsistentHash, HashKey};
use super::{Endpoint, InvalidEndpoint};

/// A set of endpoints and the balancer that spreads requests over them.
///
/// Cloning is cheap (one `Arc`); clones share endpoints and their state.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<Arc<Endpoint>>,
    balancer: Box<dyn Balance>,
    outlier: Option<OutlierDetection>,
    all_unhealthy: WhenAllUnhealthy,
    /// Serializes ejection decisions so the cap on ejected endpoints holds.
    ejecting: Mutex<()>,
}

/// Builds an [`Upstream`] with health settings.
#[must_use]
pub struct UpstreamBuilder {
    endpoints: Vec<Endpoint>,
    balancer: Box<dyn Balance>,
    outlier: Option<OutlierDetection>,
    all_unhealthy: WhenAllUnhealthy,
}

/// Passive health checking: endpoints whose requests keep failing (as judged by
/// [`gateway_core::classify`]: connect errors, resets, timeouts, 5xx) are ejected for a
/// while.
///
/// An endpoint with `consecutive_failures` failures in a row is ejected for
/// `base_ejection × (number of ejections)`, at most `max_ejection`, so an endpoint that keeps
/// failing stays out longer each time. The count restarts after a healthy spell of
/// `max_ejection`. At most `max_ejected_percent` of the endpoints (but always at least one)
/// are ejected at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    consecutive_failures: usize,
    base_ejection: Duration,
    max_ejection: Duration,
    max_ejected_percent: u8,
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
pub struct Selected {
    endpoint: Arc<Endpoint>,
    started: Instant,
    /// The upstream, kept only when it has outlier detection to apply on `record`.
    upstream: Option<Arc<Inner>>,
}

/// The endpoints already tried for one request, shared by every attempt of it.
///
/// A retry layer inserts one into the request before the first attempt (clones of the
/// request share it); [`Upstream::select`] then skips the endpoints it lists and adds the one
/// it picks. When every endpoint has been tried, the list is ignored.
#[derive(Clone, Debug, Default)]
pub struct TriedEndpoints(Arc<Mutex<Vec<u64>>>);

// === impl Upstream ===

impl Upstream {
    /// An upstream over `endpoints`, balanced by `balancer`, without passive health checks.
    pub fn new(endpoints: impl IntoIterator<Item = Endpoint>, balancer: impl Balance) -> Self {
        Self::builder(endpoints, balancer).build()
    }

    /// Starts an upstream with health settings.
    pub fn builder(
        endpoints: impl IntoIterator<Item = Endpoint>,
        balancer: impl Balance,
    ) -> UpstreamBuilder {
        UpstreamBuilder {
            endpoints: endpoints.into_iter().collect(),
            balancer: Box::new(balancer),
            outlier: None,
            all_unhealthy: WhenAllUnhealthy::default(),
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

    /// The endpoints, for observation.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.inner.endpoints
    }

    /// Picks the endpoint for `req`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NoHealthyUpstream`] when the set is empty or the balancer finds no
    /// endpoint.
    pub fn select(&self, req: &request::Parts) -> Result<Selected, Error> {
        let endpoints = &self.inner.endpoints;
        if endpoints.is_empty() {
            return Err(Error::new(ErrorKind::NoHealthyUpstream));
        }
        let now = Instant::now();
        let tried = req.extensions.get::<TriedEndpoints>();
        let mut ids = tried.map(|t| t.0.lock().unwrap_or_else(PoisonError::into_inner));
        let excluded: &[u64] = ids.as_deref().map_or(&[], |v| v.as_slice());
        let inner = &*self.inner;
        let attempt = |excluded: &[u64], ignore_health: bool| {
            inner.balancer.pick(
                endpoints,
                &PickContext::at(req, excluded, now, ignore_health),
            )
        };
        // Relax constraints one at a time: first an endpoint tried before (all were), then,
        // in panic mode, an unavailable one.
        let picked = attempt(excluded, false)
            .or_else(|| {
                (!excluded.is_empty())
                    .then(|| attempt(&[], false))
                    .flatten()
            })
            .or_else(|| match inner.all_unhealthy {
                WhenAllUnhealthy::TryAnyway => {
                    attempt(excluded, true).or_else(|| attempt(&[], true))
                }
                WhenAllUnhealthy::Refuse => None,
            });
        let endpoint = picked
            .and_then(|i| endpoints.get(i))
            .ok_or(Error::new(ErrorKind::NoHealthyUpstream))?;
        if let Some(ids) = ids.as_mut() {
            ids.push(endpoint.id());
        }
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Selected {
            endpoint: Arc::clone(endpoint),
            started: now,
            upstream: inner.outlier.is_some().then(|| Arc::clone(&self.inner)),
        })
    }
}

// === impl UpstreamBuilder ===

impl UpstreamBuilder {
    /// Ejects endpoints that keep failing.
    pub const fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = Some(outlier);
        self
    }

    /// What to do when no endpoint is available (default: try them anyway).
    pub const fn when_all_unhealthy(mut self, choice: WhenAllUnhealthy) -> Self {
        self.all_unhealthy = choice;
        self
    }

    /// Builds the upstream.
    pub fn build(self) -> Upstream {
        let endpoints: Vec<Arc<Endpoint>> = self.endpoints.into_iter().map(Arc::new).collect();
        let mut balancer = self.balancer;
        balancer.prepare(&endpoints);
        Upstream {
            inner: Arc::new(Inner {
                endpoints,
                balancer,
                outlier: self.outlier,
                all_unhealthy: self.all_unhealthy,
                ejecting: Mutex::new(()),
            }),
        }
    }
}

impl fmt::Debug for UpstreamBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBuilder")
            .field("endpoints", &self.endpoints)
            .field("outlier", &self.outlier)
            .finish_non_exhaustive()
    }
}

// === impl OutlierDetection ===

impl OutlierDetection {
    /// Ejects after `consecutive_failures` failures in a row (at least 1); 30 s base
    /// ejection, 300 s at most, at most 10% of the endpoints (at least one) at once.
    pub const fn new(consecutive_failures: usize) -> Self {
        Self {
            consecutive_failures: if consecutive_failures == 0 {
                1
            } else {
                consecutive_failures
            },
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 10,
        }
    }

    /// The first ejection's length; later ones are multiples of it.
    pub const fn base_ejection(mut self, d: Duration) -> Self {
        self.base_ejection = d;
        self
    }

    /// The longest ejection.
    pub const fn max_ejection(mut self, d: Duration) -> Self {
        self.max_ejection = d;
        self
    }

    /// At most this share of the endpoints is ejected at once (0–100; one endpoint may
    /// always be ejected).
    pub const fn max_ejected_percent(mut self, percent: u8) -> Self {
        self.max_ejected_percent = if percent > 100 { 100 } else { percent };
        self
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self::new(5)
    }
}

// === impl Inner ===

impl Inner {
    fn maybe_eject(&self, endpoint: &Endpoint, outlier: &OutlierDetection, now: Instant) {
        let _decision = self.ejecting.lock().unwrap_or_else(PoisonError::into_inner);
        if endpoint.is_ejected(now)
            || endpoint.failures.load(Ordering::Relaxed) < outlier.consecutive_failures
        {
            return;
        }
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let cap = (self.endpoints.len() * usize::from(outlier.max_ejected_percent) / 100).max(1);
        if ejected >= cap {
            tracing::debug!(%endpoint, ejected, cap, "not ejecting: too many endpoints ejected");
            return;
        }
        if endpoint
            .ejected_until()
            .is_some_and(|until| now.saturating_duration_since(until) >= outlier.max_ejection)
        {
            // A long healthy spell since the last ejection: start counting afresh.
            endpoint.ejections.store(0, Ordering::Relaxed);
        }
        let count = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = outlier
            .base_ejection
            .saturating_mul(count)
            .min(outlier.max_ejection);
        endpoint.eject_until(now + duration);
        endpoint.failures.store(0, Ordering::Relaxed);
        tracing::warn!(%endpoint, ?duration, ejections = count, "ejecting failing endpoint");
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
        f.debug_struct("Upstream")
            .field("endpoints", &self.inner.endpoints)
            .field("balancer", &self.inner.balancer)
            .finish()
    }
}

// === impl Selected ===

impl Selected {
    /// The chosen endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Records the request's outcome (as judged by [`gateway_core::classify`]) and, as a
    /// response-time sample, the time since the endpoint was selected.
    pub fn record(&self, class: Class) {
        let now = Instant::now();
        self.endpoint
            .observe_rtt(now.saturating_duration_since(self.started), now);
        if !class.is_failure() {
            self.endpoint.failures.store(0, Ordering::Relaxed);
            return;
        }
        let failures = self.endpoint.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(upstream) = &self.upstream
            && let Some(outlier) = &upstream.outlier
            && failures >= outlier.consecutive_failures
        {
            upstream.maybe_eject(&self.endpoint, outlier, now);
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

// === impl TriedEndpoints ===

impl TriedEndpoints {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many endpoints were tried.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no endpoint was tried yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        for up in [
            Upstream::round_robin(["a:1", "b:2", "c:3"]).unwrap(),
            Upstream::least_request(["a:1", "b:2", "c:3"]).unwrap(),
            Upstream::peak_ewma(["a:1", "b:2", "c:3"]).unwrap(),
            Upstream::random(["a:1", "b:2", "c:3"]).unwrap(),
            Upstream::consistent_hash(HashKey::Path, ["a:1", "b:2", "c:3"]).unwrap(),
        ] {
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
}
