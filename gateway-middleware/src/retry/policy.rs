//! What is retried, how often and after how long: [`RetryPolicy`], and the per-request
//! [`tower::retry::Policy`] it becomes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use gateway_core::{Body, BoxError, Error, ErrorKind, LogFields, TriedEndpoints};
use http::header::RETRY_AFTER;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::time::{Instant, Sleep};

use super::budget::Budget;
use super::layer::Report;
use super::replay::Replay;

/// What a route retries, how many times, how long it waits, and within what budget.
///
/// [`RetryPolicy::idempotent`] is the safe start: requests whose methods are idempotent
/// (RFC 9110 §9.2.2) are tried again on a connect failure, a reset before any response,
/// a try that timed out, or a 502, 503 or 504; any other request only when nothing of it
/// was sent (its connection could not be opened), since then the upstream cannot have
/// acted on it.
///
/// ```
/// use std::time::Duration;
/// use gateway_middleware::retry::{Budget, RetryPolicy};
///
/// let policy = RetryPolicy::idempotent()
///     .tries(4)
///     .budget(Budget::new(0.2).unwrap())
///     .backoff(Duration::from_millis(25), Duration::from_secs(1))
///     .per_try_timeout(Some(Duration::from_secs(2)))
///     .replay_limit(64 * 1024);
/// # let _ = policy;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct RetryPolicy {
    pub(super) tries: u32,
    pub(super) methods: Vec<Method>,
    pub(super) on: On,
    pub(super) statuses: Vec<StatusCode>,
    pub(super) base: Duration,
    pub(super) max_backoff: Duration,
    pub(super) max_retry_after: Duration,
    pub(super) budget: Budget,
    pub(super) per_try_timeout: Option<Duration>,
    pub(super) replay_limit: usize,
}

/// The failures a policy retries (a set: combine with `|`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct On(u8);

/// Why a try was followed by another, or why it was not: the `reason` of the retry
/// metrics and the access log's `retry` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Reason {
    /// The connection could not be opened: nothing was sent.
    Unsent,
    /// The connection closed or reset before a response came.
    Reset,
    /// The try took longer than its timeout (or the response header timeout).
    Timeout,
    /// The response's status is one the policy retries.
    Status,
}

/// Why a retryable outcome was not retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Refusal {
    /// Every try was used.
    Tries,
    /// The budget had no retry left.
    Budget,
    /// The wait would end past the request's deadline.
    Deadline,
    /// The upstream's `Retry-After` asks for more than the policy waits.
    RetryAfter,
    /// The body was over the replay limit (or failed), or, for a method that is not
    /// idempotent, had started to stream.
    Body,
}

/// The per-request state of a retried request: the [`tower::retry::Policy`].
#[derive(Clone)]
pub(super) struct Attempt {
    pub(super) policy: Arc<RetryPolicy>,
    pub(super) report: Arc<Report>,
    /// Tries made so far (the first included).
    pub(super) tries: u32,
    pub(super) idempotent: bool,
    pub(super) replay: Option<Replay>,
    pub(super) deadline: Option<Instant>,
    pub(super) log: Option<LogFields>,
}

// === impl RetryPolicy ===

/// The methods RFC 9110 §9.2.2 calls idempotent.
const IDEMPOTENT: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::OPTIONS,
    Method::TRACE,
    Method::PUT,
    Method::DELETE,
];

impl RetryPolicy {
    /// Up to 3 tries of idempotent requests on any failure in [`On::default`], and of any
    /// request whose connection could not be opened; backoff from 25 ms to 1 s with full
    /// jitter; `Retry-After` honoured up to 5 s; the [default budget](Budget::default); no
    /// per-try timeout; bodies replayed up to 64 KiB.
    pub fn idempotent() -> Self {
        Self {
            tries: 3,
            methods: IDEMPOTENT.to_vec(),
            on: On::default(),
            statuses: vec![
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ],
            base: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(5),
            budget: Budget::default(),
            per_try_timeout: None,
            replay_limit: 64 * 1024,
        }
    }

    /// Only what was never sent (a connection that could not be opened), for any method:
    /// the retry nginx and Kong make by default.
    pub fn unsent() -> Self {
        Self::idempotent().on(On::CONNECT)
    }

    /// Tries in all, the first included [default: 3]; 1 turns retrying off.
    ///
    /// # Panics
    ///
    /// When `tries` is 0.
    pub fn tries(mut self, tries: u32) -> Self {
        assert!(tries > 0, "a request is tried at least once");
        self.tries = tries;
        self
    }

    /// The methods retried on every failure in the policy [default: the idempotent
    /// ones]. Listing `POST` says its upstream handles a repeated request safely.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The failures retried [default: [`On::default`]].
    pub fn on(mut self, on: On) -> Self {
        self.on = on;
        self
    }

    /// The response statuses retried with [`On::STATUS`] [default: 502, 503, 504].
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// The backoff before retry `n` (1, 2, ...) is a random time up to
    /// `min(max, base × 2ⁿ⁻¹)` ("full jitter") [default: 25 ms, 1 s].
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base = base;
        self.max_backoff = max.max(base);
        self
    }

    /// The longest upstream `Retry-After` waited for [default: 5 s]; a response asking for
    /// longer is passed to the client as it is.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// The budget retries are taken from [default: [`Budget::default`]]. Give clones of one
    /// budget to several layers to share it.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// How long one try may take to its response head; a try that takes longer is
    /// abandoned (and retried, with [`On::TIMEOUT`]) [default: none]. Tries never run past
    /// the request's deadline (see [`TimeoutLayer`](crate::timeout::TimeoutLayer)).
    pub fn per_try_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.per_try_timeout = timeout;
        self
    }

    /// The most request body bytes kept to send again [default: 64 KiB]. The first try
    /// streams the body as it comes; a body over the limit is not retried (but for a
    /// connection that could not be opened, when none of it was read).
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.replay_limit = bytes;
        self
    }

    /// Whether `method` is retried on every failure of the policy.
    pub(super) fn retries_method(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// Whether a try can follow this outcome, and why.
    fn reason(&self, result: &Result<Response<Body>, BoxError>) -> Option<Reason> {
        match result {
            Ok(res) => (self.on.contains(On::STATUS) && self.statuses.contains(&res.status()))
                .then_some(Reason::Status),
            Err(err) => {
                let reason = match Error::kind_of(&**err) {
                    // NOTE: not `CircuitOpen`: the breaker that refused would refuse again.
                    ErrorKind::UpstreamConnect => Reason::Unsent,
                    ErrorKind::GatewayTimeout => Reason::Timeout,
                    ErrorKind::BadGateway if gateway_core::classify::is_reset(&**err) => {
                        Reason::Reset
                    }
                    _ => return None,
                };
                self.on.contains(reason.on()).then_some(reason)
            }
        }
    }

    /// The wait before retry `n` (1, 2, ...).
    pub(super) fn backoff_for(&self, n: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << n.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

/// The `Retry-After` of a response, in whole seconds or as a date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

// === impl On ===

impl On {
    /// The connection could not be opened: nothing was sent, so this is retried for
    /// every method.
    pub const CONNECT: Self = Self(1);
    /// The connection closed or reset before any response.
    pub const RESET: Self = Self(2);
    /// A try timed out (its [per-try timeout](RetryPolicy::per_try_timeout) or the
    /// proxy's response header timeout).
    pub const TIMEOUT: Self = Self(4);
    /// The response has one of the policy's [statuses](RetryPolicy::statuses).
    pub const STATUS: Self = Self(8);

    /// Whether every failure in `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl Default for On {
    /// Every failure.
    fn default() -> Self {
        Self::CONNECT | Self::RESET | Self::TIMEOUT | Self::STATUS
    }
}

impl std::ops::BitOr for On {
    type Output = Self;

    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Debug for On {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::CONNECT, "CONNECT"),
            (Self::RESET, "RESET"),
            (Self::TIMEOUT, "TIMEOUT"),
            (Self::STATUS, "STATUS"),
        ];
        let mut set = f.debug_set();
        for (on, name) in names {
            if self.contains(on) {
                set.entry(&format_args!("{name}"));
            }
        }
        set.finish()
    }
}

// === impl Reason ===

impl Reason {
    const fn on(self) -> On {
        match self {
            Self::Unsent => On::CONNECT,
            Self::Reset => On::RESET,
            Self::Timeout => On::TIMEOUT,
            Self::Status => On::STATUS,
        }
    }

    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Self::Unsent => "unsent",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::Status => "status",
        }
    }
}

impl Refusal {
    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Self::Tries => "tries",
            Self::Budget => "budget",
            Self::Deadline => "deadline",
            Self::RetryAfter => "retry_after",
            Self::Body => "body",
        }
    }
}

// === impl Attempt ===

impl Attempt {
    /// Whether the request may be tried again after `result`, and after how long.
    fn decide(
        &self,
        result: &Result<Response<Body>, BoxError>,
    ) -> Result<Duration, Option<Refusal>> {
        let policy = &*self.policy;
        let reason = policy.reason(result).ok_or(None)?;
        let unsent = reason == Reason::Unsent;
        if !unsent && !self.idempotent {
            return Err(None);
        }
        if self.tries >= policy.tries {
            return Err(Some(Refusal::Tries));
        }
        if let Some(replay) = &self.replay {
            // What was never read needs no copy; what was read needs one whole, and only
            // a method retried on every failure may be sent again once it was read.
            let ok = replay.untouched() || (self.idempotent && replay.is_replayable());
            if !ok {
                return Err(Some(Refusal::Body));
            }
        }
        let wait = match result {
            Ok(res) => match retry_after(res.headers()) {
                Some(after) if after > policy.max_retry_after => {
                    return Err(Some(Refusal::RetryAfter));
                }
                Some(after) => after,
                None => policy.backoff_for(self.tries),
            },
            // Nothing reached the upstream: another endpoint can be tried at once.
            Err(_) if unsent => Duration::ZERO,
            Err(_) => policy.backoff_for(self.tries),
        };
        if let Some(deadline) = self.deadline
            && Instant::now() + wait >= deadline
        {
            return Err(Some(Refusal::Deadline));
        }
        if !policy.budget.withdraw() {
            return Err(Some(Refusal::Budget));
        }
        self.report.retried(reason);
        if let Some(log) = &self.log {
            log.insert("retry", reason.as_str());
        }
        Ok(wait)
    }
}

impl tower::retry::Policy<Request<Body>, Response<Body>, BoxError> for Attempt {
    type Future = Sleep;

    fn retry(
        &mut self,
        _: &mut Request<Body>,
        result: &mut Result<Response<Body>, BoxError>,
    ) -> Option<Sleep> {
        match self.decide(result) {
            Ok(wait) => {
                self.tries += 1;
                Some(tokio::time::sleep(wait))
            }
            Err(refusal) => {
                if let Some(refusal) = refusal {
                    self.report.refused(refusal);
                    if let Some(log) = &self.log {
                        log.insert("retry_refused", refusal.as_str());
                    }
                }
                None
            }
        }
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        // NOTE: a copy is made for the last try too (a failure path only), so that its
        // outcome reaches `retry` and a retry refused for want of tries is counted.
        if self.policy.tries == 1 {
            return None;
        }
        let body = match &self.replay {
            Some(replay) => Body::new(replay.body()),
            None => req.body().try_clone()?,
        };
        let mut clone = Request::new(body);
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        debug_assert!(clone.extensions().get::<TriedEndpoints>().is_some());
        Some(clone)
    }
}
