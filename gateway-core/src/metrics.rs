//! The gateway's Prometheus metrics: one registry every component reports into, and the
//! label conventions they share (see `docs/observability.md`).
//!
//! A [`Metrics`] is a handle (cloning is cheap) on one
//! [`prometheus_client`](https://docs.rs/prometheus-client) registry. Components ask it for
//! their families by name ([`Metrics::family`], [`Metrics::histograms`],
//! [`Metrics::metric`]): the first caller registers the family, later callers (another
//! route's layer, the same layer rebuilt by a config reload) share it, so series survive a
//! reload and are never registered twice. State that already lives elsewhere (endpoint
//! health, config reloads) is read when scraped, by a [`Collector`].
//!
//! Label values come from configuration (route ids, upstream and endpoint names) and from
//! small fixed sets ([`method`], [`status_class`]); never from a path, a host or anything
//! else a client chooses, so the number of series is bounded by the config.
//!
//! # Example
//!
//! ```
//! use gateway_core::metrics::{Format, Metrics};
//! use prometheus_client::metrics::counter::Counter;
//!
//! let metrics = Metrics::new();
//! let hits: Counter = metrics.metric("example_hits", "Hits.", Counter::default);
//! hits.inc();
//! let text = metrics.encode(Format::Prometheus);
//! assert!(text.contains("gateway_example_hits_total 1"));
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::RouteId;

/// The prefix of every metric name.
pub const PREFIX: &str = "gateway";

/// Histogram buckets for request and upstream durations, in seconds: 1 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `route` label of a request that matched no route.
pub const NO_ROUTE: &str = "-";

/// The gateway's metrics registry. Cloning is cheap (one `Arc`); clones share it.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    registry: Registry,
    /// Every family and metric registered by name, for sharing.
    by_name: HashMap<&'static str, Box<dyn Any + Send + Sync>>,
}

/// An exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (the default of every scraper).
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it in `Accept`.
    OpenMetrics,
}

/// A histogram family whose histograms share one set of buckets.
pub type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

// === impl Metrics ===

impl Metrics {
    /// An empty registry; every name registered in it gets the [`PREFIX`].
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                registry: Registry::with_prefix(PREFIX),
                by_name: HashMap::new(),
            })),
        }
    }

    /// The metric `name` (without the prefix), registered by `make` on the first call and
    /// shared from then on (a clone of it: the metric types are handles).
    ///
    /// Counters get the `_total` suffix in the exposition; do not put it in `name`.
    ///
    /// # Panics
    ///
    /// When `name` was registered before with another type (a programming error).
    #[track_caller]
    pub fn metric<M>(&self, name: &'static str, help: &'static str, make: impl FnOnce() -> M) -> M
    where
        M: Metric + Clone,
    {
        let mut inner = self.lock();
        if let Some(existing) = inner.by_name.get(name) {
            return match existing.downcast_ref::<M>() {
                Some(metric) => metric.clone(),
                None => panic!("metric {name} is registered with another type"),
            };
        }
        let metric = make();
        // NOTE: the encoder ends the help text with a period of its own.
        let help = help.strip_suffix('.').unwrap_or(help);
        inner.registry.register(name, help, metric.clone());
        inner.by_name.insert(name, Box::new(metric.clone()));
        metric
    }

    /// The family `name` with label set `S` and metrics made by `M::default()`.
    ///
    /// # Panics
    ///
    /// When `name` was registered before with another type (a programming error).
    #[track_caller]
    pub fn family<S, M>(&self, name: &'static str, help: &'static str) -> Family<S, M>
    where
        S: EncodeLabelSet + Clone + Eq + std::hash::Hash + fmt::Debug + Send + Sync + 'static,
        M: TypedMetric + Default + fmt::Debug + Send + Sync + 'static,
        Family<S, M>: Metric,
    {
        self.metric(name, help, Family::default)
    }

    /// The histogram family `name` with label set `S`, its buckets [`LATENCY_BUCKETS`]
    /// (seconds).
    ///
    /// # Panics
    ///
    /// When `name` was registered before with another type (a programming error).
    #[track_caller]
    pub fn histograms<S>(&self, name: &'static str, help: &'static str) -> Histograms<S>
    where
        S: EncodeLabelSet + Clone + Eq + std::hash::Hash + fmt::Debug + Send + Sync + 'static,
        Histograms<S>: Metric,
    {
        self.metric(name, help, || {
            Family::new_with_constructor(latency_histogram as fn() -> Histogram)
        })
    }

    /// Registers a collector, asked for its metrics on every scrape. Its names are its own
    /// (they get the [`PREFIX`] like every other).
    pub fn collector(&self, collector: impl Collector) {
        self.lock().registry.register_collector(Box::new(collector));
    }

    /// Every metric in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let inner = self.lock();
        // Writing into a `String` cannot fail; a collector's own error ends the text early.
        let _ = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &inner.registry)
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &inner.registry)
            }
        };
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        let mut names: Vec<_> = inner.by_name.keys().collect();
        names.sort_unstable();
        f.debug_struct("Metrics").field("names", &names).finish()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

// === impl Format ===

impl Format {
    /// The format a scraper asks for in its `Accept` header: OpenMetrics when it names
    /// `application/openmetrics-text`, the Prometheus text format otherwise.
    pub fn negotiate(accept: Option<&http::HeaderValue>) -> Self {
        let asks = accept.and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(',').any(|range| {
                let mut params = range.split(';');
                let media = params.next().unwrap_or("").trim();
                // `q=0` refuses the type.
                let refused = params.any(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=")
                        .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0))
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if asks {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    /// The `Content-Type` of the format.
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

// === labels ===

/// The `method` label: the method's name for the nine standard methods, `_OTHER` for any
/// other (the OpenTelemetry convention), so a client cannot mint series with invented
/// methods.
pub fn method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// The `status_class` label: `1xx` to `5xx`.
pub const fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

impl EncodeLabelValue for RouteId {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
    struct Labels {
        route: RouteId,
        method: &'static str,
    }

    #[test]
    fn families_are_shared_by_name() {
        let metrics = Metrics::new();
        let a: Family<Labels, Counter> = metrics.family("requests", "Requests.");
        let b: Family<Labels, Counter> = metrics.family("requests", "Requests.");
        let labels = Labels {
            route: RouteId::new("api"),
            method: "GET",
        };
        a.get_or_create(&labels).inc();
        b.get_or_create(&labels).inc();
        let text = metrics.encode(Format::Prometheus);
        assert!(
            text.contains("gateway_requests_total{route=\"api\",method=\"GET\"} 2"),
            "{text}"
        );
        assert_eq!(text.matches("# TYPE").count(), 1, "{text}");
        let open = metrics.encode(Format::OpenMetrics);
        assert!(open.ends_with("# EOF\n"), "{open}");
    }

    #[test]
    #[should_panic(expected = "registered with another type")]
    fn one_name_one_type() {
        let metrics = Metrics::new();
        let _: Counter = metrics.metric("x", "X.", Counter::default);
        let _: Histograms<Labels> = metrics.histograms("x", "X.");
    }

    #[test]
    fn negotiation() {
        let h = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some(&h(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            ))),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some(&h("application/openmetrics-text;q=0, text/plain"))),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some(&h("text/plain"))),
            Format::Prometheus
        );
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method(&Method::from_bytes(b"BREW").unwrap()), "_OTHER");
        assert_eq!(method(&Method::PATCH), "PATCH");
        assert_eq!(status_class(StatusCode::IM_A_TEAPOT), "4xx");
        assert_eq!(status_class(StatusCode::SWITCHING_PROTOCOLS), "1xx");
    }
}
