//! One upstream address and its live state.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use gateway_core::classify::Class;
use http::uri::{Authority, Scheme, Uri};
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

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
    rtt: Rtt,
    /// End of the current ejection, in nanoseconds since [`epoch`]; 0 = never ejected.
    ejected_until: AtomicU64,
    /// Ejections so far (reset after a long healthy spell); scales the ejection time.
    pub(super) ejections: AtomicU32,
    /// The verdict of active health checks (true until a check says otherwise).
    healthy: AtomicBool,
    /// When the endpoint last joined or came back, in nanoseconds since [`epoch`]; 0 = it
    /// was there from the start. Slow start ramps its weight up from this point.
    ready_since: AtomicU64,
    /// Pooled connections to this endpoint, per client.
    pub(crate) pools: super::pool::Pools,
    /// Outcomes so far, by class (see [`Endpoint::outcomes`]).
    outcomes: [AtomicU64; 4],
    /// Response times, into the histogram of the upstream the endpoint belongs to (set
    /// when it joins one).
    pub(super) latency: Option<Histogram>,
}

/// A point-in-time view of an endpoint's state, for metrics and admin endpoints.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EndpointState {
    /// The process-unique endpoint id.
    pub id: u64,
    /// `scheme://host:port`.
    pub url: String,
    /// The configured weight.
    pub weight: u32,
    /// Requests in flight.
    pub in_flight: usize,
    /// The peak-EWMA response-time estimate, if there was a sample.
    pub rtt: Option<Duration>,
    /// Consecutive failed outcomes.
    pub consecutive_failures: usize,
    /// Whether active health checks pass (true when there are none).
    pub healthy: bool,
    /// Whether passive health checking has ejected it now.
    pub ejected: bool,
    /// Ejections since its last long healthy spell.
    pub ejections: u32,
}

/// How the requests sent to an endpoint ended; see [`Endpoint::outcomes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcomes {
    /// [`Class::Success`].
    pub success: u64,
    /// [`Class::Failure`].
    pub failure: u64,
    /// [`Class::Retryable`].
    pub retryable: u64,
    /// [`Class::Client`].
    pub client: u64,
}

/// A peak-sensitive moving average of response times: a slower sample replaces the estimate
/// at once, faster ones pull it down gradually, and without samples it decays toward zero
/// so an endpoint that was slow once is tried again. Stored as atomics: concurrent updates
/// may lose one sample, which a moving average tolerates.
#[derive(Default)]
struct Rtt {
    /// The estimate in nanoseconds, as `f64` bits; 0 = no sample yet.
    nanos: AtomicU64,
    /// When it was last updated, in nanoseconds since [`epoch`].
    at: AtomicU64,
}

/// How fast the response-time estimate forgets (the decay constant of the average).
pub(super) const RTT_DECAY: Duration = Duration::from_secs(10);

/// The smallest share of its weight a warming endpoint gets, so it is tried at all (Envoy's
/// `min_weight_percent` default).
const MIN_WARMUP: f64 = 0.1;

/// A process-wide time origin for the compact timestamps of [`Rtt`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
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
            rtt: Rtt::default(),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            ready_since: AtomicU64::new(0),
            pools: super::pool::Pools::default(),
            outcomes: Default::default(),
            latency: None,
        }
    }

    /// Sets the endpoint's weight for weighted balancers (default 1).
    #[must_use]
    pub fn with_weight(mut self, weight: NonZeroU32) -> Self {
        self.weight = weight.get();
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
    pub const fn weight(&self) -> u32 {
        self.weight
    }

    /// The outcomes of the requests sent to this endpoint so far, by class, as judged by
    /// [`gateway_core::classify`]: successes, failures, retryable failures and exchanges
    /// the client broke.
    pub fn outcomes(&self) -> Outcomes {
        let get = |c: Class| self.outcomes[c as usize].load(Ordering::Relaxed);
        Outcomes {
            success: get(Class::Success),
            failure: get(Class::Failure),
            retryable: get(Class::Retryable),
            client: get(Class::Client),
        }
    }

    pub(super) fn count(&self, class: Class) {
        self.outcomes[class as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests currently in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Consecutive failed outcomes (reset by a success).
    pub fn consecutive_failures(&self) -> usize {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether passive health checking has ejected this endpoint at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > nanos_since_epoch(now)
    }

    /// How many times the endpoint was ejected (since its last long healthy spell).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Whether active health checks pass (always true without them).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the endpoint may take traffic at `now`: healthy and not ejected.
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }

    /// A snapshot of the endpoint's state at `now`.
    pub fn state(&self, now: Instant) -> EndpointState {
        EndpointState {
            id: self.id,
            url: self.to_string(),
            weight: self.weight,
            in_flight: self.in_flight(),
            rtt: self.rtt_estimate(now),
            consecutive_failures: self.consecutive_failures(),
            healthy: self.is_healthy(),
            ejected: self.is_ejected(now),
            ejections: self.ejections(),
        }
    }

    /// Records an active health verdict; returns whether it changed. A return to health
    /// restarts the slow-start ramp.
    pub(super) fn set_healthy(&self, healthy: bool, now: Instant) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed && healthy {
            self.mark_ready(now);
        }
        changed
    }

    /// Starts the slow-start ramp at `now` (the endpoint just joined or came back).
    pub(super) fn mark_ready(&self, now: Instant) {
        self.ready_since
            .store(nanos_since_epoch(now).max(1), Ordering::Relaxed);
    }

    /// The share (0.1–1.0) of its weight the endpoint gets at `now` when weights ramp up
    /// over `window` after it joined, returned to health or came back from an ejection.
    pub(super) fn warmup(&self, now: Instant, window: Duration) -> f64 {
        let since = self
            .ready_since
            .load(Ordering::Relaxed)
            .max(self.ejected_until.load(Ordering::Relaxed));
        if since == 0 {
            return 1.0;
        }
        let elapsed = nanos_since_epoch(now).saturating_sub(since) as f64;
        let window = window.as_nanos() as f64;
        if elapsed >= window {
            1.0
        } else {
            (elapsed / window).max(MIN_WARMUP)
        }
    }

    /// When the last ejection ended (or ends), if there was one.
    pub(super) fn ejected_until(&self) -> Option<Instant> {
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(epoch() + Duration::from_nanos(ns)),
        }
    }

    pub(super) fn eject_until(&self, until: Instant) {
        self.ejected_until
            .store(nanos_since_epoch(until).max(1), Ordering::Relaxed);
    }

    /// The peak-EWMA response-time estimate at `now`, or `None` before the first sample.
    pub fn rtt_estimate(&self, now: Instant) -> Option<Duration> {
        let nanos = f64::from_bits(self.rtt.nanos.load(Ordering::Relaxed));
        if nanos <= 0.0 {
            return None;
        }
        let at = self.rtt.at.load(Ordering::Relaxed);
        let idle = nanos_since_epoch(now).saturating_sub(at) as f64;
        let decayed = nanos * (-idle / RTT_DECAY.as_nanos() as f64).exp();
        Some(Duration::from_nanos(decayed as u64))
    }

    /// Adds a response-time sample taken at `now`.
    pub fn observe_rtt(&self, rtt: Duration, now: Instant) {
        let sample = (rtt.as_nanos() as f64).max(1.0);
        let now_ns = nanos_since_epoch(now);
        let current = f64::from_bits(self.rtt.nanos.load(Ordering::Relaxed));
        let next = if current <= 0.0 || sample > current {
            sample
        } else {
            let idle = now_ns.saturating_sub(self.rtt.at.load(Ordering::Relaxed)) as f64;
            let keep = (-idle / RTT_DECAY.as_nanos() as f64).exp();
            // At least a small step toward the sample, even for back-to-back samples.
            let keep = keep.min(0.9);
            current * keep + sample * (1.0 - keep)
        };
        self.rtt.nanos.store(next.to_bits(), Ordering::Relaxed);
        self.rtt.at.store(now_ns, Ordering::Relaxed);
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
            .field("rtt", &self.rtt_estimate(Instant::now()))
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

// === impl InvalidEndpoint ===

impl InvalidEndpoint {
    pub(super) fn new(target: &str, reason: &'static str) -> Self {
        Self {
            target: target.to_owned(),
            reason,
        }
    }
}

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

    #[tokio::test(start_paused = true)]
    async fn rtt_is_peak_sensitive_and_decays() {
        let e: Endpoint = "a:1".parse().unwrap();
        let now = Instant::now();
        assert_eq!(e.rtt_estimate(now), None);
        e.observe_rtt(Duration::from_millis(10), now);
        e.observe_rtt(Duration::from_millis(100), now);
        assert_eq!(
            e.rtt_estimate(now),
            Some(Duration::from_millis(100)),
            "peaks win at once"
        );
        e.observe_rtt(Duration::from_millis(10), now);
        let after_one_fast = e.rtt_estimate(now).unwrap();
        assert!(
            after_one_fast < Duration::from_millis(100),
            "{after_one_fast:?}"
        );
        assert!(
            after_one_fast > Duration::from_millis(50),
            "fast samples pull down gradually"
        );
        let later = now + RTT_DECAY * 3;
        assert!(
            e.rtt_estimate(later).unwrap() < after_one_fast / 10,
            "idle estimates decay"
        );
    }

    #[test]
    fn ids_are_unique_and_weights_default_to_one() {
        let a: Endpoint = "a:1".parse().unwrap();
        let b: Endpoint = "a:1".parse().unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.weight(), 1);
        assert_eq!(b.with_weight(NonZeroU32::new(3).unwrap()).weight(), 3);
    }
}
