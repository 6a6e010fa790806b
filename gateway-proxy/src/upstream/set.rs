//! The upstream: an endpoint set and its balancer.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

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
}

/// The endpoint chosen for one request; counts the request as in flight until dropped.
#[derive(Debug)]
pub struct Selected {
    endpoint: Arc<Endpoint>,
    started: Instant,
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
    /// An upstream over `endpoints`, balanced by `balancer`.
    pub fn new(endpoints: impl IntoIterator<Item = Endpoint>, mut balancer: impl Balance) -> Self {
        let endpoints: Vec<Arc<Endpoint>> = endpoints.into_iter().map(Arc::new).collect();
        balancer.prepare(&endpoints);
        Self {
            inner: Arc::new(Inner {
                endpoints,
                balancer: Box::new(balancer),
            }),
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
        let tried = req.extensions.get::<TriedEndpoints>();
        let picked = match tried {
            None => self
                .inner
                .balancer
                .pick(endpoints, &PickContext::new(req, &[])),
            Some(tried) => {
                let mut ids = tried.0.lock().unwrap_or_else(PoisonError::into_inner);
                let all_tried = endpoints.iter().all(|e| ids.contains(&e.id()));
                let excluded: &[u64] = if all_tried { &[] } else { &ids };
                let picked = self
                    .inner
                    .balancer
                    .pick(endpoints, &PickContext::new(req, excluded));
                if let Some(i) = picked {
                    ids.push(endpoints[i].id());
                }
                picked
            }
        };
        let endpoint = picked
            .and_then(|i| endpoints.get(i))
            .ok_or(Error::new(ErrorKind::NoHealthyUpstream))?;
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Selected {
            endpoint: Arc::clone(endpoint),
            started: Instant::now(),
        })
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
        if class.is_failure() {
            self.endpoint.failures.fetch_add(1, Ordering::Relaxed);
        } else {
            self.endpoint.failures.store(0, Ordering::Relaxed);
        }
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
