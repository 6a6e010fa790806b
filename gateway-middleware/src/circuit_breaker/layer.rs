//! The breaker layer, its service and future, and what it reports.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::classify::{self, Class};
use gateway_core::metrics::Metrics;
use gateway_core::{Body, BoxError, Error, ErrorKind, LogFields};
use http::{HeaderMap, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tower::util::{BoxCloneSyncService, Oneshot};
use tower::{Layer, Service, ServiceExt};

use super::breaker::{Admit, Breaker, Permit, Phase, State};

/// Breaks the circuit to a sick upstream; see the [module docs](super).
///
/// Cloning is cheap; clones (and the services they make) share one breaker.
#[derive(Clone)]
#[must_use]
pub struct CircuitBreakerLayer {
    state: Arc<State>,
    fallback: Fallback,
}

/// The service of a [`CircuitBreakerLayer`].
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    state: Arc<State>,
    fallback: Fallback,
}

/// A breaker held weakly: what the config keeps to share breakers by name.
#[cfg(feature = "config")]
pub(crate) struct WeakBreaker(std::sync::Weak<State>);

/// What a refused call gets.
#[derive(Clone, Default)]
pub(super) enum Fallback {
    /// A `503` (`circuit_open`) with `Retry-After`, passed up as an error.
    #[default]
    Error,
    /// A fixed response.
    Response(Arc<(StatusCode, HeaderMap, Bytes)>),
    /// Another service: the request, untouched, goes there.
    Service(BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>),
}

pin_project! {
    /// The response future of [`CircuitBreaker`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called {
            #[pin]
            fut: F,
            guard: Guard,
        },
        Fallback {
            #[pin]
            fut: Oneshot<BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>, Request<Body>>,
        },
        Ready {
            result: Option<Result<Response<Body>, BoxError>>,
        },
    }
}

/// A call's permit with its breaker: the outcome is reported once, and a call dropped
/// before its outcome (the client went away) is reported as the client's.
struct Guard {
    state: Arc<State>,
    permit: Permit,
}

/// Where a breaker reports: its name, in logs and in the `breaker` label.
pub(super) struct Report {
    name: Arc<str>,
    counters: Option<Counters>,
}

struct Counters {
    /// 0 closed, 1 open, 2 half-open.
    state: Gauge,
    to_open: Counter,
    to_half_open: Counter,
    to_closed: Counter,
    /// `None` for an endpoint's breaker: its refusals are counted by its layer's name.
    refused: Option<Counter>,
}

// === impl CircuitBreakerLayer ===

impl CircuitBreakerLayer {
    /// A breaker named `name` (in logs and metrics: a route id, an upstream's name).
    pub fn new(name: &str, breaker: Breaker) -> Self {
        Self {
            state: Arc::new(State::new(
                breaker,
                Report {
                    name: name.into(),
                    counters: None,
                },
            )),
            fallback: Fallback::Error,
        }
    }

    /// Reports the breaker's state, transitions and refusals in `metrics`
    /// (`gateway_circuit_breaker_state`, `_transitions_total`, `_refused_total`, labelled by
    /// `breaker`).
    ///
    /// Call it before the layer is cloned: the state starts afresh.
    pub fn metrics(self, metrics: &Metrics) -> Self {
        let name = Arc::clone(&self.state.report.name);
        let counters = Counters::new(metrics, &name, true);
        Self {
            state: Arc::new(State::new(
                self.state.breaker.clone(),
                Report {
                    name,
                    counters: Some(counters),
                },
            )),
            fallback: self.fallback,
        }
    }

    /// While open, answers with a copy of `response` instead of an error.
    pub fn fallback_response(mut self, response: Response<Bytes>) -> Self {
        let (parts, body) = response.into_parts();
        self.fallback = Fallback::Response(Arc::new((parts.status, parts.headers, body)));
        self
    }

    /// While open, sends the request to `service` instead (another upstream, another
    /// route's stack): the fallback *service*.
    pub fn fallback<S>(mut self, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.fallback = Fallback::Service(BoxCloneSyncService::new(service.map_err(Into::into)));
        self
    }

    /// The breaker's phase now.
    pub fn phase(&self) -> Phase {
        self.state.phase()
    }

    /// The breaker, held weakly (its fallback is not kept).
    #[cfg(feature = "config")]
    pub(crate) fn downgrade(&self) -> WeakBreaker {
        WeakBreaker(Arc::downgrade(&self.state))
    }
}

// === impl WeakBreaker ===

#[cfg(feature = "config")]
impl WeakBreaker {
    /// A layer on the breaker, if it is still used, with the default fallback.
    pub(crate) fn upgrade(&self) -> Option<CircuitBreakerLayer> {
        Some(CircuitBreakerLayer {
            state: self.0.upgrade()?,
            fallback: Fallback::Error,
        })
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            state: Arc::clone(&self.state),
            fallback: self.fallback.clone(),
        }
    }
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("name", &self.state.report.name)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

// === impl CircuitBreaker ===

impl<S> Service<Request<Body>> for CircuitBreaker<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let wait = match self.state.admit() {
            Admit::Call(permit) => {
                return ResponseFuture {
                    kind: Kind::Called {
                        fut: self.inner.call(req),
                        guard: Guard {
                            state: Arc::clone(&self.state),
                            permit,
                        },
                    },
                };
            }
            Admit::Refused(wait) => wait,
        };
        let report = &self.state.report;
        report.refused();
        if let Some(log) = req.extensions().get::<LogFields>() {
            log.insert("circuit_breaker", "open");
        }
        let kind = match self.fallback.answer(wait) {
            Some(result) => Kind::Ready {
                result: Some(result),
            },
            None => match &self.fallback {
                Fallback::Service(service) => Kind::Fallback {
                    fut: service.clone().oneshot(req),
                },
                _ => Kind::Ready {
                    result: Some(Err(Error::new(ErrorKind::Internal).into())),
                },
            },
        };
        ResponseFuture { kind }
    }
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { fut, guard } => {
                let result = ready!(fut.poll(cx)).map_err(Into::into);
                guard.record(classify::result(&result));
                Poll::Ready(result)
            }
            KindProj::Fallback { fut } => fut.poll(cx),
            KindProj::Ready { result } => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(Error::new(ErrorKind::Internal).into())),
            ),
        }
    }
}

// === impl Fallback ===

impl Fallback {
    /// The answer to a refused call, unless it goes to the fallback service.
    pub(super) fn answer(&self, wait: Duration) -> Option<Result<Response<Body>, BoxError>> {
        match self {
            Self::Error => Some(Err(Error::new(ErrorKind::CircuitOpen)
                .retry_after(wait)
                .into())),
            Self::Response(fixed) => {
                let (status, headers, body) = &**fixed;
                let mut res = Response::new(Body::from(body.clone()));
                *res.status_mut() = *status;
                *res.headers_mut() = headers.clone();
                Some(Ok(res))
            }
            Self::Service(_) => None,
        }
    }
}

// === impl Guard ===

impl Guard {
    fn record(&mut self, class: Class) {
        self.state.record(&mut self.permit, class);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Nothing is known of a call dropped before its outcome (a no-op once recorded).
        self.record(Class::Client);
    }
}

// === impl Report ===

impl Report {
    /// Where the breaker of one endpoint reports (`name` is `layer/host:port`): its state
    /// and transitions; its layer counts the refusals.
    pub(super) fn endpoint(name: Arc<str>, metrics: Option<&Metrics>) -> Self {
        let counters = metrics.map(|m| Counters::new(m, &name, false));
        Self { name, counters }
    }

    /// Where a layer of per-endpoint breakers counts its refusals.
    pub(super) fn refusals(name: Arc<str>, metrics: Option<&Metrics>) -> Option<Counter> {
        let refused: Family<BreakerLabels, Counter> = metrics?.family(
            "circuit_breaker_refused",
            "Calls an open (or deciding half-open) circuit breaker refused",
        );
        let counter = refused
            .get_or_create(&BreakerLabels { breaker: name })
            .clone();
        Some(counter)
    }

    pub(super) fn opened(&self, open_for: Duration, openings: u32) {
        tracing::warn!(
            breaker = %self.name,
            open_for = ?open_for,
            openings,
            "circuit breaker opened: calls are refused until it probes again"
        );
        self.count(Phase::Open);
    }

    /// Half-open or closed again (its opening is [`opened`](Self::opened)).
    pub(super) fn changed(&self, phase: Phase) {
        tracing::info!(breaker = %self.name, phase = phase.as_str(), "circuit breaker changed phase");
        self.count(phase);
    }

    fn count(&self, phase: Phase) {
        if let Some(c) = &self.counters {
            let (state, to) = match phase {
                Phase::Closed => (0, &c.to_closed),
                Phase::Open => (1, &c.to_open),
                Phase::HalfOpen => (2, &c.to_half_open),
            };
            c.state.set(state);
            to.inc();
        }
    }

    pub(super) fn refused(&self) {
        if let Some(refused) = self.counters.as_ref().and_then(|c| c.refused.as_ref()) {
            refused.inc();
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    breaker: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    breaker: Arc<str>,
    to: &'static str,
}

impl Counters {
    fn new(metrics: &Metrics, name: &Arc<str>, refusals: bool) -> Self {
        let state: Family<BreakerLabels, Gauge> = metrics.family(
            "circuit_breaker_state",
            "A circuit breaker's phase: 0 closed, 1 open, 2 half-open",
        );
        let transitions: Family<TransitionLabels, Counter> = metrics.family(
            "circuit_breaker_transitions",
            "A circuit breaker's changes of phase, by the phase it went to (open, half_open, closed)",
        );
        let refused: Family<BreakerLabels, Counter> = metrics.family(
            "circuit_breaker_refused",
            "Calls an open (or deciding half-open) circuit breaker refused",
        );
        let labels = BreakerLabels {
            breaker: Arc::clone(name),
        };
        let to = |to| {
            transitions
                .get_or_create(&TransitionLabels {
                    breaker: Arc::clone(name),
                    to,
                })
                .clone()
        };
        let state = state.get_or_create(&labels).clone();
        state.set(0);
        Self {
            state,
            to_open: to("open"),
            to_half_open: to("half_open"),
            to_closed: to("closed"),
            refused: refusals.then(|| refused.get_or_create(&labels).clone()),
        }
    }
}
