//! The retry layer and its service: tower's `Retry` driven by a per-request [`Attempt`],
//! around a per-try timeout.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use gateway_core::metrics::Metrics;
use gateway_core::time::Deadline;
use gateway_core::{Body, BoxError, Error, ErrorKind, LogFields, RouteId, TriedEndpoints};
use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::policy::{Attempt, Reason, Refusal, RetryPolicy};
use super::replay::Replay;

/// Retries requests as its [`RetryPolicy`] says; see the [module docs](super).
///
/// Cloning is cheap (one `Arc`); clones share the policy and its budget.
#[derive(Clone)]
#[must_use]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

/// The service of a [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    policy: Arc<RetryPolicy>,
    report: Arc<Report>,
}

/// Where retries are counted.
#[derive(Default)]
pub(super) struct Report {
    counters: Option<Counters>,
}

struct Counters {
    retried: [Counter; 4],
    refused: [Counter; 5],
}

pin_project! {
    /// The response future of [`Retry`].
    pub struct ResponseFuture<S>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Error: Into<BoxError>,
    {
        #[pin]
        inner: tower::retry::future::ResponseFuture<Attempt, TryTimeout<S>, Request<Body>>,
    }
}

/// One try under its timeout: the per-try timeout, or what is left before the request's
/// deadline, whichever ends first.
#[derive(Clone)]
pub(super) struct TryTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
}

pin_project! {
    /// The future of one try.
    pub(super) struct TryFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        timeout: Option<Duration>,
    }
}

/// A try took longer than its timeout.
#[derive(Debug)]
struct TryTimedOut(Option<Duration>);

// === impl RetryLayer ===

impl RetryLayer {
    /// Retries as `policy` says.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            shared: Arc::new(Shared {
                policy: Arc::new(policy),
                report: Arc::new(Report::default()),
            }),
        }
    }

    /// Counts retries in `metrics` under the `route` label: `gateway_retry_attempts_total` by
    /// reason and `gateway_retry_skipped_total` by why not.
    pub fn metrics(self, metrics: &Metrics, route: &str) -> Self {
        Self {
            shared: Arc::new(Shared {
                policy: Arc::clone(&self.shared.policy),
                report: Arc::new(Report {
                    counters: Some(Counters::new(metrics, &RouteId::new(route))),
                }),
            }),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.shared.policy
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

// === impl Retry ===

impl<S> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture<S> {
        let shared = &*self.shared;
        let policy = &*shared.policy;
        let idempotent = policy.retries_method(req.method());
        let (mut parts, body) = req.into_parts();
        // A body in memory is cloned for each try; one that streams is copied as it goes
        // (for a method that is not retried once sent, only to know whether it was read).
        let (body, replay) = if body.is_complete() {
            (body, None)
        } else {
            let limit = if idempotent { policy.replay_limit } else { 0 };
            let replay = Replay::new(body, limit);
            (Body::new(replay.body()), Some(replay))
        };
        parts.extensions.get_or_insert_default::<TriedEndpoints>();
        let deadline = parts.extensions.get::<Deadline>().map(|d| d.at());
        policy.budget.deposit();
        let attempt = Attempt {
            policy: Arc::clone(&shared.policy),
            report: Arc::clone(&shared.report),
            tries: 1,
            idempotent,
            replay,
            deadline,
            log: parts.extensions.get::<LogFields>().cloned(),
        };
        // NOTE: the ready service goes to this request; the clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let tries = TryTimeout {
            inner,
            timeout: policy.per_try_timeout,
            deadline,
        };
        let mut retry = tower::retry::Retry::new(attempt, tries);
        ResponseFuture {
            inner: retry.call(Request::from_parts(parts, body)),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.shared.policy)
            .finish()
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

// === impl TryTimeout ===

impl<S> Service<Request<Body>> for TryTimeout<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = TryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let ends = match (self.timeout, self.deadline) {
            (Some(timeout), deadline) => {
                let at = gateway_core::time::deadline(Instant::now(), timeout);
                Some(deadline.map_or(at, |d| d.min(at)))
            }
            (None, deadline) => deadline,
        };
        TryFuture {
            inner: self.inner.call(req),
            sleep: ends.map(tokio::time::sleep_until),
            timeout: self.timeout,
        }
    }
}

impl<F, E> Future for TryFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
            let err = Error::with_source(ErrorKind::GatewayTimeout, TryTimedOut(*this.timeout));
            return Poll::Ready(Err(err.into()));
        }
        Poll::Pending
    }
}

impl fmt::Display for TryTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(timeout) => write!(f, "the try took longer than its timeout of {timeout:?}"),
            None => f.write_str("the request's deadline passed during the try"),
        }
    }
}

impl std::error::Error for TryTimedOut {}

// === impl Report ===

impl Report {
    pub(super) fn retried(&self, reason: Reason) {
        if let Some(c) = &self.counters {
            c.retried[reason as usize].inc();
        }
    }

    pub(super) fn refused(&self, refusal: Refusal) {
        if let Some(c) = &self.counters {
            c.refused[refusal as usize].inc();
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    route: RouteId,
    reason: &'static str,
}

impl Counters {
    fn new(metrics: &Metrics, route: &RouteId) -> Self {
        let retried: Family<Labels, Counter> = metrics.family(
            "retry_attempts",
            "Tries after the first, by why the previous one failed (unsent, reset, timeout, status).",
        );
        let refused: Family<Labels, Counter> = metrics.family(
            "retry_skipped",
            "Retryable failures passed on without a retry, by why (tries, budget, deadline, retry_after, body).",
        );
        let counter = |family: &Family<Labels, Counter>, reason| {
            family
                .get_or_create(&Labels {
                    route: route.clone(),
                    reason,
                })
                .clone()
        };
        Self {
            retried: [
                Reason::Unsent,
                Reason::Reset,
                Reason::Timeout,
                Reason::Status,
            ]
            .map(|r| counter(&retried, r.as_str())),
            refused: [
                Refusal::Tries,
                Refusal::Budget,
                Refusal::Deadline,
                Refusal::RetryAfter,
                Refusal::Body,
            ]
            .map(|r| counter(&refused, r.as_str())),
        }
    }
}
