//! Middleware that counts and times every request in Prometheus metrics.
//!
//! [`HttpMetricsLayer`] sits at the edge, outside the router, so it sees every answer (a
//! route's, the router's own 404 and 400). It reports into a
//! [`Metrics`] registry, following `docs/observability.md`:
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
//! answers its routes' errors itself, so every routed answer names its route). An error
//! from the inner service is counted with the status it maps to, so inside or outside the
//! edge [`Rescue`](gateway_core::rescue::Rescue) counts the same.
//!
//! With the access log or OTLP export too, use one
//! [`ObserveLayer`] for all of them: this layer is that
//! layer with metrics alone, and each one stacked costs its own wrapper.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use gateway_core::RouteId;
use gateway_core::metrics::{self as conv, Histograms, Metrics};
use http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tower::Layer;

use crate::observe::{Observe, ObserveLayer};

/// Counts and times requests; see the [module docs](self). An
/// [`ObserveLayer`] with metrics alone.
#[derive(Clone)]
#[must_use]
pub struct HttpMetricsLayer {
    observe: ObserveLayer,
}

/// The service of [`HttpMetricsLayer`].
pub type HttpMetrics<S> = Observe<S>;

/// Response future of [`HttpMetrics`].
pub type ResponseFuture<F> = crate::observe::ResponseFuture<F>;

/// Response body of [`HttpMetrics`]: counts its bytes and records the exchange at its end
/// (or when dropped).
pub type ResponseBody<B> = crate::observe::ResponseBody<B>;

/// The families a registry's request metrics go to, and each route's series in them.
pub(crate) struct Shared {
    requests: Family<RequestLabels, Counter>,
    durations: Histograms<RouteLabel>,
    in_flight: Gauge,
    bytes_in: Family<RouteLabel, Counter>,
    bytes_out: Family<RouteLabel, Counter>,
    /// Each route's series, looked up once. Bounded by the routes configured.
    routes: RwLock<HashMap<RouteId, Arc<RouteSeries>, BuildHasherDefault<Fnv>>>,
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

/// FNV-1a, for the route map: its keys are the config's route names, not a client's
/// choice, and a route's name is hashed on every request (SipHash cost more than the rest of
/// the lookup).
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

const METHODS: usize = 10;
const CLASSES: usize = 5;

/// One route's series; the request counters are created on first use, so a route shows
/// only the methods and classes it has seen.
pub(crate) struct RouteSeries {
    route: RouteId,
    requests: [[OnceLock<Counter>; CLASSES]; METHODS],
    duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

// === impl HttpMetricsLayer ===

impl HttpMetricsLayer {
    /// Reports into `metrics` (the families are shared with every other layer on the same
    /// registry).
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            observe: ObserveLayer::new().metrics(metrics),
        }
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> HttpMetrics<S> {
        self.observe.layer(inner)
    }
}

impl fmt::Debug for HttpMetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpMetricsLayer").finish_non_exhaustive()
    }
}

// === impl Shared ===

impl Shared {
    /// The request families of `metrics`.
    pub(crate) fn new(metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
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
        })
    }

    /// A request arrived: it is in flight, and this is its method's row and label.
    pub(crate) fn arrived(&self, method: &Method) -> (usize, &'static str) {
        self.in_flight.inc();
        (method_index(method), conv::method(method))
    }

    /// A request left (answered or not).
    pub(crate) fn left(&self) {
        self.in_flight.dec();
    }

    /// Records an answered request of `method` on `series`.
    pub(crate) fn record(
        &self,
        series: &RouteSeries,
        method: (usize, &'static str),
        status: StatusCode,
        duration: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        series.requests[method.0][class_index(status)]
            .get_or_init(|| {
                self.requests.get_or_create_owned(&RequestLabels {
                    route: series.route.clone(),
                    method: method.1,
                    status_class: conv::status_class(status),
                })
            })
            .inc();
        series.duration.observe(duration.as_secs_f64());
        if bytes_out > 0 {
            series.bytes_out.inc_by(bytes_out);
        }
        if bytes_in > 0 {
            series.bytes_in.inc_by(bytes_in);
        }
    }

    /// The series of `route` (`-` for none).
    pub(crate) fn series(&self, route: Option<&RouteId>) -> Arc<RouteSeries> {
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
