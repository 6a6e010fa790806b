//! Middleware that counts and times every request in Prometheus metrics.
//!
//! [`HttpMetricsLayer`] sits at the edge, outside the router, so it sees every answer (a
//! route's, the router's own 404 and 400). It reports into a
//! [`Metrics`](gateway_core::metrics::Metrics) registry, following `docs/observability.md`:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `gateway_http_requests_total` | counter | `route`, `method`, `status_class` |
//! | `gateway_http_request_duration_seconds` | histogram | `route` |
//! | `gateway_http_requests_in_flight` | gauge | |
//! | `gateway_http_request_body_bytes_total` | counter | `route` |
//! | `gateway_http_response_body_bytes_total` | counter | `route` |
//!
//! `route` is the [`RouteId`] the router puts on the response (`-` when no route
//! answered); `method` is one of the nine standard methods or `_OTHER`; `status_class` is
//! `1xx` to `5xx`. No label comes from the path, the host or anything else a client
//! chooses. A request is counted, and its duration observed, when its response body ends
//! (or the client goes away), so the duration covers the whole exchange.
//!
//! Recording costs a few atomic operations and one uncontended lock per request: the
//! route's series are looked up once per route and kept.
//!
//! # Example
//!
//! ```
//! use gateway_core::metrics::{Format, Metrics};
//! use gateway_core::{Body, RouteId};
//! use gateway_middleware::metrics::HttpMetricsLayer;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let metrics = Metrics::new();
//! let svc = ServiceBuilder::new()
//!     .layer(HttpMetricsLayer::new(&metrics))
//!     .service(service_fn(|_: Request<Body>| async {
//!         let mut res = Response::new(Body::from("hello"));
//!         res.extensions_mut().insert(RouteId::new("api"));
//!         Ok::<_, std::convert::Infallible>(res)
//!     }));
//! let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
//! Body::new(res.into_body()).collect_bytes().await.unwrap();
//!
//! let text = metrics.encode(Format::Prometheus);
//! assert!(text.contains(r#"gateway_http_requests_total{route="api",method="GET",status_class="2xx"} 1"#));
//! assert!(text.contains(r#"gateway_http_response_body_bytes_total{route="api"} 5"#));
//! # }
//! ```
//!
//! # Ordering
//!
//! At the edge, outside the router: it reads the route from the response (the router
//! answers its routes' errors itself, so every routed answer names its route). Outermost,
//! outside the edge [`Rescue`](gateway_core::rescue::Rescue), is best: it then counts
//! the rescued answers too, and its body goes to the server as it is, not boxed again.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, ready};

use gateway_core::metrics::{self as conv, Histograms, Metrics};
use gateway_core::{Body, RouteId};
use http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::observe::{self, Observed, OnEnd};

/// Counts and times requests; see the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct HttpMetricsLayer {
    shared: Arc<Shared>,
}

/// The service of [`HttpMetricsLayer`].
#[derive(Clone)]
pub struct HttpMetrics<S> {
    inner: S,
    shared: Arc<Shared>,
}

pin_project! {
    /// Response future of [`HttpMetrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        exchange: Option<Exchange>,
    }
}

pin_project! {
    /// Response body of [`HttpMetrics`]: counts its bytes and records the exchange at its
    /// end (or when dropped).
    pub struct ResponseBody<B> {
        #[pin]
        inner: Observed<B, Answered>,
    }
}

struct Shared {
    requests: Family<RequestLabels, Counter>,
    durations: Histograms<RouteLabel>,
    in_flight: Gauge,
    bytes_in: Family<RouteLabel, Counter>,
    bytes_out: Family<RouteLabel, Counter>,
    /// Each route's series, looked up once. Bounded by the routes configured.
    routes: RwLock<HashMap<RouteId, Arc<RouteSeries>>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: RouteId,
    method: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabel {
    route: RouteId,
}

const METHODS: usize = 10;
const CLASSES: usize = 5;

/// One route's series; the request counters are created on first use, so a route shows
/// only the methods and classes it has seen.
struct RouteSeries {
    route: RouteId,
    requests: [[OnceLock<Counter>; CLASSES]; METHODS],
    duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

/// A request on its way, until its response comes.
struct Exchange {
    shared: Arc<Shared>,
    /// The method's row in a route's counters, and its label.
    method: (usize, &'static str),
    start: Instant,
    /// What the request body has read so far; `None` for a request without a body.
    read: Option<Arc<AtomicU64>>,
}

/// An answered request, until its response body ends.
struct Answered {
    exchange: Exchange,
    series: Arc<RouteSeries>,
    status: StatusCode,
}

// === impl HttpMetricsLayer ===

impl HttpMetricsLayer {
    /// Reports into `metrics` (the families are shared with every other layer on the same
    /// registry).
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                requests: metrics.family(
                    "http_requests",
                    "Requests answered, by route, method and status class.",
                ),
                durations: metrics.histograms(
                    "http_request_duration_seconds",
                    "Time from the request's arrival to the end of its response body.",
                ),
                in_flight: metrics.metric(
                    "http_requests_in_flight",
                    "Requests received and not yet answered to the end.",
                    Gauge::default,
                ),
                bytes_in: metrics.family(
                    "http_request_body_bytes",
                    "Request body bytes read, by route.",
                ),
                bytes_out: metrics.family(
                    "http_response_body_bytes",
                    "Response body bytes sent, by route.",
                ),
                routes: RwLock::default(),
            }),
        }
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> HttpMetrics<S> {
        HttpMetrics {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for HttpMetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpMetricsLayer").finish_non_exhaustive()
    }
}

// === impl HttpMetrics ===

impl<S, ResB> Service<Request<Body>> for HttpMetrics<S>
where
    S: Service<Request<Body>, Response = Response<ResB>>,
    ResB: http_body::Body,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let start = Instant::now();
        self.shared.in_flight.inc();
        let (head, body) = req.into_parts();
        let (body, read) = observe::count_request(body);
        let exchange = Exchange {
            shared: Arc::clone(&self.shared),
            method: (method_index(&head.method), conv::method(&head.method)),
            start,
            read,
        };
        ResponseFuture {
            inner: self.inner.call(Request::from_parts(head, body)),
            exchange: Some(exchange),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for HttpMetrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpMetrics")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

// === impl ResponseFuture ===

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    ResB: http_body::Body,
{
    type Output = Result<Response<ResponseBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        let exchange = this.exchange.take().map(|exchange| {
            let series = exchange.shared.series(res.extensions().get::<RouteId>());
            Answered {
                exchange,
                series,
                status: res.status(),
            }
        });
        Poll::Ready(Ok(res.map(|inner| ResponseBody {
            inner: Observed::new(inner, exchange),
        })))
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

// === impl ResponseBody ===

impl<B> http_body::Body for ResponseBody<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

// === impl Shared ===

impl Shared {
    fn series(&self, route: Option<&RouteId>) -> Arc<RouteSeries> {
        static NO_ROUTE: OnceLock<RouteId> = OnceLock::new();
        let route = route.unwrap_or_else(|| NO_ROUTE.get_or_init(|| RouteId::new(conv::NO_ROUTE)));
        if let Some(series) = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
        {
            return Arc::clone(series);
        }
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        let series = routes.entry(route.clone()).or_insert_with(|| {
            let label = RouteLabel {
                route: route.clone(),
            };
            Arc::new(RouteSeries {
                route: route.clone(),
                requests: Default::default(),
                duration: self.durations.get_or_create_owned(&label),
                bytes_in: self.bytes_in.get_or_create_owned(&label),
                bytes_out: self.bytes_out.get_or_create_owned(&label),
            })
        });
        Arc::clone(series)
    }
}

// === impl Answered ===

impl OnEnd for Answered {
    fn end(self, written: u64, _complete: bool) {
        let Self {
            exchange,
            series,
            status,
        } = self;
        let shared = &exchange.shared;
        let (m, c) = (exchange.method.0, class_index(status));
        series.requests[m][c]
            .get_or_init(|| {
                shared.requests.get_or_create_owned(&RequestLabels {
                    route: series.route.clone(),
                    method: exchange.method.1,
                    status_class: conv::status_class(status),
                })
            })
            .inc();
        series
            .duration
            .observe(exchange.start.elapsed().as_secs_f64());
        if written > 0 {
            series.bytes_out.inc_by(written);
        }
        if exchange.read.is_some() {
            series
                .bytes_in
                .inc_by(observe::read(exchange.read.as_ref()));
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // An answered request is recorded first (`Answered::end` consumes it); one whose
        // future was dropped before its answer (the client went away) only leaves.
        self.shared.in_flight.dec();
    }
}

const fn class_index(status: StatusCode) -> usize {
    match status.as_u16() / 100 {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        _ => 4,
    }
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}
