//! One upstream address and its live state.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::uri::{Authority, Scheme, Uri};

/// One upstream address with its live state.
///
/// The state is shared by everything that looks at the endpoint (balancers, the proxy,
/// metrics), so they all read the same numbers.
pub struct Endpoint {
    id: u64,
    scheme: Scheme,
    authority: Authority,
    weight: u32,
    pub(super) in_flight: AtomicUsize,
    pub(super) failures: AtomicUsize,
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
    pub fn new(scheme: Scheme, authority: Authority) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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

    /// A process-unique id, stable for the endpoint's lifetime.
    pub const fn id(&self) -> u64 {
        self.id
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
    fn ids_are_unique_and_weights_at_least_one() {
        let a: Endpoint = "a:1".parse().unwrap();
        let b: Endpoint = "a:1".parse().unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.weight(0).get_weight(), 1);
    }
}
