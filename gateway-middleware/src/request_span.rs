//! A `tracing` span around every request, so that whatever is logged while a request is
//! served says which request it was.
//!
//! The span is named `request` and has these fields:
//!
//! | field | set by |
//! |---|---|
//! | `method`, `path` | this layer, from the request (the path without its query) |
//! | `trace_id` | this layer, from the [`TraceContext`](crate::trace_context::TraceContext) when one is set outside |
//! | `route` | the router, when a route matches |
//! | `upstream` | the proxy, with the endpoint (`host:port`) it picked |
//! | `status` | this layer, when the response head is ready |
//!
//! A failed request's log line then reads
//! `WARN request{method=GET path=/api/x route=api upstream=10.0.0.7:8080}: request failed
//! status=502 error=...`. The span is entered while the inner service's future and the
//! response body are polled (tower-http's [`Trace`] does the work; its own events are off,
//! since the access log already has one line per request).
//!
//! The span's level is `INFO` by default: a subscriber that filters `INFO` out creates no
//! span and pays nothing for it.
//!
//! A span costs a few microseconds with `tracing-subscriber`'s formatter (more than the
//! rest of the observing layers together), so [`sampled_only`](RequestSpanLayer::sampled_only)
//! makes one only for requests whose trace is sampled (a [`TraceContext`] set outside says
//! so), the way tracing systems record spans: with a sample ratio of 0.1, a tenth of the
//! requests pay for one. A failed request's log line names its method, path, route and
//! upstream either way ([`gateway_core::Error::log_for`]).
//!
//! [`TraceContext`]: crate::trace_context::TraceContext
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::request_span::RequestSpanLayer;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(RequestSpanLayer::new())
//!     .service(service_fn(|_: Request<Body>| async {
//!         tracing::warn!("logged inside the request's span");
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//!     }));
//! svc.oneshot(Request::new(Body::empty())).await.unwrap();
//! # }
//! ```

use std::time::Duration;

use http::{Request, Response};
use tower::Layer;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{MakeSpan, OnResponse, Trace, TraceLayer};
use tracing::field::Empty;
use tracing::{Level, Span};

/// Puts every request in a `request` span; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct RequestSpanLayer {
    level: Level,
    sampled_only: bool,
}

/// The service of [`RequestSpanLayer`]: tower-http's [`Trace`] with the span and the
/// status recording of this module, and no events of its own.
pub type RequestSpan<S> = Trace<
    S,
    SharedClassifier<ServerErrorsAsFailures>,
    MakeRequestSpan,
    (),
    RecordStatus,
    (),
    (),
    (),
>;

/// Makes the `request` span of a request.
#[derive(Clone, Copy, Debug)]
pub struct MakeRequestSpan {
    level: Level,
    sampled_only: bool,
}

/// Records the response's status in the span.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordStatus;

// === impl RequestSpanLayer ===

impl Default for RequestSpanLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestSpanLayer {
    /// A span for every request, at `INFO`.
    pub const fn new() -> Self {
        Self {
            level: Level::INFO,
            sampled_only: false,
        }
    }

    /// A span only for requests whose [`TraceContext`](crate::trace_context::TraceContext)
    /// (set by a `TraceContextLayer` outside) is sampled; none for the others, nor for a
    /// request without one.
    pub const fn sampled_only(mut self) -> Self {
        self.sampled_only = true;
        self
    }

    /// Spans at `level`: at `WARN`, a subscriber that shows warnings only still gives them
    /// their request's fields (at the cost of a span per request).
    pub const fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
}

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> RequestSpan<S> {
        TraceLayer::new_for_http()
            .make_span_with(MakeRequestSpan {
                level: self.level,
                sampled_only: self.sampled_only,
            })
            .on_request(())
            .on_response(RecordStatus)
            .on_body_chunk(())
            .on_eos(())
            .on_failure(())
            .layer(inner)
    }
}

// === impl MakeRequestSpan ===

impl<B> MakeSpan<B> for MakeRequestSpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let trace = req.extensions().get::<crate::trace_context::TraceContext>();
        if self.sampled_only && !trace.is_some_and(|t| t.is_sampled()) {
            return Span::none();
        }
        macro_rules! span {
            ($level:expr) => {
                tracing::span!(
                    $level,
                    "request",
                    method = %req.method(),
                    path = %req.uri().path(),
                    route = Empty,
                    upstream = Empty,
                    status = Empty,
                    trace_id = Empty,
                )
            };
        }
        let span = match self.level {
            Level::ERROR => span!(Level::ERROR),
            Level::WARN => span!(Level::WARN),
            Level::INFO => span!(Level::INFO),
            Level::DEBUG => span!(Level::DEBUG),
            _ => span!(Level::TRACE),
        };
        if !span.is_disabled()
            && let Some(trace) = trace
        {
            span.record("trace_id", tracing::field::display(trace.trace_id()));
        }
        span
    }
}

// === impl RecordStatus ===

impl<B> OnResponse<B> for RecordStatus {
    fn on_response(self, res: &Response<B>, _latency: Duration, span: &Span) {
        span.record("status", res.status().as_u16());
    }
}
