//! Upstreams: a set of endpoints and the balancer that picks one per request.
//!
//! An [`Upstream`] is cheap to clone (one `Arc`) and shared by every proxy that sends to it.
//! Each [`Endpoint`] carries its own live state (requests in flight today; health and
//! latency estimates as they land), so balancers, health checks and metrics read the same
//! numbers. [`Upstream::select`] returns a [`Selected`] guard that counts the request in
//! flight until it is dropped, and takes the request's outcome via [`Selected::record`].
//!
//! # Example
//!
//! ```
//! use gateway_proxy::Upstream;
//!
//! let upstream = Upstream::round_robin(["10.0.0.1:8080", "http://10.0.0.2:8080"]).unwrap();
//! assert_eq!(upstream.endpoints().len(), 2);
//! assert!(Upstream::round_robin(["ftp://nope"]).is_err());
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use gateway_core::classify::Class;
use gateway_core::{Error, ErrorKind};
use http::request;
use http::uri::{Authority, Scheme, Uri};

/// One upstream address with its live state.
pub struct Endpoint {
    scheme: Scheme,
    authority: Authority,
    weight: u32,
    in_flight: AtomicUsize,
    failures: AtomicUsize,
}

/// Picks an endpoint for a request.
///
/// Implementations must be cheap and must not block: `pick` runs on every request.
pub trait Balance: Send + Sync + fmt::Debug + 'static {
    /// The index into `endpoints` of the endpoint that should serve `req`, or `None` when
    /// none can. `endpoints` is never empty.
    fn pick(&self, endpoints: &[Arc<Endpoint>], req: &request::Parts) -> Option<usize>;
}

/// Round robin over the endpoints, in order.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

/// A set of endpoints and the balancer that spreads requests over them.
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
}

/// An endpoint address that cannot be used.
#[derive(Debug)]
pub struct InvalidEndpoint {
    target: String,
    reason: &'static str,
}

// === impl Endpoint ===

impl Endpoint {
    /// An endpoint with weight 1.
    pub const fn new(scheme: Scheme, authority: Authority) -> Self {
        Self {
            scheme,
            authority,
            weight: 1,
            in_flight: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
        }
    }

    /// Sets the endpoint's weight (at least 1) for weighted balancers.
    #[must_use]
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// `http` or `https`.
    pub const fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// `host:port`.
    pub const fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The configured weight.
    pub const fn get_weight(&self) -> u32 {
        self.weight
    }

    /// Requests currently in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Consecutive failed outcomes (reset by a success).
    pub fn consecutive_failures(&self) -> usize {
        self.failures.load(Ordering::Relaxed)
    }
}

impl FromStr for Endpoint {
    type Err = InvalidEndpoint;

    /// Parses `host:port`, `http://host[:port]` or `https://host[:port]` (a trailing `/` is
    /// accepted; any other path, a query or user info is not).
    fn from_str(target: &str) -> Result<Self, InvalidEndpoint> {
        let invalid = |reason| InvalidEndpoint {
            target: target.to_owned(),
            reason,
        };
        let with_scheme = if target.contains("://") {
            target.to_owned()
        } else {
            format!("http://{target}")
        };
        let uri: Uri = with_scheme.parse().map_err(|_| invalid("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid("the scheme must be http or https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user info is not allowed"));
        }
        if authority.host().is_empty() {
            return Err(invalid("no host"));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(invalid(
                "a path or query is not allowed (use the proxy's path rewrite)",
            ));
        }
        Ok(Self::new(scheme, authority))
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &format_args!("{}://{}", self.scheme, self.authority))
            .field("weight", &self.weight)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

// === impl RoundRobin ===

impl Balance for RoundRobin {
    fn pick(&self, endpoints: &[Arc<Endpoint>], _: &request::Parts) -> Option<usize> {
        Some(self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len())
    }
}

// === impl Upstream ===

impl Upstream {
    /// An upstream over `endpoints`, balanced by `balancer`.
    pub fn new(endpoints: impl IntoIterator<Item = Endpoint>, balancer: impl Balance) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoints: endpoints.into_iter().map(Arc::new).collect(),
                balancer: Box::new(balancer),
            }),
        }
    }

    /// Round robin over `targets` (see [`Endpoint`]'s `FromStr` for the accepted forms).
    ///
    /// # Errors
    ///
    /// The first target that does not parse.
    pub fn round_robin<I>(targets: I) -> Result<Self, InvalidEndpoint>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let endpoints = targets
            .into_iter()
            .map(|t| t.as_ref().parse())
            .collect::<Result<Vec<Endpoint>, _>>()?;
        Ok(Self::new(endpoints, RoundRobin::default()))
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
        let endpoint = self
            .inner
            .balancer
            .pick(endpoints, req)
            .and_then(|i| endpoints.get(i))
            .ok_or(Error::new(ErrorKind::NoHealthyUpstream))?;
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Selected {
            endpoint: Arc::clone(endpoint),
        })
    }
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

    /// Records the request's outcome (as judged by [`gateway_core::classify`]).
    pub fn record(&self, class: Class) {
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

// === impl InvalidEndpoint ===

impl fmt::Display for InvalidEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid upstream `{}`: {}", self.target, self.reason)
    }
}

impl std::error::Error for InvalidEndpoint {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> request::Parts {
        http::Request::new(()).into_parts().0
    }

    #[test]
    fn targets_parse() {
        let e: Endpoint = "10.0.0.1:8080".parse().unwrap();
        assert_eq!(e.to_string(), "http://10.0.0.1:8080");
        let e: Endpoint = "https://api.example.com/".parse().unwrap();
        assert_eq!(e.to_string(), "https://api.example.com");
        let e: Endpoint = "http://[::1]:9000".parse().unwrap();
        assert_eq!(e.authority().host(), "[::1]");
        for bad in [
            "",
            "ftp://x",
            "http://u:p@x",
            "http://x/path",
            "http://x/?q",
            "http://",
            "a b",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} must be rejected");
        }
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
}
