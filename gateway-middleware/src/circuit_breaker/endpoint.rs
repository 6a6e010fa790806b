//! One breaker per endpoint of an upstream: the layer bars the endpoints whose breaker is
//! open, the proxy's balancer picks among the others, and the outcome goes to the breaker
//! of the endpoint that was picked.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use gateway_core::classify::{self, Class};
use gateway_core::metrics::Metrics;
use gateway_core::{Body, BoxError, Error, ErrorKind, LogFields, TriedEndpoints};
use http::uri::Authority;
use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use super::breaker::{Admit, Breaker, Permit, Phase, State};
use super::layer::{Fallback, Report};

/// The most endpoints a layer keeps a breaker for. Endpoints come from the config and
/// discovery, not from clients; past this many (discovery churning), closed breakers are
/// forgotten to make room, and an endpoint without room has no breaker.
const MAX_ENDPOINTS: usize = 1024;

/// Breaks the circuit to each endpoint of an upstream on its own; see the
/// [module docs](super#one-breaker-per-endpoint).
///
/// Cloning is cheap; clones (and the services they make) share the breakers.
#[derive(Clone)]
#[must_use]
pub struct EndpointBreakerLayer {
    shared: Arc<Shared>,
    fallback: Fallback,
}

/// The service of an [`EndpointBreakerLayer`].
#[derive(Clone)]
pub struct EndpointBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
    fallback: Fallback,
}

struct Shared {
    name: Arc<str>,
    breaker: Breaker,
    metrics: Option<Metrics>,
    refused: Option<Counter>,
    /// The breakers, read without a lock on every call; one is added (rarely) under
    /// `adding`.
    endpoints: ArcSwap<Vec<Entry>>,
    adding: Mutex<()>,
}

struct Entry {
    id: u64,
    authority: Option<Authority>,
    state: Arc<State>,
}

pin_project! {
    /// The response future of [`EndpointBreaker`].
    pub struct EndpointFuture<F> {
        #[pin]
        fut: F,
        guard: Guard,
    }
}

/// A call's permits, one per endpoint whose breaker let it through; the picked endpoint's
/// is used, the others are given back unused (as is every one of a dropped call).
struct Guard {
    shared: Arc<Shared>,
    endpoints: Arc<Vec<Entry>>,
    permits: Vec<Option<Permit>>,
    tried: TriedEndpoints,
    /// How many endpoints the request had tried before this call.
    from: usize,
    /// How long until a barred endpoint may be probed again, the soonest.
    wait: Duration,
    fallback: Fallback,
    log: Option<LogFields>,
}

// === impl EndpointBreakerLayer ===

impl EndpointBreakerLayer {
    /// A breaker per endpoint, each as `breaker` sets; `name` (an upstream's name) labels
    /// them as `name/host:port` in logs and metrics.
    pub fn new(name: &str, breaker: Breaker) -> Self {
        Self {
            shared: Arc::new(Shared::new(name.into(), breaker, None)),
            fallback: Fallback::Error,
        }
    }

    /// Reports each endpoint's breaker (`gateway_circuit_breaker_state` and
    /// `_transitions_total`, labelled `breaker="name/host:port"`) and the layer's refusals
    /// (`gateway_circuit_breaker_refused_total{breaker="name"}`) in `metrics`.
    ///
    /// Call it before the layer is cloned: the state starts afresh.
    pub fn metrics(self, metrics: &Metrics) -> Self {
        let shared = Shared::new(
            Arc::clone(&self.shared.name),
            self.shared.breaker.clone(),
            Some(metrics.clone()),
        );
        Self {
            shared: Arc::new(shared),
            fallback: self.fallback,
        }
    }

    /// When every endpoint is refused, answers with a copy of `response` instead of an
    /// error.
    ///
    /// (No fallback *service* here: the request went to the proxy before it turned out
    /// that no endpoint was left. Put a [`CircuitBreakerLayer`](super::CircuitBreakerLayer)
    /// with a fallback around the upstream for that.)
    pub fn fallback_response(mut self, response: Response<Bytes>) -> Self {
        let (parts, body) = response.into_parts();
        self.fallback = Fallback::Response(Arc::new((parts.status, parts.headers, body)));
        self
    }

    /// The phase of the breaker of the endpoint at `authority` (`host:port`); `None` when
    /// the layer has not seen it called.
    pub fn phase(&self, authority: &str) -> Option<Phase> {
        let endpoints = self.shared.endpoints.load();
        endpoints
            .iter()
            .find(|e| {
                e.authority
                    .as_ref()
                    .is_some_and(|a| a.as_str() == authority)
            })
            .map(|e| e.state.phase())
    }
}

/// Per-endpoint breakers held weakly: what the config keeps to carry them across reloads.
#[cfg(feature = "config")]
pub(crate) struct WeakEndpointBreakers(std::sync::Weak<Shared>);

#[cfg(feature = "config")]
impl EndpointBreakerLayer {
    /// The breakers, held weakly (the fallback is not kept).
    pub(crate) fn downgrade(&self) -> WeakEndpointBreakers {
        WeakEndpointBreakers(Arc::downgrade(&self.shared))
    }
}

#[cfg(feature = "config")]
impl WeakEndpointBreakers {
    /// A layer on the breakers, if they are still used, with the default fallback.
    pub(crate) fn upgrade(&self) -> Option<EndpointBreakerLayer> {
        Some(EndpointBreakerLayer {
            shared: self.0.upgrade()?,
            fallback: Fallback::Error,
        })
    }
}

impl<S> Layer<S> for EndpointBreakerLayer {
    type Service = EndpointBreaker<S>;

    fn layer(&self, inner: S) -> EndpointBreaker<S> {
        EndpointBreaker {
            inner,
            shared: Arc::clone(&self.shared),
            fallback: self.fallback.clone(),
        }
    }
}

impl fmt::Debug for EndpointBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointBreakerLayer")
            .field("name", &self.shared.name)
            .field("endpoints", &self.shared.endpoints.load().len())
            .finish_non_exhaustive()
    }
}

// === impl EndpointBreaker ===

impl<S> Service<Request<Body>> for EndpointBreaker<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = EndpointFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let endpoints = self.shared.endpoints.load_full();
        let mut wait = Duration::MAX;
        let permits: Vec<Option<Permit>> = endpoints
            .iter()
            .map(|e| match e.state.admit() {
                Admit::Call(permit) => Some(permit),
                Admit::Refused(until) => {
                    wait = wait.min(until);
                    None
                }
            })
            .collect();
        let tried = req
            .extensions_mut()
            .get_or_insert_default::<TriedEndpoints>()
            .clone();
        let from = {
            let mut list = tried.lock();
            list.bar(
                endpoints
                    .iter()
                    .zip(&permits)
                    .filter(|(_, permit)| permit.is_none())
                    .map(|(e, _)| e.id),
            );
            list.ids().len()
        };
        let log = req.extensions().get::<LogFields>().cloned();
        EndpointFuture {
            fut: self.inner.call(req),
            guard: Guard {
                shared: Arc::clone(&self.shared),
                endpoints,
                permits,
                tried,
                from,
                wait,
                fallback: self.fallback.clone(),
                log,
            },
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for EndpointBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointBreaker")
            .field("inner", &self.inner)
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl<F, E> Future for EndpointFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.fut.poll(cx)).map_err(Into::into);
        Poll::Ready(this.guard.finish(result))
    }
}

// === impl Guard ===

impl Guard {
    /// Reports the call's outcome to the breakers of the endpoints it went to, and answers
    /// a call the proxy refused because every endpoint left was barred.
    fn finish(
        &mut self,
        result: Result<Response<Body>, BoxError>,
    ) -> Result<Response<Body>, BoxError> {
        let tried = self.tried.clone();
        let mut list = tried.lock();
        list.bar([]);
        let called = list.ids().len().saturating_sub(self.from);
        if called == 0 {
            drop(list);
            return match result {
                Err(e) if Error::kind_of(&*e) == ErrorKind::CircuitOpen => self.refused(),
                other => other,
            };
        }
        let class = classify::result(&result);
        for (n, (id, authority)) in list.since(self.from).enumerate() {
            // Before the last, the endpoints the proxy failed over from: their connection
            // could not be opened.
            let class = if n + 1 == called {
                class
            } else {
                Class::Retryable
            };
            self.record(id, authority, class);
        }
        result
    }

    /// Every endpoint left was barred: the proxy called none.
    fn refused(&self) -> Result<Response<Body>, BoxError> {
        if let Some(refused) = &self.shared.refused {
            refused.inc();
        }
        if let Some(log) = &self.log {
            log.insert("circuit_breaker", "open");
        }
        let wait = if self.wait == Duration::MAX {
            Duration::from_secs(1)
        } else {
            self.wait
        };
        self.fallback
            .answer(wait)
            .unwrap_or_else(|| Err(Error::new(ErrorKind::CircuitOpen).retry_after(wait).into()))
    }

    fn record(&mut self, id: u64, authority: Option<&Authority>, class: Class) {
        if let Some(i) = self.endpoints.iter().position(|e| e.id == id) {
            if let (Some(permit), Some(entry)) = (
                self.permits.get_mut(i).and_then(Option::as_mut),
                self.endpoints.get(i),
            ) {
                entry.state.record(permit, class);
            }
            return;
        }
        // An endpoint called for the first time: its breaker starts now.
        if let Some(state) = self.shared.add(id, authority)
            && let Admit::Call(mut permit) = state.admit()
        {
            state.record(&mut permit, class);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Permits not used (endpoints not picked, or a call dropped before its outcome)
        // are given back: a half-open breaker's probe goes to another call.
        for (entry, permit) in self.endpoints.iter().zip(&mut self.permits) {
            if let Some(permit) = permit {
                entry.state.record(permit, Class::Client);
            }
        }
    }
}

// === impl Shared ===

impl Shared {
    fn new(name: Arc<str>, breaker: Breaker, metrics: Option<Metrics>) -> Self {
        Self {
            refused: Report::refusals(Arc::clone(&name), metrics.as_ref()),
            name,
            breaker,
            metrics,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            adding: Mutex::new(()),
        }
    }

    /// The breaker of endpoint `id`, added if it has none; `None` when there is no room.
    fn add(&self, id: u64, authority: Option<&Authority>) -> Option<Arc<State>> {
        let _adding = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.endpoints.load();
        if let Some(entry) = current.iter().find(|e| e.id == id) {
            return Some(Arc::clone(&entry.state));
        }
        let mut next: Vec<Entry> = current
            .iter()
            .map(|e| Entry {
                id: e.id,
                authority: e.authority.clone(),
                state: Arc::clone(&e.state),
            })
            .collect();
        if next.len() >= MAX_ENDPOINTS {
            next.retain(|e| e.state.phase() != Phase::Closed);
            if next.len() >= MAX_ENDPOINTS {
                tracing::debug!(breaker = %self.name, "no room for another endpoint's breaker");
                return None;
            }
        }
        let label: Arc<str> = match authority {
            Some(authority) => format!("{}/{authority}", self.name).into(),
            None => format!("{}/#{id}", self.name).into(),
        };
        let state = Arc::new(State::new(
            self.breaker.clone(),
            Report::endpoint(label, self.metrics.as_ref()),
        ));
        next.push(Entry {
            id,
            authority: authority.cloned(),
            state: Arc::clone(&state),
        });
        self.endpoints.store(Arc::new(next));
        Some(state)
    }
}
