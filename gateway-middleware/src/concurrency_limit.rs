//! Middleware that caps a route's requests in flight and sheds the rest at once: a `503`
//! rather than a queue, for routes that must not queue.
//!
//! A request holds its place from the call until its response body has streamed to the
//! end (or failed, or was dropped), so a slow download counts as much as a slow answer.
//! Unlike tower's `ConcurrencyLimit`, nothing waits in `poll_ready`: a request over the cap
//! gets [`ErrorKind::Overloaded`] (503, `Retry-After: 1`), passed up as an error for the
//! route's rescue to answer (inside CORS). Clones share the cap.
//!
//! Per-key limits (per client, per consumer) are the rate limiter's
//! ([`Limit::concurrent`](crate::rate_limit::Limit::concurrent), a 429); this one protects
//! the upstream and the gateway as a whole.
//!
//! # Example
//!
//! ```
//! use gateway_core::{Body, Error, ErrorKind};
//! use gateway_middleware::concurrency_limit::ConcurrencyLimitLayer;
//! use http::{Request, Response};
//! use tower::{BoxError, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = tower::ServiceBuilder::new()
//!     .layer(ConcurrencyLimitLayer::new(1))
//!     .service(service_fn(|_: Request<Body>| async {
//!         Ok::<_, BoxError>(Response::new(Body::from("streaming...")))
//!     }));
//! let first = svc.clone().oneshot(Request::new(Body::empty())).await.unwrap();
//! // The first response is still streaming: the second request is shed.
//! let err = svc.clone().oneshot(Request::new(Body::empty())).await.unwrap_err();
//! assert_eq!(Error::kind_of(&*err), ErrorKind::Overloaded);
//! drop(first);
//! assert!(svc.oneshot(Request::new(Body::empty())).await.is_ok());
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use gateway_core::metrics::Metrics;
use gateway_core::{Body, BoxError, Error, ErrorKind, RouteId};
use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, Service};

/// Caps requests in flight; see the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct ConcurrencyLimitLayer {
    shared: Arc<Shared>,
}

/// The service of a [`ConcurrencyLimitLayer`].
#[derive(Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    max: usize,
    in_flight: AtomicUsize,
    counters: Option<(Gauge, Counter)>,
}

pin_project! {
    /// The response future of [`ConcurrencyLimit`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        permit: Option<Permit>,
    }
}

/// A place in flight, given back when dropped.
struct Permit(Arc<Shared>);

// === impl ConcurrencyLimitLayer ===

impl ConcurrencyLimitLayer {
    /// At most `max` requests in flight.
    ///
    /// # Panics
    ///
    /// When `max` is 0.
    pub fn new(max: usize) -> Self {
        assert!(max > 0, "a limit lets at least one request through");
        Self {
            shared: Arc::new(Shared {
                max,
                in_flight: AtomicUsize::new(0),
                counters: None,
            }),
        }
    }

    /// Reports requests in flight (`gateway_concurrency_limit_in_flight`) and shed
    /// (`gateway_concurrency_limit_shed_total`) under the `route` label.
    pub fn metrics(self, metrics: &Metrics, route: &str) -> Self {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Labels {
            route: RouteId,
        }
        let labels = Labels {
            route: RouteId::new(route),
        };
        let in_flight: Family<Labels, Gauge> = metrics.family(
            "concurrency_limit_in_flight",
            "Requests a route's concurrency limit holds now",
        );
        let shed: Family<Labels, Counter> = metrics.family(
            "concurrency_limit_shed",
            "Requests a route's concurrency limit refused (503) because it was full",
        );
        Self {
            shared: Arc::new(Shared {
                max: self.shared.max,
                in_flight: AtomicUsize::new(0),
                counters: Some((
                    in_flight.get_or_create(&labels).clone(),
                    shed.get_or_create(&labels).clone(),
                )),
            }),
        }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for ConcurrencyLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("max", &self.shared.max)
            .field("in_flight", &self.shared.in_flight.load(Ordering::Relaxed))
            .finish()
    }
}

// === impl ConcurrencyLimit ===

impl<S> Service<Request<Body>> for ConcurrencyLimit<S>
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
        let shared = &self.shared;
        let taken = shared
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < shared.max).then_some(n + 1)
            });
        if taken.is_err() {
            if let Some((_, shed)) = &shared.counters {
                shed.inc();
            }
            return ResponseFuture {
                inner: None,
                permit: None,
            };
        }
        if let Some((gauge, _)) = &shared.counters {
            gauge.inc();
        }
        ResponseFuture {
            inner: Some(self.inner.call(req)),
            permit: Some(Permit(Arc::clone(shared))),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ConcurrencyLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .field("max", &self.shared.max)
            .finish()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let err = Error::new(ErrorKind::Overloaded).retry_after(Duration::from_secs(1));
            return Poll::Ready(Err(err.into()));
        };
        let res = ready!(inner.poll(cx)).map_err(Into::into)?;
        // The place is held until the body ends (or is dropped).
        Poll::Ready(Ok(match this.permit.take() {
            Some(permit) => res.map(|body| body.with_guard(permit)),
            None => res,
        }))
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some((gauge, _)) = &self.0.counters {
            gauge.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{ServiceExt, service_fn};

    fn ok() -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone {
        service_fn(|_: Request<Body>| async { Ok::<_, BoxError>(Response::new(Body::from("x"))) })
    }

    #[tokio::test]
    async fn sheds_over_the_cap_until_bodies_end_and_counts() {
        let metrics = Metrics::new();
        let svc = ConcurrencyLimitLayer::new(2)
            .metrics(&metrics, "api")
            .layer(ok());
        let a = svc
            .clone()
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        let b = svc
            .clone()
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        let err = svc
            .clone()
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap_err();
        let err = Error::from_box(err);
        assert_eq!(err.kind(), ErrorKind::Overloaded);
        assert_eq!(err.retry_after_hint(), Some(Duration::from_secs(1)));
        let text = metrics.encode(gateway_core::metrics::Format::Prometheus);
        assert!(
            text.contains(r#"gateway_concurrency_limit_in_flight{route="api"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_concurrency_limit_shed_total{route="api"} 1"#),
            "{text}"
        );
        // A body read to its end gives its place back.
        a.into_body().collect_bytes().await.unwrap();
        let c = svc
            .clone()
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        drop((b, c));
        let text = metrics.encode(gateway_core::metrics::Format::Prometheus);
        assert!(
            text.contains(r#"gateway_concurrency_limit_in_flight{route="api"} 0"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_failed_call_gives_its_place_back() {
        let failing = service_fn(|_: Request<Body>| async {
            Err::<Response<Body>, BoxError>(Error::new(ErrorKind::BadGateway).into())
        });
        let svc = ConcurrencyLimitLayer::new(1).layer(failing);
        for _ in 0..3 {
            let err = svc
                .clone()
                .oneshot(Request::new(Body::empty()))
                .await
                .unwrap_err();
            assert_eq!(Error::kind_of(&*err), ErrorKind::BadGateway);
        }
    }
}
